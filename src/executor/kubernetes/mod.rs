//! The Kubernetes executor: one pod per build, created under a deterministic name, watched to
//! its end, classified when it fails for reasons its agent cannot report, and deleted with its
//! Secret. Builds outlive the coordinator: a new one adopts them from their labels.

mod classify;
mod client;
pub mod config;
pub(crate) mod podspec;
mod quantity;
mod watch;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use tokio_util::sync::CancellationToken;

use super::{Executor, ExecutorError, Launch, RunReport, StillWanted};
use crate::agent::AgentJob;
use crate::job::{FailureReason, JobKey, SourceKind};
use crate::sources::gitlab::payload::JobPayload;
pub(crate) use classify::Ending;
use classify::{Limits, Memory, Verdict};
pub use client::ClusterError;
use client::{Cluster, is_status};
pub use config::KubernetesConfig;
use podspec::{JOB_KEY, LABEL_COORDINATOR, PodInput};
pub(crate) use watch::Subscription;
use watch::{PodSeen, PodWatch};

/// Grace period when kiln deletes a pod whose build container has ended: only sidecars are
/// left, and they must not keep the pod (and its bill) alive.
const DELETE_GRACE_SECONDS: u32 = 2;
/// How long a created pod may stay unseen by the watch before kiln reads it directly.
const UNSEEN_RECHECK: Duration = Duration::from_secs(10);
/// How often kiln asks GitLab about a job whose pod has not started yet (at most).
const WANTED_CHECK: Duration = Duration::from_secs(30);
/// How often a build with no pending timeout is looked at even without changes.
const IDLE_RECHECK: Duration = Duration::from_secs(300);
/// API calls that start a build: create the Secret, create the pod, make the pod its owner.
const START_CALLS: f64 = 3.0;

/// Runs each build as a pod.
pub struct KubernetesExecutor {
    cluster: Arc<Cluster>,
    config: Arc<KubernetesConfig>,
    pods: PodWatch,
    selector: String,
    runner_classes: HashMap<String, String>,
    shutdown: CancellationToken,
}

impl KubernetesExecutor {
    /// Connects to the cluster, checks kiln's permissions and starts watching its pods.
    /// `runner_classes` maps runner names to the resource class their jobs use.
    ///
    /// # Errors
    /// No cluster configuration, an unreachable API server, or a missing permission (named).
    pub async fn connect(
        config: &KubernetesConfig,
        runner_classes: HashMap<String, String>,
        shutdown: CancellationToken,
    ) -> Result<Self, ClusterError> {
        let cluster = Cluster::connect(config).await?;
        cluster.check_permissions().await?;
        let selector = format!("{LABEL_COORDINATOR}={}", config.coordinator);
        let pods = PodWatch::start(cluster.api(), selector.clone(), shutdown.clone());
        tracing::info!(namespace = cluster.namespace(), selector = %selector, "connected to Kubernetes");
        Ok(Self {
            cluster: Arc::new(cluster),
            config: Arc::new(config.clone()),
            pods,
            selector,
            runner_classes,
            shutdown,
        })
    }

    fn limits(&self, main: &'static str) -> Limits {
        Limits {
            main,
            pending_timeout: self.config.pending_timeout,
            image_pull_grace: self.config.image_pull_grace,
        }
    }

