//! One holder per queue (CONTRACT §9, "One holder at a time"), with the interleavings forced
//! instead of hoped for. Each test runs real consumers (the worker's own, on the real broker,
//! holding through the real Redis) in one process, and drives from the test what a fleet's
//! membership and heartbeats would: which partitions each replica believes it owns, when a
//! replica stops, when its heartbeats stop reaching Redis.
//!
//! The handler records, per queue, when each delivery was worked on and by which replica, one
//! at a time per replica, as a session's commands are. Two replicas at work on one queue at
//! once is an overlap: what a rolling deploy must never cause.
//!
//! Each scenario also runs *unfenced* (every hold granted, no deadline: single active consumer
//! alone, as before holds existed) and must then show the overlap, so the tests are known to
//! see it.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};
use transfer_worker::broker::Delivery;
use transfer_worker::broker::consumer::{
    Consumer, ConsumerSettings, Handler, InFlight, Partitioned,
};
use transfer_worker::broker::holds::Holds;
use transfer_worker::broker::{CurrentLink, Publisher};
use transfer_worker::config::Settings;
use transfer_worker::fleet::Fleet;
use transfer_worker::ops::metrics::Metrics;
use transfer_worker::shutdown::Shutdown;

use crate::harness::broker::queue_counts;
use crate::harness::redis::RedisKeys;
use crate::harness::{
    Cleanup, Proxy, publish_commands, redis_url, test_channel, test_settings, wait_for,
};

/// One piece of work: which replica, which message of which queue, from when to when.
#[derive(Debug, Clone)]
struct Work {
    replica: &'static str,
    queue: String,
    seq: u64,
    began: Instant,
    ended: Option<Instant>,
}

/// What every replica's handler writes to.
#[derive(Default)]
struct Record {
    work: Mutex<Vec<Work>>,
    busy: Mutex<HashMap<String, usize>>,
    overlaps: AtomicUsize,
}

impl Record {
    fn work(&self) -> Vec<Work> {
        self.work.lock().unwrap().clone()
    }

    fn done(&self, queue: &str) -> BTreeSet<u64> {
        self.work()
            .iter()
            .filter(|w| w.queue == queue && w.ended.is_some())
            .map(|w| w.seq)
            .collect()
    }

    /// Messages of `queue` in the order work on them began, and whether any came twice.
    fn order(&self, queue: &str) -> (Vec<u64>, bool) {
        let seqs: Vec<u64> = self
            .work()
            .iter()
            .filter(|w| w.queue == queue)
            .map(|w| w.seq)
            .collect();
        let twice = seqs.iter().collect::<BTreeSet<_>>().len() != seqs.len();
        (seqs, twice)
    }
}

/// One replica's handler: works on each queue's deliveries one at a time, in delivery order.
struct Worker {
    replica: &'static str,
    record: Arc<Record>,
    pace: Duration,
    queues: Mutex<HashMap<String, mpsc::UnboundedSender<Job>>>,
}

type Job = (Delivery, String, oneshot::Sender<()>);

impl Worker {
    fn new(replica: &'static str, record: &Arc<Record>, pace: Duration) -> Arc<Self> {
        Arc::new(Self {
            replica,
            record: record.clone(),
            pace,
            queues: Mutex::default(),
        })
    }

    async fn work(self: Arc<Self>, mut jobs: mpsc::UnboundedReceiver<Job>) {
        while let Some((delivery, queue, done)) = jobs.recv().await {
            let seq: u64 = std::str::from_utf8(delivery.body())
                .unwrap()
                .parse()
                .unwrap();
            let index = {
                let mut busy = self.record.busy.lock().unwrap();
                let n = busy.entry(queue.clone()).or_default();
                *n += 1;
                if *n > 1 {
                    self.record.overlaps.fetch_add(1, Ordering::Relaxed);
                }
                let mut work = self.record.work.lock().unwrap();
                work.push(Work {
                    replica: self.replica,
                    queue: queue.clone(),
                    seq,
                    began: Instant::now(),
                    ended: None,
                });
                work.len() - 1
            };
            tokio::time::sleep(self.pace).await;
            {
                *self.record.busy.lock().unwrap().get_mut(&queue).unwrap() -= 1;
                self.record.work.lock().unwrap()[index].ended = Some(Instant::now());
            }
            let _ = delivery.ack().await;
            let _ = done.send(());
        }
    }
}

impl Handler for Worker {
    fn accept(
        this: &Arc<Self>,
        delivery: Delivery,
        _publisher: &Arc<Publisher>,
        in_flight: InFlight,
        source: &str,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let (done, finished) = oneshot::channel();
        let mut queues = this.queues.lock().unwrap();
        let jobs = queues.entry(source.to_owned()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(this.clone().work(rx));
            tx
        });
        jobs.send((delivery, source.to_owned(), done)).unwrap();
        Some(async move {
            let _ = finished.await;
            drop(in_flight);
        })
    }
}

