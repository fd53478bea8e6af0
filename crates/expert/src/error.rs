//! Typed errors of the expert zoo and its backends.

use std::path::PathBuf;

/// Everything that can go wrong while building, running or training an expert.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExpertError {
    /// A tensor operation failed inside candle.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),

    /// The expert kind is not in the zoo.
    #[error("unknown expert kind {name:?} (known: ffn, transformer, nop, det_dropout)")]
    UnknownKind {
        /// The name that was asked for.
        name: String,
    },

    /// The hidden dimension does not suit the expert kind.
    #[error("hidden dimension {hid_dim} is invalid for {kind}: {reason}")]
    BadHiddenDim {
        /// The expert kind.
        kind: &'static str,
        /// The hidden dimension asked for.
        hid_dim: usize,
        /// Why it is invalid.
        reason: &'static str,
    },

    /// The wrong number of input (or gradient) tensors was given.
    #[error("{what}: expected {expected} tensors, got {got}")]
    Arity {
        /// Which list of tensors.
        what: &'static str,
        /// How many the expert takes.
        expected: usize,
        /// How many were given.
        got: usize,
    },

    /// A tensor has the wrong shape.
    #[error("{what}: expected shape {expected:?}, got {got:?}")]
    Shape {
        /// Which tensor.
        what: String,
        /// The shape the expert expects (0 for any batch size / sequence length).
        expected: Vec<usize>,
        /// The shape given.
        got: Vec<usize>,
    },

    /// A batch with no rows.
    #[error("batch should contain more than 0 samples")]
    EmptyBatch,

    /// A tensor has the wrong dtype or lives on a device the fast path does not handle.
    #[error("{what}: expected a contiguous f32 CPU tensor")]
    NotF32Cpu {
        /// Which tensor.
        what: String,
    },

    /// A parameter is missing from a checkpoint, or the checkpoint holds an unexpected one.
    #[error("checkpoint {path}: {problem}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// Gradients (of the outputs, or of the parameters) hold NaN or infinity; no step was taken.
    #[error("non-finite gradient in {what}; no optimizer step was taken")]
    NonFiniteGradient {
        /// Where the non-finite value was found.
        what: String,
    },

    /// An optimizer or schedule setting is out of range.
    #[error("invalid training config: {0}")]
    BadConfig(String),

    /// The expert's task queue is full; the task was not accepted (try again later or elsewhere).
    #[error("expert {uid:?} is overloaded: {queued_rows} rows queued, limit {limit}; try again later")]
    Overloaded {
        /// The expert.
        uid: String,
        /// Rows already queued for the expert (in the pool the task was meant for).
        queued_rows: usize,
        /// The most rows the pool queues.
        limit: usize,
    },

    /// A task has more rows than one batch may hold.
    #[error("task has {rows} rows but a batch holds at most {max}")]
    BatchTooLarge {
        /// Rows in the task.
        rows: usize,
        /// The runtime's `max_batch_size`.
        max: usize,
    },

    /// No expert with this uid is served here.
    #[error("unknown expert {0:?}")]
    UnknownExpert(String),

    /// The runtime is paused (its gate is `Stop`); the task was not computed.
    #[error("the expert runtime is paused; try again later")]
    Paused,

    /// The runtime is shut down (or its compute thread ended); the task was not computed.
    #[error("the expert runtime has stopped")]
    Stopped,

    /// A task is malformed (e.g. its tensors disagree on the number of rows).
    #[error("bad task: {0}")]
    BadTask(String),

    /// The runtime's compute thread could not be started.
    #[error("cannot start the expert runtime thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// `Result` with [`ExpertError`].
pub type Result<T, E = ExpertError> = std::result::Result<T, E>;
