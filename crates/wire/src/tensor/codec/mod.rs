//! The six codecs of `runtime.proto`'s `CompressionType`, and [`serialize`] / [`deserialize`] that
//! dispatch on them.

mod blockwise;
mod float16;
mod meanstd;
mod none;
mod quantile;
mod quantization;
mod stats;
mod uniform;

use bytes::Bytes;

use crate::proto::runtime::{CompressionType, Tensor as WireTensor};

use super::{DType, DeserializeError, Limits, SerializeError, Tensor, par};

pub use blockwise::BLOCK as BLOCKWISE_BLOCK_SIZE;

/// What a codec may use while it runs.
pub(crate) struct Ctx {
    /// Most OS threads for one call.
    threads: usize,
}

/// A checked shape: dimensions and their product.
pub(crate) struct Shape {
    dims: Vec<usize>,
    numel: usize,
}

impl Shape {
    /// Checks that `buf` holds exactly `per_element` bytes per element.
    fn expect_len(
        &self,
        codec: CompressionType,
        buf: &Bytes,
        per_element: u64,
    ) -> Result<(), DeserializeError> {
        let expected = self.numel as u64 * per_element;
        if buf.len() as u64 != expected {
            return Err(DeserializeError::BufferLength {
                codec,
                expected,
                actual: buf.len(),
            });
        }
        Ok(())
    }
}

/// How [`serialize_with`] encodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SerializeOptions {
    /// Send bfloat16 under NONE as float32, hivemind's `USE_LEGACY_BFLOAT16=1`. Default `true` (hivemind's
    /// default, and the only form hivemind 1.1.12 peers with default settings are sure to read).
    pub legacy_bfloat16: bool,
    /// Most OS threads one call may use on large tensors (default: the machine's available parallelism,
    /// at most 8). `1` keeps all work on the calling thread. The bytes produced never depend on it.
    pub max_threads: usize,
}

impl Default for SerializeOptions {
    fn default() -> Self {
        SerializeOptions {
            legacy_bfloat16: true,
            max_threads: par::default_threads(),
        }
    }
}

impl SerializeOptions {
    /// Sets [`SerializeOptions::legacy_bfloat16`].
    #[must_use]
    pub fn with_legacy_bfloat16(mut self, legacy: bool) -> Self {
        self.legacy_bfloat16 = legacy;
        self
    }

    /// Sets [`SerializeOptions::max_threads`].
    #[must_use]
    pub fn with_max_threads(mut self, threads: usize) -> Self {
        self.max_threads = threads.max(1);
        self
    }
}

/// Encodes a tensor as hivemind's `serialize_torch_tensor(tensor, compression)` does, with default
/// [`SerializeOptions`].
///
/// NONE and FLOAT16, QUANTILE_8BIT and BLOCKWISE_8BIT produce hivemind's bytes exactly;
/// MEANSTD_16BIT and UNIFORM_8BIT depend on a float32 mean and norm that torch computes in a
/// CPU-dependent order, so they match hivemind within one code step (see the [module docs](super)).
///
/// Errors where hivemind raises: a dtype the codec does not take, MEANSTD_16BIT on a 0-d tensor,
/// UNIFORM_8BIT / QUANTILE_8BIT on an empty tensor, UNIFORM_8BIT on a 0-d float64 tensor.
pub fn serialize(tensor: &Tensor, compression: CompressionType) -> Result<WireTensor, SerializeError> {
    serialize_with(tensor, compression, &SerializeOptions::default())
}

/// [`serialize`] with explicit options.
pub fn serialize_with(
    tensor: &Tensor,
    compression: CompressionType,
    options: &SerializeOptions,
) -> Result<WireTensor, SerializeError> {
    let size = tensor
        .shape()
        .iter()
        .map(|&d| u32::try_from(d).map_err(|_| SerializeError::DimensionTooLarge { dim: d }))
        .collect::<Result<Vec<u32>, _>>()?;
    let ctx = Ctx {
        threads: options.max_threads.max(1),
    };
    let buffer = match compression {
        CompressionType::None => none::encode(tensor, options.legacy_bfloat16),
        CompressionType::Float16 => float16::encode(tensor, &ctx)?,
        CompressionType::Meanstd16bit => meanstd::encode(tensor, &ctx)?,
        CompressionType::Uniform8bit => uniform::encode(tensor, &ctx)?,
        CompressionType::Quantile8bit => quantile::encode(tensor, &ctx)?,
        CompressionType::Blockwise8bit => blockwise::encode(tensor, &ctx),
    };
    Ok(WireTensor {
        buffer,
        size,
        requires_grad: tensor.requires_grad(),
        dtype: tensor.dtype().name().to_owned(),
        compression: compression as i32,
        chunks: 0,
    })
}

/// Decodes a `runtime.proto` `Tensor` as hivemind's `deserialize_torch_tensor` does, to the same
/// values bit for bit, after checking it against `limits`.
///
/// Never panics: malformed input (unknown codec or dtype, truncated or mis-sized buffers, bad codebook
/// sizes, oversized shapes) is a [`DeserializeError`]. A NONE buffer is not copied: the tensor shares
/// `wire.buffer`. Decoders are exactly as strict about buffer lengths as the layout requires (hivemind
/// ignores some trailing bytes in places; Apiary refuses them).
pub fn deserialize(wire: &WireTensor, limits: &Limits) -> Result<Tensor, DeserializeError> {
    let codec = CompressionType::try_from(wire.compression)
        .map_err(|_| DeserializeError::UnknownCompression(wire.compression))?;
    let dtype =
        DType::from_name(&wire.dtype).ok_or_else(|| DeserializeError::UnknownDType(wire.dtype.clone()))?;
    if wire.size.len() > limits.max_dims {
        return Err(DeserializeError::TooManyDims {
            dims: wire.size.len(),
            max: limits.max_dims,
        });
    }
    let numel = wire
        .size
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(u64::from(d)))
        .ok_or_else(|| DeserializeError::ShapeOverflow {
            shape: wire.size.clone(),
        })?;
    if numel > limits.max_elements as u64 {
        return Err(DeserializeError::TooManyElements {
            numel,
            max: limits.max_elements,
        });
    }
    if wire.buffer.len() > limits.max_bytes {
        return Err(DeserializeError::TooLarge {
            what: "buffer",
            bytes: wire.buffer.len() as u64,
            max: limits.max_bytes,
        });
    }
    let out_bytes = numel.saturating_mul(dtype.size() as u64);
    if out_bytes > limits.max_bytes as u64 {
        return Err(DeserializeError::TooLarge {
            what: "decoded tensor",
            bytes: out_bytes,
            max: limits.max_bytes,
        });
    }
    // numel ≤ max_elements: usize.
    let shape = Shape {
        dims: wire.size.iter().map(|&d| d as usize).collect(),
        numel: numel as usize,
    };
    let ctx = Ctx {
        threads: limits.max_threads.max(1),
    };
    let data = match codec {
        CompressionType::None => none::decode(&wire.buffer, &shape, dtype, &ctx)?,
        CompressionType::Float16 => float16::decode(&wire.buffer, &shape, dtype, &ctx)?,
        CompressionType::Meanstd16bit => meanstd::decode(&wire.buffer, &shape, dtype, &ctx)?,
        CompressionType::Uniform8bit | CompressionType::Quantile8bit => {
            quantization::decode(codec, &wire.buffer, &shape, dtype, &ctx)?
        }
        CompressionType::Blockwise8bit => blockwise::decode(&wire.buffer, &shape, dtype, &ctx)?,
    };
    Ok(Tensor::from_parts(shape.dims, dtype, data, wire.requires_grad))
}
