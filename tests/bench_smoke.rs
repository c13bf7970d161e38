//! Keeps the coordinator benchmark (`examples/bench`) working: runs it at a tiny size against
//! this build's (debug) kiln and checks that every figure it reports was really measured.

#[allow(dead_code)]
#[path = "../examples/bench/harness.rs"]
mod harness;

use std::time::Duration;

use clap::Parser;

#[tokio::test(flavor = "multi_thread")]
async fn the_benchmark_measures_every_figure_at_a_tiny_size() {
    let options = harness::Options::try_parse_from([
        "bench",
        "--kiln",
        env!("CARGO_BIN_EXE_kiln"),
        "--jobs",
        "5",
        "--levels",
        "2",
        "--steady-secs",
        "1",
        "--hold-secs",
        "1",
        "--idle-secs",
        "8",
        "--local-jobs",
        "1",
        "--local-sleep-secs",
        "1",
        "--github-jobs",
        "3",
        "--status-builds",
        "3",
        "--status-requests",
        "5",
        "--failover-jobs",
        "4",
        "--failover-rounds",
        "1",
        "--lease-secs",
        "2",
        "--renew-secs",
        "1",
    ])
    .unwrap();
    let report = tokio::time::timeout(Duration::from_secs(150), harness::run(&options))
        .await
        .expect("the benchmark finishes");

    // Every job of the burst got its pod, and the path to it was timed.
    let burst = &report.burst;
    assert_eq!(burst.jobs, 5);
    assert_eq!(burst.dispatch.count, 5, "{}", report.render());
    assert_eq!(burst.to_secret.count, 5);
    assert!(burst.dispatch.p50 > Duration::ZERO && burst.dispatch.p50 <= burst.dispatch.max);
    assert!(burst.pods_per_sec > 0.0, "{}", report.render());
    // A Secret and a pod per job, nothing more (the pod is owned by the Secret: no patch).
    assert!(
        (2.0..2.5).contains(&burst.calls_per_start),
        "{}",
        report.render()
    );

    // Both levels ran all their jobs and measured the coordinator.
    let sizes: Vec<usize> = report.levels.iter().map(|l| l.jobs).collect();
    assert_eq!(sizes, vec![2, 5]);
    for level in &report.levels {
        assert!(level.rss_kib > 1024, "{}", report.render());
        assert!(level.hwm_kib >= level.rss_kib);
        assert_eq!(level.calls_by_kind.get("POST pods"), Some(&level.jobs));
        assert_eq!(level.calls_by_kind.get("DELETE pods"), Some(&level.jobs));
        assert_eq!(level.calls_by_kind.get("POST secrets"), Some(&level.jobs));
        assert_eq!(level.calls_by_kind.get("PATCH secrets"), None);
    }

    // Idle: a 1 s hold returns sooner than GitLab's default `check_interval` (3 s, jittered by
    // ±20 %), so kiln waits out the interval between polls: about 20 a minute, and an 8 s
    // window sees at least two.
    let idle = &report.idle;
    assert!(idle.polls >= 2, "{}", report.render());
    assert!(
        (14.0..=30.0).contains(&idle.polls_per_minute),
        "{}",
        report.render()
    );
    assert!(idle.rss_kib > 1024);

    // The local executor's job streamed its trace.
    assert_eq!(report.local.first_trace.count, 1, "{}", report.render());
    assert!(report.local.first_trace.max <= report.local.finished.max);
    assert!(report.render().contains("## dispatch"));

    // GitHub: every queued job got its runner pod, timed from its webhook, and the API calls
    // were counted, the JIT config among them (one per runner).
    let github = report.github.as_ref().expect("the GitHub level ran");
    assert_eq!(github.jobs, 3);
    assert_eq!(github.pods_created, 3, "{}", report.render());
    assert_eq!(github.webhook_to_pod.count, 3, "{}", report.render());
    assert!(github.webhook_to_pod.p50 > Duration::ZERO);
    assert_eq!(
        github
            .github_calls_by_kind
            .get("POST /repos/{owner}/{name}/actions/runners/generate-jitconfig"),
        Some(&3),
        "{}",
        report.render()
    );
    assert!(github.github_calls_per_job >= 1.0 && github.kube_calls_per_job >= 2.0);
    // The status page was timed with its history full, then RSS with as many builds running.
    let status = report
        .status
        .as_ref()
        .expect("the status page was measured");
    assert_eq!(status.history, 3);
    let paths: Vec<&str> = status.pages.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/", "/?show=3", "/api/v1/builds", "/api/v1/sources"]
    );
    for page in &status.pages {
        assert_eq!(page.latency.count, 5, "{}", report.render());
        assert!(page.bytes > 0 && page.latency.p50 > Duration::ZERO);
    }
    assert!(status.rss_kib > 1024 && status.hwm_kib >= status.rss_kib);
    assert!(report.render().contains("## status page"));

    // Failover: the killed replica's builds were taken over within Lease + renew (and a bit).
    let failover = report.failover.as_ref().expect("the failover level ran");
    assert_eq!(failover.taken_over.count, 1, "{}", report.render());
    assert!(failover.builds_moved >= 2, "{}", report.render());
    assert_eq!(failover.duplicates, 0);
    assert!(
        failover.taken_over.max <= Duration::from_secs(2 + 1 + 3),
        "{}",
        report.render()
    );
    assert!(report.render().contains("## failover"));
    // The rolling update after it handed every build over, and no live replica's Lease lapsed.
    assert_eq!(failover.rolling_handed_over.count, 1, "{}", report.render());
    assert_eq!(failover.lease_lapses, 0, "{}", report.render());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_warm_pool_level_measures_warm_and_cold_starts_and_the_idle_cost() {
    let options = harness::Options::try_parse_from([
        "bench",
        "--kiln",
        env!("CARGO_BIN_EXE_kiln"),
        "--only-warm",
        "--warm-delay-secs",
        "2",
        "--warm-jobs",
        "2",
        "--cold-jobs",
        "2",
        "--warm-idle-secs",
        "3",
    ])
    .unwrap();
    let level = tokio::time::timeout(Duration::from_secs(150), harness::run_warm(&options))
        .await
        .expect("the warm level finishes");
    let text = harness::render_warm(&level);
    assert_eq!((level.warm.count, level.cold.count), (2, 2), "{text}");
    assert_eq!((level.said_warm, level.said_cold), (2, 2), "{text}");
    // A cold job waits for the kubelet; a warm one does not.
    assert!(level.cold.p50 >= Duration::from_secs(2), "{text}");
    assert!(level.warm.p50 < level.cold.p50, "{text}");
    assert!(
        level.idle_cost_per_hour > 0.0 && level.priced_per_hour > 0.0,
        "{text}"
    );
}
