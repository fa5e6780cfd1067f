//! Tests of the template layout, the generated XML (parsed back, not string-matched where it
//! matters), the VNC reader and the prepare command's quoting.

use super::*;

fn params(kind: DomainType) -> DomainParams {
    DomainParams {
        name: "pool-<7>".into(),
        template: "deb".into(),
        kind,
        memory_mib: 512,
        vcpus: 2,
        emulator: "/usr/bin/qemu-system-x86_64".into(),
        machine: "q35".into(),
        overlay: "/vms/pool-7.qcow2".into(),
        kernel: None,
        initrd: None,
        cmdline: None,
        serial_socket: "/vms/pool-7.serial".into(),
        console_log: "/vms/pool-7.console.log".into(),
        vnc_listen: "127.0.0.1".into(),
        vnc_port: Some(5907),
        vnc_password: "s3cr'et!".into(),
        network: NetworkMode::None,
        mac: None,
    }
}

fn text_of(doc: &roxmltree::Document, tag: &str) -> Option<String> {
    doc.descendants().find(|n| n.has_tag_name(tag)).and_then(|n| n.text()).map(str::to_string)
}

#[test]
fn a_kvm_domain_has_the_spec_the_disk_the_console_and_the_mark() {
    let xml = params(DomainType::Kvm).to_xml();
    let doc = roxmltree::Document::parse(&xml).expect(&xml);
    let root = doc.root_element();
    assert_eq!(root.attribute("type"), Some("kvm"));
    assert_eq!(text_of(&doc, "name").as_deref(), Some("pool-<7>"));
    assert_eq!(text_of(&doc, "memory").as_deref(), Some("512"));
    assert_eq!(text_of(&doc, "vcpu").as_deref(), Some("2"));
    assert_eq!(text_of(&doc, "emulator").as_deref(), Some("/usr/bin/qemu-system-x86_64"));
    let vnc = doc.descendants().find(|n| n.has_tag_name("graphics")).expect("a VNC display");
    assert_eq!((vnc.attribute("port"), vnc.attribute("autoport")), (Some("5907"), Some("no")), "a fixed port survives QEMU restarts");
    let log = doc.descendants().find(|n| n.has_tag_name("log")).expect("the serial console is logged");
    assert_eq!(log.attribute("file"), Some("/vms/pool-7.console.log"));
    let mark = doc.descendants().find(|n| n.tag_name().namespace() == Some(HIVE_NS) && n.has_tag_name("vm"));
    assert!(mark.is_some(), "{xml}");
    let disk = doc.descendants().find(|n| n.has_tag_name("source") && n.attribute("file").is_some()).unwrap();
    assert_eq!(disk.attribute("file"), Some("/vms/pool-7.qcow2"));
    let serial: Vec<_> = doc.descendants().filter(|n| n.has_tag_name("source") && n.attribute("mode") == Some("bind")).collect();
    assert_eq!(serial.len(), 2, "serial and console on the one socket");
    assert!(serial.iter().all(|n| n.attribute("path") == Some("/vms/pool-7.serial")));
    let vnc = parse_vnc(&xml).unwrap().unwrap();
    assert_eq!(vnc, VncInfo { port: Some(5907), password: Some("s3cr'et!".into()) });
    assert!(doc.descendants().any(|n| n.has_tag_name("cpu") && n.attribute("mode") == Some("host-passthrough")));
    assert!(!doc.descendants().any(|n| n.has_tag_name("interface")), "network none: no NIC");
}

#[test]
fn tcg_and_test_domains_differ_where_they_must() {
    let tcg = params(DomainType::Qemu).to_xml();
    assert!(tcg.starts_with("<domain type='qemu'>") && tcg.contains("<emulator>") && !tcg.contains("host-passthrough"));
    let test = params(DomainType::Test).to_xml();
    assert!(test.starts_with("<domain type='test'>") && !test.contains("<emulator>") && !test.contains("machine="));
}

#[test]
fn direct_kernel_boot_asks_for_the_serial_console() {
    let mut p = params(DomainType::Qemu);
    p.kernel = Some("/t/deb/kernel".into());
    p.initrd = Some("/t/deb/initrd".into());
    p.cmdline = Some("quiet".into());
    let doc_xml = p.to_xml();
    let doc = roxmltree::Document::parse(&doc_xml).unwrap();
    assert_eq!(text_of(&doc, "kernel").as_deref(), Some("/t/deb/kernel"));
    assert_eq!(text_of(&doc, "initrd").as_deref(), Some("/t/deb/initrd"));
    assert_eq!(text_of(&doc, "cmdline").as_deref(), Some("quiet console=ttyS0"));
    p.cmdline = Some("console=hvc0".into());
    assert!(p.to_xml().contains("<cmdline>console=hvc0</cmdline>"), "an explicit console is kept");
}

#[test]
fn the_nic_carries_the_fixed_mac() {
    let mut p = params(DomainType::Kvm);
    p.mac = Some("52:54:00:4d:00:0a".into());
    p.network = NetworkMode::Bridge("br-hive".into());
    let xml = p.to_xml();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let nic = doc.descendants().find(|n| n.has_tag_name("interface")).unwrap();
    assert_eq!(nic.attribute("type"), Some("bridge"));
    let child = |t: &str| nic.children().find(|n| n.has_tag_name(t)).unwrap();
    assert_eq!(child("source").attribute("bridge"), Some("br-hive"));
    assert_eq!(child("mac").attribute("address"), Some("52:54:00:4d:00:0a"));
    p.network = NetworkMode::User;
    assert!(p.to_xml().contains("<interface type='user'>\n      <mac address='52:54:00:4d:00:0a'/>"));
}

