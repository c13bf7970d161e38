//! CI/CD variables as GitLab resolves them: each name's winning definition first, then every
//! value expanded against that final set. The agent uses it for job payloads, `kiln exec` for
//! `rules:if` and `include` paths.
//!
//! The rules (GitLab's documented behaviour, with gitlab-runner's syntax):
//! - Definitions come in ascending precedence; the last definition of a name wins, wherever
//!   the references to it are (a value may refer to a name defined later).
//! - `$NAME` (`NAME` = `[A-Za-z_][A-Za-z0-9_]*`) and `${ANYTHING}` are references; `$$` is a
//!   literal `$`; any other `$` is itself. There is no `%NAME%` syntax.
//! - A reference gives the winner's expanded value; a `raw` (`expand: false`) winner gives its
//!   value as written; a file variable gives the path of its file (when paths are known).
//! - A reference back into a value being expanded (a self-reference or a cycle) stops there:
//!   it is left as written, or takes the build environment's value of that name when there is
//!   one (so `PATH: "$PATH:/opt/bin"` extends the environment's `PATH`, as a shell would).
//! - A name no variable defines takes the build environment's value; failing that it expands
//!   to nothing, as in gitlab-runner ([`Undefined::Empty`]), or stays as written, as GitLab
//!   does when it evaluates `rules` ([`Undefined::Keep`]).

use std::collections::{BTreeMap, HashMap};

use crate::gitlab::payload;

/// An expanded value is cut off (its remaining references left as written) past this size, so
/// references that double at every level cannot exhaust memory.
const MAX_EXPANDED_LEN: usize = 1024 * 1024;

/// One definition of a variable, as GitLab sends it or a pipeline file writes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Definition {
    /// The name.
    pub key: String,
    /// The value as written (for a file variable: the file's content).
    pub value: String,
    /// `expand: false` (`raw` in the job payload): the value is used as written.
    pub raw: bool,
    /// A file variable: the value goes into a file and references give the file's path.
    pub file: bool,
    /// The value is masked in the trace.
    pub masked: bool,
}

impl Definition {
    /// A plain variable.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
            ..Self::default()
        }
    }
}

impl From<&payload::Variable> for Definition {
    fn from(v: &payload::Variable) -> Self {
        Self {
            key: v.key.clone(),
            value: v.value.clone(),
            raw: v.raw,
            file: v.file,
            masked: v.masked,
        }
    }
}

/// What a reference to a name nothing defines becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Undefined {
    /// Nothing, as gitlab-runner expands job variables.
    #[default]
    Empty,
    /// The reference as written, as GitLab expands variables for `rules` and `include`.
    Keep,
}

/// A variable with its final value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The name.
    pub key: String,
    /// The expanded value (for a file variable: the file's content).
    pub value: String,
    /// A file variable.
    pub file: bool,
    /// Masked in the trace.
    pub masked: bool,
}

/// A resolved set of variables: one winning definition per name.
#[derive(Debug, Clone, Default)]
pub struct Variables {
    /// The winners, in the order their names were first defined.
    winners: Vec<Definition>,
    index: HashMap<String, usize>,
    /// The value of every masked definition, winning or not.
    masked: Vec<String>,
    /// The build's own environment, below every definition.
    environment: BTreeMap<String, String>,
    /// Where each file variable's file is (by winner index).
    file_paths: HashMap<usize, String>,
    undefined: Undefined,
}

impl Variables {
    /// Resolves `definitions`, given in ascending precedence (GitLab's job payload order:
    /// predefined first, pipeline variables last): the last definition of a name wins.
    /// Definitions with an empty name or a `=` in it cannot be environment variables and are
    /// dropped.
    pub fn resolve(definitions: impl IntoIterator<Item = Definition>) -> Self {
        let mut vars = Self::default();
        for def in definitions {
            if def.key.is_empty() || def.key.contains('=') {
                continue;
            }
            if def.masked && !def.value.is_empty() {
                vars.masked.push(def.value.clone());
            }
            match vars.index.get(&def.key) {
                Some(&i) => vars.winners[i] = def,
                None => {
                    vars.index.insert(def.key.clone(), vars.winners.len());
                    vars.winners.push(def);
                }
            }
        }
        vars
    }

