//! The test API server's object store: resourceVersions, watch history, validation, selectors, patches, garbage collection.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Map, Value, json};

use super::kubelet::Ctl;
use super::{ApiError, State, now, string_map};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Res {
    Pods,
    Secrets,
    Events,
    /// `coordination.k8s.io/v1` Leases (served under `/apis/coordination.k8s.io/v1`).
    Leases,
    /// ConfigMaps an administrator made for pods to mount (kiln never writes them).
    ConfigMaps,
    /// PersistentVolumeClaims an administrator made for pods to mount.
    PersistentVolumeClaims,
}

impl Res {
    pub(crate) fn parse(plural: &str) -> Option<Self> {
        match plural {
            "pods" => Some(Self::Pods),
            "secrets" => Some(Self::Secrets),
            "events" => Some(Self::Events),
            "configmaps" => Some(Self::ConfigMaps),
            "persistentvolumeclaims" => Some(Self::PersistentVolumeClaims),
            _ => None,
        }
    }

    /// A resource of the `coordination.k8s.io` group.
    pub(crate) fn parse_coordination(plural: &str) -> Option<Self> {
        (plural == "leases").then_some(Self::Leases)
    }

    pub(crate) fn plural(self) -> &'static str {
        match self {
            Self::Pods => "pods",
            Self::Secrets => "secrets",
            Self::Events => "events",
            Self::Leases => "leases",
            Self::ConfigMaps => "configmaps",
            Self::PersistentVolumeClaims => "persistentvolumeclaims",
        }
    }

    pub(crate) fn kind(self) -> &'static str {
        match self {
            Self::Pods => "Pod",
            Self::Secrets => "Secret",
            Self::Events => "Event",
            Self::Leases => "Lease",
            Self::ConfigMaps => "ConfigMap",
            Self::PersistentVolumeClaims => "PersistentVolumeClaim",
        }
    }

    /// The API group (`""` for core).
    pub(crate) fn group(self) -> &'static str {
        match self {
            Self::Leases => "coordination.k8s.io",
            _ => "",
        }
    }

    /// `apiVersion` of its objects.
    pub(crate) fn api_version(self) -> &'static str {
        match self {
            Self::Leases => "coordination.k8s.io/v1",
            _ => "v1",
        }
    }

    /// How the API server names the resource in messages: `pods`, `leases.coordination.k8s.io`.
    pub(crate) fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_owned(),
            group => format!("{}.{group}", self.plural()),
        }
    }
}

/// `(resource, namespace, name)`
pub(crate) type Key = (Res, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    Added,
    Modified,
    Deleted,
}

impl Change {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One write, as watchers see it.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub(crate) rv: u64,
    pub(crate) res: Res,
    pub(crate) change: Change,
    pub(crate) object: Value,
    /// The object before a modification: a watcher whose selector it matched but the new
    /// object does not gets a DELETED.
    pub(crate) previous: Option<Value>,
}

pub(crate) struct Store {
    pub(crate) rv: u64,
    pub(crate) objects: BTreeMap<Key, Value>,
    pub(crate) history: VecDeque<Record>,
    history_limit: usize,
    /// Watching from a resourceVersion below this answers 410 Expired.
    pub(crate) compacted: u64,
    pub(crate) creations: Vec<String>,
    pub(crate) max_pods: usize,
}

impl Store {
    pub(crate) fn new(history_limit: usize) -> Self {
        Self {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit,
            compacted: 0,
            creations: Vec::new(),
            max_pods: 0,
        }
    }

    pub(crate) fn set_history_limit(&mut self, limit: usize) {
        self.history_limit = limit;
        self.trim();
    }

    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    fn trim(&mut self) {
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, res: Res, change: Change, object: Value, previous: Option<Value>) {
        let rv = self.rv;
        self.history.push_back(Record {
            rv,
            res,
            change,
            object,
            previous,
        });
        self.trim();
    }

    pub(crate) fn typed<T: serde::de::DeserializeOwned>(&self, res: Res) -> Vec<T> {
        self.objects
            .iter()
            .filter(|((r, _, _), _)| *r == res)
            .map(|(_, v)| serde_json::from_value(v.clone()).unwrap())
            .collect()
    }

