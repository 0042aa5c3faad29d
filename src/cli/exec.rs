//! `ephemera exec --template T -- CMD ARGS…`: run a batch job with standalone
//! database credentials that live exactly as long as the job.
//!
//! 1. Ask the admin API for a standalone lease of template T, as the job's
//!    own identity (the SVID given with `--cert`/`--key`).
//! 2. Run CMD with `PGHOST PGPORT PGUSER PGPASSWORD PGDATABASE PGSSLMODE`
//!    (and `PGSSLROOTCERT` if `--sslrootcert` is given) set, so any libpq
//!    client in it logs in to the upstream PostgreSQL directly.
//! 3. While CMD runs, renew the lease at a third of its remaining time, until
//!    the server no longer extends it (its `max_ttl`); SIGINT and SIGTERM
//!    are passed on to CMD.
//! 4. When CMD ends, revoke the lease and exit with CMD's exit code
//!    (128 + N if it died of signal N).
//!
//! Exit codes of `ephemera exec` itself: 125 if it failed before CMD could
//! run (bad options, credentials refused), 127 if CMD could not be started.
//! The password goes only into CMD's environment: it is never printed.

use std::path::PathBuf;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use anyhow::Context;
use ephemera::admin::api::Credentials;
use ephemera::admin::client::{AdminClient, AdminClientError};
use ephemera_engine::LeaseId;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

use super::args::AdminArgs;

/// `ephemera exec` failed before the command ran.
const EXIT_SETUP_FAILED: u8 = 125;
/// The command could not be started (as in the shell).
const EXIT_CANNOT_START: u8 = 127;

/// The earliest a renewal is attempted after the previous one.
const MIN_RENEW_INTERVAL: Duration = Duration::from_millis(250);

/// How often a revocation that failed for a transient reason is attempted.
const REVOKE_ATTEMPTS: u32 = 3;

/// What the job is to run, and how its client reaches the database.
#[derive(Debug, Clone)]
struct Job {
    /// The role template to get credentials for.
    template: String,
    /// libpq `sslmode` for the job's connections to the database.
    sslmode: String,
    /// The database server's CA for `verify-ca`/`verify-full`.
    sslrootcert: Option<PathBuf>,
    /// The command and its arguments (at least the command).
    command: Vec<String>,
}

/// Run `ephemera exec` (the arguments of `Command::Exec`); the exit code
/// is the command's.
pub fn main(
    admin: AdminArgs,
    template: String,
    sslmode: String,
    sslrootcert: Option<PathBuf>,
    command: Vec<String>,
) -> ExitCode {
    let job = Job {
        template,
        sslmode,
        sslrootcert,
        command,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ephemera exec: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_SETUP_FAILED);
        }
    };
    ExitCode::from(runtime.block_on(run(admin, job)))
}

async fn run(admin: AdminArgs, job: Job) -> u8 {
    // Handle the signals from the start: a SIGTERM while the credentials are
    // being issued must not leave them behind unrevoked.
    let mut signals = match Signals::install() {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("ephemera exec: {error:#}");
            return EXIT_SETUP_FAILED;
        }
    };
    let client = match admin.client() {
        Ok(client) => client,
        Err(error) => {
            eprintln!("ephemera exec: {error:#}");
            return EXIT_SETUP_FAILED;
        }
    };

    let (credentials, early_signal) = {
        let issue = client.creds(&job.template);
        tokio::pin!(issue);
        let mut early_signal = None;
        let result = loop {
            tokio::select! {
                result = &mut issue => break result,
                signal = signals.recv() => { early_signal.get_or_insert(signal); }
            }
        };
        match result {
            Ok(credentials) => (credentials, early_signal),
            Err(error) => {
                eprintln!(
                    "ephemera exec: cannot get credentials for template {}: {error}",
                    job.template
                );
                return EXIT_SETUP_FAILED;
            }
        }
    };
    let lease = credentials.lease_id;
    if let Some(signal) = early_signal {
        // Told to stop before the command even started.
        give_back(&client, lease, credentials.expires_at).await;
        return signal_exit_code(signal);
    }

    let program = &job.command[0];
    let mut child = match command(&job, &credentials).spawn() {
        Ok(child) => child,
        Err(error) => {
            eprintln!("ephemera exec: cannot start {program}: {error}");
            give_back(&client, lease, credentials.expires_at).await;
            return EXIT_CANNOT_START;
        }
    };

    let (expiry_tx, expiry) = watch::channel(credentials.expires_at);
    let renewer = tokio::spawn(keep_renewed(
        client.clone(),
        lease,
        credentials.expires_at,
        expiry_tx,
    ));
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            signal = signals.recv() => forward(&child, signal),
        }
    };
    renewer.abort();
    // Wait for the abort: no renewal is in flight once we revoke.
    let _ = renewer.await;
    let expires_at = *expiry.borrow();
    give_back(&client, lease, expires_at).await;

    match status {
        Ok(status) => exit_code(status),
        Err(error) => {
            eprintln!("ephemera exec: cannot wait for {program}: {error}");
            EXIT_SETUP_FAILED
        }
    }
}

