//! The peer side of distribution, as warp routes the agent mounts on its own port:
//! `GET /pieces/{image}/have` (a `Have`: held and pending pieces) and `GET /pieces/{image}/{index}`
//! (the piece's bytes, from the cache, sent through the node's upload limit). A piece that is not
//! held is a 404, so the asker goes elsewhere; errors use the hive's JSON envelope.
//!
//! `file_origin` is a stand-in for the hive's image routes (`/api/v1/images/{sha256}/manifest`
//! and `/pieces/{index}`, bearer token) serving whole files, for tests and benchmarks.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use warp::filters::BoxedFilter;
use warp::http::{HeaderValue, header};
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

use super::cache::PieceCache;
use super::catalog::Catalog;
use super::limiter::Bandwidth;
use super::manifest::Manifest;
use crate::http::ApiError;

/// Bytes sent per limiter payment: small enough that parallel transfers interleave finely.
const SEND_CHUNK: usize = 128 * 1024;

/// The piece server of one node.
pub fn routes(catalog: Catalog, cache: PieceCache, up: Bandwidth) -> BoxedFilter<(Response,)> {
    let have = {
        let catalog = catalog.clone();
        let cache = cache.clone();
        warp::path!("pieces" / String / "have").and(warp::get()).map(move |image: String| match catalog.get(&image) {
            Some(entry) => warp::reply::json(&entry.have(&cache)).into_response(),
            None => unknown_image(&image),
        })
    };
    let piece = warp::path!("pieces" / String / String).and(warp::get()).then(move |image: String, index: String| {
        let (catalog, cache, up) = (catalog.clone(), cache.clone(), up.clone());
        async move {
            let Some(entry) = catalog.get(&image) else { return unknown_image(&image) };
            let index = match parse_index(&index, entry.hashes().len()) {
                Ok(i) => i,
                Err(e) => return e.into_response(),
            };
            match cache.serve(&entry.hashes()[index]).await {
                Some(bytes) => limited(bytes, up),
                None => ApiError::NotFound { code: "piece_not_held", message: format!("piece {index} of {image} is not held here") }
                    .into_response(),
            }
        }
    });
    have.or(piece).unify().recover(recover).unify().boxed()
}

/// The hive's image routes over plain files: a stand-in origin for tests and benchmarks.
pub fn file_origin(images: Vec<(Manifest, PathBuf)>, token: Option<SecretString>, up: Bandwidth) -> BoxedFilter<(Response,)> {
    let images: Arc<HashMap<String, (Manifest, PathBuf)>> = Arc::new(images.into_iter().map(|(m, p)| (m.sha256.clone(), (m, p))).collect());
    let token = Arc::new(token);
    let authorized = warp::header::optional::<String>("authorization").and_then(move |given: Option<String>| {
        let token = token.clone();
        async move {
            match token.as_ref() {
                Some(t) if given.as_deref() != Some(format!("Bearer {}", t.expose_secret()).as_str()) => Err(warp::reject::custom(Denied)),
                _ => Ok(()),
            }
        }
    });
    let base = warp::path("api").and(warp::path("v1")).and(warp::path("images")).and(authorized).untuple_one();
    let manifest = {
        let images = images.clone();
        base.clone().and(warp::path!(String / "manifest")).and(warp::get()).map(move |sha: String| match images.get(&sha) {
            Some((m, _)) => warp::reply::json(m).into_response(),
            None => unknown_image(&sha),
        })
    };
    let piece = base.and(warp::path!(String / "pieces" / String)).and(warp::get()).then(move |sha: String, index: String| {
        let (images, up) = (images.clone(), up.clone());
        async move {
            let Some((m, path)) = images.get(&sha) else { return unknown_image(&sha) };
            let index = match parse_index(&index, m.piece_count()) {
                Ok(i) => i,
                Err(e) => return e.into_response(),
            };
            let Ok(range) = m.piece_range(index) else { return unknown_image(&sha) };
            let path = path.clone();
            let read = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; (range.end - range.start) as usize];
                std::fs::File::open(path)?.read_exact_at(&mut buf, range.start).map(|()| buf)
            })
            .await;
            match read {
                Ok(Ok(buf)) => limited(Bytes::from(buf), up),
                Ok(Err(e)) => ApiError::Unavailable(format!("reading piece {index}: {e}")).into_response(),
                Err(e) => ApiError::Unavailable(format!("reading piece {index}: {e}")).into_response(),
            }
        }
    });
    manifest.or(piece).unify().recover(recover).unify().boxed()
}

