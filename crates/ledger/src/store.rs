//! The SQLite side: opening with checks, migrations, committing rollups, reports.
//! Everything here runs on the ledger thread (or in `Ledger::open` before it starts).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};

use crate::config::{Durability, EnergyModel, LedgerConfig};
use crate::error::{LedgerError, classify, truncate_detail};
use crate::event::PowerSource;
use crate::report::{Bucket, Counters, ExperimentSummary, Filter, Row, Totals};

/// The schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;

/// `PRAGMA application_id` of a ledger: "APLG".
pub const APPLICATION_ID: i64 = 0x4150_4C47;

/// Migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the rollups and the meta table
    "CREATE TABLE meta (
        key TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL
    );
    CREATE TABLE work_hourly (
        hour INTEGER NOT NULL,
        experiment TEXT NOT NULL,
        uid TEXT NOT NULL,
        forward_calls INTEGER NOT NULL DEFAULT 0,
        backward_calls INTEGER NOT NULL DEFAULT 0,
        forward_samples INTEGER NOT NULL DEFAULT 0,
        backward_samples INTEGER NOT NULL DEFAULT 0,
        optimizer_steps INTEGER NOT NULL DEFAULT 0,
        cpu_seconds REAL NOT NULL DEFAULT 0,
        gpu_seconds REAL NOT NULL DEFAULT 0,
        flops REAL NOT NULL DEFAULT 0,
        bytes_in INTEGER NOT NULL DEFAULT 0,
        bytes_out INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (hour, experiment, uid)
    );
    CREATE INDEX work_hourly_by_experiment ON work_hourly (experiment, hour);
    CREATE TABLE uptime_hourly (
        hour INTEGER NOT NULL,
        experiment TEXT NOT NULL,
        seconds REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (hour, experiment)
    );
    CREATE TABLE power_hourly (
        hour INTEGER NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('measured', 'modelled')),
        joules REAL NOT NULL DEFAULT 0,
        seconds REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (hour, source)
    );",
];

/// Opens (creating when missing) and checks the database; see the crate docs for the order.
pub(crate) fn open(config: &LedgerConfig) -> Result<(Connection, u64), LedgerError> {
    let path = config.path.as_path();
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|source| LedgerError::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    let flags =
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(|e| classify(path, e))?;
    let c = |e| classify(path, e);
    conn.busy_timeout(config.busy_timeout).map_err(c)?;

    // Read-only checks first: nothing is written to a file we refuse.
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(c)?;
    if version > SCHEMA_VERSION {
        return Err(LedgerError::TooNew {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    if version < 0 {
        return Err(LedgerError::NotADatabase {
            path: path.to_path_buf(),
            detail: format!("negative schema version {version}"),
        });
    }
    let app_id: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(c)?;
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table'",
            [],
            |r| r.get(0),
        )
        .map_err(c)?;
    if version == 0 && tables > 0 {
        return Err(LedgerError::NotADatabase {
            path: path.to_path_buf(),
            detail: format!("an SQLite database with {tables} foreign tables"),
        });
    }
    if version > 0 && app_id != APPLICATION_ID {
        return Err(LedgerError::NotADatabase {
            path: path.to_path_buf(),
            detail: format!("application_id {app_id:#x} is not the ledger's"),
        });
    }
    quick_check(&conn, path)?;

    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(c)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(LedgerError::NoWal {
            path: path.to_path_buf(),
            mode,
        });
    }
    let sync = match config.durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync).map_err(c)?;
    migrate(&mut conn, version, path)?;
    let committed = read_committed(&conn).map_err(c)?;
    Ok((conn, committed))
}

fn quick_check(conn: &Connection, path: &Path) -> Result<(), LedgerError> {
    let c = |e| classify(path, e);
    let mut stmt = conn.prepare("PRAGMA quick_check").map_err(c)?;
    let mut rows = stmt.query([]).map_err(c)?;
    let mut problems = Vec::new();
    while let Some(row) = rows.next().map_err(c)? {
        let line: String = row.get(0).map_err(c)?;
        if line != "ok" {
            problems.push(line);
        }
        if problems.len() >= 16 {
            break;
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(LedgerError::Corrupt {
            path: path.to_path_buf(),
            detail: truncate_detail(problems.join("; ")),
        })
    }
}

fn migrate(conn: &mut Connection, from: i64, path: &Path) -> Result<(), LedgerError> {
    let c = |e| classify(path, e);
    let mut version = from;
    while version < SCHEMA_VERSION {
        let Some(sql) = usize::try_from(version).ok().and_then(|v| MIGRATIONS.get(v)) else {
            break;
        };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(c)?;
        tx.execute_batch(sql).map_err(c)?;
        if version == 0 {
            tx.pragma_update(None, "application_id", APPLICATION_ID)
                .map_err(c)?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('created_at', ?1), ('app_version', ?2),
                 ('events_committed', '0')",
                params![crate::event::unix_now().to_string(), env!("CARGO_PKG_VERSION")],
            )
            .map_err(c)?;
        }
        tx.pragma_update(None, "user_version", version + 1).map_err(c)?;
        tx.commit().map_err(c)?;
        tracing::info!(path = %path.display(), version = version + 1, "ledger schema migrated");
        version += 1;
    }
    Ok(())
}

