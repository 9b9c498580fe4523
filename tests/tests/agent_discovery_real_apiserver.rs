//! The agent's controller discovery against the real kube-apiserver v1.20.2, which serves
//! EndpointSlices as discovery.k8s.io/v1beta1 only: as the agent's ServiceAccount under
//! `deploy/`'s RBAC, through the proxy, the watch finds v1beta1 by API discovery and follows
//! the ingest Service's slices as v1.20's EndpointSlice controller writes them (created here
//! by the admin).
//!
//! Needs the binaries of `cargo xtask kube`.

use std::{net::SocketAddr, time::Duration};

use kube::{
    Api,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use lastgasp::{
    agent::discovery::{
        ControllerEndpoints, ENDPOINTSLICE_CONTROLLER, MANAGED_BY_LABEL, SERVICE_NAME_LABEL,
        ServiceRef, watch_endpoints,
    },
    health::Health,
    supervise::Supervisor,
};
use lastgasp_tests::kube::cluster::Cluster;
use serde_json::{Value, json};
use tokio::sync::watch;

const NAMESPACE: &str = "lastgasp-system";
const SERVICE: &str = "lastgasp-controller-ingest";

fn slices(cluster: &Cluster) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "endpointslices");
    Api::namespaced_with(cluster.admin().clone(), NAMESPACE, &resource)
}

/// A v1beta1 slice of `service` as the EndpointSlice controller writes it, created or
/// replaced by the admin: `endpoints` are (address, ready); v1beta1's `topology` included.
async fn put_slice(cluster: &Cluster, name: &str, service: &str, endpoints: &[(&str, bool)]) {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, ready)| {
            json!({
                "addresses": [ip],
                "conditions": { "ready": ready },
                "topology": { "kubernetes.io/hostname": "node-c" },
            })
        })
        .collect();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": NAMESPACE,
            "labels": { SERVICE_NAME_LABEL: service, MANAGED_BY_LABEL: ENDPOINTSLICE_CONTROLLER },
        },
        "addressType": "IPv4",
        "ports": [
            { "name": "netconsole", "port": 6666, "protocol": "UDP" },
            { "name": "reports", "port": 6667, "protocol": "UDP" },
            { "name": "metrics", "port": 9466, "protocol": "TCP" },
        ],
        "endpoints": endpoints,
    });
    slices(cluster)
        .patch(
            name,
            &PatchParams::apply("test-endpointslice-controller").force(),
            &Patch::Apply(&slice),
        )
        .await
        .unwrap_or_else(|error| panic!("write EndpointSlice {name}: {error}"));
}

fn at(ips: &[&str], port: u16) -> Vec<SocketAddr> {
    ips.iter()
        .map(|ip| SocketAddr::new(ip.parse().unwrap(), port))
        .collect()
}

async fn becomes(endpoints: &mut watch::Receiver<ControllerEndpoints>, ips: &[&str]) {
    let want = ControllerEndpoints {
        reports: at(ips, 6667),
        netconsole: at(ips, 6666),
    };
    let waited = tokio::time::timeout(
        Duration::from_secs(10),
        endpoints.wait_for(|now| *now == want),
    )
    .await
    .map(|changed| changed.map(|_| ()));
    match waited {
        Ok(changed) => changed.expect("the watch task runs"),
        Err(_) => panic!("endpoints are {:?}, not {want:?}", *endpoints.borrow()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_follows_v1beta1_slices_where_v1_is_not_served() {
    let cluster = Cluster::start().await;
    put_slice(
        &cluster,
        "ingest-a",
        SERVICE,
        &[("10.0.1.7", true), ("10.0.1.8", false)],
    )
    .await;
    put_slice(
        &cluster,
        "metrics-x",
        "lastgasp-controller-metrics",
        &[("10.6.6.6", true)],
    )
    .await;

    let service = ServiceRef {
        namespace: NAMESPACE.into(),
        name: SERVICE.into(),
    };
    let mut tasks = Supervisor::new(Health::default());
    let client = cluster.client_as("lastgasp-agent").await;
    let mut endpoints = watch_endpoints(client, &service, &mut tasks);
    becomes(&mut endpoints, &["10.0.1.7"]).await;

    // Readiness moves to the other endpoint; a second slice comes.
    put_slice(
        &cluster,
        "ingest-a",
        SERVICE,
        &[("10.0.1.7", false), ("10.0.1.8", true)],
    )
    .await;
    put_slice(&cluster, "ingest-b", SERVICE, &[("10.0.2.9", true)]).await;
    becomes(&mut endpoints, &["10.0.1.8", "10.0.2.9"]).await;
    slices(&cluster)
        .delete("ingest-a", &DeleteParams::default())
        .await
        .expect("delete ingest-a");
    becomes(&mut endpoints, &["10.0.2.9"]).await;
    tasks.abort_all();

    // One discovery, then v1beta1 only, every call allowed.
    let requests = cluster.proxy().requests();
    assert_eq!(requests[0].uri, "/apis", "{requests:#?}");
    assert!(
        requests[1..].iter().all(|request| {
            request.uri.starts_with(
                "/apis/discovery.k8s.io/v1beta1/namespaces/lastgasp-system/endpointslices?",
            ) && request.status == 200
        }),
        "{requests:#?}"
    );
}
