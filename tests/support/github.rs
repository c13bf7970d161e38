//! An in-process GitHub (Actions runs, jobs and self-hosted runners over REST, App and PAT auth, `workflow_job` webhooks) for tests to drive and inspect.
//!
//! It follows GitHub's REST docs and `shared/reference/jenkins-and-github.md`, not any client:
//! App JWTs checked against the App's public key and GitHub's `iat`/`exp` limits, installation
//! tokens that expire, fine-grained permissions, `Link` pagination, just-in-time runners that
//! take one job and are gone, zombies that never connected, rate-limit headers on every answer.
//! The Actions runner does not talk REST to GitHub but to its broker; the test-only
//! `/_test/runner/…` endpoints stand in for that, spoken by `fake-actions-runner`
//! ([`fake_runner_bin`]). Jobs run for as long and end as the test decided in [`JobSpec`].
//!
//! Submodules: `gate` (authentication, rate limits, the request log), `keys` (RSA keys and
//! JWTs), `apps` (App auth, installations, repository lists),
//! `actions` (runs and jobs), `runners` (JIT configs, runners, matching), `broker` (what the
//! stand-in talks to, and [`FakeRunner`]), `webhooks`.

// Refusals are whole HTTP responses, built at most once per request; boxing them buys nothing.
#![allow(clippy::result_large_err)]

mod actions;
mod apps;
mod broker;
mod gate;
mod keys;
mod runners;
mod webhooks;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use gate::{Caller, RateState};

// What tests name; a test binary that names none of it would warn.
#[allow(unused_imports)]
pub use broker::{FakeRunner, fake_runner_bin};
#[allow(unused_imports)]
pub use keys::{RsaKey, app_jwt};
#[allow(unused_imports)]
pub use webhooks::{DeliveryFault, DeliveryRecord, sign_webhook};

/// What every error body links to when no page is more specific.
const DOCS: &str = "https://docs.github.com/rest";
/// GitHub's documented default and maximum `per_page`.
const DEFAULT_PER_PAGE: usize = 30;
const MAX_PER_PAGE: usize = 100;
/// Installation tokens live an hour unless a test says otherwise.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// The primary rate limit of PATs and installations, and of anonymous callers.
const DEFAULT_RATE_LIMIT: u64 = 5000;
const ANONYMOUS_RATE_LIMIT: u64 = 60;
/// The default runner group every organization (and repository) has.
pub const DEFAULT_RUNNER_GROUP: u64 = 1;

/// How a request authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    /// No `Authorization` header.
    Anonymous,
    /// A (fine-grained) personal access token.
    Pat,
    /// An App's JWT.
    AppJwt,
    /// An installation access token.
    Installation,
    /// A credential that matched nothing, had expired or was malformed (answered 401).
    Invalid,
}

/// One REST request as the server answered it (the `/_test/` runner endpoints are not recorded).
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    /// The path with the query string.
    pub path: String,
    pub status: u16,
    pub auth: AuthKind,
    /// The installation whose token was used, or whose token a JWT asked for.
    pub installation: Option<u64>,
    pub at: SystemTime,
}

/// What a credential may reach: the repositories of its owner (all, or some by name) and its
/// fine-grained permissions (`actions`, `administration`, `organization_self_hosted_runners`,
/// `metadata` → `read` / `write`).
#[derive(Debug, Clone)]
pub struct Access {
    repos: Option<Vec<String>>,
    permissions: BTreeMap<String, String>,
    /// A personal access token (classic): its OAuth scopes (`repo`, `manage_runners:enterprise`…)
    /// instead of fine-grained permissions; `None` for every other credential.
    classic_scopes: Option<Vec<String>>,
}

