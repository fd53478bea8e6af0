//! [`RemoteSwitchMixtureOfExperts`]: hivemind's Switch-Transformer DMoE layer
//! (`hivemind.moe.client.switch_moe`) — each sample goes to its `k_best` (by default one) best experts,
//! each weighted by the product over the grid dimensions of its coordinates' softmax probabilities, with
//! a residual connection, multiplicative jitter on the gating input, grid dropout, an exponential moving
//! average of how much each grid coordinate is used, and the load-balancing auxiliary loss.
//!
//! For `x (n, in_features)`, gating logits `l = proj(x ⊙ noise)` split into one block `l_d` per grid
//! dimension `d` (coordinates dropped by grid dropout set to `-inf`), `p_d = softmax(l_d)`:
//!
//! - `output[s] = x[s] + Σ_j w[s, j] · expert_j(x[s])` with `w[s, j] = Π_d p_d[s, c_d(j)]` for each chosen
//!   expert that answered, `0` for one that failed (a sample whose experts all failed gets `x[s]`: zeros
//!   from the experts, never NaN);
//! - `U_d ← α · U_d + (1 − α) · B_d`, where `B_d[i]` is the fraction of the batch's answered
//!   (sample, expert) pairs whose coordinate in dimension `d` is `i` (all zeros when none answered);
//! - `balancing_loss = Σ_d g_d² · mean_i(mean_s p_d[s, i] · U_d[i])` (see [`BalancingLoss`]).
//!
//! The experts are called exactly as [`RemoteMixtureOfExperts`] calls them (one request per expert per
//! batch, hivemind's `_collect_responses` timing, experts that fail dropped, their backward through
//! `rpc_backward`): this layer is a [`RemoteMixtureOfExperts`] with another gating. As there, calls block
//! on a tokio runtime: run the trainer on its own thread, never on a runtime worker.
//!
//! Differences from hivemind 1.x, on purpose:
//! - jitter and grid dropout apply in training only ([`RemoteSwitchMixtureOfExperts::set_training`]);
//!   hivemind applies them in eval too. The utilization average is updated by every successful forward
//!   pass, as in hivemind.
//! - jitter multiplies the gating input only: hivemind multiplies a 2-d input in place, so its experts
//!   and the residual connection see the jittered input too (and a leaf input that needs a gradient
//!   raises).
//! - the balancing loss defaults to the per-dimension formula hivemind's code describes; hivemind's code
//!   zips the softmax of each dimension with the *elements* of the flat utilization buffer, which makes
//!   its loss a constant without gradient ([`BalancingLoss::HivemindLiteral`] reproduces that value).
//! - when grid dropout drops every coordinate of a dimension, that dimension keeps all of them this pass
//!   (hivemind's softmax over all `-inf` is NaN).
//! - the input is `(n, in_features)`, as for [`RemoteMixtureOfExperts`] (hivemind also takes
//!   `(n, …, in_features)`, gating on the mean over the middle dimensions).

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{MoeError, Result};
use crate::lm::Rng;
use crate::moe::{MoeConfig, MoeStats, RemoteMixtureOfExperts, Router, softmax_last};
use crate::transport::ExpertTransport;

/// How the balancing loss reads the grid utilization `U` (one vector `U_d` per grid dimension `d`, of
/// size `g_d`), given each dimension's softmax `p_d (n, g_d)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BalancingLoss {
    /// `Σ_d g_d² · mean_i(mean_s p_d[s, i] · U_d[i])` = `Σ_d g_d · Σ_i P_d[i] · U_d[i]`: the Switch
    /// Transformer's `N · Σ f·P` per grid dimension, the formula hivemind's comment describes
    /// ("multiply fractions of probability mass and fractions of routed examples for each grid
    /// dimension"). Minimal (1 per dimension) when routing is uniform. The default.
    #[default]
    PerDimension,
    /// What hivemind 1.x's code computes: `Σ_d g_d² · mean_i(mean_s p_d[s, i] · u[d])`, where `u` is the
    /// flat (concatenated) utilization buffer and `u[d]` its `d`-th element — the code zips the
    /// dimensions with the buffer's elements. As each `mean_s p_d` sums to 1 this equals
    /// `Σ_d g_d · u[d]`, a constant whose gradient is zero. For reproducing hivemind's numbers.
    HivemindLiteral,
}

