//! `/api/v1/images`: chunked, resumable uploads checked end to end (every piece fetched back and
//! hashed), refusals that leave no image, blob or staging file behind, a hive restart in the
//! middle of an upload, and `hive ctl image …` (the real binary) against a real hive.

use std::path::{Path, PathBuf};

use rand::RngCore;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::{ADMIN, TestApp, hive_bin};

const MIB: usize = 1024 * 1024;

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut data = vec![0u8; n];
    rand::rng().fill_bytes(&mut data);
    data
}

fn spec(name: &str, data: &[u8]) -> Value {
    json!({"name": name, "sha256": sha(data), "size": data.len(), "readme": "# test image", "cores": 2, "ram_mb": 2048, "disk_mb": 10240})
}

async fn call(app: &TestApp, method: Method, path: &str, token: Option<&str>, body: Option<Vec<u8>>) -> (StatusCode, Value) {
    let mut req = app.client.request(method, format!("{}{path}", app.base));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let r = req.send().await.expect("request");
    let status = r.status();
    let text = r.text().await.expect("body");
    (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) })
}

async fn create(app: &TestApp, spec: &Value) -> (StatusCode, Value) {
    call(app, Method::POST, "/api/v1/images/uploads", Some(ADMIN), Some(serde_json::to_vec(spec).unwrap())).await
}

async fn patch(app: &TestApp, id: &str, offset: usize, chunk: &[u8]) -> (StatusCode, Value) {
    call(app, Method::PATCH, &format!("/api/v1/images/uploads/{id}?offset={offset}"), Some(ADMIN), Some(chunk.to_vec())).await
}

/// Send `data[from..to]` in 1 MiB chunks, checking each answer's offset.
async fn send_range(app: &TestApp, id: &str, data: &[u8], from: usize, to: usize) {
    let mut at = from;
    while at < to {
        let end = (at + MIB).min(to);
        let (s, v) = patch(app, id, at, &data[at..end]).await;
        assert_eq!((s, v["offset"].as_u64()), (StatusCode::OK, Some(end as u64)), "{v}");
        at = end;
    }
}

async fn complete(app: &TestApp, id: &str) -> (StatusCode, Value) {
    call(app, Method::POST, &format!("/api/v1/images/uploads/{id}/complete"), Some(ADMIN), None).await
}

fn refused(got: (StatusCode, Value), status: StatusCode, code: &str, mention: &str) {
    let (s, v) = got;
    assert_eq!((s, v["error"]["code"].as_str()), (status, Some(code)), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(mention), "message {msg:?} should mention {mention:?}");
}

