//! Where a datagram to an IPv4 address leaves this host, as netconsole needs it spelled out:
//! the egress device and source address, and the Ethernet address of the next hop. Netconsole
//! sends from the device directly (netpoll), below routing and neighbour resolution, so the
//! agent resolves both once and writes the answers into the target.
//!
//! The route comes from the kernel itself (rtnetlink `RTM_GETROUTE`, the question `ip route
//! get` asks): it answers with the device, gateway and preferred source the kernel would use,
//! after policy rules, every routing table, metrics and multipath selection. `/proc/net/route`
//! shows only the main table and no source address, so using it would mean re-implementing
//! the kernel's lookup and source selection, and getting them wrong on hosts with policy
//! routing. The next hop's MAC comes from the neighbour table, `/proc/net/arp`; when the
//! kernel has not resolved it yet, one empty UDP datagram to the destination makes it.

use std::{
    fmt, io,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    str::FromStr,
    time::{Duration, Instant},
};

use thiserror::Error;

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{text:?} is not a MAC address (six hex pairs separated by colons): {why}")]
pub struct MacError {
    pub text: String,
    pub why: &'static str,
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(text: &str) -> Result<Self, MacError> {
        let error = |why| MacError {
            text: text.to_owned(),
            why,
        };
        let mut mac = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(|| error("fewer than six parts"))?;
            if part.len() != 2 {
                return Err(error("a part is not two hex digits"));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| error("a part is not hex"))?;
        }
        if parts.next().is_some() {
            return Err(error("more than six parts"));
        }
        Ok(Self(mac))
    }
}

/// The kernel's route to one destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Index of the egress device.
    pub ifindex: u32,
    /// The gateway, for a destination that is not on a directly connected network.
    pub gateway: Option<Ipv4Addr>,
    /// The source address the kernel picks for this destination.
    pub source: Ipv4Addr,
}

#[derive(Debug, Error)]
pub enum RouteError {
    #[error("asking the kernel for the route over rtnetlink: {0}")]
    Io(#[from] io::Error),
    #[error("the kernel has no usable route: {0}")]
    NoRoute(io::Error),
    #[error(
        "the route is of type {0}, not unicast: the destination is this host's own, a \
         broadcast or multicast address, or routed to nowhere"
    )]
    NotUnicast(&'static str),
    #[error("the kernel's route has no {0}")]
    Missing(&'static str),
    #[error("malformed rtnetlink answer: {0}")]
    Malformed(String),
}

// rtnetlink, from <linux/netlink.h> and <linux/rtnetlink.h>.
const NLMSG_HDRLEN: usize = 16;
const RTMSG_LEN: usize = 12;
const NLMSG_ERROR: u16 = 2;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLM_F_REQUEST: u16 = 1;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RTN_UNICAST: u8 = 1;

/// Route types by number (`RTN_*`).
fn route_type_name(value: u8) -> &'static str {
    match value {
        0 => "unspec",
        1 => "unicast",
        2 => "local",
        3 => "broadcast",
        4 => "anycast",
        5 => "multicast",
        6 => "blackhole",
        7 => "unreachable",
        8 => "prohibit",
        9 => "throw",
        10 => "nat",
        _ => "unknown",
    }
}

/// Asks the kernel how it would route a datagram to `destination` (`ip route get`).
pub fn route(destination: Ipv4Addr) -> Result<Route, RouteError> {
    // SAFETY: socket() has no memory preconditions; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO reads a timeval of the given size from a live stack value.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error().into());
    }
    const SEQ: u32 = 1;
    let request = route_request(destination, SEQ);
    // SAFETY: sends `request.len()` bytes from a live buffer; the kernel is the default peer.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error().into());
    }
    let mut answer = [0u8; 4096];
    // SAFETY: receives at most `answer.len()` bytes into a live buffer.
    let received = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            answer.as_mut_ptr().cast(),
            answer.len(),
            0,
        )
    };
    if received < 0 {
        return Err(io::Error::last_os_error().into());
    }
    parse_route_answer(&answer[..received as usize], SEQ)
}

