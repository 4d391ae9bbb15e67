//! What the tests of the `plinth` binary share: `plinth serve` started as
//! a user starts it, its log read line by line, bounded waits, and small
//! HTTP and gRPC helpers. (This package cannot use `plinth-tests`, which
//! depends on it.)

// Each test binary uses its own share of these.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plinth::grpc::pb;

/// How long a wait on the process may take: a bound on hangs, not a speed
/// assertion.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// `plinth serve` on loopback, every port chosen by the kernel (the log
/// says which).
pub const SERVE_ON_ANY_PORTS: [&str; 9] = [
    "serve",
    "--host",
    "127.0.0.1",
    "--grpc-port",
    "0",
    "--http-port",
    "0",
    "--metrics-port",
    "0",
];

/// A model config: `x` f32 [-1] in, `y` f32 [-1] out.
pub const CONFIG: &str = "[[input]]\nname = \"x\"\ndtype = \"f32\"\nshape = [-1]\n[[output]]\nname = \"y\"\ndtype = \"f32\"\nshape = [-1]\n";

/// Runs `attempt` until it returns `Ok`, pausing 10 ms between attempts;
/// panics after [`PATIENCE`] (counting an attempt still pending) with `what`
/// and the last `Err` seen. The contract of `plinth_tests::eventually`.
pub async fn eventually<T>(what: &str, attempt: impl AsyncFnMut() -> Result<T, String>) -> T {
    eventually_within(PATIENCE, what, attempt).await
}

/// [`eventually`] with a bound of its own.
pub async fn eventually_within<T>(
    patience: Duration,
    what: &str,
    mut attempt: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = tokio::time::Instant::now() + patience;
    let mut last = String::from("nothing (no attempt finished)");
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(observed)) => last = observed,
            Err(_) => last = format!("an attempt still pending; before it: {last}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out after {patience:?} waiting for {what}; last observed: {last}")
}

/// `plinth serve` on loopback, every port chosen by the system; killed if
/// the test ends (or fails) while it runs. Its log (stdout) arrives line by
/// line, colour codes stripped.
pub struct Server {
    pub child: Child,
    pub lines: Receiver<String>,
    /// Every line logged so far.
    history: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `plinth [global] serve` over `repo` and `plugins` with `args`
    /// after the ports, at log level info.
    pub fn start(global: &[&str], repo: &Path, plugins: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_plinth"))
            .args(global)
            .args(SERVE_ON_ANY_PORTS)
            .args(args)
            .arg("--model-repository")
            .arg(repo)
            .arg("--plugin-dir")
            .arg(plugins)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("plinth starts");
        let (tx, lines) = std::sync::mpsc::channel();
        let history = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let kept = Arc::clone(&history);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let line = strip_ansi(&line);
                kept.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Server {
            child,
            lines,
            history,
        }
    }

    /// Everything logged so far, one line each.
    pub fn log(&self) -> String {
        self.history.lock().unwrap().join("\n")
    }

    /// The value of `key=` in the first log line from now on that has it.
    pub fn logged(&self, key: &str) -> String {
        let deadline = std::time::Instant::now() + PATIENCE;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else {
                break;
            };
            if let Some(pos) = line.find(key) {
                return line[pos + key.len()..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .to_owned();
            }
        }
        panic!("no `{key}` logged within {PATIENCE:?}");
    }

    /// Sends `signal` (`-TERM`, `-HUP`) to the process.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {signal}");
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (bounded by [`PATIENCE`]) for the process to exit; its status.
    pub async fn exited(&mut self, what: &str) -> std::process::ExitStatus {
        eventually(what, async || {
            self.child
                .try_wait()
                .unwrap()
                .ok_or_else(|| "still running".to_owned())
        })
        .await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One HTTP/1.1 GET on a fresh connection: the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: plinth\r\nconnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// One HTTP/1.1 GET: the status code.
pub async fn http_status(addr: &str, path: &str) -> Result<u16, String> {
    http_get(addr, path).await.map(|(status, _)| status)
}

/// Waits (bounded by [`PATIENCE`]) until `GET /v2/health/ready` on `addr`
/// answers `code`.
pub async fn readiness_becomes(addr: &str, code: u16) {
    eventually(&format!("readiness {code}"), async || {
        match http_status(addr, "/v2/health/ready").await {
            Ok(got) if got == code => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// A `Compute` request of one f32 tensor `x`.
pub fn f32_request(model: &str, values: &[f32]) -> pb::ComputeRequest {
    pb::ComputeRequest {
        model: model.into(),
        inputs: vec![pb::Tensor {
            name: "x".into(),
            dtype: pb::DataType::Float32 as i32,
            shape: vec![values.len() as i64],
            data: values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        }],
        ..Default::default()
    }
}

/// The values of an f32 tensor.
pub fn f32_values(tensor: &pb::Tensor) -> Vec<f32> {
    tensor
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}
