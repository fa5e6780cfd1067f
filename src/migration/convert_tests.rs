//! Conversion against the real qemu-img and qemu-io: every input format, corrupt and hostile
//! sources, a full target file system (a small tmpfs; the tests run as root), and cancel while
//! qemu-img runs. Every failure case checks that the target directory is left empty.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;

const MIB: u64 = 1024 * 1024;

/// Runs a qemu tool; the test fails with its stderr if it does.
async fn run(program: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new(program).args(args).output().await.unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}

/// `src` and `out` directories in a fresh temporary directory.
fn dirs() -> (TempDir, PathBuf, PathBuf) {
    let tmp = TempDir::new().expect("temp dir");
    let (src, out) = (tmp.path().join("src"), tmp.path().join("out"));
    std::fs::create_dir(&src).expect("src dir");
    std::fs::create_dir(&out).expect("out dir");
    (tmp, src, out)
}

/// A raw disk of `mib` MiB (at least 4) holding known patterns at its start, a quarter in and
/// its last MiB; the rest reads as zeros.
async fn raw_disk(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let path = dir.join(name);
    run("qemu-img", &["create", "-q", "-f", "raw", s(&path), &format!("{mib}M")]).await;
    let writes = ["write -P 0xab 0 1M".to_string(), format!("write -P 0x5a {}M 2M", mib / 4), format!("write -P 0x11 {}M 1M", mib - 1)];
    let mut args = vec!["-f", "raw"];
    for w in &writes {
        args.extend(["-c", w.as_str()]);
    }
    args.push(s(&path));
    run("qemu-io", &args).await;
    path
}

/// `raw` converted to `format`, beside it (a .vhd keeps the exact size with `force_size`).
async fn image_as(raw: &Path, format: DiskFormat) -> PathBuf {
    let path = raw.with_extension(format.qemu_name());
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", format.qemu_name()];
    if format == DiskFormat::Vpc {
        args.extend(["-o", "force_size=on"]);
    }
    args.extend([s(raw), s(&path)]);
    run("qemu-img", &args).await;
    path
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).expect("read dir").map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Every value of `progress` its watcher saw, until the sender is dropped.
fn record(progress: &watch::Sender<f32>) -> tokio::task::JoinHandle<Vec<f32>> {
    let mut rx = progress.subscribe();
    tokio::spawn(async move {
        let mut seen = vec![*rx.borrow_and_update()];
        while rx.changed().await.is_ok() {
            seen.push(*rx.borrow_and_update());
        }
        seen
    })
}

async fn convert_now(job: &ConvertJob) -> Result<ConvertOutcome, ConvertError> {
    convert(job, &watch::channel(0.0).0, &CancellationToken::new()).await
}

#[tokio::test]
async fn every_input_format_becomes_an_identical_qcow2() {
    let (_tmp, src, out) = dirs();
    let original = raw_disk(&src, "original.img", 32).await;
    let formats = [DiskFormat::Vpc, DiskFormat::Vmdk, DiskFormat::Vhdx, DiskFormat::Vdi, DiskFormat::Raw, DiskFormat::Qcow2];
    for (i, format) in formats.into_iter().enumerate() {
        let source = image_as(&original, format).await;
        let target = out.join(format!("{}.qcow2", format.qemu_name()));
        let mut job = ConvertJob::new(&source, &target);
        // Half declare their format (the .vhd by that name), half leave it to the probe.
        if i % 2 == 0 {
            let name = if format == DiskFormat::Vpc { "vhd" } else { format.qemu_name() };
            job.declared_format = Some(parse_format(name).expect("a supported name"));
        }
        let progress = watch::channel(0.0).0;
        let seen = record(&progress);
        let outcome = convert(&job, &progress, &CancellationToken::new()).await.unwrap_or_else(|e| panic!("{format:?}: {e}"));
        drop(progress);
        let seen = seen.await.expect("recorder");

        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{format:?}: progress went back: {seen:?}");
        assert_eq!(seen.last(), Some(&100.0), "{format:?}: {seen:?}");
        assert_eq!(outcome.source.format, format);
        assert_eq!(outcome.source.virtual_size, 32 * MIB);
        assert!(compare(&original, &target).await.expect("compare"), "{format:?}: the qcow2 differs from the original");
        assert_eq!(probe(&target).await.expect("probe output").format, DiskFormat::Qcow2);
        assert_eq!(outcome.bytes_written, std::fs::metadata(&target).expect("target").len());
        assert!(outcome.bytes_written <= required_space_estimate(&outcome.source));
    }
    let expected: Vec<String> = ["qcow2", "raw", "vdi", "vhdx", "vmdk", "vpc"].iter().map(|f| format!("{f}.qcow2")).collect();
    assert_eq!(names(&out), expected, "exactly the outputs, no partial file");
}

