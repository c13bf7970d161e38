//! `[http]`: where the coordinator's HTTP server listens and the limits it holds strangers to.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::problem::Problem;

/// `[http]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address of `/healthz`, `/readyz` and `/metrics`.
    pub listen: SocketAddr,
    /// Connections open at once; more wait until one closes.
    pub max_connections: usize,
    /// How long a client may take to send its request headers (and stay idle between
    /// requests on a kept-alive connection).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// How long a webhook sender may take to send its body.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// On shutdown, how long open connections get to finish before they are closed.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9252)),
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

impl HttpConfig {
    /// Every problem of `[http]`.
    pub(crate) fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.max_connections == 0 {
            problems.push(Problem::new("http.max_connections", "must be at least 1"));
        }
        for (field, value) in [
            ("http.header_timeout", self.header_timeout),
            ("http.body_timeout", self.body_timeout),
        ] {
            if value.is_zero() {
                problems.push(Problem::new(field, "must be longer than 0s"));
            }
        }
        problems
    }
}
