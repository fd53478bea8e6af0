//! hivemind's `MoEBeamSearcher` (`hivemind/moe/client/beam_search.py`): finds the best *active* experts of
//! a grid by a left-to-right beam search over the prefix dictionaries that expert servers declare in the DHT.
//!
//! An expert server declares, for every expert uid such as `ffn.3.7` (see
//! `apiary_expert::server::declarations`, hivemind's `declare_experts`):
//!
//! - the regular key `"ffn.3.7"` → the server's peer id (base58 `str`);
//! - the dictionary key `"ffn.3."`, sub-key `7` (an `int`) → the tuple `("ffn.3.7", peer_id)`, and likewise
//!   for every longer proper prefix of deeper uids (`"ffn.1.2."[3]` and `"ffn.1."[2]` for `ffn.1.2.3`); a
//!   one-dimensional uid `ffn.5` is stored as `"ffn.5."[-1]` ([`FLAT_EXPERT`]). The bare `"ffn."` is never
//!   stored.
//!
//! [`MoEBeamSearcher::find_best_experts`] ranks the first-dimension coordinates by their score and keeps the
//! `beam_size` best whose prefix `"ffn.{i}."` holds at least one valid entry (the *initial beam*), then, one
//! dimension at a time, keeps the `beam_size` best `(prefix score + coordinate score, "ffn.{i}.{j}.")`
//! successors that are active, fetching all of them with one DHT `get_many`. Every expert seen on the way
//! (each dictionary entry names one real expert) is a candidate; the result is the `beam_size` candidates
//! with the highest summed score, best first. With `beam_size` at least the number of active prefixes of
//! every level but the last (e.g. `beam_size ≥ grid_size[0]` for a 2-D grid), the search is exact.
//!
//! **Negative caching** (hivemind's `negative_caching=True`, `cache_expiration=300`): a first-dimension
//! prefix the DHT does not know at all, or a deeper prefix that holds no valid entry, gets the record
//! `prefix[-1] = None` stored in the DHT with expiration `now + cache_expiration` (in the background, as
//! hivemind does), so that other peers — hivemind ones included — see it as empty without waiting on
//! stale entries. The searcher also remembers the prefix locally as inactive until the same deadline and
//! does not look it up again before then (hivemind gets the same effect from its node's local copy of the
//! record). The local memory is bounded ([`BeamSearchConfig::negative_cache_capacity`]; the entries closest
//! to expiry are dropped first). Unlike hivemind 1.1.12, whose `_find_best_experts` passes
//! `min(beam_size, num_workers)` as the first dimension's cache expiration, the TTL is always
//! `cache_expiration`.
//!
//! Values read from the DHT are never trusted: an entry that is expired, whose sub-key is not an `int`,
//! whose value is not a `(valid uid, str)` tuple, whose peer id is not base58, or whose uid does not fit
//! the grid is skipped with a debug log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use apiary_dht::{DhtError, DhtHandle, Found, PeerId, get_dht_time};
use apiary_wire::msgpack::Value;
use tokio::time::Instant;

/// A grid coordinate as declared in the DHT (hivemind's `Coordinate`, a Python `int`).
pub type Coordinate = i64;

/// hivemind's `UID_DELIMITER`: separates an expert uid's name from its coordinates.
pub const UID_DELIMITER: char = '.';

/// hivemind's `FLAT_EXPERT`: the sub-key under which a one-dimensional uid `ffn.5` is declared in `"ffn.5."`.
pub const FLAT_EXPERT: Coordinate = -1;

/// Whether `s` is an expert uid by hivemind's `UID_PATTERN` (`^(([^.])+)([.](?:[0]|([1-9]([0-9]*))))+$`):
/// a non-empty name without dots, then one or more `.`-separated coordinates without leading zeros,
/// e.g. `ffn_expert.98.76.54`.
pub fn is_valid_uid(s: &str) -> bool {
    let mut parts = s.split(UID_DELIMITER);
    let name_ok = parts.next().is_some_and(|name| !name.is_empty());
    let mut coords = 0usize;
    for part in parts {
        if !is_valid_coordinate(part) {
            return false;
        }
        coords += 1;
    }
    name_ok && coords > 0
}

/// Whether `s` is an expert uid prefix by hivemind's `PREFIX_PATTERN`
/// (`^(([^.])+)([.](?:[0]|([1-9]([0-9]*))))*[.]$`): a uid-like name with zero or more coordinates and a
/// trailing `.`, e.g. `expert.` or `ffn.45.`.
pub fn is_valid_prefix(s: &str) -> bool {
    let Some(body) = s.strip_suffix(UID_DELIMITER) else {
        return false;
    };
    let mut parts = body.split(UID_DELIMITER);
    parts.next().is_some_and(|name| !name.is_empty()) && parts.all(is_valid_coordinate)
}

