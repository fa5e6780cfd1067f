//! `/api/v1/images`: resumable image uploads (create or resume, PATCH chunks at an offset,
//! complete, abort), the images they become, and the origin's manifest and pieces. Handlers
//! parse, call one `ImageRegistry` method and shape the answer; uploads and deletions need the
//! admin token; manifests and pieces take the admin token or a node credential (`require_reader`).

use std::collections::HashMap;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use serde_json::json;
use warp::filters::BoxedFilter;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::auth::require_admin;
use super::error::ApiError;
use super::reply::{self, ApiResult, uint};
use super::{auth, body, timed, with_hive};
use crate::app::Hive;
use crate::images::{ImageError, UploadSpec};

type Chunk = BoxStream<'static, Result<Bytes, warp::Error>>;

pub fn routes(hive: Hive) -> BoxedFilter<(Response,)> {
    let h = || with_hive(hive.clone());
    let images = || warp::path("api").and(warp::path("v1")).and(warp::path("images"));
    let uploads = || warp::path("api").and(warp::path("v1")).and(warp::path("images")).and(warp::path("uploads"));
    let create = uploads()
        .and(warp::path::end())
        .and(warp::post())
        .and(h())
        .and(auth())
        .and(body())
        .then(|hive, t, b| timed("/api/v1/images/uploads", create_upload(hive, t, b)));
    let status = uploads()
        .and(warp::path!(String))
        .and(warp::get())
        .and(h())
        .and(auth())
        .then(|id, hive, t| timed("/api/v1/images/uploads/{id}", show_upload(hive, id, t)));
    let write = uploads()
        .and(warp::path!(String))
        .and(warp::patch())
        .and(h())
        .and(auth())
        .and(warp::query::<HashMap<String, String>>())
        .and(chunk())
        .then(|id, hive, t, q, c| timed("/api/v1/images/uploads/{id}", write_chunk(hive, id, t, q, c)));
    let complete = uploads()
        .and(warp::path!(String / "complete"))
        .and(warp::post())
        .and(h())
        .and(auth())
        .then(|id, hive, t| timed("/api/v1/images/uploads/{id}/complete", complete_upload(hive, id, t)));
    let abort = uploads()
        .and(warp::path!(String))
        .and(warp::delete())
        .and(h())
        .and(auth())
        .then(|id, hive, t| timed("/api/v1/images/uploads/{id}", abort_upload(hive, id, t)));
    let list = images().and(warp::path::end()).and(warp::get()).and(h()).then(|hive| timed("/api/v1/images", list_images(hive)));
    let show = images()
        .and(warp::path!(String))
        .and(warp::get())
        .and(h())
        .then(|sha, hive| timed("/api/v1/images/{sha256}", show_image(hive, sha)));
    let delete = images()
        .and(warp::path!(String))
        .and(warp::delete())
        .and(h())
        .and(auth())
        .then(|sha, hive, t| timed("/api/v1/images/{sha256}", delete_image(hive, sha, t)));
    let manifest = images()
        .and(warp::path!(String / "manifest"))
        .and(warp::get())
        .and(h())
        .and(auth())
        .then(|sha, hive, t| timed("/api/v1/images/{sha256}/manifest", show_manifest(hive, sha, t)));
    let piece = images()
        .and(warp::path!(String / "pieces" / String))
        .and(warp::get())
        .and(h())
        .and(auth())
        .then(|sha, i, hive, t| timed("/api/v1/images/{sha256}/pieces/{index}", show_piece(hive, sha, i, t)));
    let distribute = images()
        .and(warp::path!(String / "distribute"))
        .and(warp::post())
        .and(h())
        .and(auth())
        .and(body())
        .then(|sha, hive, t, b| timed("/api/v1/images/{sha256}/distribute", distribute(hive, sha, t, b)));
    let replicas = images()
        .and(warp::path!(String / "replicas"))
        .and(warp::get())
        .and(h())
        .then(|sha, hive| timed("/api/v1/images/{sha256}/replicas", replicas(hive, sha)));
    let upload_routes = create.or(status).unify().or(write).unify().or(complete).unify().or(abort).unify().boxed();
    let image_routes = list.or(show).unify().or(delete).unify().or(manifest).unify().or(piece).unify().boxed();
    let replica_routes = distribute.or(replicas).unify().boxed();
    upload_routes.or(image_routes).unify().or(replica_routes).unify().boxed()
}

