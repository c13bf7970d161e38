//! An in-process GitLab serving the runner and job API (`/api/v4/`) for tests to drive and inspect.
//!
//! It follows the runner protocol facts (not kiln's client): long polling as Workhorse does it,
//! `Content-Range` trace patches, two-phase finishing with checksums, artifact uploads and
//! downloads through object-storage redirects. Every deviation of the client from those facts
//! that the server can see is answered as GitLab would and also listed in [`GitLabServer::violations`].

// Refusals are whole HTTP responses, built at most once per request; boxing them buys nothing.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, put};
use axum::{Json, Router};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::{Map, Value, json};
use tokio::sync::{oneshot, watch};

/// GitLab rejects bigger trace patches.
const MAX_PATCH_BYTES: usize = 1024 * 1024;
/// How long Workhorse holds an idle long poll.
const DEFAULT_LONG_POLL: Duration = Duration::from_secs(50);
/// Seconds GitLab tells a runner to wait between trace patches.
const DEFAULT_TRACE_INTERVAL: u64 = 3;

/// The failure reasons a runner may send; [`job_json`] lists all of them in `features.failure_reasons`.
pub(crate) const RUNNER_FAILURE_REASONS: [&str; 13] = [
    "script_failure",
    "runner_system_failure",
    "job_execution_timeout",
    "image_pull_failure",
    "unknown_failure",
    "runner_configuration_error",
    "runner_unsupported",
    "stale_schedule",
    "archived_failure",
    "unmet_prerequisites",
    "scheduler_failure",
    "data_integrity_failure",
    "runner_external_dependency_failure",
];

/// Token prefixes GitLab asks runners to mask in traces.
const TOKEN_MASK_PREFIXES: [&str; 11] = [
    "glpat-", "gloas-", "gldt-", "glrt-", "glcbt-", "glptt-", "glft-", "glimt-", "glagent-",
    "glsoat-", "glffct-",
];

const SAMPLE_SHA: &str = "1f0c5e6a8a3b4c2d9e7f60718293a4b5c6d7e8f9";

/// One HTTP request as it reached the server.
#[derive(Debug, Clone)]
pub(crate) struct RequestRecord {
    pub(crate) at: Instant,
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: Option<String>,
    pub(crate) has_request_id: bool,
    pub(crate) has_job_token: bool,
    /// `None` while being answered (a held long poll) or if the client gave up waiting.
    pub(crate) status: Option<u16>,
}

/// One `POST jobs/request`.
#[derive(Debug, Clone)]
pub(crate) struct PollRecord {
    pub(crate) at: Instant,
    pub(crate) token: Option<String>,
    pub(crate) system_id: Option<String>,
    /// `None` when absent or empty.
    pub(crate) last_update: Option<String>,
    /// `info.features` as declared.
    pub(crate) features: Map<String, Value>,
    pub(crate) status: Option<u16>,
    /// How long the server held the request before answering.
    pub(crate) answered_after: Option<Duration>,
}

impl PollRecord {
    /// Whether the runner declared `name` as `true`.
    pub(crate) fn declares(&self, name: &str) -> bool {
        self.features.get(name) == Some(&Value::Bool(true))
    }
}

/// The parameters of one `POST runners` or `POST user/runners`, whatever the answer was.
#[derive(Debug, Clone)]
pub(crate) struct RegistrationRecord {
    /// `runners` or `user/runners`.
    pub(crate) path: String,
    pub(crate) form_encoded: bool,
    pub(crate) params: Map<String, Value>,
    pub(crate) status: u16,
}

impl RegistrationRecord {
    /// A parameter as text, so `true` compares equal whether it came as JSON or as a form field.
    pub(crate) fn param(&self, key: &str) -> Option<String> {
        text_param(&self.params, key)
    }
}

/// A runner the server knows, by its `glrt-` (or test-chosen) token.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunnerRecord {
    pub(crate) id: u64,
    pub(crate) token: String,
    pub(crate) description: Option<String>,
    /// `system_id`s seen on `runners/verify` and `jobs/request`, first seen first.
    pub(crate) system_ids: Vec<String>,
    /// `system_id`s removed with `DELETE runners/managers`.
    pub(crate) deleted_managers: Vec<String>,
    pub(crate) revoked: bool,
    /// Removed with `DELETE runners`.
    pub(crate) removed: bool,
}

/// One `PATCH jobs/:id/trace`, accepted (202) or not (416).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PatchRecord {
    pub(crate) at: Instant,
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) len: usize,
    pub(crate) status: u16,
}

/// One accepted artifact upload.
#[derive(Debug, Clone)]
pub(crate) struct ArtifactUpload {
    pub(crate) filename: Option<String>,
    /// The query string (`artifact_format`, `artifact_type`, `expire_in`, …).
    pub(crate) query: BTreeMap<String, String>,
    /// Text fields of the multipart body other than `file`.
    pub(crate) fields: BTreeMap<String, String>,
    pub(crate) bytes: Vec<u8>,
    /// Sent to the `Location` of an injected 307.
    pub(crate) via_redirect: bool,
}

/// One download from the object-storage path an artifact download redirects to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StorageRequest {
    pub(crate) job_id: u64,
    /// The client leaked its `JOB-TOKEN` to object storage.
    pub(crate) had_job_token: bool,
}

/// What the server knows about a job.
#[derive(Debug, Clone, Default)]
pub(crate) struct JobRecord {
    pub(crate) id: u64,
    pub(crate) token: String,
    pub(crate) name: String,
    /// `pending`, `running`, `canceling`, `canceled`, `success` or `failed`.
    pub(crate) state: String,
    /// The runner token that took the job.
    pub(crate) runner_token: Option<String>,
    pub(crate) failure_reason: Option<String>,
    pub(crate) exit_code: Option<i64>,
    /// The received trace, lossily decoded.
    pub(crate) trace: String,
    pub(crate) trace_bytes: Vec<u8>,
    pub(crate) patches: Vec<PatchRecord>,
    /// Times of `PUT jobs/:id {state: running}`.
    pub(crate) keepalives: Vec<Instant>,
    /// Every `PUT jobs/:id` body with a final state, in order, including refused ones.
    pub(crate) final_updates: Vec<Value>,
    pub(crate) artifacts: Vec<ArtifactUpload>,
    pub(crate) handed_out_at: Option<Instant>,
    pub(crate) finished_at: Option<Instant>,
    /// The JSON handed to the runner.
    pub(crate) payload: Value,
}

#[derive(Default)]
struct JobEntry {
    rec: JobRecord,
    trace: Vec<u8>,
    /// The `archive` artifact a dependent job downloads.
    archive: Option<Vec<u8>>,
    /// The "presigned" part of this job's object-storage URL.
    storage_key: String,
    trace_416_once: bool,
    update_202_left: usize,
    update_412_once: bool,
    /// After a 412 the next patch at offset 0 replaces the trace.
    trace_reset: bool,
    upload_injections: VecDeque<u16>,
}

