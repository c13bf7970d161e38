//! The builds that finished lately, for every source in one history: a ring of the last N, so
//! the status page can show a timeline while the coordinator's memory stays bounded.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::build::{About, BuildKey, Outcome};
use crate::executor::Footprint;

/// One build as the status page and `/api/v1/builds` show it, alive or finished. It holds only
/// what people may see: no secret, no variable, no spec.
#[derive(Debug, Clone)]
pub struct BuildRecord {
    /// The work it did.
    pub key: BuildKey,
    /// Its name (`kiln-gl-<job id>`).
    pub name: String,
    /// Project, job, link and queue time.
    pub about: About,
    /// Its size and resource class, when the executor sizes builds.
    pub footprint: Option<Footprint>,
    /// When the coordinator launched (or adopted) it.
    pub launched: SystemTime,
    /// When its pod (or process) was created; `None` until then, and for adopted builds.
    pub created: Option<SystemTime>,
    /// When its main container (or process) started running.
    pub running: Option<SystemTime>,
    /// How it ended; `None` while it is alive.
    pub end: Option<End>,
}

/// How a finished build ended.
#[derive(Debug, Clone)]
pub struct End {
    /// When.
    pub at: SystemTime,
    /// What happened.
    pub outcome: Outcome,
    /// The coordinator's explanation (the same words it logs and reports).
    pub detail: String,
    /// The script's or agent's exit code, if known.
    pub exit_code: Option<i32>,
    /// What it cost, when prices are configured and the build was sized.
    pub cost: Option<f64>,
}

impl BuildRecord {
    /// When its pod started costing money: its creation, else its launch.
    pub(crate) fn billed_from(&self) -> SystemTime {
        self.created.unwrap_or(self.launched)
    }
}

/// The last `limit` finished builds, oldest first.
#[derive(Debug)]
pub(crate) struct History {
    limit: usize,
    finished: Mutex<VecDeque<Arc<BuildRecord>>>,
}

impl History {
    /// An empty history keeping at most `limit` builds (0: none).
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            finished: Mutex::new(VecDeque::new()),
        }
    }

    /// Adds a finished build, forgetting the oldest when full.
    pub(crate) fn push(&self, record: BuildRecord) {
        if self.limit == 0 {
            return;
        }
        let mut finished = self.lock();
        while finished.len() >= self.limit {
            finished.pop_front();
        }
        finished.push_back(Arc::new(record));
    }

    /// The newest finished build called `name` did other work than it was launched for
    /// (news of it came after its end): people see `about` from now on.
    pub(crate) fn describe(&self, name: &str, about: &crate::build::About) {
        let mut finished = self.lock();
        if let Some(record) = finished.iter_mut().rev().find(|r| r.name == name) {
            let mut described = BuildRecord::clone(record);
            described.about = about.clone();
            *record = Arc::new(described);
        }
    }

    /// The builds kept, newest first.
    pub(crate) fn newest_first(&self) -> Vec<Arc<BuildRecord>> {
        self.lock().iter().rev().cloned().collect()
    }

    /// How many builds it keeps at most.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<BuildRecord>>> {
        self.finished.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::SourceKind;

    fn record(id: u64) -> BuildRecord {
        BuildRecord {
            key: BuildKey {
                source: SourceKind::GitLab,
                runner: "r".into(),
                id,
            },
            name: format!("kiln-gl-{id}"),
            about: About::default(),
            footprint: None,
            launched: SystemTime::now(),
            created: None,
            running: None,
            end: None,
        }
    }

    #[test]
    fn the_history_keeps_only_the_last_builds() {
        let history = History::new(3);
        for id in 1..=5 {
            history.push(record(id));
        }
        let ids: Vec<u64> = history.newest_first().iter().map(|r| r.key.id).collect();
        assert_eq!(ids, [5, 4, 3]);
    }

    #[test]
    fn a_history_of_zero_keeps_nothing() {
        let history = History::new(0);
        history.push(record(1));
        assert!(history.newest_first().is_empty());
    }
}
