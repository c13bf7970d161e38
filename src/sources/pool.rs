//! The members a queue-driven source keeps (Jenkins agents, GitHub runners: one build each)
//! and the plan of which to start and which to retire, from the work waiting by group. Pure:
//! no I/O and no clock — the source does what the plan says, and tells the pool what happened.
//!
//! The rules, the same for every such source:
//! - a group gets as many free members as work waits for it (plus a warm floor), within the
//!   group's cap (busy members count against it);
//! - work whose members failed [`Pool::new`]`(max_attempts)` times before taking any is given
//!   up on: it stops counting as wanted, and is reported once;
//! - an idle member beyond what its group wants is retired at the second plan in a row that
//!   finds it surplus (the CI server may be handing it work right now); a busy one never is;
//! - a member may belong to a warm pool (`warm`): an idle one older than its pool's
//!   `max_idle_age` is retired at the second look in a row that finds it so ([`Pool::aged`]),
//!   and an idle member started for work that went elsewhere may join a pool short of members
//!   ([`Pool::adopt_strays`]) instead of a new one being started.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

/// Where a member is in its life, as far as the CI server tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Started, not seen connected yet: counts as free, is not retired as surplus.
    Starting,
    /// Connected and without work.
    Idle,
    /// Took work (its only build): never retired as surplus.
    Busy,
}

/// One member: what the pool needs of it, and what its source keeps (`detail`).
#[derive(Debug)]
pub(crate) struct Member<G, T> {
    /// The group it serves (a Jenkins label, a GitHub resource class).
    pub(crate) group: G,
    /// The work it was started for (an attempt at that work when it fails before taking any).
    pub(crate) work: u64,
    pub(crate) phase: Phase,
    /// When it was started (or adopted): older idle members retire first.
    pub(crate) started: Instant,
    /// Consecutive plans that found it surplus.
    surplus_looks: u32,
    /// The warm pool it is kept for, if any.
    pub(crate) warm: Option<String>,
    /// Consecutive looks that found it idle past its pool's `max_idle_age`.
    aged_looks: u32,
    /// What its source keeps of it.
    pub(crate) detail: T,
}

/// What waits for one group.
#[derive(Debug, Clone)]
pub(crate) struct Demand<G> {
    pub(crate) group: G,
    /// The waiting work, oldest first.
    pub(crate) work: Vec<u64>,
    /// Free members to keep besides the waiting work.
    pub(crate) floor: usize,
    /// The most members the group may have at once, busy ones included.
    pub(crate) cap: Option<usize>,
}

impl<G> Demand<G> {
    /// `work` waiting for `group`, without a floor or cap.
    pub(crate) fn new(group: G, work: Vec<u64>) -> Self {
        Self {
            group,
            work,
            floor: 0,
            cap: None,
        }
    }
}

/// A member to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Start<G> {
    pub(crate) group: G,
    /// The work it is started for; `None` for one of the warm floor.
    pub(crate) work: Option<u64>,
}

/// What to do now: retire these members, then start these (in order, as long as the chain
/// has slots).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Plan<G> {
    pub(crate) retire: Vec<String>,
    pub(crate) start: Vec<Start<G>>,
    /// Work given up on at this plan, with its attempts (each reported once).
    pub(crate) given_up: Vec<(u64, u32)>,
}

/// A source's members by name, and its attempts at waiting work.
#[derive(Debug)]
pub(crate) struct Pool<G, T> {
    members: BTreeMap<String, Member<G, T>>,
    /// Members that failed before taking work, by the work they were started for.
    attempts: HashMap<u64, u32>,
    /// Work given up on (reported already).
    given_up: HashSet<u64>,
    max_attempts: u32,
}

impl<G: Ord + Clone, T> Pool<G, T> {
    /// An empty pool that gives work up after `max_attempts` failed members.
    pub(crate) fn new(max_attempts: u32) -> Self {
        Self {
            members: BTreeMap::new(),
            attempts: HashMap::new(),
            given_up: HashSet::new(),
            max_attempts,
        }
    }

    /// Adds member `name` (started or adopted at `started`).
    pub(crate) fn insert(
        &mut self,
        name: String,
        group: G,
        work: u64,
        started: Instant,
        phase: Phase,
        detail: T,
    ) {
        let member = Member {
            group,
            work,
            phase,
            started,
            surplus_looks: 0,
            warm: None,
            aged_looks: 0,
            detail,
        };
        self.members.insert(name, member);
    }

    /// Member `name` is kept for warm pool `pool` from now on.
    pub(crate) fn join(&mut self, name: &str, pool: &str) {
        if let Some(member) = self.members.get_mut(name) {
            member.warm = Some(pool.to_owned());
        }
    }

