//! Job sources: each knows only its CI server — how to discover work, claim it, and report a
//! failure the build could not report itself.

pub mod gitlab;
pub mod jenkins;
mod pacer;
