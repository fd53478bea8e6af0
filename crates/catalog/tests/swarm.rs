//! The catalog over a real swarm on 127.0.0.1: libp2p hosts, Apiary DHT nodes running the catalog's RSA
//! owner validator, expert servers and a trainer calling them.
//!
//! - volunteers discover a published experiment, plan what to host from its rosters (uncovered experts
//!   first), join, serve a trainer's real forward and backward calls, show up in the trainer's status,
//!   and leave with their roster entry withdrawn at once;
//! - forged, expired and mismatched catalog entries never list as the publisher's experiment, and two
//!   publishers of one id list apart;
//! - joining twice, joining a finished experiment or uids outside the grid fail with clear errors,
//!   manifest changes are classified, and experts come back from their checkpoints after a re-join.

#![allow(clippy::unwrap_used)]

mod swarm_common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apiary_catalog::bundled::{self, LOCAL_DEMO_ID, layer_prefix};
use apiary_catalog::hosting::{ManifestWatch, Verdict, compare, spec_digest, uid_seed};
use apiary_catalog::manifest::Rejection;
use apiary_catalog::records::{CATALOG_KEY, EntryError, STATUS_KEY, catalog_value, owned_subkey};
use apiary_catalog::swarm::{Publication, fetch, rosters, validator};
use apiary_catalog::{
    Change, Coverage, Hosting, HostingConfig, JoinError, Mode, NeedLevel, SignedManifest, Source, Status,
    StatusRecord, cards, fingerprint, need, plan, tie_break_of,
};
use apiary_dht::get_dht_time;
use apiary_dht::validation::CompositeValidator;
use apiary_expert::checkpoints::load_or_init;
use apiary_expert::server::ExpertServer;
use apiary_expert::{CHECKPOINT_FILE, Expert, ExpertBackend};
use apiary_moe::beam::{BeamSearchConfig, MoEBeamSearcher};
use apiary_moe::moe::{MoeConfig, RemoteMixtureOfExperts};
use apiary_moe::transport::{ExpertAddr, ExpertTransport};
use apiary_wire::msgpack::Value;
use apiary_wire::signature::RsaPrivateKey;
use candle_core::{Device, Tensor, Var};
use swarm_common::{
    Node, PATIENCE, backend_config, demo, demo_listing, describe, machine, read, rows, unix_now, variant,
    wait_for, wait_for_experts,
};

/// The experts' width.
const HIDDEN: usize = 16;
/// One MoE layer's grid; the manifest's grid is `[1, 4, 2]` (its first coordinate is the layer).
const GRID: [usize; 2] = [4, 2];
/// The publisher refreshes its entries this often, each living `PUBLISH_TTL`.
const PUBLISH_PERIOD: Duration = Duration::from_secs(1);
const PUBLISH_TTL: Duration = Duration::from_secs(5);

/// Volunteers refresh every 2 s; their records live a minute, so anything gone sooner was withdrawn.
fn hosting_config() -> HostingConfig {
    HostingConfig {
        update_period: Duration::from_secs(2),
        expiration: Duration::from_secs(60),
        ..HostingConfig::default()
    }
}

/// One volunteer of the swarm test.
struct Volunteer {
    node: Node,
    server: Arc<ExpertServer>,
    hosting: Hosting,
}

/// The trainer's status record for what `roster` shows.
fn status_from(
    manifest: &apiary_catalog::Manifest,
    roster: &[(String, Vec<String>)],
    step: u64,
) -> StatusRecord {
    let coverage = Coverage::from_rosters(manifest, roster.iter().cloned());
    let grid = manifest.expert_uids();
    StatusRecord {
        experiment: manifest.id.clone(),
        volunteers: coverage.volunteers() as u32,
        experts_covered: grid.iter().filter(|u| coverage.replicas(u) > 0).count() as u32,
        grid_experts: grid.len() as u32,
        samples_per_s: 12.5,
        loss: Some(2.5),
        step,
        updated_at: get_dht_time(),
    }
}