/// `bytes` as a response body, each chunk paid to `up` before it is sent.
fn limited(bytes: Bytes, up: Bandwidth) -> Response {
    let len = bytes.len();
    crate::metrics::piece_bytes("up", len as u64);
    let chunks = futures_util::stream::unfold((bytes, up), |(mut rest, up)| async move {
        if rest.is_empty() {
            return None;
        }
        let chunk = rest.split_to(SEND_CHUNK.min(rest.len()));
        up.consume(chunk.len() as u64).await;
        Some((Ok::<_, Infallible>(chunk), (rest, up)))
    });
    let mut r = warp::reply::stream(chunks).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}

fn parse_index(raw: &str, count: usize) -> Result<usize, ApiError> {
    match raw.parse::<usize>() {
        Ok(i) if i < count => Ok(i),
        Ok(i) => Err(ApiError::NotFound { code: "no_such_piece", message: format!("piece {i} does not exist (the image has {count})") }),
        Err(_) => Err(ApiError::bad("index", format!("must be a non-negative integer (got {raw:?})"))),
    }
}

fn unknown_image(image: &str) -> Response {
    let shown: String = image.chars().take(80).collect();
    ApiError::NotFound { code: "unknown_image", message: format!("image {shown:?} is not known here") }.into_response()
}

#[derive(Debug)]
struct Denied;
impl warp::reject::Reject for Denied {}

