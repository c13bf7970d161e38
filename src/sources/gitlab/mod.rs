//! GitLab as a job source: the runner API client, registration, and the long-poll request loop.

pub mod api;
pub mod payload;
pub mod poller;
pub mod register;
pub mod report;
