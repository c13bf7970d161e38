//! End to end: warm pools through the whole chain — a real `kiln run` with the Kubernetes
//! executor against the GitLab and Kubernetes test servers, whose kubelet takes a fixed time
//! to start each pod. A pool's pods are started ahead of their jobs; a fitting job takes an
//! idle one and its trace starts at once, where a cold job waits for the kubelet.

use crate::support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::gitlab::{JobRecord, job_json};
use support::kiln::{KilnProcess, send_signal};
use support::kube::Snapshot;

use crate::kubernetes_jobs::{Setup, setup, with_image};

/// What the test kubelet takes to start each pod (scheduling, pull, container start).
const KUBELET_DELAY: Duration = Duration::from_secs(4);
const IMAGE: &str = "maven:3.9-eclipse-temurin-21";

/// The untaken warm pods of `pool` in `snapshot`: (name, whether it runs).
fn warm_pods(snapshot: &Snapshot, pool: &str) -> Vec<(String, bool)> {
    snapshot
        .pods
        .iter()
        .filter(|pod| {
            // A taken pod keeps its pool's label and gets its job's.
            pod.metadata.labels.as_ref().is_some_and(|labels| {
                labels.get(WARM_POOL_LABEL).is_some_and(|p| p == pool)
                    && !labels.contains_key("kiln.dev/job-id")
            })
        })
        .map(|pod| {
            let running = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Running");
            (pod.metadata.name.clone().unwrap_or_default(), running)
        })
        .collect()
}

const WARM_POOL_LABEL: &str = "kiln.dev/warm-pool";

/// A pool of `min_idle` pods for [`IMAGE`], with prices, and `extra` top-level text.
fn pool_config(min_idle: usize, extra: &str) -> String {
    format!(
        r#"concurrent = 6
{extra}
[cost]
price_per_vcpu_hour = 0.0431
price_per_gib_hour = 0.0047

[[warm_pools]]
name = "maven"
source = "gitlab"
image = "{IMAGE}"
min_idle = {min_idle}
"#
    )
}

