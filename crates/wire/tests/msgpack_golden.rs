//! Apiary's msgpack and DHTIDs against hivemind 1.1.12's own bytes (`tests/golden/msgpack/msgpack.json`,
//! made by `tests/interop/golden_msgpack.py`), and hivemind decoding Apiary's bytes at test time.

// test helpers outside #[test] fns unwrap too: a broken golden file should fail loudly
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use apiary_wire::dhtid::DhtId;
use apiary_wire::msgpack::{
    self, BatchTensorDescriptor, DecodeError, Device, DictionaryDhtValue, Ext, Int, Number, RpcInfo, Value,
    expert_info,
};
use common::{hex, unhex};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

fn golden() -> Json {
    common::golden_json("msgpack/msgpack.json")
}

fn s(j: &Json) -> &str {
    j.as_str().unwrap_or_else(|| panic!("expected a string, got {j}"))
}

/// The apiary value of a golden description (see golden_msgpack.py's docstring).
fn from_desc(d: &Json) -> Value {
    let a = d.as_array().unwrap_or_else(|| panic!("bad description {d}"));
    match s(&a[0]) {
        "nil" => Value::Nil,
        "bool" => Value::Bool(a[1].as_bool().unwrap()),
        "int" => Value::Int(Int::try_from(s(&a[1]).parse::<i128>().unwrap()).unwrap()),
        "float" => Value::Float(f64::from_bits(u64::from_str_radix(s(&a[1]), 16).unwrap())),
        "str" => Value::Str(s(&a[1]).to_owned()),
        "bin" => Value::Bin(unhex(s(&a[1]))),
        "str_rep" => Value::Str(s(&a[1]).repeat(a[2].as_u64().unwrap() as usize)),
        "bin_rep" => Value::Bin(unhex(s(&a[1])).repeat(a[2].as_u64().unwrap() as usize)),
        "list_rep" => Value::List(vec![from_desc(&a[1]); a[2].as_u64().unwrap() as usize]),
        "list" => Value::List(a[1].as_array().unwrap().iter().map(from_desc).collect()),
        "tuple" => Value::Tuple(a[1].as_array().unwrap().iter().map(from_desc).collect()),
        "dict" => Value::Map(
            a[1].as_array()
                .unwrap()
                .iter()
                .map(|kv| (from_desc(&kv[0]), from_desc(&kv[1])))
                .collect(),
        ),
        "dhtdict" => {
            let number = |j: &Json| from_desc(j).as_number().unwrap();
            let mut d = DictionaryDhtValue::with_maxsize(number(&a[1]));
            for item in a[3].as_array().unwrap() {
                assert!(
                    d.store(from_desc(&item[0]), unhex(s(&item[1])), number(&item[2])),
                    "duplicate in {item}"
                );
            }
            d.set_latest_expiration_time(number(&a[2]));
            Value::DictionaryDhtValue(d)
        }
        "descr" => Value::TensorDescriptor(BatchTensorDescriptor::from_value(&from_desc(&a[1])).unwrap()),
        "ext" => Value::Ext(Ext {
            code: a[1].as_i64().unwrap() as i8,
            data: unhex(s(&a[2])),
        }),
        other => panic!("unknown description tag {other}"),
    }
}

/// Checks bytes against a golden "hex" (or {"len", "sha256"} for big ones).
fn assert_bytes(expected: &Json, actual: &[u8], what: &str) {
    match expected {
        Json::String(h) => assert_eq!(hex(actual), *h, "{what}"),
        Json::Object(o) => {
            assert_eq!(actual.len() as u64, o["len"].as_u64().unwrap(), "{what}: length");
            assert_eq!(hex(&Sha256::digest(actual)), s(&o["sha256"]), "{what}: sha256");
        }
        _ => panic!("{what}: bad golden bytes {expected}"),
    }
}

