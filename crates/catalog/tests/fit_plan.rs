//! Fit and join planning against recorded machine profiles (`tests/profiles/*.json`).
#![allow(clippy::unwrap_used)] // test helpers as well as tests

use std::collections::BTreeSet;
use std::sync::OnceLock;

use apiary_catalog::fit::format_mib;
use apiary_catalog::{
    Coverage, FitLevel, MachineProfile, Manifest, Mode, NeedLevel, Placement, PlanError, expert_memory_mb,
    fit, need, plan, tie_break_of,
};
use apiary_wire::signature::RsaPrivateKey;

fn profile(name: &str) -> MachineProfile {
    let path = format!("{}/tests/profiles/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn laptop() -> MachineProfile {
    profile("laptop-8gb")
}
fn desktop() -> MachineProfile {
    profile("gaming-desktop-rtx3060")
}
fn workstation() -> MachineProfile {
    profile("workstation-rtx4090")
}
fn pi() -> MachineProfile {
    profile("raspberry-pi-4gb")
}

fn public_key() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::generate().unwrap().public_key().to_openssh())
}

/// The knobs the tests turn; everything else is a minimal valid manifest.
#[derive(Clone)]
struct Exp {
    id: &'static str,
    status: &'static str,
    kind: &'static str,
    hidden_dim: usize,
    max_batch_size: usize,
    optimizer: &'static str,
    grid: &'static str,
    min_ram: u32,
    min_vram: u32,
    bandwidth: u32,
    disk: u32,
}

/// A small CPU experiment: `ffn` h=64 (about 2 MiB an expert) on a 16×16 grid, asking for 64 MiB each.
fn small_cpu() -> Exp {
    Exp {
        id: "tiny-ffn",
        status: "training",
        kind: "ffn",
        hidden_dim: 64,
        max_batch_size: 256,
        optimizer: r#"{ name = "adam", lr = 0.001 }"#,
        grid: "[16, 16]",
        min_ram: 64,
        min_vram: 0,
        bandwidth: 10,
        disk: 100,
    }
}

/// A GPU experiment: `transformer` h=1024, batch 64 (about 1.5 GiB by the estimate), 4 GiB of VRAM each.
fn big_gpu() -> Exp {
    Exp {
        id: "big-transformer",
        status: "training",
        kind: "transformer",
        hidden_dim: 1024,
        max_batch_size: 64,
        optimizer: r#"{ name = "adamw", lr = 0.0003 }"#,
        grid: "[8, 8]",
        min_ram: 2048,
        min_vram: 4096,
        bandwidth: 100,
        disk: 20_000,
    }
}

/// An experiment no consumer machine can host: 80 GiB of VRAM per expert.
fn huge() -> Exp {
    Exp {
        id: "huge-transformer",
        status: "recruiting",
        kind: "transformer",
        hidden_dim: 8192,
        max_batch_size: 256,
        optimizer: r#"{ name = "adam", lr = 0.0001 }"#,
        grid: "[64]",
        min_ram: 131_072,
        min_vram: 81_920,
        bandwidth: 1000,
        disk: 500_000,
    }
}

/// A 4-expert grid `ffn.0` … `ffn.3` for coverage tests.
fn four() -> Exp {
    Exp {
        grid: "[4]",
        ..small_cpu()
    }
}

fn manifest(e: &Exp) -> Manifest {
    let text = format!(
        r#"
schema_version = 1
id = "{id}"
title = "Test experiment"
summary = "For fit and plan tests."
description = ""
created = 0
expires = 4102444800
status = "{status}"
uid_prefix = "ffn."
grid = {grid}

[publisher]
name = "Apiary tests"
public_key = "{key}"

[expert]
kind = "{kind}"
hidden_dim = {hidden_dim}
max_batch_size = {max_batch_size}
optimizer = {optimizer}

[requirements]
min_ram_mb_per_expert = {min_ram}
min_vram_mb_per_expert = {min_vram}
bandwidth_mbps = {bandwidth}
disk_mb = {disk}
"#,
        id = e.id,
        status = e.status,
        grid = e.grid,
        key = public_key(),
        kind = e.kind,
        hidden_dim = e.hidden_dim,
        max_batch_size = e.max_batch_size,
        optimizer = e.optimizer,
        min_ram = e.min_ram,
        min_vram = e.min_vram,
        bandwidth = e.bandwidth,
        disk = e.disk,
    );
    let m = Manifest::from_toml_str(&text).unwrap();
    m.validate().unwrap();
    m
}

