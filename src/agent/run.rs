//! The agent's life: make sure it has a node credential (exchanging a join token for one on
//! first contact and keeping it in the data directory, mode 0600), then keep one WebSocket to
//! the hive: hello (offer, addresses, the domains it holds), heartbeats with host context,
//! commands executed on the local hypervisor in tasks of their own, replies. When the
//! connection drops it reconnects with exponential backoff and jitter; it stops only when the
//! hive refuses it (removed node, bad credential) or on a signal.
//!
//! A hive of several instances (one database) may command a node from any of them, so the
//! agent keeps one such connection to each instance it is given, all driving the same
//! hypervisor and image cache. The first instance is the primary: the join token is exchanged
//! there and images are fetched from it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use super::host::HostSampler;
use super::images::{AgentImages, Caps};
use super::proto::{AGENT_WS_PATH, AgentMsg, CmdOk, Command, Hello, HiveMsg, Offer, PROTOCOL_VERSION};
use super::tunnel::Tunnels;
use crate::drivers::remote::execute;
use crate::drivers::{DriverError, Hypervisor};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the hive refused this node: {0}")]
    Refused(String),
    #[error("the hive did not accept the token or credential ({0}); ask an admin for a join token")]
    Unauthorized(String),
    #[error("{0}")]
    Config(String),
    #[error("cannot reach the hive: {0}")]
    Unreachable(String),
    #[error("data directory: {0}")]
    Io(#[from] std::io::Error),
}

pub struct AgentConfig {
    /// Base URL of the hive's HTTP API, e.g. `http://127.0.0.1:8080`: the primary instance
    /// (joining, the saved credential, images).
    pub hive: String,
    /// The hive's other instances (same database, same nodes), each kept connected as well.
    pub also: Vec<String>,
    /// A join token (`hjt_…`) for the first contact, or a node credential (`hnc_…`).
    pub token: Option<String>,
    pub name: String,
    pub offer: Offer,
    pub addresses: Vec<String>,
    pub data_dir: PathBuf,
    pub backoff_max: Duration,
    /// Where the piece server listens for peers (port 0: any free port).
    pub peer_listen: std::net::SocketAddr,
    pub caps: Caps,
    /// Ready copies to keep of every image the node holds.
    pub stock: usize,
    /// The hive cannot reach `addresses`: it reaches VNC through the agent's connection.
    pub behind_nat: bool,
}

/// What the agent keeps between runs (`data_dir/credential.json`, mode 0600).
#[derive(Serialize, Deserialize)]
struct Saved {
    hive: String,
    node_id: u64,
    credential: String,
}

#[derive(Deserialize)]
struct Joined {
    node_id: u64,
    credential: String,
}

fn credential_path(dir: &Path) -> PathBuf {
    dir.join("credential.json")
}

/// The node's credential: the saved one for this hive, or the one given, or a join token
/// exchanged now (and saved before anything else happens).
pub async fn credential(cfg: &AgentConfig) -> Result<String, AgentError> {
    let path = credential_path(&cfg.data_dir);
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(saved) = serde_json::from_str::<Saved>(&text) {
            if saved.hive == cfg.hive {
                return Ok(saved.credential);
            }
        }
    }
    let token =
        cfg.token.clone().ok_or_else(|| AgentError::Config("no saved credential for this hive: pass --token <join token>".into()))?;
    if token.starts_with("hnc_") {
        return Ok(token);
    }
    let url = format!("{}/api/v1/nodes/register", cfg.hive.trim_end_matches('/'));
    let resp = reqwest::Client::new()
        .post(&url)
        .bearer_auth(&token)
        .json(&serde_json::json!({ "name": cfg.name }))
        .send()
        .await
        .map_err(|e| AgentError::Unreachable(e.to_string()))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        return Err(AgentError::Unauthorized(format!("{status}: {body}")));
    }
    let joined: Joined = resp.json().await.map_err(|e| AgentError::Unreachable(e.to_string()))?;
    let saved = Saved { hive: cfg.hive.clone(), node_id: joined.node_id, credential: joined.credential.clone() };
    write_private(&path, &serde_json::to_vec_pretty(&saved).unwrap_or_default())?;
    tracing::info!(node.id = joined.node_id, "joined the hive; credential saved");
    Ok(joined.credential)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp)?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

enum Ended {
    /// The connection dropped after it had been welcomed (reset the backoff).
    AfterWelcome,
    Failed(String),
}

