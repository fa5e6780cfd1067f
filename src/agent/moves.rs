//! Cold moves between agents, the node's half. The hive's mover asks the giving node to
//! `Export` a stopped VM's disk (or `ExportTemplate` a template's) and the taking node to
//! `Import` it (or `InstallExportedTemplate`). The local driver hands out and takes in files on
//! its own host (`DiskRef::File`); between two agents the disk travels through the hive's image
//! registry instead (`DiskRef::Image`):
//!
//! - giving: the driver's file is hashed and `PUT` to `/api/v1/agent/exports/<name>` on the hive
//!   instance whose connection carried the command (node credential); the hive answers 201 when
//!   that made a new image (`fresh`: the mover deletes it afterwards), 200 when it had it.
//! - taking: the image is fetched from that same instance and verified, then handed to the
//!   driver as a file. A VM's disk is fetched into `data_dir/moves/` (not an image the node
//!   holds: no stock copies of it) and removed once the driver took it; a template's becomes an
//!   image the node holds, like one installed by `InstallTemplate`.
//!
//! Driver errors cross the wire with their kind (`NotFound("template X")` from `import` stays
//! what `drivers::is_missing_template` reads). The network part of a command stops when the
//! connection that carried it ends (its answer could not be delivered anyway).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use super::images::AgentImages;
use super::proto::{CmdOk, Command};
use crate::drivers::remote::execute;
use crate::drivers::{DiskRef, DriverError, ExportedDisk, ExportedTemplate, Hypervisor};
use crate::migration::worker::{self, PutFile, WorkerError};

/// Where exported disks go on the hive, below its base URL.
pub const EXPORTS_PATH: &str = "/api/v1/agent/exports";
/// Below the data directory: disks fetched for an import, until the driver took them.
const SCRATCH_DIR: &str = "moves";

/// What a path segment must escape (everything but unreserved characters).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// One connection's context for move commands.
#[derive(Clone)]
pub struct MoveContext {
    /// Base URL of the hive instance whose connection carried the command.
    pub hive: String,
    pub credential: SecretString,
    pub images: AgentImages,
    /// The agent's `data_dir/moves`.
    pub scratch: PathBuf,
    /// Cancelled when the connection ends.
    pub cancel: CancellationToken,
}

/// The scratch directory of moves below `data_dir`, emptied of what an earlier run left there.
pub fn open_scratch(data_dir: &Path) -> std::io::Result<PathBuf> {
    let dir = data_dir.join(SCRATCH_DIR);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Whether `cmd` is one `run` carries out (it needs the connection's context).
pub fn is_move(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::Export { .. } | Command::Import { .. } | Command::ExportTemplate { .. } | Command::InstallExportedTemplate { .. }
    )
}

/// Carry out a move command on the local hypervisor `hv` (any other command as `execute` does).
pub async fn run(hv: &dyn Hypervisor, cmd: Command, ctx: &MoveContext) -> Result<CmdOk, DriverError> {
    match cmd {
        Command::Export { domain } => {
            let exported = hv.export(&domain).await?;
            let disk = publish(exported.disk, &image_name("move-", &domain), ctx).await?;
            Ok(CmdOk::Exported(ExportedDisk { disk, ..exported }))
        }
        Command::ExportTemplate { name } => {
            let exported = hv.export_template(&name).await?;
            let disk = publish(exported.disk, &image_name("template-", &name), ctx).await?;
            Ok(CmdOk::ExportedTemplate(ExportedTemplate { disk, ..exported }))
        }
        Command::Import { spec, disk } => {
            let DiskRef::Image { sha256, .. } = &disk.disk else {
                return Ok(CmdOk::Domain(hv.import(&spec, &disk).await?));
            };
            let file = fetch_once(sha256, ctx).await?;
            let local = ExportedDisk { disk: DiskRef::File { path: file.0.clone() }, ..disk.clone() };
            let result = hv.import(&spec, &local).await;
            drop(file);
            Ok(CmdOk::Domain(result?))
        }
        Command::InstallExportedTemplate { template } => {
            let DiskRef::Image { sha256, .. } = &template.disk else {
                return hv.install_exported_template(&template).await.map(|_| CmdOk::Done);
            };
            // A template's image the node holds already was verified when it came.
            if ctx.images.image_path(sha256).is_none() {
                cancellable(ctx, ctx.images.fetch_from(&ctx.hive, sha256, Vec::new())).await?;
            }
            let path = ctx.images.image_path(sha256).ok_or_else(|| DriverError::Failed(format!("image {sha256} vanished once fetched")))?;
            let local = ExportedTemplate { disk: DiskRef::File { path }, ..template.clone() };
            hv.install_exported_template(&local).await.map(|_| CmdOk::Done)
        }
        other => execute(hv, other).await,
    }
}

/// `prefix` + `name`, cut to the longest name an image may have.
fn image_name(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}").chars().take(crate::images::NAME_MAX_CHARS).collect()
}