impl Access {
    /// Every repository of the owner, with what kiln needs: Actions and Administration write,
    /// organization self-hosted runners write, metadata read.
    pub fn all() -> Self {
        let permissions = [
            ("actions", "write"),
            ("administration", "write"),
            ("organization_self_hosted_runners", "write"),
            ("metadata", "read"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        Self {
            repos: None,
            permissions,
            classic_scopes: None,
        }
    }

    /// A personal access token (classic) with these OAuth scopes: it reaches what its user
    /// may (the repositories of the organizations of the enterprises the user administers).
    pub fn classic(scopes: &[&str]) -> Self {
        Self {
            repos: None,
            permissions: BTreeMap::new(),
            classic_scopes: Some(scopes.iter().map(|s| (*s).to_owned()).collect()),
        }
    }

    fn has_scope(&self, scope: &str) -> bool {
        self.classic_scopes
            .as_ref()
            .is_some_and(|scopes| scopes.iter().any(|s| s == scope))
    }

    /// Only these repositories of the owner (by name), with the permissions of [`Access::all`].
    pub fn repos(names: &[&str]) -> Self {
        Self {
            repos: Some(names.iter().map(|n| n.to_ascii_lowercase()).collect()),
            ..Self::all()
        }
    }

    /// Sets one permission to `read`, `write`, or `none` (removed).
    pub fn permission(mut self, name: &str, level: &str) -> Self {
        if level == "none" {
            self.permissions.remove(name);
        } else {
            self.permissions.insert(name.to_owned(), level.to_owned());
        }
        self
    }

    fn allows(&self, permission: &str, level: Level) -> bool {
        match self.permissions.get(permission).map(String::as_str) {
            Some("write") | Some("admin") => true,
            Some("read") => level == Level::Read,
            _ => false,
        }
    }

    fn covers(&self, repo_name: &str) -> bool {
        self.repos
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n.eq_ignore_ascii_case(repo_name)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Read,
    Write,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Read => "read",
            Level::Write => "write",
        }
    }
}

/// One job of a run, as the test wants it to go.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub name: String,
    /// The job's `runs-on` labels.
    pub labels: Vec<String>,
    /// How long the runner "runs" it once it has it.
    pub duration: Duration,
    /// What it ends with (`success`, `failure`, `cancelled`…).
    pub conclusion: String,
    /// Runs until the test calls [`GitHubServer::finish_job`] instead of for `duration`.
    pub hold: bool,
}

impl JobSpec {
    /// A job that succeeds at once once a runner has it.
    pub fn new(name: &str, labels: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            duration: Duration::ZERO,
            conclusion: "success".to_owned(),
            hold: false,
        }
    }

    pub fn runs_for(mut self, duration: Duration) -> Self {
        self.duration = duration;
        self
    }

    pub fn concludes(mut self, conclusion: &str) -> Self {
        self.conclusion = conclusion.to_owned();
        self
    }

    /// Runs until [`GitHubServer::finish_job`].
    pub fn held(mut self) -> Self {
        self.hold = true;
        self
    }
}

/// A workflow run to queue.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub workflow_name: String,
    pub head_sha: String,
    pub head_branch: String,
    pub jobs: Vec<JobSpec>,
}

impl RunSpec {
    pub fn new(workflow_name: &str) -> Self {
        let mut sha = [0u8; 20];
        rand::rng().fill(&mut sha);
        Self {
            workflow_name: workflow_name.to_owned(),
            head_sha: hex::encode(sha),
            head_branch: "main".to_owned(),
            jobs: Vec::new(),
        }
    }

    pub fn job(mut self, job: JobSpec) -> Self {
        self.jobs.push(job);
        self
    }
}

/// The ids of a queued run.
#[derive(Debug, Clone)]
pub struct QueuedRun {
    pub run_id: u64,
    pub job_ids: Vec<u64>,
}

/// A job as the server holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub id: u64,
    pub run_id: u64,
    pub run_attempt: u32,
    pub name: String,
    /// `owner/repo`.
    pub repo: String,
    pub labels: Vec<String>,
    /// `queued`, `in_progress` or `completed`.
    pub status: String,
    pub conclusion: Option<String>,
    pub runner_id: Option<u64>,
    pub runner_name: Option<String>,
}

/// Why a runner left the runners list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// `DELETE …/actions/runners/{id}`.
    Deleted,
    /// Its one job ended (JIT runners are ephemeral).
    AfterJob,
}