/// A three-volunteer swarm around one published experiment: discovery, planning, joining, serving a
/// trainer, live status, and a clean leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volunteers_discover_join_serve_and_leave() {
    let started = Instant::now();
    let boot = Node::spawn(&[], validator(None).unwrap()).await;
    let key = RsaPrivateKey::generate().unwrap();
    let fp = fingerprint(&key.public_key());
    // the publisher's node signs with the publisher's key, and it trains too
    let trainer = Node::spawn(
        std::slice::from_ref(&boot.addr),
        validator(Some(key.clone())).unwrap(),
    )
    .await;
    let (manifest, signed) = demo(&key, 1, &GRID, HIDDEN);
    let grid = manifest.expert_uids();
    assert_eq!(grid.len(), 8);
    let publication = Publication::start(
        trainer.dht.clone(),
        &signed,
        unix_now(),
        PUBLISH_PERIOD,
        PUBLISH_TTL,
    )
    .await
    .unwrap();
    assert_eq!(publication.id(), LOCAL_DEMO_ID);

    // three volunteers discover, plan and join one after another, each allowing 3 experts
    let machine = machine();
    let max_experts = 3;
    let mut volunteers: Vec<Volunteer> = Vec::new();
    for i in 0..3 {
        let node = Node::spawn(std::slice::from_ref(&boot.addr), validator(None).unwrap()).await;
        let what = format!("volunteer {i} to see the experiment with {i} rosters");
        let catalog = wait_for(&what, PATIENCE, async || {
            let catalog = read(&node.dht).await?;
            match demo_listing(&catalog, &fp) {
                Some(l) if l.rosters.len() == i => Ok(catalog),
                _ => Err(describe(&catalog)),
            }
        })
        .await;
        assert!(catalog.refused.is_empty(), "{:?}", catalog.refused);
        let listing = demo_listing(&catalog, &fp).unwrap();
        // the verified manifest, exactly as signed
        assert_eq!(listing.signed, signed);
        assert_eq!(listing.manifest(), &manifest);
        listing.signed.verify(unix_now()).unwrap();
        assert!(listing.status.is_none());

        // the card: from the DHT, the publisher's fingerprint, the volunteers so far
        let all = cards(&bundled::bundled(), &catalog, &machine, Mode::Balanced);
        let same_id: Vec<_> = all.iter().filter(|c| c.id == LOCAL_DEMO_ID).collect();
        assert_eq!(same_id.len(), 1, "the DHT listing replaces the bundled card");
        let card = same_id[0];
        assert_eq!(card.source, Source::Dht);
        assert_eq!(card.fingerprint.as_deref(), Some(fp.as_str()));
        assert_eq!(card.volunteers, i);
        assert_eq!(card.covered, i * max_experts);
        assert_eq!(card.need.label, NeedLevel::High, "part of the grid is uncovered");
        assert_eq!(card.status, Status::Training);

        // the plan: uncovered experts first, as many as the volunteer allows
        let coverage = Coverage::from_rosters(listing.manifest(), listing.rosters.iter().cloned());
        assert_eq!(coverage.volunteers(), i);
        let peer = node.peer();
        let joined = plan(
            listing.manifest(),
            &coverage,
            &machine,
            Mode::Balanced,
            Some(max_experts),
            tie_break_of(&peer),
        )
        .unwrap();
        assert_eq!(joined.uids.len(), max_experts);
        let uncovered = grid.iter().filter(|u| coverage.replicas(u) == 0).count();
        let picked_uncovered = joined
            .uids
            .iter()
            .take_while(|u| coverage.replicas(u) == 0)
            .count();
        assert_eq!(
            picked_uncovered,
            uncovered.min(max_experts),
            "volunteer {i} picked uncovered experts first: {:?}",
            joined.uids
        );
        assert!(joined.uids.iter().all(|u| grid.contains(u)));

        // joining is one call
        let server = node.expert_server();
        let hosting = Hosting::start(
            &node.dht,
            &server,
            listing.manifest(),
            joined.uids.clone(),
            &hosting_config(),
        )
        .await
        .unwrap();
        assert_eq!(hosting.uids(), joined.uids.as_slice());
        let mut served = joined.uids.clone();
        served.sort();
        assert_eq!(server.uids(), served);
        volunteers.push(Volunteer {
            node,
            server,
            hosting,
        });
    }

    // a fresh read lists all three volunteers, with what each hosts, and the whole grid covered
    let catalog = wait_for("the rosters of all three volunteers", PATIENCE, async || {
        let catalog = read(&boot.dht).await?;
        match demo_listing(&catalog, &fp) {
            Some(l) if l.rosters.len() == 3 => Ok(catalog),
            _ => Err(describe(&catalog)),
        }
    })
    .await;
    let listing = demo_listing(&catalog, &fp).unwrap();
    for v in &volunteers {
        let (_, uids) = listing
            .rosters
            .iter()
            .find(|(p, _)| *p == v.node.peer())
            .unwrap_or_else(|| panic!("{} is not in the roster {:?}", v.node.peer(), listing.rosters));
        assert_eq!(
            uids.iter().collect::<BTreeSet<_>>(),
            v.hosting.uids().iter().collect()
        );
    }
    let full = Coverage::from_rosters(&manifest, listing.rosters.iter().cloned());
    assert_eq!(full.volunteers(), 3);
    let covered = need(&manifest, &full);
    assert_eq!(covered.covered, grid.len(), "{:?}", listing.rosters);
    assert_eq!(covered.min_replicas, 1);

    // the trainer routes over the grid through the DHT and calls every expert, forward and backward
    let prefix = layer_prefix(&manifest, 0);
    let found = wait_for_experts(&trainer.dht, &prefix, &GRID, grid.len()).await;
    for e in &found {
        let host = volunteers
            .iter()
            .find(|v| v.node.p2p.local_peer_id() == e.peer_id)
            .unwrap_or_else(|| panic!("{} is declared by an unknown peer", e.uid));
        assert!(host.hosting.uids().contains(&e.uid), "{}", e.uid);
    }
    let searcher = MoEBeamSearcher::new(
        trainer.dht.clone(),
        &prefix,
        GRID.to_vec(),
        BeamSearchConfig::default(),
    )
    .unwrap();
    let mut config = MoeConfig::new(HIDDEN, &prefix, GRID.to_vec());
    // every sample goes to every expert: each volunteer is called whatever the gating prefers
    config.k_best = grid.len();
    config.forward_timeout = Some(Duration::from_secs(30));
    config.backward_timeout = Some(Duration::from_secs(30));
    let moe = RemoteMixtureOfExperts::new(
        config,
        Arc::new(searcher),
        Arc::new(trainer.transport()),
        tokio::runtime::Handle::current(),
        7,
    )
    .unwrap();
    let steps = 3u64;
    let moe_stats = tokio::task::spawn_blocking(move || {
        for step in 0..steps {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (12, HIDDEN), &Device::Cpu).unwrap()).unwrap();
            let g = Tensor::randn(0f32, 1.0, (12, HIDDEN), &Device::Cpu).unwrap();
            let out = moe.forward(x.as_tensor()).unwrap();
            assert_eq!(out.dims(), &[12, HIDDEN]);
            let grads = (&out * &g).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(
                grads.get(x.as_tensor()).is_some(),
                "step {step}: no input gradient"
            );
            let stats = moe.stats();
            let fwd = stats.last_forward.unwrap();
            assert!(fwd.failed.is_empty(), "step {step}: {fwd:?}");
            assert_eq!(fwd.zero_samples, 0, "step {step}");
            let bwd = stats.last_backward.unwrap();
            assert!(bwd.failed.is_empty(), "step {step}: {bwd:?}");
        }
        moe.stats()
    })
    .await
    .unwrap();
    assert_eq!(moe_stats.forward_failures + moe_stats.backward_failures, 0);
    for (i, v) in volunteers.iter().enumerate() {
        let what = format!("volunteer {i}'s experts to count forward and backward rows");
        wait_for(&what, PATIENCE, async || {
            let stats = v.hosting.stats();
            match rows(&stats) {
                (f, b) if f > 0 && b > 0 => Ok(()),
                r => Err(format!("{r:?}")),
            }
        })
        .await;
        // every backward took an optimizer step
        assert!(v.hosting.stats().experts.iter().any(|e| e.optimizer_steps > 0));
    }

    // the trainer publishes its status from the rosters; a fresh read shows it beside the listing
    let roster = wait_for("the trainer to see three volunteers", PATIENCE, async || {
        let r = rosters(&trainer.dht, &manifest)
            .await
            .map_err(|e| e.to_string())?;
        if r.len() == 3 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    let status = status_from(&manifest, &roster, steps);
    assert_eq!((status.volunteers, status.experts_covered), (3, 8));
    assert!(publication.set_status(&status).await > 0);
    let seen = wait_for("the status record", PATIENCE, async || {
        let catalog = read(&volunteers[0].node.dht).await?;
        match demo_listing(&catalog, &fp).and_then(|l| l.status.clone()) {
            Some(s) if s.step == steps => Ok(s),
            _ => Err(describe(&catalog)),
        }
    })
    .await;
    assert_eq!(seen.experiment, LOCAL_DEMO_ID);
    assert_eq!(
        (seen.volunteers, seen.experts_covered, seen.grid_experts),
        (3, 8, 8)
    );
    assert_eq!(seen.loss, Some(2.5));

    // the first volunteer leaves: its roster entry is withdrawn at once (long before it would expire),
    // and the coverage drops by exactly its experts
    let leaver = volunteers.remove(0);
    let leaver_peer = leaver.node.peer();
    let leaver_uids: Vec<String> = leaver.hosting.uids().to_vec();
    let left_at = Instant::now();
    let final_stats = leaver.hosting.leave().await;
    assert!(rows(&final_stats).1 > 0);
    assert!(leaver.server.uids().is_empty());
    let catalog = wait_for(
        "the roster to lose the volunteer that left",
        PATIENCE,
        async || {
            let catalog = read(&boot.dht).await?;
            match demo_listing(&catalog, &fp) {
                Some(l) if l.rosters.len() == 2 => Ok(catalog),
                _ => Err(describe(&catalog)),
            }
        },
    )
    .await;
    assert!(
        left_at.elapsed() < hosting_config().expiration,
        "withdrawn, not expired"
    );
    let listing = demo_listing(&catalog, &fp).unwrap();
    assert!(listing.rosters.iter().all(|(p, _)| *p != leaver_peer));
    let after = Coverage::from_rosters(&manifest, listing.rosters.iter().cloned());
    assert_eq!(after.volunteers(), 2);
    for uid in &grid {
        let dropped = u32::from(leaver_uids.contains(uid));
        assert_eq!(after.replicas(uid), full.replicas(uid) - dropped, "{uid}");
    }
    let still_covered = grid.iter().filter(|u| after.replicas(u) > 0).count() as u32;
    assert!(still_covered < 8, "the leaver hosted experts nobody else does");

    // and the trainer's next status says so
    let roster = wait_for("the trainer to see two volunteers", PATIENCE, async || {
        let r = rosters(&trainer.dht, &manifest)
            .await
            .map_err(|e| e.to_string())?;
        if r.len() == 2 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    let status = status_from(&manifest, &roster, steps + 1);
    assert!(publication.set_status(&status).await > 0);
    let seen = wait_for("the updated status record", PATIENCE, async || {
        let catalog = read(&boot.dht).await?;
        match demo_listing(&catalog, &fp).and_then(|l| l.status.clone()) {
            Some(s) if s.step == steps + 1 => Ok(s),
            _ => Err(describe(&catalog)),
        }
    })
    .await;
    assert_eq!(
        (seen.volunteers, seen.experts_covered, seen.grid_experts),
        (2, still_covered, 8)
    );

    for v in volunteers {
        v.hosting.leave().await;
        v.node.stop().await;
    }
    leaver.node.stop().await;
    publication.withdraw().await;
    trainer.stop().await;
    boot.stop().await;
    eprintln!(
        "volunteers_discover_join_serve_and_leave: {:.1?}",
        started.elapsed()
    );
}

/// Nobody but the publisher lists under the publisher's name: forged entries never reach readers,
/// expired or mismatched entries are refused with the reason, and two publishers of one id list apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_and_invalid_entries_are_refused() {
    let started = Instant::now();
    let boot = Node::spawn(&[], validator(None).unwrap()).await;
    let key_a = RsaPrivateKey::generate().unwrap();
    let key_b = RsaPrivateKey::generate().unwrap();
    let (pub_a, pub_b) = (key_a.public_key(), key_b.public_key());
    let (fp_a, fp_b) = (fingerprint(&pub_a), fingerprint(&pub_b));
    assert_ne!(fp_a, fp_b);
    let node_a = Node::spawn(
        std::slice::from_ref(&boot.addr),
        validator(Some(key_a.clone())).unwrap(),
    )
    .await;
    let node_b = Node::spawn(
        std::slice::from_ref(&boot.addr),
        validator(Some(key_b.clone())).unwrap(),
    )
    .await;
    let attacker = Node::spawn(std::slice::from_ref(&boot.addr), validator(None).unwrap()).await;

    // A publishes the demo; it signed an older version before (a different summary)
    let (manifest_a, signed_a) = demo(&key_a, 1, &GRID, HIDDEN);
    let old_a = variant(
        &manifest_a,
        &key_a,
        LOCAL_DEMO_ID,
        "An older summary, replayed by someone else.",
    );
    let now = unix_now();
    let publication_a = Publication::start(node_a.dht.clone(), &signed_a, now, PUBLISH_PERIOD, PUBLISH_TTL)
        .await
        .unwrap();
    wait_for("A's listing", PATIENCE, async || {
        let catalog = read(&boot.dht).await?;
        demo_listing(&catalog, &fp_a)
            .map(|_| ())
            .ok_or_else(|| describe(&catalog))
    })
    .await;

    // B publishes an experiment with the same id
    let (_, signed_b) = demo(&key_b, 1, &GRID, HIDDEN);
    let publication_b = Publication::start(node_b.dht.clone(), &signed_b, now, PUBLISH_PERIOD, PUBLISH_TTL)
        .await
        .unwrap();

    // a node without A's key stores under A's sub-keys: a replay of A's older manifest (valid in itself,
    // with a later expiry than A's refreshes), a manifest A signed but never published, and a status
    // record boasting a thousand volunteers. Every node running the validator refuses all three.
    let forged_until = get_dht_time() + 1200.0;
    let ghost = variant(
        &manifest_a,
        &key_a,
        "ghost-exp",
        "Signed by A, published by someone else.",
    );
    let boast = StatusRecord {
        experiment: LOCAL_DEMO_ID.into(),
        volunteers: 1000,
        experts_covered: 8,
        grid_experts: 8,
        samples_per_s: 1e6,
        loss: Some(0.01),
        step: 1_000_000,
        updated_at: get_dht_time(),
    };
    let forgeries = [
        (CATALOG_KEY, LOCAL_DEMO_ID, catalog_value(&old_a).unwrap()),
        (CATALOG_KEY, "ghost-exp", catalog_value(&ghost).unwrap()),
        (STATUS_KEY, LOCAL_DEMO_ID, boast.to_value()),
    ];
    let forge = async |node: &Node| -> Vec<bool> {
        let mut stored = Vec::new();
        for (key, id, value) in &forgeries {
            let subkey = Value::Str(owned_subkey(id, &pub_a));
            let ok = node
                .dht
                .store(Value::str(*key), value.clone(), forged_until, Some(subkey))
                .await
                .unwrap();
            stored.push(ok);
        }
        stored
    };
    assert_eq!(
        forge(&attacker).await,
        [false, false, false],
        "a node took an entry under A's marker not signed by A"
    );
    for n in [&boot, &node_a, &node_b, &attacker] {
        assert!(!n.dht.holds(&Value::str(STATUS_KEY)).await.unwrap());
    }
    // a rogue DHT node that validates nothing keeps them and serves them to readers (five nodes in all:
    // each one holds a replica of every key), with the latest expiry of the catalog
    let rogue = Node::spawn(std::slice::from_ref(&boot.addr), CompositeValidator::default()).await;
    forge(&rogue).await;
    assert!(
        rogue.dht.holds(&Value::str(STATUS_KEY)).await.unwrap(),
        "the rogue keeps the forgeries"
    );

    // A itself stores two entries readers must refuse: an expired manifest, and under its own marker
    // a manifest whose publisher (and signer) is B
    let mut expired = manifest_a.clone();
    expired.id = "expired-exp".into();
    expired.created = now - 7200;
    expired.expires = now - 3600;
    let expired = SignedManifest::sign(expired, &key_a).unwrap();
    let mismatch = variant(
        &manifest_a,
        &key_b,
        "mismatch-exp",
        "Signed by B, stored under A's marker.",
    );
    for (id, signed) in [("expired-exp", &expired), ("mismatch-exp", &mismatch)] {
        let stored = node_a
            .dht
            .store(
                Value::str(CATALOG_KEY),
                catalog_value(signed).unwrap(),
                get_dht_time() + 600.0,
                Some(Value::Str(owned_subkey(id, &pub_a))),
            )
            .await
            .unwrap();
        assert!(stored, "A's own entry `{id}` was stored");
    }

    // readers (validator(None)) list A's and B's experiments apart and refuse the two bad entries
    for observer in [&boot, &attacker] {
        let (catalog, now) = wait_for("two listings and two refused entries", PATIENCE, async || {
            let now = unix_now();
            let catalog = fetch(&observer.dht, now).await.map_err(|e| e.to_string())?;
            if catalog.listings.len() == 2 && catalog.refused.len() == 2 {
                Ok((catalog, now))
            } else {
                Err(describe(&catalog))
            }
        })
        .await;
        let ids: Vec<&str> = catalog
            .listings
            .iter()
            .map(|l| l.manifest().id.as_str())
            .collect();
        assert_eq!(ids, [LOCAL_DEMO_ID, LOCAL_DEMO_ID], "{}", describe(&catalog));
        let a = demo_listing(&catalog, &fp_a).unwrap();
        let b = demo_listing(&catalog, &fp_b).unwrap();
        // A's entry is the genuine one, not the replay, and A published no status
        assert_eq!(a.signed, signed_a);
        assert_eq!(a.status, None, "a forged status reached a reader");
        assert_ne!(a.manifest().summary, old_a.manifest.summary);
        assert_eq!(b.signed, signed_b);
        let cards = cards(&[], &catalog, &swarm_common::machine(), Mode::Balanced);
        let fps: BTreeSet<Option<String>> = cards.iter().map(|c| c.fingerprint.clone()).collect();
        assert_eq!(fps, BTreeSet::from([Some(fp_a.clone()), Some(fp_b.clone())]));

        let mut refused = catalog.refused.clone();
        refused.sort_by(|x, y| x.entry.cmp(&y.entry));
        assert_eq!(refused[0].entry, "expired-exp");
        let why = EntryError::Manifest(Rejection::Expired {
            expires: expired.manifest.expires,
            now,
        });
        assert_eq!(refused[0].reason, why.to_string());
        assert_eq!(refused[1].entry, "mismatch-exp");
        assert_eq!(refused[1].reason, EntryError::OwnerMismatch.to_string());
        assert!(
            catalog.listings.iter().all(|l| l.manifest().id != "ghost-exp")
                && refused.iter().all(|r| r.entry != "ghost-exp"),
            "the forged entry reached a reader: {}",
            describe(&catalog)
        );
    }

    // B withdraws: A's listing stays, B's goes at once
    publication_b.withdraw().await;
    wait_for("B's listing to go", PATIENCE, async || {
        let catalog = read(&boot.dht).await?;
        if demo_listing(&catalog, &fp_b).is_none() && demo_listing(&catalog, &fp_a).is_some() {
            Ok(())
        } else {
            Err(describe(&catalog))
        }
    })
    .await;

    publication_a.withdraw().await;
    for n in [rogue, attacker, node_b, node_a, boot] {
        n.stop().await;
    }
    eprintln!(
        "forged_and_invalid_entries_are_refused: {:.1?}",
        started.elapsed()
    );
}

/// Forward and backward of `uid` on `peer`'s node, called directly over libp2p.
async fn call(
    trainer: &Node,
    peer: &Node,
    uid: &str,
    x: &Tensor,
    backward: bool,
) -> Result<Vec<Tensor>, String> {
    let transport = trainer.transport();
    let addr = ExpertAddr::new(uid, peer.p2p.local_peer_id());
    if backward {
        let g = Tensor::ones(x.dims(), x.dtype(), x.device()).unwrap();
        transport
            .backward(&addr, vec![x.clone()], vec![g])
            .await
            .map_err(|e| e.to_string())
    } else {
        transport
            .forward(&addr, vec![x.clone()])
            .await
            .map_err(|e| e.to_string())
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Joining twice, a finished experiment or uids outside the grid fails and changes nothing; manifest
/// updates are classified; and a volunteer that leaves and re-joins gets its trained experts back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joining_twice_and_spec_changes_have_clear_outcomes() {
    let started = Instant::now();
    let boot = Node::spawn(&[], validator(None).unwrap()).await;
    let volunteer = Node::spawn(std::slice::from_ref(&boot.addr), validator(None).unwrap()).await;
    let trainer = Node::spawn(std::slice::from_ref(&boot.addr), validator(None).unwrap()).await;
    trainer.p2p.dial(volunteer.addr.clone()).await.unwrap();
    let key = RsaPrivateKey::generate().unwrap();
    let (manifest, _) = demo(&key, 1, &[2, 2], HIDDEN);
    let uids = manifest.expert_uids();
    assert_eq!(uids.len(), 4);
    let server = volunteer.expert_server();
    let config = hosting_config();
    let x = Tensor::randn(0f32, 1.0, (5, HIDDEN), &Device::Cpu).unwrap();

    // the first join hosts uids 0 and 1
    let first = Hosting::start(&volunteer.dht, &server, &manifest, uids[..2].to_vec(), &config)
        .await
        .unwrap();
    // a second join overlapping it (uids 1 and 2) is refused, and changes nothing
    let err = Hosting::start(&volunteer.dht, &server, &manifest, uids[1..3].to_vec(), &config)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, JoinError::AlreadyHosted(u) if *u == uids[1]),
        "{err:?}"
    );
    assert!(err.to_string().contains("already joined"), "{err}");
    assert_eq!(server.uids(), uids[..2].to_vec());
    for uid in &uids[..2] {
        let out = call(&trainer, &volunteer, uid, &x, false).await.unwrap();
        assert_eq!(out[0].dims(), &[5, HIDDEN]);
    }
    assert!(call(&trainer, &volunteer, &uids[2], &x, false).await.is_err());
    let roster = wait_for("the first join's roster entry", PATIENCE, async || {
        let r = rosters(&boot.dht, &manifest).await.map_err(|e| e.to_string())?;
        if r.len() == 1 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    assert_eq!(roster, vec![(volunteer.peer(), uids[..2].to_vec())]);
    wait_for(
        "two forward calls of 5 rows counted",
        PATIENCE,
        async || match rows(&first.stats()) {
            (10, 0) => Ok(()),
            r => Err(format!("{r:?}")),
        },
    )
    .await;

    // a finished experiment, uids outside the grid, and nothing at all are refused up front
    let mut finished = manifest.clone();
    finished.status = Status::Finished;
    let err = Hosting::start(&volunteer.dht, &server, &finished, uids[2..].to_vec(), &config)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, JoinError::Finished(id) if id == LOCAL_DEMO_ID),
        "{err:?}"
    );
    for bad in ["ffn_demo.1.0.0", "ffn_demo.0.2.0", "ffn_demo.0.0", "ffn.0.0.0"] {
        let err = Hosting::start(
            &volunteer.dht,
            &server,
            &manifest,
            vec![uids[2].clone(), bad.to_owned()],
            &config,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, JoinError::NotInGrid(u) if u == bad),
            "{bad}: {err:?}"
        );
    }
    let err = Hosting::start(&volunteer.dht, &server, &manifest, Vec::new(), &config)
        .await
        .unwrap_err();
    assert!(matches!(err, JoinError::NoExperts), "{err:?}");
    assert_eq!(server.uids(), uids[..2].to_vec(), "nothing changed");
    first.leave().await;
    assert!(server.uids().is_empty());

    // manifest updates, as a hosting volunteer sees them
    assert_eq!(compare(&manifest, &manifest), Change::Unchanged);
    let mut summary = manifest.clone();
    summary.summary = "Now with a better summary.".into();
    summary.expires += 3600;
    assert_eq!(compare(&manifest, &summary), Change::Updated);
    assert_eq!(spec_digest(&summary), spec_digest(&manifest));
    assert_eq!(compare(&manifest, &finished), Change::Finished);
    let spec_change = |what: &[&str]| Change::SpecChanged {
        what: what.iter().map(|s| (*s).to_owned()).collect(),
    };
    let mut wider = manifest.clone();
    wider.expert.hidden_dim = 2 * HIDDEN;
    assert_eq!(compare(&manifest, &wider), spec_change(&["the expert"]));
    let mut bigger = manifest.clone();
    bigger.grid = vec![1, 4, 2];
    assert_eq!(compare(&manifest, &bigger), spec_change(&["the expert grid"]));
    let mut faster = manifest.clone();
    faster.expert.optimizer.lr *= 10.0;
    assert_eq!(
        compare(&manifest, &faster),
        spec_change(&["the training settings"])
    );
    let mut all = wider.clone();
    all.grid = bigger.grid.clone();
    all.expert.optimizer = faster.expert.optimizer.clone();
    all.status = Status::Finished;
    assert_eq!(
        compare(&manifest, &all),
        spec_change(&["the expert", "the training settings", "the expert grid"]),
        "a spec change outranks finishing"
    );
    for changed in [&wider, &bigger, &faster] {
        assert_ne!(spec_digest(changed), spec_digest(&manifest));
    }
    // the verdicts a hosting volunteer acts on, check after check
    let mut watch = ManifestWatch::default();
    let now = manifest.created + 10;
    assert_eq!(watch.check(&manifest, Some(&summary), now), Verdict::Keep);
    assert_eq!(
        watch.check(&manifest, None, now),
        Verdict::Vanished { first: true }
    );
    assert_eq!(
        watch.check(&manifest, None, now),
        Verdict::Vanished { first: false }
    );
    assert_eq!(watch.check(&manifest, Some(&manifest), now), Verdict::Keep);
    assert_eq!(
        watch.check(&manifest, None, now),
        Verdict::Vanished { first: true },
        "told again after it came back"
    );
    match watch.check(&manifest, Some(&finished), now) {
        Verdict::Leave(why) => assert!(why.contains("finished"), "{why}"),
        other => panic!("{other:?}"),
    }
    match watch.check(&manifest, Some(&wider), now) {
        Verdict::Leave(why) => assert!(
            why.contains("the expert") && why.contains("checkpoints are kept"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
    for latest in [None, Some(&manifest)] {
        assert_eq!(
            watch.check(&manifest, latest, manifest.expires),
            Verdict::Leave("its manifest expired".into())
        );
    }

    // checkpoints: join with a checkpoint folder, train one step, leave, re-join
    let tmp = tempfile::tempdir().unwrap();
    let config = HostingConfig {
        // no periodic save during the test: what is on disk is what leaving saved
        update_period: Duration::from_secs(600),
        checkpoint_dir: Some(tmp.path().to_path_buf()),
        ..hosting_config()
    };
    let uid = uids[3].clone();
    let expert_config = manifest.expert.expert_config().unwrap();
    let seed = uid_seed(manifest.expert.init_seed, &uid);
    let fresh = ExpertBackend::new(
        Expert::new(expert_config, seed).unwrap(),
        backend_config(&manifest),
    )
    .unwrap()
    .forward(std::slice::from_ref(&x))
    .unwrap();
    let hosting = Hosting::start(&volunteer.dht, &server, &manifest, vec![uid.clone()], &config)
        .await
        .unwrap();
    let dir = hosting.checkpoint_dir().unwrap().to_path_buf();
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with(LOCAL_DEMO_ID), "{name}");
    assert!(name.contains(&spec_digest(&manifest)), "{name}");
    assert_eq!(dir.parent(), Some(tmp.path()));
    let before = call(&trainer, &volunteer, &uid, &x, false).await.unwrap();
    assert!(
        max_abs_diff(&before[0], &fresh[0]) < 1e-6,
        "a first join starts from the seeded init"
    );
    call(&trainer, &volunteer, &uid, &x, true).await.unwrap();
    let stats = hosting.leave().await;
    assert_eq!(stats.experts[0].optimizer_steps, 1);
    assert!(
        dir.join(&uid).join(CHECKPOINT_FILE).is_file(),
        "leaving saved the expert"
    );

    let again = Hosting::start(&volunteer.dht, &server, &manifest, vec![uid.clone()], &config)
        .await
        .unwrap();
    assert_eq!(again.checkpoint_dir(), Some(dir.as_path()));
    assert_eq!(
        again.stats().experts[0].optimizer_steps,
        1,
        "the step taken before leaving"
    );
    let after = call(&trainer, &volunteer, &uid, &x, false).await.unwrap();
    let saved = load_or_init(expert_config, backend_config(&manifest), &uid, Some(&dir), seed)
        .unwrap()
        .forward(std::slice::from_ref(&x))
        .unwrap();
    assert!(
        max_abs_diff(&after[0], &saved[0]) < 1e-6,
        "the re-joined expert is the saved one"
    );
    assert!(
        max_abs_diff(&after[0], &fresh[0]) > 1e-5,
        "the saved expert is trained, not the seeded init"
    );
    again.leave().await;

    trainer.stop().await;
    volunteer.stop().await;
    boot.stop().await;
    eprintln!(
        "joining_twice_and_spec_changes_have_clear_outcomes: {:.1?}",
        started.elapsed()
    );
}
