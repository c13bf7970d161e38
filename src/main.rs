//! The `kiln` command line: parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use kiln::config::{self, Config};
use kiln::sources::gitlab::command as runner;

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
    Run(RunArgs),
    /// Run one job inside its build (started by an executor, not by hand).
    Agent(AgentArgs),
    /// Register kiln as a GitLab runner and store its token in the config file.
    Register(RegisterCommand),
    /// Remove this runner manager (or the whole runner) from GitLab and the config file.
    Unregister(UnregisterCommand),
    /// Check that every configured runner token is accepted by its GitLab.
    Verify(ConfigArg),
    /// Validate a config file and print every problem with its path.
    CheckConfig(CheckConfigArgs),
    /// Run the jobs of a .gitlab-ci.yml locally through the same agent, no GitLab needed.
    Exec(ExecArgs),
    /// Deploy a jar, war or image to Alibaba SAE or Knative and wait for the rollout.
    Deploy(kiln::deploy::DeployCommand),
    /// Manage the build cache (`[cache]`).
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Start a local build in a session of its own, as its user (started by the local
    /// executor, not by hand).
    #[command(hide = true)]
    Sandbox(SandboxArgs),
}

#[derive(Debug, Args)]
struct SandboxArgs {
    /// Run as this `uid:gid` (kiln must be root).
    #[arg(long)]
    user: Option<String>,
    /// The program.
    program: String,
    /// Its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// `kiln sandbox`: returns only when the build could not be started.
fn sandbox(args: SandboxArgs) -> ExitCode {
    use kiln::executor::sandbox::{BuildUser, Failure, exec};
    let failure = match args.user.as_deref().map(BuildUser::resolve).transpose() {
        Ok(user) => exec(user, &args.program, &args.args),
        Err(why) => Failure::Other(why),
    };
    failure.report();
    ExitCode::from(u8::try_from(failure.code()).unwrap_or(1))
}

#[derive(Debug, Args)]
struct ExecArgs {
    /// The pipeline file; its directory is the project the jobs run in.
    #[arg(default_value = ".gitlab-ci.yml")]
    file: PathBuf,
    /// Run only this job (repeatable) and, first, the jobs it needs (transitively); manual
    /// jobs run only when named here or needed by a named job.
    #[arg(long = "job", value_name = "NAME")]
    jobs: Vec<String>,
    /// With --job: run only the named jobs, not the jobs they need.
    #[arg(long, requires = "jobs")]
    no_needs: bool,
    /// Run the jobs even when workflow:rules say GitLab would create no pipeline.
    #[arg(long)]
    ignore_workflow: bool,
    /// Run only the jobs of this stage.
    #[arg(long, value_name = "S")]
    stage: Option<String>,
    /// Set a variable, as a pipeline variable in GitLab (repeatable); `rules:if` sees it too.
    #[arg(long = "var", value_name = "K=V", value_parser = parse_var)]
    vars: Vec<(String, String)>,
    /// Where the jobs run.
    #[arg(long, value_enum, default_value = "local")]
    executor: ExecExecutor,
    /// How many jobs run at once (default: the number of CPUs).
    #[arg(long, value_name = "N")]
    concurrency: Option<usize>,
    /// Keep each job's work directory (printed at the end) for inspection.
    #[arg(long)]
    keep_work_dirs: bool,
    /// Where jobs' `cache:` is kept between runs (default: ~/.cache/kiln/exec-cache, or under
    /// $XDG_CACHE_HOME).
    #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
    cache_dir: Option<PathBuf>,
    /// Neither restore nor save `cache:`.
    #[arg(long)]
    no_cache: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ExecExecutor {
    /// Child processes on this machine.
    Local,
    /// Pods in a Kubernetes cluster.
    Kubernetes,
}

fn parse_var(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}

#[derive(Debug, Args)]
struct ConfigArg {
    /// The config file (TOML). Every field can also be set with KILN_… variables.
    #[arg(long, short, env = config::CONFIG_ENV)]
    config: Option<PathBuf>,
}

/// `kiln cache …`.
#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Delete the chunks no cache manifest needs (and, with --max-age, caches nobody saved
    /// for that long). Run it now and then, e.g. from a daily CronJob.
    Gc(CacheGcArgs),
}

#[derive(Debug, Args)]
struct CacheGcArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Delete caches (manifests) not saved for this long, e.g. `30d`; default: keep them.
    #[arg(long, value_parser = humantime::parse_duration)]
    max_age: Option<std::time::Duration>,
    /// Keep unreferenced chunks younger than this: a save in progress uploads its chunks
    /// before its manifest.
    #[arg(long, default_value = "1d", value_parser = humantime::parse_duration)]
    grace: std::time::Duration,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
}