#[test]
fn network_modes_parse_from_the_command_line_and_config() {
    assert_eq!("none".parse::<NetworkMode>().unwrap(), NetworkMode::None);
    assert_eq!("user".parse::<NetworkMode>().unwrap(), NetworkMode::User);
    assert_eq!("bridge:br0".parse::<NetworkMode>().unwrap(), NetworkMode::Bridge("br0".into()));
    assert!("bridge:".parse::<NetworkMode>().is_err() && "nat".parse::<NetworkMode>().is_err());
    let from_json: NetworkMode = serde_json::from_str(r#"{"bridge":"br0"}"#).unwrap();
    assert_eq!(from_json, NetworkMode::Bridge("br0".into()));
    assert_eq!(serde_json::from_str::<NetworkMode>(r#""user""#).unwrap(), NetworkMode::User);
}

#[test]
fn live_xml_gives_the_port_once_it_runs() {
    let live = "<domain type='kvm' id='3'><devices><graphics type='spice' port='5930'/>\
                <graphics type='vnc' port='5901' autoport='yes' listen='127.0.0.1' passwd='abcdefgh'/></devices></domain>";
    assert_eq!(parse_vnc(live).unwrap(), Some(VncInfo { port: Some(5901), password: Some("abcdefgh".into()) }));
    let inactive = "<domain><devices><graphics type='vnc' port='-1' autoport='yes'/></devices></domain>";
    assert_eq!(parse_vnc(inactive).unwrap(), Some(VncInfo { port: None, password: None }));
    assert_eq!(parse_vnc("<domain><devices/></domain>").unwrap(), None);
    assert!(parse_vnc("<domain>").is_err());
}

#[test]
fn templates_are_found_by_layout_and_cannot_escape_their_directory() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path();
    std::fs::create_dir_all(t.join("deb")).unwrap();
    std::fs::write(t.join("deb/disk.qcow2"), b"").unwrap();
    std::fs::write(t.join("deb/kernel"), b"").unwrap();
    std::fs::write(t.join("deb/cmdline"), b"quiet\n").unwrap();
    std::fs::create_dir_all(t.join("win")).unwrap();
    std::fs::write(t.join("win/disk.raw"), b"").unwrap();

    let deb = TemplateFiles::locate(t, "deb").unwrap();
    assert_eq!((deb.disk, deb.format), (t.join("deb/disk.qcow2"), "qcow2"));
    assert_eq!((deb.kernel, deb.initrd, deb.cmdline.as_deref()), (Some(t.join("deb/kernel")), None, Some("quiet")));
    let win = TemplateFiles::locate(t, "win").unwrap();
    assert_eq!((win.format, win.kernel), ("raw", None));
    for bad in ["nope", "", "..", "../deb", "deb/../deb"] {
        assert!(matches!(TemplateFiles::locate(t, bad), Err(DomainXmlError::NoTemplate { .. })), "{bad:?}");
    }
}

#[test]
fn prepare_values_are_quoted_so_they_stay_one_word() {
    let spec = PrepareSpec { home_page: "https://x.test/?a=1&b='2'; rm -rf /".into(), profile_name: "kiosk {home_page}".into() };
    let cmd = render_prepare("open-browser --profile {profile} {home_page} {other}", &spec);
    let words = shlex::split(&cmd).unwrap();
    assert_eq!(words, ["open-browser", "--profile", "kiosk {home_page}", "https://x.test/?a=1&b='2'; rm -rf /", "{other}"]);
}

#[test]
fn vnc_passwords_are_eight_fresh_alphanumerics() {
    let a = random_vnc_password();
    assert_eq!(a.len(), 8);
    assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_ne!(a, random_vnc_password());
}

#[test]
fn snapshot_xml_names_the_snapshot() {
    for (with_memory, memory) in [(true, "internal"), (false, "no")] {
        let doc_xml = snapshot_xml("clean&1", with_memory);
        let doc = roxmltree::Document::parse(&doc_xml).unwrap();
        assert_eq!(doc.root_element().tag_name().name(), "domainsnapshot");
        assert_eq!(text_of(&doc, "name").as_deref(), Some("clean&1"));
        let mem = doc.descendants().find(|n| n.has_tag_name("memory")).unwrap();
        assert_eq!(mem.attribute("snapshot"), Some(memory));
        let disk = doc.descendants().find(|n| n.has_tag_name("disk")).unwrap();
        assert_eq!((disk.attribute("name"), disk.attribute("snapshot")), (Some("vda"), Some("internal")));
    }
}

#[test]
fn an_installed_template_is_found_whole_and_never_replaced() {
    let root = tempfile::tempdir().unwrap();
    let image = root.path().join("image");
    std::fs::write(&image, b"qcow2 bytes").unwrap();
    let templates = root.path().join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    TemplateFiles::install(&templates, "web-01", &image, Some(" guest up ")).unwrap();
    let t = TemplateFiles::locate(&templates, "web-01").unwrap();
    assert_eq!(std::fs::read(&t.disk).unwrap(), b"qcow2 bytes");
    assert_eq!((t.format, t.ready.as_deref(), t.kernel), ("qcow2", Some("guest up"), None));
    let again = TemplateFiles::install(&templates, "web-01", &image, None).unwrap_err();
    assert!(matches!(again, DomainXmlError::TemplateExists(_)), "{again}");
    for bad in ["", "../x", ".hidden", "a/b", "sp ace"] {
        assert!(matches!(TemplateFiles::install(&templates, bad, &image, None), Err(DomainXmlError::BadTemplateName(_))), "{bad:?}");
    }
    let missing = TemplateFiles::install(&templates, "gone", &root.path().join("nope"), None).unwrap_err();
    assert!(matches!(missing, DomainXmlError::Io { .. }), "{missing}");
    let names: Vec<_> = std::fs::read_dir(&templates).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("web-01")], "nothing half-built is left");
}
