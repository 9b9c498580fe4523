//! Fault and latency injection for the proxy in front of the real kube-apiserver,
//! [`crate::kube::proxy::FaultProxy::faults`].

use std::sync::Mutex;
use std::time::Duration;

/// Which resource requests a fault applies to. Discovery and `/version` are never failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matcher {
    verb: Option<String>,
    resource: Option<String>,
}

impl Matcher {
    /// Every resource request.
    pub fn any() -> Self {
        Self::default()
    }

    /// Only this Kubernetes verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub fn verb(mut self, verb: &str) -> Self {
        self.verb = Some(verb.to_string());
        self
    }

    /// Only this resource, as RBAC names it: `pods` (not its subresources) or `pods/status`.
    pub fn resource(mut self, resource: &str) -> Self {
        self.resource = Some(resource.to_string());
        self
    }

    fn matches(&self, verb: &str, resource: &str) -> bool {
        self.verb.as_deref().is_none_or(|v| v == verb)
            && self.resource.as_deref().is_none_or(|r| r == resource)
    }
}

#[derive(Debug)]
struct Rule {
    matcher: Matcher,
    remaining: u32,
    code: u16,
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<Rule>,
    latency: Duration,
    injected: u64,
}

/// Shared fault settings of one server.
#[derive(Debug)]
pub struct Faults {
    state: Mutex<State>,
    /// Bumped by [`Faults::drop_watches`]; every open watch response ends when it changes.
    watch_drops: tokio::sync::watch::Sender<u64>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            watch_drops: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Faults {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers the next `count` requests that `matcher` selects with a `Status` of HTTP `code`.
    /// Rules are consumed in the order they were added.
    pub fn fail_next(&self, matcher: Matcher, count: u32, code: u16) {
        self.lock().rules.push(Rule {
            matcher,
            remaining: count,
            code,
        });
    }

    /// Delays every request (discovery included) by `latency` before it is handled.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Drops all pending failures and the latency.
    pub fn clear(&self) {
        let mut state = self.lock();
        state.rules.clear();
        state.latency = Duration::ZERO;
    }

    /// How many requests were failed on purpose so far.
    pub fn injected(&self) -> u64 {
        self.lock().injected
    }

    /// Ends every watch response open now (its stream just stops, as when a connection to the
    /// server drops); later watches are not affected.
    pub fn drop_watches(&self) {
        self.watch_drops.send_modify(|drops| *drops += 1);
    }

    /// Changes at each [`Self::drop_watches`]: a watch response ends when it does.
    pub(crate) fn watch_drops(&self) -> tokio::sync::watch::Receiver<u64> {
        self.watch_drops.subscribe()
    }

    pub(crate) fn latency(&self) -> Duration {
        self.lock().latency
    }

    /// The status code to fail this request with, if a rule selects it.
    pub(crate) fn take(&self, verb: &str, resource: &str) -> Option<u16> {
        let mut state = self.lock();
        let rule = state
            .rules
            .iter_mut()
            .find(|r| r.remaining > 0 && r.matcher.matches(verb, resource))?;
        rule.remaining -= 1;
        let code = rule.code;
        state.rules.retain(|r| r.remaining > 0);
        state.injected += 1;
        Some(code)
    }
}

/// The Kubernetes verb and resource (as RBAC names it: `pods`, `pods/status`) of a request to
/// a resource path, `None` for discovery, `/version`, `/readyz` and the like. A collection
/// `GET` with `watch=true` (or `1`) is a `watch`.
pub fn classify(method: &str, path: &str, query: Option<&str>) -> Option<(String, String)> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let rest = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _namespace, tail @ ..] if !tail.is_empty() => tail,
        _ => rest,
    };
    let (resource, named) = match rest {
        [plural] => ((*plural).to_owned(), false),
        [plural, _name] => ((*plural).to_owned(), true),
        [plural, _name, sub] => (format!("{plural}/{sub}"), true),
        _ => return None,
    };
    let watching = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .any(|(key, value)| key == "watch" && matches!(value.as_ref(), "true" | "1"));
    let verb = match (method, named) {
        ("GET", true) => "get",
        ("GET", false) if watching => "watch",
        ("GET", false) => "list",
        ("POST", false) => "create",
        ("PUT", true) => "update",
        ("PATCH", true) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return None,
    };
    Some((verb.to_owned(), resource))
}
