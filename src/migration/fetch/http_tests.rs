//! `http` sources against real servers on loopback: a warp server for the well-behaved cases,
//! and a hand-written one for servers that close early, stall or trickle.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use warp::Filter;

use super::super::tests::{entries, progress, random_bytes, sha256_file};
use crate::migration::fetch::{DiskFormat, FetchError, HttpParams, SourceSpec, discover, fetch, probe_source};

fn source(base_url: String, stall_timeout_ms: u64) -> SourceSpec {
    SourceSpec::Http(HttpParams { base_url, connect_timeout_ms: 2_000, stall_timeout_ms })
}

/// A warp server with `/exports/index.json` and `/exports/disk.vmdk`; everything else is 404.
async fn export_server(disk: Arc<Vec<u8>>) -> SocketAddr {
    let index = serde_json::json!([
        { "name": "web01 system disk", "path": "disk.vmdk", "size": disk.len() },
        { "name": "web01 data", "path": "data/web01-data.vhd" },
    ]);
    let index_route = warp::path!("exports" / "index.json").map(move || warp::reply::json(&index));
    let disk_route = warp::path!("exports" / "disk.vmdk").map(move || disk.as_ref().clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(warp::get().and(index_route.or(disk_route))).incoming(listener).run());
    addr
}

#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Advertise 1 MB, send 1000 bytes, close.
    ClosesEarly,
    /// Advertise 1 MB, send 1000 bytes, then nothing while holding the connection open.
    Stalls,
    /// Advertise 100 MB and send 1 KiB every 20 ms.
    Trickles,
}

/// A server that reads one request head per connection and then misbehaves.
async fn misbehaving_server(how: Misbehaviour) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(misbehave(conn, how));
        }
    });
    addr
}

async fn misbehave(mut conn: TcpStream, how: Misbehaviour) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let length = if matches!(how, Misbehaviour::Trickles) { 100_000_000 } else { 1_000_000 };
    let header = format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nContent-Type: application/octet-stream\r\n\r\n");
    if conn.write_all(header.as_bytes()).await.is_err() || conn.write_all(&[7u8; 1000]).await.is_err() {
        return;
    }
    match how {
        Misbehaviour::ClosesEarly => {}
        Misbehaviour::Stalls => {
            // Holds the connection until the client gives up and closes it.
            let _ = conn.read(&mut buf).await;
        }
        Misbehaviour::Trickles => loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if conn.write_all(&[7u8; 1024]).await.is_err() {
                return;
            }
        },
    }
}

#[tokio::test]
async fn discovery_reads_the_index() {
    let addr = export_server(Arc::new(random_bytes(4096))).await;
    let spec = source(format!("http://{addr}/exports"), 5_000);
    probe_source(&spec).await.unwrap();
    let found = discover(&spec).await.unwrap();
    let summary: Vec<_> = found
        .iter()
        .map(|r| (r.id_at_source.as_str(), r.name.as_str(), r.properties["format"].as_str(), r.properties["size"].as_u64()))
        .collect();
    assert_eq!(
        summary,
        [("disk.vmdk", "web01 system disk", Some("vmdk"), Some(4096)), ("data/web01-data.vhd", "web01 data", Some("vpc"), None)]
    );
    assert_eq!(found[1].properties["url"], format!("http://{addr}/exports/data/web01-data.vhd"));
}

#[tokio::test]
async fn a_base_without_an_index_lists_nothing() {
    let addr = export_server(Arc::new(random_bytes(16))).await;
    let found = discover(&source(format!("http://{addr}/elsewhere/"), 5_000)).await.unwrap();
    assert!(found.is_empty(), "{found:?}");
}

#[tokio::test]
async fn a_closed_port_is_down() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = probe_source(&source(format!("http://{addr}/"), 5_000)).await.unwrap_err();
    assert!(matches!(err, FetchError::Http { ref url, .. } if url.contains(&addr.to_string())), "{err:?}");
}

#[tokio::test]
async fn fetch_streams_the_disk_exactly_with_progress() {
    let disk = Arc::new(random_bytes(3 << 20));
    let addr = export_server(disk.clone()).await;
    let scratch = tempfile::tempdir().unwrap();
    let (tx, rx) = progress();
    let spec = source(format!("http://{addr}/exports"), 5_000);
    let got = fetch(&spec, "disk.vmdk", scratch.path(), &tx, &CancellationToken::new()).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].bytes, got[0].format_hint, got[0].temporary), (3 << 20, Some(DiskFormat::Vmdk), true));
    assert_eq!(got[0].path, scratch.path().join("disk.vmdk"));
    assert_eq!(sha256_file(&got[0].path), sha256_of(&disk));
    assert_eq!(*rx.borrow(), (3 << 20, Some(3 << 20)));
}

