//! The worker pipeline's conversion step: a fetched disk (vmdk, vhd/vpc, vhdx, vdi, raw or qcow2)
//! becomes a qcow2 file through `qemu-img convert`, with progress and cancel.
//!
//! Guarantees: the source is probed first and refused unless its format is one of the six (and
//! matches the declared one, if any) and it reads no file but itself (no backing file, external
//! data file or extra vmdk extent: a disk from a migration source is untrusted input). qemu-img
//! writes into `.<name>.part` beside the target, which is (with `durable`, fsynced and) renamed to the target only
//! on success; on any error or cancel, or if the future is dropped, qemu-img is killed and the
//! partial file removed, so the target directory holds either the complete image or nothing new.

use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use super::fetch::DiskFormat;

/// `qemu-img info` only reads headers; a source that keeps it busy longer is hostile or broken.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of qemu-img's stderr an error message carries (the cause is in the last ones).
const STDERR_LINES: usize = 5;
/// Bytes of stderr kept while qemu-img runs: its messages are short, a flood is not kept whole.
const STDERR_KEEP: usize = 16 * 1024;
/// qemu-img accepts `-m` from 1 to 16.
const MAX_COROUTINES: u8 = 16;
const QCOW2_CLUSTER: u64 = 64 * 1024;
/// Margin over qcow2's fully-allocated size: refcount tables that qemu outgrows while writing
/// are freed but stay in the file.
const QCOW2_SLACK: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{origin}: disk format {format:?} is not supported (supported: vmdk, vhd (vpc), vhdx, vdi, raw, qcow2)")]
    UnsupportedFormat { origin: String, format: String },
    #[error(
        "{}: declared {} but qemu-img reads it as {detected}; refusing to guess which is right",
        .path.display(), .declared.qemu_name()
    )]
    FormatMismatch { path: PathBuf, declared: DiskFormat, detected: String },
    #[error("{}: refused: {reason}", .path.display())]
    Unsafe { path: PathBuf, reason: String },
    #[error("{}: qemu-img info printed what we cannot read: {reason}", .path.display())]
    BadInfo { path: PathBuf, reason: String },
    #[error("qemu-img {op} {}: {status}: {stderr}", .path.display())]
    QemuImg { op: &'static str, path: PathBuf, status: String, stderr: String },
    #[error("{}: no space left on the target's file system: {detail}", .target.display())]
    NoSpace { target: PathBuf, detail: String },
    #[error("conversion of {} cancelled", .path.display())]
    Cancelled { path: PathBuf },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what}: no answer within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("invalid conversion job: {0}")]
    InvalidJob(String),
}

impl ConvertError {
    fn io(what: impl std::fmt::Display, source: std::io::Error) -> Self {
        Self::Io { what: what.to_string(), source }
    }
}

/// A format name as a user, an index or a hypervisor gives it (`vhd` is qemu's `vpc`); the error
/// names what was given.
pub fn parse_format(name: &str) -> Result<DiskFormat, ConvertError> {
    DiskFormat::from_name(name.trim())
        .ok_or_else(|| ConvertError::UnsupportedFormat { origin: "declared format".into(), format: name.to_string() })
}

/// What `qemu-img info` tells about a disk that passed the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    pub format: DiskFormat,
    /// The guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes the file occupies on its file system.
    pub actual_size: u64,
}

/// The parts of `qemu-img info --output=json` the checks read.
#[derive(Debug, Deserialize)]
struct QemuInfo {
    format: String,
    filename: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    actual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "format-specific")]
    format_specific: Option<FormatSpecific>,
    #[serde(default)]
    children: Vec<QemuChild>,
}

#[derive(Debug, Deserialize)]
struct FormatSpecific {
    #[serde(default)]
    data: serde_json::Value,
}

#[derive(Debug, Deserialize)]
struct QemuChild {
    name: String,
    info: QemuInfo,
}

