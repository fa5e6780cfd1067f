//! `libvirt` sources: every domain of a libvirt connection is an instance; fetching one copies
//! each of its disks. A disk file readable on this node, through a connection to this node, is
//! copied directly; otherwise (or with `transfer: stream`) it comes through libvirt's storage
//! volume download, which needs the disk to belong to a storage pool. A running domain is
//! refused unless `allow_running` is set, and its disks are then marked crash-consistent.
//! libvirt calls block, so they run in `spawn_blocking`; the stream's chunks reach the async
//! side through a small channel, which also tells the reader to stop when the fetch is over.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;
use virt::sys;

use super::{
    DiscoveredResource, DiskFormat, DiskTransfer, FetchError, FetchedDisk, LibvirtParams, Meter, Progress, ResourceKind, Written,
    create_in_scratch, file, finish_file, write_chunk,
};

const CHUNK: usize = 1 << 20;

/// A connection closed when dropped (`Connect` has no `Drop`).
struct Conn(Connect);

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.0.close();
    }
}

fn open(uri: &str) -> Result<Conn, FetchError> {
    static QUIET: std::sync::Once = std::sync::Once::new();
    // libvirt's default error handler prints every error to stderr; ours are returned.
    QUIET.call_once(virt::error::clear_error_callback);
    Connect::open(Some(uri)).map(Conn).map_err(|e| FetchError::Libvirt(format!("connect to {uri}: {}", e.message())))
}

fn failed(what: impl std::fmt::Display) -> impl FnOnce(virt::error::Error) -> FetchError {
    move |e| FetchError::Libvirt(format!("{what}: {}", e.message()))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, FetchError> + Send + 'static) -> Result<T, FetchError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| FetchError::Libvirt(format!("libvirt call did not finish: {e}")))?
}

/// One `<disk>` of a domain's XML.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(super) struct DomainDisk {
    pub device: String,
    pub target: String,
    /// The file or block device; a pool volume's is looked up when fetched.
    pub source: Option<String>,
    pub pool_volume: Option<(String, String)>,
    pub format: Option<String>,
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(tag))
}

pub(super) fn parse_disks(xml: &str) -> Result<Vec<DomainDisk>, FetchError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| FetchError::Libvirt(format!("domain XML: {e}")))?;
    let mut disks = Vec::new();
    for disk in doc.descendants().filter(|n| n.has_tag_name("disk") && n.parent().is_some_and(|p| p.has_tag_name("devices"))) {
        let source = child(disk, "source");
        disks.push(DomainDisk {
            device: disk.attribute("device").unwrap_or("disk").to_string(),
            target: child(disk, "target").and_then(|t| t.attribute("dev")).unwrap_or_default().to_string(),
            source: source.and_then(|s| s.attribute("file").or_else(|| s.attribute("dev"))).map(str::to_string),
            pool_volume: source.and_then(|s| Some((s.attribute("pool")?.to_string(), s.attribute("volume")?.to_string()))),
            format: child(disk, "driver").and_then(|d| d.attribute("type")).map(str::to_string),
        });
    }
    Ok(disks)
}

struct Summary {
    name: String,
    uuid: String,
    active: bool,
    properties: serde_json::Value,
    disks: Vec<DomainDisk>,
}

fn summarize(dom: &Domain) -> Result<Summary, FetchError> {
    let name = dom.get_name().map_err(failed("domain name"))?;
    let uuid = dom.get_uuid_string().map_err(failed(format!("uuid of {name}")))?;
    let info = dom.get_info().map_err(failed(format!("info of {name}")))?;
    let active = dom.is_active().map_err(failed(format!("state of {name}")))?;
    let xml = dom.get_xml_desc(0).map_err(failed(format!("XML of {name}")))?;
    let disks = parse_disks(&xml)?;
    let properties = json!({
        "uuid": uuid,
        "state": state_name(info.state),
        "vcpus": info.nr_virt_cpu,
        "memory_mib": info.memory / 1024,
        "disks": disks.iter().map(|d| json!({
            "device": d.device,
            "target": d.target,
            "source": d.source,
            "format": d.format,
        })).collect::<Vec<_>>(),
    });
    Ok(Summary { name, uuid, active, properties, disks })
}

