//! `cargo run --release --example bench`: the coordinator benchmark of `docs/benchmarks.md`.
//!
//! Starts the GitLab test server with queued jobs, the Kubernetes test server (kubelet off: the
//! benchmark itself moves each pod to Running and then to "agent reported") and a real
//! `kiln run` (release build, `target/release/kiln` unless `--kiln PATH`), and prints dispatch
//! overhead, burst throughput, footprint, idle traffic, local executor start latency, the GitHub
//! Actions level (webhook → runner pod, API calls per job) and the status page's latency with a
//! full history (`--only-status` measures only that).

use clap::Parser;

mod harness;

// The test servers of `tests/support`, shared with the end-to-end tests.
#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/support/git_http.rs"]
mod git_http;
#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/support/gitlab.rs"]
mod gitlab_server;
#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/support/kube/mod.rs"]
mod kube_server;

// `github.rs` has child modules in `tests/support/github/`, which a `#[path]` module file
// would look for beside it; inside an inline module pointing at the directory they resolve.
#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/support"]
mod github_support {
    pub(crate) mod github;
}

/// The names `harness` uses, as in the tests' `support` module.
mod support {
    pub(crate) use super::github_support::github;
    pub(crate) use super::gitlab_server as gitlab;
    pub(crate) use super::kube_server as kube;
}

#[tokio::main]
async fn main() {
    let options = harness::Options::parse();
    if cfg!(debug_assertions) {
        eprintln!(
            "[bench] this benchmark binary is a debug build; the servers it runs are slower (build with --release)"
        );
    }
    if options.only_status {
        let kiln = options.kiln_path();
        assert!(
            kiln.exists(),
            "no kiln binary at {} (build it first: cargo build --release --bin kiln)",
            kiln.display()
        );
        println!("{}", harness::run_status(&options).await.render());
        return;
    }
    if options.only_github_org {
        println!(
            "{}",
            harness::render_github_org(&harness::run_github_org(&options).await)
        );
        return;
    }
    if options.only_warm {
        let kiln = options.kiln_path();
        assert!(
            kiln.exists(),
            "no kiln binary at {} (build it first: cargo build --release --bin kiln)",
            kiln.display()
        );
        println!(
            "{}",
            harness::render_warm(&harness::run_warm(&options).await)
        );
        return;
    }
    if options.only_failover {
        let kiln = options.kiln_path();
        assert!(
            kiln.exists(),
            "no kiln binary at {} (build it first: cargo build --release --bin kiln)",
            kiln.display()
        );
        let failover = harness::run_failover(&options).await;
        println!("{}", harness::render_failover(&options, &failover));
        return;
    }
    let report = harness::run(&options).await;
    println!("{}", report.render());
}
