//! Scenario "relay" (issue 14): what the relay costs per transaction, next
//! to the floor (`floor.rs`, a plain relay built by this harness) and
//! PgBouncer, in one run.
//!
//! - pgbench -S -c 8: tps and CPU µs per transaction of each process
//!   (the relay, PostgreSQL, pgbench), and the relay's context switches per
//!   transaction. CPU per transaction survives a noisy machine better than
//!   tps does.
//! - pgbench -S -c 1: the round trip's p50 and p99 (from pgbench's
//!   per-transaction log), and context switches per round trip.
//! - the same c=1 round trip while a connect storm runs through Ephemera:
//!   do handshakes on a session thread stall the relays that share it?

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::env::{Env, Error};
use crate::perf::Perf;
use crate::scenarios::{ratio, run_storm, syscall_note, Mode};
use crate::stats::{client_cpu, context_switches, process_cpu, tree_cpu};
use crate::{Options, Report, Row};

/// Which process relays in a mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relay {
    None,
    Ephemera,
    EphemeraUnix,
    PgBouncer,
    Floor,
}

struct Target {
    label: &'static str,
    conninfo: String,
    password: Option<String>,
    relay: Relay,
}

fn relay_pid(env: &Env, relay: Relay) -> Option<u32> {
    let pids = env.pids();
    match relay {
        Relay::None => None,
        Relay::Ephemera => pids.ephemera,
        Relay::EphemeraUnix => pids.ephemera_unix,
        Relay::PgBouncer => pids.pgbouncer,
        Relay::Floor => pids.floor,
    }
}

/// What one or more pgbench runs of one mode added up to.
#[derive(Debug, Default, Clone)]
struct Cost {
    transactions: u64,
    wall: f64,
    relay_cpu: f64,
    postgres_cpu: f64,
    pgbench_cpu: f64,
    relay_switches: u64,
    tps: Vec<f64>,
    /// Per-transaction latencies in µs (c=1 runs).
    latencies: Vec<u64>,
}

impl Cost {
    fn per_txn_us(&self, cpu: f64) -> f64 {
        if self.transactions == 0 {
            return f64::NAN;
        }
        cpu * 1e6 / self.transactions as f64
    }
    fn relay_us(&self) -> f64 {
        self.per_txn_us(self.relay_cpu)
    }
    fn switches_per_txn(&self) -> f64 {
        self.relay_switches as f64 / self.transactions.max(1) as f64
    }
    fn tps(&self) -> f64 {
        self.tps.iter().sum::<f64>() / self.tps.len().max(1) as f64
    }
    fn percentile(&self, p: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        if sorted.is_empty() {
            return f64::NAN;
        }
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1] as f64
    }
}

/// Run pgbench -S once and add what it cost to `cost`. With `log_dir`, the
/// per-transaction latencies are read back from pgbench's log.
fn measure(
    env: &Env,
    target: &Target,
    clients: u32,
    secs: u64,
    log_dir: Option<&Path>,
    cost: &mut Cost,
) -> Result<(), Error> {
    let threads = clients.min(2);
    let mut command = Command::new(env.bin_dir.join("pgbench"));
    command.args(["-n", "-S", "-T", &secs.to_string()]);
    command.args(["-c", &clients.to_string(), "-j", &threads.to_string()]);
    if let Some(dir) = log_dir {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        command
            .arg("-l")
            .arg(format!("--log-prefix={}", dir.join("txn").display()));
    }
    command.arg(&target.conninfo);
    if let Some(p) = &target.password {
        command.env("PGPASSWORD", p);
    }
    let relay = relay_pid(env, target.relay);
    let postmaster = env.pids().postmaster;
    let (relay0, pg0, client0, switches0) = (
        process_cpu(relay),
        tree_cpu(postmaster),
        client_cpu(),
        context_switches(relay),
    );
    let started = Instant::now();
    let output = command.stdin(Stdio::null()).output()?;
    let wall = started.elapsed().as_secs_f64();
    // Backends that exit after the run are counted by the postmaster's
    // reaped-children time; give them a moment.
    std::thread::sleep(Duration::from_millis(300));
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "pgbench ({}) failed: {stdout}{}",
            target.label,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let number = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split(['/', ' ']).next()?.trim().parse::<f64>().ok())
    };
    let transactions = number("number of transactions actually processed: ").unwrap_or(0.0);
    let tps = number("tps = ").unwrap_or(0.0);
    if transactions <= 0.0 {
        return Err(format!("pgbench ({}) processed nothing: {stdout}", target.label).into());
    }
    cost.transactions += transactions as u64;
    cost.wall += wall;
    cost.relay_cpu += process_cpu(relay) - relay0;
    cost.postgres_cpu += tree_cpu(postmaster) - pg0;
    cost.pgbench_cpu += client_cpu() - client0;
    cost.relay_switches += context_switches(relay).saturating_sub(switches0);
    cost.tps.push(tps);
    if let Some(dir) = log_dir {
        for file in std::fs::read_dir(dir)?.flatten() {
            let text = std::fs::read_to_string(file.path()).unwrap_or_default();
            // client_id transaction_no time script_no time_epoch time_us
            cost.latencies.extend(
                text.lines()
                    .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok()),
            );
        }
    }
    Ok(())
}