    pub(crate) fn get(&self, res: Res, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(res, ns.to_owned(), name.to_owned()))
    }

    fn uid_exists(&self, uid: &str) -> bool {
        self.objects
            .values()
            .any(|o| o["metadata"]["uid"].as_str() == Some(uid))
    }

    fn pod_count(&self) -> usize {
        self.objects.keys().filter(|k| k.0 == Res::Pods).count()
    }

    /// POST: fills in the server-set metadata, validates and stores.
    pub(crate) fn create(&mut self, res: Res, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body is not a JSON object",
            ));
        }
        check_type(res, &obj)?;
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let meta = &obj["metadata"];
        if let Some(body_ns) = meta["namespace"].as_str()
            && !body_ns.is_empty()
            && body_ns != ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let mut name = meta["name"].as_str().unwrap_or("").to_owned();
        if name.is_empty()
            && let Some(prefix) = meta["generateName"].as_str()
            && !prefix.is_empty()
        {
            name = loop {
                let candidate = format!("{prefix}{}", random_suffix());
                if self.get(res, ns, &candidate).is_none() {
                    break candidate;
                }
            };
        }
        {
            let meta = obj["metadata"].as_object_mut().unwrap();
            meta.insert("name".into(), json!(name));
            meta.insert("namespace".into(), json!(ns));
            for server_set in [
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "managedFields",
                "selfLink",
            ] {
                meta.remove(server_set);
            }
        }
        obj["kind"] = json!(res.kind());
        obj["apiVersion"] = json!(res.api_version());
        if res == Res::Secrets {
            merge_string_data(&mut obj)?;
            if obj["type"].as_str().is_none_or(str::is_empty) {
                obj["type"] = json!("Opaque");
            }
        }
        if res == Res::Pods {
            default_pod(&mut obj);
        }
        validate(res, &obj)?;
        if self.get(res, ns, &name).is_some() {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", res.qualified()),
            )
            .details(json!({ "name": name, "group": res.group(), "kind": res.plural() })));
        }
        let rv = self.next_rv();
        {
            let meta = obj["metadata"].as_object_mut().unwrap();
            meta.insert("uid".into(), json!(uuid()));
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            meta.insert("creationTimestamp".into(), json!(now()));
            if res == Res::Pods {
                meta.insert("generation".into(), json!(1));
            }
        }
        self.objects
            .insert((res, ns.to_owned(), name.clone()), obj.clone());
        self.record(res, Change::Added, obj.clone(), None);
        if res == Res::Pods {
            self.creations.push(name);
            self.max_pods = self.max_pods.max(self.pod_count());
        }
        Ok(obj)
    }

    /// Stores `obj` (already merged with the old object) under a new resourceVersion.
    pub(crate) fn replace(&mut self, key: &Key, mut obj: Value) -> Value {
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let previous = self.objects.insert(key.clone(), obj.clone());
        self.record(key.0, Change::Modified, obj.clone(), previous);
        obj
    }

    /// PUT/PATCH result `new` for the stored object at `key`: keeps what clients cannot
    /// change, checks the resourceVersion, validates, stores. `status_only` is the
    /// `/status` subresource: only status changes; otherwise status does not.
    pub(crate) fn update(
        &mut self,
        key: &Key,
        mut new: Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let (res, _, name) = key;
        let old = self
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(*res, name))?;
        if !new.is_object() {
            return Err(ApiError::bad_request(
                "the request body is not a JSON object",
            ));
        }
        check_type(*res, &new)?;
        if let Some(given) = new["metadata"]["resourceVersion"].as_str()
            && !given.is_empty()
            && Some(given) != old["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiError::conflict(
                *res,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        if let Some(given) = new["metadata"]["name"].as_str()
            && given != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({given}) does not match the name on the URL ({name})"
            )));
        }
        if status_only {
            let mut merged = old.clone();
            merged["status"] = new["status"].take();
            new = merged;
        } else {
            if !new["metadata"].is_object() {
                new["metadata"] = json!({});
            }
            let meta = new["metadata"].as_object_mut().unwrap();
            for kept in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "generateName",
            ] {
                match old["metadata"].get(kept) {
                    Some(v) => meta.insert(kept.into(), v.clone()),
                    None => meta.remove(kept),
                };
            }
            new["kind"] = old["kind"].clone();
            new["apiVersion"] = old["apiVersion"].clone();
            if *res == Res::Pods {
                new["status"] = old["status"].clone();
                if new["spec"] != old["spec"] {
                    let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                    new["metadata"]["generation"] = json!(generation + 1);
                }
            }
            if *res == Res::Secrets {
                merge_string_data(&mut new)?;
            }
        }
        validate(*res, &new)?;
        if *res == Res::Pods && new["spec"] != old["spec"] {
            check_pod_spec_update(name, &old["spec"], &new["spec"])?;
        }
        if new == old {
            return Ok(old);
        }
        Ok(self.replace(key, new))
    }

    /// Removes the object now: a DELETED event carrying a new resourceVersion.
    pub(crate) fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut obj = self.objects.remove(key)?;
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(key.0, Change::Deleted, obj.clone(), None);
        Some(obj)
    }

    fn dependents(&self, owner_uid: &str) -> Vec<Key> {
        self.objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(owner_uid)))
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Whether every owner the object names is gone (what makes the collector delete it).
    pub(crate) fn orphaned(&self, obj: &Value) -> bool {
        obj["metadata"]["ownerReferences"]
            .as_array()
            .is_some_and(|refs| {
                !refs.is_empty()
                    && refs
                        .iter()
                        .all(|r| !r["uid"].as_str().is_some_and(|u| self.uid_exists(u)))
            })
    }
}

