//! The `ffn` expert's fast path: explicit matmuls, fused bias+gelu_fast, hand-written LayerNorm, and a
//! hand-written backward (no autograd, no gradient store).

use candle_core::Tensor;

use crate::error::Result;
use crate::kernels::{self, LnSaved};
use crate::util::{tensor, with_f32};

/// LayerNorm epsilon of hivemind's `FeedforwardBlock`.
pub(crate) const FFN_LN_EPS: f32 = 1e-12;

/// What the forward pass keeps for the backward pass.
#[derive(Debug)]
pub(crate) struct FfnSaved {
    pre: Vec<f32>,
    act: Tensor,
    ln: LnSaved,
}

fn dims(p: &[Tensor]) -> Result<(usize, usize)> {
    let (f, h) = p[0].dims2()?;
    Ok((h, f))
}

/// Forward pass; with `keep`, also what backward needs.
pub(crate) fn forward(p: &[Tensor], x: &Tensor, keep: bool) -> Result<(Tensor, Option<FfnSaved>)> {
    let (h, f) = dims(p)?;
    let rows = x.dim(0)?;
    let x = x.contiguous()?;
    let a = x.matmul(&p[0].t()?)?; // (B, 4h)
    let mut act = vec![0f32; rows * f];
    let mut pre = if keep { vec![0f32; rows * f] } else { Vec::new() };
    with_f32(&a, "ffn pre-activation", |a| {
        with_f32(&p[1], "ffn.bias", |b1| {
            kernels::bias_gelu(a, b1, keep.then_some(&mut pre[..]), &mut act)
        })
    })??;
    drop(a);
    let act = tensor(act, &[rows, f])?;
    let y = act.matmul(&p[2].t()?)?; // (B, h)
    let (out, ln) = with_f32(&x, "ffn input", |xs| {
        with_f32(&y, "ffn output projection", |ys| {
            with_f32(&p[3], "ffn_output.bias", |b2| {
                with_f32(&p[4], "layer_norm.weight", |g| {
                    with_f32(&p[5], "layer_norm.bias", |be| {
                        kernels::residual_layer_norm(xs, ys, b2, g, be, FFN_LN_EPS, keep)
                    })
                })
            })
        })
    })?????;
    let out = tensor(out, &[rows, h])?;
    let saved = match ln {
        Some(ln) if keep => Some(FfnSaved { pre, act, ln }),
        _ => None,
    };
    Ok((out, saved))
}

/// Backward pass: `(dx, [dW1, db1, dW2, db2, dgamma, dbeta])`.
pub(crate) fn backward(
    p: &[Tensor],
    x: &Tensor,
    saved: FfnSaved,
    dout: &Tensor,
) -> Result<(Tensor, Vec<Tensor>)> {
    let (h, f) = dims(p)?;
    let rows = x.dim(0)?;
    let x = x.contiguous()?;
    let (dz, dgamma, dbeta) = with_f32(dout, "grad_outputs", |d| {
        with_f32(&p[4], "layer_norm.weight", |g| {
            kernels::layer_norm_backward(d, &saved.ln, g)
        })
    })??;
    let db2 = kernels::col_sums(&dz, h);
    let dz = tensor(dz, &[rows, h])?;
    let dw2 = dz.t()?.matmul(&saved.act)?; // (h, 4h)
    drop(saved.act);
    let dact = dz.matmul(&p[2])?; // (B, 4h)
    let da = with_f32(&dact, "ffn activation grad", |d| {
        kernels::gelu_backward(&saved.pre, d)
    })?;
    drop((dact, saved.pre));
    let db1 = kernels::col_sums(&da, f);
    let da = tensor(da, &[rows, f])?;
    let dw1 = da.t()?.matmul(&x)?; // (4h, h)
    let dxa = da.matmul(&p[0])?; // (B, h)
    let dx = with_f32(&dxa, "ffn input grad", |a| {
        with_f32(&dz, "ffn residual grad", |dz| kernels::add(a, dz))
    })??;
    let dx = tensor(dx, &[rows, h])?;
    Ok((
        dx,
        vec![
            dw1,
            tensor(db1, &[f])?,
            dw2,
            tensor(db2, &[h])?,
            tensor(dgamma, &[h])?,
            tensor(dbeta, &[h])?,
        ],
    ))
}
