//! Deploys to SAE: resolve the application, upload the package, call DeployApplication, then
//! follow the change order batch by batch until it succeeds or fails.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;
use url::Url;

use super::client::{
    ApplicationList, Call, ChangeOrder, ChangeOrderList, ClientError, SaeClient, decode,
    status_name,
};
use super::oss::{Oss, OssError, OssSettings};
use super::signer::{Credentials, SignerError};
use crate::deploy::output::{self, say};

/// Errors of an SAE deploy. See [`SaeError::exit_code`] for what the process exits with.
#[derive(Debug, thiserror::Error)]
pub enum SaeError {
    /// Credentials are missing.
    #[error(transparent)]
    Credentials(#[from] SignerError),
    /// An SAE call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The package upload failed.
    #[error(transparent)]
    Upload(#[from] OssError),
    /// A required setting has no value from a flag, the environment or the config file.
    #[error("{what} is not set: {how}")]
    Missing {
        /// The setting.
        what: &'static str,
        /// Where it can be given.
        how: &'static str,
    },
    /// A setting has a value kiln cannot use.
    #[error("invalid {what}: {message}")]
    Invalid {
        /// The setting.
        what: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The HTTP client could not be built (TLS roots).
    #[error("cannot set up the HTTP client")]
    HttpClient(#[source] reqwest::Error),
    /// `--app-name` matched no application.
    #[error("no SAE application is named {name} in this region; check --app-name and --region")]
    AppNotFound {
        /// The name.
        name: String,
    },
    /// `--app-name` matched several applications.
    #[error("several SAE applications are named {name} ({ids}); pass --app-id or --namespace-id")]
    AppAmbiguous {
        /// The name.
        name: String,
        /// Their ids.
        ids: String,
    },
    /// Another change order is running and `--on-busy fail` was given.
    #[error(
        "application {app_id} is busy with change order {change_order_id}; \
         re-run later or pass --on-busy wait"
    )]
    Busy {
        /// The application.
        app_id: String,
        /// The running change order ("unknown" when SAE did not list it).
        change_order_id: String,
    },
    /// The rollout failed, was terminated or hit a system exception.
    #[error("change order {change_order_id} {state}: {messages}")]
    RolloutFailed {
        /// The change order.
        change_order_id: String,
        /// Its final state, in words.
        state: String,
        /// SAE's error messages.
        messages: String,
    },
    /// `--timeout` passed before the rollout finished.
    #[error(
        "gave up after {timeout:?} waiting for {what}; the change may still be running in \
         SAE, check the console before re-running"
    )]
    TimedOut {
        /// What kiln waited for.
        what: String,
        /// The `--timeout`.
        timeout: Duration,
    },
    /// DeployApplication timed out and no change order for this deploy appeared.
    #[error(
        "DeployApplication timed out and no change order described \"{description}\" appeared; \
         not deploying twice: check the SAE console, then re-run"
    )]
    DeployUnknown {
        /// The change order description kiln looked for.
        description: String,
    },
}

impl SaeError {
    /// The process exit code: 3 the rollout failed, 4 timed out, 5 the app was busy, 1 any
    /// other error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::RolloutFailed { .. } => 3,
            Self::TimedOut { .. } | Self::DeployUnknown { .. } => 4,
            Self::Busy { .. } => 5,
            _ => 1,
        }
    }
}

/// What to deploy.
#[derive(Debug, Clone)]
pub(crate) enum Package {
    /// A fat jar or war file to upload to OSS.
    File { path: PathBuf, war: bool },
    /// A jar or war SAE downloads from this URL.
    Url { url: String, war: bool },
    /// A container image.
    Image {
        url: String,
        acr_instance_id: Option<String>,
    },
}

/// What to do when another change order is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum OnBusy {
    /// Wait for the running change order to finish, then deploy.
    Wait,
    /// Fail at once (exit code 5).
    Fail,
}

/// A fully resolved SAE deploy.
#[derive(Debug, Clone)]
pub(crate) struct SaePlan {
    pub(crate) endpoint: Url,
    pub(crate) app: AppRef,
    pub(crate) package: Package,
    pub(crate) oss: Option<OssSettings>,
    pub(crate) url_ttl: Duration,
    /// `DeployApplication` parameters besides AppId and the package.
    pub(crate) params: Vec<(String, String)>,
    pub(crate) description: String,
    pub(crate) confirm_batches: bool,
    pub(crate) on_busy: OnBusy,
    pub(crate) timeout: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) dry_run: bool,
}

