//! `kiln agent`: runs one GitLab job inside its build (a pod, or a work directory of the local
//! executor): fetches sources and dependency artifacts, runs the steps, streams the masked
//! trace, uploads artifacts and reports the final state straight to GitLab.
//!
//! The coordinator is not in this path. It hands the agent a job file and, when the agent
//! exits, reads the result file the agent leaves next to it: no result file means the agent
//! could not report the job, and the coordinator fails it.

mod artifacts;
mod cache;
mod git;
mod mask;
mod options;
mod oversized;
mod process;
mod trace;
mod untracked;
mod warm;

pub use warm::{ReceivePaths, receive, wait_for_job};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use crate::build::AgentReport;
use crate::build::{AGENT_RESULT_FILE, FailureReason};
use crate::gitlab::api::{
    ApiError, ArtifactUpload, JobUpdate, RunnerApi, TraceOutput, UpdateAck, UploadAck,
};
use crate::gitlab::payload::{Artifact, JobPayload, Step, When};
use crate::job_file::{AgentConfig, AgentJob};
use crate::variables::{Definition, Variables};
use process::{Exit, Interrupts};
use trace::{Remote, Trace, Uplink};

/// Problems that keep the agent from running a job at all.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The job file could not be read.
    #[error("cannot read job file {}", path.display())]
    ReadJob {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The job file is not a job.
    #[error("job file {} is not valid: {message}", path.display())]
    ParseJob {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The GitLab URL is unusable.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The work directory could not be prepared.
    #[error("cannot prepare {}", path.display())]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// How the job ended, before it is reported.
#[derive(Debug, Clone)]
struct JobEnd {
    failure: Option<(FailureReason, String)>,
    exit_code: Option<i32>,
    canceled: bool,
}

impl JobEnd {
    fn success() -> Self {
        Self {
            failure: None,
            exit_code: Some(0),
            canceled: false,
        }
    }

    fn failed(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            failure: Some((reason, message.into())),
            exit_code: None,
            canceled: false,
        }
    }
}

/// Everything a running job needs.
struct Context {
    job: JobPayload,
    settings: AgentConfig,
    executor: String,
    runner: String,
    trace: Arc<Trace>,
    api: RunnerApi,
    project_dir: PathBuf,
    tmp_dir: PathBuf,
    sources_file: PathBuf,
    /// `http.<GitLab>.sslCAInfo` for the agent's git commands, when kiln trusts a CA file.
    git_ca: Option<(String, String)>,
    env: BTreeMap<String, String>,
    shell: String,
    interrupts: Interrupts,
    deadline: Instant,
    /// The executor's notes on how it started the build (an ignored overwrite), for the trace.
    start_notes: Vec<String>,
    /// How the coordinator started the build (cold and why, or on which warm pod).
    start_lines: Vec<String>,
    /// When the steps before after_script must end: the job's deadline, or sooner with
    /// `RUNNER_SCRIPT_TIMEOUT`.
    steps_deadline: Instant,
    /// What the job's variables ask of the runner (`GIT_*`, attempts, timeouts, trace).
    options: options::JobOptions,
    /// How step scripts are written (oversized variables, xtrace, sections).
    script: process::ScriptOptions,
    /// Where the job's cache is, when kiln has one.
    cache: Option<crate::cache::CacheGrant>,
}

/// Where the agent finds its job and does its work.
#[derive(Debug, Clone)]
pub struct AgentPaths {
    /// The job file the executor wrote.
    pub job_file: PathBuf,
    /// Scratch space: temporary files, the step's process group, the sources marker (default:
    /// the job file's directory).
    pub work_dir: Option<PathBuf>,
    /// Where projects are checked out (default: `<work dir>/builds`).
    pub builds_dir: Option<PathBuf>,
    /// Where the result goes (default: `<work dir>/result.json`); a pod's termination-message
    /// file, so the coordinator reads it from the pod status.
    pub result_file: Option<PathBuf>,
}

impl AgentPaths {
    /// The paths of a job file with everything next to it.
    pub fn beside(job_file: &Path) -> Self {
        Self {
            job_file: job_file.to_owned(),
            work_dir: None,
            builds_dir: None,
            result_file: None,
        }
    }

    fn work(&self) -> PathBuf {
        self.work_dir.clone().unwrap_or_else(|| {
            self.job_file
                .parent()
                .map(Path::to_owned)
                .unwrap_or_else(|| PathBuf::from("."))
        })
    }

    fn builds(&self) -> PathBuf {
        self.builds_dir
            .clone()
            .unwrap_or_else(|| self.work().join("builds"))
    }
}

/// The sources the init container fetched, for the build container's agent.
const SOURCES_FILE: &str = "sources.json";

/// What `kiln agent prepare` leaves for the build: its trace and how fetching went.
#[derive(Debug, Serialize, Deserialize)]
struct PreparedSources {
    /// The (masked) trace of the fetch.
    log: String,
    /// Why fetching failed, if it did.
    failure: Option<(FailureReason, String)>,
}

fn load(job_file: &Path) -> Result<(AgentJob, JobPayload), AgentError> {
    let text = std::fs::read_to_string(job_file).map_err(|source| AgentError::ReadJob {
        path: job_file.to_owned(),
        source,
    })?;
    let spec: AgentJob = serde_json::from_str(&text).map_err(|e| AgentError::ParseJob {
        path: job_file.to_owned(),
        message: e.to_string(),
    })?;
    let job: JobPayload =
        serde_json::from_value(spec.job.clone()).map_err(|e| AgentError::ParseJob {
            path: job_file.to_owned(),
            message: format!("job: {e}"),
        })?;
    Ok((spec, job))
}

/// Runs the job, reports it to GitLab and writes the result file. `abort` stops the job
/// (coordinator shutdown, pod deletion): it is reported as a `runner_system_failure`.
///
/// # Errors
/// Only when the job cannot be started at all (unreadable job file, bad URL); once the job is
/// known, every failure is reported to GitLab and in the result.
pub async fn run(paths: &AgentPaths, abort: CancellationToken) -> Result<AgentReport, AgentError> {
    let (spec, job) = load(&paths.job_file)?;
    let work = paths.work();
    let result_path = paths
        .result_file
        .clone()
        .unwrap_or_else(|| work.join(AGENT_RESULT_FILE));
    let result = run_job(spec, job, paths, abort).await?;
    let json = serde_json::to_vec(&result).unwrap_or_default();
    if let Err(e) = std::fs::write(&result_path, json) {
        tracing::warn!(path = %result_path.display(), error = %e, "cannot write the result file");
    }
    Ok(result)
}

/// The init container's part (`kiln agent prepare`): installs this binary into `bin_dir` for
/// the build container and fetches the sources into the builds directory, so the job's image
/// needs neither kiln nor git. The fetch's trace and outcome are left in the work directory;
/// the build's agent puts them in the job trace and reports a failed fetch.
///
/// # Errors
/// The binary cannot be installed or the job file read; then the pod fails and the
/// coordinator reports the job.
pub async fn prepare(paths: &AgentPaths, bin_dir: &Path) -> Result<(), AgentError> {
    load(&paths.job_file)?;
    install_self(bin_dir)?;
    fetch_sources(paths).await
}

/// The init container of a warm pod (`kiln agent install`): installs this binary into
/// `bin_dir` for the build container; the job comes later (see `warm.rs`).
///
/// # Errors
/// The binary cannot be installed.
pub fn install(bin_dir: &Path) -> Result<(), AgentError> {
    install_self(bin_dir)
}

/// Fetches the sources of the job in `paths.job_file` into the builds directory and leaves
/// the fetch's trace and outcome in the work directory for the build's agent.
async fn fetch_sources(paths: &AgentPaths) -> Result<(), AgentError> {
    let (spec, job) = load(&paths.job_file)?;
    let work = paths.work();
    let (mut ctx, _remote) = context(&spec, job, paths, CancellationToken::new())?;
    ctx.trace
        .section_start("prepare_sources", "Preparing the build pod");
    ctx.trace.line(&format!(
        "kiln {} installed the agent and fetches the sources on {}",
        crate::VERSION,
        hostname()
    ));
    ctx.trace.section_end("prepare_sources");
    let failure = match export_variables(&mut ctx) {
        Err(e) => Some((
            FailureReason::RunnerSystemFailure,
            format!("cannot write file variables: {e}"),
        )),
        Ok(()) => get_sources(&mut ctx).await.and_then(|end| end.failure),
    };
    ctx.trace.release_held();
    let prepared = PreparedSources {
        log: String::from_utf8_lossy(&ctx.trace.contents()).into_owned(),
        failure,
    };
    let path = work.join(SOURCES_FILE);
    let json = serde_json::to_vec(&prepared).unwrap_or_default();
    // Whole or not at all: a warm pod's build agent starts as soon as it is there.
    warm::write_atomically(&path, &json).map_err(|source| AgentError::WorkDir { path, source })?;
    Ok(())
}

/// Copies the running binary to `bin_dir/kiln` (a hard link when on the same file system).
fn install_self(bin_dir: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |source| AgentError::WorkDir {
        path: bin_dir.to_owned(),
        source,
    };
    let me = std::env::current_exe().map_err(fail)?;
    std::fs::create_dir_all(bin_dir).map_err(fail)?;
    let target = bin_dir.join("kiln");
    let _ = std::fs::remove_file(&target);
    if std::fs::hard_link(&me, &target).is_err() {
        std::fs::copy(&me, &target).map_err(fail)?;
    }
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).map_err(fail)?;
    Ok(())
}

