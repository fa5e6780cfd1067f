//! Real VMs end to end: a `hive` and a `hive node --driver libvirt` process on loopback, the
//! node driving the private libvirtd of `scripts/libvirt-up.sh`, which runs real QEMU (KVM when
//! `scripts/accel.sh` finds that it works, TCG otherwise) on the tiny guest of
//! `scripts/build-test-guest.sh` (a Debian kernel and a busybox initramfs). Nothing here is
//! simulated. Checks: the VNC port answers `RFB 003.008`; a screenshot of the console is not
//! blank (kept in `target/test-artifacts/`); releasing a session reverts its VM to the clean
//! snapshot, which undoes a change made in the guest; removing the VM leaves no domain and no
//! file; the hive reports clone, boot, snapshot and revert times for the libvirt backend.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agents::{Proc, join_token, start_hive};
use crate::support::until;

/// Tests that run real VMs take turns: they share one libvirtd, where a node agent that
/// connects destroys every hive domain its own hive does not know (reconciliation).
pub(crate) static REAL_VMS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Run one of the project's scripts and answer the last line it printed.
pub(crate) fn script(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name);
    let out = Command::new(&path).stderr(Stdio::inherit()).output().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(out.status.success(), "{name} failed; run scripts/test-deps.sh as root first");
    String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string()
}

pub(crate) fn virsh(uri: &str, args: &[&str]) -> std::process::Output {
    Command::new("virsh").arg("-c").arg(uri).args(args).output().expect("virsh (scripts/test-deps.sh installs it)")
}

/// What the guest's shell answers on the serial console to `command`, which must print
/// `marker` (built so that the echoed command line itself does not contain it).
pub(crate) async fn serial(socket: &Path, command: &str, marker: &str) -> String {
    let mut s = until("the serial console accepts a client", Duration::from_secs(30), || async {
        tokio::net::UnixStream::connect(socket).await.ok()
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    let mut next_send = tokio::time::Instant::now();
    loop {
        // The guest may still be booting (after a revert it resumes where the snapshot was
        // taken): resend the command until its answer shows.
        if tokio::time::Instant::now() >= next_send {
            s.write_all(format!("{command}\n").as_bytes()).await.expect("write to the serial console");
            next_send = tokio::time::Instant::now() + Duration::from_secs(5);
        }
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0)) => panic!("the serial console closed"),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("serial console: {e}"),
            Err(_) => {}
        }
        let text = String::from_utf8_lossy(&seen).to_string();
        if text.contains(marker) {
            return text;
        }
        assert!(tokio::time::Instant::now() < deadline, "no {marker:?} on the serial console; it showed:\n{text}");
    }
}

