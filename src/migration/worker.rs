//! What a node agent runs for one migration job: connect to the source, fetch the disk(s) into
//! the job's scratch directory, convert the boot disk to qcow2 and hash it (`prepare`), then
//! stream it to the hive (`upload`). Each step reports `(event, percent)` on a channel, percents
//! never decreasing within a step and each step ending at 100 when it succeeds.
//!
//! Guarantees: everything a job writes lives in `scratch_root/<job>`, which goes when the
//! [`Scratch`] is dropped and is already gone when `prepare` fails or is cancelled; two runs of
//! one job in this process never share it (the second waits for the first to let go). Errors say
//! whether another node could succeed ([`WorkerError::retryable`]).

mod scratch;
mod upload;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::convert::{self, ConvertError, ConvertJob};
use super::fetch::{self, DiskFormat, FetchError, FetchedDisk, SourceSpec};
use crate::domain::migration::Event;

pub use scratch::Scratch;
pub use upload::{PutFile, put_file, upload};

/// Hashing reads the qcow2 in pieces this large.
const HASH_BUF: usize = 1 << 20;
/// The part of the conversion step's percent that `qemu-img convert` covers; hashing its output
/// takes the rest (it reads the file once, where the conversion read and wrote it).
const CONVERT_SHARE: u8 = 90;
/// The file the boot disk becomes, in the job's scratch directory.
const OUTPUT_NAME: &str = "disk.qcow2";
/// Where the fetched disks land, in the job's scratch directory.
const FETCH_DIR: &str = "fetch";

/// One migration job as the hive hands it to this node.
#[derive(Clone, Debug)]
pub struct WorkerJob {
    pub job: u64,
    pub source: SourceSpec,
    pub id_at_source: String,
    /// The agent's `data_dir/migrations`: each job works in a directory of its own below it.
    pub scratch_root: PathBuf,
}

/// Progress of the step running now: (event, percent of that step 0..=100).
pub type StepSender = mpsc::UnboundedSender<(Event, u8)>;

/// The boot disk as qcow2 in the job's scratch directory, ready to upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Converted {
    pub path: PathBuf,
    /// Lowercase hex of the qcow2 file's SHA-256.
    pub sha256: String,
    /// Bytes of the qcow2 file.
    pub size: u64,
    /// The guest-visible disk size in bytes.
    pub virtual_size: u64,
    pub source_format: DiskFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("migration source: {0}")]
    Source(FetchError),
    #[error("disk conversion: {0}")]
    Convert(ConvertError),
    #[error("upload to {url}: {}", upload_cause(*.status, .message))]
    Upload { url: String, status: Option<u16>, message: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("migration job cancelled")]
    Cancelled,
}

fn upload_cause(status: Option<u16>, message: &str) -> String {
    match status {
        Some(status) => format!("HTTP {status}: {message}"),
        None => message.to_string(),
    }
}

impl From<FetchError> for WorkerError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Cancelled => Self::Cancelled,
            e => Self::Source(e),
        }
    }
}

impl From<ConvertError> for WorkerError {
    fn from(e: ConvertError) -> Self {
        match e {
            ConvertError::Cancelled { .. } => Self::Cancelled,
            e => Self::Convert(e),
        }
    }
}

impl WorkerError {
    fn io(what: impl std::fmt::Display, source: std::io::Error) -> Self {
        Self::Io { what: what.to_string(), source }
    }

    /// Whether another node could succeed where this one failed. Not: what the source or its
    /// disk is (a bad id, a missing resource, a corrupt, unsafe or unsupported image) and what
    /// the hive refuses for the migration itself; a cancel. Yes: what belongs to this node or
    /// the moment (local I/O, a full disk, timeouts, HTTP and transport failures).
    pub fn retryable(&self) -> bool {
        match self {
            Self::Source(e) => match e {
                FetchError::BadSpec(_)
                | FetchError::BadId { .. }
                | FetchError::NotFound(_)
                | FetchError::DomainRunning(_)
                | FetchError::Unsupported(_)
                | FetchError::Cancelled => false,
                // Gone from the source: every node would be told the same.
                FetchError::HttpStatus { status, .. } => !matches!(status, 404 | 410),
                FetchError::Io { .. }
                | FetchError::Http { .. }
                | FetchError::ShortBody { .. }
                | FetchError::Timeout { .. }
                | FetchError::Libvirt(_) => true,
            },
            Self::Convert(e) => match e {
                ConvertError::UnsupportedFormat { .. }
                | ConvertError::FormatMismatch { .. }
                | ConvertError::Unsafe { .. }
                | ConvertError::BadInfo { .. }
                | ConvertError::InvalidJob(_)
                | ConvertError::Cancelled { .. } => false,
                // qemu-img fails the same way on the same bytes, unless this node's disk or
                // memory failed it.
                ConvertError::QemuImg { stderr, .. } => stderr.contains("Input/output error") || stderr.contains("Cannot allocate memory"),
                ConvertError::NoSpace { .. } | ConvertError::Io { .. } | ConvertError::Timeout { .. } => true,
            },
            // The hive has no such migration (any more), it is finished, or it refuses the image
            // itself: another node's upload would hear the same.
            Self::Upload { status, .. } => !matches!(status, Some(404 | 409 | 410 | 413 | 422)),
            Self::Io { .. } => true,
            Self::Cancelled => false,
        }
    }
}

