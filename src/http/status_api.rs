//! The status page's data as JSON (`/api/v1/builds`, `/api/v1/sources`, `/api/v1/costs`,
//! `/api/v1/warm`), and
//! who may read it: with `status.token` set, whoever presents the token; without, only clients
//! on the loopback interface. Shows no token, no variable and no secret.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::AppState;
use crate::build::Outcome;
use crate::coordinator::{BuildRecord, SourceView};

/// Who may read the status page and its API.
#[derive(Debug, Clone, Default)]
pub struct StatusAccess {
    /// The token every client must present; `None`: loopback clients only.
    pub token: Option<String>,
}

/// Lets a request through to the status page or API, or answers 401/403.
pub(crate) async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match state.status_page.access.token.as_deref() {
        Some(token) => {
            if presented_token(request.headers())
                .is_some_and(|given| super::constant_time_eq(given.as_bytes(), token.as_bytes()))
            {
                return next.run(request).await;
            }
            let mut response = (
                StatusCode::UNAUTHORIZED,
                "the status page needs status.token: send `Authorization: Bearer TOKEN`, or give it as the password in the browser's prompt\n",
            )
                .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"kiln status\", charset=\"UTF-8\""),
            );
            response
        }
        None => {
            let peer = request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| addr.ip());
            if peer.is_some_and(|ip| ip.is_loopback() || is_mapped_loopback(ip)) {
                return next.run(request).await;
            }
            (
                StatusCode::FORBIDDEN,
                "the status page answers only on localhost (kubectl port-forward); set status.token to open it to the network\n",
            )
                .into_response()
        }
    }
}

fn is_mapped_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        std::net::IpAddr::V4(_) => false,
    }
}

/// The token of `Authorization: Bearer TOKEN`, or the password of `Authorization: Basic …`.
fn presented_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.trim().to_owned());
    }
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (_, password) = text.split_once(':')?;
    Some(password.to_owned())
}

/// A time as RFC 3339 in UTC, with milliseconds.
fn rfc3339(at: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(at).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A link to a build's job on its CI server, if it is a web address; credentials removed.
pub(crate) fn safe_link(url: Option<&str>) -> Option<String> {
    let url = url?;
    let parsed = url::Url::parse(url).ok()?;
    matches!(parsed.scheme(), "http" | "https").then(|| crate::net::redact_url(url))
}

/// Where a build is or how it ended, as one word.
pub(crate) fn state_of(record: &BuildRecord) -> &'static str {
    match &record.end {
        Some(end) => end.outcome.as_str(),
        None if record.running.is_some() => "running",
        None => "pending",
    }
}

/// One build in `/api/v1/builds`.
#[derive(Debug, Serialize)]
pub(crate) struct BuildView {
    name: String,
    source: &'static str,
    runner: String,
    id: u64,
    project: String,
    pipeline: Option<String>,
    job: String,
    url: Option<String>,
    /// `pending`, `running`, `succeeded`, `failed`, `canceled` or `lost`.
    state: &'static str,
    reason: Option<&'static str>,
    detail: Option<String>,
    exit_code: Option<i32>,
    class: Option<String>,
    vcpu: Option<f64>,
    gib: Option<f64>,
    cost: Option<f64>,
    queued_at: Option<String>,
    launched_at: String,
    created_at: Option<String>,
    running_at: Option<String>,
    finished_at: Option<String>,
}

impl BuildView {
    pub(crate) fn of(record: &BuildRecord) -> Self {
        let end = record.end.as_ref();
        let footprint = record.footprint.as_ref();
        Self {
            name: record.name.clone(),
            source: record.key.source.name(),
            runner: record.key.runner.clone(),
            id: record.key.id,
            project: record.about.project.clone(),
            pipeline: record.about.pipeline.clone(),
            job: record.about.job.clone(),
            url: safe_link(record.about.url.as_deref()),
            state: state_of(record),
            reason: end.and_then(|e| match e.outcome {
                Outcome::Failed(reason) => Some(reason.as_str()),
                _ => None,
            }),
            detail: end.map(|e| e.detail.clone()),
            exit_code: end.and_then(|e| e.exit_code),
            class: footprint.and_then(|f| f.class.clone()),
            vcpu: footprint.map(|f| f.vcpu),
            gib: footprint.map(|f| f.gib),
            cost: end.and_then(|e| e.cost),
            queued_at: record.about.queued_at.map(rfc3339),
            launched_at: rfc3339(record.launched),
            created_at: record.created.map(rfc3339),
            running_at: record.running.map(rfc3339),
            finished_at: end.map(|e| rfc3339(e.at)),
        }
    }
}

/// Capacity in use.
#[derive(Debug, Serialize)]
pub(crate) struct CapacityView {
    used: usize,
    total: usize,
}

/// `GET /api/v1/builds?limit=N`.
#[derive(Debug, Serialize)]
struct BuildsAnswer {
    capacity: CapacityView,
    /// Finished builds kept at most (`status.history`).
    history_limit: usize,
    currency: String,
    builds: Vec<BuildView>,
}

/// `?limit=N`: at most N builds, newest first.
#[derive(Debug, Deserialize)]
pub(crate) struct Limit {
    limit: Option<usize>,
}

