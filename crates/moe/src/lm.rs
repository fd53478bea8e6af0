//! The demo's model: a small character-level transformer language model whose feed-forward sublayers are
//! supplied by the caller — a [`crate::moe::RemoteMixtureOfExperts`] over an `ffn` expert grid in the
//! demo, or nothing at all for the baseline the demo is compared with.
//!
//! Each block is `h = x + Attention(LayerNorm(x))` (causal, multi-head) followed by the feed-forward
//! sublayer applied to every position of `h` as one `(batch·seq, d_model)` matrix. hivemind's `ffn` expert
//! carries its own residual and LayerNorm (`LayerNorm(h + FFN(h))`), so the sublayer's output replaces
//! `h`. Everything here is plain candle ops, differentiable with candle's autograd.

use std::collections::HashMap;

use apiary_expert::ops;
use candle_core::{D, DType, Device, Tensor, Var};

use crate::error::{MoeError, Result};

/// A character vocabulary: every distinct character of a text, in sorted order.
#[derive(Debug, Clone)]
pub struct Vocab {
    chars: Vec<char>,
    index: HashMap<char, u32>,
}

impl Vocab {
    /// The vocabulary of `text` (at most 65,536 distinct characters).
    pub fn of(text: &str) -> Result<Self> {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        if chars.is_empty() || chars.len() > 1 << 16 {
            return Err(MoeError::BadConfig(format!(
                "a vocabulary needs 1 to 65536 characters, the text has {}",
                chars.len()
            )));
        }
        let index = chars.iter().enumerate().map(|(i, &c)| (c, i as u32)).collect();
        Ok(Self { chars, index })
    }

    /// The number of characters.
    pub fn len(&self) -> usize {
        self.chars.len()
    }

    /// Whether the vocabulary is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// Token ids of `text`; characters outside the vocabulary are skipped.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.chars().filter_map(|c| self.index.get(&c).copied()).collect()
    }

    /// The text of token ids (ids outside the vocabulary become `?`).
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| self.chars.get(i as usize).copied().unwrap_or('?'))
            .collect()
    }
}

/// A tokenized text split into a training part and a held-out validation part (its tail).
#[derive(Debug, Clone)]
pub struct Corpus {
    /// The vocabulary of the whole text.
    pub vocab: Vocab,
    /// Training tokens.
    pub train: Vec<u32>,
    /// Held-out tokens.
    pub valid: Vec<u32>,
}

/// Which part of the corpus a batch comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training part.
    Train,
    /// The held-out part.
    Valid,
}

impl Corpus {
    /// Tokenizes `text` and holds out its last `valid_fraction` (0 < f < 1).
    pub fn new(text: &str, valid_fraction: f64) -> Result<Self> {
        if !(valid_fraction > 0.0 && valid_fraction < 1.0) {
            return Err(MoeError::BadConfig(format!(
                "valid_fraction {valid_fraction} must be in (0, 1)"
            )));
        }
        let vocab = Vocab::of(text)?;
        let ids = vocab.encode(text);
        let cut = ((ids.len() as f64) * (1.0 - valid_fraction)) as usize;
        Ok(Self {
            vocab,
            train: ids[..cut].to_vec(),
            valid: ids[cut..].to_vec(),
        })
    }

    /// `batch` windows of `seq + 1` tokens from `split`, starting where `rng` says: inputs `(batch, seq)`
    /// and next-token targets `(batch, seq)`, both u32.
    pub fn batch(&self, split: Split, batch: usize, seq: usize, rng: &mut Rng) -> Result<(Tensor, Tensor)> {
        let ids = match split {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
        };
        if ids.len() <= seq + 1 || batch == 0 || seq == 0 {
            return Err(MoeError::BadConfig(format!(
                "a batch of {batch}×{seq} needs more than {} tokens; the split has {}",
                seq + 1,
                ids.len()
            )));
        }
        let mut x = Vec::with_capacity(batch * seq);
        let mut y = Vec::with_capacity(batch * seq);
        for _ in 0..batch {
            let start = rng.below(ids.len() - seq - 1);
            x.extend_from_slice(&ids[start..start + seq]);
            y.extend_from_slice(&ids[start + 1..start + seq + 1]);
        }
        Ok((
            Tensor::from_vec(x, (batch, seq), &Device::Cpu)?,
            Tensor::from_vec(y, (batch, seq), &Device::Cpu)?,
        ))
    }
}

