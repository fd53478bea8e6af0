//! [`RemoteMixtureOfExperts`]: hivemind's DMoE layer — a gating projection scores every coordinate of an
//! expert grid, a [`Router`] (beam search over the DHT) picks each sample's `k_best` experts, the experts
//! are called over an [`ExpertTransport`], and their outputs are averaged with the softmax of their scores.
//!
//! The layer is a node of candle's autograd graph: [`RemoteMixtureOfExperts::forward`] returns a tensor
//! whose backward pass (run by the caller's `loss.backward()`) sends each expert the gradient of its
//! outputs (`rpc_backward`, which also trains it) and returns the gradient of the layer's input; the
//! gating projection gets its gradient through candle's own ops. Calls block on a tokio runtime: run
//! the trainer on its own thread (or `spawn_blocking`), never on a runtime worker.
//!
//! hivemind's semantics, with two differences on purpose:
//! - **one request per (expert, batch)** carrying every sample routed to that expert, not one per
//!   (sample, expert);
//! - **never NaN**: a sample whose chosen experts all failed gets a zero output (hivemind's masked softmax
//!   over all `-inf` yields NaN and poisons the trainer's parameters); [`ForwardReport::zero_samples`]
//!   counts them, and unless `allow_zero_outputs` they are logged as a warning.
//!
//! [`crate::switch::RemoteSwitchMixtureOfExperts`] calls its experts through the same dispatch and
//! combine steps, with Switch gating.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor, Var};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use crate::beam::MoEBeamSearcher;
use crate::error::{MoeError, Result};
use crate::transport::{ExpertAddr, ExpertTransport, TransportError};

/// Picks each sample's experts from its grid scores.
pub trait Router: Send + Sync + fmt::Debug {
    /// For each sample (`grid_scores[s][d]`: the scores of dimension `d`'s coordinates), up to `k`
    /// experts, best first.
    fn choose<'a>(
        &'a self,
        grid_scores: &'a [Vec<Vec<f32>>],
        k: usize,
    ) -> BoxFuture<'a, Result<Vec<Vec<ExpertAddr>>>>;
}

impl Router for MoEBeamSearcher {
    fn choose<'a>(
        &'a self,
        grid_scores: &'a [Vec<Vec<f32>>],
        k: usize,
    ) -> BoxFuture<'a, Result<Vec<Vec<ExpertAddr>>>> {
        Box::pin(async move {
            let found = self
                .batch_find_best_experts(grid_scores, k)
                .await
                .map_err(|e| MoeError::Routing(e.to_string()))?;
            Ok(found
                .into_iter()
                .map(|experts| {
                    experts
                        .into_iter()
                        .map(|e| ExpertAddr::new(e.uid, e.peer_id))
                        .collect()
                })
                .collect())
        })
    }
}

/// A router over a fixed list of experts: each sample gets the `k` with the highest summed scores — what
/// a beam search wide enough to be exact returns. For tests and for swarms known in advance.
#[derive(Debug, Clone)]
pub struct StaticRouter {
    experts: Vec<(ExpertAddr, Vec<usize>)>,
}

impl StaticRouter {
    /// Routes among `experts`, whose uids are `{uid_prefix}{i}.{j}…` inside `grid_size`.
    pub fn new(uid_prefix: &str, grid_size: &[usize], experts: Vec<ExpertAddr>) -> Result<Self> {
        let experts = experts
            .into_iter()
            .map(|e| {
                let c = coordinates(uid_prefix, grid_size, &e.uid).ok_or_else(|| {
                    MoeError::BadConfig(format!("{} is not an expert of {uid_prefix}{grid_size:?}", e.uid))
                })?;
                Ok((e, c))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { experts })
    }
}

impl Router for StaticRouter {
    fn choose<'a>(
        &'a self,
        grid_scores: &'a [Vec<Vec<f32>>],
        k: usize,
    ) -> BoxFuture<'a, Result<Vec<Vec<ExpertAddr>>>> {
        Box::pin(async move {
            Ok(grid_scores
                .iter()
                .map(|dims| {
                    let mut scored: Vec<(f32, &ExpertAddr)> = self
                        .experts
                        .iter()
                        .map(|(e, c)| (c.iter().zip(dims).map(|(&i, d)| d[i]).sum(), e))
                        .collect();
                    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
                    scored.into_iter().take(k).map(|(_, e)| e.clone()).collect()
                })
                .collect())
        })
    }
}

