//! One thing wrong with a configuration, and where: what every module's config validation
//! returns, so `kiln check-config` can list them all.

use std::fmt;

/// One thing wrong with a configuration, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field's path, e.g. `sources.gitlab[0].url` (with its line when known).
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl Problem {
    /// A problem of field `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}