/// Holds that are always granted and never run out: single active consumer alone.
struct Unfenced(watch::Sender<Option<Instant>>);

impl Holds for Unfenced {
    fn take<'a>(&'a self, _queue: &'a str) -> BoxFuture<'a, bool> {
        async { true }.boxed()
    }
    fn give<'a>(&'a self, _queue: &'a str) -> BoxFuture<'a, ()> {
        async {}.boxed()
    }
    fn give_all(&self) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }
    fn deadline(&self) -> watch::Receiver<Option<Instant>> {
        self.0.subscribe()
    }
    fn valid(&self) -> bool {
        true
    }
}

/// Whether the scenario runs with the fleet's holds, or without any fence.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Fence {
    Holds,
    Unfenced,
}

/// The queues, broker and Redis of one scenario.
struct Scene {
    settings: Settings,
    record: Arc<Record>,
    _cleanup: Cleanup,
    _keys: RedisKeys,
}

const PARTITIONS: u16 = 2;

impl Scene {
    fn new() -> Self {
        let mut settings = test_settings();
        settings.amqp.prefetch = 4;
        settings.fleet.redis_url = redis_url();
        settings.fleet.partitions = PARTITIONS;
        settings.fleet.heartbeat = Duration::from_millis(250);
        settings.fleet.member_ttl = Duration::from_secs(1);
        let cleanup = Cleanup::topology(&settings);
        let keys = RedisKeys::new(&settings.fleet.redis_url, &settings.amqp.commands_queue);
        Self {
            settings,
            record: Arc::default(),
            _cleanup: cleanup,
            _keys: keys,
        }
    }

    fn partition(&self, k: u16) -> String {
        transfer_worker::contract::names::partition_queue(&self.settings.amqp.commands_queue, k)
    }

    /// Publishes messages 0..30 to `queue`, their bodies their numbers, once a replica has
    /// declared it; waits until the first three are worked on.
    async fn feed(&self, queue: &str) {
        let (conn, channel) = test_channel().await;
        wait_for(
            &format!("{queue} declared"),
            Duration::from_secs(20),
            String::new,
            async || queue_counts(&conn, queue).await.is_some(),
        )
        .await;
        let bodies: Vec<serde_json::Value> = (0..30u64).map(serde_json::Value::from).collect();
        publish_commands(&channel, queue, &bodies).await;
        self.wait_done(queue, 3, Duration::from_secs(20)).await;
    }

    async fn wait_done(&self, queue: &str, n: usize, limit: Duration) {
        wait_for(
            &format!("{n} messages of {queue} worked on"),
            limit,
            || format!("{:?}", self.record.order(queue)),
            async || self.record.done(queue).len() >= n,
        )
        .await;
    }

    /// No overlap, every message once and in order.
    fn assert_kept(&self, queue: &str, n: u64) {
        let (seqs, twice) = self.record.order(queue);
        assert_eq!(
            self.record.overlaps.load(Ordering::Relaxed),
            0,
            "two replicas worked on {queue} at once: {:?}",
            self.timeline(queue)
        );
        assert!(!twice, "a message worked on twice: {seqs:?}");
        assert_eq!(
            seqs,
            (0..n).collect::<Vec<_>>(),
            "{queue} out of order: {:?}",
            self.timeline(queue)
        );
    }

    /// Whether the unfenced run broke what the fence keeps.
    fn broken(&self, queue: &str, n: u64) -> bool {
        let (seqs, twice) = self.record.order(queue);
        self.record.overlaps.load(Ordering::Relaxed) > 0
            || twice
            || seqs != (0..n).collect::<Vec<_>>()
    }

    fn timeline(&self, queue: &str) -> Vec<String> {
        let work = self.record.work();
        let origin = work.first().map_or_else(Instant::now, |w| w.began);
        work.iter()
            .filter(|w| w.queue == queue)
            .map(|w| {
                format!(
                    "{}:{}@{}..{}",
                    w.replica,
                    w.seq,
                    (w.began - origin).as_millis(),
                    w.ended
                        .map_or("-".into(), |e| (e - origin).as_millis().to_string())
                )
            })
            .collect()
    }
}

/// One replica: its consumer (partitions owned as the test says), its fleet, and the test's
/// heartbeat for it.
struct Replica {
    owned: watch::Sender<BTreeSet<u16>>,
    shutdown: Shutdown,
    run: tokio::task::JoinHandle<()>,
    heartbeat: tokio::task::JoinHandle<()>,
    fleet: Arc<Fleet>,
}

