//! Artifacts: collecting files by GitLab's `paths`/`exclude`/`untracked` rules into an archive,
//! and unpacking the archives of dependencies into the project directory.
//!
//! Symbolic links are archived the way gitlab-runner archives them: as a link (a zip entry of
//! type `S_IFLNK` whose content is the target), never as the content of what they point at — a
//! job's `dist/x -> /etc/hostname` or `-> ../../job.json` would otherwise upload that file. On
//! extraction a link entry becomes a link again, but nothing is ever written *through* a link
//! (one the checkout holds or one the archive just made): every directory on an entry's path
//! must be a real directory, and an existing file or link at the entry's own path is unlinked
//! and created anew. Modes keep only the permission bits (no setuid, setgid or sticky).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// The file type bits of a Unix mode, and the types an archive entry can be.
const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;
/// Longest symlink target taken from an archive (Linux's `PATH_MAX`).
const MAX_LINK_TARGET: u64 = 4096;

/// Problems building or unpacking an archive.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ArtifactError {
    /// A pattern is not a valid glob.
    #[error("artifact pattern `{pattern}` is invalid: {reason}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// Why.
        reason: String,
    },
    /// Reading files or writing the archive failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file of the project that cannot go into an archive as it is.
    #[error("cannot archive {}: {reason}", path.display())]
    Refused {
        /// The file, relative to the project.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The archive is not a valid zip.
    #[error("artifact archive of job {job} is not a valid zip: {reason}")]
    Zip {
        /// The job whose archive it is.
        job: String,
        /// Why.
        reason: String,
    },
    /// One entry of the archive is refused (it would land outside the project, or write
    /// through a symbolic link) or could not be written.
    #[error("artifact archive of job {job}: entry `{entry}` {reason}")]
    Entry {
        /// The job whose archive it is.
        job: String,
        /// The entry's name as the archive has it, control characters escaped (it goes into
        /// the job trace, where it must not forge lines or colours).
        entry: String,
        /// Why.
        reason: String,
    },
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ArtifactError + 'a {
    move |source| ArtifactError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn glob(pattern: &str) -> Result<Glob, ArtifactError> {
    let cleaned = pattern.trim_start_matches("./").trim_end_matches('/');
    GlobBuilder::new(cleaned)
        .literal_separator(true)
        .build()
        .map_err(|e| ArtifactError::Pattern {
            pattern: pattern.to_owned(),
            reason: e.to_string(),
        })
}

fn set(patterns: &[String]) -> Result<GlobSet, ArtifactError> {
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        builder.add(glob(p)?);
    }
    builder.build().map_err(|e| ArtifactError::Pattern {
        pattern: patterns.join(", "),
        reason: e.to_string(),
    })
}

/// Whether some directory on the way from `root` to `relative` (not `relative` itself) is a
/// symbolic link, or cannot be looked at.
fn crosses_link(root: &Path, relative: &Path) -> bool {
    let mut at = root.to_path_buf();
    let Some(parent) = relative.parent() else {
        return false;
    };
    parent.components().any(|c| {
        at.push(c);
        std::fs::symlink_metadata(&at).map_or(true, |m| !m.is_dir())
    })
}

