//! The kernel's netconsole, configured by the agent: the fallback that still reports a panic
//! when the agent's userspace can no longer run, or is not running at all.
//!
//! Each destination gets one dynamic configfs target, named after it
//! (`/sys/kernel/config/netconsole/lastgasp-<ip>-<port>`), in the extended format, sending
//! from the device and source address of the kernel's route to the destination, to the MAC of
//! the next hop ([`nexthop`]). [`NetconsoleTargets::point_at`] makes the kernel's targets match
//! a list of destinations:
//!
//! - a wanted target that exists with the right settings and enabled is left alone (so a
//!   restarted agent adopts the targets of the one before without a gap);
//! - one whose settings differ (the route or the next hop's MAC changed, someone edited it, the
//!   kernel disabled it when its device went away) is disabled, edited and enabled again:
//!   configfs refuses to change an enabled target;
//! - a missing one is created and enabled;
//! - then every `lastgasp-*` target not wanted any more is removed, so re-pointing makes the
//!   new targets before it breaks the old ones.
//!
//! Targets stay when the agent exits: they are what reports a panic while it is dead.

mod configfs;
pub mod nexthop;

use std::{
    collections::HashMap,
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::metrics::{family::Family, gauge::Gauge};
use thiserror::Error;

pub use self::configfs::{ConfigfsError, Settings, Unavailable};
use self::{
    configfs::{Observed, TargetDir},
    nexthop::ResolveError,
};
use crate::metrics::StateLabels;

/// Every target the agent owns is named with this prefix; others are never touched.
pub const TARGET_PREFIX: &str = "lastgasp-";
/// How long to wait for the kernel to resolve a next hop after the priming datagram.
pub const NEIGHBOUR_WAIT: Duration = Duration::from_secs(2);
/// How often the agent checks its targets again (routes, MACs, targets the kernel disabled).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// A target's settings: the route's device and next hop, from the node's address when given,
/// else from the route's source address.
fn target_settings(
    path: &nexthop::Path,
    remote: SocketAddrV4,
    local_ip: Option<Ipv4Addr>,
) -> Settings {
    Settings {
        dev_name: path.device.clone(),
        local_ip: local_ip.unwrap_or(path.source),
        remote,
        remote_mac: path.mac,
        extended: true,
    }
}

/// The configfs name of the target sending to `remote`.
pub fn target_name(remote: SocketAddrV4) -> String {
    format!("{TARGET_PREFIX}{}-{}", remote.ip(), remote.port())
}

/// A target the kernel has enabled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfiguredTarget {
    pub name: String,
    pub settings: Settings,
    /// The gateway whose MAC it sends to; `None` when the destination is on-link.
    pub gateway: Option<Ipv4Addr>,
}

#[derive(Debug, Error)]
pub enum TargetError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Configfs(#[from] ConfigfsError),
}

#[derive(Debug, Error)]
pub enum NetconsoleError {
    #[error("netconsole is unavailable: {0}")]
    Unavailable(#[from] Unavailable),
    #[error("netconsole targets: {0}")]
    List(ConfigfsError),
    /// Some targets failed; the others in `configured` are enabled.
    #[error("{}", describe_failures(failed, not_removed))]
    Targets {
        configured: Vec<ConfiguredTarget>,
        failed: Vec<(SocketAddrV4, TargetError)>,
        not_removed: Vec<(String, ConfigfsError)>,
    },
}

fn describe_failures(
    failed: &[(SocketAddrV4, TargetError)],
    not_removed: &[(String, ConfigfsError)],
) -> String {
    failed
        .iter()
        .map(|(remote, error)| format!("netconsole target {remote}: {error}"))
        .chain(
            not_removed
                .iter()
                .map(|(name, error)| format!("removing netconsole target {name}: {error}")),
        )
        .collect::<Vec<_>>()
        .join("; ")
}

/// The `lastgasp-*` targets of this kernel. Every method blocks: configfs writes, an rtnetlink
/// round trip, and up to [`NEIGHBOUR_WAIT`] per destination whose next hop is unresolved.
pub struct NetconsoleTargets {
    root: PathBuf,
    wanted: Vec<SocketAddrV4>,
    configured: Vec<ConfiguredTarget>,
    /// Targets already logged by this process, so a refresh that changes nothing stays quiet.
    logged: HashMap<String, Settings>,
    local_ip: Option<Ipv4Addr>,
}

impl NetconsoleTargets {
    /// Makes sure netconsole's configfs directory exists ([`configfs::prepare`]: modprobe,
    /// mount). Reads nothing else: the targets are adopted by the first [`Self::point_at`].
    /// `local_ip`, the node's address, is the source of every target's packets instead of the
    /// route's: netpoll writes it into the IP header as given, and the controller recognises a
    /// node's console only by that address.
    pub fn open(local_ip: Option<Ipv4Addr>) -> Result<Self, Unavailable> {
        let prepared = configfs::prepare()?;
        if prepared.loaded_module {
            tracing::info!("loaded the netconsole module");
        }
        if prepared.mounted_configfs {
            tracing::info!("mounted configfs at {}", configfs::CONFIGFS);
        }
        Ok(Self {
            root: configfs::NETCONSOLE.into(),
            wanted: Vec::new(),
            configured: Vec::new(),
            logged: HashMap::new(),
            local_ip,
        })
    }

