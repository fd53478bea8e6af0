//! Helpers for the catalog's swarm tests: Apiary nodes on 127.0.0.1 (a libp2p host and a DHT node with
//! the catalog's record validator), waiting for a condition with a deadline, a recorded-looking machine,
//! signed demo manifests, and direct expert calls.

#![allow(clippy::unwrap_used, dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use apiary_catalog::bundled::{LOCAL_DEMO_ID, local_demo};
use apiary_catalog::swarm::{DhtCatalog, Listing, fetch};
use apiary_catalog::{MachineProfile, Manifest, SignedManifest, fingerprint};
use apiary_dht::validation::CompositeValidator;
use apiary_dht::{Dht, DhtConfig, DhtHandle};
use apiary_expert::server::ExpertServer;
use apiary_expert::{BackendConfig, RuntimeStats};
use apiary_moe::beam::{BeamSearchConfig, ExpertInfo, MoEBeamSearcher};
use apiary_moe::transport::{P2pTransport, TransportConfig};
use apiary_p2p::{Host, Multiaddr, P2pConfig, P2pHandle};
use apiary_wire::signature::RsaPrivateKey;

/// How long any one condition may take to show up across the swarm. Generous: CI runs these tests in
/// parallel on two cores.
pub const PATIENCE: Duration = Duration::from_secs(25);

/// The time now, unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Polls `probe` every 100 ms until it returns `Ok`, for at most `timeout`; panics with the last `Err`
/// (what was seen instead) when time runs out.
pub async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) => assert!(
                start.elapsed() < timeout,
                "timed out after {:.1?} waiting for {what}; last seen: {last}",
                start.elapsed()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An Apiary node on 127.0.0.1: a p2p host and a DHT server node running `validator`.
#[derive(Debug)]
pub struct Node {
    pub p2p: P2pHandle,
    pub dht: DhtHandle,
    /// The full `/p2p/` address.
    pub addr: Multiaddr,
}

impl Node {
    /// A node joining the DHT through `bootstrap` (none: the first node of a swarm).
    pub async fn spawn(bootstrap: &[Multiaddr], validator: CompositeValidator) -> Node {
        let (p2p, _task) = Host::spawn(P2pConfig::default()).unwrap();
        let addr = p2p.listen("/ip4/127.0.0.1/tcp/0".parse().unwrap()).await.unwrap();
        let addr = addr.with_p2p(p2p.local_peer_id()).unwrap();
        let dht = Dht::spawn_with_validator(p2p.clone(), DhtConfig::default(), bootstrap.to_vec(), validator)
            .await
            .unwrap();
        Node { p2p, dht, addr }
    }

    /// The peer id as rosters name it.
    pub fn peer(&self) -> String {
        self.p2p.local_peer_id().to_base58()
    }

    /// An expert server with no experts, serving the expert RPCs on this node's host.
    pub fn expert_server(&self) -> Arc<ExpertServer> {
        let server = ExpertServer::empty();
        server.register(&self.p2p).unwrap();
        server
    }

    /// A transport calling experts from this node's host.
    pub fn transport(&self) -> P2pTransport {
        P2pTransport::new(
            self.p2p.clone(),
            TransportConfig {
                info_timeout: Duration::from_secs(20),
                forward_timeout: Duration::from_secs(30),
                backward_timeout: Duration::from_secs(30),
            },
        )
    }

    pub async fn stop(&self) {
        self.dht.shutdown().await;
        self.p2p.shutdown().await;
    }
}

/// A mid-range laptop: 8 GiB, 4 GiB of it available, no GPU. Every experiment of these tests fits it;
/// the volunteers' own limits (`max_experts`) decide how many experts each hosts.
pub fn machine() -> MachineProfile {
    MachineProfile {
        name: "test laptop".into(),
        cpu_cores: 4,
        ram_total_mb: 8192,
        ram_available_mb: 4096,
        disk_free_mb: 50_000,
        bandwidth_mbps: Some(100),
        gpus: Vec::new(),
    }
}

/// The local demo experiment published by `key`: `layers` MoE layers of `grid` `ffn` experts of width
/// `hidden`, created now, signed.
pub fn demo(key: &RsaPrivateKey, layers: usize, grid: &[usize], hidden: usize) -> (Manifest, SignedManifest) {
    let manifest = local_demo(&key.public_key(), unix_now(), layers, grid, hidden).unwrap();
    let signed = SignedManifest::sign(manifest.clone(), key).unwrap();
    (manifest, signed)
}

/// `manifest` with another id and summary, signed by `key` (whose public key becomes the publisher's).
pub fn variant(manifest: &Manifest, key: &RsaPrivateKey, id: &str, summary: &str) -> SignedManifest {
    let mut m = manifest.clone();
    m.id = id.into();
    m.summary = summary.into();
    m.publisher.public_key = key.public_key().to_openssh();
    SignedManifest::sign(m, key).unwrap()
}

/// The catalog as `dht` reads it now.
pub async fn read(dht: &DhtHandle) -> Result<DhtCatalog, String> {
    fetch(dht, unix_now())
        .await
        .map_err(|e| format!("fetch failed: {e}"))
}

/// The local demo's listing by the publisher with fingerprint `fp`, if listed.
pub fn demo_listing<'a>(catalog: &'a DhtCatalog, fp: &str) -> Option<&'a Listing> {
    catalog.listings.iter().find(|l| {
        l.manifest().id == LOCAL_DEMO_ID && l.manifest().publisher_key().is_ok_and(|k| fingerprint(&k) == fp)
    })
}

