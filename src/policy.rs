//! Policy: which identities may use which role templates.
//!
//! Each `[[policy]]` rule pairs a SPIFFE ID pattern, or a token issuer and
//! a claims pattern, with templates. A SPIFFE ID pattern is a SPIFFE ID
//! whose path segments may be `*` (exactly one segment) or, as the last
//! segment only, `**` (one or more remaining segments); it matches X.509-
//! and JWT-SVIDs alike. A token rule matches tokens of the `[[tokens.issuer]]`
//! it names whose claims match (see [`ClaimsPattern`]). An identity may use
//! the union of the templates of every rule it matches.
//!
//! A SPIFFE ID rule with `on_behalf_of = { token_issuer, claims }` is for
//! agents acting for people: it matches only an agent whose SPIFFE ID
//! matches (its X.509-SVID, or the `act.sub` of an RFC 8693 token) and that
//! presented a person's token of that issuer whose claims match. Such a
//! principal matches no other kind of rule: an agent does not inherit the
//! person's own grants, nor uses its plain grants while acting for one.

use std::collections::BTreeSet;
use std::fmt;

use crate::identity::token::ClaimsPattern;
use crate::identity::{parse_spiffe_uri, Principal, SpiffeId, SpiffeIdError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("{0}")]
    Syntax(#[from] SpiffeIdError),
    #[error("\"**\" may only be the last path segment")]
    DoubleStarNotLast,
}

/// A SPIFFE ID pattern, e.g. `spiffe://example.org/ns/*/sa/billing`.
#[derive(Clone, PartialEq, Eq)]
pub struct IdPattern {
    text: String,
    trust_domain: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Exact(String),
    AnyOne,
    AnyRest,
}

impl IdPattern {
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        parse_spiffe_uri(text, true)?;
        let rest = &text["spiffe://".len()..];
        let (trust_domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let segments: Vec<Segment> = path
            .split('/')
            .skip(1)
            .map(|s| match s {
                "*" => Segment::AnyOne,
                "**" => Segment::AnyRest,
                exact => Segment::Exact(exact.to_owned()),
            })
            .collect();
        if let Some(i) = segments.iter().position(|s| *s == Segment::AnyRest) {
            if i != segments.len() - 1 {
                return Err(PatternError::DoubleStarNotLast);
            }
        }
        Ok(IdPattern {
            text: text.to_owned(),
            trust_domain: trust_domain.to_owned(),
            segments,
        })
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        if id.trust_domain() != self.trust_domain {
            return false;
        }
        let mut ids = id.segments();
        for pattern in &self.segments {
            match pattern {
                Segment::AnyRest => return ids.next().is_some(),
                Segment::AnyOne => {
                    if ids.next().is_none() {
                        return false;
                    }
                }
                Segment::Exact(want) => {
                    if ids.next() != Some(want.as_str()) {
                        return false;
                    }
                }
            }
        }
        ids.next().is_none()
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

/// Whom a rule is for.
#[derive(Debug, Clone)]
pub enum Matcher {
    /// `spiffe_id = "…"`: X.509-SVIDs and JWT-SVIDs.
    Spiffe(IdPattern),
    /// `token_issuer = "…"` with `claims = { … }`.
    Token {
        issuer: String,
        claims: ClaimsPattern,
    },
    /// `spiffe_id = "…"` with `on_behalf_of = { token_issuer, claims }`:
    /// an agent acting for a person.
    OnBehalf {
        actor: IdPattern,
        issuer: String,
        claims: ClaimsPattern,
    },
}

impl Matcher {
    pub fn matches(&self, principal: &Principal) -> bool {
        match (self, principal) {
            (Matcher::OnBehalf { .. }, Principal::OnBehalf(on_behalf)) => {
                self.matches_actor(principal)
                    && self.matches_subject(&on_behalf.subject.issuer, &on_behalf.subject.claims)
            }
            (Matcher::OnBehalf { .. }, _) | (_, Principal::OnBehalf(_)) => false,
            (Matcher::Spiffe(pattern), _) => {
                principal.spiffe_id().is_some_and(|id| pattern.matches(&id))
            }
            (Matcher::Token { issuer, claims }, _) => principal
                .token()
                .is_some_and(|t| t.issuer == *issuer && claims.matches(&t.claims)),
        }
    }

    /// An `on_behalf_of` rule whose agent pattern matches `principal`'s
    /// SPIFFE ID (whatever it acts for).
    fn matches_actor(&self, principal: &Principal) -> bool {
        match self {
            Matcher::OnBehalf { actor, .. } => {
                principal.spiffe_id().is_some_and(|id| actor.matches(&id))
            }
            _ => false,
        }
    }

    fn matches_subject(
        &self,
        token_issuer: &str,
        token_claims: &serde_json::Map<String, serde_json::Value>,
    ) -> bool {
        match self {
            Matcher::OnBehalf { issuer, claims, .. } => {
                issuer == token_issuer && claims.matches(token_claims)
            }
            _ => false,
        }
    }
}

impl From<IdPattern> for Matcher {
    fn from(pattern: IdPattern) -> Self {
        Matcher::Spiffe(pattern)
    }
}

#[derive(Debug, Clone)]
pub struct PolicyRule {
    pub matcher: Matcher,
    pub templates: Vec<String>,
}

/// The decision for one identity asking for one template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Denied; `allowed` lists what this identity may use instead.
    Denied {
        allowed: BTreeSet<String>,
    },
}

#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<PolicyRule>,
}

