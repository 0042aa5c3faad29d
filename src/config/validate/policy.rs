//! `[[policy]]`: which SPIFFE IDs may use which templates.

use crate::config::problems::Problems;
use crate::config::schema::FileConfig;
use crate::policy::{IdPattern, PolicyRule};

pub(super) fn policy(file: &FileConfig, problems: &mut Problems) -> Vec<PolicyRule> {
    // -- policy --
    let mut rules = Vec::new();
    for (i, rule) in file.policy.iter().enumerate() {
        let key = format!("policy[{i}]");
        match IdPattern::parse(&rule.spiffe_id) {
            Ok(pattern) => rules.push(PolicyRule {
                pattern,
                templates: rule.templates.clone(),
            }),
            Err(e) => problems.add(
                format!("{key}.spiffe_id"),
                format!("{:?} is not a SPIFFE ID pattern: {e}", rule.spiffe_id),
            ),
        }
        for (j, template) in rule.templates.iter().enumerate() {
            if !file.templates.contains_key(template) {
                problems.add(
                    format!("{key}.templates[{j}]"),
                    format!("no template named {template:?}; define [templates.{template}] or fix the name"),
                );
            }
        }
    }

    rules
}
