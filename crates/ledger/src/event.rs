//! What callers record, and how it is checked.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::MAX_WATTS;
use crate::error::LedgerError;

/// Longest experiment id or expert uid, in bytes.
pub const MAX_ID_LEN: usize = 256;
/// Longest interval one [`Event::Uptime`] or [`Event::Power`] may cover: one day.
pub const MAX_INTERVAL_SECONDS: f64 = 86_400.0;
/// Latest accepted timestamp: 9999-12-31T23:59:59Z.
pub const MAX_UNIX_SECONDS: f64 = 253_402_300_799.0;
/// Largest accepted compute seconds in one [`Event::Work`] (a day of 4096 busy cores).
pub const MAX_COMPUTE_SECONDS: f64 = 86_400.0 * 4096.0;
/// Largest accepted FLOP count in one [`Event::Work`].
pub const MAX_FLOPS: f64 = 1.0e24;

/// Which pass of an expert a [`Event::Work`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Pass {
    /// `rpc_forward` (and the forward half of `rpc_backward`'s recomputation is not counted).
    Forward,
    /// `rpc_backward`.
    Backward,
}

/// Where a [`Event::Work`]'s compute ran; selects the energy model's wattage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Device {
    /// CPU: `compute_seconds` are busy **core**-seconds (wall seconds × cores kept busy).
    #[default]
    Cpu,
    /// GPU: `compute_seconds` are busy GPU seconds.
    Gpu,
}

/// Whether a [`Event::Power`] sample was measured or modelled by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PowerSource {
    /// Read from hardware (NVML, RAPL...). Wins over everything else for its hour.
    Measured,
    /// Estimated by the caller. Wins over the ledger's own [`crate::EnergyModel`].
    Modelled,
}

impl PowerSource {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Measured => "measured",
            Self::Modelled => "modelled",
        }
    }
}

/// One fact for the ledger. `at` is a UTC unix timestamp in seconds (see [`unix_now`]).
///
/// `Work` is a point in time and counts in the hour containing `at`; `Uptime` and `Power`
/// cover the interval `(at - seconds, at]`, split across the hours it spans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// Calls served by one expert (batch them: one event per batch or per second is fine).
    Work {
        /// When (unix seconds).
        at: f64,
        /// Experiment id (1..=[`MAX_ID_LEN`] bytes, no control characters).
        experiment: String,
        /// Expert uid, e.g. `ffn.3.17` (same rules as `experiment`).
        uid: String,
        /// Forward or backward.
        pass: Pass,
        /// Where it ran.
        device: Device,
        /// Number of RPC calls.
        calls: u64,
        /// Samples (batch rows) processed.
        samples: u64,
        /// Optimizer steps taken (usually on backward).
        optimizer_steps: u64,
        /// Busy seconds (core-seconds on [`Device::Cpu`]).
        compute_seconds: f64,
        /// Estimated floating point operations (see [`estimate_flops`]).
        flops: f64,
        /// Request bytes received.
        bytes_in: u64,
        /// Response bytes sent.
        bytes_out: u64,
        /// Calls that failed.
        errors: u64,
    },
    /// The node was up and serving for `seconds` ending at `at`.
    Uptime {
        /// End of the interval (unix seconds).
        at: f64,
        /// The experiment served, or `None` for the node as a whole.
        experiment: Option<String>,
        /// Length of the interval (≤ [`MAX_INTERVAL_SECONDS`]).
        seconds: f64,
    },
    /// The machine drew `watts` on average for `seconds` ending at `at`.
    Power {
        /// End of the interval (unix seconds).
        at: f64,
        /// Average power (0..=[`MAX_WATTS`]).
        watts: f64,
        /// Length of the interval (≤ [`MAX_INTERVAL_SECONDS`]).
        seconds: f64,
        /// Measured or modelled.
        source: PowerSource,
    },
}

/// Now, as unix seconds (0 if the clock is before 1970).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub(crate) fn check_id(field: &'static str, value: &str, max: usize) -> Result<(), LedgerError> {
    let reason = if value.is_empty() {
        "is empty".to_owned()
    } else if value.len() > max {
        format!("is {} bytes, at most {max} allowed", value.len())
    } else if value.chars().any(char::is_control) {
        "contains control characters".to_owned()
    } else {
        return Ok(());
    };
    Err(LedgerError::InvalidId { field, reason })
}

pub(crate) fn check_number(field: &'static str, value: f64, max: f64) -> Result<(), LedgerError> {
    let reason = if !value.is_finite() {
        "not a finite number"
    } else if value < 0.0 {
        "negative"
    } else if value > max {
        "too large"
    } else {
        return Ok(());
    };
    Err(LedgerError::InvalidNumber { field, value, reason })
}

fn check_count(field: &'static str, value: u64) -> Result<(), LedgerError> {
    if i64::try_from(value).is_err() {
        // the f64 only describes the refused value; precision does not matter here
        let shown = value as f64;
        return Err(LedgerError::InvalidNumber {
            field,
            value: shown,
            reason: "too large",
        });
    }
    Ok(())
}

