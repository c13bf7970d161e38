//! `[[warm_pools]]` and `max_idle_total`: what pools of pre-started builds to keep, and the
//! checks that name every wrong field by its path.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::schedule::Window;
use crate::build::SourceKind;
use crate::problem::Problem;

/// One `[[warm_pools]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmPoolConfig {
    /// The pool's name (unique; shown on the status page, a metric label, written on its pods).
    pub name: String,
    /// `gitlab`, `jenkins` or `github` (every source of that kind), or a source entry's name.
    pub source: String,
    /// GitLab: jobs whose image is exactly this take the pool's pods.
    #[serde(default)]
    pub image: Option<String>,
    /// The resource class its members run in (`[kubernetes.resource_classes]`); none: the
    /// executor's default.
    #[serde(default)]
    pub class: Option<String>,
    /// Jenkins: the label its idle agents carry.
    #[serde(default)]
    pub label: Option<String>,
    /// Idle members kept outside any schedule window.
    #[serde(default)]
    pub min_idle: usize,
    /// An idle member older than this is replaced; none: kept until taken.
    #[serde(default, with = "humantime_serde::option")]
    pub max_idle_age: Option<Duration>,
    /// Windows that raise the floor while they are open (like Cron HPA).
    #[serde(default)]
    pub schedule: Vec<WindowConfig>,
}

/// One `[[warm_pools.schedule]]` window.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// When the window opens: five-field cron (minute hour day-of-month month day-of-week).
    pub cron: String,
    /// How long it stays open.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// The floor while it is open.
    pub min_idle: usize,
    /// The IANA time zone `cron` is read in (`Europe/Berlin`); UTC by default.
    #[serde(default)]
    pub timezone: Option<String>,
}

/// Which sources a pool serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// Every source of a kind.
    Kind(SourceKind),
    /// The source entry of this kind and name.
    Entry(SourceKind, String),
}

impl Target {
    /// Reads `source` against the configured entries (`(kind, name)`); `Err` says what is
    /// wrong.
    pub(crate) fn read(source: &str, entries: &[(SourceKind, String)]) -> Result<Self, String> {
        for kind in [SourceKind::GitLab, SourceKind::Jenkins, SourceKind::GitHub] {
            if source == kind.name() {
                return Ok(Self::Kind(kind));
            }
        }
        let kinds: Vec<SourceKind> = entries
            .iter()
            .filter(|(_, name)| name == source)
            .map(|(kind, _)| *kind)
            .collect();
        match kinds.as_slice() {
            [kind] => Ok(Self::Entry(*kind, source.to_owned())),
            [] => {
                let names: Vec<&str> = entries.iter().map(|(_, name)| name.as_str()).collect();
                Err(format!(
                    "`{source}` is neither `gitlab`, `jenkins` nor `github` nor the name of a source entry (entries: {})",
                    if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.join(", ")
                    }
                ))
            }
            _ => Err(format!(
                "`{source}` names source entries of more than one kind; give them distinct names"
            )),
        }
    }

    /// The kind of source it serves.
    pub(crate) fn kind(&self) -> SourceKind {
        match self {
            Self::Kind(kind) | Self::Entry(kind, _) => *kind,
        }
    }

    /// Whether it serves the source entry `name` of `kind`.
    pub(crate) fn serves(&self, kind: SourceKind, name: &str) -> bool {
        match self {
            Self::Kind(k) => *k == kind,
            Self::Entry(k, entry) => *k == kind && entry == name,
        }
    }
}

/// What the checks need to know of the rest of the configuration.
pub(crate) struct Context<'a> {
    /// Every source entry, `(kind, name)`.
    pub(crate) entries: &'a [(SourceKind, String)],
    /// Whether builds run on an executor that can start them ahead of their work.
    pub(crate) warm_executor: bool,
    /// The resource classes, when they are knowable (the Kubernetes executor).
    pub(crate) classes: Option<Vec<String>>,
    /// The most any count may be.
    pub(crate) max: usize,
}

