//! [`ExpertBackend`]: an expert with its optimizer, schedule and clipping — hivemind's `ModuleBackend`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::BackendConfig;
use crate::error::{ExpertError, Result};
use crate::optim::{Optimizer, global_norm};
use crate::util::all_finite;
use crate::zoo::{Expert, Gradients};

/// The expert's parameters in a checkpoint directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The optimizer's state in a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// An expert that trains itself on every backward call, as hivemind's `ModuleBackend` does:
/// `backward` re-runs the forward pass, computes gradients for the inputs and parameters, optionally clips
/// the parameters' global gradient norm, and applies one optimizer step at the scheduled learning rate.
///
/// Stricter than hivemind: non-finite gradients (in `grad_outputs` or in the parameters' gradients) are
/// rejected with [`ExpertError::NonFiniteGradient`] and no step is taken.
#[derive(Debug)]
pub struct ExpertBackend {
    expert: Expert,
    config: BackendConfig,
    optimizer: Optimizer,
}

/// What one backward call did besides returning the input gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The learning rate the step used.
    pub lr: f64,
    /// The parameters' global gradient norm before clipping.
    pub grad_norm: f64,
    /// The factor the gradients were multiplied by (1 without clipping).
    pub clip_coef: f64,
}

impl ExpertBackend {
    /// Wraps `expert` with the optimizer, schedule and clipping of `config`.
    pub fn new(expert: Expert, config: BackendConfig) -> Result<Self> {
        if let Some(c) = config.clip_grad_norm
            && !(c.is_finite() && c > 0.0)
        {
            return Err(ExpertError::BadConfig(format!(
                "clip_grad_norm {c} must be finite and positive"
            )));
        }
        let optimizer = Optimizer::new(config.optimizer, expert.param_names().len())?;
        Ok(Self {
            expert,
            config,
            optimizer,
        })
    }

    /// This backend with its expert on `device` (see [`Expert::to_device`]); the optimizer's state follows
    /// at the next step.
    pub fn to_device(self, device: &Device) -> Result<Self> {
        Ok(Self {
            expert: self.expert.to_device(device)?,
            ..self
        })
    }

    /// This backend computing through the portable path even on the CPU (see
    /// [`Expert::with_portable_path`]); the optimizer then steps with candle ops too.
    pub fn with_portable_path(self, portable: bool) -> Self {
        Self {
            expert: self.expert.with_portable_path(portable),
            ..self
        }
    }

    /// The expert (for checkpoints and inspection).
    pub fn expert(&self) -> &Expert {
        &self.expert
    }

    /// The training config.
    pub fn config(&self) -> &BackendConfig {
        &self.config
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.optimizer.steps()
    }

    /// The learning rate the next step will use (base rate × schedule factor).
    pub fn current_lr(&self) -> f64 {
        self.config.optimizer.lr() * self.config.schedule.factor(self.optimizer.steps())
    }

    /// Saves the expert (`<dir>/checkpoint.safetensors`, torch `state_dict` names) and the optimizer's
    /// state with its step count, which the schedule follows (`<dir>/optimizer.safetensors`), each written
    /// to a temporary file first and renamed into place, so a crash never leaves half a checkpoint.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let io = |problem: std::io::Error| ExpertError::Checkpoint {
            path: dir.to_owned(),
            problem: problem.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let params = dir.join(CHECKPOINT_FILE);
        let tmp = params.with_extension("safetensors.tmp");
        self.expert.save(&tmp)?;
        std::fs::rename(&tmp, &params).map_err(io)?;
        let state = self.optimizer.state_tensors(self.expert.param_names())?;
        let path = dir.join(OPTIMIZER_FILE);
        let tmp = path.with_extension("safetensors.tmp");
        candle_core::safetensors::save(&state, &tmp)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(())
    }

    /// Loads an expert saved by [`ExpertBackend::save_checkpoint`] from `dir`. A missing or unreadable
    /// optimizer state (or one of another optimizer) is not an error: the expert resumes with a fresh
    /// optimizer, and the second value says why. The backend is on the CPU; [`Self::to_device`] moves it.
    pub fn load_checkpoint(
        expert_config: crate::ExpertConfig,
        config: BackendConfig,
        dir: &Path,
    ) -> Result<(Self, Option<String>)> {
        let expert = Expert::load(expert_config, &dir.join(CHECKPOINT_FILE))?;
        let mut backend = Self::new(expert, config)?;
        let path = dir.join(OPTIMIZER_FILE);
        if !path.exists() {
            return Ok((backend, Some("no optimizer state".into())));
        }
        let numels: Vec<usize> = backend
            .expert
            .param_vars()
            .iter()
            .map(|v| v.elem_count())
            .collect();
        let loaded = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
            .map_err(ExpertError::from)
            .and_then(|map| {
                backend
                    .optimizer
                    .load_state(backend.expert.param_names(), &numels, &map)
            });
        Ok(match loaded {
            Ok(()) => (backend, None),
            Err(e) => (backend, Some(e.to_string())),
        })
    }

    /// Outputs for a batch, without gradients.
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.expert.forward(inputs)
    }

    /// Gradients of the inputs for a batch, after which the expert takes one optimizer step.
    pub fn backward(&mut self, inputs: &[Tensor], grad_outputs: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(self.backward_with_report(inputs, grad_outputs)?.0)
    }

    /// [`Self::backward`], also returning what the step did.
    pub fn backward_with_report(
        &mut self,
        inputs: &[Tensor],
        grad_outputs: &[Tensor],
    ) -> Result<(Vec<Tensor>, StepReport)> {
        for (i, g) in grad_outputs.iter().enumerate() {
            if !all_finite(g, "grad_outputs")? {
                return Err(ExpertError::NonFiniteGradient {
                    what: format!("grad_outputs[{i}]"),
                });
            }
        }
        let grads = self.expert.backward(inputs, grad_outputs)?;
        let report = self.apply(&grads)?;
        Ok((grads.inputs, report))
    }

    /// Applies one optimizer step with already computed gradients (clipping and schedule included).
    pub fn apply(&mut self, grads: &Gradients) -> Result<StepReport> {
        let norm = global_norm(&grads.params)?;
        if !norm.is_finite() {
            return Err(ExpertError::NonFiniteGradient {
                what: "parameter gradients".into(),
            });
        }
        // (masks' gradients are integer zeros: nothing to check)
        for (i, g) in grads
            .inputs
            .iter()
            .enumerate()
            .filter(|(_, g)| g.dtype() == DType::F32)
        {
            if !all_finite(g, "input grad")? {
                return Err(ExpertError::NonFiniteGradient {
                    what: format!("input gradient {i}"),
                });
            }
        }
        // torch.nn.utils.clip_grad_norm_: coef = max_norm / (total_norm + 1e-6), clamped to 1
        let clip_coef = match self.config.clip_grad_norm {
            Some(max) => (max / (norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        let lr = self.current_lr();
        self.optimizer.step_with(
            self.expert.param_vars(),
            &grads.params,
            lr,
            clip_coef as f32,
            self.expert.fast(),
        )?;
        Ok(StepReport {
            lr,
            grad_norm: norm,
            clip_coef,
        })
    }
}
