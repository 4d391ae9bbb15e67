//! What the listeners, the gate and the services share about ports and
//! connections. A leaf: it imports nothing of the crate, so `listen`,
//! `security`, `grpc` and `server` can all use it without importing each
//! other.

use std::net::SocketAddr;

/// The peer of the connection a request came on, in its extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// One thing per port.
#[derive(Debug, Clone, Default)]
pub struct PortSet<T> {
    pub grpc: T,
    pub http: T,
    pub metrics: T,
}

/// Facts about this build, reported by GetInfo.
#[derive(Debug, Clone)]
pub struct HostInfo {
    pub version: String,
    pub libtorch_version: String,
}

impl HostInfo {
    /// This binary's.
    pub fn current() -> HostInfo {
        HostInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            libtorch_version: plinth_torch::LIBTORCH_VERSION.to_owned(),
        }
    }
}
