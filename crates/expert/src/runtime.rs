//! Batching task pools and a compute runtime on a dedicated OS thread: hivemind's `TaskPool` and
//! `Runtime` (`hivemind/moe/server/{task_pool,runtime}.py`), in one process and bounded everywhere.
//!
//! Every expert has two pools, forward and backward. A task's rows are the first dimension of its first
//! tensor; a pool merges its queued tasks oldest-first into one batch of at most
//! [`RuntimeConfig::max_batch_size`] rows by concatenating every tensor along dimension 0, and splits the
//! results back per task. One OS thread (never a tokio worker) owns every [`ExpertBackend`]; among the
//! pools that are ready (at least [`RuntimeConfig::min_batch_size`] rows queued, or the oldest task older
//! than [`RuntimeConfig::batch_timeout`]) it runs the one whose oldest task is oldest — hivemind's
//! priority. Submitters are async and get their results over `oneshot` channels.
//!
//! Improvements over hivemind, on purpose:
//! - admission is bounded ([`RuntimeConfig::max_queued_rows`] per pool, [`ExpertError::Overloaded`]
//!   beyond) and a task larger than a batch is refused ([`ExpertError::BatchTooLarge`]);
//! - a malformed task fails alone: tensors that disagree on the number of rows are refused on submission,
//!   a task the expert rejects (shape, dtype, non-finite `grad_outputs`) is failed before the merge, and
//!   only tasks whose tensors agree on dtype and trailing dimensions are merged (the others wait for the
//!   next batch). A batch whose compute fails fails all its tasks with that error; the runtime goes on;
//! - tasks whose caller went away are dropped before they are computed;
//! - a [`Gate`] throttles (`Pace`) or pauses (`Stop`) the compute, for the node's governor.
//!
//! ```
//! use apiary_expert::{BackendConfig, Expert, ExpertBackend, ExpertConfig, ExpertKind};
//! use apiary_expert::{Runtime, RuntimeConfig};
//! use candle_core::{Device, Tensor};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let expert = Expert::new(ExpertConfig::new(ExpertKind::Ffn, 16), 1)?;
//! let backend = ExpertBackend::new(expert, BackendConfig::default())?;
//! let handle = Runtime::spawn(vec![("ffn.0".into(), backend)], RuntimeConfig::default())?;
//! let rt = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
//! rt.block_on(async {
//!     let x = Tensor::randn(0f32, 1.0, (4, 16), &Device::Cpu)?;
//!     let y = handle.forward("ffn.0", vec![x.clone()]).await?;
//!     let dx = handle.backward("ffn.0", vec![x], vec![y[0].ones_like()?]).await?;
//!     assert_eq!(dx[0].dims(), &[4, 16]);
//!     assert_eq!(handle.stats().experts[0].optimizer_steps, 1);
//!     handle.shutdown().await;
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })?;
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use tokio::sync::{oneshot, watch};

use crate::backend::ExpertBackend;
use crate::error::{ExpertError, Result};
use crate::util::all_finite;

/// At most this many [`RuntimeHandle::with_backend`] calls wait for the runtime thread at once.
const MAX_QUEUED_JOBS: usize = 256;

/// The smallest duty [`Gate::Pace`] honours (smaller ones are raised to it).
const MIN_DUTY: f64 = 0.01;

/// How the runtime batches and bounds its queues. The defaults are hivemind's `Server`'s where it has one.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The most rows one batch holds; default 4096 (hivemind's `Server` default `max_batch_size`).
    /// A task with more rows fails with [`ExpertError::BatchTooLarge`].
    pub max_batch_size: usize,
    /// A pool runs once it has this many rows queued …; default 1 (hivemind's `min_batch_size`).
    pub min_batch_size: usize,
    /// … or once its oldest task has waited this long; default 10 ms.
    pub batch_timeout: Duration,
    /// The most rows one pool (one expert's forward or backward) queues; default `4 * max_batch_size`
    /// (16384). Beyond it a task fails at once with [`ExpertError::Overloaded`]. Must be at least
    /// `max_batch_size`.
    pub max_queued_rows: usize,
    /// Where the experts compute: [`Runtime::spawn`] moves each backend there (a no-op for those
    /// already there); inputs may come on the CPU, outputs are returned on the CPU. Default the CPU.
    pub device: Device,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 4096,
            min_batch_size: 1,
            batch_timeout: Duration::from_millis(10),
            max_queued_rows: 4 * 4096,
            device: Device::Cpu,
        }
    }
}

