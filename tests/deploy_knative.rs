//! End to end: the real `kiln deploy knative` binary against a minimal Kubernetes API server
//! serving `serving.knative.dev/v1`, whose controller the test drives.

use crate::support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use support::knative::KnativeServer;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs kiln; after `hold` (during which kiln must still be waiting) ticks the controller
/// until kiln exits.
async fn kiln(server: &KnativeServer, kubeconfig: &str, args: &[&str], hold: Duration) -> Run {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["deploy", "knative", "--kubeconfig", kubeconfig])
        .args(["--poll-interval", "20ms", "--timeout", "20s"])
        .args(args)
        .env_remove("KUBECONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(hold).await;
    if !hold.is_zero() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "kiln exited before the service was ready"
        );
    }
    while child.try_wait().unwrap().is_none() {
        server.tick();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = child.wait_with_output().await.unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write_kubeconfig(server: &KnativeServer, dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, server.kubeconfig("apps")).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn deploy_waits_for_ready_then_canary_then_promote() {
    let server = KnativeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = write_kubeconfig(&server, &dir);

    let first = "registry.example.com/acme/orders@sha256:1111";
    let run = kiln(
        &server,
        &kc,
        &[
            "--service",
            "orders",
            "--image",
            first,
            "--port",
            "8080",
            "--min-scale",
            "1",
            "--max-scale",
            "5",
            "--env",
            "MODE=prod",
        ],
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains("is ready at http://orders.apps.example.com"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("revision orders-00001"),
        "{}",
        run.stdout
    );
    let svc = server.service("apps", "orders").unwrap();
    assert_eq!(
        svc["spec"]["template"],
        json!({
            "metadata": { "annotations": {
                "autoscaling.knative.dev/min-scale": "1",
                "autoscaling.knative.dev/max-scale": "5",
            }},
            "spec": { "containers": [{
                "image": first,
                "env": [{ "name": "MODE", "value": "prod" }],
                "ports": [{ "containerPort": 8080 }],
            }]},
        })
    );
    assert_eq!(
        svc["spec"]["traffic"],
        json!([{ "latestRevision": true, "percent": 100 }])
    );

    // Canary: 10% to the new revision, 90% stays on the previous one.
    let second = "registry.example.com/acme/orders@sha256:2222";
    let run = kiln(
        &server,
        &kc,
        &["--service", "orders", "--image", second, "--canary", "10"],
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let svc = server.service("apps", "orders").unwrap();
    assert_eq!(
        svc["spec"]["traffic"],
        json!([
            { "revisionName": "orders-00001", "percent": 90 },
            { "latestRevision": true, "percent": 10, "tag": "canary" },
        ])
    );
    assert_eq!(svc["status"]["latestReadyRevisionName"], "orders-00002");
    assert!(
        run.stdout.contains("10% orders-00002 (tag canary)"),
        "{}",
        run.stdout
    );

    // Promote keeps the image and moves all traffic to the latest revision.
    let run = kiln(
        &server,
        &kc,
        &["--service", "orders", "--promote"],
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let svc = server.service("apps", "orders").unwrap();
    assert_eq!(
        svc["spec"]["traffic"],
        json!([{ "latestRevision": true, "percent": 100 }])
    );
    assert_eq!(
        svc["spec"]["template"]["spec"]["containers"][0]["image"],
        second
    );
    assert_eq!(svc["status"]["latestCreatedRevisionName"], "orders-00002");
}

#[tokio::test]
async fn failing_revision_exits_3_with_its_condition_message() {
    let server = KnativeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = write_kubeconfig(&server, &dir);
    let run = kiln(
        &server,
        &kc,
        &[
            "--service",
            "pay",
            "--namespace",
            "team",
            "--image",
            "registry.example.com/broken:1",
        ],
        Duration::from_millis(200),
    )
    .await;
    assert_eq!(run.code, 3, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr
            .contains("revision pay-00001: Ready=False ContainerMissing: Unable to fetch image"),
        "{}",
        run.stderr
    );
    assert!(server.service("team", "pay").is_some());
}

#[tokio::test]
async fn dry_run_prints_the_apply_and_sends_nothing() {
    let server = KnativeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = write_kubeconfig(&server, &dir);
    let run = kiln(
        &server,
        &kc,
        &[
            "--dry-run",
            "--service",
            "orders",
            "--image",
            "r/acme/orders:1",
            "--canary",
            "20",
        ],
        Duration::ZERO,
    )
    .await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains(&format!(
            "> PATCH {}/apis/serving.knative.dev/v1/namespaces/apps/services/orders?fieldManager=kiln&force=true",
            server.url
        )),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("\"tag\": \"canary\""), "{}", run.stdout);
    assert!(!run.all_contains(support::knative::TOKEN));
    assert!(server.state.lock().unwrap().requests.is_empty());
}

impl Run {
    fn all_contains(&self, needle: &str) -> bool {
        self.stdout.contains(needle) || self.stderr.contains(needle)
    }
}