/// `0` or `[1-9][0-9]*`, ASCII digits only (Python's `[0-9]`).
fn is_valid_coordinate(part: &str) -> bool {
    let bytes = part.as_bytes();
    match bytes {
        [] => false,
        [b'0'] => true,
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// One expert found in the DHT (hivemind's `ExpertInfo`): its uid and the peer that serves it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertInfo {
    /// The expert's uid, e.g. `ffn.3.7`.
    pub uid: String,
    /// The libp2p peer that declared it.
    pub peer_id: PeerId,
}

/// One prefix of a beam: `(score, prefix, active successors)` in hivemind.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamEntry {
    /// The summed score of the prefix's coordinates.
    pub score: f64,
    /// The prefix, e.g. `ffn.3.` (ends with [`UID_DELIMITER`]).
    pub prefix: String,
    /// The prefix's active next coordinates, each with an example expert that has this prefix.
    pub successors: BTreeMap<Coordinate, ExpertInfo>,
}

/// Beam-search settings, with hivemind 1.1.12's defaults ([`Default`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BeamSearchConfig {
    /// Remember prefixes found empty, in the DHT and locally, for [`cache_expiration`](Self::cache_expiration)
    /// (see the [module docs](self)). Default `true`.
    pub negative_caching: bool,
    /// How long a prefix found empty stays marked inactive (hivemind's `cache_expiration`). Default 300 s.
    pub cache_expiration: Duration,
    /// The most first-dimension prefixes one search looks up at once while it forms its initial beam, best
    /// first (hivemind's `num_workers`). `None` (default): as many as the beam still lacks, so a grid whose
    /// best prefixes are all active is settled in one DHT round.
    pub num_workers: Option<usize>,
    /// The most prefixes remembered locally as inactive; when full, the entries that expire soonest are
    /// forgotten first. `0` keeps no local memory (the DHT records are still stored). Default 65 536.
    pub negative_cache_capacity: usize,
}

impl Default for BeamSearchConfig {
    fn default() -> Self {
        BeamSearchConfig {
            negative_caching: true,
            cache_expiration: Duration::from_secs(300),
            num_workers: None,
            negative_cache_capacity: 65_536,
        }
    }
}

/// Why a beam search could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BeamError {
    /// The uid prefix (after a trailing `.` was added where missing) breaks hivemind's `PREFIX_PATTERN`.
    #[error("expert uid prefix {0:?} is invalid: it must be a name and optional coordinates ending with '.'")]
    InvalidPrefix(String),
    /// The grid has no dimensions, or a dimension of size zero.
    #[error("invalid grid size {0:?}: it needs at least one dimension, none of size zero")]
    InvalidGrid(Vec<usize>),
    /// `beam_size` was zero.
    #[error("beam_size must be positive")]
    ZeroBeamSize,
    /// The scores do not have one row per grid dimension.
    #[error("expected scores for {expected} grid dimensions, got {got}")]
    DimensionMismatch {
        /// The grid's number of dimensions.
        expected: usize,
        /// The number of score rows given.
        got: usize,
    },
    /// A row of scores does not have one score per coordinate of its dimension.
    #[error("dimension {dim} has size {expected}, got {got} scores")]
    ScoreLength {
        /// The dimension.
        dim: usize,
        /// The grid's size along it.
        expected: usize,
        /// The number of scores given.
        got: usize,
    },
    /// A score is NaN.
    #[error("score {index} of dimension {dim} is NaN")]
    NanScore {
        /// The dimension.
        dim: usize,
        /// The coordinate.
        index: usize,
    },
    /// The DHT node failed (e.g. it has shut down).
    #[error(transparent)]
    Dht(#[from] DhtError),
}

/// What a prefix lookup found, after the invalid entries were dropped.
#[derive(Debug, Clone)]
enum Lookup {
    /// No value at all (hivemind's `None`).
    Missing,
    /// A value: the valid entries (possibly none).
    Found(BTreeMap<Coordinate, ExpertInfo>),
}

impl Lookup {
    fn successors(&self) -> Option<&BTreeMap<Coordinate, ExpertInfo>> {
        match self {
            Lookup::Found(s) if !s.is_empty() => Some(s),
            _ => None,
        }
    }
}

/// Prefixes remembered as inactive until a deadline, bounded.
#[derive(Debug)]
struct NegativeCache {
    capacity: usize,
    deadlines: HashMap<String, (Instant, u64)>,
    /// The same entries by `(deadline, insertion number)`, to drop the soonest-expiring first.
    by_deadline: BTreeMap<(Instant, u64), String>,
    next_seq: u64,
}

impl NegativeCache {
    fn new(capacity: usize) -> Self {
        NegativeCache {
            capacity,
            deadlines: HashMap::new(),
            by_deadline: BTreeMap::new(),
            next_seq: 0,
        }
    }

