//! End to end: a real `kiln run` serving GitHub Actions jobs of the GitHub test server with
//! just-in-time runner pods on the Kubernetes test server. Each runner pod runs the Actions
//! runner stand-in, which decodes its JIT config, takes one job and exits, as the real runner
//! does with `--jitconfig`.

use crate::support;

use std::time::Duration;

use support::github::{Access, DeliveryFault, GitHubServer, JobSpec, RunSpec, fake_runner_bin};
use support::kiln::{KilnProcess, send_signal};
use support::kube::{ImageScript, KubeServer};

pub(crate) const REPO: &str = "acme/widgets";
pub(crate) const PAT: &str = "github_pat_test_0123456789";
pub(crate) const HOOK_SECRET: &str = "webhook-secret-0123456789";
pub(crate) const RUNNER_IMAGE: &str = "ghcr.io/actions/actions-runner:latest";

pub(crate) struct Setup {
    pub(crate) github: GitHubServer,
    pub(crate) kube: KubeServer,
    pub(crate) dir: tempfile::TempDir,
}

pub(crate) async fn setup() -> Setup {
    let github = GitHubServer::start().await;
    github.add_repo(REPO);
    github.add_pat(PAT, "acme", Access::all());
    let kube = KubeServer::start().await;
    kube.alias_binary("/home/runner/run.sh", fake_runner_bin());
    let dir = tempfile::tempdir().unwrap();
    kube.kubeconfig(dir.path().join("kubeconfig"), "ci");
    Setup { github, kube, dir }
}

impl Setup {
    pub(crate) fn config(&self, auth: &str, extra: &str) -> String {
        format!(
            r#"executor = "kubernetes"
concurrent = 30

[kubernetes]
kubeconfig = "{}"
image_pull_grace = "2s"

[[sources.github]]
name = "widgets"
api_url = "{}"
owner = "acme"
repo = "widgets"
{auth}
labels = ["kiln"]
webhook_secret = "{HOOK_SECRET}"
{extra}
"#,
            self.dir.path().join("kubeconfig").display(),
            self.github.url(),
        )
    }

    pub(crate) fn kiln(&self, extra: &str) -> KilnProcess {
        let kiln = KilnProcess::start(&self.config(&format!("token = \"{PAT}\""), extra));
        self.github
            .set_webhook(&format!("http://{}/hooks/github", kiln.http), HOOK_SECRET);
        kiln
    }

    pub(crate) fn runner_pods(&self) -> usize {
        self.kube
            .pods()
            .iter()
            .filter(|p| {
                p.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("kiln-gh-"))
            })
            .count()
    }

    /// Runner pods ever created.
    pub(crate) fn pods_created(&self) -> usize {
        self.kube
            .creations()
            .iter()
            .filter(|name| name.starts_with("kiln-gh-"))
            .count()
    }

    pub(crate) async fn nothing_left(&self, secs: u64) {
        self.kube
            .wait_for(Duration::from_secs(secs), |s| {
                s.pods.is_empty() && s.secrets.is_empty()
            })
            .await;
        until(secs, "no runner registration left", || {
            self.github.registered_runners().is_empty()
        })
        .await;
    }
}