async fn recover(err: Rejection) -> Result<Response, Infallible> {
    let e = if err.find::<Denied>().is_some() {
        ApiError::Unauthorized
    } else if err.is_not_found() {
        ApiError::NoRoute
    } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::MethodNotAllowed
    } else {
        ApiError::BadBody(format!("{err:?}"))
    };
    Ok(e.into_response())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::distribution::cache::CacheConfig;
    use crate::distribution::source::{HttpSource, PieceRef, PieceSource, SourceError};

    struct Fixture {
        _dir: tempfile::TempDir,
        url: String,
        manifest: Manifest,
        data: Vec<u8>,
        cache: PieceCache,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn start(routes_for: impl FnOnce(&Fixture0) -> BoxedFilter<(Response,)>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let path = dir.path().join("img");
        std::fs::write(&path, &data).unwrap();
        let manifest = Manifest::from_file(&path, 100_000).unwrap();
        let cache = PieceCache::open(CacheConfig::new(dir.path().join("cache"))).await.unwrap();
        let f0 = Fixture0 { manifest: manifest.clone(), path, cache: cache.clone() };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(warp::serve(routes_for(&f0)).incoming(listener).run());
        Fixture { _dir: dir, url, manifest, data, cache, task }
    }

    struct Fixture0 {
        manifest: Manifest,
        path: PathBuf,
        cache: PieceCache,
    }

    async fn get(url: String) -> (u16, Bytes) {
        let r = reqwest::Client::builder().no_proxy().build().unwrap().get(url).send().await.unwrap();
        (r.status().as_u16(), r.bytes().await.unwrap())
    }

    fn code(body: &[u8]) -> String {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        v["error"]["code"].as_str().unwrap().to_string()
    }

    fn peer_routes(up: Bandwidth) -> impl FnOnce(&Fixture0) -> BoxedFilter<(Response,)> {
        move |f| {
            let catalog = Catalog::default();
            catalog.add(f.manifest.clone()).unwrap();
            routes(catalog, f.cache.clone(), up)
        }
    }

    #[tokio::test]
    async fn held_pieces_are_served_and_the_rest_is_a_clear_404() {
        let f = start(peer_routes(Bandwidth::unlimited())).await;
        let h1 = f.manifest.piece_hash(1).unwrap();
        f.cache.insert(h1, Bytes::copy_from_slice(&f.data[100_000..200_000])).await.unwrap();
        let sha = &f.manifest.sha256;
        let (status, body) = get(format!("{}/pieces/{sha}/1", f.url)).await;
        assert_eq!((status, &body[..]), (200, &f.data[100_000..200_000]));
        let (status, body) = get(format!("{}/pieces/{sha}/0", f.url)).await;
        assert_eq!((status, code(&body)), (404, "piece_not_held".to_string()));
        let (status, body) = get(format!("{}/pieces/{sha}/3", f.url)).await;
        assert_eq!((status, code(&body)), (404, "no_such_piece".to_string()));
        let (status, body) = get(format!("{}/pieces/{sha}/one", f.url)).await;
        assert_eq!((status, code(&body)), (400, "invalid_param".to_string()));
        let (status, body) = get(format!("{}/pieces/{}/0", f.url, "ab".repeat(32))).await;
        assert_eq!((status, code(&body)), (404, "unknown_image".to_string()));
        let (status, body) = get(format!("{}/nothing", f.url)).await;
        assert_eq!((status, code(&body)), (404, "no_route".to_string()));
        assert_eq!(f.cache.stats().snapshot().served, 1);
    }

    #[tokio::test]
    async fn have_lists_what_the_cache_holds_now() {
        let f = start(peer_routes(Bandwidth::unlimited())).await;
        let peer = HttpSource::peer("p", f.url.clone(), reqwest::Client::builder().no_proxy().build().unwrap());
        let (held, _) = peer.have(&f.manifest.sha256).await.unwrap().bitmaps(3).unwrap();
        assert_eq!(held.count_ones(), 0);
        f.cache.insert(f.manifest.piece_hash(2).unwrap(), Bytes::copy_from_slice(&f.data[200_000..])).await.unwrap();
        let (held, pending) = peer.have(&f.manifest.sha256).await.unwrap().bitmaps(3).unwrap();
        assert!(held.get(2) && !held.get(0) && pending.count_ones() == 0);
        let unknown = peer.have(&"cd".repeat(32)).await.unwrap_err();
        assert!(matches!(unknown, SourceError::Status { status: 404, .. }), "{unknown}");
        let piece = PieceRef { image: &f.manifest.sha256, index: 0, len: 100_000 };
        assert!(matches!(peer.get(piece, &Bandwidth::unlimited()).await, Err(SourceError::NotHeld { index: 0, .. })));
    }

    #[tokio::test]
    async fn serving_is_no_faster_than_the_upload_cap() {
        let (rate, burst) = (400_000, 64 * 1024);
        let f = start(peer_routes(Bandwidth::new(rate, burst).unwrap())).await;
        for i in 0..3 {
            let r = f.manifest.piece_range(i).unwrap();
            f.cache
                .insert(f.manifest.piece_hash(i).unwrap(), Bytes::copy_from_slice(&f.data[r.start as usize..r.end as usize]))
                .await
                .unwrap();
        }
        let peer = HttpSource::peer("p", f.url.clone(), reqwest::Client::builder().no_proxy().build().unwrap());
        let started = Instant::now();
        let gets = (0..3).map(|i| {
            let (peer, sha) = (peer.clone(), f.manifest.sha256.clone());
            tokio::spawn(async move { peer.get(PieceRef { image: &sha, index: i, len: 100_000 }, &Bandwidth::unlimited()).await })
        });
        for g in gets.collect::<Vec<_>>() {
            assert_eq!(g.await.unwrap().unwrap().len(), 100_000);
        }
        let least = Duration::from_secs_f64((300_000 - burst) as f64 / rate as f64);
        assert!(started.elapsed() >= least, "300 kB in {:?} at {rate} B/s", started.elapsed());
    }

    #[tokio::test]
    async fn the_file_origin_wants_its_token() {
        let token = || Some(SecretString::from("t0k"));
        let f = start(move |f| file_origin(vec![(f.manifest.clone(), f.path.clone())], token(), Bandwidth::unlimited())).await;
        let sha = f.manifest.sha256.clone();
        let (status, body) = get(format!("{}/api/v1/images/{sha}/manifest", f.url)).await;
        assert_eq!((status, code(&body)), (401, "unauthorized".to_string()));
        let origin = HttpSource::origin(f.url.clone(), token(), reqwest::Client::builder().no_proxy().build().unwrap());
        assert_eq!(origin.manifest(&sha).await.unwrap(), f.manifest);
        let last = origin.get(PieceRef { image: &sha, index: 2, len: 100_000 }, &Bandwidth::unlimited()).await.unwrap();
        assert_eq!(&last[..], &f.data[200_000..]);
        let wrong =
            HttpSource::origin(f.url.clone(), Some(SecretString::from("nope")), reqwest::Client::builder().no_proxy().build().unwrap());
        assert!(matches!(wrong.manifest(&sha).await, Err(SourceError::Status { status: 401, .. })));
    }
}
