//! Hostile input: whatever arrives — a `.gitlab-ci.yml`, a `kiln.toml`, a job payload from
//! GitLab, a webhook — kiln does not panic, does not grow without bound, and answers with an
//! error that names the input. Property tests (proptest) for the parsers; end to end for what
//! arrives over HTTP. The limits each input meets are listed in `docs/reliability.md`.

use crate::support;

use std::time::{Duration, Instant};

use proptest::prelude::*;

/// A `.gitlab-ci.yml` the way a confused or malicious author writes it: keys, anchors,
/// aliases, tags, flow collections and garbage.
fn pipeline_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("stages: [a, b]\n".to_owned()),
        Just("job:\n  script: [echo hi]\n".to_owned()),
        Just("x: &a [1, 2]\ny: *a\n".to_owned()),
        Just("y: *missing\n".to_owned()),
        Just("t:\n  extends: t\n  script: [x]\n".to_owned()),
        Just("r:\n  script: !reference [r, script]\n".to_owned()),
        Just("include: .gitlab-ci.yml\n".to_owned()),
        Just("include: [{local: '../../etc/passwd'}]\n".to_owned()),
        Just("default: {image: 5}\n".to_owned()),
        Just("j:\n  rules: [{if: '$A =~ /('}]\n  script: [x]\n".to_owned()),
        Just("j: {script: {a: b}, needs: [nope]}\n".to_owned()),
        Just("\t- tab\n".to_owned()),
        "[a-z:{}\\[\\],&*!'\" \n-]{0,40}",
    ];
    proptest::collection::vec(piece, 0..8).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_pipeline_file_is_read_or_refused_by_name(text in pipeline_text()) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".gitlab-ci.yml"), &text).unwrap();
        let started = Instant::now();
        let read = kiln::pipeline::parse_str(&text, ".gitlab-ci.yml", dir.path(), &[]);
        prop_assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        if let Err(e) = read {
            let message = e.to_string();
            prop_assert!(!message.trim().is_empty());
            prop_assert!(message.len() < 4096, "an error of {} bytes", message.len());
        }
    }

    #[test]
    fn any_config_file_is_loaded_or_refused_naming_the_file(text in "[a-z_\\[\\]=\"{}.,0-9 \n#]{0,200}") {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, &text).unwrap();
        if let Err(e) = kiln::config::Config::load_with_env(Some(&path), Vec::new()) {
            prop_assert!(e.to_string().contains("kiln.toml"), "{e}");
        }
    }
}

/// Nesting deep enough to overflow a recursive parser's stack, in each text format kiln reads.
#[test]
fn deep_nesting_is_refused_not_a_stack_overflow() {
    let deep = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!("job:\n  script: {}{}\n", "[".repeat(deep), "]".repeat(deep));
    let err = kiln::pipeline::parse_str(&yaml, ".gitlab-ci.yml", dir.path(), &[])
        .expect_err("refused")
        .to_string();
    assert!(err.contains(".gitlab-ci.yml"), "{err}");

    let path = dir.path().join("kiln.toml");
    std::fs::write(
        &path,
        format!("a = {}{}\n", "[".repeat(deep), "]".repeat(deep)),
    )
    .unwrap();
    let err = kiln::config::Config::load_with_env(Some(&path), Vec::new())
        .expect_err("refused")
        .to_string();
    assert!(err.contains("kiln.toml"), "{err}");
}

/// A billion laughs, recursive `extends`, a `!reference` cycle and a file that includes itself:
/// each is refused quickly, naming the job or file.
#[test]
fn recursive_pipelines_are_refused_quickly_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        bomb.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    bomb.push_str("job:\n  script: [echo]\n");
    let cases = [
        (bomb.as_str(), ".gitlab-ci.yml"),
        ("a:\n  extends: b\n  script: [x]\nb:\n  extends: a\n", "a"),
        (
            "a:\n  script: !reference [b, script]\nb:\n  script: !reference [a, script]\n",
            "script",
        ),
        (
            "include: .gitlab-ci.yml\njob:\n  script: [x]\n",
            ".gitlab-ci.yml",
        ),
    ];
    for (text, names) in cases {
        std::fs::write(dir.path().join(".gitlab-ci.yml"), text).unwrap();
        let started = Instant::now();
        let read = kiln::pipeline::parse_str(text, ".gitlab-ci.yml", dir.path(), &[]);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{text}: {:?}",
            started.elapsed()
        );
        match read {
            Err(e) => assert!(e.to_string().contains(names), "{text}: {e}"),
            // A file that includes itself is read once (the include loop ends): that it came
            // back at all, in time, is the point.
            Ok(_) => assert!(text.starts_with("include"), "{text}: accepted"),
        }
    }
}

