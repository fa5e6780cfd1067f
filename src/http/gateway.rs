//! The browser's way to a desktop: `POST /api/v1/pools/{pool}/sessions/{id}/gateway` issues a
//! short-lived token for the session (`gateway.rs`), and `GET /sessions/{pool}.{id}/vnc?token=…`
//! upgrades to a WebSocket and pipes RFB bytes between it and the VM's VNC endpoint on its node,
//! which is what noVNC speaks. The upgrade is refused (401/403 with the JSON envelope) for a
//! forged or expired token, or once the handle no longer holds the token's VM; an open
//! connection is closed when the handle is released or expires. Any instance serves the
//! WebSocket: it asks the pool's instance about the handle.
//!
//! The gateway connects to the node's address directly, unless the VM's node is agent-run and
//! said it is behind NAT (`hive node --behind-nat`): then the bytes travel through a tunnel
//! over the agent's own connection to this instance, and the node's address is never dialled.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use warp::filters::BoxedFilter;
use warp::filters::ws::{Message, WebSocket, Ws};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::reply::{self, ApiResult};
use super::{ApiError, timed, with_hive};
use crate::app::Hive;
use crate::gateway::{Grant, TokenError};

/// How long an issued token may be used to open the WebSocket (never past the handle's expiry).
const TOKEN_TTL_MS: u64 = 60_000;
/// How often an open connection checks that its handle still holds the VM.
const RECHECK: Duration = Duration::from_secs(1);

pub fn routes(hive: Hive) -> BoxedFilter<(Response,)> {
    let h = || with_hive(hive.clone());
    let issue = warp::path!("api" / "v1" / "pools" / String / "sessions" / String / "gateway")
        .and(warp::post())
        .and(h())
        .then(|pool, id, hive| timed("/api/v1/pools/{pool}/sessions/{id}/gateway", issue(hive, pool, id)));
    let vnc = warp::path!("sessions" / String / "vnc")
        .and(warp::get())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .and(warp::header::optional::<String>("sec-websocket-protocol"))
        .and(warp::ws())
        .and(h())
        .then(|sid: String, q: std::collections::HashMap<String, String>, proto: Option<String>, ws: Ws, hive: Hive| async move {
            let started = std::time::Instant::now();
            let resp = match open(&hive, &sid, q.get("token").map(String::as_str)).await {
                Ok(target) => upgrade(hive, ws, proto, target),
                Err(e) => e.into_response(),
            };
            crate::metrics::http("/sessions/{id}/vnc", resp.status().as_u16(), started.elapsed().as_secs_f64());
            resp
        });
    let guac = warp::path!("api" / "v1" / "pools" / String / "sessions" / String / "guacamole")
        .and(warp::post())
        .and(h())
        .then(|pool, id, hive| timed("/api/v1/pools/{pool}/sessions/{id}/guacamole", guacamole_link(hive, pool, id)));
    issue.or(vnc).unify().or(guac).unify().boxed()
}

/// A link that logs the session's user into exactly its VM in Guacamole: with the encrypted
/// JSON extension, a single-use token that expires with the handle; in `rest` mode, the page of
/// the connection made when the VM was prepared (it is deleted when the VM is cleaned).
async fn guacamole_link(hive: Hive, pool: String, id: String) -> ApiResult {
    let handle = super::reply::uint("session", &id)?;
    let g = hive.guacamole().cloned().ok_or_else(|| {
        refused(StatusCode::NOT_IMPLEMENTED, "not_configured", "no Guacamole is configured ([guacamole] url and json_secret_key)")
    })?;
    let s = session(&hive, &pool, handle).await?;
    let vm = s["vm"]["id"].as_u64().ok_or_else(|| ApiError::Conflict(format!("session {pool}.{handle} has no VM yet")))?;
    let expires_at = s["expires_at"].as_u64();
    let unavailable = |e: crate::guacamole::GuacamoleError| ApiError::Unavailable(format!("guacamole: {e}"));
    let url = match hive.guacamole_sync() {
        Some(sync) => sync.link(&pool, vm).await.map_err(unavailable)?,
        None => {
            let target = crate::guacamole::VncTarget {
                hostname: s["vnc"]["host"].as_str().unwrap_or_default().to_string(),
                port: s["vnc"]["port"].as_u64().unwrap_or(0) as u16,
                password: s["vnc"]["password"].as_str().map(|p| secrecy::SecretString::from(p.to_string())),
                guacd_hostname: None,
            };
            let user = format!("{pool}.{handle}");
            let name = crate::guacamole::sync::connection_name(&pool, vm);
            g.link(&user, &name, &target, None, expires_at).await.map_err(unavailable)?
        }
    };
    Ok(reply::json_status(StatusCode::CREATED, &json!({"url": url, "expires_at": expires_at})))
}

