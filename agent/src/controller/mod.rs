//! The controller: turns last-gasp reports and netconsole streams into termination reasons
//! on pods and nodes, then deletes them at once instead of after Kubernetes' timeouts.
//!
//! Data flows one way: datagrams (`ingest`) → evidence → incidents (one per node and boot)
//! → policy and circuit breaker → per-node executor (`actions`) → Kubernetes.

pub mod actions;
pub mod cluster;
pub mod decisions;
pub mod incidents;
pub mod ingest;
pub mod leader;
pub mod liveness;
pub mod metrics;
pub mod netconsole;
pub mod policy;
pub mod reasons;
pub mod trust;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use kube::{Client, ResourceExt as _, runtime::events::Reporter};
use prometheus_client::registry::Registry;
use tokio::{
    net::UdpSocket,
    sync::{mpsc, watch},
    task::{AbortHandle, Id, JoinError, JoinSet},
};

use self::{
    actions::{Actions, StoredIncident},
    cluster::ClusterCache,
    decisions::{Command, Decider, NodeState},
    incidents::{Evidence, Incident},
    liveness::HeartbeatClock,
    metrics::ControllerMetrics,
    policy::{CircuitBreaker, Plan, Policy},
    reasons::ANNOTATION_INCIDENT_RECORD,
    trust::DeletionEvidence,
};
use crate::{
    health::Health,
    metrics as http,
    supervise::{self, Lifetime, Supervisor, TaskFailure},
    wire::AuthKey,
};

pub struct ControllerConfig {
    pub netconsole_addr: SocketAddr,
    pub report_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub auth_key: AuthKey,
    pub policy: Policy,
    pub dry_run: bool,
    /// Pods of one node written concurrently.
    pub concurrency: usize,
    /// At most this many nodes acted on (deleted) per `breaker_window`.
    pub breaker_max_nodes: usize,
    pub breaker_window: Duration,
    /// Which evidence deletes without the node being observed dead.
    pub deletion_evidence: DeletionEvidence,
    /// A node whose heartbeat Lease this controller has seen unchanged for this long is dead.
    pub node_dead_after: Duration,
    /// How long an incident whose evidence may not delete waits, marked, for the node to be
    /// seen dead or for better evidence, before the controller gives up deleting.
    pub mark_wait: Duration,
    /// Whether this replica may write; `None` means always (a single replica).
    pub leader: Option<watch::Receiver<bool>>,
    /// The controller (and replica) named on Events.
    pub reporter: Reporter,
    /// What `/healthz` reports; shared with tasks run beside the controller (leader election).
    pub health: Health,
}

/// A running controller. Dropping it stops every task, as [`Controller::shutdown`] does.
pub struct Controller {
    netconsole_addr: SocketAddr,
    report_addr: SocketAddr,
    metrics_addr: SocketAddr,
    tasks: Supervisor,
}

