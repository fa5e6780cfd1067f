//! The network the guests of `libvirt_net` live on, made by the test and removed after it: a
//! Linux bridge of its own (a unique name, a free 10.77.x.0/24, nothing else on this host is
//! touched), a real dnsmasq serving static DHCP on that bridge only (DNS off), whose hosts
//! files are the ones the node's `--dnsmasq-*` flags point at, and a `hive` with one
//! `hive node --driver libvirt --network bridge:<br>` whose command channel is SSH with the
//! `tiny-net` template's test key and pinned host key. Dropping a `NetNode` stops the agent,
//! removes every domain the test saw, stops dnsmasq and deletes the bridge.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use guaca_hive::guest::CommandChannel;
use guaca_hive::guest::ssh::{HostKeyPolicy, SshChannel, SshConfig};

use crate::agents::{Hive, Proc, join_token, start_hive};
use crate::libvirt_e2e::{script, virsh};
use crate::support::hive_bin;
use serde_json::Value;

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip").args(args).output().expect("the ip command (iproute2)")
}

/// A bridge with a /24 of its own and the dnsmasq serving it.
pub struct Lab {
    dnsmasq: Child,
    pub bridge: String,
    /// The first three octets, e.g. "10.77.3".
    pub net: String,
    /// dnsmasq's files; world-readable, since dnsmasq re-reads them as `nobody`.
    pub dir: tempfile::TempDir,
}

