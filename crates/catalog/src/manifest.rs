//! The experiment manifest (schema version 1), its signature, and the reasons a volunteer's node
//! refuses one.
//!
//! # Formats
//!
//! A [`Manifest`] is written by hand in TOML ([`Manifest::from_toml_str`], [`Manifest::to_toml_string`])
//! and travels as JSON ([`Manifest::from_json_slice`], [`SignedManifest::from_json_slice`]). Parsing only
//! checks the shape and the size of the input (at most [`MAX_MANIFEST_BYTES`]); [`Manifest::validate`]
//! checks every field, and [`SignedManifest::verify`] checks everything (schema, fields, publisher key,
//! signature, expiry).
//!
//! # What is signed
//!
//! The signature covers [`Manifest::canonical_bytes`]: the ASCII bytes `apiary-manifest-v1\n` followed
//! by the manifest as compact JSON (no whitespace) with the keys of every object sorted by their UTF-8
//! bytes, absent optional fields left out, strings escaped as `serde_json` escapes them, and numbers
//! written as `serde_json` writes them (integers in decimal, floats in their shortest round-trip form).
//! The same manifest always has the same canonical bytes, whichever format it was read from.

use std::collections::BTreeMap;
use std::str::FromStr;

use apiary_expert::{ExpertConfig, ExpertKind, OptimizerConfig, ScheduleConfig};
use apiary_wire::signature::{RsaPrivateKey, RsaPublicKey};
use serde::{Deserialize, Serialize};

/// The only schema version this crate reads and writes.
pub const SCHEMA_VERSION: u32 = 1;
/// The largest manifest accepted, in bytes of TOML, JSON or canonical encoding (64 KiB).
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;
/// The largest signed manifest accepted as JSON: a manifest plus room for the key and the signature.
pub const MAX_SIGNED_MANIFEST_BYTES: usize = MAX_MANIFEST_BYTES + 8 * 1024;
/// The most experts a grid may have (the product of its dimensions).
pub const MAX_GRID_EXPERTS: usize = 65_536;
/// The most dimensions a grid may have.
pub const MAX_GRID_DIMS: usize = 8;
/// The largest hidden dimension.
pub const MAX_HIDDEN_DIM: usize = 65_536;
/// The largest `max_batch_size`.
pub const MAX_BATCH_SIZE: usize = 1 << 20;
/// The most bootstrap peers a manifest lists.
pub const MAX_BOOTSTRAP_PEERS: usize = 64;
/// The latest time (unix seconds, the year 3000) a manifest may name.
pub const MAX_UNIX_TIME: u64 = 32_503_680_000;
/// The most training steps a linear schedule may name.
pub const MAX_SCHEDULE_STEPS: u64 = 1_000_000_000_000;

/// What the signature of a manifest starts with before the JSON (domain separation).
const CANONICAL_PREFIX: &[u8] = b"apiary-manifest-v1\n";

// Bounds of the text fields, in characters (`chars().count()`); `description` in bytes.
const MAX_ID: usize = 64;
const MAX_TITLE: usize = 120;
const MAX_SUMMARY: usize = 280;
const MAX_DESCRIPTION_BYTES: usize = 8 * 1024;
const MAX_URL: usize = 2048;
const MAX_PUBLISHER_NAME: usize = 120;
const MAX_PUBLIC_KEY: usize = 4096;
const MAX_UID_PREFIX: usize = 64;
const MAX_MULTIADDR: usize = 512;
const MAX_SIGNATURE: usize = 2048;
/// How far in the future a manifest's `created` may lie (clocks disagree), seconds: one day.
const MAX_CLOCK_SKEW: u64 = 86_400;
/// How much of an offending value an error message repeats.
const MAX_ECHO: usize = 64;