impl Controller {
    /// Starts the controller; returns once its caches have synced, or the error of a task
    /// that failed first.
    pub async fn start(client: Client, config: ControllerConfig) -> anyhow::Result<Self> {
        let mut registry = Registry::with_prefix("lastgasp");
        let metrics = ControllerMetrics::register(&mut registry);
        let mut tasks = Supervisor::new(config.health.clone());

        let netconsole_socket = UdpSocket::bind(config.netconsole_addr)
            .await
            .with_context(|| format!("binding --netconsole-addr {}", config.netconsole_addr))?;
        let report_socket = UdpSocket::bind(config.report_addr)
            .await
            .with_context(|| format!("binding --report-addr {}", config.report_addr))?;
        let listener = http::bind(config.metrics_addr)
            .await
            .with_context(|| format!("binding --metrics-addr {}", config.metrics_addr))?;
        for socket in [&netconsole_socket, &report_socket] {
            enlarge_receive_buffer(socket);
        }
        let (netconsole_addr, report_addr) =
            (netconsole_socket.local_addr()?, report_socket.local_addr()?);
        let metrics_addr = listener.local_addr()?;

        let cluster = ClusterCache::start(client.clone(), &mut tasks);
        tokio::select! {
            () = cluster.wait_synced() => {}
            failure = tasks.failed() => return Err(failure.into()),
        }
        tracing::info!(
            nodes = cluster.nodes().len(),
            %netconsole_addr,
            %report_addr,
            %metrics_addr,
            "cluster cache synced; listening"
        );

        let (evidence_tx, evidence_rx) = mpsc::channel(1024);
        tasks.spawn(
            "netconsole-ingest",
            Lifetime::Required,
            ingest::netconsole(
                netconsole_socket,
                cluster.clone(),
                evidence_tx.clone(),
                metrics.clone(),
            ),
        );
        tasks.spawn(
            "report-ingest",
            Lifetime::Required,
            ingest::reports(
                report_socket,
                config.auth_key.clone(),
                cluster.clone(),
                evidence_tx,
                metrics.clone(),
            ),
        );

        let actions = Arc::new(Actions::new(
            client.clone(),
            config.reporter.clone(),
            cluster.clone(),
            metrics.clone(),
            config.concurrency,
            config.dry_run,
        ));
        let leader = config
            .leader
            .clone()
            .unwrap_or_else(|| watch::channel(true).1);
        let decisions = Decisions {
            cluster: cluster.clone(),
            decider: Decider::new(
                config.policy,
                CircuitBreaker::new(config.breaker_max_nodes, config.breaker_window),
                metrics.clone(),
            ),
            executors: HashMap::new(),
            running: JoinSet::new(),
            running_nodes: HashMap::new(),
            gate: Gate {
                deletion_evidence: config.deletion_evidence,
                node_dead_after: config.node_dead_after,
                mark_wait: config.mark_wait,
                client,
                cluster: cluster.clone(),
            },
            actions,
            leader,
            metrics,
        };
        tasks.spawn("decisions", Lifetime::Required, decisions.run(evidence_rx));

        let (registry, health) = (Arc::new(registry), config.health);
        tasks.spawn("metrics-server", Lifetime::Required, async move {
            if let Err(error) = http::serve(listener, registry, health).await {
                tracing::error!(%error, "metrics server stopped");
            }
        });
        Ok(Self {
            netconsole_addr,
            report_addr,
            metrics_addr,
            tasks,
        })
    }

    pub fn netconsole_addr(&self) -> SocketAddr {
        self.netconsole_addr
    }

    pub fn report_addr(&self) -> SocketAddr {
        self.report_addr
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Waits until a task fails; `/healthz` answers 503 from then on. Cancel-safe.
    pub async fn failed(&mut self) -> TaskFailure {
        self.tasks.failed().await
    }

    /// Stops every task; writes in flight stop where they are (a restart finishes them).
    pub fn shutdown(self) {}
}

/// The incident recorded on a node by an earlier run of the actions, if readable.
fn stored_incident(node: &k8s_openapi::api::core::v1::Node) -> Option<StoredIncident> {
    let stored = node.annotations().get(ANNOTATION_INCIDENT_RECORD)?;
    serde_json::from_str(stored)
        .inspect_err(|error| {
            tracing::warn!(node = node.name_any(), %error, "unreadable incident record");
        })
        .ok()
}

/// Runs one node's incident, again whenever it is updated.
struct Executor {
    updates: watch::Sender<(Incident, Plan)>,
    task: AbortHandle,
}

/// The decision stage at work: evidence in ([`Decider`]), one executor per node out.
struct Decisions {
    cluster: ClusterCache,
    decider: Decider,
    executors: HashMap<String, Executor>,
    /// The executors' tasks, and the node of each. An executor's panic ends only its node's
    /// incident, not the process: the incident resumed from the node's record after a restart
    /// would likely panic again, and a crash loop would stop the handling of every other
    /// node's panic. So the panic is logged and counted, and the node's next evidence starts
    /// a new executor.
    running: JoinSet<()>,
    running_nodes: HashMap<Id, String>,
    gate: Gate,
    actions: Arc<Actions>,
    leader: watch::Receiver<bool>,
    metrics: Arc<ControllerMetrics>,
}

impl Decisions {
    async fn run(mut self, mut evidence: mpsc::Receiver<Evidence>) {
        self.resume();
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        let mut leader = self.leader.clone();
        loop {
            tokio::select! {
                received = evidence.recv() => match received {
                    Some(evidence) => self.decide(evidence),
                    None => return,
                },
                // Without leader election the sender is gone: the branch then stays disabled.
                Ok(()) = leader.changed() => {
                    self.metrics.leader.set(i64::from(*leader.borrow_and_update()));
                }
                _ = tick.tick() => self.decider.expire(Instant::now()),
                Some(ended) = self.running.join_next_with_id() => self.reap(ended),
            }
            self.metrics
                .breaker_open
                .set(i64::from(self.decider.breaker_open(Instant::now())));
        }
    }

