//! Loading, layering, redaction and validation of the settings.

use super::*;
use std::collections::HashMap;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_load_and_match_the_contract() {
    let s = Settings::load_with_env(None, Some(HashMap::new())).unwrap();
    assert_eq!(s.amqp.commands_queue, "transfer.commands");
    assert_eq!(s.amqp.results_exchange, "transfer.results");
    assert_eq!(s.amqp.dead_letter_exchange, "transfer.dead-letter");
    assert_eq!(s.amqp.dead_letter_queue, "transfer.commands.dead");
    assert_eq!(s.amqp.prefetch, 256);
    assert_eq!(s.bots[0].rate_limit, 60);
    assert_eq!(s.bots[0].rate_window, Duration::from_secs(60));
    assert_eq!(s.retry.max_attempts, 8);
    assert_eq!(s.retry.initial_delay, Duration::from_millis(200));
    assert_eq!(s.commands.max_age, Duration::from_secs(300));
    assert_eq!(s.shutdown.grace, Duration::from_secs(30));
    assert_eq!(s.admin.listen.to_string(), "127.0.0.1:9090");
}

#[test]
fn environment_overrides_file_values() {
    let s = Settings::load_with_env(
        None,
        Some(env(&[
            ("TRANSFER__AMQP__URL", "amqp://u:p@broker:5672/%2f"),
            ("TRANSFER__AMQP__PREFETCH", "7"),
            ("TRANSFER__RETRY__MAX_DELAY", "3s"),
        ])),
    )
    .unwrap();
    assert_eq!(s.amqp.url, "amqp://u:p@broker:5672/%2f");
    assert_eq!(s.amqp.prefetch, 7);
    assert_eq!(s.retry.max_delay, Duration::from_secs(3));
}

#[test]
fn file_layer_overrides_defaults() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(
        &mut f,
        b"[amqp]\nprefetch = 9\n[[bots]]\nstream_id='st-x'\naccount_id='a'\nclient_id='c'\nclient_secret='s'\n",
    )
    .unwrap();
    let s = Settings::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap();
    assert_eq!(s.amqp.prefetch, 9);
    assert_eq!(s.bots.len(), 1);
    assert_eq!(s.bots[0].stream_id, "st-x");
}

#[test]
fn invalid_values_name_their_key() {
    let err =
        Settings::load_with_env(None, Some(env(&[("TRANSFER__AMQP__PREFETCH", "0")]))).unwrap_err();
    assert!(err.to_string().contains("amqp.prefetch"), "{err}");
    let err = Settings::load_with_env(None, Some(env(&[("TRANSFER__CALLBACKS__SECRET", "short")])))
        .unwrap_err();
    assert!(err.to_string().contains("callbacks.secret"), "{err}");
}

#[test]
fn redacted_output_hides_every_secret() {
    let s = Settings::load_with_env(None, Some(HashMap::new())).unwrap();
    let shown = s.to_redacted_toml();
    assert!(!shown.contains("demo-secret-change-me"), "{shown}");
    assert!(!shown.contains("demo-callback-secret-change-me"), "{shown}");
    assert!(!shown.contains("guest:guest"), "{shown}");
    assert!(
        shown.contains("amqp://guest:[redacted]@127.0.0.1:5672/%2f"),
        "{shown}"
    );
    assert!(!format!("{s:?}").contains("demo-secret-change-me"));
}

#[test]
fn an_unknown_key_in_a_file_is_an_error_naming_key_and_file() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f, b"[retry]\nmax_attemps = 2\n").unwrap();
    let err = Settings::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ConfigError::UnknownKey { .. }), "{text}");
    assert!(text.contains("retry.max_attemps"), "{text}");
    assert!(text.contains(&f.path().display().to_string()), "{text}");
}

#[test]
fn an_unknown_key_in_the_environment_is_an_error_naming_the_variable() {
    let err = Settings::load_with_env(None, Some(env(&[("TRANSFER__RETRY__MAX_ATTEMPS", "2")])))
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("retry.max_attemps"), "{text}");
    assert!(text.contains("TRANSFER__RETRY__MAX_ATTEMPS"), "{text}");
    let err = Settings::load_with_env(None, Some(env(&[("TRANSFER__NOPE__X", "1")]))).unwrap_err();
    assert!(
        err.to_string()
            .contains("nope (from environment variable TRANSFER__NOPE__X)"),
        "{err}"
    );
}

