//! The coordinator's logic with both neighbours faked: a source that hands over whatever the
//! test says, an executor whose builds end when the test says. No HTTP, no cluster.
//!
//! Every test runs on tokio's paused clock: waits (Lease expiry, restart backoff, the polls of
//! [`until`]) take no real time, and the clock moves only when every task is idle.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Coordinator, Prices, Settings, Status};
use crate::build::{
    About, Build, BuildKey, Ending, FailureReason, Found, JOB_FILE, Outcome, Recorded, SourceKind,
    Workload,
};
use crate::executor::{
    Claim, Executor, ExecutorError, Footprint, LaunchError, LeaseRecord, Leases, SharedBuilds,
    Watch,
};
use crate::sources::{Adoption, Chain, Health, Source};
use crate::telemetry::Metrics;

/// An executor whose builds run until [`FakeExecutor::finish`].
#[derive(Default)]
pub(super) struct FakeExecutor {
    state: Mutex<ExecutorState>,
}

#[derive(Default)]
struct ExecutorState {
    /// Every launch call, in order.
    launches: Vec<String>,
    /// Every delete call, in order.
    deletes: Vec<String>,
    /// Builds that exist, with how they end once the test decides.
    live: HashMap<String, watch::Sender<Option<Ending>>>,
    /// What `list` returns (an earlier coordinator's builds).
    left_over: Vec<Found>,
    /// The installation's Leases (none: one replica).
    leases: Option<Arc<dyn Leases>>,
    /// Every claim, in order.
    claims: Vec<String>,
    /// Builds whose claim another replica wins.
    claimed_by_others: Vec<String>,
    /// What `parallel_calls` says (0: the default).
    parallel: usize,
    /// `list` calls.
    lists: usize,
    /// The start line (`START_FILE`) of each launched build, by name.
    start_lines: HashMap<String, String>,
    /// Warm pods (`None`: the executor keeps none), in `warm.rs`'s tests.
    warm: Option<warm::FakeWarm>,
}

impl FakeExecutor {
    fn lock(&self) -> std::sync::MutexGuard<'_, ExecutorState> {
        self.state.lock().unwrap()
    }

    fn leave(&self, found: Found) {
        let mut state = self.lock();
        state
            .live
            .insert(found.name.clone(), watch::channel(None).0);
        state.left_over.push(found);
    }

    fn finish(&self, name: &str, ending: Ending) {
        self.lock().live[name].send_replace(Some(ending));
    }

    fn launches(&self) -> Vec<String> {
        self.lock().launches.clone()
    }

    fn launched_start_line(&self, name: &str) -> Option<String> {
        self.lock().start_lines.get(name).cloned()
    }

    fn live(&self) -> usize {
        self.lock().live.len()
    }
}

impl Executor for FakeExecutor {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn runs_images(&self) -> bool {
        true
    }

    fn footprint(&self, _build: &Build) -> Option<Footprint> {
        Some(Footprint {
            class: Some("spot".into()),
            vcpu: 2.0,
            gib: 4.0,
            price_per_vcpu_hour: None,
            price_per_gib_hour: Some(0.0),
        })
    }

    fn launch<'a>(&'a self, build: &'a Build) -> BoxFuture<'a, Result<(), LaunchError>> {
        let mut state = self.lock();
        state.launches.push(build.name.clone());
        if let Some(line) = build.secrets.get(crate::build::START_FILE) {
            let line = String::from_utf8_lossy(line).trim_end().to_owned();
            state.start_lines.insert(build.name.clone(), line);
        }
        let result = if state.live.contains_key(&build.name) {
            Err(LaunchError::Exists(build.name.clone()))
        } else {
            state
                .live
                .insert(build.name.clone(), watch::channel(None).0);
            Ok(())
        };
        Box::pin(async move { result })
    }