fn rosters(entries: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    entries
        .iter()
        .map(|(peer, uids)| (peer.to_string(), uids.iter().map(|u| u.to_string()).collect()))
        .collect()
}

fn has_reason(reasons: &[String], needle: &str) -> bool {
    reasons.iter().any(|r| r.contains(needle))
}

// ------------------------------------------------------------------------------------------------
// profiles and estimates

#[test]
fn profiles_load() {
    let l = laptop();
    assert_eq!(
        (l.ram_available_mb, l.gpus.len(), l.bandwidth_mbps),
        (3890, 0, Some(50))
    );
    let d = desktop();
    assert_eq!(d.gpus[0].name, "NVIDIA GeForce RTX 3060");
    assert_eq!(d.gpus[0].vram_total_mb, 12_288);
    assert_eq!(workstation().gpus[0].vram_free_mb, 23_820);
    let p = pi();
    assert_eq!((p.cpu_cores, p.bandwidth_mbps, p.gpus.len()), (4, None, 0));
}

#[test]
fn estimates_of_the_test_experiments() {
    // ffn h=64: 33,216 params × 16 B + 256 × 22 × 64 × 4 B = 1,973,248 B → 2 MiB
    assert_eq!(expert_memory_mb(&manifest(&small_cpu()).expert).unwrap(), 2);
    // transformer h=1024, batch 64, AdamW: 1,610,825,728 B → 1537 MiB
    assert_eq!(expert_memory_mb(&manifest(&big_gpu()).expert).unwrap(), 1537);
    // transformer h=8192, batch 256: 805,412,864 × 16 + 256 × 2 × 128 × (17 × 8192 + 4096) × 4 bytes
    assert_eq!(
        expert_memory_mb(&manifest(&huge()).expert).unwrap(),
        (805_412_864u64 * 16 + 256 * 2 * 128 * (17 * 8192 + 4096) * 4).div_ceil(1 << 20)
    );
}

// ------------------------------------------------------------------------------------------------
// fit

#[test]
fn small_cpu_experiment_fits_everywhere_on_the_cpu() {
    let m = manifest(&small_cpu());
    let f = fit(&m, &laptop(), Mode::Balanced);
    assert_eq!(f.level, FitLevel::Fits, "{:?}", f.reasons);
    assert_eq!(f.placement, Some(Placement::Cpu));
    // the requirement (64 MiB) outweighs the estimate (2 MiB)
    assert_eq!(f.per_expert_mb, 64);
    assert_eq!(f.budget_mb, 1945);
    assert_eq!(f.max_experts, 30);
    assert_eq!(
        f.reasons,
        vec!["room for 30 experts of 64 MiB in 1.9 GiB (Balanced: half the free RAM)".to_owned()]
    );

    // a GPU machine still runs a CPU experiment on the CPU, from RAM
    let f = fit(&m, &desktop(), Mode::Balanced);
    assert_eq!(
        (f.level, f.placement, f.budget_mb, f.max_experts),
        (FitLevel::Fits, Some(Placement::Cpu), 4880, 76)
    );

    // the workstation has room for more than the grid: capped at 256
    let f = fit(&m, &workstation(), Mode::Balanced);
    assert_eq!((f.level, f.max_experts), (FitLevel::Fits, 256));
    assert_eq!(
        f.reasons[0],
        "room for all 256 experts of 64 MiB in 27.3 GiB (Balanced: half the free RAM)"
    );

    // the Pi: unknown bandwidth is no obstacle
    let f = fit(&m, &pi(), Mode::Balanced);
    assert_eq!((f.level, f.max_experts, f.budget_mb), (FitLevel::Fits, 24, 1560));
}

