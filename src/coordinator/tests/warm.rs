//! The warm pools with the fake executor's warm pods, on tokio's paused clock (the pools'
//! clock follows it, so schedules and idle ages move with `tokio::time::sleep`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;

use super::{FakeExecutor, FakeSource, build, succeeded, until};
use crate::build::{Build, START_FILE, Service, Workload};
use crate::coordinator::warm::Clock;
use crate::coordinator::{LeaseTiming, WarmPoolConfig, WarmSettings, WindowConfig};
use crate::executor::{
    ExecutorError, LaunchError, TakeError, WarmPod, WarmPods, WarmShape, WarmState,
};
use crate::telemetry::Metrics;

/// How long a fake warm pod takes from its start to idle.
const START_DELAY: Duration = Duration::from_secs(3);
/// When the tests' clock starts: Monday 2026-12-07 00:00 UTC.
const EPOCH_SECS: u64 = 1_796_601_600;

/// The fake executor's warm pods.
pub(in crate::coordinator) struct FakeWarm {
    clock: Clock,
    /// Untaken pods.
    pods: BTreeMap<String, WarmPod>,
    /// Pods started so far.
    started: usize,
    /// How many more starts fail.
    failing_starts: usize,
    /// Start calls, failed or not.
    start_calls: usize,
    /// Pods retired.
    retired: Vec<String>,
    /// Pods taken: (pod, the build's start line).
    taken: Vec<(String, String)>,
}

/// A clock that starts at [`EPOCH_SECS`] and follows tokio's (paused) clock.
fn clock() -> Clock {
    let start = tokio::time::Instant::now();
    Arc::new(move || SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH_SECS) + start.elapsed())
}

impl FakeExecutor {
    fn with_warm(clock: Clock) -> Self {
        let executor = Self::default();
        executor.lock().warm = Some(FakeWarm {
            clock,
            pods: BTreeMap::new(),
            started: 0,
            failing_starts: 0,
            start_calls: 0,
            retired: Vec::new(),
            taken: Vec::new(),
        });
        executor
    }

    fn warm_state<T>(&self, f: impl FnOnce(&mut FakeWarm) -> T) -> T {
        f(self.lock().warm.as_mut().expect("warm pods"))
    }

    /// Untaken pods by state: (starting, idle).
    fn untaken(&self, pool: &str) -> (usize, usize) {
        self.warm_state(|w| {
            let now = (w.clock)();
            w.pods
                .values()
                .filter(|p| p.pool == pool)
                .fold((0, 0), |(s, i), p| {
                    if state_of(p, now) == WarmState::Idle {
                        (s, i + 1)
                    } else {
                        (s + 1, i)
                    }
                })
        })
    }
}

fn state_of(pod: &WarmPod, now: SystemTime) -> WarmState {
    match &pod.state {
        WarmState::Starting
            if now.duration_since(pod.created).unwrap_or_default() >= START_DELAY =>
        {
            WarmState::Idle
        }
        state => state.clone(),
    }
}

impl WarmPods for FakeExecutor {
    fn fits(&self, build: &Build, shape: &WarmShape) -> Result<(), String> {
        let Workload::KilnAgent { image, services } = &build.workload else {
            return Err("not a kiln agent build".into());
        };
        if !services.is_empty() {
            return Err("the job has services".into());
        }
        match image {
            Some(image) if image.name == shape.image => Ok(()),
            _ => Err("another image".into()),
        }
    }

    fn start<'a>(&'a self, shape: &'a WarmShape) -> BoxFuture<'a, Result<String, LaunchError>> {
        let result = self.warm_state(|w| {
            w.start_calls += 1;
            if w.failing_starts > 0 {
                w.failing_starts -= 1;
                return Err(LaunchError::Failed("quota exceeded".into()));
            }
            w.started += 1;
            let name = format!("kiln-warm-{}-{}", shape.pool, w.started);
            w.pods.insert(
                name.clone(),
                WarmPod {
                    name: name.clone(),
                    pool: shape.pool.clone(),
                    state: WarmState::Starting,
                    created: (w.clock)(),
                    replica: None,
                },
            );
            Ok(name)
        });
        Box::pin(async move { result })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<WarmPod>, ExecutorError>> {
        let pods = self.warm_state(|w| {
            let now = (w.clock)();
            w.pods
                .values()
                .map(|p| WarmPod {
                    state: state_of(p, now),
                    ..p.clone()
                })
                .collect()
        });
        Box::pin(async move { Ok(pods) })
    }

    fn take<'a>(&'a self, pod: &'a str, build: &'a Build) -> BoxFuture<'a, Result<(), TakeError>> {
        let result = self.warm_state(|w| {
            let now = (w.clock)();
            match w.pods.get(pod) {
                Some(p) if state_of(p, now) == WarmState::Idle => {
                    w.pods.remove(pod);
                    let line = String::from_utf8_lossy(&build.secrets[START_FILE]).into_owned();
                    w.taken.push((pod.to_owned(), line));
                    Ok(())
                }
                _ => Err(TakeError::Unavailable {
                    pod: pod.to_owned(),
                    reason: "not idle".into(),
                }),
            }
        });
        Box::pin(async move { result })
    }

    fn retire<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, ()> {
        self.warm_state(|w| {
            w.pods.remove(pod);
            w.retired.push(pod.to_owned());
        });
        Box::pin(async {})
    }
}

