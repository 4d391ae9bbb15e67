//! Who may call what, TLS and the connection limits, end to end: the stock
//! tritonclient (tests/python/access.py) and tonic clients against real
//! servers, tokens and certificates made in the test, a network namespace
//! for a peer that is not loopback, and raw sockets for greedy clients.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use plinth::grpc::pb;
use plinth::listen::ConnectionLimits;
use plinth::security::{SecurityConfig, TlsFiles};
use plinth_tests::pki::{Pair, TestPki};
use plinth_tests::{PATIENCE, TestServer, eventually, fixtures};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request};

// ---------------------------------------------------------------- helpers

/// What access.py saw: (proto, group) -> (outcome, message).
type Outcomes = BTreeMap<(String, String), (String, String)>;

/// Runs tests/python/access.py (stock tritonclient) against `srv` with
/// `env` added, optionally inside network namespace `netns`.
async fn access(
    grpc: SocketAddr,
    http: SocketAddr,
    env: &[(&str, &Path)],
    netns: Option<&str>,
) -> Outcomes {
    let python = std::env::var_os("PLINTH_PYTHON").expect(
        "PLINTH_PYTHON is not set: run the suite with `cargo xtask test`, which installs tritonclient into a venv",
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/access.py");
    let env: Vec<(String, PathBuf)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.to_path_buf()))
        .collect();
    let netns = netns.map(str::to_owned);
    let output = tokio::task::spawn_blocking(move || {
        let mut cmd = match &netns {
            Some(ns) => {
                let mut cmd = std::process::Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(&python);
                cmd
            }
            None => std::process::Command::new(&python),
        };
        cmd.arg(&script)
            .env("PLINTH_GRPC", grpc.to_string())
            .env("PLINTH_HTTP", http.to_string())
            .env_remove("PLINTH_TOKEN")
            .env_remove("PLINTH_TLS_CA")
            .env_remove("PLINTH_TLS_CERT")
            .env_remove("PLINTH_TLS_KEY")
            .env("NO_PROXY", "*");
        for (key, value) in &env {
            cmd.env(key, value);
        }
        cmd.output()
    })
    .await
    .unwrap()
    .expect("runs python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "access.py failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("access.py printed {line:?}: {err}"));
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            ((s("proto"), s("group")), (s("outcome"), s("message")))
        })
        .collect()
}

/// Asserts the outcome of every (proto, group) access.py tried: `want`
/// maps a group to its expected gRPC and HTTP outcomes.
fn expect(outcomes: &Outcomes, want: &[(&str, &str, &str)]) {
    for (group, grpc, http) in want {
        for (proto, expected) in [("grpc", grpc), ("http", http)] {
            if group == &"plugins" && proto == "http" {
                continue; // no REST route for plugins
            }
            let (got, message) = outcomes
                .get(&(proto.to_owned(), (*group).to_owned()))
                .unwrap_or_else(|| panic!("access.py made no {proto} {group} call: {outcomes:?}"));
            assert_eq!(got, expected, "{proto} {group}: {message}");
        }
    }
    assert_eq!(outcomes.len(), 13, "{outcomes:?}");
}

/// Every group answered, over both protocols.
const ALL_OK: &[(&str, &str, &str)] = &[
    ("health", "ok", "ok"),
    ("metadata", "ok", "ok"),
    ("inference", "ok", "ok"),
    ("statistics", "ok", "ok"),
    ("model-repository", "ok", "ok"),
    ("plugins", "ok", ""),
    ("shared-memory", "ok", "ok"),
];

/// A token in the file `name` of `dir` (what the auth config reads).
fn write_token(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    path
}

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn ping() -> pb::PingRequest {
    pb::PingRequest::default()
}

async fn start_with_scale(tweak: impl FnOnce(&mut plinth::ServerConfig)) -> TestServer {
    TestServer::start_with(
        |repo| fixtures::scale(repo, "scale", "1", 2.0),
        |config| {
            config.load_all = true;
            tweak(config);
        },
    )
    .await
}

async fn tls_channel(
    addr: SocketAddr,
    ca: &Path,
    client: Option<&Pair>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some(pair) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&pair.cert).unwrap(),
            std::fs::read(&pair.key).unwrap(),
        ));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|err| format!("{err:?}"))?
        .timeout(PATIENCE)
        .connect()
        .await
        .map_err(|err| format!("{err:?}"))
}

/// A fresh TLS handshake with `addr`: the leaf certificate it serves (DER).
async fn served_leaf(addr: SocketAddr, ca: &Path) -> Result<Vec<u8>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let certs = stream
        .get_ref()
        .1
        .peer_certificates()
        .ok_or("no certificate")?;
    Ok(certs[0].to_vec())
}

/// GET over HTTP/1.1 and TLS on a raw stream: the status line.
async fn https_get(addr: SocketAddr, ca: &Path, path: &str, token: Option<&str>) -> String {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.unwrap();
    let auth = token.map_or_else(String::new, |t| format!("authorization: Bearer {t}\r\n"));
    let request =
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{auth}connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("the HTTPS answer within PATIENCE")
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&response);
    text.lines().next().unwrap_or_default().to_owned()
}

// ---------------------------------------------------------------- tokens

const ACCESS_CONFIG: &str = r#"
open = ["health"]

[[tokens]]
name = "ops"
file = "ops.token"
groups = ["all"]

[[tokens]]
name = "app"
file = "app.token"
groups = ["metadata", "inference"]
"#;

fn auth_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    write_token(dir.path(), "ops.token", "ops-0123456789abcdef");
    write_token(dir.path(), "app.token", "app-0123456789abcdef");
    let config = dir.path().join("auth.toml");
    std::fs::write(&config, ACCESS_CONFIG).unwrap();
    (dir, config)
}

