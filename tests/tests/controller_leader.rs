//! Leader election against the real kube-apiserver (`lastgasp_tests::kube`), as the
//! controller's ServiceAccount under `deploy/`'s RBAC, with short durations (lease 1 s, renew
//! 200 ms, retry 100 ms): one leader at a time, handover on stop, takeover of an abandoned
//! lease, step-down when renewals fail (the leader-election RoleBinding revoked).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::{coordination::v1::Lease, rbac::v1::RoleBinding};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use lastgasp::controller::leader::{LeaderConfig, LeaderElection};
use lastgasp_tests::kube::{RealApiServer, seed::create_deploy_rbac};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const NAMESPACE: &str = "lastgasp-system";
/// The controller's ServiceAccount, which the electors run as; deploy/'s Role lets it create
/// Leases and get and update this one.
const SERVICE_ACCOUNT: &str = "lastgasp-controller";
const LEASE: &str = "lastgasp-controller";
/// deploy/'s RoleBinding that grants the Lease.
const LEADER_BINDING: &str = "lastgasp-controller-leader-election";
const LEASE_DURATION: Duration = Duration::from_secs(1);
const SAMPLE: Duration = Duration::from_millis(20);

fn config(identity: &str) -> LeaderConfig {
    LeaderConfig {
        namespace: NAMESPACE.to_string(),
        lease_name: LEASE.to_string(),
        identity: identity.to_string(),
        lease_duration: LEASE_DURATION,
        renew_interval: Duration::from_millis(200),
        retry_interval: Duration::from_millis(100),
    }
}

/// The real server with deploy/'s namespace and RBAC, and an admin client.
struct Cluster {
    server: RealApiServer,
    admin: Client,
}

async fn cluster() -> Cluster {
    let server = RealApiServer::start().await.expect("server");
    let admin = server.admin_client().await.expect("admin client");
    create_deploy_rbac(&admin).await.expect("deploy/'s RBAC");
    Cluster { server, admin }
}

async fn elector(cluster: &Cluster, identity: &str) -> LeaderElection {
    // `RUST_LOG=lastgasp=debug` shows the election in the test output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let client = cluster
        .server
        .client_as(NAMESPACE, SERVICE_ACCOUNT)
        .await
        .expect("client");
    LeaderElection::start(client, config(identity))
}

fn leases(cluster: &Cluster) -> Api<Lease> {
    Api::namespaced(cluster.admin.clone(), NAMESPACE)
}

async fn lease(cluster: &Cluster) -> Value {
    let lease = leases(cluster).get(LEASE).await.expect("read lease");
    serde_json::to_value(lease).expect("lease as JSON")
}

async fn holder(cluster: &Cluster) -> Option<String> {
    lease(cluster).await["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
}

/// Samples both electors every 20 ms until stopped and tells whether they ever led together.
struct OverlapWatch {
    done: Arc<AtomicBool>,
    task: JoinHandle<bool>,
}

impl OverlapWatch {
    fn start(a: watch::Receiver<bool>, b: watch::Receiver<bool>) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let task = tokio::spawn(async move {
            let mut overlapped = false;
            while !stop.load(Ordering::Relaxed) {
                overlapped |= *a.borrow() && *b.borrow();
                tokio::time::sleep(SAMPLE).await;
            }
            overlapped
        });
        Self { done, task }
    }

    async fn assert_never_overlapped(self) {
        self.done.store(true, Ordering::Relaxed);
        assert!(
            !self.task.await.expect("sampler"),
            "both electors reported leading at the same instant"
        );
    }
}

/// Polls every 20 ms until `condition` holds; panics with `what` after `limit`.
async fn wait_for(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(SAMPLE).await;
    }
    start.elapsed()
}

