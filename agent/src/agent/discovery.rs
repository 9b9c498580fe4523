//! Where the controller is: the ready endpoints of its ingest Service, read from the Service's
//! EndpointSlices (label `kubernetes.io/service-name`) and kept current by a watch. The slices
//! are read as discovery.k8s.io/v1 where the API server serves that version, else as v1beta1
//! (Kubernetes 1.20 and older), chosen by API discovery.
//!
//! Pod addresses, not the Service's ClusterIP: the kernel's netconsole sends through netpoll,
//! below netfilter, so kube-proxy's Service NAT never rewrites its packets and a ClusterIP
//! reaches nobody. The last-gasp datagrams go to the same pod addresses, so that at panic time
//! neither channel depends on the node's Service rules or conntrack state.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::{
    api::discovery::v1::EndpointSlice, apimachinery::pkg::apis::meta::v1::APIGroupList,
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::watch;

use crate::{
    kube_retry::{self, Backoff, OnConflict},
    supervise::{Lifetime, Supervisor},
};

/// The label the EndpointSlice controller puts on every slice of a Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label naming who manages a slice, and the value of Kubernetes' EndpointSlice controller,
/// which writes slices only from a Service's selector. A slice anyone else wrote (a custom
/// slice, a mirror) is not the controller's address, whatever its service-name says.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const ENDPOINTSLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";
/// The Service port (and so EndpointSlice port) name of the last-gasp report channel.
pub const REPORTS_PORT: &str = "reports";
/// The Service port (and so EndpointSlice port) name of the netconsole channel.
pub const NETCONSOLE_PORT: &str = "netconsole";

/// A Service, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl FromStr for ServiceRef {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(Self {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("{text:?} is not NAMESPACE/NAME")),
        }
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The controller's current addresses for each channel, sorted, without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControllerEndpoints {
    /// Where last-gasp reports go (the `reports` port of every ready endpoint).
    pub reports: Vec<SocketAddr>,
    /// Where netconsole should send (the `netconsole` port of every ready endpoint).
    pub netconsole: Vec<SocketAddr>,
}

impl ControllerEndpoints {
    /// A fixed report address (`--controller`), no netconsole address.
    pub fn fixed(report: SocketAddr) -> Self {
        Self {
            reports: vec![report],
            netconsole: Vec::new(),
        }
    }

    /// The ready endpoints of `service`'s slices, with their `reports` and `netconsole` ports.
    /// Only slices that Kubernetes' EndpointSlice controller wrote for that Service count (both
    /// labels are checked here, whatever the watch selected). A nil `ready` condition counts as
    /// ready (the API's definition); FQDN slices and addresses that are not IPs are skipped.
    pub fn from_slices<'a>(
        service: &ServiceRef,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
    ) -> Self {
        let mut endpoints = Self::default();
        for slice in slices {
            let labels = slice.labels();
            let owned = slice.namespace().as_deref() == Some(service.namespace.as_str())
                && labels.get(SERVICE_NAME_LABEL) == Some(&service.name)
                && labels.get(MANAGED_BY_LABEL).map(String::as_str)
                    == Some(ENDPOINTSLICE_CONTROLLER);
            if !owned || !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                continue;
            }
            let port = |wanted: &str| {
                slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|port| {
                        port.name.as_deref().unwrap_or_default() == wanted
                            && port.protocol.as_deref().unwrap_or("TCP") == "UDP"
                    })
                    .and_then(|port| u16::try_from(port.port?).ok())
            };
            let (reports, netconsole) = (port(REPORTS_PORT), port(NETCONSOLE_PORT));
            let ready = slice.endpoints.iter().filter(|endpoint| {
                endpoint
                    .conditions
                    .as_ref()
                    .and_then(|conditions| conditions.ready)
                    .unwrap_or(true)
            });
            for address in ready.flat_map(|endpoint| &endpoint.addresses) {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    continue;
                };
                endpoints
                    .reports
                    .extend(reports.map(|port| SocketAddr::new(ip, port)));
                endpoints
                    .netconsole
                    .extend(netconsole.map(|port| SocketAddr::new(ip, port)));
            }
        }
        for list in [&mut endpoints.reports, &mut endpoints.netconsole] {
            list.sort();
            list.dedup();
        }
        endpoints
    }
}

