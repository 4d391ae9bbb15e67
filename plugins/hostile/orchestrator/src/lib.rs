//! Test fixture: an orchestrator whose behaviour its config chooses.
//!
//! - `mode = "forward"` (default): passes the request's inputs to the model
//!   named by `model` and answers with that model's outputs. Pointed at the
//!   entry it serves, it calls itself until the host's depth limit stops it.
//! - `mode = "spin"`: loops forever; the host's deadline must stop it.
//! - `mode = "panic"`: panics, which traps the instance.

use plinth_plugin_sdk::prelude::*;

enum Mode {
    Forward(String),
    Spin,
    Panic,
}

struct Hostile {
    mode: Mode,
}

impl Plugin for Hostile {
    fn init(config: &Config) -> Result<Self> {
        let mode = match config.get("mode").as_deref().unwrap_or("forward") {
            "forward" => Mode::Forward(config.require("model")?),
            "spin" => Mode::Spin,
            "panic" => Mode::Panic,
            other => {
                return Err(PluginError::internal(format!(
                    "config mode: expected forward, spin or panic, got {other:?}"
                )));
            }
        };
        Ok(Hostile { mode })
    }
}

impl Orchestrator for Hostile {
    fn run(
        &mut self,
        _req: &RequestInfo,
        inputs: Vec<Tensor>,
        models: &Models,
    ) -> Result<Vec<Tensor>> {
        match &self.mode {
            Mode::Forward(model) => Ok(models.infer(model, inputs)?),
            Mode::Spin => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            Mode::Panic => panic!("hostile-orchestrator was told to panic"),
        }
    }
}

export_orchestrator!(Hostile);
