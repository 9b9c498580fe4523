//! An in-process Kubernetes API server for tests: real HTTP, the real JSON and watch wire
//! format, just the resources lastgasp uses (core/v1 nodes and pods, events.k8s.io/v1 events,
//! coordination.k8s.io/v1 leases, discovery.k8s.io/v1 endpointslices), objects kept as JSON.
//! No authentication, admission, defaulting or schema validation beyond names and types, but
//! for the real server's validation of new events.k8s.io/v1 Events (required fields, lengths,
//! namespaces) and of an EndpointSlice's address type and addresses.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lastgasp_tests::apiserver::Error> {
//! use lastgasp_tests::apiserver::ApiServer;
//! let server = ApiServer::start().await?;
//! let client = server.client().await?;
//! # Ok(()) }
//! ```

mod error;
mod http;
mod patch;
mod resources;
mod select;
mod store;
mod validate;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use crate::faults::{Faults, Matcher};
pub use error::ApiError;
pub use http::RequestRecord;
pub use store::DeleteOptions;

/// Why starting the server, building a client or a direct store access failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("kubeconfig for the test server is unusable: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("cannot build a kube client: {0}")]
    Client(#[from] kube::Error),
    #[error("the server does not serve resource {0:?}")]
    UnknownResource(String),
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// Knobs for [`ApiServer::start_with`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to listen; port 0 picks a free one.
    pub listen: SocketAddr,
    /// How many changes are kept for watches that resume from a resourceVersion;
    /// older ones get a 410 Expired ERROR event.
    pub history_limit: usize,
    /// How often watches that allow bookmarks get a BOOKMARK event.
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            history_limit: 1000,
            bookmark_interval: Duration::from_secs(2),
        }
    }
}

/// A running server. Dropping it stops accepting connections and ends open watches.
pub struct ApiServer {
    app: Arc<http::App>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl ApiServer {
    /// Starts on 127.0.0.1 with a free port and default options.
    pub async fn start() -> Result<Self, Error> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Result<Self, Error> {
        let bind_err = |source| Error::Bind {
            addr: options.listen,
            source,
        };
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let app = Arc::new(http::App {
            store: store::Store::new(options.history_limit),
            faults: Faults::default(),
            log: Mutex::new(Vec::new()),
            bookmark_interval: options.bookmark_interval,
            address: addr.to_string(),
            shutdown: shutdown_rx.clone(),
        });
        let mut stop = shutdown_rx;
        let serve =
            axum::serve(listener, http::router(app.clone())).with_graceful_shutdown(async move {
                // Either a shutdown signal or the sender being dropped ends serving.
                let _ = stop.wait_for(|stopped| *stopped).await;
            });
        let task = tokio::spawn(async move { serve.await });
        Ok(Self {
            app,
            addr,
            shutdown,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server: plain HTTP, a dummy bearer token, namespace `default`.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: lastgasp-test
  cluster:
    server: {url}
contexts:
- name: lastgasp-test
  context:
    cluster: lastgasp-test
    user: lastgasp-test
    namespace: default
current-context: lastgasp-test
users:
- name: lastgasp-test
  user:
    token: lastgasp-test-token
preferences: {{}}
",
            url = self.url()
        )
    }

    /// A kube client configured from [`Self::kubeconfig_yaml`].
    pub async fn client(&self) -> Result<kube::Client, Error> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml())?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Fault and latency injection.
    pub fn faults(&self) -> &Faults {
        &self.app.faults
    }

    /// Requests handled so far (the latest 100 000 at most), in order of completion
    /// (watches: when the stream started).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.app
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn resource(resource: &str) -> Result<&'static resources::ResourceDef, Error> {
        resources::by_plural(resource).ok_or_else(|| Error::UnknownResource(resource.to_string()))
    }

    /// The stored object, bypassing HTTP. `resource` is the plural name, e.g. `pods`.
    pub fn get_json(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>, Error> {
        let def = Self::resource(resource)?;
        match self.app.store.get(def, namespace, name) {
            Ok(object) => Ok(Some(object)),
            Err(e) if e.code == 404 => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// All stored objects of `resource`, in all namespaces when `namespace` is None.
    pub fn list_json(&self, resource: &str, namespace: Option<&str>) -> Result<Vec<Value>, Error> {
        let def = Self::resource(resource)?;
        Ok(self
            .app
            .store
            .list(def, namespace, &select::Selector::default())
            .0)
    }

    /// Stores `object` as given, status included, creating or replacing it (namespace and name
    /// from its metadata). Watchers see the change like any other write.
    pub fn put_json(&self, resource: &str, object: Value) -> Result<Value, Error> {
        let def = Self::resource(resource)?;
        Ok(self.app.store.put(def, object)?)
    }

    /// Deletes like an API DELETE would (finalizers honoured) and returns the last state.
    pub fn delete_json(
        &self,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, Error> {
        let def = Self::resource(resource)?;
        Ok(self
            .app
            .store
            .delete(def, namespace, name, &DeleteOptions::default())?)
    }

    /// Stops the server and waits until open connections have closed.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        let _ = self.shutdown.send(true);
        match self.task.take() {
            Some(task) => task.await.map_err(std::io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Nobody may be listening any more; that is fine.
        let _ = self.shutdown.send(true);
    }
}