fn state_name(state: sys::virDomainState) -> &'static str {
    match state {
        sys::VIR_DOMAIN_RUNNING => "running",
        sys::VIR_DOMAIN_BLOCKED => "blocked",
        sys::VIR_DOMAIN_PAUSED => "paused",
        sys::VIR_DOMAIN_SHUTDOWN => "shutting-down",
        sys::VIR_DOMAIN_SHUTOFF => "shutoff",
        sys::VIR_DOMAIN_CRASHED => "crashed",
        sys::VIR_DOMAIN_PMSUSPENDED => "suspended",
        _ => "unknown",
    }
}

pub(super) async fn probe(p: &LibvirtParams) -> Result<(), FetchError> {
    let uri = p.uri.clone();
    blocking(move || {
        let conn = open(&uri)?;
        conn.0.get_lib_version().map_err(failed(&uri))?;
        Ok(())
    })
    .await
}

pub(super) async fn discover(p: &LibvirtParams) -> Result<Vec<DiscoveredResource>, FetchError> {
    let uri = p.uri.clone();
    blocking(move || {
        let conn = open(&uri)?;
        let domains = conn.0.list_all_domains(0).map_err(failed("list domains"))?;
        let mut found = Vec::with_capacity(domains.len());
        for dom in domains {
            let s = summarize(&dom)?;
            found.push(DiscoveredResource { id_at_source: s.uuid, kind: ResourceKind::Instance, name: s.name, properties: s.properties });
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    })
    .await
}

/// A disk to fetch, with where it is and how it comes.
struct Planned {
    target: String,
    source: String,
    format: Option<DiskFormat>,
    size: Option<u64>,
    local: bool,
}

pub(super) async fn fetch(
    p: &LibvirtParams,
    id: &str,
    scratch: &Path,
    written: &mut Written,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<Vec<FetchedDisk>, FetchError> {
    let (params, id_owned) = (p.clone(), id.to_string());
    let (summary, plan) = blocking(move || plan_fetch(&params, &id_owned)).await?;
    if summary.active {
        tracing::warn!(domain = %summary.name, "copying the disks of a running domain: the copy is only crash-consistent");
    }
    let total = plan.iter().map(|d| d.size).sum::<Option<u64>>();
    let mut meter = Meter::new(progress, total);
    let mut disks = Vec::with_capacity(plan.len());
    for disk in plan {
        let ext = disk.format.map(|f| f.qemu_name()).unwrap_or("img");
        let name = format!("{}-{}.{ext}", summary.name, disk.target);
        let (path, bytes) = if disk.local {
            file::copy_file(Path::new(&disk.source), &name, scratch, written, &mut meter, cancel).await?
        } else {
            download(&p.uri, &disk.source, &name, scratch, written, &mut meter, cancel).await?
        };
        disks.push(FetchedDisk { path, format_hint: disk.format, bytes, temporary: true, crash_consistent: summary.active });
    }
    Ok(disks)
}

/// The domain `id` (uuid or name) and its disks to fetch; cdroms and floppies are not fetched.
fn plan_fetch(p: &LibvirtParams, id: &str) -> Result<(Summary, Vec<Planned>), FetchError> {
    let uri = p.uri.as_str();
    let conn = open(uri)?;
    let looks_like_uuid = id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    let found = if looks_like_uuid {
        Domain::lookup_by_uuid_string(&conn.0, id).or_else(|_| Domain::lookup_by_name(&conn.0, id))
    } else {
        Domain::lookup_by_name(&conn.0, id)
    };
    let dom = found.map_err(|e| match e.code() {
        virt::error::ErrorNumber::NoDomain => FetchError::NotFound(format!("domain {id} (on {uri})")),
        _ => FetchError::Libvirt(format!("look up domain {id}: {}", e.message())),
    })?;
    let summary = summarize(&dom)?;
    if summary.active && !p.allow_running {
        return Err(FetchError::DomainRunning(summary.name));
    }
    let mut plan = Vec::new();
    for d in summary.disks.iter().filter(|d| d.device == "disk") {
        let source = match (&d.source, &d.pool_volume) {
            (Some(source), _) => source.clone(),
            (None, Some((pool, vol))) => StoragePool::lookup_by_name(&conn.0, pool)
                .and_then(|p| StorageVol::lookup_by_name(&p, vol))
                .and_then(|v| v.get_path())
                .map_err(failed(format!("volume {pool}/{vol} of disk {} of {}", d.target, summary.name)))?,
            (None, None) => {
                return Err(FetchError::Unsupported(format!(
                    "disk {} of domain {} has no file or block device source (network disks are not fetched)",
                    d.target, summary.name
                )));
            }
        };
        let format = d.format.as_deref().and_then(DiskFormat::from_name).or_else(|| DiskFormat::from_path(&source));
        let local = p.transfer == DiskTransfer::Auto && uri_is_local(uri) && std::fs::File::open(&source).is_ok();
        let size = if local {
            std::fs::metadata(&source).ok().map(|m| m.len())
        } else {
            let vol = StorageVol::lookup_by_path(&conn.0, &source).map_err(|e| {
                FetchError::Libvirt(format!(
                    "disk {} of {} ({source}) is not readable here and not in a libvirt storage pool: {}",
                    d.target,
                    summary.name,
                    e.message()
                ))
            })?;
            vol.get_info_flags(sys::VIR_STORAGE_VOL_GET_PHYSICAL).ok().map(|i| i.allocation)
        };
        plan.push(Planned { target: d.target.clone(), source, format, size, local });
    }
    if plan.is_empty() {
        return Err(FetchError::NotFound(format!("a disk of domain {}", summary.name)));
    }
    Ok((summary, plan))
}

/// Whether the URI's disks are this node's files: no host, or a loopback one.
pub(super) fn uri_is_local(uri: &str) -> bool {
    let Some((_, rest)) = uri.split_once("://") else { return false };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.split_once(']'))
        .map(|(h, _)| h)
        .unwrap_or_else(|| host.split(':').next().unwrap_or_default());
    matches!(host, "" | "localhost" | "127.0.0.1" | "::1")
}

enum Piece {
    Chunk(Vec<u8>),
    Done,
    Failed(String),
}

/// Stream the volume at `source` into a new scratch file through libvirt.
async fn download(
    uri: &str,
    source: &str,
    name: &str,
    scratch: &Path,
    written: &mut Written,
    meter: &mut Meter<'_>,
    cancel: &CancellationToken,
) -> Result<(PathBuf, u64), FetchError> {
    let (tx, mut rx) = mpsc::channel(4);
    let (uri_owned, source_owned) = (uri.to_string(), source.to_string());
    tokio::task::spawn_blocking(move || read_volume(&uri_owned, &source_owned, &tx));
    let (path, mut file) = create_in_scratch(scratch, name, written).await?;
    let mut bytes = 0u64;
    loop {
        let piece = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(FetchError::Cancelled),
            piece = rx.recv() => piece,
        };
        match piece {
            Some(Piece::Chunk(chunk)) => {
                write_chunk(&mut file, &path, &chunk, meter, cancel).await?;
                bytes += chunk.len() as u64;
            }
            Some(Piece::Done) => break,
            Some(Piece::Failed(e)) => return Err(FetchError::Libvirt(format!("download {source}: {e}"))),
            None => return Err(FetchError::Libvirt(format!("download {source}: the reader stopped early"))),
        }
    }
    finish_file(file, &path).await?;
    Ok((path, bytes))
}

