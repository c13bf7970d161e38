//! End to end: GitLab jobs on Kubernetes as gitlab-runner's Kubernetes executor runs them —
//! private images pulled with the job's registry login, services with the job's variables and
//! the builds volume, configured volumes, an appending `pod_patch`, overwrites without a cap,
//! refused images. A real `kiln run` against the GitLab and Kubernetes test servers, whose
//! kubelet runs the containers as local processes, mounts ConfigMaps and claims, and pulls from
//! a registry that wants a login only with a matching pull Secret.

use std::time::Duration;

use serde_json::json;

use crate::kubernetes_jobs::{Setup, pod_name, setup, with_image};
use crate::support::gitlab::job_json;

const REGISTRY: &str = "registry.example.com:5005";

fn variable(key: &str, value: &str, public: bool) -> serde_json::Value {
    json!({"key": key, "value": value, "public": public, "file": false,
        "masked": !public, "raw": false})
}

/// The API calls that created a pod or a Secret, by resource path (without the query).
pub(crate) fn creates(kube: &crate::support::kube::KubeServer) -> Vec<String> {
    kube.requests()
        .into_iter()
        .filter(|r| r.method == "POST" && (r.path.contains("/pods") || r.path.contains("/secrets")))
        .map(|r| r.path.split('?').next().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_image_is_pulled_with_the_jobs_registry_login_which_goes_with_the_build() {
    let s = setup().await;
    let image = format!("{REGISTRY}/kiln/demo/builder:1");
    let mut job = with_image(job_json("private", &["echo pulled"]), &image);
    job["credentials"] = json!([{"type": "registry", "url": REGISTRY,
        "username": "gitlab-ci-token", "password": ""}]);
    let id = s.gitlab.enqueue(job);
    let token = s.gitlab.job(id).token;
    s.kube.require_login(REGISTRY, "gitlab-ci-token", &token);
    // The same image without GitLab's login: the registry refuses it.
    let anonymous = s
        .gitlab
        .enqueue(with_image(job_json("anonymous", &["echo never"]), &image));
    let kiln = s.kiln("", "");
    let name = pod_name(id);
    let seen = s
        .kube
        .wait_for(Duration::from_secs(30), |snap| {
            snap.pod(&name).is_some() && snap.secret(&name).is_some()
        })
        .await;
    let secret = seen.secret(&name).unwrap();
    assert_eq!(
        secret.type_.as_deref(),
        Some("kubernetes.io/dockerconfigjson")
    );
    let pod = seen.pod(&name).unwrap();
    let pulls: Vec<&str> = pod
        .spec
        .as_ref()
        .unwrap()
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(pulls, [name.as_str()]);
    assert!(
        !serde_json::to_string(pod).unwrap().contains(&token),
        "the login is in the Secret, not the pod"
    );

    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, kiln.logs());
    let refused = s.finished(anonymous, 60).await;
    assert_eq!(refused.state, "failed", "{}", kiln.logs());
    assert_eq!(
        refused.failure_reason.as_deref(),
        Some("image_pull_failure")
    );
    s.nothing_left(15).await;
    let starts = creates(&s.kube);
    assert_eq!(
        starts.len(),
        4,
        "two calls per build start, the login riding in the build's Secret: {starts:?}"
    );
    assert!(!kiln.logs().contains(&token), "no token in kiln's log");
}

#[tokio::test(flavor = "multi_thread")]
async fn gitlabs_postgres_recipe_variables_and_the_builds_volume_reach_the_service() {
    let s = setup().await;
    // GitLab's PostgreSQL recipe: the database's settings are job variables. The service
    // writes what it got onto the builds volume, where the job reads it.
    let mut job = job_json(
        "postgres",
        &[
            "for i in $(seq 1 50); do test -s \"$CI_BUILDS_DIR/pg-env\" && break; sleep 0.2; done",
            "cat \"$CI_BUILDS_DIR/pg-env\"",
        ],
    );
    let variables = job["variables"].as_array_mut().unwrap();
    variables.push(variable("POSTGRES_DB", "app_test", true));
    variables.push(variable("POSTGRES_USER", "runner", true));
    variables.push(variable("POSTGRES_PASSWORD", "pg-pass", true));
    variables.push(variable("POSTGRES_HOST_AUTH_METHOD", "trust", true));
    variables.push(variable("DEPLOY_KEY", "project-secret", false));
    job["services"] = json!([{"name": "postgres:16", "alias": "db,postgres-db",
        "entrypoint": ["sh", "-c"],
        "command": ["echo \"db=$POSTGRES_DB user=$POSTGRES_USER password=$POSTGRES_PASSWORD url=$DATABASE_URL key=$DEPLOY_KEY\" > /builds/pg-env; sleep 60"],
        "ports": [], "pull_policy": [],
        "variables": [{"key": "DATABASE_URL", "value": "postgres://$POSTGRES_USER@db/$POSTGRES_DB"}]}]);
    let id = s.gitlab.enqueue(job);
    let kiln = s.kiln("", "");
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, kiln.logs());
    assert!(
        job.trace.contains(
            "db=app_test user=runner password=pg-pass url=postgres://runner@db/app_test key=\n"
        ),
        "public job variables and the service's own, expanded; never the project's secrets:\n{}",
        job.trace
    );
    s.nothing_left(15).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configured_claim_and_config_map_are_mounted_in_build_and_service_containers() {
    let s = setup().await;
    s.kube.insert(
        "ci",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "ca-bundle"}, "data": {"ca.crt": "TEST CA"}}),
    );
    s.kube.insert(
        "ci",
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "cache"},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}),
    );
    // The test kubelet keeps a pod's volumes side by side, so the job reaches them from the
    // builds volume; the service's command names the mount paths, which the kubelet maps
    // through that container's own mounts.
    let mut job = job_json(
        "volumes",
        &[
            "cat \"$CI_BUILDS_DIR/../ca-bundle/ca.crt\" > \"$CI_BUILDS_DIR/../cache/from-build\"",
            "for i in $(seq 1 50); do test -s \"$CI_BUILDS_DIR/../cache/from-service\" && break; sleep 0.2; done",
            "cat \"$CI_BUILDS_DIR/../cache/from-service\"",
        ],
    );
    job["services"] = json!([{"name": "redis:7", "alias": "cache",
        "entrypoint": ["sh", "-c"],
        "command": ["cat /etc/ssl/custom/ca.crt > /cache/from-service; sleep 60"],
        "ports": [], "pull_policy": [], "variables": []}]);
    let id = s.gitlab.enqueue(job);
    let kiln = s.kiln(
        "",
        r#"[[kubernetes.volumes.pvc]]
name = "cache"
mount_path = "/cache"
[[kubernetes.volumes.config_map]]
name = "ca-bundle"
mount_path = "/etc/ssl/custom"
read_only = true
"#,
    );
    let pod = s
        .kube
        .wait_pod(&pod_name(id), Duration::from_secs(30), |_| true)
        .await;
    for container in &pod.spec.as_ref().unwrap().containers {
        let mounts: Vec<(&str, &str)> = container
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert!(
            mounts.contains(&("cache", "/cache")),
            "{}: {mounts:?}",
            container.name
        );
        assert!(
            mounts.contains(&("ca-bundle", "/etc/ssl/custom")),
            "{}: {mounts:?}",
            container.name
        );
    }
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, kiln.logs());
    assert!(job.trace.contains("TEST CA"), "{}", job.trace);
    let claim = s.kube.claim_dir("ci", "cache");
    assert_eq!(
        std::fs::read_to_string(claim.join("from-build")).unwrap(),
        "TEST CA"
    );
    assert_eq!(
        std::fs::read_to_string(claim.join("from-service")).unwrap(),
        "TEST CA"
    );
    s.nothing_left(15).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_strategic_pod_patch_adding_a_volume_keeps_kilns_volumes() {
    let s = setup().await;
    let id = s
        .gitlab
        .enqueue(job_json("patched", &["echo patched pod runs"]));
    let kiln = s.kiln(
        "",
        r#"pod_patch_type = "strategic"
pod_patch = '{"spec": {"volumes": [{"name": "extra", "emptyDir": {}}], "containers": [{"name": "build", "volumeMounts": [{"name": "extra", "mountPath": "/extra"}]}]}}'
"#,
    );
    let pod = s
        .kube
        .wait_pod(&pod_name(id), Duration::from_secs(30), |_| true)
        .await;
    let spec = pod.spec.as_ref().unwrap();
    let volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(volumes, ["kiln-bin", "builds", "job", "extra"]);
    let build = spec.containers.iter().find(|c| c.name == "build").unwrap();
    let mounts: Vec<&str> = build
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(mounts, ["/kiln/bin", "/builds", "/kiln/job", "/extra"]);
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, kiln.logs());
    assert!(job.trace.contains("patched pod runs"), "{}", job.trace);
    s.nothing_left(15).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_overwrite_without_a_cap_is_ignored_with_a_warning_and_the_job_runs() {
    let s = setup().await;
    let mut job = job_json("template", &["echo ran anyway"]);
    job["variables"].as_array_mut().unwrap().push(variable(
        "KUBERNETES_MEMORY_LIMIT",
        "64Gi",
        true,
    ));
    let id = s.gitlab.enqueue(job);
    let kiln = s.kiln("", "");
    let pod = s
        .kube
        .wait_pod(&pod_name(id), Duration::from_secs(30), |_| true)
        .await;
    let build = pod
        .spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .find(|c| c.name == "build")
        .unwrap();
    let limits = build.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["memory"].0, "2Gi", "the configured size stays");
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, kiln.logs());
    assert!(
        job.trace.contains(
            "WARNING: KUBERNETES_MEMORY_LIMIT=64Gi is ignored: this runner sets no kubernetes.max.memory_limit"
        ),
        "{}",
        job.trace
    );
    assert!(job.trace.contains("ran anyway"), "{}", job.trace);
    s.nothing_left(15).await;
    let starts = creates(&s.kube);
    assert_eq!(starts.len(), 2, "a Secret and a pod: {starts:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_image_is_not_allowed_fails_before_any_pod_exists() {
    let s = setup().await;
    let id = s.gitlab.enqueue(with_image(
        job_json("miner", &["echo never"]),
        "evil.example/miner:latest",
    ));
    let kiln = s.kiln(
        "",
        r#"allowed_images = ["alpine:*", "registry.example.com:5005/**"]"#,
    );
    s.refused(
        id,
        &kiln,
        "the job's image `evil.example/miner:latest` is not allowed on this runner (kubernetes.allowed_images: alpine:*, registry.example.com:5005/**)",
    )
    .await;
    assert!(s.kube.creations().is_empty());
    assert!(creates(&s.kube).iter().all(|p| !p.contains("/pods")));
}