impl JobEntry {
    fn new(id: u64, token: String, state: &str, payload: Value) -> Self {
        let name = payload
            .pointer("/job_info/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let state = state.to_owned();
        let rec = JobRecord {
            id,
            token,
            name,
            state,
            payload,
            ..JobRecord::default()
        };
        Self {
            rec,
            storage_key: random_alnum(24),
            ..Self::default()
        }
    }

    fn snapshot(&self) -> JobRecord {
        let mut rec = self.rec.clone();
        rec.trace = String::from_utf8_lossy(&self.trace).into_owned();
        rec.trace_bytes = self.trace.clone();
        rec
    }

    /// Handed out and not finished: the runner may still patch and update it.
    fn is_active(&self) -> bool {
        matches!(self.rec.state.as_str(), "running" | "canceling")
    }

    fn allows_failure_reason(&self, reason: &str) -> bool {
        match self
            .rec
            .payload
            .pointer("/features/failure_reasons")
            .and_then(Value::as_array)
        {
            Some(listed) => listed.iter().any(|r| r.as_str() == Some(reason)),
            None => RUNNER_FAILURE_REASONS.contains(&reason),
        }
    }

    /// Compares `output{checksum, bytesize}` of a final update with the trace received.
    fn check_output(&self, update: &Value) -> Result<(), String> {
        let Some(output) = update.get("output") else {
            return Ok(());
        };
        let id = self.rec.id;
        if let Some(checksum) = output.get("checksum") {
            let expected = format!("crc32:{:08x}", crc32fast::hash(&self.trace));
            if checksum.as_str() != Some(expected.as_str()) {
                return Err(format!(
                    "job {id}: final update checksum {checksum} differs from the received trace's {expected}"
                ));
            }
        }
        if let Some(bytesize) = output.get("bytesize")
            && bytesize.as_u64() != Some(self.trace.len() as u64)
        {
            return Err(format!(
                "job {id}: final update bytesize {bytesize} differs from the {} bytes received",
                self.trace.len()
            ));
        }
        Ok(())
    }
}

struct RequestInjection {
    status: StatusCode,
    remaining: usize,
    retry_after: Option<u64>,
}

#[derive(Default)]
struct ServerState {
    base_url: String,
    runners: Vec<RunnerRecord>,
    next_runner_id: u64,
    registration_token: Option<String>,
    registration_disabled: bool,
    pat: Option<String>,
    jobs: BTreeMap<u64, JobEntry>,
    /// Pending job ids, oldest first.
    queue: VecDeque<u64>,
    next_job_id: u64,
    long_poll_timeout: Duration,
    /// Added before GitLab answers any call about one job (`jobs/:id…`, not `jobs/request`).
    job_latency: Duration,
    trace_interval: u64,
    request_injection: Option<RequestInjection>,
    artifact_redirect: bool,
    /// The next this many artifact downloads answer 502 (GitLab or its storage failing).
    failing_artifact_downloads: usize,
    max_running: usize,
    requests: Vec<RequestRecord>,
    polls: Vec<PollRecord>,
    registrations: Vec<RegistrationRecord>,
    violations: Vec<String>,
    storage_requests: Vec<StorageRequest>,
}

impl ServerState {
    fn new(base_url: String) -> Self {
        Self {
            base_url,
            next_runner_id: 1,
            next_job_id: 1000,
            long_poll_timeout: DEFAULT_LONG_POLL,
            trace_interval: DEFAULT_TRACE_INTERVAL,
            ..Self::default()
        }
    }

    fn active_runner(&mut self, token: &str) -> Option<&mut RunnerRecord> {
        self.runners
            .iter_mut()
            .find(|r| r.token == token && !r.revoked && !r.removed)
    }

    fn add_runner(&mut self, token: String, description: Option<String>) -> RunnerRecord {
        let id = self.next_runner_id;
        let runner = RunnerRecord {
            id,
            token,
            description,
            ..RunnerRecord::default()
        };
        self.next_runner_id += 1;
        self.runners.push(runner.clone());
        runner
    }

    fn running_count(&self) -> usize {
        self.jobs.values().filter(|j| j.is_active()).count()
    }

    fn next_free_job_id(&mut self) -> u64 {
        while self.jobs.contains_key(&self.next_job_id) {
            self.next_job_id += 1;
        }
        let id = self.next_job_id;
        self.next_job_id += 1;
        id
    }

    fn bad_request(&mut self, reason: String) -> Response {
        let answer = message(
            StatusCode::BAD_REQUEST,
            &format!("400 Bad request - {reason}"),
        );
        self.violations.push(reason);
        answer
    }
}

struct Shared {
    state: Mutex<ServerState>,
    /// Bumped whenever the queue changes; held long polls wait on it.
    queue_version: watch::Sender<u64>,
    /// Makes `X-GitLab-Last-Update` opaque and distinct between servers.
    seed: String,
    /// The projects' repositories, served over smart HTTP with LFS.
    git: super::git_http::GitHosting,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.state.lock().unwrap()
    }

    fn last_update(&self) -> String {
        format!("{}{:06}", self.seed, *self.queue_version.borrow())
    }

    fn queue_changed(&self) {
        self.queue_version.send_modify(|v| *v += 1);
    }

    /// Hands the oldest pending job to `runner_token`.
    fn take_job(&self, runner_token: &str) -> Option<Value> {
        let payload = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let id = st.queue.pop_front()?;
            let job = st.jobs.get_mut(&id)?;
            job.rec.state = "running".to_owned();
            job.rec.runner_token = Some(runner_token.to_owned());
            job.rec.handed_out_at = Some(Instant::now());
            let payload = job.rec.payload.clone();
            st.max_running = st.max_running.max(st.running_count());
            payload
        };
        self.queue_changed();
        Some(payload)
    }
}

/// A GitLab instance on `127.0.0.1`, serving until dropped.
pub(crate) struct GitLabServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

/// Dropping stops accepting and closes idle keep-alive connections, so a client sees GitLab go
/// away instead of talking on through its pooled connections; requests in flight are answered.
impl Drop for GitLabServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

