//! The vmcloud REST API, byte-compatible with the original on success (specs/vmcloud.md), and
//! stricter on bad input: 400/404 with the JSON error envelope instead of silent 200s and stack
//! traces. These routes act on the pool named `default`.

use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use super::error::ApiError;
use super::reply::{self, ApiResult, uint};
use crate::actors::pool::{HandleView, PoolHandle};
use crate::app::Hive;
use crate::domain::pool::{Batch, Handle, PendingLock, PoolSize, PoolSnapshot};
use crate::domain::vm::Vm;

/// How long `/fetch-events` holds a poll open.
const LONG_POLL: Duration = Duration::from_secs(5);

fn default_pool(hive: &Hive) -> Result<PoolHandle, ApiError> {
    Ok(hive.pool("default")?)
}

// ---- wire shapes (field order is the wire format) -----------------------------------------

#[derive(Serialize)]
pub struct WireVm<'a> {
    vmid: u64,
    state: u8,
    ip: &'a str,
    public_ip: &'a str,
    vnc_passwd: &'a str,
}

impl<'a> From<&'a Vm> for WireVm<'a> {
    fn from(v: &'a Vm) -> Self {
        WireVm { vmid: v.id, state: v.state.code(), ip: &v.address.ip, public_ip: &v.address.public_ip, vnc_passwd: &v.address.vnc_passwd }
    }
}

#[derive(Serialize)]
struct WireBatchData<'a> {
    profile_name: &'a str,
    home_page: &'a str,
}

#[derive(Serialize)]
struct WireBatch<'a> {
    id: u64,
    size: u32,
    data: WireBatchData<'a>,
    vms: &'a [u64],
    #[serde(rename = "markDelete")]
    mark_delete: bool,
}

impl<'a> From<&'a Batch> for WireBatch<'a> {
    fn from(b: &'a Batch) -> Self {
        WireBatch {
            id: b.id,
            size: b.size,
            data: WireBatchData { profile_name: &b.profile_name, home_page: &b.home_page },
            vms: &b.vms,
            mark_delete: b.mark_delete,
        }
    }
}

#[derive(Serialize)]
struct WireHandle {
    handle: u64,
    assigned: bool,
    /// `null` until assigned.
    vmid: Option<u64>,
}

impl From<&Handle> for WireHandle {
    fn from(h: &Handle) -> Self {
        WireHandle { handle: h.id, assigned: h.vm.is_some(), vmid: h.vm }
    }
}

#[derive(Serialize)]
struct WirePending {
    #[serde(rename = "batchId")]
    batch_id: u64,
    handle: u64,
}

impl From<&PendingLock> for WirePending {
    fn from(p: &PendingLock) -> Self {
        WirePending { batch_id: p.batch, handle: p.handle }
    }
}

#[derive(Serialize)]
struct AllStatus<'a> {
    vms: Vec<WireVm<'a>>,
    batches: Vec<WireBatch<'a>>,
    preps: &'a [u64],
    handles: Vec<WireHandle>,
    #[serde(rename = "pendingLocks")]
    pending_locks: Vec<WirePending>,
    #[serde(rename = "poolSize")]
    pool_size: PoolSize,
}

pub fn all_status_body(s: &PoolSnapshot) -> serde_json::Value {
    let body = AllStatus {
        vms: s.vms.iter().map(WireVm::from).collect(),
        batches: s.batches.iter().map(WireBatch::from).collect(),
        preps: &s.preps,
        handles: s.handles.iter().map(WireHandle::from).collect(),
        pending_locks: s.pending.iter().map(WirePending::from).collect(),
        pool_size: s.size,
    };
    serde_json::to_value(body).unwrap_or_default()
}

#[derive(Serialize)]
struct Assigned<'a> {
    assigned: bool,
    vmid: u64,
    vm: WireVm<'a>,
    expires: bool,
    #[serde(rename = "expireTime")]
    expire_time: Option<u64>,
}

pub fn handle_status_body(v: &HandleView) -> serde_json::Value {
    match &v.vm {
        Some(vm) => serde_json::to_value(Assigned {
            assigned: true,
            vmid: vm.id,
            vm: WireVm::from(vm),
            expires: v.handle.expires_at.is_some(),
            expire_time: v.handle.expires_at,
        })
        .unwrap_or_default(),
        None => json!({"assigned": false}),
    }
}

