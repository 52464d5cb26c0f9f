//! Several replicas on one set of queues (CONTRACT §9): one simulator for all of them, a
//! reader of their events, and what a test asks of them together: readiness, who works,
//! how the partitions are shared, and what they leave behind.

use std::time::{Duration, Instant};

use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ExchangeKind};
use reqwest::StatusCode;
use serde_json::Value;
use transfer_worker::config::Settings;
use transfer_worker::tools::simulator::{Simulator, SimulatorConfig};

use super::broker::{
    Cleanup, declared, passive, publish_commands, queue_counts, take_all, test_channel,
};
use super::events::{EVENT_WAIT, Events, Received};
use super::names::{amqp_url, partition_queues, test_settings};
use super::process::{binary, config_file, env, quick_env, worker_env};
use super::redis::RedisKeys;
use super::replicas::{FleetSpec, Replica};
use super::sim;
use super::wait::wait_for;

/// `url` proposing AMQP heartbeats of `secs` seconds.
fn with_amqp_heartbeat(url: &str, secs: u16) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}heartbeat={secs}")
}

/// Several replicas on one queue set, one simulator, and a reader of their events.
pub struct Fleet {
    pub settings: Settings,
    pub sim: Simulator,
    pub channel: Channel,
    conn: Connection,
    pub replicas: Vec<Replica>,
    pub events: Events,
    env: Vec<(String, String)>,
    config: tempfile::NamedTempFile,
    /// Partition queues the replicas share (`fleet.partitions`); 0 without Redis.
    pub partitions: u16,
    _redis_keys: Option<RedisKeys>,
    _cleanup: Cleanup,
}

impl Fleet {
    /// Declares the topology, starts the simulator and `spec.replicas` replicas, and waits
    /// until every replica is ready and a consumer of the commands queue.
    pub async fn start(spec: FleetSpec) -> Self {
        let mut settings = test_settings();
        // Declared here as the replicas will be asked to.
        if let Some((_, v)) = spec
            .env
            .iter()
            .find(|(k, _)| k == "TRANSFER__AMQP__DELIVERY_LIMIT")
        {
            settings.amqp.delivery_limit = v.parse().expect("a delivery limit is a number");
        }
        let (conn, channel) = declared(&settings.amqp).await;
        let fleet = Self::assemble(spec, settings, conn, channel).await;
        fleet.wait_all_ready().await;
        fleet
    }

    /// Like [`Fleet::start`], then waits up to `limit` until the replicas share the partitions
    /// evenly.
    pub async fn start_balanced(spec: FleetSpec, limit: Duration) -> Self {
        let fleet = Self::start(spec).await;
        let all: Vec<usize> = (0..fleet.replicas.len()).collect();
        fleet.wait_balanced(&all, limit).await;
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
        settings.bots[0].rate_limit = spec.rate_limit;
        settings.bots[0].rate_window = spec.rate_window;
        for more in &spec.more_bots {
            let mut bot = settings.bots[0].clone();
            bot.stream_id = more.stream_id.clone();
            bot.account_id = more.account_id.clone();
            bot.rate_limit = more.rate_limit;
            bot.rate_window = more.rate_window;
            bot.max_in_flight = more.max_in_flight;
            settings.bots.push(bot);
        }
        if let Some(url) = &spec.redis_url {
            settings.fleet.redis_url = url.clone();
            if let Some((_, v)) = spec
                .env
                .iter()
                .find(|(k, _)| k == "TRANSFER__FLEET__PARTITIONS")
            {
                settings.fleet.partitions =
                    v.parse().expect("TRANSFER__FLEET__PARTITIONS is a number");
            }
        }
        let partitions = partition_queues(&settings).len() as u16;
        let cleanup = Cleanup::topology(&settings);
        let amqp = &settings.amqp;
        let redis_keys = spec
            .redis_url
            .as_ref()
            .map(|url| RedisKeys::new(url, &amqp.commands_queue));
        let sim = sim::start(SimulatorConfig {
            latency: spec.latency,
            tls: spec.sim_tls.clone(),
            ..sim::config(&settings)
        })
        .await;
        // The results exchange may not exist yet (nothing declared): declare it as the worker
        // does, so the events queue can bind.
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                amqp.results_exchange.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .expect("results exchange");
        let events = Events::bind(&channel, &amqp.results_exchange).await;

        let config = config_file(&settings.bots);
        let mut env = worker_env(amqp, &sim.base_url());
        env.extend(quick_env());
        env.push((
            "TRANSFER__AMQP__DELIVERY_LIMIT".into(),
            amqp.delivery_limit.to_string(),
        ));
        env.push(("TRANSFER__AMQP__PREFETCH".into(), spec.prefetch.to_string()));
        env.extend(self::env(&[
            ("TRANSFER__RETRY__INITIAL_DELAY", "20ms"),
            ("TRANSFER__RETRY__MAX_DELAY", "200ms"),
            ("TRANSFER__RETRY__MAX_ATTEMPTS", "4"),
        ]));
        if let Some(url) = &spec.redis_url {
            env.push(("TRANSFER__FLEET__REDIS_URL".into(), url.clone()));
            // A fleet's membership outlasts the broker's detection of a frozen replica, three
            // AMQP heartbeats: with 1 s heartbeats, 5 s of membership (what these tests were
            // written for) is enough; with the worker's 3 s it would take 10 s.
            env.push((
                "TRANSFER__AMQP__URL".into(),
                with_amqp_heartbeat(&amqp_url(), 1),
            ));
            env.push(("TRANSFER__FLEET__MEMBER_TTL".into(), "5s".into()));
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
        self.add_replica_named(&format!("r{i}-{tag}"))
    }

    /// Starts one more replica with `fleet.name` set to `name` (another replica may have it
    /// too), without waiting for it.
    pub fn add_replica_named(&mut self, name: &str) -> usize {
        self.add_replica_with(name, &[])
    }

    /// Starts one more replica named `name`, with `more` variables over the fleet's (its own
    /// simulator, say), without waiting for it.
    pub fn add_replica_with(&mut self, name: &str, more: &[(String, String)]) -> usize {
        let i = self.replicas.len();
        let mut env = self.env.clone();
        env.extend(more.iter().cloned());
        let mut replica = Replica::new(name.to_owned(), env, self.config.path().to_owned());
        replica.spawn();
        self.replicas.push(replica);
        i
    }

    /// The last `lines` lines of every replica's output.
    pub fn log_tails(&self, lines: usize) -> String {
        self.logs(|log| {
            let all: Vec<&str> = log.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        })
    }

    /// Every replica's log lines that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> String {
        self.logs(|log| {
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
            lines.join("\n")
        })
    }