/// The application, by id or by name.
#[derive(Debug, Clone)]
pub(crate) enum AppRef {
    Id(String),
    Name {
        name: String,
        namespace_id: Option<String>,
    },
}

const DEPLOY_PATH: &str = "/pop/v1/sam/app/deployApplication";
const LIST_APPS_PATH: &str = "/pop/v1/sam/app/listApplications";
const DESCRIBE_PATH: &str = "/pop/v1/sam/changeorder/DescribeChangeOrder";
const LIST_ORDERS_PATH: &str = "/pop/v1/sam/changeorder/ListChangeOrders";
const CONFIRM_PATH: &str = "/pop/v1/sam/changeorder/ConfirmPipelineBatch";

/// States after which a change order no longer changes.
fn is_final(status: i64) -> bool {
    matches!(status, 2 | 3 | 6 | 10)
}

/// Runs an SAE deploy.
///
/// # Errors
/// [`SaeError`]; its [`exit_code`](SaeError::exit_code) tells a failed rollout from a
/// timeout or a busy application.
pub(crate) async fn run(plan: SaePlan) -> Result<(), SaeError> {
    let credentials = match Credentials::from_env() {
        Ok(c) => c,
        Err(_) if plan.dry_run => {
            say(
                "dry run: ALIBABA_CLOUD_ACCESS_KEY_ID/SECRET are not set; signing with placeholders",
            );
            Credentials::new("<ALIBABA_CLOUD_ACCESS_KEY_ID>", "placeholder", None)
        }
        Err(e) => return Err(e.into()),
    };
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(SaeError::HttpClient)?;
    let client = SaeClient::new(
        http.clone(),
        plan.endpoint.clone(),
        credentials.clone(),
        plan.request_timeout,
    );
    let deadline = Instant::now() + plan.timeout;

    let app_id = resolve_app(&client, &plan).await?;

    let mut deploy = Call::post(DEPLOY_PATH, "DeployApplication").param("AppId", &app_id);
    match &plan.package {
        Package::File { path, war } => {
            let settings = plan.oss.clone().ok_or(SaeError::Missing {
                what: "OSS bucket",
                how: "--jar/--war are uploaded to OSS: pass --oss-bucket (KILN_DEPLOY_OSS_BUCKET, \
                      deploy.oss_bucket) or give SAE a --package-url",
            })?;
            let oss = Oss::new(http.clone(), settings, credentials.clone())?;
            let uploaded = oss.upload(path, plan.url_ttl).await?;
            say(format!(
                "SAE will download {} through a signed URL valid for {}",
                uploaded.key,
                humantime::format_duration(plan.url_ttl)
            ));
            deploy = deploy
                .param("PackageType", if *war { "War" } else { "FatJar" })
                .param("PackageUrl", uploaded.download_url.to_string());
        }
        Package::Url { url, war } => {
            deploy = deploy
                .param("PackageType", if *war { "War" } else { "FatJar" })
                .param("PackageUrl", url);
        }
        Package::Image {
            url,
            acr_instance_id,
        } => {
            deploy = deploy
                .param("PackageType", "Image")
                .param("ImageUrl", url)
                .param_opt("AcrInstanceId", acr_instance_id.clone());
        }
    }
    for (k, v) in &plan.params {
        deploy = deploy.param(k, v);
    }
    deploy = deploy.param("ChangeOrderDesc", &plan.description);

    if plan.dry_run {
        output::print_request(&client.prepare(&deploy));
        say(format!(
            "dry run: nothing was sent; kiln would now follow the change order with \
             DescribeChangeOrder every {:?}",
            plan.poll_interval
        ));
        return Ok(());
    }

    let change_order_id = start(&client, &plan, &app_id, &deploy, deadline).await?;
    say(format!(
        "change order {change_order_id} started for application {app_id}"
    ));
    follow(&client, &plan, &change_order_id, deadline).await
}

