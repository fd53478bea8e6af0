//! The zoo written with plain candle ops: the reference path, differentiable with candle's autograd.
//!
//! Every op here has a backward in candle (candle-nn's `LayerNorm` does not, so layer norm is spelled out).

use candle_core::{D, Tensor};

use crate::config::ExpertKind;
use crate::error::Result;

/// `x @ w^T + b` for `x` of any rank (torch's `nn.Linear`).
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let last = dims.last().copied().unwrap_or(0);
    let rows = x.elem_count() / last.max(1);
    let out = x.reshape((rows, last))?.matmul(&w.t()?)?.broadcast_add(b)?;
    let mut shape = dims;
    if let Some(l) = shape.last_mut() {
        *l = w.dim(0)?;
    }
    Ok(out.reshape(shape)?)
}

/// hivemind's `gelu_fast`, op by op.
pub fn gelu_fast(x: &Tensor) -> Result<Tensor> {
    let inner = ((x.sqr()? * 0.044715)? + 1.0)?;
    let t = ((x * 0.797_884_560_8)? * inner)?.tanh()?;
    Ok(((x * 0.5)? * (t + 1.0)?)?)
}

/// torch's `LayerNorm` over the last dimension (biased variance).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xhat = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xhat.broadcast_mul(w)?.broadcast_add(b)?)
}

/// Softmax over the last dimension (max-shifted; the shift is a constant for autograd).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// The number of attention heads of hivemind's `TunedTransformer`.
pub(crate) const TRANSFORMER_HEADS: usize = 16;
/// hivemind's `DeterministicDropoutNetwork` keep probability (`1 - 0.2`).
pub(crate) const DET_DROPOUT_KEEP: f64 = 1.0 - 0.2;

/// The outputs of expert `kind` with parameters `p` (in state-dict order) on `inputs`.
pub(crate) fn forward(kind: ExpertKind, p: &[Tensor], inputs: &[Tensor]) -> Result<Vec<Tensor>> {
    Ok(vec![match kind {
        ExpertKind::Ffn => {
            let x = &inputs[0];
            let h = gelu_fast(&linear(x, &p[0], &p[1])?)?;
            let y = linear(&h, &p[2], &p[3])?;
            layer_norm(&(x + y)?, &p[4], &p[5], 1e-12)?
        }
        ExpertKind::Transformer => transformer(p, &inputs[0], &inputs[1])?,
        ExpertKind::Nop => inputs[0].copy()?,
        ExpertKind::DetDropout => {
            let x = ((&inputs[0] * &inputs[1])? / DET_DROPOUT_KEEP)?;
            let h = linear(&x, &p[0], &p[1])?.relu()?;
            linear(&h, &p[2], &p[3])?
        }
    }])
}

/// hivemind's `TransformerEncoderLayer.forward` (post-norm, no dropout): `x (B,S,h)`, `mask (B,S)` with
/// non-zero = padding (torch's `key_padding_mask`).
fn transformer(p: &[Tensor], x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, s, h) = x.dims3()?;
    let nh = TRANSFORMER_HEADS;
    let hd = h / nh;
    let qkv = linear(x, &p[0], &p[1])?; // (B, S, 3h)
    let heads = |i: usize| -> Result<Tensor> {
        Ok(qkv
            .narrow(2, i * h, h)?
            .reshape((b, s, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let q = (heads(0)? * (1.0 / (hd as f64).sqrt()))?;
    let k = heads(1)?;
    let v = heads(2)?;
    let scores = q.matmul(&k.t()?.contiguous()?)?; // (B, nh, S, S)
    // key padding: -inf where mask != 0, as torch's key_padding_mask does
    let neg = mask
        .ne(0f32)?
        .where_cond(
            &Tensor::full(f32::NEG_INFINITY, (b, s), x.device())?,
            &Tensor::zeros((b, s), candle_core::DType::F32, x.device())?,
        )?
        .reshape((b, 1, 1, s))?;
    let attn = softmax_last(&scores.broadcast_add(&neg)?)?;
    let ctx = attn
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, s, h))?;
    let src2 = linear(&ctx, &p[2], &p[3])?;
    let src = layer_norm(&(x + src2)?, &p[8], &p[9], 1e-5)?;
    let ff = linear(&gelu_fast(&linear(&src, &p[4], &p[5])?)?, &p[6], &p[7])?;
    layer_norm(&(src + ff)?, &p[10], &p[11], 1e-5)
}
