//! Workflow runs and jobs: the test queues them, `GET …/actions/runs` and `…/jobs` list them, `rerun-failed-jobs` makes a new attempt.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::{Path, Query};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::{
    Caller, GitHubServer, Job, JobRecord, JobSpec, JobStatus, Level, QueuedRun, Run, RunSpec,
    ServerState, Shared, Srv, account_json, error, not_found, paged, paginate, repo_json, ts,
};

pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/repos/{owner}/{repo}/actions/runs", get(list_runs))
        .route("/repos/{owner}/{repo}/actions/runs/{run_id}", get(get_run))
        .route(
            "/repos/{owner}/{repo}/actions/runs/{run_id}/jobs",
            get(list_jobs),
        )
        .route(
            "/repos/{owner}/{repo}/actions/runs/{run_id}/attempts/{attempt}/jobs",
            get(list_attempt_jobs),
        )
        .route(
            "/repos/{owner}/{repo}/actions/runs/{run_id}/rerun-failed-jobs",
            post(rerun_failed_jobs),
        )
        .route("/repos/{owner}/{repo}/actions/jobs/{job_id}", get(get_job))
}

/// Conclusions a run's `status` filter also accepts.
const CONCLUSIONS: [&str; 8] = [
    "success",
    "failure",
    "neutral",
    "cancelled",
    "skipped",
    "timed_out",
    "action_required",
    "stale",
];

impl ServerState {
    pub(super) fn enqueue_run(&mut self, repo: u64, spec: RunSpec) -> QueuedRun {
        let run_id = self.id() + 9_000_000_000;
        let now = SystemTime::now();
        let workflow_id = 100_000
            + self
                .runs
                .values()
                .filter(|r| r.workflow_name == spec.workflow_name)
                .map(|r| r.workflow_id - 100_000)
                .next()
                .unwrap_or(self.runs.len() as u64);
        let run_number = self.runs.values().filter(|r| r.repo == repo).count() as u64 + 1;
        let mut job_ids = Vec::new();
        for job in spec.jobs {
            let id = self.new_job(run_id, repo, 1, job);
            job_ids.push(id);
        }
        self.runs.insert(
            run_id,
            Run {
                id: run_id,
                repo,
                workflow_id,
                workflow_name: spec.workflow_name,
                head_sha: spec.head_sha,
                head_branch: spec.head_branch,
                run_number,
                attempt: 1,
                created_at: now,
                updated_at: now,
                jobs: job_ids.clone(),
            },
        );
        for id in &job_ids {
            self.emit(*id, "queued");
        }
        QueuedRun { run_id, job_ids }
    }

    fn new_job(&mut self, run_id: u64, repo: u64, attempt: u32, spec: super::JobSpec) -> u64 {
        let id = self.id() + 20_000_000_000;
        self.jobs.insert(
            id,
            Job {
                id,
                run_id,
                repo,
                attempt,
                spec,
                status: JobStatus::Queued,
                conclusion: None,
                created_at: SystemTime::now(),
                started_at: None,
                completed_at: None,
                runner_id: None,
                released: None,
            },
        );
        id
    }

    /// The most recent execution of each job of the run (`filter=latest`).
    fn latest_jobs(&self, run: &Run) -> Vec<&Job> {
        let mut latest: BTreeMap<&str, &Job> = BTreeMap::new();
        for job in run.jobs.iter().map(|id| &self.jobs[id]) {
            let slot = latest.entry(job.spec.name.as_str()).or_insert(job);
            if job.attempt > slot.attempt {
                *slot = job;
            }
        }
        let mut jobs: Vec<&Job> = latest.into_values().collect();
        jobs.sort_by_key(|j| j.id);
        jobs
    }

    /// A run (attempt) is `queued` until one of the jobs it queued starts, `completed` when all
    /// its latest jobs are, else `in_progress` — so a run with one job running and another still
    /// queued is not listed by `status=queued`. Its conclusion is the worst of its jobs'.
    fn run_status(&self, run: &Run) -> (&'static str, Option<String>) {
        let queued_now = run
            .jobs
            .iter()
            .map(|id| &self.jobs[id])
            .filter(|j| j.attempt == run.attempt)
            .all(|j| j.status == JobStatus::Queued);
        if queued_now {
            return ("queued", None);
        }
        let jobs = self.latest_jobs(run);
        if !jobs.iter().all(|j| j.status == JobStatus::Completed) {
            return ("in_progress", None);
        }
        let conclusions: Vec<&str> = jobs
            .iter()
            .filter_map(|j| j.conclusion.as_deref())
            .collect();
        let conclusion = ["failure", "timed_out", "cancelled", "action_required"]
            .into_iter()
            .find(|c| conclusions.contains(c))
            .unwrap_or("success");
        ("completed", Some(conclusion.to_owned()))
    }

