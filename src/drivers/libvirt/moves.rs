//! Cold moves, the blocking half: handing a stopped VM's overlay out (`export`), defining a VM
//! from another node's overlay (`import`), and a template's disk for a node that lacks it.
//!
//! An overlay only means something on top of the template disk it was made on, so every export
//! names its template with that disk's SHA-256, and an import checks it against this node's
//! template of that name before anything is copied. Hashing a template disk takes a while
//! (gigabytes), so the digest is kept beside it in `<template>/disk.sha256` (`<hex> <size>`),
//! which stays good as long as it is newer than the disk and records the disk's size; templates
//! are never replaced (`TemplateFiles::install`), so it rarely needs redoing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use virt::sys;

use super::Shared;
use super::ops::{self, check_name, conn, failed, lookup, overlay_path};
use crate::drivers::domain_xml::{DomainXmlError, HIVE_NS, TemplateFiles};
use crate::drivers::{CLEAN_SNAPSHOT, DiskRef, DriverError, ExportedDisk, ExportedTemplate, VmSpec, missing_template};

/// The template a domain was cloned from, as its `<hive:template>` metadata names it. libvirt
/// answers the element it holds for our namespace without a namespace (`<vm><template>…`);
/// the element as defined (in `HIVE_NS`) is read too.
pub(super) fn template_of(metadata: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(metadata).ok()?;
    let ours = |n: &roxmltree::Node| matches!(n.tag_name().namespace(), None | Some(HIVE_NS));
    let root = doc.root_element();
    if root.tag_name().name() != "vm" || !ours(&root) {
        return None;
    }
    let node = root.children().find(|n| n.is_element() && n.tag_name().name() == "template" && ours(n))?;
    node.text().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

/// Where the digest of a template disk is kept.
pub(super) fn digest_cache(disk: &Path) -> PathBuf {
    disk.with_file_name("disk.sha256")
}

/// The SHA-256 (hex) of a template's disk, from the cache beside it when that is still good,
/// else computed and cached (written to a temporary file, then renamed into place). A cache
/// that cannot be written costs only the next caller another hash.
pub(super) fn template_sha256(disk: &Path) -> Result<String, DriverError> {
    let io = |e: std::io::Error| DriverError::Failed(format!("template disk {}: {e}", disk.display()));
    let meta = std::fs::metadata(disk).map_err(io)?;
    let cache = digest_cache(disk);
    if let Some(hex) = cached_digest(&cache, &meta) {
        return Ok(hex);
    }
    let mut file = std::fs::File::open(disk).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hex = hex::encode(hasher.finalize());
    let tmp = cache.with_file_name(format!(".disk.sha256.{}-{:08x}", std::process::id(), rand::random::<u32>()));
    let written = std::fs::write(&tmp, format!("{hex} {}\n", meta.len())).and_then(|()| std::fs::rename(&tmp, &cache));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(path = %cache.display(), error = %e, "cannot cache the template's digest");
    }
    Ok(hex)
}

fn cached_digest(cache: &Path, disk: &std::fs::Metadata) -> Option<String> {
    let cached = std::fs::metadata(cache).ok()?;
    if cached.modified().ok()? < disk.modified().ok()? {
        return None;
    }
    let text = std::fs::read_to_string(cache).ok()?;
    let (hex, size) = text.trim().split_once(' ')?;
    let good = size.parse::<u64>().ok()? == disk.len() && hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    good.then(|| hex.to_ascii_lowercase())
}

/// The template domain `name` was cloned from (its metadata says) and that template disk's digest.
pub(super) fn template_and_digest(s: &Shared, dom: &virt::domain::Domain, name: &str) -> Result<(String, String), DriverError> {
    let metadata = dom.get_metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(HIVE_NS), 0).map_err(failed)?;
    let template = template_of(&metadata).ok_or_else(|| DriverError::Failed(format!("{name} names no template in its metadata")))?;
    let tpl = TemplateFiles::locate(&s.cfg.templates_dir, &template)
        .map_err(|e| DriverError::Failed(format!("the template of {name} is gone: {e}")))?;
    let digest = template_sha256(&tpl.disk)?;
    Ok((template, digest))
}