/// Waits until `pool` has `idle` running warm pods and nothing starting.
async fn idle(s: &Setup, pool: &str, idle: usize, secs: u64) -> Vec<String> {
    let snapshot = s
        .kube
        .wait_for(Duration::from_secs(secs), |snapshot| {
            let pods = warm_pods(snapshot, pool);
            pods.len() == idle && pods.iter().all(|(_, running)| *running)
        })
        .await;
    warm_pods(&snapshot, pool)
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

/// How long after `queued` the job's first trace line reached GitLab.
async fn first_trace_after(s: &Setup, id: u64, queued: Instant, secs: u64) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let job = s.gitlab.job(id);
        if let Some(patch) = job.patches.first() {
            return patch.at.duration_since(queued);
        }
        assert!(Instant::now() < deadline, "no trace for job {id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A job of [`IMAGE`] (with the `if-not-present` pull policy the test GitLab sends).
fn maven_job(name: &str) -> Value {
    with_image(job_json(name, &["echo hello from $CI_JOB_NAME"]), IMAGE)
}

/// `/api/v1/warm` once `done` holds for it (within 10 s).
async fn warm_status(kiln: &KilnProcess, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = kiln.get("/api/v1/warm").await;
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        if done(&answer) {
            return answer;
        }
        assert!(Instant::now() < deadline, "{answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn succeeded(s: &Setup, id: u64, kiln: &KilnProcess) -> JobRecord {
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, kiln.logs());
    job
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_on_a_warm_pod_starts_within_a_second_and_a_half_a_cold_one_waits_for_the_kubelet() {
    let s = setup().await;
    s.kube.set_start_delay(KUBELET_DELAY);
    let kiln = s.kiln(&pool_config(2, ""), "");
    idle(&s, "maven", 2, 30).await;

    let queued = Instant::now();
    let warm = s.gitlab.enqueue(maven_job("warm"));
    let waited = first_trace_after(&s, warm, queued, 30).await;
    let job = succeeded(&s, warm, &kiln).await;
    eprintln!("queued → first trace line: warm {waited:?}");
    assert!(
        waited < Duration::from_millis(1500),
        "first trace line {waited:?} after queueing\n{}",
        job.trace
    );
    assert!(
        job.trace.contains("started on warm pod kiln-"),
        "{}",
        job.trace
    );
    assert!(
        job.trace.contains("(pool maven), waiting "),
        "{}",
        job.trace
    );

    let queued = Instant::now();
    let cold = s
        .gitlab
        .enqueue(with_image(job_json("cold", &["echo cold"]), "node:22"));
    let waited = first_trace_after(&s, cold, queued, 30).await;
    let job = succeeded(&s, cold, &kiln).await;
    eprintln!("queued → first trace line: cold {waited:?} (kubelet delay {KUBELET_DELAY:?})");
    assert!(waited >= KUBELET_DELAY, "a cold start took only {waited:?}");
    assert!(
        job.trace
            .contains("started cold: no warm pool for image node:22"),
        "{}",
        job.trace
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn five_jobs_at_once_take_the_two_idle_pods_start_three_cold_and_the_pool_refills() {
    let s = setup().await;
    s.kube.set_start_delay(Duration::from_secs(2));
    let kiln = s.kiln(&pool_config(2, ""), "");
    let first = idle(&s, "maven", 2, 30).await;

    let ids: Vec<u64> = (0..5)
        .map(|i| s.gitlab.enqueue(maven_job(&format!("job-{i}"))))
        .collect();
    let mut warm = Vec::new();
    let mut cold = 0;
    for id in ids {
        let job = succeeded(&s, id, &kiln).await;
        if job.trace.contains("started on warm pod") {
            warm.push(job.trace.clone());
        } else {
            assert!(
                job.trace
                    .contains("started cold: warm pool maven has no idle pod"),
                "{}",
                job.trace
            );
            cold += 1;
        }
    }
    assert_eq!((warm.len(), cold), (2, 3), "{warm:?}");
    for name in &first {
        assert!(
            warm.iter()
                .any(|t| t.contains(&format!("warm pod {name} "))),
            "{name} ran a job: {warm:?}"
        );
    }
    // Back to two idle pods, new ones; the used ones and the cold builds are gone.
    let again = idle(&s, "maven", 2, 30).await;
    assert!(again.iter().all(|name| !first.contains(name)), "{again:?}");
    s.kube
        .wait_for(Duration::from_secs(20), |snapshot| snapshot.pods.len() == 2)
        .await;

    // The status page shows the pool, its hits and misses, and what it cost idle (as of the
    // keeper's last round, every 2 s).
    let answer = warm_status(&kiln, |answer| answer["pools"][0]["idle"] == 2).await;
    let pool = &answer["pools"][0];
    assert_eq!(pool["name"], "maven", "{answer}");
    assert_eq!(
        (pool["hits"].as_u64(), pool["misses"].as_u64()),
        (Some(2), Some(3)),
        "{answer}"
    );
    assert!(
        pool["idle_cost_today"].as_f64().is_some_and(|c| c > 0.0),
        "{answer}"
    );
    assert!(answer["cold_waits"][0]["image"] == IMAGE, "{answer}");
    let (_, page) = kiln.get("/").await;
    assert!(
        page.contains("<tr data-pool=\"maven\"><td>maven</td>"),
        "{page}"
    );
    let (_, metrics) = kiln.get("/metrics").await;
    assert!(
        metrics.contains("kiln_warm_idle_cost_total{pool=\"maven\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_coordinators_successor_adopts_the_idle_pods() {
    let s = setup().await;
    s.kube.set_start_delay(Duration::from_secs(1));
    let first = s.kiln(&pool_config(2, ""), "");
    let idle_pods = idle(&s, "maven", 2, 30).await;
    send_signal(first.pid(), "KILL");
    let mut second = s.kiln(&pool_config(2, ""), "");
    // Several keeper rounds: the same two pods, none created again.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(idle(&s, "maven", 2, 5).await, idle_pods);
    let created: Vec<String> = s
        .kube
        .creations()
        .into_iter()
        .filter(|name| !name.starts_with("kiln-gl-"))
        .collect();
    assert_eq!(created.len(), 2, "{created:?}");
    // They serve jobs as before.
    let id = s.gitlab.enqueue(maven_job("after"));
    let job = succeeded(&s, id, &second).await;
    assert!(job.trace.contains("started on warm pod"), "{}", job.trace);
    idle(&s, "maven", 2, 30).await;
    // A graceful stop retires them: nothing leaked.
    assert!(
        second.terminate(Duration::from_secs(30)),
        "{}",
        second.logs()
    );
    s.nothing_left(15).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schedule_window_raises_then_lowers_the_floor() {
    let s = setup().await;
    // A window opens every minute for 25 s and raises the floor from 1 to 3.
    let config = format!(
        "{}\n[[warm_pools.schedule]]\ncron = \"* * * * *\"\nduration = \"25s\"\nmin_idle = 3\n",
        pool_config(1, "")
    );
    let kiln = s.kiln(&config, "");
    let deadline = Duration::from_secs(90);
    s.kube
        .wait_for(deadline, |snapshot| warm_pods(snapshot, "maven").len() == 3)
        .await;
    s.kube
        .wait_for(deadline, |snapshot| warm_pods(snapshot, "maven").len() == 1)
        .await;
    assert!(kiln.logs().contains("surplus"), "{}", kiln.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_evicted_idle_pod_is_replaced() {
    let s = setup().await;
    s.kube.set_start_delay(Duration::from_millis(500));
    let kiln = s.kiln(&pool_config(2, ""), "");
    let before = idle(&s, "maven", 2, 30).await;
    s.kube.evict(&before[0]);
    s.kube.wait_gone(&before[0], Duration::from_secs(15)).await;
    let after = idle(&s, "maven", 2, 30).await;
    assert!(after.contains(&before[1]), "{before:?} {after:?}");
    assert!(
        kiln.logs().contains("retiring a warm pod"),
        "{}",
        kiln.logs()
    );
    // And it serves a job.
    let id = s.gitlab.enqueue(maven_job("after-eviction"));
    let job = succeeded(&s, id, &kiln).await;
    assert!(job.trace.contains("started on warm pod"), "{}", job.trace);
}
