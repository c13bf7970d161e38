//! The coordinator's HTTP server: `/healthz`, `/readyz`, `/metrics`, the Jenkins and GitHub
//! webhooks, and the status page with its JSON API.

mod config;
mod serve;
mod status_api;
mod status_page;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::coordinator::Status;
use crate::sources::github::{Delivery, GitHubHook};
use crate::sources::jenkins::Wake;
use crate::telemetry::Metrics;
pub use config::{HttpConfig, StatusConfig};
pub use serve::{ServeLimits, serve};
pub use status_api::{StatusAccess, StatusPage};

/// The largest webhook body kiln reads; senders post a few KiB at most.
const WEBHOOK_BODY_LIMIT: usize = 64 * 1024;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// Readiness and capacity.
    pub status: Status,
    /// The Jenkins sources `POST /hooks/jenkins` wakes.
    pub jenkins_hooks: Vec<Wake>,
    /// The GitHub sources `POST /hooks/github` delivers `workflow_job` events to.
    pub github_hooks: Vec<GitHubHook>,
    /// How long a webhook sender may take to send its body.
    pub body_timeout: Duration,
    /// Who may read the status page and how it looks.
    pub status_page: StatusPage,
}

/// The router; tests call it without a socket.
pub fn router(state: AppState) -> Router {
    // The status page and its API show what runs where: only to whoever `status.token` or
    // the loopback interface lets in.
    let status = Router::new()
        .route("/", get(status_page::page))
        .route("/api/v1/builds", get(status_api::builds))
        .route("/api/v1/sources", get(status_api::sources))
        .route("/api/v1/costs", get(status_api::costs))
        .route("/api/v1/warm", get(status_api::warm))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            status_api::guard,
        ));
    Router::new()
        .merge(status)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/hooks/jenkins", post(jenkins_hook))
        .route("/hooks/github", post(github_hook))
        // Handlers read bodies themselves, after authenticating; nothing else takes one.
        .layer(DefaultBodyLimit::max(WEBHOOK_BODY_LIMIT))
        .with_state(state)
}

/// The router of `http.probe_listen`: `/healthz` and `/readyz` only.
pub fn probe_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(0))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.status.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let waiting: Vec<String> = state
            .status
            .sources()
            .into_iter()
            .filter(|s| !s.health.ready)
            .map(|s| {
                let why = s
                    .health
                    .last_error
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                format!("{}: {}{why}", s.name, s.health.state)
            })
            .collect();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", waiting.join("\n")),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// `POST /hooks/jenkins`: makes the Jenkins sources whose webhook secret the caller knows look
/// at their queue now. The secret comes in `X-Kiln-Webhook-Secret`, `Authorization: Bearer …`
/// or `?token=` (for senders that cannot set headers). The body, if any, must be JSON (the
/// Notification plugin's, or a Jenkinsfile step's); it is not needed: the queue is the truth.
async fn jenkins_hook(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    let configured: Vec<&Wake> = state
        .jenkins_hooks
        .iter()
        .filter(|w| w.secret.is_some())
        .collect();
    if configured.is_empty() {
        return (
            StatusCode::NOT_FOUND,
            "no Jenkins source has a webhook_secret configured\n",
        )
            .into_response();
    }
    let header_secret = headers
        .get("x-kiln-webhook-secret")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_owned)
        });
    let query_secret = query.as_deref().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    });
    let Some(given) = header_secret.or(query_secret) else {
        return (
            StatusCode::UNAUTHORIZED,
            "missing webhook secret: send X-Kiln-Webhook-Secret\n",
        )
            .into_response();
    };
    let matching: Vec<&Wake> = configured
        .into_iter()
        .filter(|w| {
            w.secret
                .as_deref()
                .is_some_and(|s| constant_time_eq(s.as_bytes(), given.as_bytes()))
        })
        .collect();
    if matching.is_empty() {
        tracing::warn!("Jenkins webhook with a wrong secret refused");
        return (StatusCode::UNAUTHORIZED, "wrong webhook secret\n").into_response();
    }
    // Only now, for a sender that knows the secret, is the body read: bounded in size and time.
    let body = match read_body(body, state.body_timeout).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    if !body.iter().all(u8::is_ascii_whitespace)
        && let Err(e) = serde_json::from_slice::<serde_json::Value>(&body)
    {
        return (
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON ({e}); send JSON or nothing\n"),
        )
            .into_response();
    }
    for wake in matching {
        tracing::debug!(jenkins = %wake.name, "Jenkins webhook: checking the queue now");
        wake.wake();
    }
    (StatusCode::ACCEPTED, "queue check scheduled\n").into_response()
}

/// `POST /hooks/github`: a `workflow_job` event for the GitHub source whose webhook secret
/// signs it (`X-Hub-Signature-256`, checked in constant time). Wrong or missing signature:
/// `401` and nothing happens; a redelivery (`X-GitHub-Delivery` seen before) is dropped.
async fn github_hook(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let hooks: Vec<&GitHubHook> = state.github_hooks.iter().filter(|h| h.enabled()).collect();
    if hooks.is_empty() {
        return (
            StatusCode::NOT_FOUND,
            "no GitHub source has a webhook_secret configured\n",
        )
            .into_response();
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let signature = header("x-hub-signature-256");
    if signature.is_empty() {
        return (
            StatusCode::UNAUTHORIZED,
            "missing X-Hub-Signature-256: set the webhook's secret in GitHub\n",
        )
            .into_response();
    }
    let body = match read_body(body, state.body_timeout).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let Some(hook) = hooks.into_iter().find(|h| h.signed(&body, &signature)) else {
        tracing::warn!("GitHub webhook with a wrong signature refused");
        return (StatusCode::UNAUTHORIZED, "wrong signature\n").into_response();
    };
    match hook.deliver(
        &header("x-github-delivery"),
        &header("x-github-event"),
        &body,
    ) {
        Ok(Delivery::Accepted) => (StatusCode::ACCEPTED, "accepted\n").into_response(),
        Ok(Delivery::Duplicate) => {
            tracing::debug!(github = %hook.name, "GitHub redelivery dropped");
            (StatusCode::OK, "duplicate delivery; already handled\n").into_response()
        }
        Ok(Delivery::Ignored) => (StatusCode::OK, "event ignored\n").into_response(),
        Err(message) => (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response(),
    }
}

/// Reads a webhook body of at most [`WEBHOOK_BODY_LIMIT`] bytes within `timeout`; otherwise the
/// response to send (413 or 408).
async fn read_body(body: Body, timeout: Duration) -> Result<Bytes, Response> {
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, WEBHOOK_BODY_LIMIT)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body is larger than {} KiB or broke off\n",
                WEBHOOK_BODY_LIMIT / 1024
            ),
        )
            .into_response()),
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {}s\n", timeout.as_secs()),
        )
            .into_response()),
    }
}

/// Compares without leaking where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests;
