//! Pipeline assembly: resolved configuration in, jobs out (defaults, rules, needs applied).

use std::collections::{HashMap, HashSet};

use serde_yaml_ng::{Mapping, Value};

use super::context::{Context, nearest};
use super::job::{self, JobDef, parse_defaults, parse_job};
use super::needs::NeedDef;
use super::rules::{RepoFiles, Rule, Scope, first_match, parse_rules};
use super::vars::{Var, parse_variables};
use super::yaml::{self, describe, key_string};
use super::{JobWhen, Need, Pipeline, PipelineError, PipelineJob, Warning, extends, parallel};

/// Stages when the file names none (GitLab's default), without `.pre` and `.post`.
const DEFAULT_STAGES: [&str; 3] = ["build", "test", "deploy"];

/// Turns the resolved configuration into the pipeline.
pub(crate) struct Builder<'a> {
    pub(crate) file: &'a str,
    pub(crate) vars: &'a [(String, String)],
    pub(crate) repo: RepoFiles,
    pub(crate) warnings: Vec<Warning>,
}

/// A job instance while the pipeline is assembled.
struct Pending {
    job: PipelineJob,
    stage: usize,
    needs: Option<Vec<NeedDef>>,
}

/// Where each defined job's instances are, for `needs` and `dependencies`.
struct Index<'a> {
    stages: &'a [String],
    /// Base name → (stage index, instance names).
    jobs: HashMap<String, (usize, Vec<String>)>,
    /// Instance name → stage index.
    instances: HashMap<String, usize>,
    /// Trigger jobs, which kiln does not run.
    triggers: HashSet<String>,
}

impl Index<'_> {
    /// The instance names `name` stands for, and their stage; `Ok(None)` for a trigger job.
    fn targets(&self, name: &str) -> Option<(usize, Vec<String>)> {
        if let Some((stage, names)) = self.jobs.get(name) {
            return Some((*stage, names.clone()));
        }
        self.instances
            .get(name)
            .map(|stage| (*stage, vec![name.to_string()]))
    }

    /// Resolves one need at the configuration level: it must exist and not be in a later stage.
    fn need_targets(
        &self,
        job: &str,
        stage: usize,
        need: &NeedDef,
    ) -> Result<Option<Vec<String>>, PipelineError> {
        if self.triggers.contains(&need.job) {
            return Ok(None);
        }
        let unknown = |target: &str| PipelineError::UnknownNeed {
            job: job.to_string(),
            target: target.to_string(),
        };
        let (target_stage, names) = self.targets(&need.job).ok_or_else(|| unknown(&need.job))?;
        let names = match &need.matrix {
            None => names,
            Some(combinations) => {
                let mut picked = Vec::new();
                for combination in combinations {
                    let name = parallel::matrix_name(&need.job, combination);
                    if !names.contains(&name) {
                        return Err(unknown(&name));
                    }
                    picked.push(name);
                }
                picked
            }
        };
        if target_stage > stage {
            return Err(PipelineError::NeedInLaterStage {
                job: job.to_string(),
                target: need.job.clone(),
                stage: self.stages[target_stage].clone(),
            });
        }
        Ok(Some(names))
    }
}