impl RuntimeConfig {
    fn validate(&self) -> Result<()> {
        if self.max_batch_size == 0 {
            return Err(ExpertError::BadConfig("max_batch_size must be positive".into()));
        }
        if self.min_batch_size > self.max_batch_size {
            return Err(ExpertError::BadConfig(format!(
                "min_batch_size {} exceeds max_batch_size {}",
                self.min_batch_size, self.max_batch_size
            )));
        }
        if self.max_queued_rows < self.max_batch_size {
            return Err(ExpertError::BadConfig(format!(
                "max_queued_rows {} is below max_batch_size {}",
                self.max_queued_rows, self.max_batch_size
            )));
        }
        Ok(())
    }
}

/// The throttle on the runtime's compute, set by the node's governor.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Gate {
    /// Compute as fast as batches are ready.
    #[default]
    Run,
    /// Compute at most a `duty` fraction of the time: after a batch that took `t`, stay idle for
    /// `t * (1 - duty) / duty` (tasks keep queueing meanwhile). `duty` is clamped to `[0.01, 1]`;
    /// a `duty` that is not a number counts as 1.
    Pace {
        /// The fraction of time spent computing, in `(0, 1]`.
        duty: f64,
    },
    /// Finish the running batch, fail queued tasks and new ones with [`ExpertError::Paused`] until the
    /// gate opens again. [`RuntimeHandle::with_backend`] calls still run.
    Stop,
}

impl Gate {
    /// How long to stay idle after a batch that took `took`.
    fn idle_after(self, took: Duration) -> Duration {
        match self {
            Self::Pace { duty } => {
                let duty = if duty.is_nan() {
                    1.0
                } else {
                    duty.clamp(MIN_DUTY, 1.0)
                };
                took.mul_f64((1.0 - duty) / duty)
            }
            Self::Run | Self::Stop => Duration::ZERO,
        }
    }
}

/// Counters of one expert.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExpertStats {
    /// The expert's uid.
    pub uid: String,
    /// Forward batches computed successfully.
    pub forward_batches: u64,
    /// Rows in those batches.
    pub forward_rows: u64,
    /// Backward batches computed successfully (each took one optimizer step).
    pub backward_batches: u64,
    /// Rows in those batches.
    pub backward_rows: u64,
    /// Batches (forward or backward) whose compute failed; their tasks got the error.
    pub failed_batches: u64,
    /// Time spent computing this expert's batches (successful or not).
    pub busy: Duration,
    /// Optimizer steps the expert's backend has taken (including those before the runtime started).
    pub optimizer_steps: u64,
    /// Rows queued in the forward pool now.
    pub queued_forward_rows: usize,
    /// Rows queued in the backward pool now.
    pub queued_backward_rows: usize,
}

/// A snapshot of the runtime's counters.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeStats {
    /// One entry per expert, in the order given to [`Runtime::spawn`].
    pub experts: Vec<ExpertStats>,
    /// Rows queued now, over all pools.
    pub queued_rows: usize,
    /// The gate now.
    pub gate: Gate,
    /// For the last [`Gate::Stop`]: the time from [`RuntimeHandle::set_gate`] to the end of the batch that
    /// was running then ([`Duration::ZERO`] if none was). `None` before any stop, and while that batch
    /// still runs.
    pub last_stop_latency: Option<Duration>,
    /// Whether the runtime is shut down (or its thread ended).
    pub stopped: bool,
}

/// Which pool of an expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Forward = 0,
    Backward = 1,
}

type Reply = oneshot::Sender<Result<Vec<Tensor>>>;

/// One submitted task.
struct Task {
    inputs: Vec<Tensor>,
    grad_outputs: Vec<Tensor>,
    rows: usize,
    enqueued: Instant,
    reply: Reply,
}

impl Task {
    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        self.inputs.iter().chain(&self.grad_outputs)
    }

    /// Whether `other`'s tensors can be concatenated with this task's along dimension 0.
    fn mergeable_with(&self, other: &Task) -> bool {
        self.inputs.len() == other.inputs.len()
            && self.grad_outputs.len() == other.grad_outputs.len()
            && self
                .tensors()
                .zip(other.tensors())
                .all(|(a, b)| a.dtype() == b.dtype() && a.dims().get(1..) == b.dims().get(1..))
    }
}

/// One pool: a FIFO of tasks and their total rows.
#[derive(Default)]
struct Pool {
    queue: VecDeque<Task>,
    rows: usize,
}

impl Pool {
    fn oldest(&self) -> Option<Instant> {
        self.queue.front().map(|t| t.enqueued)
    }

