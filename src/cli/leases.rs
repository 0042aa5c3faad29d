//! `ephemera leases …`, `ephemera revoke …` and `ephemera creds …`: the admin
//! API from the command line, through [`AdminClient`](ephemera::admin::client::AdminClient).
//!
//! Output is a human-readable table or `key: value` lines, or with `--json`
//! the API's JSON exactly as the [`ephemera::admin::api`] types serialise it.
//! The formatting is done by small pure functions (tested below) so the
//! commands stay free of layout code.

use std::io::{self, Write};

use anyhow::Context;
use ephemera::admin::api::{Credentials, LeaseFilter, LeaseList, LeaseView, RevokeResponse};
use ephemera_engine::LeaseState;
use serde::Serialize;
use time::format_description::FormatItem;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

use super::args::{AdminArgs, CredsArgs, LeasesCommand, RevokeArgs};

// ----- the commands ------------------------------------------------------------

/// `ephemera leases list|show|renew|revoke`.
pub async fn leases(args: AdminArgs, cmd: LeasesCommand) -> anyhow::Result<()> {
    let client = args.client()?;
    let text = match cmd {
        LeasesCommand::List {
            identity,
            template,
            state,
        } => {
            let filter = LeaseFilter {
                identity,
                template,
                state: state.map(LeaseState::from),
            };
            let leases = client.list_leases(&filter).await?;
            if args.json {
                to_json(&LeaseList { leases })?
            } else {
                format_lease_table(&leases)
            }
        }
        LeasesCommand::Show { id } => lease_output(&args, &client.show_lease(id).await?)?,
        LeasesCommand::Renew { id, ttl } => {
            lease_output(&args, &client.renew_lease(id, ttl).await?)?
        }
        LeasesCommand::Revoke { id } => lease_output(&args, &client.revoke_lease(id).await?)?,
    };
    emit(&text)
}

/// `ephemera revoke --identity|--identity-prefix|--template`.
pub async fn revoke(args: AdminArgs, r: RevokeArgs) -> anyhow::Result<()> {
    let client = args.client()?;
    let response = client.revoke(r.into()).await?;
    let text = if args.json {
        to_json(&response)?
    } else {
        format_revoked(&response)
    };
    emit(&text)
}

/// `ephemera creds TEMPLATE`. Prints the password: that is what it is for.
pub async fn creds(args: AdminArgs, c: CredsArgs) -> anyhow::Result<()> {
    let client = args.client()?;
    let credentials = client.creds(&c.template).await?;
    let text = if args.json {
        to_json(&credentials)?
    } else {
        format_credentials(&credentials)
    };
    emit(&text)
}

fn lease_output(args: &AdminArgs, lease: &LeaseView) -> anyhow::Result<String> {
    if args.json {
        to_json(lease)
    } else {
        Ok(format_lease_details(lease))
    }
}

/// Pretty JSON of an API type, newline-terminated.
fn to_json<T: Serialize>(value: &T) -> anyhow::Result<String> {
    let mut text = serde_json::to_string_pretty(value).context("cannot encode the answer")?;
    text.push('\n');
    Ok(text)
}

/// Writes to stdout; a closed pipe (`ephemera leases list | head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to standard output")
        }
        _ => Ok(()),
    }
}

// ----- formatting (pure) -----------------------------------------------------------

/// Timestamps in tables: UTC, to the second.
const TIMESTAMP: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");

pub(super) fn format_time(at: OffsetDateTime) -> String {
    at.to_offset(UtcOffset::UTC)
        .format(TIMESTAMP)
        .unwrap_or_else(|_| at.to_string())
}

/// An API enum as it is spelt in JSON (`active`, `session`).
fn json_name<T: Serialize + std::fmt::Debug>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{value:?}").to_lowercase(),
    }
}

