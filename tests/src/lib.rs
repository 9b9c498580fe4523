//! Shared test support: the real kube-apiserver fixture, its fault proxy, the VM harness and
//! helpers used by tests/tests/.

pub mod bench;
pub mod blocking;
pub mod container;
pub mod faults;
pub mod fixtures;
pub mod kube;
pub mod vm;
pub mod vm_console;
pub mod vm_diagnose;

/// The body of `GET /metrics` from an agent or controller, over plain HTTP/1.1.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to /metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}
