//! GitHub's REST API as kiln uses it, through `octocrab`: App or token auth, queued jobs of a
//! repository or an organization, just-in-time runner configs, runner registrations, re-runs.
//!
//! Pages are walked by number rather than by following `Link` URLs: an octocrab installation
//! client sends no token to an absolute URL of a host other than api.github.com (GitHub
//! Enterprise Server), so `Link` URLs would be refused there.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use octocrab::Octocrab;
use octocrab::models::{AppId, InstallationId, RunId, RunnerGroupId, RunnerId};

use super::conditional::{Conditional, RateView, Tally};
use super::config::{GitHubConfig, Scope};

/// Items per page (GitHub's maximum).
const PER_PAGE: u8 = 100;
/// The most pages kiln reads of one listing.
const MAX_PAGES: u32 = 50;

/// What can go wrong talking to GitHub.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GitHubError {
    /// The App's private key could not be read or used.
    #[error("cannot use the GitHub App key {path}: {message}")]
    Key {
        /// The key file.
        path: String,
        /// Why.
        message: String,
    },
    /// GitHub answered with an error status.
    #[error("GitHub answered {what} with HTTP {status}: {message}")]
    Status {
        /// What kiln asked.
        what: String,
        /// The status.
        status: u16,
        /// GitHub's message.
        message: String,
    },
    /// GitHub's rate limit holds listings back.
    #[error("not listing GitHub until {until}: {why}")]
    RateLimited {
        /// When listings may resume (an HTTP date).
        until: String,
        /// Why.
        why: String,
    },
    /// The configured runner group does not exist.
    #[error(
        "the organization {org} has no runner group called {name:?} (it has: {groups}); set runner_group to one of these"
    )]
    NoRunnerGroup {
        /// The configured name.
        name: String,
        /// The organization.
        org: String,
        /// The groups there are.
        groups: String,
    },
    /// GitHub could not be reached, or answered something kiln cannot read.
    #[error("cannot {what} on GitHub: {message}")]
    Other {
        /// What kiln asked.
        what: String,
        /// Why.
        message: String,
    },
}

impl GitHubError {
    pub(crate) fn from(what: &str, error: octocrab::Error) -> Self {
        match error {
            octocrab::Error::GitHub { source, .. } => Self::Status {
                what: what.to_owned(),
                status: source.status_code.as_u16(),
                message: source.message,
            },
            other => Self::Other {
                what: what.to_owned(),
                message: crate::net::error_chain(&other),
            },
        }
    }

    /// The HTTP status GitHub answered, if it answered.
    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A job waiting for (or running on) a self-hosted runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobView {
    /// The job id.
    pub(crate) id: u64,
    /// Its run.
    pub(crate) run_id: u64,
    /// The run's attempt.
    pub(crate) run_attempt: u32,
    /// `owner/repo`.
    pub(crate) repo: String,
    /// Its `runs-on` labels.
    pub(crate) labels: Vec<String>,
    /// Where it is.
    pub(crate) status: JobStatus,
    /// The runner it runs on, once it runs.
    pub(crate) runner_name: Option<String>,
    /// The job's name, for people.
    pub(crate) name: String,
    /// Its page.
    pub(crate) url: String,
    /// When it was queued.
    pub(crate) created_at: Option<std::time::SystemTime>,
}

/// Where an active job is (GitHub's `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobStatus {
    /// `queued`: waiting for a runner.
    Queued,
    /// `in_progress`: a runner took it.
    InProgress,
    /// `waiting`: waiting for a deployment protection rule.
    Waiting,
    /// `pending`: waiting for a concurrency group.
    Pending,
}

impl JobStatus {
    /// The status GitHub calls `status`; `None` for one no longer active (`completed`).
    pub(crate) fn parse(status: &str) -> Option<Self> {
        match status {
            "queued" => Some(Self::Queued),
            "in_progress" => Some(Self::InProgress),
            "waiting" => Some(Self::Waiting),
            "pending" => Some(Self::Pending),
            _ => None,
        }
    }
}

