//! The embedded job server of `kiln exec`: the part of GitLab's runner job API the agent
//! calls (trace patches, state updates, artifact upload and download), for one local pipeline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, put};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Seconds the agent waits between trace patches (`0`: as often as it likes, which the agent
/// floors at 200 ms): a person is watching the output live.
const TRACE_INTERVAL: &str = "0";

/// Something the orchestrator wants to know as it happens.
#[derive(Debug)]
pub(crate) enum Event {
    /// New trace bytes of a job.
    Trace {
        /// The job.
        id: u64,
        /// The bytes, in order.
        bytes: Vec<u8>,
    },
}

/// The final state a job reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Final {
    /// `success` or `failed`.
    pub(crate) state: String,
    /// The failure reason, when failed.
    pub(crate) failure_reason: Option<String>,
    /// The script's exit code.
    pub(crate) exit_code: Option<i32>,
}

#[derive(Debug, Default)]
struct JobSlot {
    token: String,
    trace_len: u64,
    done: Option<Final>,
    artifacts: Option<Arc<Vec<u8>>>,
}

#[derive(Debug, Default)]
struct Jobs {
    slots: HashMap<u64, JobSlot>,
}

/// Shared state of the server and the orchestrator.
#[derive(Debug, Clone)]
pub(crate) struct JobServer {
    jobs: Arc<Mutex<Jobs>>,
    events: mpsc::UnboundedSender<Event>,
}

impl JobServer {
    /// A server that reports trace output on `events`.
    pub(crate) fn new(events: mpsc::UnboundedSender<Event>) -> Self {
        Self {
            jobs: Arc::new(Mutex::new(Jobs::default())),
            events,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes job `id` known with its token (before its agent starts).
    pub(crate) fn add_job(&self, id: u64, token: &str) {
        self.lock().slots.insert(
            id,
            JobSlot {
                token: token.to_owned(),
                ..Default::default()
            },
        );
    }

    /// Serves `archive` as the artifacts of pseudo-job `id` (the working tree), downloadable
    /// with any job's token.
    pub(crate) fn add_archive(&self, id: u64, archive: Vec<u8>) {
        self.lock().slots.insert(
            id,
            JobSlot {
                artifacts: Some(Arc::new(archive)),
                ..Default::default()
            },
        );
    }

    /// The final state job `id` reported, if it did.
    pub(crate) fn final_state(&self, id: u64) -> Option<Final> {
        self.lock().slots.get(&id).and_then(|s| s.done.clone())
    }

    /// The size of job `id`'s artifacts archive, if it uploaded one.
    pub(crate) fn artifacts_size(&self, id: u64) -> Option<u64> {
        self.lock()
            .slots
            .get(&id)
            .and_then(|s| s.artifacts.as_ref())
            .map(|a| a.len() as u64)
    }

    /// Binds 127.0.0.1 on a free port and serves until `stop`; returns the base URL.
    ///
    /// # Errors
    /// The port cannot be bound.
    pub(crate) async fn start(&self, stop: CancellationToken) -> std::io::Result<String> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let app = router(self.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "the embedded job server stopped");
            }
        });
        Ok(format!("http://{addr}"))
    }

    /// Whether `token` belongs to job `id` (`Some(false)`: wrong token; `None`: no such job).
    fn token_ok(&self, id: u64, token: Option<&str>) -> Option<bool> {
        let jobs = self.lock();
        let slot = jobs.slots.get(&id)?;
        Some(!slot.token.is_empty() && token == Some(slot.token.as_str()))
    }

    /// Whether `token` belongs to any job of the pipeline.
    fn any_token(&self, token: Option<&str>) -> bool {
        let Some(token) = token else { return false };
        self.lock()
            .slots
            .values()
            .any(|s| !s.token.is_empty() && s.token == token)
    }
}

fn router(server: JobServer) -> Router {
    Router::new()
        .route("/api/v4/jobs/{id}", put(update_job))
        .route("/api/v4/jobs/{id}/trace", patch(patch_trace))
        .route(
            "/api/v4/jobs/{id}/artifacts",
            get(download_artifacts).post(upload_artifacts),
        )
        .with_state(server)
}

