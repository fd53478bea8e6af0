//! Fused, in-place optimizers over contiguous f32 buffers, with torch's exact update rules.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{CpuStorage, Device, InplaceOp1, Layout, Tensor, Var};
use rayon::prelude::*;

use crate::config::OptimizerConfig;
use crate::error::{ExpertError, Result};
use crate::kernels::CHUNK;
use crate::util::{mut_f32, with_f32};

/// Per-parameter optimizer state (torch's `exp_avg` / `exp_avg_sq` / `momentum_buffer`).
#[derive(Debug, Default)]
struct ParamState {
    a: Vec<f32>,
    b: Vec<f32>,
}

/// An optimizer over a fixed list of parameters.
#[derive(Debug)]
pub(crate) struct Optimizer {
    config: OptimizerConfig,
    state: Vec<ParamState>,
    steps: u64,
}

/// The global L2 norm of `grads`, computed in f64 (non-finite when any element is).
pub(crate) fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sq = 0f64;
    for (i, g) in grads.iter().enumerate() {
        sq += with_f32(g, &format!("parameter grad {i}"), |s| {
            s.par_chunks(CHUNK).map(sum_squares).sum::<f64>()
        })?;
    }
    Ok(sq.sqrt())
}

/// `Σ v²` of a chunk: eight independent f32 lanes (so the loop vectorises), summed in f64 at the end.
fn sum_squares(c: &[f32]) -> f64 {
    let mut acc = [0f32; 8];
    let mut blocks = c.chunks_exact(8);
    for b in &mut blocks {
        for (a, &v) in acc.iter_mut().zip(b) {
            *a += v * v;
        }
    }
    let tail: f64 = blocks.remainder().iter().map(|&v| (v as f64) * (v as f64)).sum();
    acc.iter().map(|&a| a as f64).sum::<f64>() + tail
}

/// One step of one parameter, applied in place to its storage.
struct StepOp<'a> {
    config: OptimizerConfig,
    lr: f32,
    /// Adam: `lr / (1 - beta1^t)`; SGD: unused.
    step_size: f32,
    /// Adam: `sqrt(1 - beta2^t)`.
    bc2_sqrt: f32,
    first: bool,
    grad_scale: f32,
    grad: &'a [f32],
    state: Mutex<&'a mut ParamState>,
}

impl InplaceOp1 for StepOp<'_> {
    fn name(&self) -> &'static str {
        "apiary-fused-optimizer-step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let p = mut_f32(storage, layout)?;
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let st: &mut ParamState = &mut guard;
        let n = p.len();
        if self.grad.len() != n {
            candle_core::bail!("gradient has {} elements, parameter {n}", self.grad.len())
        }
        let gs = self.grad_scale;
        let lr = self.lr;
        match self.config {
            OptimizerConfig::Adam {
                betas,
                eps,
                weight_decay,
                ..
            }
            | OptimizerConfig::AdamW {
                betas,
                eps,
                weight_decay,
                ..
            } => {
                if st.a.len() != n {
                    st.a = vec![0.0; n];
                    st.b = vec![0.0; n];
                }
                let decoupled = matches!(self.config, OptimizerConfig::AdamW { .. });
                let b2 = betas.1 as f32;
                let (omb1, omb2) = ((1.0 - betas.0) as f32, (1.0 - betas.1) as f32);
                let wd = weight_decay as f32;
                let decay = (1.0 - lr as f64 * weight_decay) as f32;
                let eps = eps as f32;
                let (step_size, bc2) = (self.step_size, self.bc2_sqrt);
                p.par_chunks_mut(CHUNK)
                    .zip(self.grad.par_chunks(CHUNK))
                    .zip(st.a.par_chunks_mut(CHUNK).zip(st.b.par_chunks_mut(CHUNK)))
                    .for_each(|((p, g), (m, v))| {
                        for ((p, &g), (m, v)) in p.iter_mut().zip(g).zip(m.iter_mut().zip(v.iter_mut())) {
                            let mut g = g * gs;
                            if decoupled {
                                *p *= decay;
                            } else if wd != 0.0 {
                                g += wd * *p;
                            }
                            // torch: exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
                            *m += omb1 * (g - *m);
                            *v = *v * b2 + omb2 * g * g;
                            let denom = v.sqrt() / bc2 + eps;
                            *p += -step_size * (*m / denom);
                        }
                    });
            }
            OptimizerConfig::Sgd {
                momentum,
                dampening,
                weight_decay,
                nesterov,
                ..
            } => {
                let wd = weight_decay as f32;
                let mom = momentum as f32;
                let omd = (1.0 - dampening) as f32;
                if mom != 0.0 && st.a.len() != n {
                    st.a = vec![0.0; n];
                }
                let first = self.first || st.a.len() != n;
                let buf: &mut [f32] = if mom != 0.0 { &mut st.a } else { &mut [] };
                let sgd = |p: &mut [f32], g: &[f32], buf: &mut [f32]| {
                    for (i, (p, &g)) in p.iter_mut().zip(g).enumerate() {
                        let mut d = g * gs;
                        if wd != 0.0 {
                            d += wd * *p;
                        }
                        if mom != 0.0 {
                            let b = &mut buf[i];
                            *b = if first { d } else { mom * *b + omd * d };
                            d = if nesterov { d + mom * *b } else { *b };
                        }
                        *p += -lr * d;
                    }
                };
                if mom != 0.0 {
                    p.par_chunks_mut(CHUNK)
                        .zip(self.grad.par_chunks(CHUNK))
                        .zip(buf.par_chunks_mut(CHUNK))
                        .for_each(|((p, g), b)| sgd(p, g, b));
                } else {
                    p.par_chunks_mut(CHUNK)
                        .zip(self.grad.par_chunks(CHUNK))
                        .for_each(|(p, g)| sgd(p, g, &mut []));
                }
            }
        }
        Ok(())
    }
}

