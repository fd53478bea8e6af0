//! `apiary server` hosting experts that real hivemind 1.1.12 clients find through the DHT and call:
//! forward and backward, unary and stream, with the compressions a server can declare; results equal
//! hivemind's own module holding the same weights. Clean shutdown writes checkpoints.

#![allow(clippy::unwrap_used)] // test helpers as well as tests

mod common;

use std::path::Path;

use apiary_expert::{Expert, ExpertConfig, ExpertKind};
use common::{Node, hivemind};

const HIDDEN: usize = 64;

/// A server for `uids` (`ffn`s of [`HIDDEN`]) whose weights are saved in `dir` first; returns it and the
/// weights files.
fn server(dir: &Path, uids: &[&str], compression: &str) -> (Node, Vec<String>) {
    let mut files = Vec::new();
    for (i, uid) in uids.iter().enumerate() {
        let weights = dir.join(uid).join("checkpoint.safetensors");
        std::fs::create_dir_all(weights.parent().unwrap()).unwrap();
        Expert::new(ExpertConfig::new(ExpertKind::Ffn, HIDDEN), 7 + i as u64)
            .unwrap()
            .save(&weights)
            .unwrap();
        files.push(weights.to_str().unwrap().to_owned());
    }
    let hidden = HIDDEN.to_string();
    let mut args = vec!["server", "--expert-uids"];
    args.extend_from_slice(uids);
    args.extend_from_slice(&[
        "--hidden-dim",
        &hidden,
        "--compression",
        compression,
        "--checkpoint-dir",
    ]);
    args.push(dir.to_str().unwrap());
    let node = Node::start(&args);
    assert_eq!(
        node.ready["experts"].as_array().unwrap().len(),
        uids.len(),
        "{}",
        node.ready
    );
    (node, files)
}

fn check(node: &Node, uid: &str, weights: &str, batch: usize, tolerance: f64) {
    let m = node.maddr();
    let hidden = HIDDEN.to_string();
    let batch = batch.to_string();
    let r = hivemind(
        "expert-check",
        &[
            "--initial-peers",
            &m,
            "--uid",
            uid,
            "--hidden-dim",
            &hidden,
            "--batch",
            &batch,
            "--weights",
            weights,
        ],
    );
    let out = r["out_rel_err"].as_f64().unwrap();
    let grad = r["grad_rel_err"].as_f64().unwrap();
    assert!(out < tolerance && grad < tolerance, "{uid} batch {batch}: {r}");
}

#[test]
fn hivemind_remote_expert_calls_an_apiary_server() {
    let dir = tempfile::tempdir().unwrap();
    // NONE: a small batch (unary) and one above 2 MiB (hivemind switches to rpc_*_stream), each on an
    // expert no backward has changed yet
    let (node, weights) = server(dir.path(), &["ffn.0.0", "ffn.0.1"], "NONE");
    check(&node, "ffn.0.0", &weights[0], 4, 1e-4);
    check(&node, "ffn.0.1", &weights[1], 10_000, 1e-4);
    let before = std::fs::read(&weights[0]).unwrap();
    let status = node.terminate();
    assert!(status.success(), "{status}");
    // the backward call trained the expert; shutdown saved it
    assert_ne!(
        std::fs::read(&weights[0]).unwrap(),
        before,
        "no checkpoint on shutdown"
    );
    Expert::load(ExpertConfig::new(ExpertKind::Ffn, HIDDEN), Path::new(&weights[0])).unwrap();

    // the lossy codecs a server may declare: inputs arrive rounded, gradients go back rounded
    for (uid, compression, tolerance) in [
        ("ffn.1.0", "FLOAT16", 5e-3),
        ("ffn.2.0", "MEANSTD_16BIT", 5e-2),
        ("ffn.3.0", "BLOCKWISE_8BIT", 0.1),
    ] {
        let (node, weights) = server(dir.path(), &[uid], compression);
        check(&node, uid, &weights[0], 8, tolerance);
        assert!(node.terminate().success());
    }
}

