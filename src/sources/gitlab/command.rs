//! `kiln register`, `kiln unregister` and `kiln verify`: a GitLab runner's registration, and its
//! `[[sources.gitlab]]` entry in the config file. The caller reads the config file and passes its
//! runners in (this module is below the configuration, which composes it).

use std::path::{Path, PathBuf};

use clap::{ArgGroup, Args, ValueEnum};

use super::config::GitLabRunnerConfig;
use super::runner_file;
use crate::gitlab::register::{
    self, LegacyOptions, PatOptions, RegisterError, RunnerScope, RunnerToken,
};
use crate::problem::ConfigError;

/// Why a runner command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// GitLab refused the call or could not be reached.
    #[error(transparent)]
    GitLab(#[from] RegisterError),
    /// The config file could not be updated.
    #[error(transparent)]
    ConfigFile(#[from] ConfigError),
    /// `--runner-type group` without the group.
    #[error("--runner-type group needs --group-id")]
    NoGroupId,
    /// `--runner-type project` without the project.
    #[error("--runner-type project needs --project-id")]
    NoProjectId,
    /// No credential to register with (clap asks for one; arguments built in code may not).
    #[error("give one of --token, --registration-token or --pat")]
    NoCredential,
    /// `--name` names no runner of the config file.
    #[error("no runner named `{name}` in {}", file.display())]
    UnknownRunner {
        /// The name given.
        name: String,
        /// The config file.
        file: PathBuf,
    },
    /// Several runners and no `--name`.
    #[error("{} has {count} runners; say which with --name", file.display())]
    WhichRunner {
        /// The config file.
        file: PathBuf,
        /// How many runners it has.
        count: usize,
    },
    /// The runner's manager cannot be named without its system id.
    #[error("the runner has no system_id in the config; use --all to delete the whole runner")]
    NoSystemId,
    /// `kiln verify` with no runner to verify.
    #[error("no GitLab runners configured")]
    NoRunners,
}

/// Where a runner created with a personal access token belongs (`--runner-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RunnerType {
    /// The whole instance (admin token).
    Instance,
    /// A group (`--group-id`).
    Group,
    /// A project (`--project-id`).
    Project,
}

impl RunnerType {
    /// The scope of the runner to create.
    ///
    /// # Errors
    /// A group or project runner without its id.
    fn scope(
        self,
        group_id: Option<u64>,
        project_id: Option<u64>,
    ) -> Result<RunnerScope, CommandError> {
        match self {
            Self::Instance => Ok(RunnerScope::Instance),
            Self::Group => group_id
                .map(RunnerScope::Group)
                .ok_or(CommandError::NoGroupId),
            Self::Project => project_id
                .map(RunnerScope::Project)
                .ok_or(CommandError::NoProjectId),
        }
    }
}

/// `kiln register`'s flags after `--config`: GitLab, the credential, and the new runner's
/// settings.
#[derive(Debug, Args)]
#[command(group = ArgGroup::new("credential").required(true).args(["token", "registration_token", "pat"]))]
pub struct RegisterArgs {
    /// GitLab's URL, e.g. https://gitlab.example.com.
    #[arg(long)]
    url: String,
    /// A runner authentication token (glrt-…) created in GitLab's UI.
    #[arg(long, env = "KILN_REGISTER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A legacy registration token (deprecated by GitLab; tags and flags below apply).
    #[arg(long, env = "KILN_REGISTRATION_TOKEN", hide_env_values = true)]
    registration_token: Option<String>,
    /// A personal access token with `create_runner` scope: create the runner, then verify it.
    #[arg(long, env = "KILN_REGISTER_PAT", hide_env_values = true)]
    pat: Option<String>,
    /// With --pat: `instance`, `group` or `project`.
    #[arg(
        long,
        value_enum,
        default_value = "instance",
        requires = "pat",
        hide_possible_values = true
    )]
    runner_type: RunnerType,
    /// With --pat and --runner-type group: the group id.
    #[arg(long)]
    group_id: Option<u64>,
    /// With --pat and --runner-type project: the project id.
    #[arg(long)]
    project_id: Option<u64>,
    /// The runner's name in the config (and its description in GitLab).
    #[arg(long)]
    name: Option<String>,
    /// Job tags, comma-separated (legacy and --pat registration only).
    #[arg(long, value_delimiter = ',')]
    tag_list: Vec<String>,
    /// Take untagged jobs too (legacy and --pat registration only).
    #[arg(long)]
    run_untagged: bool,
    /// Lock the runner to the project it was registered in (legacy only).
    #[arg(long)]
    locked: bool,
    /// Only run jobs on protected refs (legacy only).
    #[arg(long)]
    protected: bool,
    /// The longest job timeout this runner accepts, in seconds (legacy only).
    #[arg(long)]
    maximum_timeout: Option<u64>,
}