/// A [`RemoteSwitchMixtureOfExperts`]'s settings; defaults are hivemind's.
#[derive(Debug, Clone, PartialEq)]
pub struct SwitchConfig {
    /// The mixture's settings. [`SwitchConfig::new`] sets hivemind's Switch defaults: `k_best` 1,
    /// `k_min` 0, `backward_k_min` 0, `allow_zero_outputs` true (the rest as [`MoeConfig::new`]).
    pub moe: MoeConfig,
    /// Weight of the past in the grid utilization's moving average: `U ← α·U + (1 − α)·batch`, in
    /// `[0, 1]`. Default 0.9.
    pub utilization_alpha: f32,
    /// In training, the probability that each grid coordinate is *kept* for a forward pass (one draw
    /// per coordinate per pass, shared by the batch; dropped coordinates get a `-inf` gating score), in
    /// `(0, 1]`. Default 1.0: no dropout.
    pub grid_dropout: f32,
    /// In training, the gating input is multiplied by noise uniform in `[1 − ε, 1 + ε)`, per element;
    /// `ε` in `[0, 1]`, 0 turns it off. Default 0.01.
    pub jitter_eps: f32,
    /// How the balancing loss reads the utilization. Default [`BalancingLoss::PerDimension`].
    pub balancing_loss: BalancingLoss,
}

impl SwitchConfig {
    /// hivemind's defaults for a Switch layer of `in_features` over `uid_prefix` and `grid_size`.
    pub fn new(in_features: usize, uid_prefix: &str, grid_size: Vec<usize>) -> Self {
        let mut moe = MoeConfig::new(in_features, uid_prefix, grid_size);
        moe.k_best = 1;
        moe.k_min = 0;
        moe.backward_k_min = 0;
        moe.allow_zero_outputs = true;
        Self {
            moe,
            utilization_alpha: 0.9,
            grid_dropout: 1.0,
            jitter_eps: 1e-2,
            balancing_loss: BalancingLoss::default(),
        }
    }
}

/// What [`RemoteSwitchMixtureOfExperts::forward`] returns.
#[derive(Debug, Clone)]
pub struct SwitchOutput {
    /// The layer's output `(n, in_features)`: the input plus the experts' weighted outputs.
    pub output: Tensor,
    /// The load-balancing auxiliary loss, a scalar with gradients toward the gating projection (and
    /// the input): add it, scaled, to the trainer's loss.
    pub balancing_loss: Tensor,
}

/// The layer's mutable state: the noise generator and the grid utilization.
#[derive(Debug)]
struct State {
    rng: Rng,
    /// One vector per grid dimension.
    utilization: Vec<Vec<f32>>,
}

/// hivemind's `RemoteSwitchMixtureOfExperts` (see the [module docs](self)).
pub struct RemoteSwitchMixtureOfExperts {
    config: SwitchConfig,
    inner: RemoteMixtureOfExperts,
    state: Mutex<State>,
    training: bool,
}

impl fmt::Debug for RemoteSwitchMixtureOfExperts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteSwitchMixtureOfExperts")
            .field("config", &self.config)
            .field("training", &self.training)
            .finish_non_exhaustive()
    }
}

/// Mixed into the layer's seed for the noise generator (so it differs from the projection's).
const NOISE_SEED: u64 = 0x5357_4954_4348_4e5a;

impl RemoteSwitchMixtureOfExperts {
    /// A layer in training mode with a gating projection initialised like `nn.Linear` from `seed` (as
    /// [`RemoteMixtureOfExperts::new`]), its jitter and grid dropout drawn from a generator seeded from
    /// `seed` too, and the utilization at hivemind's start (`1 / g_d` everywhere).
    pub fn new(
        config: SwitchConfig,
        router: Arc<dyn Router>,
        transport: Arc<dyn ExpertTransport>,
        runtime: tokio::runtime::Handle,
        seed: u64,
    ) -> Result<Self> {
        if !(0.0..=1.0).contains(&config.utilization_alpha) {
            return Err(MoeError::BadConfig(format!(
                "utilization_alpha {} is not in [0, 1]",
                config.utilization_alpha
            )));
        }
        if !(config.grid_dropout > 0.0 && config.grid_dropout <= 1.0) {
            return Err(MoeError::BadConfig(format!(
                "grid_dropout (the probability of keeping a coordinate) {} is not in (0, 1]",
                config.grid_dropout
            )));
        }
        if !(0.0..=1.0).contains(&config.jitter_eps) {
            return Err(MoeError::BadConfig(format!(
                "jitter_eps {} is not in [0, 1]",
                config.jitter_eps
            )));
        }
        let inner = RemoteMixtureOfExperts::new(config.moe.clone(), router, transport, runtime, seed)?;
        let utilization = config
            .moe
            .grid_size
            .iter()
            .map(|&g| vec![1.0 / g as f32; g])
            .collect();
        Ok(Self {
            config,
            inner,
            state: Mutex::new(State {
                rng: Rng::new(seed ^ NOISE_SEED),
                utilization,
            }),
            training: true,
        })
    }