#[tokio::test]
async fn compare_tells_different_disks_apart() {
    let (_tmp, src, _out) = dirs();
    let a = raw_disk(&src, "a.img", 4).await;
    let same = image_as(&a, DiskFormat::Qcow2).await;
    let other = image_as(&a, DiskFormat::Vdi).await;
    run("qemu-io", &["-f", "vdi", "-c", "write -P 0x01 2M 512", s(&other)]).await;

    assert!(compare(&a, &same).await.expect("compare"));
    assert!(!compare(&a, &other).await.expect("compare"));
    let err = compare(&a, &src.join("missing.qcow2")).await.expect_err("a missing file");
    assert!(matches!(err, ConvertError::QemuImg { op: "info", .. }), "{err}");
    assert!(err.to_string().contains("missing.qcow2"), "{err}");
}

#[tokio::test]
async fn corrupt_sources_fail_with_qemu_img_s_reason_and_leave_nothing() {
    let (_tmp, src, out) = dirs();
    let original = raw_disk(&src, "original.img", 16).await;
    let qcow2 = std::fs::read(image_as(&original, DiskFormat::Qcow2).await).expect("read qcow2");

    // The first L1 entry pointed at a data cluster: the header probes fine, reading the data fails.
    let be = |at: usize| u64::from_be_bytes(qcow2[at..at + 8].try_into().expect("8 bytes"));
    const OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
    let l1 = be(40) as usize;
    let data = be((be(l1) & OFFSET) as usize) & OFFSET;
    let mut bad_l1 = qcow2.clone();
    bad_l1[l1..l1 + 8].copy_from_slice(&(data | 1 << 63).to_be_bytes());
    std::fs::write(src.join("bad-l1.qcow2"), &bad_l1).expect("write");
    let err = convert_now(&ConvertJob::new(src.join("bad-l1.qcow2"), out.join("a.qcow2"))).await.expect_err("corrupt L1");
    assert!(matches!(err, ConvertError::QemuImg { op: "convert", .. }), "{err}");
    assert!(err.to_string().contains("Image is corrupt"), "qemu-img's stderr is carried: {err}");
    assert!(names(&out).is_empty(), "{:?}", names(&out));

    // A garbled header: qemu-img now sees raw data, contradicting the declared qcow2.
    let mut garbled = qcow2.clone();
    garbled[..512].fill(0x5a);
    std::fs::write(src.join("garbled.qcow2"), &garbled).expect("write");
    let mut job = ConvertJob::new(src.join("garbled.qcow2"), out.join("b.qcow2"));
    job.declared_format = Some(DiskFormat::Qcow2);
    let err = convert_now(&job).await.expect_err("garbled header");
    assert!(matches!(&err, ConvertError::FormatMismatch { detected, .. } if detected == "raw"), "{err}");

    // A vmdk whose header is garbage after its magic: the probe itself fails, with the reason.
    let mut vmdk = std::fs::read(image_as(&original, DiskFormat::Vmdk).await).expect("read vmdk");
    vmdk[4..512].fill(0x5a);
    std::fs::write(src.join("garbled.vmdk"), &vmdk).expect("write");
    let err = convert_now(&ConvertJob::new(src.join("garbled.vmdk"), out.join("c.qcow2"))).await.expect_err("garbled vmdk");
    assert!(matches!(err, ConvertError::QemuImg { op: "info", .. }), "{err}");
    assert!(err.to_string().contains("Unsupported VMDK version"), "{err}");
    assert!(names(&out).is_empty(), "{:?}", names(&out));
}

