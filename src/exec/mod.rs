//! `kiln exec`: runs the jobs of a `.gitlab-ci.yml` on this machine through the real agent and
//! local executor, with an embedded job server standing in for GitLab.
//!
//! Each job becomes the job JSON GitLab would send; the agent streams its trace to, uploads
//! its artifacts to and reports its state to the embedded server, which passes artifacts on to
//! later jobs. The working tree reaches every job as the first dependency archive.

mod checkout;
mod output;
mod payload;
mod server;

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::build::{About, Build, BuildKey, Ending, JOB_FILE, Outcome, SourceKind, Workload};
use crate::executor::local::{LocalConfig, LocalExecutor};
use crate::executor::{Watch, run_to_end};
use crate::job_file::{AgentConfig, AgentJob};
use crate::pipeline::{self, JobWhen, PipelineError, PipelineJob};
use output::{Printer, Row};
use payload::{DependencyRef, JobContext};
use server::{Event, JobServer};

/// The id the working-tree archive is served under (job ids start at 1).
const SOURCES_ID: u64 = 0;

/// What to run.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// The pipeline file; its directory is the project.
    pub file: PathBuf,
    /// Run only these jobs (manual ones included) and, transitively, the jobs they `needs`;
    /// empty: all.
    pub jobs: Vec<String>,
    /// Run the jobs named in `jobs` without the jobs they need.
    pub no_needs: bool,
    /// Run the jobs even when `workflow:rules` say GitLab would create no pipeline.
    pub ignore_workflow: bool,
    /// Run only the jobs of this stage.
    pub stage: Option<String>,
    /// Variables that override the file's and that `rules:if` sees.
    pub vars: Vec<(String, String)>,
    /// How many jobs run at once (at least 1).
    pub concurrency: usize,
    /// Keep each job's work directory.
    pub keep_work_dirs: bool,
    /// The kiln binary the executor starts as the agent.
    pub agent: PathBuf,
    /// Where jobs' `cache:` is kept (a second run restores what the first saved); `None`:
    /// no cache.
    pub cache_dir: Option<PathBuf>,
}

/// The default cache directory of `kiln exec`: `$XDG_CACHE_HOME/kiln/exec-cache`, else
/// `~/.cache/kiln/exec-cache`.
pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("kiln/exec-cache"))
}

/// How the pipeline went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// Whether every job that had to succeed did (and nothing was canceled).
    pub success: bool,
}

