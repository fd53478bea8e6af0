//! Means and norms for MEANSTD_16BIT and UNIFORM_8BIT, summed in f64 over fixed pieces (so the result
//! never depends on the thread count) and rounded once to float32.
//!
//! torch's `mean` is a cascade sum, usually within an ulp of this. Its `norm` along a contiguous axis
//! accumulates squares in a single SIMD register of float32 lanes (16 with AVX-512, 8 with AVX2: the
//! result depends on the CPU hivemind runs on), which drifts with the row length: about 1e-5 relative
//! at 10^6 elements. Apiary's stds are the accurate ones; the float16 / 8-bit codes built from them match
//! hivemind's except for the elements that sit within that drift of a rounding boundary (one code step
//! apart).

use crate::tensor::par;

/// Elements per summed piece.
const GRAIN: usize = 1 << 16;

fn sum_piece(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f64::from(v);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(v)).sum();
    acc.iter().sum::<f64>() + tail
}

fn centered_sumsq_piece(x: &[f32], mean: f32) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let d = f64::from(v - mean);
            *a += d * d;
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| {
            let d = f64::from(v - mean);
            d * d
        })
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// `torch.mean` of float32 values (NaN for no values, with x86's default NaN bits `0xFFC00000`).
pub(super) fn mean(x: &[f32], threads: usize) -> f32 {
    if x.is_empty() {
        return default_nan();
    }
    let parts = par::map_ranges(x.len(), GRAIN, par::threads_for(x.len(), threads), |r| {
        sum_piece(&x[r])
    });
    (parts.iter().sum::<f64>() / x.len() as f64) as f32
}

/// `torch.mean` of float64 values.
pub(super) fn mean_f64(x: &[f64], threads: usize) -> f64 {
    let parts = par::map_ranges(x.len(), GRAIN, par::threads_for(x.len(), threads), |r| {
        let mut acc = [0f64; 8];
        let mut chunks = x[r].chunks_exact(8);
        for c in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += v;
            }
        }
        acc.iter().sum::<f64>() + chunks.remainder().iter().sum::<f64>()
    });
    parts.iter().sum::<f64>() / x.len() as f64
}

/// `torch.norm(x - mean)` with `x - mean` rounded to float32 first, as hivemind's in-place `sub_`.
pub(super) fn centered_norm(x: &[f32], mean: f32, threads: usize) -> f32 {
    let parts = par::map_ranges(x.len(), GRAIN, par::threads_for(x.len(), threads), |r| {
        centered_sumsq_piece(&x[r], mean)
    });
    parts.iter().sum::<f64>().sqrt() as f32
}

/// The NaN an x86 FPU produces for `0.0 / 0.0` (what torch writes for the mean of nothing).
pub(super) fn default_nan() -> f32 {
    f32::from_bits(0xFFC0_0000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_norm() {
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0];
        assert_eq!(mean(&x, 1), 6.0);
        assert_eq!(centered_norm(&x, 6.0, 1), 110f32.sqrt());
        assert_eq!(mean(&[], 1).to_bits(), 0xFFC0_0000);
    }
}
