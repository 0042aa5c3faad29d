//! The `ephemera` command line: [`Cli`] and its [`Command`]s, the one clap
//! definition of every command, and [`run`], which carries a command out.
//!
//! * `args`: the admin API commands' arguments, and the client they describe;
//! * `leases`: `ephemera leases|revoke|creds`, and how their answers are shown;
//! * `exec`: `ephemera exec`;
//! * `serve`: `ephemera serve|dev|check-config`;
//! * `audit`: `ephemera whois|audit`, from the ledger and the audit log.
//!
//! This module is part of the binary only: its errors are `anyhow` errors,
//! printed here as `ephemera: …`; the library has typed errors.

mod args;
mod audit;
mod exec;
mod leases;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use self::args::{AdminArgs, CredsArgs, LeasesCommand, RevokeArgs};

#[derive(Debug, Parser)]
#[command(
    name = "ephemera",
    version,
    about = "Dynamic PostgreSQL credentials for SPIFFE workloads"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "EPHEMERA_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Try Ephemera on this machine: a throwaway PostgreSQL cluster, a
    /// development CA and demo SVIDs, and the proxy, with commands to paste.
    Dev {
        /// Where the cluster, certificates, secrets and config live (reused).
        #[arg(long, default_value = ".ephemera-dev")]
        dir: PathBuf,
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: std::net::SocketAddr,
        /// Where the admin API listens.
        #[arg(long, default_value = "127.0.0.1:6443")]
        admin_listen: std::net::SocketAddr,
        /// Use this PostgreSQL instead of a throwaway cluster:
        /// postgres://ADMIN:PASSWORD@HOST:PORT/postgres?sslmode=require
        #[arg(long)]
        upstream: Option<String>,
    },
    /// Run the proxy.
    Serve {
        /// The configuration file (TOML); EPHEMERA_* variables override it.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Validate a configuration without serving; lists every problem.
    CheckConfig {
        /// The configuration file to check.
        path: PathBuf,
        /// Also log in to the upstream as the admin role and check what the
        /// templates need there (CREATEROLE, databases, groups, owners).
        #[arg(long)]
        connect: bool,
    },
    /// List, show, renew or revoke leases (admin API).
    Leases {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: LeasesCommand,
    },
    /// Revoke every lease of an identity, identity prefix or template, and
    /// end their sessions (admin API).
    Revoke {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        select: RevokeArgs,
    },
    /// Get standalone credentials (a password) for TEMPLATE as your own
    /// identity, for clients that cannot come through the proxy.
    Creds {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        creds: CredsArgs,
    },
    /// Run COMMAND with standalone credentials for TEMPLATE, revoked when it exits.
    ///
    /// COMMAND gets PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE and
    /// PGSSLMODE; the lease is renewed while it runs. Exits with COMMAND's exit
    /// code (128+N if signal N ended it).
    Exec {
        #[command(flatten)]
        admin: AdminArgs,
        /// The role template to get credentials for.
        #[arg(long)]
        template: String,
        /// libpq sslmode for COMMAND's connections to the database (PGSSLMODE).
        #[arg(
            long,
            env = "EPHEMERA_PGSSLMODE",
            default_value = "require",
            value_parser = ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
        )]
        sslmode: String,
        /// The database server's CA certificate(s), PEM (PGSSLROOTCERT).
        #[arg(long, value_name = "PATH", env = "EPHEMERA_PGSSLROOTCERT")]
        sslrootcert: Option<PathBuf>,
        /// The command to run, and its arguments.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Who a database role is or was for (identity, subject, template,
    /// database, client address, lease times): from the ledger while the
    /// role exists, from the audit log after it is gone.
    Whois {
        /// The role name, as PostgreSQL's log shows it (eph_…).
        role: String,
        /// The configuration: its upstream holds the ledger, its [audit]
        /// path the audit log.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The audit log to search (default: the configuration's).
        #[arg(long, value_name = "PATH")]
        audit_log: Option<PathBuf>,
        /// JSON instead of `key: value` lines.
        #[arg(long)]
        json: bool,
    },
    /// Print audit events of a lease or an identity (a table, or --json lines).
    Audit {
        /// The configuration whose [audit] path to read.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The audit log to read.
        #[arg(long, value_name = "PATH")]
        audit_log: Option<PathBuf>,
        /// Only this lease's events (its whole story: issued, logins,
        /// statements, renewals, revoked).
        #[arg(long, value_name = "ID")]
        lease: Option<String>,
        /// Only this identity's events.
        #[arg(long, value_name = "ID")]
        identity: Option<String>,
        /// Only events since this time (RFC 3339) or this long ago (90m, 2d).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// One JSON object a line, as in the log.
        #[arg(long)]
        json: bool,
    },
}

impl Command {
    /// Whether the command reads the upstream admin password (and, serving,
    /// holds every session's SCRAM keys): such a process must leave no core
    /// file and allow no ptrace by the same user.
    pub fn handles_secrets(&self) -> bool {
        matches!(
            self,
            Command::Serve { .. }
                | Command::Dev { .. }
                | Command::CheckConfig { .. }
                | Command::Whois {
                    config: Some(_),
                    ..
                }
        )
    }

    /// The log filter unless `EPHEMERA_LOG` says otherwise. `dev` prints its
    /// own progress and instructions, so its log is kept quiet.
    pub fn default_log_level(&self) -> &'static str {
        if matches!(self, Command::Dev { .. }) {
            "warn,deadpool=error"
        } else {
            "info"
        }
    }
}

/// Carry out `command`; returns the process' exit code.
pub fn run(command: Command) -> ExitCode {
    match command {
        Command::Dev {
            dir,
            listen,
            admin_listen,
            upstream,
        } => report(
            "ephemera dev",
            serve::dev(ephemera::dev::DevOptions {
                dir,
                listen,
                admin_listen,
                upstream,
            }),
        ),
        Command::Serve { config } => report("ephemera", serve::serve(config)),
        Command::CheckConfig { path, connect } => serve::check_config(&path, connect),
        Command::Leases { admin, command } => run_client(leases::leases(admin, command)),
        Command::Revoke { admin, select } => run_client(leases::revoke(admin, select)),
        Command::Creds { admin, creds } => run_client(leases::creds(admin, creds)),
        Command::Exec {
            admin,
            template,
            sslmode,
            sslrootcert,
            command,
        } => exec::main(admin, template, sslmode, sslrootcert, command),
        Command::Whois {
            role,
            config,
            audit_log,
            json,
        } => run_client(audit::whois(role, config, audit_log, json)),
        Command::Audit {
            config,
            audit_log,
            lease,
            identity,
            since,
            json,
        } => report(
            "ephemera",
            audit::audit(audit::AuditArgs {
                config,
                audit_log,
                lease,
                identity,
                since,
                json,
            }),
        ),
    }
}

/// Run an admin API client command on a small runtime.
fn run_client(command: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(command));
    report("ephemera", result)
}

/// Success, or the error and its causes on stderr after `prefix`.
fn report(prefix: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{prefix}: {error:#}");
            ExitCode::FAILURE
        }
    }
}