/// `RTM_GETROUTE` for one IPv4 destination: a netlink header, an `rtmsg`, and `RTA_DST`.
fn route_request(destination: Ipv4Addr, seq: u32) -> Vec<u8> {
    let len = NLMSG_HDRLEN + RTMSG_LEN + 8;
    let mut message = Vec::with_capacity(len);
    message.extend_from_slice(&(len as u32).to_ne_bytes());
    message.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    message.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    message.extend_from_slice(&seq.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills in ours
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    message.extend_from_slice(&[libc::AF_INET as u8, 32, 0, 0, 0, 0, 0, 0]);
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&8u16.to_ne_bytes());
    message.extend_from_slice(&RTA_DST.to_ne_bytes());
    message.extend_from_slice(&destination.octets());
    message
}

/// The kernel's answer to [`route_request`]: an `RTM_NEWROUTE` or an error.
fn parse_route_answer(answer: &[u8], seq: u32) -> Result<Route, RouteError> {
    let malformed = |what: &str| RouteError::Malformed(what.to_owned());
    let header = answer
        .get(..NLMSG_HDRLEN)
        .ok_or_else(|| malformed("shorter than a netlink header"))?;
    let len = u32::from_ne_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let kind = u16::from_ne_bytes(header[4..6].try_into().expect("2 bytes"));
    let answer_seq = u32::from_ne_bytes(header[8..12].try_into().expect("4 bytes"));
    let body = answer
        .get(NLMSG_HDRLEN..len)
        .ok_or_else(|| malformed("netlink length beyond the datagram"))?;
    if answer_seq != seq {
        return Err(RouteError::Malformed(format!(
            "answer to request {answer_seq}, not {seq}"
        )));
    }
    match kind {
        NLMSG_ERROR => {
            let errno = i32::from_ne_bytes(
                body.get(..4)
                    .ok_or_else(|| malformed("netlink error without its code"))?
                    .try_into()
                    .expect("4 bytes"),
            );
            if errno == 0 {
                return Err(malformed("an acknowledgement instead of a route"));
            }
            Err(RouteError::NoRoute(io::Error::from_raw_os_error(-errno)))
        }
        RTM_NEWROUTE => {
            let rtmsg = body
                .get(..RTMSG_LEN)
                .ok_or_else(|| malformed("route message shorter than rtmsg"))?;
            if rtmsg[0] != libc::AF_INET as u8 {
                return Err(RouteError::Malformed(format!(
                    "route of address family {}, not IPv4",
                    rtmsg[0]
                )));
            }
            if rtmsg[7] != RTN_UNICAST {
                return Err(RouteError::NotUnicast(route_type_name(rtmsg[7])));
            }
            let (mut ifindex, mut gateway, mut source) = (None, None, None);
            let mut attributes = &body[RTMSG_LEN..];
            while attributes.len() >= 4 {
                let len = u16::from_ne_bytes([attributes[0], attributes[1]]) as usize;
                let kind = u16::from_ne_bytes([attributes[2], attributes[3]]) & 0x3fff;
                // rta_len counts its own 4-byte header: less would never advance.
                if len < 4 {
                    return Err(RouteError::Malformed(format!(
                        "route attribute of type {kind} with length {len}, shorter than its header"
                    )));
                }
                let value = attributes
                    .get(4..len)
                    .ok_or_else(|| malformed("route attribute beyond the message"))?;
                let ipv4 = || -> Result<Ipv4Addr, RouteError> {
                    let octets: [u8; 4] = value
                        .try_into()
                        .map_err(|_| malformed("an address attribute is not 4 bytes"))?;
                    Ok(Ipv4Addr::from(octets))
                };
                match kind {
                    RTA_OIF => {
                        let index: [u8; 4] = value
                            .try_into()
                            .map_err(|_| malformed("RTA_OIF is not 4 bytes"))?;
                        ifindex = Some(u32::from_ne_bytes(index));
                    }
                    RTA_GATEWAY => gateway = Some(ipv4()?),
                    RTA_PREFSRC => source = Some(ipv4()?),
                    _ => {}
                }
                let aligned = (len + 3) & !3;
                attributes = attributes.get(aligned..).unwrap_or_default();
            }
            Ok(Route {
                ifindex: ifindex.ok_or(RouteError::Missing("output device (RTA_OIF)"))?,
                gateway,
                source: source.ok_or(RouteError::Missing("source address (RTA_PREFSRC)"))?,
            })
        }
        other => Err(RouteError::Malformed(format!(
            "netlink message type {other}, not a route or an error"
        ))),
    }
}