/// A short account of a catalog for failure messages.
pub fn describe(catalog: &DhtCatalog) -> String {
    let listings: Vec<String> = catalog
        .listings
        .iter()
        .map(|l| {
            format!(
                "{} by {} ({} rosters, status {:?})",
                l.manifest().id,
                l.manifest()
                    .publisher_key()
                    .map(|k| fingerprint(&k))
                    .unwrap_or_default(),
                l.rosters.len(),
                l.status.as_ref().map(|s| (s.volunteers, s.experts_covered)),
            )
        })
        .collect();
    format!("listings {listings:?}, refused {:?}", catalog.refused)
}

/// `(forward rows, backward rows)` over all experts of a runtime.
pub fn rows(stats: &RuntimeStats) -> (u64, u64) {
    stats
        .experts
        .iter()
        .fold((0, 0), |(f, b), e| (f + e.forward_rows, b + e.backward_rows))
}

/// The backend settings a manifest's experts train with (as [`apiary_catalog::Hosting`] builds them).
pub fn backend_config(manifest: &Manifest) -> BackendConfig {
    let spec = &manifest.expert;
    BackendConfig {
        optimizer: spec.optimizer.to_config().unwrap(),
        schedule: spec.schedule.to_config().unwrap(),
        clip_grad_norm: spec.clip_grad_norm,
    }
}

/// Waits until a beam search from `dht` over `prefix`/`grid` finds `want` experts (a searcher without
/// negative caching, so early misses are not remembered); returns them sorted by uid.
pub async fn wait_for_experts(dht: &DhtHandle, prefix: &str, grid: &[usize], want: usize) -> Vec<ExpertInfo> {
    let mut config = BeamSearchConfig::default();
    config.negative_caching = false;
    let search = MoEBeamSearcher::new(dht.clone(), prefix, grid.to_vec(), config).unwrap();
    let scores: Vec<Vec<f32>> = grid.iter().map(|&n| vec![0.0; n]).collect();
    let total: usize = grid.iter().product();
    wait_for(&format!("{want} experts under {prefix}"), PATIENCE, async || {
        let mut found = search
            .find_best_experts(&scores, total)
            .await
            .map_err(|e| e.to_string())?;
        found.sort();
        if found.len() >= want {
            Ok(found)
        } else {
            Err(format!("{} found", found.len()))
        }
    })
    .await
}
