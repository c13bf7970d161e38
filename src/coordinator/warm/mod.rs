//! Warm pools, once for every source: sets of pre-started one-shot build members of one shape
//! that a fitting build takes instead of starting cold. GitLab's members are warm pods the
//! keeper (`keeper.rs`) starts through [`WarmPods`]; GitHub's and Jenkins' are runners and
//! agents their sources keep themselves, to the floors [`WarmPools::floors`] gives, telling
//! the pools where each is ([`WarmPools::member`]). Either way the pools price every idle
//! member's time and count hits and misses, and the take path ([`WarmPools::place`]) decides
//! for each GitLab build where it starts and says so in its first trace lines
//! ([`START_FILE`]).

pub(crate) mod config;
mod keeper;
mod metrics;
mod schedule;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use config::Target;
pub use config::{WarmPoolConfig, WindowConfig};
use metrics::WarmMetrics;
use schedule::Window;

use super::cost::Prices;
use crate::build::{Build, ClassChoice, Image, START_FILE, SourceKind, Workload};
use crate::executor::{Executor, Footprint, TakeError, WarmPods, WarmShape, WarmState};
use crate::sources::{MemberState, WarmFloor};
use crate::telemetry::Metrics;

pub(crate) use keeper::keep;

/// Cold builds whose wait for their pod the status page keeps, per image.
const COLD_WAITS_KEPT: usize = 100;
/// Images whose cold waits are kept at most.
const COLD_IMAGES_KEPT: usize = 200;

/// The warm pools of one coordinator, as configured.
#[derive(Debug, Clone, Default)]
pub struct WarmSettings {
    /// `[[warm_pools]]` (with the old spelling `sources.github[N].min_idle` folded in).
    pub pools: Vec<WarmPoolConfig>,
    /// The most idle members across every pool (0: no cap).
    pub max_idle_total: usize,
}

/// What tells the pools the time (a test's clock moves at will).
pub(crate) type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// One pool, read.
struct Pool {
    name: String,
    source: String,
    target: Target,
    shape: WarmShape,
    label: Option<String>,
    min_idle: usize,
    max_idle_age: Option<Duration>,
    windows: Vec<Window>,
    /// The size and prices of one member, for its idle cost.
    footprint: Option<Footprint>,
}

impl Pool {
    fn kept_by_keeper(&self) -> bool {
        self.target.kind() == SourceKind::GitLab
    }
}

/// Where a build starts, decided before its work is acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Placement {
    /// On warm pod `pod` of `pool`, which took it.
    Warm {
        pod: String,
        pool: String,
        line: String,
    },
    /// Cold, as a build of its own; `image` for the cold-wait figures. No line when no warm
    /// pool serves the build's source at all (nothing to explain to people who keep none).
    Cold { line: Option<String>, image: String },
}

impl Placement {
    /// `build` as it is launched: with its start line, under its pod's name when warm.
    pub(crate) fn apply(&self, mut build: Build) -> Build {
        let line = match self {
            Self::Warm { pod, line, .. } => {
                build.name.clone_from(pod);
                Some(line)
            }
            Self::Cold { line, .. } => line.as_ref(),
        };
        if let Some(line) = line {
            build
                .secrets
                .insert(START_FILE.to_owned(), format!("{line}\n").into_bytes());
        }
        build
    }

    /// The pool of a warm start.
    pub(crate) fn pool(&self) -> Option<&str> {
        match self {
            Self::Warm { pool, .. } => Some(pool),
            Self::Cold { .. } => None,
        }
    }

    /// The image of a cold start.
    pub(crate) fn cold_image(&self) -> Option<&str> {
        match self {
            Self::Cold { image, .. } => Some(image),
            Self::Warm { .. } => None,
        }
    }
}

/// One pool as the status page shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PoolView {
    /// Its name.
    pub name: String,
    /// The source it serves (`gitlab`, or an entry's name).
    pub source: String,
    /// The image its pods run (GitLab pools).
    pub image: Option<String>,
    /// The idle members it keeps now (schedule and `max_idle_total` applied).
    pub floor: usize,
    /// Members waiting for work.
    pub idle: usize,
    /// Members being started.
    pub starting: usize,
    /// Members running a build.
    pub in_use: usize,
    /// Members started to refill it.
    pub refills: u64,
    /// Builds that took an idle member.
    pub hits: u64,
    /// Builds it would have served that started cold: no idle member.
    pub misses: u64,
    /// What its idle members cost since midnight UTC (`None`: nothing is priced).
    pub idle_cost_today: Option<f64>,
}

