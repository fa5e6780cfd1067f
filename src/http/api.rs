//! `/api/v1`: the JSON API for pools, batches, sessions and nodes. Handlers parse, call one
//! handle method and shape the answer; mutating pool administration needs the admin token.
//! Sessions are handles of a pool: `/api/v1/pools/{pool}/sessions/{id}`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use warp::http::StatusCode;

use super::auth::require_admin;
use super::error::ApiError;
use super::reply::{self, ApiResult, uint};
use crate::actors::pool::{HandleView, PoolHandle};
use crate::app::Hive;
use crate::domain::pool::{Batch, PoolSize, PoolSnapshot};
use crate::domain::vm::Vm;

/// Longest a lock may wait for its VM before answering with the pending session.
const MAX_WAIT_MS: u64 = 60_000;

#[derive(Serialize)]
pub struct VmView {
    pub id: u64,
    pub state: &'static str,
    pub state_code: u8,
    pub node: Option<u64>,
    pub batch: Option<u64>,
    pub ip: String,
    pub public_ip: String,
}

impl From<&Vm> for VmView {
    fn from(v: &Vm) -> Self {
        VmView {
            id: v.id,
            state: v.state.name(),
            state_code: v.state.code(),
            node: v.placement.as_ref().map(|p| p.node),
            batch: v.batch,
            ip: v.address.ip.clone(),
            public_ip: v.address.public_ip.clone(),
        }
    }
}

#[derive(Serialize)]
pub struct BatchView {
    pub id: u64,
    pub size: u32,
    pub home_page: String,
    pub profile_name: String,
    pub vms: Vec<u64>,
    pub cancelled: bool,
}

impl From<&Batch> for BatchView {
    fn from(b: &Batch) -> Self {
        BatchView {
            id: b.id,
            size: b.size,
            home_page: b.home_page.clone(),
            profile_name: b.profile_name.clone(),
            vms: b.vms.clone(),
            cancelled: b.mark_delete,
        }
    }
}

/// A session is what the user holds: a handle and, once assigned, how to reach its VM.
#[derive(Serialize)]
pub struct SessionView {
    pub id: u64,
    pub pool: String,
    pub batch: u64,
    pub assigned: bool,
    pub vm: Option<VmView>,
    pub vnc: Option<VncView>,
    pub expires_at: Option<u64>,
    /// When the hive ends the session by itself (the pool's longest session), if it does.
    pub ends_at: Option<u64>,
    pub created_at: u64,
}

#[derive(Serialize)]
pub struct VncView {
    pub host: String,
    pub port: u16,
    pub password: String,
}

pub(super) fn session_view(pool: &str, v: &HandleView) -> SessionView {
    SessionView {
        id: v.handle.id,
        pool: pool.to_string(),
        batch: v.handle.batch,
        assigned: v.vm.is_some(),
        vm: v.vm.as_ref().map(VmView::from),
        // VNC is served by the hypervisor on the node, not by the guest.
        vnc: v.vm.as_ref().map(|vm| VncView {
            host: vm.address.public_ip.clone(),
            port: vm.address.vnc_port,
            password: vm.address.vnc_passwd.clone(),
        }),
        expires_at: v.handle.expires_at,
        ends_at: v.ends_at,
        created_at: v.handle.created_at,
    }
}

#[derive(Serialize)]
struct PoolSummary {
    name: String,
    size: PoolSize,
    vms: BTreeMap<&'static str, usize>,
    batches: usize,
    sessions: usize,
    pending: usize,
}

fn summary(name: &str, s: &PoolSnapshot) -> PoolSummary {
    let mut vms = BTreeMap::new();
    for v in &s.vms {
        *vms.entry(v.state.name()).or_default() += 1;
    }
    PoolSummary { name: name.to_string(), size: s.size, vms, batches: s.batches.len(), sessions: s.handles.len(), pending: s.pending.len() }
}

#[derive(Serialize)]
struct PoolDetail {
    #[serde(flatten)]
    summary: PoolSummary,
    vm_list: Vec<VmView>,
    batch_list: Vec<BatchView>,
    queue: Vec<u64>,
    /// The instance that runs the pool's manager (and answered this).
    served_by: String,
}

// ---- pools --------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPool {
    name: String,
    #[serde(default)]
    min: u32,
    max: u32,
    #[serde(default)]
    linger: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    min: u32,
    max: u32,
    /// Kept as it is when absent.
    linger: Option<u64>,
}

/// Every pool, wherever its manager runs; one that cannot be reached is listed with the error
/// rather than failing the whole list.
pub async fn list_pools(hive: Hive) -> ApiResult {
    let mut out = Vec::new();
    for p in hive.pools() {
        if p.running() || hive.coordinator().kind() == "local" {
            let mut row = serde_json::to_value(summary(p.name(), &p.status().await?)).unwrap_or_default();
            row["served_by"] = hive.advertised_url().into();
            out.push(row);
            continue;
        }
        match super::forward::get_json(&hive, p.name(), &format!("/api/v1/pools/{}", p.name())).await {
            Ok(mut row) => {
                if let Some(o) = row.as_object_mut() {
                    for detail in ["vm_list", "batch_list", "queue"] {
                        o.remove(detail);
                    }
                }
                out.push(row);
            }
            Err(e) => out.push(serde_json::json!({"name": p.name(), "error": e})),
        }
    }
    Ok(reply::json(&out))
}

