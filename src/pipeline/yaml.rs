//! YAML plumbing for the pipeline reader: loading a file, `<<` merge keys and GitLab's deep merge.

use std::collections::HashSet;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_yaml_ng::{Mapping, Value};

use super::{PipelineError, Warning};

/// Parses one pipeline file into its top-level mapping, with aliases expanded and `<<` merge
/// keys applied. An empty file is an empty mapping.
///
/// A file may start with a `spec:` header document (CI/CD inputs) followed by `---`; kiln does
/// not interpolate inputs, so the header only earns a warning.
pub(crate) fn load(
    text: &str,
    file: &str,
    warnings: &mut Vec<Warning>,
) -> Result<Mapping, PipelineError> {
    let mut documents = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        documents.push(Value::deserialize(document).map_err(|e| syntax_error(text, file, &e))?);
    }
    let body = match documents.len() {
        0 => Value::Null,
        1 => documents.remove(0),
        2 if is_header(&documents[0]) => {
            warnings.push(Warning::global(
                "spec",
                format!(
                    "{file}: `spec:inputs` are not supported by kiln exec; `$[[ inputs.… ]]` stays as written"
                ),
            ));
            documents.remove(1)
        }
        n => {
            return Err(PipelineError::Config {
                key: file.to_string(),
                message: format!(
                    "the file holds {n} YAML documents; GitLab reads one (optionally after a `spec:` header)"
                ),
            });
        }
    };
    let mut body = match body {
        Value::Null => return Ok(Mapping::new()),
        Value::Mapping(map) => Value::Mapping(map),
        other => {
            return Err(PipelineError::Config {
                key: file.to_string(),
                message: format!(
                    "the file must be a mapping of keywords and jobs, not {}",
                    describe(&other)
                ),
            });
        }
    };
    apply_merge_keys(&mut body).map_err(|message| PipelineError::Config {
        key: file.to_string(),
        message,
    })?;
    match body {
        Value::Mapping(map) => Ok(map),
        _ => Ok(Mapping::new()),
    }
}

fn is_header(document: &Value) -> bool {
    document
        .as_mapping()
        .is_some_and(|m| m.contains_key("spec"))
}

/// Turns a parser error into one naming the file, line and column (errors without a position,
/// such as the alias-expansion limit, name the file only). A tab in the indentation and a
/// duplicate key get messages of their own, at the tab and at the second occurrence.
fn syntax_error(text: &str, file: &str, error: &serde_yaml_ng::Error) -> PipelineError {
    let mut message = error.to_string();
    let Some(location) = error.location() else {
        return PipelineError::Config {
            key: file.to_string(),
            message: format!("invalid YAML: {message}"),
        };
    };
    let (line, column) = (location.line(), location.column());
    if message.contains("duplicate entry with key")
        && let Some((line, column, key)) = find_duplicate(text)
    {
        return PipelineError::DuplicateKey {
            file: file.to_string(),
            line,
            column,
            key,
        };
    }
    let indentation = text
        .lines()
        .nth(line.saturating_sub(1))
        .map(|l| &l[..l.len() - l.trim_start_matches([' ', '\t']).len()])
        .unwrap_or_default();
    if let Some(tab) = indentation.find('\t') {
        return PipelineError::Yaml {
            file: file.to_string(),
            line,
            column: tab + 1,
            message: "a tab in the indentation; YAML indents with spaces only, so replace the tab with spaces".into(),
        };
    }
    // The library appends the position; it is in our own prefix already.
    let suffix = format!(" at line {line} column {column}");
    if let Some(at) = message.find(&suffix) {
        message.replace_range(at..at + suffix.len(), "");
    }
    PipelineError::Yaml {
        file: file.to_string(),
        line,
        column,
        message,
    }
}

/// Where the key at `path` is written in `text` (1-based line and column), following aliases
/// and `<<` merge keys. A `*` in `path` stands for any item of a list; lists met where a key
/// is expected are searched item by item (nested lists from `!reference`, `include` entries).
///
/// The parser reports positions only with errors, so the search fails on purpose where the
/// key is, and reads the position from that error.
pub(crate) fn locate(text: &str, path: &[String]) -> Option<(usize, usize)> {
    if path.is_empty() {
        return None;
    }
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        if let Err(found) = (Find { path }).deserialize(document) {
            if found.to_string().contains(FOUND) {
                return found.location().map(|l| (l.line(), l.column()));
            }
            return None;
        }
    }
    None
}

/// The message of the error [`locate`] raises where the key is.
const FOUND: &str = "kiln: key found";

/// Walks a document towards the key at `path`.
struct Find<'p> {
    path: &'p [String],
}

/// What a mapping key is, seen from a [`Find`].
enum KeyIs {
    /// The next step of the path: descend into its value.
    Step,
    /// A merge key: its mappings hold keys of this mapping.
    Merge,
    Other,
}

