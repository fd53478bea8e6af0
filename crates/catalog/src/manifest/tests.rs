use std::sync::OnceLock;

use super::*;

const NOW: u64 = 1_790_000_000;
const PEER: &str = "/ip4/203.0.113.5/tcp/31337/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN";

fn keys() -> &'static (RsaPrivateKey, RsaPrivateKey) {
    static KEYS: OnceLock<(RsaPrivateKey, RsaPrivateKey)> = OnceLock::new();
    KEYS.get_or_init(|| {
        (
            RsaPrivateKey::generate().unwrap(),
            RsaPrivateKey::generate().unwrap(),
        )
    })
}

fn publisher_key() -> &'static RsaPrivateKey {
    &keys().0
}

fn other_key() -> &'static RsaPrivateKey {
    &keys().1
}

fn sample() -> Manifest {
    Manifest {
        schema_version: 1,
        id: "tiny-shakespeare-ffn".into(),
        title: "Tiny Shakespeare, feed-forward experts".into(),
        summary: "A character-level language model whose FFN layers are a swarm of experts.".into(),
        description: "Trains a small model.\n\nEach volunteer hosts a few `ffn` experts.\tThanks!".into(),
        homepage: Some("https://example.org/tiny".into()),
        created: NOW - 3600,
        expires: NOW + 86_400,
        status: Status::Training,
        uid_prefix: "ffn.".into(),
        grid: vec![4, 8],
        bootstrap_peers: vec![PEER.into(), "/dns4/boot.example.org/udp/4001/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN".into()],
        trainer_status_url: Some("http://example.org:8080/status".into()),
        publisher: Publisher {
            name: "Example Lab".into(),
            public_key: publisher_key().public_key().to_openssh(),
        },
        expert: ExpertSpec {
            kind: "ffn".into(),
            hidden_dim: 64,
            max_batch_size: 256,
            optimizer: OptimizerSpec {
                name: "adam".into(),
                lr: 3e-4,
                betas: Some([0.9, 0.98]),
                eps: None,
                weight_decay: Some(0.01),
                momentum: None,
                dampening: None,
                nesterov: None,
            },
            schedule: ScheduleSpec {
                name: "linear".into(),
                warmup_steps: Some(100),
                training_steps: Some(10_000),
            },
            clip_grad_norm: Some(1.0),
            dtype: "float32".into(),
            init_seed: 7,
        },
        requirements: Requirements {
            min_ram_mb_per_expert: 64,
            min_vram_mb_per_expert: 0,
            bandwidth_mbps: 10,
            disk_mb: 100,
        },
    }
}

fn signed() -> SignedManifest {
    SignedManifest::sign(sample(), publisher_key()).unwrap()
}

#[test]
fn sample_is_valid_and_maps_onto_the_zoo() {
    let m = sample();
    m.validate().unwrap();
    assert_eq!(
        m.expert.expert_config().unwrap(),
        ExpertConfig::new(ExpertKind::Ffn, 64)
    );
    assert_eq!(
        m.expert.optimizer.to_config().unwrap(),
        OptimizerConfig::Adam {
            lr: 3e-4,
            betas: (0.9, 0.98),
            eps: 1e-8,
            weight_decay: 0.01
        }
    );
    assert_eq!(
        m.expert.schedule.to_config().unwrap(),
        ScheduleConfig::Linear {
            warmup_steps: 100,
            training_steps: 10_000
        }
    );
    let uids = m.expert_uids();
    assert_eq!(uids.len(), 32);
    assert_eq!(uids[0], "ffn.0.0");
    assert_eq!(uids[9], "ffn.1.1");
    assert_eq!(uids[31], "ffn.3.7");
}

#[test]
fn toml_round_trip() {
    let m = sample();
    let text = m.to_toml_string().unwrap();
    let back = Manifest::from_toml_str(&text).unwrap();
    assert_eq!(back, m);
    assert_eq!(back.canonical_bytes().unwrap(), m.canonical_bytes().unwrap());
}

