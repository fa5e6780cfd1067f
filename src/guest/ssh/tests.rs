//! Tests of `SshChannel` against a real OpenSSH sshd: each test starts its own on a free
//! loopback port, with host and user keys made by ssh-keygen in a temporary directory, and
//! kills it when done. Missing tools fail the test with a pointer to scripts/test-deps.sh.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;

const SSHD: &str = "/usr/sbin/sshd";
const DEPS: &str = "run scripts/test-deps.sh to install it";

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program} ({e}): {DEPS}"));
    assert!(out.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh ed25519 key pair at `path` and `path.pub`.
fn keygen(path: &Path) -> PathBuf {
    run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-C", "", "-f", path.to_str().expect("utf-8 path")]);
    path.to_owned()
}

/// `SHA256:…` of a public key, as OpenSSH itself computes it.
fn fingerprint(public: &Path) -> String {
    let line = run("ssh-keygen", &["-l", "-E", "sha256", "-f", public.to_str().expect("utf-8 path")]);
    line.split_whitespace().nth(1).expect("fingerprint in ssh-keygen -l output").to_owned()
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local addr").port()
}

struct Sshd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    /// The key sshd accepts for the current user.
    user_key: PathBuf,
}

impl Sshd {
    async fn start() -> Sshd {
        assert!(Path::new(SSHD).exists(), "{SSHD} is missing: {DEPS}");
        // sshd's privilege-separation directory; /run is empty in fresh containers.
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let host_key = keygen(&d.join("host_ed25519"));
        let user_key = keygen(&d.join("user_ed25519"));
        std::fs::copy(d.join("user_ed25519.pub"), d.join("authorized_keys")).expect("authorized_keys");
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nUseDNS no\nX11Forwarding no\n\
             AllowTcpForwarding no\nLogLevel VERBOSE\n",
            host_key.display(),
            d.join("authorized_keys").display(),
            d.join("sshd.pid").display(),
        );
        std::fs::write(d.join("sshd_config"), config).expect("write sshd_config");
        let log = std::fs::File::create(d.join("sshd.log")).expect("sshd.log");
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {SSHD} ({e}): {DEPS}"));
        let mut sshd = Sshd { child, port, dir, user_key };
        sshd.wait_ready().await;
        sshd
    }

    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sshd exited ({status}): {}", self.log());
            }
            assert!(tokio::time::Instant::now() < deadline, "sshd did not listen within 10 s: {}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn host_fingerprint(&self) -> String {
        fingerprint(&self.path("host_ed25519.pub"))
    }

    fn config(&self, host_key: HostKeyPolicy) -> SshConfig {
        SshConfig {
            user: run("id", &["-un"]).trim().to_owned(),
            port: self.port,
            private_key: self.user_key.clone(),
            host_key,
            connect_timeout_ms: 5_000,
        }
    }

    fn channel(&self, host_key: HostKeyPolicy) -> SshChannel {
        SshChannel::new(self.config(host_key)).expect("build the channel")
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_command_returns_its_status_stdout_and_stderr() {
    let sshd = Sshd::start().await;
    let line = format!("[127.0.0.1]:{} {}", sshd.port, std::fs::read_to_string(sshd.path("host_ed25519.pub")).expect("host key"));
    std::fs::write(sshd.path("known_hosts"), line).expect("known_hosts");
    let channel = sshd.channel(HostKeyPolicy::KnownHosts(sshd.path("known_hosts")));
    let out = channel.exec("127.0.0.1", "echo out; echo err >&2; exit 3", T).await.expect("exec");
    assert_eq!(out, ExecOutput { status: 3, stdout: "out\n".into(), stderr: "err\n".into() });
    // Killed by a signal: -1, not 128+9.
    let out = channel.exec("127.0.0.1", "kill -9 $$", T).await.expect("exec");
    assert_eq!(out.status, -1);
}

#[tokio::test]
async fn output_is_capped_and_says_so() {
    let sshd = Sshd::start().await;
    let channel = sshd.channel(HostKeyPolicy::AcceptAny);
    let out = channel.exec("127.0.0.1", "head -c 1100000 /dev/zero | tr '\\0' a", T).await.expect("exec");
    assert_eq!(out.status, 0);
    assert!(out.stdout.starts_with(&"a".repeat(OUTPUT_CAP)), "the first MiB is kept");
    let note = &out.stdout[OUTPUT_CAP..];
    assert!(note.contains(&format!("{} more bytes of stdout dropped", 1_100_000 - OUTPUT_CAP)), "{note}");
    assert_eq!(out.stderr, "");
}

#[tokio::test]
async fn a_key_not_authorized_is_an_auth_error() {
    let sshd = Sshd::start().await;
    let mut config = sshd.config(HostKeyPolicy::AcceptAny);
    config.private_key = keygen(&sshd.path("other_ed25519"));
    let channel = SshChannel::new(config).expect("build the channel");
    let err = channel.exec("127.0.0.1", "true", T).await.expect_err("a foreign key must be refused");
    assert!(matches!(err, GuestError::Auth(_)), "{err:?}");
}

#[tokio::test]
async fn a_closed_port_is_unreachable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = SshConfig {
        port: free_port(), // bound and released: nothing listens there now
        private_key: keygen(&dir.path().join("key")),
        host_key: HostKeyPolicy::AcceptAny,
        ..SshConfig::default()
    };
    let channel = SshChannel::new(config).expect("build the channel");
    let err = channel.exec("127.0.0.1", "true", T).await.expect_err("nothing listens");
    assert!(matches!(err, GuestError::Unreachable(_)), "{err:?}");
}