/// The grid coordinates of `uid` (`{prefix}{i}.{j}…`), when it is an expert of that grid.
pub fn coordinates(uid_prefix: &str, grid_size: &[usize], uid: &str) -> Option<Vec<usize>> {
    let prefix = uid_prefix.trim_end_matches('.');
    let rest = uid.strip_prefix(prefix)?.strip_prefix('.')?;
    let coords: Vec<usize> = rest.split('.').map(|c| c.parse().ok()).collect::<Option<_>>()?;
    (coords.len() == grid_size.len() && coords.iter().zip(grid_size).all(|(c, g)| c < g)).then_some(coords)
}

/// A [`RemoteMixtureOfExperts`]'s settings; defaults are hivemind's (`k_best` 4 for the demo grid).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Width of the layer's input (the gating projection's input).
    pub in_features: usize,
    /// The expert grid, one size per dimension (e.g. `[4, 4]`).
    pub grid_size: Vec<usize>,
    /// The experts' uid prefix (e.g. `ffn.`).
    pub uid_prefix: String,
    /// Experts chosen per sample. Default 4.
    pub k_best: usize,
    /// Forward: wait until this many experts answered for every sample before `timeout_after_k_min`
    /// starts; fewer answers in total is an error. Default 1.
    pub k_min: usize,
    /// The longest the experts' forward calls may take in all. Default none.
    pub forward_timeout: Option<Duration>,
    /// Once every sample has `k_min` answers, wait at most this long for the others. Default none.
    pub timeout_after_k_min: Option<Duration>,
    /// Backward: fewer expert answers in total is an error. Default 1.
    pub backward_k_min: usize,
    /// The longest the experts' backward calls may take in all. Default none.
    pub backward_timeout: Option<Duration>,
    /// Refuse non-finite inputs and gradients, and count experts answering non-finite values as failed.
    /// Default false.
    pub detect_anomalies: bool,
    /// Accept a forward pass in which no expert answered (all outputs zero). Default false.
    pub allow_zero_outputs: bool,
}

impl MoeConfig {
    /// hivemind's defaults for a layer of `in_features` over `uid_prefix` and `grid_size`.
    pub fn new(in_features: usize, uid_prefix: &str, grid_size: Vec<usize>) -> Self {
        Self {
            in_features,
            grid_size,
            uid_prefix: uid_prefix.to_owned(),
            k_best: 4,
            k_min: 1,
            forward_timeout: None,
            timeout_after_k_min: None,
            backward_k_min: 1,
            backward_timeout: None,
            detect_anomalies: false,
            allow_zero_outputs: false,
        }
    }
}

/// What one forward pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForwardReport {
    /// Samples in the batch.
    pub samples: usize,
    /// Distinct experts called (one request each).
    pub experts_called: usize,
    /// Experts that failed or timed out, with why.
    pub failed: Vec<(String, String)>,
    /// (sample, expert) pairs answered.
    pub answered_pairs: usize,
    /// Samples none of whose experts answered: their output is zero.
    pub zero_samples: usize,
}

/// What one backward pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackwardReport {
    /// Distinct experts sent gradients.
    pub experts_called: usize,
    /// Experts whose backward failed or timed out (their gradients count as zero), with why.
    pub failed: Vec<(String, String)>,
    /// (sample, expert) pairs whose gradients came back.
    pub answered_pairs: usize,
}

/// Running totals of a layer's calls, for progress displays.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MoeStats {
    /// The last forward pass.
    pub last_forward: Option<ForwardReport>,
    /// The last backward pass.
    pub last_backward: Option<BackwardReport>,
    /// Forward requests sent / failed.
    pub forward_calls: u64,
    /// Forward requests that failed.
    pub forward_failures: u64,
    /// Backward requests sent.
    pub backward_calls: u64,
    /// Backward requests that failed.
    pub backward_failures: u64,
    /// Samples that got a zero output.
    pub zero_samples: u64,
}

/// One expert's share of a batch: the samples routed to it and at which slot of their choice list.
#[derive(Debug, Clone)]
struct Group {
    expert: ExpertAddr,
    /// `(sample, slot)` per row of the expert's request.
    rows: Vec<(usize, usize)>,
    /// The rows' inputs.
    inputs: Tensor,
}

