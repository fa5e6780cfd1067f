//! The worker pipeline against the real qemu-img and qemu-io, file and HTTP sources, and warp
//! servers on loopback standing in for the hive. Every failure case checks that the job's
//! scratch directory is gone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Buf;
use futures_util::StreamExt;
use secrecy::SecretString;
use serde_json::json;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warp::Filter;
use warp::http::StatusCode;

use super::*;
use crate::migration::fetch::{FileParams, HttpParams};

const MIB: u64 = 1024 * 1024;
const TOKEN: &str = "hnc_worker_test_token";

/// Runs a qemu tool; the test fails with its stderr if it does.
async fn run(program: &str, args: &[&str]) {
    let out = tokio::process::Command::new(program).args(args).output().await.unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn s(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}

/// A raw disk of `mib` MiB holding known patterns at its start, a quarter in and its last MiB.
async fn raw_disk(path: &Path, mib: u64) {
    run("qemu-img", &["create", "-q", "-f", "raw", s(path), &format!("{mib}M")]).await;
    let writes = ["write -P 0xab 0 1M".to_string(), format!("write -P 0x5a {}M 2M", mib / 4), format!("write -P 0x11 {}M 1M", mib - 1)];
    let mut args = vec!["-f", "raw"];
    for w in &writes {
        args.extend(["-c", w.as_str()]);
    }
    args.push(s(path));
    run("qemu-io", &args).await;
}

fn file_job(job: u64, dir: &Path, id: &str, scratch_root: &Path, in_place: bool) -> WorkerJob {
    WorkerJob {
        job,
        source: SourceSpec::File(FileParams { dir: dir.to_path_buf(), in_place }),
        id_at_source: id.to_string(),
        scratch_root: scratch_root.to_path_buf(),
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).expect("read dir").map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Everything sent on a step channel whose senders are all gone.
fn drain(mut rx: mpsc::UnboundedReceiver<(Event, u8)>) -> Vec<(Event, u8)> {
    let mut seen = Vec::new();
    while let Ok(step) = rx.try_recv() {
        seen.push(step);
    }
    seen
}

/// Waits (at most 60 s) for a report of `event` at `at_least` percent or more.
async fn wait_for_step(rx: &mut mpsc::UnboundedReceiver<(Event, u8)>, event: Event, at_least: u8) -> Vec<(Event, u8)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let step =
            tokio::time::timeout_at(deadline, rx.recv()).await.unwrap_or_else(|_| panic!("no {event:?} ≥ {at_least}% in 60 s: {seen:?}"));
        let step = step.unwrap_or_else(|| panic!("the job ended before {event:?} reached {at_least}%: {seen:?}"));
        seen.push(step);
        assert_ne!(step, (event, 100), "{event:?} finished before it could be cancelled");
        if step.0 == event && step.1 >= at_least {
            return seen;
        }
    }
}

/// Checks the reports name `expected` steps in order, each from 0, never back, ending at 100.
fn assert_steps(seen: &[(Event, u8)], expected: &[Event]) {
    let mut order: Vec<Event> = seen.iter().map(|(e, _)| *e).collect();
    order.dedup();
    assert_eq!(order, expected, "{seen:?}");
    for event in expected {
        let percents: Vec<u8> = seen.iter().filter(|(e, _)| e == event).map(|(_, p)| *p).collect();
        assert_eq!(percents.first(), Some(&0), "{event:?}: {percents:?}");
        assert_eq!(percents.last(), Some(&100), "{event:?}: {percents:?}");
        assert!(percents.windows(2).all(|w| w[0] <= w[1]), "{event:?} went back: {percents:?}");
    }
}

