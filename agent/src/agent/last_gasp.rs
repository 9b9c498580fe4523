//! The last-gasp report: the moment the kernel starts to panic, one UDP datagram to the
//! controller, then one more for each context line that follows, while the machine lasts,
//! unless a netconsole console is registered.
//!
//! With netconsole, the panicking CPU itself sends the console's lines through the network
//! driver once it has stopped the other CPUs. A CPU stopped while sending one of our
//! datagrams can be left holding the transmit queue's lock, and netpoll's poll of the device
//! then spins on it for ever: the node never reboots. So with netconsole the agent sends one
//! datagram per panic (two when a console panic line came before the kernel's own call) and
//! withholds the rest; netconsole carries the lines that follow.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;

use super::{discovery::ControllerEndpoints, events::KernelSource};
use crate::{
    metrics::{AgentMetrics, ReasonLabels},
    wire::{self, AuthKey, Report, ReportKind, ReportSource},
};

/// Context lines sent after the panic line (Netflix's controller keeps 20).
pub const MAX_CONTEXT_LINES: usize = 20;
/// How long after the panic context lines are still sent.
pub const CONTEXT_WINDOW: Duration = Duration::from_secs(10);

/// Who this node is, for the report.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub node: String,
    pub boot_id: String,
    pub kernel_release: Option<String>,
}

/// What one report became: a datagram per controller endpoint.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Datagrams handed to the kernel.
    pub sent: usize,
    /// Datagrams that could not be sent (each logged).
    pub failed: usize,
    /// A report was due but no controller endpoint was known.
    pub no_destination: bool,
    /// Reports not sent because the panicking CPU's netconsole needs the network to itself.
    pub withheld: usize,
}

/// Sends this node's reports to the controller. Clones share the sockets and the sequence, so
/// every report of this process (live and delayed alike) takes the next number: the
/// controller's replay guard wants them strictly increasing per node and boot.
#[derive(Clone)]
pub struct ReportSender {
    /// One socket per address family; `None` where the host does not have the family.
    ipv4: Option<Arc<UdpSocket>>,
    ipv6: Option<Arc<UdpSocket>>,
    /// Where reports go: every address in `reports`, read at each send, so a change of the
    /// controller's endpoints applies to the very next datagram.
    controller: watch::Receiver<ControllerEndpoints>,
    key: AuthKey,
    identity: NodeIdentity,
    /// Strictly increasing within a boot, across agent restarts: it starts from the wall clock in µs.
    next_seq: Arc<AtomicU64>,
}

impl ReportSender {
    /// `node_ip`: the address reports leave from in its family (see [`bind_sockets`]).
    pub fn new(
        controller: watch::Receiver<ControllerEndpoints>,
        node_ip: Option<IpAddr>,
        key: AuthKey,
        identity: NodeIdentity,
    ) -> io::Result<Self> {
        let (ipv4, ipv6) = bind_sockets(node_ip)?;
        let next_seq = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        Ok(Self {
            ipv4: ipv4.map(Arc::new),
            ipv6: ipv6.map(Arc::new),
            controller,
            key,
            identity,
            next_seq: Arc::new(AtomicU64::new(next_seq)),
        })
    }

    pub fn key(&self) -> &AuthKey {
        &self.key
    }

    /// A report from this node and boot, to be stamped by [`ReportSender::send`].
    pub fn report(
        &self,
        kind: ReportKind,
        source: ReportSource,
        message: String,
        context: Vec<String>,
    ) -> Report {
        Report {
            node: self.identity.node.clone(),
            boot_id: self.identity.boot_id.clone(),
            seq: 0,
            sent_at_ms: 0,
            kind,
            source,
            message,
            context,
            kernel_release: self.identity.kernel_release.clone(),
            event_at_ms: None,
            event_boot_id: None,
            frames: Vec::new(),
        }
    }

