//! The Kubernetes executor: one pod per build, created under the build's deterministic name,
//! watched to its end, classified when it fails for reasons its agent cannot report, and deleted
//! with its Secret. Builds outlive the coordinator: the next one lists them by their labels and
//! follows them without creating anything.

mod classify;
mod client;
pub mod config;
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
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use tokio_util::sync::CancellationToken;

use super::{Executor, ExecutorError, LaunchError, Watch};
use crate::build::{Build, BuildKey, Ending, Found, SourceKind};
use classify::{Limits, Memory, PodEnd, Verdict};
pub use client::ClusterError;
use client::{Cluster, is_status};
pub use config::KubernetesConfig;
use podspec::{
    ANNOTATION_MAIN, ANNOTATION_RUNNER, BUILD_CONTAINER, LABEL_COORDINATOR, LABEL_JOB_ID,
    LABEL_RUNNER, LABEL_SOURCE, OWN_LABELS,
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
/// API calls that start a build: create the Secret, create the pod, make the pod its owner.
const START_CALLS: f64 = 3.0;

/// Runs each build as a pod.
pub struct KubernetesExecutor {
    cluster: Arc<Cluster>,
    config: Arc<KubernetesConfig>,
    pods: PodWatch,
    selector: String,
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
        tracing::info!(namespace = cluster.namespace(), selector = %selector, "connected to Kubernetes");
        Ok(Self {
            cluster: Arc::new(cluster),
            config: Arc::new(config.clone()),
            pods,
            selector,
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

    /// Creates the Secret, then the pod, then makes the pod the Secret's owner. The Secret
    /// comes first: if kiln dies right after, a restarted coordinator still has the build's
    /// secret data (a job token) to start or fail it. A pod of that name that exists already is
    /// never touched: another coordinator runs that build.
    async fn create(&self, pod: &Pod, secret: &Secret) -> Result<(), LaunchError> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let secrets: Api<Secret> = self.cluster.api();
        let create = PostParams::default();
        let secret_was_there = match self.cluster.call(|| secrets.create(&create, secret)).await {
            Ok(_) => false,
            Err(e) if is_status(&e, 409) => true,
            Err(e) => return Err(self.failed("create the build's Secret", &e)),
        };
        let pods: Api<Pod> = self.cluster.api();
        // A create whose answer was lost (connection reset after the API server stored the
        // pod) is retried and then gets 409 for kiln's own pod; without a mark of this attempt
        // kiln took it for another coordinator's and left it running unwatched. The mark tells
        // the two apart.
        let launch_id = format!("{:016x}", rand::random::<u64>());
        let mut pod = pod.clone();
        pod.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(ANNOTATION_LAUNCH.to_owned(), launch_id.clone());
        let pod = &pod;
        let uid = match self.cluster.call(|| pods.create(&create, pod)).await {
            Ok(created) => {
                tracing::info!(pod = %name, namespace = self.cluster.namespace(), "pod created");
                created.metadata.uid
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
                    existing.metadata.uid
                }
                _ => return Err(LaunchError::Exists(name)),
            },
            Err(kube::Error::Api(status)) if matches!(status.code, 400 | 422) => {
                if !secret_was_there {
                    self.remove(&name).await;
                }
                return Err(LaunchError::Rejected(format!(
                    "the Kubernetes API rejected the pod ({}): {}",
                    status.reason, status.message
                )));
            }
            Err(e) => {
                if !secret_was_there {
                    self.remove(&name).await;
                }
                return Err(self.failed("create the pod", &e));
            }
        };
        if let Some(uid) = uid {
            self.own_secret(&name, &uid).await;
        }
        Ok(())
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
        let Some(mut end) = self.follow(name, &mut subscription, &watch).await else {
            tracing::info!(
                pod = name,
                "coordinator stopping; the build pod keeps running and will be adopted"
            );
            return Ending::lost("the coordinator stopped following the build");
        };
        if end.stuck_pending {
            end.detail = format!("{}{}", end.detail, self.warning_events(name).await);
        }
        end.into_ending()
    }

    /// Follows the pod until its build ends; `None` when `watch.cancel` fires first.
    async fn follow(
        &self,
        name: &str,
        subscription: &mut Subscription,
        watch: &Watch,
    ) -> Option<PodEnd> {
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
                    if let Some(pod) = final_state.as_deref() {
                        let limits = self.limits(main_container(pod).unwrap_or(&main));
                        if let Verdict::Ended(end) =
                            classify::classify(pod, Timestamp::now(), limits, &mut memory)
                            && end.result.as_ref().is_some_and(|r| r.reported)
                        {
                            return Some(end);
                        }
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
                        Verdict::Ended(end) => return Some(end),
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
                        return Some(classify::canceled_before_start());
                    }
                    next_wanted_check = now + wanted_every;
                }
                recheck = recheck.min(next_wanted_check.saturating_duration_since(now));
            }
            tokio::select! {
                _ = subscription.changes.changed() => unseen_checks = 0,
                () = tokio::time::sleep(recheck) => {}
                () = watch.cancel.cancelled() => return None,
            }
        }
    }

    /// Sets the pod as the owner of the build's Secret, so Kubernetes deletes the Secret with
    /// the pod even if kiln never gets to.
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
            tracing::warn!(secret = name, error = %e, "cannot set the pod as owner of the build's Secret; kiln deletes it itself after the build");
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
                tracing::warn!(secret = name, error = %e, "cannot delete the build's Secret; Kubernetes collects it with its pod")
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

    /// kiln's pods and Secrets, as builds: one list of each.
    async fn list_builds(&self) -> Result<Vec<Found>, ExecutorError> {
        let params = ListParams::default().labels(&self.selector);
        let secrets: Api<Secret> = self.cluster.api();
        let pods: Api<Pod> = self.cluster.api();
        let list_error = |what: &str, e: kube::Error| ExecutorError::List {
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
            .map_err(|e| list_error("the builds' Secrets", e))?;
        let pods = self
            .cluster
            .call(|| pods.list(&params))
            .await
            .map_err(|e| list_error("the build pods", e))?;
        let mut data: HashMap<String, BTreeMap<String, Vec<u8>>> = HashMap::new();
        let mut secret_meta = HashMap::new();
        for secret in secrets.items {
            let name = secret.metadata.name.clone().unwrap_or_default();
            let values = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(key, value)| (key, value.0))
                .collect();
            data.insert(name.clone(), values);
            secret_meta.insert(name, secret.metadata);
        }
        let mut found = Vec::new();
        for pod in pods.items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            secret_meta.remove(&name);
            let Some(key) = key_of(&pod.metadata) else {
                tracing::warn!(pod = %name, "a kiln pod without a readable source and job id; deleting it");
                self.remove(&name).await;
                continue;
            };
            found.push(Found {
                key,
                name: name.clone(),
                exists: true,
                secrets: data.remove(&name).unwrap_or_default(),
                labels: foreign_labels(&pod.metadata),
                annotations: pod.metadata.annotations.clone().unwrap_or_default(),
            });
            // The coordinator follows it next: let it start from this state.
            self.pods.seed(pod);
        }
        for (name, metadata) in secret_meta {
            let Some(key) = key_of(&metadata) else {
                tracing::warn!(secret = %name, "a kiln Secret without a readable source and job id; deleting it");
                self.remove(&name).await;
                continue;
            };
            found.push(Found {
                key,
                labels: foreign_labels(&metadata),
                annotations: metadata.annotations.unwrap_or_default(),
                secrets: data.remove(&name).unwrap_or_default(),
                name,
                exists: false,
            });
        }
        Ok(found)
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

    fn launch<'a>(&'a self, build: &'a Build) -> BoxFuture<'a, Result<(), LaunchError>> {
        Box::pin(self.launch_build(build))
    }

    fn watch<'a>(&'a self, name: &'a str, watch: Watch) -> BoxFuture<'a, Ending> {
        Box::pin(self.watch_build(name, watch))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Found>, ExecutorError>> {
        Box::pin(self.list_builds())
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.remove(name))
    }

    fn explain<'a>(&'a self, name: &'a str) -> BoxFuture<'a, String> {
        Box::pin(self.warning_events(name))
    }
}