    pub(super) fn run_json(&self, run: &Run) -> Value {
        let repo = &self.repos[&run.repo];
        let repo_url = format!("{}/repos/{}", self.base, repo.full_name());
        let url = format!("{repo_url}/actions/runs/{}", run.id);
        let (status, conclusion) = self.run_status(run);
        let owner = self.find_account(&repo.owner).expect("repo owner exists");
        let repository = repo_json(self, repo);
        json!({
            "id": run.id,
            "name": run.workflow_name,
            "node_id": format!("WFR_kwLO{:010}", run.id),
            "head_branch": run.head_branch,
            "head_sha": run.head_sha,
            "path": format!(".github/workflows/{}.yml", run.workflow_name.to_ascii_lowercase()),
            "display_title": run.workflow_name,
            "run_number": run.run_number,
            "event": "push",
            "status": status,
            "conclusion": conclusion,
            "workflow_id": run.workflow_id,
            "check_suite_id": run.id + 1,
            "check_suite_node_id": format!("CS_kwDO{:010}", run.id + 1),
            "url": url,
            "html_url": format!("https://github.com/{}/actions/runs/{}", repo.full_name(), run.id),
            "pull_requests": [],
            "created_at": ts(run.created_at),
            "updated_at": ts(run.updated_at),
            "actor": account_json(&self.base, owner),
            "triggering_actor": account_json(&self.base, owner),
            "run_attempt": run.attempt,
            "run_started_at": ts(run.created_at),
            "jobs_url": format!("{url}/jobs"),
            "logs_url": format!("{url}/logs"),
            "check_suite_url": format!("{repo_url}/check-suites/{}", run.id + 1),
            "artifacts_url": format!("{url}/artifacts"),
            "cancel_url": format!("{url}/cancel"),
            "rerun_url": format!("{url}/rerun"),
            "previous_attempt_url": (run.attempt > 1).then(|| format!("{url}/attempts/{}", run.attempt - 1)),
            "workflow_url": format!("{repo_url}/actions/workflows/{}", run.workflow_id),
            "head_commit": {
                "id": run.head_sha,
                "tree_id": run.head_sha.chars().rev().collect::<String>(),
                "message": "Build",
                "timestamp": ts(run.created_at),
                "author": {"name": "Octo Cat", "email": "octocat@example.com"},
                "committer": {"name": "GitHub", "email": "noreply@github.com"},
            },
            "repository": repository,
            "head_repository": repository,
        })
    }

    /// A job as `GET …/actions/jobs/{id}` and the `workflow_job` webhook show it.
    pub(super) fn job_json(&self, job: &Job) -> Value {
        let run = &self.runs[&job.run_id];
        let repo = &self.repos[&job.repo];
        let repo_url = format!("{}/repos/{}", self.base, repo.full_name());
        let runner = job.runner_id.and_then(|id| self.runners.get(&id));
        let group = runner.map(|r| (r.group_id, self.group_name(&r.scope, r.group_id)));
        json!({
            "id": job.id,
            "run_id": job.run_id,
            "workflow_name": run.workflow_name,
            "head_branch": run.head_branch,
            "run_url": format!("{repo_url}/actions/runs/{}", job.run_id),
            "run_attempt": job.attempt,
            "node_id": format!("CR_kwDO{:010}", job.id),
            "head_sha": run.head_sha,
            "url": format!("{repo_url}/actions/jobs/{}", job.id),
            "html_url": format!("https://github.com/{}/actions/runs/{}/job/{}", repo.full_name(), job.run_id, job.id),
            "status": job.status.as_str(),
            "conclusion": job.conclusion,
            "created_at": ts(job.created_at),
            // GitHub sets started_at to the creation time while the job waits.
            "started_at": ts(job.started_at.unwrap_or(job.created_at)),
            "completed_at": job.completed_at.map(ts),
            "name": job.spec.name,
            "steps": [],
            "check_run_url": format!("{repo_url}/check-runs/{}", job.id),
            "labels": job.spec.labels,
            "runner_id": runner.map(|r| r.id),
            "runner_name": runner.map(|r| r.name.clone()),
            "runner_group_id": group.as_ref().map(|g| g.0),
            "runner_group_name": group.map(|g| g.1),
        })
    }

