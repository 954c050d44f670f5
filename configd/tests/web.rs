//! Users on the config servers' web listener (no client certificates): logins, sessions, CSRF,
//! the login rate limit, and every role x operation x own/other replication set over the JSON
//! API, against three real servers (a follower's users' changes go on to the leader).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use drv_config::{Kind, Op};
use drv_configd::client::ApiClient;
use drv_configd::server::{ConfigNode, Tuning};
use drv_transport::{Identity, Role, ca};
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use openraft::ServerState;
use serde_json::{Value, json};

async fn node(certs: &Path, dir: &Path, name: &str) -> (ConfigNode, SocketAddr) {
    ca::issue(certs, Role::Config, name).unwrap();
    let id = Identity::load(certs, name).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut n = ConfigNode::start(&id, &dir.join(name), l, Tuning::default()).await.unwrap();
    let w = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web = n.serve_web(&id, w).unwrap();
    (n, web)
}

fn set(kind: Kind, name: &str, a: &[&str]) -> Op {
    Op::Set { kind, name: name.into(), assignments: a.iter().map(|s| s.to_string()).collect(), if_version: None }
}

/// A browser's view of one server: no client certificate, the installation CA trusted, the
/// session cookie and CSRF token kept.
#[derive(Clone)]
struct Web {
    addr: SocketAddr,
    server: String,
    tls: Arc<rustls::ClientConfig>,
    cookie: Option<String>,
    csrf: Option<String>,
}

struct Answer {
    status: StatusCode,
    headers: hyper::HeaderMap,
    body: Value,
    text: String,
}

impl Web {
    fn new(certs: &Path, server: &str, addr: SocketAddr) -> Web {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(certs.join("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Web { addr, server: format!("{server}.config.drv"), tls: Arc::new(cfg), cookie: None, csrf: None }
    }

    async fn send(&self, method: Method, path: &str, body: Vec<u8>, csrf: Option<&str>) -> Answer {
        self.send_as(method, path, body, csrf, "application/json").await
    }

    async fn send_as(&self, method: Method, path: &str, body: Vec<u8>, csrf: Option<&str>, ctype: &str) -> Answer {
        self.try_send_as(method, path, body, csrf, ctype).await.unwrap()
    }

    /// A body larger than the server takes: answered 413, or (the server may answer before the
    /// body is sent, and close) the connection ends while the body is written.
    async fn too_large(&self, path: &str, body: Vec<u8>, csrf: Option<&str>, ctype: &str) {
        match self.try_send_as(Method::POST, path, body, csrf, ctype).await {
            Ok(a) => assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.text),
            Err(e) => {
                let d = format!("{e:?}");
                let closed = ["BodyWrite", "IncompleteMessage", "BrokenPipe", "ConnectionReset", "ChannelClosed"];
                assert!(closed.iter().any(|c| d.contains(c)), "{d}");
            }
        }
    }

    async fn try_send_as(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        csrf: Option<&str>,
        ctype: &str,
    ) -> Result<Answer, hyper::Error> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(self.server.clone()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        let mut req = hyper::Request::builder().method(method).uri(path).header("host", "config.drv");
        if let Some(c) = &self.cookie {
            req = req.header("cookie", c);
        }
        if let Some(t) = csrf {
            req = req.header("x-csrf-token", t);
        }
        let req = req.header("content-type", ctype).body(Full::new(Bytes::from(body))).unwrap();
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(Answer { status, headers, body, text })
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, Vec::new(), None).await
    }

