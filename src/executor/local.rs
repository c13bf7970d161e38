//! The local executor: each build a child process on this machine, in a work directory of its
//! own with a scrubbed environment — `kiln agent` for GitLab jobs, a foreign agent's own
//! program (`java -jar agent.jar` for Jenkins) otherwise. Secrets are private files in the work
//! directory; the directory is removed with the build.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Executor, LaunchError, Watch};
use crate::build::{
    AGENT_PGID_FILE, AGENT_RESULT_FILE, AgentReport, Build, Download, Ending, EnvValue,
    FailureReason, ForeignAgent, JOB_FILE, Process, Workload,
};

/// How long an agent gets to report after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// How long past its timeout a build may run before it is killed.
const DEADLINE_MARGIN: Duration = Duration::from_secs(300);
/// Environment variables every build gets from the coordinator's environment.
const PASS_ENV: &[&str] = &[
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "USER",
    "LOGNAME",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "RUST_LOG",
];

/// `[local]`: the child-process executor.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// Parent directory of per-build work directories (default: the system temp dir).
    pub work_dir: Option<PathBuf>,
    /// Keep each build's work directory after it ends (for debugging).
    pub keep_work_dirs: bool,
    /// Extra environment variables passed from the coordinator's environment to builds.
    pub pass_env: Vec<String>,
}

/// Runs each build as a child process on this machine.
pub struct LocalExecutor {
    agent: PathBuf,
    work_root: PathBuf,
    keep_work_dirs: bool,
    pass_env: Vec<String>,
    http: reqwest::Client,
    builds: Mutex<HashMap<String, Running>>,
}

/// A build's process, as its watchers see it.
struct Running {
    ending: watch::Receiver<Option<Ending>>,
    started: watch::Receiver<bool>,
    stop: CancellationToken,
}

/// What a launched build runs.
struct Spawn {
    command: tokio::process::Command,
    /// The work directory (removed when the build ends, unless kept).
    work: tempfile::TempDir,
    /// Whether it is the kiln agent (which leaves a result file).
    kiln_agent: bool,
    /// What to say when the program cannot be started because it is missing.
    missing_program: Option<String>,
    timeout: Option<Duration>,
}

