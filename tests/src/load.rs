//! The benchmarks' load generator: h2load (Debian `nghttp2-client`) posting
//! a pre-encoded gRPC body, run as a separate process.

use std::path::{Path, PathBuf};
use std::process::Command;

use plinth::grpc::ipb;
use prost::Message;

/// A gRPC frame around an encoded message, as h2load sends it: the
/// compression flag, the big-endian length, the message.
pub fn grpc_frame(message: &impl Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// How long one run lasts.
#[derive(Debug, Clone, Copy)]
pub enum Amount {
    /// `-n`: this many requests.
    Requests(u64),
    /// `-D`: this many seconds.
    Seconds(u64),
}

/// What one h2load run reports. h2load reads HTTP statuses only, never
/// grpc-status: callers check the server's own counters as well.
#[derive(Debug, Clone, Copy)]
pub struct H2loadRun {
    pub req_per_s: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub succeeded: u64,
    /// Errored and timed-out requests.
    pub failed: u64,
}

/// Runs h2load against `url` with `clients` connections of `streams`
/// concurrent streams each, on `threads` client threads. Percentiles come
/// from h2load's per-request log.
pub fn h2load(
    url: &str,
    body: &Path,
    amount: Amount,
    clients: u32,
    streams: u32,
    threads: u32,
) -> H2loadRun {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let log = dir.path().join("requests.log");
    let mut cmd = Command::new("h2load");
    match amount {
        Amount::Requests(n) => cmd.args(["-n", &n.to_string()]),
        Amount::Seconds(s) => cmd.args(["-D", &s.to_string()]),
    };
    let out = cmd
        .args(["-c", &clients.to_string(), "-m", &streams.to_string()])
        .args(["-t", &threads.clamp(1, clients.max(1)).to_string()])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-d")
        .arg(body)
        .arg("--log-file")
        .arg(&log)
        .arg(url)
        .output()
        .expect("h2load (Debian package nghttp2-client) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let words = |line_start: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.trim_start().starts_with(line_start))
            .unwrap_or_else(|| panic!("h2load output lacks {line_start:?}:\n{text}"))
            .split_whitespace()
            .map(|w| w.trim_end_matches(',').to_owned())
            .collect()
    };
    let requests = words("requests:");
    let count = |idx: usize| -> u64 { requests[idx].parse().expect("a request count") };
    let req_per_s: f64 = words("finished in")[3].parse().expect("req/s");
    let mean = words("time for request:")[5].clone();
    let mean_us = if let Some(ms) = mean.strip_suffix("ms") {
        ms.parse::<f64>().expect("a mean") * 1e3
    } else if let Some(us) = mean.strip_suffix("us") {
        us.parse().expect("a mean")
    } else {
        mean.trim_end_matches('s').parse::<f64>().expect("a mean") * 1e6
    };
    // Each log line: start (µs since the epoch), HTTP status, duration (µs).
    let mut durations: Vec<f64> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
        .collect();
    durations.sort_by(f64::total_cmp);
    let at = |q: f64| {
        durations
            .get(((durations.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    H2loadRun {
        req_per_s,
        mean_us,
        p50_us: at(0.5),
        p99_us: at(0.99),
        succeeded: count(7),
        failed: count(9) + count(11),
    }
}

/// A ModelInfer request of one FP32 input `x` of `shape`, raw contents.
pub fn infer_request(model: &str, shape: &[i64], values: &[f32]) -> ipb::ModelInferRequest {
    ipb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![ipb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: shape.to_vec(),
            ..Default::default()
        }],
        raw_input_contents: vec![
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        ],
        ..Default::default()
    }
}

/// Writes `request` as a gRPC frame to `<dir>/<name>.bin`, for h2load.
pub fn write_body(dir: &Path, name: &str, request: &ipb::ModelInferRequest) -> PathBuf {
    let path = dir.join(format!("{name}.bin"));
    std::fs::write(&path, grpc_frame(request)).unwrap();
    path
}

/// A tritonclient call checking `y = 2x` exactly; `None` when no test
/// Python is available.
pub fn triton_check(addr: &str, model: &str) -> Option<bool> {
    let python = std::env::var_os("PLINTH_PYTHON")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/peers/check.py");
    let out = Command::new(python)
        .arg(script)
        .arg(addr)
        .arg(model)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "check against {addr} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Some(out.status.success())
}

/// What one wrk run reports.
#[derive(Debug, Clone, Copy)]
pub struct WrkRun {
    pub req_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub requests: u64,
    pub errors: u64,
}

fn wrk_duration_us(text: &str) -> f64 {
    let (num, unit) = text
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| text.split_at(i))
        .unwrap_or((text, "s"));
    let n: f64 = num
        .parse()
        .unwrap_or_else(|_| panic!("wrk duration {text:?}"));
    match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        other => panic!("wrk unit {other:?}"),
    }
}

/// wrk (Debian `wrk`) with a Lua script that POSTs `body` as JSON to
/// `url` over `connections` for `seconds`, on up to two threads.
pub fn wrk(url: &str, body: &str, connections: u32, seconds: u64) -> WrkRun {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = [[{body}]]\n"
        ),
    )
    .unwrap();
    let threads = connections.min(2);
    let out = Command::new("wrk")
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(url)
        .output()
        .expect("wrk (Debian package wrk) runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = |start: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(start))
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
    };
    let need =
        |start: &str| line(start).unwrap_or_else(|| panic!("wrk output lacks {start:?}:\n{text}"));
    let req_per_s: f64 = need("Requests/sec:")[1].parse().unwrap();
    let mean_us = wrk_duration_us(&need("Latency")[1]);
    let p50_us = wrk_duration_us(&need("50%")[1]);
    let p99_us = wrk_duration_us(&need("99%")[1]);
    let requests: u64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("wrk output lacks a request count:\n{text}"));
    let non_2xx: u64 = line("Non-2xx").map_or(0, |l| l.last().unwrap().parse().unwrap());
    let socket: u64 = line("Socket errors:").map_or(0, |l| {
        l.iter()
            .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
            .sum()
    });
    WrkRun {
        req_per_s,
        p50_us,
        p99_us,
        mean_us,
        requests,
        errors: non_2xx + socket,
    }
}
