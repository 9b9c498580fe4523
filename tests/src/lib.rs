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

/// The first exposition, within 10 s, that has every one of `lines`; panics with the last
/// one otherwise. For counters bumped after the Kubernetes write a test waited for.
pub async fn scrape_until(addr: std::net::SocketAddr, lines: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let exposition = scrape(addr).await;
        if lines.iter().all(|line| exposition.contains(line)) {
            return exposition;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{lines:?} not all exposed within 10 s:\n{exposition}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
