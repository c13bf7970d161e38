//! The stored form of a cache: content-defined chunks (blake3-hashed, zstd-compressed), stored
//! concatenated in packs of a few MiB, and, per key, a small versioned manifest listing the
//! files with their modes, the symbolic links, and the chunks (each with its pack, offset and
//! length) whose concatenation is the files' contents in manifest order.
//!
//! Object names, relative to a project's prefix: `packs/<blake3 of the pack, 64 hex>` and
//! `manifests/<key, percent-encoded>` (zstd-compressed JSON). Version 1 stored each chunk as its
//! own object (`chunks/<hash>`); a restore of it was thousands of small GETs.

use std::path::{Component, Path};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};

/// The manifest version this kiln writes and reads. Another version is a clean miss.
pub(crate) const MANIFEST_VERSION: u32 = 2;

/// Chunk sizes (bytes, before compression). Small enough that changing 1 % of a tree's files
/// re-uploads a few percent of it; large enough that a 300 MB cache is ~10,000 objects.
pub(crate) const CHUNK_MIN: u32 = 8 << 10;
/// The average chunk size FastCDC aims at.
pub(crate) const CHUNK_AVG: u32 = 32 << 10;
/// The largest chunk.
pub(crate) const CHUNK_MAX: u32 = 128 << 10;

/// A save closes a pack once it holds this many compressed bytes: few enough objects that a
/// restore is a few dozen ranged GETs, small enough that packs upload in parallel.
pub(crate) const PACK_TARGET: usize = 4 << 20;

/// The zstd level chunks and manifests are compressed with: fast, still 2-4x on text.
pub(crate) const ZSTD_LEVEL: i32 = 1;

/// The largest manifest a restore decompresses (a hostile one must not fill memory).
pub(crate) const MANIFEST_LIMIT: usize = 256 << 20;

/// What one cache key holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub(crate) version: u32,
    /// Files and links, relative to the project directory.
    pub(crate) entries: Vec<Entry>,
    /// The chunks, in order; their contents, concatenated, are the files' contents.
    pub(crate) chunks: Vec<ChunkRef>,
}

/// Only the version, read before the rest so another version is a miss, not a parse error.
#[derive(Deserialize)]
pub(crate) struct Versioned {
    /// The manifest's version.
    pub(crate) version: u32,
}

/// One file or link. (No `deny_unknown_fields`: serde does not support it with `flatten`.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// Relative path, `/`-separated.
    pub(crate) path: String,
    /// What it is.
    #[serde(flatten)]
    pub(crate) kind: EntryKind,
}

/// A file's contents come from the chunk stream; a link is its target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum EntryKind {
    /// A regular file of `size` bytes with permission bits `mode`.
    File {
        /// Its size.
        size: u64,
        /// Permission bits (`0o755`).
        mode: u32,
    },
    /// A symbolic link.
    Symlink {
        /// Its target, as stored.
        target: String,
    },
}

/// One chunk of the stream and where it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    /// The blake3 hash of its uncompressed bytes, hex.
    pub(crate) hash: String,
    /// Its uncompressed size.
    pub(crate) size: u32,
    /// The hash of the pack holding it (its object is [`pack_name`]).
    pub(crate) pack: String,
    /// Where its compressed bytes start in the pack.
    pub(crate) offset: u64,
    /// How many compressed bytes it is.
    pub(crate) length: u32,
}

/// Chunks known to be stored, by hash, with their location: what a save need not upload.
pub type KnownChunks = std::collections::HashMap<String, ChunkRef>;

/// Characters of a cache key kept as they are in its object name.
const KEY_SET: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');

/// The object name of a key's manifest.
pub(crate) fn manifest_name(key: &str) -> String {
    format!("manifests/{}", utf8_percent_encode(key, KEY_SET))
}

/// The object name of a pack.
pub(crate) fn pack_name(hash: &str) -> String {
    format!("packs/{hash}")
}

