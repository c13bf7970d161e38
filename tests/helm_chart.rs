//! The Helm chart in `charts/kiln`, rendered without a cluster or a `helm` binary: objects,
//! RBAC against docs/kubernetes.md, the values schema, and the rendered config through
//! `kiln check-config`.
//!
//! Rendering follows Helm's steps: values.yaml coalesced with the override files (maps merge,
//! `null` deletes), checked against values.schema.json, then every template of `templates/`
//! executed as Go text/template (the `gtmpl-ng` crate) with the Sprig/Helm functions the chart
//! uses, written below to Helm's semantics. Numbers from YAML are float64, as in Helm. One
//! deliberate difference: output containing `<no value>` (a template reading a missing value)
//! is an error here, where Helm would print nothing.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;

use gtmpl_ng::{Context, FuncError, NumberKind, Template, Value};
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use sha2::Digest;

const RELEASE: &str = "kiln";
const NAMESPACE: &str = "ci";
const BASE_PATH: &str = "kiln/templates";

// ---------------------------------------------------------------------------------------------
// The renderer
// ---------------------------------------------------------------------------------------------

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/kiln")
}

fn read_yaml(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Helm's coalescing of values: maps merge key by key, a `null` override deletes the key,
/// anything else replaces.
fn coalesce(base: &mut Yaml, over: &Yaml) {
    match (base, over) {
        (Yaml::Mapping(base), Yaml::Mapping(over)) => {
            for (key, value) in over {
                if value.is_null() {
                    base.remove(key);
                } else if let Some(slot) = base.get_mut(key) {
                    coalesce(slot, value);
                } else {
                    base.insert(key.clone(), value.clone());
                }
            }
        }
        (base, over) => *base = over.clone(),
    }
}

fn yaml_to_json(value: &Yaml) -> Json {
    match value {
        Yaml::Null => Json::Null,
        Yaml::Bool(b) => Json::Bool(*b),
        Yaml::Number(n) => {
            // Helm reads values through JSON: every number is a float64.
            serde_json::Number::from_f64(n.as_f64().unwrap()).map_or(Json::Null, Json::Number)
        }
        Yaml::String(s) => Json::String(s.clone()),
        Yaml::Sequence(items) => Json::Array(items.iter().map(yaml_to_json).collect()),
        Yaml::Mapping(map) => Json::Object(
            map.iter()
                .map(|(k, v)| (k.as_str().expect("string keys").to_owned(), yaml_to_json(v)))
                .collect(),
        ),
        Yaml::Tagged(tagged) => yaml_to_json(&tagged.value),
    }
}

fn json_to_value(value: &Json) -> Value {
    match value {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => Value::from(n.as_f64().unwrap()),
        Json::String(s) => Value::String(s.clone()),
        Json::Array(items) => Value::Array(items.iter().map(json_to_value).collect()),
        Json::Object(map) => Value::Map(
            map.iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        ),
    }
}

/// Go's `%v` of a float64 as encoding/json writes it: integral values without a fraction.
fn go_json_number(n: &gtmpl_ng::Number) -> Json {
    match n.kind() {
        NumberKind::Signed(i) => Json::from(i),
        NumberKind::Unsigned(u) => Json::from(u),
        NumberKind::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => Json::from(f as i64),
        NumberKind::Float(f) => serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number),
    }
}

fn value_to_json(value: &Value) -> Json {
    match value {
        Value::NoValue | Value::Nil | Value::Function(_) => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::String(s) => Json::String(s.clone()),
        Value::Number(n) => go_json_number(n),
        Value::Array(items) => Json::Array(items.iter().map(value_to_json).collect()),
        // serde_json's map is ordered by key, as Go's encoders order map keys.
        Value::Map(map) | Value::Object(map) => Json::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect(),
        ),
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::NoValue | Value::Nil => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Sprig's `empty`: nil, "", 0, false and empty collections.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::NoValue | Value::Nil => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Array(items) => items.is_empty(),
        Value::Map(map) | Value::Object(map) => map.is_empty(),
        Value::Function(_) => false,
    }
}

fn fail(message: impl Into<String>) -> FuncError {
    FuncError::Generic(message.into())
}

fn arg(args: &[Value], i: usize, name: &str) -> Result<Value, FuncError> {
    args.get(i)
        .cloned()
        .ok_or_else(|| FuncError::AtLeastXArgs(name.into(), i + 1))
}

fn int_arg(args: &[Value], i: usize, name: &str) -> Result<i64, FuncError> {
    match arg(args, i, name)? {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .ok_or_else(|| fail(format!("{name}: not a number"))),
        Value::String(s) => s
            .parse()
            .map_err(|_| fail(format!("{name}: `{s}` is not a number"))),
        _ => Err(fail(format!("{name}: not a number"))),
    }
}

thread_local! {
    /// The chart's template set while a render runs: `include` executes named templates in it.
    static TEMPLATES: RefCell<Option<Rc<Template>>> = const { RefCell::new(None) };
}

