//! `kubernetes.pod_patch`: the administrator's last word on every build pod, as a JSON merge
//! patch (RFC 7386, replaces lists), a strategic merge patch (Kubernetes': lists of named
//! things such as containers, volumes, env and mounts merge by their key, so a patch can add
//! one) or a JSON patch (RFC 6902: `add`, `remove`, `replace`… at a path). The same three types
//! as gitlab-runner's `pod_spec` patches.

use serde::Deserialize;

/// How `kubernetes.pod_patch` is applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatchType {
    /// RFC 7386: objects merge, `null` removes, anything else (lists too) replaces.
    #[default]
    Merge,
    /// Kubernetes' strategic merge patch: as `merge`, but lists with a merge key merge by it.
    Strategic,
    /// RFC 6902: a list of operations.
    Json,
}

/// The merge key of the Pod's lists that Kubernetes merges strategically, by field name. Every
/// other list is replaced, as by the API server (`tolerations` has no merge key there).
const MERGE_KEYS: &[(&str, &str)] = &[
    ("containers", "name"),
    ("initContainers", "name"),
    ("ephemeralContainers", "name"),
    ("volumes", "name"),
    ("imagePullSecrets", "name"),
    ("env", "name"),
    ("volumeMounts", "mountPath"),
    ("volumeDevices", "devicePath"),
    ("ports", "containerPort"),
    ("hostAliases", "ip"),
    ("topologySpreadConstraints", "topologyKey"),
    ("resourceClaims", "name"),
    ("schedulingGates", "name"),
    ("ownerReferences", "uid"),
];

/// Applies `patch` of type `kind` to `target` (a Pod as JSON).
///
/// # Errors
/// A JSON patch that is not a list of operations or whose operation fails (a path that does
/// not exist, a failed `test`); the message names the operation.
pub(super) fn apply(
    kind: PatchType,
    target: &mut serde_json::Value,
    patch: &serde_json::Value,
) -> Result<(), String> {
    match kind {
        PatchType::Merge => merge(target, patch, false),
        PatchType::Strategic => merge(target, patch, true),
        PatchType::Json => {
            let operations: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| format!("is not a JSON patch (a list of operations): {e}"))?;
            json_patch::patch(target, &operations).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// What `patch` must be for `kind`: an object, or a list for a JSON patch.
pub(super) fn check_shape(kind: PatchType, patch: &serde_json::Value) -> Result<(), String> {
    match kind {
        PatchType::Merge | PatchType::Strategic if !patch.is_object() => {
            Err("must be a JSON object (a merge patch of the Pod)".into())
        }
        PatchType::Json => serde_json::from_value::<json_patch::Patch>(patch.clone())
            .map(|_| ())
            .map_err(|e| format!("must be a list of JSON patch operations: {e}")),
        _ => Ok(()),
    }
}

/// RFC 7386 merge of `patch` into `target`; with `strategic`, lists with a merge key merge.
fn merge(target: &mut serde_json::Value, patch: &serde_json::Value, strategic: bool) {
    let serde_json::Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(serde_json::Map::new());
    }
    let serde_json::Value::Object(map) = target else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
            continue;
        }
        let merge_key = MERGE_KEYS
            .iter()
            .find(|(field, _)| field == key)
            .map(|(_, merge_key)| *merge_key);
        match (strategic, merge_key, value, map.get_mut(key)) {
            (
                true,
                Some(merge_key),
                serde_json::Value::Array(items),
                Some(serde_json::Value::Array(existing)),
            ) => merge_list(existing, items, merge_key),
            _ => merge(
                map.entry(key.clone()).or_insert(serde_json::Value::Null),
                value,
                strategic,
            ),
        }
    }
}

/// Each of `items` merged into the element of `existing` with the same `merge_key` value, or
/// appended; `{"$patch": "delete"}` on an item removes the element.
fn merge_list(existing: &mut Vec<serde_json::Value>, items: &[serde_json::Value], merge_key: &str) {
    for item in items {
        let key = item.get(merge_key);
        let position = key.and_then(|key| {
            existing
                .iter()
                .position(|element| element.get(merge_key) == Some(key))
        });
        let delete = item.get("$patch").and_then(|p| p.as_str()) == Some("delete");
        match (position, delete) {
            (Some(index), true) => {
                existing.remove(index);
            }
            (None, true) => {}
            (Some(index), false) => merge(&mut existing[index], item, true),
            (None, false) => existing.push(item.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod() -> serde_json::Value {
        json!({"spec": {
            "containers": [{"name": "build", "image": "alpine",
                "volumeMounts": [{"name": "builds", "mountPath": "/builds"}]}],
            "volumes": [{"name": "builds", "emptyDir": {}}, {"name": "job", "secret": {"secretName": "x"}}],
            "tolerations": [{"key": "a", "operator": "Exists"}]
        }})
    }

    #[test]
    fn a_merge_patch_replaces_lists() {
        let mut target = pod();
        apply(
            PatchType::Merge,
            &mut target,
            &json!({"spec": {"volumes": [{"name": "extra", "emptyDir": {}}]}}),
        )
        .unwrap();
        assert_eq!(target["spec"]["volumes"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_strategic_patch_adds_a_volume_and_keeps_kilns() {
        let mut target = pod();
        apply(
            PatchType::Strategic,
            &mut target,
            &json!({"spec": {
                "volumes": [{"name": "extra", "emptyDir": {}}],
                "containers": [{"name": "build",
                    "volumeMounts": [{"name": "extra", "mountPath": "/extra"}]}],
                "tolerations": [{"key": "b", "operator": "Exists"}]
            }}),
        )
        .unwrap();
        let volumes: Vec<&str> = target["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(volumes, ["builds", "job", "extra"]);
        let build = &target["spec"]["containers"][0];
        assert_eq!(
            build["image"], "alpine",
            "the container is merged, not replaced"
        );
        assert_eq!(build["volumeMounts"].as_array().unwrap().len(), 2);
        assert_eq!(
            target["spec"]["tolerations"],
            json!([{"key": "b", "operator": "Exists"}])
        );
    }

    #[test]
    fn a_strategic_patch_deletes_by_key() {
        let mut target = pod();
        apply(
            PatchType::Strategic,
            &mut target,
            &json!({"spec": {"volumes": [{"name": "job", "$patch": "delete"}]}}),
        )
        .unwrap();
        assert_eq!(target["spec"]["volumes"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_json_patch_appends_and_a_failing_operation_is_an_error() {
        let mut target = pod();
        apply(
            PatchType::Json,
            &mut target,
            &json!([{"op": "add", "path": "/spec/volumes/-", "value": {"name": "extra", "emptyDir": {}}}]),
        )
        .unwrap();
        assert_eq!(target["spec"]["volumes"].as_array().unwrap().len(), 3);
        let error = apply(
            PatchType::Json,
            &mut target,
            &json!([{"op": "remove", "path": "/spec/nothing"}]),
        )
        .unwrap_err();
        assert!(!error.is_empty());
        assert!(check_shape(PatchType::Json, &json!({"spec": {}})).is_err());
        assert!(check_shape(PatchType::Strategic, &json!([])).is_err());
    }
}
