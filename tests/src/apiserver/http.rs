//! HTTP routing: Kubernetes REST paths, verbs, watch streaming, tables for kubectl.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

use super::error::ApiError;
use super::patch::{self, PatchType};
use super::resources::{self, ResourceDef};
use super::select::Selector;
use super::store::{Change, ChangeType, DeleteOptions, Store, Subresource};
use super::validate;
use crate::faults::Faults;

/// One request as the server saw it, for tests that count attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    /// Path and query as sent.
    pub uri: String,
    /// Kubernetes verb and resource (e.g. `get`, `pods/status`) for resource requests.
    pub verb: Option<String>,
    pub resource: Option<String>,
    pub status: u16,
    pub at: Instant,
}

pub(super) struct App {
    pub store: Store,
    pub faults: Faults,
    pub log: Mutex<Vec<RequestRecord>>,
    pub bookmark_interval: Duration,
    pub address: String,
    pub shutdown: watch::Receiver<bool>,
}

pub(super) fn router(app: Arc<App>) -> Router {
    Router::new().fallback(handle).with_state(app)
}

pub(super) fn json_response(code: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).expect("JSON values serialize");
    (code, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

type Query = HashMap<String, String>;

/// How many requests [`App::log`] keeps; the older half is dropped when full.
const LOG_LIMIT: usize = 100_000;

struct Request<'a> {
    method: &'a Method,
    path: &'a str,
    query: Query,
    headers: &'a HeaderMap,
    body: &'a [u8],
}

/// Verb and resource of a resource request, filled in once routing knows them.
#[derive(Default)]
struct Routed {
    verb: Option<&'static str>,
    resource: Option<String>,
}

async fn handle(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let latency = app.faults.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let query: Query = uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let request = Request {
        method: &method,
        path: uri.path(),
        query,
        headers: &headers,
        body: &body,
    };
    let mut routed = Routed::default();
    let response =
        dispatch(&app, &request, &mut routed).unwrap_or_else(IntoResponse::into_response);
    tracing::debug!(%method, %uri, status = response.status().as_u16(), "request");
    let mut log = app.log.lock().unwrap_or_else(|e| e.into_inner());
    // Bounded so a long-running hand-started server does not grow without end.
    if log.len() >= LOG_LIMIT {
        log.drain(..LOG_LIMIT / 2);
    }
    log.push(RequestRecord {
        method: method.to_string(),
        uri: uri.to_string(),
        verb: routed.verb.map(str::to_string),
        resource: routed.resource,
        status: response.status().as_u16(),
        at: Instant::now(),
    });
    response
}

fn dispatch(app: &Arc<App>, req: &Request, routed: &mut Routed) -> Result<Response, ApiError> {
    let segments: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
    let discovery = match segments.as_slice() {
        ["version"] => Some(Some(resources::version())),
        ["api"] => Some(Some(resources::api_versions(&app.address))),
        ["api", "v1"] => Some(resources::api_resource_list("", "v1")),
        ["apis"] => Some(Some(resources::api_group_list())),
        ["apis", group] => Some(resources::api_group_doc(group)),
        ["apis", group, version] => Some(resources::api_resource_list(group, version)),
        ["openapi", "v3"] => Some(Some(resources::openapi_v3_root())),
        ["openapi", "v3", path @ ..] => Some(resources::openapi_v3_doc(&path.join("/"))),
        _ => None,
    };
    if let Some(doc) = discovery {
        if *req.method != Method::GET {
            return Err(ApiError::method_not_allowed());
        }
        let doc = doc.ok_or_else(ApiError::no_route)?;
        return Ok(json_response(StatusCode::OK, &doc));
    }
    match segments.as_slice() {
        ["api", "v1", rest @ ..] => resource_request(app, req, "", "v1", rest, routed),
        ["apis", group, version, rest @ ..] => {
            resource_request(app, req, group, version, rest, routed)
        }
        // Includes /openapi/v2: kubectl copes with its absence.
        _ => Err(ApiError::no_route()),
    }
}

