//! `/api/v1/live`: the whole hive for the monitor page, pushed over Server-Sent Events. One
//! event `state` at once — every pool (size, VMs by state, batches, handles), every node
//! (capacity, health, admin state) and every image with its replicas — then another after any
//! pool's durable change, whenever the nodes' health or admin state changes (checked each
//! second), and at least once per node heartbeat interval so heartbeat ages stay current.
//! Events are coalesced to at most five a second. The page never polls; this stream does the
//! looking, once per connected page.
//!
//! The payload is built by plain functions over snapshots (`pool_row`, `image_rows`,
//! `state_body`, `fingerprint`) so its shape is tested without a server.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::future::{self, BoxFuture, FutureExt};
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::reply::{Reply, Response};

use super::api::{BatchView, VmView};
use super::with_hive;
use crate::actors::pool::PoolHandle;
use crate::app::Hive;
use crate::domain::pool::PoolSnapshot;
use crate::images::ImageView;

/// At most five events a second.
const MIN_GAP: Duration = Duration::from_millis(200);
/// How often the nodes are looked at for a change of health or admin state.
const NODE_CHECK: Duration = Duration::from_secs(1);

pub fn routes(hive: Hive) -> BoxedFilter<(Response,)> {
    let live = warp::path!("api" / "v1" / "live").and(warp::get()).and(with_hive(hive)).map(live);
    live.boxed()
}

fn live(hive: Hive) -> Response {
    // The feed runs in its own task (warp wants a `Sync` stream; the store's futures are not)
    // and stops when the page goes away.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Value>(1);
    tokio::spawn(async move {
        let mut feed = Feed::new(hive);
        loop {
            let body = tokio::select! {
                body = feed.next() => body,
                _ = tx.closed() => return,
            };
            if tx.send(body).await.is_err() {
                return;
            }
        }
    });
    let events = stream::poll_fn(move |cx| rx.poll_recv(cx))
        .filter_map(|body| future::ready(warp::sse::Event::default().event("state").json_data(body).ok()))
        .map(Ok::<_, std::convert::Infallible>);
    warp::sse::reply(warp::sse::keep_alive().stream(events)).into_response()
}

// ---- the payload --------------------------------------------------------------------------

/// One pool as the page shows it.
pub(super) fn pool_row(name: &str, served_by: &str, s: &PoolSnapshot) -> Value {
    let mut vms: BTreeMap<&str, usize> = BTreeMap::new();
    for v in &s.vms {
        *vms.entry(v.state.name()).or_default() += 1;
    }
    json!({
        "name": name,
        "size": s.size,
        "vms": vms,
        "vm_list": s.vms.iter().map(VmView::from).collect::<Vec<_>>(),
        "batches": s.batches.iter().map(BatchView::from).collect::<Vec<_>>(),
        "handles": s.handles.iter().map(|h| json!({
            "id": h.id, "batch": h.batch, "vm": h.vm, "expires_at": h.expires_at, "created_at": h.created_at,
        })).collect::<Vec<_>>(),
        "queue": s.preps,
        "pending": s.pending.len(),
        "served_by": served_by,
    })
}

/// A pool whose manager runs on another instance, from that instance's `/api/v1/pools/{pool}`.
/// Its handles are not part of that answer: `handles` is null (unknown), not empty.
fn remote_pool_row(name: &str, mut detail: Value) -> Value {
    let take = |d: &mut Value, k: &str| d.get_mut(k).map(Value::take).unwrap_or(Value::Null);
    json!({
        "name": name,
        "size": take(&mut detail, "size"),
        "vms": take(&mut detail, "vms"),
        "vm_list": take(&mut detail, "vm_list"),
        "batches": take(&mut detail, "batch_list"),
        "handles": Value::Null,
        "queue": take(&mut detail, "queue"),
        "pending": take(&mut detail, "pending"),
        "served_by": take(&mut detail, "served_by"),
    })
}

