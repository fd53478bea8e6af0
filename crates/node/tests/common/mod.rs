//! Helpers shared by the node's integration tests: a switchable activity probe, fixed probes, polling
//! with a deadline, and plain swarm nodes on 127.0.0.1.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use apiary_dht::validation::CompositeValidator;
use apiary_dht::{Dht, DhtConfig, DhtHandle};
use apiary_governor::probe::{
    ActivityProbe, ActivitySample, FixedGpu, FixedPower, FixedSystem, PowerSample, Reading,
};
use apiary_governor::{Probes, Sample};
use apiary_moe::transport::{ExpertTransport, P2pTransport, TransportConfig};
use apiary_p2p::{Host, Multiaddr, P2pConfig, P2pHandle};

/// The user, as the activity probe sees them: `true` = using the PC.
#[derive(Debug, Clone)]
pub struct User(pub Arc<AtomicBool>);

impl Default for User {
    fn default() -> Self {
        User(Arc::new(AtomicBool::new(false)))
    }
}

impl ActivityProbe for User {
    fn sample(&mut self) -> ActivitySample {
        if self.0.load(Ordering::SeqCst) {
            ActivitySample::idle(0.0)
        } else {
            ActivitySample::idle(100_000.0)
        }
    }
}

pub fn probes(user: &User) -> Probes {
    Probes {
        activity: Box::new(user.clone()),
        gpu: Box::new(FixedGpu(Reading::Unknown("no GPU in tests"))),
        power: Box::new(FixedPower(PowerSample {
            on_ac: Reading::Known(true),
            battery_percent: Reading::Unknown("a desktop"),
        })),
        system: Box::new(FixedSystem(Sample::unknown(0.0).system)),
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

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
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A plain swarm node on 127.0.0.1.
pub struct Peer {
    pub p2p: P2pHandle,
    pub dht: DhtHandle,
    pub addr: Multiaddr,
}

impl Peer {
    pub async fn spawn(bootstrap: &[Multiaddr], validator: CompositeValidator) -> Peer {
        let (p2p, _task) = Host::spawn(P2pConfig::default()).unwrap();
        let addr = p2p.listen("/ip4/127.0.0.1/tcp/0".parse().unwrap()).await.unwrap();
        let addr = addr.with_p2p(p2p.local_peer_id()).unwrap();
        let dht = Dht::spawn_with_validator(p2p.clone(), DhtConfig::default(), bootstrap.to_vec(), validator)
            .await
            .unwrap();
        Peer { p2p, dht, addr }
    }

    pub fn transport(&self) -> Arc<dyn ExpertTransport> {
        Arc::new(P2pTransport::new(
            self.p2p.clone(),
            TransportConfig {
                info_timeout: Duration::from_secs(10),
                forward_timeout: Duration::from_secs(10),
                backward_timeout: Duration::from_secs(10),
            },
        ))
    }

    pub async fn stop(&self) {
        self.dht.shutdown().await;
        self.p2p.shutdown().await;
    }
}
