//! NONE: the raw little-endian data (`NoCompression`), with hivemind's bfloat16 rules.
//!
//! bfloat16 is sent as float32 while `USE_LEGACY_BFLOAT16` is on (hivemind's default): 4 bytes per
//! element under `dtype = "bfloat16"`. The receiver tells the two forms apart by
//! `len(buffer) // numel == 4`; otherwise the buffer holds the raw bfloat16 bits.

use bytes::Bytes;

use crate::proto::runtime::CompressionType;
use crate::tensor::cast::{self, view};
use crate::tensor::pool::Buffer;
use crate::tensor::{DType, DeserializeError, Tensor};

use super::{Ctx, Shape};

const CODEC: CompressionType = CompressionType::None;

pub(super) fn encode(t: &Tensor, legacy_bfloat16: bool) -> Bytes {
    if t.dtype() == DType::BFloat16 && legacy_bfloat16 {
        let bits = view::<u16>(t.bytes());
        let mut out = Buffer::new(4 * bits.len());
        for (o, &b) in out.as_mut::<f32>().iter_mut().zip(bits.iter()) {
            *o = cast::bf16_bits_to_f32(b);
        }
        return out.into_bytes();
    }
    t.bytes().clone()
}

pub(super) fn decode(
    buf: &Bytes,
    shape: &Shape,
    dtype: DType,
    _ctx: &Ctx,
) -> Result<Bytes, DeserializeError> {
    let numel = shape.numel;
    if dtype == DType::BFloat16 && numel > 0 && buf.len() / numel == 4 {
        shape.expect_len(CODEC, buf, 4)?;
        let widened = view::<f32>(buf);
        let mut out = Buffer::new(2 * numel);
        for (o, &x) in out.as_mut::<u16>().iter_mut().zip(widened.iter()) {
            *o = cast::f32_to_bf16_bits(x);
        }
        return Ok(out.into_bytes());
    }
    shape.expect_len(CODEC, buf, dtype.size() as u64)?;
    Ok(buf.clone())
}
