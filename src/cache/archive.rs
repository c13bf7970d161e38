//! Saving a directory's files as chunks and a manifest, and restoring them: chunking,
//! compression and writing run on a blocking thread while transfers run in parallel, so memory
//! stays bounded (a few hundred chunks) and a restore writes files while later chunks download.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::format::{
    CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, ChunkRef, Entry, EntryKind, MANIFEST_VERSION, Manifest,
    ZSTD_LEVEL, chunk_name, manifest_name, safe_path,
};
use super::remote::{Remote, RemoteError, Target};

/// Transfers in flight at once. Object stores serve many small requests in parallel well,
/// and each request's latency (tens of ms to a cloud store) is what a restore waits on; 128
/// chunks of at most 128 KiB keep memory at tens of MiB.
const PARALLEL: usize = 128;
/// Chunks signed and checked together while saving.
const BATCH: usize = 128;

/// Why a save or restore did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Storage or coordinator trouble.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// A local file could not be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was tried.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The cache is larger than `max_size`.
    #[error("the cache is {size} bytes, more than the {limit} bytes cache.max_size allows")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The manifest is not usable.
    #[error("{0}")]
    Manifest(String),
    /// The manifest names a path outside the directory, or through a link.
    #[error("refused: the cache would write {0}, which is outside the project directory")]
    Outside(String),
    /// A chunk is missing or damaged.
    #[error("chunk {hash}: {problem}")]
    Chunk {
        /// Its hash.
        hash: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// A worker thread died.
    #[error("cache worker failed: {0}")]
    Worker(String),
}

/// What a save did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Saved {
    /// Files and links stored.
    pub entries: usize,
    /// Their size before compression.
    pub bytes: u64,
    /// Chunks of the cache.
    pub chunks: usize,
    /// Chunks uploaded (the rest were already stored).
    pub uploaded_chunks: usize,
    /// Bytes uploaded (compressed chunks and the manifest).
    pub uploaded_bytes: u64,
}

/// What a restore did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// Files and links written.
    pub entries: usize,
    /// Bytes written.
    pub bytes: u64,
    /// Bytes downloaded.
    pub downloaded_bytes: u64,
}

/// The manifest stored for `key`: `Ok(None)` when there is none or it is of another kiln
/// version.
///
/// # Errors
/// Storage trouble; a damaged manifest.
pub async fn fetch_manifest(remote: &Remote, key: &str) -> Result<Option<Manifest>, ArchiveError> {
    let targets = remote.targets("GET", &[manifest_name(key)]).await?;
    let Some(target) = targets.first() else {
        return Ok(None);
    };
    match remote.get(target).await? {
        None => Ok(None),
        Some(data) => Manifest::decode(&data).map_err(ArchiveError::Manifest),
    }
}

