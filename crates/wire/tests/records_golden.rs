//! Apiary's `RSASignatureValidator` against hivemind 1.1.12's (`tests/golden/records/`, made by
//! `tests/interop/golden_records.py`): the same verdicts on hivemind-signed and broken records, and hivemind
//! accepting what Apiary signs (checked at test time: RSA-PSS salts are random, so signatures can't be
//! compared byte for byte).

// test helpers outside #[test] fns unwrap too: a broken golden file should fail loudly
#![allow(clippy::unwrap_used)]

mod common;

use apiary_wire::dhtid::DhtId;
use apiary_wire::msgpack::{self, Value};
use apiary_wire::signature::{
    DhtRecord, KeyError, RsaPrivateKey, RsaPublicKey, RsaSignatureValidator, ValidationError,
    find_signatures, strip_signatures, validate_record,
};
use common::{hex, unhex};
use serde_json::Value as Json;

fn golden() -> Json {
    common::golden_json("records/records.json")
}

fn s(j: &Json) -> &str {
    j.as_str().unwrap_or_else(|| panic!("expected a string, got {j}"))
}

fn test_key() -> RsaPrivateKey {
    let der = std::fs::read(common::golden_dir().join("records/test_key.der")).unwrap();
    RsaPrivateKey::from_der(&der).unwrap()
}

fn record_of(r: &Json) -> DhtRecord {
    DhtRecord {
        key: unhex(s(&r["key"])),
        subkey: unhex(s(&r["subkey"])),
        value: unhex(s(&r["value"])),
        expiration_time: f64::from_bits(u64::from_str_radix(s(&r["expiration_bits"]), 16).unwrap()),
    }
}

/// hivemind's verdict in the golden form: `valid`, `invalid` (validate returned False) or `error` (it raised).
fn apiary_verdict(record: &DhtRecord) -> &'static str {
    match validate_record(record) {
        Ok(()) => "valid",
        Err(ValidationError::MalformedOwnerKey(_)) => "error",
        Err(_) => "invalid",
    }
}

#[test]
fn keys_match_hivemind_formats() {
    let g = golden();
    for (name, info) in g["keys"].as_object().unwrap() {
        let der = std::fs::read(common::golden_dir().join("records").join(s(&info["file"]))).unwrap();
        let key = RsaPrivateKey::from_der(&der).unwrap();
        // RSAPrivateKey.to_bytes(): PKCS#1 DER, byte for byte
        assert_eq!(key.to_der().unwrap(), der, "{name}: PKCS#1 DER");
        // RSAPublicKey.to_bytes(): OpenSSH, byte for byte, and the owner marker built from it
        let public = key.public_key();
        assert_eq!(
            public.to_openssh(),
            s(&info["public_key_openssh"]),
            "{name}: OpenSSH"
        );
        assert_eq!(
            hex(&public.owner_marker()),
            s(&info["owner_marker"]),
            "{name}: owner marker"
        );
        assert_eq!(
            RsaPublicKey::from_openssh(s(&info["public_key_openssh"]).as_bytes()).unwrap(),
            public
        );
        assert_eq!(public.bits(), 2048);
        assert_eq!(public.exponent(), vec![1, 0, 1]);
        // load_der_private_key also takes PKCS#8
        let pkcs8 = RsaPrivateKey::from_der(&unhex(s(&info["pkcs8_der"]))).unwrap();
        assert_eq!(pkcs8.public_key(), public, "{name}: PKCS#8");
        // P2P.generate_identity's file: libp2p PrivateKey{RSA, PKCS#1 DER}
        let identity = unhex(s(&info["libp2p_identity"]));
        assert_eq!(
            key.to_libp2p_protobuf().unwrap(),
            identity,
            "{name}: identity protobuf"
        );
        assert_eq!(
            RsaPrivateKey::from_libp2p_protobuf(&identity)
                .unwrap()
                .public_key(),
            public
        );
        let validator = RsaSignatureValidator::new(key);
        assert_eq!(hex(validator.local_public_key()), s(&info["owner_marker"]));
    }
}