fn execute(name: &str, context: Value) -> Result<String, String> {
    let template = TEMPLATES
        .with(|t| t.borrow().clone())
        .ok_or("no chart is being rendered")?;
    let entry = Value::Map(HashMap::from([
        ("name".to_owned(), Value::String(name.to_owned())),
        ("ctx".to_owned(), context),
    ]));
    template
        .render(&Context::from(entry))
        .map_err(|e| e.to_string())
}

fn include(args: &[Value]) -> Result<Value, FuncError> {
    let name = text(&arg(args, 0, "include")?);
    let context = args.get(1).cloned().unwrap_or(Value::Nil);
    execute(&name, context).map(Value::String).map_err(fail)
}

fn required(args: &[Value]) -> Result<Value, FuncError> {
    let message = text(&arg(args, 0, "required")?);
    match args.get(1) {
        None | Some(Value::NoValue | Value::Nil) => Err(fail(message)),
        Some(Value::String(s)) if s.is_empty() => Err(fail(message)),
        Some(value) => Ok(value.clone()),
    }
}

fn fail_fn(args: &[Value]) -> Result<Value, FuncError> {
    Err(fail(text(&arg(args, 0, "fail")?)))
}

fn default(args: &[Value]) -> Result<Value, FuncError> {
    let fallback = arg(args, 0, "default")?;
    match args.get(1) {
        Some(given) if !is_empty(given) => Ok(given.clone()),
        _ => Ok(fallback),
    }
}

/// Go's `%q` for the strings a chart holds.
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn quote(args: &[Value]) -> Result<Value, FuncError> {
    let quoted: Vec<String> = args
        .iter()
        .filter(|v| !matches!(v, Value::NoValue | Value::Nil))
        .map(|v| go_quote(&text(v)))
        .collect();
    Ok(Value::String(quoted.join(" ")))
}

fn to_json(args: &[Value]) -> Result<Value, FuncError> {
    let json = value_to_json(&arg(args, 0, "toJson")?);
    Ok(Value::String(
        serde_json::to_string(&json).map_err(|e| fail(e.to_string()))?,
    ))
}

fn to_yaml(args: &[Value]) -> Result<Value, FuncError> {
    let json = value_to_json(&arg(args, 0, "toYaml")?);
    let yaml = serde_yaml_ng::to_string(&json).map_err(|e| fail(e.to_string()))?;
    Ok(Value::String(yaml.trim_end_matches('\n').to_owned()))
}

fn from_yaml(args: &[Value]) -> Result<Value, FuncError> {
    let source = text(&arg(args, 0, "fromYaml")?);
    let yaml: Yaml = serde_yaml_ng::from_str(&source).map_err(|e| fail(e.to_string()))?;
    Ok(json_to_value(&yaml_to_json(&yaml)))
}

fn indent_by(n: i64, s: &str) -> String {
    let pad = " ".repeat(n.max(0) as usize);
    format!("{pad}{}", s.replace('\n', &format!("\n{pad}")))
}

fn indent(args: &[Value]) -> Result<Value, FuncError> {
    let n = int_arg(args, 0, "indent")?;
    Ok(Value::String(indent_by(n, &text(&arg(args, 1, "indent")?))))
}

fn nindent(args: &[Value]) -> Result<Value, FuncError> {
    let n = int_arg(args, 0, "nindent")?;
    Ok(Value::String(format!(
        "\n{}",
        indent_by(n, &text(&arg(args, 1, "nindent")?))
    )))
}

fn trunc(args: &[Value]) -> Result<Value, FuncError> {
    let n = int_arg(args, 0, "trunc")?;
    let s: Vec<char> = text(&arg(args, 1, "trunc")?).chars().collect();
    let out: String = if n >= 0 {
        s.iter().take(n as usize).collect()
    } else {
        s[s.len().saturating_sub(n.unsigned_abs() as usize)..]
            .iter()
            .collect()
    };
    Ok(Value::String(out))
}

fn trim_suffix(args: &[Value]) -> Result<Value, FuncError> {
    let suffix = text(&arg(args, 0, "trimSuffix")?);
    let s = text(&arg(args, 1, "trimSuffix")?);
    Ok(Value::String(
        s.strip_suffix(suffix.as_str()).unwrap_or(&s).to_owned(),
    ))
}

fn contains(args: &[Value]) -> Result<Value, FuncError> {
    let needle = text(&arg(args, 0, "contains")?);
    Ok(Value::Bool(
        text(&arg(args, 1, "contains")?).contains(&needle),
    ))
}

fn replace(args: &[Value]) -> Result<Value, FuncError> {
    let old = text(&arg(args, 0, "replace")?);
    let new = text(&arg(args, 1, "replace")?);
    Ok(Value::String(
        text(&arg(args, 2, "replace")?).replace(&old, &new),
    ))
}

fn sha256sum(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::String(hex::encode(sha2::Sha256::digest(
        text(&arg(args, 0, "sha256sum")?).as_bytes(),
    ))))
}

/// Sprig's `kindOf`: the Go reflect kind of a value as Helm holds it.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::NoValue | Value::Nil => "invalid",
        Value::Bool(_) => "bool",
        Value::String(_) => "string",
        Value::Number(n) => match n.kind() {
            NumberKind::Float(_) => "float64",
            _ => "int64",
        },
        Value::Array(_) => "slice",
        Value::Map(_) | Value::Object(_) => "map",
        Value::Function(_) => "func",
    }
}