    async fn run_build(
        &self,
        launch: Launch,
        cancel: CancellationToken,
    ) -> Result<RunReport, ExecutorError> {
        let key = launch.key.clone();
        let name = key.resource_name();
        let prepare = |message: String| ExecutorError::Prepare {
            job: key.clone(),
            message,
        };
        let agent_job: AgentJob = serde_json::from_slice(&launch.job_file)
            .map_err(|e| prepare(format!("job file: {e}")))?;
        let job: JobPayload = serde_json::from_value(agent_job.job.clone())
            .map_err(|e| prepare(format!("job: {e}")))?;
        let input = PodInput {
            key: &key,
            job: &job,
            runner_class: self
                .runner_classes
                .get(&agent_job.runner)
                .map(String::as_str),
            config: &self.config,
            namespace: self.cluster.namespace(),
        };
        let mut subscription = self.pods.subscribe(&name);
        let pod = match podspec::pod(&input) {
            Ok(pod) => Some(pod),
            Err(e) => {
                // A restarted coordinator whose config changed may not be able to build the
                // pod of a job it adopts: the pod that runs it is what counts.
                let pods: Api<Pod> = self.cluster.api();
                if let Ok(Some(_)) = self.cluster.call(|| pods.get_opt(&name)).await {
                    tracing::warn!(job = %key, pod = %name, error = %e, "the current config could not build this pod; following the one that runs");
                    None
                } else {
                    self.remove(&name).await;
                    return Ok(RunReport::failed(
                        FailureReason::RunnerConfigurationError,
                        e.0,
                    ));
                }
            }
        };
        let secret = podspec::secret(&input, &launch.job_file);
        if let Some(pod) = &pod {
            match self.create(pod, &secret).await {
                Ok(()) => {}
                Err(Create::Rejected(message)) => {
                    return Ok(RunReport::failed(
                        FailureReason::RunnerConfigurationError,
                        message,
                    ));
                }
                Err(Create::Failed(what, e)) => return Err(self.start_error(&key, what, &e)),
            }
        }
        // A build is followed for as long as it runs: keep neither the job nor its pod spec nor
        // its Secret meanwhile (with many builds they were most of kiln's memory).
        let still_wanted = launch.still_wanted.clone();
        drop((pod, secret, job, agent_job, launch));

        let ending = match self
            .watch_pod(
                &name,
                podspec::BUILD_CONTAINER,
                &mut subscription,
                &cancel,
                still_wanted.as_ref(),
            )
            .await
        {
            Some(ending) => ending,
            None => {
                tracing::info!(job = %key, pod = %name, "coordinator stopping; the build pod keeps running and will be adopted");
                return Ok(RunReport {
                    result: None,
                    detail: "the coordinator stopped following the build".into(),
                    reason: FailureReason::RunnerSystemFailure,
                    detached: true,
                });
            }
        };
        let detail = ending.detail.clone();
        self.remove(&name).await;
        tracing::info!(job = %key, pod = %name, %detail, "build pod finished and deleted");
        Ok(RunReport {
            result: ending.result,
            detail,
            reason: ending.reason,
            detached: false,
        })
    }