    /// Stamps `report` with the next sequence number and the time, and sends it to every
    /// current controller endpoint.
    pub fn send(&self, report: &mut Report) -> Sent {
        report.seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        report.sent_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Copied out, so the lock is not held across the sends.
        let destinations = self.controller.borrow().reports.clone();
        if destinations.is_empty() {
            tracing::warn!("report not sent: no controller endpoint is known");
            return Sent {
                no_destination: true,
                ..Sent::default()
            };
        }
        let datagram = match wire::encode(report, &self.key) {
            Ok(datagram) => datagram,
            Err(error) => {
                tracing::warn!(%error, "report not encodable");
                return Sent {
                    failed: destinations.len(),
                    ..Sent::default()
                };
            }
        };
        let mut outcome = Sent::default();
        for destination in destinations {
            let socket = match destination {
                SocketAddr::V4(_) => self.ipv4.as_ref(),
                SocketAddr::V6(_) => self.ipv6.as_ref(),
            };
            let result = match socket {
                Some(socket) => socket.send_to(&datagram, destination).map(drop),
                None => Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "no socket of this address family",
                )),
            };
            match result {
                Ok(()) => outcome.sent += 1,
                Err(error) => {
                    tracing::warn!(%error, %destination, "report datagram not sent");
                    outcome.failed += 1;
                }
            }
        }
        outcome
    }
}

/// One UDP socket per address family the host has. The node's address, when given, is bound
/// as the source of its family: a datagram to a pod address otherwise leaves from whatever
/// address the route prefers (an overlay device's, the pod bridge's), and the controller
/// accepts a node's reports only from its InternalIP. An address this host does not have is
/// logged and left to the route: reports still go out, which may be from the right address.
fn bind_sockets(node_ip: Option<IpAddr>) -> io::Result<(Option<UdpSocket>, Option<UdpSocket>)> {
    let bind = |unspecified: IpAddr| {
        if let Some(ip) = node_ip.filter(|ip| ip.is_ipv4() == unspecified.is_ipv4()) {
            match UdpSocket::bind((ip, 0)) {
                Ok(socket) => return Ok(socket),
                Err(error) => tracing::warn!(
                    node_ip = %ip,
                    %error,
                    "reports cannot leave from the node address (--node-ip): they leave from \
                     the route's source address, which the controller accepts only if it is \
                     the Node's InternalIP"
                ),
            }
        }
        UdpSocket::bind((unspecified, 0))
    };
    match (
        bind(Ipv4Addr::UNSPECIFIED.into()),
        bind(Ipv6Addr::UNSPECIFIED.into()),
    ) {
        (Err(error), Err(_)) => Err(io::Error::new(
            error.kind(),
            format!("binding a UDP socket: {error}"),
        )),
        (ipv4, ipv6) => Ok((ipv4.ok(), ipv6.ok())),
    }
}

impl Sent {
    /// Adds the outcome to `lastgasp_last_gasp_datagrams_total`.
    pub fn count(&self, metrics: &AgentMetrics) {
        for (reason, count) in [
            ("sent", self.sent),
            ("error", self.failed),
            ("no_destination", usize::from(self.no_destination)),
            ("withheld_for_netconsole", self.withheld),
        ] {
            if count > 0 {
                metrics
                    .last_gasp_datagrams
                    .get_or_create(&ReasonLabels {
                        reason: reason.into(),
                    })
                    .inc_by(count as u64);
            }
        }
    }
}

struct Incident {
    started: Instant,
    source: KernelSource,
    message: String,
    context: Vec<String>,
    /// The named kernel stack at `panic()`, when a probe saw the call.
    frames: Vec<String>,
    /// Opened by a probe, the message is now the console's printed line.
    printed: bool,
    /// Whether later datagrams are withheld, decided at the first of them (after the last
    /// gasp is out: reading `/proc/consoles` must not delay it).
    quiet: Option<bool>,
}

impl Incident {
    fn new(message: &str, source: KernelSource, frames: Vec<String>) -> Self {
        Self {
            started: Instant::now(),
            source,
            message: message.to_owned(),
            context: Vec::new(),
            frames,
            printed: false,
            quiet: None,
        }
    }
}

pub struct LastGasp {
    sender: ReportSender,
    incident: Option<Incident>,
    /// Whether a netconsole console is registered (see the module's comment).
    netconsole_registered: fn() -> bool,
}

impl LastGasp {
    pub fn new(sender: ReportSender, netconsole_registered: fn() -> bool) -> Self {
        Self {
            sender,
            incident: None,
            netconsole_registered,
        }
    }

