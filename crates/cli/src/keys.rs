//! `apiary keys`: publisher keys — the RSA keys that sign experiment manifests (hivemind's
//! `RSAPrivateKey`, stored as a libp2p `PrivateKey` protobuf like hivemind's identity files).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use apiary_wire::signature::RsaPrivateKey;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::output::Output;

/// The largest key file read (a 2048- or 4096-bit RSA key in libp2p's protobuf is a few KiB).
const MAX_KEY_FILE: u64 = 64 * 1024;

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Make a publisher key (RSA 2048) at PATH, readable by you only, and print its public key.
    New {
        /// Where to write the key.
        path: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key (OpenSSH `ssh-rsa …`) of the key at PATH.
    Show {
        /// The key file.
        path: PathBuf,
    },
}

pub fn run(args: KeysArgs, out: &Output) -> Result<()> {
    match args.command {
        KeysCommand::New { path, force } => {
            if path.exists() && !force {
                bail!("{} exists; pass --force to replace it", path.display());
            }
            let key = RsaPrivateKey::generate().context("generating an RSA key")?;
            write_private(&path, &key.to_libp2p_protobuf()?)?;
            out.result(json!({
                "path": path.display().to_string(),
                "public_key": key.public_key().to_openssh(),
            }));
        }
        KeysCommand::Show { path } => {
            let key = load(&path)?;
            out.result(json!({
                "path": path.display().to_string(),
                "public_key": key.public_key().to_openssh(),
            }));
        }
    }
    Ok(())
}

/// Reads a publisher key (libp2p protobuf, or a PKCS#1/PKCS#8 DER key).
pub fn load(path: &Path) -> Result<RsaPrivateKey> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > MAX_KEY_FILE {
        bail!("{}: {len} bytes is too large for a key file", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    RsaPrivateKey::from_libp2p_protobuf(&bytes)
        .or_else(|_| RsaPrivateKey::from_der(&bytes))
        .with_context(|| format!("{}: not an RSA private key", path.display()))
}

/// Writes `bytes` to `path` readable and writable by the owner only, through a temporary file renamed
/// into place.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