/// The blocking half of `download`: ends, aborting the stream, as soon as nobody listens.
fn read_volume(uri: &str, source: &str, tx: &mpsc::Sender<Piece>) {
    let fail = |what: &str, e: virt::error::Error| {
        let _ = tx.blocking_send(Piece::Failed(format!("{what}: {}", e.message())));
    };
    let conn = match open(uri) {
        Ok(conn) => conn,
        Err(e) => {
            let _ = tx.blocking_send(Piece::Failed(e.to_string()));
            return;
        }
    };
    let vol = match StorageVol::lookup_by_path(&conn.0, source) {
        Ok(vol) => vol,
        Err(e) => return fail("look up the volume", e),
    };
    let stream = match Stream::new(&conn.0, 0) {
        Ok(stream) => stream,
        Err(e) => return fail("open a stream", e),
    };
    if let Err(e) = vol.download(&stream, 0, 0, 0) {
        return fail("start the download", e);
    }
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stream.recv(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if tx.blocking_send(Piece::Chunk(buf[..n].to_vec())).is_err() {
                    let _ = stream.abort();
                    return;
                }
            }
            Err(e) => {
                let _ = stream.abort();
                return fail("receive", e);
            }
        }
    }
    match stream.finish() {
        Ok(()) => {
            let _ = tx.blocking_send(Piece::Done);
        }
        Err(e) => fail("finish the download", e),
    }
}

#[cfg(test)]
#[path = "libvirt_tests.rs"]
mod tests;
