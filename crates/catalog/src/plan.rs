//! Which experts should this computer host? How well the grid is covered by volunteers
//! ([`Coverage`]), how much an experiment needs one more ([`need`]), and a join plan for this machine
//! ([`plan`]): uncovered experts first, then the least replicated, as many as memory and the volunteer
//! allow.
//!
//! Everything here is pure and deterministic. Volunteers that plan at the same time spread over different
//! experts through a per-volunteer tie-break ([`tie_break_of`] of their peer id).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::Serialize;

use crate::fit::{FitLevel, MachineProfile, Mode, Placement, fit, format_mib, grid_size, plural};
use crate::manifest::{Manifest, Status};

/// How many uids an explanation line lists before `… and N more`.
const LISTED_UIDS: usize = 6;

/// How many volunteers host each expert of an experiment's grid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    replicas: BTreeMap<String, u32>,
    volunteers: usize,
}

impl Coverage {
    /// Coverage from what each peer hosts: `(peer id, uids it declares)` pairs, e.g. read from the DHT.
    /// A peer counts at most once per uid (repeated uids, or the same peer listed twice, count once);
    /// uids outside the manifest's grid ([`Manifest::expert_uids`]) are ignored.
    pub fn from_rosters(
        manifest: &Manifest,
        rosters: impl IntoIterator<Item = (String, Vec<String>)>,
    ) -> Self {
        let grid: HashSet<String> = manifest.expert_uids().into_iter().collect();
        let mut hosts: BTreeSet<(String, String)> = BTreeSet::new();
        for (peer, uids) in rosters {
            for uid in uids {
                if grid.contains(&uid) {
                    hosts.insert((uid, peer.clone()));
                }
            }
        }
        let mut replicas: BTreeMap<String, u32> = BTreeMap::new();
        let mut peers = BTreeSet::new();
        for (uid, peer) in hosts {
            *replicas.entry(uid).or_default() += 1;
            peers.insert(peer);
        }
        Self {
            replicas,
            volunteers: peers.len(),
        }
    }

    /// How many distinct volunteers host `uid` (0 for an uncovered uid or one outside the grid).
    pub fn replicas(&self, uid: &str) -> u32 {
        self.replicas.get(uid).copied().unwrap_or(0)
    }

    /// How many distinct volunteers host at least one expert of the grid.
    pub fn volunteers(&self) -> usize {
        self.volunteers
    }
}

/// How much an experiment needs another volunteer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NeedLevel {
    /// Some experts have no host at all (score at least 0.6).
    High,
    /// Every expert has a host, but few have more than one (score 0.25 to 0.6).
    Moderate,
    /// Well replicated, finished, or nothing to host (score below 0.25).
    Low,
}

/// How much an experiment needs this computer, from its grid's [`Coverage`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Need {
    /// The number of experts of the grid.
    pub grid_experts: usize,
    /// How many of them at least one volunteer hosts.
    pub covered: usize,
    /// The share of the grid nobody hosts, 0 to 1.
    pub uncovered_share: f64,
    /// The fewest replicas of any expert of the grid (0 while one is uncovered).
    pub min_replicas: u32,
    /// The mean number of replicas over the grid.
    pub mean_replicas: f64,
    /// 0 to 1, higher = needs this computer more; see [`need`].
    pub score: f64,
    /// The score in words.
    pub label: NeedLevel,
}

/// How much `manifest`'s experiment needs another volunteer, given who hosts what.
///
/// The score: `0.6 + 0.4 × uncovered_share` while any expert is uncovered (an uncovered expert cannot
/// be called at all, so any gap outranks any thin coverage); otherwise `0.55 × mean(1 / replicas)` over
/// the grid (0.55 when every expert has exactly one host, about 0.28 with two each, falling towards 0 as
/// replicas grow). A finished experiment, or one with an empty grid, scores 0. Labels: High from 0.6,
/// Moderate from 0.25, Low below.
pub fn need(manifest: &Manifest, coverage: &Coverage) -> Need {
    let uids = manifest.expert_uids();
    let grid_experts = uids.len();
    let replicas: Vec<u32> = uids.iter().map(|u| coverage.replicas(u)).collect();
    let covered = replicas.iter().filter(|&&r| r > 0).count();
    let n = grid_experts.max(1) as f64;
    let uncovered_share = if grid_experts == 0 {
        0.0
    } else {
        (grid_experts - covered) as f64 / n
    };
    let min_replicas = replicas.iter().copied().min().unwrap_or(0);
    let mean_replicas = replicas.iter().map(|&r| f64::from(r)).sum::<f64>() / n;
    let score = if manifest.status == Status::Finished || grid_experts == 0 {
        0.0
    } else if covered < grid_experts {
        0.6 + 0.4 * uncovered_share
    } else {
        0.55 * replicas.iter().map(|&r| 1.0 / f64::from(r)).sum::<f64>() / n
    };
    let label = if score >= 0.6 {
        NeedLevel::High
    } else if score >= 0.25 {
        NeedLevel::Moderate
    } else {
        NeedLevel::Low
    };
    Need {
        grid_experts,
        covered,
        uncovered_share,
        min_replicas,
        mean_replicas,
        score,
        label,
    }
}

