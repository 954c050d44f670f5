//! The JSON API of three config servers in one process, through the client the command line
//! uses: writes and reads sent to a follower reach the leader, every read says its version, bad
//! requests get a clear 4xx and change nothing, only admins may change things, and servers are
//! added to and removed from the group by API calls.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use drv_config::{Kind, Op};
use drv_configd::client::{ApiClient, ClientError};
use drv_configd::server::{ConfigNode, Tuning};
use drv_configd::{NodeId, PeerNode};
use drv_transport::{Identity, Role, ca};
use openraft::ServerState;

async fn node(certs: &Path, dir: &Path, name: &str) -> ConfigNode {
    ca::issue(certs, Role::Config, name).unwrap();
    let id = Identity::load(certs, name).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    ConfigNode::start(&id, &dir.join(name), l, Tuning { snapshot_every: 10 }).await.unwrap()
}

fn client(certs: &Path, who: &str, servers: &[&ConfigNode]) -> ApiClient {
    let list: Vec<String> = servers.iter().map(|n| n.addr().to_string()).collect();
    ApiClient::new(&list.join(","), &Identity::load(certs, who).unwrap())
        .unwrap()
        .with_patience(Duration::from_secs(10))
}

fn set(kind: Kind, name: &str, a: &[&str]) -> Op {
    Op::Set { kind, name: name.into(), assignments: a.iter().map(|s| s.to_string()).collect(), if_version: None }
}

async fn leader(n: &ConfigNode) -> NodeId {
    let m = n
        .raft
        .wait(Some(Duration::from_secs(20)))
        .metrics(|m| m.current_leader.is_some() && m.state != ServerState::Candidate, "a leader")
        .await
        .unwrap();
    m.current_leader.unwrap()
}

