//! What a build may pull and with which logins: `allowed_images` / `allowed_services` globs,
//! the pull policy among `allowed_pull_policies`, the build container's `image:kubernetes:user`,
//! and the registry logins (`kubernetes.io/dockerconfigjson`) that ride in the build's Secret.

use std::collections::BTreeMap;

use base64::Engine;
use globset::{GlobBuilder, GlobMatcher};

use super::config::KubernetesConfig;
use super::sizing::SpecError;
use crate::build::{Build, PullPolicy, RegistryAuth, Workload};
use crate::problem::Problem;

/// The key of a `kubernetes.io/dockerconfigjson` Secret.
pub(super) const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";
/// The type of a Secret holding registry logins.
pub(super) const DOCKER_CONFIG_TYPE: &str = "kubernetes.io/dockerconfigjson";

/// A glob over image references: `*` stays within a path segment, `**` crosses them (as
/// gitlab-runner's `allowed_images`).
fn matcher(pattern: &str) -> Result<GlobMatcher, globset::Error> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
}

/// Whether `image` matches one of `patterns` (none: any image).
fn allowed(image: &str, patterns: &[String]) -> bool {
    patterns.is_empty()
        || patterns
            .iter()
            .filter_map(|p| matcher(p).ok())
            .any(|m| m.is_match(image))
}

/// Refuses a build whose image or a service's is not allowed, before anything is created.
///
/// # Errors
/// The image that is not allowed, with the patterns that would allow one.
pub(super) fn check_allowed(build: &Build, config: &KubernetesConfig) -> Result<(), SpecError> {
    let Workload::KilnAgent { image, services } = &build.workload else {
        return Ok(());
    };
    // The configured default image is the administrator's own choice: always allowed.
    if let Some(image) = image.as_ref().filter(|i| !i.name.trim().is_empty())
        && !allowed(&image.name, &config.allowed_images)
    {
        return Err(SpecError(format!(
            "the job's image `{}` is not allowed on this runner (kubernetes.allowed_images: {})",
            image.name,
            config.allowed_images.join(", ")
        )));
    }
    for service in services {
        if !allowed(&service.image.name, &config.allowed_services) {
            return Err(SpecError(format!(
                "the service image `{}` is not allowed on this runner (kubernetes.allowed_services: {})",
                service.image.name,
                config.allowed_services.join(", ")
            )));
        }
    }
    Ok(())
}

/// gitlab-runner's name of a pull policy.
fn policy_name(policy: PullPolicy) -> &'static str {
    match policy {
        PullPolicy::Always => "always",
        PullPolicy::IfNotPresent => "if-not-present",
        PullPolicy::Never => "never",
    }
}

fn parse_policy(name: &str) -> Option<PullPolicy> {
    match name.trim() {
        "always" => Some(PullPolicy::Always),
        "if-not-present" => Some(PullPolicy::IfNotPresent),
        "never" => Some(PullPolicy::Never),
        _ => None,
    }
}

/// The pull policy of an image whose job asks for `asked` (in order): the first of
/// [`pull_policies`].
///
/// # Errors
/// None of the policies asked for is allowed; the message names both lists.
pub(super) fn pull_policy(
    asked: &[PullPolicy],
    config: &KubernetesConfig,
) -> Result<Option<&'static str>, SpecError> {
    Ok(pull_policies(asked, config)?.first().copied())
}

/// The pull policies (Kubernetes' names) an image whose job asks for `asked` is tried with, in
/// order, as gitlab-runner: those the configuration allows, of the job's list or, when the
/// job asks for none, of the configured `pull_policy`; with neither, the first allowed one
/// (none at all: the cluster's default).
///
/// # Errors
/// None of the policies asked for is allowed; the message names both lists.
pub(super) fn pull_policies(
    asked: &[PullPolicy],
    config: &KubernetesConfig,
) -> Result<Vec<&'static str>, SpecError> {
    let allowed: Vec<PullPolicy> = config
        .allowed_pull_policies
        .iter()
        .filter_map(|p| parse_policy(p))
        .collect();
    let (candidates, origin) = if asked.is_empty() {
        (
            config
                .pull_policy
                .iter()
                .filter_map(|p| parse_policy(p))
                .collect(),
            "kubernetes.pull_policy",
        )
    } else {
        (asked.to_vec(), "the job's pull_policy")
    };
    if candidates.is_empty() {
        return Ok(allowed
            .first()
            .map(|p| kubernetes_policy(*p))
            .into_iter()
            .collect());
    }
    let mut tried: Vec<&'static str> = Vec::new();
    for policy in candidates
        .iter()
        .filter(|p| allowed.is_empty() || allowed.contains(p))
    {
        let name = kubernetes_policy(*policy);
        if !tried.contains(&name) {
            tried.push(name);
        }
    }
    (!tried.is_empty()).then_some(tried).ok_or_else(|| {
        let names = |list: &[PullPolicy]| {
            list.iter()
                .map(|p| policy_name(*p))
                .collect::<Vec<_>>()
                .join(", ")
        };
        SpecError(format!(
            "{origin} ({}) is not one of kubernetes.allowed_pull_policies ({})",
            names(&candidates),
            names(&allowed)
        ))
    })
}

