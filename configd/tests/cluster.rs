//! Config servers in one process, talking HTTPS with mutual TLS on loopback: a leader is elected,
//! a change commits on every server, a server that joins after the log was compacted catches up
//! from a snapshot, and when the leader stops the others elect a new one that takes changes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use drv_config::{Command, Kind, Op};
use drv_configd::server::{ConfigNode, Tuning, node_id};
use drv_configd::{NodeId, PeerNode};
use drv_transport::{Identity, Role, ca};
use openraft::ServerState;

async fn node(certs: &Path, dir: &Path, name: &str) -> (ConfigNode, PeerNode) {
    ca::issue(certs, Role::Config, name).unwrap();
    let id = Identity::load(certs, name).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let n = ConfigNode::start(&id, &dir.join(name), l, Tuning { snapshot_every: 10 }).await.unwrap();
    let peer = PeerNode { name: name.into(), address: n.addr().to_string() };
    (n, peer)
}

fn set_key(i: u64) -> Command {
    let op = Op::Set {
        kind: Kind::Key,
        name: format!("k{}", i % 4),
        assignments: vec![format!("path=/k/{i}")],
        if_version: None,
    };
    Command { request_id: u128::from(i), author: "test".into(), time_unix_ms: i, ops: vec![op], user: None }
}

async fn leader_of(nodes: &[&ConfigNode]) -> NodeId {
    let m = nodes[0]
        .raft
        .wait(Some(Duration::from_secs(20)))
        .metrics(|m| m.current_leader.is_some() && m.state != ServerState::Candidate, "a leader")
        .await
        .unwrap();
    m.current_leader.unwrap()
}

async fn applied_everywhere(nodes: &[&ConfigNode], index: u64) {
    for n in nodes {
        n.raft.wait(Some(Duration::from_secs(20))).applied_index_at_least(Some(index), "caught up").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_replicate_changes_catch_up_and_survive_their_leader() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    ca::init(&certs).unwrap();
    let mut nodes = Vec::new();
    let mut members = BTreeMap::new();
    for name in ["c1", "c2", "c3"] {
        let (n, p) = node(&certs, dir.path(), name).await;
        members.insert(n.id, p);
        nodes.push(n);
    }
    nodes[0].raft.initialize(members.clone()).await.unwrap();
    let all: Vec<&ConfigNode> = nodes.iter().collect();
    let leader = leader_of(&all).await;
    let l = nodes.iter().find(|n| n.id == leader).unwrap();
    // 25 changes, some refused (a conditional one at a wrong version).
    let mut last = 0;
    for i in 1..=25u64 {
        let r = l.raft.client_write(set_key(i)).await.unwrap();
        let w = r.data.outcome.unwrap().unwrap();
        assert_eq!(w.version, r.log_id.index, "a change's version is its log index");
        last = r.log_id.index;
    }
    let stale =
        Op::Set { kind: Kind::Key, name: "k1".into(), assignments: vec!["path=/x".into()], if_version: Some(1) };
    let r = l
        .raft
        .client_write(Command { request_id: 99, author: "t".into(), time_unix_ms: 0, ops: vec![stale], user: None })
        .await
        .unwrap();
    let refused = r.data.outcome.unwrap().unwrap_err();
    assert_eq!(refused.code, "stale", "{refused:?}");
    applied_everywhere(&all, r.log_id.index).await;
    let want = l.state.tables().unwrap();
    assert_eq!(want.counters["config_version"], last);
    for n in &nodes {
        assert_eq!(n.state.tables().unwrap(), want, "server {} holds the same configuration", n.id);
    }

    // A fourth server joins after the log was compacted (snapshots every 10 entries): it catches
    // up from a snapshot, then follows.
    let (n4, p4) = node(&certs, dir.path(), "c4").await;
    l.raft.add_learner(n4.id, p4, true).await.unwrap();
    applied_everywhere(&[&n4], r.log_id.index).await;
    assert_eq!(n4.state.tables().unwrap(), want, "the learner caught up");
    let snap = n4.raft.metrics().borrow().snapshot;
    assert!(snap.is_some(), "it was sent a snapshot");

    // The leader stops: the two others elect a new one, which takes changes.
    let idx = nodes.iter().position(|n| n.id == leader).unwrap();
    let old = nodes.remove(idx);
    old.shutdown().await;
    let rest: Vec<&ConfigNode> = nodes.iter().collect();
    let new_leader = rest[0]
        .raft
        .wait(Some(Duration::from_secs(20)))
        .metrics(|m| m.current_leader.is_some_and(|x| x != leader), "a new leader")
        .await
        .unwrap()
        .current_leader
        .unwrap();
    let nl = nodes.iter().find(|n| n.id == new_leader).unwrap();
    let r = nl.raft.client_write(set_key(100)).await.unwrap();
    assert!(r.data.outcome.unwrap().is_ok());
    let mut rest: Vec<&ConfigNode> = nodes.iter().collect();
    rest.push(&n4);
    applied_everywhere(&rest, r.log_id.index).await;
    let want = nl.state.tables().unwrap();
    for n in &rest {
        assert_eq!(n.state.tables().unwrap(), want);
    }
    let ids: BTreeSet<NodeId> = ["c1", "c2", "c3"].iter().map(|n| node_id(n)).collect();
    assert!(ids.contains(&new_leader));
    for n in nodes {
        n.shutdown().await;
    }
    n4.shutdown().await;
}

/// Only a `config` certificate may send raft messages: an agent's (which may read its volume's
/// configuration over the API on the same listener) is answered 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_a_config_certificate_may_not_send_raft_messages() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    ca::init(&certs).unwrap();
    let (n, _) = node(&certs, dir.path(), "c1").await;
    ca::issue(&certs, Role::Agent, "host1").unwrap();
    ca::issue(&certs, Role::Config, "c2").unwrap();
    // The same request with a config certificate gets an HTTP answer; with an agent's, none.
    let answer = |who: &str| {
        let id = Identity::load(&certs, who).unwrap();
        let addr = n.addr();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let tls = drv_transport::tls::https_client_config(&id, Role::Config).unwrap();
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("c1.config.drv").unwrap();
            let mut s = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
            // TLS 1.3: a refusal of the client's certificate arrives with the first read.
            s.write_all(b"POST /raft/vote HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}").await?;
            let mut buf = vec![0u8; 256];
            let n = s.read(&mut buf).await?;
            buf.truncate(n);
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
        }
    };
    let ok = answer("c2").await.unwrap();
    assert!(ok.starts_with("HTTP/1.1 "), "a config peer gets an HTTP answer: {ok:?}");
    assert!(!ok.starts_with("HTTP/1.1 403"), "{ok:?}");
    let refused = answer("host1").await.unwrap();
    assert!(refused.starts_with("HTTP/1.1 403"), "an agent got {refused:?}");
    assert!(refused.contains("only config servers"), "{refused:?}");
    n.shutdown().await;
}
