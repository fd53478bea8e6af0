//! The catalog that ships with Apiary (`assets/catalog/`): the local demo experiment and the default
//! public bootstrap peers.

use apiary_wire::signature::RsaPublicKey;
use serde::Deserialize;

use crate::manifest::{Manifest, Rejection};

/// The local demo's experiment id.
pub const LOCAL_DEMO_ID: &str = "local-demo";
/// How long the demo's signed manifest stays valid, seconds (a week: a demo never runs that long).
pub const LOCAL_DEMO_VALIDITY: u64 = 7 * 86_400;

const LOCAL_DEMO: &str = include_str!("../../../assets/catalog/local-demo.toml");
const BOOTSTRAP: &str = include_str!("../../../assets/catalog/bootstrap.toml");

/// The local demo's manifest as bundled: no publisher key and no times (the running demo fills them in,
/// see [`local_demo`]). Shown as a card so people find the demo; joined only while a demo runs.
pub fn local_demo_template() -> Result<Manifest, Rejection> {
    Manifest::from_toml_str(LOCAL_DEMO)
}

/// The manifest a running demo publishes: the bundled one with the demo's key, `created = now`, a week of
/// validity, and the demo swarm's shape (`layers` MoE layers of `grid` experts of width `hidden_dim`).
pub fn local_demo(
    key: &RsaPublicKey,
    now: u64,
    layers: usize,
    grid: &[usize],
    hidden_dim: usize,
) -> Result<Manifest, Rejection> {
    let mut m = local_demo_template()?;
    m.publisher.public_key = key.to_openssh();
    m.created = now;
    m.expires = now.saturating_add(LOCAL_DEMO_VALIDITY);
    m.grid = std::iter::once(layers).chain(grid.iter().copied()).collect();
    m.expert.hidden_dim = hidden_dim;
    m.validate()?;
    Ok(m)
}

/// The uid prefix of layer `layer`'s MoE in a demo manifest: `ffn_demo.{layer}.`.
pub fn layer_prefix(manifest: &Manifest, layer: usize) -> String {
    format!("{}{layer}.", manifest.uid_prefix)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BootstrapFile {
    peers: Vec<String>,
}

/// The default public bootstrap peers (empty until public Apiary bootstrap nodes exist).
pub fn bootstrap_peers() -> Vec<String> {
    toml::from_str::<BootstrapFile>(BOOTSTRAP)
        .map(|f| f.peers)
        .unwrap_or_default()
}

/// Every bundled manifest (the local demo's template).
pub fn bundled() -> Vec<Manifest> {
    local_demo_template().into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiary_wire::signature::RsaPrivateKey;

    #[test]
    fn the_bundled_catalog_parses_and_the_demo_manifest_validates() {
        let template = local_demo_template().unwrap();
        assert_eq!(template.id, LOCAL_DEMO_ID);
        assert_eq!(bundled().len(), 1);
        let key = RsaPrivateKey::generate().unwrap();
        let m = local_demo(&key.public_key(), 1_800_000_000, 3, &[4, 2], 32).unwrap();
        assert_eq!(m.grid, vec![3, 4, 2]);
        assert_eq!(m.expert_uids().len(), 24);
        assert_eq!(m.expert_uids()[0], "ffn_demo.0.0.0");
        assert_eq!(layer_prefix(&m, 2), "ffn_demo.2.");
        crate::manifest::SignedManifest::sign(m, &key)
            .unwrap()
            .verify(1_800_000_001)
            .unwrap();
        for peer in bootstrap_peers() {
            assert!(peer.contains("/p2p/"), "{peer}");
        }
    }
}
