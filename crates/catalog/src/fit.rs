//! Does an experiment fit this computer? An analytic estimate of one hosted expert's memory
//! ([`expert_memory_mb`]) and a verdict for a machine and a mode ([`fit`]) with reasons the UI can show.
//!
//! Everything here is pure and deterministic: the machine is described by a [`MachineProfile`] (measured
//! elsewhere), nothing is allocated or probed.
//!
//! # The memory estimate
//!
//! One hosted expert holds, in f32 (4 bytes a value):
//!
//! * its parameters, their gradients and the optimizer's slots: `params × 4 × (2 + slots)` bytes, with
//!   `slots` 2 for Adam and AdamW (first and second moments), 1 for SGD with momentum (the momentum
//!   buffer) and 0 for plain SGD;
//! * the activations of a batch of `max_batch_size` samples: `max_batch_size × per_sample × 4` bytes, with
//!   `per_sample` from [`activation_values_per_sample`].
//!
//! The parameter counts ([`param_count`]) are exact and analytic, per kind of the zoo (`h` is the hidden
//! dimension): `ffn` `8h² + 7h`, `transformer` `12h² + 13h`, `nop` 0, `det_dropout` `4h² + 3h`.

use std::fmt;
use std::str::FromStr;

use apiary_expert::schema::TRANSFORMER_SEQ_LEN;
use apiary_expert::{ExpertKind, OptimizerConfig};
use serde::{Deserialize, Serialize};

use crate::manifest::{ExpertSpec, MAX_GRID_EXPERTS, Manifest, Rejection};

/// The attention heads of the zoo's `transformer` (hivemind's `TunedTransformer`).
const TRANSFORMER_HEADS: u128 = 16;
const MIB: u128 = 1024 * 1024;

/// One GPU the node can compute on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProfile {
    /// The device's name, e.g. `NVIDIA GeForce RTX 3060`.
    pub name: String,
    /// All of its memory, MiB.
    pub vram_total_mb: u64,
    /// Its memory not in use by anyone when measured, MiB.
    pub vram_free_mb: u64,
}

/// What a volunteer's computer offers, as measured by the node (or recorded for tests).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineProfile {
    /// A name for people, e.g. `gaming desktop`.
    pub name: String,
    /// Logical CPU cores.
    pub cpu_cores: usize,
    /// All of the RAM, MiB.
    pub ram_total_mb: u64,
    /// RAM the system reports available (free plus reclaimable caches), MiB.
    pub ram_available_mb: u64,
    /// Free disk where the node keeps its checkpoints, MiB.
    pub disk_free_mb: u64,
    /// Measured upload/download bandwidth, Mbit/s; `None` when unknown (never measured).
    #[serde(default)]
    pub bandwidth_mbps: Option<u32>,
    /// The GPUs this build can compute on (none for a CPU-only build), in the order the node numbers
    /// them ([`Placement::Gpu`]'s `index`).
    #[serde(default)]
    pub gpus: Vec<GpuProfile>,
}

/// How much of the computer the volunteer lends.
///
/// Modes are ordered from the lightest (`Quiet`) to the heaviest (`Max`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// A quarter of the available memory: the computer stays fully usable.
    Quiet,
    /// Half of the available memory (the default).
    #[default]
    Balanced,
    /// 80% of the available memory: for a computer that is otherwise idle.
    Max,
}

impl Mode {
    /// Every mode, from the lightest to the heaviest.
    pub const ALL: [Mode; 3] = [Mode::Quiet, Mode::Balanced, Mode::Max];

    /// The share of the *available* RAM (on the CPU) or of the *free* VRAM (on a GPU) that this mode lets
    /// hosted experts use: Quiet 0.25, Balanced 0.5, Max 0.8. The rest stays with the volunteer's own
    /// programs (and, on the GPU, with the framework's own buffers).
    pub fn memory_share(self) -> f64 {
        match self {
            Self::Quiet => 0.25,
            Self::Balanced => 0.5,
            Self::Max => 0.8,
        }
    }

    /// The mode's lowercase name, as [`FromStr`] reads it and [`fmt::Display`] writes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Quiet => "quiet",
            Self::Balanced => "balanced",
            Self::Max => "max",
        }
    }

    /// The mode's name for sentences, capitalised: `Quiet`, `Balanced`, `Max`.
    pub fn title(self) -> &'static str {
        match self {
            Self::Quiet => "Quiet",
            Self::Balanced => "Balanced",
            Self::Max => "Max",
        }
    }

    /// The share in words: `a quarter`, `half`, `80%`.
    fn share_words(self) -> &'static str {
        match self {
            Self::Quiet => "a quarter of",
            Self::Balanced => "half",
            Self::Max => "80% of",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A mode name that is none of `quiet`, `balanced`, `max`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode `{0}` (known: quiet, balanced, max)")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;

    /// `quiet`, `balanced` or `max`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownMode(s.chars().take(64).collect()))
    }
}

