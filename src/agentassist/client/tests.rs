use super::*;

fn error(status: u16, body: Option<Value>) -> ApiError {
    ApiError {
        kind: ErrorKind::HttpStatus,
        status: Some(status),
        message: String::new(),
        body,
        retry_after: None,
        unsent: false,
    }
}

#[test]
fn statuses_are_classified() {
    for s in [408, 429, 500, 502, 503, 504] {
        assert!(error(s, None).is_transient(), "{s}");
    }
    for s in [400, 401, 403, 404, 409, 422] {
        assert!(!error(s, None).is_transient(), "{s}");
    }
    let limited = error(
        403,
        Some(serde_json::json!({"errors":[{"msg":"Rate limit exceeded"}]})),
    );
    assert!(limited.is_transient() && limited.is_rate_limited());
}

#[test]
fn retry_after_reads_seconds_and_dates() {
    assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
    let later = SystemTime::now() + Duration::from_secs(120);
    let d = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
    assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120));
    assert_eq!(parse_retry_after("soon"), None);
}

#[test]
fn retry_after_at_the_end_of_time_is_read_not_a_panic() {
    assert_eq!(
        parse_retry_after("18446744073709551615"),
        Some(Duration::from_secs(u64::MAX))
    );
    assert_eq!(parse_retry_after("18446744073709551616"), None);
    assert_eq!(parse_retry_after("-1"), None);
    assert_eq!(
        parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT").map(|d| d > Duration::ZERO),
        Some(true)
    );
}

/// Property tests at the edge where the API's answers enter: any status, any
/// `Retry-After`, any body is classified, and never panics.
mod props {
    use proptest::prelude::*;

    use super::*;

    fn retry_after() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            Just(u64::MAX.to_string()),
            Just("18446744073709551616".to_owned()),
            Just("Fri, 31 Dec 9999 23:59:59 GMT".to_owned()),
            Just("Thu, 01 Jan 1970 00:00:00 GMT".to_owned()),
            ".{0,40}",
        ])
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..2048),
            ".{0,200}".prop_map(String::into_bytes),
            Just(br#"{"errors":[{"msg":"Rate limit exceeded"}]}"#.to_vec()),
            Just(
                "{sessionId: 's', status: “transferred”}"
                    .as_bytes()
                    .to_vec()
            ),
            Just(vec![b'x'; MAX_ERROR_BODY * 2]),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn any_answer_is_classified(
            status in any::<u16>(),
            retry_after in retry_after(),
            body in body(),
            truncated in any::<bool>(),
        ) {
            match classify(status, retry_after.as_deref(), &body, truncated) {
                Ok(r) => {
                    prop_assert!((200..300).contains(&status));
                    prop_assert_eq!(r.truncated, truncated);
                    // The kept body is JSON: the body itself, or a string of it.
                    let v: Value = serde_json::from_str(r.body.get()).unwrap();
                    if truncated {
                        prop_assert!(v.is_string());
                    }
                }
                Err(e) => {
                    prop_assert!(!(200..300).contains(&status));
                    prop_assert_eq!(e.status, Some(status));
                    prop_assert_eq!(e.body.is_some(), !body.is_empty());
                    let kept = e.body.as_ref().map_or(0, |b| b.to_string().len());
                    // At most the cut, escaped: six bytes a byte at the very worst.
                    prop_assert!(kept <= MAX_ERROR_BODY * 6 + 2, "{kept}");
                    if matches!(status, 408 | 429 | 500..) {
                        prop_assert!(e.is_transient());
                    }
                    if let Some(n) = retry_after.as_deref().and_then(|v| v.trim().parse::<u64>().ok()) {
                        prop_assert_eq!(e.retry_after, Some(Duration::from_secs(n)));
                    }
                }
            }
        }

        #[test]
        fn any_retry_after_text_is_read_or_ignored(text in ".{0,64}") {
            let _ = parse_retry_after(&text);
        }
    }
}
