//! `apiary experiments list|show|join|leave` and `apiary publish`: the catalog from the command line.
//!
//! `join` hosts the planned experts in the foreground until it is interrupted, `leave` is asked for, the
//! experiment finishes, or its experts change. A joined experiment is recorded in
//! `<data dir>/joined/<id>.json` (the hosting process, its experts); `leave` asks that process to leave by
//! creating `<id>.leave` beside it and waits until it has withdrawn, which works the same on every OS.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use apiary_catalog::hosting::{ManifestWatch, Verdict};
use apiary_catalog::swarm::{DEFAULT_PERIOD, fetch, validator};
use apiary_catalog::{
    Card, Coverage, DhtCatalog, Hosting, HostingConfig, JoinPlan, Listing, Manifest, Mode, Publication,
    SignedManifest, Source, bundled, cards, fingerprint, plan, tie_break_of,
};
use apiary_dht::DhtHandle;
use apiary_dht::validation::CompositeValidator;
use apiary_expert::server::ExpertServer;
use apiary_p2p::{Multiaddr, P2pHandle};
use apiary_wire::signature::RsaPrivateKey;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::dht::{NodeArgs, start_with_validator, visible_maddrs};
use crate::output::Output;
use crate::swarm::unix_now;
use apiary_node::local_profile;

#[derive(Debug, Args)]
pub struct ExperimentsArgs {
    #[command(subcommand)]
    command: ExperimentsCommand,
}

