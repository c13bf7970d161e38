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
    /// A PEM file of CA certificates to trust for this GitLab besides the system's (a GitLab
    /// behind a private CA; gitlab-runner's `tls-ca-file`). Builds trust it too: for git and
    /// in `CI_SERVER_TLS_CA_FILE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<std::path::PathBuf>,
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
            tls_ca_file: None,
        }
    }

    /// [`Self::max_job_payload`] in bytes.
    pub fn max_job_payload_bytes(&self) -> usize {
        self.max_job_payload.saturating_mul(1024)
    }

    /// The certificates of [`Self::tls_ca_file`] as read from it (PEM text), if one is set.
    ///
    /// # Errors
    /// The file cannot be read or is not UTF-8 text, named with its path.
    pub fn tls_ca(&self) -> Result<Option<String>, crate::gitlab::api::ApiError> {
        let Some(path) = &self.tls_ca_file else {
            return Ok(None);
        };
        std::fs::read_to_string(path)
            .map(Some)
            .map_err(|e| crate::gitlab::api::ApiError::TlsCa {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
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
        // Read and parsed as the poller will, so a bad file is named before kiln starts (a bad
        // URL is reported above).
        if let Some(path) = &self.tls_ca_file {
            let shown = path.display().to_string();
            let usable = self.tls_ca().and_then(|pem| {
                let pem = pem.unwrap_or_default();
                crate::gitlab::api::RunnerApi::trusting(&self.url, Some((&shown, pem.as_bytes())))
            });
            if let Err(e @ crate::gitlab::api::ApiError::TlsCa { .. }) = usable {
                problem(at("tls_ca_file"), &e.to_string());
            }
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
            .field("tls_ca_file", &self.tls_ca_file)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems_with_ca(content: Option<&str>) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        if let Some(content) = content {
            std::fs::write(&path, content).unwrap();
        }
        let mut entry = GitLabRunnerConfig::new("https://gitlab.example.com", "glrt-x");
        entry.tls_ca_file = Some(path);
        entry
            .problems(0)
            .into_iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    #[test]
    fn an_unreadable_or_certificate_less_ca_file_is_named_with_its_config_path() {
        let missing = problems_with_ca(None);
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(
            missing[0].starts_with("sources.gitlab[0].tls_ca_file: cannot use the CA file ")
                && missing[0].contains("ca.pem"),
            "{missing:?}"
        );
        let not_pem = problems_with_ca(Some("not a certificate\n"));
        assert_eq!(not_pem.len(), 1, "{not_pem:?}");
        assert!(
            not_pem[0].ends_with("no PEM certificate in it"),
            "{not_pem:?}"
        );
        let bad_der = problems_with_ca(Some(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ));
        assert_eq!(bad_der.len(), 1, "{bad_der:?}");
    }
}
