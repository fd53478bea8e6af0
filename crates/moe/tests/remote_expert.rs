//! `P2pTransport` / `RemoteExpert` against real servers on 127.0.0.1: an Apiary `ExpertServer` (compared
//! with an in-process `ExpertBackend` of the same seed) and real hivemind 1.1.12 servers (compared with
//! hivemind's own `RemoteExpert` client and with finite differences of the server's forward pass).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apiary_expert::runtime::{Runtime, RuntimeConfig};
use apiary_expert::schema::ExpertSchema;
use apiary_expert::server::{
    ExpertServer, RPC_BACKWARD, RPC_BACKWARD_STREAM, RPC_FORWARD, RPC_FORWARD_STREAM, RPC_INFO,
};
use apiary_expert::{BackendConfig, Expert, ExpertBackend, ExpertConfig, ExpertKind};
use apiary_moe::transport::{
    ExpertAddr, ExpertTransport, P2pTransport, RemoteExpert, Rpc, TransportConfig, TransportError,
};
use apiary_p2p::{Host, Multiaddr, P2pConfig, P2pHandle, PeerId, UnaryHandler};
use apiary_testkit::{HivemindPeer, hivemind_oneshot};
use apiary_wire::proto::runtime::{CompressionType, ExpertInfo, ExpertRequest, ExpertResponse, ExpertUid};
use apiary_wire::tensor::{self, Tensor as WireTensor};
use bytes::Bytes;
use candle_core::{Device, Tensor};
use futures::FutureExt;
use prost::Message;

async fn host() -> (P2pHandle, Multiaddr) {
    let (p2p, _task) = Host::spawn(P2pConfig::default()).unwrap();
    let addr = p2p.listen("/ip4/127.0.0.1/tcp/0".parse().unwrap()).await.unwrap();
    let full = addr.with_p2p(p2p.local_peer_id()).unwrap();
    (p2p, full)
}

fn backend(hidden: usize, seed: u64) -> ExpertBackend {
    let expert = Expert::new(ExpertConfig::new(ExpertKind::Ffn, hidden), seed).unwrap();
    ExpertBackend::new(expert, BackendConfig::default()).unwrap()
}

/// An Apiary expert server of seeded `ffn` experts `(uid, hidden, seed)`, without the handlers named in
/// `without` (to prove which RPCs a client uses).
async fn apiary_server(experts: &[(&str, usize, u64)], without: &[&str]) -> (P2pHandle, Multiaddr) {
    let backends = experts
        .iter()
        .map(|(uid, hidden, seed)| (uid.to_string(), backend(*hidden, *seed)))
        .collect();
    let runtime = Runtime::spawn(backends, RuntimeConfig::default()).unwrap();
    let schemas = experts
        .iter()
        .map(|(uid, hidden, _)| {
            let schema = ExpertSchema::server_create(ExpertKind::Ffn, *hidden, CompressionType::None, 4096);
            (uid.to_string(), schema)
        })
        .collect::<HashMap<_, _>>();
    let server = ExpertServer::new(runtime, schemas);
    let (p2p, addr) = host().await;
    server.register(&p2p).unwrap();
    for name in without {
        assert!(p2p.remove_handler(name));
    }
    (p2p, addr)
}

/// A client host connected to `server`, and its transport.
async fn client(server: &Multiaddr, config: TransportConfig) -> (PeerId, Arc<dyn ExpertTransport>) {
    let (p2p, _) = host().await;
    let peer = p2p.dial(server.clone()).await.unwrap();
    (peer, Arc::new(P2pTransport::new(p2p, config)))
}

/// Deterministic values of unit variance (uniform on ±√3).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.464
        })
        .collect()
}