/// gitlab-runner's name of a pull policy Kubernetes names `kubernetes` (as is when unknown).
pub(super) fn runner_policy_name(kubernetes: &str) -> &str {
    match kubernetes {
        "Always" => "always",
        "IfNotPresent" => "if-not-present",
        "Never" => "never",
        other => other,
    }
}

/// Kubernetes' name of a pull policy.
fn kubernetes_policy(policy: PullPolicy) -> &'static str {
    match policy {
        PullPolicy::Always => "Always",
        PullPolicy::IfNotPresent => "IfNotPresent",
        PullPolicy::Never => "Never",
    }
}

/// The `runAsUser` and `runAsGroup` of `image:kubernetes:user` (`uid` or `uid:gid`), within
/// `allowed_users` and `allowed_groups`.
///
/// # Errors
/// Not numeric (Kubernetes runs containers as numeric ids only), or not allowed.
pub(super) fn user(
    value: &str,
    config: &KubernetesConfig,
) -> Result<(i64, Option<i64>), SpecError> {
    let (uid, gid) = parse_user(value)?;
    let listed = |list: &[String], id: i64| {
        list.is_empty() || list.iter().any(|allowed| allowed.trim() == id.to_string())
    };
    if !listed(&config.allowed_users, uid) {
        return Err(SpecError(format!(
            "image:kubernetes:user {uid} is not one of kubernetes.allowed_users ({})",
            config.allowed_users.join(", ")
        )));
    }
    if let Some(gid) = gid
        && !listed(&config.allowed_groups, gid)
    {
        return Err(SpecError(format!(
            "image:kubernetes:user group {gid} is not one of kubernetes.allowed_groups ({})",
            config.allowed_groups.join(", ")
        )));
    }
    Ok((uid, gid))
}

fn parse_user(value: &str) -> Result<(i64, Option<i64>), SpecError> {
    let bad = || {
        SpecError(format!(
            "image:kubernetes:user `{value}` must be a numeric uid or uid:gid"
        ))
    };
    let (uid, gid) = match value.split_once(':') {
        Some((uid, gid)) => (uid, Some(gid)),
        None => (value, None),
    };
    let uid = uid
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|u| *u >= 0)
        .ok_or_else(bad)?;
    let gid = match gid {
        Some(gid) => Some(
            gid.trim()
                .parse::<i64>()
                .ok()
                .filter(|g| *g >= 0)
                .ok_or_else(bad)?,
        ),
        None => None,
    };
    Ok((uid, gid))
}

/// The registry logins of `build` as a Docker `config.json`, the job's own
/// `DOCKER_AUTH_CONFIG` first, then `kubernetes.docker_auth_config`, then those its CI server
/// issued; the first login for a registry wins. `None` without any.
pub(super) fn docker_config(build: &Build, config: &KubernetesConfig) -> Option<Vec<u8>> {
    let configured = config
        .docker_auth_config
        .as_deref()
        .and_then(|text| RegistryAuth::from_docker_config(text).ok())
        .unwrap_or_default();
    let ordered = build
        .registry_auths
        .iter()
        .filter(|a| !a.issued)
        .chain(configured.iter())
        .chain(build.registry_auths.iter().filter(|a| a.issued));
    let mut auths = BTreeMap::new();
    for auth in ordered {
        auths.entry(auth.registry.clone()).or_insert_with(|| {
            serde_json::json!({
                "username": auth.username,
                "password": auth.password,
                "auth": base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", auth.username, auth.password)),
            })
        });
    }
    if auths.is_empty() {
        return None;
    }
    serde_json::to_vec(&serde_json::json!({ "auths": auths })).ok()
}