impl GitLabServer {
    /// Binds a free port and serves on the current tokio runtime.
    pub(crate) async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (queue_version, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(ServerState::new(format!("http://{addr}/"))),
            queue_version,
            seed: random_alnum(10),
            git: super::git_http::GitHosting::new(),
        });
        let app = router(shared.clone());
        let (shutdown, stopped) = oneshot::channel();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            shared,
            addr,
            shutdown: Some(shutdown),
        }
    }

    /// Binds a free port and serves over TLS with a certificate for `localhost` and
    /// `127.0.0.1` issued by a CA made now (a GitLab behind a private CA); returns the CA's
    /// certificate (PEM), which no system store trusts.
    pub(crate) async fn start_tls() -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (acceptor, ca_pem) = test_ca_acceptor();
        let (queue_version, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(ServerState::new(format!("https://{addr}/"))),
            queue_version,
            seed: random_alnum(10),
            git: super::git_http::GitHosting::new(),
        });
        let app = router(shared.clone());
        let (shutdown, mut stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let graceful = hyper_util::server::graceful::GracefulShutdown::new();
            loop {
                let (tcp, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                    _ = &mut stopped => break,
                };
                let acceptor = acceptor.clone();
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    // A client that does not trust the CA fails the handshake: nothing to serve.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
                    let _ = watcher.watch(connection).await;
                });
            }
            graceful.shutdown().await;
        });
        (
            Self {
                shared,
                addr,
                shutdown: Some(shutdown),
            },
            ca_pem,
        )
    }

    /// The instance URL with a trailing slash, e.g. `http://127.0.0.1:PORT/`.
    pub(crate) fn url(&self) -> String {
        self.lock().base_url.clone()
    }

    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.shared.lock()
    }

    /// Makes `token` a valid runner token (as if created in the UI); returns the runner id.
    pub(crate) fn add_runner_token(&self, token: &str) -> u64 {
        self.lock().add_runner(token.to_owned(), None).id
    }

    /// The legacy registration token `POST runners` accepts.
    pub(crate) fn set_registration_token(&self, token: &str) {
        self.lock().registration_token = Some(token.to_owned());
    }

    /// `POST runners` with the right registration token answers 410 from now on.
    pub(crate) fn disable_registration(&self) {
        self.lock().registration_disabled = true;
    }

    /// The personal access token `GET user` and `POST user/runners` accept.
    pub(crate) fn set_pat(&self, pat: &str) {
        self.lock().pat = Some(pat.to_owned());
    }

    /// Every runner call with `token` answers 403 from now on.
    pub(crate) fn revoke(&self, token: &str) {
        for runner in self.lock().runners.iter_mut().filter(|r| r.token == token) {
            runner.revoked = true;
        }
    }

    pub(crate) fn runner(&self, token: &str) -> Option<RunnerRecord> {
        self.lock()
            .runners
            .iter()
            .find(|r| r.token == token)
            .cloned()
    }

    pub(crate) fn runners(&self) -> Vec<RunnerRecord> {
        self.lock().runners.clone()
    }

    pub(crate) fn registrations(&self) -> Vec<RegistrationRecord> {
        self.lock().registrations.clone()
    }

    /// Queues a job and returns its id.
    ///
    /// Fills `id` and `token` when absent, and empty values of `CI_JOB_ID`, `CI_JOB_TOKEN`,
    /// `CI_JOB_URL`, `CI_SERVER_URL` and `CI_API_V4_URL` in `variables`. Panics if the job is
    /// not an object or its `id` is taken.
    pub(crate) fn enqueue(&self, mut job: Value) -> u64 {
        assert!(job.is_object(), "a job payload is a JSON object");
        let id = {
            let mut st = self.lock();
            let id = match job.get("id").and_then(Value::as_u64) {
                Some(id) => {
                    assert!(!st.jobs.contains_key(&id), "job {id} exists already");
                    id
                }
                None => st.next_free_job_id(),
            };
            let token = match job.get("token").and_then(Value::as_str) {
                Some(token) => token.to_owned(),
                None => job_token(),
            };
            job["id"] = json!(id);
            job["token"] = json!(token);
            fill_predefined_variables(&mut job, &st.base_url, id, &token);
            fill_hosted_repo_url(&mut job, &self.shared.git, &st.base_url, &token);
            st.jobs.insert(id, JobEntry::new(id, token, "pending", job));
            st.queue.push_back(id);
            id
        };
        self.shared.queue_changed();
        id
    }

    /// Creates project `path` with one commit holding `files` and `submodules` (`(path, URL as
    /// written in .gitmodules, commit)`), served at `<url>/<path>.git`; returns the commit. A job
    /// whose `project_full_path` is `path` and whose `repo_url` is empty gets the clone URL.
    pub(crate) fn create_project(
        &self,
        path: &str,
        files: &[super::git_http::ProjectFile<'_>],
        submodules: &[(&str, &str, &str)],
    ) -> String {
        self.shared.git.create_project(path, files, submodules)
    }

    /// Makes the next `n` fetches from any project fail with HTTP 500.
    pub(crate) fn fail_git_fetches(&self, n: usize) {
        self.shared.git.fail_fetches(n);
    }

    /// Panics if no job has this id.
    pub(crate) fn job(&self, id: u64) -> JobRecord {
        match self.lock().jobs.get(&id) {
            Some(job) => job.snapshot(),
            None => panic!("no job {id} on the test GitLab"),
        }
    }

    /// Polls until the job is in one of `states`; panics with its trace after `timeout`.
    pub(crate) async fn wait_for_state(
        &self,
        id: u64,
        states: &[&str],
        timeout: Duration,
    ) -> JobRecord {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.job(id);
            if states.contains(&job.state.as_str()) {
                return job;
            }
            if Instant::now() >= deadline {
                panic!(
                    "job {id} is still `{}` after {timeout:?}, expected one of {states:?}; trace:\n{}",
                    job.state, job.trace
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until the job's trace contains `text`; panics with its trace after `timeout`.
    pub(crate) async fn wait_for_trace(&self, id: u64, text: &str, timeout: Duration) -> JobRecord {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.job(id);
            if job.trace.contains(text) {
                return job;
            }
            if Instant::now() >= deadline {
                panic!(
                    "job {id} (`{}`) has no `{text}` in its trace after {timeout:?}:\n{}",
                    job.state, job.trace
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Cancels like the UI: a pending job is canceled at once; a running one becomes `canceling`
    /// (`graceful`: the runner should run `after_script`) or `canceled`.
    pub(crate) fn cancel(&self, id: u64, graceful: bool) {
        let dequeued = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let Some(job) = st.jobs.get_mut(&id) else {
                panic!("no job {id} on the test GitLab");
            };
            let next = match (job.rec.state.as_str(), graceful) {
                ("pending", _) | ("running", false) | ("canceling", false) => "canceled",
                ("running", true) => "canceling",
                _ => return,
            };
            let was_pending = job.rec.state == "pending";
            job.rec.state = next.to_owned();
            if next == "canceled" {
                job.rec.finished_at = Some(Instant::now());
            }
            st.queue.retain(|queued| *queued != id);
            was_pending
        };
        if dequeued {
            self.shared.queue_changed();
        }
    }

    /// The next trace patch of job `id` is answered 416 whatever its range.
    pub(crate) fn inject_trace_416(&self, id: u64) {
        self.with_job(id, |job| job.trace_416_once = true);
    }

    /// The next `times` final updates of job `id` are answered 202 (trace still being persisted).
    pub(crate) fn inject_update_202(&self, id: u64, times: usize) {
        self.with_job(id, |job| job.update_202_left = times);
    }

    /// The next final update of job `id` is answered 412 (checksum mismatch): the client must resend
    /// the trace from offset 0 and finish again.
    pub(crate) fn inject_update_412_once(&self, id: u64) {
        self.with_job(id, |job| job.update_412_once = true);
    }

    /// The next artifact upload of job `id` is answered `status`: 413 (too large) or 307 (to another
    /// path of this server that accepts it). Calls queue up.
    pub(crate) fn inject_upload_status(&self, id: u64, status: u16) {
        assert!(
            status == 307 || status == 413,
            "upload injections are 307 or 413"
        );
        self.with_job(id, |job| job.upload_injections.push_back(status));
    }

    /// The next `count` `jobs/request` calls are answered `status` (with `Retry-After` if given).
    pub(crate) fn inject_request_status(
        &self,
        status: u16,
        count: usize,
        retry_after: Option<u64>,
    ) {
        let status = StatusCode::from_u16(status).unwrap();
        self.lock().request_injection = Some(RequestInjection {
            status,
            remaining: count,
            retry_after,
        });
    }

    pub(crate) fn set_long_poll_timeout(&self, timeout: Duration) {
        self.lock().long_poll_timeout = timeout;
    }

    /// Makes GitLab take `latency` before it handles any call about one job (`PUT jobs/:id`,
    /// trace patches, artifacts; not `jobs/request`): a slow or loaded GitLab. The call is
    /// recorded when it arrives.
    pub(crate) fn set_job_latency(&self, latency: Duration) {
        self.lock().job_latency = latency;
    }

    /// The `X-GitLab-Trace-Update-Interval` of trace answers.
    pub(crate) fn set_trace_interval(&self, secs: u64) {
        self.lock().trace_interval = secs;
    }

    /// `GET jobs/:id/artifacts` answers 302 to an object-storage path instead of the bytes.
    /// Makes the next `n` artifact downloads answer HTTP 502.
    pub(crate) fn fail_artifact_downloads(&self, n: usize) {
        self.lock().failing_artifact_downloads = n;
    }

    pub(crate) fn set_artifact_redirect(&self, on: bool) {
        self.lock().artifact_redirect = on;
    }

    /// Gives job `id` an `archive` artifact, creating it as a job that succeeded earlier if needed.
    /// Returns its entry for a dependent job's `dependencies`.
    pub(crate) fn store_artifact(&self, id: u64, bytes: Vec<u8>) -> Value {
        let mut st = self.lock();
        let job = st.jobs.entry(id).or_insert_with(|| {
            let name = format!("build-{id}");
            let token = job_token();
            let mut payload = job_json(&name, &[]);
            payload["id"] = json!(id);
            payload["token"] = json!(token);
            let mut job = JobEntry::new(id, token, "success", payload);
            job.rec.finished_at = Some(Instant::now());
            job
        });
        let dependency = json!({
            "id": id,
            "token": job.rec.token,
            "name": job.rec.name,
            "artifacts_file": {"filename": "artifacts.zip", "size": bytes.len()},
        });
        job.archive = Some(bytes);
        dependency
    }

    /// Every HTTP request so far, in arrival order.
    pub(crate) fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }

    /// Every `POST jobs/request` so far, in arrival order.
    pub(crate) fn polls(&self) -> Vec<PollRecord> {
        self.lock().polls.clone()
    }

    /// Protocol violations the server saw (malformed bodies or ranges, oversized patches, checksum
    /// mismatches, unlisted failure reasons, tokens sent to object storage, unknown endpoints).
    pub(crate) fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    pub(crate) fn storage_requests(&self) -> Vec<StorageRequest> {
        self.lock().storage_requests.clone()
    }

    /// Jobs handed out and not finished (`running` or `canceling`).
    pub(crate) fn running_jobs(&self) -> usize {
        self.lock().running_count()
    }

    /// The peak of [`Self::running_jobs`], sampled whenever a job is handed out.
    pub(crate) fn max_running_observed(&self) -> usize {
        self.lock().max_running
    }

    pub(crate) fn queued_jobs(&self) -> usize {
        self.lock().queue.len()
    }

    fn with_job(&self, id: u64, change: impl FnOnce(&mut JobEntry)) {
        match self.lock().jobs.get_mut(&id) {
            Some(job) => change(job),
            None => panic!("no job {id} on the test GitLab"),
        }
    }
}

/// A realistic job payload running `script`, as GitLab sends it; [`GitLabServer::enqueue`] adds
/// `id` and `token`. Carries keys no runner knows, which clients must ignore.
pub(crate) fn job_json(name: &str, script: &[&str]) -> Value {
    let var = |key: &str, value: &str, public: bool, masked: bool| json!({"key": key, "value": value, "public": public, "file": false, "masked": masked, "raw": false});
    json!({
        "allow_git_fetch": true,
        "job_info": {
            "name": name,
            "stage": "test",
            "pipeline_id": 4200,
            "project_id": 42,
            "project_name": "demo",
            "project_full_path": "kiln/demo",
            "time_in_queue_seconds": 1,
        },
        "git_info": {
            "repo_url": "",
            "ref": "main",
            "sha": SAMPLE_SHA,
            "before_sha": "0000000000000000000000000000000000000000",
            "ref_type": "branch",
            "refspecs": ["+refs/heads/main:refs/remotes/origin/main"],
            "depth": 20,
        },
        "runner_info": {"timeout": 3600, "runner_session_url": null},
        "variables": [
            var("CI", "true", true, false),
            var("GITLAB_CI", "true", true, false),
            var("CI_SERVER_URL", "", true, false),
            var("CI_API_V4_URL", "", true, false),
            var("CI_JOB_ID", "", true, false),
            var("CI_JOB_NAME", name, true, false),
            var("CI_JOB_STAGE", "test", true, false),
            var("CI_JOB_URL", "", true, false),
            var("CI_JOB_TOKEN", "", false, true),
            var("CI_PIPELINE_ID", "4200", true, false),
            var("CI_PROJECT_ID", "42", true, false),
            var("CI_PROJECT_NAME", "demo", true, false),
            var("CI_PROJECT_PATH", "kiln/demo", true, false),
            var("CI_COMMIT_SHA", SAMPLE_SHA, true, false),
            var("CI_COMMIT_REF_NAME", "main", true, false),
            var("CI_COMMIT_BRANCH", "main", true, false),
            var("CI_DEFAULT_BRANCH", "main", true, false),
        ],
        "steps": [
            {"name": "script", "script": script, "timeout": 3600, "when": "on_success", "allow_failure": false},
            {"name": "after_script", "script": [], "timeout": 3600, "when": "always", "allow_failure": true},
        ],
        "image": {
            "name": "alpine:3.20", "alias": "", "command": [], "entrypoint": [], "ports": [],
            "variables": [], "pull_policy": ["if-not-present"],
        },
        "services": [],
        "artifacts": [],
        "cache": [],
        "credentials": [],
        "dependencies": [],
        "features": {
            "trace_sections": true,
            "token_mask_prefixes": TOKEN_MASK_PREFIXES,
            "failure_reasons": RUNNER_FAILURE_REASONS,
        },
        "hooks": [],
        "x_future_gitlab_field": {"since": "99.0", "values": [1, 2, 3]},
    })
}

fn fill_predefined_variables(job: &mut Value, base_url: &str, id: u64, token: &str) {
    let project_path = job
        .pointer("/job_info/project_full_path")
        .and_then(Value::as_str)
        .unwrap_or("kiln/demo")
        .to_owned();
    // GitLab's registry login for the job is the job token (`gitlab-ci-token`).
    if let Some(credentials) = job.get_mut("credentials").and_then(Value::as_array_mut) {
        for credential in credentials {
            if credential.get("password").and_then(Value::as_str) == Some("") {
                credential["password"] = json!(token);
            }
        }
    }
    let Some(variables) = job.get_mut("variables").and_then(Value::as_array_mut) else {
        return;
    };
    for variable in variables {
        if variable.get("value").and_then(Value::as_str) != Some("") {
            continue;
        }
        let value = match variable.get("key").and_then(Value::as_str) {
            Some("CI_JOB_ID") => id.to_string(),
            Some("CI_JOB_TOKEN") => token.to_owned(),
            Some("CI_JOB_URL") => format!("{base_url}{project_path}/-/jobs/{id}"),
            Some("CI_SERVER_URL") => base_url.trim_end_matches('/').to_owned(),
            Some("CI_API_V4_URL") => format!("{base_url}api/v4"),
            _ => continue,
        };
        variable["value"] = json!(value);
    }
}

/// A job of a hosted project (see [`GitLabServer::create_project`]) whose `repo_url` is empty
/// gets the URL GitLab sends: the project's clone URL with `gitlab-ci-token:<job token>@`.
fn fill_hosted_repo_url(
    job: &mut Value,
    git: &super::git_http::GitHosting,
    base_url: &str,
    token: &str,
) {
    let Some(project) = job
        .pointer("/job_info/project_full_path")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return;
    };
    if job.pointer("/git_info/repo_url").and_then(Value::as_str) != Some("")
        || !super::git_http::bare_path(git, &project).is_dir()
    {
        return;
    }
    let with_token = base_url.replacen("://", &format!("://gitlab-ci-token:{token}@"), 1);
    job["git_info"]["repo_url"] = json!(format!("{with_token}{project}.git"));
}

type Srv = State<Arc<Shared>>;

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/api/v4/runners",
            post(register_runner).delete(delete_runner),
        )
        .route("/api/v4/runners/verify", post(verify_runner))
        .route("/api/v4/runners/managers", delete(delete_manager))
        .route(
            "/api/v4/runners/reset_authentication_token",
            post(reset_runner_token),
        )
        .route("/api/v4/user", get(current_user))
        .route("/api/v4/user/runners", post(create_user_runner))
        .route("/api/v4/jobs/request", post(request_job))
        .route("/api/v4/jobs/{id}", put(update_job))
        .route("/api/v4/jobs/{id}/trace", patch(patch_trace))
        .route(
            "/api/v4/jobs/{id}/artifacts",
            post(upload_artifacts).get(download_artifacts),
        )
        .route(
            "/redirected-upload/jobs/{id}/artifacts",
            post(upload_artifacts),
        )
        .route("/storage/artifacts/{id}/{key}", get(storage_download))
        .fallback(unknown_endpoint)
        // Artifacts and oversized patches must reach the handlers to be judged there.
        .layer(DefaultBodyLimit::max(1 << 30))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            record_request,
        ))
        .with_state(shared)
}

