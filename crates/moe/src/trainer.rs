//! The trainer loop: a [`TinyLm`] whose feed-forward sublayers are [`RemoteMixtureOfExperts`] layers (or
//! absent, for the baseline), trained with Adam on next-character prediction, with held-out validation
//! and text samples. Every step sends each chosen expert its gradients, so the experts train too.
//!
//! The trainer blocks (the MoE layers wait on the network): run it on its own thread.

use std::time::Instant;

use apiary_expert::{Optimizer, OptimizerConfig};
use candle_core::{Tensor, Var};

use crate::error::{MoeError, Result};
use crate::lm::{Corpus, LmConfig, Rng, Split, TinyLm};
use crate::moe::RemoteMixtureOfExperts;

/// Training settings. Defaults: batches of 16 sequences of 32 characters, Adam at 3e-3, gradient norm
/// clipped to 1, 4 validation batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainerConfig {
    /// Sequences per batch.
    pub batch: usize,
    /// Characters per sequence (at most the model's context).
    pub seq: usize,
    /// Adam's learning rate for the model and the gating projections.
    pub lr: f64,
    /// Clip the global gradient norm of the trainer's parameters to this.
    pub clip_grad_norm: Option<f64>,
    /// Batches averaged for a validation loss.
    pub eval_batches: usize,
    /// Seeds the model, the gating projections and the batches.
    pub seed: u64,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            batch: 16,
            seq: 32,
            lr: 3e-3,
            clip_grad_norm: Some(1.0),
            eval_batches: 4,
            seed: 0,
        }
    }
}

/// What one training step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Steps taken so far (this one included).
    pub step: u64,
    /// The batch's training loss (mean cross-entropy, nats per character).
    pub loss: f32,
    /// Characters (tokens) in the batch.
    pub tokens: usize,
    /// Wall time of the step.
    pub seconds: f64,
}

/// The gradient of each of `params` in `store` (zeros for one the loss did not reach).
pub fn gradients(params: &[Var], store: &candle_core::backprop::GradStore) -> Result<Vec<Tensor>> {
    params
        .iter()
        .map(|p| match store.get(p.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => Ok(p.as_tensor().zeros_like()?),
        })
        .collect()
}

/// A language model and its optimizer, trained on a corpus.
#[derive(Debug)]
pub struct Trainer {
    lm: TinyLm,
    moes: Vec<RemoteMixtureOfExperts>,
    params: Vec<Var>,
    optimizer: Optimizer,
    corpus: Corpus,
    config: TrainerConfig,
    rng: Rng,
    steps: u64,
}

impl Trainer {
    /// A trainer for a model of shape `lm` over `corpus`, with one MoE layer per block (`moes`; empty
    /// for the baseline without feed-forward sublayers).
    pub fn new(
        lm: LmConfig,
        moes: Vec<RemoteMixtureOfExperts>,
        corpus: Corpus,
        config: TrainerConfig,
    ) -> Result<Self> {
        if !moes.is_empty() && moes.len() != lm.layers {
            return Err(MoeError::BadConfig(format!(
                "{} MoE layers for {} blocks",
                moes.len(),
                lm.layers
            )));
        }
        if let Some(m) = moes.iter().find(|m| m.config().in_features != lm.d_model) {
            return Err(MoeError::BadConfig(format!(
                "an MoE layer takes {} features; the model's width is {}",
                m.config().in_features,
                lm.d_model
            )));
        }
        if config.seq == 0 || config.seq > lm.context || config.batch == 0 {
            return Err(MoeError::BadConfig(format!(
                "batches of {}×{}; the model's context is {}",
                config.batch, config.seq, lm.context
            )));
        }
        let model = TinyLm::new(lm, config.seed)?;
        let mut params = model.params();
        for m in &moes {
            params.extend(m.params());
        }
        let optimizer = Optimizer::new(
            OptimizerConfig::Adam {
                lr: config.lr,
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.0,
            },
            params.len(),
        )?;
        Ok(Self {
            lm: model,
            moes,
            params,
            optimizer,
            corpus,
            rng: Rng::new(config.seed ^ 0x5EED),
            config,
            steps: 0,
        })
    }

    /// The MoE layers (for their statistics).
    pub fn moes(&self) -> &[RemoteMixtureOfExperts] {
        &self.moes
    }

    /// The corpus.
    pub fn corpus(&self) -> &Corpus {
        &self.corpus
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let moes = &self.moes;
        let mut ffn = |layer: usize, h: &Tensor| -> Result<Tensor> {
            match moes.get(layer) {
                Some(moe) => moe.forward(h),
                None => Ok(h.clone()),
            }
        };
        self.lm.forward(x, &mut ffn)
    }

    /// One step: a training batch forward, backward (which trains the experts it reached) and an Adam
    /// step on the model and the gating projections.
    pub fn step(&mut self) -> Result<StepReport> {
        let t = Instant::now();
        let (x, y) = self
            .corpus
            .batch(Split::Train, self.config.batch, self.config.seq, &mut self.rng)?;
        let loss = self.lm.loss(&self.logits(&x)?, &y)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(MoeError::Anomaly(format!("the training loss is {value}")));
        }
        let grads = gradients(&self.params, &loss.backward().map_err(MoeError::from_backward)?)?;
        let norm = apiary_expert::global_norm(&grads)?;
        if !norm.is_finite() {
            return Err(MoeError::Anomaly(format!("the gradient norm is {norm}")));
        }
        let scale = match self.config.clip_grad_norm {
            Some(max) => (max / (norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        self.optimizer
            .step(&self.params, &grads, self.config.lr, scale as f32)?;
        self.steps += 1;
        Ok(StepReport {
            step: self.steps,
            loss: value,
            tokens: self.config.batch * self.config.seq,
            seconds: t.elapsed().as_secs_f64(),
        })
    }

    /// The mean loss over `eval_batches` batches of `split`, drawn with a fixed seed so that successive
    /// evaluations see the same text (no training: experts are only called forward).
    pub fn evaluate(&self, split: Split) -> Result<f32> {
        let mut rng = Rng::new(self.config.seed ^ 0xE7A1);
        let mut total = 0.0;
        for _ in 0..self.config.eval_batches.max(1) {
            let (x, y) = self
                .corpus
                .batch(split, self.config.batch, self.config.seq, &mut rng)?;
            total += self.lm.loss(&self.logits(&x)?.detach(), &y)?.to_scalar::<f32>()?;
        }
        Ok(total / self.config.eval_batches.max(1) as f32)
    }

    /// `n` characters continuing `prompt`, sampled at `temperature`.
    pub fn sample(&self, prompt: &str, n: usize, temperature: f64, seed: u64) -> Result<String> {
        let moes = &self.moes;
        let mut ffn = |layer: usize, h: &Tensor| -> Result<Tensor> {
            match moes.get(layer) {
                Some(moe) => Ok(moe.forward(h)?.detach()),
                None => Ok(h.clone()),
            }
        };
        self.lm.sample(
            &self.corpus.vocab,
            prompt,
            n,
            temperature,
            &mut Rng::new(seed),
            &mut ffn,
        )
    }
}
