//! Legacy: relay tokens of the format signed before relay tokens became JWTs,
//! `base64url(json ids and expiry) "." base64url(HMAC-SHA256)`, unpadded. Only verified, never
//! signed, so the relay URLs handed out before the upgrade keep working until they expire.
//!
//! When to delete this file (and its one call in [`super::TokenSigner::verify_at`]): once every
//! replica has signed JWTs for longer than the largest `callbacks.token_ttl` in force before the
//! upgrade (7 days by default). Every token of this format has expired by then, since each
//! carries its own expiry, at most that ttl after it was signed (docs/relay-tokens.md).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::Sha256;

use super::{CallbackIds, TokenError};

/// What a legacy token carries: the ids and its expiry (`e`, seconds since the epoch).
#[derive(Deserialize)]
struct Claims {
    #[serde(flatten)]
    ids: CallbackIds,
    e: u64,
}

/// Verifies legacy tokens with the current secret and the previous ones, as before.
#[derive(Clone)]
pub(super) struct LegacyVerifier {
    /// Keyed once; each check starts from a copy of the keyed state.
    keys: Vec<Hmac<Sha256>>,
}

fn keyed(secret: &SecretString) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
        .expect("HMAC takes keys of any length")
}

impl LegacyVerifier {
    /// Verifies with each of `secrets`.
    pub(super) fn new<'a>(secrets: impl IntoIterator<Item = &'a SecretString>) -> Self {
        Self {
            keys: secrets.into_iter().map(keyed).collect(),
        }
    }

    /// The ids, if one of the secrets signed `token` and `now` (seconds since the epoch) is
    /// before its expiry.
    pub(super) fn verify_at(&self, token: &str, now: u64) -> Result<CallbackIds, TokenError> {
        let (payload, tag) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        let signed = self.keys.iter().any(|key| {
            let mut mac = key.clone();
            mac.update(payload.as_bytes());
            // verify_slice compares in constant time.
            mac.verify_slice(&tag).is_ok()
        });
        if !signed {
            return Err(TokenError::Invalid);
        }
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        // An earlier version signed tokens without `e`: they fail here, as they did before.
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if now < claims.e {
            Ok(claims.ids)
        } else {
            Err(TokenError::Expired)
        }
    }
}

/// A legacy token, as the worker signed them before JWTs, for the tests of the upgrade; `e`
/// `None` gives a token of the earliest version, without expiry.
#[cfg(test)]
pub(super) fn sign(secret: &str, ids: &CallbackIds, e: Option<u64>) -> String {
    let mut claims = serde_json::to_value(ids).expect("ids serialize");
    if let Some(e) = e {
        claims["e"] = e.into();
    }
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("JSON serializes"));
    let mut mac = keyed(&SecretString::from(secret));
    mac.update(payload.as_bytes());
    format!(
        "{payload}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}
