//! `[admin]`: the admin API's listener, who may use it, and its TLS.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;

use super::files::{clone_identity, ServerIdentity};
use crate::config::problems::Problems;
use crate::config::schema::FileConfig;
use crate::config::AdminSettings;
use crate::policy::IdPattern;
use crate::tls::server_config::{admin_config, AdminClients};

pub(super) fn admin(
    file: &FileConfig,
    from_workload_api: bool,
    bundle: Option<&[CertificateDer<'static>]>,
    server_identity: &Option<ServerIdentity>,
    provider: &Arc<CryptoProvider>,
    problems: &mut Problems,
) -> Option<AdminSettings> {
    // -- admin API --
    let admin = file.admin.as_ref().and_then(|admin| {
        let listen = match admin.listen.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                problems.add(
                    "admin.listen",
                    format!(
                        "{:?} is not an IP address and port, e.g. \"127.0.0.1:8443\"",
                        admin.listen
                    ),
                );
                None
            }
        };
        if admin.identities.is_empty() {
            problems.add(
                "admin.identities",
                "list the SPIFFE IDs (patterns) allowed to administer leases",
            );
        }
        let mut identities = Vec::new();
        for (i, pattern) in admin.identities.iter().enumerate() {
            match IdPattern::parse(pattern) {
                Ok(p) => identities.push(p),
                Err(e) => problems.add(
                    format!("admin.identities[{i}]"),
                    format!("{pattern:?} is not a SPIFFE ID pattern: {e}"),
                ),
            }
        }
        // With the Workload API, the admin API's TLS is built from each
        // update, like the listener's.
        let clients = AdminClients::for_tokens(!file.tokens.issuer.is_empty());
        let tls = if from_workload_api {
            None
        } else {
            let (chain, key) = clone_identity(server_identity)?;
            let tls = admin_config(bundle?, chain, key, clients, provider.clone())
                .map_err(|e| {
                    problems.add("admin", format!("cannot set up TLS for the admin API: {e}"))
                })
                .ok()?;
            Some(tls)
        };
        Some(AdminSettings {
            listen: listen?,
            identities,
            tls,
        })
    });

    admin
}