/// `kiln unregister`'s flags after `--config`.
#[derive(Debug, Args)]
pub struct UnregisterArgs {
    /// The runner's name in the config (default: the only runner).
    #[arg(long)]
    name: Option<String>,
    /// Delete the whole runner from GitLab, not just this manager.
    #[arg(long)]
    all: bool,
}

/// `kiln register`: gets a runner token (the given one, or a new runner's), verifies it under
/// this manager's system id and saves the runner to the config file at `file`. `saved` are the
/// runners the file holds already: re-registering one keeps its system id (one runner
/// manager in GitLab, not two).
///
/// # Errors
/// GitLab refusing or unreachable, a group or project runner without its id, or a config file
/// that cannot be updated.
pub async fn register(
    file: &Path,
    args: &RegisterArgs,
    saved: &[GitLabRunnerConfig],
) -> Result<(), CommandError> {
    let token = runner_token(args).await?;
    let system_id = saved
        .iter()
        .find(|r| r.url == args.url && (args.name.is_none() || r.name == args.name))
        .and_then(|r| r.system_id.clone())
        .unwrap_or_else(register::new_system_id);
    let verified = register::verify(&args.url, &token, &system_id, None).await?;
    let mut entry = GitLabRunnerConfig::new(&args.url, &verified.token);
    entry.name = args.name.clone();
    entry.system_id = Some(system_id.clone());
    runner_file::upsert(file, &entry)?;
    println!(
        "Runner {} verified (system_id {system_id}); saved to {}",
        verified.id,
        file.display()
    );
    if let Some(expires) = verified.token_expires_at.filter(|e| !e.is_empty()) {
        println!("The token expires at {expires}.");
    }
    Ok(())
}

/// The token to verify: the one given, or that of a runner created with a registration token
/// or a personal access token.
async fn runner_token(args: &RegisterArgs) -> Result<String, CommandError> {
    let description = args.name.clone().unwrap_or_else(|| "kiln".into());
    if let Some(token) = &args.token {
        return Ok(token.clone());
    }
    let created: RunnerToken = if let Some(registration_token) = &args.registration_token {
        let options = LegacyOptions {
            description,
            tags: args.tag_list.clone(),
            run_untagged: args.run_untagged,
            locked: args.locked,
            protected_only: args.protected,
            maximum_timeout: args.maximum_timeout,
            paused: false,
        };
        let created = register::register_legacy(&args.url, registration_token, &options).await?;
        println!("Registered runner {} with a registration token", created.id);
        created
    } else if let Some(pat) = &args.pat {
        let options = PatOptions {
            scope: args.runner_type.scope(args.group_id, args.project_id)?,
            description,
            tags: args.tag_list.clone(),
            run_untagged: args.run_untagged,
        };
        let created = register::create_with_pat(&args.url, pat, &options).await?;
        println!(
            "Created runner {} with the personal access token",
            created.id
        );
        created
    } else {
        return Err(CommandError::NoCredential);
    };
    Ok(created.token)
}