fn job_token(headers: &HeaderMap) -> Option<&str> {
    headers.get("job-token").and_then(|v| v.to_str().ok())
}

fn with_headers(status: StatusCode, headers: &[(&'static str, String)]) -> Response {
    let mut response = status.into_response();
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            response.headers_mut().insert(*name, value);
        }
    }
    response
}

/// `start-end` → `start`.
fn range_start(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().split('-').next())
        .and_then(|s| s.trim().parse().ok())
}

async fn patch_trace(
    State(server): State<JobServer>,
    Path(id): Path<u64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match server.token_ok(id, job_token(&headers)) {
        None => return StatusCode::NOT_FOUND.into_response(),
        Some(false) => return StatusCode::FORBIDDEN.into_response(),
        Some(true) => {}
    }
    let mut jobs = server.lock();
    let Some(slot) = jobs.slots.get_mut(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if let Some(done) = &slot.done {
        return with_headers(StatusCode::FORBIDDEN, &[("job-status", done.state.clone())]);
    }
    let start = range_start(&headers).unwrap_or(slot.trace_len);
    if start != slot.trace_len {
        return with_headers(
            StatusCode::RANGE_NOT_SATISFIABLE,
            &[("range", format!("0-{}", slot.trace_len))],
        );
    }
    slot.trace_len += body.len() as u64;
    let len = slot.trace_len;
    drop(jobs);
    if !body.is_empty() {
        // The receiver only goes away when the pipeline is over.
        let _ = server.events.send(Event::Trace {
            id,
            bytes: body.to_vec(),
        });
    }
    with_headers(
        StatusCode::ACCEPTED,
        &[
            ("range", format!("0-{len}")),
            ("job-status", "running".into()),
            ("x-gitlab-trace-update-interval", TRACE_INTERVAL.into()),
        ],
    )
}

#[derive(Debug, Deserialize)]
struct UpdateBody {
    #[serde(default)]
    token: Option<String>,
    state: String,
    #[serde(default)]
    failure_reason: Option<String>,
    #[serde(default)]
    exit_code: Option<i32>,
}

async fn update_job(
    State(server): State<JobServer>,
    Path(id): Path<u64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(update) = serde_json::from_slice::<UpdateBody>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let token = job_token(&headers).or(update.token.as_deref());
    match server.token_ok(id, token) {
        None => return StatusCode::NOT_FOUND.into_response(),
        Some(false) => return StatusCode::FORBIDDEN.into_response(),
        Some(true) => {}
    }
    let mut jobs = server.lock();
    let Some(slot) = jobs.slots.get_mut(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let status = match update.state.as_str() {
        "running" => match &slot.done {
            Some(done) => {
                return with_headers(StatusCode::FORBIDDEN, &[("job-status", done.state.clone())]);
            }
            None => "running".to_owned(),
        },
        "success" | "failed" => {
            slot.done.get_or_insert(Final {
                state: update.state.clone(),
                failure_reason: update.failure_reason.clone(),
                exit_code: update.exit_code,
            });
            update.state.clone()
        }
        _ => return StatusCode::BAD_REQUEST.into_response(),
    };
    with_headers(
        StatusCode::OK,
        &[
            ("job-status", status),
            ("x-gitlab-trace-update-interval", TRACE_INTERVAL.into()),
        ],
    )
}

async fn upload_artifacts(
    State(server): State<JobServer>,
    Path(id): Path<u64>,
    headers: HeaderMap,
    mut form: Multipart,
) -> Response {
    match server.token_ok(id, job_token(&headers)) {
        None => return StatusCode::NOT_FOUND.into_response(),
        Some(false) => return StatusCode::FORBIDDEN.into_response(),
        Some(true) => {}
    }
    let mut file = None;
    let mut artifact_type = None;
    loop {
        match form.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or_default().to_owned();
                match name.as_str() {
                    "file" => match field.bytes().await {
                        Ok(bytes) => file = Some(bytes.to_vec()),
                        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
                    },
                    "artifact_type" => artifact_type = field.text().await.ok(),
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(_) => return StatusCode::BAD_REQUEST.into_response(),
        }
    }
    let Some(file) = file else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    // Only the archive is passed to later jobs; reports (junit, …) have no reader here.
    if artifact_type.as_deref().unwrap_or("archive") == "archive"
        && let Some(slot) = server.lock().slots.get_mut(&id)
    {
        slot.artifacts = Some(Arc::new(file));
    }
    StatusCode::CREATED.into_response()
}

async fn download_artifacts(
    State(server): State<JobServer>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Response {
    if !server.any_token(job_token(&headers)) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let archive = server
        .lock()
        .slots
        .get(&id)
        .and_then(|s| s.artifacts.clone());
    match archive {
        Some(data) => (
            StatusCode::OK,
            [("content-type", "application/zip")],
            data.as_ref().clone(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gitlab::api::{
        ArtifactUpload, JobUpdate, RunnerApi, TraceAck, UpdateAck, UploadAck,
    };

    #[tokio::test]
    async fn speaks_the_job_api_the_agent_uses() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let server = JobServer::new(tx);
        server.add_job(1, "tok-1");
        server.add_job(2, "tok-2");
        let stop = CancellationToken::new();
        let url = server.start(stop.clone()).await.unwrap();
        let api = RunnerApi::new(&url).unwrap();

        let ack = api
            .patch_trace(1, "tok-1", 0, b"hello\n".to_vec())
            .await
            .unwrap();
        assert!(
            matches!(ack, TraceAck::Accepted(ref c) if c.job_status.as_deref() == Some("running"))
        );
        let Some(Event::Trace { id, bytes }) = rx.recv().await else {
            panic!("no trace event")
        };
        assert_eq!((id, bytes.as_slice()), (1, b"hello\n".as_slice()));
        // A patch at the wrong offset learns where to resume.
        let ack = api
            .patch_trace(1, "tok-1", 0, b"again".to_vec())
            .await
            .unwrap();
        assert_eq!(
            ack,
            TraceAck::RangeMismatch {
                server_len: Some(6)
            }
        );
        // A wrong token is refused.
        let ack = api.patch_trace(1, "tok-2", 6, b"x".to_vec()).await.unwrap();
        assert!(matches!(ack, TraceAck::Forbidden(_)));

        let archive = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(archive.path(), b"PK-data").unwrap();
        let upload = ArtifactUpload {
            filename: "artifacts.zip".into(),
            format: "zip".into(),
            artifact_type: "archive".into(),
            expire_in: None,
            path: archive.path().to_owned(),
        };
        assert_eq!(
            api.upload_artifact(1, "tok-1", &upload).await.unwrap(),
            UploadAck::Created
        );
        assert_eq!(server.artifacts_size(1), Some(7));
        assert_eq!(
            api.download_artifacts(1, "tok-2").await.unwrap(),
            b"PK-data"
        );
        assert!(api.download_artifacts(2, "tok-2").await.is_err());

        let update = JobUpdate {
            token: "tok-1",
            state: "failed",
            failure_reason: Some("script_failure"),
            exit_code: Some(3),
            output: None,
        };
        assert!(matches!(
            api.update_job(1, &update).await.unwrap(),
            UpdateAck::Accepted(_)
        ));
        assert_eq!(
            server.final_state(1),
            Some(Final {
                state: "failed".into(),
                failure_reason: Some("script_failure".into()),
                exit_code: Some(3)
            })
        );
        // The job is over: further trace is refused with its status.
        let ack = api
            .patch_trace(1, "tok-1", 6, b"late".to_vec())
            .await
            .unwrap();
        assert!(
            matches!(ack, TraceAck::Forbidden(ref c) if c.job_status.as_deref() == Some("failed"))
        );
        stop.cancel();
    }
}
