//! `[[sources.github]]`: a repository or an organization kiln runs just-in-time Actions runners
//! for.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::problem::Problem;

/// GitHub.com's REST API.
pub const GITHUB_API: &str = "https://api.github.com";

/// One repository or organization.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitHubConfig {
    /// A name for logs, metrics and labels (default: the repository or organization).
    #[serde(default)]
    pub name: Option<String>,
    /// The REST API's base URL: `https://api.github.com`, or `https://HOST/api/v3` for GitHub
    /// Enterprise Server.
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// The owner of `repo` (repository scope).
    #[serde(default)]
    pub owner: Option<String>,
    /// The repository (repository scope, with `owner`).
    #[serde(default)]
    pub repo: Option<String>,
    /// The organization (organization scope: runners serve every repository the runner group
    /// allows).
    #[serde(default)]
    pub org: Option<String>,
    /// The enterprise (its slug; enterprise scope: runners registered at the enterprise serve
    /// the repositories of its organizations that the runner group allows). Needs a personal
    /// access token (classic) with `manage_runners:enterprise`: GitHub Apps and fine-grained
    /// tokens cannot use the enterprise runner endpoints.
    #[serde(default)]
    pub enterprise: Option<String>,
    /// A fine-grained personal access token (or use a GitHub App).
    #[serde(default)]
    pub token: Option<String>,
    /// The GitHub App's id.
    #[serde(default)]
    pub app_id: Option<u64>,
    /// The App's private key (the PEM file GitHub lets you download).
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// The App's private key itself, PEM text (for `KILN_SOURCES__GITHUB__N__PRIVATE_KEY` from a
    /// Kubernetes Secret); instead of `private_key_file`.
    #[serde(default)]
    pub private_key: Option<String>,
    /// The App's installation id (default: looked up for the repository or organization).
    #[serde(default)]
    pub installation_id: Option<u64>,
    /// The runner labels besides the default ones; a job runs here when every label of its
    /// `runs-on` is one of the runner's (case-insensitive).
    pub labels: Vec<String>,
    /// Leave out the default labels `config.sh` gives a runner (`self-hosted`, the OS, the
    /// architecture), which kiln gives its JIT runners too (GitHub adds none to a JIT runner):
    /// like `config.sh --no-default-labels`.
    #[serde(default)]
    pub no_default_labels: bool,
    /// The architecture label of the runners, as GitHub names it (`X64`, `ARM64`, `ARM`,
    /// `X86`; default: that of the machine kiln runs on). Set it when runner pods run on
    /// nodes of another architecture.
    #[serde(default)]
    pub runner_arch: Option<String>,
    /// The runner group runners join, by id (1 is the default group).
    #[serde(default = "default_group")]
    pub runner_group_id: u64,
    /// The runner group runners join, by name (organization scope; instead of
    /// `runner_group_id`): looked up at start and every `runner_group_refresh`.
    #[serde(default)]
    pub runner_group: Option<String>,
    /// How often a runner group named by `runner_group` is looked up again (renamed, or its
    /// repositories changed).
    #[serde(default = "default_group_refresh", with = "humantime_serde")]
    pub runner_group_refresh: Duration,
    /// A runner that took no job this long after it started is removed, with a warning naming
    /// the labels it offered and the labels of jobs still waiting unmatched (wrong labels, or a
    /// runner group that does not cover the repository); it counts as a failed attempt at its
    /// job. Warm runners (members of a warm pool, `min_idle`) are exempt.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Shared secret of `POST /hooks/github` (`workflow_job` events, `X-Hub-Signature-256`).
    #[serde(default)]
    pub webhook_secret: Option<String>,
    /// How often queued jobs are listed through the API (webhooks are not guaranteed).
    #[serde(default = "default_reconcile", with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// Organization scope: every repository's runs are listed at least once per this period
    /// (a slice of them at each reconcile; all at the first). Repositories with active runs,
    /// or named by a webhook since the last reconcile, are listed at every one. Shorter than
    /// `reconcile_interval`: every repository at every reconcile.
    #[serde(default = "default_org_sweep", with = "humantime_serde")]
    pub org_sweep_interval: Duration,
    /// Runners of this source at once (0: only `concurrent` limits).
    #[serde(default)]
    pub max_runners: usize,
    /// Idle runners kept waiting for jobs (a warm floor; 0: none while nothing is queued):
    /// shorthand for a `[[warm_pools]]` entry of this source in the default class, which the
    /// coordinator makes of it; the source keeps the floors the chain gives it.
    #[serde(default)]
    pub min_idle: usize,
    /// Image of the runner container.
    #[serde(default = "default_image")]
    pub runner_image: String,
    /// The runner's command (in the image, or on this machine with the local executor); the
    /// JIT config reaches it in `ACTIONS_RUNNER_INPUT_JITCONFIG`, never on the command line.
    #[serde(default = "default_command")]
    pub runner_command: Vec<String>,
    /// The runner's work folder.
    #[serde(default = "default_work_folder")]
    pub work_folder: String,
    /// Resource classes by job label (`gpu = "eci-gpu"`); a `kiln-class=<name>` label names
    /// one directly.
    #[serde(default)]
    pub label_classes: BTreeMap<String, String>,
    /// Re-run (once) the failed jobs of a run whose job was lost with its runner pod
    /// (evicted, spot reclaim, OOM kill).
    #[serde(default)]
    pub rerun_on_infrastructure_failure: bool,
    /// How jobs that use `container:`, `services:` or Docker container actions get a Docker
    /// daemon: `none` (the default: such jobs fail at their first container step) or `dind`
    /// (a privileged `docker:dind` sidecar in each runner pod; needs
    /// `[kubernetes] privileged = true`).
    #[serde(default)]
    pub container_mode: ContainerMode,
    /// The image of the `dind` sidecar.
    #[serde(default = "default_dind_image")]
    pub dind_image: String,
}