/// A tmpfs mounted on a directory for the test's life; unmounted (lazily if busy) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs on {} (the tests need root): {status}", dir.display());
        Self(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = std::process::Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(&self.0).status().is_ok_and(|s| s.success())
        };
        if !umount(false) {
            umount(true);
        }
    }
}

#[tokio::test]
async fn a_full_target_reports_no_space_and_leaves_nothing() {
    let (tmp, src, _out) = dirs();
    let small = tmp.path().join("small");
    std::fs::create_dir(&small).expect("mount point");
    // Declared after `tmp`, so it is unmounted before the directory is removed.
    let _mount = Tmpfs::mount(&small, "4m");
    let source = src.join("full.img");
    run("qemu-img", &["create", "-q", "-f", "raw", s(&source), "16M"]).await;
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x6b 0 16M", s(&source)]).await;

    let err = convert_now(&ConvertJob::new(&source, small.join("out.qcow2"))).await.expect_err("16 MiB into 4 MiB");
    assert!(matches!(err, ConvertError::NoSpace { .. }), "{err}");
    assert!(err.to_string().contains("No space left on device"), "{err}");
    assert!(names(&small).is_empty(), "{:?}", names(&small));
}

/// The pid of a qemu-img process with an argument inside `dir`.
fn qemu_img_in(dir: &Path) -> Option<u32> {
    let dir = dir.as_os_str().as_bytes();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let mut args = cmdline.split(|b| *b == 0);
        let is_qemu_img = args.next()?.ends_with(b"qemu-img");
        (is_qemu_img && args.any(|a| a.starts_with(dir))).then_some(pid)
    })
}

/// A 512 MiB vdi and a job converting it the slowest way (one coroutine, in-order writes), so
/// that stopping it lands mid-way.
async fn slow_job(src: &Path, out: &Path) -> ConvertJob {
    // Written in 32 MiB requests: one huge request is several times slower.
    let source = src.join("big.vdi");
    run("qemu-img", &["create", "-q", "-f", "vdi", s(&source), "512M"]).await;
    let writes: Vec<String> = (0..16).map(|i| format!("write -P {} {}M 32M", 0x40 + i, 32 * i)).collect();
    let mut args = vec!["-f", "vdi"];
    for w in &writes {
        args.extend(["-c", w.as_str()]);
    }
    args.push(s(&source));
    run("qemu-io", &args).await;
    ConvertJob { coroutines: Some(1), ..ConvertJob::new(&source, out.join("big.qcow2")) }
}

