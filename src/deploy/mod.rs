//! `kiln deploy`: ship a jar, war or image to Alibaba SAE or Knative and wait for the rollout.

pub mod config;
pub mod knative;
pub(crate) mod output;
pub mod sae;

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use url::Url;

pub use config::{ConfigError, DeployConfig};
pub use knative::KnativeError;
pub use sae::SaeError;

use sae::deploy::{AppRef, OnBusy, Package, SaePlan};
use sae::oss::OssSettings;

/// Deploy a jar, war or image to Alibaba SAE or Knative and wait for the rollout.
#[derive(Debug, Args)]
pub struct DeployCommand {
    /// TOML file whose `[deploy]` table sets defaults (region, OSS bucket, endpoints, …).
    #[arg(long, env = "KILN_CONFIG", value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Print every request that would be sent (method, URL, headers, body; secrets redacted)
    /// and send nothing.
    #[arg(long, env = "KILN_DEPLOY_DRY_RUN", global = true)]
    dry_run: bool,
    /// Give up waiting for the rollout after this long (`90s`, `20m`); exit code 4.
    #[arg(long, env = "KILN_DEPLOY_TIMEOUT", default_value = "30m", value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,
    /// How often to ask for the rollout's state.
    #[arg(long, env = "KILN_DEPLOY_POLL_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    poll_interval: Duration,
    #[command(subcommand)]
    target: Target,
}

#[derive(Debug, Subcommand)]
enum Target {
    /// Deploy to an Alibaba Cloud Serverless App Engine application and follow its change order.
    Sae(Box<SaeArgs>),
    /// Apply a Knative Service and wait until the new revision is ready.
    Knative(Box<KnativeArgs>),
}

/// A jar or a war.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PackageKind {
    /// A Spring Boot style fat jar (`FatJar`).
    Jar,
    /// A war run in SAE's web container (`War`).
    War,
}

/// How SAE moves from one batch to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ReleaseType {
    /// The next batch starts after `--batch-wait`.
    Auto,
    /// Each batch waits for a confirmation (the console, or `--confirm-batches`).
    Manual,
}