/// Every image with the nodes that hold it, are fetching it or failed to (from the nodes'
/// own view, the same source as `GET /api/v1/images/{sha}/replicas`).
pub(super) fn image_rows(images: &[ImageView], nodes: &[Value]) -> Vec<Value> {
    images
        .iter()
        .map(|i| {
            let replicas: Vec<Value> = nodes
                .iter()
                .filter_map(|n| {
                    let r = n.get("images")?.get(&i.sha256)?;
                    let mut row = json!({"node": n["id"], "node_name": n["name"]});
                    row["state"] = r.get("state").cloned().unwrap_or(Value::Null);
                    if let Some(e) = r.get("error") {
                        row["error"] = e.clone();
                    }
                    Some(row)
                })
                .collect();
            let mut row = serde_json::to_value(i).unwrap_or_default();
            row["replicas"] = replicas.into();
            row
        })
        .collect()
}

/// The event's body. A part that could not be read is empty and its error is named
/// (`nodes_error`, `images_error`) rather than failing the whole event.
pub(super) fn state_body(now: u64, pools: &[Value], nodes: &Result<Vec<Value>, String>, images: &Result<Vec<ImageView>, String>) -> Value {
    let node_list = nodes.as_deref().unwrap_or_default();
    let mut body = json!({
        "now": now,
        "pools": pools,
        "nodes": node_list,
        "images": images.as_deref().map(|i| image_rows(i, node_list)).unwrap_or_default(),
    });
    if let Err(e) = nodes {
        body["nodes_error"] = e.as_str().into();
    }
    if let Err(e) = images {
        body["images_error"] = e.as_str().into();
    }
    body
}

/// The body without what moves on its own with the clock (heartbeat ages, scores, uptime,
/// host counters): a change here is worth an event between the heartbeat-interval ones.
pub(super) fn fingerprint(body: &Value) -> Value {
    let mut f = body.clone();
    if let Some(o) = f.as_object_mut() {
        o.remove("now");
    }
    if let Some(nodes) = f.get_mut("nodes").and_then(Value::as_array_mut) {
        for n in nodes.iter_mut().filter_map(Value::as_object_mut) {
            for k in ["heartbeat_age_ms", "last_heartbeat_at", "score", "uptime", "host", "cache"] {
                n.remove(k);
            }
        }
    }
    f
}

// ---- the feed -----------------------------------------------------------------------------

/// One connected page's view: what it was last sent, and what it is waiting on.
struct Feed {
    hive: Hive,
    /// Every pool's change counter; re-listed when the set of pools changes.
    watched: Vec<(PoolHandle, watch::Receiver<u64>)>,
    pools: Vec<Value>,
    nodes: Result<Vec<Value>, String>,
    images: Result<Vec<ImageView>, String>,
    tick: tokio::time::Interval,
    /// Send at least this often (the node heartbeat interval).
    refresh: Duration,
    /// When the last event went, and its fingerprint; None before the first.
    last: Option<(Instant, Value)>,
    /// When everything (images, pools on other instances) was last read: busy pools keep
    /// events coming, and must not keep the rest from being read again.
    full_at: Instant,
}

impl Feed {
    fn new(hive: Hive) -> Feed {
        let refresh = Duration::from_millis(hive.config().node.heartbeat_ms.max(1));
        let mut tick = tokio::time::interval(NODE_CHECK.min(refresh));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Feed {
            hive,
            watched: Vec::new(),
            pools: Vec::new(),
            nodes: Ok(Vec::new()),
            images: Ok(Vec::new()),
            tick,
            refresh,
            last: None,
            full_at: Instant::now(),
        }
    }