impl Replica {
    /// Starts replica `name`, owning `owned`, its Redis at `redis` (the scene's, or a proxy's).
    async fn start(
        scene: &Scene,
        name: &'static str,
        owned: &[u16],
        pace: Duration,
        fence: Fence,
        redis: Option<String>,
    ) -> Self {
        let mut fleet_settings = scene.settings.fleet.clone();
        fleet_settings.name = name.to_owned();
        if let Some(url) = redis {
            fleet_settings.redis_url = url;
        }
        let metrics = Arc::new(Metrics::new());
        let fleet = Arc::new(
            Fleet::new(
                &fleet_settings,
                &scene.settings.amqp.commands_queue,
                Duration::from_secs(60),
                metrics.clone(),
            )
            .unwrap(),
        );
        let holds: Arc<dyn Holds> = match fence {
            Fence::Holds => fleet.clone(),
            Fence::Unfenced => Arc::new(Unfenced(watch::Sender::new(None))),
        };
        let (owned_tx, owned_rx) = watch::channel(owned.iter().copied().collect());
        let shutdown = Shutdown::default();
        let handler = Worker::new(name, &scene.record, pace);
        let consumer = Consumer::new(
            ConsumerSettings {
                amqp: scene.settings.amqp.clone(),
                queue: scene.settings.amqp.commands_queue.clone(),
                grace: Duration::from_secs(10),
                settle: Duration::from_secs(1),
            },
            handler.clone(),
            Arc::new(CurrentLink::default()),
            metrics,
            shutdown.clone(),
        )
        .with_partitions(Partitioned {
            handler,
            owned: owned_rx,
            count: PARTITIONS,
            consuming: Arc::new(watch::Sender::new(BTreeSet::new())),
        })
        .with_holds(holds, Duration::from_millis(50));
        let run = tokio::spawn(async move {
            consumer.run().await.expect("the consumer runs");
        });
        // The fleet's membership would keep the holds; here the test does, every 100 ms.
        let heartbeat = {
            let fleet = fleet.clone();
            tokio::spawn(async move {
                loop {
                    let _ = fleet.heartbeat(&BTreeSet::new()).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        Self {
            owned: owned_tx,
            shutdown,
            run,
            heartbeat,
            fleet,
        }
    }

    fn own(&self, owned: &[u16]) {
        self.owned.send_replace(owned.iter().copied().collect());
    }

    /// Whether it holds `queue` now.
    async fn holds(&self, queue: &str) -> bool {
        self.fleet.take_hold(queue).await.ok() == Some(None)
    }

    /// Stops it as SIGTERM does, and waits until it has stopped.
    async fn stop(self) {
        self.shutdown.stop();
        tokio::time::timeout(Duration::from_secs(30), self.run)
            .await
            .expect("stopped in time")
            .unwrap();
        self.heartbeat.abort();
    }
}

/// A replica that stopped listing a partition hands it to another that took it by a view not
/// yet updated: here `b` owns it, `a` restarts and believes it owns it too (the other has not
/// listed it yet), then `b` lets it go while its commands still run.
async fn rejoin_inside_the_listing_lag(fence: Fence) -> Scene {
    let scene = Scene::new();
    let queue = scene.partition(0);
    let pace = Duration::from_millis(100);
    let b = Replica::start(&scene, "b", &[0], pace, fence, None).await;
    scene.feed(&queue).await;
    // `a` comes back and takes partition 0 by its view; its consumer would now wait behind
    // b's on the single-active-consumer queue.
    let a = Replica::start(&scene, "a", &[0], pace, fence, None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    if fence == Fence::Holds {
        assert!(!a.holds(&queue).await, "a took a partition b holds");
    }
    // b lets it go, with commands it started still running.
    b.own(&[]);
    scene.wait_done(&queue, 30, Duration::from_secs(30)).await;
    a.stop().await;
    b.stop().await;
    scene
}

/// Runs `scenario` with the fleet's holds, which must keep `queue` (30 messages), and unfenced,
/// which must break it: so the test is known to see what the holds prevent.
async fn kept_only_with_holds<F: Future<Output = Scene>>(
    scenario: impl Fn(Fence) -> F,
    queue: impl Fn(&Scene) -> String,
) {
    let scene = scenario(Fence::Holds).await;
    scene.assert_kept(&queue(&scene), 30);
    let unfenced = scenario(Fence::Unfenced).await;
    let queue = queue(&unfenced);
    assert!(
        unfenced.broken(&queue, 30),
        "without holds the interleaving did not show: {:?}",
        unfenced.timeline(&queue)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_rejoining_inside_the_listing_lag_waits_for_the_holder_to_let_go() {
    kept_only_with_holds(rejoin_inside_the_listing_lag, |s| s.partition(0)).await;
}

/// The holder of a partition subscribes it again when its prefetch share changes (it took
/// another partition), while another replica believes it owns the partition too.
async fn share_change_while_another_waits(fence: Fence) -> Scene {
    let scene = Scene::new();
    let queue = scene.partition(0);
    let pace = Duration::from_millis(100);
    let a = Replica::start(&scene, "a", &[0], pace, fence, None).await;
    scene.feed(&queue).await;
    let b = Replica::start(&scene, "b", &[0], pace, fence, None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // a takes partition 1 too: partition 0's share of the prefetch halves, so it is
    // subscribed again.
    a.own(&[0, 1]);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    if fence == Fence::Holds {
        assert!(!b.holds(&queue).await, "b took a partition a holds");
    }
    a.own(&[]);
    scene.wait_done(&queue, 30, Duration::from_secs(30)).await;
    a.stop().await;
    b.stop().await;
    scene
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_share_change_lets_no_waiting_replica_in() {
    kept_only_with_holds(share_change_while_another_waits, |s| s.partition(0)).await;
}

/// The intake (the holder of the commands queue) gets SIGTERM with commands it received
/// still to route, while a standby is ready to take the queue over.
async fn intake_stopped_with_commands_to_route(fence: Fence) -> Scene {
    let scene = Scene::new();
    let queue = scene.settings.amqp.commands_queue.clone();
    let pace = Duration::from_millis(100);
    let a = Replica::start(&scene, "a", &[], pace, fence, None).await;
    // a holds the commands queue before b starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = Replica::start(&scene, "b", &[], pace, fence, None).await;
    scene.feed(&queue).await;
    a.stop().await;
    scene.wait_done(&queue, 30, Duration::from_secs(30)).await;
    b.stop().await;
    scene
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_intake_stopped_with_commands_to_route_hands_over_only_when_done() {
    kept_only_with_holds(intake_stopped_with_commands_to_route, |s| {
        s.settings.amqp.commands_queue.clone()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_silent_past_the_ttl_has_stopped_before_another_takes_over() {
    let scene = Scene::new();
    let queue = scene.partition(0);
    let pace = Duration::from_millis(20);
    // a reaches Redis through a proxy the test cuts.
    let redis: std::net::SocketAddr = "127.0.0.1:6379".parse().unwrap();
    let proxy = Proxy::start_to(redis).await;
    let a = Replica::start(
        &scene,
        "a",
        &[0],
        pace,
        Fence::Holds,
        Some(format!("redis://{}/0", proxy.addr)),
    )
    .await;
    let feed = {
        let channel = test_channel().await;
        let queue = queue.clone();
        tokio::spawn(async move {
            let (_conn, channel) = channel;
            for seq in 0u64.. {
                publish_commands(&channel, &queue, &[seq.into()]).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    scene.wait_done(&queue, 10, Duration::from_secs(20)).await;
    let b = Replica::start(&scene, "b", &[0], pace, Fence::Holds, None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        scene.record.work().iter().all(|w| w.replica == "a"),
        "b worked while a held the partition"
    );
    // a's heartbeats stop reaching Redis.
    proxy.cut();
    let cut = Instant::now();
    let ttl = scene.settings.fleet.member_ttl;
    wait_for(
        "b takes the partition over",
        ttl + Duration::from_secs(5),
        || format!("{:?}", scene.timeline(&queue)),
        async || scene.record.work().iter().any(|w| w.replica == "b"),
    )
    .await;
    feed.abort();
    let work = scene.record.work();
    let first_b = work
        .iter()
        .filter(|w| w.replica == "b")
        .map(|w| w.began)
        .min()
        .unwrap();
    let last_a = work
        .iter()
        .filter(|w| w.replica == "a")
        .map(|w| w.ended.unwrap_or_else(Instant::now))
        .max()
        .unwrap();
    assert!(
        last_a < first_b,
        "a still worked {:?} after b began: {:?}",
        last_a - first_b,
        scene.timeline(&queue)
    );
    assert!(
        first_b - cut >= ttl.saturating_sub(Duration::from_millis(300)),
        "b began {:?} after the cut, before a's holds could have expired",
        first_b - cut
    );
    assert_eq!(scene.record.overlaps.load(Ordering::Relaxed), 0);
    eprintln!(
        "silent holder: a stopped working {:?} after the cut, b began {:?} after it",
        last_a - cut,
        first_b - cut
    );
    b.stop().await;
    proxy.restore();
    a.stop().await;
}
