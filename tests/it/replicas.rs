//! Several real `transfer-worker run` processes on one set of queues (CONTRACT §9): each with
//! its own admin port, so a test can poll its `/readyz` and scrape its `/metrics`, kill it with
//! SIGKILL and start it again; one simulator for all of them; a consumer of every event they
//! publish; and a private `redis-server` a test can kill and restart on the same port.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::Value;
use transfer_worker::broker::topology;
use transfer_worker::config::Settings;
use transfer_worker::tools::simulator::{self, RecordedRequest, Simulator, SimulatorConfig};

use crate::harness::{Cleanup, EVENT_WAIT, Received, passive, test_channel};

/// The shared Redis the tests use when they need no outage.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A free TCP port on loopback (free when asked; the caller binds it soon after).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("a free port")
        .local_addr()
        .unwrap()
        .port()
}

/// Waits, up to `limit`, until `ok` holds; panics with `what` (and `detail()`) otherwise.
pub async fn wait_for(
    what: &str,
    limit: Duration,
    detail: impl Fn() -> String,
    mut ok: impl AsyncFnMut() -> bool,
) {
    let until = Instant::now() + limit;
    while !ok().await {
        assert!(
            Instant::now() < until,
            "{what} within {limit:?}\n{}",
            detail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How a fleet is run.
pub struct FleetSpec {
    pub replicas: usize,
    /// `fleet.redis_url`; `None`: no Redis, the replicas are hot standbys.
    pub redis_url: Option<String>,
    pub rate_limit: u32,
    pub rate_window: &'static str,
    pub prefetch: u16,
    /// The simulator's latency for every call.
    pub latency: Duration,
    /// Further `TRANSFER__…` variables for every replica.
    pub env: Vec<(String, String)>,
    /// Bots of further accounts, beside the default bot (paced by `rate_limit`).
    pub more_bots: Vec<BotSpec>,
}

/// A bot of an account of its own.
#[derive(Clone, Debug)]
pub struct BotSpec {
    pub stream_id: String,
    pub account_id: String,
    pub rate_limit: u32,
    pub rate_window: &'static str,
    pub max_in_flight: Option<u32>,
}

impl Default for FleetSpec {
    fn default() -> Self {
        Self {
            replicas: 2,
            redis_url: None,
            rate_limit: 100_000,
            rate_window: "1s",
            prefetch: 32,
            latency: Duration::ZERO,
            env: Vec::new(),
            more_bots: Vec::new(),
        }
    }
}

/// One `transfer-worker run` process.
pub struct Replica {
    pub name: String,
    pub admin: SocketAddr,
    child: Option<tokio::process::Child>,
    log: tempfile::NamedTempFile,
    env: Vec<(String, String)>,
    config: std::path::PathBuf,
}

impl Replica {
    /// Starts the process. The admin port was free when it was picked, but any outgoing
    /// connection on the machine may take an ephemeral port in the meantime: a start that
    /// fails to bind it is retried on another port.
    fn spawn(&mut self) {
        for _ in 0..5 {
            self.spawn_once();
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                let log = self.log();
                if log
                    .rsplit("starts ----")
                    .next()
                    .is_some_and(|l| l.contains("\"listening\""))
                {
                    return;
                }
                if !self.is_running() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let log = self.log();
            let last = log.rsplit("starts ----").next().unwrap_or_default();
            if self.is_running() || !last.contains("Address already in use") {
                return;
            }
            self.child = None;
            self.admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        }
    }

    fn spawn_once(&mut self) {
        assert!(self.child.is_none(), "{} already runs", self.name);
        let out = std::fs::OpenOptions::new()
            .append(true)
            .open(self.log.path())
            .unwrap();
        writeln!(&out, "---- {} starts ----", self.name).unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_transfer-worker"));
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env_remove("TRANSFER_CONFIG");
        for (key, _) in std::env::vars() {
            if key.starts_with("TRANSFER__") {
                command.env_remove(key);
            }
        }
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let child = command
            .env("TRANSFER__ADMIN__LISTEN", self.admin.to_string())
            .env("TRANSFER__FLEET__NAME", &self.name)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
        self.child = Some(child);
    }

    /// Whether the process runs (it may be starting, or stopping).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Its output so far, every run of it.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("the replica runs");
        let _ = child.start_kill();
        tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("a killed process is reaped in time")
            .expect("wait");
    }

    /// SIGTERM, and waits up to `limit` for the exit status.
    pub async fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the replica runs");
        crate::harness::sigterm(&child);
        match tokio::time::timeout(limit, child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "{} did not exit within {limit:?}:\n{}",
                self.name,
                self.log()
            ),
        }
    }

    /// Waits for the process to exit by itself, up to `limit`.
    pub async fn exit_status(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("the replica runs");
        let status = match tokio::time::timeout(limit, child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("{} still runs after {limit:?}:\n{}", self.name, self.log()),
        };
        self.child = None;
        status
    }

    /// `GET /readyz`'s status; `None` when the admin listener does not answer.
    pub async fn readyz(&self) -> Option<StatusCode> {
        reqwest::Client::new()
            .get(format!("http://{}/readyz", self.admin))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()
            .map(|r| r.status())
    }

    /// `GET /metrics`, as series; `None` when the admin listener does not answer.
    pub async fn try_metrics(&self) -> Option<BTreeMap<String, f64>> {
        let response = reqwest::Client::new()
            .get(format!("http://{}/metrics", self.admin))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        if response.status() != StatusCode::OK {
            return None;
        }
        Some(crate::operations::series(&response.text().await.ok()?))
    }

    /// `GET /metrics`, as series; panics when it does not answer.
    pub async fn metrics(&self) -> BTreeMap<String, f64> {
        match self.try_metrics().await {
            Some(m) => m,
            None => panic!("{} serves no metrics:\n{}", self.name, self.log()),
        }
    }

    /// One series' value (0 when absent).
    pub async fn metric(&self, key: &str) -> f64 {
        self.metrics().await.get(key).copied().unwrap_or(0.0)
    }

    /// The sum of every series of a family (`name` or `name{…}`), 0 when absent.
    pub async fn metric_sum(&self, name: &str) -> f64 {
        family_sum(&self.metrics().await, name)
    }
}