/// The format and sizes of the disk at `path`, refusing formats outside the six and images that
/// would make qemu-img read other files.
pub async fn probe(path: &Path) -> Result<DiskInfo, ConvertError> {
    inspect(path, &qemu_info(path).await?, None)
}

async fn qemu_info(path: &Path) -> Result<QemuInfo, ConvertError> {
    let mut cmd = qemu_img();
    cmd.args(["info", "--output=json"]).arg(path_arg(path));
    let out = match tokio::time::timeout(PROBE_TIMEOUT, cmd.output()).await {
        Ok(out) => out.map_err(spawn_error)?,
        Err(_) => return Err(ConvertError::Timeout { what: format!("qemu-img info {}", path.display()), after: PROBE_TIMEOUT }),
    };
    if !out.status.success() {
        let stderr = stderr_tail(&String::from_utf8_lossy(&out.stderr));
        return Err(ConvertError::QemuImg { op: "info", path: path.to_path_buf(), status: out.status.to_string(), stderr });
    }
    serde_json::from_slice(&out.stdout).map_err(|e| ConvertError::BadInfo { path: path.to_path_buf(), reason: e.to_string() })
}

/// The checks on a probed image, in the order that gives the most useful message.
fn inspect(path: &Path, info: &QemuInfo, declared: Option<DiskFormat>) -> Result<DiskInfo, ConvertError> {
    if let Some(declared) = declared.filter(|d| d.qemu_name() != info.format) {
        return Err(ConvertError::FormatMismatch { path: path.to_path_buf(), declared, detected: info.format.clone() });
    }
    let format = DiskFormat::from_name(&info.format)
        .filter(|f| f.qemu_name() == info.format)
        .ok_or_else(|| ConvertError::UnsupportedFormat { origin: path.display().to_string(), format: info.format.clone() })?;
    let unsafe_because = |reason: String| Err(ConvertError::Unsafe { path: path.to_path_buf(), reason });
    if let Some(backing) = &info.backing_filename {
        return unsafe_because(format!("it has a backing file ({backing}); convert a self-contained image"));
    }
    if let Some(data) = info.format_specific.as_ref().map(|s| &s.data) {
        if let Some(file) = data.get("data-file") {
            return unsafe_because(format!("its data lives in an external data file ({file})"));
        }
        for extent in data.get("extents").and_then(|e| e.as_array()).into_iter().flatten() {
            let name = extent.get("filename").and_then(|f| f.as_str()).unwrap_or("?");
            if name != info.filename {
                return unsafe_because(format!("it has an extent in another file ({name})"));
            }
        }
    }
    if let Some(child) = foreign_child(&info.filename, &info.children) {
        return unsafe_because(format!("it reads another file ({}: {})", child.name, child.info.filename));
    }
    Ok(DiskInfo { format, virtual_size: info.virtual_size, actual_size: info.actual_size })
}

/// The first node below the image, at any depth, that is not the image's own file.
fn foreign_child<'a>(own: &str, children: &'a [QemuChild]) -> Option<&'a QemuChild> {
    children.iter().find_map(|c| if c.info.filename != own { Some(c) } else { foreign_child(own, &c.info.children) })
}

/// The most the qcow2 output of `info`'s disk can occupy (for the scheduler's choice of a node):
/// qemu's fully-allocated size for 64 KiB clusters and 16-bit refcounts, plus a small margin.
/// Sparse or zero areas make the real file smaller.
pub fn required_space_estimate(info: &DiskInfo) -> u64 {
    qcow2_fully_allocated(info.virtual_size) + QCOW2_SLACK
}

