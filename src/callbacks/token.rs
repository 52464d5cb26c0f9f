//! Relay tokens and URLs: the token is the last path segment of the callback URL handed to
//! AgentAssist. It carries the command's ids, signed, so any worker holding the secret can
//! relay any callback, after restarts too, with no shared state.
//!
//! A token is a JWT, HS256 (HMAC-SHA256) under `callbacks.secret`: its claims are the ids and
//! `exp`, `callbacks.token_ttl` after signing; its header's `kid` names the secret that signed
//! it, so secrets can rotate (`callbacks.previous_secrets` still verify) and the relay picks
//! the key rather than trying each. A JWT is base64url and dots, so it stays one URL-safe path
//! segment. Tokens of the format before JWTs are honoured until they expire (`legacy`). The
//! format, rotation and the upgrade: docs/relay-tokens.md.

mod legacy;

use std::time::{Duration, SystemTime};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::contract::{Command, Target};

use legacy::LegacyVerifier;

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

/// Why a token was refused. The relay answers each the same 404, so a caller learns nothing;
/// the reason is for the relay's debug log (say, a previous secret dropped too early).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not shaped like a token of either format.
    #[error("not a relay token")]
    Malformed,
    /// No `kid`, or one that names none of this worker's secrets.
    #[error("signed with a key this worker does not hold")]
    UnknownKey,
    /// A bad signature, an algorithm other than HS256, or no `exp`.
    #[error("bad signature, algorithm or claims")]
    Invalid,
    /// Past its expiry.
    #[error("expired")]
    Expired,
}

/// The claims of a token: the ids and when it stops being valid.
#[derive(Serialize)]
struct Claims<'a> {
    #[serde(flatten)]
    ids: &'a CallbackIds,
    /// Expiry, whole seconds since the epoch.
    exp: u64,
}

/// [`Claims`], read back.
#[derive(Deserialize)]
struct ReadClaims {
    #[serde(flatten)]
    ids: CallbackIds,
    exp: u64,
}

/// Hashed before the secret, so a kid is no plain hash of the secret that another system
/// might also publish.
const KID_LABEL: &[u8] = b"transfer-worker relay token kid\n";

/// The `kid` of a secret: the first 8 hex digits of SHA-256 over [`KID_LABEL`] and the secret.
/// Derived, so rotating needs no new key in the configuration; 32 bits of a hash say nothing
/// usable about a secret of at least 16 bytes.
fn kid(secret: &SecretString) -> String {
    let digest = Sha256::new()
        .chain_update(KID_LABEL)
        .chain_update(secret.expose_secret().as_bytes())
        .finalize();
    format!(
        "{:08x}",
        u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
    )
}

/// One secret that verifies, under its kid.
#[derive(Clone)]
struct VerifyingKey {
    kid: String,
    key: DecodingKey,
}

/// Signs with the current secret; verifies with it and with earlier ones during a rotation.
/// Keys are derived once.
#[derive(Clone)]
pub struct TokenSigner {
    /// The current secret's kid, in every token signed.
    kid: String,
    signing: EncodingKey,
    /// The current secret first, then the previous ones.
    verifying: Vec<VerifyingKey>,
    /// HS256 only, `exp` required, no leeway.
    validation: Validation,
    legacy: LegacyVerifier,
    ttl: Duration,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner([redacted])")
    }
}

impl TokenSigner {
    /// `current` signs; `previous` only verify; tokens are valid for `ttl` after signing.
    pub fn new(current: SecretString, previous: Vec<SecretString>, ttl: Duration) -> Self {
        let secrets = || std::iter::once(&current).chain(&previous);
        let verifying = secrets()
            .map(|secret| VerifyingKey {
                kid: kid(secret),
                key: DecodingKey::from_secret(secret.expose_secret().as_bytes()),
            })
            .collect();
        // Pinned to HS256, so a header naming another algorithm (`none`, RS256 with the
        // secret as a "public key", HS384) is refused before any key is used.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        // The contract allows no grace after `callbacks.token_ttl`; the library's default is
        // 60 s.
        validation.leeway = 0;
        Self {
            kid: kid(&current),
            signing: EncodingKey::from_secret(current.expose_secret().as_bytes()),
            verifying,
            validation,
            legacy: LegacyVerifier::new(secrets()),
            ttl,
        }
    }

    /// A token for these ids, valid for the signer's ttl from now.
    pub fn sign(&self, ids: &CallbackIds) -> String {
        self.sign_at(ids, SystemTime::now())
    }

    /// The ids, if the token was signed by one of our secrets, is intact and has not expired.
    pub fn verify(&self, token: &str) -> Result<CallbackIds, TokenError> {
        self.verify_at(token, SystemTime::now())
    }

    /// [`TokenSigner::sign`] as if the time were `now`.
    pub fn sign_at(&self, ids: &CallbackIds, now: SystemTime) -> String {
        let claims = Claims {
            ids,
            exp: epoch_secs(now).saturating_add(self.ttl.as_secs()),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.signing)
            .expect("an HMAC over claims of strings and a number cannot fail")
    }

    /// [`TokenSigner::verify`] as if the time were `now`.
    pub fn verify_at(&self, token: &str, now: SystemTime) -> Result<CallbackIds, TokenError> {
        let now = epoch_secs(now);
        // base64url has no dots: a JWT has two, a legacy token one.
        match token.bytes().filter(|&b| b == b'.').count() {
            2 => self.verify_jwt(token, now),
            1 => self.legacy.verify_at(token, now),
            _ => Err(TokenError::Malformed),
        }
    }

    fn verify_jwt(&self, token: &str, now: u64) -> Result<CallbackIds, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let mut refused = TokenError::UnknownKey;
        // Two secrets may share a kid (one chance in 2^32): each is tried.
        for key in self.verifying.iter().filter(|key| key.kid == kid) {
            // The library also checks `exp` against the system clock; `now` is checked after,
            // so `verify_at` means what it says in tests.
            match jsonwebtoken::decode::<ReadClaims>(token, &key.key, &self.validation) {
                Ok(data) if now < data.claims.exp => return Ok(data.claims.ids),
                Ok(_) => return Err(TokenError::Expired),
                Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => {
                    return Err(TokenError::Expired);
                }
                Err(_) => refused = TokenError::Invalid,
            }
        }
        Err(refused)
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
mod tests;
