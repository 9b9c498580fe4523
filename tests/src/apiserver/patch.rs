//! The four PATCH flavours, applied to objects held as JSON.

use serde_json::{Map, Value, json};

use super::error::ApiError;

/// The PATCH content types the server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/json-patch+json` (RFC 6902).
    Json,
    /// `application/merge-patch+json` (RFC 7386).
    Merge,
    /// `application/strategic-merge-patch+json`.
    Strategic,
    /// `application/apply-patch+yaml` (server-side apply, simplified).
    Apply,
}

impl PatchType {
    /// Parses a Content-Type header value, ignoring parameters such as charset.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        match content_type.split(';').next().unwrap_or("").trim() {
            "application/json-patch+json" => Some(Self::Json),
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Parses a patch body: JSON for all types, YAML as well for apply.
pub fn parse_body(patch_type: PatchType, body: &[u8]) -> Result<Value, ApiError> {
    match serde_json::from_slice(body) {
        Ok(value) => Ok(value),
        Err(json_err) if patch_type == PatchType::Apply => {
            let text = std::str::from_utf8(body)
                .map_err(|e| ApiError::bad_request(format!("apply body is not UTF-8: {e}")))?;
            serde_saphyr::from_str(text).map_err(|e| {
                ApiError::bad_request(format!("error decoding YAML: {e} (as JSON: {json_err})"))
            })
        }
        Err(e) => Err(ApiError::bad_request(format!("error decoding patch: {e}"))),
    }
}

/// Applies a JSON, merge or strategic patch to `target`. Apply patches go through [`apply_merge`].
pub fn apply_patch(
    patch_type: PatchType,
    target: &mut Value,
    patch: &Value,
) -> Result<(), ApiError> {
    match patch_type {
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(target, &ops).map_err(|e| ApiError {
                code: 422,
                reason: "Invalid".into(),
                message: format!(
                    "the server rejected our request due to an error in our request: {e}"
                ),
                details: None,
            })
        }
        PatchType::Merge => {
            json_patch::merge(target, patch);
            Ok(())
        }
        PatchType::Strategic => {
            merge(target, patch, &mut Vec::new(), Mode::Strategic);
            Ok(())
        }
        PatchType::Apply => {
            apply_merge(target, patch);
            Ok(())
        }
    }
}

/// Simplified server-side apply: maps merge, keyed lists merge by key, other lists are replaced.
/// Fields the manager applied before but omits now are not removed.
pub fn apply_merge(target: &mut Value, applied: &Value) {
    merge(target, applied, &mut Vec::new(), Mode::Apply);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Strategic,
    Apply,
}

/// The patch merge key of the list at `path` (field names, list indices left out),
/// from the Kubernetes API types' `patchMergeKey` tags.
fn merge_key(path: &[String]) -> Option<&'static str> {
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    match path.as_slice() {
        ["status", "conditions"] | ["status", "addresses"] => Some("type"),
        ["metadata", "ownerReferences"] => Some("uid"),
        [
            "spec",
            "containers" | "initContainers" | "ephemeralContainers" | "volumes",
        ] => Some("name"),
        ["spec", "containers" | "initContainers", "env"] => Some("name"),
        ["spec", "containers" | "initContainers", "volumeMounts"] => Some("mountPath"),
        ["spec", "containers" | "initContainers", "ports"] => Some("containerPort"),
        [
            "status",
            "containerStatuses" | "initContainerStatuses" | "ephemeralContainerStatuses",
        ] => Some("name"),
        _ => None,
    }
}

/// Lists of scalars that strategic merge unions (`patchStrategy:"merge"` without a key).
fn is_primitive_merge_list(path: &[String]) -> bool {
    path == ["metadata", "finalizers"]
}

fn directive(value: &Value) -> Option<&str> {
    value.get("$patch").and_then(Value::as_str)
}

/// A patch fragment with all `$`-directives removed, for inserting as new content.
fn strip_directives(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn merge(target: &mut Value, patch: &Value, path: &mut Vec<String>, mode: Mode) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if mode == Mode::Strategic && directive(patch) == Some("replace") {
        *target = strip_directives(patch);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target_map) = target else {
        unreachable!("just made an object")
    };
    for (key, value) in patch_map {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(remove)) =
                (target_map.get_mut(field), value)
            {
                list.retain(|item| !remove.contains(item));
            }
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        path.push(key.clone());
        match value {
            Value::Null => {
                target_map.remove(key);
            }
            Value::Object(_) if mode == Mode::Strategic && directive(value) == Some("delete") => {
                target_map.remove(key);
            }
            Value::Object(_) => {
                merge(
                    target_map.entry(key.clone()).or_insert(Value::Null),
                    value,
                    path,
                    mode,
                );
            }
            Value::Array(items) => {
                let slot = target_map.entry(key.clone()).or_insert(Value::Null);
                merge_list(slot, items, path, mode);
            }
            scalar => {
                target_map.insert(key.clone(), scalar.clone());
            }
        }
        path.pop();
    }
}

fn merge_list(target: &mut Value, items: &[Value], path: &mut Vec<String>, mode: Mode) {
    let replace_all =
        mode == Mode::Strategic && items.iter().any(|i| directive(i) == Some("replace"));
    let current = match target {
        Value::Array(current) if !replace_all => current,
        _ => {
            *target = Value::Array(
                items
                    .iter()
                    .filter(|i| directive(i).is_none())
                    .map(strip_directives)
                    .collect(),
            );
            return;
        }
    };
    if let Some(key) = merge_key(path) {
        for item in items {
            let id = item.get(key);
            let existing = current
                .iter()
                .position(|c| id.is_some() && c.get(key) == id);
            match (
                existing,
                mode == Mode::Strategic && directive(item) == Some("delete"),
            ) {
                (Some(i), true) => {
                    current.remove(i);
                }
                (None, true) => {}
                (Some(i), false) => merge(&mut current[i], item, path, mode),
                (None, false) => current.push(strip_directives(item)),
            }
        }
    } else if mode == Mode::Strategic && is_primitive_merge_list(path) {
        for item in items {
            if !current.contains(item) {
                current.push(item.clone());
            }
        }
    } else {
        *current = items.iter().map(strip_directives).collect();
    }
}

