//! The job JSON GitLab returns from `POST jobs/request` (only the fields kiln uses).
//!
//! Every field has a default and unknown keys are ignored: GitLab adds fields often, and a job
//! kiln cannot parse is a job that would be lost.

use serde::{Deserialize, Serialize};

/// GitLab's longest job timeout (one month); a payload asking for more gets this.
const MAX_JOB_TIMEOUT_SECS: u64 = 31 * 24 * 3600;

/// One job as GitLab hands it to a runner.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JobPayload {
    /// GitLab's job id.
    pub id: u64,
    /// The job token: authenticates trace, update and artifact calls, and the git clone.
    pub token: String,
    /// Whether a fetch into an existing checkout is allowed.
    pub allow_git_fetch: bool,
    /// Names and pipeline context.
    pub job_info: JobInfo,
    /// What to clone.
    pub git_info: GitInfo,
    /// Runner-side limits.
    pub runner_info: RunnerInfo,
    /// CI/CD variables, in precedence order.
    pub variables: Vec<Variable>,
    /// The steps to run (`script`, `after_script`, …).
    pub steps: Vec<Step>,
    /// The job's image.
    pub image: Option<Image>,
    /// Service containers.
    pub services: Vec<Image>,
    /// Artifacts to upload at the end.
    pub artifacts: Vec<Artifact>,
    /// Artifacts of earlier jobs to download first.
    pub dependencies: Vec<Dependency>,
    /// Caches to restore before the script and save after it (`cache:`).
    pub cache: Vec<Cache>,
    /// What the GitLab server supports for this job.
    pub features: JobFeatures,
    /// Registry logins for the job's images (the project's registry with the job token).
    pub credentials: Vec<Credential>,
    /// `hooks:` scripts (`pre_get_sources_script`, `post_get_sources_script`).
    pub hooks: Vec<Hook>,
}

/// One `hooks:` entry of the job.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Hook {
    /// `pre_get_sources_script` or `post_get_sources_script`.
    pub name: String,
    /// Its shell lines.
    pub script: Vec<String>,
}

/// One entry of `credentials` (`{type: "registry", url, username, password}`).
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Credential {
    /// `registry` for a container registry login.
    #[serde(rename = "type")]
    pub kind: String,
    /// The registry (`registry.example.com:5005`).
    pub url: String,
    /// The user name (`gitlab-ci-token`).
    pub username: String,
    /// The password (the job token).
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password is the job token: never in a log line.
        f.debug_struct("Credential")
            .field("type", &self.kind)
            .field("url", &self.url)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// `job_info`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JobInfo {
    /// The job name (`build`, `test 1/3`, …).
    pub name: String,
    /// The stage name.
    pub stage: String,
    /// The pipeline id.
    pub pipeline_id: Option<u64>,
    /// The project id.
    pub project_id: Option<u64>,
    /// The project name.
    pub project_name: String,
    /// `group/subgroup/project`.
    pub project_full_path: Option<String>,
    /// How long the job waited in GitLab's queue.
    pub time_in_queue_seconds: Option<f64>,
}

/// `git_info`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GitInfo {
    /// Clone URL; carries `gitlab-ci-token:<job token>@` for authentication.
    pub repo_url: String,
    /// Branch or tag name.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The commit to check out.
    pub sha: String,
    /// The previous commit of the push.
    pub before_sha: String,
    /// `branch` or `tag`.
    pub ref_type: String,
    /// Refspecs to fetch.
    pub refspecs: Vec<String>,
    /// Shallow clone depth; 0 means full history.
    pub depth: u32,
}

/// `runner_info`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunnerInfo {
    /// The job timeout in seconds.
    pub timeout: Option<u64>,
}

/// One CI/CD variable.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Variable {
    /// The name.
    pub key: String,
    /// The value.
    pub value: String,
    /// Whether the value may be shown.
    pub public: bool,
    /// A file variable: the value goes into a file and the variable holds its path.
    pub file: bool,
    /// Mask the value in the trace.
    pub masked: bool,
    /// Do not expand `$VAR` references in the value.
    pub raw: bool,
}

/// When a step runs, relative to the outcome of the steps before it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Only if everything so far succeeded.
    #[default]
    OnSuccess,
    /// Only if something failed.
    OnFailure,
    /// Always.
    Always,
    /// Any value kiln does not know; treated like `on_success`.
    #[serde(other)]
    Unknown,
}

impl When {
    /// Whether something with this `when` runs after a job that has `failed` so far.
    pub fn applies(self, failed: bool) -> bool {
        match self {
            Self::Always => true,
            Self::OnFailure => failed,
            Self::OnSuccess | Self::Unknown => !failed,
        }
    }
}

/// One step of a job.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Step {
    /// `script`, `after_script`, `release`, …
    pub name: String,
    /// Shell lines; `before_script` is already merged into `script` by GitLab.
    pub script: Vec<String>,
    /// Step timeout in seconds.
    pub timeout: Option<u64>,
    /// When it runs.
    pub when: When,
    /// A failure of this step does not fail the job.
    pub allow_failure: bool,
}

