//! The trainer side of a Decentralized Mixture-of-Experts, speaking hivemind's protocol.
//!
//! - [`transport`]: the [`transport::ExpertTransport`] seam — how a trainer reaches one expert (over
//!   libp2p with hivemind's `ConnectionHandler` RPCs, or in-process for unit tests) — and
//!   [`transport::RemoteExpert`].
//! - [`beam`]: [`beam::MoEBeamSearcher`], hivemind's beam search over the prefix dictionaries that
//!   expert servers declare in the DHT.
//! - [`moe`]: [`moe::RemoteMixtureOfExperts`], hivemind's DMoE layer inside candle's autograd, with the
//!   [`moe::Router`] seam (beam search, or a fixed list of experts).
//! - [`switch`]: [`switch::RemoteSwitchMixtureOfExperts`], hivemind's Switch-Transformer DMoE layer (top-1
//!   routing, jitter, grid utilization, load-balancing loss) over the same expert calls.
//! - [`toy`]: the toy classifier of hivemind's examples around one MoE layer.
//! - [`trainer`]: the trainer loop over the demo model (Adam, validation, samples).
//! - [`lm`]: the demo's character-level transformer language model, its corpus and vocabulary.

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod beam;
mod error;
pub mod lm;
pub mod moe;
pub mod switch;
pub mod toy;
pub mod trainer;
pub mod transport;

pub use error::{MoeError, Result};