    /// A panic was seen. The first sighting sends at once. A `panic()` probe's always does:
    /// console text can be forged (a first line is all the watcher can check), so a panic
    /// line from the console earlier in the boot must not suppress the kernel's own call.
    /// The console line that follows a probe's call replaces the message (a format string)
    /// with the printed text once; the source stays the probe's (withheld under netconsole).
    /// A probe's `frames` (its named stack) go with every datagram of the incident.
    pub fn on_panic(&mut self, message: &str, source: KernelSource, frames: Vec<String>) -> Sent {
        let from_console = source == KernelSource::Console;
        match &mut self.incident {
            Some(incident) if incident.source == KernelSource::Console && !from_console => {
                self.incident = Some(Incident::new(message, source, frames));
            }
            None => self.incident = Some(Incident::new(message, source, frames)),
            Some(incident)
                if incident.source != KernelSource::Console
                    && from_console
                    && !incident.printed =>
            {
                incident.message = message.to_owned();
                incident.printed = true;
                return self.send_more();
            }
            Some(_) => return Sent::default(),
        }
        self.send()
    }

    /// A console line after the panic: sent as context while the window lasts.
    pub fn on_line(&mut self, line: &str) -> Sent {
        let Some(incident) = &mut self.incident else {
            return Sent::default();
        };
        if incident.context.len() >= MAX_CONTEXT_LINES
            || incident.started.elapsed() > CONTEXT_WINDOW
        {
            return Sent::default();
        }
        incident.context.push(line.to_owned());
        self.send_more()
    }

    /// A datagram after the incident's first: withheld while netconsole is registered.
    fn send_more(&mut self) -> Sent {
        let netconsole_registered = self.netconsole_registered;
        let Some(incident) = &mut self.incident else {
            return Sent::default();
        };
        if *incident.quiet.get_or_insert_with(netconsole_registered) {
            return Sent {
                withheld: 1,
                ..Sent::default()
            };
        }
        self.send()
    }

