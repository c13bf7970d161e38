//! Chaos scenarios shared by `tests/chaos.rs` (short, in `cargo test`) and `examples/chaos`
//! (long, with `--seed`): real `kiln run` processes behind fault proxies, SIGKILLed at seeded
//! moments, and the history of the test servers checked afterwards — every job ended once with
//! the state its script asked for, no build launched twice, nothing left in the cluster.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::faults::{Fault, FaultPlan, FaultProxy};
use super::gitlab::{GitLabServer, job_json};
use super::kiln::{KilnProcess, config, kiln_bin, send_signal};
use super::kube::KubeServer;

/// What a scenario measured, for `docs/reliability.md` and the example's report.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub scenario: &'static str,
    pub seed: u64,
    pub jobs: usize,
    pub lost: usize,
    /// Jobs GitLab handed out moments before a SIGKILL, before kiln had stored them anywhere
    /// (see `in_claim_window` in `gitlab_kubernetes`): the runner protocol's one unavoidable loss.
    pub claim_window: usize,
    pub duplicates: usize,
    pub leaked: usize,
    pub kills: usize,
    /// Longest time from a restart until the first build ended after it.
    pub recovery: Duration,
    pub took: Duration,
    /// Requests per fault, per proxy.
    pub faults: BTreeMap<String, BTreeMap<String, usize>>,
    /// Everything kiln printed, all runs, for the secrets check.
    pub outputs: String,
}

impl Outcome {
    pub fn line(&self) -> String {
        format!(
            "{}: seed {} jobs {} lost {} claim-window {} duplicates {} leaked {} kills {} recovery {:.1}s took {:.1}s faults {:?}",
            self.scenario,
            self.seed,
            self.jobs,
            self.lost,
            self.claim_window,
            self.duplicates,
            self.leaked,
            self.kills,
            self.recovery.as_secs_f64(),
            self.took.as_secs_f64(),
            self.faults
        )
    }
}

/// Parameters of the GitLab-on-Kubernetes chaos run.
#[derive(Debug, Clone)]
pub struct GitLabChaos {
    pub seed: u64,
    pub jobs: usize,
    pub concurrency: usize,
    /// Share of requests faulted on each API.
    pub fault_rate: f64,
    pub kills: usize,
    /// How long a stalled request is held (past the long-poll timeout of the config below).
    pub stall: Duration,
    /// How long the whole run may take before the test fails.
    pub deadline: Duration,
}

/// Faults a `POST jobs/request` may get: only those that leave the job unassigned. A job GitLab
/// handed out whose answer never reached the runner is lost for every runner (GitLab hands a job
/// out once; its stuck-job worker fails it hours later) — no runner can do better, so the test
/// does not ask it to.
const BEFORE_THE_SERVER: &[Fault] = &[
    Fault::TooManyRequests,
    Fault::Status500,
    Fault::Status502,
    Fault::Status503,
    Fault::ResetBefore,
    Fault::Stall,
];

/// How soon after GitLab handed a job out a SIGKILL can catch it before its Secret exists:
/// the Secret create's retries (6, up to 10 s apart) plus one stalled call.
const CLAIM_WINDOW: Duration = Duration::from_secs(60);

/// The runner token of the chaos runs.
pub const RUNNER_TOKEN: &str = "glrt-fake-chaos-1";

/// Writes a kubeconfig for `kube` that points at `server` instead (the fault proxy).
pub fn kubeconfig_via(kube: &KubeServer, path: &Path, server: &str) {
    kube.kubeconfig(path, "ci");
    let text = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, text.replace(kube.url(), server)).unwrap();
}

