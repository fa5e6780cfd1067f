//! Fixed addresses for VMs, served by dnsmasq. Each VM gets the lowest free IPv4 address of a
//! configured range and a MAC derived from it (`52:54:00:` + the IP's last three octets), tied
//! to its domain name until it is released. The hosts file is the record: it is rewritten
//! whole and atomically (temp file + rename) on every change, and re-read on start, so a
//! restarted driver keeps every address. After a change dnsmasq gets SIGHUP to reload it.
//!
//! dnsmasq facts this relies on (checked against dnsmasq 2.90 by the tests below): the
//! `--dhcp-hostsfile` format is the `dhcp-host=` option's value without the `dhcp-host=` key
//! (`<mac>,<name>,<ip>,<lease>`; the key is a "bad hex constant" there), and a dhcp-host name
//! only resolves in DNS while it holds a lease, so names are also written to an
//! `--addn-hosts` file (`<ip> <name>`), which SIGHUP reloads too.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("no free address left in {start}-{end}")]
    Exhausted { start: Ipv4Addr, end: Ipv4Addr },
    #[error("name {0:?} cannot go into a dnsmasq hosts file")]
    BadName(String),
    #[error("bad line {line} in {path}: {reason}")]
    BadRecord { path: PathBuf, line: usize, reason: String },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("could not reload dnsmasq: {0}")]
    Reload(String),
}

fn default_lease() -> String {
    "infinite".into()
}

/// Where addresses come from and where dnsmasq reads them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressConfig {
    /// First address handed out (e.g. 10.77.0.10).
    pub range_start: Ipv4Addr,
    /// Last address handed out, inclusive (e.g. 10.77.0.250).
    pub range_end: Ipv4Addr,
    /// dnsmasq's `--dhcp-hostsfile`.
    pub hosts_file: PathBuf,
    /// dnsmasq's `--addn-hosts`: what makes the names resolve in DNS before a DHCP lease.
    #[serde(default)]
    pub addn_hosts_file: Option<PathBuf>,
    /// dnsmasq's `--pid-file`; without it nobody is told to reload.
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// DHCP lease time written on every line ("infinite", "12h", …).
    #[serde(default = "default_lease")]
    pub lease: String,
}

/// A VM's fixed address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub mac: String,
    pub ip: Ipv4Addr,
}

/// The MAC a VM with this IP gets: QEMU's prefix and the IP's last three octets.
pub fn mac_for(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3])
}

/// The allocations, backed by the hosts file. Cheap to share behind an `Arc`; every method
/// does a little blocking file I/O, so async callers run it in `spawn_blocking`.
pub struct AddressBook {
    cfg: AddressConfig,
    by_name: Mutex<BTreeMap<String, Address>>,
}

