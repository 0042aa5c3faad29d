//! `ephemera whois` and `ephemera audit`: reading the ledger and the audit
//! log back (`ops::audit_query`), for people who hold a role name from
//! PostgreSQL's log or a lease id from an alert.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ephemera::config::Settings;
use ephemera::ops::audit_query::{self, EventFilter, RoleOwner};
use ephemera_engine::Engine;
use serde_json::Value;
use time::OffsetDateTime;

use super::leases::{format_fields, format_table, format_time};

/// `ephemera whois ROLE`.
pub async fn whois(
    role: String,
    config: Option<PathBuf>,
    audit_log: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let settings = config.as_deref().map(load).transpose()?;
    let mut owners = Vec::new();
    if let Some(settings) = &settings {
        owners = from_ledger(settings, &role).await?;
    }
    let log = audit_log.or_else(|| settings.as_ref().and_then(|s| s.audit_path.clone()));
    if let Some(log) = &log {
        let filter = EventFilter {
            role: Some(role.clone()),
            ..EventFilter::default()
        };
        let (events, _) = audit_query::read_events(log, &filter)?;
        let told = audit_query::owners_from_events(&role, &events);
        merge(&mut owners, told);
    }
    if settings.is_none() && log.is_none() {
        bail!("say where to look: --config (the ledger, and the audit log it names) or --audit-log PATH");
    }
    if owners.is_empty() {
        bail!(
            "no lease of role {role:?} in the ledger{}",
            log.map(|l| format!(" or in {}", l.display()))
                .unwrap_or_default()
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&owners)?);
        return Ok(());
    }
    for (i, owner) in owners.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print!("{}", owner_fields(owner));
    }
    Ok(())
}

fn load(path: &Path) -> anyhow::Result<Settings> {
    Settings::load(path).map_err(|errors| anyhow::anyhow!("{errors}"))
}

/// The role's leases in the database (while it exists): what every
/// replica's reaper reads.
async fn from_ledger(settings: &Settings, role: &str) -> anyhow::Result<Vec<RoleOwner>> {
    let engines = ephemera::engines::Engines::start(&settings.engines)
        .context("cannot start the engines to read the ledger")?;
    let leases = engines
        .list()
        .await
        .context("cannot read the ledger from the database")?;
    Ok(leases
        .into_iter()
        .filter(|l| l.role == role)
        .map(|l| RoleOwner {
            role: l.role,
            lease_id: l.id.to_string(),
            identity: l.identity,
            template: l.template,
            database: l.database,
            client_addr: l.client_addr.map(|a| a.to_string()),
            issued_at: Some(format_time(l.issued_at)),
            expires_at: Some(format_time(l.expires_at)),
            source: "ledger",
            ..RoleOwner::default()
        })
        .collect())
}

/// The ledger's answer, completed by the audit log (client address,
/// subject, end), and the log's leases the ledger no longer has.
fn merge(owners: &mut Vec<RoleOwner>, told: Vec<RoleOwner>) {
    for t in told {
        match owners.iter_mut().find(|o| o.lease_id == t.lease_id) {
            Some(o) => {
                o.client_addr = o.client_addr.take().or(t.client_addr);
                o.subject = o.subject.take().or(t.subject);
            }
            None => owners.push(t),
        }
    }
}

fn owner_fields(o: &RoleOwner) -> String {
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut fields = vec![("role", o.role.clone()), ("identity", o.identity.clone())];
    if let Some(subject) = &o.subject {
        fields.push(("subject", subject.clone()));
    }
    fields.extend([
        ("template", o.template.clone()),
        ("database", o.database.clone()),
        ("client address", or_dash(&o.client_addr)),
        ("lease", o.lease_id.clone()),
        ("issued", or_dash(&o.issued_at)),
        ("expires", or_dash(&o.expires_at)),
    ]);
    if let Some(ended) = &o.ended_at {
        fields.push(("ended", format!("{ended} ({})", or_dash(&o.ended_by))));
    }
    fields.push(("source", o.source.into()));
    format_fields(&fields)
}

/// What `ephemera audit` selects.
pub struct AuditArgs {
    pub config: Option<PathBuf>,
    pub audit_log: Option<PathBuf>,
    pub lease: Option<String>,
    pub identity: Option<String>,
    pub since: Option<String>,
    pub json: bool,
}

/// `ephemera audit`: the events of a lease or an identity.
pub fn audit(args: AuditArgs) -> anyhow::Result<()> {
    let log = match (&args.audit_log, &args.config) {
        (Some(log), _) => log.clone(),
        (None, Some(config)) => load(config)?.audit_path.context(
            "the configuration has no [audit] path: events went to the process log only",
        )?,
        (None, None) => bail!("say which audit log: --audit-log PATH or --config FILE"),
    };
    if args.lease.is_none() && args.identity.is_none() && args.since.is_none() {
        bail!("select events: --lease ID, --identity ID and/or --since TIME");
    }
    let filter = EventFilter {
        lease_id: args.lease,
        identity: args.identity,
        role: None,
        since: args.since.as_deref().map(since).transpose()?,
    };
    let (events, unreadable) = audit_query::read_events(&log, &filter)?;
    if unreadable > 0 {
        eprintln!(
            "ephemera: {unreadable} line(s) of {} are not JSON and were skipped",
            log.display()
        );
    }
    if args.json {
        for event in &events {
            println!("{event}");
        }
        return Ok(());
    }
    print!("{}", event_table(&events));
    Ok(())
}

/// `--since`: an RFC 3339 time, or a duration before now (`90m`, `2d`).
fn since(text: &str) -> anyhow::Result<OffsetDateTime> {
    if let Ok(at) = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339) {
        return Ok(at);
    }
    let ago = humantime::parse_duration(text).with_context(|| {
        format!("--since {text:?}: give an RFC 3339 time (2026-12-01T09:00:00Z) or a duration (90m, 2d)")
    })?;
    Ok(OffsetDateTime::now_utc() - ago)
}

fn event_table(events: &[Value]) -> String {
    let s = |e: &Value, k: &str| e[k].as_str().unwrap_or("").to_owned();
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            let detail = match e["event"].as_str() {
                Some("statement") => {
                    let outcome = e["command_tag"]
                        .as_str()
                        .or(e["sqlstate"].as_str())
                        .unwrap_or_else(|| e["outcome"].as_str().unwrap_or(""));
                    format!("{} → {outcome}", one_line(&s(e, "statement")))
                }
                _ => one_line(&s(e, "reason")),
            };
            vec![
                s(e, "time"),
                s(e, "event"),
                s(e, "lease_id"),
                s(e, "identity"),
                detail,
            ]
        })
        .collect();
    format_table(&["TIME", "EVENT", "LEASE", "IDENTITY", "DETAIL"], &rows)
}

/// A statement on one line of a table, cut at 120 characters.
fn one_line(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(120) {
        Some((at, _)) => format!("{}…", &flat[..at]),
        None => flat,
    }
}