async fn issue(hive: Hive, pool: String, id: String) -> ApiResult {
    let handle = super::reply::uint("session", &id)?;
    let s = session(&hive, &pool, handle).await?;
    let vm = s["vm"]["id"].as_u64().ok_or_else(|| ApiError::Conflict(format!("session {pool}.{handle} has no VM yet")))?;
    let mut expires_at = hive.now() + TOKEN_TTL_MS;
    if let Some(end) = s["expires_at"].as_u64() {
        expires_at = expires_at.min(end);
    }
    let token = hive.gateway_key().issue(&Grant { pool: pool.clone(), handle, vm, expires_at });
    let url = format!("/sessions/{pool}.{handle}/vnc?token={token}");
    Ok(reply::json_status(StatusCode::CREATED, &json!({"url": url, "token": token, "expires_at": expires_at})))
}

/// The session as the pool's instance reports it (this one or another).
async fn session(hive: &Hive, pool: &str, handle: u64) -> Result<Value, ApiError> {
    let p = hive.pool(pool)?;
    if p.running() || hive.coordinator().kind() == "local" {
        let v = p.handle_status(handle).await?;
        return Ok(serde_json::to_value(super::api::session_view(pool, &v)).unwrap_or_default());
    }
    super::forward::get_json(hive, pool, &format!("/api/v1/pools/{pool}/sessions/{handle}")).await.map_err(ApiError::Unavailable)
}

struct Target {
    grant: Grant,
    vnc: Vnc,
}

/// Where the VM's VNC is: the node's address and port, and the node.
struct Vnc {
    host: String,
    port: u16,
    node: Option<u64>,
}

impl Vnc {
    fn addr(&self) -> String {
        if self.host.contains(':') { format!("[{}]:{}", self.host, self.port) } else { format!("{}:{}", self.host, self.port) }
    }
}

fn refused(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::Refused { status, code, message: message.into() }
}

/// Check the token and that its handle still holds its VM; answer where the VM's VNC is.
async fn open(hive: &Hive, sid: &str, token: Option<&str>) -> Result<Target, ApiError> {
    let token = token.ok_or_else(|| refused(StatusCode::UNAUTHORIZED, "no_token", "the gateway needs ?token= from POST …/gateway"))?;
    let grant = hive.gateway_key().verify(token, hive.now()).map_err(|e| match e {
        TokenError::Expired => refused(StatusCode::FORBIDDEN, "token_expired", e.to_string()),
        e => refused(StatusCode::UNAUTHORIZED, "bad_token", e.to_string()),
    })?;
    if sid != format!("{}.{}", grant.pool, grant.handle) {
        return Err(refused(StatusCode::FORBIDDEN, "wrong_session", "the token was issued for another session"));
    }
    let vnc = still_held(hive, &grant).await?;
    Ok(Target { grant, vnc })
}

/// The VM's VNC while the handle holds the token's VM; 403 once it does not.
async fn still_held(hive: &Hive, g: &Grant) -> Result<Vnc, ApiError> {
    let gone = || refused(StatusCode::FORBIDDEN, "session_ended", format!("session {}.{} no longer holds VM {}", g.pool, g.handle, g.vm));
    let s = match session(hive, &g.pool, g.handle).await {
        Ok(s) => s,
        Err(ApiError::BadParam { .. } | ApiError::NotFound { .. }) => return Err(gone()),
        Err(e) => return Err(e),
    };
    if s["vm"]["id"].as_u64() != Some(g.vm) {
        return Err(gone());
    }
    let (host, port) = (s["vnc"]["host"].as_str().unwrap_or_default(), s["vnc"]["port"].as_u64().unwrap_or(0));
    if host.is_empty() || port == 0 {
        return Err(ApiError::Unavailable(format!("VM {} has no VNC endpoint yet", g.vm)));
    }
    Ok(Vnc { host: host.to_string(), port: port as u16, node: s["vm"]["node"].as_u64() })
}

