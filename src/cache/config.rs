//! `[cache]`: where build caches are stored, laid out like gitlab-runner's `[runners.cache]` so
//! migrating users recognise it, and what the coordinator makes of it (an object store and a
//! URL signer).

use std::path::PathBuf;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::signer::Signer;
use serde::{Deserialize, Serialize};

use crate::problem::Problem;

/// Which storage holds the caches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheType {
    /// S3 or an S3-compatible service (AWS, Alibaba OSS, MinIO).
    S3,
    /// Google Cloud Storage.
    Gcs,
    /// Azure Blob Storage.
    Azure,
    /// A directory the builds can reach (local executor, `kiln exec`).
    #[default]
    Local,
}

/// `[cache]`. Absent: builds have no cache and GitLab is not told kiln supports one.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// `s3`, `gcs`, `azure` or `local`.
    #[serde(rename = "type")]
    pub kind: CacheType,
    /// A prefix inside the bucket (or directory).
    pub path: String,
    /// All runners of this kiln share caches (else each runner has its own).
    pub shared: bool,
    /// A cache larger than this (before compression) is not saved: `"5GiB"`, `"500MiB"`.
    pub max_size: Option<String>,
    /// Where builds reach the coordinator for their signed URLs (`http://kiln.ci.svc:8080`);
    /// default: `http.listen` on the loopback interface (the local executor).
    pub coordinator_url: Option<String>,
    /// S3 and S3-compatible services.
    pub s3: Option<S3Config>,
    /// Google Cloud Storage.
    pub gcs: Option<GcsConfig>,
    /// Azure Blob Storage.
    pub azure: Option<AzureConfig>,
    /// A local directory.
    pub local: Option<LocalCacheConfig>,
}

/// `[cache.s3]`. `Debug` shows no secret key.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Host (and port) of the service; empty: AWS.
    pub server_address: String,
    /// The bucket.
    pub bucket_name: String,
    /// The region.
    pub bucket_location: String,
    /// The access key id.
    pub access_key: String,
    /// The secret key; it signs URLs and never leaves the coordinator.
    pub secret_key: String,
    /// Plain HTTP (a local MinIO).
    pub insecure: bool,
}

/// `[cache.gcs]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcsConfig {
    /// The bucket.
    pub bucket_name: String,
    /// A service account's JSON key file (signing URLs needs its private key).
    pub credentials_file: String,
}

/// `[cache.azure]`. `Debug` shows no account key.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AzureConfig {
    /// The storage account.
    pub account_name: String,
    /// Its key; it signs SAS URLs and never leaves the coordinator.
    pub account_key: String,
    /// The container.
    pub container_name: String,
    /// `blob.core.windows.net` unless another cloud; an `http://host:port` URL for a local
    /// emulator (Azurite).
    pub storage_domain: String,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("server_address", &self.server_address)
            .field("bucket_name", &self.bucket_name)
            .field("bucket_location", &self.bucket_location)
            .field("access_key", &self.access_key)
            .field("secret_key", &"[redacted]")
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl std::fmt::Debug for AzureConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureConfig")
            .field("account_name", &self.account_name)
            .field("account_key", &"[redacted]")
            .field("container_name", &self.container_name)
            .field("storage_domain", &self.storage_domain)
            .finish()
    }
}

/// `[cache.local]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalCacheConfig {
    /// The directory.
    pub dir: PathBuf,
}

/// The default `max_size`.
pub const DEFAULT_MAX_SIZE: u64 = 5 << 30;

/// Why the cache's storage cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The object store client could not be built.
    #[error("cache.{kind}: {source}")]
    Build {
        /// `s3`, `gcs` or `azure`.
        kind: &'static str,
        /// What object_store said.
        #[source]
        source: object_store::Error,
    },
    /// The local directory cannot be used.
    #[error("cache.local.dir: {source}")]
    Local {
        /// What object_store said.
        #[source]
        source: object_store::Error,
    },
}

/// The coordinator's handle on remote storage: a client to list and delete (`kiln cache gc`)
/// and a signer for builds' URLs.
#[derive(Debug, Clone)]
pub struct Storage {
    /// Lists, reads and deletes.
    pub store: Arc<dyn ObjectStore>,
    /// Pre-signs URLs.
    pub signer: Arc<dyn Signer>,
}