impl LocalExecutor {
    /// An executor running `agent` (normally this very binary) for kiln-agent builds.
    pub fn new(agent: PathBuf, config: &LocalConfig) -> Self {
        Self {
            agent,
            work_root: config.work_dir.clone().unwrap_or_else(std::env::temp_dir),
            keep_work_dirs: config.keep_work_dirs,
            pass_env: config.pass_env.clone(),
            http: reqwest::Client::builder()
                .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(15))
                .timeout(Duration::from_secs(300))
                .build()
                .unwrap_or_default(),
            builds: Mutex::new(HashMap::new()),
        }
    }

    async fn launch_build(&self, build: &Build) -> Result<(), LaunchError> {
        if self.lock().contains_key(&build.name) {
            return Err(LaunchError::Exists(build.name.clone()));
        }
        let spawn = self.prepare(build).await?;
        let (ending_tx, ending) = watch::channel(None);
        let (started_tx, started) = watch::channel(false);
        let stop = CancellationToken::new();
        self.lock().insert(
            build.name.clone(),
            Running {
                ending,
                started,
                stop: stop.clone(),
            },
        );
        let name = build.name.clone();
        let keep = self.keep_work_dirs;
        tokio::spawn(async move {
            let ending = run(spawn, &name, stop, &started_tx, keep).await;
            ending_tx.send_replace(Some(ending));
        });
        Ok(())
    }

    /// The work directory with the build's secrets and downloads, and the command to run.
    async fn prepare(&self, build: &Build) -> Result<Spawn, LaunchError> {
        let failed = |what: &str, path: &Path, e: std::io::Error| {
            LaunchError::Failed(format!("cannot {what} {}: {e}", path.display()))
        };
        std::fs::create_dir_all(&self.work_root)
            .map_err(|e| failed("create", &self.work_root, e))?;
        let work = tempfile::Builder::new()
            .prefix(&format!("{}-", build.name))
            .tempdir_in(&self.work_root)
            .map_err(|e| failed("create a work directory in", &self.work_root, e))?;
        for (key, value) in &build.secrets {
            if key.contains('/') || key.starts_with('.') {
                return Err(LaunchError::Rejected(format!(
                    "secret `{key}` cannot be a file name"
                )));
            }
            let path = work.path().join(key);
            write_private(&path, value).map_err(|e| failed("write", &path, e))?;
        }
        let (mut command, kiln_agent, missing_program) = match &build.workload {
            Workload::KilnAgent { .. } => {
                let mut command = tokio::process::Command::new(&self.agent);
                command
                    .env_clear()
                    .arg("agent")
                    .arg("--job")
                    .arg(work.path().join(JOB_FILE));
                (command, true, None)
            }
            Workload::Foreign(agent) => {
                let Some(process) = &agent.process else {
                    return Err(LaunchError::Rejected(format!(
                        "the {} agent cannot run as a local process; use executor = \"kubernetes\"",
                        build.key.source.name()
                    )));
                };
                self.download(&process.downloads, work.path()).await?;
                (
                    foreign_command(agent, process, build, work.path()),
                    false,
                    Some(process.missing_program.clone()),
                )
            }
        };
        command
            .current_dir(work.path())
            .env("HOME", work.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for name in PASS_ENV
            .iter()
            .copied()
            .chain(self.pass_env.iter().map(String::as_str))
        {
            if let Ok(value) = std::env::var(name) {
                command.env(name, value);
            }
        }
        Ok(Spawn {
            command,
            work,
            kiln_agent,
            missing_program,
            timeout: build.timeout,
        })
    }

    /// Fetches each file a process needs into its work directory, through a cache shared by
    /// builds (an agent jar is the same for every build).
    async fn download(&self, downloads: &[Download], work: &Path) -> Result<(), LaunchError> {
        let cache = self.work_root.join("kiln-downloads");
        std::fs::create_dir_all(&cache)
            .map_err(|e| LaunchError::Failed(format!("cannot create {}: {e}", cache.display())))?;
        for download in downloads {
            let cached = cache.join(hex::encode(sha2_of(download.url.as_bytes())));
            if !cached.exists() {
                let shown = crate::net::redact_url(&download.url);
                let response = self
                    .http
                    .get(&download.url)
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status)
                    .map_err(|e| {
                        LaunchError::Failed(format!("cannot download {shown}: {}", e.without_url()))
                    })?;
                let bytes = response.bytes().await.map_err(|e| {
                    LaunchError::Failed(format!("cannot download {shown}: {}", e.without_url()))
                })?;
                let partial = cached.with_extension("partial");
                std::fs::write(&partial, &bytes)
                    .and_then(|()| std::fs::rename(&partial, &cached))
                    .map_err(|e| {
                        LaunchError::Failed(format!("cannot store {}: {e}", cached.display()))
                    })?;
            }
            if download.file.contains('/') {
                return Err(LaunchError::Rejected(format!(
                    "download `{}` cannot be a file name",
                    download.file
                )));
            }
            let target = work.join(&download.file);
            std::fs::copy(&cached, &target).map_err(|e| {
                LaunchError::Failed(format!("cannot copy to {}: {e}", target.display()))
            })?;
        }
        Ok(())
    }

    async fn watch_build(&self, name: &str, watch: Watch) -> Ending {
        let running = self
            .lock()
            .get(name)
            .map(|r| (r.ending.clone(), r.started.clone(), r.stop.clone()));
        let Some((mut ending, mut started, stop)) = running else {
            return Ending::failed(
                FailureReason::RunnerSystemFailure,
                format!("kiln runs no build named {name} here"),
            );
        };
        let mut told_running = false;
        let mut cancelled = false;
        loop {
            if let Some(ending) = ending.borrow_and_update().clone() {
                return ending;
            }
            if !told_running && *started.borrow_and_update() {
                told_running = true;
                if let Some(on_running) = &watch.on_running {
                    on_running.call();
                }
            }
            tokio::select! {
                changed = ending.changed() => {
                    if changed.is_err() {
                        return Ending::failed(FailureReason::RunnerSystemFailure, "the build's process could not be waited for");
                    }
                }
                _ = started.changed(), if !told_running => {}
                () = watch.cancel.cancelled(), if !cancelled => {
                    // Child processes do not outlive the coordinator: stop the build, and let
                    // it report how it ended.
                    cancelled = true;
                    stop.cancel();
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.builds.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The command of a foreign agent's process: its program and arguments, its plain and secret
/// environment.
fn foreign_command(
    agent: &ForeignAgent,
    process: &Process,
    build: &Build,
    work: &Path,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(&process.program);
    command.args(&process.args).env_clear();
    for var in &agent.env {
        let value = match &var.value {
            EnvValue::Plain(value) => value.clone(),
            EnvValue::Secret(key) => build
                .secrets
                .get(key)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default(),
        };
        command.env(&var.name, value);
    }
    command.env("KILN_WORK_DIR", work);
    command
}

/// Runs a prepared build to its end (or until `stop`), then tidies up its work directory.
async fn run(
    spawn: Spawn,
    name: &str,
    stop: CancellationToken,
    started: &watch::Sender<bool>,
    keep: bool,
) -> Ending {
    let Spawn {
        mut command,
        work,
        kiln_agent,
        missing_program,
        timeout,
    } = spawn;
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let program = command
                .as_std()
                .get_program()
                .to_string_lossy()
                .into_owned();
            let ending = if e.kind() == std::io::ErrorKind::NotFound {
                Ending::failed(
                    FailureReason::RunnerConfigurationError,
                    format!(
                        "`{program}` is not on the PATH of kiln's local executor{}",
                        missing_program
                            .map(|hint| format!(": {hint}"))
                            .unwrap_or_default()
                    ),
                )
            } else {
                Ending::failed(
                    FailureReason::RunnerSystemFailure,
                    format!("cannot start `{program}`: {e}"),
                )
            };
            tracing::warn!(build = name, detail = %ending.detail, "build could not start");
            return ending;
        }
    };
    let pid = child.id().map(|id| Pid::from_raw(id as i32));
    started.send_replace(true);
    tracing::info!(build = name, pid = ?pid, dir = %work.path().display(), "build started");
    // The build's own output joins the coordinator's log, tagged with the build.
    if let Some(out) = child.stdout.take() {
        forward_lines(name.to_owned(), out);
    }
    if let Some(err) = child.stderr.take() {
        forward_lines(name.to_owned(), err);
    }
    // Past the timeout plus a margin the build should long have ended: kill it.
    let hard_deadline = timeout.map_or(Duration::MAX, |t| t.saturating_add(DEADLINE_MARGIN));
    let status = tokio::select! {
        status = child.wait() => status.ok(),
        () = sleep_or_forever(hard_deadline) => {
            tracing::warn!(build = name, "build ran past its timeout; killing it");
            None
        }
        () = stop.cancelled() => {
            if let Some(pid) = pid {
                let _ = kill(pid, Signal::SIGTERM);
            }
            tokio::time::timeout(STOP_GRACE, child.wait()).await.ok().and_then(Result::ok)
        }
    };
    let status = match status {
        Some(status) => Some(status),
        None => {
            let _ = child.start_kill();
            child.wait().await.ok()
        }
    };
    // Whatever happened to the agent, its step must not outlive it.
    if let Some(pgid) = std::fs::read_to_string(work.path().join(AGENT_PGID_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
    let ending = if kiln_agent {
        let unreported = Ending::failed(
            FailureReason::RunnerSystemFailure,
            format!("{} before it reported the job", describe(status)),
        );
        match std::fs::read(work.path().join(AGENT_RESULT_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<AgentReport>(&bytes).ok())
        {
            Some(report) => report.ending(unreported),
            None => unreported,
        }
    } else {
        Ending::agent_exited(status.and_then(|s| s.code()), describe(status))
    };
    tracing::info!(build = name, detail = %ending.detail, reported = ending.reported, "build ended");
    if keep {
        let kept = work.keep();
        tracing::info!(build = name, dir = %kept.display(), "work directory kept");
    }
    ending
}

async fn sleep_or_forever(duration: Duration) {
    if duration == Duration::MAX {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(duration).await;
}

fn forward_lines<R: tokio::io::AsyncRead + Unpin + Send + 'static>(build: String, stream: R) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!(build = %build, "agent: {line}");
        }
    });
}

fn describe(status: Option<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        None => "the build agent could not be waited for".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("the build agent exited with code {code}"),
            (None, Some(signal)) => {
                let name = Signal::try_from(signal)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown");
                format!("the build agent was killed by signal {signal} ({name})")
            }
            _ => "the build agent ended".into(),
        },
    }
}

fn sha2_of(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

impl Executor for LocalExecutor {
    fn name(&self) -> &'static str {
        "local"
    }

    fn runs_images(&self) -> bool {
        false
    }

    fn launch<'a>(&'a self, build: &'a Build) -> BoxFuture<'a, Result<(), LaunchError>> {
        Box::pin(self.launch_build(build))
    }

    fn watch<'a>(&'a self, name: &'a str, watch: Watch) -> BoxFuture<'a, Ending> {
        Box::pin(self.watch_build(name, watch))
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let running = self.lock().remove(name);
            if let Some(running) = running {
                // Stops a process still running; one that ended is already tidied up.
                running.stop.cancel();
            }
        })
    }
}
