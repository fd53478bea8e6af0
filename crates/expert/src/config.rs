//! Typed configuration with documented defaults (the defaults are hivemind's / torch's).

use std::fmt;
use std::str::FromStr;

use crate::error::ExpertError;

/// The experts of the built-in zoo, named as hivemind's `name_to_block` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpertKind {
    /// `ffn`: hivemind's `FeedforwardBlock`, `LayerNorm(x + Linear(4h→h)(gelu_fast(Linear(h→4h)(x))))`, eps 1e-12.
    /// Input `(B, h)`, output `(B, h)`.
    Ffn,
    /// `transformer`: hivemind's `TunedTransformer`, a post-norm encoder layer with 16 heads and a 4h
    /// feed-forward. Inputs `(B, S, h)` f32 and a `(B, S)` padding mask (non-zero = padding); output `(B, S, h)`.
    /// Runs without dropout (see the crate docs).
    Transformer,
    /// `nop`: returns its input; one empty parameter `w`.
    Nop,
    /// `det_dropout`: hivemind's `DeterministicDropoutNetwork`, `Linear(2h→h)(relu(Linear(h→2h)(x·mask/0.8)))`.
    /// Inputs `(B, h)` f32 and a `(B, h)` 0/1 mask (as f32); output `(B, h)`.
    DetDropout,
}

impl ExpertKind {
    /// Every kind of the zoo.
    pub const ALL: [ExpertKind; 4] = [Self::Ffn, Self::Transformer, Self::Nop, Self::DetDropout];

    /// hivemind's name for this expert class.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ffn => "ffn",
            Self::Transformer => "transformer",
            Self::Nop => "nop",
            Self::DetDropout => "det_dropout",
        }
    }

    /// How many input tensors `forward` takes (and `backward` returns gradients for).
    pub fn num_inputs(self) -> usize {
        match self {
            Self::Ffn | Self::Nop => 1,
            Self::Transformer | Self::DetDropout => 2,
        }
    }
}

impl fmt::Display for ExpertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ExpertKind {
    type Err = ExpertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| ExpertError::UnknownKind { name: s.to_owned() })
    }
}

/// What expert to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertConfig {
    /// Which expert of the zoo.
    pub kind: ExpertKind,
    /// The hidden dimension `h` (hivemind's `--hidden_dim`; hivemind's default is 1024).
    pub hid_dim: usize,
}

impl ExpertConfig {
    /// An expert of `kind` with hidden dimension `hid_dim`.
    pub fn new(kind: ExpertKind, hid_dim: usize) -> Self {
        Self { kind, hid_dim }
    }
}

/// The optimizer applied on every backward call. Defaults are torch's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerConfig {
    /// `torch.optim.Adam` (hivemind's server default).
    Adam {
        /// Learning rate; default 1e-3.
        lr: f64,
        /// `(beta1, beta2)`; default `(0.9, 0.999)`.
        betas: (f64, f64),
        /// Added to the denominator; default 1e-8.
        eps: f64,
        /// L2 penalty added to the gradient; default 0.
        weight_decay: f64,
    },
    /// `torch.optim.AdamW` (decoupled weight decay).
    AdamW {
        /// Learning rate; default 1e-3.
        lr: f64,
        /// `(beta1, beta2)`; default `(0.9, 0.999)`.
        betas: (f64, f64),
        /// Added to the denominator; default 1e-8.
        eps: f64,
        /// Decoupled weight decay; default 1e-2.
        weight_decay: f64,
    },
    /// `torch.optim.SGD`.
    Sgd {
        /// Learning rate; default 1e-3.
        lr: f64,
        /// Momentum factor; default 0.
        momentum: f64,
        /// Dampening for momentum; default 0.
        dampening: f64,
        /// L2 penalty added to the gradient; default 0.
        weight_decay: f64,
        /// Nesterov momentum; default false.
        nesterov: bool,
    },
}

