//! The desktop driver: a light backend in which a "VM" is a real desktop made of processes on
//! the node (vmcloud's own use: a browser reached over VNC). Each desktop is an `Xvfb` display,
//! `x11vnc` serving it, and, once prepared for a batch, a browser in kiosk mode at the batch's
//! home page with a fresh profile.
//!
//! - create reserves a display (`:100`…) and a VNC port (`5950`…); start runs Xvfb and x11vnc;
//!   a ping is good once the port answers with the RFB banner.
//! - prepare wipes the profile, gives x11vnc a new password (restarting it, which also drops
//!   any client of the previous batch) and starts the browser.
//! - There are no disk snapshots. The pool's clean-up is a revert to `CLEAN_SNAPSHOT`, taken
//!   after boot: for a desktop, that state is "no browser, no profile", so the revert is the
//!   clean-up (kill the browser, wipe the profile, rotate the password). Other snapshot names
//!   are `Unsupported`.
//! - suspend and resume are SIGSTOP and SIGCONT to every process group of the desktop.
//!
//! State lives in `<root>/<domain>/`: the processes' logs, a `pids` file and the browser's
//! profile (which is also its HOME, so everything the browser writes is wiped with it). The
//! processes are children of the agent and do not outlive a restart usefully (the password is
//! only in memory): a new driver kills those its pid files name and forgets the desktops, and
//! the hive replaces them like VMs a host lost.

mod proc;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rand::Rng;
use tokio::process::Command;

use self::proc::Proc;
use super::{CLEAN_SNAPSHOT, Console, DriverError, GuestStatus, Hypervisor, PrepareSpec, VmSpec, VmStats};

#[derive(Clone, Debug)]
pub struct DesktopConfig {
    /// Per-desktop state (logs, pid files, browser profiles).
    pub root: PathBuf,
    /// X display numbers to use.
    pub displays: std::ops::Range<u32>,
    /// VNC ports to use.
    pub vnc_ports: std::ops::Range<u16>,
    /// Where x11vnc listens.
    pub vnc_listen: String,
    /// The browser to run (Chromium or a compatible one: it is given Chromium's flags).
    pub browser: String,
    /// Xvfb's screen, `<width>x<height>x<depth>`.
    pub geometry: String,
    /// How long Xvfb and x11vnc may take to come up, and the browser to go down.
    pub timeout: Duration,
}

impl Default for DesktopConfig {
    fn default() -> Self {
        DesktopConfig {
            root: PathBuf::from("/var/lib/guaca-hive/desktops"),
            displays: 100..200,
            vnc_ports: 5950..6050,
            vnc_listen: "127.0.0.1".into(),
            browser: "chromium".into(),
            geometry: "1280x800x24".into(),
            timeout: Duration::from_secs(15),
        }
    }
}

/// One desktop: what create reserved, and what runs.
struct Entry {
    display: u32,
    port: u16,
    dir: PathBuf,
    live: tokio::sync::Mutex<Live>,
}

#[derive(Default)]
struct Live {
    xvfb: Option<Proc>,
    vnc: Option<Proc>,
    browser: Option<Proc>,
    password: String,
    paused: bool,
    /// `CLEAN_SNAPSHOT` was taken (the pool takes it once the desktop first answers).
    clean: bool,
}

impl Live {
    fn procs(&self) -> impl Iterator<Item = &Proc> {
        [&self.xvfb, &self.vnc, &self.browser].into_iter().flatten()
    }
}

pub struct DesktopHypervisor {
    cfg: DesktopConfig,
    /// Width and height of the screen (the browser's window is made this size).
    size: (u32, u32),
    desktops: Mutex<BTreeMap<String, Arc<Entry>>>,
    next: AtomicU64,
}

