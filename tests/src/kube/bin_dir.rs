//! Where `cargo xtask kube` caches the Kubernetes binaries and where the tests find them.
//! Only std is used here: xtask compiles this file too (`#[path]`).

use std::path::PathBuf;

/// The Kubernetes release built: Debian bookworm's source package `kubernetes`
/// (`1.20.5+really1.20.2-…`), upstream v1.20.2 with its `vendor/`.
pub const KUBERNETES_VERSION: &str = "1.20.2";

/// Overrides [`bin_dir`]: a directory holding `kube-apiserver` and `etcd`.
pub const BIN_DIR_ENV: &str = "LASTGASP_KUBE_BIN_DIR";

/// The kube-apiserver binary's name in [`bin_dir`].
pub const KUBE_APISERVER: &str = "kube-apiserver";

/// The etcd binary's name in [`bin_dir`] (Debian bookworm's `etcd-server`, 3.4).
pub const ETCD: &str = "etcd";

/// The node and control-plane binaries of the single-node cluster (`cargo xtask cluster`),
/// built from the same tree as [`KUBE_APISERVER`].
pub const KUBELET: &str = "kubelet";
pub const KUBE_SCHEDULER: &str = "kube-scheduler";
pub const KUBE_CONTROLLER_MANAGER: &str = "kube-controller-manager";

/// The test cluster's one local image besides lastgasp's (`cargo xtask cluster`), an OCI
/// archive in [`cache_root`]: `/pause`, the sandbox containerd's CRI plugin runs, and for the
/// tests' containers `/netlink-recv`, a process blocked in NETLINK_ROUTE `recvfrom`, and
/// `/memhog [child]`, which touches memory until the OOM killer stops it (or its child);
/// `/pause ignore-term` sleeps through SIGTERM.
/// The tag changes with its content, so a cached archive of an older one is rebuilt.
pub const PAUSE_ARCHIVE: &str = "pause-4.oci.tar";
/// The name that image is imported under.
pub const PAUSE_IMAGE: &str = "localhost/lastgasp-pause:4";

/// `$LASTGASP_KUBE_BIN_DIR` if set, else `kubernetes-<version>` in the per-user cache:
/// `$XDG_CACHE_HOME/lastgasp/`, else `$HOME/.cache/lastgasp/`. Outside `target/`, so
/// `cargo clean` and fresh clones keep using one build. `None` without a usable `$HOME`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV).filter(|dir| !dir.is_empty()) {
        return Some(dir.into());
    }
    Some(cache_root()?.join(format!("kubernetes-{KUBERNETES_VERSION}")))
}

/// `$XDG_CACHE_HOME/lastgasp`, else `$HOME/.cache/lastgasp` (relative values are ignored, as
/// the XDG specification says).
pub fn cache_root() -> Option<PathBuf> {
    let absolute = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|path| path.is_absolute())
    };
    let cache = absolute("XDG_CACHE_HOME").or_else(|| Some(absolute("HOME")?.join(".cache")))?;
    Some(cache.join("lastgasp"))
}
