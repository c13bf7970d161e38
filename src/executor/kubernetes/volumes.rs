//! `[kubernetes.volumes]`: the volumes an administrator mounts into every build's build and
//! service containers (a shared cache PVC, a CA bundle from a ConfigMap, a `settings.xml`
//! Secret, a docker socket), typed as gitlab-runner's `[runners.kubernetes.volumes]`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIVolumeSource, ConfigMapVolumeSource, EmptyDirVolumeSource, HostPathVolumeSource, KeyToPath,
    LocalObjectReference, PersistentVolumeClaimVolumeSource, SecretVolumeSource, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::Deserialize;

use super::quantity;
use crate::problem::Problem;

/// The names of kiln's own volumes, which configured ones must not take.
pub(super) const RESERVED: &[&str] = &["kiln-bin", "builds", "job", "workspace"];

/// Volumes by kind, each a list (`[[kubernetes.volumes.pvc]]`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Volumes {
    /// PersistentVolumeClaims (`name` is the claim's).
    pub pvc: Vec<ClaimVolume>,
    /// ConfigMaps (`name` is the ConfigMap's).
    pub config_map: Vec<ProjectedVolume>,
    /// Secrets (`name` is the Secret's).
    pub secret: Vec<ProjectedVolume>,
    /// Directories of the node (`host_path`).
    pub host_path: Vec<HostPathVolume>,
    /// Empty directories living as long as the pod.
    pub empty_dir: Vec<EmptyDirVolume>,
    /// Inline CSI volumes.
    pub csi: Vec<CsiVolume>,
}

/// Where and how a volume is mounted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mount {
    /// The path in the containers.
    pub mount_path: String,
    /// Mount only this path inside the volume.
    pub sub_path: Option<String>,
    /// Mount read-only.
    pub read_only: bool,
}

/// `[[kubernetes.volumes.pvc]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClaimVolume {
    /// The claim's name, also the volume's.
    pub name: String,
    #[serde(flatten)]
    pub mount: Mount,
}

/// `[[kubernetes.volumes.config_map]]` and `[[kubernetes.volumes.secret]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectedVolume {
    /// The ConfigMap's or Secret's name, also the volume's.
    pub name: String,
    /// Only these keys, each to its path in the volume (default: every key as a file).
    pub items: BTreeMap<String, String>,
    #[serde(flatten)]
    pub mount: Mount,
}

/// `[[kubernetes.volumes.host_path]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostPathVolume {
    /// The volume's name.
    pub name: String,
    /// The node's path (default: `mount_path`).
    pub host_path: Option<String>,
    #[serde(flatten)]
    pub mount: Mount,
}

/// `[[kubernetes.volumes.empty_dir]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmptyDirVolume {
    /// The volume's name.
    pub name: String,
    /// `Memory` for a tmpfs (default: the node's disk).
    pub medium: Option<String>,
    /// Its size limit (`1Gi`).
    pub size_limit: Option<String>,
    #[serde(flatten)]
    pub mount: Mount,
}

/// `[[kubernetes.volumes.csi]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CsiVolume {
    /// The volume's name.
    pub name: String,
    /// The CSI driver.
    pub driver: String,
    /// The file system type (`ext4`).
    pub fs_type: Option<String>,
    /// The driver's attributes.
    pub volume_attributes: BTreeMap<String, String>,
    #[serde(flatten)]
    pub mount: Mount,
}