    /// Picks up incidents recorded on nodes that still exist: a restart finishes the job.
    fn resume(&mut self) {
        self.metrics.leader.set(i64::from(*self.leader.borrow()));
        for node in self.cluster.nodes() {
            if let Some(stored) = stored_incident(&node) {
                let command = self.decider.resume(stored, Instant::now());
                self.carry_out(command);
            }
        }
    }

    fn decide(&mut self, evidence: Evidence) {
        let name = evidence.node.clone();
        let (cluster, executors) = (&self.cluster, &self.executors);
        let node = || NodeState {
            stored: cluster.node(&name).and_then(|node| stored_incident(&node)),
            running: executors
                .get(&name)
                .filter(|executor| !executor.task.is_finished())
                .map(|executor| executor.updates.borrow().0.record.id.clone()),
        };
        if let Some(command) = self.decider.decide(evidence, node, Instant::now()) {
            self.carry_out(command);
        }
    }

    fn carry_out(&mut self, command: Command) {
        match command {
            Command::Execute { incident, plan } => self.execute(incident, plan),
            Command::Update(incident) => match self.executors.get(&incident.record.node) {
                Some(executor) if !executor.task.is_finished() => {
                    executor
                        .updates
                        .send_modify(|(current, _)| *current = incident);
                }
                // Ended since the decision: run the update as the node's record says.
                _ => self.execute(incident, Plan::MARK_ONLY),
            },
        }
    }

    /// Hands the incident to its node's executor, which runs it and runs it again when the
    /// incident changes.
    fn execute(&mut self, incident: Incident, plan: Plan) {
        let node = incident.record.node.clone();
        if let Some(executor) = self.executors.get(&node)
            && !executor.task.is_finished()
        {
            executor.updates.send_replace((incident, plan));
            return;
        }
        let (sender, updates) = watch::channel((incident, plan));
        let task = self.running.spawn(run_executor(
            updates,
            self.actions.clone(),
            self.leader.clone(),
            self.gate.clone(),
        ));
        self.running_nodes.insert(task.id(), node.clone());
        self.executors.insert(
            node,
            Executor {
                updates: sender,
                task,
            },
        );
    }

