//! The `lastgasp` binary.

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use kube::runtime::events::Reporter;
use lastgasp::{
    agent::{
        self, AgentConfig,
        discovery::ServiceRef,
        events::EventLog,
        loader::{NetlinkProbeMode, OptionalHelper},
        pstore::PstoreConfig,
        terminations::backoff::KubeletBackoff,
    },
    controller::{
        Controller, ControllerConfig,
        leader::{self, LeaderConfig, LeaderElection},
        policy::Policy,
        trust::DeletionEvidence,
    },
    health::Health,
    procfs,
    supervise::{self, InjectedPanic, Lifetime, Supervisor},
    telemetry::{self, LogFormat},
    wire::AuthKey,
};

/// Explains why Kubernetes nodes die or hang: kernel panics, netlink recv hangs, stuck CNI calls.
#[derive(Debug, Parser)]
#[command(name = "lastgasp", version)]
struct Cli {
    /// Log format: `text` for people, `json` for one object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// For tests only: the named supervised task panics once it has run for DELAY (default at
    /// once), to test how the process fails.
    #[arg(long, value_name = "TASK[:DELAY]", global = true, hide = true)]
    inject_task_panic: Option<InjectedPanic>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Watch this node's kernel with eBPF: netlink recv hangs, CNI plugin calls, kernel panics
    /// and oopses. Logs every event and serves Prometheus metrics.
    Agent(AgentArgs),
    /// Receive last-gasp reports and netconsole streams; on a node's kernel panic, mark its pods
    /// and the node with the reason, then delete them at once.
    Controller(ControllerArgs),
}