/// How a DELETE was asked for.
#[derive(Clone, Debug, Default)]
pub(crate) struct DeleteOptions {
    pub(crate) grace: Option<i64>,
    pub(crate) policy: Option<String>,
    pub(crate) uid: Option<String>,
    pub(crate) resource_version: Option<String>,
}

impl State {
    /// DELETE: pods on a node with a grace period are marked and left to the kubelet;
    /// everything else goes now, and its dependents with it.
    pub(crate) fn delete(&mut self, key: &Key, opts: &DeleteOptions) -> Result<Value, ApiError> {
        let (res, _, name) = key;
        let obj = self
            .store
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(*res, name))?;
        let meta = &obj["metadata"];
        if let Some(uid) = &opts.uid
            && meta["uid"].as_str() != Some(uid)
        {
            return Err(ApiError::conflict(
                *res,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta["uid"].as_str().unwrap_or("")
                ),
            ));
        }
        if let Some(rv) = &opts.resource_version
            && meta["resourceVersion"].as_str() != Some(rv)
        {
            return Err(ApiError::conflict(
                *res,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta["resourceVersion"].as_str().unwrap_or("")
                ),
            ));
        }
        let policy = opts.policy.as_deref().unwrap_or("Background");
        if !matches!(policy, "Background" | "Foreground" | "Orphan") {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "DeleteOptions.meta.k8s.io \"\" is invalid: propagationPolicy: Unsupported value: \"{policy}\": supported values: \"Foreground\", \"Background\", \"Orphan\", \"nil\""
                ),
            ));
        }
        let uid = meta["uid"].as_str().unwrap_or("").to_owned();
        if *res == Res::Pods {
            let grace = opts
                .grace
                .or_else(|| obj["spec"]["terminationGracePeriodSeconds"].as_i64())
                .unwrap_or(30);
            let on_node = obj["spec"]["nodeName"]
                .as_str()
                .is_some_and(|n| !n.is_empty());
            let terminal = matches!(
                obj["status"]["phase"].as_str(),
                Some("Succeeded" | "Failed")
            );
            let kubelet = self
                .runtimes
                .iter()
                .find(|rt| rt.uid == uid)
                .filter(|rt| !rt.ctl.is_closed());
            if on_node
                && !terminal
                && grace > 0
                && let Some(rt) = kubelet
            {
                if meta["deletionTimestamp"].is_string() {
                    return Ok(obj);
                }
                let mut marked = obj.clone();
                let at = chrono::Utc::now() + chrono::Duration::seconds(grace);
                marked["metadata"]["deletionTimestamp"] =
                    json!(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                marked["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                let _ = rt.ctl.send(Ctl::Delete { grace });
                if policy == "Orphan" {
                    self.orphan_dependents(&uid);
                }
                return Ok(self.store.replace(key, marked));
            }
        }
        Ok(self.remove_now(key, policy))
    }

    /// Removes the object and collects (or, for `Orphan`, releases) its dependents.
    pub(crate) fn remove_now(&mut self, key: &Key, policy: &str) -> Value {
        let Some(obj) = self.store.remove(key) else {
            return Value::Null;
        };
        let uid = obj["metadata"]["uid"].as_str().unwrap_or("").to_owned();
        if key.0 == Res::Pods
            && let Some(rt) = self.runtimes.iter().find(|rt| rt.uid == uid)
        {
            // Gone from the API while processes may still run: the kubelet kills them.
            let _ = rt.ctl.send(Ctl::Kill);
        }
        if policy == "Orphan" {
            self.orphan_dependents(&uid);
        } else {
            self.collect_garbage();
        }
        obj
    }

    fn orphan_dependents(&mut self, owner_uid: &str) {
        for dep in self.store.dependents(owner_uid) {
            if let Some(mut obj) = self.store.objects.get(&dep).cloned() {
                if let Some(refs) = obj["metadata"]["ownerReferences"].as_array_mut() {
                    refs.retain(|r| r["uid"].as_str() != Some(owner_uid));
                }
                self.store.replace(&dep, obj);
            }
        }
    }

    /// Deletes every object all of whose owners are gone, as the garbage collector does.
    pub(crate) fn collect_garbage(&mut self) {
        loop {
            // One pass over the uids, not one per owner reference: with thousands of objects
            // the collector would otherwise be quadratic, and the benchmark would time it.
            let uids: std::collections::HashSet<&str> = self
                .store
                .objects
                .values()
                .filter_map(|o| o["metadata"]["uid"].as_str())
                .collect();
            let orphans: Vec<Key> = self
                .store
                .objects
                .iter()
                .filter(|(_, o)| {
                    o["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|refs| {
                            !refs.is_empty()
                                && refs
                                    .iter()
                                    .all(|r| !r["uid"].as_str().is_some_and(|u| uids.contains(u)))
                        })
                        && !o["metadata"]["deletionTimestamp"].is_string()
                })
                .map(|(k, _)| k.clone())
                .collect();
            if orphans.is_empty() {
                return;
            }
            let mut progressed = false;
            for key in orphans {
                if let Ok(obj) = self.delete(&key, &DeleteOptions::default())
                    && !obj["metadata"]["deletionTimestamp"].is_string()
                {
                    progressed = true;
                }
            }
            if !progressed {
                return;
            }
        }
    }
}