/// SplitMix64: a small seeded generator for batches, initial weights and sampling (not for secrets).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// `n` values uniform in `[-bound, bound)`.
    pub fn uniform(&mut self, bound: f32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| ((2.0 * self.unit() - 1.0) as f32) * bound)
            .collect()
    }
}

/// The shape of a [`TinyLm`]. Defaults: 2 blocks, `d_model` 64, 4 heads, context 64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LmConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Width of the residual stream (the experts' hidden dim).
    pub d_model: usize,
    /// Transformer blocks (each with one feed-forward sublayer).
    pub layers: usize,
    /// Attention heads (`d_model` must be a multiple).
    pub heads: usize,
    /// The longest context (positions).
    pub context: usize,
}

impl LmConfig {
    /// The default shape for a vocabulary of `vocab` characters.
    pub fn new(vocab: usize) -> Self {
        Self {
            vocab,
            d_model: 64,
            layers: 2,
            heads: 4,
            context: 64,
        }
    }
}

/// One block's attention parameters.
#[derive(Debug)]
struct Block {
    ln_w: Var,
    ln_b: Var,
    qkv_w: Var,
    qkv_b: Var,
    out_w: Var,
    out_b: Var,
}

/// A character-level transformer language model with caller-supplied feed-forward sublayers.
#[derive(Debug)]
pub struct TinyLm {
    config: LmConfig,
    embed: Var,
    pos: Var,
    blocks: Vec<Block>,
    ln_f_w: Var,
    ln_f_b: Var,
    head_w: Var,
    head_b: Var,
}

fn var(v: Vec<f32>, shape: &[usize]) -> Result<Var> {
    Ok(Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu)?)?)
}

fn linear(x: &Tensor, w: &Var, b: &Var) -> Result<Tensor> {
    Ok(ops::linear(x, w.as_tensor(), b.as_tensor())?)
}

fn layer_norm(x: &Tensor, w: &Var, b: &Var) -> Result<Tensor> {
    Ok(ops::layer_norm(x, w.as_tensor(), b.as_tensor(), 1e-5)?)
}

/// `log_softmax` over the last dimension.
fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// The mean cross-entropy of `logits (N, V)` against `targets (N)` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let logp = log_softmax_last(logits)?;
    let picked = logp.gather(&targets.reshape((n, 1))?, 1)?;
    Ok((picked.sum_all()? * (-1.0 / n as f64))?)
}

