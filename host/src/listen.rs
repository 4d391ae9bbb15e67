//! The listeners of the three ports: accepting connections under a cap,
//! TLS, HTTP/1.1 and HTTP/2 with bounded headers and streams, a deadline
//! for a connection's first request, and the graceful drain. Every router
//! (the gRPC services, the REST API, metrics) is served by [`serve`], so a
//! limit or a TLS rule holds on every port alike.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::security::{PortProtocols, TlsConfigs};

pub use crate::ports::PeerAddr;

/// Bounds on what one client may hold or make the server wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// From accept to a connection's first request headers (the TLS
    /// handshake included), and for each later HTTP/1.1 request's headers.
    /// A client that dribbles them is cut off.
    pub header_timeout: Duration,
    /// Largest request head: HTTP/1.1 headers, or an HTTP/2 header list.
    pub max_header_bytes: usize,
    /// HTTP/2 streams (calls) open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Connections open at once, per port. Past it, new connections are
    /// closed as soon as they are accepted.
    pub max_connections: usize,
    /// A connection with no request in flight (a streaming response
    /// counts as in flight until its body ends) for this long is closed
    /// (HTTP/2 with GOAWAY), on either protocol, so that quiet clients
    /// cannot hold connection slots forever.
    pub idle_timeout: Duration,
    /// HTTP/2 keep-alive pings this often; a peer that does not answer
    /// one within the same time is gone and its connection is closed.
    pub keepalive_interval: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 << 10,
            max_concurrent_streams: 1024,
            max_connections: 4096,
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(60),
        }
    }
}

/// One port to serve.
pub struct Port {
    /// Its name in logs: "gRPC", "HTTP", "metrics".
    pub name: &'static str,
    pub listener: TcpListener,
    pub protocols: PortProtocols,
    pub router: Router,
    pub tls: Option<Arc<ArcSwap<TlsConfigs>>>,
    pub limits: ConnectionLimits,
}

/// Counts of a port's connections, readable while it serves.
#[derive(Debug, Default)]
pub struct PortCounters {
    pub accepted: AtomicU64,
    /// Closed at accept because the port was at its connection cap.
    pub refused: AtomicU64,
    /// Closed because no request came within the header timeout (or the
    /// TLS handshake failed or did not finish in time).
    pub timed_out: AtomicU64,
    /// Connections closed after the idle timeout.
    pub idle_closed: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
}

/// Counts a connection open for as long as it lives.
struct OpenConnection(Arc<PortCounters>);

