//! Runs the single-node test cluster (`lastgasp_tests::kube::node`) until SIGTERM or Ctrl-C,
//! then stops it and restores the host. `cargo xtask cluster up` starts it in the background
//! (with the images of `cargo xtask image`) and `cargo xtask cluster down` stops it.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use lastgasp_tests::kube::node::LocalCluster;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(about = "a single-node Kubernetes v1.20.2 cluster of plain processes")]
struct Args {
    /// Where to write `admin.kubeconfig`, and `ready` once the Node is Ready.
    #[arg(long)]
    state_dir: PathBuf,
    /// An OCI archive to import into the cluster's containerd; repeat for several.
    #[arg(long)]
    image: Vec<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let cluster = LocalCluster::start(&args.image).await?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let kubeconfig = args.state_dir.join("admin.kubeconfig");
    std::fs::copy(cluster.kubeconfig(), &kubeconfig)
        .with_context(|| format!("writing {}", kubeconfig.display()))?;
    std::fs::write(args.state_dir.join("ready"), "")?;
    eprintln!(
        "cluster ready: KUBECONFIG={}; logs in {}",
        kubeconfig.display(),
        cluster.dir().display()
    );
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("stopping the cluster");
    drop(cluster);
    let _ = std::fs::remove_file(args.state_dir.join("ready"));
    Ok(())
}
