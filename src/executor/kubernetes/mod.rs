//! The Kubernetes executor: one pod per build, created under the build's deterministic name,
//! watched to its end, classified when it fails for reasons its agent cannot report, and deleted
//! with its Secret. Builds outlive the coordinator: the next one lists them by their labels and
//! follows them without creating anything.

mod classify;
mod client;
pub mod config;
mod lease;
mod ownership;
pub(crate) mod podspec;
mod quantity;
mod watch;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams, PropagationPolicy};
use tokio_util::sync::CancellationToken;

use super::{Claim, Executor, ExecutorError, Footprint, LaunchError, Leases, Watch};
use crate::build::{Build, BuildKey, Ending, Found, SourceKind};
use classify::{Limits, Memory, PodEnd, Verdict};
pub use client::ClusterError;
use client::{Cluster, is_status};
pub use config::KubernetesConfig;
use podspec::{
    ANNOTATION_MAIN, ANNOTATION_RUNNER, BUILD_CONTAINER, LABEL_COORDINATOR, LABEL_JOB_ID,
    LABEL_REPLICA, LABEL_RUNNER, LABEL_SOURCE, OWN_LABELS,
};
use watch::{PodSeen, PodWatch, Subscription};

/// Grace period when kiln deletes a pod whose build container has ended: only sidecars are
/// left, and they must not keep the pod (and its bill) alive.
const DELETE_GRACE_SECONDS: u32 = 2;
/// The annotation holding the id of the launch attempt that created a pod (see `create`).
const ANNOTATION_LAUNCH: &str = "kiln.dev/launch";
/// How long a created pod may stay unseen by the watch before kiln reads it directly.
const UNSEEN_RECHECK: Duration = Duration::from_secs(10);
/// How often kiln asks the CI server about a build whose pod has not started yet (at most).
const WANTED_CHECK: Duration = Duration::from_secs(30);
/// How often a build with no pending timeout is looked at even without changes.
const IDLE_RECHECK: Duration = Duration::from_secs(300);
/// How often a claim is made again when only the build's status moved on meanwhile.
const CLAIM_ATTEMPTS: usize = 3;
/// API calls that start a build: create the Secret, create the pod, make the pod its owner.
const START_CALLS: f64 = 3.0;

/// Runs each build as a pod.
pub struct KubernetesExecutor {
    cluster: Arc<Cluster>,
    config: Arc<KubernetesConfig>,
    pods: PodWatch,
    selector: String,
    /// The uids of Secrets persisted ahead of their build's launch, by build name: the pod is
    /// created owned by its Secret.
    persisted: std::sync::Mutex<HashMap<String, Option<String>>>,
}