impl OpenConnection {
    fn new(counters: &Arc<PortCounters>) -> OpenConnection {
        counters.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(Arc::clone(counters))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `port` until `shutdown`, then stops accepting, asks every
/// connection to finish gracefully and returns once they all have.
pub async fn serve(port: Port, counters: Arc<PortCounters>, shutdown: CancellationToken) {
    let Port {
        name,
        listener,
        protocols,
        router,
        tls,
        limits,
    } = port;
    let builder = Arc::new(builder(protocols, &limits));
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    let refusals = RefusalLog::new(name, limits.max_connections);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // Out of file descriptors and the like: not fatal, and not
                // a reason to spin.
                tracing::warn!(port = name, %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            refusals.note(peer);
            drop(tcp);
            continue;
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        // Small responses must not wait on Nagle and delayed ACKs.
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok();
        let connection = Connection {
            protocols,
            tcp,
            peer,
            local,
            tls: tls.as_ref().map(|t| t.load().for_port(protocols)),
            router: router.clone(),
            builder: Arc::clone(&builder),
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            counters: Arc::clone(&counters),
            shutdown: shutdown.clone(),
        };
        let open = OpenConnection::new(&counters);
        connections.spawn(async move {
            connection.run().await;
            drop(open);
            drop(permit);
        });
    }
    connections.close();
    connections.wait().await;
}

fn builder(protocols: PortProtocols, limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // hyper answers 431 when a request head outgrows its read buffer;
        // it refuses a buffer under 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(limits.keepalive_interval))
        .keep_alive_timeout(limits.keepalive_interval);
    match protocols {
        PortProtocols::Grpc => builder.http2_only(),
        PortProtocols::Http => builder,
    }
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const H2_PREFACE_LEN: usize = 24;

/// A stream that counts the bytes read from it.
struct Counting<T> {
    inner: T,
    read: Arc<std::sync::atomic::AtomicUsize>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counting<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let got = buf.filled().len() - before;
        self.read.fetch_add(got, Ordering::Relaxed);
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counting<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

struct Connection {
    protocols: PortProtocols,
    tcp: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    header_timeout: Duration,
    idle_timeout: Duration,
    counters: Arc<PortCounters>,
    shutdown: CancellationToken,
}

/// What one connection is doing, for its idle timeout: requests in flight
/// (until their response body has been sent or dropped) and when the last
/// one started or ended.
struct Activity {
    in_flight: AtomicU64,
    opened: Instant,
    /// When the last request started or ended, in microseconds since
    /// `opened` (an atomic: every request writes it twice).
    last_us: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicU64::new(0),
            opened: Instant::now(),
            last_us: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let us = u64::try_from(self.opened.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_us.store(us, Ordering::Relaxed);
    }

    /// When the connection will have been idle for `timeout`, if it is idle
    /// now.
    fn idle_until(&self, timeout: Duration) -> Option<Instant> {
        (self.in_flight.load(Ordering::Acquire) == 0).then(|| {
            self.opened + Duration::from_micros(self.last_us.load(Ordering::Relaxed)) + timeout
        })
    }
}

/// Counts a request as in flight on its connection until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        InFlight(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight until it
/// has been sent (or dropped): a gRPC stream is busy, not idle.
struct TrackedBody {
    inner: axum::body::Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Connection {
    async fn run(self) {
        let deadline = tokio::time::Instant::now() + self.header_timeout;
        let io = match self.tls {
            None => Either::Right(self.tcp),
            Some(config) => {
                let accept = tokio_rustls::TlsAcceptor::from(config).accept(self.tcp);
                match tokio::time::timeout_at(deadline, accept).await {
                    Ok(Ok(stream)) => Either::Left(stream),
                    Ok(Err(err)) => {
                        self.counters.timed_out.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(peer = %self.peer, %err, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        self.counters.timed_out.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(peer = %self.peer, "TLS handshake did not finish within the header timeout");
                        return;
                    }
                }
            }
        };
        let seen_request = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&seen_request);
        let router = self.router;
        let peer = self.peer;
        let connect_info = tonic::transport::server::TcpConnectInfo {
            local_addr: self.local,
            remote_addr: Some(peer),
        };
        let activity = Arc::new(Activity::new());
        let requests = Arc::clone(&activity);
        let service =
            hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
                seen.store(true, Ordering::Relaxed);
                let in_flight = InFlight::start(&requests);
                let extensions = request.extensions_mut();
                extensions.insert(PeerAddr(peer));
                extensions.insert(connect_info.clone());
                let call = router.clone().oneshot(request);
                async move {
                    let response = call.await?;
                    Ok::<_, std::convert::Infallible>(response.map(|inner| {
                        axum::body::Body::new(TrackedBody {
                            inner,
                            _in_flight: in_flight,
                        })
                    }))
                }
            });
        // On the gRPC port a client that has sent the whole HTTP/2 preface
        // is no slowloris: it may keep its channel idle before its first
        // call. The header deadline is for the preface there.
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let io = Counting {
            inner: io,
            read: Arc::clone(&read),
        };
        let preface_is_enough = self.protocols == PortProtocols::Grpc;
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let first_request = tokio::time::sleep_until(deadline);
        tokio::pin!(first_request);
        let mut waiting_for_first = true;
        let mut draining = false;
        // Checked a few times per timeout, so that a connection goes within
        // about a quarter of the timeout after it has been idle that long.
        let mut idle_check =
            tokio::time::interval((self.idle_timeout / 4).max(Duration::from_millis(10)));
        idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing_since: Option<Instant> = None;
        loop {
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(err) = res {
                        tracing::debug!(%peer, %err, "connection ended with an error");
                    }
                    return;
                }
                _ = idle_check.tick() => {
                    if let Some(since) = closing_since {
                        // A peer that does not let a graceful close finish
                        // (no GOAWAY acknowledged) loses the connection.
                        if since.elapsed() >= self.header_timeout {
                            return;
                        }
                    } else if activity
                        .idle_until(self.idle_timeout)
                        .is_some_and(|at| Instant::now() >= at)
                    {
                        self.counters.idle_closed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "idle for the idle timeout: closing");
                        closing_since = Some(Instant::now());
                        if !draining {
                            draining = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
                () = &mut first_request, if waiting_for_first => {
                    waiting_for_first = false;
                    let preface = preface_is_enough && read.load(Ordering::Relaxed) >= H2_PREFACE_LEN;
                    if !seen_request.load(Ordering::Relaxed) && !preface {
                        self.counters.timed_out.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "no request within the header timeout: closing");
                        return;
                    }
                }
                () = self.shutdown.cancelled(), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Logs refusals at the connection cap: the first at once, then a count
/// at most every ten seconds, so a flood cannot flood the log.
struct RefusalLog {
    port: &'static str,
    cap: usize,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(10);

    fn new(port: &'static str, cap: usize) -> RefusalLog {
        RefusalLog {
            port,
            cap,
            state: Mutex::new((None, 0)),
        }
    }

    fn note(&self, peer: SocketAddr) {
        let mut state = self.state.lock();
        state.1 += 1;
        let due = state.0.is_none_or(|last| last.elapsed() >= Self::EVERY);
        if due {
            tracing::warn!(
                port = self.port,
                cap = self.cap,
                refused = state.1,
                last_peer = %peer,
                "connection cap reached: refusing new connections"
            );
            *state = (Some(Instant::now()), 0);
        }
    }
}
