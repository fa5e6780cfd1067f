//! `/api/v1/migrations` and the endpoints they move between (admin): sources and destinations
//! (`/api/v1/migration-sources`, `/api/v1/migration-destinations`), the resources discovered at
//! a source, migrations (create, list, show, cancel, delete once finished); and the workers'
//! upload of a converted disk (`PUT /api/v1/agent/migrations/{id}/disk`, node credential).
//! Endpoint parameters are shown redacted.

use bytes::Buf;
use serde_json::json;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::auth::require_admin;
use super::error::ApiError;
use super::reply::{self, ApiResult, uint};
use super::{agent_upload, auth, body, timed, with_hive};
use crate::app::Hive;
use crate::domain::migration::{Endpoint, Role};
use crate::migration::service::{MigrationError, NewEndpoint, NewMigration};

impl From<MigrationError> for ApiError {
    fn from(e: MigrationError) -> Self {
        match e {
            MigrationError::Invalid(m) => ApiError::BadBody(m),
            MigrationError::NotFound { what, id } => ApiError::NotFound { code: "not_found", message: format!("no {what} {id}") },
            MigrationError::Conflict(m) => ApiError::Conflict(m),
            MigrationError::Rule(r) => ApiError::Conflict(r.to_string()),
            MigrationError::Store(s) => ApiError::Unavailable(s.to_string()),
            MigrationError::Unavailable(m) => ApiError::Unavailable(m),
        }
    }
}

fn view(e: &Endpoint, hive: &Hive) -> serde_json::Value {
    let r = e.redacted();
    json!({
        "id": r.id, "name": r.name, "type": r.kind, "params": r.params,
        "state": r.effective_state(hive.now(), crate::migration::service::STALE_AFTER_MS).name(), "last_seen": r.last_seen, "checked_by": r.checked_by,
    })
}

pub fn routes(hive: Hive) -> BoxedFilter<(Response,)> {
    let h = || with_hive(hive.clone());
    let v1 = || warp::path("api").and(warp::path("v1"));
    let sources = endpoint_routes(hive.clone(), "migration-sources", Role::Source);
    let destinations = endpoint_routes(hive.clone(), "migration-destinations", Role::Destination);
    let discover = v1()
        .and(warp::path!("migration-sources" / String / "discover"))
        .and(warp::post())
        .and(h())
        .and(auth())
        .then(|id, hive, t| timed("/api/v1/migration-sources/{id}/discover", discover(hive, id, t)));
    let resources = v1()
        .and(warp::path!("migration-resources"))
        .and(warp::get())
        .and(h())
        .and(auth())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .then(|hive, t, q| timed("/api/v1/migration-resources", resources(hive, t, q)));
    let list = v1()
        .and(warp::path!("migrations"))
        .and(warp::get())
        .and(h())
        .and(auth())
        .then(|hive, t| timed("/api/v1/migrations", list_migrations(hive, t)));
    let create = v1()
        .and(warp::path!("migrations"))
        .and(warp::post())
        .and(h())
        .and(auth())
        .and(body())
        .then(|hive, t, b| timed("/api/v1/migrations", create_migration(hive, t, b)));
    let migration = v1()
        .and(warp::path!("migrations" / String))
        .and(warp::method())
        .and(h())
        .and(auth())
        .then(|id, m, hive, t| timed("/api/v1/migrations/{id}", migration(hive, id, m, t)));
    let cancel = v1()
        .and(warp::path!("migrations" / String / "cancel"))
        .and(warp::post())
        .and(h())
        .and(auth())
        .then(|id, hive, t| timed("/api/v1/migrations/{id}/cancel", cancel(hive, id, t)));
    let upload = v1()
        .and(warp::path!("agent" / "migrations" / String / "disk"))
        .and(warp::put())
        .and(h())
        .and(auth())
        .and(agent_upload::described())
        .and(warp::body::stream())
        .then(|id, hive, t, d, s| timed("/api/v1/agent/migrations/{id}/disk", upload(hive, id, t, d, s)));
    discover
        .or(resources)
        .unify()
        .or(list)
        .unify()
        .or(create)
        .unify()
        .or(cancel)
        .unify()
        .or(migration)
        .unify()
        .or(upload)
        .unify()
        .or(sources)
        .unify()
        .or(destinations)
        .unify()
        .boxed()
}

