//! A policy's `claims` table against a token's claims.
//!
//! The table mirrors the token's JSON: a string value must match the claim
//! at the same place, a nested table addresses a nested claim
//! (`claims = { "kubernetes.io" = { namespace = "prod", serviceaccount = { name = "billing" } } }`).
//! Every entry must match. In a string, `*` matches any run of characters
//! but `/`, `**` any run at all. A claim that is a list matches if any of
//! its elements does (`groups = "finance"`); numbers and booleans compare
//! by their JSON text.

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimsError {
    #[error("the claim pattern at {0:?} must be a string or a table")]
    BadValue(String),
    #[error("the claims table is empty; name at least one claim to match")]
    Empty,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClaimsPattern {
    entries: Vec<(String, Entry)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Entry {
    Glob(String),
    Nested(ClaimsPattern),
}

impl ClaimsPattern {
    pub fn parse(table: &Map<String, Value>) -> Result<Self, ClaimsError> {
        if table.is_empty() {
            return Err(ClaimsError::Empty);
        }
        Self::parse_at(table, "")
    }

    fn parse_at(table: &Map<String, Value>, at: &str) -> Result<Self, ClaimsError> {
        let mut entries = Vec::new();
        for (key, value) in table {
            let path = if at.is_empty() {
                key.clone()
            } else {
                format!("{at}.{key}")
            };
            let entry = match value {
                Value::String(s) => Entry::Glob(s.clone()),
                Value::Bool(_) | Value::Number(_) => Entry::Glob(value.to_string()),
                Value::Object(nested) if !nested.is_empty() => {
                    Entry::Nested(Self::parse_at(nested, &path)?)
                }
                _ => return Err(ClaimsError::BadValue(path)),
            };
            entries.push((key.clone(), entry));
        }
        Ok(ClaimsPattern { entries })
    }

    pub fn matches(&self, claims: &Map<String, Value>) -> bool {
        self.entries.iter().all(|(key, entry)| {
            let Some(value) = claims.get(key) else {
                return false;
            };
            match entry {
                Entry::Glob(pattern) => value_matches(pattern, value),
                Entry::Nested(nested) => value.as_object().is_some_and(|o| nested.matches(o)),
            }
        })
    }
}

fn value_matches(pattern: &str, value: &Value) -> bool {
    match value {
        Value::String(s) => glob(pattern.as_bytes(), s.as_bytes()),
        Value::Array(items) => items
            .iter()
            .any(|v| !v.is_array() && value_matches(pattern, v)),
        Value::Bool(_) | Value::Number(_) => glob(pattern.as_bytes(), value.to_string().as_bytes()),
        Value::Null | Value::Object(_) => false,
    }
}

/// `*`: any run without `/`; `**`: any run. Everything else literally.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern {
        [] => text.is_empty(),
        [b'*', b'*', rest @ ..] => (0..=text.len()).any(|i| glob(rest, &text[i..])),
        [b'*', rest @ ..] => {
            let run = text.iter().position(|&c| c == b'/').unwrap_or(text.len());
            (0..=run).any(|i| glob(rest, &text[i..]))
        }
        [c, rest @ ..] => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pattern(v: Value) -> ClaimsPattern {
        ClaimsPattern::parse(v.as_object().unwrap()).unwrap()
    }

    #[test]
    fn flat_nested_list_and_glob_claims_match_as_documented() {
        let claims = json!({
            "repository": "acme/billing", "ref": "refs/heads/main",
            "kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": "billing"}},
            "groups": ["eng", "finance"], "run_attempt": 2
        });
        let claims = claims.as_object().unwrap();
        assert!(
            pattern(json!({"repository": "acme/billing", "ref": "refs/heads/main"}))
                .matches(claims)
        );
        assert!(!pattern(json!({"repository": "acme/other"})).matches(claims));
        assert!(pattern(json!({"ref": "refs/heads/*"})).matches(claims));
        assert!(!pattern(json!({"ref": "refs/*"})).matches(claims));
        assert!(pattern(json!({"ref": "refs/**"})).matches(claims));
        assert!(pattern(
            json!({"kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": "billing"}}})
        )
        .matches(claims));
        assert!(!pattern(json!({"kubernetes.io": {"namespace": "dev"}})).matches(claims));
        assert!(pattern(json!({"groups": "finance"})).matches(claims));
        assert!(pattern(json!({"run_attempt": 2})).matches(claims));
        assert!(!pattern(json!({"missing": "*"})).matches(claims));
        assert_eq!(ClaimsPattern::parse(&Map::new()), Err(ClaimsError::Empty));
        assert!(ClaimsPattern::parse(json!({"a": ["x"]}).as_object().unwrap()).is_err());
    }
}
