//! The agent's side of a warm pod (see `crate::handoff`): `kiln agent receive` in the
//! `handoff` container waits at the pod's IP for its job, sealed with the pod's key, writes
//! the job's files where the build container's agent looks for them and fetches the sources;
//! `kiln agent --wait` in the build container waits for both. Nothing a sender posts makes the
//! receiver stop waiting: a body too large, not sealed with the key or not a hand-off is
//! refused, and the next one is read.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::post;
use tokio_util::sync::CancellationToken;

use super::{AgentError, AgentPaths, PreparedSources, SOURCES_FILE, fetch_sources};
use crate::build::{FailureReason, JOB_FILE};
use crate::handoff;

/// How often the build container's agent looks for its job.
const WAIT_POLL: Duration = Duration::from_millis(50);
/// How long the receiver goes on answering a repeated hand-off of its job after it fetched
/// the sources (a coordinator whose first answer was lost asks again).
const LINGER: Duration = Duration::from_secs(2);

/// Where the receiver puts what it receives.
#[derive(Debug, Clone)]
pub struct ReceivePaths {
    /// The pod's hand-off key (mounted from its Secret).
    pub key_file: PathBuf,
    /// Where the job's files go (shared with the build container, in memory).
    pub job_dir: PathBuf,
    /// Scratch directory shared with the build container (the fetched sources' record).
    pub work_dir: PathBuf,
    /// Where projects are checked out.
    pub builds_dir: Option<PathBuf>,
}

struct Receiver {
    key: Vec<u8>,
    pod: String,
    job_dir: PathBuf,
    /// The work accepted, once it is.
    accepted: Mutex<Option<String>>,
    received: CancellationToken,
}

/// `kiln agent receive`: waits at `POD_IP` (the pod's IP) for the pod's job, writes its files,
/// fetches its sources and returns. `abort` (the pod deleted while idle) ends the wait.
///
/// # Errors
/// The key cannot be read, or the job's files cannot be written; then the pod fails and,
/// while untaken, its pool replaces it.
pub async fn receive(paths: &ReceivePaths, abort: CancellationToken) -> Result<(), AgentError> {
    let key = std::fs::read(&paths.key_file).map_err(|source| AgentError::ReadJob {
        path: paths.key_file.clone(),
        source,
    })?;
    let pod = std::env::var("POD_NAME").unwrap_or_default();
    let ip = std::env::var("POD_IP")
        .ok()
        .and_then(|ip| ip.trim().parse::<IpAddr>().ok())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let address = SocketAddr::new(ip, handoff::PORT);
    std::fs::create_dir_all(&paths.job_dir).map_err(|source| AgentError::WorkDir {
        path: paths.job_dir.clone(),
        source,
    })?;
    let listener = loop {
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => break listener,
            Err(e) => {
                tracing::warn!(%address, error = %e, "cannot listen for the hand-off yet; trying again");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = abort.cancelled() => return Ok(()),
                }
            }
        }
    };
    let receiver = Arc::new(Receiver {
        key,
        pod,
        job_dir: paths.job_dir.clone(),
        accepted: Mutex::new(None),
        received: CancellationToken::new(),
    });
    let stop = CancellationToken::new();
    let server = tokio::spawn({
        let app = router(Arc::clone(&receiver));
        let stop = stop.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        }
    });
    tracing::info!(%address, "waiting for the hand-off of this pod's job");
    tokio::select! {
        () = receiver.received.cancelled() => {}
        () = abort.cancelled() => {
            stop.cancel();
            return Ok(());
        }
    }
    let job_file = paths.job_dir.join(JOB_FILE);
    let agent_paths = AgentPaths {
        job_file,
        work_dir: Some(paths.work_dir.clone()),
        builds_dir: paths.builds_dir.clone(),
        result_file: None,
    };
    if let Err(e) = fetch_sources(&agent_paths).await {
        // The build container's agent reports what went wrong.
        let prepared = PreparedSources {
            log: String::new(),
            failure: Some((FailureReason::RunnerSystemFailure, e.to_string())),
        };
        write_atomically(
            &paths.work_dir.join(SOURCES_FILE),
            &serde_json::to_vec(&prepared).unwrap_or_default(),
        )
        .map_err(|source| AgentError::WorkDir {
            path: paths.work_dir.clone(),
            source,
        })?;
    }
    tokio::time::sleep(LINGER).await;
    stop.cancel();
    let _ = server.await;
    Ok(())
}

fn router(receiver: Arc<Receiver>) -> Router {
    Router::new()
        .route(handoff::PATH, post(take))
        .layer(DefaultBodyLimit::max(handoff::MAX_BODY))
        .with_state(receiver)
}

