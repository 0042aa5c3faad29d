//! The six measurements of issue 8, each against direct PostgreSQL in the
//! same run.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ephemera::admin::api::LeaseFilter;
use ephemera::dev::pki::APP;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::env::{random, Clients, Env, Error, DATABASE, GROUP, TEMPLATE};
use crate::perf::Perf;
use crate::stats::{ms, pss_kib, status_kib, CpuSnapshot, Summary};
use crate::{Options, Report, Row};

const ROLE_PREFIX: &str = "eph_";

pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

/// Connect with `config`, run `SELECT 1`, return the time from `start` to
/// the first row, then close the session.
pub async fn first_row(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    start: Instant,
) -> Result<Duration, String> {
    let (client, connection) = config
        .connect(tls.clone())
        .await
        .map_err(|e| describe(&e))?;
    let connection = tokio::spawn(connection);
    let messages = client
        .simple_query("SELECT 1")
        .await
        .map_err(|e| describe(&e))?;
    let elapsed = start.elapsed();
    if !messages
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
    {
        return Err("SELECT 1 returned no row".into());
    }
    drop(client);
    let _ = connection.await;
    Ok(elapsed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    Direct,
    Ephemera,
    /// Ephemera with its upstream leg over PostgreSQL's Unix socket.
    EphemeraUnix,
    Vault,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct (TLS + SCRAM, client PBKDF2)",
            Mode::Ephemera => "Ephemera (SVID; mint + drop)",
            Mode::EphemeraUnix => "Ephemera, Unix-socket upstream",
            Mode::Vault => "Vault-style (CREATE ROLE … PASSWORD, then direct)",
        }
    }
}

/// One new session in `mode`, timed from its very start to the first row.
/// `admin` is the Vault-style flow's long-lived admin connection.
async fn session(
    clients: &Clients,
    mode: Mode,
    admin: &tokio_postgres::Client,
) -> Result<Duration, String> {
    match mode {
        Mode::Direct => first_row(&clients.direct, &clients.direct_tls, Instant::now()).await,
        Mode::Ephemera => first_row(&clients.ephemera, &clients.svid_tls, Instant::now()).await,
        Mode::EphemeraUnix => {
            first_row(&clients.ephemera_unix, &clients.svid_tls, Instant::now()).await
        }
        Mode::Vault => {
            // What Vault's database secrets engine does for a PostgreSQL role:
            // a plaintext password (hashed by the server at 4 096 iterations),
            // VALID UNTIL the lease's end, the template's grants; then the
            // application logs in directly with that password.
            let name = format!("v_{}", random(16).to_lowercase());
            let password = random(24);
            let until = (OffsetDateTime::now_utc() + time::Duration::hours(1))
                .format(&Rfc3339)
                .expect("RFC 3339");
            let start = Instant::now();
            admin
                .batch_execute(&format!(
                    "CREATE ROLE {name} LOGIN PASSWORD '{password}' VALID UNTIL '{until}' IN ROLE {GROUP}"
                ))
                .await
                .map_err(|e| describe(&e))?;
            let mut config = clients.direct.clone();
            config.user(&name).password(password.as_str());
            let result = first_row(&config, &clients.direct_tls, start).await;
            // Revocation at lease end (not timed; Ephemera's drop is not on
            // the client's path either).
            admin
                .batch_execute(&format!("DROP ROLE {name}"))
                .await
                .map_err(|e| describe(&e))?;
            result
        }
    }
}

#[derive(Default)]
struct Samples {
    times: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
}

