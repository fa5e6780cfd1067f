//! HTTP (warp): thin routes over the `Hive`. Each route parses its input, calls one handle
//! method and shapes the result; every failure becomes the JSON error envelope in `error.rs`.
//! Routes put the path before the method so an unknown path is a 404, not a 405. Every
//! response (errors included) carries the vmcloud CORS headers, and every API route records
//! `hive_http_*` metrics under its route template, never under ids (the static pages, the
//! OpenAPI document, `/metrics` itself and the long-lived SSE stream are not timed).
//!
//! Surfaces: `vmcloud.rs` (the original API on the `default` pool), `api.rs` (`/api/v1`),
//! `images.rs` (`/api/v1/images`: uploads, images, manifests and pieces), `nodes.rs` (join
//! tokens, joining, node admin, rewards, ratings), `lifecycle.rs` (users, baseimages,
//! environments, deployments, apps), `agent.rs` (the agents' WebSocket), `agent_upload.rs`
//! (disks agents send: a migrated disk, a disk exported to move a VM),
//! `ops.rs` (`/healthz`, `/readyz`, `/metrics`, the monitor page and a pool's live stream),
//! `live.rs` (`/api/v1/live`, the whole hive's live stream for the monitor page),
//! `pages.rs` (the session page and noVNC's modules).

mod agent;
mod agent_upload;
mod api;
mod auth;
mod error;
pub mod forward;
mod gateway;
mod images;
mod lifecycle;
mod live;
mod migrations;
mod moves;
mod nodes;
mod ops;
pub mod pages;
mod reply;
pub mod vmcloud;

use std::convert::Infallible;
use std::future::Future;

use tokio::net::TcpListener;
use warp::filters::BoxedFilter;
use warp::http::Method;
use warp::reply::Response;
use warp::{Filter, Rejection};

pub use error::ApiError;
use reply::ApiResult;

use crate::app::Hive;

/// Largest request body accepted by any route.
const BODY_LIMIT: u64 = 64 * 1024;

/// Serve the hive's routes on `listener` until `shutdown` resolves.
pub async fn serve(hive: Hive, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) {
    warp::serve(routes(hive)).incoming(listener).graceful(shutdown).run().await
}

async fn timed(route: &'static str, handler: impl Future<Output = ApiResult>) -> Response {
    let started = std::time::Instant::now();
    let resp = handler.await.unwrap_or_else(ApiError::into_response);
    crate::metrics::http(route, resp.status().as_u16(), started.elapsed().as_secs_f64());
    resp
}

/// All routes, with rejections turned into JSON errors and CORS headers on everything.
pub fn routes(hive: Hive) -> BoxedFilter<(Response,)> {
    preflight()
        .or(forward::route(hive.clone()))
        .unify()
        .or(vmcloud_routes(hive.clone()))
        .unify()
        .or(api_routes(hive.clone()))
        .unify()
        .or(images::routes(hive.clone()))
        .unify()
        .or(nodes::routes(hive.clone()))
        .unify()
        .or(lifecycle::routes(hive.clone()))
        .unify()
        .or(migrations::routes(hive.clone()))
        .unify()
        .or(moves::routes(hive.clone()))
        .unify()
        .or(agent::route(hive.clone()))
        .unify()
        .or(agent_upload::routes(hive.clone()))
        .unify()
        .or(gateway::routes(hive.clone()))
        .unify()
        .or(pages::routes(hive.clone()))
        .unify()
        .or(live::routes(hive.clone()))
        .unify()
        .or(ops::routes(hive))
        .unify()
        .recover(recover)
        .unify()
        .with(warp::reply::with::header("access-control-allow-origin", "*"))
        .with(warp::reply::with::header("access-control-allow-methods", "PUT, GET, POST, DELETE, OPTIONS"))
        .with(warp::reply::with::header("access-control-allow-headers", "Content-Type"))
        .map(warp::Reply::into_response)
        .boxed()
}

fn with_hive(hive: Hive) -> impl Filter<Extract = (Hive,), Error = Infallible> + Clone {
    warp::any().map(move || hive.clone())
}

