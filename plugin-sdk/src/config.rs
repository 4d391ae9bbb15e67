//! Reading the plugin's configuration.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::str::FromStr;

use crate::{PluginError, Result};

/// The configuration the operator set for this plugin: string keys to string
/// values.
///
/// A plugin gets one in [`Plugin::init`](crate::Plugin::init). Parse errors
/// come back as [`PluginError::Unavailable`] naming the key, the value and
/// the expected type, so a plugin can pass them on with `?` and the host
/// refuses the plugin with a message the operator can act on.
///
/// In native unit tests, build one with [`Config::from_pairs`].
#[derive(Debug, Clone)]
pub struct Config {
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    Host,
    Map(BTreeMap<String, String>),
}

impl Config {
    /// The configuration held by the host. Outside WebAssembly there is no
    /// host, and every key reads as unset.
    pub fn host() -> Config {
        Config {
            source: Source::Host,
        }
    }

    /// A configuration made of `pairs`, for tests.
    pub fn from_pairs<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Config
    where
        K: Into<String>,
        V: Into<String>,
    {
        let map = pairs
            .into_iter()
            .map(|(key, value)| (key.into(), value.into()))
            .collect();
        Config {
            source: Source::Map(map),
        }
    }

    /// The raw value of `key`, or `None` when it is not set.
    pub fn get(&self, key: &str) -> Option<String> {
        match &self.source {
            Source::Host => host_config(key),
            Source::Map(map) => map.get(key).cloned(),
        }
    }

    /// The value of `key` parsed as `T` (surrounding whitespace ignored), or
    /// `None` when it is not set.
    pub fn parse<T>(&self, key: &str) -> Result<Option<T>>
    where
        T: FromStr,
        T::Err: Display,
    {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        parse_value(key, value.trim()).map(Some)
    }

    /// The value of `key` parsed as `T`, or `default` when it is not set.
    pub fn parse_or<T>(&self, key: &str, default: T) -> Result<T>
    where
        T: FromStr,
        T::Err: Display,
    {
        Ok(self.parse(key)?.unwrap_or(default))
    }

    /// The value of `key` parsed as `T`; an error when it is not set.
    pub fn require<T>(&self, key: &str) -> Result<T>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.parse(key)?.ok_or_else(|| {
            PluginError::unavailable(format!("config key `{key}` is required but not set"))
        })
    }

    /// The value of `key` as a comma-separated list, each item trimmed and
    /// parsed as `T`, or `None` when the key is not set. An empty value is an
    /// empty list; an empty item (`a,,b`) is an error.
    pub fn parse_list<T>(&self, key: &str) -> Result<Option<Vec<T>>>
    where
        T: FromStr,
        T::Err: Display,
    {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        if value.trim().is_empty() {
            return Ok(Some(Vec::new()));
        }
        let mut items = Vec::new();
        for (item_idx, item) in value.split(',').enumerate() {
            let item = item.trim();
            if item.is_empty() {
                return Err(PluginError::unavailable(format!(
                    "config key `{key}`: item {item_idx} of `{value}` is empty"
                )));
            }
            items.push(parse_value(key, item)?);
        }
        Ok(Some(items))
    }
}

fn parse_value<T>(key: &str, value: &str) -> Result<T>
where
    T: FromStr,
    T::Err: Display,
{
    value.parse().map_err(|err| {
        PluginError::unavailable(format!(
            "config key `{key}`: cannot parse `{value}` as {}: {err}",
            short_type_name::<T>()
        ))
    })
}

/// `f32` for `f32`, `String` for `alloc::string::String`.
fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(target_arch = "wasm32")]
fn host_config(key: &str) -> Option<String> {
    crate::bindings::common::plinth::plugin::host::config(key)
}

#[cfg(not(target_arch = "wasm32"))]
fn host_config(_key: &str) -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_values_and_lists() {
        let config = Config::from_pairs([("k", " 5 "), ("mean", "0.5, 0.25,1"), ("empty", "")]);
        assert_eq!(config.parse::<u32>("k").unwrap(), Some(5));
        assert_eq!(config.parse::<u32>("missing").unwrap(), None);
        assert_eq!(config.parse_or("missing", 7u32).unwrap(), 7);
        assert_eq!(
            config.parse_list::<f32>("mean").unwrap(),
            Some(vec![0.5, 0.25, 1.0])
        );
        assert_eq!(config.parse_list::<f32>("empty").unwrap(), Some(vec![]));
    }

    #[test]
    fn errors_name_key_value_and_type() {
        let config = Config::from_pairs([("k", "five"), ("list", "1,,2")]);
        let err = config.parse::<u32>("k").unwrap_err();
        assert_eq!(
            err.message(),
            "config key `k`: cannot parse `five` as u32: invalid digit found in string"
        );
        assert!(matches!(err, PluginError::Unavailable(_)));
        let err = config.parse_list::<u32>("list").unwrap_err();
        assert_eq!(
            err.message(),
            "config key `list`: item 1 of `1,,2` is empty"
        );
        let err = config.require::<String>("absent").unwrap_err();
        assert_eq!(err.message(), "config key `absent` is required but not set");
    }
}
