//! Fault and latency injection, driven by tests through [`super::ApiServer::faults`].

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
#[derive(Debug, Default)]
pub struct Faults {
    state: Mutex<State>,
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

    pub(super) fn latency(&self) -> Duration {
        self.lock().latency
    }

    /// The status code to fail this request with, if a rule selects it.
    pub(super) fn take(&self, verb: &str, resource: &str) -> Option<u16> {
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
