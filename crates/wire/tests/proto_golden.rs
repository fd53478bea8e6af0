//! Every protobuf message kind hivemind puts on the wire, checked both ways against bytes made by
//! hivemind 1.1.12's own `*_pb2` modules (`tests/interop/golden_proto.py`):
//! Apiary decodes hivemind's bytes to the message built here, and Apiary's encoding of that message is
//! byte-identical to hivemind's.

mod common;

use std::collections::BTreeMap;
use std::fmt::Debug;

use apiary_wire::proto::{auth, averaging, crypto, dht, p2pd, runtime, test};
use apiary_wire::rpc::Proto2;
use bytes::Bytes;
use common::unhex;
use prost::Message;

/// The same deterministic bytes as golden_proto.py's `pat(seed, n)`.
fn pat(seed: usize, n: usize) -> Bytes {
    (0..n)
        .map(|i| ((seed + 37 * i) % 256) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn golden() -> BTreeMap<String, (String, Vec<u8>)> {
    let text =
        std::fs::read_to_string(common::golden_dir().join("proto/messages.json")).expect("golden file");
    let json: serde_json::Value = serde_json::from_str(&text).expect("golden json");
    json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().expect("name").to_owned(),
                (
                    c["message"].as_str().expect("message").to_owned(),
                    unhex(c["hex"].as_str().expect("hex")),
                ),
            )
        })
        .collect()
}

/// Decodes hivemind's bytes into `M` with `decode`, compares with `expected`, re-encodes and compares
/// bytes; every strict prefix must be refused or decode to something else, never panic.
fn check_with<M: Message + PartialEq + Debug, E: std::fmt::Display>(
    name: &str,
    hivemind: &[u8],
    expected: M,
    decode: impl Fn(&[u8]) -> Result<M, E>,
) {
    let decoded = decode(hivemind).unwrap_or_else(|e| panic!("{name}: Apiary refuses hivemind's bytes: {e}"));
    assert_eq!(
        decoded, expected,
        "{name}: decoded value differs from the expected message"
    );
    assert_eq!(
        expected.encode_to_vec(),
        hivemind,
        "{name}: Apiary's bytes differ from hivemind's"
    );
    for cut in 0..hivemind.len() {
        if let Ok(m) = decode(&hivemind[..cut]) {
            assert_ne!(
                m, expected,
                "{name}: prefix of {cut} bytes decoded to the whole message"
            );
        }
    }
}

/// A proto3 message: plain prost decoding.
fn check<M: Message + Default + PartialEq + Debug>(name: &str, hivemind: &[u8], expected: M) {
    check_with(name, hivemind, expected, |b| M::decode(b));
}

/// A proto2 message, decoded with its `required` fields enforced as p2pd does, so a prefix that drops
/// a required field is refused.
fn check2<M: Proto2 + PartialEq + Debug>(name: &str, hivemind: &[u8], expected: M) {
    check_with(name, hivemind, expected, |b| M::decode_strict(b));
    assert!(
        M::REQUIRED.is_empty() || M::decode_strict(&[]).is_err(),
        "{name}: empty bytes accepted"
    );
}

fn node(seed: usize) -> Option<dht::NodeInfo> {
    Some(dht::NodeInfo {
        node_id: pat(seed, 20),
    })
}

fn tensor(seed: usize, n: usize) -> runtime::Tensor {
    runtime::Tensor {
        buffer: pat(seed, n),
        ..Default::default()
    }
}

fn access_token() -> auth::AccessToken {
    auth::AccessToken {
        username: "volunteer".into(),
        public_key: pat(3, 300),
        expiration_time: "2026-11-28 12:00:00".into(),
        signature: pat(4, 256),
    }
}

fn request_auth() -> auth::RequestAuthInfo {
    auth::RequestAuthInfo {
        client_access_token: Some(access_token()),
        service_public_key: pat(5, 40),
        time: 1795759842.50162,
        nonce: pat(6, 8),
        signature: pat(7, 256),
    }
}

fn response_auth() -> auth::ResponseAuthInfo {
    auth::ResponseAuthInfo {
        service_access_token: Some(access_token()),
        nonce: pat(6, 8),
        signature: pat(8, 256),
    }
}

fn envelope(
    call: usize,
    message: p2pd::persistent_connection_request::Message,
) -> p2pd::PersistentConnectionRequest {
    p2pd::PersistentConnectionRequest {
        call_id: pat(call, 16),
        message: Some(message),
    }
}

fn call_unary(peer: usize, proto: &str, data: Bytes) -> p2pd::CallUnaryRequest {
    p2pd::CallUnaryRequest {
        peer: pat(peer, 38),
        proto: proto.into(),
        data,
    }
}

fn unary_response(result: p2pd::call_unary_response::Result) -> p2pd::CallUnaryResponse {
    p2pd::CallUnaryResponse { result: Some(result) }
}