/// GitLab job payloads with fields removed or of the wrong type, seeded: kiln fails each job it
/// cannot run (or runs it), never leaves one assigned and idle, and stays up.
#[tokio::test(flavor = "multi_thread")]
async fn mangled_job_payloads_from_gitlab_end_every_job_and_kiln_stays_up() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::{Value, json};
    use support::gitlab::{GitLabServer, job_json};
    use support::kiln::{KilnProcess, config};

    let seed = support::faults::seed(23);
    let mut rng = StdRng::seed_from_u64(seed);
    let gitlab = GitLabServer::start().await;
    gitlab.add_runner_token("glrt-hostile-token");
    gitlab.set_long_poll_timeout(Duration::from_secs(1));
    let wrong = [
        json!(null),
        json!(7),
        json!("text"),
        json!([1, "a"]),
        json!({"x": {}}),
        json!(-1.5e300),
        json!(1e20),
        json!(18_446_744_073_709_551_615u64),
    ];
    let mut ids = Vec::new();
    for i in 0..30 {
        let mut job = job_json(&format!("mangled {i}"), &["echo ran"]);
        // One to three manglings anywhere in the tree (never `id`/`token`, which the test
        // GitLab hands out itself).
        for _ in 0..rng.random_range(1..=3) {
            let mut at = &mut job;
            loop {
                let keys: Vec<String> = match at {
                    Value::Object(map) => map
                        .keys()
                        .filter(|k| *k != "id" && *k != "token")
                        .cloned()
                        .collect(),
                    _ => Vec::new(),
                };
                if keys.is_empty() || rng.random_bool(0.4) {
                    break;
                }
                let key = keys[rng.random_range(0..keys.len())].clone();
                if !at[&key].is_object() || rng.random_bool(0.5) {
                    match rng.random_range(0..3) {
                        0 => {
                            at.as_object_mut().unwrap().remove(&key);
                        }
                        1 => at[&key] = wrong[rng.random_range(0..wrong.len())].clone(),
                        _ => at[&key] = json!("é\u{0}\u{202e}".repeat(rng.random_range(1..2000))),
                    }
                    break;
                }
                at = &mut at[&key];
            }
        }
        ids.push(gitlab.enqueue(job));
    }
    let kiln = KilnProcess::start(&config(
        &gitlab.url(),
        "glrt-hostile-token",
        "concurrent = 5",
    ));
    for id in &ids {
        let job = gitlab
            .wait_for_state(*id, &["success", "failed"], Duration::from_secs(90))
            .await;
        if job.state == "failed" {
            assert!(
                job.failure_reason.is_some(),
                "job {id} failed without a reason"
            );
        }
    }
    let (status, _) = kiln.get("/healthz").await;
    assert_eq!(status, 200);
    let logs = kiln.logs();
    assert!(!logs.contains("panicked"), "[seed {seed}] {logs}");
}

/// The webhook endpoints' head limit: a request head over 16 KiB is refused with 431 (or the
/// connection closed), and kiln goes on serving.
#[tokio::test(flavor = "multi_thread")]
async fn webhook_endpoints_refuse_request_heads_over_the_limit() {
    use std::io::{Read, Write};
    use support::gitlab::GitLabServer;
    use support::kiln::{KilnProcess, config};

    let gitlab = GitLabServer::start().await;
    gitlab.add_runner_token("glrt-hostile-token");
    let kiln = KilnProcess::start(&config(&gitlab.url(), "glrt-hostile-token", ""));
    for path in ["/hooks/github", "/hooks/jenkins"] {
        let mut stream = std::net::TcpStream::connect(&kiln.http).unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: kiln\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let _ = stream.write_all(head.as_bytes());
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "{path}: {answer}"
        );
    }
    let (status, _) = kiln.get("/healthz").await;
    assert_eq!(status, 200);
}

