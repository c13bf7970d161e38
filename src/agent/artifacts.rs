//! Artifacts: collecting files by GitLab's `paths`/`exclude`/`untracked` rules into an archive,
//! and unpacking the archives of dependencies into the project directory.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

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
    /// The archive is not a valid zip.
    #[error("artifact archive of job {job} is not a valid zip: {reason}")]
    Zip {
        /// The job whose archive it is.
        job: String,
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

/// The files (relative paths, sorted) an artifact takes from `root`: everything matching a
/// pattern (a matching directory brings all its contents), plus `untracked` files, minus
/// `exclude` matches. Returns the files and the patterns that matched nothing.
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
        let mut walker = walkdir::WalkDir::new(root).min_depth(1).into_iter();
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
                for inner in walkdir::WalkDir::new(entry.path()).min_depth(1) {
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
    files.extend(untracked.iter().cloned());
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

/// Zips `files` (relative to `root`), keeping their Unix modes.
///
/// # Errors
/// Unreadable files.
pub(crate) fn zip(root: &Path, files: &[PathBuf]) -> Result<Vec<u8>, ArtifactError> {
    use std::os::unix::fs::PermissionsExt;
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for file in files {
        let full = root.join(file);
        let meta = std::fs::symlink_metadata(&full).map_err(io("read", &full))?;
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(meta.permissions().mode() & 0o7777)
            .large_file(meta.len() > u32::MAX as u64);
        let name = file.to_string_lossy();
        let zip_err = |e: zip::result::ZipError| ArtifactError::Io {
            action: "add to the archive",
            path: full.clone(),
            source: std::io::Error::other(e),
        };
        writer.start_file(name.as_ref(), options).map_err(zip_err)?;
        let mut source = std::fs::File::open(&full).map_err(io("open", &full))?;
        std::io::copy(&mut source, &mut writer).map_err(io("read", &full))?;
    }
    let cursor = writer.finish().map_err(|e| ArtifactError::Io {
        action: "finish",
        path: root.to_owned(),
        source: std::io::Error::other(e),
    })?;
    Ok(cursor.into_inner())
}

/// Gzips one file (report artifacts with `artifact_format: gzip`).
///
/// # Errors
/// Unreadable file.
pub(crate) fn gzip(path: &Path) -> Result<Vec<u8>, ArtifactError> {
    let mut data = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(io("read", path))?;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&data).map_err(io("compress", path))?;
    encoder.finish().map_err(io("compress", path))
}

/// Unpacks a dependency's zip into `root`, refusing entries that would escape it.
///
/// # Errors
/// An invalid archive or unwritable files.
pub(crate) fn unzip(job: &str, data: &[u8], root: &Path) -> Result<usize, ArtifactError> {
    use std::os::unix::fs::PermissionsExt;
    let bad = |reason: String| ArtifactError::Zip {
        job: job.to_owned(),
        reason,
    };
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(data)).map_err(|e| bad(e.to_string()))?;
    let mut count = 0;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| bad(e.to_string()))?;
        let Some(relative) = entry.enclosed_name() else {
            return Err(bad(format!(
                "entry `{}` points outside the project",
                entry.name()
            )));
        };
        if relative
            .components()
            .any(|c| matches!(c, Component::ParentDir))
        {
            return Err(bad(format!(
                "entry `{}` points outside the project",
                entry.name()
            )));
        }
        let target = root.join(&relative);
        if entry.is_dir() {
            std::fs::create_dir_all(&target).map_err(io("create", &target))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io("create", parent))?;
        }
        let mut out = std::fs::File::create(&target).map_err(io("create", &target))?;
        std::io::copy(&mut entry, &mut out).map_err(io("write", &target))?;
        if let Some(mode) = entry.unix_mode() {
            let _ =
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode & 0o7777));
        }
        count += 1;
    }
    Ok(count)
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
}