/// Saves `files` (relative to `root`, as artifacts' path matching lists them) under `key`.
/// Chunks in `known` (from manifests this job read) are taken as stored; others are checked
/// and uploaded only when missing. `max_size` bounds the files' total size.
///
/// # Errors
/// Too large; unreadable files; storage trouble. Nothing is stored under `key` then (chunks
/// already uploaded stay, for the next save or `kiln cache gc`).
pub async fn save(
    remote: &Remote,
    root: &Path,
    files: &[PathBuf],
    key: &str,
    known: &HashSet<String>,
    max_size: u64,
) -> Result<Saved, ArchiveError> {
    let mut entries = Vec::new();
    let mut size = 0u64;
    for relative in files {
        let full = root.join(relative);
        let meta = std::fs::symlink_metadata(&full).map_err(|source| ArchiveError::Io {
            action: "read",
            path: full.clone(),
            source,
        })?;
        let path = relative.to_string_lossy().into_owned();
        let kind = if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full).map_err(|source| ArchiveError::Io {
                action: "read the link",
                path: full.clone(),
                source,
            })?;
            EntryKind::Symlink {
                target: target.to_string_lossy().into_owned(),
            }
        } else if meta.is_file() {
            size += meta.len();
            EntryKind::File {
                size: meta.len(),
                mode: meta.permissions().mode() & 0o777,
            }
        } else {
            continue;
        };
        entries.push(Entry { path, kind });
    }
    if size > max_size {
        return Err(ArchiveError::TooLarge {
            size,
            limit: max_size,
        });
    }

    // The chunker reads the files in order as one stream; a file's size is what was read
    // (it may have changed since it was listed).
    let paths: Vec<Option<PathBuf>> = entries
        .iter()
        .map(|e| matches!(e.kind, EntryKind::File { .. }).then(|| root.join(&e.path)))
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(ChunkRef, Bytes)>(BATCH * 2);
    let chunker = tokio::task::spawn_blocking(move || chunk_files(paths, &tx));

    let mut saved = Saved {
        entries: entries.len(),
        ..Saved::default()
    };
    let mut chunks = Vec::new();
    let mut seen: HashSet<String> = known.clone();
    loop {
        let mut batch = Vec::new();
        if rx.recv_many(&mut batch, BATCH).await == 0 {
            break;
        }
        let mut fresh = Vec::new();
        for (chunk, data) in batch {
            if seen.insert(chunk.hash.clone()) {
                fresh.push((chunk.hash.clone(), data));
            }
            chunks.push(chunk);
        }
        let (count, bytes) = upload_missing(remote, fresh).await?;
        saved.uploaded_chunks += count;
        saved.uploaded_bytes += bytes;
    }
    let sizes = chunker
        .await
        .map_err(|e| ArchiveError::Worker(e.to_string()))??;
    for (entry, read) in entries.iter_mut().zip(sizes) {
        if let (EntryKind::File { size, .. }, Some(read)) = (&mut entry.kind, read) {
            *size = read;
        }
    }
    saved.bytes = chunks.iter().map(|c| u64::from(c.size)).sum();
    saved.chunks = chunks.len();
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        entries,
        chunks,
    };
    let encoded = Bytes::from(manifest.encode());
    saved.uploaded_bytes += encoded.len() as u64;
    let targets = remote.targets("PUT", &[manifest_name(key)]).await?;
    if let Some(target) = targets.first() {
        remote.put(target, encoded).await?;
    }
    Ok(saved)
}

/// Checks which of `fresh` are stored and uploads the others; returns how many and how many
/// bytes were uploaded.
async fn upload_missing(
    remote: &Remote,
    fresh: Vec<(String, Bytes)>,
) -> Result<(usize, u64), ArchiveError> {
    if fresh.is_empty() {
        return Ok((0, 0));
    }
    let names: Vec<String> = fresh.iter().map(|(h, _)| chunk_name(h)).collect();
    let heads = remote.targets("HEAD", &names).await?;
    let stored: Vec<bool> = futures::stream::iter(heads.iter().map(|t| remote.exists(t)))
        .buffered(PARALLEL)
        .try_collect()
        .await?;
    let missing: Vec<(String, Bytes)> = fresh
        .into_iter()
        .zip(stored)
        .filter(|(_, stored)| !stored)
        .map(|(c, _)| c)
        .collect();
    if missing.is_empty() {
        return Ok((0, 0));
    }
    let names: Vec<String> = missing.iter().map(|(h, _)| chunk_name(h)).collect();
    let puts = remote.targets("PUT", &names).await?;
    let bytes = missing.iter().map(|(_, d)| d.len() as u64).sum();
    let count = missing.len();
    futures::stream::iter(
        puts.iter()
            .zip(missing)
            .map(|(t, (_, data))| remote.put(t, data)),
    )
    .buffer_unordered(PARALLEL)
    .try_collect::<Vec<()>>()
    .await?;
    Ok((count, bytes))
}

/// Reads the files one after the other as one stream (a file that cannot be opened any more,
/// or became something else, reads as empty), recording how much of each was read.
struct Concatenated {
    paths: std::vec::IntoIter<(usize, PathBuf)>,
    current: Option<(usize, std::fs::File)>,
    read: Arc<Mutex<Vec<Option<u64>>>>,
}

impl Read for Concatenated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some((index, file)) = &mut self.current {
                let n = file.read(buf)?;
                if n > 0 {
                    if let Ok(mut read) = self.read.lock()
                        && let Some(Some(total)) = read.get_mut(*index)
                    {
                        *total += n as u64;
                    }
                    return Ok(n);
                }
                self.current = None;
            }
            let Some((index, path)) = self.paths.next() else {
                return Ok(0);
            };
            // O_NOFOLLOW: a file swapped for a link since it was listed is not followed.
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
                .open(&path);
            if let Ok(file) = file
                && file.metadata().is_ok_and(|m| m.is_file())
            {
                self.current = Some((index, file));
            }
        }
    }
}

