//! Live moves, the blocking half: libvirt's peer-to-peer live migration with the disk copied
//! while the guest runs (`VIR_MIGRATE_NON_SHARED_INC`: only the overlay's own data travels;
//! the taking node has the same template, checked by digest, under a fresh overlay).
//!
//! 1. `live_source` (giving node): the running domain's template, that template's digest and
//!    its migratable definition.
//! 2. `prepare_incoming` (taking node): an empty overlay on its own template, and the
//!    definitions rewritten for this node: disk, kernel and initrd, serial socket and log, VNC
//!    listen address and port. The name stays (libvirt checks it; the taking libvirtd is
//!    another host, so the VM's old domain cannot hold it there). The overlay's backing chain
//!    is left out: libvirt reads it from the overlay here. Two preparations at once may pick
//!    the same free VNC port (it is taken only when the migration defines the domain): the
//!    second migration then fails and its VM stays where it was.
//! 3. `migrate_live` (giving node): its libvirtd connects to the taking node's (`peer_uri`;
//!    libvirt refuses a destination on the same host unless it is `qemu+unix://…?socket=…`),
//!    mirrors the disk and sends the memory, and the domain is defined there and undefined
//!    here. libvirt refuses to migrate a domain that has snapshots, so their metadata is put
//!    aside first (the snapshots themselves stay in the overlay, which stays here) and defined
//!    again if the migration fails. The `clean` snapshot does not travel: the taken VM has
//!    none until its pool makes it anew.

use std::ops::Range;
use std::path::Path;

use virt::domain::{Domain, MigrateParameters};
use virt::domain_snapshot::DomainSnapshot;
use virt::sys;

use super::Shared;
use super::moves::{free_place, same_template, template_and_digest};
use super::ops::{self, check_name, conn, failed, lookup};
use crate::drivers::domain_xml::esc;
use crate::drivers::{DriverError, LiveSource, LiveTarget, VmSpec};

pub(super) fn live_source(s: &Shared, name: &str) -> Result<LiveSource, DriverError> {
    let conn = conn(s)?;
    let dom = lookup(&conn, name)?;
    if !dom.is_active().map_err(failed)? {
        return Err(DriverError::Failed(format!("{name} is not running: a live move needs a running VM")));
    }
    let (template, template_sha256) = template_and_digest(s, &dom, name)?;
    // Secure: the definition keeps its VNC password, so the user's password works there too.
    let flags = sys::VIR_DOMAIN_XML_SECURE | sys::VIR_DOMAIN_XML_MIGRATABLE;
    let xml = dom.get_xml_desc(flags).map_err(failed)?;
    let persistent_xml = dom.get_xml_desc(flags | sys::VIR_DOMAIN_XML_INACTIVE).map_err(failed)?;
    Ok(LiveSource { domain: name.to_string(), template, template_sha256, xml, persistent_xml })
}

pub(super) fn prepare_incoming(s: &Shared, spec: &VmSpec, source: &LiveSource) -> Result<LiveTarget, DriverError> {
    let Some(peer_uri) = s.cfg.peer_uri.clone() else {
        return Err(DriverError::Unsupported(
            "taking running VMs (live): this node names no peer URI for other nodes' libvirtd to reach it".into(),
        ));
    };
    if s.addresses.is_some() {
        return Err(DriverError::Unsupported("live moves of VMs with fixed addresses".into()));
    }
    check_name(&spec.name)?;
    if spec.name != source.domain {
        return Err(DriverError::Failed(format!("a live move keeps the domain's name: {} is not {}", spec.name, source.domain)));
    }
    let tpl = same_template(s, &source.template, &source.template_sha256)?;
    let conn = conn(s)?;
    let overlay = free_place(s, &conn, &spec.name)?;
    ops::qemu_img_overlay(s, &tpl, &overlay)?;
    let xml = {
        // The port is free now; it is taken once the migration defines the domain here.
        let _one_at_a_time = s.vnc_ports.lock();
        ops::free_vnc_port(s, &conn).and_then(|port| {
            let place = Place {
                disk: &overlay,
                kernel: tpl.kernel.as_deref(),
                initrd: tpl.initrd.as_deref(),
                serial: &ops::serial_path(s, &spec.name),
                log: &ops::console_log_path(s, &spec.name),
                vnc_listen: &s.cfg.vnc_listen,
                vnc_port: port,
            };
            Ok((rewrite(&source.xml, &place)?, rewrite(&source.persistent_xml, &place)?))
        })
    };
    match xml {
        Ok((xml, persistent_xml)) => {
            tracing::info!(vm = %spec.name, template = %source.template, "ready to take a running VM");
            Ok(LiveTarget { domain: spec.name.clone(), peer_uri, migrate_uri: s.cfg.migrate_uri.clone(), xml, persistent_xml })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&overlay);
            Err(e)
        }
    }
}

