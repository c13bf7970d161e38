//! Whose a build is. A build's owner is one fact for its whole life: the `kiln.dev/replica`
//! label of its Secret, which exists from before the pod until after it (the pod's label only
//! mirrors it, for the replica following the build to notice a hand-over); a pod without its
//! Secret holds its own. A claim writes it on the condition that it is as it was listed, so of
//! replicas claiming a build at once exactly one wins.

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams};

use super::client::is_status;
use super::{CLAIM_ATTEMPTS, KubernetesExecutor, describe, labels};
use crate::build::{Found, Recorded};
use crate::executor::Claim;

impl KubernetesExecutor {
    /// Makes `found` this replica's: its owner label (on its Secret, or on its pod when the
    /// Secret is gone) is set to this replica on the condition that it is still as it was
    /// listed (its resourceVersion), so of replicas claiming it at once exactly one wins; then
    /// the pod's label follows, which tells a replica still following it that it was handed
    /// over. A conflict is read again: when the owner label is still the listed one, only
    /// something else moved on, and the claim is made again.
    pub(super) async fn claim_build(&self, found: &Found) -> Claim {
        let Some(replica) = self.config.replica.as_deref() else {
            return Claim::Won;
        };
        if found.replica.as_deref() != Some(replica) {
            match self.claim_owner(found, replica).await {
                Claim::Won => {}
                other => return other,
            }
        }
        if let Recorded::OnSecrets { build } = &found.recorded
            && found.exists
            && build.as_deref() != Some(replica)
            && let Err(e) = self.mark_pod(&found.name, replica).await
            && !is_status(&e, 404)
        {
            // The build is this replica's (its Secret says so) but its pod still names the
            // replica it came from: following it now would take that for a hand-over. The next
            // claim (a take-over pass, or this replica's next start) brings the pod in line.
            tracing::warn!(build = %found.name, error = %describe(&e), "claimed the build but cannot relabel its pod");
            return self.claim_failed(found, replica, &e);
        }
        Claim::Won
    }

    /// The conditional write of the owner label, retried while only something other than the
    /// owner changed.
    async fn claim_owner(&self, found: &Found, replica: &str) -> Claim {
        let mut version = found.version.clone();
        for _ in 0..CLAIM_ATTEMPTS {
            match self.try_claim(found, replica, version.as_deref()).await {
                Ok(()) => return Claim::Won,
                Err(e) if is_status(&e, 404) => return Claim::Lost,
                Err(e) if is_status(&e, 409) => match self.current(found).await {
                    Ok(Some((labelled, current))) if labelled == found.replica => {
                        version = current;
                    }
                    Ok(_) => return Claim::Lost,
                    Err(e) => return self.claim_failed(found, replica, &e),
                },
                Err(e) => return self.claim_failed(found, replica, &e),
            }
        }
        Claim::Failed(format!(
            "build {} kept changing while replica {replica} claimed it",
            found.name
        ))
    }

    /// One conditional write of `found`'s owner label as of `version`.
    async fn try_claim(
        &self,
        found: &Found,
        replica: &str,
        version: Option<&str>,
    ) -> Result<(), kube::Error> {
        let patch = labels::owner_patch(replica, version);
        let params = PatchParams::default();
        let patch = Patch::Merge(&patch);
        match found.recorded {
            Recorded::OnSecrets { .. } => {
                let secrets: Api<Secret> = self.api_of(&found.name);
                self.cluster
                    .call(|| secrets.patch(&found.name, &params, &patch))
                    .await?;
            }
            Recorded::OnBuild => {
                let pods: Api<Pod> = self.api_of(&found.name);
                let pod = self
                    .cluster
                    .call(|| pods.patch(&found.name, &params, &patch))
                    .await?;
                // Following starts from the claimed state, not from the listed one (which
                // names the replica the build is taken from).
                self.pods.written(pod);
            }
        }
        Ok(())
    }

    /// Labels pod `name` with `replica`, the owner its Secret names now (unconditionally:
    /// only the owner writes it).
    async fn mark_pod(&self, name: &str, replica: &str) -> Result<(), kube::Error> {
        let patch = labels::mirror_patch(replica);
        let pods: Api<Pod> = self.api_of(name);
        let params = PatchParams::default();
        let patch = Patch::Merge(&patch);
        let pod = self
            .cluster
            .call(|| pods.patch(name, &params, &patch))
            .await?;
        self.pods.written(pod);
        Ok(())
    }

    /// The owner label and resourceVersion of `found`'s owner object now (`None`: it is gone).
    async fn current(
        &self,
        found: &Found,
    ) -> Result<Option<(Option<String>, Option<String>)>, kube::Error> {
        let metadata = match found.recorded {
            Recorded::OnBuild => {
                let pods: Api<Pod> = self.api_of(&found.name);
                self.cluster
                    .call(|| pods.get_opt(&found.name))
                    .await?
                    .map(|p| p.metadata)
            }
            Recorded::OnSecrets { .. } => {
                let secrets: Api<Secret> = self.api_of(&found.name);
                self.cluster
                    .call(|| secrets.get_opt(&found.name))
                    .await?
                    .map(|s| s.metadata)
            }
        };
        Ok(metadata.map(|m| (labels::replica_of(&m), m.resource_version)))
    }

    fn claim_failed(&self, found: &Found, replica: &str, error: &kube::Error) -> Claim {
        Claim::Failed(format!(
            "cannot label build {} with replica {replica} in namespace `{}`: {}",
            found.name,
            self.namespace_of(&found.name),
            describe(error)
        ))
    }
}