impl Policy {
    pub fn new(rules: Vec<PolicyRule>) -> Self {
        Policy { rules }
    }

    /// Every template `id` may use.
    pub fn templates_for(&self, id: &Principal) -> BTreeSet<String> {
        self.rules
            .iter()
            .filter(|rule| rule.matcher.matches(id))
            .flat_map(|rule| rule.templates.iter().cloned())
            .collect()
    }

    /// Whether `id`, an X.509-SVID, must present the token of the person it
    /// acts for to get `template`: no rule grants it outright, but an
    /// `on_behalf_of` rule for its SPIFFE ID lists it.
    pub fn wants_subject(&self, id: &Principal, template: &str) -> bool {
        matches!(id, Principal::Svid(_))
            && !self.templates_for(id).contains(template)
            && self.rules.iter().any(|rule| {
                rule.matcher.matches_actor(id) && rule.templates.iter().any(|t| t == template)
            })
    }

    pub fn decide(&self, id: &Principal, template: &str) -> Decision {
        let allowed = self.templates_for(id);
        if allowed.contains(template) {
            Decision::Allowed
        } else {
            Decision::Denied { allowed }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn exact_and_wildcard_patterns_match_as_documented() {
        let exact = IdPattern::parse("spiffe://example.org/ns/prod/sa/billing").unwrap();
        assert!(exact.matches(&id("spiffe://example.org/ns/prod/sa/billing")));
        assert!(!exact.matches(&id("spiffe://example.org/ns/prod/sa/billing/x")));
        assert!(!exact.matches(&id("spiffe://other.org/ns/prod/sa/billing")));

        let one = IdPattern::parse("spiffe://example.org/ns/*/sa/billing").unwrap();
        assert!(one.matches(&id("spiffe://example.org/ns/dev/sa/billing")));
        assert!(!one.matches(&id("spiffe://example.org/ns/a/b/sa/billing")));
        assert!(!one.matches(&id("spiffe://example.org/ns/sa/billing")));

        let rest = IdPattern::parse("spiffe://example.org/ns/**").unwrap();
        assert!(rest.matches(&id("spiffe://example.org/ns/a")));
        assert!(rest.matches(&id("spiffe://example.org/ns/a/b/c")));
        assert!(!rest.matches(&id("spiffe://example.org/ns")));
        assert!(!rest.matches(&id("spiffe://example.org/nsx/a")));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert_eq!(
            IdPattern::parse("spiffe://example.org/**/x"),
            Err(PatternError::DoubleStarNotLast)
        );
        assert!(IdPattern::parse("spiffe://example.org/a*").is_err());
        assert!(IdPattern::parse("https://example.org/a").is_err());
    }

    #[test]
    fn decisions_union_rules_and_name_alternatives() {
        let policy = Policy::new(vec![
            PolicyRule {
                matcher: IdPattern::parse("spiffe://example.org/app/*")
                    .unwrap()
                    .into(),
                templates: vec!["app_ro".into()],
            },
            PolicyRule {
                matcher: IdPattern::parse("spiffe://example.org/app/web")
                    .unwrap()
                    .into(),
                templates: vec!["app_rw".into()],
            },
        ]);
        let web = Principal::from(id("spiffe://example.org/app/web"));
        assert_eq!(policy.decide(&web, "app_rw"), Decision::Allowed);
        assert_eq!(policy.decide(&web, "app_ro"), Decision::Allowed);
        let worker = Principal::from(id("spiffe://example.org/app/worker"));
        assert_eq!(
            policy.decide(&worker, "app_rw"),
            Decision::Denied {
                allowed: ["app_ro".to_string()].into()
            }
        );
    }

    fn token(identity: &str, claims: serde_json::Value) -> crate::identity::token::VerifiedToken {
        crate::identity::token::VerifiedToken {
            issuer: "corp".into(),
            identity: identity.into(),
            claims: claims.as_object().unwrap().clone(),
            expires_at: time::OffsetDateTime::now_utc(),
            bind_to_expiry: true,
            single_use_key: None,
        }
    }

    #[test]
    fn on_behalf_of_rules_need_the_agent_and_the_persons_claims() {
        use crate::identity::{Actor, OnBehalf};
        let agent = "spiffe://example.org/agent/sql";
        let policy = Policy::new(vec![
            PolicyRule {
                matcher: Matcher::OnBehalf {
                    actor: IdPattern::parse(agent).unwrap(),
                    issuer: "corp".into(),
                    claims: ClaimsPattern::parse(
                        serde_json::json!({"groups": "finance"})
                            .as_object()
                            .unwrap(),
                    )
                    .unwrap(),
                },
                templates: vec!["finance_ro".into()],
            },
            PolicyRule {
                matcher: IdPattern::parse(agent).unwrap().into(),
                templates: vec!["agent_own".into()],
            },
        ]);
        let alice = token(
            "corp:alice",
            serde_json::json!({"sub": "alice", "groups": ["finance"]}),
        );
        let on_behalf =
            |actor: Actor, subject| Principal::OnBehalf(Box::new(OnBehalf { actor, subject }));
        let svid = Principal::from(id(agent));
        assert!(policy.wants_subject(&svid, "finance_ro"));
        assert!(!policy.wants_subject(&svid, "agent_own"));
        let acting = on_behalf(Actor::Svid(id(agent)), alice.clone());
        assert_eq!(policy.decide(&acting, "finance_ro"), Decision::Allowed);
        // Acting for someone, the agent does not use its own grants.
        assert_ne!(policy.decide(&acting, "agent_own"), Decision::Allowed);
        assert_eq!(acting.as_str(), agent);
        assert_eq!(acting.subject(), Some("corp:alice"));
        // The person's claims must match; the actor must be the rule's.
        let bob = token(
            "corp:bob",
            serde_json::json!({"sub": "bob", "groups": ["sales"]}),
        );
        let wrong_person = on_behalf(Actor::Svid(id(agent)), bob);
        assert_ne!(
            policy.decide(&wrong_person, "finance_ro"),
            Decision::Allowed
        );
        let other = on_behalf(
            Actor::Act("spiffe://example.org/agent/other".into()),
            alice.clone(),
        );
        assert_ne!(policy.decide(&other, "finance_ro"), Decision::Allowed);
        // An RFC 8693 act claim makes the token's principal the actor.
        let mut exchanged = alice.clone();
        exchanged
            .claims
            .insert("act".into(), serde_json::json!({"sub": agent}));
        let exchanged = Principal::from_token(exchanged);
        assert_eq!(exchanged.as_str(), agent);
        assert_eq!(policy.decide(&exchanged, "finance_ro"), Decision::Allowed);
        // The person's token alone matches nothing here.
        assert_ne!(
            policy.decide(&Principal::from_token(alice), "finance_ro"),
            Decision::Allowed
        );
    }
}
