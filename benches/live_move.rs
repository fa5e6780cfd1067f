//! Moving a running VM between two libvirt hosts on real QEMU (the test suite's private
//! libvirtd and its peer, `scripts/libvirt-peer-up.sh`), beside baselines measured in the same
//! run, on the same host and guest (the tiny guest of `scripts/build-test-guest.sh`, 256 MiB,
//! idle after boot, with a `clean` snapshot as every pool VM has):
//!
//! | row | what is timed |
//! |---|---|
//! | live, the hive (driver) | `live_source` + `prepare_incoming` + `migrate_live`: describe, digest check, overlay and definitions on the target, snapshot metadata aside, libvirt's migration, the source's files removed |
//! | live, plain virsh | `virsh migrate --live --p2p --copy-storage-inc --persistent --undefinesource` of a twin VM, with its target overlay and definitions made beforehand (untimed) |
//! | cold, the hive (driver) | `export` + `import` + `start` + the guest's ready line + `snapshot clean`: what a cold move costs the same VM |
//!
//! Also the guest's downtime in each live migration, as libvirt's completed job reports it on
//! the target. The ratio that matters: the hive's live move against plain virsh.
//!
//! `cargo bench --features libvirt --bench live_move [-- --rounds N]` (default 5). Without
//! `--bench` (as `cargo test --all-targets --features libvirt` runs it) it is a one-round smoke
//! test. Needs `scripts/test-deps.sh` (root).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use guaca_hive::drivers::domain_xml::DomainType;
use guaca_hive::drivers::libvirt::{LibvirtConfig, LibvirtHypervisor};
use guaca_hive::drivers::{CLEAN_SNAPSHOT, Hypervisor, VmSpec};

mod real_vms;
use real_vms::{Samples, script, until_ready, virsh};

const TEMPLATE: &str = "tiny";

