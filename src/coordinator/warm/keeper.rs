//! The keeper: on the leading replica, keeps each GitLab pool at its floor of untaken pods
//! (starting and idle) through [`WarmPods`]. Each round re-counts the pods from
//! [`WarmPods::list`] (so a restarted or newly leading coordinator neither starts duplicates
//! nor leaks any), retires broken, too old, surplus (oldest first) and unconfigured pools'
//! pods, starts what is missing within `max_idle_total`, and backs off a pool whose starts
//! fail. At shutdown the untaken pods this replica started are retired; taken ones are builds
//! and run on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Member, WarmPools};
use crate::coordinator::replicas::Membership;
use crate::executor::{Executor, WarmPod, WarmPods, WarmShape, WarmState};

/// How often the keeper looks when nothing wakes it earlier.
const ROUND: Duration = Duration::from_secs(2);
/// Rounds between looks for leftover pods when no GitLab pool is configured (pods of pools
/// since removed from the configuration are retired then).
const LEFTOVER_ROUNDS: u32 = 30;
/// How long a pod just started counts as starting while no listing shows it yet.
const UNLISTED_FOR: Duration = Duration::from_secs(60);
/// The longest a pool whose starts fail waits before trying again.
const MOST_BACKOFF: Duration = Duration::from_secs(300);

/// What one pool wants now.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Want {
    pub(super) pool: String,
    pub(super) floor: usize,
    pub(super) max_idle_age: Option<Duration>,
}

/// One round's decisions.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Plan {
    /// Pods to retire, with why.
    pub(super) retire: Vec<(String, String)>,
    /// Pods to start, by pool (one entry per pod).
    pub(super) start: Vec<String>,
}

/// Decides a round: `listed` untaken pods, `unlisted` pods started but not listed yet (by
/// pool), at `now`.
pub(super) fn plan(
    wants: &[Want],
    listed: &[WarmPod],
    unlisted: &BTreeMap<String, usize>,
    now: SystemTime,
) -> Plan {
    let mut plan = Plan::default();
    let mut untaken: BTreeMap<&str, Vec<&WarmPod>> = BTreeMap::new();
    for pod in listed {
        let Some(want) = wants.iter().find(|w| w.pool == pod.pool) else {
            plan.retire.push((
                pod.name.clone(),
                format!("its pool `{}` is no longer configured", pod.pool),
            ));
            continue;
        };
        if let WarmState::Broken(why) = &pod.state {
            plan.retire
                .push((pod.name.clone(), format!("broken: {why}")));
            continue;
        }
        let age = now.duration_since(pod.created).unwrap_or_default();
        if let Some(max) = want.max_idle_age
            && age > max
        {
            plan.retire.push((
                pod.name.clone(),
                format!(
                    "older than max_idle_age ({})",
                    humantime::format_duration(max)
                ),
            ));
            continue;
        }
        untaken.entry(&want.pool).or_default().push(pod);
    }
    for want in wants {
        let mut pods = untaken.remove(want.pool.as_str()).unwrap_or_default();
        let pending = unlisted.get(&want.pool).copied().unwrap_or(0);
        let have = pods.len() + pending;
        if have < want.floor {
            plan.start
                .extend(std::iter::repeat_n(want.pool.clone(), want.floor - have));
        } else {
            pods.sort_by_key(|pod| pod.created);
            let surplus = (have - want.floor).min(pods.len());
            plan.retire
                .extend(pods.into_iter().take(surplus).map(|pod| {
                    (
                        pod.name.clone(),
                        format!("surplus: the pool's floor is {} now", want.floor),
                    )
                }));
        }
    }
    plan
}

/// A pool whose starts failed: until when it waits, and after how many failures.
struct Backoff {
    failures: u32,
    until: Instant,
}

/// The keeper's memory between rounds.
#[derive(Default)]
struct Keeper {
    /// Pods started and not listed yet: their pool, and when.
    unlisted: BTreeMap<String, (String, Instant)>,
    backoff: BTreeMap<String, Backoff>,
    /// Since when this replica leads (its idle pods are priced from then at most).
    leading_since: Option<SystemTime>,
}

