//! mTLS and role checks over real QUIC on loopback.

use drv_format::frame::Frame;
use drv_transport::{FrameReader, FrameWriter, Identity, Role, ca, quic};

async fn echo_server(id: Identity, allowed: &[Role]) -> std::net::SocketAddr {
    let mut server = quic::server("127.0.0.1:0".parse().unwrap(), &id, allowed).unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(mut conn) = server.accept().await {
            tokio::spawn(async move {
                while let Ok(Some(stream)) = conn.accept_bidirectional_stream().await {
                    let (rx, tx) = stream.split();
                    let (mut r, mut w) = (FrameReader::new(rx, 1 << 20), FrameWriter::new(tx));
                    while let Ok(Some(f)) = r.next().await {
                        if w.send(&f).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn roundtrip(client: &Identity, expect: Role, addr: std::net::SocketAddr) -> Result<Frame, String> {
    let c = quic::client(client, expect).map_err(|e| e.to_string())?;
    let mut conn = quic::connect(&c, addr, expect).await.map_err(|e| e.to_string())?;
    let s = conn.open_bidirectional_stream().await.map_err(|e| e.to_string())?;
    let (rx, tx) = s.split();
    let (mut r, mut w) = (FrameReader::new(rx, 1 << 20), FrameWriter::new(tx));
    w.send(&Frame::OpenVolume { volume_id: 7 }).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(std::time::Duration::from_secs(5), r.next()).await {
        Ok(Ok(Some(f))) => Ok(f),
        Ok(Ok(None)) => Err("closed".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timeout".into()),
    }
}

#[tokio::test]
async fn roles_and_ca_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    ca::init(dir.path()).unwrap();
    ca::init(other.path()).unwrap();
    ca::issue(dir.path(), Role::Staging, "stg1").unwrap();
    ca::issue(dir.path(), Role::Agent, "host1").unwrap();
    ca::issue(dir.path(), Role::Replica, "rep1").unwrap();
    ca::issue(other.path(), Role::Agent, "intruder").unwrap();
    let stg = Identity::load(dir.path(), "stg1").unwrap();
    let addr = echo_server(stg, &[Role::Agent]).await;

    let agent = Identity::load(dir.path(), "host1").unwrap();
    assert_eq!(roundtrip(&agent, Role::Staging, addr).await.unwrap(), Frame::OpenVolume { volume_id: 7 });

    // A certificate from another CA is refused.
    let mut intruder = Identity::load(other.path(), "intruder").unwrap();
    intruder.ca_pem = agent.ca_pem.clone(); // it even trusts the right CA
    assert!(roundtrip(&intruder, Role::Staging, addr).await.is_err());

    // A certificate of the right CA with the wrong role is refused.
    let replica = Identity::load(dir.path(), "rep1").unwrap();
    assert!(roundtrip(&replica, Role::Staging, addr).await.is_err());

    // A client that expects a replica refuses the staging server.
    assert!(roundtrip(&agent, Role::Replica, addr).await.is_err());
}
