//! GitLab's runner protocol, as a leaf both ends of a GitLab job use: the job payload GitLab
//! hands a runner, the job API client (`jobs/request`, updates, trace, artifacts) and the
//! registration calls. The GitLab source claims and fails jobs with it, the agent runs and
//! reports them with it, and `kiln exec`'s embedded server speaks it; it knows none of them.

pub mod api;
#[cfg(test)]
mod features_served;
pub mod payload;
pub mod register;
