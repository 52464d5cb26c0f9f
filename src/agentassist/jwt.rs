//! AgentAssist credentials: HS256 JWTs with `appId` = client id, signed with the client secret,
//! minted in-process and reused while valid (agentassist-api.md, "The JWT").

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

/// Why no token could be minted.
#[derive(Debug, thiserror::Error)]
#[error("cannot sign the AgentAssist token: {0}")]
pub struct TokenError(#[from] jsonwebtoken::errors::Error);

#[derive(Serialize)]
struct Claims<'a> {
    #[serde(rename = "appId")]
    app_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
}

/// A token ready to send, kept out of `Debug` output.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl Token {
    /// The header value. Call sites must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token([redacted])")
    }
}

/// Mints and caches the tokens of one JWT app.
pub struct TokenSource {
    client_id: String,
    key: EncodingKey,
    ttl: Option<Duration>,
    unique_jti: bool,
    cached: RwLock<Option<(Token, Option<Instant>)>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("client_id", &self.client_id)
            .field("ttl", &self.ttl)
            .field("unique_jti", &self.unique_jti)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// `ttl`: tokens carry `iat`/`exp` and are replaced after 80 % of it. `unique_jti`: every
    /// call gets a fresh token with its own `jti`, since apps that check `jti` reject a reuse.
    pub fn new(
        client_id: String,
        secret: &SecretString,
        ttl: Option<Duration>,
        unique_jti: bool,
    ) -> Self {
        Self {
            client_id,
            key: EncodingKey::from_secret(secret.expose_secret().as_bytes()),
            ttl,
            unique_jti,
            cached: RwLock::new(None),
        }
    }

    /// A valid token: the cached one, or a new one.
    pub fn token(&self) -> Result<Token, TokenError> {
        if !self.unique_jti {
            let now = Instant::now();
            let cached = self.cached.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((token, refresh_at)) = &*cached
                && refresh_at.is_none_or(|at| now < at)
            {
                return Ok(token.clone());
            }
        }
        let token = self.mint()?;
        if !self.unique_jti {
            // No refresh time past what an Instant holds: refresh on every call instead.
            let now = Instant::now();
            let refresh_at = self
                .ttl
                .map(|ttl| now.checked_add(ttl.mul_f64(0.8)).unwrap_or(now));
            *self.cached.write().unwrap_or_else(PoisonError::into_inner) =
                Some((token.clone(), refresh_at));
        }
        Ok(token)
    }

    /// Forgets the cached token, after the API refused it.
    pub fn invalidate(&self) {
        *self.cached.write().unwrap_or_else(PoisonError::into_inner) = None;
    }

    fn mint(&self) -> Result<Token, TokenError> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            app_id: &self.client_id,
            iat: self.ttl.map(|_| now),
            exp: self.ttl.map(|ttl| now.saturating_add(ttl.as_secs().max(1))),
            jti: self.unique_jti.then(|| uuid::Uuid::new_v4().to_string()),
        };
        let jwt = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)?;
        Ok(Token(jwt.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation, decode};

    fn claims(token: &Token, secret: &str) -> serde_json::Value {
        let mut v = Validation::new(Algorithm::HS256);
        v.required_spec_claims.clear();
        v.validate_exp = false;
        decode::<serde_json::Value>(
            token.expose(),
            &DecodingKey::from_secret(secret.as_bytes()),
            &v,
        )
        .unwrap()
        .claims
    }

    #[test]
    fn token_is_hs256_with_app_id_and_cached() {
        let src = TokenSource::new("cs-1".into(), &SecretString::from("s3cret"), None, false);
        let a = src.token().unwrap();
        assert_eq!(claims(&a, "s3cret"), serde_json::json!({"appId": "cs-1"}));
        let b = src.token().unwrap();
        assert!(
            Arc::ptr_eq(&a.0, &b.0),
            "second call must reuse the cached token"
        );
        src.invalidate();
        let c = src.token().unwrap();
        assert!(!Arc::ptr_eq(&a.0, &c.0));
        assert!(!format!("{a:?}{src:?}").contains(a.expose()));
    }

    #[test]
    fn ttl_adds_iat_and_exp_and_jti_is_unique() {
        let src = TokenSource::new(
            "cs-1".into(),
            &SecretString::from("k"),
            Some(Duration::from_secs(3600)),
            true,
        );
        let a = claims(&src.token().unwrap(), "k");
        let b = claims(&src.token().unwrap(), "k");
        assert_eq!(
            a["exp"].as_u64().unwrap() - a["iat"].as_u64().unwrap(),
            3600
        );
        assert_ne!(a["jti"], b["jti"]);
    }
}
