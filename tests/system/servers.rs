//! Servers the tests own, so that they can stop and restart them: a PostgreSQL cluster made
//! with `initdb` in a temporary directory and a `redis-server`, each on a free loopback port.
//! Both run as real processes (Debian's packages; `scripts/test-deps.sh` installs them) and
//! are killed when dropped. Starting and stopping poll with deadlines.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port()
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50)); // poll interval, bounded by the deadline
    }
}

fn answers(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A PostgreSQL cluster of its own (trust auth, user `postgres`), run as the `postgres` user.
pub struct OwnPostgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl OwnPostgres {
    pub fn start() -> OwnPostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.flatten().map(|e| e.path().join("bin")).find(|p| p.join("initdb").exists()))
            .expect("PostgreSQL's initdb (run scripts/test-deps.sh)");
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        // The server refuses to run as root: the cluster belongs to `postgres`.
        let out = Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir.path()).output().expect("chown");
        assert!(out.status.success(), "chown: {}", String::from_utf8_lossy(&out.stderr));
        let out = as_postgres(&bin.join("initdb"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .expect("initdb");
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let mut pg = OwnPostgres { _dir: dir, data, bin, port: free_port(), child: None };
        pg.resume();
        pg
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Create a database (in the cluster's `postgres` database).
    pub fn create_db(&self, name: &str) {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres", "-c"])
            .arg(format!("CREATE DATABASE {name}"))
            .output()
            .expect("psql");
        assert!(out.status.success(), "create database: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Start (again) on the same port and data.
    pub fn resume(&mut self) {
        let sock = self.data.parent().expect("dir").to_path_buf();
        let child = as_postgres(&self.bin.join("postgres"))
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!("unix_socket_directories={}", sock.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres");
        self.child = Some(child);
        let port = self.port;
        wait_for("postgres to accept connections", Duration::from_secs(30), || answers(port));
        // The port opens before the server takes sessions ("the database system is starting
        // up"): wait for pg_isready to say it accepts them.
        let ready = || {
            Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-q"])
                .status()
                .is_ok_and(|s| s.success())
        };
        wait_for("postgres to take sessions", Duration::from_secs(30), ready);
    }

    /// Stop it (a fast shutdown: SIGINT ends every session at once, as an operator's
    /// `pg_ctl stop -m fast` does); clients see their connections drop.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid; setpriv exec'd the postmaster in place.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
            let _ = c.wait();
        }
        let port = self.port;
        wait_for("postgres to stop", Duration::from_secs(30), || !answers(port));
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn as_postgres(program: &std::path::Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]).arg(program);
    c
}

/// A redis-server of its own: no persistence, loopback only.
pub struct OwnRedis {
    pub port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    pub fn start() -> OwnRedis {
        let mut r = OwnRedis { port: free_port(), child: None };
        r.resume();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn resume(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (run scripts/test-deps.sh)");
        self.child = Some(child);
        let port = self.port;
        wait_for("redis to accept connections", Duration::from_secs(10), || answers(port));
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let port = self.port;
        wait_for("redis to stop", Duration::from_secs(10), || !answers(port));
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
