//! The node agent: loads the probes, turns their records into events and metrics, and sends
//! the last gasp when the kernel panics.

pub mod attached;
pub mod btf;
pub mod cni;
pub mod console;
pub mod discovery;
pub mod events;
pub mod kallsyms;
pub mod kernel_stats;
pub mod last_gasp;
pub mod loader;
pub mod netconsole;
pub mod netlink;
pub mod node_signals;
pub mod pods;
pub mod pstore;
pub mod records;
pub mod terminations;
pub mod tracepoint_format;

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray, RingBuf},
};
use prometheus_client::registry::Registry;
use tokio::{
    io::unix::AsyncFd,
    sync::{broadcast, mpsc, watch},
};

use self::{
    attached::{Attached, KernelView},
    cni::CniTracker,
    console::ConsoleWatcher,
    discovery::{ControllerEndpoints, ServiceRef},
    events::{AgentEvent, EventLog},
    kallsyms::Kallsyms,
    kernel_stats::KernelStats,
    last_gasp::{LastGasp, NodeIdentity, ReportSender},
    loader::{AttachMode, NetlinkProbeMode, OptionalHelper, ProbeSettings, ProbeStatus},
    netconsole::Netconsole,
    netlink::{HangTracker, RecvSlots},
    node_signals::{NodeHealth, NodeSignalsConfig},
    pods::PodIndex,
    pstore::PstoreConfig,
    records::Record,
    terminations::{
        Termination,
        backoff::KubeletBackoff,
        cgroupfs::PodRoots,
        report::{self, ReportConfig},
        track::TerminationTracker,
    },
};
use crate::{
    health::Health,
    metrics::{self, AgentMetrics, ProbeLabels, ReasonLabels},
    procfs,
    supervise::{Lifetime, Supervisor, TaskFailure},
    wire::AuthKey,
};

pub struct AgentConfig {
    pub node_name: String,
    /// The node's InternalIP: the source address of last-gasp datagrams and netconsole, so the
    /// controller recognises them whichever interface they leave by. `None`: the route's.
    pub node_ip: Option<IpAddr>,
    pub metrics_addr: SocketAddr,
    /// A fixed address for last-gasp datagrams (`--controller`). At most one of this and
    /// `controller_service`; with neither, panics are only logged.
    pub controller: Option<SocketAddr>,
    /// In a cluster: the controller's ingest Service, whose EndpointSlices give the addresses
    /// last-gasp datagrams go to (every ready endpoint's `reports` port), kept current by a watch.
    pub controller_service: Option<ServiceRef>,
    /// The controller's netconsole addresses: the kernel's netconsole is pointed at them at
    /// start (see [`netconsole`]). Empty: existing targets are left as they are.
    pub netconsole_targets: Vec<SocketAddrV4>,
    pub auth_key: AuthKey,
    pub netlink_hang_threshold: Duration,
    /// How the netlink recv probe attaches; `Auto` picks the best the kernel allows.
    pub netlink_probe: NetlinkProbeMode,
    /// BPF helpers to treat as missing although the kernel has them, to run the fallbacks
    /// older kernels get.
    pub ignore_helpers: Vec<OptionalHelper>,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub cni_stuck_threshold: Duration,
    /// How long the panic probe may hold the dying CPU until the last gasp is sent. Used only
    /// with a controller to send to and more than one CPU online.
    pub panic_hold: Duration,
    /// In a cluster: the client to watch this node's pods with, to name the pod and
    /// container of a hung thread, and to write the Node's conditions and Events about
    /// hangs and stuck CNI calls. `None` runs without Kubernetes.
    pub cluster: Option<kube::Client>,
    /// Recovery of the previous boot's panic from pstore; `None` skips it.
    pub pstore: Option<PstoreConfig>,
    /// In a cluster: the node's kubelet's restart back-off, for the termination reports.
    pub kubelet_backoff: KubeletBackoff,
    /// The pod cgroup roots whose processes' terminations are explained; empty: kubelet's
    /// defaults (`kubepods`, `kubepods.slice`) that exist.
    pub pod_cgroup_roots: Vec<PathBuf>,
}