/// A runner ever registered with a JIT config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerRecord {
    pub id: u64,
    pub name: String,
    /// `repo owner/name` or `org name`.
    pub scope: String,
    pub group_id: u64,
    /// The custom labels it was registered with.
    pub labels: Vec<String>,
    pub work_folder: String,
    /// `online` while its runner is connected, else `offline`.
    pub status: String,
    pub busy: bool,
    /// Whether a runner ever connected with its JIT config.
    pub connected: bool,
    /// The job it was given.
    pub job_id: Option<u64>,
    pub removed: Option<Removal>,
}

/// An installation token as minted.
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub token: String,
    pub installation_id: u64,
    pub expires_at: SystemTime,
}

#[derive(Debug)]
struct Account {
    id: u64,
    login: String,
    org: bool,
}

/// An enterprise account: its organizations and the users who administer it.
#[derive(Debug)]
struct Enterprise {
    id: u64,
    slug: String,
    /// Organization logins, lower-case.
    orgs: Vec<String>,
    /// User logins, lower-case.
    admins: Vec<String>,
}

#[derive(Debug)]
struct Repo {
    id: u64,
    owner: String,
    name: String,
}

impl Repo {
    fn full_name(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }
}

struct Pat {
    owner: String,
    access: Access,
}

struct App {
    id: u64,
    client_id: String,
    slug: String,
    key: RsaKey,
}

struct Installation {
    id: u64,
    app_id: u64,
    account: String,
    access: Access,
    created_at: SystemTime,
}

struct Token {
    installation_id: u64,
    access: Access,
    expires_at: SystemTime,
}

struct RunnerGroup {
    name: String,
    /// GitHub-hosted groups cannot take self-hosted runners (403).
    hosted: bool,
    /// Repository ids the group may serve; `None`: all of the organization's.
    repos: Option<Vec<u64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobStatus {
    Queued,
    InProgress,
    Completed,
}

impl JobStatus {
    fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::InProgress => "in_progress",
            JobStatus::Completed => "completed",
        }
    }
}

struct Run {
    id: u64,
    repo: u64,
    workflow_id: u64,
    workflow_name: String,
    head_sha: String,
    head_branch: String,
    run_number: u64,
    attempt: u32,
    created_at: SystemTime,
    updated_at: SystemTime,
    /// Every job of every attempt, in creation order.
    jobs: Vec<u64>,
}

struct Job {
    id: u64,
    run_id: u64,
    repo: u64,
    attempt: u32,
    spec: JobSpec,
    status: JobStatus,
    conclusion: Option<String>,
    created_at: SystemTime,
    started_at: Option<SystemTime>,
    completed_at: Option<SystemTime>,
    runner_id: Option<u64>,
    /// The conclusion a held job was finished with by the test.
    released: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    Repo(u64),
    /// The organization's login, lower-case.
    Org(String),
    /// The enterprise's slug, lower-case.
    Enterprise(String),
}

struct Runner {
    id: u64,
    name: String,
    scope: Scope,
    group_id: u64,
    labels: Vec<String>,
    work_folder: String,
    secret: String,
    created_at: SystemTime,
    session: Option<String>,
    connected: bool,
    job: Option<u64>,
    removed: Option<Removal>,
}

struct ServerState {
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    base: String,
    next_id: u64,
    accounts: BTreeMap<String, Account>,
    /// By slug, lower-case.
    enterprises: BTreeMap<String, Enterprise>,
    repos: BTreeMap<u64, Repo>,
    pats: HashMap<String, Pat>,
    apps: BTreeMap<u64, App>,
    installations: BTreeMap<u64, Installation>,
    tokens: HashMap<String, Token>,
    minted: Vec<TokenRecord>,
    token_lifetime: Duration,
    /// (organization login lower-case, group id) → group; group 1 is implied.
    groups: BTreeMap<(String, u64), RunnerGroup>,
    runs: BTreeMap<u64, Run>,
    jobs: BTreeMap<u64, Job>,
    runners: BTreeMap<u64, Runner>,
    next_runner_id: u64,
    /// Label name (lower-case) → label id, as GitHub numbers labels.
    label_ids: BTreeMap<String, u64>,
    jit_ttl: Option<Duration>,
    /// How long answers to run and job listings are held back after they were taken (a slow
    /// GitHub, or a large organization's reconcile in flight): the answer is as of the request.
    listing_delay: Duration,
    webhooks: webhooks::WebhookState,
    rate: RateState,
    requests: Vec<RequestRecord>,
}

