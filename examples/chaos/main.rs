//! `cargo run --example chaos -- --seed 1 --seed 2 --seed 3`: the long chaos runs of
//! `docs/reliability.md` — by default 1,000 GitLab jobs on the Kubernetes test server with
//! concurrency 50, 20 % faults on both APIs and 10 SIGKILLs of the coordinator, 200 Jenkins
//! queue items the same way, then GitLab gone for 5 minutes and back. The short variants of the same scenarios run in `cargo test --test
//! chaos`. Uses `target/debug/kiln` (build it with `cargo build`) unless `KILN_BIN` is set.

use std::time::Duration;

use clap::Parser;

// The test servers and scenarios of `tests/support`, shared with the end-to-end tests.
#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/support/chaos.rs"]
mod chaos;
#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/support/faults.rs"]
mod faults;
#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/support/git_http.rs"]
mod git_http;
#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/support/gitlab.rs"]
mod gitlab;
#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/support/jenkins.rs"]
mod jenkins;
#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/support/kiln.rs"]
mod kiln;
#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/support/kube/mod.rs"]
mod kube;

/// The long chaos runs.
#[derive(Parser, Debug)]
struct Options {
    /// Seeds to run, each a full run of every chosen scenario (repeat the flag).
    #[arg(long = "seed", default_values_t = [1u64, 2, 3])]
    seeds: Vec<u64>,
    /// GitLab jobs per run.
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    /// kiln's `concurrent`.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Share of requests faulted on each API.
    #[arg(long, default_value_t = 0.2)]
    fault_rate: f64,
    /// SIGKILLs of the coordinator per run.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// How long a stalled request is held, seconds (past kiln's 30 s Kubernetes call timeout).
    #[arg(long, default_value_t = 40)]
    stall: u64,
    /// How long GitLab is gone in the outage scenario, seconds (0 skips it).
    #[arg(long, default_value_t = 300)]
    outage: u64,
    /// Jenkins queue items per run (0 skips the Jenkins scenario).
    #[arg(long, default_value_t = 200)]
    jenkins_items: usize,
    /// Skip the GitLab-on-Kubernetes scenario.
    #[arg(long)]
    no_jobs: bool,
}

#[tokio::main]
async fn main() {
    let options = Options::parse();
    for seed in &options.seeds {
        if !options.no_jobs {
            let outcome = chaos::gitlab_kubernetes(&chaos::GitLabChaos {
                seed: *seed,
                jobs: options.jobs,
                concurrency: options.concurrency,
                fault_rate: options.fault_rate,
                kills: options.kills,
                stall: Duration::from_secs(options.stall),
                deadline: Duration::from_secs(60 + options.jobs as u64 * 3),
            })
            .await;
            println!("{}", outcome.line());
        }
        if options.jenkins_items > 0 {
            let outcome = chaos::jenkins_kubernetes(&chaos::JenkinsChaos {
                seed: *seed,
                items: options.jenkins_items,
                concurrency: options.concurrency,
                fault_rate: options.fault_rate,
                kills: options.kills,
                stall: Duration::from_secs(options.stall),
                deadline: Duration::from_secs(60 + options.jenkins_items as u64 * 3),
            })
            .await;
            println!("{}", outcome.line());
        }
        if options.outage > 0 {
            let outcome = chaos::gitlab_outage(*seed, Duration::from_secs(options.outage)).await;
            println!(
                "gitlab-outage: seed {seed} outage {:?} requests {} per-minute {:.1} recovery {:.1}s",
                outcome.outage,
                outcome.requests,
                outcome.requests_per_minute,
                outcome.recovery.as_secs_f64()
            );
        }
    }
}