#[derive(Debug, Args)]
#[command(
    disable_version_flag = true,
    group(ArgGroup::new("app").required(true).args(["app_id", "app_name"])),
    group(ArgGroup::new("package").required(true).args(["jar", "war", "image", "package_url"])),
)]
struct SaeArgs {
    /// Region of the application, e.g. `cn-hangzhou` (also the OSS region).
    #[arg(long, env = "KILN_DEPLOY_REGION")]
    region: Option<String>,
    /// SAE OpenAPI endpoint; default `https://sae.<region>.aliyuncs.com`.
    #[arg(long, env = "KILN_DEPLOY_ENDPOINT")]
    endpoint: Option<Url>,
    /// The application's id.
    #[arg(long, env = "KILN_DEPLOY_APP_ID")]
    app_id: Option<String>,
    /// The application's name, resolved to its id with listApplications.
    #[arg(long, env = "KILN_DEPLOY_APP_NAME")]
    app_name: Option<String>,
    /// Namespace to look `--app-name` up in, when names repeat across namespaces.
    #[arg(long, env = "KILN_DEPLOY_NAMESPACE_ID")]
    namespace_id: Option<String>,
    /// Fat jar to upload to OSS and deploy (`PackageType=FatJar`).
    #[arg(long, env = "KILN_DEPLOY_JAR", value_name = "FILE")]
    jar: Option<PathBuf>,
    /// War to upload to OSS and deploy (`PackageType=War`).
    #[arg(long, env = "KILN_DEPLOY_WAR", value_name = "FILE")]
    war: Option<PathBuf>,
    /// Container image to deploy (`PackageType=Image`).
    #[arg(long, env = "KILN_DEPLOY_IMAGE")]
    image: Option<String>,
    /// URL SAE downloads the package from, instead of uploading one (see `--package-type`).
    #[arg(long, env = "KILN_DEPLOY_PACKAGE_URL")]
    package_url: Option<String>,
    /// What `--package-url` points at.
    #[arg(
        long,
        env = "KILN_DEPLOY_PACKAGE_TYPE",
        value_enum,
        default_value = "jar"
    )]
    package_type: PackageKind,
    /// ACR Enterprise instance of `--image`.
    #[arg(long, env = "KILN_DEPLOY_ACR_INSTANCE_ID")]
    acr_instance_id: Option<String>,
    /// `PackageVersion`, unique per deploy; default `<commit>-<UTC timestamp>`.
    #[arg(long = "version", env = "KILN_DEPLOY_VERSION")]
    package_version: Option<String>,
    /// JDK, e.g. `Open JDK 8`, `Dragonwell 11`.
    #[arg(long, env = "KILN_DEPLOY_JDK")]
    jdk: Option<String>,
    /// Web container for a war, e.g. `apache-tomcat-8.5.42`.
    #[arg(long, env = "KILN_DEPLOY_WEB_CONTAINER")]
    web_container: Option<String>,
    /// JVM options (`JarStartOptions`), e.g. `-Xmx1g`.
    #[arg(
        long,
        env = "KILN_DEPLOY_JAR_START_OPTIONS",
        allow_hyphen_values = true
    )]
    jar_start_options: Option<String>,
    /// Program arguments (`JarStartArgs`).
    #[arg(long, env = "KILN_DEPLOY_JAR_START_ARGS", allow_hyphen_values = true)]
    jar_start_args: Option<String>,
    /// Environment variable `NAME=VALUE` for the application; repeatable (newline-separated in
    /// the environment variable).
    #[arg(
        long = "env",
        env = "KILN_DEPLOY_ENVS",
        value_name = "NAME=VALUE",
        value_delimiter = '\n'
    )]
    envs: Vec<String>,
    /// Number of batches of a phased release.
    #[arg(long, env = "KILN_DEPLOY_BATCHES")]
    batches: Option<u32>,
    /// Minutes between automatic batches (SAE's `batchWaitTime` unit).
    #[arg(long, env = "KILN_DEPLOY_BATCH_WAIT")]
    batch_wait: Option<u32>,
    /// Instances in a first canary (gray) batch.
    #[arg(long, env = "KILN_DEPLOY_GRAY")]
    gray: Option<u32>,
    /// Whether batches follow each other automatically or wait for a confirmation.
    #[arg(long, env = "KILN_DEPLOY_RELEASE_TYPE", value_enum)]
    release_type: Option<ReleaseType>,
    /// Instances that must stay ready during the rollout (`MinReadyInstances`).
    #[arg(long, env = "KILN_DEPLOY_MIN_READY")]
    min_ready: Option<u32>,
    /// Confirm batches that wait for a manual confirmation, instead of waiting for a person.
    #[arg(long, env = "KILN_DEPLOY_CONFIRM_BATCHES")]
    confirm_batches: bool,
    /// When another change order is running: wait for it, or fail with exit code 5.
    #[arg(long, env = "KILN_DEPLOY_ON_BUSY", value_enum, default_value = "wait")]
    on_busy: OnBusy,
    /// Change order description; kiln finds its change order by it after a timed-out call.
    #[arg(long, env = "KILN_DEPLOY_DESCRIPTION")]
    description: Option<String>,
    /// OSS bucket jar and war files are uploaded to.
    #[arg(long, env = "KILN_DEPLOY_OSS_BUCKET")]
    oss_bucket: Option<String>,
    /// Key prefix inside the bucket (default `kiln-deploy`).
    #[arg(long, env = "KILN_DEPLOY_OSS_PREFIX")]
    oss_prefix: Option<String>,
    /// OSS endpoint; default `https://oss-<region>.aliyuncs.com`.
    #[arg(long, env = "KILN_DEPLOY_OSS_ENDPOINT")]
    oss_endpoint: Option<Url>,
    /// How long the signed download URL given to SAE stays valid (default 30m).
    #[arg(long, env = "KILN_DEPLOY_URL_TTL", value_parser = humantime::parse_duration)]
    url_ttl: Option<Duration>,
    /// Upload in parts above this many bytes (default 64 MiB).
    #[arg(long, env = "KILN_DEPLOY_MULTIPART_THRESHOLD")]
    multipart_threshold: Option<u64>,
    /// Time limit of each SAE API call; a timed-out DeployApplication is looked up, never
    /// repeated.
    #[arg(long, env = "KILN_DEPLOY_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
}

