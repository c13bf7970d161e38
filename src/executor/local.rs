//! The local executor: `kiln agent` as a child process per job, in its own work directory,
//! with a scrubbed environment; the directory is removed afterwards.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use super::{Executor, ExecutorError, Launch, RunReport};
use crate::agent::{AgentResult, PGID_FILE, RESULT_FILE};
use crate::config::LocalConfig;

/// How long the agent gets to report after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(30);
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

/// Runs each build as a child process on this machine.
#[derive(Debug, Clone)]
pub struct LocalExecutor {
    agent: PathBuf,
    work_root: PathBuf,
    keep_work_dirs: bool,
    pass_env: Vec<String>,
}

impl LocalExecutor {
    /// An executor running `agent` (normally this very binary) per job.
    pub fn new(agent: PathBuf, config: &LocalConfig) -> Self {
        Self {
            agent,
            work_root: config.work_dir.clone().unwrap_or_else(std::env::temp_dir),
            keep_work_dirs: config.keep_work_dirs,
            pass_env: config.pass_env.clone(),
        }
    }

    async fn run_build(
        &self,
        launch: Launch,
        cancel: CancellationToken,
    ) -> Result<RunReport, ExecutorError> {
        let job = launch.key.clone();
        let prepare = |message: String| ExecutorError::Prepare {
            job: job.clone(),
            message,
        };
        std::fs::create_dir_all(&self.work_root)
            .map_err(|e| prepare(format!("{}: {e}", self.work_root.display())))?;
        let work = tempfile::Builder::new()
            .prefix(&format!("{}-", launch.key.resource_name()))
            .tempdir_in(&self.work_root)
            .map_err(|e| prepare(format!("{}: {e}", self.work_root.display())))?;
        let job_file = work.path().join("job.json");
        write_private(&job_file, &launch.job_file)
            .map_err(|e| prepare(format!("{}: {e}", job_file.display())))?;

        let mut command = tokio::process::Command::new(&self.agent);
        command
            .arg("agent")
            .arg("--job")
            .arg(&job_file)
            .current_dir(work.path())
            .env_clear()
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
        let mut child = command.spawn().map_err(|e| ExecutorError::Start {
            job: job.clone(),
            message: format!("{}: {e}", self.agent.display()),
        })?;
        let pid = child.id().map(|id| Pid::from_raw(id as i32));
        tracing::info!(job = %job, pid = ?pid, dir = %work.path().display(), "build started");
        // The agent's own log lines join the coordinator's log, tagged with the job.
        if let Some(out) = child.stdout.take() {
            forward_lines(job.clone(), out);
        }
        if let Some(err) = child.stderr.take() {
            forward_lines(job.clone(), err);
        }
        // Past the job timeout plus a margin the agent should long have ended: kill it.
        let hard_deadline = launch.timeout + Duration::from_secs(300);
        let status = tokio::select! {
            status = child.wait() => status.ok(),
            () = tokio::time::sleep(hard_deadline) => {
                tracing::warn!(job = %job, "build ran past its timeout; killing the agent");
                None
            }
            () = cancel.cancelled() => {
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
        if let Some(pgid) = std::fs::read_to_string(work.path().join(PGID_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        let result: Option<AgentResult> = std::fs::read(work.path().join(RESULT_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let detail = format!("{} before it reported the job", describe(status));
        tracing::info!(job = %job, %detail, reported = result.as_ref().is_some_and(|r| r.reported), "build ended");
        if self.keep_work_dirs {
            let kept = work.keep();
            tracing::info!(job = %job, dir = %kept.display(), "work directory kept");
        }
        Ok(RunReport {
            result,
            detail,
            reason: crate::job::FailureReason::RunnerSystemFailure,
            detached: false,
        })
    }
}

fn forward_lines<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    job: crate::job::JobKey,
    stream: R,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!(job = %job, "agent: {line}");
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

fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
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
    fn run(
        &self,
        launch: Launch,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<RunReport, ExecutorError>> {
        Box::pin(self.run_build(launch, cancel))
    }

    fn name(&self) -> &'static str {
        "local"
    }

    fn runs_images(&self) -> bool {
        false
    }
}
