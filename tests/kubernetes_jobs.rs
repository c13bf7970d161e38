//! End to end: a real `kiln run` process with `executor = "kubernetes"` against the GitLab test
//! server and the Kubernetes test server, whose kubelet runs each pod's containers as local
//! processes — so the init container really installs the agent and the build container's
//! agent really runs the job and talks to GitLab. Each test pins one promise of the executor.

use crate::support;

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use support::gitlab::{GitLabServer, JobRecord, job_json};
use support::kiln::{KilnProcess, config, kiln_bin};
use support::kube::{ImageScript, KubeServer, PodMatch};

const TOKEN: &str = "glrt-fake-token";
const HELPER_IMAGE: &str = "kiln-test/kiln:dev";

pub(crate) struct Setup {
    pub(crate) gitlab: GitLabServer,
    pub(crate) kube: KubeServer,
    dir: tempfile::TempDir,
}

/// A test GitLab and Kubernetes, with this build's kiln as the helper image's binary.
pub(crate) async fn setup() -> Setup {
    let gitlab = GitLabServer::start().await;
    gitlab.add_runner_token(TOKEN);
    gitlab.set_long_poll_timeout(Duration::from_secs(2));
    gitlab.set_trace_interval(1);
    let kube = KubeServer::start().await;
    // The kiln image's binary is this build's kiln.
    kube.alias_binary("/usr/local/bin/kiln", kiln_bin());
    let dir = tempfile::tempdir().unwrap();
    kube.kubeconfig(dir.path().join("kubeconfig"), "ci");
    Setup { gitlab, kube, dir }
}

impl Setup {
    pub(crate) fn config(&self, top: &str, kubernetes: &str) -> String {
        let kubeconfig = self.dir.path().join("kubeconfig");
        config(
            &self.gitlab.url(),
            TOKEN,
            &format!(
                r#"executor = "kubernetes"
{top}

[kubernetes]
kubeconfig = "{}"
helper_image = "{HELPER_IMAGE}"
{pending}
image_pull_grace = "2s"
{kubernetes}
"#,
                kubeconfig.display(),
                pending = if kubernetes.contains("pending_timeout") {
                    ""
                } else {
                    "pending_timeout = \"10s\""
                }
            ),
        )
    }

    pub(crate) fn kiln(&self, top: &str, kubernetes: &str) -> KilnProcess {
        KilnProcess::start(&self.config(top, kubernetes))
    }

    pub(crate) async fn finished(&self, id: u64, secs: u64) -> JobRecord {
        self.gitlab
            .wait_for_state(
                id,
                &["success", "failed", "canceled"],
                Duration::from_secs(secs),
            )
            .await
    }

    /// Waits for job `id` to end and checks that kiln refused it as the configuration does not
    /// allow (`runner_configuration_error`), saying `why` in its trace.
    pub(crate) async fn refused(&self, id: u64, kiln: &KilnProcess, why: &str) {
        let job = self.finished(id, 60).await;
        assert_eq!(job.state, "failed", "{}", kiln.logs());
        assert_eq!(
            job.failure_reason.as_deref(),
            Some("runner_configuration_error")
        );
        assert!(job.trace.contains(why), "{}", job.trace);
    }

    /// Runs a job that sleeps, does `disrupt` to its pod once it started, and returns how the
    /// job ended (with kiln's log for messages).
    async fn disrupted(
        &self,
        name: &str,
        disrupt: impl FnOnce(&KubeServer, &str),
    ) -> (JobRecord, String) {
        let id = self
            .gitlab
            .enqueue(job_json(name, &["echo started", "sleep 20"]));
        let kiln = self.kiln("", "");
        self.gitlab
            .wait_for_trace(id, "started", Duration::from_secs(60))
            .await;
        disrupt(&self.kube, &pod_name(id));
        let job = self.finished(id, 60).await;
        self.nothing_left(15).await;
        (job, kiln.logs())
    }

    /// Waits until no pod and no Secret of kiln's is left.
    pub(crate) async fn nothing_left(&self, secs: u64) {
        self.kube
            .wait_for(Duration::from_secs(secs), |s| {
                s.pods.is_empty() && s.secrets.is_empty()
            })
            .await;
    }
}

pub(crate) fn pod_name(id: u64) -> String {
    format!("kiln-gl-{id}")
}

