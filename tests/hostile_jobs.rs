//! Hostile jobs, end to end (issue #25): a real `kiln run` against the GitLab test server, the
//! agent running each job as a child process (local executor). Each test is one finding of the
//! outside probe: payload values that git would take as options, archives that write through a
//! symlink of the checkout or carry setuid bits, uploads that followed symlinks. The extractor's
//! property test (any archive) is `any_archive_stays_inside_the_project` in
//! `src/agent/artifacts.rs`.

use crate::support;

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use support::gitlab::{GitLabServer, job_json};
use support::kiln::{KilnProcess, config};

const TOKEN: &str = "glrt-fake-token";

async fn server() -> GitLabServer {
    let server = GitLabServer::start().await;
    server.add_runner_token(TOKEN);
    server.set_long_poll_timeout(Duration::from_secs(2));
    server.set_trace_interval(1);
    server
}

async fn finished(gitlab: &GitLabServer, id: u64) -> support::gitlab::JobRecord {
    gitlab
        .wait_for_state(id, &["success", "failed"], Duration::from_secs(60))
        .await
}

fn kiln(server: &GitLabServer) -> KilnProcess {
    KilnProcess::start(&config(&server.url(), TOKEN, ""))
}

/// A git repository with one commit holding `files` (name, content) and `links` (name, target);
/// returns the commit's sha.
fn repository(dir: &Path, files: &[(&str, &str)], links: &[(&str, &Path)]) -> String {
    let git = |args: &[&str]| support::kiln::git(dir, args);
    git(&["init", "-q", "-b", "main"]);
    for (name, content) in files {
        std::fs::write(dir.join(name), content).unwrap();
    }
    for (name, target) in links {
        std::os::unix::fs::symlink(target, dir.join(name)).unwrap();
    }
    git(&["add", "-A"]);
    git(&["commit", "-q", "--allow-empty", "-m", "one"]);
    let sha = git(&["rev-parse", "HEAD"]);
    support::kiln::give_repository_to_builds(dir);
    sha
}

/// A stored zip of (name, Unix mode, content) entries, made by "Unix" the way gitlab-runner
/// writes them; the `zip` crate's writer cannot set setuid bits (it masks modes to 0o777).
fn raw_zip(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, mode, data) in entries {
        let offset = out.len() as u32;
        let crc = crc32fast::hash(data);
        let len = data.len() as u32;
        let name = name.as_bytes();
        let common = |buf: &mut Vec<u8>| {
            buf.extend_from_slice(&20u16.to_le_bytes());
            buf.extend_from_slice(&0x0800u16.to_le_bytes());
            buf.extend_from_slice(&0u16.to_le_bytes());
            buf.extend_from_slice(&0u32.to_le_bytes());
            buf.extend_from_slice(&crc.to_le_bytes());
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
        };
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        common(&mut out);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&((3u16 << 8) | 20).to_le_bytes());
        common(&mut central);
        central.extend_from_slice(&[0; 8]);
        central.extend_from_slice(&(mode << 16).to_le_bytes());
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name);
    }
    let central_at = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&central_at.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// Finding 10: a refspec `--upload-pack=<command>` made `git fetch` run the command; a sha
/// `--orphan=x` reached `git checkout` as an option. Both are refused before git runs, the job
/// fails as the job's problem (script_failure, not runner_system_failure) and the trace names
/// the value.
#[tokio::test(flavor = "multi_thread")]
async fn payload_values_that_git_would_take_as_options_are_refused_by_name() {
    let gitlab = server().await;
    let repo = tempfile::tempdir().unwrap();
    let sha = repository(repo.path(), &[("hello.txt", "hi")], &[]);
    let marker = tempfile::tempdir().unwrap();
    let pwned = marker.path().join("pwned");
    let upload_pack = format!("--upload-pack=touch {}", pwned.display());
    let url = format!("file://{}", repo.path().display());

    let mut refspec_job = job_json("refspec", &["echo ran"]);
    refspec_job["git_info"]["repo_url"] = json!(url);
    refspec_job["git_info"]["sha"] = json!(sha);
    refspec_job["git_info"]["refspecs"] = json!([upload_pack]);
    let mut sha_job = job_json("sha", &["echo ran"]);
    sha_job["git_info"]["repo_url"] = json!(url);
    sha_job["git_info"]["sha"] = json!("--orphan=x");
    let refspec_id = gitlab.enqueue(refspec_job);
    let sha_id = gitlab.enqueue(sha_job);
    let kiln = kiln(&gitlab);

    for (id, value) in [(refspec_id, upload_pack.as_str()), (sha_id, "--orphan=x")] {
        let job = finished(&gitlab, id).await;
        assert_eq!(job.state, "failed", "{}\n{}", job.trace, kiln.logs());
        assert_eq!(
            job.failure_reason.as_deref(),
            Some("script_failure"),
            "{}",
            job.trace
        );
        assert!(job.trace.contains(value), "{}", job.trace);
        assert!(!job.trace.contains("\nran"), "{}", job.trace);
    }
    assert!(!pwned.exists(), "the refspec ran its command");
}

