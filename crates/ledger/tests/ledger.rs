//! End-to-end tests of the ledger on a real SQLite file in a temporary folder.
#![allow(clippy::unwrap_used)] // test helpers as well as tests

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use apiary_ledger::{
    Bucket, CSV_HEADER, Device, EnergyModel, Event, Filter, Ledger, LedgerConfig, LedgerError, LedgerHandle,
    Pass, PowerSource, SCHEMA_VERSION,
};
use rusqlite::Connection;

/// 2023-11-14T00:00:00Z
const DAY: f64 = 1_699_920_000.0;
const D: i64 = 1_699_920_000;
const H: f64 = 3600.0;

#[allow(clippy::too_many_arguments)]
fn work(
    at: f64,
    experiment: &str,
    uid: &str,
    pass: Pass,
    device: Device,
    samples: u64,
    seconds: f64,
) -> Event {
    Event::Work {
        at,
        experiment: experiment.into(),
        uid: uid.into(),
        pass,
        device,
        calls: 1,
        samples,
        optimizer_steps: u64::from(pass == Pass::Backward),
        compute_seconds: seconds,
        flops: 1000.0 * samples as f64,
        bytes_in: 10 * samples,
        bytes_out: 20 * samples,
        errors: 0,
    }
}

fn config(path: &Path) -> LedgerConfig {
    LedgerConfig::new(path)
}