    fn drain(&mut self) -> impl Iterator<Item = Task> + '_ {
        self.rows = 0;
        self.queue.drain(..)
    }

    /// Takes the next batch: the oldest live task, then every later one that fits and merges with it,
    /// in order. Tasks whose caller went away are dropped.
    fn take_batch(&mut self, max_rows: usize) -> Vec<Task> {
        let mut batch: Vec<Task> = Vec::new();
        let mut total = 0;
        let mut rest = VecDeque::with_capacity(self.queue.len());
        while let Some(task) = self.queue.pop_front() {
            if task.reply.is_closed() {
                self.rows -= task.rows;
                continue;
            }
            let fits = total + task.rows <= max_rows
                && batch.first().is_none_or(|first| first.mergeable_with(&task));
            if fits {
                total += task.rows;
                self.rows -= task.rows;
                batch.push(task);
                if total == max_rows {
                    break;
                }
            } else {
                rest.push_back(task);
            }
        }
        rest.extend(self.queue.drain(..));
        self.queue = rest;
        batch
    }
}

type Job = Box<dyn FnOnce(&[ExpertBackend]) + Send>;

/// What the runtime thread does next.
enum Work {
    Job(Job),
    Batch {
        expert: usize,
        pass: Pass,
        tasks: Vec<Task>,
    },
}

struct State {
    /// `[forward, backward]` per expert.
    pools: Vec<[Pool; 2]>,
    stats: Vec<ExpertStats>,
    jobs: VecDeque<Job>,
    gate: Gate,
    shutdown: bool,
    /// A batch is being computed.
    running: bool,
    /// When `Stop` was asked for while a batch ran.
    stop_requested: Option<Instant>,
    last_stop_latency: Option<Duration>,
}

impl State {
    /// An idle, running state for experts with these (fresh) stats.
    fn new(stats: Vec<ExpertStats>) -> Self {
        Self {
            pools: stats.iter().map(|_| Default::default()).collect(),
            stats,
            jobs: VecDeque::new(),
            gate: Gate::Run,
            shutdown: false,
            running: false,
            stop_requested: None,
            last_stop_latency: None,
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the runtime thread (new task, gate change, job, shutdown).
    wake: Condvar,
    config: RuntimeConfig,
    uids: Vec<String>,
    index: HashMap<String, usize>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn expert(&self, uid: &str) -> Result<usize> {
        self.index
            .get(uid)
            .copied()
            .ok_or_else(|| ExpertError::UnknownExpert(uid.to_owned()))
    }

    /// Queues a task, or says why not.
    fn submit(
        &self,
        uid: &str,
        pass: Pass,
        inputs: Vec<Tensor>,
        grad_outputs: Vec<Tensor>,
    ) -> Result<oneshot::Receiver<Result<Vec<Tensor>>>> {
        let expert = self.expert(uid)?;
        let rows = task_rows(&inputs, &grad_outputs)?;
        let max = self.config.max_batch_size;
        if rows > max {
            return Err(ExpertError::BatchTooLarge { rows, max });
        }
        let (reply, receiver) = oneshot::channel();
        {
            let mut st = self.lock();
            if st.shutdown {
                return Err(ExpertError::Stopped);
            }
            if st.gate == Gate::Stop {
                return Err(ExpertError::Paused);
            }
            let limit = self.config.max_queued_rows;
            let pool = &mut st.pools[expert][pass as usize];
            if pool.rows + rows > limit {
                return Err(ExpertError::Overloaded {
                    uid: uid.to_owned(),
                    queued_rows: pool.rows,
                    limit,
                });
            }
            pool.rows += rows;
            pool.queue.push_back(Task {
                inputs,
                grad_outputs,
                rows,
                enqueued: Instant::now(),
                reply,
            });
        }
        self.wake.notify_all();
        Ok(receiver)
    }

    /// Stops taking work and fails everything queued with [`ExpertError::Stopped`].
    fn begin_shutdown(&self) {
        let (tasks, jobs) = {
            let mut st = self.lock();
            st.shutdown = true;
            let tasks: Vec<Task> = st.pools.iter_mut().flatten().flat_map(Pool::drain).collect();
            (tasks, std::mem::take(&mut st.jobs))
        };
        self.wake.notify_all();
        for task in tasks {
            let _ = task.reply.send(Err(ExpertError::Stopped));
        }
        drop(jobs); // outside the lock: a job may own the last handle
    }

    /// Waits for the next thing to do; `None` once shut down. `last_batch`: when the previous batch ended
    /// and how long it took (for [`Gate::Pace`]).
    fn next_work(&self, last_batch: Option<(Instant, Duration)>) -> Option<Work> {
        let mut st = self.lock();
        loop {
            if st.shutdown {
                return None;
            }
            if let Some(job) = st.jobs.pop_front() {
                return Some(Work::Job(job));
            }
            let now = Instant::now();
            match st.gate {
                Gate::Stop => {
                    st = self.wait(st, None);
                    continue;
                }
                gate @ Gate::Pace { .. } => {
                    if let Some((ended, took)) = last_batch {
                        let until = ended + gate.idle_after(took);
                        if now < until {
                            st = self.wait(st, Some(until - now));
                            continue;
                        }
                    }
                }
                Gate::Run => {}
            }
            // hivemind's priority: among the ready pools, the one whose oldest task is oldest
            let mut best: Option<(Instant, usize, usize)> = None;
            let mut next_due: Option<Instant> = None;
            for (expert, pools) in st.pools.iter().enumerate() {
                for (pass, pool) in pools.iter().enumerate() {
                    let Some(oldest) = pool.oldest() else { continue };
                    let due = oldest + self.config.batch_timeout;
                    if pool.rows >= self.config.min_batch_size || now >= due {
                        if best.is_none_or(|(b, _, _)| oldest < b) {
                            best = Some((oldest, expert, pass));
                        }
                    } else {
                        next_due = Some(next_due.map_or(due, |d| d.min(due)));
                    }
                }
            }
            if let Some((_, expert, pass)) = best {
                let tasks = st.pools[expert][pass].take_batch(self.config.max_batch_size);
                if tasks.is_empty() {
                    continue; // only abandoned tasks were queued
                }
                st.running = true;
                let pass = if pass == 0 { Pass::Forward } else { Pass::Backward };
                return Some(Work::Batch { expert, pass, tasks });
            }
            st = self.wait(st, next_due.map(|d| d.saturating_duration_since(now)));
        }
    }

    fn wait<'a>(&self, st: MutexGuard<'a, State>, timeout: Option<Duration>) -> MutexGuard<'a, State> {
        match timeout {
            None => self.wake.wait(st).unwrap_or_else(PoisonError::into_inner),
            Some(t) => match self.wake.wait_timeout(st, t) {
                Ok((st, _)) => st,
                Err(poisoned) => poisoned.into_inner().0,
            },
        }
    }
}

