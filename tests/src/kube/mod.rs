//! A real Kubernetes API server for tests: kube-apiserver v1.20.2 on etcd, both processes of
//! this test, on random loopback ports, over HTTPS with a CA made for it, with RBAC on.
//!
//! The binaries are built once by `cargo xtask kube` (which `cargo xtask test` runs) into a
//! cache outside `target/`: see [`bin_dir::bin_dir`] (`$LASTGASP_KUBE_BIN_DIR` overrides it).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use lastgasp_tests::kube::RealApiServer;
//! let server = RealApiServer::start().await?;
//! let admin = server.admin_client().await?;
//! let controller = server.client_as("lastgasp-system", "lastgasp-controller").await?;
//! # Ok(()) }
//! ```
//!
//! Who may call: the `admin` user (group `system:masters`) and the ServiceAccounts listed in
//! [`Options::service_accounts`], each by a static bearer token (`--token-auth-file`), as user
//! `system:serviceaccount:<namespace>:<name>` in groups `system:serviceaccounts`,
//! `system:serviceaccounts:<namespace>` and `system:authenticated`: what the real token of a
//! ServiceAccount authenticates as. RBAC grants them nothing until a test creates the Roles and
//! bindings (e.g. `deploy/`'s). There is no controller-manager, scheduler or kubelet: nothing
//! runs Pods, garbage-collects, or creates ServiceAccount tokens; the `ServiceAccount`
//! admission plugin is off (it would refuse every Pod without the token controller).
//!
//! What v1.20 differs in from today's servers, for tests written against both:
//! - discovery.k8s.io serves EndpointSlices as v1beta1 only (no v1);
//! - an events.k8s.io/v1 Event about a cluster-scoped object (a Node) is accepted only in
//!   `kube-system`, not `default` (where kube's `Recorder` puts it);
//! - a Node's status sent on create is kept (newer servers drop it).

pub mod bin_dir;
pub mod cluster;
pub mod node;
mod pki;
mod process;
pub mod proxy;
pub mod seed;

use std::{
    fs,
    net::{SocketAddr, SocketAddrV4, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use k8s_openapi::api::core::v1::Namespace;
use tracing::{instrument::WithSubscriber as _, subscriber::NoSubscriber};

use self::{pki::Pki, process::Supervisor};

/// How long etcd and then kube-apiserver may take to be ready (about 3 s here).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The namespaces kube-apiserver's bootstrap controller creates, shortly after `/readyz`.
const SYSTEM_NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];

/// Who a client or a kubeconfig authenticates as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum User {
    /// `admin`, in group `system:masters`: allowed everything.
    Admin,
    /// `system:serviceaccount:<namespace>:<name>`; must be in [`Options::service_accounts`].
    ServiceAccount { namespace: String, name: String },
}

impl User {
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Self::ServiceAccount {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The user name the server sees.
    pub fn name(&self) -> String {
        match self {
            Self::Admin => "admin".to_owned(),
            Self::ServiceAccount { namespace, name } => {
                format!("system:serviceaccount:{namespace}:{name}")
            }
        }
    }

    fn groups(&self) -> Vec<String> {
        match self {
            Self::Admin => vec!["system:masters".to_owned()],
            Self::ServiceAccount { namespace, .. } => vec![
                "system:serviceaccounts".to_owned(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".to_owned(),
            ],
        }
    }

    /// The namespace of this user's kubeconfig context: a ServiceAccount's own, as in a pod.
    fn namespace(&self) -> &str {
        match self {
            Self::Admin => "default",
            Self::ServiceAccount { namespace, .. } => namespace,
        }
    }
}

/// Knobs for [`RealApiServer::start_with`].
#[derive(Clone, Debug)]
pub struct Options {
    /// The ServiceAccounts (namespace, name) that get a token. The server reads its token file
    /// once, at start. The default: `deploy/`'s `lastgasp-system/lastgasp-agent` and
    /// `lastgasp-system/lastgasp-controller`.
    pub service_accounts: Vec<(String, String)>,
    /// For a cluster with a kubelet ([`node::LocalCluster`]): serve at this address and port
    /// instead of a random loopback port, with the `ServiceAccount` admission plugin on and a
    /// client certificate for kubelets (reached at their InternalIP).
    pub node: Option<SocketAddrV4>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            service_accounts: ["lastgasp-agent", "lastgasp-controller"]
                .map(|name| ("lastgasp-system".to_owned(), name.to_owned()))
                .to_vec(),
            node: None,
        }
    }
}

