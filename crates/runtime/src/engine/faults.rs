//! Model runs that fail on purpose (the `fault-injection` feature, for tests only): what the
//! engine does after a failed run, with a real model. Each injected failure comes after the run
//! itself, so the KV cache has been written as a real failure part way through may leave it.

use crate::model::ModelError;

/// Which runs fail. Built with [`FaultPlan::default`] and its setters; given to
/// `EngineConfigBuilder::fault_plan`.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    prefill_token: Option<u32>,
    decode_step: Option<u64>,
}

impl FaultPlan {
    /// Every prefill run (batched or alone) whose tokens include `token` fails.
    pub fn fail_prefill_with_token(mut self, token: u32) -> Self {
        self.prefill_token = Some(token);
        self
    }

    /// The engine's `step`-th batched decode run (counted from 0) fails.
    pub fn fail_decode_step(mut self, step: u64) -> Self {
        self.decode_step = Some(step);
        self
    }

    pub(crate) fn check_prefill(&self, tokens: &[u32]) -> Result<(), ModelError> {
        match self.prefill_token {
            Some(t) if tokens.contains(&t) => {
                Err(ModelError::Step(format!("injected fault: a prefill with token {t}")))
            }
            _ => Ok(()),
        }
    }

    pub(crate) fn check_decode(&self, step: u64) -> Result<(), ModelError> {
        match self.decode_step {
            Some(s) if s == step => Err(ModelError::Step(format!("injected fault: decode step {step}"))),
            _ => Ok(()),
        }
    }
}
