//! End to end: `KUBERNETES_NAMESPACE_OVERWRITE` with `[kubernetes] namespace_overwrite_allowed`,
//! as gitlab-runner's Kubernetes executor has it. A real `kiln run` against the GitLab and
//! Kubernetes test servers: the job's pod and Secret live in the namespace the job names,
//! are followed, adopted after a SIGKILL by another replica, and removed there; a namespace
//! outside the pattern fails the job before anything exists; no pattern: ignored, as before.

use std::time::Duration;

use serde_json::json;

use crate::kubernetes_gitlab_compat::creates;
use crate::kubernetes_jobs::{Setup, pod_name, setup};
use crate::support::gitlab::job_json;
use crate::support::kube::KubeServer;

/// The namespace kiln is configured with (the kubeconfig context's).
const HOME: &str = "ci";
/// The namespace the jobs ask for.
const TEAM: &str = "ci-team-a";
const ALLOWED: &str = r#"namespace_overwrite_allowed = "^ci-""#;

fn in_namespace(mut job: serde_json::Value, namespace: &str) -> serde_json::Value {
    job["variables"].as_array_mut().unwrap().push(json!({
        "key": "KUBERNETES_NAMESPACE_OVERWRITE", "value": namespace, "public": true,
        "file": false, "masked": false, "raw": false,
    }));
    job
}

/// The creates of a build start in `namespace`: its Secret, then its pod (`pods` times).
fn start_in(namespace: &str, pods: usize) -> Vec<String> {
    let mut calls = vec![format!("/api/v1/namespaces/{namespace}/secrets")];
    calls.extend(std::iter::repeat_n(
        format!("/api/v1/namespaces/{namespace}/pods"),
        pods,
    ));
    calls
}

/// Whether `kind` (`pods`, `secrets`) `name` exists in `namespace`.
fn exists(kube: &KubeServer, kind: &str, namespace: &str, name: &str) -> bool {
    kube.object(kind, namespace, name).is_some()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_runs_in_the_namespace_it_asks_for_and_is_removed_from_there() {
    let s = setup().await;
    let id = s.gitlab.enqueue(in_namespace(
        job_json("team a", &["echo ran in team a"]),
        TEAM,
    ));
    let kiln = s.kiln("", ALLOWED);
    let name = pod_name(id);
    s.kube
        .wait_for(Duration::from_secs(30), |snap| snap.pod(&name).is_some())
        .await;
    assert!(exists(&s.kube, "pods", TEAM, &name), "{}", kiln.logs());
    assert!(exists(&s.kube, "secrets", TEAM, &name));
    assert!(!exists(&s.kube, "pods", HOME, &name));
    assert!(!exists(&s.kube, "secrets", HOME, &name));
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, kiln.logs());
    assert!(job.trace.contains("ran in team a"), "{}", job.trace);
    s.nothing_left(15).await;
    let starts = creates(&s.kube);
    assert_eq!(starts, start_in(TEAM, 1), "a Secret and a pod, there");
    let deletes: Vec<String> = s
        .kube
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path)
        .collect();
    assert!(
        deletes
            .iter()
            .any(|p| p.starts_with(&format!("/api/v1/namespaces/{TEAM}/pods/{name}"))),
        "{deletes:?}"
    );
    // Followed by one watch over every namespace, by kiln's label.
    assert!(
        s.kube
            .requests()
            .iter()
            .any(|r| r.path.starts_with("/api/v1/pods?")
                && r.path.contains("watch=true")
                && r.path
                    .contains("labelSelector=kiln.dev%2Fcoordinator%3Dkiln")),
        "{:?}",
        s.kube.requests()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_outside_the_pattern_fails_the_job_before_anything_exists() {
    let s = setup().await;
    let id = s.gitlab.enqueue(in_namespace(
        job_json("elsewhere", &["echo never"]),
        "other-ns",
    ));
    let kiln = s.kiln("", ALLOWED);
    s.refused(
        id,
        &kiln,
        "KUBERNETES_NAMESPACE_OVERWRITE=`other-ns` does not match kubernetes.namespace_overwrite_allowed (`^ci-`)",
    )
    .await;
    assert!(creates(&s.kube).is_empty(), "{:?}", creates(&s.kube));
    let snapshot = s.kube.snapshot();
    assert!(snapshot.pods.is_empty() && snapshot.secrets.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_pattern_the_namespace_is_ignored_with_a_warning_and_the_job_runs_at_home() {
    let s = setup().await;
    let id = s.gitlab.enqueue(in_namespace(
        job_json("template", &["echo ran at home"]),
        TEAM,
    ));
    let kiln = s.kiln("", "");
    let name = pod_name(id);
    s.kube
        .wait_for(Duration::from_secs(30), |snap| snap.pod(&name).is_some())
        .await;
    assert!(exists(&s.kube, "pods", HOME, &name), "{}", kiln.logs());
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, kiln.logs());
    assert!(
        job.trace.contains(
            "WARNING: KUBERNETES_NAMESPACE_OVERWRITE=`ci-team-a` is ignored: this runner sets no kubernetes.namespace_overwrite_allowed"
        ),
        "{}",
        job.trace
    );
    s.nothing_left(15).await;
    assert_eq!(creates(&s.kube), start_in(HOME, 1));
    // Nothing cluster-wide: the namespaced watch and lists of the common path.
    assert!(
        s.kube
            .requests()
            .iter()
            .all(|r| !r.path.starts_with("/api/v1/pods") && !r.path.starts_with("/api/v1/secrets")),
        "{:?}",
        s.kube.requests()
    );
}

/// Replicas that notice a dead one quickly.
fn replica(name: &str) -> String {
    format!("{ALLOWED}\nreplica = \"{name}\"\nlease_duration = \"3s\"\nlease_renew = \"1s\"")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_mid_job_is_succeeded_by_one_that_adopts_the_build_in_its_namespace() {
    let s: Setup = setup().await;
    let id = s.gitlab.enqueue(in_namespace(
        job_json("adopted", &["echo started", "sleep 4", "echo finished"]),
        TEAM,
    ));
    let name = pod_name(id);
    let mut first = s.kiln("", &replica("first"));
    s.gitlab
        .wait_for_trace(id, "started", Duration::from_secs(60))
        .await;
    assert!(exists(&s.kube, "pods", TEAM, &name), "{}", first.logs());
    crate::support::kiln::send_signal(first.pid(), "KILL");
    first.wait_exit(Duration::from_secs(10));
    let second = s.kiln("", &replica("second"));
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, second.logs());
    assert!(job.trace.contains("finished"), "{}", job.trace);
    assert_eq!(job.final_updates.len(), 1, "{:?}", job.final_updates);
    s.nothing_left(20).await;
    assert_eq!(s.kube.creations(), vec![name.clone()], "never a second pod");
    let claimed = s.kube.requests().into_iter().any(|r| {
        r.method == "PATCH"
            && r.path
                .starts_with(&format!("/api/v1/namespaces/{TEAM}/secrets/{name}"))
    });
    assert!(claimed, "the second replica claimed the build where it is");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_of_no_configured_runner_in_another_namespace_is_removed() {
    let s = setup().await;
    let name = "kiln-gl-990001";
    let labels = json!({
        "app.kubernetes.io/managed-by": "kiln",
        "kiln.dev/coordinator": "kiln",
        "kiln.dev/source": "gitlab",
        "kiln.dev/job-id": "990001",
        "kiln.dev/runner": "gone",
    });
    s.kube.insert(
        TEAM,
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": { "name": name, "labels": labels },
            "data": {},
        }),
    );
    s.kube.insert(
        TEAM,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "labels": labels },
            "spec": { "restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
                      "containers": [{ "name": "build", "image": "busybox:1.36",
                                       "command": ["sh", "-c", "sleep 60"] }] },
        }),
    );
    let kiln = s.kiln("", ALLOWED);
    s.kube
        .wait_for(Duration::from_secs(30), |snap| {
            snap.pods.is_empty() && snap.secrets.is_empty()
        })
        .await;
    assert!(
        kiln.logs().contains("no longer configured"),
        "{}",
        kiln.logs()
    );
}

