//! Self-hosted runners: `generate-jitconfig`, the runners lists and deletes, and how queued jobs find runners.
//!
//! The encoded JIT config is base64 of a JSON object mapping file names to base64 file contents,
//! shaped like the real runner's (`.runner`, `.credentials`) but understood only by
//! `fake-actions-runner`: `.runner` holds `{agentId, agentName, poolId, serverUrl, gitHubUrl,
//! workFolder, ephemeral}` (`serverUrl` is this server's `/_test/runner`), `.credentials` holds
//! `{scheme: "KilnTestRunner", data: {runnerId, secret}}` — a per-runner secret, never the
//! caller's PAT or App credentials.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::Rng;
use serde_json::{Value, json};

use super::{
    Caller, DEFAULT_RUNNER_GROUP, GitHubServer, Job, JobStatus, Level, Removal, Runner,
    RunnerGroup, RunnerRecord, Scope, ServerState, Shared, Srv, error, not_found, paged, paginate,
};

pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/orgs/{org}/actions/runner-groups", get(org_runner_groups))
        .route(
            "/enterprises/{enterprise}/actions/runner-groups",
            get(enterprise_runner_groups),
        )
        .route(
            "/enterprises/{enterprise}/actions/runners/generate-jitconfig",
            post(enterprise_jitconfig),
        )
        .route(
            "/enterprises/{enterprise}/actions/runners",
            get(enterprise_runners),
        )
        .route(
            "/enterprises/{enterprise}/actions/runners/{id}",
            get(enterprise_runner).delete(delete_enterprise_runner),
        )
        .route(
            "/orgs/{org}/actions/runner-groups/{id}/repositories",
            get(runner_group_repos),
        )
        .route(
            "/repos/{owner}/{repo}/actions/runners/generate-jitconfig",
            post(repo_jitconfig),
        )
        .route(
            "/orgs/{org}/actions/runners/generate-jitconfig",
            post(org_jitconfig),
        )
        .route("/repos/{owner}/{repo}/actions/runners", get(repo_runners))
        .route("/orgs/{org}/actions/runners", get(org_runners))
        .route(
            "/repos/{owner}/{repo}/actions/runners/{id}",
            get(repo_runner).delete(delete_repo_runner),
        )
        .route(
            "/orgs/{org}/actions/runners/{id}",
            get(org_runner).delete(delete_org_runner),
        )
}

impl ServerState {
    pub(super) fn group_name(&self, scope: &Scope, group_id: u64) -> String {
        match scope {
            Scope::Org(org) | Scope::Enterprise(org) => self
                .groups
                .get(&(org.clone(), group_id))
                .map_or_else(|| "Default".to_owned(), |g| g.name.clone()),
            Scope::Repo(_) => "Default".to_owned(),
        }
    }

    /// Whether runner `r` may take `job`: the job's repository is in the runner's scope (and
    /// runner group), and every `runs-on` label is one of the runner's, case-insensitively. A
    /// JIT runner has exactly the labels of its JIT call: GitHub adds none (not even
    /// `self-hosted`; `config.sh` adds the default labels, JIT does not).
    fn takes(&self, r: &Runner, job: &Job) -> bool {
        let in_scope = match &r.scope {
            Scope::Repo(id) => *id == job.repo,
            Scope::Org(org) => {
                self.repos[&job.repo].owner.eq_ignore_ascii_case(org)
                    && self
                        .groups
                        .get(&(org.clone(), r.group_id))
                        .and_then(|g| g.repos.as_ref())
                        .is_none_or(|repos| repos.contains(&job.repo))
            }
            // Enterprise groups select organizations; the default group serves all of them.
            Scope::Enterprise(slug) => self
                .enterprise_of(&self.repos[&job.repo].owner)
                .is_some_and(|e| e.slug.eq_ignore_ascii_case(slug)),
        };
        in_scope
            && job
                .spec
                .labels
                .iter()
                .all(|label| r.labels.iter().any(|l| l.eq_ignore_ascii_case(label)))
    }

