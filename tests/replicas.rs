//! End to end: two `kiln run` replicas of one installation (`executor = "kubernetes"`) share
//! the GitLab test server's queue and the Kubernetes test server. One is killed mid-burst; the
//! other takes its builds over through their Leases, and every job ends exactly once.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use support::gitlab::{GitLabServer, job_json};
use support::kiln::{KilnProcess, config, kiln_bin};
use support::kube::{KubeServer, PodMatch, Snapshot};

const TOKEN: &str = "glrt-fake-token";
const HELPER_IMAGE: &str = "kiln-test/kiln:dev";
const JOBS: u64 = 100;
/// Builds each replica runs at once (capacity is per replica).
const CONCURRENT: usize = 10;
const LEASE_DURATION: Duration = Duration::from_secs(3);
const LEASE_RENEW: Duration = Duration::from_secs(1);

fn replica_of(snapshot: &Snapshot, name: &str) -> Option<String> {
    snapshot
        .pod(name)?
        .metadata
        .labels
        .as_ref()?
        .get("kiln.dev/replica")
        .cloned()
}

/// Pod names by the replica label they carry.
fn pods_by_replica(snapshot: &Snapshot) -> BTreeMap<String, BTreeSet<String>> {
    let mut by = BTreeMap::<String, BTreeSet<String>>::new();
    for pod in &snapshot.pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let replica = replica_of(snapshot, &name).unwrap_or_default();
        by.entry(replica).or_default().insert(name);
    }
    by
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_replicas_builds_are_taken_over_and_every_job_ends_once() {
    let gitlab = GitLabServer::start().await;
    gitlab.add_runner_token(TOKEN);
    gitlab.set_long_poll_timeout(Duration::from_secs(2));
    gitlab.set_trace_interval(1);
    let kube = KubeServer::start().await;
    kube.alias_binary("/usr/local/bin/kiln", kiln_bin());
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.kubeconfig(&kubeconfig, "ci");
    let ids: Vec<u64> = (0..JOBS)
        .map(|n| gitlab.enqueue(job_json(&format!("burst-{n}"), &["echo built"])))
        .collect();
    // The first builds of both replicas wait to start: the kill comes while every slot of
    // the victim is busy, so no job it was handed is lost with it (a killed process cannot
    // hand back a job GitLab assigned it in a request still on the wire).
    kube.hold(PodMatch::All);
    let text = config(
        &gitlab.url(),
        TOKEN,
        &format!(
            r#"executor = "kubernetes"
concurrent = {CONCURRENT}

[kubernetes]
kubeconfig = "{}"
helper_image = "{HELPER_IMAGE}"
pending_timeout = "120s"
"#,
            kubeconfig.display()
        ),
    );
    let lease_env = |replica: &'static str, system_id: &'static str| {
        [
            ("KILN_KUBERNETES__REPLICA", replica),
            ("KILN_KUBERNETES__LEASE_DURATION", "3s"),
            ("KILN_KUBERNETES__LEASE_RENEW", "1s"),
            ("KILN_SOURCES__GITLAB__0__SYSTEM_ID", system_id),
        ]
    };
    let mut a = KilnProcess::start_with_env(&text, &lease_env("replica-a", "s_00000000000a"));
    let b = KilnProcess::start_with_env(&text, &lease_env("replica-b", "s_00000000000b"));

    // Both fill their capacity with held builds, each labelled with its replica.
    let full = kube
        .wait_for(Duration::from_secs(30), |s| {
            let by = pods_by_replica(s);
            ["replica-a", "replica-b"]
                .iter()
                .all(|r| by.get(*r).map_or(0, BTreeSet::len) == CONCURRENT)
        })
        .await;
    let victims = pods_by_replica(&full)["replica-a"].clone();
    // Both Leases are there, and each replica has seen the other.
    let names: BTreeSet<String> = kube
        .leases()
        .iter()
        .filter_map(|l| l.metadata.name.clone())
        .collect();
    assert!(
        names.contains("kiln-kiln-replica-a") && names.contains("kiln-kiln-replica-b"),
        "{names:?}"
    );
    assert!(names.contains("kiln-kiln-leader"), "{names:?}");
    tokio::time::sleep(2 * LEASE_RENEW).await;

    support::kiln::send_signal(a.pid(), "KILL");
    let killed = Instant::now();
    assert!(a.wait_exit(Duration::from_secs(10)));
    kube.wait_for(
        LEASE_DURATION + LEASE_RENEW + Duration::from_secs(10),
        |s| {
            victims
                .iter()
                .all(|name| replica_of(s, name).as_deref() == Some("replica-b"))
        },
    )
    .await;
    let failover = killed.elapsed();
    println!(
        "failover: {} builds of the killed replica taken over {:.2}s after the kill (Lease {}s + renew {}s)",
        victims.len(),
        failover.as_secs_f64(),
        LEASE_DURATION.as_secs(),
        LEASE_RENEW.as_secs()
    );
    assert!(
        failover <= LEASE_DURATION + LEASE_RENEW + Duration::from_secs(2),
        "taken over after {failover:?}\n{}",
        b.logs()
    );

    kube.release_hold();
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in &ids {
        let left = deadline.saturating_duration_since(Instant::now());
        let job = gitlab
            .wait_for_state(*id, &["success", "failed", "canceled"], left)
            .await;
        assert_eq!(
            job.state,
            "success",
            "job {id}: {}\n{}",
            job.trace,
            b.logs()
        );
    }
    for id in &ids {
        let job = gitlab.job(*id);
        assert_eq!(
            job.final_updates.len(),
            1,
            "job {id} ended more than once: {:?}",
            job.final_updates
        );
    }
    let creations = kube.creations();
    let unique: BTreeSet<&String> = creations.iter().collect();
    assert_eq!(unique.len(), creations.len(), "a build was created twice");
    assert_eq!(creations.len(), JOBS as usize, "one pod per job");
    kube.wait_for(Duration::from_secs(20), |s| {
        s.pods.is_empty() && s.secrets.is_empty()
    })
    .await;
    let logs = b.logs();
    assert!(
        logs.contains("taking over the builds of replicas that are gone"),
        "{logs}"
    );
    assert!(gitlab.violations().is_empty(), "{:?}", gitlab.violations());
}