async fn record_request(State(s): Srv, request: Request, next: Next) -> Response {
    let index = {
        let mut st = s.lock();
        st.requests.push(RequestRecord {
            at: Instant::now(),
            method: request.method().to_string(),
            path: request.uri().path().to_owned(),
            query: request.uri().query().map(str::to_owned),
            has_request_id: request.headers().contains_key("x-request-id"),
            has_job_token: request.headers().contains_key("job-token"),
            status: None,
        });
        (st.requests.len() - 1, st.job_latency)
    };
    let (index, latency) = index;
    let path = request.uri().path();
    if !latency.is_zero() && path.starts_with("/api/v4/jobs/") && path != "/api/v4/jobs/request" {
        tokio::time::sleep(latency).await;
    }
    let mut response = next.run(request).await;
    let status = response.status();
    {
        let mut st = s.lock();
        st.requests[index].status = Some(status.as_u16());
        if status == StatusCode::METHOD_NOT_ALLOWED {
            let what = format!(
                "method {} not allowed on {}",
                st.requests[index].method, st.requests[index].path
            );
            st.violations.push(what);
        }
    }
    if let Ok(id) = HeaderValue::from_str(&random_alnum(26)) {
        response.headers_mut().insert("x-request-id", id);
    }
    response
}

async fn unknown_endpoint(State(s): Srv, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let (method, uri) = (parts.method, parts.uri);
    if uri.path().contains(".git/") {
        let body = axum::body::to_bytes(body, 1 << 30)
            .await
            .unwrap_or_default();
        let base_url = s.lock().base_url.clone();
        // GitLab takes the token of a running job for its project's git and LFS.
        let authorized = |token: &str| {
            s.lock()
                .jobs
                .values()
                .any(|job| job.rec.token == token && job.is_active())
        };
        if let Some(answer) = s
            .git
            .serve(&method, &uri, &parts.headers, body, authorized, &base_url)
            .await
        {
            return answer;
        }
    }
    s.lock()
        .violations
        .push(format!("unknown endpoint {method} {}", uri.path()));
    message(StatusCode::NOT_FOUND, "404 Not Found")
}