    /// Gives each queued job, oldest first, to an idle connected runner that takes it.
    pub(super) fn schedule(&mut self) {
        let queued: Vec<u64> = self
            .jobs
            .values()
            .filter(|j| j.status == JobStatus::Queued)
            .map(|j| j.id)
            .collect();
        for job_id in queued {
            let runner = self
                .runners
                .values()
                .find(|r| {
                    r.session.is_some()
                        && r.removed.is_none()
                        && r.job.is_none()
                        && self.takes(r, &self.jobs[&job_id])
                })
                .map(|r| r.id);
            let Some(runner_id) = runner else {
                continue;
            };
            self.runners.get_mut(&runner_id).unwrap().job = Some(job_id);
            let job = self.jobs.get_mut(&job_id).unwrap();
            job.status = JobStatus::InProgress;
            job.started_at = Some(SystemTime::now());
            job.runner_id = Some(runner_id);
            let run_id = job.run_id;
            self.runs.get_mut(&run_id).unwrap().updated_at = SystemTime::now();
            self.emit(job_id, "in_progress");
        }
    }

    /// Ends the runner's job with `conclusion`; the ephemeral runner is removed.
    pub(super) fn finish(&mut self, runner_id: u64, conclusion: &str) {
        let runner = self.runners.get_mut(&runner_id).unwrap();
        runner.removed = Some(Removal::AfterJob);
        runner.session = None;
        let Some(job_id) = runner.job else {
            return;
        };
        let job = self.jobs.get_mut(&job_id).unwrap();
        if job.status != JobStatus::InProgress {
            return;
        }
        job.status = JobStatus::Completed;
        job.conclusion = Some(conclusion.to_owned());
        job.completed_at = Some(SystemTime::now());
        let run_id = job.run_id;
        self.runs.get_mut(&run_id).unwrap().updated_at = SystemTime::now();
        self.emit(job_id, "completed");
    }

    pub(super) fn lose_runner(&mut self, runner_id: u64) {
        let Some(runner) = self.runners.get(&runner_id) else {
            return;
        };
        if self.runner_busy(runner) {
            self.finish(runner_id, "failure");
        } else if let Some(runner) = self.runners.get_mut(&runner_id) {
            runner.session = None;
        }
    }

    fn runner_json(&self, r: &Runner) -> Value {
        // Exactly the labels of the JIT call, all custom: the read-only default labels are
        // those `config.sh` adds, and a JIT runner gets none.
        let labels: Vec<Value> = r
            .labels
            .iter()
            .map(|l| json!({"id": self.label_ids[&l.to_ascii_lowercase()], "name": l, "type": "custom"}))
            .collect();
        json!({
            "id": r.id,
            "name": r.name,
            "os": if r.connected { "Linux" } else { "unknown" },
            "status": if r.session.is_some() { "online" } else { "offline" },
            "busy": self.runner_busy(r),
            "ephemeral": true,
            "runner_group_id": r.group_id,
            "labels": labels,
        })
    }

    fn scoped_runners(&self, scope: &Scope, name: Option<&str>) -> Vec<&Runner> {
        self.runners
            .values()
            .filter(|r| r.removed.is_none() && r.scope == *scope)
            .filter(|r| name.is_none_or(|n| r.name.eq_ignore_ascii_case(n)))
            .collect()
    }

