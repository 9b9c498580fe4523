//! A real single-node Kubernetes v1.20.2 cluster, every part a process of this test: etcd and
//! kube-apiserver ([`RealApiServer`]), kube-controller-manager, kube-scheduler, kubelet, and a
//! containerd of its own running pods with runc and Debian's CNI plugins (`/usr/lib/cni`).
//!
//! The node's address [`NODE_IP`] is a /32 on an empty bridge of its own, made before kubelet
//! starts (kubelet refuses a loopback `--node-ip`); kubelet and the API server (on [`API_PORT`])
//! listen there. The pods are on another bridge, whose gateway address [`POD_GATEWAY`] is the
//! source the kernel prefers for the host's packets to pods, as an overlay's or a pod bridge's
//! address is on real nodes: the agent must send its reports from the Node's InternalIP
//! itself for the controller to recognise them. Pods get one route, to [`NODE_IP`] through the
//! gateway. Nothing leaves the machine: no default route, no masquerading, no registry (the
//! images are imported OCI archives).
//! Those addresses are fixed (`deploy/overlays/test-cluster` names them), so one cluster runs
//! on a machine at a time (a lock in `/run`).
//!
//! kubelet and containerd change the host; [`LocalCluster`] records what it finds first and
//! puts it back on drop: the sysctls kubelet and the bridge plugin set, the directories they
//! create (`/var/log/pods`, `/var/lib/cni`, `/run/containerd`, ...), the `kubepods` cgroups,
//! network namespaces, mounts and links. Processes left by containerd (shims, containers) are
//! killed by cgroup and by command line.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    os::{fd::AsRawFd as _, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Namespace, Node, Secret};
use kube::{Api, api::PostParams};

use super::{Options, RealApiServer, User, bin_dir, process::Supervisor};

/// The node's InternalIP, where kubelet and the API server listen.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 249, 1);
/// The pod bridge's address: the pods' gateway, and the source the host's route to them prefers.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 31, 250, 1);
/// The API server's port on [`NODE_IP`].
pub const API_PORT: u16 = 6443;
/// The pods' network (the CNI bridge, host-local addresses).
pub const POD_SUBNET: &str = "172.31.250.0/24";
/// Where `deploy/` puts lastgasp.
pub const LASTGASP_NAMESPACE: &str = "lastgasp-system";
/// The Node's name.
pub const NODE_NAME: &str = "lastgasp-node";
/// Where Debian's `containernetworking-plugins` are, which containerd runs.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The pods' bridge.
const BRIDGE: &str = "lg-cni0";
/// The pods' bridge's MAC address, set so that it stays. A bridge whose address was never set
/// takes the lowest of its ports' addresses, so a new pod's veth can change it; the pods that
/// talk to the API server through the gateway then send to the old address, and their
/// requests stall until their ARP entry for the gateway is renewed (tens of seconds).
const BRIDGE_MAC: &str = "02:00:ac:1f:fa:01";
/// The empty bridge holding [`NODE_IP`].
const NODE_LINK: &str = "lg-node0";
const CNI_CONFLIST: &str = "cni/10-lastgasp.conflist";
const CNI_RESULTS: &str = "/var/lib/cni/results";
const LOCK: &str = "/run/lastgasp-cluster.lock";
/// How long the node may take to be Ready (about 20 s here).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Sysctls kubelet (`vm.*`, `kernel.*`) and the bridge plugin (`ip_forward`) set.
const SYSCTLS: [&str; 4] = [
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
    "net/ipv4/ip_forward",
];
/// Directories kubelet, containerd, the CNI plugins and pods create outside the cluster's own.
const HOST_DIRS: [&str; 7] = [
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/run/containerd",
    "/run/netns",
    // The agent's state directory (deploy/'s hostPath).
    "/var/lib/lastgasp",
];

/// A running single-node cluster; everything stops and the host is restored on drop.
pub struct LocalCluster {
    dir: PathBuf,
    processes: Supervisor,
    server: Option<RealApiServer>,
    host: HostState,
    _lock: fs::File,
}