/// A runner registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunnerView {
    pub(crate) id: u64,
    pub(crate) name: String,
    /// Whether its runner is connected (GitHub's status `online`, else `offline`).
    pub(crate) online: bool,
    pub(crate) busy: bool,
}

/// A workflow run, as far as a re-run needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunView {
    /// Whether it completed (GitHub's status `completed`).
    pub(crate) completed: bool,
    /// Its latest attempt.
    pub(crate) attempt: u64,
}

/// How deleting a registration went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deleted {
    /// Removed (or already gone).
    Gone,
    /// The runner is running a job (422): it stays.
    Busy,
}

/// A client of one repository or organization.
pub(crate) struct GitHubApi {
    client: Octocrab,
    scope: Scope,
    /// ETags, bodies and the rate limit of its listings.
    conditional: Conditional,
    /// Which repositories the next passes list.
    sweep: Mutex<Sweep>,
    /// The jobs of the runs listed, by run id.
    runs: Mutex<HashMap<u64, KeptRun>>,
}

impl GitHubApi {
    /// Signs in: with the token, or as the App's installation (looked up when not given).
    ///
    /// # Errors
    /// An unusable URL or key, or GitHub refusing the App.
    pub(crate) async fn connect(config: &GitHubConfig) -> Result<Self, GitHubError> {
        let scope = config.scope().ok_or_else(|| GitHubError::Other {
            what: "choose a repository or organization".into(),
            message: "the config names neither".into(),
        })?;
        let builder = || {
            Octocrab::builder()
                .base_uri(config.api_url.as_str())
                .map_err(|e| GitHubError::from("use the API URL", e))
        };
        let client = if let Some(token) = config.token.clone().filter(|t| !t.trim().is_empty()) {
            builder()?
                .personal_token(token)
                .build()
                .map_err(|e| GitHubError::from("build a client", e))?
        } else {
            let inline = config.private_key.clone().filter(|k| !k.trim().is_empty());
            let path = config.private_key_file.clone().unwrap_or_default();
            let key_error = |message: String| GitHubError::Key {
                path: match inline {
                    Some(_) => "private_key".into(),
                    None => path.display().to_string(),
                },
                message,
            };
            let pem = match &inline {
                Some(pem) => pem.clone().into_bytes(),
                None => std::fs::read(&path).map_err(|e| key_error(e.to_string()))?,
            };
            let key = octocrab::auth::EncodingKey::from_rsa_pem(&pem)
                .map_err(|e| key_error(format!("not an RSA private key in PEM ({e})")))?;
            let app = builder()?
                .app(AppId(config.app_id.unwrap_or_default()), key)
                .build()
                .map_err(|e| GitHubError::from("build an App client", e))?;
            let installation = match config.installation_id {
                Some(id) => InstallationId(id),
                None => match &scope {
                    Scope::Repo { owner, repo } => {
                        app.apps()
                            .get_repository_installation(owner, repo)
                            .await
                            .map_err(|e| GitHubError::from("find the App's installation", e))?
                            .id
                    }
                    Scope::Org(org) => {
                        app.apps()
                            .get_org_installation(org)
                            .await
                            .map_err(|e| GitHubError::from("find the App's installation", e))?
                            .id
                    }
                    Scope::Enterprise(_) => {
                        return Err(GitHubError::Other {
                            what: "sign in to the enterprise".into(),
                            message: "GitHub Apps cannot register enterprise runners; use a personal access token (classic) with manage_runners:enterprise".into(),
                        });
                    }
                },
            };
            app.installation(installation)
                .map_err(|e| GitHubError::from("act as the App's installation", e))?
        };
        Ok(Self {
            client,
            scope,
            conditional: Conditional::default(),
            sweep: Mutex::new(Sweep::default()),
            runs: Mutex::new(HashMap::new()),
        })
    }

    /// The rate limit as GitHub last told.
    pub(crate) fn rate(&self) -> Option<RateView> {
        self.conditional.rate()
    }

