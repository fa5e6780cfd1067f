//! The pure half of the libvirt driver, built without libvirt so its tests always run: the
//! template layout on disk, the domain and snapshot XML the driver defines, reading the VNC
//! port and password back from a domain's live XML, and the guest prepare command.
//!
//! Template layout: `<templates_dir>/<template>/disk.qcow2` (or `disk.raw`), and optionally
//! `kernel`, `initrd` and `cmdline` for direct kernel boot of guests without a bootloader.
//! Every VM is marked with a `<hive:vm>` metadata element in [`HIVE_NS`], so the driver can
//! tell its domains from anyone else's on a shared host.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::PrepareSpec;

/// The namespace of the metadata element that marks a domain as the hive's.
pub const HIVE_NS: &str = "https://guaca-hive.dev/ns/vm/1";

#[derive(Debug, thiserror::Error)]
pub enum DomainXmlError {
    #[error("no template {name:?}: expected {dir}/disk.qcow2 or disk.raw")]
    NoTemplate { name: String, dir: PathBuf },
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("domain XML does not parse: {0}")]
    Parse(String),
    #[error("bad network {0:?}: use none, user or bridge:<name>")]
    BadNetwork(String),
    #[error("template {0:?} exists already; VMs may depend on its disk, so it is never replaced")]
    TemplateExists(String),
    #[error("{0:?} cannot name a template: one path component of letters, digits, '.', '-' or '_', not starting with '.'")]
    BadTemplateName(String),
}

/// libvirt's domain type: what runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainType {
    Kvm,
    /// QEMU's TCG: no hardware acceleration, slow but works everywhere.
    Qemu,
    /// libvirt's built-in test driver (`test:///default`): nothing runs.
    Test,
}

impl DomainType {
    /// `test:` URIs get the test type; otherwise KVM when this host's /dev/kvm opens
    /// read-write, else TCG. (A remote URI would need the remote host's answer; the node
    /// agent always manages its own host.) Some nested hosts open /dev/kvm but cannot run a
    /// guest on it: the driver config's `domain_type` overrides this guess.
    pub fn for_uri(uri: &str) -> Self {
        if uri.starts_with("test:") {
            DomainType::Test
        } else if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok() {
            DomainType::Kvm
        } else {
            DomainType::Qemu
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
            DomainType::Test => "test",
        }
    }
}

/// The VM's NIC, if any.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    #[default]
    None,
    /// QEMU's user-mode network: outbound only, needs no privileges.
    User,
    /// A tap device on this host bridge.
    Bridge(String),
}

impl std::str::FromStr for NetworkMode {
    type Err = DomainXmlError;

    /// `none`, `user` or `bridge:<name>` (the command line's spelling).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(NetworkMode::None),
            "user" => Ok(NetworkMode::User),
            _ => match s.strip_prefix("bridge:") {
                Some(name) if !name.is_empty() => Ok(NetworkMode::Bridge(name.into())),
                _ => Err(DomainXmlError::BadNetwork(s.into())),
            },
        }
    }
}

/// A template's files, found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateFiles {
    pub disk: PathBuf,
    /// "qcow2" or "raw": the backing format of the overlay.
    pub format: &'static str,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    /// The line the guest prints on its serial console once it is up (file `ready`); without
    /// it, a running domain counts as up.
    pub ready: Option<String>,
}