/// The context of a job and the sender GitLab's answers about it go to.
fn context(
    spec: &AgentJob,
    job: JobPayload,
    paths: &AgentPaths,
    abort: CancellationToken,
) -> Result<(Context, watch::Sender<Remote>), AgentError> {
    let work = paths.work();
    let project = job
        .job_info
        .project_full_path
        .clone()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| sanitize(&job.job_info.project_name));
    let builds = paths.builds();
    let project_dir = builds.join(project);
    let tmp_dir = work.join("tmp");
    for dir in [&project_dir, &tmp_dir] {
        std::fs::create_dir_all(dir).map_err(|source| AgentError::WorkDir {
            path: dir.clone(),
            source,
        })?;
    }
    let mut env = base_env(&job, &project_dir, &builds, &tmp_dir, &spec.executor);
    let git_ca = match &spec.tls_ca {
        Some(pem) => Some(tls_ca_file(pem, &tmp_dir, &spec.gitlab_url, &mut env)?),
        None => None,
    };
    let variables = job_variables(&job, &env, &tmp_dir);
    // What the variables ask for is known before anything runs (the trace uplink needs
    // `CI_DEBUG_TRACE`); file variables' files are written later, by `export_variables`.
    let mut preview = env.clone();
    preview.extend(variables.resolved().into_iter().map(|v| (v.key, v.value)));
    let options = options::JobOptions::read(&preview);
    // Masked values as expanded too: an expansion can put a secret anywhere.
    let secrets = std::iter::once(job.token.clone()).chain(variables.secrets());
    let masker = mask::Masker::new(secrets, job.features.token_mask_prefixes.clone())
        .with_fingerprints(&spec.masked);
    let limit =
        usize::try_from(spec.settings.output_limit.saturating_mul(1024)).unwrap_or(usize::MAX);
    let trace = Arc::new(Trace::new(masker, limit, false).with_timestamps(options.timestamps));
    let api = RunnerApi::trusting(
        &spec.gitlab_url,
        spec.tls_ca
            .as_deref()
            .map(|pem| ("tls_ca of the job file", pem.as_bytes())),
    )?
    .with_debug_trace(options.debug_trace);
    let (remote_tx, remote_rx) = watch::channel(Remote::Running);
    let shell = spec
        .settings
        .shell
        .clone()
        .unwrap_or_else(|| process::default_shell(env.get("PATH").map(String::as_str)));
    let deadline = Instant::now() + job.timeout();
    let ctx = Context {
        settings: spec.settings.clone(),
        executor: spec.executor.clone(),
        runner: spec.runner.clone(),
        trace,
        api,
        project_dir,
        sources_file: work.join(SOURCES_FILE),
        tmp_dir,
        git_ca,
        env,
        shell,
        interrupts: Interrupts {
            remote: remote_rx,
            abort,
            stop_on_canceling: true,
        },
        deadline,
        steps_deadline: deadline,
        job,
        start_notes: lines_beside(&paths.job_file, crate::build::START_NOTES_FILE),
        start_lines: lines_beside(&paths.job_file, crate::build::START_FILE),
        script: process::ScriptOptions {
            from_files: Vec::new(),
            xtrace: options.debug_trace,
            sections: options.script_sections,
        },
        options,
        cache: spec.cache.clone(),
    };
    Ok((ctx, remote_tx))
}