const GROUP: &str = "discovery.k8s.io";

/// The versions of discovery.k8s.io's EndpointSlice the agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceVersion {
    V1,
    /// Served from Kubernetes 1.17 to 1.24; the only version up to 1.20.
    V1Beta1,
}

impl SliceVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V1Beta1 => "v1beta1",
        }
    }

    /// The version the server serves, by its API groups (`GET /apis`, which every
    /// authenticated user may read): v1 if it serves it, else v1beta1, else none.
    pub fn served(groups: &APIGroupList) -> Option<Self> {
        let versions: Vec<&str> = groups
            .groups
            .iter()
            .filter(|group| group.name == GROUP)
            .flat_map(|group| &group.versions)
            .map(|version| version.version.as_str())
            .collect();
        [Self::V1, Self::V1Beta1]
            .into_iter()
            .find(|wanted| versions.contains(&wanted.as_str()))
    }
}

/// How often API discovery is tried again after a transient failure.
const DISCOVERY_RETRIES: Backoff = Backoff {
    first: std::time::Duration::from_millis(500),
    max: std::time::Duration::from_secs(30),
};

type SliceEvents = BoxStream<'static, Result<watcher::Event<EndpointSlice>, watcher::Error>>;

/// The watch of `service`'s slices in `version`, as v1 objects.
fn slice_events(client: Client, service: &ServiceRef, version: SliceVersion) -> SliceEvents {
    let config =
        watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={}", service.name));
    match version {
        SliceVersion::V1 => {
            let api = Api::<EndpointSlice>::namespaced(client, &service.namespace);
            watcher(api, config).default_backoff().boxed()
        }
        SliceVersion::V1Beta1 => {
            let gvk = GroupVersionKind::gvk(GROUP, "v1beta1", "EndpointSlice");
            let resource = ApiResource::from_gvk_with_plural(&gvk, "endpointslices");
            let api = Api::<DynamicObject>::namespaced_with(client, &service.namespace, &resource);
            watcher(api, config)
                .default_backoff()
                .filter_map(|event| {
                    std::future::ready(match event {
                        Ok(event) => from_v1beta1(event).map(Ok),
                        Err(error) => Some(Err(error)),
                    })
                })
                .boxed()
        }
    }
}

/// A v1beta1 watch event as v1. What the agent reads of a slice (its labels, `addressType`,
/// `ports`, the endpoints' `addresses` and `conditions.ready`) has the same name and meaning in
/// both versions; the rest (v1beta1's `topology`) is dropped. A slice that does not read as v1
/// is logged and left out.
fn from_v1beta1(event: watcher::Event<DynamicObject>) -> Option<watcher::Event<EndpointSlice>> {
    let convert = |object: DynamicObject| {
        let name = object.name_any();
        let mut value = serde_json::to_value(object).ok()?;
        value["apiVersion"] = format!("{GROUP}/v1").into();
        serde_json::from_value(value)
            .inspect_err(|error| {
                tracing::warn!(%error, slice = %name, "a v1beta1 EndpointSlice that is not a v1 one; ignored");
            })
            .ok()
    };
    Some(match event {
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
        watcher::Event::InitApply(object) => watcher::Event::InitApply(convert(object)?),
        watcher::Event::Apply(object) => watcher::Event::Apply(convert(object)?),
        watcher::Event::Delete(object) => watcher::Event::Delete(convert(object)?),
    })
}