    /// The build's own environment (`PATH`, `HOME`, the runner's `CI_*`): what names no
    /// variable defines, and references that close a cycle, fall back to.
    #[must_use]
    pub fn with_environment(mut self, environment: BTreeMap<String, String>) -> Self {
        self.environment = environment;
        self
    }

    /// Where file variables' files are: a reference to a file variable gives `path(name)`.
    #[must_use]
    pub fn with_file_paths(mut self, path: impl Fn(&str) -> String) -> Self {
        self.file_paths = self
            .winners
            .iter()
            .enumerate()
            .filter(|(_, def)| def.file)
            .map(|(i, def)| (i, path(&def.key)))
            .collect();
        self
    }

    /// What references to undefined names become (default: [`Undefined::Empty`]).
    #[must_use]
    pub fn with_undefined(mut self, undefined: Undefined) -> Self {
        self.undefined = undefined;
        self
    }

    /// Every variable with its expanded value, in the order the names were first defined.
    pub fn resolved(&self) -> Vec<Resolved> {
        let mut expander = Expander::new(self);
        (0..self.winners.len())
            .map(|i| {
                let def = &self.winners[i];
                Resolved {
                    key: def.key.clone(),
                    value: expander.value_of(i),
                    file: def.file,
                    masked: def.masked,
                }
            })
            .collect()
    }

    /// The expanded value of `name` (a file variable's: its path, when known); `None` when
    /// neither a variable nor the environment defines it.
    pub fn value(&self, name: &str) -> Option<String> {
        match self.index.get(name) {
            Some(&i) => Some(match self.file_paths.get(&i) {
                Some(path) => path.clone(),
                None => Expander::new(self).value_of(i),
            }),
            None => self.environment.get(name).cloned(),
        }
    }

    /// Expands the references in `text` (which is not itself a variable, so nothing in it is
    /// a self-reference).
    pub fn expand(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        Expander::new(self).expand_into(text, &mut out);
        out
    }

    /// The values to mask in the trace: every masked definition's value as written, and the
    /// expanded value of every masked winner (a masked value may itself hold references).
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets = self.masked.clone();
        let mut expander = Expander::new(self);
        for i in 0..self.winners.len() {
            if self.winners[i].masked {
                let value = expander.value_of(i);
                if !value.is_empty() && !secrets.contains(&value) {
                    secrets.push(value);
                }
            }
        }
        secrets
    }
}

/// One expansion run: the values being expanded (for cycles) and finished values.
struct Expander<'a> {
    vars: &'a Variables,
    active: Vec<usize>,
    done: HashMap<usize, String>,
    /// Whether the current value met a cycle, so its result depends on where the expansion
    /// started and must not be reused.
    cut: bool,
}

impl<'a> Expander<'a> {
    fn new(vars: &'a Variables) -> Self {
        Self {
            vars,
            active: Vec::new(),
            done: HashMap::new(),
            cut: false,
        }
    }

    /// The expanded value of winner `i` itself (a file variable's content, not its path).
    fn value_of(&mut self, i: usize) -> String {
        let def = &self.vars.winners[i];
        if def.raw {
            return def.value.clone();
        }
        if let Some(value) = self.done.get(&i) {
            return value.clone();
        }
        self.active.push(i);
        let outer_cut = std::mem::replace(&mut self.cut, false);
        let mut value = String::with_capacity(def.value.len());
        self.expand_into(&def.value, &mut value);
        self.active.pop();
        if !self.cut {
            self.done.insert(i, value.clone());
        }
        self.cut |= outer_cut;
        value
    }