/// How a runner pod serves container jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerMode {
    /// No Docker daemon.
    #[default]
    None,
    /// A `docker:dind` sidecar sharing the work volume; the runner reaches it via `DOCKER_HOST`.
    Dind,
}

fn default_dind_image() -> String {
    "docker:dind".into()
}

fn default_api_url() -> String {
    GITHUB_API.into()
}

fn default_group() -> u64 {
    1
}

fn default_org_sweep() -> Duration {
    Duration::from_secs(600)
}

fn default_group_refresh() -> Duration {
    Duration::from_secs(600)
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(600)
}

fn default_reconcile() -> Duration {
    Duration::from_secs(60)
}

fn default_image() -> String {
    "ghcr.io/actions/actions-runner:latest".into()
}

fn default_command() -> Vec<String> {
    vec!["/home/runner/run.sh".into()]
}

fn default_work_folder() -> String {
    "_work".into()
}

/// GitHub's architecture labels (`config.sh` names the runner's architecture so).
const ARCHITECTURES: [&str; 4] = ["X64", "ARM64", "ARM", "X86"];

/// The OS label `config.sh` gives a runner on this machine.
fn host_os() -> &'static str {
    match std::env::consts::OS {
        "windows" => "Windows",
        "macos" => "macOS",
        _ => "Linux",
    }
}

/// The architecture label `config.sh` gives a runner on this machine.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "ARM64",
        "arm" => "ARM",
        "x86" => "X86",
        _ => "X64",
    }
}

/// Where runners are registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    /// `owner/repo`.
    Repo {
        /// The owner.
        owner: String,
        /// The repository.
        repo: String,
    },
    /// An organization.
    Org(String),
    /// An enterprise, by slug.
    Enterprise(String),
}

impl GitHubConfig {
    /// The scope, when the entry names exactly one.
    pub(crate) fn scope(&self) -> Option<Scope> {
        match (&self.owner, &self.repo, &self.org, &self.enterprise) {
            (Some(owner), Some(repo), None, None) => Some(Scope::Repo {
                owner: owner.clone(),
                repo: repo.clone(),
            }),
            (None, None, Some(org), None) => Some(Scope::Org(org.clone())),
            (None, None, None, Some(enterprise)) => Some(Scope::Enterprise(enterprise.clone())),
            _ => None,
        }
    }

    /// The labels of kiln's runners: the default ones (`self-hosted`, OS, architecture) unless
    /// `no_default_labels`, then the configured ones.
    pub(crate) fn runner_labels(&self) -> Vec<String> {
        let mut labels = Vec::new();
        if !self.no_default_labels {
            let arch = self.runner_arch.as_deref().and_then(|arch| {
                ARCHITECTURES
                    .iter()
                    .find(|a| a.eq_ignore_ascii_case(arch))
                    .copied()
            });
            labels.extend(
                ["self-hosted", host_os(), arch.unwrap_or_else(host_arch)].map(str::to_owned),
            );
        }
        for label in &self.labels {
            if !labels.iter().any(|l| l.eq_ignore_ascii_case(label)) {
                labels.push(label.clone());
            }
        }
        labels
    }