struct FindKey<'p> {
    path: &'p [String],
}

impl<'de> DeserializeSeed<'de> for Find<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Find<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged value (`!reference [...]`): search what it tags.
        let (_, variant) = data.variant::<de::IgnoredAny>()?;
        de::VariantAccess::newtype_variant_seed(variant, self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let path = match self.path.split_first() {
            Some((first, rest)) if first == "*" => rest,
            _ => self.path,
        };
        while seq.next_element_seed(Find { path })?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(FindKey { path: self.path })? {
            match key {
                KeyIs::Step => map.next_value_seed(Find {
                    path: &self.path[1..],
                })?,
                KeyIs::Merge => map.next_value_seed(Find { path: self.path })?,
                KeyIs::Other => map.next_value_seed(Find { path: &[] })?,
            }
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for FindKey<'_> {
    type Value = KeyIs;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<KeyIs, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl FindKey<'_> {
    fn key<E: de::Error>(&self, key: &str) -> Result<KeyIs, E> {
        match self.path.first() {
            Some(step) if step == key && self.path.len() == 1 => Err(E::custom(FOUND)),
            Some(step) if step == key => Ok(KeyIs::Step),
            Some(_) if key == "<<" => Ok(KeyIs::Merge),
            _ => Ok(KeyIs::Other),
        }
    }
}

impl<'de> Visitor<'de> for FindKey<'_> {
    type Value = KeyIs;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyIs, E> {
        self.key(v)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyIs, E> {
        self.key(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyIs, E> {
        self.key(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyIs, E> {
        self.key(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<KeyIs, E> {
        Ok(KeyIs::Other)
    }
    fn visit_unit<E>(self) -> Result<KeyIs, E> {
        Ok(KeyIs::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyIs, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(KeyIs::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyIs, A::Error> {
        while map
            .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
            .is_some()
        {}
        Ok(KeyIs::Other)
    }
}

/// The first key that appears twice in one mapping: its position and name.
fn find_duplicate(text: &str) -> Option<(usize, usize, String)> {
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        if let Err(error) = Duplicates.deserialize(document) {
            let message = error.to_string();
            let key = message
                .split_once(DUPLICATE)
                .map(|(_, rest)| rest.split(" at line ").next().unwrap_or(rest).to_string())?;
            return error.location().map(|l| (l.line(), l.column(), key));
        }
    }
    None
}

/// The message of the error [`find_duplicate`] raises at a duplicate, followed by the key.
const DUPLICATE: &str = "kiln: duplicate key ";

/// Walks a document, failing at the first key seen twice in one mapping.
struct Duplicates;

struct UniqueKey<'s> {
    seen: &'s mut HashSet<String>,
}

impl<'de> DeserializeSeed<'de> for Duplicates {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Duplicates {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        let (_, variant) = data.variant::<de::IgnoredAny>()?;
        de::VariantAccess::newtype_variant_seed(variant, self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Duplicates)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while map.next_key_seed(UniqueKey { seen: &mut seen })?.is_some() {
            map.next_value_seed(Duplicates)?;
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for UniqueKey<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl UniqueKey<'_> {
    fn key<E: de::Error>(self, key: String) -> Result<(), E> {
        if self.seen.insert(key.clone()) {
            Ok(())
        } else {
            Err(E::custom(format!("{DUPLICATE}{key}")))
        }
    }
}

impl<'de> Visitor<'de> for UniqueKey<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.key(v.to_string())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.key(v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.key(v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.key(v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.key(v.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.key("~".into())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map
            .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
            .is_some()
        {}
        Ok(())
    }
}

/// Applies `<<` merge keys everywhere, bottom-up so that merged mappings may merge others.
///
/// The order follows Ruby's Psych, which GitLab uses: entries are read in order and a `<<`
/// overwrites keys written before it (later keys overwrite it in turn); in a list of mappings
/// the earlier mapping wins.
pub(crate) fn apply_merge_keys(value: &mut Value) -> Result<(), String> {
    match value {
        Value::Sequence(items) => items.iter_mut().try_for_each(apply_merge_keys),
        Value::Tagged(tagged) => apply_merge_keys(&mut tagged.value),
        Value::Mapping(map) => {
            if !map.contains_key("<<") {
                return map.values_mut().try_for_each(apply_merge_keys);
            }
            let entries = std::mem::take(map);
            for (key, mut entry) in entries {
                apply_merge_keys(&mut entry)?;
                if key.as_str() != Some("<<") {
                    map.insert(key, entry);
                    continue;
                }
                match entry {
                    Value::Mapping(merged) => map.extend(merged),
                    Value::Sequence(list) => {
                        let mut merged = Mapping::new();
                        for item in list.into_iter().rev() {
                            match item {
                                Value::Mapping(m) => merged.extend(m),
                                other => {
                                    return Err(format!(
                                        "`<<` merges mappings, but its list holds {}",
                                        describe(&other)
                                    ));
                                }
                            }
                        }
                        map.extend(merged);
                    }
                    other => {
                        return Err(format!("`<<` merges a mapping, not {}", describe(&other)));
                    }
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// GitLab's deep merge (ActiveSupport `deep_merge`): mappings merge recursively, anything else
/// in `over` replaces what `base` had. Keys keep their position in `base`; new keys go last.
pub(crate) fn deep_merge(base: &mut Mapping, over: Mapping) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Mapping(inner)), Value::Mapping(value)) => deep_merge(inner, value),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// A mapping key as GitLab sees it (Psych keys are strings, numbers or booleans).
pub(crate) fn key_string(key: &Value) -> Option<String> {
    match key {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A scalar as the string GitLab would make of it (`1` → "1", `true` → "true").
pub(crate) fn scalar_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// "a list", "a mapping", … for error messages.
pub(crate) fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_support::yaml;

    fn parse(text: &str) -> Mapping {
        load(text, "t.yml", &mut Vec::new()).unwrap()
    }

    #[test]
    fn syntax_errors_name_file_line_and_column() {
        let err = load(
            "job:\n  script: [a\n  stage: b\n",
            "ci.yml",
            &mut Vec::new(),
        )
        .unwrap_err();
        let PipelineError::Yaml {
            file,
            line,
            column,
            message,
        } = &err
        else {
            panic!("expected a YAML error, got {err:?}");
        };
        assert_eq!(file, "ci.yml");
        assert_eq!((*line, *column), (3, 8));
        assert!(
            !message.contains("line 3 column 8"),
            "position appears once: {message}"
        );
        assert!(
            message.contains("flow sequence at line 2 column 11"),
            "context kept: {message}"
        );
        assert!(
            err.to_string().starts_with("ci.yml:3:8: invalid YAML: "),
            "{err}"
        );
    }

    #[test]
    fn merge_keys_follow_psych_order_and_nest() {
        let map = parse(
            "
.base: &base {image: a, script: [base]}
.more: &more
  <<: *base
  variables: {X: '1'}
job:
  script: [own]
  <<: *more
  stage: test
multi:
  <<: [{a: first}, {a: second, b: second}]
",
        );
        let job = map["job"].as_mapping().unwrap();
        assert_eq!(job["image"], yaml("a"));
        // Psych: a `<<` overwrites keys written before it.
        assert_eq!(job["script"], yaml("[base]"));
        assert_eq!(job["variables"], yaml("{X: '1'}"));
        assert!(!job.contains_key("<<"), "nested merge keys are applied too");
        let multi = map["multi"].as_mapping().unwrap();
        assert_eq!(multi["a"], yaml("first"));
        assert_eq!(multi["b"], yaml("second"));
    }

    #[test]
    fn deep_merge_merges_maps_and_replaces_the_rest() {
        let Value::Mapping(mut base) = yaml("{vars: {A: 1, B: 2}, script: [x, y], image: i}")
        else {
            unreachable!()
        };
        let Value::Mapping(over) = yaml("{vars: {B: 3, C: 4}, script: [z], stage: s}") else {
            unreachable!()
        };
        deep_merge(&mut base, over);
        assert_eq!(
            Value::Mapping(base),
            yaml("{vars: {A: 1, B: 3, C: 4}, script: [z], image: i, stage: s}")
        );
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
        for (name, prev) in ["b", "c", "d", "e", "f", "g"]
            .iter()
            .zip(["a", "b", "c", "d", "e", "f"])
        {
            let refs = vec![format!("*{prev}"); 9].join(", ");
            text.push_str(&format!("{name}: &{name} [{refs}]\n"));
        }
        let err = load(&text, "bomb.yml", &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bomb.yml") && err.contains("limit"), "{err}");
    }

    #[test]
    fn spec_header_is_skipped_with_a_warning() {
        let mut warnings = Vec::new();
        let map = load(
            "spec:\n  inputs: {}\n---\njob: {script: x}\n",
            "t.yml",
            &mut warnings,
        )
        .unwrap();
        assert!(map.contains_key("job"));
        assert_eq!(warnings[0].key, "spec");
    }
}

/// YAML parsing shorthands shared by the reader's unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use serde_yaml_ng::{Mapping, Value};

    /// A top-level mapping, as a `.gitlab-ci.yml` is.
    pub(crate) fn config(yaml: &str) -> Mapping {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    /// Any YAML value.
    pub(crate) fn yaml(text: &str) -> Value {
        serde_yaml_ng::from_str(text).unwrap()
    }
}
