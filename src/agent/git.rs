//! Fetching the job's sources: init or reuse the checkout, fetch the refspecs GitLab sent (at
//! the requested depth), check out the exact commit, and clean it.
//!
//! Every value from the payload reaches git as an argument, so each is checked first (a sha is
//! hex, a refspec, ref or URL does not start with `-`, none holds a control character) and every
//! command ends its options with `--end-of-options`: a payload value can never become an option
//! such as `--upload-pack=<command>` (which runs the command) or `--orphan=<branch>`.

use std::path::Path;

use super::options::{JobOptions, Submodules};
use crate::gitlab::payload::GitInfo;

/// A payload value git must not be given. The job fails as a script/config problem (the value
/// comes from the project or the pipeline, not from the runner), naming the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum GitError {
    /// A value that git would read as an option, or one that no git name can hold.
    #[error("refusing the job's {field} `{value}`: {reason}")]
    Refused {
        /// Which field of `git_info` (`sha`, `refspec`, `ref`, `repo_url`).
        field: &'static str,
        /// The value, with control characters escaped so it cannot forge trace lines.
        value: String,
        /// Why.
        reason: &'static str,
    },
}

fn refuse(field: &'static str, value: &str, reason: &'static str) -> GitError {
    GitError::Refused {
        field,
        value: value.escape_debug().to_string(),
        reason,
    }
}

/// A name git takes as a positional argument: not empty, no leading `-` (it would be read as an
/// option without `--end-of-options`, and no ref, refspec or URL GitLab sends starts with one),
/// no control characters (NUL cannot be passed at all; newlines forge trace lines).
fn check_name(field: &'static str, value: &str) -> Result<(), GitError> {
    if value.is_empty() {
        return Err(refuse(field, value, "it is empty"));
    }
    if value.starts_with('-') {
        return Err(refuse(
            field,
            value,
            "it starts with `-`, like a git option",
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(refuse(field, value, "it holds a control character"));
    }
    Ok(())
}

/// Checks every value of `info` that reaches a git command line.
///
/// # Errors
/// The first value refused, named.
pub(crate) fn validate(info: &GitInfo) -> Result<(), GitError> {
    check_name("repo_url", &info.repo_url)?;
    // An empty sha means "what was fetched" (FETCH_HEAD); anything else must be a commit id:
    // SHA-1 (40) or SHA-256 (64) hex digits, or an abbreviation of one.
    if !info.sha.is_empty()
        && (info.sha.len() > 64 || !info.sha.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(refuse(
            "sha",
            &info.sha,
            "a commit sha is at most 64 hexadecimal digits",
        ));
    }
    if info.refspecs.is_empty() {
        // The ref goes into the default refspec after `refs/heads/`, so a leading `-` is harmless
        // there, but it is no branch or tag name git allows either.
        check_name("ref", &info.git_ref)?;
    }
    for refspec in &info.refspecs {
        check_name("refspec", refspec)?;
    }
    Ok(())
}

/// How to get the sources (`GIT_STRATEGY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Strategy {
    /// Fresh clone.
    Clone,
    /// Reuse an existing checkout if there is one.
    Fetch,
    /// Do not touch the sources.
    None,
}

impl Strategy {
    /// From `GIT_STRATEGY`; GitLab's default is `fetch`, which for a fresh work dir is a clone.
    pub(crate) fn from_variable(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            Some("none" | "empty") => Self::None,
            Some("clone") => Self::Clone,
            _ => Self::Fetch,
        }
    }
}

