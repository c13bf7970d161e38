//! Saving a directory's files as chunks in packs and a manifest, and restoring them: chunking,
//! compression and writing run on a blocking thread while transfers run in parallel, so memory
//! stays bounded (a few packs) and a restore writes files while later ranges download.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::format::{
    CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, ChunkRef, Entry, EntryKind, KnownChunks, MANIFEST_VERSION,
    Manifest, PACK_TARGET, ZSTD_LEVEL, manifest_name, pack_name, safe_path, valid_name,
};
use super::remote::{Remote, RemoteError, Target};

/// Chunks the chunker may have ready ahead of the packer (at most 128 KiB each).
const BATCH: usize = 128;
/// Closed packs a save holds before uploading them together, in parallel (memory: this many
/// times [`PACK_TARGET`]).
const PACKS_IN_FLIGHT: usize = 8;
/// Ranged reads a restore has in flight. Each request's latency (tens of ms to a cloud store)
/// is what a restore of small requests waits on; with ranges of up to [`RANGE_MAX`] a few dozen
/// requests carry a 100 MB cache, and memory stays near this many ranges (compressed and
/// decompressed).
const RANGES_IN_FLIGHT: usize = 16;
/// The most compressed bytes one ranged read asks for (chunks adjacent in a pack are read
/// together up to this).
const RANGE_MAX: u64 = 8 << 20;

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
    /// A pack is missing or shorter than the manifest says.
    #[error("pack {hash}: {problem}")]
    Pack {
        /// Its hash.
        hash: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// A chunk is damaged.
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
    /// Packs uploaded.
    pub uploaded_packs: usize,
    /// Bytes uploaded (packs and the manifest).
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
/// Chunks in `known` (from manifests this job read) keep their stored location; the others are
/// packed into new packs and uploaded. `max_size` bounds the files' total size.
///
/// # Errors
/// Too large; unreadable files; storage trouble. Nothing is stored under `key` then (chunks
/// already uploaded stay, for the next save or `kiln cache gc`).
pub async fn save(
    remote: &Remote,
    root: &Path,
    files: &[PathBuf],
    key: &str,
    known: &KnownChunks,
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
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Cut>(BATCH * 2);
    let stored: HashSet<String> = known.keys().cloned().collect();
    let chunker = tokio::task::spawn_blocking(move || chunk_files(paths, stored, &tx));

    let mut saved = Saved {
        entries: entries.len(),
        ..Saved::default()
    };
    let mut packer = Packer::default();
    let mut order: Vec<(String, u32, Location)> = Vec::new();
    let mut seen: HashMap<String, Location> = known
        .iter()
        .map(|(hash, chunk)| (hash.clone(), Location::Stored(chunk.clone())))
        .collect();
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        for cut in batch.drain(..) {
            let location = match seen.get(&cut.hash) {
                Some(location) => location.clone(),
                None => {
                    let location = packer.add(&cut.data);
                    seen.insert(cut.hash.clone(), location.clone());
                    saved.uploaded_chunks += 1;
                    location
                }
            };
            order.push((cut.hash, cut.size, location));
        }
        if packer.ready.len() >= PACKS_IN_FLIGHT {
            packer.upload(remote).await?;
        }
    }
    packer.close();
    packer.upload(remote).await?;
    saved.uploaded_packs = packer.closed.len();
    saved.uploaded_bytes = packer.uploaded_bytes;
    let chunks: Vec<ChunkRef> = order
        .into_iter()
        .map(|(hash, size, location)| match location {
            Location::Stored(chunk) => ChunkRef {
                hash,
                size,
                ..chunk
            },
            Location::Packed {
                pack,
                offset,
                length,
            } => ChunkRef {
                hash,
                size,
                pack: packer.closed.get(pack).cloned().unwrap_or_default(),
                offset,
                length,
            },
        })
        .collect();
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

/// One chunk as the chunker cut it: its hash and size, and its compressed bytes (empty when
/// it is stored already or earlier in this save).
struct Cut {
    hash: String,
    size: u32,
    data: Bytes,
}

/// Where a save's chunk is: where a restored manifest had it, or in a pack of this save.
#[derive(Clone)]
enum Location {
    Stored(ChunkRef),
    Packed {
        /// The index of the pack among this save's packs.
        pack: usize,
        offset: u64,
        length: u32,
    },
}

/// Gathers a save's new chunks into packs and uploads them.
#[derive(Default)]
struct Packer {
    /// The pack being filled.
    current: Vec<u8>,
    /// The hashes of the closed packs, by index.
    closed: Vec<String>,
    /// Closed packs not uploaded yet.
    ready: Vec<(String, Bytes)>,
    uploaded_bytes: u64,
}

impl Packer {
    /// Appends a compressed chunk, closing the pack once it reaches [`PACK_TARGET`].
    fn add(&mut self, data: &[u8]) -> Location {
        let location = Location::Packed {
            pack: self.closed.len(),
            offset: self.current.len() as u64,
            length: u32::try_from(data.len()).unwrap_or(u32::MAX),
        };
        self.current.extend_from_slice(data);
        if self.current.len() >= PACK_TARGET {
            self.close();
        }
        location
    }

    fn close(&mut self) {
        if self.current.is_empty() {
            return;
        }
        let pack = std::mem::take(&mut self.current);
        let hash = blake3::hash(&pack).to_hex().to_string();
        self.closed.push(hash.clone());
        self.ready.push((hash, Bytes::from(pack)));
    }

    /// Uploads the closed packs, in parallel.
    async fn upload(&mut self, remote: &Remote) -> Result<(), ArchiveError> {
        if self.ready.is_empty() {
            return Ok(());
        }
        let ready = std::mem::take(&mut self.ready);
        let names: Vec<String> = ready.iter().map(|(hash, _)| pack_name(hash)).collect();
        let puts = remote.targets("PUT", &names).await?;
        self.uploaded_bytes += ready.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
        futures::stream::iter(
            puts.iter()
                .zip(ready)
                .map(|(target, (_, data))| remote.put(target, data)),
        )
        .buffer_unordered(PACKS_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
        Ok(())
    }
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

/// Cuts the files into chunks (FastCDC), hashes each and sends it on, compressed when it is
/// neither in `stored` nor sent before (the others are not uploaded: compressing them would be
/// most of a second save's time); returns the bytes read of each entry (`None` for links).
fn chunk_files(
    paths: Vec<Option<PathBuf>>,
    mut stored: HashSet<String>,
    tx: &tokio::sync::mpsc::Sender<Cut>,
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
        let compressed = if stored.insert(hash.clone()) {
            zstd::bulk::compress(&chunk.data, ZSTD_LEVEL).map_err(|source| ArchiveError::Io {
                action: "compress",
                path: PathBuf::from(&hash),
                source,
            })?
        } else {
            Vec::new()
        };
        let cut = Cut {
            hash,
            size: u32::try_from(chunk.length).unwrap_or(u32::MAX),
            data: Bytes::from(compressed),
        };
        if tx.blocking_send(cut).is_err() {
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
    if let Some(bad) = manifest.packs().find(|p| !valid_name(&pack_name(p))) {
        return Err(ArchiveError::Manifest(format!(
            "damaged cache manifest: {bad:?} is not a pack name"
        )));
    }
    let spans = spans(&manifest.chunks)?;
    let names: Vec<String> = spans.iter().map(|s| pack_name(&s.pack)).collect();
    let targets = remote.targets("GET", &names).await?;

    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(BATCH);
    let entries = manifest.entries.clone();
    let root_owned = root.to_owned();
    let writer = tokio::task::spawn_blocking(move || write_entries(&root_owned, &entries, rx));

    let mut downloaded = 0u64;
    let mut fetches = futures::stream::iter(
        spans
            .into_iter()
            .zip(targets)
            .map(|(span, target)| fetch_span(remote, &manifest.chunks, span, target)),
    )
    .buffered(RANGES_IN_FLIGHT);
    let mut failure = None;
    'fetching: while let Some(fetched) = fetches.next().await {
        match fetched {
            Ok((chunks, compressed)) => {
                downloaded += compressed;
                for data in chunks {
                    if tx.send(data).await.is_err() {
                        break 'fetching;
                    }
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

/// One ranged read: bytes `start..end` of a pack, holding the chunks `chunks` (indices into
/// the manifest's chunks) back to back.
#[derive(Debug, PartialEq, Eq)]
struct Span {
    pack: String,
    start: u64,
    end: u64,
    chunks: Range<usize>,
}

/// The ranged reads that fetch `chunks` in order: consecutive chunks adjacent in one pack are
/// read together, up to [`RANGE_MAX`] bytes.
fn spans(chunks: &[ChunkRef]) -> Result<Vec<Span>, ArchiveError> {
    let mut spans: Vec<Span> = Vec::new();
    for (index, chunk) in chunks.iter().enumerate() {
        let end = chunk
            .offset
            .checked_add(u64::from(chunk.length))
            .ok_or_else(|| {
                ArchiveError::Manifest(format!(
                    "damaged cache manifest: chunk {} lies beyond any pack",
                    chunk.hash
                ))
            })?;
        if let Some(last) = spans.last_mut()
            && last.pack == chunk.pack
            && last.end == chunk.offset
            && end - last.start <= RANGE_MAX
        {
            last.end = end;
            last.chunks.end = index + 1;
            continue;
        }
        spans.push(Span {
            pack: chunk.pack.clone(),
            start: chunk.offset,
            end,
            chunks: index..index + 1,
        });
    }
    Ok(spans)
}

/// Reads a span and returns its chunks decompressed and checked, and the bytes downloaded.
async fn fetch_span(
    remote: &Remote,
    chunks: &[ChunkRef],
    span: Span,
    target: Target,
) -> Result<(Vec<Bytes>, u64), ArchiveError> {
    let pack_problem = |problem| ArchiveError::Pack {
        hash: span.pack.clone(),
        problem,
    };
    let data = remote
        .get_range(&target, span.start, span.end - span.start)
        .await?
        .ok_or_else(|| pack_problem("missing"))?;
    if data.len() as u64 != span.end - span.start {
        return Err(pack_problem("shorter than the manifest says"));
    }
    let downloaded = data.len() as u64;
    let wanted: Vec<ChunkRef> = chunks
        .get(span.chunks.clone())
        .map(<[ChunkRef]>::to_vec)
        .unwrap_or_default();
    let start = span.start;
    tokio::task::spawn_blocking(move || {
        wanted
            .iter()
            .map(|chunk| {
                let damaged = || ArchiveError::Chunk {
                    hash: chunk.hash.clone(),
                    problem: "damaged (size or hash differs)",
                };
                let from = usize::try_from(chunk.offset - start).map_err(|_| damaged())?;
                let to = from + chunk.length as usize;
                let compressed = data.get(from..to).ok_or_else(damaged)?;
                let size = chunk.size as usize;
                let plain = zstd::bulk::decompress(compressed, size).map_err(|_| damaged())?;
                if plain.len() != size || blake3::hash(&plain).to_hex().as_str() != chunk.hash {
                    return Err(damaged());
                }
                Ok(Bytes::from(plain))
            })
            .collect::<Result<Vec<Bytes>, ArchiveError>>()
            .map(|chunks| (chunks, downloaded))
    })
    .await
    .map_err(|e| ArchiveError::Worker(e.to_string()))?
}

/// Writes the entries, taking files' contents from the chunks arriving on `rx`; returns how
/// many entries and bytes were written.
fn write_entries(
    root: &Path,
    entries: &[Entry],
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> Result<(usize, u64), ArchiveError> {
    // Creating thousands of small files is syscalls, not bytes: this thread checks the paths
    // and gathers each small file's bytes in order, and a few threads create and write them.
    // A writer that fails keeps draining the queue (so the reader never blocks on it) and the
    // reader stops at its next file.
    let (work_tx, work_rx) = std::sync::mpsc::sync_channel::<SmallFile>(WRITE_QUEUE);
    let work_rx = Mutex::new(work_rx);
    let failed: Mutex<Option<ArchiveError>> = Mutex::new(None);
    let read = std::thread::scope(|scope| {
        for _ in 0..FILE_WRITERS {
            scope.spawn(|| {
                loop {
                    let next = match work_rx.lock() {
                        Ok(queue) => queue.recv(),
                        Err(_) => return,
                    };
                    let Ok(small) = next else { return };
                    let already = failed.lock().map_or(true, |f| f.is_some());
                    if already {
                        continue;
                    }
                    if let Err(e) = write_file(&small.path, small.mode, [small.data])
                        && let Ok(mut slot) = failed.lock()
                    {
                        slot.get_or_insert(e);
                    }
                }
            });
        }
        let read = read_entries(root, entries, &mut rx, &work_tx, &failed);
        drop(work_tx);
        read
    });
    match failed.into_inner().ok().flatten() {
        Some(e) => Err(e),
        None => read,
    }
}

/// Files a restore writes in parallel, beside the thread that reads the chunks.
const FILE_WRITERS: usize = 3;
/// Small files gathered ahead of the writers (memory: at most this many times
/// [`SMALL_FILE`], plus one per writer).
const WRITE_QUEUE: usize = 32;
/// Files up to this size are handed to the writers whole; larger ones are written here as
/// their chunks arrive.
const SMALL_FILE: u64 = 256 << 10;

/// A file whose bytes are all here, for a writer thread.
struct SmallFile {
    path: PathBuf,
    mode: u32,
    data: Bytes,
}

/// Reads the chunks in order and places every entry: links and large files here, small files
/// through `small`; stops when a writer has `failed`.
fn read_entries(
    root: &Path,
    entries: &[Entry],
    rx: &mut tokio::sync::mpsc::Receiver<Bytes>,
    small: &std::sync::mpsc::SyncSender<SmallFile>,
    failed: &Mutex<Option<ArchiveError>>,
) -> Result<(usize, u64), ArchiveError> {
    let stopped = || ArchiveError::Worker("a file writer of the restore stopped".into());
    let mut pending = Bytes::new();
    let mut next = |left: u64| -> Result<Bytes, ArchiveError> {
        if pending.is_empty() {
            pending = rx
                .blocking_recv()
                .ok_or_else(|| ArchiveError::Manifest("the cache's chunks ended early".into()))?;
        }
        let take = usize::try_from(left)
            .unwrap_or(usize::MAX)
            .min(pending.len());
        Ok(pending.split_to(take))
    };
    let mut written = 0u64;
    let mut directories = HashSet::new();
    for entry in entries {
        if failed.lock().map_or(true, |f| f.is_some()) {
            return Err(stopped());
        }
        let full = prepare(root, &entry.path, &mut directories)?;
        match &entry.kind {
            EntryKind::Symlink { target } => {
                std::os::unix::fs::symlink(target, &full).map_err(|source| ArchiveError::Io {
                    action: "create the link",
                    path: full.clone(),
                    source,
                })?;
            }
            EntryKind::File { size, mode } if *size > SMALL_FILE => {
                let mut left = *size;
                let parts = std::iter::from_fn(|| {
                    (left > 0).then(|| {
                        let part = next(left)?;
                        left -= part.len() as u64;
                        Ok(part)
                    })
                });
                write_file_parts(&full, *mode, parts)?;
                written += size;
            }
            EntryKind::File { size, mode } => {
                let mut parts = Vec::new();
                let mut left = *size;
                while left > 0 {
                    let part = next(left)?;
                    left -= part.len() as u64;
                    parts.push(part);
                }
                let data = match parts.len() {
                    1 => parts.pop().unwrap_or_default(),
                    _ => Bytes::from(parts.concat()),
                };
                let file = SmallFile {
                    path: full,
                    mode: *mode,
                    data,
                };
                small.send(file).map_err(|_| stopped())?;
                written += size;
            }
        }
    }
    Ok((entries.len(), written))
}

/// Creates `path` with `mode` (never through a link, never over an existing file) and writes
/// `parts` into it.
fn write_file(
    path: &Path,
    mode: u32,
    parts: impl IntoIterator<Item = Bytes>,
) -> Result<(), ArchiveError> {
    write_file_parts(path, mode, parts.into_iter().map(Ok))
}

fn write_file_parts(
    path: &Path,
    mode: u32,
    parts: impl Iterator<Item = Result<Bytes, ArchiveError>>,
) -> Result<(), ArchiveError> {
    use std::io::Write;
    let io = |action, source| ArchiveError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o777)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io("create", e))?;
    for part in parts {
        file.write_all(&part?).map_err(|e| io("write", e))?;
    }
    // The umask may have narrowed the mode at creation.
    file.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
        .map_err(|e| io("set the mode of", e))
}

/// Makes sure the directories on the way to `relative` are real directories inside `root`
/// (creating missing ones, refusing links and files) and that nothing but a file or link is
/// in the way at `relative` itself (removed, so it is replaced); returns the full path.
///
/// `checked` holds the directories this restore has already seen to be real directories: a
/// restore never turns a directory into anything else (a link or file entry where a directory
/// is is refused below), so each is checked once, not once per file under it.
fn prepare(
    root: &Path,
    relative: &str,
    checked: &mut HashSet<PathBuf>,
) -> Result<PathBuf, ArchiveError> {
    let outside = || ArchiveError::Outside(relative.to_owned());
    let path = Path::new(relative);
    let mut at = root.to_path_buf();
    if let Some(parent) = path.parent() {
        for component in parent.components() {
            at.push(component);
            if checked.contains(&at) {
                continue;
            }
            match std::fs::symlink_metadata(&at) {
                Ok(meta) if meta.is_dir() => {
                    checked.insert(at.clone());
                }
                Ok(_) => return Err(outside()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir(&at).map_err(|source| ArchiveError::Io {
                        action: "create the directory",
                        path: at.clone(),
                        source,
                    })?;
                    checked.insert(at.clone());
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
        let none = KnownChunks::new();
        let save_all = || save(&remote, source.path(), &files, "k", &none, u64::MAX);
        let first = save_all().await.unwrap();
        assert_eq!(first.entries, 202);
        assert_eq!(first.uploaded_chunks, first.chunks);

        std::fs::write(source.path().join("deps/a/f100"), "changed").unwrap();
        // The job restored the first save's manifest: its chunks keep their packs.
        let known: KnownChunks = fetch_manifest(&remote, "k")
            .await
            .unwrap()
            .unwrap()
            .known_chunks()
            .collect();
        let second = save(&remote, source.path(), &files, "k", &known, u64::MAX)
            .await
            .unwrap();
        assert!(
            second.uploaded_chunks <= 3 && second.uploaded_packs == 1,
            "{second:?}"
        );

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

    /// Small files go to the writer threads, large ones are written as their chunks come;
    /// a restore gives back every byte and mode of both, empty files and deep paths included.
    #[tokio::test]
    async fn small_and_large_files_restore_whole_through_the_parallel_writers() {
        let store = tempfile::tempdir().unwrap();
        let source = tempfile::tempdir().unwrap();
        let remote = remote(store.path());
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut noise = |len: usize| -> Vec<u8> {
            (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect()
        };
        let deep = source.path().join("a/b/c/d");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(source.path().join("large.bin"), noise(3 << 20)).unwrap();
        std::fs::write(deep.join("just-over"), noise((256 << 10) + 1)).unwrap();
        std::fs::write(deep.join("empty"), b"").unwrap();
        for i in 0..500 {
            std::fs::write(deep.join(format!("s{i}")), noise(i * 7)).unwrap();
        }
        std::fs::set_permissions(deep.join("s3"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let files = all_files(source.path());
        save(
            &remote,
            source.path(),
            &files,
            "k",
            &KnownChunks::new(),
            u64::MAX,
        )
        .await
        .unwrap();
        let target = tempfile::tempdir().unwrap();
        let manifest = fetch_manifest(&remote, "k").await.unwrap().unwrap();
        let restored = restore(&remote, &manifest, target.path()).await.unwrap();
        assert_eq!(restored.entries, files.len());
        for file in &files {
            let relative = file.strip_prefix(source.path()).unwrap_or(file);
            let (from, to) = (source.path().join(relative), target.path().join(relative));
            if from.is_file() {
                assert_eq!(
                    std::fs::read(&to).unwrap(),
                    std::fs::read(&from).unwrap(),
                    "{}",
                    relative.display()
                );
                assert_eq!(
                    std::fs::metadata(&to).unwrap().permissions().mode() & 0o777,
                    std::fs::metadata(&from).unwrap().permissions().mode() & 0o777,
                    "{}",
                    relative.display()
                );
            }
        }
    }

    fn chunk(pack: &str, offset: u64, length: u32) -> ChunkRef {
        ChunkRef {
            hash: format!("{pack}{offset}"),
            size: 1,
            pack: pack.into(),
            offset,
            length,
        }
    }

    #[test]
    fn chunks_adjacent_in_a_pack_are_read_in_one_range() {
        let chunks = [
            chunk("a", 0, 10),
            chunk("a", 10, 5),
            // A gap: a chunk of this pack the manifest does not read.
            chunk("a", 20, 5),
            chunk("b", 0, 7),
            // Back to an earlier place of a pack.
            chunk("a", 0, 10),
        ];
        let read = spans(&chunks).unwrap();
        let read: Vec<(&str, u64, u64, Range<usize>)> = read
            .iter()
            .map(|s| (s.pack.as_str(), s.start, s.end, s.chunks.clone()))
            .collect();
        assert_eq!(
            read,
            [
                ("a", 0, 15, 0..2),
                ("a", 20, 25, 2..3),
                ("b", 0, 7, 3..4),
                ("a", 0, 10, 4..5)
            ]
        );
        let big = u32::try_from(RANGE_MAX / 2 + 1).unwrap();
        let halves = spans(&[chunk("a", 0, big), chunk("a", u64::from(big), big)]).unwrap();
        assert_eq!(halves.len(), 2, "a range stays under RANGE_MAX");
        assert!(spans(&[chunk("a", u64::MAX, 2)]).is_err());
    }

    /// A pack shorter than the manifest says, or a chunk whose bytes do not hash to its name,
    /// is an error naming it, not garbage written into the files.
    #[tokio::test]
    async fn a_damaged_pack_is_refused() {
        let store = tempfile::tempdir().unwrap();
        let source = tempfile::tempdir().unwrap();
        let remote = remote(store.path());
        std::fs::write(source.path().join("f"), "some content to cache").unwrap();
        save(
            &remote,
            source.path(),
            &[PathBuf::from("f")],
            "k",
            &KnownChunks::new(),
            u64::MAX,
        )
        .await
        .unwrap();
        let manifest = fetch_manifest(&remote, "k").await.unwrap().unwrap();
        let pack = store.path().join(pack_name(&manifest.chunks[0].pack));
        let mut bytes = std::fs::read(&pack).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&pack, &bytes).unwrap();
        let target = tempfile::tempdir().unwrap();
        let error = restore(&remote, &manifest, target.path())
            .await
            .unwrap_err();
        assert!(matches!(error, ArchiveError::Chunk { .. }), "{error}");
        std::fs::write(&pack, &bytes[..last]).unwrap();
        let target = tempfile::tempdir().unwrap();
        let error = restore(&remote, &manifest, target.path())
            .await
            .unwrap_err();
        assert!(matches!(error, ArchiveError::Pack { .. }), "{error}");
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
            &KnownChunks::new(),
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
