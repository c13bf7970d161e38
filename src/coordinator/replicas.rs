//! Replicas of one installation, through Leases where its builds live.
//!
//! Each replica renews a Lease of its own, `kiln-<coordinator>-<replica>`; a replica whose
//! Lease has expired (`renewTime + leaseDurationSeconds < now`) or is gone is dead, and the
//! first live replica to claim one of its builds follows it from then on. Singleton chores
//! run on the replica that holds the shared Lease `kiln-<coordinator>-leader`. Without Leases
//! (the local executor, or no permission for them) there is one replica, which owns every
//! build and always leads.
//!
//! The decisions are pure functions of the Leases and a time ([`expired`], [`live_replicas`],
//! [`owner`], [`leader_step`]); [`Replicas`] does the calls, in one membership loop
//! ([`Replicas::keep`]) that publishes what it found as a [`View`]: who this replica is, who
//! else is alive, whether it leads, and when builds were left behind. Adoption and the
//! sources' chains read that view through a [`Membership`]; nothing else calls the Leases.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::executor::{LeaseError, LeaseRecord, Leases};

/// How long Leases hold and how often they are renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A Lease not renewed for this long has expired.
    pub duration: Duration,
    /// How often a replica renews its Leases and looks at the others'.
    pub renew: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(5),
        }
    }
}

/// The name of replica `replica`'s own Lease.
pub(crate) fn replica_lease(coordinator: &str, replica: &str) -> String {
    lease_name(&format!("kiln-{coordinator}-{replica}"))
}

/// The name of the leader Lease.
pub(crate) fn leader_lease(coordinator: &str) -> String {
    lease_name(&format!("kiln-{coordinator}-leader"))
}

/// `name` as an object name (a DNS-1123 subdomain): lower case, other characters `-`.
fn lease_name(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-' | '.') => c,
            _ => '-',
        })
        .take(253)
        .collect();
    mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// Whether `lease` has expired at `now`: it was last renewed (or acquired) longer than its
/// duration ago, or says neither when nor for how long.
pub(crate) fn expired(lease: &LeaseRecord, now: SystemTime) -> bool {
    match (lease.renewed.or(lease.acquired), lease.duration) {
        (Some(renewed), Some(duration)) => renewed + duration < now,
        _ => true,
    }
}

/// The replicas alive at `now`: the holders of their own, unexpired Lease.
pub(crate) fn live_replicas(
    leases: &[LeaseRecord],
    coordinator: &str,
    now: SystemTime,
) -> BTreeSet<String> {
    leases
        .iter()
        .filter_map(|lease| {
            let holder = lease.holder.as_deref()?;
            (lease.name == replica_lease(coordinator, holder) && !expired(lease, now))
                .then(|| holder.to_owned())
        })
        .collect()
}

/// The replicas whose own Lease is there but expired at `now`.
pub(crate) fn expired_replicas(
    leases: &[LeaseRecord],
    coordinator: &str,
    now: SystemTime,
) -> BTreeSet<String> {
    leases
        .iter()
        .filter_map(|lease| {
            let holder = lease.holder.as_deref()?;
            (lease.name == replica_lease(coordinator, holder) && expired(lease, now))
                .then(|| holder.to_owned())
        })
        .collect()
}

/// How long after it expired a replica's Lease is removed, in Lease durations.
const FORGET_AFTER: u32 = 20;

/// The replica Leases expired for [`FORGET_AFTER`] Lease durations at `now`.
pub(crate) fn long_dead<'a>(
    leases: &'a [LeaseRecord],
    coordinator: &str,
    timing: Timing,
    now: SystemTime,
) -> Vec<&'a LeaseRecord> {
    let forget = timing.duration * FORGET_AFTER;
    leases
        .iter()
        .filter(|lease| {
            lease.holder.as_deref().is_some_and(|holder| {
                lease.name == replica_lease(coordinator, holder)
                    && now
                        .checked_sub(forget)
                        .is_some_and(|then| expired(lease, then))
            })
        })
        .collect()
}

/// Whose a build is, as replica `me` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// It carries this replica's label.
    Mine,
    /// It carries no replica label (an older kiln launched it), or that of a dead replica:
    /// the first live replica to claim it follows it.
    Free,
    /// A live replica follows it; never touch it.
    Live,
}

/// Whose a build labelled `labelled` is for replica `me`, with `live` the replicas alive.
pub(crate) fn owner(labelled: Option<&str>, me: &str, live: &BTreeSet<String>) -> Owner {
    match labelled {
        None => Owner::Free,
        Some(replica) if replica == me => Owner::Mine,
        Some(replica) if live.contains(replica) => Owner::Live,
        Some(_) => Owner::Free,
    }
}