#[derive(Debug, Args)]
#[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
struct AgentArgs {
    #[command(subcommand)]
    command: Option<AgentCommand>,
    /// The job file the executor wrote.
    #[arg(long, required = true)]
    job: Option<PathBuf>,
    /// Scratch directory (temporary files, step state); default: the job file's directory.
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Where projects are checked out; default: <work dir>/builds.
    #[arg(long, value_name = "DIR")]
    builds_dir: Option<PathBuf>,
    /// Where to write the result JSON; default: <work dir>/result.json.
    #[arg(long, value_name = "FILE")]
    result: Option<PathBuf>,
    /// Wait for the job file and the fetched sources to appear (a warm pod's build container:
    /// its job is handed over later).
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Init-container step of a build pod: install this binary for the build container and
    /// fetch the job's sources.
    Prepare(PrepareArgs),
    /// Init-container step of a warm pod: install this binary for the build container.
    Install(InstallArgs),
    /// A warm pod's handoff container: wait at $POD_IP for the pod's job (sealed with the
    /// pod's key), write its files for the build container and fetch its sources.
    Receive(ReceiveArgs),
}

#[derive(Debug, Args)]
struct InstallArgs {
    /// Where to install the kiln binary for the build container.
    #[arg(long, value_name = "DIR")]
    bin_dir: PathBuf,
}