#[test]
fn same_verdicts_as_hivemind() {
    let g = golden();
    let records = g["records"].as_array().unwrap();
    let mut seen = [0usize; 3];
    for r in records {
        let name = s(&r["name"]);
        let record = record_of(r);
        if let Some(t) = r["expiration_time"].as_f64() {
            assert_eq!(record.expiration_time, t, "{name}");
        }
        let verdict = apiary_verdict(&record);
        assert_eq!(
            verdict,
            s(&r["verdict"]),
            "{name}: hivemind says {} {}",
            r["verdict"],
            r["error"]
        );
        seen[["valid", "invalid", "error"]
            .iter()
            .position(|v| *v == verdict)
            .unwrap()] += 1;
        // strip_value and the signed message (msgpack tuple of key, subkey, stripped value, expiration)
        let stripped = strip_signatures(&record.value);
        assert_eq!(hex(&stripped), s(&r["stripped"]), "{name}: strip_value");
        assert_eq!(
            hex(&record.with_value(stripped).signed_message()),
            s(&r["signed_message"]),
            "{name}: message"
        );
    }
    assert!(
        seen.iter().all(|&n| n >= 5),
        "valid/invalid/error counts {seen:?}"
    );
}

#[test]
fn hivemind_signatures_verify_and_fail_when_tampered() {
    let g = golden();
    let public = test_key().public_key();
    let good = g["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "signed_owner_subkey")
        .unwrap();
    let record = record_of(good);
    let sigs = find_signatures(&record.value);
    assert_eq!(sigs.len(), 1);
    let message = record
        .with_value(strip_signatures(&record.value))
        .signed_message();
    assert!(public.verify(&message, sigs[0]));
    let mut other = message.clone();
    *other.last_mut().unwrap() ^= 1;
    assert!(!public.verify(&other, sigs[0]));
    assert!(!public.verify(&message, b"AAAA"));
    assert!(!public.verify(&message, b""));
}

/// A fresh Apiary key signs; the record set covers protected, unprotected and tampered records.
fn apiary_records(
    validator: &RsaSignatureValidator,
    name_prefix: &str,
) -> Vec<(String, DhtRecord, &'static str)> {
    let marker = validator.local_public_key().to_vec();
    let owned_subkey = msgpack::encode(&Value::bin(marker.clone()));
    let key = DhtId::from_key(&Value::from("apiary_run_progress"));
    let value = msgpack::encode(&Value::map([
        ("peer_id", Value::bin(b"\x00\x24\x08\x01".to_vec())),
        ("epoch", Value::from(7)),
        ("samples_per_second", Value::from(123.5)),
    ]));
    let sign = |r: DhtRecord| {
        let value = validator.sign_value(&r).unwrap();
        r.with_value(value)
    };
    let good = sign(DhtRecord::new(key, owned_subkey.clone(), value.clone(), 4.1e9));
    let mut tampered_value = good.clone();
    tampered_value.value[3] ^= 0x20;
    // a hivemind key that neither Apiary validator holds
    let hivemind_marker = unhex(s(&golden()["keys"]["other"]["owner_marker"]));
    let mut out = vec![
        ("owner_subkey", good.clone(), "valid"),
        (
            "owner_in_key",
            sign(DhtRecord {
                key: [b"p".as_slice(), &marker].concat(),
                ..good.with_value(value.clone())
            }),
            "valid",
        ),
        (
            "empty_value",
            sign(DhtRecord::new(key, owned_subkey.clone(), Vec::new(), 4.1e9)),
            "valid",
        ),
        (
            "infinite_expiration",
            sign(DhtRecord::new(
                key,
                owned_subkey.clone(),
                value.clone(),
                f64::INFINITY,
            )),
            "valid",
        ),
        (
            "regular_unprotected",
            sign(DhtRecord::regular(key, value.clone(), 4.1e9)),
            "valid",
        ),
        (
            "dictionary_item_unprotected",
            sign(DhtRecord::new(
                key,
                msgpack::encode(&Value::from(5)),
                value.clone(),
                4.1e9,
            )),
            "valid",
        ),
        ("tampered_value", tampered_value, "invalid"),
        (
            "tampered_expiration",
            DhtRecord {
                expiration_time: 4.1e9 + 0.5,
                ..good.clone()
            },
            "invalid",
        ),
        (
            "tampered_key",
            DhtRecord {
                key: DhtId::from_key(&Value::from("x")).to_bytes().to_vec(),
                ..good.clone()
            },
            "invalid",
        ),
        (
            "signature_stripped",
            good.with_value(strip_signatures(&good.value)),
            "invalid",
        ),
        (
            "signature_twice",
            good.with_value([good.value.clone(), good.value[value.len()..].to_vec()].concat()),
            "invalid",
        ),
        (
            "claims_other_owner",
            DhtRecord {
                subkey: msgpack::encode(&Value::bin(hivemind_marker.clone())),
                ..good.clone()
            },
            "invalid",
        ),
        (
            "two_owners",
            DhtRecord {
                key: [b"p".as_slice(), &hivemind_marker].concat(),
                ..good.clone()
            },
            "invalid",
        ),
    ];
    // sign_value leaves records this key does not own alone
    let foreign = DhtRecord::new(
        key,
        msgpack::encode(&Value::bin(hivemind_marker)),
        value.clone(),
        4.1e9,
    );
    assert_eq!(validator.sign_value(&foreign).unwrap(), value);
    out.push(("foreign_owner_unsigned", foreign, "invalid"));
    out.into_iter()
        .map(|(n, r, v)| (format!("{name_prefix}{n}"), r, v))
        .collect()
}

#[test]
fn hivemind_accepts_apiary_signatures() {
    let fresh = RsaSignatureValidator::new(RsaPrivateKey::generate().unwrap());
    let committed = RsaSignatureValidator::new(test_key());
    let mut records = apiary_records(&fresh, "fresh_");
    records.extend(apiary_records(&committed, "committed_"));
    for (name, record, expected) in &records {
        assert_eq!(apiary_verdict(record), *expected, "{name}: apiary's own verdict");
    }
    let json: Vec<Json> = records
        .iter()
        .map(|(name, r, _)| {
            serde_json::json!({
                "name": name,
                "key": hex(&r.key),
                "subkey": hex(&r.subkey),
                "value": hex(&r.value),
                "expiration_bits": format!("{:016x}", r.expiration_time.to_bits()),
            })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("apiary_records.json");
    std::fs::write(&file, serde_json::json!({ "records": json }).to_string()).unwrap();
    let out = common::run_golden_py(&["records", "verify", file.to_str().unwrap()]);
    let results: Json = serde_json::from_str(&out).unwrap();
    let results = results["results"].as_array().unwrap();
    assert_eq!(results.len(), records.len());
    for ((name, record, expected), result) in records.iter().zip(results) {
        assert_eq!(s(&result["name"]), name);
        assert_eq!(
            s(&result["verdict"]),
            *expected,
            "{name}: hivemind's verdict ({})",
            result["error"]
        );
        assert_eq!(
            s(&result["stripped"]),
            hex(&strip_signatures(&record.value)),
            "{name}: strip_value"
        );
    }
}

#[test]
fn signatures_are_randomized_base64() {
    let key = test_key();
    let a = key.sign(b"message").unwrap();
    let b = key.sign(b"message").unwrap();
    assert_ne!(a, b, "PSS salts are random");
    assert_eq!(a.len(), 344); // base64 of 256 bytes, padded
    assert!(a.ends_with(b"=="));
    assert!(key.public_key().verify(b"message", &a) && key.public_key().verify(b"message", &b));
    assert!(!key.public_key().verify(b"other", &a));
}

#[test]
fn key_parsing_errors_are_typed() {
    assert!(matches!(
        RsaPrivateKey::from_der(b"not a key"),
        Err(KeyError::PrivateKeyDer)
    ));
    assert!(matches!(
        RsaPrivateKey::from_libp2p_protobuf(b"\x08\x01\x12\x00"),
        Err(KeyError::NotRsa { key_type: 1 })
    ));
    assert!(RsaPrivateKey::from_libp2p_protobuf(b"\xff").is_err());
    for bad in [
        &b""[..],
        b"ssh-rsa",
        b"ssh-rsa ",
        b"ssh-rsa\tAAAA",
        b"ssh-ed25519 AAAA",
        b" ssh-rsa AAAA",
        b"ssh-rsa\nAAAA",
    ] {
        assert!(RsaPublicKey::from_openssh(bad).is_err(), "{bad:?}");
    }
    // every truncation of a real key line fails cleanly
    let line = test_key().public_key().to_openssh();
    for cut in 0..line.len() - 4 {
        assert!(
            RsaPublicKey::from_openssh(&line.as_bytes()[..cut]).is_err(),
            "cut {cut}"
        );
    }
}
