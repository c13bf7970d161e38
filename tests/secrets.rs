//! Secrets kiln is given stay out of what it prints: here, `Debug` output of its configuration
//! and its configuration errors (the chaos run in `tests/chaos.rs` greps every log line,
//! `/metrics` and the status page of a whole run for every token it was given).

use kiln::config::Config;

const GITLAB_TOKEN: &str = "glrt-fake-debug-1";
const JENKINS_TOKEN: &str = "jenkins-api-token-0123456789abcdef";
const JENKINS_HOOK: &str = "jenkins-webhook-secret-0123456789";
const GITHUB_TOKEN: &str = "github_pat_debugsecret0123456789";
const GITHUB_HOOK: &str = "github-webhook-secret-0123456789";
const CACHE_KEY: &str = "cache-storage-secret-0123456789";

fn config_text(extra: &str) -> String {
    format!(
        r#"{extra}
[[sources.gitlab]]
url = "https://gitlab.example.com"
token = "{GITLAB_TOKEN}"

[[sources.jenkins]]
url = "https://jenkins.example.com"
user = "kiln"
token = "{JENKINS_TOKEN}"
labels = ["maven"]
webhook_secret = "{JENKINS_HOOK}"

[[sources.github]]
owner = "kiln"
repo = "demo"
token = "{GITHUB_TOKEN}"
labels = ["self-hosted"]
webhook_secret = "{GITHUB_HOOK}"

[cache]
type = "s3"
[cache.s3]
bucket_name = "ci-cache"
access_key = "access"
secret_key = "{CACHE_KEY}"
"#
    )
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [
        GITLAB_TOKEN,
        JENKINS_TOKEN,
        JENKINS_HOOK,
        GITHUB_TOKEN,
        GITHUB_HOOK,
        CACHE_KEY,
    ] {
        assert!(!text.contains(secret), "{what} shows {secret}:\n{text}");
    }
}

#[test]
fn configuration_debug_output_and_errors_show_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    std::fs::write(&path, config_text("")).unwrap();
    let config = Config::load_with_env(Some(&path), Vec::new()).expect("a valid configuration");
    let debug = format!("{config:?} {config:#?}");
    assert!(debug.contains("[redacted]"), "{debug}");
    assert_no_secret("Debug of the configuration", &debug);

    // An invalid file next to the same secrets: the problems are listed, the secrets are not.
    std::fs::write(&path, config_text("concurrent = -1\nexecutor = \"nope\"")).unwrap();
    let error = Config::load_with_env(Some(&path), Vec::new()).expect_err("invalid");
    assert_no_secret("the configuration error", &format!("{error} {error:?}"));
}