/// What this computer would host of an experiment, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JoinPlan {
    /// The experiment's id.
    pub experiment: String,
    /// The expert uids to host, in the order they were picked (most needed first).
    pub uids: Vec<String>,
    /// Where they run.
    pub placement: Placement,
    /// The memory one expert takes, MiB (see [`crate::fit::Fit::per_expert_mb`]).
    pub per_expert_mb: u64,
    /// `uids.len() × per_expert_mb`, MiB.
    pub total_mb: u64,
    /// The memory the mode lends, MiB.
    pub budget_mb: u64,
    /// The expected share of the experiment's expert calls this node will serve, 0 to 1: the sum over the
    /// planned uids of `1 / (replicas + 1)` (callers spread over a uid's hosts, this node being one more),
    /// divided by the grid's size.
    pub expected_share: f64,
    /// Sentences for the UI: what was picked and why, the memory, the expected load.
    pub explanation: Vec<String>,
}

/// Why no join plan was made. The messages are meant for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The experiment does not fit this computer in the chosen mode.
    #[error("this computer cannot host the experiment: {}", reasons.join("; "))]
    DoesNotFit {
        /// Why, as [`crate::fit::Fit::reasons`] says.
        reasons: Vec<String>,
    },
    /// The experiment is finished.
    #[error("the experiment is finished; there is nothing to join")]
    Finished,
    /// The volunteer allowed no experts at all.
    #[error("no experts to host: the limit on hosted experts is 0")]
    NoExperts,
}