/// `/api/v1/{segment}` (list, create) and `/api/v1/{segment}/{id}` (show, edit, delete).
fn endpoint_routes(hive: Hive, segment: &'static str, role: Role) -> BoxedFilter<(Response,)> {
    let h = || with_hive(hive.clone());
    let base = move || warp::path("api").and(warp::path("v1")).and(warp::path(segment));
    // A body is read only by the methods that have one: `body()` wants a Content-Length,
    // which a GET or DELETE (curl's, for one) does not carry.
    let list = base()
        .and(warp::path::end())
        .and(warp::get())
        .and(h())
        .and(auth())
        .then(move |hive, t| timed("/api/v1/migration-{sources,destinations}", list_endpoints(hive, role, t)));
    let add = base()
        .and(warp::path::end())
        .and(warp::post())
        .and(h())
        .and(auth())
        .and(body())
        .then(move |hive, t, b| timed("/api/v1/migration-{sources,destinations}", add_endpoint(hive, role, t, b)));
    let one = base()
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .and(warp::method())
        .and(h())
        .and(auth())
        .then(move |id, m, hive, t| timed("/api/v1/migration-{sources,destinations}/{id}", endpoint(hive, role, id, m, t)));
    let edit = base()
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .and(warp::put())
        .and(h())
        .and(auth())
        .and(body())
        .then(move |id, hive, t, b| timed("/api/v1/migration-{sources,destinations}/{id}", edit_endpoint(hive, role, id, t, b)));
    edit.or(one).unify().or(list).unify().or(add).unify().boxed()
}

async fn list_endpoints(hive: Hive, role: Role, t: Option<String>) -> ApiResult {
    require_admin(&hive, t.as_deref())?;
    let list: Vec<_> = hive.migrations().endpoints(role).await?.iter().map(|e| view(e, &hive)).collect();
    Ok(reply::json(&list))
}

async fn add_endpoint(hive: Hive, role: Role, t: Option<String>, b: bytes::Bytes) -> ApiResult {
    require_admin(&hive, t.as_deref())?;
    let new: NewEndpoint = reply::body(&b)?;
    let e = hive.migrations().add_endpoint(role, new).await?;
    Ok(reply::json_status(StatusCode::CREATED, &view(&e, &hive)))
}

async fn edit_endpoint(hive: Hive, role: Role, id: String, t: Option<String>, b: bytes::Bytes) -> ApiResult {
    require_admin(&hive, t.as_deref())?;
    let id = uint(role.name(), &id)?;
    let new: NewEndpoint = reply::body(&b)?;
    Ok(reply::json(&view(&hive.migrations().edit_endpoint(role, id, new).await?, &hive)))
}

/// GET or DELETE of one endpoint.
async fn endpoint(hive: Hive, role: Role, id: String, m: warp::http::Method, t: Option<String>) -> ApiResult {
    require_admin(&hive, t.as_deref())?;
    let id = uint(role.name(), &id)?;
    match m {
        warp::http::Method::GET => Ok(reply::json(&view(&hive.migrations().endpoint(role, id).await?, &hive))),
        warp::http::Method::DELETE => {
            hive.migrations().remove_endpoint(role, id).await?;
            Ok(reply::json(&json!({"deleted": id})))
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

async fn discover(hive: Hive, id: String, t: Option<String>) -> ApiResult {
    require_admin(&hive, t.as_deref())?;
    let id = uint("source", &id)?;
    Ok(reply::json(&hive.migrations().discover(id).await?))
}

async fn resources(hive: Hive, t: Option<String>, q: std::collections::HashMap<String, String>) -> ApiResult {
    require_admin(&hive, t.as_deref())?;
    let source = q.get("source").map(|s| uint("source", s)).transpose()?;
    Ok(reply::json(&hive.migrations().resources(source).await?))
}

async fn list_migrations(hive: Hive, t: Option<String>) -> ApiResult {
    require_admin(&hive, t.as_deref())?;
    Ok(reply::json(&hive.migrations().list().await?))
}

async fn create_migration(hive: Hive, t: Option<String>, b: bytes::Bytes) -> ApiResult {
    require_admin(&hive, t.as_deref())?;
    let new: NewMigration = reply::body(&b)?;
    Ok(reply::json_status(StatusCode::CREATED, &hive.migrations().create(new).await?))
}

async fn migration(hive: Hive, id: String, m: warp::http::Method, t: Option<String>) -> ApiResult {
    require_admin(&hive, t.as_deref())?;
    let id = uint("migration", &id)?;
    match m {
        warp::http::Method::GET => Ok(reply::json(&hive.migrations().get(id).await?)),
        warp::http::Method::DELETE => {
            hive.migrations().delete(id).await?;
            Ok(reply::json(&json!({"deleted": id})))
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

async fn cancel(hive: Hive, id: String, t: Option<String>) -> ApiResult {
    require_admin(&hive, t.as_deref())?;
    let id = uint("migration", &id)?;
    Ok(reply::json(&hive.migrations().cancel(id).await?))
}

/// The worker's converted disk, streamed into the image registry (`agent_upload`).
async fn upload<S, B>(hive: Hive, id: String, t: Option<String>, described: agent_upload::Described, body: S) -> ApiResult
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Send + Unpin,
    B: Buf,
{
    let id = uint("migration", &id)?;
    let node = agent_upload::node_of(&hive, t.as_deref()).await?;
    let m = hive.migrations().upload_allowed(id, node).await?;
    let readme = format!("Migrated by migration {id} ({}).", m.description);
    agent_upload::into_registry(&hive, m.name.clone(), readme, described, body).await
}
