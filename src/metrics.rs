//! Every metric the hive exports, declared in one place with its help text. Names start with
//! `hive_`; labels come from small fixed sets (pool name, VM state, node state, actor kind,
//! route template, status class), never from ids.

use std::sync::OnceLock;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::domain::vm::VmState;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the process-wide recorder once; later calls return the same handle. `None` if
/// another recorder was installed first (then the hive still runs, without `/metrics` data).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let latency = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
            let h = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .ok()?
                .install_recorder()
                .ok()?;
            describe();
            Some(h)
        })
        .clone()
}

fn describe() {
    describe_gauge!("hive_vms", "VMs in a pool, by vmcloud state");
    describe_counter!("hive_locks_total", "Locks taken (handles created)");
    describe_counter!("hive_releases_total", "Handles released by a client");
    describe_histogram!("hive_lock_to_assigned_seconds", "Time from a lock to the handle's assignment to a VM");
    describe_counter!("hive_rule_passes_total", "Evaluations of the pool rules");
    describe_counter!("hive_actor_restarts_total", "Supervised actors restarted after a failure, by actor kind");
    describe_gauge!("hive_nodes", "Nodes, by state");
    describe_histogram!(
        "hive_instantiation_seconds",
        "Time of one instantiation step (clone, boot, snapshot, resume, revert, app), by backend"
    );
    describe_counter!("hive_http_requests_total", "HTTP requests, by route template and status class");
    describe_histogram!("hive_http_request_seconds", "HTTP request duration, by route template");
    describe_counter!("hive_store_commits_total", "Group commits to the store, by outcome");
    describe_histogram!("hive_store_commit_seconds", "Duration of one group commit");
    describe_histogram!("hive_store_commit_changes", "Row changes per group commit");
    describe_counter!("hive_coord_ops_total", "Coordinator operations (leases, VM claims), by op and outcome");
    describe_histogram!("hive_coord_op_seconds", "Coordinator operation latency (lock latency), by op");
    describe_gauge!("hive_gateway_connections", "Open gateway WebSockets (browser to a VM's VNC)");
    describe_counter!("hive_gateway_bytes_total", "Bytes the gateway piped, by direction (to_browser, to_vm)");
    describe_counter!(
        "hive_guacamole_steps_total",
        "Guacamole REST-mode connection steps (create, end sessions, delete), by outcome (ok, error)"
    );
    describe_counter!("hive_pool_lease_changes_total", "Pool leases this instance took (acquired), lost or released, by pool");
    describe_gauge!("hive_pool_leases_held", "Pools whose manager runs on this instance (1) or elsewhere (0), by pool");
    describe_counter!("hive_node_cache_reads_total", "Piece reads through the nodes' caches as their heartbeats report them, by outcome");
    describe_counter!("hive_cache_reads_total", "Piece reads through a node's cache, by outcome (local_hit, remote_hit, miss, skip)");
    describe_counter!("hive_piece_bytes_total", "Piece bytes moved between nodes and the origin, by direction (down, up)");
    describe_counter!("hive_bad_pieces_total", "Pieces discarded because they did not match their hash");
    describe_counter!("hive_image_upload_bytes_total", "Image upload bytes received and fsynced");
    describe_counter!("hive_image_uploads_total", "Image uploads ended, by outcome (complete, checksum_mismatch, aborted)");
    describe_counter!("hive_image_piece_bytes_total", "Image piece bytes served by the origin");
    describe_gauge!("hive_pool_size", "A pool's configured size, by bound (min, max)");
    describe_gauge!("hive_handles", "Handles in a pool, by state (waiting for a VM, assigned)");
    describe_gauge!("hive_images", "Images the hive holds (complete uploads)");
    describe_gauge!("hive_image_replicas", "Image replicas on nodes, by state (fetching, ready, failed)");
    describe_gauge!("hive_lifecycle_objects", "Lifecycle objects, by kind and phase");
    zero_series();
}