/// The exact number of scalar parameters of an expert of the zoo with hidden dimension `h` (what
/// `apiary_expert::Expert::num_params` counts, without building one): `ffn` `8h² + 7h`, `transformer`
/// `12h² + 13h`, `nop` 0 (one empty tensor), `det_dropout` `4h² + 3h`.
pub fn param_count(kind: ExpertKind, hidden_dim: usize) -> u128 {
    let h = hidden_dim as u128;
    match kind {
        // Linear(h→4h) + Linear(4h→h) + LayerNorm(h)
        ExpertKind::Ffn => (4 * h * h + 4 * h) + (4 * h * h + h) + 2 * h,
        // in_proj (3h×h + 3h), out_proj (h×h + h), linear1 (4h×h + 4h), linear2 (h×4h + h), 2 LayerNorms
        ExpertKind::Transformer => {
            (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h) + 4 * h
        }
        ExpertKind::Nop => 0,
        // Linear(h→2h) + Linear(2h→h)
        ExpertKind::DetDropout => (2 * h * h + 2 * h) + (2 * h * h + h),
    }
}

/// The f32 values one sample of a batch keeps alive while an expert of `kind` trains on it: the values
/// the forward pass keeps for backward, doubled for the gradients backward makes of them.
///
/// * `ffn`: input `h`, `Linear(h→4h)` output `4h`, its GELU `4h`, `Linear(4h→h)` output `h`, the
///   LayerNorm's output `h`: `2 × 11h`.
/// * `transformer`: per token (hivemind's sample is 128 tokens long) the input `h`, q/k/v `3h`, attention
///   context `h`, out-projection `h`, first norm `h`, `linear1` `4h`, its activation `4h`, `linear2` `h`,
///   second norm `h` (17h), plus the attention scores and their softmax over 16 heads (`2 × 16 × 128`):
///   `2 × 128 × (17h + 32 × 128)`.
/// * `det_dropout`: input `h`, mask `h`, masked input `h`, `Linear(h→2h)` `2h`, its ReLU `2h`, output
///   `h`: `2 × 8h`.
/// * `nop`: input and output: `2 × 2h`.
pub fn activation_values_per_sample(kind: ExpertKind, hidden_dim: usize) -> u128 {
    let h = hidden_dim as u128;
    let forward = match kind {
        ExpertKind::Ffn => 11 * h,
        ExpertKind::Transformer => {
            let s = TRANSFORMER_SEQ_LEN as u128;
            s * (17 * h + 2 * TRANSFORMER_HEADS * s)
        }
        ExpertKind::DetDropout => 8 * h,
        ExpertKind::Nop => 2 * h,
    };
    2 * forward
}

/// The optimizer's state per parameter: 2 for Adam/AdamW, 1 for SGD with momentum, 0 for plain SGD.
pub fn optimizer_slots(optimizer: &OptimizerConfig) -> u128 {
    match *optimizer {
        OptimizerConfig::Adam { .. } | OptimizerConfig::AdamW { .. } => 2,
        OptimizerConfig::Sgd { momentum, .. } if momentum != 0.0 => 1,
        OptimizerConfig::Sgd { .. } => 0,
    }
}

/// An analytic estimate of the memory one hosted expert of `spec` needs, MiB (rounded up, at least 1):
/// `params × 4 × (2 + optimizer slots) + max_batch_size × activation values per sample × 4` bytes (see
/// the module docs). Refuses a spec with an unknown kind, bad dimensions or a bad optimizer.
pub fn expert_memory_mb(spec: &ExpertSpec) -> Result<u64, Rejection> {
    let config = spec.expert_config()?;
    let optimizer = spec.optimizer.to_config()?;
    let params = param_count(config.kind, config.hid_dim);
    let state = params * 4 * (2 + optimizer_slots(&optimizer));
    let activations =
        spec.max_batch_size as u128 * activation_values_per_sample(config.kind, config.hid_dim) * 4;
    let mib = (state + activations).div_ceil(MIB).max(1);
    Ok(u64::try_from(mib).unwrap_or(u64::MAX))
}

/// Where hosted experts compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// On the CPU, in RAM.
    Cpu,
    /// On a GPU, in its memory.
    Gpu {
        /// The GPU's position in [`MachineProfile::gpus`].
        index: usize,
    },
}