impl DesktopHypervisor {
    /// A driver keeping its state under `cfg.root`. Desktops of an earlier run found there are
    /// killed and forgotten.
    pub async fn new(cfg: DesktopConfig) -> Result<DesktopHypervisor, DriverError> {
        let dims: Vec<u32> = cfg.geometry.split('x').filter_map(|d| d.parse().ok()).collect();
        let [w, h, depth] = dims[..] else {
            return Err(DriverError::Failed(format!("desktop geometry {:?}: expected <width>x<height>x<depth>", cfg.geometry)));
        };
        if w == 0 || h == 0 || ![8, 16, 24, 32].contains(&depth) || cfg.displays.is_empty() || cfg.vnc_ports.is_empty() {
            return Err(DriverError::Failed(format!("desktop config: bad geometry, displays or ports: {cfg:?}")));
        }
        {
            use std::os::unix::fs::DirBuilderExt;
            // Profiles hold whatever the users typed: only the agent's user may read them.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&cfg.root)
                .map_err(|e| DriverError::Failed(format!("creating {}: {e}", cfg.root.display())))?;
        }
        let next = forget_earlier_run(&cfg.root).await + 1;
        Ok(DesktopHypervisor { size: (w, h), cfg, desktops: Mutex::new(BTreeMap::new()), next: AtomicU64::new(next) })
    }

    fn entry(&self, domain: &str) -> Result<Arc<Entry>, DriverError> {
        self.desktops.lock().get(domain).cloned().ok_or_else(|| DriverError::NotFound(domain.to_string()))
    }

    fn display(e: &Entry) -> String {
        format!(":{}", e.display)
    }