#[derive(Debug, Args)]
struct ReceiveArgs {
    /// The pod's hand-off key (mounted from its Secret).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Where to write the job's files (shared with the build container).
    #[arg(long, value_name = "DIR")]
    job_dir: PathBuf,
    /// Scratch directory shared with the build container.
    #[arg(long, value_name = "DIR")]
    work_dir: PathBuf,
    /// Where projects are checked out; default: <work dir>/builds.
    #[arg(long, value_name = "DIR")]
    builds_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct PrepareArgs {
    /// The job file (mounted from the job's Secret).
    #[arg(long)]
    job: PathBuf,
    /// Scratch directory shared with the build container.
    #[arg(long, value_name = "DIR")]
    work_dir: PathBuf,
    /// Where projects are checked out; default: <work dir>/builds.
    #[arg(long, value_name = "DIR")]
    builds_dir: Option<PathBuf>,
    /// Where to install the kiln binary for the build container.
    #[arg(long, value_name = "DIR")]
    bin_dir: PathBuf,
}

#[derive(Debug, Args)]
struct CheckConfigArgs {
    /// The config file to check (default: $KILN_CONFIG).
    #[arg(env = config::CONFIG_ENV)]
    file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RegisterCommand {
    /// The config file to add the runner to (created if missing).
    #[arg(long, short, env = config::CONFIG_ENV, default_value = "kiln.toml")]
    config: PathBuf,
    #[command(flatten)]
    runner: runner::RegisterArgs,
}

#[derive(Debug, Args)]
struct UnregisterCommand {
    /// The config file holding the runner.
    #[arg(long, short, env = config::CONFIG_ENV, default_value = "kiln.toml")]
    config: PathBuf,
    #[command(flatten)]
    runner: runner::UnregisterArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread exists: the sandbox changes its user and replaces itself.
    let cli = match cli.command {
        Command::Sandbox(args) => return sandbox(args),
        command => Cli { command },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            report(&format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    };
    kiln::telemetry::flush_logs();
    code
}

/// Prints a line on stderr; a closed stderr is no reason to crash on the way out.
fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => run(args).await,
        Command::Agent(args) => agent(args).await,
        Command::Register(args) => register(args).await,
        Command::Unregister(args) => unregister(args).await,
        Command::Verify(args) => verify(args).await,
        Command::CheckConfig(args) => check_config(args),
        Command::Exec(args) => exec(args).await,
        Command::Deploy(command) => deploy(command).await,
        Command::Cache(CacheCommand::Gc(args)) => cache_gc(args).await,
        Command::Sandbox(_) => Ok(ExitCode::FAILURE),
    }
}

/// Cancelled on the first SIGTERM or SIGINT.
fn shutdown_on_signal() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let trigger = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        trigger.cancel();
    });
    Ok(token)
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(args.config.config.as_deref())?;
    kiln::telemetry::init_logging(config.log.format, &config.log.level);
    if let Some(warning) = args
        .config
        .config
        .as_deref()
        .and_then(|p| config.exposure_warning(p))
    {
        tracing::warn!("{warning}");
    }
    if let Some(problem) = config.no_sources() {
        bail!("{}", problem.message);
    }
    let metrics = kiln::telemetry::Metrics::new();
    let shutdown = shutdown_on_signal()?;
    let executor: Arc<dyn kiln::executor::Executor> = match config.executor {
        kiln::config::ExecutorKind::Local => {
            let agent =
                std::env::current_exe().context("cannot find the kiln binary for the agent")?;
            let local = kiln::executor::local::LocalExecutor::new(agent, &config.local);
            local.describe_isolation();
            Arc::new(local)
        }
        kiln::config::ExecutorKind::Kubernetes => Arc::new(
            kiln::executor::kubernetes::KubernetesExecutor::connect(
                &config.kubernetes,
                shutdown.clone(),
            )
            .await
            .context("cannot start the Kubernetes executor")?,
        ),
    };
    let cache = config
        .cache
        .as_ref()
        .map(|c| kiln::cache::CacheService::new(c, config.http.listen))
        .transpose()
        .context("cannot set up the build cache ([cache])")?
        .map(Arc::new);
    let info = kiln::sources::ExecutorInfo {
        name: executor.name(),
        runs_images: executor.runs_images(),
        cache: cache.clone(),
    };
    let mut sources: Vec<Arc<dyn kiln::sources::Source>> = Vec::new();
    let fingerprints = config.credential_fingerprints();
    for (index, runner) in config.sources.gitlab.iter().enumerate() {
        let source = kiln::sources::gitlab::GitLabSource::new(
            runner,
            index,
            &config.agent,
            info.clone(),
            Arc::clone(&metrics),
        )
        .with_context(|| format!("sources.gitlab[{index}]"))?
        .masking(fingerprints.clone());
        sources.push(Arc::new(source));
    }
    let mut jenkins_hooks = Vec::new();
    for (index, entry) in config.sources.jenkins.iter().enumerate() {
        let source = kiln::sources::jenkins::JenkinsSource::new(entry, index, Arc::clone(&metrics))
            .with_context(|| format!("sources.jenkins[{index}]"))?;
        jenkins_hooks.push(source.waker());
        sources.push(Arc::new(source));
    }
    let mut github_hooks = Vec::new();
    for (index, entry) in config.sources.github.iter().enumerate() {
        let source = Arc::new(kiln::sources::github::GitHubSource::new(
            entry,
            index,
            Arc::clone(&metrics),
        ));
        github_hooks.push(source.hook());
        sources.push(source);
    }
    let http = config.http.clone();
    let settings = kiln::coordinator::Settings {
        concurrent: config.concurrent,
        shutdown_timeout: config.shutdown_timeout,
        history: config.status.history,
        prices: config.cost.prices(),
        leases: kiln::coordinator::LeaseTiming {
            duration: config.kubernetes.lease_duration,
            renew: config.kubernetes.lease_renew,
        },
    };
    let coordinator =
        kiln::coordinator::Coordinator::new(settings, Arc::clone(&metrics), executor, sources)
            .warm_pools(&config.warm_settings(), &metrics);
    let app_state = kiln::http::AppState {
        metrics,
        status: coordinator.status(),
        jenkins_hooks,
        github_hooks,
        body_timeout: http.body_timeout,
        status_page: kiln::http::StatusPage {
            access: kiln::http::StatusAccess {
                token: config.status.token.clone(),
            },
            refresh: config.status.refresh,
            currency: config.cost.currency.clone(),
        },
    };
    let mut app = kiln::http::router(app_state.clone());
    if let Some(cache) = &cache {
        app = app.merge(kiln::cache::service::router(Arc::clone(cache)));
    }
    let listener = tokio::net::TcpListener::bind(http.listen)
        .await
        .with_context(|| format!("cannot listen on {} (http.listen)", http.listen))?;
    tracing::info!(address = %listener.local_addr().unwrap_or(http.listen), "HTTP server listening");
    let limits = kiln::http::ServeLimits {
        max_connections: http.max_connections,
        max_connections_per_peer: http.max_connections_per_peer,
        header_timeout: http.header_timeout,
        shutdown_grace: http.shutdown_grace,
    };
    let probe_server = match http.probe_listen {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address} (http.probe_listen)"))?;
            tracing::info!(%address, "probe server listening (/healthz, /readyz)");
            // Probes send one small request every few seconds: few connections, short waits.
            let limits = kiln::http::ServeLimits {
                max_connections: 32,
                max_connections_per_peer: 8,
                header_timeout: std::time::Duration::from_secs(2),
                shutdown_grace: http.shutdown_grace,
            };
            let app = kiln::http::probe_router(app_state.clone());
            Some(tokio::spawn(kiln::http::serve(
                listener,
                app,
                limits,
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let server = tokio::spawn(kiln::http::serve(listener, app, limits, shutdown.clone()));
    coordinator.run(shutdown.clone()).await;
    shutdown.cancel();
    server.await.context("HTTP server task failed")?;
    if let Some(probe_server) = probe_server {
        probe_server.await.context("probe server task failed")?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    kiln::telemetry::init_logging(kiln::config::LogFormat::Auto, "info");
    match args.command {
        Some(AgentCommand::Prepare(prepare)) => {
            let paths = kiln::agent::AgentPaths {
                job_file: prepare.job,
                work_dir: Some(prepare.work_dir),
                builds_dir: prepare.builds_dir,
                result_file: None,
            };
            kiln::agent::prepare(&paths, &prepare.bin_dir).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(AgentCommand::Install(install)) => {
            kiln::agent::install(&install.bin_dir)?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(AgentCommand::Receive(receive)) => {
            let paths = kiln::agent::ReceivePaths {
                key_file: receive.key,
                job_dir: receive.job_dir,
                work_dir: receive.work_dir,
                builds_dir: receive.builds_dir,
            };
            kiln::agent::receive(&paths, shutdown_on_signal()?).await?;
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    let Some(job) = args.job else {
        bail!("`kiln agent` needs --job FILE");
    };
    let paths = kiln::agent::AgentPaths {
        job_file: job,
        work_dir: args.work_dir,
        builds_dir: args.builds_dir,
        result_file: args.result,
    };
    let abort = shutdown_on_signal()?;
    if args.wait && !kiln::agent::wait_for_job(&paths, &abort).await {
        // Deleted while it waited: there is no job to report.
        return Ok(ExitCode::SUCCESS);
    }
    let result = kiln::agent::run(&paths, abort).await?;
    Ok(if result.reported {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

async fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    if args.executor == ExecExecutor::Kubernetes {
        bail!(
            "`kiln exec` cannot use the Kubernetes executor: build pods cannot reach the job server it runs on this machine; use `--executor local`, or run jobs as pods with `kiln run` and executor = \"kubernetes\""
        );
    }
    kiln::telemetry::init_logging(kiln::config::LogFormat::Pretty, "warn");
    let agent = std::env::current_exe().context("cannot find the kiln binary for the agent")?;
    let concurrency = args.concurrency.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
    });
    let options = kiln::exec::ExecOptions {
        file: args.file,
        jobs: args.jobs,
        no_needs: args.no_needs,
        ignore_workflow: args.ignore_workflow,
        stage: args.stage,
        vars: args.vars,
        concurrency,
        keep_work_dirs: args.keep_work_dirs,
        agent,
        cache_dir: if args.no_cache {
            None
        } else {
            args.cache_dir.or_else(kiln::exec::default_cache_dir)
        },
    };
    let cancel = shutdown_on_signal()?;
    let outcome = match kiln::exec::run(options, cancel).await {
        Ok(outcome) => outcome,
        Err(kiln::exec::ExecError::Interrupted) => {
            eprintln!("interrupted");
            // A file read still blocked on a thread must not keep the process alive.
            std::process::exit(130);
        }
        Err(e) => return Err(e.into()),
    };
    Ok(if outcome.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn register(args: RegisterCommand) -> anyhow::Result<ExitCode> {
    // The file's own entries (no environment overrides, no error if there is no file yet):
    // re-registering one of them keeps its system id.
    let saved = Config::load_with_env(Some(&args.config), std::iter::empty())
        .map(|config| config.sources.gitlab)
        .unwrap_or_default();
    runner::register(&args.config, &args.runner, &saved).await?;
    Ok(ExitCode::SUCCESS)
}

async fn unregister(args: UnregisterCommand) -> anyhow::Result<ExitCode> {
    let config = Config::load(Some(&args.config))?;
    runner::unregister(&args.config, &args.runner, &config.sources.gitlab).await?;
    Ok(ExitCode::SUCCESS)
}

async fn verify(args: ConfigArg) -> anyhow::Result<ExitCode> {
    let config = Config::load(args.config.as_deref())?;
    Ok(if runner::verify(&config.sources.gitlab).await? {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn cache_gc(args: CacheGcArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(args.config.config.as_deref())?;
    let Some(cache) = &config.cache else {
        anyhow::bail!("no [cache] in the configuration: nothing to collect");
    };
    let store = cache
        .object_store()
        .context("cannot open the cache storage")?;
    let report = kiln::cache::gc::collect(store.as_ref(), &cache.path, args.grace, args.max_age)
        .await
        .context("cache garbage collection failed")?;
    println!(
        "{} projects: kept {} caches and {} packs; deleted {} caches and {} packs ({} bytes)",
        report.projects,
        report.manifests,
        report.packs,
        report.deleted_manifests,
        report.deleted_packs,
        report.deleted_bytes
    );
    for project in &report.skipped_projects {
        println!("left {project} alone: it has a cache written by another kiln version");
    }
    Ok(ExitCode::SUCCESS)
}

async fn deploy(command: kiln::deploy::DeployCommand) -> anyhow::Result<ExitCode> {
    kiln::telemetry::init_logging(kiln::config::LogFormat::Pretty, "warn");
    match kiln::deploy::run(command).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            // The exit code tells a pipeline why: rollout failed, timed out, app busy, ….
            let code = u8::try_from(e.exit_code()).unwrap_or(1);
            eprintln!("error: {:#}", anyhow::Error::new(e));
            Ok(ExitCode::from(code))
        }
    }
}

fn check_config(args: CheckConfigArgs) -> anyhow::Result<ExitCode> {
    let origin = args
        .file
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "environment".into());
    match Config::load(args.file.as_deref()) {
        Ok(config) => {
            // A config that parses but has no source makes `kiln run` refuse to start.
            if let Some(problem) = config.no_sources() {
                eprintln!("{origin} has 1 problem(s):\n  {problem}");
                return Ok(ExitCode::FAILURE);
            }
            if let Some(warning) = args
                .file
                .as_deref()
                .and_then(|p| config.exposure_warning(p))
            {
                eprintln!("warning: {warning}");
            }
            let mut sources = vec![format!("{} GitLab runner(s)", config.sources.gitlab.len())];
            if !config.sources.jenkins.is_empty() {
                sources.push(format!(
                    "{} Jenkins controller(s)",
                    config.sources.jenkins.len()
                ));
            }
            if !config.sources.github.is_empty() {
                sources.push(format!("{} GitHub source(s)", config.sources.github.len()));
            }
            println!(
                "{origin}: ok ({}, concurrent = {})",
                sources.join(", "),
                config.concurrent
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
