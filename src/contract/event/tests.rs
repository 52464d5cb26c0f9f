use super::*;
use std::time::Duration;

#[test]
fn timestamps_are_utc_with_milliseconds() {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_064_800_007);
    assert_eq!(rfc3339_ms(t), "2025-11-25T10:00:00.007Z");
}

#[test]
fn timestamps_outside_four_digit_years_are_clamped_not_a_panic() {
    let far = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 4);
    assert_eq!(rfc3339_ms(far), "9999-12-31T23:59:59.999Z");
    let before = SystemTime::UNIX_EPOCH - Duration::from_secs(70_000 * 365 * 86_400);
    assert_eq!(rfc3339_ms(before), "0000-01-01T00:00:00.000Z");
}

#[test]
fn callback_ids_depend_on_token_and_body_only() {
    let a = callback_event_id("tok", b"{}");
    assert_eq!(a, callback_event_id("tok", b"{}"));
    assert_eq!(a.get_version_num(), 5);
    assert_ne!(a, callback_event_id("tok", b"{ }"));
    assert_ne!(a, callback_event_id("tok2", b"{}"));
}

#[test]
fn rejected_event_has_null_ids_it_could_not_read() {
    let r = Rejection {
        command_id: "c1".into(),
        stream_id: None,
        bot_session_id: None,
        target: None,
        message: "body is not valid JSON".into(),
    };
    let e = Event::rejected(&r, Some("m1"));
    let v: Value = serde_json::from_slice(&e.body).unwrap();
    assert_eq!(v["event"], "transfer.rejected");
    assert_eq!(v["eventId"], e.id.to_string());
    assert_eq!(v["commandId"], "c1");
    assert!(v["streamId"].is_null() && v["botSessionId"].is_null() && v["target"].is_null());
    assert_eq!(v["attempts"], 0);
    assert_eq!(v["messageId"], "m1");
    assert_eq!(
        v["error"],
        serde_json::json!({"kind":"invalid_command","message":"body is not valid JSON"})
    );
    assert_eq!(e.error.as_deref(), Some("body is not valid JSON"));
}