fn auth() -> impl Filter<Extract = (Option<String>,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
}

fn body() -> impl Filter<Extract = (bytes::Bytes,), Error = Rejection> + Clone {
    warp::body::content_length_limit(BODY_LIMIT).and(warp::body::bytes())
}

/// CORS preflight: any path, OPTIONS, empty 200 (the headers are added to every response).
fn preflight() -> BoxedFilter<(Response,)> {
    warp::method()
        .and_then(|m: Method| async move { if m == Method::OPTIONS { Ok(()) } else { Err(warp::reject::not_found()) } })
        .untuple_one()
        .map(reply::empty)
        .boxed()
}

fn vmcloud_routes(hive: Hive) -> BoxedFilter<(Response,)> {
    use vmcloud as v;
    let h = || with_hive(hive.clone());
    let set_size = warp::path!("set-pool-size" / String / String / String)
        .and(warp::post())
        .and(h())
        .then(|a, b, c, hive| timed("/set-pool-size", v::set_pool_size(hive, a, b, c)));
    let prepare = warp::path!("prepare-batch" / String / String)
        .and(warp::post())
        .and(h())
        .then(|a, b, hive| timed("/prepare-batch", v::prepare_batch(hive, a, b)));
    let lock = warp::path!("lock" / String).and(warp::post()).and(h()).then(|a, hive| timed("/lock", v::lock(hive, a)));
    let release = warp::path!("release" / String).and(warp::post()).and(h()).then(|a, hive| timed("/release", v::release(hive, a)));
    let status =
        warp::path!("handle-status" / String).and(warp::get()).and(h()).then(|a, hive| timed("/handle-status", v::handle_status(hive, a)));
    let cancel =
        warp::path!("cancel-batch" / String).and(warp::post()).and(h()).then(|a, hive| timed("/cancel-batch", v::cancel_batch(hive, a)));
    let renew = warp::path!("renew-expire" / String / String)
        .and(warp::post())
        .and(h())
        .then(|a, b, hive| timed("/renew-expire", v::renew_expire(hive, a, b)));
    let all = warp::path!("all-status").and(warp::get()).and(h()).then(|hive| timed("/all-status", v::all_status(hive)));
    let last =
        warp::path!("last-event-id" / String).and(warp::get()).and(h()).then(|a, hive| timed("/last-event-id", v::last_event_id(hive, a)));
    let fetch = warp::path!("fetch-events" / String / String)
        .and(warp::get())
        .and(h())
        .then(|a, b, hive| timed("/fetch-events", v::fetch_events(hive, a, b)));
    let shutdown = warp::path!("shutdown").and(warp::post()).and(h()).and(auth()).then(|hive, t| timed("/shutdown", v::shutdown(hive, t)));
    set_size
        .or(prepare)
        .unify()
        .or(lock)
        .unify()
        .or(release)
        .unify()
        .or(status)
        .unify()
        .or(cancel)
        .unify()
        .or(renew)
        .unify()
        .or(all)
        .unify()
        .or(last)
        .unify()
        .or(fetch)
        .unify()
        .or(shutdown)
        .unify()
        .boxed()
}