/// Hard-stop the domain if it runs, and answer its overlay, template and template digest. The
/// definition and the overlay stay, so a move that fails can start it again.
pub(super) fn export(s: &Shared, name: &str) -> Result<ExportedDisk, DriverError> {
    let conn = conn(s)?;
    let dom = lookup(&conn, name)?;
    let stop = || -> Result<(), virt::error::Error> {
        if dom.is_active()? {
            // It may have stopped on its own in between: only a still-active one fails.
            if let Err(e) = dom.destroy() {
                if dom.is_active()? {
                    return Err(e);
                }
            }
        }
        Ok(())
    };
    stop().map_err(failed)?;
    let overlay = overlay_path(s, name);
    if !overlay.is_file() {
        return Err(DriverError::Failed(format!("{name} has no overlay at {}", overlay.display())));
    }
    let (template, template_sha256) = template_and_digest(s, &dom, name)?;
    tracing::info!(vm = %name, template = %template, "exported for a move");
    Ok(ExportedDisk { disk: DiskRef::File { path: overlay }, template, template_sha256 })
}

/// Define `spec.name` on a copy of the exported overlay, put back to its `clean` snapshot, with
/// no internal snapshot left and rebased onto this node's template; not started. The domain's
/// template is the disk's (`disk.template`), whatever `spec.template` says: it is what the
/// overlay is backed by. On failure nothing is left: no overlay, no domain, no address.
pub(super) fn import(s: &Shared, spec: &VmSpec, disk: &ExportedDisk) -> Result<String, DriverError> {
    let DiskRef::File { path: source } = &disk.disk else {
        return Err(DriverError::Unsupported("importing disks from the hive's registry".into()));
    };
    check_name(&spec.name)?;
    let tpl = same_template(s, &disk.template, &disk.template_sha256)?;
    let conn = conn(s)?;
    let overlay = free_place(s, &conn, &spec.name)?;
    let started = std::time::Instant::now();
    let prepared = std::fs::copy(source, &overlay)
        .map_err(|e| DriverError::Failed(format!("copying {} to {}: {e}", source.display(), overlay.display())))
        .and_then(|_| prepare_overlay(s, &tpl, &overlay));
    if let Err(e) = prepared {
        let _ = std::fs::remove_file(&overlay);
        return Err(e);
    }
    let spec = VmSpec { template: disk.template.clone(), ..spec.clone() };
    ops::define_or_clean_up(s, &conn, &spec, &tpl, &overlay)?;
    tracing::info!(vm = %spec.name, template = %spec.template, duration_ms = started.elapsed().as_millis() as u64, "imported from a move");
    Ok(spec.name.clone())
}

/// This node's template `name`, if its disk has the source's digest: `NotFound("template …")`
/// when there is none, `Failed` when it differs (an overlay on the wrong base is garbage).
pub(super) fn same_template(s: &Shared, name: &str, sha256: &str) -> Result<TemplateFiles, DriverError> {
    let tpl = match TemplateFiles::locate(&s.cfg.templates_dir, name) {
        Ok(t) => t,
        Err(DomainXmlError::NoTemplate { .. }) => return Err(missing_template(name)),
        Err(e) => return Err(DriverError::Failed(e.to_string())),
    };
    if !template_sha256(&tpl.disk)?.eq_ignore_ascii_case(sha256) {
        return Err(DriverError::Failed(format!("template {name} on this node differs from the source's")));
    }
    Ok(tpl)
}