fn kind_is(args: &[Value]) -> Result<Value, FuncError> {
    let kind = text(&arg(args, 0, "kindIs")?);
    Ok(Value::Bool(
        kind_of(args.get(1).unwrap_or(&Value::Nil)) == kind,
    ))
}

fn list(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::Array(args.to_vec()))
}

fn dict(args: &[Value]) -> Result<Value, FuncError> {
    let mut map = HashMap::new();
    for pair in args.chunks(2) {
        let value = pair.get(1).cloned().unwrap_or(Value::Nil);
        // Sprig stores a missing value as nil.
        let value = if matches!(value, Value::NoValue) {
            Value::Nil
        } else {
            value
        };
        map.insert(text(&pair[0]), value);
    }
    Ok(Value::Map(map))
}

fn has(args: &[Value]) -> Result<Value, FuncError> {
    let needle = arg(args, 0, "has")?;
    match arg(args, 1, "has")? {
        Value::Array(items) => Ok(Value::Bool(items.contains(&needle))),
        Value::NoValue | Value::Nil => Ok(Value::Bool(false)),
        _ => Err(fail("has: the second argument is not a list")),
    }
}

fn to_int(args: &[Value]) -> Result<Value, FuncError> {
    Ok(Value::from(int_arg(args, 0, "int")?))
}

fn regex_match(args: &[Value]) -> Result<Value, FuncError> {
    let pattern =
        regex::Regex::new(&text(&arg(args, 0, "regexMatch")?)).map_err(|e| fail(e.to_string()))?;
    Ok(Value::Bool(pattern.is_match(&text(&arg(
        args,
        1,
        "regexMatch",
    )?))))
}

/// The Sprig and Helm functions the chart may use; a template calling any other fails to parse.
const FUNCTIONS: &[(&str, gtmpl_ng::Func)] = &[
    ("include", include),
    ("required", required),
    ("fail", fail_fn),
    ("default", default),
    ("quote", quote),
    ("toJson", to_json),
    ("toYaml", to_yaml),
    ("fromYaml", from_yaml),
    ("indent", indent),
    ("nindent", nindent),
    ("trunc", trunc),
    ("trimSuffix", trim_suffix),
    ("contains", contains),
    ("replace", replace),
    ("sha256sum", sha256sum),
    ("kindIs", kind_is),
    ("list", list),
    ("dict", dict),
    ("has", has),
    ("int", to_int),
    ("regexMatch", regex_match),
];

/// What `helm template` would produce: each manifest file's output, and NOTES.txt.
#[derive(Debug)]
struct Rendered {
    files: BTreeMap<String, String>,
    notes: String,
}

/// Renders the chart with values.yaml under `overrides` (YAML documents, later ones win).
fn render(overrides: &[&str]) -> Result<Rendered, String> {
    let dir = chart_dir();
    let mut values = read_yaml(&dir.join("values.yaml"));
    for over in overrides {
        let over: Yaml = serde_yaml_ng::from_str(over).map_err(|e| e.to_string())?;
        coalesce(&mut values, &over);
    }
    let values = yaml_to_json(&values);
    let schema: Json =
        serde_json::from_str(&std::fs::read_to_string(dir.join("values.schema.json")).unwrap())
            .unwrap();
    let problems = schema_problems(&schema, &values);
    if !problems.is_empty() {
        return Err(format!(
            "values don't meet the schema:\n{}",
            problems.join("\n")
        ));
    }
    let chart = yaml_to_json(&read_yaml(&dir.join("Chart.yaml")));
    let root = serde_json::json!({
        "Values": values,
        "Release": {"Name": RELEASE, "Namespace": NAMESPACE, "Service": "Helm",
                    "IsInstall": true, "IsUpgrade": false, "Revision": 1},
        "Chart": {"Name": chart["name"], "Version": chart["version"],
                  "AppVersion": chart["appVersion"]},
        "Template": {"BasePath": BASE_PATH},
    });

    let mut template = Template::with_name("__entry");
    template.add_funcs(FUNCTIONS);
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir.join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_owned();
        let name = format!("{BASE_PATH}/{file}");
        template
            .add_template(name.clone(), std::fs::read_to_string(&path).unwrap())
            .map_err(|e| format!("{name}: {e}"))?;
        names.push((file, name));
    }
    template
        .parse("{{ template (.name) .ctx }}")
        .map_err(|e| e.to_string())?;
    TEMPLATES.with(|t| *t.borrow_mut() = Some(Rc::new(template)));
    let context = json_to_value(&root);
    let mut files = BTreeMap::new();
    let mut notes = String::new();
    let result = (|| {
        for (file, name) in &names {
            if file.starts_with('_') {
                continue;
            }
            let out = execute(name, context.clone()).map_err(|e| format!("{name}: {e}"))?;
            if out.contains("<no value>") {
                return Err(format!("{name} prints a missing value:\n{out}"));
            }
            if file == "NOTES.txt" {
                notes = out;
            } else {
                files.insert(file.clone(), out);
            }
        }
        Ok(())
    })();
    TEMPLATES.with(|t| *t.borrow_mut() = None);
    result.map(|()| Rendered { files, notes })
}