    /// Whether listings may go ahead: not while GitHub asked to wait, nor while fewer than
    /// `reserve` requests are left in the rate limit's window.
    ///
    /// # Errors
    /// [`GitHubError::RateLimited`] until when listings may resume.
    pub(crate) fn may_list(&self, reserve: u64) -> Result<(), GitHubError> {
        self.conditional.check(reserve)
    }

    /// The requests since the last call, by how GitHub answered.
    pub(crate) fn take_tally(&self) -> Tally {
        self.conditional.take_tally()
    }

    /// A webhook named repository `repo` (`owner/name`): it is listed at the next pass.
    pub(crate) fn touched(&self, repo: &str) {
        self.sweep_state().touched.insert(repo.to_ascii_lowercase());
    }

    fn sweep_state(&self) -> std::sync::MutexGuard<'_, Sweep> {
        self.sweep.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The organization's repositories (`owner`, `name`), conditionally.
    async fn org_repositories(&self, org: &str) -> Result<Vec<(String, String)>, GitHubError> {
        let mut repos = Vec::new();
        for page in 1..=MAX_PAGES {
            let listed: Vec<RepoItem> = self
                .conditional
                .get(
                    &self.client,
                    &format!("/orgs/{org}/repos?per_page={PER_PAGE}&page={page}"),
                    "list the organization's repositories",
                )
                .await?;
            let count = listed.len();
            repos.extend(listed.into_iter().map(|r| (org.to_owned(), r.name)));
            if count < usize::from(PER_PAGE) {
                break;
            }
        }
        Ok(repos)
    }

    /// The repositories to list at this pass. A repository: every pass. An organization: the
    /// first pass all of them; then those with active runs at the last pass or named by a
    /// webhook since, and a slice of the others in turn, so that each is listed once per
    /// `sweep` (webhooks carry the news; the sweep finds what a lost delivery did not).
    async fn repositories_to_list(
        &self,
        interval: Duration,
        sweep: Duration,
    ) -> Result<Vec<(String, String)>, GitHubError> {
        let org = match &self.scope {
            Scope::Repo { owner, repo } => return Ok(vec![(owner.clone(), repo.clone())]),
            Scope::Org(org) => org.clone(),
            // GitHub has no REST listing of an enterprise's repositories for a runner token:
            // the repositories webhooks named (since kiln started) are listed, every pass.
            Scope::Enterprise(_) => {
                let mut state = self.sweep_state();
                let touched = std::mem::take(&mut state.touched);
                state.known.extend(touched);
                let mut known: Vec<(String, String)> = state
                    .known
                    .iter()
                    .filter_map(|full| full.split_once('/'))
                    .map(|(owner, name)| (owner.to_owned(), name.to_owned()))
                    .collect();
                known.sort();
                return Ok(known);
            }
        };
        let all = self.org_repositories(&org).await?;
        let mut state = self.sweep_state();
        if !state.swept_once {
            state.swept_once = true;
            state.touched.clear();
            return Ok(all);
        }
        let passes = (sweep.as_secs_f64() / interval.as_secs_f64().max(1.0))
            .ceil()
            .max(1.0);
        let slice = ((all.len() as f64 / passes).ceil() as usize).max(1);
        let from = state.cursor % all.len().max(1);
        state.cursor = from + slice;
        let touched = std::mem::take(&mut state.touched);
        let chosen = all
            .iter()
            .enumerate()
            .filter(|(index, (owner, name))| {
                let full = format!("{owner}/{name}").to_ascii_lowercase();
                let in_slice = (from..from + slice).any(|i| i % all.len() == *index);
                in_slice || touched.contains(&full) || state.active.contains(&full)
            })
            .map(|(_, repo)| repo.clone())
            .collect();
        Ok(chosen)
    }

