//! The source-neutral model of the chain: a [`Build`] is everything an executor needs to start
//! one ephemeral build and nothing about the CI server it came from; an [`Ending`] is how it
//! ended, in terms every source can report. Sources produce builds, executors run them, and the
//! two meet only in the coordinator.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Why a build failed, in GitLab's vocabulary (the richest of the CI servers kiln speaks to).
///
/// Other sources map these onto their own terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// The user's script exited non-zero (or was OOM-killed by its own limit).
    ScriptFailure,
    /// Infrastructure failed: the agent died, the pod was evicted, the node was lost.
    RunnerSystemFailure,
    /// The job ran past its timeout.
    JobExecutionTimeout,
    /// The job's image could not be pulled.
    ImagePullFailure,
    /// Nothing more specific is known.
    UnknownFailure,
    /// The job asked for something the runner's configuration does not allow.
    RunnerConfigurationError,
    /// The job needs a feature this runner does not have.
    RunnerUnsupported,
    /// A service the job depends on (artifacts, registry) failed.
    RunnerExternalDependencyFailure,
    /// Data the job received was corrupt.
    DataIntegrityFailure,
}

impl FailureReason {
    /// The wire name GitLab uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScriptFailure => "script_failure",
            Self::RunnerSystemFailure => "runner_system_failure",
            Self::JobExecutionTimeout => "job_execution_timeout",
            Self::ImagePullFailure => "image_pull_failure",
            Self::UnknownFailure => "unknown_failure",
            Self::RunnerConfigurationError => "runner_configuration_error",
            Self::RunnerUnsupported => "runner_unsupported",
            Self::RunnerExternalDependencyFailure => "runner_external_dependency_failure",
            Self::DataIntegrityFailure => "data_integrity_failure",
        }
    }

    /// The reason called `name` on the wire, if kiln knows it.
    pub fn from_wire(name: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(name.to_owned())).ok()
    }

    /// Whether this reason blames infrastructure rather than the user's script.
    ///
    /// GitLab only accepts a reason the job lists in `features.failure_reasons`; the fallback for
    /// an unlisted one depends on who is to blame.
    pub fn is_infrastructure(self) -> bool {
        !matches!(self, Self::ScriptFailure | Self::JobExecutionTimeout)
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which CI server a build came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceKind {
    /// A GitLab runner.
    GitLab,
    /// A Jenkins controller's queue.
    Jenkins,
    /// GitHub Actions.
    GitHub,
}

impl SourceKind {
    /// Every kind, for lookups by name.
    pub const ALL: [Self; 3] = [Self::GitLab, Self::Jenkins, Self::GitHub];

    /// The short name used in resource names (`kiln-gl-…`).
    pub fn short(self) -> &'static str {
        match self {
            Self::GitLab => "gl",
            Self::Jenkins => "jk",
            Self::GitHub => "gh",
        }
    }

    /// The full name, as in the `kiln.dev/source` label and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::GitLab => "gitlab",
            Self::Jenkins => "jenkins",
            Self::GitHub => "github",
        }
    }

    /// The kind called `name` (as in the `kiln.dev/source` label).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

/// Identifies the work a build does, across sources: one job (GitLab, GitHub) or one queue item
/// (Jenkins) of one configured source.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BuildKey {
    /// The CI server it came from.
    pub source: SourceKind,
    /// The name of the source entry in the config that took it.
    pub runner: String,
    /// The CI server's id for the work.
    pub id: u64,
}

impl BuildKey {
    /// The deterministic name of everything kiln creates for this work (`kiln-gl-<id>`).
    pub fn resource_name(&self) -> String {
        format!("kiln-{}-{}", self.source.short(), self.id)
    }
}

impl fmt::Display for BuildKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}#{}", self.source.short(), self.runner, self.id)
    }
}

/// The key of the kiln agent's job file among a build's secrets.
pub const JOB_FILE: &str = "job.json";
/// The file next to the job file with the executor's notes on how it started the build (one
/// per line: an overwrite it ignored), which the kiln agent puts in the job's trace as warnings.
pub const START_NOTES_FILE: &str = "start-notes.txt";
/// The file next to the job file in which the coordinator says how the build started (cold
/// and why, or on which warm pod after how long waiting), one line each, which the kiln agent
/// prints in the trace's first section.
pub const START_FILE: &str = "start.txt";
/// The result file the kiln agent leaves next to its job file ([`AgentReport`] as JSON) when it
/// runs as a child process.
pub const AGENT_RESULT_FILE: &str = "result.json";