/// Connect to the source, fetch `job.id_at_source`, and convert its boot disk to qcow2 in the
/// job's scratch directory, hashing the result. Only the first disk the source gives (the boot
/// disk) is migrated: an instance's other disks are fetched, logged as not migrated and deleted.
/// The returned [`Scratch`] holds the qcow2; drop it once the upload is done.
pub async fn prepare(job: &WorkerJob, steps: &StepSender, cancel: &CancellationToken) -> Result<(Scratch, Converted), WorkerError> {
    let started = Instant::now();
    let mut connecting = StepReporter::start(steps, Event::ConnectingToSource);
    tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(WorkerError::Cancelled),
        probed = fetch::probe_source(&job.source) => probed?,
    }
    connecting.to(100);

    let scratch = Scratch::create(&job.scratch_root, job.job, cancel).await?;
    match fetch_and_convert(job, scratch.path(), steps, cancel).await {
        Ok(converted) => {
            tracing::info!(
                migration.job = job.job,
                size = converted.size,
                virtual_size = converted.virtual_size,
                format = converted.source_format.qemu_name(),
                duration_ms = started.elapsed().as_millis() as u64,
                "migration disk ready to upload"
            );
            Ok((scratch, converted))
        }
        Err(e) => {
            scratch.discard().await;
            // Whatever failed after a cancel failed because of it.
            Err(if cancel.is_cancelled() { WorkerError::Cancelled } else { e })
        }
    }
}

async fn fetch_and_convert(job: &WorkerJob, dir: &Path, steps: &StepSender, cancel: &CancellationToken) -> Result<Converted, WorkerError> {
    let fetch_dir = dir.join(FETCH_DIR);
    let disks = fetch_disks(job, &fetch_dir, steps, cancel).await?;
    let Some((boot, others)) = disks.split_first() else {
        return Err(WorkerError::Source(FetchError::NotFound(format!("a disk of {}", job.id_at_source))));
    };
    if !others.is_empty() {
        let paths: Vec<String> = others.iter().map(|d| d.path.display().to_string()).collect();
        tracing::info!(migration.job = job.job, not_migrated = ?paths, "only the boot disk is migrated; the others are left out");
        // Space the conversion may need.
        remove_fetched(others).await;
    }
    if cancel.is_cancelled() {
        return Err(WorkerError::Cancelled);
    }
    let converted = convert_boot_disk(boot, &dir.join(OUTPUT_NAME), steps, cancel).await?;
    remove_fetched(std::slice::from_ref(boot)).await;
    if let Err(e) = tokio::fs::remove_dir(&fetch_dir).await {
        tracing::warn!(path = %fetch_dir.display(), error = %e, "could not remove the fetch directory");
    }
    Ok(converted)
}

async fn fetch_disks(
    job: &WorkerJob,
    fetch_dir: &Path,
    steps: &StepSender,
    cancel: &CancellationToken,
) -> Result<Vec<FetchedDisk>, WorkerError> {
    let mut report = StepReporter::start(steps, Event::FetchingDisks);
    tokio::fs::create_dir(fetch_dir).await.map_err(|e| WorkerError::io(format!("create {}", fetch_dir.display()), e))?;
    let (progress, watcher) = watch::channel((0, None));
    let fetching = fetch::fetch(&job.source, &job.id_at_source, fetch_dir, &progress, cancel);
    let disks = follow(fetching, watcher, |&(done, total)| {
        if let Some(p) = total.and_then(|total| percent(done, total)) {
            report.to(p);
        }
    })
    .await?;
    report.to(100);
    Ok(disks)
}

