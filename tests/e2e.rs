//! kiln's end-to-end tests in one test binary, one module per area, so the test servers in
//! `support/` compile and link once instead of once per area.
//!
//! Run one area with `cargo test --test e2e AREA::`, e.g. `cargo test --test e2e replicas::`.

mod support;

mod bench_smoke;
mod cache;
mod chaos;
mod cli;
mod deploy_knative;
mod deploy_sae;
mod exec;
mod github_runners;
mod github_scale;
mod github_server;
mod gitlab_jobs;
mod gitlab_mock;
mod gitlab_parity;
mod gitlab_server;
mod hardening;
mod helm_chart;
mod hostile_input;
mod hostile_jobs;
mod jenkins_agents;
mod jenkins_local;
mod jenkins_server;
mod kube_server;
mod kubernetes_gitlab_compat;
mod kubernetes_jobs;
mod kubernetes_namespace_overwrite;
mod pipeline_reader;
mod pipelines;
mod replicas;
mod secrets;
mod shutdown;
mod status_page;
mod warm_pods;
mod warm_pools_chain;
mod warm_pools_sources;
