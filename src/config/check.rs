//! `ephemera check-config --connect`: what only the upstream can tell.
//!
//! Each engine in use runs its own preflight (for the postgres engine: can
//! the admin log in, CREATEROLE, the reaper election's schema, the
//! templates' databases, groups and owners). Every problem comes back with
//! the key it concerns and what to do. With `[tls] workload_api`, the
//! SPIFFE Workload API is asked once too, and what it sent is reported.

use ephemera_engine::KeyProblem;

use std::time::Duration;

use crate::config::{ConfigProblem, FrontTls, Settings};
use crate::identity::workload_api::{fetch_once, X509Material};

/// How long `--connect` waits for the Workload API's first answer.
const WORKLOAD_API_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// What `--connect` found: problems fail the check, warnings do not.
#[derive(Debug, Default)]
pub struct UpstreamCheck {
    pub problems: Vec<ConfigProblem>,
    pub warnings: Vec<ConfigProblem>,
    /// What was found, for the operator (e.g. the Workload API's SVID).
    pub notes: Vec<String>,
}

fn problems(found: Vec<KeyProblem>) -> impl Iterator<Item = ConfigProblem> {
    found.into_iter().map(|p| ConfigProblem {
        key: p.key,
        message: p.message,
    })
}

/// Run the preflight of every engine that has templates.
pub async fn check_upstream(settings: &Settings) -> UpstreamCheck {
    let engines = &settings.engines;
    let mut check = UpstreamCheck::default();
    for name in engines.with_templates() {
        let Some(kind) = engines.registry.get(name) else {
            continue;
        };
        let found = kind.preflight(&engines.setup(name)).await;
        check.problems.extend(problems(found.problems));
        check.warnings.extend(problems(found.warnings));
    }
    if let FrontTls::WorkloadApi { endpoint } = &settings.front_tls {
        match fetch_once(endpoint, WORKLOAD_API_CHECK_TIMEOUT).await {
            Ok(x509) => check.notes.push(describe(endpoint, &x509)),
            Err(e) => check.problems.push(ConfigProblem {
                key: "tls.workload_api".into(),
                message: e.to_string(),
            }),
        }
    }
    check
}

/// One line: whose SVID, until when, which trust domains' bundles.
fn describe(endpoint: &str, x509: &X509Material) -> String {
    let federated: Vec<&str> = x509.federated().map(|(td, _)| td).collect();
    format!(
        "tls.workload_api: {endpoint}: X.509-SVID {} (expires {}), trust domain {} ({} CA(s)), federated trust domains: {}",
        x509.svid.spiffe_id,
        humantime::format_rfc3339_seconds(x509.svid.not_after),
        x509.trust_domain(),
        x509.bundle(x509.trust_domain()).map_or(0, <[_]>::len),
        if federated.is_empty() {
            "none".to_owned()
        } else {
            federated.join(", ")
        }
    )
}
