//! The definition a live move sends: the source's, rewritten for the taking node. Parsed back,
//! not string-matched. (Live migration itself runs in the system tests, between two libvirtd.)

use std::path::Path;

use super::live::{Place, rewrite};
use crate::drivers::domain_xml::{DomainParams, DomainType, NetworkMode};

/// What the source's libvirtd answers for a running domain our driver defined: our XML plus
/// the backing chain libvirt adds to a running disk.
fn source_xml(kernel: bool) -> String {
    let params = DomainParams {
        name: "desk-7".into(),
        template: "desk".into(),
        kind: DomainType::Qemu,
        memory_mib: 256,
        vcpus: 1,
        emulator: "/usr/bin/qemu-system-x86_64".into(),
        machine: "q35".into(),
        overlay: "/a/vms/desk-7.qcow2".into(),
        kernel: kernel.then(|| "/a/templates/desk/kernel".into()),
        initrd: kernel.then(|| "/a/templates/desk/initrd".into()),
        cmdline: kernel.then(|| "console=ttyS0".into()),
        serial_socket: "/a/vms/desk-7.serial".into(),
        console_log: "/a/vms/desk-7.console.log".into(),
        vnc_listen: "127.0.0.1".into(),
        vnc_port: Some(5901),
        vnc_password: "pw&1".into(),
        network: NetworkMode::None,
        mac: None,
    };
    params.to_xml().replace(
        "<source file='/a/vms/desk-7.qcow2'/>",
        "<source file='/a/vms/desk-7.qcow2' index='2'/>\n      <backingStore type='file' index='1'>\n        <format type='qcow2'/>\n        <source file='/a/templates/desk/disk.qcow2'/>\n        <backingStore/>\n      </backingStore>",
    )
}

fn place<'a>(kernel: Option<&'a Path>, initrd: Option<&'a Path>) -> Place<'a> {
    Place {
        disk: Path::new("/b/vms/desk-7.qcow2"),
        kernel,
        initrd,
        serial: Path::new("/b/vms/desk-7.serial"),
        log: Path::new("/b/vms/desk-7.console.log"),
        vnc_listen: "10.0.0.2",
        vnc_port: 5933,
    }
}

fn attr<'a>(doc: &'a roxmltree::Document, tag: &str, name: &str) -> Vec<&'a str> {
    doc.descendants().filter(|n| n.has_tag_name(tag)).filter_map(|n| n.attribute(name)).collect()
}

#[test]
fn the_taking_node_gets_its_own_paths_and_display_and_nothing_else_changes() {
    let xml = source_xml(true);
    let (kernel, initrd) = (Path::new("/b/templates/desk/kernel"), Path::new("/b/templates/desk/initrd"));
    let out = rewrite(&xml, &place(Some(kernel), Some(initrd))).unwrap();
    let doc = roxmltree::Document::parse(&out).expect(&out);
    let text = |tag: &str| doc.descendants().find(|n| n.has_tag_name(tag)).and_then(|n| n.text()).map(str::to_string);
    assert_eq!(text("name").as_deref(), Some("desk-7"), "libvirt keeps the name");
    assert_eq!(text("kernel").as_deref(), Some("/b/templates/desk/kernel"));
    assert_eq!(text("initrd").as_deref(), Some("/b/templates/desk/initrd"));
    assert_eq!(attr(&doc, "source", "file"), ["/b/vms/desk-7.qcow2"], "the backing chain is left to the taking node");
    assert!(!out.contains("backingStore"), "{out}");
    assert_eq!(attr(&doc, "source", "path"), ["/b/vms/desk-7.serial", "/b/vms/desk-7.serial"], "serial and console");
    assert_eq!(attr(&doc, "log", "file"), ["/b/vms/desk-7.console.log"]);
    assert_eq!(attr(&doc, "graphics", "port"), ["5933"]);
    assert_eq!(attr(&doc, "graphics", "listen"), ["10.0.0.2"]);
    assert_eq!(attr(&doc, "listen", "address"), ["10.0.0.2"]);
    assert_eq!(attr(&doc, "graphics", "passwd"), ["pw&1"], "the user's VNC password goes along");
    assert!(!out.contains("/a/"), "no path of the giving node is left: {out}");
    // Everything else is the source's, byte for byte.
    let original = roxmltree::Document::parse(&xml).unwrap();
    for tag in ["name", "memory", "vcpu", "type", "cmdline", "uuid"] {
        let of = |d: &roxmltree::Document| d.descendants().find(|n| n.has_tag_name(tag)).and_then(|n| n.text()).map(str::to_string);
        assert_eq!(of(&doc), of(&original), "{tag}");
    }
}

#[test]
fn a_definition_the_taking_node_cannot_place_is_refused() {
    let xml = source_xml(true);
    let e = rewrite(&xml, &place(None, None)).unwrap_err();
    assert!(e.to_string().contains("kernel"), "{e}");
    let no_vnc = source_xml(false).replace("type='vnc'", "type='spice'");
    assert!(rewrite(&no_vnc, &place(None, None)).unwrap_err().to_string().contains("VNC"));
    let no_disk = source_xml(false).replace("dev='vda'", "dev='sda'");
    assert!(rewrite(&no_disk, &place(None, None)).unwrap_err().to_string().contains("vda"));
    assert!(rewrite("<domain", &place(None, None)).is_err());
    // A disk-booting guest needs no kernel here.
    assert!(rewrite(&source_xml(false), &place(None, None)).is_ok());
}