fn rand(seed: u64, rows: usize, cols: usize) -> Tensor {
    Tensor::from_vec(values(seed, rows * cols), (rows, cols), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    flat(a)
        .iter()
        .zip(flat(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    flat(a)
        .iter()
        .zip(flat(b))
        .map(|(x, y)| *x as f64 * y as f64)
        .sum()
}

fn all_finite(t: &Tensor) -> bool {
    flat(t).iter().all(|v| v.is_finite())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_match_an_in_process_backend_through_training_steps() {
    const H: usize = 64;
    // stream handlers removed: small calls must go unary
    let (_server, addr) = apiary_server(
        &[("ffn.0", H, 11), ("ffn.1", H, 12)],
        &[RPC_FORWARD_STREAM, RPC_BACKWARD_STREAM],
    )
    .await;
    let (peer, transport) = client(&addr, TransportConfig::default()).await;
    let expert = RemoteExpert::new(ExpertAddr::new("ffn.0", peer), transport.clone());
    assert_eq!(expert.uid(), "ffn.0");
    assert_eq!(expert.peer(), peer);
    let info = expert.info().await.unwrap();
    assert_eq!(info.inputs.len(), 1);
    assert_eq!(info.inputs[0].instance_size, vec![H as u64]);
    assert_eq!(info.input_compressions(), vec![CompressionType::None]);
    assert_eq!(info.outputs[0].instance_size, vec![H as u64]);
    assert_eq!(info.outputs[0].dtype_name(), Some("float32"));

    let mut reference = backend(H, 11);
    for step in 0..3u64 {
        let x = rand(100 + step, 5, H);
        let y = expert.forward(vec![x.clone()]).await.unwrap();
        let y_ref = reference.forward(std::slice::from_ref(&x)).unwrap();
        assert_eq!(y.len(), 1);
        assert!(max_abs_diff(&y[0], &y_ref[0]) < 1e-5, "forward at step {step}");
        let g = rand(200 + step, 5, H);
        let dx = expert.backward(vec![x.clone()], vec![g.clone()]).await.unwrap();
        let dx_ref = reference.backward(&[x], &[g]).unwrap();
        assert_eq!(dx.len(), 1);
        assert!(max_abs_diff(&dx[0], &dx_ref[0]) < 1e-5, "backward at step {step}");
    }
    // both took three optimizer steps: they still agree, and differ from a fresh expert
    let x = rand(7, 3, H);
    let y = expert.forward(vec![x.clone()]).await.unwrap();
    assert!(max_abs_diff(&y[0], &reference.forward(std::slice::from_ref(&x)).unwrap()[0]) < 1e-5);
    assert!(max_abs_diff(&y[0], &backend(H, 11).forward(&[x]).unwrap()[0]) > 1e-4);

    // the other expert is untouched and served by the same transport
    let other = RemoteExpert::new(ExpertAddr::new("ffn.1", peer), transport);
    let x = rand(8, 2, H);
    let y = other.forward(vec![x.clone()]).await.unwrap();
    assert!(max_abs_diff(&y[0], &backend(H, 12).forward(&[x]).unwrap()[0]) < 1e-5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_take_the_stream_path() {
    const H: usize = 1024;
    const ROWS: usize = 600; // 2.4 MB of input: above hivemind's 2 MiB unary payload
    // unary compute handlers removed: large calls must stream
    let (_server, addr) = apiary_server(&[("big.0", H, 5)], &[RPC_FORWARD, RPC_BACKWARD]).await;
    let (peer, transport) = client(&addr, TransportConfig::default()).await;
    let expert = RemoteExpert::new(ExpertAddr::new("big.0", peer), transport);
    let mut reference = backend(H, 5);

    let x = rand(1, ROWS, H);
    let y = expert.forward(vec![x.clone()]).await.unwrap();
    assert_eq!(y[0].dims(), &[ROWS, H]);
    assert!(max_abs_diff(&y[0], &reference.forward(std::slice::from_ref(&x)).unwrap()[0]) < 1e-5);

    let g = rand(2, ROWS, H);
    let dx = expert.backward(vec![x.clone()], vec![g.clone()]).await.unwrap();
    let dx_ref = reference.backward(std::slice::from_ref(&x), &[g]).unwrap();
    assert_eq!(dx[0].dims(), &[ROWS, H]);
    assert!(max_abs_diff(&dx[0], &dx_ref[0]) < 1e-5);

    let y = expert.forward(vec![x.clone()]).await.unwrap();
    assert!(max_abs_diff(&y[0], &reference.forward(&[x]).unwrap()[0]) < 1e-5);

    // a small batch would go unary, which this server does not serve
    let err = expert.forward(vec![rand(3, 2, H)]).await.unwrap_err();
    assert!(
        matches!(&err, TransportError::Unreachable { reason, .. } if reason.contains(RPC_FORWARD)),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_experts_and_bad_inputs_are_clear_errors_and_the_server_keeps_serving() {
    const H: usize = 16;
    let (_server, addr) = apiary_server(&[("ffn.0", H, 1)], &[]).await;
    let (peer, transport) = client(&addr, TransportConfig::default()).await;

    let unknown = ExpertAddr::new("ffn.9", peer);
    let err = transport
        .forward(&unknown, vec![rand(1, 2, H)])
        .await
        .unwrap_err();
    match &err {
        TransportError::Remote { uid, rpc, message } => {
            assert_eq!(uid, "ffn.9");
            assert_eq!(*rpc, Rpc::Info);
            assert!(
                message.contains("unknown expert") && message.contains("ffn.9"),
                "{message}"
            );
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    assert!(err.to_string().contains("ffn.9"), "{err}");
    assert!(matches!(
        transport.info(&unknown).await,
        Err(TransportError::Remote { .. })
    ));

    let good = ExpertAddr::new("ffn.0", peer);
    let wide = rand(1, 2, H + 1);
    let err = transport.forward(&good, vec![wide]).await.unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::BadInput {
                rpc: Rpc::Forward,
                ..
            }
        ),
        "{err}"
    );
    let err = transport
        .backward(&good, vec![rand(1, 2, H)], vec![])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::BadInput {
                rpc: Rpc::Backward,
                ..
            }
        ),
        "{err}"
    );
    // the server refuses what only it can check (an empty batch) with its own text
    let err = transport.forward(&good, vec![rand(1, 0, H)]).await.unwrap_err();
    assert!(
        matches!(&err, TransportError::Remote { message, .. } if message.contains("empty batch")),
        "{err}"
    );

    // a peer nobody knows
    let nowhere = ExpertAddr::new("ffn.0", PeerId::random());
    let err = transport
        .forward(&nowhere, vec![rand(1, 2, H)])
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Unreachable { .. }), "{err}");

    let y = transport.forward(&good, vec![rand(2, 3, H)]).await.unwrap();
    assert_eq!(y[0].dims(), &[3, H]);
    assert!(all_finite(&y[0]));
}

/// A hand-made server whose replies are wrong in every way a transport must survive.
async fn misbehaving_server() -> (P2pHandle, Multiaddr) {
    const H: usize = 4;
    let (p2p, addr) = host().await;
    let schema = ExpertSchema::server_create(ExpertKind::Ffn, H, CompressionType::None, 64);
    let info: UnaryHandler = Arc::new(move |_peer, bytes: Bytes| {
        let info = Bytes::from(schema.rpc_info());
        async move {
            let uid = ExpertUid::decode(bytes).unwrap().uid;
            let serialized_info = match uid.as_str() {
                "junk.0" => Bytes::from_static(b"\x93\x01\x02"), // a list, not the info dict
                _ => info,
            };
            Ok(Bytes::from(ExpertInfo { serialized_info }.encode_to_vec()))
        }
        .boxed()
    });
    p2p.add_unary_handler(RPC_INFO, info).unwrap();
    let reply = |tensors: Vec<WireTensor>| {
        Bytes::from(
            ExpertResponse {
                tensors: tensors
                    .iter()
                    .map(|t| tensor::serialize(t, CompressionType::None).unwrap())
                    .collect(),
                ..Default::default()
            }
            .encode_to_vec(),
        )
    };
    let rows = |n: usize, h: usize| WireTensor::from_vec(vec![n, h], vec![0.5f32; n * h]).unwrap();
    let compute: UnaryHandler = Arc::new(move |_peer, bytes: Bytes| {
        async move {
            let request = ExpertRequest::decode(bytes).unwrap();
            let n = request.tensors[0].size[0] as usize;
            match request.uid.as_str() {
                "shape.0" => Ok(reply(vec![rows(H, n)])),
                "big.0" => Ok(reply(vec![rows(n, H + 1)])),
                "count.0" => Ok(reply(vec![rows(n, H), rows(n, H)])),
                "none.0" => Ok(reply(vec![])),
                "garbage.0" => Ok(Bytes::from_static(b"\xff\xff\xff")),
                "ints.0" => Ok(reply(vec![
                    WireTensor::from_vec(vec![n, H], vec![1i64; n * H]).unwrap(),
                ])),
                "lying.0" => {
                    let mut t = tensor::serialize(&rows(n, H), CompressionType::None).unwrap();
                    t.size = vec![1 << 30, 1 << 30];
                    Ok(Bytes::from(
                        ExpertResponse {
                            tensors: vec![t],
                            ..Default::default()
                        }
                        .encode_to_vec(),
                    ))
                }
                "slow.0" => {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok(reply(vec![rows(n, H)]))
                }
                _ => Ok(reply(vec![rows(n, H)])),
            }
        }
        .boxed()
    });
    p2p.add_unary_handler(RPC_FORWARD, compute.clone()).unwrap();
    p2p.add_unary_handler(RPC_BACKWARD, compute).unwrap();
    (p2p, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replies_and_slow_servers_are_errors_not_panics() {
    let (_server, addr) = misbehaving_server().await;
    let config = TransportConfig {
        forward_timeout: Duration::from_millis(500),
        ..TransportConfig::default()
    };
    let (peer, transport) = client(&addr, config).await;
    let x = || vec![rand(1, 3, 4)];
    let at = |uid: &str| ExpertAddr::new(uid, peer);

    let err = transport.info(&at("junk.0")).await.unwrap_err();
    assert!(matches!(err, TransportError::BadInfo { .. }), "{err}");
    for (uid, expect) in [
        ("shape.0", "expected shape [3, 4], got [4, 3]"),
        ("big.0", "the limit is 12"),
        ("count.0", "expected 1 tensors, got 2"),
        ("none.0", "expected 1 tensors, got 0"),
        ("garbage.0", "malformed"),
        ("ints.0", "expected float32, got int64"),
        ("lying.0", "tensor 0"),
    ] {
        let err = transport.forward(&at(uid), x()).await.unwrap_err();
        assert!(
            matches!(&err, TransportError::BadReply { reason, .. } if reason.contains(expect)),
            "{uid}: {err}"
        );
    }
    // backward replies are checked against the inputs' shapes
    let err = transport
        .backward(&at("count.0"), x(), vec![rand(2, 3, 4)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::BadReply {
                rpc: Rpc::Backward,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        transport
            .backward(&at("fine.0"), x(), vec![rand(2, 3, 4)])
            .await
            .unwrap()[0]
            .dims(),
        &[3, 4]
    );

    let start = Instant::now();
    let err = transport.forward(&at("slow.0"), x()).await.unwrap_err();
    assert!(
        matches!(err, TransportError::Timeout { rpc: Rpc::Forward, after, .. } if after == Duration::from_millis(500)),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    // and the connection still works
    assert_eq!(
        transport.forward(&at("fine.0"), x()).await.unwrap()[0].dims(),
        &[3, 4]
    );
}

/// Starts `hivemind_peer.py server` off the async runtime.
async fn hivemind_server(args: Vec<&'static str>) -> HivemindPeer {
    tokio::task::spawn_blocking(move || HivemindPeer::spawn("server", &args, Duration::from_secs(180)))
        .await
        .unwrap()
}

async fn oneshot(args: Vec<String>) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || hivemind_oneshot(&args))
        .await
        .unwrap();
    assert_eq!(out["event"], "result", "{out}");
    out
}

/// hivemind's `RemoteExpert` and Apiary's, fed the same seeded input, get the same output from a
/// hivemind server that declares FLOAT16 input compression (so both must compress it alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hivemind_server_forward_matches_hivemind_client() {
    const H: usize = 64;
    const ROWS: usize = 4;
    let hivemind = hivemind_server(vec![
        "--expert-uids",
        "ffn.0",
        "--expert-cls",
        "ffn",
        "--hidden-dim",
        "64",
        "--compression",
        "FLOAT16",
    ])
    .await;
    let maddr: Multiaddr = hivemind.maddr().parse().unwrap();
    let (peer, transport) = client(&maddr, TransportConfig::default()).await;
    assert_eq!(peer.to_string(), hivemind.peer_id());
    let expert = RemoteExpert::new(ExpertAddr::new("ffn.0", peer), transport);

    let info = expert.info().await.unwrap();
    assert_eq!(info.inputs.len(), 1);
    assert_eq!(info.inputs[0].instance_size, vec![H as u64]);
    assert_eq!(info.input_compressions(), vec![CompressionType::Float16]);
    assert_eq!(info.outputs[0].instance_size, vec![H as u64]);
    assert_eq!(info.grad_output_compressions(), vec![CompressionType::None]);
    assert!(info.rpc_info.keyword_names.is_empty());

    // the input hivemind's `call` mode draws: torch.manual_seed(7); torch.randn(4, 64)
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.pb").to_string_lossy().into_owned();
    let encoded = oneshot(
        ["encode", "--shape", "4", "64", "--seed", "7", "--out", &out]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let x: Vec<f32> = encoded["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let x = Tensor::from_vec(x, (ROWS, H), &Device::Cpu).unwrap();

    let y = expert.forward(vec![x.clone()]).await.unwrap();
    assert_eq!(y[0].dims(), &[ROWS, H]);
    assert!(all_finite(&y[0]));
    let reference = oneshot(
        [
            "call",
            "--initial-peers",
            hivemind.maddr(),
            "--uid",
            "ffn.0",
            "--hidden-dim",
            "64",
            "--batch",
            "4",
            "--seed",
            "7",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    assert_eq!(reference["shape"], serde_json::json!([ROWS, H]));
    let abs_sum: f64 = flat(&y[0]).iter().map(|v| v.abs() as f64).sum();
    let sum: f64 = flat(&y[0]).iter().map(|v| *v as f64).sum();
    let ref_abs_sum = reference["out_abs_sum"].as_f64().unwrap();
    let ref_sum = reference["out_sum"].as_f64().unwrap();
    eprintln!("sum |y|: apiary {abs_sum}, hivemind {ref_abs_sum}; sum y: apiary {sum}, hivemind {ref_sum}");
    assert!(
        (abs_sum - ref_abs_sum).abs() <= 1e-6 * ref_abs_sum,
        "sum |y|: apiary {abs_sum}, hivemind {ref_abs_sum}"
    );
    assert!(
        (sum - ref_sum).abs() <= 1e-3,
        "sum y: apiary {sum}, hivemind {ref_sum}"
    );

    // backward through the unary path: input gradients of the right shape
    let g = rand(9, ROWS, H);
    let dx = expert.backward(vec![x], vec![g]).await.unwrap();
    assert_eq!(dx[0].dims(), &[ROWS, H]);
    assert!(all_finite(&dx[0]));
    drop(hivemind);
}

/// `<backward(x, g), v>` against the central difference of `<forward(·), g>` along `v`, every forward
/// taken before the backward (which steps the expert's optimizer).
async fn check_gradient(expert: &RemoteExpert, rows: usize, hidden: usize, seed: u64) -> (Tensor, Tensor) {
    const EPS: f64 = 1e-2;
    let x = rand(seed, rows, hidden);
    let g = rand(seed + 1, rows, hidden);
    let v = rand(seed + 2, rows, hidden);
    let step = (&v * EPS).unwrap();
    let plus = expert.forward(vec![(&x + &step).unwrap()]).await.unwrap();
    let minus = expert.forward(vec![(&x - &step).unwrap()]).await.unwrap();
    let y = expert.forward(vec![x.clone()]).await.unwrap();
    let fd = (dot(&plus[0], &g) - dot(&minus[0], &g)) / (2.0 * EPS);
    let dx = expert.backward(vec![x.clone()], vec![g]).await.unwrap();
    assert_eq!(dx[0].dims(), &[rows, hidden]);
    assert!(all_finite(&dx[0]));
    let analytic = dot(&dx[0], &v);
    eprintln!("{rows} rows: <dx, v> = {analytic}, finite difference {fd}");
    assert!(
        (fd - analytic).abs() <= 1e-3 * analytic.abs().max(1.0),
        "{rows} rows: <dx, v> = {analytic}, finite difference {fd}"
    );
    (x, y[0].clone())
}

/// A hivemind server's forward and backward over both paths: unary for a small batch, streamed for a
/// 600 × 1024 one (checked against the same rows sent unary in halves), gradients against finite
/// differences, and the server's optimizer step visible in the next forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hivemind_server_backward_over_unary_and_stream_paths() {
    const H: usize = 1024;
    const ROWS: usize = 600;
    let hivemind = hivemind_server(vec![
        "--expert-uids",
        "ffn.0",
        "--expert-cls",
        "ffn",
        "--hidden-dim",
        "1024",
    ])
    .await;
    let maddr: Multiaddr = hivemind.maddr().parse().unwrap();
    let (peer, transport) = client(&maddr, TransportConfig::default()).await;
    let expert = RemoteExpert::new(ExpertAddr::new("ffn.0", peer), transport.clone());
    let info = expert.info().await.unwrap();
    assert_eq!(info.inputs[0].instance_size, vec![H as u64]);
    assert_eq!(info.input_compressions(), vec![CompressionType::None]);

    // unary: 4 rows
    let (x, y_before) = check_gradient(&expert, 4, H, 10).await;
    let y_after = expert.forward(vec![x]).await.unwrap();
    assert!(
        max_abs_diff(&y_before, &y_after[0]) > 1e-5,
        "the server's optimizer step should change the output"
    );

    // stream: 600 rows (2.4 MB), against the same rows in two unary halves
    let big = rand(20, ROWS, H);
    let streamed = expert.forward(vec![big.clone()]).await.unwrap();
    assert_eq!(streamed[0].dims(), &[ROWS, H]);
    let half = ROWS / 2;
    let first = expert
        .forward(vec![big.narrow(0, 0, half).unwrap()])
        .await
        .unwrap();
    let second = expert
        .forward(vec![big.narrow(0, half, half).unwrap()])
        .await
        .unwrap();
    let unary = Tensor::cat(&[&first[0], &second[0]], 0).unwrap();
    assert!(max_abs_diff(&streamed[0], &unary) < 1e-5);
    // backward streams inputs and gradients (4.9 MB)
    check_gradient(&expert, ROWS, H, 30).await;

    // an unknown uid is the server's error, and it keeps serving
    let err = transport
        .forward(&ExpertAddr::new("ffn.404", peer), vec![rand(1, 2, H)])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TransportError::Remote { rpc: Rpc::Info, message, .. } if message.contains("ffn.404")),
        "{err}"
    );
    assert_eq!(
        expert.forward(vec![rand(2, 2, H)]).await.unwrap()[0].dims(),
        &[2, H]
    );
    drop(hivemind);
}
