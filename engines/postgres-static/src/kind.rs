//! The postgres-static engine as the proxy registers it: its template keys,
//! how it starts, and its preflight.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ephemera_engine::keys::from_keys;
use ephemera_engine::{
    Engine, EngineError, EngineKind, EngineSetup, KeyProblem, Preflight, TemplateKeys, TemplateSpec,
};
use ephemera_engine_postgres::template::{check_template_name, ROLE_PREFIX};
use serde::Deserialize;

use crate::{StaticEngine, NAME};

/// `engine = "postgres-static"`: an existing role, checked out per lease.
#[derive(Debug, Default, Clone, Copy)]
pub struct StaticKind;

/// When the role's verifier changes while leases come and go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rotate {
    /// Fresh random keys for every lease (the default).
    PerLease,
    /// The same keys for every lease until `rotate_interval` has passed.
    Interval,
}

/// One `[templates.<name>]` of this engine, as validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticTemplate {
    pub name: String,
    /// The database its sessions connect to.
    pub database: String,
    /// The existing LOGIN role leases check out; never created or dropped.
    pub role: String,
    pub rotate: Rotate,
    /// With [`Rotate::Interval`]: how long one set of keys is used.
    pub rotate_interval: Option<Duration>,
}

/// The engine's keys of `[templates.<name>]`. Keep these names: DBAs write
/// against them (docs/engines/postgres-static.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateKeysV1 {
    role: String,
    #[serde(default = "per_lease")]
    rotate: Rotate,
    #[serde(default, with = "humantime_serde")]
    rotate_interval: Option<Duration>,
}

fn per_lease() -> Rotate {
    Rotate::PerLease
}

/// Why `role` cannot be a static role, if it cannot.
fn check_role(role: &str) -> Result<(), String> {
    if role.is_empty() || role.contains('\0') || role.len() > 63 {
        return Err("must name an existing LOGIN role (1 to 63 bytes)".into());
    }
    if role.starts_with(ROLE_PREFIX) {
        return Err(format!(
            "names starting with {ROLE_PREFIX:?} are reserved for roles the postgres engine mints \
             (its reaper drops them); a static role must be one of your own"
        ));
    }
    Ok(())
}

/// Check the keys of template `name` (see [`EngineKind::template`]).
pub fn parse_template(
    name: &str,
    database: &str,
    keys: TemplateKeys,
) -> Result<StaticTemplate, Vec<KeyProblem>> {
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
    if let Err(reason) = check_role(&keys.role) {
        problems.push(KeyProblem::new("role", reason));
    }
    match (keys.rotate, keys.rotate_interval) {
        (Rotate::Interval, None) => problems.push(KeyProblem::new(
            "rotate_interval",
            "is required with rotate = \"interval\"; write a duration such as \"1h\"",
        )),
        (Rotate::Interval, Some(interval)) if interval.is_zero() => problems.push(KeyProblem::new(
            "rotate_interval",
            "must be longer than zero",
        )),
        (Rotate::PerLease, Some(_)) => problems.push(KeyProblem::new(
            "rotate_interval",
            "only applies with rotate = \"interval\"; remove it or set rotate = \"interval\"",
        )),
        _ => {}
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(StaticTemplate {
        name: name.to_owned(),
        database: database.to_owned(),
        role: keys.role,
        rotate: keys.rotate,
        rotate_interval: keys.rotate_interval,
    })
}

#[async_trait]
impl EngineKind for StaticKind {
    fn name(&self) -> &'static str {
        NAME
    }

    fn template(
        &self,
        name: &str,
        database: &str,
        keys: TemplateKeys,
    ) -> Result<TemplateSpec, Vec<KeyProblem>> {
        parse_template(name, database, keys).map(TemplateSpec::new)
    }

    fn start(&self, setup: EngineSetup) -> Result<Arc<dyn Engine>, EngineError> {
        Ok(Arc::new(StaticEngine::new(setup)?))
    }

    async fn preflight(&self, setup: &EngineSetup) -> Preflight {
        crate::preflight::preflight(setup).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(value: serde_json::Value) -> TemplateKeys {
        match value {
            serde_json::Value::Object(map) => map,
            _ => unreachable!("an object"),
        }
    }

    #[test]
    fn the_keys_are_role_rotate_and_rotate_interval() {
        let t = parse_template(
            "legacy",
            "billing",
            keys(serde_json::json!({"role": "app"})),
        )
        .expect("role alone is enough");
        assert_eq!(t.rotate, Rotate::PerLease);
        let t = parse_template(
            "legacy",
            "billing",
            keys(serde_json::json!({"role": "app", "rotate": "interval", "rotate_interval": "1h"})),
        )
        .expect("interval");
        assert_eq!(t.rotate_interval, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn wrong_keys_are_named() {
        let problem_keys = |value| {
            parse_template("legacy", "billing", keys(value))
                .unwrap_err()
                .into_iter()
                .map(|p| p.key)
                .collect::<Vec<_>>()
        };
        assert_eq!(problem_keys(serde_json::json!({})), ["role"]);
        assert_eq!(
            problem_keys(serde_json::json!({"role": "eph_billing_x"})),
            ["role"]
        );
        assert_eq!(
            problem_keys(serde_json::json!({"role": "a", "rotate": "interval"})),
            ["rotate_interval"]
        );
        assert_eq!(
            problem_keys(serde_json::json!({"role": "a", "rotate_interval": "1h"})),
            ["rotate_interval"]
        );
        assert_eq!(
            problem_keys(serde_json::json!({"role": "a", "rotate": "daily"})),
            ["rotate"]
        );
        assert_eq!(
            problem_keys(serde_json::json!({"role": "a", "member_of": []})),
            ["member_of"]
        );
    }
}
