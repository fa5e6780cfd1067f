//! The command channel into a running guest: what ConfigAuto and VM prepare/clean-up use to
//! run commands inside an instance. One small trait; `ssh` implements it with keys (a Rust SSH
//! client, no `ssh` binary). The exit status, stdout and stderr always come back; a channel
//! error (unreachable, refused key, timeout) is a `GuestError`, never a fake exit status.

pub mod ssh;

use std::time::Duration;

use async_trait::async_trait;

use crate::drivers::ExecOutput;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuestError {
    /// Nothing answered yet (the guest is still booting): callers may retry.
    #[error("guest {0} is not reachable yet")]
    Unreachable(String),
    #[error("guest refused authentication: {0}")]
    Auth(String),
    #[error("command timed out after {0:?}")]
    Timeout(Duration),
    #[error("command channel failed: {0}")]
    Failed(String),
}

#[async_trait]
pub trait CommandChannel: Send + Sync + 'static {
    /// Run `command` on the guest at `host` and wait for it to finish, at most `timeout`.
    async fn exec(&self, host: &str, command: &str, timeout: Duration) -> Result<ExecOutput, GuestError>;
}
