//! End to end: the job features a team moving from gitlab-runner relies on inside the build —
//! submodules by relative URL and LFS over GitLab's smart HTTP, `GET_SOURCES_ATTEMPTS`,
//! `artifacts:name`, multi-member gzip reports, `CI_DEBUG_TRACE` with masking, `CI_JOB_STATUS`,
//! variables larger than one environment entry — on the local executor and on the Kubernetes
//! test server, each a real `kiln run` against the test GitLab.

use crate::support;

use std::io::Read;
use std::time::Duration;

use serde_json::{Value, json};
use support::git_http::ProjectFile;
use support::gitlab::{GitLabServer, JobRecord, job_json};
use support::kiln::{KilnProcess, config};

const TOKEN: &str = "glrt-fake-token";

/// Where the job runs.
#[derive(Debug, Clone, Copy)]
enum Executor {
    Local,
    Kubernetes,
}

/// A GitLab and a kiln running its jobs on one executor.
struct Bench {
    servers: Servers,
    kiln: Option<KilnProcess>,
}

enum Servers {
    Local(GitLabServer),
    Kubernetes(crate::kubernetes_jobs::Setup),
}

impl Bench {
    async fn start(executor: Executor) -> Self {
        let servers = match executor {
            Executor::Local => {
                let gitlab = GitLabServer::start().await;
                gitlab.add_runner_token(TOKEN);
                gitlab.set_long_poll_timeout(Duration::from_secs(2));
                gitlab.set_trace_interval(1);
                Servers::Local(gitlab)
            }
            Executor::Kubernetes => Servers::Kubernetes(crate::kubernetes_jobs::setup().await),
        };
        Self {
            servers,
            kiln: None,
        }
    }

    fn gitlab(&self) -> &GitLabServer {
        match &self.servers {
            Servers::Local(gitlab) => gitlab,
            Servers::Kubernetes(setup) => &setup.gitlab,
        }
    }

    fn run(&mut self) {
        self.kiln = Some(match &self.servers {
            Servers::Local(gitlab) => KilnProcess::start(&config(&gitlab.url(), TOKEN, "")),
            Servers::Kubernetes(setup) => setup.kiln("", ""),
        });
    }

    async fn finished(&self, id: u64) -> JobRecord {
        let job = self
            .gitlab()
            .wait_for_state(
                id,
                &["success", "failed", "canceled"],
                Duration::from_secs(120),
            )
            .await;
        assert!(
            matches!(job.state.as_str(), "success" | "failed"),
            "{}\n{}",
            job.trace,
            self.logs()
        );
        job
    }

    fn logs(&self) -> String {
        self.kiln
            .as_ref()
            .map(KilnProcess::logs)
            .unwrap_or_default()
    }
}

fn variable(key: &str, value: &str, masked: bool) -> Value {
    json!({"key": key, "value": value, "public": !masked, "file": false, "masked": masked, "raw": false})
}

fn add_variables(job: &mut Value, variables: &[Value]) {
    let list = job["variables"].as_array_mut().unwrap();
    list.extend(variables.iter().cloned());
}

fn file<'a>(path: &'a str, content: &'a [u8], lfs: bool) -> ProjectFile<'a> {
    ProjectFile { path, content, lfs }
}

/// `kiln/demo` with an LFS file and submodule `lib` (`../lib.git`), which has submodule `deep`
/// (`../deep.git`); returns the demo commit.
fn hosted_project(gitlab: &GitLabServer, lfs_content: &[u8]) -> String {
    support::tools::git_lfs();
    let deep = gitlab.create_project("kiln/deep", &[file("deep.txt", b"deep file\n", false)], &[]);
    let lib = gitlab.create_project(
        "kiln/lib",
        &[file("lib.txt", b"lib file\n", false)],
        &[("deep", "../deep.git", &deep)],
    );
    gitlab.create_project(
        "kiln/demo",
        &[
            file("README.md", b"demo\n", false),
            file("assets/model.bin", lfs_content, true),
        ],
        &[("lib", "../lib.git", &lib)],
    )
}