/// A handler's answer; the error side short-cuts refusals with `?`.
type Answer = Result<Response, Response>;

/// The parameters of a runner call and the active runner its `token` names.
fn runner_call<'a>(
    st: &'a mut ServerState,
    call: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Map<String, Value>, &'a mut RunnerRecord), Response> {
    let (params, _) =
        parse_params(headers, body).map_err(|e| st.bad_request(format!("{call}: {e}")))?;
    let Some(token) = text_param(&params, "token") else {
        return Err(st.bad_request(format!("{call}: token is missing")));
    };
    let runner = st.active_runner(&token).ok_or_else(forbidden)?;
    Ok((params, runner))
}

fn runner_json(status: StatusCode, runner: &RunnerRecord) -> Response {
    let body = json!({"id": runner.id, "token": runner.token, "token_expires_at": null});
    (status, Json(body)).into_response()
}

async fn verify_runner(State(s): Srv, headers: HeaderMap, body: Bytes) -> Answer {
    let mut st = s.lock();
    let (params, runner) = runner_call(&mut st, "runners/verify", &headers, &body)?;
    if let Some(system_id) = text_param(&params, "system_id")
        && !runner.system_ids.contains(&system_id)
    {
        runner.system_ids.push(system_id);
    }
    Ok(runner_json(StatusCode::OK, runner))
}

