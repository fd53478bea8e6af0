//! Errors of the MoE layer, the demo model and the trainer.

/// What went wrong in the MoE layer, the model or the trainer.
#[derive(Debug, thiserror::Error)]
pub enum MoeError {
    /// A configuration or argument is out of range.
    #[error("{0}")]
    BadConfig(String),
    /// The router (beam search) failed.
    #[error("routing: {0}")]
    Routing(String),
    /// No expert of the grid could be found.
    #[error("{0}")]
    NoExperts(String),
    /// Fewer experts answered than the layer needs.
    #[error("too few experts answered: {0}")]
    TooFewExperts(String),
    /// Non-finite values where `detect_anomalies` forbids them.
    #[error("anomaly: {0}")]
    Anomaly(String),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The expert zoo refused something.
    #[error(transparent)]
    Expert(#[from] apiary_expert::ExpertError),
}

/// This crate's result.
pub type Result<T, E = MoeError> = std::result::Result<T, E>;
