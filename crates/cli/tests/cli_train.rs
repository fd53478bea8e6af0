//! `apiary train` against `apiary server`s found through an `apiary dht` node: training goes on while one
//! of two servers is killed outright, and stops with a clear error (instead of hanging) once both are.
//! With `--manifest`, the trainer publishes its experiment and live status, which `apiary experiments
//! list` shows.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{APIARY, Node, apiary};
use serde_json::Value;

fn server(dht: &Node, uids: &[&str]) -> Node {
    let mut args = vec!["server", "--expert-uids"];
    args.extend_from_slice(uids);
    args.extend([
        "--hidden-dim",
        "16",
        "--update-period",
        "1",
        "--expiration",
        "3",
        "--initial-peers",
    ]);
    let maddr = dht.maddr();
    args.push(&maddr);
    Node::start(&args)
}

#[test]
fn training_survives_a_killed_server_and_fails_clearly_when_all_are_gone() {
    let dht = Node::start(&["dht"]);
    // each grid row spans both servers
    let mut a = server(&dht, &["ffn.0.0", "ffn.1.1", "ffn.0.2"]);
    let b = server(&dht, &["ffn.0.1", "ffn.1.0", "ffn.1.2"]);
    // the trainer publishes its experiment and its status
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("publisher.key");
    apiary(&["keys", "new", key.to_str().unwrap()]);
    let manifest = dir.path().join("toy.toml");
    std::fs::write(&manifest, TOY_MANIFEST).unwrap();
    let mut trainer = Command::new(APIARY)
        .args(["--json", "-q", "train", "--model", "toy", "--uid-prefix", "ffn."])
        .args(["--grid", "2", "3", "--hidden-dim", "16", "--k-best", "3"])
        .args(["--steps", "100000", "--batch", "32", "--lr", "0.01"])
        .args(["--forward-timeout", "5", "--backward-timeout", "5"])
        .args(["--timeout-after-k-min", "1"])
        .args([
            "--manifest",
            manifest.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ])
        .args(["--status-period", "1"])
        .args([
            "--initial-peers",
            &dht.maddr(),
            "--host-maddrs",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::sync_channel::<Value>(4096);
    let stdout = trainer.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                return;
            }
        }
    });
    let next_step = || loop {
        let v = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a step within 60 s");
        if v["event"] == "step" {
            return v;
        }
    };
    let mut losses = Vec::new();
    for _ in 0..30 {
        losses.push(next_step()["loss"].as_f64().unwrap());
    }
    // the experiment's card carries the trainer's live status
    let data = dir.path().join("data");
    let t = Instant::now();
    let live = loop {
        let list = apiary(&[
            "experiments",
            "list",
            "--initial-peers",
            &dht.maddr(),
            "--host-maddrs",
            "/ip4/127.0.0.1/tcp/0",
            "--data-dir",
            data.to_str().unwrap(),
        ]);
        let card = list["experiments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == "toy-classifier")
            .cloned();
        if let Some(live) = card.as_ref().map(|c| c["live"].clone())
            && live["step"].as_u64().unwrap_or(0) >= 10
        {
            let card = card.unwrap();
            assert_eq!(card["source"], "dht");
            assert_eq!(card["need"]["grid_experts"], 6);
            break live;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no live status: {list}");
        while rx.try_recv().is_ok() {}
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(live["loss"].as_f64().unwrap().is_finite());
    assert!(live["samples_per_s"].as_f64().unwrap() > 0.0, "{live}");
    assert_eq!(live["grid_experts"], 6);
    // server A goes away without a goodbye
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let mut after = Vec::new();
    for _ in 0..40 {
        after.push(next_step()["loss"].as_f64().unwrap());
    }
    assert!(after.iter().all(|l| l.is_finite()), "never NaN: {after:?}");
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let end: f64 = after[after.len() - 10..].iter().sum::<f64>() / 10.0;
    assert!(end < first - 0.1, "the loss still falls: {first:.3} -> {end:.3}");

    // and then the other one: a clear error, not a hang
    drop(b);
    let t = Instant::now();
    let status = loop {
        if let Some(status) = trainer.try_wait().unwrap() {
            break status;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "the trainer must give up when no expert answers"
        );
        while rx.try_recv().is_ok() {}
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!status.success());
    eprintln!(
        "losses {first:.3} -> {end:.3} over {} steps after the kill; gave up after {:?}",
        after.len(),
        t.elapsed()
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut trainer.stderr.take().unwrap(), &mut stderr).unwrap();
    let last = stderr.lines().last().unwrap_or_default();
    eprintln!("{last}");
    assert!(
        last.starts_with("apiary: error:")
            && (last.contains("too few experts") || last.contains("no experts")),
        "{stderr}"
    );
}

/// The trainer's experiment: the toy classifier over `ffn.` experts of hidden 16 on a 2×3 grid.
const TOY_MANIFEST: &str = r#"
schema_version = 1
id = "toy-classifier"
title = "Toy classifier"
summary = "A classifier around one mixture of experts, on synthetic data."
description = ""
created = 0
expires = 0
status = "training"
uid_prefix = "ffn."
grid = [2, 3]

[publisher]
name = "Apiary tests"
public_key = ""

[expert]
kind = "ffn"
hidden_dim = 16
max_batch_size = 4096
optimizer = { name = "adam", lr = 0.001 }

[requirements]
min_ram_mb_per_expert = 1
min_vram_mb_per_expert = 0
bandwidth_mbps = 0
disk_mb = 1
"#;