impl AddressBook {
    /// Load the allocations recorded in the hosts file (a missing file is an empty book).
    pub fn open(cfg: AddressConfig) -> Result<Self, AddressError> {
        let by_name = match std::fs::read_to_string(&cfg.hosts_file) {
            Ok(text) => parse_hosts(&cfg.hosts_file, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(AddressError::Io { what: "reading", path: cfg.hosts_file.clone(), source }),
        };
        Ok(Self { cfg, by_name: Mutex::new(by_name) })
    }

    pub fn config(&self) -> &AddressConfig {
        &self.cfg
    }

    pub fn get(&self, name: &str) -> Option<Address> {
        self.by_name.lock().get(name).cloned()
    }

    /// The VM's address: the one it already has, else the lowest free one, recorded and
    /// announced to dnsmasq before this returns.
    pub fn allocate(&self, name: &str) -> Result<Address, AddressError> {
        if name.is_empty() || name.contains([',', '#', '=']) || name.contains(char::is_whitespace) {
            return Err(AddressError::BadName(name.into()));
        }
        let mut map = self.by_name.lock();
        if let Some(a) = map.get(name) {
            return Ok(a.clone());
        }
        let used: std::collections::HashSet<Ipv4Addr> = map.values().map(|a| a.ip).collect();
        let (start, end) = (u32::from(self.cfg.range_start), u32::from(self.cfg.range_end));
        let ip = (start..=end)
            .map(Ipv4Addr::from)
            .find(|ip| !used.contains(ip))
            .ok_or(AddressError::Exhausted { start: self.cfg.range_start, end: self.cfg.range_end })?;
        let addr = Address { mac: mac_for(ip), ip };
        map.insert(name.to_string(), addr.clone());
        if let Err(e) = self.write(&map) {
            map.remove(name);
            return Err(e);
        }
        drop(map);
        self.reload_or_warn();
        Ok(addr)
    }

    /// Forget the VM's address. Returns whether it had one.
    pub fn release(&self, name: &str) -> Result<bool, AddressError> {
        let mut map = self.by_name.lock();
        let Some(old) = map.remove(name) else { return Ok(false) };
        if let Err(e) = self.write(&map) {
            map.insert(name.to_string(), old);
            return Err(e);
        }
        drop(map);
        self.reload_or_warn();
        Ok(true)
    }

    /// SIGHUP to the dnsmasq in the pid file: it re-reads the hosts files.
    pub fn reload(&self) -> Result<(), AddressError> {
        let Some(pid_file) = &self.cfg.pid_file else { return Ok(()) };
        let text = std::fs::read_to_string(pid_file).map_err(|e| AddressError::Reload(format!("reading {}: {e}", pid_file.display())))?;
        let pid: libc::pid_t = text.trim().parse().map_err(|_| AddressError::Reload(format!("{} holds no pid", pid_file.display())))?;
        if pid <= 1 {
            return Err(AddressError::Reload(format!("refusing to signal pid {pid}")));
        }
        // SAFETY: kill(2) with a positive pid and a valid signal number has no memory effects.
        if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
            return Err(AddressError::Reload(format!("kill -HUP {pid}: {}", std::io::Error::last_os_error())));
        }
        Ok(())
    }

    // The record is already written when this runs; dnsmasq picks it up at its next reload.
    fn reload_or_warn(&self) {
        if let Err(e) = self.reload() {
            tracing::warn!(error = %e, "dnsmasq not reloaded");
        }
    }

    fn write(&self, map: &BTreeMap<String, Address>) -> Result<(), AddressError> {
        let mut hosts = String::from("# written by guaca-hive; one fixed address per VM\n");
        let mut addn = hosts.clone();
        for (name, a) in map {
            hosts.push_str(&format!("{},{name},{},{}\n", a.mac, a.ip, self.cfg.lease));
            addn.push_str(&format!("{} {name}\n", a.ip));
        }
        write_atomic(&self.cfg.hosts_file, &hosts)?;
        if let Some(p) = &self.cfg.addn_hosts_file {
            write_atomic(p, &addn)?;
        }
        Ok(())
    }
}

fn parse_hosts(path: &Path, text: &str) -> Result<BTreeMap<String, Address>, AddressError> {
    let mut map = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: &str| AddressError::BadRecord { path: path.into(), line: i + 1, reason: reason.into() };
        // Accept the conf-file spelling too, as written by hand or by older tools.
        let line = line.strip_prefix("dhcp-host=").unwrap_or(line);
        let fields: Vec<&str> = line.split(',').collect();
        let [mac, name, ip, ..] = fields[..] else { return Err(bad("expected <mac>,<name>,<ip>[,<lease>]")) };
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad("bad IPv4 address"))?;
        map.insert(name.to_string(), Address { mac: mac.to_ascii_lowercase(), ip });
    }
    Ok(map)
}

/// Replace `path` with `text` so a reader sees the old file or the new one, never a torn one.
/// The file is world-readable: dnsmasq reads it after dropping root.
pub fn write_atomic(path: &Path, text: &str) -> Result<(), AddressError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |what, source| AddressError::Io { what, path: path.into(), source };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(|e| io("creating a temp file for", e))?;
    f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| io("writing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming a temp file onto", e))
}

#[cfg(test)]
#[path = "addresses_tests.rs"]
mod tests;