    /// Every job that waits for a runner or runs on one in the repositories listed at this
    /// pass (see [`Self::repositories_to_list`]), with the repositories listed: the jobs of
    /// queued and in-progress runs (a run is in progress while any of its jobs runs, so its
    /// queued jobs are listed there). Conditional requests throughout; a run's jobs are listed
    /// again only when the run changed (its `updated_at`). Refused while GitHub's rate limit
    /// is nearly used up, keeping `reserve` requests for runners.
    ///
    /// # Errors
    /// A listing failed, or the rate limit holds listings back.
    pub(crate) async fn active_jobs(
        &self,
        interval: Duration,
        sweep: Duration,
        reserve: u64,
    ) -> Result<(Vec<JobView>, Vec<String>), GitHubError> {
        self.conditional.check(reserve)?;
        let repos = self.repositories_to_list(interval, sweep).await?;
        let mut jobs = Vec::new();
        let mut listed = Vec::new();
        let mut seen_runs = HashSet::new();
        for (owner, repo) in &repos {
            self.conditional.check(reserve)?;
            let full = format!("{owner}/{repo}");
            let mut active = false;
            for status in ["queued", "in_progress"] {
                for page in 1..=MAX_PAGES {
                    let runs: RunsPage = self
                        .conditional
                        .get(
                            &self.client,
                            &format!("/repos/{owner}/{repo}/actions/runs?status={status}&per_page={PER_PAGE}&page={page}"),
                            &format!("list the {status} runs of {full}"),
                        )
                        .await?;
                    let count = runs.workflow_runs.len();
                    for run in runs.workflow_runs {
                        active = true;
                        seen_runs.insert(run.id);
                        jobs.extend(self.run_jobs(owner, repo, &run).await?);
                    }
                    if count < usize::from(PER_PAGE) {
                        break;
                    }
                }
            }
            let mut sweep = self.sweep_state();
            if active {
                sweep.active.insert(full.to_ascii_lowercase());
            } else {
                sweep.active.remove(&full.to_ascii_lowercase());
            }
            listed.push(full);
        }
        let listed_lower: HashSet<String> = listed.iter().map(|r| r.to_ascii_lowercase()).collect();
        self.runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, run| seen_runs.contains(id) || !listed_lower.contains(&run.repo));
        jobs.sort_by_key(|j| j.id);
        jobs.dedup_by_key(|j| j.id);
        Ok((jobs, listed))
    }

    /// The jobs of `run`'s latest attempt: kept from the last pass while the run is unchanged.
    async fn run_jobs(
        &self,
        owner: &str,
        repo: &str,
        run: &RunItem,
    ) -> Result<Vec<JobView>, GitHubError> {
        let full = format!("{owner}/{repo}");
        if let Some(kept) = self
            .runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&run.id)
            .filter(|kept| kept.updated_at == run.updated_at)
        {
            return Ok(kept.jobs.clone());
        }
        let mut jobs = Vec::new();
        for page in 1..=MAX_PAGES {
            let listed: JobsPage = self
                .conditional
                .get(
                    &self.client,
                    &format!(
                        "/repos/{owner}/{repo}/actions/runs/{}/jobs?filter=latest&per_page={PER_PAGE}&page={page}",
                        run.id
                    ),
                    &format!("list the jobs of run {} of {full}", run.id),
                )
                .await?;
            let count = listed.jobs.len();
            for job in listed.jobs {
                let Some(status) = JobStatus::parse(&job.status) else {
                    continue;
                };
                jobs.push(JobView {
                    id: job.id,
                    run_id: job.run_id,
                    run_attempt: job.run_attempt,
                    repo: full.clone(),
                    labels: job.labels,
                    status,
                    runner_name: job.runner_name.filter(|n| !n.is_empty()),
                    name: job.name,
                    url: job.html_url.unwrap_or_default(),
                    created_at: job
                        .created_at
                        .as_deref()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                        .map(SystemTime::from),
                });
            }
            if count < usize::from(PER_PAGE) {
                break;
            }
        }
        self.runs.lock().unwrap_or_else(|e| e.into_inner()).insert(
            run.id,
            KeptRun {
                repo: full.to_ascii_lowercase(),
                updated_at: run.updated_at.clone(),
                jobs: jobs.clone(),
            },
        );
        Ok(jobs)
    }

    /// `generate-jitconfig` for a runner called `name` with `labels`: (registration id,
    /// encoded JIT config).
    ///
    /// # Errors
    /// GitHub refused (409: a runner of that name is registered; 422/403/404: the runner
    /// group).
    pub(crate) async fn jit_config(
        &self,
        name: &str,
        group: u64,
        labels: Vec<String>,
        work_folder: &str,
    ) -> Result<(u64, String), GitHubError> {
        let actions = self.client.actions();
        let builder = match &self.scope {
            Scope::Repo { owner, repo } => actions.create_repo_jit_runner_config(
                owner,
                repo,
                name,
                RunnerGroupId(group),
                labels,
            ),
            Scope::Org(org) => {
                actions.create_org_jit_runner_config(org, name, RunnerGroupId(group), labels)
            }
            Scope::Enterprise(enterprise) => {
                return self
                    .enterprise_jit_config(enterprise, name, group, labels, work_folder)
                    .await;
            }
        };
        let config = builder.work_folder(work_folder).send().await.map_err(|e| {
            GitHubError::from(&format!("generate a JIT config for runner {name}"), e)
        })?;
        Ok((*config.runner.id, config.encoded_jit_config))
    }

    /// `POST /enterprises/{enterprise}/actions/runners/generate-jitconfig` (octocrab has the
    /// repository and organization calls only).
    async fn enterprise_jit_config(
        &self,
        enterprise: &str,
        name: &str,
        group: u64,
        labels: Vec<String>,
        work_folder: &str,
    ) -> Result<(u64, String), GitHubError> {
        #[derive(serde::Deserialize)]
        struct Created {
            runner: CreatedRunner,
            encoded_jit_config: String,
        }
        #[derive(serde::Deserialize)]
        struct CreatedRunner {
            id: u64,
        }
        let body = serde_json::json!({
            "name": name,
            "runner_group_id": group,
            "labels": labels,
            "work_folder": work_folder,
        });
        let created: Created = self
            .client
            .post(
                format!("/enterprises/{enterprise}/actions/runners/generate-jitconfig"),
                Some(&body),
            )
            .await
            .map_err(|e| {
                GitHubError::from(&format!("generate a JIT config for runner {name}"), e)
            })?;
        Ok((created.runner.id, created.encoded_jit_config))
    }

    /// The scope's runner registrations (conditionally: unchanged pages cost nothing).
    ///
    /// # Errors
    /// The listing failed.
    pub(crate) async fn runners(&self) -> Result<Vec<RunnerView>, GitHubError> {
        let base = match &self.scope {
            Scope::Repo { owner, repo } => format!("/repos/{owner}/{repo}/actions/runners"),
            Scope::Org(org) => format!("/orgs/{org}/actions/runners"),
            Scope::Enterprise(enterprise) => format!("/enterprises/{enterprise}/actions/runners"),
        };
        let mut runners = Vec::new();
        for page in 1..=MAX_PAGES {
            let listed: RunnersPage = self
                .conditional
                .get(
                    &self.client,
                    &format!("{base}?per_page={PER_PAGE}&page={page}"),
                    "list the runners",
                )
                .await?;
            let count = listed.runners.len();
            runners.extend(listed.runners.into_iter().map(|r| RunnerView {
                id: r.id,
                name: r.name,
                online: r.status == "online",
                busy: r.busy,
            }));
            if count < usize::from(PER_PAGE) {
                break;
            }
        }
        Ok(runners)
    }

    /// The organization's runner group called `name` (case-insensitive), with the
    /// repositories it serves when its visibility is `selected`.
    ///
    /// # Errors
    /// No group of that name (the error lists the ones there are), or a listing failed.
    pub(crate) async fn runner_group(&self, name: &str) -> Result<RunnerGroup, GitHubError> {
        let (base, org) = match &self.scope {
            Scope::Org(org) => (format!("/orgs/{org}"), org),
            Scope::Enterprise(enterprise) => (format!("/enterprises/{enterprise}"), enterprise),
            Scope::Repo { .. } => {
                return Err(GitHubError::Other {
                    what: format!("find runner group {name}"),
                    message: "runner groups belong to an organization or enterprise; repository runners join the default group".into(),
                });
            }
        };
        let mut groups = Vec::new();
        for page in 1..=MAX_PAGES {
            let listed: GroupsPage = self
                .conditional
                .get(
                    &self.client,
                    &format!("{base}/actions/runner-groups?per_page={PER_PAGE}&page={page}"),
                    "list the runner groups",
                )
                .await?;
            let count = listed.runner_groups.len();
            groups.extend(listed.runner_groups);
            if count < usize::from(PER_PAGE) {
                break;
            }
        }
        let Some(group) = groups.iter().find(|g| g.name.eq_ignore_ascii_case(name)) else {
            let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
            return Err(GitHubError::NoRunnerGroup {
                name: name.to_owned(),
                org: org.clone(),
                groups: names.join(", "),
            });
        };
        // An enterprise group's `selected` visibility names organizations, not repositories:
        // GitHub's assignment decides, kiln does not filter.
        let repos = if group.visibility == "selected" && matches!(self.scope, Scope::Org(_)) {
            let mut repos = HashSet::new();
            for page in 1..=MAX_PAGES {
                let listed: GroupReposPage = self
                    .conditional
                    .get(
                        &self.client,
                        &format!(
                            "/orgs/{org}/actions/runner-groups/{}/repositories?per_page={PER_PAGE}&page={page}",
                            group.id
                        ),
                        &format!("list the repositories of runner group {}", group.name),
                    )
                    .await?;
                let count = listed.repositories.len();
                repos.extend(
                    listed
                        .repositories
                        .into_iter()
                        .map(|r| r.full_name.to_ascii_lowercase()),
                );
                if count < usize::from(PER_PAGE) {
                    break;
                }
            }
            Some(repos)
        } else {
            None
        };
        Ok(RunnerGroup {
            id: group.id,
            name: group.name.clone(),
            repos,
        })
    }

    /// Removes registration `id`.
    ///
    /// # Errors
    /// GitHub refused for another reason than "gone" or "busy".
    pub(crate) async fn delete_runner(&self, id: u64) -> Result<Deleted, GitHubError> {
        let actions = self.client.actions();
        let result = match &self.scope {
            Scope::Repo { owner, repo } => {
                actions.delete_repo_runner(owner, repo, RunnerId(id)).await
            }
            Scope::Org(org) => actions.delete_org_runner(org, RunnerId(id)).await,
            Scope::Enterprise(enterprise) => {
                return self.delete_enterprise_runner(enterprise, id).await;
            }
        };
        match result.map_err(|e| GitHubError::from(&format!("delete runner {id}"), e)) {
            Ok(()) => Ok(Deleted::Gone),
            Err(e) if e.status() == Some(404) => Ok(Deleted::Gone),
            Err(e) if e.status() == Some(422) => Ok(Deleted::Busy),
            Err(e) => Err(e),
        }
    }

    /// `DELETE /enterprises/{enterprise}/actions/runners/{id}` (not in octocrab).
    async fn delete_enterprise_runner(
        &self,
        enterprise: &str,
        id: u64,
    ) -> Result<Deleted, GitHubError> {
        let what = format!("delete runner {id}");
        let response = self
            .client
            ._delete(
                format!("/enterprises/{enterprise}/actions/runners/{id}"),
                None::<&()>,
            )
            .await
            .map_err(|e| GitHubError::from(&what, e))?;
        match response.status().as_u16() {
            200..=299 | 404 => Ok(Deleted::Gone),
            422 => Ok(Deleted::Busy),
            status => {
                let body = self
                    .client
                    .body_to_string(response)
                    .await
                    .unwrap_or_default();
                let message = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["message"].as_str().map(str::to_owned))
                    .unwrap_or(body);
                Err(GitHubError::Status {
                    what,
                    status,
                    message,
                })
            }
        }
    }

    /// A run's state and attempt.
    ///
    /// # Errors
    /// The run could not be read.
    pub(crate) async fn run(&self, repo: &str, run_id: u64) -> Result<RunView, GitHubError> {
        let (owner, name) = repo.split_once('/').unwrap_or((repo, ""));
        let run = self
            .client
            .workflows(owner, name)
            .get(RunId(run_id))
            .await
            .map_err(|e| GitHubError::from(&format!("read run {run_id} of {repo}"), e))?;
        let attempt = serde_json::to_value(&run)
            .ok()
            .and_then(|v| v["run_attempt"].as_u64())
            .unwrap_or(1);
        Ok(RunView {
            completed: run.status == "completed",
            attempt,
        })
    }

    /// Re-runs the failed jobs of a completed run.
    ///
    /// # Errors
    /// GitHub refused.
    pub(crate) async fn rerun_failed(&self, repo: &str, run_id: u64) -> Result<(), GitHubError> {
        let (owner, name) = repo.split_once('/').unwrap_or((repo, ""));
        self.client
            .workflows(owner, name)
            .rerun_failed_jobs(RunId(run_id))
            .await
            .map_err(|e| {
                GitHubError::from(
                    &format!("re-run the failed jobs of run {run_id} of {repo}"),
                    e,
                )
            })
    }
}

