//! End to end: a real `kiln run` process provisioning one-shot inbound agents for the Jenkins
//! test server, with agent pods on the Kubernetes test server. The agent "connects" the way
//! `jenkins/inbound-agent` does: with the node name and the secret the pod got from its Secret.

use crate::support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use support::jenkins::JenkinsServer;
use support::kiln::{KilnProcess, kiln_bin, send_signal};
use support::kube::{ImageScript, KubeServer};

const USER: &str = "kiln";
const API_TOKEN: &str = "test-api-token";
const PASSWORD: &str = "test-password";
const HOOK_SECRET: &str = "0123456789abcdef-hook";

pub(crate) struct Setup {
    pub(crate) jenkins: JenkinsServer,
    pub(crate) kube: KubeServer,
    dir: tempfile::TempDir,
}

pub(crate) async fn setup() -> Setup {
    let jenkins = JenkinsServer::start().await;
    jenkins.add_user(USER, API_TOKEN, PASSWORD);
    let kube = KubeServer::start().await;
    kube.alias_binary("/usr/local/bin/kiln", kiln_bin());
    let dir = tempfile::tempdir().unwrap();
    kube.kubeconfig(dir.path().join("kubeconfig"), "ci");
    Setup { jenkins, kube, dir }
}

impl Setup {
    fn config(&self, source: &str) -> String {
        format!(
            r#"executor = "kubernetes"
concurrent = 10

[kubernetes]
kubeconfig = "{}"
image_pull_grace = "2s"

[[sources.jenkins]]
name = "ci"
url = "{}"
user = "{USER}"
labels = ["maven"]
webhook_secret = "{HOOK_SECRET}"
{source}
{timeout}
"#,
            self.dir.path().join("kubeconfig").display(),
            self.jenkins.url(),
            timeout = if source.contains("connect_timeout") {
                ""
            } else {
                "connect_timeout = \"4s\""
            }
        )
    }

    pub(crate) fn kiln(&self, source: &str) -> KilnProcess {
        KilnProcess::start(&self.config(source))
    }

    /// Waits for `n` agent pods and returns them.
    pub(crate) async fn agent_pods(&self, n: usize, secs: u64) -> Vec<Pod> {
        let snapshot = self
            .kube
            .wait_for(Duration::from_secs(secs), |s| {
                agent_pods(&s.pods).len() >= n
            })
            .await;
        agent_pods(&snapshot.pods).into_iter().cloned().collect()
    }

    /// Connects the agent of `pod` as the inbound-agent container would: its node name and the
    /// secret from the pod's Secret.
    pub(crate) fn connect(&self, pod: &Pod) -> String {
        let node = env(pod, "JENKINS_AGENT_NAME");
        let name = pod.metadata.name.clone().unwrap();
        let secret = self.kube.snapshot().secret(&name).cloned().unwrap();
        let value = secret.data.unwrap()["secret"].0.clone();
        assert!(
            self.jenkins
                .connect_agent(&node, &String::from_utf8(value).unwrap()),
            "the pod's secret is the node's"
        );
        node
    }

    /// Jenkins' nodes except the label anchors kiln keeps (they never connect or run).
    pub(crate) fn agent_nodes(&self) -> Vec<String> {
        self.jenkins
            .nodes()
            .into_iter()
            .map(|n| n.name)
            .filter(|n| !n.starts_with("kiln-anchor-"))
            .collect()
    }

    async fn nothing_left(&self, secs: u64) {
        self.kube
            .wait_for(Duration::from_secs(secs), |s| {
                agent_pods(&s.pods).is_empty() && s.secrets.is_empty()
            })
            .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while !self.agent_nodes().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nodes left: {:?}",
                self.agent_nodes()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub(crate) fn agent_pods(pods: &[Pod]) -> Vec<&Pod> {
    pods.iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.get("kiln.dev/source").map(String::as_str) == Some("jenkins"))
        })
        .collect()
}

/// The queue item an agent pod was started for.
fn item_of(pod: &Pod) -> u64 {
    pod.metadata.labels.as_ref().unwrap()["kiln.dev/job-id"]
        .parse()
        .unwrap()
}

pub(crate) fn env(pod: &Pod, name: &str) -> String {
    pod.spec.as_ref().unwrap().containers[0]
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
        .unwrap_or_default()
}

