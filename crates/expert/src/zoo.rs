//! [`Expert`]: one expert of the zoo with its parameters, checkpoints, forward and backward passes.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::config::{ExpertConfig, ExpertKind};
use crate::error::{ExpertError, Result};
use crate::graph::{self, TRANSFORMER_HEADS};
use crate::util::{SplitMix64, tensor};
use crate::{ffn, transformer};

/// How a parameter starts (torch's default initialisation for that module).
#[derive(Debug, Clone, Copy)]
enum Init {
    /// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`: `nn.Linear` weights and biases.
    Linear {
        fan_in: usize,
    },
    /// Xavier-uniform `U(±sqrt(6/(fan_in+fan_out)))`: `MultiheadAttention.in_proj_weight`.
    Xavier {
        fan_in: usize,
        fan_out: usize,
    },
    Zeros,
    Ones,
}

/// Name, shape and initialisation of each parameter, in the torch module's `state_dict()` order.
fn param_specs(config: &ExpertConfig) -> Vec<(&'static str, Vec<usize>, Init)> {
    let h = config.hid_dim;
    let lin = |fan_in| Init::Linear { fan_in };
    match config.kind {
        ExpertKind::Ffn => vec![
            ("ffn.weight", vec![4 * h, h], lin(h)),
            ("ffn.bias", vec![4 * h], lin(h)),
            ("ffn_output.weight", vec![h, 4 * h], lin(4 * h)),
            ("ffn_output.bias", vec![h], lin(4 * h)),
            ("layer_norm.weight", vec![h], Init::Ones),
            ("layer_norm.bias", vec![h], Init::Zeros),
        ],
        ExpertKind::Transformer => vec![
            (
                "self_attn.in_proj_weight",
                vec![3 * h, h],
                Init::Xavier {
                    fan_in: h,
                    fan_out: 3 * h,
                },
            ),
            ("self_attn.in_proj_bias", vec![3 * h], Init::Zeros),
            ("self_attn.out_proj.weight", vec![h, h], lin(h)),
            ("self_attn.out_proj.bias", vec![h], Init::Zeros),
            ("linear1.weight", vec![4 * h, h], lin(h)),
            ("linear1.bias", vec![4 * h], lin(h)),
            ("linear2.weight", vec![h, 4 * h], lin(4 * h)),
            ("linear2.bias", vec![h], lin(4 * h)),
            ("norm1.weight", vec![h], Init::Ones),
            ("norm1.bias", vec![h], Init::Zeros),
            ("norm2.weight", vec![h], Init::Ones),
            ("norm2.bias", vec![h], Init::Zeros),
        ],
        ExpertKind::Nop => vec![("w", vec![0], Init::Zeros)],
        ExpertKind::DetDropout => vec![
            ("linear_in.weight", vec![2 * h, h], lin(h)),
            ("linear_in.bias", vec![2 * h], lin(h)),
            ("linear_out.weight", vec![h, 2 * h], lin(2 * h)),
            ("linear_out.bias", vec![h], lin(2 * h)),
        ],
    }
}

/// Gradients from one backward pass.
#[derive(Debug, Clone)]
pub struct Gradients {
    /// One gradient per input, shaped like it (zeros for masks, as hivemind returns).
    pub inputs: Vec<Tensor>,
    /// One gradient per parameter, in [`Expert::param_names`] order.
    pub params: Vec<Tensor>,
}

/// One expert of the zoo: its config and its parameters (f32), named as the torch module names them.
///
/// An expert computes on one candle [`Device`] (the CPU unless moved with [`Expert::to_device`]). On the CPU
/// `ffn` and `transformer` take hand-written fast paths; on any other device (CUDA with the `cuda`
/// feature), and on the CPU after [`Expert::with_portable_path`], every kind runs through plain candle ops
/// and candle's autograd — the portable path, which the tests hold equal to the fast one.
#[derive(Debug)]
pub struct Expert {
    config: ExpertConfig,
    names: Vec<String>,
    params: Vec<Var>,
    device: Device,
    portable: bool,
}

impl Expert {
    /// A fresh expert with torch's default initialisation, drawn from a generator seeded with `seed`
    /// (the same seed gives the same weights; the values differ from torch's own generator).
    pub fn new(config: ExpertConfig, seed: u64) -> Result<Self> {
        validate(&config)?;
        let mut rng = SplitMix64::new(seed);
        let mut named = Vec::new();
        for (name, shape, init) in param_specs(&config) {
            let n: usize = shape.iter().product();
            let v = match init {
                Init::Linear { fan_in } => rng.uniform(1.0 / (fan_in as f32).sqrt(), n),
                Init::Xavier { fan_in, fan_out } => rng.uniform((6.0 / (fan_in + fan_out) as f32).sqrt(), n),
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
            };
            named.push((name.to_owned(), tensor(v, &shape)?));
        }
        Self::from_named(config, named)
    }