/// One hand-off: accepted (the first, or the same work again) or refused with a short reason.
async fn take(State(receiver): State<Arc<Receiver>>, body: Bytes) -> (StatusCode, String) {
    let handoff = match handoff::open(&receiver.key, &receiver.pod, &body) {
        Ok(handoff) => handoff,
        Err(e) => {
            tracing::warn!(error = %e, "refused a hand-off");
            return (StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let files = match handoff.decoded() {
        Ok(files) if files.contains_key(JOB_FILE) => files,
        Ok(_) => {
            return (
                StatusCode::BAD_REQUEST,
                "the hand-off has no job file".into(),
            );
        }
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()),
    };
    let mut accepted = receiver.accepted.lock().unwrap_or_else(|e| e.into_inner());
    match accepted.as_deref() {
        Some(build) if build == handoff.build => {
            return (StatusCode::OK, "accepted".into());
        }
        Some(_) => {
            return (StatusCode::CONFLICT, "this pod has taken other work".into());
        }
        None => {}
    }
    if let Err(e) = write_files(&receiver.job_dir, &files) {
        tracing::error!(error = %e, "cannot write the job's files");
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot write the job's files: {e}"),
        );
    }
    *accepted = Some(handoff.build.clone());
    tracing::info!(build = %handoff.build, "took this pod's job");
    receiver.received.cancel();
    (StatusCode::OK, "accepted".into())
}

/// Writes the job's files into `dir`, the job file last: the build container's agent starts
/// when it appears.
fn write_files(
    dir: &Path,
    files: &std::collections::BTreeMap<String, Vec<u8>>,
) -> std::io::Result<()> {
    for (name, bytes) in files.iter().filter(|(name, _)| *name != JOB_FILE) {
        write_atomically(&dir.join(name), bytes)?;
    }
    if let Some(job) = files.get(JOB_FILE) {
        write_atomically(&dir.join(JOB_FILE), job)?;
    }
    Ok(())
}

/// Writes `path` whole or not at all (readers poll for it), readable by the build's user.
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes)?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&partial, path)
}

/// `kiln agent --wait`: waits until the job file and the fetched sources' record are there;
/// false when `abort` came first (the pod deleted while idle).
pub async fn wait_for_job(paths: &AgentPaths, abort: &CancellationToken) -> bool {
    let sources = paths.work().join(SOURCES_FILE);
    loop {
        if paths.job_file.is_file() && sources.is_file() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(WAIT_POLL) => {}
            () = abort.cancelled() => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handoff::Handoff;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn receiver(dir: &Path) -> Arc<Receiver> {
        Arc::new(Receiver {
            key: handoff::new_key(),
            pod: "kiln-warm-x".into(),
            job_dir: dir.to_owned(),
            accepted: Mutex::new(None),
            received: CancellationToken::new(),
        })
    }

    async fn post(receiver: &Arc<Receiver>, body: Vec<u8>) -> StatusCode {
        router(Arc::clone(receiver))
            .oneshot(Request::post(handoff::PATH).body(Body::from(body)).unwrap())
            .await
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn only_the_first_sealed_job_is_taken_and_garbage_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = receiver(dir.path());
        assert_eq!(post(&r, Vec::new()).await, StatusCode::BAD_REQUEST);
        assert_eq!(post(&r, vec![7; 4096]).await, StatusCode::BAD_REQUEST);
        assert_eq!(
            post(&r, vec![0; handoff::MAX_BODY + 1]).await,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let other_key = handoff::new_key();
        let job = Handoff::new("gl:r#1", [(JOB_FILE, b"{}".as_slice())]);
        let forged = handoff::seal(&other_key, "kiln-warm-x", &job).unwrap();
        assert_eq!(post(&r, forged).await, StatusCode::BAD_REQUEST);
        let no_job = handoff::seal(&r.key, "kiln-warm-x", &Handoff::new("gl:r#1", [])).unwrap();
        assert_eq!(post(&r, no_job).await, StatusCode::BAD_REQUEST);
        assert!(!r.received.is_cancelled());
        assert!(!dir.path().join(JOB_FILE).exists());

        let sealed = handoff::seal(&r.key, "kiln-warm-x", &job).unwrap();
        assert_eq!(post(&r, sealed.clone()).await, StatusCode::OK);
        assert!(r.received.is_cancelled());
        assert_eq!(std::fs::read(dir.path().join(JOB_FILE)).unwrap(), b"{}");
        assert_eq!(post(&r, sealed).await, StatusCode::OK, "the same job again");
        let other = Handoff::new("gl:r#2", [(JOB_FILE, b"{\"x\":1}".as_slice())]);
        let other = handoff::seal(&r.key, "kiln-warm-x", &other).unwrap();
        assert_eq!(post(&r, other).await, StatusCode::CONFLICT);
        assert_eq!(std::fs::read(dir.path().join(JOB_FILE)).unwrap(), b"{}");
    }
}
