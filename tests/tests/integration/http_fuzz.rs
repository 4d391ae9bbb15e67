//! The HTTP edge under mutated requests, after Triton's L0_http_fuzz: raw
//! HTTP/1.1 requests whose method, path, headers and body are mutated from
//! the real routes, sent on their own connections to a live server whose
//! management groups are closed (so a fuzzed repository route cannot
//! unload the model under test). No answer may be a 500, a 503 is allowed
//! only where the README documents one (a model not ready), and afterwards
//! the server still answers correctly.
//!
//! `PLINTH_HTTP_FUZZ_REQUESTS` sets the count (CI: 1500).

use std::collections::BTreeMap;

use plinth_tests::fixtures::{self, affine_expected};
use plinth_tests::{PATIENCE, TestServer, compute_request, f32_tensor, f32_values};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT", "get", "P0ST",
    "",
];

const PATHS: &[&str] = &[
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/affine",
    "/v2/models/affine/ready",
    "/v2/models/affine/config",
    "/v2/models/affine/stats",
    "/v2/models/affine/infer",
    "/v2/models/affine/versions/1/infer",
    "/v2/models/stats",
    "/v2/repository/index",
    "/v2/repository/models/affine/load",
    "/v2/repository/models/affine/unload",
    "/metrics",
    "/",
];

const BODIES: &[&str] = &[
    "",
    "{}",
    "{\"inputs\":[{\"name\":\"x\",\"shape\":[1,4],\"datatype\":\"FP32\",\"data\":[1,2,3,4]}]}",
    "{\"inputs\":[{\"name\":\"x\",\"shape\":[1,4],\"datatype\":\"FP32\",\"parameters\":{\"binary_data_size\":16}}]}",
    "{\"inputs\":[{\"name\":\"x\",\"shape\":[-1,99999999999],\"datatype\":\"BYTES\",\"data\":[\"a\"]}]}",
    "{\"inputs\":[{\"name\":\"x\",\"shape\":[1,4],\"datatype\":\"FP32\",\"data\":[[[[1]]]]}]}",
    "[",
    "{\"id\":7,\"inputs\":null,\"outputs\":[{\"name\":1}]}",
];

/// One mutated request as raw bytes.
fn request(rng: &mut XorShift) -> Vec<u8> {
    let mut method = rng.pick(METHODS).to_owned();
    let mut path = rng.pick(PATHS).to_owned();
    match rng.below(8) {
        0 => path.push_str(&"/x".repeat(rng.below(50))),
        1 => path = path.replace("affine", &"%41".repeat(rng.below(4) + 1)),
        2 => path.push_str("?a=1&b=%ZZ&c"),
        3 => path = path.replace('/', "//"),
        4 => path.insert_str(0, "http://host"),
        5 => path.push_str("/../../etc/passwd"),
        6 => path = path.replace("affine", "äffine\u{0}"),
        _ => {}
    }
    if rng.below(10) == 0 {
        method.push_str(&"A".repeat(rng.below(300)));
    }
    let mut body: Vec<u8> = rng.pick(BODIES).as_bytes().to_vec();
    if !body.is_empty() && rng.below(3) == 0 {
        // Flip, cut or extend the body.
        match rng.below(3) {
            0 => {
                let at = rng.below(body.len());
                body[at] ^= 1 << rng.below(8);
            }
            1 => body.truncate(rng.below(body.len())),
            _ => body.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
        }
    }
    let mut headers = vec![format!("host: plinth"), "connection: close".to_owned()];
    match rng.below(6) {
        0 => headers.push(format!("content-length: {}", body.len())),
        1 => headers.push(format!("content-length: {}", rng.below(1 << 20))),
        2 => headers.push("transfer-encoding: chunked".to_owned()),
        3 => headers.push(format!(
            "inference-header-content-length: {}",
            rng.below(200)
        )),
        4 => headers.push(format!(
            "x-{}: {}",
            "h".repeat(rng.below(100)),
            "v".repeat(rng.below(100))
        )),
        _ => {
            headers.push(format!("content-length: {}", body.len()));
            headers.push("content-type: application/json".to_owned());
        }
    }
    let version = if rng.below(20) == 0 {
        "HTTP/9.9"
    } else {
        "HTTP/1.1"
    };
    let mut raw = format!(
        "{method} {path} {version}\r\n{}\r\n\r\n",
        headers.join("\r\n")
    )
    .into_bytes();
    raw.extend(body);
    raw
}

/// Sends `raw` on a fresh connection; the status code, or `None` when the
/// server closed without one (a refused request line may get no answer).
async fn send(addr: &str, raw: &[u8]) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let _ = stream.write_all(raw).await;
    let _ = stream.shutdown().await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer and no close within {PATIENCE:?}");
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_http_requests_get_no_500_and_the_server_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    // The management groups closed to everyone (no tokens), the rest open.
    let config = dir.path().join("auth.toml");
    std::fs::write(
        &config,
        "open = [\"health\", \"metadata\", \"inference\", \"statistics\"]\nloopback = []\n",
    )
    .unwrap();
    let srv = TestServer::start_with(
        |repo| fixtures::affine(repo, "affine", 4),
        |c| c.security.auth_config = Some(config.clone()),
    )
    .await;
    srv.wait_ready("affine").await;
    let http = srv.running().http_addr.to_string();
    let metrics = srv.running().metrics_addr.to_string();
    let count: usize = std::env::var("PLINTH_HTTP_FUZZ_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1500);
    let mut rng = XorShift(0x5EED_F00D_CAFE_BEEF);
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for n in 0..count {
        let raw = request(&mut rng);
        let addr = if raw.starts_with(b"GET /metrics") {
            &metrics
        } else {
            &http
        };
        let status = send(addr, &raw).await;
        let key = status.map_or("closed".to_owned(), |s| s.to_string());
        *statuses.entry(key).or_default() += 1;
        if let Some(code) = status {
            assert!(
                code != 500 && code != 503 && code != 504,
                "request {n} answered {code}: {}",
                String::from_utf8_lossy(&raw)
            );
        }
    }
    println!("http fuzz, {count} requests: {statuses:?}");
    // Afterwards: the model still READY and answering right.
    srv.wait_ready("affine").await;
    let row = [1.0f32, 2.0, 3.0, 4.0];
    let out = srv
        .compute()
        .await
        .compute(compute_request(
            "affine",
            vec![f32_tensor("x", &[1, 4], &row)],
        ))
        .await
        .expect("still serving")
        .into_inner();
    assert_eq!(f32_values(&out.outputs[0]), affine_expected(&row).to_vec());
    srv.stop().await;
}