async fn delete_runner(State(s): Srv, headers: HeaderMap, body: Bytes) -> Answer {
    let mut st = s.lock();
    let (_, runner) = runner_call(&mut st, "DELETE runners", &headers, &body)?;
    runner.removed = true;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_manager(State(s): Srv, headers: HeaderMap, body: Bytes) -> Answer {
    let mut st = s.lock();
    let (params, runner) = runner_call(&mut st, "DELETE runners/managers", &headers, &body)?;
    let Some(system_id) = text_param(&params, "system_id") else {
        return Err(st.bad_request("DELETE runners/managers: system_id is missing".to_owned()));
    };
    runner.system_ids.retain(|seen| *seen != system_id);
    runner.deleted_managers.push(system_id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn reset_runner_token(State(s): Srv, headers: HeaderMap, body: Bytes) -> Answer {
    let mut st = s.lock();
    let call = "runners/reset_authentication_token";
    let (_, runner) = runner_call(&mut st, call, &headers, &body)?;
    runner.token = runner_token();
    Ok(runner_json(StatusCode::CREATED, runner))
}

/// Records a registration attempt and, when `status` is 201, creates the runner.
fn register(
    st: &mut ServerState,
    path: &str,
    params: Map<String, Value>,
    form: bool,
    status: StatusCode,
) -> Option<RunnerRecord> {
    let description = text_param(&params, "description");
    let status_code = status.as_u16();
    let (path, form_encoded) = (path.to_owned(), form);
    st.registrations.push(RegistrationRecord {
        path,
        form_encoded,
        params,
        status: status_code,
    });
    (status == StatusCode::CREATED).then(|| st.add_runner(runner_token(), description))
}

async fn register_runner(State(s): Srv, headers: HeaderMap, body: Bytes) -> Answer {
    let mut st = s.lock();
    let (params, form) =
        parse_params(&headers, &body).map_err(|e| st.bad_request(format!("runners: {e}")))?;
    let token = text_param(&params, "token");
    let status = match token {
        None => StatusCode::BAD_REQUEST,
        Some(_) if token != st.registration_token => StatusCode::FORBIDDEN,
        Some(_) if st.registration_disabled => StatusCode::GONE,
        Some(_) => StatusCode::CREATED,
    };
    match register(&mut st, "runners", params, form, status) {
        Some(runner) => Ok(runner_json(StatusCode::CREATED, &runner)),
        None if status == StatusCode::GONE => {
            Err(message(status, "410 Gone - runner registration disallowed"))
        }
        None if status == StatusCode::FORBIDDEN => Err(forbidden()),
        None => Err(st.bad_request("runners: token is missing".to_owned())),
    }
}

fn check_pat(st: &ServerState, headers: &HeaderMap) -> Result<(), Response> {
    if st.pat.is_some() && header_str(headers, "private-token") == st.pat.as_deref() {
        Ok(())
    } else {
        Err(message(StatusCode::UNAUTHORIZED, "401 Unauthorized"))
    }
}

async fn current_user(State(s): Srv, headers: HeaderMap) -> Answer {
    let st = s.lock();
    check_pat(&st, &headers)?;
    let web_url = format!("{}kiln-admin", st.base_url);
    let body = json!({"id": 1, "username": "kiln-admin", "name": "Kiln Admin", "state": "active", "web_url": web_url});
    Ok((StatusCode::OK, Json(body)).into_response())
}

async fn create_user_runner(State(s): Srv, headers: HeaderMap, body: Bytes) -> Answer {
    let mut st = s.lock();
    check_pat(&st, &headers)?;
    let (params, form) =
        parse_params(&headers, &body).map_err(|e| st.bad_request(format!("user/runners: {e}")))?;
    let scope_error = match text_param(&params, "runner_type").as_deref() {
        Some("instance_type") => None,
        Some("group_type") if params.contains_key("group_id") => None,
        Some("project_type") if params.contains_key("project_id") => None,
        Some("group_type") => Some("group_id is missing"),
        Some("project_type") => Some("project_id is missing"),
        _ => Some("runner_type does not have a valid value"),
    };
    let status = if scope_error.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::CREATED
    };
    match register(&mut st, "user/runners", params, form, status) {
        Some(runner) => Ok(runner_json(StatusCode::CREATED, &runner)),
        None => Err(st.bad_request(format!("user/runners: {}", scope_error.unwrap_or_default()))),
    }
}

async fn request_job(State(s): Srv, headers: HeaderMap, body: Bytes) -> Answer {
    let arrived = Instant::now();
    let Ok(Value::Object(params)) = serde_json::from_slice::<Value>(&body) else {
        return Err(s
            .lock()
            .bad_request("jobs/request: body is not a JSON object".to_owned()));
    };
    let field = |key: &str| params.get(key).and_then(Value::as_str).map(str::to_owned);
    let token = field("token").or_else(|| header_str(&headers, "runner-token").map(str::to_owned));
    let (system_id, last_update) = (
        field("system_id"),
        field("last_update").filter(|v| !v.is_empty()),
    );
    let features = params.get("info").and_then(|info| info.get("features"));
    let features = features
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();

    let (index, admitted, hold) = {
        let mut st = s.lock();
        st.polls.push(PollRecord {
            at: arrived,
            token: token.clone(),
            system_id: system_id.clone(),
            last_update: last_update.clone(),
            features,
            status: None,
            answered_after: None,
        });
        let index = st.polls.len() - 1;
        let admitted = match st.request_injection.as_mut().filter(|i| i.remaining > 0) {
            Some(injection) => {
                injection.remaining -= 1;
                let mut answer = message(injection.status, "injected by the test");
                if let Some(secs) = injection.retry_after {
                    set_header(&mut answer, "retry-after", secs);
                }
                Err(answer)
            }
            None => match token.as_deref().and_then(|t| st.active_runner(t)) {
                Some(runner) => {
                    if let Some(id) = system_id
                        && !runner.system_ids.contains(&id)
                    {
                        runner.system_ids.push(id);
                    }
                    Ok(runner.token.clone())
                }
                None => Err(forbidden()),
            },
        };
        (index, admitted, st.long_poll_timeout)
    };

    let answer = match admitted {
        Ok(token) => Ok(answer_poll(&s, &token, last_update.as_deref(), hold).await),
        Err(refusal) => Err(refusal),
    };
    let status = answer.as_ref().unwrap_or_else(|refusal| refusal).status();
    let mut st = s.lock();
    st.polls[index].status = Some(status.as_u16());
    st.polls[index].answered_after = Some(arrived.elapsed());
    answer
}

async fn answer_poll(
    s: &Shared,
    token: &str,
    last_update: Option<&str>,
    hold: Duration,
) -> Response {
    // Subscribe before looking so a job queued in between still wakes us.
    let mut changes = s.queue_version.subscribe();
    if let Some(job) = s.take_job(token) {
        return (StatusCode::CREATED, Json(job)).into_response();
    }
    // Like Workhorse: hold only a poller whose view of the queue is current; a stale
    // `last_update` goes straight through and learns the new one.
    if last_update == Some(s.last_update().as_str())
        && tokio::time::timeout(hold, changes.changed()).await.is_ok()
        && let Some(job) = s.take_job(token)
    {
        return (StatusCode::CREATED, Json(job)).into_response();
    }
    let mut answer = StatusCode::NO_CONTENT.into_response();
    set_header(&mut answer, "x-gitlab-last-update", s.last_update());
    answer
}

/// The job `id` if `token` is its token and it is still running; otherwise GitLab's refusal.
fn running_job<'a>(
    st: &'a mut ServerState,
    id: u64,
    token: Option<&str>,
) -> Result<&'a mut JobEntry, Response> {
    let Some(job) = st.jobs.get_mut(&id) else {
        return Err(message(StatusCode::NOT_FOUND, "404 Job Not Found"));
    };
    if token != Some(job.rec.token.as_str()) {
        return Err(forbidden());
    }
    if !job.is_active() {
        return Err(job_status(forbidden(), &job.rec.state));
    }
    Ok(job)
}