#[test]
fn handwritten_toml_with_defaults() {
    let key = publisher_key().public_key().to_openssh();
    let text = format!(
        r#"
schema_version = 1
id = "demo"
title = "Local demo"
summary = "Runs on this machine."
description = ""
created = 0
expires = 4102444800
status = "recruiting"
uid_prefix = "expert."
grid = [16]

[publisher]
name = "Apiary"
public_key = "{key}"

[expert]
kind = "nop"
hidden_dim = 8
max_batch_size = 16
optimizer = {{ name = "sgd", lr = 0.1, momentum = 0.9, nesterov = true }}

[requirements]
min_ram_mb_per_expert = 1
min_vram_mb_per_expert = 0
bandwidth_mbps = 0
disk_mb = 1
"#
    );
    let m = Manifest::from_toml_str(&text).unwrap();
    m.validate().unwrap();
    assert_eq!(m.expert.schedule.to_config().unwrap(), ScheduleConfig::None);
    assert!(m.bootstrap_peers.is_empty() && m.homepage.is_none());
    assert_eq!((m.expert.dtype.as_str(), m.expert.init_seed), ("float32", 0));
    assert!(matches!(
        m.expert.optimizer.to_config().unwrap(),
        OptimizerConfig::Sgd { nesterov: true, .. }
    ));
}

#[test]
fn json_round_trip() {
    let m = sample();
    let text = m.to_json_string().unwrap();
    assert_eq!(Manifest::from_json_slice(text.as_bytes()).unwrap(), m);
    let s = signed();
    let bytes = s.to_json_vec().unwrap();
    let back = SignedManifest::from_json_slice(&bytes).unwrap();
    assert_eq!(back, s);
    back.verify(NOW).unwrap();
}

#[test]
fn canonical_bytes_are_deterministic_and_sorted() {
    let a = sample().canonical_bytes().unwrap();
    let b = sample().canonical_bytes().unwrap();
    assert_eq!(a, b);
    assert!(a.starts_with(b"apiary-manifest-v1\n{\"bootstrap_peers\":["));
    assert!(!a[CANONICAL_PREFIX.len()..].contains(&b'\n'));
}

#[test]
fn sign_then_verify() {
    let s = signed();
    assert_eq!(s.verify(NOW).unwrap(), &sample());
}

#[test]
fn tampered_field_is_a_bad_signature() {
    let mut s = signed();
    s.manifest.title.push('!');
    assert_eq!(s.verify(NOW), Err(Rejection::BadSignature));
    let mut s = signed();
    s.manifest.expert.optimizer.lr = 3.0001e-4;
    assert_eq!(s.verify(NOW), Err(Rejection::BadSignature));
    let mut s = signed();
    s.manifest.expires += 1;
    assert_eq!(s.verify(NOW), Err(Rejection::BadSignature));
    let mut s = signed();
    if let Some(sig) = &mut s.signature {
        sig.value = "AAAA".into();
    }
    assert_eq!(s.verify(NOW), Err(Rejection::BadSignature));
}

#[test]
fn unsigned_is_rejected() {
    let mut s = signed();
    s.signature = None;
    assert_eq!(s.verify(NOW), Err(Rejection::Unsigned));
    let mut s = signed();
    if let Some(sig) = &mut s.signature {
        sig.value.clear();
    }
    assert_eq!(s.verify(NOW), Err(Rejection::Unsigned));
    let json = format!("{{\"manifest\":{}}}", sample().to_json_string().unwrap());
    let parsed = SignedManifest::from_json_slice(json.as_bytes()).unwrap();
    assert_eq!(parsed.verify(NOW), Err(Rejection::Unsigned));
}

#[test]
fn other_key_is_rejected() {
    // signing with a key that is not the publisher's is refused up front
    assert_eq!(
        SignedManifest::sign(sample(), other_key()).err(),
        Some(Rejection::WrongKey)
    );
    // a signature by another key, claimed as such
    let m = sample();
    let value = String::from_utf8(other_key().sign(&m.canonical_bytes().unwrap()).unwrap()).unwrap();
    let mut s = SignedManifest {
        manifest: m,
        signature: Some(ManifestSignature {
            public_key: other_key().public_key().to_openssh(),
            value: value.clone(),
        }),
    };
    assert_eq!(s.verify(NOW), Err(Rejection::WrongKey));
    // … or passed off as the publisher's
    if let Some(sig) = &mut s.signature {
        sig.public_key = publisher_key().public_key().to_openssh();
    }
    assert_eq!(s.verify(NOW), Err(Rejection::BadSignature));
    // the publisher swapped for the other key after signing
    let mut s = signed();
    s.manifest.publisher.public_key = other_key().public_key().to_openssh();
    assert_eq!(s.verify(NOW), Err(Rejection::WrongKey));
}

#[test]
fn expired_is_rejected() {
    let s = signed();
    let expires = s.manifest.expires;
    assert!(s.verify(expires - 1).is_ok());
    assert_eq!(
        s.verify(expires),
        Err(Rejection::Expired {
            expires,
            now: expires
        })
    );
    assert!(s.verify(u64::MAX).is_err());
}

