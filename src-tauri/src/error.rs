//! What a failed command tells the dashboard: `{code, message}`, the same shape and codes as the node's
//! local HTTP API, so the UI handles both transports alike.

use serde::Serialize;

/// An error for the UI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UiError {
    /// Stable, machine-readable: `bad_request`, `not_found`, `already_joined`, `not_joined`,
    /// `ambiguous_publisher`, `cannot_plan`, `bad_manifest`, `stopped`, `busy`, `internal`.
    pub code: &'static str,
    /// For people.
    pub message: String,
}

impl UiError {
    /// The request itself was wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        UiError {
            code: "bad_request",
            message: message.into(),
        }
    }

    /// Something on this computer failed (not the request).
    pub fn internal(message: impl Into<String>) -> Self {
        UiError {
            code: "internal",
            message: message.into(),
        }
    }
}

impl From<apiary_node::NodeError> for UiError {
    fn from(e: apiary_node::NodeError) -> Self {
        UiError {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

impl std::fmt::Display for UiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}
