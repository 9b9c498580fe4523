//! Objects a test puts into the real server through the API, as an admin: what kubelet or an
//! operator would have written, and `deploy/`'s namespace and RBAC.

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

/// Creates a Node whose InternalIP is `ip`, then writes its addresses through the status
/// subresource as kubelet does (v1.20 keeps status sent on create, newer servers drop it).
pub async fn create_node(client: &Client, name: &str, ip: &str) -> anyhow::Result<Node> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": name },
    }))?;
    nodes
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("creating node {name}"))?;
    let status = json!({ "status": { "addresses": [
        { "type": "InternalIP", "address": ip },
        { "type": "Hostname", "address": name },
    ]}});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .with_context(|| format!("writing node {name}'s status"))
}

/// Creates a Pod bound to `node` (nothing schedules or runs it), then sets the status kubelet
/// would have written for a running, ready pod. Pod status sent on create is always reset.
pub async fn create_running_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    node: &str,
) -> anyhow::Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "nodeName": node, "containers": [{ "name": "app", "image": "app" }] },
    }))?;
    pods.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating pod {namespace}/{name}"))?;
    let status = json!({ "status": {
        "phase": "Running",
        "conditions": [{ "type": "Ready", "status": "True" }],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .with_context(|| format!("writing pod {namespace}/{name}'s status"))
}

/// Creates every object of a multi-document YAML manifest (kinds this server serves), in
/// order; returns them as created.
pub async fn create_manifest(client: &Client, yaml: &str) -> anyhow::Result<Vec<DynamicObject>> {
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(yaml).map_err(|error| anyhow::anyhow!("YAML: {error}"))?;
    let mut created = Vec::new();
    for document in documents.into_iter().filter(|document| !document.is_null()) {
        let object: DynamicObject = serde_json::from_value(document)?;
        let types = object
            .types
            .clone()
            .context("an object without apiVersion/kind")?;
        let (group, version) = match types.api_version.split_once('/') {
            Some((group, version)) => (group, version),
            None => ("", types.api_version.as_str()),
        };
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &types.kind));
        let api: Api<DynamicObject> = match object.metadata.namespace.as_deref() {
            Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        let name = object.metadata.name.clone().unwrap_or_default();
        created.push(
            api.create(&PostParams::default(), &object)
                .await
                .with_context(|| format!("creating {} {name}", types.kind))?,
        );
    }
    Ok(created)
}

/// `deploy/base/namespace.yaml` and `deploy/base/rbac.yaml`: the `lastgasp-system`
/// namespace, and the ServiceAccounts, Roles, ClusterRoles and bindings of the agent and the
/// controller.
pub async fn create_deploy_rbac(client: &Client) -> anyhow::Result<Vec<DynamicObject>> {
    let mut created = Vec::new();
    for file in ["namespace.yaml", "rbac.yaml"] {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/").to_owned() + file;
        let yaml = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        created.extend(create_manifest(client, &yaml).await?);
    }
    Ok(created)
}