/// The name of the device with index `ifindex`.
pub fn interface_name(ifindex: u32) -> io::Result<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes, NUL included, into `name`.
    let found = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) };
    if found.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success `name` holds a NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

/// The device's hardware type (`ARPHRD_*`), from `/sys/class/net/<device>/type`.
pub fn device_type(device: &str) -> io::Result<u16> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{device}/type"))?;
    text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{:?} is not a hardware type number", text.trim()),
        )
    })
}

/// `ATF_COM` in `/proc/net/arp`'s flags: the entry is resolved (reachable, stale, permanent...).
const ATF_COM: u32 = 0x2;
/// `ARPHRD_ETHER`: netconsole builds Ethernet frames, so only these neighbours can carry it.
const ARPHRD_ETHER: u16 = 1;

/// One line of `/proc/net/arp`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: Ipv4Addr,
    pub hw_type: u16,
    pub flags: u32,
    /// The hardware address of an Ethernet neighbour (all zeros while unresolved).
    pub mac: Option<MacAddr>,
    pub device: String,
}

impl Neighbour {
    /// The MAC to send to, if the kernel has resolved this Ethernet neighbour.
    pub fn resolved_mac(&self) -> Option<MacAddr> {
        self.mac
            .filter(|mac| self.flags & ATF_COM != 0 && !mac.is_zero())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("/proc/net/arp line {line}: {why}: {text:?}")]
pub struct ArpError {
    pub line: usize,
    pub text: String,
    pub why: String,
}

/// Parses `/proc/net/arp`: a header, then one neighbour a line
/// (`IP address  HW type  Flags  HW address  Mask  Device`, types and flags in hex).
pub fn parse_arp_table(text: &str) -> Result<Vec<Neighbour>, ArpError> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, header)) if header.starts_with("IP address") => {}
        Some((_, header)) => {
            return Err(ArpError {
                line: 1,
                text: header.to_owned(),
                why: "not the /proc/net/arp header".into(),
            });
        }
        None => return Ok(Vec::new()),
    }
    lines
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            parse_arp_line(line).map_err(|why| ArpError {
                line: index + 1,
                text: line.to_owned(),
                why,
            })
        })
        .collect()
}

fn parse_arp_line(line: &str) -> Result<Neighbour, String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [ip, hw_type, flags, hw_address, _mask, device] = fields[..] else {
        return Err(format!("{} fields, not 6", fields.len()));
    };
    let hex = |field: &str, what: &str| {
        field
            .strip_prefix("0x")
            .and_then(|digits| u32::from_str_radix(digits, 16).ok())
            .ok_or_else(|| format!("{what} {field:?} is not a 0x-prefixed hex number"))
    };
    let hw_type = u16::try_from(hex(hw_type, "HW type")?)
        .map_err(|_| format!("HW type {hw_type} out of range"))?;
    let mac = if hw_type == ARPHRD_ETHER {
        Some(
            hw_address
                .parse::<MacAddr>()
                .map_err(|error| error.to_string())?,
        )
    } else {
        None
    };
    Ok(Neighbour {
        ip: ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IPv4 address"))?,
        hw_type,
        flags: hex(flags, "flags")?,
        mac,
        device: device.to_owned(),
    })
}

