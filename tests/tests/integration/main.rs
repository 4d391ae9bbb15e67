//! The one integration-test binary: real servers on 127.0.0.1:0, real tonic
//! clients, real TorchScript models.

mod batching;
mod budget;
mod deploy;
mod edges;
mod errors;
mod fuzz_corpus;
mod http_fuzz;
mod lifecycle;
mod mirror;
mod nonblocking;
mod oip;
mod orchestrator;
mod plugins;
mod poll;
mod pt2;
mod reliability;
mod residency;
mod security;
mod services;
mod serving_metrics;
mod settling;
mod shm;
mod split_learning;
mod traces;