/// Start the series of fixed label sets at 0, so a dashboard panel of errors or restarts shows
/// 0 rather than "no data" before the first one happens.
fn zero_series() {
    for kind in ["node_registry", "pool_manager", "node", "session"] {
        counter!("hive_actor_restarts_total", "actor" => kind).increment(0);
    }
    counter!("hive_store_commits_total", "outcome" => "error").increment(0);
    for outcome in ["local_hit", "remote_hit", "miss", "skip"] {
        counter!("hive_node_cache_reads_total", "outcome" => outcome).increment(0);
    }
    for outcome in ["complete", "checksum_mismatch", "aborted"] {
        counter!("hive_image_uploads_total", "outcome" => outcome).increment(0);
    }
    counter!("hive_bad_pieces_total").increment(0);
    // Forwarding happens only with several instances; its panel reads 0, not "no data", before.
    for class in ["2xx", "5xx"] {
        counter!("hive_http_requests_total", "route" => "forwarded", "status" => class).increment(0);
    }
}

pub fn vms(pool: &str, states: impl Iterator<Item = VmState>) {
    let mut counts = [0u32; 8];
    for s in states {
        counts[s.code() as usize] += 1;
    }
    for s in VmState::ALL {
        gauge!("hive_vms", "pool" => pool.to_string(), "state" => s.name()).set(counts[s.code() as usize] as f64);
    }
}

/// A pool's configured bounds and its handles (waiting for a VM or assigned to one).
pub fn pool(pool: &str, size: crate::domain::pool::PoolSize, handles: impl Iterator<Item = bool>) {
    gauge!("hive_pool_size", "pool" => pool.to_string(), "bound" => "min").set(size.min as f64);
    gauge!("hive_pool_size", "pool" => pool.to_string(), "bound" => "max").set(size.max as f64);
    let (mut waiting, mut assigned) = (0u32, 0u32);
    for has_vm in handles {
        if has_vm { assigned += 1 } else { waiting += 1 }
    }
    gauge!("hive_handles", "pool" => pool.to_string(), "state" => "waiting").set(waiting as f64);
    gauge!("hive_handles", "pool" => pool.to_string(), "state" => "assigned").set(assigned as f64);
}

pub fn lock(pool: &str) {
    counter!("hive_locks_total", "pool" => pool.to_string()).increment(1);
}

pub fn release(pool: &str) {
    counter!("hive_releases_total", "pool" => pool.to_string()).increment(1);
}

pub fn lock_to_assigned(pool: &str, waited: std::time::Duration) {
    histogram!("hive_lock_to_assigned_seconds", "pool" => pool.to_string()).record(waited.as_secs_f64());
}

/// `total` is the pool's running count; the counter is moved up to it.
pub fn rule_passes(pool: &str, total: u64) {
    counter!("hive_rule_passes_total", "pool" => pool.to_string()).absolute(total);
}

pub fn actor_restart(kind: &'static str) {
    counter!("hive_actor_restarts_total", "actor" => kind).increment(1);
}

/// Nodes per state; every state is set (to 0 when empty) so a series never goes stale.
pub fn nodes(by_state: &std::collections::BTreeMap<&'static str, usize>) {
    for s in ["registering", "ready", "cordoned", "draining", "suspect", "dead"] {
        gauge!("hive_nodes", "state" => s).set(by_state.get(s).copied().unwrap_or(0) as f64);
    }
}

/// One instantiation step on a backend: `step` is clone, boot, snapshot, resume, revert or app;
/// `backend` is the driver's `kind()` (sim, libvirt, remote).
pub fn instantiation(backend: &'static str, step: &'static str, took: std::time::Duration) {
    histogram!("hive_instantiation_seconds", "backend" => backend, "step" => step).record(took.as_secs_f64());
}

pub fn http(route: &'static str, status: u16, secs: f64) {
    let class = match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    counter!("hive_http_requests_total", "route" => route, "status" => class).increment(1);
    if class != "5xx" {
        // Start the route's error series at 0 so an error-rate panel reads 0, not "no data".
        counter!("hive_http_requests_total", "route" => route, "status" => "5xx").increment(0);
    }
    histogram!("hive_http_request_seconds", "route" => route).record(secs);
}

pub fn store_commit(ok: bool, changes: usize, secs: f64) {
    counter!("hive_store_commits_total", "outcome" => if ok { "ok" } else { "error" }).increment(1);
    histogram!("hive_store_commit_seconds").record(secs);
    histogram!("hive_store_commit_changes").record(changes as f64);
}

/// One coordinator operation. `op`: acquire_lease, renew_lease, release_lease, check_fence,
/// claim_vm, release_vm or ping; `outcome`: ok, refused, lost, taken, unavailable or error.
pub fn coord_op(op: &'static str, outcome: &'static str, secs: f64) {
    counter!("hive_coord_ops_total", "op" => op, "outcome" => outcome).increment(1);
    histogram!("hive_coord_op_seconds", "op" => op).record(secs);
}