#[test]
fn created_far_in_the_future_is_rejected() {
    let s = signed();
    let created = s.manifest.created;
    // a clock a little behind is fine, a day behind is not
    assert!(s.verify(created - 3600).is_ok());
    assert!(matches!(
        s.verify(created - 86_401),
        Err(Rejection::InvalidTimes { reason }) if reason.contains("after this computer's clock")
    ));
}

fn rejects(change: impl FnOnce(&mut Manifest)) -> Rejection {
    let mut m = sample();
    change(&mut m);
    let err = m.validate().unwrap_err();
    // a signed manifest with the same defect is refused for the same reason
    let s = SignedManifest {
        manifest: m,
        signature: signed().signature,
    };
    assert_eq!(s.verify(NOW).unwrap_err(), err);
    assert!(!err.to_string().is_empty());
    err
}

#[test]
fn unsupported_schema_version() {
    assert_eq!(
        rejects(|m| m.schema_version = 2),
        Rejection::UnsupportedSchemaVersion { found: 2 }
    );
    let json = sample().to_json_string().unwrap().replace(
        "\"schema_version\": 1",
        "\"schema_version\": 7, \"new_field\": true",
    );
    assert_eq!(
        Manifest::from_json_slice(json.as_bytes()),
        Err(Rejection::UnsupportedSchemaVersion { found: 7 })
    );
    let toml = sample()
        .to_toml_string()
        .unwrap()
        .replace("schema_version = 1", "schema_version = 3");
    assert_eq!(
        Manifest::from_toml_str(&toml),
        Err(Rejection::UnsupportedSchemaVersion { found: 3 })
    );
    let toml = sample()
        .to_toml_string()
        .unwrap()
        .replace("schema_version = 1\n", "");
    assert_eq!(
        Manifest::from_toml_str(&toml),
        Err(Rejection::UnsupportedSchemaVersion { found: 0 })
    );
}

#[test]
fn unknown_expert_kind() {
    for kind in ["python", "ffn; rm -rf /", "FFN", "", "my_module.MyExpert"] {
        assert!(matches!(
            rejects(|m| m.expert.kind = kind.into()),
            Rejection::UnknownExpertKind { .. }
        ));
    }
    for kind in ["ffn", "transformer", "nop", "det_dropout"] {
        let mut m = sample();
        m.expert.kind = kind.into();
        m.validate().unwrap();
    }
}

#[test]
fn invalid_dims() {
    let dims = |r: Rejection| matches!(r, Rejection::InvalidDims { .. });
    assert!(dims(rejects(|m| m.expert.hidden_dim = 0)));
    assert!(dims(rejects(|m| m.expert.hidden_dim = MAX_HIDDEN_DIM + 1)));
    assert!(dims(rejects(|m| {
        m.expert.kind = "transformer".into();
        m.expert.hidden_dim = 40;
    })));
    assert!(dims(rejects(|m| m.expert.max_batch_size = 0)));
    assert!(dims(rejects(|m| m.grid = vec![])));
    assert!(dims(rejects(|m| m.grid = vec![4, 0])));
    assert!(dims(rejects(|m| m.grid = vec![257, 256])));
    assert!(dims(rejects(|m| m.grid = vec![usize::MAX, usize::MAX])));
    assert!(dims(rejects(|m| m.grid = vec![1; 9])));
    let mut m = sample();
    m.grid = vec![256, 256];
    m.expert.kind = "transformer".into();
    m.expert.hidden_dim = 1024;
    m.validate().unwrap();
}

#[test]
fn invalid_training_settings() {
    let bad = |r: Rejection| matches!(r, Rejection::InvalidTraining { .. });
    assert!(bad(rejects(|m| m.expert.optimizer.lr = f64::NAN)));
    assert!(bad(rejects(|m| m.expert.optimizer.lr = -1.0)));
    assert!(bad(rejects(|m| m.expert.optimizer.name = "lamb".into())));
    assert!(bad(rejects(|m| m.expert.optimizer.betas = Some([1.0, 0.9]))));
    assert!(bad(rejects(|m| m.expert.optimizer.momentum = Some(0.9))));
    assert!(bad(rejects(|m| m.expert.clip_grad_norm = Some(0.0))));
    assert!(bad(rejects(|m| m.expert.clip_grad_norm = Some(f64::INFINITY))));
    assert!(matches!(
        rejects(|m| m.expert.dtype = "bfloat16".into()),
        Rejection::UnsupportedDtype { dtype } if dtype == "bfloat16"
    ));
    assert!(bad(rejects(|m| m.expert.schedule.warmup_steps = Some(20_000))));
    assert!(bad(rejects(|m| m.expert.schedule.name = "cosine".into())));
}

