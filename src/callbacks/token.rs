//! Relay tokens and URLs: the token is the last path segment of the callback URL handed to
//! AgentAssist. It carries the command's ids and an HMAC-SHA256 over them, so any worker
//! holding the secret can relay any callback, after restarts too, with no shared state.
//!
//! Format: `base64url(json ids) "." base64url(hmac)`, unpadded, URL-safe. The ids include the
//! token's expiry (`e`, seconds since the epoch): after `callbacks.token_ttl` a token is
//! refused like a forged one.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::time::{Duration, SystemTime};

use crate::contract::{Command, Target};

/// The ids a callback is correlated by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackIds {
    /// Command id.
    #[serde(rename = "c")]
    pub command_id: String,
    /// Bot id.
    #[serde(rename = "s")]
    pub stream_id: String,
    /// Session id.
    #[serde(rename = "b")]
    pub bot_session_id: String,
    /// Target.
    #[serde(rename = "t")]
    pub target: Target,
}

impl From<&Command> for CallbackIds {
    fn from(c: &Command) -> Self {
        Self {
            command_id: c.command_id.clone(),
            stream_id: c.stream_id.clone(),
            bot_session_id: c.bot_session_id.clone(),
            target: c.target.clone(),
        }
    }
}

/// What a token carries: the ids and when it stops being valid.
#[derive(Serialize)]
struct Claims<'a> {
    #[serde(flatten)]
    ids: &'a CallbackIds,
    /// Expiry, whole seconds since the epoch.
    e: u64,
}

/// [`Claims`], read back.
#[derive(Deserialize)]
struct ReadClaims {
    #[serde(flatten)]
    ids: CallbackIds,
    e: u64,
}

/// Signs with the current secret; verifies with it and with earlier ones during a rotation.
/// Keys are derived once; each signature starts from a copy of the keyed state.
#[derive(Clone)]
pub struct TokenSigner {
    current: Hmac<Sha256>,
    previous: Vec<Hmac<Sha256>>,
    ttl: Duration,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner([redacted])")
    }
}

fn keyed(secret: &SecretString) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
        .expect("HMAC takes keys of any length")
}

fn mac(key: &Hmac<Sha256>, data: &[u8]) -> Hmac<Sha256> {
    let mut mac = key.clone();
    mac.update(data);
    mac
}

impl TokenSigner {
    /// `current` signs; `previous` only verify; tokens are valid for `ttl` after signing.
    pub fn new(current: SecretString, previous: Vec<SecretString>, ttl: Duration) -> Self {
        Self {
            current: keyed(&current),
            previous: previous.iter().map(keyed).collect(),
            ttl,
        }
    }

    /// A token for these ids, valid for the signer's ttl from now.
    pub fn sign(&self, ids: &CallbackIds) -> String {
        self.sign_at(ids, SystemTime::now())
    }

    /// The ids, if the token was signed by one of our secrets, is intact and has not expired.
    pub fn verify(&self, token: &str) -> Option<CallbackIds> {
        self.verify_at(token, SystemTime::now())
    }

    /// [`TokenSigner::sign`] as if the time were `now`.
    pub fn sign_at(&self, ids: &CallbackIds, now: SystemTime) -> String {
        let expires = epoch_secs(now).saturating_add(self.ttl.as_secs());
        let claims = Claims { ids, e: expires };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("ids serialize"));
        let tag = mac(&self.current, payload.as_bytes())
            .finalize()
            .into_bytes();
        let mut token = payload;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(tag, &mut token);
        token
    }

    /// [`TokenSigner::verify`] as if the time were `now`.
    pub fn verify_at(&self, token: &str, now: SystemTime) -> Option<CallbackIds> {
        let (payload, tag) = token.split_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let signed = std::iter::once(&self.current)
            .chain(&self.previous)
            // verify_slice compares in constant time.
            .any(|key| mac(key, payload.as_bytes()).verify_slice(&tag).is_ok());
        if !signed {
            return None;
        }
        let json = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let claims: ReadClaims = serde_json::from_slice(&json).ok()?;
        (epoch_secs(now) < claims.e).then_some(claims.ids)
    }
}