impl Volumes {
    /// Every configured volume with its kind (config key), index among its kind and mount, in
    /// kind order.
    fn all(&self) -> Vec<(&'static str, usize, Volume, &Mount)> {
        let base = |name: &str| Volume {
            name: name.to_owned(),
            ..Volume::default()
        };
        let items = |items: &BTreeMap<String, String>| {
            (!items.is_empty()).then(|| {
                items
                    .iter()
                    .map(|(key, path)| KeyToPath {
                        key: key.clone(),
                        path: path.clone(),
                        mode: None,
                    })
                    .collect()
            })
        };
        let mut out = Vec::new();
        for (index, v) in self.pvc.iter().enumerate() {
            let volume = Volume {
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: v.name.clone(),
                    read_only: Some(v.mount.read_only),
                }),
                ..base(&v.name)
            };
            out.push(("pvc", index, volume, &v.mount));
        }
        for (index, v) in self.config_map.iter().enumerate() {
            let volume = Volume {
                config_map: Some(ConfigMapVolumeSource {
                    name: v.name.clone(),
                    items: items(&v.items),
                    ..ConfigMapVolumeSource::default()
                }),
                ..base(&v.name)
            };
            out.push(("config_map", index, volume, &v.mount));
        }
        for (index, v) in self.secret.iter().enumerate() {
            let volume = Volume {
                secret: Some(SecretVolumeSource {
                    secret_name: Some(v.name.clone()),
                    items: items(&v.items),
                    ..SecretVolumeSource::default()
                }),
                ..base(&v.name)
            };
            out.push(("secret", index, volume, &v.mount));
        }
        for (index, v) in self.host_path.iter().enumerate() {
            let volume = Volume {
                host_path: Some(HostPathVolumeSource {
                    path: v
                        .host_path
                        .clone()
                        .unwrap_or_else(|| v.mount.mount_path.clone()),
                    type_: None,
                }),
                ..base(&v.name)
            };
            out.push(("host_path", index, volume, &v.mount));
        }
        for (index, v) in self.empty_dir.iter().enumerate() {
            let volume = Volume {
                empty_dir: Some(EmptyDirVolumeSource {
                    medium: v.medium.clone(),
                    size_limit: v.size_limit.clone().map(Quantity),
                }),
                ..base(&v.name)
            };
            out.push(("empty_dir", index, volume, &v.mount));
        }
        for (index, v) in self.csi.iter().enumerate() {
            let volume = Volume {
                csi: Some(CSIVolumeSource {
                    driver: v.driver.clone(),
                    fs_type: v.fs_type.clone(),
                    read_only: Some(v.mount.read_only),
                    volume_attributes: (!v.volume_attributes.is_empty())
                        .then(|| v.volume_attributes.clone()),
                    node_publish_secret_ref: None::<LocalObjectReference>,
                }),
                ..base(&v.name)
            };
            out.push(("csi", index, volume, &v.mount));
        }
        out
    }

    /// The pod's volumes for the configured ones.
    pub(super) fn volumes(&self) -> Vec<Volume> {
        self.all()
            .into_iter()
            .map(|(_, _, volume, _)| volume)
            .collect()
    }

    /// The mounts of the configured volumes, for a build or service container.
    pub(super) fn mounts(&self) -> Vec<VolumeMount> {
        self.all()
            .into_iter()
            .map(|(_, _, volume, mount)| VolumeMount {
                name: volume.name,
                mount_path: mount.mount_path.clone(),
                sub_path: mount.sub_path.clone().filter(|p| !p.is_empty()),
                read_only: mount.read_only.then_some(true),
                ..VolumeMount::default()
            })
            .collect()
    }

    /// What is wrong with the configured volumes, by config path.
    pub(super) fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut seen_names = std::collections::BTreeSet::new();
        let mut seen_paths = std::collections::BTreeSet::new();
        for (kind, index, volume, mount) in self.all() {
            let name = volume.name.as_str();
            let path = format!("kubernetes.volumes.{kind}[{index}]");
            let mut problem = |field: &str, message: String| {
                problems.push(Problem {
                    path: format!("{path}.{field}"),
                    message,
                });
            };
            if !super::config::is_dns_label(name) {
                problem(
                    "name",
                    format!(
                        "`{name}` is not a volume name (lowercase letters, digits and `-`, at most 63)"
                    ),
                );
            } else if RESERVED.contains(&name) {
                problem(
                    "name",
                    format!("`{name}` is kiln's own volume; pick another name"),
                );
            } else if !seen_names.insert(name.to_owned()) {
                problem("name", format!("`{name}` names two volumes"));
            }
            if !mount.mount_path.starts_with('/') {
                problem("mount_path", "must be an absolute path".into());
            } else if ["/builds", "/kiln"]
                .iter()
                .any(|own| is_within(&mount.mount_path, own))
            {
                problem(
                    "mount_path",
                    format!(
                        "`{}` is inside kiln's own /builds or /kiln",
                        mount.mount_path
                    ),
                );
            } else if !seen_paths.insert(mount.mount_path.trim_end_matches('/').to_owned()) {
                problem(
                    "mount_path",
                    format!("`{}` is mounted twice", mount.mount_path),
                );
            }
            if let Some(sub) = &mount.sub_path
                && (sub.starts_with('/') || sub.split('/').any(|part| part == ".."))
            {
                problem("sub_path", "must be a relative path without `..`".into());
            }
        }
        for (index, v) in self.empty_dir.iter().enumerate() {
            if let Some(limit) = &v.size_limit
                && quantity::parse(limit).is_none()
            {
                problems.push(Problem {
                    path: format!("kubernetes.volumes.empty_dir[{index}].size_limit"),
                    message: format!("`{limit}` is not a quantity like 1Gi"),
                });
            }
        }
        for (index, v) in self.csi.iter().enumerate() {
            if v.driver.trim().is_empty() {
                problems.push(Problem {
                    path: format!("kubernetes.volumes.csi[{index}].driver"),
                    message: "must name the CSI driver".into(),
                });
            }
        }
        problems
    }
}

