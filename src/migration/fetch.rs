//! The worker pipeline's first step: discover what a migration source holds and bring one of
//! its disks (or all of an instance's) into local scratch space for `convert`.
//!
//! A source is a hypervisor endpoint described by [`SourceSpec`]: a kind plus its connection
//! parameters, stored as JSON `{"kind": "file"|"http"|"libvirt", "params": {...}}`.
//! - `file`: a directory on the worker holding exported disks (VMware, Hyper-V and VirtualBox
//!   exports: .vmdk, .vhd, .vhdx, .vdi, .img/.raw, .qcow2). A resource id is a path relative to
//!   that directory; nothing outside it is ever read.
//! - `http`: a base URL. Discovery reads `<base>/index.json`, a JSON array of
//!   `{"name": .., "path": .., "format"?: .., "size"?: ..}` where `path` is relative to the base
//!   (no index: the source is reachable but lists nothing). A resource id is such a path (or an
//!   absolute URL), and must stay under the base URL.
//! - `libvirt` (feature `libvirt`): a libvirt URI; resources are domains, fetched disk by disk.
//!
//! Guarantees: progress is published as `(bytes done, total if known)`; on cancel, timeout or
//! any error every file this step wrote into scratch is removed before it returns (and if its
//! future is dropped), so the caller only ever owns complete disks.

mod file;
pub(crate) mod http;
#[cfg(feature = "libvirt")]
mod libvirt;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// `(bytes fetched so far, total bytes if the source said)`, for every disk of one fetch together.
pub type Progress = watch::Sender<(u64, Option<u64>)>;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("bad source parameters: {0}")]
    BadSpec(String),
    #[error("resource id {id:?} refused: {reason}")]
    BadId { id: String, reason: String },
    #[error("{0} not found at the source")]
    NotFound(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("GET {url} answered {status}")]
    HttpStatus { url: String, status: u16 },
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("{what}: ended after {got} of {expected} bytes")]
    ShortBody { what: String, got: u64, expected: u64 },
    #[error("{what}: nothing received for {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("fetch cancelled")]
    Cancelled,
    #[error("domain {0} is running: shut it off first, or set allow_running for a crash-consistent copy")]
    DomainRunning(String),
    #[error("libvirt: {0}")]
    Libvirt(String),
    #[error("{0}")]
    Unsupported(String),
}

