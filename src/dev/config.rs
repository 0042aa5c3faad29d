//! The configuration `ephemera dev` writes at every start.

use super::options::{DevOptions, DEMO_DATABASE};
use super::pki::{JOB, TRUST_DOMAIN};
use super::tokens::{DEV_AUDIENCE, DEV_ISSUER, DEV_SUBJECT};
use super::upstream::Upstream;

/// `config.toml` for the proxy in front of `upstream`.
pub(super) fn config_toml(options: &DevOptions, upstream: &Upstream) -> String {
    let Upstream {
        host,
        port,
        admin_user,
        sslmode,
        ..
    } = upstream;
    format!(
        r#"# Written by `ephemera dev` at every start; edit a copy for real use.
[listen]
address = "{listen}"

[tls]
cert = "certs/server.pem"
key = "certs/server-key.pem"
trust_bundle = "certs/ca.pem"
trust_domains = ["{TRUST_DOMAIN}"]

[upstream]
host = "{host}"
port = {port}
admin_database = "postgres"
admin_user = "{admin_user}"
admin_password_file = "secrets/admin-password"
sslmode = "{sslmode}"
ca = "{ca}"

[lease]
login_window = "60s"
reap_interval = "10s"

[admin]
listen = "{admin_listen}"
identities = ["spiffe://{TRUST_DOMAIN}/ops/**"]

[audit]
path = "audit.jsonl"

[templates.app_rw]
database = "{DEMO_DATABASE}"
member_of = ["app_rw"]
owner = "app_owner"
ttl = "15m"
max_ttl = "1h"

[templates.nightly]
database = "{DEMO_DATABASE}"
member_of = ["app_rw"]
ttl = "5m"
max_ttl = "2h"

[[policy]]
spiffe_id = "spiffe://{TRUST_DOMAIN}/app/*"
templates = ["app_rw"]

[[policy]]
spiffe_id = "{job}"
templates = ["nightly"]

# The dev issuer: `ephemera dev` writes its JWKS at every start and prints a
# token for it (PGPASSWORD=<token> psql …, no client certificate).
[[tokens.issuer]]
name = "dev"
issuer = "{DEV_ISSUER}"
audience = "{DEV_AUDIENCE}"
jwks_file = "tokens/jwks.json"

[[policy]]
token_issuer = "dev"
claims = {{ sub = "{DEV_SUBJECT}" }}
templates = ["app_rw"]
"#,
        listen = options.listen,
        admin_listen = options.admin_listen,
        ca = if *sslmode == "verify-full" {
            "certs/ca.pem"
        } else {
            ""
        },
        job = JOB.spiffe_id,
    )
}