fn read_committed(conn: &Connection) -> rusqlite::Result<u64> {
    let value: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'events_committed'", [], |r| {
            r.get(0)
        })
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    Ok(value.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// Aggregates not yet committed, keyed like the rollup tables.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub(crate) work: HashMap<(i64, String, String), Counters>,
    pub(crate) uptime: HashMap<(i64, String), f64>,
    pub(crate) power: HashMap<(i64, PowerSource), (f64, f64)>,
    pub(crate) events: u64,
}

impl Pending {
    pub(crate) fn is_empty(&self) -> bool {
        self.events == 0
    }

    pub(crate) fn keys(&self) -> usize {
        self.work.len() + self.uptime.len() + self.power.len()
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Commits `pending` in one `BEGIN IMMEDIATE` transaction, moving `events_committed` from
/// `committed` to `committed + pending.events`. On error nothing is written.
pub(crate) fn commit(conn: &mut Connection, pending: &Pending, committed: u64) -> rusqlite::Result<u64> {
    let total = committed.saturating_add(pending.events);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut work = tx.prepare_cached(
            "INSERT INTO work_hourly (hour, experiment, uid, forward_calls, backward_calls,
                forward_samples, backward_samples, optimizer_steps, cpu_seconds, gpu_seconds,
                flops, bytes_in, bytes_out, errors)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
             ON CONFLICT (hour, experiment, uid) DO UPDATE SET
                forward_calls = forward_calls + excluded.forward_calls,
                backward_calls = backward_calls + excluded.backward_calls,
                forward_samples = forward_samples + excluded.forward_samples,
                backward_samples = backward_samples + excluded.backward_samples,
                optimizer_steps = optimizer_steps + excluded.optimizer_steps,
                cpu_seconds = cpu_seconds + excluded.cpu_seconds,
                gpu_seconds = gpu_seconds + excluded.gpu_seconds,
                flops = flops + excluded.flops,
                bytes_in = bytes_in + excluded.bytes_in,
                bytes_out = bytes_out + excluded.bytes_out,
                errors = errors + excluded.errors",
        )?;
        for ((hour, experiment, uid), c) in &pending.work {
            work.execute(params![
                hour,
                experiment,
                uid,
                to_i64(c.forward_calls),
                to_i64(c.backward_calls),
                to_i64(c.forward_samples),
                to_i64(c.backward_samples),
                to_i64(c.optimizer_steps),
                c.cpu_seconds,
                c.gpu_seconds,
                c.flops,
                to_i64(c.bytes_in),
                to_i64(c.bytes_out),
                to_i64(c.errors),
            ])?;
        }
        let mut uptime = tx.prepare_cached(
            "INSERT INTO uptime_hourly (hour, experiment, seconds) VALUES (?1, ?2, ?3)
             ON CONFLICT (hour, experiment) DO UPDATE SET seconds = seconds + excluded.seconds",
        )?;
        for ((hour, experiment), seconds) in &pending.uptime {
            uptime.execute(params![hour, experiment, seconds])?;
        }
        let mut power = tx.prepare_cached(
            "INSERT INTO power_hourly (hour, source, joules, seconds) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (hour, source) DO UPDATE SET
                joules = joules + excluded.joules, seconds = seconds + excluded.seconds",
        )?;
        for ((hour, source), (joules, seconds)) in &pending.power {
            power.execute(params![hour, source.as_str(), joules, seconds])?;
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('events_committed', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [total.to_string()],
        )?;
    }
    tx.commit()?;
    Ok(total)
}

/// Reads an integer column that SQLite may have turned into a REAL on overflow.
fn get_u64(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<u64> {
    Ok(match row.get_ref(index)? {
        ValueRef::Integer(v) => u64::try_from(v).unwrap_or(0),
        // `as` saturates (NaN → 0)
        ValueRef::Real(v) => v as u64,
        _ => 0,
    })
}

fn get_f64(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<f64> {
    Ok(match row.get_ref(index)? {
        ValueRef::Integer(v) => v as f64,
        ValueRef::Real(v) => v,
        _ => 0.0,
    })
}

const FILTER: &str = "(?1 IS NULL OR experiment = ?1) AND (?2 IS NULL OR uid = ?2)
    AND (?3 IS NULL OR hour >= ?3) AND (?4 IS NULL OR hour < ?4)";

/// Hourly rows for `filter`, sorted by hour then experiment (node-wide first in an hour).
pub(crate) fn hourly_rows(
    conn: &Connection,
    filter: &Filter,
    model: &EnergyModel,
) -> rusqlite::Result<Vec<Row>> {
    let mut rows: BTreeMap<(i64, Option<String>), Row> = BTreeMap::new();
    let args = params![filter.experiment, filter.uid, filter.from, filter.to];

    let mut stmt = conn.prepare_cached(&format!(
        "SELECT hour, experiment, SUM(forward_calls), SUM(backward_calls), SUM(forward_samples),
            SUM(backward_samples), SUM(optimizer_steps), SUM(cpu_seconds), SUM(gpu_seconds),
            SUM(flops), SUM(bytes_in), SUM(bytes_out), SUM(errors)
         FROM work_hourly WHERE {FILTER} GROUP BY hour, experiment"
    ))?;
    let mut q = stmt.query(args)?;
    while let Some(r) = q.next()? {
        let hour: i64 = r.get(0)?;
        let experiment: String = r.get(1)?;
        let counters = Counters {
            forward_calls: get_u64(r, 2)?,
            backward_calls: get_u64(r, 3)?,
            forward_samples: get_u64(r, 4)?,
            backward_samples: get_u64(r, 5)?,
            optimizer_steps: get_u64(r, 6)?,
            cpu_seconds: get_f64(r, 7)?,
            gpu_seconds: get_f64(r, 8)?,
            flops: get_f64(r, 9)?,
            bytes_in: get_u64(r, 10)?,
            bytes_out: get_u64(r, 11)?,
            errors: get_u64(r, 12)?,
        };
        let key = (hour, Some(experiment.clone()));
        rows.insert(
            key,
            Row {
                start: hour,
                experiment: Some(experiment),
                counters,
                ..Row::default()
            },
        );
    }
    drop(q);

    // uptime follows the experiment filter only ('' = node-wide)
    let mut stmt = conn.prepare_cached(
        "SELECT hour, experiment, SUM(seconds) FROM uptime_hourly
         WHERE (?1 IS NULL OR experiment = ?1) AND (?2 IS NULL OR hour >= ?2)
           AND (?3 IS NULL OR hour < ?3)
         GROUP BY hour, experiment",
    )?;
    let mut q = stmt.query(params![filter.experiment, filter.from, filter.to])?;
    while let Some(r) = q.next()? {
        let hour: i64 = r.get(0)?;
        let experiment: String = r.get(1)?;
        let experiment = (!experiment.is_empty()).then_some(experiment);
        let row = rows.entry((hour, experiment.clone())).or_insert_with(|| Row {
            start: hour,
            experiment,
            ..Row::default()
        });
        row.uptime_seconds += get_f64(r, 2)?;
    }
    drop(q);

    // energy per hour: measured > caller-modelled > our model of the hour's compute
    let mut power: BTreeMap<i64, (Option<f64>, Option<f64>)> = BTreeMap::new();
    let mut stmt = conn.prepare_cached(
        "SELECT hour, source, SUM(joules) FROM power_hourly
         WHERE (?1 IS NULL OR hour >= ?1) AND (?2 IS NULL OR hour < ?2)
         GROUP BY hour, source",
    )?;
    let mut q = stmt.query(params![filter.from, filter.to])?;
    while let Some(r) = q.next()? {
        let hour: i64 = r.get(0)?;
        let source: String = r.get(1)?;
        let joules = get_f64(r, 2)?;
        let entry = power.entry(hour).or_default();
        if source == PowerSource::Measured.as_str() {
            entry.0 = Some(joules);
        } else {
            entry.1 = Some(joules);
        }
    }
    drop(q);
    let mut hour_compute: HashMap<i64, (f64, f64)> = HashMap::new();
    if !power.is_empty() {
        let mut stmt = conn.prepare_cached(
            "SELECT hour, SUM(cpu_seconds), SUM(gpu_seconds) FROM work_hourly
             WHERE (?1 IS NULL OR hour >= ?1) AND (?2 IS NULL OR hour < ?2) GROUP BY hour",
        )?;
        let mut q = stmt.query(params![filter.from, filter.to])?;
        while let Some(r) = q.next()? {
            hour_compute.insert(r.get(0)?, (get_f64(r, 1)?, get_f64(r, 2)?));
        }
    }

    for row in rows.values_mut() {
        let c = &row.counters;
        let own_model = model.joules(c.cpu_seconds, c.gpu_seconds);
        let Some(&(measured, reported)) = power.get(&row.start) else {
            row.energy_kwh = own_model / 3.6e6;
            continue;
        };
        let (cpu, gpu) = hour_compute.get(&row.start).copied().unwrap_or((0.0, 0.0));
        let hour_model = model.joules(cpu, gpu);
        let share = if hour_model > 0.0 {
            own_model / hour_model
        } else if cpu + gpu > 0.0 {
            c.compute_seconds() / (cpu + gpu)
        } else {
            0.0
        };
        let joules = measured.or(reported).unwrap_or(0.0) * share;
        row.energy_kwh = joules / 3.6e6;
        if measured.is_some() {
            row.measured_energy_kwh = row.energy_kwh;
        }
    }
    if filter.is_node_wide() {
        // what no experiment's compute explains (idle draw, other hours' leftovers) is node-wide
        for (&hour, &(measured, reported)) in &power {
            let total = measured.or(reported).unwrap_or(0.0) / 3.6e6;
            let attributed: f64 = rows
                .range((hour, Some(String::new()))..(hour + 1, None))
                .filter(|(_, r)| r.experiment.is_some())
                .map(|(_, r)| r.energy_kwh)
                .sum();
            let rest = total - attributed;
            if rest > total * 1e-12 {
                let row = rows.entry((hour, None)).or_insert_with(|| Row {
                    start: hour,
                    ..Row::default()
                });
                row.energy_kwh += rest;
                if measured.is_some() {
                    row.measured_energy_kwh += rest;
                }
            }
        }
    }
    let mut out: Vec<Row> = rows.into_values().collect();
    for row in &mut out {
        row.cost = model.price_per_kwh.map(|p| row.energy_kwh * p);
    }
    Ok(out)
}

/// `hourly` rows folded into `bucket`s (hourly rows come sorted by hour).
pub(crate) fn bucketed(hourly: Vec<Row>, bucket: Bucket, model: &EnergyModel) -> Vec<Row> {
    if bucket == Bucket::Hour {
        return hourly;
    }
    let mut buckets: BTreeMap<(i64, Option<String>), Row> = BTreeMap::new();
    for row in hourly {
        let start = bucket.start_of(row.start);
        let acc = buckets
            .entry((start, row.experiment.clone()))
            .or_insert_with(|| Row {
                start,
                experiment: row.experiment.clone(),
                ..Row::default()
            });
        acc.counters.add(&row.counters);
        acc.uptime_seconds += row.uptime_seconds;
        acc.energy_kwh += row.energy_kwh;
        acc.measured_energy_kwh += row.measured_energy_kwh;
    }
    let mut out: Vec<Row> = buckets.into_values().collect();
    for row in &mut out {
        row.cost = model.price_per_kwh.map(|p| row.energy_kwh * p);
    }
    out
}

/// Sums of [`hourly_rows`].
pub(crate) fn totals(conn: &Connection, filter: &Filter, model: &EnergyModel) -> rusqlite::Result<Totals> {
    let mut totals = Totals {
        currency: model.currency.clone(),
        ..Totals::default()
    };
    for row in hourly_rows(conn, filter, model)? {
        totals.counters.add(&row.counters);
        totals.uptime_seconds += row.uptime_seconds;
        totals.energy_kwh += row.energy_kwh;
        totals.measured_energy_kwh += row.measured_energy_kwh;
    }
    totals.cost = model.price_per_kwh.map(|p| totals.energy_kwh * p);
    Ok(totals)
}

/// Every experiment seen, by id.
pub(crate) fn experiments(conn: &Connection) -> rusqlite::Result<Vec<ExperimentSummary>> {
    let mut found: BTreeMap<String, ExperimentSummary> = BTreeMap::new();
    let mut stmt = conn.prepare_cached(
        "SELECT experiment, MIN(hour), MAX(hour), COUNT(DISTINCT uid),
            SUM(forward_samples) + SUM(backward_samples)
         FROM work_hourly GROUP BY experiment",
    )?;
    let mut q = stmt.query([])?;
    while let Some(r) = q.next()? {
        let experiment: String = r.get(0)?;
        found.insert(
            experiment.clone(),
            ExperimentSummary {
                experiment,
                first_hour: r.get(1)?,
                last_hour: r.get(2)?,
                experts: get_u64(r, 3)?,
                samples: get_u64(r, 4)?,
            },
        );
    }
    drop(q);
    let mut stmt = conn.prepare_cached(
        "SELECT experiment, MIN(hour), MAX(hour) FROM uptime_hourly
         WHERE experiment != '' GROUP BY experiment",
    )?;
    let mut q = stmt.query([])?;
    while let Some(r) = q.next()? {
        let experiment: String = r.get(0)?;
        let (first, last): (i64, i64) = (r.get(1)?, r.get(2)?);
        let entry = found
            .entry(experiment.clone())
            .or_insert_with(|| ExperimentSummary {
                experiment,
                first_hour: first,
                last_hour: last,
                ..ExperimentSummary::default()
            });
        entry.first_hour = entry.first_hour.min(first);
        entry.last_hour = entry.last_hour.max(last);
    }
    Ok(found.into_values().collect())
}