/// A running agent. Dropping it without [`Agent::shutdown`] also detaches the probes.
pub struct Agent {
    events: broadcast::Sender<AgentEvent>,
    endpoints: watch::Receiver<ControllerEndpoints>,
    probes: Vec<ProbeStatus>,
    metrics_addr: SocketAddr,
    netconsole: Netconsole,
    tasks: Supervisor,
    console: Option<thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// What pstore told of earlier boots, found at start.
    recovered: Vec<AgentEvent>,
    /// In a cluster, the termination writer's queue (see [`ClusterSignals::terminations`]).
    terminations: Option<mpsc::Sender<Termination>>,
    // Declared last: the programs detach when it drops, after the readers stop.
    _ebpf: Ebpf,
}

impl Agent {
    pub async fn start(config: AgentConfig) -> anyhow::Result<Self> {
        let mut registry = Registry::with_prefix("lastgasp");
        let mut start = Start {
            metrics: AgentMetrics::register(&mut registry),
            tasks: Supervisor::new(Health::default()),
            config,
        };
        let probes = start.load_probes(&mut registry)?;
        let boot_id = procfs::boot_id().context("reading the boot id")?;
        let (endpoints, sender) = start.find_controller(&boot_id)?;
        let netconsole = start.start_netconsole(&endpoints);
        // After loading, so an agent that cannot load leaves the records for its next start.
        let recovered = start.recover_pstore(&boot_id, sender.as_ref());
        let signals = start.start_cluster_signals();
        let terminations = signals.terminations.clone();
        let readers = start.start_readers(probes.maps, sender, signals)?;
        let metrics_addr = start.serve_metrics(registry).await?;
        Ok(Self {
            events: readers.events,
            endpoints,
            probes: probes.status,
            metrics_addr,
            netconsole,
            tasks: start.tasks,
            console: Some(readers.console),
            stop: readers.stop,
            recovered,
            terminations,
            _ebpf: probes.ebpf,
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    /// The controller's addresses for reports and netconsole: the current ones, and every
    /// change while the EndpointSlice watch runs. Empty without a controller; a fixed
    /// `controller` address is the one report address and never changes.
    pub fn controller_endpoints(&self) -> watch::Receiver<ControllerEndpoints> {
        self.endpoints.clone()
    }

    /// Panics of earlier boots found in pstore at start (logged by [`run`]).
    pub fn recovered(&self) -> &[AgentEvent] {
        &self.recovered
    }

    /// In a cluster, where terminations go to be written onto their Pods: the tracker sends
    /// here, and so can a test.
    pub fn terminations(&self) -> Option<mpsc::Sender<Termination>> {
        self.terminations.clone()
    }

    pub fn probes(&self) -> &[ProbeStatus] {
        &self.probes
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The kernel's netconsole targets: [`Netconsole::point_at`] re-points them, e.g. when
    /// the controller moves.
    pub fn netconsole(&self) -> &Netconsole {
        &self.netconsole
    }

    /// Waits until a task or the kernel-log thread fails; `/healthz` answers 503 from then on.
    /// Cancel-safe.
    pub async fn failed(&mut self) -> TaskFailure {
        self.tasks.failed().await
    }

    /// Stops the readers and detaches every probe.
    pub async fn shutdown(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tasks.abort_all();
        if let Some(console) = self.console.take() {
            let _ = tokio::task::spawn_blocking(move || console.join()).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // The tasks are aborted as `tasks` drops.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What the steps of [`Agent::start`] share.
struct Start {
    config: AgentConfig,
    metrics: Arc<AgentMetrics>,
    tasks: Supervisor,
}

/// The loaded probes.
struct Probes {
    ebpf: Ebpf,
    status: Vec<ProbeStatus>,
    maps: ProbeMaps,
}

/// What the readers take from the probes.
struct ProbeMaps {
    events: RingBuf<MapData>,
    kernel_log: RingBuf<MapData>,
    threads: RecvSlots,
    panic_ack: Array<MapData, u64>,
    /// Whether `panic()` itself is probed.
    panic_probe: bool,
    netlink_mode: Option<AttachMode>,
    terminations: RingBuf<MapData>,
    /// The pod cgroup roots, when the termination probes filter on them.
    pod_roots: Option<PodRoots>,
}

/// In a cluster: this node's pods, and where the events loop publishes what the node signals
/// report.
#[derive(Default)]
struct ClusterSignals {
    pods: Option<PodIndex>,
    node_health: Option<watch::Sender<NodeHealth>>,
    /// Where the tracker sends each container termination, for the Pod's Event and annotation.
    terminations: Option<mpsc::Sender<Termination>>,
}

/// The running readers of the probes' rings.
struct Readers {
    events: broadcast::Sender<AgentEvent>,
    console: thread::JoinHandle<()>,
    /// Stops the kernel-log thread.
    stop: Arc<AtomicBool>,
}

impl Start {
    /// Loads and attaches the probes, says how each attached, forwards the programs' logs,
    /// and checks from then on that they stay attached.
    fn load_probes(&mut self, registry: &mut Registry) -> anyhow::Result<Probes> {
        let config = &self.config;
        let loaded = loader::load(&ProbeSettings {
            slow_recv: config.netlink_hang_threshold,
            cni_bin_dirs: &config.cni_bin_dirs,
            panic_hold: panic_hold(config),
            netlink_probe: config.netlink_probe,
            ignore_helpers: &config.ignore_helpers,
            pod_cgroup_roots: &config.pod_cgroup_roots,
        })?;
        let mut ebpf = loaded.ebpf;
        for status in &loaded.status {
            match status.mode {
                Some(_) => tracing::info!(probe = status.probe, "{status}"),
                None => tracing::warn!(probe = status.probe, "{status}"),
            }
            self.metrics
                .probe_info
                .get_or_create(&ProbeLabels {
                    probe: status.probe.into(),
                    mode: status.mode.map_or("none", |mode| mode.as_str()).into(),
                    attached: status.mode.is_some().to_string(),
                    degraded: status.degraded_label(),
                })
                .set(1);
        }
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .map_err(anyhow::Error::from)
            .and_then(|logger| Ok(async_fd(logger)?));
        match logger {
            Ok(logger) => {
                self.tasks
                    .spawn("ebpf-logs", Lifetime::Required, forward_ebpf_logs(logger));
            }
            Err(error) => tracing::warn!(%error, "eBPF log forwarding unavailable"),
        }
        let attached = Attached::record(&ebpf, &KernelView::read().unwrap_or_default());
        let health = self.tasks.health().clone();
        self.tasks.spawn(
            "probe-check",
            Lifetime::Required,
            attached::check(attached, health),
        );

        let threads = match ebpf.take_map("RECV_THREADS") {
            Some(aya::maps::Map::Array(data)) => {
                RecvSlots::map(data).context("mapping RECV_THREADS into memory")?
            }
            _ => anyhow::bail!("map RECV_THREADS missing from the eBPF object or not an array"),
        };
        registry.register_collector(Box::new(KernelStats {
            latency: Mutex::new(take_map::<PerCpuArray<MapData, _>>(
                &mut ebpf,
                "RECV_LATENCY",
            )?),
            drops: Mutex::new(take_map::<PerCpuArray<MapData, _>>(&mut ebpf, "DROPS")?),
        }));
        let mode_of = |probe: &str| {
            loaded
                .status
                .iter()
                .find(|status| status.probe == probe)
                .and_then(|status| status.mode)
        };
        let maps = ProbeMaps {
            events: take_map(&mut ebpf, "EVENTS")?,
            kernel_log: take_map(&mut ebpf, "KERNEL_LOG")?,
            threads,
            panic_ack: take_map(&mut ebpf, "PANIC_ACK")?,
            panic_probe: mode_of("panic").is_some(),
            netlink_mode: mode_of("netlink_recv"),
            terminations: take_map(&mut ebpf, "TERMINATIONS")?,
            pod_roots: loaded.pod_roots.clone(),
        };
        Ok(Probes {
            ebpf,
            status: loaded.status,
            maps,
        })
    }

    /// Where last-gasp reports go: a fixed address, or the controller Service's endpoints
    /// kept current by a watch; and the sender of reports, if there is somewhere to send.
    fn find_controller(
        &mut self,
        boot_id: &str,
    ) -> anyhow::Result<(watch::Receiver<ControllerEndpoints>, Option<ReportSender>)> {
        let config = &self.config;
        // A fixed address never changes: its sender is dropped at once.
        let endpoints = match (config.controller, &config.controller_service) {
            (Some(_), Some(_)) => {
                anyhow::bail!("a fixed controller address and a controller Service are exclusive")
            }
            (Some(address), None) => watch::channel(ControllerEndpoints::fixed(address)).1,
            (None, Some(service)) => {
                let client = config.cluster.clone().with_context(|| {
                    format!("finding the controller from Service {service} needs Kubernetes")
                })?;
                discovery::watch_endpoints(client, service, &mut self.tasks)
            }
            (None, None) => return Ok((watch::channel(Default::default()).1, None)),
        };
        let sender = ReportSender::new(
            endpoints.clone(),
            config.node_ip,
            config.auth_key.clone(),
            NodeIdentity {
                node: config.node_name.clone(),
                boot_id: boot_id.to_owned(),
                kernel_release: procfs::kernel_release().ok(),
            },
        )?;
        Ok((endpoints, Some(sender)))
    }

    /// Keeps the kernel's netconsole targets: those the flags name, or else the controller
    /// Service's `netconsole` endpoints.
    fn start_netconsole(&mut self, endpoints: &watch::Receiver<ControllerEndpoints>) -> Netconsole {
        let local_ip = match self.config.node_ip {
            Some(IpAddr::V4(ip)) => Some(ip),
            Some(IpAddr::V6(ip)) => {
                tracing::warn!(node_ip = %ip, "netconsole is IPv4 only: its targets keep the route's source address");
                None
            }
            None => None,
        };
        let netconsole = Netconsole::new(self.metrics.netconsole_targets.clone(), local_ip);
        let targets = self.config.netconsole_targets.clone();
        let follow_controller = targets.is_empty() && self.config.controller_service.is_some();
        self.tasks.spawn(
            "netconsole",
            Lifetime::Required,
            netconsole::maintain(netconsole.clone(), targets),
        );
        if follow_controller {
            self.tasks.spawn(
                "netconsole-follow",
                Lifetime::Required,
                follow_controller_with_netconsole(netconsole.clone(), endpoints.clone()),
            );
        }
        netconsole
    }

    /// The previous boot's panic from pstore: its events, and its delayed reports sent.
    fn recover_pstore(&mut self, boot_id: &str, sender: Option<&ReportSender>) -> Vec<AgentEvent> {
        let Some(pstore) = &self.config.pstore else {
            return Vec::new();
        };
        let recovered = pstore::recover(pstore, boot_id, sender);
        if let Some(sender) = sender
            && !recovered.reports.is_empty()
        {
            self.tasks.spawn(
                "pstore-reports",
                Lifetime::OneShot,
                pstore::send_reports(sender.clone(), recovered.reports, self.metrics.clone()),
            );
        }
        recovered.events
    }

    /// In a cluster: the watch of this node's pods, and the node conditions and Events.
    fn start_cluster_signals(&mut self) -> ClusterSignals {
        let Some(client) = self.config.cluster.clone() else {
            return ClusterSignals::default();
        };
        let pods = PodIndex::start(client.clone(), &self.config.node_name, &mut self.tasks);
        let (node_health, observed) = watch::channel(NodeHealth::default());
        node_signals::spawn(
            &mut self.tasks,
            client.clone(),
            NodeSignalsConfig {
                node: self.config.node_name.clone(),
                netlink_hang_threshold: self.config.netlink_hang_threshold,
                cni_stuck_threshold: self.config.cni_stuck_threshold,
            },
            pods.clone(),
            observed,
            self.metrics.clone(),
        );
        let report = ReportConfig {
            node: self.config.node_name.clone(),
            backoff: self.config.kubelet_backoff,
            pods: pods.clone(),
        };
        let terminations = report::spawn(&mut self.tasks, client, report, self.metrics.clone());
        ClusterSignals {
            pods: Some(pods),
            node_health: Some(node_health),
            terminations: Some(terminations),
        }
    }

    /// The kernel-log thread (which sends the last gasp) and the events loop.
    fn start_readers(
        &mut self,
        maps: ProbeMaps,
        sender: Option<ReportSender>,
        signals: ClusterSignals,
    ) -> anyhow::Result<Readers> {
        let (events, _) = broadcast::channel(4096);
        let last_gasp = sender.map(|sender| LastGasp::new(sender, procfs::netconsole_registered));
        // Only a panic() probe takes stacks to name, and only a last gasp carries them.
        let kallsyms = (maps.panic_probe && last_gasp.is_some())
            .then(
                || match Kallsyms::load(std::path::Path::new("/proc/kallsyms")) {
                    Ok(symbols) => {
                        tracing::info!(
                            symbols = symbols.len(),
                            "kernel symbols read for panic stacks"
                        );
                        Some(symbols)
                    }
                    Err(error) => {
                        tracing::warn!(%error, "panic stacks will not be named");
                        None
                    }
                },
            )
            .flatten();
        let stop = Arc::new(AtomicBool::new(false));
        let console_facts = match maps.pod_roots {
            Some(roots) => {
                tracing::info!(
                    roots = ?roots.paths,
                    hierarchy = %roots.mount.mount_point.display(),
                    "explaining the terminations of the processes under the pod cgroup roots"
                );
                let (facts, received) = mpsc::channel(256);
                let tracker = TerminationTracker::new(roots, signals.pods.clone());
                let outputs = terminations::Outputs {
                    events: events.clone(),
                    metrics: self.metrics.clone(),
                    writer: signals.terminations.clone(),
                };
                self.tasks.spawn(
                    "terminations",
                    Lifetime::Required,
                    terminations::run(async_fd(maps.terminations)?, received, tracker, outputs),
                );
                Some(facts)
            }
            None => None,
        };
        let console = ConsoleWatcher {
            last_gasp,
            kallsyms,
            panic_ack: maps.panic_ack,
            events: events.clone(),
            metrics: self.metrics.clone(),
            terminations: console_facts,
            joiner: Default::default(),
        }
        .spawn(maps.kernel_log, stop.clone(), &mut self.tasks)?;

        let hangs = HangTracker::new(
            maps.threads,
            self.config.netlink_hang_threshold,
            signals.pods,
            self.metrics.clone(),
            maps.netlink_mode == Some(AttachMode::Kprobe),
        );
        let cni = CniTracker::new(self.config.cni_stuck_threshold, self.metrics.clone());
        self.tasks.spawn(
            "events",
            Lifetime::Required,
            events_loop(
                async_fd(maps.events)?,
                hangs,
                cni,
                events.clone(),
                signals.node_health,
                self.metrics.clone(),
            ),
        );
        Ok(Readers {
            events,
            console,
            stop,
        })
    }

    /// Serves `/metrics` and `/healthz`; returns the address it listens on.
    async fn serve_metrics(&mut self, registry: Registry) -> anyhow::Result<SocketAddr> {
        let requested = self.config.metrics_addr;
        let listener = metrics::bind(requested)
            .await
            .with_context(|| format!("binding the metrics address {requested}"))?;
        let metrics_addr = listener.local_addr()?;
        let (registry, health) = (Arc::new(registry), self.tasks.health().clone());
        self.tasks
            .spawn("metrics-server", Lifetime::Required, async move {
                if let Err(error) = metrics::serve(listener, registry, health).await {
                    tracing::error!(%error, "metrics server stopped");
                }
            });
        tracing::info!(%metrics_addr, "serving metrics");
        Ok(metrics_addr)
    }
}

/// Runs the agent until Ctrl-C or SIGTERM, logging every event. A task that fails stops the
/// agent with an error.
pub async fn run(config: AgentConfig, log: EventLog) -> anyhow::Result<()> {
    let mut agent = Agent::start(config).await?;
    for event in agent.recovered() {
        log.write(event);
    }
    let mut events = agent.subscribe();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) => log.write(&event),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "event log fell behind; events were not logged");
                }
                Err(broadcast::error::RecvError::Closed) => break Ok(()),
            },
            failure = agent.failed() => break Err(failure),
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = terminate.recv() => break Ok(()),
        }
    };
    tracing::info!("detaching probes");
    let netconsole = agent.netconsole().configured();
    agent.shutdown().await;
    if !netconsole.is_empty() {
        let names: Vec<&str> = netconsole
            .iter()
            .map(|target| target.name.as_str())
            .collect();
        tracing::info!(
            targets = names.join(","),
            "leaving the netconsole targets enabled: they report a panic while no agent runs"
        );
    }
    Ok(outcome?)
}

/// Points the kernel's netconsole at the controller's `netconsole` endpoints whenever they
/// change. An empty set (the leader between two pods, a slice being rewritten) leaves the
/// targets where they were: a stale target is better than none while the node may panic.
async fn follow_controller_with_netconsole(
    netconsole: Netconsole,
    mut endpoints: watch::Receiver<ControllerEndpoints>,
) {
    loop {
        let wanted: Vec<SocketAddrV4> = endpoints
            .borrow_and_update()
            .netconsole
            .iter()
            .filter_map(|address| match address {
                SocketAddr::V4(v4) => Some(*v4),
                SocketAddr::V6(_) => None,
            })
            .collect();
        if !wanted.is_empty()
            && let Err(error) = netconsole.point_at(wanted).await
        {
            tracing::warn!(%error, "pointing netconsole at the controller failed");
        }
        if endpoints.changed().await.is_err() {
            return;
        }
    }
}

/// Holding the panicking CPU helps only if there is a last gasp to wait for and another CPU
/// to send it from.
fn panic_hold(config: &AgentConfig) -> Duration {
    // Online CPUs, not this process' CPU quota: the kernel's, not the container's, view.
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let has_controller = config.controller.is_some() || config.controller_service.is_some();
    if !has_controller || cpus < 2 {
        return Duration::ZERO;
    }
    config.panic_hold
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// Registers a map's or logger's file descriptor with the runtime.
fn async_fd<T: AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its file descriptor and the AsyncFd owns `inner`, so the
    // descriptor stays open for as long as it is registered.
    unsafe { AsyncFd::register(inner) }.map_err(|error| error.into_parts().1)
}

async fn forward_ebpf_logs(mut logger: AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>) {
    loop {
        let mut guard = match logger.readable_mut().await {
            Ok(guard) => guard,
            Err(error) => {
                tracing::error!(%error, "the eBPF log ring is unreadable");
                return;
            }
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Drains the `EVENTS` ring into the trackers and scans for hangs and stuck calls; in a
/// cluster, publishes the hung threads and stuck calls for the node signals when they change.
async fn events_loop(
    mut ring: AsyncFd<RingBuf<MapData>>,
    mut hangs: HangTracker,
    mut cni: CniTracker,
    events: broadcast::Sender<AgentEvent>,
    health: Option<watch::Sender<NodeHealth>>,
    metrics: Arc<AgentMetrics>,
) {
    let mut published = (hangs.generation(), cni.generation());
    let mut scan = tokio::time::interval(hangs.scan_interval());
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ready = ring.readable_mut() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(error) => {
                        tracing::error!(%error, "the events ring is unreadable");
                        return;
                    }
                };
                drain(guard.get_inner_mut(), &mut hangs, &mut cni, &events, &metrics);
                guard.clear_ready();
            }
            _ = scan.tick() => {
                // Records already in the ring come first, so a call that returned is not reported as hung.
                drain(ring.get_mut(), &mut hangs, &mut cni, &events, &metrics);
                let now = procfs::monotonic_ns();
                for event in hangs.scan(now).into_iter().chain(cni.check_stuck(now)) {
                    let _ = events.send(event);
                }
                let generation = (hangs.generation(), cni.generation());
                if let Some(health) = &health
                    && generation != published
                {
                    published = generation;
                    health.send_replace(NodeHealth {
                        hung_threads: hangs.hung_threads().collect(),
                        stuck_cni_calls: cni.stuck_calls().collect(),
                    });
                }
            }
        }
    }
}

fn drain(
    ring: &mut RingBuf<MapData>,
    hangs: &mut HangTracker,
    cni: &mut CniTracker,
    events: &broadcast::Sender<AgentEvent>,
    metrics: &AgentMetrics,
) {
    while let Some(item) = ring.next() {
        let event = match Record::parse(&item) {
            Ok(Record::SlowRecv(recv)) => Some(hangs.on_slow_recv(&recv)),
            Ok(Record::CniExec(exec)) => {
                cni.on_exec(&exec);
                None
            }
            Ok(Record::CniExit(exit)) => cni.on_exit(&exit),
            Ok(_) => {
                count_agent_drop(metrics, "unexpected_events_record");
                None
            }
            Err(error) => {
                tracing::warn!(%error, "bad events record");
                count_agent_drop(metrics, "bad_record");
                None
            }
        };
        if let Some(event) = event {
            let _ = events.send(event);
        }
    }
}

/// For the metrics: a drop counted by the agent's own userspace.
pub(crate) fn count_agent_drop(metrics: &AgentMetrics, reason: &str) {
    metrics
        .agent_drops
        .get_or_create(&ReasonLabels {
            reason: reason.into(),
        })
        .inc();
}