    /// Creates the Secret, then the pod, then makes the pod the Secret's owner. The Secret
    /// comes first: if kiln dies right after, a restarted coordinator still has the job (and
    /// its token) to start or fail it. An existing pod of that name (a restarted coordinator's
    /// earlier launch) is adopted, never duplicated.
    async fn create(&self, pod: &Pod, secret: &Secret) -> Result<(), Create> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let secrets: Api<Secret> = self.cluster.api();
        let create = PostParams::default();
        match self.cluster.call(|| secrets.create(&create, secret)).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 409) => {}
            Err(e) => return Err(Create::Failed("create the job Secret", e)),
        }
        let pods: Api<Pod> = self.cluster.api();
        let uid = match self.cluster.call(|| pods.create(&create, pod)).await {
            Ok(created) => {
                tracing::info!(pod = %name, namespace = self.cluster.namespace(), "pod created");
                created.metadata.uid
            }
            Err(e) if is_status(&e, 409) => match self.cluster.call(|| pods.get(&name)).await {
                Ok(existing) => {
                    tracing::info!(pod = %name, "pod exists already; following it");
                    existing.metadata.uid
                }
                Err(e) => return Err(Create::Failed("read the existing pod", e)),
            },
            Err(kube::Error::Api(status)) if matches!(status.code, 400 | 422) => {
                self.remove(&name).await;
                return Err(Create::Rejected(format!(
                    "the Kubernetes API rejected the pod ({}): {}",
                    status.reason, status.message
                )));
            }
            Err(e) => {
                self.remove(&name).await;
                return Err(Create::Failed("create the pod", e));
            }
        };
        if let Some(uid) = uid {
            self.own_secret(&name, &uid).await;
        }
        Ok(())
    }

    /// Follows the pod until its build ends; `None` when `cancel` fires first.
    async fn follow(
        &self,
        name: &str,
        main: &'static str,
        subscription: &mut Subscription,
        cancel: &CancellationToken,
        still_wanted: Option<&StillWanted>,
    ) -> Option<Ending> {
        let limits = self.limits(main);
        let mut memory = Memory::default();
        let mut last: Option<Arc<Pod>> = None;
        let mut unseen_checks = 0u32;
        // While the pod has not started, nothing in it can notice a cancel in the CI server:
        // ask now and then, so a canceled job does not keep a Pending pod for pending_timeout.
        let wanted_every = (self.config.pending_timeout / 4).min(WANTED_CHECK);
        let mut next_wanted_check = tokio::time::Instant::now() + wanted_every;
        loop {
            let seen = subscription.changes.borrow_and_update().clone();
            let snapshot = match seen {
                PodSeen::Present(pod) => Some(pod),
                PodSeen::Gone(final_state) => {
                    let final_state = final_state.or_else(|| last.clone());
                    if let Some(pod) = final_state.as_deref()
                        && let Verdict::Ended(ending) =
                            classify::classify(pod, Timestamp::now(), limits, &mut memory)
                        && ending.result.as_ref().is_some_and(|r| r.reported)
                    {
                        return Some(ending);
                    }
                    return Some(classify::deleted(final_state.as_deref()));
                }
                PodSeen::Unknown if unseen_checks > 0 => {
                    // The watch has not shown the pod yet (or is failing): read it directly.
                    let pods: Api<Pod> = self.cluster.api();
                    match self.cluster.call(|| pods.get_opt(name)).await {
                        Ok(Some(pod)) => Some(Arc::new(pod)),
                        Ok(None) => return Some(classify::deleted(last.as_deref())),
                        Err(e) => {
                            tracing::warn!(pod = name, error = %e, "cannot read the build pod");
                            None
                        }
                    }
                }
                PodSeen::Unknown => None,
            };
            let mut recheck = match snapshot {
                Some(pod) => {
                    let verdict = classify::classify(&pod, Timestamp::now(), limits, &mut memory);
                    last = Some(pod);
                    match verdict {
                        Verdict::Ended(ending) => return Some(ending),
                        Verdict::Wait { recheck } => recheck.unwrap_or(IDLE_RECHECK),
                    }
                }
                None => {
                    unseen_checks += 1;
                    UNSEEN_RECHECK
                }
            };
            if let Some(still_wanted) = still_wanted
                && !last.as_deref().is_some_and(started)
            {
                let now = tokio::time::Instant::now();
                if now >= next_wanted_check {
                    if !still_wanted.ask().await {
                        return Some(classify::canceled_before_start());
                    }
                    next_wanted_check = now + wanted_every;
                }
                recheck = recheck.min(next_wanted_check.saturating_duration_since(now));
            }
            tokio::select! {
                _ = subscription.changes.changed() => unseen_checks = 0,
                () = tokio::time::sleep(recheck) => {}
                () = cancel.cancelled() => return None,
            }
        }
    }

    /// Sets the pod as the owner of the job Secret, so Kubernetes deletes the Secret with the
    /// pod even if kiln never gets to.
    async fn own_secret(&self, name: &str, uid: &str) {
        let secrets: Api<Secret> = self.cluster.api();
        let patch = serde_json::json!({
            "metadata": {"ownerReferences": [OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: name.to_owned(),
                uid: uid.to_owned(),
                block_owner_deletion: Some(false),
                controller: Some(false),
            }]}
        });
        let params = PatchParams::default();
        let patch = Patch::Merge(&patch);
        if let Err(e) = self
            .cluster
            .call(|| secrets.patch(name, &params, &patch))
            .await
        {
            tracing::warn!(secret = name, error = %e, "cannot set the pod as owner of the job Secret; kiln deletes it itself after the build");
        }
    }

    /// Deletes the pod and its Secret; missing ones are fine.
    async fn remove(&self, name: &str) {
        let params = DeleteParams {
            grace_period_seconds: Some(DELETE_GRACE_SECONDS),
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        let pods: Api<Pod> = self.cluster.api();
        match self.cluster.call(|| pods.delete(name, &params)).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => {
                tracing::error!(pod = name, error = %e, "cannot delete the build pod; the next start-up of kiln retries")
            }
        }
        let secrets: Api<Secret> = self.cluster.api();
        let plain = DeleteParams::default();
        match self.cluster.call(|| secrets.delete(name, &plain)).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => {
                tracing::warn!(secret = name, error = %e, "cannot delete the job Secret; Kubernetes collects it with its pod")
            }
        }
    }

    /// The pod's recent warning events, as `; events: Reason: message, …`.
    async fn warning_events(&self, name: &str) -> String {
        let events: Api<Event> = self.cluster.api();
        let params = ListParams::default().fields(&format!("involvedObject.name={name}"));
        let Ok(list) = self.cluster.call(|| events.list(&params)).await else {
            return String::new();
        };
        let mut seen = HashSet::new();
        let lines: Vec<String> = list
            .items
            .iter()
            .rev()
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .filter_map(|e| {
                let line = format!(
                    "{}: {}",
                    e.reason.as_deref().unwrap_or("Warning"),
                    e.message.as_deref().unwrap_or("").trim()
                );
                seen.insert(line.clone()).then_some(line)
            })
            .take(3)
            .collect();
        if lines.is_empty() {
            String::new()
        } else {
            format!("; events: {}", lines.join("; "))
        }
    }

    fn start_error(&self, job: &JobKey, what: &str, error: &kube::Error) -> ExecutorError {
        ExecutorError::Start {
            job: job.clone(),
            message: format!(
                "cannot {what} in namespace `{}`: {}",
                self.cluster.namespace(),
                describe(error)
            ),
        }
    }

    async fn recover_builds(&self) -> Result<Vec<Launch>, ExecutorError> {
        let selector = format!(
            "{},{}={}",
            self.selector,
            podspec::LABEL_SOURCE,
            SourceKind::GitLab.name()
        );
        let params = ListParams::default().labels(&selector);
        let secrets: Api<Secret> = self.cluster.api();
        let pods: Api<Pod> = self.cluster.api();
        let list_error = |what: &str, e: kube::Error| ExecutorError::Recover {
            message: format!(
                "cannot list {what} in namespace `{}`: {}",
                self.cluster.namespace(),
                describe(&e)
            ),
        };
        let secrets = self
            .cluster
            .call(|| secrets.list(&params))
            .await
            .map_err(|e| list_error("the job Secrets", e))?;
        let pods = self
            .cluster
            .call(|| pods.list(&params))
            .await
            .map_err(|e| list_error("the build pods", e))?;
        let mut launches = Vec::new();
        let mut with_job = HashSet::new();
        for secret in secrets.items {
            let name = secret.metadata.name.clone().unwrap_or_default();
            let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(JOB_KEY)) else {
                tracing::warn!(secret = %name, "a kiln Secret without a job file; deleting it");
                self.remove(&name).await;
                continue;
            };
            let parsed = serde_json::from_slice::<AgentJob>(&bytes.0)
                .ok()
                .and_then(|job| {
                    let payload: JobPayload = serde_json::from_value(job.job.clone()).ok()?;
                    Some((job, payload))
                });
            let Some((agent_job, payload)) = parsed else {
                tracing::error!(secret = %name, "the job file in this Secret cannot be read; deleting the build");
                self.remove(&name).await;
                continue;
            };
            let key = JobKey {
                source: SourceKind::GitLab,
                runner: agent_job.runner.clone(),
                id: payload.id,
            };
            if key.resource_name() != name {
                tracing::warn!(secret = %name, "a kiln Secret whose name does not match its job; leaving it alone");
                continue;
            }
            with_job.insert(name);
            launches.push(Launch {
                key,
                job_file: bytes.0.clone(),
                timeout: payload.timeout(),
                still_wanted: None,
            });
        }
        for pod in pods.items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            if with_job.contains(&name) || pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            // No job file: kiln cannot report for this build. Its agent still can; delete the
            // pod once it has ended.
            tracing::warn!(pod = %name, "a build pod without its job Secret; it is deleted when it ends");
            let subscription = self.pods.subscribe(&name);
            let this = self.detached_handle();
            tokio::spawn(async move {
                let mut subscription = subscription;
                let shutdown = this.shutdown.clone();
                if this
                    .follow(
                        &name,
                        podspec::BUILD_CONTAINER,
                        &mut subscription,
                        &shutdown,
                        None,
                    )
                    .await
                    .is_some()
                {
                    this.remove(&name).await;
                }
            });
        }
        Ok(launches)
    }

    fn detached_handle(&self) -> Self {
        Self {
            cluster: Arc::clone(&self.cluster),
            config: Arc::clone(&self.config),
            pods: self.pods.clone(),
            selector: self.selector.clone(),
            runner_classes: self.runner_classes.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

/// Whether any container of the pod has started (then its agent notices cancels itself).
fn started(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.state.as_ref().is_some_and(|s| s.waiting.is_none()))
        })
}