/// qemu's `qcow2_calc_prealloc_size` (block/qcow2.c) for the default cluster and refcount sizes.
fn qcow2_fully_allocated(virtual_size: u64) -> u64 {
    let c = QCOW2_CLUSTER;
    let per_table = c / 8;
    let data = virtual_size.div_ceil(c) * c;
    let l2_entries = (data / c).div_ceil(per_table) * per_table;
    let l1_entries = (l2_entries * 8 / c).div_ceil(per_table) * per_table;
    let meta = c + l2_entries * 8 + l1_entries * 8;
    // Refcount blocks and table cover every cluster, themselves included: iterate to the fixpoint.
    let clusters = (meta + data) / c;
    let refcounts_per_block = c * 8 / 16;
    let (mut blocks, mut table, mut total) = (0u64, 0u64, 0u64);
    loop {
        blocks = (clusters + table + blocks).div_ceil(refcounts_per_block);
        table = blocks.div_ceil(per_table);
        let next = clusters + blocks + table;
        if next == total {
            break;
        }
        total = next;
    }
    meta + data + (blocks + table) * c
}

/// One disk to convert to qcow2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvertJob {
    pub source: PathBuf,
    /// What the source claims to be; a disagreement with qemu-img's probe is an error.
    pub declared_format: Option<DiskFormat>,
    /// The qcow2 file to produce; replaced if it exists.
    pub target: PathBuf,
    /// qemu-img's `-m` (parallel coroutines, 1 to 16; qemu's default is 8).
    pub coroutines: Option<u8>,
    /// qemu-img's `-W`: out-of-order writes. Faster, but qemu recommends it for preallocated
    /// targets only (a qcow2 file gets fragmented), hence off by default.
    pub out_of_order: bool,
    /// fsync the image (and the rename) before answering, so that after a crash the target name
    /// never stands over lost data. Off by default: the worker uploads its output at once and
    /// starts a job over after a crash, and the flush would double the step's time.
    pub durable: bool,
}