async fn update_job(State(s): Srv, Path(id): Path<u64>, headers: HeaderMap, body: Bytes) -> Answer {
    let mut guard = s.lock();
    let st = &mut *guard;
    let update = match serde_json::from_slice::<Value>(&body) {
        Ok(update @ Value::Object(_)) => update,
        _ => return Err(st.bad_request(format!("PUT jobs/{id}: body is not a JSON object"))),
    };
    let token = update
        .get("token")
        .and_then(Value::as_str)
        .or_else(|| header_str(&headers, "job-token"));
    let job = running_job(st, id, token)?;
    match update.get("state").and_then(Value::as_str) {
        Some("running") => {
            job.rec.keepalives.push(Instant::now());
            Ok(job_status(StatusCode::OK.into_response(), &job.rec.state))
        }
        Some(final_state @ ("success" | "failed")) => {
            let final_state = final_state.to_owned();
            let (answer, violation) = finish_job(job, &final_state, update);
            st.violations.extend(violation);
            Ok(answer)
        }
        _ => Err(st.bad_request(format!(
            "PUT jobs/{id}: state must be running, success or failed"
        ))),
    }
}

/// Answers a final update; returns the answer and the protocol violation it revealed, if any.
fn finish_job(job: &mut JobEntry, final_state: &str, update: Value) -> (Response, Option<String>) {
    let precondition_failed =
        || message(StatusCode::PRECONDITION_FAILED, "412 Precondition Failed");
    let failure_reason = update
        .get("failure_reason")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let exit_code = update.get("exit_code").and_then(Value::as_i64);
    let checked = job.check_output(&update);
    job.rec.final_updates.push(update);

    if job.update_202_left > 0 {
        job.update_202_left -= 1;
        let mut answer = job_status(StatusCode::ACCEPTED.into_response(), &job.rec.state);
        set_header(&mut answer, "x-gitlab-trace-update-interval", 1);
        return (answer, None);
    }
    if std::mem::take(&mut job.update_412_once) {
        job.trace_reset = true;
        return (precondition_failed(), None);
    }
    if final_state == "failed"
        && let Some(reason) = failure_reason.as_deref()
        && !job.allows_failure_reason(reason)
    {
        let id = job.rec.id;
        let violation =
            format!("job {id}: failure_reason {reason} is not in its features.failure_reasons");
        let text = "400 Bad request - failure_reason does not have a valid value";
        return (message(StatusCode::BAD_REQUEST, text), Some(violation));
    }
    if let Err(mismatch) = checked {
        job.trace_reset = true;
        return (precondition_failed(), Some(mismatch));
    }
    // A job canceled gracefully ends as canceled whatever its after_script did.
    let state = if job.rec.state == "canceling" {
        "canceled"
    } else {
        final_state
    };
    job.rec.state = state.to_owned();
    job.rec.failure_reason = failure_reason.filter(|_| final_state == "failed");
    job.rec.exit_code = exit_code;
    job.rec.finished_at = Some(Instant::now());
    (job_status(StatusCode::OK.into_response(), state), None)
}

async fn patch_trace(
    State(s): Srv,
    Path(id): Path<u64>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let mut guard = s.lock();
    let st = &mut *guard;
    let interval = st.trace_interval;
    let job = running_job(st, id, header_str(&headers, "job-token"))?;
    let mut violations = Vec::new();
    if !header_str(&headers, "content-type").is_some_and(|ct| ct.starts_with("text/plain")) {
        violations.push(format!(
            "job {id}: trace patch without Content-Type: text/plain"
        ));
    }
    let range = header_str(&headers, "content-range").and_then(parse_content_range);
    let refusal = if body.len() > MAX_PATCH_BYTES {
        Some(format!(
            "job {id}: trace patch of {} bytes exceeds 1 MiB",
            body.len()
        ))
    } else if range.is_none() {
        Some(format!(
            "job {id}: trace patch needs Content-Range: <start>-<end> (no unit)"
        ))
    } else {
        None
    };
    let Some((start, end)) = range.filter(|_| refusal.is_none()) else {
        st.violations.extend(violations);
        return Err(st.bad_request(refusal.unwrap_or_default()));
    };
    let current = job.trace.len();
    let replaces = job.trace_reset && start == 0;
    let expected_start = if replaces { 0 } else { current };
    let end_matches = body.is_empty() || end.checked_add(1) == start.checked_add(body.len());
    if !end_matches {
        let len = body.len();
        violations.push(format!(
            "job {id}: Content-Range {start}-{end} does not match a body of {len} bytes"
        ));
    }
    let accepted =
        !std::mem::take(&mut job.trace_416_once) && start == expected_start && end_matches;
    let status = if accepted { 202 } else { 416 };
    let at = Instant::now();
    job.rec.patches.push(PatchRecord {
        at,
        start,
        end,
        len: body.len(),
        status,
    });
    if !accepted {
        st.violations.extend(violations);
        let mut answer = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
        set_header(&mut answer, "range", format!("0-{current}"));
        return Err(answer);
    }
    if replaces {
        job.trace.clear();
        job.trace_reset = false;
    }
    job.trace.extend_from_slice(&body);
    let mut answer = job_status(StatusCode::ACCEPTED.into_response(), &job.rec.state);
    set_header(&mut answer, "range", format!("0-{}", job.trace.len()));
    set_header(&mut answer, "x-gitlab-trace-update-interval", interval);
    st.violations.extend(violations);
    Ok(answer)
}

