//! Test servers and helpers shared by the end-to-end tests.
#![allow(dead_code, unreachable_pub)]

pub mod azure;
pub mod chaos;
pub mod faults;
pub mod git_http;
pub mod github;
pub mod gitlab;
pub mod jenkins;
pub mod kiln;
pub mod knative;
pub mod kube;
pub mod s3;
pub mod sae;
pub mod tools;
