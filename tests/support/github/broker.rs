//! The test-only broker the runner stand-in talks to (as the real runner talks to GitHub's Actions service, not REST), and helpers to run the stand-in.
//!
//! `POST /_test/runner/sessions` connects with the JIT config's runner id and secret; the
//! session then long-polls `…/message` for its one job, long-polls `…/jobs/{id}/outcome` for
//! when the job is over (the test decided how long it takes and how it ends) and posts
//! `…/jobs/{id}/complete`. `DELETE …/sessions/{id}` takes the runner offline.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::Rng;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{JobStatus, Removal, Runner, ServerState, Shared, Srv, target_dir};

/// The longest a broker long poll is held.
const MAX_WAIT: Duration = Duration::from_secs(30);

pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/_test/runner/sessions", post(connect))
        .route(
            "/_test/runner/sessions/{session}",
            axum::routing::delete(disconnect),
        )
        .route("/_test/runner/sessions/{session}/message", get(message))
        .route(
            "/_test/runner/sessions/{session}/jobs/{job}/outcome",
            get(outcome),
        )
        .route(
            "/_test/runner/sessions/{session}/jobs/{job}/complete",
            post(complete),
        )
}

/// The broker's refusals: plain JSON `{message}` the stand-in prints.
fn broker_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"message": message}))).into_response()
}

fn deleted() -> Response {
    broker_error(
        StatusCode::NOT_FOUND,
        "The runner registration has been deleted from the server, please re-configure.",
    )
}

/// The runner holding `session`, or the broker's answer when there is none usable.
fn by_session<'a>(st: &'a ServerState, session: &str) -> Result<&'a Runner, Response> {
    let runner = st
        .runners
        .values()
        .find(|r| r.session.as_deref() == Some(session))
        .ok_or_else(|| broker_error(StatusCode::UNAUTHORIZED, "unknown or closed session"))?;
    match runner.removed {
        Some(Removal::Deleted) => Err(deleted()),
        _ => Ok(runner),
    }
}

#[derive(serde::Deserialize)]
struct Wait {
    wait_ms: Option<u64>,
}

impl Wait {
    fn deadline(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.wait_ms.unwrap_or(0)).min(MAX_WAIT)
    }
}

/// `POST /_test/runner/sessions {runner_id, secret}`: what the real runner does against the
/// broker with its JIT config. 201 `{session_id}`; 401 bad credentials, 404 registration
/// deleted, 409 already connected or already used, 410 the config expired unused.
async fn connect(s: Srv, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return broker_error(StatusCode::BAD_REQUEST, "expected {runner_id, secret}");
    };
    let id = request["runner_id"].as_u64().unwrap_or(0);
    let secret = request["secret"].as_str().unwrap_or("");
    let mut st = s.lock();
    let ttl = st.jit_ttl;
    let Some(runner) = st.runners.get_mut(&id).filter(|r| r.secret == secret) else {
        return broker_error(StatusCode::UNAUTHORIZED, "invalid runner credentials");
    };
    match runner.removed {
        Some(Removal::Deleted) => return deleted(),
        Some(Removal::AfterJob) => {
            return broker_error(
                StatusCode::CONFLICT,
                "this JIT configuration was already used for a job",
            );
        }
        None => {}
    }
    if runner.session.is_some() {
        return broker_error(
            StatusCode::CONFLICT,
            "a runner with this configuration is already connected",
        );
    }
    let expired = ttl.is_some_and(|ttl| {
        !runner.connected && runner.created_at.elapsed().unwrap_or_default() > ttl
    });
    if expired {
        return broker_error(StatusCode::GONE, "the JIT configuration has expired");
    }
    let mut session = [0u8; 16];
    rand::rng().fill(&mut session);
    let session = hex::encode(session);
    runner.session = Some(session.clone());
    runner.connected = true;
    st.schedule();
    drop(st);
    s.bump();
    (
        StatusCode::CREATED,
        axum::Json(json!({"session_id": session})),
    )
        .into_response()
}

/// `DELETE /_test/runner/sessions/{session}`: the runner stops (SIGTERM) and goes offline; a
/// job it had is lost.
async fn disconnect(s: Srv, Path(session): Path<String>) -> Response {
    let mut st = s.lock();
    let id = match by_session(&st, &session) {
        Ok(r) => r.id,
        Err(refusal) => return refusal,
    };
    st.lose_runner(id);
    if let Some(r) = st.runners.get_mut(&id) {
        r.session = None;
    }
    drop(st);
    s.bump();
    StatusCode::NO_CONTENT.into_response()
}

/// `GET /_test/runner/sessions/{session}/message?wait_ms=N`: 200 with the job given to this
/// runner, or 204 when none came within the wait.
async fn message(s: Srv, Path(session): Path<String>, Query(wait): Query<Wait>) -> Response {
    let deadline = wait.deadline();
    let mut changed = s.changed.subscribe();
    loop {
        {
            let st = s.lock();
            let runner = match by_session(&st, &session) {
                Ok(r) => r,
                Err(refusal) => return refusal,
            };
            if let Some(job) = runner.job.and_then(|id| st.jobs.get(&id)) {
                let repo = &st.repos[&job.repo];
                return axum::Json(json!({
                    "job_id": job.id,
                    "run_id": job.run_id,
                    "run_attempt": job.attempt,
                    "name": job.spec.name,
                    "repository": repo.full_name(),
                    "labels": job.spec.labels,
                }))
                .into_response();
            }
        }
        tokio::select! {
            _ = changed.changed() => {}
            () = tokio::time::sleep_until(deadline) => return StatusCode::NO_CONTENT.into_response(),
        }
    }
}