/// The git command lines that check out `info` into `dir`, in order, as gitlab-runner runs
/// them: fetch (`GIT_FETCH_EXTRA_FLAGS`), checkout (unless `GIT_CHECKOUT=false`), clean
/// (`GIT_CLEAN_FLAGS`), LFS objects when `lfs` (git-lfs is installed) and the job does not set
/// `GIT_LFS_SKIP_SMUDGE`, then submodules (`GIT_SUBMODULE_*`). `depth` overrides the job's depth
/// (`GIT_DEPTH`).
///
/// Relative submodule URLs (`../lib.git`) resolve against `origin`'s URL, which carries the job
/// token, so submodules on the same GitLab are fetched with it; so are their LFS objects.
///
/// # Errors
/// A payload value refused by [`validate`]; then no git command runs at all.
pub(crate) fn commands(
    info: &GitInfo,
    dir: &Path,
    strategy: Strategy,
    depth: Option<u32>,
    options: &JobOptions,
    lfs: bool,
) -> Result<Vec<Vec<String>>, GitError> {
    validate(info)?;
    let dir = dir.to_string_lossy().into_owned();
    let git = |args: &[&str]| -> Vec<String> {
        let mut line = vec![
            "git".to_owned(),
            "-c".to_owned(),
            "advice.detachedHead=false".to_owned(),
            // `ext::` URLs run commands; git refuses them by default, kiln says so as well.
            "-c".to_owned(),
            "protocol.ext.allow=never".to_owned(),
            "-C".to_owned(),
            dir.clone(),
        ];
        line.extend(args.iter().map(|s| (*s).to_owned()));
        line
    };
    let mut lines = Vec::new();
    let fresh = strategy == Strategy::Clone || !Path::new(&dir).join(".git").is_dir();
    if fresh {
        // `--` because the directory is kiln's own path, never an option.
        lines.push(vec![
            "git".to_owned(),
            "init".to_owned(),
            "-q".to_owned(),
            "--".to_owned(),
            dir.clone(),
        ]);
        lines.push(git(&[
            "remote",
            "add",
            "--end-of-options",
            "origin",
            &info.repo_url,
        ]));
    } else {
        lines.push(git(&[
            "remote",
            "set-url",
            "--end-of-options",
            "origin",
            &info.repo_url,
        ]));
    }
    let lfs = lfs && !options.lfs_skip;
    if lfs {
        // Checkout leaves pointers (no smudge: no credential prompt, no per-file download);
        // `git lfs pull` then fetches the objects in one batch with the remote's credentials.
        // The filter settings of `git lfs install --local --skip-smudge`, set silently: the
        // command itself prints "Updated Git hooks" into the trace (and has no quiet flag).
        for (key, value) in LFS_SKIP_SMUDGE_FILTER {
            lines.push(git(&["config", "--local", key, value]));
        }
    }
    let mut refspecs = info.refspecs.clone();
    if refspecs.is_empty() {
        refspecs.push(if info.ref_type == "tag" {
            format!("+refs/tags/{0}:refs/tags/{0}", info.git_ref)
        } else {
            format!("+refs/heads/{0}:refs/remotes/origin/{0}", info.git_ref)
        });
    }
    let depth = depth.unwrap_or(info.depth);
    let mut fetch = vec!["fetch"];
    fetch.extend(options.fetch_flags.iter().map(String::as_str));
    fetch.push("--no-recurse-submodules");
    let depth_arg = format!("--depth={depth}");
    if depth > 0 {
        fetch.push(&depth_arg);
    }
    fetch.push("--end-of-options");
    fetch.push("origin");
    let mut fetch = git(&fetch);
    fetch.extend(refspecs);
    lines.push(fetch);
    let target = if info.sha.is_empty() {
        "FETCH_HEAD"
    } else {
        info.sha.as_str()
    };
    if !options.checkout {
        return Ok(lines);
    }
    lines.push(git(&["checkout", "-f", "-q", "--end-of-options", target]));
    if let Some(flags) = &options.clean_flags {
        let mut clean = vec!["clean"];
        clean.extend(flags.iter().map(String::as_str));
        lines.push(git(&clean));
    }
    if lfs {
        lines.push(git(&["lfs", "pull"]));
    }
    if options.submodules != Submodules::None {
        lines.extend(submodule_commands(&git, options, lfs));
    }
    Ok(lines)
}

/// What `git lfs install --local --skip-smudge` writes to a repository's config.
const LFS_SKIP_SMUDGE_FILTER: [(&str, &str); 4] = [
    ("filter.lfs.clean", "git-lfs clean -- %f"),
    ("filter.lfs.smudge", "git-lfs smudge --skip -- %f"),
    ("filter.lfs.process", "git-lfs filter-process --skip"),
    ("filter.lfs.required", "true"),
];

