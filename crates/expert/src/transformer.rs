//! The `transformer` expert's fast path: explicit (batched) matmuls, fused bias + gelu_fast, LayerNorm and
//! softmax forward and backward by hand — no autograd. Parameters in `state_dict()` order:
//! in_proj weight/bias, out_proj weight/bias, linear1, linear2, norm1, norm2.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::graph::TRANSFORMER_HEADS;
use crate::kernels::{self, LnSaved};
use crate::util::{tensor, with_f32};

/// LayerNorm epsilon of torch's default `nn.LayerNorm` (hivemind's `TransformerEncoderLayer`).
const LN_EPS: f32 = 1e-5;

/// What the forward pass keeps for the backward pass.
#[derive(Debug)]
pub(crate) struct TfSaved {
    x: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Tensor,
    ctx: Tensor,
    ln1: LnSaved,
    s1: Tensor,
    pre: Vec<f32>,
    act: Tensor,
    ln2: LnSaved,
}

fn slice_of<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    with_f32(t, "transformer tensor", f)
}

/// `LayerNorm(x + y + bias)` on `(rows, h)` tensors.
fn residual_ln(
    x: &Tensor,
    y: &Tensor,
    bias: &Tensor,
    g: &Tensor,
    b: &Tensor,
    keep: bool,
) -> Result<(Tensor, Option<LnSaved>)> {
    let dims = x.dims().to_vec();
    let (out, saved) = slice_of(x, |xs| {
        slice_of(y, |ys| {
            slice_of(bias, |bs| {
                slice_of(g, |gs| {
                    slice_of(b, |be| {
                        kernels::residual_layer_norm(xs, ys, bs, gs, be, LN_EPS, keep)
                    })
                })
            })
        })
    })?????;
    Ok((tensor(out, &dims)?, saved))
}