/// hivemind's `RemoteMixtureOfExperts` (see the [module docs](self)).
pub struct RemoteMixtureOfExperts {
    config: MoeConfig,
    proj_w: Var,
    proj_b: Var,
    /// Always tracked, so the backward pass reaches the experts even when the input needs no gradient
    /// (hivemind's `DUMMY`).
    dummy: Var,
    router: Arc<dyn Router>,
    transport: Arc<dyn ExpertTransport>,
    runtime: tokio::runtime::Handle,
    stats: Arc<Mutex<MoeStats>>,
}

impl fmt::Debug for RemoteMixtureOfExperts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteMixtureOfExperts")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RemoteMixtureOfExperts {
    /// A layer with a gating projection initialised like `nn.Linear` from `seed`, routing with `router`
    /// and calling experts over `transport`, blocking on `runtime` for both.
    pub fn new(
        config: MoeConfig,
        router: Arc<dyn Router>,
        transport: Arc<dyn ExpertTransport>,
        runtime: tokio::runtime::Handle,
        seed: u64,
    ) -> Result<Self> {
        let total: usize = config.grid_size.iter().sum();
        if config.in_features == 0 || total == 0 || config.grid_size.contains(&0) {
            return Err(MoeError::BadConfig(format!(
                "in_features {} and every grid size must be positive: {:?}",
                config.in_features, config.grid_size
            )));
        }
        if config.k_best == 0 {
            return Err(MoeError::BadConfig("k_best must be positive".into()));
        }
        let mut rng = crate::lm::Rng::new(seed);
        let bound = 1.0 / (config.in_features as f32).sqrt();
        let proj_w = Var::from_tensor(&Tensor::from_vec(
            rng.uniform(bound, total * config.in_features),
            (total, config.in_features),
            &Device::Cpu,
        )?)?;
        let proj_b = Var::from_tensor(&Tensor::from_vec(rng.uniform(bound, total), total, &Device::Cpu)?)?;
        Ok(Self {
            config,
            proj_w,
            proj_b,
            dummy: Var::zeros(1, DType::F32, &Device::Cpu)?,
            router,
            transport,
            runtime,
            stats: Arc::default(),
        })
    }

    /// The layer's settings.
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// The gating projection's weight and bias (for the trainer's optimizer).
    pub fn params(&self) -> Vec<Var> {
        vec![self.proj_w.clone(), self.proj_b.clone()]
    }

    /// Running totals and the last passes' reports.
    pub fn stats(&self) -> MoeStats {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The gating scores `(n, Σ grid)` of `x (n, in_features)`.
    pub fn gating_scores(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.proj_w.as_tensor().t()?)?
            .broadcast_add(self.proj_b.as_tensor())?)
    }

    /// The layer's output `(n, out)` for `x (n, in_features)`: the softmax-weighted average of the
    /// outputs of the experts that answered, part of candle's autograd graph (see the module docs).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.check_input(x)?;
        let logits = self.gating_scores(&x)?;
        let per_sample = split_scores(&logits.detach().to_vec2::<f32>()?, &self.config.grid_size);
        let dispatch = self.dispatch(&x, &per_sample)?;

        // the experts' scores: the sum of their coordinates' gating scores, masked where they failed
        let (n, slots) = (dispatch.n, dispatch.slots);
        let mut expert_logits: Option<Tensor> = None;
        let mut offset = 0;
        for (dim, &g) in self.config.grid_size.iter().enumerate() {
            let part = logits.gather(&dispatch.coordinate_index(dim, offset)?, 1)?;
            offset += g;
            expert_logits = Some(match expert_logits {
                None => part,
                Some(sum) => (sum + part)?,
            });
        }
        let expert_logits = expert_logits.ok_or_else(|| MoeError::BadConfig("an empty grid".into()))?;
        // a finite mask value: a row with no live expert stays finite (its outputs are zeros anyway)
        let masked = dispatch
            .alive_mask()?
            .where_cond(&expert_logits, &Tensor::full(-1e9f32, (n, slots), &Device::Cpu)?)?;
        let weights = softmax_last(&masked)?;
        self.combine(&x, dispatch, &weights)
    }

    /// Checks that `x` is `(n > 0, in_features)` (and finite under `detect_anomalies`); returns it as f32.
    pub(crate) fn check_input(&self, x: &Tensor) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        if d != self.config.in_features || n == 0 {
            return Err(MoeError::BadConfig(format!(
                "input {:?}; the layer takes (n > 0, {})",
                x.dims(),
                self.config.in_features
            )));
        }
        let x = x.to_dtype(DType::F32)?;
        if self.config.detect_anomalies && !all_finite(&x)? {
            return Err(MoeError::Anomaly(
                "the layer's input has non-finite values".into(),
            ));
        }
        Ok(x)
    }

    /// Routes each sample of `x (n, in_features)` by its grid scores (`grid_scores[s][d]`), calls the chosen
    /// experts (one request per expert, hivemind's `_collect_responses` timing) and assembles their answers;
    /// records the forward report. Fails when fewer than `k_min` (sample, expert) pairs answered, or none
    /// and `allow_zero_outputs` is off.
    pub(crate) fn dispatch(&self, x: &Tensor, grid_scores: &[Vec<Vec<f32>>]) -> Result<Dispatch> {
        let n = x.dim(0)?;
        let chosen = self
            .runtime
            .block_on(self.router.choose(grid_scores, self.config.k_best))?;
        // keep only experts of this grid (a router answers from untrusted DHT data)
        let chosen: Vec<Vec<(ExpertAddr, Vec<usize>)>> = chosen
            .into_iter()
            .map(|experts| {
                experts
                    .into_iter()
                    .take(self.config.k_best)
                    .filter_map(|e| {
                        let c = coordinates(&self.config.uid_prefix, &self.config.grid_size, &e.uid)?;
                        Some((e, c))
                    })
                    .collect()
            })
            .collect();
        if chosen.len() != n {
            return Err(MoeError::Routing(format!(
                "the router answered for {} samples of {n}",
                chosen.len()
            )));
        }
        let slots = chosen.iter().map(Vec::len).max().unwrap_or(0);
        if slots == 0 {
            return Err(MoeError::NoExperts(format!(
                "no experts of {}{:?} found; check that the uid prefix and the grid match running servers",
                self.config.uid_prefix, self.config.grid_size
            )));
        }

        // one request per expert, carrying every sample routed to it
        let xd = x.detach();
        let mut index: HashMap<&ExpertAddr, usize> = HashMap::new();
        let mut groups: Vec<(ExpertAddr, Vec<(usize, usize)>)> = Vec::new();
        for (s, experts) in chosen.iter().enumerate() {
            for (j, (e, _)) in experts.iter().enumerate() {
                let g = *index.entry(e).or_insert_with(|| {
                    groups.push((e.clone(), Vec::new()));
                    groups.len() - 1
                });
                groups[g].1.push((s, j));
            }
        }
        let groups: Vec<Group> = groups
            .into_iter()
            .map(|(expert, rows)| {
                let idx: Vec<u32> = rows.iter().map(|&(s, _)| s as u32).collect();
                let inputs = xd.index_select(&Tensor::new(idx, &Device::Cpu)?, 0)?;
                Ok(Group { expert, rows, inputs })
            })
            .collect::<Result<_>>()?;
        let transport = self.transport.clone();
        let calls = groups.iter().map(|g| {
            let transport = transport.clone();
            let expert = g.expert.clone();
            let inputs = g.inputs.clone();
            async move { transport.forward(&expert, vec![inputs]).await }
        });
        let outcome = self.runtime.block_on(collect(
            &groups,
            calls,
            n,
            self.config.k_min,
            self.config.forward_timeout,
            self.config.timeout_after_k_min,
        ));

        // the answers: outputs (n, slots, out) and which slots are alive
        let mut out_dims: Option<Vec<usize>> = None;
        let mut failed = outcome.failed;
        let mut alive_groups = Vec::new();
        for (g, outputs) in outcome.answered {
            let group = &groups[g];
            let check = outputs
                .first()
                .ok_or_else(|| "no output tensor".to_owned())
                .and_then(|o| {
                    let dims = o.dims();
                    let fits = dims.len() >= 2 && dims[0] == group.rows.len();
                    let same = out_dims.as_ref().is_none_or(|d| d[..] == dims[1..]);
                    if !fits || !same {
                        return Err(format!("output shape {dims:?} for {} rows", group.rows.len()));
                    }
                    let o = o.to_dtype(DType::F32).map_err(|e| e.to_string())?;
                    if self.config.detect_anomalies && !all_finite(&o).map_err(|e| e.to_string())? {
                        return Err("non-finite outputs".into());
                    }
                    Ok(o)
                });
            match check {
                Ok(o) => {
                    out_dims.get_or_insert_with(|| o.dims()[1..].to_vec());
                    alive_groups.push((g, o));
                }
                Err(why) => failed.push((group.expert.uid.clone(), why)),
            }
        }
        let answered_pairs: usize = alive_groups.iter().map(|(g, _)| groups[*g].rows.len()).sum();
        let mut report = ForwardReport {
            samples: n,
            experts_called: groups.len(),
            failed,
            answered_pairs,
            zero_samples: 0,
        };
        let record = |report: &ForwardReport| {
            let mut st = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            st.forward_calls += report.experts_called as u64;
            st.forward_failures += report.failed.len() as u64;
            st.zero_samples += report.zero_samples as u64;
            st.last_forward = Some(report.clone());
        };
        if answered_pairs < self.config.k_min || (answered_pairs == 0 && !self.config.allow_zero_outputs) {
            record(&report);
            return Err(MoeError::TooFewExperts(format!(
                "forward: {answered_pairs} (sample, expert) answers, {} needed; failed: {}",
                self.config.k_min.max(1),
                describe(&report.failed)
            )));
        }
        let out_dims = out_dims.unwrap_or_else(|| vec![self.config.in_features]);
        let width: usize = out_dims.iter().product();
        let mut y = vec![0f32; n * slots * width];
        let mut alive = vec![0u8; n * slots];
        for (g, o) in &alive_groups {
            let values = o.flatten_all()?.to_vec1::<f32>()?;
            for (r, &(s, j)) in groups[*g].rows.iter().enumerate() {
                let at = (s * slots + j) * width;
                y[at..at + width].copy_from_slice(&values[r * width..(r + 1) * width]);
                alive[s * slots + j] = 1;
            }
        }
        report.zero_samples = alive.chunks(slots).filter(|a| a.iter().all(|&v| v == 0)).count();
        if report.zero_samples > 0 && !self.config.allow_zero_outputs {
            tracing::warn!(
                samples = report.zero_samples,
                "every expert chosen for these samples failed: their outputs are zero"
            );
        }
        record(&report);
        Ok(Dispatch {
            n,
            slots,
            chosen,
            alive,
            out_dims,
            width,
            y: Tensor::from_vec(y, (n, slots, width), &Device::Cpu)?,
            groups: alive_groups.into_iter().map(|(g, _)| groups[g].clone()).collect(),
        })
    }

    /// Mixes the experts' answers with `weights (n, slots)` (a node of the caller's autograd graph; zero
    /// or negligible where a slot is dead): `Σ_j weights[s, j] · out[s, j]`, shaped `(n, out…)`. Its
    /// backward pass sends each expert that answered its weighted output gradient and adds the input
    /// gradients they return to `x`'s.
    pub(crate) fn combine(&self, x: &Tensor, dispatch: Dispatch, weights: &Tensor) -> Result<Tensor> {
        let Dispatch {
            n,
            slots,
            out_dims,
            width,
            y,
            groups,
            ..
        } = dispatch;
        let w = weights.reshape((n, slots, 1))?;
        let mixed = w.broadcast_mul(&y)?.sum(1)?;

        // the experts' side of the gradient, through a custom op on the input
        let weights_now = weights.detach().to_vec2::<f32>()?;
        let backward = ExpertsBackward {
            groups,
            weights: weights_now,
            n,
            in_features: self.config.in_features,
            width,
            config: self.config.clone(),
            transport: self.transport.clone(),
            runtime: self.runtime.clone(),
            stats: self.stats.clone(),
        };
        let grad_path = x.apply_op2(self.dummy.as_tensor(), backward)?;
        let out = (mixed + grad_path)?;
        let mut out_shape = vec![n];
        out_shape.extend_from_slice(&out_dims);
        Ok(out.reshape(out_shape)?)
    }
}