impl FetchError {
    fn io(what: impl std::fmt::Display, source: std::io::Error) -> Self {
        Self::Io { what: what.to_string(), source }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    File,
    Http,
    Libvirt,
}

/// A migration source as stored: `{"kind": "...", "params": {...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "params", rename_all = "lowercase")]
pub enum SourceSpec {
    File(FileParams),
    Http(HttpParams),
    Libvirt(LibvirtParams),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileParams {
    pub dir: PathBuf,
    /// Hand the convert step the source file itself instead of a scratch copy: saves the copy
    /// on the same node, at the cost of reading the export while it converts.
    #[serde(default)]
    pub in_place: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpParams {
    pub base_url: String,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Longest wait for the response or for the next chunk of its body: a server that stops
    /// sending fails the fetch instead of holding the migration forever.
    #[serde(default = "default_stall_timeout_ms")]
    pub stall_timeout_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LibvirtParams {
    pub uri: String,
    /// Copy a running domain's disks anyway; the copy is then only crash-consistent.
    #[serde(default)]
    pub allow_running: bool,
    #[serde(default)]
    pub transfer: DiskTransfer,
}

/// How a libvirt disk reaches scratch space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskTransfer {
    /// A local copy when the URI names this host and the file is readable, else `stream`.
    #[default]
    Auto,
    /// libvirt's storage volume download: works for remote hosts, needs the disk in a pool.
    Stream,
}

fn default_connect_timeout_ms() -> u64 {
    10_000
}

fn default_stall_timeout_ms() -> u64 {
    60_000
}

impl SourceSpec {
    pub fn kind(&self) -> SourceKind {
        match self {
            Self::File(_) => SourceKind::File,
            Self::Http(_) => SourceKind::Http,
            Self::Libvirt(_) => SourceKind::Libvirt,
        }
    }

    /// From a stored source's type and connection parameters, naming what is wrong with them.
    pub fn from_parts(kind: SourceKind, params: serde_json::Value) -> Result<Self, FetchError> {
        let bad = |e: serde_json::Error| FetchError::BadSpec(format!("{kind:?} source: {e}"));
        Ok(match kind {
            SourceKind::File => Self::File(serde_json::from_value(params).map_err(bad)?),
            SourceKind::Http => Self::Http(serde_json::from_value(params).map_err(bad)?),
            SourceKind::Libvirt => Self::Libvirt(serde_json::from_value(params).map_err(bad)?),
        })
    }
}

/// Disk image formats by qemu-img's names (a .vhd is `vpc`); a hint only, convert probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Vmdk,
    Vpc,
    Vhdx,
    Vdi,
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn qemu_name(self) -> &'static str {
        match self {
            Self::Vmdk => "vmdk",
            Self::Vpc => "vpc",
            Self::Vhdx => "vhdx",
            Self::Vdi => "vdi",
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }

    /// A qemu/libvirt format name, or the name an index gives (`vhd` too).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "vmdk" => Self::Vmdk,
            "vpc" | "vhd" => Self::Vpc,
            "vhdx" => Self::Vhdx,
            "vdi" => Self::Vdi,
            "raw" | "img" => Self::Raw,
            "qcow2" => Self::Qcow2,
            _ => return None,
        })
    }

    pub fn from_path(path: &str) -> Option<Self> {
        let ext = Path::new(path).extension()?.to_str()?;
        Self::from_name(ext)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    Instance,
    Volume,
}

/// One thing a source holds, as the source's periodic report lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiscoveredResource {
    pub id_at_source: String,
    pub kind: ResourceKind,
    pub name: String,
    /// Sizes, formats, disks, state: whatever the source tells, for the API to show.
    pub properties: serde_json::Value,
}

/// A disk in scratch space (or, with `temporary` false, the source's own file, not to delete).
#[derive(Clone, Debug, PartialEq)]
pub struct FetchedDisk {
    pub path: PathBuf,
    pub format_hint: Option<DiskFormat>,
    pub bytes: u64,
    pub temporary: bool,
    /// Copied from a running domain: only as consistent as after a power cut.
    pub crash_consistent: bool,
}

/// Everything the source holds that can be migrated.
pub async fn discover(spec: &SourceSpec) -> Result<Vec<DiscoveredResource>, FetchError> {
    match spec {
        SourceSpec::File(p) => file::discover(p).await,
        SourceSpec::Http(p) => http::discover(p).await,
        #[cfg(feature = "libvirt")]
        SourceSpec::Libvirt(p) => libvirt::discover(p).await,
        #[cfg(not(feature = "libvirt"))]
        SourceSpec::Libvirt(_) => Err(no_libvirt()),
    }
}

/// A cheap reachability check for the source's Up/Down heartbeat.
pub async fn probe_source(spec: &SourceSpec) -> Result<(), FetchError> {
    match spec {
        SourceSpec::File(p) => file::probe(p).await,
        SourceSpec::Http(p) => http::probe(p).await,
        #[cfg(feature = "libvirt")]
        SourceSpec::Libvirt(p) => libvirt::probe(p).await,
        #[cfg(not(feature = "libvirt"))]
        SourceSpec::Libvirt(_) => Err(no_libvirt()),
    }
}