impl OptimizerConfig {
    /// Adam with torch's defaults.
    pub fn adam() -> Self {
        Self::Adam {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// AdamW with torch's defaults.
    pub fn adamw() -> Self {
        Self::AdamW {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }

    /// SGD with torch's defaults.
    pub fn sgd() -> Self {
        Self::Sgd {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }

    /// The base learning rate (before the schedule).
    pub fn lr(&self) -> f64 {
        match *self {
            Self::Adam { lr, .. } | Self::AdamW { lr, .. } | Self::Sgd { lr, .. } => lr,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ExpertError> {
        let bad = |m: String| Err(ExpertError::BadConfig(m));
        let lr = self.lr();
        if !(lr.is_finite() && lr >= 0.0) {
            return bad(format!("learning rate {lr} must be finite and >= 0"));
        }
        match *self {
            Self::Adam {
                betas,
                eps,
                weight_decay,
                ..
            }
            | Self::AdamW {
                betas,
                eps,
                weight_decay,
                ..
            } => {
                if !(0.0..1.0).contains(&betas.0) || !(0.0..1.0).contains(&betas.1) {
                    return bad(format!("betas {betas:?} must lie in [0, 1)"));
                }
                if !(eps.is_finite() && eps >= 0.0) {
                    return bad(format!("eps {eps} must be finite and >= 0"));
                }
                if !(weight_decay.is_finite() && weight_decay >= 0.0) {
                    return bad(format!("weight_decay {weight_decay} must be finite and >= 0"));
                }
            }
            Self::Sgd {
                momentum,
                dampening,
                weight_decay,
                nesterov,
                ..
            } => {
                if !(momentum.is_finite() && momentum >= 0.0 && dampening.is_finite()) {
                    return bad(format!("momentum {momentum} / dampening {dampening} invalid"));
                }
                if !(weight_decay.is_finite() && weight_decay >= 0.0) {
                    return bad(format!("weight_decay {weight_decay} must be finite and >= 0"));
                }
                if nesterov && (momentum <= 0.0 || dampening != 0.0) {
                    return bad("nesterov momentum requires a momentum and zero dampening".into());
                }
            }
        }
        Ok(())
    }
}

impl Default for OptimizerConfig {
    /// Adam with torch's defaults, as hivemind's server uses.
    fn default() -> Self {
        Self::adam()
    }
}

/// The learning-rate schedule (hivemind's `--scheduler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScheduleConfig {
    /// Constant learning rate (hivemind's `none`, the default).
    #[default]
    None,
    /// hivemind's `linear`: `get_linear_schedule_with_warmup`. The factor at step `t` (0 before the first
    /// optimizer step) is `t / max(1, warmup)` while `t < warmup`, then
    /// `max(0, (training - t) / max(1, training - warmup))`.
    Linear {
        /// `num_warmup_steps`.
        warmup_steps: u64,
        /// `num_training_steps`.
        training_steps: u64,
    },
}

impl ScheduleConfig {
    /// The learning-rate factor after `step` optimizer steps.
    pub fn factor(&self, step: u64) -> f64 {
        match *self {
            Self::None => 1.0,
            Self::Linear {
                warmup_steps,
                training_steps,
            } => {
                if step < warmup_steps {
                    step as f64 / warmup_steps.max(1) as f64
                } else {
                    let left = training_steps as f64 - step as f64;
                    let span = training_steps.saturating_sub(warmup_steps).max(1) as f64;
                    (left / span).max(0.0)
                }
            }
        }
    }
}

/// How a [`crate::ExpertBackend`] trains its expert.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BackendConfig {
    /// The optimizer; default Adam with torch's defaults.
    pub optimizer: OptimizerConfig,
    /// The learning-rate schedule; default none.
    pub schedule: ScheduleConfig,
    /// Clip the global gradient norm to this value before each step (torch's `clip_grad_norm_`, hivemind's
    /// `--clip_grad_norm`); default `None` (no clipping).
    pub clip_grad_norm: Option<f64>,
}
