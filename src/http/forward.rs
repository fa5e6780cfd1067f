//! Forwarding between instances. A pool's manager runs on the one instance that holds the
//! pool's lease; a request for that pool reaching another instance is sent on, as it came
//! (method, path, query, headers, body), to the holder's advertised URL, and the holder's answer
//! is relayed unchanged, so every instance speaks for every pool byte for byte. A forwarded
//! request carries `x-hive-forwarded` and is always served where it lands: no loops, and a
//! holder that has just lost its lease answers 503 naming the new one.
//!
//! Not forwarded: requests for pools this instance runs (or with the in-process coordinator,
//! which has no other instances), and the SSE stream `/api/v1/pools/{pool}/live`, which is
//! served by the holder only (warp cannot relay a stream of unknown length here).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::{ApiError, BODY_LIMIT, with_hive};
use crate::actors::supervisor::instance_url;
use crate::app::Hive;

/// Marks a request one instance sent to another.
pub const FORWARDED: &str = "x-hive-forwarded";
/// On a relayed answer: the instance that served it.
pub const SERVED_BY: &str = "x-hive-served-by";

/// The vmcloud routes, all on the `default` pool.
const VMCLOUD: &[&str] = &[
    "set-pool-size",
    "prepare-batch",
    "lock",
    "release",
    "handle-status",
    "cancel-batch",
    "renew-expire",
    "all-status",
    "last-event-id",
    "fetch-events",
    "shutdown",
];

/// The pool a request path is about, if it is about exactly one.
pub fn pool_of(path: &str) -> Option<String> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segs.as_slice() {
        [first, ..] if VMCLOUD.contains(first) => Some("default".into()),
        ["api", "v1", "pools", _, "live"] => None,
        ["api", "v1", "pools", pool, ..] if !pool.is_empty() => Some((*pool).to_string()),
        ["api", "v1", "sessions", id, ..] => id.split_once('.').map(|(pool, _)| pool.to_string()),
        _ => None,
    }
}

enum Target {
    Holder(String),
    Unavailable(String),
}

/// Forward requests for pools run elsewhere; reject (fall through to the local routes) otherwise.
pub fn route(hive: Hive) -> BoxedFilter<(Response,)> {
    warp::path::full()
        .and(warp::header::optional::<String>(FORWARDED))
        .and(with_hive(hive.clone()))
        .and_then(|path: warp::path::FullPath, fwd: Option<String>, hive: Hive| async move {
            match target(&hive, path.as_str(), fwd.is_some()).await {
                Some(t) => Ok((t, path)),
                None => Err(warp::reject::not_found()),
            }
        })
        .untuple_one()
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(small_body())
        .and(with_hive(hive))
        .then(
            |t: Target, path: warp::path::FullPath, query: String, method: Method, headers: HeaderMap, body: Bytes, hive: Hive| async move {
                let started = Instant::now();
                let resp = match t {
                    Target::Unavailable(why) => ApiError::Unavailable(why).into_response(),
                    Target::Holder(url) => relay(&hive, &url, path.as_str(), &query, method, headers, body).await,
                };
                crate::metrics::http("forwarded", resp.status().as_u16(), started.elapsed().as_secs_f64());
                resp
            },
        )
        .boxed()
}

/// The body, refused early when its declared length is over the limit (the holder applies its
/// own limits too).
fn small_body() -> impl Filter<Extract = (Bytes,), Error = Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and_then(|len: Option<u64>| async move {
            match len {
                Some(n) if n > BODY_LIMIT => Err(warp::reject::custom(TooLarge)),
                _ => Ok(()),
            }
        })
        .untuple_one()
        .and(warp::body::bytes())
}

#[derive(Debug)]
pub(super) struct TooLarge;
impl warp::reject::Reject for TooLarge {}

/// Where a request for `path` goes: `None` to serve it here.
async fn target(hive: &Hive, path: &str, forwarded: bool) -> Option<Target> {
    let pool = pool_of(path)?;
    if forwarded || hive.coordinator().kind() == "local" || hive.pool(&pool).is_ok_and(|p| p.running()) {
        return None;
    }
    match hive.coordinator().lease_holder(&pool).await {
        Ok(Some((holder, _))) if holder == hive.instance() => None,
        Ok(Some((holder, _))) => Some(Target::Holder(instance_url(&holder).to_string())),
        Ok(None) => Some(Target::Unavailable(format!(
            "pool {pool:?} has no manager right now: its lease is free and an instance is taking it over; retry"
        ))),
        Err(e) => Some(Target::Unavailable(format!("cannot find the instance that runs pool {pool:?}: {e}"))),
    }
}