/// One ephemeral build, as a source hands it to the coordinator.
#[derive(Debug, Clone)]
pub struct Build {
    /// The work it does.
    pub key: BuildKey,
    /// The name of everything the executor creates for it (pod, Secret, work directory).
    /// Deterministic, so a second launch of the same build is recognized, not duplicated.
    pub name: String,
    /// What runs.
    pub workload: Workload,
    /// Secret data by key: the agent's job file, an agent secret, a JIT config. Executors put
    /// it where the build reads it (a Secret volume for pods, private files for processes),
    /// never into a pod spec, an environment listing or a command line.
    pub secrets: BTreeMap<String, Vec<u8>>,
    /// The resource class the source chose, if any (the executor's default applies otherwise).
    pub class: Option<ClassChoice>,
    /// What the job itself asks for (sizes, placement); the executor checks each against its
    /// configured caps.
    pub requests: Vec<Requested>,
    /// The longest the build may run; the executor stops it a margin later.
    pub timeout: Option<Duration>,
    /// Labels that identify it further (the Jenkins node), on top of kiln's own.
    pub labels: BTreeMap<String, String>,
    /// Descriptive metadata (the job's URL on its CI server, the project).
    pub annotations: BTreeMap<String, String>,
    /// What people see about it (status page, metrics); never secret.
    pub about: About,
    /// Whether the work may come from people outside the CI server's trusted users (a public
    /// GitLab project, a GitHub workflow a fork's pull request can run): an executor whose
    /// builds could reach kiln's own secrets refuses it.
    pub untrusted: bool,
    /// Registry credentials the build's images are pulled with (the job's registry login, its
    /// `DOCKER_AUTH_CONFIG`), first match per registry wins. Kept out of the build itself: an
    /// executor hands them to the image puller only.
    pub registry_auths: Vec<RegistryAuth>,
}

/// A login to one container registry, for pulling a build's images.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    /// The registry (`registry.example.com`, `registry.example.com:5005`, `https://index.docker.io/v1/`).
    pub registry: String,
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
    /// A login the CI server issued for this build (GitLab's `credentials`): a configured
    /// `DOCKER_AUTH_CONFIG` login for the same registry wins over it.
    pub issued: bool,
}

impl RegistryAuth {
    /// The logins of a Docker `config.json` (`DOCKER_AUTH_CONFIG`): `auths` entries with an
    /// `auth` (`base64(user:password)`) or a `username` and `password`. Credential helpers
    /// (`credsStore`, `credHelpers`) cannot run where images are pulled and are left out.
    ///
    /// # Errors
    /// The text is not such a JSON document; the message says what is wrong, never the text.
    pub fn from_docker_config(text: &str) -> Result<Vec<Self>, String> {
        use base64::Engine;
        #[derive(serde::Deserialize)]
        struct Config {
            #[serde(default)]
            auths: BTreeMap<String, Entry>,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            #[serde(default)]
            auth: Option<String>,
            #[serde(default)]
            username: Option<String>,
            #[serde(default)]
            password: Option<String>,
        }
        // The error message of serde_json can quote the input; only its position is kept.
        let config: Config = serde_json::from_str(text).map_err(|e| {
            format!(
                "is not a Docker config.json ({} at line {} column {})",
                match e.classify() {
                    serde_json::error::Category::Data => "unexpected content",
                    _ => "not JSON",
                },
                e.line(),
                e.column()
            )
        })?;
        let mut out = Vec::new();
        for (registry, entry) in config.auths {
            let (username, password) = match (entry.username, entry.password, entry.auth) {
                (Some(user), Some(password), _) => (user, password),
                (_, _, Some(auth)) => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .ok()
                        .and_then(|bytes| String::from_utf8(bytes).ok())
                        .ok_or_else(|| {
                            format!("auths.\"{registry}\".auth is not base64 of user:password")
                        })?;
                    let Some((user, password)) = decoded.split_once(':') else {
                        return Err(format!(
                            "auths.\"{registry}\".auth is not base64 of user:password"
                        ));
                    };
                    (user.to_owned(), password.to_owned())
                }
                _ => continue,
            };
            out.push(Self {
                registry,
                username,
                password,
                issued: false,
            });
        }
        Ok(out)
    }
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The password is a secret: never in a log line.
        f.debug_struct("RegistryAuth")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// What people see about a build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct About {
    /// The project (`group/project`, `owner/repo`, a Jenkins job).
    pub project: String,
    /// The job's name.
    pub job: String,
    /// The pipeline (or workflow run) it belongs to, if its CI server says.
    pub pipeline: Option<String>,
    /// The job's page on its CI server.
    pub url: Option<String>,
    /// When the CI server queued the work.
    pub queued_at: Option<SystemTime>,
}

