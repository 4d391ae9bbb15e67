//! The optional `<name>.toml` beside `<name>.wasm`: limits, config and the
//! WASI capabilities the plugin is granted. Nothing is granted by default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(50);
pub const DEFAULT_MEMORY_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Longest a single call may run before it is interrupted.
    pub deadline: Duration,
    /// Largest linear memory (and table) a plugin instance may grow to.
    pub memory_bytes: usize,
    /// What `host.config(key)` answers.
    pub config: BTreeMap<String, String>,
    /// Environment variables passed through from the host, by name.
    pub env: Vec<String>,
    /// Host directories the plugin may read (and write, if not read-only).
    pub dirs: Vec<DirGrant>,
    /// Outbound network access.
    pub network: bool,
    /// Accepted for compatibility, no longer needed: a guest's stdout and
    /// stderr always go to the host log, line by line.
    pub stdio: bool,
    /// What a failing call does to the request.
    pub on_error: OnError,
}

/// What a failing plugin call does to its request (`on_error` in the
/// manifest). A plugin's deliberate refusal of a request (invalid
/// argument) always fails it; `Skip` is for the plugin failing (a trap, a
/// timeout, out of memory, an internal error), as Envoy's fail-open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// The request fails with the plugin's error (the default).
    #[default]
    Fail,
    /// The request goes on as if the plugin were absent; counted and logged.
    Skip,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirGrant {
    pub host: PathBuf,
    pub guest: String,
    #[serde(default = "yes")]
    pub read_only: bool,
}

fn yes() -> bool {
    true
}

impl Default for Manifest {
    fn default() -> Manifest {
        Manifest {
            deadline: DEFAULT_DEADLINE,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            config: BTreeMap::new(),
            env: Vec::new(),
            dirs: Vec::new(),
            network: false,
            stdio: false,
            on_error: OnError::Fail,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    on_error: OnError,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    config: BTreeMap<String, toml::Value>,
    #[serde(default)]
    capabilities: RawCapabilities,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    deadline_ms: Option<u64>,
    memory_mib: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCapabilities {
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    dirs: Vec<DirGrant>,
    #[serde(default)]
    network: bool,
    #[serde(default)]
    stdio: bool,
}

impl Manifest {
    /// Whether the plugin is granted something whose WASI calls can block
    /// (preopened directories, the network).
    pub fn may_block(&self) -> bool {
        !self.dirs.is_empty() || self.network
    }

    /// Reads `path` if it exists; a missing manifest means the defaults. Blocking.
    pub fn load(path: &Path) -> Result<Manifest, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Manifest::parse(path, &text),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
            Err(err) => Err(format!("{}: cannot read: {err}", path.display())),
        }
    }

    pub fn parse(path: &Path, text: &str) -> Result<Manifest, String> {
        let raw: RawManifest =
            toml::from_str(text).map_err(|err| format!("{}: {}", path.display(), err.message()))?;
        let mut manifest = Manifest::default();
        if let Some(ms) = raw.limits.deadline_ms {
            if ms == 0 {
                return Err(format!(
                    "{}: limits.deadline_ms: must be 1 or more",
                    path.display()
                ));
            }
            manifest.deadline = Duration::from_millis(ms);
        }
        if let Some(mib) = raw.limits.memory_mib {
            if mib == 0 || mib > 4096 {
                return Err(format!(
                    "{}: limits.memory_mib: must be 1..=4096, got {mib}",
                    path.display()
                ));
            }
            manifest.memory_bytes = (mib as usize) << 20;
        }
        for (key, value) in raw.config {
            flatten_config(&mut manifest.config, key, value);
        }
        manifest.env = raw.capabilities.env;
        manifest.dirs = raw.capabilities.dirs;
        manifest.network = raw.capabilities.network;
        manifest.stdio = raw.capabilities.stdio;
        manifest.on_error = raw.on_error;
        Ok(manifest)
    }
}

/// Plugins read string values by key. Numbers and booleans are written as
/// TOML shows them, arrays joined with commas, and nested tables become
/// dotted keys (`[config.weights] resnet = ".."` is `weights.resnet`).
fn flatten_config(out: &mut BTreeMap<String, String>, key: String, value: toml::Value) {
    let text = match value {
        toml::Value::String(s) => s,
        toml::Value::Array(items) => items
            .iter()
            .map(|item| match item {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(","),
        toml::Value::Table(table) => {
            for (sub, value) in table {
                flatten_config(out, format!("{key}.{sub}"), value);
            }
            return;
        }
        other => other.to_string(),
    };
    out.insert(key, text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_parse_with_defaults_and_precise_errors() {
        let path = Path::new("p/x.toml");
        assert_eq!(Manifest::parse(path, "").unwrap(), Manifest::default());
        let m = Manifest::parse(
            path,
            "[limits]\ndeadline_ms = 5\nmemory_mib = 8\n[config]\nk = 3\nmean = [0.5, 0.25]\nname = \"a\"\nweights.resnet = \"1=9\"\n[capabilities]\nenv = [\"HOME\"]\n",
        )
        .unwrap();
        assert_eq!(m.deadline, Duration::from_millis(5));
        assert_eq!(m.memory_bytes, 8 << 20);
        assert_eq!(m.config["k"], "3");
        assert_eq!(m.config["mean"], "0.5,0.25");
        assert_eq!(m.config["name"], "a");
        assert_eq!(m.config["weights.resnet"], "1=9");
        assert_eq!(m.env, ["HOME"]);
        assert_eq!(
            Manifest::parse(path, "[limits]\nmemory_mib = 0\n").unwrap_err(),
            "p/x.toml: limits.memory_mib: must be 1..=4096, got 0"
        );
        assert!(
            Manifest::parse(path, "[limits]\ntimeout = 1\n")
                .unwrap_err()
                .starts_with("p/x.toml: unknown field `timeout`")
        );
    }
}