/// Convert, then hash the output: both are the conversion step (see `CONVERT_SHARE`).
async fn convert_boot_disk(
    disk: &FetchedDisk,
    target: &Path,
    steps: &StepSender,
    cancel: &CancellationToken,
) -> Result<Converted, WorkerError> {
    let mut report = StepReporter::start(steps, Event::ConvertingDisks);
    // The hint makes a file whose content is not what its name says an error, not a raw disk.
    let job = ConvertJob { declared_format: disk.format_hint, ..ConvertJob::new(&disk.path, target) };
    let (progress, watcher) = watch::channel(0.0f32);
    let outcome = follow(convert::convert(&job, &progress, cancel), watcher, |&p| {
        report.to((p.clamp(0.0, 100.0) * f32::from(CONVERT_SHARE) / 100.0) as u8);
    })
    .await?;
    report.to(CONVERT_SHARE);

    let size = tokio::fs::metadata(target).await.map_err(|e| WorkerError::io(format!("stat {}", target.display()), e))?.len();
    let (hashed, watcher) = watch::channel(0u64);
    let sha256 = follow(sha256_file(target, hashed, cancel), watcher, |&done| {
        let tail = percent(done, size).unwrap_or(100);
        report.to(CONVERT_SHARE + ((100 - CONVERT_SHARE) as u32 * tail as u32 / 100) as u8);
    })
    .await?;
    report.to(100);
    Ok(Converted {
        path: target.to_path_buf(),
        sha256,
        size,
        virtual_size: outcome.source.virtual_size,
        source_format: outcome.source.format,
    })
}

/// The SHA-256 of `path` in lowercase hex, read on a blocking thread that publishes the bytes
/// read so far and stops on cancel, or when this future is dropped.
pub async fn sha256_file(path: &Path, hashed: watch::Sender<u64>, cancel: &CancellationToken) -> Result<String, WorkerError> {
    let stop = cancel.child_token();
    let _stop_when_dropped = stop.clone().drop_guard();
    let file = path.to_path_buf();
    let task = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let what = || format!("hash {}", file.display());
        let mut input = std::fs::File::open(&file).map_err(|e| WorkerError::io(what(), e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; HASH_BUF];
        let mut done = 0u64;
        loop {
            if stop.is_cancelled() {
                return Err(WorkerError::Cancelled);
            }
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WorkerError::io(what(), e)),
            };
            hasher.update(&buf[..n]);
            done += n as u64;
            hashed.send_replace(done);
        }
        Ok(hex::encode(hasher.finalize()))
    });
    task.await.map_err(|e| WorkerError::io(format!("hash {}", path.display()), std::io::Error::other(e)))?
}

/// Deletes the scratch copies among `disks` (a source's own file, `temporary` false, stays).
/// A failure only warns: the file goes with the job's scratch directory anyway.
async fn remove_fetched(disks: &[FetchedDisk]) {
    for disk in disks.iter().filter(|d| d.temporary) {
        if let Err(e) = tokio::fs::remove_file(&disk.path).await {
            tracing::warn!(path = %disk.path.display(), error = %e, "could not remove a fetched disk");
        }
    }
}

/// Runs `work` to completion, handing every value `watcher` sees meanwhile to `on`.
async fn follow<T, P>(work: impl Future<Output = T>, mut watcher: watch::Receiver<P>, mut on: impl FnMut(&P)) -> T {
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            biased;
            out = &mut work => return out,
            changed = watcher.changed() => match changed {
                Ok(()) => on(&watcher.borrow_and_update()),
                Err(_) => return work.await,
            },
        }
    }
}

/// `done` of `total` in whole percent, if there is a total to speak of.
fn percent(done: u64, total: u64) -> Option<u8> {
    (total > 0).then(|| (u128::from(done.min(total)) * 100 / u128::from(total)) as u8)
}

/// Sends one step's percents: 0 when the step starts, then only increases (so at most one
/// message per percent, however often the work reports).
struct StepReporter {
    steps: StepSender,
    event: Event,
    sent: u8,
}

impl StepReporter {
    fn start(steps: &StepSender, event: Event) -> Self {
        // A receiver that is gone only means nobody watches; the job goes on.
        let _ = steps.send((event, 0));
        Self { steps: steps.clone(), event, sent: 0 }
    }

    fn to(&mut self, percent: u8) {
        let percent = percent.min(100);
        if percent > self.sent {
            self.sent = percent;
            let _ = self.steps.send((self.event, percent));
        }
    }
}

/// Bytes free to unprivileged users on the file system that holds `dir`, or would hold it once
/// created (the nearest existing ancestor answers): for the scheduler's choice of a node.
pub fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = nearest_existing(dir)?;
    let path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and outlives the call; `stat` is written by a successful
    // call before it is read.
    let stat = unsafe {
        if libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    // The field types differ between platforms.
    #[allow(clippy::unnecessary_cast)]
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// `dir` or its closest ancestor that exists (a relative path ends at the current directory).
fn nearest_existing(dir: &Path) -> Option<&Path> {
    dir.ancestors().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p }).find(|p| std::fs::metadata(p).is_ok())
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
