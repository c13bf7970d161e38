//! Fetching the job's sources: init or reuse the checkout, fetch the refspecs GitLab sent (at
//! the requested depth), check out the exact commit, and clean it.

use std::path::Path;

use crate::sources::gitlab::payload::GitInfo;

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

/// The git command lines that check out `info` into `dir`, in order. `depth` overrides the
/// job's depth (`GIT_DEPTH`).
pub(crate) fn commands(
    info: &GitInfo,
    dir: &Path,
    strategy: Strategy,
    depth: Option<u32>,
) -> Vec<Vec<String>> {
    let dir = dir.to_string_lossy().into_owned();
    let git = |args: &[&str]| -> Vec<String> {
        let mut line = vec![
            "git".to_owned(),
            "-c".to_owned(),
            "advice.detachedHead=false".to_owned(),
            "-C".to_owned(),
            dir.clone(),
        ];
        line.extend(args.iter().map(|s| (*s).to_owned()));
        line
    };
    let mut lines = Vec::new();
    let fresh = strategy == Strategy::Clone || !Path::new(&dir).join(".git").is_dir();
    if fresh {
        lines.push(vec![
            "git".to_owned(),
            "init".to_owned(),
            "-q".to_owned(),
            dir.clone(),
        ]);
        lines.push(git(&["remote", "add", "origin", &info.repo_url]));
    } else {
        lines.push(git(&["remote", "set-url", "origin", &info.repo_url]));
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
    let mut fetch = vec!["fetch", "--prune", "--quiet", "--no-recurse-submodules"];
    let depth_arg = format!("--depth={depth}");
    if depth > 0 {
        fetch.push(&depth_arg);
    }
    fetch.push("origin");
    let mut fetch = git(&fetch);
    fetch.extend(refspecs);
    lines.push(fetch);
    let target = if info.sha.is_empty() {
        "FETCH_HEAD"
    } else {
        info.sha.as_str()
    };
    lines.push(git(&["checkout", "-f", "-q", target]));
    lines.push(git(&["clean", "-ffdx", "-q"]));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let lines = commands(&info, &dir.path().join("p"), Strategy::Fetch, None);
        assert_eq!(lines[0][1], "init");
        let fetch = lines
            .iter()
            .find(|l| l.contains(&"fetch".to_owned()))
            .unwrap();
        assert!(fetch.contains(&"--depth=20".to_owned()));
        assert!(fetch.contains(&"+refs/heads/main:refs/remotes/origin/main".to_owned()));
        assert!(lines[3].ends_with(&["checkout".into(), "-f".into(), "-q".into(), "abc".into()]));
    }
}
