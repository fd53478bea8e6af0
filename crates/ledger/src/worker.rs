//! The ledger thread: sole owner of the SQLite connection.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::config::EnergyModel;
use crate::error::{LedgerError, classify};
use crate::event::{Device, Event, Pass, hour_of, split_hours};
use crate::handle::Shared;
use crate::report::{Bucket, Counters, ExperimentSummary, Filter, Row, Totals};
use crate::store::{self, Pending};

/// Most distinct rollup keys held uncommitted; beyond it (the database is locked for long),
/// events for new keys are refused and counted as dropped.
pub(crate) const MAX_PENDING_KEYS: usize = 65_536;

/// Where a request's answer goes: an async caller's oneshot, or a blocking caller's channel.
pub(crate) enum Reply<T> {
    Async(oneshot::Sender<Result<T, LedgerError>>),
    Blocking(SyncSender<Result<T, LedgerError>>),
}

impl<T> Reply<T> {
    fn send(self, value: Result<T, LedgerError>) {
        // a caller that gave up waiting is not an error
        match self {
            Self::Async(tx) => {
                let _ = tx.send(value);
            }
            Self::Blocking(tx) => {
                let _ = tx.try_send(value);
            }
        }
    }
}

pub(crate) enum Msg {
    Event(Event),
    Flush(Reply<u64>),
    Totals(Filter, Reply<Totals>),
    History(Filter, Bucket, Reply<Vec<Row>>),
    Experiments(Reply<Vec<ExperimentSummary>>),
    SetEnergyModel(EnergyModel, Reply<()>),
    EnergyModel(Reply<EnergyModel>),
    Close(Reply<u64>),
}

pub(crate) struct Worker {
    pub(crate) conn: Connection,
    pub(crate) path: PathBuf,
    pub(crate) model: EnergyModel,
    pub(crate) flush_interval: Duration,
    pub(crate) committed: u64,
    pub(crate) pending: Pending,
    pub(crate) shared: Arc<Shared>,
}

impl Worker {
    pub(crate) fn run(mut self, rx: Receiver<Msg>) {
        let mut deadline: Option<Instant> = None;
        loop {
            let wait = deadline.map_or(self.flush_interval, |d| {
                d.saturating_duration_since(Instant::now())
            });
            match rx.recv_timeout(wait) {
                Ok(Msg::Close(reply)) => match self.commit() {
                    Ok(total) => {
                        self.shared.closed.store(true, Ordering::Release);
                        let closed = self.conn.close().map_err(|(_, e)| classify(&self.path, e));
                        reply.send(closed.map(|()| total));
                        return;
                    }
                    // stay open: the caller may retry once the lock is gone
                    Err(e) => reply.send(Err(e)),
                },
                Ok(msg) => self.handle(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // every handle dropped: commit what is left, then close
                    if let Err(e) = self.commit() {
                        tracing::error!(path = %self.path.display(), error = %e, "ledger: final commit failed");
                    }
                    return;
                }
            }
            if self.pending.is_empty() {
                deadline = None;
            } else {
                let now = Instant::now();
                match deadline {
                    None => deadline = Some(now + self.flush_interval),
                    Some(d) if now >= d => {
                        if let Err(e) = self.commit() {
                            tracing::warn!(path = %self.path.display(), error = %e, "ledger: commit failed, will retry");
                        }
                        deadline = (!self.pending.is_empty()).then(|| now + self.flush_interval);
                    }
                    Some(_) => {}
                }
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Event(event) => {
                self.shared.queued.fetch_sub(1, Ordering::AcqRel);
                self.add(event);
            }
            Msg::Flush(reply) => reply.send(self.commit()),
            Msg::Totals(filter, reply) => {
                self.commit_before_query();
                reply.send(
                    store::totals(&self.conn, &filter, &self.model).map_err(|e| classify(&self.path, e)),
                );
            }
            Msg::History(filter, bucket, reply) => {
                self.commit_before_query();
                let rows = store::hourly_rows(&self.conn, &filter, &self.model)
                    .map(|rows| store::bucketed(rows, bucket, &self.model))
                    .map_err(|e| classify(&self.path, e));
                reply.send(rows);
            }
            Msg::Experiments(reply) => {
                self.commit_before_query();
                reply.send(store::experiments(&self.conn).map_err(|e| classify(&self.path, e)));
            }
            Msg::SetEnergyModel(model, reply) => {
                self.model = model;
                reply.send(Ok(()));
            }
            Msg::EnergyModel(reply) => reply.send(Ok(self.model.clone())),
            Msg::Close(reply) => reply.send(Err(LedgerError::Closed)),
        }
    }

    /// Queries see every event recorded before them; a failed commit (locked) still answers
    /// from what is committed.
    fn commit_before_query(&mut self) {
        if let Err(e) = self.commit() {
            tracing::warn!(path = %self.path.display(), error = %e, "ledger: commit before query failed");
        }
    }

    /// Commits pending rollups; keeps them in memory when the commit fails.
    fn commit(&mut self) -> Result<u64, LedgerError> {
        if self.pending.is_empty() {
            return Ok(self.committed);
        }
        match store::commit(&mut self.conn, &self.pending, self.committed) {
            Ok(total) => {
                self.committed = total;
                self.shared.committed.store(total, Ordering::Release);
                self.pending = Pending::default();
                Ok(total)
            }
            Err(e) => Err(classify(&self.path, e)),
        }
    }

    fn room_for(&mut self, new_keys: bool) -> bool {
        if !new_keys || self.pending.keys() < MAX_PENDING_KEYS {
            return true;
        }
        if self.commit().is_ok() {
            return true;
        }
        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(path = %self.path.display(), "ledger: too much uncommitted, event dropped");
        false
    }

    /// Aggregates one validated event into the pending rollups.
    fn add(&mut self, event: Event) {
        match event {
            Event::Work {
                at,
                experiment,
                uid,
                pass,
                device,
                calls,
                samples,
                optimizer_steps,
                compute_seconds,
                flops,
                bytes_in,
                bytes_out,
                errors,
            } => {
                let key = (hour_of(at), experiment, uid);
                let is_new = !self.pending.work.contains_key(&key);
                if !self.room_for(is_new) {
                    return;
                }
                let mut add = Counters {
                    optimizer_steps,
                    flops,
                    bytes_in,
                    bytes_out,
                    errors,
                    ..Counters::default()
                };
                match pass {
                    Pass::Forward => {
                        add.forward_calls = calls;
                        add.forward_samples = samples;
                    }
                    Pass::Backward => {
                        add.backward_calls = calls;
                        add.backward_samples = samples;
                    }
                }
                match device {
                    Device::Cpu => add.cpu_seconds = compute_seconds,
                    Device::Gpu => add.gpu_seconds = compute_seconds,
                }
                self.pending.work.entry(key).or_default().add(&add);
            }
            Event::Uptime {
                at,
                experiment,
                seconds,
            } => {
                if !self.room_for(true) {
                    return;
                }
                let experiment = experiment.unwrap_or_default();
                let uptime = &mut self.pending.uptime;
                split_hours(at, seconds, |hour, s| {
                    *uptime.entry((hour, experiment.clone())).or_default() += s;
                });
            }
            Event::Power {
                at,
                watts,
                seconds,
                source,
            } => {
                if !self.room_for(true) {
                    return;
                }
                let power = &mut self.pending.power;
                split_hours(at, seconds, |hour, s| {
                    let entry = power.entry((hour, source)).or_default();
                    entry.0 += watts * s;
                    entry.1 += s;
                });
            }
        }
        self.pending.events += 1;
    }
}