/// What a build runs.
#[derive(Debug, Clone)]
pub enum Workload {
    /// `kiln agent` runs the job file ([`JOB_FILE`]) of a GitLab job: in the job's image with
    /// its services (pods), or as a child process.
    KilnAgent {
        /// The job's image (the executor's default without one).
        image: Option<Image>,
        /// Service containers next to it.
        services: Vec<Service>,
    },
    /// Another CI system's agent (Jenkins' inbound agent, the GitHub Actions runner).
    Foreign(ForeignAgent),
}

/// A container image reference with how to start it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    /// The reference (`maven:3.9`).
    pub name: String,
    /// An entrypoint override (empty: the image's own).
    pub entrypoint: Vec<String>,
    /// When to pull it, in order of preference (empty: the executor's default); the executor
    /// uses the first one its configuration allows.
    pub pull_policies: Vec<PullPolicy>,
    /// The user (`uid` or `uid:gid`) the container runs as, if the job names one
    /// (`image:kubernetes:user`).
    pub user: Option<String>,
}

/// When an image is pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Every time.
    Always,
    /// Only when the node does not have it.
    IfNotPresent,
    /// Never; the node must have it.
    Never,
}

/// A service container of a build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Service {
    /// Its image.
    pub image: Image,
    /// A command override.
    pub command: Vec<String>,
    /// Its environment.
    pub env: Vec<(String, String)>,
    /// Host names the build reaches it by.
    pub aliases: Vec<String>,
}

/// Another CI system's agent: how to run it in a container and, optionally, as a process.
#[derive(Debug, Clone)]
pub struct ForeignAgent {
    /// The main container's name; its end is the build's end (`jnlp`, `runner`).
    pub container: String,
    /// The agent's image.
    pub image: String,
    /// An entrypoint override.
    pub command: Option<Vec<String>>,
    /// Arguments.
    pub args: Option<Vec<String>>,
    /// The environment; secret values come from [`Build::secrets`].
    pub env: Vec<EnvVar>,
    /// The agent's work directory, shared with every extra container.
    pub workdir: String,
    /// Containers the user configured next to the agent (Jenkins pod templates). Executors
    /// that do not run pods run the agent alone.
    pub extra_containers: Vec<ExtraContainer>,
    /// How to run the agent as a child process, if it can be.
    pub process: Option<Process>,
}

/// A container the user configured next to a foreign agent, sharing its work directory (a
/// Jenkins pod template's `maven`, which a Jenkinsfile enters with `container('maven')`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExtraContainer {
    /// Its name.
    pub name: String,
    /// Everything else the user set, in Kubernetes' own field names (`image`, `command`,
    /// `resources`, …) as a JSON object: the source checked that it reads as a container, and
    /// an executor that runs pods takes it as it is.
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// One environment variable of a foreign agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    /// The name.
    pub name: String,
    /// The value.
    pub value: EnvValue,
}

/// Where an environment variable's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvValue {
    /// This text.
    Plain(String),
    /// The build's secret of this key.
    Secret(String),
}

/// A foreign agent as a child process, started in the build's work directory, where every
/// secret is a private file named by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// The program (looked up on `PATH`).
    pub program: String,
    /// Its arguments; relative paths resolve in the work directory.
    pub args: Vec<String>,
    /// Files to fetch into the work directory first.
    pub downloads: Vec<Download>,
    /// What to tell the operator when `program` is not on `PATH`.
    pub missing_program: String,
}

/// A file a process needs, fetched over HTTP(S).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// Where from.
    pub url: String,
    /// The file name in the work directory.
    pub file: String,
}

/// The resource class a source chose, and who chose it (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassChoice {
    /// The class name.
    pub name: String,
    /// Who named it (`KILN_RESOURCE_CLASS`, `the runner's resource_class`).
    pub origin: String,
}

/// One thing a job asks of its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    /// What.
    pub what: Request,
    /// The value as given (a quantity, a name, `key=value`).
    pub value: String,
    /// Where it came from, for messages (`KUBERNETES_CPU_LIMIT`).
    pub origin: String,
}

