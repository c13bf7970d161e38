//! Chaos end to end: real `kiln run` processes behind fault proxies (429, 5xx, resets before
//! and after the server, stalls, cut watches), SIGKILLed at seeded moments, each test checking
//! the history the test servers recorded. These are the short variants; `examples/chaos` runs
//! the long ones (`cargo run --example chaos -- --help`). `KILN_CHAOS_SEED` replays a seed.

use crate::support;

use std::time::Duration;

use support::chaos::{GitLabChaos, gitlab_kubernetes};

#[tokio::test(flavor = "multi_thread")]
async fn gitlab_jobs_on_kubernetes_survive_faults_on_both_apis_and_three_sigkills() {
    let seed = support::faults::seed(17);
    gitlab_kubernetes(&GitLabChaos {
        seed,
        jobs: 20,
        concurrency: 10,
        fault_rate: 0.2,
        kills: 3,
        stall: Duration::from_secs(7),
        deadline: Duration::from_secs(150),
    })
    .await;
}

/// The proxy itself: with the same seed the same requests get the same faults, and a request
/// it forwards is answered by the server.
#[tokio::test(flavor = "multi_thread")]
async fn the_fault_proxy_repeats_its_schedule_for_a_seed() {
    use support::faults::{FaultPlan, FaultProxy};
    let kube = support::kube::KubeServer::start().await;
    let mut runs = Vec::new();
    for seed in [5, 5, 6] {
        let proxy = FaultProxy::start(
            kube.url(),
            FaultPlan::new(seed, 0.5).stall(Duration::from_millis(200)),
        )
        .await;
        let client = reqwest::Client::new();
        let mut statuses = Vec::new();
        for _ in 0..40 {
            let answer = client
                .get(format!("{}/api/v1/namespaces/ci/pods", proxy.url()))
                .send()
                .await;
            statuses.push(answer.map(|a| a.status().as_u16()).unwrap_or(0));
        }
        let faults: Vec<_> = proxy.log().iter().map(|i| i.fault).collect();
        assert!(statuses.contains(&200), "{statuses:?}");
        assert!(
            statuses.contains(&0),
            "some connections were closed: {statuses:?}"
        );
        runs.push(faults);
    }
    assert_eq!(runs[0], runs[1], "same seed, same faults");
    assert_ne!(runs[0], runs[2], "another seed, other faults");
}