    /// `POST …/rerun-failed-jobs`: a new attempt whose failed (or cancelled, timed-out) jobs are
    /// queued again under new ids.
    fn rerun_failed(&mut self, run_id: u64) -> Result<(), Response> {
        let run = &self.runs[&run_id];
        let (status, _) = self.run_status(run);
        if status != "completed" {
            return Err(error(
                StatusCode::FORBIDDEN,
                "This workflow run is not completed",
            ));
        }
        let failed: Vec<(u64, super::JobSpec)> = self
            .latest_jobs(run)
            .into_iter()
            .filter(|j| {
                matches!(
                    j.conclusion.as_deref(),
                    Some("failure" | "cancelled" | "timed_out")
                )
            })
            .map(|j| (j.repo, j.spec.clone()))
            .collect();
        if failed.is_empty() {
            return Err(error(
                StatusCode::FORBIDDEN,
                "This workflow run has no failed jobs to re-run",
            ));
        }
        let attempt = run.attempt + 1;
        let mut new = Vec::new();
        for (repo, spec) in failed {
            new.push(self.new_job(run_id, repo, attempt, spec));
        }
        let run = self.runs.get_mut(&run_id).unwrap();
        run.attempt = attempt;
        run.updated_at = SystemTime::now();
        run.jobs.extend(&new);
        for id in new {
            self.emit(id, "queued");
        }
        Ok(())
    }
}

fn parse_id(text: &str) -> Result<u64, Response> {
    text.parse().map_err(|_| not_found())
}

