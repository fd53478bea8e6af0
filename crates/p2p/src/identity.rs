//! Identity files in libp2p's protobuf key format (`crypto.PrivateKey`), as p2pd's `-id` and hivemind's
//! `identity_path` use them (Ed25519, or hivemind's RSA-2048 keys).

use std::path::Path;

use libp2p::identity::Keypair;

/// Why an identity could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the file failed.
    #[error("identity file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a private key libp2p understands.
    #[error("not a libp2p private key: {0}")]
    Decode(#[from] libp2p::identity::DecodingError),
}

/// Decodes a private key in libp2p's protobuf format.
pub fn decode(bytes: &[u8]) -> Result<Keypair, IdentityError> {
    Ok(Keypair::from_protobuf_encoding(bytes)?)
}

/// Encodes a private key in libp2p's protobuf format. RSA keys (hivemind's) are refused: libp2p cannot
/// export an RSA private key, so keep the file they were loaded from.
pub fn encode(keypair: &Keypair) -> Result<Vec<u8>, IdentityError> {
    Ok(keypair.to_protobuf_encoding()?)
}

/// Loads an identity file.
pub fn load(path: &Path) -> Result<Keypair, IdentityError> {
    let bytes = std::fs::read(path).map_err(|source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    })?;
    decode(&bytes)
}

/// Saves an identity file (overwriting it); fails, writing nothing, for RSA keys ([`encode`]).
pub fn save(keypair: &Keypair, path: &Path) -> Result<(), IdentityError> {
    std::fs::write(path, encode(keypair)?).map_err(|source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    })
}