fn check_type(res: Res, obj: &Value) -> Result<(), ApiError> {
    let expected = res.api_version();
    if let Some(kind) = obj["kind"].as_str()
        && !kind.is_empty()
        && kind != res.kind()
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({expected}) does not match the expected API version ({expected}) or the kind {kind} is not {}",
            res.kind()
        )));
    }
    if let Some(version) = obj["apiVersion"].as_str()
        && !version.is_empty()
        && version != expected
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({version}) does not match the expected API version ({expected})"
        )));
    }
    Ok(())
}

/// Secrets: `stringData` is written into `data` (base64) and not stored.
fn merge_string_data(obj: &mut Value) -> Result<(), ApiError> {
    let Some(string_data) = obj.as_object_mut().and_then(|o| o.remove("stringData")) else {
        return Ok(());
    };
    if !obj["data"].is_object() {
        obj["data"] = json!({});
    }
    for (key, value) in string_map(&string_data) {
        let encoded =
            serde_json::to_value(k8s_openapi::ByteString(value.into_bytes())).map_err(|e| {
                ApiError::bad_request(format!("cannot encode stringData key {key}: {e}"))
            })?;
        obj["data"][key] = encoded;
    }
    Ok(())
}

/// The defaults the API server fills into a pod.
fn default_pod(pod: &mut Value) {
    let spec = &mut pod["spec"];
    if !spec.is_object() {
        return;
    }
    for (field, default) in [
        ("restartPolicy", json!("Always")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("securityContext", json!({})),
        ("enableServiceLinks", json!(true)),
        ("preemptionPolicy", json!("PreemptLowerPriority")),
        ("priority", json!(0)),
    ] {
        if spec.get(field).is_none_or(Value::is_null) {
            spec[field] = default;
        }
    }
    for list in ["initContainers", "containers"] {
        if let Some(containers) = spec[list].as_array_mut() {
            for c in containers {
                if !c.is_object() {
                    continue;
                }
                for (field, default) in [
                    ("terminationMessagePath", json!("/dev/termination-log")),
                    ("terminationMessagePolicy", json!("File")),
                    ("resources", json!({})),
                ] {
                    if c.get(field).is_none_or(Value::is_null) {
                        c[field] = default;
                    }
                }
                if c.get("imagePullPolicy").is_none_or(Value::is_null) {
                    let latest = c["image"]
                        .as_str()
                        .is_some_and(|i| !i.contains(':') || i.ends_with(":latest"));
                    c["imagePullPolicy"] = json!(if latest { "Always" } else { "IfNotPresent" });
                }
            }
        }
    }
    if pod["status"].is_null() {
        pod["status"] = json!({ "phase": "Pending", "qosClass": "BestEffort" });
    }
}

/// What the API server checks of a Lease's spec (`ValidateLeaseSpec`).
/// The API server's checks of a Secret's `type`: a `kubernetes.io/dockerconfigjson` Secret
/// holds a `.dockerconfigjson` key with a JSON document (`ValidateSecret`).
fn validate_secret_type(obj: &Value, causes: &mut Vec<Value>) {
    const KEY: &str = ".dockerconfigjson";
    if obj["type"].as_str() != Some("kubernetes.io/dockerconfigjson") {
        return;
    }
    let field = format!("data[{KEY}]");
    match obj["data"][KEY].as_str() {
        None => causes.push(cause("FieldValueRequired", &field, "Required value")),
        Some(encoded) => {
            use base64::Engine;
            let valid = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()
                .is_some_and(|bytes| serde_json::from_slice::<Value>(&bytes).is_ok());
            if !valid {
                causes.push(cause(
                    "FieldValueInvalid",
                    &field,
                    "Invalid value: \"<secret contents redacted>\": invalid character looking for beginning of value",
                ));
            }
        }
    }
}

fn validate_lease_spec(spec: &Value, causes: &mut Vec<Value>) {
    for field in ["leaseDurationSeconds", "leaseTransitions"] {
        let Some(value) = spec.get(field).filter(|v| !v.is_null()) else {
            continue;
        };
        let Some(n) = value.as_i64() else {
            causes.push(cause(
                "FieldValueInvalid",
                &format!("spec.{field}"),
                &format!("Invalid value: {value}: must be an integer"),
            ));
            continue;
        };
        let (ok, must) = if field == "leaseDurationSeconds" {
            (n > 0, "must be greater than 0")
        } else {
            (n >= 0, "must be greater than or equal to 0")
        };
        if !ok {
            causes.push(cause(
                "FieldValueInvalid",
                &format!("spec.{field}"),
                &format!("Invalid value: {n}: {must}"),
            ));
        }
    }
    for field in ["acquireTime", "renewTime"] {
        if let Some(value) = spec.get(field).filter(|v| !v.is_null())
            && value
                .as_str()
                .is_none_or(|t| chrono::DateTime::parse_from_rfc3339(t).is_err())
        {
            causes.push(cause(
                "FieldValueInvalid",
                &format!("spec.{field}"),
                &format!("Invalid value: {value}: must be an RFC 3339 time"),
            ));
        }
    }
}

/// The real API server only lets a few pod spec fields change.
fn check_pod_spec_update(name: &str, old: &Value, new: &Value) -> Result<(), ApiError> {
    let mut old = old.clone();
    let mut new = new.clone();
    for spec in [&mut old, &mut new] {
        if let Some(o) = spec.as_object_mut() {
            o.remove("activeDeadlineSeconds");
            o.remove("tolerations");
            o.remove("terminationGracePeriodSeconds");
        }
        for list in ["initContainers", "containers"] {
            if let Some(cs) = spec[list].as_array_mut() {
                for c in cs {
                    if let Some(c) = c.as_object_mut() {
                        c.remove("image");
                    }
                }
            }
        }
    }
    // The scheduler binding sets nodeName on an unscheduled pod.
    if old["nodeName"].is_null()
        && let Some(o) = new.as_object_mut()
    {
        o.remove("nodeName");
    }
    if old == new {
        return Ok(());
    }
    Err(invalid(
        Res::Pods,
        name,
        vec![cause(
            "FieldValueForbidden",
            "spec",
            "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
        )],
    ))
}

pub(crate) fn cause(reason: &str, field: &str, message: &str) -> Value {
    json!({ "reason": reason, "message": message, "field": field })
}

pub(crate) fn invalid(res: Res, name: &str, causes: Vec<Value>) -> ApiError {
    let parts: Vec<String> = causes
        .iter()
        .map(|c| {
            format!(
                "{}: {}",
                c["field"].as_str().unwrap_or(""),
                c["message"].as_str().unwrap_or("")
            )
        })
        .collect();
    let joined = if parts.len() == 1 {
        parts[0].clone()
    } else {
        format!("[{}]", parts.join(", "))
    };
    ApiError::new(
        422,
        "Invalid",
        format!("{} \"{name}\" is invalid: {joined}", res.kind()),
    )
    .details(json!({ "name": name, "kind": res.kind(), "causes": causes }))
}

const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
const QUALIFIED_NAME_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric())
}

fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(is_dns1123_subdomain) && !name.is_empty() && is_label_value(name)
}

fn validate(res: Res, obj: &Value) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    let meta = &obj["metadata"];
    let name = meta["name"].as_str().unwrap_or("");
    if name.is_empty() {
        causes.push(cause(
            "FieldValueRequired",
            "metadata.name",
            "Required value: name or generateName is required",
        ));
    } else if !is_dns1123_subdomain(name) {
        causes.push(cause(
            "FieldValueInvalid",
            "metadata.name",
            &format!("Invalid value: \"{name}\": {DNS1123_SUBDOMAIN_MSG}"),
        ));
    }
    for field in ["labels", "annotations"] {
        let Some(map) = meta[field].as_object() else {
            continue;
        };
        for (key, value) in map {
            if !is_qualified_name(key) {
                causes.push(cause(
                    "FieldValueInvalid",
                    &format!("metadata.{field}"),
                    &format!("Invalid value: \"{key}\": {QUALIFIED_NAME_MSG}"),
                ));
            }
            let Some(value) = value.as_str() else {
                causes.push(cause(
                    "FieldValueInvalid",
                    &format!("metadata.{field}"),
                    &format!("Invalid value: {value}: must be a string"),
                ));
                continue;
            };
            if field == "labels" && !is_label_value(value) {
                causes.push(cause(
                    "FieldValueInvalid",
                    "metadata.labels",
                    &format!("Invalid value: \"{value}\": {LABEL_VALUE_MSG}"),
                ));
            }
        }
    }
    if res == Res::Pods {
        validate_pod_spec(&obj["spec"], &mut causes);
    }
    if res == Res::Leases {
        validate_lease_spec(&obj["spec"], &mut causes);
    }
    if res == Res::Secrets {
        validate_secret_type(obj, &mut causes);
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(invalid(res, name, causes))
    }
}

