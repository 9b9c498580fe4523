//! The object store: JSON objects keyed by (resource, namespace, name), one global
//! resourceVersion counter, a bounded change history for watches.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use jiff::{SignedDuration, Timestamp};
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::error::ApiError;
use super::patch::{self, PatchType};
use super::resources::ResourceDef;
use super::select::Selector;

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One committed write, as kept in the history and sent to watchers.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub resource: &'static str,
    pub change: ChangeType,
    /// The object after the write (for deletes: the last state, with the deletion's resourceVersion).
    pub object: Value,
    /// The object before the write, so watchers can turn selector transitions into ADDED/DELETED.
    pub previous: Option<Value>,
}

/// Which part of an object a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    Main,
    Status,
}

/// The parts of `DeleteOptions` the server honours.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeleteOptions {
    pub grace_period_seconds: Option<i64>,
    pub precondition_uid: Option<String>,
    pub precondition_resource_version: Option<String>,
}

/// A watch's starting point, taken under the store lock so nothing is missed or repeated.
pub struct WatchStart {
    /// Current objects to send as synthetic ADDED events.
    pub initial: Vec<Value>,
    /// Changes from the history newer than the requested resourceVersion.
    pub replay: Vec<Arc<Change>>,
    /// Later changes.
    pub receiver: broadcast::Receiver<Arc<Change>>,
    /// The resourceVersion the initial state and replay bring the watcher up to.
    pub rv: u64,
}

type Key = (&'static str, String, String);

struct State {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Arc<Change>>,
    /// Changes up to and including this resourceVersion have left the history.
    compacted: u64,
}

pub struct Store {
    state: Mutex<State>,
    changes: broadcast::Sender<Arc<Change>>,
    history_limit: usize,
}

/// The current time in the RFC 3339 form Kubernetes uses for `Time`.
pub fn now() -> String {
    format_time(Timestamp::now())
}

fn format_time(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    bytes
}

fn new_uid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Five characters like the real server appends for `generateName`.
fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    random_bytes::<5>()
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

fn metadata_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    object["metadata"]
        .as_object_mut()
        .expect("metadata was just made an object")
}

/// DNS-1123 subdomain, the rule most resource names follow.
fn valid_name(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 253
        && name.starts_with(alnum)
        && name.ends_with(alnum)
        && name.chars().all(|c| alnum(c) || c == '-' || c == '.')
}

/// Checks `apiVersion`/`kind` against the resource, filling them in when absent.
fn check_type(def: &ResourceDef, object: &mut Value, name: &str) -> Result<(), ApiError> {
    if !object.is_object() {
        return Err(ApiError::bad_request(
            "the request body is not a JSON object",
        ));
    }
    let api_version = def.api_version();
    for (field, want) in [("apiVersion", api_version.as_str()), ("kind", def.kind)] {
        match object.get(field) {
            None | Some(Value::Null) => object[field] = json!(want),
            Some(Value::String(s)) if s == want => {}
            Some(other) => {
                return Err(ApiError::invalid(
                    def.group,
                    def.kind,
                    name,
                    field,
                    &format!("Invalid value: {other}: must be {want:?}"),
                ));
            }
        }
    }
    Ok(())
}

