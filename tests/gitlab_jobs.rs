//! End to end: a real `kiln run` process against the GitLab test server, the agent running each
//! job as a child process (local executor). Each test pins one behaviour users rely on.

use crate::support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::gitlab::{GitLabServer, job_json};
use support::kiln::{KilnProcess, agent_pids, config, send_signal};

const TOKEN: &str = "glrt-fake-token";

async fn server() -> GitLabServer {
    let server = GitLabServer::start().await;
    server.add_runner_token(TOKEN);
    server.set_long_poll_timeout(Duration::from_secs(2));
    server.set_trace_interval(1);
    server
}

/// Waits up to `secs` for job `id` to succeed or fail.
async fn finished(gitlab: &GitLabServer, id: u64, secs: u64) -> support::gitlab::JobRecord {
    gitlab
        .wait_for_state(id, &["success", "failed"], Duration::from_secs(secs))
        .await
}

fn kiln(server: &GitLabServer, extra: &str) -> KilnProcess {
    KilnProcess::start(&config(&server.url(), TOKEN, extra))
}

fn step(name: &str, script: &[&str], when: &str, allow_failure: bool) -> serde_json::Value {
    json!({"name": name, "script": script, "timeout": 3600, "when": when, "allow_failure": allow_failure})
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_script_runs_after_script_and_reports_script_failure() {
    let gitlab = server().await;
    let mut job = job_json("fails", &[]);
    job["steps"] = json!([
        step(
            "script",
            &["echo one", "exit 3", "echo never"],
            "on_success",
            false
        ),
        step(
            "after_script",
            &["echo after: $CI_JOB_STATUS"],
            "always",
            true
        ),
    ]);
    let id = gitlab.enqueue(job);
    let kiln = kiln(&gitlab, "");
    let job = finished(&gitlab, id, 60).await;
    assert_eq!(job.state, "failed", "{}", kiln.logs());
    assert_eq!(job.failure_reason.as_deref(), Some("script_failure"));
    assert_eq!(job.exit_code, Some(3));
    assert!(job.trace.contains("one\n"), "{}", job.trace);
    assert!(!job.trace.contains("never\n"), "{}", job.trace);
    assert!(job.trace.contains("after: failed"), "{}", job.trace);
    assert!(
        job.trace.contains("section_start:") && job.trace.contains("step_script"),
        "{}",
        job.trace
    );
    assert!(gitlab.violations().is_empty(), "{:?}", gitlab.violations());
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_step_failure_does_not_fail_the_job() {
    let gitlab = server().await;
    let mut job = job_json("allowed", &[]);
    job["steps"] = json!([
        step("script", &["exit 1"], "on_success", true),
        step("release", &["echo release ran"], "on_success", false),
    ]);
    let id = gitlab.enqueue(job);
    let _kiln = kiln(&gitlab, "");
    let job = finished(&gitlab, id, 60).await;
    assert_eq!(job.state, "success", "{}", job.trace);
    assert!(job.trace.contains("allowed to fail"), "{}", job.trace);
    assert!(job.trace.contains("release ran"), "{}", job.trace);
}

#[tokio::test(flavor = "multi_thread")]
async fn job_timeout_kills_the_script_and_reports_job_execution_timeout() {
    let gitlab = server().await;
    let mut job = job_json("slow", &["echo start", "sleep 60"]);
    job["runner_info"]["timeout"] = json!(2);
    let id = gitlab.enqueue(job);
    let kiln = kiln(&gitlab, "");
    let started = Instant::now();
    let job = finished(&gitlab, id, 40).await;
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(job.state, "failed");
    assert_eq!(
        job.failure_reason.as_deref(),
        Some("job_execution_timeout"),
        "{}",
        kiln.logs()
    );
    assert!(
        job.trace.contains("execution took longer than 2s"),
        "{}",
        job.trace
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_cancel_stops_the_script_and_runs_after_script() {
    let gitlab = server().await;
    let mut job = job_json("cancel-me", &[]);
    job["steps"] = json!([
        step(
            "script",
            &["echo started", "sleep 60", "echo never"],
            "on_success",
            false
        ),
        step(
            "after_script",
            &["echo cleanup: $CI_JOB_STATUS"],
            "always",
            true
        ),
    ]);
    let id = gitlab.enqueue(job);
    let kiln = kiln(&gitlab, "");
    wait_trace(&gitlab, id, "started", &kiln).await;
    gitlab.cancel(id, true);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !gitlab.job(id).trace.contains("cleanup: canceled")
        || !agent_pids(&kiln.work_dir()).is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "trace:\n{}\nlog:\n{}",
            gitlab.job(id).trace,
            kiln.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!gitlab.job(id).trace.contains("never"));
}

async fn wait_trace(gitlab: &GitLabServer, id: u64, text: &str, kiln: &KilnProcess) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !gitlab.job(id).trace.contains(text) {
        assert!(
            Instant::now() < deadline,
            "`{text}` never reached the trace:\n{}\nlog:\n{}",
            gitlab.job(id).trace,
            kiln.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn trace_resumes_from_gitlabs_offset_after_416() {
    let gitlab = server().await;
    let id = gitlab.enqueue(job_json(
        "resume",
        &["for i in 1 2 3 4 5 6; do echo line-$i; sleep 0.5; done"],
    ));
    let kiln = kiln(&gitlab, "");
    wait_trace(&gitlab, id, "line-2", &kiln).await;
    gitlab.inject_trace_416(id);
    let job = finished(&gitlab, id, 60).await;
    assert_eq!(job.state, "success", "{}", job.trace);
    assert!(
        job.patches.iter().any(|p| p.status == 416),
        "no 416 was answered"
    );
    for i in 1..=6 {
        assert_eq!(
            job.trace.matches(&format!("line-{i}\n")).count(),
            1,
            "line-{i}:\n{}",
            job.trace
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn masked_secret_split_across_patches_never_reaches_the_trace() {
    let gitlab = server().await;
    // The fragments come from plain variables so the echoed command line does not contain them.
    let mut job = job_json(
        "masking",
        &[
            "printf 'token is %s' \"$PART1\"; sleep 2.5; printf '%s and glpat-' \"$PART2\"; sleep 2.5; printf '%s done\\n' \"$PART3\"",
        ],
    );
    let vars = job["variables"].as_array_mut().unwrap();
    vars.push(json!({"key": "DEPLOY_SECRET", "value": "s3cr3t-v4lue-xyz", "public": false, "masked": true}));
    vars.push(json!({"key": "PART1", "value": "s3cr3t-", "public": true}));
    vars.push(json!({"key": "PART2", "value": "v4lue-xyz", "public": true}));
    vars.push(json!({"key": "PART3", "value": "AbCdEf123", "public": true}));
    job["features"]["token_mask_prefixes"] = json!(["glpat-"]);
    let id = gitlab.enqueue(job);
    let _kiln = kiln(&gitlab, "");
    let job = finished(&gitlab, id, 60).await;
    assert_eq!(job.state, "success", "{}", job.trace);
    assert!(
        job.patches.len() >= 3,
        "expected several patches, got {}",
        job.patches.len()
    );
    assert!(
        job.trace
            .contains("token is [MASKED] and glpat-[MASKED] done"),
        "{}",
        job.trace
    );
    assert!(!job.trace.contains("s3cr3t"), "{}", job.trace);
    assert!(!job.trace.contains("AbCdEf123"), "{}", job.trace);
    // The job token never appears either.
    assert!(!job.trace.contains(&job.token), "{}", job.trace);
}

#[tokio::test(flavor = "multi_thread")]
async fn final_update_waits_out_202_and_resends_the_trace_after_412() {
    let gitlab = server().await;
    let id = gitlab.enqueue(job_json("persist", &["echo payload-line"]));
    gitlab.inject_update_202(id, 2);
    gitlab.inject_update_412_once(id);
    let _kiln = kiln(&gitlab, "");
    let job = finished(&gitlab, id, 60).await;
    assert_eq!(job.state, "success", "{}", job.trace);
    assert!(
        job.final_updates.len() >= 4,
        "final updates: {:?}",
        job.final_updates
    );
    assert!(
        job.patches.iter().filter(|p| p.start == 0).count() >= 2,
        "trace was not resent from 0"
    );
    assert_eq!(
        job.trace.matches("payload-line\n").count(),
        1,
        "{}",
        job.trace
    );
    let last = job.final_updates.last().unwrap();
    assert_eq!(
        last["output"]["checksum"],
        json!(format!("crc32:{:08x}", crc32fast::hash(&job.trace_bytes)))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_agent_fails_the_job_as_runner_system_failure() {
    let gitlab = server().await;
    let id = gitlab.enqueue(job_json("victim", &["echo started", "sleep 60"]));
    let kiln = kiln(&gitlab, "");
    wait_trace(&gitlab, id, "started", &kiln).await;
    let pids = agent_pids(&kiln.work_dir());
    assert_eq!(pids.len(), 1, "{pids:?}");
    send_signal(pids[0], "KILL");
    let job = finished(&gitlab, id, 30).await;
    assert_eq!(
        job.failure_reason.as_deref(),
        Some("runner_system_failure"),
        "{}",
        kiln.logs()
    );
    assert!(job.trace.contains("killed by signal 9"), "{}", job.trace);
    // The script's `sleep` died with it, and the work directory is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(kiln.work_dir())
        .map(|d| d.count())
        .unwrap_or(0)
        > 0
    {
        assert!(Instant::now() < deadline, "work directory left behind");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn never_more_running_than_concurrent() {
    let gitlab = server().await;
    let ids: Vec<u64> = (0..6)
        .map(|i| gitlab.enqueue(job_json(&format!("j{i}"), &["sleep 1"])))
        .collect();
    let _kiln = kiln(&gitlab, "concurrent = 2");
    for id in ids {
        let job = finished(&gitlab, id, 90).await;
        assert_eq!(job.state, "success", "{}", job.trace);
    }
    assert_eq!(gitlab.max_running_observed(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_token_pauses_the_runner_loudly() {
    let gitlab = server().await;
    gitlab.revoke(TOKEN);
    let kiln = kiln(&gitlab, "");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = kiln.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("paused"), "{body}");
    let (_, metrics) = kiln.get("/metrics").await;
    assert!(
        metrics.contains("kiln_runner_paused{runner=\"test\"} 1"),
        "{metrics}"
    );
    assert!(kiln.logs().contains("PAUSED"), "{}", kiln.logs());
    assert!(
        gitlab.polls().len() <= 1,
        "a paused runner kept polling: {}",
        gitlab.polls().len()
    );
    // The status page names the runner but never shows its token.
    let (_, page) = kiln.get("/").await;
    assert!(page.contains("test") && !page.contains(TOKEN), "{page}");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_runner_long_polls_with_last_update_and_declares_features() {
    let gitlab = server().await;
    let kiln = kiln(&gitlab, "");
    tokio::time::sleep(Duration::from_secs(7)).await;
    let polls = gitlab.polls();
    assert!(
        (2..=5).contains(&polls.len()),
        "{} polls in 7s with a 2s hold",
        polls.len()
    );
    assert!(
        polls[1..].iter().all(|p| p.last_update.is_some()),
        "later polls must send last_update"
    );
    assert!(
        polls[0].declares("refspecs")
            && polls[0].declares("masking")
            && polls[0].declares("trace_checksum")
    );
    assert!(
        !polls[0].declares("image"),
        "the local executor does not run images"
    );
    let (status, _) = kiln.get("/readyz").await;
    assert_eq!(status, 200);
    let (_, metrics) = kiln.get("/metrics").await;
    assert!(
        metrics.contains("kiln_gitlab_job_requests_total{runner=\"test\",result=\"no_job\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limited_request_waits_for_retry_after() {
    let gitlab = server().await;
    gitlab.inject_request_status(429, 1, Some(3));
    let id = gitlab.enqueue(job_json("after-429", &["echo ok"]));
    let _kiln = kiln(&gitlab, "");
    let job = finished(&gitlab, id, 30).await;
    assert_eq!(job.state, "success");
    let polls = gitlab.polls();
    assert_eq!(polls[0].status, Some(429));
    assert!(
        polls[1].at.duration_since(polls[0].at) >= Duration::from_millis(2900),
        "retried too early"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dependency_artifacts_are_downloaded_without_leaking_the_token_to_storage() {
    let gitlab = server().await;
    gitlab.set_artifact_redirect(true);
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    zip.start_file("build/app.txt", zip::write::SimpleFileOptions::default())
        .unwrap();
    std::io::Write::write_all(&mut zip, b"from the build job").unwrap();
    let archive = zip.finish().unwrap().into_inner();
    let dependency = gitlab.store_artifact(900, archive);
    let mut job = job_json("uses-build", &["cat build/app.txt"]);
    job["dependencies"] = json!([dependency]);
    let id = gitlab.enqueue(job);
    let _kiln = kiln(&gitlab, "");
    let job = finished(&gitlab, id, 30).await;
    assert_eq!(job.state, "success", "{}", job.trace);
    assert!(job.trace.contains("from the build job"), "{}", job.trace);
    let storage = gitlab.storage_requests();
    assert!(
        !storage.is_empty() && storage.iter().all(|r| !r.had_job_token),
        "token sent to storage"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_then_cancels_jobs_past_the_grace_period() {
    let gitlab = server().await;
    let quick = gitlab.enqueue(job_json("quick", &["sleep 1", "echo quick done"]));
    let stuck = gitlab.enqueue(job_json("stuck", &["echo stuck started", "sleep 120"]));
    let mut kiln = kiln(&gitlab, "shutdown_timeout = \"3s\"");
    wait_trace(&gitlab, stuck, "stuck started", &kiln).await;
    assert!(
        kiln.terminate(Duration::from_secs(60)),
        "kiln did not exit:\n{}",
        kiln.logs()
    );
    assert_eq!(
        gitlab.job(quick).state,
        "success",
        "{}",
        gitlab.job(quick).trace
    );
    let stuck = gitlab.job(stuck);
    assert_eq!(stuck.state, "failed");
    assert_eq!(
        stuck.failure_reason.as_deref(),
        Some("runner_system_failure"),
        "{}",
        stuck.trace
    );
    assert!(stuck.trace.contains("shutting down"), "{}", stuck.trace);
    assert!(agent_pids(&kiln.work_dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn artifacts_respect_when_exclude_and_expire_in() {
    let gitlab = server().await;
    let mut job = job_json(
        "artifacts",
        &[
            "mkdir -p out/tmp",
            "echo a > out/a.txt",
            "echo t > out/tmp/t.o",
            "echo l > fail.log",
            "exit 1",
        ],
    );
    job["artifacts"] = json!([
        {"name": "bin", "paths": ["out/"], "exclude": ["out/tmp/**"], "when": "on_failure", "artifact_type": "archive", "artifact_format": "zip", "expire_in": "1 week"},
        {"paths": ["fail.log"], "when": "on_success", "artifact_type": "archive", "artifact_format": "zip"}
    ]);
    let id = gitlab.enqueue(job);
    let _kiln = kiln(&gitlab, "");
    let job = finished(&gitlab, id, 30).await;
    assert_eq!(job.state, "failed");
    assert_eq!(
        job.artifacts.len(),
        1,
        "only the on_failure artifact is uploaded"
    );
    let upload = &job.artifacts[0];
    assert_eq!(
        upload.query.get("expire_in").map(String::as_str),
        Some("1 week")
    );
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(upload.bytes.clone())).unwrap();
    let names: Vec<String> = (0..archive.len())
        .map(|i| archive.by_index(i).unwrap().name().to_owned())
        .collect();
    assert_eq!(names, ["out/a.txt"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn clones_the_repository_at_the_jobs_commit() {
    let gitlab = server().await;
    let repo = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| support::kiln::git(repo.path(), args);
    git(&["init", "-q", "-b", "main"]);
    git(&["commit", "-q", "--allow-empty", "-m", "one"]);
    std::fs::write(repo.path().join("hello.txt"), "v2").unwrap();
    git(&["add", "hello.txt"]);
    git(&["commit", "-q", "-m", "two"]);
    let sha = git(&["rev-parse", "HEAD"]);
    support::kiln::give_repository_to_builds(repo.path());
    let mut job = job_json("clone", &["cat hello.txt", "git log --oneline | wc -l"]);
    job["git_info"]["repo_url"] = json!(format!("file://{}", repo.path().display()));
    job["git_info"]["sha"] = json!(sha);
    job["git_info"]["depth"] = json!(1);
    let id = gitlab.enqueue(job);
    let _kiln = kiln(&gitlab, "");
    let job = finished(&gitlab, id, 30).await;
    assert_eq!(job.state, "success", "{}", job.trace);
    assert!(job.trace.contains("v2"), "{}", job.trace);
    assert!(
        job.trace.contains("\n1\n"),
        "depth 1 gives one commit:\n{}",
        job.trace
    );
}

/// A job on the local executor goes after kiln's secrets the way a hostile workflow would:
/// up `$PPID` to kiln, then its environment, its command line's config file, and a signal.
/// As root kiln runs the build as `nobody`, which gets none of it; in every case the runner
/// token (here in kiln's environment) is masked in the trace, though the build never held it.
#[tokio::test(flavor = "multi_thread")]
async fn a_local_build_cannot_read_or_signal_kiln_and_never_shows_its_token() {
    const LONG_TOKEN: &str = "runner-isolation_0123456789abcdef";
    let gitlab = GitLabServer::start().await;
    gitlab.add_runner_token(LONG_TOKEN);
    gitlab.set_long_poll_timeout(Duration::from_secs(2));
    gitlab.set_trace_interval(1);
    // Outcomes are printed through `$NO`/`$YES`, so the echoed commands never match them.
    let probe = [
        "NO=refused; YES=allowed",
        "KILN_PID=$(cut -d' ' -f4 /proc/$PPID/stat)",
        "echo \"kiln is $KILN_PID\"",
        "tr '\\0' '\\n' < /proc/$KILN_PID/environ || echo \"environ $NO\"",
        "CONFIG=$(tr '\\0' '\\n' < /proc/$KILN_PID/cmdline | tail -n 1)",
        "cat \"$CONFIG\" || echo \"config $NO\"",
        "kill -0 $KILN_PID && echo \"signal $YES\" || echo \"signal $NO\"",
        &format!("echo \"and the token, literally: {LONG_TOKEN}\""),
        "echo \"uid $(id -u)\"",
    ];
    let id = gitlab.enqueue(job_json("probe", &probe));
    let _kiln = KilnProcess::start_with_env(
        &config(&gitlab.url(), "set-by-the-environment", ""),
        &[("KILN_SOURCES__GITLAB__0__TOKEN", LONG_TOKEN)],
    );
    let job = finished(&gitlab, id, 60).await;
    assert_eq!(job.state, "success", "{}", job.trace);
    assert!(!job.trace.contains(LONG_TOKEN), "{}", job.trace);
    assert!(
        job.trace.contains("and the token, literally: [MASKED]"),
        "{}",
        job.trace
    );
    if nix::unistd::geteuid().is_root() {
        for seen in [
            "environ refused",
            "config refused",
            "signal refused",
            "uid 65534",
        ] {
            assert!(job.trace.contains(seen), "no {seen:?} in:\n{}", job.trace);
        }
        assert!(!job.trace.contains("signal allowed"), "{}", job.trace);
    }
}
