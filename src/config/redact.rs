//! What is shown of the settings (`transfer-worker config`, logs): secrets and the passwords
//! in URLs replaced by a placeholder.

use secrecy::SecretString;

use super::Settings;

/// What is shown in place of a secret.
const REDACTED: &str = "[redacted]";

/// A secret, shown as the placeholder.
pub(super) fn redact<S: serde::Serializer>(_: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(REDACTED)
}

/// A secret if set, shown as the placeholder.
pub(super) fn redact_opt<S: serde::Serializer>(
    v: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str(REDACTED),
        None => s.serialize_none(),
    }
}

/// Secrets, each shown as the placeholder.
pub(super) fn redact_vec<S: serde::Serializer>(
    v: &[SecretString],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for _ in v {
        seq.serialize_element(REDACTED)?;
    }
    seq.end()
}

/// The URL with its passwords replaced, for logs and `transfer-worker config`: the one in its
/// user part, and a Sentinel URL's `sentinel_password` parameter.
pub fn redact_url(url: &str) -> String {
    let (url, query) = match url.split_once('?') {
        Some((url, query)) => (url, Some(query)),
        None => (url, None),
    };
    let mut shown = redact_userinfo(url);
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.ends_with("password") => format!("{key}={REDACTED}"),
                _ => pair.to_owned(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&pairs.join("&"));
    }
    shown
}

fn redact_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:{REDACTED}{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl Settings {
    /// The effective configuration as TOML, secrets and the broker password redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.amqp.url = redact_url(&shown.amqp.url);
        shown.amqp.urls = shown.amqp.urls.iter().map(|u| redact_url(u)).collect();
        shown.fleet.redis_url = redact_url(&shown.fleet.redis_url);
        toml::to_string(&shown).expect("settings serialize to TOML")
    }
}