fn pool(name: &str, image: &str, min_idle: usize) -> WarmPoolConfig {
    WarmPoolConfig {
        name: name.into(),
        source: "gitlab".into(),
        image: Some(image.into()),
        class: None,
        label: None,
        min_idle,
        max_idle_age: None,
        schedule: Vec::new(),
    }
}

fn with_image(id: u64, image: &str) -> Build {
    let mut build = build(id);
    build.workload = Workload::KilnAgent {
        image: Some(crate::build::Image {
            name: image.into(),
            ..Default::default()
        }),
        services: Vec::new(),
    };
    // Queued when the tests' clock starts.
    build.about.queued_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH_SECS));
    build
}

/// A running coordinator with warm pools.
type Warm = super::Harness;

/// A coordinator keeping `pools` on a fake executor of its own.
async fn keeping(pools: Vec<WarmPoolConfig>) -> Warm {
    let clock = clock();
    let executor = Arc::new(FakeExecutor::with_warm(Arc::clone(&clock)));
    start(executor, settings(pools), clock).await
}

/// A coordinator keeping `pools` on `executor`.
async fn start(executor: Arc<FakeExecutor>, warm: WarmSettings, clock: Clock) -> Warm {
    let source = Arc::new(FakeSource::default());
    let metrics = Metrics::new();
    let coordinator = super::coordinator(10, LeaseTiming::default(), &metrics, &executor, &source)
        .warm_pools_clocked(&warm, &metrics, clock);
    super::run(coordinator, metrics, executor, source).await
}

fn settings(pools: Vec<WarmPoolConfig>) -> WarmSettings {
    WarmSettings {
        pools,
        max_idle_total: 0,
    }
}

/// Hands `build` over as the GitLab source does: persist, then launch.
async fn hand_over(h: &Warm, build: Build) {
    let chain = h.source.chain();
    let slot = chain.slot().await.unwrap();
    chain.persist(&build).await;
    chain.launch(slot, build);
}

