//! `SshChannel`: the guest command channel over SSH with keys, on russh (pure Rust, no `ssh`
//! binary). One connection per command: connect and authenticate within `connect_timeout_ms`,
//! check the guest's host key against the configured policy, run the command within the
//! caller's timeout, and return the exit status (-1 for a signal) with stdout and stderr, each
//! capped at `OUTPUT_CAP` bytes with a note saying so. Failures map onto `GuestError`: nothing
//! listening or no route → `Unreachable`; a refused key or an untrusted host key → `Auth`; a
//! command over its time → `Timeout` (the hive stops waiting and disconnects; killing the command
//! in the guest is best effort). The private key is read once, when the channel is built.
//! Logs carry the host and the duration, never the key, the command or its output.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use russh::client::{self, Handle, Msg};
use russh::keys::ssh_key::Fingerprint;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{Channel, ChannelMsg, Disconnect, Sig};
use serde::{Deserialize, Serialize};

use super::{CommandChannel, GuestError};
use crate::drivers::ExecOutput;

/// At most this many bytes of stdout, and as many of stderr, are kept per command; the rest is
/// drained and counted so that a chatty command can neither stall nor exhaust the hive.
pub const OUTPUT_CAP: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SshConfig {
    pub user: String,
    pub port: u16,
    /// An unencrypted private key in OpenSSH format (ed25519, ECDSA or RSA).
    pub private_key: PathBuf,
    pub host_key: HostKeyPolicy,
    /// Bounds the TCP connection, the handshake and authentication together.
    pub connect_timeout_ms: u64,
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            user: "root".into(),
            port: 22,
            private_key: PathBuf::from("hive-data/guest_ed25519"),
            host_key: HostKeyPolicy::KnownHosts(PathBuf::from("hive-data/guest_known_hosts")),
            connect_timeout_ms: 10_000,
        }
    }
}

/// How a guest's host key is trusted. In TOML: `host_key = { known_hosts = "path" }`,
/// `host_key = { fingerprint = "SHA256:…" }` or `host_key = "accept_any"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostKeyPolicy {
    /// Strict: the guest's key must be listed for its host (and port, `[host]:port` when not
    /// 22) in this OpenSSH known_hosts file; hashed names are understood. Unlisted or different
    /// keys are refused. The file is read on every connection, so it can be updated live.
    KnownHosts(PathBuf),
    /// Every guest must present the key with this fingerprint, as `ssh-keygen -l` prints it
    /// (`SHA256:…`): for guests cloned from one template that share its host keys.
    Fingerprint(String),
    /// INSECURE: any host key is trusted, so anyone on the path can impersonate the guest and
    /// read the commands. Only for disposable test guests; a warning is logged once.
    AcceptAny,
}

/// Why an `SshChannel` could not be built; all of these are configuration mistakes.
#[derive(Debug, thiserror::Error)]
pub enum SshSetupError {
    #[error("cannot load the SSH private key {path}: {reason}")]
    PrivateKey { path: PathBuf, reason: String },
    #[error("SSH host key fingerprint {0:?} is not of the form `SHA256:…` (as `ssh-keygen -l` prints it)")]
    Fingerprint(String),
    #[error("SSH known_hosts file {path} cannot be read: {reason}")]
    KnownHosts { path: PathBuf, reason: String },
}

/// Read a private key once, to share between channels (`SshChannel::with_key`).
pub fn load_private_key(path: &Path) -> Result<Arc<PrivateKey>, SshSetupError> {
    russh::keys::load_secret_key(path, None)
        .map(Arc::new)
        .map_err(|e| SshSetupError::PrivateKey { path: path.to_owned(), reason: e.to_string() })
}

/// The host-key policy with its fingerprint parsed, ready to check keys.
#[derive(Clone, Debug)]
enum TrustedHostKey {
    KnownHosts(PathBuf),
    Fingerprint(Fingerprint),
    AcceptAny,
}

pub struct SshChannel {
    config: SshConfig,
    key: Arc<PrivateKey>,
    trusted: TrustedHostKey,
    client: Arc<client::Config>,
}

impl std::fmt::Debug for SshChannel {
    // By hand so that the private key can never end up in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshChannel")
            .field("config", &self.config)
            .field("key", &self.key.public_key().fingerprint(HashAlg::Sha256).to_string())
            .finish()
    }
}

impl SshChannel {
    /// Load `config.private_key` and check the host-key policy.
    pub fn new(config: SshConfig) -> Result<Self, SshSetupError> {
        let key = load_private_key(&config.private_key)?;
        Self::with_key(config, key)
    }