    /// An expert with the given parameters (any order; names and shapes must be exactly the module's).
    pub fn from_tensors(config: ExpertConfig, mut tensors: HashMap<String, Tensor>) -> Result<Self> {
        validate(&config)?;
        let mut named = Vec::new();
        for (name, shape, _) in param_specs(&config) {
            let t = tensors.remove(name).ok_or_else(|| ExpertError::Checkpoint {
                path: Default::default(),
                problem: format!("missing parameter {name:?}"),
            })?;
            if t.dims() != shape.as_slice() {
                return Err(ExpertError::Shape {
                    what: name.to_owned(),
                    expected: shape,
                    got: t.dims().to_vec(),
                });
            }
            named.push((name.to_owned(), t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?));
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(ExpertError::Checkpoint {
                path: Default::default(),
                problem: format!("unexpected parameter {extra:?}"),
            });
        }
        Self::from_named(config, named)
    }

    fn from_named(config: ExpertConfig, named: Vec<(String, Tensor)>) -> Result<Self> {
        let mut names = Vec::with_capacity(named.len());
        let mut params = Vec::with_capacity(named.len());
        for (name, t) in named {
            names.push(name);
            // a private, contiguous copy: optimizer steps update it in place
            params.push(Var::from_tensor(&t.contiguous()?.copy()?)?);
        }
        Ok(Self {
            config,
            names,
            params,
            device: Device::Cpu,
            portable: false,
        })
    }

    /// This expert with its parameters on `device` (a copy; the same expert when it is already there).
    /// Inputs may then come on the CPU or on `device`; outputs and gradients come on `device`.
    pub fn to_device(self, device: &Device) -> Result<Self> {
        if self.device.same_device(device) {
            return Ok(self);
        }
        let params = self
            .params
            .iter()
            .map(|v| Ok(Var::from_tensor(&v.as_tensor().to_device(device)?)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            device: device.clone(),
            ..self
        })
    }

    /// This expert computing through the portable path (plain candle ops and autograd) even on the CPU:
    /// what it runs on a GPU, for comparing the two paths and for measurements.
    pub fn with_portable_path(mut self, portable: bool) -> Self {
        self.portable = portable;
        self
    }

    /// The device the parameters live and compute on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the CPU fast paths run (CPU device, portable path not forced).
    pub(crate) fn fast(&self) -> bool {
        self.device.is_cpu() && !self.portable
    }