fn targets(env: &Env) -> Vec<Target> {
    let password = Some(env.direct_password.clone());
    let mut targets = vec![
        Target {
            label: "direct (TLS)",
            conninfo: env.direct_conninfo("verify-full"),
            password: password.clone(),
            relay: Relay::None,
        },
        Target {
            label: "Ephemera, TLS upstream",
            conninfo: env.ephemera_conninfo(),
            password: None,
            relay: Relay::Ephemera,
        },
        Target {
            label: "Ephemera, TLS upstream, statement audit",
            conninfo: env.ephemera_audited_conninfo(),
            password: None,
            relay: Relay::Ephemera,
        },
        Target {
            label: "Ephemera, TLS upstream, pooled",
            conninfo: env.ephemera_pooled_conninfo(),
            password: None,
            relay: Relay::Ephemera,
        },
        Target {
            label: "Ephemera, Unix upstream",
            conninfo: env.ephemera_unix_conninfo(),
            password: None,
            relay: Relay::EphemeraUnix,
        },
        Target {
            label: "floor (plain relay, Unix upstream)",
            conninfo: env.floor_conninfo(),
            password: password.clone(),
            relay: Relay::Floor,
        },
    ];
    if env.pgbouncer.is_some() {
        targets.push(Target {
            label: "PgBouncer, TLS both legs",
            conninfo: env.pgbouncer_conninfo("verify-full"),
            password,
            relay: Relay::PgBouncer,
        });
    }
    targets
}

pub async fn relay(env: &Env, options: &Options, report: &mut Report) -> Result<(), Error> {
    let targets = targets(env);
    let rounds = options.pgbench_rounds as usize;
    let slice = (options.pgbench_secs / rounds as u64).max(1);
    let mut c8: BTreeMap<&str, Cost> = BTreeMap::new();
    let mut c1: BTreeMap<&str, Cost> = BTreeMap::new();
    let log_dir = options.out_dir.join("pgbench-log");
    eprintln!("load: relay warm-up");
    measure(
        env,
        &targets[0],
        8,
        slice.min(5),
        None,
        &mut Cost::default(),
    )?;
    for round in 0..rounds {
        for i in 0..targets.len() {
            let target = &targets[(i + round) % targets.len()];
            eprintln!(
                "load: relay, pgbench -S -c 8 {}, {slice} s (round {} of {rounds})",
                target.label,
                round + 1
            );
            // --profile: a system-wide perf profile of each relay's first slice.
            let perf = (round == 0 && target.relay != Relay::None)
                .then(|| {
                    let name = format!("relay-{}", target.label.replace([' ', ',', '(', ')'], "-"));
                    Perf::start(options, &name, relay_pid(env, target.relay))
                })
                .flatten();
            let cost = c8.entry(target.label).or_default();
            let before = cost.transactions;
            measure(env, target, 8, slice, None, cost)?;
            if let Some(perf) = perf {
                let counts = perf.finish();
                report.note(syscall_note(
                    &format!("relay -c 8 {}", target.label),
                    &counts,
                    (cost.transactions - before) as f64,
                    "transaction",
                ));
            }
            eprintln!("load: relay, pgbench -S -c 1 {}, {slice} s", target.label);
            let c1_cost = c1.entry(target.label).or_default();
            measure(env, target, 1, slice, Some(&log_dir), c1_cost)?;
        }
    }

    // The c=1 round trip while connections pour in through Ephemera.
    let storm_secs = slice.max(3);
    let mut under_storm: BTreeMap<&str, Cost> = BTreeMap::new();
    for target in targets
        .iter()
        .filter(|t| matches!(t.relay, Relay::None | Relay::Ephemera | Relay::EphemeraUnix))
    {
        eprintln!(
            "load: relay, c=1 {} under a connect storm through Ephemera",
            target.label
        );
        let clients = env.clients.clone();
        let storm = tokio::spawn(async move {
            run_storm(
                &clients,
                Mode::Ephemera,
                STORM_LOOPS,
                Duration::from_secs(storm_secs + 2),
            )
            .await
        });
        // Let the storm get going before timing the round trips.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cost = under_storm.entry(target.label).or_default();
        let measured = tokio::task::block_in_place(|| {
            measure(env, target, 1, storm_secs, Some(&log_dir), cost)
        });
        let stormed = storm.await??;
        measured?;
        report.note(format!(
            "relay under storm, {}: {} storm sessions ({:.0}/s), {} errors",
            target.label,
            stormed.ok,
            stormed.ok as f64 / stormed.wall,
            stormed.errors
        ));
    }

    record(report, &targets, &c8, &c1, &under_storm, options);
    Ok(())
}

