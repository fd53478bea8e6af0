//! The catalog a volunteer browses: the bundled experiments merged with what the DHT holds, each as a
//! [`Card`] with its live numbers, its hardware fit for this machine and how much it needs one more
//! volunteer.

use serde::Serialize;

use crate::fit::{Fit, MachineProfile, Mode, fit};
use crate::manifest::{Manifest, Status};
use crate::plan::{Coverage, Need, need};
use crate::records::{StatusRecord, fingerprint};
use crate::swarm::DhtCatalog;

/// Where a card comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Shipped with Apiary; not found in the DHT (not running, or no bootstrap peers reach it).
    Bundled,
    /// Read from the DHT, signed by its publisher.
    Dht,
}

/// One experiment as the catalog shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Card {
    /// The experiment's id.
    pub id: String,
    /// Where the card comes from.
    pub source: Source,
    /// The publisher's name.
    pub publisher: String,
    /// The publisher key's [`fingerprint`]; `None` for a bundled card (the demo's key is made when it
    /// runs).
    pub fingerprint: Option<String>,
    /// The experiment's status (from the manifest).
    pub status: Status,
    /// Volunteers announcing experts of the grid.
    pub volunteers: usize,
    /// Experts of the grid with at least one volunteer.
    pub covered: usize,
    /// The trainer's live status, if published.
    pub live: Option<StatusRecord>,
    /// Hardware fit for this machine in the chosen mode.
    pub fit: Fit,
    /// How much the experiment needs another volunteer.
    pub need: Need,
    /// The full manifest (title, texts, expert, requirements…).
    pub manifest: Manifest,
}

impl Card {
    /// The card's title.
    pub fn title(&self) -> &str {
        &self.manifest.title
    }
}

/// The cards: every DHT listing (verified), then every bundled manifest whose id the DHT does not list,
/// sorted by need (highest first) then id. `machine` and `mode` decide the fit.
pub fn cards(bundled: &[Manifest], dht: &DhtCatalog, machine: &MachineProfile, mode: Mode) -> Vec<Card> {
    let mut out: Vec<Card> = dht
        .listings
        .iter()
        .map(|l| {
            let m = l.manifest();
            let coverage = Coverage::from_rosters(m, l.rosters.iter().cloned());
            card(m, Source::Dht, &coverage, l.status.clone(), machine, mode)
        })
        .collect();
    for m in bundled {
        if !out.iter().any(|c| c.id == m.id) {
            out.push(card(
                m,
                Source::Bundled,
                &Coverage::default(),
                None,
                machine,
                mode,
            ));
        }
    }
    out.sort_by(|a, b| {
        b.need
            .score
            .total_cmp(&a.need.score)
            .then_with(|| a.id.cmp(&b.id))
    });
    out
}

fn card(
    m: &Manifest,
    source: Source,
    coverage: &Coverage,
    live: Option<StatusRecord>,
    machine: &MachineProfile,
    mode: Mode,
) -> Card {
    let need = need(m, coverage);
    Card {
        id: m.id.clone(),
        source,
        publisher: m.publisher.name.clone(),
        fingerprint: m.publisher_key().ok().map(|k| fingerprint(&k)),
        status: m.status,
        volunteers: coverage.volunteers(),
        covered: need.covered,
        live,
        fit: fit(m, machine, mode),
        need,
        manifest: m.clone(),
    }
}