/// Waits (with a deadline) until `rx` shows a conversion under way, then returns the pid of its
/// qemu-img, found by the target directory `out` on its command line.
async fn under_way(rx: &mut watch::Receiver<f32>, out: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let changed = tokio::time::timeout_at(deadline, rx.changed()).await.expect("no progress within 60 s");
        changed.expect("convert ended before reporting progress");
        let p = *rx.borrow_and_update();
        assert!(p < 100.0, "the conversion finished before it could be stopped");
        if p > 0.0 {
            return qemu_img_in(out).expect("a qemu-img writing into the target directory");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_conversion_kills_qemu_img_and_removes_the_partial_file() {
    let (_tmp, src, out) = dirs();
    let job = slow_job(&src, &out).await;
    let (progress, mut rx) = watch::channel(0.0);
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let (job, cancel) = (job.clone(), cancel.clone());
        async move { convert(&job, &progress, &cancel).await }
    });
    let pid = under_way(&mut rx, &out).await;
    cancel.cancel();
    let result = tokio::time::timeout(Duration::from_secs(30), task).await.expect("convert returns after cancel").expect("task");

    assert!(matches!(result, Err(ConvertError::Cancelled { .. })), "{result:?}");
    // `convert` reaps qemu-img before it returns: no deadline needed.
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "qemu-img {pid} outlived the cancel");
    assert_eq!(qemu_img_in(&out), None);
    assert!(names(&out).is_empty(), "{:?}", names(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_conversion_mid_way_kills_qemu_img_and_removes_the_partial_file() {
    let (_tmp, src, out) = dirs();
    let job = slow_job(&src, &out).await;
    let (progress, mut rx) = watch::channel(0.0);
    let task = tokio::spawn(async move { convert(&job, &progress, &CancellationToken::new()).await });
    let pid = under_way(&mut rx, &out).await;
    task.abort();
    assert!(task.await.expect_err("aborted").is_cancelled());

    // The partial file goes with the future; qemu-img is killed then, and reaped by tokio later.
    assert!(names(&out).is_empty(), "{:?}", names(&out));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the parenthesised command name; a zombie (Z) is dead too.
        let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
        if matches!(state, None | Some('Z')) {
            break;
        }
        assert!(Instant::now() < deadline, "qemu-img {pid} still running (state {state:?})");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_job_cancelled_before_it_starts_creates_nothing() {
    let (_tmp, src, out) = dirs();
    let source = raw_disk(&src, "a.img", 4).await;
    let cancel = CancellationToken::new();
    cancel.cancel();
    let result = convert(&ConvertJob::new(&source, out.join("a.qcow2")), &watch::channel(0.0).0, &cancel).await;
    assert!(matches!(result, Err(ConvertError::Cancelled { .. })), "{result:?}");
    assert!(names(&out).is_empty(), "{:?}", names(&out));
}

#[tokio::test]
async fn formats_outside_the_six_are_refused_by_name() {
    let (_tmp, src, out) = dirs();
    let err = parse_format("iso").expect_err("iso is no disk format here");
    assert!(err.to_string().contains("\"iso\""), "{err}");
    assert_eq!(parse_format("VHD").expect("vhd"), DiskFormat::Vpc);

    let hdd = src.join("disk.hdd");
    run("qemu-img", &["create", "-q", "-f", "parallels", s(&hdd), "16M"]).await;
    let err = probe(&hdd).await.expect_err("parallels");
    assert!(matches!(&err, ConvertError::UnsupportedFormat { format, .. } if format == "parallels"), "{err}");
    assert!(err.to_string().contains("\"parallels\""), "{err}");
    let err = convert_now(&ConvertJob::new(&hdd, out.join("a.qcow2"))).await.expect_err("parallels");
    assert!(matches!(err, ConvertError::UnsupportedFormat { .. }), "{err}");

    // A declared format that disagrees with the probe names both.
    let raw = raw_disk(&src, "a.img", 4).await;
    let job = ConvertJob { declared_format: Some(DiskFormat::Vmdk), ..ConvertJob::new(&raw, out.join("b.qcow2")) };
    let err = convert_now(&job).await.expect_err("raw declared as vmdk");
    assert!(err.to_string().contains("declared vmdk but qemu-img reads it as raw"), "{err}");
    assert!(names(&out).is_empty(), "{:?}", names(&out));
}

#[tokio::test]
async fn images_that_read_other_files_are_refused() {
    let (_tmp, src, out) = dirs();
    let secret = raw_disk(&src, "secret.img", 4).await;

    // A vmdk descriptor whose extent is another file of the host.
    let descriptor = src.join("flat.vmdk");
    let text = format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\
         RW 8192 FLAT \"{}\" 0\nddb.virtualHWVersion = \"4\"\n",
        secret.display()
    );
    std::fs::write(&descriptor, text).expect("write descriptor");
    let err = probe(&descriptor).await.expect_err("external extent");
    assert!(matches!(err, ConvertError::Unsafe { .. }), "{err}");
    assert!(err.to_string().contains(s(&secret)), "{err}");
    let err = convert_now(&ConvertJob::new(&descriptor, out.join("a.qcow2"))).await.expect_err("external extent");
    assert!(matches!(err, ConvertError::Unsafe { .. }), "{err}");

    // A qcow2 overlay on a backing file.
    let overlay = src.join("overlay.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", s(&secret), s(&overlay)]).await;
    let err = probe(&overlay).await.expect_err("backing file");
    assert!(err.to_string().contains("backing file"), "{err}");

    // A qcow2 whose data lives in an external file.
    let external = src.join("external.qcow2");
    let option = format!("data_file={}", src.join("data.raw").display());
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &option, s(&external), "4M"]).await;
    let err = probe(&external).await.expect_err("external data file");
    assert!(err.to_string().contains("external data file"), "{err}");
    assert!(names(&out).is_empty(), "{:?}", names(&out));
}

