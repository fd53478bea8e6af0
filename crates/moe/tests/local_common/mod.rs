//! In-process experts for the MoE layers' tests: a 3×3 grid of seeded `ffn` experts behind a
//! `LocalTransport` (with fault injection), a `StaticRouter` over them, and the same experts again for
//! dense references.

#![allow(dead_code)]

use apiary_expert::schema::ExpertSchema;
use apiary_expert::{BackendConfig, Expert, ExpertBackend, ExpertConfig, ExpertKind, OptimizerConfig};
use apiary_moe::lm::Rng;
use apiary_moe::moe::StaticRouter;
use apiary_moe::transport::{ExpertAddr, LocalTransport, TransportConfig};
use apiary_p2p::PeerId;
use candle_core::{Device, Tensor};

pub const H: usize = 16;
pub const GRID: [usize; 2] = [3, 3];

pub struct Setup {
    pub rt: tokio::runtime::Runtime,
    pub transport: LocalTransport,
    pub router: StaticRouter,
    /// The same experts, for the reference.
    pub experts: Vec<(ExpertAddr, Expert)>,
}

pub fn uid(i: usize, j: usize) -> String {
    format!("ffn.{i}.{j}")
}

pub fn setup(skip: &[(usize, usize)]) -> Setup {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let peer = PeerId::random();
    let mut transport = LocalTransport::new(TransportConfig::default());
    let mut addrs = Vec::new();
    let mut experts = Vec::new();
    let schema = ExpertSchema::server_create(
        ExpertKind::Ffn,
        H,
        apiary_wire::proto::runtime::CompressionType::None,
        4096,
    );
    for i in 0..GRID[0] {
        for j in 0..GRID[1] {
            if skip.contains(&(i, j)) {
                continue;
            }
            let seed = (10 * i + j) as u64;
            let config = ExpertConfig::new(ExpertKind::Ffn, H);
            let backend = ExpertBackend::new(
                Expert::new(config, seed).unwrap(),
                // lr 0: the experts stay as they are, so runs compare with one another
                BackendConfig {
                    optimizer: OptimizerConfig::Sgd {
                        lr: 0.0,
                        momentum: 0.0,
                        dampening: 0.0,
                        weight_decay: 0.0,
                        nesterov: false,
                    },
                    ..BackendConfig::default()
                },
            )
            .unwrap();
            transport = transport.with_backend(uid(i, j), backend, &schema).unwrap();
            let addr = ExpertAddr::new(uid(i, j), peer);
            addrs.push(addr.clone());
            experts.push((addr, Expert::new(config, seed).unwrap()));
        }
    }
    let router = StaticRouter::new("ffn.", &GRID, addrs).unwrap();
    Setup {
        rt,
        transport,
        router,
        experts,
    }
}

/// Uniform values in `[-1, 1)` of `shape`.
pub fn rand(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rng.uniform(1.0, n), shape, &Device::Cpu).unwrap()
}