/// What replica `me` does with the leader Lease, as it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LeaderStep {
    /// There is none: create it, holding it.
    Create,
    /// `me` holds it: renew it.
    Renew,
    /// Its holder let it expire (or there is none): take it over.
    TakeOver,
    /// Another replica (named) leads.
    Follow(String),
}

/// What `me` does with the leader Lease `lease` at `now`.
pub(crate) fn leader_step(lease: Option<&LeaseRecord>, me: &str, now: SystemTime) -> LeaderStep {
    let Some(lease) = lease else {
        return LeaderStep::Create;
    };
    match lease.holder.as_deref() {
        Some(holder) if holder == me => LeaderStep::Renew,
        Some(holder) if !holder.is_empty() && !expired(lease, now) => {
            LeaderStep::Follow(holder.to_owned())
        }
        _ => LeaderStep::TakeOver,
    }
}

/// Whether a replica whose last successful write of the leader Lease was at `renewed` still
/// leads at `now`: until the Lease could have expired for the others, less one renew period
/// of margin for clocks and slow calls.
pub(crate) fn still_leading(renewed: Instant, timing: Timing, now: Instant) -> bool {
    now < renewed + timing.duration.saturating_sub(timing.renew)
}

/// The wall clock, advancing with tokio's clock (so a paused-time test moves it), from the
/// wall time at start.
#[derive(Debug, Clone, Copy)]
struct Clock {
    wall: SystemTime,
    at: Instant,
}

impl Clock {
    fn new() -> Self {
        Self {
            wall: SystemTime::now(),
            at: Instant::now(),
        }
    }

    fn now(&self) -> SystemTime {
        self.wall + self.at.elapsed()
    }
}

/// Who else there is, as this replica knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Peers {
    /// No Leases, or no permission for them: this is the only replica; it owns every build
    /// and leads.
    Alone,
    /// The Leases have not been read yet: every other replica's build counts as a live one's.
    Unknown,
    /// The replicas alive at the last read, this one among them.
    Live(Arc<BTreeSet<String>>),
}

/// This replica among the installation's replicas, as the membership loop last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct View {
    /// See [`View::identity`].
    identity: Option<Arc<str>>,
    peers: Peers,
    /// Whether this replica runs the singleton chores now.
    leading: bool,
    /// Counts the times builds may have been left without a follower: a replica died, or this
    /// one became the leader (the last leader's orphans are its to remove).
    left_behind: u64,
}

impl View {
    fn new(identity: Option<&str>) -> Self {
        let alone = identity.is_none();
        Self {
            identity: identity.map(Arc::from),
            peers: if alone { Peers::Alone } else { Peers::Unknown },
            leading: alone,
            left_behind: 0,
        }
    }

    /// Whether this replica runs the singleton chores now.
    pub(crate) fn leading(&self) -> bool {
        self.leading
    }

    /// The identity the executor labels this replica's builds with, also when it runs as the
    /// only replica because Leases are forbidden (`None` without Leases at all).
    pub(crate) fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    /// Whether there are other replicas to reckon with.
    pub(crate) fn shared_builds(&self) -> bool {
        self.peers != Peers::Alone
    }

    /// Whether whose builds are whose can be told: the Leases have been read at least once
    /// (always, when this is the only replica).
    pub(crate) fn known(&self) -> bool {
        self.peers != Peers::Unknown
    }

    /// The replicas known to be alive, this one among them; `None` while that is not known
    /// (or when this is the only replica).
    pub(crate) fn live(&self) -> Option<Vec<String>> {
        match &self.peers {
            Peers::Live(live) => Some(live.iter().cloned().collect()),
            Peers::Alone | Peers::Unknown => None,
        }
    }

    /// Whose a build labelled `labelled` is (every build is this replica's when it is the
    /// only one).
    pub(crate) fn owner(&self, labelled: Option<&str>) -> Owner {
        match (&self.peers, self.identity()) {
            (Peers::Alone, _) | (_, None) => Owner::Mine,
            (Peers::Unknown, Some(me)) if labelled == Some(me) => Owner::Mine,
            (Peers::Unknown, Some(_)) => Owner::Live,
            (Peers::Live(live), Some(me)) => owner(labelled, me, live),
        }
    }
}

/// A reader of this replica's [`View`].
#[derive(Debug, Clone)]
pub(crate) struct Membership {
    view: watch::Receiver<View>,
    /// [`View::left_behind`] when [`Membership::left_behind`] last returned.
    seen: u64,
}

