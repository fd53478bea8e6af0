//! Helpers for the `RemoteMixtureOfExperts` tests over real parts: Apiary expert servers on 127.0.0.1
//! (p2p host + DHT node + `Runtime` + `ExpertServer` + `Declarer`), a trainer node (p2p host + DHT client),
//! a transport that records which experts answered, and tensor helpers.

#![allow(clippy::unwrap_used, dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiary_dht::{Dht, DhtConfig, DhtHandle};
use apiary_expert::runtime::{Runtime, RuntimeConfig, RuntimeHandle};
use apiary_expert::schema::ExpertSchema;
use apiary_expert::server::{Declarer, ExpertServer};
use apiary_expert::{BackendConfig, Expert, ExpertBackend, ExpertConfig, ExpertKind};
use apiary_moe::beam::{BeamSearchConfig, ExpertInfo, MoEBeamSearcher};
use apiary_moe::lm::Rng;
use apiary_moe::moe::RemoteMixtureOfExperts;
use apiary_moe::transport::{ExpertAddr, ExpertInfo as RpcInfo, ExpertTransport, TransportError};
use apiary_p2p::{Host, Multiaddr, P2pConfig, P2pHandle, PeerId};
use apiary_wire::proto::runtime::CompressionType;
use candle_core::{Device, Tensor, Var};
use futures::future::BoxFuture;

/// The DHT settings of every Apiary node here: a short wait, so a dead peer costs little.
pub fn dht_config(client_mode: bool) -> DhtConfig {
    let mut config = DhtConfig::default();
    config.wait_timeout = Duration::from_secs(1);
    config.client_mode = client_mode;
    config
}

/// A p2p host listening on 127.0.0.1 and its full `/p2p/` address.
pub async fn host() -> (P2pHandle, Multiaddr) {
    let (p2p, _task) = Host::spawn(P2pConfig::default()).unwrap();
    let addr = p2p.listen("/ip4/127.0.0.1/tcp/0".parse().unwrap()).await.unwrap();
    let full = addr.with_p2p(p2p.local_peer_id()).unwrap();
    (p2p, full)
}

/// A seeded `ffn` expert of width `hidden`, trained by `backend` on every backward.
pub fn seeded_backend(hidden: usize, seed: u64, backend: BackendConfig) -> ExpertBackend {
    let expert = Expert::new(ExpertConfig::new(ExpertKind::Ffn, hidden), seed).unwrap();
    ExpertBackend::new(expert, backend).unwrap()
}

/// The schema an `ffn` expert of width `hidden` declares (no compression, so calls are exact).
pub fn ffn_schema(hidden: usize) -> ExpertSchema {
    ExpertSchema::server_create(ExpertKind::Ffn, hidden, CompressionType::None, 4096)
}

/// How an Apiary expert server is set up.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// `(uid, seed)` of each hosted expert.
    pub experts: Vec<(String, u64)>,
    pub hidden: usize,
    pub backend: BackendConfig,
    /// The declarer's re-declaration period and the declarations' lifetime.
    pub update_period: Duration,
    pub expiration: Duration,
}

/// An Apiary expert server: p2p host, DHT node, runtime, the expert RPCs and a declarer.
pub struct Server {
    pub p2p: P2pHandle,
    pub dht: DhtHandle,
    pub runtime: RuntimeHandle,
    pub addr: Multiaddr,
    pub uids: Vec<String>,
    declarer: Option<Declarer>,
}

impl Server {
    /// Starts a server joining the DHT through `bootstrap`; its experts are declared before this returns.
    pub async fn spawn(bootstrap: Vec<Multiaddr>, spec: &ServerSpec) -> Server {
        let backends = spec
            .experts
            .iter()
            .map(|(uid, seed)| (uid.clone(), seeded_backend(spec.hidden, *seed, spec.backend)))
            .collect();
        let runtime = Runtime::spawn(backends, RuntimeConfig::default()).unwrap();
        let schemas: HashMap<String, ExpertSchema> = spec
            .experts
            .iter()
            .map(|(uid, _)| (uid.clone(), ffn_schema(spec.hidden)))
            .collect();
        let (p2p, addr) = host().await;
        ExpertServer::new(runtime.clone(), schemas)
            .register(&p2p)
            .unwrap();
        let dht = Dht::spawn(p2p.clone(), dht_config(false), bootstrap)
            .await
            .unwrap();
        let uids: Vec<String> = spec.experts.iter().map(|(u, _)| u.clone()).collect();
        let (declarer, stored) =
            Declarer::start(dht.clone(), uids.clone(), spec.update_period, spec.expiration).await;
        assert!(stored > 0, "the server's declarations were stored");
        Server {
            p2p,
            dht,
            runtime,
            addr,
            uids,
            declarer: Some(declarer),
        }
    }

    pub fn peer_id(&self) -> PeerId {
        self.p2p.local_peer_id()
    }

    /// Dies outright: stops re-declaring *without* withdrawing (its declarations live on in the DHT until
    /// they expire), and shuts its host, DHT node and runtime down.
    pub async fn kill(&mut self) {
        drop(self.declarer.take());
        self.p2p.shutdown().await;
        self.dht.shutdown().await;
        self.runtime.shutdown().await;
    }

    /// Withdraws its declarations and shuts down.
    pub async fn stop(mut self) {
        if let Some(d) = self.declarer.take() {
            d.withdraw().await;
        }
        self.dht.shutdown().await;
        self.p2p.shutdown().await;
        self.runtime.shutdown().await;
    }
}

/// A trainer's node: a p2p host and a DHT client joined through `bootstrap`.
pub struct TrainerNode {
    pub p2p: P2pHandle,
    pub dht: DhtHandle,
}

