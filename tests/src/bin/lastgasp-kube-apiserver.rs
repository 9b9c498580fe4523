//! Runs the tests' real kube-apiserver v1.20.2 (and its etcd) by hand, with `deploy/`'s
//! namespace and RBAC applied, until Ctrl-C:
//! `lastgasp-kube-apiserver --kubeconfig-dir /tmp/lastgasp-kube`, then
//! `KUBECONFIG=/tmp/lastgasp-kube/admin.kubeconfig kubectl get ns`.
//! Needs the binaries of `cargo xtask kube`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use lastgasp_tests::kube::{RealApiServer, User, seed::create_deploy_rbac};

#[derive(Parser)]
#[command(about = "kube-apiserver v1.20.2 on etcd, on loopback, for trying lastgasp by hand")]
struct Args {
    /// Where to write `admin.kubeconfig`, `controller.kubeconfig` and `agent.kubeconfig` (the
    /// last two as `deploy/`'s ServiceAccounts).
    #[arg(long)]
    kubeconfig_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = RealApiServer::start().await?;
    create_deploy_rbac(&server.admin_client().await?).await?;
    std::fs::create_dir_all(&args.kubeconfig_dir)
        .with_context(|| format!("creating {}", args.kubeconfig_dir.display()))?;
    for (file, user) in [
        ("admin.kubeconfig", User::Admin),
        (
            "controller.kubeconfig",
            User::service_account("lastgasp-system", "lastgasp-controller"),
        ),
        (
            "agent.kubeconfig",
            User::service_account("lastgasp-system", "lastgasp-agent"),
        ),
    ] {
        let path = args.kubeconfig_dir.join(file);
        std::fs::write(&path, server.kubeconfig_yaml(&user)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "serving {} (logs in {}); kubeconfigs in {}",
        server.url(),
        server.dir().display(),
        args.kubeconfig_dir.display()
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    eprintln!("shutting down");
    drop(server);
    Ok(())
}
