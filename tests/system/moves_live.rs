//! Live moves of real QEMU VMs: a user's VM migrated, running, from a `hive node --driver
//! libvirt` agent on the test suite's private libvirtd to one on its second, the "peer"
//! (`scripts/libvirt-peer-up.sh`: another libvirt host in its own namespaces). The peer starts
//! without the template, so it is shipped first. The guest keeps what it held in RAM (a file
//! in its tmpfs, read back through the serial console on the new node), its user keeps the
//! handle, and the console answers on the new node. Once released, the VM is replaced: its
//! clean snapshot stayed behind. Nothing simulated.

use std::time::Duration;

use serde_json::json;

use crate::agents::join_token;
use crate::libvirt_e2e::{REAL_VMS, script, serial, virsh};
use crate::moves::{call, move_and_wait, vms};
use crate::moves_libvirt::{READY, TwoNodes, agent, node_id, two_nodes};
use crate::support::until;

fn domains(uri: &str) -> Vec<String> {
    String::from_utf8_lossy(&virsh(uri, &["list", "--all", "--name"]).stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[tokio::test]
async fn an_occupied_qemu_vm_moves_live_to_another_libvirt_host_and_keeps_its_user_and_its_memory() {
    let _turn = REAL_VMS.lock().await;
    let main = script("libvirt-up.sh");
    let peer = script("libvirt-peer-up.sh");
    let accel = script("accel.sh");
    let TwoNodes { dir: _dir, a, b, hive } = two_nodes();
    let (base, token) = (hive.base.as_str(), hive.token.as_str());
    let c = reqwest::Client::new();
    let _a = agent(base, join_token(&c, &hive).await, &accel, &a, "live-a", &main, None);
    let node_a = node_id(&c, base, "live-a").await;
    let (s, p) = call(&c, base, Some(token), "POST", "/api/v1/pools", Some(json!({"name": "desk", "min": 1, "max": 1}))).await;
    assert_eq!(s, 201, "{p}");
    let vm = until("a free VM on node A", Duration::from_secs(240), || async {
        vms(&c, base, "desk").await.into_iter().find(|(_, s, n)| s == "free" && *n == node_a).map(|v| v.0)
    })
    .await;
    let _b = agent(base, join_token(&c, &hive).await, &accel, &b, "live-b", &peer, Some(&peer));
    let node_b = node_id(&c, base, "live-b").await;

    // A user takes the VM and leaves something in its RAM.
    let (_, bt) =
        call(&c, base, None, "POST", "/api/v1/pools/desk/batches", Some(json!({"size": 1, "home_page": "http://home.test/"}))).await;
    let (s, h) = call(&c, base, None, "POST", "/api/v1/pools/desk/sessions", Some(json!({"batch": bt["id"]}))).await;
    assert_eq!(s, 201, "{h}");
    let id = h["id"].as_u64().unwrap();
    let session = format!("/api/v1/pools/desk/sessions/{id}");
    let held = until("assigned", Duration::from_secs(120), || async {
        let (_, h) = call(&c, base, None, "GET", &session, None).await;
        h["vm"]["id"].as_u64()
    })
    .await;
    assert_eq!(held, vm);
    let (_, before) = call(&c, base, None, "GET", &session, None).await;
    let token_in_ram = format!("live-{}", std::process::id());
    let on_a = a.join(format!("vms/desk-{vm}.serial"));
    serial(&on_a, &format!("echo {token_in_ram} > /tmp/mark; echo WR''OTE"), "WROTE").await;

    // A → B, running: B lacks the template, so it is shipped first.
    let m = move_and_wait(&c, base, token, "desk", vm, node_b, Duration::from_secs(600)).await;
    assert_eq!((m["status"].as_str(), m["mode"].as_str()), (Some("done"), Some("live")), "{m}");
    let on_b = m["domain"].as_str().unwrap().to_string();
    assert!(b.join("templates/desk/disk.qcow2").is_file(), "the template was installed on B");
    assert!(domains(&peer).contains(&on_b), "{:?}", domains(&peer));
    assert!(!domains(&main).contains(&format!("desk-{vm}")), "gone from A: {:?}", domains(&main));
    assert!(!a.join(format!("vms/desk-{vm}.qcow2")).exists(), "and its disk too");
    let (_, images) = call(&c, base, Some(token), "GET", "/api/v1/images", None).await;
    assert_eq!(images.as_array().map(Vec::len), Some(0), "the shipped template left the registry: {images}");

    // The user still holds it, on B, and the guest kept its memory: it did not boot again.
    assert!(vms(&c, base, "desk").await.contains(&(vm, "occupied".into(), node_b)));
    let (_, h) = call(&c, base, None, "GET", &session, None).await;
    assert_eq!(h["vm"]["id"].as_u64(), Some(vm), "{h}");
    let text = serial(&b.join(format!("vms/{on_b}.serial")), "echo MARK-$(cat /tmp/mark)-KRAM", &format!("MARK-{token_in_ram}-KRAM")).await;
    assert!(text.contains(&token_in_ram), "{text}");
    let log = std::fs::read_to_string(b.join(format!("vms/{on_b}.console.log"))).unwrap_or_default();
    assert!(!log.contains(READY), "no boot on B, the guest went on: {log}");
    // Its display answers on B's port, which the pool now hands out.
    let vnc = String::from_utf8_lossy(&virsh(&peer, &["vncdisplay", &on_b]).stdout).trim().to_string();
    let display: u64 = vnc.rsplit(':').next().and_then(|d| d.parse().ok()).unwrap_or_else(|| panic!("vncdisplay: {vnc}"));
    assert_eq!(h["vnc"]["port"].as_u64(), Some(5900 + display), "{h}");
    assert_eq!(h["vnc"]["password"], before["vnc"]["password"], "the user's VNC password still works");
    let mut rfb = tokio::net::TcpStream::connect(("127.0.0.1", (5900 + display) as u16)).await.expect("VNC on B");
    let mut banner = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut rfb, &mut banner).await.unwrap();
    assert!(banner.starts_with(b"RFB "), "{banner:?}");

    // Released: replaced (its clean snapshot stayed on A), and B's domain goes.
    let (s, e) = call(&c, base, Some(token), "DELETE", &session, None).await;
    assert!(s < 300, "{e}");
    until("the moved VM is replaced", Duration::from_secs(120), || async {
        (!domains(&peer).contains(&on_b) && !vms(&c, base, "desk").await.iter().any(|v| v.0 == vm)).then_some(())
    })
    .await;
    call(&c, base, Some(token), "PUT", "/api/v1/pools/desk/size", Some(json!({"min": 0, "max": 0}))).await;
    until("the pool's domains are gone", Duration::from_secs(120), || async {
        let left: Vec<String> = domains(&main).into_iter().chain(domains(&peer)).filter(|d| d.starts_with("desk-")).collect();
        left.is_empty().then_some(())
    })
    .await;
}
