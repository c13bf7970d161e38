//! The warm pools' metrics: idle cost, members by state, refills, hits and misses, and how
//! long cold builds waited for their pod. Registered once per process through
//! [`Metrics::stage`](crate::telemetry::Metrics::stage).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::telemetry::{Histograms, StageMetrics, registered, registered_histograms};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

/// `state` is `idle` (Running, waiting), `starting` or `in_use` (running a build).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    pool: String,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ImageLabels {
    image: String,
}

/// The warm pools' metric families.
#[derive(Debug)]
pub(crate) struct WarmMetrics {
    idle_cost: Family<PoolLabels, Counter<f64, AtomicU64>>,
    members: Family<StateLabels, Gauge>,
    refills: Family<PoolLabels, Counter>,
    hits: Family<PoolLabels, Counter>,
    misses: Family<PoolLabels, Counter>,
    cold_start: Histograms<ImageLabels>,
}

impl StageMetrics for WarmMetrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            idle_cost: registered(
                registry,
                "warm_idle_cost",
                "What warm pools' idle members cost: idle pod-seconds times vCPU and GiB times their prices",
            ),
            members: registered(
                registry,
                "warm_members",
                "Warm pool members by state (starting, idle, in_use)",
            ),
            refills: registered(
                registry,
                "warm_refills",
                "Warm pod starts to keep a pool at its floor",
            ),
            hits: registered(
                registry,
                "warm_hits",
                "Builds handed to an idle warm member",
            ),
            misses: registered(
                registry,
                "warm_misses",
                "Builds a pool would have served that started cold: no idle member",
            ),
            cold_start: registered_histograms(
                registry,
                "cold_start_seconds",
                "Time from a cold build's launch until its build container ran, by image",
                (0.5, 2.0, 12),
            ),
        }
    }
}

impl WarmMetrics {
    pub(crate) fn idle_cost(&self, pool: &str, cost: f64) {
        self.idle_cost
            .get_or_create(&PoolLabels { pool: pool.into() })
            .inc_by(cost);
    }

    pub(crate) fn members(&self, pool: &str, state: &'static str, count: usize) {
        self.members
            .get_or_create(&StateLabels {
                pool: pool.into(),
                state,
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub(crate) fn refill(&self, pool: &str) {
        self.refills
            .get_or_create(&PoolLabels { pool: pool.into() })
            .inc();
    }

    pub(crate) fn hit(&self, pool: &str) {
        self.hits
            .get_or_create(&PoolLabels { pool: pool.into() })
            .inc();
    }

    pub(crate) fn miss(&self, pool: &str) {
        self.misses
            .get_or_create(&PoolLabels { pool: pool.into() })
            .inc();
    }

    pub(crate) fn cold_start(&self, image: &str, seconds: f64) {
        self.cold_start
            .get_or_create(&ImageLabels {
                image: image.into(),
            })
            .observe(seconds);
    }
}