#[test]
fn unknown_keys_in_a_bot_or_a_whole_section_are_errors_too() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(
        &mut f,
        b"[[bots]]\nstream_id='st-x'\naccount_id='a'\nclient_id='c'\nclient_secret='s'\nrate_limt=5\n",
    )
    .unwrap();
    let err = Settings::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
    assert!(err.to_string().contains("bots.0.rate_limt"), "{err}");
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f, b"[amqps]\nurl = 'x'\n").unwrap();
    let err = Settings::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
    assert!(err.to_string().contains("amqps"), "{err}");
}

#[test]
fn durations_past_a_year_are_refused() {
    let err = Settings::load_with_env(
        None,
        Some(env(&[("TRANSFER__RETRY__MAX_RETRY_AFTER", "400days")])),
    )
    .unwrap_err();
    assert!(err.to_string().contains("retry.max_retry_after"), "{err}");
}

#[test]
fn bots_of_one_account_must_agree_on_its_budget() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(
        &mut f,
        b"[[bots]]\nstream_id='st-a'\naccount_id='acc'\nclient_id='c'\nclient_secret='s'\n\
          [[bots]]\nstream_id='st-b'\naccount_id='other'\nclient_id='c'\nclient_secret='s'\nrate_limit=5\n\
          [[bots]]\nstream_id='st-c'\naccount_id='acc'\nclient_id='c'\nclient_secret='s'\nrate_limit=7\n",
    )
    .unwrap();
    let err = Settings::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
    assert!(
        err.to_string().contains("bots of account acc disagree"),
        "{err}"
    );
}

#[test]
fn broker_nodes_come_from_a_comma_separated_variable_and_replace_url() {
    let s = Settings::load_with_env(
        None,
        Some(env(&[(
            "TRANSFER__AMQP__URLS",
            "amqp://u:p1@rabbit-1:5672/%2f,amqp://u:p2@rabbit-2:5672/%2f,amqp://u:p3@rabbit-3:5672/%2f",
        )])),
    )
    .unwrap();
    assert_eq!(
        s.amqp.node_urls(),
        [
            "amqp://u:p1@rabbit-1:5672/%2f",
            "amqp://u:p2@rabbit-2:5672/%2f",
            "amqp://u:p3@rabbit-3:5672/%2f",
        ]
    );
    let shown = s.to_redacted_toml();
    for password in ["p1@", "p2@", "p3@"] {
        assert!(!shown.contains(password), "{shown}");
    }
    assert!(
        shown.contains("amqp://u:[redacted]@rabbit-2:5672/%2f"),
        "{shown}"
    );

    // Without `urls`, `url` alone is the broker.
    let s = Settings::load_with_env(None, Some(HashMap::new())).unwrap();
    assert!(s.amqp.urls.is_empty());
    assert_eq!(
        s.amqp.node_urls(),
        ["amqp://guest:guest@127.0.0.1:5672/%2f"]
    );
}

#[test]
fn broker_nodes_from_a_file_are_a_list() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(
        &mut f,
        b"[amqp]\nurls = ['amqp://a:5672/%2f', 'amqp://b:5672/%2f']\n",
    )
    .unwrap();
    let s = Settings::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap();
    assert_eq!(
        s.amqp.node_urls(),
        ["amqp://a:5672/%2f", "amqp://b:5672/%2f"]
    );
}

#[test]
fn a_broker_node_that_is_not_an_amqp_url_is_named() {
    let err = Settings::load_with_env(
        None,
        Some(env(&[(
            "TRANSFER__AMQP__URLS",
            "amqp://rabbit-1:5672/%2f,http://rabbit-2/",
        )])),
    )
    .unwrap_err();
    assert!(err.to_string().contains("amqp.urls[1]"), "{err}");
    // A stray comma leaves an empty node: an error too, not a node skipped in silence.
    let err = Settings::load_with_env(
        None,
        Some(env(&[(
            "TRANSFER__AMQP__URLS",
            "amqp://rabbit-1:5672/%2f,",
        )])),
    )
    .unwrap_err();
    assert!(err.to_string().contains("amqp.urls[1]"), "{err}");
}

