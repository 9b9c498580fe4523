//! `fieldSelector` and `labelSelector` matching.

use serde_json::Value;

use super::error::ApiError;

/// One parsed requirement of a field or label selector.
#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Both selectors of a list or watch request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector {
    fields: Vec<Requirement>,
    labels: Vec<Requirement>,
}

impl Selector {
    pub fn parse(field: Option<&str>, label: Option<&str>) -> Result<Self, ApiError> {
        Ok(Self {
            fields: field.map(parse_field).transpose()?.unwrap_or_default(),
            labels: label.map(parse_label).transpose()?.unwrap_or_default(),
        })
    }

    pub fn matches(&self, object: &Value) -> bool {
        let field_ok = self.fields.iter().all(|r| match r {
            Requirement::Equals(path, want) => field_value(object, path) == *want,
            Requirement::NotEquals(path, want) => field_value(object, path) != *want,
            _ => false,
        });
        let labels = object.pointer("/metadata/labels");
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        let label_ok = self.labels.iter().all(|r| match r {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        });
        field_ok && label_ok
    }
}

/// A dotted field path's value as a string; missing fields read as "" like in the real server.
fn field_value(object: &Value, path: &str) -> String {
    let pointer = format!("/{}", path.replace('.', "/"));
    match object.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn parse_field(selector: &str) -> Result<Vec<Requirement>, ApiError> {
    selector
        .split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .map(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                Ok(Requirement::NotEquals(k.trim().into(), v.trim().into()))
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Ok(Requirement::Equals(k.trim().into(), v.trim().into()))
            } else {
                Err(ApiError::bad_request(format!(
                    "invalid field selector: {term:?}: must be key=value, key==value or key!=value"
                )))
            }
        })
        .collect()
}

/// Splits at commas outside parentheses, so `a in (x,y),b` is two terms.
fn split_terms(selector: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_label(selector: &str) -> Result<Vec<Requirement>, ApiError> {
    let invalid = |term: &str| ApiError::bad_request(format!("invalid label selector: {term:?}"));
    split_terms(selector)
        .into_iter()
        .map(|term| {
            let set = |rest: &str| -> Result<Vec<String>, ApiError> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| invalid(term))?;
                Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
            };
            if let Some((k, rest)) = term.split_once(" notin ") {
                Ok(Requirement::NotIn(k.trim().into(), set(rest)?))
            } else if let Some((k, rest)) = term.split_once(" in ") {
                Ok(Requirement::In(k.trim().into(), set(rest)?))
            } else if let Some((k, v)) = term.split_once("!=") {
                Ok(Requirement::NotEquals(k.trim().into(), v.trim().into()))
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Ok(Requirement::Equals(k.trim().into(), v.trim().into()))
            } else if let Some(k) = term.strip_prefix('!') {
                Ok(Requirement::NotExists(k.trim().into()))
            } else if term.contains(['(', ')', ' ', '<', '>']) {
                Err(invalid(term))
            } else {
                Ok(Requirement::Exists(term.into()))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_and_label_selectors() {
        let pod = json!({
            "metadata": { "name": "p", "namespace": "ns", "labels": { "app": "web", "tier": "fe" } },
            "spec": { "nodeName": "node-b" },
        });
        let sel = |f: Option<&str>, l: Option<&str>| Selector::parse(f, l).unwrap().matches(&pod);
        assert!(sel(Some("spec.nodeName=node-b"), None));
        assert!(sel(
            Some("spec.nodeName==node-b,metadata.namespace=ns"),
            None
        ));
        assert!(!sel(Some("spec.nodeName!=node-b"), None));
        assert!(sel(Some("status.phase="), None));
        assert!(sel(None, Some("app=web,tier in (fe,be),!missing")));
        assert!(!sel(None, Some("app notin (web)")));
        assert!(sel(None, Some("tier")));
        assert!(Selector::parse(Some("nonsense"), None).is_err());
    }
}