    /// The name used in logs, metrics and labels.
    pub fn display_name(&self, index: usize) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        match self.scope() {
            Some(Scope::Repo { owner, repo }) => format!("{owner}-{repo}"),
            Some(Scope::Org(org) | Scope::Enterprise(org)) => org,
            None => format!("github-{index}"),
        }
    }

    /// Every problem of entry `index`.
    pub(crate) fn problems(&self, index: usize, classes: &[String]) -> Vec<Problem> {
        let mut problems = Vec::new();
        let at = |field: &str| format!("sources.github[{index}].{field}");
        let mut problem =
            |path: String, message: String| problems.push(Problem::new(path, message));
        if let Some(message) = crate::sources::url_problem(&self.api_url) {
            problem(at("api_url"), message);
        }
        if self.scope().is_none() {
            problem(
                at("org"),
                "set either `owner` and `repo` (repository runners), `org` (organization runners) or `enterprise` (enterprise runners)".into(),
            );
        }
        if self.enterprise.is_some() && has_app_settings(self) {
            problem(
                at("app_id"),
                "enterprise runners need a personal access token (classic) with the manage_runners:enterprise scope in `token`: GitHub Apps cannot register enterprise runners".into(),
            );
        }
        let has_token = self.token.as_deref().is_some_and(|t| !t.trim().is_empty());
        let has_key = self
            .private_key
            .as_deref()
            .is_some_and(|k| !k.trim().is_empty());
        let has_app = self.app_id.is_some() || self.private_key_file.is_some() || has_key;
        match (has_token, has_app) {
            (true, true) => problem(
                at("token"),
                "set a token or a GitHub App (app_id, private_key_file), not both".into(),
            ),
            (false, false) => problem(
                at("token"),
                format!(
                    "set a fine-grained token (KILN_SOURCES__GITHUB__{index}__TOKEN) or a GitHub App (app_id and private_key_file)"
                ),
            ),
            (false, true) => {
                if self.app_id.is_none() {
                    problem(at("app_id"), "a GitHub App needs its app_id".into());
                }
                match &self.private_key_file {
                    Some(_) if has_key => problem(
                        at("private_key"),
                        "set private_key or private_key_file, not both".into(),
                    ),
                    None if has_key => {}
                    None => problem(
                        at("private_key_file"),
                        format!(
                            "a GitHub App needs its private key: a file, or the PEM text in KILN_SOURCES__GITHUB__{index}__PRIVATE_KEY"
                        ),
                    ),
                    Some(path) if !path.is_file() => problem(
                        at("private_key_file"),
                        format!("{} is not a readable file", path.display()),
                    ),
                    Some(_) => {}
                }
            }
            (true, false) => {}
        }
        if self.labels.is_empty() {
            problem(
                at("labels"),
                "list at least one label (jobs choose runners with `runs-on: [self-hosted, <label>]`)".into(),
            );
        }
        if self.runner_command.is_empty() {
            problem(
                at("runner_command"),
                "must name the runner's program".into(),
            );
        }
        if self.webhook_secret.as_deref().is_some_and(|s| s.len() < 16) {
            problem(
                at("webhook_secret"),
                "must be at least 16 characters".into(),
            );
        }
        if let Some(arch) = &self.runner_arch
            && !ARCHITECTURES.iter().any(|a| a.eq_ignore_ascii_case(arch))
        {
            problem(
                at("runner_arch"),
                format!(
                    "`{arch}` is not one of GitHub's architecture labels ({})",
                    ARCHITECTURES.join(", ")
                ),
            );
        }
        if self.runner_group.is_some() {
            if self.runner_group_id != default_group() {
                problem(
                    at("runner_group"),
                    "set runner_group (a name) or runner_group_id, not both".into(),
                );
            }
            if self.org.is_none() && self.enterprise.is_none() {
                problem(
                    at("runner_group"),
                    "runner groups belong to an organization or enterprise: set `org` or `enterprise` (repository runners join the default group)".into(),
                );
            }
        }
        if self.idle_timeout < Duration::from_secs(10) {
            problem(
                at("idle_timeout"),
                "must be at least 10s (a runner pod needs time to start)".into(),
            );
        }
        if self.reconcile_interval < Duration::from_secs(5) {
            problem(at("reconcile_interval"), "must be at least 5s".into());
        }
        if self.max_runners > 0 && self.min_idle > self.max_runners {
            problem(
                at("min_idle"),
                format!("is more than max_runners ({})", self.max_runners),
            );
        }
        for (label, class) in &self.label_classes {
            if !classes.contains(class) {
                problem(
                    at(&format!("label_classes.{label}")),
                    format!("`{class}` is not in [kubernetes.resource_classes]"),
                );
            }
        }
        problems
    }

    /// The problems of `container_mode` under the executor's settings: `dind` runs a privileged
    /// sidecar, so it needs pods and the admin's `[kubernetes] privileged` opt-in.
    pub(crate) fn container_problems(
        &self,
        index: usize,
        pods: bool,
        privileged: bool,
    ) -> Vec<Problem> {
        if self.container_mode != ContainerMode::Dind {
            return Vec::new();
        }
        let path = format!("sources.github[{index}].container_mode");
        if !pods {
            return vec![Problem::new(
                path,
                "`dind` runs a sidecar in the runner pod: it needs executor = \"kubernetes\"",
            )];
        }
        if !privileged {
            return vec![Problem::new(
                path,
                "`dind` runs a privileged docker:dind sidecar (root on the node): set `[kubernetes] privileged = true` to allow it, or leave container_mode unset",
            )];
        }
        Vec::new()
    }
}