/// Why a manifest was refused. Every variant's message is meant for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The manifest carries no signature.
    #[error("the manifest is not signed")]
    Unsigned,
    /// The signature does not match the manifest (it was changed after signing, or the signature is
    /// corrupt).
    #[error("the manifest's signature does not match its contents")]
    BadSignature,
    /// The manifest was signed by another key than its publisher's.
    #[error("the manifest was signed by another key than its publisher's")]
    WrongKey,
    /// The publisher's public key is not an OpenSSH `ssh-rsa` key.
    #[error("the publisher's public key is not a valid `ssh-rsa` key")]
    InvalidPublisherKey,
    /// The manifest's expiry time has passed.
    #[error("the experiment's manifest expired (at {expires}, now {now})")]
    Expired {
        /// When it expired (unix seconds).
        expires: u64,
        /// The time it was checked at (unix seconds).
        now: u64,
    },
    /// `created` after `expires`, or a time beyond the year 3000.
    #[error("the manifest's times are invalid: {reason}")]
    InvalidTimes {
        /// What is wrong.
        reason: String,
    },
    /// A schema version this client does not know.
    #[error("unsupported manifest schema version {found} (this client reads version {SCHEMA_VERSION})")]
    UnsupportedSchemaVersion {
        /// The version the manifest declares (0 when it declares none or a non-integer).
        found: u64,
    },
    /// An expert kind that is not in the built-in zoo.
    #[error("unknown expert kind `{name}` (known: ffn, transformer, nop, det_dropout)")]
    UnknownExpertKind {
        /// The kind the manifest names (cut to 64 characters).
        name: String,
    },
    /// A dtype the zoo does not train in (only `float32` for now).
    #[error("unsupported expert dtype `{dtype}` (this client trains float32 experts)")]
    UnsupportedDtype {
        /// The dtype the manifest names (cut to 64 characters).
        dtype: String,
    },
    /// Bad dimensions: hidden size, batch size or grid.
    #[error("invalid dimensions: {reason}")]
    InvalidDims {
        /// What is wrong.
        reason: String,
    },
    /// Bad optimizer, schedule or gradient clipping settings.
    #[error("invalid training settings: {reason}")]
    InvalidTraining {
        /// What is wrong.
        reason: String,
    },
    /// A uid prefix hivemind would not accept, e.g. `ffn.` is fine but `ffn` or `.x.` are not.
    #[error("invalid expert uid prefix `{prefix}`")]
    InvalidUidPrefix {
        /// The prefix (cut to 64 characters).
        prefix: String,
    },
    /// The experiment id is not a slug (`a-z`, `0-9` and inner `-`, at most 64 characters).
    #[error("invalid experiment id `{id}` (use lowercase letters, digits and dashes)")]
    InvalidId {
        /// The id (cut to 64 characters).
        id: String,
    },
    /// A bootstrap address that is not a multiaddr ending in `/p2p/<peer id>`.
    #[error("invalid bootstrap peer address `{addr}`: {reason}")]
    InvalidBootstrapPeer {
        /// The address (cut to 64 characters).
        addr: String,
        /// What is wrong.
        reason: String,
    },
    /// A URL that is not `http://` or `https://`.
    #[error("the {field} is not an http(s) URL")]
    InvalidUrl {
        /// Which field.
        field: &'static str,
    },
    /// A required text field is empty.
    #[error("the {field} is empty")]
    EmptyText {
        /// Which field.
        field: &'static str,
    },
    /// A text field holds control characters.
    #[error("the {field} contains control characters")]
    ControlCharacters {
        /// Which field.
        field: &'static str,
    },
    /// A field or the whole input is longer than allowed.
    #[error("the {field} is too long (at most {max})")]
    TooLong {
        /// Which field (`manifest` for the whole input).
        field: &'static str,
        /// The limit (characters for text fields, bytes for `description` and whole inputs, items for lists).
        max: usize,
    },
    /// The input is not a well-formed manifest.
    #[error("the manifest is malformed: {reason}")]
    Malformed {
        /// The parser's message (cut to 300 characters).
        reason: String,
    },
    /// Signing failed on this machine (only from [`SignedManifest::sign`]).
    #[error("could not sign the manifest: {reason}")]
    SigningFailed {
        /// Why.
        reason: String,
    },
}

/// Where an experiment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Looking for volunteers; training has not started.
    Recruiting,
    /// Training; volunteers can still join.
    Training,
    /// Done; nothing to join.
    Finished,
}

/// Who publishes the experiment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publisher {
    /// A display name, 1–120 characters.
    pub name: String,
    /// The publisher's RSA public key as an OpenSSH line, `ssh-rsa AAAA…` (at most 4096 characters). The
    /// manifest must be signed by this key.
    pub public_key: String,
}