/// An image or a service.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Image {
    /// Image reference.
    pub name: String,
    /// Network alias (services).
    pub alias: Option<String>,
    /// Command override.
    pub command: Vec<String>,
    /// Entrypoint override.
    pub entrypoint: Vec<String>,
    /// Variables of a service container (`services: [{name, variables}]`).
    pub variables: Vec<ImageVariable>,
    /// `always`, `if-not-present` or `never`, in order of preference.
    pub pull_policy: Vec<String>,
    /// Executor-specific options (`image:kubernetes:user`, `image:docker:platform`).
    pub executor_opts: ExecutorOpts,
}

/// `executor_opts` of an image.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecutorOpts {
    /// `kubernetes:` options.
    pub kubernetes: KubernetesOpts,
}

/// `image:kubernetes:` options.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct KubernetesOpts {
    /// `uid` or `uid:gid` the build container runs as.
    pub user: Option<String>,
}

/// A variable of a service (`{key, value}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageVariable {
    /// The name.
    pub key: String,
    /// The value.
    pub value: String,
}

/// One artifact to upload.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Artifact {
    /// Archive name (without extension).
    pub name: Option<String>,
    /// Include files git does not track.
    pub untracked: bool,
    /// Glob patterns relative to the project directory.
    pub paths: Vec<String>,
    /// Glob patterns to leave out.
    pub exclude: Vec<String>,
    /// When to upload.
    pub when: Option<When>,
    /// `archive`, `junit`, `dotenv`, …
    pub artifact_type: Option<String>,
    /// `zip`, `gzip` or `raw`.
    pub artifact_format: Option<String>,
    /// How long GitLab keeps it (`1 week`).
    pub expire_in: Option<String>,
}

/// One entry of `cache:`, as GitLab sends it: `key:files`, `prefix` and the protected-branch
/// suffix are already folded into `key`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Cache {
    /// The cache key (`default` when GitLab sends none).
    pub key: String,
    /// Include files git does not track.
    pub untracked: bool,
    /// `pull`, `push` or `pull-push`.
    pub policy: CachePolicy,
    /// Glob patterns relative to the project directory, as for artifacts.
    pub paths: Vec<String>,
    /// When to save it.
    pub when: Option<When>,
    /// Keys to restore from when `key` has no cache, in order.
    pub fallback_keys: Vec<String>,
}

/// `cache:policy`: whether a job restores and whether it saves the cache.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum CachePolicy {
    /// Restore only.
    #[serde(rename = "pull")]
    Pull,
    /// Save only.
    #[serde(rename = "push")]
    Push,
    /// Restore, then save (GitLab's default).
    #[default]
    #[serde(rename = "pull-push", alias = "pull_push")]
    PullPush,
    /// A value kiln does not know; treated like `pull-push`, GitLab's default.
    #[serde(other)]
    Unknown,
}

impl CachePolicy {
    /// Whether the cache is restored before the script.
    pub fn pulls(self) -> bool {
        matches!(self, Self::Pull | Self::PullPush | Self::Unknown)
    }

    /// Whether the cache is saved after the script.
    pub fn pushes(self) -> bool {
        matches!(self, Self::Push | Self::PullPush | Self::Unknown)
    }
}

/// An earlier job whose artifacts this job needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Dependency {
    /// That job's id.
    pub id: u64,
    /// That job's token, which authenticates the download.
    pub token: String,
    /// That job's name.
    pub name: String,
    /// Present when it has an artifacts archive.
    pub artifacts_file: Option<ArtifactsFile>,
}

/// The archive of a dependency.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ArtifactsFile {
    /// File name.
    pub filename: String,
    /// Size in bytes.
    pub size: u64,
}

/// `features` of the job: what GitLab accepts back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JobFeatures {
    /// Whether collapsible sections are rendered.
    pub trace_sections: bool,
    /// Token prefixes (`glpat-`) whose tokens must be masked.
    pub token_mask_prefixes: Vec<String>,
    /// The failure reasons GitLab accepts for this job.
    pub failure_reasons: Vec<String>,
}

impl JobPayload {
    /// The job timeout, defaulting to GitLab's one hour.
    pub fn timeout(&self) -> std::time::Duration {
        // Clamped to GitLab's own ceiling, so deadlines computed from it cannot overflow.
        std::time::Duration::from_secs(
            self.runner_info
                .timeout
                .unwrap_or(3600)
                .clamp(1, MAX_JOB_TIMEOUT_SECS),
        )
    }

    /// The value GitLab itself gave variable `key`: its first definition. GitLab lists its
    /// predefined variables before any the project or the job defines, so a job's own
    /// `CI_JOB_URL` cannot stand in for the real one where kiln shows it.
    pub fn predefined_variable(&self, key: &str) -> Option<&str> {
        self.variables
            .iter()
            .find(|v| v.key == key)
            .map(|v| v.value.as_str())
    }

    /// The value of variable `key`, the last definition winning as in GitLab.
    pub fn variable(&self, key: &str) -> Option<&str> {
        self.variables
            .iter()
            .rev()
            .find(|v| v.key == key)
            .map(|v| v.value.as_str())
    }