#[tokio::test]
async fn a_command_over_its_time_is_a_timeout() {
    let sshd = Sshd::start().await;
    let channel = sshd.channel(HostKeyPolicy::AcceptAny);
    let started = std::time::Instant::now();
    let err = channel.exec("127.0.0.1", "sleep 5", Duration::from_millis(300)).await.expect_err("must time out");
    assert_eq!(err, GuestError::Timeout(Duration::from_millis(300)));
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn host_keys_are_checked_against_the_pin_and_known_hosts() {
    let sshd = Sshd::start().await;
    let right = sshd.host_fingerprint();
    let out = sshd.channel(HostKeyPolicy::Fingerprint(right.clone())).exec("127.0.0.1", "echo ok", T).await.expect("exec");
    assert_eq!(out.stdout, "ok\n");

    // A well-formed fingerprint of another key (the user's).
    let wrong = fingerprint(&sshd.path("user_ed25519.pub"));
    assert_ne!(wrong, right);
    let err = sshd.channel(HostKeyPolicy::Fingerprint(wrong)).exec("127.0.0.1", "true", T).await.expect_err("wrong pin");
    assert!(matches!(&err, GuestError::Auth(m) if m.contains("host key")), "{err:?}");

    // known_hosts naming another key for this host, and one without this host at all.
    let other = std::fs::read_to_string(sshd.path("user_ed25519.pub")).expect("user key");
    for (name, line) in [("changed", format!("[127.0.0.1]:{} {other}", sshd.port)), ("unlisted", format!("[127.0.0.2]:22 {other}"))] {
        std::fs::write(sshd.path(name), line).expect("known_hosts");
        let channel = sshd.channel(HostKeyPolicy::KnownHosts(sshd.path(name)));
        let err = channel.exec("127.0.0.1", "true", T).await.expect_err(name);
        assert!(matches!(&err, GuestError::Auth(m) if m.contains("host key")), "{name}: {err:?}");
    }
}

#[test]
fn setup_errors_are_reported_at_construction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = keygen(&dir.path().join("key"));
    let config = |host_key| SshConfig { private_key: key.clone(), host_key, ..SshConfig::default() };
    for bad in ["MD5:00:11", "SHA256", "not a fingerprint"] {
        let err = SshChannel::new(config(HostKeyPolicy::Fingerprint(bad.into()))).expect_err(bad);
        assert!(matches!(err, SshSetupError::Fingerprint(_)), "{bad}: {err:?}");
    }
    let err = SshChannel::new(config(HostKeyPolicy::KnownHosts(dir.path().join("missing")))).expect_err("missing file");
    assert!(matches!(err, SshSetupError::KnownHosts { .. }), "{err:?}");
    let err = SshChannel::new(SshConfig { private_key: dir.path().join("nope"), ..config(HostKeyPolicy::AcceptAny) }).expect_err("no key");
    assert!(matches!(err, SshSetupError::PrivateKey { .. }), "{err:?}");
    // One key, loaded once, shared by two channels.
    let shared = load_private_key(&key).expect("load");
    SshChannel::with_key(config(HostKeyPolicy::AcceptAny), shared.clone()).expect("first");
    SshChannel::with_key(config(HostKeyPolicy::AcceptAny), shared).expect("second");
}

#[test]
fn config_reads_from_toml_with_defaults() {
    use figment::providers::{Format, Toml};
    let parse = |text: &str| figment::Figment::from(Toml::string(text)).extract::<SshConfig>().map_err(|e| e.to_string());
    let config = parse("port = 2222\nhost_key = { fingerprint = \"SHA256:abc\" }").expect("fingerprint");
    assert_eq!((config.user.as_str(), config.port), ("root", 2222));
    assert_eq!(config.host_key, HostKeyPolicy::Fingerprint("SHA256:abc".into()));
    assert_eq!(parse("host_key = \"accept_any\"").expect("accept_any").host_key, HostKeyPolicy::AcceptAny);
    let config = parse("host_key = { known_hosts = \"/k\" }").expect("known_hosts");
    assert_eq!(config.host_key, HostKeyPolicy::KnownHosts("/k".into()));
    assert!(parse("host_key = \"anything\"").is_err());
    assert!(parse("usr = \"x\"").is_err(), "unknown keys are refused");
}