fn sha256_of(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).to_vec()
}

#[tokio::test]
async fn a_404_names_the_status_and_leaves_nothing() {
    let addr = export_server(Arc::new(random_bytes(16))).await;
    let scratch = tempfile::tempdir().unwrap();
    let (tx, _rx) = progress();
    let spec = source(format!("http://user:hunter2@{addr}/exports/"), 5_000);
    let err = fetch(&spec, "missing.vmdk", scratch.path(), &tx, &CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, FetchError::HttpStatus { status: 404, .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("404") && text.contains("missing.vmdk") && !text.contains("hunter2"), "{text}");
    assert!(entries(scratch.path()).is_empty());
}

#[tokio::test]
async fn ids_outside_the_base_url_are_refused() {
    let addr = export_server(Arc::new(random_bytes(16))).await;
    let scratch = tempfile::tempdir().unwrap();
    let (tx, _rx) = progress();
    let spec = source(format!("http://{addr}/exports/"), 5_000);
    for id in ["../secret.vmdk", "/other/disk.vmdk", "http://127.0.0.2/exports/disk.vmdk", ""] {
        let err = fetch(&spec, id, scratch.path(), &tx, &CancellationToken::new()).await.unwrap_err();
        assert!(matches!(err, FetchError::BadId { .. }), "{id:?}: {err:?}");
    }
    let absolute = format!("http://{addr}/exports/disk.vmdk");
    assert_eq!(fetch(&spec, &absolute, scratch.path(), &tx, &CancellationToken::new()).await.unwrap()[0].bytes, 16);
}

#[tokio::test]
async fn a_body_shorter_than_its_length_fails_and_leaves_nothing() {
    let addr = misbehaving_server(Misbehaviour::ClosesEarly).await;
    let scratch = tempfile::tempdir().unwrap();
    let (tx, _rx) = progress();
    let err =
        fetch(&source(format!("http://{addr}/"), 5_000), "disk.raw", scratch.path(), &tx, &CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, FetchError::ShortBody { got: 1000, expected: 1_000_000, .. }), "{err:?}");
    assert!(entries(scratch.path()).is_empty());
}

#[tokio::test]
async fn a_stalled_server_times_out_and_leaves_nothing() {
    let addr = misbehaving_server(Misbehaviour::Stalls).await;
    let scratch = tempfile::tempdir().unwrap();
    let (tx, rx) = progress();
    let err = fetch(&source(format!("http://{addr}/"), 300), "disk.raw", scratch.path(), &tx, &CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, FetchError::Timeout { after, .. } if after == Duration::from_millis(300)), "{err:?}");
    assert_eq!(rx.borrow().0, 1000, "the first chunk arrived before the stall");
    assert!(entries(scratch.path()).is_empty());
}

#[tokio::test]
async fn cancel_during_a_download_leaves_nothing() {
    let addr = misbehaving_server(Misbehaviour::Trickles).await;
    let scratch = tempfile::tempdir().unwrap();
    let (tx, mut rx) = progress();
    let cancel = CancellationToken::new();
    let task = {
        let (spec, dir, cancel) = (source(format!("http://{addr}/"), 5_000), scratch.path().to_path_buf(), cancel.clone());
        tokio::spawn(async move { fetch(&spec, "disk.raw", &dir, &tx, &cancel).await })
    };
    let arrived = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|(done, _)| *done > 2000)).await.map(|r| r.is_ok());
    assert_eq!(arrived, Ok(true), "no bytes arrived within 10 s");
    assert_eq!(entries(scratch.path()), ["disk.raw"], "the partial file exists while downloading");
    cancel.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), task).await.expect("fetch ends soon after cancel").unwrap();
    assert!(matches!(result, Err(FetchError::Cancelled)), "{result:?}");
    assert_eq!(rx.borrow().1, Some(100_000_000));
    assert_partial_gone(scratch.path());
}

fn assert_partial_gone(dir: &Path) {
    assert!(entries(dir).is_empty(), "left behind: {:?}", entries(dir));
}