    /// `generate-jitconfig` for `scope`: validates the body, registers the runner offline.
    fn register(&mut self, scope: Scope, body: &[u8]) -> Response {
        let Ok(body) = serde_json::from_slice::<Value>(body) else {
            return error(StatusCode::BAD_REQUEST, "Problems parsing JSON");
        };
        let request = match JitRequest::parse(&body) {
            Ok(request) => request,
            Err(message) => return error(StatusCode::UNPROCESSABLE_ENTITY, &message),
        };
        if let Err(refusal) = self.check_group(&scope, request.runner_group_id) {
            return refusal;
        }
        if !self.scoped_runners(&scope, Some(&request.name)).is_empty() {
            return error(
                StatusCode::CONFLICT,
                &format!(
                    "Already exists - A runner with the name {} already exists.",
                    request.name
                ),
            );
        }
        for label in &request.labels {
            self.label_id(label);
        }
        let id = self.next_runner_id;
        self.next_runner_id += 1;
        let mut secret = [0u8; 24];
        rand::rng().fill(&mut secret);
        let github_url = match &scope {
            Scope::Repo(repo) => format!("https://github.com/{}", self.repos[repo].full_name()),
            Scope::Org(org) => format!("https://github.com/{}", self.accounts[org].login),
            Scope::Enterprise(slug) => {
                format!(
                    "https://github.com/enterprises/{}",
                    self.enterprises[slug].slug
                )
            }
        };
        let runner = Runner {
            id,
            name: request.name,
            scope,
            group_id: request.runner_group_id,
            labels: request.labels,
            work_folder: request.work_folder,
            secret: hex::encode(secret),
            created_at: SystemTime::now(),
            session: None,
            connected: false,
            job: None,
            removed: None,
        };
        let encoded = encode_jit_config(&self.base, &github_url, &runner);
        let body = json!({"runner": self.runner_json(&runner), "encoded_jit_config": encoded});
        self.runners.insert(id, runner);
        (StatusCode::CREATED, axum::Json(body)).into_response()
    }

    /// Group 1 always exists; other groups are the organization's. A GitHub-hosted group
    /// answers 403, an unknown one 404.
    fn check_group(&self, scope: &Scope, group_id: u64) -> Result<(), Response> {
        if group_id == DEFAULT_RUNNER_GROUP {
            return Ok(());
        }
        let org = match scope {
            Scope::Org(org) | Scope::Enterprise(org) => org.clone(),
            Scope::Repo(repo) => self.repos[repo].owner.to_ascii_lowercase(),
        };
        match self.groups.get(&(org, group_id)) {
            Some(g) if g.hosted => Err(error(
                StatusCode::FORBIDDEN,
                "GitHub hosted runner groups cannot be modified",
            )),
            Some(_) if matches!(scope, Scope::Org(_) | Scope::Enterprise(_)) => Ok(()),
            _ => Err(not_found()),
        }
    }
}

/// `GET /orgs/{org}/actions/runner-groups`: the default group (id 1, visible to all
/// repositories) and the organization's others, with their visibility.
async fn org_runner_groups(
    s: Srv,
    Path(org): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    let org = match caller.org(&st, &org, "organization_self_hosted_runners", Level::Read) {
        Ok(org) => org,
        Err(refusal) => return refusal,
    };
    let base = format!("{}/orgs/{org}/actions/runner-groups", st.base);
    let group = |id: u64, name: &str, visibility: &str, hosted: bool| {
        json!({
            "id": id,
            "name": name,
            "visibility": visibility,
            "default": id == DEFAULT_RUNNER_GROUP,
            "runners_url": format!("{base}/{id}/runners"),
            "selected_repositories_url": (visibility == "selected").then(|| format!("{base}/{id}/repositories")),
            "inherited": false,
            "allows_public_repositories": false,
            "restricted_to_workflows": false,
            "selected_workflows": [],
            "workflow_restrictions_read_only": false,
            "hosted_runners_url": hosted.then(|| format!("{base}/{id}/hosted-runners")),
        })
    };
    let mut groups = vec![group(DEFAULT_RUNNER_GROUP, "Default", "all", false)];
    groups.extend(
        st.groups
            .iter()
            .filter(|((o, _), _)| *o == org)
            .map(|((_, id), g)| {
                let visibility = if g.repos.is_some() { "selected" } else { "all" };
                group(*id, &g.name, visibility, g.hosted)
            }),
    );
    let (page, link) = paginate(&groups, &st.base, &uri, &q);
    paged(
        StatusCode::OK,
        json!({"total_count": groups.len(), "runner_groups": page}),
        link,
    )
}