impl TemplateFiles {
    /// Make the qcow2 disk `image` a template `name` under `templates_dir` (blocking). The disk
    /// is hard-linked when it can be (same file system), else copied; the template appears whole
    /// or not at all (built beside it, then renamed into place).
    pub fn install(templates_dir: &Path, name: &str, image: &Path, ready: Option<&str>) -> Result<(), DomainXmlError> {
        let valid = !name.is_empty()
            && name.len() <= 100
            && !name.starts_with('.')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !valid {
            return Err(DomainXmlError::BadTemplateName(name.into()));
        }
        let dir = templates_dir.join(name);
        if dir.exists() {
            return Err(DomainXmlError::TemplateExists(name.into()));
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DomainXmlError::Io { path, source }
        };
        let part = templates_dir.join(format!(".{name}.part-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&part);
        std::fs::create_dir_all(&part).map_err(io(&part))?;
        let built = (|| {
            let disk = part.join("disk.qcow2");
            if std::fs::hard_link(image, &disk).is_err() {
                std::fs::copy(image, &disk).map_err(io(&disk))?;
            }
            if let Some(line) = ready {
                std::fs::write(part.join("ready"), format!("{}\n", line.trim())).map_err(io(&part))?;
            }
            std::fs::rename(&part, &dir).map_err(io(&dir))
        })();
        if built.is_err() {
            let _ = std::fs::remove_dir_all(&part);
        }
        built
    }

    pub fn locate(templates_dir: &Path, name: &str) -> Result<Self, DomainXmlError> {
        let dir = templates_dir.join(name);
        // A template name is one path component: nothing may climb out of templates_dir.
        let simple = !name.is_empty() && !name.starts_with('.') && !name.contains('/');
        let found =
            simple.then(|| [("disk.qcow2", "qcow2"), ("disk.raw", "raw")].into_iter().find(|(f, _)| dir.join(f).is_file())).flatten();
        let Some((file, format)) = found else { return Err(DomainXmlError::NoTemplate { name: name.into(), dir }) };
        let optional = |f: &str| Some(dir.join(f)).filter(|p| p.is_file());
        let text = |f: &str| match optional(f) {
            Some(p) => {
                std::fs::read_to_string(&p).map(|t| Some(t.trim().to_string())).map_err(|source| DomainXmlError::Io { path: p, source })
            }
            None => Ok(None),
        };
        let (cmdline, ready) = (text("cmdline")?, text("ready")?.filter(|r| !r.is_empty()));
        Ok(Self { disk: dir.join(file), format, kernel: optional("kernel"), initrd: optional("initrd"), cmdline, ready })
    }
}

/// Everything a domain definition needs.
#[derive(Clone, Debug)]
pub struct DomainParams {
    pub name: String,
    pub template: String,
    pub kind: DomainType,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// QEMU binary and machine type (ignored by the test driver).
    pub emulator: String,
    pub machine: String,
    pub overlay: PathBuf,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub serial_socket: PathBuf,
    /// Everything the guest writes on its serial console, connected client or not.
    pub console_log: PathBuf,
    pub vnc_listen: String,
    /// A fixed VNC port; libvirt picks one at every start when absent (autoport).
    pub vnc_port: Option<u16>,
    pub vnc_password: String,
    pub network: NetworkMode,
    /// The fixed MAC; libvirt picks one when absent.
    pub mac: Option<String>,
}

/// Escape text for an XML attribute or element.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn path(p: &Path) -> String {
    esc(&p.to_string_lossy())
}

impl DomainParams {
    pub fn to_xml(&self) -> String {
        let qemu = self.kind != DomainType::Test;
        let mut x = format!("<domain type='{}'>\n  <name>{}</name>\n", self.kind.as_str(), esc(&self.name));
        x += &format!(
            "  <metadata>\n    <hive:vm xmlns:hive='{HIVE_NS}'><hive:template>{}</hive:template></hive:vm>\n  </metadata>\n",
            esc(&self.template)
        );
        x += &format!("  <memory unit='MiB'>{}</memory>\n  <vcpu>{}</vcpu>\n  <os>\n", self.memory_mib, self.vcpus.max(1));
        if qemu {
            x += &format!("    <type arch='x86_64' machine='{}'>hvm</type>\n", esc(&self.machine));
        } else {
            x += "    <type arch='x86_64'>hvm</type>\n";
        }
        if let Some(k) = &self.kernel {
            x += &format!("    <kernel>{}</kernel>\n", path(k));
            if let Some(i) = &self.initrd {
                x += &format!("    <initrd>{}</initrd>\n", path(i));
            }
            // The serial console is the one a headless guest is reachable on: ask for it.
            let mut cmdline = self.cmdline.clone().unwrap_or_default();
            if !cmdline.contains("console=") {
                cmdline = format!("{cmdline} console=ttyS0").trim().to_string();
            }
            x += &format!("    <cmdline>{}</cmdline>\n", esc(&cmdline));
        } else {
            x += "    <boot dev='hd'/>\n";
        }
        x += "  </os>\n";
        if qemu {
            x += "  <features><acpi/></features>\n";
            if self.kind == DomainType::Kvm {
                x += "  <cpu mode='host-passthrough'/>\n";
            }
        }
        x += "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n";
        x += "  <devices>\n";
        if qemu {
            x += &format!("    <emulator>{}</emulator>\n", esc(&self.emulator));
        }
        x += &format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='{}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n",
            path(&self.overlay)
        );
        let mac = self.mac.as_ref().map(|m| format!("      <mac address='{}'/>\n", esc(m))).unwrap_or_default();
        match &self.network {
            NetworkMode::None => {}
            NetworkMode::User => x += &format!("    <interface type='user'>\n{mac}      <model type='virtio'/>\n    </interface>\n"),
            NetworkMode::Bridge(br) => {
                x += &format!(
                    "    <interface type='bridge'>\n      <source bridge='{}'/>\n{mac}      <model type='virtio'/>\n    </interface>\n",
                    esc(br)
                )
            }
        }
        let sock = path(&self.serial_socket);
        // Appended: a revert restarts QEMU, and what the guest printed before is still worth reading
        // (virtlogd caps and rotates the file).
        let log = if qemu { format!("      <log file='{}' append='on'/>\n", path(&self.console_log)) } else { String::new() };
        x +=
            &format!("    <serial type='unix'>\n      <source mode='bind' path='{sock}'/>\n{log}      <target port='0'/>\n    </serial>\n");
        x += &format!(
            "    <console type='unix'>\n      <source mode='bind' path='{sock}'/>\n      <target type='serial' port='0'/>\n    </console>\n"
        );
        let listen = esc(&self.vnc_listen);
        let port = match self.vnc_port {
            Some(p) => format!("port='{p}' autoport='no'"),
            None => "autoport='yes'".to_string(),
        };
        x += &format!(
            "    <graphics type='vnc' {port} listen='{listen}' passwd='{}'>\n      <listen type='address' address='{listen}'/>\n    </graphics>\n",
            esc(&self.vnc_password)
        );
        x += "  </devices>\n</domain>\n";
        x
    }
}