/// Keeps the pools of `pools` on `executor` until `stop`, while this replica leads; then
/// retires the untaken pods this replica started.
pub(crate) async fn keep(
    pools: Arc<WarmPools>,
    executor: Arc<dyn Executor>,
    membership: Membership,
    stop: CancellationToken,
) {
    let mut keeper = Keeper::default();
    let mut rounds: u32 = 0;
    loop {
        match executor.warm() {
            Some(warm) if membership.leading() => {
                if pools.keeps_pods() || rounds.is_multiple_of(LEFTOVER_ROUNDS) {
                    keeper.round(&pools, warm).await;
                }
                rounds = rounds.wrapping_add(1);
            }
            _ => keeper.step_down(&pools),
        }
        pools.price_all();
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = pools.wake.notified() => {}
            () = tokio::time::sleep(ROUND) => {}
        }
    }
    if let Some(warm) = executor.warm()
        && pools.keeps_pods()
    {
        retire_mine(warm, membership.view().identity()).await;
    }
}

/// Retires the untaken warm pods labelled as `me`'s (every one without an identity).
async fn retire_mine(warm: &dyn WarmPods, me: Option<&str>) {
    let listed = match warm.list().await {
        Ok(listed) => listed,
        Err(e) => {
            tracing::warn!(error = %e, "shutting down: cannot list the warm pods to retire this replica's idle ones; the next leader retires or uses them");
            return;
        }
    };
    let mine: Vec<WarmPod> = listed
        .into_iter()
        .filter(|pod| me.is_none() || pod.replica.as_deref() == me)
        .collect();
    if !mine.is_empty() {
        tracing::info!(
            pods = mine.len(),
            "shutting down: retiring this replica's idle warm pods"
        );
    }
    futures::future::join_all(mine.iter().map(|pod| warm.retire(&pod.name))).await;
}

impl Keeper {
    /// Not leading (any more): the leader prices and keeps the pods.
    fn step_down(&mut self, pools: &WarmPools) {
        if self.leading_since.take().is_some() {
            self.unlisted.clear();
            pools.forget_pods();
        }
    }

    async fn round(&mut self, pools: &WarmPools, warm: &dyn WarmPods) {
        let listed = match warm.list().await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the warm pods; keeping the pools at the next round");
                return;
            }
        };
        let now = pools.now();
        let leading_since = *self.leading_since.get_or_insert(now);
        self.unlisted.retain(|name, (_, at)| {
            !listed.iter().any(|pod| &pod.name == name) && at.elapsed() < UNLISTED_FOR
        });
        pools.sync(&listed, leading_since, now);
        let mut unlisted: BTreeMap<String, usize> = BTreeMap::new();
        for (pool, _) in self.unlisted.values() {
            *unlisted.entry(pool.clone()).or_default() += 1;
        }
        let plan = plan(&pools.wants(now), &listed, &unlisted, now);
        for (pod, why) in &plan.retire {
            tracing::info!(pod, reason = %why, "retiring a warm pod");
            warm.retire(pod).await;
        }
        if !plan.retire.is_empty() {
            pools.sync_retired(&plan.retire, now);
        }
        for pool in plan.start {
            if self
                .backoff
                .get(&pool)
                .is_some_and(|b| Instant::now() < b.until)
            {
                continue;
            }
            let Some(shape) = pools.shape(&pool) else {
                continue;
            };
            self.start(pools, warm, &shape).await;
        }
    }

    async fn start(&mut self, pools: &WarmPools, warm: &dyn WarmPods, shape: &WarmShape) {
        match warm.start(shape).await {
            Ok(name) => {
                tracing::info!(pod = %name, pool = %shape.pool, "started a warm pod");
                self.backoff.remove(&shape.pool);
                self.unlisted
                    .insert(name.clone(), (shape.pool.clone(), Instant::now()));
                pools.refilled(&shape.pool, &name);
            }
            Err(e) => {
                let failures = self.backoff.get(&shape.pool).map_or(0, |b| b.failures) + 1;
                let wait = Duration::from_secs(1u64 << failures.min(16)).min(MOST_BACKOFF);
                tracing::warn!(pool = %shape.pool, error = %e, retry_in = %humantime::format_duration(wait), "cannot start a warm pod");
                self.backoff.insert(
                    shape.pool.clone(),
                    Backoff {
                        failures,
                        until: Instant::now() + wait,
                    },
                );
            }
        }
    }
}

impl WarmPools {
    /// What each pool kept by the keeper wants at `now`.
    fn wants(&self, now: SystemTime) -> Vec<Want> {
        self.allocation(now)
            .into_iter()
            .filter(|(index, _, _)| self.pools[*index].kept_by_keeper())
            .map(|(index, _, floor)| Want {
                pool: self.pools[index].name.clone(),
                floor,
                max_idle_age: self.pools[index].max_idle_age,
            })
            .collect()
    }

