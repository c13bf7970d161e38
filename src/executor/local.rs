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
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::sandbox::{self, BuildUser};
use super::{Executor, LaunchError, Watch};
use crate::build::{
    AGENT_RESULT_FILE, AgentReport, Build, Download, Ending, EnvValue, FailureReason, ForeignAgent,
    JOB_FILE, Workload,
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
    /// The user builds run as when kiln runs as root (a name, a uid or `uid:gid`; default
    /// `nobody`), so a build cannot read kiln's configuration, environment or memory, nor
    /// signal it. `root` runs builds as kiln's own user. Without root, builds run as kiln's
    /// user whatever this says.
    pub user: Option<String>,
    /// Run builds of work from outside contributors (GitHub workflows, public GitLab
    /// projects) even when builds share kiln's user, which lets them read kiln's secrets.
    pub allow_untrusted: bool,
}

/// The user the local executor's builds run as, when kiln's own user is `euid` and the config
/// says `configured`: `Ok(None)` for kiln's own user.
fn build_user(configured: Option<&str>, euid: u32) -> Result<Option<BuildUser>, String> {
    if euid != 0 {
        return match configured.map(BuildUser::resolve).transpose()? {
            Some(user) if user.uid != euid => Err(format!(
                "local.user is uid {}, but kiln runs as uid {euid}: only a kiln running as root can run builds as another user",
                user.uid
            )),
            _ => Ok(None),
        };
    }
    let user = match configured {
        Some(spec) => BuildUser::resolve(spec)?,
        // `nobody` where the machine has it, else its usual numbers.
        None => BuildUser::resolve("nobody").unwrap_or(BuildUser {
            uid: 65_534,
            gid: 65_534,
        }),
    };
    Ok((user.uid != 0).then_some(user))
}

