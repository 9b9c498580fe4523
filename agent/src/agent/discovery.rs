//! Where the controller is: the ready endpoints of its ingest Service, read from the Service's
//! EndpointSlices (discovery.k8s.io/v1, label `kubernetes.io/service-name`) and kept current
//! by a watch.
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

use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::watch;

use crate::supervise::{Lifetime, Supervisor};

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

/// Watches `service`'s EndpointSlices in a task of `tasks` and publishes its endpoints whenever
/// they change. The channel starts empty; a relist publishes once, when complete.
pub fn watch_endpoints(
    client: Client,
    service: &ServiceRef,
    tasks: &mut Supervisor,
) -> watch::Receiver<ControllerEndpoints> {
    let (sender, receiver) = watch::channel(ControllerEndpoints::default());
    let api = Api::<EndpointSlice>::namespaced(client, &service.namespace);
    let config =
        watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={}", service.name));
    let events = watcher(api, config).default_backoff();
    let service = service.clone();
    tasks.spawn("controller-endpoints", Lifetime::Required, async move {
        let mut events = std::pin::pin!(events);
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
    use super::*;

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
