//! The warm pools as a source that keeps its own idle members sees them (GitHub runners by
//! resource class, Jenkins agents by label): the floors the chain asks for now, by the
//! source's groups, which pool a new warm member joins, and what the pools are told when a
//! member leaves. The planning itself is [`Pool`]'s.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::pool::{Member, Phase, Pool};
use super::{Chain, MemberState, WarmFloor};

/// The floors of the warm pools that name one source, by the group their members are kept in.
#[derive(Debug)]
pub(crate) struct Floors<G> {
    by_group: BTreeMap<G, Vec<WarmFloor>>,
}

impl<G: Ord + Clone> Floors<G> {
    /// `floors` by the group `group_of` puts each in; a floor it refuses (why, in words) means
    /// nothing to the source: it is left out, with a warning once per pool (`warned`).
    pub(crate) fn new(
        floors: Vec<WarmFloor>,
        group_of: impl Fn(&WarmFloor) -> Result<G, String>,
        source: &str,
        warned: &mut HashSet<String>,
    ) -> Self {
        let mut by_group: BTreeMap<G, Vec<WarmFloor>> = BTreeMap::new();
        for floor in floors {
            match group_of(&floor) {
                Ok(group) => by_group.entry(group).or_default().push(floor),
                Err(why) => {
                    if warned.insert(floor.pool.clone()) {
                        tracing::warn!(source, pool = %floor.pool, "warm pool {:?} is ignored by source {source}: {why}", floor.pool);
                    }
                }
            }
        }
        Self { by_group }
    }

    /// Leaves out (for now) the pools whose members keep failing before they get going
    /// (`backoff`); a pool with a member idle or busy in `members` is well again.
    pub(crate) fn hold_back<T>(
        &mut self,
        backoff: &mut Backoff,
        members: &Pool<G, T>,
        now: Instant,
    ) {
        for (_, member) in members.iter() {
            if member.phase != Phase::Starting
                && let Some(pool) = &member.warm
            {
                backoff.failing.remove(pool);
            }
        }
        for floor in self.by_group.values_mut().flatten() {
            if backoff.holds(&floor.pool, now) {
                floor.min_idle = 0;
            }
        }
    }

    /// The groups some pool keeps members in.
    pub(crate) fn groups(&self) -> impl Iterator<Item = &G> {
        self.by_group.keys()
    }

    /// Idle members the pools want kept in `group` now.
    pub(crate) fn floor(&self, group: &G) -> usize {
        self.by_group
            .get(group)
            .map_or(0, |floors| floors.iter().map(|f| f.min_idle).sum())
    }

