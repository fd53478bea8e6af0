//! Typed errors of the tensor code: building tensors, encoding, decoding, and stream chunking.

use crate::proto::runtime::CompressionType;

use super::DType;

/// The codec's wire name, for error messages (`"BLOCKWISE_8BIT"`).
fn codec_name(codec: &CompressionType) -> &'static str {
    codec.as_str_name()
}

/// Building a [`Tensor`](super::Tensor) from raw parts, or reading its data as the wrong type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    /// The product of the dimensions does not fit in `usize`.
    #[error("shape {shape:?} has more elements than fit in usize")]
    ShapeOverflow {
        /// The offending shape.
        shape: Vec<usize>,
    },
    /// The data is not `numel × dtype.size()` bytes (or elements) long.
    #[error("a {dtype} tensor of shape {shape:?} needs {expected} bytes, got {actual}")]
    LengthMismatch {
        /// Element type of the tensor.
        dtype: DType,
        /// Its shape.
        shape: Vec<usize>,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// The data was read as another element type than the tensor's.
    #[error("the tensor holds {actual}, not {requested}")]
    DTypeMismatch {
        /// The type asked for.
        requested: DType,
        /// The tensor's type.
        actual: DType,
    },
}

/// Encoding a tensor with a codec ([`serialize`](super::serialize)).
///
/// These mirror the exceptions hivemind 1.1.12 raises for the same input, so that Apiary refuses
/// exactly what hivemind refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SerializeError {
    /// The codec does not take this element type (hivemind: `ValueError: … does not support …`, or
    /// `RuntimeError: Quantize only works on Float Tensor` for UNIFORM_8BIT on float64).
    #[error("{} does not support {dtype} tensors", codec_name(.codec))]
    UnsupportedDType {
        /// The codec.
        codec: CompressionType,
        /// The tensor's element type.
        dtype: DType,
    },
    /// MEANSTD_16BIT normalises over the last axis, which a 0-d tensor lacks (hivemind: `IndexError`).
    #[error("{} cannot encode a 0-d tensor", codec_name(.codec))]
    ScalarNotSupported {
        /// The codec.
        codec: CompressionType,
    },
    /// UNIFORM_8BIT and QUANTILE_8BIT need at least one element (hivemind: `ValueError: math domain error`
    /// and `IndexError`).
    #[error("{} cannot encode an empty tensor", codec_name(.codec))]
    EmptyNotSupported {
        /// The codec.
        codec: CompressionType,
    },
    /// A dimension does not fit the wire's `uint32` `size` field.
    #[error("dimension {dim} does not fit in uint32")]
    DimensionTooLarge {
        /// The dimension.
        dim: usize,
    },
}

/// Decoding a `runtime.proto` `Tensor` ([`deserialize`](super::deserialize)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeserializeError {
    /// `compression` is not one of the six codecs.
    #[error("unknown compression type {0}")]
    UnknownCompression(i32),
    /// `dtype` is not a dtype name Apiary knows.
    #[error("unknown dtype {0:?}")]
    UnknownDType(String),
    /// The codec cannot produce this dtype (hivemind fails on it too).
    #[error("{} cannot decode to {dtype}", codec_name(.codec))]
    UnsupportedDType {
        /// The codec.
        codec: CompressionType,
        /// The declared dtype.
        dtype: DType,
    },
    /// MEANSTD_16BIT with a 0-d `size` (hivemind: `IndexError`).
    #[error("{} cannot decode a 0-d tensor", codec_name(.codec))]
    ScalarNotSupported {
        /// The codec.
        codec: CompressionType,
    },
    /// More dimensions than [`Limits::max_dims`](super::Limits::max_dims).
    #[error("tensor has {dims} dimensions, the limit is {max}")]
    TooManyDims {
        /// Dimensions declared.
        dims: usize,
        /// The limit.
        max: usize,
    },
    /// The element count overflows 64 bits.
    #[error("shape {shape:?} has more elements than fit in 64 bits")]
    ShapeOverflow {
        /// The declared shape.
        shape: Vec<u32>,
    },
    /// More elements than [`Limits::max_elements`](super::Limits::max_elements).
    #[error("tensor has {numel} elements, the limit is {max}")]
    TooManyElements {
        /// Elements declared.
        numel: u64,
        /// The limit.
        max: usize,
    },
    /// The buffer, or the decoded data, is larger than [`Limits::max_bytes`](super::Limits::max_bytes).
    #[error("{what} would be {bytes} bytes, the limit is {max}")]
    TooLarge {
        /// `"buffer"` or `"decoded tensor"`.
        what: &'static str,
        /// Its size.
        bytes: u64,
        /// The limit.
        max: usize,
    },
    /// The buffer is not as long as the shape, dtype and codec require.
    #[error("{} buffer for this shape must be {expected} bytes, got {actual}", codec_name(.codec))]
    BufferLength {
        /// The codec.
        codec: CompressionType,
        /// Bytes required.
        expected: u64,
        /// Bytes present.
        actual: usize,
    },
    /// A header or section of an 8-bit codec's buffer runs past its end.
    #[error("{} buffer is truncated: {what} needs {needed} bytes, {actual} present", codec_name(.codec))]
    Truncated {
        /// The codec.
        codec: CompressionType,
        /// The part that does not fit.
        what: &'static str,
        /// Bytes needed up to the end of that part.
        needed: u64,
        /// Bytes present.
        actual: usize,
    },
    /// A declared codebook or scale count is negative.
    #[error("{} declares {what} of {size} entries", codec_name(.codec))]
    InvalidCount {
        /// The codec.
        codec: CompressionType,
        /// `"codebook"` or `"absmax"`.
        what: &'static str,
        /// The declared count.
        size: i64,
    },
    /// A quantized index points past the end of the codebook.
    #[error("{} index {index} is outside its {codebook_len}-entry codebook", codec_name(.codec))]
    IndexOutOfCodebook {
        /// The codec.
        codec: CompressionType,
        /// The offending index.
        index: u8,
        /// Entries in the codebook.
        codebook_len: usize,
    },
    /// BLOCKWISE_8BIT carries fewer per-block scales than the element count needs.
    #[error("BLOCKWISE_8BIT needs {needed} absmax scales for its blocks, the buffer has {actual}")]
    TooFewScales {
        /// Scales needed (`ceil(numel / 4096)`).
        needed: u64,
        /// Scales present.
        actual: u64,
    },
}

/// Splitting a tensor into stream parts, or putting parts back together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// No parts at all.
    #[error("no tensor parts")]
    Empty,
    /// The first part of a tensor has an empty `dtype`, so it does not start a tensor.
    #[error("a buffer-only part arrived where a tensor's first part (with dtype) was expected")]
    UnexpectedContinuation,
    /// A first part declares a negative chunk count.
    #[error("tensor part declares {0} chunks")]
    NegativeChunks(i32),
    /// The number of parts differs from the first part's `chunks`.
    #[error("tensor declared {declared} chunks but {received} parts arrived")]
    ChunkCountMismatch {
        /// `chunks` of the first part (0 means a single part).
        declared: i32,
        /// Parts that belonged to it.
        received: usize,
    },
    /// A continuation part carries no bytes (hivemind never sends one).
    #[error("a continuation part has an empty buffer")]
    EmptyChunk,
    /// The reassembled buffer (or the declared chunk count) exceeds [`Limits::max_bytes`](super::Limits::max_bytes).
    #[error("reassembled tensor would exceed {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// Splitting would need more than `i32::MAX` chunks.
    #[error("{chunks} chunks do not fit the int32 chunks field")]
    TooManyChunks {
        /// Chunks the split needs.
        chunks: usize,
    },
}