/// Run until refused by any instance. Reconnects forever otherwise.
pub async fn run(cfg: AgentConfig, hv: Arc<dyn Hypervisor>) -> Result<(), AgentError> {
    std::fs::create_dir_all(&cfg.data_dir)?;
    let credential = credential(&cfg).await?;
    let images = AgentImages::open(&cfg.data_dir, &cfg.hive, &credential, cfg.caps, cfg.stock)
        .await
        .map_err(|e| AgentError::Config(e.to_string()))?;
    let moves = super::moves::open_scratch(&cfg.data_dir)?;
    let listener = tokio::net::TcpListener::bind(cfg.peer_listen).await?;
    let port = listener.local_addr()?.port();
    let host_name = cfg.addresses.first().cloned().unwrap_or_else(|| "127.0.0.1".into());
    let peer_url = format!("http://{host_name}:{port}");
    tokio::spawn(warp::serve(images.routes()).incoming(listener).run());
    tracing::info!(%peer_url, "serving pieces to peers");
    let cfg = Arc::new(cfg);
    let mut hives: Vec<String> = Vec::new();
    for h in std::iter::once(&cfg.hive).chain(&cfg.also) {
        // The same instance twice would be two connections of one node to one registry.
        if !hives.iter().any(|k| k.trim_end_matches('/') == h.trim_end_matches('/')) {
            hives.push(h.clone());
        }
    }
    // Dropping the set (when one loop ends) stops the other loops.
    let mut loops = tokio::task::JoinSet::new();
    for hive in hives {
        let link = Link {
            cfg: cfg.clone(),
            hive,
            credential: credential.clone(),
            hv: hv.clone(),
            images: images.clone(),
            peer_url: peer_url.clone(),
            moves: moves.clone(),
        };
        loops.spawn(keep_connected(link));
    }
    match loops.join_next().await {
        Some(Ok(e)) => Err(e),
        Some(Err(e)) => Err(AgentError::Config(format!("a connection loop failed: {e}"))),
        None => Ok(()),
    }
}

/// What one connection loop needs: the instance it keeps, and what all loops share.
struct Link {
    cfg: Arc<AgentConfig>,
    hive: String,
    credential: String,
    hv: Arc<dyn Hypervisor>,
    images: AgentImages,
    peer_url: String,
    /// `data_dir/moves` (see `moves::open_scratch`).
    moves: std::path::PathBuf,
}

/// Keep one instance connected, with its own backoff; answers only why it was refused.
async fn keep_connected(l: Link) -> AgentError {
    let mut host = HostSampler::new(&l.cfg.data_dir);
    let mut backoff = Duration::from_millis(100);
    loop {
        match connect_once(&l, &mut host).await {
            Ok(Ended::AfterWelcome) => {
                backoff = Duration::from_millis(100);
                tracing::warn!(hive = %l.hive, "connection to the hive lost; reconnecting");
            }
            Ok(Ended::Failed(why)) => {
                tracing::warn!(hive = %l.hive, error = %why, retry_ms = backoff.as_millis() as u64, "cannot connect to the hive")
            }
            Err(e) => {
                tracing::warn!(hive = %l.hive, error = %e, "the hive refused this node");
                return e;
            }
        }
        // Jitter spreads a thousand agents that lost the same hive over the retry window.
        let jitter = rand::rng().random_range(0.5..1.0);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(l.cfg.backoff_max);
    }
}

