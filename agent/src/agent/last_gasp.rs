//! The last-gasp report: the moment the kernel starts to panic, one UDP datagram to the
//! controller, then one more for each context line that follows, while the machine lasts.

use std::{
    io,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::wire::{self, AuthKey, Report};

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

struct Incident {
    started: Instant,
    source: &'static str,
    message: String,
    context: Vec<String>,
}

pub struct LastGasp {
    socket: UdpSocket,
    controller: SocketAddr,
    key: AuthKey,
    identity: NodeIdentity,
    /// Strictly increasing within a boot, across agent restarts: it starts from the wall clock in µs.
    next_seq: u64,
    incident: Option<Incident>,
}

impl LastGasp {
    pub fn new(controller: SocketAddr, key: AuthKey, identity: NodeIdentity) -> io::Result<Self> {
        let bind: SocketAddr = if controller.is_ipv4() {
            "0.0.0.0:0".parse().expect("valid")
        } else {
            "[::]:0".parse().expect("valid")
        };
        let socket = UdpSocket::bind(bind)?;
        let next_seq = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        Ok(Self {
            socket,
            controller,
            key,
            identity,
            next_seq,
            incident: None,
        })
    }

    /// A panic was seen. The first sighting sends at once; a later one from the console
    /// replaces the message of a `panic()` probe's format string with the printed text.
    /// Returns whether a datagram was sent.
    pub fn on_panic(&mut self, message: &str, source: &'static str) -> io::Result<bool> {
        match &mut self.incident {
            None => {
                self.incident = Some(Incident {
                    started: Instant::now(),
                    source,
                    message: message.to_owned(),
                    context: Vec::new(),
                });
            }
            Some(incident) if incident.source != "console" && source == "console" => {
                incident.message = message.to_owned();
                incident.source = source;
            }
            Some(_) => return Ok(false),
        }
        self.send()
    }

    /// A console line after the panic: sent as context while the window lasts.
    /// Returns whether a datagram was sent.
    pub fn on_line(&mut self, line: &str) -> io::Result<bool> {
        let Some(incident) = &mut self.incident else {
            return Ok(false);
        };
        if incident.context.len() >= MAX_CONTEXT_LINES
            || incident.started.elapsed() > CONTEXT_WINDOW
        {
            return Ok(false);
        }
        incident.context.push(line.to_owned());
        self.send()
    }

    fn send(&mut self) -> io::Result<bool> {
        let Some(incident) = &self.incident else {
            return Ok(false);
        };
        let report = Report {
            node: self.identity.node.clone(),
            boot_id: self.identity.boot_id.clone(),
            seq: self.next_seq,
            sent_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            kind: "kernel_panic".into(),
            source: incident.source.into(),
            message: incident.message.clone(),
            context: incident.context.clone(),
            kernel_release: self.identity.kernel_release.clone(),
        };
        self.next_seq += 1;
        let datagram = wire::encode(&report, &self.key).map_err(io::Error::other)?;
        self.socket.send_to(&datagram, self.controller)?;
        Ok(true)
    }
}
