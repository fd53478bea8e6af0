//! What an expert accepts and returns, as hivemind's `Server.create` declares it: the `rpc_info` bytes,
//! the validation of every request against them, and the conversion between wire tensors and candle's.
//!
//! `Server.create` builds each expert's `args_schema` from its sample input (`name_to_input`) with the
//! server's compression on floating-point inputs, and its `outputs_schema` from a dummy forward pass (always
//! `NONE` compression); `rpc_backward` answers input gradients compressed as the inputs are.

use apiary_wire::msgpack::{self, BatchTensorDescriptor, Device as WireDevice, RpcInfo};
use apiary_wire::proto::runtime::CompressionType;
use apiary_wire::tensor::{DType, Tensor as WireTensor};
use candle_core::{Device, Tensor};

use crate::{ExpertError, ExpertKind, Result};

/// The sequence length of hivemind's `transformer` sample input (`name_to_input["transformer"]`).
pub const TRANSFORMER_SEQ_LEN: usize = 128;

/// One tensor of a schema: its per-sample shape, dtype and wire compression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The shape after the batch dimension.
    pub trailing: Vec<usize>,
    /// The element type.
    pub dtype: DType,
    /// How it is compressed on the wire (`NONE` for non-float tensors).
    pub compression: CompressionType,
    /// `requires_grad` as the descriptor states it.
    pub requires_grad: bool,
}

impl TensorSpec {
    fn descriptor(&self) -> BatchTensorDescriptor {
        BatchTensorDescriptor::new(self.trailing.iter().map(|d| *d as u64).collect::<Vec<_>>())
            .with_dtype(self.dtype.name())
            .with_device(WireDevice::cpu())
            .with_requires_grad(self.requires_grad)
            .with_compression(self.compression as i32)
    }
}

/// An expert's inputs and outputs, and its `rpc_info` answer.
#[derive(Debug, Clone)]
pub struct ExpertSchema {
    /// Positional inputs, in order.
    pub inputs: Vec<TensorSpec>,
    /// The one output.
    pub output: TensorSpec,
    /// Largest batch (rows) one request may carry.
    pub max_batch_size: usize,
}

impl ExpertSchema {
    /// The schema `hivemind.moe.Server.create(expert_cls=kind, hidden_dim=hid_dim, compression=…)` declares.
    pub fn server_create(
        kind: ExpertKind,
        hid_dim: usize,
        compression: CompressionType,
        max_batch_size: usize,
    ) -> Self {
        let float = |trailing: Vec<usize>| TensorSpec {
            trailing,
            dtype: DType::Float32,
            compression,
            requires_grad: false,
        };
        let plain = |trailing: Vec<usize>, dtype| TensorSpec {
            trailing,
            dtype,
            compression: CompressionType::None,
            requires_grad: false,
        };
        let output = |trailing: Vec<usize>, requires_grad| TensorSpec {
            trailing,
            dtype: DType::Float32,
            compression: CompressionType::None,
            requires_grad,
        };
        let h = hid_dim;
        let (inputs, out) = match kind {
            ExpertKind::Ffn => (vec![float(vec![h])], output(vec![h], true)),
            ExpertKind::Transformer => (
                vec![
                    float(vec![TRANSFORMER_SEQ_LEN, h]),
                    plain(vec![TRANSFORMER_SEQ_LEN], DType::Bool),
                ],
                output(vec![TRANSFORMER_SEQ_LEN, h], true),
            ),
            ExpertKind::DetDropout => (
                vec![float(vec![h]), plain(vec![h], DType::Int64)],
                output(vec![h], true),
            ),
            ExpertKind::Nop => (vec![float(vec![h])], output(vec![h], false)),
        };
        Self {
            inputs,
            output: out,
            max_batch_size,
        }
    }

    /// `ExpertInfo.serialized_info`: hivemind's msgpack of `ModuleBackend.get_info()`.
    pub fn rpc_info(&self) -> Vec<u8> {
        let info = RpcInfo::new(
            self.inputs.iter().map(TensorSpec::descriptor),
            Vec::<(String, BatchTensorDescriptor)>::new(),
            self.output.descriptor(),
        );
        msgpack::encode(&info.to_value())
    }