async fn connect_once(l: &Link, host: &mut HostSampler) -> Result<Ended, AgentError> {
    let (cfg, hive, credential, hv, images, peer_url) =
        (&*l.cfg, l.hive.as_str(), l.credential.as_str(), l.hv.clone(), &l.images, &l.peer_url);
    let url = format!("{}{AGENT_WS_PATH}", hive.trim_end_matches('/').replacen("http", "ws", 1));
    let mut req = url.into_client_request().map_err(|e| AgentError::Config(format!("hive URL: {e}")))?;
    let auth = format!("Bearer {credential}").parse().map_err(|_| AgentError::Config("credential is not a valid header value".into()))?;
    req.headers_mut().insert("authorization", auth);
    let ws = match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => ws,
        Err(tungstenite::Error::Http(resp)) if resp.status() == 401 => {
            let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            return Err(AgentError::Unauthorized(body));
        }
        Err(e) => return Ok(Ended::Failed(e.to_string())),
    };
    let (mut tx, mut rx) = ws.split();
    let domains = match hv.list().await {
        Ok(d) => d,
        Err(e) => return Ok(Ended::Failed(format!("the local hypervisor does not answer: {e}"))),
    };
    let hello = AgentMsg::Hello(Hello {
        version: PROTOCOL_VERSION,
        name: cfg.name.clone(),
        offer: cfg.offer,
        driver: hv.kind().to_string(),
        addresses: cfg.addresses.clone(),
        domains,
        images: images.held(),
        peer_url: Some(peer_url.to_string()),
        behind_nat: cfg.behind_nat,
    });
    if let Err(e) = tx.send(text(&hello)).await {
        return Ok(Ended::Failed(e.to_string()));
    }
    let heartbeat_ms = match read(&mut rx).await {
        Some(HiveMsg::Welcome { node_id, heartbeat_ms }) => {
            tracing::info!(node.id = node_id, %hive, heartbeat_ms, "connected to the hive");
            images.set_node_id(node_id);
            heartbeat_ms
        }
        Some(HiveMsg::Refused { reason }) => return Err(AgentError::Refused(reason)),
        _ => return Ok(Ended::Failed("no welcome from the hive".into())),
    };
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<AgentMsg>();
    let mut beat = tokio::time::interval(Duration::from_millis(heartbeat_ms.max(10)));
    let mut seq = 0;
    // Dropped when this connection ends, which closes every tunnel it carried.
    let mut tunnels = Tunnels::default();
    // Likewise cancels the migration jobs it started (the hive retries them elsewhere).
    let jobs = super::migrate::Jobs::default();
    let scratch_root = cfg.data_dir.join("migrations");
    // Likewise stops the network part of the moves it carried (their answers would be lost).
    let moves = super::moves::MoveContext {
        hive: hive.to_string(),
        credential: credential.to_string().into(),
        images: images.clone(),
        scratch: l.moves.clone(),
        cancel: tokio_util::sync::CancellationToken::new(),
    };
    let _stop_moves = moves.cancel.clone().drop_guard();
    loop {
        tokio::select! {
            _ = beat.tick() => {
                seq += 1;
                let beat = AgentMsg::Heartbeat {
                    seq,
                    stats: host.sample(),
                    cache: Some(images.counters()),
                    stock: images.stock(),
                    scratch_free: crate::migration::worker::free_space(&scratch_root),
                };
                if tx.send(text(&beat)).await.is_err() {
                    return Ok(Ended::AfterWelcome);
                }
            }
            Some(reply) = out_rx.recv() => {
                if tx.send(text(&reply)).await.is_err() {
                    return Ok(Ended::AfterWelcome);
                }
            }
            msg = read(&mut rx) => match msg {
                Some(HiveMsg::Command { id, cmd: Command::FetchImage { sha256, peers } }) => {
                    let (images, out) = (images.clone(), out_tx.clone());
                    tokio::spawn(async move {
                        let result = images.fetch(&sha256, peers).await.map(CmdOk::Fetched);
                        if let Err(e) = &result {
                            tracing::warn!(image = %sha256, error = %e, "image fetch failed");
                        }
                        let _ = out.send(AgentMsg::Reply { id, result });
                    });
                }
                Some(HiveMsg::Command { id, cmd: Command::Migrate { job, source, id_at_source, upload_path } }) => {
                    let ctx = super::migrate::JobContext {
                        hive: hive.to_string(),
                        credential: credential.to_string().into(),
                        scratch_root: scratch_root.clone(),
                        out: out_tx.clone(),
                    };
                    jobs.start(id, job, source, id_at_source, upload_path, ctx);
                }
                Some(HiveMsg::Command { id, cmd: Command::CancelMigration { job } }) => {
                    jobs.cancel(job);
                    let _ = out_tx.send(AgentMsg::Reply { id, result: Ok(CmdOk::Done) });
                }
                Some(HiveMsg::Command { id, cmd: Command::Discover { source } }) => {
                    let out = out_tx.clone();
                    tokio::spawn(async move {
                        let _ = out.send(AgentMsg::Reply { id, result: super::migrate::discover(&source).await });
                    });
                }
                Some(HiveMsg::Command { id, cmd: Command::InstallTemplate { sha256, name, ready } }) => {
                    let (hv, out, path) = (hv.clone(), out_tx.clone(), images.image_path(&sha256));
                    tokio::spawn(async move {
                        let result = match path {
                            Some(p) => hv.install_template(&name, &p, ready.as_deref()).await.map(|_| CmdOk::Done),
                            None => Err(crate::drivers::DriverError::NotFound(format!("image {sha256} is not held on this node"))),
                        };
                        let _ = out.send(AgentMsg::Reply { id, result });
                    });
                }
                Some(HiveMsg::Command { id, cmd: Command::ProbeSource { source } }) => {
                    let out = out_tx.clone();
                    tokio::spawn(async move {
                        let _ = out.send(AgentMsg::Reply { id, result: super::migrate::probe(&source).await });
                    });
                }
                Some(HiveMsg::Command { id, cmd }) if super::moves::is_move(&cmd) => {
                    let (hv, out, ctx) = (hv.clone(), out_tx.clone(), moves.clone());
                    tokio::spawn(async move {
                        let result = super::moves::run(hv.as_ref(), cmd, &ctx).await;
                        if let Err(e) = &result {
                            tracing::warn!(error = %e, "move command failed");
                        }
                        let _ = out.send(AgentMsg::Reply { id, result });
                    });
                }
                Some(HiveMsg::Command { id, cmd }) => {
                    let (hv, out, images) = (hv.clone(), out_tx.clone(), images.clone());
                    tokio::spawn(async move {
                        let (template, destroyed) = match &cmd {
                            Command::Create { spec } => (Some(spec.template.clone()), None),
                            Command::Destroy { domain } => (None, Some(domain.clone())),
                            _ => (None, None),
                        };
                        let mut result = execute(hv.as_ref(), cmd).await;
                        if let (Some(t), Ok(CmdOk::Domain(d))) = (&template, &result) {
                            if let Err(e) = images.give_disk(d, t).await {
                                let _ = hv.destroy(d).await;
                                result = Err(e);
                            }
                        }
                        if let (Some(d), Ok(_)) = (&destroyed, &result) {
                            images.drop_disk(d);
                        }
                        let _ = out.send(AgentMsg::Reply { id, result });
                    });
                }
                Some(HiveMsg::TunnelOpen { tunnel, port, host }) => tunnels.open(tunnel, port, host, &cfg.addresses, out_tx.clone()),
                Some(HiveMsg::TunnelData { tunnel, data }) => tunnels.data(tunnel, &data),
                Some(HiveMsg::TunnelClose { tunnel }) => tunnels.close(tunnel),
                Some(HiveMsg::Refused { reason }) => return Err(AgentError::Refused(reason)),
                Some(HiveMsg::UnreadableCommand { id, error }) => {
                    let why = format!("a command this node's agent cannot read ({error}): upgrade the agent");
                    let _ = out_tx.send(AgentMsg::Reply { id, result: Err(DriverError::Unsupported(why)) });
                }
                Some(HiveMsg::Welcome { .. }) => {}
                None => return Ok(Ended::AfterWelcome),
            },
        }
    }
}

