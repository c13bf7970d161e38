//! The job file: what an executor hands `kiln agent` inside a build. It is the contract between
//! the coordinator's side (the GitLab source writes it, `kiln exec` writes it) and the agent
//! (reads it): a GitLab job as GitLab sent it, the `[agent]` settings, and fingerprints of the
//! credentials the trace must mask. It travels in the build's secrets (it holds the job token).

use std::ops::RangeInclusive;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::problem::Problem;

/// What the executor hands the agent (written as JSON to the job file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentJob {
    /// GitLab's base URL.
    pub gitlab_url: String,
    /// The job JSON exactly as GitLab sent it.
    pub job: serde_json::Value,
    /// Agent behaviour from the coordinator's config.
    #[serde(default)]
    pub settings: AgentConfig,
    /// The executor's name, shown in the trace (`local`, `kubernetes`).
    #[serde(default = "local")]
    pub executor: String,
    /// The runner's name, shown in the trace.
    #[serde(default)]
    pub runner: String,
    /// Fingerprints of the coordinator's credentials (runner tokens, source tokens, keys),
    /// masked in the trace though the build never holds them.
    #[serde(default)]
    pub masked: Vec<Fingerprint>,
    /// The CA certificates (PEM) kiln trusts for GitLab (`tls_ca_file`): the agent trusts them
    /// too, for GitLab's API and git, and writes them to `CI_SERVER_TLS_CA_FILE`. Public
    /// certificates, not a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<String>,
    /// Where the build's cache is (`[cache]` configured); a directory or a capability for
    /// pre-signed URLs, never a storage key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<crate::cache::CacheGrant>,
}

fn local() -> String {
    "local".into()
}

/// `[agent]`: behaviour of `kiln agent` inside a build, handed to it in every job file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Maximum trace size in KiB; output past it is dropped with a notice (GitLab's 4096).
    pub output_limit: u64,
    /// Trace update interval used until GitLab sends its own.
    #[serde(with = "humantime_serde")]
    pub trace_interval: Duration,
    /// How often to tell GitLab the job is alive when it produces no output.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Time limit for `after_script`.
    #[serde(with = "humantime_serde")]
    pub after_script_timeout: Duration,
    /// The shell that runs scripts (`bash` when present, else `sh`).
    pub shell: Option<String>,
    /// How long a build waits for each service's `HEALTHCHECK_TCP_PORT` to accept connections
    /// (Kubernetes executor) before it goes on with a warning.
    #[serde(with = "humantime_serde")]
    pub service_wait: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            output_limit: 4096,
            trace_interval: Duration::from_secs(3),
            keepalive_interval: Duration::from_secs(30),
            after_script_timeout: Duration::from_secs(300),
            shell: None,
            service_wait: Duration::from_secs(30),
        }
    }
}

impl AgentConfig {
    /// Every problem of `[agent]`.
    pub(crate) fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.output_limit == 0 {
            problems.push(Problem::new(
                "agent.output_limit",
                "must be at least 1 (KiB)",
            ));
        }
        if self.trace_interval.is_zero() {
            problems.push(Problem::new(
                "agent.trace_interval",
                "must be longer than 0s",
            ));
        }
        problems
    }
}

/// A credential the build must never show but must never hold either (the runner token, the
/// coordinator's other credentials): its length and a 61-bit polynomial hash of it. The hash
/// tells the masker where the value appears in the output; it cannot give the value back (a
/// 16-byte credential has over 2^90 values, 2^29 or more of which share each hash, and none
/// can be tried except against the CI server itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint {
    /// The value's length in bytes.
    pub len: usize,
    /// Its hash.
    pub hash: u64,
}

impl Fingerprint {
    /// The modulus of the polynomial hash (a Mersenne prime, 2^61 - 1). The agent's masker
    /// rolls the same hash over the output, so both ends of the job file must agree on it.
    pub(crate) const MODULUS: u128 = (1 << 61) - 1;
    /// The hash's base.
    pub(crate) const BASE: u128 = 1_000_003;
    /// The lengths of credentials masked by fingerprint: shorter ones would say too much of
    /// themselves through 61 bits; the masker holds back as many bytes of output as the longest
    /// value, and a key file (a GitHub App's PEM) is not something a trace shows whole anyway.
    pub(crate) const LENGTHS: RangeInclusive<usize> = 16..=256;

    /// The fingerprint of `value`; `None` for values too short (or too long) to be
    /// fingerprinted safely.
    pub fn of(value: &str) -> Option<Self> {
        Self::LENGTHS.contains(&value.len()).then(|| Self {
            len: value.len(),
            hash: poly_hash(value.as_bytes()),
        })
    }
}

fn poly_hash(bytes: &[u8]) -> u64 {
    let hash = bytes.iter().fold(0u128, |h, b| {
        (h * Fingerprint::BASE + u128::from(*b)) % Fingerprint::MODULUS
    });
    // Below 2^61: fits.
    u64::try_from(hash).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an older coordinator wrote (no executor, runner, settings or fingerprints) is
    /// still a job file; a key the agent does not know is refused, not ignored.
    #[test]
    fn a_job_file_reads_with_defaults_and_refuses_unknown_keys() {
        let file: AgentJob = serde_json::from_str(
            r#"{"gitlab_url": "https://gitlab.example.com", "job": {"id": 1}}"#,
        )
        .unwrap();
        assert_eq!(file.executor, "local");
        assert_eq!(file.settings, AgentConfig::default());
        assert!(file.runner.is_empty() && file.masked.is_empty());
        let unknown = r#"{"gitlab_url": "u", "job": {}, "extra": 1}"#;
        assert!(serde_json::from_str::<AgentJob>(unknown).is_err());
    }

    #[test]
    fn fingerprints_cover_only_credentials_of_16_to_256_bytes() {
        assert_eq!(Fingerprint::of(&"k".repeat(15)), None);
        assert_eq!(Fingerprint::of(&"k".repeat(16)).map(|f| f.len), Some(16));
        assert_eq!(Fingerprint::of(&"k".repeat(256)).map(|f| f.len), Some(256));
        assert_eq!(Fingerprint::of(&"k".repeat(257)), None);
        assert_ne!(
            Fingerprint::of(&"k".repeat(16)),
            Fingerprint::of(&"j".repeat(16))
        );
    }
}