/// Runs each build as a child process on this machine.
pub struct LocalExecutor {
    agent: PathBuf,
    work_root: PathBuf,
    keep_work_dirs: bool,
    pass_env: Vec<String>,
    /// Who builds run as (`None`: kiln's own user), or why that cannot be.
    user: Result<Option<BuildUser>, String>,
    allow_untrusted: bool,
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
    /// The build's program, for messages.
    program: String,
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
            user: build_user(config.user.as_deref(), nix::unistd::geteuid().as_raw()),
            allow_untrusted: config.allow_untrusted,
            http: reqwest::Client::builder()
                .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(15))
                .timeout(Duration::from_secs(300))
                .build()
                .unwrap_or_default(),
            builds: Mutex::new(HashMap::new()),
        }
    }

    /// What builds can reach, for the log at start-up: the user they run as, or a warning
    /// that they share kiln's.
    pub fn describe_isolation(&self) {
        match &self.user {
            Ok(Some(user)) => tracing::info!(
                uid = user.uid,
                gid = user.gid,
                "local builds run as their own unprivileged user: they cannot read kiln's config, environment or memory, nor signal it"
            ),
            Ok(None) => tracing::warn!(
                "local builds run as kiln's own user and can read its config, environment and memory (run kiln as root to give them a user of their own, or use the Kubernetes executor); work from outside contributors is refused unless local.allow_untrusted = true"
            ),
            Err(problem) => tracing::error!(%problem, "local builds cannot start"),
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
        let user = self.user.clone().map_err(LaunchError::Rejected)?;
        if build.untrusted && user.is_none() && !self.allow_untrusted {
            return Err(LaunchError::Rejected(format!(
                "{} is work from outside contributors, and local builds run as kiln's own user, where they could read kiln's secrets; run kiln as root (builds then get a user of their own), use the Kubernetes executor, or set local.allow_untrusted = true",
                build.key
            )));
        }
        std::fs::create_dir_all(&self.work_root)
            .map_err(|e| failed("create", &self.work_root, e))?;
        // 0700: other users of the machine read neither scripts nor results.
        let work = tempfile::Builder::new()
            .prefix(&format!("{}-", build.name))
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
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
        let (program, args, env, kiln_agent, missing_program) = match &build.workload {
            Workload::KilnAgent { .. } => (
                self.agent.clone().into_os_string(),
                vec![
                    "agent".into(),
                    "--job".into(),
                    work.path().join(JOB_FILE).into_os_string(),
                ],
                Vec::new(),
                true,
                None,
            ),
            Workload::Foreign(agent) => {
                let Some(process) = &agent.process else {
                    return Err(LaunchError::Rejected(format!(
                        "the {} agent cannot run as a local process; use executor = \"kubernetes\"",
                        build.key.source.name()
                    )));
                };
                self.download(&process.downloads, work.path()).await?;
                (
                    process.program.clone().into(),
                    process.args.iter().map(Into::into).collect(),
                    foreign_env(agent, build, work.path()),
                    false,
                    Some(process.missing_program.clone()),
                )
            }
        };
        if let Some(user) = user {
            // The build's directory and every file kiln put there are the build user's alone.
            for entry in std::iter::once(work.path().to_path_buf()).chain(
                std::fs::read_dir(work.path())
                    .map_err(|e| failed("read", work.path(), e))?
                    .flatten()
                    .map(|e| e.path()),
            ) {
                user.own(&entry)
                    .map_err(|e| failed("give the build user", &entry, e))?;
            }
        }
        // The sandbox (this very binary) starts the build in a session of its own, as its
        // user; see `executor::sandbox`.
        let mut command = tokio::process::Command::new(&self.agent);
        command.arg("sandbox");
        if let Some(user) = user {
            command.arg("--user").arg(user.arg());
        }
        command.arg("--").arg(&program).args(&args).env_clear();
        for name in PASS_ENV
            .iter()
            .copied()
            .chain(self.pass_env.iter().map(String::as_str))
        {
            if let Ok(value) = std::env::var(name) {
                command.env(name, value);
            }
        }
        if let Some(user) = user {
            let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(user.uid))
                .ok()
                .flatten()
                .map_or_else(|| user.uid.to_string(), |u| u.name);
            command.env("USER", &name).env("LOGNAME", &name);
        }
        command
            .envs(env)
            .current_dir(work.path())
            .env("HOME", work.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        Ok(Spawn {
            command,
            work,
            kiln_agent,
            missing_program,
            program: program.to_string_lossy().into_owned(),
            timeout: build.timeout,
        })
    }

    /// Fetches each file a process needs into its work directory, through a cache shared by
    /// builds (an agent jar is the same for every build).
    ///
    /// The cache is trusted only as far as kiln made it: a directory of kiln's own user that
    /// nobody else can write, holding regular files (never links) kiln wrote, each revalidated
    /// with the server (`If-None-Match`/`If-Modified-Since`) before it is used, so a file
    /// another user planted is never run and a new Jenkins' agent jar replaces the old one.
    async fn download(&self, downloads: &[Download], work: &Path) -> Result<(), LaunchError> {
        let cache = private_dir(&self.work_root.join("kiln-downloads"));
        if let Err(problem) = &cache {
            tracing::warn!(%problem, "not caching downloads");
        }
        for download in downloads {
            if download.file.contains('/') || download.file.starts_with('.') {
                return Err(LaunchError::Rejected(format!(
                    "download `{}` cannot be a file name",
                    download.file
                )));
            }
            let target = work.join(&download.file);
            let cached = cache
                .as_ref()
                .ok()
                .map(|dir| dir.join(hex::encode(sha2_of(download.url.as_bytes()))));
            let bytes = self.fetch(&download.url, cached.as_deref()).await?;
            write_private(&target, &bytes).map_err(|e| {
                LaunchError::Failed(format!("cannot write {}: {e}", target.display()))
            })?;
        }
        Ok(())
    }

    /// The content at `url`: the cached copy at `cached` when the server says it is current,
    /// else a fresh download (stored at `cached` with its validators).
    async fn fetch(&self, url: &str, cached: Option<&Path>) -> Result<Vec<u8>, LaunchError> {
        let shown = crate::net::redact_url(url);
        let failed = |e: reqwest::Error| {
            LaunchError::Failed(format!("cannot download {shown}: {}", e.without_url()))
        };
        let entry = cached.and_then(CachedDownload::read);
        let mut request = self.http.get(url);
        if let Some(entry) = &entry {
            if let Some(etag) = &entry.etag {
                request = request.header(reqwest::header::IF_NONE_MATCH, etag);
            }
            if let Some(modified) = &entry.last_modified {
                request = request.header(reqwest::header::IF_MODIFIED_SINCE, modified);
            }
        }
        let response = request.send().await.map_err(failed)?;
        if response.status() == reqwest::StatusCode::NOT_MODIFIED
            && let Some(entry) = entry
        {
            return Ok(entry.bytes);
        }
        let response = response.error_for_status().map_err(failed)?;
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let etag = header(reqwest::header::ETAG);
        let last_modified = header(reqwest::header::LAST_MODIFIED);
        let bytes = response.bytes().await.map_err(failed)?.to_vec();
        if let Some(path) = cached
            && (etag.is_some() || last_modified.is_some())
        {
            let entry = CachedDownload {
                etag,
                last_modified,
                bytes,
            };
            if let Err(e) = entry.write(path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot cache a download");
            }
            return Ok(entry.bytes);
        }
        Ok(bytes)
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

/// The environment of a foreign agent's process: its plain and secret variables, and where
/// its work directory is.
fn foreign_env(agent: &ForeignAgent, build: &Build, work: &Path) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = agent
        .env
        .iter()
        .map(|var| {
            let value = match &var.value {
                EnvValue::Plain(value) => value.clone(),
                EnvValue::Secret(key) => build
                    .secrets
                    .get(key)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default(),
            };
            (var.name.clone(), value)
        })
        .collect();
    env.push(("KILN_WORK_DIR".into(), work.display().to_string()));
    env
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
        program,
        timeout,
    } = spawn;
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let sandbox = command
                .as_std()
                .get_program()
                .to_string_lossy()
                .into_owned();
            let ending = Ending::failed(
                FailureReason::RunnerSystemFailure,
                format!("cannot start `{sandbox}` (the sandbox of `{program}`): {e}"),
            );
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
    // Whatever happened to the agent, nothing of its build outlives it: every process left
    // in the build's session (whose id kiln knows from the spawn, not from the build).
    if let Some(pid) = pid {
        sandbox::kill_session(pid);
    }
    if let Some(failure) = sandbox::Failure::left_in(work.path()) {
        let ending = match (failure, missing_program) {
            (sandbox::Failure::NotFound(_), Some(hint)) => Ending::failed(
                FailureReason::RunnerConfigurationError,
                format!("`{program}` is not on the PATH of kiln's local executor: {hint}"),
            ),
            (sandbox::Failure::NotFound(_), None) => Ending::failed(
                FailureReason::RunnerConfigurationError,
                format!("`{program}` is not on the PATH of kiln's local executor"),
            ),
            (sandbox::Failure::Other(why), _) => Ending::failed(
                FailureReason::RunnerSystemFailure,
                format!("the build could not be started: {why}"),
            ),
        };
        tracing::warn!(build = name, detail = %ending.detail, "build could not start");
        return ending;
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

/// A download kept between builds, with what the server said identifies its version.
struct CachedDownload {
    etag: Option<String>,
    last_modified: Option<String>,
    bytes: Vec<u8>,
}

impl CachedDownload {
    /// The entry at `path` (`path` and `path.meta`), if both are regular files of kiln's own
    /// user that nobody else can write.
    fn read(path: &Path) -> Option<Self> {
        let meta_path = path.with_extension("meta");
        let bytes = read_own_file(path)?;
        let meta: serde_json::Value = serde_json::from_slice(&read_own_file(&meta_path)?).ok()?;
        let field = |key: &str| meta.get(key).and_then(|v| v.as_str()).map(str::to_owned);
        Some(Self {
            etag: field("etag"),
            last_modified: field("last_modified"),
            bytes,
        })
    }

    /// Stores the entry at `path`, replacing any earlier one atomically.
    fn write(&self, path: &Path) -> std::io::Result<()> {
        let meta = serde_json::json!({"etag": self.etag, "last_modified": self.last_modified});
        for (target, bytes) in [
            (path.to_path_buf(), self.bytes.clone()),
            (path.with_extension("meta"), meta.to_string().into_bytes()),
        ] {
            let dir = target.parent().unwrap_or(Path::new("."));
            let mut file = tempfile::NamedTempFile::new_in(dir)?;
            std::io::Write::write_all(&mut file, &bytes)?;
            file.persist(&target).map_err(|e| e.error)?;
        }
        Ok(())
    }
}

/// `dir`, created 0700 if missing; an error when it is a link, not kiln's own, or open to
/// others' writes or reads.
fn private_dir(dir: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} belongs to uid {} with mode {:o}; kiln uses only a directory of its own that nobody else can open",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    Ok(dir.to_path_buf())
}

/// The content of `path` if it is a regular file (not a link) of kiln's own user that nobody
/// else can write.
fn read_own_file(path: &Path) -> Option<Vec<u8>> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    let own =
        meta.is_file() && meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o022 == 0;
    if !own {
        tracing::warn!(path = %path.display(), "ignoring a cached download kiln did not write");
        return None;
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut &file, &mut bytes).ok()?;
    Some(bytes)
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::http::{HeaderMap, StatusCode};

    use super::*;

    /// A server of one file with an ETag, counting full downloads.
    async fn jar_server(body: &'static str) -> (String, Arc<AtomicUsize>) {
        let full = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&full);
        let app = axum::Router::new().route(
            "/agent.jar",
            axum::routing::get(move |headers: HeaderMap| {
                let counted = Arc::clone(&counted);
                async move {
                    if headers.get("if-none-match").is_some_and(|v| v == "\"v1\"") {
                        return (StatusCode::NOT_MODIFIED, [("etag", "\"v1\"")], "");
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::OK, [("etag", "\"v1\"")], body)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/agent.jar"), full)
    }

    fn executor(root: &Path) -> LocalExecutor {
        LocalExecutor::new(
            PathBuf::from("/bin/true"),
            &LocalConfig {
                work_dir: Some(root.to_path_buf()),
                ..LocalConfig::default()
            },
        )
    }

    /// A file planted in the download cache by someone else is never what a build runs; the
    /// cache is revalidated, so a current copy costs a 304, not a download.
    #[tokio::test]
    async fn a_planted_download_is_never_used_and_the_cache_is_revalidated() {
        use std::os::unix::fs::PermissionsExt;
        let (url, downloads) = jar_server("the real agent").await;
        let root = tempfile::tempdir().unwrap();
        let cache = root.path().join("kiln-downloads");
        std::fs::create_dir(&cache).unwrap();
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
        let planted = cache.join(hex::encode(sha2_of(url.as_bytes())));
        std::fs::write(&planted, "a planted agent").unwrap();
        std::fs::write(planted.with_extension("meta"), r#"{"etag":"\"v1\""}"#).unwrap();
        // Writable by others: not a file kiln wrote.
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).unwrap();
        let local = executor(root.path());
        let wanted = [Download {
            url: url.clone(),
            file: "agent.jar".into(),
        }];
        for round in 1..=3 {
            let work = tempfile::tempdir().unwrap();
            local.download(&wanted, work.path()).await.unwrap();
            let got = std::fs::read_to_string(work.path().join("agent.jar")).unwrap();
            assert_eq!(got, "the real agent", "round {round}");
        }
        // One full download; the other two rounds were answered 304 from kiln's own copy.
        assert_eq!(downloads.load(Ordering::SeqCst), 1);

        // A cache directory others can write is not used at all.
        let open_root = tempfile::tempdir().unwrap();
        let open_cache = open_root.path().join("kiln-downloads");
        std::fs::create_dir(&open_cache).unwrap();
        std::fs::set_permissions(&open_cache, std::fs::Permissions::from_mode(0o777)).unwrap();
        let planted = open_cache.join(hex::encode(sha2_of(url.as_bytes())));
        std::fs::write(&planted, "a planted agent").unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(planted.with_extension("meta"), r#"{"etag":"\"v1\""}"#).unwrap();
        let work = tempfile::tempdir().unwrap();
        executor(open_root.path())
            .download(&wanted, work.path())
            .await
            .unwrap();
        let got = std::fs::read_to_string(work.path().join("agent.jar")).unwrap();
        assert_eq!(got, "the real agent");
    }

    fn agent_build() -> Build {
        use crate::build::{About, BuildKey, SourceKind};
        let key = BuildKey {
            source: SourceKind::GitLab,
            runner: "r".into(),
            id: 1,
        };
        Build {
            name: key.resource_name(),
            key,
            workload: Workload::KilnAgent {
                image: None,
                services: Vec::new(),
            },
            secrets: std::collections::BTreeMap::from([(JOB_FILE.to_owned(), b"{}".to_vec())]),
            class: None,
            requests: Vec::new(),
            timeout: None,
            labels: std::collections::BTreeMap::new(),
            annotations: std::collections::BTreeMap::new(),
            about: About::default(),
            untrusted: false,
            registry_auths: Vec::new(),
        }
    }

    #[test]
    fn builds_get_a_user_of_their_own_only_under_root() {
        let nobody = build_user(None, 0).unwrap().unwrap();
        assert_ne!(nobody.uid, 0);
        assert_eq!(build_user(Some("root"), 0).unwrap(), None);
        assert_eq!(
            build_user(Some("4321:99"), 0).unwrap(),
            Some(BuildUser { uid: 4321, gid: 99 })
        );
        assert_eq!(build_user(None, 1000).unwrap(), None);
        assert_eq!(build_user(Some("1000"), 1000).unwrap(), None);
        let err = build_user(Some("1234"), 1000).unwrap_err();
        assert!(err.contains("only a kiln running as root"), "{err}");
    }

    /// Work from outside contributors is refused where builds share kiln's user, unless the
    /// config says so.
    #[tokio::test]
    async fn untrusted_work_is_refused_on_kiln_own_user_unless_allowed() {
        let root = tempfile::tempdir().unwrap();
        let own_user = nix::unistd::geteuid().as_raw().to_string();
        let config = |allow_untrusted| LocalConfig {
            work_dir: Some(root.path().to_path_buf()),
            user: Some(own_user.clone()),
            allow_untrusted,
            ..LocalConfig::default()
        };
        let mut build = agent_build();
        build.untrusted = true;
        let refused = LocalExecutor::new(PathBuf::from("/bin/true"), &config(false))
            .prepare(&build)
            .await
            .err()
            .expect("refused");
        let LaunchError::Rejected(why) = refused else {
            panic!("{refused:?}");
        };
        assert!(why.contains("local.allow_untrusted"), "{why}");
        LocalExecutor::new(PathBuf::from("/bin/true"), &config(true))
            .prepare(&build)
            .await
            .expect("allowed");
    }

    /// Work directories are private to kiln's user.
    #[tokio::test]
    async fn work_directories_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let spawn = executor(root.path()).prepare(&agent_build()).await.unwrap();
        let mode = std::fs::metadata(spawn.work.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