    /// The pools of `group` with the idle members each wants, in the chain's order.
    pub(crate) fn wanted(&self, group: &G) -> Vec<(String, usize)> {
        self.by_group
            .get(group)
            .map(|floors| {
                floors
                    .iter()
                    .map(|f| (f.pool.clone(), f.min_idle))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The floor of pool `pool`.
    pub(crate) fn pool(&self, pool: &str) -> Option<&WarmFloor> {
        self.by_group.values().flatten().find(|f| f.pool == pool)
    }

    /// How old an idle member of pool `pool` may get.
    pub(crate) fn max_idle_age(&self, pool: &str) -> Option<Duration> {
        self.pool(pool).and_then(|f| f.max_idle_age)
    }

    /// The pool a new warm member of `group` joins: the one furthest below its floor (the
    /// first of them on a tie); `None` when no pool keeps members in `group`.
    pub(crate) fn pool_for<T>(&self, group: &G, members: &Pool<G, T>) -> Option<&WarmFloor> {
        let floors = self.by_group.get(group)?;
        floors
            .iter()
            .enumerate()
            .max_by_key(|(index, f)| {
                let missing = f.min_idle.saturating_sub(members.warm_free(&f.pool));
                (missing, std::cmp::Reverse(*index))
            })
            .map(|(_, f)| f)
    }
}

/// Idle members whose work went to another member join the pools of their group that are
/// short of idle members (see [`Pool::adopt_strays`]; `waiting`: the work waiting per group),
/// and the chain hears of each as an idle member of its pool.
pub(crate) fn adopt_strays<'g, G: Ord + Clone + 'g, T>(
    chain: &dyn Chain,
    members: &mut Pool<G, T>,
    floors: &Floors<G>,
    waiting: impl IntoIterator<Item = (&'g G, usize)>,
    source: &str,
) {
    for (group, work) in waiting {
        for (name, pool) in members.adopt_strays(group, work, &floors.wanted(group)) {
            tracing::info!(source, member = %name, pool = %pool, "an idle member whose work went to another one stays, as a member of warm pool {pool}");
            chain.warm_member(&name, &pool, MemberState::Idle);
        }
    }
}

/// Member `name` left its source's pool (`member`, as it was): a warm one that never took
/// work is reported retired; one that took work was reported taken already. A warm one that
/// never got going (it ended while starting: an image that cannot be pulled, a runner that
/// crashes) holds its pool's refills back (`backoff`), so a broken pool does not start a
/// member at every pass.
pub(crate) fn left<G, T>(
    chain: &dyn Chain,
    backoff: &mut Backoff,
    name: &str,
    member: &Member<G, T>,
) {
    if let Some(pool) = &member.warm
        && member.phase != Phase::Busy
    {
        chain.warm_member(name, pool, MemberState::Retired);
        if member.phase == Phase::Starting {
            let wait = backoff.failed(pool, Instant::now());
            tracing::warn!(member = %name, pool = %pool, "a member of warm pool {pool} ended before it got going; the pool's next refill waits {}s", wait.as_secs());
        }
    }
}

/// Warm pools whose members fail before they get going: their refills wait 2 s, doubling up
/// to 5 min, until a member of theirs is idle or busy.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    /// Failures in a row and until when refills wait, by pool.
    failing: HashMap<String, (u32, Instant)>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(2);
    const LONGEST: Duration = Duration::from_secs(300);

    /// A member of `pool` failed at `now`; returns how long its refills wait.
    fn failed(&mut self, pool: &str, now: Instant) -> Duration {
        let entry = self.failing.entry(pool.to_owned()).or_insert((0, now));
        entry.0 = entry.0.saturating_add(1);
        let wait = Self::FIRST
            .saturating_mul(2u32.saturating_pow(entry.0 - 1))
            .min(Self::LONGEST);
        entry.1 = now + wait;
        wait
    }

    /// Whether `pool`'s refills wait at `now`.
    fn holds(&self, pool: &str, now: Instant) -> bool {
        self.failing
            .get(pool)
            .is_some_and(|(_, until)| now < *until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floor(pool: &str, class: Option<&str>, label: Option<&str>, min_idle: usize) -> WarmFloor {
        WarmFloor {
            pool: pool.into(),
            class: class.map(str::to_owned),
            label: label.map(str::to_owned),
            min_idle,
            max_idle_age: None,
        }
    }

    #[test]
    fn floors_add_up_per_group_and_a_refused_one_is_warned_about_once() {
        let by_class = |f: &WarmFloor| match &f.label {
            Some(_) => Err("labels mean nothing here".to_owned()),
            None => Ok(f.class.clone()),
        };
        let mut warned = HashSet::new();
        let floors = vec![
            floor("a", None, None, 2),
            floor("b", None, None, 1),
            floor("big", Some("big"), None, 3),
            floor("maven", None, Some("maven"), 5),
        ];
        let got = Floors::new(floors.clone(), by_class, "gh", &mut warned);
        assert_eq!(got.floor(&None), 3);
        assert_eq!(got.floor(&Some("big".into())), 3);
        assert_eq!(got.groups().count(), 2);
        assert!(got.pool("maven").is_none());
        assert_eq!(warned, HashSet::from(["maven".to_owned()]));
        Floors::new(floors, by_class, "gh", &mut warned);
        assert_eq!(warned.len(), 1, "once per pool");
    }

    #[test]
    fn a_pool_whose_members_fail_to_start_waits_longer_each_time_until_one_gets_going() {
        let now = Instant::now();
        let mut backoff = Backoff::default();
        let mut members: Pool<Option<String>, ()> = Pool::new(3);
        let floors = |backoff: &mut Backoff, members: &Pool<Option<String>, ()>, at| {
            let mut floors = Floors::new(
                vec![floor("a", None, None, 2), floor("b", None, None, 1)],
                |f| Ok::<_, String>(f.class.clone()),
                "gh",
                &mut HashSet::new(),
            );
            floors.hold_back(backoff, members, at);
            floors.floor(&None)
        };
        assert_eq!(floors(&mut backoff, &members, now), 3);
        assert_eq!(backoff.failed("a", now), Duration::from_secs(2));
        assert_eq!(backoff.failed("a", now), Duration::from_secs(4));
        assert_eq!(floors(&mut backoff, &members, now), 1, "a is held back");
        assert_eq!(
            floors(&mut backoff, &members, now + Duration::from_secs(4)),
            3,
            "until its wait is over"
        );
        for _ in 0..20 {
            backoff.failed("a", now);
        }
        assert!(backoff.holds("a", now + Duration::from_secs(299)));
        assert!(
            !backoff.holds("a", now + Duration::from_secs(300)),
            "at most 5 min"
        );
        members.insert("x".into(), None, 0, now, Phase::Idle, ());
        members.join("x", "a");
        assert_eq!(floors(&mut backoff, &members, now), 3, "a member got going");
        assert!(!backoff.holds("a", now));
    }

    #[test]
    fn a_new_member_joins_the_pool_furthest_below_its_floor() {
        let mut warned = HashSet::new();
        let floors = Floors::new(
            vec![floor("a", None, None, 1), floor("b", None, None, 2)],
            |f| Ok::<_, String>(f.class.clone()),
            "gh",
            &mut warned,
        );
        let mut members: Pool<Option<String>, ()> = Pool::new(3);
        assert_eq!(floors.pool_for(&None, &members).unwrap().pool, "b");
        members.insert(
            "x".into(),
            None,
            1,
            tokio::time::Instant::now(),
            Phase::Idle,
            (),
        );
        members.join("x", "b");
        assert_eq!(
            floors.pool_for(&None, &members).unwrap().pool,
            "a",
            "a tie: the first"
        );
        assert!(floors.pool_for(&Some("big".into()), &members).is_none());
    }
}

/// A chain for the sources' unit tests: slots always free, floors as the test sets them, and
/// a record of what the source launched, stopped and told the pools.
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::Mutex;

    use futures::future::BoxFuture;

    use crate::build::{About, Build};
    use crate::sources::{Chain, MemberState, Slot, WarmFloor};

    #[derive(Default)]
    pub(crate) struct FakeChain {
        pub(crate) floors: Mutex<Vec<WarmFloor>>,
        pub(crate) launched: Mutex<Vec<Build>>,
        pub(crate) stopped: Mutex<Vec<String>>,
        /// Every `warm_member` call, in order.
        pub(crate) members: Mutex<Vec<(String, String, MemberState)>>,
    }

    impl FakeChain {
        pub(crate) fn set_floors(&self, floors: Vec<WarmFloor>) {
            *self.floors.lock().unwrap() = floors;
        }

        /// The `warm_member` calls since the last call, in order.
        pub(crate) fn take_members(&self) -> Vec<(String, String, MemberState)> {
            std::mem::take(&mut *self.members.lock().unwrap())
        }

        pub(crate) fn launched_names(&self) -> Vec<String> {
            self.launched
                .lock()
                .unwrap()
                .iter()
                .map(|b| b.name.clone())
                .collect()
        }
    }

    /// Serves `router` on a free local port (a fake CI server); returns its address.
    pub(crate) async fn serve(router: axum::Router) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        address
    }

    impl Chain for FakeChain {
        fn slot(&self) -> BoxFuture<'_, Option<Slot>> {
            Box::pin(async { Some(Slot::new(())) })
        }

        fn try_slot(&self) -> Option<Slot> {
            Some(Slot::new(()))
        }

        fn persist<'a>(&'a self, _: &'a Build) -> BoxFuture<'a, ()> {
            Box::pin(async {})
        }

        fn launch(&self, _: Slot, build: Build) {
            self.launched.lock().unwrap().push(build);
        }

        fn stop(&self, name: &str) -> BoxFuture<'_, ()> {
            self.stopped.lock().unwrap().push(name.to_owned());
            Box::pin(async {})
        }

        fn leading(&self) -> bool {
            true
        }

        fn explain(&self, _: &str) -> BoxFuture<'_, String> {
            Box::pin(async { String::new() })
        }

        fn describe<'a>(&'a self, _: &'a str, _: About) -> BoxFuture<'a, ()> {
            Box::pin(async {})
        }

        fn exists(&self, _: &str) -> BoxFuture<'_, bool> {
            Box::pin(async { false })
        }

        fn warm_floors(&self) -> Vec<WarmFloor> {
            self.floors.lock().unwrap().clone()
        }

        fn warm_member(&self, name: &str, pool: &str, state: MemberState) {
            self.members
                .lock()
                .unwrap()
                .push((name.to_owned(), pool.to_owned(), state));
        }
    }
}
