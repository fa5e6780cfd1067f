//! The last worker step: stream the qcow2 to the hive in one `PUT`, with its length, SHA-256 and
//! virtual size in headers so the hive can check what arrived. Only reaching the hive is bounded
//! by a timeout: a disk may take hours to send. Cancel aborts the request at once. The bearer
//! token is never logged and is marked sensitive in the request.
//!
//! The sending itself (`put_file`) serves any file an agent hands the hive this way (a VM's disk
//! exported for a move, too).

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use reqwest::{Body, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;

use super::{Converted, StepReporter, StepSender, WorkerError, percent};
use crate::domain::migration::Event;
use crate::migration::fetch::http as http_source;
use http_source::describe;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the file per body chunk.
const CHUNK: usize = 256 * 1024;
/// The hive answers with a small JSON document; more than this is not kept.
const ANSWER_MAX: usize = 1 << 20;
/// Characters of a non-JSON error answer quoted in the error.
const QUOTE_MAX: usize = 200;

/// A file to send to the hive in one `PUT`, as its sender hashed it.
#[derive(Clone, Copy, Debug)]
pub struct PutFile<'a> {
    pub path: &'a Path,
    /// Bytes of the file when it was hashed; a file that has another size now is not sent.
    pub size: u64,
    /// Lowercase hex SHA-256 of the file (`x-sha256`).
    pub sha256: &'a str,
    /// The guest-visible size of the disk in the file (`x-virtual-size`), if known.
    pub virtual_size: Option<u64>,
}

/// `PUT` the qcow2 to `url` with `Authorization: Bearer <bearer>`, reporting the bytes sent as
/// `UploadingToDestination` percents (100 once the hive accepted it), and answer the hive's JSON
/// (`null` for an empty answer). A non-2xx answer is an error carrying its status and the
/// message of the hive's `{"error": {"code", "message"}}` envelope.
pub async fn upload(
    converted: &Converted,
    url: &str,
    bearer: &SecretString,
    steps: &StepSender,
    cancel: &CancellationToken,
) -> Result<serde_json::Value, WorkerError> {
    let file =
        PutFile { path: &converted.path, size: converted.size, sha256: &converted.sha256, virtual_size: Some(converted.virtual_size) };
    let (size, reporter_steps) = (converted.size, steps.clone());
    let mut report: Option<StepReporter> = None;
    // Bytes handed to the connection, not yet acknowledged: 100 waits for the hive's answer.
    let on_sent = move |sent: u64| {
        report
            .get_or_insert_with(|| StepReporter::start(&reporter_steps, Event::UploadingToDestination))
            .to(percent(sent, size).unwrap_or(0).min(99));
    };
    let started = Instant::now();
    let (_, value) = put_file(file, url, bearer, on_sent, cancel).await?;
    let _ = steps.send((Event::UploadingToDestination, 100));
    tracing::info!(bytes = size, duration_ms = started.elapsed().as_millis() as u64, "migration disk uploaded");
    Ok(value)
}