#[test]
fn big_gpu_experiment() {
    let m = manifest(&big_gpu());

    // no GPU: refused, nowhere to place it
    for machine in [laptop(), pi()] {
        let f = fit(&m, &machine, Mode::Max);
        assert_eq!(f.level, FitLevel::DoesNotFit);
        assert_eq!(f.placement, None);
        assert_eq!(f.max_experts, 0);
        assert_eq!(
            f.reasons,
            vec!["needs a GPU with at least 4.0 GiB per expert; no usable GPU was found".to_owned()]
        );
    }

    // RTX 3060 (11,342 MiB free): Quiet lends 2835 MiB, not one 4 GiB expert
    let d = desktop();
    let f = fit(&m, &d, Mode::Quiet);
    assert_eq!(f.level, FitLevel::DoesNotFit);
    assert_eq!(f.placement, Some(Placement::Gpu { index: 0 }));
    assert_eq!((f.per_expert_mb, f.budget_mb, f.max_experts), (4096, 2835, 0));
    assert_eq!(
        f.reasons,
        vec![
            "one expert needs 4.0 GiB but Quiet lends only 2.8 GiB (Quiet: a quarter of the free VRAM of \
             NVIDIA GeForce RTX 3060); Balanced mode would fit one"
                .to_owned()
        ]
    );
    // Balanced: exactly one, and only because of the mode
    let f = fit(&m, &d, Mode::Balanced);
    assert_eq!(f.level, FitLevel::Tight);
    assert_eq!((f.budget_mb, f.max_experts), (5671, 1));
    assert!(has_reason(&f.reasons, "only one expert fits"), "{:?}", f.reasons);
    assert!(has_reason(
        &f.reasons,
        "fits only because Balanced lends more memory than Quiet"
    ));
    // Max: two, still only thanks to the mode
    let f = fit(&m, &d, Mode::Max);
    assert_eq!((f.level, f.max_experts), (FitLevel::Tight, 2));
    assert!(!has_reason(&f.reasons, "only one expert fits"));
    assert!(has_reason(&f.reasons, "fits only because Max"));

    // RTX 4090 (23,820 MiB free): Quiet 1 (tight), Balanced 2 (fits), Max 4
    let w = workstation();
    let f = fit(&m, &w, Mode::Quiet);
    assert_eq!((f.level, f.max_experts), (FitLevel::Tight, 1));
    assert_eq!(f.reasons.len(), 2, "{:?}", f.reasons);
    let f = fit(&m, &w, Mode::Balanced);
    assert_eq!((f.level, f.max_experts, f.budget_mb), (FitLevel::Fits, 2, 11_910));
    assert_eq!(
        f.reasons,
        vec![
            "room for 2 experts of 4.0 GiB in 11.6 GiB (Balanced: half the free VRAM of NVIDIA GeForce RTX 4090)"
                .to_owned()
        ]
    );
    assert_eq!(fit(&m, &w, Mode::Max).max_experts, 4);
}

#[test]
fn the_gpu_with_most_free_memory_is_chosen() {
    let m = manifest(&big_gpu());
    let mut machine = workstation();
    machine.gpus.insert(
        0,
        apiary_catalog::GpuProfile {
            name: "NVIDIA GeForce GTX 1650".into(),
            vram_total_mb: 4096,
            vram_free_mb: 3900,
        },
    );
    let f = fit(&m, &machine, Mode::Balanced);
    assert_eq!(f.placement, Some(Placement::Gpu { index: 1 }));
    assert_eq!(f.max_experts, 2);
    assert_eq!(
        serde_json::to_value(&f).unwrap()["placement"],
        serde_json::json!({"gpu": {"index": 1}})
    );
    assert_eq!(serde_json::to_value(&f).unwrap()["level"], "fits");
}