/// `git submodule` sync, update, clean and reset (and LFS pull), as gitlab-runner runs them.
fn submodule_commands(
    git: &dyn Fn(&[&str]) -> Vec<String>,
    options: &JobOptions,
    lfs: bool,
) -> Vec<Vec<String>> {
    let recursive = options.submodules == Submodules::Recursive;
    let with_recursive = |base: &[&str]| -> Vec<String> {
        let mut args: Vec<&str> = base.to_vec();
        if recursive {
            args.push("--recursive");
        }
        git(&args)
    };
    let mut lines = vec![with_recursive(&["submodule", "sync"])];
    let depth_arg = options
        .submodule_depth
        .filter(|d| *d > 0)
        .map(|d| format!("--depth={d}"));
    let mut update = with_recursive(&["submodule", "update", "--init"]);
    update.extend(depth_arg);
    update.extend(options.submodule_update_flags.iter().cloned());
    update.push("--".to_owned());
    update.extend(options.submodule_paths.iter().cloned());
    lines.push(update);
    let foreach = |command: String| -> Vec<String> {
        let mut line = with_recursive(&["submodule", "foreach"]);
        line.push(command);
        line
    };
    if let Some(flags) = &options.clean_flags {
        lines.push(foreach(format!("git clean {}", flags.join(" "))));
    }
    lines.push(foreach("git reset --hard -q".to_owned()));
    if lfs {
        lines.push(foreach(
            "git lfs install --local --skip-smudge >/dev/null && git lfs pull".to_owned(),
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> JobOptions {
        JobOptions::read(&std::collections::BTreeMap::new())
    }

    /// The command lines of a fresh clone with git-lfs present and these job variables.
    fn clone_with(info: &GitInfo, variables: &[(&str, &str)]) -> Vec<Vec<String>> {
        let env = variables
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        commands(
            info,
            dir.path(),
            Strategy::Clone,
            None,
            &JobOptions::read(&env),
            true,
        )
        .unwrap()
    }

    #[test]
    fn recursive_submodules_at_depth_one_with_lfs_follow_the_checkout() {
        let info = info(
            "+refs/heads/main:refs/remotes/origin/main",
            "0123456789abcdef0123456789abcdef01234567",
        );
        let lines = clone_with(
            &info,
            &[
                ("GIT_SUBMODULE_STRATEGY", "recursive"),
                ("GIT_SUBMODULE_DEPTH", "1"),
                ("GIT_SUBMODULE_PATHS", "libs/a"),
                ("GIT_CLEAN_FLAGS", "-ffdx -e keep"),
            ],
        );
        let shown: Vec<String> = lines
            .iter()
            .map(|l| l[l.len().min(7)..].join(" "))
            .collect();
        let checkout = shown
            .iter()
            .position(|l| l.starts_with("checkout"))
            .unwrap();
        assert_eq!(
            &shown[checkout + 1..],
            [
                "clean -ffdx -e keep",
                "lfs pull",
                "submodule sync --recursive",
                "submodule update --init --recursive --depth=1 -- libs/a",
                "submodule foreach --recursive git clean -ffdx -e keep",
                "submodule foreach --recursive git reset --hard -q",
                "submodule foreach --recursive git lfs install --local --skip-smudge >/dev/null && git lfs pull",
            ]
        );
    }

    #[test]
    fn git_checkout_false_fetches_only() {
        let info = info("+refs/heads/main:refs/remotes/origin/main", "");
        let lines = clone_with(&info, &[("GIT_CHECKOUT", "false")]);
        assert!(lines.last().unwrap().contains(&"fetch".to_owned()));
    }

    #[test]
    fn fresh_clone_fetches_refspecs_at_depth_then_checks_out_the_sha() {
        let info = GitInfo {
            repo_url: "https://gitlab-ci-token:t@example.com/g/p.git".into(),
            git_ref: "main".into(),
            sha: "abc".into(),
            refspecs: vec!["+refs/heads/main:refs/remotes/origin/main".into()],
            depth: 20,
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let lines = commands(
            &info,
            &dir.path().join("p"),
            Strategy::Fetch,
            None,
            &defaults(),
            false,
        )
        .unwrap();
        assert_eq!(lines[0][1], "init");
        let fetch = lines
            .iter()
            .find(|l| l.contains(&"fetch".to_owned()))
            .unwrap();
        assert!(fetch.contains(&"--depth=20".to_owned()));
        assert!(fetch.contains(&"+refs/heads/main:refs/remotes/origin/main".to_owned()));
        assert!(lines[3].ends_with(&[
            "checkout".into(),
            "-f".into(),
            "-q".into(),
            "--end-of-options".into(),
            "abc".into()
        ]));
    }

    fn info(refspec: &str, sha: &str) -> GitInfo {
        GitInfo {
            repo_url: "https://example.com/g/p.git".into(),
            git_ref: "main".into(),
            sha: sha.into(),
            refspecs: vec![refspec.into()],
            ..Default::default()
        }
    }

    /// Finding 10 of issue #25: a refspec `--upload-pack=<command>` made `git fetch` run the
    /// command, and a sha `--orphan=x` was passed to `git checkout` as an option.
    #[test]
    fn payload_values_that_look_like_options_are_refused_naming_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let good = "+refs/heads/main:refs/remotes/origin/main";
        let sha = "0123456789abcdef0123456789abcdef01234567";
        for (info, field, value) in [
            (
                info("--upload-pack=touch /tmp/x", sha),
                "refspec",
                "--upload-pack=touch /tmp/x",
            ),
            (info(good, "--orphan=x"), "sha", "--orphan=x"),
            (info(good, "main"), "sha", "main"),
            (info(good, "HEAD~1"), "sha", "HEAD~1"),
            (info("-c", sha), "refspec", "-c"),
            (
                info("refs/heads/a\nrefs/heads/b", sha),
                "refspec",
                "refs/heads/a\\nrefs/heads/b",
            ),
            (
                GitInfo {
                    repo_url: "--upload-pack=sh".into(),
                    ..info(good, sha)
                },
                "repo_url",
                "--upload-pack=sh",
            ),
            (
                GitInfo {
                    refspecs: Vec::new(),
                    git_ref: "-x".into(),
                    ..info(good, sha)
                },
                "ref",
                "-x",
            ),
        ] {
            let err =
                commands(&info, dir.path(), Strategy::Fetch, None, &defaults(), false).unwrap_err();
            let message = err.to_string();
            assert!(
                message.contains(field) && message.contains(value),
                "{message} names neither {field} nor {value}"
            );
        }
    }

    #[test]
    fn every_git_command_ends_its_options_before_payload_values() {
        let dir = tempfile::tempdir().unwrap();
        let info = info(
            "+refs/heads/main:refs/remotes/origin/main",
            "0123456789abcdef0123456789abcdef01234567",
        );
        for strategy in [Strategy::Clone, Strategy::Fetch] {
            for line in commands(&info, dir.path(), strategy, Some(3), &defaults(), true).unwrap() {
                let payload_at = line
                    .iter()
                    .position(|a| *a == info.repo_url || *a == info.sha || *a == info.refspecs[0]);
                if let Some(at) = payload_at {
                    assert!(
                        line[..at].contains(&"--end-of-options".to_owned()),
                        "{line:?}"
                    );
                }
            }
        }
    }

    /// A refused value yields no command line at all, so no git runs for the job (the end-to-end
    /// test `payload_values_that_git_would_take_as_options_are_refused_by_name` runs a real git).
    #[test]
    fn an_upload_pack_refspec_runs_no_command() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("pwned");
        let refspec = format!("--upload-pack=touch {}", marker.display());
        let info = info(&refspec, "");
        assert!(
            commands(
                &info,
                &dir.path().join("p"),
                Strategy::Clone,
                None,
                &defaults(),
                false
            )
            .is_err()
        );
        assert!(!marker.exists());
    }
}
