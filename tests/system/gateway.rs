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

pub(crate) struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real VNC server (`x11vnc` on its own `Xvfb`) listening on `host:port`; `display_base` keeps
/// the displays of tests that run at once apart.
pub(crate) fn vnc_server(host: &str, port: u16, display_base: u32) -> (Kill, Kill) {
    for bin in ["/usr/bin/Xvfb", "/usr/bin/x11vnc"] {
        assert!(std::path::Path::new(bin).exists(), "{bin} is missing: run scripts/test-deps.sh");
    }
    let display = format!(":{}", display_base + std::process::id() % 500);
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
    let _server = vnc_server(&host, port, 300);
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

/// `openssl` with `stdin`, answering stdout (the test needs the real CLI, as the spec uses it).
fn openssl(args: &[&str], stdin: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the openssl CLI (Debian ships it)");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[tokio::test]
async fn a_guacamole_link_logs_into_exactly_the_session_vm_until_the_handle_expires() {
    // Without a Guacamole configured the route says so.
    let plain = TestApp::spawn().await;
    let (_, h, _) = plain.held_vm(1, 2).await;
    let r = plain.post(&format!("/api/v1/pools/default/sessions/{h}/guacamole")).await;
    assert_eq!(r.status(), 501);
    plain.stop().await;

    let key = "4c0b569e4c96df157eee1b65dd0e4d41";
    let app = TestApp::builder()
        .configure(|c| {
            c.guacamole.url = Some("https://desk.example.org/guacamole".into());
            c.guacamole.json_secret_key = Some(key.to_string().into());
        })
        .spawn()
        .await;
    let (_, handle, vm) = app.held_vm(1, 2).await;
    let r = app
        .client
        .post(format!("{}/api/v1/pools/default/sessions/{handle}/extend", app.base))
        .json(&serde_json::json!({"ms": 600_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "extend");
    let s = app.json(&format!("/api/v1/pools/default/sessions/{handle}")).await;
    let r = app.post(&format!("/api/v1/pools/default/sessions/{handle}/guacamole")).await;
    assert_eq!(r.status(), 201);
    let link: Value = r.json().await.unwrap();
    let url = link["url"].as_str().unwrap();
    let data = url.strip_prefix("https://desk.example.org/guacamole/?data=").unwrap_or_else(|| panic!("a Guacamole link: {url}"));
    let token = percent_encoding::percent_decode_str(data).decode_utf8().unwrap().to_string();

    // Guacamole's side, done by openssl: decrypt, check the signature, read the JSON.
    let zero_iv = "00000000000000000000000000000000";
    let plain = openssl(&["enc", "-d", "-aes-128-cbc", "-K", key, "-iv", zero_iv, "-nosalt", "-a", "-A"], token.as_bytes());
    let (mac, json) = plain.split_at(32);
    let expect = openssl(&["dgst", "-sha256", "-mac", "HMAC", "-macopt", &format!("hexkey:{key}"), "-binary"], json);
    assert_eq!(mac, expect.as_slice(), "signed with the shared key");
    let auth: Value = serde_json::from_slice(json).unwrap();
    assert_eq!(auth["username"], format!("default.{handle}"));
    assert_eq!(auth["expires"], s["expires_at"], "the link expires with the handle");
    assert_eq!(auth["singleUse"], true);
    let conns = auth["connections"].as_object().unwrap();
    assert_eq!(conns.len(), 1, "exactly one connection: {auth}");
    let (name, c) = conns.iter().next().unwrap();
    assert_eq!(name, &format!("default-vm-{vm}"));
    assert_eq!(c["protocol"], "vnc");
    assert_eq!(c["parameters"]["hostname"], s["vnc"]["host"]);
    assert_eq!(c["parameters"]["port"], s["vnc"]["port"].as_u64().unwrap().to_string());
    assert_eq!(c["parameters"]["password"], s["vnc"]["password"]);
    app.stop().await;
}