pub(crate) fn with_image(mut job: serde_json::Value, image: &str) -> serde_json::Value {
    job["image"]["name"] = json!(image);
    job
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_runs_in_its_own_pod_which_is_deleted_with_its_secret() {
    let s = setup().await;
    let mut job = job_json(
        "build",
        &[
            "echo hello from $CI_PROJECT_DIR",
            "echo secret is $CI_JOB_TOKEN",
        ],
    );
    // A sidecar without a command runs until the pod is deleted: it must not keep the pod.
    job["services"] = json!([{"name": "redis:7", "alias": "cache", "command": [],
        "entrypoint": [], "ports": [], "variables": []}]);
    let id = s.gitlab.enqueue(job);
    let kiln = s.kiln("", "");
    let name = pod_name(id);
    let pod = s
        .kube
        .wait_pod(&name, Duration::from_secs(30), |_| true)
        .await;
    let pod_json = serde_json::to_string(&pod).unwrap();
    let token = s.gitlab.job(id).token;
    assert!(
        !pod_json.contains(&token),
        "the job token is not in the pod spec"
    );
    let labels = pod.metadata.labels.clone().unwrap();
    assert_eq!(labels["kiln.dev/job-id"], id.to_string());
    assert_eq!(labels["kiln.dev/coordinator"], "kiln");

    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, kiln.logs());
    // The test kubelet maps /builds to the volume's local directory.
    assert!(job.trace.contains("builds/kiln/demo\n"), "{}", job.trace);
    assert!(
        job.trace.contains("Preparing the build pod"),
        "{}",
        job.trace
    );
    assert!(job.trace.contains("kubernetes executor"), "{}", job.trace);
    assert!(job.trace.contains("secret is [MASKED]"), "{}", job.trace);
    assert!(!job.trace.contains(&token));
    s.nothing_left(15).await;
    assert_eq!(s.kube.creations(), vec![name], "exactly one pod");
    assert!(
        s.gitlab.violations().is_empty(),
        "{:?}",
        s.gitlab.violations()
    );
    assert!(!kiln.logs().contains(&token), "no token in kiln's log");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_that_cannot_be_pulled_fails_as_image_pull_failure() {
    let s = setup().await;
    s.kube.script_image(
        "registry.example.com/team/missing:1",
        ImageScript::PullFails { message: None },
    );
    let id = s.gitlab.enqueue(with_image(
        job_json("pull", &["echo never"]),
        "registry.example.com/team/missing:1",
    ));
    let kiln = s.kiln("", "");
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "failed", "{}", kiln.logs());
    assert_eq!(job.failure_reason.as_deref(), Some("image_pull_failure"));
    assert!(
        job.trace.contains("registry.example.com/team/missing:1"),
        "{}",
        job.trace
    );
    s.nothing_left(15).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_stuck_pending_fails_with_the_schedulers_reason() {
    let s = setup().await;
    s.kube.unschedulable(PodMatch::All);
    let id = s.gitlab.enqueue(job_json("pending", &["echo never"]));
    let kiln = s.kiln("", "");
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "failed", "{}", kiln.logs());
    assert_eq!(job.failure_reason.as_deref(), Some("runner_system_failure"));
    assert!(
        job.trace.contains("still Pending after 10s"),
        "{}",
        job.trace
    );
    assert!(job.trace.contains("Insufficient cpu"), "{}", job.trace);
    s.nothing_left(15).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oom_killed_build_is_a_script_failure_naming_the_limit() {
    let s = setup().await;
    let id = s
        .gitlab
        .enqueue(job_json("oom", &["echo started", "sleep 20"]));
    let kiln = s.kiln("", "");
    let name = pod_name(id);
    s.gitlab
        .wait_for_trace(id, "started", Duration::from_secs(60))
        .await;
    s.kube.oom_kill(&name, "build");
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "failed", "{}", kiln.logs());
    assert_eq!(job.failure_reason.as_deref(), Some("script_failure"));
    assert!(job.trace.contains("OOMKilled"), "{}", job.trace);
    assert!(job.trace.contains("memory limit 2Gi"), "{}", job.trace);
    s.nothing_left(15).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_evicted_pod_is_a_runner_system_failure() {
    let s = setup().await;
    let (job, logs) = s.disrupted("evicted", |kube, pod| kube.evict(pod)).await;
    assert_eq!(job.state, "failed", "{logs}");
    assert_eq!(job.failure_reason.as_deref(), Some("runner_system_failure"));
    assert!(job.trace.contains("evicted"), "{}", job.trace);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spot_reclaim_is_a_runner_system_failure() {
    let s = setup().await;
    let (job, logs) = s
        .disrupted("spot", |kube, pod| kube.spot_reclaim(pod))
        .await;
    assert_eq!(job.state, "failed", "{logs}");
    assert_eq!(job.failure_reason.as_deref(), Some("runner_system_failure"));
    assert!(job.trace.contains("spot instance"), "{}", job.trace);
    assert!(
        !job.trace.contains("runner is shutting down"),
        "{}",
        job.trace
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_canceled_job_deletes_its_pod() {
    let s = setup().await;
    let id = s.gitlab.enqueue(job_json(
        "cancel",
        &["echo started", "sleep 30", "echo never"],
    ));
    let kiln = s.kiln("", "");
    s.gitlab
        .wait_for_trace(id, "started", Duration::from_secs(60))
        .await;
    s.gitlab.cancel(id, false);
    s.kube
        .wait_gone(&pod_name(id), Duration::from_secs(15))
        .await;
    let job = s.gitlab.job(id);
    assert_eq!(job.state, "canceled", "{}", kiln.logs());
    assert!(!job.trace.contains("never"));
    s.nothing_left(15).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_above_the_memory_cap_fails_without_a_pod() {
    let s = setup().await;
    let mut job = job_json("big", &["echo never"]);
    job["variables"].as_array_mut().unwrap().push(
        json!({"key": "KUBERNETES_MEMORY_LIMIT", "value": "64Gi", "public": true,
            "file": false, "masked": false, "raw": false}),
    );
    let id = s.gitlab.enqueue(job);
    let kiln = s.kiln("", "max = { memory_limit = \"8Gi\" }");
    s.refused(
        id,
        &kiln,
        "KUBERNETES_MEMORY_LIMIT=64Gi is above this runner's maximum of 8Gi",
    )
    .await;
    assert!(s.kube.creations().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_killed_mid_job_is_replaced_without_losing_or_doubling_the_build() {
    let s = setup().await;
    let id = s.gitlab.enqueue(job_json(
        "restart",
        &["echo part one", "sleep 4", "echo part two"],
    ));
    let mut first = s.kiln("", "");
    s.gitlab
        .wait_for_trace(id, "part one", Duration::from_secs(60))
        .await;
    support::kiln::send_signal(first.pid(), "KILL");
    first.wait_exit(Duration::from_secs(10));
    let second = s.kiln("", "");
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, second.logs());
    assert!(job.trace.contains("part two"), "{}", job.trace);
    assert_eq!(job.final_updates.len(), 1, "{:?}", job.final_updates);
    s.nothing_left(15).await;
    assert_eq!(s.kube.creations(), vec![pod_name(id)], "never a second pod");
    assert!(
        second
            .logs()
            .contains("adopting the builds of an earlier run"),
        "{}",
        second.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_coordinator_adopts_by_reading_and_reports_what_ended_meanwhile_at_once() {
    let s = setup().await;
    let running: Vec<u64> = (0..3)
        .map(|i| {
            s.gitlab.enqueue(job_json(
                &format!("long-{i}"),
                &["echo started", "sleep 5", "echo done"],
            ))
        })
        .collect();
    let evicted = s
        .gitlab
        .enqueue(job_json("evicted", &["echo started", "sleep 60"]));
    let mut first = s.kiln("", "");
    for id in running.iter().chain([&evicted]) {
        s.gitlab
            .wait_for_trace(*id, "started", Duration::from_secs(60))
            .await;
    }
    support::kiln::send_signal(first.pid(), "KILL");
    first.wait_exit(Duration::from_secs(10));
    // While no coordinator runs, one build is evicted: nobody can report it but the next one.
    s.kube.evict(&pod_name(evicted));
    let before = s.kube.requests().len();
    let started = std::time::Instant::now();
    let second = s.kiln("", "");

    let job = s.finished(evicted, 30).await;
    let reported_after = job.finished_at.unwrap().duration_since(started);
    assert_eq!(job.state, "failed", "{}", second.logs());
    assert_eq!(job.failure_reason.as_deref(), Some("runner_system_failure"));
    // Found in the list adoption reads, not by a later periodic look (which came ~10 s late).
    assert!(
        reported_after < Duration::from_secs(3),
        "reported {reported_after:?} after start:\n{}",
        second.logs()
    );
    for id in &running {
        let job = s.finished(*id, 60).await;
        assert_eq!(job.state, "success", "{}", job.trace);
        assert_eq!(job.final_updates.len(), 1, "{:?}", job.final_updates);
    }
    s.nothing_left(15).await;
    // Adoption read what was there: no create of any pod or Secret again (no 409s either).
    let creates: Vec<String> = s.kube.requests()[before..]
        .iter()
        .filter(|r| r.method == "POST" && (r.path.contains("/pods") || r.path.contains("/secrets")))
        .map(|r| format!("{} {} -> {}", r.method, r.path, r.status))
        .collect();
    assert!(creates.is_empty(), "{creates:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_whose_pod_was_deleted_while_no_coordinator_ran_is_failed_not_run_twice() {
    let s = setup().await;
    let id = s
        .gitlab
        .enqueue(job_json("preempted", &["echo started", "sleep 60"]));
    let mut first = s.kiln("", "");
    s.gitlab
        .wait_for_trace(id, "started", Duration::from_secs(60))
        .await;
    support::kiln::send_signal(first.pid(), "KILL");
    first.wait_exit(Duration::from_secs(10));
    // Someone force-deletes the pod (grace 0: its agent is killed before it can report); its
    // Secret, which owns it, stays.
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(s.kube.client("ci"), "ci");
    let force = kube::api::DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    pods.delete(&pod_name(id), &force).await.unwrap();
    s.kube
        .wait_gone(&pod_name(id), Duration::from_secs(30))
        .await;
    assert!(s.kube.snapshot().secret(&pod_name(id)).is_some());
    let second = s.kiln("", "");
    let job = s.finished(id, 30).await;
    assert_eq!(job.state, "failed", "{}", second.logs());
    assert_eq!(job.failure_reason.as_deref(), Some("runner_system_failure"));
    assert!(job.trace.contains("build pod is gone"), "{}", job.trace);
    s.nothing_left(15).await;
    assert_eq!(s.kube.creations(), vec![pod_name(id)], "never a second pod");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_that_ended_while_no_coordinator_ran_is_cleaned_up() {
    let s = setup().await;
    let id = s
        .gitlab
        .enqueue(job_json("orphan", &["echo started", "sleep 2"]));
    let mut first = s.kiln("", "");
    s.gitlab
        .wait_for_trace(id, "started", Duration::from_secs(60))
        .await;
    first.terminate(Duration::from_secs(15));
    // The build goes on without a coordinator and reports itself.
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "success", "{}", job.trace);
    assert!(
        s.kube.pod(&pod_name(id)).is_some(),
        "left for the next start"
    );
    let second = s.kiln("", "");
    s.nothing_left(20).await;
    assert_eq!(s.gitlab.job(id).final_updates.len(), 1);
    drop(second);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_queued_jobs_never_run_more_than_concurrent_pods() {
    let s = setup().await;
    let ids: Vec<u64> = (0..100)
        .map(|i| {
            s.gitlab
                .enqueue(job_json(&format!("job {i}"), &["echo job $CI_JOB_ID"]))
        })
        .collect();
    let kiln = s.kiln("concurrent = 10", "");
    for id in &ids {
        let job = s.finished(*id, 240).await;
        assert_eq!(job.state, "success", "{}\n{}", job.trace, kiln.logs());
    }
    s.nothing_left(30).await;
    assert!(
        s.kube.max_pods_at_once() <= 10,
        "{} pods at once",
        s.kube.max_pods_at_once()
    );
    let mut created = s.kube.creations();
    created.sort();
    created.dedup();
    assert_eq!(created.len(), 100, "one pod per job, none twice");
}

#[test]
fn a_missing_permission_stops_kiln_at_start_naming_it() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let s = runtime.block_on(setup());
    s.kube.deny("create", "pods");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    std::fs::write(
        &path,
        format!("{}\n[http]\nlisten = \"127.0.0.1:0\"\n", s.config("", "")),
    )
    .unwrap();
    let output = std::process::Command::new(kiln_bin())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("may not create pods"), "{stderr}");
    assert!(stderr.contains("docs/kubernetes.md"), "{stderr}");
    assert!(Path::new(&path).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_preempted_pod_is_a_runner_system_failure() {
    let s = setup().await;
    let (job, logs) = s
        .disrupted("preempted", |kube, pod| kube.preempt(pod))
        .await;
    assert_eq!(job.state, "failed", "{logs}");
    assert_eq!(job.failure_reason.as_deref(), Some("runner_system_failure"));
    // Preemption stops the pod gracefully: the agent reports the job itself.
    assert!(job.trace.contains("stopped from outside"), "{}", job.trace);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_expired_mid_build_is_relisted_and_the_build_still_finishes() {
    let s = setup().await;
    let id = s.gitlab.enqueue(job_json(
        "relist",
        &["echo started", "sleep 2", "echo done"],
    ));
    let kiln = s.kiln("", "");
    s.gitlab
        .wait_for_trace(id, "started", Duration::from_secs(60))
        .await;
    // Forget the watch history and drop every watch: kiln's watcher gets 410 Gone on resume
    // and must re-list.
    s.kube.compact();
    s.kube.end_watches();
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "success", "{}", kiln.logs());
    s.nothing_left(15).await;
    let relisted = s
        .kube
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/pods?") && !r.path.contains("watch"))
        .count();
    assert!(relisted >= 2, "the watcher listed again after 410");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_adopted_build_survives_a_config_that_would_refuse_it_now() {
    let s = setup().await;
    let mut job = job_json("adopted", &["echo part one", "sleep 3", "echo part two"]);
    job["variables"].as_array_mut().unwrap().push(
        json!({"key": "KUBERNETES_MEMORY_LIMIT", "value": "4Gi", "public": true,
            "file": false, "masked": false, "raw": false}),
    );
    let id = s.gitlab.enqueue(job);
    let mut first = s.kiln("", "max = { memory_limit = \"8Gi\" }");
    s.gitlab
        .wait_for_trace(id, "part one", Duration::from_secs(60))
        .await;
    support::kiln::send_signal(first.pid(), "KILL");
    first.wait_exit(Duration::from_secs(10));
    // The new config no longer allows the override: the running build is followed anyway.
    let second = s.kiln("", "");
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, second.logs());
    s.nothing_left(15).await;
    assert_eq!(s.kube.creations(), vec![pod_name(id)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_canceled_while_its_pod_is_pending_deletes_the_pod_at_once() {
    let s = setup().await;
    s.kube.unschedulable(PodMatch::All);
    let id = s
        .gitlab
        .enqueue(job_json("pending-cancel", &["echo never"]));
    let kiln = s.kiln("", "pending_timeout = \"1m\"");
    s.kube
        .wait_pod(&pod_name(id), Duration::from_secs(30), |_| true)
        .await;
    s.gitlab.cancel(id, false);
    // Long before the 1 minute pending timeout: kiln asks GitLab every quarter of it.
    s.kube
        .wait_gone(&pod_name(id), Duration::from_secs(25))
        .await;
    s.nothing_left(15).await;
    let job = s.gitlab.job(id);
    assert_eq!(job.state, "canceled", "{}", kiln.logs());
    assert!(job.final_updates.is_empty(), "{:?}", job.final_updates);
}

/// The build cache on Kubernetes: the build's Secret carries a capability, never the storage
/// key, and the pod spec holds neither; the build pod's agent saves through URLs the
/// coordinator signs, and the next pod restores.
#[tokio::test(flavor = "multi_thread")]
async fn a_build_pod_caches_with_a_capability_and_never_holds_the_storage_key() {
    let s = setup().await;
    let s3 = support::s3::S3Server::start();
    let kiln = s.kiln(&s3.cache_config(""), "");
    let mut save = job_json("save", &["mkdir -p deps", "echo from-pod > deps/x"]);
    save["cache"] = json!([{"key": "k8s", "paths": ["deps/"], "policy": "push"}]);
    let id = s.gitlab.enqueue(save);
    let pod = s
        .kube
        .wait_pod(&pod_name(id), Duration::from_secs(30), |_| true)
        .await;
    assert!(
        !serde_json::to_string(&pod)
            .unwrap()
            .contains(&s3.secret_key)
    );
    let secrets: String = s
        .kube
        .secrets()
        .iter()
        .flat_map(|secret| secret.data.clone().unwrap_or_default().into_values())
        .map(|value| String::from_utf8_lossy(&value.0).into_owned())
        .collect();
    assert!(secrets.contains("\"capability\""), "{secrets}");
    assert!(!secrets.contains(&s3.secret_key));
    let saved = s.finished(id, 60).await;
    assert_eq!(saved.state, "success", "{}\n{}", saved.trace, kiln.logs());
    assert!(saved.trace.contains("Created cache k8s"), "{}", saved.trace);

    let mut restore = job_json("restore", &["cat deps/x"]);
    restore["cache"] = json!([{"key": "k8s", "paths": ["deps/"], "policy": "pull"}]);
    let id = s.gitlab.enqueue(restore);
    let restored = s.finished(id, 60).await;
    assert_eq!(restored.state, "success", "{}", restored.trace);
    assert!(restored.trace.contains("from-pod\n"), "{}", restored.trace);
    assert!(!restored.trace.contains(&s3.secret_key));
}