/// Left-aligned columns separated by two spaces; the last column is not
/// padded, so lines carry no trailing spaces.
pub(super) fn format_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `key: value` lines with the values aligned.
pub(super) fn format_fields(fields: &[(&str, String)]) -> String {
    let width = fields
        .iter()
        .map(|(key, _)| key.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (key, value) in fields {
        let pad = width - key.chars().count();
        out.push_str(&format!("{key}:{}  {value}\n", " ".repeat(pad)));
    }
    out
}

/// The `leases list` table.
fn format_lease_table(leases: &[LeaseView]) -> String {
    if leases.is_empty() {
        return "no leases\n".to_owned();
    }
    let rows: Vec<Vec<String>> = leases
        .iter()
        .map(|lease| {
            vec![
                lease.id.to_string(),
                json_name(&lease.state),
                lease.template.clone(),
                lease.role.clone(),
                lease.identity.clone(),
                format_time(lease.expires_at),
            ]
        })
        .collect();
    format_table(
        &["ID", "STATE", "TEMPLATE", "ROLE", "IDENTITY", "EXPIRES"],
        &rows,
    )
}

/// `leases show|renew|revoke`: every field, named as in the JSON (`subject`
/// only for an agent acting for a person).
fn format_lease_details(lease: &LeaseView) -> String {
    let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
    let mut fields = vec![
        ("id", lease.id.to_string()),
        ("state", json_name(&lease.state)),
        ("kind", json_name(&lease.kind)),
        ("engine", lease.engine.clone()),
        ("template", lease.template.clone()),
        ("role", lease.role.clone()),
        ("identity", lease.identity.clone()),
        ("database", lease.database.clone()),
        ("client_addr", or_dash(lease.client_addr.clone())),
        ("issued_at", format_time(lease.issued_at)),
        ("expires_at", format_time(lease.expires_at)),
        ("max_expires_at", format_time(lease.max_expires_at)),
        ("ended_at", or_dash(lease.ended_at.map(format_time))),
        ("end_reason", or_dash(lease.end_reason.clone())),
    ];
    if let Some(subject) = &lease.subject {
        fields.insert(7, ("subject", subject.clone()));
    }
    format_fields(&fields)
}

fn format_revoked(response: &RevokeResponse) -> String {
    format!("revoked {} lease(s)\n", response.revoked)
}

/// `creds`: the credentials and a ready-to-paste psql command.
fn format_credentials(credentials: &Credentials) -> String {
    let mut out = format_fields(&[
        ("lease_id", credentials.lease_id.to_string()),
        ("username", credentials.username.clone()),
        ("password", credentials.password.clone()),
        ("host", credentials.host.clone()),
        ("port", credentials.port.to_string()),
        ("database", credentials.database.clone()),
        ("expires_at", format_time(credentials.expires_at)),
    ]);
    out.push_str("\nconnect with:\n  ");
    out.push_str(&psql_command(credentials));
    out.push('\n');
    out
}

/// `PGPASSWORD=… psql '…'` for a POSIX shell. The password goes in the
/// environment rather than the connection string so it does not show up
/// in other users' `ps`.
fn psql_command(credentials: &Credentials) -> String {
    let conninfo = [
        ("host", credentials.host.as_str()),
        ("port", &credentials.port.to_string()),
        ("dbname", credentials.database.as_str()),
        ("user", credentials.username.as_str()),
    ]
    .iter()
    .map(|(key, value)| format!("{key}={}", libpq_quote(value)))
    .collect::<Vec<_>>()
    .join(" ");
    format!(
        "PGPASSWORD={} psql {}",
        shell_quote(&credentials.password),
        shell_quote(&conninfo)
    )
}

/// A libpq connection-string value: bare if safe, else single-quoted with
/// `\` and `'` escaped by a backslash.
fn libpq_quote(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\' || c == '=');
    if plain {
        return value.to_owned();
    }
    let mut out = String::from("'");
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// A POSIX shell word: single-quoted, with `'` written as `'\''`.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use ephemera_engine::LeaseKind;
    use time::macros::datetime;

    use super::*;

    const ID: &str = "6f1c2b1e-3c4d-4e5f-8a9b-0c1d2e3f4a5b";

    fn lease(identity: &str, role: &str) -> LeaseView {
        LeaseView {
            id: ID.parse().unwrap(),
            engine: "postgres".into(),
            kind: LeaseKind::Session,
            template: "billing_rw".into(),
            role: role.into(),
            identity: identity.into(),
            subject: None,
            database: "billing".into(),
            client_addr: Some("10.1.2.3:51000".into()),
            issued_at: datetime!(2025-01-02 03:04:05.123 UTC),
            expires_at: datetime!(2025-01-02 03:14:05 UTC),
            max_expires_at: datetime!(2025-01-02 11:04:05 UTC),
            state: LeaseState::Active,
            ended_at: None,
            end_reason: None,
        }
    }

    fn credentials(password: &str) -> Credentials {
        Credentials {
            lease_id: ID.parse().unwrap(),
            username: "eph_report_ro_x1y2".into(),
            password: password.into(),
            host: "db.example.org".into(),
            port: 5432,
            database: "reports".into(),
            // A non-UTC offset: shown in UTC.
            expires_at: datetime!(2025-01-02 05:00:00 +02:00),
        }
    }

    // ----- formatting ----------------------------------------------------------------

    #[test]
    fn tables_are_aligned_without_trailing_spaces() {
        let table = format_table(
            &["A", "LONG HEADER", "C"],
            &[
                vec!["wide cell".into(), "x".into(), "".into()],
                vec!["é".into(), "y".into(), "last".into()],
            ],
        );
        assert_eq!(
            table,
            "A          LONG HEADER  C\n\
             wide cell  x\n\
             é          y            last\n"
        );
    }

    #[test]
    fn lease_table() {
        let leases = [
            lease(
                "spiffe://example.org/ns/prod/sa/api",
                "eph_billing_rw_a1b2c3",
            ),
            lease(
                "spiffe://example.org/ns/prod/sa/batch-job",
                "eph_billing_rw_d4",
            ),
        ];
        let id = ID;
        assert_eq!(
            format_lease_table(&leases),
            format!(
                "ID                                    STATE   TEMPLATE    ROLE                   IDENTITY                                   EXPIRES\n\
                 {id}  active  billing_rw  eph_billing_rw_a1b2c3  spiffe://example.org/ns/prod/sa/api        2025-01-02T03:14:05Z\n\
                 {id}  active  billing_rw  eph_billing_rw_d4      spiffe://example.org/ns/prod/sa/batch-job  2025-01-02T03:14:05Z\n"
            )
        );
        assert_eq!(format_lease_table(&[]), "no leases\n");
    }

    #[test]
    fn lease_details() {
        let mut ended = lease(
            "spiffe://example.org/ns/prod/sa/api",
            "eph_billing_rw_a1b2c3",
        );
        ended.state = LeaseState::Revoked;
        ended.ended_at = Some(datetime!(2025-01-02 03:10:00 UTC));
        ended.end_reason = Some("revoked by spiffe://example.org/ns/ops/sa/admin".into());
        ended.client_addr = None;
        assert_eq!(
            format_lease_details(&ended),
            format!(
                "id:              {ID}\n\
                 state:           revoked\n\
                 kind:            session\n\
                 engine:          postgres\n\
                 template:        billing_rw\n\
                 role:            eph_billing_rw_a1b2c3\n\
                 identity:        spiffe://example.org/ns/prod/sa/api\n\
                 database:        billing\n\
                 client_addr:     -\n\
                 issued_at:       2025-01-02T03:04:05Z\n\
                 expires_at:      2025-01-02T03:14:05Z\n\
                 max_expires_at:  2025-01-02T11:04:05Z\n\
                 ended_at:        2025-01-02T03:10:00Z\n\
                 end_reason:      revoked by spiffe://example.org/ns/ops/sa/admin\n"
            )
        );
    }

    #[test]
    fn revoked_count() {
        assert_eq!(
            format_revoked(&RevokeResponse { revoked: 3 }),
            "revoked 3 lease(s)\n"
        );
    }

    #[test]
    fn credentials_with_a_psql_hint() {
        assert_eq!(
            format_credentials(&credentials("s3cr3t-Pa55")),
            format!(
                "lease_id:    {ID}\n\
                 username:    eph_report_ro_x1y2\n\
                 password:    s3cr3t-Pa55\n\
                 host:        db.example.org\n\
                 port:        5432\n\
                 database:    reports\n\
                 expires_at:  2025-01-02T03:00:00Z\n\
                 \n\
                 connect with:\n  \
                 PGPASSWORD='s3cr3t-Pa55' psql 'host=db.example.org port=5432 dbname=reports user=eph_report_ro_x1y2'\n"
            )
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(libpq_quote("billing"), "billing");
        assert_eq!(libpq_quote(""), "''");
        assert_eq!(libpq_quote("my db"), "'my db'");
        assert_eq!(libpq_quote(r"it's a\b"), r"'it\'s a\\b'");
        assert_eq!(shell_quote("a'b $x"), r"'a'\''b $x'");

        let mut odd = credentials("p'w $(x)");
        odd.database = "my db".into();
        assert_eq!(
            psql_command(&odd),
            r"PGPASSWORD='p'\''w $(x)' psql 'host=db.example.org port=5432 dbname='\''my db'\'' user=eph_report_ro_x1y2'"
        );
    }

    #[test]
    fn json_output_is_the_api_serialisation() {
        let creds = credentials("pw");
        let text = to_json(&creds).unwrap();
        assert!(text.ends_with('\n'));
        let back: Credentials = serde_json::from_str(&text).unwrap();
        assert_eq!(back, creds);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            serde_json::to_value(&creds).unwrap()
        );
    }
}
