//! `/api/v1/nodes/…` beyond listing: join tokens (admin), joining with one (the agent's first
//! contact, answered with the node's own credential), cordon/drain/activate and removal
//! (admin), the rewards ledger per node and period, and end users' session ratings.

use std::collections::HashMap;

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
use crate::domain::node::AdminState;
use crate::membership::MembershipError;

pub fn routes(hive: Hive) -> BoxedFilter<(Response,)> {
    let h = || with_hive(hive.clone());
    let nodes = || warp::path("api").and(warp::path("v1")).and(warp::path("nodes"));
    let tokens = nodes()
        .and(warp::path!("join-tokens"))
        .and(warp::post())
        .and(h())
        .and(auth())
        .then(|hive, t| timed("/api/v1/nodes/join-tokens", join_token(hive, t)));
    let register = nodes()
        .and(warp::path!("register"))
        .and(warp::post())
        .and(h())
        .and(auth())
        .and(body())
        .then(|hive, t, b| timed("/api/v1/nodes/register", register(hive, t, b)));
    let admin = nodes()
        .and(warp::path!(String / String))
        .and(warp::post())
        .and(h())
        .and(auth())
        .then(|id, action, hive, t| timed("/api/v1/nodes/{id}/{action}", set_admin(hive, id, action, t)));
    let remove = nodes()
        .and(warp::path!(String))
        .and(warp::delete())
        .and(h())
        .and(auth())
        .and(warp::query::<HashMap<String, String>>())
        .then(|id, hive, t, q| timed("/api/v1/nodes/{id}", remove(hive, id, t, q)));
    let rewards = nodes()
        .and(warp::path!(String / "rewards"))
        .and(warp::get())
        .and(h())
        .and(warp::query::<HashMap<String, String>>())
        .then(|id, hive, q| timed("/api/v1/nodes/{id}/rewards", rewards(hive, id, q)));
    let rating = warp::path!("api" / "v1" / "pools" / String / "sessions" / String / "rating")
        .and(warp::post())
        .and(h())
        .and(body())
        .then(|pool, id, hive, b| timed("/api/v1/pools/{pool}/sessions/{id}/rating", rate(hive, pool, id, b)));
    // The same, with the session named `<pool>.<id>` (pool names never contain a dot).
    let rating_short = warp::path!("api" / "v1" / "sessions" / String / "rating").and(warp::post()).and(h()).and(body()).then(
        |sid: String, hive, b| async move {
            let r = match sid.split_once('.') {
                Some((pool, id)) => rate(hive, pool.to_string(), id.to_string(), b).await,
                None => Err(ApiError::bad("session", format!("{sid:?} is not <pool>.<id>"))),
            };
            timed("/api/v1/sessions/{id}/rating", async { r }).await
        },
    );
    tokens.or(register).unify().or(rewards).unify().or(admin).unify().or(remove).unify().or(rating).unify().or(rating_short).unify().boxed()
}

impl From<MembershipError> for ApiError {
    fn from(e: MembershipError) -> Self {
        let refused = |status, code| ApiError::Refused { status, code, message: e.to_string() };
        match &e {
            MembershipError::BadJoinToken => refused(StatusCode::UNAUTHORIZED, "bad_join_token"),
            MembershipError::BadCredential => refused(StatusCode::UNAUTHORIZED, "bad_credential"),
            MembershipError::Invalid { field, reason } => ApiError::BadParam { field, reason: reason.clone() },
            MembershipError::UnknownSession(..) => ApiError::NotFound { code: "unknown_session", message: e.to_string() },
            MembershipError::NotAssigned(..) | MembershipError::AlreadyRated(..) => ApiError::Conflict(e.to_string()),
            MembershipError::NoNodeStore => ApiError::Unavailable(e.to_string()),
            MembershipError::Store(s) => s.clone().into(),
            MembershipError::Node(n) => n.clone().into(),
            MembershipError::Pool(p) => p.clone().into(),
        }
    }
}

async fn join_token(hive: Hive, token: Option<String>) -> ApiResult {
    require_admin(&hive, token.as_deref())?;
    Ok(reply::json_status(StatusCode::CREATED, &hive.create_join_token().await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    name: String,
}

async fn register(hive: Hive, token: Option<String>, body: bytes::Bytes) -> ApiResult {
    let token = token.as_deref().and_then(|t| t.strip_prefix("Bearer ")).ok_or(MembershipError::BadJoinToken)?;
    let b: RegisterBody = reply::body(&body)?;
    Ok(reply::json_status(StatusCode::CREATED, &hive.join(token, &b.name).await?))
}

async fn set_admin(hive: Hive, id: String, action: String, token: Option<String>) -> ApiResult {
    let admin = match action.as_str() {
        "cordon" => AdminState::Cordoned,
        "drain" => AdminState::Draining,
        "activate" => AdminState::Active,
        _ => return Err(ApiError::NoRoute),
    };
    require_admin(&hive, token.as_deref())?;
    let id = uint("id", &id)?;
    Ok(reply::json(&hive.nodes_handle().set_admin(id, admin).await?))
}

async fn remove(hive: Hive, id: String, token: Option<String>, q: HashMap<String, String>) -> ApiResult {
    require_admin(&hive, token.as_deref())?;
    let id = uint("id", &id)?;
    let force = match q.get("force").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(ApiError::bad("force", format!("{other:?} is not true or false"))),
    };
    hive.nodes_handle().remove(id, force).await?;
    Ok(reply::no_content())
}

async fn rewards(hive: Hive, id: String, q: HashMap<String, String>) -> ApiResult {
    let id = uint("id", &id)?;
    let from = q.get("from").map(|v| uint("from", v)).transpose()?.unwrap_or(0);
    let to = q.get("to").map(|v| uint("to", v)).transpose()?.unwrap_or_else(|| hive.now() + 1);
    Ok(reply::json(&hive.rewards(id, from, to).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RatingBody {
    stars: u8,
    #[serde(default)]
    comment: String,
}

async fn rate(hive: Hive, pool: String, id: String, body: bytes::Bytes) -> ApiResult {
    let id = uint("id", &id)?;
    let b: RatingBody = reply::body(&body)?;
    Ok(reply::json_status(StatusCode::CREATED, &hive.rate(&pool, id, b.stars, &b.comment).await?))
}