#[derive(Debug, Subcommand)]
enum ExperimentsCommand {
    /// The experiments you can join: the bundled catalog and what the DHT holds, with their volunteers,
    /// coverage, and how well they fit this PC.
    List(BrowseArgs),
    /// One experiment in detail, with the plan `join` would follow.
    Show {
        /// The experiment's id.
        id: String,
        #[command(flatten)]
        browse: BrowseArgs,
    },
    /// Plan which experts to host, show the plan, and host them until interrupted (or `leave`).
    Join {
        /// The experiment's id.
        id: String,
        #[command(flatten)]
        browse: BrowseArgs,
        /// Host at most this many experts.
        #[arg(long)]
        max_experts: Option<usize>,
        /// Seconds between declarations, roster refreshes, checkpoints and catalog checks.
        #[arg(long, default_value_t = DEFAULT_PERIOD.as_secs_f64())]
        update_period: f64,
        /// Keep the experts' checkpoints here (default: `<data dir>/checkpoints`).
        #[arg(long)]
        checkpoint_dir: Option<PathBuf>,
    },
    /// Stop hosting an experiment joined on this computer (asks the `join` process to leave cleanly).
    Leave {
        /// The experiment's id.
        id: String,
        /// Apiary's data folder.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Seconds to wait for the hosting process to withdraw.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
}

#[derive(Debug, Args, Clone)]
pub struct BrowseArgs {
    /// How much of this PC experts may use: quiet (a quarter of the free memory), balanced (half) or max.
    #[arg(long, default_value = "balanced")]
    mode: Mode,
    /// The publisher's key fingerprint (or its start), when two publishers use the same experiment id.
    #[arg(long)]
    publisher: Option<String>,
    /// Apiary's data folder (joined experiments, checkpoints); default: the platform's data folder.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The manifest (TOML, or JSON if it ends in `.json`). An empty publisher key is filled in from
    /// --key; `created = 0` means now and `expires = 0` thirty days from now.
    manifest: PathBuf,
    /// The publisher's private key (`apiary keys new`).
    #[arg(long)]
    key: PathBuf,
    /// Seconds between refreshes of the catalog entry.
    #[arg(long, default_value_t = DEFAULT_PERIOD.as_secs_f64())]
    update_period: f64,
    #[command(flatten)]
    node: NodeArgs,
}

/// How long a manifest with `expires = 0` is valid: thirty days.
const DEFAULT_VALIDITY: u64 = 30 * 86_400;

pub async fn run(args: ExperimentsArgs, out: &Output) -> Result<()> {
    match args.command {
        ExperimentsCommand::List(browse) => list(browse, out).await,
        ExperimentsCommand::Show { id, browse } => show(&id, browse, out).await,
        ExperimentsCommand::Join {
            id,
            browse,
            max_experts,
            update_period,
            checkpoint_dir,
        } => join(&id, browse, max_experts, update_period, checkpoint_dir, out).await,
        ExperimentsCommand::Leave {
            id,
            data_dir,
            timeout,
        } => leave(&id, &data_dir_or_default(data_dir)?, timeout, out).await,
    }
}

/// `--data-dir` (made absolute: the free disk space is looked up by path), else the platform's data
/// folder + `apiary` (XDG on Linux).
pub fn data_dir_or_default(dir: Option<PathBuf>) -> Result<PathBuf> {
    match dir {
        Some(d) => Ok(std::path::absolute(&d).unwrap_or(d)),
        None => dirs::data_dir()
            .map(|d| d.join("apiary"))
            .ok_or_else(|| anyhow!("no data folder on this system: pass --data-dir")),
    }
}

/// A node that reads (and, with `key`, signs) catalog records, bootstrapped from `--initial-peers` or
/// the bundled bootstrap list. `None` when there is nobody to ask, unless the node may start `alone` (a
/// publisher can be the first node of a swarm).
async fn catalog_node(
    node: &NodeArgs,
    client_mode: bool,
    alone: bool,
    validator: CompositeValidator,
) -> Result<Option<(P2pHandle, DhtHandle)>> {
    let mut node = node.clone();
    if node.initial_peers.is_empty() {
        node.initial_peers = bundled::bootstrap_peers()
            .iter()
            .filter_map(|p| p.parse::<Multiaddr>().ok())
            .collect();
    }
    if node.initial_peers.is_empty() && !alone {
        return Ok(None);
    }
    let network = node.nat.network(crate::nat::hivemind_defaults(false));
    Ok(Some(
        start_with_validator(&node, client_mode, &network, validator).await?,
    ))
}

/// The DHT's catalog through a short-lived client node (empty when there are no bootstrap peers).
async fn browse_dht(browse: &BrowseArgs) -> Result<(DhtCatalog, bool)> {
    let Some((p2p, dht)) = catalog_node(&browse.node, true, false, validator(None)?).await? else {
        return Ok((DhtCatalog::default(), false));
    };
    let catalog = fetch(&dht, unix_now())
        .await
        .context("reading the catalog from the DHT");
    dht.shutdown().await;
    p2p.shutdown().await;
    Ok((catalog?, true))
}

fn all_cards(browse: &BrowseArgs, catalog: &DhtCatalog) -> Result<Vec<Card>> {
    let machine = local_profile(&data_dir_or_default(browse.data_dir.clone())?);
    Ok(cards(&bundled::bundled(), catalog, &machine, browse.mode))
}

async fn list(browse: BrowseArgs, out: &Output) -> Result<()> {
    let (catalog, asked) = browse_dht(&browse).await?;
    let cards = all_cards(&browse, &catalog)?;
    if out.is_json() {
        out.result(json!({ "experiments": cards, "refused": refused_json(&catalog), "dht": asked }));
        return Ok(());
    }
    if !asked {
        out.say(
            "No bootstrap peers (no public Apiary bootstrap node exists yet): showing the bundled catalog.\n\
             Pass --initial-peers to browse a swarm, e.g. the address `apiary demo` prints.\n",
        );
    }
    for card in &cards {
        out.say(&card_text(card, false));
    }
    if !catalog.refused.is_empty() {
        out.say(&format!(
            "{} catalog entr{} refused (bad signature, expired or invalid): run with -v to see why",
            catalog.refused.len(),
            if catalog.refused.len() == 1 {
                "y was"
            } else {
                "ies were"
            }
        ));
        for r in &catalog.refused {
            tracing::info!(entry = %r.entry, "refused catalog entry: {}", r.reason);
        }
    }
    Ok(())
}

fn refused_json(catalog: &DhtCatalog) -> serde_json::Value {
    catalog
        .refused
        .iter()
        .map(|r| json!({ "entry": r.entry, "reason": r.reason }))
        .collect()
}

fn card_text(card: &Card, detailed: bool) -> String {
    let m = &card.manifest;
    let mut t = format!("{}  {}\n  {}\n", card.id, card.title(), m.summary);
    let status = serde_json::to_value(card.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    match card.source {
        Source::Dht => t.push_str(&format!(
            "  status      {status} · publisher {} (key {})\n",
            card.publisher,
            card.fingerprint.as_deref().unwrap_or("?")
        )),
        Source::Bundled => t.push_str(&format!(
            "  status      bundled with Apiary, not running in the swarm you browsed{}\n",
            if card.id == bundled::LOCAL_DEMO_ID {
                " (start it with `apiary demo`)"
            } else {
                ""
            }
        )),
    }
    t.push_str(&format!(
        "  volunteers  {} · experts covered {}/{} · need {} ({:.2})\n",
        card.volunteers,
        card.covered,
        card.need.grid_experts,
        serde_json::to_value(card.need.label)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        card.need.score
    ));
    if let Some(live) = &card.live {
        t.push_str(&format!(
            "  trainer     step {} · loss {} · {:.0} samples/s\n",
            live.step,
            live.loss.map_or("–".into(), |l| format!("{l:.3}")),
            live.samples_per_s
        ));
    }
    let fit = serde_json::to_value(card.fit.level)
        .ok()
        .and_then(|v| v.as_str().map(|s| s.replace('_', " ")))
        .unwrap_or_default();
    t.push_str(&format!("  this PC     {fit}: {}\n", card.fit.reasons.join("; ")));
    if detailed {
        t.push_str(&format!(
            "  experts     {} `{}` (hidden {}, {}), grid {:?} under `{}`\n",
            card.need.grid_experts, m.expert.kind, m.expert.hidden_dim, m.expert.dtype, m.grid, m.uid_prefix
        ));
        t.push_str(&format!(
            "  training    {} lr {} · batch ≤ {}\n",
            m.expert.optimizer.name, m.expert.optimizer.lr, m.expert.max_batch_size
        ));
        let r = &m.requirements;
        t.push_str(&format!(
            "  needs       {} MiB RAM and {} MiB VRAM per expert · {} Mbit/s · {} MiB disk\n",
            r.min_ram_mb_per_expert, r.min_vram_mb_per_expert, r.bandwidth_mbps, r.disk_mb
        ));
        if let Some(url) = &m.homepage {
            t.push_str(&format!("  homepage    {url}\n"));
        }
        if !m.description.is_empty() {
            t.push('\n');
            for line in m.description.lines() {
                t.push_str(&format!("  {line}\n"));
            }
        }
    }
    t
}

/// The one listing `id` names (and `--publisher`, when several publishers use it).
fn pick<'a>(catalog: &'a DhtCatalog, id: &str, publisher: Option<&str>) -> Result<Option<&'a Listing>> {
    catalog
        .pick(id, publisher)
        .map_err(|e| anyhow!("{e}: pass --publisher with one of them"))
}

