//! Typed configuration with documented defaults.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::LedgerError;
use crate::event::{check_id, check_number};

/// Default [`LedgerConfig::flush_interval`]: one second.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Default [`LedgerConfig::queue_capacity`]: 4096 events.
pub const DEFAULT_QUEUE_CAPACITY: usize = 4096;
/// Default [`LedgerConfig::busy_timeout`]: five seconds.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest accepted [`LedgerConfig::queue_capacity`].
pub const MAX_QUEUE_CAPACITY: usize = 1 << 20;
/// Longest accepted [`LedgerConfig::flush_interval`]: one hour.
pub const MAX_FLUSH_INTERVAL: Duration = Duration::from_secs(3600);
/// Default [`EnergyModel::cpu_watts_per_core_busy`]: 10 W per busy core (a desktop core under
/// load, package power divided by cores, roughly).
pub const DEFAULT_CPU_WATTS_PER_CORE: f64 = 10.0;
/// Default [`EnergyModel::gpu_watts_busy`]: 150 W (a mid-range consumer GPU under load).
pub const DEFAULT_GPU_WATTS: f64 = 150.0;
/// Largest accepted wattage anywhere (model or measurement): 100 kW.
pub const MAX_WATTS: f64 = 100_000.0;
/// Longest accepted currency label, in bytes.
pub const MAX_CURRENCY_LEN: usize = 16;

/// How hard each commit pushes data to the disk (`PRAGMA synchronous` under WAL).
///
/// Both survive `kill -9` at any point with nothing committed lost: a commit has written its
/// WAL frames through `write(2)` before `COMMIT` returns, and the kernel keeps them when the
/// process dies. They differ only on power loss or a kernel crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Durability {
    /// `synchronous=FULL` (the default): the WAL is fsynced at every commit, so a commit also
    /// survives power loss. Commits are batched (one per `flush_interval`, and only when
    /// something is pending), so this costs about one fsync per second while working.
    #[default]
    Full,
    /// `synchronous=NORMAL`: the WAL is fsynced only at checkpoints. Survives `kill -9`; power
    /// loss may roll back the last commits (never corrupts).
    Normal,
}

/// The energy model used for hours with no reported power, and the user's electricity price.
///
/// Per hour, measured power ([`crate::PowerSource::Measured`], e.g. NVML samples) wins; else
/// power the caller reported as modelled; else this model is applied to the hour's compute:
/// `cpu core-seconds × cpu_watts_per_core_busy + gpu seconds × gpu_watts_busy`. The model and
/// the price are applied when a report is made, so changing them re-prices all history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnergyModel {
    /// Watts drawn by one busy CPU core (default [`DEFAULT_CPU_WATTS_PER_CORE`]).
    pub cpu_watts_per_core_busy: f64,
    /// Watts drawn by one busy GPU (default [`DEFAULT_GPU_WATTS`]).
    pub gpu_watts_busy: f64,
    /// Price of one kWh in `currency`; `None` (the default) reports no cost.
    pub price_per_kwh: Option<f64>,
    /// Label of the price's currency (default `"EUR"`; at most [`MAX_CURRENCY_LEN`] bytes).
    pub currency: String,
}

impl Default for EnergyModel {
    fn default() -> Self {
        Self {
            cpu_watts_per_core_busy: DEFAULT_CPU_WATTS_PER_CORE,
            gpu_watts_busy: DEFAULT_GPU_WATTS,
            price_per_kwh: None,
            currency: "EUR".to_owned(),
        }
    }
}

impl EnergyModel {
    /// Refuses negative, non-finite or absurd values and a bad currency label.
    pub fn validate(&self) -> Result<(), LedgerError> {
        check_number("cpu_watts_per_core_busy", self.cpu_watts_per_core_busy, MAX_WATTS)?;
        check_number("gpu_watts_busy", self.gpu_watts_busy, MAX_WATTS)?;
        if let Some(price) = self.price_per_kwh {
            check_number("price_per_kwh", price, 1.0e6)?;
        }
        if !self.currency.is_empty() {
            check_id("currency", &self.currency, MAX_CURRENCY_LEN)?;
        }
        Ok(())
    }

    /// Modelled joules for `cpu_core_seconds` of busy CPU cores and `gpu_seconds` of busy GPU.
    pub fn joules(&self, cpu_core_seconds: f64, gpu_seconds: f64) -> f64 {
        cpu_core_seconds * self.cpu_watts_per_core_busy + gpu_seconds * self.gpu_watts_busy
    }
}

/// Where the ledger lives and how it batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerConfig {
    /// The database file. By convention the node passes `<data dir>/ledger.sqlite`
    /// ([`crate::FILE_NAME`]); the parent folder is created when missing.
    pub path: PathBuf,
    /// Recorded events are aggregated in memory and committed at least this often
    /// (default [`DEFAULT_FLUSH_INTERVAL`], at most [`MAX_FLUSH_INTERVAL`]). A `kill -9` loses
    /// at most the events of the current interval; nothing already committed.
    pub flush_interval: Duration,
    /// Bound of the event queue (default [`DEFAULT_QUEUE_CAPACITY`]); a full queue makes
    /// [`crate::LedgerHandle::record`] return [`LedgerError::Busy`] instead of blocking.
    pub queue_capacity: usize,
    /// How long SQLite waits for another connection's lock before reporting
    /// [`LedgerError::Locked`] (default [`DEFAULT_BUSY_TIMEOUT`]).
    pub busy_timeout: Duration,
    /// fsync policy (default [`Durability::Full`]).
    pub durability: Durability,
    /// Energy model and price (see [`EnergyModel`]).
    pub energy: EnergyModel,
}

impl LedgerConfig {
    /// The defaults, at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            durability: Durability::default(),
            energy: EnergyModel::default(),
        }
    }

    /// Refuses an unusable configuration.
    pub fn validate(&self) -> Result<(), LedgerError> {
        if self.path.as_os_str().is_empty() {
            return Err(LedgerError::Config("path is empty".into()));
        }
        if self.flush_interval.is_zero() || self.flush_interval > MAX_FLUSH_INTERVAL {
            return Err(LedgerError::Config(format!(
                "flush_interval {:?} is outside (0, {:?}]",
                self.flush_interval, MAX_FLUSH_INTERVAL
            )));
        }
        if self.queue_capacity == 0 || self.queue_capacity > MAX_QUEUE_CAPACITY {
            return Err(LedgerError::Config(format!(
                "queue_capacity {} is outside [1, {MAX_QUEUE_CAPACITY}]",
                self.queue_capacity
            )));
        }
        self.energy.validate()
    }
}