    /// The incident as one report, to every current controller endpoint.
    fn send(&mut self) -> Sent {
        let Some(incident) = &self.incident else {
            return Sent::default();
        };
        let mut report = self.sender.report(
            ReportKind::KernelPanic,
            incident.source.into(),
            incident.message.clone(),
            incident.context.clone(),
        );
        report.frames = incident.frames.clone();
        self.sender.send(&mut report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender_to(controller: &UdpSocket, node_ip: Option<IpAddr>) -> ReportSender {
        let (_keep, endpoints) =
            watch::channel(ControllerEndpoints::fixed(controller.local_addr().unwrap()));
        let identity = NodeIdentity {
            node: "node".into(),
            boot_id: "boot".into(),
            kernel_release: None,
        };
        ReportSender::new(endpoints, node_ip, AuthKey::None, identity).unwrap()
    }

    /// The source address of one report sent by `sender`.
    fn sent_from(sender: &ReportSender, controller: &UdpSocket) -> IpAddr {
        let mut report = sender.report(
            ReportKind::KernelPanic,
            ReportSource::Console,
            "Kernel panic - not syncing: test".into(),
            Vec::new(),
        );
        assert_eq!(sender.send(&mut report).failed, 0);
        let mut datagram = [0u8; 4096];
        controller.recv_from(&mut datagram).unwrap().1.ip()
    }

    #[test]
    fn reports_leave_from_the_node_address() {
        let controller = UdpSocket::bind("127.0.0.1:0").unwrap();
        controller
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        // Every 127/8 address is this host's; the route to 127.0.0.1 prefers 127.0.0.1.
        let node_ip = IpAddr::from([127, 0, 0, 2]);
        assert_eq!(
            sent_from(&sender_to(&controller, Some(node_ip)), &controller),
            node_ip
        );
        assert_eq!(
            sent_from(&sender_to(&controller, None), &controller),
            IpAddr::from([127, 0, 0, 1])
        );
        // An address the host lacks is left to the route, and the report still goes out.
        let elsewhere = IpAddr::from([192, 0, 2, 1]);
        assert_eq!(
            sent_from(&sender_to(&controller, Some(elsewhere)), &controller),
            IpAddr::from([127, 0, 0, 1])
        );
    }

    /// A last gasp sending to a local socket; returns both.
    fn last_gasp(netconsole_registered: fn() -> bool) -> (LastGasp, UdpSocket) {
        let controller = UdpSocket::bind("127.0.0.1:0").unwrap();
        controller
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let (_keep, endpoints) =
            watch::channel(ControllerEndpoints::fixed(controller.local_addr().unwrap()));
        let identity = NodeIdentity {
            node: "node".into(),
            boot_id: "boot".into(),
            kernel_release: None,
        };
        let sender = ReportSender::new(endpoints, None, AuthKey::None, identity).unwrap();
        (LastGasp::new(sender, netconsole_registered), controller)
    }

    fn received(controller: &UdpSocket) -> Report {
        let mut datagram = [0u8; 4096];
        let len = controller.recv(&mut datagram).unwrap();
        wire::decode(&datagram[..len], &AuthKey::None).unwrap()
    }

    #[test]
    fn a_probed_panic_is_sent_after_a_console_panic() {
        let (mut gasp, controller) = last_gasp(|| false);
        let forged = "Kernel panic - not syncing: forged";
        assert_eq!(
            gasp.on_panic(forged, KernelSource::Console, Vec::new())
                .sent,
            1
        );
        assert_eq!(received(&controller).message, forged);
        // Another console panic line adds nothing.
        assert_eq!(
            gasp.on_panic(forged, KernelSource::Console, Vec::new()),
            Sent::default()
        );

        let format = "Kernel panic - not syncing: %s";
        assert_eq!(
            gasp.on_panic(format, KernelSource::Fentry, Vec::new()).sent,
            1
        );
        let probed = received(&controller);
        assert_eq!(
            (probed.source, probed.message.as_str()),
            (ReportSource::Fentry, format)
        );
        assert!(probed.context.is_empty());

        // The printed line then names the panic, once; the source stays the probe's.
        let printed = "Kernel panic - not syncing: sysrq triggered crash";
        assert_eq!(
            gasp.on_panic(printed, KernelSource::Console, Vec::new())
                .sent,
            1
        );
        let update = received(&controller);
        assert_eq!(
            (update.source, update.message.as_str()),
            (ReportSource::Fentry, printed)
        );
        assert_eq!(
            gasp.on_panic(forged, KernelSource::Console, Vec::new()),
            Sent::default()
        );
        assert_eq!(
            gasp.on_panic(format, KernelSource::Kprobe, Vec::new()),
            Sent::default()
        );
    }

    #[test]
    fn without_netconsole_the_lines_that_follow_go_as_context() {
        let (mut gasp, controller) = last_gasp(|| false);
        let format = "Kernel panic - not syncing: %s";
        gasp.on_panic(format, KernelSource::Kprobe, vec!["panic+0x10".into()]);
        assert!(received(&controller).context.is_empty());
        assert_eq!(gasp.on_line("CPU: 1 PID: 1 Comm: sh").sent, 1);
        let context = received(&controller);
        assert_eq!(context.context, ["CPU: 1 PID: 1 Comm: sh"]);
        assert_eq!(context.frames, ["panic+0x10"]);
    }

    #[test]
    fn with_netconsole_nothing_follows_the_last_gasp() {
        let (mut gasp, controller) = last_gasp(|| true);
        let format = "Kernel panic - not syncing: %s";
        assert_eq!(
            gasp.on_panic(format, KernelSource::Kprobe, vec!["panic+0x10".into()])
                .sent,
            1
        );
        assert_eq!(received(&controller).frames, ["panic+0x10"]);
        let withheld = Sent {
            withheld: 1,
            ..Sent::default()
        };
        let printed = "Kernel panic - not syncing: sysrq triggered crash";
        assert_eq!(
            gasp.on_panic(printed, KernelSource::Console, Vec::new()),
            withheld
        );
        assert_eq!(gasp.on_line("CPU: 1 PID: 1 Comm: sh"), withheld);
        controller
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut datagram = [0u8; 4096];
        assert!(
            controller.recv(&mut datagram).is_err(),
            "a datagram after the last gasp"
        );
    }

    #[test]
    fn with_netconsole_a_probe_still_follows_a_console_panic_line() {
        let (mut gasp, controller) = last_gasp(|| true);
        let forged = "Kernel panic - not syncing: forged";
        assert_eq!(
            gasp.on_panic(forged, KernelSource::Console, Vec::new())
                .sent,
            1
        );
        assert_eq!(received(&controller).source, ReportSource::Console);
        assert_eq!(gasp.on_line("context").withheld, 1);
        let format = "Kernel panic - not syncing: %s";
        assert_eq!(
            gasp.on_panic(format, KernelSource::Fentry, Vec::new()).sent,
            1
        );
        assert_eq!(received(&controller).source, ReportSource::Fentry);
    }
}