    fn purge(&mut self, now: Instant) {
        while let Some(entry) = self.by_deadline.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let prefix = entry.remove();
            self.deadlines.remove(&prefix);
        }
    }

    /// The time left before `prefix` may be looked up again, if it is remembered as inactive.
    fn remaining(&mut self, prefix: &str, now: Instant) -> Option<Duration> {
        self.purge(now);
        self.deadlines
            .get(prefix)
            .map(|(deadline, _)| deadline.saturating_duration_since(now))
    }

    fn insert(&mut self, prefix: &str, deadline: Instant, now: Instant) {
        if self.capacity == 0 || deadline <= now {
            return;
        }
        self.purge(now);
        if let Some(old) = self.deadlines.remove(prefix) {
            self.by_deadline.remove(&old);
        }
        while self.deadlines.len() >= self.capacity {
            let Some((_, evicted)) = self.by_deadline.pop_first() else {
                break;
            };
            self.deadlines.remove(&evicted);
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.deadlines.insert(prefix.to_owned(), (deadline, seq));
        self.by_deadline.insert((deadline, seq), prefix.to_owned());
    }

    fn len(&mut self, now: Instant) -> usize {
        self.purge(now);
        self.deadlines.len()
    }

    fn clear(&mut self) {
        self.deadlines.clear();
        self.by_deadline.clear();
    }
}

/// Which kind of lookup found a prefix empty: hivemind stores a negative record for a first-dimension
/// prefix only when nothing at all was found, and for a deeper prefix whenever no valid entry was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Initial,
    Successors,
}

/// The search state of one sample.
#[derive(Debug)]
struct Sample<'a> {
    scores: &'a [Vec<f32>],
    /// First-dimension coordinates, best first.
    order: Vec<usize>,
    /// The next coordinate of `order` to consider for the initial beam.
    next: usize,
    beam: Vec<BeamEntry>,
    /// Candidate experts by uid (the first sighting wins, as in hivemind), with their scores.
    candidates: HashMap<String, (f64, ExpertInfo)>,
    /// Whether the search has nothing more to do.
    done: bool,
}

/// hivemind's `MoEBeamSearcher`: finds the best active experts of a grid through a [`DhtHandle`].
///
/// Clones share the DHT node and the local negative cache.
#[derive(Debug, Clone)]
pub struct MoEBeamSearcher {
    dht: DhtHandle,
    uid_prefix: String,
    grid_size: Vec<usize>,
    config: BeamSearchConfig,
    negative: Arc<Mutex<NegativeCache>>,
}

impl MoEBeamSearcher {
    /// A searcher for the experts `{uid_prefix}{i}.{j}…` of a grid of `grid_size` (one size per dimension).
    ///
    /// A missing trailing `.` is added to `uid_prefix` (as hivemind does); the result must be a valid
    /// prefix ([`is_valid_prefix`]), else [`BeamError::InvalidPrefix`]. An empty grid or one with a
    /// zero-sized dimension is [`BeamError::InvalidGrid`].
    pub fn new(
        dht: DhtHandle,
        uid_prefix: &str,
        grid_size: Vec<usize>,
        config: BeamSearchConfig,
    ) -> Result<Self, BeamError> {
        let mut prefix = uid_prefix.to_owned();
        if !prefix.ends_with(UID_DELIMITER) {
            prefix.push(UID_DELIMITER);
            tracing::info!(prefix = %prefix, "the uid prefix must end with '.': added it");
        }
        if !is_valid_prefix(&prefix) {
            return Err(BeamError::InvalidPrefix(prefix));
        }
        if grid_size.is_empty() || grid_size.contains(&0) {
            return Err(BeamError::InvalidGrid(grid_size));
        }
        let negative = Arc::new(Mutex::new(NegativeCache::new(config.negative_cache_capacity)));
        Ok(MoEBeamSearcher {
            dht,
            uid_prefix: prefix,
            grid_size,
            config,
            negative,
        })
    }

    /// The uid prefix searched (ends with `.`).
    pub fn uid_prefix(&self) -> &str {
        &self.uid_prefix
    }

    /// The grid's size along each dimension.
    pub fn grid_size(&self) -> &[usize] {
        &self.grid_size
    }

    /// The settings.
    pub fn config(&self) -> &BeamSearchConfig {
        &self.config
    }

    /// The DHT node searched through.
    pub fn dht(&self) -> &DhtHandle {
        &self.dht
    }

    /// How much longer `prefix` is remembered locally as inactive (not looked up), if it is.
    pub fn negative_cache_ttl(&self, prefix: &str) -> Option<Duration> {
        self.negative_cache().remaining(prefix, Instant::now())
    }

    /// How many prefixes are remembered locally as inactive now.
    pub fn negative_cache_len(&self) -> usize {
        self.negative_cache().len(Instant::now())
    }

    /// Forgets every prefix remembered locally as inactive (the records stored in the DHT stay until they
    /// expire).
    pub fn clear_negative_cache(&self) {
        self.negative_cache().clear();
    }

