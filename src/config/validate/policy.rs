//! `[[policy]]`: which SPIFFE IDs, or which tokens, may use which templates.

use crate::config::problems::Problems;
use crate::config::schema::{FileConfig, OnBehalfOfSection, PolicySection};
use crate::identity::token::ClaimsPattern;
use crate::policy::{IdPattern, Matcher, PolicyRule};

pub(super) fn policy(file: &FileConfig, problems: &mut Problems) -> Vec<PolicyRule> {
    let mut rules = Vec::new();
    for (i, rule) in file.policy.iter().enumerate() {
        let key = format!("policy[{i}]");
        if let Some(matcher) = matcher(file, rule, &key, problems) {
            rules.push(PolicyRule {
                matcher,
                templates: rule.templates.clone(),
            });
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

fn matcher(
    file: &FileConfig,
    rule: &PolicySection,
    key: &str,
    problems: &mut Problems,
) -> Option<Matcher> {
    match (&rule.spiffe_id, &rule.token_issuer) {
        (Some(spiffe_id), None) => {
            if rule.claims.is_some() {
                problems.add(
                    format!("{key}.claims"),
                    "claims go with token_issuer, not spiffe_id",
                );
            }
            match IdPattern::parse(spiffe_id) {
                Ok(pattern) => match &rule.on_behalf_of {
                    None => Some(Matcher::Spiffe(pattern)),
                    Some(on_behalf_of) => on_behalf(file, pattern, on_behalf_of, key, problems),
                },
                Err(e) => {
                    problems.add(
                        format!("{key}.spiffe_id"),
                        format!("{spiffe_id:?} is not a SPIFFE ID pattern: {e}"),
                    );
                    None
                }
            }
        }
        (None, Some(issuer)) => {
            if rule.on_behalf_of.is_some() {
                problems.add(
                    format!("{key}.on_behalf_of"),
                    "on_behalf_of goes with spiffe_id (the agent), not token_issuer",
                );
            }
            if !file.tokens.issuer.iter().any(|i| i.name == *issuer) {
                problems.add(
                    format!("{key}.token_issuer"),
                    format!("no [[tokens.issuer]] is named {issuer:?}"),
                );
            }
            let Some(table) = &rule.claims else {
                problems.add(
                    format!("{key}.claims"),
                    "a token rule needs claims to match (any token of the issuer would do otherwise), e.g. claims = { repository = \"acme/billing\" }",
                );
                return None;
            };
            match ClaimsPattern::parse(table) {
                Ok(claims) => Some(Matcher::Token {
                    issuer: issuer.clone(),
                    claims,
                }),
                Err(e) => {
                    problems.add(format!("{key}.claims"), e.to_string());
                    None
                }
            }
        }
        (Some(_), Some(_)) => {
            problems.add(
                format!("{key}.token_issuer"),
                "give spiffe_id or token_issuer, not both",
            );
            None
        }
        (None, None) => {
            problems.add(
                format!("{key}.spiffe_id"),
                "give spiffe_id (a SPIFFE ID pattern) or token_issuer with claims",
            );
            None
        }
    }
}

/// `on_behalf_of` on a `spiffe_id` rule: the person's issuer and claims.
fn on_behalf(
    file: &FileConfig,
    actor: IdPattern,
    section: &OnBehalfOfSection,
    key: &str,
    problems: &mut Problems,
) -> Option<Matcher> {
    let issuer = &section.token_issuer;
    if !file.tokens.issuer.iter().any(|i| i.name == *issuer) {
        problems.add(
            format!("{key}.on_behalf_of.token_issuer"),
            format!("no [[tokens.issuer]] is named {issuer:?}"),
        );
    }
    let Some(table) = &section.claims else {
        problems.add(
            format!("{key}.on_behalf_of.claims"),
            "name the claims the person's token must have (any person of the issuer would do otherwise), e.g. claims = { groups = \"finance\" }",
        );
        return None;
    };
    match ClaimsPattern::parse(table) {
        Ok(claims) => Some(Matcher::OnBehalf {
            actor,
            issuer: issuer.clone(),
            claims,
        }),
        Err(e) => {
            problems.add(format!("{key}.on_behalf_of.claims"), e.to_string());
            None
        }
    }
}