/// `kiln run` with `kubernetes` as its `[kubernetes]` extras, until it exits: its stderr.
fn start_until_exit(s: &Setup, kubernetes: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    std::fs::write(
        &path,
        format!(
            "{}\n[http]\nlisten = \"127.0.0.1:0\"\n",
            s.config("", kubernetes)
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(crate::support::kiln::kiln_bin())
        .args(["run", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Started: it runs on; refused: it exits at once.
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            return (status.success(), stderr);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    (true, "still running".to_owned())
}

#[test]
fn with_only_the_namespaced_role_kiln_starts_but_refuses_the_overwrite_naming_the_cluster_verbs() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let s = runtime.block_on(setup());
    s.kube.grant_only_in(HOME);
    // The common path needs nothing beyond its namespace.
    let (started, output) = start_until_exit(&s, "");
    assert_eq!(output, "still running", "{output}");
    assert!(started);
    let (ok, stderr) = start_until_exit(&s, ALLOWED);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains(
            "may not create pods, get pods, list pods, watch pods, patch pods, delete pods, create secrets, get secrets, list secrets, patch secrets, delete secrets, list events cluster-wide (in every namespace), which kubernetes.namespace_overwrite_allowed needs; grant the ClusterRole in docs/kubernetes.md"
        ),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_stuck_pending_in_its_namespace_is_explained_by_the_events_there() {
    let s = setup().await;
    s.kube.unschedulable(crate::support::kube::PodMatch::All);
    let id = s
        .gitlab
        .enqueue(in_namespace(job_json("pending", &["echo never"]), TEAM));
    let kiln = s.kiln("", ALLOWED);
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "failed", "{}", kiln.logs());
    assert_eq!(job.failure_reason.as_deref(), Some("runner_system_failure"));
    assert!(
        job.trace.contains("events: FailedScheduling:"),
        "{}",
        job.trace
    );
    assert!(
        s.kube.requests().iter().any(|r| r.method == "GET"
            && r.path
                .starts_with(&format!("/api/v1/namespaces/{TEAM}/events?"))),
        "the events were read where the pod is"
    );
    s.nothing_left(15).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_next_pull_policy_remakes_the_pod_in_its_namespace() {
    use crate::kubernetes_gitlab_compat::{
        image_in_a_registry_that_is_down, job_with_pull_policies,
    };
    let s = setup().await;
    let image = image_in_a_registry_that_is_down(&s, "team:1", true);
    let id = s.gitlab.enqueue(in_namespace(
        job_with_pull_policies(
            "policies",
            "echo ran from the node",
            &image,
            &["always", "if-not-present"],
        ),
        TEAM,
    ));
    let kiln = s.kiln("", ALLOWED);
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, kiln.logs());
    assert!(
        job.trace.contains("pull policy \"if-not-present\""),
        "{}",
        job.trace
    );
    s.nothing_left(15).await;
    assert_eq!(
        creates(&s.kube),
        start_in(TEAM, 2),
        "the pod made again where it was"
    );
}