    /// Loads a safetensors checkpoint whose names are the torch module's `state_dict()` names.
    pub fn load(config: ExpertConfig, path: &Path) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
        Self::from_tensors(config, tensors).map_err(|e| match e {
            ExpertError::Checkpoint { problem, .. } => ExpertError::Checkpoint {
                path: path.to_owned(),
                problem,
            },
            other => other,
        })
    }

    /// Saves the parameters as safetensors, named as the torch module's `state_dict()`, so the file loads
    /// with `module.load_state_dict(safetensors.torch.load_file(path))`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let map: HashMap<String, Tensor> = self.state_dict().into_iter().collect();
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }

    /// The config this expert was built with.
    pub fn config(&self) -> ExpertConfig {
        self.config
    }

    /// Parameter names, in the torch module's `state_dict()` order.
    pub fn param_names(&self) -> &[String] {
        &self.names
    }

    /// `(name, tensor)` for each parameter, in `state_dict()` order. The tensors share storage with the
    /// expert: later optimizer steps show through them.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.names
            .iter()
            .cloned()
            .zip(self.params.iter().map(|v| v.as_tensor().detach()))
            .collect()
    }

    /// The number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.elem_count()).sum()
    }

    pub(crate) fn param_tensors(&self) -> Vec<Tensor> {
        self.params.iter().map(|v| v.as_tensor().detach()).collect()
    }

    /// `inputs` on the expert's device.
    fn on_device(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        inputs.iter().map(|t| Ok(t.to_device(&self.device)?)).collect()
    }

    /// `inputs` on the expert's device, with the mask (if any) as f32 0/1, as the computation takes it.
    fn prepare(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.on_device(inputs)?
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                Ok(if i == 1 && t.dtype() != DType::F32 {
                    t.to_dtype(DType::F32)?.ne(0f32)?.to_dtype(DType::F32)?
                } else {
                    t
                })
            })
            .collect()
    }

    /// Checks the number, shapes and dtypes of `inputs` (batch size and sequence length are free). Inputs
    /// are f32; the mask of `transformer` and `det_dropout` (input 1) may also be u8 (bool), u32 or i64.
    /// They may live on the CPU or on the expert's device.
    pub fn check_inputs(&self, inputs: &[Tensor]) -> Result<()> {
        let kind = self.config.kind;
        let h = self.config.hid_dim;
        if inputs.len() != kind.num_inputs() {
            return Err(ExpertError::Arity {
                what: "inputs",
                expected: kind.num_inputs(),
                got: inputs.len(),
            });
        }
        let b = inputs[0].dims().first().copied().unwrap_or(0);
        let (first, second): (Vec<usize>, Option<Vec<usize>>) = match kind {
            ExpertKind::Ffn | ExpertKind::Nop => (vec![b, h], None),
            ExpertKind::DetDropout => (vec![b, h], Some(vec![b, h])),
            ExpertKind::Transformer => {
                let s = inputs[0].dims().get(1).copied().unwrap_or(0);
                (vec![b, s, h], Some(vec![b, s]))
            }
        };
        let check = |i: usize, want: &[usize]| -> Result<()> {
            let t = &inputs[i];
            if t.dims() != want {
                let mut expected = want.to_vec();
                expected[0] = 0;
                if kind == ExpertKind::Transformer {
                    expected[1] = 0;
                }
                return Err(ExpertError::Shape {
                    what: format!("input {i}"),
                    expected,
                    got: t.dims().to_vec(),
                });
            }
            // the mask (input 1) may come as bool/u8, u32 or i64, as hivemind clients send it
            let mask_dtype = i == 1 && matches!(t.dtype(), DType::U8 | DType::U32 | DType::I64);
            if !(t.dtype() == DType::F32 || mask_dtype) || !self.reachable(t) {
                return Err(ExpertError::NotF32Cpu {
                    what: format!("input {i}"),
                });
            }
            Ok(())
        };
        check(0, &first)?;
        if let Some(second) = second {
            check(1, &second)?;
        }
        if b == 0 {
            return Err(ExpertError::EmptyBatch);
        }
        Ok(())
    }

    /// Whether a tensor on `t`'s device can be an input (the CPU or the expert's own device).
    fn reachable(&self, t: &Tensor) -> bool {
        t.device().is_cpu() || t.device().same_device(&self.device)
    }

    /// Outputs for `inputs` (no gradients kept), on the expert's device. On the CPU `ffn` and
    /// `transformer` take their fast paths.
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.check_inputs(inputs)?;
        let p = self.param_tensors();
        if !self.fast() {
            return graph::forward(self.config.kind, &p, &self.prepare(inputs)?);
        }
        match self.config.kind {
            ExpertKind::Ffn => Ok(vec![ffn::forward(&p, &inputs[0], false)?.0]),
            ExpertKind::Transformer => {
                let inputs = self.prepare(inputs)?;
                Ok(vec![transformer::forward(&p, &inputs[0], &inputs[1], false)?.0])
            }
            kind => graph::forward(kind, &p, &self.prepare(inputs)?),
        }
    }

    /// Outputs through the plain candle-ops reference path (all kinds).
    pub fn forward_reference(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.check_inputs(inputs)?;
        graph::forward(self.config.kind, &self.param_tensors(), &self.prepare(inputs)?)
    }

    /// Re-runs the forward pass on `inputs` and back-propagates `grad_outputs` (hivemind's
    /// `ModuleBackend.backward` without the optimizer step). On the CPU `ffn` and `transformer` take
    /// hand-written paths; `det_dropout` and the portable path use candle's autograd. Gradients come on
    /// the expert's device.
    pub fn backward(&self, inputs: &[Tensor], grad_outputs: &[Tensor]) -> Result<Gradients> {
        self.check_inputs(inputs)?;
        self.check_grad_outputs(inputs, grad_outputs)?;
        if !self.fast() && self.config.kind != ExpertKind::Nop {
            return self.backward_autograd(inputs, grad_outputs);
        }
        match self.config.kind {
            ExpertKind::Ffn => {
                let p = self.param_tensors();
                let (_, saved) = ffn::forward(&p, &inputs[0], true)?;
                let saved = saved.ok_or(ExpertError::EmptyBatch)?;
                let (dx, dp) = ffn::backward(&p, &inputs[0], saved, &grad_outputs[0])?;
                Ok(Gradients {
                    inputs: vec![dx],
                    params: dp,
                })
            }
            ExpertKind::Transformer => {
                let prepared = self.prepare(inputs)?;
                let p = self.param_tensors();
                let (_, saved) = transformer::forward(&p, &prepared[0], &prepared[1], true)?;
                let saved = saved.ok_or(ExpertError::EmptyBatch)?;
                let (dx, dp) = transformer::backward(&p, saved, &grad_outputs[0])?;
                Ok(Gradients {
                    // the mask's gradient: zeros of its own dtype, as hivemind returns
                    inputs: vec![dx, inputs[1].zeros_like()?],
                    params: dp,
                })
            }
            ExpertKind::Nop => Ok(Gradients {
                inputs: vec![grad_outputs[0].to_device(&self.device)?.copy()?],
                params: vec![Tensor::zeros(0, DType::F32, &self.device)?],
            }),
            _ => self.backward_autograd(inputs, grad_outputs),
        }
    }

    /// Backward through candle's autograd over the reference path (all kinds).
    pub fn backward_reference(&self, inputs: &[Tensor], grad_outputs: &[Tensor]) -> Result<Gradients> {
        self.check_inputs(inputs)?;
        self.check_grad_outputs(inputs, grad_outputs)?;
        self.backward_autograd(inputs, grad_outputs)
    }

    fn check_grad_outputs(&self, inputs: &[Tensor], grad_outputs: &[Tensor]) -> Result<()> {
        if grad_outputs.len() != 1 {
            return Err(ExpertError::Arity {
                what: "grad_outputs",
                expected: 1,
                got: grad_outputs.len(),
            });
        }
        let g = &grad_outputs[0];
        if g.dims() != inputs[0].dims() {
            return Err(ExpertError::Shape {
                what: "grad_outputs[0]".into(),
                expected: inputs[0].dims().to_vec(),
                got: g.dims().to_vec(),
            });
        }
        if g.dtype() != DType::F32 || !self.reachable(g) {
            return Err(ExpertError::NotF32Cpu {
                what: "grad_outputs[0]".into(),
            });
        }
        Ok(())
    }

    fn backward_autograd(&self, inputs: &[Tensor], grad_outputs: &[Tensor]) -> Result<Gradients> {
        let kind = self.config.kind;
        // the float input is differentiable; the mask (input 1 of transformer / det_dropout) is not
        let x = Var::from_tensor(&inputs[0].to_device(&self.device)?.copy()?)?;
        let mut graph_inputs = vec![x.as_tensor().clone()];
        graph_inputs.extend(self.prepare(inputs)?.into_iter().skip(1));
        let p: Vec<Tensor> = self.params.iter().map(|v| v.as_tensor().clone()).collect();
        let out = graph::forward(kind, &p, &graph_inputs)?;
        let loss = (&out[0] * grad_outputs[0].to_device(&self.device)?)?.sum_all()?;
        let store = loss.backward()?;
        let grad_or_zeros = |t: &Tensor| -> Result<Tensor> {
            Ok(match store.get(t) {
                Some(g) => g.contiguous()?,
                None => t.zeros_like()?,
            })
        };
        let mut input_grads = vec![grad_or_zeros(x.as_tensor())?];
        for extra in inputs.iter().skip(1) {
            input_grads.push(extra.to_device(&self.device)?.zeros_like()?);
        }
        let params = p.iter().map(grad_or_zeros).collect::<Result<Vec<_>>>()?;
        Ok(Gradients {
            inputs: input_grads,
            params,
        })
    }

    pub(crate) fn param_vars(&self) -> &[Var] {
        &self.params
    }
}

fn validate(config: &ExpertConfig) -> Result<()> {
    let kind = config.kind.name();
    let hid_dim = config.hid_dim;
    if hid_dim == 0 {
        return Err(ExpertError::BadHiddenDim {
            kind,
            hid_dim,
            reason: "must be positive",
        });
    }
    if config.kind == ExpertKind::Transformer && !hid_dim.is_multiple_of(TRANSFORMER_HEADS) {
        return Err(ExpertError::BadHiddenDim {
            kind,
            hid_dim,
            reason: "must be a multiple of the 16 heads",
        });
    }
    Ok(())
}
