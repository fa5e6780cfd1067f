//! `file` sources against real directories: discovery, exact copies, in-place use, and ids
//! that try to leave the source directory.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use super::super::tests::{entries, progress, random_bytes, sha256_file};
use crate::migration::fetch::{DiskFormat, FetchError, FileParams, ResourceKind, SourceSpec, discover, fetch, probe_source};

fn source(dir: &Path, in_place: bool) -> SourceSpec {
    SourceSpec::File(FileParams { dir: dir.to_path_buf(), in_place })
}

/// An export directory: two disks (one in a VM's folder) and files that are not disks.
fn export() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web01.vmdk"), random_bytes(300_000)).unwrap();
    std::fs::create_dir(dir.path().join("db01")).unwrap();
    std::fs::write(dir.path().join("db01/db01.vhdx"), random_bytes(70_000)).unwrap();
    std::fs::write(dir.path().join("db01/db01.ovf"), b"<Envelope/>").unwrap();
    std::fs::write(dir.path().join("README.txt"), b"exports").unwrap();
    std::fs::write(dir.path().join(".partial.qcow2"), b"being written").unwrap();
    dir
}

#[tokio::test]
async fn discovery_lists_the_disks_with_sizes_and_formats() {
    let dir = export();
    probe_source(&source(dir.path(), false)).await.unwrap();
    let found = discover(&source(dir.path(), false)).await.unwrap();
    let summary: Vec<_> =
        found.iter().map(|r| (r.id_at_source.as_str(), r.kind, r.properties["size"].as_u64(), r.properties["format"].as_str())).collect();
    assert_eq!(
        summary,
        [
            ("db01/db01.vhdx", ResourceKind::Volume, Some(70_000), Some("vhdx")),
            ("web01.vmdk", ResourceKind::Volume, Some(300_000), Some("vmdk")),
        ]
    );
    assert_eq!(found[1].name, "web01.vmdk");
}

#[tokio::test]
async fn a_missing_directory_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let err = probe_source(&source(&dir.path().join("gone"), false)).await.unwrap_err();
    assert!(err.to_string().contains("gone"), "{err}");
}

#[tokio::test]
async fn fetch_copies_the_bytes_exactly_and_reports_progress() {
    let dir = export();
    let scratch = tempfile::tempdir().unwrap();
    let (tx, rx) = progress();
    let disks = fetch(&source(dir.path(), false), "db01/db01.vhdx", scratch.path(), &tx, &CancellationToken::new()).await.unwrap();
    assert_eq!(disks.len(), 1);
    let disk = &disks[0];
    assert_eq!(disk.path, scratch.path().join("db01.vhdx"));
    assert_eq!((disk.bytes, disk.format_hint, disk.temporary), (70_000, Some(DiskFormat::Vhdx), true));
    assert_eq!(sha256_file(&disk.path), sha256_file(&dir.path().join("db01/db01.vhdx")));
    assert_eq!(*rx.borrow(), (70_000, Some(70_000)));
}

#[tokio::test]
async fn in_place_hands_over_the_source_file_without_copying() {
    let dir = export();
    let scratch = tempfile::tempdir().unwrap();
    let (tx, _rx) = progress();
    let disks = fetch(&source(dir.path(), true), "web01.vmdk", scratch.path(), &tx, &CancellationToken::new()).await.unwrap();
    assert_eq!(disks[0].path, dir.path().canonicalize().unwrap().join("web01.vmdk"));
    assert!(!disks[0].temporary, "the source's own file must not be deleted");
    assert!(entries(scratch.path()).is_empty());
}

#[tokio::test]
async fn a_missing_disk_is_named_in_the_error() {
    let dir = export();
    let scratch = tempfile::tempdir().unwrap();
    let (tx, _rx) = progress();
    let err = fetch(&source(dir.path(), false), "app02.vmdk", scratch.path(), &tx, &CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, FetchError::NotFound(ref what) if what.contains("app02.vmdk")), "{err:?}");
    assert!(entries(scratch.path()).is_empty());
}

#[tokio::test]
async fn ids_that_leave_the_directory_are_refused() {
    let dir = export();
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("escape.img")).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let (tx, _rx) = progress();
    for id in ["../etc/passwd", "/etc/passwd", "db01/../../x.vmdk", "escape.img", "", "db01"] {
        let err = fetch(&source(dir.path(), false), id, scratch.path(), &tx, &CancellationToken::new()).await.unwrap_err();
        assert!(matches!(err, FetchError::BadId { id: ref got, .. } if got == id), "{id:?}: {err:?}");
    }
    assert!(entries(scratch.path()).is_empty());
}

#[tokio::test]
async fn a_cancelled_copy_leaves_nothing() {
    let dir = export();
    let scratch = tempfile::tempdir().unwrap();
    let (tx, _rx) = progress();
    let cancel = CancellationToken::new();
    cancel.cancel();
    let err = fetch(&source(dir.path(), false), "web01.vmdk", scratch.path(), &tx, &cancel).await.unwrap_err();
    assert!(matches!(err, FetchError::Cancelled), "{err:?}");
    assert!(entries(scratch.path()).is_empty());
}