/// `GET /repos/{o}/{r}/actions/runs`: newest first; `status` takes a status or a conclusion.
async fn list_runs(
    s: Srv,
    Path((owner, repo)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    let repo_id = match caller.repo(&st, &owner, &repo, "actions", Level::Read) {
        Ok(id) => id,
        Err(refusal) => return refusal,
    };
    let mut runs: Vec<&Run> = st
        .runs
        .values()
        .rev()
        .filter(|r| r.repo == repo_id)
        .filter(|r| match q.get("status").map(String::as_str) {
            None | Some("") => true,
            Some(wanted) => {
                let (status, conclusion) = st.run_status(r);
                if CONCLUSIONS.contains(&wanted) {
                    conclusion.as_deref() == Some(wanted)
                } else {
                    status == wanted
                }
            }
        })
        .filter(|r| q.get("head_sha").is_none_or(|sha| *sha == r.head_sha))
        .filter(|r| q.get("branch").is_none_or(|b| *b == r.head_branch))
        .filter(|_| q.get("event").is_none_or(|e| e == "push"))
        .collect();
    runs.sort_by_key(|r| std::cmp::Reverse(r.id));
    let total = runs.len();
    let (page, link) = paginate(&runs, &st.base, &uri, &q);
    let items: Vec<Value> = page.into_iter().map(|r| st.run_json(r)).collect();
    paged(
        StatusCode::OK,
        json!({"total_count": total, "workflow_runs": items}),
        link,
    )
}

async fn get_run(
    s: Srv,
    Path((owner, repo, run_id)): Path<(String, String, String)>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    let found = caller
        .repo(&st, &owner, &repo, "actions", Level::Read)
        .and_then(|repo_id| {
            let id = parse_id(&run_id)?;
            st.runs
                .get(&id)
                .filter(|r| r.repo == repo_id)
                .ok_or_else(not_found)
        });
    match found {
        Ok(run) => axum::Json(st.run_json(run)).into_response(),
        Err(refusal) => refusal,
    }
}

/// `GET …/runs/{id}/jobs`: `filter=latest` (default) or `all`, in creation order.
async fn list_jobs(
    s: Srv,
    Path((owner, repo, run_id)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    let run = match find_run(&st, &caller, &owner, &repo, &run_id) {
        Ok(run) => run,
        Err(refusal) => return refusal,
    };
    let jobs: Vec<&Job> = match q.get("filter").map(String::as_str) {
        Some("all") => run.jobs.iter().map(|id| &st.jobs[id]).collect(),
        _ => st.latest_jobs(run),
    };
    jobs_page(&st, &jobs, &uri, &q)
}

async fn list_attempt_jobs(
    s: Srv,
    Path((owner, repo, run_id, attempt)): Path<(String, String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    let run = match find_run(&st, &caller, &owner, &repo, &run_id) {
        Ok(run) => run,
        Err(refusal) => return refusal,
    };
    let Some(attempt) = attempt
        .parse::<u32>()
        .ok()
        .filter(|a| (1..=run.attempt).contains(a))
    else {
        return not_found();
    };
    // An attempt lists the jobs it ran and those it carried over from earlier attempts.
    let jobs: Vec<&Job> = {
        let mut latest: BTreeMap<&str, &Job> = BTreeMap::new();
        for job in run.jobs.iter().map(|id| &st.jobs[id]) {
            if job.attempt <= attempt {
                let slot = latest.entry(job.spec.name.as_str()).or_insert(job);
                if job.attempt > slot.attempt {
                    *slot = job;
                }
            }
        }
        let mut jobs: Vec<&Job> = latest.into_values().collect();
        jobs.sort_by_key(|j| j.id);
        jobs
    };
    jobs_page(&st, &jobs, &uri, &q)
}

fn jobs_page(st: &ServerState, jobs: &[&Job], uri: &Uri, q: &HashMap<String, String>) -> Response {
    let (page, link) = paginate(jobs, &st.base, uri, q);
    let items: Vec<Value> = page.into_iter().map(|j| st.job_json(j)).collect();
    paged(
        StatusCode::OK,
        json!({"total_count": jobs.len(), "jobs": items}),
        link,
    )
}

fn find_run<'a>(
    st: &'a ServerState,
    caller: &Caller,
    owner: &str,
    repo: &str,
    run_id: &str,
) -> Result<&'a Run, Response> {
    let repo_id = caller.repo(st, owner, repo, "actions", Level::Read)?;
    let id = parse_id(run_id)?;
    st.runs
        .get(&id)
        .filter(|r| r.repo == repo_id)
        .ok_or_else(not_found)
}

async fn get_job(
    s: Srv,
    Path((owner, repo, job_id)): Path<(String, String, String)>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    let found = caller
        .repo(&st, &owner, &repo, "actions", Level::Read)
        .and_then(|repo_id| {
            let id = parse_id(&job_id)?;
            st.jobs
                .get(&id)
                .filter(|j| j.repo == repo_id)
                .ok_or_else(not_found)
        });
    match found {
        Ok(job) => axum::Json(st.job_json(job)).into_response(),
        Err(refusal) => refusal,
    }
}

/// `POST …/runs/{id}/rerun-failed-jobs` → 201 `{}`. The body (`enable_debug_logging`) is optional.
async fn rerun_failed_jobs(
    s: Srv,
    Path((owner, repo, run_id)): Path<(String, String, String)>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let mut st = s.lock();
    let result = caller
        .repo(&st, &owner, &repo, "actions", Level::Write)
        .and_then(|repo_id| {
            let id = parse_id(&run_id)?;
            st.runs
                .get(&id)
                .filter(|r| r.repo == repo_id)
                .map(|r| r.id)
                .ok_or_else(not_found)
        })
        .and_then(|id| st.rerun_failed(id));
    if let Err(refusal) = result {
        return refusal;
    }
    st.schedule();
    drop(st);
    s.bump();
    (StatusCode::CREATED, axum::Json(json!({}))).into_response()
}

impl GitHubServer {
    /// Queues a workflow run of `repo` (`owner/name`, added with [`GitHubServer::add_repo`]);
    /// each job is `queued` and sends its `queued` webhook.
    pub fn enqueue_run(&self, repo: &str, spec: RunSpec) -> QueuedRun {
        let mut st = self.lock();
        let (owner, name) = repo.split_once('/').expect("enqueue_run: want owner/name");
        let repo_id = st
            .find_repo(owner, name)
            .unwrap_or_else(|| panic!("enqueue_run: no repo {repo}"))
            .id;
        let queued = st.enqueue_run(repo_id, spec);
        st.schedule();
        drop(st);
        self.shared.bump();
        queued
    }

    /// Queues a run of workflow `CI` with one job `build` that runs on `labels`; returns the job id.
    pub fn enqueue_job(&self, repo: &str, labels: &[&str]) -> u64 {
        let spec = RunSpec::new("CI").job(JobSpec::new("build", labels));
        self.enqueue_run(repo, spec).job_ids[0]
    }

    /// Ends a held job (see [`JobSpec::held`]) with `conclusion`: its runner reports it done.
    ///
    /// # Panics
    /// When the job does not exist.
    pub fn finish_job(&self, job_id: u64, conclusion: &str) {
        let mut st = self.lock();
        let job = st
            .jobs
            .get_mut(&job_id)
            .unwrap_or_else(|| panic!("finish_job: no job {job_id}"));
        job.released = Some(conclusion.to_owned());
        drop(st);
        self.shared.bump();
    }

    /// The job, if it exists.
    pub fn job(&self, job_id: u64) -> Option<JobRecord> {
        let st = self.lock();
        st.jobs.get(&job_id).map(|j| st.job_record(j))
    }

    /// Every job of every run and attempt, by id.
    pub fn jobs(&self) -> Vec<JobRecord> {
        let st = self.lock();
        st.jobs.values().map(|j| st.job_record(j)).collect()
    }

    /// The run's current attempt number.
    pub fn run_attempt(&self, run_id: u64) -> Option<u32> {
        self.lock().runs.get(&run_id).map(|r| r.attempt)
    }
}
