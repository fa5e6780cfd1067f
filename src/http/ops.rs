//! Operations and browser surfaces: `/healthz` (the process answers), `/readyz` (the store
//! answers), `/metrics` (Prometheus text), the monitor page at `/` and `/static/monitor.html`,
//! the OpenAPI document at `/api/v1/openapi.json`, and the pool's live feed `/api/v1/pools/{pool}/live`: Server-Sent Events carrying the vmcloud
//! `all-status` body after every durable change (coalesced, at most 10 a second). No polling.

use std::time::Duration;

use futures_util::stream;
use serde_json::json;
use warp::filters::BoxedFilter;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Reply};

use super::reply::{self, ApiResult};
use super::{timed, with_hive};
use crate::app::Hive;

const MONITOR_HTML: &str = include_str!("../../web/monitor.html");
const OPENAPI: &str = include_str!("../../web/openapi.json");

pub fn routes(hive: Hive) -> BoxedFilter<(Response,)> {
    let h = || with_hive(hive.clone());
    let healthz = warp::path!("healthz").and(warp::get()).then(|| timed("/healthz", async { Ok(reply::json(&json!({"status": "ok"}))) }));
    let readyz = warp::path!("readyz").and(warp::get()).and(h()).then(|hive| timed("/readyz", readyz(hive)));
    let metrics = warp::path!("metrics").and(warp::get()).and(h()).map(render_metrics);
    let monitor = warp::path!("static" / "monitor.html").or(warp::path::end()).unify().and(warp::get()).map(|| {
        let mut r = Response::new(MONITOR_HTML.into());
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
        r
    });
    let live = warp::path!("api" / "v1" / "pools" / String / "live").and(warp::get()).and(h()).map(live);
    let openapi = warp::path!("api" / "v1" / "openapi.json").and(warp::get()).map(|| {
        let mut r = Response::new(OPENAPI.into());
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    });
    healthz.or(readyz).unify().or(metrics).unify().or(monitor).unify().or(live).unify().or(openapi).unify().boxed()
}

async fn readyz(hive: Hive) -> ApiResult {
    hive.ready().await?;
    let coord = hive.coordinator();
    coord.ping().await.map_err(|e| super::ApiError::Unavailable(format!("coordinator ({}): {e}", coord.kind())))?;
    Ok(reply::json(&json!({"status": "ready", "store": "ok", "coordinator": coord.kind()})))
}

fn render_metrics(hive: Hive) -> Response {
    match hive.metrics() {
        Some(m) => {
            m.run_upkeep();
            let mut r = Response::new(m.render().into());
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
            r
        }
        None => reply::json_status(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": {"code": "unavailable", "message": "metrics recorder not installed"}}),
        ),
    }
}

fn live(name: String, hive: Hive) -> Response {
    let pool = match hive.pool(&name) {
        Ok(p) => p,
        Err(e) => return super::ApiError::from(e).into_response(),
    };
    let rx = pool.subscribe();
    // First event at once, then one per change, coalesced to at most ten a second.
    let events = stream::unfold((pool, rx, true), |(pool, mut rx, first)| async move {
        if !first {
            rx.changed().await.ok()?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            rx.borrow_and_update();
        }
        let body = match pool.status().await {
            Ok(s) => super::vmcloud::all_status_body(&s),
            Err(e) => json!({"error": {"code": "unavailable", "message": e.to_string()}}),
        };
        let ev = warp::sse::Event::default().event("status").json_data(body).ok()?;
        Some((Ok::<_, std::convert::Infallible>(ev), (pool, rx, false)))
    });
    warp::sse::reply(warp::sse::keep_alive().stream(events)).into_response()
}
