//! End to end: the real `kiln deploy sae` binary against the SAE + OSS test server.

use crate::support;

use std::path::Path;
use std::process::Output;

use support::sae::{
    ACCESS_KEY_ID, ACCESS_KEY_SECRET, BUCKET, FAILING_MESSAGE, SaeServer, Scenario,
};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

async fn kiln(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.arg("deploy").args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("ALIBABA_CLOUD_") || k.starts_with("KILN_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("CI_COMMIT_SHORT_SHA", "abc12345");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().await.unwrap();
    let run = Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    };
    // No secret is ever printed, whatever happened.
    assert!(!run.all().contains(ACCESS_KEY_SECRET), "{}", run.all());
    run
}

const CREDS: &[(&str, &str)] = &[
    ("ALIBABA_CLOUD_ACCESS_KEY_ID", ACCESS_KEY_ID),
    ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", ACCESS_KEY_SECRET),
];

fn base_args(server: &SaeServer) -> Vec<String> {
    [
        "sae",
        "--region",
        "cn-hangzhou",
        "--endpoint",
        &server.sae_url,
        "--oss-endpoint",
        &server.oss_url,
        "--poll-interval",
        "10ms",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

async fn deploy(server: &SaeServer, extra: &[&str], env: &[(&str, &str)]) -> Run {
    let mut args = base_args(server);
    if !extra.contains(&"--timeout") {
        args.extend(["--timeout".to_owned(), "20s".to_owned()]);
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    kiln(&refs, env).await
}

fn write_package(dir: &Path, name: &str, size: usize) -> String {
    let path = dir.join(name);
    let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&path, data).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn jar_deploy_uploads_once_follows_batches_and_succeeds() {
    let server = SaeServer::start(Scenario::Succeeds).await;
    let dir = tempfile::tempdir().unwrap();
    let jar = write_package(dir.path(), "orders.jar", 300_000);
    let extra = [
        "--app-id",
        "app-1111",
        "--jar",
        &jar,
        "--oss-bucket",
        BUCKET,
        "--version",
        "1.4.2-a",
        "--batches",
        "2",
        "--batch-wait",
        "1",
        "--env",
        "SPRING_PROFILES_ACTIVE=prod",
        "--jdk",
        "Dragonwell 11",
        "--min-ready",
        "1",
    ];
    let run = deploy(&server, &extra, CREDS).await;
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(
        run.stdout.contains("uploading orders.jar"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("batch 1/2 (Batch 1 change): executing"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("batch 2/2 (Batch 2 change): succeeded"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("succeeded: the new version is serving"),
        "{}",
        run.stdout
    );
    {
        let s = server.state.lock().unwrap();
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);
        assert_eq!(s.deploys.len(), 1);
        let d = &s.deploys[0];
        assert_eq!(d["AppId"], "app-1111");
        assert_eq!(d["PackageType"], "FatJar");
        assert_eq!(d["PackageVersion"], "1.4.2-a");
        assert_eq!(d["Jdk"], "Dragonwell 11");
        assert_eq!(d["MinReadyInstances"], "1");
        assert_eq!(
            d["Envs"],
            r#"[{"name":"SPRING_PROFILES_ACTIVE","value":"prod"}]"#
        );
        assert_eq!(
            d["UpdateStrategy"],
            r#"{"batchUpdate":{"batch":2,"batchWaitTime":1,"releaseType":"auto"},"type":"BatchUpdate"}"#
        );
        let stored: Vec<_> = s.objects.values().collect();
        assert_eq!(stored.len(), 1);
        assert_eq!(*stored[0], std::fs::read(&jar).unwrap());
        assert_eq!(s.uploads.len(), 1);
    }

    // The same jar again: found by its content hash, not uploaded twice.
    let extra = [
        "--app-id",
        "app-1111",
        "--jar",
        &jar,
        "--oss-bucket",
        BUCKET,
        "--version",
        "1.4.2-b",
    ];
    let again = deploy(&server, &extra, CREDS).await;
    assert_eq!(again.code, 0, "{}", again.all());
    assert!(
        again.stdout.contains("not uploading again"),
        "{}",
        again.stdout
    );
    let s = server.state.lock().unwrap();
    assert_eq!(s.uploads.len(), 1, "{:?}", s.uploads);
    assert_eq!(s.deploys.len(), 2);
}

#[tokio::test]
async fn large_war_goes_up_in_parts_with_defaults_from_the_config_file() {
    let server = SaeServer::start(Scenario::Succeeds).await;
    let dir = tempfile::tempdir().unwrap();
    let war = write_package(dir.path(), "shop.war", 450_000);
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "[deploy]\nregion = \"cn-hangzhou\"\noss_bucket = \"{BUCKET}\"\noss_prefix = \"ci/shop\"\n\
             oss_endpoint = \"{}\"\nsae_endpoint = \"{}\"\nmultipart_threshold = 200000\npart_size = 102400\n",
            server.oss_url, server.sae_url
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let run = kiln(
        &[
            "sae",
            "--config",
            config,
            "--poll-interval",
            "10ms",
            "--app-id",
            "app-2222",
            "--war",
            &war,
            "--web-container",
            "apache-tomcat-8.5.42",
        ],
        CREDS,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    let s = server.state.lock().unwrap();
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    let parts = s.uploads.iter().filter(|u| u.starts_with("part ")).count();
    assert_eq!(parts, 5, "{:?}", s.uploads);
    assert!(
        s.uploads
            .last()
            .unwrap()
            .starts_with("complete builds/ci/shop/")
    );
    let (key, data) = s.objects.iter().next().unwrap();
    assert!(key.ends_with("/shop.war"), "{key}");
    assert_eq!(*data, std::fs::read(&war).unwrap());
    let d = &s.deploys[0];
    assert_eq!(d["PackageType"], "War");
    assert_eq!(d["WebContainer"], "apache-tomcat-8.5.42");
    assert!(
        d["PackageVersion"].starts_with("abc12345-"),
        "{}",
        d["PackageVersion"]
    );
}

#[tokio::test]
async fn image_deploy_by_app_name_succeeds() {
    let server = SaeServer::start(Scenario::Succeeds).await;
    let image = "registry.cn-hangzhou.aliyuncs.com/acme/orders:1.4.2";
    let run = deploy(&server, &["--app-name", "orders", "--image", image], CREDS).await;
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(
        run.stdout.contains("application orders is app-1111"),
        "{}",
        run.stdout
    );
    let s = server.state.lock().unwrap();
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    let d = &s.deploys[0];
    assert_eq!(d["AppId"], "app-1111");
    assert_eq!(d["PackageType"], "Image");
    assert_eq!(d["ImageUrl"], image);
    assert!(s.objects.is_empty());
}

#[tokio::test]
async fn failing_batch_exits_3_with_saes_message() {
    let server = SaeServer::start(Scenario::FailingBatch).await;
    let run = deploy(
        &server,
        &["--app-id", "app-1111", "--image", "r/acme/orders:2"],
        CREDS,
    )
    .await;
    assert_eq!(run.code, 3, "{}", run.all());
    assert!(
        run.stderr.contains("change order co-1 failed"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains(FAILING_MESSAGE), "{}", run.stderr);
    assert!(
        run.stdout.contains(FAILING_MESSAGE),
        "batch line: {}",
        run.stdout
    );
}

#[tokio::test]
async fn sub_status_failing_exits_3() {
    let server = SaeServer::start(Scenario::SubStatusFailing).await;
    let run = deploy(
        &server,
        &["--app-id", "app-1111", "--image", "r/acme/orders:2"],
        CREDS,
    )
    .await;
    assert_eq!(run.code, 3, "{}", run.all());
    assert!(run.stderr.contains("SubStatus=1"), "{}", run.stderr);
    assert!(
        run.stderr.contains("health check failed on port 8080"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn manual_batch_is_confirmed_with_confirm_batches() {
    let server = SaeServer::start(Scenario::ManualBatch).await;
    let run = deploy(
        &server,
        &[
            "--app-id",
            "app-1111",
            "--image",
            "r/acme/orders:2",
            "--batches",
            "2",
            "--release-type",
            "manual",
            "--confirm-batches",
        ],
        CREDS,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(
        run.stdout.contains("confirming the next batch"),
        "{}",
        run.stdout
    );
    let s = server.state.lock().unwrap();
    assert_eq!(s.confirmations, vec!["co-1-p2".to_owned()]);
    assert!(s.deploys[0]["UpdateStrategy"].contains(r#""releaseType":"manual""#));
}

#[tokio::test]
async fn manual_batch_without_confirm_batches_waits_then_times_out_with_4() {
    let server = SaeServer::start(Scenario::ManualBatch).await;
    let run = deploy(
        &server,
        &[
            "--app-id",
            "app-1111",
            "--image",
            "r/acme/orders:2",
            "--timeout",
            "1s",
        ],
        CREDS,
    )
    .await;
    assert_eq!(run.code, 4, "{}", run.all());
    assert_eq!(
        run.stdout.matches("waits for manual confirmation").count(),
        1,
        "told once: {}",
        run.stdout
    );
    assert!(run.stderr.contains("gave up after"), "{}", run.stderr);
    assert!(server.state.lock().unwrap().confirmations.is_empty());
}

#[tokio::test]
async fn busy_app_waits_for_the_running_change_order_then_deploys() {
    let server = SaeServer::start(Scenario::Succeeds).await;
    let running = server.add_running_order("app-1111", 3);
    let run = deploy(
        &server,
        &["--app-id", "app-1111", "--image", "r/acme/orders:2"],
        CREDS,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(
        run.stdout
            .contains(&format!("is busy with change order {running}; waiting")),
        "{}",
        run.stdout
    );
    let s = server.state.lock().unwrap();
    assert_eq!(s.deploys.len(), 1);
    // The first DeployApplication was refused as busy, the second one went through.
    let calls = s
        .requests
        .iter()
        .filter(|r| r.contains("deployApplication"))
        .count();
    assert_eq!(calls, 2);
}

#[tokio::test]
async fn busy_app_with_on_busy_fail_exits_5() {
    let server = SaeServer::start(Scenario::Succeeds).await;
    let running = server.add_running_order("app-1111", 3);
    let run = deploy(
        &server,
        &[
            "--app-id",
            "app-1111",
            "--image",
            "r/acme/orders:2",
            "--on-busy",
            "fail",
        ],
        CREDS,
    )
    .await;
    assert_eq!(run.code, 5, "{}", run.all());
    assert!(run.stderr.contains(&running), "{}", run.stderr);
    assert!(server.state.lock().unwrap().deploys.is_empty());
}

#[tokio::test]
async fn bad_credentials_give_a_clear_4xx_message() {
    let server = SaeServer::start(Scenario::Succeeds).await;
    let wrong_secret = [
        ("ALIBABA_CLOUD_ACCESS_KEY_ID", ACCESS_KEY_ID),
        ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "wrong-secret"),
    ];
    let run = deploy(
        &server,
        &["--app-id", "app-1111", "--image", "r/a:1"],
        &wrong_secret,
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(
        run.stderr
            .contains("SAE rejected DeployApplication: HTTP 400 SignatureDoesNotMatch"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("check ALIBABA_CLOUD_ACCESS_KEY_ID"),
        "{}",
        run.stderr
    );
    assert!(!run.all().contains("wrong-secret"));

    let unknown_id = [
        ("ALIBABA_CLOUD_ACCESS_KEY_ID", "LTAI-nobody"),
        ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", ACCESS_KEY_SECRET),
    ];
    let run = deploy(
        &server,
        &["--app-id", "app-1111", "--image", "r/a:1"],
        &unknown_id,
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(
        run.stderr.contains("HTTP 404 InvalidAccessKeyId.NotFound"),
        "{}",
        run.stderr
    );

    // OSS refuses the upload the same way.
    let dir = tempfile::tempdir().unwrap();
    let jar = write_package(dir.path(), "a.jar", 1000);
    let run = deploy(
        &server,
        &[
            "--app-id",
            "app-1111",
            "--jar",
            &jar,
            "--oss-bucket",
            BUCKET,
        ],
        &wrong_secret,
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("OSS refused HEAD"), "{}", run.stderr);
    assert!(run.stderr.contains("HTTP 403"), "{}", run.stderr);
    {
        let s = server.state.lock().unwrap();
        assert!(s.deploys.is_empty() && s.objects.is_empty());
    }
    // No credentials at all: says which variable is missing.
    let run = deploy(&server, &["--app-id", "app-1111", "--image", "r/a:1"], &[]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("ALIBABA_CLOUD_ACCESS_KEY_ID is not set"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn dry_run_prints_every_request_redacted_and_sends_nothing() {
    let server = SaeServer::start(Scenario::Succeeds).await;
    let dir = tempfile::tempdir().unwrap();
    let jar = write_package(dir.path(), "orders.jar", 5000);
    let mut env = CREDS.to_vec();
    env.push(("ALIBABA_CLOUD_SECURITY_TOKEN", "sts-token-value"));
    let run = deploy(
        &server,
        &[
            "--dry-run",
            "--app-name",
            "orders",
            "--jar",
            &jar,
            "--oss-bucket",
            BUCKET,
            "--env",
            "DB_PASSWORD=hunter2",
        ],
        &env,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    let out = &run.stdout;
    assert!(
        out.contains(&format!(
            "> GET {}/pop/v1/sam/app/listApplications?",
            server.sae_url
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("> HEAD {}/{BUCKET}/kiln-deploy/", server.oss_url)),
        "{out}"
    );
    assert!(
        out.contains(&format!("> PUT {}/{BUCKET}/kiln-deploy/", server.oss_url)),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "> POST {}/pop/v1/sam/app/deployApplication?",
            server.sae_url
        )),
        "{out}"
    );
    assert!(out.contains("> x-acs-action: DeployApplication"), "{out}");
    assert!(out.contains("Signature=<redacted>"), "{out}");
    assert!(out.contains("x-oss-signature=<redacted>"), "{out}");
    assert!(out.contains("> x-acs-security-token: <redacted>"), "{out}");
    assert!(out.contains("<5000 bytes of orders.jar>"), "{out}");
    assert!(out.contains("nothing was sent"), "{out}");
    for secret in ["sts-token-value", "hunter2"] {
        assert!(!run.all().contains(secret), "{secret} leaked: {out}");
    }
    let s = server.state.lock().unwrap();
    assert!(s.requests.is_empty(), "dry run sent {:?}", s.requests);
}

#[tokio::test]
async fn timed_out_deploy_call_is_looked_up_not_repeated() {
    let server = SaeServer::start(Scenario::Succeeds).await;
    server.state.lock().unwrap().deploy_delay = Some(std::time::Duration::from_secs(3));
    let run = deploy(
        &server,
        &[
            "--app-id",
            "app-1111",
            "--image",
            "r/acme/orders:3",
            "--request-timeout",
            "1s",
            "--version",
            "v9",
        ],
        CREDS,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(
        run.stdout
            .contains("found change order co-1 for this deploy"),
        "{}",
        run.stdout
    );
    assert_eq!(server.sae_requests("deployApplication"), 1);
    assert!(server.sae_requests("ListChangeOrders") >= 1);
}
