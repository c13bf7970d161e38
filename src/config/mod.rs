//! Typed configuration: one TOML file, every field overridable by `KILN_…` environment variables
//! (`env.rs`), and validation that reports every problem with its path. Each module owns its
//! section's type and checks; this module composes them.

mod env;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use env::Overrides;

pub use crate::coordinator::CostConfig;
pub use crate::executor::kubernetes::KubernetesConfig;
pub use crate::executor::local::LocalConfig;
pub use crate::gitlab::register::is_system_id;
pub use crate::http::{HttpConfig, StatusConfig};
pub use crate::job_file::AgentConfig;
pub use crate::problem::{ConfigError, Problem};
pub use crate::sources::github::GitHubConfig;
pub use crate::sources::gitlab::GitLabRunnerConfig;
pub use crate::sources::jenkins::JenkinsConfig;
pub use crate::telemetry::{LogConfig, LogFormat};

/// The environment variable that names the config file (the one name `KILN_` reserves).
pub const CONFIG_ENV: &str = "KILN_CONFIG";
/// The most builds `concurrent` (and any per-source limit) may allow: far beyond what one
/// coordinator runs, far below what its semaphores can count.
pub const MAX_CONCURRENT: usize = 100_000;

/// The whole coordinator configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Jobs run at once across all sources.
    #[serde(default = "default_concurrent")]
    pub concurrent: usize,
    /// How long SIGTERM waits for running jobs before cancelling them.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Where builds run.
    #[serde(default)]
    pub executor: ExecutorKind,
    /// The HTTP server (health, readiness, metrics).
    #[serde(default)]
    pub http: HttpConfig,
    /// The status page and its JSON API.
    #[serde(default)]
    pub status: StatusConfig,
    /// Prices of what builds use, for their cost.
    #[serde(default)]
    pub cost: CostConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The local (child-process) executor.
    #[serde(default)]
    pub local: LocalConfig,
    /// The Kubernetes executor.
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    /// What the agent does inside each build.
    #[serde(default)]
    pub agent: AgentConfig,
    /// The CI servers to take jobs from.
    #[serde(default)]
    pub sources: Sources,
    /// Defaults for `kiln deploy` (region, OSS bucket, …), read by that command.
    #[serde(default)]
    pub deploy: crate::deploy::DeployConfig,
    /// The build cache (`cache:` of GitLab jobs); none when absent.
    #[serde(default)]
    pub cache: Option<crate::cache::CacheConfig>,
    /// Pools of pre-started build members (`[[warm_pools]]`).
    #[serde(default)]
    pub warm_pools: Vec<crate::coordinator::WarmPoolConfig>,
    /// The most idle warm members across all pools (0: no cap); `concurrent` counts running
    /// builds only.
    #[serde(default)]
    pub max_idle_total: usize,
}

fn default_concurrent() -> usize {
    4
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(600)
}

impl Default for Config {
    fn default() -> Self {
        Self {
            concurrent: default_concurrent(),
            shutdown_timeout: default_shutdown_timeout(),
            executor: ExecutorKind::default(),
            http: HttpConfig::default(),
            status: StatusConfig::default(),
            cost: CostConfig::default(),
            log: LogConfig::default(),
            local: LocalConfig::default(),
            kubernetes: KubernetesConfig::default(),
            agent: AgentConfig::default(),
            sources: Sources::default(),
            deploy: crate::deploy::DeployConfig::default(),
            cache: None,
            warm_pools: Vec::new(),
            max_idle_total: 0,
        }
    }
}

/// Where builds run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// A child process per job on this machine.
    #[default]
    Local,
    /// A pod per job in a Kubernetes cluster.
    Kubernetes,
}

/// `[sources]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sources {
    /// GitLab runners (`[[sources.gitlab]]`), each with its own token.
    pub gitlab: Vec<GitLabRunnerConfig>,
    /// Jenkins controllers (`[[sources.jenkins]]`) kiln provisions agents for.
    pub jenkins: Vec<JenkinsConfig>,
    /// GitHub repositories or organizations (`[[sources.github]]`) kiln runs JIT runners for.
    pub github: Vec<GitHubConfig>,
}