/// Serves both the API path and the `Location` of an injected 307.
async fn upload_artifacts(
    State(s): Srv,
    Path(id): Path<u64>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let via_redirect = uri.path().starts_with("/redirected-upload/");
    {
        let mut guard = s.lock();
        let st = &mut *guard;
        let base_url = st.base_url.clone();
        let job = running_job(st, id, header_str(&headers, "job-token"))?;
        match job.upload_injections.pop_front().filter(|_| !via_redirect) {
            Some(307) => {
                let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
                let mut answer = StatusCode::TEMPORARY_REDIRECT.into_response();
                let location = format!("{base_url}redirected-upload/jobs/{id}/artifacts{query}");
                set_header(&mut answer, "location", location);
                return Err(answer);
            }
            Some(_) => {
                return Err(message(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "413 Request Entity Too Large",
                ));
            }
            None => {}
        }
    }
    let upload = read_multipart(&headers, body).await;
    let mut guard = s.lock();
    let st = &mut *guard;
    let (filename, bytes, fields) = match upload {
        Ok(MultipartUpload {
            file: Some((filename, bytes)),
            fields,
        }) => (filename, bytes, fields),
        Ok(_) => {
            return Err(st.bad_request(format!("job {id}: artifact upload has no `file` field")));
        }
        Err(e) => return Err(st.bad_request(format!("job {id}: artifact upload: {e}"))),
    };
    let query: BTreeMap<String, String> =
        url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let job = running_job(st, id, header_str(&headers, "job-token"))?;
    let kind = query.get("artifact_type").or(fields.get("artifact_type"));
    if kind.is_none_or(|kind| kind == "archive") {
        job.archive = Some(bytes.clone());
    }
    job.rec.artifacts.push(ArtifactUpload {
        filename,
        query,
        fields,
        bytes,
        via_redirect,
    });
    Ok((StatusCode::CREATED, Json(json!({}))).into_response())
}

#[derive(Default)]
struct MultipartUpload {
    file: Option<(Option<String>, Vec<u8>)>,
    fields: BTreeMap<String, String>,
}

async fn read_multipart(headers: &HeaderMap, body: Bytes) -> Result<MultipartUpload, String> {
    let content_type = header_str(headers, "content-type").ok_or("no Content-Type")?;
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| format!("not multipart/form-data: {e}"))?;
    let stream = futures::stream::once(async move { Ok::<Bytes, Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut upload = MultipartUpload::default();
    let malformed = |e: multer::Error| format!("malformed multipart body: {e}");
    while let Some(field) = multipart.next_field().await.map_err(malformed)? {
        let name = field.name().unwrap_or_default().to_owned();
        let filename = field.file_name().map(str::to_owned);
        let data = field.bytes().await.map_err(malformed)?;
        if name == "file" {
            upload.file = Some((filename, data.to_vec()));
        } else {
            upload
                .fields
                .insert(name, String::from_utf8_lossy(&data).into_owned());
        }
    }
    Ok(upload)
}

async fn download_artifacts(State(s): Srv, Path(id): Path<u64>, headers: HeaderMap) -> Answer {
    let mut guard = s.lock();
    let st = &mut *guard;
    let job = st
        .jobs
        .get(&id)
        .ok_or_else(|| message(StatusCode::NOT_FOUND, "404 Job Not Found"))?;
    if header_str(&headers, "job-token") != Some(job.rec.token.as_str()) {
        return Err(forbidden());
    }
    if st.failing_artifact_downloads > 0 {
        st.failing_artifact_downloads -= 1;
        return Err(message(StatusCode::BAD_GATEWAY, "502 Bad Gateway"));
    }
    let archive = job
        .archive
        .as_ref()
        .ok_or_else(|| message(StatusCode::NOT_FOUND, "404 Not Found"))?;
    if !st.artifact_redirect {
        return Ok(archive_response(archive.clone()));
    }
    let mut answer = StatusCode::FOUND.into_response();
    set_header(
        &mut answer,
        "location",
        format!("{}storage/artifacts/{id}/{}", st.base_url, job.storage_key),
    );
    Ok(answer)
}

async fn storage_download(
    State(s): Srv,
    Path((id, key)): Path<(u64, String)>,
    headers: HeaderMap,
) -> Response {
    let mut guard = s.lock();
    let st = &mut *guard;
    let had_job_token = headers.contains_key("job-token");
    st.storage_requests.push(StorageRequest {
        job_id: id,
        had_job_token,
    });
    if had_job_token {
        st.violations.push(format!(
            "job {id}: JOB-TOKEN sent to object storage on redirect"
        ));
    }
    match st.jobs.get(&id) {
        Some(job) if job.storage_key == key => match &job.archive {
            Some(archive) => archive_response(archive.clone()),
            None => message(StatusCode::NOT_FOUND, "404 Not Found"),
        },
        _ => message(StatusCode::FORBIDDEN, "signature does not match"),
    }
}

fn archive_response(archive: Vec<u8>) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/zip"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=artifacts.zip",
            ),
        ],
        archive,
    )
        .into_response()
}

/// The body as a parameter map, in whichever of the two encodings GitLab accepts the client used;
/// the flag says whether it was form-encoded.
fn parse_params(headers: &HeaderMap, body: &[u8]) -> Result<(Map<String, Value>, bool), String> {
    let form = header_str(headers, "content-type")
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    if form {
        let mut params = Map::new();
        for (key, value) in url::form_urlencoded::parse(body) {
            let value = Value::String(value.into_owned());
            match params.get_mut(key.as_ref()) {
                Some(Value::Array(values)) => values.push(value),
                Some(previous) => *previous = Value::Array(vec![previous.take(), value]),
                None => {
                    params.insert(key.into_owned(), value);
                }
            }
        }
        return Ok((params, true));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(params)) => Ok((params, false)),
        Ok(_) => Err("body is not a JSON object".to_owned()),
        Err(e) => Err(format!("body is neither form-encoded nor JSON: {e}")),
    }
}

/// A parameter as text, whether it came as a JSON string, bool or number.
fn text_param(params: &Map<String, Value>, key: &str) -> Option<String> {
    match params.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `start-end`, both inclusive, without the `bytes ` unit.
fn parse_content_range(value: &str) -> Option<(usize, usize)> {
    let (start, end) = value.trim().split_once('-')?;
    Some((start.parse().ok()?, end.parse().ok()?))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn set_header(response: &mut Response, name: &'static str, value: impl ToString) {
    if let Ok(value) = HeaderValue::from_str(&value.to_string()) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(name), value);
    }
}

fn job_status(mut response: Response, state: &str) -> Response {
    set_header(&mut response, "job-status", state);
    response
}

fn message(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "message": text }))).into_response()
}

fn forbidden() -> Response {
    message(StatusCode::FORBIDDEN, "403 Forbidden")
}

fn random_alnum(len: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

fn runner_token() -> String {
    format!("glrt-{}", random_alnum(20))
}

fn job_token() -> String {
    format!("glcbt-{}", random_alnum(20))
}

/// A TLS acceptor with a server certificate for `localhost` and `127.0.0.1`, issued by a CA
/// made now, and that CA's certificate (PEM). Keys live only in memory.
fn test_ca_acceptor() -> (tokio_rustls::TlsAcceptor, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kiln test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![server_cert.der().clone()],
            tokio_rustls::rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der())
                .unwrap(),
        )
        .unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca.pem())
}
