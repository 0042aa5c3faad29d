//! `[upstream]`: where PostgreSQL is, how to reach it, and the admin login.

use std::path::Path;

use std::sync::Arc;

use ephemera_engine::{LoginCa, LoginCaError, Password, UpstreamLoginMethod};

use super::files::{is_unix_socket_dir, load_certs, read_secret_file};
use crate::config::problems::Problems;
use crate::config::schema::FileConfig;
use crate::tls::upstream::{SslMode, UpstreamTls};

/// What `[upstream]` validates into; `None` where a problem was recorded.
pub(super) struct Validated {
    pub tls: Option<UpstreamTls>,
    pub admin_password: Option<Password>,
    pub login: Option<UpstreamLoginMethod>,
}

/// The TLS towards the upstream, the admin password and how sessions log
/// in; `None` where a problem was recorded.
pub(super) fn upstream(file: &FileConfig, base: &Path, problems: &mut Problems) -> Validated {
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
    let login = login(file, base, sslmode, problems);
    Validated {
        tls: upstream_tls,
        admin_password,
        login,
    }
}

/// `upstream.login`, and for `"certificate"` the login CA: both files
/// readable, a CA certificate and its own key.
fn login(
    file: &FileConfig,
    base: &Path,
    sslmode: Option<SslMode>,
    problems: &mut Problems,
) -> Option<UpstreamLoginMethod> {
    let up = &file.upstream;
    match up.login.as_str() {
        "scram" => {
            for (key, value) in [
                ("upstream.login_ca_cert", &up.login_ca_cert),
                ("upstream.login_ca_key", &up.login_ca_key),
            ] {
                if !value.is_empty() {
                    problems.add(
                        key,
                        "is only used with upstream.login = \"certificate\"; remove it or set login",
                    );
                }
            }
            return Some(UpstreamLoginMethod::Scram);
        }
        "certificate" => {}
        other => {
            problems.add(
                "upstream.login",
                format!("{other:?} is not one of \"scram\", \"certificate\""),
            );
            return None;
        }
    }
    if sslmode == Some(SslMode::Disable) {
        problems.add(
            "upstream.login",
            "\"certificate\" logs in with a TLS client certificate: set upstream.sslmode to \
             \"verify-full\" (or \"require\") and use a TCP host",
        );
    }
    let cert = read_login_file(base, &up.login_ca_cert, "upstream.login_ca_cert", problems);
    let key = read_login_file(base, &up.login_ca_key, "upstream.login_ca_key", problems);
    let (cert, key) = (cert?, key?);
    match LoginCa::from_pem(&cert, &key) {
        Ok(ca) => Some(UpstreamLoginMethod::Certificate(Arc::new(ca))),
        Err(e) => {
            let key = match e {
                LoginCaError::BadKey(_) | LoginCaError::KeyMismatch => "upstream.login_ca_key",
                _ => "upstream.login_ca_cert",
            };
            problems.add(key, e.to_string());
            None
        }
    }
}

fn read_login_file(base: &Path, file: &str, key: &str, problems: &mut Problems) -> Option<String> {
    if file.is_empty() {
        problems.add(
            key,
            "upstream.login = \"certificate\" needs the login CA (the CA in PostgreSQL's \
             ssl_ca_file): its certificate in login_ca_cert and its key in login_ca_key (PEM paths)",
        );
        return None;
    }
    let path = base.join(file);
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(e) => {
            problems.add(key, format!("cannot read {}: {e}", path.display()));
            None
        }
    }
}