fn validate_pod_spec(spec: &Value, causes: &mut Vec<Value>) {
    let volumes: Vec<&str> = spec["volumes"]
        .as_array()
        .map(|v| v.iter().filter_map(|v| v["name"].as_str()).collect())
        .unwrap_or_default();
    let containers = spec["containers"].as_array().filter(|c| !c.is_empty());
    if containers.is_none() {
        causes.push(cause(
            "FieldValueRequired",
            "spec.containers",
            "Required value",
        ));
    }
    let mut seen = Vec::new();
    for list in ["initContainers", "containers"] {
        let Some(containers) = spec[list].as_array() else {
            continue;
        };
        for (i, c) in containers.iter().enumerate() {
            let at = format!("spec.{list}[{i}]");
            match c["name"].as_str().filter(|n| !n.is_empty()) {
                None => causes.push(cause(
                    "FieldValueRequired",
                    &format!("{at}.name"),
                    "Required value",
                )),
                Some(name) if !is_dns1123_label(name) => causes.push(cause(
                    "FieldValueInvalid",
                    &format!("{at}.name"),
                    &format!("Invalid value: \"{name}\": {DNS1123_LABEL_MSG}"),
                )),
                Some(name) if seen.contains(&name) => causes.push(cause(
                    "FieldValueDuplicate",
                    &format!("{at}.name"),
                    &format!("Duplicate value: \"{name}\""),
                )),
                Some(name) => seen.push(name),
            }
            if c["image"].as_str().is_none_or(|i| i.trim().is_empty()) {
                causes.push(cause(
                    "FieldValueRequired",
                    &format!("{at}.image"),
                    "Required value",
                ));
            }
            for (j, m) in c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let vol = m["name"].as_str().unwrap_or("");
                if !volumes.contains(&vol) {
                    causes.push(cause(
                        "FieldValueNotFound",
                        &format!("{at}.volumeMounts[{j}].name"),
                        &format!("Not found: \"{vol}\""),
                    ));
                }
                if m["mountPath"].as_str().is_none_or(str::is_empty) {
                    causes.push(cause(
                        "FieldValueRequired",
                        &format!("{at}.volumeMounts[{j}].mountPath"),
                        "Required value",
                    ));
                }
            }
        }
    }
}