impl KubernetesExecutor {
    /// Connects to the cluster, checks kiln's permissions and starts watching its pods.
    ///
    /// # Errors
    /// No cluster configuration, an unreachable API server, or a missing permission (named).
    pub async fn connect(
        config: &KubernetesConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, ClusterError> {
        let cluster = Cluster::connect(config).await?;
        cluster.check_permissions().await?;
        let selector = format!("{LABEL_COORDINATOR}={}", config.coordinator);
        let pods = PodWatch::start(cluster.api(), selector.clone(), shutdown);
        let mut config = config.clone();
        let replica = config.replica_id();
        config.replica = Some(replica.clone());
        tracing::info!(namespace = cluster.namespace(), selector = %selector, %replica, "connected to Kubernetes");
        Ok(Self {
            cluster: Arc::new(cluster),
            config: Arc::new(config),
            pods,
            selector,
            persisted: std::sync::Mutex::default(),
        })
    }

    fn limits<'a>(&self, main: &'a str) -> Limits<'a> {
        Limits {
            main,
            pending_timeout: self.config.pending_timeout,
            image_pull_grace: self.config.image_pull_grace,
        }
    }

    async fn launch_build(&self, build: &Build) -> Result<(), LaunchError> {
        let namespace = self.cluster.namespace();
        let pod =
            podspec::pod(build, &self.config, namespace).map_err(|e| LaunchError::Rejected(e.0))?;
        let secret = podspec::secret(build, &self.config, namespace);
        self.create(&pod, &secret).await
    }

    /// Creates the Secret, then the pod, owned by the Secret: two API calls per build. The
    /// Secret comes first, so the pod never waits for its volume, and a coordinator that dies
    /// right after still leaves the build's secret data (a job token) for the next one to fail
    /// the job with. Owned by the Secret, the pod is collected with it if kiln's own delete
    /// never came. A pod of that name that exists already is never touched: another
    /// coordinator runs that build.
    async fn create(&self, pod: &Pod, secret: &Secret) -> Result<(), LaunchError> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let create = PostParams::default();
        let persisted = self.persisted_lock().remove(&name);
        let (secret_uid, secret_was_there) = match persisted {
            // Created by `persist` for this very launch: removed with it if the pod fails.
            Some(uid) => (uid, false),
            None => self.create_secret(secret).await?,
        };
        let mut pod = pod.clone();
        if let Some(uid) = secret_uid {
            pod.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Secret".into(),
                name: name.clone(),
                uid,
                block_owner_deletion: Some(false),
                controller: Some(false),
            }]);
        }
        let pods: Api<Pod> = self.cluster.api();
        // A create whose answer was lost (connection reset after the API server stored the
        // pod) is retried and then gets 409 for kiln's own pod; without a mark of this attempt
        // kiln took it for another coordinator's and left it running unwatched. The mark tells
        // the two apart.
        let launch_id = format!("{:016x}", rand::random::<u64>());
        pod.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(ANNOTATION_LAUNCH.to_owned(), launch_id.clone());
        match self.cluster.call(|| pods.create(&create, &pod)).await {
            Ok(_) => {
                tracing::info!(pod = %name, namespace = self.cluster.namespace(), "pod created");
                Ok(())
            }
            Err(e) if is_status(&e, 409) => match self.cluster.call(|| pods.get(&name)).await {
                Ok(existing)
                    if existing
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(ANNOTATION_LAUNCH))
                        == Some(&launch_id) =>
                {
                    tracing::info!(pod = %name, namespace = self.cluster.namespace(), "pod created (its create was retried after the first answer was lost)");
                    Ok(())
                }
                _ => Err(LaunchError::Exists(name)),
            },
            Err(kube::Error::Api(status)) if matches!(status.code, 400 | 422) => {
                if !secret_was_there {
                    self.remove(&name).await;
                }
                Err(LaunchError::Rejected(format!(
                    "the Kubernetes API rejected the pod ({}): {}",
                    status.reason, status.message
                )))
            }
            Err(e) => {
                if !secret_was_there {
                    self.remove(&name).await;
                }
                Err(self.failed("create the pod", &e))
            }
        }
    }

    /// Creates the build's Secret: its uid, and whether it was there already (left by an
    /// earlier try).
    async fn create_secret(&self, secret: &Secret) -> Result<(Option<String>, bool), LaunchError> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        let secrets: Api<Secret> = self.cluster.api();
        let create = PostParams::default();
        match self.cluster.call(|| secrets.create(&create, secret)).await {
            Ok(created) => Ok((created.metadata.uid, false)),
            Err(e) if is_status(&e, 409) => {
                // Left by an earlier try: read its uid to own the pod (rare, one call).
                let uid = self
                    .cluster
                    .call(|| secrets.get(&name))
                    .await
                    .ok()
                    .and_then(|s| s.metadata.uid);
                Ok((uid, true))
            }
            Err(e) => Err(self.failed("create the build's Secret", &e)),
        }
    }

    /// Creates `build`'s Secret ahead of its launch (see [`Executor::persist`]).
    async fn persist_build(&self, build: &Build) -> Result<(), LaunchError> {
        let secret = podspec::secret(build, &self.config, self.cluster.namespace());
        let (uid, _) = self.create_secret(&secret).await?;
        self.persisted_lock().insert(build.name.clone(), uid);
        Ok(())
    }

    fn persisted_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<String>>> {
        self.persisted.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failed(&self, what: &str, error: &kube::Error) -> LaunchError {
        LaunchError::Failed(format!(
            "cannot {what} in namespace `{}`: {}",
            self.cluster.namespace(),
            describe(error)
        ))
    }

    async fn watch_build(&self, name: &str, watch: Watch) -> Ending {
        let mut subscription = self.pods.subscribe(name);
        let mut end = match self.follow(name, &mut subscription, &watch).await {
            Followed::Ended(end) => end,
            Followed::Canceled => {
                tracing::info!(
                    pod = name,
                    "coordinator stopping; the build pod keeps running and will be adopted"
                );
                return Ending::lost("the coordinator stopped following the build");
            }
            Followed::Claimed(replica) => {
                tracing::info!(
                    pod = name,
                    %replica,
                    "another replica took the build over; no longer following it"
                );
                return Ending::lost(format!("replica {replica} follows the build now"));
            }
        };
        if end.stuck_pending {
            end.detail = format!("{}{}", end.detail, self.warning_events(name).await);
        }
        end.into_ending()
    }

    /// Follows the pod until its build ends, `watch.cancel` fires, or another replica claims
    /// it.
    async fn follow(&self, name: &str, subscription: &mut Subscription, watch: &Watch) -> Followed {
        let mut main = BUILD_CONTAINER.to_owned();
        let mut memory = Memory::default();
        let mut last: Option<Arc<Pod>> = None;
        let mut unseen_checks = 0u32;
        let mut running = false;
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
                    // Deleted by the replica that took it over: its end is that one's.
                    if let Some(replica) = final_state
                        .as_deref()
                        .and_then(|pod| self.claimed_by_other(pod))
                    {
                        return Followed::Claimed(replica);
                    }
                    if let Some(pod) = final_state.as_deref() {
                        let limits = self.limits(main_container(pod).unwrap_or(&main));
                        if let Verdict::Ended(end) =
                            classify::classify(pod, Timestamp::now(), limits, &mut memory)
                            && end.result.as_ref().is_some_and(|r| r.reported)
                        {
                            return Followed::Ended(end);
                        }
                    }
                    return Followed::Ended(classify::deleted(final_state.as_deref()));
                }
                PodSeen::Unknown if unseen_checks > 0 => {
                    // The watch has not shown the pod yet (or is failing): read it directly.
                    let pods: Api<Pod> = self.cluster.api();
                    match self.cluster.call(|| pods.get_opt(name)).await {
                        Ok(Some(pod)) => Some(Arc::new(pod)),
                        Ok(None) => return Followed::Ended(classify::deleted(last.as_deref())),
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
                    if let Some(replica) = self.claimed_by_other(&pod) {
                        return Followed::Claimed(replica);
                    }
                    if let Some(named) = main_container(&pod) {
                        named.clone_into(&mut main);
                    }
                    let verdict =
                        classify::classify(&pod, Timestamp::now(), self.limits(&main), &mut memory);
                    if !running && started(&pod, &main) {
                        running = true;
                        if let Some(on_running) = &watch.on_running {
                            on_running.call();
                        }
                    }
                    last = Some(pod);
                    match verdict {
                        Verdict::Ended(end) => return Followed::Ended(end),
                        Verdict::Wait { recheck } => recheck.unwrap_or(IDLE_RECHECK),
                    }
                }
                None => {
                    unseen_checks += 1;
                    UNSEEN_RECHECK
                }
            };
            if let Some(still_wanted) = &watch.still_wanted
                && !last.as_deref().is_some_and(|pod| started(pod, &main))
            {
                let now = tokio::time::Instant::now();
                if now >= next_wanted_check {
                    if !still_wanted.ask().await {
                        return Followed::Ended(classify::canceled_before_start());
                    }
                    next_wanted_check = now + wanted_every;
                }
                recheck = recheck.min(next_wanted_check.saturating_duration_since(now));
            }
            tokio::select! {
                _ = subscription.changes.changed() => unseen_checks = 0,
                () = tokio::time::sleep(recheck) => {}
                () = watch.cancel.cancelled() => return Followed::Canceled,
            }
        }
    }

    /// The replica the pod is labelled with when that is not this one: another replica has
    /// taken the build over.
    fn claimed_by_other(&self, pod: &Pod) -> Option<String> {
        let mine = self.config.replica.as_deref()?;
        let labelled = pod.metadata.labels.as_ref()?.get(LABEL_REPLICA)?;
        (labelled != mine).then(|| labelled.clone())
    }

    /// Deletes the pod and its Secret; missing ones are fine.
    async fn remove(&self, name: &str) {
        self.persisted_lock().remove(name);
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
                tracing::warn!(secret = name, error = %e, "cannot delete the build's Secret; the next start-up of kiln retries")
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

    /// Whether pod `name` ever existed, from the events the scheduler and kubelet recorded
    /// about it (`Scheduled`, `FailedScheduling`, `Pulled`, `Killing`, …; kept an hour by
    /// default): asked only of a build whose Secret outlived its pod. `None` when the events
    /// cannot be read.
    async fn pod_had_events(&self, name: &str) -> Option<bool> {
        let events: Api<Event> = self.cluster.api();
        let params = ListParams::default().fields(&format!("involvedObject.name={name}"));
        match self.cluster.call(|| events.list(&params)).await {
            Ok(list) => Some(
                list.items
                    .iter()
                    .any(|e| e.involved_object.kind.as_deref().is_none_or(|k| k == "Pod")),
            ),
            Err(e) => {
                tracing::warn!(pod = name, error = %e, "cannot read the events of a build whose pod is gone");
                None
            }
        }
    }
}

