//! The coordinator benchmark: a real `kiln run` against the GitLab and Kubernetes test servers,
//! measuring dispatch overhead, burst throughput, footprint, idle traffic and local start latency.

// `examples/bench/main.rs` and `tests/bench_smoke.rs` both include this file; each provides
// `crate::support::{github, gitlab, kube}`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use crate::support::github::{Access, GitHubServer, JobSpec, RunSpec, fake_runner_bin};
use crate::support::gitlab::{GitLabServer, job_json};
use crate::support::kube::{KubeServer, RequestRecord};

const TOKEN: &str = "glrt-benchtoken";
const NAMESPACE: &str = "ci";
const HELPER_IMAGE: &str = "kiln-bench/kiln:dev";
const BUILD_IMAGE: &str = "alpine:3";
/// What a build's agent writes to its termination log once it has reported the job.
const REPORTED: &str =
    r#"{"state":"success","failure_reason":null,"exit_code":0,"reported":true,"canceled":false}"#;
/// Status writes the benchmark (playing kubelet and agents) has in flight at once.
const DRIVER_PARALLELISM: usize = 32;

/// What to run; `--help` lists the flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "bench",
    about = "Benchmarks `kiln run` against the GitLab and Kubernetes test servers (build with --release)"
)]
pub(crate) struct Options {
    /// The kiln binary to benchmark [default: `kiln` next to this program's `examples/` dir,
    /// i.e. `target/release/kiln`].
    #[arg(long)]
    pub(crate) kiln: Option<PathBuf>,
    /// Jobs queued at once for the burst (also the largest concurrency measured).
    #[arg(long, default_value_t = 1000)]
    pub(crate) jobs: usize,
    /// Smaller concurrency levels measured first, each with a fresh coordinator.
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    pub(crate) levels: Vec<usize>,
    /// Latency the Kubernetes test server adds to every API request, in milliseconds.
    #[arg(long, default_value_t = 2)]
    pub(crate) latency_ms: u64,
    /// `[kubernetes] qps` of the coordinator.
    #[arg(long, default_value_t = 50.0)]
    pub(crate) qps: f64,
    /// `[kubernetes] burst` of the coordinator.
    #[arg(long, default_value_t = 100)]
    pub(crate) burst: u32,
    /// How long all jobs of a level stay Running while CPU is measured, in seconds.
    #[arg(long, default_value_t = 60)]
    pub(crate) steady_secs: u64,
    /// How long GitLab holds an idle long poll (Workhorse: 50 s), in seconds.
    #[arg(long, default_value_t = 50)]
    pub(crate) hold_secs: u64,
    /// The idle measurement window, in seconds (a bit over two holds sees three polls).
    #[arg(long, default_value_t = 110)]
    pub(crate) idle_secs: u64,
    /// Jobs run one after another with the local executor.
    #[arg(long, default_value_t = 5)]
    pub(crate) local_jobs: usize,
    /// How long each local job's script sleeps, in seconds.
    #[arg(long, default_value_t = 5)]
    pub(crate) local_sleep_secs: u64,
    /// GitHub Actions jobs queued at once for the GitHub level (0: skip it).
    #[arg(long, default_value_t = 100)]
    pub(crate) github_jobs: usize,
    /// Builds in the status page's history when its latency is measured, and concurrent jobs
    /// when RSS is measured with that history kept (0: skip the status page measurement).
    #[arg(long, default_value_t = 1000)]
    pub(crate) status_builds: usize,
    /// Requests of each status page URL timed.
    #[arg(long, default_value_t = 200)]
    pub(crate) status_requests: usize,
    /// Measure only the status page (skip the levels and the local executor).
    #[arg(long)]
    pub(crate) only_status: bool,
    /// Builds running when one of two replicas is killed, for the failover level (0: skip it).
    #[arg(long, default_value_t = 100)]
    pub(crate) failover_jobs: usize,
    /// Times the failover is measured, each with fresh replicas.
    #[arg(long, default_value_t = 5)]
    pub(crate) failover_rounds: usize,
    /// `[kubernetes] lease_duration` of the replicas, in seconds.
    #[arg(long, default_value_t = 15)]
    pub(crate) lease_secs: u64,
    /// `[kubernetes] lease_renew` of the replicas, in seconds.
    #[arg(long, default_value_t = 5)]
    pub(crate) renew_secs: u64,
    /// How long GitLab takes over every call about a job during the failover level's
    /// take-overs (each adopted build is one such call), in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub(crate) failover_gitlab_ms: u64,
    /// Run only the failover level (kill, then a rolling update).
    #[arg(long)]
    pub(crate) only_failover: bool,
    /// The GitHub organization level (`--only-github-org`): repositories of the organization.
    #[arg(long, default_value_t = 500)]
    pub(crate) github_org_repos: usize,
    /// The GitHub organization level: jobs queued over the organization's repositories.
    #[arg(long, default_value_t = 1000)]
    pub(crate) github_org_jobs: usize,
    /// Run only the GitHub organization level: API calls of an idle organization's
    /// reconciles, and per 1,000 jobs.
    #[arg(long)]
    pub(crate) only_github_org: bool,
    /// Run only the warm pool level: queued → first trace line of jobs on warm pods and of
    /// cold ones, with the test kubelet taking `--warm-delay-secs` to start each pod, and the
    /// pool's idle cost.
    #[arg(long)]
    pub(crate) only_warm: bool,
    /// The warm pool level: how long the test kubelet takes to start each pod, in seconds.
    #[arg(long, default_value_t = 10)]
    pub(crate) warm_delay_secs: u64,
    /// The warm pool level: jobs run on warm pods, one after another (each once the pool is
    /// back to its floor).
    #[arg(long, default_value_t = 20)]
    pub(crate) warm_jobs: usize,
    /// The warm pool level: jobs of another image (no pool), queued in rounds of the pool's
    /// size.
    #[arg(long, default_value_t = 10)]
    pub(crate) cold_jobs: usize,
    /// The warm pool level: the pool's floor (`min_idle`).
    #[arg(long, default_value_t = 2)]
    pub(crate) warm_pool: usize,
    /// The warm pool level: how long the idle pool's cost is measured, in seconds.
    #[arg(long, default_value_t = 60)]
    pub(crate) warm_idle_secs: u64,
}

/// The idle coordinator.
#[derive(Debug, Clone)]
pub(crate) struct Idle {
    pub(crate) window: Duration,
    /// `jobs/request` calls that arrived in the window (including the one opening it).
    pub(crate) polls: usize,
    /// Polls per minute from the mean interval between them.
    pub(crate) polls_per_minute: f64,
    /// Every GitLab request in the window.
    pub(crate) gitlab_requests: usize,
    /// Kubernetes API requests in the window (the pod watch).
    pub(crate) kube_requests: usize,
    pub(crate) rss_kib: u64,
    pub(crate) hwm_kib: u64,
    pub(crate) cpu_millicores: f64,
}

/// One concurrency level: `jobs` builds created, Running together, then finished.
#[derive(Debug, Clone)]
pub(crate) struct Level {
    pub(crate) jobs: usize,
    /// From queueing the jobs to the last pod create.
    pub(crate) create: Duration,
    /// RSS while all jobs ran.
    pub(crate) rss_kib: u64,
    /// Peak RSS of the coordinator over its whole life.
    pub(crate) hwm_kib: u64,
    /// CPU averaged over the steady state.
    pub(crate) steady_millicores: f64,
    pub(crate) steady: Duration,
    /// CPU seconds from queueing to the last pod and Secret deleted.
    pub(crate) cpu_secs: f64,
    /// From the first build reporting to the last pod and Secret gone.
    pub(crate) cleanup: Duration,
    /// Kubernetes API calls kiln made for the level (watch requests excluded).
    pub(crate) api_calls: usize,
    /// The same by `METHOD resource` (`POST pods`, `DELETE secrets`, …).
    pub(crate) calls_by_kind: BTreeMap<String, usize>,
}

/// Distribution of a set of durations.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Spread {
    pub(crate) count: usize,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) max: Duration,
}