fn approx(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

fn raw(path: &Path) -> Connection {
    Connection::open(path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_totals_history_csv() {
    let dir = tempfile::tempdir().unwrap();
    // the data folder does not exist yet: open creates it
    let path = dir.path().join("data").join(apiary_ledger::FILE_NAME);
    let ledger = Ledger::open(config(&path)).unwrap();

    let events = [
        // exp-a, hour 22 of day D
        work(
            DAY + 22.0 * H + 600.0,
            "exp-a",
            "ffn.0",
            Pass::Forward,
            Device::Cpu,
            10,
            5.0,
        ),
        work(
            DAY + 23.0 * H - 0.5,
            "exp-a",
            "ffn.0",
            Pass::Backward,
            Device::Cpu,
            10,
            7.0,
        ),
        // exactly on the hour: belongs to hour 23
        work(
            DAY + 23.0 * H,
            "exp-a",
            "ffn.1",
            Pass::Forward,
            Device::Cpu,
            4,
            1.0,
        ),
        // next UTC day
        work(
            DAY + 24.0 * H + 5.0,
            "exp-a",
            "ffn.0",
            Pass::Forward,
            Device::Cpu,
            6,
            2.0,
        ),
        work(
            DAY + 23.0 * H + 1800.0,
            "exp-b",
            "tf.0",
            Pass::Forward,
            Device::Gpu,
            100,
            3.0,
        ),
        // one hour of uptime ending at 23:30: half in hour 22, half in hour 23
        Event::Uptime {
            at: DAY + 23.5 * H,
            experiment: Some("exp-a".into()),
            seconds: 3600.0,
        },
        Event::Uptime {
            at: DAY + 23.5 * H,
            experiment: None,
            seconds: 60.0,
        },
    ];
    for e in events {
        ledger.record(e).unwrap();
    }
    assert_eq!(ledger.flush().await.unwrap(), 7);
    assert_eq!(ledger.committed_events(), 7);

    let a = ledger.totals(Filter::experiment("exp-a")).await.unwrap();
    assert_eq!(a.counters.forward_samples, 20);
    assert_eq!(a.counters.backward_samples, 10);
    assert_eq!(a.counters.samples(), 30);
    assert_eq!(a.counters.forward_calls, 3);
    assert_eq!(a.counters.backward_calls, 1);
    assert_eq!(a.counters.optimizer_steps, 1);
    assert!(approx(a.counters.cpu_seconds, 15.0));
    assert_eq!(a.counters.gpu_seconds, 0.0);
    assert_eq!(a.counters.bytes_in, 300);
    assert_eq!(a.counters.bytes_out, 600);
    assert!(approx(a.counters.flops, 30_000.0));
    assert!(approx(a.uptime_seconds, 3600.0));
    // modelled: 15 core-seconds × 10 W
    assert!(approx(a.energy_kwh, 150.0 / 3.6e6));
    assert_eq!(a.cost, None);

    let b = ledger.totals(Filter::experiment("exp-b")).await.unwrap();
    assert_eq!(b.counters.samples(), 100);
    assert!(approx(b.counters.gpu_seconds, 3.0));
    assert!(approx(b.energy_kwh, 3.0 * 150.0 / 3.6e6));

    let all = ledger.totals(Filter::all()).await.unwrap();
    assert_eq!(all.counters.samples(), 130);
    assert!(approx(all.uptime_seconds, 3660.0));

    // range and uid filters
    let h23 = ledger
        .totals(Filter::all().between(D + 23 * 3600, D + 24 * 3600))
        .await
        .unwrap();
    assert_eq!(h23.counters.samples(), 104);
    let one = ledger
        .totals(Filter::experiment("exp-a").uid("ffn.1"))
        .await
        .unwrap();
    assert_eq!(one.counters.samples(), 4);

    // hourly buckets for exp-a
    let hours = ledger
        .history(Filter::experiment("exp-a"), Bucket::Hour)
        .await
        .unwrap();
    let got: Vec<(i64, u64, u64, f64)> = hours
        .iter()
        .map(|r| {
            (
                r.start,
                r.counters.forward_samples,
                r.counters.backward_samples,
                r.uptime_seconds,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (D + 22 * 3600, 10, 10, 1800.0),
            (D + 23 * 3600, 4, 0, 1800.0),
            (D + 24 * 3600, 6, 0, 0.0),
        ]
    );
    assert!(hours.iter().all(|r| r.experiment.as_deref() == Some("exp-a")));

    // daily buckets, all experiments: node-wide uptime row first in its day
    let days = ledger.history(Filter::all(), Bucket::Day).await.unwrap();
    let got: Vec<(i64, Option<&str>, u64, f64)> = days
        .iter()
        .map(|r| {
            (
                r.start,
                r.experiment.as_deref(),
                r.counters.samples(),
                r.uptime_seconds,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (D, None, 0, 60.0),
            (D, Some("exp-a"), 24, 3600.0),
            (D, Some("exp-b"), 100, 0.0),
            (D + 86_400, Some("exp-a"), 6, 0.0),
        ]
    );

    let experiments = ledger.experiments().await.unwrap();
    assert_eq!(experiments.len(), 2);
    assert_eq!(experiments[0].experiment, "exp-a");
    assert_eq!(experiments[0].experts, 2);
    assert_eq!(experiments[0].samples, 30);
    assert_eq!(experiments[0].first_hour, D + 22 * 3600);
    assert_eq!(experiments[0].last_hour, D + 24 * 3600);
    assert_eq!(experiments[1].experiment, "exp-b");

    let csv = ledger
        .export_csv(Filter::experiment("exp-a"), Bucket::Day)
        .await
        .unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert_eq!(lines[0], CSV_HEADER);
    assert!(
        lines[1].starts_with(&format!("2023-11-14T00:00:00Z,{D},exp-a,2,1,14,10,1,")),
        "{}",
        lines[1]
    );
    assert!(lines[2].starts_with(&format!("2023-11-15T00:00:00Z,{},exp-a,1,0,6,0,0,", D + 86_400)));
    assert!(lines[1].ends_with(",,EUR"), "no price → empty cost: {}", lines[1]);
    assert_eq!(lines[1].split(',').count(), CSV_HEADER.split(',').count());

    // the blocking twins see the same
    let blocking = {
        let l = ledger.clone();
        tokio::task::spawn_blocking(move || l.totals_blocking(Filter::experiment("exp-a")))
            .await
            .unwrap()
            .unwrap()
    };
    assert_eq!(blocking, a);

    assert_eq!(ledger.close().await.unwrap(), 7);
    assert!(matches!(
        ledger.record(work(DAY, "x", "y", Pass::Forward, Device::Cpu, 1, 1.0)),
        Err(LedgerError::Closed)
    ));
    assert!(matches!(ledger.flush().await, Err(LedgerError::Closed)));
}

#[test]
fn energy_measured_beats_model_and_prices() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let ledger = Ledger::open(config(&path)).unwrap();
    let events = [
        // hour 0: modelled only: 3600 core-s × 10 W = 0.01 kWh
        work(DAY + 60.0, "exp-a", "e0", Pass::Forward, Device::Cpu, 1, 3600.0),
        // hour 1: 200 W measured for the whole hour = 0.2 kWh, split 3:1 by modelled GPU energy
        work(
            DAY + H + 60.0,
            "exp-a",
            "e0",
            Pass::Forward,
            Device::Gpu,
            1,
            1800.0,
        ),
        work(
            DAY + H + 60.0,
            "exp-b",
            "e1",
            Pass::Forward,
            Device::Gpu,
            1,
            600.0,
        ),
        Event::Power {
            at: DAY + 2.0 * H,
            watts: 200.0,
            seconds: 3600.0,
            source: PowerSource::Measured,
        },
        // the model's guess for hour 1 is ignored when measured power exists
        Event::Power {
            at: DAY + 2.0 * H,
            watts: 999.0,
            seconds: 3600.0,
            source: PowerSource::Modelled,
        },
        // hour 2: idle, measured 50 W for half an hour = 0.025 kWh, node-wide
        Event::Power {
            at: DAY + 2.5 * H,
            watts: 50.0,
            seconds: 1800.0,
            source: PowerSource::Measured,
        },
        // hour 3: caller-modelled 100 W = 0.1 kWh, all exp-b's
        work(
            DAY + 3.0 * H + 60.0,
            "exp-b",
            "e1",
            Pass::Forward,
            Device::Cpu,
            1,
            100.0,
        ),
        Event::Power {
            at: DAY + 4.0 * H,
            watts: 100.0,
            seconds: 3600.0,
            source: PowerSource::Modelled,
        },
    ];
    for e in events {
        ledger.record(e).unwrap();
    }
    assert_eq!(ledger.flush_blocking().unwrap(), 8);

    let all = ledger.totals_blocking(Filter::all()).unwrap();
    assert!(
        approx(all.energy_kwh, 0.01 + 0.2 + 0.025 + 0.1),
        "{}",
        all.energy_kwh
    );
    assert!(
        approx(all.measured_energy_kwh, 0.225),
        "{}",
        all.measured_energy_kwh
    );
    assert_eq!(all.cost, None);

    let a = ledger.totals_blocking(Filter::experiment("exp-a")).unwrap();
    assert!(approx(a.energy_kwh, 0.01 + 0.15), "{}", a.energy_kwh);
    assert!(approx(a.measured_energy_kwh, 0.15));
    let b = ledger.totals_blocking(Filter::experiment("exp-b")).unwrap();
    assert!(approx(b.energy_kwh, 0.05 + 0.1), "{}", b.energy_kwh);
    assert!(approx(b.measured_energy_kwh, 0.05));

    let hours = ledger.history_blocking(Filter::all(), Bucket::Hour).unwrap();
    let idle: Vec<_> = hours.iter().filter(|r| r.experiment.is_none()).collect();
    assert_eq!(idle.len(), 1);
    assert_eq!(idle[0].start, D + 2 * 3600);
    assert!(approx(idle[0].energy_kwh, 0.025));

    // a price (and a hungrier CPU) re-prices all history
    let model = EnergyModel {
        cpu_watts_per_core_busy: 20.0,
        price_per_kwh: Some(0.30),
        currency: "CHF".into(),
        ..EnergyModel::default()
    };
    ledger.set_energy_model_blocking(model).unwrap();
    let all = ledger.totals_blocking(Filter::all()).unwrap();
    assert!(approx(all.energy_kwh, 0.02 + 0.2 + 0.025 + 0.1));
    assert!(approx(all.cost.unwrap(), 0.345 * 0.30), "{:?}", all.cost);
    assert_eq!(all.currency, "CHF");
    let days = ledger
        .history_blocking(Filter::experiment("exp-a"), Bucket::Day)
        .unwrap();
    assert_eq!(days.len(), 1);
    assert!(approx(days[0].cost.unwrap(), (0.02 + 0.15) * 0.30));
    let csv = ledger.export_csv_blocking(Filter::all(), Bucket::Day).unwrap();
    assert!(csv.lines().nth(1).unwrap().ends_with(",CHF"));

    // a bad model is refused and the old one stays
    let bad = EnergyModel {
        gpu_watts_busy: -1.0,
        ..EnergyModel::default()
    };
    assert!(matches!(
        ledger.set_energy_model_blocking(bad),
        Err(LedgerError::InvalidNumber {
            field: "gpu_watts_busy",
            ..
        })
    ));
    assert_eq!(ledger.energy_model_blocking().unwrap().currency, "CHF");
    ledger.close_blocking().unwrap();
}

fn file_state(path: &Path) -> (Vec<u8>, std::time::SystemTime) {
    (
        std::fs::read(path).unwrap(),
        std::fs::metadata(path).unwrap().modified().unwrap(),
    )
}

#[test]
fn migrations_versioned_and_too_new_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let ledger = Ledger::open(config(&path)).unwrap();
    ledger
        .record(work(DAY, "exp", "e", Pass::Forward, Device::Cpu, 5, 1.0))
        .unwrap();
    assert_eq!(ledger.close_blocking().unwrap(), 1);
    {
        let conn = raw(&path);
        let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        let app: i64 = conn.query_row("PRAGMA application_id", [], |r| r.get(0)).unwrap();
        assert_eq!(app, apiary_ledger::APPLICATION_ID);
        let version: String = conn
            .query_row("SELECT value FROM meta WHERE key = 'app_version'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
    }

    // reopening keeps the data and the lifetime count
    let ledger = Ledger::open(config(&path)).unwrap();
    assert_eq!(ledger.committed_events(), 1);
    ledger
        .record(work(DAY + 10.0, "exp", "e", Pass::Forward, Device::Cpu, 7, 1.0))
        .unwrap();
    assert_eq!(ledger.flush_blocking().unwrap(), 2);
    assert_eq!(
        ledger.totals_blocking(Filter::all()).unwrap().counters.samples(),
        12
    );
    ledger.close_blocking().unwrap();

    // a newer Apiary's database
    raw(&path)
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    let before = file_state(&path);
    match Ledger::open(config(&path)) {
        Err(LedgerError::TooNew { found, supported, .. }) => {
            assert_eq!(found, SCHEMA_VERSION + 1);
            assert_eq!(supported, SCHEMA_VERSION);
        }
        other => panic!("expected TooNew, got {other:?}"),
    }
    assert!(
        before == file_state(&path),
        "a too-new database must be left untouched"
    );
}

fn open_err(path: &Path) -> LedgerError {
    match Ledger::open(config(path)) {
        Ok(_) => panic!("open of {} should fail", path.display()),
        Err(e) => e,
    }
}

#[test]
fn corruption_reported_never_replaced() {
    let dir = tempfile::tempdir().unwrap();

    // not SQLite at all
    let junk = dir.path().join("junk.sqlite");
    std::fs::write(
        &junk,
        b"these are my holiday photos, not a database\n".repeat(200),
    )
    .unwrap();
    let before = std::fs::read(&junk).unwrap();
    let e = open_err(&junk);
    assert!(matches!(e, LedgerError::NotADatabase { .. }), "{e:?}");
    assert_eq!(std::fs::read(&junk).unwrap(), before);

    // someone else's SQLite database
    let foreign = dir.path().join("foreign.sqlite");
    raw(&foreign)
        .execute_batch("CREATE TABLE photos (id INTEGER); INSERT INTO photos VALUES (1);")
        .unwrap();
    let before = std::fs::read(&foreign).unwrap();
    let e = open_err(&foreign);
    assert!(matches!(e, LedgerError::NotADatabase { .. }), "{e:?}");
    assert_eq!(std::fs::read(&foreign).unwrap(), before);

    // a real ledger with garbage over everything after its first two pages
    let path = dir.path().join("ledger.sqlite");
    let ledger = Ledger::open(config(&path)).unwrap();
    for i in 0..3000u32 {
        let at = DAY + f64::from(i) * H;
        ledger
            .record(work(
                at,
                "exp-with-a-long-name",
                &format!("ffn.{}", i % 7),
                Pass::Forward,
                Device::Cpu,
                1,
                1.0,
            ))
            .unwrap();
        if i % 1000 == 999 {
            ledger.flush_blocking().unwrap();
        }
    }
    ledger.close_blocking().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 64 * 1024, "{} bytes", bytes.len());
    for (i, b) in bytes.iter_mut().enumerate().skip(8192) {
        *b = (i as u8).wrapping_mul(31) ^ 0xA5;
    }
    std::fs::write(&path, &bytes).unwrap();
    let e = open_err(&path);
    match &e {
        LedgerError::Corrupt { path: p, detail } => {
            assert_eq!(p, &path);
            assert!(!detail.is_empty());
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(e.to_string().contains("corrupt"));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "a corrupt database must not be replaced"
    );
}

#[test]
fn locked_database_reported_within_timeout_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let mut cfg = config(&path);
    cfg.busy_timeout = Duration::from_millis(200);
    Ledger::open(cfg.clone()).unwrap().close_blocking().unwrap();

    // WAL: readers pass, so open works and the commit reports Locked
    let mut other = raw(&path);
    let tx = other
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .unwrap();
    let ledger = Ledger::open(cfg.clone()).unwrap();
    ledger
        .record(work(DAY, "exp", "e", Pass::Forward, Device::Cpu, 3, 1.0))
        .unwrap();
    let started = Instant::now();
    let e = ledger.flush_blocking().unwrap_err();
    assert!(matches!(e, LedgerError::Locked { .. }), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // close refuses to drop the pending event while locked
    assert!(matches!(ledger.close_blocking(), Err(LedgerError::Locked { .. })));
    tx.commit().unwrap();
    // the pending event was kept and commits once the lock is gone
    assert_eq!(ledger.flush_blocking().unwrap(), 1);
    assert_eq!(
        ledger.totals_blocking(Filter::all()).unwrap().counters.samples(),
        3
    );
    ledger.close_blocking().unwrap();

    // rollback journal + exclusive lock: even reading blocks, so open reports Locked
    other
        .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get::<_, String>(0))
        .unwrap();
    let tx = other
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .unwrap();
    let started = Instant::now();
    let e = Ledger::open(cfg.clone()).unwrap_err();
    assert!(matches!(e, LedgerError::Locked { .. }), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    tx.rollback().unwrap();
    drop(other);
    let ledger = Ledger::open(cfg).unwrap();
    assert_eq!(
        ledger.totals_blocking(Filter::all()).unwrap().counters.samples(),
        3
    );
    ledger.close_blocking().unwrap();
}

#[test]
fn bad_input_refused_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let ledger = Ledger::open(config(&path)).unwrap();
    let good = work(DAY, "exp", "e", Pass::Forward, Device::Cpu, 1, 1.0);
    let with = |f: &dyn Fn(&mut Event)| {
        let mut e = good.clone();
        f(&mut e);
        ledger.record(e)
    };
    let set_exp = |v: String| {
        move |e: &mut Event| {
            if let Event::Work { experiment, .. } = e {
                *experiment = v.clone()
            }
        }
    };
    assert!(matches!(
        with(&set_exp(String::new())),
        Err(LedgerError::InvalidId {
            field: "experiment",
            ..
        })
    ));
    assert!(matches!(
        with(&set_exp("x".repeat(257))),
        Err(LedgerError::InvalidId {
            field: "experiment",
            ..
        })
    ));
    assert!(matches!(
        with(&set_exp("a\nb".into())),
        Err(LedgerError::InvalidId {
            field: "experiment",
            ..
        })
    ));
    assert!(matches!(
        with(&|e| if let Event::Work { uid, .. } = e {
            uid.clear()
        }),
        Err(LedgerError::InvalidId { field: "uid", .. })
    ));
    assert!(matches!(
        with(&|e| if let Event::Work { compute_seconds, .. } = e {
            *compute_seconds = f64::NAN
        }),
        Err(LedgerError::InvalidNumber {
            field: "compute_seconds",
            ..
        })
    ));
    assert!(matches!(
        with(&|e| if let Event::Work { flops, .. } = e {
            *flops = -1.0
        }),
        Err(LedgerError::InvalidNumber { field: "flops", .. })
    ));
    assert!(matches!(
        with(&|e| if let Event::Work { at, .. } = e {
            *at = f64::INFINITY
        }),
        Err(LedgerError::InvalidNumber { field: "at", .. })
    ));
    assert!(matches!(
        with(&|e| if let Event::Work { samples, .. } = e {
            *samples = u64::MAX
        }),
        Err(LedgerError::InvalidNumber { field: "samples", .. })
    ));
    let power = |watts: f64, seconds: f64| Event::Power {
        at: DAY,
        watts,
        seconds,
        source: PowerSource::Measured,
    };
    assert!(matches!(
        ledger.record(power(-5.0, 1.0)),
        Err(LedgerError::InvalidNumber { field: "watts", .. })
    ));
    assert!(matches!(
        ledger.record(power(f64::NAN, 1.0)),
        Err(LedgerError::InvalidNumber { field: "watts", .. })
    ));
    assert!(matches!(
        ledger.record(power(5.0, 90_000.0)),
        Err(LedgerError::InvalidNumber { field: "seconds", .. })
    ));
    let uptime = Event::Uptime {
        at: DAY,
        experiment: None,
        seconds: f64::NAN,
    };
    assert!(matches!(
        ledger.record(uptime),
        Err(LedgerError::InvalidNumber { field: "seconds", .. })
    ));
    let uptime = Event::Uptime {
        at: DAY,
        experiment: Some(String::new()),
        seconds: 1.0,
    };
    assert!(matches!(
        ledger.record(uptime),
        Err(LedgerError::InvalidId {
            field: "experiment",
            ..
        })
    ));
    let e = with(&set_exp("x".repeat(300))).unwrap_err();
    assert!(e.to_string().contains("300 bytes"), "{e}");

    // nothing was written
    assert_eq!(ledger.flush_blocking().unwrap(), 0);
    let t = ledger.totals_blocking(Filter::all()).unwrap();
    assert_eq!(t.counters.samples(), 0);
    assert_eq!(t.energy_kwh, 0.0);
    assert!(
        ledger
            .history_blocking(Filter::all(), Bucket::Hour)
            .unwrap()
            .is_empty()
    );
    // 256 bytes is the limit, inclusive
    with(&set_exp("x".repeat(256))).unwrap();
    assert_eq!(ledger.flush_blocking().unwrap(), 1);
    assert_eq!(ledger.dropped_events(), 0);
    ledger.close_blocking().unwrap();

    // unusable configuration
    let mut cfg = config(&path);
    cfg.queue_capacity = 0;
    assert!(matches!(Ledger::open(cfg), Err(LedgerError::Config(_))));
    let mut cfg = config(&path);
    cfg.flush_interval = Duration::ZERO;
    assert!(matches!(Ledger::open(cfg), Err(LedgerError::Config(_))));
    let mut cfg = config(&path);
    cfg.energy.price_per_kwh = Some(f64::NAN);
    assert!(matches!(
        Ledger::open(cfg),
        Err(LedgerError::InvalidNumber {
            field: "price_per_kwh",
            ..
        })
    ));
}

#[test]
fn full_queue_is_busy_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let mut cfg = config(&path);
    cfg.queue_capacity = 4;
    cfg.busy_timeout = Duration::from_secs(2);
    Ledger::open(cfg.clone()).unwrap().close_blocking().unwrap();

    // stall the ledger thread inside a commit behind another connection's lock
    let mut other = raw(&path);
    let tx = other
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .unwrap();
    let ledger = Ledger::open(cfg).unwrap();
    ledger
        .record(work(DAY, "exp", "e", Pass::Forward, Device::Cpu, 1, 1.0))
        .unwrap();
    let stalled = {
        let l = ledger.clone();
        std::thread::spawn(move || l.flush_blocking())
    };
    std::thread::sleep(Duration::from_millis(300));

    let mut ok = 0;
    let mut busy = 0;
    let started = Instant::now();
    for i in 0..10 {
        match ledger.record(work(
            DAY + f64::from(i),
            "exp",
            "e",
            Pass::Forward,
            Device::Cpu,
            1,
            1.0,
        )) {
            Ok(()) => ok += 1,
            Err(LedgerError::Busy) => busy += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    let spent = started.elapsed();
    assert!(spent < Duration::from_millis(100), "record blocked for {spent:?}");
    assert_eq!((ok, busy), (4, 6));
    assert_eq!(ledger.dropped_events(), 6);

    assert!(matches!(stalled.join().unwrap(), Err(LedgerError::Locked { .. })));
    tx.commit().unwrap();
    // the 1 + 4 accepted events are all there
    assert_eq!(ledger.flush_blocking().unwrap(), 5);
    assert_eq!(
        ledger.totals_blocking(Filter::all()).unwrap().counters.samples(),
        5
    );
    ledger.close_blocking().unwrap();
}

const CHILD_ENV: &str = "APIARY_LEDGER_CHILD";

/// Not a test by itself: the writer process that `kill_9_loses_nothing_committed` kills.
/// It records events (one sample each) and prints `COMMITTED <n>` after each flush returns.
#[test]
#[ignore = "run by kill_9_loses_nothing_committed as a child process"]
fn child_writer() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mut cfg = LedgerConfig::new(PathBuf::from(path));
    // commit constantly in the background too, so the kill can land inside any transaction
    cfg.flush_interval = Duration::from_millis(2);
    let ledger = Ledger::open(cfg).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n: u64 = 0;
    while Instant::now() < deadline {
        for _ in 0..50 {
            // a new hour every 97 events, and five experts: inserts as well as updates
            let at = DAY + (n / 97) as f64 * H;
            let e = work(
                at,
                "exp",
                &format!("ffn.{}", n % 5),
                Pass::Forward,
                Device::Cpu,
                1,
                0.01,
            );
            match ledger.record(e) {
                Ok(()) => n += 1,
                Err(LedgerError::Busy) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        let committed = ledger.flush_blocking().unwrap();
        println!("COMMITTED {committed}");
    }
}

fn committed_line(line: &str) -> Option<u64> {
    line.strip_prefix("COMMITTED ")?.trim().parse().ok()
}

#[test]
fn kill_9_loses_nothing_committed() {
    let exe = std::env::current_exe().unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    for (round, kill_after) in [3usize, 17, 60].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "child_writer",
                "--nocapture",
                "--ignored",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        let mut last = 0;
        while seen < kill_after {
            let line = lines.next().expect("child ended early").unwrap();
            if let Some(n) = committed_line(&line) {
                assert!(n >= last);
                last = n;
                seen += 1;
            }
        }
        // a random-ish extra delay so the kill lands at different points of the commit cycle
        let micros = u64::from(nanos.wrapping_mul(round as u32 + 7) % 3000);
        std::thread::sleep(Duration::from_micros(micros));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // lines already in the pipe were printed after their COMMIT returned too
        for line in lines {
            if let Some(n) = committed_line(&line.unwrap()) {
                last = last.max(n);
            }
        }
        assert!(last > 0);

        let conn = raw(&path);
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
        let samples: i64 = conn
            .query_row(
                "SELECT COALESCE(SUM(forward_samples), 0) FROM work_hourly",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let counted: String = conn
            .query_row("SELECT value FROM meta WHERE key = 'events_committed'", [], |r| {
                r.get(0)
            })
            .unwrap();
        let samples = samples as u64;
        assert!(
            samples >= last,
            "round {round}: {samples} samples in the database < {last} printed as committed"
        );
        // the rollups and the lifetime count are committed together
        assert_eq!(counted.parse::<u64>().unwrap(), samples, "round {round}");
        drop(conn);
        let ledger: LedgerHandle = Ledger::open(config(&path)).unwrap();
        assert_eq!(
            ledger.totals_blocking(Filter::all()).unwrap().counters.samples(),
            samples
        );
        ledger.close_blocking().unwrap();
        eprintln!(
            "round {round}: killed after {kill_after} flushes, {last} printed, {samples} in the database"
        );
    }
}

#[test]
fn dropping_the_last_handle_commits_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let mut cfg = config(&path);
    // long interval: only the drop can commit within this test
    cfg.flush_interval = Duration::from_secs(3600);
    let ledger = Ledger::open(cfg).unwrap();
    let clone = ledger.clone();
    ledger
        .record(work(DAY, "exp", "e", Pass::Forward, Device::Cpu, 9, 1.0))
        .unwrap();
    drop(ledger);
    // one handle left: nothing committed yet
    std::thread::sleep(Duration::from_millis(100));
    let sum = |conn: &Connection| -> i64 {
        conn.query_row(
            "SELECT COALESCE(SUM(forward_samples), 0) FROM work_hourly",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    let conn = raw(&path);
    assert_eq!(sum(&conn), 0);
    drop(clone);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sum(&conn) != 9 {
        assert!(Instant::now() < deadline, "the final commit never came");
        std::thread::sleep(Duration::from_millis(10));
    }
}
