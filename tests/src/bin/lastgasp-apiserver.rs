//! Runs the in-repo test API server by hand:
//! `lastgasp-apiserver --listen 127.0.0.1:6443 --kubeconfig /tmp/lastgasp.kubeconfig`,
//! then `KUBECONFIG=/tmp/lastgasp.kubeconfig kubectl apply -f node.yaml`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use lastgasp_tests::apiserver::{ApiServer, Options};

#[derive(Parser)]
#[command(about = "A small Kubernetes API server for lastgasp tests (nodes, pods, events, leases)")]
struct Args {
    /// Address to listen on (plain HTTP).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Write a kubeconfig for the server here; printed to stdout when not given.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Seconds between watch BOOKMARK events.
    #[arg(long, default_value_t = 60)]
    bookmark_interval: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "lastgasp_tests=debug".into()),
        )
        .init();
    let args = Args::parse();
    let server = ApiServer::start_with(Options {
        listen: args.listen,
        bookmark_interval: Duration::from_secs(args.bookmark_interval.max(1)),
        ..Options::default()
    })
    .await?;
    match &args.kubeconfig {
        Some(path) => {
            std::fs::write(path, server.kubeconfig_yaml())
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("serving {} ; KUBECONFIG={}", server.url(), path.display());
        }
        None => {
            print!("{}", server.kubeconfig_yaml());
            eprintln!("serving {}", server.url());
        }
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    eprintln!("shutting down");
    // Open watches end with the server; no need to wait for them.
    drop(server);
    Ok(())
}
