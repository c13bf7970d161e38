//! End to end: two `kiln run` replicas of one installation (`executor = "kubernetes"`) share
//! the GitLab test server's queue and the Kubernetes test server. One is killed mid-burst; the
//! other takes its builds over through their Leases, and every job ends exactly once.

use crate::support;

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

struct Setup {
    gitlab: GitLabServer,
    kube: KubeServer,
    _dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
}

async fn setup() -> Setup {
    let gitlab = GitLabServer::start().await;
    gitlab.add_runner_token(TOKEN);
    gitlab.set_long_poll_timeout(Duration::from_secs(2));
    gitlab.set_trace_interval(1);
    let kube = KubeServer::start().await;
    kube.alias_binary("/usr/local/bin/kiln", kiln_bin());
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.kubeconfig(&kubeconfig, "ci");
    Setup {
        gitlab,
        kube,
        _dir: dir,
        kubeconfig,
    }
}

impl Setup {
    fn config(&self, concurrent: usize) -> String {
        config(
            &self.gitlab.url(),
            TOKEN,
            &format!(
                r#"executor = "kubernetes"
concurrent = {concurrent}

[kubernetes]
kubeconfig = "{}"
helper_image = "{HELPER_IMAGE}"
pending_timeout = "120s"
"#,
                self.kubeconfig.display()
            ),
        )
    }

    /// A replica named `replica` with Leases of 3 s renewed every second.
    fn replica(&self, concurrent: usize, replica: &str, system_id: &str) -> KilnProcess {
        self.replica_with(concurrent, replica, system_id, &[])
    }

