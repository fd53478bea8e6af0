//! A swarm on this machine: volunteers hosting expert grids, the nodes they run on, and a trainer's MoE
//! layers over them — shared by `apiary demo`, `apiary train` and `apiary bench moe`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use apiary_catalog::swarm::rosters;
use apiary_catalog::{Coverage, Hosting, HostingConfig, Manifest, Publication, SignedManifest, StatusRecord};
use apiary_dht::validation::CompositeValidator;
use apiary_dht::{Dht, DhtConfig, DhtHandle};
use apiary_expert::RuntimeStats;
use apiary_expert::server::ExpertServer;
use apiary_moe::beam::{BeamSearchConfig, MoEBeamSearcher};
use apiary_moe::lm::{Corpus, LmConfig};
use apiary_moe::moe::{MoeConfig, RemoteMixtureOfExperts};
use apiary_moe::trainer::{Trainer, TrainerConfig};
use apiary_moe::transport::ExpertTransport;
use apiary_p2p::{Host, Multiaddr, P2pConfig, P2pHandle, Protocol};
use apiary_wire::signature::RsaPrivateKey;
use serde_json::{Value as Json, json};

/// The demo swarm and model: `apiary demo` and `apiary bench moe` take the same flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SwarmArgs {
    /// Volunteer nodes hosting the experts.
    #[arg(long, default_value_t = 3)]
    pub volunteers: usize,
    /// The expert grid of each MoE layer, one size per dimension.
    #[arg(long, num_args = 1.., default_values_t = [4usize, 4])]
    pub grid: Vec<usize>,
    /// The model's width, which is the experts' hidden dim.
    #[arg(long, default_value_t = 64)]
    pub hidden_dim: usize,
    /// Transformer blocks (one MoE layer each).
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Characters per sequence.
    #[arg(long, default_value_t = 32)]
    pub seq: usize,
    /// Experts per character and layer.
    #[arg(long, default_value_t = 4)]
    pub k_best: usize,
    /// The trainer's learning rate (Adam).
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Seeds the model, the experts and the batches.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SwarmArgs {
    /// The demo model's shape for a vocabulary of `vocab` characters.
    pub fn lm_config(&self, vocab: usize) -> LmConfig {
        let mut lm = LmConfig::new(vocab);
        lm.d_model = self.hidden_dim;
        lm.layers = self.layers;
        lm.context = self.seq.max(1);
        lm
    }

    /// The demo experiment of this swarm, signed with a key made for this run.
    pub fn experiment(&self) -> Result<(RsaPrivateKey, SignedManifest)> {
        let key = RsaPrivateKey::generate().context("making the demo's publisher key")?;
        let manifest = apiary_catalog::bundled::local_demo(
            &key.public_key(),
            unix_now(),
            self.layers,
            &self.grid,
            self.hidden_dim,
        )?;
        let mut manifest = manifest;
        manifest.expert.init_seed = self.seed;
        let signed = SignedManifest::sign(manifest, &key)?;
        Ok((key, signed))
    }

    /// The trainer's settings.
    pub fn trainer_config(&self) -> TrainerConfig {
        TrainerConfig {
            batch: self.batch,
            seq: self.seq,
            lr: self.lr,
            seed: self.seed,
            ..TrainerConfig::default()
        }
    }

    /// The demo model over this swarm: one MoE layer per block (uid prefixes [`prefix`]), routing through
    /// `dht` and calling over `transport`.
    pub fn trainer(
        &self,
        dht: &DhtHandle,
        transport: Arc<dyn ExpertTransport>,
        corpus: Corpus,
    ) -> Result<Trainer> {
        let prefixes: Vec<String> = (0..self.layers).map(prefix).collect();
        let settings = MoeSettings {
            k_best: self.k_best,
            k_min: 1,
            backward_k_min: 1,
            forward_timeout: Some(Duration::from_secs(20)),
            backward_timeout: Some(Duration::from_secs(20)),
            timeout_after_k_min: Some(Duration::from_secs(2)),
            allow_zero_outputs: false,
            detect_anomalies: false,
        };
        let moes = moe_layers(
            dht,
            transport,
            &prefixes,
            &self.grid,
            self.hidden_dim,
            settings,
            self.seed,
        )?;
        let lm = self.lm_config(corpus.vocab.len());
        Ok(Trainer::new(lm, moes, corpus, self.trainer_config())?)
    }
}

/// The trainer's latest numbers, for the status record.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub step: u64,
    pub loss: Option<f64>,
    pub samples_per_s: f64,
}