/// The verdict of [`fit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FitLevel {
    /// Fits comfortably.
    Fits,
    /// Fits, but only just: one expert, only in a heavier mode than Quiet, a slow connection or little
    /// disk to spare.
    Tight,
    /// Cannot host the experiment.
    DoesNotFit,
}

/// Whether, where and how many experts of an experiment fit a machine in a mode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fit {
    /// The verdict.
    pub level: FitLevel,
    /// Where the experts would run; `None` only when there is nowhere to run them (the experiment needs a
    /// GPU and there is none, or its expert is invalid).
    pub placement: Option<Placement>,
    /// The memory one hosted expert takes, MiB: the larger of [`expert_memory_mb`] and the manifest's
    /// per-expert requirement for the placement (RAM on the CPU, VRAM on a GPU).
    pub per_expert_mb: u64,
    /// The memory the mode lends to experts, MiB: [`Mode::memory_share`] of the available RAM or of the
    /// chosen GPU's free VRAM.
    pub budget_mb: u64,
    /// How many experts fit the budget, at most the grid's size; 0 when it does not fit.
    pub max_experts: usize,
    /// Short sentences for the UI, at least one: why it does not fit or is tight, or how much room there
    /// is.
    pub reasons: Vec<String>,
}

/// The number of experts of the manifest's grid (as [`Manifest::expert_uids`] lists them), without
/// listing them.
pub fn grid_size(manifest: &Manifest) -> usize {
    if manifest.grid.is_empty() {
        return 0;
    }
    manifest
        .grid
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .unwrap_or(0)
        .min(MAX_GRID_EXPERTS)
}

/// A size in MiB for people: `40 MiB` below 1 GiB, else GiB with one decimal (`2.0 GiB`, `23.3 GiB`).
pub fn format_mib(mb: u64) -> String {
    if mb < 1024 {
        format!("{mb} MiB")
    } else {
        format!("{:.1} GiB", mb as f64 / 1024.0)
    }
}

/// `n thing` or `n things`.
pub(crate) fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The memory a mode lends out of `available` MiB.
fn budget(mode: Mode, available: u64) -> u64 {
    (available as f64 * mode.memory_share()).floor() as u64
}