impl Samples {
    fn record(&mut self, result: Result<Duration, String>) {
        match result {
            Ok(d) => self.times.push(d),
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }
}

/// Scenario 1, connect-to-first-row: sequential (blocks of 50 per mode, rotating, so
/// background noise hits every mode alike), then 4 concurrent per mode.
pub async fn connect(env: &Env, options: &Options, report: &mut Report) -> Result<(), Error> {
    let clients = &env.clients;
    let admin = clients.connect(&clients.admin, &clients.direct_tls).await?;
    let modes = [
        Mode::Direct,
        Mode::Ephemera,
        Mode::EphemeraUnix,
        Mode::Vault,
    ];
    for mode in modes {
        for _ in 0..10 {
            session(clients, mode, &admin).await?;
        }
    }
    let n = options.sessions;
    let block = 50.min(n).max(1);
    let mut samples: BTreeMap<Mode, Samples> = BTreeMap::new();
    eprintln!("load: connect-to-first-row, {n} sequential sessions per mode");
    let before = CpuSnapshot::take(&env.pids());
    let mut done = 0;
    while done < n {
        let this = block.min(n - done);
        for mode in modes {
            let s = samples.entry(mode).or_default();
            for _ in 0..this {
                s.record(session(clients, mode, &admin).await);
            }
        }
        done += this;
    }
    report.cpu(
        "connect, sequential (all four modes)",
        CpuSnapshot::settled(&env.pids(), Instant::now()).since(&before),
    );
    let direct = Summary::of(&samples[&Mode::Direct].times);
    let ephemera = Summary::of(&samples[&Mode::Ephemera].times);
    let vault = Summary::of(&samples[&Mode::Vault].times);
    let unix = Summary::of(&samples[&Mode::EphemeraUnix].times);
    for (mode, s) in &samples {
        if s.errors > 0 {
            report.note(format!(
                "connect ({}): {} errors, first: {}",
                mode.label(),
                s.errors,
                s.first_error.as_deref().unwrap_or("")
            ));
        }
    }
    let met = ms(ephemera.p50) <= 1.5 * ms(direct.p50) && ephemera.p50 < vault.p50;
    // One row per percentile; the target is on the median.
    let p50 = [direct.p50, ephemera.p50, vault.p50, unix.p50];
    let p99 = [direct.p99, ephemera.p99, vault.p99, unix.p99];
    let rows = [
        ("p50", p50, "≤ 1.5× direct and < Vault-style", Some(met)),
        ("p99", p99, "(p50 is the target)", None),
    ];
    for (name, times, target, met) in rows {
        let [d, e, v, u] = times.map(ms);
        report.row(Row {
            scenario: format!("1. connect-to-first-row {name}, sequential (n={n})"),
            direct: format!("{d:.2} ms"),
            ephemera: format!("{e:.2} ms"),
            ratio: ratio(e, d),
            other: format!(
                "Vault-style {v:.2} ms ({}); Ephemera, Unix-socket upstream {u:.2} ms ({})",
                ratio(v, d),
                ratio(u, d)
            ),
            target: target.into(),
            met,
        });
    }

    // 4 concurrent clients, one mode at a time, with the CPU each party
    // spends per session.
    let concurrency = 4;
    let mut concurrent: BTreeMap<Mode, (Summary, f64)> = BTreeMap::new();
    for mode in [Mode::Direct, Mode::Ephemera, Mode::Vault] {
        let perf = (mode == Mode::Ephemera)
            .then(|| Perf::start(options, "connect-ephemera-4", env.pids().ephemera))
            .flatten();
        let metrics_before = latency_metrics(env).await;
        let before = CpuSnapshot::take(&env.pids());
        let start = Instant::now();
        let counter = Arc::new(AtomicUsize::new(0));
        let collected = Arc::new(Mutex::new(Samples::default()));
        let mut workers = Vec::new();
        for _ in 0..concurrency {
            let clients = clients.clone();
            let counter = counter.clone();
            let collected = collected.clone();
            workers.push(tokio::spawn(async move {
                let admin = clients.connect(&clients.admin, &clients.direct_tls).await?;
                while counter.fetch_add(1, Ordering::Relaxed) < n {
                    let result = session(&clients, mode, &admin).await;
                    collected.lock().unwrap().record(result);
                }
                Ok::<_, tokio_postgres::Error>(())
            }));
        }
        for w in workers {
            w.await??;
        }
        let wall = start.elapsed().as_secs_f64();
        let split = CpuSnapshot::settled(&env.pids(), Instant::now()).since(&before);
        if let Some(perf) = perf {
            let counts = perf.finish();
            report.note(syscall_note(
                "connect ×4 Ephemera",
                &counts,
                n as f64,
                "session",
            ));
        }
        if mode == Mode::Ephemera {
            let after = latency_metrics(env).await;
            report.note(latency_note("connect ×4 Ephemera", &metrics_before, &after));
        }
        let s = collected.lock().unwrap();
        if s.errors > 0 {
            report.note(format!(
                "connect ×{concurrency} ({}): {} errors, first: {}",
                mode.label(),
                s.errors,
                s.first_error.as_deref().unwrap_or("")
            ));
        }
        let per_session = |cores: f64| cores * split.wall * 1000.0 / n as f64;
        report.note(format!(
            "connect ×{concurrency} {}: {:.0} sessions/s; CPU per session: PostgreSQL {:.2} ms, Ephemera {:.2} ms, client {:.2} ms",
            mode.label(),
            n as f64 / wall,
            per_session(split.postgres),
            per_session(split.ephemera),
            per_session(split.client),
        ));
        report.cpu(&format!("connect ×{concurrency}, {}", mode.label()), split);
        concurrent.insert(mode, (Summary::of(&s.times), n as f64 / wall));
    }
    let (d, d_rate) = concurrent[&Mode::Direct];
    let (e, e_rate) = concurrent[&Mode::Ephemera];
    let (v, v_rate) = concurrent[&Mode::Vault];
    report.row(Row {
        scenario: format!("1. connect-to-first-row p50 / p99, 4 concurrent (n={n})"),
        direct: format!("{:.2} / {:.2} ms", ms(d.p50), ms(d.p99)),
        ephemera: format!("{:.2} / {:.2} ms", ms(e.p50), ms(e.p99)),
        ratio: format!(
            "{} / {}",
            ratio(ms(e.p50), ms(d.p50)),
            ratio(ms(e.p99), ms(d.p99))
        ),
        other: format!(
            "Vault-style {:.2} / {:.2} ms ({} / {})",
            ms(v.p50),
            ms(v.p99),
            ratio(ms(v.p50), ms(d.p50)),
            ratio(ms(v.p99), ms(d.p99))
        ),
        target: "(informative)".into(),
        met: None,
    });
    report.row(Row {
        scenario: "1. sessions/s, 4 concurrent".into(),
        direct: format!("{d_rate:.0}/s"),
        ephemera: format!("{e_rate:.0}/s"),
        ratio: ratio(e_rate, d_rate),
        other: format!("Vault-style {v_rate:.0}/s ({})", ratio(v_rate, d_rate)),
        target: "(informative)".into(),
        met: None,
    });
    let (_, left) = clients.drain(ROLE_PREFIX, Duration::from_secs(60)).await?;
    if left > 0 {
        report.note(format!(
            "connect: {left} eph_ roles left 60 s after the scenario"
        ));
    }
    Ok(())
}

/// `_sum` and `_count` of Ephemera's latency metrics (admin API), to tell
/// how long minting (pool wait included) and the front door took.
async fn latency_metrics(env: &Env) -> BTreeMap<String, f64> {
    let mut values = BTreeMap::new();
    let Ok(admin) = env.admin_client() else {
        return values;
    };
    let Ok(text) = admin.metrics().await else {
        return values;
    };
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if let (Some(name), Some(value)) = (parts.next(), parts.next()) {
            if (name.starts_with("ephemera_role_creation_seconds")
                || name.starts_with("ephemera_handshake_seconds"))
                && (name.ends_with("_sum") || name.ends_with("_count"))
            {
                if let Ok(v) = value.parse::<f64>() {
                    values.insert(name.to_owned(), v);
                }
            }
        }
    }
    values
}