impl TrainerNode {
    pub async fn spawn(bootstrap: Vec<Multiaddr>) -> TrainerNode {
        let (p2p, _) = host().await;
        let dht = Dht::spawn(p2p.clone(), dht_config(true), bootstrap)
            .await
            .unwrap();
        TrainerNode { p2p, dht }
    }

    /// A beam searcher over `grid` (hivemind's defaults).
    pub fn searcher(&self, prefix: &str, grid: &[usize]) -> MoEBeamSearcher {
        MoEBeamSearcher::new(
            self.dht.clone(),
            prefix,
            grid.to_vec(),
            BeamSearchConfig::default(),
        )
        .unwrap()
    }

    /// Waits until a search over the whole grid finds `want` experts (a searcher without negative
    /// caching, so early misses are not remembered); returns them sorted by uid.
    pub async fn wait_for_experts(&self, prefix: &str, grid: &[usize], want: usize) -> Vec<ExpertInfo> {
        let mut config = BeamSearchConfig::default();
        config.negative_caching = false;
        let search = MoEBeamSearcher::new(self.dht.clone(), prefix, grid.to_vec(), config).unwrap();
        let scores: Vec<Vec<f32>> = grid.iter().map(|&n| vec![0.0; n]).collect();
        let total: usize = grid.iter().product();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut found = search.find_best_experts(&scores, total).await.unwrap();
            if found.len() >= want {
                found.sort();
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {want} experts showed up in the DHT",
                found.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(&self) {
        self.dht.shutdown().await;
        self.p2p.shutdown().await;
    }
}

/// Every uid `{prefix}{i}.{j}` of a 2-D grid.
pub fn grid_uids(prefix: &str, grid: [usize; 2]) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..grid[0] {
        for j in 0..grid[1] {
            out.push(format!("{prefix}{i}.{j}"));
        }
    }
    out
}

/// Successful calls per `(uid, peer)`: `[forward, backward]`.
pub type AnswerCounts = BTreeMap<(String, PeerId), [u64; 2]>;

/// An [`ExpertTransport`] that forwards to another and counts which experts answered.
#[derive(Debug, Clone)]
pub struct Recording {
    inner: Arc<dyn ExpertTransport>,
    answered: Arc<Mutex<AnswerCounts>>,
}

impl Recording {
    pub fn new(inner: Arc<dyn ExpertTransport>) -> Self {
        Self {
            inner,
            answered: Arc::default(),
        }
    }

    pub fn answered(&self) -> AnswerCounts {
        self.answered.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.answered.lock().unwrap().clear();
    }

    fn count(&self, expert: &ExpertAddr, which: usize) {
        let mut map = self.answered.lock().unwrap();
        map.entry((expert.uid.clone(), expert.peer)).or_default()[which] += 1;
    }
}

impl ExpertTransport for Recording {
    fn info<'a>(&'a self, expert: &'a ExpertAddr) -> BoxFuture<'a, Result<Arc<RpcInfo>, TransportError>> {
        self.inner.info(expert)
    }

    fn forward<'a>(
        &'a self,
        expert: &'a ExpertAddr,
        inputs: Vec<Tensor>,
    ) -> BoxFuture<'a, Result<Vec<Tensor>, TransportError>> {
        Box::pin(async move {
            let out = self.inner.forward(expert, inputs).await?;
            self.count(expert, 0);
            Ok(out)
        })
    }

    fn backward<'a>(
        &'a self,
        expert: &'a ExpertAddr,
        inputs: Vec<Tensor>,
        grad_outputs: Vec<Tensor>,
    ) -> BoxFuture<'a, Result<Vec<Tensor>, TransportError>> {
        Box::pin(async move {
            let out = self.inner.backward(expert, inputs, grad_outputs).await?;
            self.count(expert, 1);
            Ok(out)
        })
    }
}

pub fn rand(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rng.uniform(1.0, n), shape, &Device::Cpu).unwrap()
}

pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// `max |a - b| / max |b|`.
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = flat(a);
    let b = flat(b);
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

pub fn all_finite(t: &Tensor) -> bool {
    flat(t).iter().all(|v| v.is_finite())
}

/// One pass of a layer: its output and the gradients of `Σ out·g` with respect to the input, the gating
/// weight and the gating bias.
pub struct Pass {
    pub out: Tensor,
    pub grad_x: Tensor,
    pub grad_w: Tensor,
    pub grad_b: Tensor,
}

impl Pass {
    pub fn tensors(&self) -> [(&'static str, &Tensor); 4] {
        [
            ("output", &self.out),
            ("input gradient", &self.grad_x),
            ("gating weight gradient", &self.grad_w),
            ("gating bias gradient", &self.grad_b),
        ]
    }

    pub fn all_finite(&self) -> bool {
        self.tensors().iter().all(|(_, t)| all_finite(t))
    }
}

/// Runs `moe` forward on `x` and backward on `Σ out·g` (which trains the experts it called). Call off the
/// tokio runtime: the layer blocks on it.
pub fn run(moe: &RemoteMixtureOfExperts, x: &Tensor, g: &Tensor) -> Pass {
    let xv = Var::from_tensor(&x.copy().unwrap()).unwrap();
    let out = moe.forward(xv.as_tensor()).unwrap();
    let loss = (&out * g).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let p = moe.params();
    Pass {
        out: out.detach(),
        grad_x: grads.get(xv.as_tensor()).unwrap().clone(),
        grad_w: grads.get(p[0].as_tensor()).unwrap().clone(),
        grad_b: grads.get(p[1].as_tensor()).unwrap().clone(),
    }
}