struct Shared {
    state: Mutex<ServerState>,
    /// Bumped on every change runners wait on (jobs assigned, finished, runners deleted).
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.state.lock().unwrap()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

/// A GitHub on `127.0.0.1`, serving until dropped.
pub struct GitHubServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

/// Dropping stops accepting and closes idle keep-alive connections; requests in flight are answered.
impl Drop for GitHubServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

impl GitHubServer {
    /// Binds a free port and serves on the current tokio runtime, with no accounts.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (outbox, outgoing) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(ServerState {
                base: format!("http://{addr}"),
                next_id: 1,
                accounts: BTreeMap::new(),
                repos: BTreeMap::new(),
                pats: HashMap::new(),
                apps: BTreeMap::new(),
                installations: BTreeMap::new(),
                tokens: HashMap::new(),
                minted: Vec::new(),
                token_lifetime: DEFAULT_TOKEN_LIFETIME,
                groups: BTreeMap::new(),
                enterprises: BTreeMap::new(),
                runs: BTreeMap::new(),
                jobs: BTreeMap::new(),
                runners: BTreeMap::new(),
                next_runner_id: 101,
                label_ids: BTreeMap::new(),
                jit_ttl: None,
                listing_delay: Duration::ZERO,
                webhooks: webhooks::WebhookState::new(outbox),
                rate: RateState::default(),
                requests: Vec::new(),
            }),
            changed: watch::channel(0).0,
        });
        tokio::spawn(webhooks::deliver(shared.clone(), outgoing));
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

    /// `http://127.0.0.1:PORT`, without a trailing slash: the API base URL (as
    /// `https://api.github.com` or a GHES `https://HOST/api/v3`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.shared.lock()
    }

    /// Adds an organization; returns its id.
    pub fn add_org(&self, login: &str) -> u64 {
        self.lock().account(login, true)
    }

    /// Adds a user account; returns its id.
    pub fn add_user(&self, login: &str) -> u64 {
        self.lock().account(login, false)
    }

    /// Adds repository `owner/name` (the owner becomes an organization unless it is already
    /// known); returns its id.
    pub fn add_repo(&self, full_name: &str) -> u64 {
        let (owner, name) = full_name
            .split_once('/')
            .expect("add_repo: want owner/name");
        let mut st = self.lock();
        st.account(owner, true);
        let owner = st.accounts[&owner.to_ascii_lowercase()].login.clone();
        if let Some(repo) = st.find_repo(&owner, name) {
            return repo.id;
        }
        let id = st.id();
        st.repos.insert(
            id,
            Repo {
                id,
                owner,
                name: name.to_owned(),
            },
        );
        id
    }

    /// Adds enterprise `slug` owning organizations `orgs` (made if new), administered by users
    /// `admins` (whose classic tokens reach the enterprise and its organizations' repositories).
    pub fn add_enterprise(&self, slug: &str, orgs: &[&str], admins: &[&str]) {
        let mut st = self.lock();
        for org in orgs {
            st.account(org, true);
        }
        for admin in admins {
            st.account(admin, false);
        }
        let id = st.id();
        st.enterprises.insert(
            slug.to_ascii_lowercase(),
            Enterprise {
                id,
                slug: slug.to_owned(),
                orgs: orgs.iter().map(|o| o.to_ascii_lowercase()).collect(),
                admins: admins.iter().map(|a| a.to_ascii_lowercase()).collect(),
            },
        );
    }

    /// Answers to `GET …/actions/runs` and `GET …/actions/runs/{id}/jobs` (the listings a
    /// reconcile walks) are taken at once and sent `delay` later: what a client acts on is
    /// that old by the time it arrives, and a reconcile over many runs is long in flight.
    pub fn delay_listings(&self, delay: Duration) {
        self.lock().listing_delay = delay;
    }

    /// Every REST request answered, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }
}