/// Whether the experiment's experts fit `machine` in `mode`, where, and how many.
///
/// * Placement: the GPU with the most free VRAM (the first of equals) when the experiment asks for VRAM
///   (`min_vram_mb_per_expert > 0`) and the machine has a GPU; the CPU when it asks for none. Asking for
///   VRAM on a machine without a GPU does not fit.
/// * Budget: [`Mode::memory_share`] × the available RAM (CPU) or the GPU's free VRAM; `max_experts` =
///   budget / `per_expert_mb`, at most the grid's size.
/// * Does not fit: not one expert fits the budget, the free disk is below `disk_mb`, or the bandwidth is
///   known and below a quarter of `bandwidth_mbps`.
/// * Tight: only one expert fits, or none would fit in Quiet mode (it fits only because of the mode), or
///   the bandwidth is known and below `bandwidth_mbps`, or the free disk is below twice `disk_mb`.
/// * Fits otherwise.
pub fn fit(manifest: &Manifest, machine: &MachineProfile, mode: Mode) -> Fit {
    let req = &manifest.requirements;
    let estimate = match expert_memory_mb(&manifest.expert) {
        Ok(mb) => mb,
        Err(e) => {
            return Fit {
                level: FitLevel::DoesNotFit,
                placement: None,
                per_expert_mb: 0,
                budget_mb: 0,
                max_experts: 0,
                reasons: vec![format!("the experiment's expert cannot be built: {e}")],
            };
        }
    };

    let wants_gpu = req.min_vram_mb_per_expert > 0;
    let best_gpu = machine
        .gpus
        .iter()
        .enumerate()
        .fold(None::<(usize, &GpuProfile)>, |best, (i, g)| match best {
            Some((_, b)) if b.vram_free_mb >= g.vram_free_mb => best,
            _ => Some((i, g)),
        });
    let (placement, per_expert_mb, available, memory_words) = match (wants_gpu, best_gpu) {
        (false, _) => (
            Placement::Cpu,
            estimate.max(u64::from(req.min_ram_mb_per_expert)),
            machine.ram_available_mb,
            "the free RAM".to_owned(),
        ),
        (true, Some((index, gpu))) => (
            Placement::Gpu { index },
            estimate.max(u64::from(req.min_vram_mb_per_expert)),
            gpu.vram_free_mb,
            format!("the free VRAM of {}", gpu.name),
        ),
        (true, None) => {
            return Fit {
                level: FitLevel::DoesNotFit,
                placement: None,
                per_expert_mb: estimate.max(u64::from(req.min_vram_mb_per_expert)),
                budget_mb: 0,
                max_experts: 0,
                reasons: vec![format!(
                    "needs a GPU with at least {} per expert; no usable GPU was found",
                    format_mib(u64::from(req.min_vram_mb_per_expert))
                )],
            };
        }
    };

    let grid = grid_size(manifest);
    let room = |m: Mode| -> u64 { budget(m, available) / per_expert_mb.max(1) };
    let budget_mb = budget(mode, available);
    let uncapped = room(mode);
    let max_experts = usize::try_from(uncapped).unwrap_or(usize::MAX).min(grid);
    let mode_words = format!("{}: {} {memory_words}", mode.title(), mode.share_words());

    let mut refusals = Vec::new();
    if grid == 0 {
        refusals.push("the experiment's grid has no experts".to_owned());
    } else if uncapped == 0 {
        let mut line = format!(
            "one expert needs {} but {} lends only {} ({mode_words})",
            format_mib(per_expert_mb),
            mode.title(),
            format_mib(budget_mb)
        );
        if let Some(heavier) = Mode::ALL.into_iter().find(|&m| m > mode && room(m) > 0) {
            line.push_str(&format!("; {} mode would fit one", heavier.title()));
        }
        refusals.push(line);
    }
    let disk = u64::from(req.disk_mb);
    if machine.disk_free_mb < disk {
        refusals.push(format!(
            "needs {} of free disk for checkpoints; only {} is free",
            format_mib(disk),
            format_mib(machine.disk_free_mb)
        ));
    }
    if let Some(bw) = machine.bandwidth_mbps
        && u64::from(bw) * 4 < u64::from(req.bandwidth_mbps)
    {
        refusals.push(format!(
            "needs about {} Mbit/s; this connection measured {bw} Mbit/s, under a quarter of that",
            req.bandwidth_mbps
        ));
    }
    if !refusals.is_empty() {
        return Fit {
            level: FitLevel::DoesNotFit,
            placement: Some(placement),
            per_expert_mb,
            budget_mb,
            max_experts: 0,
            reasons: refusals,
        };
    }

    let all = if max_experts == grid && grid > 1 {
        "all "
    } else {
        ""
    };
    let mut reasons = vec![format!(
        "room for {all}{} of {} in {} ({mode_words})",
        plural(max_experts, "expert", "experts"),
        format_mib(per_expert_mb),
        format_mib(budget_mb)
    )];
    let mut tight = false;
    if uncapped == 1 && grid > 1 {
        tight = true;
        reasons.push("only one expert fits".to_owned());
    }
    if mode != Mode::Quiet && room(Mode::Quiet) == 0 {
        tight = true;
        reasons.push(format!(
            "fits only because {} lends more memory than Quiet mode",
            mode.title()
        ));
    }
    if let Some(bw) = machine.bandwidth_mbps
        && bw < req.bandwidth_mbps
    {
        tight = true;
        reasons.push(format!(
            "the connection ({bw} Mbit/s) is slower than the {} Mbit/s the experiment expects",
            req.bandwidth_mbps
        ));
    }
    if machine.disk_free_mb < disk.saturating_mul(2) {
        tight = true;
        reasons.push(format!(
            "little disk to spare: {} free for {} of checkpoints",
            format_mib(machine.disk_free_mb),
            format_mib(disk)
        ));
    }
    Fit {
        level: if tight { FitLevel::Tight } else { FitLevel::Fits },
        placement: Some(placement),
        per_expert_mb,
        budget_mb,
        max_experts,
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use apiary_expert::{Expert, ExpertConfig};

    use super::*;

    fn spec(
        kind: &str,
        hidden_dim: usize,
        max_batch_size: usize,
        optimizer: serde_json::Value,
    ) -> ExpertSpec {
        serde_json::from_value(serde_json::json!({
            "kind": kind,
            "hidden_dim": hidden_dim,
            "max_batch_size": max_batch_size,
            "optimizer": optimizer,
        }))
        .unwrap()
    }

    #[test]
    fn param_counts_match_the_zoo() {
        for kind in ExpertKind::ALL {
            for h in [1usize, 2, 3, 8, 16, 32, 48] {
                if kind == ExpertKind::Transformer && h % 16 != 0 {
                    continue;
                }
                let built = Expert::new(ExpertConfig::new(kind, h), 0).unwrap().num_params();
                assert_eq!(param_count(kind, h), built as u128, "{kind} h={h}");
            }
        }
        assert_eq!(param_count(ExpertKind::Ffn, 1024), 8 * 1024 * 1024 + 7 * 1024);
        assert_eq!(
            param_count(ExpertKind::Transformer, 1024),
            12 * 1024 * 1024 + 13 * 1024
        );
    }

    #[test]
    fn memory_estimate_by_hand() {
        let adam = serde_json::json!({"name": "adam", "lr": 1e-3});
        // ffn h=1024, batch 1024: params 8,395,776 × 4 × 4 = 134,332,416 bytes;
        // activations 1024 × 22 × 1024 × 4 = 92,274,688 bytes; total 226,607,104 bytes = 216.1 MiB → 217
        assert_eq!(
            expert_memory_mb(&spec("ffn", 1024, 1024, adam.clone())).unwrap(),
            217
        );
        // plain SGD holds no slots: 8,395,776 × 8 = 67,166,208 + 92,274,688 = 159,440,896 bytes → 153 MiB
        let sgd = serde_json::json!({"name": "sgd", "lr": 0.1});
        assert_eq!(expert_memory_mb(&spec("ffn", 1024, 1024, sgd)).unwrap(), 153);
        // SGD with momentum: one slot, 8,395,776 × 12 = 100,749,312 + 92,274,688 = 193,024,000 → 185 MiB
        let momentum = serde_json::json!({"name": "sgd", "lr": 0.1, "momentum": 0.9});
        assert_eq!(expert_memory_mb(&spec("ffn", 1024, 1024, momentum)).unwrap(), 185);
        // transformer h=1024, batch 64: 12,596,224 × 16 = 201,539,584;
        // 64 × 2 × 128 × (17 × 1024 + 4096) × 4 = 1,409,286,144; total 1,610,825,728 bytes → 1537 MiB
        assert_eq!(
            expert_memory_mb(&spec("transformer", 1024, 64, adam.clone())).unwrap(),
            1537
        );
        // nop: no parameters; tiny activations still count as 1 MiB
        assert_eq!(expert_memory_mb(&spec("nop", 8, 16, adam.clone())).unwrap(), 1);
        // det_dropout h=512, batch 4096: 1,050,112 × 16 = 16,801,792 + 4096 × 16 × 512 × 4 = 134,217,728
        // → 151,019,520 bytes → 145 MiB
        assert_eq!(
            expert_memory_mb(&spec("det_dropout", 512, 4096, adam.clone())).unwrap(),
            145
        );
        // the biggest dimensions a manifest allows do not overflow
        let huge = expert_memory_mb(&spec("transformer", 65_536, 1 << 20, adam.clone())).unwrap();
        assert!(huge > 1 << 30, "{huge}");
    }

    #[test]
    fn invalid_specs_are_refused() {
        let adam = serde_json::json!({"name": "adam", "lr": 1e-3});
        assert!(matches!(
            expert_memory_mb(&spec("lstm", 64, 16, adam.clone())),
            Err(Rejection::UnknownExpertKind { .. })
        ));
        assert!(matches!(
            expert_memory_mb(&spec("transformer", 17, 16, adam)),
            Err(Rejection::InvalidDims { .. })
        ));
        let bad = serde_json::json!({"name": "rmsprop", "lr": 1e-3});
        assert!(matches!(
            expert_memory_mb(&spec("ffn", 64, 16, bad)),
            Err(Rejection::InvalidTraining { .. })
        ));
    }

    #[test]
    fn modes_parse_and_print() {
        for m in Mode::ALL {
            assert_eq!(m.to_string().parse::<Mode>().unwrap(), m);
        }
        assert_eq!("Balanced".parse::<Mode>().unwrap(), Mode::Balanced);
        assert_eq!(" max ".parse::<Mode>().unwrap(), Mode::Max);
        assert_eq!(
            "turbo".parse::<Mode>().unwrap_err().to_string(),
            "unknown mode `turbo` (known: quiet, balanced, max)"
        );
        assert_eq!(serde_json::to_string(&Mode::Quiet).unwrap(), "\"quiet\"");
        assert_eq!(Mode::Quiet.memory_share(), 0.25);
        assert_eq!(Mode::Balanced.memory_share(), 0.5);
        assert_eq!(Mode::Max.memory_share(), 0.8);
        assert_eq!(Mode::default(), Mode::Balanced);
    }

    #[test]
    fn sizes_format() {
        assert_eq!(format_mib(0), "0 MiB");
        assert_eq!(format_mib(40), "40 MiB");
        assert_eq!(format_mib(1023), "1023 MiB");
        assert_eq!(format_mib(1024), "1.0 GiB");
        assert_eq!(format_mib(2048), "2.0 GiB");
        assert_eq!(format_mib(23_900), "23.3 GiB");
    }
}