/// Cuts the files into chunks (FastCDC), hashes and compresses each and sends it on; returns
/// the bytes read of each entry (`None` for links).
fn chunk_files(
    paths: Vec<Option<PathBuf>>,
    tx: &tokio::sync::mpsc::Sender<(ChunkRef, Bytes)>,
) -> Result<Vec<Option<u64>>, ArchiveError> {
    let read = Arc::new(Mutex::new(
        paths
            .iter()
            .map(|p| p.as_ref().map(|_| 0))
            .collect::<Vec<_>>(),
    ));
    let reader = Concatenated {
        paths: paths
            .into_iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|p| (i, p)))
            .collect::<Vec<_>>()
            .into_iter(),
        current: None,
        read: Arc::clone(&read),
    };
    let chunker = fastcdc::v2020::StreamCDC::new(
        reader,
        CHUNK_MIN as usize,
        CHUNK_AVG as usize,
        CHUNK_MAX as usize,
    );
    for chunk in chunker {
        let chunk = chunk.map_err(|e| ArchiveError::Io {
            action: "read the files of",
            path: PathBuf::from("the cache"),
            source: std::io::Error::other(e.to_string()),
        })?;
        let hash = blake3::hash(&chunk.data).to_hex().to_string();
        let compressed =
            zstd::bulk::compress(&chunk.data, ZSTD_LEVEL).map_err(|source| ArchiveError::Io {
                action: "compress",
                path: PathBuf::from(&hash),
                source,
            })?;
        let reference = ChunkRef {
            hash,
            size: u32::try_from(chunk.length).unwrap_or(u32::MAX),
        };
        if tx
            .blocking_send((reference, Bytes::from(compressed)))
            .is_err()
        {
            // The uploader stopped (it failed and says why).
            break;
        }
    }
    let sizes = read.lock().map(|r| r.clone()).unwrap_or_default();
    Ok(sizes)
}

