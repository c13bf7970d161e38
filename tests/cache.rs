//! End to end: GitLab's `cache:` through a real `kiln run` (local executor) and a real S3
//! server that verifies signatures (`s3s-fs`): saved by one job, restored by the next with
//! modes and links, fallback keys, `when`, several caches per job, an outage that only warns,
//! and the storage key nowhere in a build.

use crate::support;

use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use support::gitlab::{GitLabServer, JobRecord, job_json};
use support::kiln::{KilnProcess, config};
use support::s3::S3Server;

const TOKEN: &str = "glrt-cache-token";

async fn gitlab() -> GitLabServer {
    let server = GitLabServer::start().await;
    server.add_runner_token(TOKEN);
    server.set_long_poll_timeout(Duration::from_secs(2));
    server.set_trace_interval(1);
    server
}

fn kiln(gitlab: &GitLabServer, cache: &str) -> KilnProcess {
    KilnProcess::start(&config(&gitlab.url(), TOKEN, cache))
}

fn cache(key: &str, paths: &[&str], policy: &str) -> Value {
    json!({"key": key, "untracked": false, "policy": policy, "paths": paths, "when": "on_success", "fallback_keys": []})
}

async fn run(gitlab: &GitLabServer, name: &str, script: &[&str], caches: Value) -> JobRecord {
    let mut job = job_json(name, script);
    job["cache"] = caches;
    let id = gitlab.enqueue(job);
    gitlab
        .wait_for_state(id, &["success", "failed"], Duration::from_secs(90))
        .await
}

