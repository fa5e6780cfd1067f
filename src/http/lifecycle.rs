//! `/api/v1` for users and the image lifecycle: users (admin), baseimages (created by admins,
//! listed to everyone), environments, deployments and apps (each caller sees their own; the
//! admin sees all). Creating, `done` and deleting answer 202 with the object at once; the work
//! runs in the background and clients poll `GET`. Routes open to users take a user's token or
//! the admin token (`auth::caller`).

use serde::Deserialize;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::auth::{caller, require_admin};
use super::reply::{self, ApiResult, uint};
use super::{auth, body, timed, with_hive};
use crate::app::Hive;
use crate::domain::lifecycle::Kind;
use crate::lifecycle::{AppRequest, BaseimageRequest, DeploymentRequest, DeriveRequest, EnvironmentRequest};

pub fn routes(hive: Hive) -> BoxedFilter<(Response,)> {
    let h = || with_hive(hive.clone());
    let base = || warp::path("api").and(warp::path("v1"));
    let new_user = base()
        .and(warp::path!("users"))
        .and(warp::post())
        .and(h())
        .and(auth())
        .and(body())
        .then(|hive, t, b| timed("/api/v1/users", create_user(hive, t, b)));
    let set_user = base()
        .and(warp::path!("users" / String))
        .and(warp::patch())
        .and(h())
        .and(auth())
        .and(body())
        .then(|n, hive, t, b| timed("/api/v1/users/{name}", set_user(hive, n, t, b)));
    let new_base = base()
        .and(warp::path!("baseimages"))
        .and(warp::post())
        .and(h())
        .and(auth())
        .and(body())
        .then(|hive, t, b| timed("/api/v1/baseimages", create_baseimage(hive, t, b)));
    let list_bases = base()
        .and(warp::path!("baseimages"))
        .and(warp::get())
        .and(h())
        .and(auth())
        .then(|hive, t| timed("/api/v1/baseimages", list(hive, Kind::Baseimage, t)));
    let base_one = base()
        .and(warp::path!("baseimages" / String))
        .and(warp::get())
        .and(h())
        .and(auth())
        .then(|id, hive, t| timed("/api/v1/baseimages/{id}", show(hive, Kind::Baseimage, id, t)));
    let base_delete = base()
        .and(warp::path!("baseimages" / String))
        .and(warp::delete())
        .and(h())
        .and(auth())
        .then(|id, hive, t| timed("/api/v1/baseimages/{id}", delete(hive, Kind::Baseimage, id, t)));
    let base_done = base()
        .and(warp::path!("baseimages" / String / "done"))
        .and(warp::post())
        .and(h())
        .and(auth())
        .then(|id, hive, t| timed("/api/v1/baseimages/{id}/done", done(hive, Kind::Baseimage, id, t)));
    let clone = base()
        .and(warp::path!("baseimages" / String / "environments"))
        .and(warp::post())
        .and(h())
        .and(auth())
        .and(body())
        .then(|id, hive, t, b| timed("/api/v1/baseimages/{id}/environments", derive(hive, Kind::Environment, id, t, b)));
    let list_envs = base()
        .and(warp::path!("environments"))
        .and(warp::get())
        .and(h())
        .and(auth())
        .then(|hive, t| timed("/api/v1/environments", list(hive, Kind::Environment, t)));
    let env_one = base()
        .and(warp::path!("environments" / String))
        .and(warp::get())
        .and(h())
        .and(auth())
        .then(|id, hive, t| timed("/api/v1/environments/{id}", show(hive, Kind::Environment, id, t)));
    let env_delete = base()
        .and(warp::path!("environments" / String))
        .and(warp::delete())
        .and(h())
        .and(auth())
        .then(|id, hive, t| timed("/api/v1/environments/{id}", delete(hive, Kind::Environment, id, t)));
    let env_done = base()
        .and(warp::path!("environments" / String / "done"))
        .and(warp::post())
        .and(h())
        .and(auth())
        .then(|id, hive, t| timed("/api/v1/environments/{id}/done", done(hive, Kind::Environment, id, t)));
    let snapshot = base()
        .and(warp::path!("environments" / String / "deployments"))
        .and(warp::post())
        .and(h())
        .and(auth())
        .and(body())
        .then(|id, hive, t, b| timed("/api/v1/environments/{id}/deployments", derive(hive, Kind::Deployment, id, t, b)));
    let list_deps = base()
        .and(warp::path!("deployments"))
        .and(warp::get())
        .and(h())
        .and(auth())
        .then(|hive, t| timed("/api/v1/deployments", list(hive, Kind::Deployment, t)));
    let dep_one = base()
        .and(warp::path!("deployments" / String))
        .and(warp::get())
        .and(h())
        .and(auth())
        .then(|id, hive, t| timed("/api/v1/deployments/{id}", show(hive, Kind::Deployment, id, t)));
    let dep_delete = base()
        .and(warp::path!("deployments" / String))
        .and(warp::delete())
        .and(h())
        .and(auth())
        .then(|id, hive, t| timed("/api/v1/deployments/{id}", delete(hive, Kind::Deployment, id, t)));
    let dep_done = base()
        .and(warp::path!("deployments" / String / "done"))
        .and(warp::post())
        .and(h())
        .and(auth())
        .then(|id, hive, t| timed("/api/v1/deployments/{id}/done", done(hive, Kind::Deployment, id, t)));
    let run_app = base()
        .and(warp::path!("deployments" / String / "apps"))
        .and(warp::post())
        .and(h())
        .and(auth())
        .and(body())
        .then(|id, hive, t, b| timed("/api/v1/deployments/{id}/apps", derive(hive, Kind::App, id, t, b)));
    let list_apps = base()
        .and(warp::path!("apps"))
        .and(warp::get())
        .and(h())
        .and(auth())
        .then(|hive, t| timed("/api/v1/apps", list(hive, Kind::App, t)));
    let app_one = base()
        .and(warp::path!("apps" / String))
        .and(warp::get())
        .and(h())
        .and(auth())
        .then(|id, hive, t| timed("/api/v1/apps/{id}", show(hive, Kind::App, id, t)));
    let app_delete = base()
        .and(warp::path!("apps" / String))
        .and(warp::delete())
        .and(h())
        .and(auth())
        .then(|id, hive, t| timed("/api/v1/apps/{id}", delete(hive, Kind::App, id, t)));
    let users = new_user.or(set_user).unify().boxed();
    let bases =
        new_base.or(list_bases).unify().or(base_one).unify().or(base_delete).unify().or(base_done).unify().or(clone).unify().boxed();
    let envs = list_envs.or(env_one).unify().or(env_delete).unify().or(env_done).unify().or(snapshot).unify().boxed();
    let deps = list_deps.or(dep_one).unify().or(dep_delete).unify().or(dep_done).unify().or(run_app).unify().boxed();
    let apps = list_apps.or(app_one).unify().or(app_delete).unify().boxed();
    users.or(bases).unify().or(envs).unify().or(deps).unify().or(apps).unify().boxed()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUserBody {
    name: String,
    #[serde(default)]
    max_environments: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetUserBody {
    max_environments: u32,
}

async fn create_user(hive: Hive, token: Option<String>, body: bytes::Bytes) -> ApiResult {
    require_admin(&hive, token.as_deref())?;
    let b: NewUserBody = reply::body(&body)?;
    Ok(reply::json_status(StatusCode::CREATED, &hive.lifecycle().create_user(&b.name, b.max_environments).await?))
}

async fn set_user(hive: Hive, name: String, token: Option<String>, body: bytes::Bytes) -> ApiResult {
    require_admin(&hive, token.as_deref())?;
    let b: SetUserBody = reply::body(&body)?;
    Ok(reply::json(&hive.lifecycle().set_max_environments(&name, b.max_environments).await?))
}

async fn create_baseimage(hive: Hive, token: Option<String>, body: bytes::Bytes) -> ApiResult {
    require_admin(&hive, token.as_deref())?;
    let who = caller(&hive, token.as_deref()).await?;
    let req: BaseimageRequest = reply::body(&body)?;
    Ok(reply::json_status(StatusCode::ACCEPTED, &hive.lifecycle().create_baseimage(&who, req).await?))
}

/// CloneTemplate, CreateSnapshot or RunApp: `kind` is what is made from parent `id`.
async fn derive(hive: Hive, kind: Kind, id: String, token: Option<String>, body: bytes::Bytes) -> ApiResult {
    let who = caller(&hive, token.as_deref()).await?;
    let id = uint("id", &id)?;
    let req = match kind {
        Kind::Environment => DeriveRequest::Environment(reply::body::<EnvironmentRequest>(&body)?),
        Kind::Deployment => DeriveRequest::Deployment(reply::body::<DeploymentRequest>(&body)?),
        _ => DeriveRequest::App(reply::body::<AppRequest>(&body)?),
    };
    Ok(reply::json_status(StatusCode::ACCEPTED, &hive.lifecycle().derive(&who, id, req).await?))
}

async fn list(hive: Hive, kind: Kind, token: Option<String>) -> ApiResult {
    let who = caller(&hive, token.as_deref()).await?;
    Ok(reply::json(&hive.lifecycle().list(&who, kind).await))
}

async fn show(hive: Hive, kind: Kind, id: String, token: Option<String>) -> ApiResult {
    let who = caller(&hive, token.as_deref()).await?;
    Ok(reply::json(&hive.lifecycle().get(&who, kind, uint("id", &id)?).await?))
}

async fn done(hive: Hive, kind: Kind, id: String, token: Option<String>) -> ApiResult {
    let who = caller(&hive, token.as_deref()).await?;
    Ok(reply::json_status(StatusCode::ACCEPTED, &hive.lifecycle().done(&who, kind, uint("id", &id)?).await?))
}

async fn delete(hive: Hive, kind: Kind, id: String, token: Option<String>) -> ApiResult {
    let who = caller(&hive, token.as_deref()).await?;
    Ok(reply::json_status(StatusCode::ACCEPTED, &hive.lifecycle().delete(&who, kind, uint("id", &id)?).await?))
}
