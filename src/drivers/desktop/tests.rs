//! Real desktops: Xvfb, x11vnc and Chromium (scripts/test-deps.sh installs them), a page
//! served by the test, and a VNC client that logs in with the driver's password and reads
//! the framebuffer. Every test has its own displays and ports, so they run side by side.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warp::Filter;

use super::*;

fn config(root: &Path, display: u32, port: u16) -> DesktopConfig {
    DesktopConfig { root: root.to_path_buf(), displays: display..display + 4, vnc_ports: port..port + 4, ..DesktopConfig::default() }
}

fn spec(name: &str) -> VmSpec {
    VmSpec { name: name.into(), template: "desktop".into(), cores: 1, ram_mb: 1024, disk_mb: 0 }
}

async fn until<T, Fut: Future<Output = Option<T>>>(what: &str, within: Duration, mut f: impl FnMut() -> Fut) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval, bounded by the deadline
    }
}

fn alive(pid: i32) -> bool {
    proc::stat(pid).is_some_and(|s| s.state != 'Z')
}

async fn ready(hv: &DesktopHypervisor, d: &str) {
    until("the desktop answers pings", Duration::from_secs(30), || async { hv.ping(d).await.ok() }).await;
}

/// The page's background, which Chromium paints as it is.
const PAGE: [u8; 3] = [0x20, 0xa0, 0x60];

/// A page in one colour; answers how many times it was fetched.
async fn serve_page() -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let route = warp::path::end().map(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        warp::reply::html("<!doctype html><html><body style=\"margin:0;background:#20a060\"></body></html>")
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    (url, hits, tokio::spawn(warp::serve(route).incoming(listener).run()))
}

/// A VNC client: RFB 3.8, VNC authentication, raw 32-bit true colour.
struct Rfb {
    s: TcpStream,
    w: usize,
    h: usize,
}

impl Rfb {
    /// Log in; `Err` carries the server's reason for refusing.
    async fn login(port: u16, password: &str) -> Result<Rfb, String> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
        let mut banner = [0u8; 12];
        s.read_exact(&mut banner).await.map_err(|e| e.to_string())?;
        assert_eq!(&banner, b"RFB 003.008\n");
        s.write_all(b"RFB 003.008\n").await.unwrap();
        let n = s.read_u8().await.unwrap() as usize;
        let mut types = vec![0u8; n];
        s.read_exact(&mut types).await.unwrap();
        assert!(types.contains(&2), "VNC authentication offered: {types:?}");
        s.write_all(&[2]).await.unwrap();
        let mut challenge = [0u8; 16];
        s.read_exact(&mut challenge).await.unwrap();
        s.write_all(&vnc_response(password, challenge)).await.unwrap();
        if s.read_u32().await.unwrap() != 0 {
            let len = s.read_u32().await.unwrap() as usize;
            let mut reason = vec![0u8; len];
            s.read_exact(&mut reason).await.unwrap();
            return Err(String::from_utf8_lossy(&reason).into_owned());
        }
        s.write_all(&[1]).await.unwrap(); // ClientInit: shared
        let (w, h) = (s.read_u16().await.unwrap() as usize, s.read_u16().await.unwrap() as usize);
        let mut rest = [0u8; 16];
        s.read_exact(&mut rest).await.unwrap();
        let mut name = vec![0u8; s.read_u32().await.unwrap() as usize];
        s.read_exact(&mut name).await.unwrap();
        // SetPixelFormat: 32 bpp, depth 24, little endian, true colour, red<<16 green<<8 blue.
        let mut fmt = vec![0u8, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0];
        fmt.extend_from_slice(&[2, 0, 0, 1, 0, 0, 0, 0]); // SetEncodings: Raw only
        s.write_all(&fmt).await.unwrap();
        Ok(Rfb { s, w, h })
    }

    /// The whole screen as RGB.
    async fn frame(&mut self) -> Vec<u8> {
        let (w, h) = (self.w, self.h);
        let mut req = vec![3u8, 0, 0, 0, 0, 0];
        req.extend_from_slice(&(w as u16).to_be_bytes());
        req.extend_from_slice(&(h as u16).to_be_bytes());
        self.s.write_all(&req).await.unwrap();
        let mut rgb = vec![0u8; w * h * 3];
        let mut covered = 0;
        while covered < w * h {
            match self.s.read_u8().await.unwrap() {
                0 => {
                    self.s.read_u8().await.unwrap();
                    for _ in 0..self.s.read_u16().await.unwrap() {
                        let mut r = [0u16; 4];
                        for v in &mut r {
                            *v = self.s.read_u16().await.unwrap();
                        }
                        assert_eq!(self.s.read_i32().await.unwrap(), 0, "raw encoding");
                        let [x, y, rw, rh] = r.map(usize::from);
                        let mut px = vec![0u8; rw * rh * 4];
                        self.s.read_exact(&mut px).await.unwrap();
                        for (i, p) in px.chunks(4).enumerate() {
                            let at = ((y + i / rw) * w + x + i % rw) * 3;
                            rgb[at..at + 3].copy_from_slice(&[p[2], p[1], p[0]]);
                        }
                        covered += rw * rh;
                    }
                }
                2 => {} // bell
                3 => {
                    let mut pad = [0u8; 3];
                    self.s.read_exact(&mut pad).await.unwrap();
                    let mut text = vec![0u8; self.s.read_u32().await.unwrap() as usize];
                    self.s.read_exact(&mut text).await.unwrap();
                }
                other => panic!("unexpected RFB message {other}"),
            }
        }
        rgb
    }
}