/// `GET /orgs/{org}/actions/runner-groups/{id}/repositories`: the repositories a group of
/// visibility `selected` serves.
async fn runner_group_repos(
    s: Srv,
    Path((org, id)): Path<(String, u64)>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    let org = match caller.org(&st, &org, "organization_self_hosted_runners", Level::Read) {
        Ok(org) => org,
        Err(refusal) => return refusal,
    };
    let Some(group) = st.groups.get(&(org, id)) else {
        return not_found();
    };
    let repos: Vec<Value> = group
        .repos
        .iter()
        .flatten()
        .filter_map(|repo| st.repos.get(repo))
        .map(|repo| super::repo_json(&st, repo))
        .collect();
    let (page, link) = paginate(&repos, &st.base, &uri, &q);
    paged(
        StatusCode::OK,
        json!({"total_count": repos.len(), "repositories": page}),
        link,
    )
}

struct JitRequest {
    name: String,
    runner_group_id: u64,
    labels: Vec<String>,
    work_folder: String,
}

impl JitRequest {
    /// The body as GitHub validates it; the missing-key text is GitHub's, the others this fake's.
    fn parse(body: &Value) -> Result<Self, String> {
        let Some(object) = body.as_object() else {
            return Err("Invalid input: the request body must be an object".to_owned());
        };
        for key in ["name", "runner_group_id", "labels"] {
            if !object.contains_key(key) {
                return Err(format!(
                    "Invalid input: object is missing required key: {key}"
                ));
            }
        }
        let not_of = |key: &str, kind: &str| format!("Invalid input: {key} is not of type {kind}");
        let name = object["name"]
            .as_str()
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| not_of("name", "string"))?
            .to_owned();
        let runner_group_id = object["runner_group_id"]
            .as_u64()
            .ok_or_else(|| not_of("runner_group_id", "integer"))?;
        let labels: Vec<String> = object["labels"]
            .as_array()
            .ok_or_else(|| not_of("labels", "array"))?
            .iter()
            .map(|l| l.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| not_of("labels", "array of strings"))?;
        if labels.is_empty() || labels.len() > 100 {
            return Err("Invalid input: labels must have between 1 and 100 items".to_owned());
        }
        let work_folder = match object.get("work_folder") {
            None | Some(Value::Null) => "_work".to_owned(),
            Some(Value::String(w)) => w.clone(),
            Some(_) => return Err(not_of("work_folder", "string")),
        };
        Ok(Self {
            name,
            runner_group_id,
            labels,
            work_folder,
        })
    }
}

fn encode_jit_config(base: &str, github_url: &str, r: &Runner) -> String {
    let runner_file = json!({
        "agentId": r.id,
        "agentName": r.name,
        "poolId": r.group_id,
        "serverUrl": format!("{base}/_test/runner"),
        "gitHubUrl": github_url,
        "workFolder": r.work_folder,
        "ephemeral": true,
        "disableUpdate": true,
    });
    let credentials = json!({
        "scheme": "KilnTestRunner",
        "data": {"runnerId": r.id, "secret": r.secret},
    });
    let files = json!({
        ".runner": STANDARD.encode(runner_file.to_string()),
        ".credentials": STANDARD.encode(credentials.to_string()),
    });
    STANDARD.encode(files.to_string())
}

async fn repo_jitconfig(
    s: Srv,
    Path((owner, repo)): Path<(String, String)>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: Bytes,
) -> Response {
    let mut st = s.lock();
    match caller.repo(&st, &owner, &repo, "administration", Level::Write) {
        Ok(id) => st.register(Scope::Repo(id), &body),
        Err(refusal) => refusal,
    }
}

async fn org_jitconfig(
    s: Srv,
    Path(org): Path<String>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: Bytes,
) -> Response {
    let mut st = s.lock();
    match caller.org(&st, &org, "organization_self_hosted_runners", Level::Write) {
        Ok(org) => st.register(Scope::Org(org), &body),
        Err(refusal) => refusal,
    }
}

fn list(st: &ServerState, scope: &Scope, uri: &Uri, q: &HashMap<String, String>) -> Response {
    let runners = st.scoped_runners(scope, q.get("name").map(String::as_str));
    let (page, link) = paginate(&runners, &st.base, uri, q);
    let items: Vec<Value> = page.into_iter().map(|r| st.runner_json(r)).collect();
    paged(
        StatusCode::OK,
        json!({"total_count": runners.len(), "runners": items}),
        link,
    )
}

