//! What ships, as users get it: the bundle unpacked anywhere, the image run
//! with buildah, and every manifest in deploy/ checked against the binary
//! (`plinth serve --check` on each container's exact arguments, and the
//! ports, probes, annotations and mounts against what the binary serves).
//!
//! `cargo xtask test` builds the bundle and (where buildah is installed)
//! the image first and names them in PLINTH_BUNDLE and PLINTH_IMAGE.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::SERVE_ON_ANY_PORTS;
use serde::Deserialize;
use serde_norway::Value;

/// A bound on hangs, not a speed assertion.
const PATIENCE: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A child process killed when dropped, with every process under it.
/// `buildah run` starts the server under `buildah-chroot-exec`; killing
/// buildah alone once left that server running after the suite.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        // Read the tree before anything dies: orphans are re-parented.
        let tree = descendants(self.0.id());
        let _ = self.0.kill();
        for pid in tree.iter().rev() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.0.wait();
        // What was killed is gone before the test goes on.
        let deadline = Instant::now() + PATIENCE;
        while tree
            .iter()
            .any(|pid| alive(*pid) && Instant::now() < deadline)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The parent of `pid` from /proc, if it still runs.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` runs (a zombie does not count).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|at| stat[at + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// Every process under `root`, parents before children.
fn descendants(root: u32) -> Vec<u32> {
    let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
                .filter_map(|pid: u32| Some((pid, parent_of(pid)?)))
                .collect()
        })
        .unwrap_or_default();
    let mut found = vec![root];
    let mut at = 0;
    while at < found.len() {
        let parent = found[at];
        found.extend(all.iter().filter(|(_, p)| *p == parent).map(|(c, _)| *c));
        at += 1;
    }
    found.remove(0);
    found
}

/// The value of `key=` in a log line.
fn field(line: &str, key: &str) -> String {
    let pos = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    line[pos + key.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .trim_matches('"')
        .to_owned()
}

/// Starts `cmd` with its output read line by line; returns the process and
/// the first line that contains `marker`.
fn start_and_read(mut cmd: Command, marker: &str) -> (Running, String) {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = Running(cmd.spawn().expect("starts"));
    let stdout = child.0.stdout.take().unwrap();
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let err_tx = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = err_tx.send(line);
        }
    });
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.contains(marker) {
                    return (child, line);
                }
                seen.push(line);
            }
            Err(_) => break,
        }
    }
    panic!(
        "no `{marker}` logged within {PATIENCE:?}; output:\n{}",
        seen.join("\n")
    );
}

/// The stock tritonclient, over gRPC and HTTP, on the demo `affine` model:
/// y = x·Wᵀ + b for x = [1, 2, 3, 4] is [1.5, 1.5, 7.0].
fn tritonclient_affine(grpc: &str, http: &str) {
    let python = std::env::var_os("PLINTH_PYTHON")
        .expect("PLINTH_PYTHON is not set: run the tests with `cargo xtask test`");
    let script = r#"
import sys, time, numpy as np
import tritonclient.grpc as g, tritonclient.http as h
grpc_url, http_url = sys.argv[1], sys.argv[2]
x = np.array([[1, 2, 3, 4]], dtype=np.float32)
for mod, client in ((g, g.InferenceServerClient(grpc_url)), (h, h.InferenceServerClient(http_url))):
    for _ in range(600):
        if client.is_model_ready("affine"):
            break
        time.sleep(0.1)
    i = mod.InferInput("x", [1, 4], "FP32")
    i.set_data_from_numpy(x)
    y = client.infer("affine", [i]).as_numpy("y")
    assert np.array_equal(y, np.array([[1.5, 1.5, 7.0]], dtype=np.float32)), y
    print(mod.__name__, y.tolist())
"#;
    let out = Command::new(python)
        .args(["-c", script, grpc, http])
        .output()
        .expect("runs python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "tritonclient on affine failed:\n{text}"
    );
    assert!(
        text.contains("tritonclient.grpc [[1.5, 1.5, 7.0]]"),
        "{text}"
    );
    assert!(
        text.contains("tritonclient.http [[1.5, 1.5, 7.0]]"),
        "{text}"
    );
}

/// Opens a directory tree to every user (the image runs as 65532).
fn open_to_all(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if path.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap().flatten() {
            open_to_all(&entry.path());
        }
    }
}

// ------------------------------------------------------------------ bundle

/// The bundle unpacked into an empty directory runs with HOME elsewhere,
/// no cache and no LD_LIBRARY_PATH, and answers tritonclient with the
/// right numbers; its binary's RUNPATH is only `$ORIGIN`-relative.
#[test]
fn the_bundle_runs_from_an_empty_directory_with_nothing_else() {
    let tarball = std::env::var_os("PLINTH_BUNDLE").expect(
        "PLINTH_BUNDLE is not set: run the tests with `cargo xtask test`, which builds the bundle",
    );
    let place = tempfile::tempdir().unwrap();
    let unpack = Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(place.path())
        .status()
        .unwrap();
    assert!(unpack.success());
    let root = std::fs::read_dir(place.path())
        .unwrap()
        .flatten()
        .next()
        .expect("the bundle's directory")
        .path();
    let bin = root.join("bin/plinth");

    let dynamic = Command::new("readelf")
        .arg("-d")
        .arg(&bin)
        .output()
        .unwrap();
    let dynamic = String::from_utf8_lossy(&dynamic.stdout);
    let runpath: Vec<&str> = dynamic
        .lines()
        .filter(|l| l.contains("(RUNPATH)") || l.contains("(RPATH)"))
        .collect();
    assert_eq!(runpath.len(), 1, "one RUNPATH, no RPATH: {runpath:?}");
    assert!(runpath[0].contains("(RUNPATH)"), "{runpath:?}");
    let entries = runpath[0]
        .split('[')
        .nth(1)
        .and_then(|s| s.strip_suffix(']'))
        .expect("a runpath value");
    for entry in entries.split(':') {
        assert!(
            entry.starts_with("$ORIGIN"),
            "RUNPATH entry {entry:?} is not $ORIGIN-relative"
        );
    }
    for needed in [
        "lib/libtorch_cpu.so",
        "lib/libc10.so",
        "lib/libtorch.so",
        "plugins/weighted_router.wasm",
        "licenses/crates/INDEX.tsv",
        "README",
    ] {
        assert!(root.join(needed).is_file(), "the bundle lacks {needed}");
    }
    let index = std::fs::read_to_string(root.join("licenses/crates/INDEX.tsv")).unwrap();
    assert!(
        index.contains("\ntonic\t") && index.contains("\nwasmtime\t"),
        "{index}"
    );
    assert!(
        std::fs::read_dir(root.join("licenses/libtorch"))
            .unwrap()
            .count()
            >= 1,
        "libtorch's licence is in the bundle"
    );

    // Nothing from this machine's setup: a fresh HOME, no cache, no
    // LD_LIBRARY_PATH, run from another directory.
    let home = place.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let models = place.path().join("models");
    let demo = Command::new(&bin)
        .arg("demo-repo")
        .arg(&models)
        .env_clear()
        .env("HOME", &home)
        .env("PATH", "/usr/bin:/bin")
        .status()
        .unwrap();
    assert!(demo.success());
    add_package(&models);
    let mut serve = Command::new(&bin);
    serve
        .args(SERVE_ON_ANY_PORTS)
        .arg("--model-repository")
        .arg(&models)
        .arg("--plugin-dir")
        .arg(place.path().join("plugins"))
        .current_dir(&home)
        .env_clear()
        .env("HOME", &home)
        .env("PATH", "/usr/bin:/bin")
        .env("RUST_LOG", "info");
    let (server, line) = start_and_read(serve, "plinth serving");
    tritonclient_affine(&field(&line, "grpc_addr="), &field(&line, "http_addr="));
    check_package(&field(&line, "http_addr="));
    drop(server);
}

// ------------------------------------------------------------------ image

/// The image named by PLINTH_IMAGE, or `None` after saying why the test
/// skips (buildah is not installed here).
fn image(test: &str) -> Option<String> {
    match std::env::var("PLINTH_IMAGE") {
        Ok(image) => Some(image),
        Err(_) => {
            eprintln!(
                "SKIPPED {test}: PLINTH_IMAGE is not set (`cargo xtask test` builds the image where buildah is installed; it is not here)"
            );
            None
        }
    }
}

fn buildah() -> Command {
    let mut cmd = Command::new("buildah");
    cmd.args(["--storage-driver", "vfs"]);
    cmd
}

/// A working container of the image; removed when dropped.
struct Container(String);

impl Container {
    fn from(image: &str) -> Container {
        let out = buildah().args(["from", "--quiet", image]).output().unwrap();
        assert!(
            out.status.success(),
            "buildah from: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Container(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `buildah run` of `args` with `volumes` (host dir, container path).
    fn run(&self, volumes: &[(PathBuf, String)], args: &[String]) -> Command {
        let mut cmd = buildah();
        cmd.args(["run", "--isolation", "chroot", "--network", "host"]);
        for (host, at) in volumes {
            cmd.arg("-v").arg(format!("{}:{at}", host.display()));
        }
        cmd.arg(&self.0).arg("--").args(args);
        cmd
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = buildah().args(["rm", &self.0]).output();
    }
}

/// `tiny`, an AOTInductor package made by PyTorch (y = 2x over rows of 16
/// f32, tests/fixtures/pt2), added to a model repository.
fn add_package(models: &Path) {
    let dir = models.join("tiny");
    std::fs::create_dir_all(dir.join("1")).unwrap();
    std::fs::write(
        dir.join("config.toml"),
        "max_batch_size = 64\n[[input]]\nname = \"x\"\ndtype = \"f32\"\nshape = [16]\n[[output]]\nname = \"y\"\ndtype = \"f32\"\nshape = [16]\n",
    )
    .unwrap();
    std::fs::copy(
        repo_root().join("tests/fixtures/pt2/tiny/model.pt2"),
        dir.join("1/model.pt2"),
    )
    .unwrap();
}

/// The package answers REST infer with 2x, exactly.
fn check_package(http_addr: &str) {
    use std::io::{Read, Write};
    let x: Vec<f32> = (0..16).map(|i| i as f32 * 0.75 - 3.0).collect();
    let body = format!(
        "{{\"inputs\":[{{\"name\":\"x\",\"shape\":[1,16],\"datatype\":\"FP32\",\"data\":{x:?}}}]}}"
    );
    let mut stream = std::net::TcpStream::connect(http_addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        stream,
        "POST /v2/models/tiny/infer HTTP/1.1\r\nhost: plinth\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let json = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let value: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {answer}"));
    let y: Vec<f32> = value["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let want: Vec<f32> = x.iter().map(|v| 2.0 * v).collect();
    assert_eq!(y, want, "{answer}");
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: plinth\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// The image: non-root, the three ports exposed, and run with buildah it
/// serves the demo models from /mnt/models (its default repository) to
/// tritonclient, with the metrics plugin of its default plugin directory.
#[test]
fn the_image_serves_the_demo_models_as_a_non_root_user() {
    let Some(image) = image("the_image_serves_the_demo_models_as_a_non_root_user") else {
        return;
    };
    let inspect = |format: &str| {
        let out = buildah()
            .args(["inspect", "--type", "image", "--format", format, &image])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(inspect("{{.OCIv1.Config.User}}"), "65532:65532");
    let ports = inspect("{{.OCIv1.Config.ExposedPorts}}");
    for port in ["8000/tcp", "8001/tcp", "8002/tcp"] {
        assert!(ports.contains(port), "{port} not exposed: {ports}");
    }

    let models = tempfile::tempdir().unwrap();
    let demo = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .arg("demo-repo")
        .arg(models.path().join("m"))
        .status()
        .unwrap();
    assert!(demo.success());
    // A package too: libtorch unpacks it into the image's /tmp.
    add_package(&models.path().join("m"));
    open_to_all(models.path());
    let container = Container::from(&image);
    let args: Vec<String> = std::iter::once("/opt/plinth/bin/plinth")
        .chain(SERVE_ON_ANY_PORTS)
        .map(str::to_owned)
        .collect();
    let run = container.run(&[(models.path().join("m"), "/mnt/models".into())], &args);
    let (server, line) = start_and_read(run, "plinth serving");
    // The ports open before the plugins have compiled; a request served
    // before the metrics plugin loads is counted by nobody. Readiness
    // waits for the startup plugins (and models): wait for it, as a client
    // behind a readiness probe would.
    let http_addr = field(&line, "http_addr=");
    let deadline = Instant::now() + PATIENCE;
    while !http_get(&http_addr, "/v2/health/ready").starts_with("HTTP/1.1 200") {
        assert!(
            Instant::now() < deadline,
            "the image's server was not ready within {PATIENCE:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The image's health plugin is serving too (basic-health, health.wasm).
    assert!(
        http_get(&field(&line, "metrics_addr="), "/metrics")
            .contains("plinth_plugin_calls_total{plugin=\"health\"}"),
        "the image's default plugin directory holds health.wasm"
    );
    tritonclient_affine(&field(&line, "grpc_addr="), &http_addr);
    check_package(&http_addr);
    // Request events reach the metrics plugin in batches, off the request
    // path, so the counts show up a flush later: poll for them.
    let metrics_addr = field(&line, "metrics_addr=");
    let deadline = Instant::now() + PATIENCE;
    let metrics = loop {
        let metrics = http_get(&metrics_addr, "/metrics");
        let counted = metrics.contains("plinth_requests_total");
        if counted || Instant::now() > deadline {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        metrics.starts_with("HTTP/1.1 200") && metrics.contains("plinth_requests_total"),
        "the image's metrics plugin counts the requests: {metrics}"
    );
    drop(server);
}

// ------------------------------------------------------------------ manifests

/// One container of a manifest, with what surrounds it in its pod.
#[derive(Debug)]
struct Spec {
    /// `file: Kind/name`.
    source: String,
    container: Value,
    volumes: Vec<Value>,
    annotations: BTreeMap<String, String>,
    grace_period: Option<u64>,
    /// A KServe runtime: KServe mounts the model at /mnt/models itself.
    kserve: bool,
}

fn documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    for dir in ["deploy/kubernetes", "deploy/kserve"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join(dir))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no manifests in {dir}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let name = format!("{dir}/{}", file.file_name().unwrap().to_string_lossy());
            for doc in serde_norway::Deserializer::from_str(&text) {
                let value =
                    Value::deserialize(doc).unwrap_or_else(|err| panic!("{name}: not YAML: {err}"));
                if !value.is_null() {
                    docs.push((name.clone(), value));
                }
            }
        }
    }
    docs
}

fn str_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
        .collect()
}

fn specs(docs: &[(String, Value)]) -> Vec<Spec> {
    let mut specs = Vec::new();
    for (file, doc) in docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        let source = format!("{file}: {kind}/{name}");
        let (pod, annotations, kserve) = match kind {
            "Deployment" => (
                &doc["spec"]["template"]["spec"],
                str_map(&doc["spec"]["template"]["metadata"]["annotations"]),
                false,
            ),
            "ClusterServingRuntime" | "ServingRuntime" => {
                (&doc["spec"], str_map(&doc["spec"]["annotations"]), true)
            }
            _ => continue,
        };
        for container in pod["containers"].as_sequence().expect("containers") {
            specs.push(Spec {
                source: source.clone(),
                container: container.clone(),
                volumes: pod["volumes"].as_sequence().cloned().unwrap_or_default(),
                annotations: annotations.clone(),
                grace_period: pod["terminationGracePeriodSeconds"].as_u64(),
                kserve,
            });
        }
    }
    specs
}

/// `--flag=value` arguments (the form the manifests use) as a map.
fn flags(args: &[String]) -> BTreeMap<String, String> {
    args.iter()
        .filter_map(|a| a.strip_prefix("--")?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn seconds(flags: &BTreeMap<String, String>, key: &str, default: f64) -> f64 {
    flags.get(key).map_or(default, |v| v.parse().unwrap())
}

/// The paths the image provides itself (deploy/Containerfile), beside the
/// volumes a manifest mounts.
const IMAGE_PATHS: &[&str] = &[
    "/opt/plinth",
    "/etc/plinth/plugins",
    "/etc/plinth/auth/no-model-control.toml",
    "/var/cache/plinth",
    "/tmp",
];

/// Fills `dir` as the volume `volume` would be: a ConfigMap defined in the
/// manifests gets its keys; one made with kubectl from files, nothing (the
/// check reads no plugin); a Secret's items get generated secrets; a PVC
/// of models (or KServe's /mnt/models) a model repository.
fn materialize(volume: &Value, docs: &[(String, Value)], dir: &Path, models: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let configmap = |name: &str| {
        docs.iter()
            .find(|(_, d)| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name)
            .map(|(_, d)| d["data"].clone())
    };
    let mut sources = vec![volume.clone()];
    if let Some(projected) = volume["projected"]["sources"].as_sequence() {
        sources = projected.clone();
    }
    for source in sources {
        if let Some(name) = source["configMap"]["name"].as_str() {
            if let Some(data) = configmap(name) {
                for (key, text) in str_map(&data) {
                    std::fs::write(dir.join(key), text).unwrap();
                }
            }
        } else if let Some(items) = source["secret"]["items"].as_sequence() {
            for item in items {
                let path = item["path"].as_str().expect("secret item path");
                std::fs::write(
                    dir.join(path),
                    format!("generated-{}-0123456789", std::process::id()),
                )
                .unwrap();
            }
        } else if source["persistentVolumeClaim"].is_mapping() {
            copy_dir(models, dir);
        }
    }
}

/// In every `.toml` under `dir`, a quoted path under a mount point is
/// rewritten to where that mount was materialized.
fn rewrite_paths(dir: &Path, volumes: &[(PathBuf, String)]) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rewrite_paths(&path, volumes);
        } else if path.extension().is_some_and(|x| x == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            // Quoted strings are the odd pieces; each path moves once, by
            // the longest mount point it lies under.
            let moved: Vec<String> = text
                .split('"')
                .enumerate()
                .map(|(i, piece)| {
                    let mount = volumes
                        .iter()
                        .filter(|(_, at)| i % 2 == 1 && Path::new(piece).starts_with(at))
                        .max_by_key(|(_, at)| at.len());
                    match mount {
                        Some((host, at)) => {
                            let rest = Path::new(piece).strip_prefix(at).unwrap();
                            host.join(rest).display().to_string()
                        }
                        None => piece.to_owned(),
                    }
                })
                .collect();
            std::fs::write(&path, moved.join("\"")).unwrap();
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Every container of every manifest agrees with the binary: its command
/// is the image's binary; its ports, probes and Prometheus annotations are
/// the ports and paths the flags make it serve; every path it names is a
/// mount or in the image; the grace period outlasts the drain; and
/// `plinth serve --check` passes on its exact arguments, inside the image
/// with the volumes at their mount paths where buildah is here, else with
/// those paths mapped to temporary directories.
#[test]
fn every_manifest_agrees_with_the_binary_and_passes_its_check() {
    let docs = documents();
    let specs = specs(&docs);
    assert!(
        specs.len() >= 3,
        "a Deployment and two KServe runtimes: {specs:#?}"
    );
    let image = image(
        "every_manifest_agrees_with_the_binary_and_passes_its_check (inside the image; the check still runs on the host binary)",
    );
    let scratch = tempfile::tempdir().unwrap();
    let repository = scratch.path().join("repository");
    let demo = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .arg("demo-repo")
        .arg(&repository)
        .status()
        .unwrap();
    assert!(demo.success());

    for (n, spec) in specs.iter().enumerate() {
        let what = &spec.source;
        let c = &spec.container;
        let command: Vec<String> =
            serde_norway::from_value(c["command"].clone()).unwrap_or_default();
        assert_eq!(command, ["/opt/plinth/bin/plinth"], "{what}: command");
        let args: Vec<String> = serde_norway::from_value(c["args"].clone()).expect("args");
        assert_eq!(args.first().map(String::as_str), Some("serve"), "{what}");
        // KServe fills {{.Name}} with the InferenceService's name.
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("{{.Name}}", "affine"))
            .collect();
        let flags = flags(&args);
        let port = |key: &str, default: u16| -> u16 {
            flags.get(key).map_or(default, |v| v.parse().unwrap())
        };
        let (http, grpc, metrics) = (
            port("http-port", 8000),
            port("grpc-port", 8001),
            port("metrics-port", 8002),
        );

        // Ports: each declared one is served, under its name.
        let mut named = BTreeMap::new();
        for p in c["ports"].as_sequence().into_iter().flatten() {
            let number = p["containerPort"].as_u64().unwrap() as u16;
            assert!(
                [http, grpc, metrics].contains(&number),
                "{what}: port {number} is not served"
            );
            if let Some(name) = p["name"].as_str() {
                let want = match name {
                    "http" => http,
                    "grpc" | "h2c" => grpc,
                    "metrics" => metrics,
                    other => panic!("{what}: unexpected port name {other}"),
                };
                assert_eq!(number, want, "{what}: port {name}");
                named.insert(name.to_owned(), number);
            }
        }
        let resolve = |port: &Value| -> u16 {
            match port {
                Value::Number(n) => n.as_u64().unwrap() as u16,
                Value::String(name) => named[name],
                other => panic!("{what}: probe port {other:?}"),
            }
        };
        for (probe, path) in [
            ("livenessProbe", "/v2/health/live"),
            ("readinessProbe", "/v2/health/ready"),
            ("startupProbe", "/v2/health/live"),
        ] {
            // A TCP probe (the KServe runtimes' liveness, which Knative
            // moves onto the serving port) must name a served port.
            if let Some(port) = c[probe]["tcpSocket"].get("port") {
                assert!(
                    [http, grpc, metrics].contains(&resolve(port)),
                    "{what}: {probe} on a port not served"
                );
                continue;
            }
            let get = &c[probe]["httpGet"];
            if get.is_null() {
                assert_ne!(probe, "readinessProbe", "{what}: no readiness probe");
                continue;
            }
            assert_eq!(get["path"].as_str(), Some(path), "{what}: {probe}");
            assert_eq!(resolve(&get["port"]), http, "{what}: {probe} port");
        }
        for key in ["prometheus.io/port", "prometheus.kserve.io/port"] {
            if let Some(value) = spec.annotations.get(key) {
                assert_eq!(value.parse::<u16>().unwrap(), metrics, "{what}: {key}");
            }
        }
        if let Some(path) = spec.annotations.get("prometheus.io/path") {
            assert_eq!(path, "/metrics", "{what}");
        }
        let drain =
            seconds(&flags, "drain-delay-s", 0.0) + seconds(&flags, "drain-timeout-s", 30.0);
        if let Some(grace) = spec.grace_period {
            assert!(
                grace as f64 > drain,
                "{what}: terminationGracePeriodSeconds {grace} ≤ the drain, {drain} s"
            );
        }
        if spec.kserve {
            assert_eq!(
                flags.get("model-repository").map(String::as_str),
                Some("/mnt/models"),
                "{what}"
            );
        }

        // Every path the arguments name is mounted or in the image.
        let mut mounts: Vec<(String, String)> = Vec::new(); // (mount path, volume name)
        for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
            mounts.push((
                m["mountPath"].as_str().unwrap().to_owned(),
                m["name"].as_str().unwrap().to_owned(),
            ));
        }
        if spec.kserve {
            mounts.push(("/mnt/models".into(), "(kserve storage)".into()));
        }
        for key in [
            "model-repository",
            "plugin-dir",
            "plugin-cache-dir",
            "auth-config",
            "tls-cert",
            "tls-key",
            "tls-client-ca",
        ] {
            let Some(path) = flags.get(key) else { continue };
            let covered = mounts.iter().any(|(at, _)| Path::new(path).starts_with(at))
                || IMAGE_PATHS.iter().any(|at| Path::new(path).starts_with(at));
            assert!(
                covered,
                "{what}: --{key}={path} is neither mounted nor in the image"
            );
        }

        // The volumes, filled as the cluster would.
        let root = scratch.path().join(format!("pod{n}"));
        let mut volumes: Vec<(PathBuf, String)> = Vec::new();
        for (at, volume) in &mounts {
            let host = root.join(at.trim_start_matches('/'));
            if volume == "(kserve storage)" {
                // The storage initializer: one model directory when the
                // runtime names the model, else a repository.
                if flags.contains_key("model-name") {
                    copy_dir(&repository.join("affine"), &host);
                } else {
                    copy_dir(&repository, &host);
                }
            } else {
                let def = spec
                    .volumes
                    .iter()
                    .find(|v| v["name"].as_str() == Some(volume))
                    .unwrap_or_else(|| panic!("{what}: mount {at} names no volume {volume}"));
                materialize(def, &docs, &host, &repository);
            }
            volumes.push((host, at.clone()));
        }
        open_to_all(&root);

        let output = match &image {
            Some(image) => {
                let container = Container::from(image);
                let mut full = command.clone();
                full.extend(args.iter().cloned());
                full.push("--check".into());
                container.run(&volumes, &full).output().unwrap()
            }
            None => {
                // The image's own paths, emulated under the pod's root.
                for dir in [
                    "etc/plinth/plugins",
                    "etc/plinth/auth",
                    "opt/plinth/plugins",
                    "tmp",
                    "var/cache/plinth",
                ] {
                    std::fs::create_dir_all(root.join(dir)).unwrap();
                }
                std::fs::copy(
                    repo_root().join("deploy/no-model-control.toml"),
                    root.join("etc/plinth/auth/no-model-control.toml"),
                )
                .unwrap();
                // Paths inside the configs the volumes carry move too.
                rewrite_paths(&root, &volumes);
                let mapped: Vec<String> = args
                    .iter()
                    .map(|a| match a.split_once("=/") {
                        Some((flag, path)) => format!("{flag}={}", root.join(path).display()),
                        None => a.clone(),
                    })
                    .collect();
                Command::new(env!("CARGO_BIN_EXE_plinth"))
                    .args(&mapped)
                    .arg("--check")
                    .output()
                    .unwrap()
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stdout.contains("plinth serve --check: ok"),
            "{what}: plinth serve --check failed:\n{stdout}{stderr}"
        );
    }

    // The Service sends each port to a port the container declares.
    for (file, doc) in &docs {
        if doc["kind"] != "Service" {
            continue;
        }
        let containers: Vec<&Spec> = specs
            .iter()
            .filter(|s| s.source.starts_with(file.as_str()))
            .collect();
        let declared: Vec<Value> = containers
            .iter()
            .flat_map(|s| {
                s.container["ports"]
                    .as_sequence()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        for port in doc["spec"]["ports"].as_sequence().expect("service ports") {
            let target = &port["targetPort"];
            let found = declared.iter().any(|p| match target {
                Value::String(name) => p["name"].as_str() == Some(name),
                Value::Number(n) => p["containerPort"].as_u64() == n.as_u64(),
                _ => p["containerPort"] == port["port"],
            });
            assert!(
                found,
                "{file}: Service port {port:?} targets no container port"
            );
        }
    }
}

// ------------------------------------------------------------- autoscaling

/// The PromQL strings of `value`: every string under a key that holds a
/// query (KEDA's `query`, prometheus-adapter's `seriesQuery` and
/// `metricsQuery`, Grafana's `expr` and templating `query`), also inside a
/// ConfigMap's embedded YAML file.
fn queries(value: &Value, out: &mut Vec<String>) {
    match value {
        // A Grafana datasource variable's `query` is a datasource type.
        Value::Mapping(map) if map.get("type").and_then(Value::as_str) == Some("datasource") => {}
        Value::Mapping(map) => {
            for (key, item) in map {
                let key = key.as_str().unwrap_or_default();
                match (key, item) {
                    ("query" | "seriesQuery" | "metricsQuery" | "expr", Value::String(q)) => {
                        out.push(q.clone());
                    }
                    (name, Value::String(text)) if name.ends_with(".yaml") => {
                        let inner: Value = serde_norway::from_str(text)
                            .unwrap_or_else(|e| panic!("{name}: not YAML: {e}"));
                        queries(&inner, out);
                    }
                    _ => queries(item, out),
                }
            }
        }
        Value::Sequence(items) => items.iter().for_each(|item| queries(item, out)),
        _ => {}
    }
}

/// The `plinth_…` series names a PromQL string reads.
fn series_names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = query;
    while let Some(at) = rest.find("plinth_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// Every series the KEDA ScaledObject, the HPA's prometheus-adapter rule and
/// the Grafana dashboard query is one the real binary serves on /metrics
/// (demo models, the metrics plugin, one request served).
#[test]
fn autoscaling_and_dashboard_queries_name_series_the_binary_serves() {
    let mut wanted = Vec::new();
    for file in ["keda-scaledobject.yaml", "hpa-prometheus-adapter.yaml"] {
        let text =
            std::fs::read_to_string(repo_root().join("deploy/autoscaling").join(file)).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap();
            let mut found = Vec::new();
            queries(&value, &mut found);
            wanted.extend(found.into_iter().map(|q| (file.to_owned(), q)));
        }
    }
    let dashboard =
        std::fs::read_to_string(repo_root().join("deploy/grafana/plinth-dashboard.json")).unwrap();
    let dashboard: Value = serde_norway::from_str(&dashboard).expect("the dashboard is JSON");
    let mut found = Vec::new();
    queries(&dashboard, &mut found);
    assert!(found.len() >= 12, "the dashboard's queries: {found:?}");
    wanted.extend(
        found
            .into_iter()
            .map(|q| ("plinth-dashboard.json".to_owned(), q)),
    );
    for file in [
        "keda-scaledobject.yaml",
        "hpa-prometheus-adapter.yaml",
        "plinth-dashboard.json",
    ] {
        assert!(
            wanted.iter().any(|(f, _)| f == file),
            "no query found in {file}"
        );
    }

    let place = tempfile::tempdir().unwrap();
    let models = place.path().join("models");
    let plugins = place.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let wasm_dir = std::env::var_os("PLINTH_PLUGIN_WASM_DIR")
        .expect("PLINTH_PLUGIN_WASM_DIR is not set: run the tests with `cargo xtask test`");
    std::fs::copy(
        Path::new(&wasm_dir).join("prometheus_metrics.wasm"),
        plugins.join("metrics.wasm"),
    )
    .unwrap();
    let demo = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .arg("demo-repo")
        .arg(&models)
        .status()
        .unwrap();
    assert!(demo.success());
    let mut serve = Command::new(env!("CARGO_BIN_EXE_plinth"));
    serve
        .args(SERVE_ON_ANY_PORTS)
        .arg("--model-repository")
        .arg(&models)
        .arg("--plugin-dir")
        .arg(&plugins)
        .env("RUST_LOG", "info");
    let (server, line) = start_and_read(serve, "plinth serving");
    let http_addr = field(&line, "http_addr=");
    let deadline = Instant::now() + PATIENCE;
    while !http_get(&http_addr, "/v2/health/ready").starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "not ready within {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    tritonclient_affine(&field(&line, "grpc_addr="), &http_addr);
    let metrics = http_get(&field(&line, "metrics_addr="), "/metrics");
    drop(server);
    let served: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for (file, query) in &wanted {
        let names = series_names(query);
        // prometheus-adapter's metricsQuery names its series as <<.Series>>.
        assert!(
            !names.is_empty() || query.contains("<<.Series>>"),
            "{file}: a query reads no plinth series: {query}"
        );
        for name in names {
            assert!(
                served.contains(name.as_str()),
                "{file}: {query}\nreads {name}, which /metrics does not serve:\n{metrics}"
            );
        }
    }
}
