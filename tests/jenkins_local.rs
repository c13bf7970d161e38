//! End to end: a Jenkins queue served from a laptop — `kiln run` with the local executor starts
//! each one-shot agent as `java -jar agent.jar …` fetched from the controller. `java` here is a
//! stand-in script that records how it was started; the test connects the agent the way
//! remoting does, with the node name and the secret the process was given.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::jenkins::{AGENT_JAR, JenkinsServer};
use support::kiln::KilnProcess;

const USER: &str = "kiln";
const API_TOKEN: &str = "test-api-token";

/// A stand-in for `java -jar agent.jar`: writes what remoting would use to connect (node, the
/// secret it read from `-secret @file`, URL, the jar it found) and runs until stopped.
const FAKE_JAVA: &str = r#"#!/bin/sh
log="$FAKE_JAVA_LOG"
name=""; secret=""; url=""
while [ $# -gt 0 ]; do
  case "$1" in
    -name) name="$2"; shift ;;
    -secret) secret="$2"; shift ;;
    -url) url="$2"; shift ;;
  esac
  shift
done
case "$secret" in @*) secret=$(cat "${secret#@}") ;; esac
if [ -f agent.jar ]; then jar=$(cat agent.jar); else jar=missing; fi
printf '%s\n%s\n%s\n%s\n' "$name" "$secret" "$url" "$jar" > "$log/$name.tmp"
mv "$log/$name.tmp" "$log/$name.started"
trap 'echo stopped > "$log/$name.stopped"; exit 143' TERM
while :; do sleep 0.1; done
"#;

struct Laptop {
    jenkins: JenkinsServer,
    dir: tempfile::TempDir,
}

impl Laptop {
    async fn new() -> Self {
        let jenkins = JenkinsServer::start().await;
        jenkins.add_user(USER, API_TOKEN, "unused-password");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::create_dir_all(dir.path().join("log")).unwrap();
        // The stand-in reports here as the build's user (`nobody` when kiln runs as root).
        std::fs::set_permissions(
            dir.path().join("log"),
            std::os::unix::fs::PermissionsExt::from_mode(0o1777),
        )
        .unwrap();
        Self { jenkins, dir }
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// `kiln run` with the local executor; `path` is its PATH.
    fn kiln(&self, path: &str) -> KilnProcess {
        let config = format!(
            r#"[[sources.jenkins]]
name = "laptop"
url = "{}"
user = "{USER}"
token = "{API_TOKEN}"
labels = ["maven"]
poll_interval = "1s"
max_attempts = 2
"#,
            self.jenkins.url()
        );
        KilnProcess::start_with_env(
            &config,
            &[
                ("PATH", path),
                ("FAKE_JAVA_LOG", self.log().to_str().unwrap()),
                ("KILN_LOCAL__PASS_ENV", "[\"FAKE_JAVA_LOG\"]"),
            ],
        )
    }

    fn with_java(&self) -> String {
        let java = self.dir.path().join("bin/java");
        std::fs::write(&java, FAKE_JAVA).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&java, std::fs::Permissions::from_mode(0o755)).unwrap();
        format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }
}

/// The agents started so far: (node, secret, url, jar) each.
fn started(log: &Path) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(log).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "started") {
            let text = std::fs::read_to_string(&path).unwrap();
            out.push(text.lines().map(str::to_owned).collect());
        }
    }
    out
}

async fn until(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_laptop_serves_a_jenkins_queue_with_java_agent_processes() {
    let laptop = Laptop::new().await;
    let queue_id = laptop.jenkins.enqueue("app", "maven");
    let kiln = laptop.kiln(&laptop.with_java());
    until(30, "an agent process started", || {
        !started(&laptop.log()).is_empty()
    })
    .await;
    let agent = started(&laptop.log()).remove(0);
    let (node, secret, url, jar) = (&agent[0], &agent[1], &agent[2], &agent[3]);
    assert_eq!(url, &format!("{}/", laptop.jenkins.url()));
    assert_eq!(
        jar.as_bytes(),
        AGENT_JAR,
        "agent.jar was fetched from the controller"
    );
    assert_eq!(
        Some(secret.clone()),
        laptop.jenkins.node_secret(node),
        "the process got its node's secret (from a file, not its command line)"
    );
    assert!(laptop.jenkins.connect_agent(node, secret));
    until(
        20,
        "the agent's node taken offline after its build started",
        || {
            laptop
                .jenkins
                .nodes()
                .iter()
                .any(|n| n.name == *node && n.temporarily_offline)
        },
    )
    .await;
    assert_eq!(laptop.jenkins.builds()[0].queue_id, queue_id);
    laptop.jenkins.finish_build(node, "SUCCESS");
    until(20, "the node deleted", || {
        laptop.jenkins.deleted_nodes().contains(node)
    })
    .await;
    until(20, "the agent process stopped", || {
        laptop.log().join(format!("{node}.stopped")).exists()
    })
    .await;
    until(10, "its work directory removed", || {
        std::fs::read_dir(kiln.work_dir())
            .map(|entries| {
                !entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("kiln-jk-"))
            })
            .unwrap_or(true)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_java_the_agent_fails_with_what_to_install() {
    let laptop = Laptop::new().await;
    laptop.jenkins.enqueue("app", "maven");
    let kiln = laptop.kiln("/nonexistent-bin");
    until(30, "kiln gave up on the build after its attempts", || {
        kiln.logs().contains("kiln stops starting agents for it")
    })
    .await;
    let logs = kiln.logs();
    assert!(
        logs.contains("`java` is not on the PATH of kiln's local executor")
            && logs.contains("install a Java runtime"),
        "{logs}"
    );
    let (_, metrics) = kiln.get("/metrics").await;
    assert!(
        metrics.contains(r#"reason="runner_configuration_error""#),
        "{metrics}"
    );
    until(10, "no node left behind", || {
        laptop
            .jenkins
            .nodes()
            .iter()
            .all(|n| n.name.starts_with("kiln-anchor-"))
    })
    .await;
}
