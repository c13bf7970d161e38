//! End to end: warm pools of the sources that keep their own idle members — JIT runners of the
//! GitHub test server and inbound agents of the Jenkins test server, their pods on the
//! Kubernetes test server — kept by a real `kiln run` at the pools' floors, taken by work at
//! once, and refilled behind it.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::github_runners::{self, HOOK_SECRET, PAT, REPO, completed, ready, until};
use crate::jenkins_agents::{self, agent_pods, env};
use crate::support::github::{JobSpec, RunSpec};
use crate::support::kiln::KilnProcess;

/// A GitHub source for organization `acme` (entry `widgets`) with `extra` in its table.
fn org_kiln(s: &github_runners::Setup, extra: &str) -> KilnProcess {
    let config = s
        .config(&format!("token = \"{PAT}\""), extra)
        .replace("owner = \"acme\"\nrepo = \"widgets\"", "org = \"acme\"");
    let kiln = KilnProcess::start(&config);
    s.github
        .set_webhook(&format!("http://{}/hooks/github", kiln.http), HOOK_SECRET);
    kiln
}

/// The runners registered, online, idle and without a job, by name.
fn idle_runners(s: &github_runners::Setup) -> BTreeSet<String> {
    s.github
        .runners()
        .into_iter()
        .filter(|r| r.removed.is_none() && r.status == "online" && !r.busy && r.job_id.is_none())
        .map(|r| r.name)
        .collect()
}

