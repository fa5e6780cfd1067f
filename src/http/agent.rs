//! The agents' WebSocket (`GET /api/v1/agent`). The credential is checked before the upgrade
//! (a bad one gets 401 and the JSON envelope, not a socket). The first frame must be the
//! agent's `Hello` (within `HELLO_TIMEOUT`); the registry attaches the connection and the hive
//! answers `Welcome`. After that frames flow both ways until either side closes; the registry
//! is told when the connection ends, and every command still waiting on it fails.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::filters::ws::{Message, WebSocket, Ws};
use warp::reply::Response;

use super::error::ApiError;
use super::{auth, with_hive};
use crate::actors::node::NodeError;
use crate::agent::proto::{AgentMsg, HiveMsg};
use crate::app::Hive;
use crate::domain::NodeId;
use crate::drivers::remote::AgentLink;
use crate::membership::MembershipError;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub fn route(hive: Hive) -> BoxedFilter<(Response,)> {
    warp::path!("api" / "v1" / "agent")
        .and(warp::get())
        .and(with_hive(hive))
        .and(auth())
        .and(warp::ws())
        .then(|hive: Hive, token: Option<String>, ws: Ws| async move {
            let credential = token.as_deref().and_then(|t| t.strip_prefix("Bearer ")).unwrap_or("");
            match hive.authenticate_agent(credential).await {
                Ok(node) => warp::Reply::into_response(ws.on_upgrade(move |socket| connection(hive, node, socket))),
                Err(e) => {
                    if matches!(e, MembershipError::BadCredential) {
                        tracing::warn!("agent connection refused: bad credential");
                    }
                    ApiError::from(e).into_response()
                }
            }
        })
        .boxed()
}

fn frame(msg: &HiveMsg) -> Message {
    Message::text(serde_json::to_string(msg).unwrap_or_default())
}

async fn connection(hive: Hive, node: NodeId, ws: WebSocket) {
    let (mut tx, mut rx) = ws.split();
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, rx.next()).await {
        Ok(Some(Ok(m))) => m.to_str().ok().and_then(|t| serde_json::from_str::<AgentMsg>(t).ok()),
        _ => None,
    };
    let Some(AgentMsg::Hello(hello)) = hello else {
        // No hello in time (a slow host, a lost frame): close without refusing, so the agent
        // backs off and tries again.
        tracing::warn!(node.id = node, "no hello from the agent; closing");
        let _ = tx.close().await;
        return;
    };
    let registry = hive.nodes_handle().clone();
    let (link, mut out) = AgentLink::new();
    match registry.attach(node, hello, link.clone()).await {
        Ok(heartbeat_ms) => {
            link.send(HiveMsg::Welcome { node_id: node, heartbeat_ms });
        }
        Err(e) => {
            // Refuse for good only what retrying cannot mend; a busy or restarting registry
            // just closes the socket (and undoes the attach if it happened after all).
            if matches!(e, NodeError::Invalid { .. } | NodeError::UnknownNode(_)) {
                tracing::warn!(node.id = node, error = %e, "agent refused");
                let _ = tx.send(frame(&HiveMsg::Refused { reason: e.to_string() })).await;
            } else {
                tracing::warn!(node.id = node, error = %e, "cannot attach the agent now; closing");
            }
            let _ = tx.close().await;
            registry.detach(node, link);
            return;
        }
    }
    loop {
        tokio::select! {
            msg = out.recv() => {
                let Some(msg) = msg else { break };
                let last = matches!(msg, HiveMsg::Refused { .. });
                if tx.send(frame(&msg)).await.is_err() || last {
                    break;
                }
            }
            incoming = rx.next() => match incoming {
                Some(Ok(m)) if m.is_text() => match m.to_str().map(serde_json::from_str::<AgentMsg>) {
                    Ok(Ok(AgentMsg::Heartbeat { stats, cache, stock, scratch_free, .. })) => {
                        hive.migrations().scratch_free(node, scratch_free);
                        registry.heartbeat(node, stats, cache, stock)
                    }
                    Ok(Ok(AgentMsg::MigrationStep { job, event, percent })) => {
                        let m = hive.migrations().clone();
                        tokio::spawn(async move { m.step(node, job, event, percent).await });
                    }
                    Ok(Ok(AgentMsg::Reply { id, result })) => link.complete(id, result),
                    Ok(Ok(AgentMsg::TunnelData { tunnel, data })) => link.tunnel_data(tunnel, &data),
                    Ok(Ok(AgentMsg::TunnelClose { tunnel, error })) => link.tunnel_closed(tunnel, error),
                    Ok(Ok(AgentMsg::Hello(_))) => tracing::warn!(node.id = node, "second hello on one connection ignored"),
                    Ok(Err(e)) => tracing::warn!(node.id = node, error = %e, "unreadable frame from agent"),
                    Err(()) => {}
                },
                Some(Ok(m)) if m.is_close() => break,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    let _ = tx.close().await;
    registry.detach(node, link);
}