impl Membership {
    /// The view now.
    pub(crate) fn view(&self) -> View {
        self.view.borrow().clone()
    }

    /// Whether this replica runs the singleton chores now.
    pub(crate) fn leading(&self) -> bool {
        self.view.borrow().leading
    }

    /// Waits until builds were left behind since this reader was made or last returned here
    /// (a replica died, or this one became the leader). Never returns once the membership
    /// loop's [`Replicas`] is gone.
    pub(crate) async fn left_behind(&mut self) {
        loop {
            if self.view.changed().await.is_err() {
                return std::future::pending().await;
            }
            let left_behind = self.view.borrow_and_update().left_behind;
            if left_behind != self.seen {
                self.seen = left_behind;
                return;
            }
        }
    }
}

/// One replica's Leases: its own, and the leader Lease when it holds it.
pub(crate) struct Replicas {
    leases: Option<Arc<dyn Leases>>,
    timing: Timing,
    clock: Clock,
    view: watch::Sender<View>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// This replica's Lease as last written.
    own: Option<LeaseRecord>,
    /// The leader Lease as last written by this replica, and when (while it leads).
    leader: Option<(LeaseRecord, Instant)>,
    /// The replicas whose Lease was there but expired at the last look.
    expired: BTreeSet<String>,
}

impl Replicas {
    /// The replicas of an installation whose builds live where `leases` are; `None`: one
    /// replica, always leading.
    pub(crate) fn new(leases: Option<Arc<dyn Leases>>, timing: Timing) -> Self {
        let view = View::new(leases.as_ref().map(|l| l.replica()));
        Self {
            leases,
            timing,
            clock: Clock::new(),
            view: watch::Sender::new(view),
            state: Mutex::new(State::default()),
        }
    }

    /// A reader of this replica's view, which hears of builds left behind from now on.
    pub(crate) fn membership(&self) -> Membership {
        let view = self.view.subscribe();
        let seen = view.borrow().left_behind;
        Membership { view, seen }
    }

    /// The Leases, unless this is the only replica.
    fn shared(&self) -> Option<&Arc<dyn Leases>> {
        if self.shared_builds() {
            self.leases.as_ref()
        } else {
            None
        }
    }

    /// Whether there are other replicas to reckon with.
    pub(crate) fn shared_builds(&self) -> bool {
        self.view.borrow().shared_builds()
    }

    /// Whether this replica runs the singleton chores now.
    pub(crate) fn leading(&self) -> bool {
        self.view.borrow().leading
    }