fn images_dir(app: &TestApp) -> PathBuf {
    app.hive.config().data_dir.join("images")
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

async fn image_count(app: &TestApp) -> usize {
    app.json("/api/v1/images").await.as_array().unwrap().len()
}

#[tokio::test]
async fn chunked_upload_then_the_manifest_and_every_piece_check_out() {
    let app = TestApp::spawn().await;
    let data = random_bytes(10 * MIB + 12_345);
    let (s, up) = create(&app, &spec("debian-12", &data)).await;
    assert_eq!(s, StatusCode::CREATED, "{up}");
    assert_eq!((up["offset"].as_u64(), up["chunk_max"].as_u64()), (Some(0), Some(16 * MIB as u64)));
    let id = up["upload_id"].as_str().unwrap().to_string();
    send_range(&app, &id, &data, 0, data.len()).await;
    let (_, status) = call(&app, Method::GET, &format!("/api/v1/images/uploads/{id}"), Some(ADMIN), None).await;
    assert_eq!((status["offset"].as_u64(), status["size"].as_u64()), (Some(data.len() as u64), Some(data.len() as u64)));

    let (s, image) = complete(&app, &id).await;
    assert_eq!(s, StatusCode::CREATED, "{image}");
    let digest = sha(&data);
    assert_eq!(image["sha256"], digest.as_str());
    assert_eq!(
        (image["size"].as_u64(), image["piece_size"].as_u64(), image["pieces"].as_u64()),
        (Some(data.len() as u64), Some(4 * MIB as u64), Some(3))
    );
    assert_eq!(
        (image["name"].as_str(), image["readme"].as_str(), image["cores"].as_u64()),
        (Some("debian-12"), Some("# test image"), Some(2))
    );
    assert_eq!(app.json("/api/v1/images").await, json!([image.clone()]));
    assert_eq!(app.json(&format!("/api/v1/images/{digest}")).await, image);

    let (s, manifest) = call(&app, Method::GET, &format!("/api/v1/images/{digest}/manifest"), Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::OK);
    let pieces: Vec<String> = serde_json::from_value(manifest["pieces"].clone()).unwrap();
    assert_eq!(pieces.len(), 3);
    let mut joined = Vec::new();
    for (i, want) in pieces.iter().enumerate() {
        let r = app.client.get(format!("{}/api/v1/images/{digest}/pieces/{i}", app.base)).bearer_auth(ADMIN).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "application/octet-stream");
        let bytes = r.bytes().await.unwrap();
        assert_eq!(&sha(&bytes), want, "piece {i} matches its manifest entry");
        assert_eq!(&bytes[..], &data[i * 4 * MIB..((i + 1) * 4 * MIB).min(data.len())]);
        joined.extend_from_slice(&bytes);
    }
    assert_eq!(sha(&joined), digest);
    refused(
        call(&app, Method::GET, &format!("/api/v1/images/{digest}/pieces/3"), Some(ADMIN), None).await,
        StatusCode::NOT_FOUND,
        "unknown_piece",
        "3",
    );
    refused(
        call(&app, Method::GET, &format!("/api/v1/images/{digest}/manifest"), None, None).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "admin",
    );

    assert_eq!(std::fs::read(images_dir(&app).join("blobs").join(&digest)).unwrap(), data, "the blob is the input");
    assert!(files_in(&images_dir(&app).join("uploads")).is_empty(), "nothing left in staging");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("hive_image_uploads_total{outcome=\"complete\"}"), "counted (the recorder is shared by every test)");

    // The same content again is refused; deleting the image removes its blob.
    refused(create(&app, &spec("again", &data)).await, StatusCode::CONFLICT, "exists", &digest);
    let (s, _) = call(&app, Method::DELETE, &format!("/api/v1/images/{digest}"), Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(files_in(&images_dir(&app).join("blobs")).is_empty());
    refused(
        call(&app, Method::GET, &format!("/api/v1/images/{digest}"), None, None).await,
        StatusCode::NOT_FOUND,
        "unknown_image",
        &digest,
    );
    refused(
        call(&app, Method::DELETE, &format!("/api/v1/images/{digest}"), Some(ADMIN), None).await,
        StatusCode::NOT_FOUND,
        "unknown_image",
        "",
    );
    app.stop().await;
}

#[tokio::test]
async fn an_interrupted_upload_resumes_from_the_offset_the_hive_reports() {
    let app = TestApp::spawn().await;
    let data = random_bytes(3 * MIB + 7);
    let (_, up) = create(&app, &spec("resumable", &data)).await;
    let id = up["upload_id"].as_str().unwrap().to_string();
    let half = data.len() / 2;
    send_range(&app, &id, &data, 0, half).await;

    // A new client knows only the file: posting the same content finds the upload where it stands.
    let (s, again) = create(&app, &spec("resumable", &data)).await;
    assert_eq!(s, StatusCode::OK, "{again}");
    assert_eq!((again["upload_id"].as_str(), again["offset"].as_u64()), (Some(id.as_str()), Some(half as u64)));
    let mut other_size = spec("resumable", &data);
    other_size["size"] = json!(data.len() + 1);
    refused(create(&app, &other_size).await, StatusCode::CONFLICT, "conflict", "size");
    // A chunk resent after a lost answer, or sent from a stale offset, is refused with the right offset.
    refused(patch(&app, &id, 0, &data[..10]).await, StatusCode::CONFLICT, "offset_mismatch", &format!("expected offset {half}"));

    send_range(&app, &id, &data, half, data.len()).await;
    let (s, image) = complete(&app, &id).await;
    assert_eq!((s, image["sha256"].as_str()), (StatusCode::CREATED, Some(sha(&data).as_str())));
    app.stop().await;
}

