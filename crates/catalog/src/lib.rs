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

pub mod browse;
pub mod bundled;
pub mod fit;
pub mod hosting;
pub mod manifest;
pub mod plan;
pub mod records;
pub mod swarm;

pub use browse::{Card, Source, cards};
pub use fit::{Fit, FitLevel, GpuProfile, MachineProfile, Mode, Placement, expert_memory_mb, fit};
pub use hosting::{Change, Hosting, HostingConfig, JoinError, ManifestWatch, Verdict};
pub use manifest::{
    ExpertSpec, Manifest, ManifestSignature, OptimizerSpec, Publisher, Rejection, Requirements, ScheduleSpec,
    SignedManifest, Status,
};
pub use plan::{Coverage, JoinPlan, Need, NeedLevel, PlanError, need, plan, tie_break_of};
pub use records::{StatusRecord, fingerprint};
pub use swarm::{DhtCatalog, Listing, Publication, PublishError, RosterEntry};