/// `GET path` from the instance that runs `pool`, as JSON (for views over every pool).
pub async fn get_json(hive: &Hive, pool: &str, path: &str) -> Result<serde_json::Value, String> {
    let base = match target(hive, &format!("/api/v1/pools/{pool}"), false).await {
        Some(Target::Holder(url)) => url,
        Some(Target::Unavailable(why)) => return Err(why),
        None => return Err(format!("pool {pool:?} is not running here")),
    };
    let me = hive.advertised_url().to_string();
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let answer = client(hive).get(&url).header(FORWARDED, me).send().await.map_err(|e| format!("{base}: {e}"))?;
    if !answer.status().is_success() {
        return Err(format!("{base} answered {}", answer.status()));
    }
    answer.json().await.map_err(|e| format!("{base}: {e}"))
}

fn client(hive: &Hive) -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    let wait = Duration::from_millis(hive.config().call_timeout_ms) + Duration::from_secs(2);
    CLIENT.get_or_init(|| reqwest::Client::builder().timeout(wait).build().unwrap_or_default())
}

/// Send the request on to `base` and answer what it answered.
async fn relay(hive: &Hive, base: &str, path: &str, query: &str, method: Method, headers: HeaderMap, body: Bytes) -> Response {
    let mut url = format!("{}{path}", base.trim_end_matches('/'));
    if !query.is_empty() {
        url.push('?');
        url.push_str(query);
    }
    let mut req = client(hive).request(method, &url).body(body);
    for (name, value) in headers.iter().filter(|(n, _)| !hop_by_hop(n.as_str())) {
        req = req.header(name, value);
    }
    let me = HeaderValue::from_str(hive.advertised_url()).unwrap_or(HeaderValue::from_static("?"));
    let answer = match req.header(FORWARDED, me).send().await {
        Ok(a) => a,
        Err(e) => {
            let why = format!(
                "the instance at {base} that runs this pool does not answer ({e}); another takes the pool over when its lease expires"
            );
            return ApiError::Unavailable(why).into_response();
        }
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let their = answer.headers().clone();
    let bytes = match answer.bytes().await {
        Ok(b) => b,
        Err(e) => return ApiError::Unavailable(format!("the instance at {base} broke off its answer: {e}")).into_response(),
    };
    let mut resp = Response::new(bytes.into());
    *resp.status_mut() = status;
    for (name, value) in their.iter().filter(|(n, _)| !hop_by_hop(n.as_str())) {
        resp.headers_mut().append(name, value.clone());
    }
    if let Ok(v) = HeaderValue::from_str(base) {
        resp.headers_mut().insert(SERVED_BY, v);
    }
    resp
}

/// Headers that belong to one connection, not to the request or answer.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade" | "te" | "trailer" | "host" | "content-length"
    )
}

#[cfg(test)]
mod tests {
    use super::pool_of;

    #[test]
    fn requests_name_their_pool() {
        assert_eq!(pool_of("/lock/3").as_deref(), Some("default"));
        assert_eq!(pool_of("/all-status").as_deref(), Some("default"));
        assert_eq!(pool_of("/api/v1/pools/gpu").as_deref(), Some("gpu"));
        assert_eq!(pool_of("/api/v1/pools/gpu/sessions/4/extend").as_deref(), Some("gpu"));
        assert_eq!(pool_of("/api/v1/sessions/gpu.4").as_deref(), Some("gpu"));
        assert_eq!(pool_of("/api/v1/sessions/gpu.4/rating").as_deref(), Some("gpu"));
        // Not about one pool, or served where it lands.
        assert_eq!(pool_of("/api/v1/pools"), None);
        assert_eq!(pool_of("/api/v1/pools/"), None);
        assert_eq!(pool_of("/api/v1/pools/gpu/live"), None);
        assert_eq!(pool_of("/api/v1/nodes"), None);
        assert_eq!(pool_of("/readyz"), None);
        assert_eq!(pool_of("/lockdown"), None);
    }
}