/// Without an auth config, everything answers loopback: what the rest of
/// the suite relies on, checked here with the stock client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_auth_config_loopback_may_call_every_group() {
    let srv = start_with_scale(|_| {}).await;
    srv.wait_ready("scale").await;
    let addr = srv.running();
    let outcomes = access(addr.grpc_addr, addr.http_addr, &[], None).await;
    expect(&outcomes, ALL_OK);
    srv.stop().await;
}

/// Every group with no token, a wrong token, a token that opens some groups
/// and one that opens all, over tritonclient's gRPC and HTTP, and plinth.v1
/// over tonic. The caller is on loopback: with a config it gets no bypass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_open_exactly_their_groups_on_every_edge() {
    let (dir, config) = auth_dir();
    let srv = start_with_scale(|c| c.security.auth_config = Some(config.clone())).await;
    let ops = "ops-0123456789abcdef";
    let app = "app-0123456789abcdef";
    // Readiness of `scale` through a token that may ask.
    eventually(PATIENCE, "scale READY", async || {
        let mut models = srv.models().await;
        let status = models
            .get_model(bearer(
                pb::GetModelRequest {
                    name: "scale".into(),
                },
                ops,
            ))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        let state = status.model.and_then(|m| m.status).map(|s| s.state);
        if state == Some(plinth_tests::ModelState::Ready as i32) {
            Ok(())
        } else {
            Err(format!("{state:?}"))
        }
    })
    .await;
    let addr = srv.running();
    let (grpc, http) = (addr.grpc_addr, addr.http_addr);

    let none = access(grpc, http, &[], None).await;
    let u = ("UNAUTHENTICATED", "401");
    expect(
        &none,
        &[
            ("health", "ok", "ok"),
            ("metadata", u.0, u.1),
            ("inference", u.0, u.1),
            ("statistics", u.0, u.1),
            ("model-repository", u.0, u.1),
            ("plugins", u.0, ""),
            ("shared-memory", u.0, u.1),
        ],
    );
    let (_, message) = &none[&("grpc".to_owned(), "inference".to_owned())];
    assert!(
        message.contains("inference") && message.contains("Bearer"),
        "{message}"
    );

    let wrong_outcomes = access_with_token(grpc, http, "ops-0123456789abcdeX").await;
    expect(
        &wrong_outcomes,
        &[
            ("health", "ok", "ok"),
            ("metadata", u.0, u.1),
            ("inference", u.0, u.1),
            ("statistics", u.0, u.1),
            ("model-repository", u.0, u.1),
            ("plugins", u.0, ""),
            ("shared-memory", u.0, u.1),
        ],
    );
    for (_, message) in wrong_outcomes.values() {
        assert!(
            !message.contains("0123456789"),
            "a token is never echoed: {message}"
        );
    }

    let d = ("PERMISSION_DENIED", "403");
    let app_outcomes = access_with_token(grpc, http, app).await;
    expect(
        &app_outcomes,
        &[
            ("health", "ok", "ok"),
            ("metadata", "ok", "ok"),
            ("inference", "ok", "ok"),
            ("statistics", d.0, d.1),
            ("model-repository", d.0, d.1),
            ("plugins", d.0, ""),
            ("shared-memory", d.0, d.1),
        ],
    );
    let (_, message) = &app_outcomes[&("http".to_owned(), "model-repository".to_owned())];
    assert!(
        message.contains("\"app\"")
            && message.contains("model-repository")
            && !message.contains("0123456789"),
        "{message}"
    );

    let ops_outcomes = access_with_token(grpc, http, ops).await;
    expect(&ops_outcomes, ALL_OK);

    // plinth.v1 over tonic: one call per group the services hold.
    let mut compute = srv.compute().await;
    let err = compute.ping(ping()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    compute
        .ping(bearer(ping(), app))
        .await
        .expect("metadata with app");
    let request = plinth_tests::compute_request(
        "scale",
        vec![plinth_tests::f32_tensor("x", &[2], &[1.0, 3.0])],
    );
    let out = compute
        .compute(bearer(request, app))
        .await
        .expect("inference with app")
        .into_inner();
    assert_eq!(plinth_tests::f32_values(&out.outputs[0]), vec![2.0, 6.0]);
    let mut models = srv.models().await;
    let load = pb::LoadModelRequest {
        name: "scale".into(),
        reload: true,
        wait: true,
    };
    let err = models
        .load_model(bearer(load.clone(), app))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("model-repository"), "{err:?}");
    models
        .load_model(bearer(load, ops))
        .await
        .expect("model-repository with ops");
    let mut plugin_api = srv.plugin_api().await;
    let err = plugin_api
        .reload_plugins(bearer(pb::ReloadPluginsRequest::default(), app))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    plugin_api
        .reload_plugins(bearer(pb::ReloadPluginsRequest::default(), ops))
        .await
        .expect("plugins with ops");

    // REST: 401 carries a Bearer challenge; /metrics is statistics.
    let response = srv
        .http(reqwest::Method::GET, "/v2/models/scale", &[], Vec::new())
        .await;
    assert_eq!(response.status, 401);
    assert!(
        response.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    let metrics = |token: Option<&'static str>| {
        let addr = srv.running().metrics_addr;
        async move {
            let auth = token.map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> =
                auth.iter().map(|a| ("authorization", a.as_str())).collect();
            plinth_tests::http_request(addr, "GET", "/metrics", &headers, b"").await
        }
    };
    assert_eq!(metrics(None).await.0, 401);
    assert_eq!(metrics(Some(app)).await.0, 403);
    assert_eq!(metrics(Some(ops)).await.0, 200);
    drop(dir);
    srv.stop().await;
}

