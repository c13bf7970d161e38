//! End to end: the status page in a real browser. A real `kiln run` takes two jobs from the
//! GitLab test server (one succeeds, one fails), runs them with the local executor, and
//! headless Chromium loads the page; the rendered DOM and the JSON API are checked for the
//! timeline, the failure reason, the links, and for the absence of every secret.
//!
//! `UPDATE_SCREENSHOT=1 cargo test --test e2e status_page::` also writes `docs/status-page.png` (from
//! the Kubernetes test, whose builds have a class and a cost).

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::gitlab::{GitLabServer, job_json};
use support::kiln::{KilnProcess, config, kiln_bin};
use support::kube::KubeServer;

const RUNNER_TOKEN: &str = "glrt-fake-status-1";
/// The value of a masked CI/CD variable of both jobs.
const MASKED_VALUE: &str = "hunter2-masked-deploy-password";
/// How long Chromium may take to load and render the page.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

async fn gitlab() -> GitLabServer {
    let server = GitLabServer::start().await;
    server.add_runner_token(RUNNER_TOKEN);
    server.set_long_poll_timeout(Duration::from_secs(2));
    server.set_trace_interval(1);
    server
}

/// A job whose variables include a masked secret.
fn job_with_secret(name: &str, script: &[&str]) -> Value {
    let mut job = job_json(name, script);
    job["variables"].as_array_mut().unwrap().push(json!({
        "key": "DEPLOY_PASSWORD", "value": MASKED_VALUE, "public": false, "file": false,
        "masked": true, "raw": false,
    }));
    job
}