#[test]
fn the_breaker_is_on_by_default_and_checks_its_durations() {
    let s = Settings::load_with_env(None, Some(HashMap::new())).unwrap();
    assert!(s.breaker.enabled);
    assert_eq!(s.breaker.open_after, Duration::from_secs(30));
    assert_eq!(s.breaker.probe_interval, Duration::from_secs(5));
    for (var, value, key) in [
        ("TRANSFER__BREAKER__OPEN_AFTER", "0s", "breaker.open_after"),
        (
            "TRANSFER__BREAKER__PROBE_INTERVAL",
            "10ms",
            "breaker.probe_interval",
        ),
    ] {
        let err = Settings::load_with_env(None, Some(env(&[(var, value)]))).unwrap_err();
        assert!(err.to_string().contains(key), "{err}");
    }
}

#[test]
fn telemetry_exports_nothing_by_default_and_checks_its_endpoint() {
    let s = Settings::load_with_env(None, Some(HashMap::new())).unwrap();
    assert_eq!(s.telemetry.otlp_endpoint, "");
    assert_eq!(s.telemetry.service_name, "transfer-worker");
    let ok = env(&[(
        "TRANSFER__TELEMETRY__OTLP_ENDPOINT",
        "http://collector:4318",
    )]);
    Settings::load_with_env(None, Some(ok)).unwrap();
    for (var, value, key) in [
        (
            "TRANSFER__TELEMETRY__OTLP_ENDPOINT",
            "collector:4318",
            "telemetry.otlp_endpoint",
        ),
        (
            "TRANSFER__TELEMETRY__OTLP_ENDPOINT",
            "not a url",
            "telemetry.otlp_endpoint",
        ),
        (
            "TRANSFER__TELEMETRY__SERVICE_NAME",
            " ",
            "telemetry.service_name",
        ),
        (
            "TRANSFER__TELEMETRY__EXPORT_TIMEOUT",
            "0s",
            "telemetry.export_timeout",
        ),
    ] {
        let err = Settings::load_with_env(None, Some(env(&[(var, value)]))).unwrap_err();
        assert!(err.to_string().contains(key), "{err}");
    }
}

#[test]
fn an_accounts_slots_default_to_its_burst_or_what_its_budget_keeps_on_the_wire() {
    let mut s = Settings::load_with_env(None, Some(HashMap::new())).unwrap();
    assert_eq!(s.commands.aside_after, Duration::from_secs(1));
    assert_eq!(s.amqp.consumer_timeout, Duration::from_secs(1800));
    // The vendor's 60 a minute: its whole burst.
    assert_eq!(s.max_in_flight(&s.bots[0]), 60);
    // 100 a second at 10 s a call: 1 000 on the wire.
    s.bots[0].rate_limit = 100;
    s.bots[0].rate_window = Duration::from_secs(1);
    assert_eq!(s.max_in_flight(&s.bots[0]), 1000);
    s.bots[0].max_in_flight = Some(4);
    assert_eq!(s.max_in_flight(&s.bots[0]), 4);
    // Zero is refused, by name.
    let err = Settings::load_with_env(
        None,
        Some(env(&[("TRANSFER__COMMANDS__ASIDE_AFTER", "1ms")])),
    )
    .unwrap_err();
    assert!(err.to_string().contains("commands.aside_after"), "{err}");
}

#[test]
fn a_bot_s_own_base_url_is_checked_and_used_for_its_calls() {
    let mut s = Settings::load_with_env(None, Some(HashMap::new())).unwrap();
    s.bots[0].base_url = Some("not a url".into());
    match s.validate() {
        Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "bots[0].base_url"),
        other => panic!("expected bots[0].base_url refused, got {other:?}"),
    }
    s.bots[0].base_url = Some("https://de-platform.kore.ai".into());
    s.validate().unwrap();
    assert_eq!(
        s.bots[0].base_url(&s.agentassist),
        "https://de-platform.kore.ai"
    );
    s.bots[0].base_url = None;
    assert_eq!(s.bots[0].base_url(&s.agentassist), s.agentassist.base_url);
}

/// The settings of `config/default.toml`, with `pairs` in the environment.
fn loaded(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    Settings::load_with_env(None, Some(env(pairs)))
}

/// The reason of a refusal that names `key`.
fn refusal(result: Result<Settings, ConfigError>, key: &str) -> String {
    match result {
        Err(ConfigError::Invalid { key: k, reason }) if k == key => reason,
        other => panic!("expected {key} refused, got {other:?}"),
    }
}