async fn sources_are_checked_out_complete_after_two_failed_fetches(executor: Executor) {
    let mut bench = Bench::start(executor).await;
    let lfs_content = b"LFS object content, not a pointer\n";
    let sha = hosted_project(bench.gitlab(), lfs_content);
    let mut job = job_json(
        "checkout",
        &[
            "cat assets/model.bin",
            "cat lib/lib.txt lib/deep/deep.txt",
            "echo lib-shallow=$(git -C lib rev-parse --is-shallow-repository)",
        ],
    );
    job["git_info"]["sha"] = json!(sha);
    job["git_info"]["depth"] = json!(1);
    add_variables(
        &mut job,
        &[
            variable("GIT_SUBMODULE_STRATEGY", "recursive", false),
            variable("GIT_SUBMODULE_DEPTH", "1", false),
            variable("GET_SOURCES_ATTEMPTS", "3", false),
        ],
    );
    bench.gitlab().fail_git_fetches(2);
    let id = bench.gitlab().enqueue(job);
    bench.run();
    let job = bench.finished(id).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, bench.logs());
    assert!(
        job.trace
            .contains(std::str::from_utf8(lfs_content).unwrap()),
        "the LFS file is its content: {}",
        job.trace
    );
    assert!(job.trace.contains("lib file\ndeep file\n"), "{}", job.trace);
    assert!(job.trace.contains("lib-shallow=true"), "{}", job.trace);
    assert_eq!(
        job.trace.matches("GET_SOURCES_ATTEMPTS)").count(),
        2,
        "two retries: {}",
        job.trace
    );
    assert!(
        !job.trace.contains("Git LFS initialized") && !job.trace.contains("Updated Git hooks"),
        "LFS is set up quietly: {}",
        job.trace
    );
    assert!(!job.trace.contains(&job.token), "{}", job.trace);
}

async fn reports_and_named_archives_arrive_as_gitlab_runner_sends_them(executor: Executor) {
    let mut bench = Bench::start(executor).await;
    let sha =
        bench
            .gitlab()
            .create_project("kiln/demo", &[file("README.md", b"demo\n", false)], &[]);
    let mut job = job_json(
        "artifacts",
        &[
            "echo generated > generated.txt",
            "mkdir -p bin reports",
            "echo binary > bin/app",
            "for c in A B C; do echo \"<testsuite name='$c'/>\" > reports/TEST-$c.xml; done",
        ],
    );
    job["git_info"]["sha"] = json!(sha);
    job["artifacts"] = json!([
        {"name": "my-binaries", "untracked": true, "paths": ["bin/"], "when": "on_success",
         "artifact_type": "archive", "artifact_format": "zip"},
        {"name": "junit", "untracked": false, "paths": ["reports/TEST-*.xml"], "when": "always",
         "artifact_type": "junit", "artifact_format": "gzip"},
    ]);
    let id = bench.gitlab().enqueue(job);
    bench.run();
    let job = bench.finished(id).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, bench.logs());
    let archive = job
        .artifacts
        .iter()
        .find(|a| a.query.get("artifact_type").map(String::as_str) == Some("archive"))
        .expect("archive uploaded");
    assert_eq!(archive.filename.as_deref(), Some("my-binaries.zip"));
    let zip = zip::ZipArchive::new(std::io::Cursor::new(archive.bytes.clone())).unwrap();
    let mut names: Vec<&str> = zip.file_names().collect();
    names.sort_unstable();
    // Untracked (ignored ones too) and `paths`; never the tracked README.
    assert!(names.contains(&"generated.txt"), "{names:?}");
    assert!(names.contains(&"bin/app"), "{names:?}");
    assert!(!names.contains(&"README.md"), "{names:?}");
    let junit = job
        .artifacts
        .iter()
        .find(|a| a.query.get("artifact_type").map(String::as_str) == Some("junit"))
        .expect("junit uploaded");
    assert_eq!(
        junit.query.get("artifact_format").map(String::as_str),
        Some("gzip")
    );
    let members = gzip_members(&junit.bytes);
    assert_eq!(members.len(), 3, "one member per file");
    for suite in ["A", "B", "C"] {
        assert!(
            members
                .iter()
                .any(|m| m.contains(&format!("<testsuite name='{suite}'/>"))),
            "{members:?}"
        );
    }
}