/// What a job may ask of its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// A resource request or limit of the build container.
    Resource(ResourceField),
    /// A resource request or limit of every service container.
    ServiceResource(ResourceField),
    /// A resource request or limit of the helper (init) container.
    HelperResource(ResourceField),
    /// A toleration (`key[=value][:effect]`).
    NodeToleration,
    /// Another namespace for the pod.
    Namespace,
    /// The pod's service account.
    ServiceAccount,
    /// A node selector entry (`key=value`).
    NodeSelector,
    /// A pod annotation (`key=value`).
    PodAnnotation,
    /// A pod label (`key=value`).
    PodLabel,
}

/// A resource of the build container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceField {
    /// CPU request.
    CpuRequest,
    /// CPU limit.
    CpuLimit,
    /// Memory request.
    MemoryRequest,
    /// Memory limit.
    MemoryLimit,
    /// Ephemeral storage request.
    EphemeralStorageRequest,
    /// Ephemeral storage limit.
    EphemeralStorageLimit,
}

impl ResourceField {
    /// Every field.
    pub const ALL: [Self; 6] = [
        Self::CpuRequest,
        Self::CpuLimit,
        Self::MemoryRequest,
        Self::MemoryLimit,
        Self::EphemeralStorageRequest,
        Self::EphemeralStorageLimit,
    ];

    /// The field's name in kiln's config (`cpu_request`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CpuRequest => "cpu_request",
            Self::CpuLimit => "cpu_limit",
            Self::MemoryRequest => "memory_request",
            Self::MemoryLimit => "memory_limit",
            Self::EphemeralStorageRequest => "ephemeral_storage_request",
            Self::EphemeralStorageLimit => "ephemeral_storage_limit",
        }
    }
}

/// How a build ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// What happened.
    pub outcome: Outcome,
    /// One line a person reads (exit code, eviction, …).
    pub detail: String,
    /// Whether the build's own agent already told its CI server (then the source has nothing
    /// to add).
    pub reported: bool,
    /// The exit code of the script or agent, if known.
    pub exit_code: Option<i32>,
}

/// The kinds of ending every source can report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The work succeeded.
    Succeeded,
    /// The work failed, for this reason.
    Failed(FailureReason),
    /// The CI server canceled the work.
    Canceled,
    /// kiln stopped following the build while it may still run (the coordinator is shutting
    /// down and the build survives it): the next coordinator adopts it. Nothing to report.
    Lost,
}

impl Outcome {
    /// `succeeded`, `failed`, `canceled` or `lost`, as in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed(_) => "failed",
            Self::Canceled => "canceled",
            Self::Lost => "lost",
        }
    }
}

impl Ending {
    /// A build that failed for `reason` without its agent reporting.
    pub fn failed(reason: FailureReason, detail: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Failed(reason),
            detail: detail.into(),
            reported: false,
            exit_code: None,
        }
    }

    /// How a foreign agent (a Jenkins agent, an Actions runner) ended: it tells its CI server
    /// about its work itself, so its exit code is all there is; 0 is a clean end.
    pub fn agent_exited(code: Option<i32>, detail: impl Into<String>) -> Self {
        match code {
            Some(0) => Self {
                outcome: Outcome::Succeeded,
                detail: detail.into(),
                reported: false,
                exit_code: Some(0),
            },
            code => Self {
                exit_code: code,
                ..Self::failed(FailureReason::RunnerSystemFailure, detail)
            },
        }
    }

    /// A build kiln stopped following.
    pub fn lost(detail: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Lost,
            detail: detail.into(),
            reported: false,
            exit_code: None,
        }
    }

    /// The failure reason, if it failed.
    pub fn reason(&self) -> Option<FailureReason> {
        match self.outcome {
            Outcome::Failed(reason) => Some(reason),
            _ => None,
        }
    }
}

/// What the kiln agent leaves for its executor: the result file of a child process, or the
/// termination message of a build container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    /// `success` or `failed`.
    pub state: String,
    /// The failure reason sent to GitLab.
    pub failure_reason: Option<String>,
    /// The script's exit code.
    pub exit_code: Option<i32>,
    /// Whether GitLab took the final update (or no longer needed one: canceled).
    pub reported: bool,
    /// Whether GitLab canceled the job.
    pub canceled: bool,
}