impl Rendered {
    /// Every object of every manifest, as Helm splits them (empty documents dropped).
    fn objects(&self) -> Vec<Json> {
        let mut objects = Vec::new();
        for (file, out) in &self.files {
            for doc in serde_yaml_ng::Deserializer::from_str(out) {
                let yaml = <Yaml as serde::Deserialize>::deserialize(doc)
                    .unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}\n{out}"));
                if !yaml.is_null() {
                    objects.push(yaml_to_json(&yaml));
                }
            }
        }
        objects
    }

    fn object(&self, kind: &str) -> Json {
        let found: Vec<Json> = self
            .objects()
            .into_iter()
            .filter(|o| o["kind"] == kind)
            .collect();
        assert_eq!(found.len(), 1, "one {kind} expected");
        found.into_iter().next().unwrap()
    }

    fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self
            .objects()
            .iter()
            .map(|o| o["kind"].as_str().unwrap().to_owned())
            .collect();
        kinds.sort();
        kinds
    }

    fn config(&self) -> String {
        self.object("ConfigMap")["data"]["kiln.toml"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The coordinator's environment with `secretKeyRef`s resolved against `secret` (the
    /// chart's Secret when `None`).
    fn env(&self, secret: Option<&Json>) -> Vec<(String, String)> {
        let deployment = self.object("Deployment");
        let own_secret;
        let secret = match secret {
            Some(s) => s,
            None => {
                own_secret = self.object("Secret");
                &own_secret["stringData"]
            }
        };
        let mut env = Vec::new();
        for var in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
        {
            let name = var["name"].as_str().unwrap().to_owned();
            if let Some(value) = var["value"].as_str() {
                env.push((name, value.to_owned()));
                continue;
            }
            let r = &var["valueFrom"]["secretKeyRef"];
            match secret[r["key"].as_str().unwrap()].as_str() {
                Some(value) => env.push((name, value.to_owned())),
                None => assert_eq!(r["optional"], true, "{name}: key {} missing", r["key"]),
            }
        }
        env
    }
}

// ---------------------------------------------------------------------------------------------
// values.schema.json
// ---------------------------------------------------------------------------------------------

/// The JSON Schema keywords `schema_problems` implements. The chart's schema may use only
/// these, so a keyword this checker would ignore cannot slip in.
const SCHEMA_KEYWORDS: &[&str] = &[
    "$schema",
    "$ref",
    "title",
    "description",
    "definitions",
    "type",
    "properties",
    "additionalProperties",
    "items",
    "required",
    "enum",
    "pattern",
    "minimum",
    "maximum",
];

fn schema_keywords(schema: &Json, out: &mut Vec<String>) {
    let Some(map) = schema.as_object() else {
        return;
    };
    for (key, value) in map {
        out.push(key.clone());
        match key.as_str() {
            "properties" | "definitions" => value
                .as_object()
                .unwrap()
                .values()
                .for_each(|s| schema_keywords(s, out)),
            "items" | "additionalProperties" => schema_keywords(value, out),
            _ => {}
        }
    }
}

fn type_matches(name: &str, value: &Json) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        "integer" => value.as_f64().is_some_and(|f| f.fract() == 0.0),
        other => panic!("unknown schema type {other}"),
    }
}

/// Draft-07 validation for the keywords in `SCHEMA_KEYWORDS`: every problem with its path.
fn schema_problems(root: &Json, value: &Json) -> Vec<String> {
    let mut problems = Vec::new();
    check_schema(root, root, value, "", &mut problems);
    problems
}

