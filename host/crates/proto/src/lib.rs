//! Plinth's wire protocol, generated from `proto/` at build time: `plinth.v1`
//! ([`pb`]) and the Open Inference Protocol v2 ([`ipb`]), each with its
//! messages, its tonic clients and its tonic servers, and the encoded
//! descriptors of both for server reflection ([`FILE_DESCRIPTOR_SET`]).
//!
//! Two crates depend on this one: the `plinth` crate, whose gRPC edge
//! (`plinth::grpc`, which re-exports all three) serves the protocol, and
//! `plinth-client`, the command line that calls it. Nothing else in the host
//! names proto types (`cargo xtask invariants` checks both).

/// The generated `plinth.v1` types.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("plinth.v1");
}

/// The generated `inference` types: the Open Inference Protocol v2.
pub mod ipb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("inference");
}

/// Encoded descriptors of every service, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("plinth_descriptor");
