//! Candle ⇄ wire tensors for expert calls, with the checks on both sides: inputs against the expert's
//! schema before sending, replies against what the request implies after receiving.

use apiary_expert::schema::{from_candle, to_candle};
use apiary_wire::msgpack::BatchTensorDescriptor;
use apiary_wire::proto::runtime::{CompressionType, Tensor as ProtoTensor};
use apiary_wire::tensor::{self, DType, Limits, Tensor as WireTensor};
use candle_core::Tensor;

use super::declared_dtype;

/// Checks tensors against descriptors (count, trailing dims, one shared batch size); returns the
/// batch size. `what` names the list in error texts.
pub(super) fn check_against(
    tensors: &[Tensor],
    descriptors: &[BatchTensorDescriptor],
    what: &str,
) -> Result<usize, String> {
    if tensors.len() != descriptors.len() {
        return Err(format!(
            "expected {} {what} tensors, got {}",
            descriptors.len(),
            tensors.len()
        ));
    }
    let mut rows = None;
    for (i, (t, d)) in tensors.iter().zip(descriptors).enumerate() {
        let dims = t.dims();
        let Some((&batch, trailing)) = dims.split_first() else {
            return Err(format!("{what} tensor {i} has no batch dimension"));
        };
        let matches = trailing.len() == d.instance_size.len()
            && trailing
                .iter()
                .zip(&d.instance_size)
                .all(|(a, b)| u64::try_from(*a).is_ok_and(|a| a == *b));
        if !matches {
            return Err(format!(
                "{what} tensor {i}: expected shape (batch, {:?}), got {dims:?}",
                d.instance_size
            ));
        }
        match rows {
            None => rows = Some(batch),
            Some(r) if r != batch => {
                return Err(format!("{what} tensor {i} has {batch} rows, the first has {r}"));
            }
            Some(_) => {}
        }
    }
    Ok(rows.unwrap_or(0))
}

/// The bytes hivemind counts for the unary/stream choice: `element_size() · nelement()`.
pub(super) fn raw_bytes(t: &Tensor) -> usize {
    t.elem_count().saturating_mul(t.dtype().size_in_bytes())
}

/// A candle tensor as the wire tensor the descriptor asks for (floats as `float32`, masks as `bool`,
/// integers as `int64`; without a declared dtype, the tensor's own).
pub(super) fn to_wire(t: &Tensor, d: &BatchTensorDescriptor) -> Result<WireTensor, String> {
    use candle_core::DType as C;
    let own = match t.dtype() {
        C::U8 => DType::UInt8,
        C::I64 => DType::Int64,
        C::F16 | C::BF16 | C::F32 | C::F64 => DType::Float32,
        other => return Err(format!("cannot send a {other:?} tensor")),
    };
    let target = match declared_dtype(d) {
        Some(DType::Bool) => DType::Bool,
        Some(DType::Int64) => DType::Int64,
        Some(dt) if dt.is_floating_point() => DType::Float32,
        Some(DType::UInt8) => DType::UInt8,
        Some(other) => return Err(format!("cannot send a tensor declared as {}", other.name())),
        None => own,
    };
    if target == DType::UInt8 {
        let values: Vec<u8> = t
            .to_dtype(C::U8)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(|e| e.to_string())?;
        return WireTensor::from_vec(t.dims().to_vec(), values).map_err(|e| e.to_string());
    }
    from_candle(t, target).map_err(|e| e.to_string())
}

/// Serializes `tensors` with their descriptors' compressions (hivemind's
/// `serialize_torch_tensor(tensor, proto.compression)`).
pub(super) fn serialize_all(
    tensors: &[Tensor],
    descriptors: &[BatchTensorDescriptor],
    compressions: &[CompressionType],
) -> Result<Vec<ProtoTensor>, String> {
    tensors
        .iter()
        .zip(descriptors)
        .zip(compressions)
        .enumerate()
        .map(|(i, ((t, d), c))| {
            let wire = to_wire(t, d).map_err(|e| format!("tensor {i}: {e}"))?;
            tensor::serialize(&wire, *c).map_err(|e| format!("tensor {i}: {e}"))
        })
        .collect()
}

/// What one reply tensor must be.
#[derive(Debug, Clone)]
pub(super) struct Expected {
    /// The full shape.
    pub shape: Vec<usize>,
    /// The dtype, if known (floats match any float).
    pub dtype: Option<DType>,
}

impl Expected {
    /// The outputs of a forward pass on `rows` rows.
    pub fn outputs(rows: usize, outputs: &[BatchTensorDescriptor]) -> Result<Vec<Expected>, String> {
        outputs
            .iter()
            .map(|d| {
                let mut shape = Vec::with_capacity(d.instance_size.len() + 1);
                shape.push(rows);
                for s in &d.instance_size {
                    shape.push(usize::try_from(*s).map_err(|_| "an output dimension overflows")?);
                }
                Ok(Expected {
                    shape,
                    dtype: declared_dtype(d),
                })
            })
            .collect()
    }

    /// The gradients of `inputs`: their shapes.
    pub fn grads(inputs: &[Tensor]) -> Vec<Expected> {
        inputs
            .iter()
            .map(|t| Expected {
                shape: t.dims().to_vec(),
                dtype: None,
            })
            .collect()
    }
}

/// Decoding limits for a reply of `expected` tensors: the largest of them, in float64, plus room for
/// codec headers; never above [`Limits::default`].
pub(super) fn reply_limits(expected: &[Expected]) -> Limits {
    let default = Limits::default();
    let elements = expected
        .iter()
        .map(|e| e.shape.iter().fold(1usize, |a, b| a.saturating_mul(*b)))
        .max()
        .unwrap_or(0)
        .min(default.max_elements);
    let bytes = elements
        .saturating_mul(8)
        .saturating_add(1 << 20)
        .min(default.max_bytes);
    let dims = expected
        .iter()
        .map(|e| e.shape.len())
        .max()
        .unwrap_or(1)
        .min(default.max_dims);
    default
        .with_max_elements(elements)
        .with_max_bytes(bytes)
        .with_max_dims(dims)
}

fn compatible(want: DType, got: DType) -> bool {
    want == got
        || (want.is_floating_point() && got.is_floating_point())
        || matches!(
            (want, got),
            (DType::Bool, DType::UInt8) | (DType::UInt8, DType::Bool)
        )
}

/// Decodes and checks a reply's tensors against `expected`.
pub(super) fn decode_reply(
    tensors: &[ProtoTensor],
    expected: &[Expected],
    limits: &Limits,
) -> Result<Vec<Tensor>, String> {
    if tensors.len() != expected.len() {
        return Err(format!(
            "expected {} tensors, got {}",
            expected.len(),
            tensors.len()
        ));
    }
    tensors
        .iter()
        .zip(expected)
        .enumerate()
        .map(|(i, (t, e))| {
            let wire = tensor::deserialize(t, limits).map_err(|err| format!("tensor {i}: {err}"))?;
            if wire.shape() != e.shape.as_slice() {
                return Err(format!(
                    "tensor {i}: expected shape {:?}, got {:?}",
                    e.shape,
                    wire.shape()
                ));
            }
            if let Some(want) = e.dtype
                && !compatible(want, wire.dtype())
            {
                return Err(format!(
                    "tensor {i}: expected {}, got {}",
                    want.name(),
                    wire.dtype().name()
                ));
            }
            to_candle(&wire).map_err(|err| format!("tensor {i}: {err}"))
        })
        .collect()
}