#[tokio::test]
async fn bad_jobs_are_refused_before_anything_runs() {
    let (_tmp, src, out) = dirs();
    let source = raw_disk(&src, "a.img", 4).await;
    for m in [0, 17] {
        let job = ConvertJob { coroutines: Some(m), ..ConvertJob::new(&source, out.join("a.qcow2")) };
        assert!(matches!(convert_now(&job).await, Err(ConvertError::InvalidJob(_))), "-m {m}");
    }
    let err = convert_now(&ConvertJob::new(&source, src.join("..").join("src").join("a.img"))).await.expect_err("onto itself");
    assert!(err.to_string().contains("is the source itself"), "{err}");
    assert!(matches!(convert_now(&ConvertJob::new(&source, out.join(".."))).await, Err(ConvertError::InvalidJob(_))));
    assert!(names(&out).is_empty(), "{:?}", names(&out));
    assert_eq!(names(&src), ["a.img"]);
}

#[tokio::test]
async fn the_space_estimate_is_qemu_s_fully_allocated_size_plus_margin() {
    for size in [0, 1, 64 * 1024 + 1, 32 * MIB, (1 << 30) + 12_345, 1 << 40, (16 << 40) - 512] {
        let measured = run("qemu-img", &["measure", "--output=json", "-O", "qcow2", "--size", &size.to_string()]).await;
        let measured: serde_json::Value = serde_json::from_str(&measured).expect("measure JSON");
        let fully = measured["fully-allocated"].as_u64().expect("fully-allocated");
        assert_eq!(qcow2_fully_allocated(size), fully, "virtual size {size}");
        let info = DiskInfo { format: DiskFormat::Raw, virtual_size: size, actual_size: 0 };
        assert_eq!(required_space_estimate(&info), fully + QCOW2_SLACK);
    }
}

#[tokio::test]
async fn progress_updates_split_across_reads_are_joined_and_never_go_back() {
    use tokio::io::AsyncWriteExt;
    // A 3-byte pipe: every update arrives in pieces.
    let (mut writer, reader) = tokio::io::duplex(3);
    let feed = tokio::spawn(async move {
        writer.write_all(b"    (10.00/100%)\r    (5.00/100%)\r not progress \r    (42.50/100%)").await.expect("write");
    });
    let progress = watch::channel(0.0).0;
    pump_progress(reader, &progress).await;
    feed.await.expect("feed");
    // The last update had no terminator: only complete ones count.
    assert_eq!(*progress.borrow(), 10.0);
}

#[test]
fn progress_lines_parse_as_qemu_img_prints_them() {
    // Captured from `qemu-img convert -p` 10.0.2 writing to a pipe.
    let printed = "    (0.00/100%)\r    (20.00/100%)\r    (60.00/100%)\r    (100.00/100%)\r\n";
    let parsed: Vec<f32> = printed.split(['\r', '\n']).filter_map(parse_progress).collect();
    assert_eq!(parsed, [0.0, 20.0, 60.0, 100.0]);
    assert_eq!(parse_progress("  (12.34/100%)"), Some(12.34));
    for not_progress in ["", "(12.34/100)", "12.34/100%)", "(abc/100%)", "(NaN/100%)"] {
        assert_eq!(parse_progress(not_progress), None, "{not_progress:?}");
    }
}

#[test]
fn error_messages_keep_qemu_img_s_last_lines() {
    // Six non-empty lines: the first is dropped, blank lines do not count, each is trimmed.
    let stderr = "a\n\n  b  \nc\nd\ne\nqemu-img: error while writing at byte 0: No space left on device\n";
    assert_eq!(stderr_tail(stderr), "b / c / d / e / qemu-img: error while writing at byte 0: No space left on device");
    assert_eq!(stderr_tail(" \n"), "(no message)");
    assert_eq!(path_arg(Path::new("json:{}")), Path::new("./json:{}"));
    assert_eq!(path_arg(Path::new("/a/b")), Path::new("/a/b"));
}
