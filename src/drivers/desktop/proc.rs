//! The processes of a desktop: each one is spawned as the leader of its own process group, so a
//! signal to the group reaches whatever it forked (Chromium's zygotes, renderers, GPU process).
//! `/proc` tells which processes are still in a group, what they use, and whether a pid from a
//! pid file is still the process that was started (its start time).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::super::DriverError;

/// A spawned process group leader. Dropped without `stop`, the whole group gets SIGKILL (a
/// driver dropped in a test or at shutdown leaves nothing behind); tokio reaps the leader.
pub(super) struct Proc {
    pub what: &'static str,
    pub pid: i32,
    pub started: u64,
    child: Child,
    reaped: bool,
}

impl Proc {
    /// Spawn `cmd` with a clean environment plus `env`, stdout and stderr appended to `log`.
    pub fn spawn(what: &'static str, mut cmd: Command, env: &[(&str, &str)], log: &Path) -> Result<Proc, DriverError> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| DriverError::Failed(format!("{what}: cannot open {}: {e}", log.display())))?;
        let err = out.try_clone().map_err(|e| DriverError::Failed(format!("{what}: {e}")))?;
        // A clean environment: the agent's own (its hive token among it) is none of the desktop's business.
        cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        let child = cmd.spawn().map_err(|e| DriverError::Failed(format!("cannot start {what}: {e}")))?;
        let pid = child.id().ok_or_else(|| DriverError::Failed(format!("{what} exited at once")))? as i32;
        Ok(Proc { what, pid, started: start_time(pid).unwrap_or(0), child, reaped: false })
    }

    /// Why the process is gone, if it is.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.reaped = true;
                Some(format!("{} exited ({status})", self.what))
            }
            Ok(None) => None,
            Err(e) => Some(format!("{}: {e}", self.what)),
        }
    }

    pub fn signal_group(&self, sig: i32) {
        // SAFETY: killpg has no memory-safety preconditions; the group is ours (the leader is
        // not reaped yet, so its id cannot have been reused).
        if !self.reaped {
            unsafe { libc::killpg(self.pid, sig) };
        }
    }

    /// SIGTERM to the leader, which lets Chromium take its children down and reap them itself;
    /// then, after `grace`, SIGKILL to the group. The leader is waited for (no zombie), and
    /// whatever of the group outlived it (reparented to init) is killed too.
    pub async fn stop(mut self, grace: Duration) {
        if !self.reaped {
            // SAFETY: as in signal_group.
            unsafe { libc::kill(self.pid, libc::SIGTERM) };
            // A suspended group would hold the signal until continued.
            self.signal_group(libc::SIGCONT);
            if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
                self.signal_group(libc::SIGKILL);
                let _ = self.child.wait().await;
            }
            self.reaped = true;
        }
        let pgid = self.pid;
        kill_all(|| in_groups(&[pgid])).await;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.reaped {
            self.signal_group(libc::SIGKILL);
        }
    }
}

/// What `/proc/<pid>/stat` says about a process (see proc(5)).
#[derive(Clone, Debug)]
pub(super) struct Stat {
    pub pid: i32,
    pub state: char,
    pub pgid: i32,
    pub cpu_ticks: u64,
    pub started: u64,
    pub rss_pages: u64,
}

pub(super) fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let f: Vec<&str> = text.get(text.rfind(')')? + 1..)?.split_whitespace().collect();
    let n = |i: usize| f.get(i - 3).and_then(|x| x.parse::<u64>().ok());
    Some(Stat {
        pid,
        state: f.first()?.chars().next()?,
        pgid: f.get(2)?.parse().ok()?,
        cpu_ticks: n(14)? + n(15)?,
        started: n(22)?,
        rss_pages: n(24)?,
    })
}

pub(super) fn start_time(pid: i32) -> Option<u64> {
    stat(pid).map(|s| s.started)
}