    /// Points the targets at `destinations` (the controller's netconsole addresses): see the
    /// module documentation. An empty list removes every `lastgasp-*` target. Safe to call
    /// again with the same list: targets that are right are not touched.
    pub fn point_at(
        &mut self,
        destinations: &[SocketAddrV4],
    ) -> Result<Vec<ConfiguredTarget>, NetconsoleError> {
        let mut wanted: Vec<SocketAddrV4> = Vec::with_capacity(destinations.len());
        for destination in destinations {
            if !wanted.contains(destination) {
                wanted.push(*destination);
            }
        }
        self.wanted = wanted.clone();
        let existing = TargetDir::list(&self.root, TARGET_PREFIX).map_err(NetconsoleError::List)?;
        let mut configured = Vec::new();
        let mut failed = Vec::new();
        for remote in wanted {
            let name = target_name(remote);
            match self.apply(&name, remote, existing.contains(&name)) {
                Ok(target) => configured.push(target),
                Err(error) => {
                    tracing::warn!(target_name = %name, %remote, %error, "netconsole target {name} not configured");
                    self.logged.remove(&name);
                    failed.push((remote, error));
                }
            }
        }
        let mut not_removed = Vec::new();
        for name in existing {
            if self
                .wanted
                .iter()
                .any(|remote| target_name(*remote) == name)
            {
                continue;
            }
            match TargetDir::new(&self.root, &name).remove() {
                Ok(()) => tracing::info!(target_name = %name, "netconsole target {name} removed"),
                Err(error) => {
                    tracing::warn!(target_name = %name, %error, "netconsole target {name} not removed");
                    not_removed.push((name.clone(), error));
                }
            }
            self.logged.remove(&name);
        }
        self.configured = configured.clone();
        if failed.is_empty() && not_removed.is_empty() {
            Ok(configured)
        } else {
            Err(NetconsoleError::Targets {
                configured,
                failed,
                not_removed,
            })
        }
    }

    /// Checks the targets of the last [`Self::point_at`] again: routes and MACs are resolved
    /// anew, and a target that no longer matches (or that the kernel disabled) is fixed.
    pub fn refresh(&mut self) -> Result<Vec<ConfiguredTarget>, NetconsoleError> {
        let wanted = self.wanted.clone();
        self.point_at(&wanted)
    }

    /// The targets enabled by the last [`Self::point_at`].
    pub fn configured(&self) -> &[ConfiguredTarget] {
        &self.configured
    }

