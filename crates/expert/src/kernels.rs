//! Fused element-wise kernels over contiguous f32 buffers (rayon-parallel, written to auto-vectorise).

use rayon::prelude::*;

/// `sqrt(2/pi)` as hivemind's `gelu_fast` writes it.
#[allow(clippy::excessive_precision)]
const GELU_K: f32 = 0.797_884_56;
const GELU_C: f32 = 0.044_715;
/// Elements per parallel task.
pub(crate) const CHUNK: usize = 1 << 14;

/// `tanh` for f32: Eigen's rational approximation (clamped to ±7.905 where it saturates in f32), within a few
/// ulp of the true value and free of branches so that loops over it vectorise.
#[inline(always)]
#[allow(clippy::excessive_precision)] // the coefficients as Eigen publishes them
pub(crate) fn tanh_f32(x: f32) -> f32 {
    const A1: f32 = 4.893_524_558_917_86e-3;
    const A3: f32 = 6.372_619_288_754_36e-4;
    const A5: f32 = 1.485_722_357_179_79e-5;
    const A7: f32 = 5.122_297_090_371_14e-8;
    const A9: f32 = -8.604_671_522_137_35e-11;
    const A11: f32 = 2.000_187_904_824_77e-13;
    const A13: f32 = -2.760_768_477_423_55e-16;
    const B0: f32 = 4.893_525_185_543_85e-3;
    const B2: f32 = 2.268_434_632_439e-3;
    const B4: f32 = 1.185_347_056_866_54e-4;
    const B6: f32 = 1.198_258_394_667_02e-6;
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let mut p = x2 * A13 + A11;
    p = p * x2 + A9;
    p = p * x2 + A7;
    p = p * x2 + A5;
    p = p * x2 + A3;
    p = p * x2 + A1;
    p *= x;
    let mut q = x2 * B6 + B4;
    q = q * x2 + B2;
    q = q * x2 + B0;
    p / q
}

/// hivemind's `gelu_fast`: `0.5·x·(1 + tanh(x·0.7978845608·(1 + 0.044715·x²)))`.
#[inline(always)]
pub(crate) fn gelu_fast(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh_f32(x * GELU_K * (1.0 + GELU_C * x * x)))
}

/// The derivative of [`gelu_fast`].
#[inline(always)]
pub(crate) fn gelu_fast_grad(x: f32) -> f32 {
    let x2 = x * x;
    let t = tanh_f32(x * GELU_K * (1.0 + GELU_C * x2));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * x2)
}

/// `pre = a + bias` (row-broadcast) and `act = gelu_fast(pre)`, in one pass; `pre` is only written when given.
pub(crate) fn bias_gelu(a: &[f32], bias: &[f32], pre: Option<&mut [f32]>, act: &mut [f32]) {
    let n = bias.len();
    let rows_per = (CHUNK / n.max(1)).max(1) * n;
    match pre {
        Some(pre) => {
            act.par_chunks_mut(rows_per)
                .zip(pre.par_chunks_mut(rows_per))
                .zip(a.par_chunks(rows_per))
                .for_each(|((act, pre), a)| {
                    for ((act, pre), a) in act.chunks_mut(n).zip(pre.chunks_mut(n)).zip(a.chunks(n)) {
                        for (((o, p), &x), &b) in act.iter_mut().zip(pre.iter_mut()).zip(a).zip(bias) {
                            let v = x + b;
                            *p = v;
                            *o = gelu_fast(v);
                        }
                    }
                });
        }
        None => {
            act.par_chunks_mut(rows_per)
                .zip(a.par_chunks(rows_per))
                .for_each(|(act, a)| {
                    for (act, a) in act.chunks_mut(n).zip(a.chunks(n)) {
                        for ((o, &x), &b) in act.iter_mut().zip(a).zip(bias) {
                            *o = gelu_fast(x + b);
                        }
                    }
                });
        }
    }
}

/// `dpre = dact · gelu_fast'(pre)`, into a new buffer.
pub(crate) fn gelu_backward(pre: &[f32], dact: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; pre.len()];
    out.par_chunks_mut(CHUNK)
        .zip(pre.par_chunks(CHUNK).zip(dact.par_chunks(CHUNK)))
        .for_each(|(o, (p, d))| {
            for ((o, &p), &d) in o.iter_mut().zip(p).zip(d) {
                *o = d * gelu_fast_grad(p);
            }
        });
    out
}

/// Sums of the columns of a row-major `(rows, n)` matrix.
pub(crate) fn col_sums(m: &[f32], n: usize) -> Vec<f32> {
    let rows_per = (CHUNK / n.max(1)).max(1) * n;
    m.par_chunks(rows_per)
        .map(|block| {
            let mut acc = vec![0f32; n];
            for row in block.chunks(n) {
                for (a, &x) in acc.iter_mut().zip(row) {
                    *a += x;
                }
            }
            acc
        })
        .reduce(
            || vec![0f32; n],
            |mut a, b| {
                for (a, b) in a.iter_mut().zip(&b) {
                    *a += b;
                }
                a
            },
        )
}

/// What [`residual_layer_norm`] keeps for the backward pass.
#[derive(Debug)]
pub(crate) struct LnSaved {
    /// The normalised input `(z - mean) · rstd`, row-major `(rows, n)`.
    pub(crate) xhat: Vec<f32>,
    /// `1 / sqrt(var + eps)` per row.
    pub(crate) rstd: Vec<f32>,
}

