//! Leader election on a `coordination.k8s.io/v1` Lease, with the semantics of client-go's
//! `leaderelection`: every controller replica campaigns, one holds the lease and renews it,
//! the others take it over once it has gone unrenewed for its duration, and only the holder
//! writes to Kubernetes.
//!
//! No two replicas report leadership at the same time, and this does not rest on synchronised
//! clocks:
//!
//! * A follower times another holder's lease from when it saw the lease record change, not
//!   from `renewTime`, so clock skew between nodes cannot make it take over early. (A replica
//!   that starts next to an abandoned lease therefore waits one lease duration, as in client-go.)
//! * A leader counts from before it sent its last successful renewal and stops reporting
//!   leadership after the renew deadline, two thirds of the lease duration, when no follower
//!   can yet consider the lease expired. A renewal that cannot finish by then counts as failed.
//! * Every write replaces the object with the resourceVersion that was read, so of two
//!   replicas racing for the same record only one succeeds; the other gets a 409.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tracing::{debug, info, warn};

use crate::kube_retry::{self, Backoff, Class, OnConflict};

#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// Namespace of the Lease, e.g. `lastgasp-system`.
    pub namespace: String,
    /// Name of the Lease, e.g. `lastgasp-controller`.
    pub lease_name: String,
    /// Who we are in `holderIdentity`; unique per replica, e.g. the pod name.
    pub identity: String,
    /// How long a holder's lease lasts without renewal before others may take it over.
    pub lease_duration: Duration,
    /// How often the leader renews.
    pub renew_interval: Duration,
    /// How often a follower tries to acquire, and a leader retries a failed renewal.
    pub retry_interval: Duration,
}

impl LeaderConfig {
    /// How long after the start of its last successful renewal a leader still reports leading.
    fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    /// `leaseDurationSeconds` to write: rounded up, so followers never wait less than we lead.
    fn lease_duration_seconds(&self) -> i32 {
        let secs = self
            .lease_duration
            .as_secs()
            .saturating_add(u64::from(self.lease_duration.subsec_nanos() > 0));
        i32::try_from(secs.max(1)).unwrap_or(i32::MAX)
    }
}

/// The identity to campaign with: `POD_NAME` (set it from the downward API), else `HOSTNAME`,
/// which Kubernetes sets to the pod name unless the pod spec overrides the hostname.
pub fn default_identity() -> Option<String> {
    ["POD_NAME", "HOSTNAME"]
        .into_iter()
        .filter_map(|var| std::env::var(var).ok())
        .find(|value| !value.is_empty())
}

/// A campaign for one lease.
pub struct LeaderElection {
    leading: watch::Receiver<bool>,
    stop: oneshot::Sender<()>,
}

impl LeaderElection {
    /// A campaign, and the future that runs it until [`Self::stop`] (the caller runs it, e.g.
    /// supervised). The watch channel says whether we lead right now. Dropping the value
    /// without [`Self::stop`] also ends the campaign and releases the lease, but nobody waits
    /// for that.
    pub fn new(
        client: kube::Client,
        config: LeaderConfig,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (leading_tx, leading) = watch::channel(false);
        let (stop, stop_rx) = oneshot::channel();
        let campaign = Campaign {
            api: Api::namespaced(client, &config.namespace),
            config,
            leading: leading_tx,
            observed: None,
        };
        (Self { leading, stop }, campaign.run(stop_rx))
    }

    /// Starts campaigning in a task of its own.
    pub fn start(client: kube::Client, config: LeaderConfig) -> Self {
        let (election, campaign) = Self::new(client, config);
        tokio::spawn(campaign);
        election
    }