/// Decode hivemind's bytes to the described value, and encode the value back to hivemind's canonical bytes.
fn check_case(case: &Json) {
    let name = s(&case["name"]);
    let value = from_desc(&case["value"]);
    let encoded = msgpack::encode(&value);
    assert_bytes(&case["canonical"], &encoded, &format!("{name}: encode"));
    assert_eq!(msgpack::encoded_len(&value), encoded.len(), "{name}: encoded_len");
    let mut via_buf = bytes::BytesMut::new();
    msgpack::encode_into(&value, &mut via_buf);
    assert_eq!(&via_buf[..], &encoded[..], "{name}: encode_into");
    match &case["hex"] {
        Json::String(h) => {
            let decoded = msgpack::decode(&unhex(h)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(decoded, value, "{name}: decode");
        }
        // big: encode matched hivemind's digest, so these are hivemind's bytes
        _ => assert_eq!(msgpack::decode(&encoded).unwrap(), value, "{name}: decode"),
    }
}

#[test]
fn values_hivemind_dumps() {
    let g = golden();
    let cases = g["values"].as_array().unwrap();
    assert!(cases.len() > 90);
    for case in cases {
        check_case(case);
        assert_eq!(case["hex"], case["canonical"]);
    }
}

#[test]
fn decode_only_inputs_hivemind_accepts() {
    let g = golden();
    for case in g["decode_only"].as_array().unwrap() {
        check_case(case);
    }
}

#[test]
fn encode_only_values_hivemind_cannot_load() {
    let g = golden();
    for case in g["encode_only"].as_array().unwrap() {
        let name = s(&case["name"]);
        let value = from_desc(&case["value"]);
        assert_eq!(hex(&msgpack::encode(&value)), s(&case["hex"]), "{name}");
        let err = msgpack::decode(&unhex(s(&case["hex"]))).unwrap_err();
        assert!(
            matches!(err, DecodeError::InvalidMapKey { .. }),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn errors_hivemind_rejects() {
    let g = golden();
    for case in g["errors"].as_array().unwrap() {
        let name = s(&case["name"]);
        let bytes = unhex(s(&case["hex"]));
        let result = msgpack::decode(&bytes);
        assert!(
            result.is_err(),
            "{name}: hivemind raises {} but apiary decoded {result:?}",
            case["error"]
        );
    }
}

#[test]
fn dhtids_match_hivemind() {
    let g = golden();
    let ids = g["dhtids"].as_array().unwrap();
    assert!(ids.len() > 20);
    for case in ids {
        let key = from_desc(&case["key"]);
        assert_eq!(
            DhtId::from_key(&key).to_string(),
            s(&case["id"]),
            "DHTID.generate({key:?})"
        );
    }
    for pair in g["dhtid_pairs"].as_array().unwrap() {
        let a = DhtId::from_bytes(&unhex(s(&pair["a"]))).unwrap();
        let b: DhtId = s(&pair["b"]).parse().unwrap();
        assert_eq!(a.xor_distance(&b).to_string(), s(&pair["xor"]));
        assert_eq!(
            u64::from(a.common_prefix_len(&b)),
            pair["common_prefix"].as_u64().unwrap()
        );
        assert_eq!(a < b, pair["a_lt_b"].as_bool().unwrap());
    }
    assert_eq!(
        DhtId::from_key(&Value::from("ffn.0.5")).to_string(),
        "fb166bc637dbb6bf8e27460f94bbf41e1e69c6a4"
    );
}

#[test]
fn rpc_info_of_real_module_backends() {
    let g = golden();
    let infos = g["rpc_info"].as_array().unwrap();
    for case in infos {
        check_case(case);
        let name = s(&case["name"]);
        let decoded = msgpack::decode(&unhex(s(&case["hex"]))).unwrap();
        let info = RpcInfo::from_value(&decoded).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            hex(&info.to_msgpack()),
            s(&case["hex"]),
            "{name}: RpcInfo round trip"
        );
    }
    let by_name = |n: &str| unhex(s(&infos.iter().find(|c| c["name"] == n).unwrap()["hex"]));

    // Appendix B, built with the API: ModuleBackend("ffn.0.5", FeedforwardBlock(4), args_schema=(BatchTensorDescriptor(4),))
    let output = BatchTensorDescriptor::new([4])
        .with_dtype("float32")
        .with_device(Device::cpu())
        .with_requires_grad(true);
    let info = expert_info([BatchTensorDescriptor::new([4])], [], output.clone());
    assert_eq!(msgpack::encode(&info), by_name("appendix_b_ffn"));

    // Server.create(expert_cls="ffn", hidden_dim=1024, compression=FLOAT16): inputs from a sample tensor
    let input = BatchTensorDescriptor::new([1024])
        .with_dtype("torch.float32")
        .with_device(Device::cpu())
        .with_compression(2);
    let output = BatchTensorDescriptor::new([1024])
        .with_dtype("float")
        .with_device(Device::cpu())
        .with_requires_grad(true);
    let info = RpcInfo::new([input], [], output);
    assert_eq!(info.to_msgpack(), by_name("server_create_ffn"));
    assert_eq!(info.keyword_names, Vec::<String>::new());

    // keyword inputs and tuple outputs
    let decoded = msgpack::decode(&by_name("kwargs_tuple_outputs")).unwrap();
    let info = RpcInfo::from_value(&decoded).unwrap();
    assert_eq!(info.keyword_names, vec!["scale".to_owned()]);
    assert_eq!(
        info.kwargs_schema[0]
            .1
            .as_tensor_descriptor()
            .unwrap()
            .instance_size,
        vec![1]
    );
    assert_eq!(info.outputs_schema.as_tuple().unwrap().len(), 2);
}

#[test]
fn declared_dictionaries_typed_view() {
    let g = golden();
    let case = g["values"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "dhtdict_declared_ffn.0.")
        .unwrap();
    let v = msgpack::decode(&unhex(s(&case["hex"]))).unwrap();
    let d = v.as_dictionary().unwrap();
    assert_eq!(d.maxsize(), Number::Float(f64::INFINITY));
    let subkeys: Vec<i64> = d.iter().map(|e| e.subkey.as_i64().unwrap()).collect();
    assert_eq!(subkeys, vec![5, 7]);
    let entry = d.get(&Value::from(5)).unwrap();
    let declared = msgpack::decode(&entry.value).unwrap();
    assert_eq!(declared.as_tuple().unwrap()[0].as_str(), Some("ffn.0.5"));
    // declarations are stored in order with growing expirations: the last one is the latest
    assert_eq!(d.latest_expiration_time(), d.entries()[1].expiration_time);
    assert!(entry.expiration_time.as_f64() < d.latest_expiration_time().as_f64());
}

/// What Apiary sends; hivemind must decode each to the same value and re-encode the same bytes.
fn apiary_values() -> Vec<(String, Value)> {
    let g = golden();
    let mut out = Vec::new();
    for list in ["values", "decode_only"] {
        for case in g[list].as_array().unwrap() {
            let value = from_desc(&case["value"]);
            let small = msgpack::encoded_len(&value) < 4096;
            if small && !matches!(value, Value::Ext(ref e) if e.code != -1) {
                out.push((format!("golden_{}", s(&case["name"])), value));
            }
        }
    }
    let mut prefix = DictionaryDhtValue::new();
    for (i, uid) in ["ffn.7.0", "ffn.7.3", "ffn.7.12"].into_iter().enumerate() {
        let coord: i64 = uid.rsplit('.').next().unwrap().parse().unwrap();
        let declaration = msgpack::encode(&Value::from((uid, "QmApiaryPeer")));
        prefix.store(coord, declaration, 4.2e9 + i as f64);
    }
    prefix.store(-1, msgpack::encode(&Value::Nil), 4.3e9);
    out.push(("api_declared_prefix".into(), prefix.into()));
    let descr = BatchTensorDescriptor::new([128, 16])
        .with_dtype("bfloat16")
        .with_device(Device {
            device_type: "cuda".into(),
            index: Some(0),
        });
    let info = RpcInfo::new(
        [
            descr.clone(),
            BatchTensorDescriptor::new([128]).with_dtype("bool"),
        ],
        [(
            "mask".to_owned(),
            BatchTensorDescriptor::new([128]).with_dtype("bool"),
        )],
        Value::tuple([descr.clone(), descr.with_compression(1)]),
    );
    out.push(("api_rpc_info".into(), info.into()));
    out.push((
        "api_nested".into(),
        Value::map([("k", Value::tuple([Value::list([1u8]), Value::from(())]))]),
    ));
    out.push((
        "api_ints".into(),
        Value::list([Value::Int(Int::MIN), Value::Int(Int::MAX), Value::from(-33)]),
    ));
    out.push((
        "api_floats".into(),
        Value::list([f64::NAN, -0.0, f64::INFINITY, 1e-310]),
    ));
    out
}

#[test]
fn hivemind_loads_apiary_bytes() {
    let values = apiary_values();
    assert!(values.len() > 100);
    let cases: Vec<Json> = values
        .iter()
        .map(|(name, v)| serde_json::json!({"name": name, "hex": hex(&msgpack::encode(v))}))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("apiary_msgpack.json");
    std::fs::write(&file, serde_json::json!({ "cases": cases }).to_string()).unwrap();
    let out = common::run_golden_py(&["msgpack", "loads", file.to_str().unwrap()]);
    let results: Json = serde_json::from_str(&out).unwrap();
    let results = results["results"].as_array().unwrap();
    assert_eq!(results.len(), values.len());
    let mut names = BTreeSet::new();
    for ((name, value), result) in values.iter().zip(results) {
        assert_eq!(s(&result["name"]), name);
        assert!(
            result.get("error").is_none(),
            "{name}: hivemind failed to load apiary's bytes: {}",
            result["error"]
        );
        assert_eq!(
            &from_desc(&result["value"]),
            value,
            "{name}: hivemind decoded a different value"
        );
        assert_eq!(
            s(&result["canonical"]),
            hex(&msgpack::encode(value)),
            "{name}: hivemind re-encodes differently"
        );
        names.insert(name.clone());
    }
    assert_eq!(names.len(), values.len());
}