impl ConvertJob {
    pub fn new(source: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Self {
        Self { source: source.into(), declared_format: None, target: target.into(), coroutines: None, out_of_order: false, durable: false }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvertOutcome {
    pub source: DiskInfo,
    /// The size of the qcow2 file produced.
    pub bytes_written: u64,
    pub duration: Duration,
}

/// Convert `job.source` into a qcow2 file at `job.target`, publishing the percentage done (0 to
/// 100, never decreasing) on `progress`. See the module's guarantees for failures and cancel.
pub async fn convert(job: &ConvertJob, progress: &watch::Sender<f32>, cancel: &CancellationToken) -> Result<ConvertOutcome, ConvertError> {
    let started = Instant::now();
    let (dir, part) = plan(job).await?;
    let cancelled = || ConvertError::Cancelled { path: job.source.clone() };
    let info = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(cancelled()),
        info = qemu_info(&job.source) => inspect(&job.source, &info?, job.declared_format)?,
    };
    progress.send_replace(0.0);

    let part_file = PartFile { path: part.clone(), armed: true };
    let written = match run_convert(job, info.format, &part, progress, cancel).await {
        Ok(()) if cancel.is_cancelled() => Err(cancelled()),
        Ok(()) if job.durable => sync_file(&part, &job.target).await,
        Ok(()) => tokio::fs::metadata(&part).await.map(|m| m.len()).map_err(|e| ConvertError::io(format!("stat {}", part.display()), e)),
        Err(e) => Err(e),
    };
    let bytes_written = match written {
        Ok(bytes) => bytes,
        Err(e) => {
            part_file.remove().await;
            return Err(e);
        }
    };
    if let Err(e) = tokio::fs::rename(&part, &job.target).await {
        part_file.remove().await;
        return Err(ConvertError::io(format!("rename {} to {}", part.display(), job.target.display()), e));
    }
    part_file.keep();
    // Makes the rename durable; the image itself already is, so a failure here only warns.
    if job.durable {
        if let Err(e) = sync_dir(dir).await {
            tracing::warn!(path = %job.target.display(), error = %e, "could not fsync the target directory");
        }
    }
    raise(progress, 100.0);
    let duration = started.elapsed();
    tracing::info!(
        source = %job.source.display(),
        format = info.format.qemu_name(),
        virtual_size = info.virtual_size,
        bytes_written,
        duration_ms = duration.as_millis() as u64,
        "disk converted to qcow2"
    );
    Ok(ConvertOutcome { source: info, bytes_written, duration })
}

/// Checks the job and names the partial file, creating nothing.
async fn plan(job: &ConvertJob) -> Result<(PathBuf, PathBuf), ConvertError> {
    if let Some(m) = job.coroutines.filter(|m| !(1..=MAX_COROUTINES).contains(m)) {
        return Err(ConvertError::InvalidJob(format!("coroutines must be 1 to {MAX_COROUTINES}, not {m}")));
    }
    let name = match job.target.components().next_back() {
        Some(Component::Normal(name)) => name.to_string_lossy().into_owned(),
        _ => return Err(ConvertError::InvalidJob(format!("target {} names no file", job.target.display()))),
    };
    let dir = match job.target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let real_dir = tokio::fs::canonicalize(&dir).await.map_err(|e| ConvertError::io(format!("target directory {}", dir.display()), e))?;
    let real_source =
        tokio::fs::canonicalize(&job.source).await.map_err(|e| ConvertError::io(format!("source {}", job.source.display()), e))?;
    if real_dir.join(&name) == real_source {
        return Err(ConvertError::InvalidJob(format!("target {} is the source itself", job.target.display())));
    }
    let part = dir.join(format!(".{name}.part"));
    Ok((dir, part))
}

/// Runs `qemu-img convert` into `part` until it exits or `cancel` fires (then kills it and waits
/// for it, so it writes nothing more once this returns).
async fn run_convert(
    job: &ConvertJob,
    format: DiskFormat,
    part: &Path,
    progress: &watch::Sender<f32>,
    cancel: &CancellationToken,
) -> Result<(), ConvertError> {
    let mut cmd = qemu_img();
    cmd.args(["convert", "-p", "-O", "qcow2", "-f", format.qemu_name()]);
    if let Some(m) = job.coroutines {
        cmd.arg("-m").arg(m.to_string());
    }
    if job.out_of_order {
        cmd.arg("-W");
    }
    cmd.arg(path_arg(&job.source)).arg(path_arg(part));
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(spawn_error)?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(ConvertError::io("qemu-img convert", std::io::Error::other("stdout/stderr not captured")));
    };

    let ran = async {
        let ((), stderr) = tokio::join!(pump_progress(stdout, progress), read_tail(stderr));
        (child.wait().await, stderr)
    };
    let ended = tokio::select! {
        biased;
        () = cancel.cancelled() => None,
        ended = ran => Some(ended),
    };
    let Some((status, stderr)) = ended else {
        // kill_on_drop would also kill it, but without reaping it or knowing when it is gone.
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Err(ConvertError::Cancelled { path: job.source.clone() });
    };
    let status = status.map_err(|e| ConvertError::io("wait for qemu-img convert", e))?;
    if status.success() {
        return Ok(());
    }
    Err(convert_failure(job, status, &stderr))
}

fn convert_failure(job: &ConvertJob, status: ExitStatus, stderr: &str) -> ConvertError {
    let tail = stderr_tail(stderr);
    if tail.contains("No space left on device") || tail.contains("Disk quota exceeded") {
        return ConvertError::NoSpace { target: job.target.clone(), detail: tail };
    }
    ConvertError::QemuImg { op: "convert", path: job.source.clone(), status: status.to_string(), stderr: tail }
}

/// Reads `qemu-img -p` output (`    (12.34/100%)\r`, repeated) and publishes each percentage.
async fn pump_progress(mut out: impl AsyncRead + Unpin, progress: &watch::Sender<f32>) {
    let mut buf = [0u8; 512];
    let mut pending = Vec::new();
    loop {
        let n = match out.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|b| *b == b'\r' || *b == b'\n') {
            if let Some(p) = std::str::from_utf8(&pending[..end]).ok().and_then(parse_progress) {
                raise(progress, p);
            }
            pending.drain(..=end);
        }
        if pending.len() > buf.len() {
            pending.clear(); // not progress output; do not let it grow
        }
    }
}