async fn repo_runners(
    s: Srv,
    Path((owner, repo)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    match caller.repo(&st, &owner, &repo, "administration", Level::Read) {
        Ok(id) => list(&st, &Scope::Repo(id), &uri, &q),
        Err(refusal) => refusal,
    }
}

async fn org_runners(
    s: Srv,
    Path(org): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    match caller.org(&st, &org, "organization_self_hosted_runners", Level::Read) {
        Ok(org) => list(&st, &Scope::Org(org), &uri, &q),
        Err(refusal) => refusal,
    }
}

fn find<'a>(st: &'a ServerState, scope: &Scope, id: &str) -> Result<&'a Runner, Response> {
    id.parse::<u64>()
        .ok()
        .and_then(|id| st.runners.get(&id))
        .filter(|r| r.removed.is_none() && r.scope == *scope)
        .ok_or_else(not_found)
}

async fn repo_runner(
    s: Srv,
    Path((owner, repo, id)): Path<(String, String, String)>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    caller
        .repo(&st, &owner, &repo, "administration", Level::Read)
        .and_then(|repo| find(&st, &Scope::Repo(repo), &id))
        .map_or_else(|e| e, |r| axum::Json(st.runner_json(r)).into_response())
}

async fn org_runner(
    s: Srv,
    Path((org, id)): Path<(String, String)>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    caller
        .org(&st, &org, "organization_self_hosted_runners", Level::Read)
        .and_then(|org| find(&st, &Scope::Org(org), &id))
        .map_or_else(|e| e, |r| axum::Json(st.runner_json(r)).into_response())
}

/// `DELETE …/actions/runners/{id}` → 204; a runner running a job answers 422.
fn delete(s: &Shared, st: &mut ServerState, scope: &Scope, id: &str) -> Response {
    let runner = match find(st, scope, id) {
        Ok(r) => r,
        Err(refusal) => return refusal,
    };
    if st.runner_busy(runner) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!(
                "Bad request - Runner \"{}\" is still running a job",
                runner.name
            ),
        );
    }
    let id = runner.id;
    st.runners.get_mut(&id).unwrap().removed = Some(Removal::Deleted);
    s.bump();
    StatusCode::NO_CONTENT.into_response()
}

async fn delete_repo_runner(
    s: Srv,
    Path((owner, repo, id)): Path<(String, String, String)>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let mut st = s.lock();
    match caller.repo(&st, &owner, &repo, "administration", Level::Write) {
        Ok(repo) => delete(&s, &mut st, &Scope::Repo(repo), &id),
        Err(refusal) => refusal,
    }
}

async fn delete_org_runner(
    s: Srv,
    Path((org, id)): Path<(String, String)>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let mut st = s.lock();
    match caller.org(&st, &org, "organization_self_hosted_runners", Level::Write) {
        Ok(org) => delete(&s, &mut st, &Scope::Org(org), &id),
        Err(refusal) => refusal,
    }
}

/// `GET /enterprises/{enterprise}/actions/runner-groups`: the default group and the
/// enterprise's others (added with [`GitHubServer::add_runner_group`] under the slug).
async fn enterprise_runner_groups(
    s: Srv,
    Path(enterprise): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    let slug = match caller.enterprise(&st, &enterprise) {
        Ok(slug) => slug,
        Err(refusal) => return refusal,
    };
    let base = format!("{}/enterprises/{slug}/actions/runner-groups", st.base);
    let group = |id: u64, name: &str| {
        json!({
            "id": id,
            "name": name,
            "visibility": "all",
            "default": id == DEFAULT_RUNNER_GROUP,
            "runners_url": format!("{base}/{id}/runners"),
            "selected_organizations_url": format!("{base}/{id}/organizations"),
            "allows_public_repositories": false,
            "restricted_to_workflows": false,
            "selected_workflows": [],
            "workflow_restrictions_read_only": false,
        })
    };
    let mut groups = vec![group(DEFAULT_RUNNER_GROUP, "Default")];
    groups.extend(
        st.groups
            .iter()
            .filter(|((o, _), g)| *o == slug && !g.hosted)
            .map(|((_, id), g)| group(*id, &g.name)),
    );
    let (page, link) = paginate(&groups, &st.base, &uri, &q);
    paged(
        StatusCode::OK,
        json!({"total_count": groups.len(), "runner_groups": page}),
        link,
    )
}