/// The optimizer each expert applies on backward; maps onto [`OptimizerConfig`]. Unset fields take
/// torch's defaults; fields that do not belong to the named optimizer are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    /// `adam`, `adamw` or `sgd`.
    pub name: String,
    /// Learning rate, finite and `>= 0`.
    pub lr: f64,
    /// Adam/AdamW `(beta1, beta2)`, each in `[0, 1)`; default `[0.9, 0.999]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub betas: Option<[f64; 2]>,
    /// Adam/AdamW denominator term, finite and `>= 0`; default 1e-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// Weight decay, finite and `>= 0`; default 0 (Adam, SGD) or 1e-2 (AdamW).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// SGD momentum, finite and `>= 0`; default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    /// SGD dampening, finite; default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dampening: Option<f64>,
    /// SGD Nesterov momentum (needs a momentum and zero dampening); default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nesterov: Option<bool>,
}

impl OptimizerSpec {
    /// The optimizer this spec names, with its bounds checked.
    pub fn to_config(&self) -> Result<OptimizerConfig, Rejection> {
        let bad = |reason: String| Err(Rejection::InvalidTraining { reason });
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        if !finite_nonneg(self.lr) {
            return bad(format!("learning rate {} must be finite and >= 0", self.lr));
        }
        if let Some(wd) = self.weight_decay
            && !finite_nonneg(wd)
        {
            return bad(format!("weight_decay {wd} must be finite and >= 0"));
        }
        let adam_like = |name: &str, default: OptimizerConfig| -> Result<OptimizerConfig, Rejection> {
            if self.momentum.is_some() || self.dampening.is_some() || self.nesterov.is_some() {
                return bad(format!("`{name}` takes no momentum, dampening or nesterov"));
            }
            let [b1, b2] = self.betas.unwrap_or([0.9, 0.999]);
            if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
                return bad(format!("betas [{b1}, {b2}] must lie in [0, 1)"));
            }
            let eps = self.eps.unwrap_or(1e-8);
            if !finite_nonneg(eps) {
                return bad(format!("eps {eps} must be finite and >= 0"));
            }
            Ok(match default {
                OptimizerConfig::AdamW { weight_decay, .. } => OptimizerConfig::AdamW {
                    lr: self.lr,
                    betas: (b1, b2),
                    eps,
                    weight_decay: self.weight_decay.unwrap_or(weight_decay),
                },
                _ => OptimizerConfig::Adam {
                    lr: self.lr,
                    betas: (b1, b2),
                    eps,
                    weight_decay: self.weight_decay.unwrap_or(0.0),
                },
            })
        };
        match self.name.as_str() {
            "adam" => adam_like("adam", OptimizerConfig::adam()),
            "adamw" => adam_like("adamw", OptimizerConfig::adamw()),
            "sgd" => {
                if self.betas.is_some() || self.eps.is_some() {
                    return bad("`sgd` takes no betas or eps".into());
                }
                let momentum = self.momentum.unwrap_or(0.0);
                let dampening = self.dampening.unwrap_or(0.0);
                let nesterov = self.nesterov.unwrap_or(false);
                if !finite_nonneg(momentum) || !dampening.is_finite() {
                    return bad(format!("momentum {momentum} / dampening {dampening} invalid"));
                }
                if nesterov && (momentum <= 0.0 || dampening != 0.0) {
                    return bad("nesterov momentum requires a momentum and zero dampening".into());
                }
                Ok(OptimizerConfig::Sgd {
                    lr: self.lr,
                    momentum,
                    dampening,
                    weight_decay: self.weight_decay.unwrap_or(0.0),
                    nesterov,
                })
            }
            other => bad(format!(
                "unknown optimizer `{}` (known: adam, adamw, sgd)",
                cut(other)
            )),
        }
    }
}

/// The learning-rate schedule; maps onto [`ScheduleConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// `none` (constant) or `linear` (warm-up then linear decay, hivemind's `linear`).
    pub name: String,
    /// `linear` only: warm-up steps, at most `training_steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// `linear` only: total training steps, 1 to 10¹².
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_steps: Option<u64>,
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        Self {
            name: "none".into(),
            warmup_steps: None,
            training_steps: None,
        }
    }
}