    /// Sets whether this replica leads; whether that changed.
    fn set_leading(&self, leading: bool) -> bool {
        self.view.send_if_modified(|view| {
            let changed = view.leading != leading;
            view.leading = leading;
            changed
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The Lease API is forbidden: go on as the only replica.
    fn forbidden(&self, error: &LeaseError) {
        tracing::error!(error = %error, "kiln cannot use Leases (coordination.k8s.io, verbs get, list, watch, create, update, patch, delete on leases); running as the only replica: it adopts every build and runs every chore. Do not run more than one replica like this");
        self.view.send_modify(|view| {
            view.peers = Peers::Alone;
            view.leading = true;
        });
    }

    /// The membership loop: renews this replica's Leases and reads the others' every renew
    /// period until `stop`, and publishes in the view when builds were left behind (a replica
    /// died, or this one became the leader). It awaits nothing but the Lease calls (outside
    /// the executor's rate limit), so nothing delays a renewal; a take-over of many builds
    /// (each a claim and a call to its CI server) takes longer than a Lease lasts, and a
    /// replica that stopped renewing meanwhile would be taken for dead by the others.
    pub(crate) async fn keep(self: Arc<Self>, stop: CancellationToken) {
        let renew = self.timing.renew;
        let mut leading = self.leading();
        let mut next = Instant::now() + renew;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = stop.cancelled() => return,
            }
            // A steady beat: a slow round does not push the next one later.
            next += renew;
            let now = Instant::now();
            if next < now {
                next = now + renew;
            }
            if !self.shared_builds() {
                continue;
            }
            let round = self.round().await;
            if !round.read {
                continue;
            }
            // A new leader takes over the orphans the last one may have left.
            let became_leader = self.leading() && !leading;
            leading = self.leading();
            if became_leader || !round.died.is_empty() {
                self.view.send_modify(|view| view.left_behind += 1);
            }
        }
    }

    /// One round: renews this replica's Lease, takes or renews the leader Lease, and reads
    /// which replicas are alive. Returns the replicas that were alive at the last round and
    /// are not now (their builds are up for grabs), and whether the others could be read.
    pub(crate) async fn round(&self) -> Round {
        let Some(leases) = self.shared().cloned() else {
            return Round::default();
        };
        if let Err(e) = self.renew_own(leases.as_ref()).await {
            match e {
                LeaseError::Forbidden(_) => {
                    self.forbidden(&e);
                    return Round::default();
                }
                e => tracing::warn!(error = %e, "cannot renew this replica's Lease"),
            }
        }
        match self.lead(leases.as_ref()).await {
            Ok(()) => {}
            Err(e @ LeaseError::Forbidden(_)) => {
                self.forbidden(&e);
                return Round::default();
            }
            Err(e) => tracing::warn!(error = %e, "cannot take or renew the leader Lease"),
        }
        self.expire_leadership();
        let listed = match leases.list().await {
            Ok(listed) => listed,
            Err(e @ LeaseError::Forbidden(_)) => {
                self.forbidden(&e);
                return Round::default();
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the replicas' Leases");
                return Round::default();
            }
        };
        let now = self.clock.now();
        let mut live = live_replicas(&listed, leases.coordinator(), now);
        live.insert(leases.replica().to_owned());
        let expired_now = expired_replicas(&listed, leases.coordinator(), now);
        if self.leading() {
            self.forget_long_dead(leases.as_ref(), &listed, now).await;
        }
        let before = match &self.view.borrow().peers {
            Peers::Live(before) => Arc::clone(before),
            Peers::Alone | Peers::Unknown => Arc::default(),
        };
        let mut state = self.lock();
        // Dead: alive at the last round and not now, or found with an expired Lease not seen
        // expired before (a replica that died before this one ever saw it alive).
        let mut died: BTreeSet<String> = before.difference(&live).cloned().collect();
        died.extend(expired_now.difference(&state.expired).cloned());
        for replica in &live {
            if !before.contains(replica) && replica != leases.replica() {
                tracing::info!(%replica, "a replica joined");
            }
        }
        for replica in &died {
            tracing::info!(%replica, "a replica's Lease expired or is gone; taking over its builds");
        }
        state.expired = expired_now;
        drop(state);
        let live = Peers::Live(Arc::new(live));
        self.view.send_if_modified(|view| {
            let changed = view.peers != live;
            view.peers = live;
            changed
        });
        let died = died.into_iter().collect();
        Round { read: true, died }
    }

    /// Deletes the Leases of replicas dead for long (killed, never to renew again: every
    /// rollout names its pods anew), so they do not pile up. Their builds, if any are left,
    /// are free all the same: a replica without a Lease is dead.
    async fn forget_long_dead(&self, leases: &dyn Leases, listed: &[LeaseRecord], now: SystemTime) {
        for lease in long_dead(listed, leases.coordinator(), self.timing, now) {
            if let Some(version) = lease.version.as_deref()
                && let Err(e) = leases.delete(&lease.name, version).await
            {
                tracing::debug!(lease = %lease.name, error = %e, "cannot delete the Lease of a replica long gone");
            }
        }
    }

    /// Creates or renews this replica's Lease.
    async fn renew_own(&self, leases: &dyn Leases) -> Result<(), LeaseError> {
        let now = self.clock.now();
        let name = replica_lease(leases.coordinator(), leases.replica());
        let known = self.lock().own.clone();
        let written = match known {
            Some(mut own) => {
                own.renewed = Some(now);
                match leases.update(&own).await {
                    Ok(written) => written,
                    Err(e @ (LeaseError::Conflict(_) | LeaseError::Missing(_))) => {
                        if matches!(e, LeaseError::Conflict(_)) {
                            tracing::warn!(lease = %name, "someone else wrote this replica's Lease; replica ids (kubernetes.replica, POD_NAME, the hostname) must be unique");
                        }
                        // Changed or removed (taken for dead): take it back.
                        self.acquire_own(leases, &name, now).await?
                    }
                    Err(e) => return Err(e),
                }
            }
            None => self.acquire_own(leases, &name, now).await?,
        };
        self.lock().own = Some(written);
        Ok(())
    }

    async fn acquire_own(
        &self,
        leases: &dyn Leases,
        name: &str,
        now: SystemTime,
    ) -> Result<LeaseRecord, LeaseError> {
        let me = leases.replica().to_owned();
        let fresh = |previous: Option<&LeaseRecord>| LeaseRecord {
            name: name.to_owned(),
            holder: Some(me.clone()),
            acquired: Some(now),
            renewed: Some(now),
            duration: Some(self.timing.duration),
            transitions: previous.map_or(0, |p| p.transitions + 1),
            version: previous.and_then(|p| p.version.clone()),
        };
        match leases.get(name).await? {
            Some(previous) => leases.update(&fresh(Some(&previous))).await,
            None => leases.create(&fresh(None)).await,
        }
    }

    /// Takes, renews or follows the leader Lease.
    async fn lead(&self, leases: &dyn Leases) -> Result<(), LeaseError> {
        let now = self.clock.now();
        let me = leases.replica().to_owned();
        let name = leader_lease(leases.coordinator());
        let held = self.lock().leader.clone();
        if let Some((mut lease, _)) = held {
            lease.renewed = Some(now);
            match leases.update(&lease).await {
                Ok(written) => {
                    self.lock().leader = Some((written, Instant::now()));
                    return Ok(());
                }
                Err(LeaseError::Conflict(_) | LeaseError::Missing(_)) => {
                    // Another replica took it (this one was too slow); read who leads.
                    self.lose_leadership();
                }
                Err(e) => return Err(e),
            }
        }
        let current = leases.get(&name).await?;
        let fresh = |previous: Option<&LeaseRecord>| LeaseRecord {
            name: name.clone(),
            holder: Some(me.clone()),
            acquired: Some(now),
            renewed: Some(now),
            duration: Some(self.timing.duration),
            transitions: previous.map_or(0, |p| p.transitions + 1),
            version: previous.and_then(|p| p.version.clone()),
        };
        let written = match leader_step(current.as_ref(), &me, now) {
            LeaderStep::Follow(_) => {
                self.lose_leadership();
                return Ok(());
            }
            LeaderStep::Create => leases.create(&fresh(None)).await,
            LeaderStep::TakeOver => leases.update(&fresh(current.as_ref())).await,
            LeaderStep::Renew => {
                // Held by this replica, as an earlier start of it left it.
                let mut lease = current.clone().unwrap_or_else(|| fresh(None));
                lease.renewed = Some(now);
                leases.update(&lease).await
            }
        };
        match written {
            Ok(written) => {
                self.lock().leader = Some((written, Instant::now()));
                if self.set_leading(true) {
                    tracing::info!(replica = %me, "this replica leads now: it runs the singleton chores");
                }
                Ok(())
            }
            Err(LeaseError::Conflict(_)) => {
                self.lose_leadership();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Stops leading when the leader Lease could not be renewed in time.
    fn expire_leadership(&self) {
        let renewed = self.lock().leader.as_ref().map(|(_, at)| *at);
        if let Some(at) = renewed
            && !still_leading(at, self.timing, Instant::now())
        {
            tracing::warn!("the leader Lease could not be renewed in time; no longer leading");
            self.lose_leadership();
        }
    }

    fn lose_leadership(&self) {
        self.lock().leader = None;
        if self.set_leading(false) {
            tracing::info!("another replica leads now");
        }
    }

    /// Gives up the Leases at shutdown, so the others take over at their next round instead
    /// of after the Lease duration: the leader Lease, and this replica's own (its builds,
    /// left running, go to the others).
    pub(crate) async fn leave(&self) {
        let Some(leases) = self.shared().cloned() else {
            return;
        };
        let (own, leader) = {
            let mut state = self.lock();
            (state.own.take(), state.leader.take())
        };
        self.set_leading(false);
        for lease in [leader.map(|(lease, _)| lease), own].into_iter().flatten() {
            let Some(version) = lease.version.as_deref() else {
                continue;
            };
            if let Err(e) = leases.delete(&lease.name, version).await {
                tracing::warn!(lease = %lease.name, error = %e, "cannot give up the Lease; it expires by itself");
            }
        }
    }
}

/// What one round of [`Replicas::round`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Round {
    /// The replicas' Leases could be read.
    pub(crate) read: bool,
    /// Replicas alive at the round before and dead now.
    pub(crate) died: Vec<String>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use futures::future::BoxFuture;
    use std::collections::BTreeMap;

    const T0: Duration = Duration::from_secs(1_800_000_000);

    impl Replicas {
        /// Whose a build labelled `labelled` is, by the view now.
        fn owner(&self, labelled: Option<&str>) -> Owner {
            self.view.borrow().owner(labelled)
        }
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(seconds)
    }

    pub(crate) fn lease(
        name: &str,
        holder: Option<&str>,
        renewed: Option<u64>,
        duration: u64,
    ) -> LeaseRecord {
        LeaseRecord {
            name: name.into(),
            holder: holder.map(Into::into),
            acquired: renewed.map(at),
            renewed: renewed.map(at),
            duration: Some(Duration::from_secs(duration)),
            transitions: 0,
            version: Some("1".into()),
        }
    }

    #[test]
    fn a_lease_expires_after_its_duration() {
        let l = lease("kiln-ci-a", Some("a"), Some(100), 15);
        assert!(!expired(&l, at(100)));
        assert!(!expired(&l, at(115)), "exactly at the end it still holds");
        assert!(expired(&l, at(116)));
        let never_renewed = lease("kiln-ci-a", Some("a"), None, 15);
        assert!(expired(&never_renewed, at(0)));
        let no_duration = LeaseRecord {
            duration: None,
            ..lease("kiln-ci-a", Some("a"), Some(100), 15)
        };
        assert!(expired(&no_duration, at(100)));
    }

    #[test]
    fn live_replicas_hold_their_own_unexpired_lease() {
        let leases = [
            lease("kiln-ci-a", Some("a"), Some(100), 15),
            lease("kiln-ci-b", Some("b"), Some(80), 15),
            // The leader Lease names a holder but is no replica's own.
            lease("kiln-ci-leader", Some("c"), Some(100), 15),
            // A Lease of another name held by d does not make d alive.
            lease("kiln-ci-x", Some("d"), Some(100), 15),
            lease("kiln-ci-e", None, Some(100), 15),
        ];
        let live = live_replicas(&leases, "ci", at(101));
        assert_eq!(live, BTreeSet::from(["a".to_owned()]));
        assert!(live_replicas(&leases, "ci", at(200)).is_empty());
    }

    #[test]
    fn expired_replicas_and_long_dead_ones() {
        let leases = [
            lease("kiln-ci-a", Some("a"), Some(100), 15),
            lease("kiln-ci-b", Some("b"), Some(80), 15),
            lease("kiln-ci-leader", Some("c"), Some(0), 15),
        ];
        assert_eq!(
            expired_replicas(&leases, "ci", at(101)),
            BTreeSet::from(["b".to_owned()])
        );
        let timing = Timing::default();
        // b expired at 95; it is forgotten 20 durations (300 s) later.
        assert!(long_dead(&leases, "ci", timing, at(395)).is_empty());
        let names: Vec<&str> = long_dead(&leases, "ci", timing, at(396))
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(names, ["kiln-ci-b"]);
    }

    #[test]
    fn who_may_claim_a_build() {
        let live = BTreeSet::from(["a".to_owned(), "b".to_owned()]);
        assert_eq!(owner(Some("a"), "a", &live), Owner::Mine);
        assert_eq!(owner(Some("b"), "a", &live), Owner::Live);
        assert_eq!(owner(Some("gone"), "a", &live), Owner::Free);
        assert_eq!(owner(None, "a", &live), Owner::Free);
    }

    #[test]
    fn who_leads() {
        let me = "a";
        assert_eq!(leader_step(None, me, at(0)), LeaderStep::Create);
        let mine = lease("kiln-ci-leader", Some("a"), Some(100), 15);
        assert_eq!(leader_step(Some(&mine), me, at(500)), LeaderStep::Renew);
        let theirs = lease("kiln-ci-leader", Some("b"), Some(100), 15);
        assert_eq!(
            leader_step(Some(&theirs), me, at(110)),
            LeaderStep::Follow("b".into())
        );
        assert_eq!(
            leader_step(Some(&theirs), me, at(116)),
            LeaderStep::TakeOver
        );
        let released = lease("kiln-ci-leader", None, Some(100), 15);
        assert_eq!(
            leader_step(Some(&released), me, at(101)),
            LeaderStep::TakeOver
        );
    }

    #[tokio::test(start_paused = true)]
    async fn leadership_ends_before_the_others_may_take_over() {
        let timing = Timing::default();
        let renewed = Instant::now();
        assert!(still_leading(
            renewed,
            timing,
            renewed + Duration::from_secs(9)
        ));
        assert!(!still_leading(
            renewed,
            timing,
            renewed + Duration::from_secs(10)
        ));
    }

    #[test]
    fn lease_names_are_object_names() {
        assert_eq!(
            replica_lease("kiln", "kiln-6f7-x2"),
            "kiln-kiln-kiln-6f7-x2"
        );
        assert_eq!(replica_lease("CI_main", "Host_1"), "kiln-ci-main-host-1");
        assert_eq!(leader_lease("ci"), "kiln-ci-leader");
    }

    /// Leases in memory (the last resourceVersion given out, and the Leases by name), shared
    /// by the replicas of a test.
    pub(crate) type LeaseStore = Arc<Mutex<(u64, BTreeMap<String, LeaseRecord>)>>;

    /// Stores `lease` under the next resourceVersion, as the API server writes it.
    fn store_write(
        store: &mut (u64, BTreeMap<String, LeaseRecord>),
        lease: &LeaseRecord,
    ) -> LeaseRecord {
        store.0 += 1;
        let mut written = lease.clone();
        written.version = Some(store.0.to_string());
        store.1.insert(lease.name.clone(), written.clone());
        written
    }

    /// Leases in memory, with the API server's resourceVersion rules.
    pub(crate) struct MemoryLeases {
        pub(crate) replica: String,
        pub(crate) store: LeaseStore,
    }

    impl Leases for MemoryLeases {
        fn replica(&self) -> &str {
            &self.replica
        }

        fn coordinator(&self) -> &str {
            "ci"
        }

        fn list(&self) -> BoxFuture<'_, Result<Vec<LeaseRecord>, LeaseError>> {
            let all = self.store.lock().unwrap().1.values().cloned().collect();
            Box::pin(async move { Ok(all) })
        }

        fn get<'a>(
            &'a self,
            name: &'a str,
        ) -> BoxFuture<'a, Result<Option<LeaseRecord>, LeaseError>> {
            let found = self.store.lock().unwrap().1.get(name).cloned();
            Box::pin(async move { Ok(found) })
        }

        fn create<'a>(
            &'a self,
            lease: &'a LeaseRecord,
        ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
            let mut store = self.store.lock().unwrap();
            let result = if store.1.contains_key(&lease.name) {
                Err(LeaseError::Conflict(lease.name.clone()))
            } else {
                Ok(store_write(&mut store, lease))
            };
            Box::pin(async move { result })
        }

