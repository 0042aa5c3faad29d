//! From the parsed file to [`Settings`]: one function per section, each
//! adding every problem it finds (with its key) instead of stopping at the
//! first.

mod admin;
mod files;
mod lease;
mod policy;
mod templates;
mod tls;
mod tokens;
mod upstream;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use ephemera_engine::{AdminLogin, Upstream};

use crate::config::problems::{ConfigProblem, Problems};
use crate::config::schema::FileConfig;
use crate::config::{LeaseSettings, Rules, Settings, UpstreamSettings};
use crate::engines::{EngineRegistry, EnginesConfig};
use crate::policy::Policy;

/// Validate an already parsed configuration; relative paths are resolved
/// against `base`.
pub(crate) fn settings(
    file: FileConfig,
    base: &Path,
    registry: EngineRegistry,
) -> Result<Settings, Vec<ConfigProblem>> {
    let mut problems = Problems::default();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let listen = listen(&file, &mut problems);
    let front = tls::front_door(&file, base, &provider, &mut problems);
    let (upstream_tls, admin_password) = upstream::upstream(&file, base, &mut problems);
    lease::lease(&file, &mut problems);
    if !(1..=1_000_000).contains(&file.audit.statement_queue) {
        problems.add(
            "audit.statement_queue",
            "must be between 1 and 1000000 events, e.g. 4096",
        );
    }
    let (templates, engine_templates) =
        templates::templates(&file.templates, &registry, &mut problems);
    let rules = policy::policy(&file, &mut problems);
    let tokens = tokens::tokens(&file, base, &provider, &mut problems);
    let admin = admin::admin(
        &file,
        front.bundle.as_deref(),
        &front.server_identity,
        &provider,
        &mut problems,
    );
    let up = &file.upstream;
    let (server_tls, svid_verifier) = (front.server_tls, front.svid_verifier);
    match (
        listen,
        server_tls,
        svid_verifier,
        upstream_tls,
        admin_password,
    ) {
        (Some(listen), Some(server_tls), Some(svid_verifier), Some(tls), Some(password))
            if problems.0.is_empty() =>
        {
            Ok(Settings {
                listen,
                handshake_timeout: file.listen.handshake_timeout,
                max_connections: file.listen.max_connections,
                workers: lease::workers(&file),
                server_tls,
                svid_verifier,
                upstream: UpstreamSettings {
                    host: up.host.clone(),
                    port: up.port,
                    tls: tls.clone(),
                    connect_timeout: up.connect_timeout,
                },
                engines: EnginesConfig {
                    registry,
                    upstream: Upstream {
                        host: up.host.clone(),
                        port: up.port,
                        tls: tls.engine_config(),
                        connect_timeout: up.connect_timeout,
                    },
                    admin: AdminLogin {
                        user: up.admin_user.clone(),
                        password,
                        database: up.admin_database.clone(),
                        pool_size: up.pool_size,
                    },
                    login_window: file.lease.login_window,
                    templates: engine_templates,
                },
                rules: Rules {
                    templates,
                    policy: Policy::new(rules),
                    tokens: Arc::new(tokens),
                },
                lease: LeaseSettings {
                    login_window: file.lease.login_window,
                    reap_interval: file.lease.reap_interval,
                    bind_to_svid: file.lease.bind_to_svid,
                    issue_rate_per_identity: file.lease.issue_rate_per_identity,
                    issue_burst_per_identity: file.lease.issue_burst_per_identity,
                },
                admin,
                audit_path: file.audit.path.as_ref().map(|p| base.join(p)),
                audit_statement_queue: file.audit.statement_queue,
                source: None,
            })
        }
        _ => Err(problems.0),
    }
}

/// `[listen]`, and the durations every section shares a ceiling for.
fn listen(file: &FileConfig, problems: &mut Problems) -> Option<SocketAddr> {
    let listen = match file.listen.address.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            problems.add(
                "listen.address",
                format!(
                    "{:?} is not an IP address and port, e.g. \"127.0.0.1:5432\"",
                    file.listen.address
                ),
            );
            None
        }
    };
    problems.at_most_max("listen.handshake_timeout", file.listen.handshake_timeout);
    problems.at_most_max("upstream.connect_timeout", file.upstream.connect_timeout);
    problems.at_most_max("lease.login_window", file.lease.login_window);
    problems.at_most_max("lease.reap_interval", file.lease.reap_interval);
    if file.listen.handshake_timeout.is_zero() {
        problems.add(
            "listen.handshake_timeout",
            "must be longer than 0s, e.g. \"10s\"",
        );
    }

    listen
}