    fn negative_cache(&self) -> std::sync::MutexGuard<'_, NegativeCache> {
        self.negative.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// hivemind's `get_initial_beam`: tries the first-dimension coordinates best first (by `scores`, one
    /// per coordinate) and returns the first `beam_size` whose prefix `{uid_prefix}{i}.` has at least one
    /// valid entry, best first, each with its active successors.
    pub async fn get_initial_beam(
        &self,
        scores: &[f32],
        beam_size: usize,
    ) -> Result<Vec<BeamEntry>, BeamError> {
        if beam_size == 0 {
            return Err(BeamError::ZeroBeamSize);
        }
        check_row(0, scores)?;
        let grid = [scores.to_vec()];
        let mut samples = vec![Sample::new(&grid)];
        let mut known = HashMap::new();
        self.initial_beams(&mut samples, beam_size, &mut known).await?;
        Ok(samples.pop().map(|s| s.beam).unwrap_or_default())
    }

    /// hivemind's `get_active_successors`: for each prefix, its valid entries (next coordinate → an expert
    /// with that prefix), empty for a prefix that is missing, holds no valid entry, or is remembered as
    /// inactive. With `grid_size`, only coordinates in `0..grid_size` are kept. All prefixes are fetched
    /// with one DHT `get_many`; each must be valid ([`is_valid_prefix`]).
    pub async fn get_active_successors(
        &self,
        prefixes: &[String],
        grid_size: Option<usize>,
    ) -> Result<HashMap<String, BTreeMap<Coordinate, ExpertInfo>>, BeamError> {
        if let Some(bad) = prefixes.iter().find(|p| !is_valid_prefix(p)) {
            return Err(BeamError::InvalidPrefix(bad.clone()));
        }
        let mut known = HashMap::new();
        self.lookup(prefixes.to_vec(), Level::Successors, grid_size, &mut known)
            .await?;
        Ok(prefixes
            .iter()
            .map(|p| {
                let successors = match known.get(p) {
                    Some(Lookup::Found(s)) => s.clone(),
                    _ => BTreeMap::new(),
                };
                (p.clone(), successors)
            })
            .collect())
    }

    /// hivemind's `find_best_experts`: up to `beam_size` active experts with the highest summed scores,
    /// best first. `grid_scores` has one row per grid dimension, with one score per coordinate.
    pub async fn find_best_experts(
        &self,
        grid_scores: &[Vec<f32>],
        beam_size: usize,
    ) -> Result<Vec<ExpertInfo>, BeamError> {
        let mut out = self.search(&[grid_scores], beam_size).await?;
        Ok(out.pop().unwrap_or_default())
    }

    /// hivemind's `batch_find_best_experts`: [`find_best_experts`](Self::find_best_experts) for each sample
    /// (`batch_grid_scores[s]` holds sample `s`'s rows, one per grid dimension). The samples are searched
    /// together: each beam step fetches the prefixes of all samples with one DHT `get_many`, and a prefix
    /// wanted by several samples is fetched once.
    pub async fn batch_find_best_experts(
        &self,
        batch_grid_scores: &[Vec<Vec<f32>>],
        beam_size: usize,
    ) -> Result<Vec<Vec<ExpertInfo>>, BeamError> {
        let batch: Vec<&[Vec<f32>]> = batch_grid_scores.iter().map(Vec::as_slice).collect();
        self.search(&batch, beam_size).await
    }

    /// The beam search for a batch of samples.
    async fn search(
        &self,
        batch: &[&[Vec<f32>]],
        beam_size: usize,
    ) -> Result<Vec<Vec<ExpertInfo>>, BeamError> {
        if beam_size == 0 {
            return Err(BeamError::ZeroBeamSize);
        }
        for grid_scores in batch {
            self.check_scores(grid_scores)?;
        }
        let dims = self.grid_size.len();
        let mut samples: Vec<Sample<'_>> = batch.iter().map(|g| Sample::new(g)).collect();
        // every prefix looked up during this search, shared by all samples
        let mut known: HashMap<String, Lookup> = HashMap::new();
        self.initial_beams(&mut samples, beam_size, &mut known).await?;
        for sample in &mut samples {
            sample.done = sample.beam.is_empty();
        }

        for dim in 1..dims.saturating_sub(1) {
            let mut wanted: Vec<Vec<(f64, String)>> = Vec::with_capacity(samples.len());
            let mut fetch: Vec<String> = Vec::new();
            let mut seen: HashSet<String> = HashSet::new();
            for sample in &mut samples {
                if sample.done {
                    wanted.push(Vec::new());
                    continue;
                }
                sample.collect_candidates(&self.uid_prefix);
                let pairs = sample.best_active_pairs(dim, beam_size);
                for (_, prefix) in &pairs {
                    if !known.contains_key(prefix) && seen.insert(prefix.clone()) {
                        fetch.push(prefix.clone());
                    }
                }
                wanted.push(pairs);
            }
            self.lookup(fetch, Level::Successors, None, &mut known).await?;
            for (sample, pairs) in samples.iter_mut().zip(wanted) {
                if sample.done {
                    continue;
                }
                sample.beam = pairs
                    .into_iter()
                    .filter_map(|(score, prefix)| {
                        let successors = known.get(&prefix)?.successors()?.clone();
                        Some(BeamEntry {
                            score,
                            prefix,
                            successors,
                        })
                    })
                    .collect();
                if sample.beam.is_empty() {
                    tracing::warn!(
                        dim,
                        "beam search had to terminate prematurely because of an empty beam"
                    );
                    sample.done = true;
                }
            }
        }

        Ok(samples
            .into_iter()
            .map(|mut sample| {
                sample.collect_candidates(&self.uid_prefix);
                sample.best(beam_size)
            })
            .collect())
    }

