//! A worker on a 3-node RabbitMQ cluster (CONTRACT §10): one node dies mid-burst, and the
//! worker goes on from another node without losing a command or calling the API twice for one.
//! The cluster is `scripts/rabbitmq-cluster`'s (see [`crate::harness::cluster`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::Value;
use transfer_worker::tools::simulator::SimulatorConfig;

use crate::harness::cluster::{
    ClusterWorker, NODES, Revive, amqp_port, answers, exclusive, node_name, node_url,
    queue_members, script,
};
use crate::harness::{
    Cleanup, EVENT_WAIT, Events, Proxy, Received, agent_command, publish_commands, sim,
    test_channel_at, test_settings, wait_for,
};

/// Keeps an event, and its `eventId` under its command.
fn record(
    e: Received,
    events: &mut Vec<Received>,
    terminal: &mut BTreeMap<String, BTreeSet<String>>,
) {
    terminal
        .entry(e.command_id().to_owned())
        .or_default()
        .insert(e.json["eventId"].as_str().unwrap_or_default().to_owned());
    events.push(e);
}

/// How the node is taken away.
#[derive(Clone, Copy)]
enum Loss {
    /// SIGKILL of the node's VM: its connections drop at once.
    Crash,
    /// `rabbitmqctl stop`: the node closes its connections and leaves.
    Stop,
    /// The network between the worker and the node goes silent (a proxy holds back whatever
    /// the node sends); nothing is closed, only heartbeats can tell.
    Partition,
}

/// Commands per session, and sessions: each session's commands run one after another, so the
/// burst lasts about `PER_SESSION` API latencies (5 s) and is mid-flight when the node goes:
/// taking a node away takes the script up to 2 s.
const SESSIONS: usize = 4;
const PER_SESSION: usize = 50;
/// The events seen before the node is taken away.
const BEFORE_LOSS: usize = 20;
/// How soon the worker must consume again from another node (the test's bound: the contract's
/// is `amqp.reconnect_max_delay` after the loss is noticed).
const FAILOVER_BOUND: Duration = Duration::from_secs(15);