/// Splits each row of concatenated grid scores into one score list per grid dimension
/// (`[s][d][coordinate]`).
pub(crate) fn split_scores(rows: &[Vec<f32>], grid_size: &[usize]) -> Vec<Vec<Vec<f32>>> {
    rows.iter()
        .map(|row| {
            let mut at = 0;
            grid_size
                .iter()
                .map(|&g| {
                    let dim = row.get(at..at + g).map(<[f32]>::to_vec).unwrap_or_default();
                    at += g;
                    dim
                })
                .collect()
        })
        .collect()
}

/// The experts a forward pass chose and what they answered (see [`RemoteMixtureOfExperts::dispatch`]).
pub(crate) struct Dispatch {
    /// Samples in the batch.
    pub(crate) n: usize,
    /// Experts per sample at most (rows with fewer are padded with dead slots).
    pub(crate) slots: usize,
    /// Each sample's chosen experts with their grid coordinates, best first.
    pub(crate) chosen: Vec<Vec<(ExpertAddr, Vec<usize>)>>,
    /// `(n, slots)`, row-major: 1 where the expert answered.
    pub(crate) alive: Vec<u8>,
    /// The shape of one sample's output.
    pub(crate) out_dims: Vec<usize>,
    width: usize,
    /// The answers `(n, slots, width)`, zero where dead.
    y: Tensor,
    /// The experts that answered, with their rows.
    groups: Vec<Group>,
}

