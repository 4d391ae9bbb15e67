//! Plinth: a model-serving host. See ARCHITECTURE.md for the map.

pub mod config;
pub mod demo;
pub mod error;
pub mod executor;
pub mod grpc;
pub mod health;
pub mod http;
pub mod oip;
pub mod pipeline;
pub mod registry;
pub mod server;
pub mod tensor;
pub mod torch;
pub mod watch;

pub use error::Error;
pub use server::{RunningServer, ServerConfig, start};
pub mod plugin;
