//! Moving a pool's VM to another node (admin): `POST /api/v1/pools/{pool}/vms/{vm}/move` with
//! `{"node": <id>}` begins a move and answers 202 with the move: cold for a FREE or READY VM,
//! live for an OCCUPIED one (libvirt nodes only). `GET` on the same path shows the VM's last
//! move (`moving`, `done` or `failed` with its cause). The target must be a connected, ready
//! node that takes new VMs and runs the VM's driver. Anything else is refused with the reason
//! and changes nothing.

use serde::Deserialize;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::auth::require_admin;
use super::error::ApiError;
use super::reply::{self, ApiResult, uint};
use super::{auth, body, timed, with_hive};
use crate::app::Hive;
use crate::domain::node::{AdminState, NodeState};
use crate::domain::vm::VmState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveRequest {
    node: u64,
}

pub fn routes(hive: Hive) -> BoxedFilter<(Response,)> {
    let h = || with_hive(hive.clone());
    let path = || warp::path!("api" / "v1" / "pools" / String / "vms" / String / "move");
    let start = path()
        .and(warp::post())
        .and(h())
        .and(auth())
        .and(body())
        .then(|p, vm, hive, t, b| timed("/api/v1/pools/{pool}/vms/{vm}/move", start(hive, p, vm, t, b)));
    let show = path()
        .and(warp::get())
        .and(h())
        .and(auth())
        .then(|p, vm, hive, t| timed("/api/v1/pools/{pool}/vms/{vm}/move", show(hive, p, vm, t)));
    start.or(show).unify().boxed()
}

async fn start(hive: Hive, pool: String, vm: String, auth: Option<String>, body: bytes::Bytes) -> ApiResult {
    require_admin(&hive, auth.as_deref())?;
    let vm = uint("vm", &vm)?;
    let req: MoveRequest = reply::body(&body)?;
    let pool = hive.pool(&pool)?;
    let nodes = hive.nodes_handle();
    let target =
        nodes.get(req.node).await.map_err(|_| ApiError::NotFound { code: "unknown_node", message: format!("no node {}", req.node) })?;
    let refuse = |why: String| Err(ApiError::Conflict(format!("node {} cannot take the VM: {why}", req.node)));
    if target.admin != AdminState::Active {
        return refuse(format!("it is {}", target.admin.name()));
    }
    if target.state != NodeState::Ready || (target.remote && !target.connected) {
        return refuse(format!(
            "it is {} and {}",
            target.state.name(),
            if target.connected || !target.remote { "connected" } else { "not connected" }
        ));
    }
    let snapshot = pool.status().await?;
    if let Some(v) = snapshot.vms.iter().find(|v| v.id == vm) {
        if let Some(from) = v.placement.as_ref() {
            if let Ok(from) = nodes.get(from.node).await {
                if from.driver != target.driver {
                    return refuse(format!("it runs the {} driver and the VM's node the {} driver", target.driver, from.driver));
                }
            }
        }
        if v.state == VmState::Occupied && target.driver != "libvirt" {
            return refuse(format!("the VM is in use, so it would move live, which the {} driver cannot do", target.driver));
        }
    }
    let view = pool.move_vm(vm, req.node).await?;
    Ok(reply::json_status(StatusCode::ACCEPTED, &view))
}

async fn show(hive: Hive, pool: String, vm: String, auth: Option<String>) -> ApiResult {
    require_admin(&hive, auth.as_deref())?;
    let vm = uint("vm", &vm)?;
    match hive.pool(&pool)?.move_status(vm).await? {
        Some(view) => Ok(reply::json(&view)),
        None => Err(ApiError::NotFound { code: "no_move", message: format!("VM {vm} has not moved since its pool manager started") }),
    }
}
