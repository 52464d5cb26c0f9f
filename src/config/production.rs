//! What `transfer-worker run` refuses: a value shipped as an example, or a secret too short to
//! keep relay tokens from being forged. `config/default.toml` carries a demo bot and a demo
//! callback secret so that `demo`, `simulate` and the tests run without setup; anyone who has
//! read the repository knows them, so a worker that consumes real commands must never use
//! them. The examples are read from the compiled-in defaults themselves, so a change of the
//! shipped file cannot slip past this check.

use secrecy::ExposeSecret;

use super::{ConfigError, DEFAULT_TOML, Settings, invalid};

/// The shortest `callbacks.secret` the worker runs with: 256 bits, the size of the HMAC-SHA256
/// key it signs relay tokens with.
pub const MIN_CALLBACK_SECRET_BYTES: usize = 32;

/// The example values of the shipped defaults.
struct Examples {
    callback_secret: String,
    stream_ids: Vec<String>,
    bot_secrets: Vec<String>,
}

impl Examples {
    fn shipped() -> Self {
        let defaults: toml::Table =
            toml::from_str(DEFAULT_TOML).expect("the compiled-in defaults are valid TOML");
        let text = |v: Option<&toml::Value>| v.and_then(toml::Value::as_str).map(str::to_owned);
        let bots = defaults
            .get("bots")
            .and_then(toml::Value::as_array)
            .cloned()
            .unwrap_or_default();
        Self {
            callback_secret: text(defaults.get("callbacks").and_then(|c| c.get("secret")))
                .unwrap_or_default(),
            stream_ids: bots
                .iter()
                .filter_map(|b| text(b.get("stream_id")))
                .collect(),
            bot_secrets: (bots.iter())
                .filter_map(|b| text(b.get("client_secret")))
                .collect(),
        }
    }
}

impl Settings {
    /// Refuses, naming the key, settings that only an example or a test may run with: the
    /// shipped callback secret, or one shorter than [`MIN_CALLBACK_SECRET_BYTES`]; no bot but
    /// the shipped one; a bot whose secret is the shipped one.
    pub fn ready_for_production(&self) -> Result<(), ConfigError> {
        let examples = Examples::shipped();
        let secret = self.callbacks.secret.expose_secret();
        if secret == examples.callback_secret {
            return Err(invalid(
                "callbacks.secret",
                "is the example shipped in config/default.toml, which anyone can read; set your \
                 own (TRANSFER__CALLBACKS__SECRET), at least 32 random bytes",
            ));
        }
        if secret.len() < MIN_CALLBACK_SECRET_BYTES {
            return Err(invalid(
                "callbacks.secret",
                format!(
                    "is {} bytes; relay tokens need at least {MIN_CALLBACK_SECRET_BYTES} random \
                     bytes to be unforgeable",
                    secret.len()
                ),
            ));
        }
        if (self.bots.iter()).all(|b| examples.stream_ids.contains(&b.stream_id)) {
            return Err(invalid(
                "bots",
                "only the example bot of config/default.toml is configured; configure your own \
                 [[bots]] (see docs/configuration.md)",
            ));
        }
        for (i, bot) in self.bots.iter().enumerate() {
            let example = bot
                .client_secret
                .as_ref()
                .is_some_and(|s| examples.bot_secrets.iter().any(|e| e == s.expose_secret()));
            if example {
                return Err(invalid(
                    format!("bots[{i}].client_secret"),
                    format!(
                        "bot {} uses the example secret of config/default.toml; set its own \
                         (client_secret_file or client_secret_env)",
                        bot.stream_id
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;

    fn defaults() -> Settings {
        Settings::load_with_env(None, Some(Default::default())).unwrap()
    }

    /// Settings a production worker may run with: its own secret and its own bot.
    fn own() -> Settings {
        let mut s = defaults();
        s.callbacks.secret = SecretString::from("k".repeat(MIN_CALLBACK_SECRET_BYTES));
        s.bots[0].stream_id = "st-own".into();
        s.bots[0].client_secret = Some(SecretString::from("own-client-secret"));
        s
    }

    fn refused_key(s: &Settings) -> String {
        match s.ready_for_production() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn the_shipped_defaults_are_refused_naming_the_callback_secret() {
        assert_eq!(refused_key(&defaults()), "callbacks.secret");
    }

    #[test]
    fn own_values_pass() {
        own().ready_for_production().unwrap();
    }

    #[test]
    fn a_short_callback_secret_is_refused() {
        let mut s = own();
        s.callbacks.secret = SecretString::from("k".repeat(MIN_CALLBACK_SECRET_BYTES - 1));
        assert_eq!(refused_key(&s), "callbacks.secret");
    }

    #[test]
    fn only_the_example_bot_is_refused() {
        let mut s = own();
        s.bots[0].stream_id = defaults().bots[0].stream_id.clone();
        assert_eq!(refused_key(&s), "bots");
        // Beside a bot of its own, the example bot is still refused for its secret.
        let mut both = own();
        both.bots.push(defaults().bots[0].clone());
        assert_eq!(refused_key(&both), "bots[1].client_secret");
    }

    #[test]
    fn a_bot_with_the_example_secret_is_refused() {
        let mut s = own();
        s.bots[0].client_secret = defaults().bots[0].client_secret.clone();
        assert_eq!(refused_key(&s), "bots[0].client_secret");
    }
}