// ---- handlers -----------------------------------------------------------------------------

pub async fn set_pool_size(hive: Hive, min: String, max: String, linger: String) -> ApiResult {
    let (min, max, linger) = (uint("min", &min)?, uint("max", &max)?, uint("linger", &linger)?);
    let r = default_pool(&hive)?.set_size(min, max, linger).await?;
    let mut resp = reply::empty();
    if let Some(asked) = r.clamped_from {
        let lowered = if r.size.min < min { format!("; min lowered from {min} to {}", r.size.min) } else { String::new() };
        let warning = format!("299 hive \"max clamped from {asked} to {} (pool.max_cap){lowered}\"", r.size.max);
        if let Ok(v) = warning.parse() {
            resp.headers_mut().insert("warning", v);
        }
    }
    Ok(resp)
}

pub async fn prepare_batch(hive: Hive, size: String, home_page: String) -> ApiResult {
    let size = uint("size", &size)?;
    let home_page = percent_encoding::percent_decode_str(&home_page)
        .decode_utf8()
        .map_err(|_| ApiError::bad("homepage", "is not valid UTF-8 once URL-decoded"))?;
    let id = default_pool(&hive)?.prepare_batch(size, &home_page).await?;
    Ok(reply::text(id.to_string()))
}

pub async fn lock(hive: Hive, batch: String) -> ApiResult {
    let batch = uint("batch", &batch)?;
    let handle = default_pool(&hive)?.lock(batch).await?;
    Ok(reply::text(handle.to_string()))
}

pub async fn release(hive: Hive, handle: String) -> ApiResult {
    default_pool(&hive)?.release(uint("handle", &handle)?).await?;
    Ok(reply::empty())
}

pub async fn handle_status(hive: Hive, handle: String) -> ApiResult {
    let v = default_pool(&hive)?.handle_status(uint("handle", &handle)?).await?;
    Ok(reply::json(&handle_status_body(&v)))
}

pub async fn cancel_batch(hive: Hive, batch: String) -> ApiResult {
    default_pool(&hive)?.cancel_batch(uint("batch", &batch)?).await?;
    Ok(reply::empty())
}

pub async fn renew_expire(hive: Hive, handle: String, ms: String) -> ApiResult {
    let (handle, ms) = (uint("handle", &handle)?, uint("ms", &ms)?);
    default_pool(&hive)?.renew_expire(handle, ms).await?;
    Ok(reply::json(&json!({})))
}

pub async fn all_status(hive: Hive) -> ApiResult {
    let s = default_pool(&hive)?.status().await?;
    Ok(reply::json(&all_status_body(&s)))
}

pub async fn last_event_id(hive: Hive, handle: String) -> ApiResult {
    let handle = uint("handle", &handle)?;
    let id = default_pool(&hive)?.events().last_id(handle).ok_or_else(invalid_handle)?;
    Ok(reply::text(id.to_string()))
}

pub async fn fetch_events(hive: Hive, handle: String, last: String) -> ApiResult {
    let handle = uint("handle", &handle)?;
    let last: i64 = last.parse().map_err(|_| ApiError::bad("lastid", format!("must be an integer (got {last:?})")))?;
    // An unknown handle gets the original's answer: the spec keeps it, and clients test
    // `data.error` on a 200.
    match default_pool(&hive)?.events().fetch(handle, last, LONG_POLL).await {
        Some((last_id, events)) => Ok(reply::json(&json!({"lastId": last_id, "newEvents": events}))),
        None => Ok(reply::json(&json!({"error": "Invalid handle"}))),
    }
}

fn invalid_handle() -> ApiError {
    ApiError::NotFound { code: "unknown_handle", message: "Invalid handle".into() }
}

/// Releases every handle, cancels every batch, sets the pool to 0/0/0; answers when done.
pub async fn shutdown(hive: Hive, auth: Option<String>) -> ApiResult {
    super::auth::require_admin(&hive, auth.as_deref())?;
    default_pool(&hive)?.shutdown().await?;
    Ok(reply::empty())
}