impl ServerState {
    fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn account(&mut self, login: &str, org: bool) -> u64 {
        let key = login.to_ascii_lowercase();
        if let Some(a) = self.accounts.get(&key) {
            return a.id;
        }
        let id = self.id();
        self.accounts.insert(
            key,
            Account {
                id,
                login: login.to_owned(),
                org,
            },
        );
        id
    }

    fn find_account(&self, login: &str) -> Option<&Account> {
        self.accounts.get(&login.to_ascii_lowercase())
    }

    /// The enterprise organization `org` belongs to.
    fn enterprise_of(&self, org: &str) -> Option<&Enterprise> {
        let org = org.to_ascii_lowercase();
        self.enterprises.values().find(|e| e.orgs.contains(&org))
    }

    fn find_repo(&self, owner: &str, name: &str) -> Option<&Repo> {
        self.repos
            .values()
            .find(|r| r.owner.eq_ignore_ascii_case(owner) && r.name.eq_ignore_ascii_case(name))
    }

    fn label_id(&mut self, name: &str) -> u64 {
        let next = self.label_ids.len() as u64 + 1;
        *self
            .label_ids
            .entry(name.to_ascii_lowercase())
            .or_insert(next)
    }

    fn job_record(&self, job: &Job) -> JobRecord {
        JobRecord {
            id: job.id,
            run_id: job.run_id,
            run_attempt: job.attempt,
            name: job.spec.name.clone(),
            repo: self.repos[&job.repo].full_name(),
            labels: job.spec.labels.clone(),
            status: job.status.as_str().to_owned(),
            conclusion: job.conclusion.clone(),
            runner_id: job.runner_id,
            runner_name: job
                .runner_id
                .and_then(|id| self.runners.get(&id))
                .map(|r| r.name.clone()),
        }
    }

    fn runner_record(&self, r: &Runner) -> RunnerRecord {
        RunnerRecord {
            id: r.id,
            name: r.name.clone(),
            scope: match &r.scope {
                Scope::Repo(id) => format!("repo {}", self.repos[id].full_name()),
                Scope::Org(org) => format!("org {}", self.accounts[org].login),
                Scope::Enterprise(slug) => format!("enterprise {}", self.enterprises[slug].slug),
            },
            group_id: r.group_id,
            labels: r.labels.clone(),
            work_folder: r.work_folder.clone(),
            status: if r.session.is_some() {
                "online"
            } else {
                "offline"
            }
            .to_owned(),
            busy: self.runner_busy(r),
            connected: r.connected,
            job_id: r.job,
            removed: r.removed,
        }
    }

    fn runner_busy(&self, r: &Runner) -> bool {
        r.job
            .and_then(|id| self.jobs.get(&id))
            .is_some_and(|j| j.status == JobStatus::InProgress)
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .merge(apps::routes())
        .merge(actions::routes())
        .merge(runners::routes())
        .merge(broker::routes())
        .fallback(|| async { not_found() })
        .layer(middleware::from_fn_with_state(shared.clone(), gate::gate))
        .with_state(shared)
}

type Srv = axum::extract::State<Arc<Shared>>;

/// GitHub's error body: `{message, documentation_url, status}`.
fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({
            "message": message,
            "documentation_url": DOCS,
            "status": status.as_u16().to_string(),
        })),
    )
        .into_response()
}

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "Not Found")
}

