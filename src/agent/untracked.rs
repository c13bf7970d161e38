//! `artifacts:untracked` without git in the job's image: right after the checkout, the agent
//! that fetched the sources (with the helper's git) records the files git tracks; at upload
//! time every file of the project that is not in that record is untracked — what `git ls-files
//! --others` lists, ignored files included, as gitlab-runner uploads them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Why the untracked files cannot be told.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UntrackedError {
    /// No record: the sources were not checked out by the agent (`GIT_STRATEGY=none`).
    #[error("no record of the tracked files at {} (the sources were not checked out by kiln)", path.display())]
    NoRecord {
        /// The record's path.
        path: PathBuf,
    },
    /// Running git or writing the record failed.
    #[error("cannot record the tracked files: {0}")]
    Record(String),
}

/// Records the files git tracks in `project_dir` (`git ls-files -z`, NUL-separated) in `record`.
///
/// # Errors
/// git fails or the record cannot be written.
pub(crate) async fn record_tracked(
    project_dir: &Path,
    record: &Path,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<(), UntrackedError> {
    let output = tokio::process::Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(project_dir)
        .env_clear()
        .envs(env)
        .output()
        .await
        .map_err(|e| UntrackedError::Record(format!("cannot run git: {e}")))?;
    if !output.status.success() {
        return Err(UntrackedError::Record(format!(
            "`git ls-files` exited with {}",
            output.status
        )));
    }
    std::fs::write(record, &output.stdout)
        .map_err(|e| UntrackedError::Record(format!("{}: {e}", record.display())))
}

/// The project's files (and links) that are not in `record`, relative to `project_dir`. The
/// `.git` directory, submodules (tracked as one gitlink each) and nested repositories are not
/// descended into, as `git ls-files --others` does not.
///
/// # Errors
/// There is no record.
pub(crate) fn untracked(project_dir: &Path, record: &Path) -> Result<Vec<PathBuf>, UntrackedError> {
    let bytes = std::fs::read(record).map_err(|_| UntrackedError::NoRecord {
        path: record.to_owned(),
    })?;
    let tracked: BTreeSet<PathBuf> = bytes
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| PathBuf::from(String::from_utf8_lossy(s).into_owned()))
        .collect();
    let relative = |path: &Path| path.strip_prefix(project_dir).unwrap_or(path).to_owned();
    let walk = walkdir::WalkDir::new(project_dir)
        .follow_links(false)
        .into_iter()
        .filter_entry(|entry| {
            if entry.depth() == 0 {
                return true;
            }
            let path = entry.path();
            let is_dir = entry.file_type().is_dir();
            !(entry.file_name() == ".git"
                || (is_dir && tracked.contains(&relative(path)))
                || (is_dir && path.join(".git").exists()))
        });
    Ok(walk
        .filter_map(Result::ok)
        .filter(|e| !e.file_type().is_dir())
        .map(|e| relative(e.path()))
        .filter(|p| !tracked.contains(p))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) {
        let status = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[tokio::test]
    async fn untracked_is_what_git_ls_files_others_lists_ignored_files_included() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("p");
        std::fs::create_dir_all(project.join("src")).unwrap();
        git(&project, &["init", "-q"]);
        std::fs::write(project.join("src/main.c"), "int main;").unwrap();
        std::fs::write(project.join(".gitignore"), "build/\n").unwrap();
        git(&project, &["add", "-A"]);
        let record = dir.path().join("tracked");
        record_tracked(&project, &record, &std::env::vars().collect())
            .await
            .unwrap();
        std::fs::create_dir_all(project.join("build")).unwrap();
        std::fs::write(project.join("build/app"), "elf").unwrap();
        std::fs::write(project.join("src/gen.c"), "gen").unwrap();
        std::fs::create_dir_all(project.join("vendor/x")).unwrap();
        git(&project.join("vendor/x"), &["init", "-q"]);
        std::fs::write(project.join("vendor/x/inner"), "nested repo").unwrap();
        let mut found = untracked(&project, &record).unwrap();
        found.sort();
        assert_eq!(
            found,
            [PathBuf::from("build/app"), PathBuf::from("src/gen.c")]
        );
        assert!(matches!(
            untracked(&project, &dir.path().join("none")),
            Err(UntrackedError::NoRecord { .. })
        ));
    }
}