/// A hivemind `RemoteMixtureOfExperts` trainer (4×4 grid, k_best 4) against three Apiary servers, each
/// grid row and column spread over all three: the loss falls over 60 steps, killing one server outright mid-run
/// does not stop training, and a server stopped with SIGTERM withdraws its declarations at once.
#[test]
fn hivemind_moe_trains_against_three_apiary_servers() {
    let hidden = HIDDEN.to_string();
    // C (killed) holds the diagonal, A and B the rest by parity: every grid row and column has experts on
    // all three servers, and no two of C's share a row or a column. A sample's top 4 experts always hold
    // two in one row or one column, so at least one of them survives C. (hivemind's trainer turns NaN for
    // good when every expert chosen for a sample fails: its masked softmax over all -inf.)
    let server_of = |i: usize, j: usize| if i == j { 2 } else { (i + j) % 2 };
    let uids_of = |s: usize| -> Vec<String> {
        (0..4)
            .flat_map(|i| (0..4).map(move |j| (i, j)))
            .filter(|(i, j)| server_of(*i, *j) == s)
            .map(|(i, j)| format!("ffn.{i}.{j}"))
            .collect()
    };
    let start = |s: usize, initial: Option<&str>| {
        let uids = uids_of(s);
        let mut args = vec!["server", "--hidden-dim", &hidden, "--expert-uids"];
        args.extend(uids.iter().map(String::as_str));
        if let Some(m) = initial {
            args.extend(["--initial-peers", m]);
        }
        Node::start(&args)
    };
    let a = start(0, None);
    let m = a.maddr();
    let b = start(1, Some(&m));
    let mut c = start(2, Some(&m));

    let trainer = apiary_testkit::HivemindPeer::spawn(
        "moe-train",
        &[
            "--initial-peers",
            &m,
            "--hidden-dim",
            &hidden,
            "--grid",
            "4",
            "4",
            "--k-best",
            "4",
            "--steps",
            "60",
            "--batch",
            "16",
            "--uid-prefix",
            "ffn.",
        ],
        std::time::Duration::from_secs(120),
    );
    let mut losses = Vec::new();
    while losses.len() < 60 {
        let line = trainer
            .next_line(std::time::Duration::from_secs(90))
            .unwrap_or_else(|| panic!("the trainer stalled after {} steps", losses.len()));
        match line["event"].as_str() {
            Some("step") => losses.push(line["loss"].as_f64().unwrap()),
            Some("error") => panic!("the trainer failed after {} steps: {line}", losses.len()),
            _ => {}
        }
        if losses.len() == 20 {
            c.child.kill().unwrap(); // outright, no withdrawal
        }
    }
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&losses[..10]), mean(&losses[50..]));
    eprintln!("moe losses: first 10 {first:.4}, last 10 {last:.4}");
    assert!(
        last < first,
        "the loss did not fall: first 10 {first:.4}, last 10 {last:.4}"
    );
    drop(trainer);
    let _ = c.child.wait();

    // SIGTERM: B's uids stop pointing at it
    let b_uid = uids_of(1)[0].clone();
    let before = hivemind("dht-get", &["--initial-peers", &m, "--key", &b_uid]);
    assert_eq!(before["value"], b.ready["peer_id"], "{before}");
    assert!(b.terminate().success());
    let after = hivemind("dht-get", &["--initial-peers", &m, "--key", &b_uid]);
    assert!(after["value"].is_null(), "still declared after SIGTERM: {after}");
    assert!(a.terminate().success());
}

/// `--device` names the GPU; a build without the `cuda` feature says so and how to get one, and a
/// malformed name is refused — each in one line, before anything starts.
#[test]
fn device_choice_is_checked_up_front() {
    let run = |device: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_apiary"))
            .args(["--json", "server", "--expert-uids", "ffn.0", "--hidden-dim", "8"])
            .args(["--device", device, "--host-maddrs", "/ip4/127.0.0.1/tcp/0"])
            .output()
            .expect("apiary runs");
        assert!(!out.status.success(), "--device {device} must fail here");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        stderr.lines().last().unwrap_or_default().to_owned()
    };
    let last = run("tpu");
    assert!(last.contains("expected cpu, cuda or cuda:N"), "{last}");
    if !cfg!(feature = "cuda") {
        let last = run("cuda:0");
        assert!(
            last.contains("built without CUDA support") && last.contains("--features cuda"),
            "{last}"
        );
    }
}