// --- selectors ---------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector` + `fieldSelector`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Selector {
    labels: Vec<LabelReq>,
    fields: Vec<(String, bool, String)>,
}

fn split_top_level(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    for ch in s.chars() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(ch);
    }
    parts.push(current);
    parts
        .into_iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_set(key: &str, rest: &str, whole: &str) -> Result<(String, Vec<String>), ApiError> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "unable to parse requirement: found '{whole}', expected: '('"
            ))
        })?;
    let values = inner
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    Ok((key.trim().to_owned(), values))
}

impl Selector {
    pub(crate) fn parse(
        res: Res,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Result<Self, ApiError> {
        let mut sel = Selector::default();
        for part in split_top_level(labels.unwrap_or("")) {
            let req = if let Some(key) = part.strip_prefix('!') {
                LabelReq::NotExists(key.trim().to_owned())
            } else if let Some((k, v)) = part.split_once("!=") {
                LabelReq::NotEq(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = part.split_once("==") {
                LabelReq::Eq(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = part.split_once('=') {
                LabelReq::Eq(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                let (k, vs) = parse_set(k, rest, &part)?;
                LabelReq::NotIn(k, vs)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                let (k, vs) = parse_set(k, rest, &part)?;
                LabelReq::In(k, vs)
            } else if is_qualified_name(&part) {
                LabelReq::Exists(part.clone())
            } else {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement: {part}"
                )));
            };
            sel.labels.push(req);
        }
        for part in split_top_level(fields.unwrap_or("")) {
            let (key, eq, value) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{part}'; can't understand '{part}'"
                )));
            };
            let key = key.trim();
            let supported: &[&str] = match res {
                Res::Pods => &[
                    "metadata.name",
                    "metadata.namespace",
                    "status.phase",
                    "spec.nodeName",
                    "spec.restartPolicy",
                    "spec.schedulerName",
                    "spec.serviceAccountName",
                    "status.podIP",
                ],
                Res::Secrets => &["metadata.name", "metadata.namespace", "type"],
                Res::Leases | Res::ConfigMaps | Res::PersistentVolumeClaims => {
                    &["metadata.name", "metadata.namespace"]
                }
                Res::Events => &[
                    "metadata.name",
                    "metadata.namespace",
                    "involvedObject.kind",
                    "involvedObject.name",
                    "involvedObject.namespace",
                    "involvedObject.uid",
                    "involvedObject.apiVersion",
                    "involvedObject.resourceVersion",
                    "involvedObject.fieldPath",
                    "reason",
                    "reportingComponent",
                    "source",
                    "type",
                ],
            };
            if !supported.contains(&key) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {key}"
                )));
            }
            sel.fields
                .push((key.to_owned(), eq, value.trim().to_owned()));
        }
        Ok(sel)
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        let labels = string_map(&obj["metadata"]["labels"]);
        let label_ok = self.labels.iter().all(|req| match req {
            LabelReq::Eq(k, v) => labels.get(k) == Some(v),
            LabelReq::NotEq(k, v) => labels.get(k) != Some(v),
            LabelReq::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            LabelReq::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            LabelReq::Exists(k) => labels.contains_key(k),
            LabelReq::NotExists(k) => !labels.contains_key(k),
        });
        label_ok
            && self.fields.iter().all(|(path, eq, want)| {
                let value = if path == "source" {
                    obj["source"]["component"].clone()
                } else {
                    path.split('.').fold(obj.clone(), |v, p| v[p].clone())
                };
                let value = match value {
                    Value::String(s) => s,
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (value == *want) == *eq
            })
    }
}