/// The files (relative paths, sorted) an artifact takes from `root`: everything matching a
/// pattern (a matching directory brings all its contents), plus `untracked` files, minus
/// `exclude` matches. Returns the files and the patterns that matched nothing.
///
/// Symbolic links are listed as files and never followed: a link matched by a pattern (to a
/// file or a directory, inside the project or not) is taken as the link, and a matched
/// directory is walked without entering the linked directories in it.
///
/// # Errors
/// Invalid patterns; unreadable directories.
pub(crate) fn collect(
    root: &Path,
    paths: &[String],
    exclude: &[String],
    untracked: &[PathBuf],
) -> Result<(Vec<PathBuf>, Vec<String>), ArtifactError> {
    let exclude = set(exclude)?;
    let mut files = BTreeSet::new();
    let mut unmatched = Vec::new();
    for pattern in paths {
        let matcher = glob(pattern)?.compile_matcher();
        let mut matched = false;
        // `follow_links(false)` is walkdir's default; said here because it is what keeps a
        // link to `/` from bringing the whole machine into the artifact.
        let mut walker = walkdir::WalkDir::new(root)
            .min_depth(1)
            .follow_links(false)
            .into_iter();
        while let Some(entry) = walker.next() {
            let entry = entry.map_err(|e| ArtifactError::Io {
                action: "read",
                path: e
                    .path()
                    .map(Path::to_owned)
                    .unwrap_or_else(|| root.to_owned()),
                source: e.into(),
            })?;
            let Ok(relative) = entry.path().strip_prefix(root) else {
                continue;
            };
            if relative.starts_with(".git") {
                walker.skip_current_dir();
                continue;
            }
            if !matcher.is_match(relative) {
                continue;
            }
            matched = true;
            if entry.file_type().is_dir() {
                for inner in walkdir::WalkDir::new(entry.path())
                    .min_depth(1)
                    .follow_links(false)
                {
                    let inner = inner.map_err(|e| ArtifactError::Io {
                        action: "read",
                        path: entry.path().to_owned(),
                        source: e.into(),
                    })?;
                    if !inner.file_type().is_dir()
                        && let Ok(rel) = inner.path().strip_prefix(root)
                    {
                        files.insert(rel.to_owned());
                    }
                }
                walker.skip_current_dir();
            } else {
                files.insert(relative.to_owned());
            }
        }
        if !matched {
            unmatched.push(pattern.clone());
        }
    }
    // `git ls-files` never lists a path through a link, but the list comes from a program run
    // in a directory the job wrote: a path that climbs out or crosses a link is dropped.
    files.extend(
        untracked
            .iter()
            .filter(|f| {
                f.components().all(|c| matches!(c, Component::Normal(_))) && !crosses_link(root, f)
            })
            .cloned(),
    );
    let files = files
        .into_iter()
        .filter(|f| {
            !exclude.is_match(f)
                && !f
                    .ancestors()
                    .any(|a| exclude.is_match(a) && a != Path::new(""))
        })
        .collect();
    Ok((files, unmatched))
}

/// Opens `path` for reading only if it is a regular file, never following a link at its last
/// component (`O_NOFOLLOW`) and never blocking on a FIFO (`O_NONBLOCK`, which a regular file
/// ignores): a job may have swapped the file since it was listed.
fn open_regular(path: &Path) -> std::io::Result<Option<(std::fs::File, std::fs::Metadata)>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    Ok(meta.is_file().then_some((file, meta)))
}

/// Zips `files` (relative to `root`), keeping their permission bits. A symbolic link is stored
/// as a link (its target as the entry's content, as gitlab-runner does), never followed;
/// anything that is neither a file nor a link (a FIFO, a socket, a device) is skipped.
///
/// # Errors
/// Unreadable files; a file whose directory is a symbolic link.
#[cfg(test)]
pub(crate) fn zip(root: &Path, files: &[PathBuf]) -> Result<Vec<u8>, ArtifactError> {
    zip_into(root, files, std::io::Cursor::new(Vec::new())).map(std::io::Cursor::into_inner)
}

/// [`zip`] into `out` (a temporary file when uploading: the archive never sits in memory).
///
/// # Errors
/// As [`zip`], and a failing `out`.
pub(crate) fn zip_into<W: Write + std::io::Seek>(
    root: &Path,
    files: &[PathBuf],
    out: W,
) -> Result<W, ArtifactError> {
    let mut writer = zip::ZipWriter::new(out);
    for file in files {
        let full = root.join(file);
        if crosses_link(root, file) {
            return Err(ArtifactError::Refused {
                path: file.clone(),
                reason: "a directory on its path is a symbolic link".into(),
            });
        }
        let meta = std::fs::symlink_metadata(&full).map_err(io("read", &full))?;
        let name = file.to_string_lossy();
        let zip_err = |e: zip::result::ZipError| ArtifactError::Io {
            action: "add to the archive",
            path: full.clone(),
            source: std::io::Error::other(e),
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full).map_err(io("read the link", &full))?;
            let options = zip::write::SimpleFileOptions::default().unix_permissions(0o777);
            writer
                .add_symlink(name.as_ref(), target.to_string_lossy(), options)
                .map_err(zip_err)?;
            continue;
        }
        if !meta.is_file() {
            continue;
        }
        let Some((mut source, meta)) = open_regular(&full).map_err(io("open", &full))? else {
            continue;
        };
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(meta.permissions().mode() & 0o777)
            .large_file(meta.len() > u64::from(u32::MAX));
        writer.start_file(name.as_ref(), options).map_err(zip_err)?;
        std::io::copy(&mut source, &mut writer).map_err(io("read", &full))?;
    }
    writer.finish().map_err(|e| ArtifactError::Io {
        action: "finish",
        path: root.to_owned(),
        source: std::io::Error::other(e),
    })
}

