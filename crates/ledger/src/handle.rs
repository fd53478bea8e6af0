//! Opening the ledger and talking to its thread.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use tokio::sync::oneshot;

use crate::config::{EnergyModel, LedgerConfig};
use crate::error::LedgerError;
use crate::event::Event;
use crate::report::{Bucket, ExperimentSummary, Filter, Row, Totals, write_csv};
use crate::store::{self, Pending};
use crate::worker::{Msg, Reply, Worker};

/// Requests (flush, queries, close) that may wait beside a full event queue. Beyond this many
/// concurrent requests, async requests fail with [`LedgerError::Busy`].
pub const REQUEST_HEADROOM: usize = 64;

/// State shared by the handles and the thread: counters only, never the connection (nor the
/// sender: the thread must see the channel disconnect when the last handle goes).
#[derive(Debug)]
pub(crate) struct Shared {
    /// Events sent and not yet taken by the thread.
    pub(crate) queued: AtomicUsize,
    pub(crate) capacity: usize,
    pub(crate) dropped: AtomicU64,
    pub(crate) committed: AtomicU64,
    pub(crate) path: PathBuf,
    /// Set by the thread before it answers a close: from then on `record` says `Closed` (the channel
    /// still takes messages until the thread has dropped its end).
    pub(crate) closed: AtomicBool,
}

impl fmt::Debug for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Msg::Event(_) => "Event",
            Msg::Flush(_) => "Flush",
            Msg::Totals(..) => "Totals",
            Msg::History(..) => "History",
            Msg::Experiments(_) => "Experiments",
            Msg::SetEnergyModel(..) => "SetEnergyModel",
            Msg::EnergyModel(_) => "EnergyModel",
            Msg::Close(_) => "Close",
        })
    }
}

/// Opens ledgers.
#[derive(Debug, Clone, Copy)]
pub struct Ledger;

impl Ledger {
    /// Opens (creating when missing) the database at `config.path` and starts the ledger
    /// thread, which owns the connection from then on.
    ///
    /// Blocking: it may wait up to `busy_timeout` for a lock and runs `PRAGMA quick_check`;
    /// async callers open at start-up or in `spawn_blocking`. See the crate docs for the checks
    /// and the errors (`TooNew`, `Corrupt`, `NotADatabase`, `Locked`), none of which touch the
    /// file.
    pub fn open(config: LedgerConfig) -> Result<LedgerHandle, LedgerError> {
        config.validate()?;
        let (conn, committed) = store::open(&config)?;
        let (tx, rx) = sync_channel(config.queue_capacity + REQUEST_HEADROOM);
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            capacity: config.queue_capacity,
            dropped: AtomicU64::new(0),
            committed: AtomicU64::new(committed),
            path: config.path.clone(),
            closed: AtomicBool::new(false),
        });
        let worker = Worker {
            conn,
            path: config.path.clone(),
            model: config.energy.clone(),
            flush_interval: config.flush_interval,
            committed,
            pending: Pending::default(),
            shared: Arc::clone(&shared),
        };
        std::thread::Builder::new()
            .name("apiary-ledger".into())
            .spawn(move || worker.run(rx))
            .map_err(|source| LedgerError::Io {
                path: config.path.clone(),
                source,
            })?;
        tracing::info!(path = %config.path.display(), committed, "ledger open");
        Ok(LedgerHandle { tx, shared })
    }
}

/// A cheap, cloneable way to the ledger thread. When the last handle is dropped the thread
/// commits what is pending and stops; [`LedgerHandle::close`] does the same and waits.
#[derive(Clone)]
pub struct LedgerHandle {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
}

impl fmt::Debug for LedgerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LedgerHandle")
            .field("path", &self.shared.path)
            .field("queued", &self.shared.queued.load(Ordering::Relaxed))
            .field("dropped", &self.shared.dropped.load(Ordering::Relaxed))
            .finish()
    }
}