/// access.py with `token` in its environment (PLINTH_TOKEN).
async fn access_with_token(grpc: SocketAddr, http: SocketAddr, token: &str) -> Outcomes {
    access(grpc, http, &[("PLINTH_TOKEN", Path::new(token))], None).await
}

/// Kubernetes rotates a Secret by swapping its `..data` symlink; the new
/// token works and the old one stops, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rotated_by_a_kubernetes_secret_swap_takes_effect() {
    let secret = tempfile::tempdir().unwrap();
    fixtures::kubernetes_mount(secret.path(), 1, &[("token", b"first-0123456789")]);
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("auth.toml");
    std::fs::write(
        &config,
        format!(
            "[[tokens]]\nname = \"client\"\nfile = \"{}\"\ngroups = [\"metadata\"]\n",
            secret.path().join("token").display()
        ),
    )
    .unwrap();
    let srv = start_with_scale(|c| c.security.auth_config = Some(config.clone())).await;
    let mut compute = srv.compute().await;
    compute
        .ping(bearer(ping(), "first-0123456789"))
        .await
        .expect("the first token works");
    fixtures::kubernetes_mount(secret.path(), 2, &[("token", b"second-0123456789\n")]);
    eventually(PATIENCE, "the rotated token to be accepted", async || {
        compute
            .ping(bearer(ping(), "second-0123456789"))
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await;
    let err = compute
        .ping(bearer(ping(), "first-0123456789"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    srv.stop().await;
}

/// With the file watch off, SIGHUP re-reads the token files; a broken
/// config keeps the policy that was serving, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_tokens_and_a_broken_config_keeps_the_old_policy() {
    let (dir, config) = auth_dir();
    let srv = start_with_scale(|c| {
        c.security.auth_config = Some(config.clone());
        c.security.watch_files = false;
        c.reload_on_sighup = true;
    })
    .await;
    let mut compute = srv.compute().await;
    compute
        .ping(bearer(ping(), "app-0123456789abcdef"))
        .await
        .expect("app works");
    write_token(dir.path(), "app.token", "app-rotated-0123456789");
    let generation = srv.running().security.status().policy_generation;
    // SAFETY: kill(2) on our own pid with a signal the server handles
    // (start() installed the SIGHUP handler before returning).
    let rc = unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
    assert_eq!(rc, 0);
    eventually(PATIENCE, "SIGHUP to reload the policy", async || {
        let now = srv.running().security.status().policy_generation;
        if now > generation {
            Ok(())
        } else {
            Err(format!("generation {now}"))
        }
    })
    .await;
    compute
        .ping(bearer(ping(), "app-rotated-0123456789"))
        .await
        .expect("the new app token works after SIGHUP");
    let err = compute
        .ping(bearer(ping(), "app-0123456789abcdef"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    std::fs::write(&config, "open = [\"everything\"]\n").unwrap();
    srv.running().reload_security().await;
    let status = srv.running().security.status();
    let err = status.last_error.expect("the failed reload is reported");
    assert!(
        err.contains("auth.toml") && err.contains("\"everything\""),
        "{err}"
    );
    compute
        .ping(bearer(ping(), "app-rotated-0123456789"))
        .await
        .expect("the previous policy still serves");
    assert_eq!(
        compute.ping(ping()).await.unwrap_err().code(),
        Code::Unauthenticated,
        "the broken config opened nothing"
    );
    srv.stop().await;
}

// ---------------------------------------------------------------- TLS

fn tls_config(pki: &TestPki, pair: &Pair, mtls: bool) -> SecurityConfig {
    SecurityConfig {
        auth_config: None,
        tls: Some(TlsFiles {
            cert: pair.cert.clone(),
            key: pair.key.clone(),
            client_ca: mtls.then(|| pki.ca_cert.clone()),
        }),
        watch_files: true,
    }
}

/// TLS on all three ports: tritonclient over gRPC and HTTPS, a tonic
/// client, metrics over HTTPS; a plaintext client is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_every_port_to_tritonclient_and_tonic() {
    let pki = TestPki::new();
    let pair = pki.server("server", &[]);
    let srv = start_with_scale(|c| c.security = tls_config(&pki, &pair, false)).await;
    let addr = srv.running();
    let channel = tls_channel(addr.grpc_addr, &pki.ca_cert, None)
        .await
        .expect("TLS channel");
    let mut compute = pb::compute_service_client::ComputeServiceClient::new(channel);
    compute.ping(ping()).await.expect("Ping over TLS");
    wait_ready_over_tls(addr.grpc_addr, &pki, None).await;
    let outcomes = access(
        addr.grpc_addr,
        addr.http_addr,
        &[("PLINTH_TLS_CA", &pki.ca_cert)],
        None,
    )
    .await;
    expect(&outcomes, ALL_OK);
    assert!(
        https_get(addr.metrics_addr, &pki.ca_cert, "/metrics", None)
            .await
            .contains("200")
    );
    assert!(
        https_get(addr.http_addr, &pki.ca_cert, "/v2/health/ready", None)
            .await
            .contains("200")
    );
    // Plaintext to a TLS port gets no answer.
    let plain = access(addr.grpc_addr, addr.http_addr, &[], None).await;
    for ((proto, group), (outcome, message)) in &plain {
        assert_ne!(
            outcome, "ok",
            "plaintext {proto} {group} was answered: {message}"
        );
    }
    srv.stop().await;
}

/// With a client CA, a client without a certificate (or with one from
/// another CA) is refused; one with a certificate from the CA is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_ca() {
    let pki = TestPki::new();
    let pair = pki.server("server", &[]);
    let client = pki.client("client");
    let srv = start_with_scale(|c| c.security = tls_config(&pki, &pair, true)).await;
    let addr = srv.running();
    wait_ready_over_tls(addr.grpc_addr, &pki, Some(&client)).await;
    let outcomes = access(
        addr.grpc_addr,
        addr.http_addr,
        &[
            ("PLINTH_TLS_CA", &pki.ca_cert),
            ("PLINTH_TLS_CERT", &client.cert),
            ("PLINTH_TLS_KEY", &client.key),
        ],
        None,
    )
    .await;
    expect(&outcomes, ALL_OK);
    let anonymous = access(
        addr.grpc_addr,
        addr.http_addr,
        &[("PLINTH_TLS_CA", &pki.ca_cert)],
        None,
    )
    .await;
    for ((proto, group), (outcome, message)) in &anonymous {
        assert_ne!(
            outcome, "ok",
            "{proto} {group} answered a client without a certificate: {message}"
        );
    }
    // tonic: no certificate, or one from another CA.
    let other = TestPki::new();
    let stranger = other.client("stranger");
    for (who, identity) in [
        ("no certificate", None),
        ("another CA's certificate", Some(&stranger)),
    ] {
        let refused = match tls_channel(addr.grpc_addr, &pki.ca_cert, identity).await {
            Err(_) => true,
            Ok(channel) => pb::compute_service_client::ComputeServiceClient::new(channel)
                .ping(ping())
                .await
                .is_err(),
        };
        assert!(refused, "a client with {who} was served");
    }
    srv.stop().await;
}

/// Waits, over TLS, for `scale` to be READY.
async fn wait_ready_over_tls(grpc: SocketAddr, pki: &TestPki, client: Option<&Pair>) {
    eventually(PATIENCE, "scale READY over TLS", async || {
        let mut models = pb::model_service_client::ModelServiceClient::new(
            tls_channel(grpc, &pki.ca_cert, client).await?,
        );
        let detail = models
            .get_model(pb::GetModelRequest {
                name: "scale".into(),
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        let state = detail.model.and_then(|m| m.status).map(|s| s.state);
        (state == Some(plinth_tests::ModelState::Ready as i32))
            .then_some(())
            .ok_or(format!("{state:?}"))
    })
    .await;
}

/// The certificate and key, rotated by a Kubernetes Secret swap: new
/// connections get the new certificate, an open connection keeps working
/// (it is not reconnected), and a pair that does not match keeps the last
/// good one serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_drops_no_connection_and_a_bad_pair_keeps_the_old() {
    let pki = TestPki::new();
    let a = pki.server("a", &[]);
    let b = pki.server("b", &[]);
    let c = pki.server("c", &[]);
    let secret = tempfile::tempdir().unwrap();
    let read = |p: &Pair| {
        (
            std::fs::read(&p.cert).unwrap(),
            std::fs::read(&p.key).unwrap(),
        )
    };
    let (a_cert, a_key) = read(&a);
    fixtures::kubernetes_mount(
        secret.path(),
        1,
        &[("tls.crt", &a_cert), ("tls.key", &a_key)],
    );
    let files = Pair {
        cert: secret.path().join("tls.crt"),
        key: secret.path().join("tls.key"),
        der: a.der.clone(),
    };
    let srv = start_with_scale(|cfg| cfg.security = tls_config(&pki, &files, false)).await;
    let grpc = srv.running().grpc_addr;
    assert_eq!(served_leaf(grpc, &pki.ca_cert).await.unwrap(), a.der);

    let channel = tls_channel(grpc, &pki.ca_cert, None).await.unwrap();
    let mut open = pb::compute_service_client::ComputeServiceClient::new(channel);
    open.ping(ping()).await.expect("Ping before the rotation");

    let (b_cert, b_key) = read(&b);
    fixtures::kubernetes_mount(
        secret.path(),
        2,
        &[("tls.crt", &b_cert), ("tls.key", &b_key)],
    );
    eventually(
        PATIENCE,
        "new connections to get certificate b",
        async || {
            let leaf = served_leaf(grpc, &pki.ca_cert).await?;
            if leaf == b.der {
                Ok(())
            } else {
                Err("still another certificate".to_owned())
            }
        },
    )
    .await;
    let accepted = srv
        .running()
        .connections
        .grpc
        .accepted
        .load(Ordering::Relaxed);
    open.ping(ping())
        .await
        .expect("the connection opened before the rotation still serves");
    assert_eq!(
        srv.running()
            .connections
            .grpc
            .accepted
            .load(Ordering::Relaxed),
        accepted,
        "the open channel was served on its own connection, not a new one"
    );
    let generation = srv.running().security.status().tls_generation;

    // c's certificate with b's key: refused, b keeps serving.
    let (c_cert, _) = read(&c);
    fixtures::kubernetes_mount(
        secret.path(),
        3,
        &[("tls.crt", &c_cert), ("tls.key", &b_key)],
    );
    let err = eventually(PATIENCE, "the bad pair to be refused", async || {
        srv.running()
            .security
            .status()
            .last_error
            .ok_or("no error yet")
    })
    .await;
    assert!(err.contains("tls.crt") && err.contains("tls.key"), "{err}");
    assert_eq!(srv.running().security.status().tls_generation, generation);
    assert_eq!(served_leaf(grpc, &pki.ca_cert).await.unwrap(), b.der);
    open.ping(ping()).await.expect("still serving");

    let (_, c_key) = read(&c);
    fixtures::kubernetes_mount(
        secret.path(),
        4,
        &[("tls.crt", &c_cert), ("tls.key", &c_key)],
    );
    eventually(PATIENCE, "the fixed pair to be served", async || {
        let leaf = served_leaf(grpc, &pki.ca_cert).await?;
        if leaf == c.der {
            Ok(())
        } else {
            Err("not c yet".to_owned())
        }
    })
    .await;
    assert_eq!(srv.running().security.status().last_error, None);
    srv.stop().await;
}

// ---------------------------------------------------------------- a network peer

/// A network namespace joined to this one by a veth pair: a peer whose
/// address is not loopback. Removed (with its veth) when dropped.
struct Netns {
    name: String,
    host_ip: std::net::IpAddr,
}

impl Netns {
    /// `Err` says why namespaces cannot be made here.
    fn create() -> Result<Netns, String> {
        let id = std::process::id() % 10_000;
        let name = format!("plinth-t{id}");
        let (host_if, ns_if) = (format!("pt{id}h"), format!("pt{id}n"));
        let octet = (id % 250) + 1;
        let host_ip = format!("10.231.{octet}.1");
        let ns_ip = format!("10.231.{octet}.2");
        let netns = Netns {
            name: name.clone(),
            host_ip: host_ip.parse().unwrap(),
        };
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), name.clone()],
            vec![
                "link".into(),
                "add".into(),
                host_if.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                ns_if.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                ns_if.clone(),
                "netns".into(),
                name.clone(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                format!("{host_ip}/30"),
                "dev".into(),
                host_if.clone(),
            ],
            vec!["link".into(), "set".into(), host_if, "up".into()],
            vec![
                "-n".into(),
                name.clone(),
                "addr".into(),
                "add".into(),
                format!("{ns_ip}/30"),
                "dev".into(),
                ns_if.clone(),
            ],
            vec![
                "-n".into(),
                name.clone(),
                "link".into(),
                "set".into(),
                ns_if,
                "up".into(),
            ],
            vec![
                "-n".into(),
                name.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        for args in steps {
            let output = std::process::Command::new("ip")
                .args(&args)
                .output()
                .map_err(|err| format!("running `ip`: {err}"))?;
            if !output.status.success() {
                return Err(format!(
                    "`ip {}`: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
        }
        Ok(netns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Without an auth config, a peer on the network (here: in a namespace of
/// its own, over a veth pair) may call health, metadata, inference and
/// statistics, and is refused model-repository, plugins and shared-memory;
/// with a token
/// configured, the same peer may call what its token opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_peer_is_refused_the_dangerous_groups_by_default() {
    let netns = match Netns::create() {
        Ok(netns) => netns,
        Err(why) => {
            eprintln!(
                "SKIPPED a_network_peer_is_refused_the_dangerous_groups_by_default: cannot make a network namespace here ({why})"
            );
            return;
        }
    };
    let bind = |c: &mut plinth::ServerConfig| {
        c.grpc_addr = SocketAddr::new(netns.host_ip, 0);
        c.http_addr = SocketAddr::new(netns.host_ip, 0);
        c.metrics_addr = SocketAddr::new(netns.host_ip, 0);
    };
    let srv = start_with_scale(bind).await;
    let addr = srv.running();
    let outcomes = access(addr.grpc_addr, addr.http_addr, &[], Some(&netns.name)).await;
    let d = ("PERMISSION_DENIED", "403");
    expect(
        &outcomes,
        &[
            ("health", "ok", "ok"),
            ("metadata", "ok", "ok"),
            ("inference", "ok", "ok"),
            ("statistics", "ok", "ok"),
            ("model-repository", d.0, d.1),
            ("plugins", d.0, ""),
            ("shared-memory", d.0, d.1),
        ],
    );
    let (_, message) = &outcomes[&("grpc".to_owned(), "model-repository".to_owned())];
    assert!(
        message.contains("loopback") && message.contains("10.231."),
        "{message}"
    );
    srv.stop().await;

    let (_dir, config) = auth_dir();
    let srv = start_with_scale(|c| {
        bind(c);
        c.security.auth_config = Some(config.clone());
    })
    .await;
    let addr = srv.running();
    let outcomes = access(
        addr.grpc_addr,
        addr.http_addr,
        &[("PLINTH_TOKEN", Path::new("ops-0123456789abcdef"))],
        Some(&netns.name),
    )
    .await;
    expect(&outcomes, ALL_OK);
    srv.stop().await;
}

// ---------------------------------------------------------------- greedy clients

fn limits(tweak: impl FnOnce(&mut ConnectionLimits)) -> impl FnOnce(&mut plinth::ServerConfig) {
    move |config| {
        let mut limits = ConnectionLimits::default();
        tweak(&mut limits);
        config.limits = limits;
    }
}

/// Writes `bytes` one at a time, `pause` apart, until the peer closes;
/// returns whether it closed (rather than all bytes being written).
async fn dribble_until_closed(mut stream: TcpStream, bytes: &[u8], pause: Duration) -> bool {
    let (mut reader, mut writer) = stream.split();
    let write = async {
        for byte in bytes {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(pause).await;
        }
        // Everything sent: now only the server can end it.
        std::future::pending::<()>().await;
    };
    let mut sink = Vec::new();
    let closed = async {
        let _ = reader.read_to_end(&mut sink).await;
    };
    tokio::select! {
        () = write => false,
        () = closed => true,
        () = tokio::time::sleep(PATIENCE) => false,
    }
}

/// A client that sends its request head a byte at a time is cut off after
/// the header timeout, on the HTTP port (HTTP/1.1 headers) and the gRPC
/// port (the HTTP/2 preface); others are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_header_client_is_cut_off_after_the_header_timeout() {
    let srv = TestServer::start_with(
        |_| {},
        limits(|l| l.header_timeout = Duration::from_millis(500)),
    )
    .await;
    let addr = srv.running();
    // 400 bytes at 150 ms is a minute: far past the timeout.
    let mut head = b"GET /v2 HTTP/1.1\r\nhost: localhost\r\n".to_vec();
    head.extend(std::iter::repeat_n(b'x', 400));
    let http = TcpStream::connect(addr.http_addr).await.unwrap();
    assert!(
        dribble_until_closed(http, &head, Duration::from_millis(150)).await,
        "the HTTP port kept a header dribbler"
    );
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend(std::iter::repeat_n(0u8, 400));
    let grpc = TcpStream::connect(addr.grpc_addr).await.unwrap();
    assert!(
        dribble_until_closed(grpc, &preface, Duration::from_millis(150)).await,
        "the gRPC port kept a preface dribbler"
    );
    assert!(addr.connections.grpc.timed_out.load(Ordering::Relaxed) >= 1);
    // A client that sends at once is served (and kept past the timeout).
    let mut compute = srv.compute().await;
    compute.ping(ping()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    compute
        .ping(ping())
        .await
        .expect("a prompt client's connection outlives the header timeout");
    // A gRPC channel that connects (the HTTP/2 preface at once) and idles
    // past the timeout before its first call keeps its connection.
    let before = addr.connections.grpc.accepted.load(Ordering::Relaxed);
    let idle = srv.channel().await;
    // The client's connect can finish before the server's accept loop has
    // counted it: wait for the count to include it.
    let accepted = eventually(
        PATIENCE,
        "the idle channel's connection to be counted",
        async || match addr.connections.grpc.accepted.load(Ordering::Relaxed) {
            n if n > before => Ok(n),
            n => Err(n.to_string()),
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    pb::compute_service_client::ComputeServiceClient::new(idle)
        .ping(ping())
        .await
        .expect("an idle channel's first call is served");
    assert_eq!(
        addr.connections.grpc.accepted.load(Ordering::Relaxed),
        accepted,
        "on the connection it opened before idling, not a new one"
    );
    assert_eq!(srv.http_get("/v2/health/live").await.0, 200);
    srv.stop().await;
}

/// Request heads over the limit: 431 on HTTP/1.1, a refused call on gRPC;
/// the server goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_over_the_limit_are_refused() {
    let srv = TestServer::start_with(|_| {}, limits(|l| l.max_header_bytes = 16 << 10)).await;
    let big = "x".repeat(32 << 10);
    let response = srv
        .http(reqwest::Method::GET, "/v2", &[("x-big", &big)], Vec::new())
        .await;
    assert_eq!(response.status, 431);
    let small = "x".repeat(1 << 10);
    let response = srv
        .http(
            reqwest::Method::GET,
            "/v2",
            &[("x-small", &small)],
            Vec::new(),
        )
        .await;
    assert_eq!(response.status, 200);

    let mut request = Request::new(ping());
    request.metadata_mut().insert("x-big", big.parse().unwrap());
    let err = srv.compute().await.ping(request).await.unwrap_err();
    // The HTTP/2 server answers 431 before any gRPC handler runs.
    assert!(err.message().contains("431"), "{err:?}");
    let mut request = Request::new(ping());
    request
        .metadata_mut()
        .insert("x-small", small.parse().unwrap());
    srv.compute()
        .await
        .ping(request)
        .await
        .expect("a small head is served");
    srv.stop().await;
}

/// The HTTP/2 SETTINGS the gRPC port sends bound the streams of one
/// connection to the configured number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_per_connection_are_bounded() {
    let srv = TestServer::start_with(|_| {}, limits(|l| l.max_concurrent_streams = 3)).await;
    let tcp = TcpStream::connect(srv.running().grpc_addr).await.unwrap();
    let (_client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    // A PING round trip: its PONG comes after the server's SETTINGS.
    let mut ping_pong = connection.ping_pong().expect("ping_pong");
    tokio::select! {
        res = &mut connection => panic!("connection ended: {res:?}"),
        pong = ping_pong.ping(h2::Ping::opaque()) => {
            pong.expect("PONG");
        }
        () = tokio::time::sleep(PATIENCE) => panic!("no PONG within PATIENCE"),
    }
    assert_eq!(connection.max_concurrent_send_streams(), 3);
    srv.stop().await;
}

/// Past the connection cap new connections are closed at once and
/// counted; the connections already open are served, and a slot that
/// frees is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_refused_at_once() {
    let srv = TestServer::start_with(|_| {}, limits(|l| l.max_connections = 2)).await;
    let addr = srv.running().http_addr;
    let counters = &srv.running().connections.http;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    eventually(PATIENCE, "two connections accepted", async || {
        let n = counters.accepted.load(Ordering::Relaxed);
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} accepted"))
        }
    })
    .await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(PATIENCE, third.read(&mut buf))
        .await
        .expect("the refused connection is closed, not left open");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "refused connection read {read:?}"
    );
    assert!(counters.refused.load(Ordering::Relaxed) >= 1);
    // The held connections are served.
    let answer = live_on(held.remove(0))
        .await
        .expect("a held connection is served");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // That one has closed: its slot is free again.
    eventually(
        PATIENCE,
        "a freed slot to take a new connection",
        async || {
            let answer = live_over(addr).await?;
            if answer.starts_with("HTTP/1.1 200") {
                Ok(())
            } else {
                Err(answer)
            }
        },
    )
    .await;
    srv.stop().await;
}

/// GET /v2/health/live on `stream`, HTTP/1.1, then close: the answer.
async fn live_on(mut stream: TcpStream) -> Result<String, String> {
    stream
        .write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .map_err(|_| "no answer within PATIENCE".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// [`live_on`] a new connection to `addr`.
async fn live_over(addr: SocketAddr) -> Result<String, String> {
    live_on(TcpStream::connect(addr).await.map_err(|e| e.to_string())?).await
}

// ---------------------------------------------------------------- the gate fails closed

/// One raw HTTP/1.1 request, written as given (no client normalises the
/// path or the method): the status code of the answer.
async fn raw_status(addr: SocketAddr, head: &str, body: &str) -> u16 {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{head}\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .expect("an answer within PATIENCE")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    let status = text.split(' ').nth(1).unwrap_or_default();
    status
        .parse()
        .unwrap_or_else(|_| panic!("{head}: not an HTTP answer: {text:?}"))
}

/// With a config that opens inference to one token only, no spelling of an
/// inference path runs the model without it. Every hostile variant is
/// refused (401 by the gate, or 400/404/405 by the router without a
/// handler running) and none is answered 200; the model's statistics show
/// that nothing ran. (Once `/versions//infer` answered 200 unauthenticated:
/// axum matched the empty segment, and the gate's own parser did not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_path_variant_reaches_a_handler_past_the_gate() {
    let (_dir, config) = auth_dir();
    let srv = start_with_scale(|c| c.security.auth_config = Some(config.clone())).await;
    let http = srv.running().http_addr;
    let ops = "ops-0123456789abcdef";
    let body = r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[2],"data":[1,2]}]}"#;
    // The model answers with the token: the fixture is sound.
    eventually(PATIENCE, "scale answers with a token", async || {
        let (code, text) = srv
            .http_post(
                "/v2/models/scale/infer",
                &[("authorization", &format!("Bearer {ops}"))],
                body.as_bytes(),
            )
            .await;
        if code == 200 {
            Ok(())
        } else {
            Err(format!("{code} {text}"))
        }
    })
    .await;
    let bearer = format!("Bearer {ops}");
    let inferences = async || -> u64 {
        let (code, text) = srv
            .http(
                reqwest::Method::GET,
                "/v2/models/scale/stats",
                &[("authorization", &bearer)],
                Vec::new(),
            )
            .await
            .status_and_text();
        assert_eq!(code, 200, "{text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["model_stats"][0]["inference_count"]
            .as_u64()
            .unwrap_or_else(|| panic!("no inference_count: {text}"))
    };
    let before = inferences().await;
    assert!(before >= 1, "the request with a token counted");
    let hostile = [
        "POST /v2/models/scale/infer HTTP/1.1",
        "POST /v2/models/scale/versions//infer HTTP/1.1",
        "POST /v2/models/scale/versions/1/infer HTTP/1.1",
        "POST /v2/models/scale/versions/1/infer/ HTTP/1.1",
        "POST /v2/models/scale/infer/ HTTP/1.1",
        "POST /v2/models//infer HTTP/1.1",
        "POST //v2/models/scale/infer HTTP/1.1",
        "POST /v2//models/scale/infer HTTP/1.1",
        "POST /v2/models/scale%2Finfer HTTP/1.1",
        "POST /v2/models/scale/versions/1%2Finfer HTTP/1.1",
        "POST /v2/models/scale/versions%2F1/infer HTTP/1.1",
        "POST /v2/models/x/../scale/infer HTTP/1.1",
        "POST /v2/models/scale/./infer HTTP/1.1",
        "POST /v2/models/scale/%2e%2e/scale/infer HTTP/1.1",
        "PoSt /v2/models/scale/infer HTTP/1.1",
        "post /v2/models/scale/infer HTTP/1.1",
        "HEAD /v2/models/scale/infer HTTP/1.1",
        "OPTIONS /v2/models/scale/infer HTTP/1.1",
        "OPTIONS * HTTP/1.1",
        "GET /v2/models/scale/versions//ready HTTP/1.1",
        "GET /v2/models/scale/versions//config HTTP/1.1",
        "GET /v2/models/scale/versions//stats HTTP/1.1",
        "GET /v2/models/scale/versions/ HTTP/1.1",
        "GET /v2/models/scale/versions// HTTP/1.1",
        "POST /v2/repository/models//load HTTP/1.1",
        "POST /v2/repository/models//unload HTTP/1.1",
        "POST /v2/repository/index HTTP/1.1",
        "GET /v2/models/stats HTTP/1.1",
        "GET /v2/models/scale/stats HTTP/1.1",
    ];
    for head in hostile {
        let code = raw_status(http, head, body).await;
        assert!(
            matches!(code, 400 | 401 | 403 | 404 | 405),
            "{head} without a token answered {code}"
        );
    }
    // The inference routes themselves answer 401: the gate, not a 404.
    for head in [
        "POST /v2/models/scale/versions//infer HTTP/1.1",
        "GET /v2/models/scale/versions//stats HTTP/1.1",
        "POST /v2/repository/models//load HTTP/1.1",
    ] {
        assert_eq!(raw_status(http, head, body).await, 401, "{head}");
    }
    assert_eq!(
        inferences().await,
        before,
        "a request without a token ran the model"
    );
    // With the token, an empty version or model name is refused by name,
    // before any body is read (this one is not JSON at all).
    for (path, segment) in [
        ("/v2/models/scale/versions//infer", "version"),
        ("/v2/repository/models//load", "model"),
        ("/v2/repository/models//unload", "model"),
    ] {
        let (code, text) = srv
            .http_post(path, &[("authorization", &bearer)], b"not json")
            .await;
        assert_eq!(code, 400, "{path}: {text}");
        assert!(
            text.contains(&format!("the {segment} segment of the path is empty")),
            "{path}: {text}"
        );
    }
    // gRPC: an unknown or misspelt method is refused by the gate itself.
    let mut client =
        plinth::grpc::pb::compute_service_client::ComputeServiceClient::new(srv.channel().await);
    let err = client.ping(ping()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    srv.stop().await;
}

/// The caller's credentials never reach a plugin: a processor that copies
/// every metadata entry it sees into an output sees the caller's own
/// headers but not `authorization`, `proxy-authorization` or `cookie`,
/// over plinth.v1 gRPC, OIP gRPC and REST. (Every edge once copied them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_reach_plugins() {
    let srv = TestServer::start(
        |repo| {
            fixtures::scale_config()
                .postprocess(&["snoop"])
                .write(repo, "scale");
            fixtures::scale_file(&plinth_tests::model_file(repo, "scale", "1"), 2.0);
        },
        true,
    )
    .await;
    plinth_tests::install_plugin(srv.plugins.path(), "snoop", "hostile_snoop", None);
    srv.wait_plugin("snoop", |s| s.serving).await;
    srv.wait_ready("scale").await;
    let secrets = [
        ("authorization", "Bearer secret-token-1"),
        ("proxy-authorization", "Basic c2VjcmV0"),
        ("cookie", "session=secret-cookie"),
        ("x-visible", "yes"),
    ];
    let check = |edge: &str, seen: Vec<String>| {
        assert!(
            seen.iter().any(|s| s == "x-visible=yes"),
            "{edge}: {seen:?}"
        );
        for entry in &seen {
            assert!(
                !entry.contains("secret"),
                "{edge}: a plugin saw {entry:?} (all: {seen:?})"
            );
        }
    };

    // plinth.v1 Compute.
    let request = plinth_tests::compute_request(
        "scale",
        vec![plinth_tests::f32_tensor("x", &[2], &[1.0, 2.0])],
    );
    let mut tonic_request = Request::new(request);
    for (key, value) in secrets {
        tonic_request
            .metadata_mut()
            .insert(key, value.parse().unwrap());
    }
    let response = srv
        .compute()
        .await
        .compute(tonic_request)
        .await
        .unwrap()
        .into_inner();
    let seen = response
        .outputs
        .iter()
        .find(|t| t.name == "seen")
        .expect("the snoop's output");
    check("plinth.v1", length_prefixed(&seen.data));

    // OIP REST.
    let (code, text) = srv
        .http_post(
            "/v2/models/scale/infer",
            &secrets,
            br#"{"inputs":[{"name":"x","datatype":"FP32","shape":[2],"data":[1,2]}]}"#,
        )
        .await;
    assert_eq!(code, 200, "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let seen = json["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "seen")
        .unwrap_or_else(|| panic!("no seen output: {text}"));
    let seen: Vec<String> = seen["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_owned())
        .collect();
    check("REST", seen);

    // OIP gRPC.
    let mut infer = plinth::grpc::ipb::ModelInferRequest {
        model_name: "scale".into(),
        ..Default::default()
    };
    infer
        .inputs
        .push(plinth::grpc::ipb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![2],
            contents: Some(plinth::grpc::ipb::InferTensorContents {
                fp32_contents: vec![1.0, 2.0],
                ..Default::default()
            }),
            ..Default::default()
        });
    let mut tonic_request = Request::new(infer);
    for (key, value) in secrets {
        tonic_request
            .metadata_mut()
            .insert(key, value.parse().unwrap());
    }
    let response = srv
        .inference()
        .await
        .model_infer(tonic_request)
        .await
        .unwrap()
        .into_inner();
    let index = response
        .outputs
        .iter()
        .position(|o| o.name == "seen")
        .expect("the snoop's output");
    let seen = match response.raw_output_contents.get(index) {
        Some(raw) => length_prefixed(raw),
        None => response.outputs[index]
            .contents
            .as_ref()
            .map(|c| {
                c.bytes_contents
                    .iter()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .collect()
            })
            .unwrap_or_default(),
    };
    check("OIP gRPC", seen);
    srv.stop().await;
}

/// The elements of a `bytes` tensor's data: each a u32 LE length, then the bytes.
fn length_prefixed(mut data: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
        out.push(String::from_utf8_lossy(&data[4..4 + len]).into_owned());
        data = &data[4 + len..];
    }
    out
}

/// Quiet connections do not keep their slots: with room for two, an idle
/// HTTP/1.1 keep-alive connection and an idle HTTP/2 one (prior knowledge,
/// on the HTTP port) are both closed after the idle timeout, and a new
/// client gets in. (HTTP/2 connections were once kept forever: the header
/// deadline covers only the first request, and no idle timeout was set.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_reaped_and_free_their_slots() {
    let srv = TestServer::start_with(
        |_| {},
        limits(|l| {
            l.max_connections = 2;
            // Long enough that only the idle timeout can close them.
            l.header_timeout = Duration::from_secs(120);
            l.idle_timeout = Duration::from_millis(400);
        }),
    )
    .await;
    let addr = srv.running().http_addr;
    let counters = &srv.running().connections.http;

    // HTTP/1.1, keep-alive: one request, then quiet.
    let mut h1 = TcpStream::connect(addr).await.unwrap();
    h1.write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // HTTP/2 with prior knowledge: one request, then quiet, the client
    // handle kept (dropping it would close the connection from our side).
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut h2_client, h2_connection) = h2::client::handshake(tcp).await.unwrap();
    let h2_done = tokio::spawn(h2_connection);
    let request = http::Request::get("http://x/v2/health/live")
        .body(())
        .unwrap();
    let (response, _) = h2_client.send_request(request, true).unwrap();
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("an HTTP/2 answer")
        .unwrap();
    assert_eq!(response.status(), 200);

    // Both are closed by the server once idle.
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, h1.read_to_end(&mut answer))
        .await
        .expect("the idle HTTP/1.1 connection is closed by the server")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    tokio::time::timeout(PATIENCE, h2_done)
        .await
        .expect("the idle HTTP/2 connection is closed by the server")
        .unwrap()
        .ok();
    assert!(counters.idle_closed.load(Ordering::Relaxed) >= 2);
    drop(h2_client);
    // The slots are free: a new client is served.
    let answer = live_over(addr).await.expect("a new client gets in");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    srv.stop().await;
}
