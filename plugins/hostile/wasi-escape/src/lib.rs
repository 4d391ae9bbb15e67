//! Test fixture: a processor that tries WASI capabilities the host should
//! not grant.
//!
//! `preprocess` probes the file system, the environment and the network,
//! then returns one `bytes` tensor named `wasi_report` with one line per
//! probe: `<probe>: denied (<error>)` or `<probe>: ALLOWED (<what it got>)`.
//! When any probe was allowed it returns an `internal` error listing them
//! instead, so a host test can simply expect success.
//!
//! Configuration: `path`, the file to read, default `/etc/hostname`;
//! `env`, the variable to read, default `HOME`; `connect`, the address to
//! connect to, default `127.0.0.1:80`.

use std::net::TcpStream;

use plinth_plugin_sdk::prelude::*;

struct WasiEscape {
    path: String,
    env: String,
    connect: String,
}

impl Plugin for WasiEscape {
    fn init(config: &Config) -> Result<Self> {
        Ok(WasiEscape {
            path: config.parse_or("path", "/etc/hostname".to_owned())?,
            env: config.parse_or("env", "HOME".to_owned())?,
            connect: config.parse_or("connect", "127.0.0.1:80".to_owned())?,
        })
    }
}

/// The result of one probe.
struct Probe {
    name: String,
    allowed: bool,
    detail: String,
}

impl Probe {
    fn new<T>(
        name: String,
        result: std::result::Result<T, String>,
        describe: impl FnOnce(T) -> String,
    ) -> Probe {
        match result {
            Ok(value) => Probe {
                name,
                allowed: true,
                detail: describe(value),
            },
            Err(err) => Probe {
                name,
                allowed: false,
                detail: err,
            },
        }
    }

    fn line(&self) -> String {
        let verdict = if self.allowed { "ALLOWED" } else { "denied" };
        format!("{}: {verdict} ({})", self.name, self.detail)
    }
}

impl Processor for WasiEscape {
    fn preprocess(&mut self, _req: &RequestInfo, _inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let probes = [
            Probe::new(
                format!("read file {}", self.path),
                std::fs::read(&self.path).map_err(|err| err.to_string()),
                |bytes| format!("{} bytes", bytes.len()),
            ),
            Probe::new(
                "list directory /".to_owned(),
                std::fs::read_dir("/").map_err(|err| err.to_string()),
                |entries| format!("{} entries", entries.count()),
            ),
            Probe::new(
                format!("env var {}", self.env),
                std::env::var(&self.env).map_err(|err| err.to_string()),
                |value| format!("{} bytes", value.len()),
            ),
            Probe::new(
                "environment".to_owned(),
                match std::env::vars_os().count() {
                    0 => Err("no variables".to_owned()),
                    n => Ok(n),
                },
                |n| format!("{n} variables"),
            ),
            Probe::new(
                format!("connect {}", self.connect),
                TcpStream::connect(&self.connect).map_err(|err| err.to_string()),
                |stream| format!("connected from {:?}", stream.local_addr().ok()),
            ),
        ];
        let lines: Vec<String> = probes.iter().map(Probe::line).collect();
        if probes.iter().any(|probe| probe.allowed) {
            return Err(PluginError::internal(format!(
                "sandbox escape: {}",
                lines.join("; ")
            )));
        }
        let report = Tensor::from_byte_strings("wasi_report", &[lines.len() as i64], &lines)?;
        Ok(vec![report])
    }
}

export_processor!(WasiEscape);
