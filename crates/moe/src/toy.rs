//! The toy task of hivemind's examples and tests: a small classifier around one
//! [`RemoteMixtureOfExperts`] layer (`MoE(x) → Linear → classes`), trained on a fixed synthetic dataset
//! whose labels come from a hidden random linear map — learnable, so its loss must fall.

use std::time::Instant;

use apiary_expert::{Optimizer, OptimizerConfig};
use candle_core::{DType, Device, Tensor, Var};

use crate::error::{MoeError, Result};
use crate::lm::{Rng, cross_entropy};
use crate::moe::RemoteMixtureOfExperts;
use crate::trainer::{StepReport, gradients};

/// The toy classifier and its data.
#[derive(Debug)]
pub struct ToyTrainer {
    moe: RemoteMixtureOfExperts,
    w: Var,
    b: Var,
    params: Vec<Var>,
    optimizer: Optimizer,
    x: Tensor,
    y: Tensor,
    batch: usize,
    lr: f64,
    rng: Rng,
    steps: u64,
}

impl ToyTrainer {
    /// A classifier of `classes` classes over `moe`'s output, trained on `samples` synthetic examples
    /// in batches of `batch` with Adam at `lr`.
    pub fn new(
        moe: RemoteMixtureOfExperts,
        classes: usize,
        samples: usize,
        batch: usize,
        lr: f64,
        seed: u64,
    ) -> Result<Self> {
        let d = moe.config().in_features;
        if classes < 2 || samples == 0 || batch == 0 || batch > samples {
            return Err(MoeError::BadConfig(format!(
                "{classes} classes, {samples} samples, batches of {batch}: need ≥ 2 classes and 0 < batch ≤ samples"
            )));
        }
        let mut rng = Rng::new(seed);
        // inputs ~ U(-1.7, 1.7) (unit variance); labels = argmax of a hidden linear map
        let xs = rng.uniform(1.7, samples * d);
        let hidden = rng.uniform(1.0, d * classes);
        let labels: Vec<u32> = xs
            .chunks(d)
            .map(|row| {
                (0..classes)
                    .map(|c| (0..d).map(|i| row[i] * hidden[i * classes + c]).sum::<f32>())
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |best, (c, v)| if v > best.1 { (c, v) } else { best },
                    )
                    .0 as u32
            })
            .collect();
        let bound = 1.0 / (d as f32).sqrt();
        let w = Var::from_tensor(&Tensor::from_vec(
            rng.uniform(bound, classes * d),
            (classes, d),
            &Device::Cpu,
        )?)?;
        let b = Var::zeros(classes, DType::F32, &Device::Cpu)?;
        let mut params = vec![w.clone(), b.clone()];
        params.extend(moe.params());
        let optimizer = Optimizer::new(
            OptimizerConfig::Adam {
                lr,
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.0,
            },
            params.len(),
        )?;
        Ok(Self {
            moe,
            w,
            b,
            params,
            optimizer,
            x: Tensor::from_vec(xs, (samples, d), &Device::Cpu)?,
            y: Tensor::from_vec(labels, samples, &Device::Cpu)?,
            batch,
            lr,
            rng,
            steps: 0,
        })
    }

    /// The MoE layer (for its statistics).
    pub fn moe(&self) -> &RemoteMixtureOfExperts {
        &self.moe
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.moe.forward(x)?;
        Ok(h.matmul(&self.w.as_tensor().t()?)?
            .broadcast_add(self.b.as_tensor())?)
    }

    /// One Adam step on a random batch; also returns the batch's accuracy.
    pub fn step(&mut self) -> Result<(StepReport, f32)> {
        let t = Instant::now();
        let n = self.x.dim(0)?;
        let idx: Vec<u32> = (0..self.batch).map(|_| self.rng.below(n) as u32).collect();
        let idx = Tensor::new(idx, &Device::Cpu)?;
        let (x, y) = (self.x.index_select(&idx, 0)?, self.y.index_select(&idx, 0)?);
        let logits = self.logits(&x)?;
        let loss = cross_entropy(&logits, &y)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(MoeError::Anomaly(format!("the training loss is {value}")));
        }
        let accuracy = accuracy(&logits, &y)?;
        let grads = gradients(&self.params, &loss.backward()?)?;
        self.optimizer.step(&self.params, &grads, self.lr, 1.0)?;
        self.steps += 1;
        Ok((
            StepReport {
                step: self.steps,
                loss: value,
                tokens: self.batch,
                seconds: t.elapsed().as_secs_f64(),
            },
            accuracy,
        ))
    }
}

/// The share of rows whose largest logit is the label.
fn accuracy(logits: &Tensor, labels: &Tensor) -> Result<f32> {
    let pred = logits.argmax(1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let labels = labels.to_vec1::<u32>()?;
    let right = pred.iter().zip(&labels).filter(|(p, l)| p == l).count();
    Ok(right as f32 / labels.len().max(1) as f32)
}
