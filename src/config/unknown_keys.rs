//! Keys no setting reads — a typo such as `max_attemps` — are errors that name the key and
//! the layer it came from.

use std::path::Path;

use super::{ConfigError, Settings};

/// Every key of the merged layers must be a setting: a typo such as `max_attemps` would
/// otherwise be dropped in silence and its default applied. Names the first unknown key and
/// the layer it came from.
pub(super) fn reject_unknown_keys(
    merged: config::Config,
    file: Option<&Path>,
    env: Option<&std::collections::HashMap<String, String>>,
) -> Result<(), ConfigError> {
    let tree: serde_json::Value = merged.try_deserialize()?;
    let mut unknown = Vec::new();
    // Types were checked by the typed load before; only the ignored paths matter here.
    let _: Result<Settings, _> =
        serde_ignored::deserialize(tree, |path| unknown.push(path.to_string()));
    let Some(key) = unknown.into_iter().next() else {
        return Ok(());
    };
    // The variable that set the key, or a key below it (an unknown section).
    let var = format!("TRANSFER__{}", key.replace('.', "__").to_uppercase());
    let sets_key = |name: &str| {
        name.strip_prefix(var.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("__"))
    };
    let from_env = match env {
        Some(env) => env.keys().find(|name| sets_key(name)).cloned(),
        None => std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .find(|name| sets_key(name)),
    };
    let origin = match (from_env, file.filter(|f| file_has_key(f, &key))) {
        (Some(name), _) => format!("from environment variable {name}"),
        (None, Some(f)) => format!("in {}", f.display()),
        (None, None) => "in the built-in defaults".to_owned(),
    };
    Err(ConfigError::UnknownKey { key, origin })
}

/// Whether the TOML file sets this dotted key (array entries by index).
fn file_has_key(file: &Path, key: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(file) else {
        return false;
    };
    let Ok(mut at) = text.parse::<toml::Table>().map(toml::Value::Table) else {
        return false;
    };
    for part in key.split('.') {
        let next = match &at {
            toml::Value::Table(t) => t
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(part))
                .map(|(_, v)| v),
            toml::Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        };
        match next {
            Some(v) => at = v.clone(),
            None => return false,
        }
    }
    true
}