/// A burst of jobs on the Kubernetes executor where one pod of each kind of trouble the
/// executor classifies goes wrong (image pull failure, Pending past the timeout, OOM kill,
/// eviction, spot reclaim, node lost) next to a sidecar that never exits and healthy jobs:
/// each job ends with the failure reason `docs/kubernetes.md` documents, within the grace it
/// documents (`image_pull_grace`, `pending_timeout`, "at once"), its trace says why, and no pod
/// or Secret is left.
#[tokio::test(flavor = "multi_thread")]
async fn pod_faults_in_a_burst_end_each_job_with_its_documented_reason_in_time() {
    use serde_json::json;
    use std::time::Instant;
    use support::gitlab::{GitLabServer, job_json};
    use support::kiln::{KilnProcess, config, kiln_bin};
    use support::kube::{ImageScript, KubeServer, PodMatch};

    let gitlab = GitLabServer::start().await;
    gitlab.add_runner_token(support::chaos::RUNNER_TOKEN);
    gitlab.set_long_poll_timeout(Duration::from_secs(2));
    gitlab.set_trace_interval(1);
    let kube = KubeServer::start().await;
    kube.alias_binary("/usr/local/bin/kiln", kiln_bin());
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.kubeconfig(&kubeconfig, "ci");
    kube.script_image(
        "registry.example.com/team/missing:1",
        ImageScript::PullFails { message: None },
    );

    let sleeper = |name: &str| job_json(name, &["echo started", "sleep 30", "echo never"]);
    let mut pull = job_json("pull", &["echo never"]);
    pull["image"]["name"] = json!("registry.example.com/team/missing:1");
    let pull = gitlab.enqueue(pull);
    let pending = gitlab.enqueue(job_json("pending", &["echo never"]));
    kube.unschedulable(PodMatch::Name(format!("kiln-gl-{pending}")));
    let oom = gitlab.enqueue(sleeper("oom"));
    let evicted = gitlab.enqueue(sleeper("evicted"));
    let spot = gitlab.enqueue(sleeper("spot"));
    let node_lost = gitlab.enqueue(sleeper("node lost"));
    let mut sidecar = job_json("sidecar", &["echo started", "sleep 2", "echo finished"]);
    sidecar["services"] = json!([{"name": "redis:7", "alias": "cache", "command": [],
        "entrypoint": [], "ports": [], "variables": []}]);
    let sidecar = gitlab.enqueue(sidecar);
    let healthy: Vec<u64> = (0..5)
        .map(|i| gitlab.enqueue(job_json(&format!("healthy {i}"), &["echo fine"])))
        .collect();

    let kiln = KilnProcess::start(&config(
        &gitlab.url(),
        support::chaos::RUNNER_TOKEN,
        &format!(
            "executor = \"kubernetes\"\nconcurrent = 20\n\n[kubernetes]\nkubeconfig = \"{}\"\nhelper_image = \"kiln-test/kiln:dev\"\npending_timeout = \"10s\"\nimage_pull_grace = \"2s\"\n",
            kubeconfig.display()
        ),
    ));
    let started = Instant::now();
    // Disrupt each running build once its script has started; remember when.
    let mut injected = std::collections::BTreeMap::new();
    for id in [oom, evicted, spot, node_lost] {
        gitlab
            .wait_for_trace(id, "started", Duration::from_secs(60))
            .await;
        let pod = format!("kiln-gl-{id}");
        match id {
            id if id == oom => kube.oom_kill(&pod, "build"),
            id if id == evicted => kube.evict(&pod),
            id if id == spot => kube.spot_reclaim(&pod),
            _ => kube.node_lost(&pod),
        }
        injected.insert(id, Instant::now());
    }
    // (job, state, failure reason, text its trace must hold, grace after the fault)
    /// (job, state, failure reason, text its trace must hold, grace, counted from)
    type Case<'a> = (u64, &'a str, Option<&'a str>, &'a str, Duration, Instant);
    let cases: Vec<Case> = vec![
        (
            pull,
            "failed",
            Some("image_pull_failure"),
            "registry.example.com/team/missing:1",
            Duration::from_secs(2),
            started,
        ),
        (
            pending,
            "failed",
            Some("runner_system_failure"),
            "still Pending after 10s",
            Duration::from_secs(10),
            started,
        ),
        (
            oom,
            "failed",
            Some("script_failure"),
            "OOMKilled",
            Duration::ZERO,
            injected[&oom],
        ),
        (
            evicted,
            "failed",
            Some("runner_system_failure"),
            "evicted",
            Duration::ZERO,
            injected[&evicted],
        ),
        (
            spot,
            "failed",
            Some("runner_system_failure"),
            "spot instance",
            Duration::ZERO,
            injected[&spot],
        ),
        (
            node_lost,
            "failed",
            Some("runner_system_failure"),
            "lost",
            Duration::ZERO,
            injected[&node_lost],
        ),
        (
            sidecar,
            "success",
            None,
            "finished",
            Duration::ZERO,
            started,
        ),
    ];
    // "At once" allows for the kubelet's grace, one watch event and the report: 15 s on this
    // shared 2-core machine; the grace-bound cases get the same slack on top of their grace.
    let slack = Duration::from_secs(15);
    for (id, state, reason, says, grace, from) in cases {
        let job = gitlab
            .wait_for_state(
                id,
                &["success", "failed", "canceled"],
                Duration::from_secs(90),
            )
            .await;
        let took = job.finished_at.unwrap().saturating_duration_since(from);
        assert_eq!(
            job.state,
            state,
            "job {} `{}`:\n{}\n{}",
            id,
            job.name,
            job.trace,
            kiln.logs()
        );
        assert_eq!(
            job.failure_reason.as_deref(),
            reason,
            "job `{}`:\n{}",
            job.name,
            job.trace
        );
        assert!(
            job.trace.contains(says),
            "job `{}` does not say `{says}`:\n{}",
            job.name,
            job.trace
        );
        assert!(
            took <= grace + slack,
            "job `{}` took {took:?} after its fault, documented grace {grace:?}",
            job.name
        );
        assert_eq!(
            job.final_updates.len().min(1),
            1,
            "job `{}` was finished",
            job.name
        );
    }
    for id in healthy {
        let job = gitlab
            .wait_for_state(id, &["success", "failed"], Duration::from_secs(60))
            .await;
        assert_eq!(job.state, "success", "{}", job.trace);
    }
    kube.wait_for(Duration::from_secs(30), |s| {
        s.pods.is_empty() && s.secrets.is_empty()
    })
    .await;
    let mut created = kube.creations();
    let all = created.len();
    created.sort();
    created.dedup();
    assert_eq!(created.len(), all, "no pod twice: {:?}", kube.creations());
}

/// GitLab goes away (every connection refused) and comes back: kiln keeps running, backs off
/// to at most 12 job requests a minute, `/readyz` answers 503 naming GitLab and the error while
/// it is gone, and a job queued during the outage runs once GitLab is back.
///
/// The outage here is 40 s, not 5 minutes: kiln's backoff doubles from 1 s to its 60 s cap, so
/// the first minute of any outage holds the most requests (1 + 2 + 4 + 8 + 16 s apart), and 40 s
/// of it already show whether the rate stays under 12 a minute; `examples/chaos --outage 300`
/// runs the full 5 minutes.
#[tokio::test(flavor = "multi_thread")]
async fn gitlab_gone_and_back_is_waited_out_with_backoff_and_reported_by_readyz() {
    let outcome =
        support::chaos::gitlab_outage(support::faults::seed(17), Duration::from_secs(40)).await;
    assert!(outcome.requests_per_minute <= 12.0, "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn jenkins_agents_survive_faults_on_both_apis_and_two_sigkills() {
    let seed = support::faults::seed(17);
    support::chaos::jenkins_kubernetes(&support::chaos::JenkinsChaos {
        seed,
        items: 10,
        concurrency: 6,
        fault_rate: 0.2,
        kills: 2,
        stall: Duration::from_secs(7),
        deadline: Duration::from_secs(110),
    })
    .await;
}