#[tokio::test]
async fn a_vmdk_in_a_file_source_becomes_a_qcow2_with_the_same_content() {
    let tmp = TempDir::new().expect("temp dir");
    let (exports, root) = (tmp.path().join("exports"), tmp.path().join("scratch"));
    std::fs::create_dir_all(exports.join("web01")).expect("exports");
    let raw = tmp.path().join("original.img");
    raw_disk(&raw, 16).await;
    let vmdk = exports.join("web01/disk.vmdk");
    run("qemu-img", &["convert", "-q", "-f", "raw", "-O", "vmdk", s(&raw), s(&vmdk)]).await;

    let (steps, rx) = mpsc::unbounded_channel();
    let job = file_job(7, &exports, "web01/disk.vmdk", &root, false);
    let (scratch, converted) = prepare(&job, &steps, &CancellationToken::new()).await.expect("prepare");
    drop(steps);

    assert_steps(&drain(rx), &[Event::ConnectingToSource, Event::FetchingDisks, Event::ConvertingDisks]);
    assert_eq!(scratch.path(), root.join("7"));
    assert_eq!(converted.path, root.join("7/disk.qcow2"));
    assert!(convert::compare(&raw, &converted.path).await.expect("compare"), "the qcow2 differs from the raw disk");
    assert_eq!(convert::probe(&converted.path).await.expect("probe").format, DiskFormat::Qcow2);
    let bytes = std::fs::read(&converted.path).expect("read qcow2");
    assert_eq!(converted.sha256, sha256_hex(&bytes));
    assert_eq!(converted.size, bytes.len() as u64);
    assert_eq!((converted.virtual_size, converted.source_format), (16 * MIB, DiskFormat::Vmdk));
    assert_eq!(names(scratch.path()), ["disk.qcow2"], "the fetched copy and its directory are gone");
    assert!(vmdk.exists(), "the source's own file stays");

    drop(scratch);
    assert!(!root.join("7").exists(), "dropping the scratch removes the job directory");
    assert!(names(&root).is_empty());
}

#[tokio::test]
async fn bad_disks_and_ids_fail_for_good_and_leave_nothing() {
    let tmp = TempDir::new().expect("temp dir");
    let (exports, root) = (tmp.path().join("exports"), tmp.path().join("scratch"));
    std::fs::create_dir(&exports).expect("exports");
    std::fs::write(exports.join("garbage.vmdk"), (0..MIB).map(|i| (i * 7919 % 251) as u8).collect::<Vec<u8>>()).expect("garbage");
    // A real vmdk whose header past the magic is overwritten: qemu-img cannot read it.
    let raw = tmp.path().join("r.img");
    raw_disk(&raw, 4).await;
    let broken = exports.join("broken.vmdk");
    run("qemu-img", &["convert", "-q", "-f", "raw", "-O", "vmdk", s(&raw), s(&broken)]).await;
    let mut head = std::fs::read(&broken).expect("vmdk");
    head[4..512].fill(0xff);
    std::fs::write(&broken, head).expect("corrupt");

    for (job, id) in [(1, "garbage.vmdk"), (2, "broken.vmdk"), (3, "missing.vmdk"), (4, "../r.img")] {
        let (steps, _rx) = mpsc::unbounded_channel();
        let err = prepare(&file_job(job, &exports, id, &root, false), &steps, &CancellationToken::new()).await.expect_err(id);
        match (id, &err) {
            ("garbage.vmdk", WorkerError::Convert(ConvertError::FormatMismatch { .. }))
            | ("broken.vmdk", WorkerError::Convert(ConvertError::QemuImg { .. }))
            | ("missing.vmdk", WorkerError::Source(FetchError::NotFound(_)))
            | ("../r.img", WorkerError::Source(FetchError::BadId { .. })) => {}
            _ => panic!("{id}: unexpected {err:?}"),
        }
        assert!(!err.retryable(), "{id}: another node would fail the same: {err}");
        assert!(!root.join(job.to_string()).exists(), "{id}: the job directory is left");
    }
    assert!(names(&root).is_empty(), "{:?}", names(&root));
}