/// Connect loops of the storm the relay latency is measured under.
const STORM_LOOPS: usize = 8;

fn record(
    report: &mut Report,
    targets: &[Target],
    c8: &BTreeMap<&str, Cost>,
    c1: &BTreeMap<&str, Cost>,
    under_storm: &BTreeMap<&str, Cost>,
    options: &Options,
) {
    let mut table = String::from(
        "| mode | -c 8 tps | vs direct | relay CPU µs/txn | PostgreSQL µs/txn | pgbench µs/txn | relay context switches/txn | c=1 p50 / p99 µs | c=1 relay switches/txn |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let direct_tps = c8.get("direct (TLS)").map_or(f64::NAN, Cost::tps);
    for target in targets {
        let (Some(many), Some(one)) = (c8.get(target.label), c1.get(target.label)) else {
            continue;
        };
        let relay = if target.relay == Relay::None {
            "–".to_owned()
        } else {
            format!("{:.1}", many.relay_us())
        };
        table.push_str(&format!(
            "| {} | {:.0} | {} | {relay} | {:.1} | {:.1} | {:.2} | {:.0} / {:.0} | {:.2} |\n",
            target.label,
            many.tps(),
            ratio(many.tps(), direct_tps),
            many.per_txn_us(many.postgres_cpu),
            many.per_txn_us(many.pgbench_cpu),
            many.switches_per_txn(),
            one.percentile(50.0),
            one.percentile(99.0),
            one.switches_per_txn(),
        ));
    }
    let mut storm_table = String::from(
        "| c=1 round trip during an Ephemera connect storm | p50 µs | p99 µs |\n| --- | --- | --- |\n",
    );
    for (label, cost) in under_storm {
        storm_table.push_str(&format!(
            "| {label} | {:.0} | {:.0} |\n",
            cost.percentile(50.0),
            cost.percentile(99.0)
        ));
    }
    eprintln!("load: relay costs\n{table}\n{storm_table}");
    let path = options.out_dir.join("relay-profile.md");
    if std::fs::write(&path, format!("{table}\n{storm_table}")).is_ok() {
        report.note(format!("relay: per-process table in {}", path.display()));
    }
    report.tables.push(table);
    report.tables.push(storm_table);

    let relay_us = |label: &str| c8.get(label).map_or(f64::NAN, Cost::relay_us);
    let tps = |label: &str| c8.get(label).map_or(f64::NAN, Cost::tps);
    let p50 = |label: &str| c1.get(label).map_or(f64::NAN, |c| c.percentile(50.0));
    let (unix, tls, floor, bouncer) = (
        relay_us("Ephemera, Unix upstream"),
        relay_us("Ephemera, TLS upstream"),
        relay_us("floor (plain relay, Unix upstream)"),
        relay_us("PgBouncer, TLS both legs"),
    );
    report.row(Row {
        scenario: "R1. relay CPU per txn, Unix upstream, vs the floor (pgbench -S -c 8)".into(),
        direct: format!("floor {floor:.1} µs"),
        ephemera: format!("{unix:.1} µs"),
        ratio: ratio(unix, floor),
        other: format!("vs PgBouncer TLS both legs: {}", ratio(unix, bouncer)),
        target: "≤ 1.25× the floor".into(),
        met: Some(unix <= 1.25 * floor),
    });
    report.row(Row {
        scenario: "R2. relay CPU per txn, TLS both legs, vs PgBouncer (pgbench -S -c 8)".into(),
        direct: format!("PgBouncer {bouncer:.1} µs"),
        ephemera: format!("{tls:.1} µs"),
        ratio: ratio(tls, bouncer),
        other: format!("vs the floor: {}", ratio(tls, floor)),
        target: "≤ 0.75× PgBouncer".into(),
        met: if bouncer.is_nan() {
            None
        } else {
            Some(tls <= 0.75 * bouncer)
        },
    });
    let audited = relay_us("Ephemera, TLS upstream, statement audit");
    report.row(Row {
        scenario: "R6. relay CPU per txn with statement audit, TLS upstream (pgbench -S -c 8)"
            .into(),
        direct: format!("without audit {tls:.1} µs"),
        ephemera: format!("{audited:.1} µs"),
        ratio: ratio(audited, tls),
        other: format!("+{:.1} µs per statement", audited - tls),
        target: "(informative: issue 19 asks for the cost to be measured)".into(),
        met: None,
    });
    let pooled = relay_us("Ephemera, TLS upstream, pooled");
    report.row(Row {
        scenario: "R7. relay CPU per txn, pooled template, TLS upstream (pgbench -S -c 8)".into(),
        direct: format!("unpooled {tls:.1} µs"),
        ephemera: format!("{pooled:.1} µs"),
        ratio: ratio(pooled, tls),
        other: format!(
            "tps {} vs unpooled {}",
            tps("Ephemera, TLS upstream, pooled").round(),
            tps("Ephemera, TLS upstream").round()
        ),
        target: "no worse than the unpooled relay (≤ 1.10×, the noise of one run)".into(),
        met: Some(pooled <= 1.10 * tls),
    });
    let d = tps("direct (TLS)");
    for (label, goal) in [
        ("Ephemera, Unix upstream", 0.95),
        ("Ephemera, TLS upstream", 0.80),
    ] {
        let e = tps(label);
        report.row(Row {
            scenario: format!("R3. pgbench -S -c 8 tps, {label}"),
            direct: format!("{d:.0}"),
            ephemera: format!("{e:.0}"),
            ratio: ratio(e, d),
            other: String::new(),
            target: format!("≥ {goal:.2}× direct TLS"),
            met: Some(e >= goal * d),
        });
    }
    let direct_p50 = p50("direct (TLS)");
    for label in ["Ephemera, TLS upstream", "Ephemera, Unix upstream"] {
        let e = p50(label);
        report.row(Row {
            scenario: format!("R4. c=1 round trip p50, {label}"),
            direct: format!("{direct_p50:.0} µs"),
            ephemera: format!("{e:.0} µs"),
            ratio: ratio(e, direct_p50),
            other: format!("+{:.0} µs", e - direct_p50),
            target: "within 20 µs of direct".into(),
            met: Some(e - direct_p50 <= 20.0),
        });
    }
    let storm_p =
        |label: &str, p: f64| under_storm.get(label).map_or(f64::NAN, |c| c.percentile(p));
    let (sd50, sd99) = (storm_p("direct (TLS)", 50.0), storm_p("direct (TLS)", 99.0));
    for label in ["Ephemera, TLS upstream", "Ephemera, Unix upstream"] {
        let (e50, e99) = (storm_p(label, 50.0), storm_p(label, 99.0));
        report.row(Row {
            scenario: format!("R5. c=1 round trip during a connect storm ×{STORM_LOOPS}, {label}"),
            direct: format!("{sd50:.0} / {sd99:.0} µs"),
            ephemera: format!("{e50:.0} / {e99:.0} µs"),
            ratio: ratio(e50, sd50),
            other: format!(
                "without the storm: +{:.0} µs at p50",
                p50(label) - direct_p50
            ),
            target: "(informative: do handshakes stall relays?)".into(),
            met: None,
        });
    }
}
