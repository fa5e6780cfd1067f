//! Tests of the address book: allocation rules on files in a tempdir, and a real dnsmasq
//! (started here on a free loopback port) that must resolve a VM's name after a reload and
//! stop resolving it after the release.

use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

fn config(dir: &Path, start: [u8; 4], end: [u8; 4]) -> AddressConfig {
    AddressConfig {
        range_start: Ipv4Addr::from(start),
        range_end: Ipv4Addr::from(end),
        hosts_file: dir.join("hosts"),
        addn_hosts_file: Some(dir.join("addn-hosts")),
        pid_file: None,
        lease: "infinite".into(),
    }
}

#[test]
fn mac_follows_the_ip() {
    assert_eq!(mac_for(Ipv4Addr::new(10, 77, 0, 10)), "52:54:00:4d:00:0a");
    assert_eq!(mac_for(Ipv4Addr::new(192, 168, 255, 250)), "52:54:00:a8:ff:fa");
}

#[test]
fn lowest_free_address_is_handed_out_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let book = AddressBook::open(config(dir.path(), [10, 77, 0, 10], [10, 77, 0, 250])).unwrap();
    let a = book.allocate("p-1").unwrap();
    let b = book.allocate("p-2").unwrap();
    assert_eq!(a.ip, Ipv4Addr::new(10, 77, 0, 10));
    assert_eq!(b.ip, Ipv4Addr::new(10, 77, 0, 11));
    assert_eq!(book.allocate("p-1").unwrap(), a, "a VM keeps its address");
    assert!(book.release("p-1").unwrap());
    assert!(!book.release("p-1").unwrap(), "a second release finds nothing");
    assert_eq!(book.allocate("p-3").unwrap().ip, a.ip, "the freed address is the lowest again");

    let hosts = std::fs::read_to_string(dir.path().join("hosts")).unwrap();
    assert!(hosts.contains("52:54:00:4d:00:0a,p-3,10.77.0.10,infinite\n"), "{hosts}");
    assert!(hosts.contains("52:54:00:4d:00:0b,p-2,10.77.0.11,infinite\n"), "{hosts}");
    assert!(!hosts.contains("p-1"), "{hosts}");
    let addn = std::fs::read_to_string(dir.path().join("addn-hosts")).unwrap();
    assert!(addn.contains("10.77.0.10 p-3\n") && addn.contains("10.77.0.11 p-2\n"), "{addn}");
}

#[test]
fn a_reopened_book_keeps_every_address() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), [10, 77, 0, 10], [10, 77, 0, 250]);
    let book = AddressBook::open(cfg.clone()).unwrap();
    let a = book.allocate("p-a").unwrap();
    let b = book.allocate("p-b").unwrap();
    book.release("p-a").unwrap();
    drop(book);
    let again = AddressBook::open(cfg).unwrap();
    assert_eq!(again.get("p-b"), Some(b));
    assert_eq!(again.get("p-a"), None);
    assert_eq!(again.allocate("p-c").unwrap(), a, "the lowest free address, not a fresh one");
}

#[test]
fn the_range_runs_out_and_bad_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let book = AddressBook::open(config(dir.path(), [10, 0, 0, 1], [10, 0, 0, 2])).unwrap();
    book.allocate("a").unwrap();
    book.allocate("b").unwrap();
    assert!(matches!(book.allocate("c"), Err(AddressError::Exhausted { .. })));
    for bad in ["", "x,y", "x y", "x\ny", "#x"] {
        assert!(matches!(book.allocate(bad), Err(AddressError::BadName(_))), "{bad:?}");
    }
}

#[test]
fn the_conf_file_spelling_is_read_back_too() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), [10, 77, 0, 10], [10, 77, 0, 20]);
    std::fs::write(&cfg.hosts_file, "# hand-written\ndhcp-host=52:54:00:4D:00:0A,old,10.77.0.10,12h\n").unwrap();
    let book = AddressBook::open(cfg.clone()).unwrap();
    assert_eq!(book.get("old"), Some(Address { mac: "52:54:00:4d:00:0a".into(), ip: Ipv4Addr::new(10, 77, 0, 10) }));
    assert_eq!(book.allocate("new").unwrap().ip, Ipv4Addr::new(10, 77, 0, 11));
    std::fs::write(&cfg.hosts_file, "garbage\n").unwrap();
    assert!(matches!(AddressBook::open(cfg), Err(AddressError::BadRecord { line: 1, .. })));
}