/// The value of the metric line that starts with `prefix` and names `pool`, if any.
async fn pool_metric(kiln: &KilnProcess, prefix: &str, pool: &str) -> Option<String> {
    let (_, metrics) = kiln.get("/metrics").await;
    metrics
        .lines()
        .find(|l| l.starts_with(prefix) && l.contains(&format!("pool=\"{pool}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_github_pool_keeps_two_idle_runners_a_job_takes_one_and_the_pool_refills() {
    let s = github_runners::setup().await;
    let kiln = org_kiln(
        &s,
        "reconcile_interval = \"5s\"\n\n[[warm_pools]]\nname = \"gh-warm\"\nsource = \"widgets\"\nmin_idle = 2\nmax_idle_age = \"1h\"\n",
    );
    ready(&kiln).await;
    // Nothing is queued: two runners are registered, online and waiting all the same.
    until(30, "two idle warm runners online", || {
        idle_runners(&s).len() == 2
    })
    .await;
    // Several passes later: still two, no more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let warm = idle_runners(&s);
    assert_eq!(warm.len(), 2, "{}", kiln.logs());
    assert_eq!(s.github.registered_runners().len(), 2);
    for name in &warm {
        assert!(name.starts_with("kiln-gh-idle-"), "{name}");
    }
    let run = s.github.enqueue_run(
        REPO,
        RunSpec::new("CI").job(
            JobSpec::new("build", &["self-hosted", "kiln"]).runs_for(Duration::from_millis(300)),
        ),
    );
    let job = run.job_ids[0];
    // A warm runner takes it at once: no pod has to start first.
    until(10, "the job taken", || {
        s.github.job(job).is_some_and(|j| j.runner_name.is_some())
    })
    .await;
    let took = s.github.job(job).unwrap().runner_name.unwrap();
    assert!(warm.contains(&took), "{took} is not one of {warm:?}");
    until(30, "the job completed", || completed(&s.github, &[job])).await;
    // The pool is back to two idle runners, the one that ran the job gone.
    until(30, "the pool refilled", || {
        let idle = idle_runners(&s);
        idle.len() == 2 && !idle.contains(&took)
    })
    .await;
    let hits = pool_metric(&kiln, "kiln_warm_hits_total", "gh-warm").await;
    assert_eq!(
        hits.as_deref(),
        Some("1"),
        "{}",
        kiln.get("/metrics").await.1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn min_idle_on_a_github_entry_still_keeps_idle_runners() {
    let s = github_runners::setup().await;
    let kiln = s.kiln("reconcile_interval = \"5s\"\nmin_idle = 1");
    ready(&kiln).await;
    until(30, "one idle runner online", || idle_runners(&s).len() == 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(idle_runners(&s).len(), 1, "{}", kiln.logs());
    assert_eq!(s.github.registered_runners().len(), 1);
    // The shorthand is a pool of the entry, shown as such.
    let (_, metrics) = kiln.get("/metrics").await;
    assert!(metrics.contains("pool=\"widgets-min-idle\""), "{metrics}");
    // A job takes it, and another takes its place.
    let run = s.github.enqueue_run(
        REPO,
        RunSpec::new("CI").job(
            JobSpec::new("build", &["self-hosted", "kiln"]).runs_for(Duration::from_millis(200)),
        ),
    );
    until(30, "the job completed", || {
        completed(&s.github, &run.job_ids)
    })
    .await;
    until(30, "an idle runner again", || idle_runners(&s).len() == 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jenkins_pool_keeps_an_idle_agent_a_build_runs_on_it_at_once_and_another_follows() {
    let s = jenkins_agents::setup().await;
    let kiln = s.kiln(
        "token = \"test-api-token\"\npoll_interval = \"1s\"\nconnect_timeout = \"1m\"\n\n[[warm_pools]]\nname = \"maven-warm\"\nsource = \"ci\"\nlabel = \"maven\"\nmin_idle = 1\n",
    );
    // Nothing is queued: one agent is started and connects.
    let pods = s.agent_pods(1, 30).await;
    let pod = &pods[0];
    let pod_name = pod.metadata.name.clone().unwrap();
    assert!(pod_name.starts_with("kiln-jk-warm-"), "{pod_name}");
    let node = s.connect(pod);
    // Several polls later: still one, connected and idle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(agent_pods(&s.kube.pods()).len(), 1, "{}", kiln.logs());
    let nodes = s.jenkins.nodes();
    let record = nodes.iter().find(|n| n.name == node).unwrap();
    assert!(record.connected && record.running.is_empty() && !record.temporarily_offline);
    assert_eq!(record.label_string, "maven");
    assert!(
        record.description.contains("warm pool maven-warm"),
        "{record:?}"
    );
    // A build for the label runs on it at once: Jenkins hands it to the waiting agent.
    s.jenkins.enqueue("app", "maven");
    let builds = s.jenkins.builds();
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0].node, node);
    // kiln takes it offline (one build per agent) and starts a new idle agent behind it.
    until(20, "the agent taken offline", || {
        s.jenkins
            .nodes()
            .iter()
            .any(|n| n.name == node && n.temporarily_offline)
    })
    .await;
    let snapshot = s
        .kube
        .wait_for(Duration::from_secs(30), |snap| {
            agent_pods(&snap.pods)
                .iter()
                .any(|p| p.metadata.name.as_deref() != Some(pod_name.as_str()))
        })
        .await;
    let next = agent_pods(&snapshot.pods)
        .into_iter()
        .find(|p| p.metadata.name.as_deref() != Some(pod_name.as_str()))
        .cloned()
        .unwrap();
    assert!(
        next.metadata
            .name
            .as_deref()
            .unwrap()
            .starts_with("kiln-jk-warm-")
    );
    let next_node = s.connect(&next);
    assert_ne!(env(&next, "JENKINS_AGENT_NAME"), node);
    // The build ends: its agent goes; the new one waits for the next build.
    s.jenkins.finish_build(&node, "SUCCESS");
    until(20, "the used agent deleted", || {
        s.jenkins.deleted_nodes().contains(&node)
    })
    .await;
    s.kube
        .wait_for(Duration::from_secs(20), |snap| {
            agent_pods(&snap.pods)
                .iter()
                .all(|p| p.metadata.name.as_deref() != Some(pod_name.as_str()))
        })
        .await;
    assert_eq!(s.agent_nodes(), [next_node]);
    let hits = pool_metric(&kiln, "kiln_warm_hits_total", "maven-warm").await;
    assert_eq!(
        hits.as_deref(),
        Some("1"),
        "{}",
        kiln.get("/metrics").await.1
    );
}