    /// Forgets an executor that ended; logs and counts it if it panicked.
    fn reap(&mut self, ended: Result<(Id, ()), JoinError>) {
        let id = match &ended {
            Ok((id, ())) => *id,
            Err(error) => error.id(),
        };
        let node = self.running_nodes.remove(&id).unwrap_or_default();
        if let Err(error) = ended
            && error.is_panic()
        {
            let message = supervise::panic_message(error.into_panic());
            tracing::error!(
                node,
                message,
                "the incident's executor panicked: the node's incident is left unfinished"
            );
            self.metrics.executor_panics.inc();
        }
    }
}

/// Decides when a plan that deletes may run: at once on evidence that may delete
/// ([`DeletionEvidence`]), else only once this controller sees the node dead.
#[derive(Clone)]
struct Gate {
    deletion_evidence: DeletionEvidence,
    node_dead_after: Duration,
    mark_wait: Duration,
    client: Client,
    cluster: ClusterCache,
}

/// How a wait for the node's death ended.
enum Waited {
    /// The node is dead: why, for the log.
    Dead(String),
    /// The incident changed (better evidence, another channel): decide again.
    Updated,
    /// `mark_wait` ran out with the node alive: why nothing is deleted.
    GaveUp(String),
    /// The controller is stopping.
    Closed,
}

/// How often a waiting incident looks at the node's heartbeat.
const LIVENESS_POLL: Duration = Duration::from_secs(1);

impl Gate {
    /// Waits, until `deadline`, for the node to be seen dead or the incident to change.
    async fn wait_for_death(
        &self,
        node: &str,
        clock: &mut HeartbeatClock,
        deadline: Instant,
        updates: &mut watch::Receiver<(Incident, Plan)>,
    ) -> Waited {
        loop {
            let now = Instant::now();
            if self
                .cluster
                .node(node)
                .is_some_and(|node| liveness::not_ready_by_lifecycle_controller(&node))
            {
                return Waited::Dead(format!(
                    "its Ready condition is {}",
                    liveness::NODE_STATUS_UNKNOWN
                ));
            }
            match liveness::lease_renew_time(&self.client, node).await {
                Ok(Some(renewed)) => clock.observe(renewed, now),
                Ok(None) => {}
                Err(error) => tracing::debug!(node, %error, "reading the node Lease failed"),
            }
            if let Some(silent) = clock.silent_for(now)
                && silent >= self.node_dead_after
            {
                return Waited::Dead(format!(
                    "its heartbeat Lease has not been renewed for {}",
                    humantime::format_duration(round_secs(silent))
                ));
            }
            if now >= deadline {
                let heartbeat = match clock.silent_for(now) {
                    Some(_) => "its heartbeat Lease kept being renewed",
                    None => "no heartbeat Lease of it could be read",
                };
                return Waited::GaveUp(format!(
                    "the evidence could have been forged and, {} later, {heartbeat} and it is not \
                     marked NotReady by the node lifecycle controller",
                    humantime::format_duration(round_secs(self.mark_wait)),
                ));
            }
            tokio::select! {
                changed = updates.changed() => {
                    return if changed.is_ok() { Waited::Updated } else { Waited::Closed };
                }
                _ = tokio::time::sleep(LIVENESS_POLL.min(deadline - now)) => {}
            }
        }
    }
}

fn round_secs(duration: Duration) -> Duration {
    Duration::from_secs(duration.as_secs())
}

/// Runs `writes` while this replica leads; `false` if leadership was lost first (the writes
/// in flight are dropped: the renew deadline ends leadership before the lease can expire, so
/// no other replica writes yet).
async fn while_leading(
    leader: &mut watch::Receiver<bool>,
    writes: impl Future<Output = ()>,
) -> bool {
    let lost = async {
        // Without leader election the sender is gone at once: leadership is never lost.
        if leader.wait_for(|leading| !*leading).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = writes => true,
        () = lost => {
            tracing::warn!("leadership lost: this replica stops writing");
            false
        }
    }
}

async fn run_executor(
    mut updates: watch::Receiver<(Incident, Plan)>,
    actions: Arc<Actions>,
    mut leader: watch::Receiver<bool>,
    gate: Gate,
) {
    // Per incident: when its wait began (an update does not restart it), and whether the
    // controller already gave up deleting for it.
    let mut waiting: Option<(String, Instant, HeartbeatClock)> = None;
    let mut gave_up: Option<String> = None;
    loop {
        let (incident, plan) = updates.borrow_and_update().clone();
        if leader.wait_for(|leading| *leading).await.is_err() {
            return;
        }
        let record = &incident.record;
        let deletes = plan.delete_pods || plan.delete_node;
        if deletes && !gate.deletion_evidence.deletes_at_once(record.tier) {
            // Marked at once; the plan stored on the node lets a restarted controller resume
            // the wait.
            if !while_leading(&mut leader, actions.mark(&incident, plan)).await {
                continue;
            }
            if gave_up.as_ref() == Some(&record.id) {
                if updates.changed().await.is_err() {
                    return;
                }
                continue;
            }
            if waiting.as_ref().is_none_or(|(id, ..)| *id != record.id) {
                let now = Instant::now();
                waiting = Some((record.id.clone(), now, HeartbeatClock::new(now)));
            }
            let (_, since, clock) = waiting.as_mut().expect("set above");
            tracing::warn!(
                node = record.node,
                tier = record.tier.as_str(),
                "marked; deletion waits until the node is seen dead"
            );
            let deadline = *since + gate.mark_wait;
            match gate
                .wait_for_death(&record.node, clock, deadline, &mut updates)
                .await
            {
                Waited::Dead(why) => {
                    tracing::warn!(node = record.node, why, "node observed dead: deleting");
                    if !while_leading(&mut leader, actions.delete(&incident, plan)).await {
                        continue;
                    }
                    if updates.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                Waited::Updated => continue,
                Waited::Closed => return,
                Waited::GaveUp(why) => {
                    tracing::warn!(node = record.node, why, "deleting nothing");
                    gave_up = Some(record.id.clone());
                    while_leading(&mut leader, actions.withheld(&incident, &why)).await;
                    if updates.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
            }
        }
        if !while_leading(&mut leader, actions.execute(&incident, plan)).await {
            continue;
        }
        if updates.changed().await.is_err() {
            return;
        }
    }
}

/// Bytes of datagrams the kernel may queue for an input: a flood from one node must not
/// make the kernel drop another node's panic before the controller reads it.
const RECEIVE_BUFFER: libc::c_int = 8 << 20;

/// Raises the socket's receive buffer, beyond `net.core.rmem_max` when privileged.
fn enlarge_receive_buffer(socket: &UdpSocket) {
    use std::os::fd::AsRawFd as _;
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: a valid socket and an int-sized option value.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&RECEIVE_BUFFER as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set == 0 {
            return;
        }
    }
    tracing::warn!(
        error = %std::io::Error::last_os_error(),
        "could not enlarge the UDP receive buffer; a datagram flood may drop panics"
    );
}