/// Runs Chromium headless on `url` with `args` (`--dump-dom`, `--screenshot=…`); its stdout.
fn chromium(url: &str, args: &[&str], profile: &Path) -> String {
    let binary = support::tools::chromium();
    let mut child = Command::new(&binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "{} did not finish within {BROWSER_TIMEOUT:?}",
                binary.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{} failed ({}): {}",
        binary.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `GET` of kiln's API, as JSON.
async fn api(kiln: &KilnProcess, path: &str) -> (String, Value) {
    let (status, body) = kiln.get(path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"));
    (body, value)
}

/// The element of the DOM that carries `data-build="NAME"` in `tag`, up to its closing tag.
fn element<'a>(dom: &'a str, tag: &str, name: &str) -> &'a str {
    let marker = format!("data-build=\"{name}\"");
    let at = dom
        .match_indices(&marker)
        .map(|(i, _)| i)
        .find(|&i| {
            dom[..i]
                .rfind('<')
                .is_some_and(|open| dom[open + 1..].starts_with(tag))
        })
        .unwrap_or_else(|| panic!("no <{tag} {marker}> in the page:\n{dom}"));
    let end = dom[at..]
        .find(&format!("</{tag}>"))
        .map_or(dom.len(), |e| at + e);
    &dom[at..end]
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_shows_a_bar_per_build_and_the_failure_reason_in_a_browser() {
    let gitlab = gitlab().await;
    let passed = gitlab.enqueue(job_with_secret("unit tests", &["echo fine"]));
    let failed = gitlab.enqueue(job_with_secret("deploy", &["echo deploying", "exit 3"]));
    let kiln = KilnProcess::start(&config(&gitlab.url(), RUNNER_TOKEN, "concurrent = 2"));
    for id in [passed, failed] {
        gitlab
            .wait_for_state(id, &["success", "failed"], Duration::from_secs(90))
            .await;
    }
    assert_eq!(gitlab.job(passed).state, "success", "{}", kiln.logs());
    assert_eq!(gitlab.job(failed).state, "failed", "{}", kiln.logs());

    // Both builds reach the history once their source heard of the end.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (builds_body, builds) = loop {
        let (body, builds) = api(&kiln, "/api/v1/builds").await;
        let finished = builds["builds"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| !b["finished_at"].is_null())
            .count();
        if finished == 2 {
            break (body, builds);
        }
        assert!(Instant::now() < deadline, "builds not finished: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let by_name = |id: u64| {
        builds["builds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == format!("kiln-gl-{id}"))
            .unwrap_or_else(|| panic!("no build kiln-gl-{id}: {builds_body}"))
            .clone()
    };
    let bad = by_name(failed);
    assert_eq!(bad["state"], "failed");
    assert_eq!(bad["reason"], "script_failure");
    assert_eq!(bad["exit_code"], 3);
    assert_eq!(bad["source"], "gitlab");
    assert_eq!(bad["project"], "kiln/demo");
    assert_eq!(bad["pipeline"], "4200");
    let job_url = format!("{}kiln/demo/-/jobs/{failed}", gitlab.url());
    assert_eq!(bad["url"], job_url.as_str());
    for field in ["launched_at", "created_at", "running_at", "finished_at"] {
        assert!(bad[field].is_string(), "{field} missing: {bad}");
    }
    assert_eq!(by_name(passed)["state"], "succeeded");
    assert_eq!(builds["history_limit"], 1000);
    assert!(
        bad["cost"].is_null(),
        "the local executor does not size builds"
    );

    let (sources_body, sources) = api(&kiln, "/api/v1/sources").await;
    let source = &sources["sources"][0];
    assert_eq!(source["kind"], "gitlab");
    assert_eq!(source["name"], "test");
    assert_eq!(source["ready"], true, "{sources_body}");
    assert!(source["last_success"].is_string(), "{sources_body}");
    assert!(source["last_error"].is_null(), "{sources_body}");
    let (costs_body, _) = api(&kiln, "/api/v1/costs").await;

    // The page in a real browser.
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/", kiln.http);
    let dom = chromium(&url, &["--dump-dom"], profile.path());
    assert!(dom.contains("<svg id=\"timeline-chart\""), "{dom}");
    let bars = dom.matches("<g class=\"bar ").count();
    assert_eq!(bars, 2, "one bar per build:\n{dom}");
    let bar = element(&dom, "g", &format!("kiln-gl-{failed}"));
    assert!(bar.contains("data-state=\"failed\""), "{bar}");
    assert!(bar.contains("script_failure"), "{bar}");
    assert!(bar.contains("class=\"segment failed\""), "{bar}");
    let row = element(&dom, "tr", &format!("kiln-gl-{failed}"));
    assert!(row.contains("script_failure (exit code 3)"), "{row}");
    assert!(row.contains(&format!("href=\"{job_url}\"")), "{row}");
    let good = element(&dom, "g", &format!("kiln-gl-{passed}"));
    assert!(good.contains("class=\"segment succeeded\""), "{good}");
    let sources_row = dom
        .find("data-source=\"gitlab/test\"")
        .map(|at| &dom[at..])
        .unwrap_or_else(|| panic!("no source row:\n{dom}"));
    assert!(sources_row.contains(">ready<"), "{sources_row}");

    // No secret anywhere: not the runner token, not a job token, not a masked variable.
    let mut secrets = vec![RUNNER_TOKEN.to_owned(), MASKED_VALUE.to_owned()];
    for id in [passed, failed] {
        secrets.push(gitlab.job(id).token);
    }
    for (what, text) in [
        ("the page", &dom),
        ("/api/v1/builds", &builds_body),
        ("/api/v1/sources", &sources_body),
        ("/api/v1/costs", &costs_body),
    ] {
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{what} shows a secret:\n{text}"
            );
        }
    }

    // A screenshot proves it renders.
    screenshot(&url, profile.path());
}

/// A PNG of the page at `url`, checked to be one.
fn screenshot(url: &str, dir: &Path) -> Vec<u8> {
    let shot = dir.join("status-page.png");
    chromium(
        url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,900",
        ],
        &dir.join("shot-profile"),
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot: {e}"));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    png
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_builds_show_their_class_and_cost_and_count_it_in_the_metrics() {
    let gitlab = gitlab().await;
    let kube = KubeServer::start().await;
    // The kiln image's binary is this build's kiln.
    kube.alias_binary("/usr/local/bin/kiln", kiln_bin());
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.kubeconfig(&kubeconfig, "ci");
    let top = format!(
        r#"executor = "kubernetes"
concurrent = 4

[cost]
price_per_vcpu_hour = 0.045
price_per_gib_hour = 0.005

[kubernetes]
kubeconfig = "{}"
helper_image = "kiln-test/kiln:dev"
pending_timeout = "30s"
default_resource_class = "spot"

[kubernetes.resource_classes.spot]
cpu_request = "2"
memory_request = "4Gi"
price_per_vcpu_hour = 0.012
"#,
        kubeconfig.display()
    );
    let ids = [
        gitlab.enqueue(job_with_secret("build", &["echo compiling", "sleep 1"])),
        gitlab.enqueue(job_with_secret("test", &["sleep 1", "exit 2"])),
        gitlab.enqueue(job_with_secret("package", &["sleep 2"])),
    ];
    let kiln = KilnProcess::start(&config(&gitlab.url(), RUNNER_TOKEN, &top));
    for id in ids {
        gitlab
            .wait_for_state(id, &["success", "failed"], Duration::from_secs(120))
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let builds = loop {
        let (body, builds) = api(&kiln, "/api/v1/builds").await;
        let costed = builds["builds"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["cost"].is_number())
            .count();
        if costed == ids.len() {
            break builds;
        }
        assert!(
            Instant::now() < deadline,
            "builds without a cost: {body}\n{}",
            kiln.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let seconds = |from: &Value, to: &Value| {
        let at = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
        (at(to) - at(from)).as_seconds_f64()
    };
    let mut total = 0.0;
    for build in builds["builds"].as_array().unwrap() {
        assert_eq!(build["class"], "spot", "{build}");
        // The build container's 2 vCPU / 4 GiB; the init container is not counted.
        assert_eq!(build["vcpu"], 2.0, "{build}");
        assert_eq!(build["gib"], 4.0, "{build}");
        let billed = seconds(&build["created_at"], &build["finished_at"]);
        assert!(billed >= 1.0, "the pod ran its script: {build}");
        // The class's vCPU price and the default memory price; the API's times are rounded
        // to milliseconds.
        let per_second = (2.0 * 0.012 + 4.0 * 0.005) / 3600.0;
        let cost = build["cost"].as_f64().unwrap();
        assert!(
            (cost - billed * per_second).abs() <= 0.002 * per_second,
            "{cost} for {billed}s: {build}"
        );
        total += cost;
    }
    let (_, metrics) = kiln.get("/metrics").await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with(
                r#"kiln_build_cost_total{source="gitlab",project="kiln/demo",class="spot"}"#,
            )
        })
        .unwrap_or_else(|| panic!("no cost counter:\n{metrics}"));
    let counted: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((counted - total).abs() < 1e-12, "{line} != {total}");
    let (_, costs) = api(&kiln, "/api/v1/costs").await;
    assert_eq!(costs["projects"][0]["project"], "kiln/demo");
    assert_eq!(costs["projects"][0]["builds"], 3);
    assert_eq!(costs["projects"][0]["pipelines"]["4200"]["builds"], 3);

    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/", kiln.http);
    let dom = chromium(&url, &["--dump-dom"], profile.path());
    assert_eq!(dom.matches("<g class=\"bar ").count(), 3, "{dom}");
    assert!(dom.contains("spot (2.00 vCPU, 4.00 GiB)"), "{dom}");
    assert!(dom.contains("<section id=\"costs\">"), "{dom}");
    assert!(dom.contains(" USD</td>"), "{dom}");
    for id in ids {
        assert!(
            !dom.contains(&gitlab.job(id).token),
            "a job token in the page"
        );
    }
    assert!(!dom.contains(MASKED_VALUE) && !dom.contains(RUNNER_TOKEN));
    let png = screenshot(&url, profile.path());
    if std::env::var_os("UPDATE_SCREENSHOT").is_some() {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png");
        std::fs::write(&docs, &png).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_token_the_status_page_and_api_need_it_and_the_metrics_stay_open() {
    let gitlab = gitlab().await;
    let token = "status-page-token-1234";
    let kiln = KilnProcess::start_with_env(
        &config(&gitlab.url(), RUNNER_TOKEN, ""),
        &[("KILN_STATUS__TOKEN", token)],
    );
    let client = reqwest::Client::new();
    for path in ["/", "/api/v1/builds", "/api/v1/sources", "/api/v1/costs"] {
        let url = format!("http://{}{path}", kiln.http);
        let anonymous = client.get(&url).send().await.unwrap();
        assert_eq!(anonymous.status(), 401, "{path} without the token");
        assert!(anonymous.headers().contains_key("www-authenticate"));
        let wrong = client.get(&url).bearer_auth("nope").send().await.unwrap();
        assert_eq!(wrong.status(), 401, "{path} with a wrong token");
        let bearer = client.get(&url).bearer_auth(token).send().await.unwrap();
        assert_eq!(bearer.status(), 200, "{path} with the bearer token");
        let browser = client
            .get(&url)
            .basic_auth("anyone", Some(token))
            .send()
            .await
            .unwrap();
        assert_eq!(browser.status(), 200, "{path} with the token as a password");
    }
    let (status, _) = kiln.get("/metrics").await;
    assert_eq!(status, 200, "Prometheus needs no token");
    let (status, _) = kiln.get("/healthz").await;
    assert_eq!(status, 200);
}