const A_FLEET: (&str, &str) = ("TRANSFER__FLEET__REDIS_URL", "redis://127.0.0.1:6379/0");

#[test]
fn the_worker_s_default_amqp_heartbeat_is_the_one_validation_counts_with() {
    assert_eq!(
        fleet_timings::DEFAULT_AMQP_HEARTBEAT_SECS,
        crate::broker::connection::DEFAULT_HEARTBEAT_SECS
    );
}

#[test]
fn the_shipped_fleet_timings_pass_alone_and_in_a_fleet() {
    let s = loaded(&[]).unwrap();
    assert_eq!(s.fleet.heartbeat, Duration::from_secs(1));
    assert_eq!(s.fleet.redis_timeout, Duration::from_secs(2));
    assert_eq!(s.fleet.member_ttl, Duration::from_secs(10));
    // With Redis, the 3 s AMQP heartbeat the worker proposes: 1 s + 3 × 3 s, exactly.
    loaded(&[A_FLEET]).unwrap();
}

#[test]
fn member_ttl_outlasts_one_heartbeat_that_times_out() {
    let timings = |heartbeat, redis_timeout, member_ttl| {
        loaded(&[
            ("TRANSFER__FLEET__HEARTBEAT", heartbeat),
            ("TRANSFER__FLEET__REDIS_TIMEOUT", redis_timeout),
            ("TRANSFER__FLEET__MEMBER_TTL", member_ttl),
        ])
    };
    // 3 × heartbeat + redis_timeout, whichever of the two is longer.
    timings("1s", "2s", "5s").unwrap();
    timings("1s", "500ms", "3500ms").unwrap();
    timings("250ms", "2s", "2750ms").unwrap();
    for (heartbeat, redis_timeout, below) in [
        ("1s", "2s", "4999ms"),
        ("1s", "500ms", "3499ms"),
        ("250ms", "2s", "2749ms"),
        // Twice the heartbeat, as was allowed: a replica would stop itself over and over.
        ("1s", "2s", "2s"),
    ] {
        let reason = refusal(timings(heartbeat, redis_timeout, below), "fleet.member_ttl");
        for named in ["fleet.heartbeat", "fleet.redis_timeout", "2 ×"] {
            assert!(reason.contains(named), "{reason}");
        }
    }
    let reason = refusal(timings("1s", "2s", "4s"), "fleet.member_ttl");
    assert!(reason.starts_with("4s must be at least"), "{reason}");
    assert!(reason.contains("= 5s (1s + 2 × 1s + 2s)"), "{reason}");
}

#[test]
fn in_a_fleet_member_ttl_outlasts_the_brokers_detection_of_a_frozen_replica() {
    let fleet = |member_ttl, url: &str| {
        loaded(&[
            A_FLEET,
            ("TRANSFER__FLEET__HEARTBEAT", "1s"),
            // The heartbeat arithmetic asks for 3.5 s: below what is checked here.
            ("TRANSFER__FLEET__REDIS_TIMEOUT", "500ms"),
            ("TRANSFER__FLEET__MEMBER_TTL", member_ttl),
            ("TRANSFER__AMQP__URL", url),
        ])
    };
    const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
    // The worker's 3 s: 1 s + 3 × 3 s.
    fleet("10s", URL).unwrap();
    let reason = refusal(fleet("9999ms", URL), "fleet.member_ttl");
    for named in [
        "fleet.heartbeat",
        "3 × the AMQP heartbeat",
        "amqp.url",
        "= 10s",
    ] {
        assert!(reason.contains(named), "{reason}");
    }
    // Alone, nothing is held: only the heartbeat arithmetic counts.
    loaded(&[
        ("TRANSFER__FLEET__REDIS_TIMEOUT", "1s"),
        ("TRANSFER__FLEET__MEMBER_TTL", "4s"),
    ])
    .unwrap();
    // A heartbeat the URL names: 1 s + 3 × 1 s.
    let url = format!("{URL}?heartbeat=1");
    fleet("4s", &url).unwrap();
    let reason = refusal(fleet("3999ms", &url), "fleet.member_ttl");
    assert!(reason.contains("amqp.url's heartbeat"), "{reason}");
    // None at all leaves it to the broker: refused, naming the URL.
    let reason = refusal(fleet("60s", &format!("{URL}?heartbeat=0")), "amqp.url");
    assert!(reason.contains("heartbeat=0"), "{reason}");
    // Of several nodes, the longest heartbeat counts.
    let nodes = |member_ttl| {
        loaded(&[
            A_FLEET,
            ("TRANSFER__FLEET__REDIS_TIMEOUT", "500ms"),
            ("TRANSFER__FLEET__MEMBER_TTL", member_ttl),
            (
                "TRANSFER__AMQP__URLS",
                "amqp://a:5672/%2f?heartbeat=1,amqp://b:5672/%2f?heartbeat=2",
            ),
        ])
    };
    nodes("7s").unwrap();
    let reason = refusal(nodes("6999ms"), "fleet.member_ttl");
    assert!(reason.contains("amqp.urls[1]"), "{reason}");
}