impl Event {
    /// Checks every field; an `Err` means the event must not be written.
    pub fn validate(&self) -> Result<(), LedgerError> {
        match self {
            Self::Work {
                at,
                experiment,
                uid,
                pass: _,
                device: _,
                calls,
                samples,
                optimizer_steps,
                compute_seconds,
                flops,
                bytes_in,
                bytes_out,
                errors,
            } => {
                check_number("at", *at, MAX_UNIX_SECONDS)?;
                check_id("experiment", experiment, MAX_ID_LEN)?;
                check_id("uid", uid, MAX_ID_LEN)?;
                check_count("calls", *calls)?;
                check_count("samples", *samples)?;
                check_count("optimizer_steps", *optimizer_steps)?;
                check_count("bytes_in", *bytes_in)?;
                check_count("bytes_out", *bytes_out)?;
                check_count("errors", *errors)?;
                check_number("compute_seconds", *compute_seconds, MAX_COMPUTE_SECONDS)?;
                check_number("flops", *flops, MAX_FLOPS)
            }
            Self::Uptime {
                at,
                experiment,
                seconds,
            } => {
                check_number("at", *at, MAX_UNIX_SECONDS)?;
                if let Some(experiment) = experiment {
                    check_id("experiment", experiment, MAX_ID_LEN)?;
                }
                check_number("seconds", *seconds, MAX_INTERVAL_SECONDS)
            }
            Self::Power {
                at,
                watts,
                seconds,
                source: _,
            } => {
                check_number("at", *at, MAX_UNIX_SECONDS)?;
                check_number("watts", *watts, MAX_WATTS)?;
                check_number("seconds", *seconds, MAX_INTERVAL_SECONDS)
            }
        }
    }
}

/// Start (unix seconds) of the UTC hour containing `at`.
pub(crate) fn hour_of(at: f64) -> i64 {
    // `at` is validated finite and within [0, MAX_UNIX_SECONDS]; `as` saturates anyway
    let whole = at.floor() as i64;
    whole - whole.rem_euclid(3600)
}

/// Splits `(at - seconds, at]` into `(hour start, seconds in that hour)` pieces.
pub(crate) fn split_hours(at: f64, seconds: f64, mut piece: impl FnMut(i64, f64)) {
    let start = (at - seconds).max(0.0);
    let mut end = at;
    // at most MAX_INTERVAL_SECONDS / 3600 + 2 pieces
    for _ in 0..64 {
        if end <= start {
            return;
        }
        let mut hour = hour_of(end);
        if hour as f64 == end {
            hour -= 3600; // an interval ending exactly on the hour belongs to the one before
        }
        let piece_start = (hour as f64).max(start);
        piece(hour, end - piece_start);
        end = piece_start;
    }
}

/// A rough FLOP count for `samples` rows through a hivemind expert of `kind` with hidden size
/// `hidden_dim`, for the ledger's `flops` column. Deliberately simple:
///
/// * parameters `p`: `"ffn"` and `"det_dropout"` (h → 4h → h) ≈ 8h²; `"transformer"` (attention
///   4h² + feed-forward 8h²) ≈ 12h²; `"nop"` = 0; anything else is counted as one h×h linear
///   layer, h²;
/// * forward ≈ 2 × p × samples (one multiply and one add per weight per row);
/// * backward ≈ 2 × forward (gradients for inputs and for weights).
///
/// Attention's sequence-length term, biases and activations are ignored. Saturates at `f64`
/// range instead of overflowing.
pub fn estimate_flops(kind: &str, hidden_dim: usize, samples: u64, pass: Pass) -> f64 {
    let h = hidden_dim as f64;
    let params = match kind {
        "ffn" | "det_dropout" => 8.0 * h * h,
        "transformer" => 12.0 * h * h,
        "nop" => 0.0,
        _ => h * h,
    };
    let forward = 2.0 * params * samples as f64;
    match pass {
        Pass::Forward => forward,
        Pass::Backward => 2.0 * forward,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_split_on_boundaries() {
        let mut pieces = Vec::new();
        split_hours(7200.0 + 600.0, 1200.0, |h, s| pieces.push((h, s)));
        assert_eq!(pieces, vec![(7200, 600.0), (3600, 600.0)]);
        pieces.clear();
        split_hours(7200.0, 3600.0, |h, s| pieces.push((h, s)));
        assert_eq!(pieces, vec![(3600, 3600.0)]);
        assert_eq!(hour_of(7199.5), 3600);
        assert_eq!(hour_of(7200.0), 7200);
    }

    #[test]
    fn flops_model() {
        assert_eq!(
            estimate_flops("ffn", 1024, 1, Pass::Forward),
            2.0 * 8.0 * 1024.0 * 1024.0
        );
        assert_eq!(
            estimate_flops("ffn", 1024, 3, Pass::Backward),
            4.0 * 8.0 * 1024.0 * 1024.0 * 3.0
        );
        assert_eq!(estimate_flops("nop", 1024, 3, Pass::Forward), 0.0);
        assert_eq!(estimate_flops("transformer", 10, 1, Pass::Forward), 2400.0);
    }
}
