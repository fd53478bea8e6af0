//! Clean-room [multistream-select 1.0](https://github.com/multiformats/multistream-select)
//! that accepts protocol names without a leading `/`.
//!
//! # Why this crate exists
//!
//! hivemind peers (through go-libp2p's p2pd) name their RPC handlers `DHTProtocol.rpc_find`,
//! `ns::GradientAverager.rpc_join_group` and so on: no leading `/`. go-libp2p negotiates such
//! names without complaint, but the crates.io `multistream-select` insists on the slash, both
//! for the names it proposes and for the messages it parses, so stock rust-libp2p can neither
//! call a hivemind handler nor serve one (see `docs/hivemind-wire.md` §2.4 and §11).
//!
//! This crate is written from the protocol specification, not from the crates.io source. It
//! is published in this workspace under the same name with a 0.14.x version and swapped in for
//! every user in the dependency graph by the root manifest:
//!
//! ```toml
//! [patch.crates-io]
//! multistream-select = { path = "crates/multistream-select" }
//! ```
//!
//! so libp2p-core 0.44 and libp2p-swarm 0.48 (libp2p 0.57) negotiate with it unmodified. Its
//! public API is exactly the subset they use.
//!
//! # Protocol
//!
//! Every message is `uvarint(len) || text '\n'`, `len` counting the `'\n'`. A negotiation on a
//! fresh stream goes:
//!
//! ```text
//! dialer                                  listener
//! /multistream/1.0.0   ─────────────────▶
//! DHTProtocol.rpc_find ─────────────────▶
//!                      ◀───────────────── /multistream/1.0.0
//!                      ◀───────────────── DHTProtocol.rpc_find   (or "na": try the next one)
//! <protocol data>      ◀────────────────▶ <protocol data>
//! ```
//!
//! A dialer may also send `ls`; the listener then answers with one message holding its
//! protocols, each encoded as `uvarint(len) || name '\n'`, followed by a final `'\n'`.
//!
//! Validation stays strict where it matters: a line is at most 1024 bytes, must end in `'\n'`
//! and be UTF-8; a protocol name must be non-empty, free of control characters and not one of
//! the reserved words; an `ls` response is bounded in size and entries. Malformed input yields
//! a [`ProtocolError`], never a panic, and no buffer grows with what the remote sends.
//!
//! # Example
//!
//! ```no_run
//! # async fn example(
//! #     dialer_io: impl futures::AsyncRead + futures::AsyncWrite + Unpin,
//! #     listener_io: impl futures::AsyncRead + futures::AsyncWrite + Unpin,
//! # ) -> Result<(), multistream_select::NegotiationError> {
//! use multistream_select::{Version, dialer_select_proto, listener_select_proto};
//!
//! let dialer = dialer_select_proto(dialer_io, ["DHTProtocol.rpc_find"], Version::V1);
//! let listener = listener_select_proto(listener_io, ["DHTProtocol.rpc_ping", "DHTProtocol.rpc_find"]);
//! let ((chosen, _dialer_stream), (accepted, _listener_stream)) =
//!     futures::future::try_join(dialer, listener).await?;
//! assert_eq!(chosen, "DHTProtocol.rpc_find");
//! assert_eq!(accepted, "DHTProtocol.rpc_find");
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod dialer;
mod error;
mod io;
mod listener;
mod message;
mod negotiated;

pub use crate::{
    dialer::{DialerSelectFuture, dialer_select_proto},
    error::{NegotiationError, ProtocolError},
    listener::{ListenerSelectFuture, listener_select_proto},
    negotiated::{Negotiated, NegotiatedComplete},
};

/// The multistream-select version a dialer commits to.
///
/// A listener accepts dialers of either version: they differ only in when the dialer waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Version {
    /// multistream-select 1.0: every proposal waits for the listener's answer before the
    /// stream is handed out (one round trip, more after each `na`).
    #[default]
    V1,
    /// multistream-select 1.0 with optimistic ("0-RTT") selection of the last proposed
    /// protocol: the stream is handed out at once, the header and the proposal travel with
    /// the first protocol data, and the listener's confirmation is read before the first
    /// protocol data is returned. Same bytes on the wire as [`Version::V1`]; a rejection
    /// surfaces later, as an I/O error on the [`Negotiated`] stream.
    V1Lazy,
}
