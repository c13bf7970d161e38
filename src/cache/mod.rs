//! The build cache (GitLab's `cache:`): stored as content-defined chunks shared by a project's
//! keys and a small manifest per key ([`format`]), saved and restored by the agent
//! ([`archive`]) through a directory or URLs the coordinator pre-signs ([`remote`],
//! [`service`]), so no build ever holds a storage key; `kiln cache gc` removes chunks no
//! manifest needs ([`gc`]).

pub mod archive;
pub(crate) mod capability;
pub mod config;
pub mod format;
pub mod gc;
pub mod remote;
pub mod service;

pub use capability::CapabilityError;
pub use config::CacheConfig;
pub use remote::{CacheAccess, CacheGrant};
pub use service::CacheService;
