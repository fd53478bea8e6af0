//! Checkpoints of hosted experts on disk: `<dir>/<uid>/checkpoint.safetensors` (weights) and the optimizer
//! state beside it ([`ExpertBackend::save_checkpoint`]), each written atomically.

use std::path::Path;

use crate::runtime::RuntimeHandle;
use crate::{BackendConfig, CHECKPOINT_FILE, Expert, ExpertBackend, ExpertConfig, Result};

/// The expert `uid`'s last checkpoint under `dir` (weights and optimizer state), or a fresh expert
/// seeded with `seed`; a corrupted checkpoint is reported in the log and skipped, never fatal.
pub fn load_or_init(
    config: ExpertConfig,
    backend: BackendConfig,
    uid: &str,
    dir: Option<&Path>,
    seed: u64,
) -> Result<ExpertBackend> {
    if let Some(dir) = dir {
        let dir = dir.join(uid);
        if dir.join(CHECKPOINT_FILE).exists() {
            match ExpertBackend::load_checkpoint(config, backend, &dir) {
                Ok((loaded, None)) => {
                    tracing::info!(%uid, steps = loaded.steps(), "loaded checkpoint");
                    return Ok(loaded);
                }
                Ok((loaded, Some(why))) => {
                    tracing::warn!(%uid, "loaded the weights; the optimizer starts afresh: {why}");
                    return Ok(loaded);
                }
                Err(e) => tracing::warn!(%uid, dir = %dir.display(), "skipping a bad checkpoint: {e}"),
            }
        }
    }
    ExpertBackend::new(Expert::new(config, seed)?, backend)
}

/// Saves every expert of `uids` under `dir` between compute batches; returns how many were saved
/// (failures are logged).
pub async fn save_all(runtime: &RuntimeHandle, uids: &[String], dir: &Path) -> usize {
    let mut saved = 0;
    for uid in uids {
        let path = dir.join(uid);
        let result = runtime
            .with_backend(uid, move |backend| backend.save_checkpoint(&path))
            .await;
        match result {
            Ok(Ok(())) => {
                saved += 1;
                tracing::debug!(%uid, "checkpoint saved");
            }
            Ok(Err(e)) | Err(e) => tracing::warn!(%uid, "checkpoint not saved: {e}"),
        }
    }
    saved
}