/// Everything netconsole needs to reach one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Path {
    pub device: String,
    pub source: Ipv4Addr,
    /// The gateway the destination is reached through; `None` when it is on-link.
    pub gateway: Option<Ipv4Addr>,
    /// The MAC of the gateway, or of the destination itself when it is on-link.
    pub mac: MacAddr,
    /// The neighbour entry was missing and the agent sent a datagram to make the kernel resolve it.
    pub primed: bool,
}

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error("route to {destination}: {error}")]
    Route {
        destination: Ipv4Addr,
        error: RouteError,
    },
    #[error(
        "the route to {destination} leaves through device {ifindex}, whose name is unknown: {error}"
    )]
    Device {
        destination: Ipv4Addr,
        ifindex: u32,
        error: io::Error,
    },
    #[error("reading the hardware type of device {device}: {error}")]
    DeviceType { device: String, error: io::Error },
    #[error(
        "the route leaves through {device}, which is not an Ethernet device (hardware type \
         {hw_type}); netconsole sends Ethernet frames only"
    )]
    NotEthernetDevice { device: String, hw_type: u16 },
    #[error("reading /proc/net/arp: {0}")]
    ReadNeighbours(io::Error),
    #[error(transparent)]
    Neighbours(#[from] ArpError),
    #[error("sending a datagram to {destination} to resolve its next hop: {error}")]
    Prime {
        destination: SocketAddrV4,
        error: io::Error,
    },
    #[error(
        "next hop {next_hop} on {device} has no MAC address in /proc/net/arp {waited:?} after a \
         datagram was sent to {destination} to resolve it"
    )]
    Unresolved {
        destination: SocketAddrV4,
        next_hop: Ipv4Addr,
        device: String,
        waited: Duration,
    },
}

/// How often the neighbour table is read again while waiting for the kernel to resolve a next hop.
const NEIGHBOUR_POLL: Duration = Duration::from_millis(20);

/// Resolves the path to `destination`: the kernel's route, then the next hop's MAC. When the
/// neighbour table lacks it, one empty UDP datagram to `destination` (the controller's
/// netconsole port, which ignores empty datagrams) makes the kernel resolve it, and the table
/// is read again until `wait` has passed.
pub fn resolve(destination: SocketAddrV4, wait: Duration) -> Result<Path, ResolveError> {
    let ip = *destination.ip();
    let route = route(ip).map_err(|error| ResolveError::Route {
        destination: ip,
        error,
    })?;
    let device = interface_name(route.ifindex).map_err(|error| ResolveError::Device {
        destination: ip,
        ifindex: route.ifindex,
        error,
    })?;
    let hw_type = device_type(&device).map_err(|error| ResolveError::DeviceType {
        device: device.clone(),
        error,
    })?;
    if hw_type != ARPHRD_ETHER {
        return Err(ResolveError::NotEthernetDevice { device, hw_type });
    }
    let next_hop = route.gateway.unwrap_or(ip);
    let mut primed: Option<Instant> = None;
    loop {
        let table =
            std::fs::read_to_string("/proc/net/arp").map_err(ResolveError::ReadNeighbours)?;
        let neighbour = parse_arp_table(&table)?
            .into_iter()
            .find(|entry| entry.ip == next_hop && entry.device == device);
        if let Some(mac) = neighbour.as_ref().and_then(Neighbour::resolved_mac) {
            return Ok(Path {
                device,
                source: route.source,
                gateway: route.gateway,
                mac,
                primed: primed.is_some(),
            });
        }
        match primed {
            None => {
                prime(destination).map_err(|error| ResolveError::Prime { destination, error })?;
                primed = Some(Instant::now());
            }
            Some(at) if at.elapsed() >= wait => {
                return Err(ResolveError::Unresolved {
                    destination,
                    next_hop,
                    device,
                    waited: at.elapsed(),
                });
            }
            Some(_) => {}
        }
        std::thread::sleep(NEIGHBOUR_POLL);
    }
}