    /// Picks the failure reason GitLab will accept for this job.
    ///
    /// GitLab rejects reasons the job does not list in `features.failure_reasons`, so an
    /// unlisted reason falls back to `runner_system_failure` (infrastructure) or
    /// `script_failure`. An empty list (older GitLab) accepts the classic reasons only.
    pub fn accepted_reason(&self, reason: crate::build::FailureReason) -> &'static str {
        let listed = |name: &str| self.features.failure_reasons.iter().any(|r| r == name);
        if listed(reason.as_str()) {
            return reason.as_str();
        }
        if reason.is_infrastructure() {
            if listed("runner_system_failure") || self.features.failure_reasons.is_empty() {
                return "runner_system_failure";
            }
            return "unknown_failure";
        }
        "script_failure"
    }
}

/// What makes `raw` not a job GitLab documents: every job comes with the steps to run and the
/// sources to fetch. `None` when it is fine.
pub(crate) fn malformed(raw: &serde_json::Value) -> Option<String> {
    let mut missing = Vec::new();
    if raw
        .get("steps")
        .and_then(serde_json::Value::as_array)
        .is_none_or(Vec::is_empty)
    {
        missing.push("`steps`");
    }
    if !raw
        .get("git_info")
        .is_some_and(serde_json::Value::is_object)
    {
        missing.push("`git_info`");
    }
    (!missing.is_empty()).then(|| {
        format!(
            "the job's payload has no {}, which GitLab sends with every job; kiln does not run it",
            missing.join(" and no ")
        )
    })
}

/// The job id and token from the start of a job body, even a truncated or broken one (GitLab
/// sends them first): enough to fail a job kiln cannot run.
pub(crate) fn identity(prefix: &[u8]) -> Option<(u64, String)> {
    use serde::de::{IgnoredAny, MapAccess, Visitor};

    struct Seek<'a> {
        id: &'a mut Option<u64>,
        token: &'a mut Option<String>,
    }
    impl<'de> Visitor<'de> for Seek<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a job object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<String>()? {
                match key.as_str() {
                    "id" => *self.id = Some(map.next_value()?),
                    "token" => *self.token = Some(map.next_value()?),
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                if self.id.is_some() && self.token.is_some() {
                    break;
                }
            }
            Ok(())
        }
    }
    let (mut id, mut token) = (None, None);
    let mut reader = serde_json::Deserializer::from_slice(prefix);
    // The rest of the body may be cut off or broken: what was read before that is what counts.
    let _ = serde::Deserializer::deserialize_map(
        &mut reader,
        Seek {
            id: &mut id,
            token: &mut token,
        },
    );
    Some((id.filter(|id| *id > 0)?, token.filter(|t| !t.is_empty())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::FailureReason;

    #[test]
    fn unknown_keys_and_nulls_are_tolerated() {
        let json = r#"{"id": 7, "token": "t", "brand_new_field": {"x": 1},
            "image": null, "steps": [{"name": "script", "script": ["true"], "when": "someday"}],
            "variables": [{"key": "A", "value": "1", "public": true}]}"#;
        let job: JobPayload = serde_json::from_str(json).unwrap();
        assert_eq!(job.id, 7);
        assert_eq!(job.steps[0].when, When::Unknown);
        assert_eq!(job.variable("A"), Some("1"));
    }

    #[test]
    fn identity_is_read_from_a_truncated_body() {
        let body =
            br#"{"id": 42, "token": "job-token-x", "variables": [{"key": "A", "value": "aaaa"#;
        assert_eq!(identity(body), Some((42, "job-token-x".into())));
        assert_eq!(
            identity(br#"{"token": "t", "id": 9, "x": 1}"#),
            Some((9, "t".into()))
        );
        assert_eq!(identity(br#"{"id": 42, "steps": []"#), None);
        assert_eq!(identity(b"<html>"), None);
    }

    #[test]
    fn a_job_without_steps_or_sources_is_malformed() {
        let ok = serde_json::json!({"id": 1, "token": "t", "steps": [{"name": "script"}], "git_info": {}});
        assert_eq!(malformed(&ok), None);
        let bad = serde_json::json!({"id": 1, "token": "t", "steps": []});
        let problem = malformed(&bad).unwrap();
        assert!(
            problem.contains("no `steps` and no `git_info`"),
            "{problem}"
        );
    }

    #[test]
    fn unlisted_reason_falls_back_by_blame() {
        let mut job = JobPayload::default();
        job.features.failure_reasons =
            vec!["script_failure".into(), "runner_system_failure".into()];
        assert_eq!(
            job.accepted_reason(FailureReason::ImagePullFailure),
            "runner_system_failure"
        );
        assert_eq!(
            job.accepted_reason(FailureReason::JobExecutionTimeout),
            "script_failure"
        );
        job.features
            .failure_reasons
            .push("job_execution_timeout".into());
        assert_eq!(
            job.accepted_reason(FailureReason::JobExecutionTimeout),
            "job_execution_timeout"
        );
    }
}
