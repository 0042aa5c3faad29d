//! Problems: everything wrong with a configuration, each with its key.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::schema::MAX_DURATION;

/// One thing wrong with a configuration, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key path, e.g. `templates.billing_rw.database` (empty: the file).
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    pub path: PathBuf,
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} has {} problem(s):",
            self.path.display(),
            self.problems.len()
        )?;
        for problem in &self.problems {
            writeln!(f, "  {problem}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
pub(crate) struct Problems(pub(crate) Vec<ConfigProblem>);

impl Problems {
    pub(crate) fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Refuse a duration past [`MAX_DURATION`].
    pub(crate) fn at_most_max(&mut self, key: impl Into<String>, value: Duration) {
        if value > MAX_DURATION {
            self.add(
                key,
                format!(
                    "{} is too long: durations may be at most 10 years (\"10y\")",
                    humantime::format_duration(value)
                ),
            );
        }
    }
}
