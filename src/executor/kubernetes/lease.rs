//! The installation's Leases (`coordination.k8s.io/v1`) in the build namespace: one per
//! replica and one for the leader. This module only reads and writes them; what they mean
//! (who is alive, who leads) is the coordinator's.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams, Preconditions};

use super::client::{Cluster, is_status};
use super::{describe, labels};
use crate::executor::{LeaseError, LeaseRecord, Leases};

/// The Leases of one installation, through the executor's connection (its QPS limit and
/// retries).
pub(crate) struct ClusterLeases {
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) coordinator: String,
    pub(crate) replica: String,
}

impl ClusterLeases {
    fn api(&self) -> Api<Lease> {
        self.cluster.api()
    }

    fn error(&self, verb: &str, name: &str, error: &kube::Error) -> LeaseError {
        if is_status(error, 403) {
            return LeaseError::Forbidden(format!(
                "kiln's service account may not {verb} leases (coordination.k8s.io) in namespace `{}`; grant the Role in docs/kubernetes.md ({})",
                self.cluster.namespace(),
                describe(error)
            ));
        }
        if is_status(error, 409) {
            return LeaseError::Conflict(name.to_owned());
        }
        if is_status(error, 404) {
            return LeaseError::Missing(name.to_owned());
        }
        LeaseError::Failed(format!(
            "cannot {verb} Lease {name} in namespace `{}`: {}",
            self.cluster.namespace(),
            describe(error)
        ))
    }

    fn to_lease(&self, record: &LeaseRecord) -> Lease {
        let time =
            |t: Option<SystemTime>| t.and_then(|t| Timestamp::try_from(t).ok()).map(MicroTime);
        Lease {
            metadata: ObjectMeta {
                name: Some(record.name.clone()),
                namespace: Some(self.cluster.namespace().to_owned()),
                labels: Some(labels::lease_labels(&self.coordinator)),
                resource_version: record.version.clone(),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: record.holder.clone(),
                acquire_time: time(record.acquired),
                renew_time: time(record.renewed),
                lease_duration_seconds: record
                    .duration
                    .map(|d| i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)),
                lease_transitions: Some(record.transitions),
                ..LeaseSpec::default()
            }),
        }
    }
}

/// What kiln reads of a Lease.
fn record(lease: Lease) -> LeaseRecord {
    let spec = lease.spec.unwrap_or_default();
    let time = |t: Option<MicroTime>| t.map(|t| SystemTime::from(t.0));
    LeaseRecord {
        name: lease.metadata.name.unwrap_or_default(),
        holder: spec.holder_identity,
        acquired: time(spec.acquire_time),
        renewed: time(spec.renew_time),
        duration: spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs),
        transitions: spec.lease_transitions.unwrap_or(0),
        version: lease.metadata.resource_version,
    }
}

impl Leases for ClusterLeases {
    fn replica(&self) -> &str {
        &self.replica
    }

    fn coordinator(&self) -> &str {
        &self.coordinator
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<LeaseRecord>, LeaseError>> {
        Box::pin(async move {
            let api = self.api();
            let params = ListParams::default().labels(&labels::leases_selector(&self.coordinator));
            let list = self
                .cluster
                .call_unthrottled(|| api.list(&params))
                .await
                .map_err(|e| self.error("list", "", &e))?;
            Ok(list.items.into_iter().map(record).collect())
        })
    }

    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<LeaseRecord>, LeaseError>> {
        Box::pin(async move {
            let api = self.api();
            let lease = self
                .cluster
                .call_unthrottled(|| api.get_opt(name))
                .await
                .map_err(|e| self.error("get", name, &e))?;
            Ok(lease.map(record))
        })
    }

    fn create<'a>(
        &'a self,
        lease: &'a LeaseRecord,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        Box::pin(async move {
            let api = self.api();
            let mut body = self.to_lease(lease);
            body.metadata.resource_version = None;
            let params = PostParams::default();
            let created = self
                .cluster
                .call_unthrottled(|| api.create(&params, &body))
                .await
                .map_err(|e| self.error("create", &lease.name, &e))?;
            Ok(record(created))
        })
    }

    fn update<'a>(
        &'a self,
        lease: &'a LeaseRecord,
    ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
        Box::pin(async move {
            let api = self.api();
            let body = self.to_lease(lease);
            let params = PostParams::default();
            let replaced = self
                .cluster
                .call_unthrottled(|| api.replace(&lease.name, &params, &body))
                .await
                .map_err(|e| self.error("update", &lease.name, &e))?;
            Ok(record(replaced))
        })
    }

    fn delete<'a>(
        &'a self,
        name: &'a str,
        version: &'a str,
    ) -> BoxFuture<'a, Result<(), LeaseError>> {
        Box::pin(async move {
            let api = self.api();
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: Some(version.to_owned()),
                    uid: None,
                }),
                ..DeleteParams::default()
            };
            match self
                .cluster
                .call_unthrottled(|| api.delete(name, &params))
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if is_status(&e, 404) => Ok(()),
                Err(e) => Err(self.error("delete", name, &e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_reads_back_as_written() {
        let renewed = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some("kiln-ci-r1".into()),
                resource_version: Some("42".into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("r1".into()),
                renew_time: Some(MicroTime(Timestamp::try_from(renewed).unwrap())),
                lease_duration_seconds: Some(15),
                lease_transitions: Some(2),
                ..LeaseSpec::default()
            }),
        };
        let read = record(lease);
        assert_eq!(read.holder.as_deref(), Some("r1"));
        assert_eq!(read.renewed, Some(renewed));
        assert_eq!(read.duration, Some(Duration::from_secs(15)));
        assert_eq!(read.transitions, 2);
        assert_eq!(read.version.as_deref(), Some("42"));
    }
}
