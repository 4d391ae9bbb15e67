//! Who may call what, and TLS: the auth policy ([`auth`]) applied by one
//! tower layer ([`layer`]) on every port, the route-to-group tables
//! ([`groups`]), and rustls configurations ([`tls`]). Both are loaded at
//! startup (an error there is fatal) and reloaded on SIGHUP and whenever a
//! file they were read from changes, the Kubernetes `..data` symlink swap
//! included ([`plinth_watch::FileWatch`]). A reload that fails keeps what
//! is serving, logs why, and is reported by [`Security::status`].

pub mod auth;
pub mod groups;
pub mod layer;
pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use auth::{Policy, Verdict};
pub use groups::{ApiGroup, GroupSet, grpc_group, http_group};
pub use layer::{AuthLayer, Classify};
pub use tls::{PortProtocols, TlsConfigs, TlsFiles};

/// Headers that carry the caller's credentials. The edges drop them before
/// a request's metadata is built, so they never reach a router, processor,
/// orchestrator, mirrored run or nested call: a guest could log them or
/// send them out over a socket it was granted.
pub const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];

/// Whether the header (or gRPC metadata key) `name` carries credentials.
/// Header names arrive lowercased from both hyper and tonic; the check does
/// not rely on it.
pub fn is_credential(name: &str) -> bool {
    CREDENTIAL_HEADERS
        .iter()
        .any(|secret| secret.eq_ignore_ascii_case(name))
}

/// What `plinth serve` is told about security.
#[derive(Debug, Clone, Default)]
pub struct SecurityConfig {
    /// The auth config (TOML); `None` is the built-in default.
    pub auth_config: Option<PathBuf>,
    /// TLS on every port when set.
    pub tls: Option<TlsFiles>,
    /// Reload when a file changes on disk (SIGHUP reloads either way).
    pub watch_files: bool,
}

/// How reloads went, for tests and operators.
#[derive(Debug, Clone, Default)]
pub struct SecurityStatus {
    /// Policies installed since startup (the first one included).
    pub policy_generation: u64,
    /// TLS configurations installed since startup (the first one included).
    pub tls_generation: u64,
    /// The last reload's failure, until a reload succeeds.
    pub last_error: Option<String>,
}

/// The live policy and TLS configuration.
pub struct Security {
    config: SecurityConfig,
    policy: Arc<ArcSwap<Policy>>,
    tls: Option<Arc<ArcSwap<TlsConfigs>>>,
    status: Mutex<SecurityStatus>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("config", &self.config)
            .field("status", &*self.status.lock())
            .finish_non_exhaustive()
    }
}

impl Security {
    /// Loads the policy and TLS files; any error is the caller's to report
    /// (the server refuses to start rather than serve with less than asked).
    pub fn load(config: SecurityConfig) -> Result<Security, String> {
        let policy = match &config.auth_config {
            Some(path) => Policy::load(path)?,
            None => Policy::without_config(),
        };
        policy.log();
        let tls = match &config.tls {
            Some(files) => {
                let configs = TlsConfigs::load(files)?;
                tracing::info!(
                    cert = %files.cert.display(),
                    client_ca = ?files.client_ca,
                    "TLS on every port{}",
                    if files.client_ca.is_some() { ", client certificates required" } else { "" }
                );
                Some(Arc::new(ArcSwap::from_pointee(configs)))
            }
            None => None,
        };
        Ok(Security {
            config,
            policy: Arc::new(ArcSwap::from_pointee(policy)),
            tls: tls.clone(),
            status: Mutex::new(SecurityStatus {
                policy_generation: 1,
                tls_generation: u64::from(tls.is_some()),
                last_error: None,
            }),
        })
    }

    /// Reads everything again. What fails to load leaves what is serving in
    /// place; the failure is logged and kept in [`Security::status`].
    pub fn reload(&self) {
        let mut errors = Vec::new();
        if let Some(path) = &self.config.auth_config {
            match Policy::load(path) {
                Ok(policy) => {
                    policy.log();
                    self.policy.store(Arc::new(policy));
                    self.status.lock().policy_generation += 1;
                }
                Err(err) => errors.push(err),
            }
        }
        if let (Some(files), Some(current)) = (&self.config.tls, &self.tls) {
            match TlsConfigs::load(files) {
                Ok(configs) => {
                    if configs.leaf != current.load().leaf {
                        tracing::info!(cert = %files.cert.display(), "TLS certificate rotated: new connections use it");
                    }
                    current.store(Arc::new(configs));
                    self.status.lock().tls_generation += 1;
                }
                Err(err) => errors.push(err),
            }
        }
        let mut status = self.status.lock();
        if errors.is_empty() {
            status.last_error = None;
        } else {
            let err = errors.join("; ");
            tracing::error!(%err, "security reload failed: still serving the previous configuration");
            status.last_error = Some(err);
        }
    }

    /// Every file the policy and TLS were read from.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some(path) = &self.config.auth_config {
            files.push(path.clone());
            files.extend(self.policy.load().token_files());
        }
        if let Some(tls) = &self.config.tls {
            files.extend(tls.paths());
        }
        files
    }

    /// The gate, classifying calls as `classify` says (see [`layer`]).
    pub fn layer(&self, classify: Classify) -> AuthLayer {
        AuthLayer::new(Arc::clone(&self.policy), classify)
    }

    /// The TLS configurations, if TLS is on.
    pub fn tls(&self) -> Option<Arc<ArcSwap<TlsConfigs>>> {
        self.tls.clone()
    }

    pub fn status(&self) -> SecurityStatus {
        self.status.lock().clone()
    }
}

/// Asks the reloader for a reload.
#[derive(Debug, Clone)]
pub struct ReloadHandle {
    tx: mpsc::UnboundedSender<Option<oneshot::Sender<()>>>,
}

impl ReloadHandle {
    /// Reloads and returns once done (at once if the server has stopped).
    pub async fn reload(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Some(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

/// Runs reloads one at a time, on request and (if configured) when a
/// watched file changes; a reload that changes the set of token files moves
/// the watch to the new set.
pub fn spawn_reloader(
    security: Arc<Security>,
    shutdown: CancellationToken,
) -> (ReloadHandle, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Option<oneshot::Sender<()>>>();
    let watch_tx = tx.clone();
    let task = tokio::spawn(async move {
        let start = |files: &[PathBuf]| -> Option<plinth_watch::FileWatch> {
            if !security.config.watch_files || files.is_empty() {
                return None;
            }
            let tx = watch_tx.clone();
            let watch = plinth_watch::FileWatch::start(
                files.to_vec(),
                Duration::from_millis(100),
                move |changed| {
                    tracing::info!(files = ?changed, "security files changed: reloading");
                    let _ = tx.send(None);
                },
            );
            match watch {
                Ok(watch) => Some(watch),
                Err(err) => {
                    tracing::warn!(%err, ?files, "cannot watch the security files: reload with SIGHUP");
                    None
                }
            }
        };
        let mut files = security.watched_files();
        let mut _watch = start(&files);
        loop {
            let request = tokio::select! {
                () = shutdown.cancelled() => break,
                request = rx.recv() => request,
            };
            let Some(request) = request else { break };
            let reloading = Arc::clone(&security);
            let _ = tokio::task::spawn_blocking(move || reloading.reload()).await;
            if let Some(done) = request {
                let _ = done.send(());
            }
            let now = security.watched_files();
            if now != files {
                files = now;
                _watch = start(&files);
            }
        }
    });
    (ReloadHandle { tx }, task)
}
