//! The command line as an operator uses it: help, check-config, and runner registration
//! against the GitLab test server.

use crate::support;

use std::process::Output;

use support::gitlab::GitLabServer;
use support::kiln::kiln_bin;

fn kiln(args: &[&str]) -> Output {
    std::process::Command::new(kiln_bin())
        .args(args)
        .env_remove("KILN_CONFIG")
        .output()
        .unwrap()
}

/// `kiln` on a blocking thread, so the test server keeps answering meanwhile.
async fn kiln_async(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        kiln(&args)
    })
    .await
    .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn help_explains_every_command_in_one_line() {
    let out = kiln(&["--help"]);
    assert!(out.status.success());
    let help = text(&out);
    for command in [
        "run",
        "agent",
        "register",
        "unregister",
        "verify",
        "check-config",
    ] {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{command} ")))
            .unwrap_or_else(|| panic!("`{command}` missing from --help:\n{help}"));
        assert!(
            line.split_whitespace().count() > 3,
            "`{command}` has no description: {line}"
        );
    }
}

#[test]
fn check_config_lists_every_problem_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    std::fs::write(
        &path,
        "concurrent = 0\n[[sources.gitlab]]\nurl = \"not a url\"\ntoken = \"\"\n",
    )
    .unwrap();
    let out = kiln(&["check-config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let report = text(&out);
    assert!(
        report.contains("concurrent: must be at least 1"),
        "{report}"
    );
    assert!(
        report.contains("sources.gitlab[0].url: not a URL"),
        "{report}"
    );
    assert!(
        report.contains("sources.gitlab[0].token: is empty"),
        "{report}"
    );

    std::fs::write(
        &path,
        "[[sources.gitlab]]\nurl = \"https://gitlab.example.com\"\ntoken = \"glrt-x\"\n",
    )
    .unwrap();
    let out = kiln(&["check-config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn check_config_reports_every_unknown_key_an_empty_file_and_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    // Two typos: both are reported, each with its line.
    std::fs::write(
        &path,
        "[http]\nlisen = \"127.0.0.1:9252\"\n\n[[sources.gitlab]]\nurl = \"https://gitlab.example.com\"\ntoken = \"glrt-x\"\npol_timeout = \"30s\"\n",
    )
    .unwrap();
    let out = kiln(&["check-config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let report = text(&out);
    assert!(report.contains("has 2 problem(s)"), "{report}");
    assert!(
        report.contains("http.lisen (line 2): unknown field `lisen`"),
        "{report}"
    );
    assert!(
        report.contains("sources.gitlab[0].pol_timeout (line 7): unknown field `pol_timeout`"),
        "{report}"
    );

    // An empty file is not a working configuration: kiln run would have nothing to do.
    std::fs::write(&path, "").unwrap();
    let out = kiln(&["check-config", path.to_str().unwrap()]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("no job sources configured"),
        "{}",
        text(&out)
    );

    // A missing file says why.
    let missing = dir.path().join("nope.toml");
    let out = kiln(&["check-config", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("No such file or directory"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn register_verify_and_unregister_a_glrt_token() {
    let gitlab = GitLabServer::start().await;
    gitlab.add_runner_token("glrt-from-the-ui");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml");
    let config = config.to_str().unwrap();
    let url = gitlab.url();
    let out = tokio::task::spawn_blocking({
        let (url, config) = (url.clone(), config.to_owned());
        move || {
            kiln(&[
                "register",
                "--config",
                &config,
                "--url",
                &url,
                "--token",
                "glrt-from-the-ui",
                "--name",
                "ci",
            ])
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !text(&out).contains("glrt-from-the-ui"),
        "the token was printed"
    );
    let saved = std::fs::read_to_string(config).unwrap();
    assert!(saved.contains("token = \"glrt-from-the-ui\""), "{saved}");
    let system_id = gitlab.runner("glrt-from-the-ui").unwrap().system_ids[0].clone();
    assert!(saved.contains(&system_id), "{saved}");

    // Registering again keeps the same system id (one runner manager, not two).
    let out = tokio::task::spawn_blocking({
        let (url, config) = (url.clone(), config.to_owned());
        move || {
            kiln(&[
                "register",
                "--config",
                &config,
                "--url",
                &url,
                "--token",
                "glrt-from-the-ui",
                "--name",
                "ci",
            ])
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let runner = gitlab.runner("glrt-from-the-ui").unwrap();
    assert!(
        runner.system_ids.iter().all(|id| *id == system_id),
        "{:?}",
        runner.system_ids
    );

    let out = kiln_async(&["verify", "--config", config]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("ci: ok"), "{}", text(&out));

    let out = kiln_async(&["unregister", "--config", config]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        gitlab.runner("glrt-from-the-ui").unwrap().deleted_managers,
        [system_id]
    );
    assert!(
        !std::fs::read_to_string(config)
            .unwrap()
            .contains("glrt-from-the-ui")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_registration_sends_tags_and_explains_410_and_403() {
    let gitlab = GitLabServer::start().await;
    gitlab.set_registration_token("GR1348941legacy");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml").to_str().unwrap().to_owned();
    let url = gitlab.url();
    let run = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            kiln(&args)
        })
        .await
        .unwrap()
    };
    let base = |token: &str| {
        vec![
            "register".to_owned(),
            "--config".into(),
            config.clone(),
            "--url".into(),
            url.clone(),
            "--registration-token".into(),
            token.into(),
            "--tag-list".into(),
            "docker,linux".into(),
            "--run-untagged".into(),
            "--locked".into(),
        ]
    };
    let out = run(base("GR1348941legacy")).await;
    assert!(out.status.success(), "{}", text(&out));
    let registration = gitlab
        .registrations()
        .into_iter()
        .find(|r| r.path == "runners")
        .unwrap();
    assert_eq!(
        registration.param("tag_list").as_deref(),
        Some("docker,linux")
    );
    assert_eq!(registration.param("run_untagged").as_deref(), Some("true"));
    assert_eq!(registration.param("locked").as_deref(), Some("true"));
    assert!(std::fs::read_to_string(&config).unwrap().contains("glrt-"));

    let out = run(base("wrong-token")).await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("rejected the registration token (HTTP 403)"),
        "{}",
        text(&out)
    );
    assert!(
        !text(&out).contains("wrong-token"),
        "the token was printed: {}",
        text(&out)
    );

    gitlab.disable_registration();
    let out = run(base("GR1348941legacy")).await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("registration tokens disabled (HTTP 410)"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pat_creates_then_verifies_the_runner() {
    let gitlab = GitLabServer::start().await;
    gitlab.set_pat("glpat-operator");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml").to_str().unwrap().to_owned();
    let url = gitlab.url();
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        move || {
            kiln(&[
                "register",
                "--config",
                &config,
                "--url",
                &url,
                "--pat",
                "glpat-operator",
                "--runner-type",
                "group",
                "--group-id",
                "7",
                "--tag-list",
                "k8s",
            ])
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let saved = std::fs::read_to_string(&config).unwrap();
    let runner = gitlab
        .runners()
        .into_iter()
        .find(|r| saved.contains(&r.token))
        .expect("token saved");
    assert!(!runner.system_ids.is_empty(), "the new runner was verified");
}

#[test]
fn unreachable_gitlab_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml");
    let port = support::kiln::free_port();
    let out = kiln(&[
        "register",
        "--config",
        config.to_str().unwrap(),
        "--url",
        &format!("http://127.0.0.1:{port}"),
        "--token",
        "glrt-x",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot reach GitLab at http://127.0.0.1"),
        "{}",
        text(&out)
    );
}

/// check-config names every kind of source it read, and warns when the file holds a token
/// that other users of the machine can read.
#[test]
fn check_config_counts_github_sources_and_warns_of_a_readable_token() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    std::fs::write(
        &path,
        "[[sources.gitlab]]\nurl = \"https://gitlab.example.com\"\ntoken = \"glrt-x\"\n\n\
         [[sources.jenkins]]\nurl = \"https://jenkins.example.com\"\nuser = \"kiln\"\ntoken = \"t\"\nlabels = [\"linux\"]\n\n\
         [[sources.github]]\norg = \"acme\"\ntoken = \"g\"\nlabels = [\"kiln\"]\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = kiln(&["check-config", path.to_str().unwrap()]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("1 GitLab runner(s), 1 Jenkins controller(s), 1 GitHub source(s)"),
        "{said}"
    );
    assert!(
        said.contains("warning:") && said.contains("chmod 600"),
        "{said}"
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let said = text(&kiln(&["check-config", path.to_str().unwrap()]));
    assert!(!said.contains("warning:"), "{said}");
}

/// `container_mode = "dind"` runs a privileged sidecar: without the admin's
/// `[kubernetes] privileged = true` check-config refuses it, naming the field; and an
/// enterprise source with a GitHub App (which cannot register enterprise runners) is named too.
#[test]
fn check_config_refuses_dind_without_the_privileged_opt_in_and_enterprise_with_an_app() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    let write = |kubernetes: &str, github: &str| {
        std::fs::write(
            &path,
            format!(
                "executor = \"kubernetes\"\n[kubernetes]\nnamespace = \"ci\"\n{kubernetes}\n\n\
                 [[sources.github]]\ntoken = \"g\"\nlabels = [\"kiln\"]\n{github}\n"
            ),
        )
        .unwrap();
    };
    write("", "org = \"acme\"\ncontainer_mode = \"dind\"");
    let out = kiln(&["check-config", path.to_str().unwrap()]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("sources.github[0].container_mode") && said.contains("privileged = true"),
        "{said}"
    );
    write(
        "privileged = true",
        "org = \"acme\"\ncontainer_mode = \"dind\"",
    );
    let out = kiln(&["check-config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    write("", "enterprise = \"megacorp\"\napp_id = 12");
    let out = kiln(&["check-config", path.to_str().unwrap()]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("sources.github[0].app_id") && said.contains("manage_runners:enterprise"),
        "{said}"
    );
}
