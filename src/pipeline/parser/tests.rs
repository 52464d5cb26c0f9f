use super::*;
use crate::config::Settings;
use crate::ops::metrics::Metrics;

fn parser() -> Parser {
    let settings = Settings::load_with_env(None, Some(Default::default())).unwrap();
    let bots = Bots::new(&settings, &Metrics::new());
    Parser::new(bots, Duration::from_secs(300))
}

fn parse(body: &str) -> Result<Command, Box<Rejection>> {
    parser()
        .parse(body.as_bytes(), &Envelope::default())
        .map(|valid| valid.command)
}

#[test]
fn agent_and_queue_commands_parse() {
    let c = parse(r#"{"orgId":"o-1","botSessionId":"s1","aId":"a-1","commandId":"c1"}"#).unwrap();
    assert_eq!(c.target, Target::Agent("a-1".into()));
    assert_eq!(c.command_id, "c1");
    let c =
        parse(r#"{"orgId":"o-1","botSessionId":"s1","transferredType":"QUEUE","queueId":"qu-1"}"#)
            .unwrap();
    assert_eq!(c.target, Target::Queue("qu-1".into()));
    assert!(c.command_id.starts_with("sha256:"));
    let c = parse(r#"{"orgId":"o","botSessionId":"s","transferredType":"AGENT","aId":"a","x":1}"#)
        .unwrap();
    assert_eq!(c.target, Target::Agent("a".into()));
}

#[test]
fn command_id_falls_back_to_message_id_then_hash() {
    let p = parser();
    let body = br#"{"orgId":"o","botSessionId":"s","aId":"a"}"#;
    let env = Envelope {
        message_id: Some("m-9".into()),
        timestamp: None,
        replayed: false,
        trace: Default::default(),
    };
    assert_eq!(p.parse(body, &env).unwrap().command.command_id, "m-9");
    let a = p
        .parse(body, &Envelope::default())
        .unwrap()
        .command
        .command_id;
    let b = p
        .parse(body, &Envelope::default())
        .unwrap()
        .command
        .command_id;
    assert_eq!(a, b);
    assert_eq!(a.len(), 7 + 64);
}

#[test]
fn each_bad_input_is_rejected_with_its_reason() {
    let cases: &[(&[u8], &str)] = &[
        (b"\xff\xfe", "not UTF-8"),
        (b"{nope", "not valid JSON"),
        (b"[1]", "JSON object"),
        (br#"{"botSessionId":"s","aId":"a"}"#, "orgId"),
        (br#"{"orgId":"o","aId":"a"}"#, "botSessionId"),
        (br#"{"orgId":"o","botSessionId":"s"}"#, "no target"),
        (br#"{"orgId":"o","botSessionId":"s","aId":"a","transferredType":"QUEUE","queueId":"q"}"#, "two targets"),
        (br#"{"orgId":"o","botSessionId":"s","aId":"a","streamId":"st-nope"}"#, "unknown streamId"),
        (br#"{"orgId":"o","botSessionId":"s","transferredType":"BOT","queueId":"q"}"#, "transferredType"),
        (br#"{"orgId":5,"botSessionId":"s","aId":"a"}"#, "orgId must be a string"),
        (br#"{"orgId":"o","botSessionId":"s","aId":"a","expiresAt":"tomorrow"}"#, "expiresAt"),
    ];
    for (body, needle) in cases {
        let r = parser().parse(body, &Envelope::default()).unwrap_err();
        assert!(
            r.message.contains(needle),
            "{:?}: {}",
            String::from_utf8_lossy(body),
            r.message
        );
    }
    let big = format!(
        r#"{{"orgId":"o","botSessionId":"s","aId":"a","pad":"{}"}}"#,
        "x".repeat(MAX_COMMAND_BYTES)
    );
    assert!(parse(&big).unwrap_err().message.contains("limit"));
}

#[test]
fn rejections_keep_the_ids_that_could_be_read() {
    let r = parse(r#"{"commandId":"c7","botSessionId":"s","aId":"a"}"#).unwrap_err();
    assert_eq!(r.command_id, "c7");
    assert_eq!(r.bot_session_id.as_deref(), Some("s"));
    assert_eq!(r.target, Some(Target::Agent("a".into())));
    assert!(r.stream_id.is_some());
    let r = parse(r#"{"commandId":"c8","botSessionId":"s","aId":"a","orgId":5}"#).unwrap_err();
    assert_eq!(r.command_id, "c8");
    assert_eq!(r.bot_session_id.as_deref(), Some("s"));
    let r = parse("garbage").unwrap_err();
    assert!(r.bot_session_id.is_none() && r.stream_id.is_none() && r.target.is_none());
}

#[test]
fn deadline_is_the_earlier_of_expires_at_and_timestamp_plus_max_age() {
    let p = parser();
    let body = br#"{"orgId":"o","botSessionId":"s","aId":"a","expiresAt":"2030-01-01T00:00:00Z"}"#;
    let c = p
        .parse(
            body,
            &Envelope {
                message_id: None,
                timestamp: Some(1_000),
                replayed: false,
                trace: Default::default(),
            },
        )
        .unwrap();
    assert_eq!(
        c.command.deadline,
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_300))
    );
    let c = p.parse(body, &Envelope::default()).unwrap();
    assert_eq!(
        c.command.deadline,
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_456_000))
    );
}

/// Property tests at the edge where deliveries enter: whatever arrives, the parser answers
/// with a command or a rejection that says why, and never panics.
mod props {
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::*;

    /// Timestamps at and near their limits, and anything in between.
    fn timestamp() -> impl Strategy<Value = Option<u64>> {
        proptest::option::of(prop_oneof![
            Just(0u64),
            Just(u64::MAX),
            Just(u64::MAX - 1),
            Just(i64::MAX as u64),
            Just((i64::MAX as u64) + 1),
            Just(253_402_300_799u64), // 9999-12-31T23:59:59Z
            any::<u64>(),
        ])
    }

    fn envelope() -> impl Strategy<Value = Envelope> {
        (proptest::option::of(".{0,80}"), timestamp()).prop_map(|(message_id, timestamp)| {
            Envelope {
                message_id,
                timestamp,
                replayed: false,
                trace: Default::default(),
            }
        })
    }

    /// Any JSON value, nested a little.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,40}".prop_map(Value::from),
            Just(Value::from("")),
            Just(Value::from("QUEUE")),
            Just(Value::from("AGENT")),
            Just(Value::from("9999-12-31T23:59:59.999999999Z")),
            Just(Value::from("0000-01-01T00:00:00Z")),
            Just(Value::from("2026-02-30T00:00:00+23:59")),
        ];
        leaf.prop_recursive(2, 12, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(".{0,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Objects made of the command's own fields (and a stray one), each with any value:
    /// close enough to a command to reach every branch of the parser.
    fn command_like() -> impl Strategy<Value = Value> {
        const KEYS: [&str; 10] = [
            "commandId",
            "streamId",
            "orgId",
            "botSessionId",
            "aId",
            "transferredType",
            "queueId",
            "callbackUrl",
            "expiresAt",
            "stray",
        ];
        proptest::collection::vec((proptest::sample::select(&KEYS[..]), json()), 0..10).prop_map(
            |pairs| {
                let mut map = Map::new();
                for (k, v) in pairs {
                    map.insert(k.to_owned(), v);
                }
                Value::Object(map)
            },
        )
    }

    fn check(result: &Result<Command, Box<Rejection>>) -> Result<(), TestCaseError> {
        match result {
            Ok(c) => {
                prop_assert!(!c.command_id.is_empty());
                prop_assert!(!c.org_id.trim().is_empty());
                prop_assert!(!c.bot_session_id.trim().is_empty());
                match &c.target {
                    Target::Agent(id) | Target::Queue(id) => {
                        prop_assert!(!id.trim().is_empty())
                    }
                }
            }
            Err(r) => {
                prop_assert!(!r.command_id.is_empty());
                prop_assert!(!r.message.is_empty());
                // Quoted input is cut, so a message fits an event and a header.
                prop_assert!(r.message.len() < 1024, "{} bytes", r.message.len());
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn any_bytes_with_any_envelope(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            env in envelope(),
        ) {
            check(&parser().parse(&body, &env).map(|v| v.command))?;
        }

        #[test]
        fn any_command_like_object_with_any_envelope(v in command_like(), env in envelope()) {
            let body = serde_json::to_vec(&v).unwrap();
            let result = parser().parse(&body, &env);
            check(&result.clone().map(|v| v.command))?;
            // A valid command's deadline is the earlier of the two, each computed without
            // overflow.
            if let (Ok(c), Some(ts)) = (&result, env.timestamp) {
                let by_age = SystemTime::UNIX_EPOCH
                    .checked_add(Duration::from_secs(ts))
                    .and_then(|t| t.checked_add(Duration::from_secs(300)));
                if let (Some(by_age), Some(deadline)) = (by_age, c.command.deadline) {
                    prop_assert!(deadline <= by_age);
                }
            }
        }

        #[test]
        fn every_envelope_of_a_valid_command_parses(env in envelope()) {
            let body = br#"{"orgId":"o","botSessionId":"s","aId":"a"}"#;
            let c = parser().parse(body, &env).unwrap();
            if let Some(id) = env.message_id.as_deref().filter(|id| !id.is_empty()) {
                prop_assert_eq!(&c.command.command_id, id);
            }
        }
    }

    /// Found while writing the properties above, kept as plain regressions.
    #[test]
    fn regressions() {
        let p = parser();
        let body = br#"{"orgId":"o","botSessionId":"s","aId":"a"}"#;
        for ts in [u64::MAX, (i64::MAX as u64) + 1] {
            let c = p
                .parse(
                    body,
                    &Envelope {
                        message_id: None,
                        timestamp: Some(ts),
                        replayed: false,
                        trace: Default::default(),
                    },
                )
                .unwrap();
            assert_eq!(
                c.command.deadline, None,
                "a timestamp at {ts} is no deadline"
            );
        }
        let huge = format!(
            r#"{{"orgId":"o","botSessionId":"s","aId":"a","streamId":"{}"}}"#,
            "x".repeat(40_000)
        );
        let r = p.parse(huge.as_bytes(), &Envelope::default()).unwrap_err();
        assert!(r.message.len() < 200, "{}", r.message);
        assert!(r.message.contains("40000 bytes"), "{}", r.message);
    }
}
