//! One worker in-process: the real application on its own queue names on the test broker, with
//! its own simulator, a reader of its events, and cleanup that runs even when the test panics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde_json::Value;
use tokio::task::JoinHandle;
use transfer_worker::app::{App, AppError};
use transfer_worker::broker::{CurrentLink, topology};
use transfer_worker::config::Settings;
use transfer_worker::ops::metrics::Metrics;
use transfer_worker::shutdown::Shutdown;
use transfer_worker::tools::simulator::{Simulator, SimulatorConfig};

use super::broker::{
    Cleanup, declared_at, passive, publish_confirmed, test_channel, test_channel_at,
};
use super::events::{EVENT_WAIT, Events, Received};
use super::names::test_settings;
use super::proxy::Proxy;
use super::sim;
use super::wait::wait_for;

/// One application under test, with its simulator and a view of the broker.
pub struct Harness {
    pub settings: Settings,
    pub sim: Simulator,
    pub channel: Channel,
    pub conn: Connection,
    pub events: Events,
    /// The dead-letter queue's consumer, from the first [`Harness::next_dead_letter`] on.
    dead: Option<Consumer>,
    app: Option<JoinHandle<Result<(), AppError>>>,
    pub shutdown: Shutdown,
    pub broker: Arc<CurrentLink>,
    pub metrics: Arc<Metrics>,
    pub relay_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    _cleanup: Cleanup,
}

impl Harness {
    /// Starts a simulator and the application; `tune` adjusts both before they start.
    pub async fn start(tune: impl FnOnce(&mut Settings, &mut SimulatorConfig)) -> Self {
        Self::start_with(test_settings(), tune).await
    }

    /// Like [`Harness::start`] with given base settings.
    pub async fn start_with(
        settings: Settings,
        tune: impl FnOnce(&mut Settings, &mut SimulatorConfig),
    ) -> Self {
        Self::launch(settings, tune, true).await
    }

    /// Like [`Harness::start`], the worker reaching the broker through a [`Proxy`] the test
    /// can cut.
    pub async fn start_behind_proxy(
        tune: impl FnOnce(&mut Settings, &mut SimulatorConfig),
    ) -> (Proxy, Self) {
        let proxy = Proxy::start().await;
        let url = proxy.amqp_url();
        let harness = Self::start(|s, sim| {
            s.amqp.url = url;
            tune(s, sim);
        })
        .await;
        (proxy, harness)
    }

    /// Like [`Harness::start`], but nothing is declared before the worker starts: the worker
    /// declares its topology itself, and the test's consumers attach once it consumes.
    pub async fn start_undeclared(tune: impl FnOnce(&mut Settings, &mut SimulatorConfig)) -> Self {
        Self::launch(test_settings(), tune, false).await
    }

    async fn launch(
        mut settings: Settings,
        tune: impl FnOnce(&mut Settings, &mut SimulatorConfig),
        declare_first: bool,
    ) -> Self {
        let mut sim_config = sim::config(&settings);
        // The broker of the base settings is the test's; `tune` may point the worker elsewhere
        // (through a proxy, say).
        let test_broker = settings.amqp.url.clone();
        tune(&mut settings, &mut sim_config);
        let sim = sim::start(sim_config).await;
        settings.agentassist.base_url = sim.base_url();
        let cleanup = Cleanup::topology_at(test_broker.clone(), &settings);
        let (conn, channel) = if declare_first {
            // Declared here too, so the test's own queues can bind before the worker starts.
            declared_at(&test_broker, &settings.amqp).await
        } else {
            test_channel_at(&test_broker).await
        };
        let app = App::build(settings.clone()).await.expect("app builds");
        let shutdown = app.shutdown();
        let broker = app.broker();
        let metrics = app.metrics();
        let relay_addr = app.relay_addr();
        let admin_addr = app.admin_addr();
        let (events, handle) = if declare_first {
            let events = Events::bind(&channel, &settings.amqp.results_exchange).await;
            (events, tokio::spawn(app.run_until_stopped()))
        } else {
            // The worker declares everything; the test's queues bind once it consumes.
            let handle = tokio::spawn(app.run_until_stopped());
            wait_until_ready(&broker).await;
            let events = Events::bind(&channel, &settings.amqp.results_exchange).await;
            (events, handle)
        };
        let harness = Self {
            settings,
            sim,
            channel,
            conn,
            events,
            dead: None,
            app: Some(handle),
            shutdown,
            broker,
            metrics,
            relay_addr,
            admin_addr,
            _cleanup: cleanup,
        };
        wait_until_ready(&harness.broker).await;
        harness
    }