/// Every problem of `pools` and `max_idle_total`.
pub(crate) fn problems(
    pools: &[WarmPoolConfig],
    max_idle_total: usize,
    context: &Context<'_>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    if max_idle_total > context.max {
        problems.push(Problem::new(
            "max_idle_total",
            format!("must be at most {}", context.max),
        ));
    }
    let mut names = BTreeMap::new();
    for (i, pool) in pools.iter().enumerate() {
        let at = |field: &str| format!("warm_pools[{i}].{field}");
        if pool.name.trim().is_empty() {
            problems.push(Problem::new(at("name"), "is empty"));
        } else if let Some(previous) = names.insert(pool.name.as_str(), i) {
            problems.push(Problem::new(
                at("name"),
                format!("same name as warm_pools[{previous}]; pool names must be unique"),
            ));
        }
        if pool.min_idle > context.max {
            problems.push(Problem::new(
                at("min_idle"),
                format!("must be at most {}", context.max),
            ));
        }
        if pool
            .max_idle_age
            .is_some_and(|age| age < Duration::from_secs(10))
        {
            problems.push(Problem::new(at("max_idle_age"), "must be at least 10s"));
        }
        match Target::read(&pool.source, context.entries) {
            Err(message) => problems.push(Problem::new(at("source"), message)),
            Ok(target) => problems.extend(kind_problems(pool, target.kind(), context, &at)),
        }
        if let (Some(class), Some(classes)) = (&pool.class, &context.classes)
            && !classes.contains(class)
        {
            problems.push(Problem::new(
                at("class"),
                format!("`{class}` is not in [kubernetes.resource_classes]"),
            ));
        }
        for (j, window) in pool.schedule.iter().enumerate() {
            let at = |field: &str| format!("warm_pools[{i}].schedule[{j}].{field}");
            if let Err(message) = Window::parse(window) {
                problems.push(Problem::new(at(message.field), message.text));
            }
            if window.duration.is_zero() {
                problems.push(Problem::new(at("duration"), "must be longer than 0s"));
            }
            if window.min_idle > context.max {
                problems.push(Problem::new(
                    at("min_idle"),
                    format!("must be at most {}", context.max),
                ));
            }
        }
    }
    problems
}

/// What a pool of `kind` may and must say.
fn kind_problems(
    pool: &WarmPoolConfig,
    kind: SourceKind,
    context: &Context<'_>,
    at: &dyn Fn(&str) -> String,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    match kind {
        SourceKind::GitLab => {
            match &pool.image {
                None => problems.push(Problem::new(
                    at("image"),
                    "a GitLab pool needs `image`: jobs whose image is exactly this take its pods",
                )),
                Some(image) if image.trim().is_empty() => {
                    problems.push(Problem::new(at("image"), "is empty"));
                }
                Some(_) => {}
            }
            if pool.label.is_some() {
                problems.push(Problem::new(
                    at("label"),
                    "only Jenkins pools have a label (GitLab pools match jobs by `image`)",
                ));
            }
            if !context.warm_executor {
                problems.push(Problem::new(
                    at("source"),
                    "a GitLab pool keeps pre-started build pods, which only the Kubernetes executor can start (`executor = \"kubernetes\"`); the local executor starts every build when its job comes",
                ));
            }
        }
        SourceKind::Jenkins | SourceKind::GitHub => {
            if pool.image.is_some() {
                problems.push(Problem::new(
                    at("image"),
                    format!(
                        "only GitLab pools have an image ({} agents run their own image)",
                        kind.name()
                    ),
                ));
            }
            if kind == SourceKind::GitHub && pool.label.is_some() {
                problems.push(Problem::new(
                    at("label"),
                    "only Jenkins pools have a label (GitHub pools group runners by `class`)",
                ));
            }
        }
    }
    problems
}