    async fn start_xvfb(&self, e: &Entry, live: &mut Live) -> Result<(), DriverError> {
        let mut cmd = Command::new("Xvfb");
        // -noreset: the server would otherwise reset whenever its last client leaves, as
        // x11vnc does for a moment when it is restarted with a new password.
        cmd.arg(Self::display(e)).args(["-screen", "0", &self.cfg.geometry, "-nolisten", "tcp", "-noreset"]);
        let mut xvfb = Proc::spawn("Xvfb", cmd, &[], &e.dir.join("xvfb.log"))?;
        let socket = PathBuf::from(format!("/tmp/.X11-unix/X{}", e.display));
        let deadline = tokio::time::Instant::now() + self.cfg.timeout;
        // Connecting, not just seeing the socket: one left by a killed server may be there.
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(why) = xvfb.exited() {
                return Err(DriverError::Failed(format!("{why}: {}", proc::tail(&e.dir.join("xvfb.log")))));
            }
            if tokio::time::Instant::now() >= deadline {
                xvfb.stop(Duration::from_secs(1)).await;
                return Err(DriverError::Failed(format!("Xvfb does not answer on {} within {:?}", socket.display(), self.cfg.timeout)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        live.xvfb = Some(xvfb);
        Ok(())
    }

    /// (Re)start x11vnc with a new password. With `wait`, return once it answers.
    async fn start_vnc(&self, e: &Entry, live: &mut Live, wait: bool) -> Result<(), DriverError> {
        if let Some(old) = live.vnc.take() {
            old.stop(self.cfg.timeout).await;
        }
        live.password = new_password();
        // The password goes through a file (a command line is visible in ps), which x11vnc
        // removes once it has read it (`rm:`); only the first 8 characters count in VNC auth.
        let file = e.dir.join("vnc-password");
        write_private(&file, format!("{}\n", live.password).as_bytes())?;
        let mut cmd = Command::new("x11vnc");
        cmd.args(["-display", &Self::display(e), "-rfbport", &e.port.to_string(), "-listen", &self.cfg.vnc_listen])
            .arg("-passwdfile")
            .arg(format!("rm:{}", file.display()))
            .args(["-forever", "-shared", "-noxdamage", "-quiet", "-norc", "-noipv6"]);
        live.vnc = Some(Proc::spawn("x11vnc", cmd, &[], &e.dir.join("x11vnc.log"))?);
        if !wait {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.cfg.timeout;
        loop {
            if let Some(why) = live.vnc.as_mut().and_then(|p| p.exited()) {
                return Err(DriverError::Failed(format!("{why}: {}", proc::tail(&e.dir.join("x11vnc.log")))));
            }
            match proc::rfb_banner(proc::connect_host(&self.cfg.vnc_listen), e.port).await {
                Ok(_) => return Ok(()),
                Err(why) if tokio::time::Instant::now() >= deadline => {
                    return Err(DriverError::Failed(format!("x11vnc does not answer on port {}: {why}", e.port)));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Kill the browser and wipe its profile.
    async fn drop_browser(&self, e: &Entry, live: &mut Live) -> Result<(), DriverError> {
        if let Some(b) = live.browser.take() {
            b.stop(self.cfg.timeout).await;
        }
        let profile = e.dir.join("profile");
        // Anything still holding the profile left the browser's process group on its own.
        proc::kill_all(|| proc::mentioning(&profile)).await;
        match tokio::fs::remove_dir_all(&profile).await {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(DriverError::Failed(format!("wiping {}: {err}", profile.display()))),
        }
    }

    async fn stop_all(&self, e: &Entry, live: &mut Live) -> Result<(), DriverError> {
        // Everything is stopped even if the profile cannot be wiped.
        let wiped = self.drop_browser(e, live).await;
        for p in [live.vnc.take(), live.xvfb.take()].into_iter().flatten() {
            p.stop(self.cfg.timeout).await;
        }
        live.paused = false;
        save_pids(e, live);
        wiped
    }

    fn signal(live: &Live, sig: i32) {
        for p in live.procs() {
            p.signal_group(sig);
        }
    }

    /// A desktop whose X server and VNC server run, continued if it was suspended.
    fn require_running(domain: &str, live: &mut Live) -> Result<(), DriverError> {
        if live.xvfb.is_none() || live.vnc.is_none() {
            return Err(DriverError::Failed(format!("{domain} is not running")));
        }
        if live.paused {
            Self::signal(live, libc::SIGCONT);
            live.paused = false;
        }
        Ok(())
    }

    /// The clean-up: no browser, no profile, a new password (old clients are cut off).
    async fn clean_up(&self, e: &Entry, live: &mut Live) -> Result<(), DriverError> {
        self.drop_browser(e, live).await?;
        let r = self.start_vnc(e, live, true).await;
        save_pids(e, live);
        r
    }
}

#[async_trait]
impl Hypervisor for DesktopHypervisor {
    fn kind(&self) -> &'static str {
        "desktop"
    }

    async fn create(&self, spec: &VmSpec) -> Result<String, DriverError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // The spec's name leads (pool VMs `<pool>-<id>`), as with the other drivers; it is
        // also a directory name, so only a few characters are kept as they are.
        let safe: String = spec.name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
        let name = if safe.is_empty() { format!("desktop-{n}") } else { format!("{}~desktop-{n}", safe.trim_start_matches('.')) };
        let mut desktops = self.desktops.lock();
        let xdisplay = self
            .cfg
            .displays
            .clone()
            .find(|d| !desktops.values().any(|e| e.display == *d) && !proc::display_taken(*d))
            .ok_or_else(|| DriverError::Failed(format!("no free X display in {:?}", self.cfg.displays)))?;
        let port = self
            .cfg
            .vnc_ports
            .clone()
            .find(|p| !desktops.values().any(|e| e.port == *p) && port_free(&self.cfg.vnc_listen, *p))
            .ok_or_else(|| DriverError::Failed(format!("no free VNC port in {:?}", self.cfg.vnc_ports)))?;
        let dir = self.cfg.root.join(&name);
        std::fs::create_dir_all(&dir).map_err(|e| DriverError::Failed(format!("creating {}: {e}", dir.display())))?;
        let live = Live { password: new_password(), ..Live::default() };
        desktops.insert(name.clone(), Arc::new(Entry { display: xdisplay, port, dir, live: tokio::sync::Mutex::new(live) }));
        tracing::info!(domain = %name, display = xdisplay, port, "desktop defined");
        Ok(name)
    }

    async fn start(&self, domain: &str) -> Result<(), DriverError> {
        let e = self.entry(domain)?;
        let mut live = e.live.lock().await;
        if live.xvfb.is_some() {
            return Self::require_running(domain, &mut live);
        }
        let r = async {
            self.start_xvfb(&e, &mut live).await?;
            // Not waited for: the boot's pings tell when the VNC port answers.
            self.start_vnc(&e, &mut live, false).await
        }
        .await;
        if r.is_err() {
            self.stop_all(&e, &mut live).await?;
        }
        save_pids(&e, &live);
        r
    }

    async fn stop(&self, domain: &str) -> Result<(), DriverError> {
        let e = self.entry(domain)?;
        let mut live = e.live.lock().await;
        self.stop_all(&e, &mut live).await
    }

    async fn suspend(&self, domain: &str) -> Result<(), DriverError> {
        let e = self.entry(domain)?;
        let mut live = e.live.lock().await;
        if live.xvfb.is_none() {
            return Err(DriverError::Failed(format!("{domain} is not running")));
        }
        Self::signal(&live, libc::SIGSTOP);
        live.paused = true;
        Ok(())
    }

    async fn resume(&self, domain: &str) -> Result<(), DriverError> {
        let e = self.entry(domain)?;
        let mut live = e.live.lock().await;
        Self::require_running(domain, &mut live)
    }

    async fn snapshot(&self, domain: &str, name: &str) -> Result<(), DriverError> {
        let e = self.entry(domain)?;
        if name != CLEAN_SNAPSHOT {
            return Err(unsupported_snapshot(name));
        }
        e.live.lock().await.clean = true;
        Ok(())
    }

    async fn revert(&self, domain: &str, name: &str) -> Result<(), DriverError> {
        let e = self.entry(domain)?;
        if name != CLEAN_SNAPSHOT {
            return Err(unsupported_snapshot(name));
        }
        let mut live = e.live.lock().await;
        if !live.clean {
            return Err(DriverError::NotFound(format!("snapshot {name} of {domain}")));
        }
        Self::require_running(domain, &mut live)?;
        self.clean_up(&e, &mut live).await
    }

    async fn delete_snapshot(&self, domain: &str, name: &str) -> Result<(), DriverError> {
        let e = self.entry(domain)?;
        let mut live = e.live.lock().await;
        if name != CLEAN_SNAPSHOT || !live.clean {
            return Err(DriverError::NotFound(format!("snapshot {name} of {domain}")));
        }
        live.clean = false;
        Ok(())
    }

    async fn destroy(&self, domain: &str) -> Result<(), DriverError> {
        let Ok(e) = self.entry(domain) else { return Ok(()) };
        let mut live = e.live.lock().await;
        self.stop_all(&e, &mut live).await?;
        match tokio::fs::remove_dir_all(&e.dir).await {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                return Err(DriverError::Failed(format!("removing {}: {err}", e.dir.display())));
            }
            _ => {}
        }
        self.desktops.lock().remove(domain);
        Ok(())
    }

    async fn console(&self, domain: &str) -> Result<Console, DriverError> {
        let e = self.entry(domain)?;
        let password = e.live.lock().await.password.clone();
        Ok(Console { host: self.cfg.vnc_listen.clone(), port: e.port, password })
    }

    async fn ping(&self, domain: &str) -> Result<GuestStatus, DriverError> {
        let e = self.entry(domain)?;
        {
            let mut live = e.live.lock().await;
            if live.xvfb.is_none() || live.vnc.is_none() {
                return Err(DriverError::Failed(format!("{domain} is not running")));
            }
            if live.paused {
                return Err(DriverError::NotReady);
            }
            // A desktop whose browser died shows the user nothing: it is as broken as one
            // whose X or VNC server died.
            let live = &mut *live;
            for p in [&mut live.xvfb, &mut live.vnc, &mut live.browser].into_iter().flatten() {
                if let Some(why) = p.exited() {
                    let log = e.dir.join(format!("{}.log", p.what.to_ascii_lowercase()));
                    return Err(DriverError::Failed(format!("{why}: {}", proc::tail(&log))));
                }
            }
        }
        match proc::rfb_banner(proc::connect_host(&self.cfg.vnc_listen), e.port).await {
            Ok(_) => {
                let ip = match self.cfg.vnc_listen.as_str() {
                    "0.0.0.0" | "::" | "[::]" => String::new(),
                    a => a.to_string(),
                };
                Ok(GuestStatus { ip })
            }
            Err(_) => Err(DriverError::NotReady),
        }
    }

    async fn prepare(&self, domain: &str, spec: &PrepareSpec) -> Result<(), DriverError> {
        let url = reqwest::Url::parse(spec.home_page.trim())
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty()))
            .ok_or_else(|| DriverError::Failed(format!("the home page must be an http(s) URL, not {:?}", spec.home_page)))?;
        let e = self.entry(domain)?;
        let mut live = e.live.lock().await;
        Self::require_running(domain, &mut live)?;
        self.clean_up(&e, &mut live).await?;
        let profile = e.dir.join("profile");
        std::fs::create_dir_all(&profile).map_err(|err| DriverError::Failed(format!("creating {}: {err}", profile.display())))?;
        let (w, h) = self.size;
        let mut cmd = Command::new(&self.cfg.browser);
        cmd.current_dir(&profile)
            .args(["--kiosk", "--no-first-run", "--no-default-browser-check", "--disable-gpu"])
            .arg(format!("--user-data-dir={}", profile.display()))
            // No window manager runs to make the kiosk window fill the screen.
            .args(["--window-position=0,0", &format!("--window-size={w},{h}")])
            // Chromium's crash handler daemonises out of the process group (it is found by its
            // profile path at clean-up). --disable-crashpad-for-testing would keep it from
            // starting, but then Chromium's network service crashes on an FD ownership check.
            .args(["--noerrdialogs", "--disable-session-crashed-bubble", "--password-store=basic"]);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Chromium refuses to run as root with its sandbox on. An agent run as root (as in
            // CI) runs the browser without it; run the agent as a plain user to keep it.
            cmd.arg("--no-sandbox");
        }
        cmd.arg(url.as_str());
        let (display, home) = (Self::display(&e), profile.to_string_lossy().into_owned());
        let env = [("DISPLAY", display.as_str()), ("HOME", home.as_str()), ("LANG", "C.UTF-8")];
        live.browser = Some(Proc::spawn("browser", cmd, &env, &e.dir.join("browser.log"))?);
        save_pids(&e, &live);
        tracing::info!(domain, profile = %spec.profile_name, home_page = %url, "desktop prepared");
        Ok(())
    }

    async fn stats(&self, domain: &str) -> Result<VmStats, DriverError> {
        let e = self.entry(domain)?;
        let groups: Vec<i32> = e.live.lock().await.procs().map(|p| p.pid).collect();
        let (cpu_time_ns, memory_kb) = tokio::task::spawn_blocking(move || proc::usage(&groups))
            .await
            .map_err(|err| DriverError::Failed(format!("stats task: {err}")))?;
        Ok(VmStats { cpu_time_ns, memory_kb })
    }

    async fn list(&self) -> Result<Vec<String>, DriverError> {
        Ok(self.desktops.lock().keys().cloned().collect())
    }
}

fn unsupported_snapshot(name: &str) -> DriverError {
    DriverError::Unsupported(format!("snapshot {name:?} (a desktop has only {CLEAN_SNAPSHOT:?}: no browser, no profile)"))
}

fn new_password() -> String {
    rand::rng().sample_iter(&rand::distr::Alphanumeric).take(8).map(char::from).collect()
}

fn port_free(listen: &str, port: u16) -> bool {
    std::net::TcpListener::bind((proc::connect_host(listen).trim_matches(['[', ']']), port)).is_ok()
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DriverError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| DriverError::Failed(format!("writing {}: {e}", path.display())))
}

/// `<dir>/pids`: the leaders of the desktop's process groups with their start times, which
/// is what the next run of the driver needs to kill them safely.
fn save_pids(e: &Entry, live: &Live) {
    let text: String = live.procs().map(|p| format!("{} {} {}\n", p.pid, p.started, p.what)).collect();
    if let Err(err) = std::fs::write(e.dir.join("pids"), text) {
        tracing::warn!(dir = %e.dir.display(), error = %err, "desktop: cannot write the pid file");
    }
}

/// Kill the processes that an earlier run's pid files name and remove its desktops. Answers
/// the highest desktop number seen, so that names are not reused.
async fn forget_earlier_run(root: &Path) -> u64 {
    let Ok(dirs) = std::fs::read_dir(root) else { return 0 };
    let mut highest = 0;
    for dir in dirs.filter_map(|d| d.ok()).map(|d| d.path()).filter(|p| p.is_dir()) {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        highest = highest.max(name.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(0));
        let pids = std::fs::read_to_string(dir.join("pids")).unwrap_or_default();
        let mut killed = Vec::new();
        for line in pids.lines() {
            let mut f = line.split_whitespace();
            if let (Some(Ok(pid)), Some(Ok(started))) = (f.next().map(str::parse::<i32>), f.next().map(str::parse::<u64>)) {
                if proc::kill_recorded(pid, started) {
                    killed.push(pid);
                }
            }
        }
        proc::kill_all(|| proc::in_groups(&killed)).await;
        proc::kill_all(|| proc::mentioning(&dir)).await;
        tracing::info!(desktop = %name, killed = killed.len(), "desktop of an earlier run killed and forgotten");
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
            tracing::warn!(dir = %dir.display(), error = %e, "desktop: cannot remove the state of an earlier run");
        }
    }
    highest
}