/// Whether `text` holds the secret as it is or base64-encoded (the trace masks the plain
/// value, so a build that had it would show it encoded).
fn holds(text: &[u8], secret: &str) -> bool {
    let encoded = base64::engine::general_purpose::STANDARD.encode(secret);
    let has = |needle: &[u8]| text.windows(needle.len()).any(|w| w == needle);
    has(secret.as_bytes()) || has(encoded.as_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pushed_cache_is_restored_with_modes_and_links_and_a_missing_key_falls_back() {
    let s3 = S3Server::start();
    let gitlab = gitlab().await;
    let kiln = kiln(&gitlab, &s3.cache_config(""));

    let a = run(
        &gitlab,
        "save",
        &[
            "mkdir -p deps/lib deps/bin",
            "echo alpha > deps/lib/a.txt",
            "printf '#!/bin/sh\\necho tool ran\\n' > deps/bin/tool",
            "chmod 750 deps/bin/tool",
            "ln -s lib/a.txt deps/link",
            // The whole environment, encoded: masking cannot hide a key this way.
            "env | base64 -w0; echo",
        ],
        json!([cache("deps-v1", &["deps/"], "push")]),
    )
    .await;
    assert_eq!(a.state, "success", "{}\n{}", a.trace, kiln.logs());
    assert!(
        a.trace.contains("Saving cache for successful job"),
        "{}",
        a.trace
    );
    assert!(a.trace.contains("Created cache deps-v1"), "{}", a.trace);
    assert!(
        !a.trace.contains("Restoring cache"),
        "push does not pull:\n{}",
        a.trace
    );
    let objects = s3.objects();
    assert!(
        objects
            .iter()
            .any(|o| o.starts_with("kiln/runner/test/project/42/manifests/deps-v1")),
        "{objects:?}"
    );
    assert!(objects.iter().any(|o| o.contains("/packs/")), "{objects:?}");

    let b = run(
        &gitlab,
        "restore",
        &[
            "cat deps/lib/a.txt",
            "stat -c 'mode %a' deps/bin/tool",
            "readlink deps/link",
            "deps/bin/tool",
        ],
        json!([cache("deps-v1", &["deps/"], "pull")]),
    )
    .await;
    assert_eq!(b.state, "success", "{}", b.trace);
    for expected in [
        "Restoring cache",
        "Checking cache for deps-v1...",
        "Successfully extracted cache",
        "alpha\n",
        "mode 750",
        "lib/a.txt\n",
        "tool ran",
        "Not uploading cache deps-v1 due to policy",
    ] {
        assert!(
            b.trace.contains(expected),
            "{expected:?} missing:\n{}",
            b.trace
        );
    }

    let mut fallback = cache("feature-x", &["deps/"], "pull");
    fallback["fallback_keys"] = json!(["deps-v1"]);
    let c = run(
        &gitlab,
        "fallback",
        &["cat deps/lib/a.txt"],
        json!([fallback]),
    )
    .await;
    assert_eq!(c.state, "success", "{}", c.trace);
    let miss = c
        .trace
        .find("Checking cache for feature-x...")
        .expect("key tried");
    let hit = c
        .trace
        .find("Checking cache for deps-v1...")
        .expect("fallback tried");
    assert!(miss < hit, "{}", c.trace);
    assert!(
        c.trace.contains("Cache for feature-x does not exist"),
        "{}",
        c.trace
    );
    assert!(c.trace.contains("alpha\n"), "{}", c.trace);

    // GitLab is told, so it sends `cache:` and keeps jobs with fallback keys.
    let polls = gitlab.polls();
    assert!(polls[0].declares("cache") && polls[0].declares("fallback_cache_keys"));

    // The storage key is in no trace, no file of the builds' work dirs (job files included)
    // and not in the build's environment (dumped encoded by job A).
    for job in [&a, &b, &c] {
        assert!(
            !holds(job.trace.as_bytes(), &s3.secret_key),
            "{}",
            job.trace
        );
    }
    let env_dump = a
        .trace
        .lines()
        .filter_map(|l| {
            base64::engine::general_purpose::STANDARD
                .decode(l.trim())
                .ok()
        })
        .find(|d| d.windows(4).any(|w| w == b"PATH"))
        .expect("job A printed its environment");
    assert!(!holds(&env_dump, &s3.secret_key));
    for entry in walkdir::WalkDir::new(kiln.work_dir()).into_iter().flatten() {
        if entry.file_type().is_file() {
            let data = std::fs::read(entry.path()).unwrap_or_default();
            assert!(!holds(&data, &s3.secret_key), "{}", entry.path().display());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_job_saves_only_its_on_failure_cache_and_a_job_restores_two_caches() {
    let s3 = S3Server::start();
    let gitlab = gitlab().await;
    let kiln = kiln(&gitlab, &s3.cache_config(""));
    let mut on_failure = cache("reports", &["a/"], "pull-push");
    on_failure["when"] = json!("on_failure");
    let d = run(
        &gitlab,
        "fails",
        &["mkdir -p a b", "echo A > a/f", "echo B > b/f", "exit 1"],
        json!([on_failure, cache("build", &["b/"], "pull-push")]),
    )
    .await;
    assert_eq!(d.state, "failed", "{}\n{}", d.trace, kiln.logs());
    assert!(
        d.trace.contains("Saving cache for failed job"),
        "{}",
        d.trace
    );
    assert!(d.trace.contains("Created cache reports"), "{}", d.trace);
    assert!(!d.trace.contains("Created cache build"), "{}", d.trace);

    let e = run(
        &gitlab,
        "both",
        &["cat a/f", "cat b/f 2>/dev/null || echo no-b"],
        json!([
            cache("reports", &["a/"], "pull"),
            cache("build", &["b/"], "pull")
        ]),
    )
    .await;
    assert_eq!(e.state, "success", "{}", e.trace);
    assert!(e.trace.contains("A\n"), "{}", e.trace);
    assert!(e.trace.contains("no-b"), "{}", e.trace);
    assert!(
        e.trace.contains("Cache for build does not exist"),
        "{}",
        e.trace
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_outage_warns_and_the_job_still_succeeds() {
    let mut s3 = S3Server::start();
    let config = s3.cache_config("");
    s3.stop();
    let gitlab = gitlab().await;
    let kiln = kiln(&gitlab, &config);
    let job = run(
        &gitlab,
        "outage",
        &["mkdir -p deps", "echo x > deps/x", "echo script ran"],
        json!([cache("deps", &["deps/"], "pull-push")]),
    )
    .await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, kiln.logs());
    assert!(job.trace.contains("script ran"), "{}", job.trace);
    assert!(
        job.trace.contains("Failed to extract cache deps"),
        "{}",
        job.trace
    );
    assert!(
        job.trace.contains("Failed to create cache deps"),
        "{}",
        job.trace
    );
}

/// `kiln exec` twice on one project: the second run restores what the first saved (modes and
/// links too); a job whose key has no cache yet restores its fallback key's.
#[test]
fn kiln_exec_restores_in_a_second_run_what_the_first_saved() {
    let project = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let pipeline = |key: &str| {
        format!(
            r#"
warm:
  cache:
    key: {key}
    fallback_keys: [deps-main]
    paths: [deps/]
  script:
    - if [ -f deps/x ]; then echo "restored $(cat deps/x) $(stat -c %a deps/x) $(readlink deps/l)"; else mkdir deps && echo first > deps/x && chmod 700 deps/x && ln -s x deps/l && echo "cold start"; fi
"#
        )
    };
    let exec = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("exec")
            .arg("--cache-dir")
            .arg(cache_dir.path())
            .current_dir(project.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    std::fs::write(project.path().join(".gitlab-ci.yml"), pipeline("deps-main")).unwrap();
    let first = exec();
    assert!(first.contains("cold start"), "{first}");
    assert!(first.contains("Created cache deps-main"), "{first}");
    let second = exec();
    assert!(second.contains("restored first 700 x"), "{second}");
    std::fs::write(
        project.path().join(".gitlab-ci.yml"),
        pipeline("deps-feature"),
    )
    .unwrap();
    let third = exec();
    assert!(
        third.contains("Cache for deps-feature does not exist"),
        "{third}"
    );
    assert!(third.contains("restored first 700 x"), "{third}");
}

/// `kiln check-config` names every wrong or missing cache field with its path.
#[test]
fn check_config_names_every_wrong_cache_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    std::fs::write(
        &path,
        "[cache]\ntype = \"s3\"\nmax_size = \"5 parsecs\"\ncoordinator_url = \"kiln:9252\"\n[cache.s3]\nbucket_name = \"\"\nacess_key = \"typo\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    for field in [
        "cache.s3.acess_key",
        "cache.s3.bucket_name",
        "cache.s3.access_key",
        "cache.s3.secret_key",
        "cache.max_size",
        "cache.coordinator_url",
    ] {
        assert!(text.contains(field), "{field} not named:\n{text}");
    }
}

/// Azure Blob through Azurite: SAS URLs signed by the coordinator, the account key nowhere in
/// the build.
#[tokio::test(flavor = "multi_thread")]
async fn azure_blob_caches_through_sas_urls_on_azurite() {
    let azure = support::azure::AzureServer::start().await;
    let gitlab = gitlab().await;
    let kiln = kiln(&gitlab, &azure.cache_config());
    let a = run(
        &gitlab,
        "save",
        &["mkdir -p deps", "echo azure > deps/x", "ln -s x deps/l"],
        json!([cache("deps", &["deps/"], "push")]),
    )
    .await;
    assert_eq!(a.state, "success", "{}\n{}", a.trace, kiln.logs());
    assert!(
        a.trace.contains("Created cache deps"),
        "{}\n{}",
        a.trace,
        kiln.logs()
    );
    let b = run(
        &gitlab,
        "restore",
        &["cat deps/x", "readlink deps/l"],
        json!([cache("deps", &["deps/"], "pull")]),
    )
    .await;
    assert_eq!(b.state, "success", "{}", b.trace);
    assert!(
        b.trace.contains("Successfully extracted cache"),
        "{}",
        b.trace
    );
    assert!(
        b.trace.contains("azure\n") && b.trace.contains("x\n"),
        "{}",
        b.trace
    );
    for job in [&a, &b] {
        assert!(!holds(job.trace.as_bytes(), &azure.key), "{}", job.trace);
    }
}

/// Asks the coordinator's signing endpoint (in this process) for one URL.
async fn signed_url(
    client: &reqwest::Client,
    url: &str,
    capability: &str,
    method: &str,
    name: &str,
) -> String {
    let answer: Value = client
        .post(format!("{url}/cache/v1/urls"))
        .bearer_auth(capability)
        .json(&json!({"method": method, "names": [name]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["urls"][0].as_str().unwrap().to_owned()
}

/// A restore reads packs with ranged GETs on the pre-signed URL: the signature (S3 SigV4
/// query, Azure SAS) must still verify with a `Range` header, and the server must answer with
/// the range only (206), or a restore downloads whole packs.
async fn a_ranged_get_on_a_signed_url_reads_only_the_range(cache_toml: &str) {
    #[derive(serde::Deserialize)]
    struct Section {
        cache: kiln::cache::config::CacheConfig,
    }
    let config = toml::from_str::<Section>(cache_toml).unwrap().cache;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = std::sync::Arc::new(
        kiln::cache::CacheService::new(&config, listener.local_addr().unwrap()).unwrap(),
    );
    let grant = service.grant("ranged", "7", "1", Duration::from_secs(600));
    tokio::spawn(async move {
        let _ = axum::serve(listener, kiln::cache::service::router(service)).await;
    });
    let kiln::cache::CacheAccess::Signed { url, capability } = grant.access else {
        panic!("an object store grants signed URLs");
    };
    let client = reqwest::Client::new();
    let name = format!("packs/{}", "ab".repeat(32));
    let put = signed_url(&client, &url, &capability, "PUT", &name).await;
    let stored = client
        .put(&put)
        .header("x-ms-blob-type", "BlockBlob")
        .body("0123456789")
        .send()
        .await
        .unwrap();
    assert!(stored.status().is_success(), "{}", stored.status());
    let get = signed_url(&client, &url, &capability, "GET", &name).await;
    let ranged = client
        .get(&get)
        .header("Range", "bytes=2-5")
        .send()
        .await
        .unwrap();
    let status = ranged.status();
    assert_eq!(status, 206, "{}", ranged.text().await.unwrap());
    assert_eq!(ranged.text().await.unwrap(), "2345");
}

#[tokio::test(flavor = "multi_thread")]
async fn ranged_gets_verify_on_s3s_fs_and_azurite() {
    let s3 = S3Server::start();
    a_ranged_get_on_a_signed_url_reads_only_the_range(&s3.cache_config("")).await;
    let azure = support::azure::AzureServer::start().await;
    a_ranged_get_on_a_signed_url_reads_only_the_range(&azure.cache_config()).await;
}
