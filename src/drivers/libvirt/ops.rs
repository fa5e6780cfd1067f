//! The blocking half of the libvirt driver: each function here makes libvirt or qemu-img
//! calls and is only ever run from `spawn_blocking`. Domains without the hive's metadata mark
//! are treated as absent, so nothing here touches a VM the hive did not define.

use std::path::{Path, PathBuf};
use std::process::Command;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::domain_snapshot::DomainSnapshot;
use virt::error::{Error as VirtError, ErrorNumber};
use virt::sys;

use super::Shared;
use crate::drivers::domain_xml::{self, DomainParams, DomainType, HIVE_NS, TemplateFiles, VncInfo};
use crate::drivers::{DriverError, VmSpec};

pub(super) fn connect(uri: &str) -> Result<Connect, String> {
    Connect::open(Some(uri)).map_err(|e| e.message().to_string())
}

/// A reference on the shared connection, given back when dropped (`Connect` has no `Drop`).
pub(super) struct Conn(Connect);

impl std::ops::Deref for Conn {
    type Target = Connect;
    fn deref(&self) -> &Connect {
        &self.0
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.0.close();
    }
}

/// The shared connection, reopened first if libvirtd went away since the last call.
pub(super) fn conn(s: &Shared) -> Result<Conn, DriverError> {
    let mut guard = s.conn.lock();
    if !guard.is_alive().unwrap_or(false) {
        tracing::warn!(uri = %s.cfg.uri, "libvirt connection lost; reconnecting");
        let fresh = connect(&s.cfg.uri).map_err(DriverError::Failed)?;
        let _ = std::mem::replace(&mut *guard, fresh).close();
    }
    Ok(Conn(guard.clone()))
}

pub(super) fn failed(e: VirtError) -> DriverError {
    DriverError::Failed(e.message().to_string())
}

/// NotFound for a missing domain or snapshot (`what` names it), Failed otherwise.
fn map_err(e: VirtError, what: &str) -> DriverError {
    match e.code() {
        ErrorNumber::NoDomain | ErrorNumber::NoDomainSnapshot => DriverError::NotFound(what.to_string()),
        _ => failed(e),
    }
}

/// VM names become file names in `vm_dir`: one plain path component only.
pub(super) fn check_name(name: &str) -> Result<(), DriverError> {
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']) {
        return Err(DriverError::Failed(format!("bad VM name {name:?}")));
    }
    Ok(())
}

fn is_hive(dom: &Domain) -> Result<bool, VirtError> {
    match dom.get_metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(HIVE_NS), 0) {
        Ok(_) => Ok(true),
        Err(e) if e.code() == ErrorNumber::NoDomainMetadata => Ok(false),
        Err(e) => Err(e),
    }
}

/// One of the hive's domains by name; anyone else's is NotFound.
pub(super) fn lookup(conn: &Connect, name: &str) -> Result<Domain, DriverError> {
    check_name(name)?;
    let dom = Domain::lookup_by_name(conn, name).map_err(|e| map_err(e, name))?;
    if !is_hive(&dom).map_err(|e| map_err(e, name))? {
        return Err(DriverError::NotFound(name.to_string()));
    }
    Ok(dom)
}

pub(super) fn with_domain<T>(s: &Shared, name: &str, f: impl FnOnce(&Domain) -> Result<T, VirtError>) -> Result<T, DriverError> {
    let conn = conn(s)?;
    let dom = lookup(&conn, name)?;
    f(&dom).map_err(|e| map_err(e, name))
}

pub(super) fn with_snapshot<T>(
    s: &Shared,
    domain: &str,
    snapshot: &str,
    f: impl FnOnce(&DomainSnapshot) -> Result<T, VirtError>,
) -> Result<T, DriverError> {
    let what = format!("snapshot {snapshot} of {domain}");
    let conn = conn(s)?;
    let dom = lookup(&conn, domain)?;
    let snap = DomainSnapshot::lookup_by_name(&dom, snapshot, 0).map_err(|e| map_err(e, &what))?;
    f(&snap).map_err(|e| map_err(e, &what))
}

pub(super) fn overlay_path(s: &Shared, name: &str) -> PathBuf {
    s.cfg.vm_dir.join(format!("{name}.qcow2"))
}

pub(super) fn serial_path(s: &Shared, name: &str) -> PathBuf {
    s.cfg.vm_dir.join(format!("{name}.serial"))
}

/// The serial console's log, written by QEMU whether or not a client is connected.
pub(super) fn console_log_path(s: &Shared, name: &str) -> PathBuf {
    s.cfg.vm_dir.join(format!("{name}.console.log"))
}

/// The template's ready line, kept beside the overlay so it outlives a driver restart.
pub(super) fn ready_path(s: &Shared, name: &str) -> PathBuf {
    s.cfg.vm_dir.join(format!("{name}.ready"))
}