fn api_routes(hive: Hive) -> BoxedFilter<(Response,)> {
    let h = || with_hive(hive.clone());
    let base = || warp::path("api").and(warp::path("v1"));
    let pools = base().and(warp::path("pools"));
    let list_pools = pools.and(warp::path::end()).and(warp::get()).and(h()).then(|hive| timed("/api/v1/pools", api::list_pools(hive)));
    let create_pool = pools
        .and(warp::path::end())
        .and(warp::post())
        .and(h())
        .and(auth())
        .and(body())
        .then(|hive, t, b| timed("/api/v1/pools", api::create_pool(hive, t, b)));
    let show_pool =
        pools.and(warp::path!(String)).and(warp::get()).and(h()).then(|n, hive| timed("/api/v1/pools/{pool}", api::show_pool(hive, n)));
    let delete_pool = pools
        .and(warp::path!(String))
        .and(warp::delete())
        .and(h())
        .and(auth())
        .then(|n, hive, t| timed("/api/v1/pools/{pool}", api::delete_pool(hive, n, t)));
    let resize = pools
        .and(warp::path!(String / "size"))
        .and(warp::put())
        .and(h())
        .and(auth())
        .and(body())
        .then(|n, hive, t, b| timed("/api/v1/pools/{pool}/size", api::resize_pool(hive, n, t, b)));
    let batches = pools
        .and(warp::path!(String / "batches"))
        .and(warp::get())
        .and(h())
        .then(|n, hive| timed("/api/v1/pools/{pool}/batches", api::list_batches(hive, n)));
    let new_batch = pools
        .and(warp::path!(String / "batches"))
        .and(warp::post())
        .and(h())
        .and(body())
        .then(|n, hive, b| timed("/api/v1/pools/{pool}/batches", api::create_batch(hive, n, b)));
    let batch = pools
        .and(warp::path!(String / "batches" / String))
        .and(warp::get())
        .and(h())
        .then(|n, id, hive| timed("/api/v1/pools/{pool}/batches/{id}", api::show_batch(hive, n, id)));
    let cancel = pools
        .and(warp::path!(String / "batches" / String))
        .and(warp::delete())
        .and(h())
        .then(|n, id, hive| timed("/api/v1/pools/{pool}/batches/{id}", api::cancel_batch(hive, n, id)));
    let new_session = pools
        .and(warp::path!(String / "sessions"))
        .and(warp::post())
        .and(h())
        .and(body())
        .then(|n, hive, b| timed("/api/v1/pools/{pool}/sessions", api::create_session(hive, n, b)));
    let session = pools
        .and(warp::path!(String / "sessions" / String))
        .and(warp::get())
        .and(h())
        .then(|n, id, hive| timed("/api/v1/pools/{pool}/sessions/{id}", api::show_session(hive, n, id)));
    let release = pools
        .and(warp::path!(String / "sessions" / String))
        .and(warp::delete())
        .and(h())
        .then(|n, id, hive| timed("/api/v1/pools/{pool}/sessions/{id}", api::release_session(hive, n, id)));
    let extend = pools
        .and(warp::path!(String / "sessions" / String / "extend"))
        .and(warp::post())
        .and(h())
        .and(body())
        .then(|n, id, hive, b| timed("/api/v1/pools/{pool}/sessions/{id}/extend", api::extend_session(hive, n, id, b)));
    let nodes = base().and(warp::path!("nodes")).and(warp::get()).and(h()).then(|hive| timed("/api/v1/nodes", api::list_nodes(hive)));
    let node = base()
        .and(warp::path!("nodes" / String))
        .and(warp::get())
        .and(h())
        .then(|id, hive| timed("/api/v1/nodes/{id}", api::show_node(hive, id)));
    let pool_routes = list_pools.or(create_pool).unify().or(show_pool).unify().or(delete_pool).unify().or(resize).unify().boxed();
    let batch_routes = batches.or(new_batch).unify().or(batch).unify().or(cancel).unify().boxed();
    let session_routes = new_session.or(session).unify().or(release).unify().or(extend).unify().boxed();
    pool_routes.or(batch_routes).unify().or(session_routes).unify().or(nodes).unify().or(node).unify().boxed()
}

async fn recover(err: Rejection) -> Result<Response, Infallible> {
    let e = if err.is_not_found() {
        ApiError::NoRoute
    } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::MethodNotAllowed
    } else if err.find::<warp::reject::PayloadTooLarge>().is_some() || err.find::<forward::TooLarge>().is_some() {
        ApiError::BadBody(format!("larger than {BODY_LIMIT} bytes"))
    } else if err.find::<warp::reject::LengthRequired>().is_some() {
        ApiError::BadBody("a Content-Length header is required".into())
    } else if let Some(h) = err.find::<warp::reject::InvalidHeader>() {
        ApiError::bad("header", format!("{} is not valid", h.name()))
    } else {
        ApiError::BadBody(format!("{err:?}"))
    };
    Ok(e.into_response())
}
