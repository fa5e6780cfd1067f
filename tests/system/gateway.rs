//! The gateway against a real VNC server: a session's VM (simulated node) gets its VNC endpoint
//! served by a real `Xvfb` + `x11vnc` the test starts at that address; the browser's side is a
//! real WebSocket client. A token opens the desktop's RFB stream; a forged token and a token
//! replayed after release are refused; releasing the handle closes the open connection.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::support::{TestApp, until};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real VNC server (`x11vnc` on its own `Xvfb`) listening on `host:port`.
fn vnc_server(host: &str, port: u16) -> (Kill, Kill) {
    for bin in ["/usr/bin/Xvfb", "/usr/bin/x11vnc"] {
        assert!(std::path::Path::new(bin).exists(), "{bin} is missing: run scripts/test-deps.sh");
    }
    let display = format!(":{}", 300 + std::process::id() % 500);
    let xvfb = Kill(
        Command::new("Xvfb")
            .args([display.as_str(), "-screen", "0", "640x480x24", "-nolisten", "tcp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Xvfb"),
    );
    let sock = format!("/tmp/.X11-unix/X{}", &display[1..]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::path::Path::new(&sock).exists() {
        assert!(std::time::Instant::now() < deadline, "Xvfb did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let vnc = Kill(
        Command::new("x11vnc")
            .args(["-display", &display, "-rfbport", &port.to_string(), "-listen", host, "-nopw", "-forever", "-shared", "-quiet"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("x11vnc"),
    );
    (xvfb, vnc)
}

fn ws_url(base: &str, path: &str) -> String {
    format!("{}{path}", base.replacen("http", "ws", 1))
}

#[tokio::test]
async fn a_token_opens_the_desktop_and_dies_with_its_session() {
    let app = TestApp::spawn().await;
    let (_batch, handle, _vm) = app.held_vm(1, 2).await;
    let s = app.json(&format!("/api/v1/pools/default/sessions/{handle}")).await;
    let (host, port) = (s["vnc"]["host"].as_str().unwrap().to_string(), s["vnc"]["port"].as_u64().unwrap() as u16);
    let _server = vnc_server(&host, port);
    until("x11vnc listens", Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect((host.as_str(), port)).await.ok().map(drop)
    })
    .await;

    let r = app.post(&format!("/api/v1/pools/default/sessions/{handle}/gateway")).await;
    assert_eq!(r.status(), 201);
    let issued: Value = r.json().await.unwrap();
    let url = issued["url"].as_str().unwrap().to_string();
    assert!(url.starts_with(&format!("/sessions/default.{handle}/vnc?token=")), "{issued}");

    // The browser's side: the first bytes through the gateway are the server's RFB banner.
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(&app.base, &url)).await.expect("upgrade");
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("banner in time");
    match first {
        Some(Ok(Message::Binary(b))) => assert!(b.starts_with(b"RFB 003.00"), "banner: {:?}", String::from_utf8_lossy(&b)),
        other => panic!("expected the RFB banner, got {other:?}"),
    }

    // A forged token (another handle, same signature) is refused before the upgrade.
    let forged = url.replacen(&format!("default.{handle}."), &format!("default.{}.", handle + 1), 1);
    match tokio_tungstenite::connect_async(ws_url(&app.base, &forged)).await {
        Err(tungstenite::Error::Http(resp)) => assert!(matches!(resp.status().as_u16(), 401 | 403), "{:?}", resp.status()),
        other => panic!("a forged token must be refused, got {:?}", other.map(|_| ())),
    }

    // Release: the open connection is closed, and the token no longer opens anything.
    assert_eq!(app.post(&format!("/release/{handle}")).await.status(), 200);
    // Frames still in flight may come first; the end must come within the deadline.
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
    match tokio_tungstenite::connect_async(ws_url(&app.base, &url)).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 403, "replay after release"),
        other => panic!("a replayed token must be refused, got {:?}", other.map(|_| ())),
    }
    app.stop().await;
}