/// `PUT` `file` to `url` with `Authorization: Bearer <bearer>`, its length, `x-sha256` and (if
/// given) `x-virtual-size`, and answer the hive's success status and JSON (`null` for an empty
/// answer). `on_sent` hears 0 once everything is checked and the request is about to go, then
/// the bytes handed to the connection so far. A non-2xx answer is an error carrying its status
/// and the message of the hive's `{"error": {"code", "message"}}` envelope.
pub async fn put_file(
    file: PutFile<'_>,
    url: &str,
    bearer: &SecretString,
    mut on_sent: impl FnMut(u64) + Send + 'static,
    cancel: &CancellationToken,
) -> Result<(StatusCode, serde_json::Value), WorkerError> {
    if cancel.is_cancelled() {
        return Err(WorkerError::Cancelled);
    }
    let shown = shown(url);
    let fail = |status: Option<StatusCode>, message: String| WorkerError::Upload {
        url: shown.clone(),
        status: status.map(|s| s.as_u16()),
        message,
    };
    let target = Url::parse(url).map_err(|e| fail(None, format!("not a URL: {e}")))?;
    let mut auth = HeaderValue::from_str(&format!("Bearer {}", bearer.expose_secret()))
        .map_err(|_| fail(None, "the bearer token is not a valid header value".into()))?;
    auth.set_sensitive(true);

    let path = file.path;
    let opened = tokio::fs::File::open(path).await.map_err(|e| WorkerError::io(format!("open {}", path.display()), e))?;
    let size = opened.metadata().await.map_err(|e| WorkerError::io(format!("stat {}", path.display()), e))?.len();
    if size != file.size {
        let changed = std::io::Error::other(format!("{size} bytes, {} when it was hashed", file.size));
        return Err(WorkerError::io(format!("{} changed since it was hashed", path.display()), changed));
    }

    on_sent(0);
    let mut sent = 0u64;
    let body = ReaderStream::with_capacity(opened, CHUNK).inspect_ok(move |chunk| {
        sent += chunk.len() as u64;
        on_sent(sent);
    });
    let client = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).build().map_err(|e| fail(None, describe(&e)))?;
    let mut request = client
        .put(target.clone())
        .header(AUTHORIZATION, auth.clone())
        .header(CONTENT_LENGTH, size)
        .header(CONTENT_TYPE, "application/octet-stream")
        .header("x-sha256", file.sha256);
    if let Some(v) = file.virtual_size {
        request = request.header("x-virtual-size", v);
    }
    let request = request.body(Body::wrap_stream(body));

    let exchange = async {
        let mut response = match request.send().await {
            Ok(r) => r,
            // A hive that refuses the upload, or has its content already (200), answers before
            // reading the body and closes; the client may then only see its write fail. Ask
            // again without a body to learn why.
            Err(e) => {
                match client.put(target).header(AUTHORIZATION, auth).header(CONTENT_LENGTH, 0).header("x-sha256", file.sha256).send().await
                {
                    // Only refusals of the caller, or "I hold that content" (which a hive
                    // can say of an empty body only when it does), never a complaint about
                    // the empty probe itself.
                    Ok(r) if matches!(r.status().as_u16(), 200 | 401 | 403 | 404 | 409 | 410) => r,
                    _ => return Err(fail(None, describe(&e))),
                }
            }
        };
        let status = response.status();
        let mut answer = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| fail(Some(status), format!("reading the answer: {}", describe(&e))))? {
            let room = ANSWER_MAX.saturating_sub(answer.len());
            answer.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        Ok::<_, WorkerError>((status, answer))
    };
    let (status, answer) = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(WorkerError::Cancelled),
        exchanged = exchange => exchanged?,
    };
    if !status.is_success() {
        return Err(fail(Some(status), refusal(status, &answer)));
    }
    let value = if answer.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&answer).map_err(|e| fail(Some(status), format!("the answer is not JSON: {e}")))?
    };
    Ok((status, value))
}
/// What a refusal says: the envelope's message, else the start of the text, else the reason.
fn refusal(status: StatusCode, answer: &[u8]) -> String {
    let envelope = serde_json::from_slice::<serde_json::Value>(answer).ok();
    if let Some(message) = envelope.as_ref().and_then(|v| v.pointer("/error/message")).and_then(|m| m.as_str()) {
        return message.to_string();
    }
    let text = String::from_utf8_lossy(answer);
    let text = text.trim();
    if text.is_empty() {
        return status.canonical_reason().unwrap_or("no message").to_string();
    }
    text.chars().take(QUOTE_MAX).collect()
}

/// The URL without user name or password, for errors and logs.
fn shown(url: &str) -> String {
    // A URL that does not parse cannot hold credentials in a form we could strip.
    Url::parse(url).map(|u| http_source::shown(&u)).unwrap_or_else(|_| "(unparseable URL)".to_string())
}