impl ScheduleSpec {
    /// The schedule this spec names, with its bounds checked.
    pub fn to_config(&self) -> Result<ScheduleConfig, Rejection> {
        let bad = |reason: String| Err(Rejection::InvalidTraining { reason });
        match self.name.as_str() {
            "none" => {
                if self.warmup_steps.is_some() || self.training_steps.is_some() {
                    return bad("schedule `none` takes no steps".into());
                }
                Ok(ScheduleConfig::None)
            }
            "linear" => {
                let warmup_steps = self.warmup_steps.unwrap_or(0);
                let Some(training_steps) = self.training_steps else {
                    return bad("schedule `linear` needs training_steps".into());
                };
                if training_steps == 0 || training_steps > MAX_SCHEDULE_STEPS || warmup_steps > training_steps
                {
                    return bad(format!(
                        "schedule `linear` needs 0 <= warmup_steps <= training_steps <= {MAX_SCHEDULE_STEPS} \
                         and training_steps > 0 (got {warmup_steps}, {training_steps})"
                    ));
                }
                Ok(ScheduleConfig::Linear {
                    warmup_steps,
                    training_steps,
                })
            }
            other => bad(format!("unknown schedule `{}` (known: none, linear)", cut(other))),
        }
    }
}

/// Which expert of the zoo every grid cell hosts, and how it trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertSpec {
    /// The zoo's name: `ffn`, `transformer`, `nop` or `det_dropout` (see [`ExpertKind`]).
    pub kind: String,
    /// The hidden dimension, 1 to 65,536; a multiple of 16 for `transformer` (16 heads).
    pub hidden_dim: usize,
    /// The most samples one batch may hold, 1 to 2²⁰.
    pub max_batch_size: usize,
    /// The optimizer applied on backward.
    pub optimizer: OptimizerSpec,
    /// The learning-rate schedule; default `none`.
    #[serde(default)]
    pub schedule: ScheduleSpec,
    /// Clip the global gradient norm to this value (finite, `> 0`) before each step; unset = no clipping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,
    /// The dtype of the experts' weights and of the tensors on the wire; default and, for now, only
    /// `float32` (the zoo trains in f32; a manifest naming another dtype is refused, not converted).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Seeds every expert's initial weights together with its uid, so that all replicas of a uid start
    /// from the same weights whoever hosts them; default 0.
    #[serde(default)]
    pub init_seed: u64,
}

fn default_dtype() -> String {
    "float32".into()
}

impl ExpertSpec {
    /// The zoo's expert kind.
    pub fn expert_kind(&self) -> Result<ExpertKind, Rejection> {
        ExpertKind::from_str(&self.kind).map_err(|_| Rejection::UnknownExpertKind {
            name: cut(&self.kind),
        })
    }

    /// The expert to build, with its dimensions checked.
    pub fn expert_config(&self) -> Result<ExpertConfig, Rejection> {
        let kind = self.expert_kind()?;
        let bad = |reason: String| Err(Rejection::InvalidDims { reason });
        if self.hidden_dim == 0 || self.hidden_dim > MAX_HIDDEN_DIM {
            return bad(format!(
                "hidden_dim {} must be 1 to {MAX_HIDDEN_DIM}",
                self.hidden_dim
            ));
        }
        if kind == ExpertKind::Transformer && !self.hidden_dim.is_multiple_of(16) {
            return bad(format!(
                "a transformer's hidden_dim {} must be a multiple of 16 (its heads)",
                self.hidden_dim
            ));
        }
        if self.max_batch_size == 0 || self.max_batch_size > MAX_BATCH_SIZE {
            return bad(format!(
                "max_batch_size {} must be 1 to {MAX_BATCH_SIZE}",
                self.max_batch_size
            ));
        }
        Ok(ExpertConfig::new(kind, self.hidden_dim))
    }

    fn validate(&self) -> Result<(), Rejection> {
        self.expert_config()?;
        if self.dtype != "float32" {
            return Err(Rejection::UnsupportedDtype {
                dtype: cut(&self.dtype),
            });
        }
        self.optimizer.to_config()?;
        self.schedule.to_config()?;
        if let Some(c) = self.clip_grad_norm
            && !(c.is_finite() && c > 0.0)
        {
            return Err(Rejection::InvalidTraining {
                reason: format!("clip_grad_norm {c} must be finite and > 0"),
            });
        }
        Ok(())
    }
}

/// What a volunteer needs to host experts of this experiment (the card shows them; join planning fits
/// them to the machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// Host memory per hosted expert, MiB.
    pub min_ram_mb_per_expert: u32,
    /// GPU memory per hosted expert, MiB (0: runs on the CPU).
    pub min_vram_mb_per_expert: u32,
    /// Upload/download bandwidth the experiment expects, Mbit/s.
    pub bandwidth_mbps: u32,
    /// Disk for checkpoints, MiB.
    pub disk_mb: u32,
}

