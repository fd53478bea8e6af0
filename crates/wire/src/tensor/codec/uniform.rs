//! UNIFORM_8BIT (`Uniform8BitQuantization`): 256 uniform buckets over ±3σ around the mean
//! (`torch.quantize_per_tensor` with scale `6σ/256` and zero point 128); each bucket is sent as the
//! mean of the values that fell in it.
//!
//! σ is the unbiased standard deviation, so hivemind's 1-element tensors get a NaN scale and every
//! index 0 (the codebook then holds the value itself); Apiary does the same. Empty tensors and 0-d
//! float64 tensors are refused, as by hivemind (`tensor - shift` of two 0-d tensors stays float64, which
//! `torch.quantize_per_tensor` rejects).

use bytes::Bytes;
use half::f16;

use crate::proto::runtime::CompressionType;
use crate::tensor::cast;
use crate::tensor::pool::Buffer;
use crate::tensor::{DType, SerializeError, Tensor, par};

use super::quantization::{HEADER, N_BINS, average_buckets, write_header};
use super::{Ctx, float16::float32_values, stats};

const CODEC: CompressionType = CompressionType::Uniform8bit;

/// `Uniform8BitQuantization.RANGE_IN_SIGMAS`.
const RANGE_IN_SIGMAS: f32 = 6.0;

/// Elements per parallel piece.
const GRAIN: usize = 1 << 16;

/// `1.5 · 2^23`: adding and subtracting it rounds an f32 below 2^22 in magnitude to the nearest integer,
/// ties to even (the `nearbyint` of fbgemm's `Quantize`), in plain SSE2.
const ROUNDING_MAGIC: f32 = 12_582_912.0;

/// One index as fbgemm's `Quantize<uint8>` computes it: `clamp(nearbyint(c · (1/scale)) + 128, 0, 255)`,
/// where NaN (and values at fbgemm's int32 clip, whose `+ 128` wraps) land on 0.
///
/// Written without branches so that it vectorises.
#[inline]
fn quantize(c: f32, inv_scale: f32) -> u8 {
    let t = c * inv_scale;
    let r = (t + ROUNDING_MAGIC) - ROUNDING_MAGIC;
    // NaN passes `clamp` and converts to 0
    let q = (r + 128.0).clamp(0.0, 255.0);
    let q = if t < 2_147_483_520.0 { q } else { 0.0 };
    q as i32 as u8
}

pub(super) fn encode(t: &Tensor, ctx: &Ctx) -> Result<Bytes, SerializeError> {
    let dtype = t.dtype();
    if !dtype.is_floating_point() || (dtype == DType::Float64 && t.shape().is_empty()) {
        return Err(SerializeError::UnsupportedDType { codec: CODEC, dtype });
    }
    if t.numel() == 0 {
        return Err(SerializeError::EmptyNotSupported { codec: CODEC });
    }
    let x = float32_values(t);
    let n = x.len();
    // `shift = tensor.mean()` is computed in the tensor's own dtype, then used as float32.
    let shift = match dtype {
        DType::Float16 => f16::from_f32(stats::mean(&x, ctx.threads)).to_f32(),
        DType::BFloat16 => cast::bf16_from_f32(stats::mean(&x, ctx.threads)).to_f32(),
        DType::Float64 => stats::mean_f64(&t.to_f64_vec(), ctx.threads) as f32,
        _ => stats::mean(&x, ctx.threads),
    };
    let norm = stats::centered_norm(&x, shift, ctx.threads);
    let std_unbiased = norm / ((n - 1) as f64).sqrt() as f32;
    let scale = RANGE_IN_SIGMAS * std_unbiased / N_BINS as f32;
    let inv_scale = 1.0 / scale;

    let mut buf = Buffer::new(HEADER + n);
    let (head, q) = buf.bytes_mut().split_at_mut(HEADER);
    let threads = par::threads_for(n, ctx.threads);
    par::for_each_mut(q, GRAIN, threads, |off, piece| {
        for (o, &v) in piece.iter_mut().zip(&x[off..]) {
            *o = quantize(v - shift, inv_scale);
        }
    });
    let codebook = average_buckets(&x, q, ctx.threads);
    write_header(head, &codebook);
    Ok(buf.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_matches_fbgemm() {
        assert_eq!(quantize(0.0, 1.0), 128);
        assert_eq!(quantize(0.5, 1.0), 128); // ties to even
        assert_eq!(quantize(1.5, 1.0), 130);
        assert_eq!(quantize(-2.5, 1.0), 126);
        assert_eq!(quantize(1000.0, 1.0), 255);
        assert_eq!(quantize(-1e30, 1.0), 0);
        assert_eq!(quantize(1e30, 1.0), 0);
        assert_eq!(quantize(f32::NAN, 1.0), 0);
        assert_eq!(quantize(0.0, f32::INFINITY), 0);
        assert_eq!(quantize(5e6, 1.0), 255);
        assert_eq!(quantize(-5e6, 1.0), 0);
    }
}