impl Dispatch {
    /// `(n, slots)` indices of each slot's coordinate in grid dimension `dim`, plus `offset` (dead and
    /// padded slots point at `offset`).
    pub(crate) fn coordinate_index(&self, dim: usize, offset: usize) -> Result<Tensor> {
        let mut idx = vec![offset as u32; self.n * self.slots];
        for (s, experts) in self.chosen.iter().enumerate() {
            for (j, (_, c)) in experts.iter().enumerate() {
                idx[s * self.slots + j] = (offset + c[dim]) as u32;
            }
        }
        Ok(Tensor::from_vec(idx, (self.n, self.slots), &Device::Cpu)?)
    }

    /// The `(n, slots)` u8 mask of slots whose expert answered.
    pub(crate) fn alive_mask(&self) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.alive.clone(),
            (self.n, self.slots),
            &Device::Cpu,
        )?)
    }
}

/// Softmax over the last dimension (apiary-expert's, with this crate's error).
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(apiary_expert::ops::softmax_last(x)?)
}

/// Whether every element of `t` is finite.
pub(crate) fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(apiary_expert::ops::all_finite(
        &t.to_dtype(DType::F32)?,
        "tensor",
    )?)
}

fn describe(failed: &[(String, String)]) -> String {
    if failed.is_empty() {
        return "none".into();
    }
    failed
        .iter()
        .take(4)
        .map(|(uid, why)| format!("{uid}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
        + if failed.len() > 4 { "; …" } else { "" }
}

/// What came back from a set of expert calls.
struct Outcome {
    /// `(group, tensors)` of each call that answered.
    answered: Vec<(usize, Vec<Tensor>)>,
    /// `(uid, why)` of each call that failed, timed out or was cancelled.
    failed: Vec<(String, String)>,
}

/// hivemind's `_collect_responses` for per-expert calls: wait for every call until `timeout_total`; once
/// every sample with calls has `k_min` answers, wait at most `timeout_after_k_min` more, then cancel the
/// stragglers.
async fn collect<F>(
    groups: &[Group],
    calls: impl Iterator<Item = F>,
    samples: usize,
    k_min: usize,
    timeout_total: Option<Duration>,
    timeout_after_k_min: Option<Duration>,
) -> Outcome
where
    F: std::future::Future<Output = std::result::Result<Vec<Tensor>, TransportError>>,
{
    let mut pending: FuturesUnordered<_> = calls
        .enumerate()
        .map(|(g, call)| async move { (g, call.await) })
        .collect();
    let mut answers = vec![0usize; samples];
    let mut waiting = vec![false; samples];
    for g in groups {
        for &(s, _) in &g.rows {
            waiting[s] = true;
        }
    }
    let mut short_of_k_min = waiting.iter().filter(|&&w| w).count();
    let mut deadline = timeout_total.map(|t| Instant::now() + t);
    let mut outcome = Outcome {
        answered: Vec::new(),
        failed: Vec::new(),
    };
    let mut done = vec![false; groups.len()];
    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, pending.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
            None => pending.next().await,
        };
        let Some((g, result)) = next else { break };
        done[g] = true;
        match result {
            Ok(tensors) => {
                for &(s, _) in &groups[g].rows {
                    answers[s] += 1;
                    if answers[s] == k_min.max(1) {
                        short_of_k_min = short_of_k_min.saturating_sub(1);
                    }
                }
                outcome.answered.push((g, tensors));
                if short_of_k_min == 0
                    && let Some(after) = timeout_after_k_min
                {
                    let soon = Instant::now() + after;
                    deadline = Some(deadline.map_or(soon, |d| d.min(soon)));
                }
            }
            Err(e) => outcome.failed.push((groups[g].expert.uid.clone(), e.to_string())),
        }
    }
    for (g, finished) in done.iter().enumerate() {
        if !finished {
            outcome
                .failed
                .push((groups[g].expert.uid.clone(), "timed out".to_owned()));
        }
    }
    outcome
}

