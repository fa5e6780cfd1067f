//! The agent's end of the hive's tunnels (`HiveMsg::TunnelOpen`): a TCP stream on this host,
//! usually to a VM's VNC, whose bytes travel over the agent's one WebSocket, so the hive reaches
//! a desktop on a node behind NAT. Each tunnel is a task that owns its stream; the connection
//! keeps a sender per tunnel. Dropping the sender (the hive closed it, or the connection to the
//! hive dropped and with it the whole map) ends the task and the stream.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::proto::AgentMsg;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The open tunnels of one connection to the hive.
#[derive(Default)]
pub struct Tunnels {
    open: HashMap<u64, mpsc::UnboundedSender<Vec<u8>>>,
}

impl Tunnels {
    /// Open tunnel `id` to `port` on loopback, or on `host` if that is one of `own` (the
    /// addresses this node reports); replies (data, close) go to `out`.
    pub fn open(&mut self, id: u64, port: u16, host: Option<String>, own: &[String], out: mpsc::UnboundedSender<AgentMsg>) {
        // Tunnels that ended on this side are forgotten here, so the map stays small.
        self.open.retain(|_, t| !t.is_closed());
        let mut targets = vec![format!("127.0.0.1:{port}")];
        match host {
            Some(h) if own.contains(&h) && !is_loopback(&h) => {
                targets.push(if h.contains(':') { format!("[{h}]:{port}") } else { format!("{h}:{port}") })
            }
            Some(h) if !own.contains(&h) && !is_loopback(&h) => {
                let _ = out.send(AgentMsg::TunnelClose { tunnel: id, error: Some(format!("{h} is not an address of this node")) });
                return;
            }
            _ => {}
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.open.insert(id, tx);
        tokio::spawn(run(id, targets, rx, out));
    }

    /// Bytes (base64) from the hive for tunnel `id`; unknown or ended tunnels drop them.
    pub fn data(&mut self, id: u64, data: &str) {
        let Ok(bytes) = STANDARD.decode(data) else {
            tracing::warn!(tunnel = id, "tunnel data is not base64; closing the tunnel");
            self.open.remove(&id);
            return;
        };
        if self.open.get(&id).is_some_and(|t| t.send(bytes).is_err()) {
            self.open.remove(&id);
        }
    }

    pub fn close(&mut self, id: u64) {
        self.open.remove(&id);
    }
}

fn is_loopback(h: &str) -> bool {
    h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

async fn connect(targets: &[String]) -> Result<TcpStream, String> {
    let mut last = String::from("no address");
    for t in targets {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(t)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = format!("{t}: {e}"),
            Err(_) => last = format!("{t}: no answer"),
        }
    }
    Err(last)
}

async fn run(id: u64, targets: Vec<String>, mut rx: mpsc::UnboundedReceiver<Vec<u8>>, out: mpsc::UnboundedSender<AgentMsg>) {
    let stream = match connect(&targets).await {
        Ok(s) => s,
        Err(e) => {
            let _ = out.send(AgentMsg::TunnelClose { tunnel: id, error: Some(e) });
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut r, mut w) = stream.into_split();
    let mut buf = vec![0u8; 64 * 1024];
    let error = loop {
        tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(0) => break None,
                Ok(n) => {
                    if out.send(AgentMsg::TunnelData { tunnel: id, data: STANDARD.encode(&buf[..n]) }).is_err() {
                        return;
                    }
                }
                Err(e) => break Some(e.to_string()),
            },
            bytes = rx.recv() => match bytes {
                // The hive closed its end, or the connection to it is gone.
                None => return,
                Some(b) => {
                    if let Err(e) = w.write_all(&b).await {
                        break Some(e.to_string());
                    }
                }
            },
        }
    };
    let _ = out.send(AgentMsg::TunnelClose { tunnel: id, error });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_hive_cannot_make_the_agent_connect_elsewhere() {
        let (out, mut rx) = mpsc::unbounded_channel();
        let mut t = Tunnels::default();
        t.open(1, 22, Some("10.9.9.9".into()), &["192.0.2.1".into()], out);
        match rx.recv().await {
            Some(AgentMsg::TunnelClose { tunnel: 1, error: Some(e) }) => assert!(e.contains("not an address of this node"), "{e}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(t.open.is_empty());
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_eof_closes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"hello").await.unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            buf
        });
        let (out, mut rx) = mpsc::unbounded_channel();
        let mut t = Tunnels::default();
        // The node's own (unreachable) address is allowed, but loopback is tried first.
        t.open(7, port, Some("192.0.2.1".into()), &["192.0.2.1".into()], out);
        match rx.recv().await {
            Some(AgentMsg::TunnelData { tunnel: 7, data }) => assert_eq!(STANDARD.decode(data).unwrap(), b"hello"),
            other => panic!("expected data, got {other:?}"),
        }
        t.data(7, &STANDARD.encode(b"ping"));
        assert_eq!(&server.await.unwrap(), b"ping");
        assert!(matches!(rx.recv().await, Some(AgentMsg::TunnelClose { tunnel: 7, error: None })));
    }
}
