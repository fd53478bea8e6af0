//! Optimizers with torch's exact update rules: fused and in place over contiguous f32 buffers on the CPU,
//! or in plain candle ops (the portable path: on a GPU, or when the expert is told to) with the state
//! as tensors on the parameters' device.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor, Var};
use rayon::prelude::*;

use crate::config::OptimizerConfig;
use crate::error::{ExpertError, Result};
use crate::kernels::CHUNK;
use crate::util::{mut_f32, with_f32};

/// Per-parameter optimizer state (torch's `exp_avg` / `exp_avg_sq` / `momentum_buffer`): host buffers for
/// the fused CPU step, or tensors on the parameter's device for the portable step. One of the two holds
/// the state at any time; a step on the other path moves it over.
#[derive(Debug, Default)]
struct ParamState {
    a: Vec<f32>,
    b: Vec<f32>,
    on_device: Option<(Tensor, Option<Tensor>)>,
}

impl ParamState {
    /// The state as host buffers (moving it off the device if it lives there).
    fn move_to_host(&mut self) -> Result<()> {
        if let Some((a, b)) = self.on_device.take() {
            self.a = a.flatten_all()?.to_vec1::<f32>()?;
            self.b = match b {
                Some(b) => b.flatten_all()?.to_vec1::<f32>()?,
                None => Vec::new(),
            };
        }
        Ok(())
    }

    /// The state as tensors shaped like `param` on its device (zeros when there is none yet, and `b`
    /// only with `two` buffers), moving host buffers over.
    fn move_to_device(&mut self, param: &Tensor, two: bool) -> Result<(Tensor, Option<Tensor>)> {
        if self.on_device.is_none() {
            let upload = |v: &[f32]| -> Result<Tensor> {
                Ok(if v.len() == param.elem_count() {
                    Tensor::from_slice(v, param.shape(), param.device())?
                } else {
                    param.zeros_like()?
                })
            };
            let a = upload(&self.a)?;
            let b = if two { Some(upload(&self.b)?) } else { None };
            self.on_device = Some((a, b));
            self.a = Vec::new();
            self.b = Vec::new();
        }
        match &self.on_device {
            Some((a, b)) => Ok((a.clone(), b.clone())),
            None => Err(ExpertError::BadConfig("optimizer state vanished".into())),
        }
    }

    /// Whether an SGD momentum buffer exists (on either side).
    fn has_momentum(&self, n: usize) -> bool {
        self.on_device.is_some() || self.a.len() == n
    }
}

/// An optimizer over a fixed list of parameters, with torch's update rules (Adam, AdamW, SGD): what every
/// expert steps with, and what a trainer may use for its own parameters.
///
/// ```
/// use apiary_expert::{Optimizer, OptimizerConfig};
/// use candle_core::{Device, Tensor, Var};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let w = Var::from_tensor(&Tensor::ones(4, candle_core::DType::F32, &Device::Cpu)?)?;
/// let mut opt = Optimizer::new(OptimizerConfig::sgd(), 1)?;
/// let grad = Tensor::ones(4, candle_core::DType::F32, &Device::Cpu)?;
/// opt.step(&[w.clone()], &[grad], 0.5, 1.0)?;
/// assert_eq!(w.as_tensor().to_vec1::<f32>()?, vec![0.5; 4]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Optimizer {
    config: OptimizerConfig,
    state: Vec<ParamState>,
    steps: u64,
}