async fn enterprise_jitconfig(
    s: Srv,
    Path(enterprise): Path<String>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: Bytes,
) -> Response {
    let mut st = s.lock();
    match caller.enterprise(&st, &enterprise) {
        Ok(slug) => st.register(Scope::Enterprise(slug), &body),
        Err(refusal) => refusal,
    }
}

async fn enterprise_runners(
    s: Srv,
    Path(enterprise): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    match caller.enterprise(&st, &enterprise) {
        Ok(slug) => list(&st, &Scope::Enterprise(slug), &uri, &q),
        Err(refusal) => refusal,
    }
}

async fn enterprise_runner(
    s: Srv,
    Path((enterprise, id)): Path<(String, String)>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    caller
        .enterprise(&st, &enterprise)
        .and_then(|slug| find(&st, &Scope::Enterprise(slug), &id))
        .map_or_else(|e| e, |r| axum::Json(st.runner_json(r)).into_response())
}

async fn delete_enterprise_runner(
    s: Srv,
    Path((enterprise, id)): Path<(String, String)>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let mut st = s.lock();
    match caller.enterprise(&st, &enterprise) {
        Ok(slug) => delete(&s, &mut st, &Scope::Enterprise(slug), &id),
        Err(refusal) => refusal,
    }
}

impl GitHubServer {
    /// Adds runner group `id` to organization `org`; `repos` limits the repositories (by name)
    /// whose jobs its runners may take (`None`: all).
    pub fn add_runner_group(&self, org: &str, id: u64, name: &str, repos: Option<&[&str]>) {
        let mut st = self.lock();
        let repos = repos.map(|names| {
            names
                .iter()
                .map(|n| {
                    st.find_repo(org, n)
                        .unwrap_or_else(|| panic!("add_runner_group: no repo {org}/{n}"))
                        .id
                })
                .collect()
        });
        st.groups.insert(
            (org.to_ascii_lowercase(), id),
            RunnerGroup {
                name: name.to_owned(),
                hosted: false,
                repos,
            },
        );
    }

    /// Adds a GitHub-hosted runner group: registering a self-hosted runner in it answers 403.
    pub fn add_hosted_runner_group(&self, org: &str, id: u64, name: &str) {
        self.lock().groups.insert(
            (org.to_ascii_lowercase(), id),
            RunnerGroup {
                name: name.to_owned(),
                hosted: true,
                repos: None,
            },
        );
    }

    /// What GitHub does when a runner stops answering mid-job (pod evicted, OOM-killed): its
    /// job fails and the ephemeral runner is removed. A runner without a job goes offline.
    pub fn lose_runner(&self, runner_id: u64) {
        let mut st = self.lock();
        st.lose_runner(runner_id);
        drop(st);
        self.shared.bump();
    }

    /// Every runner ever registered, by id, with its current state.
    pub fn runners(&self) -> Vec<RunnerRecord> {
        let st = self.lock();
        st.runners.values().map(|r| st.runner_record(r)).collect()
    }

    /// The runners still registered (what `GET …/actions/runners` lists, over all scopes).
    pub fn registered_runners(&self) -> Vec<RunnerRecord> {
        self.runners()
            .into_iter()
            .filter(|r| r.removed.is_none())
            .collect()
    }

    /// JIT configs not used to connect within `ttl` of their creation are refused by the broker
    /// from then on (`None`, the default: never).
    pub fn set_jit_config_ttl(&self, ttl: Option<Duration>) {
        self.lock().jit_ttl = ttl;
    }
}