/// GitLab jobs on the Kubernetes executor, faults on both APIs, the coordinator SIGKILLed
/// `kills` times at seeded moments and restarted at once. Panics (naming the seed) when a
/// promise is broken.
pub async fn gitlab_kubernetes(p: &GitLabChaos) -> Outcome {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(p.seed);
    let gitlab = GitLabServer::start().await;
    gitlab.add_runner_token(RUNNER_TOKEN);
    gitlab.set_long_poll_timeout(Duration::from_secs(2));
    gitlab.set_trace_interval(1);
    let kube = KubeServer::start().await;
    kube.alias_binary("/usr/local/bin/kiln", kiln_bin());

    let gitlab_proxy = FaultProxy::start(
        &gitlab.url(),
        FaultPlan::new(p.seed, p.fault_rate)
            .stall(p.stall)
            .allow(|method, path| {
                if method == hyper::Method::POST && path.starts_with("/api/v4/jobs/request") {
                    BEFORE_THE_SERVER
                } else {
                    &Fault::ALL
                }
            }),
    )
    .await;
    let kube_proxy = FaultProxy::start(
        kube.url(),
        FaultPlan::new(p.seed.wrapping_add(1), p.fault_rate).stall(p.stall),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kubeconfig_via(&kube, &kubeconfig, kube_proxy.url());
    // A stall must outlast the long-poll timeout to test it: 5 s here, and `p.stall` > 5 s.
    let text = config(
        &format!("{}/", gitlab_proxy.url()),
        RUNNER_TOKEN,
        &format!(
            r#"executor = "kubernetes"
concurrent = {concurrency}

[kubernetes]
kubeconfig = "{kubeconfig}"
helper_image = "kiln-test/kiln:dev"
pending_timeout = "60s"
image_pull_grace = "10s"
"#,
            concurrency = p.concurrency,
            kubeconfig = kubeconfig.display(),
        ),
    )
    .replace("poll_timeout = \"10s\"", "poll_timeout = \"5s\"");

    // Every third job fails with its own exit code; the others succeed. Each prints its own
    // masked variable in two writes 1.5 s apart (the trace is sent every second, so the value
    // is split across writes and trace patches) and its job token.
    let mut expected = BTreeMap::new();
    let mut secrets = vec![RUNNER_TOKEN.to_owned(), super::kube::TOKEN.to_owned()];
    let mut masked_values = BTreeMap::new();
    for i in 0..p.jobs {
        let fails = i % 3 == 2;
        let mut script = vec![
            "echo marker-$CI_JOB_ID",
            "printf '%s' \"$CHAOS_SECRET\" | head -c 9; sleep 1.5; printf '%s\\n' \"$CHAOS_SECRET\" | tail -c +10",
            "echo token $CI_JOB_TOKEN",
        ];
        script.push(if fails {
            "exit 3"
        } else {
            "echo done-$CI_JOB_ID"
        });
        let mut job = job_json(&format!("chaos {i}"), &script);
        let value = format!("chaos-secret-{i}-{:016x}", rng.random::<u64>());
        job["variables"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "key": "CHAOS_SECRET", "value": value, "public": false, "file": false,
                "masked": true, "raw": false
            }));
        let id = gitlab.enqueue(job);
        secrets.push(value.clone());
        secrets.push(gitlab.job(id).token);
        masked_values.insert(id, value);
        expected.insert(id, if fails { "failed" } else { "success" });
    }

    // Kill when this many jobs have finished (distinct, seeded, between 10 % and 80 %).
    let mut kill_at: Vec<usize> = (0..p.kills)
        .map(|_| rng.random_range(p.jobs / 10..=(p.jobs * 8 / 10).max(p.jobs / 10 + 1)))
        .collect();
    kill_at.sort_unstable();

    let finished = |gitlab: &GitLabServer| {
        expected
            .keys()
            .filter(|id| {
                matches!(
                    gitlab.job(**id).state.as_str(),
                    "success" | "failed" | "canceled"
                )
            })
            .count()
    };
    let mut kill_times: Vec<Instant> = Vec::new();
    // The one loss the runner protocol allows: GitLab assigns a job when it answers
    // `jobs/request`, and a coordinator SIGKILLed before it stored the job's Secret leaves no
    // trace of it anywhere but GitLab, which offers a job once (its stuck-job worker fails it
    // after the job timeout). Such a job was handed out shortly before a kill, and no Secret or
    // pod was ever created for it; anything else unfinished is a lost job.
    let in_claim_window = |gitlab: &GitLabServer, kube: &KubeServer, kills: &[Instant], id: u64| {
        let job = gitlab.job(id);
        let name = format!("kiln-gl-{id}");
        job.state == "running"
            && job.trace.is_empty()
            && job.handed_out_at.is_some_and(|at| {
                kills
                    .iter()
                    .any(|k| at <= *k && k.duration_since(at) < CLAIM_WINDOW)
            })
            && !kube.requests().iter().any(|r| {
                r.method == "POST" && r.name.as_deref() == Some(name.as_str()) && r.status < 300
            })
    };
    let mut outputs = String::new();
    // Every level of kiln's own logging, so that "not at any level" is what is checked.
    let env = [("RUST_LOG", "kiln=trace,info")];
    let mut kiln = KilnProcess::start_with_env(&text, &env);
    let mut kills = 0;
    let mut recovery = Duration::ZERO;
    let deadline = started + p.deadline;
    loop {
        let done = finished(&gitlab);
        // Every kill happens, even when the jobs outran the last kill moment: a restart with
        // nothing left to adopt is a restart too.
        if done == expected.len() && kills == kill_at.len() {
            break;
        }
        if kills == kill_at.len()
            && done
                + expected
                    .keys()
                    .filter(|id| in_claim_window(&gitlab, &kube, &kill_times, **id))
                    .count()
                == expected.len()
        {
            break;
        }
        if Instant::now() > deadline {
            outputs.push_str(&kiln.logs());
            save_logs("gitlab-kubernetes", p.seed, &outputs);
            let unfinished: Vec<String> = expected
                .keys()
                .map(|id| gitlab.job(*id))
                .filter(|job| !matches!(job.state.as_str(), "success" | "failed" | "canceled"))
                .map(|job| format!("job {} `{}`:\n{}", job.id, job.state, tail(&job.trace, 8)))
                .collect();
            panic!(
                "[chaos seed {}] {done} of {} jobs finished within {:?}; unfinished:\n{}\nkiln's last log:\n{}",
                p.seed,
                expected.len(),
                p.deadline,
                unfinished.join("\n"),
                tail(&kiln.logs(), 60)
            );
        }
        if kills < kill_at.len() && done >= kill_at[kills] {
            // Not right as a job ends (when the poller claims the next one at once, which would
            // aim every kill at the claim window): a seeded moment up to 3 s later.
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..3000))).await;
            send_signal(kiln.pid(), "KILL");
            kill_times.push(Instant::now());
            kiln.wait_exit(Duration::from_secs(10));
            outputs.push_str(&kiln.logs());
            kills += 1;
            eprintln!("[chaos seed {}] SIGKILL {kills} after {done} jobs", p.seed);
            kiln = KilnProcess::start_with_env(&text, &env);
            let restarted = Instant::now();
            let before = finished(&gitlab);
            while finished(&gitlab) == before
                && before
                    + expected
                        .keys()
                        .filter(|id| in_claim_window(&gitlab, &kube, &kill_times, **id))
                        .count()
                    < expected.len()
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            recovery = recovery.max(restarted.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Nothing left in the cluster once kiln has caught up with the last endings.
    let cleanup = Instant::now() + Duration::from_secs(60);
    while !(kube.pods().is_empty() && kube.secrets().is_empty()) && Instant::now() < cleanup {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What kiln shows of itself: its metrics and its status page, next to its logs.
    for path in ["/metrics", "/"] {
        let (status, body) = kiln.get(path).await;
        outputs.push_str(&format!("\n--- GET {path} ({status})\n{body}\n"));
    }
    outputs.push_str(&kiln.logs());
    let leaked = kube.pods().len() + kube.secrets().len();

    let mut problems = Vec::new();
    let mut lost = 0;
    let mut claim_window = 0;
    for (id, want) in &expected {
        let job = gitlab.job(*id);
        if in_claim_window(&gitlab, &kube, &kill_times, *id) {
            claim_window += 1;
            continue;
        }
        if job.state != *want {
            lost += 1;
            problems.push(format!(
                "job {id} ended `{}` ({:?}), its script asked for `{want}`; trace:\n{}",
                job.state, job.failure_reason, job.trace
            ));
            continue;
        }
        // Exactly once: every final update the job got says the same thing.
        let states: Vec<&str> = job
            .final_updates
            .iter()
            .filter_map(|u| u["state"].as_str())
            .collect();
        if states.iter().any(|s| s != want) {
            problems.push(format!("job {id} was finished as {states:?}"));
        }
        // Masked where GitLab masks: the split value and the job token.
        let value = &masked_values[id];
        if job.trace.contains(value.as_str())
            || job.trace.contains(&job.token)
            || !job.trace.contains("\n[MASKED]\n")
            || !job.trace.contains("token [MASKED]")
        {
            problems.push(format!(
                "job {id}: a secret is not masked in its trace:\n{}",
                job.trace
            ));
        }
        // The trace is what the agent sent: its output once, in order, nothing lost.
        let marker = format!("\nmarker-{id}\n");
        if job.trace.matches(&marker).count() != 1 {
            problems.push(format!(
                "job {id}: `marker-{id}` not once in its trace:\n{}",
                job.trace
            ));
        }
        if *want == "success" {
            let done = format!("\ndone-{id}\n");
            let (m, d) = (job.trace.find(&marker), job.trace.find(&done));
            if !(m.is_some() && d.is_some() && m < d) || job.trace.matches(&done).count() != 1 {
                problems.push(format!(
                    "job {id}: trace out of order or incomplete:\n{}",
                    job.trace
                ));
            }
        } else if job.exit_code != Some(3)
            || job.failure_reason.as_deref() != Some("script_failure")
        {
            problems.push(format!(
                "job {id}: failed with exit {:?}, reason {:?}; want 3, script_failure",
                job.exit_code, job.failure_reason
            ));
        }
    }
    let mut created = kube.creations();
    let total = created.len();
    created.sort();
    created.dedup();
    let duplicates = total - created.len();
    if duplicates > 0 {
        problems.push(format!(
            "{duplicates} pods were created twice: {:?}",
            kube.creations()
        ));
    }
    if leaked > 0 {
        problems.push(format!(
            "left in the cluster: pods {:?}, secrets {:?}",
            kube.pods()
                .iter()
                .map(|p| p.metadata.name.clone())
                .collect::<Vec<_>>(),
            kube.secrets()
                .iter()
                .map(|s| s.metadata.name.clone())
                .collect::<Vec<_>>()
        ));
    }
    // No secret kiln was given in anything kiln printed or served.
    for secret in &secrets {
        if outputs.contains(secret.as_str()) {
            let at = outputs.find(secret.as_str()).unwrap_or(0);
            let line = outputs[..at].rfind('\n').map_or(0, |n| n + 1);
            problems.push(format!(
                "a secret ({}…) is in kiln's output: {}",
                &secret[..6.min(secret.len())],
                outputs[line..]
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(300)
                    .collect::<String>()
            ));
        }
    }
    if let Some(v) = gitlab.violations().first() {
        problems.push(format!("GitLab protocol violation: {v}"));
    }
    let mut faults = BTreeMap::new();
    faults.insert("gitlab".to_owned(), gitlab_proxy.summary());
    faults.insert("kubernetes".to_owned(), kube_proxy.summary());
    let outcome = Outcome {
        scenario: "gitlab-kubernetes",
        seed: p.seed,
        jobs: expected.len(),
        lost,
        claim_window,
        duplicates,
        leaked,
        kills,
        recovery,
        took: started.elapsed(),
        faults,
        outputs,
    };
    eprintln!("[chaos] {}", outcome.line());
    save_logs("gitlab-kubernetes", p.seed, &outcome.outputs);
    assert!(
        problems.is_empty(),
        "[chaos seed {} — replay with KILN_CHAOS_SEED={}] {} problems:\n{}\n\nkiln's last log:\n{}",
        p.seed,
        p.seed,
        problems.len(),
        problems.join("\n"),
        tail(&kiln.logs(), 80)
    );
    outcome
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Writes every kiln log of a run to the temp directory (named in the test's output), for the
/// post-mortem of a failed seed.
pub fn save_logs(scenario: &str, seed: u64, logs: &str) {
    let path = std::env::temp_dir().join(format!("kiln-chaos-{scenario}-{seed}.log"));
    if std::fs::write(&path, logs).is_ok() {
        eprintln!("[chaos] kiln's logs of this run: {}", path.display());
    }
}

/// What [`gitlab_outage`] measured.
#[derive(Debug, Clone)]
pub struct OutageOutcome {
    pub outage: Duration,
    /// Connections and requests kiln sent while GitLab was gone.
    pub requests: usize,
    /// `requests`, per minute of outage (the highest of any whole minute, or the rate of a
    /// shorter outage).
    pub requests_per_minute: f64,
    /// From GitLab's return until kiln took the job queued during the outage.
    pub recovery: Duration,
    /// What `/readyz` said while GitLab was gone.
    pub readyz: String,
}

/// GitLab unreachable for `outage`, then back (see the test of the same name in `tests/chaos.rs`).
pub async fn gitlab_outage(seed: u64, outage: Duration) -> OutageOutcome {
    let _ = seed; // no random faults: the outage is the fault
    let gitlab = GitLabServer::start().await;
    gitlab.add_runner_token(RUNNER_TOKEN);
    gitlab.set_long_poll_timeout(Duration::from_secs(2));
    let proxy = FaultProxy::start(&gitlab.url(), FaultPlan::new(seed, 0.0)).await;
    let kiln = KilnProcess::start(&config(&format!("{}/", proxy.url()), RUNNER_TOKEN, ""));
    let client = reqwest::Client::new();
    let readyz = |client: &reqwest::Client| {
        let url = format!("http://{}/readyz", kiln.http);
        let client = client.clone();
        async move {
            match client.get(url).send().await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(e) => (0, e.to_string()),
            }
        }
    };
    let until_ready = Instant::now() + Duration::from_secs(30);
    while readyz(&client).await.0 != 200 {
        assert!(
            Instant::now() < until_ready,
            "kiln never got ready:\n{}",
            kiln.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = gitlab.enqueue(job_json("before", &["echo before"]));
    let job = gitlab
        .wait_for_state(before, &["success", "failed"], Duration::from_secs(60))
        .await;
    assert_eq!(job.state, "success", "{}", job.trace);

    proxy.set_down(true);
    let down_at = Instant::now();
    let during = gitlab.enqueue(job_json("during", &["echo during the outage"]));
    let mut said = String::new();
    while down_at.elapsed() < outage {
        let (status, body) = readyz(&client).await;
        assert!(
            status != 0,
            "kiln stopped serving HTTP during the outage: {body}\n{}",
            kiln.logs()
        );
        if status == 503 && said.is_empty() {
            said = body;
        }
        assert_eq!(gitlab.job(during).state, "pending");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let refused = proxy.refused();
    proxy.set_down(false);
    let up_at = Instant::now();
    let job = gitlab
        .wait_for_state(during, &["success", "failed"], Duration::from_secs(90))
        .await;
    let recovery = job.handed_out_at.unwrap().saturating_duration_since(up_at);
    assert_eq!(job.state, "success", "{}", job.trace);
    let back = Instant::now() + Duration::from_secs(15);
    while readyz(&client).await.0 != 200 {
        assert!(
            Instant::now() < back,
            "not ready again after GitLab came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The busiest whole minute of the outage, or the rate of an outage shorter than a minute.
    let minute = Duration::from_secs(60);
    let requests_per_minute = if outage < minute {
        refused.len() as f64 * 60.0 / outage.as_secs_f64()
    } else {
        refused
            .iter()
            .map(|start| {
                refused
                    .iter()
                    .filter(|t| **t >= *start && t.duration_since(*start) < minute)
                    .count()
            })
            .max()
            .unwrap_or(0) as f64
    };
    let outcome = OutageOutcome {
        outage,
        requests: refused.len(),
        requests_per_minute,
        recovery,
        readyz: said.clone(),
    };
    eprintln!("[chaos] gitlab outage: {outcome:?}");
    assert!(
        said.contains("GitLab unreachable") && said.contains("cannot reach GitLab"),
        "/readyz during the outage: {said:?}"
    );
    assert!(refused.len() >= 2, "kiln kept trying: {refused:?}");
    outcome
}

/// Parameters of the Jenkins-agents chaos run.
#[derive(Debug, Clone)]
pub struct JenkinsChaos {
    pub seed: u64,
    pub items: usize,
    pub concurrency: usize,
    pub fault_rate: f64,
    pub kills: usize,
    pub stall: Duration,
    pub deadline: Duration,
}

const JENKINS_USER: &str = "kiln";
const JENKINS_TOKEN: &str = "jenkins-chaos-api-token-0123456789";
const JENKINS_HOOK: &str = "jenkins-chaos-hook-secret-0123456789";

/// Jenkins queue items served by one-shot agent pods, faults on the Jenkins and Kubernetes APIs,
/// the coordinator SIGKILLed `kills` times. The test plays `jenkins/inbound-agent`: each agent
/// pod connects with the secret from its Secret, and each build that starts on it finishes.
/// Every queue item must run exactly once, on an agent of its own, and no pod, Secret or
/// agent node may be left.
pub async fn jenkins_kubernetes(p: &JenkinsChaos) -> Outcome {
    use super::jenkins::JenkinsServer;
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(p.seed);
    let jenkins = JenkinsServer::start().await;
    jenkins.add_user(JENKINS_USER, JENKINS_TOKEN, "unused-password");
    let kube = KubeServer::start().await;
    kube.alias_binary("/usr/local/bin/kiln", kiln_bin());
    let jenkins_proxy = FaultProxy::start(
        jenkins.url().trim_end_matches('/'),
        FaultPlan::new(p.seed, p.fault_rate).stall(p.stall),
    )
    .await;
    let kube_proxy = FaultProxy::start(
        kube.url(),
        FaultPlan::new(p.seed.wrapping_add(1), p.fault_rate).stall(p.stall),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kubeconfig_via(&kube, &kubeconfig, kube_proxy.url());
    let text = format!(
        r#"executor = "kubernetes"
concurrent = {concurrency}

[kubernetes]
kubeconfig = "{kubeconfig}"
image_pull_grace = "10s"

[[sources.jenkins]]
name = "ci"
url = "{url}/"
user = "{JENKINS_USER}"
token = "{JENKINS_TOKEN}"
labels = ["maven"]
webhook_secret = "{JENKINS_HOOK}"
poll_interval = "1s"
connect_timeout = "1m"
"#,
        concurrency = p.concurrency,
        kubeconfig = kubeconfig.display(),
        url = jenkins_proxy.url(),
    );
    let items: Vec<u64> = (0..p.items)
        .map(|i| jenkins.enqueue(&format!("app-{i}"), "maven"))
        .collect();
    let mut kill_at: Vec<usize> = (0..p.kills)
        .map(|_| rng.random_range(p.items / 10..=(p.items * 8 / 10).max(p.items / 10 + 1)))
        .collect();
    kill_at.sort_unstable();

    let finished = |jenkins: &JenkinsServer| {
        let builds = jenkins.builds();
        items
            .iter()
            .filter(|id| {
                builds
                    .iter()
                    .any(|b| b.queue_id == **id && b.result.is_some())
            })
            .count()
    };
    let env = [("RUST_LOG", "kiln=trace,info")];
    let mut kiln = KilnProcess::start_with_env(&text, &env);
    let mut outputs = String::new();
    let mut kills: usize = 0;
    let mut recovery = Duration::ZERO;
    let mut restarted: Option<Instant> = None;
    let deadline = started + p.deadline;
    let mut connected = std::collections::BTreeSet::new();
    let mut build_started: BTreeMap<(String, u64), Instant> = BTreeMap::new();
    loop {
        // The inbound agents: connect each agent pod's node once, finish what runs on it.
        for pod in kube.pods() {
            let Some(name) = pod.metadata.name.clone() else {
                continue;
            };
            if !name.starts_with("kiln-jk-") || connected.contains(&name) {
                continue;
            }
            let node = pod
                .spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .and_then(|c| c.env.as_ref())
                .and_then(|env| env.iter().find(|e| e.name == "JENKINS_AGENT_NAME"))
                .and_then(|e| e.value.clone());
            let secret = kube.snapshot().secret(&name).and_then(|s| s.data.clone());
            if let (Some(node), Some(data)) = (node, secret)
                && let Some(value) = data.get("secret")
                && jenkins.connect_agent(&node, &String::from_utf8_lossy(&value.0))
            {
                connected.insert(name);
            }
        }
        // A build takes 3 s, as a real one takes a while: kiln sees builds start by polling
        // (every second here), and one that ends before kiln saw it leaves the one-shot node
        // online for the next queue item (see docs/reliability.md).
        for node in jenkins.nodes() {
            if let Some(build) = node.running.first() {
                let since = *build_started
                    .entry(build.clone())
                    .or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(3) {
                    jenkins.finish_build(&node.name, "SUCCESS");
                }
            }
        }
        let done = finished(&jenkins);
        if let Some(at) = restarted
            && done > kill_at.get(kills.saturating_sub(1)).copied().unwrap_or(0)
        {
            recovery = recovery.max(at.elapsed());
            restarted = None;
        }
        let nodes_left = jenkins
            .nodes()
            .iter()
            .filter(|n| !n.name.starts_with("kiln-anchor-"))
            .count();
        if done == items.len()
            && kills == kill_at.len()
            && kube.pods().is_empty()
            && kube.secrets().is_empty()
            && nodes_left == 0
        {
            break;
        }
        if Instant::now() > deadline {
            outputs.push_str(&kiln.logs());
            save_logs("jenkins-kubernetes", p.seed, &outputs);
            panic!(
                "[chaos seed {}] {done} of {} queue items built within {:?}; pods {:?}, nodes left {nodes_left}; kiln's last log:\n{}",
                p.seed,
                items.len(),
                p.deadline,
                kube.pods()
                    .iter()
                    .map(|p| p.metadata.name.clone())
                    .collect::<Vec<_>>(),
                tail(&kiln.logs(), 60)
            );
        }
        if kills < kill_at.len() && done >= kill_at[kills] {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..3000))).await;
            send_signal(kiln.pid(), "KILL");
            kiln.wait_exit(Duration::from_secs(10));
            outputs.push_str(&kiln.logs());
            kills += 1;
            eprintln!(
                "[chaos seed {}] SIGKILL {kills} after {done} builds",
                p.seed
            );
            kiln = KilnProcess::start_with_env(&text, &env);
            restarted = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for path in ["/metrics", "/"] {
        let (status, body) = kiln.get(path).await;
        outputs.push_str(&format!("\n--- GET {path} ({status})\n{body}\n"));
    }
    outputs.push_str(&kiln.logs());

    let mut problems = Vec::new();
    let builds = jenkins.builds();
    let creations = kube.creations();
    let mut duplicates = 0;
    for id in &items {
        let runs = builds.iter().filter(|b| b.queue_id == *id).count();
        if runs != 1 {
            problems.push(format!("queue item {id} ran {runs} times"));
        }
    }
    // Never more agents than queue items. Which item's agent serves which build is Jenkins'
    // choice (agents of a label are interchangeable), so one item may see two agents named
    // after it while another sees none; the count is what must hold.
    if creations.len() > items.len() {
        duplicates = creations.len() - items.len();
        problems.push(format!(
            "{} agent pods for {} queue items: {creations:?}",
            creations.len(),
            items.len()
        ));
    }
    // Agents that ran more than one build. kiln makes an agent one-shot from outside, by
    // taking its node offline once it sees the build start; while the coordinator is down (or
    // its toggleOffline fails) a quick build ends and Jenkins hands the idle node the next item.
    // Measured and reported, not asserted: see "Found, not fixed" in docs/reliability.md.
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for build in &builds {
        *per_node.entry(build.node.as_str()).or_insert(0) += 1;
    }
    let reused = per_node.values().filter(|runs| **runs > 1).count();
    eprintln!(
        "[chaos seed {}] {} agent pods for {} queue items; {reused} agents ran more than one build",
        p.seed,
        creations.len(),
        items.len()
    );
    for secret in [JENKINS_TOKEN, JENKINS_HOOK, super::kube::TOKEN] {
        if outputs.contains(secret) {
            problems.push(format!("a secret ({}…) is in kiln's output", &secret[..6]));
        }
    }
    let mut faults = BTreeMap::new();
    faults.insert("jenkins".to_owned(), jenkins_proxy.summary());
    faults.insert("kubernetes".to_owned(), kube_proxy.summary());
    let outcome = Outcome {
        scenario: "jenkins-kubernetes",
        seed: p.seed,
        jobs: items.len(),
        lost: items.len() - finished(&jenkins),
        claim_window: 0,
        duplicates,
        leaked: 0,
        kills,
        recovery,
        took: started.elapsed(),
        faults,
        outputs,
    };
    eprintln!("[chaos] {}", outcome.line());
    save_logs("jenkins-kubernetes", p.seed, &outcome.outputs);
    assert!(
        problems.is_empty(),
        "[chaos seed {} — replay with KILN_CHAOS_SEED={}] {} problems:\n{}",
        p.seed,
        p.seed,
        problems.len(),
        problems.join("\n")
    );
    outcome
}
