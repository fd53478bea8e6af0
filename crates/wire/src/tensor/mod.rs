//! Tensors on the wire: `runtime.proto`'s `Tensor` with hivemind 1.1.12's six codecs and its stream
//! chunking, byte-compatible with `hivemind.compression` and `hivemind.utils.streaming`.
//!
//! # Overview
//!
//! - [`Tensor`]: shape, [`DType`], little-endian data in a [`bytes::Bytes`], `requires_grad`.
//! - [`serialize`] / [`deserialize`]: [`Tensor`] ⇄ [`proto::runtime::Tensor`](crate::proto::runtime::Tensor)
//!   under any [`CompressionType`](crate::proto::runtime::CompressionType), checked against [`Limits`].
//! - [`split_for_streaming`], [`combine_from_streaming`] and [`StreamCombiner`]: the parts of
//!   streamed RPCs (`rpc_*_stream`, averaging state downloads).
//!
//! ```
//! use apiary_wire::proto::runtime::CompressionType;
//! use apiary_wire::tensor::{Limits, Tensor, deserialize, serialize};
//!
//! let x = Tensor::from_vec([2, 3], vec![0.5f32, -1.0, 2.0, 3.5, -4.0, 0.25])?;
//! let wire = serialize(&x, CompressionType::Float16)?;
//! assert_eq!(wire.buffer.len(), 12); // six float16 values
//! let y = deserialize(&wire, &Limits::default())?;
//! assert_eq!(y.shape(), &[2, 3]);
//! assert_eq!(y.to_vec::<f32>()?, x.to_vec::<f32>()?); // all exactly representable
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The codecs
//!
//! | codec | dtypes hivemind encodes | buffer | Apiary's encoding vs hivemind's |
//! |---|---|---|---|
//! | NONE | all | raw data; bfloat16 as float32 (legacy, default) | byte-identical |
//! | FLOAT16 | float16/32/64 | float16 of the values clamped to ±65504 | byte-identical |
//! | MEANSTD_16BIT | float16/32/64, not 0-d | float16 of `(x − mean)/std` per last-axis row ‖ float32 means ‖ float32 stds | same layout; a few codes one float16 step apart |
//! | UNIFORM_8BIT | floats (float64 not 0-d); not empty | int64 256 ‖ float32 bucket means ‖ uint8 indices over ±3σ | same layout; rare indices one bucket apart |
//! | QUANTILE_8BIT | floats; not empty | as UNIFORM_8BIT, borders at quantiles of chunk quantiles | byte-identical |
//! | BLOCKWISE_8BIT | all (via float32) | int64 blocks ‖ int64 256 ‖ float32 absmax ‖ float32 code ‖ uint8 indices | byte-identical (bitsandbytes 0.50 CPU kernel) |
//!
//! Decoding reproduces hivemind's values bit for bit for every codec, including its float16/float64
//! intermediate roundings and bfloat16 rounding. MEANSTD_16BIT and UNIFORM_8BIT are the two codecs whose
//! encoders reduce a row or the whole tensor to a float32 mean and norm. torch's norm accumulates in one
//! float32 SIMD register whose width depends on the CPU, so hivemind is not reproducible across
//! machines there and drifts by ~1e-5 relative over 10^6 elements; Apiary sums in float64 and rounds
//! once, and its codes differ from hivemind's only where that drift crosses a rounding boundary.
//!
//! Large output buffers are recycled (see [`set_buffer_pool_limit`]): on virtual machines, faulting in
//! fresh pages costs more than the codecs themselves.
//!
//! # Safety against bad input
//!
//! Nothing here panics on wire input: every decoder checks lengths, counts and indices and returns a
//! typed [`DeserializeError`] or [`StreamError`], and [`Limits`] caps dimensions, elements and bytes
//! before anything is allocated.

#[cfg(target_endian = "big")]
compile_error!(
    "apiary-wire's tensor code reinterprets little-endian wire data in place; big-endian targets are not supported"
);

mod cast;
mod codec;
mod dense;
mod dtype;
mod error;
mod par;
mod pool;
mod stream;

pub use codec::{BLOCKWISE_BLOCK_SIZE, SerializeOptions, deserialize, serialize, serialize_with};
pub use dense::Tensor;
pub use dtype::{DType, Element, UnknownDType};
pub use error::{DeserializeError, SerializeError, StreamError, TensorError};
pub use pool::{buffer_pool_limit, set_buffer_pool_limit};
pub use stream::{
    DEFAULT_MAX_MSG_SIZE, STREAMING_CHUNK_SIZE_BYTES, StreamCombiner, combine_from_streaming,
    split_for_streaming,
};

/// Caps on what [`deserialize`], [`combine_from_streaming`] and [`StreamCombiner`] accept from a peer,
/// checked before any allocation.
///
/// ```
/// use apiary_wire::tensor::Limits;
///
/// let limits = Limits::default().with_max_elements(1 << 20).with_max_threads(1);
/// assert_eq!(limits.max_dims, 32);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Most dimensions of a shape. Default 32 (numpy 1.x's `NPY_MAXDIMS`).
    pub max_dims: usize,
    /// Most elements of a tensor. Default 2^28 (268 M elements, 1 GiB of float32).
    pub max_elements: usize,
    /// Most bytes of a received buffer, of a tensor reassembled from stream parts, and of a decoded
    /// tensor's data. Default 2^30 (1 GiB).
    pub max_bytes: usize,
    /// Most OS threads one decode may use on large tensors. Default: the machine's available
    /// parallelism, at most 8. The values decoded never depend on it.
    pub max_threads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_dims: 32,
            max_elements: 1 << 28,
            max_bytes: 1 << 30,
            max_threads: par::default_threads(),
        }
    }
}

impl Limits {
    /// Sets [`Limits::max_dims`].
    #[must_use]
    pub fn with_max_dims(mut self, max_dims: usize) -> Self {
        self.max_dims = max_dims;
        self
    }

    /// Sets [`Limits::max_elements`].
    #[must_use]
    pub fn with_max_elements(mut self, max_elements: usize) -> Self {
        self.max_elements = max_elements;
        self
    }

    /// Sets [`Limits::max_bytes`].
    #[must_use]
    pub fn with_max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Sets [`Limits::max_threads`] (at least 1).
    #[must_use]
    pub fn with_max_threads(mut self, max_threads: usize) -> Self {
        self.max_threads = max_threads.max(1);
        self
    }
}

#[cfg(test)]
mod tests;