/// A runner group, resolved by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunnerGroup {
    pub(crate) id: u64,
    pub(crate) name: String,
    /// The repositories (`owner/name`, lower-case) it serves; `None`: all of the organization's.
    pub(crate) repos: Option<HashSet<String>>,
}

/// Which of an organization's repositories the next passes list.
#[derive(Default)]
struct Sweep {
    /// Whether the first (full) pass happened.
    swept_once: bool,
    /// Where the next slice starts.
    cursor: usize,
    /// Repositories with queued or in-progress runs at their last listing (lower-case).
    active: HashSet<String>,
    /// Repositories named by a webhook since the last pass (lower-case).
    touched: HashSet<String>,
    /// Enterprise scope: every repository a webhook named since kiln started (lower-case).
    known: HashSet<String>,
}

/// A run's jobs as listed, while the run is unchanged.
struct KeptRun {
    /// `owner/name`, lower-case.
    repo: String,
    updated_at: String,
    jobs: Vec<JobView>,
}

// GitHub's JSON, as far as kiln reads it.

#[derive(serde::Deserialize)]
struct RepoItem {
    name: String,
}

#[derive(serde::Deserialize)]
struct FullNameItem {
    full_name: String,
}

#[derive(serde::Deserialize)]
struct RunsPage {
    workflow_runs: Vec<RunItem>,
}

#[derive(serde::Deserialize)]
struct RunItem {
    id: u64,
    #[serde(default)]
    updated_at: String,
}

#[derive(serde::Deserialize)]
struct JobsPage {
    jobs: Vec<JobItem>,
}

#[derive(serde::Deserialize)]
struct JobItem {
    id: u64,
    run_id: u64,
    #[serde(default = "first_attempt")]
    run_attempt: u32,
    status: String,
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default)]
    runner_name: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    html_url: Option<String>,
    #[serde(default)]
    created_at: Option<String>,
}

fn first_attempt() -> u32 {
    1
}

#[derive(serde::Deserialize)]
struct RunnersPage {
    runners: Vec<RunnerItem>,
}

#[derive(serde::Deserialize)]
struct RunnerItem {
    id: u64,
    name: String,
    status: String,
    busy: bool,
}

#[derive(serde::Deserialize)]
struct GroupsPage {
    runner_groups: Vec<GroupItem>,
}

#[derive(serde::Deserialize)]
struct GroupItem {
    id: u64,
    name: String,
    #[serde(default)]
    visibility: String,
}

#[derive(serde::Deserialize)]
struct GroupReposPage {
    repositories: Vec<FullNameItem>,
}