    /// The layer's settings.
    pub fn config(&self) -> &SwitchConfig {
        &self.config
    }

    /// The gating projection's weight and bias (for the trainer's optimizer).
    pub fn params(&self) -> Vec<Var> {
        self.inner.params()
    }

    /// Running totals and the last passes' reports.
    pub fn stats(&self) -> MoeStats {
        self.inner.stats()
    }

    /// The gating scores `(n, Σ grid)` of a gating input `(n, in_features)` (no jitter, no dropout).
    pub fn gating_scores(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.gating_scores(x)
    }

    /// Whether the layer is in training mode (jitter and grid dropout on). New layers are.
    pub fn training(&self) -> bool {
        self.training
    }

    /// Training mode (`true`, torch's `train()`) or eval mode (`false`, `eval()`: no jitter, no grid
    /// dropout).
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// The grid utilization's moving average, one vector per grid dimension (hivemind's
    /// `grid_utilization` buffer, split by dimension).
    pub fn grid_utilization(&self) -> Vec<Vec<f32>> {
        self.lock().utilization.clone()
    }

    /// Replaces the grid utilization (e.g. restoring a checkpoint): one vector of size `g_d` per grid
    /// dimension, finite values.
    pub fn set_grid_utilization(&self, utilization: Vec<Vec<f32>>) -> Result<()> {
        let grid = &self.config.moe.grid_size;
        let fits = utilization.len() == grid.len()
            && utilization.iter().zip(grid).all(|(u, &g)| u.len() == g)
            && utilization.iter().flatten().all(|v| v.is_finite());
        if !fits {
            return Err(MoeError::BadConfig(format!(
                "a grid utilization for {grid:?} needs one finite vector per dimension, got sizes {:?}",
                utilization.iter().map(Vec::len).collect::<Vec<_>>()
            )));
        }
        self.lock().utilization = utilization;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The layer's output for `x (n, in_features)` and the balancing loss, both part of candle's
    /// autograd graph; updates the grid utilization (see the [module docs](self)). The experts' output
    /// must be `(in_features)` per sample, for the residual connection.
    pub fn forward(&self, x: &Tensor) -> Result<SwitchOutput> {
        let x = self.inner.check_input(x)?;
        let (n, features) = x.dims2()?;
        let grid = self.config.moe.grid_size.clone();

        // noise for this pass
        let (jitter, keep) = {
            let mut state = self.lock();
            let eps = self.config.jitter_eps;
            let jitter = (self.training && eps > 0.0).then(|| {
                (0..n * features)
                    .map(|_| 1.0 + eps * (2.0 * state.rng.unit() as f32 - 1.0))
                    .collect::<Vec<f32>>()
            });
            let p = f64::from(self.config.grid_dropout);
            let keep: Option<Vec<Vec<bool>>> = (self.training && p < 1.0).then(|| {
                grid.iter()
                    .map(|&g| {
                        let kept: Vec<bool> = (0..g).map(|_| state.rng.unit() < p).collect();
                        // every coordinate dropped: keep them all this pass (hivemind's would be NaN)
                        if kept.iter().any(|&k| k) {
                            kept
                        } else {
                            vec![true; g]
                        }
                    })
                    .collect()
            });
            (jitter, keep)
        };
        let gating_input = match jitter {
            Some(noise) => (&x * Tensor::from_vec(noise, (n, features), &Device::Cpu)?)?,
            None => x.clone(),
        };

        // per-dimension logits (dropped coordinates at -inf) and their softmax
        let logits = self.inner.gating_scores(&gating_input)?;
        let mut dim_logits = Vec::with_capacity(grid.len());
        let mut offset = 0;
        for (d, &g) in grid.iter().enumerate() {
            let mut l = logits.narrow(1, offset, g)?;
            offset += g;
            if let Some(kept) = keep.as_ref().map(|k| &k[d])
                && kept.iter().any(|&k| !k)
            {
                let mask: Vec<u8> = (0..n).flat_map(|_| kept.iter().map(|&k| u8::from(k))).collect();
                let mask = Tensor::from_vec(mask, (n, g), &Device::Cpu)?;
                l = mask.where_cond(&l, &Tensor::full(f32::NEG_INFINITY, (n, g), &Device::Cpu)?)?;
            }
            dim_logits.push(l);
        }
        let dim_probs = dim_logits.iter().map(softmax_last).collect::<Result<Vec<_>>>()?;

        // route by the (jittered, dropped-out) logits; the experts get the input as it is
        let dim_rows = dim_logits
            .iter()
            .map(|l| Ok(l.detach().to_vec2::<f32>()?))
            .collect::<Result<Vec<_>>>()?;
        let per_sample: Vec<Vec<Vec<f32>>> = (0..n)
            .map(|s| dim_rows.iter().map(|rows| rows[s].clone()).collect())
            .collect();
        let dispatch = self.inner.dispatch(&x, &per_sample)?;
        if dispatch.out_dims != [features] {
            return Err(MoeError::BadConfig(format!(
                "the experts answer {:?} per sample; the residual connection needs [{features}]",
                dispatch.out_dims
            )));
        }

        // each expert's weight: the product of its coordinates' probabilities, zero where it failed
        let slots = dispatch.slots;
        let mut probs: Option<Tensor> = None;
        for (d, p) in dim_probs.iter().enumerate() {
            let part = p.gather(&dispatch.coordinate_index(d, 0)?, 1)?;
            probs = Some(match probs {
                None => part,
                Some(prod) => (prod * part)?,
            });
        }
        let probs = probs.ok_or_else(|| MoeError::BadConfig("an empty grid".into()))?;
        let weights = dispatch
            .alive_mask()?
            .where_cond(&probs, &Tensor::zeros((n, slots), DType::F32, &Device::Cpu)?)?;

        // this batch's utilization: the answered pairs' coordinates, L1-normalised per dimension
        let mut batch: Vec<Vec<f32>> = grid.iter().map(|&g| vec![0.0; g]).collect();
        for (s, experts) in dispatch.chosen.iter().enumerate() {
            for (j, (_, coords)) in experts.iter().enumerate() {
                if dispatch.alive[s * slots + j] != 0 {
                    for (counts, &c) in batch.iter_mut().zip(coords) {
                        counts[c] += 1.0;
                    }
                }
            }
        }
        for counts in &mut batch {
            let total: f32 = counts.iter().sum();
            counts.iter_mut().for_each(|v| *v /= total.max(1e-12));
        }

        let mixed = self.inner.combine(&x, dispatch, &weights)?;
        let output = (mixed + &x)?;

        let alpha = self.config.utilization_alpha;
        let utilization = {
            let mut state = self.lock();
            for (u, b) in state.utilization.iter_mut().zip(&batch) {
                for (u, &b) in u.iter_mut().zip(b) {
                    *u = alpha * *u + (1.0 - alpha) * b;
                }
            }
            state.utilization.clone()
        };
        let balancing_loss = self.balancing_loss(&dim_probs, &utilization)?;
        Ok(SwitchOutput {
            output,
            balancing_loss,
        })
    }

    /// The balancing loss of the per-dimension softmaxes `(n, g_d)` under `utilization`.
    fn balancing_loss(&self, dim_probs: &[Tensor], utilization: &[Vec<f32>]) -> Result<Tensor> {
        let flat: Vec<f32> = utilization.iter().flatten().copied().collect();
        let mut terms = Vec::with_capacity(dim_probs.len());
        for (d, (p, u)) in dim_probs.iter().zip(utilization).enumerate() {
            let g = u.len();
            let u = match self.config.balancing_loss {
                BalancingLoss::PerDimension => Tensor::from_vec(u.clone(), g, &Device::Cpu)?,
                BalancingLoss::HivemindLiteral => {
                    let v = flat.get(d).copied().unwrap_or(0.0);
                    Tensor::full(v, g, &Device::Cpu)?
                }
            };
            let term = (p.mean(0)? * u)?.mean_all()?;
            terms.push((term * (g * g) as f64)?);
        }
        Ok(Tensor::stack(&terms, 0)?.sum_all()?)
    }
}
