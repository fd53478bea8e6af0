//! Helpers for the beam-search tests: Apiary DHT nodes on 127.0.0.1 (each with its own p2p host), expert
//! declarations as hivemind's `declare_experts` writes them, random scores and brute-force references.

#![allow(clippy::unwrap_used, dead_code)]

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::Duration;

use apiary_dht::{Dht, DhtConfig, DhtHandle, PeerId, StoreEntry, get_dht_time};
use apiary_expert::server::declarations;
use apiary_moe::beam::ExpertInfo;
use apiary_p2p::{Host, Multiaddr, P2pConfig, P2pHandle};

/// One test node.
pub struct Node {
    pub dht: DhtHandle,
    pub p2p: P2pHandle,
    pub addr: Multiaddr,
}

impl Node {
    pub fn peer_id(&self) -> PeerId {
        self.p2p.local_peer_id()
    }

    pub async fn stop(&self) {
        self.dht.shutdown().await;
        self.p2p.shutdown().await;
    }
}

pub fn test_config() -> DhtConfig {
    let mut config = DhtConfig::default();
    config.wait_timeout = Duration::from_secs(2);
    config
}

pub async fn node(initial: Vec<Multiaddr>) -> Node {
    let (p2p, _task) = Host::spawn(P2pConfig::default()).unwrap();
    let addr = p2p.listen("/ip4/127.0.0.1/tcp/0".parse().unwrap()).await.unwrap();
    let addr = addr.with_p2p(p2p.local_peer_id()).unwrap();
    let dht = Dht::spawn(p2p.clone(), test_config(), initial).await.unwrap();
    Node { dht, p2p, addr }
}

/// `n` nodes, each bootstrapped from all earlier ones.
pub async fn swarm(n: usize) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::with_capacity(n);
    for _ in 0..n {
        let initial = nodes.iter().map(|n| n.addr.clone()).collect();
        nodes.push(node(initial).await);
    }
    nodes
}

pub async fn stop_all(nodes: &[Node]) {
    for n in nodes {
        n.stop().await;
    }
}

/// Declares `uids` as served by `server` until `now + ttl`, as hivemind's `declare_experts` (one
/// `store_many`); asserts every record was stored.
///
/// Like hivemind's `data_to_store` dict, a `(key, subkey)` that several uids share (`"ffn.1."[2]` for
/// both `ffn.1.2.0` and `ffn.1.2.1`) is stored once, with the last uid.
pub async fn declare(server: &Node, uids: &[String], ttl: f64) {
    let mut entries: Vec<StoreEntry> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    for e in declarations(uids, &server.peer_id().to_base58(), get_dht_time() + ttl) {
        match at.entry(format!("{:?}/{:?}", e.key, e.subkey)) {
            Entry::Occupied(i) => entries[*i.get()] = e,
            Entry::Vacant(v) => {
                v.insert(entries.len());
                entries.push(e);
            }
        }
    }
    let n = entries.len();
    let ok = server.dht.store_many(entries, false).await.unwrap();
    assert_eq!(
        ok.iter().filter(|o| **o).count(),
        n,
        "every declaration is stored"
    );
}

/// Every uid `{prefix}{i}.{j}…` of a grid.
pub fn grid_uids(prefix: &str, grid: &[usize]) -> Vec<String> {
    let mut out = vec![prefix.trim_end_matches('.').to_owned()];
    for &size in grid {
        out = out
            .into_iter()
            .flat_map(|p| (0..size).map(move |i| format!("{p}.{i}")))
            .collect();
    }
    out
}

/// A tiny deterministic PRNG (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    pub fn score(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn grid_scores(&mut self, grid: &[usize]) -> Vec<Vec<f32>> {
        grid.iter()
            .map(|&n| (0..n).map(|_| self.score()).collect())
            .collect()
    }
}

/// The coordinates of `uid` after `prefix`.
pub fn coords(prefix: &str, uid: &str) -> Vec<usize> {
    uid.strip_prefix(prefix)
        .unwrap()
        .split('.')
        .map(|c| c.parse().unwrap())
        .collect()
}

pub fn score_of(prefix: &str, uid: &str, scores: &[Vec<f32>]) -> f64 {
    coords(prefix, uid)
        .iter()
        .enumerate()
        .map(|(d, &c)| f64::from(scores[d][c]))
        .sum()
}

/// The `k` declared experts with the highest summed scores, best first (ties: greater uid first).
pub fn brute_force(prefix: &str, declared: &[ExpertInfo], scores: &[Vec<f32>], k: usize) -> Vec<ExpertInfo> {
    let mut all: Vec<(f64, ExpertInfo)> = declared
        .iter()
        .map(|e| (score_of(prefix, &e.uid, scores), e.clone()))
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    all.into_iter().take(k).map(|(_, e)| e).collect()
}

/// What hivemind's beam search returns on a 2-D grid: the `k` best active first coordinates (by their
/// own score, ties: higher index first), then the `k` best experts under them.
pub fn hivemind_2d(prefix: &str, declared: &[ExpertInfo], scores: &[Vec<f32>], k: usize) -> Vec<ExpertInfo> {
    let mut rows: Vec<usize> = declared.iter().map(|e| coords(prefix, &e.uid)[0]).collect();
    rows.sort_unstable();
    rows.dedup();
    rows.sort_by(|&a, &b| scores[0][b].total_cmp(&scores[0][a]).then(b.cmp(&a)));
    rows.truncate(k);
    let under: Vec<ExpertInfo> = declared
        .iter()
        .filter(|e| rows.contains(&coords(prefix, &e.uid)[0]))
        .cloned()
        .collect();
    brute_force(prefix, &under, scores, k)
}

pub fn uids(experts: &[ExpertInfo]) -> Vec<&str> {
    experts.iter().map(|e| e.uid.as_str()).collect()
}

/// Polls `check` until it holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
