//! Identity files: Apiary's own round trip, and hivemind's RSA identity files read with the peer id
//! hivemind derives from them (and refused on save, which libp2p cannot do for RSA).

#![allow(clippy::unwrap_used)] // test helpers as well as tests

use std::process::Command;

use apiary_p2p::{Host, Keypair, P2pConfig, identity};

#[test]
fn save_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    for key in [Keypair::generate_ed25519(), Keypair::generate_ed25519()] {
        let path = dir.path().join("identity.key");
        identity::save(&key, &path).unwrap();
        let loaded = identity::load(&path).unwrap();
        assert_eq!(loaded.public(), key.public());
        assert_eq!(
            identity::encode(&loaded).unwrap(),
            identity::encode(&key).unwrap()
        );
    }
    assert!(matches!(
        identity::load(&dir.path().join("missing.key")),
        Err(identity::IdentityError::Io { .. })
    ));
    let garbage = dir.path().join("garbage.key");
    std::fs::write(&garbage, b"not a key").unwrap();
    assert!(matches!(
        identity::load(&garbage),
        Err(identity::IdentityError::Decode(_))
    ));
}

#[tokio::test]
async fn hivemind_rsa_identity_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hivemind.key");
    // hivemind's own generator (RSA-2048 in libp2p's protobuf key format) and its own peer id for it.
    let script = "import sys\n\
                  from hivemind.p2p import P2P, PeerID\n\
                  P2P.generate_identity(sys.argv[1])\n\
                  print(PeerID.from_identity(open(sys.argv[1], 'rb').read()).to_base58())\n";
    let out = Command::new(apiary_testkit::hivemind_python())
        .args(["-c", script])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hivemind_id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(hivemind_id.starts_with("Qm"), "{hivemind_id}");

    let key = identity::load(&path).unwrap();
    assert_eq!(key.public().to_peer_id().to_string(), hivemind_id);
    // A host started with it has that peer id.
    let (handle, _task) = Host::spawn(P2pConfig {
        keypair: Some(key.clone()),
        ..P2pConfig::default()
    })
    .unwrap();
    assert_eq!(handle.local_peer_id().to_string(), hivemind_id);
    // libp2p cannot export RSA private keys: saving one is a clear error, never a wrong file.
    let copy = dir.path().join("copy.key");
    assert!(matches!(
        identity::save(&key, &copy),
        Err(identity::IdentityError::Decode(_))
    ));
    assert!(!copy.exists());
    handle.shutdown().await;
}