async fn resolve_app(client: &SaeClient, plan: &SaePlan) -> Result<String, SaeError> {
    let (name, namespace_id) = match &plan.app {
        AppRef::Id(id) => return Ok(id.clone()),
        AppRef::Name { name, namespace_id } => (name, namespace_id),
    };
    let call = Call::get(LIST_APPS_PATH, "ListApplications")
        .param("FieldType", "appName")
        .param("FieldValue", name)
        .param_opt("NamespaceId", namespace_id.clone());
    if plan.dry_run {
        output::print_request(&client.prepare(&call));
        return Ok(format!("<AppId of {name}>"));
    }
    let list: ApplicationList = decode("ListApplications", client.send(&call).await?)?;
    // FieldValue matches by substring, so keep exact names only.
    let matches: Vec<_> = list
        .applications
        .iter()
        .filter(|a| &a.app_name == name)
        .filter(|a| namespace_id.is_none() || a.namespace_id == *namespace_id)
        .collect();
    match matches.as_slice() {
        [] => Err(SaeError::AppNotFound { name: name.clone() }),
        [one] => {
            say(format!("application {name} is {}", one.app_id));
            Ok(one.app_id.clone())
        }
        many => Err(SaeError::AppAmbiguous {
            name: name.clone(),
            ids: many
                .iter()
                .map(|a| a.app_id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Calls DeployApplication, waiting out a running change order when `--on-busy wait`, and
/// looking for the change order (never deploying again) when the call times out.
async fn start(
    client: &SaeClient,
    plan: &SaePlan,
    app_id: &str,
    deploy: &Call,
    deadline: Instant,
) -> Result<String, SaeError> {
    let mut announced_busy = false;
    loop {
        match client.send(deploy).await {
            Ok(data) => {
                return data
                    .get("ChangeOrderId")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
                    .ok_or(SaeError::Client(ClientError::Decode {
                        action: "DeployApplication",
                        source: serde::de::Error::missing_field("ChangeOrderId"),
                    }));
            }
            Err(ClientError::Timeout { .. }) => {
                say(
                    "DeployApplication timed out; looking for its change order instead of deploying twice",
                );
                return find_order_by_description(client, plan, app_id, deadline).await;
            }
            Err(err) if err.code() == Some("Application.ChangerOrderRunning") => {
                let running = running_order(client, app_id).await?;
                if plan.on_busy == OnBusy::Fail {
                    return Err(SaeError::Busy {
                        app_id: app_id.to_owned(),
                        change_order_id: running.unwrap_or_else(|| "unknown".to_owned()),
                    });
                }
                if !announced_busy {
                    announced_busy = true;
                    say(format!(
                        "application {app_id} is busy with change order {}; waiting for it to \
                         finish (pass --on-busy fail to fail instead)",
                        running.as_deref().unwrap_or("(not listed yet)")
                    ));
                }
                if let Some(id) = running {
                    wait_until_final(client, plan, &id, deadline).await?;
                } else {
                    sleep_until_next_poll(plan, deadline, "the running change order").await?;
                }
            }
            Err(err) => return Err(err.into()),
        }
    }
}

async fn list_orders(client: &SaeClient, app_id: &str) -> Result<ChangeOrderList, SaeError> {
    let call = Call::get(LIST_ORDERS_PATH, "ListChangeOrders")
        .param("AppId", app_id)
        .param("CurrentPage", "1")
        .param("PageSize", "20");
    Ok(decode("ListChangeOrders", client.send(&call).await?)?)
}

async fn running_order(client: &SaeClient, app_id: &str) -> Result<Option<String>, SaeError> {
    let list = list_orders(client, app_id).await?;
    Ok(list
        .change_order_list
        .into_iter()
        .find(|o| !is_final(o.status))
        .map(|o| o.change_order_id))
}

async fn find_order_by_description(
    client: &SaeClient,
    plan: &SaePlan,
    app_id: &str,
    deadline: Instant,
) -> Result<String, SaeError> {
    // SAE may take a moment to list the order it created; look a few times.
    for _ in 0..5 {
        let list = list_orders(client, app_id).await?;
        if let Some(order) = list
            .change_order_list
            .into_iter()
            .find(|o| o.description.as_deref() == Some(plan.description.as_str()))
        {
            say(format!(
                "found change order {} for this deploy",
                order.change_order_id
            ));
            return Ok(order.change_order_id);
        }
        sleep_until_next_poll(plan, deadline, "the change order of this deploy").await?;
    }
    Err(SaeError::DeployUnknown {
        description: plan.description.clone(),
    })
}

async fn sleep_until_next_poll(
    plan: &SaePlan,
    deadline: Instant,
    what: &str,
) -> Result<(), SaeError> {
    if Instant::now() + plan.poll_interval > deadline {
        return Err(SaeError::TimedOut {
            what: what.to_owned(),
            timeout: plan.timeout,
        });
    }
    tokio::time::sleep(plan.poll_interval).await;
    Ok(())
}

async fn describe(client: &SaeClient, id: &str) -> Result<ChangeOrder, SaeError> {
    let call =
        Call::get(DESCRIBE_PATH, "DescribeChangeOrder").param("ChangeOrderId", id.to_owned());
    Ok(decode("DescribeChangeOrder", client.send(&call).await?)?)
}

/// Waits for someone else's change order to end, whatever its outcome.
async fn wait_until_final(
    client: &SaeClient,
    plan: &SaePlan,
    id: &str,
    deadline: Instant,
) -> Result<(), SaeError> {
    let mut last = None;
    loop {
        let order = describe(client, id).await?;
        if last != Some(order.status) {
            last = Some(order.status);
            say(format!(
                "  running change order {id}: {}",
                status_name(order.status)
            ));
        }
        if is_final(order.status) {
            return Ok(());
        }
        sleep_until_next_poll(plan, deadline, &format!("change order {id} to finish")).await?;
    }
}

/// Follows this deploy's change order, printing each state and batch change once.
async fn follow(
    client: &SaeClient,
    plan: &SaePlan,
    id: &str,
    deadline: Instant,
) -> Result<(), SaeError> {
    let mut last_status = None;
    let mut batches: HashMap<String, i64> = HashMap::new();
    let mut confirmed: Vec<String> = Vec::new();
    let mut told_manual: Vec<String> = Vec::new();
    loop {
        let order = describe(client, id).await?;
        if last_status != Some(order.status) {
            last_status = Some(order.status);
            say(format!("change order {id}: {}", status_name(order.status)));
        }
        let total = order.pipelines.len();
        for (i, p) in order.pipelines.iter().enumerate() {
            if batches.get(&p.pipeline_id) != Some(&p.status) {
                batches.insert(p.pipeline_id.clone(), p.status);
                let name = if p.pipeline_name.is_empty() {
                    format!("batch {}/{total}", i + 1)
                } else {
                    format!("batch {}/{total} ({})", i + 1, p.pipeline_name)
                };
                match p.error_message.as_deref().filter(|m| !m.is_empty()) {
                    Some(msg) => say(format!("  {name}: {}: {msg}", status_name(p.status))),
                    None => say(format!("  {name}: {}", status_name(p.status))),
                }
            }
        }
        match order.status {
            2 => {
                say(format!(
                    "change order {id} succeeded: the new version is serving"
                ));
                return Ok(());
            }
            3 | 6 | 10 => return Err(failure(id, &order, status_name(order.status))),
            1 if order.sub_status == Some(1) => {
                return Err(failure(id, &order, "is failing (SubStatus=1)"));
            }
            8 => {
                let waiting = order
                    .pipelines
                    .iter()
                    .find(|p| p.status == 8)
                    .map(|p| p.pipeline_id.clone())
                    .or(order.current_pipeline_id.clone());
                if let Some(pipeline_id) = waiting {
                    if plan.confirm_batches {
                        if !confirmed.contains(&pipeline_id) {
                            say(format!("  confirming the next batch ({pipeline_id})"));
                            let call = Call::get(CONFIRM_PATH, "ConfirmPipelineBatch")
                                .param("PipelineId", &pipeline_id)
                                .param("Confirm", "true");
                            client.send(&call).await?;
                            confirmed.push(pipeline_id);
                        }
                    } else if !told_manual.contains(&pipeline_id) {
                        say(format!(
                            "  the next batch waits for manual confirmation: confirm it in the \
                             SAE console, or re-run with --confirm-batches (pipeline {pipeline_id})"
                        ));
                        told_manual.push(pipeline_id);
                    }
                }
            }
            _ => {}
        }
        sleep_until_next_poll(plan, deadline, &format!("change order {id}")).await?;
    }
}

fn failure(id: &str, order: &ChangeOrder, state: &str) -> SaeError {
    let mut messages: Vec<String> = Vec::new();
    if let Some(m) = order.error_message.as_deref().filter(|m| !m.is_empty()) {
        messages.push(m.to_owned());
    }
    for p in &order.pipelines {
        if let Some(m) = p.error_message.as_deref().filter(|m| !m.is_empty()) {
            let line = format!("{}: {m}", p.pipeline_name);
            if !messages.contains(&line) {
                messages.push(line);
            }
        }
    }
    if messages.is_empty() {
        messages.push("SAE gave no error message; see the change order in the console".to_owned());
    }
    SaeError::RolloutFailed {
        change_order_id: id.to_owned(),
        state: state.to_owned(),
        messages: messages.join("; "),
    }
}