pub(super) fn qemu_img_overlay(s: &Shared, tpl: &TemplateFiles, overlay: &Path) -> Result<(), DriverError> {
    // The backing path is stored in the overlay: it must not depend on our working directory.
    let backing =
        std::fs::canonicalize(&tpl.disk).map_err(|e| DriverError::Failed(format!("template disk {}: {e}", tpl.disk.display())))?;
    let out = Command::new(&s.cfg.qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", tpl.format, "-b"])
        .arg(&backing)
        .arg(overlay)
        .output()
        .map_err(|e| DriverError::Failed(format!("running {}: {e}", s.cfg.qemu_img.display())))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(overlay);
        return Err(DriverError::Failed(format!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}

pub(super) fn create(s: &Shared, spec: &VmSpec) -> Result<String, DriverError> {
    check_name(&spec.name)?;
    let tpl = TemplateFiles::locate(&s.cfg.templates_dir, &spec.template).map_err(|e| DriverError::Failed(e.to_string()))?;
    let conn = conn(s)?;
    refuse_existing(&conn, &spec.name)?;
    let overlay = overlay_path(s, &spec.name);
    let started = std::time::Instant::now();
    qemu_img_overlay(s, &tpl, &overlay)?;
    define_or_clean_up(s, &conn, spec, &tpl, &overlay)?;
    tracing::info!(vm = %spec.name, template = %spec.template, duration_ms = started.elapsed().as_millis() as u64, "linked clone defined");
    Ok(spec.name.clone())
}

/// Libvirt's domain names are the host's: a name any domain holds (ours, another agent's,
/// anyone's) is refused.
pub(super) fn refuse_existing(conn: &Connect, name: &str) -> Result<(), DriverError> {
    match Domain::lookup_by_name(conn, name) {
        Ok(_) => Err(DriverError::Failed(format!("domain {name} already exists"))),
        Err(e) if e.code() == ErrorNumber::NoDomain => Ok(()),
        Err(e) => Err(failed(e)),
    }
}

/// Define the domain on `overlay` (already in place) and write its ready line. On failure
/// nothing outlives it: not the overlay, not the definition, not the address.
pub(super) fn define_or_clean_up(
    s: &Shared,
    conn: &Connect,
    spec: &VmSpec,
    tpl: &TemplateFiles,
    overlay: &Path,
) -> Result<(), DriverError> {
    let defined = define(s, conn, spec, tpl, overlay).and_then(|()| match &tpl.ready {
        Some(line) => {
            std::fs::write(ready_path(s, &spec.name), line).map_err(|e| DriverError::Failed(format!("writing the ready line: {e}")))
        }
        None => Ok(()),
    });
    if defined.is_err() {
        let _ = std::fs::remove_file(overlay);
        let _ = std::fs::remove_file(ready_path(s, &spec.name));
        if let Ok(dom) = Domain::lookup_by_name(conn, &spec.name) {
            let _ = dom.undefine();
        }
        if let Some(book) = &s.addresses {
            let _ = book.release(&spec.name);
        }
    }
    defined
}

/// VNC displays get the first fixed port from here on that no domain's definition holds and
/// nothing listens on. Fixed, because reverting to a live snapshot restarts QEMU, and with
/// autoport the display could come back on another port than the one the pool handed out.
const VNC_PORTS: u16 = 2000;

pub(super) fn free_vnc_port(s: &Shared, conn: &Connect) -> Result<u16, DriverError> {
    let mut used = std::collections::HashSet::new();
    for d in conn.list_all_domains(0).map_err(failed)? {
        if let Ok(Some(v)) = d.get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE).map(|x| domain_xml::parse_vnc(&x).ok().flatten()) {
            used.extend(v.port);
        }
    }
    let first = s.cfg.vnc_first_port;
    (first..first.saturating_add(VNC_PORTS))
        .find(|p| !used.contains(p) && std::net::TcpListener::bind((s.cfg.vnc_listen.as_str(), *p)).is_ok())
        .ok_or_else(|| DriverError::Failed(format!("no free VNC port in {first}..{}", first.saturating_add(VNC_PORTS))))
}

fn define(s: &Shared, conn: &Connect, spec: &VmSpec, tpl: &TemplateFiles, overlay: &Path) -> Result<(), DriverError> {
    let _one_at_a_time = s.vnc_ports.lock();
    let vnc_port = if s.kind == DomainType::Test { None } else { Some(free_vnc_port(s, conn)?) };
    let mac = match &s.addresses {
        Some(book) => Some(book.allocate(&spec.name).map_err(|e| DriverError::Failed(e.to_string()))?.mac),
        None => None,
    };
    let params = DomainParams {
        name: spec.name.clone(),
        template: spec.template.clone(),
        kind: s.kind,
        memory_mib: spec.ram_mb.max(16),
        vcpus: spec.cores.max(1),
        emulator: s.cfg.emulator.clone(),
        machine: s.cfg.machine.clone(),
        overlay: overlay.to_path_buf(),
        kernel: tpl.kernel.clone(),
        initrd: tpl.initrd.clone(),
        cmdline: tpl.cmdline.clone(),
        serial_socket: serial_path(s, &spec.name),
        console_log: console_log_path(s, &spec.name),
        vnc_listen: s.cfg.vnc_listen.clone(),
        vnc_port,
        vnc_password: domain_xml::random_vnc_password(),
        network: s.cfg.network.clone(),
        mac,
    };
    Domain::define_xml(conn, &params.to_xml()).map(drop).map_err(failed)
}

pub(super) fn start(s: &Shared, name: &str) -> Result<(), DriverError> {
    with_domain(s, name, |d| if d.is_active()? { Ok(()) } else { d.create().map(drop) })
}

/// A hard stop: the definition, disk and snapshots stay.
pub(super) fn stop(s: &Shared, name: &str) -> Result<(), DriverError> {
    with_domain(s, name, |d| if d.is_active()? { d.destroy() } else { Ok(()) })
}

pub(super) fn is_running(s: &Shared, name: &str) -> Result<bool, DriverError> {
    with_domain(s, name, |d| d.get_state().map(|(state, _)| state == sys::VIR_DOMAIN_RUNNING))
}

/// An internal snapshot, with RAM when the domain is active, so revert resumes it live.
pub(super) fn snapshot(s: &Shared, name: &str, snapshot: &str) -> Result<(), DriverError> {
    with_domain(s, name, |d| {
        let xml = domain_xml::snapshot_xml(snapshot, d.is_active()?);
        DomainSnapshot::create_xml(d, &xml, 0).map(drop)
    })
}

/// Stop, undefine with snapshot metadata, delete the overlay and socket, free the address.
/// A domain that is not there (or not the hive's) leaves only the files to clean.
pub(super) fn destroy(s: &Shared, name: &str) -> Result<(), DriverError> {
    check_name(name)?;
    let conn = conn(s)?;
    match lookup(&conn, name) {
        Ok(dom) => {
            let undefine = || -> Result<(), VirtError> {
                if dom.is_active()? {
                    // It may have stopped on its own in between: only a still-active one fails.
                    if let Err(e) = dom.destroy() {
                        if dom.is_active()? {
                            return Err(e);
                        }
                    }
                }
                let inactive = dom.get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)?;
                let mut flags = sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE;
                // Only ask for NVRAM removal when there is one: not every driver knows the flag.
                if inactive.contains("<nvram") {
                    flags |= sys::VIR_DOMAIN_UNDEFINE_NVRAM;
                }
                dom.undefine_flags(flags)
            };
            match undefine() {
                Ok(()) => {}
                Err(e) if e.code() == ErrorNumber::NoDomain => {}
                Err(e) => return Err(failed(e)),
            }
        }
        Err(DriverError::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    for path in [overlay_path(s, name), serial_path(s, name), console_log_path(s, name), ready_path(s, name)] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DriverError::Failed(format!("removing {}: {e}", path.display()))),
        }
    }
    if let Some(book) = &s.addresses {
        book.release(name).map_err(|e| DriverError::Failed(e.to_string()))?;
    }
    Ok(())
}

