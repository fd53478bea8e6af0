//! The expert zoo and its training backends: hivemind's `ffn`, `transformer`, `nop` and `det_dropout`
//! experts in candle (f32), numerically equal to hivemind's torch modules given the same weights.
//!
//! Experts compute on the CPU by default; with the `cuda` feature (candle's CUDA backend, built with the
//! CUDA toolkit) [`Expert::to_device`] / [`ExpertBackend::to_device`] put them on an NVIDIA GPU, where
//! they run the portable path: plain candle ops, candle's autograd, and the optimizers written in candle
//! ops with their state on the GPU. The tests hold the portable path equal to the CPU fast paths (and run
//! on a GPU with `APIARY_TEST_DEVICE=cuda`).
//!
//! - [`Expert`]: parameters named as the torch module's `state_dict()` (safetensors checkpoints load in
//!   both), `forward`, and `backward` (input and parameter gradients). `ffn` and `transformer` run
//!   hand-written fast paths (explicit matmuls, fused bias + `gelu_fast` and its derivative, LayerNorm and
//!   softmax forward and backward by hand, no autograd); `det_dropout` uses candle's autograd; `nop` is the
//!   identity. [`Expert::forward_reference`] / [`Expert::backward_reference`] run every kind through plain
//!   candle ops and candle's autograd — the reference the fast paths are tested against.
//! - [`ExpertBackend`]: hivemind's `ModuleBackend` — every backward call takes one optimizer step
//!   (Adam by default; AdamW, SGD) with a learning-rate schedule (`none`, hivemind's `linear`) and optional
//!   global-norm clipping, applied by a fused in-place update over the parameter buffers.
//!
//! ```
//! use apiary_expert::{BackendConfig, Expert, ExpertBackend, ExpertConfig, ExpertKind};
//! use candle_core::{Device, Tensor};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let expert = Expert::new(ExpertConfig::new(ExpertKind::Ffn, 64), 42)?; // seeded torch-style init
//! let mut backend = ExpertBackend::new(expert, BackendConfig::default())?; // Adam, lr 1e-3
//! let x = Tensor::randn(0f32, 1.0, (8, 64), &Device::Cpu)?;
//! let y = backend.forward(&[x.clone()])?;
//! let dx = backend.backward(&[x], &[y[0].ones_like()?])?; // input grads; the expert took one Adam step
//! assert_eq!(dx[0].dims(), &[8, 64]);
//! assert_eq!(backend.steps(), 1);
//! # Ok(())
//! # }
//! ```
//!
//! Checkpoints: [`Expert::save`] / [`Expert::load`] write and read safetensors with the torch module's
//! `state_dict()` names (`ffn.weight`, `ffn.bias`, `ffn_output.weight`, …, `layer_norm.bias` for `ffn`).
//!
//! Differences from hivemind, on purpose: the `transformer` expert runs without dropout (hivemind's
//! `TunedTransformer` stays in training mode and drops 10% at random, which its own backward — a re-run of
//! the forward pass — cannot reproduce); non-finite gradients are refused instead of applied.

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod backend;
pub mod checkpoints;
mod config;
mod error;
mod ffn;
mod graph;
mod kernels;
pub mod optim;
pub mod runtime;
pub mod schema;
pub mod server;
mod transformer;
mod util;
mod zoo;

/// Differentiable building blocks in plain candle ops — the reference path's — for trainers' own models.
pub mod ops {
    pub use crate::graph::{gelu_fast, layer_norm, linear, softmax_last};
    pub use crate::util::all_finite;
}

pub use backend::{CHECKPOINT_FILE, ExpertBackend, OPTIMIZER_FILE, StepReport};
pub use config::{BackendConfig, ExpertConfig, ExpertKind, OptimizerConfig, ScheduleConfig};
pub use error::{ExpertError, Result};
pub use optim::{Optimizer, global_norm};
pub use runtime::{ExpertStats, Gate, Runtime, RuntimeConfig, RuntimeHandle, RuntimeStats};
pub use zoo::{Expert, Gradients};

#[cfg(test)]
mod unit_tests;
