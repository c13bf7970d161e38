//! End to end: warm pods of the Kubernetes executor, driven through the library against the
//! Kubernetes test server (whose kubelet takes a fixed time to start each pod, and gives each
//! pod a loopback IP of its own its processes listen on) with real jobs from the test GitLab:
//! a warm pod is made, becomes idle once its containers run, is taken for a job by exactly one
//! replica, is handed the job over the pod network and runs it in GitLab. The coordinator's
//! pools on top of this are tested with the chain.

use crate::support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kiln::build::{Build, BuildKey, Image, JOB_FILE, Outcome, START_FILE, SourceKind, Workload};
use kiln::executor::kubernetes::{KubernetesConfig, KubernetesExecutor};
use kiln::executor::{Executor, SharedBuilds, TakeError, WarmPods, WarmShape, WarmState, Watch};
use kiln::job_file::{AgentConfig, AgentJob};
use serde_json::{Value, json};
use support::gitlab::{GitLabServer, job_json};
use support::kiln::kiln_bin;
use support::kube::KubeServer;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "glrt-warm-token";
const HELPER_IMAGE: &str = "kiln-test/kiln:dev";
const IMAGE: &str = "alpine:3.20";
/// The kubelet's time from scheduling a pod to starting its containers.
const START_DELAY: Duration = Duration::from_secs(2);

struct Setup {
    gitlab: GitLabServer,
    kube: KubeServer,
    dir: tempfile::TempDir,
    shutdowns: Vec<CancellationToken>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for shutdown in &self.shutdowns {
            shutdown.cancel();
        }
    }
}

async fn setup() -> Setup {
    let gitlab = GitLabServer::start().await;
    gitlab.add_runner_token(TOKEN);
    gitlab.set_trace_interval(1);
    let kube = KubeServer::start().await;
    kube.alias_binary("/usr/local/bin/kiln", kiln_bin());
    kube.set_start_delay(START_DELAY);
    let dir = tempfile::tempdir().unwrap();
    kube.kubeconfig(dir.path().join("kubeconfig"), "ci");
    Setup {
        gitlab,
        kube,
        dir,
        shutdowns: Vec::new(),
    }
}

fn shape() -> WarmShape {
    WarmShape {
        pool: "alpine".into(),
        image: IMAGE.into(),
        class: None,
    }
}

impl Setup {
    /// An executor as replica `replica` (a coordinator's).
    async fn executor(&mut self, replica: &str) -> KubernetesExecutor {
        let config = KubernetesConfig {
            kubeconfig: Some(self.dir.path().join("kubeconfig")),
            replica: Some(replica.into()),
            helper_image: HELPER_IMAGE.into(),
            ..Default::default()
        };
        let shutdown = CancellationToken::new();
        self.shutdowns.push(shutdown.clone());
        KubernetesExecutor::connect(&config, shutdown)
            .await
            .unwrap()
    }

