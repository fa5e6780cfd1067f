//! `http` sources: disks served under a base URL, listed by `<base>/index.json` (see the module
//! above). Downloads stream to scratch chunk by chunk; a connect timeout bounds reaching the
//! server and a stall timeout bounds every wait after that, so a server that goes quiet fails
//! the fetch. URLs in errors and logs never carry credentials.

use std::path::Path;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{
    DiscoveredResource, DiskFormat, FetchError, FetchedDisk, HttpParams, Meter, Progress, ResourceKind, Written, create_in_scratch,
    finish_file, write_chunk,
};

/// An index larger than this is not a list of disks.
const MAX_INDEX_BYTES: usize = 4 << 20;

#[derive(Deserialize)]
struct IndexEntry {
    name: String,
    path: String,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    size: Option<u64>,
}

struct Source {
    client: reqwest::Client,
    base: Url,
    stall: Duration,
}

impl Source {
    fn new(p: &HttpParams) -> Result<Self, FetchError> {
        let mut base = Url::parse(&p.base_url).map_err(|e| FetchError::BadSpec(format!("base_url: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
            return Err(FetchError::BadSpec(format!("base_url {} is not an http(s) URL", shown(&base))));
        }
        // Without the slash, joining "disk.vmdk" would replace the base's last segment.
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(p.connect_timeout_ms))
            .build()
            .map_err(|e| FetchError::BadSpec(format!("http client: {}", describe(&e))))?;
        Ok(Self { client, base, stall: Duration::from_millis(p.stall_timeout_ms) })
    }

    /// The URL `id` names, which must stay under the base URL (same origin, path below it).
    fn resolve(&self, id: &str) -> Result<Url, FetchError> {
        let refuse = |reason: &str| FetchError::BadId { id: id.to_string(), reason: reason.to_string() };
        if id.is_empty() {
            return Err(refuse("empty"));
        }
        let url = self.base.join(id).map_err(|e| refuse(&e.to_string()))?;
        if url.origin() != self.base.origin() || !url.path().starts_with(self.base.path()) || url.path() == self.base.path() {
            return Err(refuse("not a file under the source's base URL"));
        }
        Ok(url)
    }

    /// Send a GET, waiting at most the stall timeout for the response head.
    async fn get(&self, url: &Url, cancel: Option<&CancellationToken>) -> Result<reqwest::Response, FetchError> {
        let send = tokio::time::timeout(self.stall, self.client.get(url.clone()).send());
        let sent = match cancel {
            Some(cancel) => tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(FetchError::Cancelled),
                sent = send => sent,
            },
            None => send.await,
        };
        match sent {
            Err(_) => Err(FetchError::Timeout { what: format!("GET {}", shown(url)), after: self.stall }),
            Ok(Err(e)) if e.is_timeout() => Err(FetchError::Timeout { what: format!("connect for GET {}", shown(url)), after: self.stall }),
            Ok(Err(e)) => Err(FetchError::Http { url: shown(url), message: describe(&e) }),
            Ok(Ok(resp)) => Ok(resp),
        }
    }
}

pub(super) async fn probe(p: &HttpParams) -> Result<(), FetchError> {
    let src = Source::new(p)?;
    let resp = src.get(&src.base, None).await?;
    // Any answer short of a server error means the server is there; the base need not list.
    if resp.status().is_server_error() {
        return Err(FetchError::HttpStatus { url: shown(&src.base), status: resp.status().as_u16() });
    }
    Ok(())
}

pub(super) async fn discover(p: &HttpParams) -> Result<Vec<DiscoveredResource>, FetchError> {
    let src = Source::new(p)?;
    let url = src.base.join("index.json").map_err(|e| FetchError::BadSpec(e.to_string()))?;
    let resp = src.get(&url, None).await?;
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(Vec::new());
    }
    if !resp.status().is_success() {
        return Err(FetchError::HttpStatus { url: shown(&url), status: resp.status().as_u16() });
    }
    if resp.content_length().is_some_and(|n| n > MAX_INDEX_BYTES as u64) {
        return Err(FetchError::BadSpec(format!("{} is larger than {MAX_INDEX_BYTES} bytes", shown(&url))));
    }
    let body = match tokio::time::timeout(src.stall, resp.bytes()).await {
        Err(_) => return Err(FetchError::Timeout { what: format!("GET {}", shown(&url)), after: src.stall }),
        Ok(Err(e)) => return Err(FetchError::Http { url: shown(&url), message: describe(&e) }),
        Ok(Ok(body)) => body,
    };
    let entries: Vec<IndexEntry> =
        serde_json::from_slice(&body).map_err(|e| FetchError::BadSpec(format!("{} is not a list of disks: {e}", shown(&url))))?;
    let mut found = Vec::with_capacity(entries.len());
    for entry in entries {
        let disk_url = src.resolve(&entry.path)?;
        let format = entry.format.as_deref().and_then(DiskFormat::from_name).or_else(|| DiskFormat::from_path(disk_url.path()));
        found.push(DiscoveredResource {
            id_at_source: entry.path,
            kind: ResourceKind::Volume,
            name: entry.name,
            properties: json!({ "url": shown(&disk_url), "size": entry.size, "format": format }),
        });
    }
    Ok(found)
}

pub(super) async fn fetch(
    p: &HttpParams,
    id: &str,
    scratch: &Path,
    written: &mut Written,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<Vec<FetchedDisk>, FetchError> {
    let src = Source::new(p)?;
    let url = src.resolve(id)?;
    let mut resp = src.get(&url, Some(cancel)).await?;
    if !resp.status().is_success() {
        return Err(FetchError::HttpStatus { url: shown(&url), status: resp.status().as_u16() });
    }
    let expected = resp.content_length();
    let mut meter = Meter::new(progress, expected);
    let name = url.path_segments().and_then(|mut s| s.next_back()).unwrap_or_default().to_string();
    let (path, mut file) = create_in_scratch(scratch, &name, written).await?;
    let what = || format!("GET {}", shown(&url));
    loop {
        let next = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(FetchError::Cancelled),
            next = tokio::time::timeout(src.stall, resp.chunk()) => next,
        };
        match next {
            Err(_) => return Err(FetchError::Timeout { what: what(), after: src.stall }),
            Ok(Ok(Some(chunk))) => write_chunk(&mut file, &path, &chunk, &mut meter, cancel).await?,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                return Err(match expected {
                    Some(expected) if meter.done < expected => FetchError::ShortBody { what: what(), got: meter.done, expected },
                    _ => FetchError::Http { url: shown(&url), message: describe(&e) },
                });
            }
        }
    }
    if let Some(expected) = expected.filter(|&n| n != meter.done) {
        return Err(FetchError::ShortBody { what: what(), got: meter.done, expected });
    }
    finish_file(file, &path).await?;
    let format_hint = DiskFormat::from_path(url.path());
    Ok(vec![FetchedDisk { path, format_hint, bytes: meter.done, temporary: true, crash_consistent: false }])
}

/// The URL without user name or password, for errors and logs.
pub(crate) fn shown(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_password(None);
    let _ = url.set_username("");
    url.to_string()
}

/// reqwest's own message is only the outermost layer ("error sending request"); the cause is
/// further down the chain. The URL is left out: callers name it without credentials.
pub(crate) fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(&format!(" for url ({url})"), "");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