/// The job's command with the credentials in its environment.
fn command(job: &Job, credentials: &Credentials) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(&job.command[0]);
    command
        .args(&job.command[1..])
        // Either would send the client elsewhere than PGHOST/PGPORT say (a
        // service file's values win over the PG* variables).
        .env_remove("PGHOSTADDR")
        .env_remove("PGSERVICE")
        .env("PGHOST", &credentials.host)
        .env("PGPORT", credentials.port.to_string())
        .env("PGUSER", &credentials.username)
        .env("PGPASSWORD", &credentials.password)
        .env("PGDATABASE", &credentials.database)
        .env("PGSSLMODE", &job.sslmode);
    if let Some(root_cert) = &job.sslrootcert {
        command.env("PGSSLROOTCERT", root_cert);
    }
    command
}

/// Renew `lease` at a third of its remaining time (at least
/// [`MIN_RENEW_INTERVAL`] apart) until the server stops extending it or it
/// has expired; publishes each new expiry on `expiry`. Failures are logged
/// and retried.
async fn keep_renewed(
    client: AdminClient,
    lease: LeaseId,
    mut expires_at: OffsetDateTime,
    expiry: watch::Sender<OffsetDateTime>,
) {
    loop {
        let remaining = until(expires_at);
        if remaining.is_zero() {
            eprintln!(
                "ephemera exec: lease {lease} expired at {}; the credentials no longer work",
                timestamp(expires_at)
            );
            return;
        }
        // A third, not a half: a renewal that is slow (a loaded machine, a
        // failover) or fails once still has time for another try.
        let wait = (remaining / 3).max(MIN_RENEW_INTERVAL);
        tokio::time::sleep(wait).await;
        match client.renew_lease(lease, None).await {
            Ok(renewed) => {
                expires_at = renewed.expires_at;
                expiry.send_replace(expires_at);
                if renewed.expires_at >= renewed.max_expires_at {
                    eprintln!(
                        "ephemera exec: lease {lease} has reached its maximum lifetime; \
                         the credentials stop working at {}",
                        timestamp(expires_at)
                    );
                    return;
                }
            }
            Err(error) => {
                eprintln!(
                    "ephemera exec: renewing lease {lease} failed (it expires at {}): {error}",
                    timestamp(expires_at)
                );
            }
        }
    }
}

/// Revoke `lease`, unless it has expired already. Transient failures are
/// retried; a final failure is logged (the lease still ends at `expires_at`).
async fn give_back(client: &AdminClient, lease: LeaseId, expires_at: OffsetDateTime) {
    if until(expires_at).is_zero() {
        return;
    }
    let mut attempt = 1;
    loop {
        match client.revoke_lease(lease).await {
            Ok(_) => return,
            Err(error) if attempt < REVOKE_ATTEMPTS && transient(&error) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => {
                eprintln!(
                    "ephemera exec: cannot revoke lease {lease}: {error}; unless it has \
                     ended already, it expires at {}",
                    timestamp(expires_at)
                );
                return;
            }
        }
    }
}

/// Failures worth another attempt.
fn transient(error: &AdminClientError) -> bool {
    matches!(
        error,
        AdminClientError::Connect { .. }
            | AdminClientError::Http { .. }
            | AdminClientError::Timeout { .. }
            | AdminClientError::Api { status: 503, .. }
    )
}

/// The time from now to `at`, zero if it has passed.
fn until(at: OffsetDateTime) -> Duration {
    Duration::try_from(at - OffsetDateTime::now_utc()).unwrap_or(Duration::ZERO)
}

fn timestamp(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

/// The shell's exit code for a child's status.
fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        // Unix exit codes are 0..=255.
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(u8::MAX),
        (None, Some(signal)) => signal_exit_code(signal),
        (None, None) => EXIT_SETUP_FAILED,
    }
}

fn signal_exit_code(signal: i32) -> u8 {
    u8::try_from(128 + signal).unwrap_or(u8::MAX)
}

/// SIGINT and SIGTERM, caught for the whole run.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    /// The next signal's number.
    async fn recv(&mut self) -> i32 {
        tokio::select! {
            Some(()) = self.interrupt.recv() => SignalKind::interrupt().as_raw_value(),
            Some(()) = self.terminate.recv() => SignalKind::terminate().as_raw_value(),
            // Both streams closed (the runtime is shutting down): no more signals.
            else => std::future::pending().await,
        }
    }
}

/// Send `signal` to the child, if it has not been reaped yet.
fn forward(child: &tokio::process::Child, signal: i32) {
    let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) else {
        return;
    };
    // The child is not reaped until `wait` returns, so `pid` is still the
    // child's.
    let sent = nix::sys::signal::Signal::try_from(signal)
        .and_then(|signal| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal));
    if let Err(errno) = sent {
        eprintln!(
            "ephemera exec: cannot pass signal {signal} on to the command: {}",
            std::io::Error::from(errno)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn exit_codes_follow_the_shell() {
        // Raw wait statuses: exit code in the high byte, signal in the low bits.
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code(ExitStatus::from_raw(255 << 8)), 255);
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }

    #[test]
    fn until_is_never_negative() {
        let past = OffsetDateTime::now_utc() - time::Duration::seconds(5);
        assert_eq!(until(past), Duration::ZERO);
        let future = OffsetDateTime::now_utc() + time::Duration::seconds(60);
        assert!(until(future) > Duration::from_secs(50));
    }
}