impl Lab {
    pub fn start() -> Lab {
        for tool in ["dnsmasq", "ip"] {
            assert!(Command::new("which").arg(tool).output().is_ok_and(|o| o.status.success()), "{tool} missing; run scripts/test-deps.sh");
        }
        let used = String::from_utf8_lossy(&ip(&["-o", "-4", "addr"]).stdout).to_string();
        let net = (0..=255).map(|k| format!("10.77.{k}")).find(|n| !used.contains(&format!(" {n}."))).expect("a free 10.77.x.0/24");
        let bridge = format!("hvn{}", std::process::id() % 1_000_000);
        let _ = ip(&["link", "del", &bridge]); // a leftover of a killed run with this pid
        for args in [
            vec!["link", "add", &bridge, "type", "bridge"],
            vec!["addr", "add", &format!("{net}.1/24"), "dev", &bridge],
            vec!["link", "set", &bridge, "up"],
        ] {
            let out = ip(&args);
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        for f in ["hosts", "addn-hosts"] {
            std::fs::write(dir.path().join(f), "").expect("an empty hosts file");
        }
        let p = |f: &str| dir.path().join(f).display().to_string();
        let dnsmasq = Command::new("dnsmasq")
            .args(["-C", "/dev/null", "--keep-in-foreground", "--bind-interfaces", "--except-interface=lo", "--port=0"])
            .arg(format!("--interface={bridge}"))
            .arg(format!("--dhcp-range={net}.0,static,255.255.255.0"))
            .arg("--dhcp-authoritative")
            .arg(format!("--dhcp-hostsfile={}", p("hosts")))
            .arg(format!("--addn-hosts={}", p("addn-hosts")))
            .arg(format!("--dhcp-leasefile={}", p("leases")))
            .arg(format!("--pid-file={}", p("dnsmasq.pid")))
            .arg("--log-dhcp")
            .arg(format!("--log-facility={}", p("dnsmasq.log")))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("dnsmasq (scripts/test-deps.sh installs it)");
        let lab = Lab { dnsmasq, bridge, net, dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(lab.path("dnsmasq.pid")).is_ok_and(|p| p.trim().parse::<u32>().is_ok()) {
            assert!(std::time::Instant::now() < deadline, "dnsmasq wrote no pid file; its log:\n{}", lab.log());
            std::thread::sleep(Duration::from_millis(20)); // poll interval, bounded by the deadline
        }
        lab
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    pub fn range(&self) -> String {
        format!("{0}.10-{0}.250", self.net)
    }

    /// The fixed address the node wrote for `domain`: (mac, ip).
    pub fn fixed(&self, domain: &str) -> Option<(String, String)> {
        let hosts = std::fs::read_to_string(self.path("hosts")).unwrap_or_default();
        hosts.lines().map(|l| l.split(',').collect::<Vec<_>>()).find(|f| f.len() >= 3 && f[1] == domain).map(|f| (f[0].into(), f[2].into()))
    }

    pub fn leases(&self) -> String {
        std::fs::read_to_string(self.path("leases")).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("dnsmasq.log")).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.dnsmasq.kill();
        let _ = self.dnsmasq.wait();
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// Removes the domains a test saw, whether it passed or not.
pub struct Domains {
    uri: String,
    names: parking_lot::Mutex<Vec<String>>,
}

impl Domains {
    pub fn saw(&self, name: &str) {
        self.names.lock().push(name.to_string());
    }
}

impl Drop for Domains {
    fn drop(&mut self) {
        for name in self.names.lock().iter() {
            let _ = virsh(&self.uri, &["destroy", name]);
            let _ = virsh(&self.uri, &["undefine", name, "--snapshots-metadata"]);
        }
    }
}

/// The `tiny-net` template's test key and its host key's fingerprint.
pub struct GuestKeys {
    pub private_key: PathBuf,
    pub fingerprint: String,
}

impl GuestKeys {
    pub fn channel(&self, fingerprint: &str) -> Arc<dyn CommandChannel> {
        let cfg = SshConfig {
            private_key: self.private_key.clone(),
            host_key: HostKeyPolicy::Fingerprint(fingerprint.into()),
            connect_timeout_ms: 5_000,
            ..SshConfig::default()
        };
        Arc::new(SshChannel::new(cfg).expect("an SSH channel with the test key"))
    }
}

/// A hive and one libvirt node on a `Lab`. Fields drop in order: the agent first, the lab last.
pub struct NetNode {
    _agent: Proc,
    pub domains: Domains,
    pub hive: Hive,
    pub lab: Lab,
    pub keys: GuestKeys,
    pub uri: String,
    pub vm_dir: PathBuf,
    pub c: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl NetNode {
    /// `pool` VMs of `tiny-net` in the default pool; `prepare` is the node's --prepare-command.
    pub async fn start(pool: u32, prepare: Option<&str>) -> NetNode {
        let uri = script("libvirt-up.sh");
        let templates = PathBuf::from(script("build-test-guest.sh"));
        let accel = script("accel.sh");
        let tpl = templates.join("tiny-net");
        let fingerprint =
            std::fs::read_to_string(tpl.join("host_key_fingerprint")).expect("tiny-net/host_key_fingerprint").trim().to_string();
        let keys = GuestKeys { private_key: tpl.join("guest_ed25519"), fingerprint };
        let lab = Lab::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let vm_dir = dir.path().join("vms");
        let env = [
            ("HIVE_VM__TEMPLATE", "tiny-net".to_string()),
            ("HIVE_VM__CORES", "1".to_string()),
            ("HIVE_VM__RAM_MB", "256".to_string()),
            ("HIVE_VM__DISK_MB", "64".to_string()),
            ("HIVE_POOL__DEFAULT_SIZE__MIN", pool.to_string()),
            ("HIVE_POOL__DEFAULT_SIZE__MAX", pool.to_string()),
        ];
        let hive = start_hive(&dir.path().join("hive"), "127.0.0.1:0", &env);
        let c = reqwest::Client::new();
        let jt = join_token(&c, &hive).await;
        let mut cmd = Command::new(hive_bin());
        cmd.args(["node", "--hive", &hive.base, "--driver", "libvirt", "--libvirt-uri", &uri, "--accel", &accel])
            .args(["--cores", "2", "--ram-mb", "2048", "--disk-mb", "10000", "--name", "net-node"])
            .arg("--templates-dir")
            .arg(&templates)
            .arg("--vm-dir")
            .arg(&vm_dir)
            .arg("--data-dir")
            .arg(dir.path().join("node"))
            .arg(format!("--network=bridge:{}", lab.bridge))
            .arg(format!("--dnsmasq-range={}", lab.range()))
            .arg("--dnsmasq-hosts-file")
            .arg(lab.path("hosts"))
            .arg("--dnsmasq-addn-hosts")
            .arg(lab.path("addn-hosts"))
            .arg("--dnsmasq-pid-file")
            .arg(lab.path("dnsmasq.pid"))
            .arg("--ssh-key")
            .arg(&keys.private_key)
            .arg(format!("--ssh-fingerprint={}", keys.fingerprint));
        if let Some(p) = prepare {
            cmd.arg(format!("--prepare-command={p}"));
        }
        let child = cmd
            .env("HIVE_NODE_TOKEN", jt)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the libvirt node");
        let domains = Domains { uri: uri.clone(), names: parking_lot::Mutex::new(Vec::new()) };
        let n = NetNode { _agent: Proc { child }, domains, hive, lab, keys, uri, vm_dir, c, _dir: dir };
        // Nothing can be placed before the node has joined and been reconciled.
        n.until("the libvirt node is ready", Duration::from_secs(60), || async {
            let nodes: Value = n.c.get(format!("{}/api/v1/nodes", n.hive.base)).send().await.ok()?.json().await.ok()?;
            nodes.as_array()?.iter().any(|x| x["state"] == "ready").then_some(())
        })
        .await;
        n
    }

    /// What to show when a guest does not come up: its serial console and dnsmasq's log.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(&self.vm_dir).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default() {
            let p = e.path();
            if p.to_string_lossy().ends_with(".console.log") {
                out += &format!("--- {}:\n{}\n", p.display(), String::from_utf8_lossy(&std::fs::read(&p).unwrap_or_default()));
            }
        }
        out + &format!("--- dnsmasq:\n{}", self.lab.log())
    }

    /// Poll `f` until it answers, at most `within`; on time-out fail with the diagnostics.
    pub async fn until<T, F, Fut>(&self, what: &str, within: Duration, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}\n{}", self.diagnostics());
            tokio::time::sleep(Duration::from_millis(100)).await; // poll interval, bounded by the deadline
        }
    }

    /// Whether libvirt still has `domain`, running or not.
    pub fn defined(&self, domain: &str) -> bool {
        String::from_utf8_lossy(&virsh(&self.uri, &["list", "--all", "--name"]).stdout).lines().any(|l| l.trim() == domain)
    }
}