/// The global L2 norm of `grads` (non-finite when any element is): summed in f64 on the CPU, one f32
/// reduction per tensor elsewhere.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sq = 0f64;
    for (i, g) in grads.iter().enumerate() {
        sq += if g.device().is_cpu() {
            with_f32(g, &format!("parameter grad {i}"), |s| {
                s.par_chunks(CHUNK).map(sum_squares).sum::<f64>()
            })?
        } else {
            g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?
        };
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

/// The portable step: the same update rules as [`StepOp`], in candle ops on the parameter's device.
struct StepRule {
    config: OptimizerConfig,
    lr: f32,
    step_size: f32,
    bc2_sqrt: f32,
    first: bool,
    grad_scale: f32,
}

impl StepRule {
    fn apply(&self, param: &Var, grad: &Tensor, state: &mut ParamState) -> Result<()> {
        let p = param.as_tensor().detach();
        let grad = grad.to_device(p.device())?;
        let mut g = (grad * self.grad_scale as f64)?;
        let lr = self.lr as f64;
        let updated = match self.config {
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
                let mut p = p;
                if matches!(self.config, OptimizerConfig::AdamW { .. }) {
                    p = (p * (1.0 - lr * weight_decay) as f32 as f64)?;
                } else if weight_decay != 0.0 {
                    g = (g + (&p * weight_decay as f32 as f64)?)?;
                }
                let (m, v) = state.move_to_device(&p, true)?;
                let v = v.ok_or_else(|| ExpertError::BadConfig("Adam state without exp_avg_sq".into()))?;
                let (omb1, omb2) = ((1.0 - betas.0) as f32 as f64, (1.0 - betas.1) as f32 as f64);
                let m = (&m + ((&g - &m)? * omb1)?)?;
                let v = ((v * betas.1 as f32 as f64)? + (g.sqr()? * omb2)?)?;
                let denom = ((v.sqrt()? / self.bc2_sqrt as f64)? + eps as f32 as f64)?;
                let p = (p - ((&m / denom)? * self.step_size as f64)?)?;
                state.on_device = Some((m, Some(v)));
                p
            }
            OptimizerConfig::Sgd {
                momentum,
                dampening,
                weight_decay,
                nesterov,
                ..
            } => {
                if weight_decay != 0.0 {
                    g = (g + (&p * weight_decay as f32 as f64)?)?;
                }
                let mom = momentum as f32 as f64;
                if mom != 0.0 {
                    let first = self.first || !state.has_momentum(p.elem_count());
                    let (buf, _) = state.move_to_device(&p, false)?;
                    let buf = if first {
                        g.clone()
                    } else {
                        ((buf * mom)? + (&g * (1.0 - dampening) as f32 as f64)?)?
                    };
                    g = if nesterov {
                        (g + (&buf * mom)?)?
                    } else {
                        buf.clone()
                    };
                    state.on_device = Some((buf, None));
                }
                (p - (g * lr)?)?
            }
        };
        param.set(&updated)?;
        Ok(())
    }
}

impl Optimizer {
    /// An optimizer for `num_params` parameters (validating `config`).
    pub fn new(config: OptimizerConfig, num_params: usize) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            state: (0..num_params).map(|_| ParamState::default()).collect(),
            steps: 0,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The state as named CPU tensors: `kind` (0 Adam, 1 AdamW, 2 SGD), `steps`, and per parameter
    /// `a.<name>` / `b.<name>` (torch's `exp_avg` / `exp_avg_sq`, or SGD's `momentum_buffer`) once they exist.
    pub(crate) fn state_tensors(&self, names: &[String]) -> Result<HashMap<String, Tensor>> {
        let mut map = HashMap::new();
        map.insert("kind".to_owned(), Tensor::new(&[self.kind()], &Device::Cpu)?);
        map.insert(
            "steps".to_owned(),
            Tensor::new(&[self.steps as i64], &Device::Cpu)?,
        );
        for (name, state) in names.iter().zip(&self.state) {
            if let Some((a, b)) = &state.on_device {
                for (prefix, t) in [("a", Some(a)), ("b", b.as_ref())] {
                    if let Some(t) = t {
                        map.insert(
                            format!("{prefix}.{name}"),
                            t.flatten_all()?.to_device(&Device::Cpu)?,
                        );
                    }
                }
                continue;
            }
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
    /// CPU parameters step in place over their buffers (fused); others in candle ops on their device.
    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64, grad_scale: f32) -> Result<()> {
        self.step_with(params, grads, lr, grad_scale, true)
    }

    /// [`Self::step`]; without `fused`, CPU parameters step in candle ops too (the portable path).
    pub(crate) fn step_with(
        &mut self,
        params: &[Var],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f32,
        fused: bool,
    ) -> Result<()> {
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
            if !(fused && param.device().is_cpu()) {
                let rule = StepRule {
                    config: self.config,
                    lr: lr as f32,
                    step_size,
                    bc2_sqrt,
                    first: t == 1,
                    grad_scale,
                };
                rule.apply(param, grad, state)?;
                continue;
            }
            state.move_to_host()?;
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
