//! The agent's cache stages, as gitlab-runner runs them: "Restoring cache" after the sources
//! (each entry's key, then its `fallback_keys`, then `CACHE_FALLBACK_KEY`), and "Saving cache"
//! after `after_script`, by `policy` and `when`. A cache problem is a warning, never a failed
//! job.

use std::sync::Arc;

use super::{Context, artifacts, job_variables, untracked_files};
use crate::cache::archive::{self, ArchiveError};
use crate::cache::format::{ChunkRef, KnownChunks};
use crate::cache::remote::Remote;
use crate::deploy::output::human_bytes;
use crate::gitlab::payload::{Cache, When};

/// The variable that sets how many times a restore is tried (gitlab-runner's, default 1).
const RESTORE_ATTEMPTS_VARIABLE: &str = "RESTORE_CACHE_ATTEMPTS";
/// The most attempts it may ask for.
const MAX_RESTORE_ATTEMPTS: u32 = 10;
/// The project-wide fallback key variable.
const FALLBACK_VARIABLE: &str = "CACHE_FALLBACK_KEY";

/// What the restore learned, for the save: chunks known to be stored, and where.
#[derive(Debug, Default)]
pub(super) struct Restored {
    known: KnownChunks,
}

fn expand(ctx: &Context, text: &str) -> String {
    job_variables(&ctx.job, &ctx.env, &ctx.tmp_dir).expand(text)
}

fn key_of(ctx: &Context, cache: &Cache) -> String {
    let key = expand(ctx, &cache.key);
    if key.trim().is_empty() {
        "default".into()
    } else {
        key
    }
}

/// Restores every pulled cache of the job into the project directory.
pub(super) async fn restore(ctx: &Context) -> Restored {
    let mut restored = Restored::default();
    let pulled: Vec<&Cache> = ctx.job.cache.iter().filter(|c| c.policy.pulls()).collect();
    if pulled.is_empty() {
        return restored;
    }
    let trace = Arc::clone(&ctx.trace);
    trace.section_start("restore_cache", "Restoring cache");
    let Some(grant) = &ctx.cache else {
        trace.warn(
            "this runner has no cache configured ([cache] in kiln's config); nothing is restored",
        );
        trace.section_end("restore_cache");
        return restored;
    };
    let remote = Remote::new(grant.access.clone());
    let attempts = ctx
        .env
        .get(RESTORE_ATTEMPTS_VARIABLE)
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(1)
        .clamp(1, MAX_RESTORE_ATTEMPTS);
    let global_fallback = ctx
        .env
        .get(FALLBACK_VARIABLE)
        .map(|k| expand(ctx, k))
        .filter(|k| !k.trim().is_empty());
    for cache in pulled {
        let mut keys = vec![key_of(ctx, cache)];
        keys.extend(
            cache
                .fallback_keys
                .iter()
                .map(|k| expand(ctx, k))
                .filter(|k| !k.trim().is_empty()),
        );
        keys.extend(global_fallback.clone());
        for key in keys {
            trace.line(&format!("Checking cache for {key}..."));
            match restore_key(ctx, &remote, &key, attempts).await {
                Ok(Some((stats, hashes))) => {
                    restored.known.extend(hashes);
                    trace.line(&format!(
                        "Successfully extracted cache ({} files and links, {}, {} downloaded)",
                        stats.entries,
                        human_bytes(stats.bytes),
                        human_bytes(stats.downloaded_bytes)
                    ));
                    break;
                }
                Ok(None) => trace.warn(&format!("Cache for {key} does not exist")),
                Err(e) => trace.warn(&format!("Failed to extract cache {key}: {e}")),
            }
        }
    }
    trace.section_end("restore_cache");
    restored
}

async fn restore_key(
    ctx: &Context,
    remote: &Remote,
    key: &str,
    attempts: u32,
) -> Result<Option<(archive::Restored, Vec<(String, ChunkRef)>)>, ArchiveError> {
    let mut attempt = 1;
    loop {
        let result = async {
            let Some(manifest) = archive::fetch_manifest(remote, key).await? else {
                return Ok(None);
            };
            let stats = archive::restore(remote, &manifest, &ctx.project_dir).await?;
            Ok(Some((stats, manifest.known_chunks().collect())))
        }
        .await;
        match result {
            Err(e) if attempt < attempts && !matches!(e, ArchiveError::Outside(_)) => {
                ctx.trace.warn(&format!(
                    "Failed to extract cache {key} (attempt {attempt} of {attempts}): {e}"
                ));
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Saves every cache of the job whose `policy` pushes and whose `when` matches how the job
/// went (`failed`).
pub(super) async fn save(ctx: &Context, failed: bool, restored: &Restored) {
    if ctx.job.cache.is_empty() {
        return;
    }
    let due: Vec<&Cache> = ctx
        .job
        .cache
        .iter()
        .filter(|c| c.when.unwrap_or(When::OnSuccess).applies(failed))
        .collect();
    if due.is_empty() {
        return;
    }
    let trace = Arc::clone(&ctx.trace);
    let (section, header) = if failed {
        ("archive_cache_on_failure", "Saving cache for failed job")
    } else {
        ("archive_cache", "Saving cache for successful job")
    };
    trace.section_start(section, header);
    let remote = ctx.cache.as_ref().map(|g| Remote::new(g.access.clone()));
    for cache in due {
        let key = key_of(ctx, cache);
        if !cache.policy.pushes() {
            trace.line(&format!("Not uploading cache {key} due to policy"));
            continue;
        }
        let (Some(remote), Some(grant)) = (&remote, &ctx.cache) else {
            trace.warn(&format!(
                "Not uploading cache {key}: this runner has no cache configured ([cache] in kiln's config)"
            ));
            continue;
        };
        trace.line(&format!("Creating cache {key}..."));
        let untracked = if cache.untracked {
            untracked_files(ctx, "cache:untracked")
        } else {
            Vec::new()
        };
        let (files, unmatched) =
            match artifacts::collect(&ctx.project_dir, &cache.paths, &[], &untracked) {
                Ok(found) => found,
                Err(e) => {
                    trace.warn(&format!("Failed to create cache {key}: {e}"));
                    continue;
                }
            };
        for pattern in &unmatched {
            trace.warn(&format!("{pattern}: no matching files. Ensure that the artifact path is relative to the working directory ({})", ctx.project_dir.display()));
        }
        if files.is_empty() {
            trace.warn(&format!("No files to cache for {key}; not uploading"));
            continue;
        }
        match archive::save(
            remote,
            &ctx.project_dir,
            &files,
            &key,
            &restored.known,
            grant.max_size,
        )
        .await
        {
            Ok(saved) => trace.line(&format!(
                "Created cache {key}: {} files and links, {}; uploaded {} of {} chunks in {} packs ({})",
                saved.entries,
                human_bytes(saved.bytes),
                saved.uploaded_chunks,
                saved.chunks,
                saved.uploaded_packs,
                human_bytes(saved.uploaded_bytes)
            )),
            Err(e) => trace.warn(&format!("Failed to create cache {key}: {e}")),
        }
    }
    trace.section_end(section);
}
