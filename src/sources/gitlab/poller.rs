//! The request loop of one GitLab runner: long-polls `jobs/request` only while there is capacity,
//! acknowledges each job (two-phase commit), backs off on errors, honours `Retry-After`, and
//! pauses the runner loudly when GitLab rejects its token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::config::GitLabRunnerConfig;
use super::metrics::{GitLabMetrics, RequestLabels, RequestResult, RunnerLabels};
use super::report::JobReporter;
use crate::build::{BuildKey, SourceKind};
use crate::gitlab::api::{ApiError, JobRequest, JobUpdate, RunnerApi, RunnerInfo, UpdateAck};
use crate::gitlab::payload::JobPayload;
use crate::gitlab::register::{self, RegisterError};
use crate::sources::health::{Access, Failing, HealthTracker, Words};
use crate::sources::job_metrics::JobMetrics;
use crate::sources::pacer::Pacer;
use crate::sources::{Chain, Health, Slot};
use crate::telemetry::Metrics;

/// How often a paused runner checks whether its token works again.
const PAUSED_RECHECK: Duration = Duration::from_secs(60);
/// The first wait between retries after errors, and the longest.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How a runner's health shows: after three job requests in a row without an answer from
/// GitLab (transport errors, 5xx), the runner counts as cut off from GitLab.
const WORDS: Words = Words {
    checking: "verifying",
    rejected: "paused: token rejected",
    failing: Failing::UnreachableAfter {
        after: 3,
        state: "GitLab unreachable",
    },
};

/// One configured GitLab runner and its live state.
#[derive(Debug)]
pub struct Runner {
    /// Its name in logs and metrics.
    pub name: String,
    config: GitLabRunnerConfig,
    system_id: String,
    api: RunnerApi,
    info: RunnerInfo,
    last_update: std::sync::Mutex<Option<String>>,
    verify_gate: tokio::sync::Mutex<()>,
    metrics: Arc<GitLabMetrics>,
    /// The job counts, for jobs this runner fails before any build exists.
    jobs: Arc<JobMetrics>,
    /// Whether GitLab accepted the token (paused when it rejected it) and answers.
    health: HealthTracker,
    /// The CA certificates of `tls_ca_file` (PEM), handed to builds.
    tls_ca: Option<String>,
}

/// A job GitLab assigned to this coordinator, holding its capacity until dropped.
#[derive(Debug)]
pub struct ClaimedJob {
    /// Identifies it.
    pub key: BuildKey,
    /// The runner that took it.
    pub runner: Arc<Runner>,
    /// The typed job.
    pub job: Box<JobPayload>,
    /// The job JSON as GitLab sent it.
    pub raw: serde_json::Value,
    /// The capacity it occupies.
    pub slot: Slot,
}

