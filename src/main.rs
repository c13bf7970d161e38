//! The `kiln` command line: parses arguments and calls into the library.

use clap::{Parser, Subcommand};

/// Self-hosted CI/CD runner autoscaler: one ephemeral pod (or process) per build.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator: take jobs from the configured CI servers and run each one.
    Run,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run => Ok(()),
    }
}