/// Bring the disk(s) of `id_at_source` into `scratch_dir`. On any error nothing written by this
/// call is left in `scratch_dir`.
pub async fn fetch(
    spec: &SourceSpec,
    id_at_source: &str,
    scratch_dir: &Path,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<Vec<FetchedDisk>, FetchError> {
    let mut written = Written::default();
    let result = match spec {
        SourceSpec::File(p) => file::fetch(p, id_at_source, scratch_dir, &mut written, progress, cancel).await,
        SourceSpec::Http(p) => http::fetch(p, id_at_source, scratch_dir, &mut written, progress, cancel).await,
        #[cfg(feature = "libvirt")]
        SourceSpec::Libvirt(p) => libvirt::fetch(p, id_at_source, scratch_dir, &mut written, progress, cancel).await,
        #[cfg(not(feature = "libvirt"))]
        SourceSpec::Libvirt(_) => Err(no_libvirt()),
    };
    match result {
        Ok(disks) => {
            written.keep();
            Ok(disks)
        }
        Err(e) => {
            written.remove().await;
            Err(e)
        }
    }
}

#[cfg(not(feature = "libvirt"))]
fn no_libvirt() -> FetchError {
    FetchError::Unsupported("libvirt sources need a build with the libvirt feature".into())
}

/// The files one fetch created in scratch: removed unless the fetch succeeded, also when its
/// future is dropped half-way (hence the blocking removal in `Drop`, a few unlinks at most).
#[derive(Default)]
struct Written(Vec<PathBuf>);

impl Written {
    fn keep(&mut self) {
        self.0.clear();
    }

    async fn remove(&mut self) {
        for path in self.0.drain(..) {
            if let Err(e) = tokio::fs::remove_file(&path).await {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a partial fetch");
            }
        }
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        for path in self.0.drain(..) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Create a new file in scratch named after `wanted` (made safe), never replacing one already
/// there: a second disk with the same name gets `-1`, `-2`... before its extension.
async fn create_in_scratch(scratch: &Path, wanted: &str, written: &mut Written) -> Result<(PathBuf, tokio::fs::File), FetchError> {
    let name = safe_file_name(wanted);
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
        _ => (name.clone(), String::new()),
    };
    for n in 0..1000 {
        let candidate = if n == 0 { name.clone() } else { format!("{stem}-{n}{ext}") };
        let path = scratch.join(candidate);
        match tokio::fs::OpenOptions::new().write(true).create_new(true).open(&path).await {
            Ok(file) => {
                written.0.push(path.clone());
                return Ok((path, file));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(FetchError::io(format!("create {}", path.display()), e)),
        }
    }
    Err(FetchError::io(format!("create {name} in {}", scratch.display()), std::io::ErrorKind::AlreadyExists.into()))
}

/// One path component of letters, digits, `.`, `_` and `-`, not hidden, at most 100 bytes.
fn safe_file_name(wanted: &str) -> String {
    let last = wanted.rsplit(['/', '\\']).next().unwrap_or_default();
    let mut name: String = last.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect();
    name = name.trim_start_matches('.').to_string();
    if name.len() > 100 {
        name = name.split_off(name.len() - 100);
    }
    if name.is_empty() { "disk".into() } else { name }
}

/// Counts the bytes of every disk of one fetch into the shared progress.
struct Meter<'a> {
    progress: &'a Progress,
    done: u64,
    total: Option<u64>,
}

impl<'a> Meter<'a> {
    fn new(progress: &'a Progress, total: Option<u64>) -> Self {
        progress.send_replace((0, total));
        Self { progress, done: 0, total }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        self.progress.send_replace((self.done, self.total));
    }
}

/// Append one chunk, checking cancel first so a cancelled fetch stops within a chunk.
async fn write_chunk(
    file: &mut tokio::fs::File,
    path: &Path,
    chunk: &[u8],
    meter: &mut Meter<'_>,
    cancel: &CancellationToken,
) -> Result<(), FetchError> {
    if cancel.is_cancelled() {
        return Err(FetchError::Cancelled);
    }
    file.write_all(chunk).await.map_err(|e| FetchError::io(format!("write {}", path.display()), e))?;
    meter.add(chunk.len() as u64);
    Ok(())
}

/// A tokio file only finishes its last write when flushed.
async fn finish_file(mut file: tokio::fs::File, path: &Path) -> Result<(), FetchError> {
    file.flush().await.map_err(|e| FetchError::io(format!("write {}", path.display()), e))
}

#[cfg(test)]
#[path = "fetch_tests.rs"]
mod tests;