    /// Queues a job in GitLab and takes it as the runner does: the job's build, with `start`
    /// as the coordinator's line on how it started.
    async fn job(&self, script: &[&str], start: &str) -> Build {
        let id = self.gitlab.enqueue(job_json("warm", script));
        let response = reqwest::Client::new()
            .post(format!("{}api/v4/jobs/request", self.gitlab.url()))
            .json(&json!({"token": TOKEN, "info": {"features": {"trace_sections": true}}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "GitLab hands out the job");
        let job: Value = response.json().await.unwrap();
        assert_eq!(job["id"].as_u64(), Some(id));
        let agent_job = AgentJob {
            gitlab_url: self.gitlab.url(),
            job: job.clone(),
            settings: AgentConfig {
                trace_interval: Duration::from_millis(500),
                ..AgentConfig::default()
            },
            executor: "kubernetes".into(),
            runner: "warm".into(),
            masked: Vec::new(),
            tls_ca: None,
            cache: None,
        };
        let key = BuildKey {
            source: SourceKind::GitLab,
            runner: "warm".into(),
            id,
        };
        Build {
            name: key.resource_name(),
            key,
            workload: Workload::KilnAgent {
                image: Some(Image {
                    name: job["image"]["name"].as_str().unwrap_or(IMAGE).to_owned(),
                    ..Image::default()
                }),
                services: Vec::new(),
            },
            secrets: BTreeMap::from([
                (JOB_FILE.to_owned(), serde_json::to_vec(&agent_job).unwrap()),
                (START_FILE.to_owned(), start.as_bytes().to_vec()),
            ]),
            class: None,
            requests: Vec::new(),
            timeout: Some(Duration::from_secs(600)),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            about: kiln::build::About::default(),
            untrusted: false,
            registry_auths: Vec::new(),
        }
    }

    /// Waits until no pod and no Secret is left.
    async fn nothing_left(&self) {
        self.kube
            .wait_for(Duration::from_secs(20), |st| {
                st.pods.is_empty() && st.secrets.is_empty()
            })
            .await;
    }

    fn snapshot_json(&self, pod: &str) -> String {
        let pod = self
            .kube
            .pod(pod)
            .map(|p| serde_json::to_string(&p).unwrap());
        let secret = self
            .kube
            .secrets()
            .into_iter()
            .map(|s| serde_json::to_string(&s).unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        format!("{}\n{secret}", pod.unwrap_or_default())
    }
}

fn secret_of(kube: &KubeServer, name: &str) -> Option<k8s_openapi::api::core::v1::Secret> {
    kube.secrets()
        .into_iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
}

/// Waits until warm pod `name` is idle; how long it took from now.
async fn wait_idle(executor: &KubernetesExecutor, name: &str) -> Duration {
    let started = Instant::now();
    let mut states = Vec::new();
    loop {
        let pods = WarmPods::list(executor).await.unwrap();
        let state = pods
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.state.clone());
        if state == Some(WarmState::Idle) {
            return started.elapsed();
        }
        if states.last() != Some(&state) {
            states.push(state.clone());
        }
        assert!(
            !matches!(state, Some(WarmState::Broken(_))),
            "warm pod {name} broke: {states:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "warm pod {name} never became idle: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Takes `pod` for `build`, launches it (the hand-off) and watches it to its end.
async fn run_on(executor: &KubernetesExecutor, pod: &str, mut build: Build) -> kiln::build::Ending {
    executor.take(pod, &build).await.unwrap();
    build.name = pod.to_owned();
    executor.launch(&build).await.unwrap();
    executor.watch(pod, Watch::default()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warm_pod_becomes_idle_takes_a_job_runs_it_in_gitlab_and_is_deleted_with_its_secret() {
    let mut s = setup().await;
    let executor = s.executor("one").await;
    let created = Instant::now();
    let pod = executor.start(&shape()).await.unwrap();
    assert!(pod.starts_with("kiln-warm-alpine-"), "{pod}");
    let listed = WarmPods::list(&executor).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].pool, "alpine");
    assert_eq!(listed[0].replica.as_deref(), Some("one"));
    wait_idle(&executor, &pod).await;
    assert!(
        created.elapsed() >= START_DELAY,
        "idle only once the kubelet started its containers"
    );
    let labels = s.kube.pod(&pod).unwrap().metadata.labels.unwrap();
    assert_eq!(labels["kiln.dev/warm-pool"], "alpine");
    assert!(!labels.contains_key("kiln.dev/job-id"));
    let secret = secret_of(&s.kube, &pod).unwrap().data.unwrap();
    assert_eq!(
        secret.keys().collect::<Vec<_>>(),
        ["handoff.key"],
        "a warm pod's Secret holds its key and nothing else"
    );
    assert!(!s.snapshot_json(&pod).contains(TOKEN));

    let build = s
        .job(
            &[
                "echo hello from the warm pod",
                "echo job token $CI_JOB_TOKEN",
            ],
            "started on warm pod test (pool alpine), waiting 0.1 s",
        )
        .await;
    let id = build.key.id;
    assert_eq!(executor.fits(&build, &shape()), Ok(()));
    let ending = run_on(&executor, &pod, build).await;
    assert_eq!(ending.outcome, Outcome::Succeeded, "{}", ending.detail);
    let job = s.gitlab.job(id);
    assert_eq!(job.state, "success");
    assert!(
        job.trace.contains("hello from the warm pod"),
        "{}",
        job.trace
    );
    assert!(!job.trace.contains(&job.token), "the job token is masked");
    let start_line = job
        .trace
        .find("started on warm pod test (pool alpine), waiting 0.1 s")
        .expect("the start line is in the trace");
    let running = job.trace.find("Running with kiln").unwrap();
    let executor_section_end = job.trace.find("section_end:").unwrap();
    assert!(
        running < start_line && start_line < executor_section_end,
        "{}",
        job.trace
    );
    // The job's files reached the pod, never the runner token.
    assert!(!s.snapshot_json(&pod).contains(TOKEN));
    assert_eq!(
        s.kube.pod(&pod).unwrap().metadata.labels.unwrap()["kiln.dev/job-id"],
        id.to_string()
    );
    assert!(
        WarmPods::list(&executor).await.unwrap().is_empty(),
        "a taken pod is no longer warm"
    );

    executor.delete(&pod).await;
    s.nothing_left().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn of_two_replicas_taking_one_idle_pod_exactly_one_wins() {
    let mut s = setup().await;
    let a = s.executor("a").await;
    let b = s.executor("b").await;
    let pod = a.start(&shape()).await.unwrap();
    wait_idle(&a, &pod).await;
    wait_idle(&b, &pod).await;
    let first = s.job(&["echo first"], "").await;
    let second = s.job(&["echo second"], "").await;
    let (took_a, took_b) = tokio::join!(a.take(&pod, &first), b.take(&pod, &second));
    let (winner, mut build, loser) = match (&took_a, &took_b) {
        (Ok(()), Err(TakeError::Unavailable { .. })) => (&a, first, second),
        (Err(TakeError::Unavailable { .. }), Ok(())) => (&b, second, first),
        other => panic!("exactly one take wins: {other:?}"),
    };
    let secret = secret_of(&s.kube, &pod).unwrap();
    assert_eq!(
        secret.metadata.labels.unwrap()["kiln.dev/job-id"],
        build.key.id.to_string(),
        "the pod's Secret names the winner's job"
    );
    build.name = pod.clone();
    winner.launch(&build).await.unwrap();
    let ending = winner.watch(&pod, Watch::default()).await;
    assert_eq!(ending.outcome, Outcome::Succeeded, "{}", ending.detail);
    assert_eq!(s.gitlab.job(build.key.id).state, "success");
    assert_eq!(
        s.gitlab.job(loser.key.id).state,
        "running",
        "the loser's job starts cold elsewhere"
    );
    winner.delete(&pod).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_executor_counts_idle_warm_pods_again_and_never_takes_them_for_builds() {
    let mut s = setup().await;
    let first = s.executor("one").await;
    let pod = first.start(&shape()).await.unwrap();
    wait_idle(&first, &pod).await;
    drop(first);
    s.shutdowns.remove(0).cancel();

    let second = s.executor("one").await;
    let listed = WarmPods::list(&second).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, pod);
    assert_eq!(listed[0].state, WarmState::Idle);
    assert!(
        SharedBuilds::list(&second).await.unwrap().is_empty(),
        "an idle warm pod is its pool's, not a build to adopt or clean up"
    );
    assert!(
        second
            .list_except(&["other".into()])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.kube.pod(&pod).is_some(), "listing builds left it alone");
    second.retire(&pod).await;
    s.nothing_left().await;
    assert!(WarmPods::list(&second).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_taken_by_a_coordinator_that_died_before_the_hand_off_gets_its_job_from_the_next() {
    let mut s = setup().await;
    let first = s.executor("one").await;
    let pod = first.start(&shape()).await.unwrap();
    wait_idle(&first, &pod).await;
    let build = s
        .job(&["echo adopted and run"], "started on warm pod (adopted)")
        .await;
    let id = build.key.id;
    first.take(&pod, &build).await.unwrap();
    drop(first);
    s.shutdowns.remove(0).cancel();

    let second = s.executor("two").await;
    let found = SharedBuilds::list(&second).await.unwrap();
    assert_eq!(found.len(), 1, "the taken pod is a build now");
    assert_eq!(found[0].name, pod);
    assert_eq!(found[0].key.id, id);
    assert_eq!(found[0].replica.as_deref(), Some("one"));
    assert_eq!(second.claim(&found[0]).await, kiln::executor::Claim::Won);
    let ending = second.watch(&pod, Watch::default()).await;
    assert_eq!(ending.outcome, Outcome::Succeeded, "{}", ending.detail);
    let job = s.gitlab.job(id);
    assert_eq!(job.state, "success");
    assert!(job.trace.contains("adopted and run"), "{}", job.trace);
    second.delete(&pod).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_posts_to_a_warm_pod_are_refused_and_it_still_takes_its_job() {
    let mut s = setup().await;
    let executor = s.executor("one").await;
    let pod = executor.start(&shape()).await.unwrap();
    wait_idle(&executor, &pod).await;
    let ip = s
        .kube
        .pod(&pod)
        .unwrap()
        .status
        .unwrap()
        .pod_ip
        .expect("a pod IP");
    let url = format!("http://{ip}:{}{}", kiln::handoff::PORT, kiln::handoff::PATH);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let forged = kiln::handoff::seal(
        &kiln::handoff::new_key(),
        &pod,
        &kiln::handoff::Handoff::new("gitlab:evil#1", [(JOB_FILE, b"{}".as_slice())]),
    )
    .unwrap();
    for (what, body) in [
        ("nothing", Vec::new()),
        ("garbage", vec![0x5a; 70_000]),
        ("a job sealed with another key", forged),
    ] {
        let response = client.post(&url).body(body).send().await.unwrap();
        assert_eq!(response.status(), 400, "{what} is refused");
    }
    match client
        .post(&url)
        .body(vec![0u8; kiln::handoff::MAX_BODY + 1024])
        .send()
        .await
    {
        Ok(response) => assert_eq!(response.status(), 413, "a huge body is refused"),
        // The agent may close the connection on the body it will not read.
        Err(e) => assert!(!e.is_timeout(), "{e}"),
    }
    let listed = WarmPods::list(&executor).await.unwrap();
    assert_eq!(listed[0].state, WarmState::Idle, "it still waits");

    let build = s.job(&["echo the real job"], "").await;
    let id = build.key.id;
    let ending = run_on(&executor, &pod, build).await;
    assert_eq!(ending.outcome, Outcome::Succeeded, "{}", ending.detail);
    assert!(s.gitlab.job(id).trace.contains("the real job"));
    executor.delete(&pod).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_evicted_idle_pod_is_broken_and_retired() {
    let mut s = setup().await;
    let executor = s.executor("one").await;
    let pod = executor.start(&shape()).await.unwrap();
    wait_idle(&executor, &pod).await;
    s.kube.evict(&pod);
    let deadline = Instant::now() + Duration::from_secs(30);
    let reason = loop {
        let listed = WarmPods::list(&executor).await.unwrap();
        if let Some(WarmState::Broken(reason)) = listed.first().map(|p| p.state.clone()) {
            break reason;
        }
        assert!(Instant::now() < deadline, "never broken: {listed:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(reason.contains("evicted"), "{reason}");
    executor.retire(&pod).await;
    s.nothing_left().await;
    assert!(WarmPods::list(&executor).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warm_pod_deleted_under_kiln_is_broken() {
    let mut s = setup().await;
    let executor = s.executor("one").await;
    let pod = executor.start(&shape()).await.unwrap();
    wait_idle(&executor, &pod).await;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(s.kube.client("ci"), "ci");
    pods.delete(&pod, &Default::default()).await.unwrap();
    s.kube.wait_gone(&pod, Duration::from_secs(30)).await;
    let listed = WarmPods::list(&executor).await.unwrap();
    assert!(
        matches!(&listed[0].state, WarmState::Broken(r) if r.contains("deleted")),
        "{listed:?}"
    );
    executor.retire(&pod).await;
    assert!(WarmPods::list(&executor).await.unwrap().is_empty());
    assert!(secret_of(&s.kube, &pod).is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_a_warm_pod_cannot_honour_do_not_fit_and_say_why() {
    let mut s = setup().await;
    let executor = s.executor("one").await;
    let build = s.job(&["true"], "").await;
    assert_eq!(executor.fits(&build, &shape()), Ok(()));
    let mut with_services = build.clone();
    if let Workload::KilnAgent { services, .. } = &mut with_services.workload {
        services.push(kiln::build::Service {
            image: Image {
                name: "redis:7".into(),
                ..Image::default()
            },
            command: Vec::new(),
            env: Vec::new(),
            aliases: Vec::new(),
        });
    }
    assert_eq!(
        executor.fits(&with_services, &shape()),
        Err("the job has services".into())
    );
    let other_image = WarmShape {
        image: "maven:3.9".into(),
        ..shape()
    };
    assert!(
        executor
            .fits(&build, &other_image)
            .unwrap_err()
            .contains("image")
    );
    let mut always = build.clone();
    if let Workload::KilnAgent {
        image: Some(image), ..
    } = &mut always.workload
    {
        image.pull_policies = vec![kiln::build::PullPolicy::Always];
    }
    assert_eq!(
        executor.fits(&always, &shape()),
        Err("the job asks for pull policy always".into())
    );
    let mut if_not_present = build.clone();
    if let Workload::KilnAgent {
        image: Some(image), ..
    } = &mut if_not_present.workload
    {
        image.pull_policies = vec![kiln::build::PullPolicy::IfNotPresent];
    }
    assert_eq!(
        executor.fits(&if_not_present, &shape()),
        Ok(()),
        "the image is there"
    );
    let mut overriding = build.clone();
    overriding.requests.push(kiln::build::Requested {
        what: kiln::build::Request::Resource(kiln::build::ResourceField::CpuLimit),
        value: "2".into(),
        origin: "KUBERNETES_CPU_LIMIT".into(),
    });
    assert_eq!(
        executor.fits(&overriding, &shape()),
        Err("the job overrides its pod's settings (KUBERNETES_CPU_LIMIT)".into())
    );
    let mut with_login = build.clone();
    with_login.registry_auths.push(kiln::build::RegistryAuth {
        registry: "docker.io".into(),
        username: "u".into(),
        password: "p".into(),
        issued: true,
    });
    assert_eq!(
        executor.fits(&with_login, &shape()),
        Err("the job pulls with registry logins".into())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_build_prints_the_coordinators_start_line_first() {
    let mut s = setup().await;
    s.kube.set_start_delay(Duration::ZERO);
    let executor = s.executor("one").await;
    let build = s
        .job(&["echo cold"], "started cold: the job has services")
        .await;
    let (id, name) = (build.key.id, build.name.clone());
    executor.launch(&build).await.unwrap();
    let ending = executor.watch(&name, Watch::default()).await;
    assert_eq!(ending.outcome, Outcome::Succeeded, "{}", ending.detail);
    let trace = s.gitlab.job(id).trace;
    let line = trace
        .find("started cold: the job has services")
        .expect(&trace);
    assert!(line < trace.find("section_end:").unwrap(), "{trace}");
    executor.delete(&name).await;
}