/// Distinct colours in a PNG: 1 means a blank screen.
fn colours(png_bytes: &[u8]) -> usize {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().expect("a PNG screenshot");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("a frame");
    let px = info.color_type.samples();
    buf[..info.buffer_size()].chunks(px).collect::<std::collections::HashSet<_>>().len()
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

#[tokio::test]
async fn a_real_vm_boots_through_the_hive_serves_vnc_and_reverts_on_release() {
    let _turn = REAL_VMS.lock().await;
    let uri = script("libvirt-up.sh");
    let templates = script("build-test-guest.sh");
    let accel = script("accel.sh");
    let dir = tempfile::tempdir().unwrap();
    let vm_dir = dir.path().join("vms");
    let env = [
        ("HIVE_VM__TEMPLATE", "tiny".to_string()),
        ("HIVE_VM__CORES", "1".to_string()),
        ("HIVE_VM__RAM_MB", "256".to_string()),
        ("HIVE_VM__DISK_MB", "64".to_string()),
        ("HIVE_POOL__DEFAULT_SIZE__MIN", "1".to_string()),
        ("HIVE_POOL__DEFAULT_SIZE__MAX", "1".to_string()),
    ];
    let hive = start_hive(&dir.path().join("hive"), "127.0.0.1:0", &env);
    let c = reqwest::Client::new();
    let get = |path: String| {
        let (c, base) = (c.clone(), hive.base.clone());
        async move { c.get(format!("{base}{path}")).send().await.ok()?.json::<Value>().await.ok() }
    };
    let jt = join_token(&c, &hive).await;
    let _agent = Proc {
        child: Command::new(crate::support::hive_bin())
            .args(["node", "--hive", &hive.base, "--driver", "libvirt", "--libvirt-uri", &uri, "--templates-dir", &templates])
            .args(["--accel", &accel, "--cores", "2", "--ram-mb", "2048", "--disk-mb", "10000", "--name", "qemu-node"])
            .arg("--vm-dir")
            .arg(&vm_dir)
            .arg("--data-dir")
            .arg(dir.path().join("node"))
            .env("HIVE_NODE_TOKEN", jt)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the libvirt node"),
    };

    // The pool boots its one VM on the real node.
    let vm = until("the VM is booted and free", Duration::from_secs(180), || async {
        let p = get("/api/v1/pools/default".into()).await?;
        let v = p["vm_list"].as_array()?.iter().find(|v| v["state"] == "free")?.clone();
        v["id"].as_u64()
    })
    .await;
    let domain = format!("default-{vm}");
    let listed = String::from_utf8_lossy(&virsh(&uri, &["list", "--name"]).stdout).to_string();
    assert!(listed.lines().any(|l| l.trim() == domain), "libvirt runs {domain}: {listed}");

    // A user locks it and gets the console.
    let post = |path: String| {
        let (c, base) = (c.clone(), hive.base.clone());
        async move { c.post(format!("{base}{path}")).send().await.expect("post").text().await.expect("body") }
    };
    let batch: u64 = post("/prepare-batch/1/https%3A%2F%2Fexample.org".into()).await.parse().unwrap();
    let handle: u64 = post(format!("/lock/{batch}")).await.parse().unwrap();
    let session = until("the session is assigned", Duration::from_secs(60), || async {
        let s = get(format!("/api/v1/pools/default/sessions/{handle}")).await?;
        (s["assigned"] == true).then_some(s)
    })
    .await;
    assert_eq!(session["vm"]["id"], vm);
    let vnc = &session["vnc"];
    let password = vnc["password"].as_str().expect("a VNC password");
    assert_eq!(password.len(), 8, "a generated VNC password");
    let mut rfb = tokio::net::TcpStream::connect((vnc["host"].as_str().unwrap(), vnc["port"].as_u64().unwrap() as u16))
        .await
        .expect("the VNC port accepts");
    let mut greeting = [0u8; 12];
    rfb.read_exact(&mut greeting).await.expect("an RFB greeting");
    assert_eq!(&greeting, b"RFB 003.008\n");
    drop(rfb);

    // The console shows something: a screenshot is not blank.
    let shot = artifacts().join("libvirt-console.png");
    let out = virsh(&uri, &["screenshot", &domain, shot.to_str().unwrap()]);
    assert!(out.status.success(), "screenshot: {}", String::from_utf8_lossy(&out.stderr));
    let n = colours(&std::fs::read(&shot).expect("the screenshot"));
    assert!(n > 1, "the console screenshot is blank ({n} colour)");

    // A change in the guest, then release: clean-up reverts to the clean snapshot.
    let sock = vm_dir.join(format!("{domain}.serial"));
    let before = serial(&sock, "touch /tmp/changed; ls /tmp/changed && echo present-$((40+2))", "present-42").await;
    assert!(before.contains("/tmp/changed"));
    post(format!("/release/{handle}")).await;
    until("the reverted VM is free again", Duration::from_secs(120), || async {
        let p = get("/api/v1/pools/default".into()).await?;
        p["vm_list"].as_array()?.iter().any(|v| v["id"] == vm && v["state"] == "free").then_some(())
    })
    .await;
    let after = serial(&sock, "ls /tmp/changed 2>/dev/null || echo absent-$((40+3))", "absent-43").await;
    assert!(after.contains("absent-43"), "the change survived the revert:\n{after}");
    // The revert restarted QEMU; the console is where the pool says it is.
    let again = until("the VNC port answers after the revert", Duration::from_secs(30), || async {
        let mut s = tokio::net::TcpStream::connect((vnc["host"].as_str().unwrap(), vnc["port"].as_u64().unwrap() as u16)).await.ok()?;
        let mut g = [0u8; 12];
        s.read_exact(&mut g).await.ok().map(|_| g)
    })
    .await;
    assert_eq!(&again, b"RFB 003.008\n");

    // The hive measured the steps on this backend.
    let metrics = c.get(format!("{}/metrics", hive.base)).send().await.unwrap().text().await.unwrap();
    for step in ["clone", "boot", "snapshot", "revert"] {
        let line = format!("hive_instantiation_seconds_count{{backend=\"libvirt\",step=\"{step}\"}}");
        assert!(metrics.lines().any(|l| l.starts_with(&line)), "no {line} in /metrics");
    }

    // Shrinking the pool destroys the VM: no domain, no file left.
    let r = c.post(format!("{}/set-pool-size/0/0/0", hive.base)).send().await.unwrap();
    assert!(r.status().is_success());
    // The driver undefines the domain, then removes its files: wait for both.
    let files = |vm_dir: &Path| -> Vec<PathBuf> {
        let all = std::fs::read_dir(vm_dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_else(|_| Vec::new());
        all.into_iter().filter(|p: &PathBuf| p.to_string_lossy().contains(&domain)).collect()
    };
    until("the domain and its files are gone", Duration::from_secs(60), || async {
        let all = String::from_utf8_lossy(&virsh(&uri, &["list", "--all", "--name"]).stdout).to_string();
        (!all.lines().any(|l| l.trim() == domain) && files(&vm_dir).is_empty()).then_some(())
    })
    .await;
}
