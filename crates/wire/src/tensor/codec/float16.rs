//! FLOAT16 (`Float16Compression`): values clamped to ±65504 and rounded to float16; `dtype` keeps the
//! original float type, which the receiver converts back to.

use std::borrow::Cow;

use bytes::Bytes;

use crate::proto::runtime::CompressionType;
use crate::tensor::cast::{self, view};
use crate::tensor::pool::Buffer;
use crate::tensor::{DType, DeserializeError, SerializeError, Tensor, par};

use super::{Ctx, Shape};

const CODEC: CompressionType = CompressionType::Float16;

/// Elements per parallel piece.
const GRAIN: usize = 1 << 16;

/// The tensor's values as float32, as hivemind's `tensor.to(torch.float32)`; borrowed when possible.
pub(super) fn float32_values(t: &Tensor) -> Cow<'_, [f32]> {
    match t.dtype() {
        DType::Float32 => view::<f32>(t.bytes()),
        other => Cow::Owned(cast::to_f32(other, t.bytes())),
    }
}

pub(super) fn encode(t: &Tensor, ctx: &Ctx) -> Result<Bytes, SerializeError> {
    if !matches!(t.dtype(), DType::Float16 | DType::Float32 | DType::Float64) {
        return Err(SerializeError::UnsupportedDType {
            codec: CODEC,
            dtype: t.dtype(),
        });
    }
    let x = float32_values(t);
    let mut out = Buffer::new(2 * x.len());
    par::for_each_mut(
        out.as_mut::<u16>(),
        GRAIN,
        par::threads_for(x.len(), ctx.threads),
        |off, piece| {
            cast::f32_to_f16_clamped(&x[off..off + piece.len()], piece);
        },
    );
    Ok(out.into_bytes())
}

pub(super) fn decode(buf: &Bytes, shape: &Shape, dtype: DType, ctx: &Ctx) -> Result<Bytes, DeserializeError> {
    // hivemind: np.asarray(float16 array, dtype=np.dtype(dtype)); numpy has no bfloat16.
    if dtype == DType::BFloat16 {
        return Err(DeserializeError::UnsupportedDType { codec: CODEC, dtype });
    }
    shape.expect_len(CODEC, buf, 2)?;
    if dtype == DType::Float16 {
        return Ok(buf.clone());
    }
    let h = view::<u16>(buf);
    let mut x = Buffer::new(4 * h.len());
    par::for_each_mut(
        x.as_mut::<f32>(),
        GRAIN,
        par::threads_for(h.len(), ctx.threads),
        |off, piece| {
            cast::f16_to_f32(&h[off..off + piece.len()], piece);
        },
    );
    Ok(cast::from_f32(dtype, x))
}