/// A minimal `fieldsV1` set describing what an apply configuration touches.
pub fn fields_v1(applied: &Value) -> Value {
    fn walk(value: &Value, path: &mut Vec<String>) -> Value {
        match value {
            Value::Object(map) => {
                let mut out = Map::new();
                for (k, v) in map {
                    path.push(k.clone());
                    out.insert(format!("f:{k}"), walk(v, path));
                    path.pop();
                }
                Value::Object(out)
            }
            Value::Array(items) => match merge_key(path) {
                Some(key) => {
                    let mut out = Map::new();
                    for item in items {
                        if let Some(id) = item.get(key) {
                            out.insert(format!("k:{}", json!({ key: id })), walk(item, path));
                        }
                    }
                    Value::Object(out)
                }
                None => json!({}),
            },
            _ => json!({}),
        }
    }
    let mut body = applied.clone();
    if let Some(map) = body.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        for key in ["name", "namespace", "resourceVersion", "managedFields"] {
            meta.remove(key);
        }
        if meta.is_empty() {
            body.as_object_mut().map(|m| m.remove("metadata"));
        }
    }
    walk(&body, &mut Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strategic(mut target: Value, patch: Value) -> Value {
        apply_patch(PatchType::Strategic, &mut target, &patch).unwrap();
        target
    }

    #[test]
    fn strategic_merges_conditions_by_type() {
        let pod = json!({ "status": { "conditions": [
            { "type": "Ready", "status": "True" },
            { "type": "PodScheduled", "status": "True" },
        ] } });
        let out = strategic(
            pod,
            json!({ "status": { "conditions": [
                { "type": "Ready", "status": "False" },
                { "type": "DisruptionTarget", "status": "True" },
                { "type": "PodScheduled", "$patch": "delete" },
            ] }, "$setElementOrder/conditions": [] }),
        );
        assert_eq!(
            out,
            json!({ "status": { "conditions": [
                { "type": "Ready", "status": "False" },
                { "type": "DisruptionTarget", "status": "True" },
            ] } })
        );
    }

    #[test]
    fn strategic_maps_and_lists() {
        let obj = json!({
            "metadata": { "annotations": { "a": "1", "b": "2" }, "finalizers": ["x"] },
            "spec": { "tolerations": [{ "key": "k" }] },
        });
        let out = strategic(
            obj,
            json!({
                "metadata": { "annotations": { "a": null, "c": "3" }, "finalizers": ["y"] },
                "spec": { "tolerations": [{ "key": "z" }] },
            }),
        );
        assert_eq!(
            out["metadata"]["annotations"],
            json!({ "b": "2", "c": "3" })
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["x", "y"]));
        assert_eq!(out["spec"]["tolerations"], json!([{ "key": "z" }]));
        let out = strategic(
            out,
            json!({ "metadata": { "$deleteFromPrimitiveList/finalizers": ["x"] } }),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["y"]));
    }

    #[test]
    fn json_and_merge_patches() {
        let mut obj = json!({ "a": { "b": 1 }, "l": [1, 2] });
        let ops = json!([
            { "op": "test", "path": "/a/b", "value": 1 },
            { "op": "replace", "path": "/a/b", "value": 2 },
            { "op": "add", "path": "/l/-", "value": 3 },
            { "op": "remove", "path": "/l/0" },
        ]);
        apply_patch(PatchType::Json, &mut obj, &ops).unwrap();
        assert_eq!(obj, json!({ "a": { "b": 2 }, "l": [2, 3] }));
        let failing = json!([{ "op": "test", "path": "/a/b", "value": 9 }]);
        assert_eq!(
            apply_patch(PatchType::Json, &mut obj, &failing)
                .unwrap_err()
                .code,
            422
        );
        apply_patch(PatchType::Merge, &mut obj, &json!({ "a": null, "l": [7] })).unwrap();
        assert_eq!(obj, json!({ "l": [7] }));
    }

    #[test]
    fn apply_replaces_unkeyed_lists_and_records_keys() {
        let mut obj = json!({ "metadata": { "finalizers": ["x"] }, "status": { "conditions": [{ "type": "Ready" }] } });
        let applied = json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p", "finalizers": ["y"] },
            "status": { "conditions": [{ "type": "DisruptionTarget", "status": "True" }] },
        });
        apply_merge(&mut obj, &applied);
        assert_eq!(obj["metadata"]["finalizers"], json!(["y"]));
        assert_eq!(obj["status"]["conditions"].as_array().unwrap().len(), 2);
        let fields = fields_v1(&applied);
        assert!(
            fields["f:status"]["f:conditions"]["k:{\"type\":\"DisruptionTarget\"}"]["f:status"]
                .is_object()
        );
        assert!(fields["f:metadata"]["f:finalizers"].is_object());
    }

    #[test]
    fn content_types() {
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchType::Merge)
        );
        assert_eq!(PatchType::from_content_type("text/plain"), None);
        let yaml = b"apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n";
        assert_eq!(
            parse_body(PatchType::Apply, yaml).unwrap()["metadata"]["name"],
            "p"
        );
    }
}