impl Config {
    /// Reads `path` (if given), applies `KILN_…` overrides from the process environment and
    /// validates the result.
    ///
    /// # Errors
    /// Unreadable file, TOML syntax errors (with line and column), unknown or mistyped fields
    /// (with their path, or the environment variable that set them), and every validation
    /// problem at once.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// [`Config::load`] with an explicit environment (for tests).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (mut table, origin, text) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                let table = text
                    .parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax {
                        path: path.to_owned(),
                        message: e.to_string().trim_end().to_owned(),
                    })?;
                (table, path.display().to_string(), Some(text))
            }
            None => (toml::Table::new(), "the configuration".to_owned(), None),
        };
        let overrides = Overrides::from_env(env);
        let mut problems = overrides.apply(&mut table);
        if !problems.is_empty() {
            return Err(ConfigError::Invalid { origin, problems });
        }
        let locate = |segments: &[Segment]| {
            let at = path_text(segments);
            let from_env = overrides.hint(&at);
            if from_env != at {
                return from_env;
            }
            match text.as_deref().and_then(|t| line_of(t, segments)) {
                Some(line) => format!("{at} (line {line})"),
                None => at,
            }
        };
        // Serde stops at the first structural problem (an unknown key, a wrong type). To report
        // every one, each is noted and its key taken out, and the rest is read again.
        let mut removed: Vec<Vec<Segment>> = Vec::new();
        let config = loop {
            match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(table.clone())) {
                Ok(config) => break Some(config),
                Err(e) => {
                    let segments = segments(e.path());
                    // toml appends "in `table`", which the path already says.
                    let message = e
                        .into_inner()
                        .to_string()
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    // A key taken out before and now missing is the same problem again.
                    let repeat = removed
                        .iter()
                        .any(|r| segments.starts_with(r) || r.starts_with(&segments));
                    if !repeat {
                        problems.push(Problem {
                            path: locate(&segments),
                            message,
                        });
                    }
                    if repeat || segments.is_empty() || !remove(&mut table, &segments) {
                        break None;
                    }
                    removed.push(segments);
                }
            }
        };
        if let Some(config) = &config {
            let shown: Vec<String> = removed.iter().map(|r| path_text(r)).collect();
            problems.extend(
                config
                    .problems()
                    .into_iter()
                    .filter(|p| !shown.iter().any(|r| p.path.starts_with(r.as_str()))),
            );
        }
        match config {
            Some(mut config) if problems.is_empty() => {
                config.trim_secrets();
                Ok(config)
            }
            _ => Err(ConfigError::Invalid { origin, problems }),
        }
    }

    /// A warning when the file at `path`, which this configuration was read from, holds a
    /// token, password or secret and other users of the machine can read it.
    pub fn exposure_warning(&self, path: &Path) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        let text = std::fs::read_to_string(path).ok()?;
        let table = text.parse::<toml::Table>().ok()?;
        (mode & 0o044 != 0 && holds_secret(&toml::Value::Table(table))).then(|| {
            format!(
                "{} holds tokens or secrets and other users can read it (mode {:o}): `chmod 600` it, \
                 or keep the secrets in KILN_… environment variables (a Kubernetes Secret)",
                path.display(),
                mode & 0o777
            )
        })
    }

    /// Takes the line break off the end of every token, password and secret: a Kubernetes
    /// Secret made from a file (`kubectl create secret --from-file`, `echo … >`) carries one,
    /// and a token that ends in `\n` can never match what a client presents.
    fn trim_secrets(&mut self) {
        self.each_secret(|secret| {
            let kept = secret.trim_end_matches(['\n', '\r']).len();
            secret.truncate(kept);
        });
    }

    /// Fingerprints of every credential of this configuration, for build traces to mask
    /// without any build holding the credentials.
    pub fn credential_fingerprints(&self) -> Vec<crate::job_file::Fingerprint> {
        let mut fingerprints = Vec::new();
        self.clone().each_secret(|secret| {
            fingerprints.extend(crate::job_file::Fingerprint::of(secret));
        });
        fingerprints
    }

    /// Calls `f` with every token, password, key and secret of the configuration.
    fn each_secret(&mut self, mut f: impl FnMut(&mut String)) {
        let optional = self
            .status
            .token
            .iter_mut()
            .chain(self.sources.jenkins.iter_mut().flat_map(|j| {
                j.token
                    .iter_mut()
                    .chain(j.password.iter_mut())
                    .chain(j.webhook_secret.iter_mut())
            }))
            .chain(self.sources.github.iter_mut().flat_map(|g| {
                g.token
                    .iter_mut()
                    .chain(g.webhook_secret.iter_mut())
                    .chain(g.private_key.iter_mut())
            }))
            .chain(self.cache.iter_mut().flat_map(|c| c.secrets_mut()));
        for secret in optional {
            f(secret);
        }
        for runner in &mut self.sources.gitlab {
            f(&mut runner.token);
        }
    }

    /// Why this configuration gives `kiln run` nothing to do, if it does not.
    pub fn no_sources(&self) -> Option<Problem> {
        (self.sources.gitlab.is_empty()
            && self.sources.jenkins.is_empty()
            && self.sources.github.is_empty())
        .then(|| Problem {
            path: "sources".into(),
            message: "no job sources configured: add a [[sources.gitlab]] runner (see `kiln register --help`), a [[sources.jenkins]] controller or a [[sources.github]] repository or organization".into(),
        })
    }

    /// The warm pools the coordinator keeps: `[[warm_pools]]`, and each
    /// `sources.github[N].min_idle` (the old spelling) as a pool of that entry.
    pub fn warm_settings(&self) -> crate::coordinator::WarmSettings {
        let github: Vec<(String, usize)> = self
            .sources
            .github
            .iter()
            .enumerate()
            .map(|(i, g)| (g.display_name(i), g.min_idle))
            .collect();
        crate::coordinator::WarmSettings {
            pools: crate::coordinator::warm_config::with_github_shorthand(
                &self.warm_pools,
                &github,
            ),
            max_idle_total: self.max_idle_total,
        }
    }

    /// Every source entry, `(kind, name)`.
    fn source_entries(&self) -> Vec<(crate::build::SourceKind, String)> {
        use crate::build::SourceKind;
        let gitlab = self.sources.gitlab.iter().enumerate();
        let jenkins = self.sources.jenkins.iter().enumerate();
        let github = self.sources.github.iter().enumerate();
        gitlab
            .map(|(i, e)| (SourceKind::GitLab, e.display_name(i)))
            .chain(jenkins.map(|(i, e)| (SourceKind::Jenkins, e.display_name(i))))
            .chain(github.map(|(i, e)| (SourceKind::GitHub, e.display_name(i))))
            .collect()
    }

    /// Every validation problem of an already-parsed configuration.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |path: String, message: &str| {
            problems.push(Problem {
                path,
                message: message.to_owned(),
            })
        };
        if self.concurrent == 0 {
            problem("concurrent".into(), "must be at least 1");
        } else if self.concurrent > MAX_CONCURRENT {
            problem(
                "concurrent".into(),
                &format!("must be at most {MAX_CONCURRENT} (builds at once)"),
            );
        }
        let limits = self
            .sources
            .gitlab
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("sources.gitlab[{i}].limit"), r.limit))
            .chain(self.sources.jenkins.iter().enumerate().flat_map(|(i, j)| {
                std::iter::once((format!("sources.jenkins[{i}].limit"), j.limit)).chain(
                    j.label_limits.iter().map(move |(label, limit)| {
                        (format!("sources.jenkins[{i}].label_limits.{label}"), *limit)
                    }),
                )
            }))
            .chain(self.sources.github.iter().enumerate().flat_map(|(i, g)| {
                [
                    (format!("sources.github[{i}].max_runners"), g.max_runners),
                    (format!("sources.github[{i}].min_idle"), g.min_idle),
                ]
            }));
        for (path, limit) in limits {
            if limit > MAX_CONCURRENT {
                problem(path, &format!("must be at most {MAX_CONCURRENT}"));
            }
        }
        problems.extend(self.http.problems());
        problems.extend(self.status.problems());
        problems.extend(self.cost.problems());
        problems.extend(self.agent.problems());
        if let Some(cache) = &self.cache {
            problems.extend(cache.problems(self.executor == ExecutorKind::Kubernetes));
        }
        let mut names = BTreeMap::new();
        for (i, runner) in self.sources.gitlab.iter().enumerate() {
            problems.extend(runner.problems(i));
            if let Some(previous) = names.insert(runner.display_name(i), i) {
                problems.push(Problem::new(
                    format!("sources.gitlab[{i}].name"),
                    format!("same name as sources.gitlab[{previous}]; names must be unique"),
                ));
            }
        }
        {
            let runner_classes: Vec<(String, Option<String>)> = self
                .sources
                .gitlab
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    (
                        format!("sources.gitlab[{i}].resource_class"),
                        r.resource_class.clone(),
                    )
                })
                .collect();
            problems.extend(self.kubernetes.problems(&runner_classes));
        }
        let classes: Vec<String> = self.kubernetes.resource_classes.keys().cloned().collect();
        for (i, jenkins) in self.sources.jenkins.iter().enumerate() {
            problems.extend(jenkins.problems(i, &classes));
        }
        let mut github_names = BTreeMap::new();
        for (i, github) in self.sources.github.iter().enumerate() {
            problems.extend(github.problems(i, &classes));
            problems.extend(github.container_problems(
                i,
                self.executor == ExecutorKind::Kubernetes,
                self.kubernetes.privileged,
            ));
            if let Some(previous) = github_names.insert(github.display_name(i), i) {
                problems.push(Problem::new(
                    format!("sources.github[{i}].name"),
                    format!("same name as sources.github[{previous}]; names must be unique"),
                ));
            }
        }
        let kubernetes = self.executor == ExecutorKind::Kubernetes;
        let entries = self.source_entries();
        problems.extend(crate::coordinator::warm_config::problems(
            &self.warm_pools,
            self.max_idle_total,
            &crate::coordinator::warm_config::Context {
                entries: &entries,
                warm_executor: kubernetes,
                classes: kubernetes.then(|| classes.clone()),
                max: MAX_CONCURRENT,
            },
        ));
        problems
    }
}