/// An experiment's manifest, schema version 1. See the module docs for the formats and the signed bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always 1 ([`SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// A slug naming the experiment: `a-z`, `0-9` and inner `-`, 1–64 characters, e.g. `tiny-shakespeare-ffn`.
    pub id: String,
    /// The card's title, 1–120 characters, no control characters.
    pub title: String,
    /// One or two sentences for the card, 1–280 characters, no control characters.
    pub summary: String,
    /// Longer text (plain, may hold newlines and tabs), at most 8 KiB.
    pub description: String,
    /// The experiment's web page, an `http(s)://` URL of at most 2048 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub homepage: Option<String>,
    /// When the manifest was made, unix seconds (at most [`MAX_UNIX_TIME`]).
    pub created: u64,
    /// When it stops being valid, unix seconds, `>= created` (at most [`MAX_UNIX_TIME`]); publishers
    /// re-sign with a later expiry while the experiment runs.
    pub expires: u64,
    /// Where the experiment stands.
    pub status: Status,
    /// The uid prefix of the experiment's experts by hivemind's rule: a name without dots and
    /// whitespace, optional coordinates, and a trailing `.`, e.g. `ffn.`; at most 64 characters.
    /// Expert uids are the prefix followed by grid coordinates joined by `.`, e.g. `ffn.3.7`.
    pub uid_prefix: String,
    /// The expert grid: one size per dimension (1 to 8 dimensions, each `>= 1`), at most 65,536 experts
    /// in all.
    pub grid: Vec<usize>,
    /// Bootstrap peers to join the experiment's DHT: multiaddrs ending in `/p2p/<peer id>`, e.g.
    /// `/ip4/203.0.113.5/tcp/31337/p2p/QmXyz…`; at most 64, each at most 512 characters.
    #[serde(default)]
    pub bootstrap_peers: Vec<String>,
    /// Where the trainer publishes live status (volunteers, loss), an `http(s)://` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer_status_url: Option<String>,
    /// Who publishes it.
    pub publisher: Publisher,
    /// The expert every grid cell hosts and how it trains.
    pub expert: ExpertSpec,
    /// What a volunteer needs per hosted expert.
    pub requirements: Requirements,
}

impl Manifest {
    /// Parses TOML (at most [`MAX_MANIFEST_BYTES`]); checks the shape only, see [`Manifest::validate`].
    pub fn from_toml_str(s: &str) -> Result<Self, Rejection> {
        check_size(s.len(), MAX_MANIFEST_BYTES)?;
        let table: toml::Table = toml::from_str(s).map_err(malformed)?;
        check_schema(table.get("schema_version").and_then(toml::Value::as_integer))?;
        toml::Value::Table(table).try_into().map_err(malformed)
    }

    /// Writes the manifest as TOML.
    pub fn to_toml_string(&self) -> Result<String, Rejection> {
        toml::to_string(self).map_err(malformed)
    }

    /// Parses JSON (at most [`MAX_MANIFEST_BYTES`]); checks the shape only, see [`Manifest::validate`].
    pub fn from_json_slice(bytes: &[u8]) -> Result<Self, Rejection> {
        check_size(bytes.len(), MAX_MANIFEST_BYTES)?;
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(malformed)?;
        Self::from_json_value(value)
    }

    fn from_json_value(value: serde_json::Value) -> Result<Self, Rejection> {
        let version = value.get("schema_version").map(|v| v.as_i64());
        check_schema(version.flatten())?;
        serde_json::from_value(value).map_err(malformed)
    }

    /// Writes the manifest as pretty JSON.
    pub fn to_json_string(&self) -> Result<String, Rejection> {
        serde_json::to_string_pretty(self).map_err(malformed)
    }

