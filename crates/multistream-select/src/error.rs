//! Error types of a negotiation.
//!
//! Both enums are deliberately *not* `#[non_exhaustive]`: libp2p-swarm 0.48 matches
//! [`NegotiationError`] exhaustively, and this crate must stay a drop-in for the published one.

use std::io;

/// A violation of the multistream-select wire protocol, or an I/O error underneath it.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Reading from or writing to the underlying stream failed (this includes the remote closing
    /// the stream in the middle of a negotiation, reported as [`io::ErrorKind::UnexpectedEof`]).
    #[error("I/O error during multistream-select negotiation")]
    IoError(#[source] io::Error),

    /// The remote sent bytes that are not a valid multistream-select message: a bad or oversized
    /// length prefix, a payload without the trailing `'\n'`, non-UTF-8 text, or a message that
    /// makes no sense at this point of the negotiation.
    #[error("received an invalid multistream-select message")]
    InvalidMessage,

    /// A protocol name is not acceptable: empty, longer than 1023 bytes, containing control
    /// characters, or one of the reserved words `na`, `ls` and `/multistream/1.0.0`.
    ///
    /// A missing leading `/` is *not* a reason: hivemind's handler names have none.
    #[error("invalid protocol name")]
    InvalidProtocol,

    /// A protocol list (`ls` response) holds more entries than this implementation accepts.
    #[error("too many protocols in a protocol list")]
    TooManyProtocols,
}

impl From<io::Error> for ProtocolError {
    fn from(e: io::Error) -> Self {
        ProtocolError::IoError(e)
    }
}

impl From<ProtocolError> for io::Error {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::IoError(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// Why a protocol negotiation did not produce a protocol.
#[derive(Debug, thiserror::Error)]
pub enum NegotiationError {
    /// The remote broke the protocol, or the stream failed.
    #[error("multistream-select protocol error")]
    ProtocolError(#[from] ProtocolError),

    /// Both sides speak multistream-select, but no protocol could be agreed upon (every proposal
    /// was answered with `na`, the dialer gave up, or the remote speaks another multistream
    /// version).
    #[error("protocol negotiation failed: no protocol could be agreed upon")]
    Failed,
}

impl From<io::Error> for NegotiationError {
    fn from(e: io::Error) -> Self {
        NegotiationError::ProtocolError(ProtocolError::IoError(e))
    }
}

impl From<NegotiationError> for io::Error {
    fn from(e: NegotiationError) -> Self {
        match e {
            NegotiationError::ProtocolError(e) => e.into(),
            NegotiationError::Failed => io::Error::other(NegotiationError::Failed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn io_errors_round_trip_unchanged() {
        let e: NegotiationError = io::Error::new(io::ErrorKind::ConnectionReset, "boom").into();
        assert!(matches!(
            e,
            NegotiationError::ProtocolError(ProtocolError::IoError(_))
        ));
        let back: io::Error = e.into();
        assert_eq!(back.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(back.to_string(), "boom");
    }

    #[test]
    fn protocol_errors_become_invalid_data() {
        let e: io::Error = NegotiationError::from(ProtocolError::InvalidMessage).into();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let inner = e.get_ref().and_then(|e| e.downcast_ref::<ProtocolError>());
        assert!(matches!(inner, Some(ProtocolError::InvalidMessage)));
    }

    #[test]
    fn failed_keeps_its_identity_through_io_error() {
        let e: io::Error = NegotiationError::Failed.into();
        let inner = e.get_ref().and_then(|e| e.downcast_ref::<NegotiationError>());
        assert!(matches!(inner, Some(NegotiationError::Failed)));
    }

    #[test]
    fn sources_are_chained() {
        let e = NegotiationError::from(io::Error::other("root cause"));
        let protocol = e.source().expect("protocol error source");
        let io = protocol.source().expect("io error source");
        assert_eq!(io.to_string(), "root cause");
    }
}