    /// Checks a forward request's tensors against the inputs; returns the batch size.
    pub fn check_forward(&self, tensors: &[WireTensor]) -> Result<usize> {
        check_all(tensors, &self.inputs, self.max_batch_size)
    }

    /// Checks a backward request's tensors (inputs, then the output's gradient); returns the batch size.
    pub fn check_backward(&self, tensors: &[WireTensor]) -> Result<usize> {
        let mut specs = self.inputs.clone();
        specs.push(self.output.clone());
        check_all(tensors, &specs, self.max_batch_size)
    }

    /// The compression of each input gradient `rpc_backward` returns.
    pub fn grad_compressions(&self) -> Vec<CompressionType> {
        self.inputs.iter().map(|s| s.compression).collect()
    }
}

fn check_all(tensors: &[WireTensor], specs: &[TensorSpec], max_batch_size: usize) -> Result<usize> {
    let bad = |m: String| Err(ExpertError::BadTask(m));
    if tensors.len() != specs.len() {
        return bad(format!("expected {} tensors, got {}", specs.len(), tensors.len()));
    }
    let mut batch = None;
    for (i, (t, spec)) in tensors.iter().zip(specs).enumerate() {
        let shape = t.shape();
        if shape.len() != spec.trailing.len() + 1 || shape[1..] != spec.trailing[..] {
            return bad(format!(
                "tensor {i}: expected shape (batch, {}), got {shape:?}",
                spec.trailing
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        // float tensors may arrive in any float dtype (compression decodes to float32 anyway); the rest exact
        let ok = t.dtype() == spec.dtype
            || (spec.dtype == DType::Float32
                && matches!(t.dtype(), DType::Float16 | DType::BFloat16 | DType::Float64))
            || (spec.dtype == DType::Bool && t.dtype() == DType::UInt8);
        if !ok {
            return bad(format!(
                "tensor {i}: expected {}, got {}",
                spec.dtype.name(),
                t.dtype().name()
            ));
        }
        let rows = shape[0];
        match batch {
            None => batch = Some(rows),
            Some(b) if b != rows => return bad(format!("tensor {i}: batch size {rows} differs from {b}")),
            Some(_) => {}
        }
    }
    let rows = batch.unwrap_or(0);
    if rows == 0 {
        return bad("empty batch".into());
    }
    if rows > max_batch_size {
        return Err(ExpertError::BatchTooLarge {
            rows,
            max: max_batch_size,
        });
    }
    Ok(rows)
}

/// A checked wire tensor as the candle tensor the zoo takes (floats as f32, masks as u8, ints as i64).
pub fn to_candle(t: &WireTensor) -> Result<Tensor> {
    let shape = t.shape().to_vec();
    let tensor = match t.dtype() {
        DType::Bool | DType::UInt8 => {
            let v: Vec<u8> = t.bytes().to_vec();
            Tensor::from_vec(v, shape, &Device::Cpu)?
        }
        DType::Int64 => {
            let v = t
                .to_vec::<i64>()
                .map_err(|e| ExpertError::BadTask(e.to_string()))?;
            Tensor::from_vec(v, shape, &Device::Cpu)?
        }
        _ => Tensor::from_vec(t.to_f32_vec(), shape, &Device::Cpu)?,
    };
    Ok(tensor)
}

/// A candle result as a wire tensor of `dtype` (f32 outputs; masks' zero gradients as their own dtype).
pub fn from_candle(t: &Tensor, dtype: DType) -> Result<WireTensor> {
    let shape = t.dims().to_vec();
    let wire = match dtype {
        DType::Bool => {
            let v: Vec<u8> = t.to_dtype(candle_core::DType::U8)?.flatten_all()?.to_vec1()?;
            let bools: Vec<bool> = v.iter().map(|b| *b != 0).collect();
            WireTensor::from_bools(shape, &bools)
        }
        DType::Int64 => {
            let v: Vec<i64> = t.to_dtype(candle_core::DType::I64)?.flatten_all()?.to_vec1()?;
            WireTensor::from_vec(shape, v)
        }
        _ => {
            let v: Vec<f32> = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
            WireTensor::from_vec(shape, v)
        }
    };
    wire.map_err(|e| ExpertError::BadTask(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The `server_create_*` cases of the msgpack golden file (made by hivemind 1.1.12's `ModuleBackend`).
    #[test]
    fn rpc_info_matches_hivemind_server_create() {
        let golden: serde_json::Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../wire/tests/golden/msgpack/msgpack.json"
        )))
        .unwrap();
        let cases = golden["rpc_info"].as_array().unwrap();
        let expected = |name: &str| {
            cases.iter().find(|c| c["name"] == name).unwrap()["hex"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let f16 = CompressionType::Float16;
        let none = CompressionType::None;
        let ours = [
            (
                "server_create_ffn",
                ExpertSchema::server_create(ExpertKind::Ffn, 1024, f16, 4096),
            ),
            (
                "server_create_transformer",
                ExpertSchema::server_create(ExpertKind::Transformer, 16, none, 4096),
            ),
            (
                "server_create_det_dropout",
                ExpertSchema::server_create(ExpertKind::DetDropout, 8, none, 4096),
            ),
            (
                "server_create_nop",
                ExpertSchema::server_create(ExpertKind::Nop, 4, f16, 4096),
            ),
        ];
        for (name, schema) in ours {
            assert_eq!(hex(&schema.rpc_info()), expected(name), "{name}");
        }
    }

    #[test]
    fn requests_are_checked_against_the_schema() {
        let s = ExpertSchema::server_create(ExpertKind::Transformer, 4, CompressionType::None, 8);
        let x = WireTensor::zeros(vec![2, TRANSFORMER_SEQ_LEN, 4], DType::Float32).unwrap();
        let mask = WireTensor::zeros(vec![2, TRANSFORMER_SEQ_LEN], DType::Bool).unwrap();
        assert_eq!(s.check_forward(&[x.clone(), mask.clone()]).unwrap(), 2);
        let msg = |r: Result<usize>| r.unwrap_err().to_string();
        assert!(msg(s.check_forward(std::slice::from_ref(&x))).contains("expected 2 tensors"));
        let wrong = WireTensor::zeros(vec![2, TRANSFORMER_SEQ_LEN, 5], DType::Float32).unwrap();
        assert!(msg(s.check_forward(&[wrong, mask.clone()])).contains("expected shape"));
        let ints = WireTensor::zeros(vec![2, TRANSFORMER_SEQ_LEN, 4], DType::Int64).unwrap();
        assert!(msg(s.check_forward(&[ints, mask.clone()])).contains("expected float32"));
        let other_batch = WireTensor::zeros(vec![3, TRANSFORMER_SEQ_LEN], DType::Bool).unwrap();
        assert!(msg(s.check_forward(&[x.clone(), other_batch])).contains("batch size"));
        let big = WireTensor::zeros(vec![9, TRANSFORMER_SEQ_LEN, 4], DType::Float32).unwrap();
        let big_mask = WireTensor::zeros(vec![9, TRANSFORMER_SEQ_LEN], DType::Bool).unwrap();
        assert!(matches!(
            s.check_forward(&[big, big_mask]),
            Err(ExpertError::BatchTooLarge { rows: 9, max: 8 })
        ));
        let grad = WireTensor::zeros(vec![2, TRANSFORMER_SEQ_LEN, 4], DType::Float32).unwrap();
        assert_eq!(s.check_backward(&[x, mask, grad]).unwrap(), 2);
    }

    #[test]
    fn tensors_convert_both_ways() {
        let x = WireTensor::from_vec(vec![2, 2], vec![1.0f32, -2.0, 3.5, 0.0]).unwrap();
        let c = to_candle(&x).unwrap();
        assert_eq!(c.to_vec2::<f32>().unwrap(), vec![vec![1.0, -2.0], vec![3.5, 0.0]]);
        assert_eq!(from_candle(&c, DType::Float32).unwrap(), x);
        let m = WireTensor::from_bools(vec![3], &[true, false, true]).unwrap();
        let c = to_candle(&m).unwrap();
        assert_eq!(c.to_vec1::<u8>().unwrap(), vec![1, 0, 1]);
        assert_eq!(from_candle(&c, DType::Bool).unwrap(), m);
        let i = WireTensor::from_vec(vec![2], vec![7i64, -1]).unwrap();
        assert_eq!(from_candle(&to_candle(&i).unwrap(), DType::Int64).unwrap(), i);
    }
}
