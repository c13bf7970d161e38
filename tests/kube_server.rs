//! Self-tests of the Kubernetes API test server (`support::kube`) through the real `kube::Client` and watcher.

// Checked by hand with kubectl v1.32.4 against a server kept running by a scratch test
// (kubeconfig written by `KubeServer::kubeconfig(path, "ci")`):
//   kubectl --kubeconfig k version                                   (v1.34.0-kiln-test; skew warning)
//   kubectl --kubeconfig k --validate=false create -f pod.yaml       (pod/sleeper created, runs)
//   kubectl --kubeconfig k --validate=false create -f secret.yaml    (stringData → data)
//   kubectl --kubeconfig k create -f secret.yaml   → "failed to download openapi" (no openapi;
//                                                    hence --validate=false)
//   kubectl --kubeconfig k get pods -l app=demo / -o wide / get secrets / get events
//                                                    (server-side Table printing)
//   kubectl --kubeconfig k get pods -w               (Running → Terminating → gone)
//   kubectl --kubeconfig k patch pod sleeper --type=merge -p '{"metadata":{"labels":{"x":"1"}}}'
//   kubectl --kubeconfig k patch pod sleeper -p '{"spec":{"containers":[{"name":"main","image":"busybox:1.37"}]}}'
//                                                    (strategic: merged by name, generation 2)
//   kubectl --kubeconfig k logs sleeper
//   kubectl --kubeconfig k delete pod sleeper        (SIGTERM, waits until the pod is gone)
//   kubectl --kubeconfig k get pods -A -l kiln.dev/coordinator=kiln  (NAMESPACE column, pods of
//                                                    two namespaces; /api/v1/pods?labelSelector=…)
//   kubectl --kubeconfig k get pods -A -w            (cluster-scoped watch: Running → Completed in
//                                                    both namespaces; kubectl v1.32.4)
//   kubectl --kubeconfig k auth can-i create pods    → 415: kubectl posts protobuf, which this
//                                                    server does not decode (kube-rs sends JSON)
// kubectl is not needed by these tests.

use crate::support;

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use support::kube::{ImageScript, KubeServer, PodMatch};

const WAIT: Duration = Duration::from_secs(10);

fn pod(name: &str, labels: serde_json::Value, spec: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "labels": labels },
        "spec": spec,
    }))
    .unwrap()
}

fn sh(name: &str, script: &str) -> serde_json::Value {
    json!({ "name": name, "image": "busybox:1.36", "command": ["sh", "-c", script] })
}

fn never(containers: serde_json::Value) -> serde_json::Value {
    json!({ "restartPolicy": "Never", "terminationGracePeriodSeconds": 2, "containers": containers })
}

fn api_error(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(status) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn state_of(pod: &Pod, container: &str) -> serde_json::Value {
    let status = pod.status.as_ref().unwrap();
    let all = status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten());
    let s = all.into_iter().find(|s| s.name == container).unwrap();
    serde_json::to_value(s.state.as_ref().unwrap()).unwrap()
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn condition<'a>(pod: &'a Pod, kind: &str) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
}