    /// The bytes the publisher signs: `apiary-manifest-v1\n` and the manifest as compact JSON with sorted
    /// keys (see the module docs). Deterministic.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, Rejection> {
        let value = serde_json::to_value(self).map_err(malformed)?;
        let mut out = CANONICAL_PREFIX.to_vec();
        write_canonical(&value, &mut out)?;
        Ok(out)
    }

    /// The publisher's key.
    pub fn publisher_key(&self) -> Result<RsaPublicKey, Rejection> {
        if self.publisher.public_key.len() > MAX_PUBLIC_KEY {
            return Err(Rejection::TooLong {
                field: "publisher's public key",
                max: MAX_PUBLIC_KEY,
            });
        }
        RsaPublicKey::from_openssh(self.publisher.public_key.as_bytes())
            .map_err(|_| Rejection::InvalidPublisherKey)
    }

    /// The uids of every expert of the grid, in row-major order (`ffn.0.0`, `ffn.0.1`, …). Call on a
    /// validated manifest: the grid holds at most [`MAX_GRID_EXPERTS`] experts.
    pub fn expert_uids(&self) -> Vec<String> {
        let total = grid_total(&self.grid).unwrap_or(0).min(MAX_GRID_EXPERTS);
        let mut out = Vec::with_capacity(total);
        if self.grid.is_empty() {
            return out;
        }
        let mut coords = vec![0usize; self.grid.len()];
        for _ in 0..total {
            let parts: Vec<String> = coords.iter().map(usize::to_string).collect();
            out.push(format!("{}{}", self.uid_prefix, parts.join(".")));
            for d in (0..coords.len()).rev() {
                coords[d] += 1;
                if coords[d] < self.grid[d] {
                    break;
                }
                coords[d] = 0;
            }
        }
        out
    }

    /// Checks every field's bounds (not the signature, not the expiry): the schema version, the text
    /// fields, the times, the expert (a zoo kind, its dimensions, optimizer and schedule), the uid prefix,
    /// the grid, the bootstrap addresses, the publisher key and the canonical size.
    pub fn validate(&self) -> Result<(), Rejection> {
        check_schema(Some(i64::from(self.schema_version)))?;
        if !is_slug(&self.id) {
            return Err(Rejection::InvalidId { id: cut(&self.id) });
        }
        check_line("title", &self.title, MAX_TITLE)?;
        check_line("summary", &self.summary, MAX_SUMMARY)?;
        if self.description.len() > MAX_DESCRIPTION_BYTES {
            return Err(Rejection::TooLong {
                field: "description",
                max: MAX_DESCRIPTION_BYTES,
            });
        }
        if self
            .description
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(Rejection::ControlCharacters { field: "description" });
        }
        if let Some(url) = &self.homepage {
            check_url("homepage", url)?;
        }
        if let Some(url) = &self.trainer_status_url {
            check_url("trainer status URL", url)?;
        }
        check_line("publisher's name", &self.publisher.name, MAX_PUBLISHER_NAME)?;
        if self.created > MAX_UNIX_TIME || self.expires > MAX_UNIX_TIME {
            return Err(Rejection::InvalidTimes {
                reason: "a time lies beyond the year 3000".into(),
            });
        }
        if self.created > self.expires {
            return Err(Rejection::InvalidTimes {
                reason: format!("created ({}) is after expires ({})", self.created, self.expires),
            });
        }
        self.expert.validate()?;
        if self.uid_prefix.chars().count() > MAX_UID_PREFIX
            || !is_valid_prefix(&self.uid_prefix)
            || self
                .uid_prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Rejection::InvalidUidPrefix {
                prefix: cut(&self.uid_prefix),
            });
        }
        check_grid(&self.grid)?;
        if self.bootstrap_peers.len() > MAX_BOOTSTRAP_PEERS {
            return Err(Rejection::TooLong {
                field: "list of bootstrap peers",
                max: MAX_BOOTSTRAP_PEERS,
            });
        }
        for addr in &self.bootstrap_peers {
            check_multiaddr(addr).map_err(|reason| Rejection::InvalidBootstrapPeer {
                addr: cut(addr),
                reason: reason.into(),
            })?;
        }
        self.publisher_key()?;
        check_size(self.canonical_bytes()?.len(), MAX_MANIFEST_BYTES)
    }
}

/// The publisher's signature of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestSignature {
    /// The signing key as an OpenSSH line (`ssh-rsa AAAA…`); must be the publisher's.
    pub public_key: String,
    /// Base64 of the RSA-PSS signature (MGF1-SHA256, SHA-256; [`RsaPrivateKey::sign`]) over
    /// [`Manifest::canonical_bytes`].
    pub value: String,
}