/// Opens `relative` for single-file formats (`gzip`, `raw`), which cannot hold a link: a link
/// is followed only when what it resolves to stays inside `root`; one that leads out
/// (`-> /etc/hostname`, `-> ../../job.json`) is refused, naming the file.
///
/// # Errors
/// A file outside the project, not a regular file, or unreadable.
fn open_inside(root: &Path, relative: &Path) -> Result<std::fs::File, ArtifactError> {
    let refused = |reason: &str| ArtifactError::Refused {
        path: relative.to_owned(),
        reason: reason.to_owned(),
    };
    let full = root.join(relative);
    let base = root.canonicalize().map_err(io("resolve", root))?;
    let real = full.canonicalize().map_err(io("resolve", &full))?;
    if !real.starts_with(&base) {
        return Err(refused(
            "it is a symbolic link that leads outside the project directory",
        ));
    }
    let Some((file, _)) = open_regular(&real).map_err(io("open", &full))? else {
        return Err(refused("it is not a regular file"));
    };
    Ok(file)
}

/// Copies one file of the project into `out` as it is (`artifact_format: raw`); see
/// [`open_inside`] for links.
///
/// # Errors
/// Unreadable file, or one outside the project.
pub(crate) fn copy_raw(
    root: &Path,
    relative: &Path,
    out: &mut impl Write,
) -> Result<(), ArtifactError> {
    let mut file = open_inside(root, relative)?;
    let path = root.join(relative);
    std::io::copy(&mut file, out).map_err(io("copy", &path))?;
    Ok(())
}

/// Gzips the project's `files` into `out`, one gzip member per file, concatenated — the
/// multi-member gzip gitlab-runner uploads for reports (`artifact_format: gzip`), which GitLab
/// reads member by member (three JUnit files stay three reports). See [`open_inside`] for
/// links.
///
/// # Errors
/// Unreadable file, or one outside the project.
pub(crate) fn gzip_members(
    root: &Path,
    files: &[PathBuf],
    out: &mut impl Write,
) -> Result<(), ArtifactError> {
    for relative in files {
        let mut file = open_inside(root, relative)?;
        let path = root.join(relative);
        let name = relative.file_name().map(|n| n.as_encoded_bytes().to_vec());
        let mut encoder = flate2::GzBuilder::new()
            .filename(name.unwrap_or_default())
            .write(&mut *out, flate2::Compression::default());
        std::io::copy(&mut file, &mut encoder).map_err(io("compress", &path))?;
        encoder.finish().map_err(io("compress", &path))?;
    }
    Ok(())
}

/// What an entry makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    Link,
    File,
}

/// Unpacks a dependency's zip into `root`. Returns the number of files and links made.
///
/// An entry is refused — the whole download fails, naming the job and the entry — when its
/// name is absolute or holds `..`, when a directory on its path is a symbolic link (from the
/// checkout or from this archive) or a file, or when it is a link with an empty or overlong
/// target. An existing file or link at an entry's path is unlinked first, so its target (or
/// another name of a hard link) is never written. Regular files get the entry's permission
/// bits (`0644` without a mode, as gitlab-runner does), never setuid, setgid or sticky; FIFOs,
/// devices and sockets become regular files.
///
/// # Errors
/// An invalid archive, a refused entry, or an unwritable file.
pub(crate) fn unzip(job: &str, data: &[u8], root: &Path) -> Result<usize, ArtifactError> {
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(data)).map_err(|e| ArtifactError::Zip {
            job: job.to_owned(),
            reason: e.to_string(),
        })?;
    std::fs::create_dir_all(root).map_err(io("create", root))?;
    let mut count = 0;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| ArtifactError::Zip {
            job: job.to_owned(),
            reason: format!("entry {i}: {e}"),
        })?;
        let name = entry.name().to_owned();
        let refuse = |reason: String| ArtifactError::Entry {
            job: job.to_owned(),
            entry: name.escape_debug().to_string(),
            reason,
        };
        let mode = entry.unix_mode();
        let kind = match mode.map(|m| m & S_IFMT) {
            _ if name.ends_with('/') => Kind::Dir,
            Some(S_IFDIR) => Kind::Dir,
            Some(S_IFLNK) => Kind::Link,
            _ => Kind::File,
        };
        let perm = mode.map_or(0o644, |m| m & 0o777);
        extract_one(root, &name, kind, perm, &mut entry).map_err(refuse)?;
        if kind != Kind::Dir {
            count += 1;
        }
    }
    Ok(count)
}

