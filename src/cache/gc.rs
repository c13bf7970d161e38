//! `kiln cache gc`: removes the packs no manifest of their project reads any more (packs are
//! shared between keys, so a bucket lifecycle rule cannot tell which are stale), and optionally
//! the manifests nobody saved for a while. A pack is kept whole while any manifest reads any
//! chunk of it; chunk objects of the version-1 format (`chunks/<hash>`) go once no version-1
//! manifest of their project is left.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use super::format::Manifest;

/// What a collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Projects looked at.
    pub projects: usize,
    /// Manifests kept.
    pub manifests: usize,
    /// Manifests deleted for age.
    pub deleted_manifests: usize,
    /// Packs kept.
    pub packs: usize,
    /// Packs (and version-1 chunk objects) deleted.
    pub deleted_packs: usize,
    /// Bytes deleted.
    pub deleted_bytes: u64,
    /// Projects left alone because a manifest could not be read (another kiln version).
    pub skipped_projects: Vec<String>,
}

#[derive(Default)]
struct Project {
    manifests: Vec<object_store::ObjectMeta>,
    packs: Vec<object_store::ObjectMeta>,
}

/// Collects garbage under `prefix`. A pack is deleted when no manifest of its project reads
/// it and it is older than `grace` (a save in progress uploads packs before its manifest). A
/// manifest older than `manifest_age`, when given, is deleted first (its cache expired).
///
/// # Errors
/// Listing, reading or deleting failed.
pub async fn collect(
    store: &dyn ObjectStore,
    prefix: &str,
    grace: Duration,
    manifest_age: Option<Duration>,
) -> Result<GcReport, object_store::Error> {
    let now = chrono::Utc::now();
    let age = |meta: &object_store::ObjectMeta| {
        (now - meta.last_modified)
            .to_std()
            .unwrap_or(Duration::ZERO)
    };
    let root =
        (!prefix.trim_matches('/').is_empty()).then(|| ObjectPath::from(prefix.trim_matches('/')));
    let objects: Vec<object_store::ObjectMeta> = store.list(root.as_ref()).try_collect().await?;
    let mut projects: BTreeMap<String, Project> = BTreeMap::new();
    for meta in objects {
        let location = meta.location.to_string();
        if let Some((project, _)) = location
            .rsplit_once("/packs/")
            .or_else(|| location.rsplit_once("/chunks/"))
        {
            projects
                .entry(project.to_owned())
                .or_default()
                .packs
                .push(meta);
        } else if let Some((project, _)) = location.rsplit_once("/manifests/") {
            projects
                .entry(project.to_owned())
                .or_default()
                .manifests
                .push(meta);
        }
    }
    let mut report = GcReport {
        projects: projects.len(),
        ..GcReport::default()
    };
    'projects: for (name, project) in projects {
        let mut needed = HashSet::new();
        let mut kept = 0;
        let mut version_1 = false;
        for manifest in &project.manifests {
            if manifest_age.is_some_and(|limit| age(manifest) > limit) {
                store.delete(&manifest.location).await?;
                report.deleted_manifests += 1;
                continue;
            }
            let data = store.get(&manifest.location).await?.bytes().await?;
            match Manifest::decode(&data) {
                Ok(Some(manifest)) => needed.extend(manifest.packs().map(str::to_owned)),
                // An older kiln's manifest reads the version-1 chunk objects.
                Ok(None) if Manifest::stored_version(&data) == Some(1) => version_1 = true,
                // Another version's manifest may need any object: leave the project alone.
                Ok(None) | Err(_) => {
                    report.skipped_projects.push(name);
                    report.manifests += project.manifests.len();
                    report.packs += project.packs.len();
                    continue 'projects;
                }
            }
            kept += 1;
        }
        report.manifests += kept;
        for pack in project.packs {
            let hash = pack.location.filename().unwrap_or_default().to_owned();
            let old_chunk = pack.location.as_ref().contains("/chunks/");
            if needed.contains(&hash) || (old_chunk && version_1) || age(&pack) < grace {
                report.packs += 1;
                continue;
            }
            store.delete(&pack.location).await?;
            report.deleted_packs += 1;
            report.deleted_bytes += pack.size;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::archive;
    use crate::cache::remote::{CacheAccess, Remote};
    use std::path::PathBuf;

    #[tokio::test]
    async fn gc_deletes_only_packs_no_manifest_reads_and_old_manifests_when_asked() {
        let root = tempfile::tempdir().unwrap();
        let project = root.path().join("kiln/project/1");
        let remote = Remote::new(CacheAccess::Directory {
            dir: project.clone(),
        });
        let source = tempfile::tempdir().unwrap();
        std::fs::write(source.path().join("a"), "some content").unwrap();
        archive::save(
            &remote,
            source.path(),
            &[PathBuf::from("a")],
            "k",
            &crate::cache::format::KnownChunks::new(),
            u64::MAX,
        )
        .await
        .unwrap();
        let orphan = project.join("packs").join("f".repeat(64));
        std::fs::write(&orphan, "stale").unwrap();
        // A version-1 chunk object no manifest reads any more.
        let old_chunk = project.join("chunks").join("e".repeat(64));
        std::fs::create_dir_all(old_chunk.parent().unwrap()).unwrap();
        std::fs::write(&old_chunk, "old format").unwrap();
        let store = object_store::local::LocalFileSystem::new_with_prefix(root.path()).unwrap();

        // Within the grace period nothing goes.
        let report = collect(&store, "kiln", Duration::from_secs(3600), None)
            .await
            .unwrap();
        assert_eq!((report.deleted_packs, report.packs), (0, 3));
        assert!(orphan.exists());

        let report = collect(&store, "kiln", Duration::ZERO, None).await.unwrap();
        assert_eq!(
            (
                report.projects,
                report.manifests,
                report.packs,
                report.deleted_packs
            ),
            (1, 1, 1, 2)
        );
        assert!(!orphan.exists() && !old_chunk.exists());
        let target = tempfile::tempdir().unwrap();
        let manifest = archive::fetch_manifest(&remote, "k")
            .await
            .unwrap()
            .unwrap();
        archive::restore(&remote, &manifest, target.path())
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(target.path().join("a")).unwrap(),
            b"some content"
        );

        // An expired cache takes its packs with it.
        let report = collect(&store, "kiln", Duration::ZERO, Some(Duration::ZERO))
            .await
            .unwrap();
        assert_eq!((report.deleted_manifests, report.deleted_packs), (1, 1));
        assert!(
            archive::fetch_manifest(&remote, "k")
                .await
                .unwrap()
                .is_none()
        );

        // A version-1 manifest keeps its project's chunk objects (an older kiln reads them)
        // without stopping the collection; once it is gone, they go.
        let old_project = root.path().join("kiln/project/2");
        std::fs::create_dir_all(old_project.join("manifests")).unwrap();
        std::fs::create_dir_all(old_project.join("chunks")).unwrap();
        let old_manifest = old_project.join("manifests/k");
        let v1 = zstd::bulk::compress(br#"{"version":1,"entries":[],"chunks":[]}"#, 1).unwrap();
        std::fs::write(&old_manifest, v1).unwrap();
        let old_chunk = old_project.join("chunks").join("d".repeat(64));
        std::fs::write(&old_chunk, "old format").unwrap();
        let report = collect(&store, "kiln", Duration::ZERO, None).await.unwrap();
        assert!(report.skipped_projects.is_empty(), "{report:?}");
        assert!(old_chunk.exists());
        std::fs::remove_file(&old_manifest).unwrap();
        collect(&store, "kiln", Duration::ZERO, None).await.unwrap();
        assert!(!old_chunk.exists());
    }
}
