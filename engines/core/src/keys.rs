//! Deserialising configuration keys with their paths.
//!
//! The path comes from the deserialiser itself (`serde_path_to_error`), so a
//! problem names the key it is about (`member_of[1]`), and never from
//! re-reading an error message.

use serde::de::DeserializeOwned;

use crate::KeyProblem;

/// Deserialise `value` into `T`. On failure, the problem's key is the path
/// of the offending key inside `value` (empty: `value` itself), and its
/// message says what to do.
pub fn from_keys<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, KeyProblem> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let message = error.inner().to_string();
        explain(path, &message)
    })
}

/// Turn serde's message into one that says what to do. The key path is
/// already known; only the kind of problem is read from the message.
fn explain(path: String, message: &str) -> KeyProblem {
    // For an unknown key the path already ends at it; for a missing one it
    // ends at the table that lacks it.
    let join = |field: &str| {
        if path == field || path.ends_with(&format!(".{field}")) {
            path.clone()
        } else if path.is_empty() {
            field.to_owned()
        } else {
            format!("{path}.{field}")
        }
    };
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once('`') {
            return KeyProblem::new(
                join(field),
                format!(
                    "unknown key; remove it or fix its spelling{}",
                    expected.replacen(',', ":", 1)
                ),
            );
        }
    }
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        return KeyProblem::new(
            join(field),
            "is required; see config.toml for an annotated example",
        );
    }
    if message.contains("expected a duration") || message.contains("time unit") {
        return KeyProblem::new(
            path,
            format!("{message}; write a duration such as \"10s\", \"5m\" or \"1h\""),
        );
    }
    KeyProblem::new(path, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Table {
        name: String,
        #[serde(default)]
        groups: Vec<String>,
    }

    #[test]
    fn problems_carry_the_path_from_the_deserialiser() {
        let unknown = from_keys::<Table>(serde_json::json!({"name": "a", "gruops": []}));
        let problem = unknown.unwrap_err();
        assert_eq!(problem.key, "gruops");
        assert!(problem.message.starts_with("unknown key"), "{problem:?}");

        let missing = from_keys::<Table>(serde_json::json!({})).unwrap_err();
        assert_eq!(missing.key, "name");

        let wrong =
            from_keys::<Table>(serde_json::json!({"name": "a", "groups": ["x", 1]})).unwrap_err();
        assert_eq!(wrong.key, "groups[1]");
    }
}