#[test]
fn invalid_uid_prefix() {
    for prefix in [
        "ffn",
        ".",
        "",
        "ffn..",
        ".ffn.",
        "ffn.01.",
        "f fn.",
        "ffn.x.",
        &"a".repeat(65),
    ] {
        let prefix = prefix.to_owned();
        assert!(
            matches!(
                rejects(|m| m.uid_prefix = prefix.clone()),
                Rejection::InvalidUidPrefix { .. }
            ),
            "{prefix:?}"
        );
    }
    for prefix in ["expert.", "ffn.3.", "my_expert.0.", "ffn-2."] {
        let mut m = sample();
        m.uid_prefix = prefix.into();
        m.validate().unwrap();
    }
}

#[test]
fn invalid_id() {
    for id in [
        "",
        "Tiny",
        "tiny shakespeare",
        "-tiny",
        "tiny-",
        "tiny_ffn",
        &"a".repeat(65),
    ] {
        let id = id.to_owned();
        assert!(matches!(
            rejects(|m| m.id = id.clone()),
            Rejection::InvalidId { .. }
        ));
    }
}

#[test]
fn invalid_bootstrap_multiaddr() {
    for addr in [
        "203.0.113.5:31337",
        "/ip4/203.0.113.5/tcp/31337",
        "/ip4/203.0.113.999/tcp/31337/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",
        "/ip4/203.0.113.5/tcp/99999/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",
        "/ip4/203.0.113.5/tcp/31337/p2p/not-a-peer-id",
        "/ip4/203.0.113.5/tcp/31337/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN/tcp/1",
        "/ip4/203.0.113.5/smtp/25/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",
        "/ip4//tcp/1/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",
        "",
    ] {
        assert!(
            matches!(
                rejects(|m| m.bootstrap_peers.push(addr.into())),
                Rejection::InvalidBootstrapPeer { .. }
            ),
            "{addr:?}"
        );
    }
    assert!(matches!(
        rejects(|m| m.bootstrap_peers = vec![PEER.into(); MAX_BOOTSTRAP_PEERS + 1]),
        Rejection::TooLong { .. }
    ));
}

#[test]
fn text_fields_are_bounded() {
    let too_long = |r: Rejection, f: &str| matches!(r, Rejection::TooLong { field, .. } if field == f);
    assert!(too_long(rejects(|m| m.title = "x".repeat(121)), "title"));
    assert!(too_long(rejects(|m| m.summary = "x".repeat(281)), "summary"));
    assert!(too_long(
        rejects(|m| m.description = "x".repeat(8 * 1024 + 1)),
        "description"
    ));
    assert!(too_long(
        rejects(|m| m.publisher.name = "x".repeat(121)),
        "publisher's name"
    ));
    assert!(too_long(
        rejects(|m| m.homepage = Some(format!("https://{}", "x".repeat(2048)))),
        "homepage"
    ));
    // 120 characters of a multi-byte script still fit
    let mut m = sample();
    m.title = "蜂".repeat(120);
    m.validate().unwrap();
    assert_eq!(
        rejects(|m| m.title = "  ".into()),
        Rejection::EmptyText { field: "title" }
    );
    assert_eq!(
        rejects(|m| m.title = "a\u{0}b".into()),
        Rejection::ControlCharacters { field: "title" }
    );
    assert_eq!(
        rejects(|m| m.description = "a\u{1b}[31m".into()),
        Rejection::ControlCharacters { field: "description" }
    );
    assert_eq!(
        rejects(|m| m.homepage = Some("javascript:alert(1)".into())),
        Rejection::InvalidUrl { field: "homepage" }
    );
    assert_eq!(
        rejects(|m| m.trainer_status_url = Some("file:///etc/passwd".into())),
        Rejection::InvalidUrl {
            field: "trainer status URL"
        }
    );
}