#[derive(Debug, Args)]
struct ControllerArgs {
    /// UDP address for the kernel's netconsole stream (plain and extended formats).
    #[arg(long, default_value = "0.0.0.0:6666")]
    netconsole_addr: SocketAddr,
    /// UDP address for the agents' last-gasp reports.
    #[arg(long, default_value = "0.0.0.0:6667")]
    report_addr: SocketAddr,
    /// Address of the Prometheus metrics endpoint (`/metrics`, and `/healthz`).
    #[arg(long, default_value = "0.0.0.0:9466")]
    metrics_addr: SocketAddr,
    /// File with the HMAC-SHA256 key the agents sign reports with (raw bytes, at least 16,
    /// e.g. a mounted Secret). Required unless --insecure-allow-unsigned.
    #[arg(long, required_unless_present = "insecure_allow_unsigned")]
    auth_key_file: Option<PathBuf>,
    /// Accept unsigned reports instead of requiring --auth-key-file. Anyone who can send UDP to
    /// the controller can then report a panic for any node from its address; such reports
    /// still never delete (only a signed `panic()` report or a node seen dead does).
    #[arg(long, conflicts_with = "auth_key_file")]
    insecure_allow_unsigned: bool,
    /// How far to go: mark only, mark and delete the pods, or also delete the node.
    #[arg(long, value_enum, default_value_t = Policy::DeletePodsAndNode)]
    policy: Policy,
    /// Log what would be written to Kubernetes and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Pods of one node written concurrently.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Circuit breaker: at most this many nodes acted on per window; beyond, mark only.
    #[arg(long, default_value_t = 3)]
    breaker_max_nodes: usize,
    /// Circuit breaker window.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    breaker_window: Duration,
    /// Which evidence deletes at once: `verified` (a signed `panic()` report from the node's
    /// own address, for its current boot, fresh) or `any` (netconsole text too: anyone who can
    /// send UDP from a node's address can then delete it). Other evidence marks, and deletes
    /// only once the node is seen dead.
    #[arg(long, value_enum, default_value_t = DeletionEvidence::Verified)]
    deletion_evidence: DeletionEvidence,
    /// A node whose heartbeat Lease (kube-node-lease) the controller has seen unchanged for this
    /// long, by its own clock, is dead.
    #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
    node_dead_after: Duration,
    /// How long marked pods and node wait for the node to be seen dead (or for better
    /// evidence) when the evidence may not delete; then the controller gives up deleting and
    /// says why in an Event on the node.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    mark_wait: Duration,
    /// Run several replicas: only the holder of the leader Lease writes to Kubernetes.
    #[arg(long)]
    leader_election: bool,
    /// Namespace of the leader Lease (and of this replica's pod).
    #[arg(long, env = "POD_NAMESPACE", default_value = "lastgasp-system")]
    leader_election_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "lastgasp-controller")]
    leader_election_lease: String,
    /// This replica's pod name: its leader identity, and the pod it labels
    /// `lastgasp.io/leader=true` while leading (default: the hostname).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// Run without Kubernetes: attach to the local kernel, log events, serve metrics.
    /// Without it the agent uses in-cluster credentials (or KUBECONFIG) to name the pod and
    /// container of hung threads, watching only this node's pods.
    #[arg(long)]
    standalone: bool,
    /// Name of this node, in reports and for the pod watch (default: the hostname; in a
    /// DaemonSet set NODE_NAME from spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The node's address the controller knows it by: its InternalIP (in a DaemonSet set
    /// NODE_IP from status.hostIP). Last-gasp datagrams and netconsole leave from it, whatever
    /// interface the route to the controller takes (an overlay's, the pod bridge's): the
    /// controller accepts a node's reports and console only from that address. Unset: the
    /// source address of the route.
    #[arg(long, env = "NODE_IP")]
    node_ip: Option<IpAddr>,
    /// Address of the Prometheus metrics endpoint (`/metrics`, and `/healthz`).
    #[arg(long, default_value = "0.0.0.0:9465")]
    metrics_addr: SocketAddr,
    /// A fixed last-gasp UDP address of the controller (`host:port`, resolved once at start);
    /// a kernel panic is reported there at once. Replaces --controller-service.
    #[arg(long, conflicts_with = "controller_service")]
    controller: Option<String>,
    /// In a cluster, the controller's ingest Service (`NAMESPACE/NAME`): the agent watches its
    /// EndpointSlices and reports panics to every ready endpoint's `reports` port, following
    /// leader changes. Pod addresses, not the ClusterIP: netconsole bypasses kube-proxy.
    #[arg(
        long,
        default_value = "lastgasp-system/lastgasp-controller-ingest",
        conflicts_with = "standalone"
    )]
    controller_service: ServiceRef,
    /// File with the HMAC-SHA256 key that authenticates last-gasp datagrams (raw bytes).
    /// Without it datagrams are sent unauthenticated.
    #[arg(long)]
    auth_key_file: Option<PathBuf>,
    /// Controller's netconsole UDP address (`host:port`, IPv4 only): the agent configures a
    /// kernel netconsole target sending there (extended format), which still reports a panic
    /// when the agent cannot. Repeat for several. The targets stay after the agent exits.
    #[arg(long = "netconsole-target", value_name = "HOST:PORT", value_parser = parse_ipv4_target)]
    netconsole_targets: Vec<SocketAddrV4>,
    /// A netlink recvfrom/recvmsg/recvmmsg in flight longer than this is a hang (e.g. `30s`, `500ms`).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    netlink_hang_threshold: Duration,
    /// How the netlink recv probe attaches: `auto` takes the best the kernel allows (fentry/fexit
    /// on netlink_recvmsg, else kprobe/kretprobe, else the recv syscall tracepoints); another
    /// value forces that mode, and the probe is unavailable if the kernel refuses it.
    #[arg(long, value_enum, default_value_t = NetlinkProbeMode::Auto)]
    netlink_probe: NetlinkProbeMode,
    /// Treat this BPF helper as missing although the kernel has it, to run the fallback that
    /// older kernels get (repeat for several). The start-up log and `lastgasp_probe_info`
    /// name what each missing helper degrades.
    #[arg(long = "ignore-bpf-helper", value_enum, value_name = "HELPER")]
    ignore_helpers: Vec<OptionalHelper>,
    /// Directory of CNI plugin binaries whose execs are traced; repeat for several (at most 8).
    #[arg(long = "cni-bin-dir", default_value = "/opt/cni/bin")]
    cni_bin_dirs: Vec<PathBuf>,
    /// A CNI plugin call running longer than this is reported as stuck.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    cni_stuck_threshold: Duration,
    /// A pod cgroup root (kubelet's `--cgroup-root` + `kubepods`) whose processes' ends are
    /// explained; repeat for several (at most 4, all in one hierarchy). Default: those of
    /// /sys/fs/cgroup/kubepods.slice and /sys/fs/cgroup/kubepods (cgroup v2), or of
    /// /sys/fs/cgroup/memory/kubepods.slice and /sys/fs/cgroup/memory/kubepods (v1), that exist.
    #[arg(long = "pod-cgroup-root", value_name = "DIR")]
    pod_cgroup_roots: Vec<PathBuf>,
    /// Where panic() can be probed (kprobe/fentry), hold the panicking CPU up to this long
    /// until the last gasp is sent: other CPUs, and the agent, are stopped moments after
    /// panic() begins. `0s` disables it.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    panic_hold: Duration,
    /// pstorefs, where the kernel leaves the previous boot's panic records; mounted there if
    /// nothing is mounted and the directory is empty. Records found are reported to the
    /// controller as the previous boot's panic, archived in --state-dir and removed.
    #[arg(long, default_value = "/sys/fs/pstore")]
    pstore_dir: PathBuf,
    /// The node's kubelet's container restart back-off, for saying in a terminated
    /// container's Event when kubelet starts it again: `classic` (10s doubling to 300s),
    /// `reduced` (gate ReduceDefaultCrashLoopBackOffDecay: 1s to 60s), `max=DUR` (gate
    /// KubeletCrashLoopBackOffMax with crashLoopBackOff.maxContainerRestartPeriod DUR, 1s to
    /// 300s) or `reduced,max=DUR` (both gates).
    #[arg(long, default_value = "classic", value_name = "RULES")]
    kubelet_backoff: KubeletBackoff,
    /// The agent's state across reboots: the boots it has seen (so a panic record names the
    /// boot that crashed) and `pstore-archive/` with the records it reported. Created if missing.
    #[arg(long, default_value = "/var/lib/lastgasp")]
    state_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    if let Some(injected) = cli.inject_task_panic {
        supervise::inject_panic(injected);
    }
    match cli.command {
        Command::Agent(args) => run_agent(args, cli.log_format).await,
        Command::Controller(args) => run_controller(args).await,
    }
}

async fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    // Before anything starts: a bad key is a configuration error, not a runtime one.
    let auth_key = read_auth_key(args.auth_key_file.as_deref())?;
    if auth_key == AuthKey::None {
        tracing::warn!(
            "--insecure-allow-unsigned: reports are not authenticated; none of them deletes"
        );
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster, or KUBECONFIG)")?;
    let identity = match args.pod_name.clone() {
        Some(name) => name,
        None => procfs::hostname().context("reading the hostname for --pod-name")?,
    };
    // Leader election runs beside the controller, under a supervisor of its own sharing the
    // controller's health: its end would leave `is_leader` stuck at its last value.
    let health = Health::default();
    let mut tasks = Supervisor::new(health.clone());
    let election = args.leader_election.then(|| {
        let (election, campaign) = LeaderElection::new(
            client.clone(),
            LeaderConfig {
                namespace: args.leader_election_namespace.clone(),
                lease_name: args.leader_election_lease.clone(),
                identity: identity.clone(),
                lease_duration: Duration::from_secs(15),
                renew_interval: Duration::from_secs(5),
                retry_interval: Duration::from_secs(2),
            },
        );
        tasks.spawn("leader-election", Lifetime::Required, campaign);
        election
    });
    let leader = election.as_ref().map(LeaderElection::is_leader);
    let labeller = match (&leader, &args.pod_name) {
        (Some(leading), Some(pod)) => Some(tasks.spawn(
            "leader-label",
            Lifetime::Required,
            leader::label_own_pod(
                client.clone(),
                args.leader_election_namespace.clone(),
                pod.clone(),
                leading.clone(),
            ),
        )),
        _ => None,
    };
    let start = Controller::start(
        client,
        ControllerConfig {
            netconsole_addr: args.netconsole_addr,
            report_addr: args.report_addr,
            metrics_addr: args.metrics_addr,
            auth_key,
            policy: args.policy,
            dry_run: args.dry_run,
            concurrency: args.concurrency,
            breaker_max_nodes: args.breaker_max_nodes,
            breaker_window: args.breaker_window,
            deletion_evidence: args.deletion_evidence,
            node_dead_after: args.node_dead_after,
            mark_wait: args.mark_wait,
            leader,
            reporter: Reporter {
                controller: "lastgasp-controller".into(),
                instance: Some(identity),
            },
            health,
        },
    );
    let mut controller = tokio::select! {
        controller = start => controller?,
        failure = tasks.failed() => return Err(failure.into()),
    };
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate.recv() => Ok(()),
        failure = controller.failed() => Err(failure),
        failure = tasks.failed() => Err(failure),
    };
    tracing::info!("stopping");
    // Leadership first, while /healthz still answers (503 after a failure): `is_leader` turns
    // false, which stops the controller's writes, before the lease is released.
    if let Some(labeller) = labeller {
        labeller.abort();
    }
    if let Some(election) = election {
        election.stop().await;
    }
    controller.shutdown();
    Ok(outcome?)
}