/// Place replicas of an image on nodes (admin): 202 with the chosen nodes; they fetch it now.
async fn distribute(hive: Hive, sha: String, token: Option<String>, body: Bytes) -> ApiResult {
    require_admin(&hive, token.as_deref())?;
    let req: crate::images::distribute::DistributeRequest = if body.is_empty() { Default::default() } else { reply::body(&body)? };
    Ok(reply::json_status(StatusCode::ACCEPTED, &hive.distribute(&sha, req).await?))
}

async fn replicas(hive: Hive, sha: String) -> ApiResult {
    Ok(reply::json(&hive.replicas(&sha).await?))
}

/// Who may fetch manifests and pieces: the admin, and nodes with their own credential (the
/// hive is the origin their caches fill from).
async fn require_reader(hive: &Hive, header: Option<&str>) -> Result<(), ApiError> {
    let given = header.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
    if given.starts_with("hnc_") {
        return hive.authenticate_agent(given).await.map(|_| ()).map_err(ApiError::from);
    }
    require_admin(hive, header)
}

/// The raw request body as a stream, so a PATCH larger than `images.chunk_mb` is refused
/// without being held in memory (the 64 KiB JSON body limit does not apply here).
fn chunk() -> impl Filter<Extract = (Chunk,), Error = Rejection> + Clone {
    fn boxed<B: Buf>(s: impl futures_util::Stream<Item = Result<B, warp::Error>> + Send + 'static) -> Chunk {
        Box::pin(s.map_ok(|mut b| b.copy_to_bytes(b.remaining())))
    }
    warp::body::stream().map(boxed)
}

async fn collect(mut body: Chunk, max: u64) -> Result<Bytes, ApiError> {
    let mut buf = BytesMut::new();
    while let Some(part) = body.next().await {
        let part = part.map_err(|e| ApiError::BadBody(e.to_string()))?;
        if (buf.len() + part.len()) as u64 > max {
            return Err(ImageError::ChunkTooLarge { max }.into());
        }
        buf.extend_from_slice(&part);
    }
    Ok(buf.freeze())
}

async fn create_upload(hive: Hive, token: Option<String>, body: Bytes) -> ApiResult {
    require_admin(&hive, token.as_deref())?;
    let spec: UploadSpec = reply::body(&body)?;
    let (view, created) = hive.images().begin(spec).await?;
    Ok(reply::json_status(if created { StatusCode::CREATED } else { StatusCode::OK }, &view))
}

async fn show_upload(hive: Hive, id: String, token: Option<String>) -> ApiResult {
    require_admin(&hive, token.as_deref())?;
    Ok(reply::json(&hive.images().upload(&id).await?))
}

async fn write_chunk(hive: Hive, id: String, token: Option<String>, query: HashMap<String, String>, body: Chunk) -> ApiResult {
    require_admin(&hive, token.as_deref())?;
    let Some(raw) = query.get("offset") else { return Err(ApiError::bad("offset", "the query parameter ?offset=N is required")) };
    let offset: u64 = uint("offset", raw)?;
    let data = collect(body, hive.images().chunk_max()).await?;
    let offset = hive.images().write(&id, offset, data).await?;
    Ok(reply::json(&json!({ "offset": offset })))
}

async fn complete_upload(hive: Hive, id: String, token: Option<String>) -> ApiResult {
    require_admin(&hive, token.as_deref())?;
    Ok(reply::json_status(StatusCode::CREATED, &hive.images().complete(&id).await?))
}

async fn abort_upload(hive: Hive, id: String, token: Option<String>) -> ApiResult {
    require_admin(&hive, token.as_deref())?;
    hive.images().abort(&id).await?;
    Ok(reply::no_content())
}

async fn list_images(hive: Hive) -> ApiResult {
    Ok(reply::json(&hive.images().list().await?))
}

async fn show_image(hive: Hive, sha256: String) -> ApiResult {
    Ok(reply::json(&hive.images().get(&sha256).await?))
}

async fn delete_image(hive: Hive, sha256: String, token: Option<String>) -> ApiResult {
    require_admin(&hive, token.as_deref())?;
    hive.images().delete(&sha256).await?;
    Ok(reply::no_content())
}

async fn show_manifest(hive: Hive, sha256: String, token: Option<String>) -> ApiResult {
    require_reader(&hive, token.as_deref()).await?;
    Ok(reply::json(&hive.images().manifest(&sha256).await?))
}

async fn show_piece(hive: Hive, sha256: String, index: String, token: Option<String>) -> ApiResult {
    require_reader(&hive, token.as_deref()).await?;
    let index: u64 = uint("index", &index)?;
    let bytes = hive.images().piece(&sha256, index).await?;
    let mut r = Response::new(bytes.into());
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    Ok(r)
}