    fn check_scores(&self, grid_scores: &[Vec<f32>]) -> Result<(), BeamError> {
        if grid_scores.len() != self.grid_size.len() {
            return Err(BeamError::DimensionMismatch {
                expected: self.grid_size.len(),
                got: grid_scores.len(),
            });
        }
        for (dim, (row, &size)) in grid_scores.iter().zip(&self.grid_size).enumerate() {
            if row.len() != size {
                return Err(BeamError::ScoreLength {
                    dim,
                    expected: size,
                    got: row.len(),
                });
            }
            check_row(dim, row)?;
        }
        Ok(())
    }

    /// hivemind's `_get_initial_beam`, for every sample at once: each round, every sample whose beam is not
    /// full yet asks for its next best unresolved first-dimension prefixes, and all of them are fetched with
    /// one `get_many`. A sample's beam is the first `beam_size` active prefixes in its best-first order,
    /// whatever the rounds.
    async fn initial_beams(
        &self,
        samples: &mut [Sample<'_>],
        beam_size: usize,
        known: &mut HashMap<String, Lookup>,
    ) -> Result<(), BeamError> {
        loop {
            let mut fetch: Vec<String> = Vec::new();
            let mut seen: HashSet<String> = HashSet::new();
            for sample in samples.iter_mut() {
                // consume what is resolved, in order
                while sample.beam.len() < beam_size && sample.next < sample.order.len() {
                    let index = sample.order[sample.next];
                    let prefix = self.child_prefix(&self.uid_prefix, index);
                    if !known.contains_key(&prefix) {
                        if !self.is_negative(&prefix) {
                            break;
                        }
                        known.insert(prefix.clone(), Lookup::Found(BTreeMap::new()));
                    }
                    let Some(lookup) = known.get(&prefix) else {
                        break;
                    };
                    if let Some(successors) = lookup.successors() {
                        let score = sample
                            .scores
                            .first()
                            .and_then(|row| row.get(index))
                            .map_or(f64::NAN, |&s| f64::from(s));
                        sample.beam.push(BeamEntry {
                            score,
                            prefix,
                            successors: successors.clone(),
                        });
                    }
                    sample.next += 1;
                }
                if sample.beam.len() >= beam_size || sample.next >= sample.order.len() {
                    continue;
                }
                // ask for the next best unresolved prefixes
                let need = beam_size - sample.beam.len();
                let window = self.config.num_workers.map_or(need, |w| need.min(w.max(1)));
                let mut asked = 0;
                for &index in &sample.order[sample.next..] {
                    if asked >= window {
                        break;
                    }
                    let prefix = self.child_prefix(&self.uid_prefix, index);
                    if known.contains_key(&prefix) || self.is_negative(&prefix) {
                        continue;
                    }
                    if seen.insert(prefix.clone()) {
                        fetch.push(prefix);
                    }
                    asked += 1;
                }
            }
            if fetch.is_empty() {
                return Ok(());
            }
            self.lookup(fetch, Level::Initial, None, known).await?;
        }
    }

    fn child_prefix(&self, prefix: &str, coordinate: usize) -> String {
        format!("{prefix}{coordinate}{UID_DELIMITER}")
    }

    fn is_negative(&self, prefix: &str) -> bool {
        self.config.negative_caching && self.negative_cache().remaining(prefix, Instant::now()).is_some()
    }

    /// Fetches `prefixes` (with one `get_many`) into `known`; prefixes remembered as inactive resolve to
    /// empty without a lookup. Prefixes found empty are negatively cached as hivemind does at `level`.
    async fn lookup(
        &self,
        prefixes: Vec<String>,
        level: Level,
        grid_size: Option<usize>,
        known: &mut HashMap<String, Lookup>,
    ) -> Result<(), BeamError> {
        let mut fetch = Vec::with_capacity(prefixes.len());
        for prefix in prefixes {
            if known.contains_key(&prefix) {
                continue;
            }
            if self.is_negative(&prefix) {
                known.insert(prefix, Lookup::Found(BTreeMap::new()));
            } else {
                fetch.push(prefix);
            }
        }
        if fetch.is_empty() {
            return Ok(());
        }
        let mut answers = self.get_many(&fetch).await?.into_iter();
        let now = get_dht_time();
        for prefix in fetch {
            // one answer per key; a missing answer counts as "not found", so every prefix is resolved
            let lookup = match &answers.next().flatten() {
                None => Lookup::Missing,
                Some(found) => Lookup::Found(select_valid_entries(&prefix, found, grid_size, now)),
            };
            let empty = match level {
                Level::Initial => matches!(lookup, Lookup::Missing),
                Level::Successors => lookup.successors().is_none(),
            };
            if empty && self.config.negative_caching {
                self.cache_negative(&prefix);
            }
            known.insert(prefix, lookup);
        }
        Ok(())
    }

    /// `get_many`, robust to undecodable values: when the batch fails to decode, each key is fetched on its
    /// own and the undecodable ones count as missing.
    async fn get_many(&self, prefixes: &[String]) -> Result<Vec<Option<Found>>, BeamError> {
        let keys: Vec<Value> = prefixes.iter().map(|p| Value::str(p.as_str())).collect();
        match self.dht.get_many(keys.clone(), false).await {
            Ok(found) => Ok(found),
            Err(DhtError::Decode(reason)) => {
                tracing::debug!(%reason, "a prefix value could not be decoded; fetching the prefixes one by one");
                let mut out = Vec::with_capacity(keys.len());
                for (prefix, key) in prefixes.iter().zip(keys) {
                    match self.dht.get(key, false).await {
                        Ok(found) => out.push(found),
                        Err(DhtError::Decode(reason)) => {
                            tracing::debug!(%prefix, %reason, "skipping an undecodable prefix value");
                            out.push(None);
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(out)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Marks `prefix` inactive locally and stores hivemind's negative record `prefix[-1] = None` in the DHT,
    /// in the background, both until `now + cache_expiration`.
    fn cache_negative(&self, prefix: &str) {
        let ttl = self.config.cache_expiration;
        let now = Instant::now();
        let Some(deadline) = now.checked_add(ttl) else {
            return;
        };
        self.negative_cache().insert(prefix, deadline, now);
        tracing::debug!(prefix, ?ttl, "DHT negative caching: storing a 'no prefix' entry");
        let dht = self.dht.clone();
        let key = Value::str(prefix);
        let expiration = get_dht_time() + ttl.as_secs_f64();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::debug!(
                prefix,
                "no Tokio runtime: the negative-cache record is not stored in the DHT"
            );
            return;
        };
        runtime.spawn(async move {
            if let Err(e) = dht
                .store(key, Value::Nil, expiration, Some(Value::from(FLAT_EXPERT)))
                .await
            {
                tracing::debug!(error = %e, "could not store a negative-cache record");
            }
        });
    }
}

impl<'a> Sample<'a> {
    fn new(scores: &'a [Vec<f32>]) -> Self {
        let first = scores.first().map(Vec::as_slice).unwrap_or_default();
        let mut order: Vec<usize> = (0..first.len()).collect();
        // best first; among equal scores the higher index first, as hivemind's `sorted(...)` + `pop()`
        order.sort_by(|&a, &b| first[b].total_cmp(&first[a]).then(b.cmp(&a)));
        Sample {
            scores,
            order,
            next: 0,
            beam: Vec::new(),
            candidates: HashMap::new(),
            done: false,
        }
    }

    /// hivemind's `_iterate_matching_experts` into the candidate set (the first sighting of a uid wins).
    fn collect_candidates(&mut self, uid_prefix: &str) {
        for entry in &self.beam {
            for (coord, info) in &entry.successors {
                if self.candidates.contains_key(&info.uid) {
                    continue;
                }
                match expert_score(uid_prefix, &info.uid, self.scores) {
                    Some(score) => {
                        self.candidates.insert(info.uid.clone(), (score, info.clone()));
                    }
                    None => tracing::debug!(
                        prefix = %entry.prefix,
                        coord,
                        uid = %info.uid,
                        "skipping an expert whose uid does not fit the grid"
                    ),
                }
            }
        }
    }

    /// The `beam_size` best `(prefix score + next coordinate's score, next prefix)` over the beam,
    /// best first (hivemind's `heapq.nlargest` over `(score, prefix)` tuples).
    fn best_active_pairs(&self, dim: usize, beam_size: usize) -> Vec<(f64, String)> {
        let Some(dim_scores) = self.scores.get(dim) else {
            return Vec::new();
        };
        let mut pairs: Vec<(f64, String)> = self
            .beam
            .iter()
            .flat_map(|entry| {
                entry.successors.keys().filter_map(move |&coord| {
                    let index = usize::try_from(coord).ok()?;
                    let score = *dim_scores.get(index)?;
                    Some((
                        entry.score + f64::from(score),
                        format!("{}{index}{UID_DELIMITER}", entry.prefix),
                    ))
                })
            })
            .collect();
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
        pairs.truncate(beam_size);
        pairs
    }

    /// The `beam_size` best candidates, best first (ties: the greater uid first, as Python's
    /// `sorted(..., reverse=True)` over `(score, ExpertInfo)`).
    fn best(self, beam_size: usize) -> Vec<ExpertInfo> {
        let mut all: Vec<(f64, ExpertInfo)> = self.candidates.into_values().collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
        all.truncate(beam_size);
        all.into_iter().map(|(_, info)| info).collect()
    }
}

fn check_row(dim: usize, row: &[f32]) -> Result<(), BeamError> {
    match row.iter().position(|s| s.is_nan()) {
        Some(index) => Err(BeamError::NanScore { dim, index }),
        None => Ok(()),
    }
}

/// The summed score of `uid` (`{uid_prefix}{c0}.{c1}…`, one coordinate per dimension, each in range), or
/// `None` when the uid does not fit the grid.
fn expert_score(uid_prefix: &str, uid: &str, grid_scores: &[Vec<f32>]) -> Option<f64> {
    let coords = uid.strip_prefix(uid_prefix)?;
    let mut total = 0.0f64;
    let mut count = 0usize;
    for part in coords.split(UID_DELIMITER) {
        let row = grid_scores.get(count)?;
        if !is_valid_coordinate(part) {
            return None;
        }
        let index: usize = part.parse().ok()?;
        total += f64::from(*row.get(index)?);
        count += 1;
    }
    (count == grid_scores.len()).then_some(total)
}

/// hivemind's `_select_valid_entries`: the live entries of a prefix dictionary whose sub-key is an `int`
/// (in `0..grid_size` if given) and whose value is a `(valid uid, base58 peer id)` tuple.
fn select_valid_entries(
    prefix: &str,
    found: &Found,
    grid_size: Option<usize>,
    now: f64,
) -> BTreeMap<Coordinate, ExpertInfo> {
    let mut out = BTreeMap::new();
    let Found::Dictionary { entries, .. } = found else {
        tracing::debug!(prefix, "skipping a prefix whose value is not a dictionary");
        return out;
    };
    for (subkey, value, expiration) in entries {
        if *expiration < now {
            continue;
        }
        let Some(coord) = (match subkey {
            Value::Int(i) => i.as_i64(),
            _ => None,
        }) else {
            tracing::debug!(prefix, subkey = ?subkey, "skipping an entry whose sub-key is not an int coordinate");
            continue;
        };
        if let Some(size) = grid_size
            && !usize::try_from(coord).is_ok_and(|c| c < size)
        {
            continue;
        }
        match parse_match(value) {
            Some(info) => {
                out.insert(coord, info);
            }
            None => {
                // the negative-cache record `prefix[-1] = None` lands here too
                tracing::debug!(prefix, coord, value = ?value, "skipping an entry that is not (uid, peer id)");
            }
        }
    }
    out
}

/// `(uid, peer_id_base58)` → [`ExpertInfo`], if the uid is valid and the peer id parses.
fn parse_match(value: &Value) -> Option<ExpertInfo> {
    let Value::Tuple(items) = value else {
        return None;
    };
    let [uid, peer] = items.as_slice() else {
        return None;
    };
    let uid = uid.as_str().filter(|u| is_valid_uid(u))?;
    let peer_id = PeerId::from_str(peer.as_str()?).ok()?;
    Some(ExpertInfo {
        uid: uid.to_owned(),
        peer_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_and_prefix_patterns() {
        for uid in ["ffn.0", "ffn_expert.98.76.54", "a.10.0", "x y.1"] {
            assert!(is_valid_uid(uid), "{uid}");
        }
        for bad in [
            "ffn", "ffn.", ".1", "ffn.01", "ffn.1.", "ffn..1", "ffn.-1", "ffn.a", "ffn.١",
        ] {
            assert!(!is_valid_uid(bad), "{bad}");
        }
        for prefix in ["ffn.", "ffn.45.", "ffn.0.1."] {
            assert!(is_valid_prefix(prefix), "{prefix}");
        }
        for bad in ["ffn", ".", "ffn..", "ffn.01.", "ffn.1", "ffn.x."] {
            assert!(!is_valid_prefix(bad), "{bad}");
        }
    }

    #[test]
    fn scores_from_uids() {
        let scores = vec![vec![1.0, 2.0], vec![10.0, 20.0, 30.0]];
        assert_eq!(expert_score("ffn.", "ffn.1.2", &scores), Some(32.0));
        assert_eq!(expert_score("ffn.", "ffn.2.0", &scores), None);
        assert_eq!(expert_score("ffn.", "ffn.1", &scores), None);
        assert_eq!(expert_score("ffn.", "ffn.1.2.0", &scores), None);
        assert_eq!(expert_score("ffn.", "other.1.2", &scores), None);
        assert_eq!(expert_score("ffn.3.", "ffn.3.1.2", &scores), Some(32.0));
    }

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[test]
    fn malformed_entries_are_skipped() {
        let p = peer();
        let good = Value::tuple([Value::str("ffn.1.2"), Value::str(p.to_base58())]);
        let later = get_dht_time() + 100.0;
        let found = Found::Dictionary {
            entries: vec![
                (Value::from(2), good.clone(), later),
                (Value::from(3), good.clone(), 1.0), // expired
                (Value::str("4"), good.clone(), later),
                (Value::from(true), good.clone(), later),
                (Value::from(-1), Value::Nil, later),
                (
                    Value::from(5),
                    Value::list([Value::str("ffn.1.5"), Value::str(p.to_base58())]),
                    later,
                ),
                (
                    Value::from(6),
                    Value::tuple([Value::str("ffn.01.6"), Value::str(p.to_base58())]),
                    later,
                ),
                (
                    Value::from(7),
                    Value::tuple([Value::str("ffn.1.7"), Value::str("not base58!")]),
                    later,
                ),
                (Value::from(8), Value::tuple([Value::str("ffn.1.8")]), later),
                (
                    Value::from(9),
                    Value::tuple([Value::str("ffn.1.9"), Value::from(1)]),
                    later,
                ),
            ],
            expiration: later,
        };
        let valid = select_valid_entries("ffn.1.", &found, None, get_dht_time());
        assert_eq!(valid.len(), 1);
        assert_eq!(valid[&2].uid, "ffn.1.2");
        assert_eq!(valid[&2].peer_id, p);
        assert!(select_valid_entries("ffn.1.", &found, Some(2), get_dht_time()).is_empty());
        let regular = Found::Regular {
            value: good,
            expiration: later,
        };
        assert!(select_valid_entries("ffn.1.", &regular, None, get_dht_time()).is_empty());
    }

    #[test]
    fn negative_cache_is_bounded_and_expires() {
        let mut cache = NegativeCache::new(2);
        let now = Instant::now();
        cache.insert("a.", now + Duration::from_secs(10), now);
        cache.insert("b.", now + Duration::from_secs(5), now);
        cache.insert("c.", now + Duration::from_secs(20), now);
        // full: the soonest-expiring ("b.") was dropped
        assert_eq!(cache.len(now), 2);
        assert!(cache.remaining("b.", now).is_none());
        assert_eq!(cache.remaining("a.", now), Some(Duration::from_secs(10)));
        let later = now + Duration::from_secs(10);
        assert!(cache.remaining("a.", later).is_none());
        assert_eq!(cache.remaining("c.", later), Some(Duration::from_secs(10)));
        // re-inserting replaces the deadline
        cache.insert("c.", later + Duration::from_secs(1), later);
        assert_eq!(cache.remaining("c.", later), Some(Duration::from_secs(1)));
        assert_eq!(cache.len(later), 1);
        let mut none = NegativeCache::new(0);
        none.insert("a.", now + Duration::from_secs(1), now);
        assert_eq!(none.len(now), 0);
    }

    #[test]
    fn pairs_and_ties_follow_hivemind() {
        let scores = vec![vec![0.5, 0.5, 0.1], vec![1.0, 3.0], vec![0.0]];
        let sample = Sample::new(&scores);
        assert_eq!(sample.order, vec![1, 0, 2]);
        let mut sample = sample;
        let p = peer();
        let info = |uid: &str| ExpertInfo {
            uid: uid.into(),
            peer_id: p,
        };
        sample.beam = vec![
            BeamEntry {
                score: 0.5,
                prefix: "ffn.1.".into(),
                successors: BTreeMap::from([
                    (0, info("ffn.1.0.0")),
                    (1, info("ffn.1.1.0")),
                    (7, info("ffn.1.7.0")),
                ]),
            },
            BeamEntry {
                score: 0.1,
                prefix: "ffn.2.".into(),
                successors: BTreeMap::from([(1, info("ffn.2.1.0")), (-1, info("ffn.2"))]),
            },
        ];
        let pairs = sample.best_active_pairs(1, 2);
        assert_eq!(pairs, vec![(3.5, "ffn.1.1.".into()), (3.1, "ffn.2.1.".into())]);
        sample.collect_candidates("ffn.");
        // "ffn.1.7.0" is out of range and "ffn.2" has too few coordinates
        let best = sample.best(10);
        let uids: Vec<&str> = best.iter().map(|i| i.uid.as_str()).collect();
        assert_eq!(uids, vec!["ffn.1.1.0", "ffn.2.1.0", "ffn.1.0.0"]);
    }
}