#[test]
fn huge_experiment_fits_nowhere() {
    let m = manifest(&huge());
    for machine in [laptop(), desktop(), workstation(), pi()] {
        for mode in Mode::ALL {
            let f = fit(&m, &machine, mode);
            assert_eq!(f.level, FitLevel::DoesNotFit, "{} {mode}", machine.name);
            assert_eq!(f.max_experts, 0);
            assert!(!f.reasons.is_empty());
        }
    }
    let f = fit(&m, &workstation(), Mode::Max);
    assert_eq!(f.per_expert_mb, 81_920);
    assert!(
        f.reasons[0].starts_with("one expert needs 80.0 GiB but Max lends only 18.6 GiB"),
        "{:?}",
        f.reasons
    );
    // the desktop also lacks disk (500,000 MiB asked, 412,000 free) and bandwidth (200 < 1000 / 4):
    // every reason is given
    let f = fit(&m, &desktop(), Mode::Max);
    assert_eq!(f.reasons.len(), 3, "{:?}", f.reasons);
    assert!(f.reasons[0].starts_with("one expert needs 80.0 GiB but Max lends only 8.9 GiB"));
    assert_eq!(
        f.reasons[1],
        "needs 488.3 GiB of free disk for checkpoints; only 402.3 GiB is free"
    );
    assert_eq!(
        f.reasons[2],
        "needs about 1000 Mbit/s; this connection measured 200 Mbit/s, under a quarter of that"
    );
    assert_eq!(serde_json::to_value(&f).unwrap()["level"], "does_not_fit");
}

#[test]
fn heavier_modes_host_more() {
    let m = manifest(&small_cpu());
    for (machine, want) in [
        (laptop(), [15, 30, 48]),
        (pi(), [12, 24, 39]),
        (desktop(), [38, 76, 122]),
    ] {
        let got: Vec<usize> = Mode::ALL
            .iter()
            .map(|&mode| fit(&m, &machine, mode).max_experts)
            .collect();
        assert_eq!(got, want, "{}", machine.name);
        assert!(got[0] < got[1] && got[1] < got[2]);
    }
    let f = fit(&m, &laptop(), Mode::Quiet);
    assert_eq!(
        f.reasons[0],
        "room for 15 experts of 64 MiB in 972 MiB (Quiet: a quarter of the free RAM)"
    );
    let f = fit(&m, &laptop(), Mode::Max);
    assert_eq!(
        f.reasons[0],
        "room for 48 experts of 64 MiB in 3.0 GiB (Max: 80% of the free RAM)"
    );
}

#[test]
fn disk_refusals() {
    // the laptop has 118,000 MiB free
    let m = manifest(&Exp {
        disk: 150_000,
        ..small_cpu()
    });
    let f = fit(&m, &laptop(), Mode::Balanced);
    assert_eq!(f.level, FitLevel::DoesNotFit);
    assert_eq!(
        f.reasons,
        vec!["needs 146.5 GiB of free disk for checkpoints; only 115.2 GiB is free".to_owned()]
    );
    // within twice the need: tight
    let m = manifest(&Exp {
        disk: 80_000,
        ..small_cpu()
    });
    let f = fit(&m, &laptop(), Mode::Balanced);
    assert_eq!(f.level, FitLevel::Tight);
    assert_eq!(f.max_experts, 30);
    assert!(has_reason(
        &f.reasons,
        "little disk to spare: 115.2 GiB free for 78.1 GiB of checkpoints"
    ));
    // just above twice the need: fits
    let m = manifest(&Exp {
        disk: 59_000,
        ..small_cpu()
    });
    assert_eq!(fit(&m, &laptop(), Mode::Balanced).level, FitLevel::Fits);
}