#[tokio::test]
async fn an_unreachable_http_source_is_worth_another_node() {
    let tmp = TempDir::new().expect("temp dir");
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let job = WorkerJob {
        job: 5,
        source: SourceSpec::Http(HttpParams {
            base_url: format!("http://127.0.0.1:{port}/exports/"),
            connect_timeout_ms: 2_000,
            stall_timeout_ms: 2_000,
        }),
        id_at_source: "disk.vmdk".into(),
        scratch_root: tmp.path().join("scratch"),
    };
    let (steps, rx) = mpsc::unbounded_channel();
    let err = prepare(&job, &steps, &CancellationToken::new()).await.expect_err("nothing listens");
    drop(steps);
    assert!(matches!(err, WorkerError::Source(FetchError::Http { .. })), "{err:?}");
    assert!(err.retryable(), "{err}");
    assert!(err.to_string().contains(&port.to_string()), "the error names the source: {err}");
    assert_eq!(drain(rx), [(Event::ConnectingToSource, 0)]);
    assert!(!tmp.path().join("scratch/5").exists());
}

#[tokio::test]
async fn cancel_during_the_conversion_stops_it_and_removes_the_job_directory() {
    let tmp = TempDir::new().expect("temp dir");
    let (exports, root) = (tmp.path().join("exports"), tmp.path().join("scratch"));
    std::fs::create_dir(&exports).expect("exports");
    // 512 MiB of data in 32 MiB writes (one huge request is several times slower).
    let source = exports.join("big.vdi");
    run("qemu-img", &["create", "-q", "-f", "vdi", s(&source), "512M"]).await;
    let writes: Vec<String> = (0..16).map(|i| format!("write -P {} {}M 32M", 0x40 + i, 32 * i)).collect();
    let mut args = vec!["-f", "vdi"];
    for w in &writes {
        args.extend(["-c", w.as_str()]);
    }
    args.push(s(&source));
    run("qemu-io", &args).await;

    // In place: the conversion reads the export itself, which must survive the cancel.
    let job = file_job(11, &exports, "big.vdi", &root, true);
    let (steps, mut rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { prepare(&job, &steps, &cancel).await.map(|(_, converted)| converted) }
    });
    wait_for_step(&mut rx, Event::ConvertingDisks, 1).await;
    assert!(root.join("11").exists(), "the job works in its directory");
    cancel.cancel();
    let result = tokio::time::timeout(Duration::from_secs(30), task).await.expect("prepare returns after cancel").expect("task");

    let err = result.expect_err("cancelled");
    assert!(matches!(err, WorkerError::Cancelled), "{err:?}");
    assert!(!err.retryable());
    assert!(!root.join("11").exists(), "{:?}", names(&root));
    assert!(source.exists(), "the in-place source is not the job's to delete");
    let rest = drain(rx);
    assert!(!rest.contains(&(Event::ConvertingDisks, 100)), "{rest:?}");
}

/// What the test hive received with a disk, for the tests to compare.
fn received(headers: &warp::http::HeaderMap, sha256: String, bytes: u64) -> serde_json::Value {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    json!({
        "sha256": sha256,
        "bytes": bytes,
        "content_length": header("content-length"),
        "virtual_size": header("x-virtual-size"),
        "chunked": header("transfer-encoding").is_some(),
    })
}

fn envelope(status: StatusCode, code: &str, message: &str) -> warp::reply::Response {
    use warp::Reply;
    warp::reply::with_status(warp::reply::json(&json!({ "error": { "code": code, "message": message } })), status).into_response()
}

type Body = futures_util::stream::BoxStream<'static, Result<bytes::Bytes, warp::Error>>;

/// warp's body stream has a type without a name; this gives it one.
fn boxed<B: Buf>(s: impl futures_util::Stream<Item = Result<B, warp::Error>> + Send + 'static) -> Body {
    Box::pin(s.map(|part| part.map(|mut b| b.copy_to_bytes(b.remaining()))))
}