    fn shape(&self, pool: &str) -> Option<WarmShape> {
        self.pools
            .iter()
            .find(|p| p.name == pool)
            .map(|p| p.shape.clone())
    }

    /// The pods `listed` now are the pools' untaken pods: new ones are priced from their
    /// creation (from `leading_since` at most), gone ones up to `now`.
    fn sync(&self, listed: &[WarmPod], leading_since: SystemTime, now: SystemTime) {
        {
            let mut guard = self.lock();
            let gone: Vec<(String, String)> = guard
                .members
                .iter()
                .filter(|((pool, name), m)| {
                    !m.foreign && !listed.iter().any(|p| &p.name == name && &p.pool == pool)
                })
                .map(|(key, _)| key.clone())
                .collect();
            for key in gone {
                if let Some(member) = guard.members.remove(&key) {
                    self.price(&mut guard, &key.0, &member, now);
                }
            }
            for pod in listed {
                if matches!(pod.state, WarmState::Broken(_))
                    || !self.pools.iter().any(|p| p.name == pod.pool)
                {
                    continue;
                }
                let member = guard
                    .members
                    .entry((pod.pool.clone(), pod.name.clone()))
                    .or_insert(Member {
                        priced_to: pod.created.max(leading_since),
                        idle: false,
                        foreign: false,
                    });
                member.idle = pod.state == WarmState::Idle;
            }
        }
        self.publish();
    }

    /// Pods `retired` are gone: priced up to `now`.
    fn sync_retired(&self, retired: &[(String, String)], now: SystemTime) {
        {
            let mut guard = self.lock();
            let keys: Vec<(String, String)> = guard
                .members
                .keys()
                .filter(|(_, name)| retired.iter().any(|(r, _)| r == name))
                .cloned()
                .collect();
            for key in keys {
                if let Some(member) = guard.members.remove(&key) {
                    self.price(&mut guard, &key.0, &member, now);
                }
            }
        }
        self.publish();
    }

    /// Pod `pod` was started for `pool`.
    fn refilled(&self, pool: &str, pod: &str) {
        let now = self.now();
        {
            let mut guard = self.lock();
            guard.counts.entry(pool.to_owned()).or_default().refills += 1;
            guard
                .members
                .entry((pool.to_owned(), pod.to_owned()))
                .or_insert(Member {
                    priced_to: now,
                    idle: false,
                    foreign: false,
                });
        }
        self.metrics.refill(pool);
        self.publish();
    }

    /// This replica no longer leads: the pods are the new leader's to count and price.
    fn forget_pods(&self) {
        self.lock().members.retain(|_, m| m.foreign);
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, pool: &str, state: WarmState, age: u64, now: SystemTime) -> WarmPod {
        WarmPod {
            name: name.into(),
            pool: pool.into(),
            state,
            created: now - Duration::from_secs(age),
            replica: None,
        }
    }

    fn want(pool: &str, floor: usize) -> Want {
        Want {
            pool: pool.into(),
            floor,
            max_idle_age: Some(Duration::from_secs(600)),
        }
    }

    #[test]
    fn a_round_refills_replaces_and_retires() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let listed = [
            pod("a", "maven", WarmState::Idle, 10, now),
            pod("b", "maven", WarmState::Broken("evicted".into()), 10, now),
            pod("c", "maven", WarmState::Idle, 700, now),
            pod("d", "gone", WarmState::Idle, 10, now),
            pod("e", "node", WarmState::Idle, 30, now),
            pod("f", "node", WarmState::Starting, 20, now),
            pod("g", "node", WarmState::Idle, 10, now),
        ];
        let plan = plan(
            &[want("maven", 3), want("node", 1)],
            &listed,
            &BTreeMap::from([("maven".to_owned(), 1)]),
            now,
        );
        let retired: Vec<&str> = plan.retire.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(retired, ["b", "c", "d", "e", "f"]);
        assert!(plan.retire[0].1.contains("evicted"), "{plan:?}");
        assert!(plan.retire[1].1.contains("max_idle_age"), "{plan:?}");
        assert!(
            plan.retire[2].1.contains("no longer configured"),
            "{plan:?}"
        );
        assert!(plan.retire[3].1.contains("surplus"), "{plan:?}");
        // maven: a (idle) + one unlisted of 3 → one more.
        assert_eq!(plan.start, ["maven"]);
    }
}