/// Whether any GitHub App setting is given.
fn has_app_settings(config: &GitHubConfig) -> bool {
    config.app_id.is_some()
        || config.private_key_file.is_some()
        || config
            .private_key
            .as_deref()
            .is_some_and(|k| !k.trim().is_empty())
        || config.installation_id.is_some()
}

// By hand, not derived: `Debug` output ends up in logs and panic messages, and the token and
// webhook secret must not (a derived `Debug` printed them whole).
impl std::fmt::Debug for GitHubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |set: bool| if set { "[redacted]" } else { "None" };
        f.debug_struct("GitHubConfig")
            .field("api_url", &crate::net::redact_url(&self.api_url))
            .field("name", &self.name)
            .field("owner", &self.owner)
            .field("repo", &self.repo)
            .field("org", &self.org)
            .field("enterprise", &self.enterprise)
            .field("token", &redacted(self.token.is_some()))
            .field("app_id", &self.app_id)
            .field("private_key_file", &self.private_key_file)
            .field("installation_id", &self.installation_id)
            .field("labels", &self.labels)
            .field("no_default_labels", &self.no_default_labels)
            .field("runner_group", &self.runner_group)
            .field("webhook_secret", &redacted(self.webhook_secret.is_some()))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> GitHubConfig {
        toml::from_str(&format!(
            "org = \"acme\"\ntoken = \"t\"\nlabels = [\"kiln\", \"linux\"]\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn runners_get_config_sh_default_labels_unless_opted_out() {
        let labels = config("runner_arch = \"arm64\"").runner_labels();
        assert_eq!(labels, ["self-hosted", host_os(), "ARM64", "kiln"]);
        assert!(
            host_os() != "Linux" || !labels.iter().any(|l| l == "linux"),
            "a configured label the defaults carry is not repeated"
        );
        assert_eq!(
            config("no_default_labels = true").runner_labels(),
            ["kiln", "linux"]
        );
        assert_eq!(config("").runner_labels()[2], host_arch());
    }

    #[test]
    fn wrong_architecture_and_group_settings_are_named_with_their_path() {
        let problems = |extra: &str| -> Vec<String> {
            config(extra)
                .problems(0, &[])
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        let arch = problems("runner_arch = \"amd64\"");
        assert!(
            arch.iter()
                .any(|p| p.contains("sources.github[0].runner_arch") && p.contains("X64, ARM64")),
            "{arch:?}"
        );
        let both = problems("runner_group = \"kiln\"\nrunner_group_id = 3");
        assert!(
            both.iter()
                .any(|p| p.contains("runner_group") && p.contains("not both")),
            "{both:?}"
        );
        let short = problems("idle_timeout = \"2s\"");
        assert!(
            short.iter().any(|p| p.contains("idle_timeout")),
            "{short:?}"
        );
        assert!(problems("runner_group = \"kiln\"").is_empty());
    }

    #[test]
    fn enterprise_scope_wants_a_classic_token_and_dind_wants_pods_and_the_privileged_opt_in() {
        let enterprise: GitHubConfig = toml::from_str(
            "enterprise = \"megacorp\"\ntoken = \"t\"\nlabels = [\"kiln\"]\nrunner_group = \"ci\"",
        )
        .unwrap();
        assert_eq!(
            enterprise.scope(),
            Some(Scope::Enterprise("megacorp".into()))
        );
        assert!(enterprise.problems(0, &[]).is_empty());
        let with_app: GitHubConfig = toml::from_str(
            "enterprise = \"megacorp\"\napp_id = 3\nprivate_key = \"pem\"\nlabels = [\"kiln\"]",
        )
        .unwrap();
        let problems: Vec<String> = with_app
            .problems(2, &[])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("sources.github[2].app_id")
                    && p.contains("manage_runners:enterprise")),
            "{problems:?}"
        );
        let both = config("enterprise = \"megacorp\"");
        assert!(both.scope().is_none());
        let dind = config("container_mode = \"dind\"");
        assert!(dind.container_problems(0, true, true).is_empty());
        assert!(config("").container_problems(0, false, false).is_empty());
        let refused = dind.container_problems(0, true, false);
        assert!(
            refused[0]
                .to_string()
                .contains("sources.github[0].container_mode")
                && refused[0].to_string().contains("privileged = true"),
            "{refused:?}"
        );
        assert!(
            dind.container_problems(0, false, true)[0]
                .to_string()
                .contains("kubernetes")
        );
    }
}