    /// The next event's body: at once the first time, then after a change worth showing.
    async fn next(&mut self) -> Value {
        let Some((sent_at, _)) = &self.last else {
            self.tick.reset();
            self.refresh_all().await;
            return self.send();
        };
        let sent_at = *sent_at;
        loop {
            let woken_by = self.wait().await;
            tokio::time::sleep_until(sent_at + MIN_GAP).await;
            let relisted = self.pools_changed();
            // Whatever changed while coalescing is in this event; only those pools are read again.
            let changed: Vec<bool> = (self.watched.iter_mut().enumerate())
                .map(|(i, (_, rx))| {
                    let c = woken_by == Some(i) || rx.has_changed().unwrap_or(true);
                    rx.borrow_and_update();
                    c
                })
                .collect();
            let pool_changed = !relisted && changed.contains(&true);
            let due = self.full_at.elapsed() + NODE_CHECK / 2 >= self.refresh;
            if due {
                self.refresh_all().await;
            } else {
                if relisted || pool_changed {
                    self.refresh_pools((!relisted).then_some(changed.as_slice())).await;
                }
                self.refresh_nodes().await;
            }
            let fresh = fingerprint(&self.body());
            if pool_changed || relisted || due || self.last.as_ref().is_none_or(|(_, f)| *f != fresh) {
                return self.send();
            }
        }
    }

    fn body(&self) -> Value {
        state_body(self.hive.now(), &self.pools, &self.nodes, &self.images)
    }

    fn send(&mut self) -> Value {
        let body = self.body();
        self.last = Some((Instant::now(), fingerprint(&body)));
        body
    }

    /// Until a pool changes (its index) or the node check is due (None).
    async fn wait(&mut self) -> Option<usize> {
        let Feed { watched, tick, .. } = self;
        let changes: Vec<BoxFuture<'_, _>> = watched.iter_mut().map(|(_, rx)| rx.changed().boxed()).collect();
        let any_change = async move {
            if changes.is_empty() {
                future::pending::<()>().await;
            }
            future::select_all(changes).await.1
        };
        tokio::select! {
            i = any_change => Some(i),
            _ = tick.tick() => None,
        }
    }

    /// Has a pool been created or deleted since the last look? Then watch the new set.
    fn pools_changed(&mut self) -> bool {
        let now = self.hive.pools();
        let same = now.len() == self.watched.len() && now.iter().zip(&self.watched).all(|(a, (b, _))| a.name() == b.name());
        if !same {
            self.watched = now.into_iter().map(|p| (p.clone(), p.subscribe())).collect();
            for (_, rx) in &mut self.watched {
                rx.borrow_and_update();
            }
        }
        !same
    }

    async fn refresh_all(&mut self) {
        self.full_at = Instant::now();
        self.pools_changed();
        self.refresh_pools(None).await;
        self.refresh_nodes().await;
        self.images = self.hive.images().list().await.map_err(|e| e.to_string());
    }

    async fn refresh_nodes(&mut self) {
        self.nodes = match self.hive.nodes().await {
            Ok(list) => Ok(list.iter().map(|n| serde_json::to_value(n).unwrap_or_default()).collect()),
            Err(e) => Err(e.to_string()),
        };
    }

