//! `cargo run --release --example artifact_rss [-- --kiln PATH --mib N]`: the agent's memory
//! while it archives and uploads a large artifact (docs/benchmarks.md).
//!
//! Runs a real `kiln agent --job FILE` (default `target/release/kiln`) against a minimal
//! runner API on 127.0.0.1 that takes trace patches and job updates and reads the artifact
//! upload as a stream, counting its bytes without keeping them. The job writes N MiB (default
//! 1024) of random bytes, so deflate cannot shrink them, and uploads them as a zip artifact.
//! The agent's resident set is sampled from `/proc/PID/status` every 20 ms; the peak
//! (`VmHWM`, the kernel's high-water mark) is printed with the upload's size and duration.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post, put};
use futures::StreamExt;

#[derive(Default)]
struct Seen {
    trace_len: AtomicU64,
    uploaded: AtomicU64,
    upload_ms: AtomicU64,
}

async fn trace(State(seen): State<Arc<Seen>>, headers: HeaderMap, body: Body) -> Response {
    let bytes = axum::body::to_bytes(body, 2 << 20)
        .await
        .unwrap_or_default();
    let start = headers
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    let len = seen.trace_len.load(Ordering::SeqCst);
    if start != len {
        return (
            StatusCode::RANGE_NOT_SATISFIABLE,
            [("range", format!("0-{len}"))],
        )
            .into_response();
    }
    let len = len + bytes.len() as u64;
    seen.trace_len.store(len, Ordering::SeqCst);
    (
        StatusCode::ACCEPTED,
        [
            ("range", format!("0-{len}")),
            ("job-status", "running".to_owned()),
            ("x-gitlab-trace-update-interval", "3".to_owned()),
        ],
    )
        .into_response()
}

async fn update() -> Response {
    (StatusCode::OK, [("job-status", "running")]).into_response()
}

/// Reads the multipart body as a stream and keeps only its length.
async fn artifacts(State(seen): State<Arc<Seen>>, body: Body) -> Response {
    let started = Instant::now();
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => total += chunk.len() as u64,
            Err(_) => return StatusCode::BAD_REQUEST.into_response(),
        }
    }
    seen.uploaded.store(total, Ordering::SeqCst);
    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    seen.upload_ms.store(ms, Ordering::SeqCst);
    (StatusCode::CREATED, "{}").into_response()
}

/// `VmHWM` and `VmRSS` of `pid` in KiB.
fn memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() {
    let kiln = arg("--kiln").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/kiln"),
        PathBuf::from,
    );
    assert!(
        kiln.is_file(),
        "{} is missing: run `cargo build --release` first or pass --kiln PATH",
        kiln.display()
    );
    let mib: u64 = arg("--mib").map_or(1024, |m| m.parse().expect("--mib takes a number"));

    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/api/v4/jobs/{id}/trace", patch(trace))
        .route("/api/v4/jobs/{id}", put(update))
        .route("/api/v4/jobs/{id}/artifacts", post(artifacts))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(Arc::clone(&seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let job = serde_json::json!({
        "gitlab_url": format!("http://{addr}/"),
        "job": {
            "id": 1,
            "token": "bench-job-token",
            "job_info": {"name": "big-artifact", "project_name": "bench"},
            "runner_info": {"timeout": 3600},
            "steps": [{"name": "script", "when": "on_success", "timeout": 3600,
                "script": [format!("head -c {} /dev/urandom > big.bin", mib << 20)]}],
            "artifacts": [{"name": "big", "paths": ["big.bin"], "when": "on_success",
                "artifact_type": "archive", "artifact_format": "zip"}],
        },
    });
    let job_file = dir.path().join("job.json");
    std::fs::write(&job_file, job.to_string()).unwrap();

    let started = Instant::now();
    let mut child = std::process::Command::new(&kiln)
        .arg("agent")
        .arg("--job")
        .arg(&job_file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (mut peak, mut last_rss) = (0, 0);
    let status = loop {
        if let Some((hwm, rss)) = memory(pid) {
            peak = peak.max(hwm);
            last_rss = rss;
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let uploaded = seen.uploaded.load(Ordering::SeqCst);
    println!("agent exit: {status}");
    println!(
        "artifact: {mib} MiB of random bytes, uploaded {uploaded} bytes in {} ms",
        seen.upload_ms.load(Ordering::SeqCst)
    );
    println!("job wall time: {:.1} s", started.elapsed().as_secs_f64());
    println!(
        "agent peak RSS (VmHWM): {:.1} MiB (last sample {:.1} MiB)",
        peak as f64 / 1024.0,
        last_rss as f64 / 1024.0
    );
    assert!(status.success(), "the agent did not report the job");
    assert!(uploaded > mib << 20, "the artifact was not uploaded whole");
}
