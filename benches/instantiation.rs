//! Instantiation times on real QEMU through the libvirt driver, beside baselines measured in the
//! same run on the same host and guest (the tiny guest of `scripts/build-test-guest.sh`):
//!
//! | step | the hive (driver) | baseline |
//! |---|---|---|
//! | clone | `create`: overlay + domain definition + address | `qemu-img create -b` of the same overlay |
//! | boot | `start`, then `ping` until the guest's ready line | plain `qemu-system-x86_64` to the same line |
//! | snapshot | `snapshot` (internal, with RAM) | `virsh snapshot-create-as` of a twin domain |
//! | revert | `revert` to the live snapshot (the "app from a live snapshot" path) | `virsh snapshot-revert` |
//! | suspend/resume | `suspend`, `resume` | `virsh suspend`, `virsh resume` |
//!
//! `cargo bench --features libvirt --bench instantiation [-- --rounds N]` (default 5). Without
//! `--bench` (as `cargo test --all-targets --features libvirt` runs it) it is a one-round smoke
//! test. Needs `scripts/test-deps.sh` (root): it uses the private libvirtd and `scripts/accel.sh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guaca_hive::drivers::domain_xml::DomainType;
use guaca_hive::drivers::libvirt::{LibvirtConfig, LibvirtHypervisor};
use guaca_hive::drivers::{Hypervisor, VmSpec};

mod real_vms;
use real_vms::{Samples, script, until_ready, virsh};

fn run(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output().expect("run a baseline command");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    t.elapsed()
}

/// Plain QEMU, no libvirt: from exec to the guest's ready line on its serial console.
fn plain_boot(tpl: &Path, accel: &str) -> Duration {
    use std::io::{BufRead, BufReader};
    let ready = std::fs::read_to_string(tpl.join("ready")).expect("ready line");
    let t = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", accel, "-m", "256", "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "stdio", "-kernel"])
        .arg(tpl.join("kernel"))
        .arg("-initrd")
        .arg(tpl.join("initrd"))
        .args(["-append", "console=ttyS0 panic=-1", "-no-reboot"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    for line in out.lines() {
        if line.map(|l| l.contains(ready.trim())).unwrap_or(false) {
            break;
        }
    }
    let took = t.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    took
}

#[tokio::main]
async fn main() {
    let rounds = real_vms::rounds();
    let uri = script("libvirt-up.sh");
    let templates = PathBuf::from(script("build-test-guest.sh"));
    let accel = script("accel.sh");
    let tpl = templates.join("tiny");
    let work = tempfile::tempdir().expect("tempdir");
    let cfg = LibvirtConfig {
        uri: uri.clone(),
        templates_dir: templates.clone(),
        vm_dir: work.path().to_path_buf(),
        domain_type: Some(if accel == "kvm" { DomainType::Kvm } else { DomainType::Qemu }),
        ..LibvirtConfig::default()
    };
    let hv = tokio::task::spawn_blocking(move || LibvirtHypervisor::open(cfg, None)).await.expect("join").expect("libvirt");
    let (mut clone, mut clone_base) = (Samples::default(), Samples::default());
    let (mut boot, mut boot_base) = (Samples::default(), Samples::default());
    let (mut snap, mut snap_base) = (Samples::default(), Samples::default());
    let (mut revert, mut revert_base) = (Samples::default(), Samples::default());
    let (mut pause, mut pause_base) = (Samples::default(), Samples::default());
    let stamp = std::process::id();
    for round in 0..rounds {
        let name = format!("bench-{stamp}-{round}");
        let twin = format!("{name}-twin");
        let spec = VmSpec { name: name.clone(), template: "tiny".into(), cores: 1, ram_mb: 256, disk_mb: 64 };

        let t = Instant::now();
        hv.create(&spec).await.expect("create");
        clone.push(t.elapsed());
        let base_overlay = work.path().join(format!("{name}-base.qcow2"));
        clone_base.push(run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(tpl.join("disk.qcow2"))
            .arg(&base_overlay)));
        let _ = std::fs::remove_file(&base_overlay);

        let t = Instant::now();
        hv.start(&name).await.expect("start");
        until_ready(&hv, &name).await;
        boot.push(t.elapsed());
        boot_base.push(plain_boot(&tpl, &accel));

        let t = Instant::now();
        hv.snapshot(&name, "clean").await.expect("snapshot");
        snap.push(t.elapsed());
        let t = Instant::now();
        hv.revert(&name, "clean").await.expect("revert");
        revert.push(t.elapsed());
        let t = Instant::now();
        hv.suspend(&name).await.expect("suspend");
        hv.resume(&name).await.expect("resume");
        pause.push(t.elapsed());

        // The twin: the same kind of domain, driven by virsh alone.
        hv.create(&VmSpec { name: twin.clone(), ..spec.clone() }).await.expect("twin");
        hv.start(&twin).await.expect("twin start");
        until_ready(&hv, &twin).await;
        snap_base.push(run(virsh(&uri).args(["snapshot-create-as", &twin, "clean"])));
        revert_base.push(run(virsh(&uri).args(["snapshot-revert", &twin, "clean"])));
        let t = Instant::now();
        run(virsh(&uri).args(["suspend", &twin]));
        run(virsh(&uri).args(["resume", &twin]));
        pause_base.push(t.elapsed());

        hv.destroy(&name).await.expect("destroy");
        hv.destroy(&twin).await.expect("destroy twin");
    }
    println!("instantiation on {accel} ({rounds} rounds, medians in seconds)");
    println!("{:<16} {:>10} {:>10} {:>7}", "step", "hive", "baseline", "ratio");
    for (step, a, b) in [
        ("clone", &clone, &clone_base),
        ("boot to ready", &boot, &boot_base),
        ("live snapshot", &snap, &snap_base),
        ("revert (live)", &revert, &revert_base),
        ("suspend+resume", &pause, &pause_base),
    ] {
        println!("{step:<16} {:>10.3} {:>10.3} {:>7.2}", a.median(), b.median(), a.median() / b.median());
    }
}
