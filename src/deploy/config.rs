//! Defaults for `kiln deploy` that a config file's `[deploy]` table may set.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Deploy defaults. Every field is optional in the file; a flag or its environment variable
/// wins over the file, and the file wins over the built-in default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeployConfig {
    /// Alibaba Cloud region (`cn-hangzhou`), used for SAE, OSS and the OSS V4 signing scope.
    pub region: Option<String>,
    /// SAE OpenAPI endpoint; default `https://sae.<region>.aliyuncs.com`.
    pub sae_endpoint: Option<String>,
    /// OSS bucket that receives jar and war uploads.
    pub oss_bucket: Option<String>,
    /// Key prefix inside the bucket.
    pub oss_prefix: String,
    /// OSS endpoint; default `https://oss-<region>.aliyuncs.com`.
    pub oss_endpoint: Option<String>,
    /// How long the signed download URL handed to SAE stays valid.
    #[serde(with = "humantime_serde")]
    pub url_ttl: Duration,
    /// Files larger than this many bytes are uploaded in parts.
    pub multipart_threshold: u64,
    /// Size of each part of a multipart upload, in bytes (OSS needs at least 100 KiB).
    pub part_size: u64,
}

impl Default for DeployConfig {
    fn default() -> Self {
        Self {
            region: None,
            sae_endpoint: None,
            oss_bucket: None,
            oss_prefix: "kiln-deploy".to_owned(),
            oss_endpoint: None,
            url_ttl: Duration::from_secs(30 * 60),
            multipart_threshold: 64 * 1024 * 1024,
            part_size: 16 * 1024 * 1024,
        }
    }
}

/// Errors while reading the config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}; check --config / KILN_CONFIG")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or its `[deploy]` table has an unknown or mistyped key.
    #[error("config file {path} has an invalid [deploy] table")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the key's path.
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("config file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Only the `[deploy]` table matters here; the rest of the file belongs to other commands.
#[derive(Deserialize)]
struct FileWithDeploy {
    #[serde(default)]
    deploy: DeployConfig,
}

impl DeployConfig {
    /// Reads the `[deploy]` table of a TOML file; a file without one gives the defaults.
    ///
    /// # Errors
    /// [`ConfigError`] when the file cannot be read, is not TOML, has an unknown key in
    /// `[deploy]`, or sets a part size below OSS's minimum.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: FileWithDeploy = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let config = file.deploy;
        if config.part_size < 100 * 1024 {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: "deploy.part_size must be at least 102400 bytes (OSS's minimum part)"
                    .to_owned(),
            });
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_deploy_table_and_ignores_other_tables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(
            &path,
            "[gitlab]\nurl = \"x\"\n[deploy]\nregion = \"cn-shanghai\"\noss_bucket = \"b\"\nurl_ttl = \"10m\"\n",
        )
        .unwrap();
        let c = DeployConfig::load(&path).unwrap();
        assert_eq!(c.region.as_deref(), Some("cn-shanghai"));
        assert_eq!(c.oss_bucket.as_deref(), Some("b"));
        assert_eq!(c.url_ttl, Duration::from_secs(600));
        assert_eq!(c.oss_prefix, "kiln-deploy");
    }

    #[test]
    fn a_typo_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, "[deploy]\nregoin = \"cn-shanghai\"\n").unwrap();
        let err = DeployConfig::load(&path).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
    }
}
