//! The build table: every build the coordinator follows now, by name — what the status page
//! and capacity in use show, and what keeps a second hand-over of one build from starting it
//! twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use super::history::BuildRecord;
use crate::build::{About, BuildKey, SourceKind};
use crate::executor::Footprint;

/// Where a build is, as the coordinator tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Handed to the executor, not running yet.
    Pending,
    /// Its main container or process runs.
    Running,
}

impl Phase {
    /// `pending` or `running`, as in metrics.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
        }
    }
}

/// One build alive now.
#[derive(Debug, Clone)]
pub struct Alive {
    /// The work it does.
    pub key: BuildKey,
    /// Its name.
    pub name: String,
    /// What people see about it.
    pub about: About,
    /// Where it is.
    pub phase: Phase,
    /// When the coordinator launched (or adopted) it.
    pub since: SystemTime,
    /// Its size and resource class, when the executor sizes builds.
    pub footprint: Option<Footprint>,
    /// When its pod (or process) was created; `None` before, and for adopted builds.
    pub created: Option<SystemTime>,
    /// When its main container (or process) started running.
    pub running: Option<SystemTime>,
}

impl Alive {
    /// The build as the status page shows it.
    pub(crate) fn record(&self) -> BuildRecord {
        self.clone().into_record()
    }

    /// The build as the history keeps it, once it ended.
    pub(crate) fn into_record(self) -> BuildRecord {
        BuildRecord {
            key: self.key,
            name: self.name,
            about: self.about,
            footprint: self.footprint,
            launched: self.since,
            created: self.created,
            running: self.running,
            end: None,
        }
    }
}

/// The builds alive now, by name; cloned handles share one table.
#[derive(Debug, Clone, Default)]
pub(crate) struct Table {
    alive: Arc<Mutex<HashMap<String, Alive>>>,
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Alive>> {
        self.alive.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether build `name` is followed (or being started) now.
    pub(crate) fn follows(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Adds `alive` unless a build of its name is in the table already; whether it was added.
    pub(crate) fn insert(&self, alive: Alive) -> bool {
        let mut table = self.lock();
        if table.contains_key(&alive.name) {
            return false;
        }
        table.insert(alive.name.clone(), alive);
        true
    }

    /// Build `name`'s pod (or process) was created now.
    pub(crate) fn created(&self, name: &str) {
        if let Some(alive) = self.lock().get_mut(name) {
            alive.created = Some(SystemTime::now());
        }
    }

    /// Build `name` runs now; whether it moved from pending (only the first call does).
    pub(crate) fn running(&self, name: &str) -> bool {
        self.lock()
            .get_mut(name)
            .filter(|alive| alive.phase == Phase::Pending)
            .map(|alive| {
                alive.phase = Phase::Running;
                alive.running = Some(SystemTime::now());
            })
            .is_some()
    }

    /// Build `name` does other work than it was launched for: people see `about` from now on.
    /// False when no build of that name is alive.
    pub(crate) fn describe(&self, name: &str, about: &About) -> bool {
        self.lock()
            .get_mut(name)
            .map(|alive| alive.about = about.clone())
            .is_some()
    }

    /// Takes build `name` out of the table.
    pub(crate) fn remove(&self, name: &str) -> Option<Alive> {
        self.lock().remove(name)
    }

    /// How many builds are alive.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// How many builds of source `runner` of `kind` are alive.
    pub(crate) fn count(&self, kind: SourceKind, runner: &str) -> usize {
        self.lock()
            .values()
            .filter(|b| b.key.source == kind && b.key.runner == runner)
            .count()
    }

    /// The builds alive, latest launch first.
    pub(crate) fn records(&self) -> Vec<Arc<BuildRecord>> {
        let mut records: Vec<Arc<BuildRecord>> = self
            .lock()
            .values()
            .map(|alive| Arc::new(alive.record()))
            .collect();
        records.sort_by_key(|record| std::cmp::Reverse(record.launched));
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(id: u64, runner: &str) -> Alive {
        let key = BuildKey {
            source: SourceKind::GitLab,
            runner: runner.into(),
            id,
        };
        Alive {
            name: key.resource_name(),
            key,
            about: About::default(),
            phase: Phase::Pending,
            since: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(id),
            footprint: None,
            created: None,
            running: None,
        }
    }

    #[test]
    fn a_build_is_in_the_table_once() {
        let table = Table::default();
        assert!(table.insert(alive(1, "a")));
        assert!(
            !table.insert(alive(1, "a")),
            "a second hand-over is refused"
        );
        assert!(table.follows("kiln-gl-1"));
        assert_eq!(table.len(), 1);
        assert!(table.remove("kiln-gl-1").is_some());
        assert!(!table.follows("kiln-gl-1"));
    }

    #[test]
    fn a_build_moves_to_running_once() {
        let table = Table::default();
        table.insert(alive(1, "a"));
        assert!(table.running("kiln-gl-1"));
        assert!(!table.running("kiln-gl-1"), "only the first call moves it");
        assert!(!table.running("kiln-gl-2"), "no such build");
        assert_eq!(table.remove("kiln-gl-1").unwrap().phase, Phase::Running);
    }

    #[test]
    fn builds_are_counted_by_source_and_shown_latest_first() {
        let table = Table::default();
        for (id, runner) in [(1, "a"), (3, "b"), (2, "a")] {
            table.insert(alive(id, runner));
        }
        assert_eq!(table.count(SourceKind::GitLab, "a"), 2);
        assert_eq!(table.count(SourceKind::Jenkins, "a"), 0);
        let ids: Vec<u64> = table.records().iter().map(|r| r.key.id).collect();
        assert_eq!(ids, [3, 2, 1]);
    }
}
