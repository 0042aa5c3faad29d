//! `[templates.<name>]`: the proxy's keys (engine, database, ttl,
//! max_ttl) checked here; the rest handed to the template's engine, which
//! checks its own.

use std::collections::BTreeMap;

use ephemera_engine::Template;

use crate::config::problems::Problems;
use crate::config::schema::TemplateSection;
use crate::config::{AuditOverflow, StatementAuditSettings, TemplateSettings};
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
        settings.insert(
            name.clone(),
            TemplateSettings {
                database: t.database,
                ttl: t.ttl,
                max_ttl: t.max_ttl,
                statement_audit,
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
    t.audit_statements.then(|| StatementAuditSettings {
        max_bytes: t.audit_statement_max_bytes,
        parameters: t.audit_parameters,
        overflow,
    })
}
