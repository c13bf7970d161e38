//! End to end: GitHub Actions runners that real workflows reach, at organization scale —
//! `runs-on: [self-hosted, linux, x64, kiln]` against JIT runners that have exactly the labels
//! of their JIT call, bursts that arrive while a reconcile is in flight, runners that crash at
//! start, builds attributed to the job their runner took, runner groups by name, idle runners
//! that never get a job, and what an idle organization's reconcile costs.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use crate::github_runners::{HOOK_SECRET, PAT, REPO, Setup, completed, ready, setup, until};
use crate::support::github::{DeliveryFault, JobSpec, RunSpec};
use crate::support::kiln::KilnProcess;

const OTHER_REPO: &str = "acme/gadgets";

impl Setup {
    /// Organization `acme` instead of repository `acme/widgets`.
    fn org_kiln(&self, extra: &str) -> KilnProcess {
        let config = self
            .config(&format!("token = \"{PAT}\""), extra)
            .replace("owner = \"acme\"\nrepo = \"widgets\"", "org = \"acme\"")
            .replace("concurrent = 30", "concurrent = 250");
        let kiln = KilnProcess::start(&config);
        self.github
            .set_webhook(&format!("http://{}/hooks/github", kiln.http), HOOK_SECRET);
        kiln
    }
}