#[tokio::test(start_paused = true)]
async fn a_fitting_build_takes_an_idle_pod_and_the_pool_refills() {
    let h = keeping(vec![pool("maven", "maven:3.9", 2)]).await;
    until("two idle pods", || h.executor.untaken("maven") == (0, 2)).await;

    hand_over(&h, with_image(1, "maven:3.9")).await;
    until("the build runs on its pod", || {
        h.executor
            .launches()
            .iter()
            .any(|n| n.starts_with("kiln-warm-maven-"))
    })
    .await;
    let taken = h.executor.warm_state(|w| w.taken.clone());
    assert_eq!(taken.len(), 1);
    assert!(
        taken[0].1.starts_with(&format!(
            "started on warm pod {} (pool maven), waiting ",
            taken[0].0
        )),
        "{taken:?}"
    );
    // The pool is back at two untaken pods, then two idle ones.
    until("the pool refilled", || {
        h.executor.untaken("maven") == (0, 2)
    })
    .await;
    assert_eq!(h.executor.warm_state(|w| w.started), 3);
    until("the status page shows two idle pods", || {
        h.status.warm_pools()[0].idle == 2
    })
    .await;
    let view = &h.status.warm_pools()[0];
    assert_eq!(
        (view.hits, view.misses, view.refills, view.in_use),
        (1, 0, 3, 1)
    );
    // The build ends under its pod's name; the pod is deleted as any build's.
    let pod = taken[0].0.clone();
    h.executor.finish(&pod, succeeded());
    until("the build ended", || h.source.ended().len() == 1).await;
    assert_eq!(h.source.ended()[0].0, pod);
    until("no build in use", || h.status.warm_pools()[0].in_use == 0).await;
    let text = h.metrics.encode();
    assert!(
        text.contains(r#"kiln_warm_hits_total{pool="maven"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"kiln_warm_refills_total{pool="maven"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"kiln_warm_members{pool="maven",state="idle"} 2"#),
        "{text}"
    );
    h.shutdown.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_build_that_fits_no_idle_pod_starts_cold_and_says_why() {
    let h = keeping(vec![pool("maven", "maven:3.9", 1)]).await;
    until("an idle pod", || h.executor.untaken("maven") == (0, 1)).await;

    let mut with_services = with_image(2, "maven:3.9");
    if let Workload::KilnAgent { services, .. } = &mut with_services.workload {
        services.push(Service::default());
    }
    let cases = [
        (
            with_image(1, "node:22"),
            "started cold: no warm pool for image node:22",
        ),
        (with_services, "started cold: the job has services"),
    ];
    for (build, line) in cases {
        let name = build.name.clone();
        let chain = h.source.chain();
        let placed = h.executor.launches().len();
        let slot = chain.slot().await.unwrap();
        chain.persist(&build).await;
        chain.launch(slot, build);
        until("the cold launch", || {
            h.executor.launches().len() == placed + 1
        })
        .await;
        assert_eq!(h.executor.launches().last().unwrap(), &name);
        let start_line = h.executor.launched_start_line(&name);
        assert_eq!(start_line.as_deref(), Some(line), "{name}");
    }
    // The idle pod was left alone; the next fitting build takes it, the one after misses.
    hand_over(&h, with_image(3, "maven:3.9")).await;
    hand_over(&h, with_image(4, "maven:3.9")).await;
    until("both launched", || h.executor.launches().len() == 4).await;
    let line = h.executor.launched_start_line(&build(4).name);
    assert_eq!(
        line.as_deref(),
        Some("started cold: warm pool maven has no idle pod")
    );
    let view = &h.status.warm_pools()[0];
    assert_eq!((view.hits, view.misses), (1, 1));
    h.shutdown.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn of_two_replicas_exactly_one_hands_out_an_idle_pod() {
    let clock = clock();
    let executor = Arc::new(FakeExecutor::with_warm(Arc::clone(&clock)));
    let one = start(
        Arc::clone(&executor),
        settings(vec![pool("maven", "maven:3.9", 1)]),
        Arc::clone(&clock),
    )
    .await;
    until("an idle pod", || executor.untaken("maven") == (0, 1)).await;
    let two = start(
        Arc::clone(&executor),
        settings(vec![pool("maven", "maven:3.9", 1)]),
        clock,
    )
    .await;
    let (a, b) = (with_image(1, "maven:3.9"), with_image(2, "maven:3.9"));
    let (chain_a, chain_b) = (one.source.chain(), two.source.chain());
    futures::join!(chain_a.persist(&a), chain_b.persist(&b));
    let taken = executor.warm_state(|w| w.taken.clone());
    assert_eq!(taken.len(), 1, "{taken:?}");
    let misses: u64 = [&one, &two]
        .iter()
        .map(|h| h.status.warm_pools()[0].misses)
        .sum();
    let hits: u64 = [&one, &two]
        .iter()
        .map(|h| h.status.warm_pools()[0].hits)
        .sum();
    assert_eq!((hits, misses), (1, 1));
    for h in [one, two] {
        h.shutdown.cancel();
        h.task.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_restarted_coordinator_recounts_the_pods_it_finds() {
    let clock = clock();
    let executor = Arc::new(FakeExecutor::with_warm(Arc::clone(&clock)));
    let first = start(
        Arc::clone(&executor),
        settings(vec![pool("maven", "maven:3.9", 2)]),
        Arc::clone(&clock),
    )
    .await;
    until("two idle pods", || executor.untaken("maven") == (0, 2)).await;
    // Killed: nothing retired.
    first.task.abort();
    let _ = first.task.await;
    let second = start(
        Arc::clone(&executor),
        settings(vec![pool("maven", "maven:3.9", 2)]),
        clock,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(executor.untaken("maven"), (0, 2));
    assert_eq!(executor.warm_state(|w| w.started), 2, "none started twice");
    assert_eq!(second.status.warm_pools()[0].idle, 2);
    second.shutdown.cancel();
    second.task.await.unwrap();
    // Shut down properly: its idle pods are retired.
    assert_eq!(executor.untaken("maven"), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_schedule_window_raises_then_lowers_the_floor() {
    let mut maven = pool("maven", "maven:3.9", 1);
    // Opens at 00:10 for five minutes (the clock starts at 00:00).
    maven.schedule.push(WindowConfig {
        cron: "10 0 * * *".into(),
        duration: Duration::from_secs(300),
        min_idle: 3,
        timezone: None,
    });
    let h = keeping(vec![maven]).await;
    until("one idle pod", || h.executor.untaken("maven") == (0, 1)).await;
    tokio::time::sleep(Duration::from_secs(9 * 60)).await;
    assert_eq!(h.executor.untaken("maven"), (0, 1), "before the window");
    tokio::time::sleep(Duration::from_secs(60 + 5)).await;
    assert_eq!(h.executor.untaken("maven"), (0, 3), "in the window");
    assert_eq!(h.status.warm_pools()[0].floor, 3);
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(h.executor.untaken("maven"), (0, 1), "after the window");
    // The oldest were retired first: the first pod of the day stays... unless it was the
    // oldest — surplus goes oldest first.
    let retired = h.executor.warm_state(|w| w.retired.clone());
    assert_eq!(retired, ["kiln-warm-maven-1", "kiln-warm-maven-2"]);
    h.shutdown.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_idle_pod_older_than_max_idle_age_is_replaced() {
    let mut maven = pool("maven", "maven:3.9", 1);
    maven.max_idle_age = Some(Duration::from_secs(60));
    let h = keeping(vec![maven]).await;
    until("one idle pod", || h.executor.untaken("maven") == (0, 1)).await;
    tokio::time::sleep(Duration::from_secs(65)).await;
    let retired = h.executor.warm_state(|w| w.retired.clone());
    assert_eq!(retired, ["kiln-warm-maven-1"]);
    assert_eq!(
        h.executor.untaken("maven").0 + h.executor.untaken("maven").1,
        1
    );
    h.shutdown.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn max_idle_total_caps_every_pool_together_in_the_order_configured() {
    let clock = clock();
    let executor = Arc::new(FakeExecutor::with_warm(Arc::clone(&clock)));
    let warm = WarmSettings {
        pools: vec![pool("maven", "maven:3.9", 2), pool("node", "node:22", 2)],
        max_idle_total: 3,
    };
    let h = start(executor, warm, clock).await;
    until("the pools filled", || {
        h.executor.untaken("maven") == (0, 2) && h.executor.untaken("node") == (0, 1)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(h.executor.warm_state(|w| w.started), 3);
    let floors: Vec<usize> = h.status.warm_pools().iter().map(|p| p.floor).collect();
    assert_eq!(floors, [2, 1]);
    h.shutdown.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_retires_idle_pods_and_leaves_taken_ones_running() {
    let h = keeping(vec![pool("maven", "maven:3.9", 2)]).await;
    until("two idle pods", || h.executor.untaken("maven") == (0, 2)).await;
    hand_over(&h, with_image(1, "maven:3.9")).await;
    until("the build runs", || h.executor.live() == 1).await;
    until("the pool refilled", || {
        h.executor.untaken("maven") == (0, 2)
    })
    .await;
    let running = h.executor.warm_state(|w| w.taken[0].0.clone());
    h.shutdown.cancel();
    h.task.await.unwrap();
    assert_eq!(h.executor.untaken("maven"), (0, 0));
    let retired = h.executor.warm_state(|w| w.retired.clone());
    assert_eq!(retired.len(), 2);
    assert!(!retired.contains(&running), "{retired:?}");
    assert_eq!(h.executor.live(), 1, "the build on its warm pod runs on");
}

#[tokio::test(start_paused = true)]
async fn failing_starts_back_off_and_idle_time_is_priced() {
    let clock = clock();
    let executor = Arc::new(FakeExecutor::with_warm(Arc::clone(&clock)));
    executor.warm_state(|w| w.failing_starts = 3);
    let h = start(
        executor,
        settings(vec![pool("maven", "maven:3.9", 1)]),
        clock,
    )
    .await;
    // 2 s, 4 s, 8 s of backoff, not a start every round.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.executor.warm_state(|w| w.start_calls), 2);
    tokio::time::sleep(Duration::from_secs(15)).await;
    until("an idle pod", || h.executor.untaken("maven") == (0, 1)).await;
    assert_eq!(h.executor.warm_state(|w| w.start_calls), 4);
    tokio::time::sleep(Duration::from_secs(100)).await;
    // 2 vCPUs at a vCPU-second each: at least 200 for 100 s.
    let cost = h.status.warm_pools()[0].idle_cost_today.unwrap();
    assert!((200.0..260.0).contains(&cost), "{cost}");
    let text = h.metrics.encode();
    assert!(
        text.contains(r#"kiln_warm_idle_cost_total{pool="maven"} "#),
        "{text}"
    );
    h.shutdown.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn pods_of_a_pool_no_longer_configured_are_retired() {
    let clock = clock();
    let executor = Arc::new(FakeExecutor::with_warm(Arc::clone(&clock)));
    let old = pool("old", "maven:3.8", 1);
    let shape = WarmShape {
        pool: old.name.clone(),
        image: "maven:3.8".into(),
        class: None,
    };
    let left = executor.start(&shape).await.unwrap();
    // No pool at all now: the leader still looks for leftovers, less often.
    let h = start(Arc::clone(&executor), settings(Vec::new()), clock).await;
    until("the leftover pod retired", || {
        executor.warm_state(|w| w.retired.clone()) == [left.clone()]
    })
    .await;
    assert!(h.status.warm_pools().is_empty());
    h.shutdown.cancel();
    h.task.await.unwrap();
}