    fn expand_into(&mut self, text: &str, out: &mut String) {
        let mut rest = text;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            let (name, len) = match after.as_bytes().first() {
                Some(b'$') => {
                    out.push('$');
                    rest = &after[1..];
                    continue;
                }
                Some(b'{') => match after.find('}') {
                    Some(end) => (&after[1..end], end + 1),
                    None => ("", 0),
                },
                Some(c) if c.is_ascii_alphabetic() || *c == b'_' => {
                    let end = after
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(after.len());
                    (&after[..end], end)
                }
                _ => ("", 0),
            };
            if len == 0 {
                out.push('$');
                rest = after;
                continue;
            }
            self.reference(name, &rest[at..at + 1 + len], out);
            rest = &after[len..];
        }
        out.push_str(rest);
    }

    /// Appends what the reference `literal` (to `name`) stands for.
    fn reference(&mut self, name: &str, literal: &str, out: &mut String) {
        let vars = self.vars;
        let environment = vars.environment.get(name);
        let value = match vars.index.get(name) {
            Some(&i) => {
                if let Some(path) = vars.file_paths.get(&i) {
                    Some(path.clone())
                } else if self.active.contains(&i) && !vars.winners[i].raw {
                    self.cut = true;
                    environment.cloned()
                } else {
                    Some(self.value_of(i))
                }
            }
            None => match (environment, vars.undefined) {
                (Some(value), _) => Some(value.clone()),
                (None, Undefined::Empty) => Some(String::new()),
                (None, Undefined::Keep) => None,
            },
        };
        match value {
            Some(value) if out.len() + value.len() <= MAX_EXPANDED_LEN => out.push_str(&value),
            _ => out.push_str(literal),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(key: &str, value: &str) -> Definition {
        Definition::new(key, value)
    }

    fn values(vars: &Variables) -> Vec<(String, String)> {
        vars.resolved()
            .into_iter()
            .map(|r| (r.key, r.value))
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_reference_takes_the_winning_definition_not_the_one_before_it() {
        // Global `REF: ref-${G}`, then `--var G=cli`: GitLab gives `ref-cli`.
        let vars =
            Variables::resolve([def("G", "global"), def("REF", "ref-${G}"), def("G", "cli")]);
        assert_eq!(vars.value("REF").as_deref(), Some("ref-cli"));
        assert_eq!(values(&vars), pairs(&[("G", "cli"), ("REF", "ref-cli")]));
    }

    #[test]
    fn a_reference_to_a_name_defined_later_expands() {
        let vars = Variables::resolve([def("FWD", "f-$LATER"), def("LATER", "later")]);
        assert_eq!(vars.value("FWD").as_deref(), Some("f-later"));
    }

    #[test]
    fn references_expand_through_several_levels() {
        let vars = Variables::resolve([
            def("URL", "https://$HOST:${PORT}/x"),
            def("HOST", "$NAME.example"),
            def("NAME", "db"),
            def("PORT", "5432"),
        ]);
        assert_eq!(
            vars.value("URL").as_deref(),
            Some("https://db.example:5432/x")
        );
    }

    #[test]
    fn syntax_follows_gitlab_runner() {
        let vars = Variables::resolve([def("A", "1"), def("B_2", "two")]);
        assert_eq!(
            vars.expand("x$A-${B_2}-$MISSING-$$A-$-$1-${A"),
            "x1-two--$A-$-$1-${A"
        );
        assert_eq!(
            vars.expand("%A% ${} ${A:-x}"),
            "%A%  ",
            "no %VAR%, no shell forms"
        );
        let keep = vars.clone().with_undefined(Undefined::Keep);
        assert_eq!(keep.expand("$A $MISSING ${NOPE}"), "1 $MISSING ${NOPE}");
    }

    #[test]
    fn raw_values_stay_as_written_but_references_to_them_expand() {
        let vars = Variables::resolve([
            Definition {
                raw: true,
                ..def("RAW", "$A and $$")
            },
            def("A", "1"),
            def("USES", "<$RAW>"),
        ]);
        assert_eq!(vars.value("RAW").as_deref(), Some("$A and $$"));
        assert_eq!(vars.value("USES").as_deref(), Some("<$A and $$>"));
    }

    #[test]
    fn file_variables_expand_to_their_path() {
        let vars = Variables::resolve([
            Definition {
                file: true,
                ..def("KUBECONFIG", "server: $HOST")
            },
            def("HOST", "k8s"),
            def("ARG", "--kubeconfig=$KUBECONFIG"),
        ])
        .with_file_paths(|key| format!("/tmp/{key}.var"));
        assert_eq!(
            vars.value("ARG").as_deref(),
            Some("--kubeconfig=/tmp/KUBECONFIG.var")
        );
        let resolved = vars.resolved();
        assert_eq!(
            resolved[0].value, "server: k8s",
            "the file's content expands"
        );
        assert!(resolved[0].file);
    }

    #[test]
    fn self_references_and_cycles_stop_with_the_reference_as_written() {
        let vars = Variables::resolve([def("SELF", "x$SELF"), def("A", "a${B}"), def("B", "b$A")]);
        assert_eq!(vars.value("SELF").as_deref(), Some("x$SELF"));
        assert_eq!(vars.value("A").as_deref(), Some("ab$A"));
        assert_eq!(vars.value("B").as_deref(), Some("ba${B}"));
    }

    #[test]
    fn the_environment_fills_in_undefined_names_and_self_references() {
        let env: BTreeMap<String, String> = [
            ("PATH".to_string(), "/usr/bin".to_string()),
            ("HOME".to_string(), "/home/ci".to_string()),
        ]
        .into();
        let vars = Variables::resolve([def("PATH", "$HOME/bin:$PATH"), def("X", "$HOME")])
            .with_environment(env);
        assert_eq!(vars.value("PATH").as_deref(), Some("/home/ci/bin:/usr/bin"));
        assert_eq!(vars.value("HOME").as_deref(), Some("/home/ci"));
        assert_eq!(vars.expand("$X"), "/home/ci");
    }

    #[test]
    fn masked_values_are_secrets_as_written_and_expanded() {
        let vars = Variables::resolve([
            def("PREFIX", "pre"),
            Definition {
                masked: true,
                ..def("TOKEN", "$PREFIX-s3cr3t")
            },
            Definition {
                masked: true,
                ..def("OLD", "overridden-secret")
            },
            def("OLD", "plain"),
        ]);
        let secrets = vars.secrets();
        assert!(secrets.contains(&"pre-s3cr3t".to_string()), "{secrets:?}");
        assert!(secrets.contains(&"$PREFIX-s3cr3t".to_string()));
        assert!(secrets.contains(&"overridden-secret".to_string()));
        assert!(!secrets.contains(&"plain".to_string()));
    }

    #[test]
    fn doubling_references_are_cut_off_instead_of_exhausting_memory() {
        let mut defs = vec![def("V0", &"x".repeat(1024))];
        for i in 1..40 {
            defs.push(def(&format!("V{i}"), &format!("$V{p}$V{p}", p = i - 1)));
        }
        let vars = Variables::resolve(defs);
        let value = vars.value("V39").unwrap();
        assert!(value.len() <= 2 * MAX_EXPANDED_LEN, "{}", value.len());
        assert!(value.contains("$V"), "what no longer fits stays as written");
    }

    /// A straightforward reading of the rules in the module documentation, written
    /// independently of the implementation: regular expressions instead of a scanner, a
    /// search from the end instead of an index, no memoization.
    mod reference {
        use super::super::{Definition, Undefined};
        use std::collections::BTreeMap;
        use std::sync::LazyLock;

        pub(super) struct Model<'a> {
            pub(super) defs: &'a [Definition],
            pub(super) env: &'a BTreeMap<String, String>,
            pub(super) file_dir: Option<&'a str>,
            pub(super) undefined: Undefined,
        }

        impl Model<'_> {
            fn winner(&self, name: &str) -> Option<&Definition> {
                self.defs.iter().rev().find(|d| d.key == name)
            }

            pub(super) fn value(&self, name: &str) -> String {
                let def = self.winner(name).unwrap();
                if def.raw {
                    def.value.clone()
                } else {
                    self.expand(&def.value, &mut vec![name.to_string()])
                }
            }

            pub(super) fn expand(&self, text: &str, path: &mut Vec<String>) -> String {
                static PATTERN: LazyLock<regex::Regex> = LazyLock::new(|| {
                    regex::Regex::new(r"\$\$|\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)").unwrap()
                });
                let mut out = String::new();
                let mut last = 0;
                for caps in PATTERN.captures_iter(text) {
                    let whole = caps.get(0).unwrap();
                    out.push_str(&text[last..whole.start()]);
                    last = whole.end();
                    let Some(name) = caps.get(1).or(caps.get(2)).map(|m| m.as_str()) else {
                        out.push('$');
                        continue;
                    };
                    let env = self.env.get(name).cloned();
                    let replacement = match self.winner(name) {
                        Some(def) if def.file && self.file_dir.is_some() => {
                            Some(format!("{}/{name}", self.file_dir.unwrap()))
                        }
                        Some(def) if def.raw => Some(def.value.clone()),
                        Some(_) if path.iter().any(|p| p == name) => env,
                        Some(def) => {
                            path.push(name.to_string());
                            let value = self.expand(&def.value, path);
                            path.pop();
                            Some(value)
                        }
                        None if env.is_some() => env,
                        None if self.undefined == Undefined::Empty => Some(String::new()),
                        None => None,
                    };
                    out.push_str(replacement.as_deref().unwrap_or(whole.as_str()));
                }
                out.push_str(&text[last..]);
                out
            }
        }
    }

    mod properties {
        use super::super::*;
        use super::reference::Model;
        use proptest::prelude::*;

        const NAMES: [&str; 5] = ["A", "B", "C", "D_1", "E"];

        fn name() -> impl Strategy<Value = String> {
            proptest::sample::select(&NAMES[..]).prop_map(str::to_string)
        }

        /// Text made of literal pieces and references of every syntax, valid or not.
        fn text() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                name().prop_map(|n| format!("${n}")),
                name().prop_map(|n| format!("${{{n}}}")),
                name().prop_map(|n| format!("${n}x")),
                Just("$$".to_string()),
                Just("$".to_string()),
                Just("${".to_string()),
                Just("}".to_string()),
                Just("$1".to_string()),
                Just("$UNDEFINED".to_string()),
                Just("${A:-d}".to_string()),
                Just("%A%".to_string()),
                "[a-z/:. é-]{0,3}",
            ];
            proptest::collection::vec(piece, 0..6).prop_map(|p| p.concat())
        }

        fn definition() -> impl Strategy<Value = Definition> {
            // Most values are plain, as in real payloads; a fifth each raw and file.
            (name(), text(), 0..5u8, any::<bool>()).prop_map(|(key, value, kind, masked)| {
                Definition {
                    key,
                    value,
                    raw: kind == 3,
                    file: kind == 4,
                    masked,
                }
            })
        }

        fn environment() -> impl Strategy<Value = BTreeMap<String, String>> {
            proptest::collection::btree_map(name(), "[a-z$]{0,4}", 0..3)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            #[test]
            fn resolution_and_expansion_match_the_reference(
                defs in proptest::collection::vec(definition(), 0..8),
                env in environment(),
                texts in proptest::collection::vec(text(), 1..3),
                with_files in any::<bool>(),
                keep in any::<bool>(),
            ) {
                let undefined = if keep { Undefined::Keep } else { Undefined::Empty };
                let file_dir = with_files.then_some("/files");
                let mut vars = Variables::resolve(defs.clone())
                    .with_environment(env.clone())
                    .with_undefined(undefined);
                if with_files {
                    vars = vars.with_file_paths(|key| format!("/files/{key}"));
                }
                let model = Model { defs: &defs, env: &env, file_dir, undefined };

                let mut names: Vec<&str> = Vec::new();
                for d in &defs {
                    if !names.contains(&d.key.as_str()) {
                        names.push(&d.key);
                    }
                }
                let resolved = vars.resolved();
                prop_assert_eq!(
                    resolved.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
                    names.clone()
                );
                for r in &resolved {
                    prop_assert_eq!(&r.value, &model.value(&r.key), "value of {}", r.key);
                }
                for text in &texts {
                    prop_assert_eq!(vars.expand(text), model.expand(text, &mut Vec::new()));
                }
                for name in NAMES {
                    let expected = match model_winner(&defs, name) {
                        Some(d) if d.file && with_files => Some(format!("/files/{name}")),
                        Some(_) => Some(model.value(name)),
                        None => env.get(name).cloned(),
                    };
                    prop_assert_eq!(vars.value(name), expected, "lookup of {}", name);
                }
                for r in resolved.iter().filter(|r| r.masked && !r.value.is_empty()) {
                    prop_assert!(vars.secrets().contains(&r.value));
                }
            }
        }

        fn model_winner<'a>(defs: &'a [Definition], name: &str) -> Option<&'a Definition> {
            defs.iter().rev().find(|d| d.key == name)
        }
    }
}
