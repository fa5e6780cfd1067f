//! A full migration onto real QEMU: a BIOS-bootable disk (`scripts/build-test-guest-disk.sh`:
//! MBR, syslinux, the tiny guest's kernel and initramfs) exported as a vmdk is the source; a
//! `hive` and a `hive node --driver libvirt` process on loopback migrate it. The agent converts
//! the disk and uploads it, fetches the image back as the destination, installs it as a template
//! and boots it from disk (no direct kernel boot) until it prints its ready line; then a pool
//! whose template is the migrated one boots a VM of it and a user locks it. Nothing simulated.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::agents::{Proc, join_token, start_hive};
use crate::libvirt_e2e::{REAL_VMS, script};
use crate::support::until;

const READY: &str = "guaca-hive test guest ready";

#[tokio::test]
async fn a_vmdk_export_is_migrated_booted_on_qemu_and_locked_through_the_pool_api() {
    let _turn = REAL_VMS.lock().await;
    let uri = script("libvirt-up.sh");
    let bootdisk = script("build-test-guest-disk.sh");
    let accel = script("accel.sh");
    let dir = tempfile::tempdir().unwrap();
    let exports = dir.path().join("exports");
    std::fs::create_dir_all(&exports).unwrap();
    let raw = format!("{bootdisk}/bootable.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vmdk", &raw])
        .arg(exports.join("desk-01.vmdk"))
        .output()
        .expect("qemu-img runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let env = [
        ("HIVE_VM__TEMPLATE", "desk-01".to_string()),
        ("HIVE_VM__CORES", "1".to_string()),
        ("HIVE_VM__RAM_MB", "256".to_string()),
        ("HIVE_VM__DISK_MB", "64".to_string()),
        ("HIVE_POOL__DEFAULT_SIZE__MIN", "0".to_string()),
        ("HIVE_POOL__DEFAULT_SIZE__MAX", "1".to_string()),
    ];
    let hive = start_hive(&dir.path().join("hive"), "127.0.0.1:0", &env);
    let c = reqwest::Client::new();
    let templates = dir.path().join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    let jt = join_token(&c, &hive).await;
    let _agent = Proc {
        child: Command::new(crate::support::hive_bin())
            .args(["node", "--hive", &hive.base, "--driver", "libvirt", "--libvirt-uri", &uri, "--templates-dir"])
            .arg(&templates)
            .args(["--accel", &accel, "--cores", "2", "--ram-mb", "2048", "--disk-mb", "10000", "--name", "qemu-node"])
            .arg("--vm-dir")
            .arg(dir.path().join("vms"))
            .arg("--data-dir")
            .arg(dir.path().join("node"))
            .env("HIVE_NODE_TOKEN", jt)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the libvirt node"),
    };
    let call = |method: &'static str, path: String, body: Option<Value>| {
        let (c, base, token) = (c.clone(), hive.base.clone(), hive.token.clone());
        async move {
            let mut r = c.request(method.parse().unwrap(), format!("{base}{path}")).bearer_auth(token);
            if let Some(b) = body {
                r = r.json(&b);
            }
            let resp = r.send().await.expect("request");
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            assert!((200..300).contains(&status), "{method} {path}: {status} {v}");
            v
        }
    };
    until("the node is ready", Duration::from_secs(60), || async {
        let n = call("GET", "/api/v1/nodes".into(), None).await;
        (n[0]["state"] == "ready").then_some(())
    })
    .await;

    let src =
        call("POST", "/api/v1/migration-sources".into(), Some(json!({"name": "esx", "type": "vmware", "params": {"dir": exports}}))).await;
    let resources = call("POST", format!("/api/v1/migration-sources/{}/discover", src["id"]), None).await;
    let dst = call(
        "POST",
        "/api/v1/migration-destinations".into(),
        Some(json!({"name": "qemu", "type": "hive", "params": {"template": "desk-01", "ready": READY}})),
    )
    .await;
    let m = call(
        "POST",
        "/api/v1/migrations".into(),
        Some(json!({"name": "desk-01", "resource_id": resources[0]["id"], "destination_id": dst["id"]})),
    )
    .await;
    let m = until("the migration finished", Duration::from_secs(300), || async {
        let m = call("GET", format!("/api/v1/migrations/{}", m["id"]), None).await;
        matches!(m["status"].as_str(), Some("Completed" | "Error" | "Cancelled")).then_some(m)
    })
    .await;
    assert_eq!(m["status"], "Completed", "{m}");
    assert_eq!(m["result"]["instance"]["template"], "desk-01", "{m}");
    assert!(templates.join("desk-01/disk.qcow2").is_file(), "installed as a template");
    let listed = String::from_utf8_lossy(&crate::libvirt_e2e::virsh(&uri, &["list", "--all", "--name"]).stdout).to_string();
    assert!(!listed.contains("migrated-desk-01"), "the check instance is gone: {listed}");

    // The pool's template is the migrated disk: a VM of it boots and a user locks it.
    let post = |path: String| {
        let (c, base) = (c.clone(), hive.base.clone());
        async move { c.post(format!("{base}{path}")).send().await.expect("post").text().await.expect("body") }
    };
    post("/set-pool-size/1/1/60000".into()).await;
    let batch: u64 = post("/prepare-batch/1/https%3A%2F%2Fexample.org".into()).await.parse().unwrap();
    let handle: u64 = post(format!("/lock/{batch}")).await.parse().unwrap();
    let session = until("the session is assigned", Duration::from_secs(240), || async {
        let s = call("GET", format!("/api/v1/pools/default/sessions/{handle}"), None).await;
        (s["assigned"] == true).then_some(s)
    })
    .await;
    let vm = session["vm"]["id"].as_u64().unwrap();
    let running = String::from_utf8_lossy(&crate::libvirt_e2e::virsh(&uri, &["list", "--name"]).stdout).to_string();
    assert!(running.lines().any(|l| l.trim() == format!("default-{vm}")), "libvirt runs the migrated VM: {running}");
    post(format!("/release/{handle}")).await;
    post("/set-pool-size/0/0/0".into()).await;
    until("the VM is gone", Duration::from_secs(60), || async {
        let all = String::from_utf8_lossy(&crate::libvirt_e2e::virsh(&uri, &["list", "--all", "--name"]).stdout).to_string();
        (!all.lines().any(|l| l.trim() == format!("default-{vm}"))).then_some(())
    })
    .await;
}
