//! Live moves with real QEMU between the test suite's two private libvirtd: the main one
//! (`scripts/libvirt-up.sh`) and the peer (`scripts/libvirt-peer-up.sh`), which libvirt sees as
//! another host. The guest is the BIOS-bootable test disk, installed as the same template on
//! both. A move that fails leaves the VM running where it was, snapshots included; one that
//! succeeds leaves nothing of it behind.

use super::move_tests::{Guest, Node, TEMPLATE, run, script, sha256_hex, spec, unique};
use super::*;
use crate::drivers::CLEAN_SNAPSHOT;

/// The peer's URI as the main libvirtd must dial it: libvirt takes a destination on the same
/// machine only as `qemu+unix` with an explicit socket.
fn peer_node() -> Node {
    let uri = script("libvirt-peer-up.sh");
    let dial = uri.replacen("qemu://", "qemu+unix://", 1);
    Node::on(uri, Some(dial))
}

fn files_named(node: &Node, name: &str) -> Vec<String> {
    node.vm_files().into_iter().filter(|f| f.starts_with(name)).collect()
}

#[tokio::test]
async fn a_running_vm_moves_to_the_peer_host_and_a_failed_move_leaves_it_as_it_was() {
    let guest = Guest::new();
    let (a, b) = (Node::new(), peer_node());
    a.install(&guest).await;
    b.install(&guest).await;
    let name = unique("live");
    a.hv.create(&spec(&name)).await.unwrap();
    a.hv.start(&name).await.unwrap();
    a.up(&name).await;
    a.hv.snapshot(&name, CLEAN_SNAPSHOT).await.unwrap();

    let source = a.hv.live_source(&name).await.unwrap();
    assert_eq!((source.domain.as_str(), source.template.as_str()), (name.as_str(), TEMPLATE));
    assert_eq!(source.template_sha256, sha256_hex(&a.template_disk()));
    assert!(source.xml.contains("passwd="), "the VNC password goes along");

    // Refused by the taking side, leaving nothing there.
    let e = a.hv.prepare_incoming(&spec(&name), &source).await.unwrap_err();
    assert!(matches!(e, DriverError::Unsupported(_)), "a node without a peer URI takes no live moves: {e:?}");
    let e = b.hv.prepare_incoming(&spec("other-name"), &source).await.unwrap_err();
    assert!(e.to_string().contains("keeps the domain's name"), "{e}");
    let odd = peer_node();
    let other = odd.cfg.templates_dir.join("other.qcow2");
    run(std::process::Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&other).arg("64M"));
    odd.hv.install_template(TEMPLATE, &other, None).await.unwrap();
    let e = odd.hv.prepare_incoming(&spec(&name), &source).await.unwrap_err();
    assert!(e.to_string().contains("differs"), "same name, other template: {e}");
    assert!(files_named(&odd, &name).is_empty(), "{:?}", odd.vm_files());
    let empty = peer_node();
    let e = empty.hv.prepare_incoming(&spec(&name), &source).await.unwrap_err();
    assert_eq!(crate::drivers::is_missing_template(&e), Some(TEMPLATE), "{e:?}");

    // A migration that fails (the peer cannot be reached) leaves the VM running here, its
    // clean snapshot usable.
    let target = b.hv.prepare_incoming(&spec(&name), &source).await.unwrap();
    assert!(b.overlay(&name).is_file(), "the taking overlay is made ahead");
    assert!(!target.xml.contains(&a.cfg.vm_dir.to_string_lossy().into_owned()), "no path of A's");
    let unreachable = LiveTarget { peer_uri: "qemu+unix:///system?socket=/nonexistent/libvirt-sock".into(), ..target.clone() };
    let e = a.hv.migrate_live(&name, &unreachable).await.unwrap_err();
    assert!(e.to_string().contains("live migration"), "{e}");
    assert!(a.hv.ping(&name).await.is_ok(), "still running on A");
    a.hv.revert(&name, CLEAN_SNAPSHOT).await.expect("its clean snapshot is defined again");
    assert!(a.list().await.contains(&name));

    // Now for real: it runs on B, and nothing of it is left on A.
    a.hv.migrate_live(&name, &target).await.unwrap();
    assert_eq!(b.list().await, [name.clone()]);
    assert!(b.hv.ping(&name).await.is_ok());
    let console = b.hv.console(&name).await.unwrap();
    let a_console_gone = a.hv.console(&name).await;
    assert!(matches!(a_console_gone, Err(DriverError::NotFound(_))), "{a_console_gone:?}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", console.port)).is_ok(), "B's display listens on {}", console.port);
    assert!(!a.list().await.contains(&name));
    assert!(files_named(&a, &name).is_empty(), "A's files are gone: {:?}", a.vm_files());
    let stored = String::from_utf8_lossy(
        &std::process::Command::new("virsh").args(["-c", &b.cfg.uri, "dumpxml", "--inactive", &name]).output().unwrap().stdout,
    )
    .into_owned();
    assert!(stored.contains(&*b.overlay(&name).to_string_lossy()), "B stores its own paths: {stored}");
    assert!(!stored.contains(&*a.cfg.vm_dir.to_string_lossy()), "{stored}");
    // It has no clean snapshot on B: that stayed in A's overlay.
    assert!(matches!(b.hv.revert(&name, CLEAN_SNAPSHOT).await, Err(DriverError::NotFound(_))));
    b.hv.destroy(&name).await.unwrap();
    assert!(files_named(&b, &name).is_empty(), "{:?}", b.vm_files());
}