/// An internal snapshot of the disk, with RAM when the domain is active (running or paused).
/// Spelled out because newer libvirt defaults to external snapshots, which revert cannot use.
pub fn snapshot_xml(name: &str, with_memory: bool) -> String {
    let memory = if with_memory { "internal" } else { "no" };
    format!(
        "<domainsnapshot>\n  <name>{}</name>\n  <memory snapshot='{memory}'/>\n  <disks><disk name='vda' snapshot='internal'/></disks>\n</domainsnapshot>\n",
        esc(name)
    )
}

/// A fresh VNC password: 8 alphanumerics, the most VNC authentication uses.
pub fn random_vnc_password() -> String {
    use rand::Rng;
    rand::rng().sample_iter(rand::distr::Alphanumeric).take(8).map(char::from).collect()
}

/// The first VNC display of a domain's XML: `port` is `None` until the domain runs (libvirt
/// writes -1 for an autoport display), `password` only appears in XML read with the secure flag.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VncInfo {
    pub port: Option<u16>,
    pub password: Option<String>,
}

pub fn parse_vnc(xml: &str) -> Result<Option<VncInfo>, DomainXmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| DomainXmlError::Parse(e.to_string()))?;
    let graphics = doc.descendants().find(|n| n.has_tag_name("graphics") && n.attribute("type") == Some("vnc"));
    Ok(graphics.map(|g| VncInfo {
        port: g.attribute("port").and_then(|p| p.parse::<i32>().ok()).and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0),
        password: g.attribute("passwd").map(str::to_string),
    }))
}

/// Fill `{home_page}` and `{profile}` in the prepare command, each shell-quoted, in one pass
/// (a value that itself contains a placeholder stays as it is).
pub fn render_prepare(template: &str, spec: &PrepareSpec) -> String {
    let quote = |s: &str| shlex::try_quote(s).map(|c| c.into_owned()).unwrap_or_else(|_| "''".into());
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("{home_page}") {
            out.push_str(&quote(&spec.home_page));
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{profile}") {
            out.push_str(&quote(&spec.profile_name));
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
#[path = "domain_xml_tests.rs"]
mod tests;
