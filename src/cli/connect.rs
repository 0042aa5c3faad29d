//! `ephemera connect`: its flags, and running the connector until SIGTERM
//! or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Args};
use ephemera::connector::{
    workload_api_source, Connector, ConnectorOptions, Credential, FileSvid, SvidSource,
};

/// `--listen` unless given (and unless only `--socket-dir` is).
const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5432);

/// The flags of `ephemera connect`.
#[derive(Debug, Clone, Args)]
#[command(group(
    ArgGroup::new("credential")
        .args(["workload_api", "cert", "token_file"])
        .required(true)
        .multiple(false)
))]
pub struct ConnectArgs {
    /// Ephemera's address, HOST:PORT; its certificate must name HOST.
    #[arg(long, value_name = "HOST:PORT", env = "EPHEMERA_CONNECT_TO")]
    pub to: String,
    /// The CA certificate(s) that issued Ephemera's server certificate, PEM.
    #[arg(long, value_name = "FILE", env = "EPHEMERA_CONNECT_CA")]
    pub ca: PathBuf,
    /// Take the X.509-SVID from the SPIFFE Workload API at ADDR
    /// (unix:///run/spire/sockets/agent.sock).
    #[arg(long, value_name = "ADDR")]
    pub workload_api: Option<String>,
    /// The X.509-SVID, PEM (leaf first, then intermediates); re-read when it changes.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The SVID's private key, PEM; re-read when it changes.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// An identity token, sent as the password; re-read for every connection.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Where applications connect over TCP (loopback only). Default
    /// 127.0.0.1:5432; with --socket-dir and no --listen, no TCP at all (the
    /// socket is .s.PGSQL.5432).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Listen on DIR/.s.PGSQL.<port> (libpq's host=DIR), the port of --listen.
    #[arg(long, value_name = "DIR")]
    pub socket_dir: Option<PathBuf>,
    /// Only this uid may connect on the Unix socket (repeatable); without
    /// it, only the connector's own uid.
    #[arg(long = "allow-uid", value_name = "UID", requires = "socket_dir")]
    pub allow_uid: Vec<u32>,
    /// Serve /healthz, /readyz and /metrics on ADDR.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// How long open sessions may run after SIGTERM/SIGINT.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
}

impl ConnectArgs {
    fn options(self) -> anyhow::Result<ConnectorOptions> {
        let credential = match (self.workload_api, self.cert, self.key, self.token_file) {
            (Some(address), ..) => Credential::Svid(workload_api_source(&address)?),
            (None, Some(cert), Some(key), _) => {
                let source: Arc<dyn SvidSource> = Arc::new(FileSvid::new(cert, key));
                Credential::Svid(source)
            }
            (None, None, None, Some(path)) => Credential::TokenFile(path),
            _ => anyhow::bail!("give --workload-api, --cert and --key, or --token-file"),
        };
        Ok(ConnectorOptions {
            to: self.to,
            ca: self.ca,
            credential,
            tcp: self.listen.is_some() || self.socket_dir.is_none(),
            listen: self.listen.unwrap_or(DEFAULT_LISTEN),
            socket_dir: self.socket_dir,
            allow_uid: self.allow_uid,
            http: self.http,
            grace: self.grace,
        })
    }
}

pub fn main(args: ConnectArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ephemera-connect")
        .build()
        .context("cannot start the async runtime")?;
    // The Workload API client follows the agent on this runtime.
    let options = {
        let _runtime = runtime.enter();
        args.options()?
    };
    runtime.block_on(async move {
        let to = options.to.clone();
        let connector = Connector::bind(options).await?;
        let mut listening: Vec<String> = connector
            .local_addr()
            .map(|a| a.to_string())
            .into_iter()
            .collect();
        listening.extend(connector.socket_path().map(|p| p.display().to_string()));
        tracing::info!(
            listen = %listening.join(", "),
            http = ?connector.http_addr(),
            to = %to,
            "ephemera connect is ready"
        );
        connector.serve(super::serve::shutdown_signal()).await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(
            ["ephemera", "connect", "--to", "e:6432", "--ca", "ca.pem"]
                .iter()
                .chain(args),
        )
        .map(|cli| cli.command)
    }

    #[test]
    fn exactly_one_credential_and_sane_defaults() {
        let Command::Connect(args) = parse(&["--cert", "s.pem", "--key", "k.pem"]).unwrap() else {
            panic!("not connect");
        };
        assert_eq!(args.listen, None);
        let options = args.clone().options().unwrap();
        assert!(options.tcp, "TCP on the default address");
        assert_eq!(options.listen.to_string(), "127.0.0.1:5432");
        assert_eq!(args.grace, std::time::Duration::from_secs(10));
        assert!(parse(&[]).is_err(), "a credential is required");
        assert!(parse(&["--cert", "s.pem"]).is_err(), "--cert needs --key");
        assert!(parse(&["--token-file", "t", "--workload-api", "unix:///a"]).is_err());
        assert!(
            parse(&["--token-file", "t", "--allow-uid", "1000"]).is_err(),
            "--allow-uid is about the Unix socket"
        );
        let Command::Connect(args) = parse(&[
            "--token-file",
            "t",
            "--socket-dir",
            "/run/e",
            "--allow-uid",
            "1000",
            "--allow-uid",
            "1001",
        ])
        .unwrap() else {
            panic!("not connect");
        };
        assert_eq!(args.allow_uid, vec![1000, 1001]);
        let options = args.clone().options().unwrap();
        assert!(!options.tcp, "--socket-dir alone: the Unix socket only");
        assert_eq!(options.listen.port(), 5432);
    }
}