/// Why objects could not be created.
enum Create {
    /// The API server refused the pod as invalid (a configuration problem).
    Rejected(String),
    /// A call failed: what kiln tried, and the error.
    Failed(&'static str, kube::Error),
}

/// Pods of other sources (Jenkins agents): created, followed and deleted like build pods.
impl KubernetesExecutor {
    /// The executor's settings (resource classes, security profile, pod patch).
    pub(crate) fn settings(&self) -> &KubernetesConfig {
        &self.config
    }

    /// The namespace pods go to.
    pub(crate) fn namespace(&self) -> &str {
        self.cluster.namespace()
    }

    /// Starts following pod `name` (before creating it, so no change is missed).
    pub(crate) fn subscribe(&self, name: &str) -> Subscription {
        self.pods.subscribe(name)
    }

    /// Creates `secret` and `pod` (see [`Self::create`]).
    ///
    /// # Errors
    /// A one-line reason.
    pub(crate) async fn start_pod(&self, pod: &Pod, secret: &Secret) -> Result<(), String> {
        self.create(pod, secret).await.map_err(|e| match e {
            Create::Rejected(message) => message,
            Create::Failed(what, e) => format!(
                "cannot {what} in namespace `{}`: {}",
                self.cluster.namespace(),
                describe(&e)
            ),
        })
    }