fn run(cmd: &mut Command) -> String {
    let out = cmd.stderr(Stdio::piped()).output().expect("run a baseline command");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Host {
    hv: LibvirtHypervisor,
    uri: String,
    vm_dir: PathBuf,
}

async fn host(uri: String, templates: &Path, vm_dir: PathBuf, accel: &str, peer: bool) -> Host {
    let cfg = LibvirtConfig {
        uri: uri.clone(),
        templates_dir: templates.to_path_buf(),
        vm_dir: vm_dir.clone(),
        domain_type: Some(if accel == "kvm" { DomainType::Kvm } else { DomainType::Qemu }),
        // libvirt dials a destination on this machine only as qemu+unix with a socket.
        peer_uri: peer.then(|| uri.replacen("qemu://", "qemu+unix://", 1)),
        migrate_uri: peer.then(|| "tcp://127.0.0.1".to_string()),
        vnc_first_port: if peer { 7900 } else { 5900 },
        ..LibvirtConfig::default()
    };
    let hv = tokio::task::spawn_blocking(move || LibvirtHypervisor::open(cfg, None)).await.expect("join").expect("libvirt");
    Host { hv, uri, vm_dir }
}

/// A VM on `h` booted to its ready line, with its clean snapshot.
async fn booted(h: &Host, name: &str) {
    let spec = VmSpec { name: name.into(), template: TEMPLATE.into(), cores: 1, ram_mb: 256, disk_mb: 64 };
    h.hv.create(&spec).await.expect("create");
    h.hv.start(name).await.expect("start");
    until_ready(&h.hv, name).await;
    h.hv.snapshot(name, CLEAN_SNAPSHOT).await.expect("snapshot");
}

/// The guest's downtime in the migration that brought `domain` to `uri`, in seconds.
fn downtime(uri: &str, domain: &str) -> f64 {
    let out = run(virsh(uri).args(["domjobinfo", "--completed", domain]));
    let ms = out.lines().find(|l| l.starts_with("Total downtime:")).and_then(|l| l.split_whitespace().nth(2)).and_then(|v| v.parse().ok());
    ms.map(|ms: f64| ms / 1000.0).unwrap_or_else(|| panic!("no downtime in domjobinfo: {out}"))
}

/// Plain virsh: the twin's target overlay and definitions made first (untimed), then the
/// migration alone; answers its seconds.
fn virsh_migrate(a: &Host, b: &Host, name: &str) -> f64 {
    let overlay = a.vm_dir.join(format!("{name}.qcow2"));
    let backing = run(Command::new("qemu-img").args(["info", "--output=json", "-U"]).arg(&overlay));
    let backing: serde_json::Value = serde_json::from_str(&backing).expect("qemu-img info");
    let backing = backing["backing-filename"].as_str().expect("a backing file").to_string();
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &backing])
        .arg(b.vm_dir.join(format!("{name}.qcow2"))));
    let (from, to) = (a.vm_dir.to_string_lossy().into_owned(), b.vm_dir.to_string_lossy().into_owned());
    let port_from =
        run(virsh(&a.uri).args(["vncdisplay", name])).trim().rsplit(':').next().and_then(|d| d.parse::<u16>().ok()).expect("display");
    let moved = |xml: String| xml.replace(&from, &to).replace(&format!("port='{}'", 5900 + port_from), "port='7999'");
    let dir = tempfile::tempdir().expect("tempdir");
    let (live, stored) = (dir.path().join("live.xml"), dir.path().join("stored.xml"));
    std::fs::write(&live, moved(run(virsh(&a.uri).args(["dumpxml", "--migratable", "--security-info", name])))).unwrap();
    std::fs::write(&stored, moved(run(virsh(&a.uri).args(["dumpxml", "--inactive", "--migratable", "--security-info", name])))).unwrap();
    run(virsh(&a.uri).args(["snapshot-delete", "--metadata", name, CLEAN_SNAPSHOT]));
    let dial = b.uri.replacen("qemu://", "qemu+unix://", 1);
    let t = Instant::now();
    run(virsh(&a.uri)
        .args(["migrate", "--live", "--p2p", "--copy-storage-inc", "--persistent", "--undefinesource", "--auto-converge", "--xml"])
        .arg(&live)
        .arg("--persistent-xml")
        .arg(&stored)
        .args([name, &dial, "tcp://127.0.0.1"]));
    t.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let rounds = real_vms::rounds();
    let (main_uri, peer_uri) = (script("libvirt-up.sh"), script("libvirt-peer-up.sh"));
    let templates = PathBuf::from(script("build-test-guest.sh"));
    let accel = script("accel.sh");
    let work = tempfile::tempdir().expect("tempdir");
    // QEMU runs as another user: it must reach the overlays.
    std::fs::set_permissions(work.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let a = host(main_uri, &templates, work.path().join("a"), &accel, false).await;
    let b = host(peer_uri, &templates, work.path().join("b"), &accel, true).await;
    let (mut hive, mut plain, mut cold) = (Samples::default(), Samples::default(), Samples::default());
    let (mut hive_down, mut plain_down) = (Samples::default(), Samples::default());
    // The hive's own steps before libvirt's migration: describe (source), get ready (target).
    let mut steps = (Samples::default(), Samples::default());
    let stamp = std::process::id();
    for round in 0..rounds {
        let (live, twin, frozen) = (format!("lm-{stamp}-{round}"), format!("lm-{stamp}-{round}-twin"), format!("lm-{stamp}-{round}-cold"));
        booted(&a, &live).await;
        booted(&a, &twin).await;
        booted(&a, &frozen).await;
        let hive_first = round % 2 == 0;
        if !hive_first {
            plain.0.push(virsh_migrate(&a, &b, &twin));
        }
        let t = Instant::now();
        let source = a.hv.live_source(&live).await.expect("live_source");
        let t1 = t.elapsed().as_secs_f64();
        let spec = VmSpec { name: live.clone(), template: TEMPLATE.into(), cores: 1, ram_mb: 256, disk_mb: 64 };
        let target = b.hv.prepare_incoming(&spec, &source).await.expect("prepare_incoming");
        let t2 = t.elapsed().as_secs_f64();
        a.hv.migrate_live(&live, &target).await.expect("migrate_live");
        hive.push(t.elapsed());
        steps.0.0.push(t1);
        steps.1.0.push(t2 - t1);
        if hive_first {
            plain.0.push(virsh_migrate(&a, &b, &twin));
        }
        hive_down.0.push(downtime(&b.uri, &live));
        plain_down.0.push(downtime(&b.uri, &twin));

        let t = Instant::now();
        let disk = a.hv.export(&frozen).await.expect("export");
        let moved = format!("{frozen}-b");
        let spec = VmSpec { name: moved.clone(), ..spec };
        b.hv.import(&spec, &disk).await.expect("import");
        b.hv.start(&moved).await.expect("start");
        until_ready(&b.hv, &moved).await;
        b.hv.snapshot(&moved, CLEAN_SNAPSHOT).await.expect("snapshot");
        cold.push(t.elapsed());

        for d in [&live, &twin, &moved] {
            b.hv.destroy(d).await.expect("destroy on B");
        }
        a.hv.destroy(&frozen).await.expect("destroy on A");
        let _ = a.hv.destroy(&twin).await; // its overlay (virsh leaves the source's files)
    }
    let row = |what: &str, s: &Samples| {
        let (lo, hi) = s.range();
        println!("{what:<32} median {:>8.3} s  (min {lo:.3}, max {hi:.3}, n={})", s.median(), s.0.len());
    };
    println!("live move of a running 256 MiB guest, main libvirtd → peer ({accel}), {rounds} round(s)");
    row("live, the hive (driver)", &hive);
    row("  of which: describe", &steps.0);
    row("  of which: target gets ready", &steps.1);
    row("live, plain virsh migrate", &plain);
    row("cold, the hive (driver)", &cold);
    row("downtime, the hive", &hive_down);
    row("downtime, plain virsh", &plain_down);
    println!("ratio live hive / plain virsh: {:.2}", hive.median() / plain.median());
    println!("ratio cold / live (the hive):   {:.2}", cold.median() / hive.median());
}