/// The parts of the real server's validation of a resource's body that clients meet: for
/// EndpointSlices, the address type (required, one of three, immutable) and each endpoint's
/// addresses (1 to 100, of that type).
fn validate(
    def: &ResourceDef,
    object: &Value,
    old: Option<&Value>,
    name: &str,
) -> Result<(), ApiError> {
    if def.plural != "endpointslices" {
        return Ok(());
    }
    let invalid =
        |field: &str, why: String| ApiError::invalid(def.group, def.kind, name, field, &why);
    let address_type = match object.get("addressType") {
        None | Some(Value::Null) => {
            return Err(invalid("addressType", "Required value".into()));
        }
        Some(Value::String(t)) if matches!(t.as_str(), "IPv4" | "IPv6" | "FQDN") => t.as_str(),
        Some(other) => {
            return Err(invalid(
                "addressType",
                format!(
                    "Unsupported value: {other}: supported values: \"FQDN\", \"IPv4\", \"IPv6\""
                ),
            ));
        }
    };
    if let Some(old) = old
        && old["addressType"] != object["addressType"]
    {
        return Err(invalid(
            "addressType",
            format!("Invalid value: {:?}: field is immutable", address_type),
        ));
    }
    let endpoints = object["endpoints"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (i, endpoint) in endpoints.iter().enumerate() {
        let addresses = endpoint["addresses"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if addresses.is_empty() || addresses.len() > 100 {
            return Err(invalid(
                &format!("endpoints[{i}].addresses"),
                "Invalid value: must contain between 1 and 100 addresses".into(),
            ));
        }
        for (j, address) in addresses.iter().enumerate() {
            let text = address.as_str().unwrap_or_default();
            let fits = match address_type {
                "IPv4" => text.parse::<std::net::Ipv4Addr>().is_ok(),
                "IPv6" => text.parse::<std::net::Ipv6Addr>().is_ok(),
                _ => valid_name(text),
            };
            if !fits {
                return Err(invalid(
                    &format!("endpoints[{i}].addresses[{j}]"),
                    format!("Invalid value: {address}: must be a valid {address_type} address"),
                ));
            }
        }
    }
    Ok(())
}

fn without(object: &Value, top: &[&str], meta: &[&str]) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        for key in top {
            map.remove(*key);
        }
    }
    if let Some(map) = copy.get_mut("metadata").and_then(Value::as_object_mut) {
        for key in meta {
            map.remove(*key);
        }
    }
    copy
}

/// Builds the stored object for an update of `old` with `new`, as the real strategies do:
/// identity fields are kept, a main-resource write keeps the status, a status write keeps everything else.
fn prepare_update(
    def: &ResourceDef,
    old: &Value,
    mut new: Value,
    sub: Subresource,
) -> Result<Value, ApiError> {
    let name = meta_str(old, "name").unwrap_or_default().to_string();
    check_type(def, &mut new, &name)?;
    if let Some(rv) = meta_str(&new, "resourceVersion").filter(|rv| !rv.is_empty())
        && Some(rv) != meta_str(old, "resourceVersion")
    {
        return Err(ApiError::conflict(
            def.group,
            def.plural,
            &name,
            "the object has been modified; please apply your changes to the latest version and try again",
        ));
    }
    if sub == Subresource::Status {
        let mut out = old.clone();
        match new.get("status") {
            Some(status) => out["status"] = status.clone(),
            None => {
                out.as_object_mut().map(|m| m.remove("status"));
            }
        }
        return Ok(out);
    }
    if def.status {
        match old.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => {
                new.as_object_mut().map(|m| m.remove("status"));
            }
        }
    }
    let old_meta = old["metadata"].as_object().cloned().unwrap_or_default();
    let meta = metadata_mut(&mut new);
    for key in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old_meta.get(key) {
            Some(v) => meta.insert(key.to_string(), v.clone()),
            None => meta.remove(key),
        };
    }
    if !meta.contains_key("managedFields")
        && let Some(mf) = old_meta.get("managedFields")
    {
        meta.insert("managedFields".into(), mf.clone());
    }
    if def.generation {
        let body = |o: &Value| without(o, &["metadata", "status"], &[]);
        if body(old) != body(&new) {
            let generation = old_meta
                .get("generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            metadata_mut(&mut new).insert("generation".into(), json!(generation + 1));
        }
    }
    validate(def, &new, Some(old), &name)?;
    Ok(new)
}