pub(crate) async fn until(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queued_build_gets_a_one_shot_agent_that_is_deleted_after_it() {
    let s = setup().await;
    let queue_id = s.jenkins.enqueue("app", "maven");
    let kiln =
        s.kiln("token = \"test-api-token\"\npoll_interval = \"1s\"\nconnect_timeout = \"1m\"");
    let pods = s.agent_pods(1, 20).await;
    let pod = &pods[0];
    assert_eq!(item_of(pod), queue_id);
    assert!(
        pod.metadata
            .name
            .as_deref()
            .unwrap()
            .starts_with(&format!("kiln-jk-{queue_id}-"))
    );
    assert_eq!(env(pod, "JENKINS_WEB_SOCKET"), "true");
    assert!(
        !serde_json::to_string(pod).unwrap().contains(
            &s.jenkins
                .node_secret(&env(pod, "JENKINS_AGENT_NAME"))
                .unwrap()
        )
    );
    let node = s.connect(pod);
    let record = s
        .jenkins
        .nodes()
        .into_iter()
        .find(|n| n.name == node)
        .unwrap();
    assert_eq!(record.label_string, "maven");
    assert_eq!(record.num_executors, 1);
    assert_eq!(record.mode, "EXCLUSIVE");
    assert_eq!(record.launcher["webSocket"], true);
    // The build starts on it; kiln takes the node offline so it takes no other build.
    until(20, "node taken offline", || {
        s.jenkins
            .nodes()
            .iter()
            .any(|n| n.name == node && n.temporarily_offline)
    })
    .await;
    let second = s.jenkins.enqueue("app", "maven");
    s.jenkins.finish_build(&node, "SUCCESS");
    until(20, "node deleted", || {
        s.jenkins.deleted_nodes().contains(&node)
    })
    .await;
    let builds = s.jenkins.builds();
    assert_eq!(builds.len(), 1, "one build on the first agent: {builds:?}");
    assert_eq!(builds[0].node, node);
    // The second build gets its own, fresh agent.
    let snapshot = s
        .kube
        .wait_for(Duration::from_secs(20), |snap| {
            agent_pods(&snap.pods).iter().any(|p| item_of(p) == second)
        })
        .await;
    let pod = agent_pods(&snapshot.pods)
        .into_iter()
        .find(|p| item_of(p) == second)
        .cloned()
        .unwrap();
    let second_node = s.connect(&pod);
    assert_ne!(second_node, node, "node names are never reused");
    until(20, "second build runs", || s.jenkins.builds().len() == 2).await;
    s.jenkins.finish_build(&second_node, "SUCCESS");
    s.nothing_left(20).await;
    let (_, metrics) = kiln.get("/metrics").await;
    assert!(
        metrics.contains("kiln_jenkins_agents_started_total"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_builds_of_one_label_get_two_agents_never_three() {
    let s = setup().await;
    s.jenkins.enqueue("a", "maven");
    s.jenkins.enqueue("b", "maven");
    let kiln =
        s.kiln("token = \"test-api-token\"\npoll_interval = \"1s\"\nconnect_timeout = \"1m\"");
    s.agent_pods(2, 20).await;
    // Several more polls while both agents are still connecting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(agent_pods(&s.kube.pods()).len(), 2, "{}", kiln.logs());
    assert_eq!(s.agent_nodes().len(), 2);
    assert_eq!(s.kube.max_pods_at_once(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_webhook_wakes_kiln_and_a_wrong_secret_changes_nothing() {
    let s = setup().await;
    // Polls are an hour apart: only the webhook can make kiln look soon.
    let kiln = s.kiln("token = \"test-api-token\"\npoll_interval = \"1h\"");
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.jenkins.enqueue("app", "maven");
    let hook = |secret: &str, body: &'static str| {
        let url = format!("http://{}/hooks/jenkins", kiln.http);
        let secret = secret.to_owned();
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .header("X-Kiln-Webhook-Secret", secret)
                .header("Content-Type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    let (status, body) = hook("wrong-secret-value", "{}").await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = hook(HOOK_SECRET, "not json").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not JSON"), "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(s.agent_nodes().is_empty(), "nothing created");
    assert!(agent_pods(&s.kube.pods()).is_empty());
    let (status, body) = hook(HOOK_SECRET, r#"{"name":"app","build":{"phase":"QUEUED"}}"#).await;
    assert_eq!(status, 202, "{body}");
    s.agent_pods(1, 10).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_never_connects_is_deleted_and_retried() {
    let s = setup().await;
    let queue_id = s.jenkins.enqueue("app", "maven");
    let kiln = s.kiln("token = \"test-api-token\"\npoll_interval = \"1s\"");
    let first = s.agent_pods(1, 20).await;
    let first_node = env(&first[0], "JENKINS_AGENT_NAME");
    // Nobody connects: after connect_timeout (4 s) node and pod go, and a fresh agent comes.
    until(30, "first node deleted", || {
        s.jenkins.deleted_nodes().contains(&first_node)
    })
    .await;
    let first_pod = first[0].metadata.name.clone().unwrap();
    s.kube
        .wait_for(Duration::from_secs(20), |snap| {
            let pods = agent_pods(&snap.pods);
            pods.iter()
                .all(|p| p.metadata.name.as_deref() != Some(first_pod.as_str()))
                && pods.iter().any(|p| item_of(p) == queue_id)
        })
        .await;
    let (_, metrics) = kiln.get("/metrics").await;
    assert!(
        metrics.contains("kiln_jenkins_agent_failures_total{jenkins=\"ci\",label=\"maven\",reason=\"connect_timeout\"} 1"),
        "{metrics}"
    );
    assert!(kiln.logs().contains("did not connect"), "{}", kiln.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_image_that_cannot_be_pulled_is_reported_and_retried() {
    let s = setup().await;
    s.kube.script_image(
        "jenkins/broken-agent:1",
        ImageScript::PullFails { message: None },
    );
    s.jenkins.enqueue("app", "maven");
    let kiln = s.kiln(
        "token = \"test-api-token\"\npoll_interval = \"1s\"\nconnect_timeout = \"1m\"\nagent_image = \"jenkins/broken-agent:1\"",
    );
    until(40, "pull failure counted", || {
        kiln.logs().contains("failed before it connected")
    })
    .await;
    let (_, metrics) = kiln.get("/metrics").await;
    assert!(
        metrics.contains("reason=\"image_pull_failure\""),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_mid_build_leaves_no_orphan_node_or_pod() {
    let s = setup().await;
    s.jenkins.enqueue("app", "maven");
    s.jenkins.enqueue("lib", "maven");
    let mut first =
        s.kiln("token = \"test-api-token\"\npoll_interval = \"1s\"\nconnect_timeout = \"1m\"");
    let pods = s.agent_pods(2, 20).await;
    let busy = s.connect(&pods[0]);
    let waiting = env(&pods[1], "JENKINS_AGENT_NAME");
    until(20, "offline after the build started", || {
        s.jenkins
            .nodes()
            .iter()
            .any(|n| n.name == busy && n.temporarily_offline)
    })
    .await;
    send_signal(first.pid(), "KILL");
    first.wait_exit(Duration::from_secs(10));
    // While no coordinator runs: one build ends, and an admin deletes the other agent's node.
    s.jenkins.finish_build(&busy, "SUCCESS");
    let status = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{}/computer/{waiting}/doDelete", s.jenkins.url()))
        .basic_auth(USER, Some(API_TOKEN))
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_redirection(), "{status}");
    let second =
        s.kiln("token = \"test-api-token\"\npoll_interval = \"1s\"\nconnect_timeout = \"1m\"");
    // The finished agent is cleaned up; the pod whose node is gone is deleted. The build still
    // waiting ("lib") then gets a fresh agent.
    s.kube
        .wait_for(Duration::from_secs(30), |snap| {
            let names: Vec<_> = agent_pods(&snap.pods)
                .iter()
                .filter_map(|p| p.metadata.name.clone())
                .collect();
            !names.iter().any(|n| {
                pods.iter()
                    .any(|old| old.metadata.name.as_deref() == Some(n.as_str()))
            })
        })
        .await;
    until(30, "no old node left", || {
        s.agent_nodes().iter().all(|n| *n != busy && *n != waiting)
    })
    .await;
    // Both agent pods went through the coordinator's one adoption path, as GitLab build pods
    // do, before the Jenkins source judged them.
    let logs = second.logs();
    for pod in &pods {
        let name = pod.metadata.name.as_deref().unwrap();
        assert!(
            logs.lines()
                .any(|l| l.contains("adopted a build of an earlier run") && l.contains(name)),
            "{name} was not adopted by the coordinator:\n{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn evicted_and_oom_killed_agent_pods_are_classified_like_build_pods() {
    let s = setup().await;
    s.jenkins.enqueue("a", "maven");
    s.jenkins.enqueue("b", "maven");
    let kiln =
        s.kiln("token = \"test-api-token\"\npoll_interval = \"1s\"\nconnect_timeout = \"1m\"");
    let pods = s.agent_pods(2, 20).await;
    let evicted = pods[0].metadata.name.clone().unwrap();
    let oom = pods[1].metadata.name.clone().unwrap();
    s.kube.evict(&evicted);
    s.kube.oom_kill(&oom, "jnlp");
    // The same words the classifier gives a GitLab build pod, now for the agents' pods.
    until(30, "both endings classified", || {
        let logs = kiln.logs();
        logs.contains("the pod was evicted by the node")
            && logs
                .contains("the agent container `jnlp` ran out of memory and was killed (OOMKilled")
    })
    .await;
    let (_, metrics) = kiln.get("/metrics").await;
    for reason in ["runner_system_failure", "script_failure"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("kiln_jenkins_agent_failures_total")
                    && l.contains(&format!("reason=\"{reason}\""))),
            "{reason} not counted:\n{metrics}"
        );
    }
    // Each failed agent's node is deleted and its build gets a fresh agent.
    until(30, "fresh agents for both builds", || {
        let names: Vec<String> = agent_pods(&s.kube.pods())
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        names.len() == 2 && !names.contains(&evicted) && !names.contains(&oom)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_password_user_works_through_crumb_and_session() {
    let s = setup().await;
    s.jenkins.enqueue("app", "maven");
    let _kiln = s.kiln("password = \"test-password\"\npoll_interval = \"1s\"");
    s.agent_pods(1, 20).await;
    let requests = s.jenkins.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.path.starts_with("/crumbIssuer/api/json"))
    );
    assert!(
        requests
            .iter()
            .filter(|r| r.method == "POST")
            .all(|r| r.status < 400),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .all(|r| r.accept_language.as_deref() == Some("en")),
        "kiln asks for English why texts"
    );
}
