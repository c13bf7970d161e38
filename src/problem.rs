//! One thing wrong with a configuration, and where: what every module's config validation
//! returns, so `kiln check-config` can list them all; and why a config file could not be used
//! (read, written back, or validated), for every module that reads or edits one.

use std::fmt;
use std::path::PathBuf;

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

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error (in the message: `check-config` prints it).
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The configuration parsed but has problems (every one is listed).
    #[error("{origin} has {} problem(s):\n{}", problems.len(), list(problems))]
    Invalid {
        /// The file (or `environment`).
        origin: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
    /// The file could not be written back (`kiln register`, `kiln unregister`).
    #[error("cannot write config file {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}