fn resource_request(
    app: &Arc<App>,
    req: &Request,
    group: &str,
    version: &str,
    rest: &[&str],
    routed: &mut Routed,
) -> Result<Response, ApiError> {
    let (namespace, rest) = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(*ns), tail),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return Err(ApiError::no_route()),
    };
    let def = resources::find(group, version, plural).ok_or_else(ApiError::no_route)?;
    if (!def.namespaced && namespace.is_some())
        || (def.namespaced && name.is_some() && namespace.is_none())
    {
        return Err(ApiError::no_route());
    }
    let sub = match sub {
        None => Subresource::Main,
        Some("status") if def.status => Subresource::Status,
        Some(_) => return Err(ApiError::no_route()),
    };
    let watching = matches!(
        req.query.get("watch").map(String::as_str),
        Some("true" | "1")
    );
    let verb = match (req.method.as_str(), name) {
        ("GET", Some(_)) => "get",
        ("GET", None) if watching => "watch",
        ("GET", None) => "list",
        ("POST", None) => "create",
        ("PUT", Some(_)) => "update",
        ("PATCH", Some(_)) => "patch",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        _ => return Err(ApiError::method_not_allowed()),
    };
    if sub == Subresource::Status && !matches!(verb, "get" | "update" | "patch") {
        return Err(ApiError::method_not_allowed());
    }
    let resource = match sub {
        Subresource::Main => def.plural.to_string(),
        Subresource::Status => format!("{}/status", def.plural),
    };
    routed.verb = Some(verb);
    routed.resource = Some(resource.clone());
    if let Some(code) = app.faults.take(verb, &resource) {
        return Err(ApiError::injected(code));
    }

    let store = &app.store;
    let table = wants_table(req.headers);
    let selector = || {
        Selector::parse(
            req.query.get("fieldSelector").map(String::as_str),
            req.query.get("labelSelector").map(String::as_str),
        )
    };
    let name = name.unwrap_or_default();
    let ok = |object: &Value| Ok(json_response(StatusCode::OK, object));
    match verb {
        "get" => {
            let object = store.get(def, namespace, name)?;
            if table {
                ok(&to_table(def, &[object], None))
            } else {
                ok(&object)
            }
        }
        "list" => {
            let (items, rv) = store.list(def, namespace, &selector()?);
            if table {
                ok(&to_table(def, &items, Some(rv)))
            } else {
                ok(&list(def, items, rv))
            }
        }
        "watch" => watch_response(app, def, namespace, selector()?, &req.query, table),
        "create" => {
            let object = parse_json(req.body)?;
            validate::create(def, namespace, &object)?;
            let created = store.create(def, namespace, object)?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        "update" => ok(&store.replace(def, namespace, name, sub, parse_json(req.body)?)?),
        "patch" => {
            let content_type = req
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let patch_type = PatchType::from_content_type(content_type)
                .ok_or_else(|| ApiError::unsupported_media_type(content_type))?;
            let body = patch::parse_body(patch_type, req.body)?;
            let manager = req.query.get("fieldManager").map(String::as_str);
            ok(&store.patch(def, namespace, name, sub, patch_type, &body, manager)?)
        }
        "delete" => ok(&store.delete(def, namespace, name, &delete_options(req)?)?),
        "deletecollection" => {
            let options = delete_options(req)?;
            let (items, _) = store.list(def, namespace, &selector()?);
            let mut deleted = Vec::new();
            for item in items {
                let ns = item["metadata"]["namespace"].as_str();
                let name = item["metadata"]["name"].as_str().unwrap_or_default();
                // Objects deleted meanwhile are simply skipped.
                if let Ok(gone) = store.delete(def, ns, name, &options) {
                    deleted.push(gone);
                }
            }
            ok(&list(def, deleted, store.current_rv()))
        }
        _ => unreachable!("verbs are matched above"),
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding request body: {e}")))
}

fn delete_options(req: &Request) -> Result<DeleteOptions, ApiError> {
    let body: Value = if req.body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        parse_json(req.body)?
    };
    let text = |v: &Value| v.as_str().map(str::to_string);
    let grace_query = match req.query.get("gracePeriodSeconds") {
        Some(g) => Some(
            g.parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("invalid gracePeriodSeconds {g:?}")))?,
        ),
        None => None,
    };
    Ok(DeleteOptions {
        grace_period_seconds: body["gracePeriodSeconds"].as_i64().or(grace_query),
        precondition_uid: text(&body["preconditions"]["uid"]),
        precondition_resource_version: text(&body["preconditions"]["resourceVersion"]),
    })
}