impl Optimizer {
    pub(crate) fn new(config: OptimizerConfig, num_params: usize) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            state: (0..num_params).map(|_| ParamState::default()).collect(),
            steps: 0,
        })
    }

    /// Steps taken so far.
    pub(crate) fn steps(&self) -> u64 {
        self.steps
    }

    /// The state as named tensors: `kind` (0 Adam, 1 AdamW, 2 SGD), `steps`, and per parameter
    /// `a.<name>` / `b.<name>` (torch's `exp_avg` / `exp_avg_sq`, or SGD's `momentum_buffer`) once they exist.
    pub(crate) fn state_tensors(&self, names: &[String]) -> Result<HashMap<String, Tensor>> {
        let mut map = HashMap::new();
        map.insert("kind".to_owned(), Tensor::new(&[self.kind()], &Device::Cpu)?);
        map.insert(
            "steps".to_owned(),
            Tensor::new(&[self.steps as i64], &Device::Cpu)?,
        );
        for (name, state) in names.iter().zip(&self.state) {
            for (prefix, buf) in [("a", &state.a), ("b", &state.b)] {
                if !buf.is_empty() {
                    map.insert(
                        format!("{prefix}.{name}"),
                        Tensor::from_slice(buf, buf.len(), &Device::Cpu)?,
                    );
                }
            }
        }
        Ok(map)
    }

    /// Restores [`Optimizer::state_tensors`]; `numels` are the parameters' element counts. Refuses a state
    /// of another optimizer or shape, changing nothing.
    pub(crate) fn load_state(
        &mut self,
        names: &[String],
        numels: &[usize],
        map: &HashMap<String, Tensor>,
    ) -> Result<()> {
        let bad = |problem: String| ExpertError::BadConfig(format!("optimizer state: {problem}"));
        let scalar_u8 = |key: &str| -> Result<u8> {
            let t = map.get(key).ok_or_else(|| bad(format!("no `{key}`")))?;
            Ok(t.to_dtype(candle_core::DType::U8)?
                .flatten_all()?
                .to_vec1::<u8>()?
                .first()
                .copied()
                .unwrap_or(u8::MAX))
        };
        if scalar_u8("kind")? != self.kind() {
            return Err(bad("it belongs to another optimizer".into()));
        }
        let steps_t = map.get("steps").ok_or_else(|| bad("no `steps`".into()))?;
        let steps = steps_t
            .to_dtype(candle_core::DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?;
        let steps = u64::try_from(*steps.first().ok_or_else(|| bad("empty `steps`".into()))?)
            .map_err(|_| bad("negative `steps`".into()))?;
        let mut state = Vec::with_capacity(names.len());
        for (name, numel) in names.iter().zip(numels) {
            let mut one = ParamState::default();
            for (prefix, buf) in [("a", &mut one.a), ("b", &mut one.b)] {
                if let Some(t) = map.get(&format!("{prefix}.{name}")) {
                    let v = t
                        .to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    if v.len() != *numel {
                        return Err(bad(format!(
                            "`{prefix}.{name}` has {} values, the parameter {numel}",
                            v.len()
                        )));
                    }
                    *buf = v;
                }
            }
            state.push(one);
        }
        self.state = state;
        self.steps = steps;
        Ok(())
    }

    fn kind(&self) -> u8 {
        match self.config {
            OptimizerConfig::Adam { .. } => 0,
            OptimizerConfig::AdamW { .. } => 1,
            OptimizerConfig::Sgd { .. } => 2,
        }
    }

    /// One step with learning rate `lr` on `params`, each gradient multiplied by `grad_scale` first
    /// (the clipping coefficient, or 1). Empty parameters are skipped, as torch skips grad-less ones.
    pub(crate) fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64, grad_scale: f32) -> Result<()> {
        if params.len() != grads.len() || params.len() != self.state.len() {
            return Err(ExpertError::Arity {
                what: "parameter gradients",
                expected: params.len(),
                got: grads.len(),
            });
        }
        // validate everything first: a step is applied to all parameters or to none
        for (param, grad) in params.iter().zip(grads) {
            if grad.dims() != param.dims() {
                return Err(ExpertError::Shape {
                    what: "parameter gradient".into(),
                    expected: param.dims().to_vec(),
                    got: grad.dims().to_vec(),
                });
            }
        }
        let t = self.steps + 1;
        let (step_size, bc2_sqrt) = match self.config {
            OptimizerConfig::Adam { betas, .. } | OptimizerConfig::AdamW { betas, .. } => {
                let bc1 = 1.0 - betas.0.powi(t.min(i32::MAX as u64) as i32);
                let bc2 = 1.0 - betas.1.powi(t.min(i32::MAX as u64) as i32);
                ((lr / bc1) as f32, bc2.sqrt() as f32)
            }
            OptimizerConfig::Sgd { .. } => (0.0, 1.0),
        };
        for ((param, grad), state) in params.iter().zip(grads).zip(self.state.iter_mut()) {
            if param.elem_count() == 0 {
                continue;
            }
            with_f32(grad, "parameter gradient", |g| {
                let op = StepOp {
                    config: self.config,
                    lr: lr as f32,
                    step_size,
                    bc2_sqrt,
                    first: t == 1,
                    grad_scale,
                    grad: g,
                    state: Mutex::new(state),
                };
                param.as_tensor().inplace_op1(&op)
            })??;
        }
        self.steps = t;
        Ok(())
    }
}