/// One `-p` update, e.g. `    (12.34/100%)`.
fn parse_progress(segment: &str) -> Option<f32> {
    let p: f32 = segment.trim().strip_prefix('(')?.strip_suffix("/100%)")?.parse().ok()?;
    p.is_finite().then(|| p.clamp(0.0, 100.0))
}

/// Publishes `p` unless it would lower the value watchers saw (qemu-img never goes back, but a
/// reused sender keeps its last value until `convert` resets it).
fn raise(progress: &watch::Sender<f32>, p: f32) {
    progress.send_if_modified(|current| {
        let higher = p > *current;
        if higher {
            *current = p;
        }
        higher
    });
}

/// All of a stream, keeping only its last `STDERR_KEEP` bytes.
async fn read_tail(mut err: impl AsyncRead + Unpin) -> String {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = err.read(&mut buf).await {
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * STDERR_KEEP {
            kept.drain(..kept.len() - STDERR_KEEP);
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// The last `STDERR_LINES` non-empty lines, trimmed, on one line.
fn stderr_tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(STDERR_LINES)..].join(" / ");
    if tail.is_empty() { "(no message)".to_string() } else { tail }
}

/// Flushes the finished image to disk (qemu-img's default target cache does not) and returns its
/// size; a rename without it could leave a complete-looking name over lost data after a crash.
async fn sync_file(part: &Path, target: &Path) -> Result<u64, ConvertError> {
    let path = part.to_path_buf();
    let synced = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path)?;
        file.sync_all()?;
        Ok::<_, std::io::Error>(file.metadata()?.len())
    })
    .await
    .map_err(|e| ConvertError::io(format!("fsync {}", part.display()), std::io::Error::other(e)))?;
    synced.map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => ConvertError::NoSpace { target: target.to_path_buf(), detail: e.to_string() },
        _ => ConvertError::io(format!("fsync {}", part.display()), e),
    })
}

async fn sync_dir(dir: PathBuf) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all()).await.map_err(std::io::Error::other)?
}

/// The partial output: removed unless kept, also when `convert`'s future is dropped half-way
/// (hence the blocking unlink in `Drop`, a single syscall).
struct PartFile {
    path: PathBuf,
    armed: bool,
}

impl PartFile {
    fn keep(mut self) {
        self.armed = false;
    }

    async fn remove(mut self) {
        self.armed = false;
        match tokio::fs::remove_file(&self.path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove a partial conversion");
            }
            _ => {}
        }
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether two disks hold the same guest-visible data (`qemu-img compare`: a larger image equals
/// a smaller one if its extra area reads as zeros). Both are probed and checked as in [`probe`].
pub async fn compare(a: &Path, b: &Path) -> Result<bool, ConvertError> {
    let (fa, fb) = (probe(a).await?.format, probe(b).await?.format);
    let mut cmd = qemu_img();
    cmd.args(["compare", "-f", fa.qemu_name(), "-F", fb.qemu_name()]).arg(path_arg(a)).arg(path_arg(b));
    let out = cmd.output().await.map_err(spawn_error)?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(ConvertError::QemuImg {
            op: "compare",
            path: a.to_path_buf(),
            status: out.status.to_string(),
            stderr: stderr_tail(&String::from_utf8_lossy(&out.stderr)),
        }),
    }
}

/// qemu-img with English messages (the no-space check reads them) that dies with its handle.
fn qemu_img() -> Command {
    let mut cmd = Command::new("qemu-img");
    cmd.env("LC_ALL", "C").stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

fn spawn_error(e: std::io::Error) -> ConvertError {
    ConvertError::io("run qemu-img (from qemu-utils)", e)
}

/// A path qemu-img takes as a plain file: a relative `nbd:x` or `json:{..}` would otherwise name
/// a protocol, and `-x` an option.
fn path_arg(path: &Path) -> PathBuf {
    if path.is_absolute() { path.to_path_buf() } else { Path::new(".").join(path) }
}

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;
