//! The Kubernetes executor: one pod per build, created under the build's deterministic name,
//! watched to its end, classified when it fails for reasons its agent cannot report, and deleted
//! with its Secret. Builds outlive the coordinator: the next one lists them by their labels and
//! follows them without creating anything.
//!
//! `labels.rs` is kiln's contract with the cluster (what it writes on its objects and reads
//! back); `podspec.rs` builds a build's pod and Secret, sized by `sizing.rs`; `launch.rs`
//! creates and removes them, `follow.rs` follows a pod to its end (`watch.rs` watches them all,
//! `classify.rs` judges a pod); `listing.rs` lists the builds there are and `claim.rs` makes one
//! this replica's; `lease.rs` reads and writes the replicas' Leases.

mod claim;
mod classify;
mod client;
pub mod config;
mod follow;
mod images;
mod labels;
mod launch;
mod lease;
mod listing;
mod namespaces;
mod patch;
mod podspec;
mod quantity;
mod sizing;
mod volumes;
mod warm;
mod watch;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Event;
use kube::Api;
use kube::api::ListParams;
use tokio_util::sync::CancellationToken;

use super::{
    Claim, Executor, ExecutorError, Footprint, LaunchError, Leases, SharedBuilds, WarmPods, Watch,
};
use crate::build::{Build, Ending, Found};
use client::Cluster;
pub use client::ClusterError;
pub use config::KubernetesConfig;
use watch::PodWatch;

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
    /// Each build's namespace, when jobs may move their pods (`namespaces.rs`).
    namespaces: namespaces::BuildNamespaces,
    /// Warm pods: the hand-off client and what is known of them besides the watch.
    warm: warm::WarmSide,
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
        let cluster_wide = config.namespace_overwrite().is_some();
        cluster.check_permissions(cluster_wide).await?;
        let selector = labels::builds_selector(&config.coordinator);
        // Builds in any namespace (KUBERNETES_NAMESPACE_OVERWRITE): one watch over all of them.
        let watched = if cluster_wide {
            cluster.api_all()
        } else {
            cluster.api()
        };
        let pods = PodWatch::start(watched, selector.clone(), shutdown);
        let mut config = config.clone();
        let replica = config.replica_id();
        config.replica = Some(replica.clone());
        tracing::info!(namespace = cluster.namespace(), cluster_wide, selector = %selector, %replica, "connected to Kubernetes");
        Ok(Self {
            cluster: Arc::new(cluster),
            config: Arc::new(config),
            pods,
            selector,
            persisted: std::sync::Mutex::default(),
            namespaces: namespaces::BuildNamespaces::default(),
            warm: warm::WarmSide::new(),
        })
    }

    /// The pod's recent warning events, as `; events: Reason: message, …`.
    pub(super) async fn warning_events(&self, name: &str) -> String {
        let events: Api<Event> = self.api_of(name);
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
    pub(super) async fn pod_had_events(&self, name: &str) -> Option<bool> {
        let events: Api<Event> = self.api_of(name);
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

    fn ready(&self) -> BoxFuture<'_, ()> {
        // Room for two starts: the previous build's pod create and Secret patch may still be
        // on their way, and must not make this build's pod create wait.
        Box::pin(self.cluster.until_free(2.0 * START_CALLS))
    }

    fn footprint(&self, build: &Build) -> Option<Footprint> {
        // Sized from the pod it gets: its services, extra containers and the pod patch count.
        let pod = podspec::pod(build, &self.config, self.cluster.namespace()).ok()?;
        Some(sizing::footprint(&pod, &self.config))
    }

    fn launch<'a>(&'a self, build: &'a Build) -> BoxFuture<'a, Result<(), LaunchError>> {
        Box::pin(self.launch_build(build))
    }

    fn watch<'a>(&'a self, name: &'a str, watch: Watch) -> BoxFuture<'a, Ending> {
        Box::pin(self.watch_build(name, watch))
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.remove(name))
    }

    fn explain<'a>(&'a self, name: &'a str) -> BoxFuture<'a, String> {
        Box::pin(self.warning_events(name))
    }

    fn shared(&self) -> Option<&dyn SharedBuilds> {
        Some(self)
    }

    fn warm(&self) -> Option<&dyn WarmPods> {
        Some(self)
    }
}

impl SharedBuilds for KubernetesExecutor {
    fn persist<'a>(&'a self, build: &'a Build) -> BoxFuture<'a, Result<(), LaunchError>> {
        Box::pin(self.persist_build(build))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Found>, ExecutorError>> {
        Box::pin(self.list_builds(&self.selector))
    }

    fn list_except<'a>(
        &'a self,
        replicas: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Found>, ExecutorError>> {
        Box::pin(async move {
            let selector = labels::except_replicas(&self.selector, replicas);
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

    fn exists<'a>(&'a self, name: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            match self.find_pod(name).await {
                Ok(pod) => pod.is_some(),
                Err(e) => {
                    tracing::warn!(pod = name, error = %e, "cannot tell whether the build pod exists; assuming it does");
                    true
                }
            }
        })
    }
}