/// One step of a path into the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

fn segments(path: &serde_path_to_error::Path) -> Vec<Segment> {
    path.iter()
        .filter_map(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(Segment::Key(key.clone())),
            serde_path_to_error::Segment::Seq { index } => Some(Segment::Index(*index)),
            _ => None,
        })
        .collect()
}

/// `sources.gitlab[0].url`.
fn path_text(segments: &[Segment]) -> String {
    let mut text = String::new();
    for segment in segments {
        match segment {
            Segment::Key(key) => {
                if !text.is_empty() {
                    text.push('.');
                }
                text.push_str(key);
            }
            Segment::Index(index) => text.push_str(&format!("[{index}]")),
        }
    }
    if text.is_empty() {
        "(top level)".into()
    } else {
        text
    }
}

/// Takes the value at `segments` out of `table`; false if there is none.
fn remove(table: &mut toml::Table, segments: &[Segment]) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut value = None::<&mut toml::Value>;
    for (i, segment) in parents.iter().enumerate() {
        let next = match (i, segment, value) {
            (0, Segment::Key(key), _) => table.get_mut(key),
            (_, Segment::Key(key), Some(toml::Value::Table(t))) => t.get_mut(key),
            (_, Segment::Index(index), Some(toml::Value::Array(items))) => items.get_mut(*index),
            _ => None,
        };
        let Some(next) = next else { return false };
        value = Some(next);
    }
    match (last, value) {
        (Segment::Key(key), None) if parents.is_empty() => table.remove(key).is_some(),
        (Segment::Key(key), Some(toml::Value::Table(t))) => t.remove(key).is_some(),
        (Segment::Index(index), Some(toml::Value::Array(items))) if *index < items.len() => {
            items.remove(*index);
            true
        }
        _ => false,
    }
}