/// A manifest and its publisher's signature, as it travels (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    /// The manifest.
    pub manifest: Manifest,
    /// The signature; `None` (or an empty value) is [`Rejection::Unsigned`].
    #[serde(default)]
    pub signature: Option<ManifestSignature>,
}

impl SignedManifest {
    /// Validates `manifest` and signs it with `key`, which must be the publisher's key
    /// (otherwise [`Rejection::WrongKey`]).
    pub fn sign(manifest: Manifest, key: &RsaPrivateKey) -> Result<Self, Rejection> {
        manifest.validate()?;
        let public = key.public_key();
        if public != manifest.publisher_key()? {
            return Err(Rejection::WrongKey);
        }
        let value = key
            .sign(&manifest.canonical_bytes()?)
            .map_err(|e| Rejection::SigningFailed {
                reason: e.to_string(),
            })?;
        let value = String::from_utf8(value).map_err(|e| Rejection::SigningFailed {
            reason: e.to_string(),
        })?;
        Ok(Self {
            manifest,
            signature: Some(ManifestSignature {
                public_key: public.to_openssh(),
                value,
            }),
        })
    }

    /// Everything a volunteer's node checks before showing or joining an experiment, at `now` (unix
    /// seconds): the schema version and fields ([`Manifest::validate`]), the publisher's key, that the
    /// signature is there, made by the publisher's key and matches the manifest, that the manifest has
    /// not expired (`now >= expires` is expired) and was not created more than a day after `now`.
    pub fn verify(&self, now: u64) -> Result<&Manifest, Rejection> {
        let manifest = &self.manifest;
        manifest.validate()?;
        let publisher = manifest.publisher_key()?;
        let Some(signature) = self.signature.as_ref().filter(|s| !s.value.is_empty()) else {
            return Err(Rejection::Unsigned);
        };
        if signature.value.len() > MAX_SIGNATURE {
            return Err(Rejection::BadSignature);
        }
        if signature.public_key.len() > MAX_PUBLIC_KEY {
            return Err(Rejection::WrongKey);
        }
        match RsaPublicKey::from_openssh(signature.public_key.as_bytes()) {
            Ok(signer) if signer == publisher => {}
            _ => return Err(Rejection::WrongKey),
        }
        if !publisher.verify(&manifest.canonical_bytes()?, signature.value.as_bytes()) {
            return Err(Rejection::BadSignature);
        }
        if now >= manifest.expires {
            return Err(Rejection::Expired {
                expires: manifest.expires,
                now,
            });
        }
        if manifest.created > now.saturating_add(MAX_CLOCK_SKEW) {
            return Err(Rejection::InvalidTimes {
                reason: format!(
                    "created ({}) lies more than a day after this computer's clock ({now})",
                    manifest.created
                ),
            });
        }
        Ok(manifest)
    }

    /// Parses a signed manifest from JSON (at most [`MAX_SIGNED_MANIFEST_BYTES`]); checks the shape only,
    /// see [`SignedManifest::verify`].
    pub fn from_json_slice(bytes: &[u8]) -> Result<Self, Rejection> {
        check_size(bytes.len(), MAX_SIGNED_MANIFEST_BYTES)?;
        let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(malformed)?;
        let Some(object) = value.as_object_mut() else {
            return Err(Rejection::Malformed {
                reason: "expected a JSON object".into(),
            });
        };
        if let Some(unknown) = object
            .keys()
            .find(|k| k.as_str() != "manifest" && k.as_str() != "signature")
        {
            return Err(Rejection::Malformed {
                reason: format!("unknown field `{}`", cut(unknown)),
            });
        }
        let manifest = object.remove("manifest").ok_or_else(|| Rejection::Malformed {
            reason: "missing field `manifest`".into(),
        })?;
        let manifest = Manifest::from_json_value(manifest)?;
        let signature = match object.remove("signature") {
            None | Some(serde_json::Value::Null) => None,
            Some(s) => Some(serde_json::from_value(s).map_err(malformed)?),
        };
        Ok(Self { manifest, signature })
    }

    /// Writes the signed manifest as compact JSON.
    pub fn to_json_vec(&self) -> Result<Vec<u8>, Rejection> {
        serde_json::to_vec(self).map_err(malformed)
    }
}

fn malformed(e: impl std::fmt::Display) -> Rejection {
    let reason = e.to_string();
    let reason = match reason.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &reason[..i]),
        None => reason,
    };
    Rejection::Malformed { reason }
}