    fn logs(&self, pick: impl Fn(&str) -> String) -> String {
        self.replicas
            .iter()
            .map(|r| format!("==== {} ====\n{}", r.name, pick(&r.log())))
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
            r.wait_readyz(StatusCode::OK, Duration::from_secs(30)).await;
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
        self.replicas[i]
            .wait_readyz(StatusCode::OK, Duration::from_secs(30))
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

    /// Waits until a replica has routed commands to partitions (the one holding the commands
    /// queue: the intake), and returns it.
    pub async fn the_intake(&self) -> usize {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            for (i, r) in self.replicas.iter().enumerate() {
                if let Some(m) = r.try_metrics().await
                    && m.get("transfer_fleet_routed_total").copied().unwrap_or(0.0) > 0.0
                {
                    return i;
                }
            }
            assert!(
                Instant::now() < until,
                "no replica routed a command
{}",
                self.log_tails(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

    /// Publishes a JSON command, persistent, confirmed.
    pub async fn publish(&self, command: &Value) {
        self.publish_all(std::slice::from_ref(command)).await;
    }

    /// Publishes commands back to back, persistent, confirmed together.
    pub async fn publish_all(&self, commands: &[Value]) {
        publish_commands(&self.channel, &self.settings.amqp.commands_queue, commands).await;
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
            match self.events.within(left.min(EVENT_WAIT)).await {
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

    /// Asserts that no event arrives within `wait`: see [`Events::assert_none`].
    pub async fn assert_no_event(&mut self, wait: Duration) {
        self.events.assert_none(wait).await;
    }

    /// Stops every running replica with SIGTERM (each must exit 0), then asserts that the
    /// commands queue holds nothing: unacked commands are back in it once their channels close.
    pub async fn stop_leaving_nothing(&mut self) {
        for r in &mut self.replicas {
            if r.is_running() {
                let status = r.terminate(Duration::from_secs(20)).await;
                assert!(
                    status.success(),
                    "{} exited with {status} after SIGTERM:\n{}",
                    r.name,
                    r.log()
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
        let left = take_all(&self.channel, &self.settings.amqp.commands_queue).await;
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
        partition_queues(&self.settings)
    }

    /// A queue's ready messages and consumers, or `None` when it does not exist.
    pub async fn queue_counts(&self, queue: &str) -> Option<(u32, u32)> {
        queue_counts(&self.conn, queue).await
    }

    /// The binary running `args` with this fleet's configuration and environment (not a
    /// replica's listeners or name).
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = binary();
        command
            .envs(self.env.iter().cloned())
            .args(args)
            .arg("--config")
            .arg(self.config.path());
        command
    }
}