/// Why `id` cannot be joined when the DHT does not list it.
fn not_listed(id: &str, asked: bool) -> anyhow::Error {
    if id == bundled::LOCAL_DEMO_ID {
        anyhow!(
            "`{id}` is the local demo: it can be joined only while `apiary demo` runs. Start it (with \
             --keep-running to keep it up), then pass the address it prints with --initial-peers"
        )
    } else if !asked {
        anyhow!("no experiment `{id}`: no bootstrap peers to ask (pass --initial-peers)")
    } else {
        anyhow!(
            "no experiment `{id}` in the catalog: it may have ended, its publisher may be offline, or its \
             entry was refused (see `apiary -v experiments list`)"
        )
    }
}

async fn show(id: &str, browse: BrowseArgs, out: &Output) -> Result<()> {
    let (catalog, asked) = browse_dht(&browse).await?;
    let cards = all_cards(&browse, &catalog)?;
    let listing = pick(&catalog, id, browse.publisher.as_deref())?;
    let card = match listing {
        Some(l) => cards.iter().find(|c| {
            c.id == id && c.fingerprint == l.manifest().publisher_key().ok().map(|k| fingerprint(&k))
        }),
        None => cards.iter().find(|c| c.id == id),
    }
    .ok_or_else(|| not_listed(id, asked))?;
    let preview = listing.map(|l| {
        let machine = local_profile(&data_dir_or_default(browse.data_dir.clone()).unwrap_or_default());
        let coverage = Coverage::from_rosters(l.manifest(), l.rosters.iter().cloned());
        plan(l.manifest(), &coverage, &machine, browse.mode, None, 0)
    });
    if out.is_json() {
        let plan = match &preview {
            Some(Ok(p)) => json!(p),
            Some(Err(e)) => json!({ "error": e.to_string() }),
            None => serde_json::Value::Null,
        };
        out.result(json!({ "experiment": card, "plan": plan }));
        return Ok(());
    }
    out.say(&card_text(card, true));
    match preview {
        Some(Ok(p)) => out.say(&format!("if you join now:\n{}", plan_text(&p))),
        Some(Err(e)) => out.say(&format!("joining now would fail: {e}")),
        None => {}
    }
    Ok(())
}