/// A hive stand-in: `PUT /api/v1/migrations/<id>/disk` checks the bearer (refusing before it
/// reads the body, as the hive does), hashes the body against `x-sha256` and answers what it
/// received. With `pause`, it waits that long after each chunk it reads.
async fn hive(pause: Option<Duration>) -> SocketAddr {
    let route = warp::put()
        .and(warp::path!("api" / "v1" / "migrations" / u64 / "disk"))
        .and(warp::header::headers_cloned())
        .and(warp::body::stream().map(boxed))
        .then(move |_id: u64, headers: warp::http::HeaderMap, mut body: Body| async move {
            if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {TOKEN}")) {
                return envelope(StatusCode::UNAUTHORIZED, "unauthorized", "this node's credential was refused");
            }
            let (mut hasher, mut bytes) = (Sha256::new(), 0u64);
            while let Some(chunk) = body.next().await {
                let Ok(chunk) = chunk else { return envelope(StatusCode::BAD_REQUEST, "bad_body", "the body broke off") };
                hasher.update(&chunk);
                bytes += chunk.len() as u64;
                if let Some(pause) = pause {
                    tokio::time::sleep(pause).await;
                }
            }
            let sha256 = hex::encode(hasher.finalize());
            if headers.get("x-sha256").and_then(|v| v.to_str().ok()) != Some(sha256.as_str()) {
                return envelope(StatusCode::BAD_REQUEST, "sha256_mismatch", "the body does not match x-sha256");
            }
            warp::reply::Reply::into_response(warp::reply::json(&received(&headers, sha256, bytes)))
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(warp::serve(route).incoming(listener).run());
    addr
}

/// A file of `len` bytes that does not repeat within a chunk, described as a converted disk.
fn disk_file(dir: &Path, len: u64) -> Converted {
    let data: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let path: PathBuf = dir.join("disk.qcow2");
    std::fs::write(&path, &data).expect("write disk");
    Converted { path, sha256: sha256_hex(&data), size: len, virtual_size: 40 * MIB, source_format: DiskFormat::Vhdx }
}

#[tokio::test]
async fn upload_streams_the_disk_with_its_checks_and_returns_the_answer() {
    let tmp = TempDir::new().expect("temp dir");
    let converted = disk_file(tmp.path(), 3 * MIB + 123);
    let addr = hive(None).await;
    let (steps, rx) = mpsc::unbounded_channel();
    let url = format!("http://{addr}/api/v1/migrations/12/disk");
    let answer = upload(&converted, &url, &SecretString::from(TOKEN), &steps, &CancellationToken::new()).await.expect("upload");
    drop(steps);

    assert_eq!(answer["sha256"], converted.sha256.as_str(), "{answer}");
    assert_eq!(answer["bytes"], converted.size);
    assert_eq!(answer["content_length"], converted.size.to_string(), "sent with its length, not chunked: {answer}");
    assert_eq!(answer["chunked"], false);
    assert_eq!(answer["virtual_size"], (40 * MIB).to_string());
    let seen = drain(rx);
    assert_steps(&seen, &[Event::UploadingToDestination]);
    assert!(seen.len() > 3, "progress while sending, not only 0 and 100: {seen:?}");
}

#[tokio::test]
async fn a_refused_upload_names_the_status_and_the_hives_message() {
    let tmp = TempDir::new().expect("temp dir");
    // Larger than socket buffers: the hive answers long before the body could be sent.
    let converted = disk_file(tmp.path(), 32 * MIB);
    let addr = hive(None).await;
    let (steps, rx) = mpsc::unbounded_channel();
    let url = format!("http://{addr}/api/v1/migrations/12/disk");
    let err = upload(&converted, &url, &SecretString::from("hnc_wrong"), &steps, &CancellationToken::new()).await.expect_err("refused");
    drop(steps);

    assert!(matches!(err, WorkerError::Upload { status: Some(401), .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("401") && text.contains("this node's credential was refused"), "{text}");
    assert!(!text.contains("hnc_wrong"), "the token stays secret: {text}");
    assert!(err.retryable(), "another node has its own credential");
    assert!(!drain(rx).contains(&(Event::UploadingToDestination, 100)));
}

#[tokio::test]
async fn cancel_aborts_an_upload_to_a_slow_hive() {
    let tmp = TempDir::new().expect("temp dir");
    let converted = disk_file(tmp.path(), 64 * MIB);
    let addr = hive(Some(Duration::from_millis(50))).await;
    let (steps, mut rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let url = format!("http://{addr}/api/v1/migrations/12/disk");
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { upload(&converted, &url, &SecretString::from(TOKEN), &steps, &cancel).await }
    });
    wait_for_step(&mut rx, Event::UploadingToDestination, 1).await;
    cancel.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), task).await.expect("upload returns after cancel").expect("task");
    assert!(matches!(result, Err(WorkerError::Cancelled)), "{result:?}");
    assert!(!drain(rx).contains(&(Event::UploadingToDestination, 100)));
}