fn unauthorized(message: &str) -> Response {
    error(StatusCode::UNAUTHORIZED, message)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// ISO 8601 in UTC with seconds, as GitHub writes timestamps.
fn ts(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// One page of `items` as GitHub pages: `per_page` (default 30, at most 100) and `page` (from
/// 1), with a `Link` header naming `next`/`last` and, past the first page, `first`/`prev`.
fn paginate<T: Clone>(
    items: &[T],
    base: &str,
    uri: &Uri,
    query: &HashMap<String, String>,
) -> (Vec<T>, Option<HeaderValue>) {
    let per_page = query
        .get("per_page")
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_PER_PAGE)
        .min(MAX_PER_PAGE);
    let page = query
        .get("page")
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1);
    let pages = items.len().div_ceil(per_page).max(1);
    let from = (page - 1).saturating_mul(per_page).min(items.len());
    let to = (from + per_page).min(items.len());
    let link_to = |n: usize| {
        let mut pairs: Vec<(String, String)> =
            url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .filter(|(k, _)| k != "page")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        pairs.push(("page".to_owned(), n.to_string()));
        let query = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        format!("<{base}{}?{query}>", uri.path())
    };
    let mut links = Vec::new();
    if page > 1 {
        links.push(format!("{}; rel=\"prev\"", link_to((page - 1).min(pages))));
    }
    if page < pages {
        links.push(format!("{}; rel=\"next\"", link_to(page + 1)));
        links.push(format!("{}; rel=\"last\"", link_to(pages)));
    }
    if page > 1 {
        links.push(format!("{}; rel=\"first\"", link_to(1)));
    }
    let link = (!links.is_empty()).then(|| HeaderValue::from_str(&links.join(", ")).unwrap());
    (items[from..to].to_vec(), link)
}

/// A JSON answer with an optional `Link` header.
fn paged(status: StatusCode, body: Value, link: Option<HeaderValue>) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    if let Some(link) = link {
        response.headers_mut().insert(header::LINK, link);
    }
    response
}

/// `account` as GitHub's simple-user object (octocrab's `Author`).
fn account_json(base: &str, account: &Account) -> Value {
    let login = &account.login;
    let user = format!("{base}/users/{login}");
    json!({
        "login": login,
        "id": account.id,
        "node_id": format!("MDQ6VXNlcn{}", account.id),
        "avatar_url": format!("https://avatars.githubusercontent.com/u/{}?v=4", account.id),
        "gravatar_id": "",
        "url": user,
        "html_url": format!("https://github.com/{login}"),
        "followers_url": format!("{user}/followers"),
        "following_url": format!("{user}/following{{/other_user}}"),
        "gists_url": format!("{user}/gists{{/gist_id}}"),
        "starred_url": format!("{user}/starred{{/owner}}{{/repo}}"),
        "subscriptions_url": format!("{user}/subscriptions"),
        "organizations_url": format!("{user}/orgs"),
        "repos_url": format!("{user}/repos"),
        "events_url": format!("{user}/events{{/privacy}}"),
        "received_events_url": format!("{user}/received_events"),
        "type": if account.org { "Organization" } else { "User" },
        "user_view_type": "public",
        "site_admin": false,
    })
}

fn repo_json(st: &ServerState, repo: &Repo) -> Value {
    let owner = st.find_account(&repo.owner).expect("repo owner exists");
    let url = format!("{}/repos/{}", st.base, repo.full_name());
    json!({
        "id": repo.id,
        "node_id": format!("R_kgDO{:08}", repo.id),
        "name": repo.name,
        "full_name": repo.full_name(),
        "private": true,
        "owner": account_json(&st.base, owner),
        "html_url": format!("https://github.com/{}", repo.full_name()),
        "description": null,
        "fork": false,
        "url": url,
        "hooks_url": format!("{url}/hooks"),
        "default_branch": "main",
        "visibility": "private",
    })
}

/// Where the helper binaries of the tests are: `target/debug/` (the `kiln` binary's directory).
/// `target/<profile>`: beside the kiln binary of an integration test, or above the
/// `examples/` directory of an example program (the benchmark), which has no
/// `CARGO_BIN_EXE_kiln`.
fn target_dir() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_kiln") {
        Some(kiln) => Path::new(kiln)
            .parent()
            .expect("kiln binary has a directory")
            .to_path_buf(),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.to_path_buf()))
            .expect("the example runs from target/<profile>/examples"),
    }
}