/// `out = LayerNorm(x + y + bias)` over rows of width `n` (biased variance, like torch).
pub(crate) fn residual_layer_norm(
    x: &[f32],
    y: &[f32],
    bias: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    keep: bool,
) -> (Vec<f32>, Option<LnSaved>) {
    let n = gamma.len();
    let rows = x.len() / n.max(1);
    let mut out = vec![0f32; x.len()];
    let mut xhat = if keep { vec![0f32; x.len()] } else { Vec::new() };
    let mut rstd = vec![0f32; rows];
    let row = |o: &mut [f32], xh: Option<&mut [f32]>, r: &mut f32, x: &[f32], y: &[f32]| {
        for ((o, &x), (&y, &b)) in o.iter_mut().zip(x).zip(y.iter().zip(bias)) {
            *o = x + y + b;
        }
        let mean = o.iter().sum::<f32>() / n as f32;
        let var = o.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
        let rs = 1.0 / (var + eps).sqrt();
        *r = rs;
        match xh {
            Some(xh) => {
                for ((o, xh), (&g, &b)) in o.iter_mut().zip(xh.iter_mut()).zip(gamma.iter().zip(beta)) {
                    let h = (*o - mean) * rs;
                    *xh = h;
                    *o = h * g + b;
                }
            }
            None => {
                for (o, (&g, &b)) in o.iter_mut().zip(gamma.iter().zip(beta)) {
                    *o = (*o - mean) * rs * g + b;
                }
            }
        }
    };
    if keep {
        out.par_chunks_mut(n)
            .zip(xhat.par_chunks_mut(n))
            .zip(rstd.par_iter_mut())
            .zip(x.par_chunks(n).zip(y.par_chunks(n)))
            .for_each(|(((o, xh), r), (x, y))| row(o, Some(xh), r, x, y));
    } else {
        out.par_chunks_mut(n)
            .zip(rstd.par_iter_mut())
            .zip(x.par_chunks(n).zip(y.par_chunks(n)))
            .for_each(|((o, r), (x, y))| row(o, None, r, x, y));
    }
    (out, keep.then_some(LnSaved { xhat, rstd }))
}

/// LayerNorm backward: returns `(dz, dgamma, dbeta)` for `out = xhat·gamma + beta`.
pub(crate) fn layer_norm_backward(
    dout: &[f32],
    saved: &LnSaved,
    gamma: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = gamma.len();
    let mut dz = vec![0f32; dout.len()];
    dz.par_chunks_mut(n)
        .zip(dout.par_chunks(n))
        .zip(saved.xhat.par_chunks(n).zip(saved.rstd.par_iter()))
        .for_each(|((dz, d), (xh, &rs))| {
            let mut m1 = 0f32;
            let mut m2 = 0f32;
            for ((&d, &g), &h) in d.iter().zip(gamma).zip(xh) {
                let dh = d * g;
                m1 += dh;
                m2 += dh * h;
            }
            m1 /= n as f32;
            m2 /= n as f32;
            for ((dz, (&d, &g)), &h) in dz.iter_mut().zip(d.iter().zip(gamma)).zip(xh) {
                *dz = rs * (d * g - m1 - h * m2);
            }
        });
    let prod: Vec<f32> = dout
        .par_iter()
        .zip(saved.xhat.par_iter())
        .map(|(d, h)| d * h)
        .collect();
    let dgamma = col_sums(&prod, n);
    let dbeta = col_sums(dout, n);
    (dz, dgamma, dbeta)
}

/// `a + b`, element-wise, into a new buffer.
pub(crate) fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        });
    out
}

/// Softmax over rows of width `n` (max-shifted; `-inf` entries get probability 0).
pub(crate) fn softmax_rows(x: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, x)| {
        let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0f32;
        for (o, &v) in o.iter_mut().zip(x) {
            *o = (v - m).exp();
            sum += *o;
        }
        let inv = 1.0 / sum;
        for o in o.iter_mut() {
            *o *= inv;
        }
    });
    out
}

/// Softmax backward over rows of width `n`: `ds = p · (dp - Σ p·dp)`.
pub(crate) fn softmax_backward_rows(p: &[f32], dp: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; p.len()];
    out.par_chunks_mut(n)
        .zip(p.par_chunks(n).zip(dp.par_chunks(n)))
        .for_each(|(o, (p, dp))| {
            let dot: f32 = p.iter().zip(dp).map(|(a, b)| a * b).sum();
            for ((o, &p), &d) in o.iter_mut().zip(p).zip(dp) {
                *o = p * (d - dot);
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tanh_approximation_is_within_a_few_ulp() {
        let mut worst = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4;
            let err = (tanh_f32(x) as f64 - (x as f64).tanh()).abs();
            worst = worst.max(err);
        }
        assert!(worst < 5e-7, "worst tanh error {worst}");
    }

    #[test]
    fn gelu_grad_matches_finite_differences() {
        for i in -80..=80 {
            let x = i as f64 * 0.1;
            let g = |x: f64| 0.5 * x * (1.0 + (x * 0.797_884_560_8 * (1.0 + 0.044715 * x * x)).tanh());
            let fd = (g(x + 1e-5) - g(x - 1e-5)) / 2e-5;
            assert!((gelu_fast_grad(x as f32) as f64 - fd).abs() < 1e-5, "x={x}");
            assert!((gelu_fast(x as f32) as f64 - g(x)).abs() < 1e-5, "x={x}");
        }
    }
}
