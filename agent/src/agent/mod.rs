//! The node agent: loads the probes, turns their records into events and metrics, and sends
//! the last gasp when the kernel panics.

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

use std::{
    net::{SocketAddr, SocketAddrV4},
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
    sync::{broadcast, watch},
    task::JoinHandle,
};

use self::{
    cni::CniTracker,
    console::ConsoleWatcher,
    discovery::{ControllerEndpoints, ServiceRef},
    events::{AgentEvent, EventLog},
    kallsyms::Kallsyms,
    kernel_stats::KernelStats,
    last_gasp::{LastGasp, NodeIdentity, ReportSender},
    loader::{AttachMode, NetlinkProbeMode, ProbeSettings, ProbeStatus},
    netconsole::Netconsole,
    netlink::{HangTracker, RecvSlots},
    node_signals::{NodeHealth, NodeSignalsConfig},
    pods::PodIndex,
    pstore::PstoreConfig,
    records::Record,
};
use crate::{
    metrics::{self, AgentMetrics, ProbeLabels, ReasonLabels},
    procfs,
    wire::AuthKey,
};

pub struct AgentConfig {
    pub node_name: String,
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
}

/// A running agent. Dropping it without [`Agent::shutdown`] also detaches the probes.
pub struct Agent {
    events: broadcast::Sender<AgentEvent>,
    endpoints: watch::Receiver<ControllerEndpoints>,
    probes: Vec<ProbeStatus>,
    metrics_addr: SocketAddr,
    netconsole: Netconsole,
    tasks: Vec<JoinHandle<()>>,
    console: Option<thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// What pstore told of earlier boots, found at start.
    recovered: Vec<AgentEvent>,
    // Declared last: the programs detach when it drops, after the readers stop.
    _ebpf: Ebpf,
}

impl Agent {
    pub async fn start(config: AgentConfig) -> anyhow::Result<Self> {
        let mut registry = Registry::with_prefix("lastgasp");
        let metrics = AgentMetrics::register(&mut registry);

        let loaded = loader::load(&ProbeSettings {
            slow_recv: config.netlink_hang_threshold,
            cni_bin_dirs: &config.cni_bin_dirs,
            panic_hold: panic_hold(&config),
            netlink_probe: config.netlink_probe,
        })?;
        let mut ebpf = loaded.ebpf;
        for status in &loaded.status {
            match status.mode {
                Some(_) => tracing::info!(probe = status.probe, "{status}"),
                None => tracing::warn!(probe = status.probe, "{status}"),
            }
            metrics
                .probe_info
                .get_or_create(&ProbeLabels {
                    probe: status.probe.into(),
                    mode: status.mode.map_or("none", |mode| mode.as_str()).into(),
                    attached: status.mode.is_some().to_string(),
                })
                .set(1);
        }

        let mut tasks = Vec::new();
        let netconsole = Netconsole::new(metrics.netconsole_targets.clone());
        // Flags name the netconsole targets, or else the controller's Service does.
        let netconsole_follows_controller =
            config.netconsole_targets.is_empty() && config.controller_service.is_some();
        tasks.push(tokio::spawn(netconsole::maintain(
            netconsole.clone(),
            config.netconsole_targets,
        )));
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => tasks.push(tokio::spawn(forward_ebpf_logs(logger))),
            Err(error) => tracing::warn!(%error, "eBPF log forwarding unavailable"),
        }

        let events_ring: RingBuf<MapData> = take_map(&mut ebpf, "EVENTS")?;
        let kernel_log_ring: RingBuf<MapData> = take_map(&mut ebpf, "KERNEL_LOG")?;
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

