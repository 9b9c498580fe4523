//! A CNI plugin for the test cluster's chain that hangs as a CNI daemon's thread does: on ADD it
//! blocks in `recvfrom` on a NETLINK_ROUTE socket nobody writes to, until it is killed. Other
//! commands pass the previous plugin's result through.

use std::io::Read as _;

fn main() {
    let mut config = String::new();
    let _ = std::io::stdin().read_to_string(&mut config);
    match std::env::var("CNI_COMMAND").as_deref() {
        Ok("VERSION") => {
            println!(r#"{{"cniVersion":"0.4.0","supportedVersions":["0.3.0","0.3.1","0.4.0"]}}"#);
            return;
        }
        Ok("ADD") => block_in_netlink_recv(),
        _ => {}
    }
    let config: serde_json::Value = serde_json::from_str(&config).unwrap_or_default();
    if let Some(previous) = config.get("prevResult") {
        println!("{previous}");
    }
}

fn block_in_netlink_recv() {
    // SAFETY: plain system calls on a socket this function owns; the buffer outlives recvfrom.
    unsafe {
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE);
        let mut buffer = [0u8; 4096];
        libc::recvfrom(
            fd,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
    }
}