pub(crate) async fn until(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn ready(kiln: &KilnProcess) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = kiln.get("/readyz").await;
        if status == 200 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "kiln never became ready:\n{}",
            kiln.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn completed(github: &GitHubServer, ids: &[u64]) -> bool {
    ids.iter()
        .all(|id| github.job(*id).is_some_and(|j| j.status == "completed"))
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_queued_jobs_get_twenty_runner_pods_each_used_once() {
    let s = setup().await;
    let kiln = s.kiln("reconcile_interval = \"5s\"");
    ready(&kiln).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        // Webhooks as GitHub sends them: some twice, one never (kiln's reconcile finds it).
        match i {
            3 | 7 | 11 => s.github.fault_next_delivery(DeliveryFault::Duplicate),
            13 => s.github.fault_next_delivery(DeliveryFault::Drop),
            _ => {}
        }
        let run = s.github.enqueue_run(
            REPO,
            RunSpec::new("CI").job(
                JobSpec::new(&format!("build-{i}"), &["self-hosted", "kiln"])
                    .runs_for(Duration::from_millis(300)),
            ),
        );
        ids.extend(run.job_ids);
    }
    until(60, "all twenty jobs completed", || {
        completed(&s.github, &ids)
    })
    .await;
    for id in &ids {
        let job = s.github.job(*id).unwrap();
        assert_eq!(job.conclusion.as_deref(), Some("success"), "{job:?}");
    }
    let runners = s.github.runners();
    assert_eq!(
        runners.len(),
        20,
        "one runner per job: {runners:#?}\n{}",
        kiln.logs()
    );
    assert!(
        runners.iter().all(|r| r.job_id.is_some()),
        "every runner took one job: {runners:#?}"
    );
    let mut taken: Vec<u64> = runners.iter().filter_map(|r| r.job_id).collect();
    taken.sort_unstable();
    taken.dedup();
    assert_eq!(taken.len(), 20, "no job ran twice");
    assert_eq!(s.pods_created(), 20, "{:?}", s.kube.creations());
    // Each runner is named after a job of the burst (the name two coordinators agree on):
    // `kiln-gh-<job>`, or `kiln-gh-<job>-<n>` when GitHub gave that job's runner another job
    // first (runners are fungible; the dropped webhook's job is one way that happens).
    let names = s.kube.creations();
    let plain = names.iter().filter(|n| !n[8..].contains('-')).count();
    for name in &names {
        let rest = name.strip_prefix("kiln-gh-").unwrap();
        let job = rest.split_once('-').map_or(rest, |(job, _)| job);
        assert!(ids.contains(&job.parse().unwrap()), "{name}");
    }
    assert!(
        plain >= 15,
        "most runners carry their job's own name: {names:?}"
    );
    let unique: std::collections::BTreeSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "{names:?}");
    s.nothing_left(30).await;
    // A runner that exits after its job ended well, and GitHub removed its JIT registration
    // itself: kiln deleted none.
    let want = r#"kiln_builds_finished_total{source="github",outcome="succeeded",reason=""} 20"#;
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = kiln.get("/metrics").await.1;
        if metrics.contains(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        metrics.contains(
            r#"kiln_builds_finished_total{source="github",outcome="succeeded",reason=""} 20"#
        ),
        "{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("kiln_builds_finished"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let deletes: Vec<String> = s
        .github
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path.clone())
        .collect();
    assert!(deletes.is_empty(), "{deletes:?}");
    assert!(!kiln.logs().contains(PAT), "the token is never logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runner_that_dies_before_its_job_is_deregistered_and_replaced() {
    let s = setup().await;
    s.kube.script_image(
        RUNNER_IMAGE,
        ImageScript::PullFails {
            message: Some("registry unreachable".into()),
        },
    );
    let kiln = s.kiln("reconcile_interval = \"5s\"");
    ready(&kiln).await;
    let job = s.github.enqueue_job(REPO, &["self-hosted", "kiln"]);
    until(30, "the first runner's registration removed", || {
        s.github
            .runners()
            .iter()
            .any(|r| r.removed.is_some() && !r.connected)
    })
    .await;
    s.kube.clear_image_script(RUNNER_IMAGE);
    until(60, "the job ran on a replacement", || {
        s.github.job(job).is_some_and(|j| j.status == "completed")
    })
    .await;
    assert_eq!(
        s.github.job(job).unwrap().conclusion.as_deref(),
        Some("success")
    );
    let logs = kiln.logs();
    assert!(
        logs.contains("the runner ended before it took a job"),
        "{logs}"
    );
    assert!(logs.contains("image_pull_failure"), "{logs}");
    s.nothing_left(30).await;
    let want = r#"kiln_builds_finished_total{source="github",outcome="succeeded",reason=""} 20"#;
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = kiln.get("/metrics").await.1;
        if metrics.contains(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        metrics.contains("kiln_github_registrations_removed_total"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_coordinator_mid_burst_loses_no_job_and_leaks_nothing() {
    let s = setup().await;
    let mut first = s.kiln("reconcile_interval = \"5s\"");
    ready(&first).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let run = s.github.enqueue_run(
            REPO,
            RunSpec::new("CI").job(
                JobSpec::new(&format!("build-{i}"), &["self-hosted", "kiln"])
                    .runs_for(Duration::from_secs(2)),
            ),
        );
        ids.extend(run.job_ids);
    }
    until(20, "some runners started", || s.runner_pods() >= 4).await;
    send_signal(first.pid(), "KILL");
    assert!(first.wait_exit(Duration::from_secs(10)));
    // Jobs queued while no coordinator runs are found by the next one's first reconcile.
    for _ in 0..3 {
        ids.push(s.github.enqueue_job(REPO, &["self-hosted", "kiln"]));
    }
    let second = s.kiln("reconcile_interval = \"5s\"");
    until(90, "every job completed", || completed(&s.github, &ids)).await;
    for id in &ids {
        let job = s.github.job(*id).unwrap();
        assert_eq!(job.conclusion.as_deref(), Some("success"), "{job:?}");
    }
    s.nothing_left(30).await;
    assert!(
        second.logs().contains("adopted a build of an earlier run"),
        "{}",
        second.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrongly_signed_webhook_is_refused_and_starts_nothing() {
    let s = setup().await;
    let kiln = s.kiln("reconcile_interval = \"1h\"");
    ready(&kiln).await;
    let body = serde_json::json!({
        "action": "queued",
        "workflow_job": {"id": 999, "run_id": 1, "run_attempt": 1,
                         "labels": ["self-hosted", "kiln"], "status": "queued", "name": "evil"},
        "repository": {"full_name": REPO},
    })
    .to_string();
    let client = reqwest::Client::new();
    let post = |signature: Option<String>| {
        let mut request = client
            .post(format!("http://{}/hooks/github", kiln.http))
            .header("X-GitHub-Event", "workflow_job")
            .header("X-GitHub-Delivery", "d-1")
            .body(body.clone());
        if let Some(signature) = signature {
            request = request.header("X-Hub-Signature-256", signature);
        }
        request.send()
    };
    let wrong = support::github::sign_webhook("not-the-secret-0123", body.as_bytes());
    assert_eq!(post(Some(wrong)).await.unwrap().status().as_u16(), 401);
    assert_eq!(post(None).await.unwrap().status().as_u16(), 401);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(s.github.runners().is_empty(), "nothing was registered");
    assert_eq!(s.runner_pods(), 0);
    // The right signature is heard (and a redelivery of it is dropped).
    let right = support::github::sign_webhook(HOOK_SECRET, body.as_bytes());
    assert_eq!(
        post(Some(right.clone())).await.unwrap().status().as_u16(),
        202
    );
    assert_eq!(post(Some(right)).await.unwrap().status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_lost_with_an_evicted_runner_is_rerun_once_with_app_auth() {
    let s = setup().await;
    let key = s.github.add_app(4242);
    s.github.add_installation(4242, 77, "acme", Access::all());
    let pem = key.write_private_key(s.dir.path(), "app.pem");
    let auth = format!("app_id = 4242\nprivate_key_file = \"{}\"", pem.display());
    let kiln = KilnProcess::start(&s.config(
        &auth,
        "reconcile_interval = \"5s\"\nrerun_on_infrastructure_failure = true",
    ));
    s.github
        .set_webhook(&format!("http://{}/hooks/github", kiln.http), HOOK_SECRET);
    ready(&kiln).await;
    let run = s.github.enqueue_run(
        REPO,
        RunSpec::new("CI").job(JobSpec::new("build", &["self-hosted", "kiln"]).held()),
    );
    let job = run.job_ids[0];
    until(30, "the job runs", || {
        s.github.job(job).is_some_and(|j| j.status == "in_progress")
    })
    .await;
    let record = s.github.job(job).unwrap();
    let runner_name = record.runner_name.clone().unwrap();
    // The node evicts the runner's pod; GitHub notices its runner is gone and fails the job.
    s.kube.evict(&runner_name);
    s.github.lose_runner(record.runner_id.unwrap());
    until(60, "a second attempt succeeded", || {
        s.github.run_attempt(run.run_id) == Some(2)
            && s.github
                .jobs()
                .iter()
                .any(|j| j.run_id == run.run_id && j.run_attempt == 2 && j.status == "in_progress")
    })
    .await;
    let second = s
        .github
        .jobs()
        .into_iter()
        .find(|j| j.run_id == run.run_id && j.run_attempt == 2)
        .unwrap();
    s.github.finish_job(second.id, "success");
    until(30, "the re-run completed", || {
        s.github
            .job(second.id)
            .is_some_and(|j| j.status == "completed")
    })
    .await;
    let logs = kiln.logs();
    assert!(
        logs.contains("the runner was lost while it ran a job"),
        "{logs}"
    );
    let (_, metrics) = kiln.get("/metrics").await;
    assert!(metrics.contains("kiln_github_jobs_lost_total"), "{metrics}");
    assert!(
        !logs.contains("BEGIN RSA PRIVATE KEY") && !logs.contains(PAT),
        "no credential in the log"
    );
    s.nothing_left(30).await;
}

/// Enterprise scope: a job of a repository of an organization in the enterprise, announced by
/// the (enterprise) webhook, runs on a JIT runner kiln registered at the enterprise with a
/// classic token, in the enterprise runner group kiln looked up by name; the runner is listed and
/// its registration is gone afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn an_enterprise_runner_runs_a_job_of_a_repository_in_the_enterprise() {
    const CLASSIC: &str = "classic_kiln_e2e_token_0123456789";
    let s = setup().await;
    s.github
        .add_enterprise("megacorp", &["acme"], &["ent-admin"]);
    s.github.add_pat(
        CLASSIC,
        "ent-admin",
        Access::classic(&["manage_runners:enterprise", "repo"]),
    );
    s.github
        .add_runner_group("megacorp", 7, "kiln-enterprise", None);
    let config = format!(
        r#"executor = "kubernetes"
concurrent = 5

[kubernetes]
kubeconfig = "{}"

[[sources.github]]
api_url = "{}"
enterprise = "megacorp"
token = "{CLASSIC}"
labels = ["kiln"]
webhook_secret = "{HOOK_SECRET}"
reconcile_interval = "5s"
runner_group = "kiln-enterprise"
"#,
        s.dir.path().join("kubeconfig").display(),
        s.github.url(),
    );
    let kiln = KilnProcess::start(&config);
    s.github
        .set_webhook(&format!("http://{}/hooks/github", kiln.http), HOOK_SECRET);
    ready(&kiln).await;
    let run = s.github.enqueue_run(
        REPO,
        RunSpec::new("CI").job(
            JobSpec::new("build", &["self-hosted", "linux", "x64", "kiln"])
                .runs_for(Duration::from_millis(200)),
        ),
    );
    until(60, "the job ran on an enterprise runner", || {
        completed(&s.github, &run.job_ids)
    })
    .await;
    let job = s.github.job(run.job_ids[0]).unwrap();
    assert_eq!(job.conclusion.as_deref(), Some("success"), "{job:?}");
    let runners = s.github.runners();
    let ran = runners
        .iter()
        .find(|r| r.job_id == Some(job.id))
        .unwrap_or_else(|| panic!("{runners:#?}\n{}", kiln.logs()));
    assert_eq!(ran.scope, "enterprise megacorp", "{ran:?}");
    assert_eq!(ran.group_id, 7, "the group named by runner_group: {ran:?}");
    let requests = s.github.requests();
    assert!(
        requests.iter().any(|r| r.method == "POST"
            && r.path == "/enterprises/megacorp/actions/runners/generate-jitconfig"
            && r.status == 201),
        "{requests:#?}"
    );
    assert!(
        !requests
            .iter()
            .any(|r| r.path.contains("/actions/runners") && !r.path.starts_with("/enterprises/")),
        "runners are registered and listed at the enterprise only: {requests:#?}"
    );
    s.nothing_left(30).await;
    assert!(
        !kiln.logs().contains(CLASSIC),
        "the token never reaches the log"
    );
}

/// `container_mode = "dind"` (with the `[kubernetes] privileged` opt-in): each runner pod has
/// a privileged `docker:dind` sidecar sharing the runner's work volume, and the runner reaches
/// its daemon through `DOCKER_HOST`; without it, a runner pod has none of that.
#[tokio::test(flavor = "multi_thread")]
async fn dind_container_mode_adds_a_privileged_sidecar_the_work_volume_and_docker_host() {
    use support::kube::PodMatch;
    let s = setup().await;
    for (extra, dind) in [("", false), ("container_mode = \"dind\"", true)] {
        let mut config = s.config(&format!("token = \"{PAT}\""), extra);
        if dind {
            config = config.replace("[kubernetes]\n", "[kubernetes]\nprivileged = true\n");
        }
        let kiln = KilnProcess::start(&config);
        s.github
            .set_webhook(&format!("http://{}/hooks/github", kiln.http), HOOK_SECRET);
        ready(&kiln).await;
        s.kube.hold(PodMatch::All);
        let run = s.github.enqueue_run(
            REPO,
            RunSpec::new("CI").job(
                JobSpec::new("containers", &["self-hosted", "kiln"])
                    .runs_for(Duration::from_millis(200)),
            ),
        );
        until(30, "a runner pod", || s.runner_pods() == 1).await;
        let pod = s
            .kube
            .pods()
            .into_iter()
            .find(|p| {
                p.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("kiln-gh-"))
            })
            .unwrap();
        let spec = pod.spec.unwrap();
        let runner = spec.containers.iter().find(|c| c.name == "runner").unwrap();
        let docker_host = runner
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "DOCKER_HOST")
            .and_then(|e| e.value.clone());
        let sidecar = spec.containers.iter().find(|c| c.name == "dind");
        if dind {
            let sidecar = sidecar.expect("a dind sidecar");
            assert_eq!(sidecar.image.as_deref(), Some("docker:dind"));
            let security = sidecar.security_context.as_ref().unwrap();
            assert_eq!(security.privileged, Some(true));
            let work = |c: &k8s_openapi::api::core::v1::Container| {
                c.volume_mounts
                    .iter()
                    .flatten()
                    .find(|m| m.mount_path == "/home/runner/_work")
                    .map(|m| m.name.clone())
            };
            assert!(work(runner).is_some());
            assert_eq!(work(runner), work(sidecar), "one work volume, shared");
            assert_eq!(
                docker_host.as_deref(),
                Some("unix:///home/runner/_work/docker.sock")
            );
            let args = sidecar.args.clone().unwrap_or_default();
            assert!(
                args.iter()
                    .any(|a| a == "--host=unix:///home/runner/_work/docker.sock"),
                "the daemon listens only on the shared socket: {args:?}"
            );
            assert!(!args.iter().any(|a| a.contains("tcp://")), "{args:?}");
            assert_ne!(
                runner.security_context.as_ref().and_then(|c| c.privileged),
                Some(true),
                "only the sidecar is privileged, never the runner"
            );
        } else {
            assert!(sidecar.is_none(), "no sidecar by default");
            assert_eq!(spec.containers.len(), 1);
            assert!(docker_host.is_none(), "no DOCKER_HOST by default");
        }
        s.kube.release_hold();
        until(60, "the job completed", || {
            completed(&s.github, &run.job_ids)
        })
        .await;
        s.nothing_left(30).await;
        drop(kiln);
    }
}