#[test]
fn bandwidth_refusals() {
    // the laptop measured 50 Mbit/s: refused below a quarter of the requirement
    let m = manifest(&Exp {
        bandwidth: 250,
        ..small_cpu()
    });
    let f = fit(&m, &laptop(), Mode::Balanced);
    assert_eq!(f.level, FitLevel::DoesNotFit);
    assert_eq!(
        f.reasons,
        vec![
            "needs about 250 Mbit/s; this connection measured 50 Mbit/s, under a quarter of that".to_owned()
        ]
    );
    // a quarter exactly: tight
    let m = manifest(&Exp {
        bandwidth: 200,
        ..small_cpu()
    });
    let f = fit(&m, &laptop(), Mode::Balanced);
    assert_eq!(f.level, FitLevel::Tight);
    assert!(has_reason(
        &f.reasons,
        "the connection (50 Mbit/s) is slower than the 200 Mbit/s the experiment expects"
    ));
    // met: fits
    let m = manifest(&Exp {
        bandwidth: 50,
        ..small_cpu()
    });
    assert_eq!(fit(&m, &laptop(), Mode::Balanced).level, FitLevel::Fits);
    // unknown bandwidth (the Pi) is never held against the machine
    let m = manifest(&Exp {
        bandwidth: 10_000,
        ..small_cpu()
    });
    let f = fit(&m, &pi(), Mode::Balanced);
    assert_eq!(f.level, FitLevel::Fits, "{:?}", f.reasons);
}

// ------------------------------------------------------------------------------------------------
// coverage and need

#[test]
fn coverage_counts_each_peer_once_per_uid() {
    let m = manifest(&four());
    let c = Coverage::from_rosters(
        &m,
        rosters(&[
            ("peer-a", &["ffn.0", "ffn.0", "ffn.1"]),
            ("peer-a", &["ffn.1", "ffn.2"]),
            ("peer-b", &["ffn.1", "ffn.9", "other.0"]),
            ("peer-c", &["ffn.7", "ffn."]),
        ]),
    );
    assert_eq!(c.replicas("ffn.0"), 1);
    assert_eq!(c.replicas("ffn.1"), 2);
    assert_eq!(c.replicas("ffn.2"), 1);
    assert_eq!(c.replicas("ffn.3"), 0);
    assert_eq!(c.replicas("ffn.9"), 0);
    assert_eq!(c.replicas("other.0"), 0);
    // peer-c hosts nothing of this grid
    assert_eq!(c.volunteers(), 2);
}

#[test]
fn need_scores() {
    let m = manifest(&four());
    let cov = |entries: &[(&str, &[&str])]| Coverage::from_rosters(&m, rosters(entries));

    let n = need(&m, &cov(&[]));
    assert_eq!((n.grid_experts, n.covered, n.min_replicas), (4, 0, 0));
    assert_eq!((n.uncovered_share, n.mean_replicas, n.score), (1.0, 0.0, 1.0));
    assert_eq!(n.label, NeedLevel::High);

    let n = need(&m, &cov(&[("a", &["ffn.0", "ffn.1"]), ("b", &["ffn.1"])]));
    assert_eq!((n.covered, n.min_replicas), (2, 0));
    assert_eq!((n.uncovered_share, n.mean_replicas), (0.5, 0.75));
    assert!((n.score - 0.8).abs() < 1e-12, "{}", n.score);
    assert_eq!(n.label, NeedLevel::High);

    // one uncovered expert still outranks any thin coverage
    let n = need(&m, &cov(&[("a", &["ffn.0", "ffn.1", "ffn.2"])]));
    assert!((n.score - 0.7).abs() < 1e-12, "{}", n.score);
    assert_eq!(n.label, NeedLevel::High);

    // fully covered, one host each
    let single = need(
        &m,
        &cov(&[("a", &["ffn.0", "ffn.1"]), ("b", &["ffn.2", "ffn.3"])]),
    );
    assert_eq!(
        (single.covered, single.min_replicas, single.uncovered_share),
        (4, 1, 0.0)
    );
    assert!((single.score - 0.55).abs() < 1e-12, "{}", single.score);
    assert_eq!(single.label, NeedLevel::Moderate);

    // replicas 1, 2, 2, 4: 0.55 × (1 + 1/2 + 1/2 + 1/4) / 4
    let all = ["ffn.0", "ffn.1", "ffn.2", "ffn.3"];
    let mixed = need(
        &m,
        &cov(&[
            ("a", &all),
            ("b", &["ffn.1", "ffn.2", "ffn.3"]),
            ("c", &["ffn.3"]),
            ("d", &["ffn.3"]),
        ]),
    );
    assert_eq!((mixed.min_replicas, mixed.mean_replicas), (1, 2.25));
    assert!((mixed.score - 0.309_375).abs() < 1e-12, "{}", mixed.score);
    assert_eq!(mixed.label, NeedLevel::Moderate);

    // three hosts each: low
    let three = need(&m, &cov(&[("a", &all), ("b", &all), ("c", &all)]));
    assert_eq!((three.min_replicas, three.mean_replicas), (3, 3.0));
    assert!((three.score - 0.55 / 3.0).abs() < 1e-12, "{}", three.score);
    assert_eq!(three.label, NeedLevel::Low);

    assert!(0.8 > single.score && single.score > mixed.score && mixed.score > three.score);

    // finished: nothing needed even with an empty grid
    let done = manifest(&Exp {
        status: "finished",
        ..four()
    });
    let n = need(&done, &Coverage::from_rosters(&done, rosters(&[])));
    assert_eq!(
        (n.score, n.label, n.covered, n.grid_experts),
        (0.0, NeedLevel::Low, 0, 4)
    );
    assert_eq!(serde_json::to_value(&n).unwrap()["label"], "low");
}

