//! Means and norms for MEANSTD_16BIT and UNIFORM_8BIT, summed in f64 over fixed pieces (so the result
//! never depends on the thread count) and rounded to float32 like torch's results.
//!
//! torch sums float32 in its own (vector-width dependent) cascade order, so the last bit of a mean or
//! norm can differ from hivemind's; both codecs are then equal to hivemind within the codec's error,
//! not byte for byte.

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
    let parts = par::map_ranges(x.len(), GRAIN, par::threads_for(x.len(), threads), |r| sum_piece(&x[r]));
    (parts.iter().sum::<f64>() / x.len() as f64) as f32
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