    /// Follows a subscribed pod until its `main` container ends or the pod fails; `None` when
    /// `cancel` fires first. A stuck-Pending ending carries the pod's warning events.
    pub(crate) async fn watch_pod(
        &self,
        name: &str,
        main: &'static str,
        subscription: &mut Subscription,
        cancel: &CancellationToken,
        still_wanted: Option<&StillWanted>,
    ) -> Option<Ending> {
        let mut ending = self
            .follow(name, main, subscription, cancel, still_wanted)
            .await?;
        if ending.stuck_pending {
            ending.detail = format!("{}{}", ending.detail, self.warning_events(name).await);
        }
        Some(ending)
    }

    /// The pod's recent warning events, as `; events: Reason: message, …` (empty if none).
    pub(crate) async fn pod_events(&self, name: &str) -> String {
        self.warning_events(name).await
    }

    /// Deletes a pod and its Secret.
    pub(crate) async fn delete_pod(&self, name: &str) {
        self.remove(name).await;
    }

    /// kiln's pods of `source`.
    ///
    /// # Errors
    /// The list call failed.
    pub(crate) async fn pods_of(&self, source: SourceKind) -> Result<Vec<Pod>, String> {
        let selector = format!(
            "{},{}={}",
            self.selector,
            podspec::LABEL_SOURCE,
            source.name()
        );
        let params = ListParams::default().labels(&selector);
        let pods: Api<Pod> = self.cluster.api();
        self.cluster
            .call(|| pods.list(&params))
            .await
            .map(|list| list.items)
            .map_err(|e| describe(&e))
    }
}

/// An API error as one line: status, reason and message, or the transport error.
fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            format!("HTTP {} {}: {}", status.code, status.reason, status.message)
        }
        other => other.to_string(),
    }
}

impl Executor for KubernetesExecutor {
    fn run(
        &self,
        launch: Launch,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<RunReport, ExecutorError>> {
        Box::pin(self.run_build(launch, cancel))
    }

    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn runs_images(&self) -> bool {
        true
    }

    fn survives_restart(&self) -> bool {
        true
    }

    fn recover(&self) -> BoxFuture<'_, Result<Vec<Launch>, ExecutorError>> {
        Box::pin(self.recover_builds())
    }

    fn discard(&self, key: JobKey) -> BoxFuture<'_, ()> {
        Box::pin(async move { self.remove(&key.resource_name()).await })
    }

    fn ready(&self) -> BoxFuture<'_, ()> {
        // Room for two starts: the previous build's pod create and Secret patch may still be
        // on their way, and must not make this build's pod create wait.
        Box::pin(self.cluster.until_free(2.0 * START_CALLS))
    }
}