/// Watches `service`'s EndpointSlices in a task of `tasks` and publishes its endpoints whenever
/// they change. The channel starts empty; a relist publishes once, when complete. The task
/// first asks the server which EndpointSlice version it serves (retrying transient failures);
/// it ends, failing the agent, if it serves none.
pub fn watch_endpoints(
    client: Client,
    service: &ServiceRef,
    tasks: &mut Supervisor,
) -> watch::Receiver<ControllerEndpoints> {
    let (sender, receiver) = watch::channel(ControllerEndpoints::default());
    let service = service.clone();
    tasks.spawn("controller-endpoints", Lifetime::Required, async move {
        let groups = kube_retry::call(
            DISCOVERY_RETRIES,
            OnConflict::Reread,
            || client.list_api_groups(),
            |error, delay| tracing::warn!(%error, ?delay, "API discovery failed; retrying"),
        )
        .await;
        let version = match groups.as_ref().map(SliceVersion::served) {
            Ok(Some(version)) => version,
            Ok(None) => {
                tracing::error!(
                    %service,
                    "the API server serves no discovery.k8s.io/v1 or v1beta1 EndpointSlices"
                );
                return;
            }
            Err(error) => {
                tracing::error!(%error, %service, "API discovery failed");
                return;
            }
        };
        tracing::info!(
            %service,
            version = %format!("{GROUP}/{}", version.as_str()),
            "watching the controller's EndpointSlices"
        );
        let mut events = slice_events(client, &service, version);
        let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
        let mut relist = BTreeMap::new();
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => relist.clear(),
                Ok(watcher::Event::InitApply(slice)) => {
                    relist.insert(slice.name_any(), slice);
                }
                Ok(watcher::Event::InitDone) => slices = std::mem::take(&mut relist),
                Ok(watcher::Event::Apply(slice)) => {
                    slices.insert(slice.name_any(), slice);
                }
                Ok(watcher::Event::Delete(slice)) => {
                    slices.remove(&slice.name_any());
                }
                Err(error) => {
                    tracing::warn!(%error, %service, "EndpointSlice watch failed; retrying");
                    continue;
                }
            }
            let current = ControllerEndpoints::from_slices(&service, slices.values());
            sender.send_if_modified(|published| {
                if *published == current {
                    return false;
                }
                tracing::info!(
                    %service,
                    reports = ?current.reports,
                    netconsole = ?current.netconsole,
                    "controller endpoints changed"
                );
                *published = current;
                true
            });
        }
    });
    receiver
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{health::Health, kube_mock};

    /// `GET /apis` of a server whose discovery.k8s.io serves `versions`.
    fn api_groups(versions: &[&str]) -> serde_json::Value {
        let versions: Vec<serde_json::Value> = versions
            .iter()
            .map(|version| {
                serde_json::json!({ "groupVersion": format!("{GROUP}/{version}"), "version": version })
            })
            .collect();
        serde_json::json!({
            "kind": "APIGroupList", "apiVersion": "v1",
            "groups": [
                { "name": "apps", "versions": [{ "groupVersion": "apps/v1", "version": "v1" }] },
                { "name": GROUP, "versions": versions, "preferredVersion": versions[0] },
            ],
        })
    }

    /// The agent's watch of `ingest` against a mocked server, after its `GET /apis`.
    async fn watching(
        versions: &[&str],
    ) -> (
        watch::Receiver<ControllerEndpoints>,
        kube_mock::ApiServer,
        Supervisor,
    ) {
        let (client, mut server) = kube_mock::client();
        let mut tasks = Supervisor::new(Health::default());
        let endpoints = watch_endpoints(client, &ingest(), &mut tasks);
        let discovery = server.next().await;
        assert_eq!(
            (discovery.method.as_str(), discovery.path()),
            ("GET", "/apis")
        );
        discovery.respond(200, api_groups(versions));
        (endpoints, server, tasks)
    }

    #[tokio::test]
    async fn v1_slices_are_listed_and_watched_where_v1_is_served() {
        let (mut endpoints, mut server, _tasks) = watching(&["v1", "v1beta1"]).await;
        let selector = "kubernetes.io%2Fservice-name%3Dingest";
        let list = server.next().await;
        assert_eq!(
            (list.method.as_str(), list.path()),
            (
                "GET",
                "/apis/discovery.k8s.io/v1/namespaces/lastgasp-system/endpointslices"
            )
        );
        assert_eq!(list.query("labelSelector"), Some(selector));
        assert_eq!(list.query("watch"), None);
        let mut first = serde_json::to_value(slice(serde_json::json!({
            "metadata": { "name": "ingest-abcde" },
            "addressType": "IPv4",
            "ports": [{ "name": "reports", "port": 6667, "protocol": "UDP" }],
            "endpoints": [{ "addresses": ["10.0.1.7"], "conditions": { "ready": true } }]
        })))
        .unwrap();
        first["metadata"]["resourceVersion"] = "10".into();
        list.respond(
            200,
            serde_json::json!({
                "kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                "metadata": { "resourceVersion": "10" }, "items": [first],
            }),
        );
        endpoints.changed().await.unwrap();
        assert_eq!(
            endpoints.borrow_and_update().reports,
            ["10.0.1.7:6667".parse::<SocketAddr>().unwrap()]
        );

        // The watch, from the list's resourceVersion: the endpoint stops being ready.
        let watch = server.next().await;
        assert_eq!(
            watch.path(),
            "/apis/discovery.k8s.io/v1/namespaces/lastgasp-system/endpointslices"
        );
        assert_eq!(
            (watch.query("watch"), watch.query("labelSelector")),
            (Some("true"), Some(selector))
        );
        assert_eq!(watch.query("resourceVersion"), Some("10"));
        let mut changed = first.clone();
        changed["metadata"]["resourceVersion"] = "11".into();
        changed["endpoints"][0]["conditions"]["ready"] = false.into();
        watch.respond(
            200,
            serde_json::json!({ "type": "MODIFIED", "object": changed }),
        );
        endpoints.changed().await.unwrap();
        assert_eq!(*endpoints.borrow(), ControllerEndpoints::default());
    }

    #[tokio::test]
    async fn v1beta1_slices_are_watched_where_v1_is_not_served() {
        let (_endpoints, mut server, _tasks) = watching(&["v1beta1"]).await;
        let list = server.next().await;
        assert_eq!(
            list.path(),
            "/apis/discovery.k8s.io/v1beta1/namespaces/lastgasp-system/endpointslices"
        );
        assert_eq!(
            list.query("labelSelector"),
            Some("kubernetes.io%2Fservice-name%3Dingest")
        );
    }

    #[tokio::test]
    async fn no_watch_where_no_endpointslice_version_is_served() {
        let (_endpoints, mut server, mut tasks) = watching(&["v1alpha1"]).await;
        let failure = tokio::time::timeout(Duration::from_secs(5), tasks.failed())
            .await
            .expect("the watch task ends, failing the agent");
        assert_eq!(failure.task, "controller-endpoints");
        assert!(
            server
                .next_within(Duration::from_millis(100))
                .await
                .is_none(),
            "a request after discovery"
        );
    }

    fn ingest() -> ServiceRef {
        "lastgasp-system/ingest".parse().unwrap()
    }

    /// A slice of `ingest` as the EndpointSlice controller writes it, with `value`'s fields.
    fn slice(mut value: serde_json::Value) -> EndpointSlice {
        value["metadata"]["namespace"] = "lastgasp-system".into();
        value["metadata"]["labels"] = serde_json::json!({
            SERVICE_NAME_LABEL: "ingest",
            MANAGED_BY_LABEL: ENDPOINTSLICE_CONTROLLER,
        });
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn service_refs_are_namespace_slash_name() {
        let service: ServiceRef = "lastgasp-system/lastgasp-controller-ingest"
            .parse()
            .unwrap();
        assert_eq!(service.namespace, "lastgasp-system");
        assert_eq!(service.name, "lastgasp-controller-ingest");
        assert_eq!(
            service.to_string(),
            "lastgasp-system/lastgasp-controller-ingest"
        );
        for bad in ["", "name", "/name", "ns/", "a/b/c"] {
            assert!(bad.parse::<ServiceRef>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ready_endpoints_with_their_named_udp_ports() {
        let ipv4 = slice(serde_json::json!({
            "metadata": { "name": "ingest-abcde" },
            "addressType": "IPv4",
            "ports": [
                { "name": "netconsole", "port": 6666, "protocol": "UDP" },
                { "name": "reports", "port": 6667, "protocol": "UDP" },
                { "name": "metrics", "port": 9466, "protocol": "TCP" }
            ],
            "endpoints": [
                { "addresses": ["10.0.1.7"], "conditions": { "ready": true } },
                { "addresses": ["10.0.2.9"], "conditions": { "ready": false, "terminating": true } },
                { "addresses": ["10.0.3.1"] },
                { "addresses": ["not-an-ip"] }
            ]
        }));
        let ipv6 = slice(serde_json::json!({
            "metadata": { "name": "ingest-fghij" },
            "addressType": "IPv6",
            "ports": [{ "name": "reports", "port": 6667, "protocol": "UDP" }],
            "endpoints": [{ "addresses": ["fd00::7"], "conditions": { "ready": true } }]
        }));
        let fqdn = slice(serde_json::json!({
            "metadata": { "name": "ingest-fqdn" },
            "addressType": "FQDN",
            "ports": [{ "name": "reports", "port": 6667, "protocol": "UDP" }],
            "endpoints": [{ "addresses": ["controller.example"] }]
        }));
        let endpoints = ControllerEndpoints::from_slices(&ingest(), [&ipv4, &ipv6, &fqdn, &ipv4]);
        assert_eq!(
            endpoints.reports,
            ["10.0.1.7:6667", "10.0.3.1:6667", "[fd00::7]:6667"]
                .map(|a| a.parse::<SocketAddr>().unwrap())
        );
        assert_eq!(
            endpoints.netconsole,
            ["10.0.1.7:6666", "10.0.3.1:6666"].map(|a| a.parse::<SocketAddr>().unwrap())
        );
    }

    #[test]
    fn a_port_of_the_wrong_protocol_or_name_is_not_used() {
        let tcp = slice(serde_json::json!({
            "metadata": { "name": "s" },
            "addressType": "IPv4",
            "ports": [
                { "name": "reports", "port": 6667 },
                { "port": 6666, "protocol": "UDP" }
            ],
            "endpoints": [{ "addresses": ["10.0.1.7"] }]
        }));
        assert_eq!(
            ControllerEndpoints::from_slices(&ingest(), [&tcp]),
            ControllerEndpoints::default()
        );
    }

    #[test]
    fn only_slices_the_endpointslice_controller_wrote_for_the_service_count() {
        let genuine = slice(serde_json::json!({
            "metadata": { "name": "ingest-abcde" },
            "addressType": "IPv4",
            "ports": [{ "name": "reports", "port": 6667, "protocol": "UDP" }],
            "endpoints": [{ "addresses": ["10.0.1.7"] }]
        }));
        let mut handmade = genuine.clone();
        handmade.metadata.name = Some("ingest-handmade".into());
        handmade
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .remove(MANAGED_BY_LABEL);
        handmade.endpoints[0].addresses = vec!["10.6.6.6".into()];
        let mut mirrored = handmade.clone();
        mirrored.metadata.labels.as_mut().unwrap().insert(
            MANAGED_BY_LABEL.into(),
            "endpointslicemirroring-controller.k8s.io".into(),
        );
        let mut other_service = genuine.clone();
        other_service
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(SERVICE_NAME_LABEL.into(), "other".into());
        other_service.endpoints[0].addresses = vec!["10.6.6.7".into()];
        let mut other_namespace = genuine.clone();
        other_namespace.metadata.namespace = Some("team".into());
        other_namespace.endpoints[0].addresses = vec!["10.6.6.8".into()];
        let endpoints = ControllerEndpoints::from_slices(
            &ingest(),
            [
                &genuine,
                &handmade,
                &mirrored,
                &other_service,
                &other_namespace,
            ],
        );
        assert_eq!(
            endpoints.reports,
            ["10.0.1.7:6667".parse::<SocketAddr>().unwrap()]
        );
    }
}