// ------------------------------------------------------------------------------------------------
// join plans

#[test]
fn plan_takes_uncovered_then_least_replicated() {
    let m = manifest(&Exp {
        grid: "[8]",
        ..small_cpu()
    });
    // ffn.0 ×3, ffn.2 ×2, ffn.1 ffn.3 ffn.4 ×1, ffn.5 ffn.6 ffn.7 uncovered
    let c = Coverage::from_rosters(
        &m,
        rosters(&[
            ("a", &["ffn.0", "ffn.1", "ffn.2"]),
            ("b", &["ffn.0", "ffn.2", "ffn.3"]),
            ("c", &["ffn.0", "ffn.4"]),
        ]),
    );
    let p = plan(&m, &c, &laptop(), Mode::Balanced, Some(5), 42).unwrap();
    assert_eq!(p.experiment, "tiny-ffn");
    assert_eq!(p.uids.len(), 5);
    let first: BTreeSet<&str> = p.uids[..3].iter().map(String::as_str).collect();
    assert_eq!(first, BTreeSet::from(["ffn.5", "ffn.6", "ffn.7"]));
    for uid in &p.uids[3..] {
        assert!(
            ["ffn.1", "ffn.3", "ffn.4"].contains(&uid.as_str()),
            "{:?}",
            p.uids
        );
    }
    assert_eq!(p.placement, Placement::Cpu);
    assert_eq!((p.per_expert_mb, p.total_mb, p.budget_mb), (64, 320, 1945));
    // (3 × 1 + 2 × 1/2) / 8
    assert!((p.expected_share - 0.5).abs() < 1e-12, "{}", p.expected_share);
    assert_eq!(p.explanation.len(), 6, "{:#?}", p.explanation);
    assert_eq!(
        p.explanation[0],
        format!("3 uncovered experts: {}", p.uids[..3].join(", "))
    );
    assert_eq!(
        p.explanation[1],
        format!(
            "2 experts hosted by only 1 volunteer so far: {}",
            p.uids[3..].join(", ")
        )
    );
    assert_eq!(
        p.explanation[2],
        "memory: 5 × 64 MiB = 320 MiB of a 1.9 GiB budget (Balanced)"
    );
    assert_eq!(p.explanation[3], "capped at 5 experts by your limit (room for 8)");
    assert_eq!(p.explanation[4], "runs on the CPU");
    assert_eq!(
        p.explanation[5],
        "expected load: about 50% of the experiment's expert calls"
    );

    // seven: everything but the most replicated ffn.0, ffn.2 (×2) last
    let p = plan(&m, &c, &laptop(), Mode::Balanced, Some(7), 42).unwrap();
    assert_eq!(p.uids.len(), 7);
    assert!(!p.uids.contains(&"ffn.0".to_owned()));
    assert_eq!(p.uids[6], "ffn.2");
    let replicas: Vec<u32> = p.uids.iter().map(|u| c.replicas(u)).collect();
    assert_eq!(replicas, vec![0, 0, 0, 1, 1, 1, 2]);
    assert!((p.expected_share - (3.0 + 1.5 + 1.0 / 3.0) / 8.0).abs() < 1e-12);
    assert!(
        p.explanation
            .contains(&"1 expert hosted by only 2 volunteers so far: ffn.2".to_owned())
    );

    // no limit: the whole grid fits the laptop's memory, nothing is capped
    let p = plan(&m, &c, &laptop(), Mode::Balanced, None, 42).unwrap();
    assert_eq!(p.uids.len(), 8);
    assert_eq!(p.uids[7], "ffn.0");
    assert!(!p.explanation.iter().any(|l| l.starts_with("capped")));
}

