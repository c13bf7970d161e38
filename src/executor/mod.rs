//! Executors run builds and tell how they ended; they know nothing about CI servers.
//! [`Executor`] is what every executor does: launch a [`Build`], watch it to its [`Ending`],
//! delete it. [`SharedBuilds`] is what an executor whose builds outlive the coordinator adds:
//! list them (adoption), claim them for one replica, and the replicas' Leases.

pub mod kubernetes;
pub mod local;
pub mod sandbox;
mod warm;

pub use warm::{TakeError, WarmPod, WarmPods, WarmShape, WarmState};

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::build::{Build, Ending, Found};

/// Asks the CI server whether it still wants a build (false: canceled or finished there).
/// Executors ask while a build has not started yet (a pod still Pending), when nothing in the
/// build can notice a cancel.
#[derive(Clone)]
pub struct StillWanted(Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>);

impl StillWanted {
    /// A check running `ask`.
    pub fn new(ask: impl Fn() -> BoxFuture<'static, bool> + Send + Sync + 'static) -> Self {
        Self(Arc::new(ask))
    }

    /// Asks.
    pub async fn ask(&self) -> bool {
        (self.0)().await
    }
}

impl std::fmt::Debug for StillWanted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StillWanted")
    }
}

/// Told once, when a build starts running (its main container or process runs).
#[derive(Clone)]
pub struct OnRunning(Arc<dyn Fn() + Send + Sync>);

impl OnRunning {
    /// Calls `tell` when the build runs.
    pub fn new(tell: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Arc::new(tell))
    }

    /// Tells.
    pub fn call(&self) {
        (self.0)();
    }
}

impl std::fmt::Debug for OnRunning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnRunning")
    }
}

/// How to watch a build.
#[derive(Debug, Clone, Default)]
pub struct Watch {
    /// Stops watching: an executor whose builds survive the coordinator detaches (the build
    /// ends [`crate::build::Outcome::Lost`] for this coordinator); one whose builds do not
    /// stops the build and reports how it ended.
    pub cancel: CancellationToken,
    /// Asked now and then while the build has not started.
    pub still_wanted: Option<StillWanted>,
    /// Told when the build starts running.
    pub on_running: Option<OnRunning>,
}

/// Why a build could not be launched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    /// A build of that name exists already: another coordinator (a replica) runs it.
    #[error("a build named {0} exists already")]
    Exists(String),
    /// The build asks for something the executor's configuration does not allow, or the
    /// cluster refused it as invalid (`runner_configuration_error`).
    #[error("{0}")]
    Rejected(String),
    /// Starting failed for reasons of the infrastructure (`runner_system_failure`).
    #[error("{0}")]
    Failed(String),
}

/// Errors listing the builds that exist.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The builds could not be listed.
    #[error("cannot list the builds of an earlier run: {message}")]
    List {
        /// Why.
        message: String,
    },
}

/// What a build occupies while it runs, and what its resource class costs: the base of the
/// build's cost (pod-seconds × size × price), as serverless clusters bill it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Footprint {
    /// The resource class it runs in, if any.
    pub class: Option<String>,
    /// vCPUs its containers request (their limit where they request none).
    pub vcpu: f64,
    /// GiB of memory its containers request (their limit where they request none).
    pub gib: f64,
    /// The class's own price of a vCPU-hour (spot, GPU), over `[cost]`'s.
    pub price_per_vcpu_hour: Option<f64>,
    /// The class's own price of a GiB-hour, over `[cost]`'s.
    pub price_per_gib_hour: Option<f64>,
}

/// One Lease (`coordination.k8s.io/v1`) as the coordinator reads and writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Its name.
    pub name: String,
    /// `holderIdentity`: the replica holding it.
    pub holder: Option<String>,
    /// `acquireTime`.
    pub acquired: Option<SystemTime>,
    /// `renewTime`.
    pub renewed: Option<SystemTime>,
    /// `leaseDurationSeconds`.
    pub duration: Option<Duration>,
    /// `leaseTransitions`.
    pub transitions: i32,
    /// `metadata.resourceVersion`: an update with a stale one is refused.
    pub version: Option<String>,
}

/// Why a Lease call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// kiln may not do this (no RBAC for Leases); the message names the missing permission.
    #[error("{0}")]
    Forbidden(String),
    /// Someone else wrote it first: a stale resourceVersion, or it exists already.
    #[error("the Lease {0} was changed by someone else")]
    Conflict(String),
    /// It does not exist.
    #[error("the Lease {0} does not exist")]
    Missing(String),
    /// Anything else (the API server unreachable, …).
    #[error("{0}")]
    Failed(String),
}

/// The Leases of one installation (all its replicas), where its builds live.
pub trait Leases: Send + Sync {
    /// This replica's identity (the `kiln.dev/replica` label of the builds it launches).
    fn replica(&self) -> &str;

    /// The installation's name (`kiln.dev/coordinator`), which every Lease name starts from.
    fn coordinator(&self) -> &str;

    /// Every Lease of the installation.
    fn list(&self) -> BoxFuture<'_, Result<Vec<LeaseRecord>, LeaseError>>;

    /// Lease `name`, `None` when it does not exist.
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<LeaseRecord>, LeaseError>>;

    /// Creates `lease` ([`LeaseError::Conflict`] when it exists already).
    fn create<'a>(
        &'a self,
        lease: &'a LeaseRecord,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>>;

    /// Replaces `lease`, whose `version` must be the stored one ([`LeaseError::Conflict`]
    /// otherwise).
    fn update<'a>(
        &'a self,
        lease: &'a LeaseRecord,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>>;

