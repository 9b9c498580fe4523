//! Threads that block in `recvfrom`, for the tests that watch the agent find netlink hangs.

use std::{ffi::CString, net::UdpSocket, os::fd::IntoRawFd as _, thread, time::Duration};

/// Blocks in `recvfrom` on a fresh socket for `timeout` (SO_RCVTIMEO), in a thread named
/// `name`. Returns the thread's id once it is about to block, and its handle.
pub fn block_in_recvfrom(
    name: &'static str,
    socket: fn() -> i32,
    timeout: Duration,
) -> (u32, thread::JoinHandle<()>) {
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let handle = thread::spawn(move || {
        let thread_name = CString::new(name).expect("no NUL in the name");
        // SAFETY: PR_SET_NAME with a NUL-terminated name; longer names are cut at 15 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, thread_name.as_ptr()) };
        let fd = socket();
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: valid fd and option buffer.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        // SAFETY: no arguments, no side effects.
        tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
        let mut buf = [0u8; 4096];
        // SAFETY: valid fd and buffer; returns -1/EAGAIN at the timeout.
        unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            libc::close(fd);
        }
    });
    (tid_rx.recv().expect("the thread starts"), handle)
}

/// A NETLINK_ROUTE socket bound to an auto-assigned port id; nothing will answer it.
pub fn netlink_route_socket() -> i32 {
    // SAFETY: plain socket creation and bind.
    unsafe {
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        );
        fd
    }
}

/// A UDP socket on loopback that nobody sends to.
pub fn udp_socket() -> i32 {
    UdpSocket::bind("127.0.0.1:0")
        .expect("bind UDP on loopback")
        .into_raw_fd()
}