/// Forward pass on `x (B,S,h)` with padding `mask (B,S)` (f32, non-zero = padding).
pub(crate) fn forward(
    p: &[Tensor],
    x: &Tensor,
    mask: &Tensor,
    keep: bool,
) -> Result<(Tensor, Option<TfSaved>)> {
    let (b, s, h) = x.dims3()?;
    let (n, nh) = (b * s, TRANSFORMER_HEADS);
    let d = h / nh;
    let f = p[4].dim(0)?;
    let x2 = x.reshape((n, h))?.contiguous()?;
    let qkv = x2.matmul(&p[0].t()?)?.broadcast_add(&p[1])?; // (n, 3h)
    let heads = |i: usize| -> Result<Tensor> {
        Ok(qkv
            .narrow(1, i * h, h)?
            .reshape((b, s, nh, d))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let q = (heads(0)? * (1.0 / (d as f64).sqrt()))?;
    let k = heads(1)?;
    let v = heads(2)?;
    drop(qkv);
    let neg = mask
        .ne(0f32)?
        .where_cond(
            &Tensor::full(f32::NEG_INFINITY, (b, s), x.device())?,
            &Tensor::zeros((b, s), DType::F32, x.device())?,
        )?
        .reshape((b, 1, 1, s))?;
    let scores = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(&neg)?; // (b, nh, s, s)
    let probs = tensor(
        slice_of(&scores, |sc| kernels::softmax_rows(sc, s))?,
        &[b, nh, s, s],
    )?;
    drop(scores);
    let ctx = probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((n, h))?;
    let o = ctx.matmul(&p[2].t()?)?;
    let (s1, ln1) = residual_ln(&x2, &o, &p[3], &p[8], &p[9], keep)?;
    let a = s1.matmul(&p[4].t()?)?; // (n, 4h)
    let mut act = vec![0f32; n * f];
    let mut pre = if keep { vec![0f32; n * f] } else { Vec::new() };
    with_f32(&a, "transformer pre-activation", |a| {
        with_f32(&p[5], "linear1.bias", |b1| {
            kernels::bias_gelu(a, b1, keep.then_some(&mut pre[..]), &mut act)
        })
    })??;
    drop(a);
    let act = tensor(act, &[n, f])?;
    let ff = act.matmul(&p[6].t()?)?;
    let (out, ln2) = residual_ln(&s1, &ff, &p[7], &p[10], &p[11], keep)?;
    let out = out.reshape((b, s, h))?;
    let saved = match (ln1, ln2) {
        (Some(ln1), Some(ln2)) if keep => Some(TfSaved {
            x: x2,
            q,
            k,
            v,
            probs,
            ctx,
            ln1,
            s1,
            pre,
            act,
            ln2,
        }),
        _ => None,
    };
    Ok((out, saved))
}

/// Backward pass: `(dx, parameter grads in state_dict order)`.
pub(crate) fn backward(p: &[Tensor], saved: TfSaved, dout: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
    let (b, nh, s, d) = saved.q.dims4()?;
    let (n, h) = (b * s, nh * d);
    let f = p[4].dim(0)?;
    let dout = dout.reshape((n, h))?.contiguous()?;
    // norm2, linear2, gelu, linear1
    let (dz2, dg2, dbe2) = slice_of(&dout, |dd| {
        slice_of(&p[10], |g| kernels::layer_norm_backward(dd, &saved.ln2, g))
    })??;
    let db2 = kernels::col_sums(&dz2, h);
    let dz2 = tensor(dz2, &[n, h])?;
    let dw2 = dz2.t()?.matmul(&saved.act)?;
    drop(saved.act);
    let dact = dz2.matmul(&p[6])?;
    let da = slice_of(&dact, |dd| kernels::gelu_backward(&saved.pre, dd))?;
    drop((dact, saved.pre));
    let db1 = kernels::col_sums(&da, f);
    let da = tensor(da, &[n, f])?;
    let dw1 = da.t()?.matmul(&saved.s1)?;
    let ds1a = da.matmul(&p[4])?;
    let ds1 = slice_of(&ds1a, |a| slice_of(&dz2, |z| kernels::add(a, z)))??;
    // norm1, out_proj
    let (dz1, dg1, dbe1) = slice_of(&p[8], |g| kernels::layer_norm_backward(&ds1, &saved.ln1, g))?;
    let dbo = kernels::col_sums(&dz1, h);
    let dz1 = tensor(dz1, &[n, h])?;
    let dwo = dz1.t()?.matmul(&saved.ctx)?;
    let dctx = dz1
        .matmul(&p[2])?
        .reshape((b, s, nh, d))?
        .transpose(1, 2)?
        .contiguous()?; // (b, nh, s, d)
    // attention
    let dprobs = dctx.matmul(&saved.v.t()?.contiguous()?)?; // (b, nh, s, s)
    let dv = saved.probs.t()?.contiguous()?.matmul(&dctx)?;
    let dscores = slice_of(&saved.probs, |pr| {
        slice_of(&dprobs, |dp| kernels::softmax_backward_rows(pr, dp, s))
    })??;
    let dscores = tensor(dscores, &[b, nh, s, s])?;
    let scale = 1.0 / (d as f64).sqrt();
    let dq = (dscores.matmul(&saved.k)? * scale)?;
    let dk = dscores.t()?.contiguous()?.matmul(&saved.q)?;
    let merge = |t: Tensor| -> Result<Tensor> { Ok(t.transpose(1, 2)?.contiguous()?.reshape((n, h))?) };
    let dqkv = Tensor::cat(&[merge(dq)?, merge(dk)?, merge(dv)?], 1)?.contiguous()?; // (n, 3h)
    let dwin = dqkv.t()?.matmul(&saved.x)?;
    let dbin = slice_of(&dqkv, |g| kernels::col_sums(g, 3 * h))?;
    let dxa = dqkv.matmul(&p[0])?;
    let dx = slice_of(&dxa, |a| slice_of(&dz1, |z| kernels::add(a, z)))??;
    let dx = tensor(dx, &[b, s, h])?;
    Ok((
        dx,
        vec![
            dwin,
            tensor(dbin, &[3 * h])?,
            dwo,
            tensor(dbo, &[h])?,
            dw1,
            tensor(db1, &[f])?,
            dw2,
            tensor(db2, &[h])?,
            tensor(dg1, &[h])?,
            tensor(dbe1, &[h])?,
            tensor(dg2, &[h])?,
            tensor(dbe2, &[h])?,
        ],
    ))
}