impl CacheConfig {
    /// `max_size` in bytes.
    pub fn max_size_bytes(&self) -> u64 {
        self.max_size
            .as_deref()
            .and_then(|s| parse_size(s).ok())
            .unwrap_or(DEFAULT_MAX_SIZE)
    }

    /// The secret the storage is accessed with, from which capabilities' key is derived;
    /// `None` for a local directory.
    pub(crate) fn secret(&self) -> Option<Vec<u8>> {
        match self.kind {
            CacheType::S3 => self.s3.as_ref().map(|s| s.secret_key.as_bytes().to_vec()),
            CacheType::Azure => self
                .azure
                .as_ref()
                .map(|a| a.account_key.as_bytes().to_vec()),
            CacheType::Gcs => self
                .gcs
                .as_ref()
                .and_then(|g| std::fs::read(&g.credentials_file).ok()),
            CacheType::Local => None,
        }
    }

    /// The secrets of `[cache]`, for masking.
    pub(crate) fn secrets_mut(&mut self) -> impl Iterator<Item = &mut String> {
        self.s3
            .iter_mut()
            .map(|s| &mut s.secret_key)
            .chain(self.azure.iter_mut().map(|a| &mut a.account_key))
    }

    /// The object store of any type, for `kiln cache gc`.
    ///
    /// # Errors
    /// As [`CacheConfig::storage`]; a local directory that does not exist.
    pub fn object_store(&self) -> Result<Arc<dyn ObjectStore>, StorageError> {
        match (&self.kind, &self.local) {
            (CacheType::Local, local) => {
                let dir = local.as_ref().map(|l| l.dir.clone()).unwrap_or_default();
                let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|source| StorageError::Local { source })?;
                Ok(Arc::new(store))
            }
            _ => self.storage().map(|s| s.store),
        }
    }

    /// The object store and signer of a remote type.
    ///
    /// # Errors
    /// A local type (it has no signer), or settings object_store refuses (a bad endpoint, an
    /// unreadable key).
    pub fn storage(&self) -> Result<Storage, StorageError> {
        match self.kind {
            CacheType::Local => Err(StorageError::Local {
                source: object_store::Error::NotSupported {
                    source: "a local directory has no URLs to sign".into(),
                },
            }),
            CacheType::S3 => {
                let s3 = self.s3.clone().unwrap_or_default();
                let mut builder = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(&s3.bucket_name)
                    .with_access_key_id(&s3.access_key)
                    .with_secret_access_key(&s3.secret_key)
                    .with_region(if s3.bucket_location.is_empty() {
                        "us-east-1"
                    } else {
                        &s3.bucket_location
                    })
                    .with_allow_http(s3.insecure);
                if !s3.server_address.is_empty() {
                    let scheme = if s3.insecure { "http" } else { "https" };
                    builder = builder.with_endpoint(format!("{scheme}://{}", s3.server_address));
                }
                let store = Arc::new(
                    builder
                        .build()
                        .map_err(|source| StorageError::Build { kind: "s3", source })?,
                );
                Ok(Storage {
                    store: store.clone(),
                    signer: store,
                })
            }
            CacheType::Gcs => {
                let gcs = self.gcs.clone().unwrap_or_default();
                let store = Arc::new(
                    object_store::gcp::GoogleCloudStorageBuilder::new()
                        .with_bucket_name(&gcs.bucket_name)
                        .with_service_account_path(&gcs.credentials_file)
                        .build()
                        .map_err(|source| StorageError::Build {
                            kind: "gcs",
                            source,
                        })?,
                );
                Ok(Storage {
                    store: store.clone(),
                    signer: store,
                })
            }
            CacheType::Azure => {
                let azure = self.azure.clone().unwrap_or_default();
                let mut builder = object_store::azure::MicrosoftAzureBuilder::new()
                    .with_account(&azure.account_name)
                    .with_access_key(&azure.account_key)
                    .with_container_name(&azure.container_name);
                if azure.storage_domain.starts_with("http://")
                    || azure.storage_domain.starts_with("https://")
                {
                    builder = builder
                        .with_endpoint(azure.storage_domain.clone())
                        .with_allow_http(azure.storage_domain.starts_with("http://"));
                } else if !azure.storage_domain.is_empty() {
                    builder = builder.with_endpoint(format!(
                        "https://{}.{}",
                        azure.account_name, azure.storage_domain
                    ));
                }
                let store = Arc::new(builder.build().map_err(|source| StorageError::Build {
                    kind: "azure",
                    source,
                })?);
                Ok(Storage {
                    store: store.clone(),
                    signer: store,
                })
            }
        }
    }

    /// Every problem of `[cache]`; `kubernetes` when builds run in pods, which cannot reach
    /// a directory of the coordinator's.
    pub(crate) fn problems(&self, kubernetes: bool) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut missing = |path: &str, value: &str, why: &str| {
            if value.trim().is_empty() {
                problems.push(Problem::new(path, format!("is required ({why})")));
            }
        };
        match self.kind {
            CacheType::S3 => match &self.s3 {
                None => missing("cache.s3", "", "type = \"s3\" needs a [cache.s3] table"),
                Some(s3) => {
                    missing("cache.s3.bucket_name", &s3.bucket_name, "the bucket");
                    missing("cache.s3.access_key", &s3.access_key, "the access key id");
                    missing(
                        "cache.s3.secret_key",
                        &s3.secret_key,
                        "the coordinator signs builds' URLs with it",
                    );
                }
            },
            CacheType::Gcs => match &self.gcs {
                None => missing("cache.gcs", "", "type = \"gcs\" needs a [cache.gcs] table"),
                Some(gcs) => {
                    missing("cache.gcs.bucket_name", &gcs.bucket_name, "the bucket");
                    missing(
                        "cache.gcs.credentials_file",
                        &gcs.credentials_file,
                        "a service account key signs builds' URLs",
                    );
                }
            },
            CacheType::Azure => match &self.azure {
                None => missing(
                    "cache.azure",
                    "",
                    "type = \"azure\" needs a [cache.azure] table",
                ),
                Some(azure) => {
                    missing(
                        "cache.azure.account_name",
                        &azure.account_name,
                        "the account",
                    );
                    missing(
                        "cache.azure.account_key",
                        &azure.account_key,
                        "the coordinator signs builds' SAS URLs with it",
                    );
                    missing(
                        "cache.azure.container_name",
                        &azure.container_name,
                        "the container",
                    );
                }
            },
            CacheType::Local => match &self.local {
                None => missing(
                    "cache.local.dir",
                    "",
                    "type = \"local\" needs [cache.local] dir",
                ),
                Some(local) => {
                    if !local.dir.is_absolute() {
                        problems.push(Problem::new("cache.local.dir", "must be an absolute path"));
                    }
                    if kubernetes {
                        problems.push(Problem::new(
                            "cache.type",
                            "\"local\" does not work with the Kubernetes executor (build pods cannot reach the coordinator's directory); use s3, gcs or azure",
                        ));
                    }
                }
            },
        }
        if let Some(size) = &self.max_size
            && let Err(message) = parse_size(size)
        {
            problems.push(Problem::new("cache.max_size", message));
        }
        if let Some(url) = &self.coordinator_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            problems.push(Problem::new(
                "cache.coordinator_url",
                "must be an http:// or https:// URL",
            ));
        }
        if self.path.split('/').any(|s| s == "..") {
            problems.push(Problem::new("cache.path", "must not contain `..`"));
        }
        problems
    }
}

/// Parses `5GiB`, `500MiB`, `100MB`, `1024` (bytes).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. \"5GiB\", \"500MiB\")"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}` (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ));
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_binary_and_decimal_units() {
        assert_eq!(parse_size("5GiB"), Ok(5 << 30));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("GiB").is_err());
    }

    #[test]
    fn every_missing_s3_field_is_named() {
        let config = CacheConfig {
            kind: CacheType::S3,
            s3: Some(S3Config::default()),
            max_size: Some("lots".into()),
            ..CacheConfig::default()
        };
        let paths: Vec<String> = config.problems(false).into_iter().map(|p| p.path).collect();
        assert_eq!(
            paths,
            [
                "cache.s3.bucket_name",
                "cache.s3.access_key",
                "cache.s3.secret_key",
                "cache.max_size"
            ]
        );
    }
}