    /// A change, with the session's CSRF token.
    async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(Method::POST, path, serde_json::to_vec(&body).unwrap(), self.csrf.as_deref()).await
    }

    async fn login(&self, user: &str, password: &str) -> (Answer, Web) {
        let body = serde_json::to_vec(&json!({"user": user, "password": password})).unwrap();
        let a = self.send(Method::POST, "/v1/login", body, None).await;
        let mut me = self.clone();
        if a.status == StatusCode::OK {
            let c = a.headers.get("set-cookie").unwrap().to_str().unwrap().to_owned();
            assert!(c.contains("HttpOnly") && c.contains("Secure") && c.contains("SameSite=Strict"), "{c}");
            me.cookie = Some(c.split(';').next().unwrap().to_owned());
            me.csrf = Some(a.body["csrf"].as_str().unwrap().to_owned());
        }
        (a, me)
    }

    /// The first `n` events of a stream of server-sent events.
    async fn events(&self, path: &str, n: usize) -> Vec<String> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(self.server.clone()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header("host", "config.drv")
            .header("cookie", self.cookie.clone().unwrap_or_default())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let mut body = resp.into_body();
        let mut text = String::new();
        while text.matches("\n\n").count() < n {
            let frame = tokio::time::timeout(Duration::from_secs(30), body.frame()).await.unwrap().unwrap().unwrap();
            if let Some(d) = frame.data_ref() {
                text.push_str(&String::from_utf8_lossy(d));
            }
        }
        text.split("\n\n").filter(|e| !e.is_empty()).map(String::from).collect()
    }

    /// A form, as a browser posts it.
    async fn form(&self, path: &str, fields: &[(&str, &str)]) -> Answer {
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect();
        let ctype = "application/x-www-form-urlencoded";
        self.send_as(Method::POST, path, body.join("&").into_bytes(), None, ctype).await
    }

    async fn change(&self, ops: Vec<Op>) -> Answer {
        self.post("/v1/commands", json!({ "ops": ops })).await
    }
}

