//! Job sources: each knows only its CI server — how to discover work, claim it, describe it as a
//! [`Build`], and report to the CI server what a build could not report itself. A source talks
//! to the rest of kiln through the [`Chain`] the coordinator hands it, and the coordinator
//! talks to it through [`Source`]; no source knows an executor.

mod driver;
pub mod github;
pub mod gitlab;
mod health;
pub mod jenkins;
pub(crate) mod job_metrics;
mod pacer;
mod pool;
mod warm;

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::build::{About, Build, BuildKey, Ending, Found, SourceKind};

/// One unit of capacity, held from before work is claimed until its build ends. Opaque to
/// sources: they only pass it on with the build it is for.
pub struct Slot {
    _held: Box<dyn Send + Sync>,
}

impl Slot {
    /// A slot holding `held` (the coordinator's permit) until it is dropped.
    pub fn new(held: impl Send + Sync + 'static) -> Self {
        Self {
            _held: Box::new(held),
        }
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

/// What a source may ask of the coordinator (which implements it, once for all sources).
pub trait Chain: Send + Sync {
    /// Waits for a free slot of this source (within `concurrent` and the source's own limit)
    /// and until the executor can start a build at once; `None` when kiln shuts down.
    fn slot(&self) -> BoxFuture<'_, Option<Slot>>;

    /// A slot if one is free now (for sources that decide per tick).
    fn try_slot(&self) -> Option<Slot>;

    /// Writes `build` down where it outlives this coordinator, before the source commits to
    /// its work (acknowledges a job): if kiln dies before the launch, the next coordinator
    /// finds it and starts or fails it. A failure is logged; the launch tries again.
    fn persist<'a>(&'a self, build: &'a Build) -> BoxFuture<'a, ()>;

    /// Starts `build` in `slot`'s capacity and follows it; how it ended comes back through
    /// [`Source::ended`], always — also when it could not start.
    fn launch(&self, slot: Slot, build: Build);

    /// Stops and removes a build of this source (an agent no longer needed, or a persisted
    /// build whose work the CI server withdrew before its launch); the ending of a launched
    /// build still comes back through [`Source::ended`].
    fn stop(&self, name: &str) -> BoxFuture<'_, ()>;

    /// Whether this replica of kiln runs the singleton chores now (reconciles, provisioning
    /// from a queue, removing stale registrations): one replica at a time does. Always true
    /// when there is one replica. Work a source is handed directly (a webhook) may still be
    /// launched by any replica: launches are idempotent by the build's name.
    fn leading(&self) -> bool;

    /// Why build `name` has not got going, as far as the executor can tell (`; events: …`),
    /// for the source's own messages; empty when nothing is known.
    fn explain(&self, name: &str) -> BoxFuture<'_, String>;

    /// Build `name` does other work than it was launched for (a fungible runner took another
    /// job than the one it is named after): the status page, the history and the cost per
    /// project show `about` from now on. Nothing when this replica does not follow it.
    fn describe<'a>(&'a self, name: &'a str, about: About) -> BoxFuture<'a, ()>;

    /// Whether build `name` runs, on this replica or another one of the installation (true
    /// when that cannot be told): what a leftover check asks before it removes anything.
    fn exists(&self, name: &str) -> BoxFuture<'_, bool>;

    /// The idle members the warm pools want this source to keep now (`[[warm_pools]]`
    /// entries naming this source, their floor raised by open schedule windows, within
    /// `max_idle_total`), for a source whose idle members are its own (GitHub runners,
    /// Jenkins agents registered at their CI server). Empty: no pool.
    fn warm_floors(&self) -> Vec<WarmFloor> {
        Vec::new()
    }

    /// Tells the warm pools where member `name` (a build of this source kept for pool
    /// `pool`) is: idle (its idle time is priced from now), or taken (it took work: a hit),
    /// or retired (removed unused). Nothing for a name the pools do not know.
    fn warm_member(&self, name: &str, pool: &str, state: MemberState) {
        let _ = (name, pool, state);
    }
}

/// What one warm pool wants of a source that keeps its own idle members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmFloor {
    /// The pool's name.
    pub pool: String,
    /// The resource class its members run in (GitHub groups runners by class).
    pub class: Option<String>,
    /// The label its members carry (Jenkins groups agents by label).
    pub label: Option<String>,
    /// Idle members to keep now.
    pub min_idle: usize,
    /// An idle member older than this is replaced.
    pub max_idle_age: Option<std::time::Duration>,
}

/// Where a warm member is, as its source tells the pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// Started or waiting for work (its time is the pool's idle cost).
    Idle,
    /// It took work.
    Taken,
    /// Removed without having taken work.
    Retired,
}

