//! What `/healthz` answers: healthy unless something is down, and then why.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
};

/// A process' health, shared by what can make it unhealthy (a supervised task that failed, a
/// probe lost) and the HTTP endpoint that reports it. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// What is down, and why.
    down: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Health {
    /// Marks `what` down (again, with a new reason) until [`Self::set_up`].
    pub fn set_down(&self, what: &str, why: impl Into<String>) {
        self.lock().insert(what.to_owned(), why.into());
    }

    pub fn set_up(&self, what: &str) {
        self.lock().remove(what);
    }

    /// Why the process is unhealthy, one reason per thing down; empty when healthy.
    pub fn problems(&self) -> Vec<String> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        // The map is valid whatever a panicking holder did: health must still answer.
        self.down.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_until_set_up_with_the_latest_reason() {
        let health = Health::default();
        assert!(health.problems().is_empty());
        let shared = health.clone();
        shared.set_down("probes", "first");
        shared.set_down("probes", "second");
        shared.set_down("events", "task `events` ended");
        assert_eq!(health.problems(), ["task `events` ended", "second"]);
        shared.set_up("probes");
        assert_eq!(health.problems(), ["task `events` ended"]);
    }
}