    /// Deletes Lease `name` if its resourceVersion is still `version`; a missing one is fine.
    fn delete<'a>(
        &'a self,
        name: &'a str,
        version: &'a str,
    ) -> BoxFuture<'a, Result<(), LeaseError>>;
}

/// How claiming a build of another replica went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// It is this replica's now.
    Won,
    /// Another replica changed it first (it claimed it, or its owner is alive after all).
    Lost,
    /// The claim could not be made (the message says why); try again later.
    Failed(String),
}

/// Runs builds: what every executor does, whether its builds live in this process or
/// outside it.
pub trait Executor: Send + Sync {
    /// The executor's name, as shown in traces and sent to GitLab.
    fn name(&self) -> &'static str;

    /// Whether it honours a build's image and services.
    fn runs_images(&self) -> bool;

    /// Waits until a build could start at once (the Kubernetes executor: until its API rate
    /// limit has room for a build's calls). Sources ask before they claim work, so a burst
    /// waits in the CI server's queue, not inside kiln.
    fn ready(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// What `build` will occupy once launched (its size and its class's prices); `None` when
    /// the executor does not size builds (child processes).
    fn footprint(&self, build: &Build) -> Option<Footprint> {
        let _ = build;
        None
    }

    /// Starts `build` under its name.
    ///
    /// # Errors
    /// [`LaunchError::Exists`] when a build of that name runs already (nothing was changed),
    /// [`LaunchError::Rejected`] for a build the configuration does not allow, and
    /// [`LaunchError::Failed`] when the infrastructure failed (whatever was created is removed).
    fn launch<'a>(&'a self, build: &'a Build) -> BoxFuture<'a, Result<(), LaunchError>>;

    /// Follows build `name` until it ends, or until `watch.cancel` fires.
    fn watch<'a>(&'a self, name: &'a str, watch: Watch) -> BoxFuture<'a, Ending>;

    /// Removes build `name` and everything kiln created for it; a missing one is fine.
    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, ()>;

    /// What the executor can tell about why build `name` has not got going (a pod's warning
    /// events), as `; …` to append to a message; empty when it knows nothing.
    fn explain<'a>(&'a self, name: &'a str) -> BoxFuture<'a, String> {
        let _ = name;
        Box::pin(async { String::new() })
    }

    /// The part of the executor whose builds outlive this process and are shared by the
    /// installation's replicas (pods); `None` when builds are this process's alone (child
    /// processes), which then drains them when it stops instead of detaching from them.
    fn shared(&self) -> Option<&dyn SharedBuilds> {
        None
    }

    /// The part of the executor that starts builds ahead of their work (warm pods); `None`
    /// when it cannot (child processes), and every build starts cold.
    fn warm(&self) -> Option<&dyn WarmPods> {
        None
    }
}

/// Builds that live outside the coordinator (pods in a cluster), where a restarted
/// coordinator and every replica of the installation find them: they are written down before
/// their work is acknowledged, listed, claimed by one replica, and keep running when the
/// coordinator stops.
pub trait SharedBuilds: Send + Sync {
    /// Writes `build` down where it outlives this process, before its source commits to it
    /// (acknowledges its job): a coordinator that dies before the launch then leaves what the
    /// next one needs to start or fail it (the Kubernetes executor: the build's Secret, which
    /// [`Executor::launch`] then uses).
    ///
    /// # Errors
    /// As [`Executor::launch`]; the launch tries again.
    fn persist<'a>(&'a self, build: &'a Build) -> BoxFuture<'a, Result<(), LaunchError>>;

    /// The builds that exist (an earlier coordinator's, to be adopted).
    ///
    /// # Errors
    /// The listing failed.
    fn list(&self) -> BoxFuture<'_, Result<Vec<Found>, ExecutorError>>;

    /// The builds that exist and are not labelled with one of `replicas` (the live ones): what
    /// a take-over pass may claim, without reading every live replica's builds and secrets.
    ///
    /// # Errors
    /// The listing failed.
    fn list_except<'a>(
        &'a self,
        replicas: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Found>, ExecutorError>>;

    /// How many builds a take-over handles at once: as many API calls as the executor's rate
    /// limit lets go out without waiting (its burst).
    fn parallel_calls(&self) -> usize;

    /// The Leases that let replicas share the builds (`None`: this process is the only
    /// replica).
    fn leases(&self) -> Option<Arc<dyn Leases>>;

    /// Makes this replica the one following `found` (a build of a replica that is gone, or
    /// of none), as of the state `found` was listed in: of several replicas claiming it, one
    /// wins.
    fn claim<'a>(&'a self, found: &'a Found) -> BoxFuture<'a, Claim>;

    /// Whether build `name` exists, launched by any replica of this installation (a pod in the
    /// cluster). True when the executor cannot tell: callers use it to decide that something
    /// is left over, and must not remove what may still be starting.
    fn exists<'a>(&'a self, name: &'a str) -> BoxFuture<'a, bool>;
}

/// Launches `build`, watches it to its end and deletes it: one build's whole life, for callers
/// that need no coordinator (`kiln exec`).
pub async fn run_to_end(executor: &dyn Executor, build: &Build, watch: Watch) -> Ending {
    use crate::build::FailureReason;
    let ending = match executor.launch(build).await {
        Ok(()) => executor.watch(&build.name, watch).await,
        Err(LaunchError::Rejected(message)) => {
            return Ending::failed(FailureReason::RunnerConfigurationError, message);
        }
        Err(e) => return Ending::failed(FailureReason::RunnerSystemFailure, e.to_string()),
    };
    if ending.outcome != crate::build::Outcome::Lost {
        executor.delete(&build.name).await;
    }
    ending
}