/// The finished builds of `/api/v1/builds`, by name: (project, job).
async fn finished_builds(kiln: &KilnProcess, want: usize) -> BTreeMap<String, (String, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = kiln.get("/api/v1/builds").await;
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        let builds: BTreeMap<String, (String, String)> = answer["builds"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| !b["finished_at"].is_null())
            .map(|b| {
                (
                    b["name"].as_str().unwrap().to_owned(),
                    (
                        b["project"].as_str().unwrap_or_default().to_owned(),
                        b["job"].as_str().unwrap_or_default().to_owned(),
                    ),
                )
            })
            .collect();
        if builds.len() >= want {
            return builds;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {want} builds finished: {body}",
            builds.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn metric_line(kiln: &KilnProcess, prefix: &str) -> String {
    let (_, metrics) = kiln.get("/metrics").await;
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_on_self_hosted_linux_x64_runs_and_each_build_names_the_job_its_runner_ran() {
    let s = setup().await;
    s.github.add_repo(OTHER_REPO);
    let kiln = s.org_kiln("reconcile_interval = \"5s\"\nrunner_arch = \"x64\"");
    ready(&kiln).await;
    let mut ids = Vec::new();
    for i in 0..24 {
        let repo = if i % 2 == 0 { REPO } else { OTHER_REPO };
        let run = s.github.enqueue_run(
            repo,
            RunSpec::new("CI").job(
                JobSpec::new(
                    &format!("build-{i}"),
                    &["self-hosted", "linux", "x64", "kiln"],
                )
                .runs_for(Duration::from_millis(200)),
            ),
        );
        ids.extend(run.job_ids);
    }
    until(90, "all jobs completed", || completed(&s.github, &ids)).await;
    let runners = s.github.runners();
    for runner in &runners {
        assert_eq!(
            runner.labels,
            ["self-hosted", "Linux", "X64", "kiln"],
            "config.sh's default labels, then the configured ones: {runner:?}"
        );
    }
    let jobless: Vec<&String> = runners
        .iter()
        .filter(|r| r.job_id.is_none())
        .map(|r| &r.name)
        .collect();
    assert!(
        jobless.is_empty() && runners.len() == 24,
        "{} runners, without a job: {jobless:?}\n{}",
        runners.len(),
        kiln.logs()
            .lines()
            .filter(|l| l.contains("github") && !l.contains("\"DEBUG\""))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let builds = finished_builds(&kiln, 24).await;
    let mut elsewhere = 0;
    for runner in &runners {
        let job = s
            .github
            .job(runner.job_id.expect("each runner ran a job"))
            .unwrap();
        let (project, name) = &builds[&runner.name];
        assert_eq!(
            (project.as_str(), name.as_str()),
            (job.repo.as_str(), job.name.as_str()),
            "build {} shows the job its runner ran:\n{}",
            runner.name,
            kiln.logs()
                .lines()
                .filter(|l| l.contains(&runner.name))
                .collect::<Vec<_>>()
                .join("\n")
        );
        if !runner.name.contains(&job.id.to_string()) {
            elsewhere += 1;
        }
    }
    eprintln!("{elsewhere} of 24 runners ran another job than the one they are named after");
    assert!(!kiln.logs().contains(PAT));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_jobs_arriving_while_a_reconcile_is_in_flight_start_two_hundred_runners() {
    let s = setup().await;
    // Every listing answers 40 ms after it was taken: a reconcile over the burst's runs is
    // in flight for seconds (and acts on an old picture) while the webhooks come.
    s.github.delay_listings(Duration::from_millis(40));
    let kiln = s.org_kiln("reconcile_interval = \"5s\"");
    ready(&kiln).await;
    let mut ids = Vec::new();
    // Over 12 s: two reconciles (every 5 s) walk the runs while jobs arrive and start.
    for i in 0..200 {
        let run = s.github.enqueue_run(
            REPO,
            RunSpec::new("CI").job(
                JobSpec::new(&format!("job-{i}"), &["self-hosted", "kiln"])
                    .runs_for(Duration::from_millis(500)),
            ),
        );
        ids.extend(run.job_ids);
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    }
    until(240, "all 200 jobs completed", || completed(&s.github, &ids)).await;
    let runners = s.github.runners();
    let idle: Vec<&String> = runners
        .iter()
        .filter(|r| r.job_id.is_none())
        .map(|r| &r.name)
        .collect();
    assert!(idle.is_empty(), "runners that never ran a job: {idle:?}");
    assert_eq!(runners.len(), 200, "one runner per job\n{}", kiln.logs());
    let names: HashSet<&String> = runners.iter().map(|r| &r.name).collect();
    assert_eq!(names.len(), 200);
    assert_eq!(s.pods_created(), 200);
    let want = r#"kiln_builds_finished_total{source="github",outcome="succeeded",reason=""} 200"#;
    let mut finished = String::new();
    for _ in 0..150 {
        finished = metric_line(&kiln, "kiln_builds_finished_total").await;
        if finished.contains(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(finished.contains(want), "{finished}");
    assert!(!finished.contains("failed"), "no build failed: {finished}");
}

#[tokio::test(flavor = "multi_thread")]
async fn runners_that_crash_at_start_stop_at_three_per_job() {
    let s = setup().await;
    // The runner exits at once, before it ever connects.
    s.kube.alias_binary("/home/runner/run.sh", "/bin/false");
    let kiln = s.kiln("reconcile_interval = \"5s\"");
    ready(&kiln).await;
    let ids: Vec<u64> = (0..21)
        .map(|_| s.github.enqueue_job(REPO, &["self-hosted", "kiln"]))
        .collect();
    until(120, "kiln gave every job up", || {
        kiln.logs()
            .matches("kiln stops starting runners for it")
            .count()
            >= 21
    })
    .await;
    // Nothing more starts once every job is given up.
    let registered = s.github.runners().len();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let runners = s.github.runners();
    assert_eq!(runners.len(), registered, "no runner started after the cap");
    let mut per_job: BTreeMap<u64, usize> = BTreeMap::new();
    for runner in &runners {
        let rest = runner.name.strip_prefix("kiln-gh-").unwrap();
        let job: u64 = rest.split('-').next().unwrap().parse().unwrap();
        *per_job.entry(job).or_default() += 1;
    }
    assert!(
        per_job.values().all(|n| *n <= 3),
        "at most three runners per job: {per_job:?}"
    );
    assert!(runners.len() <= 63, "{} registrations", runners.len());
    for id in &ids {
        assert_eq!(s.github.job(*id).unwrap().status, "queued");
    }
    s.nothing_left(30).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runner_group_by_name_serves_the_repositories_it_covers() {
    let s = setup().await;
    s.github.add_repo(OTHER_REPO);
    s.github
        .add_runner_group("acme", 7, "kiln-runners", Some(&["widgets"]));
    let kiln = s.org_kiln("reconcile_interval = \"5s\"\nrunner_group = \"kiln-runners\"");
    ready(&kiln).await;
    let covered = s.github.enqueue_job(REPO, &["self-hosted", "kiln"]);
    let uncovered = s.github.enqueue_job(OTHER_REPO, &["self-hosted", "kiln"]);
    until(60, "the covered repository's job ran", || {
        completed(&s.github, &[covered])
    })
    .await;
    until(20, "a warning about the uncovered repository", || {
        kiln.logs().lines().any(|l| {
            l.contains("kiln-runners") && l.contains("does not cover repository acme/gadgets")
        })
    })
    .await;
    let runners = s.github.runners();
    assert_eq!(
        runners.len(),
        1,
        "no runner for the uncovered job: {runners:#?}"
    );
    assert_eq!(runners[0].group_id, 7);
    assert_eq!(s.github.job(uncovered).unwrap().status, "queued");
    drop(kiln);

    // A group that does not exist: a clear error naming the ones there are, nothing started.
    let kiln = s.org_kiln("reconcile_interval = \"5s\"\nrunner_group = \"kiln\"");
    let want = "has no runner group called \\\"kiln\\\" (it has: Default, kiln-runners)";
    let mut body = String::new();
    for _ in 0..150 {
        body = kiln.get("/api/v1/sources").await.1;
        if body.contains(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(body.contains(want), "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.github.runners().len(), 1, "nothing registered");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runner_that_gets_no_job_is_removed_after_the_idle_timeout_with_a_warning() {
    let s = setup().await;
    s.github.add_repo(OTHER_REPO);
    // Group 7 covers only gadgets; kiln is told its id, not its name, so it cannot know.
    s.github
        .add_runner_group("acme", 7, "gadgets-only", Some(&["gadgets"]));
    let kiln =
        s.org_kiln("reconcile_interval = \"5s\"\nrunner_group_id = 7\nidle_timeout = \"10s\"");
    ready(&kiln).await;
    let job = s.github.enqueue_job(REPO, &["self-hosted", "kiln"]);
    s.github.enqueue_job(REPO, &["self-hosted", "gpu"]);
    until(40, "the idle runner removed with a warning", || {
        kiln.logs()
            .contains("runner took no job within idle_timeout")
    })
    .await;
    let logs = kiln.logs();
    let warning = logs
        .lines()
        .find(|l| l.contains("runner took no job within idle_timeout"))
        .unwrap();
    assert!(
        warning.contains("offered the labels [self-hosted, Linux, ")
            && warning.contains("kiln]")
            && warning.contains("job labels still waiting unmatched: [self-hosted, gpu]"),
        "{warning}"
    );
    until(10, "its registration removed", || {
        s.github
            .runners()
            .iter()
            .any(|r| r.removed.is_some() && r.job_id.is_none())
    })
    .await;
    assert_eq!(s.github.job(job).unwrap().status, "queued");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_organization_is_reconciled_with_conditional_requests_in_slices() {
    let s = setup().await;
    for n in 0..39 {
        s.github.add_repo(&format!("acme/repo-{n:02}"));
    }
    // 40 repositories, a reconcile every 5 s, each listed at least every 20 s: 10 a pass.
    let kiln = s.org_kiln("reconcile_interval = \"5s\"\norg_sweep_interval = \"20s\"");
    ready(&kiln).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let start = s.github.requests().len();
    tokio::time::sleep(Duration::from_secs(21)).await;
    let requests = s.github.requests()[start..].to_vec();
    let runs: Vec<_> = requests
        .iter()
        .filter(|r| r.path.contains("/actions/runs"))
        .collect();
    let fresh: Vec<&String> = runs
        .iter()
        .filter(|r| r.status != 304)
        .map(|r| &r.path)
        .collect();
    assert!(
        fresh.is_empty(),
        "nothing changed, yet answered afresh: {fresh:?}"
    );
    let repos: HashSet<&str> = runs
        .iter()
        .filter_map(|r| r.path.split("/actions/").next())
        .collect();
    assert_eq!(
        repos.len(),
        40,
        "each repository listed within the sweep: {repos:?}"
    );
    assert!(
        runs.len() <= 2 * 40 + 2 * 10,
        "{} run listings in 21 s: a slice per pass, not every repository",
        runs.len()
    );
    // A job whose webhook never came is found by the sweep.
    s.github.fault_next_delivery(DeliveryFault::Drop);
    let lost = s
        .github
        .enqueue_job("acme/repo-17", &["self-hosted", "kiln"]);
    until(45, "the job without a webhook ran", || {
        completed(&s.github, &[lost])
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn listings_wait_for_the_retry_after_of_a_secondary_rate_limit() {
    let s = setup().await;
    let kiln = s.kiln("reconcile_interval = \"5s\"");
    ready(&kiln).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.github
        .secondary_rate_limit(Duration::from_secs(25), 403, Duration::from_secs(25));
    let from = s.github.requests().len();
    // The next reconcile meets the limit; GitHub says to come back in 25 s.
    until(15, "a listing refused", || {
        s.github.requests()[from..].iter().any(|r| r.status == 403)
    })
    .await;
    let refused_at = s.github.requests().len();
    tokio::time::sleep(Duration::from_secs(18)).await;
    let during: Vec<String> = s.github.requests()[refused_at..]
        .iter()
        .map(|r| format!("{} {} {}", r.method, r.path, r.status))
        .collect();
    assert!(
        during.is_empty(),
        "no listing before the retry-after (the pacer alone retries after 5 s and 10 s): {during:?}"
    );
    let (_, sources) = kiln.get("/api/v1/sources").await;
    assert!(sources.contains("not listing GitHub until"), "{sources}");
    // Then listings resume.
    until(30, "a listing after the hold", || {
        s.github.requests()[refused_at..]
            .iter()
            .any(|r| r.status == 200 || r.status == 304)
    })
    .await;
}