#[test]
fn plan_is_capped_by_memory() {
    let m = manifest(&small_cpu());
    let empty = Coverage::from_rosters(&m, rosters(&[]));
    // the Pi in Quiet mode: 780 MiB lend room for 12 experts of 64 MiB
    let p = plan(&m, &empty, &pi(), Mode::Quiet, None, 1).unwrap();
    assert_eq!(p.uids.len(), 12);
    assert_eq!((p.total_mb, p.budget_mb), (768, 780));
    assert!((p.expected_share - 12.0 / 256.0).abs() < 1e-12);
    assert!(
        p.explanation
            .contains(&"capped at 12 experts by memory (the grid has 256)".to_owned())
    );
    assert!(
        p.explanation
            .contains(&"memory: 12 × 64 MiB = 768 MiB of a 780 MiB budget (Quiet)".to_owned())
    );
    assert!(p.explanation[0].starts_with("12 uncovered experts: ffn."));
    assert!(
        p.explanation[0].ends_with(", … and 6 more"),
        "{}",
        p.explanation[0]
    );
    assert!(
        p.explanation
            .contains(&"expected load: about 5% of the experiment's expert calls".to_owned())
    );
    // a larger limit than memory allows changes nothing
    let q = plan(&m, &empty, &pi(), Mode::Quiet, Some(100), 1).unwrap();
    assert_eq!(q.uids, p.uids);
    // a smaller one caps it
    let q = plan(&m, &empty, &pi(), Mode::Quiet, Some(3), 1).unwrap();
    assert_eq!(q.uids, p.uids[..3]);
    assert_eq!(q.total_mb, 192);
}

#[test]
fn plan_on_a_gpu() {
    let m = manifest(&big_gpu());
    let empty = Coverage::from_rosters(&m, rosters(&[]));
    let p = plan(&m, &empty, &workstation(), Mode::Balanced, None, 7).unwrap();
    assert_eq!(p.placement, Placement::Gpu { index: 0 });
    assert_eq!((p.uids.len(), p.per_expert_mb, p.total_mb), (2, 4096, 8192));
    assert!(
        p.explanation
            .contains(&"runs on GPU 0 (NVIDIA GeForce RTX 4090)".to_owned())
    );
    assert!(
        p.explanation
            .contains(&"memory: 2 × 4.0 GiB = 8.0 GiB of a 11.6 GiB budget (Balanced)".to_owned())
    );
    assert!(
        p.explanation
            .contains(&"expected load: about 3% of the experiment's expert calls".to_owned())
    );
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["placement"], serde_json::json!({"gpu": {"index": 0}}));
    assert_eq!(json["uids"].as_array().unwrap().len(), 2);

    // a tight fit carries its notes
    let p = plan(&m, &empty, &desktop(), Mode::Balanced, None, 7).unwrap();
    assert_eq!(p.uids.len(), 1);
    assert!(
        p.explanation.contains(&"note: only one expert fits".to_owned()),
        "{:#?}",
        p.explanation
    );
}