fn read_auth_key(path: Option<&std::path::Path>) -> anyhow::Result<AuthKey> {
    Ok(match path {
        Some(path) => {
            let secret =
                std::fs::read(path).with_context(|| format!("reading --auth-key-file {path:?}"))?;
            AuthKey::hmac(secret).with_context(|| format!("--auth-key-file {path:?}"))?
        }
        None => AuthKey::None,
    })
}

async fn run_agent(args: AgentArgs, log_format: LogFormat) -> anyhow::Result<()> {
    let node_name = match args.node_name {
        Some(name) => name,
        None => procfs::hostname().context("reading the hostname for --node-name")?,
    };
    let controller = match &args.controller {
        Some(address) => Some(resolve(address)?),
        None => None,
    };
    let auth_key = read_auth_key(args.auth_key_file.as_deref())?;
    let cluster = if args.standalone {
        None
    } else {
        Some(
            kube::Client::try_default()
                .await
                .context("connecting to Kubernetes (in-cluster, or KUBECONFIG); use --standalone to run without it")?,
        )
    };
    // A fixed --controller wins over the Service (whose default is always set); standalone has
    // no Kubernetes to watch.
    let controller_service =
        (controller.is_none() && !args.standalone).then_some(args.controller_service);
    agent::run(
        AgentConfig {
            node_name,
            node_ip: args.node_ip,
            metrics_addr: args.metrics_addr,
            controller,
            controller_service,
            netconsole_targets: args.netconsole_targets,
            auth_key,
            netlink_hang_threshold: args.netlink_hang_threshold,
            netlink_probe: args.netlink_probe,
            ignore_helpers: args.ignore_helpers,
            cni_bin_dirs: args.cni_bin_dirs,
            cni_stuck_threshold: args.cni_stuck_threshold,
            panic_hold: args.panic_hold,
            cluster,
            pstore: Some(PstoreConfig {
                dir: args.pstore_dir,
                state_dir: args.state_dir,
            }),
            kubelet_backoff: args.kubelet_backoff,
            pod_cgroup_roots: args.pod_cgroup_roots,
        },
        EventLog::new(log_format),
    )
    .await
}

fn resolve(address: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs as _;
    address
        .to_socket_addrs()
        .with_context(|| format!("--controller {address:?} is not a host:port"))?
        .next()
        .with_context(|| format!("--controller {address:?} resolves to no address"))
}

/// `--netconsole-target`: an IPv4 `address:port`, or a `host:port` resolving to one.
fn parse_ipv4_target(value: &str) -> Result<SocketAddrV4, String> {
    use std::net::ToSocketAddrs as _;
    if let Ok(address) = value.parse() {
        return Ok(address);
    }
    let addresses = value.to_socket_addrs().map_err(|error| {
        format!("not an IPv4 address:port, nor a host:port that resolves: {error}")
    })?;
    addresses
        .filter_map(|address| match address {
            SocketAddr::V4(v4) => Some(v4),
            SocketAddr::V6(_) => None,
        })
        .next()
        .ok_or_else(|| "resolves to no IPv4 address; netconsole targets are IPv4 only".to_owned())
}