fn enc(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

/// One config server with its web listener, formed alone, with [`installation`] in it: the
/// server (kept alive by the caller), an admin's API client, and a browser's view of it.
async fn one_server(dir: &Path) -> (ConfigNode, ApiClient, Web) {
    let certs = dir.join("certs");
    ca::init(&certs).unwrap();
    ca::issue(&certs, Role::Admin, "admin").unwrap();
    let (c1, web1) = node(&certs, dir, "c1").await;
    let me = drv_configd::PeerNode { name: "c1".into(), address: c1.addr().to_string() };
    c1.raft
        .initialize([(drv_configd::server::node_id("c1"), me)].into_iter().collect::<BTreeMap<_, _>>())
        .await
        .unwrap();
    wait_leader(&c1).await;
    let admin = ApiClient::new(&c1.addr().to_string(), &Identity::load(&certs, "admin").unwrap())
        .unwrap()
        .with_patience(Duration::from_secs(10));
    installation(&admin).await;
    (c1, admin, Web::new(&certs, "c1", web1))
}

async fn wait_leader(n: &ConfigNode) -> u64 {
    let m = n
        .raft
        .wait(Some(Duration::from_secs(20)))
        .metrics(|m| m.current_leader.is_some() && m.state != ServerState::Candidate, "a leader")
        .await
        .unwrap();
    m.current_leader.unwrap()
}

/// The installation: volumes v1 (set a), v2 (set b), v3 (no set); users of each role.
async fn installation(admin: &ApiClient) {
    let mut ops = vec![
        set(Kind::Endpoint, "stg1", &["role=staging", "address=127.0.0.1:7001"]),
        set(Kind::Endpoint, "rep1", &["role=replica", "address=127.0.0.1:7002"]),
        set(Kind::Key, "k1", &["path=/etc/drv/k1.key"]),
        set(Kind::Wrl, "w0", &["staging=stg1", "devices=[\"/dev/sdb\"]"]),
    ];
    for v in ["v1", "v2", "v3"] {
        ops.push(set(Kind::Volume, v, &["size_bytes=1G", "wrl=w0", "replicas=[\"rep1\"]", "key=k1"]));
    }
    ops.push(set(Kind::Set, "a", &["volumes=[\"v1\"]"]));
    ops.push(set(Kind::Set, "b", &["volumes=[\"v2\"]"]));
    let pw = "password=correct horse";
    ops.push(set(Kind::User, "root", &[pw, "admin=true"]));
    ops.push(set(Kind::User, "opa", &[pw, "grants={\"a\":\"operator\",\"b\":\"viewer\"}"]));
    ops.push(set(Kind::User, "viewa", &[pw, "grants={\"a\":\"viewer\"}"]));
    ops.push(set(Kind::User, "nobody", &[pw]));
    ops.push(set(Kind::User, "gone", &[pw, "admin=true", "disabled=true"]));
    admin.commit(ops).await.unwrap();
}

/// One operation over the JSON API, and whether it was allowed (2xx or, for a read, a reply
/// that shows what was asked).
async fn try_op(w: &Web, me: &str, op: &str) -> bool {
    let ok = |a: &Answer| a.status.is_success();
    let names = |a: &Answer| -> Vec<String> {
        a.body["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_owned()).collect()
    };
    match op {
        "see v1" => names(&w.get("/v1/entries?kind=volume").await).contains(&"v1".to_owned()),
        "see v2" => names(&w.get("/v1/entries?kind=volume").await).contains(&"v2".to_owned()),
        "see v3" => names(&w.get("/v1/entries?kind=volume").await).contains(&"v3".to_owned()),
        "see endpoints" => !names(&w.get("/v1/entries?kind=endpoint").await).is_empty(),
        "bwlimit v1" => ok(&w.change(vec![set(Kind::Volume, "v1", &["bwlimit=10M"])]).await),
        "bwlimit v2" => ok(&w.change(vec![set(Kind::Volume, "v2", &["bwlimit=10M"])]).await),
        "bwlimit v3" => ok(&w.change(vec![set(Kind::Volume, "v3", &["bwlimit=10M"])]).await),
        "pause v1" => ok(&w.change(vec![set(Kind::Volume, "v1", &["paused=true"])]).await),
        "pause v2" => ok(&w.change(vec![set(Kind::Volume, "v2", &["paused=true"])]).await),
        "resync v1" => ok(&w.change(vec![set(Kind::Volume, "v1", &["resync=7"])]).await),
        "retarget v1" => ok(&w.change(vec![set(Kind::Volume, "v1", &["targets={\"rep1\":\"/srv/v1.img\"}"])]).await),
        "new volume" => {
            let a =
                w.change(vec![set(Kind::Volume, "v9", &["size_bytes=1G", "wrl=w0", "replicas=[\"rep1\"]", "key=k1"])]);
            let a = a.await;
            if ok(&a) {
                let del = Op::Delete { kind: Kind::Volume, name: "v9".into(), if_version: None };
                assert!(ok(&w.change(vec![del]).await));
            }
            ok(&a)
        }
        "grant self" => ok(&w.change(vec![set(Kind::User, me, &["grants={\"b\":\"operator\"}"])]).await),
        "history v1" => {
            let a = w.get("/v1/log?newest=100").await;
            a.body["records"].as_array().unwrap().iter().any(|r| r["ops"][0]["name"] == "v1")
        }
        "components" => ok(&w.get("/v1/components").await),
        "remove member" => {
            // Nobody named so: an admin is told it does not exist (404), anyone else 403.
            w.send(Method::DELETE, "/v1/members/c9", Vec::new(), w.csrf.as_deref()).await.status
                == StatusCode::NOT_FOUND
        }
        "report figures" => ok(&w.post("/v1/applied", json!({"version": 1})).await),
        "node slice" => ok(&w.get("/v1/node/stg1").await),
        other => panic!("no operation {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_log_in_and_may_do_what_their_roles_allow() {
    let dir = tempfile::tempdir().unwrap();
    let (_c1, admin, web) = one_server(dir.path()).await;

    // Every role x operation x own/other set.
    let ops = [
        "see v1",
        "see v2",
        "see v3",
        "see endpoints",
        "bwlimit v1",
        "bwlimit v2",
        "bwlimit v3",
        "pause v1",
        "pause v2",
        "resync v1",
        "retarget v1",
        "new volume",
        "grant self",
        "history v1",
        "components",
        "remove member",
        "report figures",
        "node slice",
    ];
    let allowed: [(&str, &[&str]); 4] = [
        (
            "root",
            &[
                "see v1",
                "see v2",
                "see v3",
                "see endpoints",
                "bwlimit v1",
                "bwlimit v2",
                "bwlimit v3",
                "pause v1",
                "pause v2",
                "resync v1",
                "retarget v1",
                "new volume",
                "grant self",
                "history v1",
                "components",
                "remove member",
            ],
        ),
        ("opa", &["see v1", "see v2", "bwlimit v1", "pause v1", "resync v1", "history v1", "components"]),
        ("viewa", &["see v1", "history v1", "components"]),
        ("nobody", &["components"]),
    ];
    let mut table = String::new();
    for (user, yes) in allowed {
        let (a, w) = web.login(user, "correct horse").await;
        assert_eq!(a.status, StatusCode::OK, "{user}: {}", a.body);
        for op in ops {
            let got = try_op(&w, user, op).await;
            table.push_str(&format!("{user:7} {op:15} {}\n", if got { "allow" } else { "deny" }));
            assert_eq!(got, yes.contains(&op), "{user} {op}:\n{table}");
        }
    }
    eprintln!("{table}");

    // A refused change says why, is a 403, and changes nothing.
    let (_, opa) = web.login("opa", "correct horse").await;
    let before = admin.entries(None, None, false).await.unwrap().version;
    let a = opa.change(vec![set(Kind::Volume, "v2", &["bwlimit=1M"])]).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.body["message"].as_str().unwrap().contains("v2"), "{}", a.body);
    assert_eq!(admin.entries(None, None, false).await.unwrap().version, before, "nothing changed");
    // Password hashes never reach a user, not even an admin.
    let (_, root) = web.login("root", "correct horse").await;
    let users = root.get("/v1/entries?kind=user").await;
    assert!(!users.body.to_string().contains("argon2"), "{}", users.body);
    let history = root.get("/v1/log?newest=100").await;
    assert!(history.body["records"].as_array().unwrap().len() > 1);
    assert!(!history.body.to_string().contains("argon2"), "{}", history.body);
    assert_eq!(users.body["entries"].as_array().unwrap().len(), 5);
    let me = opa.get("/v1/entries?kind=user").await;
    assert_eq!(me.body["entries"].as_array().unwrap().len(), 1, "a user sees only themselves: {}", me.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_logins_forged_sessions_and_missing_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_c1, admin, web) = one_server(dir.path()).await;

    // No session, a forged one, a disabled user.
    let a = web.get("/v1/entries").await;
    assert_eq!((a.status, a.body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthenticated")));
    let forged = Web { cookie: Some(format!("drv_session={}", "ab".repeat(32))), ..web.clone() };
    assert_eq!(forged.get("/v1/entries").await.status, StatusCode::UNAUTHORIZED);
    let junk = Web { cookie: Some("drv_session=<script>".into()), ..web.clone() };
    assert_eq!(junk.get("/v1/whoami").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(web.login("gone", "correct horse").await.0.status, StatusCode::UNAUTHORIZED, "disabled");

    // A change without the CSRF token, or with another session's, changes nothing.
    let (_, root) = web.login("root", "correct horse").await;
    let (_, other) = web.login("opa", "correct horse").await;
    let before = admin.entries(None, None, false).await.unwrap().version;
    let body = serde_json::to_vec(&json!({"ops": [set(Kind::Volume, "v3", &["bwlimit=5M"])]})).unwrap();
    let a = root.send(Method::POST, "/v1/commands", body.clone(), None).await;
    assert_eq!((a.status, a.body["code"].as_str()), (StatusCode::FORBIDDEN, Some("csrf")), "{}", a.body);
    let a = root.send(Method::POST, "/v1/commands", body.clone(), other.csrf.as_deref()).await;
    assert_eq!(a.body["code"], "csrf");
    // An oversized body, and unknown fields.
    let big = vec![b' '; 2 << 20];
    root.too_large("/v1/commands", big, root.csrf.as_deref(), "application/json").await;
    let a = root.post("/v1/commands", json!({"ops": [], "sudo": true})).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    // HTML in a name is refused.
    let html = set(Kind::Volume, "<b>x</b>", &["size_bytes=1G", "wrl=w0", "replicas=[\"rep1\"]", "key=k1"]);
    let a = root.change(vec![html]).await;
    assert_eq!((a.status, a.body["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid")), "{}", a.body);
    assert_eq!(admin.entries(None, None, false).await.unwrap().version, before, "nothing changed");
    // A certless peer is not a component.
    assert_eq!(web.post("/v1/applied", json!({"version": 1})).await.status, StatusCode::UNAUTHORIZED);

    // Wrong passwords: refused, then rate limited (even the right one) with Retry-After.
    for i in 0..5 {
        let a = web.login("viewa", &format!("wrong {i}")).await.0;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "try {i}");
        assert_eq!(a.body["message"], "wrong user name or password");
    }
    let a = web.login("viewa", "correct horse").await.0;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    assert!(a.headers.get("retry-after").is_some());
    assert!(a.body["message"].as_str().unwrap().contains("try again in"), "{}", a.body);
    // Another user from the same address is not locked out by them.
    assert_eq!(web.login("opa", "correct horse").await.0.status, StatusCode::OK);
    // A user that does not exist is told the same as a wrong password.
    let a = web.login("<b>mallory</b>", "whatever1").await.0;
    assert_eq!((a.status, a.body["message"].as_str()), (StatusCode::UNAUTHORIZED, Some("wrong user name or password")));

    // A password change, disabling, and logout end sessions.
    let (_, opa) = web.login("opa", "correct horse").await;
    assert_eq!(opa.get("/v1/whoami").await.status, StatusCode::OK);
    admin.commit(vec![set(Kind::User, "opa", &["password=battery staple"])]).await.unwrap();
    assert_eq!(opa.get("/v1/whoami").await.status, StatusCode::UNAUTHORIZED, "the password changed");
    let (a, opa) = web.login("opa", "battery staple").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(opa.post("/v1/logout", json!({})).await.status, StatusCode::NO_CONTENT);
    assert_eq!(opa.get("/v1/whoami").await.status, StatusCode::UNAUTHORIZED, "logged out");
    let (_, opa) = web.login("opa", "battery staple").await;
    admin.commit(vec![set(Kind::User, "opa", &["disabled=true"])]).await.unwrap();
    assert_eq!(opa.get("/v1/entries").await.status, StatusCode::UNAUTHORIZED, "disabled");

    // The activity log has each of them; a user who is not an admin sees only their own.
    let act = root.get("/v1/activity?newest=1000").await;
    let rows = act.body.as_array().unwrap();
    let has = |what: &str, who: &str| rows.iter().any(|r| r["what"] == what && r["who"] == who);
    assert!(has("login", "login:root") && has("login_failed", "login:viewa"), "{}", act.body);
    assert!(has("refused", "user:root"), "the missing CSRF token: {}", act.body);
    assert!(has("logout", "user:opa"));
    assert!(rows.iter().any(|r| r["who"] == "login:<b>mallory</b>"), "kept as given (escaped where shown)");
    let (_, viewa) = (web.login("nobody", "correct horse").await.0, web.login("nobody", "correct horse").await.1);
    let mine = viewa.get("/v1/activity?newest=1000").await;
    assert!(mine.body.as_array().unwrap().iter().all(|r| r["who"] == "login:nobody" || r["who"] == "user:nobody"));
}

/// Three servers: a user logged in on a follower changes a volume; the change reaches the
/// leader through the follower and is authorised as it applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_user_changes_go_to_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    ca::init(&certs).unwrap();
    ca::issue(&certs, Role::Admin, "admin").unwrap();
    let mut nodes = Vec::new();
    for name in ["c1", "c2", "c3"] {
        nodes.push(node(&certs, dir.path(), name).await);
    }
    let members: std::collections::BTreeMap<_, _> = nodes
        .iter()
        .zip(["c1", "c2", "c3"])
        .map(|((n, _), name)| {
            (
                drv_configd::server::node_id(name),
                drv_configd::PeerNode { name: name.into(), address: n.addr().to_string() },
            )
        })
        .collect();
    nodes[0].0.raft.initialize(members).await.unwrap();
    let leader = wait_leader(&nodes[0].0).await;
    let list: Vec<String> = nodes.iter().map(|(n, _)| n.addr().to_string()).collect();
    let admin = ApiClient::new(&list.join(","), &Identity::load(&certs, "admin").unwrap())
        .unwrap()
        .with_patience(Duration::from_secs(10));
    installation(&admin).await;
    let (i, name) = ["c1", "c2", "c3"]
        .iter()
        .enumerate()
        .find(|(_, n)| drv_configd::server::node_id(n) != leader)
        .map(|(i, n)| (i, *n))
        .unwrap();
    let follower = Web::new(&certs, name, nodes[i].1);
    // The follower has the users once it applied the installation.
    let mut w = None;
    for _ in 0..100 {
        let (a, s) = follower.login("opa", "correct horse").await;
        if a.status == StatusCode::OK {
            w = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opa = w.expect("opa logs in on the follower");
    let a = opa.change(vec![set(Kind::Volume, "v1", &["bwlimit=7M"])]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let v = admin.entries(Some(Kind::Volume), Some("v1"), false).await.unwrap();
    assert_eq!(v.entries[0].value["bwlimit"], 7 << 20);
    let a = opa.change(vec![set(Kind::Volume, "v2", &["bwlimit=7M"])]).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    let log = admin.log_newest(5).await.unwrap();
    assert_eq!(log.records.last().unwrap().author, "user:opa");
    for (n, _) in nodes {
        n.shutdown().await;
    }
}

/// The pages: a login through the form, the overview, a volume page with its settings form for
/// an operator and none for a viewer, a form without its CSRF token refused, HTML escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_show_each_user_what_they_may_see_and_do() {
    let dir = tempfile::tempdir().unwrap();
    let (_c1, admin, web) = one_server(dir.path()).await;
    admin.commit(vec![set(Kind::Set, "a", &["description=<script>alert(1)</script>"])]).await.unwrap();

    let a = web.get("/volume/v1").await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert_eq!(a.headers["location"], "/login?next=/volume/v1");
    let a = web.get("/login?next=//evil.example/").await;
    assert!(a.text.contains(r#"name="next" value="/""#), "no open redirect: {}", a.text);
    assert_eq!(a.headers["x-frame-options"], "DENY");
    assert!(a.headers["content-security-policy"].to_str().unwrap().contains("default-src 'self'"));

    let login = |user: &'static str| {
        let web = web.clone();
        async move {
            let a = web.form("/login", &[("user", user), ("password", "correct horse"), ("next", "/volume/v1")]).await;
            assert_eq!(a.status, StatusCode::SEE_OTHER, "{user}: {}", a.text);
            assert_eq!(a.headers["location"], "/volume/v1");
            let c = a.headers["set-cookie"].to_str().unwrap();
            Web { cookie: Some(c.split(';').next().unwrap().to_owned()), ..web }
        }
    };
    let a = web.form("/login", &[("user", "opa"), ("password", "nope nope")]).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.text.contains("wrong user name or password"), "{}", a.text);

    let opa = login("opa").await;
    let page = opa.get("/volume/v1").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    assert!(page.text.contains("Save settings") && page.text.contains("drv snapshot create v1"), "{}", page.text);
    let csrf = page.text.split(r#"name="csrf" value=""#).nth(1).unwrap().split('"').next().unwrap().to_owned();
    let a = opa
        .form(
            "/ui/set",
            &[("csrf", "forged"), ("kind", "volume"), ("name", "v1"), ("operator", "1"), ("bwlimit", "9M")],
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text);
    let fields = [("csrf", csrf.as_str()), ("kind", "volume"), ("name", "v1"), ("operator", "1"), ("bwlimit", "9M")];
    let a = opa.form("/ui/set", &fields).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert!(a.text.contains("Done: configuration version"), "{}", a.text);
    let v = admin.entries(Some(Kind::Volume), Some("v1"), false).await.unwrap();
    assert_eq!(v.entries[0].value["bwlimit"], 9 << 20);
    // Another set's volume: invisible (404), and a forged form for it is refused.
    assert_eq!(opa.get("/volume/v3").await.status, StatusCode::NOT_FOUND);
    let fields = [("csrf", csrf.as_str()), ("kind", "volume"), ("name", "v2"), ("operator", "1"), ("bwlimit", "9M")];
    let a = opa.form("/ui/set", &fields).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text);
    assert_eq!(opa.get("/config").await.status, StatusCode::FORBIDDEN);
    // An oversized form.
    let big = format!("csrf={csrf}&kind=volume&name=v1&assignments={}", "x".repeat(100 << 10));
    opa.too_large("/ui/set", big.into_bytes(), None, "application/x-www-form-urlencoded").await;

    let viewa = login("viewa").await;
    let page = viewa.get("/volume/v1").await;
    assert!(page.text.contains("You may view this volume") && !page.text.contains("Save settings"), "{}", page.text);
    let overview = viewa.get("/").await;
    assert!(overview.text.contains("Overview") && overview.text.contains("data-events"), "{}", overview.text);
    // The live fragments: the first at once, the next at the monitor's next overview (10 s).
    let ev = viewa.events("/events?page=overview", 6).await;
    assert!(ev[0].starts_with("event: fragment\ndata: summary\n"), "{ev:?}");
    let last = &ev[5];
    assert!(last.contains("data: volumes\n"), "an update: {ev:?}");
    assert!(last.contains("/volume/v1") && !last.contains("/volume/v2"), "only their volumes: {last}");
    assert!(last.contains("staging stg1 has not reported"), "and why it is at risk: {last}");

    let root = login("root").await;
    let page = root.get("/config").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.text.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && !page.text.contains("<script>alert"),
        "escaped"
    );
    assert!(!page.text.contains("argon2"), "no password hash on a page");
    let act = root.get("/activity").await;
    assert!(act.text.contains("login_failed") && act.text.contains("user:opa"), "{}", act.text);
    let hist = root.get("/history").await;
    assert!(hist.text.contains("bwlimit=9M") && hist.text.contains("user:opa"), "{}", hist.text);
}