    /// Build a channel around a key already loaded (`config.private_key` is not read).
    pub fn with_key(config: SshConfig, key: Arc<PrivateKey>) -> Result<Self, SshSetupError> {
        let trusted = match &config.host_key {
            HostKeyPolicy::KnownHosts(path) => {
                // russh treats a missing file as "no entries": say so now rather than refuse
                // every guest later with a puzzling message.
                std::fs::metadata(path).map_err(|e| SshSetupError::KnownHosts { path: path.clone(), reason: e.to_string() })?;
                TrustedHostKey::KnownHosts(path.clone())
            }
            HostKeyPolicy::Fingerprint(text) => TrustedHostKey::Fingerprint(parse_fingerprint(text)?),
            HostKeyPolicy::AcceptAny => {
                static WARNED: Once = Once::new();
                WARNED.call_once(|| {
                    tracing::warn!("SSH host keys of guests are NOT checked (host_key = accept_any); use only with disposable test guests");
                });
                TrustedHostKey::AcceptAny
            }
        };
        let client = Arc::new(client::Config { nodelay: true, ..Default::default() });
        Ok(SshChannel { config, key, trusted, client })
    }

    /// Connect and authenticate; bounded by the caller with the connect timeout.
    async fn open_session(&self, host: &str) -> Result<Handle<HostKeyCheck>, GuestError> {
        let port = self.config.port;
        let check = HostKeyCheck { host: host.to_owned(), port, trusted: self.trusted.clone() };
        let mut session = client::connect(self.client.clone(), (host, port), check).await.map_err(|e| match e {
            HandshakeError::HostKey(reason) => GuestError::Auth(format!("host key of {host}:{port} not trusted: {reason}")),
            HandshakeError::Ssh(e) => connection_error(host, port, e),
        })?;
        // RSA keys need the signature hash the server prefers; other keys ignore it.
        let hash = match self.key.algorithm().is_rsa() {
            true => session.best_supported_rsa_hash().await.map_err(|e| connection_error(host, port, e))?.flatten(),
            false => None,
        };
        let key = PrivateKeyWithHashAlg::new(self.key.clone(), hash);
        let auth = session.authenticate_publickey(&self.config.user, key).await.map_err(|e| connection_error(host, port, e))?;
        if !auth.success() {
            return Err(GuestError::Auth(format!("the key for user {:?} was refused by {host}:{port}", self.config.user)));
        }
        Ok(session)
    }

    async fn run(&self, host: &str, command: &str, timeout: Duration) -> Result<ExecOutput, GuestError> {
        let connect_timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let session = match tokio::time::timeout(connect_timeout, self.open_session(host)).await {
            Ok(session) => session?,
            Err(_) => {
                tracing::debug!(host, "no SSH session within the connect timeout");
                return Err(GuestError::Unreachable(format!("{host}:{}", self.config.port)));
            }
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let result = match tokio::time::timeout_at(deadline, start_command(&session, command)).await {
            Err(_) => Err(GuestError::Timeout(timeout)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(mut channel)) => match tokio::time::timeout_at(deadline, collect_output(&mut channel)).await {
                Ok(output) => output,
                Err(_) => {
                    // Best effort only: without a terminal the disconnect does not end the
                    // command, and OpenSSH refuses signal requests for root's sessions
                    // ("session signalling requires privilege separation").
                    let _ = tokio::time::timeout(Duration::from_secs(1), channel.signal(Sig::KILL)).await;
                    Err(GuestError::Timeout(timeout))
                }
            },
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), session.disconnect(Disconnect::ByApplication, "", "en")).await;
        result
    }
}

#[async_trait]
impl CommandChannel for SshChannel {
    async fn exec(&self, host: &str, command: &str, timeout: Duration) -> Result<ExecOutput, GuestError> {
        let started = Instant::now();
        let result = self.run(host, command, timeout).await;
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match &result {
            Ok(output) => tracing::info!(host, duration_ms, status = output.status, "guest command finished"),
            Err(e) => tracing::debug!(host, duration_ms, error = %e, "guest command failed"),
        }
        result
    }
}

fn parse_fingerprint(text: &str) -> Result<Fingerprint, SshSetupError> {
    match text.trim().parse::<Fingerprint>() {
        Ok(fp) if fp.algorithm() == HashAlg::Sha256 => Ok(fp),
        _ => Err(SshSetupError::Fingerprint(text.to_owned())),
    }
}