/// The experts' part of the layer's backward pass: sends each expert that answered the forward pass
/// the gradient of its outputs (weighted by its softmax weight) and sums the input gradients it returns.
struct ExpertsBackward {
    groups: Vec<Group>,
    /// The softmax weights `(n, slots)` of the forward pass.
    weights: Vec<Vec<f32>>,
    n: usize,
    in_features: usize,
    width: usize,
    config: MoeConfig,
    transport: Arc<dyn ExpertTransport>,
    runtime: tokio::runtime::Handle,
    stats: Arc<Mutex<MoeStats>>,
}

impl CustomOp2 for ExpertsBackward {
    fn name(&self) -> &'static str {
        "apiary-remote-experts"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // contributes nothing to the value; it is here for its backward pass
        Ok((
            CpuStorage::F32(vec![0.0; self.n * self.width]),
            Shape::from((self.n, self.width)),
        ))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _dummy: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        self.run(grad_res)
            .map(|g| (Some(g), None))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

impl ExpertsBackward {
    fn run(&self, grad_res: &Tensor) -> Result<Tensor> {
        let grad = grad_res.to_dtype(DType::F32)?.reshape((self.n, self.width))?;
        if self.config.detect_anomalies && !all_finite(&grad)? {
            return Err(MoeError::Anomaly(
                "the layer's output gradient has non-finite values".into(),
            ));
        }
        let mut requests = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            let idx: Vec<u32> = g.rows.iter().map(|&(s, _)| s as u32).collect();
            let w: Vec<f32> = g.rows.iter().map(|&(s, j)| self.weights[s][j]).collect();
            let rows = grad.index_select(&Tensor::new(idx, &Device::Cpu)?, 0)?;
            let w = Tensor::from_vec(w, (g.rows.len(), 1), &Device::Cpu)?;
            let mut dims = g.inputs.dims().to_vec();
            dims.truncate(1);
            dims.push(self.width);
            requests.push(rows.broadcast_mul(&w)?.reshape(dims)?);
        }
        let calls = self.groups.iter().zip(requests).map(|(g, grad_out)| {
            let transport = self.transport.clone();
            let expert = g.expert.clone();
            let inputs = g.inputs.clone();
            async move { transport.backward(&expert, vec![inputs], vec![grad_out]).await }
        });
        let outcome = self.runtime.block_on(collect(
            &self.groups,
            calls,
            self.n,
            self.config.backward_k_min,
            self.config.backward_timeout,
            self.config.timeout_after_k_min,
        ));
        let mut failed = outcome.failed;
        let mut grad_x = Tensor::zeros((self.n, self.in_features), DType::F32, &Device::Cpu)?;
        let mut answered_pairs = 0;
        for (g, grads) in outcome.answered {
            let group = &self.groups[g];
            let fits = grads
                .first()
                .filter(|t| t.dims() == [group.rows.len(), self.in_features]);
            let Some(gx) = fits else {
                failed.push((
                    group.expert.uid.clone(),
                    "input gradient of the wrong shape".into(),
                ));
                continue;
            };
            let gx = gx.to_dtype(DType::F32)?;
            if self.config.detect_anomalies && !all_finite(&gx)? {
                failed.push((group.expert.uid.clone(), "non-finite input gradient".into()));
                continue;
            }
            let idx: Vec<u32> = group.rows.iter().map(|&(s, _)| s as u32).collect();
            grad_x = grad_x.index_add(&Tensor::new(idx, &Device::Cpu)?, &gx, 0)?;
            answered_pairs += group.rows.len();
        }
        let report = BackwardReport {
            experts_called: self.groups.len(),
            failed,
            answered_pairs,
        };
        {
            let mut st = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            st.backward_calls += report.experts_called as u64;
            st.backward_failures += report.failed.len() as u64;
            st.last_backward = Some(report.clone());
        }
        if answered_pairs < self.config.backward_k_min {
            return Err(MoeError::TooFewExperts(format!(
                "backward: {answered_pairs} (sample, expert) answers, {} needed; failed: {}",
                self.config.backward_k_min,
                describe(&report.failed)
            )));
        }
        Ok(grad_x)
    }
}