/// Starts electors "a" and "b" and waits until one leads; returns (leader, follower) with their ids.
async fn leader_and_follower(
    cluster: &Cluster,
) -> (
    (LeaderElection, &'static str),
    (LeaderElection, &'static str),
) {
    let a = elector(cluster, "a").await;
    let b = elector(cluster, "b").await;
    let (a_rx, b_rx) = (a.is_leader(), b.is_leader());
    wait_for("a leader", Duration::from_secs(3), || {
        *a_rx.borrow() || *b_rx.borrow()
    })
    .await;
    if *a_rx.borrow() {
        ((a, "a"), (b, "b"))
    } else {
        ((b, "b"), (a, "a"))
    }
}

#[tokio::test]
async fn exactly_one_leads_and_the_lease_names_it() {
    let cluster = cluster().await;
    let ((leader, leader_id), (follower, _)) = leader_and_follower(&cluster).await;
    let (leader_rx, follower_rx) = (leader.is_leader(), follower.is_leader());
    let overlap = OverlapWatch::start(leader_rx.clone(), follower_rx.clone());

    let first = lease(&cluster).await;
    assert_eq!(first["spec"]["holderIdentity"], json!(leader_id));
    assert_eq!(first["spec"]["leaseDurationSeconds"], json!(1));
    assert_eq!(first["spec"]["leaseTransitions"], json!(0));

    // Several lease durations: the leader keeps renewing, the follower never takes over.
    let start = Instant::now();
    while start.elapsed() < 3 * LEASE_DURATION {
        assert!(*leader_rx.borrow(), "the leader lost the lease");
        assert!(
            !*follower_rx.borrow(),
            "the follower took over a renewed lease"
        );
        tokio::time::sleep(SAMPLE).await;
    }
    let later = lease(&cluster).await;
    assert_eq!(later["spec"]["holderIdentity"], json!(leader_id));
    assert_eq!(later["spec"]["leaseTransitions"], json!(0));
    assert_eq!(later["spec"]["acquireTime"], first["spec"]["acquireTime"]);
    assert_ne!(later["spec"]["renewTime"], first["spec"]["renewTime"]);

    overlap.assert_never_overlapped().await;
    leader.stop().await;
    follower.stop().await;
}

#[tokio::test]
async fn stopping_the_leader_hands_over_within_a_second() {
    let cluster = cluster().await;
    let ((leader, leader_id), (follower, follower_id)) = leader_and_follower(&cluster).await;
    let (leader_rx, follower_rx) = (leader.is_leader(), follower.is_leader());
    let overlap = OverlapWatch::start(leader_rx.clone(), follower_rx.clone());
    assert_eq!(holder(&cluster).await.as_deref(), Some(leader_id));

    let stopping = Instant::now();
    leader.stop().await;
    assert!(
        !*leader_rx.borrow(),
        "a stopped elector still reports leading"
    );
    wait_for("handover", Duration::from_secs(1), || *follower_rx.borrow()).await;
    let handover = stopping.elapsed();
    assert!(
        handover < Duration::from_secs(1),
        "handover took {handover:?}"
    );

    let spec = &lease(&cluster).await["spec"];
    assert_eq!(spec["holderIdentity"], json!(follower_id));
    assert_eq!(spec["leaseTransitions"], json!(1));

    overlap.assert_never_overlapped().await;
    follower.stop().await;
    assert_eq!(holder(&cluster).await, None, "stop released the lease");
}

#[tokio::test]
async fn takes_over_an_abandoned_lease_after_its_duration() {
    let cluster = cluster().await;
    // Held by a replica that died without releasing it.
    let abandoned = serde_json::from_value(json!({
        "metadata": {"name": LEASE, "namespace": NAMESPACE},
        "spec": {
            "holderIdentity": "gone",
            "leaseDurationSeconds": 1,
            "renewTime": Timestamp::now().to_string(),
            "acquireTime": Timestamp::now().to_string(),
            "leaseTransitions": 4,
        },
    }))
    .expect("a lease");
    leases(&cluster)
        .create(&PostParams::default(), &abandoned)
        .await
        .expect("create lease");

    let started = Instant::now();
    let elector = elector(&cluster, "a").await;
    let leading = elector.is_leader();
    wait_for("takeover", Duration::from_secs(3), || *leading.borrow()).await;
    let took = started.elapsed();
    assert!(
        took >= LEASE_DURATION,
        "took over after {took:?}, before the lease expired"
    );

    let spec = &lease(&cluster).await["spec"];
    assert_eq!(spec["holderIdentity"], json!("a"));
    assert_eq!(spec["leaseTransitions"], json!(5));
    elector.stop().await;
}

#[tokio::test]
async fn a_leader_that_cannot_renew_steps_down_before_its_lease_expires() {
    let cluster = cluster().await;
    let ((leader, leader_id), (follower, _)) = leader_and_follower(&cluster).await;
    let (leader_rx, follower_rx) = (leader.is_leader(), follower.is_leader());
    let overlap = OverlapWatch::start(leader_rx.clone(), follower_rx.clone());

    // The server refuses every lease request (gets and updates: 403) for longer than the
    // lease lasts: the leader-election RoleBinding is gone.
    let bindings = Api::<RoleBinding>::namespaced(cluster.admin.clone(), NAMESPACE);
    let binding = bindings.get(LEADER_BINDING).await.expect("the binding");
    let outage = Instant::now();
    bindings
        .delete(LEADER_BINDING, &DeleteParams::default())
        .await
        .expect("revoke the binding");

    wait_for("step-down", LEASE_DURATION, || !*leader_rx.borrow()).await;
    let stepped_down = Timestamp::now();
    let stale = lease(&cluster).await;
    assert_eq!(stale["spec"]["holderIdentity"], json!(leader_id));
    let renewed: Timestamp = stale["spec"]["renewTime"]
        .as_str()
        .expect("renewTime")
        .parse()
        .expect("renewTime is a timestamp");
    let expires = renewed + jiff::SignedDuration::from_secs(1);
    assert!(
        stepped_down < expires,
        "stepped down at {stepped_down}, after the lease expired at {expires}"
    );

    tokio::time::sleep((LEASE_DURATION + LEASE_DURATION / 2).saturating_sub(outage.elapsed()))
        .await;
    assert!(!*leader_rx.borrow() && !*follower_rx.borrow());
    let mut restored = binding;
    restored.metadata.resource_version = None;
    restored.metadata.uid = None;
    bindings
        .create(&PostParams::default(), &restored)
        .await
        .expect("grant the lease again");

    // Once the API is back, exactly one of them leads again.
    wait_for("a new leader", Duration::from_secs(2), || {
        *leader_rx.borrow() || *follower_rx.borrow()
    })
    .await;

    overlap.assert_never_overlapped().await;
    leader.stop().await;
    follower.stop().await;
}
