//! Secure transport (CONTRACT §13): each TLS path against a real TLS server (the simulator
//! serving HTTPS, a TLS-only `redis-server`, the cluster's TLS RabbitMQ node), working with the
//! right trust, and failing closed without it: a wrong CA, an expired certificate or a wrong
//! host name is an error naming the endpoint and the reason, and nothing goes out in plain text.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use transfer_worker::broker::connection;
use transfer_worker::config::{AmqpTlsSettings, FleetSettings, Settings};
use transfer_worker::fleet::Fleet as FleetClient;
use transfer_worker::ops::metrics::Metrics;
use transfer_worker::tools::simulator::SimTls;

use crate::harness::pki::{Issued, Pki, Validity};
use crate::harness::process::env;
use crate::harness::replicas::FleetSpec;
use crate::harness::tls::{ConnectProxy, TlsNode, TlsRedis, TlsSentinel};
use crate::harness::{Fleet, Harness, agent_command, test_settings};

fn served(issued: &Issued) -> SimTls {
    SimTls {
        cert_pem: issued.cert_pem.clone().into_bytes(),
        key_pem: issued.key_pem.clone().into_bytes(),
    }
}

/// The worker in-process, calling a simulator that serves `server` over HTTPS, trusting the
/// CA in `ca_file`: the one event of one command, and how many requests reached the API.
async fn one_command_over_https(
    ca_file: PathBuf,
    server: &Issued,
    id: &str,
) -> (Value, String, usize) {
    let mut h = Harness::start(|s, sim| {
        s.agentassist.ca_file = ca_file;
        sim.tls = Some(served(server));
    })
    .await;
    let base_url = h.sim.base_url();
    assert!(base_url.starts_with("https://localhost:"), "{base_url}");
    h.publish(&agent_command(id, &format!("s-{id}"))).await;
    let event = h.next_event().await;
    let requests = h.sim.requests().len();
    h.stop_leaving_nothing().await;
    (event.json, base_url, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_over_https_is_verified_against_agentassist_ca_file() {
    let pki = Pki::new("API test CA");
    let server = pki.server("api", &["localhost"], Validity::Current);
    let (event, _, requests) = one_command_over_https(pki.ca_file(), &server, "tls-api-ok").await;
    assert_eq!(event["event"], "transfer.succeeded", "{event}");
    assert_eq!(requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_certificate_that_does_not_verify_fails_the_command_naming_host_and_reason() {
    let pki = Pki::new("API test CA");
    let stranger = Pki::new("a CA nobody trusts");
    let cases = [
        (
            "wrong CA",
            stranger.ca_file(),
            pki.server("api", &["localhost"], Validity::Current),
            "UnknownIssuer",
        ),
        (
            "expired",
            pki.ca_file(),
            pki.server("expired", &["localhost"], Validity::Expired),
            "expired",
        ),
        (
            "wrong host name",
            pki.ca_file(),
            pki.server("elsewhere", &["api.example.com"], Validity::Current),
            "not valid for name",
        ),
    ];
    for (i, (case, ca_file, server, reason)) in cases.into_iter().enumerate() {
        let (event, base_url, requests) =
            one_command_over_https(ca_file, &server, &format!("tls-api-bad-{i}")).await;
        assert_eq!(event["event"], "transfer.failed", "{case}: {event}");
        let message = event["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&base_url) && message.to_lowercase().contains(&reason.to_lowercase()),
            "{case}: the error names {base_url} and why ({reason}): {event}"
        );
        assert_eq!(requests, 0, "{case}: no request reached the API");
        assert_eq!(
            event["retryable"], false,
            "{case}: only an operator can fix it: {event}"
        );
        assert_eq!(event["attempts"], 1, "{case}: not retried: {event}");
        assert_eq!(event["error"]["kind"], "connection", "{case}: {event}");
        eprintln!("{case}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_reached_through_https_proxy_and_still_verified_end_to_end() {
    let pki = Pki::new("API test CA");
    let server = pki.server("api", &["localhost"], Validity::Current);
    let proxy = ConnectProxy::start().await;
    let ca_file = pki.ca_file().display().to_string();
    let mut fleet = Fleet::start(FleetSpec {
        replicas: 1,
        sim_tls: Some(served(&server)),
        env: env(&[
            ("HTTPS_PROXY", &proxy.url()),
            ("NO_PROXY", ""),
            ("TRANSFER__AGENTASSIST__CA_FILE", &ca_file),
        ]),
        ..FleetSpec::default()
    })
    .await;
    fleet
        .publish(&agent_command("tls-proxy-1", "s-tls-proxy-1"))
        .await;
    let events = fleet
        .events_until(Duration::from_secs(30), |e| !e.is_empty())
        .await;
    assert_eq!(events[0].name(), "transfer.succeeded", "{}", events[0].json);
    let port = fleet.sim.addr().port();
    assert_eq!(
        proxy.tunnels(),
        vec![format!("localhost:{port}")],
        "one CONNECT tunnel to the API's host"
    );
    assert_eq!(fleet.sim.requests().len(), 1);
    fleet.stop_leaving_nothing().await;
}

fn fleet_settings(url: String, ca_file: PathBuf) -> FleetSettings {
    let mut settings = test_settings().fleet;
    settings.redis_url = url;
    settings.redis_ca_file = ca_file;
    settings
}

/// One ping of the fleet's Redis client with these settings.
async fn ping(settings: &FleetSettings) -> Result<(), String> {
    let fleet = FleetClient::new(
        settings,
        "tls-test",
        Duration::from_secs(60),
        Arc::new(Metrics::new()),
    )
    .map_err(|e| e.to_string())?;
    fleet.ping().await.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_reaches_redis_over_tls_with_user_and_password() {
    let pki = Pki::new("Redis test CA");
    let server = pki.server("redis", &["localhost"], Validity::Current);
    let redis = TlsRedis::start(&pki, &server).await;

    // A whole worker in fleet mode: its claims and outcomes go to the TLS Redis.
    let url = redis.url("localhost");
    let mut h = Harness::start(|s, _| {
        s.fleet = fleet_settings(url, pki.ca_file());
        s.fleet.partitions = 0;
    })
    .await;
    h.publish(&agent_command("tls-redis-1", "s-tls-redis-1"))
        .await;
    let event = h.next_event().await;
    assert_eq!(event.name(), "transfer.succeeded", "{}", event.json);
    let keys = redis
        .cli(&pki, &["--scan", "--pattern", "*tls-redis-1*"])
        .await;
    assert!(
        !keys.is_empty(),
        "the outcome was recorded in the TLS Redis"
    );
    h.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_certificate_that_does_not_verify_is_an_error_naming_the_server() {
    let pki = Pki::new("Redis test CA");
    let stranger = Pki::new("a CA nobody trusts");
    let good = pki.server("redis", &["localhost"], Validity::Current);
    let redis = TlsRedis::start(&pki, &good).await;
    let expired = pki.server("expired", &["localhost"], Validity::Expired);
    let redis_expired = TlsRedis::start(&pki, &expired).await;

    let trusted = fleet_settings(redis.url("localhost"), pki.ca_file());
    ping(&trusted).await.expect("the right CA and name answer");

    let cases = [
        (
            "wrong CA",
            redis.url("localhost"),
            stranger.ca_file(),
            "UnknownIssuer",
        ),
        (
            "wrong host name",
            redis.url("127.0.0.1"),
            pki.ca_file(),
            "not valid for name",
        ),
        (
            "expired",
            redis_expired.url("localhost"),
            pki.ca_file(),
            "expired",
        ),
    ];
    for (case, url, ca_file, reason) in cases {
        let shown = url
            .rsplit_once('@')
            .unwrap()
            .1
            .trim_end_matches("/0")
            .to_owned();
        let err = ping(&fleet_settings(url, ca_file)).await.unwrap_err();
        assert!(
            err.contains(&format!("rediss://{shown}"))
                && err.to_lowercase().contains(&reason.to_lowercase()),
            "{case}: the error names rediss://{shown} and why ({reason}): {err}"
        );
        assert!(!err.contains(crate::harness::tls::REDIS_PASSWORD), "{err}");
        eprintln!("{case}: {err}");
    }
}

/// Sentinel over TLS (`rediss+sentinel://`): the fleet asks a TLS-only sentinel for its
/// primary and writes to that primary over TLS, with the one CA of `fleet.redis_ca_file`; a
/// URL without TLS, or a CA that did not sign the sentinel's certificate, finds nothing. (Its
/// name has "sentinel" in it, for `cargo test sentinel`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_finds_its_primary_through_a_tls_sentinel_and_only_with_the_right_trust() {
    let pki = Pki::new("Redis test CA");
    let stranger = Pki::new("a CA nobody trusts");
    // The sentinel names its primary by address.
    let server = pki.server("redis", &["localhost", "127.0.0.1"], Validity::Current);
    let redis = TlsRedis::start(&pki, &server).await;
    let sentinel = TlsSentinel::start(&pki, &server, &redis, "fleet-tls").await;
    let url = sentinel.url("localhost");

    let trusted = fleet_settings(url.clone(), pki.ca_file());
    ping(&trusted)
        .await
        .expect("the right CA finds and reaches the primary");
    let plain = url.replacen("rediss+sentinel://", "redis+sentinel://", 1);
    let err = ping(&fleet_settings(plain, pki.ca_file())).await;
    assert!(err.is_err(), "a TLS-only sentinel answers no plain text");
    let err = ping(&fleet_settings(url.clone(), stranger.ca_file()))
        .await
        .unwrap_err();
    assert!(
        err.contains("UnknownIssuer") && !err.contains(crate::harness::tls::REDIS_PASSWORD),
        "the error says why, and not the password: {err}"
    );

    // A whole worker in fleet mode: its claims and outcomes go to the primary the sentinel
    // named, over TLS.
    let mut h = Harness::start(|s, _| {
        s.fleet = fleet_settings(url, pki.ca_file());
        s.fleet.partitions = 0;
    })
    .await;
    h.publish(&agent_command("tls-sentinel-1", "s-tls-sentinel-1"))
        .await;
    let event = h.next_event().await;
    assert_eq!(event.name(), "transfer.succeeded", "{}", event.json);
    let keys = redis
        .cli(&pki, &["--scan", "--pattern", "*tls-sentinel-1*"])
        .await;
    assert!(!keys.is_empty(), "the outcome was recorded in the primary");
    h.stop_leaving_nothing().await;
}

fn amqp_tls(node: &TlsNode, ca: &str) -> AmqpTlsSettings {
    AmqpTlsSettings {
        ca_file: node.file(ca),
        cert_file: node.file("client.pem"),
        key_file: node.file("client.key"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_runs_over_amqps_logging_in_with_its_client_certificate() {
    let node = TlsNode::up().await;
    // The test's own channel reaches the node in plain text; the worker only over TLS.
    let mut base = test_settings();
    base.amqp.url = node.plain_url();
    let url = node.external_url("localhost");
    let tls = amqp_tls(&node, "ca.pem");
    let mut h = Harness::start_with(base, |s, _| {
        s.amqp.url = url;
        s.amqp.tls = tls;
    })
    .await;
    h.publish(&agent_command("tls-amqp-1", "s-tls-amqp-1"))
        .await;
    let event = h.next_event().await;
    assert_eq!(event.name(), "transfer.succeeded", "{}", event.json);
    let connections = crate::harness::cluster::script(&[
        "ctl",
        "5",
        "-q",
        "list_connections",
        "user",
        "auth_mechanism",
        "ssl",
    ]);
    assert!(
        connections
            .lines()
            .any(|l| l.contains("transfer-worker-tls")
                && l.contains("EXTERNAL")
                && l.contains("true")),
        "the worker logged in as its certificate, over TLS:\n{connections}"
    );
    h.stop().await.expect("the worker stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqps_node_that_does_not_verify_is_an_error_naming_the_node() {
    let node = TlsNode::up().await;
    let attempt = |url: String, tls: AmqpTlsSettings| async move {
        let mut settings = test_settings();
        settings.amqp.url = url;
        settings.amqp.tls = tls;
        settings.amqp.operation_timeout = Duration::from_secs(5);
        connection::connect(&settings.amqp, "tls-test")
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    };
    attempt(node.external_url("localhost"), amqp_tls(&node, "ca.pem"))
        .await
        .expect("the right CA, name and client certificate connect");

    let cases = [
        (
            "wrong CA",
            node.external_url("localhost"),
            "other-ca.pem",
            "amqps://localhost:5685",
            "UnknownIssuer",
        ),
        (
            "wrong host name",
            node.external_url("127.0.0.1"),
            "ca.pem",
            "amqps://127.0.0.1:5685",
            "not valid for name",
        ),
        (
            "a plain-text port",
            format!(
                "amqps://localhost:{}/%2f?auth_mechanism=external",
                crate::harness::tls::PLAIN_PORT
            ),
            "ca.pem",
            "amqps://localhost:5675",
            "",
        ),
    ];
    for (case, url, ca, shown, reason) in cases {
        let err = attempt(url, amqp_tls(&node, ca)).await.unwrap_err();
        assert!(
            err.contains(&format!("cannot connect to the broker at {shown}"))
                && err.to_lowercase().contains(&reason.to_lowercase()),
            "{case}: the error names {shown} and why ({reason}): {err}"
        );
        eprintln!("{case}: {err}");
    }
}

#[test]
fn tls_settings_that_would_not_be_used_or_cannot_log_in_are_refused() {
    let load = |vars: &[(&str, &str)]| {
        let env = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::load_with_env(None, Some(env))
            .map(drop)
            .map_err(|e| e.to_string())
    };
    let pki = Pki::new("config test CA");
    let ca = pki.ca_file().display().to_string();
    let err = load(&[("TRANSFER__AMQP__TLS__CA_FILE", &ca)]).unwrap_err();
    assert!(
        err.contains("amqp.url") && err.contains("plain text"),
        "{err}"
    );
    let err = load(&[(
        "TRANSFER__AMQP__URL",
        "amqps://broker.example:5671/%2f?auth_mechanism=external",
    )])
    .unwrap_err();
    assert!(
        err.contains("amqp.tls.cert_file") && err.contains("external"),
        "{err}"
    );
    let err = load(&[
        ("TRANSFER__FLEET__REDIS_URL", "redis://127.0.0.1:6379/0"),
        ("TRANSFER__FLEET__REDIS_CA_FILE", &ca),
    ])
    .unwrap_err();
    assert!(
        err.contains("fleet.redis_ca_file") && err.contains("rediss://"),
        "{err}"
    );
    let err = load(&[("TRANSFER__AGENTASSIST__CA_FILE", "/nonexistent/ca.pem")]).unwrap_err();
    assert!(
        err.contains("agentassist.ca_file") && err.contains("/nonexistent/ca.pem"),
        "{err}"
    );
    load(&[
        ("TRANSFER__AMQP__URL", "amqps://broker.example:5671/%2f"),
        ("TRANSFER__AMQP__TLS__CA_FILE", &ca),
        ("TRANSFER__AGENTASSIST__CA_FILE", &ca),
    ])
    .expect("amqps:// with a CA, and a CA for the API, load");
}