/// Why `kiln exec` could not run the pipeline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// The pipeline file is wrong.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// `--job` names a job the pipeline does not have.
    #[error("the pipeline has no job `{name}`; its jobs are: {available}")]
    UnknownJob {
        /// The name given.
        name: String,
        /// The pipeline's jobs, comma-separated.
        available: String,
    },
    /// `--stage` names a stage the pipeline does not have.
    #[error("the pipeline has no stage `{name}`; its stages are: {available}")]
    UnknownStage {
        /// The name given.
        name: String,
        /// The pipeline's stages, comma-separated.
        available: String,
    },
    /// The embedded job server cannot start.
    #[error("cannot start the embedded job server on 127.0.0.1")]
    Server(#[source] std::io::Error),
    /// The working tree cannot be packed for the jobs.
    #[error("cannot pack the working tree {}", path.display())]
    Sources {
        /// The project directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Ctrl-C (or SIGTERM) came before any job started.
    #[error("interrupted before any job started")]
    Interrupted,
    /// The directory for kept work directories cannot be created.
    #[error("cannot create the work directory {}", path.display())]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    Pending,
    Running,
    Success,
    Failed,
    /// Not run; `blocks` says whether that counts as a failure for jobs after it.
    Skipped {
        why: &'static str,
        blocks: bool,
    },
    Canceled,
}

impl Status {
    fn settled(&self) -> bool {
        !matches!(self, Self::Pending | Self::Running)
    }
}

#[derive(Debug)]
struct Node {
    job: PipelineJob,
    stage: usize,
    id: u64,
    token: String,
    status: Status,
    started: Option<Instant>,
    duration: Option<Duration>,
    exit_code: Option<i32>,
    preds: Vec<usize>,
}

impl Node {
    fn failed_hard(&self) -> bool {
        match &self.status {
            Status::Failed => !self.job.allow_failure,
            Status::Skipped { blocks, .. } => *blocks,
            Status::Canceled => true,
            _ => false,
        }
    }
}

/// Whether `name` (from `--job`) selects `job`: its exact name, or the base name of a
/// `parallel` job (`test` for `test 1/3` and `test: [a]`).
fn selects(name: &str, job: &PipelineJob) -> bool {
    job.name == name
        || (job.parallel_index.is_some()
            && (job.name.starts_with(&format!("{name} "))
                || job.name.starts_with(&format!("{name}: "))))
}

/// Runs the pipeline in `options.file` and prints what happens; `cancel` (Ctrl-C) stops the
/// running jobs and starts no more.
///
/// # Errors
/// A pipeline file that cannot be read, unknown `--job`/`--stage` names, or a failure to
/// start the embedded server. Failing jobs are not errors: see [`ExecOutcome`].
pub async fn run(
    options: ExecOptions,
    cancel: CancellationToken,
) -> Result<ExecOutcome, ExecError> {
    let project_dir = project_dir(&options.file);
    let project_dir = std::fs::canonicalize(&project_dir).unwrap_or(project_dir);
    let pipeline_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1);
    let checkout = checkout::inspect(&project_dir, pipeline_id);
    let mut rule_vars = checkout.predefined.clone();
    rule_vars.extend(options.vars.iter().cloned());
    let pipeline = pipeline::load(&options.file, &rule_vars)?;
    for warning in &pipeline.warnings {
        eprintln!("warning: {warning}");
    }
    for note in &checkout.notes {
        eprintln!("note: {note}");
    }

    if let Some(why) = &pipeline.no_pipeline {
        if !options.ignore_workflow {
            println!(
                "No pipeline: {why}, so GitLab creates none (--ignore-workflow runs the jobs anyway)"
            );
            return Ok(ExecOutcome { success: true });
        }
        eprintln!(
            "note: {why}: GitLab would create no pipeline; --ignore-workflow runs the jobs anyway"
        );
    }

    for name in &options.jobs {
        if !pipeline.jobs.iter().any(|j| selects(name, j)) {
            return Err(ExecError::UnknownJob {
                name: name.clone(),
                available: pipeline
                    .jobs
                    .iter()
                    .map(|j| j.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    if let Some(stage) = &options.stage
        && !pipeline.stages.contains(stage)
    {
        return Err(ExecError::UnknownStage {
            name: stage.clone(),
            available: pipeline.stages.join(", "),
        });
    }

    let wanted = if options.no_needs {
        HashSet::new()
    } else {
        needed(&pipeline.jobs, &options.jobs)
    };
    let mut nodes: Vec<Node> = Vec::new();
    for job in &pipeline.jobs {
        let named = options.jobs.iter().any(|n| selects(n, job)) || wanted.contains(&job.name);
        if (!options.jobs.is_empty() && !named)
            || (!wanted.contains(&job.name)
                && options.stage.as_ref().is_some_and(|s| *s != job.stage))
        {
            continue;
        }
        let status = match job.when {
            JobWhen::Never => Status::Skipped {
                why: "skipped (rules)",
                blocks: false,
            },
            JobWhen::Manual if !named => Status::Skipped {
                why: "skipped (manual)",
                blocks: false,
            },
            _ => Status::Pending,
        };
        nodes.push(Node {
            stage: pipeline
                .stages
                .iter()
                .position(|s| *s == job.stage)
                .unwrap_or(0),
            id: nodes.len() as u64 + 1,
            token: new_token(),
            job: job.clone(),
            status,
            started: None,
            duration: None,
            exit_code: None,
            preds: Vec::new(),
        });
    }
    link(&mut nodes);

    let (tx, mut events) = mpsc::unbounded_channel();
    let server = JobServer::new(tx);
    let stop_server = CancellationToken::new();
    let _stop_server = stop_server.clone().drop_guard();
    let url = server.start(stop_server).await.map_err(ExecError::Server)?;
    // Packing reads every file of the tree: off the async threads, and given up on Ctrl-C
    // (a file on a stuck network mount must not make kiln deaf to signals).
    let packing = tokio::task::spawn_blocking({
        let (dir, files) = (project_dir.clone(), checkout.files.clone());
        move || checkout::archive(&dir, &files)
    });
    let packed = tokio::select! {
        packed = packing => packed.map_err(|e| std::io::Error::other(e.to_string())).and_then(|r| r),
        () = cancel.cancelled() => return Err(ExecError::Interrupted),
    };
    let (archive, skipped) = packed.map_err(|source| ExecError::Sources {
        path: project_dir.clone(),
        source,
    })?;
    for path in skipped {
        eprintln!(
            "warning: {} is neither a readable file nor a symlink; jobs will not see it",
            path.display()
        );
    }
    let sources_size = archive.len() as u64;
    server.add_archive(SOURCES_ID, archive);
    for node in &nodes {
        server.add_job(node.id, &node.token);
    }

    let work_dir = if options.keep_work_dirs {
        // A fresh directory of a random name, created 0700 and never an existing one: a
        // predictable name in a shared /tmp is one another user can plant a link at.
        let dir = tempfile::Builder::new()
            .prefix(&format!("kiln-exec-{pipeline_id}-"))
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .map_err(|source| ExecError::WorkDir {
                path: std::env::temp_dir(),
                source,
            })?;
        Some(dir.keep())
    } else {
        None
    };
    let executor = Arc::new(LocalExecutor::new(
        options.agent.clone(),
        &LocalConfig {
            work_dir: work_dir.clone(),
            keep_work_dirs: options.keep_work_dirs,
            pass_env: Vec::new(),
            // The user runs their own pipeline: jobs run as they do, and hold nothing of theirs
            // they could not read anyway.
            user: Some(nix::unistd::geteuid().as_raw().to_string()),
            allow_untrusted: true,
        },
    ));

    let tty = std::io::stdout().is_terminal();
    let printer = Printer::new(
        &nodes.iter().map(|n| n.job.name.clone()).collect::<Vec<_>>(),
        tty,
    );
    let concurrency = options.concurrency.max(1);
    let to_run = nodes.iter().filter(|n| n.status == Status::Pending).count();
    println!(
        "Running {to_run} job(s) of {} (pipeline #{pipeline_id}) with the local executor, up to {concurrency} at a time",
        options.file.display()
    );
    for node in nodes.iter().filter(|n| n.status.settled()) {
        if let Status::Skipped { why, .. } = node.status {
            printer.note(&node.job.name, why);
            printer.settled();
        }
    }

    let settings = AgentConfig {
        trace_interval: Duration::from_millis(250),
        ..AgentConfig::default()
    };
    let name_of: HashMap<u64, String> = nodes.iter().map(|n| (n.id, n.job.name.clone())).collect();
    let mut running: JoinSet<(usize, Ending)> = JoinSet::new();
    let mut canceled = false;
    loop {
        if !canceled {
            while running.len() < concurrency {
                let Some(i) = next_ready(&mut nodes, &printer) else {
                    break;
                };
                let build = launch(
                    &nodes,
                    i,
                    &url,
                    &checkout,
                    &options.vars,
                    pipeline_id,
                    sources_size,
                    &server,
                    &settings,
                    options.cache_dir.as_deref(),
                );
                let node = &mut nodes[i];
                node.status = Status::Running;
                node.started = Some(Instant::now());
                printer.started(&node.job.name);
                let executor = Arc::clone(&executor);
                let watch = Watch {
                    cancel: cancel.child_token(),
                    ..Watch::default()
                };
                running
                    .spawn(async move { (i, run_to_end(executor.as_ref(), &build, watch).await) });
            }
        }
        if running.is_empty() {
            break;
        }
        tokio::select! {
            Some(event) = events.recv() => print_event(&printer, &name_of, event),
            Some(done) = running.join_next() => {
                while let Ok(event) = events.try_recv() {
                    print_event(&printer, &name_of, event);
                }
                if let Ok((i, ending)) = done {
                    finish(&mut nodes[i], ending, &server, &printer);
                }
            }
            () = cancel.cancelled(), if !canceled => {
                canceled = true;
                eprintln!("interrupted: stopping the running jobs");
            }
        }
    }
    for node in nodes.iter_mut().filter(|n| !n.status.settled()) {
        node.status = Status::Canceled;
    }

    printer.clear_progress();
    let rows: Vec<Row> = nodes.iter().map(row).collect();
    println!();
    print!("{}", output::summary(&rows, !tty));
    if let Some(dir) = &work_dir {
        println!("Work directories kept in {}", dir.display());
    }
    let success = !canceled && !nodes.iter().any(Node::failed_hard);
    Ok(ExecOutcome { success })
}

/// The jobs the jobs `named` need, transitively (not the named ones themselves), as GitLab
/// would run them first.
fn needed(jobs: &[PipelineJob], named: &[String]) -> HashSet<String> {
    let by_name: HashMap<&str, &PipelineJob> = jobs.iter().map(|j| (j.name.as_str(), j)).collect();
    let mut todo: Vec<&PipelineJob> = jobs
        .iter()
        .filter(|j| named.iter().any(|n| selects(n, j)))
        .collect();
    let mut needed = HashSet::new();
    while let Some(job) = todo.pop() {
        for need in job.needs.iter().flatten() {
            if let Some(target) = by_name.get(need.job.as_str())
                && needed.insert(target.name.clone())
            {
                todo.push(target);
            }
        }
    }
    needed
}

fn new_token() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    format!("kiln-exec-{}", hex::encode(bytes))
}

/// Fills each node's predecessors: its `needs`, or every job of the earlier stages.
fn link(nodes: &mut [Node]) {
    let index: HashMap<String, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.job.name.clone(), i))
        .collect();
    let preds: Vec<Vec<usize>> = nodes
        .iter()
        .map(|node| match &node.job.needs {
            Some(needs) => needs
                .iter()
                .filter_map(|n| index.get(&n.job).copied())
                .collect(),
            None => nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.stage < node.stage)
                .map(|(i, _)| i)
                .collect(),
        })
        .collect();
    for (node, preds) in nodes.iter_mut().zip(preds) {
        node.preds = preds;
    }
}

/// The next pending job whose predecessors are all settled and that should run; jobs that
/// should not run on the way are settled as skipped.
fn next_ready(nodes: &mut [Node], printer: &Printer) -> Option<usize> {
    loop {
        let mut changed = false;
        for i in 0..nodes.len() {
            if nodes[i].status != Status::Pending {
                continue;
            }
            // Jobs that never run (manual, rules) hold nothing up.
            let preds: Vec<&Node> = nodes[i]
                .preds
                .iter()
                .map(|&p| &nodes[p])
                .filter(|p| !matches!(p.status, Status::Skipped { blocks: false, .. }))
                .collect();
            if !preds.iter().all(|p| p.status.settled()) {
                continue;
            }
            let failed = preds.iter().any(|p| p.failed_hard());
            let skip = match nodes[i].job.when {
                JobWhen::OnSuccess | JobWhen::Manual if failed => Some(Status::Skipped {
                    why: "skipped (an earlier job failed)",
                    blocks: true,
                }),
                JobWhen::OnFailure if !failed => Some(Status::Skipped {
                    why: "skipped (nothing failed)",
                    blocks: false,
                }),
                _ => None,
            };
            match skip {
                None => return Some(i),
                Some(status) => {
                    if let Status::Skipped { why, .. } = status {
                        printer.note(&nodes[i].job.name, why);
                    }
                    printer.settled();
                    nodes[i].status = status;
                    changed = true;
                }
            }
        }
        if !changed {
            return None;
        }
    }
}

/// The executor launch of node `i`, with the artifacts of the jobs it depends on.
#[allow(clippy::too_many_arguments)]
fn launch(
    nodes: &[Node],
    i: usize,
    url: &str,
    checkout: &checkout::Checkout,
    cli_vars: &[(String, String)],
    pipeline_id: u64,
    sources_size: u64,
    server: &JobServer,
    settings: &AgentConfig,
    cache_dir: Option<&Path>,
) -> Build {
    let node = &nodes[i];
    let from: Vec<&str> = match (&node.job.dependencies, &node.job.needs) {
        (Some(deps), _) => deps.iter().map(String::as_str).collect(),
        (None, Some(needs)) => needs
            .iter()
            .filter(|n| n.artifacts)
            .map(|n| n.job.as_str())
            .collect(),
        (None, None) => nodes
            .iter()
            .filter(|n| n.stage < node.stage)
            .map(|n| n.job.name.as_str())
            .collect(),
    };
    let mut dependencies = vec![DependencyRef {
        id: SOURCES_ID,
        name: "sources".into(),
        size: sources_size,
    }];
    // In pipeline order, so a later job's files win as they do in GitLab.
    for dep in nodes.iter().filter(|n| from.contains(&n.job.name.as_str())) {
        if let Some(size) = server.artifacts_size(dep.id) {
            dependencies.push(DependencyRef {
                id: dep.id,
                name: dep.job.name.clone(),
                size,
            });
        }
    }
    let ctx = JobContext {
        id: node.id,
        token: &node.token,
        pipeline_id,
        project_name: &checkout.name,
        project_dir: &checkout.dir,
        predefined: &checkout.predefined,
        cli_vars,
        dependencies,
    };
    let job = payload::job_json(&node.job, &ctx);
    let agent_job = AgentJob {
        gitlab_url: url.to_owned(),
        job,
        settings: settings.clone(),
        executor: "local".into(),
        runner: "kiln exec".into(),
        masked: Vec::new(),
        tls_ca: None,
        cache: cache_dir.map(|dir| crate::cache::CacheGrant {
            access: crate::cache::CacheAccess::Directory {
                dir: dir.join("project").join(&checkout.name),
            },
            max_size: crate::cache::config::DEFAULT_MAX_SIZE,
        }),
    };
    let key = BuildKey {
        source: SourceKind::GitLab,
        runner: "exec".into(),
        id: node.id,
    };
    Build {
        name: key.resource_name(),
        key,
        workload: Workload::KilnAgent {
            image: None,
            services: Vec::new(),
        },
        // Serializing plain data into a Vec cannot fail.
        secrets: std::collections::BTreeMap::from([(
            JOB_FILE.to_owned(),
            serde_json::to_vec(&agent_job).unwrap_or_default(),
        )]),
        class: None,
        requests: Vec::new(),
        timeout: Some(node.job.timeout.unwrap_or(Duration::from_secs(3600))),
        labels: std::collections::BTreeMap::new(),
        annotations: std::collections::BTreeMap::new(),
        about: About::default(),
        untrusted: false,
        registry_auths: Vec::new(),
    }
}

fn print_event(printer: &Printer, names: &HashMap<u64, String>, event: Event) {
    match event {
        Event::Trace { id, bytes } => {
            if let Some(name) = names.get(&id) {
                printer.trace(name, &bytes);
            }
        }
    }
}

/// Settles a node from what the job reported to the server (what GitLab would show), or
/// from the executor when the agent could not report.
fn finish(node: &mut Node, ending: Ending, server: &JobServer, printer: &Printer) {
    node.duration = node.started.map(|s| s.elapsed());
    let reported = server.final_state(node.id);
    let (success, exit_code) = match &reported {
        Some(done) => (done.state == "success", done.exit_code),
        None => {
            printer.note(
                &node.job.name,
                &format!("the job did not report its end: {}", ending.detail),
            );
            (false, ending.exit_code)
        }
    };
    let canceled = ending.outcome == Outcome::Canceled;
    node.exit_code = exit_code;
    node.status = if success {
        Status::Success
    } else if canceled {
        Status::Canceled
    } else {
        Status::Failed
    };
    printer.finished(&node.job.name);
}

fn row(node: &Node) -> Row {
    let status = match &node.status {
        Status::Success => "success".to_owned(),
        Status::Failed if node.job.allow_failure => "failed (allowed)".to_owned(),
        Status::Failed => "failed".to_owned(),
        Status::Skipped { why, .. } => (*why).to_owned(),
        Status::Canceled => "canceled".to_owned(),
        Status::Pending | Status::Running => "canceled".to_owned(),
    };
    Row {
        job: node.job.name.clone(),
        stage: node.job.stage.clone(),
        status,
        duration: node.duration,
        exit_code: node.exit_code,
    }
}

/// The project directory `kiln exec FILE` runs in (the file's directory).
fn project_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