fn list(def: &ResourceDef, items: Vec<Value>, rv: u64) -> Value {
    json!({
        "kind": format!("{}List", def.kind),
        "apiVersion": def.api_version(),
        "metadata": { "resourceVersion": rv.to_string() },
        "items": items,
    })
}

/// kubectl's human output asks for `application/json;as=Table;...` first.
fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("as=Table"))
}

fn age(object: &Value) -> String {
    let created = object["metadata"]["creationTimestamp"]
        .as_str()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok());
    let Some(created) = created else {
        return "<unknown>".into();
    };
    let secs = jiff::Timestamp::now().as_second() - created.as_second();
    match secs.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// A `meta.k8s.io/v1` Table with a few columns per resource, enough for `kubectl get`.
fn to_table(def: &ResourceDef, objects: &[Value], rv: Option<u64>) -> Value {
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    let columns: &[&str] = match def.plural {
        "pods" => &["Name", "Status", "Node", "Age"],
        "nodes" => &["Name", "Status", "Age"],
        "events" => &["Name", "Reason", "Age"],
        "leases" => &["Name", "Holder", "Age"],
        "endpointslices" => &["Name", "AddressType", "Ports", "Endpoints", "Age"],
        _ => &["Name", "Age"],
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let extra = match def.plural {
                "pods" => vec![text(&o["status"]["phase"]), text(&o["spec"]["nodeName"])],
                "nodes" => {
                    let ready = o["status"]["conditions"]
                        .as_array()
                        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                        .map(|c| {
                            if c["status"] == "True" {
                                "Ready"
                            } else {
                                "NotReady"
                            }
                        });
                    vec![ready.unwrap_or("Unknown").to_string()]
                }
                "events" => vec![text(&o["reason"])],
                "leases" => vec![text(&o["spec"]["holderIdentity"])],
                "endpointslices" => vec![
                    text(&o["addressType"]),
                    endpoint_slice_ports(o),
                    endpoint_slice_addresses(o),
                ],
                _ => vec![],
            };
            let mut cells = vec![o["metadata"]["name"].clone()];
            cells.extend(extra.into_iter().map(Value::String));
            cells.push(Value::String(age(o)));
            json!({
                "cells": cells,
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o["metadata"],
                },
            })
        })
        .collect();
    let column_definitions: Vec<Value> = columns
        .iter()
        .map(|c| {
            let format = if *c == "Name" { "name" } else { "" };
            json!({ "name": c, "type": "string", "format": format, "description": c, "priority": 0 })
        })
        .collect();
    let mut table = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "columnDefinitions": column_definitions,
        "rows": rows,
    });
    if let Some(rv) = rv {
        table["metadata"]["resourceVersion"] = json!(rv.to_string());
    }
    table
}

/// The PORTS column of `kubectl get endpointslices`: `<unset>` without ports.
fn endpoint_slice_ports(slice: &Value) -> String {
    let ports: Vec<String> = slice["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|port| {
            port["port"]
                .as_i64()
                .map_or("<unset>".into(), |p| p.to_string())
        })
        .collect();
    if ports.is_empty() {
        "<unset>".into()
    } else {
        ports.join(",")
    }
}

/// The ENDPOINTS column: the first three addresses, then how many more.
fn endpoint_slice_addresses(slice: &Value) -> String {
    let addresses: Vec<&str> = slice["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|endpoint| endpoint["addresses"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    match addresses.len() {
        0 => "<unset>".into(),
        n if n <= 3 => addresses.join(","),
        n => format!("{} + {} more...", addresses[..3].join(","), n - 3),
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object }))
        .expect("JSON values serialize");
    line.push(b'\n');
    Bytes::from(line)
}

/// Parameters of one watch stream.
struct WatchSpec {
    def: &'static ResourceDef,
    namespace: Option<String>,
    selector: Selector,
    bookmarks: bool,
    initial_events_end: bool,
    table: bool,
    timeout: Duration,
    bookmark_interval: Duration,
}

impl WatchSpec {
    fn selects(&self, object: &Value) -> bool {
        let ns_ok = match &self.namespace {
            Some(ns) if self.def.namespaced => object["metadata"]["namespace"].as_str() == Some(ns),
            _ => true,
        };
        ns_ok && self.selector.matches(object)
    }

