//! Bodies that come from outside — the API's answers, callbacks, replies — kept as JSON when
//! they are JSON, else as a JSON string of their text, so an event can always carry them.

use serde_json::Value;
use serde_json::value::RawValue;

/// The body as a JSON value if it parses, else a string of its text (invalid UTF-8 replaced).
pub fn value_or_string(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(lossy(bytes)))
}

/// The body verbatim if it is `whole` JSON (never re-encoded); else (not JSON, or cut short)
/// a JSON string of its text.
pub fn raw_or_string(bytes: &[u8], whole: bool) -> Box<RawValue> {
    let raw = whole
        .then(|| std::str::from_utf8(bytes).ok())
        .flatten()
        .and_then(|text| RawValue::from_string(text.trim().to_owned()).ok());
    match raw {
        Some(raw) => raw,
        None => RawValue::from_string(Value::String(lossy(bytes)).to_string())
            .expect("a JSON string is valid JSON"),
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_kept_and_anything_else_becomes_a_string() {
        assert_eq!(value_or_string(br#"{"a":1}"#), serde_json::json!({"a": 1}));
        assert_eq!(value_or_string(b"ok"), Value::String("ok".into()));
        assert_eq!(raw_or_string(b" {\"a\" : 1} ", true).get(), "{\"a\" : 1}");
        assert_eq!(raw_or_string(b"{\"a\"", false).get(), "\"{\\\"a\\\"\"");
        assert_eq!(
            raw_or_string(b"{\"a\":1}", false).get(),
            "\"{\\\"a\\\":1}\""
        );
    }
}