/// `kiln unregister`: removes the runner manager (or with `--all` the whole runner) named by
/// `args` among `runners` from GitLab, then its entry from the config file at `file`.
///
/// # Errors
/// No such runner (or several and no name), no system id without `--all`, GitLab refusing or
/// unreachable, or a config file that cannot be updated.
pub async fn unregister(
    file: &Path,
    args: &UnregisterArgs,
    runners: &[GitLabRunnerConfig],
) -> Result<(), CommandError> {
    let runner = pick(runners, args.name.as_deref(), file)?;
    let system_id = match (&runner.system_id, args.all) {
        (Some(id), _) => id.clone(),
        (None, true) => String::new(),
        (None, false) => return Err(CommandError::NoSystemId),
    };
    register::unregister(&runner.url, &runner.token, &system_id, args.all).await?;
    runner_file::remove(file, &runner.url, &runner.token)?;
    println!(
        "{} removed from {} and from {}",
        if args.all { "Runner" } else { "Runner manager" },
        runner.url,
        file.display()
    );
    Ok(())
}

/// The runner called `name` (its name in logs and metrics), or the only one.
fn pick<'a>(
    runners: &'a [GitLabRunnerConfig],
    name: Option<&str>,
    file: &Path,
) -> Result<&'a GitLabRunnerConfig, CommandError> {
    match (name, runners) {
        (Some(name), _) => runners
            .iter()
            .enumerate()
            .find(|(i, r)| r.display_name(*i) == name)
            .map(|(_, r)| r)
            .ok_or_else(|| CommandError::UnknownRunner {
                name: name.to_owned(),
                file: file.to_owned(),
            }),
        (None, [only]) => Ok(only),
        (None, _) => Err(CommandError::WhichRunner {
            file: file.to_owned(),
            count: runners.len(),
        }),
    }
}

/// `kiln verify`: asks GitLab whether each runner's token is live, printing a line per runner;
/// true when every one is.
///
/// # Errors
/// No runners to verify.
pub async fn verify(runners: &[GitLabRunnerConfig]) -> Result<bool, CommandError> {
    if runners.is_empty() {
        return Err(CommandError::NoRunners);
    }
    let mut all_live = true;
    for (i, runner) in runners.iter().enumerate() {
        let name = runner.display_name(i);
        let system_id = match &runner.system_id {
            Some(id) => id.clone(),
            None => {
                println!(
                    "{name}: no system_id stored (run `kiln register`); verifying with a generated one"
                );
                register::new_system_id()
            }
        };
        let verified = match runner.tls_ca() {
            Ok(ca) => register::verify(&runner.url, &runner.token, &system_id, ca.as_deref())
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match verified {
            Ok(token) => println!("{name}: ok (runner {} at {})", token.id, runner.url),
            Err(e) => {
                println!("{name}: FAILED: {e}");
                all_live = false;
            }
        }
    }
    Ok(all_live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_or_project_runner_needs_its_id() {
        assert!(matches!(
            RunnerType::Instance.scope(None, None),
            Ok(RunnerScope::Instance)
        ));
        assert!(matches!(
            RunnerType::Group.scope(Some(7), None),
            Ok(RunnerScope::Group(7))
        ));
        assert!(matches!(
            RunnerType::Project.scope(Some(7), Some(9)),
            Ok(RunnerScope::Project(9))
        ));
        assert!(matches!(
            RunnerType::Group.scope(None, Some(9)),
            Err(CommandError::NoGroupId)
        ));
        assert!(matches!(
            RunnerType::Project.scope(Some(7), None),
            Err(CommandError::NoProjectId)
        ));
    }

    #[test]
    fn a_runner_is_picked_by_name_or_as_the_only_one() {
        let file = Path::new("kiln.toml");
        let mut named = GitLabRunnerConfig::new("https://gitlab.example.com", "glrt-a");
        named.name = Some("ci".into());
        let unnamed = GitLabRunnerConfig::new("https://gitlab.example.com", "glrt-b");
        let both = [named.clone(), unnamed];
        assert_eq!(pick(&both, Some("ci"), file).unwrap().token, "glrt-a");
        assert_eq!(pick(&both[..1], None, file).unwrap().token, "glrt-a");
        assert_eq!(
            pick(&both, None, file).unwrap_err().to_string(),
            "kiln.toml has 2 runners; say which with --name"
        );
        assert_eq!(
            pick(&both, Some("cd"), file).unwrap_err().to_string(),
            "no runner named `cd` in kiln.toml"
        );
        assert!(pick(&[], None, file).is_err());
    }
}