/// Publishes the trainer's status beside the experiment every `period`: its progress, and the volunteers
/// and covered experts the roster shows.
pub async fn publish_status(
    publication: Arc<Publication>,
    dht: DhtHandle,
    manifest: Manifest,
    progress: tokio::sync::watch::Receiver<Progress>,
    period: Duration,
) {
    let grid = manifest.expert_uids();
    loop {
        let roster = rosters(&dht, &manifest).await.unwrap_or_default();
        let coverage = Coverage::from_rosters(&manifest, roster);
        let p = progress.borrow().clone();
        let record = StatusRecord {
            experiment: manifest.id.clone(),
            volunteers: coverage.volunteers() as u32,
            experts_covered: grid.iter().filter(|u| coverage.replicas(u) > 0).count() as u32,
            grid_experts: grid.len() as u32,
            samples_per_s: p.samples_per_s,
            loss: p.loss,
            step: p.step,
            updated_at: apiary_dht::get_dht_time(),
        };
        let stored = publication.set_status(&record).await;
        tracing::debug!(stored, step = p.step, "status published");
        tokio::time::sleep(period).await;
    }
}

/// The time now, unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How often volunteers refresh their declarations, and how long one lives.
pub const UPDATE_PERIOD: Duration = Duration::from_secs(4);
pub const EXPIRATION: Duration = Duration::from_secs(10);

/// One volunteer: a node of the swarm hosting some experts of the demo experiment.
pub struct Volunteer {
    pub name: String,
    pub p2p: P2pHandle,
    dht: DhtHandle,
    hosting: Option<Hosting>,
    pub uids: Vec<String>,
    /// The last statistics, kept when the volunteer is gone.
    stats: RuntimeStats,
}

impl Volunteer {
    /// A node bootstrapped from `bootstrap` that joins `manifest`'s experiment hosting `uids`.
    pub async fn start(
        name: String,
        bootstrap: &[Multiaddr],
        manifest: &Manifest,
        uids: Vec<String>,
    ) -> Result<Self> {
        let (p2p, dht) = node(bootstrap, false).await?;
        let server = ExpertServer::empty();
        server.register(&p2p).context("registering the expert RPCs")?;
        let config = HostingConfig {
            update_period: UPDATE_PERIOD,
            expiration: EXPIRATION,
            ..HostingConfig::default()
        };
        let hosting = Hosting::start(&dht, &server, manifest, uids.clone(), &config).await?;
        Ok(Self {
            name,
            p2p,
            dht,
            stats: hosting.stats(),
            hosting: Some(hosting),
            uids,
        })
    }

    pub fn alive(&self) -> bool {
        self.hosting.is_some()
    }

    pub fn stats(&self) -> RuntimeStats {
        match &self.hosting {
            Some(h) => h.stats(),
            None => self.stats.clone(),
        }
    }

    /// Gone without a goodbye: declarations and roster entry are neither refreshed nor withdrawn,
    /// connections drop.
    pub async fn kill(&mut self) {
        if let Some(hosting) = self.hosting.take() {
            self.p2p.shutdown().await;
            self.stats = hosting.abandon().await;
            self.dht.shutdown().await;
        }
    }

    /// A clean exit: the experiment is left (declarations and roster entry withdrawn) first.
    pub async fn stop(&mut self) {
        if let Some(hosting) = self.hosting.take() {
            self.stats = hosting.leave().await;
            self.dht.shutdown().await;
            self.p2p.shutdown().await;
        }
    }
}

/// A P2P host on loopback and a DHT node bootstrapped from `bootstrap`.
pub async fn node(bootstrap: &[Multiaddr], client_mode: bool) -> Result<(P2pHandle, DhtHandle)> {
    node_with(bootstrap, client_mode, CompositeValidator::default()).await
}

/// [`node`] with record validators (e.g. [`apiary_catalog::swarm::validator`]).
pub async fn node_with(
    bootstrap: &[Multiaddr],
    client_mode: bool,
    validator: CompositeValidator,
) -> Result<(P2pHandle, DhtHandle)> {
    let config = P2pConfig {
        listen_addrs: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        ..P2pConfig::default()
    };
    let (p2p, _task) = Host::spawn(config).context("could not start a libp2p host")?;
    let mut dht_config = DhtConfig::default();
    dht_config.client_mode = client_mode;
    let dht = Dht::spawn_with_validator(p2p.clone(), dht_config, bootstrap.to_vec(), validator)
        .await
        .context("could not join the DHT")?;
    Ok((p2p, dht))
}

/// The full `/p2p/` multiaddrs of a host (waiting briefly for its listener).
pub async fn maddrs(p2p: &P2pHandle) -> Vec<Multiaddr> {
    let mut addrs = p2p.listen_addrs();
    let deadline = Instant::now() + Duration::from_secs(5);
    while addrs.borrow().is_empty() && Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(200), addrs.changed()).await;
    }
    let id = p2p.local_peer_id();
    let list = addrs.borrow().clone();
    list.into_iter().map(|a| a.with(Protocol::P2p(id))).collect()
}

/// Which volunteer hosts expert `coords` of layer `layer`: spread so that every grid row (a prefix the
/// beam search expands) lives on several volunteers, and losing one never takes a sample's whole choice.
pub fn host_of(layer: usize, coords: &[usize], volunteers: usize) -> usize {
    (layer + coords.iter().sum::<usize>()) % volunteers
}

/// Every coordinate tuple of `grid`, in order.
pub fn grid_coords(grid: &[usize]) -> Vec<Vec<usize>> {
    let mut all = vec![Vec::new()];
    for &size in grid {
        all = all
            .into_iter()
            .flat_map(|prefix| {
                (0..size).map(move |i| {
                    let mut c = prefix.clone();
                    c.push(i);
                    c
                })
            })
            .collect();
    }
    all
}