/// The lines of file `name` beside `job_file` (the executor's or the coordinator's notes on
/// the start; none without one).
fn lines_beside(job_file: &Path, name: &str) -> Vec<String> {
    std::fs::read_to_string(job_file.with_file_name(name))
        .map(|text| {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

async fn run_job(
    spec: AgentJob,
    job: JobPayload,
    paths: &AgentPaths,
    abort: CancellationToken,
) -> Result<AgentReport, AgentError> {
    let (mut ctx, remote_tx) = context(&spec, job, paths, abort)?;
    let trace = Arc::clone(&ctx.trace);
    let uplink = Uplink::new(
        ctx.api.clone(),
        ctx.job.id,
        ctx.job.token.clone(),
        Arc::clone(&trace),
        spec.settings.trace_interval,
        spec.settings.keepalive_interval,
        remote_tx,
    );
    let stop_uplink = CancellationToken::new();
    let uplink_task = tokio::spawn(uplink.run(stop_uplink.clone()));
    let end = execute(&mut ctx).await;
    announce(&ctx, &end);
    trace.release_held();
    stop_uplink.cancel();
    let uplink = match uplink_task.await {
        Ok(uplink) => uplink,
        Err(e) => {
            tracing::error!(error = %e, "trace uplink task failed");
            return Ok(result_of(&end, false));
        }
    };
    let reported = report(&ctx, uplink, &end).await;
    Ok(result_of(&end, reported))
}

fn result_of(end: &JobEnd, reported: bool) -> AgentReport {
    AgentReport {
        state: if end.failure.is_some() {
            "failed"
        } else {
            "success"
        }
        .into(),
        failure_reason: end.failure.as_ref().map(|(r, _)| r.as_str().to_owned()),
        exit_code: end.exit_code,
        reported,
        canceled: end.canceled,
    }
}

fn sanitize(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() || cleaned.starts_with('.') {
        "project".into()
    } else {
        cleaned
    }
}

/// The environment every process of the job sees: the agent's own (already scrubbed by the
/// executor) plus the runner-defined `CI_*` variables. Job variables are added by
/// [`export_variables`].
fn base_env(
    job: &JobPayload,
    project_dir: &Path,
    builds_dir: &Path,
    tmp_dir: &Path,
    executor: &str,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| !k.starts_with("KILN_"))
        .collect();
    let mut set = |k: &str, v: String| {
        env.insert(k.to_owned(), v);
    };
    set("CI_PROJECT_DIR", project_dir.to_string_lossy().into_owned());
    set("CI_BUILDS_DIR", builds_dir.to_string_lossy().into_owned());
    set("CI_SERVER", "yes".into());
    set("CI_RUNNER_VERSION", crate::VERSION.into());
    set(
        "CI_RUNNER_EXECUTABLE_ARCH",
        format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
    );
    set("CI_JOB_TIMEOUT", job.timeout().as_secs().to_string());
    // `success`, `failed` or `canceled` once after_script runs.
    set("CI_JOB_STATUS", "running".into());
    // A pod is thrown away after its build; the local executor's work directory too, but
    // the host stays, so only Kubernetes builds are disposable environments.
    if executor == "kubernetes" {
        set("CI_DISPOSABLE_ENVIRONMENT", "true".into());
    }
    set("TMPDIR", tmp_dir.to_string_lossy().into_owned());
    set("GIT_TERMINAL_PROMPT", "0".into());
    env
}

/// Writes the CA certificates kiln trusts for GitLab (`tls_ca_file`) to
/// `<tmp>/CI_SERVER_TLS_CA_FILE` and exports its path as gitlab-runner does; returns the git
/// setting that makes git trust them for GitLab's host only (`http.<origin>.sslCAInfo`), so
/// submodules and LFS on other hosts keep the system's store.
fn tls_ca_file(
    pem: &str,
    tmp_dir: &Path,
    gitlab_url: &str,
    env: &mut BTreeMap<String, String>,
) -> Result<(String, String), AgentError> {
    let path = tmp_dir.join("CI_SERVER_TLS_CA_FILE");
    std::fs::write(&path, pem).map_err(|source| AgentError::WorkDir {
        path: path.clone(),
        source,
    })?;
    let shown = path.to_string_lossy().into_owned();
    env.insert("CI_SERVER_TLS_CA_FILE".into(), shown.clone());
    let origin = url::Url::parse(gitlab_url)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_else(|_| gitlab_url.trim_end_matches('/').to_owned());
    Ok((format!("http.{origin}.sslCAInfo"), shown))
}

/// `env` plus git's `GIT_CONFIG_*` entries for `setting` (after any the job set itself).
fn with_git_setting(
    env: &BTreeMap<String, String>,
    setting: Option<&(String, String)>,
) -> BTreeMap<String, String> {
    let mut env = env.clone();
    if let Some((key, value)) = setting {
        let n: usize = env
            .get("GIT_CONFIG_COUNT")
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(0);
        env.insert(format!("GIT_CONFIG_KEY_{n}"), key.clone());
        env.insert(format!("GIT_CONFIG_VALUE_{n}"), value.clone());
        env.insert("GIT_CONFIG_COUNT".into(), (n + 1).to_string());
    }
    env
}

/// The job's variables resolved as GitLab resolves them (see [`crate::variables`]) over the
/// build's environment `env`; file variables' files live in `tmp_dir`.
fn job_variables(job: &JobPayload, env: &BTreeMap<String, String>, tmp_dir: &Path) -> Variables {
    Variables::resolve(job.variables.iter().map(Definition::from))
        .with_environment(env.clone())
        .with_file_paths(|key| {
            tmp_dir
                .join(format!("{}.var", sanitize(key)))
                .to_string_lossy()
                .into_owned()
        })
}

/// Adds the job's variables to the environment: each name's winning value, expanded against
/// the whole set (unless `raw`); file variables written to 0600 files whose path becomes the
/// value.
fn export_variables(ctx: &mut Context) -> std::io::Result<()> {
    ctx.env = exported_env(&ctx.job, &ctx.env, &ctx.tmp_dir)?;
    ctx.script.from_files = oversized::move_to_files(&mut ctx.env, &ctx.tmp_dir)?;
    if ctx.sources_file.exists() {
        // The init container said all this already, in the part of the trace it left.
        return Ok(());
    }
    for (name, _) in &ctx.script.from_files {
        ctx.trace.line(&format!(
            "{name} is larger than one environment entry can hold (128 KiB): the scripts read it from a file into a shell variable, not exported"
        ));
    }
    for warning in &ctx.options.warnings {
        ctx.trace.warn(warning);
    }
    Ok(())
}

fn exported_env(
    job: &JobPayload,
    env: &BTreeMap<String, String>,
    tmp_dir: &Path,
) -> std::io::Result<BTreeMap<String, String>> {
    use std::os::unix::fs::PermissionsExt;
    let variables = job_variables(job, env, tmp_dir);
    let mut exported = env.clone();
    for var in variables.resolved() {
        let value = if var.file {
            let path = variables.value(&var.key).unwrap_or_default();
            std::fs::write(&path, &var.value)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            path
        } else {
            var.value
        };
        exported.insert(var.key, value);
    }
    Ok(exported)
}

async fn execute(ctx: &mut Context) -> JobEnd {
    let trace = Arc::clone(&ctx.trace);
    trace.section_start("prepare_executor", "Preparing the \"kiln\" executor");
    trace.line(&format!(
        "Running with kiln {} on {} ({} executor){}",
        crate::VERSION,
        hostname(),
        ctx.executor,
        if ctx.runner.is_empty() {
            String::new()
        } else {
            format!(", runner {}", ctx.runner)
        }
    ));
    for line in &ctx.start_lines {
        trace.line(line);
    }
    for note in &ctx.start_notes {
        trace.warn(note);
    }
    if ctx.executor == "local" {
        if let Some(image) = ctx.job.image.as_ref().filter(|i| !i.name.is_empty()) {
            trace.warn(&format!(
                "the local executor runs on the host: image `{}` is ignored",
                image.name
            ));
        }
        for service in &ctx.job.services {
            trace.warn(&format!(
                "the local executor does not start services: `{}` is ignored",
                service.name
            ));
        }
    }
    trace.section_end("prepare_executor");
    if ctx.executor == "kubernetes" {
        wait_for_services(ctx).await;
    }

    if let Err(e) = export_variables(ctx) {
        return JobEnd::failed(
            FailureReason::RunnerSystemFailure,
            format!("cannot write file variables: {e}"),
        );
    }
    if let Some(end) = get_sources(ctx).await {
        return end;
    }
    let restored_cache = cache::restore(ctx).await;
    if let Some(end) = download_dependencies(ctx).await {
        return end;
    }

    let steps: Vec<Step> = ctx.job.steps.clone();
    let mut end = JobEnd::success();
    // `RUNNER_SCRIPT_TIMEOUT` bounds the steps and leaves the rest of the job's time to
    // after_script and the artifacts.
    if let Some(limit) = ctx.options.script_timeout
        && let Some(at) = Instant::now().checked_add(limit)
    {
        ctx.steps_deadline = at.min(ctx.deadline);
    }
    for step in steps.iter().filter(|s| s.name != "after_script") {
        let failed = end.failure.is_some();
        if !step.when.applies(failed) {
            continue;
        }
        let step_end = run_step(ctx, step, false).await;
        match step_end {
            StepEnd::Exited(0) => {}
            StepEnd::Exited(code) if step.allow_failure => {
                trace.warn(&format!(
                    "step `{}` failed with exit code {code} (allowed to fail)",
                    step.name
                ));
            }
            StepEnd::Exited(code) => {
                end = JobEnd {
                    failure: Some((FailureReason::ScriptFailure, format!("exit code {code}"))),
                    exit_code: Some(code),
                    canceled: false,
                };
            }
            StepEnd::Other(other) => {
                end = other;
                break;
            }
        }
    }
    // A step's own timeout (`timeout` of a step, `RUNNER_SCRIPT_TIMEOUT`) leaves time for
    // after_script and artifacts, as in gitlab-runner; the job's timeout does not.
    let interrupted = end.canceled
        || matches!(end.failure, Some((FailureReason::RunnerSystemFailure, _)))
        || (matches!(end.failure, Some((FailureReason::JobExecutionTimeout, _)))
            && Instant::now() >= ctx.deadline);
    let canceled_now = *ctx.interrupts.remote.borrow() == Remote::Canceled;
    if !canceled_now
        && !ctx.interrupts.abort.is_cancelled()
        && let Some(after) = steps.iter().find(|s| s.name == "after_script")
        && (after.when.applies(end.failure.is_some()) || end.canceled)
    {
        let status = if end.canceled {
            "canceled"
        } else if end.failure.is_some() {
            "failed"
        } else {
            "success"
        };
        ctx.env.insert("CI_JOB_STATUS".into(), status.into());
        ctx.interrupts.stop_on_canceling = false;
        if let StepEnd::Exited(code) = run_step(ctx, after, true).await
            && code != 0
        {
            trace.warn(&format!(
                "after_script failed with exit code {code}; the job state does not change"
            ));
        }
    }
    if !interrupted && !end.canceled {
        cache::save(ctx, end.failure.is_some(), &restored_cache).await;
    }
    if !interrupted
        && !end.canceled
        && let Some(failure) = upload_artifacts(ctx, end.failure.is_some()).await
        && end.failure.is_none()
    {
        end = failure;
    }
    end
}

/// Waits for each service that names a `HEALTHCHECK_TCP_PORT` to accept connections on
/// localhost (services are sidecars of the build pod); a slow one only earns a warning, as in
/// gitlab-runner.
async fn wait_for_services(ctx: &Context) {
    for service in &ctx.job.services {
        let Some(port) = service
            .variables
            .iter()
            .rev()
            .find(|v| v.key == "HEALTHCHECK_TCP_PORT")
            .and_then(|v| v.value.trim().parse::<u16>().ok())
        else {
            continue;
        };
        ctx.trace.line(&format!(
            "Waiting for service {} on port {port}...",
            service.name
        ));
        let deadline = Instant::now() + ctx.settings.service_wait;
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(("127.0.0.1", port)),
            )
            .await;
            if matches!(attempt, Ok(Ok(_))) {
                break;
            }
            if Instant::now() >= deadline {
                ctx.trace.warn(&format!(
                    "service {} did not accept connections on port {port} within {}; it probably did not start properly",
                    service.name,
                    humantime::format_duration(ctx.settings.service_wait)
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The end of a job stopped by SIGTERM: who sends it depends on where the agent runs.
fn aborted(ctx: &Context) -> JobEnd {
    let message = if ctx.executor == "kubernetes" {
        "the build pod was stopped from outside (evicted, preempted, spot instance reclaimed, node drained or shut down, or deleted); kiln marks it as runner_system_failure so `retry: when: runner_system_failure` can re-run it"
    } else {
        "the runner is shutting down; the job was stopped (retry it)"
    };
    JobEnd::failed(FailureReason::RunnerSystemFailure, message)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

enum StepEnd {
    Exited(i32),
    Other(JobEnd),
}

async fn run_step(ctx: &mut Context, step: &Step, is_after: bool) -> StepEnd {
    let trace = Arc::clone(&ctx.trace);
    let section = format!("step_{}", step.name);
    let header = if is_after {
        "Running after_script".to_owned()
    } else {
        format!("Executing \"step_{}\" stage of the job script", step.name)
    };
    trace.section_start(&section, &header);
    let step_timeout = step.timeout.map(Duration::from_secs);
    let deadline = if is_after {
        let after_limit = ctx
            .options
            .after_script_timeout
            .unwrap_or(ctx.settings.after_script_timeout);
        let limit = step_timeout.unwrap_or(after_limit).min(after_limit);
        Instant::now() + limit
    } else {
        // A step's timeout is the payload's number: past the steps' deadline (or past what an
        // Instant can hold) it is the steps' deadline.
        step_timeout
            .and_then(|t| Instant::now().checked_add(t))
            .map_or(ctx.steps_deadline, |step| step.min(ctx.steps_deadline))
    };
    let script = match process::write_script(
        &ctx.tmp_dir,
        &step.name,
        &ctx.shell,
        &ctx.project_dir,
        &step.script,
        &ctx.script,
    ) {
        Ok(path) => path,
        Err(e) => {
            trace.section_end(&section);
            return StepEnd::Other(JobEnd::failed(
                FailureReason::RunnerSystemFailure,
                format!("cannot write the script: {e}"),
            ));
        }
    };
    let mut command = tokio::process::Command::new(&ctx.shell);
    command
        .arg(&script)
        .current_dir(&ctx.project_dir)
        .env_clear()
        .envs(&ctx.env);
    let exit = process::run(command, &trace, deadline, &mut ctx.interrupts).await;
    trace.section_end(&section);
    match exit {
        Ok(Exit::Code(code)) => StepEnd::Exited(code),
        Ok(Exit::TimedOut) if is_after => {
            trace.warn("after_script timed out");
            StepEnd::Exited(1)
        }
        Ok(Exit::TimedOut) => {
            let timeout = if Instant::now() >= ctx.deadline {
                ctx.job.timeout()
            } else if let Some(limit) = ctx.options.script_timeout
                && Instant::now() >= ctx.steps_deadline
            {
                trace.warn(&format!(
                    "script timeout of {} (RUNNER_SCRIPT_TIMEOUT) exceeded",
                    humantime::format_duration(limit)
                ));
                limit
            } else {
                step_timeout.unwrap_or_else(|| ctx.job.timeout())
            };
            StepEnd::Other(JobEnd::failed(
                FailureReason::JobExecutionTimeout,
                format!(
                    "execution took longer than {}",
                    humantime::format_duration(timeout)
                ),
            ))
        }
        Ok(Exit::Canceling | Exit::Canceled) => StepEnd::Other(JobEnd {
            failure: Some((FailureReason::ScriptFailure, "the job was canceled".into())),
            exit_code: None,
            canceled: true,
        }),
        Ok(Exit::Aborted) => StepEnd::Other(aborted(ctx)),
        Err(e) => StepEnd::Other(JobEnd::failed(
            FailureReason::RunnerSystemFailure,
            format!("cannot start `{}`: {e}", ctx.shell),
        )),
    }
}

async fn get_sources(ctx: &mut Context) -> Option<JobEnd> {
    let trace = Arc::clone(&ctx.trace);
    if let Ok(bytes) = std::fs::read(&ctx.sources_file) {
        // The init container fetched the sources: its trace goes into the job's.
        return match serde_json::from_slice::<PreparedSources>(&bytes) {
            Ok(prepared) => {
                trace.write_stamped(prepared.log.as_bytes());
                prepared
                    .failure
                    .map(|(reason, message)| JobEnd::failed(reason, message))
            }
            Err(e) => Some(JobEnd::failed(
                FailureReason::RunnerSystemFailure,
                format!(
                    "the sources prepared by the init container cannot be read ({}): {e}",
                    ctx.sources_file.display()
                ),
            )),
        };
    }
    let strategy = git::Strategy::from_variable(ctx.env.get("GIT_STRATEGY").map(String::as_str));
    trace.section_start("get_sources", "Getting source from Git repository");
    if strategy == git::Strategy::None || ctx.job.git_info.repo_url.is_empty() {
        trace.line("Skipping Git repository setup");
        trace.section_end("get_sources");
        return None;
    }
    let depth = ctx
        .env
        .get("GIT_DEPTH")
        .and_then(|d| d.trim().parse::<u32>().ok());
    trace.line(&format!(
        "Fetching changes{} for {} at {}",
        match depth.unwrap_or(ctx.job.git_info.depth) {
            0 => String::new(),
            d => format!(" with git depth set to {d}"),
        },
        ctx.job.git_info.git_ref,
        short(&ctx.job.git_info.sha),
    ));
    if let Some(end) = run_hook(ctx, "pre_get_sources_script").await {
        trace.section_end("get_sources");
        return Some(end);
    }
    let lfs = git_lfs_available(ctx).await;
    let attempts = ctx.options.get_sources_attempts;
    let mut attempt = 1;
    loop {
        let lines = match git::commands(
            &ctx.job.git_info,
            &ctx.project_dir,
            strategy,
            depth,
            &ctx.options,
            lfs,
        ) {
            Ok(lines) => lines,
            Err(e) => {
                // A value from the project or pipeline that git would take as an option (or no
                // git name can be): the job's problem, not the runner's, so no system failure
                // (which GitLab may retry, on another runner, with the same value).
                trace.section_end("get_sources");
                return Some(JobEnd::failed(FailureReason::ScriptFailure, e.to_string()));
            }
        };
        match run_git(ctx, lines).await {
            GitRun::Done => break,
            GitRun::Failed(code, command) if attempt < attempts => {
                trace.warn(&format!(
                    "`git {command}` exited with {code}; retrying (attempt {} of {attempts}, GET_SOURCES_ATTEMPTS)",
                    attempt + 1
                ));
                tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                attempt += 1;
            }
            GitRun::Failed(code, command) => {
                trace.section_end("get_sources");
                return Some(JobEnd::failed(
                    FailureReason::RunnerSystemFailure,
                    format!("fetching the sources failed: `git {command}` exited with {code}"),
                ));
            }
            GitRun::Ended(end) => {
                trace.section_end("get_sources");
                return Some(end);
            }
        }
    }
    // The helper's git records what it tracks: `artifacts:untracked` needs no git later.
    if let Err(e) =
        untracked::record_tracked(&ctx.project_dir, &tracked_record(ctx), &ctx.env).await
    {
        trace.warn(&format!("{e}; `artifacts:untracked` will find nothing"));
    }
    if let Some(end) = run_hook(ctx, "post_get_sources_script").await {
        trace.section_end("get_sources");
        return Some(end);
    }
    trace.line(&format!("Checked out {}", short(&ctx.job.git_info.sha)));
    trace.section_end("get_sources");
    None
}

/// How a run of git commands went.
enum GitRun {
    Done,
    /// A command exited with this code (its subcommand named): worth another attempt.
    Failed(i32, String),
    /// Stopped for good (timeout, cancel, no git).
    Ended(JobEnd),
}

async fn run_git(ctx: &mut Context, lines: Vec<Vec<String>>) -> GitRun {
    for line in lines {
        let mut command = tokio::process::Command::new(&line[0]);
        command
            .args(&line[1..])
            .current_dir(&ctx.tmp_dir)
            .env_clear()
            .envs(with_git_setting(&ctx.env, ctx.git_ca.as_ref()));
        let end = process::run(command, &ctx.trace, ctx.deadline, &mut ctx.interrupts).await;
        return match end {
            Ok(Exit::Code(0)) => continue,
            Ok(Exit::Code(code)) => GitRun::Failed(
                code,
                line.get(7)
                    .map(String::as_str)
                    .unwrap_or(&line[1])
                    .to_owned(),
            ),
            Ok(Exit::TimedOut) => GitRun::Ended(JobEnd::failed(
                FailureReason::JobExecutionTimeout,
                "execution took longer than the job timeout while fetching sources",
            )),
            Ok(Exit::Canceling | Exit::Canceled) => GitRun::Ended(JobEnd {
                failure: Some((FailureReason::ScriptFailure, "the job was canceled".into())),
                exit_code: None,
                canceled: true,
            }),
            Ok(Exit::Aborted) => GitRun::Ended(aborted(ctx)),
            Err(e) => GitRun::Ended(JobEnd::failed(
                FailureReason::RunnerSystemFailure,
                format!("cannot run git (is it installed?): {e}"),
            )),
        };
    }
    GitRun::Done
}

/// Whether `git lfs` runs here (the helper image ships it; on the local executor, the host).
async fn git_lfs_available(ctx: &Context) -> bool {
    let status = tokio::process::Command::new("git")
        .args(["lfs", "version"])
        .env_clear()
        .envs(&ctx.env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await;
    matches!(status, Ok(s) if s.success())
}

/// Runs the job's `hooks:<name>` script, if it has one, in the sources stage; its failure
/// fails the job as a script failure.
async fn run_hook(ctx: &mut Context, name: &str) -> Option<JobEnd> {
    let hook = ctx.job.hooks.iter().find(|h| h.name == name)?.clone();
    let step = Step {
        name: name.to_owned(),
        script: hook.script,
        timeout: None,
        when: When::Always,
        allow_failure: false,
    };
    ctx.trace.line(&format!("Running {name}"));
    match run_step(ctx, &step, false).await {
        StepEnd::Exited(0) => None,
        StepEnd::Exited(code) => Some(JobEnd {
            failure: Some((
                FailureReason::ScriptFailure,
                format!("{name} failed with exit code {code}"),
            )),
            exit_code: Some(code),
            canceled: false,
        }),
        StepEnd::Other(end) => Some(end),
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(8)]
}

async fn download_dependencies(ctx: &mut Context) -> Option<JobEnd> {
    let deps: Vec<_> = ctx
        .job
        .dependencies
        .iter()
        .filter(|d| d.artifacts_file.is_some())
        .cloned()
        .collect();
    if deps.is_empty() {
        return None;
    }
    let trace = Arc::clone(&ctx.trace);
    trace.section_start("download_artifacts", "Downloading artifacts");
    for dep in deps {
        trace.line(&format!(
            "Downloading artifacts for {} ({})...",
            dep.name, dep.id
        ));
        let mut attempt = 0;
        // `ARTIFACT_DOWNLOAD_ATTEMPTS` tries any failure again; a transient one (5xx, a broken
        // connection) is tried at least three times whatever it says.
        let attempts = u64::from(ctx.options.artifact_download_attempts);
        let data = loop {
            attempt += 1;
            match ctx.api.download_artifacts(dep.id, &dep.token).await {
                Ok(data) => break Ok(data),
                Err(e) if attempt < attempts || (e.is_transient() && attempt < 3) => {
                    trace.warn(&format!(
                        "downloading artifacts of {} failed ({e}); retrying",
                        dep.name
                    ));
                    tokio::time::sleep(Duration::from_secs(attempt)).await;
                }
                Err(e) => break Err(e),
            }
        };
        let result = data.map_err(|e| e.to_string()).and_then(|data| {
            artifacts::unzip(&dep.name, &data, &ctx.project_dir).map_err(|e| e.to_string())
        });
        match result {
            Ok(count) => trace.line(&format!(
                "Downloaded {count} file(s) from {} ({})",
                dep.name, dep.id
            )),
            Err(e) => {
                trace.section_end("download_artifacts");
                return Some(JobEnd::failed(
                    FailureReason::RunnerExternalDependencyFailure,
                    format!("cannot get the artifacts of {} ({}): {e}", dep.name, dep.id),
                ));
            }
        }
    }
    trace.section_end("download_artifacts");
    None
}

/// Uploads the artifacts whose `when` applies; a failure to upload fails the job.
async fn upload_artifacts(ctx: &mut Context, failed: bool) -> Option<JobEnd> {
    let wanted: Vec<Artifact> = ctx
        .job
        .artifacts
        .iter()
        .filter(|a| a.when.unwrap_or(When::OnSuccess).applies(failed))
        .cloned()
        .collect();
    if wanted.is_empty() {
        return None;
    }
    let trace = Arc::clone(&ctx.trace);
    let section = if failed {
        "upload_artifacts_on_failure"
    } else {
        "upload_artifacts_on_success"
    };
    trace.section_start(section, "Uploading artifacts for the job");
    let mut failure = None;
    for artifact in wanted {
        if let Err(end) = upload_one(ctx, &artifact).await {
            failure = Some(end);
            break;
        }
    }
    trace.section_end(section);
    failure
}

async fn upload_one(ctx: &Context, artifact: &Artifact) -> Result<(), JobEnd> {
    let trace = &ctx.trace;
    let artifact_type = artifact
        .artifact_type
        .clone()
        .unwrap_or_else(|| "archive".into());
    let format = artifact
        .artifact_format
        .clone()
        .unwrap_or_else(|| "zip".into());
    let untracked = if artifact.untracked {
        untracked_files(ctx, "artifacts:untracked")
    } else {
        Vec::new()
    };
    let (files, unmatched) = artifacts::collect(
        &ctx.project_dir,
        &artifact.paths,
        &artifact.exclude,
        &untracked,
    )
    .map_err(|e| JobEnd::failed(FailureReason::ScriptFailure, e.to_string()))?;
    for pattern in &unmatched {
        trace.warn(&format!("{pattern}: no matching files. Ensure that the artifact path is relative to the working directory ({})", ctx.project_dir.display()));
    }
    if files.is_empty() {
        trace.error(&format!("No files to upload for {artifact_type} artifact"));
        return Ok(());
    }
    // Built on disk, streamed from there: the archive never sits in the build's memory, and a
    // retry reads the file again.
    let archive = tempfile::NamedTempFile::new_in(&ctx.tmp_dir).map_err(|e| {
        JobEnd::failed(
            FailureReason::RunnerSystemFailure,
            format!(
                "cannot create a temporary file in {}: {e}",
                ctx.tmp_dir.display()
            ),
        )
    })?;
    let name = artifact.name.as_deref().filter(|n| !n.is_empty());
    let built = match format.as_str() {
        "zip" => {
            let out = std::io::BufWriter::new(archive.as_file());
            artifacts::zip_into(&ctx.project_dir, &files, out)
                .and_then(|out| flush(out, archive.path()))
                .map(|()| format!("{}.zip", name.unwrap_or("artifacts")))
        }
        "gzip" => {
            let mut out = std::io::BufWriter::new(archive.as_file());
            let first = file_name(&files[0]);
            artifacts::gzip_members(&ctx.project_dir, &files, &mut out)
                .and_then(|()| flush(out, archive.path()))
                .map(|()| format!("{}.gz", name.unwrap_or(&first)))
        }
        "raw" => {
            if files.len() > 1 {
                trace.warn(&format!(
                    "{artifact_type} artifact in raw format takes one file; using {}",
                    files[0].display()
                ));
            }
            // One file, no archive to hold a link: a link is followed only while it stays in
            // the project, so `report.xml -> /etc/shadow` is refused.
            let mut out = std::io::BufWriter::new(archive.as_file());
            artifacts::copy_raw(&ctx.project_dir, &files[0], &mut out)
                .and_then(|()| flush(out, archive.path()))
                .map(|()| name.map_or_else(|| file_name(&files[0]), str::to_owned))
        }
        other => {
            trace.warn(&format!(
                "artifact format `{other}` is not supported; {artifact_type} artifact skipped"
            ));
            return Ok(());
        }
    };
    let filename =
        built.map_err(|e| JobEnd::failed(FailureReason::ScriptFailure, e.to_string()))?;
    let size = archive.as_file().metadata().map(|m| m.len()).unwrap_or(0);
    trace.line(&format!(
        "Uploading {artifact_type} artifact as {filename} ({} file(s), {size} bytes)...",
        files.len(),
    ));
    let upload = ArtifactUpload {
        filename,
        format,
        artifact_type: artifact_type.clone(),
        expire_in: artifact.expire_in.clone(),
        path: archive.path().to_owned(),
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        match ctx
            .api
            .upload_artifact(ctx.job.id, &ctx.job.token, &upload)
            .await
        {
            Ok(UploadAck::Created) => {
                trace.line(&format!("Uploaded {artifact_type} artifact"));
                return Ok(());
            }
            Ok(UploadAck::TooLarge) => {
                return Err(JobEnd::failed(
                    FailureReason::ScriptFailure,
                    format!(
                        "{artifact_type} artifact is too large for this GitLab (HTTP 413); reduce `artifacts:paths` or raise the instance limit"
                    ),
                ));
            }
            Err(e) if e.is_transient() && attempt < 3 => {
                trace.warn(&format!("uploading artifacts failed ({e}); retrying"));
                tokio::time::sleep(Duration::from_secs(attempt)).await;
            }
            Err(e) => {
                return Err(JobEnd::failed(
                    FailureReason::RunnerSystemFailure,
                    format!("uploading {artifact_type} artifact failed: {e}"),
                ));
            }
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn flush<W: std::io::Write>(
    mut out: std::io::BufWriter<W>,
    path: &Path,
) -> Result<(), artifacts::ArtifactError> {
    std::io::Write::flush(&mut out).map_err(|source| artifacts::ArtifactError::Io {
        action: "write",
        path: path.to_owned(),
        source,
    })
}

/// Where the agent that checked out the sources records the files git tracks (beside the
/// sources file, which the init container and the build container share).
fn tracked_record(ctx: &Context) -> PathBuf {
    ctx.sources_file.with_file_name("tracked-files")
}

/// The project's untracked files (from the record the checkout made, so the job's image needs
/// no git), for `artifacts:untracked` and `cache:untracked`; a missing record is a warning.
fn untracked_files(ctx: &Context, what: &str) -> Vec<PathBuf> {
    untracked::untracked(&ctx.project_dir, &tracked_record(ctx)).unwrap_or_else(|e| {
        ctx.trace
            .warn(&format!("{what}: {e}; no untracked files added"));
        Vec::new()
    })
}

/// The last lines of the trace, as gitlab-runner writes them.
fn announce(ctx: &Context, end: &JobEnd) {
    match &end.failure {
        None => ctx.trace.line("\x1b[32;1mJob succeeded\x1b[0;m"),
        Some(_) if end.canceled => ctx.trace.error("Job was canceled"),
        Some((reason, message)) => ctx
            .trace
            .error(&format!("Job failed ({reason}): {message}")),
    }
}

/// Sends the rest of the trace and the final state: 202 → wait and repeat, 412 → resend the
/// trace from 0. Returns whether GitLab took it (or no longer needs it).
async fn report(ctx: &Context, mut uplink: Uplink, end: &JobEnd) -> bool {
    let state = if end.failure.is_some() {
        "failed"
    } else {
        "success"
    };
    let reason = end
        .failure
        .as_ref()
        .map(|(r, _)| ctx.job.accepted_reason(*r));
    let give_up = Instant::now() + Duration::from_secs(600);
    let mut backoff = Duration::from_millis(500);
    let mut resets = 0;
    while Instant::now() < give_up {
        if let Err(e) = uplink.flush().await {
            tracing::warn!(job = ctx.job.id, error = %e, "sending the trace failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(15));
            continue;
        }
        let (checksum, bytesize) = ctx.trace.checksum();
        let update = JobUpdate {
            token: uplink.token(),
            state,
            failure_reason: reason,
            exit_code: end.exit_code,
            output: Some(TraceOutput { checksum, bytesize }),
        };
        match uplink.api().update_job(ctx.job.id, &update).await {
            Ok(UpdateAck::Accepted(_)) => return true,
            Ok(UpdateAck::Gone(control)) => {
                tracing::info!(job = ctx.job.id, status = ?control.job_status, "GitLab no longer takes updates for this job");
                return true;
            }
            Ok(UpdateAck::Pending(control)) => {
                tokio::time::sleep(control.update_interval.unwrap_or(uplink.interval())).await;
            }
            Ok(UpdateAck::ChecksumMismatch) => {
                resets += 1;
                if resets > 3 {
                    tracing::error!(
                        job = ctx.job.id,
                        "GitLab keeps rejecting the trace checksum"
                    );
                    return false;
                }
                tracing::info!(
                    job = ctx.job.id,
                    "GitLab asked for the whole trace again (412)"
                );
                uplink.reset();
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(job = ctx.job.id, error = %e, "final update failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(15));
            }
            Err(e) => {
                tracing::error!(job = ctx.job.id, error = %e, "final update rejected");
                return false;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_ca_file_is_exported_and_trusted_by_git_for_gitlab_s_origin_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut env = BTreeMap::from([("GIT_CONFIG_COUNT".to_owned(), "1".to_owned())]);
        let setting = tls_ca_file(
            "-----BEGIN CERTIFICATE-----\n",
            dir.path(),
            "https://gitlab.example.com:8443/sub/",
            &mut env,
        )
        .unwrap();
        let file = dir.path().join("CI_SERVER_TLS_CA_FILE");
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "-----BEGIN CERTIFICATE-----\n"
        );
        assert_eq!(env["CI_SERVER_TLS_CA_FILE"], file.to_string_lossy());
        assert_eq!(setting.0, "http.https://gitlab.example.com:8443.sslCAInfo");
        // After the job's own GIT_CONFIG_0 entry, not over it.
        let git_env = with_git_setting(&env, Some(&setting));
        assert_eq!(git_env["GIT_CONFIG_COUNT"], "2");
        assert_eq!(git_env["GIT_CONFIG_KEY_1"], setting.0);
        assert_eq!(git_env["GIT_CONFIG_VALUE_1"], setting.1);
        assert_eq!(with_git_setting(&env, None), env);
    }

    use super::*;

    /// A job as GitLab sends it, with these variables (predefined first, pipeline last).
    fn payload(variables: serde_json::Value) -> JobPayload {
        serde_json::from_value(serde_json::json!({
            "id": 7,
            "token": "job-token-123",
            "variables": variables,
            "steps": [{"name": "script", "script": ["true"]}],
        }))
        .unwrap()
    }

    fn base() -> BTreeMap<String, String> {
        [
            ("PATH".to_string(), "/usr/bin".to_string()),
            ("HOME".to_string(), "/home/ci".to_string()),
            ("CI_PROJECT_DIR".to_string(), "/builds/p".to_string()),
        ]
        .into()
    }

    fn export(job: &JobPayload) -> (BTreeMap<String, String>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (exported_env(job, &base(), dir.path()).unwrap(), dir)
    }

    #[test]
    fn a_global_reference_takes_the_pipeline_variable_that_overrides_its_target() {
        // global `REF: ref-${G}` and `G: global`, then `--var G=cli` (a pipeline variable).
        let job = payload(serde_json::json!([
            {"key": "CI_JOB_NAME", "value": "deploy", "public": true},
            {"key": "G", "value": "global", "public": true},
            {"key": "REF", "value": "ref-${G}", "public": true},
            {"key": "G", "value": "cli", "public": true},
        ]));
        let (env, _dir) = export(&job);
        assert_eq!(env["REF"], "ref-cli");
        assert_eq!(env["G"], "cli");
    }

    #[test]
    fn a_reference_to_a_variable_defined_further_down_expands() {
        let job = payload(serde_json::json!([
            {"key": "FWD", "value": "f-$LATER", "public": true},
            {"key": "LATER", "value": "later", "public": true},
            {"key": "JOB_FWD", "value": "$JOB_LATER/x", "public": true},
            {"key": "JOB_LATER", "value": "${LATER}2", "public": true},
        ]));
        let (env, _dir) = export(&job);
        assert_eq!(env["FWD"], "f-later");
        assert_eq!(env["JOB_FWD"], "later2/x");
    }

    #[test]
    fn expansion_follows_gitlab_runner_syntax_and_the_build_environment() {
        let job = payload(serde_json::json!([
            {"key": "A", "value": "1"},
            {"key": "B_2", "value": "two"},
            {"key": "S", "value": "x$A-${B_2}-$MISSING-$$A-$-%A%"},
            {"key": "BIN", "value": "$CI_PROJECT_DIR/bin:$PATH"},
            {"key": "PATH", "value": "$HOME/.local/bin:$PATH"},
        ]));
        let (env, _dir) = export(&job);
        assert_eq!(env["S"], "x1-two--$A-$-%A%");
        assert_eq!(
            env["PATH"], "/home/ci/.local/bin:/usr/bin",
            "extends the environment's"
        );
        assert_eq!(env["BIN"], "/builds/p/bin:/home/ci/.local/bin:/usr/bin");
    }

    #[test]
    fn raw_variables_stay_literal_and_file_variables_expand_to_their_path() {
        let job = payload(serde_json::json!([
            {"key": "RAW", "value": "$HOME stays", "raw": true},
            {"key": "CONFIG", "value": "host: $HOST\n", "file": true},
            {"key": "HOST", "value": "db"},
            {"key": "ARG", "value": "--config=$CONFIG"},
        ]));
        let (env, dir) = export(&job);
        assert_eq!(env["RAW"], "$HOME stays");
        let path = dir.path().join("CONFIG.var");
        assert_eq!(env["CONFIG"], path.to_string_lossy());
        assert_eq!(env["ARG"], format!("--config={}", path.display()));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "host: db\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn self_references_and_cycles_end_with_the_reference_left_as_is() {
        let job = payload(serde_json::json!([
            {"key": "SELF", "value": "x$SELF"},
            {"key": "A", "value": "a$B"},
            {"key": "B", "value": "b${A}"},
        ]));
        let (env, _dir) = export(&job);
        assert_eq!(env["SELF"], "x$SELF");
        assert_eq!(env["A"], "ab${A}");
        assert_eq!(env["B"], "ba$B");
    }

    #[test]
    fn masked_values_are_masked_wherever_an_expansion_puts_them() {
        let job = payload(serde_json::json!([
            {"key": "PREFIX", "value": "pre"},
            {"key": "TOKEN", "value": "$PREFIX-Ab+/cd=ef", "masked": true},
            {"key": "URL", "value": "https://u:$TOKEN@host/"},
        ]));
        let dir = tempfile::tempdir().unwrap();
        let secrets = std::iter::once(job.token.clone())
            .chain(job_variables(&job, &base(), dir.path()).secrets());
        let trace = Trace::new(mask::Masker::new(secrets, Vec::new()), 1 << 20, false);
        let env = exported_env(&job, &base(), dir.path()).unwrap();
        trace.write(format!("url {}\n", env["URL"]).as_bytes());
        trace.write(b"query ?t=pre-Ab%2B%2F");
        trace.write(b"cd%3Def&job=job-token-123\n");
        trace.release_held();
        let log = String::from_utf8(trace.contents()).unwrap();
        assert_eq!(
            log,
            "url https://u:[MASKED]@host/\nquery ?t=[MASKED]&job=[MASKED]\n"
        );
    }
}
