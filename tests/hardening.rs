//! End to end: kiln's edges under the inputs an operator's mistake or a stranger on the cluster
//! network produces — a GitLab that answers at once, stalled HTTP clients, oversized and
//! malformed jobs, webhook bursts, credentials in URLs, a closed log pipe. Each test is named
//! after the defect it pins.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use support::gitlab::{GitLabServer, job_json};
use support::jenkins::JenkinsServer;
use support::kiln::{KilnProcess, config, kiln_bin, send_signal};
use support::kube::KubeServer;

const TOKEN: &str = "glrt-fake-token";
const JENKINS_USER: &str = "kiln";
const JENKINS_TOKEN: &str = "test-api-token";
const HOOK_SECRET: &str = "0123456789abcdef-hook";

/// The resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

/// A blocking connection to `addr` from local address `ip` (any of 127.0.0.0/8 is this
/// machine), as a client on another host would make it.
async fn connect_from(ip: &str, addr: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
}

/// Headers sent a byte at a time, never finished: what a slowloris client sends.
fn slow_headers(stream: &mut TcpStream) {
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: kiln\r\nX-Slow: a");
}

/// Strangers who take every connection they can, slowly, starve neither the health checks
/// of the main port (no peer gets more than http.max_connections_per_peer) nor those of the
/// probe port (connections of its own).
#[tokio::test(flavor = "multi_thread")]
async fn slow_strangers_cannot_starve_the_health_checks() {
    let gitlab = gitlab().await;
    let probe = format!("127.0.0.1:{}", support::kiln::free_port());
    let kiln = KilnProcess::start_with_env(
        &config(&gitlab.url(), TOKEN, ""),
        &[("KILN_HTTP__PROBE_LISTEN", probe.as_str())],
    );
    let mut held = Vec::new();
    for _ in 0..600 {
        let mut stream = connect_from("127.0.0.2", &kiln.http).await;
        slow_headers(&mut stream);
        held.push(stream);
    }
    // Another 300 from the same address as the health checks, on the main port only.
    for _ in 0..300 {
        let mut stream = connect_from("127.0.0.1", &kiln.http).await;
        slow_headers(&mut stream);
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    for _ in 0..7 {
        let probed = client
            .get(format!("http://{probe}/healthz"))
            .send()
            .await
            .map(|r| r.status().as_u16());
        assert_eq!(probed.ok(), Some(200), "the probe port's /healthz");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The main port from a peer of its own.
    let mut own = connect_from("127.0.0.3", &kiln.http).await;
    own.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    own.write_all(b"GET /healthz HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = own.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    // The probe port serves nothing else.
    let other = client
        .get(format!("http://{probe}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status().as_u16(), 404);
    drop(held);
}

async fn gitlab() -> GitLabServer {
    let server = GitLabServer::start().await;
    server.add_runner_token(TOKEN);
    server.set_long_poll_timeout(Duration::from_secs(2));
    server.set_trace_interval(1);
    server
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gitlab_without_long_polling_is_asked_once_per_check_interval_not_in_a_hot_loop() {
    let gitlab = gitlab().await;
    // No Workhorse: every jobs/request is answered 204 (with X-GitLab-Last-Update) at once.
    gitlab.set_long_poll_timeout(Duration::ZERO);
    let kiln = KilnProcess::start(&config(&gitlab.url(), TOKEN, ""));
    let start = gitlab.polls().len();
    tokio::time::sleep(Duration::from_secs(9)).await;
    let polls = gitlab.polls().len() - start;
    // gitlab-runner's default check_interval of 3 s: ≤ 25 requests a minute is ≤ 3.75 in 9 s.
    assert!(
        (2..=5).contains(&polls),
        "{polls} jobs/request calls in 9 s; log:\n{}",
        kiln.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_http_clients_neither_pin_memory_nor_hold_up_shutdown() {
    let gitlab = gitlab().await;
    let mut kiln = KilnProcess::start(&config(&gitlab.url(), TOKEN, ""));
    let before = rss_mib(kiln.pid());
    let mut stalled = Vec::new();
    for i in 0..200 {
        // From four peers, each within http.max_connections_per_peer (64).
        let mut stream = connect_from(&format!("127.0.0.{}", 2 + i % 4), &kiln.http).await;
        if i % 2 == 0 {
            // Headers that never end, announcing a body that never comes.
            stream
                .write_all(b"POST /hooks/jenkins HTTP/1.1\r\nHost: kiln\r\nContent-Length: 2000000\r\nX-Padding: ")
                .unwrap();
            stream.write_all(&vec![b'a'; 4000]).unwrap();
        }
        stalled.push(stream);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The server still answers others while strangers hold connections.
    let (status, _) = kiln.get("/healthz").await;
    assert_eq!(status, 200);
    let during = rss_mib(kiln.pid());
    assert!(
        during < 64.0,
        "RSS {during:.1} MiB with 200 stalled connections (before: {before:.1})"
    );
    // The header deadline (http.header_timeout, 10 s) closes them: each read ends (EOF or
    // reset) soon after.
    let deadline = Instant::now() + Duration::from_secs(14);
    for (i, stream) in stalled.iter_mut().enumerate() {
        let mut buf = [0u8; 256];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "connection {i} was still open after 14 s");
            stream.set_read_timeout(Some(left)).unwrap();
            match stream.read(&mut buf) {
                Ok(0) => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    // New stalled clients do not keep SIGTERM waiting past the shutdown grace (2 s).
    let _late: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut stream = TcpStream::connect(&kiln.http).unwrap();
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: k")
                .unwrap();
            stream
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    assert!(
        kiln.terminate(Duration::from_secs(8)),
        "kiln did not exit after SIGTERM with stalled clients; log:\n{}",
        kiln.logs()
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_job_is_failed_with_a_reason_instead_of_loaded() {
    let gitlab = gitlab().await;
    let mut job = job_json("huge", &["echo never"]);
    let big = "x".repeat(24 * 1024 * 1024);
    job["variables"]
        .as_array_mut()
        .unwrap()
        .push(json!({"key": "HUGE", "value": big, "public": true, "masked": false}));
    let id = gitlab.enqueue(job);
    drop(big);
    let kiln = KilnProcess::start(&config(&gitlab.url(), TOKEN, ""));
    let record = gitlab
        .wait_for_state(id, &["failed"], Duration::from_secs(60))
        .await;
    assert!(
        record
            .trace
            .contains("more than this runner accepts (4096 KiB)"),
        "{}",
        record.trace
    );
    assert!(record.failure_reason.is_some());
    assert!(!record.trace.contains("never"), "{}", record.trace);
    let rss = rss_mib(kiln.pid());
    assert!(rss < 64.0, "RSS {rss:.1} MiB after a 24 MiB job payload");
    assert!(
        kiln.logs().contains("cannot run"),
        "the log says why: {}",
        kiln.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_without_steps_or_git_info_is_failed_as_malformed_not_run() {
    let gitlab = gitlab().await;
    let mut job = job_json("malformed", &["echo never"]);
    let fields = job.as_object_mut().unwrap();
    fields.remove("steps");
    fields.remove("git_info");
    let id = gitlab.enqueue(job);
    let kiln = KilnProcess::start(&config(&gitlab.url(), TOKEN, ""));
    let record = gitlab
        .wait_for_state(id, &["failed"], Duration::from_secs(30))
        .await;
    assert_eq!(
        record.failure_reason.as_deref(),
        Some("data_integrity_failure"),
        "{}",
        kiln.logs()
    );
    assert!(
        record.trace.contains("no `steps` and no `git_info`"),
        "{}",
        record.trace
    );
    // The next job is taken as usual.
    let next = gitlab.enqueue(job_json("fine", &["echo fine"]));
    let record = gitlab
        .wait_for_state(next, &["success"], Duration::from_secs(30))
        .await;
    assert!(record.trace.contains("fine"));
}

/// Jenkins with a user kiln signs in as, and a Kubernetes for its agent pods.
struct JenkinsSetup {
    jenkins: JenkinsServer,
    _kube: KubeServer,
    dir: tempfile::TempDir,
}

async fn jenkins_setup() -> JenkinsSetup {
    let jenkins = JenkinsServer::start().await;
    jenkins.add_user(JENKINS_USER, JENKINS_TOKEN, "unused-password");
    let kube = KubeServer::start().await;
    kube.alias_binary("/usr/local/bin/kiln", kiln_bin());
    let dir = tempfile::tempdir().unwrap();
    kube.kubeconfig(dir.path().join("kubeconfig"), "ci");
    JenkinsSetup {
        jenkins,
        _kube: kube,
        dir,
    }
}

impl JenkinsSetup {
    fn config(&self, url: &str, extra: &str) -> String {
        format!(
            r#"executor = "kubernetes"

[kubernetes]
kubeconfig = "{}"

[[sources.jenkins]]
name = "ci"
url = "{url}"
user = "{JENKINS_USER}"
token = "{JENKINS_TOKEN}"
labels = ["maven"]
webhook_secret = "{HOOK_SECRET}"
poll_interval = "3s"
{extra}
"#,
            self.dir.path().join("kubeconfig").display(),
        )
    }

    fn queue_requests(&self) -> usize {
        self.jenkins
            .requests()
            .iter()
            .filter(|r| r.path.starts_with("/queue/api/json"))
            .count()
    }
}

async fn post_hook(client: &reqwest::Client, kiln: &KilnProcess, body: &str) -> u16 {
    client
        .post(format!("http://{}/hooks/jenkins", kiln.http))
        .header("X-Kiln-Webhook-Secret", HOOK_SECRET)
        .body(body.to_owned())
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_burst_costs_jenkins_at_most_two_looks_per_poll_interval() {
    let setup = jenkins_setup().await;
    let kiln = KilnProcess::start(&setup.config(&setup.jenkins.url(), ""));
    let client = reqwest::Client::new();
    // Settle: kiln's first looks after start-up.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A healthy Jenkins: 100 webhooks over 6 s (two 3 s poll intervals).
    let before = setup.queue_requests();
    for _ in 0..100 {
        assert_eq!(post_hook(&client, &kiln, "{}").await, 202);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let looks = setup.queue_requests() - before;
    assert!(
        looks <= 2 * 3,
        "{looks} queue requests for 100 webhooks in ~6 s; log:\n{}",
        kiln.logs()
    );

    // Jenkins failing: webhooks do not cut the backoff short.
    setup.jenkins.fail_with(Some(500));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = setup.jenkins.requests().len();
    for _ in 0..100 {
        post_hook(&client, &kiln, "{}").await;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let calls = setup.jenkins.requests().len() - before;
    // Backing off from 3 s upward: at most three looks in these ~6 s, each stopping at its
    // first failed request.
    assert!(
        calls <= 3,
        "{calls} requests to a failing Jenkins during 100 webhooks; log:\n{}",
        kiln.logs()
    );
    setup.jenkins.fail_with(None);
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_bodies_are_read_only_for_callers_with_the_secret_and_only_so_much() {
    let setup = jenkins_setup().await;
    let kiln = KilnProcess::start(&setup.config(&setup.jenkins.url(), ""));
    let client = reqwest::Client::new();
    // A stranger's 2 MB body is refused on its headers.
    let response = client
        .post(format!("http://{}/hooks/jenkins", kiln.http))
        .header("X-Kiln-Webhook-Secret", "wrong-secret-0123456789")
        .body(vec![b'{'; 2_000_000])
        .send()
        .await;
    if let Ok(response) = response {
        assert_eq!(response.status().as_u16(), 401);
    }
    // The right secret with a body over 64 KiB: 413.
    let response = client
        .post(format!("http://{}/hooks/jenkins", kiln.http))
        .header("X-Kiln-Webhook-Secret", HOOK_SECRET)
        .body(format!("{{\"x\": \"{}\"}}", "a".repeat(100 * 1024)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    // A body that never finishes arriving: 408 after body_timeout (10 s by default).
    let mut stream = TcpStream::connect(&kiln.http).unwrap();
    stream
        .write_all(
            format!(
                "POST /hooks/jenkins HTTP/1.1\r\nHost: kiln\r\nX-Kiln-Webhook-Secret: {HOOK_SECRET}\r\nContent-Length: 100\r\n\r\n{{\"a\":"
            )
            .as_bytes(),
        )
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut answer = String::new();
    let mut buf = [0u8; 512];
    if let Ok(n) = stream.read(&mut buf) {
        answer.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_in_source_urls_are_shown_nowhere() {
    let setup = jenkins_setup().await;
    let gitlab = gitlab().await;
    let jenkins_url = setup
        .jenkins
        .url()
        .replace("http://", "http://admin:J3nk1nsPassw0rd@");
    let gitlab_url = gitlab
        .url()
        .replace("http://", "http://proxyuser:G1tProxyPassw0rd@");
    let text = format!(
        "{}\n[[sources.gitlab]]\nname = \"gl\"\nurl = \"{gitlab_url}\"\ntoken = \"{TOKEN}\"\nsystem_id = \"s_0123456789ab\"\npoll_timeout = \"10s\"\n",
        setup.config(&jenkins_url, "")
    );
    let kiln = KilnProcess::start(&text);
    setup.jenkins.enqueue("build", "maven");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, page) = kiln.get("/").await;
    let (_, metrics) = kiln.get("/metrics").await;
    for (what, text) in [
        ("status page", &page),
        ("metrics", &metrics),
        ("log", &kiln.logs()),
    ] {
        for secret in ["J3nk1nsPassw0rd", "G1tProxyPassw0rd"] {
            assert!(!text.contains(secret), "{what} shows {secret}:\n{text}");
        }
    }
    assert!(
        page.contains("***@"),
        "the page shows the URL redacted: {page}"
    );
    // kiln signed in to Jenkins with its token, not with the URL's credentials.
    assert!(
        setup
            .jenkins
            .requests()
            .iter()
            .all(|r| r.user.as_deref() != Some("admin")),
        "kiln signed in as the URL's user"
    );
}

#[test]
fn sigterm_stops_kiln_even_when_its_log_pipe_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    let port = support::kiln::free_port();
    std::fs::write(
        &path,
        format!(
            "[http]\nlisten = \"127.0.0.1:{port}\"\n[[sources.gitlab]]\nurl = \"http://127.0.0.1:9\"\ntoken = \"{TOKEN}\"\nsystem_id = \"s_0123456789ab\"\n"
        ),
    )
    .unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    let mut child = std::process::Command::new(kiln_bin())
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "kiln=debug,info")
        .stdin(std::process::Stdio::null())
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .spawn()
        .unwrap();
    // Read the first line, then go away like `| head -1` does.
    let mut reader = reader;
    let mut first = [0u8; 64];
    let _ = reader.read(&mut first).unwrap();
    drop(reader);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        child.try_wait().unwrap().is_none(),
        "kiln died when its log pipe closed"
    );
    send_signal(child.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "kiln did not exit on SIGTERM with a closed log pipe"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_long_poll_is_not_a_used_build_slot() {
    let gitlab = gitlab().await;
    gitlab.set_long_poll_timeout(Duration::from_secs(30));
    let kiln = KilnProcess::start(&config(&gitlab.url(), TOKEN, "concurrent = 2"));
    // A long poll is held by GitLab now: nothing runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while gitlab.polls().is_empty() {
        assert!(Instant::now() < deadline, "kiln never asked for a job");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, page) = kiln.get("/").await;
    assert!(page.contains("0 of 2 build slots in use"), "{page}");
    let (_, metrics) = kiln.get("/metrics").await;
    assert!(metrics.contains("kiln_jobs_running 0"), "{metrics}");
}