#[derive(Debug, Args)]
struct KnativeArgs {
    /// Name of the Knative Service.
    #[arg(long, env = "KILN_DEPLOY_SERVICE")]
    service: String,
    /// Container image; optional with `--promote`, which then keeps the current one.
    #[arg(long, env = "KILN_DEPLOY_IMAGE", required_unless_present = "promote")]
    image: Option<String>,
    /// Namespace; default the kubeconfig context's namespace, else `default`.
    #[arg(long, env = "KILN_DEPLOY_NAMESPACE")]
    namespace: Option<String>,
    /// Kubeconfig file; default `$KUBECONFIG`, `~/.kube/config` or the in-cluster account.
    #[arg(long, env = "KILN_DEPLOY_KUBECONFIG", value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use.
    #[arg(long, env = "KILN_DEPLOY_CONTEXT")]
    context: Option<String>,
    /// Environment variable `NAME=VALUE` for the container; repeatable.
    #[arg(
        long = "env",
        env = "KILN_DEPLOY_ENVS",
        value_name = "NAME=VALUE",
        value_delimiter = '\n'
    )]
    envs: Vec<String>,
    /// Container port.
    #[arg(long, env = "KILN_DEPLOY_PORT")]
    port: Option<u16>,
    /// `autoscaling.knative.dev/min-scale`.
    #[arg(long, env = "KILN_DEPLOY_MIN_SCALE")]
    min_scale: Option<u32>,
    /// `autoscaling.knative.dev/max-scale`.
    #[arg(long, env = "KILN_DEPLOY_MAX_SCALE")]
    max_scale: Option<u32>,
    /// Send this percentage to the new revision (tag `canary`), the rest to the previous one.
    #[arg(long, env = "KILN_DEPLOY_CANARY", value_parser = clap::value_parser!(u8).range(1..=99), conflicts_with = "promote")]
    canary: Option<u8>,
    /// Send 100% of the traffic to the latest revision.
    #[arg(long, env = "KILN_DEPLOY_PROMOTE")]
    promote: bool,
}

/// Errors of `kiln deploy`.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The config file is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The SAE deploy failed.
    #[error(transparent)]
    Sae(#[from] SaeError),
    /// The Knative deploy failed.
    #[error(transparent)]
    Knative(#[from] KnativeError),
}

impl DeployError {
    /// The process exit code: 3 the rollout failed, 4 it timed out, 5 the SAE application was
    /// busy (`--on-busy fail`), 1 anything else (configuration, credentials, upload, API).
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) => 1,
            Self::Sae(e) => e.exit_code(),
            Self::Knative(e) => e.exit_code(),
        }
    }
}

/// Runs `kiln deploy`.
///
/// # Errors
/// [`DeployError`]; its [`exit_code`](DeployError::exit_code) is what the process should exit
/// with.
pub async fn run(cmd: DeployCommand) -> Result<(), DeployError> {
    let config = match &cmd.config {
        Some(path) => DeployConfig::load(path)?,
        None => DeployConfig::default(),
    };
    let common = Common {
        dry_run: cmd.dry_run,
        timeout: cmd.timeout,
        poll_interval: cmd.poll_interval,
    };
    match cmd.target {
        Target::Sae(args) => {
            let plan = sae_plan(*args, &config, &common)?;
            sae::deploy::run(plan).await?;
        }
        Target::Knative(args) => {
            let plan = knative_plan(*args, &common)?;
            knative::run(plan).await?;
        }
    }
    Ok(())
}

/// The flags every target shares.
#[derive(Debug, Clone, Copy)]
struct Common {
    dry_run: bool,
    timeout: Duration,
    poll_interval: Duration,
}

fn parse_envs(envs: &[String]) -> Result<Vec<(String, String)>, String> {
    envs.iter()
        .filter(|e| !e.is_empty())
        .map(|e| match e.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(format!("--env {e:?} is not NAME=VALUE")),
        })
        .collect()
}

