//! UNIFORM_8BIT (`Uniform8BitQuantization`): 256 uniform buckets over ±3σ around the mean
//! (`torch.quantize_per_tensor` with scale `6σ/256` and zero point 128); each bucket is sent as the
//! mean of the values that fell in it.
//!
//! σ is the unbiased standard deviation, so hivemind's 1-element tensors get a NaN scale and every
//! index 0 (the codebook then holds the value itself); Apiary does the same. Empty tensors and float64
//! are refused, as by hivemind.

use bytes::Bytes;
use half::f16;

use crate::proto::runtime::CompressionType;
use crate::tensor::cast;
use crate::tensor::{DType, SerializeError, Tensor, par};

use super::quantization::{N_BINS, assemble, average_buckets};
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
#[inline]
fn quantize(c: f32, inv_scale: f32) -> u8 {
    let t = c * inv_scale;
    if !(t < 2_147_483_520.0) {
        return 0;
    }
    let r = (t + ROUNDING_MAGIC) - ROUNDING_MAGIC;
    (r + 128.0).clamp(0.0, 255.0) as u8
}

pub(super) fn encode(t: &Tensor, ctx: &Ctx) -> Result<Bytes, SerializeError> {
    let dtype = t.dtype();
    // float64 passes hivemind's is_floating_point check but torch.quantize_per_tensor refuses it.
    if !matches!(dtype, DType::Float32 | DType::Float16 | DType::BFloat16) {
        return Err(SerializeError::UnsupportedDType { codec: CODEC, dtype });
    }
    if t.numel() == 0 {
        return Err(SerializeError::EmptyNotSupported { codec: CODEC });
    }
    let x = float32_values(t);
    let n = x.len();
    // `shift = tensor.mean()` is computed in the tensor's own dtype.
    let mean = stats::mean(&x, ctx.threads);
    let shift = match dtype {
        DType::Float16 => f16::from_f32(mean).to_f32(),
        DType::BFloat16 => cast::bf16_from_f32(mean).to_f32(),
        _ => mean,
    };
    let norm = stats::centered_norm(&x, shift, ctx.threads);
    let std_unbiased = norm / ((n - 1) as f64).sqrt() as f32;
    let scale = RANGE_IN_SIGMAS * std_unbiased / N_BINS as f32;
    let inv_scale = 1.0 / scale;

    let mut q = vec![0u8; n];
    let threads = par::threads_for(n, ctx.threads);
    par::for_each_mut(&mut q, GRAIN, threads, |off, piece| {
        for (o, &v) in piece.iter_mut().zip(&x[off..]) {
            *o = quantize(v - shift, inv_scale);
        }
    });
    let codebook = average_buckets(&x, &q, ctx.threads);
    Ok(assemble(&codebook, q))
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