/// Finding 3: the checkout holds `evil_link -> <outside>`; a dependency's entry `evil_link/x`
/// was written to `<outside>/x`. Now the download is refused, naming the job and the entry.
#[tokio::test(flavor = "multi_thread")]
async fn an_artifact_entry_under_a_committed_symlink_is_refused() {
    let gitlab = server().await;
    let outside = tempfile::tempdir().unwrap();
    let repo = tempfile::tempdir().unwrap();
    let sha = repository(repo.path(), &[], &[("evil_link", outside.path())]);
    let archive = raw_zip(&[("evil_link/x", 0o100_644, b"pwned")]);
    let dependency = gitlab.store_artifact(900, archive);
    let mut job = job_json("uses-evil", &["echo ran"]);
    job["git_info"]["repo_url"] = json!(format!("file://{}", repo.path().display()));
    job["git_info"]["sha"] = json!(sha);
    job["dependencies"] = json!([dependency]);
    let id = gitlab.enqueue(job);
    let _kiln = kiln(&gitlab);
    let job = finished(&gitlab, id).await;
    assert!(
        !outside.path().join("x").exists(),
        "written through the link"
    );
    assert_eq!(job.state, "failed", "{}", job.trace);
    assert!(
        job.trace.contains("evil_link/x") && job.trace.contains("build-900"),
        "{}",
        job.trace
    );
}

/// Finding 4, upload: `dist/secret -> <outside>/secret` uploaded the secret's content (mode
/// 0777); `dist/lib64 -> lib` failed the upload with "Is a directory". Now both are stored as
/// links (S_IFLNK, the target as content), as gitlab-runner stores them.
#[tokio::test(flavor = "multi_thread")]
async fn uploads_store_symlinks_as_links_never_their_targets() {
    let gitlab = server().await;
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, "top secret").unwrap();
    let link = format!("ln -s {} dist/secret", secret.display());
    let mut job = job_json(
        "links",
        &[
            "mkdir -p dist/lib",
            "echo so > dist/lib/a.so",
            "ln -s lib dist/lib64",
            &link,
        ],
    );
    job["artifacts"] = json!([
        {"paths": ["dist/"], "when": "on_success", "artifact_type": "archive", "artifact_format": "zip"}
    ]);
    let id = gitlab.enqueue(job);
    let _kiln = kiln(&gitlab);
    let job = finished(&gitlab, id).await;
    assert_eq!(job.state, "success", "{}", job.trace);
    let upload = &job.artifacts[0];
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(upload.bytes.clone())).unwrap();
    for (name, target) in [
        ("dist/lib64", "lib".to_owned()),
        ("dist/secret", secret.display().to_string()),
    ] {
        let mut entry = archive.by_name(name).unwrap();
        assert!(entry.is_symlink(), "{name} is not stored as a link");
        let mut content = String::new();
        std::io::Read::read_to_string(&mut entry, &mut content).unwrap();
        assert_eq!(content, target);
    }
    assert!(
        !upload
            .bytes
            .windows(b"top secret".len())
            .any(|w| w == b"top secret")
    );
}

/// Finding 4, download, and finding 13: a link entry (as gitlab-runner archives a venv's
/// `lib64 -> lib`) became a 0777 regular file; a setuid entry stayed setuid. Now the link is a
/// link and the mode is 0755.
#[tokio::test(flavor = "multi_thread")]
async fn downloaded_links_stay_links_and_setuid_bits_are_dropped() {
    let gitlab = server().await;
    let archive = raw_zip(&[
        ("venv/lib/a.so", 0o100_644, b"so"),
        ("venv/lib64", 0o120_777, b"lib"),
        ("bin/tool", 0o104_755, b"#!/bin/sh\necho tool\n"),
    ]);
    let dependency = gitlab.store_artifact(901, archive);
    let mut job = job_json(
        "uses-links",
        &[
            "test -L venv/lib64",
            "cat venv/lib64/a.so",
            "echo mode=$(stat -c %a bin/tool)",
        ],
    );
    job["dependencies"] = json!([dependency]);
    let id = gitlab.enqueue(job);
    let _kiln = kiln(&gitlab);
    let job = finished(&gitlab, id).await;
    assert_eq!(job.state, "success", "{}", job.trace);
    assert!(job.trace.contains("mode=755\n"), "{}", job.trace);
}