/// How long cold builds of one image waited for their pod (launch → running).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ColdWaitView {
    /// The image.
    pub image: String,
    /// Cold builds the figures are over (the latest ones).
    pub builds: usize,
    /// The median wait, in seconds.
    pub p50: f64,
    /// The 90th percentile, in seconds.
    pub p90: f64,
}

/// An idle member whose time is being priced.
#[derive(Debug, Clone)]
struct Member {
    /// Priced until then.
    priced_to: SystemTime,
    /// Running and waiting (else starting).
    idle: bool,
    /// Kept by its source (GitHub, Jenkins), not listed by the keeper.
    foreign: bool,
}

#[derive(Debug, Default, Clone)]
struct Counts {
    in_use: usize,
    refills: u64,
    hits: u64,
    misses: u64,
    /// Days since the epoch of `cost_today`.
    cost_day: u64,
    cost_today: f64,
}

#[derive(Default)]
struct State {
    /// Idle (and starting) members by pool and name.
    members: BTreeMap<(String, String), Member>,
    counts: BTreeMap<String, Counts>,
    /// Placements decided at persist, by the build's name, until its launch.
    placements: HashMap<String, Placement>,
    /// The latest cold waits, in seconds, by image.
    cold_waits: BTreeMap<String, VecDeque<f64>>,
}

/// The warm pools of one coordinator: their configuration, their members' idle time and
/// counts, and the placements decided between a build's persist and its launch.
pub(crate) struct WarmPools {
    pools: Vec<Pool>,
    /// The coordinator's sources, `(kind, name)`: a foreign pool keeps its floor per source.
    sources: Vec<(SourceKind, String)>,
    max_idle_total: usize,
    prices: Prices,
    clock: Clock,
    metrics: Arc<WarmMetrics>,
    state: Mutex<State>,
    /// Wakes the keeper (a pod was taken: refill now).
    wake: Notify,
}

impl WarmPools {
    /// No pools (every build starts cold).
    pub(crate) fn none(metrics: &Metrics) -> Self {
        Self::new(
            &WarmSettings::default(),
            &[],
            None,
            Prices::default(),
            metrics,
            Arc::new(SystemTime::now),
        )
    }

