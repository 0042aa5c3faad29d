//! Scenario 4b, pooled leases (issue 17): a new connection per transaction
//! through a pooled template (`bench_pooled`, `pool = "session"`) against
//! direct TLS + SCRAM: connect-to-first-row with a warm pool, `pgbench -C
//! -S` (against PgBouncer too), the connect storm's rate, and the roles
//! left once the pool has idled out.

use std::time::{Duration, Instant};

use tokio_postgres_rustls::MakeRustlsConnect;

use crate::env::{Env, Error, TEMPLATE_POOLED};
use crate::perf::Perf;
use crate::scenarios::{first_row, ratio, run_pgbench_with, storm_with, syscall_note};
use crate::stats::{ms, CpuSnapshot, Summary};
use crate::{Options, Report, Row};

/// The storm's rate: sessions per second, and errors.
async fn storm_rate(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    concurrency: usize,
    duration: Duration,
) -> Result<(f64, usize), Error> {
    let result = storm_with(config, tls, concurrency, duration).await?;
    Ok((result.ok as f64 / result.wall, result.errors))
}

/// Connect-to-first-row, one session at a time, `n` of them.
async fn sequential(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    n: usize,
) -> Result<Summary, Error> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.push(
            first_row(config, tls, Instant::now())
                .await
                .map_err(|e| format!("pooled first row: {e}"))?,
        );
    }
    Ok(Summary::of(&samples))
}

pub async fn pooled(env: &Env, options: &Options, report: &mut Report) -> Result<(), Error> {
    let clients = &env.clients;
    let c = options.storm_concurrency;
    let duration = Duration::from_secs(options.storm_secs);
    let n = options.sessions;
    eprintln!("load: pooled, connect-to-first-row ×{n}, direct then pooled (warm)");
    // Warm the pool: its lease and a backend.
    sequential(&clients.ephemera_pooled, &clients.svid_tls, 5).await?;
    let direct = sequential(&clients.direct, &clients.direct_tls, n).await?;
    let pooled = sequential(&clients.ephemera_pooled, &clients.svid_tls, n).await?;
    report.row(Row {
        scenario: "4b. pooled: connect-to-first-row p50, warm pool".into(),
        direct: format!("{:.2} ms", ms(direct.p50)),
        ephemera: format!("{:.2} ms", ms(pooled.p50)),
        ratio: ratio(ms(pooled.p50), ms(direct.p50)),
        other: format!(
            "p99 direct {:.2} ms, pooled {:.2} ms",
            ms(direct.p99),
            ms(pooled.p99)
        ),
        target: "≤ 0.3× direct".into(),
        met: Some(ms(pooled.p50) <= 0.3 * ms(direct.p50)),
    });
    new_connection_per_transaction(env, options, report)?;
    eprintln!(
        "load: pooled storm ×{c}, {} s, direct then pooled",
        duration.as_secs()
    );
    let before = CpuSnapshot::take(&env.pids());
    let (d, _) = storm_rate(&clients.direct, &clients.direct_tls, c, duration).await?;
    let split = CpuSnapshot::settled(&env.pids(), Instant::now()).since(&before);
    report.cpu(&format!("pooled storm ×{c}, direct"), split);
    let perf = Perf::start(options, "pooled-storm-ephemera", env.pids().ephemera);
    let before = CpuSnapshot::take(&env.pids());
    let (p, p_errors) =
        storm_rate(&clients.ephemera_pooled, &clients.svid_tls, c, duration).await?;
    let split = CpuSnapshot::settled(&env.pids(), Instant::now()).since(&before);
    report.cpu(&format!("pooled storm ×{c}, pooled Ephemera"), split);
    if let Some(perf) = perf {
        let counts = perf.finish();
        let sessions = p * duration.as_secs_f64();
        report.note(syscall_note(
            "pooled storm Ephemera",
            &counts,
            sessions,
            "session",
        ));
    }
    // pool_idle_timeout is 2 s: the role goes once the pool idles out.
    let prefix = format!("eph_{TEMPLATE_POOLED}_");
    let (drain, left) = clients.drain(&prefix, Duration::from_secs(30)).await?;
    report.row(Row {
        scenario: format!(
            "4b. pooled connect storm ×{c}, {} s (sessions/s)",
            duration.as_secs()
        ),
        direct: format!("{d:.0}/s"),
        ephemera: format!("{p:.0}/s, {p_errors} errors"),
        ratio: ratio(p, d),
        other: format!(
            "pooled roles left: {left} (pool idled out in {:.1} s)",
            drain.as_secs_f64()
        ),
        target: "≥ 5× direct, ≥ 1000/s, 0 roles left".into(),
        met: Some(p >= 5.0 * d && p >= 1000.0 && left == 0),
    });
    Ok(())
}

/// `pgbench -C -S -c 8`: a new connection per transaction, direct, through
/// the pooled template and through PgBouncer (session mode, TLS to it).
fn new_connection_per_transaction(
    env: &Env,
    options: &Options,
    report: &mut Report,
) -> Result<(), Error> {
    let secs = options.pgbench_secs;
    let password = Some(env.direct_password.as_str());
    eprintln!("load: pooled, pgbench -C -S -c 8, {secs} s per mode");
    let direct = run_pgbench_with(
        env,
        &env.direct_conninfo("verify-full"),
        password,
        &["-C", "-S"],
        secs,
    )?;
    let perf = Perf::start(options, "pooled-pgbench-C-ephemera", env.pids().ephemera);
    let before = CpuSnapshot::take(&env.pids());
    let pooled = run_pgbench_with(
        env,
        &env.ephemera_pooled_conninfo(),
        None,
        &["-C", "-S"],
        secs,
    )?;
    let split = CpuSnapshot::settled(&env.pids(), Instant::now()).since(&before);
    report.cpu("pgbench -C -S -c 8, pooled Ephemera", split);
    if let Some(perf) = perf {
        perf.finish();
    }
    let bouncer = match env.pgbouncer {
        Some(_) => Some(run_pgbench_with(
            env,
            &env.pgbouncer_conninfo("verify-full"),
            password,
            &["-C", "-S"],
            secs,
        )?),
        None => None,
    };
    let bouncer_tps = bouncer.map(|b| b.tps);
    report.row(Row {
        scenario: "4b. pgbench -C -S -c 8 (a new connection per transaction), pooled".into(),
        direct: format!("{:.0} tps", direct.tps),
        ephemera: format!("{:.0} tps", pooled.tps),
        ratio: ratio(pooled.tps, direct.tps),
        other: match bouncer_tps {
            Some(tps) => format!("PgBouncer (session, TLS): {tps:.0} tps"),
            None => "PgBouncer not installed".into(),
        },
        target: "≥ 5× direct, ahead of PgBouncer".into(),
        met: Some(pooled.tps >= 5.0 * direct.tps && bouncer_tps.is_none_or(|b| pooled.tps > b)),
    });
    Ok(())
}