/// The rows of a task, checking that all its tensors agree.
fn task_rows(inputs: &[Tensor], grad_outputs: &[Tensor]) -> Result<usize> {
    let first = inputs
        .first()
        .ok_or_else(|| ExpertError::BadTask("a task needs at least one input tensor".into()))?;
    let rows =
        first.dims().first().copied().ok_or_else(|| {
            ExpertError::BadTask("input 0 is a scalar; tensors need a batch dimension".into())
        })?;
    let named = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("input {i}"), t))
        .chain(
            grad_outputs
                .iter()
                .enumerate()
                .map(|(i, t)| (format!("grad_outputs[{i}]"), t)),
        );
    for (name, t) in named {
        if t.dims().first() != Some(&rows) {
            return Err(ExpertError::BadTask(format!(
                "{name} has shape {:?} but input 0 has {rows} rows; all inputs and grad_outputs of a task \
                 must have the same first dimension",
                t.dims()
            )));
        }
    }
    if rows == 0 {
        return Err(ExpertError::EmptyBatch);
    }
    Ok(rows)
}

/// What the expert would reject in this task alone.
fn check_task(backend: &ExpertBackend, pass: Pass, task: &Task) -> Result<()> {
    backend.expert().check_inputs(&task.inputs)?;
    if pass == Pass::Backward {
        // every expert of the zoo has one output shaped like input 0
        if task.grad_outputs.len() != 1 {
            return Err(ExpertError::Arity {
                what: "grad_outputs",
                expected: 1,
                got: task.grad_outputs.len(),
            });
        }
        let g = &task.grad_outputs[0];
        if g.dims() != task.inputs[0].dims() {
            return Err(ExpertError::Shape {
                what: "grad_outputs[0]".into(),
                expected: task.inputs[0].dims().to_vec(),
                got: g.dims().to_vec(),
            });
        }
        if g.dtype() != DType::F32 {
            return Err(ExpertError::NotF32Cpu {
                what: "grad_outputs[0]".into(),
            });
        }
        if !all_finite(g, "grad_outputs[0]")? {
            return Err(ExpertError::NonFiniteGradient {
                what: "grad_outputs[0]".into(),
            });
        }
    }
    Ok(())
}