fn refusal(e: ClientError) -> (u16, String, String) {
    match e {
        ClientError::Refused { status, code, message, .. } => (status, code, message),
        other => panic!("not a refusal: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_finds_the_leader_refuses_bad_requests_and_changes_membership() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    ca::init(&certs).unwrap();
    ca::issue(&certs, Role::Admin, "admin").unwrap();
    ca::issue(&certs, Role::Agent, "host1").unwrap();
    let mut nodes = Vec::new();
    for name in ["c1", "c2", "c3"] {
        nodes.push(node(&certs, dir.path(), name).await);
    }
    let members: BTreeMap<NodeId, PeerNode> = ["c1", "c2", "c3"]
        .iter()
        .zip(&nodes)
        .map(|(n, c)| (c.id, PeerNode { name: n.to_string(), address: c.addr().to_string() }))
        .collect();
    nodes[0].raft.initialize(members).await.unwrap();
    let lead = leader(&nodes[0]).await;
    let follower = nodes.iter().find(|n| n.id != lead).unwrap();

    // Through a follower alone: the write and the linearizable read are redirected.
    let admin = client(&certs, "admin", &[follower]);
    let w = admin.commit(vec![set(Kind::Key, "k1", &["path=/keys/k1"])]).await.unwrap();
    assert!(w.version > 0);
    let r = admin.entries(Some(Kind::Key), Some("k1"), false).await.unwrap();
    assert_eq!(r.version, w.version, "the read shows the committed version");
    assert_eq!(r.entries[0].value["path"], "/keys/k1");
    assert_eq!(r.entries[0].version, w.version);
    let log = admin.log(0, 100, false).await.unwrap();
    assert_eq!(log.records.last().unwrap().author, "admin:admin");

    // Refusals: each a clear 4xx, nothing changed.
    let stale =
        Op::Set { kind: Kind::Key, name: "k1".into(), assignments: vec!["path=/x".into()], if_version: Some(999) };
    let (s, code, m) = refusal(admin.commit(vec![stale]).await.unwrap_err());
    assert_eq!((s, code.as_str()), (412, "stale"), "{m}");
    let gone = Op::Delete { kind: Kind::Key, name: "nope".into(), if_version: None };
    let (s, code, m) = refusal(admin.commit(vec![gone]).await.unwrap_err());
    assert_eq!((s, code.as_str()), (404, "not_found"), "{m}");
    assert!(m.contains("nope"), "{m}");
    let dangling = set(Kind::Volume, "v1", &["size_bytes=1G", "wrl=w9", "key=k1", "replicas=[\"r1\"]"]);
    let (s, code, m) = refusal(admin.commit(vec![dangling]).await.unwrap_err());
    assert!((400..500).contains(&s) && ["reference", "invalid"].contains(&code.as_str()), "{s} {code} {m}");
    let (s, code, m) = refusal(admin.request(hyper::Method::GET, "/v1/entries?kind=gizmo", None).await.unwrap_err());
    assert_eq!((s, code.as_str()), (422, "unknown_kind"), "{m}");
    assert!(m.contains("gizmo"), "{m}");
    let junk = admin.request(hyper::Method::POST, "/v1/commands", Some(b"{\"ops\": [{\"op\": \"explode\"}]}".to_vec()));
    let (s, code, m) = refusal(junk.await.unwrap_err());
    assert_eq!((s, code.as_str()), (400, "bad_request"), "{m}");
    let big = admin.request(hyper::Method::POST, "/v1/commands", Some(vec![b' '; 2 << 20]));
    let (s, _, m) = refusal(big.await.unwrap_err());
    assert_eq!(s, 413, "{m}");
    let peer = client(&certs, "c3", &[follower]);
    let (s, code, m) = refusal(peer.commit(vec![set(Kind::Key, "k2", &["path=/k2"])]).await.unwrap_err());
    assert_eq!((s, code.as_str()), (403, "forbidden"), "{m}");
    let agent = client(&certs, "host1", &[follower]);
    let (s, code, m) = refusal(agent.commit(vec![set(Kind::Key, "k3", &["path=/k3"])]).await.unwrap_err());
    assert_eq!((s, code.as_str()), (403, "forbidden"), "{m}");
    // A component's report carries its figures, within limits.
    let mut figures = drv_configd::api::Figures::new();
    figures.entry("v1".into()).or_default().insert("lag_seconds".into(), 1.5);
    let report = drv_configd::api::Report {
        version: 1,
        volume: Some("v1".into()),
        pending: vec![],
        figures,
        details: Default::default(),
    };
    agent.report(&report).await.unwrap();
    let seen = admin.components_everywhere().await;
    assert_eq!(seen.iter().find(|c| c.component == "host1/v1").unwrap().figures["v1"]["lag_seconds"], 1.5);
    let mut huge = report.clone();
    let many = (0..=drv_configd::api::REPORT_FIGURES_LIMIT).map(|i| (format!("f{i}"), 0.0)).collect();
    huge.figures.insert("v1".into(), many);
    let (s, code, m) = refusal(agent.report(&huge).await.unwrap_err());
    assert_eq!((s, code.as_str()), (422, "invalid"), "{m}");
    assert!(m.contains("at most 65536 figures"), "{m}");
    // A certificate of another CA is refused in the handshake, at once.
    let other = dir.path().join("other");
    ca::init(&other).unwrap();
    ca::issue(&other, Role::Admin, "admin").unwrap();
    let stranger = client(&other, "admin", &[follower]);
    match stranger.commit(vec![set(Kind::Key, "k3", &["path=/k3"])]).await {
        Err(ClientError::Handshake { message, .. }) => assert!(message.contains("TLS"), "{message}"),
        other => panic!("a certificate of another CA was not refused in the handshake: {other:?}"),
    }
    let after = admin.entries(None, None, false).await.unwrap();
    assert_eq!(after.version, w.version, "nothing changed");
    assert_eq!(after.entries.len(), 1);

    // A user's password is hashed by the server that took the request: neither the entry nor
    // the history holds it.
    admin.commit(vec![set(Kind::User, "alice", &["password=correct horse", "admin=true"])]).await.unwrap();
    let r = admin.entries(Some(Kind::User), Some("alice"), false).await.unwrap();
    let stored = r.entries[0].value.to_string();
    assert!(stored.contains("$argon2id$") && !stored.contains("correct horse"), "{stored}");
    let log = admin.log(0, 100, false).await.unwrap();
    assert!(!serde_json::to_string(&log).unwrap().contains("correct horse"), "the history holds no password");
    let (s, code, m) = refusal(admin.commit(vec![set(Kind::User, "bob", &["password=short"])]).await.unwrap_err());
    assert_eq!((s, code.as_str()), (422, "invalid"), "{m}");
    assert!(m.contains("at least 8 characters"), "{m}");

    // A fourth server joins by an API call, catches up, votes; then it is removed again.
    let n4 = node(&certs, dir.path(), "c4").await;
    let s = admin.add_member("c4", &n4.addr().to_string()).await.unwrap();
    assert_eq!(s.members.iter().filter(|m| m.voter).count(), 4, "{s:?}");
    n4.raft.wait(Some(Duration::from_secs(20))).applied_index_at_least(Some(w.version), "caught up").await.unwrap();
    let here = client(&certs, "admin", &[&n4]).entries(Some(Kind::Key), None, true).await.unwrap();
    assert_eq!(here.entries.len(), 1, "the new server holds the configuration");
    let s = admin.remove_member("c4").await.unwrap();
    assert_eq!(s.members.len(), 3, "{s:?}");
    let (s, code, _) = refusal(admin.remove_member("c9").await.unwrap_err());
    assert_eq!((s, code.as_str()), (404, "not_found"));

    // The watch answers at once for an old version and waits for a new one.
    let v = admin.status().await.unwrap().version;
    assert!(admin.watch(0, Duration::from_secs(5)).await.unwrap().version >= v);
    let waiting = tokio::spawn({
        let admin = admin.clone();
        async move { admin.watch(v, Duration::from_secs(20)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let w2 = admin.commit(vec![set(Kind::Key, "k2", &["path=/k2"])]).await.unwrap();
    let seen = waiting.await.unwrap().unwrap();
    assert!(seen.version > v && seen.version <= w2.version, "{seen:?} {w2:?}");

    n4.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
}