    /// Publishes a raw command body with properties, confirmed.
    pub async fn publish_raw(&self, body: &[u8], properties: BasicProperties) {
        let queue = &self.settings.amqp.commands_queue;
        publish_confirmed(&self.channel, "", queue, [(body, properties)]).await;
    }

    /// Publishes a JSON command.
    pub async fn publish(&self, command: &Value) {
        self.publish_raw(
            &serde_json::to_vec(command).unwrap(),
            BasicProperties::default(),
        )
        .await;
    }

    /// The next event on the results exchange.
    pub async fn next_event(&mut self) -> Received {
        self.events.next().await
    }

    /// The next `n` events.
    pub async fn events(&mut self, n: usize) -> Vec<Received> {
        self.events.take(n).await
    }

    /// Asserts that no event arrives within `wait`: see [`Events::assert_none`].
    pub async fn assert_no_event(&mut self, wait: Duration) {
        self.events.assert_none(wait).await;
    }

    /// The next message on the dead-letter queue.
    pub async fn next_dead_letter(&mut self) -> Delivery {
        if self.dead.is_none() {
            let queue = self.settings.amqp.dead_letter_queue.as_str();
            let consumer = topology::watch(&self.channel, queue.into(), Duration::from_secs(10))
                .await
                .expect("consume the dead letters");
            self.dead = Some(consumer);
        }
        let dead = self.dead.as_mut().expect("consumed");
        tokio::time::timeout(EVENT_WAIT, dead.next())
            .await
            .expect("a dead letter in time")
            .expect("consumer open")
            .expect("delivery")
    }

    /// Stops the application gracefully and returns its result.
    pub async fn stop(mut self) -> Result<(), AppError> {
        self.stop_app().await
    }

    /// The commandIds of the events still to be read, until none comes for a second.
    pub async fn drain_events(&mut self) -> Vec<String> {
        let events = self.events.drain(Duration::from_secs(1)).await;
        events.iter().map(|e| e.command_id().to_owned()).collect()
    }

    /// Like [`Harness::stop`], keeping the simulator and the broker view for later checks.
    pub async fn stop_app(&mut self) -> Result<(), AppError> {
        self.shutdown.stop();
        let handle = self.app.take().expect("the app runs");
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("app stops in time")
            .expect("app task")
    }

    /// Stops the application and asserts that it left no command behind, ready *or* unacked:
    /// once the worker's connection is closed, whatever it still held unacked is back in the
    /// queue, so a fresh consumer that receives nothing proves both.
    pub async fn stop_leaving_nothing(mut self) {
        self.stop_app().await.expect("the app stops cleanly");
        let queue = self.settings.amqp.commands_queue.clone();
        wait_for(
            "the worker stops consuming once stopped",
            Duration::from_secs(5),
            String::new,
            async || passive(&self.channel, &queue).await.consumer_count() == 0,
        )
        .await;
        let (_conn, channel) = test_channel().await;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "left-behind".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume the commands queue");
        match tokio::time::timeout(Duration::from_secs(1), consumer.next()).await {
            Err(_) => {}
            Ok(Some(Ok(d))) => panic!(
                "a command was left behind (redelivered: {}): {}",
                d.redelivered,
                String::from_utf8_lossy(&d.data)
            ),
            Ok(other) => panic!("the check's consumer ended: {other:?}"),
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.abandon();
    }
}

async fn wait_until_ready(broker: &CurrentLink) {
    wait_for("worker ready", EVENT_WAIT, String::new, async || {
        broker.is_ready()
    })
    .await;
}
