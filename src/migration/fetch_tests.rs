//! What every source shares: the stored form of a source, scratch file naming, and the
//! clean-up of partial files. Helpers here serve the per-source tests in `fetch/*_tests.rs`.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::*;

pub(super) fn sha256_file(path: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

/// Bytes no two tests share and no compressor shrinks: a disk's content in miniature.
pub(super) fn random_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|_| rand::random::<u8>()).collect()
}

/// The names in a scratch directory, sorted: empty after a failed fetch.
pub(super) fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

pub(super) fn progress() -> (Progress, watch::Receiver<(u64, Option<u64>)>) {
    watch::channel((0, None))
}

#[test]
fn a_source_is_stored_as_kind_and_params() {
    let spec: SourceSpec = serde_json::from_value(serde_json::json!({
        "kind": "http",
        "params": { "base_url": "http://127.0.0.1:1/exports" }
    }))
    .unwrap();
    let SourceSpec::Http(ref p) = spec else { panic!("not http: {spec:?}") };
    assert_eq!((p.connect_timeout_ms, p.stall_timeout_ms), (10_000, 60_000), "timeouts default");
    assert_eq!(spec.kind(), SourceKind::Http);
    let stored = serde_json::to_value(&spec).unwrap();
    assert_eq!(stored["kind"], "http");
    assert_eq!(stored["params"]["base_url"], "http://127.0.0.1:1/exports");

    let lv = SourceSpec::from_parts(SourceKind::Libvirt, serde_json::json!({ "uri": "test:///default" })).unwrap();
    assert_eq!(
        lv,
        SourceSpec::Libvirt(LibvirtParams { uri: "test:///default".into(), allow_running: false, transfer: DiskTransfer::Auto })
    );
}

#[test]
fn bad_parameters_name_the_kind_and_the_field() {
    let err = SourceSpec::from_parts(SourceKind::File, serde_json::json!({ "directory": "/x" })).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, FetchError::BadSpec(_)), "{err:?}");
    assert!(text.contains("File") && text.contains("dir"), "{text}");
}

#[test]
fn formats_use_qemu_names() {
    assert_eq!(DiskFormat::from_path("exports/web01.VHD"), Some(DiskFormat::Vpc));
    assert_eq!(DiskFormat::from_path("a.img").map(DiskFormat::qemu_name), Some("raw"));
    assert_eq!(DiskFormat::from_path("disk.ova"), None);
    assert_eq!(serde_json::to_value(DiskFormat::Qcow2).unwrap(), "qcow2");
}

#[test]
fn scratch_names_are_one_safe_component() {
    assert_eq!(safe_file_name("a/b/../disk 1.vmdk"), "disk_1.vmdk");
    assert_eq!(safe_file_name("..\\..\\.bashrc"), "bashrc");
    assert_eq!(safe_file_name("../"), "disk");
    assert!(safe_file_name(&"x".repeat(300)).len() <= 100);
}

#[tokio::test]
async fn a_second_disk_of_the_same_name_does_not_replace_the_first() {
    let scratch = tempfile::tempdir().unwrap();
    let mut written = Written::default();
    let (a, _) = create_in_scratch(scratch.path(), "disk.vmdk", &mut written).await.unwrap();
    let (b, _) = create_in_scratch(scratch.path(), "x/disk.vmdk", &mut written).await.unwrap();
    assert_ne!(a, b);
    assert_eq!(entries(scratch.path()), ["disk-1.vmdk", "disk.vmdk"]);
    written.remove().await;
    assert!(entries(scratch.path()).is_empty(), "removed on failure");
}

#[tokio::test]
async fn files_of_a_fetch_dropped_half_way_are_removed() {
    let scratch = tempfile::tempdir().unwrap();
    {
        let mut written = Written::default();
        create_in_scratch(scratch.path(), "disk.raw", &mut written).await.unwrap();
        assert_eq!(entries(scratch.path()), ["disk.raw"]);
    }
    assert!(entries(scratch.path()).is_empty());
}