/// Merges the tasks' tensors, runs the pass, and splits the outputs back per task.
fn compute(backend: &mut ExpertBackend, pass: Pass, tasks: &[Task]) -> Result<Vec<Vec<Tensor>>> {
    let merge = |field: fn(&Task) -> &[Tensor]| -> Result<Vec<Tensor>> {
        match tasks {
            [one] => Ok(field(one).to_vec()),
            _ => {
                let n = tasks.first().map_or(0, |t| field(t).len());
                (0..n)
                    .map(|i| {
                        let parts: Vec<&Tensor> = tasks.iter().map(|t| &field(t)[i]).collect();
                        Ok(Tensor::cat(&parts, 0)?)
                    })
                    .collect()
            }
        }
    };
    let inputs = merge(|t| &t.inputs)?;
    let outputs = match pass {
        Pass::Forward => backend.forward(&inputs)?,
        Pass::Backward => backend.backward(&inputs, &merge(|t| &t.grad_outputs)?)?,
    };
    // results go back to the callers on the CPU (a no-op for experts on the CPU)
    let outputs = outputs
        .iter()
        .map(|o| Ok(o.to_device(&Device::Cpu)?))
        .collect::<Result<Vec<_>>>()?;
    if tasks.len() == 1 {
        return Ok(vec![outputs]);
    }
    let total: usize = tasks.iter().map(|t| t.rows).sum();
    if let Some(bad) = outputs.iter().find(|o| o.dims().first() != Some(&total)) {
        return Err(ExpertError::BadTask(format!(
            "the expert returned shape {:?} for a batch of {total} rows",
            bad.dims()
        )));
    }
    let mut offset = 0;
    let mut split = Vec::with_capacity(tasks.len());
    for task in tasks {
        split.push(
            outputs
                .iter()
                .map(|o| o.narrow(0, offset, task.rows))
                .collect::<candle_core::Result<Vec<_>>>()?,
        );
        offset += task.rows;
    }
    Ok(split)
}

/// A copy of `e` for every task of a failed batch ([`ExpertError`] holds errors that are not `Clone`).
fn duplicate(e: &ExpertError) -> ExpertError {
    use ExpertError as E;
    match e {
        E::Candle(inner) => E::Candle(candle_core::Error::Msg(inner.to_string())),
        E::UnknownKind { name } => E::UnknownKind { name: name.clone() },
        E::BadHiddenDim {
            kind,
            hid_dim,
            reason,
        } => E::BadHiddenDim {
            kind,
            hid_dim: *hid_dim,
            reason,
        },
        E::Arity { what, expected, got } => E::Arity {
            what,
            expected: *expected,
            got: *got,
        },
        E::Shape { what, expected, got } => E::Shape {
            what: what.clone(),
            expected: expected.clone(),
            got: got.clone(),
        },
        E::EmptyBatch => E::EmptyBatch,
        E::NotF32Cpu { what } => E::NotF32Cpu { what: what.clone() },
        E::Checkpoint { path, problem } => E::Checkpoint {
            path: path.clone(),
            problem: problem.clone(),
        },
        E::NonFiniteGradient { what } => E::NonFiniteGradient { what: what.clone() },
        E::BadConfig(s) => E::BadConfig(s.clone()),
        E::Overloaded {
            uid,
            queued_rows,
            limit,
        } => E::Overloaded {
            uid: uid.clone(),
            queued_rows: *queued_rows,
            limit: *limit,
        },
        E::BatchTooLarge { rows, max } => E::BatchTooLarge {
            rows: *rows,
            max: *max,
        },
        E::UnknownExpert(s) => E::UnknownExpert(s.clone()),
        E::Paused => E::Paused,
        E::Stopped => E::Stopped,
        E::BadTask(s) => E::BadTask(s.clone()),
        E::Spawn(io) => E::Spawn(std::io::Error::new(io.kind(), io.to_string())),
    }
}

/// The runtime thread's body.
fn compute_loop(shared: &Shared, mut backends: Vec<ExpertBackend>) {
    let mut last_batch: Option<(Instant, Duration)> = None;
    while let Some(work) = shared.next_work(last_batch) {
        let (expert, pass, tasks) = match work {
            Work::Job(job) => {
                job(&backends);
                continue;
            }
            Work::Batch { expert, pass, tasks } => (expert, pass, tasks),
        };
        let Some(backend) = backends.get_mut(expert) else {
            continue; // unreachable: pools and backends are built together
        };
        let started = Instant::now();
        let mut replies: Vec<(Reply, Result<Vec<Tensor>>)> = Vec::with_capacity(tasks.len());
        let mut good = Vec::with_capacity(tasks.len());
        for task in tasks {
            match check_task(backend, pass, &task) {
                Ok(()) => good.push(task),
                Err(e) => replies.push((task.reply, Err(e))),
            }
        }
        let rows: usize = good.iter().map(|t| t.rows).sum();
        let ok = if good.is_empty() {
            None
        } else {
            let result =
                catch_unwind(AssertUnwindSafe(|| compute(backend, pass, &good))).unwrap_or_else(|_| {
                    Err(ExpertError::BadTask(
                        "the expert's compute panicked on this batch".into(),
                    ))
                });
            match result {
                Ok(outputs) => {
                    replies.extend(good.into_iter().map(|t| t.reply).zip(outputs.into_iter().map(Ok)));
                    Some(true)
                }
                Err(e) => {
                    for task in good {
                        replies.push((task.reply, Err(duplicate(&e))));
                    }
                    Some(false)
                }
            }
        };
        let took = started.elapsed();
        let ended = Instant::now();
        last_batch = Some((ended, took));
        {
            let mut st = shared.lock();
            st.running = false;
            if let Some(asked) = st.stop_requested.take() {
                st.last_stop_latency = Some(ended.saturating_duration_since(asked));
            }
            let stats = &mut st.stats[expert];
            stats.busy += took;
            stats.optimizer_steps = backend.steps();
            match (ok, pass) {
                (Some(true), Pass::Forward) => {
                    stats.forward_batches += 1;
                    stats.forward_rows += rows as u64;
                }
                (Some(true), Pass::Backward) => {
                    stats.backward_batches += 1;
                    stats.backward_rows += rows as u64;
                }
                (Some(false), _) => stats.failed_batches += 1,
                (None, _) => {}
            }
        }
        // replies go out after the stats, so a caller that got its result sees it counted
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
    }
}