/// Records (replacing any earlier entry of the same manager and subresource) an Apply in managedFields.
fn record_apply(
    object: &mut Value,
    def: &ResourceDef,
    manager: &str,
    sub: Subresource,
    applied: &Value,
) {
    let subresource = match sub {
        Subresource::Main => None,
        Subresource::Status => Some("status"),
    };
    let mut entry = json!({
        "manager": manager,
        "operation": "Apply",
        "apiVersion": def.api_version(),
        "time": now(),
        "fieldsType": "FieldsV1",
        "fieldsV1": patch::fields_v1(applied),
    });
    if let Some(s) = subresource {
        entry["subresource"] = json!(s);
    }
    let meta = metadata_mut(object);
    let mut entries = meta
        .get("managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    entries.retain(|e| {
        !(e["manager"] == manager
            && e["operation"] == "Apply"
            && e.get("subresource").and_then(Value::as_str) == subresource)
    });
    entries.push(entry);
    meta.insert("managedFields".into(), Value::Array(entries));
}

impl State {
    fn key(def: &ResourceDef, namespace: Option<&str>, name: &str) -> Key {
        let ns = if def.namespaced {
            namespace.unwrap_or("")
        } else {
            ""
        };
        (def.plural, ns.to_string(), name.to_string())
    }