impl LocalCluster {
    /// Starts the cluster with the OCI archives `images` imported into its containerd, and
    /// returns once its Node is Ready.
    pub async fn start(images: &[PathBuf]) -> anyhow::Result<Self> {
        let lock = lock()?;
        let dir = Path::new("/dev/shm").join(format!("lastgasp-cluster-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let host = HostState::save()?;
        let mut cluster = Self {
            dir,
            processes: Supervisor::new(),
            server: None,
            host,
            _lock: lock,
        };
        cluster.boot(images).await?;
        Ok(cluster)
    }

    async fn boot(&mut self, images: &[PathBuf]) -> anyhow::Result<()> {
        let started = Instant::now();
        let bins = bin_dir::bin_dir().context("no cache directory for the Kubernetes binaries")?;
        let bin = |name: &str| -> anyhow::Result<PathBuf> {
            let path = bins.join(name);
            if !path.is_file() {
                bail!("{} is missing: run `cargo xtask kube`", path.display());
            }
            Ok(path)
        };
        let (kubelet, scheduler, controller_manager) = (
            bin(bin_dir::KUBELET)?,
            bin(bin_dir::KUBE_SCHEDULER)?,
            bin(bin_dir::KUBE_CONTROLLER_MANAGER)?,
        );
        let pause = bin_dir::cache_root()
            .context("no cache directory")?
            .join(bin_dir::PAUSE_ARCHIVE);
        if !pause.is_file() {
            bail!(
                "{} is missing: run `cargo xtask cluster up` once",
                pause.display()
            );
        }

        ip(&["link", "add", NODE_LINK, "type", "bridge"])?;
        self.host.links.push(NODE_LINK.to_owned());
        ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", NODE_LINK])?;
        ip(&["link", "set", NODE_LINK, "up"])?;
        ip(&[
            "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge",
        ])?;
        self.host.links.push(BRIDGE.to_owned());
        ip(&["addr", "add", &format!("{POD_GATEWAY}/24"), "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;

        let server = RealApiServer::start_with(Options {
            node: Some(SocketAddrV4::new(NODE_IP, API_PORT)),
            ..Options::default()
        })
        .await?;
        let kubeconfig = self.write("admin.kubeconfig", &server.kubeconfig_yaml(&User::Admin)?)?;
        let ca = server.dir().join("ca.crt");
        let sa_key = server.dir().join("service-account.key");
        let admin = server.admin_client().await?;
        self.server = Some(server);

        let socket = self.dir.join("containerd.sock");
        let config = self.write("containerd.toml", &self.containerd_config(&socket))?;
        self.write(CNI_CONFLIST, &cni_config(&self.dir.join("cni-ipam")))?;
        let mut containerd = Command::new("containerd");
        containerd.arg("--config").arg(&config);
        self.spawn("containerd", containerd)?;
        self.wait("containerd's socket", || async { socket.exists() })
            .await?;
        for image in std::iter::once(&pause).chain(images) {
            let output = Command::new("ctr")
                .arg("--address")
                .arg(&socket)
                .args(["--namespace", "k8s.io", "images", "import"])
                .arg(image)
                .output()
                .context("running ctr")?;
            if !output.status.success() {
                bail!(
                    "ctr images import {} failed: {}",
                    image.display(),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }

        let path = |flag: &str, path: &Path| format!("--{flag}={}", path.display());
        let mut command = Command::new(controller_manager);
        command
            .arg(path("kubeconfig", &kubeconfig))
            .arg(path("service-account-private-key-file", &sa_key))
            .arg(path("root-ca-file", &ca))
            .arg(
                "--controllers=nodelifecycle,serviceaccount,serviceaccount-token,daemonset,\
                 deployment,replicaset,garbagecollector,podgc,endpointslice",
            )
            .args(["--leader-elect=false", "--port=0", "--secure-port=0"]);
        self.spawn("kube-controller-manager", command)?;
        let mut command = Command::new(scheduler);
        command.arg(path("kubeconfig", &kubeconfig)).args([
            "--leader-elect=false",
            "--port=0",
            "--secure-port=0",
        ]);
        self.spawn("kube-scheduler", command)?;

        let root = self.dir.join("kubelet");
        fs::create_dir_all(&root)?;
        let mut command = Command::new(kubelet);
        command
            // Otherwise kubelet's AWS SDK probes the metadata address off this machine.
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .arg(path("kubeconfig", &kubeconfig))
            .arg(path("root-dir", &root))
            .arg(path("cert-dir", &root.join("pki")))
            .arg(path("seccomp-profile-root", &root.join("seccomp")))
            .arg(path("volume-plugin-dir", &root.join("volume-plugins")))
            .arg(path("client-ca-file", &ca))
            .arg(format!(
                "--container-runtime-endpoint=unix://{}",
                socket.display()
            ))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={NODE_IP}"))
            .arg(format!("--address={NODE_IP}"))
            .args([
                "--container-runtime=remote",
                "--cgroup-driver=cgroupfs",
                "--fail-swap-on=false",
                // This machine's processes may not raise their limits (no CAP_SYS_RESOURCE).
                "--max-open-files=20000",
                "--oom-score-adj=0",
                "--make-iptables-util-chains=false",
                "--eviction-hard=memory.available<1Mi,nodefs.available<1%,imagefs.available<1%",
                "--image-gc-high-threshold=100",
                "--image-gc-low-threshold=99",
                "--read-only-port=0",
                "--healthz-port=0",
                "--anonymous-auth=false",
                "--authorization-mode=AlwaysAllow",
                "--runtime-request-timeout=2m",
            ]);
        self.spawn("kubelet", command)?;

        let nodes: Api<Node> = Api::all(admin);
        self.wait("the Node to be Ready", || async {
            let Ok(Some(node)) = nodes.get_opt(NODE_NAME).await else {
                return false;
            };
            node.status
                .and_then(|status| status.conditions)
                .unwrap_or_default()
                .iter()
                .any(|condition| condition.type_ == "Ready" && condition.status == "True")
        })
        .await?;
        tracing::info!(took = ?started.elapsed(), "single-node cluster ready");
        Ok(())
    }

    /// Installs `binary` as the CNI plugin `name` in [`CNI_BIN_DIR`] (removed on drop) and
    /// appends it to the chain containerd runs for new sandboxes.
    pub fn add_cni_plugin(&mut self, binary: &Path, name: &str) -> anyhow::Result<()> {
        let installed = Path::new(CNI_BIN_DIR).join(name);
        if installed.exists() {
            bail!("{} exists already", installed.display());
        }
        self.host.installed.push(installed.clone());
        fs::copy(binary, &installed)
            .with_context(|| format!("installing {}", installed.display()))?;
        self.edit_cni_chain(|plugins| plugins.push(serde_json::json!({ "type": name })))
    }

    /// Takes the CNI plugin `name` out of the chain (new sandboxes only).
    pub fn remove_cni_plugin(&mut self, name: &str) -> anyhow::Result<()> {
        self.edit_cni_chain(|plugins| plugins.retain(|plugin| plugin["type"] != name))
    }

    fn edit_cni_chain(&self, edit: impl FnOnce(&mut Vec<serde_json::Value>)) -> anyhow::Result<()> {
        let path = self.dir.join(CNI_CONFLIST);
        let mut config: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path)?)?;
        let mut plugins: Vec<serde_json::Value> =
            serde_json::from_value(config["plugins"].take()).context("the conflist's plugins")?;
        edit(&mut plugins);
        config["plugins"] = plugins.into();
        // containerd watches the directory: the new chain applies to the next sandbox.
        self.write(CNI_CONFLIST, &config.to_string())?;
        Ok(())
    }

    /// The API server.
    pub fn server(&self) -> &RealApiServer {
        self.server.as_ref().expect("started")
    }

    /// lastgasp deployed as `deploy/README.md` says, with the test overlay: the
    /// `lastgasp-system` Namespace, the `lastgasp-auth` Secret, then `kubectl apply -k
    /// deploy/overlays/test-cluster` (the image archive must have been imported at start).
    pub async fn deploy_lastgasp(&self) -> anyhow::Result<()> {
        let admin = self.server().admin_client().await?;
        let namespace: Namespace = serde_json::from_value(
            serde_json::json!({ "metadata": { "name": LASTGASP_NAMESPACE } }),
        )?;
        Api::<Namespace>::all(admin.clone())
            .create(&PostParams::default(), &namespace)
            .await?;
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "lastgasp-auth" },
            "stringData": { "key": "cluster-test-key-0123456789abcdef" },
        }))?;
        Api::<Secret>::namespaced(admin, LASTGASP_NAMESPACE)
            .create(&PostParams::default(), &secret)
            .await?;
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("tests/ is inside the workspace")?;
        let output = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(["apply", "-k", "deploy/overlays/test-cluster"])
            .current_dir(workspace)
            .output()
            .context("running kubectl")?;
        if !output.status.success() {
            bail!(
                "kubectl apply -k deploy/overlays/test-cluster: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// The admin kubeconfig (for `kubectl --kubeconfig`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// The directory of the cluster's files and its processes' logs (`<process>.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last `lines` lines of a process's log (`kubelet`, `containerd`, ...).
    pub fn log_tail(&self, process: &str, lines: usize) -> String {
        let log = fs::read_to_string(self.dir.join(format!("{process}.log"))).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn write(&self, name: &str, contents: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }

    fn spawn(&self, name: &str, mut command: Command) -> anyhow::Result<()> {
        let log = fs::File::create(self.dir.join(format!("{name}.log")))?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.processes
            .spawn(name, command)
            .with_context(|| format!("starting {name}"))?;
        Ok(())
    }

    /// Polls `ready` every 200 ms until it holds; fails when one of the processes exited or
    /// after [`READY_TIMEOUT`].
    async fn wait<F, Fut>(&self, what: &str, mut ready: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if ready().await {
                return Ok(());
            }
            for process in [
                "containerd",
                "kube-controller-manager",
                "kube-scheduler",
                "kubelet",
            ] {
                if let Some(status) = self.processes.exit_status(process) {
                    bail!(
                        "{process} exited ({status}) while waiting for {what}; its log ends:\n{}",
                        self.log_tail(process, 30)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{what} not within {READY_TIMEOUT:?}; kubelet's log ends:\n{}",
                    self.log_tail("kubelet", 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn containerd_config(&self, socket: &Path) -> String {
        let dir = self.dir.display();
        format!(
            r#"version = 2
root = "{dir}/containerd/root"
state = "{dir}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.grpc.v1.cri.v1.restart"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{dir}/cni"
"#,
            socket = socket.display(),
            pause_image = bin_dir::PAUSE_IMAGE,
        )
    }
}

/// The pod network: the pods' bridge with host-local addresses in [`POD_SUBNET`] (the gateway,
/// [`POD_GATEWAY`], excluded), and a route to the node's address. No default route, no
/// masquerading.
fn cni_config(ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "lastgasp-test",
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": POD_SUBNET }]],
                "gateway": POD_GATEWAY.to_string(),
                "routes": [{ "dst": format!("{NODE_IP}/32") }],
                "dataDir": ipam_dir,
            },
        }],
    })
    .to_string()
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // kubelet and the control plane first, so nothing restarts what is torn down below.
        self.processes.stop();
        if std::thread::panicking() {
            eprintln!(
                "the cluster's logs are in {}; kubelet's ends:\n{}",
                self.dir.display(),
                self.log_tail("kubelet", 20)
            );
        }
        self.server = None;
        // Containers and shims outlive containerd.
        kill_cgroup_processes();
        kill_processes_mentioning(&self.dir);
        self.host.restore(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The one cluster of this machine (fixed addresses): an exclusive `flock`, held while it runs.
fn lock() -> anyhow::Result<fs::File> {
    let file = fs::File::create(LOCK).with_context(|| format!("creating {LOCK}"))?;
    // SAFETY: flock on an open descriptor has no other preconditions.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another single-node cluster runs on this machine (lock {LOCK})");
    }
    Ok(file)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !output.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// What the host looked like before the cluster, and what the cluster added.
struct HostState {
    sysctls: Vec<(&'static str, String)>,
    missing_dirs: Vec<&'static str>,
    netns: Vec<String>,
    cni_results: Vec<String>,
    /// cgroup v1 hierarchies (or the v2 root) without a `kubepods` cgroup.
    cgroup_roots: Vec<PathBuf>,
    links: Vec<String>,
    /// Files the cluster put outside its directory (test CNI plugins).
    installed: Vec<PathBuf>,
}

impl HostState {
    fn save() -> anyhow::Result<Self> {
        let mut sysctls = Vec::new();
        for name in SYSCTLS {
            let path = Path::new("/proc/sys").join(name);
            let value =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            sysctls.push((name, value.trim().to_owned()));
        }
        let cgroup_roots = cgroup_roots()
            .into_iter()
            .filter(|root| !root.join("kubepods").exists())
            .collect();
        Ok(Self {
            sysctls,
            missing_dirs: HOST_DIRS
                .into_iter()
                .filter(|dir| !Path::new(dir).exists())
                .collect(),
            netns: list_dir(Path::new("/run/netns")),
            cni_results: list_dir(Path::new(CNI_RESULTS)),
            cgroup_roots,
            links: Vec::new(),
            installed: Vec::new(),
        })
    }

    /// Puts back what [`Self::save`] saw; best effort, reporting what it could not undo.
    fn restore(&self, cluster_dir: &Path) {
        let mut failures = Vec::new();
        // Mounts: the pods' volumes and rootfs, network namespaces, shims' state.
        let new_netns: Vec<PathBuf> = list_dir(Path::new("/run/netns"))
            .into_iter()
            .filter(|name| !self.netns.contains(name))
            .map(|name| Path::new("/run/netns").join(name))
            .collect();
        let mut roots: Vec<PathBuf> = vec![cluster_dir.to_owned()];
        roots.extend(new_netns.iter().cloned());
        roots.extend(self.missing_dirs.iter().map(PathBuf::from));
        for mount in mounts_under(&roots) {
            let target = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes())
                .expect("a path without NUL");
            // SAFETY: the path is NUL-terminated and outlives the call.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                failures.push(format!(
                    "umount {}: {}",
                    mount.display(),
                    std::io::Error::last_os_error()
                ));
            }
        }
        for netns in &new_netns {
            let _ = fs::remove_file(netns);
        }
        // containerd's CNI library caches each ADD's result in /var/lib/cni/results.
        for name in list_dir(Path::new(CNI_RESULTS)) {
            if !self.cni_results.contains(&name) {
                let _ = fs::remove_file(Path::new(CNI_RESULTS).join(name));
            }
        }
        for link in &self.links {
            if Path::new("/sys/class/net").join(link).exists()
                && let Err(error) = ip(&["link", "del", link])
            {
                failures.push(error.to_string());
            }
        }
        for root in &self.cgroup_roots {
            if let Err(error) = remove_cgroup_tree(&root.join("kubepods")) {
                failures.push(error);
            }
        }
        for dir in &self.missing_dirs {
            if Path::new(dir).exists()
                && let Err(error) = fs::remove_dir_all(dir)
            {
                failures.push(format!("removing {dir}: {error}"));
            }
        }
        for file in &self.installed {
            // A plugin still running (one that hangs) is containerd's child, not in a pod.
            kill_processes_mentioning(file);
            if let Err(error) = fs::remove_file(file) {
                failures.push(format!("removing {}: {error}", file.display()));
            }
        }
        for (name, value) in &self.sysctls {
            let path = Path::new("/proc/sys").join(name);
            if let Err(error) = fs::write(&path, value) {
                failures.push(format!("restoring {}: {error}", path.display()));
            }
        }
        if !failures.is_empty() {
            eprintln!(
                "the single-node cluster left host state behind:\n  {}",
                failures.join("\n  ")
            );
        }
    }
}

fn list_dir(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every cgroup hierarchy's root: `/sys/fs/cgroup/<controller>` on cgroup v1 (hybrid included),
/// `/sys/fs/cgroup` itself on v2.
fn cgroup_roots() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_owned()];
    }
    let mut roots: Vec<PathBuf> = list_dir(base)
        .into_iter()
        .map(|name| base.join(name))
        .filter(|path| path.join("cgroup.procs").exists() && !path.is_symlink())
        .collect();
    roots.sort();
    roots
}

/// SIGKILLs every process in a `kubepods` cgroup (the pods' containers).
fn kill_cgroup_processes() {
    for root in cgroup_roots() {
        for _ in 0..3 {
            let mut pids = Vec::new();
            collect_procs(&root.join("kubepods"), &mut pids);
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn collect_procs(cgroup: &Path, pids: &mut Vec<libc::pid_t>) {
    if let Ok(procs) = fs::read_to_string(cgroup.join("cgroup.procs")) {
        pids.extend(
            procs
                .lines()
                .filter_map(|line| line.trim().parse::<libc::pid_t>().ok()),
        );
    }
    for child in list_dir(cgroup) {
        let path = cgroup.join(child);
        if path.is_dir() {
            collect_procs(&path, pids);
        }
    }
}

/// SIGKILLs the processes whose command line names `dir` (containerd's shims are started with
/// its socket's path).
fn kill_processes_mentioning(dir: &Path) {
    let needle = dir.as_os_str().as_encoded_bytes();
    for entry in list_dir(Path::new("/proc")) {
        let Ok(pid) = entry.parse::<libc::pid_t>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if pid != std::process::id() as libc::pid_t
            && cmdline.windows(needle.len()).any(|window| window == needle)
        {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Removes a cgroup and its descendants, deepest first (a cgroup with processes or children
/// cannot go; the processes were killed just before, so this retries a little).
fn remove_cgroup_tree(cgroup: &Path) -> Result<(), String> {
    if !cgroup.exists() {
        return Ok(());
    }
    for child in list_dir(cgroup) {
        let path = cgroup.join(child);
        if path.is_dir() {
            remove_cgroup_tree(&path)?;
        }
    }
    let mut attempts = 0;
    loop {
        match fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(error) if attempts >= 20 => {
                return Err(format!("removing cgroup {}: {error}", cgroup.display()));
            }
            Err(_) => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Mount points at or under any of `roots`, deepest first (from `/proc/self/mountinfo`).
fn mounts_under(roots: &[PathBuf]) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|target| PathBuf::from(target.replace("\\040", " ")))
        .filter(|target| roots.iter().any(|root| target.starts_with(root)))
        .collect();
    mounts.sort_by_key(|mount| std::cmp::Reverse(mount.components().count()));
    mounts.dedup();
    mounts
}