#[tokio::test]
async fn crud_through_kubeconfig_client() {
    let server = KubeServer::start().await;
    server.set_kubelet(false);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.kubeconfig(&path, "ci");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "ci");
    let client = kube::Client::try_from(config).unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client);

    let spec = never(json!([sh("main", "true")]));
    let a = pods
        .create(
            &PostParams::default(),
            &pod("job-a", json!({"app": "kiln", "job": "1"}), spec.clone()),
        )
        .await
        .unwrap();
    let uid = a.metadata.uid.clone().unwrap();
    assert_eq!(uid.len(), 36);
    assert_eq!(a.metadata.generation, Some(1));
    assert!(a.metadata.creation_timestamp.is_some());
    pods.create(
        &PostParams::default(),
        &pod("job-b", json!({"app": "kiln", "job": "2"}), spec.clone()),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("other", json!({"app": "web"}), spec.clone()),
    )
    .await
    .unwrap();
    let mut generated = pod("", json!({"app": "kiln"}), spec.clone());
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("kiln-job-".into());
    let generated = pods
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    let generated_name = generated.metadata.name.unwrap();
    assert!(generated_name.starts_with("kiln-job-") && generated_name.len() == 14);

    assert_eq!(pods.get("job-a").await.unwrap().metadata.uid.unwrap(), uid);
    let names = |list: kube::core::ObjectList<Pod>| {
        list.items
            .into_iter()
            .map(|p| p.metadata.name.unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            pods.list(&ListParams::default().labels("app=kiln,job"))
                .await
                .unwrap()
        ),
        ["job-a", "job-b"]
    );
    assert_eq!(
        names(
            pods.list(&ListParams::default().labels("app in (web, db)"))
                .await
                .unwrap()
        ),
        ["other"]
    );
    assert_eq!(
        names(
            pods.list(&ListParams::default().labels("app!=kiln"))
                .await
                .unwrap()
        ),
        ["other"]
    );
    assert_eq!(
        names(
            pods.list(&ListParams::default().labels("app=kiln,!job"))
                .await
                .unwrap()
        ),
        std::slice::from_ref(&generated_name)
    );
    assert_eq!(
        names(
            pods.list(&ListParams::default().fields("metadata.name=job-b"))
                .await
                .unwrap()
        ),
        ["job-b"]
    );
    let page = pods.list(&ListParams::default().limit(3)).await.unwrap();
    assert_eq!(page.items.len(), 3);
    let rest = pods
        .list(
            &ListParams::default()
                .limit(3)
                .continue_token(page.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert!(rest.metadata.continue_.is_none());

    // Name taken → 409 AlreadyExists.
    let e = api_error(
        pods.create(
            &PostParams::default(),
            &pod("job-a", json!({}), spec.clone()),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(e.message, "pods \"job-a\" already exists");

    // Not a DNS-1123 subdomain, and a pod without containers → 422 Invalid with causes.
    let e = api_error(
        pods.create(
            &PostParams::default(),
            &pod("Job_A", json!({}), spec.clone()),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(e.message.starts_with("Pod \"Job_A\" is invalid: metadata.name: Invalid value: \"Job_A\": a lowercase RFC 1123 subdomain"), "{}", e.message);
    let causes = e.details.unwrap().causes;
    assert_eq!(causes[0].field, "metadata.name");
    let e = api_error(
        pods.create(
            &PostParams::default(),
            &pod(
                "empty",
                json!({"bad": "a b"}),
                json!({"containers": [], "restartPolicy": "Never"}),
            ),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    let fields: Vec<String> = e
        .details
        .unwrap()
        .causes
        .into_iter()
        .map(|c| c.field)
        .collect();
    assert_eq!(fields, ["metadata.labels", "spec.containers"]);
    let e = api_error(
        pods.create(
            &PostParams::default(),
            &pod(
                "dup",
                json!({}),
                never(json!([sh("main", "true"), sh("main", "true"), {"name": "x"}])),
            ),
        )
        .await
        .unwrap_err(),
    );
    let fields: Vec<String> = e
        .details
        .unwrap()
        .causes
        .into_iter()
        .map(|c| c.field)
        .collect();
    assert_eq!(
        fields,
        ["spec.containers[1].name", "spec.containers[2].image"]
    );

    // Optimistic concurrency on PUT, merge and strategic patches.
    let mut stale = pods.get("job-a").await.unwrap();
    pods.patch(
        "job-a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"step": "2"}}})),
    )
    .await
    .unwrap();
    stale
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("x".into(), "y".into());
    let e = api_error(
        pods.replace("job-a", &PostParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    let patched = pods
        .patch(
            "job-a",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"spec": {"containers": [{"name": "main", "image": "busybox:1.37"}]}}),
            ),
        )
        .await
        .unwrap();
    let c = &patched.spec.as_ref().unwrap().containers[0];
    assert_eq!(c.image.as_deref(), Some("busybox:1.37"));
    assert!(
        c.command.is_some(),
        "strategic patch merged the container by name"
    );
    assert_eq!(patched.metadata.generation, Some(2));
    assert_eq!(patched.metadata.labels.unwrap()["step"], "2");
    let patched = pods
        .patch_status(
            "job-a",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Running"}, "metadata": {"labels": {"ignored": "1"}}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(phase(&patched), "Running");
    assert!(!patched.metadata.labels.unwrap().contains_key("ignored"));

    // Delete: preconditions, unscheduled pods go at once, then 404.
    let e = api_error(
        pods.delete(
            "job-a",
            &DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    uid: Some("nope".into()),
                    resource_version: None,
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 409);
    pods.delete("job-a", &DeleteParams::default())
        .await
        .unwrap();
    let e = api_error(pods.get("job-a").await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"));
    assert_eq!(
        server.creations(),
        ["job-a", "job-b", "other", generated_name.as_str()]
    );
    assert_eq!(server.max_pods_at_once(), 4);
    let requests = server.requests();
    assert!(requests.iter().any(|r| r.method == "DELETE"
        && r.path.starts_with("/api/v1/namespaces/ci/pods/job-a")
        && r.status == 200));
    assert!(
        requests.iter().all(|r| r.path.starts_with("/api")),
        "{requests:?}"
    );
}

#[tokio::test]
async fn watch_replays_from_resource_version_and_expires() {
    let server = KubeServer::start().await;
    server.set_kubelet(false);
    let pods: Api<Pod> = Api::namespaced(server.client("ci"), "ci");
    let spec = never(json!([sh("main", "true")]));
    pods.create(
        &PostParams::default(),
        &pod("before", json!({"app": "kiln"}), spec.clone()),
    )
    .await
    .unwrap();
    let rv = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("after", json!({"app": "kiln"}), spec.clone()),
    )
    .await
    .unwrap();
    pods.patch(
        "after",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "gone"}}})),
    )
    .await
    .unwrap();
    pods.delete("before", &DeleteParams::default())
        .await
        .unwrap();

    let stream = pods
        .watch(&WatchParams::default().labels("app=kiln").timeout(2), &rv)
        .await
        .unwrap();
    let events: Vec<String> = stream
        .take(3)
        .map(|e| event_name(e.unwrap()))
        .collect()
        .await;
    // The relabelled pod left the selector: a DELETED for this watcher.
    assert_eq!(events, ["ADDED after", "DELETED after", "DELETED before"]);

    server.compact();
    let mut stream = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match stream.next().await.unwrap().unwrap() {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn runtime_watcher_relists_after_410() {
    let server = KubeServer::start().await;
    server.set_kubelet(false);
    let pods: Api<Pod> = Api::namespaced(server.client("ci"), "ci");
    let spec = never(json!([sh("main", "true")]));
    let mut seen = watcher(pods.clone(), watcher::Config::default().labels("app=kiln"))
        .default_backoff()
        .applied_objects()
        .map_ok(|p: Pod| p.metadata.name.unwrap())
        .boxed();
    pods.create(
        &PostParams::default(),
        &pod("first", json!({"app": "kiln"}), spec.clone()),
    )
    .await
    .unwrap();
    assert_eq!(seen.try_next().await.unwrap().unwrap(), "first");
    // Writes the watcher does not see move the server on; then history is compacted and
    // the stream ends, so the watcher resumes from a resourceVersion that is gone.
    for i in 0..3 {
        pods.create(
            &PostParams::default(),
            &pod(&format!("noise-{i}"), json!({"app": "web"}), spec.clone()),
        )
        .await
        .unwrap();
    }
    server.compact();
    server.end_watches();
    pods.create(
        &PostParams::default(),
        &pod("second", json!({"app": "kiln"}), spec.clone()),
    )
    .await
    .unwrap();
    let next = tokio::time::timeout(WAIT, async {
        loop {
            match seen.next().await {
                Some(Ok(name)) if name == "second" => return name,
                Some(_) => {}
                None => panic!("watcher ended"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(next, "second");
    let lists = server
        .requests()
        .iter()
        .filter(|r| {
            r.method == "GET"
                && !r.path.contains("watch=")
                && r.path.starts_with("/api/v1/namespaces/ci/pods?")
        })
        .count();
    assert_eq!(
        lists,
        2,
        "the watcher re-listed once: {:?}",
        server.requests()
    );
}

#[tokio::test]
async fn owned_secrets_are_collected() {
    let server = KubeServer::start().await;
    let client = server.client("ci");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ci");
    let secrets: Api<Secret> = Api::namespaced(client, "ci");
    let p = pods
        .create(
            &PostParams::default(),
            &pod("job", json!({}), never(json!([sh("main", "sleep 30")]))),
        )
        .await
        .unwrap();
    let owner = json!([{ "apiVersion": "v1", "kind": "Pod", "name": "job", "uid": p.metadata.uid, "controller": true }]);
    let s: Secret = serde_json::from_value(json!({
        "metadata": { "name": "job-env", "ownerReferences": owner },
        "stringData": { "TOKEN": "abc" },
    }))
    .unwrap();
    let created = secrets.create(&PostParams::default(), &s).await.unwrap();
    assert!(created.string_data.is_none());
    assert_eq!(created.data.unwrap()["TOKEN"].0, b"abc");
    assert_eq!(created.type_.as_deref(), Some("Opaque"));
    // A dependent of an owner that does not exist is collected right away.
    let orphan: Secret = serde_json::from_value(json!({
        "metadata": { "name": "orphan", "ownerReferences": [{ "apiVersion": "v1", "kind": "Pod", "name": "x", "uid": "0d1e5e4c-0000-4000-a000-000000000000" }] },
        "data": { "A": "Yg==" },
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &orphan)
        .await
        .unwrap();
    server
        .wait_for(WAIT, |s| s.secret("orphan").is_none())
        .await;

    server
        .wait_pod("job", WAIT, |p| phase(p) == "Running")
        .await;
    assert!(server.process_alive("job", "main"));
    let deleted = pods.delete("job", &DeleteParams::default()).await.unwrap();
    let deleted = deleted.left().unwrap();
    assert!(deleted.metadata.deletion_timestamp.is_some());
    assert_eq!(deleted.metadata.deletion_grace_period_seconds, Some(2));
    server.wait_gone("job", WAIT).await;
    assert!(!server.process_alive("job", "main"));
    server.wait_for(WAIT, |s| s.secrets.is_empty()).await;
    let events = server
        .snapshot()
        .events_for("job")
        .iter()
        .map(|e| e.reason.clone().unwrap())
        .collect::<Vec<_>>();
    assert!(events.contains(&"Killing".to_owned()), "{events:?}");
}

#[tokio::test]
async fn kubelet_runs_containers_with_mapped_volumes() {
    let server = KubeServer::start().await;
    let pods: Api<Pod> = Api::namespaced(server.client("ci"), "ci");
    server.insert(
        "ci",
        json!({
            "kind": "Secret", "metadata": { "name": "job-files" },
            "data": { "script": "ZWNobyBmcm9tLXNlY3JldA==", "token": "czNjcjN0" },
        }),
    );
    let spec = json!({
        "restartPolicy": "Never",
        "volumes": [
            { "name": "data", "emptyDir": {} },
            { "name": "files", "secret": { "secretName": "job-files", "defaultMode": 0o500, "items": [{ "key": "script", "path": "run.sh" }] } },
        ],
        "initContainers": [{
            "name": "prepare", "image": "busybox", "command": ["sh", "-c", "echo init > /data/init; echo started"],
            "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
        }],
        "containers": [{
            "name": "main", "image": "busybox:1.36",
            "command": ["sh", "-c"],
            "args": ["sh /files/run.sh; echo \"$TOKEN $POD $HOME_SET\"; cat /data/init; echo hi > /data/out; echo 'it broke' > /dev/termination-log; exit 3"],
            "env": [
                { "name": "TOKEN", "valueFrom": { "secretKeyRef": { "name": "job-files", "key": "token" } } },
                { "name": "POD", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                { "name": "HOME_SET", "value": "$(POD)-x" },
            ],
            "volumeMounts": [{ "name": "data", "mountPath": "/data" }, { "name": "files", "mountPath": "/files" }],
        }],
    });
    pods.create(&PostParams::default(), &pod("runner", json!({}), spec))
        .await
        .unwrap();
    let p = server
        .wait_pod("runner", WAIT, |p| phase(p) == "Failed")
        .await;
    let main = state_of(&p, "main");
    assert_eq!(main["terminated"]["exitCode"], 3);
    assert_eq!(main["terminated"]["reason"], "Error");
    assert_eq!(main["terminated"]["message"], "it broke\n");
    assert_eq!(state_of(&p, "prepare")["terminated"]["reason"], "Completed");
    let data = server.volume_dir("runner", "data").unwrap();
    assert_eq!(std::fs::read_to_string(data.join("out")).unwrap(), "hi\n");
    assert_eq!(
        server.logs("runner", "main"),
        "from-secret\ns3cr3t runner runner-x\ninit\n"
    );
    let status = p.status.as_ref().unwrap();
    assert_eq!(
        p.spec.as_ref().unwrap().node_name.as_deref(),
        Some(support::kube::NODE)
    );
    assert!(status.pod_ip.is_some() && status.host_ip.is_some() && status.start_time.is_some());
    assert_eq!(
        condition(&p, "Ready").unwrap().reason.as_deref(),
        Some("PodCompleted")
    );
    assert_eq!(condition(&p, "Initialized").unwrap().status, "True");
    let cs = &status.container_statuses.as_ref().unwrap()[0];
    assert!(
        cs.container_id
            .as_deref()
            .unwrap()
            .starts_with("containerd://")
    );
    assert!(cs.image_id.contains("@sha256:"));
    // The log endpoint serves the same output.
    let logs = pods
        .logs(
            "runner",
            &kube::api::LogParams {
                container: Some("main".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(logs.starts_with("from-secret\n"));
    let reasons: Vec<String> = server
        .snapshot()
        .events_for("runner")
        .iter()
        .map(|e| e.reason.clone().unwrap())
        .collect();
    for r in ["Scheduled", "Pulled", "Created", "Started"] {
        assert!(reasons.contains(&r.to_owned()), "{reasons:?}");
    }
}

#[tokio::test]
async fn init_failure_and_missing_secret_volume() {
    let server = KubeServer::start().await;
    let pods: Api<Pod> = Api::namespaced(server.client("ci"), "ci");
    let spec = json!({ "restartPolicy": "Never",
        "initContainers": [sh("setup", "exit 1")], "containers": [sh("main", "echo never")] });
    pods.create(&PostParams::default(), &pod("bad-init", json!({}), spec))
        .await
        .unwrap();
    let p = server
        .wait_pod("bad-init", WAIT, |p| phase(p) == "Failed")
        .await;
    assert_eq!(state_of(&p, "main")["waiting"]["reason"], "PodInitializing");
    assert_eq!(
        condition(&p, "Initialized").unwrap().reason.as_deref(),
        Some("ContainersNotInitialized")
    );

    let spec = json!({ "restartPolicy": "Never",
        "volumes": [{ "name": "env", "secret": { "secretName": "later" } }],
        "containers": [{ "name": "main", "image": "busybox", "command": ["cat", "/env/k"], "volumeMounts": [{ "name": "env", "mountPath": "/env" }] }] });
    pods.create(&PostParams::default(), &pod("mount", json!({}), spec))
        .await
        .unwrap();
    let s = server
        .wait_for(WAIT, |s| {
            s.events_for("mount")
                .iter()
                .any(|e| e.reason.as_deref() == Some("FailedMount"))
        })
        .await;
    let p = s.pod("mount").unwrap();
    assert_eq!(phase(p), "Pending");
    assert_eq!(
        state_of(p, "main")["waiting"]["reason"],
        "ContainerCreating"
    );
    let event = s
        .events_for("mount")
        .into_iter()
        .find(|e| e.reason.as_deref() == Some("FailedMount"))
        .unwrap();
    assert_eq!(
        event.message.as_deref(),
        Some("MountVolume.SetUp failed for volume \"env\" : secret \"later\" not found")
    );
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    server.insert(
        "ci",
        json!({ "kind": "Secret", "metadata": { "name": "later" }, "stringData": { "k": "v" } }),
    );
    server
        .wait_pod("mount", WAIT, |p| phase(p) == "Succeeded")
        .await;
    assert_eq!(server.logs("mount", "main"), "v");
}

#[tokio::test]
async fn sidecar_without_command_keeps_pod_running() {
    let server = KubeServer::start().await;
    let pods: Api<Pod> = Api::namespaced(server.client("ci"), "ci");
    let spec = never(json!([sh("build", "echo done"), { "name": "redis", "image": "redis:7" }]));
    pods.create(&PostParams::default(), &pod("svc", json!({}), spec))
        .await
        .unwrap();
    let p = server
        .wait_pod("svc", WAIT, |p| {
            state_of(p, "build").get("terminated").is_some()
        })
        .await;
    assert_eq!(phase(&p), "Running");
    assert!(state_of(&p, "redis").get("running").is_some());
    server.stop_container("svc", "redis", 0);
    server
        .wait_pod("svc", WAIT, |p| phase(p) == "Succeeded")
        .await;
}

#[tokio::test]
async fn image_scripts() {
    let server = KubeServer::start().await;
    let pods: Api<Pod> = Api::namespaced(server.client("ci"), "ci");
    server.script_image(
        "kiln-test/badimage",
        ImageScript::PullFails { message: None },
    );
    server.script_image("Bad:Name", ImageScript::InvalidName);
    let spec =
        |image: &str| never(json!([{ "name": "main", "image": image, "command": ["true"] }]));
    pods.create(
        &PostParams::default(),
        &pod("pull", json!({}), spec("kiln-test/badimage:1")),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("invalid", json!({}), spec("Bad:Name")),
    )
    .await
    .unwrap();
    let p = server
        .wait_pod("pull", WAIT, |p| {
            state_of(p, "main")["waiting"]["reason"] == "ImagePullBackOff"
        })
        .await;
    assert_eq!(phase(&p), "Pending");
    assert_eq!(
        state_of(&p, "main")["waiting"]["message"].as_str().unwrap(),
        "Back-off pulling image \"kiln-test/badimage:1\": ErrImagePull: failed to pull and unpack image \"docker.io/kiln-test/badimage:1\": failed to resolve reference \"docker.io/kiln-test/badimage:1\": pull access denied, repository does not exist or may require authorization: server message: insufficient_scope: authorization failed"
    );
    let s = server.snapshot();
    let messages: Vec<String> = s
        .events_for("pull")
        .iter()
        .map(|e| e.message.clone().unwrap())
        .collect();
    assert!(
        messages.contains(&"Error: ErrImagePull".to_owned()),
        "{messages:?}"
    );
    assert!(
        messages.contains(&"Back-off pulling image \"kiln-test/badimage:1\"".to_owned()),
        "{messages:?}"
    );
    let p = server
        .wait_pod("invalid", WAIT, |p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|c| {
                    c[0].state
                        .as_ref()
                        .unwrap()
                        .waiting
                        .as_ref()
                        .is_some_and(|w| w.reason.as_deref() == Some("InvalidImageName"))
                })
        })
        .await;
    assert_eq!(phase(&p), "Pending");
    // The image becomes pullable: the pod starts.
    server.clear_image_script("kiln-test/badimage");
    server
        .wait_pod("pull", WAIT, |p| phase(p) == "Succeeded")
        .await;
}

#[tokio::test]
async fn pull_policies_decide_whether_the_registry_is_asked() {
    let server = KubeServer::start().await;
    let pods: Api<Pod> = Api::namespaced(server.client("ci"), "ci");
    // The registry is down for both images; only `cached` is on the node.
    for image in ["kiln-test/cached:1", "kiln-test/absent:1"] {
        server.script_image(image, ImageScript::PullFails { message: None });
    }
    server.seed_node_image("kiln-test/cached:1");
    let spec = |image: &str, policy: &str| {
        never(
            json!([{ "name": "main", "image": image, "imagePullPolicy": policy,
            "command": ["true"] }]),
        )
    };
    for (name, image, policy) in [
        ("always", "kiln-test/cached:1", "Always"),
        ("if-not-present", "kiln-test/cached:1", "IfNotPresent"),
        ("never-cached", "kiln-test/cached:1", "Never"),
        ("never-absent", "kiln-test/absent:1", "Never"),
        (
            "if-not-present-absent",
            "kiln-test/absent:1",
            "IfNotPresent",
        ),
    ] {
        pods.create(
            &PostParams::default(),
            &pod(name, json!({}), spec(image, policy)),
        )
        .await
        .unwrap();
    }
    let waiting = |p: &Pod| {
        state_of(p, "main")["waiting"]["reason"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    for name in ["if-not-present", "never-cached"] {
        server
            .wait_pod(name, WAIT, |p| phase(p) == "Succeeded")
            .await;
    }
    let p = server
        .wait_pod("always", WAIT, |p| waiting(p) == "ErrImagePull")
        .await;
    assert_eq!(
        phase(&p),
        "Pending",
        "Always asks the registry, which is down"
    );
    server
        .wait_pod("if-not-present-absent", WAIT, |p| {
            waiting(p) == "ErrImagePull"
        })
        .await;
    let p = server
        .wait_pod("never-absent", WAIT, |p| waiting(p) == "ErrImageNeverPull")
        .await;
    assert_eq!(
        state_of(&p, "main")["waiting"]["message"],
        "Container image \"kiln-test/absent:1\" is not present with pull policy of Never"
    );
    // Pulled once the registry is back: from then on on the node.
    server.clear_image_script("kiln-test/absent:1");
    server
        .wait_pod("if-not-present-absent", WAIT, |p| phase(p) == "Succeeded")
        .await;
    server.script_image(
        "kiln-test/absent:1",
        ImageScript::PullFails { message: None },
    );
    pods.create(
        &PostParams::default(),
        &pod(
            "again",
            json!({}),
            spec("kiln-test/absent:1", "IfNotPresent"),
        ),
    )
    .await
    .unwrap();
    server
        .wait_pod("again", WAIT, |p| phase(p) == "Succeeded")
        .await;
}

#[tokio::test]
async fn scheduling_and_holds() {
    let server = KubeServer::start().await;
    let pods: Api<Pod> = Api::namespaced(server.client("ci"), "ci");
    server.unschedulable(PodMatch::Label("size".into(), "huge".into()));
    server.hold(PodMatch::Name("held".into()));
    let spec = never(json!([sh("main", "true")]));
    pods.create(
        &PostParams::default(),
        &pod("huge", json!({"size": "huge"}), spec.clone()),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("held", json!({}), spec.clone()),
    )
    .await
    .unwrap();
    let s = server
        .wait_for(WAIT, |s| {
            s.pod("huge")
                .is_some_and(|p| condition(p, "PodScheduled").is_some_and(|c| c.status == "False"))
                && s.pod("held").is_some_and(|p| {
                    condition(p, "PodScheduled").is_some_and(|c| c.status == "True")
                })
        })
        .await;
    let huge = s.pod("huge").unwrap();
    let c = condition(huge, "PodScheduled").unwrap();
    assert_eq!(c.reason.as_deref(), Some("Unschedulable"));
    assert!(
        c.message
            .as_deref()
            .unwrap()
            .starts_with("0/3 nodes are available: 3 Insufficient cpu.")
    );
    assert!(huge.spec.as_ref().unwrap().node_name.is_none());
    assert!(
        s.events_for("huge")
            .iter()
            .any(|e| e.reason.as_deref() == Some("FailedScheduling")
                && e.type_.as_deref() == Some("Warning"))
    );
    let held = s.pod("held").unwrap();
    assert_eq!(phase(held), "Pending");
    assert_eq!(
        state_of(held, "main")["waiting"]["reason"],
        "ContainerCreating"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        server.pod("held").map(|p| phase(&p).to_owned()).unwrap(),
        "Pending"
    );
    server.release_pod("held");
    server.release_scheduling();
    server
        .wait_for(WAIT, |s| {
            s.phase("held") == "Succeeded" && s.phase("huge") == "Succeeded"
        })
        .await;
    assert_eq!(server.max_pods_at_once(), 2);
}

#[tokio::test]
async fn disruptions() {
    let server = KubeServer::start().await;
    let pods: Api<Pod> = Api::namespaced(server.client("ci"), "ci");
    let spec = never(json!([sh("main", "sleep 30")]));
    for name in ["oom", "evicted", "deadline", "lost", "spot", "preempted"] {
        let mut spec = spec.clone();
        if name == "deadline" {
            spec["activeDeadlineSeconds"] = json!(1);
        }
        pods.create(
            &PostParams::default(),
            &pod(name, json!({"set": "d"}), spec),
        )
        .await
        .unwrap();
    }
    server
        .wait_for(WAIT, |s| {
            ["oom", "evicted", "lost", "spot", "preempted"]
                .iter()
                .all(|n| s.phase(n) == "Running")
        })
        .await;
    server.oom_kill("oom", "main");
    server.evict("evicted");
    server.node_lost("lost");
    server.spot_reclaim("spot");
    server.preempt("preempted");

    let p = server.wait_pod("oom", WAIT, |p| phase(p) == "Failed").await;
    assert_eq!(state_of(&p, "main")["terminated"]["reason"], "OOMKilled");
    assert_eq!(state_of(&p, "main")["terminated"]["exitCode"], 137);

    let p = server
        .wait_pod("evicted", WAIT, |p| phase(p) == "Failed")
        .await;
    let status = p.status.as_ref().unwrap();
    assert_eq!(status.reason.as_deref(), Some("Evicted"));
    assert!(
        status
            .message
            .as_deref()
            .unwrap()
            .starts_with("The node was low on resource: memory.")
    );
    let c = condition(&p, "DisruptionTarget").unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_deref()),
        ("True", Some("TerminationByKubelet"))
    );
    assert!(!server.process_alive("evicted", "main"));

    let p = server
        .wait_pod("deadline", WAIT, |p| phase(p) == "Failed")
        .await;
    let status = p.status.as_ref().unwrap();
    assert_eq!(status.reason.as_deref(), Some("DeadlineExceeded"));
    assert_eq!(
        status.message.as_deref(),
        Some("Pod was active on the node longer than the specified deadline")
    );
    assert!(!server.process_alive("deadline", "main"));

    let p = server
        .wait_pod("lost", WAIT, |p| phase(p) == "Failed")
        .await;
    assert_eq!(
        p.status.as_ref().unwrap().reason.as_deref(),
        Some("NodeLost")
    );
    assert_eq!(state_of(&p, "main")["terminated"]["exitCode"], 137);

    let p = server
        .wait_pod("spot", WAIT, |p| phase(p) == "Failed")
        .await;
    assert_eq!(
        p.status.as_ref().unwrap().reason.as_deref(),
        Some("BidFailed")
    );
    assert_eq!(
        condition(&p, "ContainerInstanceExpired").unwrap().status,
        "True"
    );
    assert!(
        server
            .snapshot()
            .events_for("spot")
            .iter()
            .any(|e| e.reason.as_deref() == Some("SpotToBeReleased"))
    );

    server.wait_gone("preempted", WAIT).await;
    assert!(
        server
            .snapshot()
            .events_for("preempted")
            .iter()
            .any(|e| e.reason.as_deref() == Some("Preempted"))
    );
    assert!(!server.process_alive("preempted", "main"));
}

#[tokio::test]
async fn access_reviews_and_forbidden() {
    let server = KubeServer::start().await;
    let client = server.client("ci");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ci");
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client);
    let review = |verb: &str| SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some("ci".into()),
                verb: Some(verb.into()),
                resource: Some("pods".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let allowed = |r: SelfSubjectAccessReview| r.status.unwrap().allowed;
    assert!(allowed(
        reviews
            .create(&PostParams::default(), &review("create"))
            .await
            .unwrap()
    ));
    server.deny("create", "pods");
    assert!(!allowed(
        reviews
            .create(&PostParams::default(), &review("create"))
            .await
            .unwrap()
    ));
    assert!(allowed(
        reviews
            .create(&PostParams::default(), &review("delete"))
            .await
            .unwrap()
    ));
    let e = api_error(
        pods.create(
            &PostParams::default(),
            &pod("x", json!({}), never(json!([sh("main", "true")]))),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        e.message,
        "pods is forbidden: User \"system:serviceaccount:ci:kiln\" cannot create resource \"pods\" in API group \"\" in the namespace \"ci\""
    );
    server.deny("get", "pods");
    let e = api_error(pods.get("x").await.unwrap_err());
    assert_eq!(
        e.message,
        "pods \"x\" is forbidden: User \"system:serviceaccount:ci:kiln\" cannot get resource \"pods\" in API group \"\" in the namespace \"ci\""
    );
    assert!(server.pods().is_empty());
}

#[tokio::test]
async fn cluster_scoped_lists_and_watches_span_namespaces_and_a_role_confines_them() {
    let server = KubeServer::start().await;
    server.set_kubelet(false);
    let client = server.client("ci");
    let labelled = json!({ "kiln.dev/coordinator": "kiln" });
    for ns in ["ci", "ci-team-a"] {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        pods.create(
            &PostParams::default(),
            &pod(
                &format!("p-{ns}"),
                labelled.clone(),
                never(json!([sh("main", "true")])),
            ),
        )
        .await
        .unwrap();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let secret: Secret = serde_json::from_value(json!({
            "metadata": { "name": format!("s-{ns}"), "labels": labelled },
        }))
        .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    let other: Api<Pod> = Api::namespaced(client.clone(), "elsewhere");
    other
        .create(
            &PostParams::default(),
            &pod("unlabelled", json!({}), never(json!([sh("main", "true")]))),
        )
        .await
        .unwrap();
    // `/api/v1/pods?labelSelector=…` and `/api/v1/secrets?labelSelector=…`, as kubectl -A.
    let selected = ListParams::default().labels("kiln.dev/coordinator=kiln");
    let all_pods: Api<Pod> = Api::all(client.clone());
    let listed = all_pods.list(&selected).await.unwrap();
    let mut seen: Vec<(String, String)> = listed
        .items
        .iter()
        .map(|p| {
            (
                p.metadata.namespace.clone().unwrap(),
                p.metadata.name.clone().unwrap(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("ci".to_owned(), "p-ci".to_owned()),
            ("ci-team-a".to_owned(), "p-ci-team-a".to_owned())
        ]
    );
    let all_secrets: Api<Secret> = Api::all(client.clone());
    assert_eq!(all_secrets.list(&selected).await.unwrap().items.len(), 2);
    assert_eq!(
        all_pods
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        3
    );
    // A cluster-wide watch from the list's resourceVersion sees a pod made in a third namespace.
    let version = listed.metadata.resource_version.clone().unwrap();
    let mut events = all_pods
        .watch(
            &WatchParams::default().labels("kiln.dev/coordinator=kiln"),
            &version,
        )
        .await
        .unwrap()
        .boxed();
    let third: Api<Pod> = Api::namespaced(client.clone(), "ci-team-b");
    third
        .create(
            &PostParams::default(),
            &pod("p-b", labelled.clone(), never(json!([sh("main", "true")]))),
        )
        .await
        .unwrap();
    let event = tokio::time::timeout(WAIT, events.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match event {
        WatchEvent::Added(p) => {
            assert_eq!(p.metadata.namespace.as_deref(), Some("ci-team-b"));
            assert_eq!(p.metadata.name.as_deref(), Some("p-b"));
        }
        other => panic!("expected the new pod, got {other:?}"),
    }
    // With only a Role in `ci`: cluster-wide lists and other namespaces are forbidden, and
    // access reviews say so.
    server.grant_only_in("ci");
    let e = api_error(all_secrets.list(&selected).await.unwrap_err());
    assert_eq!(
        e.message,
        "secrets is forbidden: User \"system:serviceaccount:ci:kiln\" cannot list resource \"secrets\" in API group \"\" at the cluster scope"
    );
    let e = api_error(third.get("p-b").await.unwrap_err());
    assert_eq!(e.code, 403);
    let own: Api<Pod> = Api::namespaced(client.clone(), "ci");
    own.get("p-ci").await.unwrap();
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client);
    let review = |namespace: Option<&str>| SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: namespace.map(str::to_owned),
                verb: Some("list".into()),
                resource: Some("secrets".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let allowed = |r: SelfSubjectAccessReview| r.status.unwrap().allowed;
    let create = PostParams::default();
    assert!(allowed(
        reviews.create(&create, &review(Some("ci"))).await.unwrap()
    ));
    assert!(!allowed(
        reviews.create(&create, &review(None)).await.unwrap()
    ));
}

#[tokio::test]
async fn leases_follow_resource_version_rules() {
    use k8s_openapi::api::coordination::v1::Lease;
    let server = KubeServer::start().await;
    let leases: Api<Lease> = Api::namespaced(server.client("ci"), "ci");
    let lease: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": "kiln-ci-a", "labels": { "kiln.dev/coordinator": "ci" } },
        "spec": { "holderIdentity": "a", "leaseDurationSeconds": 15,
                  "renewTime": "2026-01-01T00:00:00.000000Z" },
    }))
    .unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let rv = created.metadata.resource_version.clone().unwrap();
    assert_eq!(
        created.spec.as_ref().unwrap().holder_identity.as_deref(),
        Some("a")
    );

    let again = api_error(
        leases
            .create(&PostParams::default(), &lease)
            .await
            .unwrap_err(),
    );
    assert_eq!((again.code, again.reason.as_str()), (409, "AlreadyExists"));
    assert!(
        again
            .message
            .contains("leases.coordination.k8s.io \"kiln-ci-a\" already exists")
    );

    // PUT with the current resourceVersion wins; with the old one it conflicts.
    let mut renewed = created.clone();
    renewed.spec.as_mut().unwrap().renew_time =
        Some(serde_json::from_value(json!("2026-01-01T00:00:05.000000Z")).unwrap());
    let replaced = leases
        .replace("kiln-ci-a", &PostParams::default(), &renewed)
        .await
        .unwrap();
    assert_ne!(
        replaced.metadata.resource_version.as_deref(),
        Some(rv.as_str())
    );
    let stale = api_error(
        leases
            .replace("kiln-ci-a", &PostParams::default(), &renewed)
            .await
            .unwrap_err(),
    );
    assert_eq!((stale.code, stale.reason.as_str()), (409, "Conflict"));

    // A merge patch carrying a stale resourceVersion conflicts too; without one it applies.
    let patch = json!({ "metadata": { "resourceVersion": rv }, "spec": { "holderIdentity": "b" } });
    let stale = api_error(
        leases
            .patch("kiln-ci-a", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_err(),
    );
    assert_eq!(stale.code, 409);
    let patch = json!({ "spec": { "holderIdentity": "b" } });
    let patched = leases
        .patch("kiln-ci-a", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(patched.spec.unwrap().holder_identity.as_deref(), Some("b"));

    let invalid: Lease = serde_json::from_value(json!({
        "metadata": { "name": "bad" }, "spec": { "leaseDurationSeconds": 0 },
    }))
    .unwrap();
    let invalid = api_error(
        leases
            .create(&PostParams::default(), &invalid)
            .await
            .unwrap_err(),
    );
    assert_eq!(invalid.code, 422);

    let listed = leases
        .list(&ListParams::default().labels("kiln.dev/coordinator=ci"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(server.leases().len(), 1);

    // Delete with a stale resourceVersion precondition conflicts; then it goes.
    let stale = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            resource_version: Some(rv),
            uid: None,
        }),
        ..DeleteParams::default()
    };
    assert_eq!(
        api_error(leases.delete("kiln-ci-a", &stale).await.unwrap_err()).code,
        409
    );
    leases
        .delete("kiln-ci-a", &DeleteParams::default())
        .await
        .unwrap();
    let gone = api_error(leases.get("kiln-ci-a").await.unwrap_err());
    assert_eq!(gone.code, 404);
    assert!(
        gone.message
            .contains("leases.coordination.k8s.io \"kiln-ci-a\" not found")
    );

    server.deny("create", "leases");
    let denied = api_error(
        leases
            .create(&PostParams::default(), &lease)
            .await
            .unwrap_err(),
    );
    assert_eq!(denied.code, 403);
    assert!(
        denied
            .message
            .contains("in API group \"coordination.k8s.io\""),
        "{}",
        denied.message
    );
}

/// What replicas of kiln rely on: a claim (a merge patch carrying the `resourceVersion` it
/// listed the object at) conflicts once the object moved on, on pods and Secrets alike; a
/// `notin` selector also selects objects without the label; and a watch with a selector sees
/// an object that is relabelled out of it as DELETED and back into it as ADDED.
#[tokio::test]
async fn claims_conflict_when_stale_and_selector_watches_follow_relabels() {
    let server = KubeServer::start().await;
    server.set_kubelet(false);
    let client = server.client("ci");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ci");
    let secrets: Api<Secret> = Api::namespaced(client, "ci");
    let labels = json!({"kiln.dev/coordinator": "kiln", "kiln.dev/replica": "a"});
    pods.create(
        &PostParams::default(),
        &pod(
            "kiln-gl-1",
            labels.clone(),
            never(json!([sh("main", "sleep 60")])),
        ),
    )
    .await
    .unwrap();
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "kiln-gl-1", "labels": labels},
        "stringData": {"job.json": "{}"},
    }))
    .unwrap();
    let listed = secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let unlabelled: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "kiln-gl-2", "labels": {"kiln.dev/coordinator": "kiln"}},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &unlabelled)
        .await
        .unwrap();

    let claim = |rv: &str, replica: &str| {
        Patch::Merge(json!({
            "metadata": {"resourceVersion": rv, "labels": {"kiln.dev/replica": replica}}
        }))
    };
    // Two replicas claim the Secret as listed: the first wins, the second gets 409.
    let rv = listed.metadata.resource_version.unwrap();
    secrets
        .patch("kiln-gl-1", &PatchParams::default(), &claim(&rv, "b"))
        .await
        .unwrap();
    let stale = secrets
        .patch("kiln-gl-1", &PatchParams::default(), &claim(&rv, "c"))
        .await
        .map_err(api_error)
        .unwrap_err();
    assert_eq!((stale.code, stale.reason.as_str()), (409, "Conflict"));
    // `notin` selects the Secrets of other replicas and those without the label.
    let names = |list: kube::core::ObjectList<Secret>| -> Vec<String> {
        list.items
            .into_iter()
            .filter_map(|s| s.metadata.name)
            .collect()
    };
    let selector = "kiln.dev/coordinator=kiln,kiln.dev/replica notin (a,c)";
    let found = names(
        secrets
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap(),
    );
    assert_eq!(found, ["kiln-gl-1", "kiln-gl-2"]);
    let selector = "kiln.dev/coordinator=kiln,kiln.dev/replica notin (b)";
    let found = names(
        secrets
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap(),
    );
    assert_eq!(found, ["kiln-gl-2"]);

    // A watch of the pods not labelled b: the pod leaves it when relabelled b, and comes back.
    let rv = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let stream = pods
        .watch(&WatchParams::default().labels(selector).timeout(2), &rv)
        .await
        .unwrap();
    let current = pods.get("kiln-gl-1").await.unwrap();
    let old_rv = current.metadata.resource_version.unwrap();
    pods.patch("kiln-gl-1", &PatchParams::default(), &claim(&old_rv, "b"))
        .await
        .unwrap();
    let stale = pods
        .patch("kiln-gl-1", &PatchParams::default(), &claim(&old_rv, "c"))
        .await
        .map_err(api_error)
        .unwrap_err();
    assert_eq!((stale.code, stale.reason.as_str()), (409, "Conflict"));
    pods.patch(
        "kiln-gl-1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"kiln.dev/replica": "a"}}})),
    )
    .await
    .unwrap();
    let events: Vec<String> = stream
        .take(2)
        .map(|e| event_name(e.unwrap()))
        .collect()
        .await;
    assert_eq!(events, ["DELETED kiln-gl-1", "ADDED kiln-gl-1"]);
}

/// A watch event as `ADDED name`, `MODIFIED name`, `DELETED name`.
fn event_name(event: WatchEvent<Pod>) -> String {
    match event {
        WatchEvent::Added(p) => format!("ADDED {}", p.metadata.name.unwrap()),
        WatchEvent::Modified(p) => format!("MODIFIED {}", p.metadata.name.unwrap()),
        WatchEvent::Deleted(p) => format!("DELETED {}", p.metadata.name.unwrap()),
        other => format!("{other:?}"),
    }
}