    /// Member `name` took work. Returns its warm pool when this is news (it was not busy
    /// before): the pool is told once that its member was taken.
    pub(crate) fn busy(&mut self, name: &str) -> Option<String> {
        let member = self.members.get_mut(name)?;
        let was = std::mem::replace(&mut member.phase, Phase::Busy);
        if was == Phase::Busy {
            return None;
        }
        member.warm.clone()
    }

    /// Free (not busy) members kept for warm pool `pool`.
    pub(crate) fn warm_free(&self, pool: &str) -> usize {
        self.members
            .values()
            .filter(|m| m.phase != Phase::Busy && m.warm.as_deref() == Some(pool))
            .count()
    }

    /// Idle warm members older (at `now`) than their pool's `max_age`, at the second look in a
    /// row that finds them so (GitHub or Jenkins may be handing one work right now; the source
    /// retires them the way it retires surplus, which a busy member survives).
    pub(crate) fn aged(
        &mut self,
        max_age: impl Fn(&str) -> Option<Duration>,
        now: Instant,
    ) -> Vec<String> {
        let mut retire = Vec::new();
        for (name, member) in &mut self.members {
            let limit = member.warm.as_deref().and_then(&max_age);
            let old = member.phase == Phase::Idle
                && limit
                    .is_some_and(|limit| now.saturating_duration_since(member.started) >= limit);
            if !old {
                member.aged_looks = 0;
                continue;
            }
            member.aged_looks += 1;
            if member.aged_looks >= 2 {
                retire.push(name.clone());
            }
        }
        retire
    }

    /// Idle members of `group` beyond its waiting `work` that belong to no pool (started for
    /// work that went to another member) join the group's pools short of free members
    /// (`pools`: name and idle members wanted, in order), youngest first: they stand in for
    /// the members the floor would start. Returns who joined which pool.
    pub(crate) fn adopt_strays(
        &mut self,
        group: &G,
        work: usize,
        pools: &[(String, usize)],
    ) -> Vec<(String, String)> {
        let unpooled_free = self
            .members
            .values()
            .filter(|m| m.group == *group && m.phase != Phase::Busy && m.warm.is_none())
            .count();
        let mut strays: Vec<(Instant, String)> = self
            .members
            .iter()
            .filter(|(_, m)| m.group == *group && m.phase == Phase::Idle && m.warm.is_none())
            .map(|(name, m)| (m.started, name.clone()))
            .collect();
        // Youngest first: they have the longest to go before `max_idle_age`.
        strays.sort_by(|a, b| b.cmp(a));
        strays.truncate(unpooled_free.saturating_sub(work));
        let mut strays = strays.into_iter().map(|(_, name)| name);
        let mut joined = Vec::new();
        for (pool, wanted) in pools {
            let missing = wanted.saturating_sub(self.warm_free(pool));
            for name in strays.by_ref().take(missing) {
                self.join(&name, pool);
                joined.push((name, pool.clone()));
            }
        }
        joined
    }

    /// Removes member `name`.
    pub(crate) fn remove(&mut self, name: &str) -> Option<Member<G, T>> {
        self.members.remove(name)
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Member<G, T>> {
        self.members.get(name)
    }

    pub(crate) fn get_mut(&mut self, name: &str) -> Option<&mut Member<G, T>> {
        self.members.get_mut(name)
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.members.contains_key(name)
    }

    /// Every member, by name.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &Member<G, T>)> {
        self.members.iter()
    }