/// A pool's lease was `acquired`, `lost` or `released` here. Every change's series starts at 0
/// when the pool is first seen, so `increase()` counts the first change too.
pub fn lease_change(pool: &str, change: &'static str) {
    for c in ["acquired", "lost", "released"] {
        counter!("hive_pool_lease_changes_total", "pool" => pool.to_string(), "change" => c).increment(u64::from(c == change));
    }
    gauge!("hive_pool_leases_held", "pool" => pool.to_string()).set(if change == "acquired" { 1.0 } else { 0.0 });
}

/// A pool this instance does not run (yet): its series exist, at 0.
pub fn lease_seen(pool: &str) {
    for c in ["acquired", "lost", "released"] {
        counter!("hive_pool_lease_changes_total", "pool" => pool.to_string(), "change" => c).increment(0);
    }
    gauge!("hive_pool_leases_held", "pool" => pool.to_string()).increment(0.0);
}

/// A gateway WebSocket opened (+1) or closed (-1).
pub fn guacamole_step(step: &'static str, ok: bool) {
    counter!("hive_guacamole_steps_total", "step" => step, "outcome" => if ok { "ok" } else { "error" }).increment(1);
}

pub fn gateway_open(delta: i64) {
    gauge!("hive_gateway_connections").increment(delta as f64);
}

pub fn gateway_bytes(direction: &'static str, n: usize) {
    counter!("hive_gateway_bytes_total", "direction" => direction).increment(n as u64);
}

pub fn images(count: usize) {
    gauge!("hive_images").set(count as f64);
}

/// Replicas per state over all nodes; every state is set so a series never goes stale.
pub fn image_replicas(fetching: usize, ready: usize, failed: usize) {
    for (state, n) in [("fetching", fetching), ("ready", ready), ("failed", failed)] {
        gauge!("hive_image_replicas", "state" => state).set(n as f64);
    }
}

/// Lifecycle objects per kind and phase (every pair set, 0 when empty).
pub fn lifecycle_objects(objects: impl Iterator<Item = (crate::domain::lifecycle::Kind, crate::domain::lifecycle::Phase)>) {
    use crate::domain::lifecycle::{Kind, Phase};
    let mut counts = std::collections::HashMap::<(Kind, Phase), u32>::new();
    for o in objects {
        *counts.entry(o).or_default() += 1;
    }
    for k in Kind::ALL {
        for p in Phase::ALL {
            let n = counts.get(&(k, p)).copied().unwrap_or(0);
            gauge!("hive_lifecycle_objects", "kind" => k.name(), "phase" => p.name()).set(n as f64);
        }
    }
}

pub fn image_bytes_received(n: u64) {
    counter!("hive_image_upload_bytes_total").increment(n);
}

/// `outcome`: "complete", "checksum_mismatch" or "aborted".
pub fn image_upload(outcome: &'static str) {
    counter!("hive_image_uploads_total", "outcome" => outcome).increment(1);
}

pub fn image_piece_served(bytes: u64) {
    counter!("hive_image_piece_bytes_total").increment(bytes);
}

/// The hive's view of its nodes' caches: the growth of each node's read counters between two
/// heartbeats, summed over nodes (a counter that went down means the agent restarted).
pub fn cache_reads_reported(old: &crate::agent::proto::CacheCounters, new: &crate::agent::proto::CacheCounters) {
    let delta = |o: u64, n: u64| if n >= o { n - o } else { n };
    for (outcome, d) in [
        ("local_hit", delta(old.local_hit, new.local_hit)),
        ("remote_hit", delta(old.remote_hit, new.remote_hit)),
        ("miss", delta(old.miss, new.miss)),
        ("skip", delta(old.skip, new.skip)),
    ] {
        if d > 0 {
            counter!("hive_node_cache_reads_total", "outcome" => outcome).increment(d);
        }
    }
}

/// `outcome`: local_hit, remote_hit, miss or skip.
pub fn cache_read(outcome: &'static str) {
    counter!("hive_cache_reads_total", "outcome" => outcome).increment(1);
}

/// `direction`: down (fetched by this node) or up (served to a peer).
pub fn piece_bytes(direction: &'static str, bytes: u64) {
    counter!("hive_piece_bytes_total", "direction" => direction).increment(bytes);
}

pub fn bad_piece() {
    counter!("hive_bad_pieces_total").increment(1);
}