    fn watch<'a>(&'a self, name: &'a str, watch: Watch) -> BoxFuture<'a, Ending> {
        let receiver = self.lock().live.get(name).map(watch::Sender::subscribe);
        Box::pin(async move {
            let Some(mut receiver) = receiver else {
                return Ending::failed(FailureReason::RunnerSystemFailure, "no such build");
            };
            if let Some(on_running) = &watch.on_running {
                on_running.call();
            }
            loop {
                if let Some(ending) = receiver.borrow_and_update().clone() {
                    return ending;
                }
                tokio::select! {
                    changed = receiver.changed() => {
                        if changed.is_err() {
                            return Ending::failed(FailureReason::RunnerSystemFailure, "deleted");
                        }
                    }
                    () = watch.cancel.cancelled() => return Ending::lost("detached"),
                }
            }
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, ()> {
        let mut state = self.lock();
        state.deletes.push(name.to_owned());
        state.live.remove(name);
        Box::pin(async {})
    }

    fn shared(&self) -> Option<&dyn SharedBuilds> {
        Some(self)
    }

    fn warm(&self) -> Option<&dyn crate::executor::WarmPods> {
        self.lock().warm.is_some().then_some(self as _)
    }
}

impl SharedBuilds for FakeExecutor {
    fn persist<'a>(&'a self, _build: &'a Build) -> BoxFuture<'a, Result<(), LaunchError>> {
        Box::pin(async { Ok(()) })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Found>, ExecutorError>> {
        self.lock().lists += 1;
        let found = self.lock().left_over.clone();
        Box::pin(async move { Ok(found) })
    }

    fn list_except<'a>(
        &'a self,
        _replicas: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Found>, ExecutorError>> {
        self.list()
    }

    fn parallel_calls(&self) -> usize {
        self.lock().parallel.max(1)
    }

    fn leases(&self) -> Option<Arc<dyn Leases>> {
        self.lock().leases.clone()
    }

    fn claim<'a>(&'a self, found: &'a Found) -> BoxFuture<'a, Claim> {
        let mut state = self.lock();
        state.claims.push(found.name.clone());
        let claim = if state.claimed_by_others.contains(&found.name) {
            Claim::Lost
        } else {
            for left in &mut state.left_over {
                if left.name == found.name {
                    left.replica = Some("me".into());
                }
            }
            Claim::Won
        };
        Box::pin(async move { claim })
    }

    fn exists<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async { false })
    }
}

/// A source that hands over what the test asks, through the chain it was given.
#[derive(Default)]
struct FakeSource {
    chain: Mutex<Option<Arc<dyn Chain>>>,
    /// How many more times `run` panics (a bug meeting input nobody foresaw).
    panics: std::sync::atomic::AtomicU32,
    /// How many times `run` was called.
    runs: std::sync::atomic::AtomicU32,
    adopted: Mutex<Vec<String>>,
    ended: Mutex<Vec<(String, Ending)>>,
    /// How long its CI server takes to answer about a build being adopted.
    adopt_delay: Duration,
    /// Adoptions under way now, and the most there ever were at once.
    adopting: Mutex<(usize, usize)>,
}

impl FakeSource {
    fn chain(&self) -> Arc<dyn Chain> {
        self.chain.lock().unwrap().clone().unwrap()
    }

    fn ended(&self) -> Vec<(String, Ending)> {
        self.ended.lock().unwrap().clone()
    }
}

impl Source for FakeSource {
    fn kind(&self) -> SourceKind {
        SourceKind::GitLab
    }

    fn name(&self) -> &str {
        "fake"
    }

    fn limit(&self) -> usize {
        0
    }

    fn run(
        self: Arc<Self>,
        chain: Arc<dyn Chain>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        use std::sync::atomic::Ordering;
        self.runs.fetch_add(1, Ordering::SeqCst);
        let panics = self
            .panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        *self.chain.lock().unwrap() = Some(chain);
        Box::pin(async move {
            if panics {
                panic!("time_in_queue_seconds out of range");
            }
            shutdown.cancelled().await;
        })
    }

    fn adopt<'a>(&'a self, found: &'a Found) -> BoxFuture<'a, Adoption> {
        self.adopted.lock().unwrap().push(found.name.clone());
        Box::pin(async {
            {
                let mut adopting = self.adopting.lock().unwrap();
                adopting.0 += 1;
                adopting.1 = adopting.1.max(adopting.0);
            }
            tokio::time::sleep(self.adopt_delay).await;
            self.adopting.lock().unwrap().0 -= 1;
            Adoption::Follow(About::default())
        })
    }

    fn ended<'a>(
        &'a self,
        _key: &'a BuildKey,
        name: &'a str,
        ending: &'a Ending,
    ) -> BoxFuture<'a, ()> {
        self.ended
            .lock()
            .unwrap()
            .push((name.to_owned(), ending.clone()));
        Box::pin(async {})
    }

