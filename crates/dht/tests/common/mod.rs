//! Helpers: Apiary DHT nodes on 127.0.0.1, each with its own p2p host.

#![allow(clippy::unwrap_used, dead_code)]

use std::time::Duration;

use apiary_dht::validation::CompositeValidator;
use apiary_dht::{Dht, DhtConfig, DhtHandle, get_dht_time};
use apiary_p2p::{Host, Multiaddr, P2pConfig, P2pHandle};
use rand::seq::SliceRandom;

/// One test node.
pub struct Node {
    pub dht: DhtHandle,
    pub p2p: P2pHandle,
    pub addr: Multiaddr,
}

impl Node {
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

pub async fn host() -> (P2pHandle, Multiaddr) {
    let (p2p, _task) = Host::spawn(P2pConfig::default()).unwrap();
    let addr = p2p.listen("/ip4/127.0.0.1/tcp/0".parse().unwrap()).await.unwrap();
    let full = addr.with_p2p(p2p.local_peer_id()).unwrap();
    (p2p, full)
}

pub async fn node_with(initial: Vec<Multiaddr>, config: DhtConfig, validator: CompositeValidator) -> Node {
    let (p2p, addr) = host().await;
    let dht = Dht::spawn_with_validator(p2p.clone(), config, initial, validator)
        .await
        .unwrap();
    Node { dht, p2p, addr }
}

pub async fn node(initial: Vec<Multiaddr>) -> Node {
    node_with(initial, test_config(), CompositeValidator::default()).await
}

/// `n` nodes, each bootstrapped from up to 3 random earlier ones (always including its predecessor), as
/// hivemind's tests build swarms.
pub async fn swarm(n: usize) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::with_capacity(n);
    for i in 0..n {
        let mut initial = Vec::new();
        if i > 0 {
            initial.push(nodes[i - 1].addr.clone());
            let mut others: Vec<&Node> = nodes[..i - 1].iter().collect();
            others.shuffle(&mut rand::thread_rng());
            initial.extend(others.iter().take(2).map(|n| n.addr.clone()));
        }
        nodes.push(node(initial).await);
    }
    nodes
}

pub fn expiration(seconds: f64) -> f64 {
    get_dht_time() + seconds
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a one-shot `hivemind_peer.py` mode off the async workers and returns its last JSON line.
pub async fn oneshot(args: Vec<String>) -> serde_json::Value {
    let run = tokio::task::spawn_blocking(move || apiary_testkit::hivemind_oneshot(&args));
    tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("hivemind_peer.py took too long")
        .unwrap()
}

/// `&str`s as owned arguments.
pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}