        let (events, _) = broadcast::channel(4096);
        // A fixed address never changes: its sender is dropped at once.
        let endpoints = match (config.controller, &config.controller_service) {
            (Some(_), Some(_)) => {
                anyhow::bail!("a fixed controller address and a controller Service are exclusive")
            }
            (Some(address), None) => Some(watch::channel(ControllerEndpoints::fixed(address)).1),
            (None, Some(service)) => {
                let client = config.cluster.clone().with_context(|| {
                    format!("finding the controller from Service {service} needs Kubernetes")
                })?;
                let (endpoints, task) = discovery::watch_endpoints(client, service);
                tasks.push(task);
                Some(endpoints)
            }
            (None, None) => None,
        };
        let boot_id = procfs::boot_id().context("reading the boot id")?;
        let sender = match &endpoints {
            Some(endpoints) => Some(ReportSender::new(
                endpoints.clone(),
                config.auth_key.clone(),
                NodeIdentity {
                    node: config.node_name.clone(),
                    boot_id: boot_id.clone(),
                    kernel_release: procfs::kernel_release().ok(),
                },
            )?),
            None => None,
        };
        let endpoints = endpoints.unwrap_or_else(|| watch::channel(Default::default()).1);
        if netconsole_follows_controller {
            tasks.push(tokio::spawn(follow_controller_with_netconsole(
                netconsole.clone(),
                endpoints.clone(),
            )));
        }
        // After loading, so an agent that cannot load leaves the records for its next start.
        let recovered = match &config.pstore {
            Some(pstore) => pstore::recover(pstore, &boot_id, sender.as_ref()),
            None => pstore::Recovered::default(),
        };
        if let Some(sender) = &sender
            && !recovered.reports.is_empty()
        {
            tasks.push(tokio::spawn(pstore::send_reports(
                sender.clone(),
                recovered.reports,
                metrics.clone(),
            )));
        }
        let last_gasp = sender.map(LastGasp::new);
        // Only a panic() probe takes stacks to name, and only a last gasp carries them.
        let panic_probe = loaded
            .status
            .iter()
            .any(|status| status.probe == "panic" && status.mode.is_some());
        let kallsyms = (panic_probe && last_gasp.is_some())
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
        let panic_ack: Array<MapData, u64> = take_map(&mut ebpf, "PANIC_ACK")?;
        let console = ConsoleWatcher {
            last_gasp,
            kallsyms,
            panic_ack,
            events: events.clone(),
            metrics: metrics.clone(),
        }
        .spawn(kernel_log_ring, stop.clone())?;

        let pods = config.cluster.as_ref().map(|client| {
            let (pods, watch) = PodIndex::start(client.clone(), &config.node_name);
            tasks.push(watch);
            pods
        });
        let health = config.cluster.zip(pods.clone()).map(|(client, pods)| {
            let (health, observed) = watch::channel(NodeHealth::default());
            tasks.extend(node_signals::spawn(
                client,
                NodeSignalsConfig {
                    node: config.node_name.clone(),
                    netlink_hang_threshold: config.netlink_hang_threshold,
                    cni_stuck_threshold: config.cni_stuck_threshold,
                },
                pods,
                observed,
                metrics.clone(),
            ));
            health
        });
        let netlink_mode = loaded
            .status
            .iter()
            .find(|status| status.probe == "netlink_recv")
            .and_then(|status| status.mode);
        let hangs = HangTracker::new(
            threads,
            config.netlink_hang_threshold,
            pods,
            metrics.clone(),
            netlink_mode == Some(AttachMode::Kprobe),
        );
        let cni = CniTracker::new(config.cni_stuck_threshold, metrics.clone());
        tasks.push(tokio::spawn(events_loop(
            async_fd(events_ring)?,
            hangs,
            cni,
            events.clone(),
            health,
            metrics.clone(),
        )));

        let listener = metrics::bind(config.metrics_addr)
            .await
            .with_context(|| format!("binding the metrics address {}", config.metrics_addr))?;
        let metrics_addr = listener.local_addr()?;
        let registry = Arc::new(registry);
        tasks.push(tokio::spawn(async move {
            if let Err(error) = metrics::serve(listener, registry).await {
                tracing::error!(%error, "metrics server stopped");
            }
        }));
        tracing::info!(%metrics_addr, "serving metrics");

        Ok(Self {
            events,
            endpoints,
            probes: loaded.status,
            metrics_addr,
            netconsole,
            tasks,
            console: Some(console),
            stop,
            recovered: recovered.events,
            _ebpf: ebpf,
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

    /// Stops the readers and detaches every probe.
    pub async fn shutdown(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
        if let Some(console) = self.console.take() {
            let _ = tokio::task::spawn_blocking(move || console.join()).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Runs the agent until Ctrl-C or SIGTERM, logging every event.
pub async fn run(config: AgentConfig, log: EventLog) -> anyhow::Result<()> {
    let agent = Agent::start(config).await?;
    for event in agent.recovered() {
        log.write(event);
    }
    let mut events = agent.subscribe();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) => log.write(&event),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "event log fell behind; events were not logged");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
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
    Ok(())
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

async fn forward_ebpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let Ok(mut logger) = async_fd(logger) else {
        return;
    };
    loop {
        let Ok(mut guard) = logger.readable_mut().await else {
            return;
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
                let Ok(mut guard) = ready else { return };
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