async fn node_dies_mid_burst(loss: Loss) {
    let _one_at_a_time = exclusive().await;

    let mut settings = test_settings();
    // The worker reaches each node directly, or through a proxy that can cut it off.
    let proxies = match loss {
        Loss::Partition => {
            let mut proxies = Vec::new();
            for n in NODES {
                proxies.push(
                    Proxy::start_to(SocketAddr::from((Ipv4Addr::LOCALHOST, amqp_port(n)))).await,
                );
            }
            proxies
        }
        Loss::Crash | Loss::Stop => Vec::new(),
    };
    let addresses: Vec<String> = match loss {
        Loss::Partition => proxies.iter().map(|p| p.addr.to_string()).collect(),
        Loss::Crash | Loss::Stop => NODES
            .iter()
            .map(|&n| format!("127.0.0.1:{}", amqp_port(n)))
            .collect(),
    };
    settings.amqp.urls = addresses
        .iter()
        .map(|a| format!("amqp://guest:guest@{a}/%2f"))
        .collect();
    let amqp = settings.amqp.clone();
    let sim = sim::start(SimulatorConfig {
        latency: Duration::from_millis(100),
        ..sim::config(&settings)
    })
    .await;

    let mut worker = ClusterWorker::start(&settings, &sim.base_url());
    wait_for(
        "the worker consumes",
        Duration::from_secs(30),
        || worker.log(),
        async || worker.consuming() >= 1,
    )
    .await;
    let first = worker.connections();
    let [first] = &first[..] else {
        panic!("one connection expected before the loss:\n{}", worker.log());
    };
    let dead = NODES
        .into_iter()
        .zip(&addresses)
        .find(|(_, a)| *a == first)
        .map(|(n, _)| n)
        .unwrap_or_else(|| panic!("connected to {first}, not a cluster node"));
    let mut revive = Revive(None);
    let watcher = NODES.into_iter().find(|&n| n != dead).unwrap();
    // Declared by the worker; the cleanup runs on a node that stays up.
    let _cleanup = Cleanup::topology_at(node_url(watcher), &settings);
    let expected: BTreeSet<String> = NODES.iter().map(|&n| node_name(n)).collect();
    for queue in [&amqp.commands_queue, &amqp.dead_letter_queue] {
        assert_eq!(
            queue_members(queue),
            expected,
            "{queue} is replicated on every node"
        );
    }

    let (_conn, channel) = test_channel_at(&node_url(watcher)).await;
    let mut events = Events::bind(&channel, &amqp.results_exchange).await;
    let commands: Vec<Value> = (0..PER_SESSION)
        .flat_map(|i| {
            (0..SESSIONS).map(move |s| {
                // A distinct aId per command: the API's request log tells its calls apart.
                let id = format!("cmd-{s}-{i:03}");
                let mut c = agent_command(&id, &format!("session-{s}"));
                c["aId"] = Value::String(format!("a-{id}"));
                c
            })
        })
        .collect();
    publish_commands(&channel, &amqp.commands_queue, &commands).await;

    let mut seen: Vec<Received> = Vec::new();
    let mut terminal: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    while seen.len() < BEFORE_LOSS {
        let e = events
            .within(EVENT_WAIT)
            .await
            .unwrap_or_else(|| panic!("no event before the loss:\n{}", worker.log()));
        record(e, &mut seen, &mut terminal);
    }

    // The node goes while the test keeps reading events: the script's own run time (the CLI
    // starts slowly) is not the worker's.
    let lost_at = Instant::now();
    let how = match loss {
        Loss::Crash => "kill-node",
        Loss::Stop => "stop-node",
        Loss::Partition => "partition",
    };
    let taking_away = match loss {
        Loss::Partition => {
            proxies[usize::from(dead - 1)].stall();
            tokio::spawn(async { Instant::now() })
        }
        Loss::Crash | Loss::Stop => {
            revive.0 = Some(dead);
            tokio::task::spawn_blocking(move || {
                script(&[how, &dead.to_string()]);
                Instant::now()
            })
        }
    };
    // Events already on their way may still arrive; the first one that arrives once the worker
    // connected to another node marks its return.
    let mut back_after = None;
    let until = Instant::now() + Duration::from_secs(120);
    while terminal.len() < commands.len() {
        let left = until.saturating_duration_since(Instant::now());
        let Some(e) = events.within(left.min(EVENT_WAIT)).await else {
            panic!(
                "events stopped after {} of {} commands:\n{}",
                terminal.len(),
                commands.len(),
                worker.log()
            );
        };
        if back_after.is_none() && worker.connections().len() > 1 {
            back_after = Some(lost_at.elapsed());
        }
        record(e, &mut seen, &mut terminal);
    }
    let stopped = taking_away.await.expect("the node is taken away");
    let back_after = back_after.unwrap_or_else(|| {
        panic!("the worker never connected again:\n{}", worker.log());
    });
    let nodes = worker.connections();
    eprintln!(
        "cluster failover ({how}): the script took {:?}; first event from the next connection \
         {back_after:?} after it began; connections: {nodes:?}",
        stopped - lost_at,
    );
    assert!(
        back_after <= FAILOVER_BOUND,
        "consuming again took {back_after:?}:\n{}",
        worker.log()
    );
    let dead_address = &addresses[usize::from(dead - 1)];
    assert!(
        nodes[1..].iter().all(|n| n != dead_address),
        "reconnected to the dead node: {nodes:?}"
    );

    // Every command has exactly one terminal event: republished copies carry its eventId.
    for c in &commands {
        let id = c["commandId"].as_str().unwrap();
        let ids = terminal.get(id).map(|s| s.len()).unwrap_or(0);
        assert_eq!(ids, 1, "{id}: {ids} distinct terminal events");
    }
    let succeeded = seen
        .iter()
        .filter(|e| e.name() == "transfer.succeeded")
        .map(Received::command_id)
        .collect::<BTreeSet<_>>();
    assert_eq!(succeeded.len(), commands.len(), "every command succeeded");

    // No command reached the API twice.
    let mut calls: BTreeMap<String, usize> = BTreeMap::new();
    for r in sim.requests() {
        *calls
            .entry(r.body["aId"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let twice: Vec<_> = calls.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "commands sent to the API again: {twice:?}"
    );
    assert_eq!(calls.len(), commands.len(), "one call per command");

    let status = worker.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}:\n{}", worker.log());
    drop(revive);
    assert!(answers(dead), "node {dead} is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_by_the_network_mid_burst_is_left_and_nothing_is_lost_or_sent_twice() {
    node_dies_mid_burst(Loss::Partition).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_crashes_mid_burst_loses_nothing_and_sends_nothing_twice() {
    node_dies_mid_burst(Loss::Crash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_mid_burst_loses_nothing_and_sends_nothing_twice() {
    node_dies_mid_burst(Loss::Stop).await;
}