pub(super) fn migrate_live(s: &Shared, name: &str, target: &LiveTarget) -> Result<(), DriverError> {
    let conn = conn(s)?;
    let dom = lookup(&conn, name)?;
    if !dom.is_active().map_err(failed)? {
        return Err(DriverError::Failed(format!("{name} is not running: a live move needs a running VM")));
    }
    let aside = put_snapshots_aside(&dom)?;
    let params = MigrateParameters {
        dest_xml: Some(target.xml.clone()),
        // Without it the taking node would store the source's definition, paths and all.
        persist_xml: Some(target.persistent_xml.clone()),
        uri: target.migrate_uri.clone(),
        ..MigrateParameters::default()
    };
    let flags = sys::VIR_MIGRATE_LIVE
        | sys::VIR_MIGRATE_PEER2PEER
        | sys::VIR_MIGRATE_NON_SHARED_INC
        | sys::VIR_MIGRATE_PERSIST_DEST
        | sys::VIR_MIGRATE_UNDEFINE_SOURCE
        | sys::VIR_MIGRATE_AUTO_CONVERGE;
    let started = std::time::Instant::now();
    if let Err(e) = dom.migrate_to_uri3(Some(&target.peer_uri), params, flags) {
        let error = DriverError::Failed(format!("live migration to {}: {}", target.peer_uri, e.message()));
        if let Err(r) = restore_snapshots(&dom, &aside) {
            tracing::warn!(vm = %name, error = %r, "cannot define the snapshots of a VM that stayed again");
        }
        return Err(error);
    }
    tracing::info!(vm = %name, to = %target.domain, duration_ms = started.elapsed().as_millis() as u64, "live migration done");
    // The domain runs there now and is undefined here: only its files are left.
    ops::destroy(s, name)
}

/// The snapshots' definitions, parents first, and whether each was the current one, after
/// their metadata was removed (the snapshots themselves stay in the disk).
fn put_snapshots_aside(dom: &Domain) -> Result<Vec<(String, bool)>, DriverError> {
    let snaps = dom.list_all_snapshots(sys::VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL).map_err(failed)?;
    let mut aside = Vec::with_capacity(snaps.len());
    for snap in &snaps {
        aside.push((snap.get_xml_desc(sys::VIR_DOMAIN_SNAPSHOT_XML_SECURE).map_err(failed)?, snap.is_current(0).map_err(failed)?));
    }
    for (i, snap) in snaps.iter().enumerate() {
        if let Err(e) = snap.delete(sys::VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY) {
            let _ = restore_snapshots(dom, &aside[..i]);
            return Err(failed(e));
        }
    }
    Ok(aside)
}

fn restore_snapshots(dom: &Domain, aside: &[(String, bool)]) -> Result<(), DriverError> {
    for (xml, current) in aside {
        let mut flags = sys::VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE;
        if *current {
            flags |= sys::VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT;
        }
        DomainSnapshot::create_xml(dom, xml, flags).map_err(failed)?;
    }
    Ok(())
}

/// Where the taken domain lives on this node.
pub(super) struct Place<'a> {
    pub disk: &'a Path,
    pub kernel: Option<&'a Path>,
    pub initrd: Option<&'a Path>,
    pub serial: &'a Path,
    pub log: &'a Path,
    pub vnc_listen: &'a str,
    pub vnc_port: u16,
}

/// The source's definition with this node's paths and VNC display. Refuses a definition
/// not made by this driver's kind (no `vda` disk file, no VNC display): nothing is guessed.
pub(super) fn rewrite(xml: &str, place: &Place) -> Result<String, DriverError> {
    let bad = |what: &str| DriverError::Failed(format!("the source's definition has no {what}"));
    let doc = roxmltree::Document::parse(xml).map_err(|e| DriverError::Failed(format!("the source's definition: {e}")))?;
    let root = doc.root_element();
    let path = |p: &Path| esc(&p.to_string_lossy());
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();

    if let Some(os) = child(root, "os") {
        for (tag, file) in [("kernel", place.kernel), ("initrd", place.initrd)] {
            if let Some(n) = child(os, tag) {
                let text = n.first_child().filter(|t| t.is_text()).ok_or_else(|| bad(tag))?;
                let file = file
                    .ok_or_else(|| DriverError::Failed(format!("the source boots a {tag} directly and this node's template has none")))?;
                edits.push((text.range(), path(file)));
            }
        }
    }
    let devices = child(root, "devices").ok_or_else(|| bad("devices"))?;
    let disk = devices
        .children()
        .filter(|d| d.has_tag_name("disk") && d.attribute("device") == Some("disk"))
        .find(|d| child(*d, "target").and_then(|t| t.attribute("dev")) == Some("vda"))
        .ok_or_else(|| bad("vda disk"))?;
    let source = child(disk, "source").and_then(|s| attr_range(s, "file")).ok_or_else(|| bad("vda disk file"))?;
    edits.push((source, path(place.disk)));
    for backing in disk.children().filter(|c| c.has_tag_name("backingStore")) {
        edits.push((backing.range(), String::new()));
    }
    for dev in devices.children().filter(|d| d.has_tag_name("serial") || d.has_tag_name("console")) {
        if let Some(r) = child(dev, "source").and_then(|s| attr_range(s, "path")) {
            edits.push((r, path(place.serial)));
        }
        if let Some(r) = child(dev, "log").and_then(|l| attr_range(l, "file")) {
            edits.push((r, path(place.log)));
        }
    }
    let vnc =
        devices.children().find(|g| g.has_tag_name("graphics") && g.attribute("type") == Some("vnc")).ok_or_else(|| bad("VNC display"))?;
    edits.push((attr_range(vnc, "port").ok_or_else(|| bad("fixed VNC port"))?, place.vnc_port.to_string()));
    let listen = esc(place.vnc_listen);
    if let Some(r) = attr_range(vnc, "listen") {
        edits.push((r, listen.clone()));
    }
    for l in vnc.children().filter(|l| l.has_tag_name("listen")) {
        if let Some(r) = attr_range(l, "address") {
            edits.push((r, listen.clone()));
        }
    }

    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = xml.to_string();
    for (range, text) in edits {
        out.replace_range(range, &text);
    }
    Ok(out)
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.is_element() && c.has_tag_name(tag))
}

fn attr_range(n: roxmltree::Node<'_, '_>, name: &str) -> Option<Range<usize>> {
    n.attributes().find(|a| a.name() == name).map(|a| a.range_value())
}