pub(crate) async fn builds(State(state): State<AppState>, Query(query): Query<Limit>) -> Response {
    let status = &state.status;
    let (used, total) = status.capacity();
    let records = status.builds();
    let limit = query.limit.unwrap_or(usize::MAX);
    Json(BuildsAnswer {
        capacity: CapacityView { used, total },
        history_limit: status.history_limit(),
        currency: state.status_page.currency.clone(),
        builds: records
            .iter()
            .take(limit)
            .map(|r| BuildView::of(r))
            .collect(),
    })
    .into_response()
}

/// One source in `/api/v1/sources`.
#[derive(Debug, Serialize)]
struct SourceAnswer {
    kind: &'static str,
    name: String,
    url: String,
    ready: bool,
    state: String,
    last_success: Option<String>,
    last_error: Option<String>,
    builds: usize,
    limit: usize,
}

impl SourceAnswer {
    fn of(view: SourceView) -> Self {
        Self {
            kind: view.kind,
            name: view.name,
            url: view.health.url,
            ready: view.health.ready,
            state: view.health.state,
            last_success: view.health.last_success.map(rfc3339),
            last_error: view.health.last_error,
            builds: view.builds,
            limit: view.limit,
        }
    }
}

/// `GET /api/v1/sources`.
#[derive(Debug, Serialize)]
struct SourcesAnswer {
    ready: bool,
    capacity: CapacityView,
    sources: Vec<SourceAnswer>,
}

pub(crate) async fn sources(State(state): State<AppState>) -> Response {
    let status = &state.status;
    let (used, total) = status.capacity();
    Json(SourcesAnswer {
        ready: status.ready(),
        capacity: CapacityView { used, total },
        sources: status.sources().into_iter().map(SourceAnswer::of).collect(),
    })
    .into_response()
}

/// What the builds of one project (or one of its pipelines) cost.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct CostSum {
    pub(crate) builds: usize,
    pub(crate) cost: f64,
}

/// One project in `/api/v1/costs`.
#[derive(Debug, Serialize)]
pub(crate) struct ProjectCost {
    pub(crate) project: String,
    #[serde(flatten)]
    pub(crate) sum: CostSum,
    pub(crate) pipelines: BTreeMap<String, CostSum>,
}

/// What the finished builds the history keeps cost, per project and pipeline, most expensive
/// project first; builds without a cost are left out.
pub(crate) fn costs_by_project(records: &[Arc<BuildRecord>]) -> Vec<ProjectCost> {
    let mut projects: BTreeMap<&str, ProjectCost> = BTreeMap::new();
    for record in records {
        let Some(cost) = record.end.as_ref().and_then(|e| e.cost) else {
            continue;
        };
        let project = projects
            .entry(record.about.project.as_str())
            .or_insert_with(|| ProjectCost {
                project: record.about.project.clone(),
                sum: CostSum::default(),
                pipelines: BTreeMap::new(),
            });
        project.sum.builds += 1;
        project.sum.cost += cost;
        if let Some(pipeline) = &record.about.pipeline {
            let sum = project.pipelines.entry(pipeline.clone()).or_default();
            sum.builds += 1;
            sum.cost += cost;
        }
    }
    let mut out: Vec<ProjectCost> = projects.into_values().collect();
    out.sort_by(|a, b| b.sum.cost.total_cmp(&a.sum.cost));
    out
}

/// `GET /api/v1/costs`.
#[derive(Debug, Serialize)]
struct CostsAnswer {
    currency: String,
    /// Over the finished builds the history keeps; `kiln_build_cost_total` counts them all.
    projects: Vec<ProjectCost>,
}

pub(crate) async fn costs(State(state): State<AppState>) -> Response {
    let records = state.status.builds();
    Json(CostsAnswer {
        currency: state.status_page.currency.clone(),
        projects: costs_by_project(&records),
    })
    .into_response()
}

/// `GET /api/v1/warm`.
#[derive(Debug, Serialize)]
struct WarmAnswer {
    currency: String,
    /// Each warm pool: floor, idle, starting and busy members, refills, hits, misses, and
    /// what its idle members cost since midnight UTC (`null`: nothing is priced).
    pools: Vec<crate::coordinator::PoolView>,
    /// How long the latest cold builds of each image waited for their pod (launch → running),
    /// in seconds: what a pool for that image would save.
    cold_waits: Vec<crate::coordinator::ColdWaitView>,
}

pub(crate) async fn warm(State(state): State<AppState>) -> Response {
    Json(WarmAnswer {
        currency: state.status_page.currency.clone(),
        pools: state.status.warm_pools(),
        cold_waits: state.status.cold_waits(),
    })
    .into_response()
}

/// Settings of the status page.
#[derive(Debug, Clone)]
pub struct StatusPage {
    /// Who may read it.
    pub access: StatusAccess,
    /// How often the page reloads itself (zero: never).
    pub refresh: std::time::Duration,
    /// The currency of costs (`[cost] currency`).
    pub currency: String,
}

impl Default for StatusPage {
    fn default() -> Self {
        Self {
            access: StatusAccess::default(),
            refresh: std::time::Duration::from_secs(15),
            currency: "USD".into(),
        }
    }
}