impl LedgerHandle {
    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Queues `event` for the next commit. Never blocks: invalid input is refused with
    /// [`LedgerError::InvalidId`] / [`LedgerError::InvalidNumber`] (nothing is written), a full
    /// queue with [`LedgerError::Busy`] (counted in [`Self::dropped_events`]), a stopped ledger
    /// with [`LedgerError::Closed`]. Safe to call from compute threads and async tasks alike.
    pub fn record(&self, event: Event) -> Result<(), LedgerError> {
        event.validate()?;
        let shared = &self.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(LedgerError::Closed);
        }
        if shared.queued.fetch_add(1, Ordering::AcqRel) >= shared.capacity {
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            return Err(LedgerError::Busy);
        }
        match self.tx.try_send(Msg::Event(event)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                shared.queued.fetch_sub(1, Ordering::AcqRel);
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                Err(LedgerError::Busy)
            }
            Err(TrySendError::Disconnected(_)) => {
                shared.queued.fetch_sub(1, Ordering::AcqRel);
                Err(LedgerError::Closed)
            }
        }
    }

    /// Events refused with [`LedgerError::Busy`] (or dropped while the database stayed locked
    /// with too much pending) since this ledger was opened.
    pub fn dropped_events(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Events committed over the database's lifetime, as of the last commit (no round trip).
    pub fn committed_events(&self) -> u64 {
        self.shared.committed.load(Ordering::Acquire)
    }

    async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Msg) -> Result<T, LedgerError> {
        let (tx, rx) = oneshot::channel();
        match self.tx.try_send(make(Reply::Async(tx))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(LedgerError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(LedgerError::Closed),
        }
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    fn request_blocking<T>(&self, make: impl FnOnce(Reply<T>) -> Msg) -> Result<T, LedgerError> {
        let (tx, rx) = sync_channel(1);
        self.tx
            .send(make(Reply::Blocking(tx)))
            .map_err(|_| LedgerError::Closed)?;
        rx.recv().map_err(|_| LedgerError::Closed)?
    }

    /// Commits everything recorded before this call and returns after `COMMIT` with the number
    /// of events committed over the database's lifetime. [`LedgerError::Locked`] when another
    /// connection holds the database beyond `busy_timeout`; the events stay pending and are
    /// retried. Never blocks a tokio worker.
    pub async fn flush(&self) -> Result<u64, LedgerError> {
        self.request(Msg::Flush).await
    }

    /// [`Self::flush`] for threads outside async code. Like every `*_blocking` twin it blocks
    /// the calling thread, also while the queue is full; never call it on a tokio worker.
    pub fn flush_blocking(&self) -> Result<u64, LedgerError> {
        self.request_blocking(Msg::Flush)
    }

    /// Sums over `filter` (pending events are committed first).
    pub async fn totals(&self, filter: Filter) -> Result<Totals, LedgerError> {
        self.request(|r| Msg::Totals(filter, r)).await
    }

    /// [`Self::totals`], blocking.
    pub fn totals_blocking(&self, filter: Filter) -> Result<Totals, LedgerError> {
        self.request_blocking(|r| Msg::Totals(filter, r))
    }

    /// Rows per `bucket` start (UTC) and experiment, oldest first; node-wide rows have
    /// `experiment: None` and come first in their bucket.
    pub async fn history(&self, filter: Filter, bucket: Bucket) -> Result<Vec<Row>, LedgerError> {
        self.request(|r| Msg::History(filter, bucket, r)).await
    }

    /// [`Self::history`], blocking.
    pub fn history_blocking(&self, filter: Filter, bucket: Bucket) -> Result<Vec<Row>, LedgerError> {
        self.request_blocking(|r| Msg::History(filter, bucket, r))
    }

    /// Every experiment with any record, by id.
    pub async fn experiments(&self) -> Result<Vec<ExperimentSummary>, LedgerError> {
        self.request(Msg::Experiments).await
    }

    /// [`Self::experiments`], blocking.
    pub fn experiments_blocking(&self) -> Result<Vec<ExperimentSummary>, LedgerError> {
        self.request_blocking(Msg::Experiments)
    }

    /// [`Self::history`] as CSV text (see [`crate::write_csv`] for the columns).
    pub async fn export_csv(&self, filter: Filter, bucket: Bucket) -> Result<String, LedgerError> {
        let currency = self.energy_model().await?.currency;
        let rows = self.history(filter, bucket).await?;
        csv_string(&rows, &currency)
    }

    /// [`Self::export_csv`], blocking.
    pub fn export_csv_blocking(&self, filter: Filter, bucket: Bucket) -> Result<String, LedgerError> {
        let currency = self.energy_model_blocking()?.currency;
        let rows = self.history_blocking(filter, bucket)?;
        csv_string(&rows, &currency)
    }

    /// The energy model and price in use.
    pub async fn energy_model(&self) -> Result<EnergyModel, LedgerError> {
        self.request(Msg::EnergyModel).await
    }

    /// [`Self::energy_model`], blocking.
    pub fn energy_model_blocking(&self) -> Result<EnergyModel, LedgerError> {
        self.request_blocking(Msg::EnergyModel)
    }

    /// Replaces the energy model and price; reports apply it to all history from now on.
    pub async fn set_energy_model(&self, model: EnergyModel) -> Result<(), LedgerError> {
        model.validate()?;
        self.request(|r| Msg::SetEnergyModel(model, r)).await
    }

    /// [`Self::set_energy_model`], blocking.
    pub fn set_energy_model_blocking(&self, model: EnergyModel) -> Result<(), LedgerError> {
        model.validate()?;
        self.request_blocking(|r| Msg::SetEnergyModel(model, r))
    }

    /// Commits, closes the database and stops the thread; returns the lifetime committed count.
    /// If the commit fails (locked) the ledger stays open and the error is returned, so nothing
    /// pending is thrown away. Later calls on any clone return [`LedgerError::Closed`].
    pub async fn close(&self) -> Result<u64, LedgerError> {
        self.request(Msg::Close).await
    }

    /// [`Self::close`], blocking.
    pub fn close_blocking(&self) -> Result<u64, LedgerError> {
        self.request_blocking(Msg::Close)
    }
}

fn csv_string(rows: &[Row], currency: &str) -> Result<String, LedgerError> {
    let mut out = Vec::with_capacity(256 * (rows.len() + 1));
    write_csv(rows, currency, &mut out)?;
    String::from_utf8(out).map_err(|e| LedgerError::Write(std::io::Error::other(e)))
}