fn check_schema(root: &Json, schema: &Json, value: &Json, path: &str, out: &mut Vec<String>) {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.strip_prefix("#/definitions/").unwrap();
        return check_schema(root, &root["definitions"][name], value, path, out);
    }
    let at = if path.is_empty() { "(root)" } else { path };
    match &schema["type"] {
        Json::String(t) if !type_matches(t, value) => {
            return out.push(format!("{at}: {value} is not of type {t}"));
        }
        Json::Array(ts) if !ts.iter().any(|t| type_matches(t.as_str().unwrap(), value)) => {
            return out.push(format!("{at}: {value} is not of type {ts:?}"));
        }
        _ => {}
    }
    if let Some(options) = schema["enum"].as_array()
        && !options.contains(value)
    {
        out.push(format!("{at}: {value} is not one of {options:?}"));
    }
    if let (Some(pattern), Some(s)) = (schema["pattern"].as_str(), value.as_str())
        && !regex::Regex::new(pattern).unwrap().is_match(s)
    {
        out.push(format!("{at}: `{s}` does not match {pattern}"));
    }
    if let (Some(min), Some(n)) = (schema["minimum"].as_f64(), value.as_f64())
        && n < min
    {
        out.push(format!("{at}: {n} is below the minimum {min}"));
    }
    if let (Some(max), Some(n)) = (schema["maximum"].as_f64(), value.as_f64())
        && n > max
    {
        out.push(format!("{at}: {n} is above the maximum {max}"));
    }
    if let Some(items) = value.as_array()
        && schema.get("items").is_some()
    {
        for (i, item) in items.iter().enumerate() {
            check_schema(root, &schema["items"], item, &format!("{path}[{i}]"), out);
        }
    }
    if let Some(map) = value.as_object() {
        for key in schema["required"].as_array().into_iter().flatten() {
            if !map.contains_key(key.as_str().unwrap()) {
                out.push(format!("{at}: {key} is required"));
            }
        }
        for (key, item) in map {
            let sub = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            if let Some(property) = schema["properties"].get(key) {
                check_schema(root, property, item, &sub, out);
            } else {
                match &schema["additionalProperties"] {
                    Json::Bool(false) => {
                        out.push(format!("{at}: additional property `{key}` is not allowed"))
                    }
                    Json::Object(_) => {
                        check_schema(root, &schema["additionalProperties"], item, &sub, out)
                    }
                    _ => {}
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// The install command of the issue: `--set gitlab.url=… --set gitlab.runnerToken=…`.
const MINIMAL: &str =
    "gitlab:\n  url: https://gitlab.example.com\n  runnerToken: fake-minimal-runner-token\n";

fn full_values() -> String {
    std::fs::read_to_string(chart_dir().join("ci/full-values.yaml")).unwrap()
}

fn kiln() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command.env_clear();
    command
}

/// `kiln check-config` on `config` with `env`: (success, stdout + stderr).
fn check_config(config: &str, env: &[(String, String)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    std::fs::write(&path, config).unwrap();
    let out = kiln()
        .arg("check-config")
        .arg(&path)
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn rules(role: &Json) -> Vec<(Vec<String>, Vec<String>, Vec<String>)> {
    let strings = |v: &Json| -> Vec<String> {
        let mut s: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_owned())
            .collect();
        s.sort();
        s
    };
    let mut out: Vec<_> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                strings(&r["apiGroups"]),
                strings(&r["resources"]),
                strings(&r["verbs"]),
            )
        })
        .collect();
    out.sort();
    out
}

/// The Role in docs/kubernetes.md's YAML block.
fn documented_role() -> Json {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/kubernetes.md"))
            .unwrap();
    let block = doc
        .split("```yaml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap())
        .find(|block| block.contains("kind: Role\n"))
        .expect("docs/kubernetes.md has a yaml block with the Role");
    serde_yaml_ng::Deserializer::from_str(block)
        .map(|doc| yaml_to_json(&<Yaml as serde::Deserialize>::deserialize(doc).unwrap()))
        .find(|o| o["kind"] == "Role")
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn renderer_follows_go_templates_and_sprig_on_known_snippets() {
    // Expected outputs are Helm 3's for the same snippets; they pin the parts of the engine
    // the chart leans on (trim markers, include + nindent, toYaml ordering, default, quote).
    let out = render(&[MINIMAL]).unwrap();
    let labels = &out.object("Service")["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/name"], "kiln");
    assert_eq!(labels["app.kubernetes.io/instance"], RELEASE);
    assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm");
    assert_eq!(labels["helm.sh/chart"], "kiln-0.1.0");
    assert_eq!(labels["app.kubernetes.io/version"], "0.1.0");
    // Release name "kiln" contains the chart name, so the full name is the release name.
    assert_eq!(out.object("Deployment")["metadata"]["name"], "kiln");
    let renamed = render(&[MINIMAL, "nameOverride: builder\n"]).unwrap();
    assert_eq!(
        renamed.object("Deployment")["metadata"]["name"],
        "kiln-builder"
    );
    // toYaml: keys sorted, no trailing newline, nested under nindent.
    assert!(
        out.files["deployment.yaml"].contains(
            "          resources:\n            limits:\n              memory: 256Mi\n            requests:\n              cpu: 50m\n"
        ),
        "{}",
        out.files["deployment.yaml"]
    );
    assert_eq!(go_quote("a\"b\\c\n"), r#""a\"b\\c\n""#);
    assert!(
        render(&[MINIMAL, "service:\n  port: null\n"])
            .unwrap_err()
            .contains("prints a missing value"),
        "a null override deletes the key, and a template printing it is caught"
    );
}

#[test]
fn minimal_install_renders_a_hardened_coordinator_and_its_objects() {
    let out = render(&[MINIMAL]).unwrap();
    assert_eq!(
        out.kinds(),
        [
            "ConfigMap",
            "Deployment",
            "Role",
            "RoleBinding",
            "Secret",
            "Service",
            "ServiceAccount"
        ]
    );
    for object in out.objects() {
        assert!(object["apiVersion"].is_string(), "{object}");
        assert!(object["kind"].is_string(), "{object}");
        assert!(object["metadata"]["name"].is_string(), "{object}");
        assert_eq!(object["metadata"]["namespace"], NAMESPACE, "{object}");
        assert_eq!(
            object["metadata"]["labels"]["app.kubernetes.io/instance"],
            RELEASE
        );
    }

    let deployment = out.object("Deployment");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 1.0);
    assert_eq!(spec["strategy"]["type"], "Recreate");
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "kiln");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "ghcr.io/kiln-ci/kiln:0.1.0");
    assert_eq!(
        container["args"],
        serde_json::json!(["run", "--config", "/etc/kiln/kiln.toml"])
    );
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["ports"][0]["containerPort"], 9252.0);
    assert!(container["resources"]["limits"]["memory"].is_string());

    // The ConfigMap the Deployment mounts is the one rendered, at the path `kiln run` reads.
    let configmap = out.object("ConfigMap");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .unwrap();
    assert_eq!(volume["configMap"]["name"], configmap["metadata"]["name"]);
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "config")
        .unwrap();
    assert_eq!(mount["mountPath"], "/etc/kiln");
    assert!(configmap["data"]["kiln.toml"].is_string());

    // Every secretKeyRef names the rendered Secret and one of its keys.
    let secret = out.object("Secret");
    let env = container["env"].as_array().unwrap();
    assert!(!env.is_empty());
    for var in env {
        let r = &var["valueFrom"]["secretKeyRef"];
        assert_eq!(r["name"], secret["metadata"]["name"], "{var}");
        assert!(
            secret["stringData"][r["key"].as_str().unwrap()].is_string(),
            "{var}"
        );
    }
    assert_eq!(env[0]["name"], "KILN_SOURCES__GITLAB__0__TOKEN");

    // The token is in the Secret only.
    assert_eq!(
        secret["stringData"]["gitlab-token-0"],
        "fake-minimal-runner-token"
    );
    for (file, text) in &out.files {
        if file != "secret.yaml" {
            assert!(!text.contains("fake-minimal-runner-token"), "{file}");
        }
    }
    let config: toml::Table = out.config().parse().unwrap();
    assert_eq!(config["executor"].as_str(), Some("kubernetes"));
    let runner = &config["sources"]["gitlab"][0];
    assert!(runner.get("token").is_none());
    assert_eq!(runner["url"].as_str(), Some("https://gitlab.example.com"));
    assert_eq!(config["kubernetes"]["namespace"].as_str(), Some(NAMESPACE));
    assert_eq!(
        config["kubernetes"]["helper_image"].as_str(),
        Some("ghcr.io/kiln-ci/kiln:0.1.0")
    );
    // Disabled resource classes stay out of the config.
    assert!(config["kubernetes"].get("resource_classes").is_none());
}