fn upgrade(hive: Hive, ws: Ws, proto: Option<String>, target: Target) -> Response {
    // noVNC may ask for the `binary` subprotocol; a browser drops a connection whose answer
    // does not echo one it asked for.
    let binary = proto.is_some_and(|p| p.split(',').any(|p| p.trim() == "binary"));
    let reply = ws.max_message_size(1 << 24).on_upgrade(move |socket| pipe(hive, socket, target));
    if binary { warp::reply::with_header(reply, "sec-websocket-protocol", "binary").into_response() } else { reply.into_response() }
}

async fn pipe(hive: Hive, socket: WebSocket, target: Target) {
    let (mut ws_tx, mut ws_rx) = socket.split();
    let (mut tcp_rx, mut tcp_tx) = match connect(&hive, &target.vnc).await {
        Ok(halves) => halves,
        Err(e) => return close(&mut ws_tx, &e).await,
    };
    crate::metrics::gateway_open(1);
    let mut buf = vec![0u8; 64 * 1024];
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.tick().await;
    let why = loop {
        tokio::select! {
            n = tcp_rx.read(&mut buf) => match n {
                Ok(0) | Err(_) => break "the VM closed the VNC connection".to_string(),
                Ok(n) => {
                    crate::metrics::gateway_bytes("to_browser", n);
                    if ws_tx.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                        break String::new();
                    }
                }
            },
            m = ws_rx.next() => match m {
                Some(Ok(m)) if m.is_binary() || m.is_text() => {
                    crate::metrics::gateway_bytes("to_vm", m.as_bytes().len());
                    if tcp_tx.write_all(m.as_bytes()).await.is_err() {
                        break "the VM closed the VNC connection".to_string();
                    }
                }
                Some(Ok(m)) if m.is_close() => break String::new(),
                Some(Ok(_)) => {}
                _ => break String::new(),
            },
            _ = recheck.tick() => match still_held(&hive, &target.grant).await {
                Err(ApiError::Refused { message, .. }) => break message,
                // A pool restarting or out of reach says nothing about the handle: keep going.
                _ => {}
            },
        }
    };
    crate::metrics::gateway_open(-1);
    if !why.is_empty() {
        close(&mut ws_tx, &why).await;
    }
}

type Halves = (Box<dyn AsyncRead + Send + Unpin>, Box<dyn AsyncWrite + Send + Unpin>);

/// The VM's VNC stream: through the agent's tunnel when its node is behind NAT, else direct.
async fn connect(hive: &Hive, vnc: &Vnc) -> Result<Halves, String> {
    if let Some(node) = vnc.node {
        let nodes = hive.nodes().await.map_err(|e| format!("cannot look up the VM's node: {e}"))?;
        if nodes.iter().any(|n| n.id == node && n.remote && n.behind_nat) {
            let remote = hive.nodes_handle().remote(node);
            let (tx, rx) = remote.open_tunnel(vnc.port, Some(vnc.host.clone())).map_err(|e| format!("cannot reach the VM's node: {e}"))?;
            // The pipe below reads and writes a stream; a duplex pair turns the tunnel into one.
            let (near, far) = tokio::io::duplex(64 * 1024);
            tokio::spawn(bridge(far, tx, rx));
            let (r, w) = tokio::io::split(near);
            return Ok((Box::new(r), Box::new(w)));
        }
    }
    let addr = vnc.addr();
    let tcp = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(format!("cannot reach the VM's VNC at {addr}: {e}")),
        Err(_) => return Err(format!("the VM's VNC at {addr} does not answer")),
    };
    let _ = tcp.set_nodelay(true);
    let (r, w) = tcp.into_split();
    Ok((Box::new(r), Box::new(w)))
}

/// Carry bytes between the tunnel and its stream until either ends; dropping `tx` closes the
/// node's end.
async fn bridge(far: tokio::io::DuplexStream, tx: crate::drivers::remote::TunnelTx, mut rx: crate::drivers::remote::TunnelRx) {
    let (mut r, mut w) = tokio::io::split(far);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !tx.send(&buf[..n]) {
                        break;
                    }
                }
            },
            m = rx.recv() => match m {
                Some(Ok(b)) => {
                    if w.write_all(&b).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    tracing::info!(error = %e, "the node could not keep the tunnel to the VM's VNC");
                    break;
                }
                None => break,
            },
        }
    }
}

async fn close(tx: &mut futures_util::stream::SplitSink<WebSocket, Message>, why: &str) {
    tracing::debug!(reason = %why, "gateway connection closed");
    // 1008: policy violation (the session ended); the reason is cut to the 123 bytes allowed.
    let reason: String = why.chars().take(120).collect();
    let _ = tx.send(Message::close_with(1008u16, reason)).await;
    let _ = tx.close().await;
}