/// The sum of every series of a family (`name` or `name{…}`) in `series`.
pub fn family_sum(series: &BTreeMap<String, f64>, name: &str) -> f64 {
    series
        .iter()
        .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

/// Several replicas on one queue set, one simulator, and a consumer of their events.
pub struct Fleet {
    pub settings: Settings,
    pub sim: Simulator,
    pub channel: Channel,
    conn: Connection,
    pub replicas: Vec<Replica>,
    events: Consumer,
    env: Vec<(String, String)>,
    config: tempfile::NamedTempFile,
    /// Partition queues the replicas share (`fleet.partitions`); 0 without Redis.
    pub partitions: u16,
    _redis_keys: Option<RedisKeys>,
    _cleanup: Cleanup,
}

/// A config file with the default bot at the given pace.
fn config_file(settings: &Settings, spec: &FleetSpec) -> tempfile::NamedTempFile {
    let bot = &settings.bots[0];
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    let s = |v: &str| toml::Value::String(v.to_owned()).to_string();
    write!(
        file,
        "[[bots]]\nstream_id = {}\naccount_id = {}\nclient_id = {}\nclient_secret = {}\n\
         rate_limit = {}\nrate_window = {}\n",
        s(&bot.stream_id),
        s(&bot.account_id),
        s(&bot.client_id),
        s(bot.client_secret.as_ref().unwrap().expose_secret()),
        spec.rate_limit,
        s(spec.rate_window),
    )
    .unwrap();
    for more in &spec.more_bots {
        write!(
            file,
            "[[bots]]\nstream_id = {}\naccount_id = {}\nclient_id = {}\nclient_secret = {}\n\
             rate_limit = {}\nrate_window = {}\n",
            s(&more.stream_id),
            s(&more.account_id),
            s(&bot.client_id),
            s(bot.client_secret.as_ref().unwrap().expose_secret()),
            more.rate_limit,
            s(more.rate_window),
        )
        .unwrap();
        if let Some(max) = more.max_in_flight {
            writeln!(file, "max_in_flight = {max}").unwrap();
        }
    }
    file.flush().unwrap();
    file
}

impl Fleet {
    /// Declares the topology, starts the simulator and `spec.replicas` replicas, and waits
    /// until every replica is ready and a consumer of the commands queue.
    pub async fn start(spec: FleetSpec) -> Self {
        let settings = crate::harness::test_settings();
        let (conn, channel) = test_channel().await;
        topology::declare(&channel, &settings.amqp)
            .await
            .expect("topology");
        let fleet = Self::assemble(spec, settings, conn, channel).await;
        fleet.wait_all_ready().await;
        fleet
    }

    /// Like [`Fleet::start`] with given settings, declaring nothing: the replicas declare
    /// the topology themselves (or refuse to), and nothing waits for them.
    pub async fn launch_undeclared(spec: FleetSpec, settings: Settings) -> Self {
        let (conn, channel) = test_channel().await;
        Self::assemble(spec, settings, conn, channel).await
    }

    async fn assemble(
        spec: FleetSpec,
        mut settings: Settings,
        conn: Connection,
        channel: Channel,
    ) -> Self {
        crate::init_logs();
        for more in &spec.more_bots {
            let mut bot = settings.bots[0].clone();
            bot.stream_id = more.stream_id.clone();
            bot.account_id = more.account_id.clone();
            bot.rate_limit = more.rate_limit;
            bot.max_in_flight = more.max_in_flight;
            settings.bots.push(bot);
        }
        let amqp = &settings.amqp;
        let partitions = if spec.redis_url.is_some() {
            spec.env
                .iter()
                .find(|(k, _)| k == "TRANSFER__FLEET__PARTITIONS")
                .map_or(settings.fleet.partitions, |(_, v)| {
                    v.parse().expect("TRANSFER__FLEET__PARTITIONS is a number")
                })
        } else {
            0
        };
        let mut queues = vec![amqp.commands_queue.clone(), amqp.dead_letter_queue.clone()];
        queues.extend((0..partitions).map(|k| partition_queue(&amqp.commands_queue, k)));
        queues.extend(crate::harness::account_queues(&settings, partitions));
        let cleanup = Cleanup::new(
            queues,
            vec![
                amqp.results_exchange.clone(),
                amqp.dead_letter_exchange.clone(),
            ],
        );
        let redis_keys = spec
            .redis_url
            .as_ref()
            .map(|url| RedisKeys::new(url, &amqp.commands_queue));
        let sim = Simulator::start(SimulatorConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            bots: simulator::bots_from_settings(&settings),
            latency: spec.latency,
            callbacks: false,
            ..SimulatorConfig::default()
        })
        .await
        .expect("simulator starts");
        // The results exchange may not exist yet (nothing declared): declare it as the worker
        // does, so the events queue can bind.
        channel
            .exchange_declare(
                amqp.results_exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("results exchange");
        let events_queue = crate::harness::events_queue(&channel, &amqp.results_exchange).await;
        let events = topology::watch(&channel, events_queue.as_str().into(), EVENT_WAIT)
            .await
            .expect("consume the events");

        let config = config_file(&settings, &spec);
        let mut env = crate::harness::worker_env(amqp, &sim.base_url());
        env.extend(Vec::<(String, String)>::from([
            (
                "TRANSFER__AMQP__DELIVERY_LIMIT".into(),
                amqp.delivery_limit.to_string(),
            ),
            ("TRANSFER__AMQP__PREFETCH".into(), spec.prefetch.to_string()),
            (
                "TRANSFER__AMQP__RECONNECT_INITIAL_DELAY".into(),
                "50ms".into(),
            ),
            ("TRANSFER__AMQP__RECONNECT_MAX_DELAY".into(), "500ms".into()),
            ("TRANSFER__AGENTASSIST__REQUEST_TIMEOUT".into(), "5s".into()),
            ("TRANSFER__RETRY__INITIAL_DELAY".into(), "20ms".into()),
            ("TRANSFER__RETRY__MAX_DELAY".into(), "200ms".into()),
            ("TRANSFER__RETRY__MAX_ATTEMPTS".into(), "4".into()),
            ("TRANSFER__CALLBACKS__PUBLIC_URL".into(), String::new()),
            ("TRANSFER__SHUTDOWN__GRACE".into(), "5s".into()),
            ("TRANSFER__LOG__LEVEL".into(), "info".into()),
        ]));
        if let Some(url) = &spec.redis_url {
            env.push(("TRANSFER__FLEET__REDIS_URL".into(), url.clone()));
        }
        env.extend(spec.env.iter().cloned());
        let mut fleet = Self {
            settings,
            sim,
            channel,
            conn,
            replicas: Vec::with_capacity(spec.replicas),
            events,
            env,
            config,
            partitions,
            _redis_keys: redis_keys,
            _cleanup: cleanup,
        };
        for _ in 0..spec.replicas {
            fleet.add_replica();
        }
        fleet
    }

    /// Starts one more replica, named after its index, without waiting for it.
    pub fn add_replica(&mut self) -> usize {
        let i = self.replicas.len();
        let tag = &self.settings.amqp.commands_queue["tw-test-".len()..][..6];
        let mut replica = Replica {
            name: format!("r{i}-{tag}"),
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())),
            child: None,
            log: tempfile::NamedTempFile::new().unwrap(),
            env: self.env.clone(),
            config: self.config.path().to_owned(),
        };
        replica.spawn();
        self.replicas.push(replica);
        i
    }

    /// The last `lines` lines of every replica's output.
    pub fn log_tails(&self, lines: usize) -> String {
        self.replicas
            .iter()
            .map(|r| {
                let log = r.log();
                let all: Vec<&str> = log.lines().collect();
                let from = all.len().saturating_sub(lines);
                format!("==== {} ====\n{}", r.name, all[from..].join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every replica's log lines that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> String {
        self.replicas
            .iter()
            .map(|r| {
                let log = r.log();
                let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
                format!("==== {} ====\n{}", r.name, lines.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Consumers of the commands queue, as the broker counts them (active and waiting).
    pub async fn consumers(&self) -> u32 {
        passive(&self.channel, &self.settings.amqp.commands_queue)
            .await
            .consumer_count()
    }

    /// Waits until every replica answers `/readyz` 200 (connected and consuming).
    pub async fn wait_all_ready(&self) {
        for r in &self.replicas {
            wait_for(
                &format!("{} ready", r.name),
                Duration::from_secs(30),
                || self.log_tails(40),
                async || r.readyz().await == Some(StatusCode::OK),
            )
            .await;
        }
        // A single-active-consumer queue may count only its active consumer.
        wait_for(
            "a consumer of the commands queue",
            Duration::from_secs(20),
            || self.log_tails(40),
            async || self.consumers().await >= 1,
        )
        .await;
    }

    /// Starts replica `i` again (same name, same admin port) and waits until it is ready.
    pub async fn restart(&mut self, i: usize) {
        self.replicas[i].spawn();
        let r = &self.replicas[i];
        wait_for(
            &format!("{} ready again", r.name),
            Duration::from_secs(30),
            || r.log(),
            async || r.readyz().await == Some(StatusCode::OK),
        )
        .await;
    }

    /// The replicas that have received at least one command, by index.
    pub async fn active(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, r) in self.replicas.iter().enumerate() {
            if let Some(m) = r.try_metrics().await
                && m.get("transfer_commands_received_total")
                    .copied()
                    .unwrap_or(0.0)
                    > 0.0
            {
                out.push(i);
            }
        }
        out
    }

    /// Waits until exactly one replica has received commands, and returns it.
    pub async fn the_active_one(&self) -> usize {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let active = self.active().await;
            assert!(
                active.len() <= 1,
                "several replicas received commands from a single-active-consumer queue: \
                 {active:?}"
            );
            if let [one] = active[..] {
                return one;
            }
            assert!(
                Instant::now() < until,
                "no replica received a command\n{}",
                self.log_tails(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Publishes a JSON command, persistent, confirmed.
    pub async fn publish(&self, command: &Value) {
        self.publish_all(std::slice::from_ref(command)).await;
    }

    /// Publishes commands back to back, persistent, confirmed together.
    pub async fn publish_all(&self, commands: &[Value]) {
        crate::harness::publish_confirmed(
            &self.channel,
            &self.settings.amqp.commands_queue,
            commands,
        )
        .await;
    }

    /// The next event on the results exchange, within `limit`.
    pub async fn next_event_within(&mut self, limit: Duration) -> Option<Received> {
        let delivery = match tokio::time::timeout(limit, self.events.next()).await {
            Err(_) => return None,
            Ok(next) => next.expect("events consumer open").expect("delivery"),
        };
        Some(Received {
            json: serde_json::from_slice(&delivery.data).expect("events are JSON"),
            routing_key: delivery.routing_key.to_string(),
            properties: delivery.properties,
        })
    }

    /// Events until `done` says enough, each within [`EVENT_WAIT`] of the last, all within
    /// `limit`; panics with the replicas' logs otherwise.
    pub async fn events_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&[Received]) -> bool,
    ) -> Vec<Received> {
        let until = Instant::now() + limit;
        let mut out = Vec::new();
        while !done(&out) {
            let left = until.saturating_duration_since(Instant::now());
            match self.next_event_within(left.min(EVENT_WAIT)).await {
                Some(e) => out.push(e),
                None => panic!(
                    "events stopped coming after {} of them: {:?}\n{}",
                    out.len(),
                    out.iter()
                        .map(|e| format!("{} {}", e.name(), e.command_id()))
                        .collect::<Vec<_>>(),
                    self.log_tails(60)
                ),
            }
        }
        out
    }

    /// Asserts that no event arrives within `wait`.
    pub async fn assert_no_event(&mut self, wait: Duration) {
        if let Some(e) = self.next_event_within(wait).await {
            panic!("unexpected event: {}", e.json);
        }
    }

    /// Stops every running replica with SIGTERM (each must exit 0), then asserts that the
    /// commands queue holds nothing: unacked commands are back in it once their channels close.
    pub async fn stop_leaving_nothing(&mut self) {
        for i in 0..self.replicas.len() {
            if self.replicas[i].is_running() {
                let status = self.replicas[i].terminate(Duration::from_secs(20)).await;
                assert!(
                    status.success(),
                    "{} exited with {status} after SIGTERM:\n{}",
                    self.replicas[i].name,
                    self.replicas[i].log()
                );
            }
        }
        wait_for(
            "no consumer left on the commands queue",
            Duration::from_secs(10),
            String::new,
            async || self.consumers().await == 0,
        )
        .await;
        let left =
            crate::harness::take_all(&self.channel, &self.settings.amqp.commands_queue).await;
        assert!(
            left.is_empty(),
            "{} commands left in the queue: {:?}",
            left.len(),
            left.iter()
                .map(|d| String::from_utf8_lossy(&d.data).into_owned())
                .collect::<Vec<_>>()
        );
        // Unacked commands of a partition are back in it once its consumer is gone.
        for queue in self.partition_queues() {
            wait_for(
                &format!("no consumer left on {queue}"),
                Duration::from_secs(10),
                String::new,
                async || self.queue_counts(&queue).await.is_none_or(|(_, c)| c == 0),
            )
            .await;
            let counts = self.queue_counts(&queue).await;
            assert!(
                counts.is_none_or(|(ready, _)| ready == 0),
                "commands left in {queue}: {counts:?}"
            );
        }
    }

    /// The partition queues, `{commands_queue}.p{k}`, by partition.
    pub fn partition_queues(&self) -> Vec<String> {
        (0..self.partitions)
            .map(|k| partition_queue(&self.settings.amqp.commands_queue, k))
            .collect()
    }

    /// A queue's ready messages and consumers, or `None` when it does not exist. Each look
    /// is on a channel of its own: a passive declare of a missing queue closes its channel.
    pub async fn queue_counts(&self, queue: &str) -> Option<(u32, u32)> {
        let channel = self.conn.create_channel().await.expect("a channel");
        let options = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = tokio::time::timeout(
            Duration::from_secs(5),
            channel.queue_declare(queue.into(), options, FieldTable::default()),
        )
        .await
        .expect("queue.declare in time");
        let counts = declared
            .ok()
            .map(|q| (q.message_count(), q.consumer_count()));
        if channel.status().connected() {
            let _ = channel.close(200, "looked".into()).await;
        }
        counts
    }

    /// The partitions replica `i` says it owns (`transfer_fleet_partitions_owned`); `None`
    /// when it does not answer.
    pub async fn owned(&self, i: usize) -> Option<f64> {
        let metrics = self.replicas[i].try_metrics().await?;
        metrics.get("transfer_fleet_partitions_owned").copied()
    }

    /// What each of `live` says it owns, and whether that is an even share of every
    /// partition: each ⌊P/N⌋ or ⌈P/N⌉, P in all.
    pub async fn shares(&self, live: &[usize]) -> (Vec<Option<f64>>, bool) {
        let mut owned = Vec::with_capacity(live.len());
        for &i in live {
            owned.push(self.owned(i).await);
        }
        let p = f64::from(self.partitions);
        let n = live.len() as f64;
        let (low, high) = ((p / n).floor(), (p / n).ceil());
        let even = owned
            .iter()
            .all(|o| o.is_some_and(|o| o == low || o == high))
            && owned.iter().flatten().sum::<f64>() == p;
        (owned, even)
    }

    /// Waits until the replicas `live` share the partitions evenly (see [`Fleet::shares`]),
    /// up to `limit`; returns how long that took.
    pub async fn wait_balanced(&self, live: &[usize], limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let (owned, even) = self.shares(live).await;
            if even {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{} partitions not shared evenly by replicas {live:?} within {limit:?}: they \
                 own {owned:?}\n{}",
                self.partitions,
                self.log_tails(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The binary running `args` with this fleet's configuration and environment (not a
    /// replica's listeners or name).
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_transfer-worker"));
        command.env_remove("TRANSFER_CONFIG");
        for (key, _) in std::env::vars() {
            if key.starts_with("TRANSFER__") {
                command.env_remove(key);
            }
        }
        command
            .envs(self.env.iter().cloned())
            .args(args)
            .arg("--config")
            .arg(self.config.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }
}

/// Partition queue `k` of `commands_queue`, as CONTRACT §9 names it.
pub fn partition_queue(commands_queue: &str, k: u16) -> String {
    format!("{commands_queue}.p{k}")
}

/// A command of session `session` whose target names it (`a-{id}`, or `qu-{id}` for a
/// queue transfer), so the simulator's log tells which command each request was for.
pub fn session_command(id: &str, session: &str, queue: bool) -> Value {
    if queue {
        let mut c = crate::harness::queue_command(id, session);
        c["queueId"] = format!("qu-{id}").into();
        c
    } else {
        let mut c = crate::harness::agent_command(id, session);
        c["aId"] = format!("a-{id}").into();
        c
    }
}

/// The command a request was for, from a target [`session_command`] made.
pub fn command_of(request: &RecordedRequest) -> String {
    let body = &request.body;
    if let Some(agent) = body["aId"].as_str() {
        agent.trim_start_matches("a-").to_owned()
    } else {
        let queue = body["queueId"].as_str().expect("an agent or a queue");
        queue.trim_start_matches("qu-").to_owned()
    }
}

/// The simulator's requests by `botSessionId`, each session's in arrival order.
pub fn calls_by_session(sim: &Simulator) -> BTreeMap<String, Vec<RecordedRequest>> {
    let mut out: BTreeMap<String, Vec<RecordedRequest>> = BTreeMap::new();
    for r in sim.requests() {
        let session = r.bot_session_id.clone().expect("a botSessionId");
        out.entry(session).or_default().push(r);
    }
    for calls in out.values_mut() {
        calls.sort_by_key(|r| r.seq);
    }
    out
}

/// Deletes a fleet's Redis keys (every one starts with its commands queue) when dropped.
pub struct RedisKeys {
    url: String,
    prefix: String,
}

impl RedisKeys {
    pub fn new(url: &str, prefix: &str) -> Self {
        Self {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
        }
    }
}

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let Ok(scan) = std::process::Command::new("redis-cli")
            .args(["-u", &self.url, "--scan", "--pattern"])
            .arg(format!("{}*", self.prefix))
            .stderr(Stdio::null())
            .output()
        else {
            return;
        };
        let keys: Vec<String> = String::from_utf8_lossy(&scan.stdout)
            .lines()
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect();
        for chunk in keys.chunks(100) {
            let _ = std::process::Command::new("redis-cli")
                .args(["-u", &self.url, "DEL"])
                .args(chunk)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A private `redis-server` on a port of its own, which a test can kill and start again.
pub struct RedisServer {
    pub port: u16,
    child: Option<tokio::process::Child>,
    log: tempfile::NamedTempFile,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers.
    pub async fn start() -> Self {
        let mut server = Self {
            port: free_port(),
            child: None,
            log: tempfile::NamedTempFile::new().unwrap(),
        };
        server.spawn().await;
        server
    }

    /// `redis://127.0.0.1:{port}/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "redis-server already runs");
        let out = std::fs::OpenOptions::new()
            .append(true)
            .open(self.log.path())
            .unwrap();
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is on PATH");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while !self.answers().await {
            assert!(
                Instant::now() < until,
                "redis-server on {} does not answer:\n{}",
                self.port,
                std::fs::read_to_string(self.log.path()).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether it answers PING.
    pub async fn answers(&self) -> bool {
        tokio::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "PING"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .await
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
    }

    /// SIGKILL, and waits for it to be gone.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("redis-server runs");
        let _ = child.start_kill();
        tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("redis-server reaped in time")
            .expect("wait");
    }

    /// Starts it again on the same port (empty: nothing was saved).
    pub async fn restart(&mut self) {
        self.spawn().await;
    }
}