#[test]
fn a_config_change_rolls_the_pod_and_the_system_id_is_stable() {
    let checksum = |out: &Rendered| {
        out.object("Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let before = render(&[MINIMAL]).unwrap();
    let after = render(&[MINIMAL, "concurrent: 9\n"]).unwrap();
    assert_eq!(
        checksum(&before),
        hex::encode(sha2::Sha256::digest(
            before.files["configmap.yaml"].as_bytes()
        ))
    );
    assert_ne!(checksum(&before), checksum(&after));
    let system_id = |out: &Rendered| {
        let config: toml::Table = out.config().parse().unwrap();
        config["sources"]["gitlab"][0]["system_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // GitLab shows one runner manager per system id: it must survive config changes.
    assert_eq!(system_id(&before), system_id(&after));
    assert!(kiln::config::is_system_id(&system_id(&before)));
}

#[test]
fn full_values_render_every_option() {
    let out = render(&[&full_values()]).unwrap();
    assert_eq!(
        out.kinds(),
        [
            "ConfigMap",
            "Deployment",
            "Namespace",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PodMonitor",
            "Role",
            "RoleBinding",
            "Secret",
            "Service",
            "ServiceAccount",
            "ServiceMonitor"
        ]
    );
    for object in out.objects() {
        assert!(object["apiVersion"].is_string() && object["kind"].is_string());
        assert!(object["metadata"]["name"].as_str().is_some());
    }
    assert_eq!(out.object("Namespace")["metadata"]["name"], "ci-builds");
    for kind in ["Role", "RoleBinding"] {
        assert_eq!(out.object(kind)["metadata"]["namespace"], "ci-builds");
    }
    let binding = out.object("RoleBinding");
    assert_eq!(binding["subjects"][0]["name"], "kiln-ci");
    assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);
    assert_eq!(
        binding["roleRef"]["name"],
        out.object("Role")["metadata"]["name"]
    );

    let config: toml::Table = out.config().parse().unwrap();
    let k8s = &config["kubernetes"];
    assert_eq!(k8s["namespace"].as_str(), Some("ci-builds"));
    assert_eq!(k8s["coordinator"].as_str(), Some("kiln-ci"));
    assert_eq!(
        k8s["helper_image"].as_str(),
        Some("registry.example.com/mirror/kiln:0.1.0")
    );
    assert_eq!(k8s["security"].as_str(), Some("restricted"));
    assert_eq!(k8s["run_as_user"].as_integer(), Some(1000));
    assert_eq!(k8s["tolerations"][0]["effect"].as_str(), Some("NoSchedule"));
    assert_eq!(
        k8s["node_selector"]["kubernetes.io/arch"].as_str(),
        Some("amd64")
    );
    assert_eq!(
        k8s["pod_patch"]["spec"]["dnsConfig"]["options"][0]["value"].as_str(),
        Some("2")
    );
    assert_eq!(
        k8s["node_selector_overwrite_allowed"].as_str(),
        Some(r"^kubernetes\.io/arch=(amd64|arm64)$")
    );
    let classes = k8s["resource_classes"].as_table().unwrap();
    assert_eq!(
        classes.keys().collect::<Vec<_>>(),
        ["eci-spot", "gpu", "no-evict"]
    );
    // values.yaml's preset class, switched on by `enabled: true` alone.
    assert_eq!(classes["eci-spot"]["preset"].as_str(), Some("eci-spot"));
    assert_eq!(classes["eci-spot"]["memory_limit"].as_str(), Some("4Gi"));
    assert!(classes["eci-spot"].get("enabled").is_none());
    assert_eq!(classes["gpu"]["runtime_class"].as_str(), Some("nvidia"));
    assert_eq!(config["agent"]["output_limit"].as_integer(), Some(8192));

    let runners = config["sources"]["gitlab"].as_array().unwrap();
    let names: Vec<_> = runners
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "gpu", "other-instance"]);
    assert_eq!(
        runners[0]["url"].as_str(),
        Some("https://gitlab.example.com")
    );
    assert_eq!(
        runners[2]["url"].as_str(),
        Some("https://gitlab.other.example.com/sub/path")
    );
    assert_eq!(runners[1]["system_id"].as_str(), Some("s_0123456789ab"));
    assert_eq!(runners[1]["limit"].as_integer(), Some(2));
    assert_eq!(runners[1]["poll_timeout"].as_str(), Some("90s"));
    assert_eq!(runners[0]["request_concurrency"].as_integer(), Some(2));
    assert_eq!(runners[0]["resource_class"].as_str(), Some("eci-spot"));
    let ids: std::collections::BTreeSet<_> = runners
        .iter()
        .map(|r| r["system_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "each runner has its own system id");

    // Jenkins: exactly the keys of [[sources.jenkins]]; secrets only in the Secret.
    let jenkins = config["sources"]["jenkins"][0].as_table().unwrap();
    assert_eq!(
        jenkins.keys().collect::<Vec<_>>(),
        [
            "labels",
            "limit",
            "name",
            "pod_templates",
            "poll_interval",
            "url",
            "user"
        ]
    );
    assert_eq!(
        jenkins["labels"].as_array().unwrap().len(),
        2,
        "{jenkins:?}"
    );
    assert_eq!(
        jenkins["pod_templates"]["maven"]["containers"][0]["image"].as_str(),
        Some("maven:3.9-eclipse-temurin-21")
    );
    let env = out.env(None);
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "KILN_SOURCES__GITLAB__0__TOKEN",
            "KILN_SOURCES__GITLAB__1__TOKEN",
            "KILN_SOURCES__GITLAB__2__TOKEN",
            "KILN_SOURCES__JENKINS__0__TOKEN",
            "KILN_SOURCES__JENKINS__0__WEBHOOK_SECRET",
            "RUST_BACKTRACE"
        ]
    );
    for (file, text) in &out.files {
        if file != "secret.yaml" {
            for secret in [
                "fake-runner-token",
                "fake-jenkins-api-token",
                "fake-webhook-secret",
            ] {
                assert!(!text.contains(secret), "{file} holds {secret}");
            }
        }
    }

    let policy = out.object("NetworkPolicy");
    assert_eq!(
        policy["spec"]["ingress"][0]["from"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        out.object("ServiceMonitor")["metadata"]["labels"]["release"],
        "prometheus"
    );
    assert_eq!(
        out.object("PodDisruptionBudget")["spec"]["minAvailable"],
        1.0
    );
}

#[test]
fn role_grants_exactly_what_docs_kubernetes_md_lists() {
    let documented = rules(&documented_role());
    assert_eq!(documented.len(), 3, "{documented:?}");
    for overrides in [vec![MINIMAL.to_owned()], vec![full_values()]] {
        let overrides: Vec<&str> = overrides.iter().map(String::as_str).collect();
        let out = render(&overrides).unwrap();
        let role = out.object("Role");
        assert_eq!(rules(&role), documented);
        assert_eq!(role["apiVersion"], "rbac.authorization.k8s.io/v1");
    }
    let out = render(&[MINIMAL, "rbac:\n  create: false\n"]).unwrap();
    assert!(!out.kinds().contains(&"Role".to_owned()));
}

#[test]
fn rendered_config_with_the_secret_env_passes_check_config() {
    let minimal = render(&[MINIMAL]).unwrap();
    let (ok, output) = check_config(&minimal.config(), &minimal.env(None));
    assert!(ok, "{output}\n{}", minimal.config());
    assert!(
        output.contains("ok (1 GitLab runner(s), concurrent = 4)"),
        "{output}"
    );
    // Without the Secret's variables the config lacks the token: the env is what carries it.
    let (ok, output) = check_config(&minimal.config(), &[]);
    assert!(
        !ok && output.contains("sources.gitlab[0].token: is empty")
            && output.contains("KILN_SOURCES__GITLAB__N__TOKEN"),
        "{output}"
    );

    let full = render(&[&full_values()]).unwrap();
    let (ok, output) = check_config(&full.config(), &full.env(None));
    assert!(ok, "{output}\n{}", full.config());
    assert!(
        output.contains("ok (3 GitLab runner(s), concurrent = 20)"),
        "{output}"
    );
}

#[test]
fn an_existing_secret_replaces_the_charts_secret() {
    let out = render(&[
        "gitlab:\n  url: https://gitlab.example.com\n  runners:\n    - name: a\n    - name: b\nexistingSecret: ci-tokens\n",
    ])
    .unwrap();
    assert!(!out.kinds().contains(&"Secret".to_owned()));
    let pod = &out.object("Deployment")["spec"]["template"];
    assert!(
        pod["metadata"]["annotations"]
            .get("checksum/secret")
            .is_none()
    );
    for (i, var) in pod["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert_eq!(var["name"], format!("KILN_SOURCES__GITLAB__{i}__TOKEN"));
        assert_eq!(var["valueFrom"]["secretKeyRef"]["name"], "ci-tokens");
        assert_eq!(
            var["valueFrom"]["secretKeyRef"]["key"],
            format!("gitlab-token-{i}")
        );
    }
    let secret = serde_json::json!({"gitlab-token-0": "fake-a", "gitlab-token-1": "fake-b"});
    let (ok, output) = check_config(&out.config(), &out.env(Some(&secret)));
    assert!(ok, "{output}");
    assert!(output.contains("2 GitLab runner(s)"), "{output}");
}

#[test]
fn missing_servers_and_tokens_fail_the_install_with_a_message() {
    let err = render(&[]).unwrap_err();
    assert!(err.contains("no CI server configured"), "{err}");
    let err = render(&["gitlab:\n  url: https://gitlab.example.com\n"]).unwrap_err();
    assert!(
        err.contains("token of GitLab runner 0 is required"),
        "{err}"
    );
    let err = render(&[
        "gitlab:\n  runnerToken: fake\n  runners:\n    - url: https://gitlab.example.com\n      token: fake\n",
    ])
    .unwrap_err();
    assert!(
        err.contains("gitlab.runnerToken belongs to the single runner"),
        "{err}"
    );
    let err = render(&["gitlab:\n  runners:\n    - token: fake\n"]).unwrap_err();
    assert!(err.contains("gitlab.runners[0].url is required"), "{err}");
}

#[test]
fn the_schema_rejects_typos_and_wrong_types() {
    let dir = chart_dir();
    let schema: Json =
        serde_json::from_str(&std::fs::read_to_string(dir.join("values.schema.json")).unwrap())
            .unwrap();
    let mut keywords = Vec::new();
    schema_keywords(&schema, &mut keywords);
    for keyword in &keywords {
        assert!(
            SCHEMA_KEYWORDS.contains(&keyword.as_str()),
            "values.schema.json uses `{keyword}`, which this test's checker does not implement"
        );
    }
    // Both shipped values files are valid.
    render(&[MINIMAL]).unwrap();
    render(&[&full_values()]).unwrap();

    for (values, expected) in [
        (
            "gitlab:\n  url: https://gitlab.example.com\n  runerToken: fake\n",
            "gitlab: additional property `runerToken` is not allowed",
        ),
        (
            "concurency: 3\n",
            "(root): additional property `concurency` is not allowed",
        ),
        (
            "kubernetes:\n  defualt_image: alpine\n",
            "kubernetes: additional property `defualt_image` is not allowed",
        ),
        (
            "resourceClasses:\n  eci-spot:\n    cpu_requets: \"2\"\n",
            "resourceClasses.eci-spot: additional property `cpu_requets` is not allowed",
        ),
        (
            "kubernetes:\n  build:\n    cpu_request: 2\n",
            "kubernetes.build.cpu_request: 2.0 is not of type string",
        ),
        (
            "concurrent: many\n",
            "concurrent: \"many\" is not of type integer",
        ),
        ("concurrent: 0\n", "concurrent: 0 is below the minimum 1"),
        (
            "kubernetes:\n  security: strict\n",
            "kubernetes.security: \"strict\" is not one of",
        ),
        (
            "gitlab:\n  runners:\n    - url: https://gitlab.example.com\n      systemId: abc\n",
            "gitlab.runners[0].systemId: `abc` does not match",
        ),
    ] {
        let err = render(&[MINIMAL, values]).unwrap_err();
        assert!(err.contains(expected), "{values}: {err}");
    }
}

#[test]
fn notes_say_how_to_check_the_runner_is_online() {
    let out = render(&[&full_values()]).unwrap();
    assert!(
        out.notes
            .contains("kubectl -n ci rollout status deployment/kiln-ci"),
        "{}",
        out.notes
    );
    assert!(out.notes.contains("/readyz"), "{}", out.notes);
    assert!(out.notes.contains("online"), "{}", out.notes);
    assert!(out.notes.contains("build pods run in namespace ci-builds"));
    assert!(!out.notes.contains("fake-"), "NOTES never print a token");
}