fn text<T: Serialize>(m: &T) -> Message {
    Message::text(serde_json::to_string(m).unwrap_or_default())
}

/// The next message from the hive; `None` when the connection ended. Frames that are not
/// text, or text this agent cannot read (a newer hive), are skipped, except a command with an
/// id: that becomes `UnreadableCommand`, to be answered.
async fn read<S>(rx: &mut S) -> Option<HiveMsg>
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    loop {
        match rx.next().await? {
            Ok(Message::Text(t)) => match serde_json::from_str::<HiveMsg>(&t) {
                Ok(m) => return Some(m),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable frame from the hive");
                    let frame: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                    if let (Some("command"), Some(id)) = (frame["type"].as_str(), frame["id"].as_u64()) {
                        return Some(HiveMsg::UnreadableCommand { id, error: e.to_string() });
                    }
                }
            },
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(texts: &[&str]) -> impl futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin {
        futures_util::stream::iter(texts.iter().map(|t| Ok(Message::text(t.to_string()))).collect::<Vec<_>>())
    }

    #[tokio::test]
    async fn a_command_this_agent_cannot_read_is_answered_and_other_unreadable_frames_are_skipped() {
        let mut rx = frames(&[
            r#"{"type":"something_new","x":1}"#,
            r#"{"type":"command","id":9,"cmd":{"op":"teleport","to":"mars"}}"#,
            r#"{"type":"command","id":10,"cmd":{"op":"list"}}"#,
        ]);
        match read(&mut rx).await {
            Some(HiveMsg::UnreadableCommand { id: 9, error }) => assert!(error.contains("teleport"), "{error}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(read(&mut rx).await, Some(HiveMsg::Command { id: 10, cmd: Command::List }));
        assert_eq!(read(&mut rx).await, None);
    }
}
