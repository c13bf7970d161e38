//! What a build cost: the seconds its pod existed × its size × the price of its resource class,
//! the way serverless clusters (Alibaba ECI, GKE Autopilot, EKS Fargate) bill pods.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::history::BuildRecord;
use crate::build::Outcome;
use crate::executor::Footprint;
use crate::problem::Problem;

/// `[cost]`: the prices every resource class pays unless it sets its own.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CostConfig {
    /// What a vCPU-hour costs (0: CPU is not priced).
    pub price_per_vcpu_hour: f64,
    /// What a GiB-hour of memory costs (0: memory is not priced).
    pub price_per_gib_hour: f64,
    /// The currency the prices are in, shown next to costs; it changes no figure.
    pub currency: String,
}

impl Default for CostConfig {
    fn default() -> Self {
        Self {
            price_per_vcpu_hour: 0.0,
            price_per_gib_hour: 0.0,
            currency: "USD".into(),
        }
    }
}

impl CostConfig {
    /// The prices, for the coordinator.
    pub fn prices(&self) -> Prices {
        Prices {
            per_vcpu_hour: self.price_per_vcpu_hour,
            per_gib_hour: self.price_per_gib_hour,
        }
    }

    /// Every problem of `[cost]`.
    pub(crate) fn problems(&self) -> Vec<Problem> {
        [
            ("cost.price_per_vcpu_hour", self.price_per_vcpu_hour),
            ("cost.price_per_gib_hour", self.price_per_gib_hour),
        ]
        .into_iter()
        .filter(|(_, price)| !(price.is_finite() && *price >= 0.0))
        .map(|(path, _)| Problem::new(path, "must be a price of 0 or more"))
        .collect()
    }
}

/// The default prices of a vCPU-hour and a GiB-hour.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Prices {
    /// A vCPU-hour.
    pub per_vcpu_hour: f64,
    /// A GiB-hour of memory.
    pub per_gib_hour: f64,
}

impl Prices {
    /// What `seconds` of `footprint` cost: its class's prices where it sets them, these
    /// otherwise. `None` when neither CPU nor memory has a price (cost not shown).
    pub(crate) fn cost(&self, footprint: &Footprint, seconds: f64) -> Option<f64> {
        let per_vcpu = footprint.price_per_vcpu_hour.unwrap_or(self.per_vcpu_hour);
        let per_gib = footprint.price_per_gib_hour.unwrap_or(self.per_gib_hour);
        if per_vcpu <= 0.0 && per_gib <= 0.0 {
            return None;
        }
        let hours = seconds.max(0.0) / 3600.0;
        Some(hours * (footprint.vcpu * per_vcpu + footprint.gib * per_gib))
    }

    /// What build `record`, ended as `outcome` at `at`, cost; `None` when nothing is known to
    /// have cost anything.
    ///
    /// # Caveats
    /// Only a pod that was created costs anything. A build kiln stopped following (`Lost`)
    /// runs on after this coordinator: it is not charged for a part of its life here, and the
    /// coordinator that adopts it does not know its size (documented in `[cost]`).
    pub(crate) fn of_build(
        &self,
        record: &BuildRecord,
        outcome: Outcome,
        at: SystemTime,
    ) -> Option<f64> {
        let footprint = record.footprint.as_ref()?;
        if outcome == Outcome::Lost || record.created.is_none() {
            return None;
        }
        let seconds = at
            .duration_since(record.billed_from())
            .unwrap_or_default()
            .as_secs_f64();
        self.cost(footprint, seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn footprint(vcpu: f64, gib: f64) -> Footprint {
        Footprint {
            class: Some("spot".into()),
            vcpu,
            gib,
            ..Footprint::default()
        }
    }

    #[test]
    fn cost_is_pod_hours_times_size_times_price() {
        let prices = Prices {
            per_vcpu_hour: 0.04,
            per_gib_hour: 0.005,
        };
        // 2 vCPU and 4 GiB for half an hour: (2 × 0.04 + 4 × 0.005) / 2.
        let cost = prices.cost(&footprint(2.0, 4.0), 1800.0).unwrap();
        assert!((cost - 0.05).abs() < 1e-12, "{cost}");
    }

    #[test]
    fn a_class_price_wins_over_the_default() {
        let prices = Prices {
            per_vcpu_hour: 0.04,
            per_gib_hour: 0.005,
        };
        let spot = Footprint {
            price_per_vcpu_hour: Some(0.01),
            ..footprint(1.0, 0.0)
        };
        let cost = prices.cost(&spot, 3600.0).unwrap();
        assert!((cost - 0.01).abs() < 1e-12, "{cost}");
    }

    #[test]
    fn a_build_costs_from_its_pod_creation_unless_it_was_lost() {
        use crate::build::{About, BuildKey, FailureReason, SourceKind};
        let prices = Prices {
            per_vcpu_hour: 3600.0,
            per_gib_hour: 0.0,
        };
        let launched = SystemTime::UNIX_EPOCH;
        let created = launched + std::time::Duration::from_secs(10);
        let ended = created + std::time::Duration::from_secs(5);
        let record = BuildRecord {
            key: BuildKey {
                source: SourceKind::GitLab,
                runner: "r".into(),
                id: 1,
            },
            name: "kiln-gl-1".into(),
            about: About::default(),
            footprint: Some(footprint(2.0, 4.0)),
            launched,
            created: Some(created),
            running: None,
            end: None,
        };
        // 5 s of 2 vCPUs at a vCPU-second each.
        let failed = Outcome::Failed(FailureReason::ScriptFailure);
        assert_eq!(prices.of_build(&record, failed, ended), Some(10.0));
        assert_eq!(prices.of_build(&record, Outcome::Lost, ended), None);
        let never_created = BuildRecord {
            created: None,
            ..record.clone()
        };
        assert_eq!(
            prices.of_build(&never_created, Outcome::Succeeded, ended),
            None
        );
        let not_sized = BuildRecord {
            footprint: None,
            ..record
        };
        assert_eq!(prices.of_build(&not_sized, Outcome::Succeeded, ended), None);
    }

    #[test]
    fn no_price_means_no_cost_shown() {
        assert_eq!(Prices::default().cost(&footprint(2.0, 4.0), 60.0), None);
        let config = CostConfig {
            price_per_vcpu_hour: -1.0,
            price_per_gib_hour: f64::NAN,
            ..CostConfig::default()
        };
        let paths: Vec<String> = config.problems().into_iter().map(|p| p.path).collect();
        assert_eq!(
            paths,
            ["cost.price_per_vcpu_hour", "cost.price_per_gib_hour"]
        );
    }
}