/// The first 64 characters of `s`, for error messages.
fn cut(s: &str) -> String {
    match s.char_indices().nth(MAX_ECHO) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn check_size(len: usize, max: usize) -> Result<(), Rejection> {
    if len > max {
        return Err(Rejection::TooLong {
            field: "manifest",
            max,
        });
    }
    Ok(())
}

fn check_schema(version: Option<i64>) -> Result<(), Rejection> {
    match version {
        Some(v) if v == i64::from(SCHEMA_VERSION) => Ok(()),
        other => Err(Rejection::UnsupportedSchemaVersion {
            found: other.and_then(|v| u64::try_from(v).ok()).unwrap_or(0),
        }),
    }
}

/// A one-line text field: 1 to `max` characters, no control characters.
fn check_line(field: &'static str, s: &str, max: usize) -> Result<(), Rejection> {
    if s.trim().is_empty() {
        return Err(Rejection::EmptyText { field });
    }
    if s.chars().count() > max {
        return Err(Rejection::TooLong { field, max });
    }
    if s.chars().any(char::is_control) {
        return Err(Rejection::ControlCharacters { field });
    }
    Ok(())
}

fn check_url(field: &'static str, url: &str) -> Result<(), Rejection> {
    if url.chars().count() > MAX_URL {
        return Err(Rejection::TooLong { field, max: MAX_URL });
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(rest)
            if !rest.is_empty()
                && !rest.starts_with('/')
                && !url.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            Ok(())
        }
        _ => Err(Rejection::InvalidUrl { field }),
    }
}

/// `a-z`, `0-9` and `-`, not at either end, 1 to 64 characters.
fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// hivemind's `PREFIX_PATTERN`, `^(([^.])+)([.](?:[0]|([1-9]([0-9]*))))*[.]$` (the rule of
/// `apiary_moe::beam::is_valid_prefix`): a name without dots, zero or more coordinates, a trailing `.`.
fn is_valid_prefix(s: &str) -> bool {
    let Some(body) = s.strip_suffix('.') else {
        return false;
    };
    let mut parts = body.split('.');
    parts.next().is_some_and(|name| !name.is_empty()) && parts.all(is_valid_coordinate)
}

/// `0` or `[1-9][0-9]*`.
fn is_valid_coordinate(part: &str) -> bool {
    match part.as_bytes() {
        [] => false,
        [b'0'] => true,
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

fn grid_total(grid: &[usize]) -> Option<usize> {
    grid.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

fn check_grid(grid: &[usize]) -> Result<(), Rejection> {
    let bad = |reason: String| Err(Rejection::InvalidDims { reason });
    if grid.is_empty() || grid.len() > MAX_GRID_DIMS {
        return bad(format!("the grid must have 1 to {MAX_GRID_DIMS} dimensions"));
    }
    if grid.contains(&0) {
        return bad("every grid dimension must be at least 1".into());
    }
    match grid_total(grid) {
        Some(total) if total <= MAX_GRID_EXPERTS => Ok(()),
        _ => bad(format!("the grid holds more than {MAX_GRID_EXPERTS} experts")),
    }
}

/// A multiaddr (parsed by the `multiaddr` crate) whose last component is `/p2p/<peer id>`.
fn check_multiaddr(addr: &str) -> Result<(), &'static str> {
    if addr.len() > MAX_MULTIADDR {
        return Err("too long");
    }
    let parsed = multiaddr::Multiaddr::from_str(addr).map_err(|_| "not a valid multiaddr")?;
    match parsed.iter().last() {
        Some(multiaddr::Protocol::P2p(_)) => Ok(()),
        _ => Err("must end in `/p2p/<peer id>`"),
    }
}

/// Compact JSON with the keys of every object sorted by their bytes (independent of whether
/// `serde_json` keeps insertion order in this build).
fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) -> Result<(), Rejection> {
    match value {
        serde_json::Value::Object(map) => {
            let sorted: BTreeMap<&str, &serde_json::Value> =
                map.iter().map(|(k, v)| (k.as_str(), v)).collect();
            out.push(b'{');
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).map_err(malformed)?;
                out.push(b':');
                write_canonical(v, out)?;
            }
            out.push(b'}');
        }
        serde_json::Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out)?;
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).map_err(malformed)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests;