/// Durations from the plausible to the absurd.
fn any_duration() -> impl proptest::strategy::Strategy<Value = Duration> {
    use proptest::prelude::*;
    prop_oneof![
        (0u64..30_000).prop_map(Duration::from_millis),
        any::<u64>().prop_map(Duration::from_secs),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Whatever the durations, validation answers (no overflow), and it accepts exactly the
    /// timings that keep both rules: what it accepts keeps them.
    #[test]
    fn fleet_timings_are_accepted_exactly_when_they_keep_the_rules(
        heartbeat in any_duration(),
        member_ttl in any_duration(),
        redis_timeout in any_duration(),
        lease in any_duration(),
        amqp_heartbeat in proptest::option::of(0u16..5),
        redis in proptest::bool::ANY,
    ) {
        let mut s = Settings::load_with_env(None, Some(HashMap::new())).unwrap();
        s.fleet.heartbeat = heartbeat;
        s.fleet.member_ttl = member_ttl;
        s.fleet.redis_timeout = redis_timeout;
        s.fleet.lease = lease;
        if redis {
            s.fleet.redis_url = A_FLEET.1.to_owned();
        }
        if let Some(t) = amqp_heartbeat {
            s.amqp.url = format!("{}?heartbeat={t}", s.amqp.url);
        }
        let accepted = s.validate().is_ok();

        let kept = member_ttl.checked_sub(heartbeat);
        let holds = kept.is_some_and(|k| {
            heartbeat.checked_mul(2).and_then(|d| d.checked_add(redis_timeout)).is_some_and(|n| k >= n)
        });
        let t = u64::from(amqp_heartbeat.unwrap_or(3));
        let broker = !redis || (t > 0 && kept.is_some_and(|k| k >= Duration::from_secs(3 * t)));
        if accepted {
            proptest::prop_assert!(holds, "accepted {heartbeat:?} {member_ttl:?} {redis_timeout:?}");
            proptest::prop_assert!(broker, "accepted {member_ttl:?} − {heartbeat:?} < 3 × {t}s");
        }
        let otherwise_fine = heartbeat >= Duration::from_millis(100)
            && lease >= Duration::from_secs(1)
            && !redis_timeout.is_zero()
            && redis_timeout < lease
            && [heartbeat, member_ttl, redis_timeout, lease].iter().all(|d| *d <= MAX_DURATION);
        proptest::prop_assert_eq!(accepted, otherwise_fine && holds && broker);
    }
}

#[test]
fn an_account_id_too_long_for_its_queue_names_is_refused() {
    // `transfer.commands.p1024.account.<id>#<8 hex>` at most 255 bytes: an id of 214.
    let with = |len: usize| {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let bot = format!(
            "[[bots]]\nstream_id='st-x'\naccount_id='{}'\nclient_id='c'\nclient_secret='s'\n",
            "a".repeat(len)
        );
        std::io::Write::write_all(&mut f, bot.as_bytes()).unwrap();
        Settings::load_with_env(Some(f.path()), Some(HashMap::new()))
    };
    with(214).expect("the longest id whose queue names fit");
    let err = with(215).unwrap_err();
    assert!(err.to_string().contains("bots[0].account_id"), "{err}");
}

#[test]
fn a_sentinel_urls_passwords_are_both_redacted() {
    let shown = super::redact_url(
        "rediss+sentinel://worker:primary-secret@s1:26379,s2/main/0?sentinel_password=sentinel-secret",
    );
    assert_eq!(
        shown,
        "rediss+sentinel://worker:[redacted]@s1:26379,s2/main/0?sentinel_password=[redacted]"
    );
}