    fn apply(
        &mut self,
        name: &str,
        remote: SocketAddrV4,
        exists: bool,
    ) -> Result<ConfiguredTarget, TargetError> {
        let path = nexthop::resolve(remote, NEIGHBOUR_WAIT)?;
        let settings = target_settings(&path, remote, self.local_ip);
        let dir = TargetDir::new(&self.root, name);
        let action = if exists {
            let observed = dir.read()?;
            if observed.enabled && observed.settings.as_ref() == Ok(&settings) {
                Action::Kept
            } else {
                if observed.enabled {
                    dir.disable()?;
                }
                dir.configure_and_enable(&settings)?;
                Action::Updated(changes(&observed, &settings))
            }
        } else {
            dir.create()?;
            dir.configure_and_enable(&settings)?;
            Action::Created
        };
        let target = ConfiguredTarget {
            name: name.to_owned(),
            settings,
            gateway: path.gateway,
        };
        if action != Action::Kept || self.logged.get(name) != Some(&target.settings) {
            log_target(&target, &action, path.primed);
            self.logged.insert(name.to_owned(), target.settings.clone());
        }
        Ok(target)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Action {
    Created,
    /// Disabled, edited, enabled; with what changed.
    Updated(String),
    /// Already right: adopted from an earlier agent, or unchanged since the last check.
    Kept,
}

fn log_target(target: &ConfiguredTarget, action: &Action, primed: bool) {
    let settings = &target.settings;
    let (verb, changed) = match action {
        Action::Created => ("created", String::new()),
        Action::Updated(changed) => ("updated", changed.clone()),
        Action::Kept => ("adopted", String::new()),
    };
    let via = match target.gateway {
        Some(gateway) => format!("gateway {gateway}"),
        None => "on-link".to_owned(),
    };
    tracing::info!(
        target_name = %target.name,
        remote = %settings.remote,
        dev = %settings.dev_name,
        local_ip = %settings.local_ip,
        remote_mac = %settings.remote_mac,
        primed,
        changed = %changed,
        "netconsole target {} {verb}: {} -> {} via {} ({via}), extended, enabled",
        target.name,
        settings.local_ip,
        settings.remote,
        settings.dev_name,
    );
}

/// What an update changes, e.g. `remote_mac 00:11:22:33:44:55 -> 52:55:0a:00:02:02`.
fn changes(observed: &Observed, settings: &Settings) -> String {
    let mut changed = Vec::new();
    if !observed.enabled {
        changed.push("enabled 0 -> 1".to_owned());
    }
    match &observed.settings {
        Err(error) => changed.push(error.to_string()),
        Ok(old) => {
            let mut field = |name: &str, old: &dyn fmt::Display, new: &dyn fmt::Display| {
                let (old, new) = (old.to_string(), new.to_string());
                if old != new {
                    changed.push(format!("{name} {old} -> {new}"));
                }
            };
            field("dev_name", &old.dev_name, &settings.dev_name);
            field("local_ip", &old.local_ip, &settings.local_ip);
            field("remote", &old.remote, &settings.remote);
            field("remote_mac", &old.remote_mac, &settings.remote_mac);
            field("extended", &old.extended, &settings.extended);
        }
    }
    changed.join(", ")
}

/// The agent's netconsole targets, shared by whoever points them somewhere (the
/// `--netconsole-target` flags at start, controller discovery) and the periodic refresh.
/// Cloning shares the same targets. Its methods run the blocking work on tokio's blocking pool.
#[derive(Clone)]
pub struct Netconsole {
    targets: Arc<Mutex<Option<NetconsoleTargets>>>,
    /// `lastgasp_netconsole_targets{state}`: wanted targets by state.
    gauge: Family<StateLabels, Gauge>,
    /// The source address of every target, when not the route's ([`NetconsoleTargets::open`]).
    local_ip: Option<Ipv4Addr>,
}

const STATES: [&str; 3] = ["enabled", "failed", "unavailable"];

impl Netconsole {
    /// No targets wanted yet: every state of `gauge` is 0 until the first [`Self::point_at`].
    /// `local_ip`: see [`NetconsoleTargets::open`].
    pub fn new(gauge: Family<StateLabels, Gauge>, local_ip: Option<Ipv4Addr>) -> Self {
        let netconsole = Self {
            targets: Arc::new(Mutex::new(None)),
            gauge,
            local_ip,
        };
        netconsole.record(0, &Ok(Vec::new()));
        netconsole
    }

    /// [`NetconsoleTargets::point_at`]; the first call also prepares netconsole
    /// ([`NetconsoleTargets::open`]), and so does every call after one that found it unavailable.
    pub async fn point_at(
        &self,
        destinations: Vec<SocketAddrV4>,
    ) -> Result<Vec<ConfiguredTarget>, NetconsoleError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.point_at_blocking(&destinations))
            .await
            .expect("netconsole configuration panicked")
    }

    /// [`Self::point_at`] for callers that may block.
    pub fn point_at_blocking(
        &self,
        destinations: &[SocketAddrV4],
    ) -> Result<Vec<ConfiguredTarget>, NetconsoleError> {
        let mut targets = self.targets.lock().expect("netconsole lock");
        let result = match &mut *targets {
            Some(targets) => targets.point_at(destinations),
            None => NetconsoleTargets::open(self.local_ip)
                .map_err(NetconsoleError::from)
                .and_then(|opened| targets.insert(opened).point_at(destinations)),
        };
        self.record(destinations.len(), &result);
        if let Err(error @ (NetconsoleError::Unavailable(_) | NetconsoleError::List(_))) = &result {
            tracing::warn!(%error, "the agent runs without netconsole targets");
        }
        result
    }