    /// Read the pools again (`only`: those marked). Pools this instance runs are read from
    /// their managers; the others (several instances) from the instance that runs them, as
    /// `GET /api/v1/pools` does.
    async fn refresh_pools(&mut self, only: Option<&[bool]>) {
        let only = only.filter(|_| self.pools.len() == self.watched.len());
        let local = self.hive.coordinator().kind() == "local";
        let me = self.hive.advertised_url().to_string();
        let mut rows = Vec::with_capacity(self.watched.len());
        for (i, (p, _)) in self.watched.iter().enumerate() {
            if only.is_some_and(|o| !o[i]) {
                rows.push(self.pools[i].take());
                continue;
            }
            let row = if p.running() || local {
                match p.status().await {
                    Ok(s) => pool_row(p.name(), &me, &s),
                    Err(e) => json!({"name": p.name(), "error": e.to_string()}),
                }
            } else {
                match super::forward::get_json(&self.hive, p.name(), &format!("/api/v1/pools/{}", p.name())).await {
                    Ok(detail) => remote_pool_row(p.name(), detail),
                    Err(e) => json!({"name": p.name(), "error": e}),
                }
            };
            rows.push(row);
        }
        self.pools = rows;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::pool::{Batch, Handle, PoolSize};
    use crate::domain::vm::{Vm, VmState};

    fn image(sha: &str, name: &str) -> ImageView {
        ImageView {
            sha256: sha.into(),
            name: name.into(),
            readme: String::new(),
            cores: 1,
            ram_mb: 512,
            disk_mb: 1024,
            size: 4096,
            piece_size: 1024,
            pieces: 4,
            created_at: 1,
        }
    }

    #[test]
    fn a_pool_row_counts_vms_by_state_and_lists_batches_and_handles() {
        let mut s = PoolSnapshot { size: PoolSize { min: 2, max: 5, linger: 900 }, ..Default::default() };
        for (id, state) in [(1, VmState::Ready), (2, VmState::Ready), (3, VmState::Booting)] {
            let mut vm = Vm::new(id, 0);
            vm.state = state;
            s.vms.push(vm);
        }
        s.batches.push(Batch {
            id: 7,
            size: 2,
            profile_name: "p".into(),
            home_page: "https://x".into(),
            vms: vec![1, 2],
            mark_delete: false,
        });
        s.handles.push(Handle { id: 9, batch: 7, vm: Some(1), expires_at: None, created_at: 5 });
        let row = pool_row("default", "http://me", &s);
        assert_eq!(row["name"], "default");
        assert_eq!(row["size"], json!({"min": 2, "max": 5, "linger": 900}));
        assert_eq!(row["vms"], json!({"ready": 2, "booting": 1}));
        assert_eq!(row["vm_list"].as_array().map(Vec::len), Some(3));
        assert_eq!(row["batches"][0]["id"], 7);
        assert_eq!(row["batches"][0]["cancelled"], false);
        assert_eq!(row["handles"], json!([{"id": 9, "batch": 7, "vm": 1, "expires_at": null, "created_at": 5}]));
        assert_eq!(row["served_by"], "http://me");
    }

    #[test]
    fn images_carry_their_replicas_from_the_nodes_view() {
        let nodes = vec![
            json!({"id": 1, "name": "a", "images": {"aa": {"state": "ready", "report": null}}}),
            json!({"id": 2, "name": "b", "images": {"aa": {"state": "failed", "error": "disk full"}, "bb": {"state": "fetching"}}}),
            json!({"id": 3, "name": "c", "images": {}}),
        ];
        let rows = image_rows(&[image("aa", "debian"), image("cc", "none")], &nodes);
        assert_eq!(rows[0]["name"], "debian");
        assert_eq!(
            rows[0]["replicas"],
            json!([
                {"node": 1, "node_name": "a", "state": "ready"},
                {"node": 2, "node_name": "b", "state": "failed", "error": "disk full"},
            ])
        );
        assert_eq!(rows[1]["replicas"], json!([]));
    }

    #[test]
    fn a_part_that_cannot_be_read_is_named_not_fatal() {
        let body = state_body(10, &[], &Err("registry down".into()), &Err("no image store".into()));
        assert_eq!(body["nodes"], json!([]));
        assert_eq!(body["images"], json!([]));
        assert_eq!(body["nodes_error"], "registry down");
        assert_eq!(body["images_error"], "no image store");
        assert_eq!(state_body(10, &[], &Ok(vec![]), &Ok(vec![])).get("nodes_error"), None);
    }

    #[test]
    fn the_fingerprint_ignores_what_moves_with_the_clock_only() {
        let node = |age: u64, state: &str| json!({"id": 1, "state": state, "heartbeat_age_ms": age, "score": 0.5, "uptime": 1.0});
        let body = |now: u64, n: Value| state_body(now, &[], &Ok(vec![n]), &Ok(vec![]));
        let a = fingerprint(&body(1, node(100, "ready")));
        assert_eq!(a, fingerprint(&body(2, node(900, "ready"))), "time passing alone is not a change");
        assert_ne!(a, fingerprint(&body(2, node(900, "suspect"))), "a health change is");
    }
}
