//! The registry logins of a GitLab job: its `DOCKER_AUTH_CONFIG` variable first, then the
//! `credentials` GitLab issued for it (the project's registry with the job token), as
//! gitlab-runner resolves them.

use crate::build::RegistryAuth;
use crate::gitlab::payload::JobPayload;

/// The variable holding a Docker `config.json` with registry logins.
const DOCKER_AUTH_CONFIG: &str = "DOCKER_AUTH_CONFIG";

/// The job's registry logins, the job's own `DOCKER_AUTH_CONFIG` before GitLab's credentials.
pub(super) fn auths(job: &JobPayload) -> Vec<RegistryAuth> {
    let mut out = match job.variable(DOCKER_AUTH_CONFIG).map(str::trim) {
        Some(text) if !text.is_empty() => match RegistryAuth::from_docker_config(text) {
            Ok(auths) => auths,
            Err(problem) => {
                // Pulls then go without these logins, and a registry that needs one says so
                // in the job's trace.
                tracing::warn!(
                    job = job.id,
                    "the job's {DOCKER_AUTH_CONFIG} {problem}; it is ignored"
                );
                Vec::new()
            }
        },
        _ => Vec::new(),
    };
    out.extend(
        job.credentials
            .iter()
            .filter(|c| c.kind == "registry" && !c.url.trim().is_empty())
            .map(|c| RegistryAuth {
                registry: c.url.trim().to_owned(),
                username: c.username.clone(),
                password: c.password.clone(),
                issued: true,
            }),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gitlab::payload::{Credential, Variable};

    fn job(auth_config: Option<&str>) -> JobPayload {
        JobPayload {
            id: 7,
            variables: auth_config
                .map(|text| Variable {
                    key: DOCKER_AUTH_CONFIG.into(),
                    value: text.into(),
                    ..Variable::default()
                })
                .into_iter()
                .collect(),
            credentials: vec![Credential {
                kind: "registry".into(),
                url: "registry.example.com:5005".into(),
                username: "gitlab-ci-token".into(),
                password: "job-token".into(),
            }],
            ..JobPayload::default()
        }
    }

    #[test]
    fn the_jobs_docker_auth_config_comes_before_gitlabs_credentials() {
        // base64("robot:s3cret")
        let auths = auths(&job(Some(
            r#"{"auths":{"registry.example.com:5005":{"auth":"cm9ib3Q6czNjcmV0"}},"credsStore":"desktop"}"#,
        )));
        let logins: Vec<(&str, &str, &str, bool)> = auths
            .iter()
            .map(|a| {
                (
                    a.registry.as_str(),
                    a.username.as_str(),
                    a.password.as_str(),
                    a.issued,
                )
            })
            .collect();
        assert_eq!(
            logins,
            [
                ("registry.example.com:5005", "robot", "s3cret", false),
                (
                    "registry.example.com:5005",
                    "gitlab-ci-token",
                    "job-token",
                    true
                ),
            ]
        );
    }

    #[test]
    fn a_broken_docker_auth_config_leaves_gitlabs_credentials() {
        let auths = auths(&job(Some("{not json")));
        assert_eq!(auths.len(), 1);
        assert!(auths[0].issued);
        let error =
            RegistryAuth::from_docker_config(r#"{"auths":{"r":{"auth":"!!"}}}"#).unwrap_err();
        assert!(error.contains("auths.\"r\".auth"), "{error}");
    }
}