/// Decodes a multi-member gzip member by member, as GitLab reads reports.
fn gzip_members(data: &[u8]) -> Vec<String> {
    let mut rest = data;
    let mut members = Vec::new();
    while !rest.is_empty() {
        let mut decoder = flate2::bufread::GzDecoder::new(rest);
        let mut text = String::new();
        decoder.read_to_string(&mut text).unwrap();
        rest = decoder.into_inner();
        members.push(text);
    }
    members
}

async fn debug_trace_status_and_a_200_kb_variable(executor: Executor) {
    let mut bench = Bench::start(executor).await;
    let secret = "s3cr3t-Value-98765";
    let big = "x".repeat(200_000);
    let mut ok = job_json(
        "debug",
        &[
            "echo status=$CI_JOB_STATUS",
            "curl_arg=\"--token=$DEPLOY_SECRET\"",
            "test ${#BIG} -eq 200000 && echo big-length-ok",
            "ls / > /dev/null && echo children-start",
        ],
    );
    ok["steps"][1]["script"] = json!(["echo after=$CI_JOB_STATUS"]);
    add_variables(
        &mut ok,
        &[
            variable("CI_DEBUG_TRACE", "true", false),
            variable("DEPLOY_SECRET", secret, true),
            variable("BIG", &big, false),
        ],
    );
    let mut failing = job_json("fails", &["exit 4"]);
    failing["steps"][1]["script"] = json!(["echo after=$CI_JOB_STATUS"]);
    let ok_id = bench.gitlab().enqueue(ok);
    let failing_id = bench.gitlab().enqueue(failing);
    bench.run();
    let job = bench.finished(ok_id).await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, bench.logs());
    assert!(job.trace.contains("status=running"), "{}", job.trace);
    assert!(job.trace.contains("after=success"), "{}", job.trace);
    assert!(job.trace.contains("big-length-ok"), "{}", job.trace);
    assert!(job.trace.contains("children-start"), "{}", job.trace);
    assert!(
        job.trace.contains("+ curl_arg=--token=[MASKED]"),
        "xtrace shows the command, masked: {}",
        job.trace
    );
    assert!(!job.trace.contains(secret), "{}", job.trace);
    assert!(!job.trace.contains(&big[..1000]), "the value is not traced");
    assert!(
        !job.trace.contains("+ printf"),
        "xtrace shows the job's commands, not kiln's echoes: {}",
        job.trace
    );
    let patches = bench
        .gitlab()
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path == format!("/api/v4/jobs/{ok_id}/trace"))
        .collect::<Vec<_>>();
    assert!(!patches.is_empty());
    assert!(
        patches
            .iter()
            .all(|p| p.query.as_deref() == Some("debug_trace=true")),
        "{patches:?}"
    );
    let failed = bench.finished(failing_id).await;
    assert_eq!(failed.state, "failed");
    assert!(failed.trace.contains("after=failed"), "{}", failed.trace);
    let plain = bench
        .gitlab()
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path == format!("/api/v4/jobs/{failing_id}/trace"))
        .collect::<Vec<_>>();
    assert!(plain.iter().all(|p| p.query.is_none()), "{plain:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn local_submodules_by_relative_url_lfs_and_fetch_attempts() {
    sources_are_checked_out_complete_after_two_failed_fetches(Executor::Local).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_submodules_by_relative_url_lfs_and_fetch_attempts() {
    sources_are_checked_out_complete_after_two_failed_fetches(Executor::Kubernetes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn local_named_archive_and_multi_member_junit() {
    reports_and_named_archives_arrive_as_gitlab_runner_sends_them(Executor::Local).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_named_archive_and_multi_member_junit() {
    reports_and_named_archives_arrive_as_gitlab_runner_sends_them(Executor::Kubernetes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn local_debug_trace_job_status_and_oversized_variable() {
    debug_trace_status_and_a_200_kb_variable(Executor::Local).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_debug_trace_job_status_and_oversized_variable() {
    debug_trace_status_and_a_200_kb_variable(Executor::Kubernetes).await;
}

/// `RUNNER_SCRIPT_TIMEOUT` ends the script but leaves the job's time to after_script and the
/// artifacts, as in gitlab-runner; the job's own timeout would skip both.
#[tokio::test(flavor = "multi_thread")]
async fn a_script_timeout_still_runs_after_script_and_uploads_artifacts() {
    let mut bench = Bench::start(Executor::Local).await;
    let mut job = job_json(
        "slow",
        &["echo partial > log.txt", "echo started", "sleep 30"],
    );
    job["steps"][1]["script"] = json!(["echo after=$CI_JOB_STATUS"]);
    job["artifacts"] = json!([{"name": "logs", "untracked": false, "paths": ["log.txt"],
        "when": "always", "artifact_type": "archive", "artifact_format": "zip"}]);
    add_variables(&mut job, &[variable("RUNNER_SCRIPT_TIMEOUT", "2s", false)]);
    let id = bench.gitlab().enqueue(job);
    bench.run();
    let job = bench.finished(id).await;
    assert_eq!(job.state, "failed", "{}", job.trace);
    assert_eq!(job.failure_reason.as_deref(), Some("job_execution_timeout"));
    assert!(job.trace.contains("RUNNER_SCRIPT_TIMEOUT"), "{}", job.trace);
    assert!(job.trace.contains("after=failed"), "{}", job.trace);
    let uploaded: Vec<_> = job
        .artifacts
        .iter()
        .filter_map(|a| a.filename.clone())
        .collect();
    assert_eq!(uploaded, ["logs.zip"], "{}", job.trace);
}

/// `hooks:pre_get_sources_script` runs before the fetch and `post_get_sources_script` after the
/// checkout; a failing hook fails the job as the job's own problem.
#[tokio::test(flavor = "multi_thread")]
async fn get_sources_hooks_run_around_the_checkout() {
    let mut bench = Bench::start(Executor::Local).await;
    let sha =
        bench
            .gitlab()
            .create_project("kiln/demo", &[file("README.md", b"demo\n", false)], &[]);
    let mut job = job_json("hooks", &["echo script ran"]);
    job["git_info"]["sha"] = json!(sha);
    job["hooks"] = json!([
        {"name": "pre_get_sources_script", "script": ["test ! -e README.md && echo pre-hook-before-checkout"]},
        {"name": "post_get_sources_script", "script": ["test -f README.md && echo post-hook-after-checkout"]},
    ]);
    let mut failing = job.clone();
    failing["hooks"] = json!([{"name": "pre_get_sources_script", "script": ["exit 7"]}]);
    failing["job_info"]["name"] = json!("hook-fails");
    let id = bench.gitlab().enqueue(job);
    let failing_id = bench.gitlab().enqueue(failing);
    bench.run();
    let job = bench.finished(id).await;
    assert_eq!(job.state, "success", "{}", job.trace);
    let pre = job
        .trace
        .find("pre-hook-before-checkout\n")
        .expect("pre hook ran");
    let post = job
        .trace
        .find("post-hook-after-checkout\n")
        .expect("post hook ran");
    let script = job.trace.find("script ran\n").expect("script ran");
    assert!(pre < post && post < script, "{}", job.trace);
    let failed = bench.finished(failing_id).await;
    assert_eq!(failed.state, "failed");
    assert_eq!(failed.failure_reason.as_deref(), Some("script_failure"));
    assert!(!failed.trace.contains("script ran\n"), "{}", failed.trace);
}

/// A GitLab behind a private CA (`tls_ca_file`, gitlab-runner's `tls-ca-file`): without the CA
/// kiln's polls fail naming the certificate problem and no job is taken; with it (set by its
/// `KILN_…` variable) the job is taken, cloned over https with git trusting the CA, and the
/// script finds the CA in `CI_SERVER_TLS_CA_FILE`. The job sets `FF_TIMESTAMPS`: every trace
/// line has its timestamp header.
#[tokio::test(flavor = "multi_thread")]
async fn a_gitlab_behind_a_private_ca_is_trusted_through_tls_ca_file() {
    let (gitlab, ca_pem) = GitLabServer::start_tls().await;
    gitlab.add_runner_token(TOKEN);
    gitlab.set_long_poll_timeout(Duration::from_secs(2));
    gitlab.set_trace_interval(1);
    assert!(gitlab.url().starts_with("https://"), "{}", gitlab.url());
    let sha = gitlab.create_project(
        "kiln/demo",
        &[file("README.md", b"demo over https\n", false)],
        &[],
    );
    let mut job = job_json(
        "tls",
        &[
            "cat README.md",
            "grep -q 'BEGIN CERTIFICATE' \"$CI_SERVER_TLS_CA_FILE\" && echo ca-file=$(basename \"$CI_SERVER_TLS_CA_FILE\")",
        ],
    );
    job["git_info"]["sha"] = json!(sha);
    add_variables(&mut job, &[variable("FF_TIMESTAMPS", "true", false)]);
    let id = gitlab.enqueue(job);
    let config = config(&gitlab.url(), TOKEN, "");

    let untrusting = KilnProcess::start(&config);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !untrusting.logs().contains("UnknownIssuer") && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs = untrusting.logs();
    assert!(
        logs.contains("invalid peer certificate: UnknownIssuer"),
        "the poll error names the TLS problem: {logs}"
    );
    assert_eq!(gitlab.job(id).state, "pending", "{logs}");
    drop(untrusting);

    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("gitlab-ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let ca_path = ca_file.to_string_lossy().into_owned();
    let trusting = KilnProcess::start_with_env(
        &config,
        &[("KILN_SOURCES__GITLAB__0__TLS_CA_FILE", ca_path.as_str())],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !matches!(gitlab.job(id).state.as_str(), "success" | "failed")
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let job = gitlab.job(id);
    assert_eq!(job.state, "success", "{}\n{}", job.trace, trusting.logs());
    assert!(job.trace.contains("demo over https\n"), "{}", job.trace);
    assert!(
        job.trace.contains("ca-file=CI_SERVER_TLS_CA_FILE\n"),
        "{}",
        job.trace
    );
    // FF_TIMESTAMPS: every line, kiln's and the script's, starts with gitlab-runner's header.
    for line in job.trace.lines() {
        let header = line.get(..32).unwrap_or_default();
        assert!(
            header.ends_with("Z 00O ")
                && header.as_bytes()[4] == b'-'
                && header.as_bytes()[10] == b'T'
                && header.as_bytes()[19] == b'.',
            "line without a timestamp header: {line:?}\n{}",
            job.trace
        );
    }
}

/// `ARTIFACT_DOWNLOAD_ATTEMPTS=4` outlasts three failed downloads of a dependency's artifacts,
/// one more than kiln retries a transient failure on its own.
#[tokio::test(flavor = "multi_thread")]
async fn artifact_download_attempts_outlast_failed_downloads() {
    let mut bench = Bench::start(Executor::Local).await;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    zip.start_file("build/app.txt", zip::write::SimpleFileOptions::default())
        .unwrap();
    std::io::Write::write_all(&mut zip, b"from the build job").unwrap();
    let dependency = bench
        .gitlab()
        .store_artifact(900, zip.finish().unwrap().into_inner());
    let mut job = job_json("uses-build", &["cat build/app.txt"]);
    job["dependencies"] = json!([dependency]);
    add_variables(
        &mut job,
        &[variable("ARTIFACT_DOWNLOAD_ATTEMPTS", "4", false)],
    );
    bench.gitlab().fail_artifact_downloads(3);
    let id = bench.gitlab().enqueue(job);
    bench.run();
    let job = bench.finished(id).await;
    assert_eq!(job.state, "success", "{}", job.trace);
    assert!(job.trace.contains("from the build job"), "{}", job.trace);
    assert_eq!(job.trace.matches("; retrying").count(), 3, "{}", job.trace);
}
