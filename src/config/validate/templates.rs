//! `[templates.<name>]`: the proxy's keys (engine, database, ttl,
//! max_ttl) checked here; the rest handed to the template's engine, which
//! checks its own.

use std::collections::BTreeMap;

use ephemera_engine::Template;

use crate::config::problems::Problems;
use crate::config::schema::TemplateSection;
use crate::config::{AuditOverflow, PoolSettings, StatementAuditSettings, TemplateSettings};
use crate::engines::{EngineRegistry, EngineTemplates};

/// Split each template's table between the proxy's keys and its engine's,
/// and have the engine check its part. Problems carry full key paths.
pub(super) fn templates(
    tables: &BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
    registry: &EngineRegistry,
    problems: &mut Problems,
) -> (BTreeMap<String, TemplateSettings>, EngineTemplates) {
    let mut settings = BTreeMap::new();
    let mut engine_templates = Vec::new();
    if tables.is_empty() {
        problems.add(
            "templates",
            "define at least one role template, e.g. [templates.app_rw]",
        );
    }
    for (name, table) in tables {
        let key = format!("templates.{name}");
        let at = |sub: &str| {
            if sub.is_empty() {
                key.clone()
            } else {
                format!("{key}.{sub}")
            }
        };
        let (own, engine_keys): (serde_json::Map<_, _>, serde_json::Map<_, _>) = table
            .clone()
            .into_iter()
            .partition(|(k, _)| TemplateSection::KEYS.contains(&k.as_str()));
        let t: TemplateSection =
            match ephemera_engine::keys::from_keys(serde_json::Value::Object(own)) {
                Ok(t) => t,
                Err(problem) => {
                    problems.add(at(&problem.key), problem.message);
                    continue;
                }
            };
        lifetimes(&t, &at, problems);
        let Some(kind) = registry.get(&t.engine) else {
            problems.add(
                at("engine"),
                format!(
                    "no engine named {:?}; use one of {:?}",
                    t.engine,
                    registry.names()
                ),
            );
            continue;
        };
        match kind.template(name, &t.database, engine_keys) {
            Ok(spec) => engine_templates.push((
                kind.name(),
                Template {
                    name: name.clone(),
                    database: t.database.clone(),
                    spec,
                },
            )),
            Err(engine_problems) => {
                for problem in engine_problems {
                    problems.add(at(&problem.key), problem.message);
                }
            }
        }
        let statement_audit = statement_audit(&t, &at, problems);
        let pool = pool(&t, table, kind.pools(), &at, problems);
        settings.insert(
            name.clone(),
            TemplateSettings {
                database: t.database,
                ttl: t.ttl,
                max_ttl: t.max_ttl,
                statement_audit,
                pool,
            },
        );
    }
    (
        settings,
        EngineTemplates {
            templates: engine_templates,
        },
    )
}

/// `database`, `ttl` and `max_ttl`.
fn lifetimes(t: &TemplateSection, at: &dyn Fn(&str) -> String, problems: &mut Problems) {
    if t.database.is_empty() {
        problems.add(
            at("database"),
            "must name the database sessions of this template use",
        );
    }
    if t.ttl.is_zero() {
        problems.add(at("ttl"), "must be longer than 0s, e.g. \"15m\"");
    }
    problems.at_most_max(at("ttl"), t.ttl);
    problems.at_most_max(at("max_ttl"), t.max_ttl);
    if t.max_ttl < t.ttl {
        problems.add(
            at("max_ttl"),
            format!(
                "must be at least ttl ({}), e.g. \"1h\"",
                humantime::format_duration(t.ttl)
            ),
        );
    }
}

/// Statements longer than this cannot be kept whole in an event (a line
/// of the audit log): 1 MiB.
const MAX_AUDIT_STATEMENT_BYTES: usize = 1 << 20;

/// `audit_statements` and its companions; `None` when it is off.
fn statement_audit(
    t: &TemplateSection,
    at: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> Option<StatementAuditSettings> {
    let overflow = match t.audit_overflow.as_str() {
        "block" => AuditOverflow::Block,
        "drop" => AuditOverflow::Drop,
        other => {
            problems.add(
                at("audit_overflow"),
                format!("{other:?} is not an overflow rule; use \"block\" (sessions wait for the audit log) or \"drop\" (events are dropped and counted)"),
            );
            AuditOverflow::Block
        }
    };
    if !(16..=MAX_AUDIT_STATEMENT_BYTES).contains(&t.audit_statement_max_bytes) {
        problems.add(
            at("audit_statement_max_bytes"),
            format!("must be between 16 and {MAX_AUDIT_STATEMENT_BYTES}, e.g. 4096"),
        );
    }
    t.audit_statements.then_some(StatementAuditSettings {
        max_bytes: t.audit_statement_max_bytes,
        parameters: t.audit_parameters,
        overflow,
    })
}

/// The largest `pool_size`: PostgreSQL's `max_connections` cannot be
/// larger (262 143), and far fewer make sense for one identity.
const MAX_POOL_SIZE: u32 = 10_000;

/// `pool` and its companions; `None` for `pool = "none"`. The other pool
/// keys are refused without `pool = "session"` (they would do nothing).
fn pool(
    t: &TemplateSection,
    table: &serde_json::Map<String, serde_json::Value>,
    engine_pools: bool,
    at: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> Option<PoolSettings> {
    const COMPANIONS: [&str; 4] = ["pool_size", "pool_idle_timeout", "pool_wait", "reset_query"];
    match t.pool.as_str() {
        "session" => {}
        "none" => {
            for key in COMPANIONS.iter().filter(|k| table.contains_key(**k)) {
                problems.add(
                    at(key),
                    "only applies to pooled templates: add pool = \"session\" or remove it",
                );
            }
            return None;
        }
        other => {
            problems.add(
                at("pool"),
                format!("{other:?} is not a pool mode; use \"none\" (a role per connection, the default) or \"session\" (one role per identity, backends reused after a reset)"),
            );
            return None;
        }
    }
    if !engine_pools {
        problems.add(
            at("pool"),
            format!("the {:?} engine cannot pool leases; remove pool or use an engine that can (engine = \"postgres\")", t.engine),
        );
    }
    if !(1..=MAX_POOL_SIZE).contains(&t.pool_size) {
        problems.add(
            at("pool_size"),
            format!("must be between 1 and {MAX_POOL_SIZE}, e.g. 10"),
        );
    }
    if t.pool_idle_timeout.is_zero() {
        problems.add(
            at("pool_idle_timeout"),
            "must be longer than 0s, e.g. \"30s\"",
        );
    }
    problems.at_most_max(at("pool_idle_timeout"), t.pool_idle_timeout);
    problems.at_most_max(at("pool_wait"), t.pool_wait);
    if t.reset_query.trim().is_empty() || t.reset_query.contains('\0') {
        problems.add(
            at("reset_query"),
            "must be a statement that clears a session, e.g. \"DISCARD ALL\" (the default)",
        );
    }
    Some(PoolSettings {
        size: t.pool_size.max(1),
        idle_timeout: t.pool_idle_timeout,
        wait: t.pool_wait,
        reset_query: t.reset_query.clone(),
    })
}