impl Builder<'_> {
    pub(crate) fn build(mut self, config: &Mapping) -> Result<Pipeline, PipelineError> {
        let stages = self.stages(config)?;
        let mut globals = parse_variables(
            config.get("variables").unwrap_or(&Value::Null),
            &Context::Global,
            &[],
            true,
            &mut self.warnings,
        )?;
        let legacy: Mapping = config
            .iter()
            .filter(|(k, _)| {
                matches!(
                    k.as_str(),
                    Some("image" | "services" | "before_script" | "after_script" | "cache")
                )
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let default = match config.get("default") {
            None | Some(Value::Null) => None,
            Some(Value::Mapping(map)) => Some(map),
            Some(other) => {
                return Err(PipelineError::Config {
                    key: "default".into(),
                    message: format!("must be a mapping, not {}", describe(other)),
                });
            }
        };
        let defaults = parse_defaults(default, &legacy, &mut self.warnings)?;
        let no_pipeline = match config.get("workflow") {
            Some(workflow) => self.workflow(workflow, &mut globals)?,
            None => None,
        };

        let mut defs = Vec::new();
        let mut triggers = HashSet::new();
        for (key, value) in config {
            let name = key_string(key).ok_or_else(|| PipelineError::Config {
                key: format!("{key:?}"),
                message: "top-level keys must be keywords or job names".into(),
            })?;
            if extends::GLOBAL_KEYWORDS.contains(&name.as_str()) || name.starts_with('.') {
                continue;
            }
            let Value::Mapping(map) = value else {
                // `stagse: [build]` is a typo of a keyword more often than a job.
                if nearest(&name, extends::GLOBAL_KEYWORDS).is_some() {
                    return Err(Context::Global.unknown(&[], &name, extends::GLOBAL_KEYWORDS));
                }
                return Err(PipelineError::Config {
                    key: name,
                    message: format!(
                        "is not a keyword, so it is read as a job, but it is {}; a job is a mapping with a `script`",
                        describe(value)
                    ),
                });
            };
            if map.contains_key("trigger") {
                self.warnings.push(Warning {
                    job: Some(name.clone()),
                    key: "trigger".into(),
                    message: "trigger jobs start downstream pipelines; kiln exec does not run them"
                        .into(),
                });
                triggers.insert(name);
                continue;
            }
            if name == "pages" {
                self.warnings.push(Warning {
                    job: Some(name.clone()),
                    key: "pages".into(),
                    message: "runs as an ordinary job; kiln exec publishes no Pages site".into(),
                });
            }
            defs.push(parse_job(&name, map, &mut self.warnings)?);
        }
        if defs.is_empty() && triggers.is_empty() {
            return Err(PipelineError::NoJobs {
                file: self.file.to_string(),
            });
        }

        let mut index = Index {
            stages: &stages,
            jobs: HashMap::new(),
            instances: HashMap::new(),
            triggers,
        };
        let mut stage_of = Vec::with_capacity(defs.len());
        for def in &defs {
            let stage = stages.iter().position(|s| *s == def.stage).ok_or_else(|| {
                PipelineError::UnknownStage {
                    job: def.name.clone(),
                    stage: def.stage.clone(),
                    available: stages.join(", "),
                }
            })?;
            let names: Vec<String> = parallel::instances(&def.name, &def.parallel)
                .into_iter()
                .map(|i| i.name)
                .collect();
            for name in &names {
                index.instances.insert(name.clone(), stage);
            }
            index.jobs.insert(def.name.clone(), (stage, names));
            stage_of.push(stage);
        }
        // GitLab checks every job's needs and dependencies, whether or not rules select it.
        for (def, &stage) in defs.iter().zip(&stage_of) {
            let rule_needs = def.rules.iter().flatten().filter_map(|r| r.needs.as_ref());
            for need in def.needs.iter().chain(rule_needs).flatten() {
                index.need_targets(&def.name, stage, need)?;
            }
            self.check_dependencies(def, stage, &index)?;
        }

        let mut pending = Vec::new();
        for (def, &stage) in defs.iter().zip(&stage_of) {
            self.instances(def, stage, &globals, &defaults, &mut pending);
        }
        let present: HashSet<String> = pending
            .iter()
            .filter(|p| p.job.when != JobWhen::Never)
            .map(|p| p.job.name.clone())
            .collect();
        for p in &mut pending {
            p.job.needs = self.resolve_needs(p, &index, &present)?;
            if let Some(deps) = p.job.dependencies.take() {
                p.job.dependencies = Some(self.resolve_dependencies(
                    &p.job.name,
                    deps,
                    &index,
                    &present,
                    p.job.when == JobWhen::Never,
                ));
            }
        }
        pending.sort_by_key(|p| p.stage);
        let jobs: Vec<PipelineJob> = pending.into_iter().map(|p| p.job).collect();
        check_needs_cycles(&jobs)?;
        Ok(Pipeline {
            stages,
            jobs,
            warnings: self.warnings,
            no_pipeline,
        })
    }

    fn stages(&mut self, config: &Mapping) -> Result<Vec<String>, PipelineError> {
        let (key, value) = match (config.get("stages"), config.get("types")) {
            (Some(v), _) => ("stages", v),
            (None, Some(v)) => {
                self.warnings.push(Warning::global(
                    "types",
                    "`types` is deprecated; it is read as `stages`",
                ));
                ("types", v)
            }
            (None, None) => ("stages", &Value::Null),
        };
        let listed: Vec<String> = match value {
            Value::Null => DEFAULT_STAGES.iter().map(|s| s.to_string()).collect(),
            Value::Sequence(items) => items
                .iter()
                .map(|v| {
                    yaml::scalar_string(v).ok_or_else(|| PipelineError::Config {
                        key: key.into(),
                        message: format!("must list stage names, not {}", describe(v)),
                    })
                })
                .collect::<Result<_, _>>()?,
            other => {
                return Err(PipelineError::Config {
                    key: key.into(),
                    message: format!("must be a list of stage names, not {}", describe(other)),
                });
            }
        };
        let mut stages = vec![".pre".to_string()];
        for stage in listed {
            if stage != ".post" && !stages.contains(&stage) {
                stages.push(stage);
            }
        }
        stages.push(".post".into());
        Ok(stages)
    }

    /// `workflow:rules` decide whether GitLab creates the pipeline at all: `Some(why)` when it
    /// does not, naming the rule that decided. The matching rule's variables apply.
    fn workflow(
        &mut self,
        workflow: &Value,
        globals: &mut Vec<Var>,
    ) -> Result<Option<String>, PipelineError> {
        let Value::Mapping(map) = workflow else {
            return Err(PipelineError::Config {
                key: "workflow".into(),
                message: format!("must be a mapping, not {}", describe(workflow)),
            });
        };
        let ctx = Context::Keyword("workflow");
        let mut no_pipeline = None;
        for (key, value) in map {
            let key = key_string(key).unwrap_or_default();
            match key.as_str() {
                "rules" => {
                    let rules = parse_rules(value, &ctx, &mut self.warnings)?;
                    let mut scope = Scope::default();
                    for var in globals.iter() {
                        scope.set(&var.key, &var.value, var.raw);
                    }
                    for (k, v) in self.vars {
                        scope.set(k, v, false);
                    }
                    match first_match(&rules, &scope, &mut self.repo) {
                        Some(rule) if rule.when == Some(JobWhen::Never) => {
                            let number = rules
                                .iter()
                                .position(|r| std::ptr::eq(r, rule))
                                .map_or(0, |i| i + 1);
                            no_pipeline = Some(format!(
                                "workflow:rules rule {number} ({}) matches with `when: never`",
                                describe_rule(rule)
                            ));
                        }
                        Some(rule) => {
                            for var in &rule.variables {
                                overlay_var(globals, var.clone());
                            }
                        }
                        None => {
                            no_pipeline = Some(format!(
                                "none of the {} workflow:rules matches",
                                rules.len()
                            ));
                        }
                    }
                }
                "name" | "auto_cancel" => self
                    .warnings
                    .push(ctx.warning(&key, "ignored by kiln exec")),
                other => {
                    return Err(ctx.unknown(&[], other, &["rules", "name", "auto_cancel"]));
                }
            }
        }
        Ok(no_pipeline)
    }

    fn check_dependencies(
        &self,
        def: &JobDef,
        stage: usize,
        index: &Index<'_>,
    ) -> Result<(), PipelineError> {
        for dep in def.dependencies.iter().flatten() {
            if index.triggers.contains(dep) {
                continue;
            }
            let (dep_stage, _) =
                index
                    .targets(dep)
                    .ok_or_else(|| PipelineError::UnknownDependency {
                        job: def.name.clone(),
                        target: dep.clone(),
                    })?;
            let not_earlier = |hint| PipelineError::DependencyNotEarlier {
                job: def.name.clone(),
                target: dep.clone(),
                hint,
            };
            match &def.needs {
                Some(needs) if !needs.iter().any(|n| n.job == *dep) => {
                    return Err(not_earlier(
                        " and not in `needs`; with `needs`, list it there too",
                    ));
                }
                Some(_) => {}
                None if dep_stage >= stage => {
                    return Err(not_earlier(
                        "; use `needs` to take artifacts from its own stage",
                    ));
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Expands `def` into its instances and applies defaults, variables and rules.
    fn instances(
        &mut self,
        def: &JobDef,
        stage: usize,
        globals: &[Var],
        defaults: &job::Defaults,
        out: &mut Vec<Pending>,
    ) {
        let mut base_vars: Vec<Var> = globals
            .iter()
            .filter(|v| def.inherit_variables.allows(&v.key))
            .cloned()
            .collect();
        for var in &def.variables {
            overlay_var(&mut base_vars, var.clone());
        }
        let inherit = |key: &str| def.inherit_default.allows(key);
        for instance in parallel::instances(&def.name, &def.parallel) {
            let mut vars = base_vars.clone();
            for (key, value) in &instance.variables {
                overlay_var(
                    &mut vars,
                    Var {
                        key: key.clone(),
                        value: value.clone(),
                        raw: false,
                    },
                );
            }
            let (when, allow_failure, needs) = match &def.rules {
                None => {
                    let when = def.when.unwrap_or_default();
                    (
                        when,
                        def.allow_failure.unwrap_or(when == JobWhen::Manual),
                        def.needs.clone(),
                    )
                }
                Some(rules) => {
                    let mut scope = Scope::default();
                    for var in &vars {
                        scope.set(&var.key, &var.value, var.raw);
                    }
                    for (key, value) in self.vars {
                        scope.set(key, value, false);
                    }
                    scope.set("CI_JOB_NAME", &instance.name, true);
                    scope.set("CI_JOB_STAGE", &def.stage, true);
                    if let Some((index, total)) = instance.index {
                        scope.set("CI_NODE_INDEX", &index.to_string(), true);
                        scope.set("CI_NODE_TOTAL", &total.to_string(), true);
                    }
                    let Some(rule) = first_match(rules, &scope, &mut self.repo) else {
                        continue;
                    };
                    for var in &rule.variables {
                        overlay_var(&mut vars, var.clone());
                    }
                    let when = rule.when.or(def.when).unwrap_or_default();
                    (
                        when,
                        rule.allow_failure.or(def.allow_failure).unwrap_or(false),
                        rule.needs.clone().or_else(|| def.needs.clone()),
                    )
                }
            };
            out.push(Pending {
                job: PipelineJob {
                    name: instance.name,
                    stage: def.stage.clone(),
                    image: def
                        .image
                        .clone()
                        .or_else(|| defaults.image.clone().filter(|_| inherit("image"))),
                    services: def
                        .services
                        .clone()
                        .or_else(|| defaults.services.clone().filter(|_| inherit("services")))
                        .unwrap_or_default(),
                    raw_variables: vars
                        .iter()
                        .filter(|v| v.raw)
                        .map(|v| v.key.clone())
                        .collect(),
                    variables: vars.into_iter().map(|v| (v.key, v.value)).collect(),
                    before_script: def
                        .before_script
                        .clone()
                        .or_else(|| {
                            defaults
                                .before_script
                                .clone()
                                .filter(|_| inherit("before_script"))
                        })
                        .unwrap_or_default(),
                    script: def.script.clone(),
                    after_script: def
                        .after_script
                        .clone()
                        .or_else(|| {
                            defaults
                                .after_script
                                .clone()
                                .filter(|_| inherit("after_script"))
                        })
                        .unwrap_or_default(),
                    needs: None,
                    dependencies: def.dependencies.clone(),
                    artifacts: def
                        .artifacts
                        .clone()
                        .or_else(|| defaults.artifacts.clone().filter(|_| inherit("artifacts"))),
                    cache: def
                        .cache
                        .clone()
                        .or_else(|| defaults.cache.clone().filter(|_| inherit("cache")))
                        .unwrap_or_default(),
                    allow_failure,
                    when,
                    timeout: def
                        .timeout
                        .or_else(|| defaults.timeout.filter(|_| inherit("timeout"))),
                    parallel_index: instance.index,
                },
                stage,
                needs,
            });
        }
    }

    fn resolve_needs(
        &mut self,
        p: &Pending,
        index: &Index<'_>,
        present: &HashSet<String>,
    ) -> Result<Option<Vec<Need>>, PipelineError> {
        let Some(defs) = &p.needs else {
            return Ok(None);
        };
        let mut needs: Vec<Need> = Vec::new();
        for need in defs {
            let Some(targets) = index.need_targets(&p.job.name, p.stage, need)? else {
                self.warnings.push(Warning {
                    job: Some(p.job.name.clone()),
                    key: "needs".into(),
                    message: format!(
                        "`{}` is a trigger job, which kiln exec does not run; the need is left out",
                        need.job
                    ),
                });
                continue;
            };
            for target in targets {
                if present.contains(&target) {
                    if !needs.iter().any(|n| n.job == target) {
                        needs.push(Need {
                            job: target,
                            artifacts: need.artifacts,
                        });
                    }
                } else if !need.optional && p.job.when != JobWhen::Never {
                    return Err(PipelineError::NeedNotInPipeline {
                        job: p.job.name.clone(),
                        target,
                    });
                }
            }
        }
        Ok(Some(needs))
    }

    fn resolve_dependencies(
        &mut self,
        job: &str,
        deps: Vec<String>,
        index: &Index<'_>,
        present: &HashSet<String>,
        quiet: bool,
    ) -> Vec<String> {
        let mut resolved = Vec::new();
        for dep in deps {
            let Some((_, targets)) = index.targets(&dep) else {
                // Trigger jobs: validated earlier, and they produce no artifacts.
                continue;
            };
            for target in targets {
                if present.contains(&target) {
                    resolved.push(target);
                } else if !quiet {
                    self.warnings.push(Warning {
                        job: Some(job.to_string()),
                        key: "dependencies".into(),
                        message: format!("`{target}` is not in this pipeline (its rules leave it out); its artifacts are not passed"),
                    });
                }
            }
        }
        resolved
    }
}

/// A rule as its conditions are written: `if: $CI_COMMIT_TAG`, `exists: [Dockerfile]`.
fn describe_rule(rule: &Rule) -> String {
    let mut parts = Vec::new();
    if let Some((source, _)) = &rule.condition {
        parts.push(format!("`if: {source}`"));
    }
    if let Some(patterns) = &rule.exists {
        parts.push(format!("`exists: [{}]`", patterns.join(", ")));
    }
    if parts.is_empty() {
        "no condition".into()
    } else {
        parts.join(", ")
    }
}

/// Sets `var`, replacing an earlier definition of the same name in place.
fn overlay_var(vars: &mut Vec<Var>, var: Var) {
    match vars.iter_mut().find(|v| v.key == var.key) {
        Some(existing) => *existing = var,
        None => vars.push(var),
    }
}

/// `needs` within a stage can loop; GitLab rejects that.
fn check_needs_cycles(jobs: &[PipelineJob]) -> Result<(), PipelineError> {
    let by_name: HashMap<&str, &PipelineJob> = jobs.iter().map(|j| (j.name.as_str(), j)).collect();
    // 0 = unvisited, 1 = on the current path, 2 = done.
    let mut state: HashMap<&str, u8> = HashMap::new();
    fn visit<'a>(
        name: &'a str,
        by_name: &HashMap<&'a str, &'a PipelineJob>,
        state: &mut HashMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Result<(), PipelineError> {
        match state.get(name) {
            Some(2) => return Ok(()),
            Some(1) => {
                let start = path.iter().position(|n| *n == name).unwrap_or(0);
                let mut cycle: Vec<&str> = path[start..].to_vec();
                cycle.push(name);
                return Err(PipelineError::NeedsCycle {
                    chain: cycle.join(" → "),
                });
            }
            _ => {}
        }
        state.insert(name, 1);
        path.push(name);
        if let Some(job) = by_name.get(name) {
            for need in job.needs.iter().flatten() {
                if let Some((target, _)) = by_name.get_key_value(need.job.as_str()) {
                    visit(target, by_name, state, path)?;
                }
            }
        }
        path.pop();
        state.insert(name, 2);
        Ok(())
    }
    for job in jobs {
        visit(&job.name, &by_name, &mut state, &mut Vec::new())?;
    }
    Ok(())
}