    fn current(
        &self,
        def: &ResourceDef,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<&Value, ApiError> {
        self.objects
            .get(&Self::key(def, namespace, name))
            .ok_or_else(|| ApiError::not_found(def.group, def.plural, name))
    }

    /// Stores `object` (or removes it for deletes) under a new resourceVersion and publishes the change.
    fn commit(
        &mut self,
        store: &Store,
        def: &'static ResourceDef,
        key: Key,
        change: ChangeType,
        mut object: Value,
    ) -> Value {
        self.rv += 1;
        metadata_mut(&mut object).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let previous = if change == ChangeType::Deleted {
            self.objects.remove(&key)
        } else {
            self.objects.insert(key, object.clone())
        };
        let event = Arc::new(Change {
            rv: self.rv,
            resource: def.plural,
            change,
            object: object.clone(),
            previous,
        });
        self.history.push_back(event.clone());
        while self.history.len() > store.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = store.changes.send(event);
        object
    }

    /// Commits an update computed by [`prepare_update`]: a no-op writes nothing, and an object
    /// marked for deletion whose finalizers are gone is removed.
    fn finish_update(
        &mut self,
        store: &Store,
        def: &'static ResourceDef,
        old: &Value,
        new: Value,
    ) -> Value {
        let ignore_rv = |o: &Value| without(o, &[], &["resourceVersion"]);
        if ignore_rv(old) == ignore_rv(&new) {
            return old.clone();
        }
        let key = State::key(
            def,
            meta_str(&new, "namespace"),
            meta_str(&new, "name").unwrap_or_default(),
        );
        let finalizers_empty = new["metadata"]
            .get("finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty);
        if new["metadata"].get("deletionTimestamp").is_some() && finalizers_empty {
            self.commit(store, def, key, ChangeType::Deleted, new)
        } else {
            self.commit(store, def, key, ChangeType::Modified, new)
        }
    }

    fn create(
        &mut self,
        store: &Store,
        def: &'static ResourceDef,
        namespace: Option<&str>,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        let name = meta_str(&object, "name").unwrap_or_default().to_string();
        check_type(def, &mut object, &name)?;
        validate(def, &object, None, &name)?;
        let meta = metadata_mut(&mut object);
        let name = match (
            name.is_empty(),
            meta.get("generateName").and_then(Value::as_str),
        ) {
            (false, _) => name,
            (true, Some(prefix)) => format!("{prefix}{}", name_suffix()),
            (true, None) => {
                return Err(ApiError::invalid(
                    def.group,
                    def.kind,
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required",
                ));
            }
        };
        if !valid_name(&name) {
            return Err(ApiError::invalid(
                def.group,
                def.kind,
                &name,
                "metadata.name",
                "Invalid value: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
                 characters, '-' or '.', and must start and end with an alphanumeric character",
            ));
        }
        meta.insert("name".into(), json!(name));
        if def.namespaced {
            let ns = namespace.ok_or_else(ApiError::method_not_allowed)?;
            match meta.get("namespace").and_then(Value::as_str) {
                Some(body_ns) if !body_ns.is_empty() && body_ns != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => meta.insert("namespace".into(), json!(ns)),
            };
        } else {
            meta.remove("namespace");
        }
        let key = State::key(def, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(def.group, def.plural, &name));
        }
        meta.insert("uid".into(), json!(new_uid()));
        meta.insert("creationTimestamp".into(), json!(now()));
        for key in [
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            meta.remove(key);
        }
        if def.generation {
            meta.insert("generation".into(), json!(1));
        }
        Ok(self.commit(store, def, key, ChangeType::Added, object))
    }
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        let (changes, _) = broadcast::channel(history_limit.max(1024));
        Self {
            state: Mutex::new(State {
                objects: BTreeMap::new(),
                rv: 0,
                history: VecDeque::new(),
                compacted: 0,
            }),
            changes,
            history_limit: history_limit.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent JSON behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(
        &self,
        def: &ResourceDef,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.lock().current(def, namespace, name).cloned()
    }

    /// Matching objects (all namespaces when `namespace` is None) and the current resourceVersion.
    pub fn list(
        &self,
        def: &ResourceDef,
        namespace: Option<&str>,
        selector: &Selector,
    ) -> (Vec<Value>, u64) {
        let state = self.lock();
        let items = state
            .objects
            .iter()
            .filter(|((plural, ns, _), object)| {
                *plural == def.plural
                    && (!def.namespaced || namespace.is_none_or(|want| want == ns))
                    && selector.matches(object)
            })
            .map(|(_, object)| object.clone())
            .collect();
        (items, state.rv)
    }

    pub fn create(
        &self,
        def: &'static ResourceDef,
        namespace: Option<&str>,
        object: Value,
    ) -> Result<Value, ApiError> {
        self.lock().create(self, def, namespace, object)
    }

    /// PUT of an existing object (main resource or status).
    pub fn replace(
        &self,
        def: &'static ResourceDef,
        namespace: Option<&str>,
        name: &str,
        sub: Subresource,
        object: Value,
    ) -> Result<Value, ApiError> {
        match meta_str(&object, "name") {
            None | Some("") => {
                return Err(ApiError::invalid(
                    def.group,
                    def.kind,
                    name,
                    "metadata.name",
                    "Required value: name is required",
                ));
            }
            Some(body_name) if body_name != name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({name})"
                )));
            }
            Some(_) => {}
        }
        let mut state = self.lock();
        let old = state.current(def, namespace, name)?.clone();
        let new = prepare_update(def, &old, object, sub)?;
        Ok(state.finish_update(self, def, &old, new))
    }

    /// PATCH; an apply patch on the main resource of a missing object creates it.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        def: &'static ResourceDef,
        namespace: Option<&str>,
        name: &str,
        sub: Subresource,
        patch_type: PatchType,
        body: &Value,
        field_manager: Option<&str>,
    ) -> Result<Value, ApiError> {
        if patch_type == PatchType::Apply {
            let mut applied = body.clone();
            check_type(def, &mut applied, name)?;
            if meta_str(body, "name") != Some(name) {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({}) does not match the name on the URL ({name})",
                    meta_str(body, "name").unwrap_or_default()
                )));
            }
            if field_manager.is_none_or(str::is_empty) {
                return Err(ApiError::bad_request(
                    "PATCH, application/apply-patch+yaml requests require fieldManager",
                ));
            }
        }
        let mut state = self.lock();
        let old = match state.current(def, namespace, name) {
            Ok(old) => old.clone(),
            Err(_) if patch_type == PatchType::Apply && sub == Subresource::Main => {
                let mut object = json!({});
                patch::apply_merge(&mut object, body);
                record_apply(
                    &mut object,
                    def,
                    field_manager.unwrap_or_default(),
                    sub,
                    body,
                );
                return state.create(self, def, namespace, object);
            }
            Err(e) => return Err(e),
        };
        let mut patched = old.clone();
        patch::apply_patch(patch_type, &mut patched, body)?;
        // As the real server's update: a UID in the new object is a precondition.
        if let Some(want) = meta_str(&patched, "uid")
            && Some(want) != meta_str(&old, "uid")
        {
            return Err(ApiError::conflict(
                def.group,
                def.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {want}, UID in object meta: {}",
                    meta_str(&old, "uid").unwrap_or_default()
                ),
            ));
        }
        let mut new = prepare_update(def, &old, patched, sub)?;
        if patch_type == PatchType::Apply {
            record_apply(&mut new, def, field_manager.unwrap_or_default(), sub, body);
        }
        Ok(state.finish_update(self, def, &old, new))
    }

    /// DELETE of one object. Objects with finalizers only get a deletionTimestamp;
    /// others are removed at once whatever the grace period (there is no kubelet to wait for).
    pub fn delete(
        &self,
        def: &'static ResourceDef,
        namespace: Option<&str>,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        let mut state = self.lock();
        let old = state.current(def, namespace, name)?.clone();
        let preconditions = [
            (
                "UID",
                options.precondition_uid.as_deref(),
                meta_str(&old, "uid"),
            ),
            (
                "ResourceVersion",
                options.precondition_resource_version.as_deref(),
                meta_str(&old, "resourceVersion"),
            ),
        ];
        for (what, want, have) in preconditions {
            if let Some(want) = want
                && Some(want) != have
            {
                return Err(ApiError::conflict(
                    def.group,
                    def.plural,
                    name,
                    &format!(
                        "Precondition failed: {what} in precondition: {want}, {what} in object meta: {}",
                        have.unwrap_or_default()
                    ),
                ));
            }
        }
        let grace = options.grace_period_seconds.unwrap_or(0).max(0);
        let mut doomed = old.clone();
        let meta = metadata_mut(&mut doomed);
        if !meta.contains_key("deletionTimestamp") {
            let when = Timestamp::now()
                .checked_add(SignedDuration::from_secs(grace))
                .unwrap_or_else(|_| Timestamp::now());
            meta.insert("deletionTimestamp".into(), json!(format_time(when)));
            meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
        }
        let has_finalizers = meta
            .get("finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            return Ok(state.finish_update(self, def, &old, doomed));
        }
        let key = State::key(def, namespace, name);
        Ok(state.commit(self, def, key, ChangeType::Deleted, doomed))
    }

    /// Test helper write: stores `object` as given (status included), creating or replacing it.
    pub fn put(&self, def: &'static ResourceDef, mut object: Value) -> Result<Value, ApiError> {
        let namespace = meta_str(&object, "namespace").map(str::to_string);
        let name = meta_str(&object, "name").unwrap_or_default().to_string();
        let mut state = self.lock();
        let Ok(old) = state.current(def, namespace.as_deref(), &name).cloned() else {
            if def.namespaced && namespace.is_none() {
                return Err(ApiError::bad_request(
                    "a namespaced object needs metadata.namespace",
                ));
            }
            return state.create(self, def, namespace.as_deref(), object);
        };
        check_type(def, &mut object, &name)?;
        let meta = metadata_mut(&mut object);
        for key in ["uid", "creationTimestamp"] {
            if let Some(v) = old["metadata"].get(key) {
                meta.insert(key.into(), v.clone());
            }
        }
        meta.remove("resourceVersion");
        Ok(state.finish_update(self, def, &old, object))
    }

    /// Takes a watch's starting point: `from` None means "now, with the current objects as ADDED".
    pub fn watch_start(
        &self,
        def: &ResourceDef,
        from: Option<u64>,
    ) -> Result<WatchStart, ApiError> {
        let state = self.lock();
        let receiver = self.changes.subscribe();
        match from {
            None => Ok(WatchStart {
                initial: state
                    .objects
                    .iter()
                    .filter(|((plural, _, _), _)| *plural == def.plural)
                    .map(|(_, o)| o.clone())
                    .collect(),
                replay: Vec::new(),
                receiver,
                rv: state.rv,
            }),
            Some(rv) if rv < state.compacted => Err(ApiError::expired(rv, state.compacted + 1)),
            Some(rv) => Ok(WatchStart {
                initial: Vec::new(),
                replay: state
                    .history
                    .iter()
                    .filter(|c| c.rv > rv)
                    .cloned()
                    .collect(),
                receiver,
                rv,
            }),
        }
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }
}
