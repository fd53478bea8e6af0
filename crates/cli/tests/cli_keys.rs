//! `apiary keys`: publisher keys for signing experiment manifests.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::APIARY;

/// `apiary keys new` writes a publisher key only its owner can read, refuses to overwrite it, and
/// `apiary keys show` prints the same public key; a file that is not a key is a clear error.
#[test]
fn publisher_keys_are_made_private_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys/publisher.key");
    let path_s = path.to_str().unwrap();
    let made = common::apiary(&["keys", "new", path_s]);
    let public = made["public_key"].as_str().unwrap().to_owned();
    assert!(public.starts_with("ssh-rsa "), "{public}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "readable by its owner only");
    }
    let shown = common::apiary(&["keys", "show", path_s]);
    assert_eq!(shown["public_key"], public.as_str());

    let again = Command::new(APIARY)
        .args(["--json", "keys", "new", path_s])
        .output()
        .unwrap();
    assert!(!again.status.success(), "an existing key is not replaced");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(
        common::apiary(&["keys", "show", path_s])["public_key"],
        public.as_str()
    );

    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not a key").unwrap();
    let bad = Command::new(APIARY)
        .args(["--json", "keys", "show", junk.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not an RSA private key"));
}