    fn health(&self) -> Health {
        Health {
            ready: true,
            state: "ready".into(),
            url: "http://ci.example.com/".into(),
            last_error: None,
            last_success: None,
        }
    }
}

fn key(id: u64) -> BuildKey {
    BuildKey {
        source: SourceKind::GitLab,
        runner: "fake".into(),
        id,
    }
}

fn build(id: u64) -> Build {
    Build {
        key: key(id),
        name: key(id).resource_name(),
        workload: Workload::KilnAgent {
            image: None,
            services: Vec::new(),
        },
        secrets: BTreeMap::from([(JOB_FILE.to_owned(), b"{}".to_vec())]),
        class: None,
        requests: Vec::new(),
        timeout: None,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        about: About::default(),
        untrusted: false,
        registry_auths: Vec::new(),
    }
}

/// Finished builds the test coordinators keep.
const HISTORY: usize = 3;

fn succeeded() -> Ending {
    Ending {
        outcome: Outcome::Succeeded,
        detail: "done".into(),
        reported: true,
        exit_code: Some(0),
    }
}

struct Harness {
    metrics: Arc<Metrics>,
    executor: Arc<FakeExecutor>,
    source: Arc<FakeSource>,
    status: Status,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// A coordinator with `concurrent` slots over a fake source and executor; `before` runs on
/// the executor before the coordinator starts (builds left by an earlier run).
async fn start(concurrent: usize, before: impl FnOnce(&FakeExecutor)) -> Harness {
    start_with(concurrent, super::LeaseTiming::default(), before).await
}

/// [`start`] with Lease timing `leases`.
async fn start_with(
    concurrent: usize,
    leases: super::LeaseTiming,
    before: impl FnOnce(&FakeExecutor),
) -> Harness {
    start_source(concurrent, leases, FakeSource::default(), before).await
}

/// A coordinator with `concurrent` slots over `source` and `executor`.
fn coordinator(
    concurrent: usize,
    leases: super::LeaseTiming,
    metrics: &Arc<Metrics>,
    executor: &Arc<FakeExecutor>,
    source: &Arc<FakeSource>,
) -> Coordinator {
    Coordinator::new(
        Settings {
            concurrent,
            shutdown_timeout: Duration::from_secs(1),
            history: HISTORY,
            // A vCPU-second costs 1, so a build of milliseconds costs something.
            prices: Prices {
                per_vcpu_hour: 3600.0,
                per_gib_hour: 1000.0,
            },
            leases,
        },
        Arc::clone(metrics),
        Arc::clone(executor) as Arc<dyn Executor>,
        vec![Arc::clone(source) as Arc<dyn Source>],
    )
}

/// [`start_with`] with `source`.
async fn start_source(
    concurrent: usize,
    leases: super::LeaseTiming,
    source: FakeSource,
    before: impl FnOnce(&FakeExecutor),
) -> Harness {
    let executor = Arc::new(FakeExecutor::default());
    before(&executor);
    let source = Arc::new(source);
    let metrics = Metrics::new();
    let coordinator = coordinator(concurrent, leases, &metrics, &executor, &source);
    run(coordinator, metrics, executor, source).await
}

/// Runs `coordinator` (over `executor` and `source`) until the harness's shutdown; returns
/// once the source runs.
async fn run(
    coordinator: Coordinator,
    metrics: Arc<Metrics>,
    executor: Arc<FakeExecutor>,
    source: Arc<FakeSource>,
) -> Harness {
    let status = coordinator.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(coordinator.run(shutdown.clone()));
    // The source runs once adoption is done.
    for _ in 0..100 {
        if source.chain.lock().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Harness {
        metrics,
        executor,
        source,
        status,
        shutdown,
        task,
    }
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(start_paused = true)]
async fn a_build_is_never_launched_twice_for_one_job() {
    let h = start(4, |_| {}).await;
    let chain = h.source.chain();
    let slot = chain.slot().await.unwrap();
    chain.launch(slot, build(7));
    until("the build is alive", || h.status.capacity().0 == 1).await;
    // The same work handed over again (a redelivered webhook, a reconcile racing it).
    let slot = chain.slot().await.unwrap();
    chain.launch(slot, build(7));
    until("the duplicate is answered", || !h.source.ended().is_empty()).await;
    assert_eq!(h.executor.launches(), ["kiln-gl-7"], "one launch, not two");
    assert_eq!(h.source.ended()[0].1.outcome, Outcome::Lost);
    assert_eq!(h.executor.live(), 1, "the running build was not touched");
    assert_eq!(h.status.capacity().0, 1);
    // A second coordinator's build of the same name: the executor says it exists.
    h.executor.leave(Found {
        key: key(8),
        name: "kiln-gl-8".into(),
        exists: true,
        ran: None,
        secrets: BTreeMap::new(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        replica: None,
        version: None,
        recorded: Recorded::OnBuild,
    });
    let slot = chain.slot().await.unwrap();
    chain.launch(slot, build(8));
    until("the other coordinator's build is left alone", || {
        h.source.ended().len() == 2
    })
    .await;
    assert_eq!(h.source.ended()[1].1.outcome, Outcome::Lost);
    assert!(
        !h.executor.lock().deletes.contains(&"kiln-gl-8".to_owned()),
        "another coordinator's build is not deleted"
    );
    h.shutdown.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn capacity_returns_when_a_build_ends() {
    let h = start(1, |_| {}).await;
    let chain = h.source.chain();
    let slot = chain.slot().await.unwrap();
    chain.launch(slot, build(1));
    until("the build is alive", || h.status.capacity() == (1, 1)).await;
    assert!(chain.try_slot().is_none(), "the only slot is taken");
    h.executor.finish("kiln-gl-1", succeeded());
    until("the source heard of the end", || {
        h.source.ended().len() == 1
    })
    .await;
    until("the slot is free", || h.status.capacity().0 == 0).await;
    assert!(chain.try_slot().is_some(), "capacity came back");
    assert_eq!(
        h.executor.lock().deletes,
        ["kiln-gl-1"],
        "the build was removed"
    );
    assert_eq!(h.source.ended()[0].1.outcome, Outcome::Succeeded);
    h.shutdown.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_restart_adopts_running_builds_and_counts_them_against_concurrent() {
    let h = start(2, |executor| {
        for id in [21, 22] {
            executor.leave(Found {
                key: key(id),
                name: key(id).resource_name(),
                exists: true,
                ran: None,
                secrets: BTreeMap::new(),
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                replica: None,
                version: None,
                recorded: Recorded::OnBuild,
            });
        }
    })
    .await;
    let chain = h.source.chain();
    assert_eq!(
        h.source.adopted.lock().unwrap().as_slice(),
        ["kiln-gl-21", "kiln-gl-22"]
    );
    assert_eq!(h.status.capacity(), (2, 2));
    assert!(
        chain.try_slot().is_none(),
        "adopted builds take the capacity before new work"
    );
    assert!(
        h.executor.launches().is_empty(),
        "adopted builds are followed, not created again"
    );
    h.executor.finish("kiln-gl-21", succeeded());
    until("the adopted build's end reached its source", || {
        h.source.ended().len() == 1
    })
    .await;
    until("its slot is free", || chain.try_slot().is_some()).await;
    h.shutdown.cancel();
    h.task.await.unwrap();
    // Shutting down detaches from the build that still runs (it survives the coordinator).
    let ended = h.source.ended();
    assert_eq!(ended.len(), 2);
    assert_eq!(ended[1].0, "kiln-gl-22");
    assert_eq!(ended[1].1.outcome, Outcome::Lost);
    assert!(!h.executor.lock().deletes.contains(&"kiln-gl-22".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn finished_builds_are_kept_in_a_bounded_history_with_their_cost() {
    let h = start(8, |_| {}).await;
    let chain = h.source.chain();
    for id in 1..=4 {
        let slot = chain.slot().await.unwrap();
        let mut build = build(id);
        build.about.project = "group/demo".into();
        chain.launch(slot, build);
    }
    until("all four run", || h.status.capacity().0 == 4).await;
    let alive = h.status.builds();
    assert_eq!(alive.len(), 4);
    assert!(alive.iter().all(|b| b.end.is_none() && b.running.is_some()));
    for id in 1..=4 {
        let ending = if id == 3 {
            Ending::failed(
                FailureReason::ImagePullFailure,
                "the image alpine:nope does not exist",
            )
        } else {
            succeeded()
        };
        h.executor.finish(&key(id).resource_name(), ending);
        until("the build is in the history", || {
            h.status
                .builds()
                .iter()
                .any(|b| b.key.id == id && b.end.is_some())
        })
        .await;
    }
    until("nothing is alive", || h.status.capacity().0 == 0).await;
    let kept: Vec<u64> = h.status.builds().iter().map(|b| b.key.id).collect();
    assert_eq!(kept, [4, 3, 2], "the newest {HISTORY} builds, newest first");
    let failed = &h.status.builds()[1];
    let end = failed.end.as_ref().unwrap();
    assert_eq!(
        end.outcome,
        Outcome::Failed(FailureReason::ImagePullFailure)
    );
    assert_eq!(end.detail, "the image alpine:nope does not exist");
    assert!(failed.created.is_some() && failed.created <= failed.running);
    // The class prices memory at 0 over the default: only the 2 vCPUs cost, 1 a second each.
    let seconds = end
        .at
        .duration_since(failed.created.unwrap())
        .unwrap()
        .as_secs_f64();
    let cost = end.cost.unwrap();
    assert!((cost - 2.0 * seconds).abs() < 1e-9, "{cost} for {seconds}s");
    let metrics = h.metrics.encode();
    assert!(
        metrics.contains(
            r#"kiln_build_cost_total{source="gitlab",project="group/demo",class="spot"}"#
        ),
        "{metrics}"
    );
    h.shutdown.cancel();
    h.task.await.unwrap();
}

/// A build of work `id` labelled with `replica`, found at start-up.
fn labelled(id: u64, runner: &str, replica: Option<&str>) -> Found {
    let key = BuildKey {
        source: SourceKind::GitLab,
        runner: runner.into(),
        id,
    };
    Found {
        name: key.resource_name(),
        key,
        exists: true,
        ran: None,
        secrets: BTreeMap::new(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        replica: replica.map(Into::into),
        version: Some("7".into()),
        recorded: Recorded::OnBuild,
    }
}

#[tokio::test(start_paused = true)]
async fn a_replica_takes_its_own_unlabelled_and_dead_replicas_builds_never_a_live_ones() {
    use super::replicas::tests::{LeaseStore, MemoryLeases};
    let store: LeaseStore = Arc::default();
    let now = std::time::SystemTime::now();
    let lease =
        |name: &str, holder: &str, renewed: std::time::SystemTime, seconds: u64| LeaseRecord {
            name: name.into(),
            holder: Some(holder.into()),
            acquired: Some(renewed),
            renewed: Some(renewed),
            duration: Some(Duration::from_secs(seconds)),
            transitions: 0,
            version: Some("1".into()),
        };
    {
        let mut store = store.lock().unwrap();
        // `alive` renews (for one more second), `dead` stopped long ago; `alive` leads.
        for lease in [
            lease("kiln-ci-alive", "alive", now, 1),
            lease("kiln-ci-dead", "dead", now - Duration::from_secs(60), 15),
            lease("kiln-ci-leader", "alive", now, 1),
        ] {
            store.1.insert(lease.name.clone(), lease);
        }
    }
    let timing = super::LeaseTiming {
        duration: Duration::from_secs(1),
        renew: Duration::from_millis(100),
    };
    let h = start_with(8, timing, |executor| {
        executor.lock().leases = Some(Arc::new(MemoryLeases {
            replica: "me".into(),
            store: Arc::clone(&store),
        }));
        executor.leave(labelled(31, "fake", Some("alive")));
        executor.leave(labelled(32, "fake", Some("dead")));
        executor.leave(labelled(33, "fake", None));
        executor.leave(labelled(34, "fake", Some("me")));
        executor.leave(labelled(35, "fake", Some("dead")));
        executor.leave(labelled(36, "gone", Some("dead")));
        executor.lock().claimed_by_others.push("kiln-gl-35".into());
    })
    .await;
    assert_eq!(
        h.source.adopted.lock().unwrap().as_slice(),
        ["kiln-gl-32", "kiln-gl-33", "kiln-gl-34"],
        "its own, an unlabelled one and a dead replica's; not a live one's, not one claimed by another"
    );
    assert_eq!(
        h.executor.lock().claims,
        ["kiln-gl-32", "kiln-gl-33", "kiln-gl-35"],
        "its own builds need no claim; a live replica's and (not leading) an orphan are not claimed"
    );
    assert!(
        h.executor.lock().deletes.is_empty(),
        "orphans are the leader's to remove"
    );
    assert!(!h.source.chain().leading(), "`alive` leads");

    // `alive` stops renewing: its Lease expires, and this replica takes over its build, its
    // leadership, and with it the orphan of the source no longer configured.
    until("the live replica's build is taken over", || {
        h.source.adopted.lock().unwrap().len() == 4
    })
    .await;
    assert_eq!(h.source.adopted.lock().unwrap()[3], "kiln-gl-31");
    until("the orphan is removed by the new leader", || {
        h.executor.lock().deletes.contains(&"kiln-gl-36".to_owned())
    })
    .await;
    assert!(h.source.chain().leading());
    assert!(
        !h.executor.lock().deletes.contains(&"kiln-gl-35".to_owned()),
        "the build another replica claimed is left to it"
    );
    h.shutdown.cancel();
    h.task.await.unwrap();
    let left: Vec<String> = store.lock().unwrap().1.keys().cloned().collect();
    assert!(
        !left.contains(&"kiln-ci-me".to_owned()) && !left.contains(&"kiln-ci-leader".to_owned()),
        "a stopping replica gives up its Leases: {left:?}"
    );
}

/// A source whose loop panics is restarted; while it is down `/readyz` says so with the panic,
/// and afterwards the status page still tells that it happened.
#[tokio::test(start_paused = true)]
async fn a_panicking_source_loop_is_restarted_and_shown_unready_meanwhile() {
    use std::sync::atomic::Ordering;
    let source = FakeSource::default();
    source.panics.store(2, Ordering::SeqCst);
    let harness = start_source(1, super::LeaseTiming::default(), source, |_| {}).await;
    // The first panic: down until the restart a second later.
    let mut seen_down = None;
    for _ in 0..100 {
        let view = harness.status.sources().remove(0);
        if !view.health.ready {
            seen_down = Some(view);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let down = seen_down.expect("the source shows as down after its loop panicked");
    assert!(!harness.status.ready());
    assert_eq!(down.health.state, "restarting after a panic");
    let said = down.health.last_error.unwrap();
    assert!(
        said.contains("time_in_queue_seconds out of range"),
        "{said}"
    );
    // Two panics (1 s, then 2 s of backoff), then a loop that keeps running.
    for _ in 0..600 {
        if harness.source.runs.load(Ordering::SeqCst) == 3 && harness.status.ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(harness.source.runs.load(Ordering::SeqCst), 3);
    assert!(harness.status.ready());
    let said = harness
        .status
        .sources()
        .remove(0)
        .health
        .last_error
        .unwrap();
    assert!(said.contains("panicked 2 time(s)"), "{said}");
    harness.shutdown.cancel();
    harness.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_long_take_over_never_delays_a_lease_renewal() {
    use super::replicas::tests::{LeaseStore, MemoryLeases};
    const BUILDS: u64 = 200;
    const PARALLEL: usize = 16;
    let store: LeaseStore = Arc::default();
    let wall = std::time::SystemTime::now();
    let started = tokio::time::Instant::now();
    let now = || wall + started.elapsed();
    {
        // `other` is alive for one more second, then dies with 200 builds.
        let lease = LeaseRecord {
            name: "kiln-ci-other".into(),
            holder: Some("other".into()),
            acquired: Some(wall),
            renewed: Some(wall),
            duration: Some(Duration::from_secs(1)),
            transitions: 0,
            version: Some("1".into()),
        };
        store.lock().unwrap().1.insert(lease.name.clone(), lease);
    }
    let timing = super::LeaseTiming {
        duration: Duration::from_secs(3),
        renew: Duration::from_secs(1),
    };
    // Its CI server answers each look at a build in 1 s.
    let source = FakeSource {
        adopt_delay: Duration::from_secs(1),
        ..FakeSource::default()
    };
    let h = start_source(2 * BUILDS as usize, timing, source, |executor| {
        executor.lock().leases = Some(Arc::new(MemoryLeases {
            replica: "me".into(),
            store: Arc::clone(&store),
        }));
        executor.lock().parallel = PARALLEL;
        for id in 0..BUILDS {
            executor.leave(labelled(id, "fake", Some("other")));
        }
    })
    .await;
    assert!(
        h.source.adopted.lock().unwrap().is_empty(),
        "a live replica's builds are left"
    );
    // Until every build is taken over (and a while after), this replica's own Lease never
    // lapses: the others would take it for dead and its builds with it.
    let mut checks = 0;
    while h.source.adopted.lock().unwrap().len() < BUILDS as usize || checks < 100 {
        let own = store.lock().unwrap().1.get("kiln-ci-me").cloned();
        let own = own.expect("this replica's Lease exists");
        assert!(
            !super::replicas::expired(&own, now()),
            "this replica's Lease lapsed {:?} into the take-over ({} of {BUILDS} builds adopted)",
            started.elapsed(),
            h.source.adopted.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        checks += 1;
        assert!(checks < 10_000, "the take-over never ended");
    }
    let most = h.source.adopting.lock().unwrap().1;
    assert_eq!(
        most, PARALLEL,
        "builds are taken over side by side, as many as the executor's rate limit lets go out at once"
    );
    h.shutdown.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_only_replica_lists_its_builds_once() {
    let h = start(2, |_| {}).await;
    // Minutes later (past several safety-scan periods) it has not listed them again: with no
    // other replica nothing can have been left for it to take.
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(h.executor.lock().lists, 1);
    h.shutdown.cancel();
    h.task.await.unwrap();
}

mod warm;