/// A guest that cannot be reached yet (still booting, sshd not up) is `Unreachable`, so that
/// callers retry; anything else is a failure of the channel.
fn connection_error(host: &str, port: u16, e: russh::Error) -> GuestError {
    use std::io::ErrorKind::*;
    let unreachable = match &e {
        russh::Error::IO(io) => matches!(
            io.kind(),
            ConnectionRefused | ConnectionReset | ConnectionAborted | HostUnreachable | NetworkUnreachable | TimedOut | UnexpectedEof
        ),
        // sshd closing the connection during the handshake: still starting, or rate limiting.
        russh::Error::HUP | russh::Error::Disconnect => true,
        _ => false,
    };
    if unreachable {
        tracing::debug!(host, port, error = %e, "guest not reachable over SSH");
        GuestError::Unreachable(format!("{host}:{port}"))
    } else {
        GuestError::Failed(format!("SSH to {host}:{port}: {e}"))
    }
}

async fn start_command(session: &Handle<HostKeyCheck>, command: &str) -> Result<Channel<Msg>, GuestError> {
    let failed = |e: russh::Error| GuestError::Failed(format!("cannot start the command: {e}"));
    let channel = session.channel_open_session().await.map_err(failed)?;
    channel.exec(true, command).await.map_err(failed)?;
    Ok(channel)
}

async fn collect_output(channel: &mut Channel<Msg>) -> Result<ExecOutput, GuestError> {
    let mut stdout = CappedOutput::default();
    let mut stderr = CappedOutput::default();
    let mut status = None;
    // Data may still arrive after the exit status: read until the channel closes.
    while let Some(msg) = channel.wait().await {
        match msg {
            ChannelMsg::Data { data } => stdout.push(&data),
            ChannelMsg::ExtendedData { data, ext: 1 } => stderr.push(&data),
            ChannelMsg::ExitStatus { exit_status } => status = Some(i32::try_from(exit_status).unwrap_or(i32::MAX)),
            ChannelMsg::ExitSignal { .. } => status = Some(-1),
            ChannelMsg::Failure => return Err(GuestError::Failed("the guest refused to run the command".into())),
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    let status = status.ok_or_else(|| GuestError::Failed("the channel closed without an exit status".into()))?;
    Ok(ExecOutput { status, stdout: stdout.finish("stdout"), stderr: stderr.finish("stderr") })
}

#[derive(Default)]
struct CappedOutput {
    bytes: Vec<u8>,
    dropped: u64,
}

impl CappedOutput {
    fn push(&mut self, data: &[u8]) {
        let keep = data.len().min(OUTPUT_CAP - self.bytes.len());
        self.bytes.extend_from_slice(&data[..keep]);
        self.dropped += (data.len() - keep) as u64;
    }

    fn finish(self, stream: &str) -> String {
        let mut text = String::from_utf8_lossy(&self.bytes).into_owned();
        if self.dropped > 0 {
            text.push_str(&format!(
                "\n[guaca-hive: {} more bytes of {stream} dropped, output is capped at {OUTPUT_CAP} bytes]\n",
                self.dropped
            ));
        }
        text
    }
}

/// The russh handler: only checks the guest's host key.
struct HostKeyCheck {
    host: String,
    port: u16,
    trusted: TrustedHostKey,
}

#[derive(Debug)]
enum HandshakeError {
    Ssh(russh::Error),
    HostKey(String),
}

impl From<russh::Error> for HandshakeError {
    fn from(e: russh::Error) -> Self {
        HandshakeError::Ssh(e)
    }
}

impl client::Handler for HostKeyCheck {
    type Error = HandshakeError;

    async fn check_server_key(&mut self, offered: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let key = offered.public_key();
        let seen = key.fingerprint(HashAlg::Sha256);
        match &self.trusted {
            TrustedHostKey::AcceptAny => Ok(true),
            TrustedHostKey::Fingerprint(pinned) if seen == *pinned => Ok(true),
            TrustedHostKey::Fingerprint(pinned) => Err(HandshakeError::HostKey(format!("it is {seen}, the pinned one is {pinned}"))),
            // A small file read; not worth a blocking-pool hop.
            TrustedHostKey::KnownHosts(path) => match russh::keys::check_known_hosts_path(&self.host, self.port, &key, path) {
                Ok(true) => Ok(true),
                Ok(false) => Err(HandshakeError::HostKey(format!("{seen} is not listed in {}", path.display()))),
                Err(russh::keys::Error::KeyChanged { line }) => {
                    Err(HandshakeError::HostKey(format!("{seen} differs from line {line} of {}", path.display())))
                }
                Err(e) => Err(HandshakeError::HostKey(format!("cannot check {}: {e}", path.display()))),
            },
        }
    }
}

#[cfg(test)]
mod tests;
