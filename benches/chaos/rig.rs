//! What the soak runs the worker against, and the worker's configuration: the accounts, the
//! simulator, a private Redis with a replica and sentinels, a proxy in front of broker node 1
//! that can stall, the fleet.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use transfer_worker::tools::simulator::{SimBot, Simulator, SimulatorConfig};

use crate::amqp::{self, Names};
use crate::feed::History;
use crate::fleet::Fleet;
use crate::redis::RedisSet;
use crate::{Options, procs};

pub const REPLICAS: usize = 3;
pub const PARTITIONS: u16 = 8;
const CLIENT_ID: &str = "cs-00000000-0000-4000-8000-0000000000c1";
const CLIENT_SECRET: &str = "chaos-secret-chaos-secret-chaos-secret";
pub const LATENCY: Duration = Duration::from_millis(50);
pub const SLOW: Duration = Duration::from_secs(2);

/// A configured bot and its account's budget at the vendor.
#[derive(Debug, Clone, Copy)]
pub struct Account {
    /// The account id, also in the names of its account queues (`<source>.account.<id>#<tag>`).
    pub id: &'static str,
    pub stream: &'static str,
    /// `rate_limit` calls per `rate_window`.
    pub limit: u32,
    pub window: Duration,
    /// `bots.max_in_flight`, when not the default.
    pub max_in_flight: Option<u32>,
}

/// Steady sessions, paced at 20 calls per 5 s.
pub const PACED: Account = Account {
    id: "paced",
    stream: "st-00000000-0000-4000-8000-0000000000c1",
    limit: 20,
    window: Duration::from_secs(5),
    max_in_flight: None,
};
/// Steady sessions with a budget they never reach.
pub const FREE: Account = Account {
    id: "free",
    stream: "st-00000000-0000-4000-8000-0000000000c2",
    limit: 100_000,
    window: Duration::from_secs(1),
    max_in_flight: None,
};
/// Bursts far past a small budget, again and again: its lane turns on and off. One call in
/// flight a replica (50 ms each: the budget is still used whole) so that a burst waits in its
/// account queues rather than in the replicas' memory: what the operator deletes.
pub const BURST: Account = Account {
    id: "burst",
    stream: "st-00000000-0000-4000-8000-0000000000c3",
    limit: 5,
    window: Duration::from_secs(3),
    max_in_flight: Some(1),
};
/// The paced account comes first: the breaker probes through the first bot.
pub const ACCOUNTS: [Account; 3] = [PACED, FREE, BURST];
/// The accounts whose budget the worker reaches, whose windows are checked.
pub const BUDGETED: [Account; 2] = [PACED, BURST];

pub fn node_url(n: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", 5680 + n)
}

pub fn cluster(args: &[&str]) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rabbitmq-cluster");
    let out = Command::new(script).args(args).output()?;
    if !out.status.success() {
        bail!(
            "scripts/rabbitmq-cluster {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A TCP proxy in front of a broker node that can stall: hold back what the node sends.
async fn stalling_proxy(upstream: u16, held: watch::Receiver<bool>) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let held = held.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
                let mut held = held;
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0 || held.wait_for(|h| !*h).await.is_err() {
                        break;
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                up.abort();
            });
        }
    });
    Ok(port)
}

/// What every replica's configuration shares; [`Template::render`] adds its name and port.
pub struct Template {
    pub names: Names,
    pub urls: Vec<String>,
    pub sim: u16,
    /// `fleet.redis_url`: the Sentinel set.
    pub redis: String,
}