impl TinyLm {
    /// A model of shape `config` with weights drawn from a generator seeded with `seed`.
    pub fn new(config: LmConfig, seed: u64) -> Result<Self> {
        let LmConfig {
            vocab,
            d_model: d,
            layers,
            heads,
            context,
        } = config;
        if vocab == 0 || d == 0 || heads == 0 || context == 0 || !d.is_multiple_of(heads) {
            return Err(MoeError::BadConfig(format!(
                "model {config:?}: sizes must be positive and d_model a multiple of heads"
            )));
        }
        let mut rng = Rng::new(seed);
        let lin = |rng: &mut Rng, out: usize, inp: usize| -> Result<(Var, Var)> {
            let bound = 1.0 / (inp as f32).sqrt();
            Ok((
                var(rng.uniform(bound, out * inp), &[out, inp])?,
                var(vec![0.0; out], &[out])?,
            ))
        };
        let ones = |n: usize| var(vec![1.0; n], &[n]);
        let zeros = |n: usize| var(vec![0.0; n], &[n]);
        let embed = var(rng.uniform(0.5, vocab * d), &[vocab, d])?;
        let pos = var(rng.uniform(0.1, context * d), &[context, d])?;
        let mut blocks = Vec::with_capacity(layers);
        for _ in 0..layers {
            let (qkv_w, qkv_b) = lin(&mut rng, 3 * d, d)?;
            let (out_w, out_b) = lin(&mut rng, d, d)?;
            blocks.push(Block {
                ln_w: ones(d)?,
                ln_b: zeros(d)?,
                qkv_w,
                qkv_b,
                out_w,
                out_b,
            });
        }
        let (head_w, head_b) = lin(&mut rng, vocab, d)?;
        Ok(Self {
            config,
            embed,
            pos,
            blocks,
            ln_f_w: ones(d)?,
            ln_f_b: zeros(d)?,
            head_w,
            head_b,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> LmConfig {
        self.config
    }

    /// Every trainable parameter (for an optimizer; the feed-forward sublayers' own are not included).
    pub fn params(&self) -> Vec<Var> {
        let mut p = vec![self.embed.clone(), self.pos.clone()];
        for b in &self.blocks {
            p.extend([&b.ln_w, &b.ln_b, &b.qkv_w, &b.qkv_b, &b.out_w, &b.out_b].map(Clone::clone));
        }
        p.extend([&self.ln_f_w, &self.ln_f_b, &self.head_w, &self.head_b].map(Clone::clone));
        p
    }

    /// Logits `(batch, seq, vocab)` for `tokens (batch, seq)` (u32, `seq ≤ context`). After each block's
    /// attention, `ffn(layer, h)` transforms `h (batch·seq, d_model)`; its result replaces `h` (return
    /// `h` itself for a model without feed-forward sublayers).
    pub fn forward(
        &self,
        tokens: &Tensor,
        ffn: &mut dyn FnMut(usize, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (b, s) = tokens.dims2()?;
        let LmConfig {
            d_model: d,
            heads: nh,
            context,
            vocab,
            ..
        } = self.config;
        if s == 0 || s > context {
            return Err(MoeError::BadConfig(format!(
                "a sequence of {s} tokens; the model takes 1 to {context}"
            )));
        }
        let hd = d / nh;
        let emb = self
            .embed
            .as_tensor()
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, s, d))?;
        let mut x = emb.broadcast_add(&self.pos.as_tensor().narrow(0, 0, s)?.unsqueeze(0)?)?;
        // causal mask: -inf above the diagonal
        let mask: Vec<f32> = (0..s)
            .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, s, s), &Device::Cpu)?;
        for (layer, blk) in self.blocks.iter().enumerate() {
            let a = layer_norm(&x, &blk.ln_w, &blk.ln_b)?;
            let qkv = linear(&a.reshape((b * s, d))?, &blk.qkv_w, &blk.qkv_b)?.reshape((b, s, 3 * d))?;
            let heads = |i: usize| -> Result<Tensor> {
                Ok(qkv
                    .narrow(2, i * d, d)?
                    .reshape((b, s, nh, hd))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let q = (heads(0)? * (1.0 / (hd as f64).sqrt()))?;
            let k = heads(1)?;
            let v = heads(2)?;
            let scores = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(&mask)?;
            let ctx = ops::softmax_last(&scores)?
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * s, d))?;
            let h = (x.reshape((b * s, d))? + linear(&ctx, &blk.out_w, &blk.out_b)?)?;
            let out = ffn(layer, &h)?;
            if out.dims() != [b * s, d] {
                return Err(MoeError::BadConfig(format!(
                    "the feed-forward sublayer of block {layer} returned {:?}, expected {:?}",
                    out.dims(),
                    [b * s, d]
                )));
            }
            x = out.reshape((b, s, d))?;
        }
        let x = layer_norm(&x.reshape((b * s, d))?, &self.ln_f_w, &self.ln_f_b)?;
        Ok(linear(&x, &self.head_w, &self.head_b)?.reshape((b, s, vocab))?)
    }

