//! One retry policy for every Kubernetes API call lastgasp makes on its own initiative: one
//! reading of the API's errors ([`classify`]) and exponential back-off with jitter, so that
//! many writers (16 pods at a time per node, many nodes, agents on every node) hitting a
//! throttling or failing API server spread their retries instead of retrying in lockstep.
//!
//! - 404: the object is gone; the call is moot ([`Ended::Gone`]).
//! - 409: depends on the call ([`OnConflict`]).
//! - 429, 5xx and connection trouble: retried, without limit, after a growing delay.
//! - Any other 4xx (and errors the client raises itself): refused; retrying cannot help, so
//!   the caller gives up and logs why ([`Ended::Refused`]).

use std::{future::Future, time::Duration};

use backon::{BackoffBuilder as _, ExponentialBuilder};

/// What an API error means for a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// 404: the object (or its namespace) does not exist.
    Gone,
    /// 409: a conflict; [`OnConflict`] says what it means for the call.
    Conflict,
    /// 429, 5xx, or the connection failed: the same call may succeed later.
    Transient,
    /// Anything else: the call will never succeed as it is.
    Refused,
}

pub fn classify(error: &kube::Error) -> Class {
    match error {
        kube::Error::Api(status) => match status.code {
            404 => Class::Gone,
            409 => Class::Conflict,
            429 => Class::Transient,
            code if code >= 500 => Class::Transient,
            _ => Class::Refused,
        },
        kube::Error::HyperError(_) | kube::Error::Service(_) => Class::Transient,
        _ => Class::Refused,
    }
}

/// What a 409 means for a call, by its kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnConflict {
    /// The call names the object's UID (a precondition) or creates a name of its own: the
    /// object was replaced under the same name, or already exists. Nothing is left to write.
    Moot,
    /// The call carries a `resourceVersion`: another writer came first. Retrying the same
    /// body cannot succeed; the caller reads again and decides.
    Reread,
}

/// Why a call ended without succeeding.
#[derive(Debug, thiserror::Error)]
pub enum Ended {
    #[error("the object does not exist")]
    Gone,
    /// A 409 on an [`OnConflict::Moot`] call: the write has nothing left to do.
    #[error("moot: {0}")]
    Moot(String),
    /// A 409 on an [`OnConflict::Reread`] call.
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("refused: {0}")]
    Refused(kube::Error),
}

/// The back-off between retries of one call.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The controller's writes of an incident: fast first retries, because a panicked node's
    /// pods are waiting; at most 10 s apart.
    pub const WRITES: Self = Self {
        first: Duration::from_millis(100),
        max: Duration::from_secs(10),
    };
    /// The agent's conditions and Events: nothing waits on them, so they back off further.
    pub const SIGNALS: Self = Self {
        first: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };

    /// The delays before each retry: `first`, doubling to `max`, each stretched by a random
    /// factor in [1, 2) so that writers that failed together do not retry together. Endless.
    pub fn delays(self) -> impl Iterator<Item = Duration> + Send {
        ExponentialBuilder::new()
            .with_min_delay(self.first)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }
}

