//! The gateway to a node behind NAT: a real `hive up` and a real `hive node --behind-nat`
//! agent (simulated hypervisor) that reports an address nothing answers at (192.0.2.1,
//! TEST-NET-1), while the VM's VNC — a real `Xvfb` + `x11vnc` started by the test — listens on
//! the node's loopback. The RFB stream can only have come through the agent's own connection;
//! bytes flow both ways (the banner, the client's version, the security types), and releasing
//! the handle closes the connection.

use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::agents::{Proc, join_token, start_hive};
use crate::gateway::vnc_server;
use crate::support::{hive_bin, send_json, until};

/// Nothing answers at TEST-NET-1 (RFC 5737): a gateway that dialled it would get no banner.
const UNREACHABLE: &str = "192.0.2.1";

async fn next_binary(
    ws: &mut (impl futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Vec<u8> {
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame in time") {
        Some(Ok(Message::Binary(b))) => b.to_vec(),
        other => panic!("expected RFB bytes, got {other:?}"),
    }
}

#[tokio::test]
async fn a_desktop_behind_nat_is_reached_through_the_agents_connection() {
    let dir = tempfile::tempdir().unwrap();
    let hive = start_hive(&dir.path().join("hive"), "127.0.0.1:0", &[]);
    let c = reqwest::Client::new();
    let base = hive.base.clone();
    let api = |m: reqwest::Method, path: &str| send_json(&c, m, format!("{base}{path}"), None, None);

    let (s, b) = api(reqwest::Method::POST, "/set-pool-size/1/1/600000").await;
    assert_eq!(s, 200, "{b}");
    let jt = join_token(&c, &hive).await;
    let child = Command::new(hive_bin())
        .args(["node", "--hive", &hive.base, "--name", "natted", "--cores", "4", "--ram-mb", "8192", "--disk-mb", "100000"])
        .args(["--address", UNREACHABLE, "--behind-nat", "--data-dir"])
        .arg(dir.path().join("agent"))
        .env("HIVE_NODE_TOKEN", jt)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the agent");
    let _agent = Proc { child };
    let node = until("the NAT node is ready", Duration::from_secs(60), || async {
        let (_, n) = api(reqwest::Method::GET, "/api/v1/nodes").await;
        n.as_array().and_then(|n| n.iter().find(|n| n["name"] == "natted" && n["state"] == "ready").cloned())
    })
    .await;
    assert_eq!(node["behind_nat"], true, "the registry records the hello's flag: {node}");
    assert_eq!(node["address"], UNREACHABLE, "{node}");

    let (s, b) = api(reqwest::Method::POST, "/prepare-batch/1/h").await;
    assert_eq!(s, 200, "{b}");
    let batch = b.as_u64().or_else(|| b.as_str().and_then(|s| s.parse().ok())).expect("batch id");
    let (s, b) = api(reqwest::Method::POST, &format!("/lock/{batch}")).await;
    assert_eq!(s, 200, "{b}");
    let handle = b.as_u64().or_else(|| b.as_str().and_then(|s| s.parse().ok())).expect("handle id");
    let session = until("the handle holds a VM", Duration::from_secs(30), || async {
        let (_, s) = api(reqwest::Method::GET, &format!("/api/v1/pools/default/sessions/{handle}")).await;
        s["vnc"]["port"].as_u64().is_some().then_some(s)
    })
    .await;
    assert_eq!(session["vnc"]["host"], UNREACHABLE, "the VM's VNC is at the node's (unreachable) address: {session}");
    assert_eq!(session["vm"]["node"], node["id"], "{session}");
    let port = session["vnc"]["port"].as_u64().unwrap() as u16;
    let _vnc = vnc_server("127.0.0.1", port, 800);
    until("x11vnc listens on loopback", Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(drop)
    })
    .await;

    let (s, issued) = api(reqwest::Method::POST, &format!("/api/v1/pools/default/sessions/{handle}/gateway")).await;
    assert_eq!(s, 201, "{issued}");
    let url = format!("{}{}", hive.base.replacen("http", "ws", 1), issued["url"].as_str().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade");

    // Node → browser: the server's banner.
    let banner = next_binary(&mut ws).await;
    assert!(banner.starts_with(b"RFB 003.00"), "banner: {:?}", String::from_utf8_lossy(&banner));
    // Browser → node: the client's version; the server answers with its security types
    // (a count, then the types; -nopw offers None = 1).
    ws.send(Message::binary(b"RFB 003.008\n".to_vec())).await.unwrap();
    let types = next_binary(&mut ws).await;
    assert!(types[0] >= 1 && types[1..].contains(&1), "security types: {types:?}");

    // Releasing the handle closes the tunnelled connection as it does a direct one.
    let (s, _) = api(reqwest::Method::POST, &format!("/release/{handle}")).await;
    assert_eq!(s, 200);
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Ok(Message::Close(_))) | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the gateway closes the released session's connection");
}