/// One empty datagram to `destination`: the kernel resolves the next hop to send it.
fn prime(destination: SocketAddrV4) -> io::Result<()> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect(destination)?;
    socket.send(&[])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hex dumps of the kernel's answers (6.18, x86_64) to the request `route_request` builds,
    /// on a host with `192.0.2.2/24 dev eth0` (ifindex 4) and `default via 192.0.2.1`.
    fn answer(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    /// `ip route get 192.0.2.1`: on-link.
    const ON_LINK: &str = "680000001800000001000000843a000002200000fe0000010002000008000f00fe00000008000100c0000201080004000400000008000700c0000202080019000000000024000c000200000000000000000000000000000000000000000000000000000000000000";
    /// `ip route get 8.8.8.8`: through the gateway.
    const VIA_GATEWAY: &str = "700000001800000001000000ad3a000002200000fe0000010002000008000f00fe0000000800010008080808080004000400000008000700c000020208000500c0000201080019000000000024000c000200000056950000000000000000000000000000000000000000000000000000";
    /// `ip route get 127.0.0.1`: a local route (type 2) through lo.
    const LOCAL: &str = "680000001800000001000000d63a000002200000fe0000020002008008000f00fe000000080001007f0000010800040001000000080007007f000001080019000000000024000c000200000061960000000000000000000000000000000000000000000000000000";
    /// In a network namespace without routes: ENETUNREACH.
    const NO_ROUTE: &str = "380000000200000001000000063c00009bffffff240000001a00010001000000000000000220000000000000000000000800010008080808";
    /// To a `blackhole` route: EINVAL; to an `unreachable` one: EHOSTUNREACH.
    const BLACKHOLE: &str = "380000000200000001000000373c0000eaffffff240000001a0001000100000000000000022000000000000000000000080001000a090101";
    const UNREACHABLE: &str = "380000000200000001000000613c00008fffffff240000001a0001000100000000000000022000000000000000000000080001000a080101";

    #[test]
    fn route_answers_from_a_real_kernel() {
        assert_eq!(
            parse_route_answer(&answer(ON_LINK), 1).unwrap(),
            Route {
                ifindex: 4,
                gateway: None,
                source: Ipv4Addr::new(192, 0, 2, 2),
            }
        );
        assert_eq!(
            parse_route_answer(&answer(VIA_GATEWAY), 1).unwrap(),
            Route {
                ifindex: 4,
                gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
                source: Ipv4Addr::new(192, 0, 2, 2),
            }
        );
        assert!(matches!(
            parse_route_answer(&answer(LOCAL), 1),
            Err(RouteError::NotUnicast("local"))
        ));
        for (hex, errno) in [
            (NO_ROUTE, libc::ENETUNREACH),
            (BLACKHOLE, libc::EINVAL),
            (UNREACHABLE, libc::EHOSTUNREACH),
        ] {
            match parse_route_answer(&answer(hex), 1) {
                Err(RouteError::NoRoute(error)) => assert_eq!(error.raw_os_error(), Some(errno)),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn malformed_route_answers_are_errors() {
        let good = answer(VIA_GATEWAY);
        assert!(matches!(
            parse_route_answer(&good, 2),
            Err(RouteError::Malformed(why)) if why.contains("request 1")
        ));
        assert!(matches!(
            parse_route_answer(&good[..10], 1),
            Err(RouteError::Malformed(_))
        ));
        // The header claims more bytes than arrived.
        assert!(matches!(
            parse_route_answer(&good[..good.len() - 8], 1),
            Err(RouteError::Malformed(_))
        ));
        // Without RTA_PREFSRC (attribute type 7 renamed to 99).
        let mut no_source = good.clone();
        let at = no_source
            .windows(4)
            .position(|w| w == [8, 0, 7, 0])
            .unwrap();
        no_source[at + 2] = 99;
        assert!(matches!(
            parse_route_answer(&no_source, 1),
            Err(RouteError::Missing(what)) if what.contains("RTA_PREFSRC")
        ));
        // A zero-length attribute (it would never advance) and an overlong one.
        for (len, why) in [
            (0u16, "shorter than its header"),
            (3, "shorter than its header"),
        ] {
            let mut bad = good.clone();
            bad[at..at + 2].copy_from_slice(&len.to_ne_bytes());
            assert!(matches!(
                parse_route_answer(&bad, 1),
                Err(RouteError::Malformed(message)) if message.contains(why)
            ));
        }
        let mut overlong = good.clone();
        overlong[at..at + 2].copy_from_slice(&200u16.to_ne_bytes());
        assert!(matches!(
            parse_route_answer(&overlong, 1),
            Err(RouteError::Malformed(message)) if message.contains("beyond the message")
        ));
    }

    #[test]
    fn the_request_is_what_the_kernel_answered() {
        let request = route_request(Ipv4Addr::new(8, 8, 8, 8), 7);
        assert_eq!(request.len(), 36);
        assert_eq!(&request[0..4], &36u32.to_ne_bytes());
        assert_eq!(&request[8..12], &7u32.to_ne_bytes());
        assert_eq!(&request[16..18], &[libc::AF_INET as u8, 32]);
        assert_eq!(&request[32..36], &[8, 8, 8, 8]);
    }

    #[test]
    fn this_kernel_routes_loopback_locally() {
        match route(Ipv4Addr::LOCALHOST) {
            Err(RouteError::NotUnicast("local")) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(interface_name(1).unwrap(), "lo");
        // ARPHRD_LOOPBACK.
        assert_eq!(device_type("lo").unwrap(), 772);
    }

    /// `/proc/net/arp` as the kernel prints it: resolved, incomplete, permanent and stale
    /// entries (captured from 6.18 with `ip neigh` in a network namespace).
    const ARP: &str = "\
IP address       HW type     Flags       HW address            Mask     Device
192.0.2.1        0x1         0x2         02:fc:00:00:00:05     *        eth0
10.7.0.9         0x1         0x0         00:00:00:00:00:00     *        v0
10.7.0.50        0x1         0x6         02:00:00:00:00:32     *        v0
10.7.0.51        0x1         0x2         02:00:00:00:00:33     *        v0
";

    #[test]
    fn arp_table_from_a_real_kernel() {
        let table = parse_arp_table(ARP).unwrap();
        assert_eq!(table.len(), 4);
        assert_eq!(
            table[0],
            Neighbour {
                ip: Ipv4Addr::new(192, 0, 2, 1),
                hw_type: 1,
                flags: 2,
                mac: Some(MacAddr([2, 0xfc, 0, 0, 0, 5])),
                device: "eth0".into(),
            }
        );
        let resolved: Vec<_> = table.iter().map(Neighbour::resolved_mac).collect();
        assert_eq!(
            resolved,
            [
                Some(MacAddr([2, 0xfc, 0, 0, 0, 5])),
                None, // incomplete
                Some(MacAddr([2, 0, 0, 0, 0, 0x32])),
                Some(MacAddr([2, 0, 0, 0, 0, 0x33])), // stale is still the best answer
            ]
        );
        assert_eq!(
            parse_arp_table(
                "IP address       HW type     Flags       HW address            Mask     Device\n"
            )
            .unwrap(),
            []
        );
    }

    #[test]
    fn bad_arp_lines_name_the_line_and_the_field() {
        let error =
            parse_arp_table(&format!("{ARP}10.0.0.1 0x1 0x2 02:00:00:00:00 * eth0\n")).unwrap_err();
        assert_eq!(error.line, 6);
        assert!(error.why.contains("MAC"), "{error}");
        let error = parse_arp_table(&format!("{ARP}10.0.0.1 1 0x2 02:00:00:00:00:01 * eth0\n"))
            .unwrap_err();
        assert!(error.why.contains("HW type"), "{error}");
        let error = parse_arp_table(&format!("{ARP}10.0.0.1 0x1 0x2 * eth0\n")).unwrap_err();
        assert!(error.why.contains("fields"), "{error}");
        let error = parse_arp_table("Iface Destination\n").unwrap_err();
        assert_eq!(error.line, 1);
        // Non-Ethernet neighbours keep their type and carry no MAC.
        let infiniband = parse_arp_table(&format!(
            "{ARP}10.1.0.1 0x20 0x2 80:00:00:48:fe:80:00:00:00:00:00:00:00:02:c9:03:00:00:00:01 * ib0\n"
        ))
        .unwrap();
        assert_eq!(infiniband[4].hw_type, 0x20);
        assert_eq!(infiniband[4].resolved_mac(), None);
    }

    #[test]
    fn mac_addresses() {
        let mac: MacAddr = "52:55:0A:00:02:02".parse().unwrap();
        assert_eq!(mac.0, [0x52, 0x55, 0x0a, 0, 2, 2]);
        assert_eq!(mac.to_string(), "52:55:0a:00:02:02");
        for bad in [
            "",
            "52:55:0a:00:02",
            "52:55:0a:00:02:02:03",
            "52:55:0a:00:2:002",
            "zz:55:0a:00:02:02",
            "52-55-0a-00-02-02",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}
