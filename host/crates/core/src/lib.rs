//! Plinth's shared vocabulary, the lowest layer of the host.
//!
//! Everything here is plain data and its validation: [`Tensor`] and its
//! dtypes, the host [`Error`], a model's lifecycle [`ModelState`], the
//! validated `config.toml` ([`config::ModelConfig`], with its device, versions
//! and [`BatchPolicy`]) and the repository layout on disk. The torch layer
//! (`plinth-torch`) and the plugin layer (`plinth-plugin`) depend on this
//! crate and on nothing of each other; the registry, the pipeline, the edges
//! and the server sit above them in the `plinth` crate.

pub mod batch;
pub mod config;
pub mod deadline;
pub mod error;
pub mod state;
pub mod tensor;

pub use batch::BatchPolicy;
pub use error::Error;
pub use state::ModelState;
pub use tensor::{DType, Tensor, TensorSpec};