/// The 1-based line of the key (or array entry) at `segments` in the TOML `text`.
fn line_of(text: &str, segments: &[Segment]) -> Option<usize> {
    enum Node<'a> {
        Table(&'a dyn toml_edit::TableLike),
        Item(&'a toml_edit::Item),
        Value(&'a toml_edit::Value),
    }
    let document = text.parse::<toml_edit::Document<String>>().ok()?;
    let mut node = Node::Table(document.as_table());
    let mut span = None;
    for segment in segments {
        node = match (segment, node) {
            (Segment::Key(key), node) => {
                let table = match node {
                    Node::Table(table) => table,
                    Node::Item(item) => item.as_table_like()?,
                    Node::Value(value) => value.as_inline_table()?,
                };
                let (found_key, found) = table.get_key_value(key)?;
                span = found_key.span().or_else(|| found.span()).or(span);
                Node::Item(found)
            }
            (Segment::Index(index), Node::Item(toml_edit::Item::ArrayOfTables(tables))) => {
                let table = tables.get(*index)?;
                span = table.span().or(span);
                Node::Table(table)
            }
            (
                Segment::Index(index),
                Node::Item(toml_edit::Item::Value(value)) | Node::Value(value),
            ) => {
                let value = value.as_array()?.get(*index)?;
                span = value.span().or(span);
                Node::Value(value)
            }
            (Segment::Index(_), _) => return span_line(text, span),
        };
    }
    span_line(text, span)
}

fn span_line(text: &str, span: Option<std::ops::Range<usize>>) -> Option<usize> {
    let start = span?.start;
    Some(text.get(..start)?.matches('\n').count() + 1)
}

/// Whether a config file's value sets a secret: a non-empty key named like one.
fn holds_secret(value: &toml::Value) -> bool {
    const SECRET_KEYS: &[&str] = &[
        "token",
        "password",
        "webhook_secret",
        "private_key",
        "secret_key",
        "access_key_secret",
        "account_key",
    ];
    match value {
        toml::Value::Table(table) => table.iter().any(|(key, value)| {
            (SECRET_KEYS.contains(&key.as_str()) && value.as_str().is_some_and(|v| !v.is_empty()))
                || holds_secret(value)
        }),
        toml::Value::Array(items) => items.iter().any(holds_secret),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load_with_env(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let err = load(
            r#"
concurrent = 0
[[sources.gitlab]]
url = "gitlab.example.com"
token = ""
system_id = "x"
"#,
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("concurrent: must be at least 1"), "{err}");
        assert!(err.contains("sources.gitlab[0].url: not a URL"), "{err}");
        assert!(err.contains("sources.gitlab[0].token: is empty"), "{err}");
        assert!(err.contains("sources.gitlab[0].system_id"), "{err}");
    }

    #[test]
    fn a_status_token_from_a_file_matches_without_its_line_break() {
        let config = load(
            "[status]\ntoken = \"s3cret\\n\"\n[[sources.gitlab]]\nurl = \"https://gitlab.example.com\"\ntoken = \"t\\r\\n\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(config.status.token.as_deref(), Some("s3cret"));
        assert_eq!(config.sources.gitlab[0].token, "t");
        let config = load("", &[("KILN_STATUS__TOKEN", "from-env\n")]).unwrap();
        assert_eq!(config.status.token.as_deref(), Some("from-env"));
    }

    #[test]
    fn a_config_others_can_read_is_flagged_only_when_it_holds_a_secret() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        let with_token =
            "[[sources.gitlab]]\nurl = \"https://gitlab.example.com\"\ntoken = \"t\"\n";
        std::fs::write(&path, with_token).unwrap();
        let config = Config::load_with_env(Some(&path), Vec::new()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let warning = config.exposure_warning(&path).expect("a warning");
        assert!(
            warning.contains("mode 644") && warning.contains("chmod 600"),
            "{warning}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(config.exposure_warning(&path), None);
        // The chart's ConfigMap: readable, but the token comes from the environment.
        std::fs::write(&path, "concurrent = 4\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(config.exposure_warning(&path), None);
    }

    /// Numbers that passed check-config once and then panicked `kiln run` (a semaphore of
    /// 2^63 permits) are refused with the field named.
    #[test]
    fn numbers_that_would_crash_kiln_run_are_refused_by_name() {
        let err = load(
            r#"
concurrent = 9223372036854775807
[http]
max_connections = 9223372036854775807
[[sources.gitlab]]
url = "https://gitlab.example.com"
token = "t"
limit = 9223372036854775807
"#,
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("concurrent: must be at most 100000"), "{err}");
        assert!(
            err.contains("http.max_connections: must be at most 65536"),
            "{err}"
        );
        assert!(
            err.contains("sources.gitlab[0].limit: must be at most 100000"),
            "{err}"
        );
    }

    #[test]
    fn unknown_field_is_an_error_naming_it() {
        let err = load("[http]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("http.lisen (line 3): unknown field `lisen`, expected one of `listen`"),
            "{err}"
        );
    }

    #[test]
    fn check_config_lists_every_unknown_key_with_its_line() {
        let err = load(
            "concurent = 2\n[[sources.gitlab]]\nurl = \"https://gitlab.example.com\"\ntoken = \"t\"\ntokn = \"t\"\nlimit = \"many\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("has 3 problem(s)"), "{err}");
        assert!(
            err.contains("concurent (line 1): unknown field `concurent`"),
            "{err}"
        );
        assert!(
            err.contains("sources.gitlab[0].tokn (line 5): unknown field `tokn`"),
            "{err}"
        );
        assert!(
            err.contains("sources.gitlab[0].limit (line 6): invalid type"),
            "{err}"
        );
    }

    #[test]
    fn environment_overrides_fields_and_list_entries() {
        let config = load(
            "[[sources.gitlab]]\nurl = \"https://gitlab.example.com\"\ntoken = \"from-file\"\n",
            &[
                ("KILN_CONCURRENT", "9"),
                ("KILN_SOURCES__GITLAB__0__TOKEN", "glrt-from-env"),
                ("KILN_SOURCES__GITLAB__0__LIMIT", "2"),
                ("KILN_SHUTDOWN_TIMEOUT", "30s"),
                ("KILN_CONFIG", "ignored.toml"),
                ("KILN_DEPLOY_REGION", "cn-hangzhou"),
                ("KILN_REGISTER_TOKEN", "glrt-flag-fallback"),
            ],
        )
        .unwrap();
        assert_eq!(config.concurrent, 9);
        assert_eq!(config.sources.gitlab[0].token, "glrt-from-env");
        assert_eq!(config.sources.gitlab[0].limit, 2);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
    }

    #[test]
    fn environment_can_add_a_runner_and_typos_name_the_variable() {
        let config = load(
            "",
            &[
                ("KILN_SOURCES__GITLAB__0__URL", "https://gitlab.example.com"),
                ("KILN_SOURCES__GITLAB__0__TOKEN", "glrt-abc"),
            ],
        )
        .unwrap();
        assert_eq!(config.sources.gitlab.len(), 1);
        let err = load("", &[("KILN_CONCURENT", "3")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `concurent`"), "{err}");
        let err = load("", &[("KILN_CONCURRENT", "many")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("concurrent (set by KILN_CONCURRENT)"), "{err}");
    }

    #[test]
    fn warm_pools_are_read_from_the_file_and_the_environment_and_checked() {
        let file = r#"
executor = "kubernetes"
max_idle_total = 8
[[sources.gitlab]]
url = "https://gitlab.example.com"
token = "t"
[[warm_pools]]
name = "maven"
source = "gitlab"
image = "maven:3.9"
min_idle = 2
max_idle_age = "30m"
[[warm_pools.schedule]]
cron = "0 8 * * 1-5"
duration = "11h"
min_idle = 6
"#;
        let config = load(
            file,
            &[
                ("KILN_WARM_POOLS__0__SCHEDULE__0__TIMEZONE", "Europe/Berlin"),
                ("KILN_WARM_POOLS__0__MIN_IDLE", "3"),
            ],
        )
        .unwrap();
        let pool = &config.warm_pools[0];
        assert_eq!((pool.min_idle, config.max_idle_total), (3, 8));
        assert_eq!(pool.max_idle_age, Some(Duration::from_secs(1800)));
        assert_eq!(pool.schedule[0].timezone.as_deref(), Some("Europe/Berlin"));
        let err = load(
            &file.replace("executor = \"kubernetes\"", ""),
            &[("KILN_WARM_POOLS__0__SCHEDULE__0__CRON", "0 8 * *")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("warm_pools[0].source: a GitLab pool keeps pre-started build pods"),
            "{err}"
        );
        assert!(
            err.contains("warm_pools[0].schedule[0].cron: `0 8 * *` is not five-field cron"),
            "{err}"
        );
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let err = load("concurrent = = 3", &[]).unwrap_err().to_string();
        assert!(err.contains("kiln.toml"), "{err}");
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn register_upserts_and_keeps_comments() {
        use crate::sources::gitlab::runner_file;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, "# my runners\nconcurrent = 2\n").unwrap();
        let mut runner = GitLabRunnerConfig::new("https://gitlab.example.com", "glrt-one");
        runner.system_id = Some("s_0123456789ab".into());
        runner_file::upsert(&path, &runner).unwrap();
        runner_file::upsert(&path, &runner).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# my runners"), "{text}");
        let config = Config::load_with_env(Some(&path), []).unwrap();
        assert_eq!(config.sources.gitlab.len(), 1);
        assert_eq!(config.concurrent, 2);
        assert!(runner_file::remove(&path, &runner.url, &runner.token).unwrap());
        let config = Config::load_with_env(Some(&path), []).unwrap();
        assert!(config.sources.gitlab.is_empty());
    }
}