    /// The names of every member (to act on each while changing the pool).
    pub(crate) fn names(&self) -> Vec<String> {
        self.members.keys().cloned().collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    /// Members of `group`.
    pub(crate) fn count(&self, group: &G) -> usize {
        self.members.values().filter(|m| m.group == *group).count()
    }

    /// A member started for `work` failed before it took any: one attempt more. Returns the
    /// attempts so far.
    pub(crate) fn attempt_failed(&mut self, work: u64) -> u32 {
        let attempts = self.attempts.entry(work).or_default();
        *attempts += 1;
        *attempts
    }

    /// The failed attempts at `work` so far.
    pub(crate) fn attempts(&self, work: u64) -> u32 {
        self.attempts.get(&work).copied().unwrap_or(0)
    }

    /// What to start and retire for `demands` (one per group; a group with members and no
    /// demand wants none). Counts a look at each idle member; forgets the attempts at work no
    /// longer waiting.
    pub(crate) fn plan(&mut self, demands: Vec<Demand<G>>) -> Plan<G> {
        let waiting: HashSet<u64> = demands.iter().flat_map(|d| d.work.clone()).collect();
        self.attempts.retain(|work, _| waiting.contains(work));
        self.given_up.retain(|work| waiting.contains(work));
        let mut plan = Plan {
            retire: Vec::new(),
            start: Vec::new(),
            given_up: Vec::new(),
        };
        let mut by_group: BTreeMap<G, Demand<G>> = BTreeMap::new();
        for member in self.members.values() {
            by_group
                .entry(member.group.clone())
                .or_insert_with(|| Demand::new(member.group.clone(), Vec::new()));
        }
        for mut demand in demands {
            demand.work.retain(|work| {
                let attempts = self.attempts(*work);
                if attempts < self.max_attempts {
                    return true;
                }
                if self.given_up.insert(*work) {
                    plan.given_up.push((*work, attempts));
                }
                false
            });
            by_group.insert(demand.group.clone(), demand);
        }
        for demand in by_group.into_values() {
            plan.retire.extend(self.count_surplus(&demand));
            plan.start.extend(self.starts(&demand));
        }
        plan
    }

    /// Counts a look at each idle member of the demand's group: the oldest beyond what the
    /// group wants are surplus, the others not (their count starts over). Returns those
    /// surplus at two looks in a row.
    fn count_surplus(&mut self, demand: &Demand<G>) -> Vec<String> {
        let wanted = demand.work.len() + demand.floor;
        let mut idle: Vec<(&String, &mut Member<G, T>)> = self
            .members
            .iter_mut()
            .filter(|(_, m)| m.group == demand.group && m.phase == Phase::Idle)
            .collect();
        idle.sort_by_key(|(_, m)| m.started);
        let surplus = idle.len().saturating_sub(wanted);
        let mut retire = Vec::new();
        for (index, (name, member)) in idle.into_iter().enumerate() {
            if index < surplus {
                member.surplus_looks += 1;
                if member.surplus_looks >= 2 {
                    retire.push(name.clone());
                }
            } else {
                member.surplus_looks = 0;
            }
        }
        retire
    }

    /// The members the demand's group lacks: for work without a free member started for it
    /// first (oldest first), then for the rest, then the floor.
    fn starts(&self, demand: &Demand<G>) -> Vec<Start<G>> {
        let free: Vec<&Member<G, T>> = self
            .members
            .values()
            .filter(|m| m.group == demand.group && m.phase != Phase::Busy)
            .collect();
        let missing = (demand.work.len() + demand.floor).saturating_sub(free.len());
        let room = demand.cap.map_or(usize::MAX, |cap| {
            cap.saturating_sub(self.count(&demand.group))
        });
        let covered: BTreeSet<u64> = free.iter().map(|m| m.work).collect();
        let (uncovered, covered): (Vec<u64>, Vec<u64>) =
            demand.work.iter().partition(|work| !covered.contains(work));
        let mut work = uncovered.into_iter().chain(covered);
        (0..missing.min(room))
            .map(|_| Start {
                group: demand.group.clone(),
                work: work.next(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    type TestPool = Pool<&'static str, ()>;

    fn pool() -> TestPool {
        Pool::new(3)
    }

    fn add(pool: &mut TestPool, name: &str, group: &'static str, work: u64, phase: Phase) {
        // Started in the order of their work.
        let started = Instant::now() + Duration::from_secs(work);
        pool.insert(name.into(), group, work, started, phase, ());
    }

    fn starts(plan: &Plan<&'static str>) -> Vec<(&'static str, Option<u64>)> {
        plan.start.iter().map(|s| (s.group, s.work)).collect()
    }

    #[test]
    fn starts_one_member_per_waiting_work_less_the_free_ones() {
        let mut pool = pool();
        add(&mut pool, "a", "maven", 1, Phase::Starting);
        add(&mut pool, "b", "maven", 9, Phase::Busy);
        let plan = pool.plan(vec![
            Demand::new("maven", vec![1, 2, 3]),
            Demand::new("node", vec![7]),
        ]);
        assert_eq!(
            starts(&plan),
            [("maven", Some(2)), ("maven", Some(3)), ("node", Some(7))],
            "work 1 has its member; the busy one serves none"
        );
        assert!(plan.retire.is_empty());
    }

    #[test]
    fn a_group_cap_counts_busy_members_and_a_floor_adds_warm_ones() {
        let mut pool = pool();
        add(&mut pool, "b", "maven", 9, Phase::Busy);
        let capped = Demand {
            cap: Some(3),
            ..Demand::new("maven", vec![1, 2, 3, 4])
        };
        let warm = Demand {
            floor: 2,
            ..Demand::new("default", vec![5])
        };
        let plan = pool.plan(vec![capped, warm]);
        assert_eq!(
            starts(&plan),
            [
                ("default", Some(5)),
                ("default", None),
                ("default", None),
                ("maven", Some(1)),
                ("maven", Some(2)),
            ]
        );
    }

    #[test]
    fn work_given_up_on_stops_counting_and_is_reported_once() {
        let mut pool = pool();
        for _ in 0..3 {
            pool.attempt_failed(1);
        }
        add(&mut pool, "idle", "maven", 1, Phase::Idle);
        let plan = pool.plan(vec![Demand::new("maven", vec![1, 2])]);
        assert_eq!(plan.given_up, [(1, 3)]);
        assert!(plan.start.is_empty(), "the idle member serves work 2");
        let plan = pool.plan(vec![Demand::new("maven", vec![1])]);
        assert!(plan.given_up.is_empty(), "reported once");
        assert!(plan.start.is_empty() && plan.retire.is_empty());
        let plan = pool.plan(vec![Demand::new("maven", vec![1])]);
        assert_eq!(
            plan.retire,
            ["idle"],
            "nothing wants the idle member any more"
        );
        // Work that left the queue is forgotten: back in it, it is tried afresh.
        pool.plan(Vec::new());
        assert_eq!(pool.attempts(1), 0);
    }

    #[test]
    fn surplus_idle_members_retire_oldest_first_at_the_second_look_in_a_row() {
        let mut pool = pool();
        add(&mut pool, "old", "maven", 1, Phase::Idle);
        add(&mut pool, "new", "maven", 2, Phase::Idle);
        add(&mut pool, "young", "maven", 3, Phase::Starting);
        let plan = pool.plan(vec![Demand::new("maven", vec![5])]);
        assert!(plan.retire.is_empty(), "one look only");
        // Work arrived meanwhile: nobody is surplus, and the count starts over.
        pool.plan(vec![Demand::new("maven", vec![5, 6])]);
        assert!(
            pool.plan(vec![Demand::new("maven", vec![5])])
                .retire
                .is_empty()
        );
        let plan = pool.plan(vec![Demand::new("maven", vec![5])]);
        assert_eq!(plan.retire, ["old"]);
        assert!(plan.start.is_empty());
    }

    #[test]
    fn a_warm_member_is_reported_taken_once_and_ages_out_only_while_idle() {
        let mut pool = pool();
        let now = Instant::now();
        add(&mut pool, "warm", "maven", 0, Phase::Idle);
        add(&mut pool, "cold", "maven", 0, Phase::Idle);
        pool.join("warm", "p");
        let max_age = |_: &str| Some(Duration::from_secs(60));
        let later = now + Duration::from_secs(61);
        assert!(pool.aged(max_age, later).is_empty(), "one look only");
        assert_eq!(
            pool.aged(max_age, later),
            ["warm"],
            "never the unpooled one"
        );
        assert_eq!(pool.busy("warm").as_deref(), Some("p"));
        assert_eq!(pool.busy("warm"), None, "once");
        assert_eq!(pool.busy("cold"), None, "not a pool's");
        assert!(pool.aged(max_age, later).is_empty(), "busy: never aged out");
        assert_eq!(pool.warm_free("p"), 0);
    }

    #[test]
    fn idle_members_beyond_the_work_join_the_pools_short_of_members_youngest_first() {
        let mut pool = pool();
        add(&mut pool, "old", "maven", 1, Phase::Idle);
        add(&mut pool, "young", "maven", 2, Phase::Idle);
        add(&mut pool, "starting", "maven", 3, Phase::Starting);
        add(&mut pool, "member", "maven", 4, Phase::Idle);
        pool.join("member", "a");
        let pools = [("a".to_owned(), 2), ("b".to_owned(), 1)];
        // Three unpooled free members, one waiting work: two are strays, and only idle ones
        // join.
        let joined = pool.adopt_strays(&"maven", 1, &pools);
        let pair = |name: &str, pool: &str| (name.to_owned(), pool.to_owned());
        assert_eq!(joined, [pair("young", "a"), pair("old", "b")]);
        assert!(
            pool.adopt_strays(&"maven", 0, &pools).is_empty(),
            "the pools are full"
        );
    }

    #[test]
    fn a_busy_member_is_never_retired() {
        let mut pool = pool();
        add(&mut pool, "busy", "maven", 1, Phase::Busy);
        for _ in 0..3 {
            let plan = pool.plan(Vec::new());
            assert!(plan.retire.is_empty() && plan.start.is_empty());
        }
        if let Some(member) = pool.get_mut("busy") {
            member.phase = Phase::Idle;
        }
        pool.plan(Vec::new());
        assert_eq!(pool.plan(Vec::new()).retire, ["busy"]);
    }
}
