use std::fmt;

use rand::distributions::{Alphanumeric, DistString};

/// A password. `Debug` and `Display` never show it; use [`Password::expose`]
/// exactly where it must leave the process.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(password: String) -> Self {
        Password(password)
    }

    /// A new random password: 32 alphanumeric characters (~190 bits). Plain
    /// ASCII, so SASLprep leaves it unchanged and every client agrees on it.
    pub fn generate() -> Self {
        Password(Alphanumeric.sample_string(&mut rand::rngs::OsRng, 32))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}