pub fn uid(layer: usize, coords: &[usize]) -> String {
    let c: Vec<String> = coords.iter().map(ToString::to_string).collect();
    format!("{}{}", prefix(layer), c.join("."))
}

/// Layer `layer`'s uid prefix in the demo experiment (whose grid's first coordinate is the layer).
pub fn prefix(layer: usize) -> String {
    format!("ffn_demo.{layer}.")
}

impl Volunteer {
    /// What this volunteer contributed: calls, samples and optimizer steps over all its experts.
    pub fn contribution(&self) -> Json {
        let s = self.stats();
        let sum = |f: fn(&apiary_expert::ExpertStats) -> u64| s.experts.iter().map(f).sum::<u64>();
        json!({
            "volunteer": self.name,
            "alive": self.alive(),
            "experts": self.uids.len(),
            "forward_batches": sum(|e| e.forward_batches),
            "backward_batches": sum(|e| e.backward_batches),
            "forward_samples": sum(|e| e.forward_rows),
            "backward_samples": sum(|e| e.backward_rows),
            "optimizer_steps": sum(|e| e.optimizer_steps),
        })
    }
}

/// Starts `count` volunteers bootstrapped from `boot`, together hosting every expert of the demo
/// experiment `manifest` (grid `[layers, …grid]`), spread by [`host_of`].
pub async fn volunteers(boot: &[Multiaddr], count: usize, manifest: &Manifest) -> Result<Vec<Volunteer>> {
    let (layers, grid) = manifest.grid.split_first().context("the demo grid is empty")?;
    let coords = grid_coords(grid);
    let mut all = Vec::with_capacity(count);
    for v in 0..count {
        let uids: Vec<String> = (0..*layers)
            .flat_map(|l| {
                coords
                    .iter()
                    .filter(move |c| host_of(l, c, count) == v)
                    .map(move |c| uid(l, c))
            })
            .collect();
        let name = format!("volunteer {}", v + 1);
        all.push(
            Volunteer::start(name, boot, manifest, uids)
                .await
                .with_context(|| format!("starting volunteer {}", v + 1))?,
        );
    }
    Ok(all)
}

/// How a trainer's MoE layers call experts.
#[derive(Debug, Clone, Copy)]
pub struct MoeSettings {
    pub k_best: usize,
    pub k_min: usize,
    pub backward_k_min: usize,
    pub forward_timeout: Option<Duration>,
    pub backward_timeout: Option<Duration>,
    pub timeout_after_k_min: Option<Duration>,
    pub allow_zero_outputs: bool,
    pub detect_anomalies: bool,
}

/// One MoE layer per uid prefix, routing with a beam search over `dht` and calling over `transport`.
pub fn moe_layers(
    dht: &DhtHandle,
    transport: Arc<dyn ExpertTransport>,
    prefixes: &[String],
    grid: &[usize],
    in_features: usize,
    settings: MoeSettings,
    seed: u64,
) -> Result<Vec<RemoteMixtureOfExperts>> {
    prefixes
        .iter()
        .enumerate()
        .map(|(layer, prefix)| {
            let searcher =
                MoEBeamSearcher::new(dht.clone(), prefix, grid.to_vec(), BeamSearchConfig::default())?;
            let mut config = MoeConfig::new(in_features, prefix, grid.to_vec());
            config.k_best = settings.k_best;
            config.k_min = settings.k_min;
            config.backward_k_min = settings.backward_k_min;
            config.forward_timeout = settings.forward_timeout;
            config.backward_timeout = settings.backward_timeout;
            config.timeout_after_k_min = settings.timeout_after_k_min;
            config.allow_zero_outputs = settings.allow_zero_outputs;
            config.detect_anomalies = settings.detect_anomalies;
            Ok(RemoteMixtureOfExperts::new(
                config,
                Arc::new(searcher),
                transport.clone(),
                tokio::runtime::Handle::current(),
                seed.wrapping_add(100 + layer as u64),
            )?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_grid_row_spans_several_volunteers() {
        for layer in 0..2 {
            for row in 0..4 {
                let hosts: std::collections::HashSet<usize> =
                    (0..4).map(|j| host_of(layer, &[row, j], 3)).collect();
                assert!(hosts.len() >= 2, "layer {layer} row {row}: {hosts:?}");
            }
        }
        assert_eq!(grid_coords(&[2, 3]).len(), 6);
        assert_eq!(uid(1, &[2, 3]), "ffn_demo.1.2.3");
        let key = apiary_wire::signature::RsaPrivateKey::generate()
            .unwrap()
            .public_key();
        let m = apiary_catalog::bundled::local_demo(&key, 1_800_000_000, 2, &[4, 4], 64).unwrap();
        assert_eq!(apiary_catalog::bundled::layer_prefix(&m, 1), prefix(1));
        assert!(m.expert_uids().contains(&uid(1, &[3, 3])));
    }
}