    /// [`Self::replica`] with more `KILN_…` overrides.
    fn replica_with(
        &self,
        concurrent: usize,
        replica: &str,
        system_id: &str,
        extra: &[(&str, &str)],
    ) -> KilnProcess {
        let mut env = vec![
            ("KILN_KUBERNETES__REPLICA", replica),
            ("KILN_KUBERNETES__LEASE_DURATION", "3s"),
            ("KILN_KUBERNETES__LEASE_RENEW", "1s"),
            ("KILN_SOURCES__GITLAB__0__SYSTEM_ID", system_id),
        ];
        env.extend_from_slice(extra);
        KilnProcess::start_with_env(&self.config(concurrent), &env)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_replicas_builds_are_taken_over_and_every_job_ends_once() {
    let s = setup().await;
    let (gitlab, kube) = (&s.gitlab, &s.kube);
    let ids: Vec<u64> = (0..JOBS)
        .map(|n| gitlab.enqueue(job_json(&format!("burst-{n}"), &["echo built"])))
        .collect();
    // The first builds of both replicas wait to start: the kill comes while every slot of
    // the victim is busy, so no job it was handed is lost with it (a killed process cannot
    // hand back a job GitLab assigned it in a request still on the wire).
    kube.hold(PodMatch::All);
    let mut a = s.replica(CONCURRENT, "replica-a", "s_00000000000a");
    let b = s.replica(CONCURRENT, "replica-b", "s_00000000000b");

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

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_whose_build_is_claimed_by_another_stops_following_it_quietly() {
    let s = setup().await;
    s.kube.hold(PodMatch::All);
    let id = s.gitlab.enqueue(job_json("claimed", &["echo built"]));
    let a = s.replica(2, "replica-a", "s_00000000000a");
    let name = format!("kiln-gl-{id}");
    s.kube
        .wait_for(Duration::from_secs(30), |snap| {
            replica_of(snap, &name).as_deref() == Some("replica-a")
        })
        .await;
    // Another replica claims the build (as it would one of a replica taken for dead): its
    // Secret, which says whose the build is, then its pod, which the follower watches.
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(s.kube.client("ci"), "ci");
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(s.kube.client("ci"), "ci");
    let patch = serde_json::json!({"metadata": {"labels": {"kiln.dev/replica": "replica-b"}}});
    secrets
        .patch(
            &name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    pods.patch(
        &name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !a.logs().contains("another replica took the build over") {
        assert!(Instant::now() < deadline, "{}", a.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It leaves the pod alone and reports nothing.
    assert!(s.kube.pod(&name).is_some());
    assert!(s.gitlab.job(id).final_updates.is_empty());

    // The replica it belongs to now starts, follows it and reports it, once.
    let b = s.replica(2, "replica-b", "s_00000000000b");
    s.kube.release_hold();
    let job = s
        .gitlab
        .wait_for_state(id, &["success", "failed"], Duration::from_secs(60))
        .await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, b.logs());
    assert_eq!(job.final_updates.len(), 1, "{:?}", job.final_updates);
    s.kube
        .wait_for(Duration::from_secs(20), |snap| {
            snap.pods.is_empty() && snap.secrets.is_empty()
        })
        .await;
    assert_eq!(s.kube.creations(), [name]);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_lease_permissions_kiln_runs_as_the_only_replica() {
    let s = setup().await;
    for verb in ["get", "list", "create", "update", "delete"] {
        s.kube.deny(verb, "leases");
    }
    s.kube.hold(PodMatch::All);
    let id = s.gitlab.enqueue(job_json("alone", &["echo built"]));
    let name = format!("kiln-gl-{id}");
    // A replica launches the build and is killed; the next one, alone, takes it over.
    let mut first = s.replica(2, "replica-b", "s_00000000000b");
    s.kube
        .wait_for(Duration::from_secs(30), |snap| {
            replica_of(snap, &name).as_deref() == Some("replica-b")
        })
        .await;
    support::kiln::send_signal(first.pid(), "KILL");
    assert!(first.wait_exit(Duration::from_secs(10)));
    let kiln = s.replica(2, "replica-a", "s_00000000000a");
    s.kube.release_hold();
    let job = s
        .gitlab
        .wait_for_state(id, &["success", "failed"], Duration::from_secs(60))
        .await;
    assert_eq!(job.state, "success", "{}\n{}", job.trace, kiln.logs());
    assert_eq!(job.final_updates.len(), 1, "{:?}", job.final_updates);
    assert_eq!(s.kube.creations(), [name]);
    assert!(kiln.logs().contains("claimed the build"), "{}", kiln.logs());
    let logs = kiln.logs();
    let errors: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("kiln cannot use Leases"))
        .collect();
    assert_eq!(errors.len(), 1, "one clear error:\n{logs}");
    assert!(errors[0].contains("may not"), "{}", errors[0]);
    assert!(
        errors[0].contains("leases (coordination.k8s.io)"),
        "{}",
        errors[0]
    );
    assert!(s.kube.leases().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_survives_a_status_change_and_loses_to_another_replicas_claim() {
    use kiln::executor::{Claim, SharedBuilds};
    let kube = KubeServer::start().await;
    kube.set_kubelet(false);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.kubeconfig(&kubeconfig, "ci");
    for (id, replica) in [(1, "dead"), (2, "dead")] {
        kube.insert(
            "ci",
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": format!("kiln-gl-{id}"),
                    "labels": {
                        "kiln.dev/coordinator": "kiln", "kiln.dev/replica": replica,
                        "kiln.dev/source": "gitlab", "kiln.dev/job-id": id.to_string(),
                        "kiln.dev/runner": "test",
                    },
                },
                "spec": { "containers": [{ "name": "build", "image": "alpine:3" }] },
            }),
        );
    }
    let config = kiln::executor::kubernetes::KubernetesConfig {
        kubeconfig: Some(kubeconfig),
        replica: Some("me".into()),
        ..Default::default()
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let executor =
        kiln::executor::kubernetes::KubernetesExecutor::connect(&config, shutdown.clone())
            .await
            .unwrap();
    let found = executor.list().await.unwrap();
    assert_eq!(found.len(), 2);
    assert!(found.iter().all(|f| f.replica.as_deref() == Some("dead")));
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(kube.client("ci"), "ci");
    let patch = |labels: serde_json::Value| {
        let pods = pods.clone();
        async move {
            pods.patch(
                labels["name"].as_str().unwrap(),
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&serde_json::json!({"metadata": labels["metadata"]})),
            )
            .await
            .unwrap();
        }
    };
    // The kubelet moved pod 1 on (a new resourceVersion, same owner): the claim still wins.
    patch(serde_json::json!({"name": "kiln-gl-1", "metadata": {"annotations": {"moved": "on"}}}))
        .await;
    // Another replica claimed pod 2 first: this one loses.
    patch(serde_json::json!({"name": "kiln-gl-2", "metadata": {"labels": {"kiln.dev/replica": "other"}}})).await;
    let by_name = |name: &str| found.iter().find(|f| f.name == name).unwrap();
    assert_eq!(executor.claim(by_name("kiln-gl-1")).await, Claim::Won);
    assert_eq!(executor.claim(by_name("kiln-gl-2")).await, Claim::Lost);
    let label =
        |name: &str| kube.pod(name).unwrap().metadata.labels.unwrap()["kiln.dev/replica"].clone();
    assert_eq!(label("kiln-gl-1"), "me");
    assert_eq!(label("kiln-gl-2"), "other");
    shutdown.cancel();
}

/// The `kiln.dev/replica` label of Secret `name`.
fn secret_replica(snapshot: &Snapshot, name: &str) -> Option<String> {
    snapshot
        .secret(name)?
        .metadata
        .labels
        .as_ref()?
        .get("kiln.dev/replica")
        .cloned()
}

/// Whether build `name`'s pod and Secret both name `replica`.
fn owned_by(snapshot: &Snapshot, name: &str, replica: &str) -> bool {
    replica_of(snapshot, name).as_deref() == Some(replica)
        && secret_replica(snapshot, name).as_deref() == Some(replica)
}

/// Waits until Lease `kiln-kiln-<replica>` exists.
async fn wait_for_lease(kube: &KubeServer, replica: &str) {
    let name = format!("kiln-kiln-{replica}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !kube
        .leases()
        .iter()
        .any(|l| l.metadata.name.as_deref() == Some(name.as_str()))
    {
        assert!(Instant::now() < deadline, "no Lease {name}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every job ended exactly once, with the state `expect` gives it.
async fn every_job_ends_once(
    gitlab: &GitLabServer,
    ids: &[u64],
    expect: impl Fn(u64) -> (&'static str, Option<&'static str>),
    logs: impl Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    for id in ids {
        let left = deadline.saturating_duration_since(Instant::now());
        let job = gitlab
            .wait_for_state(*id, &["success", "failed", "canceled"], left)
            .await;
        let (state, reason) = expect(*id);
        assert_eq!(job.state, state, "job {id}: {}\n{}", job.trace, logs());
        assert_eq!(
            job.failure_reason.as_deref(),
            reason,
            "job {id}: {}",
            job.trace
        );
    }
    // A second report would come late: give it the time to arrive.
    tokio::time::sleep(2 * LEASE_RENEW).await;
    for id in ids {
        let job = gitlab.job(*id);
        assert_eq!(
            job.final_updates.len(),
            1,
            "job {id} ended more than once: {:?}\n{}",
            job.final_updates,
            logs()
        );
    }
}

/// No build was created twice and nothing is left in the cluster.
async fn one_pod_per_job_and_nothing_left(kube: &KubeServer, jobs: usize) {
    let creations = kube.creations();
    let unique: BTreeSet<&String> = creations.iter().collect();
    assert_eq!(unique.len(), creations.len(), "a build was created twice");
    assert_eq!(creations.len(), jobs, "one pod per job");
    kube.wait_for(Duration::from_secs(30), |s| {
        s.pods.is_empty() && s.secrets.is_empty()
    })
    .await;
}

/// What a replica that lost a build it followed says (it must never, while it is alive).
const HANDED_OVER: &str = "another replica took the build over";

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_restarted_with_its_old_identity_leaves_a_survivors_builds_and_reports_them_later()
 {
    const BUILDS: usize = 4;
    let s = setup().await;
    let (gitlab, kube) = (&s.gitlab, &s.kube);
    kube.hold(PodMatch::All);
    let ids: Vec<u64> = (0..BUILDS)
        .map(|n| gitlab.enqueue(job_json(&format!("restart-{n}"), &["sleep 4"])))
        .collect();
    let names: Vec<String> = ids.iter().map(|id| format!("kiln-gl-{id}")).collect();
    let mut a = s.replica(BUILDS, "replica-a", "s_00000000000a");
    kube.wait_for(Duration::from_secs(30), |snap| {
        names.iter().all(|n| owned_by(snap, n, "replica-a"))
    })
    .await;
    let mut b = s.replica(BUILDS, "replica-b", "s_00000000000b");
    wait_for_lease(kube, "replica-b").await;
    tokio::time::sleep(2 * LEASE_RENEW).await;

    // a is killed; b takes its builds over.
    support::kiln::send_signal(a.pid(), "KILL");
    assert!(a.wait_exit(Duration::from_secs(10)));
    kube.wait_for(
        LEASE_DURATION + LEASE_RENEW + Duration::from_secs(10),
        |snap| {
            names
                .iter()
                .all(|n| replica_of(snap, n).as_deref() == Some("replica-b"))
        },
    )
    .await;

    // a comes back under its old identity (a restarted container, a StatefulSet pod): the
    // builds are b's now, and b is alive.
    let a = s.replica(BUILDS, "replica-a", "s_00000000000a");
    wait_for_lease(kube, "replica-a").await;
    tokio::time::sleep(3 * LEASE_RENEW).await;
    let snap = kube.snapshot();
    for name in &names {
        assert_eq!(
            replica_of(&snap, name).as_deref(),
            Some("replica-b"),
            "{}",
            a.logs()
        );
    }
    assert!(!b.logs().contains(HANDED_OVER), "{}", b.logs());

    // b stops cleanly (the SIGTERM of a rolling update): a takes the builds over, with the
    // job files it needs to report for them.
    assert!(b.terminate(Duration::from_secs(30)), "{}", b.logs());
    kube.wait_for(LEASE_RENEW + Duration::from_secs(10), |snap| {
        names
            .iter()
            .all(|n| replica_of(snap, n).as_deref() == Some("replica-a"))
    })
    .await;
    kube.release_hold();
    // One build is evicted while it runs: only kiln can report that.
    let victim = &names[0];
    kube.wait_pod(victim, Duration::from_secs(30), |pod| {
        pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await;
    kube.evict(victim);
    every_job_ends_once(
        gitlab,
        &ids,
        |id| {
            if id == ids[0] {
                ("failed", Some("runner_system_failure"))
            } else {
                ("success", None)
            }
        },
        || a.logs(),
    )
    .await;
    one_pod_per_job_and_nothing_left(kube, BUILDS).await;
    let logs = a.logs();
    assert!(!logs.contains("without its job file"), "{logs}");
    assert!(!logs.contains(HANDED_OVER), "{logs}");
    assert!(gitlab.violations().is_empty(), "{:?}", gitlab.violations());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_update_hands_every_build_over_once_and_touches_no_live_replicas_build() {
    // Two replicas, each with builds in flight; the chart's rollout (maxSurge 1): a new
    // replica starts, then an old one gets SIGTERM, twice; then the next rollout's first step.
    const PER_REPLICA: usize = 4;
    let s = setup().await;
    let (gitlab, kube) = (&s.gitlab, &s.kube);
    kube.hold(PodMatch::All);
    let ids: Vec<u64> = (0..2 * PER_REPLICA)
        .map(|n| gitlab.enqueue(job_json(&format!("rollout-{n}"), &["sleep 3"])))
        .collect();
    let names: Vec<String> = ids.iter().map(|id| format!("kiln-gl-{id}")).collect();
    let mut replicas: BTreeMap<&str, KilnProcess> = BTreeMap::new();
    replicas.insert(
        "replica-a",
        s.replica(PER_REPLICA, "replica-a", "s_00000000000a"),
    );
    replicas.insert(
        "replica-b",
        s.replica(PER_REPLICA, "replica-b", "s_00000000000b"),
    );
    kube.wait_for(Duration::from_secs(30), |snap| {
        let by = pods_by_replica(snap);
        ["replica-a", "replica-b"]
            .iter()
            .all(|r| by.get(*r).map_or(0, BTreeSet::len) == PER_REPLICA)
    })
    .await;
    let all_logs = |replicas: &BTreeMap<&str, KilnProcess>| {
        replicas
            .iter()
            .map(|(name, p)| format!("--- {name}\n{}", p.logs()))
            .collect::<String>()
    };
    for (new, old, system_id) in [
        ("replica-c", "replica-a", "s_00000000000c"),
        ("replica-d", "replica-b", "s_00000000000d"),
        ("replica-e", "replica-c", "s_00000000000e"),
    ] {
        replicas.insert(new, s.replica(PER_REPLICA, new, system_id));
        wait_for_lease(kube, new).await;
        tokio::time::sleep(2 * LEASE_RENEW).await;
        let mut stopped = replicas.remove(old).unwrap();
        assert!(
            stopped.terminate(Duration::from_secs(30)),
            "{}",
            stopped.logs()
        );
        assert!(
            !stopped.logs().contains(HANDED_OVER),
            "{old}: {}",
            stopped.logs()
        );
        let live: BTreeSet<&str> = replicas.keys().copied().collect();
        // Every build, the stopped replica's too, is followed by a live replica.
        kube.wait_for(LEASE_RENEW + Duration::from_secs(15), |snap| {
            names
                .iter()
                .all(|n| replica_of(snap, n).is_some_and(|r| live.contains(r.as_str())))
        })
        .await;
        // A few more Lease rounds, with the take-over pass the death set off: nothing moves.
        let before = kube.snapshot();
        tokio::time::sleep(3 * LEASE_RENEW).await;
        let after = kube.snapshot();
        for name in &names {
            assert_eq!(
                replica_of(&before, name),
                replica_of(&after, name),
                "{name}\n{}",
                all_logs(&replicas)
            );
        }
        for (name, replica) in &replicas {
            assert!(
                !replica.logs().contains(HANDED_OVER),
                "{name}: {}",
                replica.logs()
            );
        }
        // Whose a build is, is one fact: its Secret names the replica its pod names.
        for name in &names {
            let owner = replica_of(&after, name).unwrap_or_default();
            assert!(
                owned_by(&after, name, &owner),
                "{name}: pod and Secret disagree"
            );
        }
    }
    kube.release_hold();
    every_job_ends_once(gitlab, &ids, |_| ("success", None), || all_logs(&replicas)).await;
    one_pod_per_job_and_nothing_left(kube, ids.len()).await;
    for (name, replica) in &replicas {
        let logs = replica.logs();
        assert!(!logs.contains(HANDED_OVER), "{name}: {logs}");
        assert!(!logs.contains("without its pod"), "{name}: {logs}");
        assert!(!logs.contains("without its job file"), "{name}: {logs}");
    }
    assert!(gitlab.violations().is_empty(), "{:?}", gitlab.violations());
}

/// When Lease `kiln-kiln-<replica>` lapses (`renewTime + leaseDurationSeconds`), if it exists.
fn lease_lapses(kube: &KubeServer, replica: &str) -> Option<std::time::SystemTime> {
    let name = format!("kiln-kiln-{replica}");
    let lease = kube
        .leases()
        .into_iter()
        .find(|l| l.metadata.name.as_deref() == Some(name.as_str()))?;
    let spec = lease.spec?;
    let renewed = std::time::SystemTime::from(spec.renew_time?.0);
    let duration = u64::try_from(spec.lease_duration_seconds?).ok()?;
    Some(renewed + Duration::from_secs(duration))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_take_over_of_200_builds_against_a_slow_gitlab_lets_no_lease_lapse() {
    const BUILDS: usize = 200;
    let s = setup().await;
    let (gitlab, kube) = (&s.gitlab, &s.kube);
    kube.hold(PodMatch::All);
    let ids: Vec<u64> = (0..BUILDS)
        .map(|n| gitlab.enqueue(job_json(&format!("many-{n}"), &["echo built"])))
        .collect();
    let fast = [
        ("KILN_KUBERNETES__QPS", "200"),
        ("KILN_KUBERNETES__BURST", "100"),
    ];
    let mut a = s.replica_with(BUILDS, "replica-a", "s_00000000000a", &fast);
    kube.wait_for(Duration::from_secs(120), |snap| {
        pods_by_replica(snap)
            .get("replica-a")
            .map_or(0, BTreeSet::len)
            == BUILDS
    })
    .await;
    let b = s.replica_with(BUILDS, "replica-b", "s_00000000000b", &fast);
    wait_for_lease(kube, "replica-b").await;
    tokio::time::sleep(2 * LEASE_RENEW).await;

    // GitLab now answers every call about a job in 1 s, and a stops cleanly: b takes over 200
    // builds, asking GitLab about each.
    gitlab.set_job_latency(Duration::from_secs(1));
    assert!(a.terminate(Duration::from_secs(30)), "{}", a.logs());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let lapses = lease_lapses(kube, "replica-b").expect("b's Lease exists");
        assert!(
            lapses >= std::time::SystemTime::now(),
            "b's own Lease lapsed during the take-over\n{}",
            b.logs()
        );
        let snap = kube.snapshot();
        let taken = snap
            .pods
            .iter()
            .filter(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kiln.dev/replica"))
                    .is_some_and(|r| r == "replica-b")
            })
            .count();
        let adopted = b
            .logs()
            .matches("adopted a build of an earlier run")
            .count();
        if taken == BUILDS && adopted >= BUILDS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{taken} builds claimed, {adopted} adopted\n{}",
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gitlab.set_job_latency(Duration::ZERO);
    kube.release_hold();
    every_job_ends_once(gitlab, &ids, |_| ("success", None), || b.logs()).await;
    one_pod_per_job_and_nothing_left(kube, BUILDS).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_is_written_down_before_it_is_acknowledged_so_a_kill_in_between_loses_nothing() {
    let s = setup().await;
    let (gitlab, kube) = (&s.gitlab, &s.kube);
    // GitLab takes 5 s over every call about a job: the acknowledge is on its way that long.
    gitlab.set_job_latency(Duration::from_secs(5));
    let id = gitlab.enqueue(job_json("acknowledged", &["echo built"]));
    let name = format!("kiln-gl-{id}");
    let mut a = s.replica(1, "replica-a", "s_00000000000a");
    kube.wait_for(Duration::from_secs(30), |snap| snap.secret(&name).is_some())
        .await;
    let path = format!("/api/v4/jobs/{id}");
    let acknowledged = gitlab
        .requests()
        .iter()
        .any(|r| r.method == "PUT" && r.path == path && r.status.is_some());
    assert!(
        !acknowledged,
        "the build was written down only after GitLab answered the acknowledge\n{}",
        a.logs()
    );
    // kiln is killed while the acknowledge is still on its way.
    support::kiln::send_signal(a.pid(), "KILL");
    assert!(a.wait_exit(Duration::from_secs(10)));
    gitlab.set_job_latency(Duration::ZERO);
    // The next replica finds the build, whose pod never existed, and starts it.
    let b = s.replica(1, "replica-b", "s_00000000000b");
    every_job_ends_once(gitlab, &[id], |_| ("success", None), || b.logs()).await;
    one_pod_per_job_and_nothing_left(kube, 1).await;
    assert!(gitlab.violations().is_empty(), "{:?}", gitlab.violations());
}