#[tokio::test]
async fn a_second_run_of_a_job_waits_for_the_first_to_clear_its_scratch() {
    let tmp = TempDir::new().expect("temp dir");
    let root = tmp.path().join("scratch");
    let first = Scratch::create(&root, 3, &CancellationToken::new()).await.expect("first");
    std::fs::write(first.path().join("disk.qcow2"), b"first run").expect("write");

    let cancelled = CancellationToken::new();
    cancelled.cancel();
    let err = Scratch::create(&root, 3, &cancelled).await.expect_err("the directory is held");
    assert!(matches!(err, WorkerError::Cancelled), "{err:?}");
    assert!(first.path().join("disk.qcow2").exists(), "a waiting run touches nothing");

    let second = tokio::spawn({
        let root = root.clone();
        async move { Scratch::create(&root, 3, &CancellationToken::new()).await }
    });
    drop(first);
    let second =
        tokio::time::timeout(Duration::from_secs(10), second).await.expect("the second run starts").expect("task").expect("create");
    assert_eq!(second.path(), root.join("3"));
    assert!(names(second.path()).is_empty(), "{:?}", names(second.path()));
    drop(second);
    assert!(!root.join("3").exists());

    // What a crashed agent left is cleared before the job uses the directory again.
    std::fs::create_dir_all(root.join("4/fetch")).expect("leftovers");
    std::fs::write(root.join("4/fetch/disk.vmdk"), b"stale").expect("leftovers");
    let again = Scratch::create(&root, 4, &CancellationToken::new()).await.expect("create");
    assert!(names(again.path()).is_empty(), "{:?}", names(again.path()));
}

#[test]
fn free_space_answers_for_the_nearest_existing_directory() {
    let tmp = TempDir::new().expect("temp dir");
    assert!(free_space(tmp.path()).is_some_and(|n| n > 0));
    let missing = tmp.path().join("migrations/not/yet");
    assert_eq!(nearest_existing(&missing), Some(tmp.path()));
    assert!(free_space(&missing).is_some_and(|n| n > 0));
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").expect("file");
    assert_eq!(nearest_existing(&file.join("below")), Some(file.as_path()), "a file answers for its file system too");
    assert_eq!(nearest_existing(Path::new("surely/not/here/x1y2")), Some(Path::new(".")));
}

#[test]
fn only_failures_another_node_could_avoid_are_retryable() {
    let upload = |status| WorkerError::Upload { url: "http://127.0.0.1/x".into(), status, message: "m".into() };
    let io = || std::io::Error::other("disk failed");
    let cases = [
        (upload(None), true),
        (upload(Some(503)), true),
        (upload(Some(400)), true),
        (upload(Some(404)), false),
        (upload(Some(409)), false),
        (WorkerError::Source(FetchError::HttpStatus { url: "u".into(), status: 404 }), false),
        (WorkerError::Source(FetchError::HttpStatus { url: "u".into(), status: 502 }), true),
        (WorkerError::Source(FetchError::Timeout { what: "GET".into(), after: Duration::from_secs(1) }), true),
        (WorkerError::Convert(ConvertError::NoSpace { target: "t".into(), detail: "full".into() }), true),
        (
            WorkerError::Convert(ConvertError::QemuImg {
                op: "convert",
                path: "p".into(),
                status: "1".into(),
                stderr: "x: Input/output error".into(),
            }),
            true,
        ),
        (
            WorkerError::Convert(ConvertError::QemuImg {
                op: "info",
                path: "p".into(),
                status: "1".into(),
                stderr: "Invalid footer".into(),
            }),
            false,
        ),
        (WorkerError::Io { what: "w".into(), source: io() }, true),
        (WorkerError::from(FetchError::Cancelled), false),
    ];
    for (err, retryable) in cases {
        assert_eq!(err.retryable(), retryable, "{err:?}");
    }
    assert!(matches!(WorkerError::from(ConvertError::Cancelled { path: "p".into() }), WorkerError::Cancelled));
}