    /// [`NetconsoleTargets::refresh`], once netconsole has been pointed somewhere.
    pub async fn refresh(&self) {
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let mut targets = this.targets.lock().expect("netconsole lock");
            if let Some(targets) = &mut *targets {
                let wanted = targets.wanted.len();
                let result = targets.refresh();
                this.record(wanted, &result);
            }
        })
        .await;
    }

    /// The targets enabled by the last call.
    pub fn configured(&self) -> Vec<ConfiguredTarget> {
        self.targets
            .lock()
            .expect("netconsole lock")
            .as_ref()
            .map(|targets| targets.configured().to_vec())
            .unwrap_or_default()
    }

    fn record(&self, wanted: usize, result: &Result<Vec<ConfiguredTarget>, NetconsoleError>) {
        let (enabled, failed, unavailable) = match result {
            Ok(configured) => (configured.len(), 0, 0),
            Err(NetconsoleError::Targets {
                configured, failed, ..
            }) => (configured.len(), failed.len(), 0),
            Err(_) => (0, 0, wanted),
        };
        for (state, count) in STATES.into_iter().zip([enabled, failed, unavailable]) {
            self.gauge
                .get_or_create(&StateLabels {
                    state: state.into(),
                })
                .set(count as i64);
        }
    }
}

/// Points the targets at `initial` (the `--netconsole-target` flags), then refreshes them
/// every [`REFRESH_INTERVAL`] until aborted.
pub async fn maintain(netconsole: Netconsole, initial: Vec<SocketAddrV4>) {
    if !initial.is_empty() {
        let _ = netconsole.point_at(initial).await;
    }
    let mut refresh = tokio::time::interval(REFRESH_INTERVAL);
    refresh.tick().await;
    loop {
        refresh.tick().await;
        netconsole.refresh().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            dev_name: "eth0".into(),
            local_ip: Ipv4Addr::new(10, 0, 2, 15),
            remote: "10.0.2.2:6666".parse().unwrap(),
            remote_mac: "52:55:0a:00:02:02".parse().unwrap(),
            extended: true,
        }
    }

    #[test]
    fn targets_send_from_the_node_address_whatever_the_route_prefers() {
        // The route to the controller's pod on this node leaves by the pod bridge, whose
        // address the controller does not know this node by.
        let path = nexthop::Path {
            device: "cni0".into(),
            source: Ipv4Addr::new(10, 244, 3, 1),
            gateway: None,
            mac: "aa:bb:cc:00:11:22".parse().unwrap(),
            primed: false,
        };
        let remote = "10.244.3.7:6666".parse().unwrap();
        let node = Ipv4Addr::new(192, 168, 7, 3);
        let from_node = target_settings(&path, remote, Some(node));
        assert_eq!(from_node.local_ip, node);
        assert_eq!(from_node.dev_name, "cni0");
        assert_eq!(from_node.remote_mac, path.mac);
        assert_eq!(target_settings(&path, remote, None).local_ip, path.source);
    }

    #[test]
    fn names_say_where_a_target_sends() {
        assert_eq!(
            target_name("10.0.2.2:6666".parse().unwrap()),
            "lastgasp-10.0.2.2-6666"
        );
    }

    #[test]
    fn an_update_lists_what_changed() {
        let mut old = settings();
        old.remote_mac = "00:11:22:33:44:55".parse().unwrap();
        old.extended = false;
        let observed = Observed {
            enabled: false,
            settings: Ok(old),
        };
        assert_eq!(
            changes(&observed, &settings()),
            "enabled 0 -> 1, remote_mac 00:11:22:33:44:55 -> 52:55:0a:00:02:02, extended false -> true"
        );
        let foreign = Observed {
            enabled: true,
            settings: Err(configfs::AttributeError {
                attribute: "local_ip",
                value: "fe80::1".into(),
                why: "not an IPv4 address".into(),
            }),
        };
        assert_eq!(
            changes(&foreign, &settings()),
            "attribute local_ip is \"fe80::1\": not an IPv4 address"
        );
    }

    #[test]
    fn failures_name_each_target() {
        let error = NetconsoleError::Targets {
            configured: Vec::new(),
            failed: vec![(
                "10.0.2.2:6666".parse().unwrap(),
                TargetError::Resolve(ResolveError::Unresolved {
                    destination: "10.0.2.2:6666".parse().unwrap(),
                    next_hop: Ipv4Addr::new(10, 0, 2, 2),
                    device: "eth0".into(),
                    waited: Duration::from_secs(2),
                }),
            )],
            not_removed: Vec::new(),
        };
        assert_eq!(
            error.to_string(),
            "netconsole target 10.0.2.2:6666: next hop 10.0.2.2 on eth0 has no MAC address in \
             /proc/net/arp 2s after a datagram was sent to 10.0.2.2:6666 to resolve it"
        );
    }
}
