//! `[[sources.gitlab]]`: one GitLab runner kiln acts as.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::gitlab::register::is_system_id;
use crate::problem::Problem;

/// One GitLab runner kiln acts as.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GitLabRunnerConfig {
    /// A name for logs and metrics (default: the URL's host and the index).
    #[serde(default)]
    pub name: Option<String>,
    /// GitLab's base URL, e.g. `https://gitlab.example.com`.
    pub url: String,
    /// The runner authentication token (`glrt-…`); usually from the environment
    /// (`KILN_SOURCES__GITLAB__N__TOKEN`), so a missing one is reported with that hint.
    #[serde(default)]
    pub token: String,
    /// This manager's stable system id (`s_`/`r_` + 12 chars); written by `kiln register`.
    #[serde(default)]
    pub system_id: Option<String>,
    /// Jobs this runner runs at once (0: only `concurrent` limits it).
    #[serde(default)]
    pub limit: usize,
    /// Parallel `jobs/request` long polls (useful only with capacity for several jobs).
    #[serde(default = "one")]
    pub request_concurrency: usize,
    /// Client-side timeout of one long poll; above GitLab Workhorse's 50 s hold.
    #[serde(default = "default_poll_timeout", with = "humantime_serde")]
    pub poll_timeout: Duration,
    /// The least time between two `jobs/request` calls that found no job. A long poll that
    /// GitLab held for longer is followed at once; a `204` that came back sooner (no long
    /// polling in front of GitLab) waits out the rest, as gitlab-runner's `check_interval`.
    #[serde(default = "default_check_interval", with = "humantime_serde")]
    pub check_interval: Duration,
    /// The largest job payload (KiB) kiln accepts; a bigger job is failed with a reason
    /// instead of being loaded. GitLab's own payloads are far smaller.
    #[serde(default = "default_max_job_payload")]
    pub max_job_payload: usize,
    /// The Kubernetes resource class of this runner's jobs (GitLab does not send a job's tags,
    /// so register one runner per tag set and give each its class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_class: Option<String>,
}

fn one() -> usize {
    1
}

fn default_poll_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_check_interval() -> Duration {
    Duration::from_secs(3)
}

fn default_max_job_payload() -> usize {
    4096
}

impl GitLabRunnerConfig {
    /// A new entry with defaults for everything but the server and token.
    pub fn new(url: &str, token: &str) -> Self {
        Self {
            name: None,
            url: url.into(),
            token: token.into(),
            system_id: None,
            limit: 0,
            request_concurrency: 1,
            poll_timeout: default_poll_timeout(),
            check_interval: default_check_interval(),
            max_job_payload: default_max_job_payload(),
            resource_class: None,
        }
    }

    /// [`Self::max_job_payload`] in bytes.
    pub fn max_job_payload_bytes(&self) -> usize {
        self.max_job_payload.saturating_mul(1024)
    }

    /// The name used in logs and metrics.
    pub fn display_name(&self, index: usize) -> String {
        crate::sources::entry_name(self.name.as_deref(), &self.url, "gitlab", index)
    }
}

impl GitLabRunnerConfig {
    /// Every problem of entry `index` (names are checked across entries by the caller).
    pub(crate) fn problems(&self, index: usize) -> Vec<Problem> {
        let mut problems = Vec::new();
        let at = |field: &str| format!("sources.gitlab[{index}].{field}");
        let mut problem = |path: String, message: &str| problems.push(Problem::new(path, message));
        match url::Url::parse(&self.url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => {}
            Ok(url) => problem(
                at("url"),
                &format!("scheme `{}` is not http or https", url.scheme()),
            ),
            Err(e) => problem(at("url"), &format!("not a URL ({e})")),
        }
        if self.token.trim().is_empty() {
            problem(
                at("token"),
                "is empty; run `kiln register` or set KILN_SOURCES__GITLAB__N__TOKEN",
            );
        }
        if let Some(id) = &self.system_id
            && !is_system_id(id)
        {
            problem(
                at("system_id"),
                "must be `s_` or `r_` followed by 12 letters or digits",
            );
        }
        if self.check_interval < Duration::from_secs(1) {
            problem(
                at("check_interval"),
                "must be at least 1s (it is the pause between requests that found no job)",
            );
        }
        if self.max_job_payload == 0 {
            problem(at("max_job_payload"), "must be at least 1 (KiB)");
        }
        if self.request_concurrency == 0 {
            problem(at("request_concurrency"), "must be at least 1");
        }
        if self.poll_timeout < Duration::from_secs(5) {
            problem(
                at("poll_timeout"),
                "must be at least 5s (GitLab holds long polls for up to 50s)",
            );
        }
        problems
    }
}

// By hand, not derived: `Debug` output ends up in logs and panic messages, and the runner
// token must not (a derived `Debug` printed it whole).
impl std::fmt::Debug for GitLabRunnerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitLabRunnerConfig")
            .field("name", &self.name)
            .field("url", &crate::net::redact_url(&self.url))
            .field("token", &"[redacted]")
            .field("system_id", &self.system_id)
            .field("limit", &self.limit)
            .field("request_concurrency", &self.request_concurrency)
            .finish_non_exhaustive()
    }
}