/// VNC authentication: the challenge encrypted with DES, keyed by the password with the bits
/// of each byte reversed.
fn vnc_response(password: &str, challenge: [u8; 16]) -> [u8; 16] {
    use des::cipher::{Block, BlockCipherEncrypt, KeyInit};
    let mut key = [0u8; 8];
    for (k, b) in key.iter_mut().zip(password.bytes()) {
        *k = b.reverse_bits();
    }
    let cipher = des::Des::new_from_slice(&key).unwrap();
    let mut out = challenge;
    for half in out.chunks_mut(8) {
        let mut block = Block::<des::Des>::try_from(&*half).unwrap();
        cipher.encrypt_block(&mut block);
        half.copy_from_slice(&block);
    }
    out
}

fn share_of(rgb: &[u8], colour: [u8; 3]) -> f64 {
    let near = rgb.chunks(3).filter(|p| p.iter().zip(colour).all(|(a, b)| a.abs_diff(b) <= 8)).count();
    near as f64 / (rgb.len() / 3) as f64
}

fn save_png(name: &str, w: usize, h: usize, rgb: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let mut enc = png::Encoder::new(std::fs::File::create(&path).unwrap(), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header().unwrap().write_image_data(rgb).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_desktop_shows_the_home_page_and_cleanup_leaves_nothing_of_the_batch() {
    let root = tempfile::tempdir().unwrap();
    let hv = DesktopHypervisor::new(config(root.path(), 160, 5960)).await.unwrap();
    let (home, hits, _server) = serve_page().await;
    let d = hv.create(&spec("kiosk-1")).await.unwrap();
    assert!(d.starts_with("kiosk-1~desktop-"), "{d}");
    let t = Instant::now();
    hv.start(&d).await.unwrap();
    ready(&hv, &d).await;
    let booted = t.elapsed();
    let c0 = hv.console(&d).await.unwrap();
    assert!(!root.path().join(&d).join("vnc-password").exists(), "x11vnc removed the password file once read");
    assert_eq!(proc::rfb_banner("127.0.0.1", c0.port).await.unwrap(), "RFB 003.008");
    hv.snapshot(&d, CLEAN_SNAPSHOT).await.unwrap();
    assert!(Rfb::login(c0.port, &c0.password).await.is_ok(), "the password the console names opens it");

    let t = Instant::now();
    hv.prepare(&d, &PrepareSpec { home_page: home.clone(), profile_name: "alice".into() }).await.unwrap();
    let prepared = t.elapsed();
    let c1 = hv.console(&d).await.unwrap();
    assert_eq!(c1.port, c0.port);
    assert_ne!(c1.password, c0.password, "prepare gives a new password");
    assert!(Rfb::login(c0.port, &c0.password).await.is_err(), "the password of before no longer opens it");
    let mut vnc = Rfb::login(c1.port, &c1.password).await.unwrap();
    assert_eq!((vnc.w, vnc.h), (1280, 800));
    // Chromium takes seconds to start under Xvfb on a small machine.
    let deadline = Instant::now() + Duration::from_secs(90);
    let (last, share) = loop {
        let frame = vnc.frame().await;
        let share = share_of(&frame, PAGE);
        if share > 0.9 {
            break (frame, share);
        }
        if Instant::now() >= deadline {
            let shot = save_png("desktop-not-painted.png", vnc.w, vnc.h, &frame);
            panic!("the home page never filled the screen ({:.0}%, see {})", share * 100.0, shot.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // poll interval, bounded by the deadline
    };
    let painted = t.elapsed();
    let shot = save_png("desktop-prepared.png", vnc.w, vnc.h, &last);
    assert!(hits.load(Ordering::SeqCst) >= 1, "the browser fetched the home page");
    let profile = root.path().join(&d).join("profile");
    assert!(profile.is_dir());
    let stats = hv.stats(&d).await.unwrap();
    assert!(stats.memory_kb > 50_000 && stats.cpu_time_ns > 0, "{stats:?}");
    let browser = hv.entry(&d).unwrap().live.lock().await.browser.as_ref().unwrap().pid;
    let batch: Vec<i32> = proc::in_groups(&[browser]).into_iter().chain(proc::mentioning(&profile)).collect();
    assert!(batch.len() > 1, "Chromium runs several processes: {batch:?}");
    drop(vnc);

    let t = Instant::now();
    hv.revert(&d, CLEAN_SNAPSHOT).await.unwrap();
    let cleaned = t.elapsed();
    assert!(batch.iter().all(|p| !alive(*p)), "the browser's processes are gone: {batch:?}");
    assert!(!profile.exists(), "the profile is wiped");
    let c2 = hv.console(&d).await.unwrap();
    assert_ne!(c2.password, c1.password, "clean-up gives a new password");
    let refused = Rfb::login(c2.port, &c1.password).await.err().expect("the batch's password no longer opens the desktop");
    let mut vnc = Rfb::login(c2.port, &c2.password).await.unwrap();
    let blank = vnc.frame().await;
    assert!(share_of(&blank, PAGE) < 0.01, "no page left on the screen");
    drop(vnc);
    ready(&hv, &d).await;

    let xvfb = hv.entry(&d).unwrap().live.lock().await.xvfb.as_ref().unwrap().pid;
    let vncd = hv.entry(&d).unwrap().live.lock().await.vnc.as_ref().unwrap().pid;
    assert!(alive(xvfb) && alive(vncd));
    hv.destroy(&d).await.unwrap();
    assert!(!alive(xvfb) && !alive(vncd), "X and VNC servers are gone");
    assert!(proc::mentioning(&root.path().join(&d)).is_empty(), "no process names the desktop's directory");
    assert!(TcpStream::connect(("127.0.0.1", c2.port)).await.is_err(), "the VNC port is closed");
    assert!(!root.path().join(&d).exists() && hv.list().await.unwrap().is_empty());
    assert!(matches!(hv.ping(&d).await, Err(DriverError::NotFound(_))));
    hv.destroy(&d).await.unwrap();
    eprintln!(
        "desktop: booted in {booted:?}, prepared in {prepared:?}, page painted after {painted:?} ({:.0}% of the screen), \
         cleaned in {cleaned:?}; {} MB (PSS) with the browser; old password refused: {refused:?}; screenshot {}",
        share * 100.0,
        stats.memory_kb / 1024,
        shot.display()
    );
}

#[tokio::test]
async fn errors_suspend_and_the_home_page_rules() {
    let root = tempfile::tempdir().unwrap();
    let hv = DesktopHypervisor::new(config(root.path(), 170, 5970)).await.unwrap();
    assert_eq!(hv.kind(), "desktop");
    let d = hv.create(&spec("p/../x y")).await.unwrap();
    assert!(d.starts_with("p_.._x_y~desktop-"), "no path separators in names: {d}");
    assert!(matches!(hv.ping(&d).await, Err(DriverError::Failed(_))), "not started");
    hv.start(&d).await.unwrap();
    ready(&hv, &d).await;
    for bad in ["file:///etc/passwd", "javascript:alert(1)", "about:blank", "--no-sandbox", "http://"] {
        let e = hv.prepare(&d, &PrepareSpec { home_page: bad.into(), profile_name: "p".into() }).await.unwrap_err();
        assert!(matches!(&e, DriverError::Failed(m) if m.contains("http(s)")), "{bad}: {e}");
    }
    assert!(hv.entry(&d).unwrap().live.lock().await.browser.is_none(), "nothing was started for a refused page");
    assert!(matches!(hv.snapshot(&d, "before-upgrade").await, Err(DriverError::Unsupported(_))));
    assert!(matches!(hv.revert(&d, "before-upgrade").await, Err(DriverError::Unsupported(_))));
    assert!(matches!(hv.revert(&d, CLEAN_SNAPSHOT).await, Err(DriverError::NotFound(_))), "not taken yet");
    hv.snapshot(&d, CLEAN_SNAPSHOT).await.unwrap();
    hv.delete_snapshot(&d, CLEAN_SNAPSHOT).await.unwrap();
    assert!(matches!(hv.delete_snapshot(&d, CLEAN_SNAPSHOT).await, Err(DriverError::NotFound(_))));

    hv.suspend(&d).await.unwrap();
    assert_eq!(hv.ping(&d).await, Err(DriverError::NotReady));
    let port = hv.console(&d).await.unwrap().port;
    assert!(proc::rfb_banner("127.0.0.1", port).await.is_err(), "a stopped x11vnc does not answer");
    hv.resume(&d).await.unwrap();
    ready(&hv, &d).await;

    hv.stop(&d).await.unwrap();
    assert!(matches!(hv.ping(&d).await, Err(DriverError::Failed(_))), "stopped");
    hv.start(&d).await.unwrap();
    ready(&hv, &d).await;
    hv.destroy(&d).await.unwrap();
    for r in [hv.start(&d).await, hv.stop(&d).await, hv.suspend(&d).await] {
        assert!(matches!(r, Err(DriverError::NotFound(_))), "{r:?}");
    }
    assert!(matches!(hv.console(&d).await, Err(DriverError::NotFound(_))));
    hv.destroy(&d).await.unwrap();
}

#[tokio::test]
async fn a_new_driver_kills_the_desktops_of_an_earlier_run() {
    let root = tempfile::tempdir().unwrap();
    let hv = DesktopHypervisor::new(config(root.path(), 180, 5980)).await.unwrap();
    let d = hv.create(&spec("old")).await.unwrap();
    hv.start(&d).await.unwrap();
    ready(&hv, &d).await;
    let pids: Vec<i32> = hv.entry(&d).unwrap().live.lock().await.procs().map(|p| p.pid).collect();
    assert_eq!(pids.len(), 2);
    // An agent that dies leaves its desktops running; here, a driver that is never dropped.
    std::mem::forget(hv);
    assert!(pids.iter().all(|p| alive(*p)));

    let hv = DesktopHypervisor::new(config(root.path(), 180, 5980)).await.unwrap();
    assert!(pids.iter().all(|p| !alive(*p)), "the earlier run's processes are killed");
    assert!(hv.list().await.unwrap().is_empty() && !root.path().join(&d).exists(), "and forgotten");
    let again = hv.create(&spec("old")).await.unwrap();
    assert_ne!(again, d, "names are not reused");
    hv.start(&again).await.unwrap();
    ready(&hv, &again).await;
    hv.destroy(&again).await.unwrap();
}