    /// The pools of `settings` for `sources` (`(kind, name)`), members sized by `executor`.
    /// Pools whose source names no configured entry are left out (check-config refuses them).
    pub(crate) fn new(
        settings: &WarmSettings,
        sources: &[(SourceKind, String)],
        executor: Option<&dyn Executor>,
        prices: Prices,
        metrics: &Metrics,
        clock: Clock,
    ) -> Self {
        let pools = settings
            .pools
            .iter()
            .filter_map(|config| {
                let target = Target::read(&config.source, sources).ok()?;
                let shape = WarmShape {
                    pool: config.name.clone(),
                    image: config.image.clone().unwrap_or_default(),
                    class: config.class.clone(),
                };
                let footprint = executor.and_then(|e| e.footprint(&sizing_build(&shape)));
                Some(Pool {
                    name: config.name.clone(),
                    source: config.source.clone(),
                    target,
                    shape,
                    label: config.label.clone(),
                    min_idle: config.min_idle,
                    max_idle_age: config.max_idle_age,
                    windows: config
                        .schedule
                        .iter()
                        .filter_map(|w| Window::parse(w).ok())
                        .collect(),
                    footprint,
                })
            })
            .collect();
        Self {
            pools,
            sources: sources.to_vec(),
            max_idle_total: settings.max_idle_total,
            prices,
            clock,
            metrics: metrics.stage(),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> SystemTime {
        (self.clock)()
    }

    /// Whether any pool is kept by the keeper (GitLab pools).
    pub(crate) fn keeps_pods(&self) -> bool {
        self.pools.iter().any(Pool::kept_by_keeper)
    }

    /// The idle members each pool keeps at `at`: for every pool kept by the keeper one
    /// entry, for every pool of a source that keeps its own members one per source it
    /// serves; their schedule's floor, within `max_idle_total` in the order configured.
    fn allocation(&self, at: SystemTime) -> Vec<(usize, Option<&str>, usize)> {
        let mut left = if self.max_idle_total == 0 {
            usize::MAX
        } else {
            self.max_idle_total
        };
        let mut allocation = Vec::new();
        for (index, pool) in self.pools.iter().enumerate() {
            let floor = schedule::floor_at(pool.min_idle, &pool.windows, at);
            let served: Vec<Option<&str>> = if pool.kept_by_keeper() {
                vec![None]
            } else {
                self.sources
                    .iter()
                    .filter(|(kind, name)| pool.target.serves(*kind, name))
                    .map(|(_, name)| Some(name.as_str()))
                    .collect()
            };
            for source in served {
                let kept = floor.min(left);
                left -= kept;
                allocation.push((index, source, kept));
            }
        }
        allocation
    }

    /// The floors of the pools serving source `name` of `kind`, which keeps its own idle
    /// members ([`crate::sources::Chain::warm_floors`]).
    pub(crate) fn floors(&self, kind: SourceKind, name: &str) -> Vec<WarmFloor> {
        if kind == SourceKind::GitLab {
            return Vec::new();
        }
        self.allocation(self.now())
            .into_iter()
            .filter(|(_, source, _)| *source == Some(name))
            .map(|(index, _, min_idle)| {
                let pool = &self.pools[index];
                WarmFloor {
                    pool: pool.name.clone(),
                    class: pool.shape.class.clone(),
                    label: pool.label.clone(),
                    min_idle,
                    max_idle_age: pool.max_idle_age,
                }
            })
            .collect()
    }

    /// A source's member `name` of `pool` is idle, took work, or was retired unused.
    pub(crate) fn member(&self, name: &str, pool: &str, state: MemberState) {
        if !self.pools.iter().any(|p| p.name == pool) {
            return;
        }
        let now = self.now();
        let mut guard = self.lock();
        let key = (pool.to_owned(), name.to_owned());
        match state {
            MemberState::Idle => {
                guard.members.entry(key).or_insert(Member {
                    priced_to: now,
                    idle: true,
                    foreign: true,
                });
            }
            MemberState::Taken | MemberState::Retired => {
                if let Some(member) = guard.members.remove(&key) {
                    self.price(&mut guard, pool, &member, now);
                    if state == MemberState::Taken {
                        guard.counts.entry(pool.to_owned()).or_default().hits += 1;
                        self.metrics.hit(pool);
                    }
                }
            }
        }
        drop(guard);
        self.publish();
    }

    /// Where `build` of source `name` of `kind` starts: on an idle warm pod that took it
    /// (the take is its persist), or cold with the reason. `None` for a build that is not
    /// the kiln agent's (its source keeps its own members).
    pub(crate) async fn place(
        &self,
        executor: &dyn Executor,
        kind: SourceKind,
        name: &str,
        build: &Build,
    ) -> Option<Placement> {
        let Workload::KilnAgent { image, .. } = &build.workload else {
            return None;
        };
        let image = image.as_ref().map(|i| i.name.clone()).unwrap_or_default();
        let cold = |reason: String| Placement::Cold {
            line: Some(format!("started cold: {reason}")),
            image: image.clone(),
        };
        let shown = if image.is_empty() {
            "the default image".to_owned()
        } else {
            format!("image {image}")
        };
        let serving: Vec<&Pool> = self
            .pools
            .iter()
            .filter(|p| p.kept_by_keeper() && p.target.serves(kind, name))
            .collect();
        if serving.is_empty() {
            return Some(Placement::Cold { line: None, image });
        }
        let candidates: Vec<&Pool> = serving
            .into_iter()
            // A job without an image runs the executor's default, which `fits` knows.
            .filter(|p| image.is_empty() || p.shape.image == image)
            .collect();
        if candidates.is_empty() {
            return Some(cold(format!("no warm pool for {shown}")));
        }
        let Some(warm) = executor.warm() else {
            return Some(cold(format!(
                "the {} executor keeps no warm pods",
                executor.name()
            )));
        };
        let mut reason = None;
        let fitting: Vec<&Pool> = candidates
            .into_iter()
            .filter(|p| match warm.fits(build, &p.shape) {
                Ok(()) => true,
                Err(why) => {
                    reason.get_or_insert(why);
                    false
                }
            })
            .collect();
        if fitting.is_empty() {
            return Some(cold(match reason {
                Some(_) if image.is_empty() => format!("no warm pool for {shown}"),
                Some(reason) => reason,
                None => "it fits no warm pod".into(),
            }));
        }
        Some(self.take(warm, build, &fitting, &image).await)
    }

    /// Hands `build` to an idle pod of `pools`, oldest first; cold when none takes it.
    async fn take(
        &self,
        warm: &dyn WarmPods,
        build: &Build,
        pools: &[&Pool],
        image: &str,
    ) -> Placement {
        let cold = |reason: String| Placement::Cold {
            line: Some(format!("started cold: {reason}")),
            image: image.to_owned(),
        };
        let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
        let mut idle = match warm.list().await {
            Ok(listed) => listed
                .into_iter()
                .filter(|pod| pod.state == WarmState::Idle && names.contains(&pod.pool.as_str()))
                .collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!(build = %build.key, error = %e, "cannot list warm pods; starting the build cold");
                return cold(format!("the warm pods could not be listed ({e})"));
            }
        };
        idle.sort_by_key(|pod| pod.created);
        let missed = |why: String| {
            for pool in &names {
                self.lock()
                    .counts
                    .entry((*pool).to_owned())
                    .or_default()
                    .misses += 1;
                self.metrics.miss(pool);
            }
            self.publish();
            cold(why)
        };
        if idle.is_empty() {
            return missed(format!("warm pool {} has no idle pod", names.join(", ")));
        }
        for pod in idle {
            let handed = self.now();
            let waited = build
                .about
                .queued_at
                .and_then(|queued| handed.duration_since(queued).ok());
            let line = match waited {
                Some(waited) => format!(
                    "started on warm pod {} (pool {}), waiting {:.1} s",
                    pod.name,
                    pod.pool,
                    waited.as_secs_f64()
                ),
                None => format!("started on warm pod {} (pool {})", pod.name, pod.pool),
            };
            let placement = Placement::Warm {
                pod: pod.name.clone(),
                pool: pod.pool.clone(),
                line,
            };
            match warm.take(&pod.name, &placement.apply(build.clone())).await {
                Ok(()) => {
                    tracing::info!(build = %build.key, pod = %pod.name, pool = %pod.pool, "build handed to a warm pod");
                    self.taken(&pod.pool, &pod.name);
                    return placement;
                }
                Err(TakeError::Unavailable { pod, reason }) => {
                    tracing::debug!(build = %build.key, pod, reason, "warm pod not available; trying the next");
                }
                Err(TakeError::Failed(message)) => {
                    tracing::warn!(build = %build.key, pod = %pod.name, error = %message, "handing the build to a warm pod failed; starting it cold");
                    self.wake.notify_one();
                    return cold(format!(
                        "handing the job to warm pod {} failed: {message}",
                        pod.name
                    ));
                }
            }
        }
        missed(format!(
            "every idle pod of warm pool {} was taken by other builds",
            names.join(", ")
        ))
    }

    /// Pod `pod` of `pool` took a build: its idle time ends, the keeper refills.
    fn taken(&self, pool: &str, pod: &str) {
        let now = self.now();
        let mut guard = self.lock();
        if let Some(member) = guard.members.remove(&(pool.to_owned(), pod.to_owned())) {
            self.price(&mut guard, pool, &member, now);
        }
        guard.counts.entry(pool.to_owned()).or_default().hits += 1;
        drop(guard);
        self.metrics.hit(pool);
        self.publish();
        self.wake.notify_one();
    }

    /// Prices `member` of `pool` up to `now`.
    fn price(&self, state: &mut State, pool: &str, member: &Member, now: SystemTime) {
        let Some(footprint) = self
            .pools
            .iter()
            .find(|p| p.name == pool)
            .and_then(|p| p.footprint.as_ref())
        else {
            return;
        };
        let seconds = now
            .duration_since(member.priced_to)
            .unwrap_or_default()
            .as_secs_f64();
        let Some(cost) = self.prices.cost(footprint, seconds) else {
            return;
        };
        let day = days(now);
        let counts = state.counts.entry(pool.to_owned()).or_default();
        if counts.cost_day != day {
            counts.cost_day = day;
            counts.cost_today = 0.0;
        }
        counts.cost_today += cost;
        if cost > 0.0 {
            self.metrics.idle_cost(pool, cost);
        }
    }

    /// Prices every member up to now (the status page's figure moves while pods wait).
    pub(crate) fn price_all(&self) {
        let now = self.now();
        let mut guard = self.lock();
        let members: Vec<((String, String), Member)> = guard
            .members
            .iter()
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect();
        for ((pool, name), member) in members {
            self.price(&mut guard, &pool, &member, now);
            if let Some(m) = guard.members.get_mut(&(pool, name)) {
                m.priced_to = now;
            }
        }
    }

    /// Remembers where the build named `name` starts, from its persist to its launch.
    pub(crate) fn remember(&self, name: &str, placement: Placement) {
        self.lock().placements.insert(name.to_owned(), placement);
    }

    /// Where the build named `name` was placed at its persist (forgotten from then on).
    pub(crate) fn recall(&self, name: &str) -> Option<Placement> {
        self.lock().placements.remove(name)
    }

    /// A build on a warm pod of `pool` started (`1`) or ended (`-1`).
    pub(crate) fn in_use(&self, pool: &str, by: isize) {
        {
            let mut guard = self.lock();
            let counts = guard.counts.entry(pool.to_owned()).or_default();
            counts.in_use = counts.in_use.saturating_add_signed(by);
        }
        self.publish();
    }

    /// A cold build of `image` ran `waited` after its launch.
    pub(crate) fn cold_started(&self, image: &str, waited: Duration) {
        let seconds = waited.as_secs_f64();
        self.metrics.cold_start(image, seconds);
        let mut guard = self.lock();
        if !guard.cold_waits.contains_key(image) && guard.cold_waits.len() >= COLD_IMAGES_KEPT {
            return;
        }
        let waits = guard.cold_waits.entry(image.to_owned()).or_default();
        if waits.len() == COLD_WAITS_KEPT {
            waits.pop_front();
        }
        waits.push_back(seconds);
    }

    /// Every pool, for the status page.
    pub(crate) fn views(&self) -> Vec<PoolView> {
        self.price_all();
        let floors = self.allocation(self.now());
        let guard = self.lock();
        let today = days(self.now());
        let priced = self.prices.per_vcpu_hour > 0.0 || self.prices.per_gib_hour > 0.0;
        self.pools
            .iter()
            .enumerate()
            .map(|(index, pool)| {
                let counts = guard.counts.get(&pool.name).cloned().unwrap_or_default();
                let members = guard.members.iter().filter(|((p, _), _)| *p == pool.name);
                let (idle, starting) = members.fold((0, 0), |(idle, starting), (_, m)| {
                    if m.idle {
                        (idle + 1, starting)
                    } else {
                        (idle, starting + 1)
                    }
                });
                let class_priced = pool.footprint.as_ref().is_some_and(|f| {
                    f.price_per_vcpu_hour.is_some_and(|p| p > 0.0)
                        || f.price_per_gib_hour.is_some_and(|p| p > 0.0)
                });
                PoolView {
                    name: pool.name.clone(),
                    source: pool.source.clone(),
                    image: (!pool.shape.image.is_empty()).then(|| pool.shape.image.clone()),
                    floor: floors
                        .iter()
                        .filter(|(i, _, _)| *i == index)
                        .map(|(_, _, floor)| floor)
                        .sum(),
                    idle,
                    starting,
                    in_use: counts.in_use,
                    refills: counts.refills,
                    hits: counts.hits,
                    misses: counts.misses,
                    idle_cost_today: (pool.footprint.is_some() && (priced || class_priced))
                        .then_some(if counts.cost_day == today {
                            counts.cost_today
                        } else {
                            0.0
                        }),
                }
            })
            .collect()
    }

    /// How long cold builds waited for their pod, by image (slowest median first).
    pub(crate) fn cold_waits(&self) -> Vec<ColdWaitView> {
        let guard = self.lock();
        let mut views: Vec<ColdWaitView> = guard
            .cold_waits
            .iter()
            .filter(|(_, waits)| !waits.is_empty())
            .map(|(image, waits)| {
                let mut sorted: Vec<f64> = waits.iter().copied().collect();
                sorted.sort_by(f64::total_cmp);
                ColdWaitView {
                    image: if image.is_empty() {
                        "(default image)".into()
                    } else {
                        image.clone()
                    },
                    builds: sorted.len(),
                    p50: percentile(&sorted, 0.5),
                    p90: percentile(&sorted, 0.9),
                }
            })
            .collect();
        views.sort_by(|a, b| b.p50.total_cmp(&a.p50));
        views
    }

    /// Sets the member gauges from what the pools know now.
    fn publish(&self) {
        let guard = self.lock();
        for pool in &self.pools {
            let (idle, starting) = guard
                .members
                .iter()
                .filter(|((p, _), _)| *p == pool.name)
                .fold(
                    (0, 0),
                    |(i, s), (_, m)| if m.idle { (i + 1, s) } else { (i, s + 1) },
                );
            let in_use = guard.counts.get(&pool.name).map_or(0, |c| c.in_use);
            self.metrics.members(&pool.name, "idle", idle);
            self.metrics.members(&pool.name, "starting", starting);
            self.metrics.members(&pool.name, "in_use", in_use);
        }
    }
}

/// The value below which `fraction` of `sorted` lies (nearest rank).
fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((fraction * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Whole days since the epoch (UTC) at `at`.
fn days(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / 86_400
}

/// A build of `shape`, for the executor to size one member by (its idle cost).
fn sizing_build(shape: &WarmShape) -> Build {
    use crate::build::{About, BuildKey};
    Build {
        key: BuildKey {
            source: SourceKind::GitLab,
            runner: shape.pool.clone(),
            id: 0,
        },
        name: format!("warm-{}", shape.pool),
        workload: Workload::KilnAgent {
            image: (!shape.image.is_empty()).then(|| Image {
                name: shape.image.clone(),
                ..Image::default()
            }),
            services: Vec::new(),
        },
        secrets: BTreeMap::new(),
        class: shape.class.as_ref().map(|name| ClassChoice {
            name: name.clone(),
            origin: "the warm pool's class".into(),
        }),
        requests: Vec::new(),
        timeout: None,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        about: About::default(),
        untrusted: false,
        registry_auths: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(settings: &WarmSettings, clock: Clock) -> WarmPools {
        let sources = [
            (SourceKind::GitHub, "octo".to_owned()),
            (SourceKind::GitHub, "other".to_owned()),
            (SourceKind::Jenkins, "ci".to_owned()),
        ];
        WarmPools::new(
            settings,
            &sources,
            None,
            Prices::default(),
            &Metrics::new(),
            clock,
        )
    }

    fn pool(name: &str, source: &str, min_idle: usize) -> WarmPoolConfig {
        WarmPoolConfig {
            name: name.into(),
            source: source.into(),
            image: None,
            class: Some("default".into()),
            label: (source == "ci").then(|| "linux".into()),
            min_idle,
            max_idle_age: Some(Duration::from_secs(600)),
            schedule: Vec::new(),
        }
    }

    #[test]
    fn a_source_keeping_its_own_members_gets_the_floors_of_its_pools_within_the_cap() {
        let settings = WarmSettings {
            pools: vec![pool("gh", "github", 2), pool("agents", "ci", 3)],
            max_idle_total: 5,
        };
        let pools = pools(&settings, Arc::new(SystemTime::now));
        // Every GitHub source gets the kind-wide pool's floor; Jenkins what is left.
        assert_eq!(pools.floors(SourceKind::GitHub, "octo")[0].min_idle, 2);
        assert_eq!(pools.floors(SourceKind::GitHub, "other")[0].min_idle, 2);
        let jenkins = pools.floors(SourceKind::Jenkins, "ci");
        assert_eq!(
            jenkins,
            [WarmFloor {
                pool: "agents".into(),
                class: Some("default".into()),
                label: Some("linux".into()),
                min_idle: 1,
                max_idle_age: Some(Duration::from_secs(600)),
            }]
        );
        assert!(pools.floors(SourceKind::GitLab, "octo").is_empty());
    }

    #[test]
    fn a_foreign_member_is_counted_idle_then_taken_as_a_hit() {
        let settings = WarmSettings {
            pools: vec![pool("gh", "octo", 1)],
            max_idle_total: 0,
        };
        let pools = pools(&settings, Arc::new(SystemTime::now));
        pools.member("kiln-gh-1", "gh", MemberState::Idle);
        pools.member("kiln-gh-2", "gh", MemberState::Idle);
        pools.member("unknown", "nope", MemberState::Idle);
        let view = &pools.views()[0];
        assert_eq!((view.idle, view.hits), (2, 0));
        pools.member("kiln-gh-1", "gh", MemberState::Taken);
        pools.member("kiln-gh-2", "gh", MemberState::Retired);
        let view = &pools.views()[0];
        assert_eq!((view.idle, view.hits, view.floor), (0, 1, 1));
        // Nothing priced: no cost shown.
        assert_eq!(view.idle_cost_today, None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let waits = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(percentile(&waits, 0.5), 5.0);
        assert_eq!(percentile(&waits, 0.9), 9.0);
        assert_eq!(percentile(&[4.0], 0.9), 4.0);
    }
}