#[test]
fn every_message_kind_matches_hivemind_both_ways() {
    use averaging::MessageCode as M;
    use p2pd::call_unary_response::Result as UnaryResult;
    use p2pd::persistent_connection_request::Message as Req;
    use p2pd::persistent_connection_response::Message as Resp;
    use runtime::CompressionType as C;

    let golden = golden();
    let mut seen = Vec::new();
    for (name, (message, bytes)) in &golden {
        let b = bytes.as_slice();
        let n = name.as_str();
        match n {
            "node_info_empty" => check(n, b, dht::NodeInfo::default()),
            "node_info" => check(n, b, node(1).expect("node")),
            "ping_request" => check(
                n,
                b,
                dht::PingRequest {
                    auth: None,
                    peer: node(1),
                    validate: true,
                },
            ),
            "ping_request_auth" => check(
                n,
                b,
                dht::PingRequest {
                    auth: Some(request_auth()),
                    peer: node(1),
                    validate: false,
                },
            ),
            "ping_response" => check(
                n,
                b,
                dht::PingResponse {
                    auth: None,
                    peer: node(2),
                    dht_time: 1795759842.50162,
                    available: true,
                },
            ),
            "ping_response_auth" => check(
                n,
                b,
                dht::PingResponse {
                    auth: Some(response_auth()),
                    peer: node(2),
                    dht_time: 1.5,
                    available: false,
                },
            ),
            "store_request" => check(
                n,
                b,
                dht::StoreRequest {
                    auth: None,
                    keys: vec![pat(10, 20), pat(11, 20), pat(12, 20)],
                    subkeys: vec![
                        Bytes::from_static(b"\xc0"),
                        Bytes::from_static(b"\x05"),
                        Bytes::new(),
                    ],
                    values: vec![pat(13, 7), pat(14, 300), Bytes::new()],
                    expiration_time: vec![1795759842.5, 1795759900.25, 0.0],
                    in_cache: vec![false, true, false],
                    peer: node(1),
                },
            ),
            "store_response" => check(
                n,
                b,
                dht::StoreResponse {
                    auth: None,
                    store_ok: vec![true, false, true],
                    peer: node(2),
                },
            ),
            "find_request" => check(
                n,
                b,
                dht::FindRequest {
                    auth: None,
                    keys: vec![pat(20, 20), pat(21, 20)],
                    peer: node(1),
                },
            ),
            "find_request_client_mode" => check(
                n,
                b,
                dht::FindRequest {
                    auth: None,
                    keys: vec![pat(20, 20)],
                    peer: Some(dht::NodeInfo::default()),
                },
            ),
            "find_response" => check(
                n,
                b,
                dht::FindResponse {
                    auth: None,
                    results: vec![
                        dht::FindResult {
                            r#type: dht::ResultType::NotFound as i32,
                            value: Bytes::new(),
                            expiration_time: 0.0,
                            nearest_node_ids: vec![pat(30, 20), pat(31, 20)],
                            nearest_peer_ids: vec![pat(32, 34), pat(33, 38)],
                        },
                        dht::FindResult {
                            r#type: dht::ResultType::FoundRegular as i32,
                            value: pat(34, 9),
                            expiration_time: 1795759842.50162,
                            nearest_node_ids: vec![],
                            nearest_peer_ids: vec![],
                        },
                        dht::FindResult {
                            r#type: dht::ResultType::FoundDictionary as i32,
                            value: pat(35, 60),
                            expiration_time: 1795759999.0,
                            nearest_node_ids: vec![pat(36, 20)],
                            nearest_peer_ids: vec![pat(37, 34)],
                        },
                    ],
                    peer: node(2),
                },
            ),
            "expert_uid" => check(
                n,
                b,
                runtime::ExpertUid {
                    uid: "ffn.0.5".into(),
                },
            ),
            "expert_info" => check(
                n,
                b,
                runtime::ExpertInfo {
                    serialized_info: pat(40, 250),
                },
            ),
            "tensor_full" => check(
                n,
                b,
                runtime::Tensor {
                    size: vec![2, 3],
                    requires_grad: true,
                    dtype: "float32".into(),
                    compression: C::None as i32,
                    ..tensor(41, 24)
                },
            ),
            "tensor_chunked_head" => check(
                n,
                b,
                runtime::Tensor {
                    size: vec![7, 300000],
                    dtype: "float16".into(),
                    compression: C::Float16 as i32,
                    chunks: 3,
                    ..tensor(42, 100)
                },
            ),
            "tensor_chunk_tail" => check(n, b, tensor(43, 64)),
            "tensor_scalar" => check(
                n,
                b,
                runtime::Tensor {
                    size: vec![],
                    dtype: "float32".into(),
                    ..tensor(44, 4)
                },
            ),
            "tensor_large_dims" => check(
                n,
                b,
                runtime::Tensor {
                    size: vec![u32::MAX, 1, 0],
                    dtype: "uint8".into(),
                    compression: C::Blockwise8bit as i32,
                    ..tensor(45, 3)
                },
            ),
            "expert_request" => check(
                n,
                b,
                runtime::ExpertRequest {
                    uid: "ffn.3.7".into(),
                    tensors: vec![
                        runtime::Tensor {
                            size: vec![2, 4],
                            dtype: "float32".into(),
                            requires_grad: true,
                            ..tensor(46, 32)
                        },
                        runtime::Tensor {
                            size: vec![2, 4],
                            dtype: "float16".into(),
                            compression: C::Float16 as i32,
                            ..tensor(47, 16)
                        },
                    ],
                    metadata: pat(48, 5),
                },
            ),
            "expert_response" => check(
                n,
                b,
                runtime::ExpertResponse {
                    tensors: vec![runtime::Tensor {
                        size: vec![10],
                        dtype: "float32".into(),
                        compression: C::Meanstd16bit as i32,
                        ..tensor(49, 40)
                    }],
                    metadata: Bytes::new(),
                },
            ),
            "expert_response_empty" => check(n, b, runtime::ExpertResponse::default()),
            "join_request" => check(
                n,
                b,
                averaging::JoinRequest {
                    schema_hash: pat(50, 20),
                    expiration: 1795759842.75,
                    gather: pat(51, 12),
                    client_mode: true,
                    group_key: "myrun_grad_averager.0b0110".into(),
                },
            ),
            "message_from_leader" => check(
                n,
                b,
                averaging::MessageFromLeader {
                    code: M::BeginAllreduce as i32,
                    group_id: pat(52, 20),
                    suggested_leader: pat(53, 38),
                    ordered_peer_ids: vec![pat(54, 38), pat(55, 34)],
                    gathered: vec![pat(56, 10), pat(57, 11)],
                },
            ),
            "message_from_leader_rejection" => check(
                n,
                b,
                averaging::MessageFromLeader {
                    code: M::BadGroupKey as i32,
                    ..Default::default()
                },
            ),
            "averaging_data" => check(
                n,
                b,
                averaging::AveragingData {
                    code: M::PartForAveraging as i32,
                    group_id: pat(58, 20),
                    peer_id: pat(59, 38),
                    tensor_part: Some(runtime::Tensor {
                        size: vec![12],
                        dtype: "float32".into(),
                        compression: C::Uniform8bit as i32,
                        ..tensor(60, 48)
                    }),
                    weight: 16.0,
                },
            ),
            "download_request" => check(n, b, averaging::DownloadRequest {}),
            "download_data" => check(
                n,
                b,
                averaging::DownloadData {
                    metadata: pat(61, 30),
                    tensor_part: Some(runtime::Tensor {
                        size: vec![5],
                        dtype: "float32".into(),
                        compression: C::Quantile8bit as i32,
                        ..tensor(62, 20)
                    }),
                },
            ),
            "access_token" => check(n, b, access_token()),
            "request_auth_info" => check(n, b, request_auth()),
            "response_auth_info" => check(n, b, response_auth()),
            "test_request" => check(n, b, test::TestRequest { number: -7 }),
            "test_response" => check(n, b, test::TestResponse { number: 49 }),
            "public_key_ed25519" => check2(
                n,
                b,
                crypto::PublicKey {
                    key_type: crypto::KeyType::Ed25519 as i32,
                    data: pat(70, 32),
                },
            ),
            "private_key_rsa" => check2(
                n,
                b,
                crypto::PrivateKey {
                    key_type: crypto::KeyType::Rsa as i32,
                    data: pat(71, 1190),
                },
            ),
            "public_key_rsa_empty_data" => check2(
                n,
                b,
                crypto::PublicKey {
                    key_type: crypto::KeyType::Rsa as i32,
                    data: Bytes::new(),
                },
            ),
            "envelope_call_unary" => check2(
                n,
                b,
                envelope(
                    80,
                    Req::CallUnary(call_unary(81, "DHTProtocol.rpc_find", pat(82, 50))),
                ),
            ),
            "envelope_call_unary_empty_data" => check2(
                n,
                b,
                envelope(
                    83,
                    Req::CallUnary(call_unary(84, "ExampleServicer.rpc_square", Bytes::new())),
                ),
            ),
            "envelope_unary_response" => check2(
                n,
                b,
                envelope(
                    80,
                    Req::UnaryResponse(unary_response(UnaryResult::Response(pat(85, 70)))),
                ),
            ),
            "envelope_unary_response_empty" => check2(
                n,
                b,
                envelope(
                    80,
                    Req::UnaryResponse(unary_response(UnaryResult::Response(Bytes::new()))),
                ),
            ),
            "envelope_unary_error" => check2(
                n,
                b,
                envelope(
                    80,
                    Req::UnaryResponse(unary_response(UnaryResult::Error(Bytes::from_static(
                        b"ValueError('Expert ffn.9.9 not found')",
                    )))),
                ),
            ),
            "envelope_cancel" => check2(n, b, envelope(86, Req::Cancel(p2pd::Cancel {}))),
            "envelope_add_handler" => check2(
                n,
                b,
                envelope(
                    87,
                    Req::AddUnaryHandler(p2pd::AddUnaryHandlerRequest {
                        proto: "ConnectionHandler.rpc_forward".into(),
                        balanced: true,
                    }),
                ),
            ),
            "envelope_remove_handler" => check2(
                n,
                b,
                envelope(
                    88,
                    Req::RemoveUnaryHandler(p2pd::RemoveUnaryHandlerRequest {
                        proto: "DHTProtocol.rpc_ping".into(),
                    }),
                ),
            ),
            "daemon_request_handling" => check2(
                n,
                b,
                p2pd::PersistentConnectionResponse {
                    call_id: pat(89, 16),
                    message: Some(Resp::RequestHandling(call_unary(
                        90,
                        "DHTProtocol.rpc_store",
                        pat(91, 33),
                    ))),
                },
            ),
            "daemon_call_response" => check2(
                n,
                b,
                p2pd::PersistentConnectionResponse {
                    call_id: pat(89, 16),
                    message: Some(Resp::CallUnaryResponse(unary_response(UnaryResult::Response(
                        pat(92, 12),
                    )))),
                },
            ),
            "daemon_error" => check2(
                n,
                b,
                p2pd::PersistentConnectionResponse {
                    call_id: pat(89, 16),
                    message: Some(Resp::DaemonError(p2pd::DaemonError {
                        message: Some("handler not found".into()),
                    })),
                },
            ),
            "rpc_error" => check2(
                n,
                b,
                p2pd::RpcError {
                    message: Some("Exception('boom')".into()),
                },
            ),
            "rpc_error_end_of_stream" => check2(n, b, p2pd::RpcError { message: None }),
            "control_persistent_upgrade" => check2(
                n,
                b,
                p2pd::Request {
                    r#type: p2pd::request::Type::PersistentConnUpgrade as i32,
                    ..Default::default()
                },
            ),
            "control_stream_open" => check2(
                n,
                b,
                p2pd::Request {
                    r#type: p2pd::request::Type::StreamOpen as i32,
                    stream_open: Some(p2pd::StreamOpenRequest {
                        peer: pat(93, 38),
                        proto: vec!["ConnectionHandler.rpc_forward_stream".into()],
                        timeout: Some(30),
                    }),
                    ..Default::default()
                },
            ),
            "control_response_ok" => check2(
                n,
                b,
                p2pd::Response {
                    r#type: p2pd::response::Type::Ok as i32,
                    ..Default::default()
                },
            ),
            "control_response_identify" => check2(
                n,
                b,
                p2pd::Response {
                    r#type: p2pd::response::Type::Ok as i32,
                    identify: Some(p2pd::IdentifyResponse {
                        id: pat(94, 38),
                        addrs: vec![pat(95, 8), pat(96, 22)],
                    }),
                    ..Default::default()
                },
            ),
            "stream_info" => check2(
                n,
                b,
                p2pd::StreamInfo {
                    peer: pat(97, 38),
                    addr: pat(98, 8),
                    proto: "ConnectionHandler.rpc_backward_stream".into(),
                },
            ),
            other => panic!("golden case {other} ({message}) has no Rust counterpart: add one"),
        }
        seen.push(message.clone());
    }
    // Every message of every file hivemind puts on the wire between peers is covered.
    for kind in [
        "dht.NodeInfo",
        "dht.PingRequest",
        "dht.PingResponse",
        "dht.StoreRequest",
        "dht.StoreResponse",
        "dht.FindRequest",
        "dht.FindResponse",
        "runtime.ExpertUID",
        "runtime.ExpertInfo",
        "runtime.ExpertRequest",
        "runtime.ExpertResponse",
        "runtime.Tensor",
        "averaging.JoinRequest",
        "averaging.MessageFromLeader",
        "averaging.AveragingData",
        "averaging.DownloadRequest",
        "averaging.DownloadData",
        "auth.AccessToken",
        "auth.RequestAuthInfo",
        "auth.ResponseAuthInfo",
        "crypto.PublicKey",
        "crypto.PrivateKey",
        "p2pd.PersistentConnectionRequest",
        "p2pd.PersistentConnectionResponse",
        "p2pd.RPCError",
    ] {
        assert!(seen.iter().any(|s| s == kind), "no golden case covers {kind}");
    }
}