// --- patches -----------------------------------------------------------------------------------

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let obj = target.as_object_mut().unwrap();
    for (k, v) in patch {
        if v.is_null() {
            obj.remove(k);
        } else {
            merge_patch(obj.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// The merge key of the lists a strategic merge patch merges instead of replacing.
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "containerStatuses"
        | "initContainerStatuses" => "name",
        "volumeMounts" => "mountPath",
        "ports" => "containerPort",
        "ownerReferences" => "uid",
        "conditions" => "type",
        _ => return None,
    })
}

/// Strategic merge patch, as far as kubectl needs for pods and secrets: a JSON merge patch
/// except that lists of named things (containers, env, volumes, …) merge by their key and
/// `$patch: delete|replace` directives are honoured.
pub(crate) fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if patch.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = Value::Object(patch.clone());
        replaced.as_object_mut().unwrap().remove("$patch");
        *target = replaced;
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let obj = target.as_object_mut().unwrap();
    for (k, v) in patch {
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            obj.remove(k);
            continue;
        }
        match (merge_key(k), v.as_array(), obj.get_mut(k)) {
            (Some(key), Some(items), Some(Value::Array(existing))) => {
                for item in items {
                    let id = &item[key];
                    let pos = existing.iter().position(|e| &e[key] == id);
                    let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                    match (pos, delete) {
                        (Some(i), true) => {
                            existing.remove(i);
                        }
                        (Some(i), false) => strategic_merge_patch(&mut existing[i], item),
                        (None, true) => {}
                        (None, false) => existing.push(item.clone()),
                    }
                }
            }
            _ => strategic_merge_patch(obj.entry(k.clone()).or_insert(Value::Null), v),
        }
    }
}

/// RFC 6902 JSON patch.
pub(crate) fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch must be a list")?;
    for op in ops {
        let path = op["path"]
            .as_str()
            .ok_or("JSON patch operation without path")?;
        match op["op"].as_str().unwrap_or("") {
            "add" => pointer_add(target, path, op["value"].clone())?,
            "remove" => {
                pointer_remove(target, path)?;
            }
            "replace" => {
                let slot = target.pointer_mut(path).ok_or_else(|| {
                    format!("replace operation does not apply: doc is missing key: {path}")
                })?;
                *slot = op["value"].clone();
            }
            "test" => {
                if target.pointer(path) != Some(&op["value"]) {
                    return Err(format!("testing value {path} failed"));
                }
            }
            "move" | "copy" => {
                let from = op["from"].as_str().ok_or("move/copy without from")?;
                let value = if op["op"] == "move" {
                    pointer_remove(target, from)?
                } else {
                    target
                        .pointer(from)
                        .cloned()
                        .ok_or_else(|| format!("missing value at {from}"))?
                };
                pointer_add(target, path, value)?;
            }
            other => return Err(format!("unexpected JSON patch operation {other:?}")),
        }
    }
    Ok(())
}

fn split_pointer(path: &str) -> Result<(String, String), String> {
    let (parent, last) = path
        .rsplit_once('/')
        .ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    Ok((
        parent.to_owned(),
        last.replace("~1", "/").replace("~0", "~"),
    ))
}

fn pointer_add(target: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let (parent, last) = split_pointer(path)?;
    match target.pointer_mut(&parent) {
        Some(Value::Object(o)) => {
            o.insert(last, value);
            Ok(())
        }
        Some(Value::Array(a)) => {
            if last == "-" {
                a.push(value);
                return Ok(());
            }
            let i: usize = last.parse().map_err(|_| format!("bad index in {path}"))?;
            if i > a.len() {
                return Err(format!("index out of range in {path}"));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!(
            "add operation does not apply: doc is missing path: {path}"
        )),
    }
}

fn pointer_remove(target: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    let missing = || format!("remove operation does not apply: doc is missing path: {path}");
    match target.pointer_mut(&parent) {
        Some(Value::Object(o)) => o.remove(&last).ok_or_else(missing),
        Some(Value::Array(a)) => {
            let i: usize = last.parse().map_err(|_| missing())?;
            (i < a.len()).then(|| a.remove(i)).ok_or_else(missing)
        }
        _ => Err(missing()),
    }
}

// --- ids ---------------------------------------------------------------------------------------

pub(crate) fn uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// The 5 characters `generateName` appends (the API server's alphabet: no vowels, no 0/1/3).
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}
