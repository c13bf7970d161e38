//! The local project `kiln exec` runs: its predefined `CI_*` variables from git, and its
//! working tree packed as the archive every job starts from.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The project directory as jobs see it.
#[derive(Debug, Clone)]
pub(crate) struct Checkout {
    /// The project's directory.
    pub(crate) dir: PathBuf,
    /// The project's name (its directory's name).
    pub(crate) name: String,
    /// Predefined variables, in the order GitLab lists them.
    pub(crate) predefined: Vec<(String, String)>,
    /// Things the user should know (not a git checkout, …).
    pub(crate) notes: Vec<String>,
    /// The files of the working tree, relative to the project directory.
    pub(crate) files: Vec<PathBuf>,
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
}

/// GitLab's `CI_*_SLUG`: lowercase, non-alphanumerics to `-`, at most 63 bytes, no `-` at the
/// ends.
pub(crate) fn slug(value: &str) -> String {
    let lowered: String = value
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let cut: String = lowered.chars().take(63).collect();
    cut.trim_matches('-').to_owned()
}

/// Reads `dir` (the directory holding the pipeline file) as a project.
pub(crate) fn inspect(dir: &Path, pipeline_id: u64) -> Checkout {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "project".into());
    let mut notes = Vec::new();
    let in_git = git(dir, &["rev-parse", "--is-inside-work-tree"]).as_deref() == Some("true");
    let head = if in_git {
        git(dir, &["rev-parse", "--verify", "-q", "HEAD"])
    } else {
        None
    };
    let default_branch = in_git
        .then(|| {
            git(
                dir,
                &["symbolic-ref", "--short", "-q", "refs/remotes/origin/HEAD"],
            )
            .map(|r| r.trim_start_matches("origin/").to_owned())
            .or_else(|| git(dir, &["config", "init.defaultBranch"]))
        })
        .flatten()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "main".into());
    let branch = if in_git {
        git(dir, &["symbolic-ref", "--short", "-q", "HEAD"])
    } else {
        None
    };
    let tag = head
        .as_ref()
        .and_then(|_| git(dir, &["describe", "--tags", "--exact-match", "HEAD"]))
        .filter(|_| branch.is_none());
    match (&head, in_git) {
        (_, false) => notes.push(format!(
            "{} is not a git checkout: CI_COMMIT_* variables are placeholders (branch `{default_branch}`)",
            dir.display()
        )),
        (None, true) => notes.push("the git repository has no commit yet: CI_COMMIT_SHA is a placeholder".into()),
        (Some(_), true) => {}
    }
    let sha = head.clone().unwrap_or_else(|| "0".repeat(40));
    let ref_name = tag
        .clone()
        .or_else(|| branch.clone())
        .unwrap_or_else(|| default_branch.clone());
    let message = head
        .as_ref()
        .and_then(|_| git(dir, &["log", "-1", "--format=%B"]))
        .unwrap_or_default();
    let title = message.lines().next().unwrap_or_default().to_owned();
    let author = head
        .as_ref()
        .and_then(|_| git(dir, &["log", "-1", "--format=%an <%ae>"]))
        .unwrap_or_default();
    let timestamp = head
        .as_ref()
        .and_then(|_| git(dir, &["log", "-1", "--format=%cI"]))
        .unwrap_or_default();

    let mut vars: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: String| vars.push((k.to_owned(), v));
    set("CI", "true".into());
    set("GITLAB_CI", "true".into());
    set("CI_PIPELINE_ID", pipeline_id.to_string());
    set("CI_PIPELINE_IID", pipeline_id.to_string());
    set("CI_PIPELINE_SOURCE", "push".into());
    set("CI_PROJECT_NAME", name.clone());
    set("CI_PROJECT_TITLE", name.clone());
    set("CI_PROJECT_NAMESPACE", "local".into());
    set("CI_PROJECT_PATH", format!("local/{name}"));
    set("CI_PROJECT_PATH_SLUG", slug(&format!("local/{name}")));
    set("CI_DEFAULT_BRANCH", default_branch.clone());
    set("CI_COMMIT_SHA", sha.clone());
    set("CI_COMMIT_SHORT_SHA", sha.chars().take(8).collect());
    set("CI_COMMIT_BEFORE_SHA", "0".repeat(40));
    set("CI_COMMIT_REF_NAME", ref_name.clone());
    set("CI_COMMIT_REF_SLUG", slug(&ref_name));
    match &tag {
        Some(tag) => set("CI_COMMIT_TAG", tag.clone()),
        None => set("CI_COMMIT_BRANCH", ref_name.clone()),
    }
    set("CI_COMMIT_MESSAGE", message);
    set("CI_COMMIT_TITLE", title);
    set("CI_COMMIT_AUTHOR", author);
    set("CI_COMMIT_TIMESTAMP", timestamp);

    let files = if in_git {
        git_files(dir).unwrap_or_else(|| walk_files(dir))
    } else {
        walk_files(dir)
    };
    Checkout {
        dir: dir.to_owned(),
        name,
        predefined: vars,
        notes,
        files,
    }
}