/// Writes one entry below `root`; the error says why, for [`ArtifactError::Entry`].
fn extract_one(
    root: &Path,
    name: &str,
    kind: Kind,
    perm: u32,
    content: &mut dyn Read,
) -> Result<(), String> {
    if name.contains('\0') {
        return Err("holds a NUL character".into());
    }
    let mut parts = Vec::new();
    for component in Path::new(name).components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("points outside the project (`..`)".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("points outside the project (an absolute path)".into());
            }
        }
    }
    let Some((last, parents)) = parts.split_last() else {
        // `./` or `/`-only names: the project directory itself.
        return if kind == Kind::Dir {
            Ok(())
        } else {
            Err("has no file name".into())
        };
    };
    // Every directory on the way must be a real directory: `create_dir_all` and
    // `File::create` would follow a link the checkout holds (`evil_link -> /outside`) or one
    // an earlier entry made.
    let mut at = root.to_path_buf();
    for part in parents {
        at.push(part);
        let shown = at.strip_prefix(root).unwrap_or(&at).display().to_string();
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(format!(
                    "would be written through the symbolic link `{}`",
                    shown.escape_debug()
                ));
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "needs `{}` to be a directory",
                    shown.escape_debug()
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // `mkdir` itself never follows a link: a link that appeared since is EEXIST.
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&at)
                    .map_err(|e| {
                        format!("cannot create directory `{}`: {e}", shown.escape_debug())
                    })?;
            }
            Err(e) => return Err(format!("cannot inspect `{}`: {e}", shown.escape_debug())),
        }
    }
    let target = at.join(last);
    match std::fs::symlink_metadata(&target) {
        // An existing real directory: a directory entry has nothing to do; anything else
        // would have to delete the directory's contents, which an archive does not ask for.
        Ok(meta) if meta.is_dir() => {
            return if kind == Kind::Dir {
                Ok(())
            } else {
                Err("is a directory in the project already".into())
            };
        }
        // A file or a link (to anything): unlink it, so the new entry is written to a new
        // inode and never to what a link points at or another name of a hard link.
        Ok(_) => std::fs::remove_file(&target)
            .map_err(|e| format!("cannot replace the existing file: {e}"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot inspect the existing file: {e}")),
    }
    match kind {
        Kind::Dir => std::fs::DirBuilder::new()
            // The owner keeps rwx so later entries can be written into it.
            .mode(perm | 0o700)
            .create(&target)
            .map_err(|e| format!("cannot create the directory: {e}")),
        Kind::Link => {
            let mut link = Vec::new();
            content
                .take(MAX_LINK_TARGET + 1)
                .read_to_end(&mut link)
                .map_err(|e| format!("cannot be read: {e}"))?;
            if link.is_empty() {
                return Err("is a symbolic link without a target".into());
            }
            if link.len() as u64 > MAX_LINK_TARGET || link.contains(&0) {
                return Err("is a symbolic link with an invalid target".into());
            }
            let link: &std::ffi::OsStr = std::os::unix::ffi::OsStrExt::from_bytes(&link);
            std::os::unix::fs::symlink(link, &target)
                .map_err(|e| format!("cannot create the symbolic link: {e}"))
        }
        Kind::File => {
            // `create_new` is O_CREAT|O_EXCL: it never follows a link at the last component
            // and fails if something appeared there since it was unlinked.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&target)
                .map_err(|e| format!("cannot be created: {e}"))?;
            std::io::copy(content, &mut file).map_err(|e| format!("cannot be written: {e}"))?;
            // fchmod on the open file, after writing (a 0444 entry is still written), exactly
            // the entry's permission bits: `mode & 0o777` drops setuid, setgid and sticky.
            file.set_permissions(std::fs::Permissions::from_mode(perm))
                .map_err(|e| format!("cannot be given mode {perm:o}: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "build/app.jar",
            "build/tmp/x.o",
            "logs/a.log",
            "logs/deep/b.log",
            "README",
        ] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, f).unwrap();
        }
        dir
    }

    #[test]
    fn directories_bring_contents_and_exclude_removes() {
        let dir = tree();
        let (files, unmatched) = collect(
            dir.path(),
            &["build/".into(), "logs/**/*.log".into(), "missing/*".into()],
            &["build/tmp/**".into()],
            &[],
        )
        .unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["build/app.jar", "logs/a.log", "logs/deep/b.log"]);
        assert_eq!(unmatched, ["missing/*"]);
    }

    #[test]
    fn single_star_does_not_cross_directories() {
        let dir = tree();
        let (files, _) = collect(dir.path(), &["logs/*.log".into()], &[], &[]).unwrap();
        assert_eq!(files, [PathBuf::from("logs/a.log")]);
    }

    #[test]
    fn zip_round_trips_and_refuses_escapes() {
        let dir = tree();
        let (files, _) = collect(dir.path(), &["build/app.jar".into()], &[], &[]).unwrap();
        let data = zip(dir.path(), &files).unwrap();
        let out = tempfile::tempdir().unwrap();
        assert_eq!(unzip("build", &data, out.path()).unwrap(), 1);
        assert_eq!(
            std::fs::read_to_string(out.path().join("build/app.jar")).unwrap(),
            "build/app.jar"
        );

        let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        writer
            .start_file("../evil", zip::write::SimpleFileOptions::default())
            .unwrap();
        writer.write_all(b"x").unwrap();
        let evil = writer.finish().unwrap().into_inner();
        assert!(unzip("bad", &evil, out.path()).is_err());
    }

    // ---- hostile archives (issue #25, findings 3, 4 and 13) ----

    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const S_IFREG: u32 = 0o100_000;
    const S_IFDIR: u32 = 0o040_000;
    const S_IFLNK: u32 = 0o120_000;

    /// One entry of a hand-made archive: any name (duplicates too), any Unix mode (the `zip`
    /// crate's writer masks modes to 0o777 and refuses duplicate names, so it cannot make the
    /// archives an attacker makes), the content (a symlink's target for `S_IFLNK`).
    #[derive(Debug, Clone)]
    struct RawEntry {
        name: String,
        mode: Option<u32>,
        data: Vec<u8>,
    }

    fn raw(name: &str, mode: Option<u32>, data: &[u8]) -> RawEntry {
        RawEntry {
            name: name.to_owned(),
            mode,
            data: data.to_vec(),
        }
    }

    /// A stored (uncompressed) zip of `entries`, UTF-8 names, made by "Unix" so the reader takes
    /// the mode from the external attributes, exactly as gitlab-runner writes them.
    fn raw_zip(entries: &[RawEntry]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for e in entries {
            let offset = out.len() as u32;
            let crc = crc32fast::hash(&e.data);
            let len = e.data.len() as u32;
            let name = e.name.as_bytes();
            out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
            out.extend_from_slice(&20u16.to_le_bytes()); // version needed
            out.extend_from_slice(&0x0800u16.to_le_bytes()); // UTF-8 names
            out.extend_from_slice(&0u16.to_le_bytes()); // stored
            out.extend_from_slice(&0u32.to_le_bytes()); // time, date
            out.extend_from_slice(&crc.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(name);
            out.extend_from_slice(&e.data);

            central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            central.extend_from_slice(&((3u16 << 8) | 20).to_le_bytes()); // made by Unix
            central.extend_from_slice(&20u16.to_le_bytes());
            central.extend_from_slice(&0x0800u16.to_le_bytes());
            central.extend_from_slice(&0u16.to_le_bytes());
            central.extend_from_slice(&0u32.to_le_bytes());
            central.extend_from_slice(&crc.to_le_bytes());
            central.extend_from_slice(&len.to_le_bytes());
            central.extend_from_slice(&len.to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 8]); // extra, comment, disk, internal attributes
            central.extend_from_slice(&(e.mode.unwrap_or(0) << 16).to_le_bytes());
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

    /// `<tmp>/project` (the target, holding the checkout's `evil_link -> <tmp>/outside` and
    /// `evil_file -> <tmp>/outside/sentinel`) beside `<tmp>/outside` (holding only `sentinel`).
    struct Scene {
        tmp: tempfile::TempDir,
        sentinel_ino: u64,
    }

    const SENTINEL: &str = "the sentinel";

    impl Scene {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let outside = tmp.path().join("outside");
            let project = tmp.path().join("project");
            std::fs::create_dir(&outside).unwrap();
            std::fs::create_dir(&project).unwrap();
            let sentinel = outside.join("sentinel");
            std::fs::write(&sentinel, SENTINEL).unwrap();
            std::fs::set_permissions(&sentinel, std::fs::Permissions::from_mode(0o644)).unwrap();
            std::os::unix::fs::symlink(&outside, project.join("evil_link")).unwrap();
            std::os::unix::fs::symlink(&sentinel, project.join("evil_file")).unwrap();
            std::fs::create_dir(project.join("d")).unwrap();
            let sentinel_ino = std::fs::metadata(&sentinel).unwrap().ino();
            Self { tmp, sentinel_ino }
        }

        fn project(&self) -> PathBuf {
            self.tmp.path().join("project")
        }

        /// Nothing outside the project was created or changed.
        fn outside_untouched(&self) -> Result<(), String> {
            let mut beside: Vec<_> = std::fs::read_dir(self.tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            beside.sort();
            if beside != ["outside", "project"] {
                return Err(format!("created beside the project: {beside:?}"));
            }
            let outside = self.tmp.path().join("outside");
            let inside: Vec<_> = std::fs::read_dir(&outside)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            if inside != ["sentinel"] {
                return Err(format!("created outside: {inside:?}"));
            }
            let sentinel = outside.join("sentinel");
            let meta = std::fs::symlink_metadata(&sentinel).unwrap();
            let content = std::fs::read(&sentinel).unwrap();
            if !meta.is_file()
                || meta.ino() != self.sentinel_ino
                || meta.mode() & 0o7777 != 0o644
                || content != SENTINEL.as_bytes()
            {
                return Err(format!(
                    "the sentinel changed: mode {:o}, {:?}",
                    meta.mode(),
                    String::from_utf8_lossy(&content)
                ));
            }
            Ok(())
        }

        /// No setuid, setgid or sticky bit on anything in the project.
        fn no_special_bits(&self) -> Result<(), String> {
            for entry in walkdir::WalkDir::new(self.project()).min_depth(1) {
                let entry = entry.map_err(|e| e.to_string())?;
                let meta = entry.path().symlink_metadata().map_err(|e| e.to_string())?;
                if !meta.file_type().is_symlink() && meta.mode() & 0o7000 != 0 {
                    return Err(format!(
                        "{} has mode {:o}",
                        entry.path().display(),
                        meta.mode()
                    ));
                }
            }
            Ok(())
        }
    }

    /// Finding 3: an entry under a symlink the checkout holds was written through it.
    #[test]
    fn an_entry_under_a_checked_out_symlink_is_refused_not_written_outside() {
        let scene = Scene::new();
        let data = raw_zip(&[raw("evil_link/x", Some(S_IFREG | 0o644), b"pwned")]);
        let err = unzip("build", &data, &scene.project())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("build") && err.contains("evil_link/x"),
            "{err}"
        );
        scene.outside_untouched().unwrap();
    }

    /// Finding 3, the link coming from the archive itself: a symlink entry, then an entry
    /// under it.
    #[test]
    fn an_entry_under_a_symlink_extracted_just_before_is_refused() {
        let scene = Scene::new();
        let outside = scene.tmp.path().join("outside");
        let data = raw_zip(&[
            raw(
                "new_link",
                Some(S_IFLNK | 0o777),
                outside.to_str().unwrap().as_bytes(),
            ),
            raw("new_link/x", Some(S_IFREG | 0o644), b"pwned"),
        ]);
        let err = unzip("build", &data, &scene.project())
            .unwrap_err()
            .to_string();
        assert!(err.contains("new_link/x"), "{err}");
        scene.outside_untouched().unwrap();
    }

    /// A file entry whose name is a symlink in the checkout replaces the link, never writes
    /// its target.
    #[test]
    fn a_file_entry_over_an_existing_symlink_replaces_the_link() {
        let scene = Scene::new();
        let data = raw_zip(&[raw("evil_file", Some(S_IFREG | 0o644), b"from the archive")]);
        assert_eq!(unzip("build", &data, &scene.project()).unwrap(), 1);
        let path = scene.project().join("evil_file");
        assert!(path.symlink_metadata().unwrap().is_file());
        assert_eq!(std::fs::read(&path).unwrap(), b"from the archive");
        scene.outside_untouched().unwrap();
    }

    /// Finding 13: setuid/setgid/sticky bits are stripped; a file without a mode gets 0644.
    #[test]
    fn special_bits_are_stripped_and_a_file_without_mode_gets_0644() {
        let scene = Scene::new();
        let data = raw_zip(&[
            raw("suid", Some(S_IFREG | 0o4755), b"x"),
            raw("sgid", Some(S_IFREG | 0o2775), b"x"),
            raw("d/sticky/", Some(S_IFDIR | 0o1777), b""),
            raw("plain", None, b"x"),
        ]);
        unzip("build", &data, &scene.project()).unwrap();
        let mode = |p: &str| scene.project().join(p).symlink_metadata().unwrap().mode() & 0o7777;
        assert_eq!(mode("suid"), 0o755);
        assert_eq!(mode("sgid"), 0o775);
        assert_eq!(mode("plain"), 0o644);
        assert_eq!(mode("d/sticky") & 0o7000, 0);
        scene.no_special_bits().unwrap();
    }

    /// Finding 4 (download side): a symlink entry, as gitlab-runner stores one, is recreated as
    /// a symlink, not as a 0777 regular file holding the target's name.
    #[test]
    fn symlink_entries_are_extracted_as_symlinks() {
        let scene = Scene::new();
        let data = raw_zip(&[
            raw("venv/lib/python.so", Some(S_IFREG | 0o755), b"elf"),
            raw("venv/lib64", Some(S_IFLNK | 0o777), b"lib"),
            raw("abs", Some(S_IFLNK | 0o777), b"/etc/hostname"),
        ]);
        assert_eq!(unzip("build", &data, &scene.project()).unwrap(), 3);
        let lib64 = scene.project().join("venv/lib64");
        assert!(lib64.symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_link(&lib64).unwrap(), Path::new("lib"));
        let abs = scene.project().join("abs");
        assert_eq!(
            std::fs::read_link(&abs).unwrap(),
            Path::new("/etc/hostname")
        );
    }

    /// Finding 4 (upload side): symlinks are stored as symlinks (S_IFLNK, the target as
    /// content) whatever they point at — a file outside, a directory — and round-trip.
    #[test]
    fn uploads_store_symlinks_as_links_and_round_trip() {
        let scene = Scene::new();
        let project = scene.project();
        std::fs::create_dir_all(project.join("dist/lib")).unwrap();
        std::fs::write(project.join("dist/lib/a.so"), "so").unwrap();
        std::os::unix::fs::symlink("lib", project.join("dist/lib64")).unwrap();
        std::os::unix::fs::symlink(
            scene.tmp.path().join("outside/sentinel"),
            project.join("dist/secret"),
        )
        .unwrap();
        std::os::unix::fs::symlink("../../job.json", project.join("dist/job")).unwrap();
        let (files, _) = collect(&project, &["dist/".into()], &[], &[]).unwrap();
        assert_eq!(
            files,
            [
                PathBuf::from("dist/job"),
                PathBuf::from("dist/lib/a.so"),
                PathBuf::from("dist/lib64"),
                PathBuf::from("dist/secret"),
            ]
        );
        let data = zip(&project, &files).unwrap();
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&data)).unwrap();
        for (name, target) in [
            ("dist/lib64", "lib".to_owned()),
            (
                "dist/secret",
                scene
                    .tmp
                    .path()
                    .join("outside/sentinel")
                    .display()
                    .to_string(),
            ),
            ("dist/job", "../../job.json".to_owned()),
        ] {
            let mut entry = archive.by_name(name).unwrap();
            assert!(entry.is_symlink(), "{name}");
            let mut content = String::new();
            entry.read_to_string(&mut content).unwrap();
            assert_eq!(content, target, "{name}");
        }
        let out = tempfile::tempdir().unwrap();
        unzip("dist", &data, out.path()).unwrap();
        assert_eq!(
            std::fs::read_link(out.path().join("dist/lib64")).unwrap(),
            Path::new("lib")
        );
        assert_eq!(
            std::fs::read(out.path().join("dist/lib/a.so")).unwrap(),
            b"so"
        );
    }

    /// A symlink matched by a glob, or met inside a matched directory, is never walked into.
    #[test]
    fn collect_does_not_walk_into_linked_directories() {
        let scene = Scene::new();
        let (files, _) = collect(&scene.project(), &["**".into()], &[], &[]).unwrap();
        assert_eq!(
            files,
            [PathBuf::from("evil_file"), PathBuf::from("evil_link")]
        );
        let (files, unmatched) =
            collect(&scene.project(), &["evil_link/*".into()], &[], &[]).unwrap();
        assert!(files.is_empty(), "{files:?}");
        assert_eq!(unmatched, ["evil_link/*"]);
    }

    fn segment() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just("..".to_owned()),
            Just(".".to_owned()),
            Just(String::new()),
            Just("evil_link".to_owned()),
            Just("evil_file".to_owned()),
            Just("d".to_owned()),
            Just("l".to_owned()),
            Just("f".to_owned()),
            Just("outside".to_owned()),
            Just("..\\..".to_owned()),
            proptest::collection::vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), 1..6)
                .prop_map(|c| c.into_iter().collect()),
        ]
    }

    fn entry_name() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        (
            prop_oneof![Just(""), Just(""), Just("/"), Just("./"), Just("\\")],
            proptest::collection::vec(
                (segment(), prop_oneof![Just("/"), Just("/"), Just("\\")]),
                1..4,
            ),
            any::<bool>(),
        )
            .prop_map(|(lead, parts, trailing)| {
                let mut name = lead.to_owned();
                for (i, (segment, sep)) in parts.iter().enumerate() {
                    if i > 0 {
                        name.push_str(sep);
                    }
                    name.push_str(segment);
                }
                if trailing {
                    name.push('/');
                }
                name
            })
    }

    fn hostile_entry(outside: String) -> impl proptest::strategy::Strategy<Value = RawEntry> {
        use proptest::prelude::*;
        let target = prop_oneof![
            Just(outside.clone()),
            Just(format!("{outside}/sentinel")),
            Just("../outside".to_owned()),
            Just("../outside/sentinel".to_owned()),
            Just("/".to_owned()),
            Just(".".to_owned()),
            Just("d".to_owned()),
            Just("evil_link".to_owned()),
            Just(String::new()),
            entry_name(),
        ];
        let kind = prop_oneof![
            Just(S_IFREG),
            Just(S_IFREG),
            Just(S_IFDIR),
            Just(S_IFLNK),
            Just(S_IFLNK),
            Just(0),
            (0u32..16).prop_map(|t| t << 12),
        ];
        (
            entry_name(),
            kind,
            0u32..0o10000,
            any::<bool>(),
            target,
            proptest::collection::vec(any::<u8>(), 0..16),
        )
            .prop_map(|(name, kind, perm, has_mode, target, content)| {
                let data = if kind == S_IFLNK {
                    target.into_bytes()
                } else {
                    content
                };
                RawEntry {
                    name,
                    mode: (has_mode || kind != 0).then_some(kind | perm),
                    data,
                }
            })
    }

    fn hostile_archive() -> impl proptest::strategy::Strategy<Value = Vec<RawEntry>> {
        use proptest::prelude::*;
        // The outside dir's absolute path is only known per case; `@OUTSIDE@` stands for it.
        proptest::collection::vec(hostile_entry("@OUTSIDE@".to_owned()), 1..8)
            .prop_flat_map(|entries| {
                // Duplicate names: repeat some entries (the archive holds them twice).
                let n = entries.len();
                (Just(entries), proptest::collection::vec(0..n, 0..3))
            })
            .prop_map(|(mut entries, repeat)| {
                for i in repeat {
                    let mut again = entries[i].clone();
                    again.data.reverse();
                    entries.push(again);
                }
                entries
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("KILN_UNZIP_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(1000)
        ))]

        /// Make the class impossible: any archive — `..`, absolute names, backslashes, unicode,
        /// symlink entries with any target, any mode bits, duplicates, entries under links the
        /// checkout or the archive holds — is extracted or refused, and nothing outside the
        /// target is created or changed, nothing written carries setuid/setgid/sticky, and an
        /// error names the job (and the entry, when one is at fault).
        #[test]
        fn any_archive_stays_inside_the_project(entries in hostile_archive()) {
            let scene = Scene::new();
            let outside = scene.tmp.path().join("outside").display().to_string();
            let entries: Vec<RawEntry> = entries
                .into_iter()
                .map(|mut e| {
                    e.name = e.name.replace("@OUTSIDE@", &outside);
                    if let Ok(text) = std::str::from_utf8(&e.data) {
                        e.data = text.replace("@OUTSIDE@", &outside).into_bytes();
                    }
                    e
                })
                .collect();
            let data = raw_zip(&entries);
            let result = unzip("job-9 hostile", &data, &scene.project());
            if let Err(e) = &result {
                let message = e.to_string();
                proptest::prop_assert!(message.contains("job-9 hostile"), "{}", message);
                if let ArtifactError::Entry { entry, .. } = e {
                    proptest::prop_assert!(
                        entries.iter().any(|x| x.name.escape_debug().to_string() == *entry),
                        "{} names no entry", message
                    );
                }
            }
            let untouched = scene.outside_untouched();
            proptest::prop_assert!(untouched.is_ok(), "{:?} after {:?}: {:?}", untouched, entries, result);
            let bits = scene.no_special_bits();
            proptest::prop_assert!(bits.is_ok(), "{:?} after {:?}", bits, entries);
        }
    }
}