/// The container whose end is the build's end, as the pod names it.
fn main_container(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_MAIN)
        .map(String::as_str)
}

/// The work a kiln object is for, from its labels (and the exact source name annotated).
fn key_of(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<BuildKey> {
    let labels = metadata.labels.as_ref()?;
    let source = SourceKind::from_name(labels.get(LABEL_SOURCE)?)?;
    let id = labels.get(LABEL_JOB_ID)?.parse().ok()?;
    let runner = metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_RUNNER))
        .or_else(|| labels.get(LABEL_RUNNER))?
        .clone();
    Some(BuildKey { source, runner, id })
}

/// The replica a kiln object is labelled with.
fn replica_of(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<String> {
    metadata.labels.as_ref()?.get(LABEL_REPLICA).cloned()
}

/// How following a pod ended.
enum Followed {
    /// Its build ended.
    Ended(PodEnd),
    /// The coordinator stopped following (shutdown).
    Canceled,
    /// Another replica (named) took it over.
    Claimed(String),
}

/// The labels a source put on a build, without kiln's own.
fn foreign_labels(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> BTreeMap<String, String> {
    let mut labels = metadata.labels.clone().unwrap_or_default();
    labels.retain(|key, _| !OWN_LABELS.contains(&key.as_str()));
    labels
}

/// Whether the pod's main container has started (then its agent notices cancels itself).
fn started(pod: &Pod, main: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.name == main && c.state.as_ref().is_some_and(|s| s.waiting.is_none()))
        })
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
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn runs_images(&self) -> bool {
        true
    }

    fn survives_restart(&self) -> bool {
        true
    }

    fn ready(&self) -> BoxFuture<'_, ()> {
        // Room for two starts: the previous build's pod create and Secret patch may still be
        // on their way, and must not make this build's pod create wait.
        Box::pin(self.cluster.until_free(2.0 * START_CALLS))
    }

    fn footprint(&self, build: &Build) -> Option<Footprint> {
        podspec::footprint(build, &self.config)
    }

    fn persist<'a>(&'a self, build: &'a Build) -> BoxFuture<'a, Result<(), LaunchError>> {
        Box::pin(self.persist_build(build))
    }

    fn launch<'a>(&'a self, build: &'a Build) -> BoxFuture<'a, Result<(), LaunchError>> {
        Box::pin(self.launch_build(build))
    }

    fn watch<'a>(&'a self, name: &'a str, watch: Watch) -> BoxFuture<'a, Ending> {
        Box::pin(self.watch_build(name, watch))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Found>, ExecutorError>> {
        Box::pin(self.list_builds(&self.selector))
    }

    fn list_except<'a>(
        &'a self,
        replicas: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Found>, ExecutorError>> {
        Box::pin(async move {
            if replicas.is_empty() {
                return self.list_builds(&self.selector).await;
            }
            // `notin` also selects objects without the label (builds of an older kiln).
            let selector = format!(
                "{},{LABEL_REPLICA} notin ({})",
                self.selector,
                replicas.join(",")
            );
            self.list_builds(&selector).await
        })
    }

    fn parallel_calls(&self) -> usize {
        usize::try_from(self.config.burst).unwrap_or(1)
    }

    fn leases(&self) -> Option<Arc<dyn Leases>> {
        Some(Arc::new(lease::ClusterLeases {
            cluster: Arc::clone(&self.cluster),
            coordinator: self.config.coordinator.clone(),
            replica: self.config.replica.clone().unwrap_or_default(),
        }))
    }

    fn claim<'a>(&'a self, found: &'a Found) -> BoxFuture<'a, Claim> {
        Box::pin(self.claim_build(found))
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.remove(name))
    }

    fn explain<'a>(&'a self, name: &'a str) -> BoxFuture<'a, String> {
        Box::pin(self.warning_events(name))
    }

    fn exists<'a>(&'a self, name: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let pods: Api<Pod> = self.cluster.api();
            match self.cluster.call(|| pods.get_opt(name)).await {
                Ok(pod) => pod.is_some(),
                Err(e) => {
                    tracing::warn!(pod = name, error = %e, "cannot tell whether the build pod exists; assuming it does");
                    true
                }
            }
        })
    }
}