    fn render(&self, object: &Value) -> Value {
        if self.table {
            to_table(self.def, std::slice::from_ref(object), None)
        } else {
            object.clone()
        }
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Bytes {
        let mut object = json!({
            "kind": self.def.kind,
            "apiVersion": self.def.api_version(),
            "metadata": { "resourceVersion": rv.to_string() },
        });
        if initial_events_end {
            object["metadata"]["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        event_line("BOOKMARK", &object)
    }

    /// The event line a change becomes for this watch; selector transitions turn into ADDED/DELETED.
    fn translate(&self, change: &Change) -> Option<Bytes> {
        if change.resource != self.def.plural {
            return None;
        }
        let was = change.previous.as_ref().is_some_and(|p| self.selects(p));
        let is = self.selects(&change.object);
        let kind = match (change.change, was, is) {
            (ChangeType::Added, _, true) => "ADDED",
            (ChangeType::Modified, true, true) => "MODIFIED",
            (ChangeType::Modified, false, true) => "ADDED",
            (ChangeType::Modified, true, false) => "DELETED",
            (ChangeType::Deleted, _, true) => "DELETED",
            _ => return None,
        };
        Some(event_line(kind, &self.render(&change.object)))
    }
}

fn watch_response(
    app: &Arc<App>,
    def: &'static ResourceDef,
    namespace: Option<&str>,
    selector: Selector,
    query: &Query,
    table: bool,
) -> Result<Response, ApiError> {
    let flag = |key: &str| matches!(query.get(key).map(String::as_str), Some("true" | "1"));
    let send_initial = flag("sendInitialEvents");
    let from = match query.get("resourceVersion").map(String::as_str) {
        _ if send_initial => None,
        None | Some("" | "0") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        ),
    };
    let timeout = match query.get("timeoutSeconds") {
        Some(t) => t
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
        None => 1800,
    };
    let spec = WatchSpec {
        def,
        namespace: namespace.map(str::to_string),
        selector,
        bookmarks: flag("allowWatchBookmarks"),
        initial_events_end: send_initial,
        table,
        timeout: Duration::from_secs(timeout),
        bookmark_interval: app.bookmark_interval,
    };
    let (tx, mut rx) = mpsc::channel::<Bytes>(256);
    match app.store.watch_start(def, from) {
        // Like the real server: HTTP 200, then one ERROR event.
        Err(expired) => {
            tx.try_send(event_line("ERROR", &expired.status()))
                .expect("a fresh channel has room");
        }
        Ok(start) => {
            tokio::spawn(stream_changes(
                spec,
                start,
                tx,
                app.shutdown.clone(),
                app.faults.watch_drops(),
            ));
        }
    }
    let stream =
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|b| b.map(Ok::<_, Infallible>)));
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("static response parts are valid"))
}

async fn stream_changes(
    spec: WatchSpec,
    start: super::store::WatchStart,
    tx: mpsc::Sender<Bytes>,
    mut shutdown: watch::Receiver<bool>,
    mut drops: watch::Receiver<u64>,
) {
    let mut rv = start.rv;
    let mut receiver = start.receiver;
    let mut lines: Vec<Bytes> = start
        .initial
        .iter()
        .filter(|o| spec.selects(o))
        .map(|o| event_line("ADDED", &spec.render(o)))
        .collect();
    if spec.initial_events_end && spec.bookmarks {
        lines.push(spec.bookmark(rv, true));
    }
    for change in &start.replay {
        rv = change.rv;
        lines.extend(spec.translate(change));
    }
    for line in lines {
        if tx.send(line).await.is_err() {
            return;
        }
    }
    let deadline = tokio::time::sleep(spec.timeout);
    tokio::pin!(deadline);
    let mut ticks = tokio::time::interval_at(
        tokio::time::Instant::now() + spec.bookmark_interval,
        spec.bookmark_interval,
    );
    loop {
        let line = tokio::select! {
            _ = &mut deadline => return,
            _ = shutdown.changed() => return,
            _ = drops.changed() => return,
            _ = tx.closed() => return,
            _ = ticks.tick(), if spec.bookmarks => Some(spec.bookmark(rv, false)),
            received = receiver.recv() => match received {
                Ok(change) if change.rv <= rv => None,
                Ok(change) => {
                    rv = change.rv;
                    spec.translate(&change)
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = tx.send(event_line("ERROR", &ApiError::expired(rv, rv + 1).status())).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if let Some(line) = line
            && tx.send(line).await.is_err()
        {
            return;
        }
    }
}
