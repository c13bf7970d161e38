//! The coordinator's HTTP server: `/healthz`, `/readyz`, `/metrics` and a small status page.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::coordinator::Status;
use crate::telemetry::Metrics;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// Readiness and capacity.
    pub status: Status,
}

/// The router; tests call it without a socket.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.status.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let waiting: Vec<String> = state
            .status
            .runners()
            .into_iter()
            .filter(|(_, _, s)| *s != "ready")
            .map(|(name, _, s)| format!("{name}: {s}"))
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

/// Runner names and URLs only: tokens never appear here.
async fn status_page(State(state): State<AppState>) -> Html<String> {
    let (running, capacity) = state.status.capacity();
    let rows: String = state
        .status
        .runners()
        .into_iter()
        .map(|(name, url, s)| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&name),
                escape(&url),
                s
            )
        })
        .collect();
    Html(format!(
        "<!doctype html><title>kiln</title><h1>kiln {}</h1><p>{running} of {capacity} job slots in use</p>\
         <table><tr><th>runner</th><th>GitLab</th><th>state</th></tr>{rows}</table>",
        crate::VERSION
    ))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