/// Marks the runtime stopped when its thread ends, however it ends.
struct ExitGuard {
    shared: Arc<Shared>,
    done: watch::Sender<bool>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.shared.begin_shutdown();
        self.done.send_replace(true);
    }
}

/// Starts runtimes; see [`Runtime::spawn`].
#[derive(Debug)]
pub struct Runtime;

impl Runtime {
    /// Starts the runtime thread, which takes ownership of the experts' backends, and returns a handle to
    /// it. Fails on an invalid config or a repeated uid. The thread ends on
    /// [`RuntimeHandle::shutdown`] or when the last handle is dropped.
    pub fn spawn(experts: Vec<(String, ExpertBackend)>, config: RuntimeConfig) -> Result<RuntimeHandle> {
        config.validate()?;
        let mut index = HashMap::with_capacity(experts.len());
        let mut uids = Vec::with_capacity(experts.len());
        let mut backends = Vec::with_capacity(experts.len());
        let mut stats = Vec::with_capacity(experts.len());
        for (i, (uid, backend)) in experts.into_iter().enumerate() {
            if index.insert(uid.clone(), i).is_some() {
                return Err(ExpertError::BadConfig(format!("expert uid {uid:?} given twice")));
            }
            let backend = backend.to_device(&config.device)?;
            stats.push(ExpertStats {
                uid: uid.clone(),
                optimizer_steps: backend.steps(),
                ..ExpertStats::default()
            });
            uids.push(uid);
            backends.push(backend);
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(stats)),
            wake: Condvar::new(),
            config,
            uids,
            index,
        });
        let (done_tx, done_rx) = watch::channel(false);
        let guard = ExitGuard {
            shared: Arc::clone(&shared),
            done: done_tx,
        };
        let thread = std::thread::Builder::new()
            .name("apiary-expert-runtime".into())
            .spawn(move || {
                let guard = guard;
                compute_loop(&guard.shared, backends); // the backends drop before the guard signals
            })
            .map_err(ExpertError::Spawn)?;
        Ok(RuntimeHandle {
            inner: Arc::new(Inner {
                shared,
                thread: Mutex::new(Some(thread)),
                done: done_rx,
            }),
        })
    }
}

struct Inner {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    done: watch::Receiver<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // the last handle is gone: let the thread finish its batch and end (not joined here)
        self.shared.begin_shutdown();
    }
}

/// A cheap, cloneable handle to a running [`Runtime`]; `Send + Sync`. The runtime shuts down when the
/// last clone is dropped.
#[derive(Clone)]
pub struct RuntimeHandle {
    inner: Arc<Inner>,
}

impl fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeHandle")
            .field("uids", &self.inner.shared.uids)
            .field("config", &self.inner.shared.config)
            .finish_non_exhaustive()
    }
}

impl RuntimeHandle {
    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// The expert's outputs for `inputs`, computed in a batch with other tasks.
    ///
    /// Fails at once with [`ExpertError::UnknownExpert`], [`ExpertError::BadTask`] (tensors disagree on
    /// the number of rows), [`ExpertError::BatchTooLarge`], [`ExpertError::Overloaded`],
    /// [`ExpertError::Paused`] or [`ExpertError::Stopped`]; later with the expert's own errors.
    pub async fn forward(&self, uid: &str, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let receiver = self.shared().submit(uid, Pass::Forward, inputs, Vec::new())?;
        receiver.await.unwrap_or(Err(ExpertError::Stopped))
    }

