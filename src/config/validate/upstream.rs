//! `[upstream]`: where PostgreSQL is, how to reach it, and the admin login.

use std::path::Path;

use ephemera_engine::Password;

use super::files::{is_unix_socket_dir, load_certs, read_secret_file};
use crate::config::problems::Problems;
use crate::config::schema::FileConfig;
use crate::tls::upstream::{SslMode, UpstreamTls};

/// The TLS towards the upstream and the admin password; `None` where a
/// problem was recorded.
pub(super) fn upstream(
    file: &FileConfig,
    base: &Path,
    problems: &mut Problems,
) -> (Option<UpstreamTls>, Option<Password>) {
    // -- upstream --
    let up = &file.upstream;
    let sslmode = match up.sslmode.as_str() {
        "disable" => Some(SslMode::Disable),
        "require" => Some(SslMode::Require),
        "verify-full" => Some(SslMode::VerifyFull),
        other => {
            problems.add(
                "upstream.sslmode",
                format!("{other:?} is not one of \"disable\", \"require\", \"verify-full\""),
            );
            None
        }
    };
    if is_unix_socket_dir(&up.host) && matches!(sslmode, Some(m) if m != SslMode::Disable) {
        problems.add(
            "upstream.sslmode",
            format!(
                "upstream.host {:?} is a Unix-domain socket directory, where PostgreSQL \
                 offers no TLS: set sslmode = \"disable\" (the socket file's permissions \
                 guard it), or use a TCP host name",
                up.host
            ),
        );
    }
    let upstream_ca = if up.ca.is_empty() {
        if sslmode == Some(SslMode::VerifyFull) {
            problems.add(
                "upstream.ca",
                "sslmode = \"verify-full\" needs the upstream's CA certificate (PEM path)",
            );
            None
        } else {
            Some(Vec::new())
        }
    } else {
        load_certs(&base.join(&up.ca), "upstream.ca", problems)
    };
    let upstream_tls = match (sslmode, upstream_ca) {
        (Some(mode), Some(ca)) => match UpstreamTls::new(mode, &ca) {
            Ok(tls) => Some(tls),
            Err(e) => {
                problems.add("upstream.ca", e.to_string());
                None
            }
        },
        _ => None,
    };
    let admin_password = read_secret_file(
        &base.join(&up.admin_password_file),
        "upstream.admin_password_file",
        problems,
    );
    if up.pool_size == 0 {
        problems.add("upstream.pool_size", "must be at least 1");
    }
    if up.host.is_empty() {
        problems.add("upstream.host", "must name the upstream PostgreSQL host");
    }
    if up.port == 0 {
        problems.add(
            "upstream.port",
            "must be the upstream PostgreSQL port, e.g. 5432",
        );
    }

    (upstream_tls, admin_password)
}