/// The VNC display from the live XML, read with the secure flag so the password is in it.
pub(super) fn vnc(s: &Shared, name: &str) -> Result<VncInfo, DriverError> {
    let xml = with_domain(s, name, |d| d.get_xml_desc(sys::VIR_DOMAIN_XML_SECURE))?;
    domain_xml::parse_vnc(&xml)
        .map_err(|e| DriverError::Failed(e.to_string()))?
        .ok_or_else(|| DriverError::Failed(format!("{name} has no VNC display")))
}

pub(super) fn list(s: &Shared) -> Result<Vec<String>, DriverError> {
    let conn = conn(s)?;
    let mut names = Vec::new();
    for dom in conn.list_all_domains(0).map_err(failed)? {
        match is_hive(&dom) {
            // Only the domains on an overlay in our vm_dir: another agent on the same libvirtd
            // keeps its own, and nothing here may report (so the hive reconcile) those.
            Ok(true) => {
                let name = dom.get_name().map_err(failed)?;
                if check_name(&name).is_ok() && overlay_path(s, &name).exists() {
                    names.push(name);
                }
            }
            Ok(false) => {}
            // Undefined while we looked: not there any more.
            Err(e) if e.code() == ErrorNumber::NoDomain => {}
            Err(e) => return Err(failed(e)),
        }
    }
    names.sort();
    Ok(names)
}