fn epoch_secs(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where AgentAssist should post callbacks for commands that bring no `callbackUrl`.
#[derive(Debug, Clone)]
pub struct RelayUrls {
    base: String,
    signer: TokenSigner,
}

impl RelayUrls {
    /// `{public_url}/callbacks/{token}`.
    pub fn new(public_url: &str, signer: TokenSigner) -> Self {
        Self {
            base: format!("{}/callbacks/", public_url.trim_end_matches('/')),
            signer,
        }
    }

    /// The URL for one command.
    pub fn url(&self, command: &Command) -> String {
        let mut url = self.base.clone();
        url.push_str(&self.signer.sign(&CallbackIds::from(command)));
        url
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> CallbackIds {
        CallbackIds {
            command_id: "c-1".into(),
            stream_id: "st-1".into(),
            bot_session_id: "s-1".into(),
            target: Target::Queue("qu-1".into()),
        }
    }

    const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

    fn signer(secret: &str) -> TokenSigner {
        TokenSigner::new(SecretString::from(secret), vec![], WEEK)
    }

    #[test]
    fn tokens_expire_after_their_ttl() {
        let s = signer("k1-0123456789abcdef");
        let issued = SystemTime::now();
        let token = s.sign_at(&ids(), issued);
        let almost = issued + WEEK - Duration::from_secs(2);
        assert_eq!(s.verify_at(&token, almost), Some(ids()));
        assert_eq!(
            s.verify_at(&token, issued + WEEK + Duration::from_secs(1)),
            None
        );
    }

    #[test]
    fn a_signed_token_without_expiry_is_refused() {
        // As an earlier version signed them: ids only.
        let s = signer("k1-0123456789abcdef");
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&ids()).unwrap());
        let tag = mac(&s.current, payload.as_bytes()).finalize().into_bytes();
        let token = format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag));
        assert_eq!(s.verify(&token), None);
    }

    #[test]
    fn signed_tokens_verify_and_carry_the_ids() {
        let s = signer("k1-0123456789abcdef");
        let token = s.sign(&ids());
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        );
        assert_eq!(s.verify(&token), Some(ids()));
    }

    #[test]
    fn forged_tampered_and_truncated_tokens_fail() {
        let s = signer("k1-0123456789abcdef");
        let token = s.sign(&ids());
        assert_eq!(signer("other-secret-000000").verify(&token), None);
        let (payload, tag) = token.split_once('.').unwrap();
        let mut other = ids();
        other.command_id = "c-2".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&other).unwrap());
        assert_eq!(s.verify(&format!("{forged_payload}.{tag}")), None);
        assert_eq!(s.verify(&token[..token.len() - 2]), None);
        assert_eq!(s.verify(payload), None);
        assert_eq!(s.verify(""), None);
    }

    #[test]
    fn previous_secrets_verify_but_do_not_sign() {
        let old = signer("old-secret-0123456789");
        let token = old.sign(&ids());
        let rotated = TokenSigner::new(
            SecretString::from("new-secret-0123456789"),
            vec![SecretString::from("old-secret-0123456789")],
            WEEK,
        );
        assert_eq!(rotated.verify(&token), Some(ids()));
        assert_eq!(old.verify(&rotated.sign(&ids())), None);
    }

    /// Property tests at the relay's door: any string is refused unless we signed it.
    mod props {
        use proptest::prelude::*;

        use super::*;

        fn any_ids() -> impl Strategy<Value = CallbackIds> {
            (".{0,40}", ".{0,40}", ".{0,40}", ".{1,40}", any::<bool>()).prop_map(
                |(c, s, b, t, agent)| CallbackIds {
                    command_id: c,
                    stream_id: s,
                    bot_session_id: b,
                    target: if agent {
                        Target::Agent(t)
                    } else {
                        Target::Queue(t)
                    },
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            #[test]
            fn any_string_is_refused(token in ".{0,300}") {
                prop_assert_eq!(signer("k1-0123456789abcdef").verify(&token), None);
            }

            #[test]
            fn any_string_shaped_like_a_token_is_refused(
                payload in "[A-Za-z0-9_-]{0,200}",
                tag in "[A-Za-z0-9_-]{0,60}",
            ) {
                let token = format!("{payload}.{tag}");
                prop_assert_eq!(signer("k1-0123456789abcdef").verify(&token), None);
            }

            #[test]
            fn signed_ids_round_trip_and_any_one_byte_change_is_refused(
                ids in any_ids(),
                at in any::<prop::sample::Index>(),
                with in "[A-Za-z0-9_.-]",
            ) {
                let s = signer("k1-0123456789abcdef");
                let token = s.sign(&ids);
                prop_assert_eq!(s.verify(&token), Some(ids));
                let i = at.index(token.len());
                let mut changed = token.clone();
                changed.replace_range(i..=i, &with);
                if changed != token {
                    prop_assert_eq!(s.verify(&changed), None);
                }
            }
        }
    }
}