/// A running etcd and kube-apiserver; both are killed (their process groups) on drop, and
/// their directory removed. They also die with the test process.
pub struct RealApiServer {
    url: String,
    ca_pem: String,
    tokens: Vec<(User, String)>,
    dir: PathBuf,
    processes: Supervisor,
}

impl RealApiServer {
    /// Starts with the default [`Options`].
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Options::default()).await
    }

    /// Starts etcd, then kube-apiserver, and returns once `/readyz` answers ok and the system
    /// namespaces exist.
    pub async fn start_with(options: Options) -> anyhow::Result<Self> {
        let started = Instant::now();
        let (kube_apiserver, etcd) = binaries()?;
        let dir = private_dir()?;
        let mut server = Self {
            url: String::new(),
            ca_pem: String::new(),
            tokens: Vec::new(),
            dir,
            processes: Supervisor::new(),
        };
        let [etcd_client, etcd_peer, secure] = free_ports()?;
        let (address, secure) = match options.node {
            Some(node) => (node.ip().to_string(), node.port()),
            None => ("127.0.0.1".to_owned(), secure),
        };
        server.url = format!("https://{address}:{secure}");

        let pki = Pki::generate(options.node.map(|node| *node.ip()))?;
        server.ca_pem = pki.ca_pem.clone();
        server.tokens.push((User::Admin, token()?));
        for (namespace, name) in &options.service_accounts {
            server
                .tokens
                .push((User::service_account(namespace, name), token()?));
        }
        let file = |name: &str, contents: &str| -> anyhow::Result<PathBuf> {
            let path = server.dir.join(name);
            fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let tls_cert = file("apiserver.crt", &pki.serving_cert_pem)?;
        let tls_key = file("apiserver.key", &pki.serving_key_pem)?;
        let sa_key = file("service-account.key", &pki.service_account_key_pem)?;
        let sa_public = file("service-account.pub", &pki.service_account_public_pem)?;
        let token_file = file("tokens.csv", &token_file(&server.tokens))?;
        file("ca.crt", &pki.ca_pem)?;

        let etcd_url = |port: u16| format!("http://127.0.0.1:{port}");
        let mut command = Command::new(&etcd);
        command
            .arg("--name=test")
            .arg(format!("--data-dir={}", server.dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={}", etcd_url(etcd_client)))
            .arg(format!("--advertise-client-urls={}", etcd_url(etcd_client)))
            .arg(format!("--listen-peer-urls={}", etcd_url(etcd_peer)))
            .arg(format!(
                "--initial-advertise-peer-urls={}",
                etcd_url(etcd_peer)
            ))
            .arg(format!("--initial-cluster=test={}", etcd_url(etcd_peer)))
            .args(["--logger=zap", "--log-level=warn"]);
        server.spawn("etcd", command)?;
        server
            .wait_ready("etcd", || etcd_healthy(etcd_client))
            .await?;

        let mut command = Command::new(&kube_apiserver);
        let path_arg = |flag: &str, path: &Path| format!("--{flag}={}", path.display());
        command
            .arg(format!("--etcd-servers={}", etcd_url(etcd_client)))
            .arg(format!("--bind-address={address}"))
            .arg(format!("--advertise-address={address}"))
            .arg(format!("--secure-port={secure}"))
            .arg("--insecure-port=0")
            .arg(path_arg("cert-dir", &server.dir.join("certs")))
            .arg(path_arg("tls-cert-file", &tls_cert))
            .arg(path_arg("tls-private-key-file", &tls_key))
            .arg(path_arg("token-auth-file", &token_file))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(path_arg("service-account-key-file", &sa_public))
            .arg(path_arg("service-account-signing-key-file", &sa_key))
            .arg("--authorization-mode=RBAC")
            // No Endpoints for the `kubernetes` Service: a loopback address may not be one, and
            // without kube-proxy its ClusterIP leads nowhere anyway.
            .arg("--endpoint-reconciler-type=none")
            .arg("--profiling=false");
        if options.node.is_some() {
            let cert = file("kubelet-client.crt", &pki.kubelet_client_cert_pem)?;
            let key = file("kubelet-client.key", &pki.kubelet_client_key_pem)?;
            command
                .arg(path_arg("kubelet-client-certificate", &cert))
                .arg(path_arg("kubelet-client-key", &key))
                .arg("--kubelet-preferred-address-types=InternalIP")
                // The agent's DaemonSet is privileged.
                .arg("--allow-privileged=true");
        } else {
            // No token controller for the admission plugin to wait for.
            command.arg("--disable-admission-plugins=ServiceAccount");
        }
        server.spawn("kube-apiserver", command)?;
        let admin = server.admin_client().await?;
        // The client logs every refused connection and 500 of a server still starting as an
        // error, in whatever subscriber a test installed: none while polling.
        server
            .wait_ready("kube-apiserver", || readyz(&admin))
            .with_subscriber(NoSubscriber::default())
            .await?;
        for namespace in SYSTEM_NAMESPACES {
            let namespaces = kube::Api::<Namespace>::all(admin.clone());
            server
                .wait_ready(&format!("namespace {namespace}"), || async {
                    matches!(namespaces.get_opt(namespace).await, Ok(Some(_)))
                })
                .with_subscriber(NoSubscriber::default())
                .await?;
        }
        tracing::debug!(url = %server.url, took = ?started.elapsed(), "real kube-apiserver ready");
        Ok(server)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The CA that signed the server's certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The bearer token of `user`.
    pub fn token(&self, user: &User) -> anyhow::Result<&str> {
        self.tokens
            .iter()
            .find(|(known, _)| known == user)
            .map(|(_, token)| token.as_str())
            .with_context(|| {
                format!(
                    "{} has no token: name the ServiceAccount in Options::service_accounts",
                    user.name()
                )
            })
    }

    /// The directory of the processes' files and logs (`etcd.log`, `kube-apiserver.log`), the
    /// CA (`ca.crt`) and the ServiceAccount signing key (`service-account.key`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A kubeconfig for `user`: the server's URL and CA, `user`'s token, and `user`'s
    /// namespace (a ServiceAccount's own, `default` for the admin). For a `lastgasp` process:
    /// write it to a file and point `KUBECONFIG` at it.
    pub fn kubeconfig_yaml(&self, user: &User) -> anyhow::Result<String> {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        Ok(format!(
            "apiVersion: v1
kind: Config
clusters:
- name: lastgasp-real
  cluster:
    server: {url}
    certificate-authority-data: {ca}
contexts:
- name: lastgasp-real
  context:
    cluster: lastgasp-real
    user: test-user
    namespace: {namespace}
current-context: lastgasp-real
users:
- name: test-user
  user:
    token: {token}
",
            url = self.url,
            namespace = user.namespace(),
            token = self.token(user)?,
        ))
    }

    /// A kube client for `user`, from [`Self::kubeconfig_yaml`].
    pub async fn client(&self, user: &User) -> anyhow::Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml(user)?)?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A client as `admin` (group `system:masters`), namespace `default`.
    pub async fn admin_client(&self) -> anyhow::Result<kube::Client> {
        self.client(&User::Admin).await
    }

    /// A client as the ServiceAccount `namespace/name`, in its namespace.
    pub async fn client_as(&self, namespace: &str, name: &str) -> anyhow::Result<kube::Client> {
        self.client(&User::service_account(namespace, name)).await
    }

    fn log_path(&self, process: &str) -> PathBuf {
        self.dir.join(format!("{process}.log"))
    }

    /// The last `lines` lines of a process's log.
    pub fn log_tail(&self, process: &str, lines: usize) -> String {
        let log = fs::read_to_string(self.log_path(process)).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn spawn(&self, name: &str, mut command: Command) -> anyhow::Result<()> {
        let log = fs::File::create(self.log_path(name))?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.processes
            .spawn(name, command)
            .with_context(|| format!("starting {name}"))?;
        Ok(())
    }

    /// Polls `ready` every 50 ms until it holds; fails when a process exited or after
    /// [`START_TIMEOUT`], with the end of the logs.
    async fn wait_ready<F, Fut>(&self, what: &str, mut ready: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ready().await {
                return Ok(());
            }
            for process in ["etcd", "kube-apiserver"] {
                if let Some(status) = self.processes.exit_status(process) {
                    bail!(
                        "{process} exited ({status}) while waiting for {what}; its log ends:\n{}",
                        self.log_tail(process, 30)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{what} not ready within {START_TIMEOUT:?}; kube-apiserver's log ends:\n{}",
                    self.log_tail("kube-apiserver", 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RealApiServer {
    fn drop(&mut self) {
        self.processes.stop();
        if std::thread::panicking() {
            eprintln!(
                "kube-apiserver's log ({}) ends:\n{}",
                self.log_path("kube-apiserver").display(),
                self.log_tail("kube-apiserver", 20)
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The cached binaries, or how to build them.
fn binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = bin_dir::bin_dir().context(
        "no cache directory for the Kubernetes binaries: set $HOME, $XDG_CACHE_HOME or \
         $LASTGASP_KUBE_BIN_DIR",
    )?;
    let kube_apiserver = dir.join(bin_dir::KUBE_APISERVER);
    let etcd = dir.join(bin_dir::ETCD);
    if !kube_apiserver.is_file() || !etcd.is_file() {
        bail!(
            "kube-apiserver v{} and etcd are not built in {}: run `cargo xtask kube` (once; \
             `cargo xtask test` does it too)",
            bin_dir::KUBERNETES_VERSION,
            dir.display()
        );
    }
    Ok((kube_apiserver, etcd))
}

const DIR_PREFIX: &str = "lastgasp-kube-";

/// A new directory for one server's files: in `/dev/shm` when there is one (etcd syncs its
/// writes; there that costs nothing), else the temporary directory. Directories that killed
/// test processes left behind are removed first.
fn private_dir() -> anyhow::Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    remove_abandoned(&base);
    let dir = base.join(format!(
        "{DIR_PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("certs")).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Removes `lastgasp-kube-<pid>-<n>` directories whose process is gone.
fn remove_abandoned(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.filter_map(|entry| entry.ok()) {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Three distinct free loopback ports (all held until all are chosen).
fn free_ports() -> anyhow::Result<[u16; 3]> {
    let listeners = [0; 3].map(|_| TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))));
    let mut ports = [0; 3];
    for (port, listener) in ports.iter_mut().zip(listeners) {
        *port = listener
            .context("binding a loopback port")?
            .local_addr()?
            .port();
    }
    Ok(ports)
}

/// 32 random bytes, hex.
fn token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|error| anyhow::anyhow!("getrandom: {error}"))?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// `--token-auth-file`: `token,user,uid,"group,group"` per line.
fn token_file(tokens: &[(User, String)]) -> String {
    tokens
        .iter()
        .map(|(user, token)| {
            format!(
                "{token},{name},{name},\"{groups}\"\n",
                name = user.name(),
                groups = user.groups().join(",")
            )
        })
        .collect()
}

/// etcd's `/health` says `"health":"true"`.
async fn etcd_healthy(port: u16) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request = b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    let mut response = String::new();
    stream.write_all(request).await.is_ok()
        && stream.read_to_string(&mut response).await.is_ok()
        && response.contains("\"health\":\"true\"")
}

/// kube-apiserver's `/readyz` answers 200.
async fn readyz(client: &kube::Client) -> bool {
    let Ok(request) = http::Request::get("/readyz").body(Vec::new()) else {
        return false;
    };
    client.request_text(request).await.is_ok()
}
