//! When a polling source looks at its CI server again: every poll interval, later while its
//! error backoff lasts, and early when a webhook asks — at most once per poll interval, so a
//! burst of webhooks costs the CI server one extra look, not one per webhook. Every backoff of
//! a source (a loop's looks, a retried request) is a [`Pacer`]: the doubling lives here once.

use std::time::Duration;

use tokio::time::Instant;

/// The schedule of one polling loop.
#[derive(Debug)]
pub(crate) struct Pacer {
    interval: Duration,
    first_backoff: Duration,
    max_backoff: Duration,
    backoff: Duration,
    failing: bool,
    next: Instant,
    last_early: Option<Instant>,
}

impl Pacer {
    /// A schedule that looks every `interval`, backing off up to `max_backoff` after errors.
    pub(crate) fn new(interval: Duration, max_backoff: Duration) -> Self {
        Self {
            interval,
            first_backoff: interval,
            max_backoff: max_backoff.max(interval),
            backoff: interval,
            failing: false,
            next: Instant::now(),
            last_early: None,
        }
    }

    /// The same schedule, whose first wait after an error is `first` instead of an interval
    /// (a long interval that should not make the first retry as long).
    pub(crate) fn first_backoff(mut self, first: Duration) -> Self {
        self.first_backoff = first;
        self.backoff = first;
        self.max_backoff = self.max_backoff.max(first);
        self
    }

    /// When the next look is due.
    pub(crate) fn next(&self) -> Instant {
        self.next
    }

    /// A look succeeded: the next one is an interval away.
    pub(crate) fn succeeded(&mut self) {
        self.failing = false;
        self.backoff = self.first_backoff;
        self.next = Instant::now() + self.interval;
    }

    /// A look was not this replica's to take: the next one is an interval away, and a backoff
    /// under way goes on where it was.
    pub(crate) fn skipped(&mut self) {
        self.next = Instant::now() + self.interval;
    }

    /// The wait the next failure gets, without counting one.
    pub(crate) fn backoff(&self) -> Duration {
        self.backoff
    }

    /// A look failed: the next one waits the backoff, which doubles up to its cap. Returns
    /// the wait.
    pub(crate) fn failed(&mut self) -> Duration {
        let wait = self.backoff;
        self.failing = true;
        self.next = Instant::now() + wait;
        self.backoff = (self.backoff * 2).min(self.max_backoff);
        wait
    }

    /// A webhook asks for a look now. Granted (true, and the next look is now) unless the
    /// source is backing off after errors or an early look was already granted within the
    /// last interval; then the scheduled look, at most an interval away, serves the webhook.
    pub(crate) fn wake(&mut self) -> bool {
        let now = Instant::now();
        if self.failing
            || self
                .last_early
                .is_some_and(|last| now.duration_since(last) < self.interval)
        {
            return false;
        }
        self.last_early = Some(now);
        self.next = now;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_wakes_buys_one_early_look_per_interval() {
        let interval = Duration::from_secs(5);
        let mut pacer = Pacer::new(interval, Duration::from_secs(60));
        pacer.succeeded();
        let mut looks = 0;
        // 200 wakes over 12 s (a webhook every 60 ms) plus the scheduled looks.
        for _ in 0..200 {
            tokio::time::advance(Duration::from_millis(60)).await;
            if pacer.wake() || Instant::now() >= pacer.next() {
                looks += 1;
                pacer.succeeded();
            }
        }
        // 12 s is under three intervals: at most two looks per interval.
        assert!(looks <= 6, "{looks} looks");
        assert!(looks >= 3, "{looks} looks");
    }

    #[tokio::test(start_paused = true)]
    async fn wakes_do_not_cut_a_backoff_short() {
        let mut pacer = Pacer::new(Duration::from_secs(5), Duration::from_secs(60));
        assert_eq!(pacer.failed(), Duration::from_secs(5));
        assert_eq!(pacer.failed(), Duration::from_secs(10));
        let due = pacer.next();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!pacer.wake());
        assert_eq!(pacer.next(), due);
        pacer.succeeded();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(pacer.wake(), "after a success, a webhook is heard again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_backoff_doubles_to_its_cap_and_a_success_starts_it_over() {
        let mut pacer = Pacer::new(Duration::from_secs(60), Duration::from_secs(20))
            .first_backoff(Duration::from_secs(5));
        let waits: Vec<u64> = (0..4).map(|_| pacer.failed().as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40], "the cap is at least the interval");
        pacer.skipped();
        assert_eq!(pacer.backoff(), Duration::from_secs(60));
        pacer.succeeded();
        assert_eq!(pacer.backoff(), Duration::from_secs(5));
        assert_eq!(pacer.next(), Instant::now() + Duration::from_secs(60));
    }
}