/// The overlay path for a domain `name` arriving here, if neither the name nor the file is taken.
pub(super) fn free_place(s: &Shared, conn: &virt::connect::Connect, name: &str) -> Result<PathBuf, DriverError> {
    ops::refuse_existing(conn, name)?;
    let overlay = overlay_path(s, name);
    if overlay.exists() {
        // Not ours to replace: whatever wrote it may still want it.
        return Err(DriverError::Failed(format!("{} exists already", overlay.display())));
    }
    Ok(overlay)
}

fn qemu_img(s: &Shared, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, DriverError> {
    let out = Command::new(&s.cfg.qemu_img)
        .args(args)
        .output()
        .map_err(|e| DriverError::Failed(format!("running {}: {e}", s.cfg.qemu_img.display())))?;
    if !out.status.success() {
        let what = args.first().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default();
        return Err(DriverError::Failed(format!("qemu-img {what}: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(out.stdout)
}

/// Rebase the copied overlay onto this node's template (first: the source's backing path
/// need not exist here, and the snapshot commands open the backing file), then apply its
/// `clean` snapshot if it has one and delete every internal snapshot.
fn prepare_overlay(s: &Shared, tpl: &TemplateFiles, overlay: &Path) -> Result<(), DriverError> {
    let backing =
        std::fs::canonicalize(&tpl.disk).map_err(|e| DriverError::Failed(format!("template disk {}: {e}", tpl.disk.display())))?;
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    qemu_img(s, &[os("rebase"), os("-q"), os("-u"), os("-F"), os(tpl.format), os("-b"), backing.as_os_str(), overlay.as_os_str()])?;
    let info = qemu_img(s, &[os("info"), os("--output=json"), overlay.as_os_str()])?;
    let info: serde_json::Value =
        serde_json::from_slice(&info).map_err(|e| DriverError::Failed(format!("qemu-img info of {}: {e}", overlay.display())))?;
    if info["format"] != "qcow2" {
        return Err(DriverError::Failed(format!("{} is not a qcow2 overlay", overlay.display())));
    }
    let names: Vec<String> =
        info["snapshots"].as_array().into_iter().flatten().map(|sn| sn["name"].as_str().unwrap_or_default().to_string()).collect();
    if names.iter().any(|name| name == CLEAN_SNAPSHOT) {
        qemu_img(s, &[os("snapshot"), os("-q"), os("-a"), os(CLEAN_SNAPSHOT), overlay.as_os_str()])?;
    }
    // By name (qemu-img finds snapshots by name only); a name held twice is deleted twice.
    for name in &names {
        qemu_img(s, &[os("snapshot"), os("-q"), os("-d"), std::ffi::OsStr::new(name), overlay.as_os_str()])?;
    }
    Ok(())
}

/// A template's disk and ready line, for a node that lacks it. Only what
/// `install_exported_template` can rebuild from a disk alone: a qcow2 disk that boots by
/// itself. A template that boots a kernel directly is refused (its kernel, initrd and command
/// line do not travel with the disk), and so is a raw disk (templates are installed as qcow2).
pub(super) fn export_template(s: &Shared, name: &str) -> Result<ExportedTemplate, DriverError> {
    let tpl = match TemplateFiles::locate(&s.cfg.templates_dir, name) {
        Ok(t) => t,
        Err(DomainXmlError::NoTemplate { .. }) => return Err(missing_template(name)),
        Err(e) => return Err(DriverError::Failed(e.to_string())),
    };
    if tpl.kernel.is_some() || tpl.initrd.is_some() {
        return Err(DriverError::Unsupported(format!(
            "exporting template {name}, which boots a kernel directly (only its disk would travel)"
        )));
    }
    if tpl.format != "qcow2" {
        return Err(DriverError::Unsupported(format!(
            "exporting template {name}, whose disk is {} (templates install as qcow2)",
            tpl.format
        )));
    }
    Ok(ExportedTemplate { name: name.to_string(), disk: DiskRef::File { path: tpl.disk }, ready: tpl.ready })
}