#[test]
fn invalid_times_and_keys() {
    assert!(matches!(
        rejects(|m| m.created = m.expires + 1),
        Rejection::InvalidTimes { .. }
    ));
    assert!(matches!(
        rejects(|m| m.expires = u64::MAX),
        Rejection::InvalidTimes { .. }
    ));
    assert_eq!(
        rejects(|m| m.publisher.public_key = "ssh-rsa AAAA".into()),
        Rejection::InvalidPublisherKey
    );
    assert_eq!(
        rejects(|m| m.publisher.public_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA".into()),
        Rejection::InvalidPublisherKey
    );
}

#[test]
fn oversize_input_is_rejected_without_panicking() {
    let big = "x".repeat(MAX_MANIFEST_BYTES + 1);
    assert!(matches!(
        Manifest::from_toml_str(&big),
        Err(Rejection::TooLong {
            field: "manifest",
            ..
        })
    ));
    assert!(matches!(
        Manifest::from_json_slice(big.as_bytes()),
        Err(Rejection::TooLong {
            field: "manifest",
            ..
        })
    ));
    let big = vec![b' '; MAX_SIGNED_MANIFEST_BYTES + 1];
    assert!(matches!(
        SignedManifest::from_json_slice(&big),
        Err(Rejection::TooLong {
            field: "manifest",
            ..
        })
    ));
    // a manifest made of long-but-legal fields stays under the whole-manifest bound
    let mut m = sample();
    m.description = "x".repeat(8 * 1024);
    m.bootstrap_peers = vec![PEER.into(); MAX_BOOTSTRAP_PEERS];
    m.validate().unwrap();
    // deep nesting just under the size bound
    let deep = "[".repeat(MAX_MANIFEST_BYTES - 10);
    assert!(Manifest::from_json_slice(deep.as_bytes()).is_err());
    assert!(Manifest::from_toml_str(&format!("a = {deep}")).is_err());
    let deep_tables = "a = { b = ".repeat(5000);
    assert!(Manifest::from_toml_str(&deep_tables).is_err());
}

#[test]
fn malformed_inputs() {
    for text in [
        "",
        "schema_version = 1",
        "not toml at all [",
        "schema_version = \"1\"",
    ] {
        let r = Manifest::from_toml_str(text).unwrap_err();
        assert!(matches!(
            r,
            Rejection::Malformed { .. } | Rejection::UnsupportedSchemaVersion { .. }
        ));
    }
    assert!(matches!(
        Manifest::from_toml_str("schema_version = 1\nid = \"x\""),
        Err(Rejection::Malformed { .. })
    ));
    let json = sample()
        .to_json_string()
        .unwrap()
        .replace("\"id\":", "\"surprise\": 1, \"id\":");
    assert!(matches!(
        Manifest::from_json_slice(json.as_bytes()),
        Err(Rejection::Malformed { .. })
    ));
    for bytes in [&b"[]"[..], b"{}", b"{\"manifest\": 1}", b"null", b"\xff\xfe"] {
        assert!(SignedManifest::from_json_slice(bytes).is_err());
    }
    let mut v: serde_json::Value = serde_json::from_slice(&signed().to_json_vec().unwrap()).unwrap();
    v["extra"] = serde_json::Value::Bool(true);
    assert!(matches!(
        SignedManifest::from_json_slice(&serde_json::to_vec(&v).unwrap()),
        Err(Rejection::Malformed { .. })
    ));
}

/// xorshift64*, enough for a fuzz-ish loop without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[test]
fn random_bytes_never_panic() {
    const ALPHABET: &[u8] = b" {}[]\":,0123456789aeE.-x\\";
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let toml_seed = sample().to_toml_string().unwrap().into_bytes();
    let json_seed = signed().to_json_vec().unwrap();
    for round in 0..3000 {
        let bytes: Vec<u8> = match round % 3 {
            // pure noise
            0 => {
                let len = (rng.next() % 512) as usize;
                (0..len).map(|_| rng.next() as u8).collect()
            }
            // mutated TOML
            1 => {
                let mut b = toml_seed.clone();
                for _ in 0..1 + rng.next() % 8 {
                    let i = (rng.next() as usize) % b.len();
                    b[i] = rng.next() as u8;
                }
                b
            }
            // mutated signed JSON
            _ => {
                let mut b = json_seed.clone();
                for _ in 0..1 + rng.next() % 8 {
                    let i = (rng.next() as usize) % b.len();
                    b[i] = ALPHABET[(rng.next() as usize) % ALPHABET.len()];
                }
                b
            }
        };
        if let Ok(text) = std::str::from_utf8(&bytes)
            && let Ok(m) = Manifest::from_toml_str(text)
        {
            let _ = m.validate();
            let _ = m.canonical_bytes();
        }
        if let Ok(m) = Manifest::from_json_slice(&bytes) {
            let _ = m.validate();
        }
        if let Ok(s) = SignedManifest::from_json_slice(&bytes) {
            // mutated copies almost never verify; they must not panic either way
            let _ = s.verify(NOW);
        }
    }
}