/// Tracked and untracked files not ignored by `.gitignore`, under `dir`.
fn git_files(dir: &Path) -> Option<Vec<PathBuf>> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mut files: Vec<PathBuf> = out
        .stdout
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| PathBuf::from(String::from_utf8_lossy(s).into_owned()))
        // Deleted but still tracked files are not in the working tree.
        .filter(|p| dir.join(p).symlink_metadata().is_ok_and(|m| !m.is_dir()))
        .collect();
    files.sort();
    files.dedup();
    Some(files)
}

/// Every file under `dir` but `.git`.
fn walk_files(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.file_name() != ".git")
        .filter_map(Result::ok)
        .filter(|e| !e.file_type().is_dir())
        .filter_map(|e| e.path().strip_prefix(dir).ok().map(Path::to_path_buf))
        .collect()
}

/// Zips `files` under `root`, keeping their modes and symlinks (as git does); files that
/// cannot be read, and anything that is neither a regular file nor a symlink (a FIFO, a
/// socket, a device: opening one can block forever), are left out and named in the second
/// value.
pub(crate) fn archive(root: &Path, files: &[PathBuf]) -> std::io::Result<(Vec<u8>, Vec<PathBuf>)> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let mut skipped = Vec::new();
    for file in files {
        let full = root.join(file);
        let name = file.to_string_lossy();
        let Ok(meta) = std::fs::symlink_metadata(&full) else {
            skipped.push(file.clone());
            continue;
        };
        if meta.file_type().is_symlink() {
            let Ok(target) = std::fs::read_link(&full) else {
                skipped.push(file.clone());
                continue;
            };
            writer
                .add_symlink(
                    name.as_ref(),
                    target.to_string_lossy().as_ref(),
                    zip::write::SimpleFileOptions::default(),
                )
                .map_err(std::io::Error::other)?;
            continue;
        }
        if meta.is_dir() {
            continue;
        }
        if !meta.is_file() {
            skipped.push(file.clone());
            continue;
        }
        // O_NONBLOCK and O_NOFOLLOW: should the file have become a FIFO or a link since it was
        // looked at, opening it neither blocks nor follows; the type is checked again below.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
            .open(&full)
            .and_then(|f| f.metadata().map(|m| (f, m)));
        let Ok((mut source, meta)) = opened else {
            skipped.push(file.clone());
            continue;
        };
        if !meta.is_file() {
            skipped.push(file.clone());
            continue;
        }
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(meta.permissions().mode() & 0o777)
            .large_file(meta.len() > u64::from(u32::MAX));
        writer
            .start_file(name.as_ref(), options)
            .map_err(std::io::Error::other)?;
        std::io::copy(&mut source, &mut writer)?;
    }
    let cursor = writer.finish().map_err(std::io::Error::other)?;
    Ok((cursor.into_inner(), skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO in the project is left out (and named), not opened: opening one for reading
    /// blocks until someone writes, so `kiln exec` hung forever.
    #[test]
    fn a_fifo_in_the_project_is_skipped_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "a").unwrap();
        let made = Command::new("mkfifo")
            .arg(dir.path().join("pipe"))
            .status()
            .unwrap();
        assert!(made.success());
        std::os::unix::fs::symlink("a.txt", dir.path().join("link")).unwrap();
        let files = walk_files(dir.path());
        let (tx, rx) = std::sync::mpsc::channel();
        let root = dir.path().to_path_buf();
        std::thread::spawn(move || tx.send(archive(&root, &files).unwrap()));
        let (zip, skipped) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("archive() returns instead of blocking on the FIFO");
        assert_eq!(skipped, vec![PathBuf::from("pipe")]);
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip)).unwrap();
        assert_eq!(archive.len(), 2);
        let link = archive.by_name("link").unwrap();
        assert!(link.is_symlink(), "symlinks stay symlinks");
    }

    #[test]
    fn slugs_follow_gitlab() {
        assert_eq!(slug("Feature/Add_Thing"), "feature-add-thing");
        assert_eq!(slug("-x-"), "x");
    }

    #[test]
    fn a_plain_directory_gets_placeholders_and_all_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("demo");
        std::fs::create_dir_all(project.join("src")).unwrap();
        std::fs::write(project.join("src/a.txt"), "a").unwrap();
        std::fs::write(project.join(".gitlab-ci.yml"), "x").unwrap();
        let checkout = inspect(&project, 9);
        let var = |k: &str| {
            checkout
                .predefined
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(checkout.name, "demo");
        assert_eq!(var("CI_COMMIT_SHA"), Some("0".repeat(40)));
        assert_eq!(var("CI_PIPELINE_ID").as_deref(), Some("9"));
        assert_eq!(var("CI_PROJECT_NAME").as_deref(), Some("demo"));
        assert_eq!(checkout.notes.len(), 1);
        assert_eq!(
            checkout.files,
            [PathBuf::from(".gitlab-ci.yml"), PathBuf::from("src/a.txt")]
        );
        let (zip, skipped) = archive(&project, &checkout.files).unwrap();
        assert!(skipped.is_empty());
        let archive = zip::ZipArchive::new(std::io::Cursor::new(zip)).unwrap();
        assert_eq!(archive.len(), 2);
    }
}
