//! The contribution ledger: what this volunteer computed, for which experiment and expert, and
//! what it cost in energy — in an embedded SQLite database.
//!
//! # Use
//!
//! ```no_run
//! # async fn demo(data_dir: &std::path::Path) -> Result<(), apiary_ledger::LedgerError> {
//! use apiary_ledger::{Bucket, Device, Event, Filter, Ledger, LedgerConfig, Pass, unix_now};
//! let ledger = Ledger::open(LedgerConfig::new(data_dir.join(apiary_ledger::FILE_NAME)))?;
//! ledger.record(Event::Work {
//!     at: unix_now(), experiment: "exp".into(), uid: "ffn.0.1".into(), pass: Pass::Forward,
//!     device: Device::Gpu, calls: 1, samples: 32, optimizer_steps: 0, compute_seconds: 0.02,
//!     flops: apiary_ledger::estimate_flops("ffn", 1024, 32, Pass::Forward),
//!     bytes_in: 4096, bytes_out: 4096, errors: 0,
//! })?; // never blocks; `Busy` when the queue is full
//! let committed = ledger.flush().await?; // returns after COMMIT
//! let per_day = ledger.history(Filter::experiment("exp"), Bucket::Day).await?;
//! ledger.close().await?;
//! # let _ = (committed, per_day); Ok(()) }
//! ```
//!
//! # File location
//!
//! One file per node. The node passes `<data dir>/ledger.sqlite` ([`FILE_NAME`]; the data dir
//! is the platform's, e.g. `$XDG_DATA_HOME/apiary` on Linux); the folder is created when
//! missing. SQLite keeps `ledger.sqlite-wal` and `ledger.sqlite-shm` beside it while open.
//!
//! # Threads
//!
//! [`Ledger::open`] starts one std thread, `apiary-ledger`, which alone owns the connection.
//! [`LedgerHandle`]s (cheap clones) talk to it through one bounded channel:
//! [`LedgerHandle::record`] is a non-blocking `try_send` (a full queue is
//! [`LedgerError::Busy`], counted, never a wait); async requests (`flush`, `totals`, `history`,
//! `experiments`, `export_csv`, `close`) wait on a `tokio::sync::oneshot`, never blocking a
//! tokio worker; `*_blocking` twins serve plain threads. The thread aggregates events in memory
//! and commits them once per [`LedgerConfig::flush_interval`] (default 1 s), on `flush`, before
//! every query, and on `close` / when the last handle is dropped.
//!
//! # Durability
//!
//! * Write-ahead logging (`journal_mode=WAL`); every commit is one `BEGIN IMMEDIATE`
//!   transaction holding all the rollup upserts of the interval plus the lifetime event count.
//! * `synchronous=FULL` by default ([`Durability::Full`]): each commit fsyncs the WAL, so a
//!   committed interval survives `kill -9` *and* power loss. Since commits are batched (about
//!   one per second while working, none while idle) this costs little.
//!   [`Durability::Normal`] skips that fsync: still safe against `kill -9` (the frames are in the
//!   kernel when `COMMIT` returns), but power loss may roll back the last commits.
//! * A `kill -9` loses at most the events recorded since the last commit (≤ one flush
//!   interval); [`LedgerHandle::flush`] returns only after `COMMIT`, so what it reports is
//!   durable. The tests kill a writer child process with SIGKILL at different points and check
//!   that every count it printed as committed is in the reopened database.
//! * A failed commit (the database is locked by another process) keeps the events pending in
//!   memory and retries at the next interval; `flush` reports [`LedgerError::Locked`].
//!
//! # Opening checks
//!
//! In this order, read-only until the last two steps, and never deleting or replacing the file:
//! set `busy_timeout`; read `PRAGMA user_version` (not SQLite → [`LedgerError::NotADatabase`];
//! held by an exclusive lock past the timeout → [`LedgerError::Locked`]); a version above
//! [`SCHEMA_VERSION`] → [`LedgerError::TooNew`]; a database of someone else (tables but version
//! 0, or a foreign `application_id`) → [`LedgerError::NotADatabase`]; `PRAGMA quick_check` →
//! [`LedgerError::Corrupt`]; then switch to WAL, set `synchronous` and run the missing
//! migrations, each in its own transaction that also bumps `user_version`.
//!
//! # Schema (version 1)
//!
//! Raw events are not kept: they are folded, on write, into hourly rollups (UTC hour starts,
//! unix seconds), upserting sums, so the file stays small (one row per hour × expert worked).
//!
//! * `meta(key, value)`: `created_at` (unix seconds), `app_version` (that created it),
//!   `events_committed` (lifetime count of committed events).
//! * `work_hourly(hour, experiment, uid, forward_calls, backward_calls, forward_samples,
//!   backward_samples, optimizer_steps, cpu_seconds, gpu_seconds, flops, bytes_in, bytes_out,
//!   errors)`, primary key `(hour, experiment, uid)`.
//! * `uptime_hourly(hour, experiment, seconds)`, `experiment = ''` for node-wide uptime.
//! * `power_hourly(hour, source, joules, seconds)`, `source` `'measured'` or `'modelled'`.
//! * `PRAGMA user_version` = [`SCHEMA_VERSION`], `PRAGMA application_id` = [`APPLICATION_ID`].
//!
//! # Energy
//!
//! Per hour: measured power wins, else power the caller reported as modelled, else the
//! [`EnergyModel`] applied to the hour's compute (CPU core-seconds × W per core + GPU seconds ×
//! GPU W). kWh = Σ W·s / 3.6e6; cost = kWh × the user's price when one is set (else `None`).
//! Reported power is node-wide; an experiment (or expert) is attributed the share of it that
//! its own modelled energy is of the hour's modelled energy (by compute seconds when the model
//! is all zeros). What no experiment explains (idle draw) appears in node-wide rows
//! (`experiment: None`) and in unfiltered totals only.
#![deny(missing_docs)]

mod config;
mod error;
mod event;
mod handle;
mod report;
mod store;
mod worker;

pub use config::{
    DEFAULT_BUSY_TIMEOUT, DEFAULT_CPU_WATTS_PER_CORE, DEFAULT_FLUSH_INTERVAL, DEFAULT_GPU_WATTS,
    DEFAULT_QUEUE_CAPACITY, Durability, EnergyModel, LedgerConfig, MAX_CURRENCY_LEN, MAX_FLUSH_INTERVAL,
    MAX_QUEUE_CAPACITY, MAX_WATTS,
};
pub use error::LedgerError;
pub use event::{
    Device, Event, MAX_COMPUTE_SECONDS, MAX_FLOPS, MAX_ID_LEN, MAX_INTERVAL_SECONDS, MAX_UNIX_SECONDS, Pass,
    PowerSource, estimate_flops, unix_now,
};
pub use handle::{Ledger, LedgerHandle, REQUEST_HEADROOM};
pub use report::{
    Bucket, CSV_HEADER, Counters, ExperimentSummary, Filter, Row, Totals, utc_string, write_csv,
};
pub use store::{APPLICATION_ID, SCHEMA_VERSION};

/// The ledger's file name inside the node's data dir.
pub const FILE_NAME: &str = "ledger.sqlite";