/// `GET …/jobs/{job}/outcome?wait_ms=N`: 200 `{conclusion}` once the job's planned duration
/// passed (or the test finished a held job), else 204 at the end of the wait.
async fn outcome(
    s: Srv,
    Path((session, job_id)): Path<(String, u64)>,
    Query(wait): Query<Wait>,
) -> Response {
    let deadline = wait.deadline();
    let mut changed = s.changed.subscribe();
    loop {
        let planned_end = {
            let st = s.lock();
            let runner = match by_session(&st, &session) {
                Ok(r) => r,
                Err(refusal) => return refusal,
            };
            let Some(job) = st.jobs.get(&job_id).filter(|_| runner.job == Some(job_id)) else {
                return broker_error(StatusCode::NOT_FOUND, "this job is not this runner's");
            };
            if job.status == JobStatus::Completed {
                return broker_error(StatusCode::GONE, "the job is already over");
            }
            if let Some(conclusion) = &job.released {
                return axum::Json(json!({"conclusion": conclusion})).into_response();
            }
            let end = job.started_at.unwrap_or_else(SystemTime::now) + job.spec.duration;
            let left = end.duration_since(SystemTime::now()).unwrap_or_default();
            if !job.spec.hold && left.is_zero() {
                return axum::Json(json!({"conclusion": job.spec.conclusion})).into_response();
            }
            (!job.spec.hold).then(|| Instant::now() + left)
        };
        if Instant::now() >= deadline {
            return StatusCode::NO_CONTENT.into_response();
        }
        let wake = planned_end.map_or(deadline, |end| end.min(deadline));
        tokio::select! {
            _ = changed.changed() => {}
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// `POST …/jobs/{job}/complete {conclusion}`: the job ends; the ephemeral runner is removed.
async fn complete(s: Srv, Path((session, job_id)): Path<(String, u64)>, body: Bytes) -> Response {
    let conclusion = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["conclusion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "success".to_owned());
    let mut st = s.lock();
    let id = match by_session(&st, &session) {
        Ok(r) if r.job == Some(job_id) => r.id,
        Ok(_) => return broker_error(StatusCode::NOT_FOUND, "this job is not this runner's"),
        Err(refusal) => return refusal,
    };
    st.finish(id, &conclusion);
    st.schedule();
    drop(st);
    s.bump();
    StatusCode::OK.into_response()
}

/// `target/debug/examples/fake-actions-runner`, built by `cargo test` (or `cargo build
/// --example fake-actions-runner`).
///
/// # Panics
/// When it is missing or older than its source: a `cargo test --test e2e` run does not build
/// examples, so the message says how to.
pub fn fake_runner_bin() -> PathBuf {
    let bin = target_dir().join("examples").join("fake-actions-runner");
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support/bin/fake_actions_runner.rs");
    let built = std::fs::metadata(&bin).and_then(|m| m.modified());
    let written = std::fs::metadata(&source).and_then(|m| m.modified());
    match (built, written) {
        (Ok(built), Ok(written)) if built >= written => bin,
        (Ok(_), Ok(_)) => panic!(
            "{} is older than its source; run `cargo build --example fake-actions-runner` (plain `cargo test` builds it)",
            bin.display()
        ),
        _ => panic!(
            "{} is missing; run `cargo build --example fake-actions-runner` (plain `cargo test` builds it)",
            bin.display()
        ),
    }
}

/// A `fake-actions-runner` process, its output captured in a temporary directory; killed on drop.
pub struct FakeRunner {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
}

impl FakeRunner {
    /// Starts it as `run.sh --jitconfig <encoded>`.
    pub fn start(encoded_jit_config: &str) -> Self {
        Self::spawn(&["--jitconfig", encoded_jit_config], &[])
    }

    /// Starts it with the config in `ACTIONS_RUNNER_INPUT_JITCONFIG` and no arguments.
    pub fn start_with_env(encoded_jit_config: &str) -> Self {
        Self::spawn(
            &[],
            &[("ACTIONS_RUNNER_INPUT_JITCONFIG", encoded_jit_config)],
        )
    }

    /// Starts it with these arguments and environment variables (added to the test's).
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let child = tokio::process::Command::new(fake_runner_bin())
            .args(args)
            .env_remove("ACTIONS_RUNNER_INPUT_JITCONFIG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self { child, dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    /// SIGTERM, as Kubernetes or kiln's local executor stops it.
    pub fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// SIGKILL, as an evicted or OOM-killed pod dies, and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Its exit status, if it exits within `within`.
    pub async fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()
            .map(Result::unwrap)
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }
}