/// Kills the test's dnsmasq however the test ends.
struct Dnsmasq(Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// A port free for UDP and TCP alike (dnsmasq listens on both); another test may still take
/// it before dnsmasq binds it, which `start_dnsmasq_on_a_free_port` retries.
fn free_udp_port() -> u16 {
    loop {
        let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// One A query to 127.0.0.1:`port`; `None` while nothing answers, else the A records.
fn query_a(port: u16, name: &str) -> Option<Vec<Ipv4Addr>> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let id: u16 = rand::random();
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    sock.send_to(&q, ("127.0.0.1", port)).ok()?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).ok()?;
    let r = &buf[..n];
    assert_eq!(&r[..2], &id.to_be_bytes(), "reply to another query");
    let answers = u16::from_be_bytes([r[6], r[7]]);
    let mut at = q.len(); // the question is echoed unchanged
    let mut ips = Vec::new();
    for _ in 0..answers {
        // The owner name: a compression pointer or a run of labels.
        while r[at] != 0 && r[at] & 0xc0 != 0xc0 {
            at += 1 + r[at] as usize;
        }
        at += if r[at] == 0 { 1 } else { 2 };
        let rtype = u16::from_be_bytes([r[at], r[at + 1]]);
        let len = u16::from_be_bytes([r[at + 8], r[at + 9]]) as usize;
        at += 10;
        if rtype == 1 && len == 4 {
            ips.push(Ipv4Addr::new(r[at], r[at + 1], r[at + 2], r[at + 3]));
        }
        at += len;
    }
    Some(ips)
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_dnsmasq(dir: &Path, cfg: &AddressConfig, port: u16) -> Dnsmasq {
    assert!(Path::new(DNSMASQ).exists(), "{DNSMASQ} is missing: run scripts/test-deps.sh");
    let arg = |k: &str, p: &PathBuf| format!("--{k}={}", p.display());
    let child = Command::new(DNSMASQ)
        .args(["--keep-in-foreground", "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts"])
        .arg(format!("--port={port}"))
        .arg(arg("pid-file", cfg.pid_file.as_ref().unwrap()))
        .arg(arg("dhcp-hostsfile", &cfg.hosts_file))
        .arg(arg("addn-hosts", cfg.addn_hosts_file.as_ref().unwrap()))
        // DHCP on (static leases only), or dnsmasq never reads the dhcp-hostsfile at all.
        .arg("--dhcp-range=10.77.0.0,static,255.255.255.0")
        .arg(arg("log-facility", &dir.join("dnsmasq.log")))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {DNSMASQ}: {e} (see scripts/test-deps.sh)"));
    Dnsmasq(child)
}

/// dnsmasq on a free port, once it wrote its pid file. Tests in this binary open ports all the
/// time, so the port may be taken between choosing it and dnsmasq binding it ("Address already
/// in use", and dnsmasq exits): then again on another port, a few times.
fn start_dnsmasq_on_a_free_port(dir: &Path, cfg: &AddressConfig) -> (u16, Dnsmasq) {
    for _ in 0..5 {
        let port = free_udp_port();
        let mut dns = start_dnsmasq(dir, cfg, port);
        let up = wait_for("dnsmasq to write its pid file or exit", || {
            if dns.0.try_wait().ok().flatten().is_some() {
                return Some(false);
            }
            std::fs::read_to_string(cfg.pid_file.as_ref().unwrap()).ok().filter(|s| !s.trim().is_empty()).map(|_| true)
        });
        if up {
            return (port, dns);
        }
    }
    panic!("dnsmasq exited at start five times (its message is above)")
}

#[test]
fn real_dnsmasq_resolves_a_vm_after_reload_and_forgets_it_after_release() {
    let dir = tempfile::tempdir().unwrap();
    // dnsmasq re-reads the files after dropping root: the directory must be traversable.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut cfg = config(dir.path(), [10, 77, 0, 10], [10, 77, 0, 250]);
    cfg.pid_file = Some(dir.path().join("dnsmasq.pid"));
    let book = AddressBook::open(cfg.clone()).unwrap();
    // An address from before dnsmasq starts: it must be in the files dnsmasq reads at start.
    let early = book.allocate("pool-early").unwrap();
    let (port, mut dns) = start_dnsmasq_on_a_free_port(dir.path(), &cfg);
    assert_eq!(wait_for("dnsmasq to answer", || query_a(port, "pool-early")), vec![early.ip]);
    assert_eq!(query_a(port, "pool-vm1"), Some(vec![]), "not allocated yet");

    let vm = book.allocate("pool-vm1").unwrap();
    assert_eq!(vm.ip, Ipv4Addr::new(10, 77, 0, 11));
    wait_for("pool-vm1 to resolve", || query_a(port, "pool-vm1").filter(|ips| ips == &[vm.ip]));

    assert!(book.release("pool-vm1").unwrap());
    wait_for("pool-vm1 to stop resolving", || query_a(port, "pool-vm1").filter(|ips| ips.is_empty()));
    assert_eq!(query_a(port, "pool-early"), Some(vec![early.ip]), "the other VM still resolves");

    assert!(dns.0.try_wait().unwrap().is_none(), "dnsmasq survived the reloads");
    let log = std::fs::read_to_string(dir.path().join("dnsmasq.log")).unwrap();
    let read = format!("read {}", cfg.hosts_file.display());
    assert!(log.contains(&read), "dnsmasq never read the hosts file:\n{log}");
    assert!(!log.contains("bad "), "dnsmasq rejected a line of the hosts file:\n{log}");
}