/// Whether `name` is an object name a build may ask for: a pack by its hash, or a manifest.
pub(crate) fn valid_name(name: &str) -> bool {
    if let Some(hash) = name.strip_prefix("packs/") {
        return hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
    }
    if let Some(key) = name.strip_prefix("manifests/") {
        return !key.is_empty()
            && key.len() <= 1024
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'%');
    }
    false
}

/// Whether a manifest's `path` stays inside the directory it is restored into: relative, no
/// `..`, no `.`, nothing empty. (Links met on the way are refused while restoring.)
pub(crate) fn safe_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\0')
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        && !path
            .split('/')
            .any(|s| s == "." || s == ".." || s.is_empty())
}

impl Manifest {
    /// Its chunks with their locations (what a save after restoring it need not upload again).
    pub fn known_chunks(&self) -> impl Iterator<Item = (String, ChunkRef)> + '_ {
        self.chunks.iter().map(|c| (c.hash.clone(), c.clone()))
    }

    /// The packs it reads.
    pub(crate) fn packs(&self) -> impl Iterator<Item = &str> {
        self.chunks.iter().map(|c| c.pack.as_str())
    }

    /// The compressed JSON that is stored.
    pub(crate) fn encode(&self) -> Vec<u8> {
        // Serializing plain data cannot fail; compressing into memory neither.
        let json = serde_json::to_vec(self).unwrap_or_default();
        zstd::bulk::compress(&json, ZSTD_LEVEL).unwrap_or_default()
    }

    /// The version of a stored manifest, if it is one.
    pub(crate) fn stored_version(data: &[u8]) -> Option<u32> {
        let json = zstd::bulk::decompress(data, MANIFEST_LIMIT).ok()?;
        serde_json::from_slice::<Versioned>(&json)
            .ok()
            .map(|v| v.version)
    }

    /// A stored manifest; `Ok(None)` when it is of another version (a clean miss).
    ///
    /// # Errors
    /// Not zstd, too large, or not a manifest.
    pub(crate) fn decode(data: &[u8]) -> Result<Option<Self>, String> {
        let json = zstd::bulk::decompress(data, MANIFEST_LIMIT)
            .map_err(|e| format!("not a kiln cache manifest ({e})"))?;
        let versioned: Versioned = serde_json::from_slice(&json)
            .map_err(|e| format!("not a kiln cache manifest ({e})"))?;
        if versioned.version != MANIFEST_VERSION {
            return Ok(None);
        }
        serde_json::from_slice(&json)
            .map(Some)
            .map_err(|e| format!("damaged cache manifest ({e})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_leave_the_directory_are_unsafe() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/./b",
            "a\0b",
        ] {
            assert!(!safe_path(bad), "{bad:?}");
        }
        for good in [
            "a",
            "node_modules/x/index.js",
            ".m2/repository/a.jar",
            "a..b",
        ] {
            assert!(safe_path(good), "{good:?}");
        }
    }

    #[test]
    fn a_manifest_of_another_version_is_a_miss_and_garbage_an_error() {
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            entries: vec![Entry {
                path: "a".into(),
                kind: EntryKind::File {
                    size: 1,
                    mode: 0o644,
                },
            }],
            chunks: vec![],
        };
        assert_eq!(Manifest::decode(&manifest.encode()), Ok(Some(manifest)));
        let future = zstd::bulk::compress(br#"{"version": 99, "whatever": []}"#, 1).unwrap();
        assert_eq!(Manifest::decode(&future), Ok(None));
        assert_eq!(Manifest::stored_version(&future), Some(99));
        assert!(Manifest::decode(b"PK\x03\x04 a zip").is_err());
    }

    #[test]
    fn builds_may_name_only_packs_and_manifests() {
        assert!(valid_name(&pack_name(&"a".repeat(64))));
        assert!(valid_name(&manifest_name("my key/with:odd chars")));
        for bad in [
            "packs/../x",
            "chunks/0000000000000000000000000000000000000000000000000000000000000000",
            "manifests/",
            "manifests/a/b",
            "other",
            "packs/abc",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