fn default_version() -> String {
    let commit = ["CI_COMMIT_SHORT_SHA", "GITHUB_SHA", "GIT_COMMIT"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            std::process::Command::new("git")
                .args(["rev-parse", "--short", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "local".to_owned());
    let short: String = commit.chars().take(8).collect();
    format!("{short}-{}", chrono::Utc::now().format("%Y%m%d%H%M%S"))
}

fn sae_plan(args: SaeArgs, config: &DeployConfig, cmd: &Common) -> Result<SaePlan, SaeError> {
    let region = args
        .region
        .or_else(|| config.region.clone())
        .ok_or(SaeError::Missing {
            what: "region",
            how: "pass --region, set KILN_DEPLOY_REGION or deploy.region in the config file",
        })?;
    let invalid = |what, message: String| SaeError::Invalid { what, message };
    let parse_url = |what, s: &str| Url::parse(s).map_err(|e| invalid(what, format!("{s}: {e}")));
    let endpoint = match (args.endpoint, &config.sae_endpoint) {
        (Some(u), _) => u,
        (None, Some(s)) => parse_url("deploy.sae_endpoint", s)?,
        (None, None) => parse_url("region", &format!("https://sae.{region}.aliyuncs.com"))?,
    };
    let oss_endpoint = match (args.oss_endpoint, &config.oss_endpoint) {
        (Some(u), _) => u,
        (None, Some(s)) => parse_url("deploy.oss_endpoint", s)?,
        (None, None) => parse_url("region", &format!("https://oss-{region}.aliyuncs.com"))?,
    };
    let app = match (args.app_id, args.app_name) {
        (Some(id), _) => AppRef::Id(id),
        (None, Some(name)) => AppRef::Name {
            name,
            namespace_id: args.namespace_id,
        },
        (None, None) => {
            return Err(SaeError::Missing {
                what: "application",
                how: "pass --app-id or --app-name",
            });
        }
    };
    let package = if let Some(path) = args.jar {
        Package::File { path, war: false }
    } else if let Some(path) = args.war {
        Package::File { path, war: true }
    } else if let Some(url) = args.image {
        Package::Image {
            url,
            acr_instance_id: args.acr_instance_id,
        }
    } else if let Some(url) = args.package_url {
        Package::Url {
            url,
            war: args.package_type == PackageKind::War,
        }
    } else {
        return Err(SaeError::Missing {
            what: "package",
            how: "pass one of --jar, --war, --image or --package-url",
        });
    };
    let version = args.package_version.unwrap_or_else(default_version);
    let mut params: Vec<(String, String)> = Vec::new();
    if !matches!(package, Package::Image { .. }) {
        params.push(("PackageVersion".into(), version.clone()));
    }
    let mut push = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            params.push((k.to_owned(), v));
        }
    };
    push("Jdk", args.jdk);
    push("WebContainer", args.web_container);
    push("JarStartOptions", args.jar_start_options);
    push("JarStartArgs", args.jar_start_args);
    push("MinReadyInstances", args.min_ready.map(|n| n.to_string()));
    let envs = parse_envs(&args.envs).map_err(|m| invalid("--env", m))?;
    if !envs.is_empty() {
        let list: Vec<_> = envs
            .iter()
            .map(|(k, v)| serde_json::json!({ "name": k, "value": v }))
            .collect();
        params.push(("Envs".into(), serde_json::Value::Array(list).to_string()));
    }
    if args.batches.is_some() || args.gray.is_some() || args.release_type.is_some() {
        let release = match args.release_type.unwrap_or(ReleaseType::Auto) {
            ReleaseType::Auto => "auto",
            ReleaseType::Manual => "manual",
        };
        let mut batch = serde_json::json!({
            "batch": args.batches.unwrap_or(1),
            "releaseType": release,
        });
        if let Some(wait) = args.batch_wait {
            batch["batchWaitTime"] = wait.into();
        }
        let strategy = match args.gray {
            Some(gray) if gray > 0 => serde_json::json!({
                "type": "GrayBatchUpdate",
                "batchUpdate": batch,
                "grayUpdate": { "gray": gray },
            }),
            _ => serde_json::json!({ "type": "BatchUpdate", "batchUpdate": batch }),
        };
        params.push(("UpdateStrategy".into(), strategy.to_string()));
    }
    let bucket = args.oss_bucket.or_else(|| config.oss_bucket.clone());
    let oss = bucket.map(|bucket| OssSettings {
        endpoint: oss_endpoint,
        bucket,
        prefix: args.oss_prefix.unwrap_or_else(|| config.oss_prefix.clone()),
        region: region.clone(),
        multipart_threshold: args
            .multipart_threshold
            .unwrap_or(config.multipart_threshold),
        part_size: config.part_size,
        dry_run: cmd.dry_run,
    });
    Ok(SaePlan {
        endpoint,
        app,
        package,
        oss,
        url_ttl: args.url_ttl.unwrap_or(config.url_ttl),
        params,
        description: args
            .description
            .unwrap_or_else(|| format!("kiln deploy {version}")),
        confirm_batches: args.confirm_batches,
        on_busy: args.on_busy,
        timeout: cmd.timeout,
        poll_interval: cmd.poll_interval,
        request_timeout: args.request_timeout,
        dry_run: cmd.dry_run,
    })
}