impl Runner {
    /// A runner from its config entry (`index` names it when it has no name).
    ///
    /// # Errors
    /// An unusable URL.
    pub fn new(
        config: &GitLabRunnerConfig,
        index: usize,
        executor: &str,
        images: bool,
        cache: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, ApiError> {
        let system_id = config.system_id.clone().unwrap_or_else(|| {
            let id = register::new_system_id();
            tracing::warn!(runner = %config.display_name(index), system_id = %id, "no system_id in the config; using a generated one (run `kiln register` to store a stable one)");
            id
        });
        let tls_ca = config.tls_ca()?;
        let ca_path = config
            .tls_ca_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Ok(Arc::new(Self {
            name: config.display_name(index),
            api: RunnerApi::trusting(
                &config.url,
                tls_ca
                    .as_deref()
                    .map(|pem| (ca_path.as_str(), pem.as_bytes())),
            )?,
            tls_ca,
            config: config.clone(),
            system_id,
            info: RunnerInfo::new(executor, images, cache),
            last_update: std::sync::Mutex::new(None),
            verify_gate: tokio::sync::Mutex::new(()),
            metrics: metrics.stage(),
            jobs: metrics.stage(),
            health: HealthTracker::new(&config.url, WORDS, Access::Checking),
        }))
    }

    /// GitLab's base URL.
    pub fn url(&self) -> &str {
        &self.config.url
    }

    /// The CA certificates (PEM) of `tls_ca_file`, if set.
    pub fn tls_ca(&self) -> Option<&str> {
        self.tls_ca.as_deref()
    }

    /// The per-runner job limit (0: none).
    pub fn limit(&self) -> usize {
        self.config.limit
    }

    /// Whether GitLab accepted the token and the runner is not paused (whether or not GitLab
    /// answers right now).
    fn is_verified(&self) -> bool {
        self.health.access() == Access::Accepted
    }

    /// The runner's state: paused, GitLab unreachable, ready or verifying.
    pub fn health(&self) -> Health {
        self.health.health()
    }

    fn labels(&self) -> RunnerLabels {
        RunnerLabels {
            runner: self.name.clone(),
        }
    }

    fn set_paused(&self, paused: bool) {
        let before = if paused {
            self.health.reject()
        } else {
            self.health.accept()
        };
        let was = before == Access::Rejected;
        self.metrics
            .runner_paused
            .get_or_create(&self.labels())
            .set(i64::from(paused));
        if paused && !was {
            tracing::error!(
                runner = %self.name,
                url = %crate::net::redact_url(&self.config.url),
                "GitLab rejected this runner's token (403): the runner is PAUSED and takes no jobs. \
                 The runner was probably deleted or its token reset; register it again \
                 (`kiln register`) and update the config. Rechecking every {}s.",
                PAUSED_RECHECK.as_secs()
            );
        } else if !paused && was {
            tracing::info!(runner = %self.name, "token accepted again; runner resumed");
        }
    }

    /// Verifies the token (`runners/verify`) until it works or `shutdown`; pollers of the
    /// same runner share one verification.
    async fn ensure_verified(&self, shutdown: &CancellationToken) -> bool {
        let _gate = tokio::select! {
            gate = self.verify_gate.lock() => gate,
            () = shutdown.cancelled() => return false,
        };
        let mut pacer = Pacer::new(FIRST_BACKOFF, MAX_BACKOFF);
        while !self.is_verified() {
            let verified = register::verify(
                &self.config.url,
                &self.config.token,
                &self.system_id,
                self.tls_ca.as_deref(),
            )
            .await;
            match verified {
                Ok(_) => {
                    self.set_paused(false);
                    tracing::info!(runner = %self.name, url = %crate::net::redact_url(&self.config.url), system_id = %self.system_id, "runner token verified");
                    return true;
                }
                Err(RegisterError::Failed { status: 404, .. }) => {
                    // No verify endpoint on this path (an old GitLab, or a proxy that only
                    // routes the job API): the first jobs/request answer decides instead.
                    tracing::warn!(runner = %self.name, url = %crate::net::redact_url(&self.config.url), "runners/verify answered 404; relying on jobs/request to check the token");
                    return true;
                }
                Err(RegisterError::Rejected { .. }) => {
                    self.set_paused(true);
                    if sleep_or_shutdown(PAUSED_RECHECK, shutdown).await {
                        return false;
                    }
                }
                Err(e) => {
                    let backoff = pacer.failed();
                    tracing::warn!(runner = %self.name, error = %e, "cannot verify the runner token; retrying in {}s", backoff.as_secs());
                    if sleep_or_shutdown(jitter(backoff), shutdown).await {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Two-phase commit: tells GitLab the runner really started the job. Returns false when
    /// GitLab says the job is no longer ours (then it must not run).
    pub(crate) async fn acknowledge(&self, job: &JobPayload) -> bool {
        let update = JobUpdate {
            token: &job.token,
            state: "running",
            failure_reason: None,
            exit_code: None,
            output: None,
        };
        for attempt in 1..=3u32 {
            match self.api.update_job(job.id, &update).await {
                Ok(UpdateAck::Gone(_)) => return false,
                Ok(_) => return true,
                Err(e) if e.is_transient() && attempt < 3 => {
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                }
                Err(e) => {
                    // The job is ours; running it is better than leaving it assigned and idle.
                    tracing::warn!(runner = %self.name, job = job.id, error = %e, "could not acknowledge the job; running it anyway");
                    return true;
                }
            }
        }
        true
    }

    /// A handle to report on `job` (fail it, ask whether it still runs).
    pub fn reporter(&self, job: &JobPayload) -> JobReporter {
        JobReporter::new(self.api.clone(), job.clone(), self.name.clone())
    }
}

/// Polls `jobs/request` for `runner` until `shutdown`, handing each job to `dispatch`.
///
/// Capacity comes first: no request is sent without a free slot, because GitLab assigns the
/// job the moment it answers; and the slot comes only when the executor can start a build at
/// once, so a burst waits in GitLab's queue (where other runners may take it), not in kiln.
pub async fn poll<F>(
    runner: Arc<Runner>,
    chain: Arc<dyn Chain>,
    dispatch: impl Fn(ClaimedJob) -> F + Send + Sync,
    shutdown: CancellationToken,
) where
    F: Future<Output = ()> + Send,
{
    let mut pacer = Pacer::new(FIRST_BACKOFF, MAX_BACKOFF);
    loop {
        if !runner.is_verified() && !runner.ensure_verified(&shutdown).await {
            return;
        }
        if shutdown.is_cancelled() {
            return;
        }
        let Some(permit) = chain.slot().await else {
            return;
        };
        let last_update = runner
            .last_update
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let started = Instant::now();
        let request = runner.api.request_job(
            &runner.config.token,
            &runner.system_id,
            last_update.as_deref(),
            &runner.info,
            runner.config.poll_timeout,
            runner.config.max_job_payload_bytes(),
        );
        tokio::pin!(request);
        // Shutdown never aborts a request in flight: GitLab may be handing it a job at this
        // very moment, and a job whose answer nobody reads hangs "running" until GitLab's
        // timeout. The request ends within the long-poll hold; its job is launched, and no
        // new request follows (the slot and verification below see the shutdown).
        let answer = tokio::select! {
            answer = &mut request => answer,
            () = shutdown.cancelled() => {
                tracing::info!(runner = %runner.name, "shutting down: waiting for the job request in flight (a job it brings is still run)");
                request.await
            }
        };
        runner
            .metrics
            .poll_duration
            .get_or_create(&runner.labels())
            .observe(started.elapsed().as_secs_f64());
        let result = match &answer {
            Ok(JobRequest::Job { .. } | JobRequest::Unusable { .. }) => RequestResult::Job,
            Ok(JobRequest::NoJob { .. }) => RequestResult::NoJob,
            Ok(JobRequest::Forbidden) => RequestResult::Forbidden,
            Ok(JobRequest::RateLimited { .. }) => RequestResult::RateLimited,
            Err(_) => RequestResult::Error,
        };
        runner
            .metrics
            .job_requests
            .get_or_create(&RequestLabels {
                runner: runner.name.clone(),
                result,
            })
            .inc();
        if matches!(
            answer,
            Ok(JobRequest::Job { .. } | JobRequest::NoJob { .. })
        ) {
            runner.health.accept_unless_rejected();
        }
        match &answer {
            Ok(JobRequest::RateLimited { .. }) => runner
                .health
                .answered(Some("GitLab rate-limits this runner (429)".to_owned())),
            Ok(JobRequest::Forbidden) => runner
                .health
                .answered(Some("GitLab rejected the runner token (403)".to_owned())),
            Ok(_) => runner.health.succeeded(),
            Err(e) => runner.health.failed(crate::net::error_chain(e)),
        }
        match answer {
            Ok(JobRequest::Job { job, raw }) => {
                pacer.succeeded();
                let key = BuildKey {
                    source: SourceKind::GitLab,
                    runner: runner.name.clone(),
                    id: job.id,
                };
                if let Some(queued) = job
                    .job_info
                    .time_in_queue_seconds
                    .filter(|s| s.is_finite() && *s >= 0.0)
                {
                    runner
                        .metrics
                        .queue_time
                        .get_or_create(&runner.labels())
                        .observe(queued);
                }
                tracing::info!(job = %key, name = %job.job_info.name, project = %job.job_info.project_name, "received job");
                // The source writes the job down, acknowledges it, and launches it.
                dispatch(ClaimedJob {
                    key,
                    runner: Arc::clone(&runner),
                    job,
                    raw,
                    slot: permit,
                })
                .await;
            }
            Ok(JobRequest::NoJob { last_update }) => {
                pacer.succeeded();
                if last_update.is_some() {
                    *runner.last_update.lock().unwrap_or_else(|e| e.into_inner()) = last_update;
                }
                // A 204 that came back before the check interval was up was not held by a long
                // poll (no Workhorse in front, or a proxy that answers at once, or a paused
                // runner): wait out the interval as gitlab-runner does instead of asking again
                // at once, so one runner sends at most ~20 requests a minute.
                let rest = jitter(runner.config.check_interval).saturating_sub(started.elapsed());
                if !rest.is_zero() {
                    drop(permit);
                    if sleep_or_shutdown(rest, &shutdown).await {
                        return;
                    }
                }
            }
            Ok(JobRequest::Unusable {
                job,
                reason,
                problem,
            }) => {
                pacer.succeeded();
                drop(permit);
                let key = BuildKey {
                    source: SourceKind::GitLab,
                    runner: runner.name.clone(),
                    id: job.id,
                };
                tracing::error!(job = %key, %problem, "GitLab assigned a job kiln cannot run; failing it");
                let reporter = runner.reporter(&job);
                let jobs = Arc::clone(&runner.jobs);
                let runner_name = runner.name.clone();
                tokio::spawn(async move {
                    if let Err(e) = reporter.fail(reason, &problem).await {
                        tracing::error!(job = %key, error = %e, "could not fail the job in GitLab; GitLab will time it out");
                    }
                    jobs.finished(&runner_name, false, job.accepted_reason(reason));
                });
            }
            Ok(JobRequest::Forbidden) => {
                drop(permit);
                runner.set_paused(true);
                if sleep_or_shutdown(PAUSED_RECHECK, &shutdown).await {
                    return;
                }
            }
            Ok(JobRequest::RateLimited { retry_after }) => {
                drop(permit);
                let backoff = pacer.failed();
                let wait = retry_after.unwrap_or(backoff).max(Duration::from_secs(1));
                tracing::warn!(runner = %runner.name, "GitLab rate-limits this runner (429); waiting {}s", wait.as_secs());
                if sleep_or_shutdown(wait, &shutdown).await {
                    return;
                }
            }
            Err(e) => {
                drop(permit);
                let backoff = pacer.failed();
                tracing::warn!(runner = %runner.name, error = %e, "requesting a job failed; retrying in {}s", backoff.as_secs());
                if sleep_or_shutdown(jitter(backoff), &shutdown).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps; true when `shutdown` came first.
async fn sleep_or_shutdown(duration: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => false,
        () = shutdown.cancelled() => true,
    }
}

/// ±20 % so many coordinators do not retry in lockstep.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(rand::rng().random_range(0.8..1.2))
}
