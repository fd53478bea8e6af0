//! What the ledger reports: filters, totals, history rows, CSV.

use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::error::LedgerError;

/// Which rollups a report covers. The default covers everything.
///
/// Time is in whole UTC hours: an hourly rollup is included when its start lies in
/// `[from, to)`. `uid` narrows the work counters (and the energy attributed to them); uptime is
/// recorded per experiment only, so it follows `experiment` and ignores `uid`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Only this experiment.
    pub experiment: Option<String>,
    /// Only this expert uid.
    pub uid: Option<String>,
    /// Hours starting at or after this unix second.
    pub from: Option<i64>,
    /// Hours starting before this unix second.
    pub to: Option<i64>,
}

impl Filter {
    /// Everything.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only `experiment`.
    pub fn experiment(experiment: impl Into<String>) -> Self {
        Self {
            experiment: Some(experiment.into()),
            ..Self::default()
        }
    }

    /// Narrows to hours starting in `[from, to)`.
    #[must_use]
    pub fn between(mut self, from: i64, to: i64) -> Self {
        self.from = Some(from);
        self.to = Some(to);
        self
    }

    /// Narrows to one expert uid.
    #[must_use]
    pub fn uid(mut self, uid: impl Into<String>) -> Self {
        self.uid = Some(uid.into());
        self
    }

    /// True when neither an experiment nor a uid is selected (node-wide energy is included).
    pub(crate) fn is_node_wide(&self) -> bool {
        self.experiment.is_none() && self.uid.is_none()
    }
}

/// Size of a history bucket. Buckets are UTC and start on the hour / at midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Bucket {
    /// One row per hour.
    Hour,
    /// One row per UTC day (the day's 24 hourly rollups summed).
    Day,
}

impl Bucket {
    /// Start of the bucket containing the hour starting at `hour`.
    pub fn start_of(self, hour: i64) -> i64 {
        match self {
            Self::Hour => hour - hour.rem_euclid(3600),
            Self::Day => hour - hour.rem_euclid(86_400),
        }
    }
}

/// Work counters, summed over whatever a row or a total covers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Forward calls served.
    pub forward_calls: u64,
    /// Backward calls served.
    pub backward_calls: u64,
    /// Samples processed in forward calls.
    pub forward_samples: u64,
    /// Samples processed in backward calls.
    pub backward_samples: u64,
    /// Optimizer steps taken.
    pub optimizer_steps: u64,
    /// Busy CPU core-seconds.
    pub cpu_seconds: f64,
    /// Busy GPU seconds.
    pub gpu_seconds: f64,
    /// Estimated FLOPs.
    pub flops: f64,
    /// Request bytes received.
    pub bytes_in: u64,
    /// Response bytes sent.
    pub bytes_out: u64,
    /// Failed calls.
    pub errors: u64,
}

impl Counters {
    /// Forward plus backward samples.
    pub fn samples(&self) -> u64 {
        self.forward_samples.saturating_add(self.backward_samples)
    }

    /// CPU core-seconds plus GPU seconds.
    pub fn compute_seconds(&self) -> f64 {
        self.cpu_seconds + self.gpu_seconds
    }

    /// Adds `other` (saturating).
    pub fn add(&mut self, other: &Self) {
        self.forward_calls = self.forward_calls.saturating_add(other.forward_calls);
        self.backward_calls = self.backward_calls.saturating_add(other.backward_calls);
        self.forward_samples = self.forward_samples.saturating_add(other.forward_samples);
        self.backward_samples = self.backward_samples.saturating_add(other.backward_samples);
        self.optimizer_steps = self.optimizer_steps.saturating_add(other.optimizer_steps);
        self.cpu_seconds += other.cpu_seconds;
        self.gpu_seconds += other.gpu_seconds;
        self.flops += other.flops;
        self.bytes_in = self.bytes_in.saturating_add(other.bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(other.bytes_out);
        self.errors = self.errors.saturating_add(other.errors);
    }
}

/// One history row: a bucket and an experiment (`None`: node-wide uptime and the energy not
/// attributed to any experiment, e.g. measured idle power).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Bucket start, unix seconds (UTC).
    pub start: i64,
    /// The experiment, or `None` for node-wide figures.
    pub experiment: Option<String>,
    /// Work counters.
    pub counters: Counters,
    /// Seconds up and serving.
    pub uptime_seconds: f64,
    /// Energy, kWh (measured where available, else modelled; see [`crate::EnergyModel`]).
    pub energy_kwh: f64,
    /// The measured part of `energy_kwh`.
    pub measured_energy_kwh: f64,
    /// `energy_kwh × price`, when a price is set.
    pub cost: Option<f64>,
}

/// Sums over a [`Filter`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Work counters.
    pub counters: Counters,
    /// Seconds up and serving.
    pub uptime_seconds: f64,
    /// Energy, kWh.
    pub energy_kwh: f64,
    /// The measured part of `energy_kwh`.
    pub measured_energy_kwh: f64,
    /// `energy_kwh × price`, when a price is set.
    pub cost: Option<f64>,
    /// Label of `cost`'s currency.
    pub currency: String,
}

/// One experiment this node has worked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExperimentSummary {
    /// The experiment id.
    pub experiment: String,
    /// First hour with any record (unix seconds).
    pub first_hour: i64,
    /// Last hour with any record (unix seconds).
    pub last_hour: i64,
    /// Distinct expert uids that served it.
    pub experts: u64,
    /// Samples processed for it.
    pub samples: u64,
}

/// The CSV header written by [`write_csv`].
pub const CSV_HEADER: &str = "bucket_start_utc,bucket_start_unix,experiment,forward_calls,\
backward_calls,forward_samples,backward_samples,optimizer_steps,cpu_seconds,gpu_seconds,flops,\
bytes_in,bytes_out,errors,uptime_seconds,energy_kwh,measured_energy_kwh,cost,currency";

/// Writes `rows` as CSV (RFC 4180, `\n` line ends, header [`CSV_HEADER`]). The experiment is
/// empty for node-wide rows; `cost` is empty when no price is set.
pub fn write_csv(rows: &[Row], currency: &str, out: &mut impl Write) -> Result<(), LedgerError> {
    let mut line = String::with_capacity(256);
    writeln!(out, "{CSV_HEADER}").map_err(LedgerError::Write)?;
    for row in rows {
        line.clear();
        let c = &row.counters;
        let cost = row.cost.map(|c| c.to_string()).unwrap_or_default();
        line.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            utc_string(row.start),
            row.start,
            csv_field(row.experiment.as_deref().unwrap_or("")),
            c.forward_calls,
            c.backward_calls,
            c.forward_samples,
            c.backward_samples,
            c.optimizer_steps,
            c.cpu_seconds,
            c.gpu_seconds,
            c.flops,
            c.bytes_in,
            c.bytes_out,
            c.errors,
            row.uptime_seconds,
            row.energy_kwh,
            row.measured_energy_kwh,
            cost,
            csv_field(currency),
        ));
        writeln!(out, "{line}").map_err(LedgerError::Write)?;
    }
    Ok(())
}

fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

/// `unix` seconds as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC).
pub fn utc_string(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc_string(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_string(1_699_920_000), "2023-11-14T00:00:00Z");
        assert_eq!(utc_string(951_782_400 + 3661), "2000-02-29T01:01:01Z");
        assert_eq!(utc_string(253_402_300_799), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn csv_quotes() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