#[test]
fn different_volunteers_spread_over_the_grid() {
    let m = manifest(&small_cpu());
    let empty = Coverage::from_rosters(&m, rosters(&[]));
    let peer_a = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
    let peer_b = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN";
    assert_ne!(tie_break_of(peer_a), tie_break_of(peer_b));
    let a = plan(
        &m,
        &empty,
        &laptop(),
        Mode::Balanced,
        Some(4),
        tie_break_of(peer_a),
    )
    .unwrap();
    let b = plan(
        &m,
        &empty,
        &laptop(),
        Mode::Balanced,
        Some(4),
        tie_break_of(peer_b),
    )
    .unwrap();
    assert_eq!((a.uids.len(), b.uids.len()), (4, 4));
    assert_ne!(a.uids, b.uids);
    // the same volunteer always gets the same plan
    let again = plan(
        &m,
        &empty,
        &laptop(),
        Mode::Balanced,
        Some(4),
        tie_break_of(peer_a),
    )
    .unwrap();
    assert_eq!(again, a);
    // not the row-major head of the grid
    assert_ne!(a.uids, ["ffn.0.0", "ffn.0.1", "ffn.0.2", "ffn.0.3"]);

    // ten volunteers planning at once on an empty grid cover many distinct experts (40 picks of 256)
    let union: BTreeSet<String> = (0..10)
        .flat_map(|i| {
            plan(
                &m,
                &empty,
                &laptop(),
                Mode::Balanced,
                Some(4),
                tie_break_of(&format!("peer-{i}")),
            )
            .unwrap()
            .uids
        })
        .collect();
    assert!(union.len() >= 30, "only {} distinct uids", union.len());

    // a volunteer that plans after another's roster is known avoids its experts entirely
    let after_a = Coverage::from_rosters(&m, vec![(peer_a.to_owned(), a.uids.clone())]);
    let b2 = plan(
        &m,
        &after_a,
        &laptop(),
        Mode::Balanced,
        Some(4),
        tie_break_of(peer_b),
    )
    .unwrap();
    assert!(
        b2.uids.iter().all(|u| !a.uids.contains(u)),
        "{:?} vs {:?}",
        a.uids,
        b2.uids
    );
}

#[test]
fn plans_refused() {
    let done = manifest(&Exp {
        status: "finished",
        ..small_cpu()
    });
    let empty = Coverage::from_rosters(&done, rosters(&[]));
    let err = plan(&done, &empty, &workstation(), Mode::Max, None, 0).unwrap_err();
    assert_eq!(err, PlanError::Finished);
    assert_eq!(
        err.to_string(),
        "the experiment is finished; there is nothing to join"
    );

    let m = manifest(&small_cpu());
    let err = plan(&m, &empty, &laptop(), Mode::Balanced, Some(0), 0).unwrap_err();
    assert_eq!(err, PlanError::NoExperts);

    let m = manifest(&big_gpu());
    let err = plan(&m, &empty, &laptop(), Mode::Max, None, 0).unwrap_err();
    assert_eq!(
        err,
        PlanError::DoesNotFit {
            reasons: vec!["needs a GPU with at least 4.0 GiB per expert; no usable GPU was found".to_owned()]
        }
    );
    assert_eq!(
        err.to_string(),
        "this computer cannot host the experiment: needs a GPU with at least 4.0 GiB per expert; no usable \
         GPU was found"
    );
    let err = plan(&manifest(&huge()), &empty, &workstation(), Mode::Max, None, 0).unwrap_err();
    assert!(matches!(err, PlanError::DoesNotFit { .. }));
    assert_eq!(format_mib(81_920), "80.0 GiB");
}