impl Template {
    pub fn render(&self, name: &str, admin: u16) -> String {
        let q = |s: &str| Value::String(s.to_owned()).to_string();
        let bots: String = ACCOUNTS
            .iter()
            .map(|a| {
                format!(
                    "[[bots]]\nstream_id = {}\naccount_id = {}\nclient_id = {}\n\
                     client_secret = {}\nrate_limit = {}\nrate_window = \"{}ms\"\n{}\n",
                    q(a.stream),
                    q(a.id),
                    q(CLIENT_ID),
                    q(CLIENT_SECRET),
                    a.limit,
                    a.window.as_millis(),
                    a.max_in_flight
                        .map_or(String::new(), |n| format!("max_in_flight = {n}\n")),
                )
            })
            .collect();
        // 1 s AMQP heartbeats: the broker drops a frozen replica's connection within 3 s, so
        // membership may end 250 ms + 3 × 1 s after the last heartbeat (docs/configuration.md,
        // fleet timings), where the worker's 3 s would ask for over 9 s.
        let urls: Vec<String> = self
            .urls
            .iter()
            .map(|u| q(&format!("{u}?heartbeat=1")))
            .collect();
        let names = &self.names;
        format!(
            "[amqp]\nurls = [{}]\ncommands_queue = {}\nresults_exchange = {}\n\
             dead_letter_exchange = {}\ndead_letter_queue = {}\nprefetch = 32\n\
             reconnect_initial_delay = \"100ms\"\nreconnect_max_delay = \"1s\"\n\n\
             [agentassist]\nbase_url = \"http://127.0.0.1:{}\"\nrequest_timeout = \"5s\"\n\n\
             {bots}[callbacks]\nlisten = \"127.0.0.1:0\"\npublic_url = \"http://127.0.0.1:9/unused\"\n\
             secret = \"chaos-callback-secret-chaos-callback\"\n\n\
             [retry]\ninitial_delay = \"100ms\"\nmax_delay = \"1s\"\n\n\
             [breaker]\nopen_after = \"3s\"\nprobe_interval = \"500ms\"\n\n\
             [shutdown]\ngrace = \"5s\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
             [fleet]\nredis_url = {}\nredis_min_replicas = 1\npartitions = {PARTITIONS}\n\
             name = {}\nheartbeat = \"250ms\"\nmember_ttl = \"{}ms\"\nlease = \"3s\"\n",
            urls.join(", "),
            q(&names.commands),
            q(&names.results),
            q(&names.dead_letter),
            q(&names.dead_queue),
            self.sim,
            q(&self.redis),
            q(name),
            MEMBER_TTL.as_millis(),
        )
    }
}

/// The replicas' `fleet.member_ttl`, the least the fleet timings allow with a 250 ms heartbeat
/// and 1 s AMQP heartbeats: a freeze lasts longer.
pub const MEMBER_TTL: Duration = Duration::from_millis(3250);

/// Everything the faults act on.
pub struct Rig {
    pub names: Names,
    pub dir: PathBuf,
    pub history: Arc<Mutex<History>>,
    pub fleet: Fleet,
    pub sim: Simulator,
    pub redis: RedisSet,
    /// Holds back what broker node 1 sends, while true.
    pub stall: watch::Sender<bool>,
}

impl Rig {
    /// Checks the cluster, starts Redis, the simulator, the proxy and the replicas.
    pub async fn start(
        o: &Options,
        names: &Names,
        history: Arc<Mutex<History>>,
    ) -> anyhow::Result<Self> {
        for n in 1..=3 {
            amqp::connect(&node_url(n), "chaos check")
                .await
                .with_context(|| format!("node {n} of the local cluster does not answer; start it with scripts/rabbitmq-cluster up"))?
                .close(200, "checked".into())
                .await?;
        }
        let dir = procs::bench_dir("chaos");
        let redis = RedisSet::start(&dir, &names.prefix).await?;
        let secret = || secrecy::SecretString::from(CLIENT_SECRET.to_owned());
        let sim = Simulator::start(SimulatorConfig {
            listen: "127.0.0.1:0".parse()?,
            bots: ACCOUNTS
                .iter()
                .map(|a| SimBot {
                    stream_id: a.stream.into(),
                    account_id: a.id.into(),
                    client_id: CLIENT_ID.into(),
                    client_secret: secret(),
                })
                .collect(),
            latency: LATENCY,
            callbacks: false,
            ..SimulatorConfig::default()
        })
        .await?;
        let (stall, stalled) = watch::channel(false);
        let proxy = stalling_proxy(5681, stalled).await?;
        let template = Template {
            names: names.clone(),
            urls: vec![
                format!("amqp://guest:guest@127.0.0.1:{proxy}/%2f"),
                node_url(2),
                node_url(3),
            ],
            sim: sim.addr().port(),
            redis: redis.url(),
        };
        let mut fleet = Fleet::new(template, o.worker_exe.clone(), dir.clone(), history.clone());
        for _ in 0..REPLICAS {
            fleet.add()?;
        }
        Ok(Self {
            names: names.clone(),
            dir,
            history,
            fleet,
            sim,
            redis,
            stall,
        })
    }

    /// Stops the replicas (SIGTERM, all at once); Redis goes with the rig.
    pub async fn stop(&mut self) {
        self.fleet.stop_all().await;
    }
}
