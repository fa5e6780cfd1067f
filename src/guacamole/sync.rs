//! `ConnectionSync`: in `rest` mode, keeps one Guacamole connection per prepared VM, following
//! the VM's life as the pool reports it (`VmHooks`):
//!
//! - prepared → the VM's connection is (re)created with its current address and VNC password,
//!   routed to the guacd on the VM's node, and granted READ to `grant_group` when one is set;
//! - released → every live session on it is ended (the user's hold is over);
//! - cleaned or killed → live sessions are ended and the connection is deleted.
//!
//! A connection is named `{pool}-vm-{vm}`. Identifiers are only cached here: after a restart,
//! or on another instance, the connection is found again by its name, so nothing needs storing.
//! One task carries out the steps in the order the pool reported them, so a link asked for
//! right after a lock waits for the connection that lock's VM was given. Guacamole failing never
//! fails a pool: each step is logged and counted, and a link answers the error.

use std::collections::HashMap;
use std::sync::Arc;

use secrecy::SecretString;
use tokio::sync::{mpsc, oneshot};

use super::{Guacamole, GuacamoleError, RestClient, VncTarget};
use crate::actors::pool::VmHooks;
use crate::domain::VmId;
use crate::domain::vm::VmAddress;

type Key = (String, VmId);

enum Op {
    Prepared { key: Key, target: VncTarget },
    Released { key: Key },
    Cleaned { key: Key },
    Link { key: Key, reply: oneshot::Sender<Result<String, GuacamoleError>> },
}

/// The pool side of the REST mode; cheap to share behind an `Arc`.
pub struct ConnectionSync {
    ops: mpsc::UnboundedSender<Op>,
}

/// The connection's name in Guacamole: what finds it again without the identifier.
pub fn connection_name(pool: &str, vm: VmId) -> String {
    format!("{pool}-vm-{vm}")
}

impl ConnectionSync {
    /// `None` unless `guacamole` is in `rest` mode. Spawns the task that talks to Guacamole; it
    /// ends when the last `ConnectionSync` is dropped.
    pub fn start(guacamole: Arc<Guacamole>, grant_group: Option<String>) -> Option<Arc<ConnectionSync>> {
        guacamole.rest()?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(guacamole, grant_group, rx));
        Some(Arc::new(ConnectionSync { ops: tx }))
    }

    /// The page of the connection of `vm` in `pool`, once the steps reported before it are done.
    pub async fn link(&self, pool: &str, vm: VmId) -> Result<String, GuacamoleError> {
        let (reply, answer) = oneshot::channel();
        self.ops
            .send(Op::Link { key: (pool.to_string(), vm), reply })
            .map_err(|_| GuacamoleError::Config("the Guacamole connection task has stopped".into()))?;
        answer.await.map_err(|_| GuacamoleError::Config("the Guacamole connection task has stopped".into()))?
    }

    fn send(&self, op: Op) {
        // Fails only while the hive shuts down, when nothing more is to be done.
        let _ = self.ops.send(op);
    }
}

impl VmHooks for ConnectionSync {
    fn prepared(&self, pool: &str, vm: VmId, address: &VmAddress) {
        // VNC is served by the hypervisor on the node (`public_ip`), next to the node's guacd.
        let target = VncTarget {
            hostname: address.public_ip.clone(),
            port: address.vnc_port,
            password: (!address.vnc_passwd.is_empty()).then(|| SecretString::from(address.vnc_passwd.clone())),
            guacd_hostname: Some(address.public_ip.clone()),
        };
        self.send(Op::Prepared { key: (pool.to_string(), vm), target });
    }

    fn released(&self, pool: &str, vm: VmId) {
        self.send(Op::Released { key: (pool.to_string(), vm) });
    }

    fn cleaned(&self, pool: &str, vm: VmId) {
        self.send(Op::Cleaned { key: (pool.to_string(), vm) });
    }
}

async fn run(guacamole: Arc<Guacamole>, grant_group: Option<String>, mut ops: mpsc::UnboundedReceiver<Op>) {
    let Some(client) = guacamole.rest() else { return };
    let mut known: HashMap<Key, String> = HashMap::new();
    while let Some(op) = ops.recv().await {
        match op {
            Op::Prepared { key, target } => {
                let r = recreate(client, &mut known, &key, &target, grant_group.as_deref()).await;
                outcome("create", &key, r);
            }
            Op::Released { key } => {
                let r = async {
                    for id in identifiers(client, &known, &key).await? {
                        client.end_sessions_of(&id).await?;
                    }
                    Ok(())
                }
                .await;
                outcome("end sessions", &key, r);
            }
            Op::Cleaned { key } => {
                let r = remove(client, &mut known, &key).await;
                outcome("delete", &key, r);
            }
            Op::Link { key, reply } => {
                let r = async {
                    let id = identifiers(client, &known, &key).await?.into_iter().next().ok_or_else(|| GuacamoleError::Answer {
                        what: "link",
                        detail: format!(
                            "VM {} of pool {} has no Guacamole connection (not prepared yet, or creating it failed)",
                            key.1, key.0
                        ),
                    })?;
                    client.link(&id).await
                }
                .await;
                let _ = reply.send(r);
            }
        }
    }
}

fn outcome(step: &'static str, key: &Key, r: Result<(), GuacamoleError>) {
    let ok = r.is_ok();
    crate::metrics::guacamole_step(step, ok);
    if let Err(e) = r {
        tracing::warn!(pool = %key.0, vm = key.1, step, error = %e, "Guacamole connection step failed");
    }
}

/// The VM's connections: the cached one, else those Guacamole has under its name.
async fn identifiers(client: &RestClient, known: &HashMap<Key, String>, key: &Key) -> Result<Vec<String>, GuacamoleError> {
    match known.get(key) {
        Some(id) => Ok(vec![id.clone()]),
        None => client.connections_named(&connection_name(&key.0, key.1)).await,
    }
}

async fn remove(client: &RestClient, known: &mut HashMap<Key, String>, key: &Key) -> Result<(), GuacamoleError> {
    for id in identifiers(client, known, key).await? {
        client.end_sessions_of(&id).await?;
        client.delete_connection(&id).await?;
    }
    known.remove(key);
    Ok(())
}

/// A prepared VM may carry a new VNC password, so its connection is made afresh.
async fn recreate(
    client: &RestClient,
    known: &mut HashMap<Key, String>,
    key: &Key,
    target: &VncTarget,
    grant_group: Option<&str>,
) -> Result<(), GuacamoleError> {
    remove(client, known, key).await?;
    let id = client.create_vnc(&connection_name(&key.0, key.1), target).await?;
    known.insert(key.clone(), id.clone());
    if let Some(group) = grant_group {
        client.grant_read(group, &id).await?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "sync_tests.rs"]
mod tests;
