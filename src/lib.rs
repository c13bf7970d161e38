//! kiln: a self-hosted CI/CD runner autoscaler. One small coordinator takes jobs from CI servers
//! and starts one ephemeral pod (or local process) per build.
//!
//! The binary (`src/main.rs`) only parses arguments; everything it runs lives here, laid out as
//! the data flow: `sources` → `coordinator` → `executor`, with `agent` running inside each build.
//! What the two ends of a build share is a contract of its own: `build` (the source-neutral
//! model), `job_file` (what the agent is handed) and `gitlab` (GitLab's runner protocol).

pub mod agent;
pub mod build;
pub mod cache;
pub mod config;
pub mod coordinator;
pub mod deploy;
pub mod exec;
pub mod executor;
pub mod gitlab;
pub mod handoff;
pub mod http;
pub mod job_file;
pub mod net;
pub mod pipeline;
pub mod problem;
pub mod sources;
pub mod telemetry;
pub mod variables;

/// kiln's version, as reported to CI servers and in `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