fn knative_plan(args: KnativeArgs, cmd: &Common) -> Result<knative::KnativePlan, KnativeError> {
    let envs = parse_envs(&args.envs).map_err(|message| KnativeError::Invalid { message })?;
    Ok(knative::KnativePlan {
        service: args.service,
        image: args.image,
        namespace: args.namespace,
        kubeconfig: args.kubeconfig,
        context: args.context,
        envs,
        port: args.port,
        min_scale: args.min_scale,
        max_scale: args.max_scale,
        canary: args.canary,
        promote: args.promote,
        timeout: cmd.timeout,
        poll_interval: cmd.poll_interval,
        dry_run: cmd.dry_run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }
    #[derive(Debug, clap::Subcommand)]
    enum Top {
        Deploy(DeployCommand),
    }

    fn parse(args: &[&str]) -> DeployCommand {
        let mut all = vec!["kiln", "deploy"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all).unwrap().cmd {
            Top::Deploy(d) => d,
        }
    }

    #[test]
    fn flags_win_over_the_config_file_and_the_strategy_is_built() {
        let cmd = parse(&[
            "sae",
            "--region",
            "cn-hangzhou",
            "--app-id",
            "a1",
            "--jar",
            "app.jar",
            "--version",
            "v1",
            "--batches",
            "3",
            "--batch-wait",
            "2",
            "--gray",
            "1",
            "--oss-prefix",
            "p",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
        ]);
        let config = DeployConfig {
            region: Some("cn-shanghai".into()),
            oss_bucket: Some("from-config".into()),
            oss_prefix: "config-prefix".into(),
            ..DeployConfig::default()
        };
        let Target::Sae(args) = cmd.target else {
            panic!()
        };
        let common = Common {
            dry_run: false,
            timeout: cmd.timeout,
            poll_interval: cmd.poll_interval,
        };
        let plan = sae_plan(*args, &config, &common).unwrap();
        assert_eq!(
            plan.endpoint.as_str(),
            "https://sae.cn-hangzhou.aliyuncs.com/"
        );
        let oss = plan.oss.unwrap();
        assert_eq!(oss.bucket, "from-config");
        assert_eq!(oss.prefix, "p");
        assert_eq!(oss.region, "cn-hangzhou");
        let get = |k: &str| {
            plan.params
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("PackageVersion").as_deref(), Some("v1"));
        assert_eq!(
            get("UpdateStrategy").as_deref(),
            Some(
                r#"{"batchUpdate":{"batch":3,"batchWaitTime":2,"releaseType":"auto"},"grayUpdate":{"gray":1},"type":"GrayBatchUpdate"}"#
            )
        );
        assert_eq!(
            get("Envs").as_deref(),
            Some(r#"[{"name":"A","value":"1"},{"name":"B","value":"x=y"}]"#)
        );
        assert_eq!(plan.description, "kiln deploy v1");
        assert_eq!(plan.url_ttl, Duration::from_secs(1800));
    }

    #[test]
    fn default_versions_are_unique_per_second_and_carry_the_commit() {
        let v = default_version();
        assert!(v.len() > 15, "{v}");
    }

    #[test]
    fn a_package_and_an_app_are_required() {
        let err = Cli::try_parse_from(["kiln", "deploy", "sae", "--app-id", "a"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let err = Cli::try_parse_from([
            "kiln", "deploy", "sae", "--jar", "a", "--image", "i", "--app-id", "a",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }
}
