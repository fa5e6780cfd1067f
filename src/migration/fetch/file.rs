//! `file` sources: a directory of exported disks on the worker node. Resource ids are paths
//! relative to that directory; an id that would leave it (`..`, an absolute path, a symlink
//! pointing outside) is refused before anything is opened.

use std::path::{Component, Path, PathBuf};

use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use super::{
    DiscoveredResource, DiskFormat, FetchError, FetchedDisk, FileParams, Meter, Progress, ResourceKind, Written, create_in_scratch,
    finish_file, write_chunk,
};

/// Exports put disks in a folder per VM at most; deeper trees are not exports.
const MAX_DEPTH: usize = 4;
const CHUNK: usize = 1 << 20;

pub(super) async fn probe(p: &FileParams) -> Result<(), FetchError> {
    let meta = tokio::fs::metadata(&p.dir).await.map_err(|e| FetchError::io(format!("source directory {}", p.dir.display()), e))?;
    if !meta.is_dir() {
        return Err(FetchError::BadSpec(format!("{} is not a directory", p.dir.display())));
    }
    Ok(())
}

pub(super) async fn discover(p: &FileParams) -> Result<Vec<DiscoveredResource>, FetchError> {
    probe(p).await?;
    let mut found = Vec::new();
    let mut pending = vec![(p.dir.clone(), String::new(), 0usize)];
    while let Some((dir, prefix, depth)) = pending.pop() {
        let mut entries = tokio::fs::read_dir(&dir).await.map_err(|e| FetchError::io(format!("list {}", dir.display()), e))?;
        while let Some(entry) = entries.next_entry().await.map_err(|e| FetchError::io(format!("list {}", dir.display()), e))? {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
            if name.starts_with('.') {
                continue;
            }
            let id = format!("{prefix}{name}");
            // Follows symlinks, like fetch will; a dangling one is skipped.
            let Ok(meta) = tokio::fs::metadata(entry.path()).await else { continue };
            if meta.is_dir() && depth + 1 < MAX_DEPTH {
                pending.push((entry.path(), format!("{id}/"), depth + 1));
            } else if meta.is_file() {
                let Some(format) = DiskFormat::from_path(&name) else { continue };
                found.push(DiscoveredResource {
                    id_at_source: id,
                    kind: ResourceKind::Volume,
                    name,
                    properties: json!({
                        "path": entry.path(),
                        "size": meta.len(),
                        "format": format,
                    }),
                });
            }
        }
    }
    found.sort_by(|a, b| a.id_at_source.cmp(&b.id_at_source));
    Ok(found)
}

pub(super) async fn fetch(
    p: &FileParams,
    id: &str,
    scratch: &Path,
    written: &mut Written,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<Vec<FetchedDisk>, FetchError> {
    let source = resolve(&p.dir, id).await?;
    let format_hint = DiskFormat::from_path(id);
    let size = tokio::fs::metadata(&source).await.map_err(|e| FetchError::io(format!("stat {}", source.display()), e))?.len();
    let mut meter = Meter::new(progress, Some(size));
    if p.in_place {
        meter.add(size);
        return Ok(vec![FetchedDisk { path: source, format_hint, bytes: size, temporary: false, crash_consistent: false }]);
    }
    let (path, bytes) = copy_file(&source, id, scratch, written, &mut meter, cancel).await?;
    Ok(vec![FetchedDisk { path, format_hint, bytes, temporary: true, crash_consistent: false }])
}

/// Copy `source` into a new scratch file named after `name`, in chunks that count progress and
/// notice cancel: answers the copy's path and length.
pub(super) async fn copy_file(
    source: &Path,
    name: &str,
    scratch: &Path,
    written: &mut Written,
    meter: &mut Meter<'_>,
    cancel: &CancellationToken,
) -> Result<(PathBuf, u64), FetchError> {
    let mut input = tokio::fs::File::open(source).await.map_err(|e| FetchError::io(format!("open {}", source.display()), e))?;
    let (path, mut output) = create_in_scratch(scratch, name, written).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = input.read(&mut buf).await.map_err(|e| FetchError::io(format!("read {}", source.display()), e))?;
        if n == 0 {
            break;
        }
        write_chunk(&mut output, &path, &buf[..n], meter, cancel).await?;
        total += n as u64;
    }
    finish_file(output, &path).await?;
    Ok((path, total))
}

/// The file `id` names inside `dir`, refusing ids that are not plain relative paths and files
/// that resolve outside `dir`.
async fn resolve(dir: &Path, id: &str) -> Result<PathBuf, FetchError> {
    let refuse = |reason: &str| FetchError::BadId { id: id.to_string(), reason: reason.to_string() };
    if id.is_empty() || id.contains('\0') {
        return Err(refuse("empty or not a path"));
    }
    let rel = Path::new(id);
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(refuse("must be a path relative to the source directory, without . or .."));
    }
    let root = tokio::fs::canonicalize(dir).await.map_err(|e| FetchError::io(format!("source directory {}", dir.display()), e))?;
    let full = match tokio::fs::canonicalize(root.join(rel)).await {
        Ok(full) => full,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(FetchError::NotFound(format!("{id} (in {})", dir.display())));
        }
        Err(e) => return Err(FetchError::io(format!("resolve {id}"), e)),
    };
    if !full.starts_with(&root) {
        return Err(refuse("resolves outside the source directory"));
    }
    if !tokio::fs::metadata(&full).await.map(|m| m.is_file()).unwrap_or(false) {
        return Err(refuse("not a regular file"));
    }
    Ok(full)
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