/// The URL an export named `name` is uploaded to on `hive`.
pub fn export_url(hive: &str, name: &str) -> String {
    format!("{}{EXPORTS_PATH}/{}", hive.trim_end_matches('/'), utf8_percent_encode(name, SEGMENT))
}

/// Upload the driver's `File` to the hive as image `name`; answers the image. An `Image` (a
/// driver that published it already) stays as it is.
async fn publish(disk: DiskRef, name: &str, ctx: &MoveContext) -> Result<DiskRef, DriverError> {
    let path = match disk {
        DiskRef::File { path } => path,
        image @ DiskRef::Image { .. } => return Ok(image),
    };
    let (sha256, fresh) = upload(&path, &export_url(&ctx.hive, name), &ctx.credential, &ctx.cancel).await.map_err(|e| match e {
        WorkerError::Cancelled => DriverError::Failed("the connection to the hive ended during the upload".into()),
        e => DriverError::Failed(e.to_string()),
    })?;
    tracing::info!(image = %name, %sha256, fresh, "exported disk uploaded to the hive");
    Ok(DiskRef::Image { sha256, fresh })
}

/// Hash `path` and `PUT` it to `url` (node credential `bearer`); answers its SHA-256 and whether
/// the hive made a new image of it (201) rather than having it already (200).
pub async fn upload(path: &Path, url: &str, bearer: &SecretString, cancel: &CancellationToken) -> Result<(String, bool), WorkerError> {
    let size = tokio::fs::metadata(path).await.map_err(|e| io_error(format!("stat {}", path.display()), e))?.len();
    let sha256 = worker::sha256_file(path, tokio::sync::watch::channel(0).0, cancel).await?;
    let virtual_size = qcow2_virtual_size(path).await;
    let file = PutFile { path, size, sha256: &sha256, virtual_size };
    let (status, answer) = worker::put_file(file, url, bearer, |_| {}, cancel).await?;
    let upload_error = |message: String| WorkerError::Upload { url: url.to_string(), status: Some(status.as_u16()), message };
    match answer.get("sha256").and_then(|s| s.as_str()) {
        Some(s) if s == sha256 => {}
        other => return Err(upload_error(format!("the hive answered image {other:?}, not {sha256}"))),
    }
    Ok((sha256, status == reqwest::StatusCode::CREATED))
}

fn io_error(what: String, source: std::io::Error) -> WorkerError {
    WorkerError::Io { what, source }
}

/// The guest-visible size of a qcow2 file, from its header; `None` for any other file.
async fn qcow2_virtual_size(path: &Path) -> Option<u64> {
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 32];
    let mut f = tokio::fs::File::open(path).await.ok()?;
    f.read_exact(&mut header).await.ok()?;
    (header[..4] == *b"QFI\xfb").then(|| u64::from_be_bytes(header[24..32].try_into().unwrap_or_default()))
}

/// A file fetched for one import; removed when dropped.
struct Fetched(PathBuf);

impl Drop for Fetched {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        // What a fetch stopped half-way (the connection ended) left.
        let _ = std::fs::remove_file(format!("{}.part", self.0.display()));
    }
}

/// Fetch image `sha256` from the connection's hive into a file of this import's own.
async fn fetch_once(sha256: &str, ctx: &MoveContext) -> Result<Fetched, DriverError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::fs::create_dir_all(&ctx.scratch).map_err(|e| DriverError::Failed(format!("{}: {e}", ctx.scratch.display())))?;
    let file = Fetched(ctx.scratch.join(format!("{sha256}.{}", NEXT.fetch_add(1, Ordering::Relaxed))));
    cancellable(ctx, ctx.images.fetch_to(&ctx.hive, sha256, &file.0)).await?;
    Ok(file)
}

/// `work`, unless the connection ends first.
async fn cancellable<T>(ctx: &MoveContext, work: impl Future<Output = Result<T, DriverError>>) -> Result<T, DriverError> {
    tokio::select! {
        biased;
        () = ctx.cancel.cancelled() => Err(DriverError::Failed("the connection to the hive ended during the fetch".into())),
        done = work => done,
    }
}

#[cfg(test)]
#[path = "moves_tests.rs"]
mod tests;