/// Runs `call` until it succeeds, retrying transient failures after [`Backoff::delays`].
/// `retrying` is told of every failure that will be retried and the delay before the retry
/// (to log and count it); failures that end the call are returned, not logged.
pub async fn call<T, F, Fut>(
    backoff: Backoff,
    on_conflict: OnConflict,
    mut call: F,
    mut retrying: impl FnMut(&kube::Error, Duration),
) -> Result<T, Ended>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut delays = backoff.delays();
    loop {
        let error = match call().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        match classify(&error) {
            Class::Gone => return Err(Ended::Gone),
            Class::Conflict => {
                let kube::Error::Api(status) = error else {
                    unreachable!("only API errors are conflicts")
                };
                return Err(match on_conflict {
                    OnConflict::Moot => Ended::Moot(status.message),
                    OnConflict::Reread => Ended::Conflict(status.message),
                });
            }
            Class::Refused => return Err(Ended::Refused(error)),
            Class::Transient => {
                let delay = delays.next().unwrap_or(backoff.max);
                retrying(&error, delay);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::{Arc, Mutex},
    };

    use kube::core::Status;
    use tokio::time::Instant;

    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(
            Status::failure(&format!("status {code}"), "Test").with_code(code),
        ))
    }

    /// A fake API: answers each call with the next scripted result and notes when it came.
    #[derive(Clone)]
    struct Fake {
        answers: Arc<Mutex<VecDeque<Result<&'static str, u16>>>>,
        calls: Arc<Mutex<Vec<Instant>>>,
    }

    impl Fake {
        fn new(answers: impl IntoIterator<Item = Result<&'static str, u16>>) -> Self {
            Self {
                answers: Arc::new(Mutex::new(answers.into_iter().collect())),
                calls: Arc::default(),
            }
        }

        async fn call(&self) -> Result<&'static str, kube::Error> {
            self.calls.lock().unwrap().push(Instant::now());
            match self
                .answers
                .lock()
                .unwrap()
                .pop_front()
                .expect("a scripted answer")
            {
                Ok(value) => Ok(value),
                Err(code) => Err(api_error(code)),
            }
        }

        fn gaps(&self) -> Vec<Duration> {
            let calls = self.calls.lock().unwrap();
            calls.windows(2).map(|pair| pair[1] - pair[0]).collect()
        }
    }

    #[test]
    fn errors_are_classified_once_for_every_writer() {
        for (code, class) in [
            (404, Class::Gone),
            (409, Class::Conflict),
            (429, Class::Transient),
            (500, Class::Transient),
            (503, Class::Transient),
            (400, Class::Refused),
            (403, Class::Refused),
            (422, Class::Refused),
        ] {
            assert_eq!(classify(&api_error(code)), class, "{code}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_with_growing_jittered_delays() {
        let fake = Fake::new([Err(503), Err(429), Err(500), Err(502), Ok("done")]);
        let mut told = Vec::new();
        let result = call(
            Backoff::WRITES,
            OnConflict::Moot,
            || fake.call(),
            |error, delay| told.push((classify(error), delay)),
        )
        .await;
        assert_eq!(result.unwrap(), "done");
        let gaps = fake.gaps();
        assert_eq!(gaps.len(), 4);
        // Each delay is the exponential step times a random factor in [1, 2).
        for (gap, step_ms) in gaps.iter().zip([100u64, 200, 400, 800]) {
            let step = Duration::from_millis(step_ms);
            assert!(
                *gap >= step && *gap < step * 2 + Duration::from_millis(1),
                "{gap:?} for a {step:?} step"
            );
        }
        // The timer rounds sleeps up to whole milliseconds.
        for ((_, delay), gap) in told.iter().zip(&gaps) {
            assert!(*gap >= *delay && *gap - *delay < Duration::from_millis(1));
        }
        assert!(told.iter().all(|(class, _)| *class == Class::Transient));
    }

    #[tokio::test(start_paused = true)]
    async fn delays_stop_growing_at_the_maximum() {
        let delays: Vec<Duration> = Backoff::SIGNALS.delays().take(12).collect();
        for delay in &delays[7..] {
            assert!(
                *delay >= Duration::from_secs(60) && *delay < Duration::from_secs(120),
                "{delays:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_spreads_writers_that_failed_together() {
        let first: Vec<Vec<Duration>> = (0..16)
            .map(|_| Backoff::WRITES.delays().take(3).collect())
            .collect();
        let distinct: std::collections::HashSet<_> = first.iter().collect();
        assert!(
            distinct.len() > 1,
            "16 writers share one schedule: {first:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn not_found_conflict_and_refusal_end_the_call_at_once() {
        for (code, on_conflict, expected) in [
            (404, OnConflict::Moot, "Gone"),
            (409, OnConflict::Moot, "Moot"),
            (409, OnConflict::Reread, "Conflict"),
            (403, OnConflict::Moot, "Refused"),
        ] {
            let fake = Fake::new([Err(code)]);
            let ended = call(
                Backoff::WRITES,
                on_conflict,
                || fake.call(),
                |_, _| panic!("{code} must not be retried"),
            )
            .await
            .unwrap_err();
            assert!(format!("{ended:?}").starts_with(expected), "{ended:?}");
            assert_eq!(fake.calls.lock().unwrap().len(), 1);
        }
    }
}