impl Spread {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1]
        };
        if samples.is_empty() {
            return Self::default();
        }
        Self {
            count: samples.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// The burst of the largest level.
#[derive(Debug, Clone)]
pub(crate) struct Burst {
    pub(crate) jobs: usize,
    /// 201 from `jobs/request` → `POST pods` for that job at the API server.
    pub(crate) dispatch: Spread,
    /// The same for the jobs whose start did not wait for the client-side rate limit.
    pub(crate) dispatch_unthrottled: Spread,
    /// 201 → `POST secrets` (the job written down in the cluster).
    pub(crate) to_secret: Spread,
    /// `POST secrets` → the job's two-phase `PUT jobs/:id {running}` at GitLab.
    pub(crate) secret_to_ack: Spread,
    /// Acknowledge → `POST pods`.
    pub(crate) ack_to_pod: Spread,
    /// Pod creates per second, first to last.
    pub(crate) pods_per_sec: f64,
    /// kiln's API calls per second from its first call after the queueing to the last pod
    /// create.
    pub(crate) calls_per_sec: f64,
    /// The share of the rate limit's budget over that window (`burst` saved-up tokens plus
    /// `qps` a second) that kiln used.
    pub(crate) budget_used: f64,
    /// API calls per job: creating, and from reporting to deleted.
    pub(crate) calls_per_start: f64,
    pub(crate) calls_per_cleanup: f64,
    /// How fast GitLab handed the jobs out, first to last.
    pub(crate) handout_per_sec: f64,
}

/// The local executor.
#[derive(Debug, Clone)]
pub(crate) struct Local {
    /// 201 → first trace byte at GitLab, per job.
    pub(crate) first_trace: Spread,
    /// 201 → job finished (script: `sleep`).
    pub(crate) finished: Spread,
}

/// GitHub Actions: a burst of queued jobs, each announced by a `workflow_job` webhook, run by
/// JIT runner pods (the test kubelet runs the Actions-runner stand-in in them).
#[derive(Debug, Clone, Default)]
pub(crate) struct GitHubLevel {
    pub(crate) jobs: usize,
    /// The `queued` webhook → `POST pods` of that job's runner (`kiln-gh-<job>`).
    pub(crate) webhook_to_pod: Spread,
    /// Queueing → the last job completed at GitHub.
    pub(crate) all_completed: Duration,
    /// kiln's GitHub REST requests from queueing until every pod was gone, per job.
    pub(crate) github_calls_per_job: f64,
    /// The same by `METHOD route` (`POST generate-jitconfig`, `GET jobs`, …).
    pub(crate) github_calls_by_kind: BTreeMap<String, usize>,
    /// kiln's Kubernetes API calls (watches excluded) over the same window, per job.
    pub(crate) kube_calls_per_job: f64,
    /// Runner pods created (one per job when none failed).
    pub(crate) pods_created: usize,
}

/// One URL of the status page, requested one after another.
#[derive(Debug, Clone)]
pub(crate) struct PageTiming {
    pub(crate) path: String,
    /// Request sent → whole body read.
    pub(crate) latency: Spread,
    pub(crate) bytes: usize,
}

/// The status page with a full history.
#[derive(Debug, Clone)]
pub(crate) struct StatusFigures {
    /// Finished builds in the history while the page was timed.
    pub(crate) history: usize,
    pub(crate) pages: Vec<PageTiming>,
    /// RSS with the history full and `concurrent` more builds running.
    pub(crate) concurrent: usize,
    pub(crate) rss_kib: u64,
    pub(crate) hwm_kib: u64,
    /// RSS with the history full and nothing running, before the second round.
    pub(crate) rss_history_only_kib: u64,
}

/// Two replicas; one is killed while builds of both run (Pending: the benchmark plays no
/// kubelet here), and the other takes the victim's builds over.
#[derive(Debug, Clone, Default)]
pub(crate) struct Failover {
    pub(crate) jobs: usize,
    /// SIGKILL → every build of the killed replica labelled with the survivor, per round.
    pub(crate) taken_over: Spread,
    /// Builds of the killed replica, over all rounds.
    pub(crate) builds_moved: usize,
    /// Builds created more than once, over all rounds (must be 0).
    pub(crate) duplicates: usize,
    /// Rolling update after the kill (a new replica c starts, the survivor b gets SIGTERM):
    /// SIGTERM → b has exited (its in-flight long poll ends, its Leases are given up).
    pub(crate) rolling_exit: Spread,
    /// … b's exit → every build (all of them, b's now) labelled with c.
    pub(crate) rolling_handed_over: Spread,
    /// Times a live replica's own Lease was seen lapsed (read every 20 ms), over all rounds
    /// (must be 0).
    pub(crate) lease_lapses: usize,
}

/// Everything measured.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub(crate) machine: String,
    pub(crate) options: Options,
    pub(crate) idle: Idle,
    pub(crate) levels: Vec<Level>,
    pub(crate) burst: Burst,
    pub(crate) local: Local,
    pub(crate) github: Option<GitHubLevel>,
    pub(crate) status: Option<StatusFigures>,
    pub(crate) failover: Option<Failover>,
}

impl Options {
    /// The kiln binary: `--kiln`, else the `kiln` cargo built beside this example.
    pub(crate) fn kiln_path(&self) -> PathBuf {
        self.kiln.clone().unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap_or_default();
            // target/<profile>/examples/bench → target/<profile>/kiln
            exe.parent()
                .and_then(Path::parent)
                .map_or_else(|| PathBuf::from("target/release/kiln"), |d| d.join("kiln"))
        })
    }
}

/// Runs the whole benchmark.
pub(crate) async fn run(options: &Options) -> Report {
    let kiln = options.kiln_path();
    assert!(
        kiln.exists(),
        "no kiln binary at {} (build it first: cargo build --release --bin kiln)",
        kiln.display()
    );
    if kiln.components().any(|c| c.as_os_str() == "debug") {
        progress("benchmarking a debug build of kiln; build with --release for real figures");
    }
    let mut sizes: Vec<usize> = options
        .levels
        .iter()
        .copied()
        .filter(|n| *n > 0 && *n < options.jobs)
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    sizes.push(options.jobs);
    let mut idle = None;
    let mut levels = Vec::new();
    let mut burst = None;
    for (i, &jobs) in sizes.iter().enumerate() {
        let last = i + 1 == sizes.len();
        progress(&format!("level {jobs}: starting"));
        let (level_idle, level, level_burst) = run_level(options, jobs, i == 0, last).await;
        if level_idle.is_some() {
            idle = level_idle;
        }
        if level_burst.is_some() {
            burst = level_burst;
        }
        levels.push(level);
    }
    progress("local executor: starting");
    let local = run_local(options).await;
    let github = if options.github_jobs > 0 {
        progress(&format!("github: {} jobs", options.github_jobs));
        Some(run_github(options).await)
    } else {
        None
    };
    let status = if options.status_builds > 0 {
        Some(run_status(options).await)
    } else {
        None
    };
    let failover = if options.failover_jobs > 0 && options.failover_rounds > 0 {
        progress(&format!(
            "failover: {} builds, {} rounds",
            options.failover_jobs, options.failover_rounds
        ));
        Some(run_failover(options).await)
    } else {
        None
    };
    Report {
        machine: machine(),
        options: options.clone(),
        idle: idle.unwrap_or_else(|| unreachable!("the first level measures idle")),
        levels,
        burst: burst.unwrap_or_else(|| unreachable!("the last level measures the burst")),
        local,
        github,
        status,
        failover,
    }
}

fn progress(text: &str) {
    eprintln!("[bench] {text}");
}

/// A `kiln run` child process with its config and logs in a temporary directory.
struct Coordinator {
    child: Child,
    dir: tempfile::TempDir,
}

impl Coordinator {
    fn start(kiln: &Path, config: &str, http: &str) -> Self {
        Self::start_with_env(kiln, config, http, &[])
    }

