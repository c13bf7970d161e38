//! GitHub's REST API as kiln uses it, through `octocrab`: App or token auth, queued jobs of a
//! repository or an organization, just-in-time runner configs, runner registrations, re-runs.
//!
//! Pages are walked by number rather than by following `Link` URLs: an octocrab installation
//! client sends no token to an absolute URL of a host other than api.github.com (GitHub
//! Enterprise Server), so `Link` URLs would be refused there.

use std::time::Duration;

use octocrab::Octocrab;
use octocrab::models::{AppId, InstallationId, RunId, RunnerGroupId, RunnerId};

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
    fn from(what: &str, error: octocrab::Error) -> Self {
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
    fn parse(status: &str) -> Option<Self> {
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
                },
            };
            app.installation(installation)
                .map_err(|e| GitHubError::from("act as the App's installation", e))?
        };
        Ok(Self { client, scope })
    }

    /// The repositories whose jobs kiln's runners may take.
    async fn repositories(&self) -> Result<Vec<(String, String)>, GitHubError> {
        match &self.scope {
            Scope::Repo { owner, repo } => Ok(vec![(owner.clone(), repo.clone())]),
            Scope::Org(org) => {
                let mut repos = Vec::new();
                for page in 1..=MAX_PAGES {
                    let listed = self
                        .client
                        .orgs(org)
                        .list_repos()
                        .per_page(PER_PAGE)
                        .page(page)
                        .send()
                        .await
                        .map_err(|e| {
                            GitHubError::from("list the organization's repositories", e)
                        })?;
                    let count = listed.items.len();
                    repos.extend(listed.items.into_iter().map(|r| (org.clone(), r.name)));
                    if count < usize::from(PER_PAGE) {
                        break;
                    }
                }
                Ok(repos)
            }
        }
    }

    /// Every job of the scope that waits for a runner or runs on one: the jobs of queued and
    /// in-progress runs (a run is in progress while any of its jobs runs, so its queued jobs
    /// are listed there).
    ///
    /// # Errors
    /// A listing failed.
    pub(crate) async fn active_jobs(&self) -> Result<Vec<JobView>, GitHubError> {
        let mut jobs = Vec::new();
        for (owner, repo) in self.repositories().await? {
            let workflows = self.client.workflows(&owner, &repo);
            for status in ["queued", "in_progress"] {
                for page in 1..=MAX_PAGES {
                    let runs = workflows
                        .list_all_runs()
                        .status(status)
                        .per_page(PER_PAGE)
                        .page(page)
                        .send()
                        .await
                        .map_err(|e| {
                            GitHubError::from(
                                &format!("list the {status} runs of {owner}/{repo}"),
                                e,
                            )
                        })?;
                    let count = runs.items.len();
                    for run in runs.items {
                        jobs.extend(self.run_jobs(&owner, &repo, run.id).await?);
                    }
                    if count < usize::from(PER_PAGE) {
                        break;
                    }
                }
            }
        }
        jobs.sort_by_key(|j| j.id);
        jobs.dedup_by_key(|j| j.id);
        Ok(jobs)
    }

    async fn run_jobs(
        &self,
        owner: &str,
        repo: &str,
        run: RunId,
    ) -> Result<Vec<JobView>, GitHubError> {
        let mut jobs = Vec::new();
        for page in 1..=MAX_PAGES {
            let listed = self
                .client
                .workflows(owner, repo)
                .list_jobs(run)
                .filter(octocrab::params::workflows::Filter::Latest)
                .per_page(PER_PAGE)
                .page(page)
                .send()
                .await
                .map_err(|e| {
                    GitHubError::from(&format!("list the jobs of run {run} of {owner}/{repo}"), e)
                })?;
            let count = listed.items.len();
            for job in listed.items {
                let Some(status) = serde_json::to_value(&job.status)
                    .ok()
                    .and_then(|v| v.as_str().and_then(JobStatus::parse))
                else {
                    continue;
                };
                jobs.push(JobView {
                    id: *job.id,
                    run_id: *job.run_id,
                    run_attempt: job.run_attempt,
                    repo: format!("{owner}/{repo}"),
                    labels: job.labels,
                    status,
                    runner_name: job.runner_name.filter(|n| !n.is_empty()),
                    name: job.name,
                    url: job.html_url.to_string(),
                    created_at: Some(job.created_at.into()),
                });
            }
            if count < usize::from(PER_PAGE) {
                break;
            }
        }
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
        };
        let config = builder.work_folder(work_folder).send().await.map_err(|e| {
            GitHubError::from(&format!("generate a JIT config for runner {name}"), e)
        })?;
        Ok((*config.runner.id, config.encoded_jit_config))
    }

    /// The scope's runner registrations.
    ///
    /// # Errors
    /// The listing failed.
    pub(crate) async fn runners(&self) -> Result<Vec<RunnerView>, GitHubError> {
        let actions = self.client.actions();
        let mut runners = Vec::new();
        for page in 1..=MAX_PAGES {
            let builder = match &self.scope {
                Scope::Repo { owner, repo } => actions.list_repo_self_hosted_runners(owner, repo),
                Scope::Org(org) => actions.list_org_self_hosted_runners(org),
            };
            let listed = builder
                .per_page(PER_PAGE)
                .page(page)
                .send()
                .await
                .map_err(|e| GitHubError::from("list the runners", e))?;
            let count = listed.items.len();
            runners.extend(listed.items.into_iter().map(|r| RunnerView {
                id: *r.id,
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
        };
        match result.map_err(|e| GitHubError::from(&format!("delete runner {id}"), e)) {
            Ok(()) => Ok(Deleted::Gone),
            Err(e) if e.status() == Some(404) => Ok(Deleted::Gone),
            Err(e) if e.status() == Some(422) => Ok(Deleted::Busy),
            Err(e) => Err(e),
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

    /// How much of the API rate limit is used (0..1), if GitHub says.
    pub(crate) async fn rate_limit_used(&self) -> Option<f64> {
        let limits = tokio::time::timeout(Duration::from_secs(10), self.client.ratelimit().get())
            .await
            .ok()?
            .ok()?;
        let core = limits.resources.core;
        (core.limit > 0).then(|| 1.0 - core.remaining as f64 / core.limit as f64)
    }
}