/// Mean mint and handshake time between two [`latency_metrics`] readings.
fn latency_note(
    what: &str,
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> String {
    let mean = |metric: &str| {
        let d =
            |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
        let count = d(&format!("{metric}_count"));
        if count > 0.0 {
            format!("{:.2} ms", d(&format!("{metric}_sum")) / count * 1000.0)
        } else {
            "n/a".into()
        }
    };
    format!(
        "{what}: Ephemera's own metrics: mean role creation (admin pool wait included) {}, mean front-door handshake {}",
        mean("ephemera_role_creation_seconds"),
        mean("ephemera_handshake_seconds")
    )
}

/// "what: N syscalls per unit (name n, …)" from perf's syscall counts.
pub fn syscall_note(what: &str, counts: &[(String, u64)], units: f64, unit: &str) -> String {
    let units = units.max(1.0);
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    let mut sorted = counts.to_vec();
    sorted.sort_by_key(|c| std::cmp::Reverse(c.1));
    let parts: Vec<String> = sorted
        .iter()
        .map(|(name, n)| format!("{name} {:.2}", *n as f64 / units))
        .collect();
    format!(
        "{what}: {:.2} syscalls per {unit} ({})",
        total as f64 / units,
        parts.join(", ")
    )
}

pub fn ratio(value: f64, reference: f64) -> String {
    if reference > 0.0 {
        format!("{:.2}×", value / reference)
    } else {
        "n/a".into()
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct PgbenchResult {
    pub tps: f64,
    pub latency_ms: f64,
    pub processed: u64,
    pub failed: u64,
}

fn run_pgbench(
    env: &Env,
    conninfo: &str,
    password: Option<&str>,
    select_only: bool,
    secs: u64,
) -> Result<PgbenchResult, Error> {
    let extra: &[&str] = if select_only { &["-S"] } else { &[] };
    run_pgbench_with(env, conninfo, password, extra, secs)
}

/// `pgbench -n -c 8 -j 2 -T secs <extra> conninfo`.
pub fn run_pgbench_with(
    env: &Env,
    conninfo: &str,
    password: Option<&str>,
    extra: &[&str],
    secs: u64,
) -> Result<PgbenchResult, Error> {
    let mut command = Command::new(env.bin_dir.join("pgbench"));
    command.args(["-n", "-c", "8", "-j", "2", "-T", &secs.to_string()]);
    command.args(extra);
    command.arg(conninfo);
    if let Some(p) = password {
        command.env("PGPASSWORD", p);
    }
    let output = command.stdin(Stdio::null()).output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "pgbench failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let mut result = PgbenchResult::default();
    for line in stdout.lines() {
        let number = |s: &str| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        if let Some(rest) = line.strip_prefix("tps = ") {
            result.tps = number(rest);
        } else if let Some(rest) = line.strip_prefix("latency average = ") {
            result.latency_ms = number(rest);
        } else if let Some(rest) = line.strip_prefix("number of transactions actually processed: ")
        {
            result.processed = number(rest.split('/').next().unwrap_or("0")) as u64;
        } else if let Some(rest) = line.strip_prefix("number of failed transactions: ") {
            result.failed = number(rest) as u64;
        }
    }
    if result.tps <= 0.0 {
        return Err(format!("no tps in pgbench's output: {stdout}").into());
    }
    Ok(result)
}

/// Scenario 2, relay throughput: pgbench -S and TPC-B, direct / Ephemera /
/// PgBouncer, each run cut into `pgbench_rounds` slices taken in turn.
pub async fn pgbench(env: &Env, options: &Options, report: &mut Report) -> Result<(), Error> {
    let secs = options.pgbench_secs;
    let password = Some(env.direct_password.as_str());
    let direct = env.direct_conninfo("verify-full");
    let direct_plain = env.direct_conninfo("disable");
    let ephemera = env.ephemera_conninfo();
    let ephemera_unix = env.ephemera_unix_conninfo();
    let bouncer_tcp = env.pgbouncer_conninfo("disable");
    let bouncer_tls = env.pgbouncer_conninfo("verify-full");
    let has_bouncer = env.pgbouncer.is_some();

    eprintln!("load: pgbench warm-up");
    run_pgbench(env, &direct, password, true, secs.min(5))?;

    let mut runs: Vec<(&str, bool, &str, Option<&str>)> = vec![
        ("-S direct (TLS)", true, &direct, password),
        ("-S Ephemera", true, &ephemera, None),
        (
            "-S Ephemera, Unix-socket upstream",
            true,
            &ephemera_unix,
            None,
        ),
    ];
    if has_bouncer {
        runs.push(("-S PgBouncer (plain TCP)", true, &bouncer_tcp, password));
        runs.push(("-S PgBouncer (TLS)", true, &bouncer_tls, password));
    }
    // EPHEMERA_BENCH_SELECT_ONLY=1: only -S direct, Ephemera and PgBouncer
    // (TCP), for quicker experiments.
    let select_only = std::env::var("EPHEMERA_BENCH_SELECT_ONLY").is_ok_and(|v| v == "1");
    if select_only {
        runs.retain(|r| r.0 != "-S PgBouncer (TLS)");
    } else {
        runs.push(("-S direct (plain TCP)", true, &direct_plain, password));
        runs.push(("TPC-B direct (TLS)", false, &direct, password));
        runs.push(("TPC-B Ephemera", false, &ephemera, None));
        if has_bouncer {
            runs.push(("TPC-B PgBouncer (plain TCP)", false, &bouncer_tcp, password));
        }
    }
    // Slices of secs / rounds, the modes taking turns (rotated each round).
    let rounds = options.pgbench_rounds as usize;
    let slice = (secs / rounds as u64).max(1);
    let mut slices: BTreeMap<&str, Vec<PgbenchResult>> = BTreeMap::new();
    let mut cpu: BTreeMap<&str, crate::stats::CpuSplit> = BTreeMap::new();
    for round in 0..rounds {
        for i in 0..runs.len() {
            let (label, select_only, conninfo, password) = runs[(i + round) % runs.len()];
            if !select_only {
                // What pgbench does itself without -n, as the superuser.
                let client = env.clients.superuser(DATABASE).await?;
                client
                    .batch_execute("VACUUM pgbench_branches, pgbench_tellers")
                    .await?;
                client.batch_execute("TRUNCATE pgbench_history").await?;
                client.batch_execute("CHECKPOINT").await?;
            }
            eprintln!(
                "load: pgbench {label}, {slice} s (round {} of {rounds})",
                round + 1
            );
            let relay = match label {
                "-S Ephemera" => Some(("pgbench-S-ephemera", env.pids().ephemera)),
                "-S Ephemera, Unix-socket upstream" => {
                    Some(("pgbench-S-ephemera-unix", env.pids().ephemera_unix))
                }
                "-S PgBouncer (plain TCP)" => Some(("pgbench-S-pgbouncer", env.pids().pgbouncer)),
                _ => None,
            };
            let perf = relay
                .filter(|_| round == 0)
                .and_then(|(name, pid)| Perf::start(options, name, pid));
            let before = CpuSnapshot::take(&env.pids());
            let result = run_pgbench(env, conninfo, password, select_only, slice)?;
            let split = CpuSnapshot::settled(&env.pids(), Instant::now()).since(&before);
            if let Some(perf) = perf {
                let counts = perf.finish();
                report.note(syscall_note(
                    &format!("pgbench {label}, the relay"),
                    &counts,
                    result.processed as f64,
                    "transaction",
                ));
            }
            cpu.entry(label).or_default().add(&split);
            slices.entry(label).or_default().push(result);
        }
    }
    let mut results: BTreeMap<&str, PgbenchResult> = BTreeMap::new();
    for (label, _, _, _) in &runs {
        let parts = &slices[label];
        let n = parts.len() as f64;
        let result = PgbenchResult {
            tps: parts.iter().map(|r| r.tps).sum::<f64>() / n,
            latency_ms: parts.iter().map(|r| r.latency_ms).sum::<f64>() / n,
            processed: parts.iter().map(|r| r.processed).sum(),
            failed: parts.iter().map(|r| r.failed).sum(),
        };
        report.cpu(&format!("pgbench {label}"), cpu[label]);
        if result.failed > 0 {
            report.note(format!(
                "pgbench {label}: {} failed transactions",
                result.failed
            ));
        }
        report.note(format!(
            "pgbench {label}: {:.0} tps (slices: {:?}), latency {:.3} ms, {} transactions",
            result.tps,
            parts.iter().map(|r| r.tps.round()).collect::<Vec<_>>(),
            result.latency_ms,
            result.processed
        ));
        results.insert(label, result);
    }
    let tps = |label: &str| results.get(label).map_or(0.0, |r| r.tps);
    let (d, e) = (tps("-S direct (TLS)"), tps("-S Ephemera"));
    let (b_tcp, b_tls) = (tps("-S PgBouncer (plain TCP)"), tps("-S PgBouncer (TLS)"));
    report.row(Row {
        scenario: format!("2. pgbench -S -c 8 -j 2, {secs} s in {rounds} slices (tps)"),
        direct: format!("{d:.0}"),
        ephemera: format!("{e:.0}"),
        ratio: ratio(e, d),
        other: match (has_bouncer, select_only) {
            (true, false) => format!(
                "PgBouncer session: TCP {b_tcp:.0} ({}), TLS {b_tls:.0} ({}); direct TCP {:.0} ({})",
                ratio(b_tcp, d),
                ratio(b_tls, d),
                tps("-S direct (plain TCP)"),
                ratio(tps("-S direct (plain TCP)"), d)
            ),
            (true, true) => format!("PgBouncer session: TCP {b_tcp:.0} ({})", ratio(b_tcp, d)),
            (false, _) => "PgBouncer not available".into(),
        },
        target: "≥ 0.95× direct and ≥ PgBouncer (TCP)".into(),
        met: Some(e >= 0.95 * d && (!has_bouncer || e >= b_tcp)),
    });
    let u = tps("-S Ephemera, Unix-socket upstream");
    report.row(Row {
        scenario: "2. pgbench -S, Ephemera with a Unix-socket upstream (same host)".into(),
        direct: format!("{d:.0}"),
        ephemera: format!("{u:.0}"),
        ratio: ratio(u, d),
        other: if has_bouncer {
            format!("vs PgBouncer session (TCP): {}", ratio(u, b_tcp))
        } else {
            "PgBouncer not available".into()
        },
        target: "≥ 0.95× direct and ≥ PgBouncer (TCP)".into(),
        met: Some(u >= 0.95 * d && (!has_bouncer || u >= b_tcp)),
    });
    if select_only {
        return Ok(());
    }
    let (d, e, b) = (
        tps("TPC-B direct (TLS)"),
        tps("TPC-B Ephemera"),
        tps("TPC-B PgBouncer (plain TCP)"),
    );
    report.row(Row {
        scenario: format!("2. pgbench TPC-B -c 8 -j 2, {secs} s in {rounds} slices (tps)"),
        direct: format!("{d:.0}"),
        ephemera: format!("{e:.0}"),
        ratio: ratio(e, d),
        other: if has_bouncer {
            format!("PgBouncer session (TCP) {b:.0} ({})", ratio(b, d))
        } else {
            "PgBouncer not available".into()
        },
        target: "(informative)".into(),
        met: None,
    });
    let (_, left) = env
        .clients
        .drain(ROLE_PREFIX, Duration::from_secs(60))
        .await?;
    if left > 0 {
        report.note(format!(
            "pgbench: {left} eph_ roles left 60 s after the scenario"
        ));
    }
    Ok(())
}

/// Rows and exact byte count of the COPY: lines `i \t x…x \n`.
fn copy_shape(target_bytes: u64, width: u64) -> (u64, u64) {
    let mut rows = 0u64;
    let mut bytes = 0u64;
    while bytes < target_bytes {
        rows += 1;
        bytes += rows.to_string().len() as u64 + 1 + width + 1;
    }
    (rows, bytes)
}

fn run_copy(
    env: &Env,
    conninfo: &str,
    password: Option<&str>,
    sql: &str,
) -> Result<Duration, Error> {
    let mut command = Command::new(env.bin_dir.join("psql"));
    command
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conninfo,
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(p) = password {
        command.env("PGPASSWORD", p);
    }
    let start = Instant::now();
    let output = command.output()?;
    let elapsed = start.elapsed();
    if !output.status.success() {
        return Err(format!(
            "psql COPY failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(elapsed)
}

/// Scenario 3, bulk: COPY … TO STDOUT of ≥ 1 GiB to psql (output to /dev/null).
pub async fn copy(env: &Env, options: &Options, report: &mut Report) -> Result<(), Error> {
    let width = 1000;
    let (rows, bytes) = copy_shape(options.copy_bytes, width);
    let sql = format!(
        "COPY (SELECT i, w FROM generate_series(1, {rows}) AS i, (SELECT repeat('x', {width}) AS w) AS c) TO STDOUT"
    );
    let direct = env.direct_conninfo("verify-full");
    let ephemera = env.ephemera_conninfo();
    let ephemera_unix = env.ephemera_unix_conninfo();
    let password = Some(env.direct_password.as_str());
    let mut best = [f64::MAX; 3];
    let mut all = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..options.copy_rounds {
        for (i, (conninfo, password)) in [
            (&direct, password),
            (&ephemera, None),
            (&ephemera_unix, None),
        ]
        .into_iter()
        .enumerate()
        {
            let label = ["direct", "Ephemera", "Ephemera, Unix-socket upstream"][i];
            eprintln!(
                "load: COPY {:.2} GiB {label}, round {}",
                bytes as f64 / (1u64 << 30) as f64,
                round + 1
            );
            let perf = (i == 1 && round == 0)
                .then(|| Perf::start(options, "copy-ephemera", env.pids().ephemera))
                .flatten();
            let before = CpuSnapshot::take(&env.pids());
            let elapsed = run_copy(env, conninfo, password, &sql)?.as_secs_f64();
            let split = CpuSnapshot::settled(&env.pids(), Instant::now()).since(&before);
            if let Some(perf) = perf {
                let counts = perf.finish();
                report.note(syscall_note(
                    "COPY Ephemera",
                    &counts,
                    bytes as f64 / 1e6,
                    "MB",
                ));
            }
            if round == 0 {
                report.cpu(&format!("COPY {label}"), split);
            }
            best[i] = best[i].min(elapsed);
            all[i].push(bytes as f64 / elapsed / 1e6);
        }
    }
    let mbps = |s: f64| bytes as f64 / s / 1e6;
    let (d, e, u) = (mbps(best[0]), mbps(best[1]), mbps(best[2]));
    let rounded = |v: &Vec<f64>| v.iter().map(|v| v.round()).collect::<Vec<_>>();
    report.note(format!(
        "COPY {bytes} bytes ({rows} rows of {width}+ chars), MB/s per round: direct {:?}, Ephemera {:?}, Ephemera with a Unix-socket upstream {:?}",
        rounded(&all[0]),
        rounded(&all[1]),
        rounded(&all[2]),
    ));
    report.row(Row {
        scenario: format!(
            "3. COPY TO STDOUT {:.2} GiB (MB/s, best of {})",
            bytes as f64 / (1u64 << 30) as f64,
            options.copy_rounds
        ),
        direct: format!("{d:.0}"),
        ephemera: format!("{e:.0}"),
        ratio: ratio(e, d),
        other: String::new(),
        target: "≥ 0.95× direct".into(),
        met: Some(e >= 0.95 * d),
    });
    report.row(Row {
        scenario: "3. COPY, Ephemera with a Unix-socket upstream (same host)".into(),
        direct: format!("{d:.0}"),
        ephemera: format!("{u:.0}"),
        ratio: ratio(u, d),
        other: String::new(),
        target: "≥ 0.95× direct".into(),
        met: Some(u >= 0.95 * d),
    });
    let _ = env
        .clients
        .drain(ROLE_PREFIX, Duration::from_secs(30))
        .await?;
    Ok(())
}

pub struct StormResult {
    pub ok: usize,
    pub errors: usize,
    pub error_kinds: BTreeMap<String, usize>,
    pub wall: f64,
}

pub async fn run_storm(
    clients: &Clients,
    mode: Mode,
    concurrency: usize,
    duration: Duration,
) -> Result<StormResult, Error> {
    let (config, tls) = match mode {
        Mode::Ephemera => (&clients.ephemera, &clients.svid_tls),
        Mode::EphemeraUnix => (&clients.ephemera_unix, &clients.svid_tls),
        _ => (&clients.direct, &clients.direct_tls),
    };
    storm_with(config, tls, concurrency, duration).await
}

/// `concurrency` loops of connect / `SELECT 1` / disconnect with `config`
/// for `duration`.
pub async fn storm_with(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    concurrency: usize,
    duration: Duration,
) -> Result<StormResult, Error> {
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (config, tls) = (config.clone(), tls.clone());
        workers.push(tokio::spawn(async move {
            let (mut ok, mut errors) = (0usize, 0usize);
            let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
            while Instant::now() < deadline {
                match first_row(&config, &tls, Instant::now()).await {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        errors += 1;
                        *kinds.entry(e).or_default() += 1;
                    }
                }
            }
            (ok, errors, kinds)
        }));
    }
    let mut result = StormResult {
        ok: 0,
        errors: 0,
        error_kinds: BTreeMap::new(),
        wall: 0.0,
    };
    for w in workers {
        let (ok, errors, kinds) = w.await?;
        result.ok += ok;
        result.errors += errors;
        for (k, v) in kinds {
            *result.error_kinds.entry(k).or_default() += v;
        }
    }
    result.wall = start.elapsed().as_secs_f64();
    Ok(result)
}

/// Scenario 4, connect storm: `storm_concurrency` loops of connect / SELECT 1 /
/// disconnect for `storm_secs`, direct then through Ephemera; then the
/// eph_ roles left after a drain.
pub async fn storm(env: &Env, options: &Options, report: &mut Report) -> Result<(), Error> {
    let c = options.storm_concurrency;
    let duration = Duration::from_secs(options.storm_secs);
    let clients = &env.clients;
    let mut rates = Vec::new();
    for mode in [Mode::Direct, Mode::Ephemera, Mode::EphemeraUnix] {
        eprintln!(
            "load: connect storm, {} ×{c}, {} s",
            mode.label(),
            duration.as_secs()
        );
        let perf = (mode == Mode::Ephemera)
            .then(|| Perf::start(options, "storm-ephemera", env.pids().ephemera))
            .flatten();
        let metrics_before = latency_metrics(env).await;
        let before = CpuSnapshot::take(&env.pids());
        let result = run_storm(clients, mode, c, duration).await?;
        let split = CpuSnapshot::settled(&env.pids(), Instant::now()).since(&before);
        if let Some(perf) = perf {
            let counts = perf.finish();
            report.note(syscall_note(
                "storm Ephemera",
                &counts,
                result.ok as f64,
                "session",
            ));
        }
        if mode == Mode::Ephemera {
            let after = latency_metrics(env).await;
            report.note(latency_note("storm Ephemera", &metrics_before, &after));
        }
        report.cpu(&format!("storm ×{c}, {}", mode.label()), split);
        for (kind, count) in &result.error_kinds {
            report.note(format!("storm {}: {count} × {kind}", mode.label()));
        }
        rates.push((result.ok as f64 / result.wall, result.errors));
    }
    eprintln!("load: storm drain");
    let (drain, left) = clients.drain(ROLE_PREFIX, Duration::from_secs(30)).await?;
    let ((d, _), (e, e_errors), (u, u_errors)) = (rates[0], rates[1], rates[2]);
    report.row(Row {
        scenario: format!(
            "4. connect storm ×{c}, {} s (sessions/s)",
            duration.as_secs()
        ),
        direct: format!("{d:.0}/s"),
        ephemera: format!("{e:.0}/s, {e_errors} errors"),
        ratio: ratio(e, d),
        other: format!(
            "eph_ roles left: {left} (drained in {:.1} s)",
            drain.as_secs_f64()
        ),
        target: "≥ 300/s, 0 leaked roles".into(),
        met: Some(e >= 300.0 && left == 0),
    });
    report.row(Row {
        scenario: "4. connect storm, Ephemera with a Unix-socket upstream (same host)".into(),
        direct: format!("{d:.0}/s"),
        ephemera: format!("{u:.0}/s, {u_errors} errors"),
        ratio: ratio(u, d),
        other: "(roles left: as above, one drain for both)".into(),
        target: "≥ 300/s, 0 leaked roles".into(),
        met: Some(u >= 300.0 && left == 0),
    });
    Ok(())
}

/// Scenario 5a, revocation: sessions sleeping in `pg_sleep(60)`, each revoked by
/// lease id through the admin API; time until the client's query fails.
pub async fn revoke(env: &Env, options: &Options, report: &mut Report) -> Result<(), Error> {
    let n = options.revoke_sessions;
    let clients = &env.clients;
    let admin = env.admin_client()?;
    eprintln!("load: revocation, {n} sleeping sessions");
    let mut sleeping = Vec::new();
    for _ in 0..n {
        let client = clients
            .connect(&clients.ephemera, &clients.svid_tls)
            .await?;
        let row = client.query_one("SELECT current_user::text", &[]).await?;
        let role: String = row.get(0);
        let task = tokio::spawn(async move {
            let result = client.simple_query("SELECT pg_sleep(60)").await;
            (Instant::now(), result.err())
        });
        sleeping.push((role, task));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leases = admin.list_leases(&LeaseFilter::default()).await?;
    let by_role: BTreeMap<String, uuid::Uuid> =
        leases.into_iter().map(|l| (l.role.clone(), l.id)).collect();
    let mut to_fatal = Vec::new();
    let mut api = Vec::new();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for (role, task) in sleeping {
        let Some(id) = by_role.get(&role).copied() else {
            *outcomes.entry("lease not listed".into()).or_default() += 1;
            task.abort();
            continue;
        };
        let start = Instant::now();
        admin.revoke_lease(id).await?;
        api.push(start.elapsed());
        match tokio::time::timeout(Duration::from_secs(70), task).await {
            Ok(Ok((at, error))) => {
                to_fatal.push(at.saturating_duration_since(start));
                let kind = match error {
                    Some(e) => match e.as_db_error() {
                        Some(db) => format!("{} {}", db.severity(), db.code().code()),
                        None => format!("connection error: {e}"),
                    },
                    None => "query finished (no error!)".into(),
                };
                *outcomes.entry(kind).or_default() += 1;
            }
            _ => *outcomes.entry("no error within 70 s".into()).or_default() += 1,
        }
    }
    let s = Summary::of(&to_fatal);
    let a = Summary::of(&api);
    report.note(format!(
        "revocation: what the clients saw: {outcomes:?}; admin API call p50 {:.1} ms, p99 {:.1} ms",
        ms(a.p50),
        ms(a.p99)
    ));
    report.row(Row {
        scenario: format!("5. revoke → client error p50 / p99 (n={n})"),
        direct: "n/a".into(),
        ephemera: format!("{:.1} / {:.1} ms", ms(s.p50), ms(s.p99)),
        ratio: String::new(),
        other: format!("max {:.1} ms", ms(s.max)),
        target: "p99 ≤ 100 ms".into(),
        met: Some(ms(s.p99) <= 100.0 && s.count == n),
    });
    let _ = clients.drain(ROLE_PREFIX, Duration::from_secs(30)).await?;
    Ok(())
}

/// Scenario 5b, the reaper: `reap_roles` roles with expired lease comments, planted
/// directly in one transaction; time until none is left.
pub async fn reaper(env: &Env, options: &Options, report: &mut Report) -> Result<(), Error> {
    let n = options.reap_roles;
    let prefix = format!("{ROLE_PREFIX}{TEMPLATE}_reap");
    let clients = &env.clients;
    eprintln!("load: reaper, planting {n} expired roles");
    let mut sql = String::with_capacity(n * 512);
    for i in 0..n {
        let role = format!("{prefix}{i:06}");
        let comment = serde_json::json!({
            "ephemera_lease": 1,
            "lease_id": uuid::Uuid::new_v4(),
            "kind": "session",
            "identity": APP.spiffe_id,
            "template": TEMPLATE,
            "database": DATABASE,
            "issued_at": "2020-01-01T00:00:00Z",
            "expires_at": "2020-01-01T00:15:00Z",
            "max_expires_at": "2020-01-01T01:00:00Z"
        });
        sql.push_str(&format!(
            "CREATE ROLE {role} LOGIN IN ROLE {GROUP}; COMMENT ON ROLE {role} IS '{comment}';\n"
        ));
    }
    let superuser = clients.superuser("postgres").await?;
    let plant = Instant::now();
    superuser.batch_execute(&sql).await?;
    let committed = Instant::now();
    let before = CpuSnapshot::take(&env.pids());
    let mut first_drop: Option<Instant> = None;
    let deadline = committed + Duration::from_secs(120);
    let mut left;
    loop {
        left = superuser
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_roles WHERE starts_with(rolname, $1)",
                &[&prefix],
            )
            .await?
            .get::<_, i64>(0);
        if first_drop.is_none() && (left as usize) < n {
            first_drop = Some(Instant::now());
        }
        if left == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done = Instant::now();
    let total = done - committed;
    report.cpu(
        &format!("reaper, {n} expired roles"),
        CpuSnapshot::settled(&env.pids(), done).since(&before),
    );
    let dropping = first_drop.map(|f| done - f).unwrap_or_default();
    report.note(format!(
        "reaper: planting {n} roles took {:.1} s; first drop seen {:.2} s after the commit (reap_interval 1 s); dropping took {:.1} s ({:.0} roles/s)",
        (committed - plant).as_secs_f64(),
        (total - dropping).as_secs_f64(),
        dropping.as_secs_f64(),
        n as f64 / dropping.as_secs_f64().max(1e-9)
    ));
    report.row(Row {
        scenario: format!("5. reaper: {n} expired roles dropped (s)"),
        direct: "n/a".into(),
        ephemera: format!("{:.1} s", total.as_secs_f64()),
        ratio: String::new(),
        other: format!(
            "{left} left; {:.0} roles/s once started",
            n as f64 / dropping.as_secs_f64().max(1e-9)
        ),
        target: "≤ 10 s (for 10 000)".into(),
        met: Some(left == 0 && total <= Duration::from_secs(10) && n >= 10_000),
    });
    Ok(())
}

fn sum_pss(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| pss_kib(p)).sum()
}

/// Scenario 6, memory: Ephemera's RSS idle, then with `idle_sessions` idle relayed
/// sessions open.
pub async fn memory(env: &Env, options: &Options, report: &mut Report) -> Result<(), Error> {
    let n = options.idle_sessions;
    let clients = &env.clients;
    let pid = env
        .ephemera
        .as_ref()
        .map(|p| p.pid())
        .ok_or("ephemera is not running")?;
    let postmaster = env.postmaster_pid().ok_or("no postmaster pid")?;
    // Warm up: pools, lazy statics, the allocator's first arenas.
    for _ in 0..16 {
        first_row(&clients.ephemera, &clients.svid_tls, Instant::now()).await?;
    }
    clients.drain(ROLE_PREFIX, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = status_kib(pid, "VmRSS").unwrap_or(0);
    let pg_before = sum_pss(&crate::stats::children_of(postmaster));
    eprintln!("load: memory, opening {n} idle sessions through Ephemera");
    let counter = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let clients = clients.clone();
        let counter = counter.clone();
        workers.push(tokio::spawn(async move {
            let mut held = Vec::new();
            while counter.fetch_add(1, Ordering::Relaxed) < n {
                let client = clients
                    .connect(&clients.ephemera, &clients.svid_tls)
                    .await?;
                client.simple_query("SELECT 1").await?;
                held.push(client);
            }
            Ok::<_, tokio_postgres::Error>(held)
        }));
    }
    let mut held = Vec::new();
    for w in workers {
        held.extend(w.await??);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = status_kib(pid, "VmRSS").unwrap_or(0);
    let hwm = status_kib(pid, "VmHWM").unwrap_or(0);
    let backends = crate::stats::children_of(postmaster);
    let pg_after = sum_pss(&backends);
    let per_session = (loaded.saturating_sub(idle)) as f64 / n as f64;
    let pg_per_backend = (pg_after.saturating_sub(pg_before)) as f64 / n as f64;
    report.note(format!(
        "memory: Ephemera VmRSS idle {idle} KiB, with {} sessions {loaded} KiB (VmHWM {hwm} KiB); PostgreSQL backends' PSS grew by {:.0} KiB per session",
        held.len(),
        pg_per_backend
    ));
    report.row(Row {
        scenario: format!("6. Ephemera RSS per idle relayed session (n={n})"),
        direct: format!("(PostgreSQL: {pg_per_backend:.0} KiB PSS per backend)"),
        ephemera: format!("{per_session:.1} KiB"),
        ratio: String::new(),
        other: format!("idle {idle} KiB → {loaded} KiB"),
        target: "≤ 64 KiB".into(),
        met: Some(per_session <= 64.0),
    });
    drop(held);
    let (_, left) = clients.drain(ROLE_PREFIX, Duration::from_secs(60)).await?;
    if left > 0 {
        report.note(format!("memory: {left} eph_ roles left 60 s after closing"));
    }
    Ok(())
}