/// What a source says about a build found at start-up.
#[derive(Debug)]
pub enum Adoption {
    /// Follow it to its end (it counts against capacity meanwhile); what people see about it.
    Follow(About),
    /// Only its secrets were left and its pod never existed: start it now, as this build.
    Relaunch(Box<Build>),
    /// Remove it, for this reason.
    Discard(String),
}

/// A source's state, as the status page and `/readyz` show it (never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Whether the source can take work (token accepted, not paused).
    pub ready: bool,
    /// One word or phrase: `ready`, `verifying`, `paused: token rejected`, `backing off`.
    pub state: String,
    /// The CI server's URL, without credentials.
    pub url: String,
    /// The last error, in plain words, if the last request failed.
    pub last_error: Option<String>,
    /// When a request to the CI server last succeeded.
    pub last_success: Option<std::time::SystemTime>,
}

/// One configured CI server entry, as the coordinator drives it.
pub trait Source: Send + Sync {
    /// Which kind of CI server.
    fn kind(&self) -> SourceKind;

    /// The entry's name (unique per kind), as in [`BuildKey::runner`].
    fn name(&self) -> &str;

    /// Builds this source may run at once besides `concurrent` (0: no own limit).
    fn limit(&self) -> usize;

    /// Discovers and claims work until `shutdown`, launching each build through `chain`.
    fn run(
        self: Arc<Self>,
        chain: Arc<dyn Chain>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()>;

    /// A build of this source that exists at start-up (left by an earlier coordinator).
    /// Called for every such build before [`Source::run`].
    fn adopt<'a>(&'a self, found: &'a Found) -> BoxFuture<'a, Adoption>;

    /// Build `name` of work `key` ended: report to the CI server what the build could not.
    fn ended<'a>(
        &'a self,
        key: &'a BuildKey,
        name: &'a str,
        ending: &'a Ending,
    ) -> BoxFuture<'a, ()>;

    /// Whether the CI server still wants the work of a build that has not started yet.
    fn still_wanted<'a>(&'a self, key: &'a BuildKey) -> BoxFuture<'a, bool> {
        let _ = key;
        Box::pin(async { true })
    }

    /// The source's state now.
    fn health(&self) -> Health;
}

/// What sources need to know of the executor builds will run on.
#[derive(Debug, Clone)]
pub struct ExecutorInfo {
    /// Its name, shown in traces (`local`, `kubernetes`).
    pub name: &'static str,
    /// Whether it honours images and services (GitLab is told so).
    pub runs_images: bool,
    /// The build cache, when `[cache]` is configured (GitLab is told so).
    pub cache: Option<std::sync::Arc<crate::cache::CacheService>>,
}

/// A source entry's name: the configured one, else `<URL host>-<index>` (`fallback` when the
/// URL has no host).
pub(crate) fn entry_name(name: Option<&str>, url: &str, fallback: &str, index: usize) -> String {
    if let Some(name) = name {
        return name.to_owned();
    }
    let host = url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| fallback.into());
    format!("{host}-{index}")
}

/// What is wrong with `url` as a CI server's URL, if anything.
pub(crate) fn url_problem(url: &str) -> Option<String> {
    match url::Url::parse(url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => None,
        Ok(url) => Some(format!("scheme `{}` is not http or https", url.scheme())),
        Err(e) => Some(format!("not a URL ({e})")),
    }
}

/// A panic's payload in words (`panic!` with a string or a format).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