/// The pools `pools` plus the old spelling of a GitHub warm floor: a
/// `[[sources.github]] min_idle` is a pool of that entry (named `<entry>-min-idle`, the
/// default class, no schedule) unless a `[[warm_pools]]` entry serves that source already.
pub(crate) fn with_github_shorthand(
    pools: &[WarmPoolConfig],
    github: &[(String, usize)],
) -> Vec<WarmPoolConfig> {
    let mut all = pools.to_vec();
    for (name, min_idle) in github {
        let served = pools
            .iter()
            .any(|p| p.source == SourceKind::GitHub.name() || &p.source == name);
        if *min_idle > 0 && !served {
            all.push(WarmPoolConfig {
                name: format!("{name}-min-idle"),
                source: name.clone(),
                image: None,
                class: None,
                label: None,
                min_idle: *min_idle,
                max_idle_age: None,
                schedule: Vec::new(),
            });
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<(SourceKind, String)> {
        vec![
            (SourceKind::GitLab, "main".into()),
            (SourceKind::Jenkins, "ci".into()),
            (SourceKind::GitHub, "octo".into()),
        ]
    }

    fn pool(toml: &str) -> WarmPoolConfig {
        toml::from_str(toml).unwrap()
    }

    fn paths(pools: &[WarmPoolConfig], warm_executor: bool) -> Vec<String> {
        let entries = entries();
        let context = Context {
            entries: &entries,
            warm_executor,
            classes: Some(vec!["default".into()]),
            max: 100,
        };
        problems(pools, 0, &context)
            .into_iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    #[test]
    fn a_good_pool_of_each_kind_has_no_problem() {
        let pools = [
            pool(
                "name = \"maven\"\nsource = \"gitlab\"\nimage = \"maven:3.9\"\nclass = \"default\"\nmin_idle = 2\nmax_idle_age = \"30m\"\n[[schedule]]\ncron = \"0 8 * * 1-5\"\nduration = \"11h\"\nmin_idle = 6\ntimezone = \"Europe/Berlin\"\n",
            ),
            pool("name = \"linux\"\nsource = \"ci\"\nlabel = \"linux\"\nmin_idle = 1\n"),
            pool("name = \"gh\"\nsource = \"octo\"\nmin_idle = 1\n"),
        ];
        assert_eq!(paths(&pools, true), Vec::<String>::new());
    }

    #[test]
    fn every_wrong_field_is_named_by_its_path() {
        let pools = [
            pool("name = \"a\"\nsource = \"nowhere\"\n"),
            pool(
                "name = \"a\"\nsource = \"gitlab\"\nclass = \"huge\"\nlabel = \"x\"\nmax_idle_age = \"1s\"\n[[schedule]]\ncron = \"0 8 * *\"\nduration = \"0s\"\nmin_idle = 1\n[[schedule]]\ncron = \"0 8 * * *\"\nduration = \"1h\"\nmin_idle = 1\ntimezone = \"Mars/Olympus\"\n",
            ),
            pool("name = \"j\"\nsource = \"jenkins\"\nimage = \"x\"\n"),
            pool("name = \"g\"\nsource = \"github\"\nlabel = \"x\"\n"),
        ];
        let found = paths(&pools, false);
        for expected in [
            "warm_pools[0].source: `nowhere` is neither",
            "warm_pools[1].name: same name as warm_pools[0]",
            "warm_pools[1].image: a GitLab pool needs `image`",
            "warm_pools[1].label: only Jenkins pools have a label",
            "warm_pools[1].source: a GitLab pool keeps pre-started build pods, which only the Kubernetes executor",
            "warm_pools[1].class: `huge` is not in [kubernetes.resource_classes]",
            "warm_pools[1].max_idle_age: must be at least 10s",
            "warm_pools[1].schedule[0].cron: ",
            "warm_pools[1].schedule[0].duration: must be longer than 0s",
            "warm_pools[1].schedule[1].timezone: `Mars/Olympus` is not a known IANA time zone",
            "warm_pools[2].image: only GitLab pools have an image",
            "warm_pools[3].label: only Jenkins pools have a label",
        ] {
            assert!(
                found.iter().any(|f| f.starts_with(expected)),
                "{expected} missing from {found:#?}"
            );
        }
        assert_eq!(found.len(), 12, "{found:#?}");
    }

    #[test]
    fn github_min_idle_is_a_pool_unless_a_pool_serves_the_source() {
        let pools = with_github_shorthand(&[], &[("octo".into(), 2), ("idle".into(), 0)]);
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].name, "octo-min-idle");
        assert_eq!(pools[0].source, "octo");
        assert_eq!(pools[0].min_idle, 2);
        let own = pool("name = \"gh\"\nsource = \"github\"\nmin_idle = 5\n");
        let pools = with_github_shorthand(std::slice::from_ref(&own), &[("octo".into(), 2)]);
        assert_eq!(pools, [own]);
    }
}