/// `workflow_job` and Jenkins webhook deliveries, signed with the right secret but mangled the
/// way a buggy proxy or a malicious insider would (wrong types, huge numbers, unknown actions,
/// unicode, truncation), go through the real handlers and the GitHub source's loop: each is
/// answered with a status below 500, and kiln stays up without a panic.
#[tokio::test(flavor = "multi_thread")]
async fn mangled_webhook_deliveries_are_answered_and_kiln_stays_up() {
    use hmac::{Hmac, Mac};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::json;
    use support::github::{Access, GitHubServer};
    use support::gitlab::GitLabServer;
    use support::kiln::{KilnProcess, config};

    const SECRET: &str = "hostile-webhook-secret-0123456789";
    let seed = support::faults::seed(29);
    let mut rng = StdRng::seed_from_u64(seed);
    let github = GitHubServer::start().await;
    github.add_repo("acme/widgets");
    github.add_pat("github_pat_hostile_0123456789", "acme", Access::all());
    let gitlab = GitLabServer::start().await;
    gitlab.add_runner_token("glrt-hostile-token");
    let kiln = KilnProcess::start(&config(
        &gitlab.url(),
        "glrt-hostile-token",
        &format!(
            "[[sources.github]]\napi_url = \"{}\"\nowner = \"acme\"\nrepo = \"widgets\"\ntoken = \"github_pat_hostile_0123456789\"\nlabels = [\"kiln\"]\nwebhook_secret = \"{SECRET}\"\n\n[[sources.jenkins]]\nurl = \"http://127.0.0.1:9/\"\nuser = \"kiln\"\ntoken = \"t\"\nlabels = [\"linux\"]\nwebhook_secret = \"{SECRET}\"\n",
            github.url()
        ),
    ));
    let wrong = [
        json!(null),
        json!(-1),
        json!(1e20),
        json!(18_446_744_073_709_551_615u64),
        json!("é\u{0}\u{202e}"),
        json!([1, "a", {}]),
        json!({"x": {}}),
    ];
    let client = reqwest::Client::new();
    for i in 0..150u64 {
        let action =
            ["queued", "in_progress", "completed", "waiting", "??"][rng.random_range(0..5)];
        let mut event = json!({
            "action": action,
            "workflow_job": {"id": 1000 + i, "run_id": 7, "run_attempt": 1, "labels": ["self-hosted", "nope"],
                             "runner_name": format!("kiln-gh-{}", 1000 + i), "name": "build", "html_url": "https://github.com/acme/widgets/actions/runs/7"},
            "repository": {"full_name": "acme/widgets"},
            "organization": {"login": "acme"},
        });
        for _ in 0..rng.random_range(0..=3) {
            let section = ["workflow_job", "repository", "organization"][rng.random_range(0..3)];
            let keys: Vec<String> = event[section]
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            if keys.is_empty() {
                continue;
            }
            let key = keys[rng.random_range(0..keys.len())].clone();
            event[section][&key] = wrong[rng.random_range(0..wrong.len())].clone();
        }
        let mut body = serde_json::to_vec(&event).unwrap();
        if rng.random_bool(0.1) {
            body.truncate(rng.random_range(0..body.len()));
        }
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(&body);
        let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        let answer = client
            .post(format!("http://{}/hooks/github", kiln.http))
            .header("X-GitHub-Event", "workflow_job")
            .header("X-GitHub-Delivery", format!("delivery-{i}"))
            .header("X-Hub-Signature-256", signature)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = answer.status().as_u16();
        assert!(status < 500, "[seed {seed}] delivery {i}: {status}");
        let answer = client
            .post(format!("http://{}/hooks/jenkins", kiln.http))
            .header("X-Kiln-Webhook-Secret", SECRET)
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(answer.status().as_u16() < 500, "[seed {seed}] jenkins {i}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = kiln.get("/healthz").await;
    assert_eq!(status, 200);
    let logs = kiln.logs();
    assert!(!logs.contains("panicked"), "[seed {seed}] {logs}");
}
