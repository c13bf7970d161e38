//! Warm pods: pre-started, one-shot builds of one shape whose agent waits for its work. The
//! coordinator's warm pools keep them ([`WarmPods::start`], [`WarmPods::retire`]), count them
//! ([`WarmPods::list`]) and hand a fitting build to an idle one ([`WarmPods::take`]) instead
//! of launching a new build; everything else (watch, delete, adoption) treats a taken warm pod
//! as the build it now runs, under the pod's name.

use std::time::SystemTime;

use futures::future::BoxFuture;

use super::{ExecutorError, LaunchError};
use crate::build::Build;

/// What a warm pod is made for: the builds that fit it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WarmShape {
    /// The pool it belongs to (`[[warm_pools]] name`), written on the pod.
    pub pool: String,
    /// The image its build container runs (GitLab: a job whose image is exactly this).
    pub image: String,
    /// The resource class it is sized by; `None`: the executor's default class.
    pub class: Option<String>,
}

/// Where an untaken warm pod is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarmState {
    /// Created, not ready to take work yet (scheduling, image pull, the agent starting).
    Starting,
    /// Running, its agent waiting: a build handed to it starts at once.
    Idle,
    /// It failed or went away before taking work (evicted, image pull failure, node lost):
    /// remove it and start another. The text says why.
    Broken(String),
}

/// One warm pod no build has taken yet.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmPod {
    /// Its name (which the build it takes runs under).
    pub name: String,
    /// Its pool.
    pub pool: String,
    /// Where it is.
    pub state: WarmState,
    /// When it was created (an idle pod older than its pool's `max_idle_age` is replaced).
    pub created: SystemTime,
    /// The replica that started it, as labelled.
    pub replica: Option<String>,
}

/// Why a build could not be handed to a warm pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TakeError {
    /// The pod is gone, not idle, or another replica took it first: nothing was changed;
    /// start the build cold (or try another idle pod).
    #[error("warm pod {pod} cannot be taken: {reason}")]
    Unavailable {
        /// The pod.
        pod: String,
        /// Why.
        reason: String,
    },
    /// The hand-over failed half-way for reasons of the infrastructure; the pod is removed and
    /// the build is to be started cold.
    #[error("{0}")]
    Failed(String),
}

/// What an executor whose builds can be started ahead of their work adds
/// ([`super::Executor::warm`]).
pub trait WarmPods: Send + Sync {
    /// Whether `build` can run on a warm pod of `shape`; `Err` says why not, in words for the
    /// job's trace ("started cold: the job has services"): a different image or class,
    /// services, registry logins, per-job overwrites, anything a pod made before its job
    /// cannot honour.
    ///
    /// # Errors
    /// The reason it does not fit.
    fn fits(&self, build: &Build, shape: &WarmShape) -> Result<(), String>;

    /// Starts one warm pod of `shape` labelled as this replica's; returns its name.
    ///
    /// # Errors
    /// As [`super::Executor::launch`].
    fn start<'a>(&'a self, shape: &'a WarmShape) -> BoxFuture<'a, Result<String, LaunchError>>;

    /// The installation's warm pods that no build has taken, each with its state (a restarted
    /// coordinator re-counts them instead of leaking them).
    ///
    /// # Errors
    /// The listing failed.
    fn list(&self) -> BoxFuture<'_, Result<Vec<WarmPod>, ExecutorError>>;

    /// Makes idle warm pod `pod` the home of `build`, durably (this is the build's
    /// [`super::SharedBuilds::persist`]): of several replicas taking one pod, exactly one
    /// wins. From then on the build's name is `pod`: [`super::Executor::launch`] of the
    /// build under that name hands it its work (idempotent), and watch, delete, listing and
    /// adoption see it as that build.
    ///
    /// # Errors
    /// [`TakeError::Unavailable`] when the pod cannot take it (nothing changed);
    /// [`TakeError::Failed`] otherwise.
    fn take<'a>(&'a self, pod: &'a str, build: &'a Build) -> BoxFuture<'a, Result<(), TakeError>>;

    /// Removes untaken warm pod `pod` (surplus, too old, broken, shutdown); a missing one is
    /// fine.
    fn retire<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, ()>;
}
