//! A fault-injecting proxy in front of a [`RealApiServer`]: plain HTTP on a loopback port,
//! every request forwarded (method, path, query, headers with the caller's bearer token, body)
//! to the real server over HTTPS, responses streamed back (watches included). The same
//! [`Faults`] apply: the next N requests of a verb and resource fail
//! with a `Status` of a given code before reaching the server, every request can be delayed,
//! and open watch responses can be ended.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use lastgasp_tests::{faults::Matcher, kube::{RealApiServer, User, proxy::FaultProxy}};
//! let server = RealApiServer::start().await?;
//! let proxy = FaultProxy::start(&server).await?;
//! proxy.faults().fail_next(Matcher::any().verb("delete").resource("pods"), 2, 503);
//! let controller = proxy.client(&User::service_account("lastgasp-system", "lastgasp-controller")).await?;
//! # Ok(()) }
//! ```

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::Context as _;
use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    response::Response,
};
use futures::StreamExt as _;
use tokio::task::JoinHandle;

use super::{RealApiServer, User};
use crate::faults::Faults;

/// One request that reached the proxy, in arrival order.
#[derive(Clone, Debug)]
pub struct ProxiedRequest {
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Kubernetes verb and resource, for resource requests.
    pub verb: Option<String>,
    pub resource: Option<String>,
    /// The status the client got: the injected one, the server's, or 502 when the server could
    /// not be reached.
    pub status: u16,
    /// Whether [`Faults`] answered it (it never reached the server).
    pub injected: bool,
    pub at: Instant,
}

struct Shared {
    upstream: kube::Client,
    faults: Faults,
    log: Mutex<Vec<ProxiedRequest>>,
}

/// A running proxy; it stops on drop (open responses end with it).
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server_url: String,
    tokens: Vec<(User, String)>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `server`.
    pub async fn start(server: &RealApiServer) -> anyhow::Result<Self> {
        // The real server's URL and CA, and no user: the caller's Authorization passes through.
        let kubeconfig = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: upstream
  cluster:
    server: {url}
    certificate-authority-data: {ca}
contexts:
- name: upstream
  context:
    cluster: upstream
    user: nobody
current-context: upstream
users:
- name: nobody
  user: {{}}
",
            url = server.url(),
            ca = {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(server.ca_pem())
            },
        );
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::from_yaml(&kubeconfig)?,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        // Every answer goes back as it came: no retries of 429/503/504 here.
        let mut config = config;
        config.default_retry = false;
        let upstream = kube::Client::try_from(config)?;
        let shared = Arc::new(Shared {
            upstream,
            faults: Faults::default(),
            log: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("binding the proxy's port")?;
        let addr = listener.local_addr()?;
        let app = Router::new().fallback(forward).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let tokens = server.tokens.clone();
        Ok(Self {
            addr,
            shared,
            server_url: server.url().to_owned(),
            tokens,
            task,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The URL of the real server behind it.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The faults applied to requests passing through.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Every request so far, in arrival order (discovery included).
    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A kubeconfig for `user` through the proxy: plain HTTP, `user`'s token and namespace.
    pub fn kubeconfig_yaml(&self, user: &User) -> anyhow::Result<String> {
        let token = self
            .tokens
            .iter()
            .find(|(known, _)| known == user)
            .map(|(_, token)| token.as_str())
            .with_context(|| format!("{} has no token", user.name()))?;
        Ok(format!(
            "apiVersion: v1
kind: Config
clusters:
- name: lastgasp-proxy
  cluster:
    server: {url}
contexts:
- name: lastgasp-proxy
  context:
    cluster: lastgasp-proxy
    user: test-user
    namespace: {namespace}
current-context: lastgasp-proxy
users:
- name: test-user
  user:
    token: {token}
",
            url = self.url(),
            namespace = user.namespace(),
        ))
    }

    /// A kube client for `user` through the proxy.
    pub async fn client(&self, user: &User) -> anyhow::Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml(user)?)?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A client as the ServiceAccount `namespace/name` through the proxy.
    pub async fn client_as(&self, namespace: &str, name: &str) -> anyhow::Result<kube::Client> {
        self.client(&User::service_account(namespace, name)).await
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Hop-by-hop headers, and `host` (the upstream client sets its own).
const NOT_FORWARDED: [&str; 6] = [
    "host",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
];

async fn forward(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let latency = shared.faults.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (parts, body) = request.into_parts();
    let method = parts.method.to_string();
    let uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let classified =
        crate::faults::classify(parts.method.as_str(), parts.uri.path(), parts.uri.query());
    let injected = classified
        .as_ref()
        .and_then(|(verb, resource)| shared.faults.take(verb, resource));
    let response = match injected {
        Some(code) => status_response(
            code,
            injected_reason(code),
            format!("injected fault ({code})"),
        ),
        None => {
            let watching = classified.as_ref().is_some_and(|(verb, _)| verb == "watch");
            pass(&shared, parts, body, &uri, watching).await
        }
    };
    let (verb, resource) = classified.unzip();
    tracing::debug!(%method, %uri, status = response.status().as_u16(), "proxied");
    shared
        .log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(ProxiedRequest {
            method,
            uri,
            verb,
            resource,
            status: response.status().as_u16(),
            injected: injected.is_some(),
            at: Instant::now(),
        });
    response
}

async fn pass(
    shared: &Shared,
    parts: http::request::Parts,
    body: Body,
    uri: &str,
    watching: bool,
) -> Response {
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(body) => body,
        Err(error) => return bad_gateway(format!("reading the request body: {error}")),
    };
    let mut upstream = http::Request::builder().method(parts.method).uri(uri);
    for (name, value) in &parts.headers {
        if !NOT_FORWARDED.contains(&name.as_str()) {
            upstream = upstream.header(name, value);
        }
    }
    let upstream = match upstream.body(kube::client::Body::from(body)) {
        Ok(request) => request,
        Err(error) => return bad_gateway(format!("building the request: {error}")),
    };
    let response = match shared.upstream.send(upstream).await {
        Ok(response) => response,
        Err(error) => return bad_gateway(format!("forwarding: {error}")),
    };
    let (mut parts, body) = response.into_parts();
    for name in NOT_FORWARDED {
        parts.headers.remove(name);
    }
    let body = Body::new(body);
    let body = if watching {
        // Ends when the faults say so, as a dropped connection would.
        let mut drops = shared.faults.watch_drops();
        let dropped = async move {
            let _ = drops.changed().await;
        };
        Body::from_stream(body.into_data_stream().take_until(dropped))
    } else {
        body
    };
    Response::from_parts(parts, body)
}

fn bad_gateway(message: String) -> Response {
    tracing::warn!(%message, "proxy");
    status_response(502, "InternalError", message)
}

/// The `Status.reason` the real server sends with `code`.
fn injected_reason(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        410 => "Expired",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

/// An error as the real server sends it: a `Status` object with the HTTP code.
fn status_response(code: u16, reason: &str, message: String) -> Response {
    let status = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(status.to_string()))
        .expect("a valid response")
}