/// What is wrong with the image settings, by config path.
pub(super) fn problems(config: &KubernetesConfig) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (field, patterns) in [
        ("allowed_images", &config.allowed_images),
        ("allowed_services", &config.allowed_services),
    ] {
        for (index, pattern) in patterns.iter().enumerate() {
            if let Err(e) = matcher(pattern) {
                problems.push(Problem {
                    path: format!("kubernetes.{field}[{index}]"),
                    message: format!("`{pattern}` is not a glob: {e}"),
                });
            }
        }
    }
    for (field, names) in [
        ("allowed_pull_policies", &config.allowed_pull_policies),
        ("pull_policy", &config.pull_policy),
    ] {
        for (index, name) in names.iter().enumerate() {
            if parse_policy(name).is_none() {
                problems.push(Problem {
                    path: format!("kubernetes.{field}[{index}]"),
                    message: format!("`{name}` is not `always`, `if-not-present` or `never`"),
                });
            }
        }
    }
    if let Some(text) = &config.docker_auth_config
        && let Err(message) = RegistryAuth::from_docker_config(text)
    {
        problems.push(Problem {
            path: "kubernetes.docker_auth_config".into(),
            message,
        });
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(allowed: &[&str], default: &[&str]) -> KubernetesConfig {
        KubernetesConfig {
            allowed_pull_policies: allowed.iter().map(|s| (*s).to_owned()).collect(),
            pull_policy: default.iter().map(|s| (*s).to_owned()).collect(),
            ..KubernetesConfig::default()
        }
    }

    #[test]
    fn pull_policies_are_the_allowed_ones_in_the_jobs_order() {
        let asked = [
            PullPolicy::Always,
            PullPolicy::Never,
            PullPolicy::IfNotPresent,
            PullPolicy::Always,
        ];
        assert_eq!(
            pull_policies(&asked, &config(&[], &[])).unwrap(),
            ["Always", "Never", "IfNotPresent"]
        );
        assert_eq!(
            pull_policies(&asked, &config(&["if-not-present", "always"], &[])).unwrap(),
            ["Always", "IfNotPresent"]
        );
        assert_eq!(
            pull_policies(&[], &config(&[], &["always", "if-not-present"])).unwrap(),
            ["Always", "IfNotPresent"]
        );
        assert!(pull_policies(&[], &config(&[], &[])).unwrap().is_empty());
    }

    #[test]
    fn the_first_allowed_pull_policy_of_the_job_wins() {
        let asked = [PullPolicy::Always, PullPolicy::IfNotPresent];
        assert_eq!(
            pull_policy(&asked, &config(&[], &[])).unwrap(),
            Some("Always")
        );
        assert_eq!(
            pull_policy(&asked, &config(&["if-not-present"], &[])).unwrap(),
            Some("IfNotPresent")
        );
        let refused = pull_policy(&[PullPolicy::Always], &config(&["never"], &[])).unwrap_err();
        assert_eq!(
            refused.0,
            "the job's pull_policy (always) is not one of kubernetes.allowed_pull_policies (never)"
        );
        assert_eq!(
            pull_policy(&[], &config(&[], &["never"])).unwrap(),
            Some("Never")
        );
        assert_eq!(pull_policy(&[], &config(&[], &[])).unwrap(), None);
    }

    #[test]
    fn image_globs_keep_star_within_a_path_segment() {
        let patterns = vec![
            "registry.example.com/ci/*".to_owned(),
            "alpine:*".to_owned(),
        ];
        assert!(allowed("registry.example.com/ci/builder:1", &patterns));
        assert!(allowed("alpine:3", &patterns));
        assert!(!allowed("registry.example.com/ci/deep/builder", &patterns));
        assert!(!allowed("evil.example/alpine:3", &patterns));
        assert!(allowed("anything", &[]));
    }

    #[test]
    fn a_user_is_numeric_and_allowed() {
        let any = KubernetesConfig::default();
        assert_eq!(user("1000", &any).unwrap(), (1000, None));
        assert_eq!(user("1000:2000", &any).unwrap(), (1000, Some(2000)));
        assert!(user("root", &any).is_err());
        assert!(user("-1", &any).is_err());
        let listed = KubernetesConfig {
            allowed_users: vec!["1000".into()],
            allowed_groups: vec!["1000".into()],
            ..KubernetesConfig::default()
        };
        assert!(user("1000:1000", &listed).is_ok());
        let refused = user("0", &listed).unwrap_err();
        assert_eq!(
            refused.0,
            "image:kubernetes:user 0 is not one of kubernetes.allowed_users (1000)"
        );
        assert!(user("1000:0", &listed).is_err());
    }
}