/// Whether `path` is `dir` or below it.
fn is_within(path: &str, dir: &str) -> bool {
    let path = path.trim_end_matches('/');
    path == dir || path.starts_with(&format!("{dir}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Volumes {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn each_kind_becomes_its_volume_and_a_mount() {
        let volumes = parsed(
            r#"
[[pvc]]
name = "cache"
mount_path = "/cache"
[[config_map]]
name = "ca-bundle"
mount_path = "/etc/ssl/custom"
read_only = true
items = { "ca.crt" = "ca.crt" }
[[host_path]]
name = "docker-sock"
mount_path = "/var/run/docker.sock"
[[empty_dir]]
name = "scratch"
mount_path = "/scratch"
medium = "Memory"
size_limit = "1Gi"
[[csi]]
name = "secrets-store"
mount_path = "/mnt/secrets"
driver = "secrets-store.csi.k8s.io"
read_only = true
sub_path = "app"
"#,
        );
        assert!(volumes.problems().is_empty(), "{:?}", volumes.problems());
        let pod_volumes = volumes.volumes();
        let names: Vec<&str> = pod_volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "cache",
                "ca-bundle",
                "docker-sock",
                "scratch",
                "secrets-store"
            ]
        );
        assert_eq!(
            pod_volumes[0]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "cache"
        );
        assert_eq!(
            pod_volumes[2].host_path.as_ref().unwrap().path,
            "/var/run/docker.sock"
        );
        let mounts = volumes.mounts();
        assert_eq!(mounts[1].read_only, Some(true));
        assert_eq!(mounts[4].sub_path.as_deref(), Some("app"));
    }

    #[test]
    fn clashing_names_and_paths_are_named_by_their_config_path() {
        let volumes = parsed(
            r#"
[[pvc]]
name = "builds"
mount_path = "/cache"
[[config_map]]
name = "ca"
mount_path = "/builds/ca"
[[secret]]
name = "ca"
mount_path = "relative"
sub_path = "../up"
"#,
        );
        let problems: Vec<String> = volumes
            .problems()
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect();
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(problems[0].starts_with("kubernetes.volumes.pvc[0].name"));
        assert!(problems[1].starts_with("kubernetes.volumes.config_map[0].mount_path"));
        assert!(problems[2].starts_with("kubernetes.volumes.secret[0].name"));
        assert!(problems[3].starts_with("kubernetes.volumes.secret[0].mount_path"));
        assert!(problems[4].starts_with("kubernetes.volumes.secret[0].sub_path"));
    }
}