#[tokio::test]
async fn bad_uploads_are_refused_and_leave_nothing_behind() {
    let app = TestApp::spawn().await;
    let data = random_bytes(2 * MIB);
    let uploads = images_dir(&app).join("uploads");

    // No or a wrong token: nothing is created (the later good request creates, not resumes).
    let body = serde_json::to_vec(&spec("x", &data)).unwrap();
    refused(
        call(&app, Method::POST, "/api/v1/images/uploads", None, Some(body.clone())).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "admin",
    );
    refused(
        call(&app, Method::POST, "/api/v1/images/uploads", Some("wrong"), Some(body)).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "admin",
    );
    // Each bad field is named.
    let bad = |k: &str, v: Value| {
        let mut s = spec("x", &data);
        s[k] = v;
        s
    };
    refused(create(&app, &bad("size", json!(20_480u64 * MIB as u64 + 1))).await, StatusCode::BAD_REQUEST, "invalid_param", "size");
    refused(create(&app, &bad("size", json!(0))).await, StatusCode::BAD_REQUEST, "invalid_param", "size");
    refused(create(&app, &bad("sha256", json!(sha(&data).to_uppercase()))).await, StatusCode::BAD_REQUEST, "invalid_param", "sha256");
    refused(create(&app, &bad("name", json!(""))).await, StatusCode::BAD_REQUEST, "invalid_param", "name");
    refused(create(&app, &bad("name", json!("n".repeat(81)))).await, StatusCode::BAD_REQUEST, "invalid_param", "name");
    refused(create(&app, &bad("ram_mb", json!(0))).await, StatusCode::BAD_REQUEST, "invalid_param", "ram_mb");
    refused(create(&app, &bad("colour", json!("red"))).await, StatusCode::BAD_REQUEST, "invalid_body", "colour");

    // Wrong checksum: every byte arrives, completion refuses and discards the upload.
    let mut lie = spec("liar", &data);
    lie["sha256"] = json!(sha(b"something else"));
    let (s, up) = create(&app, &lie).await;
    assert_eq!(s, StatusCode::CREATED, "nothing existed before: {up}");
    let id = up["upload_id"].as_str().unwrap().to_string();
    refused(patch(&app, &id, 5, &data[..10]).await, StatusCode::CONFLICT, "offset_mismatch", "expected offset 0");
    refused(patch(&app, &id, 0, &vec![0u8; data.len() + 1]).await, StatusCode::BAD_REQUEST, "invalid_param", "body");
    let (s, _) = call(&app, Method::PATCH, &format!("/api/v1/images/uploads/{id}"), Some(ADMIN), Some(vec![1])).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "offset is required");
    refused(patch(&app, &id, 0, &vec![0u8; 16 * MIB + 1]).await, StatusCode::PAYLOAD_TOO_LARGE, "chunk_too_large", "limit");
    send_range(&app, &id, &data, 0, data.len()).await;
    refused(complete(&app, &id).await, StatusCode::UNPROCESSABLE_ENTITY, "checksum_mismatch", &sha(&data));
    assert_eq!(image_count(&app).await, 0);
    assert!(files_in(&images_dir(&app).join("blobs")).is_empty(), "no blob");
    assert!(files_in(&uploads).is_empty(), "staging removed");
    refused(
        call(&app, Method::GET, &format!("/api/v1/images/uploads/{id}"), Some(ADMIN), None).await,
        StatusCode::NOT_FOUND,
        "unknown_upload",
        &id,
    );

    // Truncated: completion waits for the rest, and nothing is listed meanwhile.
    let (_, up) = create(&app, &spec("short", &data)).await;
    let id = up["upload_id"].as_str().unwrap().to_string();
    send_range(&app, &id, &data, 0, MIB).await;
    refused(complete(&app, &id).await, StatusCode::CONFLICT, "incomplete", &format!("{MIB} of {}", data.len()));
    assert_eq!(image_count(&app).await, 0);
    // Abort removes the upload and its staging file.
    refused(
        call(&app, Method::DELETE, &format!("/api/v1/images/uploads/{id}"), None, None).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "",
    );
    let (s, _) = call(&app, Method::DELETE, &format!("/api/v1/images/uploads/{id}"), Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(files_in(&uploads).is_empty());
    refused(complete(&app, &id).await, StatusCode::NOT_FOUND, "unknown_upload", &id);
    refused(
        call(&app, Method::GET, "/api/v1/images/uploads/..%2F..%2Fetc", Some(ADMIN), None).await,
        StatusCode::BAD_REQUEST,
        "invalid_param",
        "upload_id",
    );
    assert_eq!(image_count(&app).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_hive_restart_mid_upload_loses_nothing_acknowledged() {
    let app = TestApp::spawn().await;
    let data = random_bytes(5 * MIB + 3);
    let (_, up) = create(&app, &spec("survivor", &data)).await;
    let id = up["upload_id"].as_str().unwrap().to_string();
    let half = 3 * MIB;
    send_range(&app, &id, &data, 0, half).await;

    let app = app.restart().await;
    let (s, again) = create(&app, &spec("survivor", &data)).await;
    assert_eq!(s, StatusCode::OK, "{again}");
    assert_eq!((again["upload_id"].as_str(), again["offset"].as_u64()), (Some(id.as_str()), Some(half as u64)));
    send_range(&app, &id, &data, half, data.len()).await;
    let (s, image) = complete(&app, &id).await;
    assert_eq!(s, StatusCode::CREATED, "{image}");
    assert_eq!(std::fs::read(images_dir(&app).join("blobs").join(sha(&data))).unwrap(), data);

    let app = app.restart().await;
    assert_eq!(app.json("/api/v1/images").await, json!([image]), "the image survives a restart too");
    app.stop().await;
}

async fn ctl(app: &TestApp, args: &[&str], env_token: bool) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(hive_bin());
    cmd.arg("ctl").arg("--hive").arg(&app.base).args(args).env_remove("HIVE_ADMIN_TOKEN").stdin(std::process::Stdio::null());
    if env_token {
        cmd.env("HIVE_ADMIN_TOKEN", ADMIN);
    }
    let out = cmd.output().await.expect("run hive ctl");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn hive_ctl_uploads_lists_and_deletes_an_image() {
    let app = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(20 * MIB + 1_001);
    let file = dir.path().join("disk.qcow2");
    std::fs::write(&file, &data).unwrap();
    let readme = dir.path().join("README.md");
    std::fs::write(&readme, "A desktop with Firefox.").unwrap();
    let file = file.to_str().unwrap();
    let upload = ["image", "upload", file, "--name", "ctl-desktop", "--readme", readme.to_str().unwrap()];
    let upload = [&upload[..], &["--cores", "2", "--ram-mb", "2048", "--disk-mb", "30000", "--token", ADMIN]].concat();

    let (ok, out, err) = ctl(&app, &upload, false).await;
    assert!(ok, "upload failed: {err}");
    let image: Value = serde_json::from_str(&out).expect("the image as JSON");
    let digest = sha(&data);
    assert_eq!((image["sha256"].as_str(), image["size"].as_u64()), (Some(digest.as_str()), Some(data.len() as u64)));
    assert_eq!((image["readme"].as_str(), image["pieces"].as_u64()), (Some("A desktop with Firefox."), Some(6)));
    assert_eq!(std::fs::read(images_dir(&app).join("blobs").join(&digest)).unwrap(), data);

    let (ok, out, _) = ctl(&app, &["image", "list"], false).await;
    assert!(ok);
    assert!(out.lines().any(|l| l.contains(&digest) && l.contains("ctl-desktop")), "{out}");
    let (ok, out, _) = ctl(&app, &["image", "show", &digest], false).await;
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), image);

    // A refusal is printed with its code and exits non-zero.
    let (ok, _, err) = ctl(&app, &upload, false).await;
    assert!(!ok);
    assert!(err.contains("exists") && err.contains("409"), "{err}");
    let (ok, _, err) = ctl(&app, &["image", "delete", &digest, "--data-dir", dir.path().to_str().unwrap()], false).await;
    assert!(!ok && err.contains("no admin token"), "{err}");
    let (ok, out, err) = ctl(&app, &["image", "delete", &digest], true).await;
    assert!(ok, "delete with $HIVE_ADMIN_TOKEN: {err}");
    assert!(out.contains(&digest));
    assert_eq!(image_count(&app).await, 0);
    app.stop().await;
}
