//! Disks an agent sends the hive in one `PUT` (node credential), streamed into the image
//! registry: a migration worker's converted disk (`PUT /api/v1/agent/migrations/{id}/disk`, in
//! `migrations.rs`) and a disk exported to move a VM to another node
//! (`PUT /api/v1/agent/exports/{name}`, here). The headers say what the body is (`x-sha256`,
//! `Content-Length`, optionally `x-virtual-size`); the registry checks the SHA-256 at the end.
//! Content the registry holds already is not read again: 200 and that image; else 201 and the
//! new image.

use bytes::Buf;
use futures_util::{StreamExt, TryStreamExt};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::error::ApiError;
use super::reply::{self, ApiResult};
use super::{auth, timed, with_hive};
use crate::app::Hive;
use crate::images::{ImageError, NAME_MAX_CHARS, UploadSpec};

/// `PUT /api/v1/agent/exports/{name}`.
pub fn routes(hive: Hive) -> BoxedFilter<(Response,)> {
    let export = warp::path!("api" / "v1" / "agent" / "exports" / String)
        .and(warp::put())
        .and(with_hive(hive))
        .and(auth())
        .and(described())
        .and(warp::body::stream())
        .then(|name, hive, t, d, s| timed("/api/v1/agent/exports/{name}", export(hive, name, t, d, s)));
    export.boxed()
}

/// What an agent's upload says about its body (`x-sha256`, `Content-Length`, `x-virtual-size`).
pub(super) fn described() -> impl Filter<Extract = (Described,), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("x-sha256")
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::header::optional::<u64>("x-virtual-size"))
        .map(|sha256, size, virtual_size| Described { sha256, size, virtual_size })
}

/// What an agent's upload says about its body, in its headers.
pub(super) struct Described {
    pub sha256: Option<String>,
    pub size: Option<u64>,
    pub virtual_size: Option<u64>,
}

/// The node an agent's `Authorization: Bearer <credential>` header belongs to.
pub(super) async fn node_of(hive: &Hive, header: Option<&str>) -> Result<crate::domain::NodeId, ApiError> {
    let given = header.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
    hive.authenticate_agent(given).await.map_err(ApiError::from)
}

/// A disk exported by a node to move a VM (or a template) to another node.
async fn export<S, B>(hive: Hive, name: String, t: Option<String>, described: Described, body: S) -> ApiResult
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Send + Unpin,
    B: Buf,
{
    let node = node_of(&hive, t.as_deref()).await?;
    let name = image_name(&name)?;
    let readme = format!("Exported by node {node} to move a VM to another node.");
    into_registry(&hive, name, readme, described, body).await
}

/// The path segment as an image name: percent-decoded, 1 to `NAME_MAX_CHARS` characters, not
/// blank, no control characters (what the registry accepts).
fn image_name(segment: &str) -> Result<String, ApiError> {
    let name = percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| ApiError::bad("name", "must be UTF-8 once percent-decoded"))?
        .into_owned();
    let chars = name.chars().count();
    if name.trim().is_empty() || chars > NAME_MAX_CHARS {
        return Err(ApiError::bad("name", format!("must be 1 to {NAME_MAX_CHARS} characters, not blank (got {chars})")));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::bad("name", "must not contain control characters"));
    }
    Ok(name)
}

/// Stream `body` into the registry as image `name`, in the registry's chunks: 201 and the new
/// image, or 200 and the image the registry has with that SHA-256 already (the body unread). A
/// half-done upload of the same content is resumed: the body's first bytes up to its offset
/// are skipped. The image asks for 1 core, 512 MiB and the disk's virtual size (else its size).
pub(super) async fn into_registry<S, B>(hive: &Hive, name: String, readme: String, d: Described, body: S) -> ApiResult
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Send + Unpin,
    B: Buf,
{
    let sha = d.sha256.ok_or_else(|| ApiError::bad("x-sha256", "the disk's SHA-256 is required"))?;
    let size = d.size.ok_or_else(|| ApiError::bad("content-length", "the disk's size is required"))?;
    let images = hive.images();
    // Content the registry has answers before anything is checked of the body, which is not
    // read: an empty body too (how a client whose body the hive did not read asks again).
    if let Ok(image) = images.get(&sha).await {
        return Ok(reply::json(&image));
    }
    // The guest sees the disk's virtual size: that is what a VM of this image needs.
    let disk_mb = d.virtual_size.unwrap_or(size).div_ceil(1024 * 1024).max(1);
    let spec = UploadSpec { name, sha256: sha.clone(), size, readme: Some(readme), cores: 1, ram_mb: 512, disk_mb };
    let upload = match images.begin(spec).await {
        Ok((u, _)) => u,
        // The same content completed meanwhile.
        Err(ImageError::Exists(_)) => return Ok(reply::json(&images.get(&sha).await?)),
        Err(e) => return Err(e.into()),
    };
    let chunk = images.chunk_max().max(1) as usize;
    let mut offset = upload.offset;
    let mut buf = bytes::BytesMut::new();
    let mut body = body.map_ok(|mut b| b.copy_to_bytes(b.remaining()));
    let mut skip = offset;
    while let Some(part) = body.next().await {
        let mut part = part.map_err(|e| ApiError::BadBody(format!("upload broke off: {e}")))?;
        // A resumed upload already holds the first `offset` bytes.
        let drop_n = (skip as usize).min(part.len());
        part.advance(drop_n);
        skip -= drop_n as u64;
        buf.extend_from_slice(&part);
        while buf.len() >= chunk {
            let piece = buf.split_to(chunk).freeze();
            offset = images.write(&upload.upload_id, offset, piece).await?;
        }
    }
    if !buf.is_empty() {
        offset = images.write(&upload.upload_id, offset, buf.freeze()).await?;
    }
    if offset != size {
        return Err(ApiError::BadBody(format!("upload ended at byte {offset} of {size}")));
    }
    Ok(reply::json_status(StatusCode::CREATED, &images.complete(&upload.upload_id).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_decoded_and_checked_like_the_registrys() {
        assert_eq!(image_name("move-vm~1").unwrap(), "move-vm~1");
        assert_eq!(image_name("move-a%20b%C3%A9").unwrap(), "move-a bé");
        assert_eq!(image_name(&"é".repeat(NAME_MAX_CHARS)).unwrap().chars().count(), NAME_MAX_CHARS);
        for bad in ["%20%20", "a%0Ab", "%FF", &"x".repeat(NAME_MAX_CHARS + 1)] {
            let e = image_name(bad).expect_err(bad);
            assert!(matches!(e, ApiError::BadParam { field: "name", .. }), "{bad}: {e:?}");
        }
    }
}