pub async fn create_pool(hive: Hive, auth: Option<String>, body: bytes::Bytes) -> ApiResult {
    require_admin(&hive, auth.as_deref())?;
    let b: NewPool = reply::body(&body)?;
    let p = hive.create_pool(&b.name, PoolSize { min: b.min, max: b.max, linger: b.linger }).await?;
    Ok(reply::json_status(StatusCode::CREATED, &summary(p.name(), &p.status().await?)))
}

pub async fn show_pool(hive: Hive, name: String) -> ApiResult {
    let p = hive.pool(&name)?;
    let s = p.status().await?;
    let detail = PoolDetail {
        summary: summary(&name, &s),
        vm_list: s.vms.iter().map(VmView::from).collect(),
        batch_list: s.batches.iter().map(BatchView::from).collect(),
        queue: s.preps.clone(),
        served_by: hive.advertised_url().to_string(),
    };
    Ok(reply::json(&detail))
}

pub async fn resize_pool(hive: Hive, name: String, auth: Option<String>, body: bytes::Bytes) -> ApiResult {
    require_admin(&hive, auth.as_deref())?;
    let b: Resize = reply::body(&body)?;
    let p = hive.pool(&name)?;
    let linger = match b.linger {
        Some(l) => l,
        None => p.status().await?.size.linger,
    };
    let r = p.set_size(b.min, b.max, linger).await?;
    Ok(reply::json(&serde_json::json!({"size": r.size, "clamped_from": r.clamped_from})))
}

pub async fn delete_pool(hive: Hive, name: String, auth: Option<String>) -> ApiResult {
    require_admin(&hive, auth.as_deref())?;
    hive.delete_pool(&name).await?;
    Ok(reply::no_content())
}

// ---- batches ------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBatch {
    size: u32,
    home_page: String,
}

pub async fn create_batch(hive: Hive, pool: String, body: bytes::Bytes) -> ApiResult {
    let b: NewBatch = reply::body(&body)?;
    let p = hive.pool(&pool)?;
    let id = p.prepare_batch(b.size, &b.home_page).await?;
    let batch = find_batch(&p, id).await?;
    Ok(reply::json_status(StatusCode::CREATED, &batch))
}

pub async fn list_batches(hive: Hive, pool: String) -> ApiResult {
    let s = hive.pool(&pool)?.status().await?;
    Ok(reply::json(&s.batches.iter().map(BatchView::from).collect::<Vec<_>>()))
}

pub async fn show_batch(hive: Hive, pool: String, id: String) -> ApiResult {
    let batch = find_batch(&hive.pool(&pool)?, uint("batch", &id)?).await?;
    Ok(reply::json(&batch))
}

pub async fn cancel_batch(hive: Hive, pool: String, id: String) -> ApiResult {
    hive.pool(&pool)?.cancel_batch(uint("batch", &id)?).await?;
    Ok(reply::no_content())
}

async fn find_batch(p: &PoolHandle, id: u64) -> Result<BatchView, ApiError> {
    let s = p.status().await?;
    let b = s.batches.iter().find(|b| b.id == id).ok_or(crate::domain::pool::PoolInputError::UnknownBatch(id))?;
    Ok(BatchView::from(b))
}

// ---- sessions -----------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSession {
    batch: u64,
    /// Wait up to this long for the VM before answering (0: answer at once).
    #[serde(default)]
    wait_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Extend {
    ms: u64,
}

pub async fn create_session(hive: Hive, pool: String, body: bytes::Bytes) -> ApiResult {
    let b: NewSession = reply::body(&body)?;
    if b.wait_ms > MAX_WAIT_MS {
        return Err(ApiError::bad("wait_ms", format!("at most {MAX_WAIT_MS}")));
    }
    let p = hive.pool(&pool)?;
    let handle = p.lock(b.batch).await?;
    let v = if b.wait_ms > 0 { p.wait_assigned(handle, Duration::from_millis(b.wait_ms)).await? } else { p.handle_status(handle).await? };
    Ok(reply::json_status(StatusCode::CREATED, &session_view(&pool, &v)))
}

pub async fn show_session(hive: Hive, pool: String, id: String) -> ApiResult {
    let v = hive.pool(&pool)?.handle_status(uint("session", &id)?).await?;
    Ok(reply::json(&session_view(&pool, &v)))
}

pub async fn release_session(hive: Hive, pool: String, id: String) -> ApiResult {
    hive.pool(&pool)?.release(uint("session", &id)?).await?;
    Ok(reply::no_content())
}

pub async fn extend_session(hive: Hive, pool: String, id: String, body: bytes::Bytes) -> ApiResult {
    let b: Extend = reply::body(&body)?;
    let p = hive.pool(&pool)?;
    let id = uint("session", &id)?;
    p.renew_expire(id, b.ms).await?;
    Ok(reply::json(&session_view(&pool, &p.handle_status(id).await?)))
}

// ---- nodes --------------------------------------------------------------------------------

pub async fn list_nodes(hive: Hive) -> ApiResult {
    Ok(reply::json(&hive.nodes().await?))
}

pub async fn show_node(hive: Hive, id: String) -> ApiResult {
    Ok(reply::json(&hive.node(uint("node", &id)?).await?))
}