/// A stable 64-bit tie-break from a peer id: FNV-1a of its UTF-8 bytes (the same on every machine and
/// every run, unlike std's randomized hasher).
pub fn tie_break_of(peer_id: &str) -> u64 {
    fnv1a(FNV_OFFSET, peer_id.as_bytes())
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The rank of `uid` among equally needed uids for the volunteer with `tie_break`: FNV-1a of the
/// tie-break's little-endian bytes and the uid, finished with SplitMix64's mixer so that every bit of
/// both moves the result.
fn tie_rank(tie_break: u64, uid: &str) -> u64 {
    let mut z = fnv1a(fnv1a(FNV_OFFSET, &tie_break.to_le_bytes()), uid.as_bytes());
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `a, b, c` or `a, b, … and 4 more`.
fn list_uids(uids: &[&str]) -> String {
    let mut out = uids
        .iter()
        .take(LISTED_UIDS)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if uids.len() > LISTED_UIDS {
        out.push_str(&format!(", … and {} more", uids.len() - LISTED_UIDS));
    }
    out
}

/// A share as a percentage for people: `19%`, `0.4%`.
fn percent(share: f64) -> String {
    let pct = share * 100.0;
    if pct >= 1.0 || pct == 0.0 {
        format!("{pct:.0}%")
    } else {
        format!("{pct:.1}%")
    }
}

/// Which experts of `manifest`'s experiment this machine should host in `mode`.
///
/// Refuses a finished experiment, a `max_experts` of `Some(0)` and an experiment that does not fit
/// ([`fit`]). Otherwise orders the grid's uids by their replicas (uncovered first, then the least
/// replicated), equals by a stable hash of `(tie_break, uid)` so that volunteers with different
/// tie-breaks ([`tie_break_of`] their peer id) pick different uids, and takes up to
/// `min(fit.max_experts, max_experts)` of them.
pub fn plan(
    manifest: &Manifest,
    coverage: &Coverage,
    machine: &MachineProfile,
    mode: Mode,
    max_experts: Option<usize>,
    tie_break: u64,
) -> Result<JoinPlan, PlanError> {
    if manifest.status == Status::Finished {
        return Err(PlanError::Finished);
    }
    if max_experts == Some(0) {
        return Err(PlanError::NoExperts);
    }
    let fit = fit(manifest, machine, mode);
    let placement = match (fit.level, fit.placement) {
        (FitLevel::DoesNotFit, _) | (_, None) => {
            return Err(PlanError::DoesNotFit { reasons: fit.reasons });
        }
        (_, Some(placement)) => placement,
    };

    let grid = grid_size(manifest);
    let mut ranked: Vec<(u32, u64, usize, String)> = manifest
        .expert_uids()
        .into_iter()
        .enumerate()
        .map(|(i, uid)| (coverage.replicas(&uid), tie_rank(tie_break, &uid), i, uid))
        .collect();
    ranked.sort_unstable();
    let take = fit.max_experts.min(max_experts.unwrap_or(usize::MAX));
    ranked.truncate(take);

    let expected_share = if grid == 0 {
        0.0
    } else {
        ranked
            .iter()
            .map(|(r, ..)| 1.0 / (f64::from(*r) + 1.0))
            .sum::<f64>()
            / grid as f64
    };

    let mut explanation = Vec::new();
    let mut by_replicas: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for (r, _, _, uid) in &ranked {
        by_replicas.entry(*r).or_default().push(uid);
    }
    for (r, uids) in &by_replicas {
        let what = plural(uids.len(), "expert", "experts");
        explanation.push(if *r == 0 {
            let what = plural(uids.len(), "uncovered expert", "uncovered experts");
            format!("{what}: {}", list_uids(uids))
        } else {
            format!(
                "{what} hosted by only {} so far: {}",
                plural(*r as usize, "volunteer", "volunteers"),
                list_uids(uids)
            )
        });
    }
    let n = ranked.len();
    let total_mb = fit.per_expert_mb.saturating_mul(n as u64);
    explanation.push(format!(
        "memory: {n} × {} = {} of a {} budget ({})",
        format_mib(fit.per_expert_mb),
        format_mib(total_mb),
        format_mib(fit.budget_mb),
        mode.title()
    ));
    if n < grid {
        if max_experts.is_some_and(|m| m < fit.max_experts) {
            explanation.push(format!(
                "capped at {} by your limit (room for {})",
                plural(n, "expert", "experts"),
                fit.max_experts
            ));
        } else {
            explanation.push(format!(
                "capped at {} by memory (the grid has {grid})",
                plural(n, "expert", "experts")
            ));
        }
    }
    explanation.push(match placement {
        Placement::Cpu => "runs on the CPU".to_owned(),
        Placement::Gpu { index } => match machine.gpus.get(index) {
            Some(gpu) => format!("runs on GPU {index} ({})", gpu.name),
            None => format!("runs on GPU {index}"),
        },
    });
    explanation.push(format!(
        "expected load: about {} of the experiment's expert calls",
        percent(expected_share)
    ));
    if fit.level == FitLevel::Tight {
        explanation.extend(fit.reasons.iter().skip(1).map(|r| format!("note: {r}")));
    }

    Ok(JoinPlan {
        experiment: manifest.id.clone(),
        uids: ranked.into_iter().map(|(.., uid)| uid).collect(),
        placement,
        per_expert_mb: fit.per_expert_mb,
        total_mb,
        budget_mb: fit.budget_mb,
        expected_share,
        explanation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_known_values() {
        // the reference FNV-1a 64 test vectors
        assert_eq!(tie_break_of(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(tie_break_of("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(tie_break_of("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn tie_ranks_depend_on_both() {
        assert_ne!(tie_rank(1, "ffn.0"), tie_rank(2, "ffn.0"));
        assert_ne!(tie_rank(1, "ffn.0"), tie_rank(1, "ffn.1"));
        assert_eq!(tie_rank(7, "ffn.3"), tie_rank(7, "ffn.3"));
    }

    #[test]
    fn helpers_format() {
        assert_eq!(list_uids(&["a", "b"]), "a, b");
        let many = ["a", "b", "c", "d", "e", "f", "g", "h"];
        assert_eq!(list_uids(&many), "a, b, c, d, e, f, … and 2 more");
        assert_eq!(percent(0.1875), "19%");
        assert_eq!(percent(0.004), "0.4%");
        assert_eq!(percent(0.0), "0%");
        assert_eq!(percent(1.0), "100%");
    }
}