    pub fn is_leader(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Releases the lease if held and waits for the campaign to end. `is_leader` turns false
    /// before the lease is released, so a successor cannot start writing while we still think
    /// we lead.
    pub async fn stop(self) {
        // Fails only if the campaign already ended.
        let _ = self.stop.send(());
        let mut leading = self.leading;
        // The campaign's end drops the sender.
        while leading.changed().await.is_ok() {}
    }
}

/// What one attempt to acquire or renew found.
enum Attempt {
    /// We hold the lease, written by this attempt.
    Leading,
    /// Someone else holds the lease (None: it is free, but another replica won the race).
    Following(Option<String>),
}

struct Campaign {
    api: Api<Lease>,
    config: LeaderConfig,
    leading: watch::Sender<bool>,
    /// Another holder's lease as we last saw it, and when we first saw it in that state.
    observed: Option<(LeaseSpec, Instant)>,
}

impl Campaign {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let renew_deadline = self.config.renew_deadline();
        let mut renew_interval = self.config.renew_interval;
        if renew_interval >= renew_deadline {
            renew_interval = renew_deadline / 2;
            warn!(
                configured = ?self.config.renew_interval,
                lease_duration = ?self.config.lease_duration,
                using = ?renew_interval,
                "renew interval too long for the lease duration; renewing more often"
            );
        }
        let identity = self.config.identity.clone();
        // While leading: when leadership ends unless renewed.
        let mut deadline: Option<Instant> = None;
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                deadline = None;
                if self.set_leading(false) {
                    warn!(%identity, "could not renew the lease in time; stepping down");
                }
            }
            let started = Instant::now();
            // A success after the renew deadline would not make us leader, so give up then.
            let attempt_deadline = deadline.unwrap_or(started + renew_deadline);
            let result = tokio::select! {
                _ = &mut stop => break,
                result = timeout_at(attempt_deadline, self.try_acquire_or_renew()) => result,
            };
            let next = match result {
                Ok(Ok(Attempt::Leading)) => {
                    deadline = Some(started + renew_deadline);
                    if self.set_leading(true) {
                        info!(%identity, lease = %self.config.lease_name, "gained leadership");
                    }
                    started + renew_interval
                }
                Ok(Ok(Attempt::Following(holder))) => {
                    deadline = None;
                    if self.set_leading(false) {
                        warn!(%identity, holder = holder.as_deref().unwrap_or(""), "lost leadership");
                    }
                    started + self.config.retry_interval
                }
                Ok(Err(e)) => {
                    warn!(%identity, error = %e, "leader election: lease request failed");
                    Instant::now() + self.config.retry_interval
                }
                Err(_) => {
                    warn!(%identity, "leader election: lease request timed out");
                    Instant::now() + self.config.retry_interval
                }
            };
            // Wake at the deadline if it comes first, to step down on time.
            let wake = deadline.map_or(next, |d| d.min(next));
            tokio::select! {
                _ = &mut stop => break,
                () = sleep_until(wake) => {}
            }
        }
        if self.set_leading(false) {
            info!(%identity, "stopping; gave up leadership");
        }
        match timeout(self.config.lease_duration, self.release()).await {
            Ok(Ok(true)) => info!(%identity, "released the lease"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warn!(%identity, error = %e, "could not release the lease"),
            Err(_) => warn!(%identity, "releasing the lease timed out"),
        }
    }

    /// Sets the reported leadership; true if it changed.
    fn set_leading(&self, leading: bool) -> bool {
        self.leading
            .send_if_modified(|current| std::mem::replace(current, leading) != leading)
    }

    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.lease_name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(self.config.lease_duration_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(e) if is_conflict(&e) => {
                    debug!("another replica created the lease first");
                    Ok(Attempt::Following(None))
                }
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_default();
        let holder = spec
            .holder_identity
            .clone()
            .filter(|holder| !holder.is_empty());
        let ours = holder.as_deref() == Some(self.config.identity.as_str());
        if let Some(holder) = holder.as_ref().filter(|_| !ours) {
            let first_seen = match &self.observed {
                Some((seen, at)) if seen == spec => *at,
                _ => {
                    let at = Instant::now();
                    self.observed = Some((spec.clone(), at));
                    at
                }
            };
            let duration = spec
                .lease_duration_seconds
                .and_then(|secs| u64::try_from(secs).ok())
                .map_or(self.config.lease_duration, Duration::from_secs);
            if first_seen.elapsed() < duration {
                return Ok(Attempt::Following(Some(holder.clone())));
            }
            info!(%holder, identity = %self.config.identity, "lease expired; taking over");
        }
        if !ours {
            spec.holder_identity = Some(self.config.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(self.config.lease_duration_seconds());
        match self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Leading),
            Err(e) if is_conflict(&e) => {
                debug!("the lease changed since we read it; someone else won the race");
                Ok(Attempt::Following(holder.filter(|_| !ours)))
            }
            Err(e) => Err(e),
        }
    }

    /// Clears `holderIdentity` if we hold the lease, so another replica can take it at once.
    /// True if released.
    async fn release(&self) -> Result<bool, kube::Error> {
        loop {
            let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await? else {
                return Ok(false);
            };
            let Some(spec) = lease
                .spec
                .as_mut()
                .filter(|spec| spec.holder_identity.as_deref() == Some(&self.config.identity))
            else {
                return Ok(false);
            };
            spec.holder_identity = None;
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            match self
                .api
                .replace(&self.config.lease_name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => return Ok(true),
                // Changed since we read it, e.g. by a renewal of ours still in flight: look again.
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

fn is_conflict(error: &kube::Error) -> bool {
    kube_retry::classify(error) == Class::Conflict
}

/// Label the leader puts on its own pod, so the Service for the UDP inputs can select it.
pub const LEADER_LABEL: &str = "lastgasp.io/leader";

/// Keeps `lastgasp.io/leader` on this replica's pod equal to whether it leads: the UDP
/// Service selects `lastgasp.io/leader=true`, so datagrams reach the replica that may write.
pub async fn label_own_pod(
    client: kube::Client,
    namespace: String,
    pod: String,
    mut leading: watch::Receiver<bool>,
) {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client, &namespace);
    loop {
        let value = if *leading.borrow_and_update() {
            "true"
        } else {
            "false"
        };
        let patch = serde_json::json!({ "metadata": { "labels": { LEADER_LABEL: value } } });
        let (params, patch) = (
            kube::api::PatchParams::default(),
            kube::api::Patch::Merge(&patch),
        );
        let label = kube_retry::call(
            Backoff::WRITES,
            OnConflict::Moot,
            || pods.patch(&pod, &params, &patch),
            |error, delay| warn!(%error, pod, ?delay, "labelling this replica's pod failed; retrying"),
        );
        tokio::select! {
            labelled = label => {
                if let Err(ended) = labelled {
                    warn!(%ended, pod, "cannot label this replica's pod; trying again when leadership changes");
                }
            }
            // Leadership changed while retrying: label with the new value.
            changed = leading.changed() => match changed {
                Ok(()) => continue,
                Err(_) => return,
            },
        }
        if leading.changed().await.is_err() {
            return;
        }
    }
}
