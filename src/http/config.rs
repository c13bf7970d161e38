//! `[http]`: where the coordinator's HTTP server listens and the limits it holds strangers to;
//! `[status]`: the status page and its JSON API.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::problem::Problem;

/// The most connections `http.max_connections` may allow: far more than any file-descriptor
/// limit lets a process hold.
pub(crate) const MAX_CONNECTIONS: usize = 65_536;

/// `[http]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address of `/healthz`, `/readyz` and `/metrics`.
    pub listen: SocketAddr,
    /// Connections open at once; more wait until one closes.
    pub max_connections: usize,
    /// Connections open at once from one peer address; more are closed at once.
    pub max_connections_per_peer: usize,
    /// A second listener that serves only `/healthz` and `/readyz`, for the kubelet's probes:
    /// its own connections, which no client of the main port can take (unset: none).
    pub probe_listen: Option<SocketAddr>,
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
            max_connections_per_peer: 64,
            probe_listen: None,
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
        } else if self.max_connections > MAX_CONNECTIONS {
            problems.push(Problem::new(
                "http.max_connections",
                format!("must be at most {MAX_CONNECTIONS} (each open connection holds a file descriptor)"),
            ));
        }
        if self.max_connections_per_peer == 0 {
            problems.push(Problem::new(
                "http.max_connections_per_peer",
                "must be at least 1",
            ));
        }
        if self.probe_listen.is_some_and(|probe| probe == self.listen) {
            problems.push(Problem::new(
                "http.probe_listen",
                "must differ from http.listen",
            ));
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

/// The most finished builds `status.history` may keep: each takes a few hundred bytes.
const MAX_HISTORY: usize = 100_000;

/// `[status]`: the status page (`/`) and its JSON API (`/api/v1/…`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// Finished builds kept for the page and the API, across all sources: a ring, the oldest
    /// forgotten first, so memory stays bounded.
    pub history: usize,
    /// A token the page and the API require from every client (`Authorization: Bearer …`, or
    /// as the password of HTTP Basic auth for browsers). Unset: they answer only to clients on
    /// the loopback interface (`kubectl port-forward`, a shell in the pod).
    pub token: Option<String>,
    /// How often the page reloads itself in a browser (0s: never).
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self {
            history: 1000,
            token: None,
            refresh: Duration::from_secs(15),
        }
    }
}

impl StatusConfig {
    /// Every problem of `[status]`.
    pub(crate) fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.history > MAX_HISTORY {
            problems.push(Problem::new(
                "status.history",
                format!("must be at most {MAX_HISTORY}"),
            ));
        }
        if self.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            problems.push(Problem::new(
                "status.token",
                "must not be empty; leave it out to serve the page on localhost only",
            ));
        }
        problems
    }
}
