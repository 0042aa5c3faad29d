//! `ephemera check-config --connect`: what only the upstream can tell.
//!
//! Each engine in use runs its own preflight (for the postgres engine: can
//! the admin log in, CREATEROLE, the reaper election's schema, the
//! templates' databases, groups and owners). Every problem comes back with
//! the key it concerns and what to do.

use ephemera_engine::KeyProblem;

use crate::config::{ConfigProblem, Settings};

/// What `--connect` found: problems fail the check, warnings do not.
#[derive(Debug, Default)]
pub struct UpstreamCheck {
    pub problems: Vec<ConfigProblem>,
    pub warnings: Vec<ConfigProblem>,
}

fn problems(found: Vec<KeyProblem>) -> impl Iterator<Item = ConfigProblem> {
    found.into_iter().map(|p| ConfigProblem {
        key: p.key,
        message: p.message,
    })
}

/// Run the preflight of every engine that has templates.
pub async fn check_upstream(settings: &Settings) -> UpstreamCheck {
    let engines = &settings.engines;
    let mut check = UpstreamCheck::default();
    for name in engines.with_templates() {
        let Some(kind) = engines.registry.get(name) else {
            continue;
        };
        let found = kind.preflight(&engines.setup(name)).await;
        check.problems.extend(problems(found.problems));
        check.warnings.extend(problems(found.warnings));
    }
    check
}
