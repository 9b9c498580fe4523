//! The `lastgasp` binary.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use lastgasp::{
    agent::{self, AgentConfig, events::EventLog},
    procfs,
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Watch this node's kernel with eBPF: netlink recv hangs, CNI plugin calls, kernel panics
    /// and oopses. Logs every event and serves Prometheus metrics.
    Agent(AgentArgs),
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// Run without Kubernetes: attach to the local kernel, log events, serve metrics.
    #[arg(long)]
    standalone: bool,
    /// Name of this node in reports (default: the hostname).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Address of the Prometheus metrics endpoint (`/metrics`, and `/healthz`).
    #[arg(long, default_value = "0.0.0.0:9465")]
    metrics_addr: SocketAddr,
    /// Controller's last-gasp UDP address (`host:port`); a kernel panic is reported there at once.
    #[arg(long)]
    controller: Option<String>,
    /// File with the HMAC-SHA256 key that authenticates last-gasp datagrams (raw bytes).
    /// Without it datagrams are sent unauthenticated.
    #[arg(long)]
    auth_key_file: Option<PathBuf>,
    /// A netlink recvfrom/recvmsg/recvmmsg in flight longer than this is a hang (e.g. `30s`, `500ms`).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    netlink_hang_threshold: Duration,
    /// Directory of CNI plugin binaries whose execs are traced; repeat for several (at most 8).
    #[arg(long = "cni-bin-dir", default_value = "/opt/cni/bin")]
    cni_bin_dirs: Vec<PathBuf>,
    /// A CNI plugin call running longer than this is reported as stuck.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    cni_stuck_threshold: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Agent(args) => run_agent(args, cli.log_format).await,
    }
}

async fn run_agent(args: AgentArgs, log_format: LogFormat) -> anyhow::Result<()> {
    if !args.standalone {
        anyhow::bail!(
            "only --standalone is available in this version: in-cluster mode is not built yet"
        );
    }
    let node_name = match args.node_name {
        Some(name) => name,
        None => procfs::hostname().context("reading the hostname for --node-name")?,
    };
    let controller = match &args.controller {
        Some(address) => Some(resolve(address)?),
        None => None,
    };
    let auth_key = match &args.auth_key_file {
        Some(path) => AuthKey::HmacSha256(
            std::fs::read(path).with_context(|| format!("reading --auth-key-file {path:?}"))?,
        ),
        None => AuthKey::None,
    };
    agent::run(
        AgentConfig {
            node_name,
            metrics_addr: args.metrics_addr,
            controller,
            auth_key,
            netlink_hang_threshold: args.netlink_hang_threshold,
            cni_bin_dirs: args.cni_bin_dirs,
            cni_stuck_threshold: args.cni_stuck_threshold,
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