/// Every live process (zombies are dead already: their parent or init reaps them).
pub(super) fn processes() -> Vec<Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()).filter_map(stat).filter(|s| s.state != 'Z').collect()
}

/// Live processes in these process groups.
pub(super) fn in_groups(groups: &[i32]) -> Vec<i32> {
    processes().into_iter().filter(|s| groups.contains(&s.pgid)).map(|s| s.pid).collect()
}

/// Live processes whose command line mentions `path` (as a whole path or a directory above a
/// file): Chromium's helpers carry the profile in theirs, including any that left the process
/// group (its crash handler daemonises).
pub(super) fn mentioning(path: &Path) -> Vec<i32> {
    let needle = path.as_os_str().as_encoded_bytes();
    let names = |c: &[u8]| {
        c.windows(needle.len()).enumerate().any(|(i, w)| w == needle && matches!(c.get(i + needle.len()), None | Some(b'/' | 0)))
    };
    processes().into_iter().filter(|s| std::fs::read(format!("/proc/{}/cmdline", s.pid)).is_ok_and(|c| names(&c))).map(|s| s.pid).collect()
}

/// SIGKILL the processes `pick` answers until it answers none (or 5 s have passed).
pub(super) async fn kill_all(pick: impl Fn() -> Vec<i32>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = pick();
        if left.is_empty() || tokio::time::Instant::now() >= deadline {
            if !left.is_empty() {
                tracing::warn!(pids = ?left, "desktop: processes survive SIGKILL");
            }
            return;
        }
        for pid in left {
            // SAFETY: no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kill a process group recorded in a pid file by an earlier run, if its leader is still the
/// process that was started then (same start time: the pid was not reused).
pub(super) fn kill_recorded(pid: i32, started: u64) -> bool {
    if pid <= 1 || start_time(pid) != Some(started) {
        return false;
    }
    // SAFETY: no memory-safety preconditions.
    unsafe { libc::killpg(pid, libc::SIGKILL) };
    true
}

/// CPU time (ns) and memory (kB, proportional set size where the kernel gives it) of the
/// live processes in these groups.
pub(super) fn usage(groups: &[i32]) -> (u64, u64) {
    // SAFETY: sysconf has no preconditions.
    let (tick, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK).max(1) as u64, libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64) };
    let (mut cpu, mut mem) = (0, 0);
    for s in processes().into_iter().filter(|s| groups.contains(&s.pgid)) {
        cpu += s.cpu_ticks * 1_000_000_000 / tick;
        mem += pss_kb(s.pid).unwrap_or(s.rss_pages * page / 1024);
    }
    (cpu, mem)
}

/// Chromium's processes share most of their pages: summed RSS would count them many times.
fn pss_kb(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("Pss:"))?.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Whether an X server holds display `n` (a lock file naming a process that exists, zombies
/// included, as Xvfb judges). A stale lock is no obstacle: Xvfb removes it itself.
pub(super) fn display_taken(n: u32) -> bool {
    std::fs::read_to_string(format!("/tmp/.X{n}-lock"))
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// The address to connect to for a server listening on `listen` (any address: loopback).
pub(super) fn connect_host(listen: &str) -> &str {
    match listen {
        "0.0.0.0" | "" => "127.0.0.1",
        "::" | "[::]" => "::1",
        other => other,
    }
}

/// Whether `host:port` answers with an RFB protocol banner (`RFB 003.008\n`).
pub(super) async fn rfb_banner(host: &str, port: u16) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let probe = async {
        let mut s = TcpStream::connect((host, port)).await.map_err(|e| e.to_string())?;
        let mut banner = [0u8; 12];
        s.read_exact(&mut banner).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&banner).trim_end().to_string();
        if text.starts_with("RFB ") { Ok(text) } else { Err(format!("not an RFB banner: {text:?}")) }
    };
    tokio::time::timeout(Duration::from_secs(3), probe).await.unwrap_or_else(|_| Err("no banner within 3 s".into()))
}

/// The last lines of a log, for error messages.
pub(super) fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}