    /// The gradients of the expert's inputs, computed in a batch with other tasks; the expert takes one
    /// optimizer step per batch. Errors as [`Self::forward`], plus [`ExpertError::NonFiniteGradient`].
    pub async fn backward(
        &self,
        uid: &str,
        inputs: Vec<Tensor>,
        grad_outputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>> {
        let receiver = self.shared().submit(uid, Pass::Backward, inputs, grad_outputs)?;
        receiver.await.unwrap_or(Err(ExpertError::Stopped))
    }

    /// The uids served, in the order given to [`Runtime::spawn`].
    pub fn uids(&self) -> Vec<String> {
        self.shared().uids.clone()
    }

    /// Sets the gate. `Stop` fails the queued tasks with [`ExpertError::Paused`] at once and lets the
    /// running batch finish; the runtime wakes at once from a `Pace` idle on any change.
    pub fn set_gate(&self, gate: Gate) {
        let shared = self.shared();
        let paused: Vec<Task> = {
            let mut st = shared.lock();
            st.gate = gate;
            if gate == Gate::Stop {
                if st.running {
                    if st.stop_requested.is_none() {
                        st.stop_requested = Some(Instant::now());
                        st.last_stop_latency = None;
                    }
                } else {
                    st.last_stop_latency = Some(Duration::ZERO);
                }
                st.pools.iter_mut().flatten().flat_map(Pool::drain).collect()
            } else {
                Vec::new()
            }
        };
        shared.wake.notify_all();
        for task in paused {
            let _ = task.reply.send(Err(ExpertError::Paused));
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RuntimeStats {
        let st = self.shared().lock();
        let experts: Vec<ExpertStats> = st
            .stats
            .iter()
            .zip(&st.pools)
            .map(|(s, [fwd, bwd])| ExpertStats {
                queued_forward_rows: fwd.rows,
                queued_backward_rows: bwd.rows,
                ..s.clone()
            })
            .collect();
        RuntimeStats {
            queued_rows: experts
                .iter()
                .map(|e| e.queued_forward_rows + e.queued_backward_rows)
                .sum(),
            experts,
            gate: st.gate,
            last_stop_latency: st.last_stop_latency,
            stopped: st.shutdown,
        }
    }

    /// Runs `f` on the expert's backend on the runtime thread, between batches (e.g. to save a
    /// checkpoint); also while the gate is `Stop`. At most 256 calls wait at once
    /// ([`ExpertError::Overloaded`] beyond, counting calls as rows). A panic in `f` is caught and
    /// reported as [`ExpertError::BadTask`].
    pub async fn with_backend<R: Send + 'static>(
        &self,
        uid: &str,
        f: impl FnOnce(&ExpertBackend) -> R + Send + 'static,
    ) -> Result<R> {
        let shared = self.shared();
        let expert = shared.expert(uid)?;
        let (reply, receiver) = oneshot::channel();
        let job: Job = Box::new(move |backends: &[ExpertBackend]| {
            let result = match backends.get(expert) {
                Some(backend) => catch_unwind(AssertUnwindSafe(|| f(backend)))
                    .map_err(|_| ExpertError::BadTask("the function given to with_backend panicked".into())),
                None => Err(ExpertError::Stopped),
            };
            let _ = reply.send(result);
        });
        {
            let mut st = shared.lock();
            if st.shutdown {
                return Err(ExpertError::Stopped);
            }
            if st.jobs.len() >= MAX_QUEUED_JOBS {
                return Err(ExpertError::Overloaded {
                    uid: uid.to_owned(),
                    queued_rows: st.jobs.len(),
                    limit: MAX_QUEUED_JOBS,
                });
            }
            st.jobs.push_back(job);
        }
        shared.wake.notify_all();
        receiver.await.unwrap_or(Err(ExpertError::Stopped))
    }

    /// Stops taking tasks, fails the queued ones (and waiting [`Self::with_backend`] calls) with
    /// [`ExpertError::Stopped`], lets the running batch finish, and joins the runtime thread. Later
    /// calls return at once.
    pub async fn shutdown(&self) {
        self.shared().begin_shutdown();
        let mut done = self.inner.done.clone();
        let _ = done.wait_for(|d| *d).await; // an error means the thread is gone already
        let thread = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            // the thread has signalled its last act; this join returns at once
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Waiting = oneshot::Receiver<Result<Vec<Tensor>>>;

    fn shared(n_experts: usize, config: RuntimeConfig) -> Shared {
        Shared {
            state: Mutex::new(State::new(vec![ExpertStats::default(); n_experts])),
            wake: Condvar::new(),
            config,
            uids: (0..n_experts).map(|i| format!("e{i}")).collect(),
            index: (0..n_experts).map(|i| (format!("e{i}"), i)).collect(),
        }
    }

    /// Queues a task of `rows x width` (dtype `dtype`) that has waited `age`.
    fn push(
        shared: &Shared,
        expert: usize,
        pass: Pass,
        rows: usize,
        width: usize,
        dtype: DType,
        age: Duration,
    ) -> Waiting {
        let (reply, waiting) = oneshot::channel();
        let mut st = shared.lock();
        let pool = &mut st.pools[expert][pass as usize];
        pool.rows += rows;
        pool.queue.push_back(Task {
            inputs: vec![Tensor::zeros((rows, width), dtype, &Device::Cpu).unwrap()],
            grad_outputs: Vec::new(),
            rows,
            enqueued: Instant::now() - age,
            reply,
        });
        waiting
    }

    fn batch(work: Option<Work>) -> (usize, Pass, Vec<usize>) {
        match work {
            Some(Work::Batch { expert, pass, tasks }) => {
                (expert, pass, tasks.iter().map(|t| t.rows).collect())
            }
            _ => panic!("expected a batch"),
        }
    }

    #[test]
    fn the_ready_pool_with_the_oldest_task_goes_first() {
        let config = RuntimeConfig {
            min_batch_size: 4,
            batch_timeout: Duration::from_secs(60),
            ..RuntimeConfig::default()
        };
        let s = shared(3, config);
        let ms = Duration::from_millis;
        // e2 forward is the oldest but not ready (2 rows < 4, not timed out)
        let _a = push(&s, 2, Pass::Forward, 2, 8, DType::F32, ms(500));
        let _b = push(&s, 0, Pass::Forward, 4, 8, DType::F32, ms(100));
        let _c = push(&s, 1, Pass::Backward, 4, 8, DType::F32, ms(300));
        assert_eq!(batch(s.next_work(None)), (1, Pass::Backward, vec![4]));
        assert_eq!(batch(s.next_work(None)), (0, Pass::Forward, vec![4]));
        // a timed-out pool is ready whatever its rows
        let _d = push(&s, 2, Pass::Backward, 1, 8, DType::F32, Duration::from_secs(61));
        assert_eq!(batch(s.next_work(None)), (2, Pass::Backward, vec![1]));
        assert_eq!(s.lock().pools[2][0].rows, 2, "e2 forward still waits");
    }

    #[test]
    fn batches_take_fitting_mergeable_live_tasks_in_order() {
        let s = shared(1, RuntimeConfig::default());
        let age = Duration::ZERO;
        let _a = push(&s, 0, Pass::Forward, 3, 8, DType::F32, age);
        let gone = push(&s, 0, Pass::Forward, 5, 8, DType::F32, age);
        drop(gone); // the caller went away: never computed
        let _b = push(&s, 0, Pass::Forward, 2, 7, DType::F32, age); // other width
        let _c = push(&s, 0, Pass::Forward, 4, 8, DType::F64, age); // other dtype
        let _d = push(&s, 0, Pass::Forward, 4094, 8, DType::F32, age); // does not fit: 3 + 4094 > 4096
        let _e = push(&s, 0, Pass::Forward, 6, 8, DType::F32, age);
        let mut st = s.lock();
        let pool = &mut st.pools[0][0];
        let rows: Vec<usize> = pool.take_batch(4096).iter().map(|t| t.rows).collect();
        assert_eq!(rows, vec![3, 6]);
        let left: Vec<usize> = pool.queue.iter().map(|t| t.rows).collect();
        assert_eq!(left, vec![2, 4, 4094]);
        assert_eq!(pool.rows, 2 + 4 + 4094);
    }

    #[test]
    fn pace_idles_in_proportion() {
        let t = Duration::from_millis(100);
        assert_eq!(Gate::Run.idle_after(t), Duration::ZERO);
        assert_eq!(Gate::Pace { duty: 1.0 }.idle_after(t), Duration::ZERO);
        assert_eq!(Gate::Pace { duty: 0.5 }.idle_after(t), t);
        assert_eq!(Gate::Pace { duty: 0.25 }.idle_after(t), t * 3);
        assert_eq!(Gate::Pace { duty: 0.0 }.idle_after(t), t * 99); // clamped to 0.01
        assert_eq!(Gate::Pace { duty: f64::NAN }.idle_after(t), Duration::ZERO);
    }

    #[test]
    fn every_error_duplicates_with_the_same_message() {
        let errors = [
            ExpertError::Candle(candle_core::Error::Msg("boom".into())),
            ExpertError::NonFiniteGradient {
                what: "parameter gradients".into(),
            },
            ExpertError::Overloaded {
                uid: "e0".into(),
                queued_rows: 8,
                limit: 8,
            },
            ExpertError::Spawn(std::io::Error::other("no threads")),
        ];
        for e in &errors {
            assert_eq!(duplicate(e).to_string(), e.to_string());
        }
    }
}