    fn start_with_env(kiln: &Path, config: &str, http: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(kiln)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("kiln.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("kiln.err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", kiln.display()));
        let this = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(http).is_err() {
            assert!(
                Instant::now() < deadline,
                "kiln did not start listening on {http}:\n{}",
                this.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        this
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn logs(&self) -> String {
        ["kiln.log", "kiln.err"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect()
    }

    /// Peak and current RSS in KiB, from `/proc/<pid>/status`.
    fn memory(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (field("VmHWM:"), field("VmRSS:"))
    }

    /// User + system CPU seconds, from `/proc/<pid>/stat`.
    fn cpu_secs(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // The command name may hold spaces; the fields after it do not.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        (ticks(11) + ticks(12)) as f64 / clock_ticks()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

fn config(
    gitlab: &GitLabServer,
    options: &Options,
    http: &str,
    executor: &str,
    kube: &str,
) -> String {
    format!(
        r#"concurrent = {concurrent}
executor = "{executor}"

[http]
listen = "{http}"

[log]
format = "json"
level = "info"

{kube}

[[sources.gitlab]]
name = "bench"
url = "{url}"
token = "{TOKEN}"
system_id = "s_0123456789ab"
poll_timeout = "{poll}s"
"#,
        concurrent = options.jobs.max(1),
        url = gitlab.url(),
        poll = options.hold_secs + 10,
    )
}

async fn gitlab(options: &Options) -> GitLabServer {
    let gitlab = GitLabServer::start().await;
    gitlab.add_runner_token(TOKEN);
    gitlab.set_long_poll_timeout(Duration::from_secs(options.hold_secs));
    gitlab
}

/// Waits until `done` holds, checking every 20 ms; panics with kiln's log after `timeout`.
async fn wait_until(
    what: &str,
    timeout: Duration,
    kiln: &Coordinator,
    mut done: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            let logs = kiln.logs();
            let tail: Vec<&str> = logs.lines().rev().take(40).collect();
            panic!(
                "{what}: not within {timeout:?}; kiln's last log lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn job_id(pod: &str) -> Option<u64> {
    pod.strip_prefix("kiln-gl-")?.parse().ok()
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The status a kubelet writes once the init container ended and the build container runs.
fn running_status(index: usize) -> Value {
    let now = now_rfc3339();
    json!({"status": {
        "phase": "Running",
        "hostIP": "10.1.0.1",
        "podIP": format!("10.2.{}.{}", index / 250, index % 250 + 1),
        "startTime": now,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": "True", "lastTransitionTime": now},
        ],
        "initContainerStatuses": [{
            "name": "prepare", "image": HELPER_IMAGE, "imageID": "", "ready": true,
            "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                                     "startedAt": now, "finishedAt": now}},
        }],
        "containerStatuses": [{
            "name": "build", "image": BUILD_IMAGE, "imageID": "", "ready": true,
            "restartCount": 0, "started": true,
            "state": {"running": {"startedAt": now}},
        }],
    }})
}

/// The status after the build container's agent reported the job and exited.
fn finished_status() -> Value {
    let now = now_rfc3339();
    json!({"status": {
        "phase": "Succeeded",
        "containerStatuses": [{
            "name": "build", "image": BUILD_IMAGE, "imageID": "", "ready": false,
            "restartCount": 0, "started": false,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": REPORTED,
                                     "startedAt": now, "finishedAt": now}},
        }],
    }})
}

async fn patch_status(pods: &Api<Pod>, name: &str, status: &Value) {
    // The pod may be gone already when kiln is faster than the driver.
    let _ = pods
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await;
}

/// kiln's own requests: everything but the benchmark's status writes.
/// A call kiln made for its builds: not the benchmark's own status writes, and not the
/// replica's Lease renewals (a few per renew period, outside the client's rate limit).
fn is_kiln_call(r: &RequestRecord) -> bool {
    let status_write = r.method == "PATCH" && r.path.contains("/status");
    !(status_write || r.path.contains("/leases"))
}

/// `METHOD resource[/subresource]`, e.g. `PATCH secrets`.
fn call_kind(r: &RequestRecord) -> String {
    let segments: Vec<&str> = path_of(r).split('/').filter(|s| !s.is_empty()).collect();
    let resource = match segments.as_slice() {
        ["api", "v1", "namespaces", _, resource, _, sub, ..] => format!("{resource}/{sub}"),
        ["api", "v1", "namespaces", _, resource, ..] => (*resource).to_owned(),
        other => other.join("/"),
    };
    format!("{} {resource}", r.method)
}

/// The path without the query.
fn path_of(r: &RequestRecord) -> &str {
    r.path.split('?').next().unwrap_or("")
}

fn is_watch(r: &RequestRecord) -> bool {
    r.path.contains("watch=true") || r.path.contains("watch=1")
}

/// A Kubernetes test server the benchmark plays kubelet for (its own kubelet off), with the
/// configured latency, its kubeconfig in a temporary directory and the `[kubernetes]` section
/// that points kiln at it (callers append their own fields).
struct DrivenCluster {
    kube: KubeServer,
    section: String,
    _dir: tempfile::TempDir,
}

async fn driven_cluster(options: &Options) -> DrivenCluster {
    let kube = KubeServer::start().await;
    kube.set_kubelet(false);
    kube.set_latency(Duration::from_millis(options.latency_ms));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.kubeconfig(&kubeconfig, NAMESPACE);
    let section = format!(
        "[kubernetes]\nkubeconfig = \"{}\"\nhelper_image = \"{HELPER_IMAGE}\"\npending_timeout = \"1h\"\nqps = {:?}\nburst = {}\n",
        kubeconfig.display(),
        options.qps,
        options.burst
    );
    DrivenCluster {
        kube,
        section,
        _dir: dir,
    }
}

async fn run_level(
    options: &Options,
    jobs: usize,
    measure_idle: bool,
    measure_burst: bool,
) -> (Option<Idle>, Level, Option<Burst>) {
    let gitlab = gitlab(options).await;
    // `_dir` holds the kubeconfig for as long as the level runs.
    let DrivenCluster {
        kube,
        section,
        _dir,
    } = driven_cluster(options).await;
    let http = free_addr();
    let text = config(&gitlab, options, &http, "kubernetes", &section);
    let kiln = Coordinator::start(&options.kiln_path(), &text, &http);
    wait_until(
        "kiln's first jobs/request",
        Duration::from_secs(30),
        &kiln,
        || !gitlab.polls().is_empty(),
    )
    .await;

    let idle = if measure_idle {
        progress(&format!(
            "idle: measuring for {}s (long-poll hold {}s)",
            options.idle_secs, options.hold_secs
        ));
        Some(measure_idle_window(options, &gitlab, &kube, &kiln).await)
    } else {
        None
    };

    // The burst: every job queued at once.
    let cpu_start = kiln.cpu_secs();
    let queued_at = Instant::now();
    let ids: Vec<u64> = (0..jobs)
        .map(|i| gitlab.enqueue(job_json(&format!("bench-{i}"), &["echo hello"])))
        .collect();
    let id_set: HashSet<u64> = ids.iter().copied().collect();
    progress(&format!(
        "level {jobs}: {jobs} jobs queued; driving pods to Running"
    ));

    // Play kubelet: every pod kiln creates starts running.
    let pods: Api<Pod> = Api::namespaced(kube.client(NAMESPACE), NAMESPACE);
    let create_timeout = create_timeout(options, jobs);
    run_pods(&kube, &kiln, &pods, &id_set, create_timeout).await;
    let create = last_pod_create(&kube.requests()).map_or(queued_at.elapsed(), |t| t - queued_at);
    progress(&format!(
        "level {jobs}: all pods Running after {:.1}s; steady state for {}s",
        queued_at.elapsed().as_secs_f64(),
        options.steady_secs
    ));

    // Steady state: every build runs, the watch delivers nothing, kiln should sleep. Calls
    // still queued behind the rate limit (Secret owner patches) go out first.
    wait_quiet(&kube, create_timeout).await;
    let steady = Duration::from_secs(options.steady_secs);
    let cpu_a = kiln.cpu_secs();
    let steady_start = Instant::now();
    tokio::time::sleep(steady).await;
    let steady_millicores =
        (kiln.cpu_secs() - cpu_a) / steady_start.elapsed().as_secs_f64() * 1000.0;
    let (_, rss_kib) = kiln.memory();

    // Every agent reports to GitLab, then its container ends with the reported result.
    progress(&format!("level {jobs}: finishing every build"));
    let finish_start = Instant::now();
    let cleanup_timeout = cleanup_timeout(options, jobs);
    finish_pods(&gitlab, &kube, &kiln, &pods, &ids, cleanup_timeout).await;
    let cleanup = finish_start.elapsed();
    // Calls still queued behind the rate limit (a Secret the pod's deletion already took
    // with it) count too.
    wait_quiet(&kube, cleanup_timeout).await;
    let cpu_secs = kiln.cpu_secs() - cpu_start;
    let (hwm_kib, _) = kiln.memory();
    progress(&format!(
        "level {jobs}: all pods and Secrets deleted {:.1}s after the builds ended",
        cleanup.as_secs_f64()
    ));
    for &id in &ids {
        let job = gitlab.job(id);
        assert_eq!(
            job.state,
            "success",
            "job {id} ended {}: {}",
            job.state,
            kiln.logs()
        );
    }
    let violations = gitlab.violations();
    assert!(
        violations.is_empty(),
        "GitLab protocol violations: {violations:?}"
    );

    let requests = kube.requests();
    let level_calls: Vec<&RequestRecord> = requests
        .iter()
        .filter(|r| r.at >= queued_at && is_kiln_call(r) && !is_watch(r))
        .collect();
    let api_calls = level_calls.len();
    let mut calls_by_kind = BTreeMap::new();
    for r in &level_calls {
        *calls_by_kind.entry(call_kind(r)).or_insert(0) += 1;
    }
    let burst = measure_burst
        .then(|| burst_figures(&gitlab, &ids, &requests, queued_at, finish_start, options));
    drop(kiln);
    (
        idle,
        Level {
            jobs,
            create,
            rss_kib,
            hwm_kib,
            steady_millicores,
            steady,
            cpu_secs,
            cleanup,
            api_calls,
            calls_by_kind,
        },
        burst,
    )
}

fn create_timeout(options: &Options, jobs: usize) -> Duration {
    Duration::from_secs(120) + Duration::from_secs_f64(jobs as f64 * 3.0 / options.qps * 2.0)
}

fn cleanup_timeout(options: &Options, jobs: usize) -> Duration {
    Duration::from_secs(120) + Duration::from_secs_f64(jobs as f64 * 2.0 / options.qps * 2.0)
}

/// Plays kubelet: moves every pod kiln creates for the jobs `ids` to Running, and returns once
/// all of them run.
async fn run_pods(
    kube: &KubeServer,
    kiln: &Coordinator,
    pods: &Api<Pod>,
    ids: &HashSet<u64>,
    timeout: Duration,
) {
    let jobs = ids.len();
    let limit = Arc::new(tokio::sync::Semaphore::new(DRIVER_PARALLELISM));
    let mut started: HashSet<String> = HashSet::new();
    let mut tasks = tokio::task::JoinSet::new();
    let deadline = Instant::now() + timeout;
    while started.len() < jobs {
        assert!(
            Instant::now() < deadline,
            "only {} of {jobs} pods created within {timeout:?}:\n{}",
            started.len(),
            kiln.logs()
        );
        for name in kube.creations() {
            if started.contains(&name) || !job_id(&name).is_some_and(|id| ids.contains(&id)) {
                continue;
            }
            let index = started.len();
            started.insert(name.clone());
            let (pods, limit) = (pods.clone(), Arc::clone(&limit));
            tasks.spawn(async move {
                let _slot = limit.acquire_owned().await;
                patch_status(&pods, &name, &running_status(index)).await;
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while tasks.join_next().await.is_some() {}
}

/// Plays the agents: every job of `ids` is finished in GitLab and its build container ends
/// with the reported result; returns once kiln deleted every pod and Secret.
async fn finish_pods(
    gitlab: &GitLabServer,
    kube: &KubeServer,
    kiln: &Coordinator,
    pods: &Api<Pod>,
    ids: &[u64],
    timeout: Duration,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(DRIVER_PARALLELISM));
    let mut tasks = tokio::task::JoinSet::new();
    let http_client = reqwest::Client::new();
    for &id in ids {
        let token = gitlab.job(id).token;
        let (pods, limit, client) = (pods.clone(), Arc::clone(&limit), http_client.clone());
        let url = format!("{}api/v4/jobs/{id}", gitlab.url());
        tasks.spawn(async move {
            let _slot = limit.acquire_owned().await;
            let body = json!({"token": token, "state": "success", "exit_code": 0});
            let answer = client.put(&url).json(&body).send().await;
            assert!(
                answer.as_ref().is_ok_and(|a| a.status() == 200),
                "finishing job {id} in GitLab: {answer:?}"
            );
            patch_status(&pods, &format!("kiln-gl-{id}"), &finished_status()).await;
        });
    }
    while tasks.join_next().await.is_some() {}
    let deadline = Instant::now() + timeout;
    loop {
        let left = {
            let snapshot = kube.snapshot();
            snapshot.pods.len() + snapshot.secrets.len()
        };
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} pods and Secrets left after {timeout:?}:\n{}",
            kiln.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The status page with `status_builds` finished builds in its history: each URL timed
/// `status_requests` times, one request after another; then as many builds again run at once
/// while RSS is measured, the history still full.
pub(crate) async fn run_status(options: &Options) -> StatusFigures {
    let jobs = options.status_builds.max(1);
    progress(&format!("status page: {jobs} builds into the history"));
    let gitlab = gitlab(options).await;
    let DrivenCluster {
        kube,
        section,
        _dir,
    } = driven_cluster(options).await;
    let http = free_addr();
    let section = format!(
        "{section}\n[status]\nhistory = {jobs}\n\n[cost]\nprice_per_vcpu_hour = 0.04\nprice_per_gib_hour = 0.005\n"
    );
    let text = config(&gitlab, options, &http, "kubernetes", &section);
    let kiln = Coordinator::start(&options.kiln_path(), &text, &http);
    let pods: Api<Pod> = Api::namespaced(kube.client(NAMESPACE), NAMESPACE);

    // Round one: `jobs` builds run and finish; the history is then full.
    let round = |prefix: &'static str| {
        (0..jobs)
            .map(|i| gitlab.enqueue(job_json(&format!("{prefix}-{i}"), &["echo hello"])))
            .collect::<Vec<u64>>()
    };
    let first = round("history");
    run_pods(
        &kube,
        &kiln,
        &pods,
        &first.iter().copied().collect(),
        create_timeout(options, jobs),
    )
    .await;
    finish_pods(
        &gitlab,
        &kube,
        &kiln,
        &pods,
        &first,
        cleanup_timeout(options, jobs),
    )
    .await;
    let client = reqwest::Client::new();
    let base = format!("http://{http}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer: Value = client
            .get(format!("{base}/api/v1/builds"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let kept = answer["builds"].as_array().map_or(0, Vec::len);
        if kept >= jobs {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the history holds {kept} of {jobs} builds:\n{}",
            kiln.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, rss_history_only_kib) = kiln.memory();

    progress(&format!(
        "status page: timing {} requests of each URL",
        options.status_requests
    ));
    let mut pages = Vec::new();
    for path in [
        "/".to_owned(),
        format!("/?show={jobs}"),
        "/api/v1/builds".to_owned(),
        "/api/v1/sources".to_owned(),
    ] {
        let mut samples = Vec::new();
        let mut bytes = 0;
        for _ in 0..options.status_requests.max(1) {
            let sent = Instant::now();
            let response = client.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(response.status(), 200, "GET {path}");
            bytes = response.bytes().await.unwrap().len();
            samples.push(sent.elapsed());
        }
        pages.push(PageTiming {
            path,
            latency: Spread::of(samples),
            bytes,
        });
    }

    // Round two: as many builds run at once, the history still full.
    progress(&format!(
        "status page: {jobs} concurrent builds with the history full"
    ));
    let second = round("concurrent");
    run_pods(
        &kube,
        &kiln,
        &pods,
        &second.iter().copied().collect(),
        create_timeout(options, jobs),
    )
    .await;
    wait_quiet(&kube, create_timeout(options, jobs)).await;
    let (hwm_kib, rss_kib) = kiln.memory();
    StatusFigures {
        history: jobs,
        pages,
        concurrent: jobs,
        rss_kib,
        hwm_kib,
        rss_history_only_kib,
    }
}

/// Waits until the API server saw no request for 2 s (at most `timeout`).
async fn wait_quiet(kube: &KubeServer, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut seen = kube.requests().len();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = kube.requests().len();
        if now == seen || Instant::now() > deadline {
            return;
        }
        seen = now;
    }
}

fn last_pod_create(requests: &[RequestRecord]) -> Option<Instant> {
    requests
        .iter()
        .filter(|r| r.method == "POST" && path_of(r).ends_with("/pods") && r.status == 201)
        .map(|r| r.at)
        .max()
}

async fn measure_idle_window(
    options: &Options,
    gitlab: &GitLabServer,
    kube: &KubeServer,
    kiln: &Coordinator,
) -> Idle {
    // The first request, without `X-GitLab-Last-Update`, is answered at once; the window opens
    // with the second, the first one held.
    wait_until(
        "kiln's second jobs/request",
        Duration::from_secs(30),
        kiln,
        || gitlab.polls().len() >= 2,
    )
    .await;
    let opened = gitlab.polls()[1].at;
    let cpu_a = kiln.cpu_secs();
    let cpu_at = Instant::now();
    let window = Duration::from_secs(options.idle_secs);
    tokio::time::sleep((opened + window).saturating_duration_since(Instant::now())).await;
    let cpu_millicores = (kiln.cpu_secs() - cpu_a) / cpu_at.elapsed().as_secs_f64() * 1000.0;
    let closed = opened + window;
    let in_window = |at: Instant| at >= opened && at <= closed;
    let polls: Vec<Instant> = gitlab
        .polls()
        .iter()
        .map(|p| p.at)
        .filter(|at| in_window(*at))
        .collect();
    let polls_per_minute = match (polls.first(), polls.last()) {
        (Some(first), Some(last)) if polls.len() > 1 => {
            (polls.len() - 1) as f64 * 60.0 / (*last - *first).as_secs_f64()
        }
        // A single poll held for the whole window.
        _ => 60.0 / window.as_secs_f64(),
    };
    let gitlab_requests = gitlab.requests().iter().filter(|r| in_window(r.at)).count();
    let kube_requests = kube.requests().iter().filter(|r| in_window(r.at)).count();
    let (hwm_kib, rss_kib) = kiln.memory();
    Idle {
        window,
        polls: polls.len(),
        polls_per_minute,
        gitlab_requests,
        kube_requests,
        rss_kib,
        hwm_kib,
        cpu_millicores,
    }
}

fn burst_figures(
    gitlab: &GitLabServer,
    ids: &[u64],
    requests: &[RequestRecord],
    queued_at: Instant,
    finish_start: Instant,
    options: &Options,
) -> Burst {
    let created = |kind: &str| -> HashMap<String, Instant> {
        requests
            .iter()
            .filter(|r| r.method == "POST" && path_of(r).ends_with(kind) && r.status == 201)
            .filter_map(|r| Some((r.name.clone()?, r.at)))
            .collect()
    };
    let pod_posts = created("/pods");
    let secret_posts = created("/secrets");
    // The first PUT jobs/:id of each job is its two-phase acknowledge.
    let mut acks: BTreeMap<u64, Instant> = BTreeMap::new();
    for r in gitlab.requests() {
        if r.method == "PUT"
            && let Some(id) = r
                .path
                .strip_prefix("/api/v4/jobs/")
                .and_then(|s| s.parse().ok())
        {
            acks.entry(id).or_insert(r.at);
        }
    }
    let mut dispatch = Vec::new();
    let mut unthrottled = Vec::new();
    let (mut to_secret, mut secret_to_ack, mut ack_to_pod) = (Vec::new(), Vec::new(), Vec::new());
    let mut handouts = Vec::new();
    // Jobs started from the saved-up burst never wait for a token (3 calls each).
    let free_starts = (options.burst / 3) as usize;
    let mut by_handout: Vec<(Instant, u64)> = Vec::new();
    for &id in ids {
        let job = gitlab.job(id);
        let name = format!("kiln-gl-{id}");
        let (Some(handed), Some(pod)) = (job.handed_out_at, pod_posts.get(&name)) else {
            continue;
        };
        handouts.push(handed);
        by_handout.push((handed, id));
        dispatch.push(pod.saturating_duration_since(handed));
        if let (Some(ack), Some(secret)) = (acks.get(&id), secret_posts.get(&name)) {
            to_secret.push(secret.saturating_duration_since(handed));
            secret_to_ack.push(ack.saturating_duration_since(*secret));
            ack_to_pod.push(pod.saturating_duration_since(*ack));
        }
    }
    by_handout.sort();
    for (handed, id) in by_handout.iter().take(free_starts) {
        if let Some(pod) = pod_posts.get(&format!("kiln-gl-{id}")) {
            unthrottled.push(pod.saturating_duration_since(*handed));
        }
    }
    let rate = |mut times: Vec<Instant>| {
        times.sort();
        match (times.first(), times.last()) {
            (Some(a), Some(b)) if times.len() > 1 && b > a => {
                (times.len() - 1) as f64 / (*b - *a).as_secs_f64()
            }
            _ => 0.0,
        }
    };
    let pod_times: Vec<Instant> = pod_posts.values().copied().collect();
    let pods_per_sec = rate(pod_times.clone());
    let (first, last) = (
        pod_times.iter().min().copied().unwrap_or(queued_at),
        pod_times.iter().max().copied().unwrap_or(queued_at),
    );
    let kiln_calls: Vec<&RequestRecord> = requests
        .iter()
        .filter(|r| is_kiln_call(r) && !is_watch(r) && r.at >= queued_at)
        .collect();
    let opened = kiln_calls.iter().map(|r| r.at).min().unwrap_or(first);
    let in_window = kiln_calls
        .iter()
        .filter(|r| r.at >= opened && r.at <= last)
        .count();
    let window = (last - opened).as_secs_f64();
    let calls_per_sec = if window > 0.0 {
        in_window as f64 / window
    } else {
        0.0
    };
    let budget = f64::from(options.burst) + options.qps * window;
    let budget_used = (in_window as f64 / budget).min(1.0);
    let start_calls = kiln_calls.iter().filter(|r| r.at < finish_start).count();
    let cleanup_calls = kiln_calls.len() - start_calls;
    let n = ids.len().max(1) as f64;
    Burst {
        jobs: ids.len(),
        dispatch: Spread::of(dispatch),
        dispatch_unthrottled: Spread::of(unthrottled),
        to_secret: Spread::of(to_secret),
        secret_to_ack: Spread::of(secret_to_ack),
        ack_to_pod: Spread::of(ack_to_pod),
        pods_per_sec,
        calls_per_sec,
        budget_used,
        calls_per_start: start_calls as f64 / n,
        calls_per_cleanup: cleanup_calls as f64 / n,
        handout_per_sec: rate(handouts),
    }
}

async fn run_local(options: &Options) -> Local {
    let gitlab = gitlab(options).await;
    let dir = tempfile::tempdir().unwrap();
    let http = free_addr();
    let local = format!("[local]\nwork_dir = \"{}\"\n", dir.path().display());
    let text = config(&gitlab, options, &http, "local", &local);
    let kiln = Coordinator::start(&options.kiln_path(), &text, &http);
    let (mut first_trace, mut finished) = (Vec::new(), Vec::new());
    let sleep = format!("sleep {}", options.local_sleep_secs);
    for i in 0..options.local_jobs {
        let id = gitlab.enqueue(job_json(&format!("local-{i}"), &["echo started", &sleep]));
        let timeout = Duration::from_secs(60 + options.local_sleep_secs);
        wait_until("a local job to finish", timeout, &kiln, || {
            matches!(gitlab.job(id).state.as_str(), "success" | "failed")
        })
        .await;
        let job = gitlab.job(id);
        assert_eq!(
            job.state,
            "success",
            "local job {id}: {}\n{}",
            job.trace,
            kiln.logs()
        );
        let handed = job
            .handed_out_at
            .unwrap_or_else(|| unreachable!("a finished job was handed out"));
        if let Some(patch) = job.patches.iter().find(|p| p.status == 202 && p.len > 0) {
            first_trace.push(patch.at.saturating_duration_since(handed));
        }
        if let Some(done) = job.finished_at {
            finished.push(done.saturating_duration_since(handed));
        }
    }
    Local {
        first_trace: Spread::of(first_trace),
        finished: Spread::of(finished),
    }
}

const GITHUB_REPO: &str = "acme/widgets";
const GITHUB_TOKEN: &str = "github_pat_bench0123456789";
const GITHUB_HOOK_SECRET: &str = "bench-webhook-secret-0123";

/// `METHOD route` of a GitHub REST path: ids, owners and repositories replaced, the query
/// dropped (`GET /repos/{owner}/{repo}/actions/runs/{id}/jobs`).
fn github_call_kind(method: &str, path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    let mut route = Vec::new();
    let mut names = 0;
    for part in path.trim_matches('/').split('/') {
        let part = if names > 0 {
            names -= 1;
            if names == 1 { "{owner}" } else { "{name}" }
        } else if part.chars().all(|c| c.is_ascii_digit()) {
            "{id}"
        } else {
            part
        };
        match part {
            "repos" => names = 2,
            "orgs" => names = 1,
            _ => {}
        }
        route.push(part);
    }
    format!("{method} /{}", route.join("/"))
}

/// A `kiln run` config with one `[[sources.github]]` of `scope` (its scope and timing lines),
/// at `(concurrent, qps, burst)`.
fn github_kiln_config(
    http: &str,
    kubeconfig: &Path,
    (concurrent, qps, burst): (usize, f64, u32),
    api: &str,
    scope: &str,
) -> String {
    format!(
        r#"concurrent = {concurrent}
executor = "kubernetes"

[http]
listen = "{http}"

[log]
format = "json"
level = "info"

[kubernetes]
kubeconfig = "{kubeconfig}"
helper_image = "{HELPER_IMAGE}"
qps = {qps:?}
burst = {burst}

[[sources.github]]
name = "bench"
api_url = "{api}"
{scope}
token = "{GITHUB_TOKEN}"
labels = ["kiln"]
webhook_secret = "{GITHUB_HOOK_SECRET}"
"#,
        kubeconfig = kubeconfig.display(),
    )
}

async fn run_github(options: &Options) -> GitHubLevel {
    let jobs = options.github_jobs;
    let github = GitHubServer::start().await;
    github.add_repo(GITHUB_REPO);
    github.add_pat(GITHUB_TOKEN, "acme", Access::all());
    let kube = KubeServer::start().await;
    kube.set_latency(Duration::from_millis(options.latency_ms));
    kube.alias_binary("/home/runner/run.sh", fake_runner_bin());
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.kubeconfig(&kubeconfig, NAMESPACE);
    let http = free_addr();
    let text = github_kiln_config(
        &http,
        &kubeconfig,
        (jobs, options.qps, options.burst),
        &github.url(),
        "owner = \"acme\"\nrepo = \"widgets\"",
    );
    let kiln = Coordinator::start(&options.kiln_path(), &text, &http);
    github.set_webhook(&format!("http://{http}/hooks/github"), GITHUB_HOOK_SECRET);
    // The first reconcile pass (at start) ends with the runners listing.
    wait_until(
        "kiln's first GitHub reconcile",
        Duration::from_secs(30),
        &kiln,
        || {
            github
                .requests()
                .iter()
                .any(|r| r.path.contains("/actions/runners"))
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let github_before = github.requests().len();
    let kube_before = kube.requests().len();

    let queued_at = Instant::now();
    let mut ids = Vec::new();
    for i in 0..jobs {
        let run = github.enqueue_run(
            GITHUB_REPO,
            RunSpec::new("CI").job(
                JobSpec::new(&format!("build-{i}"), &["self-hosted", "kiln"])
                    .runs_for(Duration::from_millis(500)),
            ),
        );
        ids.extend(run.job_ids);
    }
    let timeout = Duration::from_secs(120) + Duration::from_secs_f64(jobs as f64 * 0.5);
    wait_until("every GitHub job completed", timeout, &kiln, || {
        ids.iter()
            .all(|id| github.job(*id).is_some_and(|j| j.status == "completed"))
    })
    .await;
    let all_completed = queued_at.elapsed();
    wait_until(
        "every runner pod gone",
        Duration::from_secs(60),
        &kiln,
        || kube.pods().is_empty(),
    )
    .await;
    // Let the deletes and the last registration checks land.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let deliveries = github.deliveries();
    let requests = kube.requests();
    let creates: HashMap<String, Instant> = requests
        .iter()
        .filter(|r| r.method == "POST" && r.status == 201 && path_of(r).ends_with("/pods"))
        .filter_map(|r| Some((r.name.clone()?, r.at)))
        .collect();
    let mut latencies = Vec::new();
    for id in &ids {
        let Some(delivery) = deliveries
            .iter()
            .find(|d| d.job_id == *id && d.action == "queued" && !d.redelivery)
        else {
            continue;
        };
        if let Some(created) = creates.get(&format!("kiln-gh-{id}")) {
            latencies.push(created.saturating_duration_since(delivery.queued_at));
        }
    }
    let mut github_calls_by_kind = BTreeMap::new();
    let github_calls = github.requests()[github_before..].to_vec();
    for r in &github_calls {
        *github_calls_by_kind
            .entry(github_call_kind(&r.method, &r.path))
            .or_insert(0) += 1;
    }
    let kube_calls = requests[kube_before..]
        .iter()
        .filter(|r| is_kiln_call(r) && !is_watch(r))
        .count();
    GitHubLevel {
        jobs,
        webhook_to_pod: Spread::of(latencies),
        all_completed,
        github_calls_per_job: github_calls.len() as f64 / jobs as f64,
        github_calls_by_kind,
        kube_calls_per_job: kube_calls as f64 / jobs as f64,
        pods_created: kube
            .creations()
            .iter()
            .filter(|n| n.starts_with("kiln-gh-"))
            .count(),
    }
}

/// CPU model, core count and memory, from `/proc`.
/// The replica label of every pod, by pod name.
fn replicas_of_pods(kube: &KubeServer) -> HashMap<String, String> {
    kube.pods()
        .into_iter()
        .filter_map(|pod| {
            let name = pod.metadata.name?;
            let replica = pod.metadata.labels?.get("kiln.dev/replica")?.clone();
            Some((name, replica))
        })
        .collect()
}

/// Each round: replica a takes half the jobs, replica b the rest; a is killed, and the time
/// until b has claimed every build of a is measured; then a rolling update: c starts, b gets
/// SIGTERM, and the time until c has every build is measured.
pub(crate) async fn run_failover(options: &Options) -> Failover {
    let jobs = options.failover_jobs;
    let mut samples = Vec::new();
    let mut moved = 0;
    let mut duplicates = 0;
    let mut rolling_exit = Vec::new();
    let mut rolling_handed_over = Vec::new();
    let mut lapses = 0;
    for round in 0..options.failover_rounds {
        let gitlab = gitlab(options).await;
        let DrivenCluster {
            kube,
            section,
            _dir,
        } = driven_cluster(options).await;
        let kube_section = format!(
            "{section}lease_duration = \"{}s\"\nlease_renew = \"{}s\"\n",
            options.lease_secs, options.renew_secs
        );
        let start = |replica: &str, system_id: &str| {
            let http = free_addr();
            let mut text = config(&gitlab, options, &http, "kubernetes", &kube_section);
            text = text.replace("s_0123456789ab", system_id).replacen(
                &format!("concurrent = {}\n", options.jobs.max(1)),
                &format!("concurrent = {jobs}\n"),
                1,
            );
            Coordinator::start_with_env(
                &options.kiln_path(),
                &text,
                &http,
                &[("KILN_KUBERNETES__REPLICA", replica)],
            )
        };
        let (a_name, b_name) = (format!("bench-a-{round}"), format!("bench-b-{round}"));
        let first = jobs.div_ceil(2);
        let mut a = start(&a_name, "s_00000000000a");
        for i in 0..first {
            gitlab.enqueue(job_json(&format!("failover-{i}"), &["echo hello"]));
        }
        wait_until("replica a's builds", Duration::from_secs(120), &a, || {
            kube.creations().len() == first
        })
        .await;
        let b = start(&b_name, "s_00000000000b");
        for i in first..jobs {
            gitlab.enqueue(job_json(&format!("failover-{i}"), &["echo hello"]));
        }
        wait_until("replica b's builds", Duration::from_secs(120), &b, || {
            kube.creations().len() == jobs
        })
        .await;
        // b has seen a alive (a Lease round of each) before a dies, at a random point of a's
        // renew period (the failover time depends on it).
        let jitter = Duration::from_secs(options.renew_secs).mul_f64(rand::random::<f64>());
        tokio::time::sleep(Duration::from_secs(2 * options.renew_secs) + jitter).await;
        let victims: Vec<String> = replicas_of_pods(&kube)
            .into_iter()
            .filter(|(_, replica)| *replica == a_name)
            .map(|(name, _)| name)
            .collect();
        gitlab.set_job_latency(Duration::from_millis(options.failover_gitlab_ms));
        let _ = a.child.kill();
        let killed = Instant::now();
        let _ = a.child.wait();
        let limit = Duration::from_secs(options.lease_secs + options.renew_secs) * 3
            + Duration::from_secs(jobs as u64 / 10);
        wait_until("the take-over", limit, &b, || {
            lapses += usize::from(lease_lapsed(&kube, &b_name));
            let now = replicas_of_pods(&kube);
            victims
                .iter()
                .all(|name| now.get(name).is_some_and(|r| *r == b_name))
        })
        .await;
        samples.push(killed.elapsed());
        moved += victims.len();
        progress(&format!(
            "failover round {round}: {} builds taken over in {}",
            victims.len(),
            ms(killed.elapsed())
        ));

        // The rolling update the chart performs (maxSurge 1): a new replica c starts, then
        // the old one, b, gets SIGTERM; c takes every build over.
        let c_name = format!("bench-c-{round}");
        let c = start(&c_name, "s_00000000000c");
        tokio::time::sleep(Duration::from_secs(2 * options.renew_secs)).await;
        let mut b = b;
        let terminated = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &b.pid().to_string()])
            .status();
        let exit_limit = Duration::from_secs(options.hold_secs + 60);
        loop {
            if b.child.try_wait().ok().flatten().is_some() {
                break;
            }
            assert!(
                terminated.elapsed() < exit_limit,
                "b did not exit:\n{}",
                b.logs()
            );
            lapses += usize::from(lease_lapsed(&kube, &c_name));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let exited = Instant::now();
        if std::env::var_os("BENCH_SHOW_EXIT").is_some() {
            let logs = b.logs();
            let tail: Vec<&str> = logs.lines().rev().take(40).collect();
            progress(&format!(
                "b's last log lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        rolling_exit.push(exited - terminated);
        let all: Vec<String> = replicas_of_pods(&kube).into_keys().collect();
        let deadline = Instant::now() + limit * 4;
        loop {
            let now = replicas_of_pods(&kube);
            if all
                .iter()
                .all(|name| now.get(name).is_some_and(|r| *r == c_name))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the hand-over to c:\n{}",
                c.logs()
            );
            lapses += usize::from(lease_lapsed(&kube, &c_name));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rolling_handed_over.push(exited.elapsed());
        progress(&format!(
            "rolling update round {round}: b exited {} after SIGTERM; {} builds handed over to c {} after",
            ms(exited - terminated),
            all.len(),
            ms(exited.elapsed())
        ));
        let created = kube.creations();
        let unique: HashSet<&String> = created.iter().collect();
        duplicates += created.len() - unique.len();
        gitlab.set_job_latency(Duration::ZERO);
        drop(c);
    }
    Failover {
        jobs,
        taken_over: Spread::of(samples),
        builds_moved: moved,
        duplicates,
        rolling_exit: Spread::of(rolling_exit),
        rolling_handed_over: Spread::of(rolling_handed_over),
        lease_lapses: lapses,
    }
}

/// Whether Lease `<replica>`'s own Lease has lapsed now (`renewTime + leaseDurationSeconds`
/// passed); false when it does not exist (yet).
fn lease_lapsed(kube: &KubeServer, replica: &str) -> bool {
    let suffix = format!("-{replica}");
    kube.leases()
        .into_iter()
        .filter(|l| {
            l.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.ends_with(&suffix))
        })
        .filter_map(|l| {
            let spec = l.spec?;
            let renewed = std::time::SystemTime::from(spec.renew_time?.0);
            let duration = u64::try_from(spec.lease_duration_seconds?).ok()?;
            Some(renewed + Duration::from_secs(duration))
        })
        .any(|lapses| lapses < std::time::SystemTime::now())
}

pub(crate) fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024)
    };
    format!(
        "{model}, {cores} cores, {} MiB memory ({} MiB available)",
        mem("MemTotal:"),
        mem("MemAvailable:")
    )
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn spread(s: &Spread) -> String {
    format!(
        "p50 {} / p99 {} / max {} (n={})",
        ms(s.p50),
        ms(s.p99),
        ms(s.max),
        s.count
    )
}

impl Report {
    /// The results as text, one figure a line.
    pub(crate) fn render(&self) -> String {
        let o = &self.options;
        let b = &self.burst;
        let i = &self.idle;
        let mut out = String::new();
        let _ = writeln!(out, "machine: {}", self.machine);
        let _ = writeln!(
            out,
            "settings: {} jobs, API latency {} ms, qps {} / burst {}, steady {}s, long-poll hold {}s",
            o.jobs, o.latency_ms, o.qps, o.burst, o.steady_secs, o.hold_secs
        );
        let _ = writeln!(out, "\n## dispatch ({} jobs queued at once)", b.jobs);
        let _ = writeln!(
            out,
            "201 -> POST pods:                 {}",
            spread(&b.dispatch)
        );
        let _ = writeln!(
            out,
            "  same, starts within the burst:  {}",
            spread(&b.dispatch_unthrottled)
        );
        let _ = writeln!(
            out,
            "  201 -> POST secrets:            {}",
            spread(&b.to_secret)
        );
        let _ = writeln!(
            out,
            "  POST secrets -> acknowledge:    {}",
            spread(&b.secret_to_ack)
        );
        let _ = writeln!(
            out,
            "  acknowledge -> POST pods:       {}",
            spread(&b.ack_to_pod)
        );
        let _ = writeln!(out, "GitLab handed out {:.0} jobs/s", b.handout_per_sec);
        let _ = writeln!(
            out,
            "\n## burst throughput\npods created: {:.1}/s = {:.0}% of qps {}; kiln API calls {:.1}/s, {:.0}% of the budget (burst {} + qps x time)",
            b.pods_per_sec,
            b.pods_per_sec / o.qps * 100.0,
            o.qps,
            b.calls_per_sec,
            b.budget_used * 100.0,
            o.burst
        );
        let _ = writeln!(
            out,
            "API calls per job: {:.2} to start, {:.2} to clean up",
            b.calls_per_start, b.calls_per_cleanup
        );
        let _ = writeln!(out, "\n## footprint");
        let _ = writeln!(
            out,
            "idle: RSS {} (peak {}), CPU {:.2} millicores over {}s",
            mib(i.rss_kib),
            mib(i.hwm_kib),
            i.cpu_millicores,
            i.window.as_secs()
        );
        for l in &self.levels {
            let _ = writeln!(
                out,
                "{} jobs: RSS {} while running (peak {}), CPU {:.2} millicores steady over {}s, {:.2} CPU s in all; created in {:.1}s, cleaned up in {:.1}s, {} API calls",
                l.jobs,
                mib(l.rss_kib),
                mib(l.hwm_kib),
                l.steady_millicores,
                l.steady.as_secs(),
                l.cpu_secs,
                l.create.as_secs_f64(),
                l.cleanup.as_secs_f64(),
                l.api_calls
            );
            let kinds: Vec<String> = l
                .calls_by_kind
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(out, "    calls: {}", kinds.join(", "));
        }
        let _ = writeln!(
            out,
            "\n## idle cost\n{} jobs/request in {}s: {:.2} requests/minute ({} GitLab requests, {} Kubernetes requests in the window)",
            i.polls,
            i.window.as_secs(),
            i.polls_per_minute,
            i.gitlab_requests,
            i.kube_requests
        );
        let _ = writeln!(
            out,
            "\n## local executor\n201 -> first trace byte: {}\n201 -> job finished:     {}",
            spread(&self.local.first_trace),
            spread(&self.local.finished)
        );
        if let Some(g) = &self.github {
            let _ = writeln!(
                out,
                "\n## github ({} jobs queued at once, one workflow_job webhook each)\nwebhook -> POST pods: {}\nall completed in {:.1}s; {} runner pods; API calls per job: {:.2} GitHub, {:.2} Kubernetes",
                g.jobs,
                spread(&g.webhook_to_pod),
                g.all_completed.as_secs_f64(),
                g.pods_created,
                g.github_calls_per_job,
                g.kube_calls_per_job
            );
            let kinds: Vec<String> = g
                .github_calls_by_kind
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(out, "    GitHub calls: {}", kinds.join(", "));
        }
        if let Some(f) = &self.failover {
            out.push_str(&render_failover(o, f));
        }
        if let Some(status) = &self.status {
            out.push('\n');
            out.push_str(&status.render());
        }
        out
    }
}

impl StatusFigures {
    /// The status page's figures as text.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "## status page ({} finished builds in the history)",
            self.history
        );
        for page in &self.pages {
            let _ = writeln!(
                out,
                "GET {:<22} {} ({} KiB)",
                page.path,
                spread(&page.latency),
                page.bytes / 1024
            );
        }
        let _ = writeln!(
            out,
            "RSS with the history full: {} idle; {} with {} builds running (peak {})",
            mib(self.rss_history_only_kib),
            mib(self.rss_kib),
            self.concurrent,
            mib(self.hwm_kib)
        );
        out
    }
}

/// The failover level's figures as text.
pub(crate) fn render_failover(o: &Options, f: &Failover) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## failover (2 replicas, {} builds, Lease {}s / renew {}s, qps {} / burst {})\nkill -> every build of the killed replica taken over: {}; {} builds moved, {} created twice",
        f.jobs,
        o.lease_secs,
        o.renew_secs,
        o.qps,
        o.burst,
        spread(&f.taken_over),
        f.builds_moved,
        f.duplicates
    );
    let _ = writeln!(
        out,
        "rolling update (new replica c starts, b gets SIGTERM; all {} builds): SIGTERM -> b exited {}; b exited -> every build handed over to c {}",
        f.jobs,
        spread(&f.rolling_exit),
        spread(&f.rolling_handed_over)
    );
    let _ = writeln!(
        out,
        "GitLab latency per job call during take-overs: {} ms; a live replica's own Lease seen lapsed: {} times",
        o.failover_gitlab_ms, f.lease_lapses
    );
    out
}

/// What the GitHub organization level measured: API calls of the reconciles of an idle
/// organization and during a burst of jobs over its repositories.
#[derive(Debug, Clone)]
pub(crate) struct GitHubOrgLevel {
    repos: usize,
    jobs: usize,
    /// Reconcile passes measured while idle.
    idle_passes: usize,
    /// Requests of those passes: all, and answered with a body (counted by GitHub).
    idle_requests: usize,
    idle_counted: usize,
    /// Requests from the first job queued until all completed and the next two passes: all,
    /// and counted.
    burst_requests: usize,
    burst_counted: usize,
    burst_secs: f64,
    by_kind: BTreeMap<String, (usize, usize)>,
}

/// The reconcile interval and organization sweep of the level: kiln's defaults (60 s, 600 s)
/// scaled down by 12 so that an hour of passes takes 5 minutes; a pass does the same work.
const ORG_RECONCILE_SECS: u64 = 5;
const ORG_SWEEP_SECS: u64 = 50;

pub(crate) async fn run_github_org(options: &Options) -> GitHubOrgLevel {
    let github = GitHubServer::start().await;
    github.add_org("acme");
    let repos: Vec<String> = (0..options.github_org_repos)
        .map(|n| format!("acme/repo-{n:03}"))
        .collect();
    for repo in &repos {
        github.add_repo(repo);
    }
    github.add_pat(GITHUB_TOKEN, "acme", Access::all());
    let kube = KubeServer::start().await;
    kube.alias_binary("/home/runner/run.sh", fake_runner_bin());
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.kubeconfig(&kubeconfig, NAMESPACE);
    let http = free_addr();
    let text = github_kiln_config(
        &http,
        &kubeconfig,
        (200, 200.0, 400),
        &github.url(),
        &format!(
            "org = \"acme\"\nreconcile_interval = \"{ORG_RECONCILE_SECS}s\"\norg_sweep_interval = \"{ORG_SWEEP_SECS}s\""
        ),
    );
    let kiln = Coordinator::start(&options.kiln_path(), &text, &http);
    github.set_webhook(&format!("http://{http}/hooks/github"), GITHUB_HOOK_SECRET);
    // The first pass lists every repository; the idle passes after it are measured.
    wait_until(
        "kiln's first full pass",
        Duration::from_secs(120),
        &kiln,
        || {
            github
                .requests()
                .iter()
                .filter(|r| r.path.contains("/actions/runs?status=in_progress"))
                .count()
                >= repos.len()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(ORG_RECONCILE_SECS)).await;
    progress("github org: idle passes");
    let passes = |requests: &[crate::support::github::RequestRecord]| {
        requests
            .iter()
            .filter(|r| r.path.starts_with("/orgs/acme/repos") && r.path.ends_with("&page=1"))
            .count()
    };
    let idle_from = github.requests().len();
    tokio::time::sleep(Duration::from_secs(ORG_SWEEP_SECS * 2)).await;
    let idle = github.requests()[idle_from..].to_vec();
    let idle_passes = passes(&idle).max(1);
    let counted = |requests: &[crate::support::github::RequestRecord]| {
        requests.iter().filter(|r| r.status != 304).count()
    };

    progress(&format!("github org: {} jobs", options.github_org_jobs));
    let burst_from = github.requests().len();
    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..options.github_org_jobs {
        let repo = &repos[i % repos.len()];
        ids.push(github.enqueue_job(repo, &["self-hosted", "kiln"]));
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    wait_until(
        "every job of the organization completed",
        Duration::from_secs(900),
        &kiln,
        || {
            ids.iter()
                .all(|id| github.job(*id).is_some_and(|j| j.status == "completed"))
        },
    )
    .await;
    // The passes that see the queue empty again.
    tokio::time::sleep(Duration::from_secs(2 * ORG_RECONCILE_SECS)).await;
    let burst_secs = started.elapsed().as_secs_f64();
    let burst = github.requests()[burst_from..].to_vec();
    let mut by_kind: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in &burst {
        let entry = by_kind
            .entry(github_call_kind(&r.method, &r.path))
            .or_default();
        entry.0 += 1;
        if r.status != 304 {
            entry.1 += 1;
        }
    }
    let burst_requests = burst.len();
    let burst_counted = counted(&burst);
    drop(kiln);
    GitHubOrgLevel {
        repos: repos.len(),
        jobs: options.github_org_jobs,
        idle_passes,
        idle_requests: idle.len(),
        idle_counted: counted(&idle),
        burst_requests,
        burst_counted,
        burst_secs,
        by_kind,
    }
}

pub(crate) fn render_github_org(level: &GitHubOrgLevel) -> String {
    let per_pass = level.idle_requests as f64 / level.idle_passes as f64;
    let counted_per_pass = level.idle_counted as f64 / level.idle_passes as f64;
    let per_thousand = |n: usize| n as f64 * 1000.0 / level.jobs.max(1) as f64;
    let mut text = format!(
        "## github organization ({} repositories, reconcile every 60 s, sweep 600 s; run 12x faster)\n\
         idle: {:.1} requests per pass, {:.2} counted (not 304) -> {:.0} requests per hour, {:.0} counted\n\
         {} jobs in {:.1}s: {} requests, {} counted -> per 1,000 jobs {:.0} requests, {:.0} counted\n",
        level.repos,
        per_pass,
        counted_per_pass,
        per_pass * 60.0,
        counted_per_pass * 60.0,
        level.jobs,
        level.burst_secs,
        level.burst_requests,
        level.burst_counted,
        per_thousand(level.burst_requests),
        per_thousand(level.burst_counted),
    );
    for (kind, (all, counted)) in &level.by_kind {
        text.push_str(&format!("  {kind}: {all} ({counted} counted)\n"));
    }
    text
}

/// The pool's image in the warm pool level, and the cold jobs' image (no pool).
const WARM_IMAGE: &str = "maven:3.9-eclipse-temurin-21";
const COLD_IMAGE: &str = "gradle:8-jdk21";
/// `[cost]` prices of the warm pool level (ECI pay-as-you-go, cn-hangzhou, USD) and the size of
/// each build pod (`[kubernetes.build]` requests).
const PRICE_PER_VCPU_HOUR: f64 = 0.0431;
const PRICE_PER_GIB_HOUR: f64 = 0.0047;
const WARM_VCPU: f64 = 2.0;
const WARM_GIB: f64 = 4.0;

/// The warm pool level.
#[derive(Debug, Clone)]
pub(crate) struct WarmLevel {
    pub(crate) delay: Duration,
    pub(crate) pool: usize,
    /// Queued in GitLab → first trace line at GitLab, jobs that took an idle warm pod.
    pub(crate) warm: Spread,
    /// The same, jobs that started cold.
    pub(crate) cold: Spread,
    /// `kiln_warm_idle_cost_total` of the pool over the idle window, per hour.
    pub(crate) idle_cost_per_hour: f64,
    /// The same from the prices: pool × (vCPU × price + GiB × price).
    pub(crate) priced_per_hour: f64,
    pub(crate) idle_window: Duration,
    /// The jobs that said "started on warm pod" / "started cold" in their trace.
    pub(crate) said_warm: usize,
    pub(crate) said_cold: usize,
}

/// The warm pool's untaken pods: (name, Running).
fn warm_members(kube: &KubeServer) -> Vec<(String, bool)> {
    kube.pods()
        .into_iter()
        .filter(|pod| {
            pod.metadata.labels.as_ref().is_some_and(|l| {
                l.get("kiln.dev/warm-pool").is_some_and(|p| p == "bench")
                    && !l.contains_key("kiln.dev/job-id")
            })
        })
        .map(|pod| {
            let running = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Running");
            (pod.metadata.name.unwrap_or_default(), running)
        })
        .collect()
}

/// `kiln_warm_idle_cost_total{pool="bench"}` from kiln's `/metrics`.
async fn idle_cost(http: &str) -> f64 {
    let text = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("kiln_warm_idle_cost") && l.contains("pool=\"bench\""))
        .find_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// A job of `image` with no pull policy of its own.
fn job_of(name: &str, image: &str) -> Value {
    let mut job = job_json(name, &["echo started"]);
    job["image"]["name"] = json!(image);
    if let Some(image) = job["image"].as_object_mut() {
        image.remove("pull_policy");
    }
    job
}

/// Queued → first trace line of job `id`, waiting for it to succeed.
async fn first_line(
    gitlab: &GitLabServer,
    kiln: &Coordinator,
    id: u64,
    queued: Instant,
    timeout: Duration,
) -> (Duration, String) {
    wait_until("a job to finish", timeout, kiln, || {
        matches!(gitlab.job(id).state.as_str(), "success" | "failed")
    })
    .await;
    let job = gitlab.job(id);
    assert_eq!(
        job.state,
        "success",
        "job {id}: {}\n{}",
        job.trace,
        kiln.logs()
    );
    let first = job
        .patches
        .iter()
        .find(|p| p.status == 202 && p.len > 0)
        .map(|p| p.at.saturating_duration_since(queued))
        .unwrap_or_else(|| panic!("job {id} has no trace"));
    (first, job.trace)
}

/// The warm pool level: a real `kiln run` with a pool of `--warm-pool` pods for one image, the
/// test kubelet running every pod's containers (the agent too) after `--warm-delay-secs`.
pub(crate) async fn run_warm(options: &Options) -> WarmLevel {
    // The pods' kubelet runs it from its own directory.
    let kiln_path = std::fs::canonicalize(options.kiln_path()).unwrap();
    let gitlab = gitlab(options).await;
    gitlab.set_trace_interval(1);
    let kube = KubeServer::start().await;
    kube.alias_binary("/usr/local/bin/kiln", &kiln_path);
    let delay = Duration::from_secs(options.warm_delay_secs);
    kube.set_start_delay(delay);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.kubeconfig(&kubeconfig, NAMESPACE);
    let http = free_addr();
    let section = format!(
        r#"[kubernetes]
kubeconfig = "{kubeconfig}"
helper_image = "{HELPER_IMAGE}"
pending_timeout = "{pending}s"

[kubernetes.build]
cpu_request = "{WARM_VCPU}"
memory_request = "{WARM_GIB}Gi"
memory_limit = "{WARM_GIB}Gi"

[cost]
price_per_vcpu_hour = {PRICE_PER_VCPU_HOUR}
price_per_gib_hour = {PRICE_PER_GIB_HOUR}

[[warm_pools]]
name = "bench"
source = "gitlab"
image = "{WARM_IMAGE}"
min_idle = {pool}
"#,
        kubeconfig = kubeconfig.display(),
        pending = options.warm_delay_secs * 3 + 30,
        pool = options.warm_pool,
    );
    let mut text = config(&gitlab, options, &http, "kubernetes", &section);
    text = text.replacen(
        &format!("concurrent = {}", options.jobs.max(1)),
        &format!("concurrent = {}", options.warm_pool.max(1) * 2),
        1,
    );
    let kiln = Coordinator::start(&kiln_path, &text, &http);
    let pool = options.warm_pool;
    let start_wait = delay * 3 + Duration::from_secs(60);
    let full = |kube: &KubeServer| {
        let members = warm_members(kube);
        members.len() == pool && members.iter().all(|(_, running)| *running)
    };
    progress(&format!("warm: waiting for {pool} idle warm pods"));
    wait_until("the pool to fill", start_wait, &kiln, || full(&kube)).await;

    // What the idle pool costs, from kiln's own counter.
    let window = Duration::from_secs(options.warm_idle_secs);
    progress(&format!("warm: idle cost over {}s", window.as_secs()));
    let (before, at) = (idle_cost(&http).await, Instant::now());
    tokio::time::sleep(window).await;
    let after = idle_cost(&http).await;
    let measured = at.elapsed();
    let idle_cost_per_hour = (after - before) * 3600.0 / measured.as_secs_f64();

    let job_timeout = delay * 3 + Duration::from_secs(120);
    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    let (mut said_warm, mut said_cold) = (0, 0);
    for i in 0..options.warm_jobs {
        wait_until("the pool to refill", start_wait, &kiln, || full(&kube)).await;
        progress(&format!("warm: job {} of {}", i + 1, options.warm_jobs));
        let queued = Instant::now();
        let id = gitlab.enqueue(job_of(&format!("warm-{i}"), WARM_IMAGE));
        let (first, trace) = first_line(&gitlab, &kiln, id, queued, job_timeout).await;
        said_warm += usize::from(trace.contains("started on warm pod"));
        warm.push(first);
    }
    let mut remaining = options.cold_jobs;
    while remaining > 0 {
        let round = remaining.min(pool.max(1));
        progress(&format!("warm: {round} cold jobs"));
        let queued = Instant::now();
        let ids: Vec<u64> = (0..round)
            .map(|i| gitlab.enqueue(job_of(&format!("cold-{remaining}-{i}"), COLD_IMAGE)))
            .collect();
        for id in ids {
            let (first, trace) = first_line(&gitlab, &kiln, id, queued, job_timeout).await;
            said_cold += usize::from(trace.contains("started cold"));
            cold.push(first);
        }
        remaining -= round;
    }
    WarmLevel {
        delay,
        pool,
        warm: Spread::of(warm),
        cold: Spread::of(cold),
        idle_cost_per_hour,
        priced_per_hour: pool as f64
            * (WARM_VCPU * PRICE_PER_VCPU_HOUR + WARM_GIB * PRICE_PER_GIB_HOUR),
        idle_window: measured,
        said_warm,
        said_cold,
    }
}

/// The warm pool level as text.
pub(crate) fn render_warm(level: &WarmLevel) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "machine: {}", machine());
    let _ = writeln!(
        out,
        "warm pool level: kubelet start delay {} s, pool of {} ({} vCPU, {} GiB each; ${PRICE_PER_VCPU_HOUR}/vCPU-h, ${PRICE_PER_GIB_HOUR}/GiB-h)",
        level.delay.as_secs(),
        level.pool,
        WARM_VCPU,
        WARM_GIB
    );
    let _ = writeln!(
        out,
        "queued → first trace line, warm: {} ({} said \"started on warm pod\")",
        spread(&level.warm),
        level.said_warm
    );
    let _ = writeln!(
        out,
        "queued → first trace line, cold: {} ({} said \"started cold\")",
        spread(&level.cold),
        level.said_cold
    );
    let _ = writeln!(
        out,
        "idle cost of the pool: ${:.4}/hour measured (kiln_warm_idle_cost_total over {:.0} s), ${:.4}/hour from the prices",
        level.idle_cost_per_hour,
        level.idle_window.as_secs_f64(),
        level.priced_per_hour
    );
    out
}