fn plan_text(plan: &JoinPlan) -> String {
    plan.explanation.iter().map(|l| format!("  {l}\n")).collect()
}

/// What `<data dir>/joined/<id>.json` records.
#[derive(Debug, Serialize, Deserialize)]
struct Joined {
    experiment: String,
    pid: u32,
    peer_id: String,
    uids: Vec<String>,
    started: u64,
}

fn joined_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("joined")
}

fn process_alive(pid: u32) -> bool {
    let pid = sysinfo::Pid::from_u32(pid);
    let mut system = sysinfo::System::new();
    system.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[pid]), true);
    system.process(pid).is_some()
}

/// The running `join` of `id` on this computer, if any (a stale record of a dead process is removed).
fn running_join(data_dir: &Path, id: &str) -> Option<Joined> {
    let path = joined_dir(data_dir).join(format!("{id}.json"));
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice::<Joined>(&bytes) {
        Ok(j) if j.pid != std::process::id() && process_alive(j.pid) => Some(j),
        _ => {
            let _ = std::fs::remove_file(&path);
            None
        }
    }
}

async fn join(
    id: &str,
    browse: BrowseArgs,
    max_experts: Option<usize>,
    update_period: f64,
    checkpoint_dir: Option<PathBuf>,
    out: &Output,
) -> Result<()> {
    if !(update_period.is_finite() && update_period > 0.0) {
        bail!("--update-period must be a positive number of seconds");
    }
    let data_dir = data_dir_or_default(browse.data_dir.clone())?;
    if let Some(j) = running_join(&data_dir, id) {
        bail!(
            "`{id}` is already joined on this computer (process {}, hosting {} experts): leave it first with \
             `apiary experiments leave {id}`",
            j.pid,
            j.uids.len()
        );
    }
    let Some((p2p, dht)) = catalog_node(&browse.node, false, false, validator(None)?).await? else {
        return Err(not_listed(id, false));
    };
    let result = host(
        id,
        &browse,
        &data_dir,
        max_experts,
        update_period,
        checkpoint_dir,
        &p2p,
        &dht,
        out,
    )
    .await;
    ExpertServer::unregister(&p2p);
    dht.shutdown().await;
    p2p.shutdown().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn host(
    id: &str,
    browse: &BrowseArgs,
    data_dir: &Path,
    max_experts: Option<usize>,
    update_period: f64,
    checkpoint_dir: Option<PathBuf>,
    p2p: &P2pHandle,
    dht: &DhtHandle,
    out: &Output,
) -> Result<()> {
    let catalog = fetch(dht, unix_now()).await.context("reading the catalog")?;
    let listing = pick(&catalog, id, browse.publisher.as_deref())?.ok_or_else(|| not_listed(id, true))?;
    let manifest = listing.manifest().clone();
    let owner = fingerprint(&manifest.publisher_key()?);
    let machine = local_profile(data_dir);
    let coverage = Coverage::from_rosters(&manifest, listing.rosters.iter().cloned());
    let peer_id = p2p.local_peer_id().to_base58();
    let plan = plan(
        &manifest,
        &coverage,
        &machine,
        browse.mode,
        max_experts,
        tie_break_of(&peer_id),
    )?;
    out.say(&format!(
        "joining `{}` ({}, publisher key {owner}):\n{}",
        manifest.id,
        manifest.title,
        plan_text(&plan)
    ));
    let period = Duration::from_secs_f64(update_period);
    let config = HostingConfig {
        update_period: period,
        expiration: (2 * period).max(Duration::from_secs(3)),
        checkpoint_dir: Some(checkpoint_dir.unwrap_or_else(|| data_dir.join("checkpoints"))),
        ..HostingConfig::default()
    };
    let server = ExpertServer::empty();
    server.register(p2p).context("registering the expert RPCs")?;
    let hosting = Hosting::start(dht, &server, &manifest, plan.uids.clone(), &config).await?;

    let dir = joined_dir(data_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let record = dir.join(format!("{id}.json"));
    let leave_request = dir.join(format!("{id}.leave"));
    let _ = std::fs::remove_file(&leave_request);
    let joined = Joined {
        experiment: id.to_owned(),
        pid: std::process::id(),
        peer_id: peer_id.clone(),
        uids: plan.uids.clone(),
        started: unix_now(),
    };
    std::fs::write(&record, serde_json::to_vec_pretty(&joined)?)
        .with_context(|| format!("writing {}", record.display()))?;

    let maddrs = visible_maddrs(p2p, &browse.node).await;
    out.ready(
        &peer_id,
        &maddrs,
        json!({ "experiment": id, "publisher": owner, "plan": plan }),
    );
    out.say(&format!(
        "hosting {} experts of `{id}`; Ctrl-C or `apiary experiments leave {id}` to stop",
        plan.uids.len()
    ));

    let reason = watch(&manifest, &leave_request, period, dht, &hosting, out).await;
    out.say(&format!("leaving `{id}`: {reason}"));
    let stats = hosting.leave().await;
    let _ = std::fs::remove_file(&record);
    let _ = std::fs::remove_file(&leave_request);
    let (fwd, bwd, steps) = totals(&stats);
    out.event(json!({
        "event": "left", "experiment": id, "reason": reason,
        "forward_samples": fwd, "backward_samples": bwd, "optimizer_steps": steps,
    }));
    out.say(&format!(
        "left `{id}`: served {fwd} forward and {bwd} backward samples, {steps} optimizer steps"
    ));
    Ok(())
}

fn totals(stats: &apiary_expert::RuntimeStats) -> (u64, u64, u64) {
    stats.experts.iter().fold((0, 0, 0), |(f, b, s), e| {
        (f + e.forward_rows, b + e.backward_rows, s + e.optimizer_steps)
    })
}

/// Hosts until something ends it; returns why.
async fn watch(
    joined: &Manifest,
    leave_request: &Path,
    period: Duration,
    dht: &DhtHandle,
    hosting: &Hosting,
    out: &Output,
) -> String {
    let signal = crate::shutdown_signal();
    tokio::pin!(signal);
    let mut next_check = Instant::now() + period;
    let mut watch = ManifestWatch::default();
    loop {
        tokio::select! {
            _ = &mut signal => return "interrupted".into(),
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        if leave_request.exists() {
            return "leave requested".into();
        }
        if Instant::now() < next_check {
            continue;
        }
        next_check = Instant::now() + period;
        let (fwd, bwd, steps) = totals(&hosting.stats());
        out.event(json!({
            "event": "hosting", "experiment": joined.id, "forward_samples": fwd,
            "backward_samples": bwd, "optimizer_steps": steps,
        }));
        let now = unix_now();
        let latest = if now >= joined.expires {
            None
        } else {
            match fetch(dht, now).await {
                Ok(c) => c
                    .listings
                    .into_iter()
                    .find(|l| l.manifest().id == joined.id && l.manifest().publisher == joined.publisher),
                Err(e) => {
                    tracing::warn!("could not read the catalog: {e}");
                    continue;
                }
            }
        };
        match watch.check(joined, latest.as_ref().map(|l| l.manifest()), now) {
            Verdict::Keep | Verdict::Vanished { first: false } => {}
            Verdict::Vanished { first: true } => out.say(
                "the experiment's catalog entry is gone from the DHT (its publisher may be offline); \
                 hosting on until its manifest expires",
            ),
            Verdict::Leave(why) => return why,
        }
    }
}

async fn leave(id: &str, data_dir: &Path, timeout: f64, out: &Output) -> Result<()> {
    let Some(joined) = running_join(data_dir, id) else {
        bail!("`{id}` is not joined on this computer (no running `apiary experiments join {id}`)");
    };
    let dir = joined_dir(data_dir);
    let record = dir.join(format!("{id}.json"));
    std::fs::write(dir.join(format!("{id}.leave")), b"")
        .with_context(|| format!("asking process {} to leave", joined.pid))?;
    let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
    while record.exists() && process_alive(joined.pid) {
        if Instant::now() > deadline {
            bail!(
                "process {} did not leave `{id}` within {timeout} s (it may be busy: try again, or stop it)",
                joined.pid
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    out.event(json!({ "event": "left", "experiment": id, "uids": joined.uids, "pid": joined.pid }));
    out.say(&format!(
        "left `{id}`: {} experts withdrawn (process {})",
        joined.uids.len(),
        joined.pid
    ));
    Ok(())
}

/// Reads a manifest (TOML, or JSON when it ends in `.json`) and signs it with the key in `key_path`: an
/// empty publisher key is filled in from it (another key is refused), `created = 0` means now and
/// `expires = 0` thirty days from now.
pub fn load_and_sign(manifest_path: &Path, key_path: &Path) -> Result<(RsaPrivateKey, SignedManifest)> {
    let key = crate::keys::load(key_path)?;
    let text = std::fs::read_to_string(manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let mut manifest = if manifest_path.extension().is_some_and(|e| e == "json") {
        Manifest::from_json_slice(text.as_bytes())?
    } else {
        Manifest::from_toml_str(&text)?
    };
    let public = key.public_key();
    if manifest.publisher.public_key.trim().is_empty() {
        manifest.publisher.public_key = public.to_openssh();
    } else if manifest.publisher_key()? != public {
        bail!(
            "the manifest names another publisher key than {} ({} vs {})",
            key_path.display(),
            fingerprint(&manifest.publisher_key()?),
            fingerprint(&public)
        );
    }
    let now = unix_now();
    if manifest.created == 0 {
        manifest.created = now;
    }
    if manifest.expires == 0 {
        manifest.expires = now + DEFAULT_VALIDITY;
    }
    let signed = SignedManifest::sign(manifest, &key)?;
    Ok((key, signed))
}

/// `apiary publish`: signs the manifest with the publisher's key and keeps it in the DHT's catalog until
/// interrupted, then withdraws it.
pub async fn publish(args: PublishArgs, out: &Output) -> Result<()> {
    if !(args.update_period.is_finite() && args.update_period > 0.0) {
        bail!("--update-period must be a positive number of seconds");
    }
    let (key, signed) = load_and_sign(&args.manifest, &args.key)?;
    let id = signed.manifest.id.clone();
    let public = key.public_key();
    let now = unix_now();
    let Some((p2p, dht)) = catalog_node(&args.node, false, true, validator(Some(key))?).await? else {
        bail!("no bootstrap peers");
    };
    let period = Duration::from_secs_f64(args.update_period);
    let ttl = (2 * period).max(Duration::from_secs(3));
    let result = async {
        let publication = Publication::start(dht.clone(), &signed, now, period, ttl)
            .await
            .context("publishing the manifest")?;
        let maddrs = visible_maddrs(&p2p, &args.node).await;
        out.ready(
            &p2p.local_peer_id().to_string(),
            &maddrs,
            json!({ "experiment": id, "publisher": fingerprint(&public) }),
        );
        out.say(&format!(
            "published `{id}` (publisher key {}); refreshed every {:.0} s until Ctrl-C",
            fingerprint(&public),
            period.as_secs_f64()
        ));
        crate::shutdown_signal().await;
        publication.withdraw().await;
        out.say(&format!("withdrew `{id}` from the catalog"));
        anyhow::Ok(())
    }
    .await;
    dht.shutdown().await;
    p2p.shutdown().await;
    result
}
