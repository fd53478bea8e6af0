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

impl MoeError {
    /// Takes back a [`MoeError::TooFewExperts`] that crossed candle's autograd (a backward pass carries
    /// errors as text), so that callers can tell "the experts did not answer" from a tensor failure.
    pub fn from_backward(e: candle_core::Error) -> MoeError {
        const PREFIX: &str = "too few experts answered: ";
        let text = e.to_string();
        match text.strip_prefix(PREFIX) {
            Some(rest) => MoeError::TooFewExperts(rest.to_owned()),
            None => MoeError::Tensor(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MoeError;

    #[test]
    fn too_few_experts_survives_the_backward_pass() {
        let crossed = candle_core::Error::Msg(
            MoeError::TooFewExperts("backward: 0 answers, 1 needed".into()).to_string(),
        );
        match MoeError::from_backward(crossed) {
            MoeError::TooFewExperts(why) => assert_eq!(why, "backward: 0 answers, 1 needed"),
            other => panic!("{other:?}"),
        }
        let other = candle_core::Error::Msg("shape mismatch".into());
        assert!(matches!(MoeError::from_backward(other), MoeError::Tensor(_)));
    }
}