        fn update<'a>(
            &'a self,
            lease: &'a LeaseRecord,
        ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
            let mut store = self.store.lock().unwrap();
            let result = match store.1.get(&lease.name) {
                None => Err(LeaseError::Missing(lease.name.clone())),
                Some(stored) if stored.version != lease.version => {
                    Err(LeaseError::Conflict(lease.name.clone()))
                }
                Some(_) => Ok(store_write(&mut store, lease)),
            };
            Box::pin(async move { result })
        }

        fn delete<'a>(
            &'a self,
            name: &'a str,
            version: &'a str,
        ) -> BoxFuture<'a, Result<(), LeaseError>> {
            let mut store = self.store.lock().unwrap();
            let result = match store.1.get(name) {
                Some(stored) if stored.version.as_deref() != Some(version) => {
                    Err(LeaseError::Conflict(name.to_owned()))
                }
                _ => {
                    store.1.remove(name);
                    Ok(())
                }
            };
            Box::pin(async move { result })
        }
    }

    /// Leases that expire in seconds.
    const QUICK: Timing = Timing {
        duration: Duration::from_secs(3),
        renew: Duration::from_secs(1),
    };

    /// Replica `name` of an installation whose Leases are in `store`.
    pub(crate) fn sharing(store: &LeaseStore, name: &str, timing: Timing) -> Replicas {
        let leases = MemoryLeases {
            replica: name.into(),
            store: Arc::clone(store),
        };
        Replicas::new(Some(Arc::new(leases)), timing)
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_that_stops_renewing_is_taken_over() {
        let store = LeaseStore::default();
        let timing = QUICK;
        let replica = |name: &str| sharing(&store, name, timing);
        let (a, b) = (replica("a"), replica("b"));
        a.round().await;
        b.round().await;
        assert!(a.leading(), "the first replica takes the leader Lease");
        assert!(!b.leading());
        // Both see each other once b's Lease is there.
        a.round().await;
        assert_eq!(a.owner(Some("b")), Owner::Live);
        assert_eq!(b.owner(Some("a")), Owner::Live);

        // `a` stops renewing (killed); `b` goes on with its rounds.
        let killed = Instant::now();
        let mut took_over = None;
        let mut died = Vec::new();
        for _ in 0..10 {
            tokio::time::sleep(timing.renew).await;
            let round = b.round().await;
            died.extend(round.died);
            if b.owner(Some("a")) == Owner::Free && took_over.is_none() {
                took_over = Some(killed.elapsed());
            }
            if b.leading() {
                break;
            }
        }
        assert_eq!(died, ["a"]);
        let took_over = took_over.expect("a's builds became free");
        assert!(
            took_over >= timing.duration && took_over <= timing.duration + timing.renew,
            "a was taken for dead after {took_over:?}"
        );
        assert!(b.leading(), "b leads once a's leader Lease expired");

        // `a` comes back: it renews its own Lease again, but b leads.
        a.round().await;
        assert!(!a.leading(), "a notices it lost the leader Lease");
        b.round().await;
        assert_eq!(b.owner(Some("a")), Owner::Live);

        // b leaves at shutdown: a takes over at its next round, not after the duration.
        b.leave().await;
        let round = a.round().await;
        assert_eq!(round.died, ["b"]);
        assert!(a.leading());
    }

    #[test]
    fn the_view_says_whose_a_build_is_as_far_as_it_knows() {
        let alone = View::new(None);
        assert!(alone.leading() && alone.known() && !alone.shared_builds());
        assert_eq!(alone.owner(Some("b")), Owner::Mine);
        assert_eq!(alone.live(), None);

        let mut view = View::new(Some("a"));
        assert!(!view.leading() && !view.known() && view.shared_builds());
        assert_eq!(view.identity(), Some("a"));
        assert_eq!(view.owner(Some("a")), Owner::Mine);
        assert_eq!(view.owner(Some("gone")), Owner::Live, "not known yet");
        assert_eq!(view.owner(None), Owner::Live);
        assert_eq!(view.live(), None);

        view.peers = Peers::Live(Arc::new(BTreeSet::from(["a".into(), "b".into()])));
        assert!(view.known());
        assert_eq!(view.owner(Some("b")), Owner::Live);
        assert_eq!(view.owner(Some("gone")), Owner::Free);
        assert_eq!(view.owner(None), Owner::Free);
        assert_eq!(view.live(), Some(vec!["a".to_owned(), "b".to_owned()]));

        // Forbidden Leases: the only replica, still labelling its builds with its identity.
        view.peers = Peers::Alone;
        assert_eq!(view.owner(Some("b")), Owner::Mine);
        assert_eq!(view.identity(), Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_membership_loop_says_when_a_replica_left_builds_behind() {
        let store = LeaseStore::default();
        let timing = QUICK;
        let replica = |name: &str| Arc::new(sharing(&store, name, timing));
        let (a, b) = (replica("a"), replica("b"));
        a.round().await;
        b.round().await;
        a.round().await;
        let mut membership = b.membership();
        let stop = CancellationToken::new();
        let keeper = tokio::spawn(Arc::clone(&b).keep(stop.clone()));
        // `a` is killed: `b` hears of it once a's Leases expired, at a round of its own.
        let killed = Instant::now();
        membership.left_behind().await;
        let heard = killed.elapsed();
        assert!(
            heard >= timing.duration && heard <= timing.duration + 2 * timing.renew,
            "heard after {heard:?}"
        );
        assert_eq!(membership.view().owner(Some("a")), Owner::Free);
        // Once heard, nothing more until the next replica leaves.
        let again = tokio::time::timeout(10 * timing.renew, membership.left_behind()).await;
        assert!(again.is_err(), "builds left behind once, heard once");
        stop.cancel();
        keeper.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn without_leases_one_replica_owns_everything_and_leads() {
        let alone = Replicas::new(None, Timing::default());
        assert!(alone.leading());
        assert_eq!(alone.owner(Some("someone")), Owner::Mine);
        assert_eq!(alone.owner(None), Owner::Mine);
        assert_eq!(alone.round().await, Round::default());
    }

    /// Leases whose every call is forbidden (no RBAC).
    struct Forbidden;

    impl Leases for Forbidden {
        fn replica(&self) -> &str {
            "a"
        }
        fn coordinator(&self) -> &str {
            "ci"
        }
        fn list(&self) -> BoxFuture<'_, Result<Vec<LeaseRecord>, LeaseError>> {
            Box::pin(async { Err(LeaseError::Forbidden("no".into())) })
        }
        fn get<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Option<LeaseRecord>, LeaseError>> {
            Box::pin(async { Err(LeaseError::Forbidden("no".into())) })
        }
        fn create<'a>(
            &'a self,
            _: &'a LeaseRecord,
        ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
            Box::pin(async { Err(LeaseError::Forbidden("no".into())) })
        }
        fn update<'a>(
            &'a self,
            _: &'a LeaseRecord,
        ) -> BoxFuture<'a, Result<LeaseRecord, LeaseError>> {
            Box::pin(async { Err(LeaseError::Forbidden("no".into())) })
        }
        fn delete<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<(), LeaseError>> {
            Box::pin(async { Err(LeaseError::Forbidden("no".into())) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn forbidden_leases_make_a_single_replica() {
        let replicas = Replicas::new(Some(Arc::new(Forbidden)), Timing::default());
        assert!(!replicas.leading());
        assert_eq!(replicas.owner(Some("b")), Owner::Live);
        replicas.round().await;
        assert!(replicas.leading());
        assert!(!replicas.shared_builds());
        assert_eq!(replicas.owner(Some("b")), Owner::Mine);
    }
}