/// Restores `manifest` into `root`. Every path is checked before anything is written; a link
/// on the way to a path (stored, or already there) is refused, so nothing is written outside
/// `root`.
///
/// # Errors
/// A path outside `root`; a missing or damaged chunk; storage trouble; unwritable files. Files
/// written before the error stay.
pub async fn restore(
    remote: &Remote,
    manifest: &Manifest,
    root: &Path,
) -> Result<Restored, ArchiveError> {
    if let Some(bad) = manifest.entries.iter().find(|e| !safe_path(&e.path)) {
        return Err(ArchiveError::Outside(bad.path.clone()));
    }
    let file_bytes: u64 = manifest
        .entries
        .iter()
        .map(|e| match e.kind {
            EntryKind::File { size, .. } => size,
            EntryKind::Symlink { .. } => 0,
        })
        .sum();
    let chunk_bytes: u64 = manifest.chunks.iter().map(|c| u64::from(c.size)).sum();
    if file_bytes != chunk_bytes {
        return Err(ArchiveError::Manifest(format!(
            "damaged cache manifest: its files hold {file_bytes} bytes, its chunks {chunk_bytes}"
        )));
    }
    let names: Vec<String> = manifest
        .chunks
        .iter()
        .map(|c| chunk_name(&c.hash))
        .collect();
    let targets = remote.targets("GET", &names).await?;

    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(PARALLEL);
    let entries = manifest.entries.clone();
    let root_owned = root.to_owned();
    let writer = tokio::task::spawn_blocking(move || write_entries(&root_owned, &entries, rx));

    let mut downloaded = 0u64;
    let mut fetches = futures::stream::iter(
        manifest
            .chunks
            .iter()
            .zip(targets)
            .map(|(chunk, target)| fetch_chunk(remote, chunk, target)),
    )
    .buffered(PARALLEL);
    let mut failure = None;
    while let Some(fetched) = fetches.next().await {
        match fetched {
            Ok((data, compressed)) => {
                downloaded += compressed;
                if tx.send(data).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| ArchiveError::Worker(e.to_string()))?;
    if let Some(e) = failure {
        return Err(e);
    }
    let (entries, bytes) = written?;
    Ok(Restored {
        entries,
        bytes,
        downloaded_bytes: downloaded,
    })
}

async fn fetch_chunk(
    remote: &Remote,
    chunk: &ChunkRef,
    target: Target,
) -> Result<(Bytes, u64), ArchiveError> {
    let missing = |problem| ArchiveError::Chunk {
        hash: chunk.hash.clone(),
        problem,
    };
    let compressed = remote
        .get(&target)
        .await?
        .ok_or_else(|| missing("missing"))?;
    let size = chunk.size as usize;
    let hash = chunk.hash.clone();
    let data = tokio::task::spawn_blocking(move || {
        let data = zstd::bulk::decompress(&compressed, size).ok()?;
        (data.len() == size && blake3::hash(&data).to_hex().as_str() == hash)
            .then(|| (Bytes::from(data), compressed.len() as u64))
    })
    .await
    .map_err(|e| ArchiveError::Worker(e.to_string()))?;
    data.ok_or_else(|| missing("damaged (size or hash differs)"))
}

/// Writes the entries, taking files' contents from the chunks arriving on `rx`; returns how
/// many entries and bytes were written.
fn write_entries(
    root: &Path,
    entries: &[Entry],
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> Result<(usize, u64), ArchiveError> {
    use std::io::Write;
    let mut pending = Bytes::new();
    let mut written = 0u64;
    for entry in entries {
        let full = prepare(root, &entry.path)?;
        let io = |action, source| ArchiveError::Io {
            action,
            path: full.clone(),
            source,
        };
        match &entry.kind {
            EntryKind::Symlink { target } => {
                std::os::unix::fs::symlink(target, &full).map_err(|e| io("create the link", e))?;
            }
            EntryKind::File { size, mode } => {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode & 0o777)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&full)
                    .map_err(|e| io("create", e))?;
                let mut left = *size;
                while left > 0 {
                    if pending.is_empty() {
                        pending = rx.blocking_recv().ok_or_else(|| {
                            ArchiveError::Manifest("the cache's chunks ended early".into())
                        })?;
                    }
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(pending.len());
                    let part = pending.split_to(take);
                    file.write_all(&part).map_err(|e| io("write", e))?;
                    left -= take as u64;
                }
                // The umask may have narrowed the mode at creation.
                file.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
                    .map_err(|e| io("set the mode of", e))?;
                written += size;
            }
        }
    }
    Ok((entries.len(), written))
}

/// Makes sure the directories on the way to `relative` are real directories inside `root`
/// (creating missing ones, refusing links and files) and that nothing but a file or link is
/// in the way at `relative` itself (removed, so it is replaced); returns the full path.
fn prepare(root: &Path, relative: &str) -> Result<PathBuf, ArchiveError> {
    let outside = || ArchiveError::Outside(relative.to_owned());
    let path = Path::new(relative);
    let mut at = root.to_path_buf();
    if let Some(parent) = path.parent() {
        for component in parent.components() {
            at.push(component);
            match std::fs::symlink_metadata(&at) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Err(outside()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir(&at).map_err(|source| ArchiveError::Io {
                        action: "create the directory",
                        path: at.clone(),
                        source,
                    })?;
                }
                Err(source) => {
                    return Err(ArchiveError::Io {
                        action: "read",
                        path: at.clone(),
                        source,
                    });
                }
            }
        }
    }
    let full = root.join(path);
    match std::fs::symlink_metadata(&full) {
        Ok(meta) if meta.is_dir() => Err(ArchiveError::Io {
            action: "replace the directory",
            path: full,
            source: std::io::Error::other("a directory is where the cache has a file"),
        }),
        Ok(_) => {
            std::fs::remove_file(&full).map_err(|source| ArchiveError::Io {
                action: "replace",
                path: full.clone(),
                source,
            })?;
            Ok(full)
        }
        Err(_) => Ok(full),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::remote::CacheAccess;
    use std::os::unix::fs::symlink;

    fn remote(dir: &Path) -> Remote {
        Remote::new(CacheAccess::Directory {
            dir: dir.to_owned(),
        })
    }

    fn all_files(root: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = walkdir::WalkDir::new(root)
            .min_depth(1)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| !e.file_type().is_dir())
            .map(|e| e.path().strip_prefix(root).unwrap().to_owned())
            .collect();
        files.sort();
        files
    }

    #[tokio::test]
    async fn a_saved_tree_restores_with_modes_and_links_and_a_second_save_uploads_only_changes() {
        let store = tempfile::tempdir().unwrap();
        let source = tempfile::tempdir().unwrap();
        let remote = remote(store.path());
        std::fs::create_dir_all(source.path().join("deps/a")).unwrap();
        for i in 0..200u32 {
            // Pseudo-random (xorshift): periodic bytes would give FastCDC no cut points.
            let mut state = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let body: Vec<u8> = (0..5000u32)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            std::fs::write(source.path().join(format!("deps/a/f{i}")), body).unwrap();
        }
        std::fs::write(source.path().join("deps/run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            source.path().join("deps/run.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        symlink("a/f1", source.path().join("deps/link")).unwrap();
        let files = all_files(source.path());
        let none = HashSet::new();
        let save_all = || save(&remote, source.path(), &files, "k", &none, u64::MAX);
        let first = save_all().await.unwrap();
        assert_eq!(first.entries, 202);
        assert_eq!(first.uploaded_chunks, first.chunks);

        std::fs::write(source.path().join("deps/a/f100"), "changed").unwrap();
        let second = save_all().await.unwrap();
        assert!(second.uploaded_chunks <= 3, "{second:?}");

        let target = tempfile::tempdir().unwrap();
        let manifest = fetch_manifest(&remote, "k").await.unwrap().unwrap();
        let restored = restore(&remote, &manifest, target.path()).await.unwrap();
        assert_eq!(restored.entries, 202);
        assert_eq!(
            std::fs::read(target.path().join("deps/a/f100")).unwrap(),
            b"changed"
        );
        assert_eq!(
            std::fs::read(target.path().join("deps/a/f7")).unwrap(),
            std::fs::read(source.path().join("deps/a/f7")).unwrap()
        );
        let mode = std::fs::metadata(target.path().join("deps/run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(target.path().join("deps/link")).unwrap(),
            Path::new("a/f1")
        );
    }

    #[tokio::test]
    async fn a_cache_over_max_size_is_not_saved() {
        let store = tempfile::tempdir().unwrap();
        let source = tempfile::tempdir().unwrap();
        std::fs::write(source.path().join("big"), vec![1u8; 4096]).unwrap();
        let error = save(
            &remote(store.path()),
            source.path(),
            &[PathBuf::from("big")],
            "k",
            &HashSet::new(),
            1000,
        )
        .await
        .unwrap_err();
        assert!(matches!(error, ArchiveError::TooLarge { size: 4096, .. }));
        assert!(
            fetch_manifest(&remote(store.path()), "k")
                .await
                .unwrap()
                .is_none()
        );
    }

    fn hostile(entries: Vec<Entry>) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            entries,
            chunks: vec![],
        }
    }

    fn link(path: &str, target: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::Symlink {
                target: target.into(),
            },
        }
    }

    fn empty_file(path: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::File {
                size: 0,
                mode: 0o644,
            },
        }
    }

    /// A manifest written by a hostile job (it can write its project's cache) must not make a
    /// later restore write outside the project: `../`, absolute paths, and files through a
    /// stored or pre-existing link are all refused.
    #[tokio::test]
    async fn hostile_manifests_never_write_outside_the_directory() {
        let store = tempfile::tempdir().unwrap();
        let remote = remote(store.path());
        let outside = tempfile::tempdir().unwrap();
        for manifest in [
            hostile(vec![empty_file("../escaped")]),
            hostile(vec![empty_file("/tmp/escaped")]),
            hostile(vec![
                link("out", outside.path().to_str().unwrap()),
                empty_file("out/escaped"),
            ]),
        ] {
            let root = tempfile::tempdir().unwrap();
            let project = root.path().join("project");
            std::fs::create_dir(&project).unwrap();
            let error = restore(&remote, &manifest, &project).await.unwrap_err();
            assert!(matches!(error, ArchiveError::Outside(_)), "{error}");
            assert!(!root.path().join("escaped").exists());
        }
        // A link the checkout already has is not followed either.
        let project = tempfile::tempdir().unwrap();
        symlink(outside.path(), project.path().join("vendor")).unwrap();
        let error = restore(
            &remote,
            &hostile(vec![empty_file("vendor/escaped")]),
            project.path(),
        )
        .await
        .unwrap_err();
        assert!(matches!(error, ArchiveError::Outside(_)), "{error}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }
}
