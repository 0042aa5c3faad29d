//! The arguments of the admin API commands (`leases`, `revoke`, `creds`,
//! and `exec`'s connection options), and the client they describe.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use ephemera::admin::api::RevokeRequest;
use ephemera::admin::client::AdminClient;
use ephemera::identity::token::BearerToken;
use ephemera_engine::{LeaseId, LeaseState};

/// How to reach and authenticate to the admin API. Every field is `global`,
/// so it may be given before or after a `leases` subcommand.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// The admin API's URL (https only).
    #[arg(
        long = "admin",
        value_name = "URL",
        env = "EPHEMERA_ADMIN",
        default_value = "https://127.0.0.1:8443",
        global = true
    )]
    pub admin: String,

    /// Your X.509-SVID, PEM (leaf first, then intermediates). Required.
    #[arg(long, value_name = "PATH", env = "EPHEMERA_CERT", global = true)]
    pub cert: Option<PathBuf>,

    /// The SVID's private key, PEM. Required.
    #[arg(long, value_name = "PATH", env = "EPHEMERA_KEY", global = true)]
    pub key: Option<PathBuf>,

    /// The CA certificate(s) that issued the admin API's server certificate, PEM. Required.
    #[arg(long, value_name = "PATH", env = "EPHEMERA_CA", global = true)]
    pub ca: Option<PathBuf>,

    /// Authenticate with the identity token in this file (sent as
    /// `Authorization: Bearer`) instead of --cert/--key: `exec` and `creds`.
    #[arg(long, value_name = "FILE", global = true, conflicts_with = "token_env")]
    pub token_file: Option<PathBuf>,

    /// Like --token-file, with the token in this environment variable
    /// (e.g. ACTIONS_ID_TOKEN).
    #[arg(long, value_name = "VAR", global = true)]
    pub token_env: Option<String>,

    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Lease states for `leases list --state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    Active,
    Revoked,
    Expired,
}

impl From<StateArg> for LeaseState {
    fn from(state: StateArg) -> LeaseState {
        match state {
            StateArg::Active => LeaseState::Active,
            StateArg::Revoked => LeaseState::Revoked,
            StateArg::Expired => LeaseState::Expired,
        }
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum LeasesCommand {
    /// List leases; the filters combine.
    List {
        /// Only leases of this SPIFFE ID (e.g. spiffe://example.org/ns/prod/sa/api).
        #[arg(long, value_name = "SPIFFE_ID")]
        identity: Option<String>,
        /// Only leases of this role template.
        #[arg(long)]
        template: Option<String>,
        /// Only leases in this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
    },
    /// Show one lease.
    Show {
        /// The lease ID (a UUID, as `leases list` shows it).
        id: LeaseId,
    },
    /// Extend a lease, never past its maximum lifetime.
    Renew {
        /// The lease ID.
        id: LeaseId,
        /// The new time to live from now (e.g. 10m, 1h 30m); default: the template's ttl.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// End a lease now: its role is dropped and its sessions terminated.
    Revoke {
        /// The lease ID.
        id: LeaseId,
    },
}

/// Which leases `ephemera revoke` ends: exactly one selector.
#[derive(Debug, Clone, Args)]
#[command(group(
    ArgGroup::new("selector")
        .args(["identity", "identity_prefix", "template"])
        .required(true)
        .multiple(false)
))]
pub struct RevokeArgs {
    /// Every lease of this SPIFFE ID.
    #[arg(long, value_name = "SPIFFE_ID")]
    pub identity: Option<String>,
    /// Every lease of the SPIFFE IDs starting with this (e.g. spiffe://example.org/ns/staging/).
    #[arg(long, value_name = "PREFIX")]
    pub identity_prefix: Option<String>,
    /// Every lease of this role template.
    #[arg(long)]
    pub template: Option<String>,
}

impl From<RevokeArgs> for RevokeRequest {
    fn from(args: RevokeArgs) -> RevokeRequest {
        RevokeRequest {
            identity: args.identity,
            identity_prefix: args.identity_prefix,
            template: args.template,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct CredsArgs {
    /// The role template to get credentials for.
    pub template: String,
}

impl AdminArgs {
    /// The client these arguments describe, or an error naming every
    /// missing option.
    pub(crate) fn client(&self) -> anyhow::Result<AdminClient> {
        if let Some(token) = self.token()? {
            let Some(ca) = &self.ca else {
                anyhow::bail!(
                    "missing --ca PATH (or EPHEMERA_CA): the CA of the admin API's certificate"
                );
            };
            return Ok(AdminClient::with_token_and_ca_file(&self.admin, token, ca)?);
        }
        let (Some(cert), Some(key), Some(ca)) = (&self.cert, &self.key, &self.ca) else {
            anyhow::bail!(
                "the admin API needs mutual TLS; missing:\n  {}",
                self.missing_files().join("\n  ")
            );
        };
        Ok(AdminClient::from_files(&self.admin, cert, key, ca)?)
    }

    /// The token of `--token-file` or `--token-env`, if one is given. Errors
    /// name the file or variable, never the token.
    fn token(&self) -> anyhow::Result<Option<BearerToken>> {
        let text = match (&self.token_file, &self.token_env) {
            (Some(path), _) => std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("cannot read the token file {}: {e}", path.display())
            })?,
            (None, Some(var)) => std::env::var(var).map_err(|e| {
                anyhow::anyhow!("cannot read the token from environment variable {var}: {e}")
            })?,
            (None, None) => return Ok(None),
        };
        if text.trim().is_empty() {
            anyhow::bail!("the token given with --token-file/--token-env is empty");
        }
        Ok(Some(
            BearerToken::new(text).map_err(|e| anyhow::anyhow!("{e}"))?,
        ))
    }

    /// Which of `--cert`, `--key`, `--ca` are missing, with what they are.
    fn missing_files(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.cert.is_none() {
            missing.push("--cert PATH (or EPHEMERA_CERT): your X.509-SVID (or --token-file/--token-env: an identity token)");
        }
        if self.key.is_none() {
            missing.push("--key PATH (or EPHEMERA_KEY): its private key");
        }
        if self.ca.is_none() {
            missing.push("--ca PATH (or EPHEMERA_CA): the CA of the admin API's certificate");
        }
        missing
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("ephemera").chain(args.iter().copied()))
            .map(|cli| cli.command)
    }

    const ID: &str = "6f1c2b1e-3c4d-4e5f-8a9b-0c1d2e3f4a5b";

    #[test]
    fn the_clap_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn revoke_needs_exactly_one_selector() {
        let Command::Revoke { select, .. } = parse(&[
            "revoke",
            "--identity-prefix",
            "spiffe://example.org/ns/staging/",
        ])
        .unwrap() else {
            panic!("not revoke");
        };
        assert_eq!(
            RevokeRequest::from(select),
            RevokeRequest {
                identity_prefix: Some("spiffe://example.org/ns/staging/".into()),
                ..RevokeRequest::default()
            }
        );

        let none = parse(&["revoke"]).unwrap_err();
        assert_eq!(none.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let two = parse(&["revoke", "--identity", "a", "--template", "b"]).unwrap_err();
        assert_eq!(two.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn leases_subcommands_parse() {
        let Command::Leases { admin, command } = parse(&[
            "leases",
            "--cert",
            "svid.pem",
            "list",
            "--identity",
            "spiffe://example.org/ns/prod/sa/api",
            "--state",
            "revoked",
            // Admin options are global: accepted after the subcommand too.
            "--json",
            "--ca",
            "ca.pem",
        ])
        .unwrap() else {
            panic!("not leases");
        };
        assert!(admin.json);
        assert_eq!(admin.cert, Some(PathBuf::from("svid.pem")));
        assert_eq!(admin.ca, Some(PathBuf::from("ca.pem")));
        assert!(matches!(
            command,
            LeasesCommand::List {
                identity: Some(_),
                template: None,
                state: Some(StateArg::Revoked)
            }
        ));

        let Command::Leases { command, .. } =
            parse(&["leases", "renew", ID, "--ttl", "1h 30m"]).unwrap()
        else {
            panic!("not leases");
        };
        assert!(matches!(
            command,
            LeasesCommand::Renew { ttl: Some(ttl), .. } if ttl == Duration::from_secs(5400)
        ));

        assert!(parse(&["leases", "show", "not-a-uuid"]).is_err());
        assert!(parse(&["leases", "renew", ID, "--ttl", "soon"]).is_err());
        assert!(matches!(
            parse(&["creds", "report_ro"]).unwrap(),
            Command::Creds { creds, .. } if creds.template == "report_ro"
        ));
    }

    #[test]
    fn missing_files_are_all_named() {
        let args = AdminArgs {
            token_file: None,
            token_env: None,
            admin: "https://127.0.0.1:8443".into(),
            cert: Some("svid.pem".into()),
            key: None,
            ca: None,
            json: false,
        };
        let error = args.client().unwrap_err().to_string();
        assert!(!error.contains("--cert"), "{error}");
        assert!(error.contains("--key PATH (or EPHEMERA_KEY)"), "{error}");
        assert!(error.contains("--ca PATH (or EPHEMERA_CA)"), "{error}");
    }
}
