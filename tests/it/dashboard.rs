//! `docs/grafana-dashboard.json` is an importable dashboard, and every series it queries is one
//! the worker's `/metrics` serves.

use std::collections::BTreeSet;

use serde_json::Value;
use transfer_worker::ops::metrics::RelayResult;
use transfer_worker::tools::simulator::Reply;

use crate::harness::admin::get;
use crate::harness::{Harness, agent_command};

const DASHBOARD: &str = include_str!("../../docs/grafana-dashboard.json");

/// The sample names a text exposition can carry, from its `# TYPE` lines.
fn sample_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    names
}

/// The metric names a PromQL expression mentions (the worker's all start with `transfer_`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("transfer_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_series_the_worker_serves() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let inputs = dashboard["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "a Prometheus datasource input"
    );
    let mut exprs = vec![
        dashboard["templating"]["list"][0]["query"]["query"]
            .as_str()
            .expect("the instance variable's query")
            .to_owned(),
    ];
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(panel["id"].as_u64().expect("an id")),
            "ids unique"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{panel}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for t in targets {
            exprs.push(t["expr"].as_str().expect("an expr").to_owned());
        }
    }

    // A family is served once it has a series: one command that is retried gives the API's;
    // the relay's and the fleet's Redis series are recorded directly, as their code does.
    let mut h = Harness::start(|_, _| {}).await;
    h.sim.script([Reply::Status(503), Reply::Accept]);
    h.publish(&agent_command("dash-1", "s-dash-1")).await;
    assert_eq!(h.next_event().await.name(), "transfer.succeeded");
    h.metrics.callback(RelayResult::Forbidden);
    h.metrics.redis_call("ping", 0.001, true);
    let (_, _, exposition) = get(h.admin_addr, "/metrics").await;
    let served = sample_names(&exposition);
    assert!(served.contains("transfer_breaker_open"), "{exposition}");
    let mut queried = BTreeSet::new();
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr}");
        queried.extend(names);
    }
    let unknown: Vec<&String> = queried.iter().filter(|n| !served.contains(*n)).collect();
    assert_eq!(unknown, Vec::<&String>::new(), "served:\n{served:#?}");
    h.stop().await.expect("stops");
}