impl AgentReport {
    /// The ending this report describes; `unreported` is the ending to use when the agent
    /// could not tell its CI server (then the report only adds the exit code).
    pub fn ending(&self, unreported: Ending) -> Ending {
        if !self.reported {
            return Ending {
                exit_code: unreported.exit_code.or(self.exit_code),
                ..unreported
            };
        }
        let outcome = if self.canceled {
            Outcome::Canceled
        } else if self.state == "success" {
            Outcome::Succeeded
        } else {
            Outcome::Failed(
                self.failure_reason
                    .as_deref()
                    .and_then(FailureReason::from_wire)
                    .unwrap_or(FailureReason::ScriptFailure),
            )
        };
        Ending {
            outcome,
            detail: "the build agent reported the job".into(),
            reported: true,
            exit_code: self.exit_code,
        }
    }
}

/// A build an executor found running (or left over) when the coordinator started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The work it does.
    pub key: BuildKey,
    /// Its name.
    pub name: String,
    /// Whether it still runs (or has ended but is not cleaned up); false when only its
    /// secrets are left (the coordinator died between creating them and the build).
    pub exists: bool,
    /// When only its secrets are left: whether its pod (or process) ever existed, as far as the
    /// executor can tell — `Some(false)`: never created (the coordinator died between the
    /// creates; safe to start), `Some(true)`: it existed and is gone (starting it could run the
    /// work twice), `None`: unknown. `None` for a build that exists.
    pub ran: Option<bool>,
    /// Its secret data.
    pub secrets: BTreeMap<String, Vec<u8>>,
    /// Its labels beyond kiln's own.
    pub labels: BTreeMap<String, String>,
    /// Its annotations.
    pub annotations: BTreeMap<String, String>,
    /// The replica that follows it (`kiln.dev/replica`); `None` for builds of a kiln without
    /// replicas, and for executors whose builds are the process's own.
    pub replica: Option<String>,
    /// The version of the object holding `replica` as it was listed (a resourceVersion): a
    /// claim made from an older state fails.
    pub version: Option<String>,
    /// Where `replica` and `version` were read from.
    pub recorded: Recorded,
}

/// Where a found build's owner is recorded. Whose a build is must be one fact for its whole
/// life, not two labels that can disagree: an executor that keeps a build's secrets apart from
/// the build (a Kubernetes Secret beside its pod) records it on the secrets, which exist from
/// before the build starts until after it is removed; the build's own label only mirrors it,
/// for the replica following it to notice a hand-over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Recorded {
    /// On the build itself (a local process; a pod whose Secret is gone).
    #[default]
    OnBuild,
    /// On the build's secrets; `build` is the replica label the build itself (its pod)
    /// carries, `None` when it carries none or does not exist.
    OnSecrets {
        /// The mirror on the build.
        build: Option<String>,
    },
}

impl Found {
    /// Whether replica `me` must claim this build before following it: another replica (or
    /// none) owns it, or its pod's label has not followed its owner yet (a claim stopped half
    /// way, or an older kiln that relabelled pods only).
    pub fn needs_claim(&self, me: &str) -> bool {
        let mirror_behind = matches!(
            &self.recorded,
            Recorded::OnSecrets { build } if self.exists && build.as_deref() != Some(me)
        );
        self.replica.as_deref() != Some(me) || mirror_behind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_their_wire_names() {
        for reason in [
            FailureReason::ScriptFailure,
            FailureReason::RunnerSystemFailure,
            FailureReason::ImagePullFailure,
            FailureReason::DataIntegrityFailure,
        ] {
            assert_eq!(FailureReason::from_wire(reason.as_str()), Some(reason));
        }
        assert_eq!(FailureReason::from_wire("stale_schedule"), None);
    }

    #[test]
    fn an_agent_report_becomes_the_ending_it_describes() {
        let unreported = Ending::failed(FailureReason::RunnerSystemFailure, "evicted");
        let report = AgentReport {
            state: "failed".into(),
            failure_reason: Some("script_failure".into()),
            exit_code: Some(3),
            reported: true,
            canceled: false,
        };
        let ending = report.ending(unreported.clone());
        assert_eq!(
            ending.outcome,
            Outcome::Failed(FailureReason::ScriptFailure)
        );
        assert!(ending.reported);
        assert_eq!(ending.exit_code, Some(3));
        let not_reported = AgentReport {
            reported: false,
            ..report
        };
        let ending = not_reported.ending(unreported);
        assert_eq!(
            ending.outcome,
            Outcome::Failed(FailureReason::RunnerSystemFailure)
        );
        assert!(!ending.reported);
        assert_eq!(ending.exit_code, Some(3));
    }
}