    /// The mean next-token cross-entropy of `logits (batch, seq, vocab)` against `targets (batch, seq)`.
    pub fn loss(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b, s, v) = logits.dims3()?;
        cross_entropy(&logits.reshape((b * s, v))?, &targets.flatten_all()?)
    }

    /// Continues `prompt` by `n` characters, sampling each from the model's distribution at
    /// `temperature` (greedy at 0).
    pub fn sample(
        &self,
        vocab: &Vocab,
        prompt: &str,
        n: usize,
        temperature: f64,
        rng: &mut Rng,
        ffn: &mut dyn FnMut(usize, &Tensor) -> Result<Tensor>,
    ) -> Result<String> {
        let mut ids = vocab.encode(prompt);
        if ids.is_empty() {
            ids.push(0);
        }
        let start = ids.len();
        for _ in 0..n {
            let ctx = &ids[ids.len().saturating_sub(self.config.context)..];
            let x = Tensor::from_slice(ctx, (1, ctx.len()), &Device::Cpu)?;
            let logits = self.forward(&x, ffn)?.detach();
            let last = logits
                .narrow(1, ctx.len() - 1, 1)?
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            ids.push(pick(&last, temperature, rng));
        }
        Ok(vocab.decode(&ids[start..]))
    }
}

/// A token drawn from `logits` at `temperature` (the most likely one at 0).
fn pick(logits: &[f64], temperature: f64, rng: &mut Rng) -> u32 {
    let best = logits.iter().enumerate().fold(
        (0, f64::NEG_INFINITY),
        |acc, (i, &l)| if l > acc.1 { (i, l) } else { acc },
    );
    if temperature <= 0.0 {
        return best.0 as u32;
    }
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| ((l - best.1) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut r = rng.unit() * total;
    for (i, w) in weights.iter().enumerate() {
        if r < *w {
            return i as u32;
        }
        r -= w;
    }
    best.0 as u32
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn vocab_round_trips_and_corpus_splits() {
        let c = Corpus::new("abracadabra, said the wizard.", 0.25).unwrap();
        assert_eq!(c.vocab.decode(&c.vocab.encode("abra cad")), "abra cad");
        assert_eq!(c.train.len() + c.valid.len(), 29);
        assert!(c.valid.len() >= 7);
        let mut rng = Rng::new(1);
        let (x, y) = c.batch(Split::Train, 3, 5, &mut rng).unwrap();
        assert_eq!(x.dims(), &[3, 5]);
        // targets are the inputs shifted by one
        let x = x.to_vec2::<u32>().unwrap();
        let y = y.to_vec2::<u32>().unwrap();
        for (x, y) in x.iter().zip(&y) {
            assert_eq!(&x[1..], &y[..4]);
        }
        assert!(c.batch(Split::Valid, 1, 100, &mut rng).is_err());
    }

    /// The model learns to continue a periodic text (loss falls well below the uniform level) with plain
    /// Adam on its parameters and no feed-forward sublayers; its gradients reach every parameter.
    #[test]
    fn the_model_learns_a_periodic_text() {
        let text = "abcdefgh".repeat(64);
        let corpus = Corpus::new(&text, 0.1).unwrap();
        let mut config = LmConfig::new(corpus.vocab.len());
        config.d_model = 16;
        config.context = 16;
        let lm = TinyLm::new(config, 3).unwrap();
        let params = lm.params();
        let mut opt = apiary_expert::Optimizer::new(
            apiary_expert::OptimizerConfig::Adam {
                lr: 1e-2,
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.0,
            },
            params.len(),
        )
        .unwrap();
        let mut rng = Rng::new(4);
        let mut identity = |_: usize, h: &Tensor| Ok(h.clone());
        let mut first = None;
        let mut last = 0.0;
        for _ in 0..60 {
            let (x, y) = corpus.batch(Split::Train, 8, 16, &mut rng).unwrap();
            let loss = lm.loss(&lm.forward(&x, &mut identity).unwrap(), &y).unwrap();
            last = loss.to_scalar::<f32>().unwrap();
            first.get_or_insert(last);
            let grads = loss.backward().unwrap();
            let g: Vec<Tensor> = params
                .iter()
                .map(|p| grads.get(p.as_tensor()).unwrap().clone())
                .collect();
            opt.step(&params, &g, 1e-2, 1.0).unwrap();
        }
        let first = first.unwrap();
        assert!(first > 1.8, "starts near ln(8) = 2.08: {first}");
        assert!(last < 0.3, "a periodic text is learned: {first} -> {last}");
        let sample = lm
            .sample(&corpus.vocab, "abc", 8, 0.0, &mut rng, &mut identity)
            .unwrap();
        assert_eq!(sample, "defghabc");
    }
}
