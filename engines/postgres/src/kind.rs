//! The postgres engine as the proxy registers it: its template keys, how it
//! starts, and its preflight.

use std::sync::Arc;

use async_trait::async_trait;
use ephemera_engine::keys::from_keys;
use ephemera_engine::{
    Engine, EngineError, EngineKind, EngineSetup, KeyProblem, Preflight, TemplateKeys, TemplateSpec,
};
use serde::Deserialize;

use crate::template::{check_template_name, RoleTemplate};
use crate::{PostgresEngine, NAME};

/// `engine = "postgres"` (the default): a fresh role per lease.
#[derive(Debug, Default, Clone, Copy)]
pub struct PostgresKind;

/// The postgres engine's keys of `[templates.<name>]`. Keep these names:
/// DBAs write against them (docs/templates.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateKeysV1 {
    #[serde(default)]
    member_of: Vec<String>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    creation_statements: Vec<String>,
    #[serde(default)]
    revocation_statements: Vec<String>,
    /// With `owner`: hand the session's large objects over instead of
    /// removing them.
    #[serde(default)]
    keep_large_objects: bool,
}

#[async_trait]
impl EngineKind for PostgresKind {
    fn name(&self) -> &'static str {
        NAME
    }

    /// A pooled lease is one role with `CONNECTION LIMIT pool_size`, its
    /// login window opened again for each new backend.
    fn pools(&self) -> bool {
        true
    }

    fn template(
        &self,
        name: &str,
        database: &str,
        keys: TemplateKeys,
    ) -> Result<TemplateSpec, Vec<KeyProblem>> {
        let mut problems = Vec::new();
        if let Err(reason) = check_template_name(name) {
            problems.push(KeyProblem::new("", reason));
        }
        let keys: TemplateKeysV1 = match from_keys(serde_json::Value::Object(keys)) {
            Ok(keys) => keys,
            Err(problem) => {
                problems.push(problem);
                return Err(problems);
            }
        };
        for (i, group) in keys.member_of.iter().enumerate() {
            if group.is_empty() || group.contains('\0') {
                problems.push(KeyProblem::new(
                    format!("member_of[{i}]"),
                    "must be a group role name",
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(TemplateSpec::new(RoleTemplate {
            name: name.to_owned(),
            database: database.to_owned(),
            member_of: keys.member_of,
            owner: keys.owner.filter(|o| !o.is_empty()),
            creation_statements: keys.creation_statements,
            revocation_statements: keys.revocation_statements,
            keep_large_objects: keys.keep_large_objects,
        }))
    }

    fn start(&self, setup: EngineSetup) -> Result<Arc<dyn Engine>, EngineError> {
        Ok(Arc::new(PostgresEngine::new(setup)?))
    }

    async fn preflight(&self, setup: &EngineSetup) -> Preflight {
        crate::preflight::preflight(setup).await
    }
}
