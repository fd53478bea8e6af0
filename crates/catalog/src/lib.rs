//! Apiary's experiment catalog.
//!
//! An experiment is described by a [`Manifest`]: what it is, who publishes it, which expert of the built-in
//! zoo it trains with which optimizer, the uid prefix and grid of its experts, what a volunteer needs to
//! host one, and where to join. The publisher signs it ([`SignedManifest`]) with the RSA key it is known
//! by; a volunteer's node accepts a manifest only through [`SignedManifest::verify`], which checks the
//! signature, the expiry and every field's bounds and tells the UI why it refused ([`Rejection`]).
//!
//! A manifest can never make a volunteer run code: the expert kind is one of the zoo's names
//! (`ffn`, `transformer`, `nop`, `det_dropout`), and everything else is data with fixed bounds.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod manifest;

pub use manifest::{
    ExpertSpec, Manifest, ManifestSignature, OptimizerSpec, Publisher, Rejection, Requirements, ScheduleSpec,
    SignedManifest, Status,
};