/// A registry that is down: every pull fails, as a pull's connection would.
const REGISTRY_DOWN: &str = "failed to pull and unpack image: failed to do request: dial tcp 10.0.0.5:5005: connect: connection refused";

/// The image `{REGISTRY}/kiln/demo/{path}` in a registry that is down, on the node already
/// when `on_node` (pulled by an earlier job).
pub(crate) fn image_in_a_registry_that_is_down(s: &Setup, path: &str, on_node: bool) -> String {
    let image = format!("{REGISTRY}/kiln/demo/{path}");
    s.kube.script_image(
        &image,
        crate::support::kube::ImageScript::PullFails {
            message: Some(REGISTRY_DOWN.into()),
        },
    );
    if on_node {
        s.kube.seed_node_image(&image);
    }
    image
}

/// A job running `script` in `image`, asking for `policies` in order.
pub(crate) fn job_with_pull_policies(
    name: &str,
    script: &str,
    image: &str,
    policies: &[&str],
) -> serde_json::Value {
    let mut job = with_image(job_json(name, &[script]), image);
    job["image"]["pull_policy"] = json!(policies);
    job
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_policies_are_tried_in_order_so_a_job_runs_from_the_nodes_image_when_the_registry_is_down()
 {
    let s = setup().await;
    let image = image_in_a_registry_that_is_down(&s, "builder:1", true);
    let job = job_with_pull_policies(
        "cached",
        "echo ran from the cached image",
        &image,
        &["always", "if-not-present"],
    );
    let id = s.gitlab.enqueue(job);
    let kiln = s.kiln("", "");
    let job = s.finished(id, 90).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, kiln.logs());
    assert!(
        job.trace.contains("ran from the cached image"),
        "{}",
        job.trace
    );
    assert!(
        job.trace.contains("with policy \"always\"")
            && job.trace.contains("pull policy \"if-not-present\"")
            && job.trace.contains("connection refused"),
        "the trace says which policy failed and which one is next: {}",
        job.trace
    );
    assert!(kiln.logs().contains("next pull policy"), "{}", kiln.logs());
    let name = pod_name(id);
    let pods = "/api/v1/namespaces/ci/pods".to_owned();
    let secrets = "/api/v1/namespaces/ci/secrets".to_owned();
    let made = creates(&s.kube);
    assert_eq!(
        made.iter()
            .filter(|p| p.split('?').next() == Some(pods.as_str()))
            .count(),
        2,
        "the pod is made again once: {made:?}"
    );
    assert_eq!(
        made.iter()
            .filter(|p| p.split('?').next() == Some(secrets.as_str()))
            .count(),
        1,
        "the build's Secret is kept: {made:?}"
    );
    s.nothing_left(15).await;
    assert!(s.kube.pod(&name).is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_pull_policies_all_fail_is_an_image_pull_failure_after_the_last() {
    let s = setup().await;
    // Not on the node: `if-not-present` has to pull too, and the registry is down.
    let image = image_in_a_registry_that_is_down(&s, "uncached:1", false);
    let job = job_with_pull_policies(
        "uncached",
        "echo never",
        &image,
        &["always", "if-not-present", "never"],
    );
    let id = s.gitlab.enqueue(job);
    // `never` is not allowed: only the first two are tried.
    let kiln = s.kiln(
        "",
        r#"allowed_pull_policies = ["always", "if-not-present"]"#,
    );
    let job = s.finished(id, 90).await;
    assert_eq!(job.state, "failed", "{}", kiln.logs());
    assert_eq!(job.failure_reason.as_deref(), Some("image_pull_failure"));
    assert!(job.trace.contains(&image), "{}", job.trace);
    assert!(
        job.trace
            .contains("with pull policy \"if-not-present\", the last the job listed"),
        "the reason says the last policy failed too: {}",
        job.trace
    );
    let pods = "/api/v1/namespaces/ci/pods".to_owned();
    let made = creates(&s.kube);
    assert_eq!(
        made.iter()
            .filter(|p| p.split('?').next() == Some(pods.as_str()))
            .count(),
        2,
        "one pod per allowed policy: {made:?}"
    );
    s.nothing_left(15).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_adopting_a_failed_pull_goes_on_with_the_next_pull_policy() {
    let s = setup().await;
    let image = image_in_a_registry_that_is_down(&s, "adopted:1", true);
    s.kube.hold(crate::support::kube::PodMatch::All);
    let job = job_with_pull_policies(
        "adopted",
        "echo ran after adoption",
        &image,
        &["always", "if-not-present"],
    );
    let id = s.gitlab.enqueue(job);
    let name = pod_name(id);
    let mut first = s.kiln("", "");
    s.kube
        .wait_for(Duration::from_secs(30), |snap| snap.pod(&name).is_some())
        .await;
    crate::support::kiln::send_signal(first.pid(), "KILL");
    first.wait_exit(Duration::from_secs(10));
    // With no coordinator, the pull with `always` fails.
    s.kube.release_hold();
    s.kube
        .wait_for(Duration::from_secs(30), |snap| {
            snap.pod(&name)
                .and_then(|p| p.status.as_ref())
                .and_then(|st| st.container_statuses.as_ref())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.state
                            .as_ref()
                            .and_then(|st| st.waiting.as_ref())
                            .and_then(|w| w.reason.as_deref())
                            .is_some_and(|r| r == "ErrImagePull" || r == "ImagePullBackOff")
                    })
                })
        })
        .await;
    let second = s.kiln("", "");
    let job = s.finished(id, 60).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, second.logs());
    assert!(job.trace.contains("ran after adoption"), "{}", job.trace);
    assert!(
        job.trace.contains("pull policy \"if-not-present\""),
        "{}",
        job.trace
    );
    assert_eq!(job.final_updates.len(), 1, "{:?}", job.final_updates);
    s.nothing_left(15).await;
    assert_eq!(
        s.kube.creations(),
        vec![name.clone(), name],
        "the pod, and once again with the next policy"
    );
}
