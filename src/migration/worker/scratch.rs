//! A job's scratch directory, `scratch_root/<job>`: created empty, removed with everything in it
//! when its [`Scratch`] goes. The agent may start a job again while the cancelled run still
//! cleans up, so a directory is claimed in this process first: a second run waits for the
//! first's removal instead of having its files deleted under it. Whatever a crashed agent left
//! in the directory is removed before it is used again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::WorkerError;

/// Directories held by a live `Scratch`, each with who waits for it.
static CLAIMS: LazyLock<Mutex<HashMap<PathBuf, Arc<Notify>>>> = LazyLock::new(Default::default);

/// The job's scratch directory. Dropping it removes the directory (a blocking removal: the
/// files are few, though they may be large).
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
    /// Whether the directory may still exist and must be removed on drop.
    armed: bool,
    // Released after `Drop::drop` removed the directory: a waiting run finds it gone.
    _claim: Claim,
}

impl Scratch {
    /// Claims and creates `root/<job>`, empty, waiting while another run of the job holds it.
    pub(super) async fn create(root: &Path, job: u64, cancel: &CancellationToken) -> Result<Self, WorkerError> {
        let path = root.join(job.to_string());
        let claim = Claim::acquire(path.clone(), cancel).await?;
        let scratch = Self { path, armed: true, _claim: claim };
        if tokio::fs::symlink_metadata(&scratch.path).await.is_ok() {
            tracing::info!(migration.job = job, path = %scratch.path.display(), "removing what an earlier run left in scratch");
            let stale = scratch.path.clone();
            let removed = tokio::task::spawn_blocking(move || remove_tree(&stale)).await.map_err(std::io::Error::other);
            removed.and_then(|r| r).map_err(|e| WorkerError::io(format!("remove leftovers in {}", scratch.path.display()), e))?;
        }
        tokio::fs::create_dir_all(root).await.map_err(|e| WorkerError::io(format!("create {}", root.display()), e))?;
        tokio::fs::create_dir(&scratch.path).await.map_err(|e| WorkerError::io(format!("create {}", scratch.path.display()), e))?;
        Ok(scratch)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the directory on a blocking thread, for callers that can wait (a drop on the
    /// way out still removes it if this future is dropped first).
    pub(super) async fn discard(mut self) {
        let path = self.path.clone();
        match tokio::task::spawn_blocking(move || remove_tree(&path)).await {
            Ok(Ok(())) => self.armed = false,
            Ok(Err(e)) => tracing::warn!(path = %self.path.display(), error = %e, "could not remove a job's scratch directory"),
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "removing a job's scratch directory did not finish"),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(e) = remove_tree(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove a job's scratch directory");
        }
    }
}

fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// This process's hold on one scratch path.
#[derive(Debug)]
struct Claim {
    path: PathBuf,
}

impl Claim {
    async fn acquire(path: PathBuf, cancel: &CancellationToken) -> Result<Self, WorkerError> {
        loop {
            let released = {
                let mut claims = CLAIMS.lock();
                let Some(holder) = claims.get(&path) else {
                    claims.insert(path.clone(), Arc::new(Notify::new()));
                    return Ok(Self { path });
                };
                // Registered before the lock goes, so a release in between is not missed.
                let mut released = Box::pin(holder.clone().notified_owned());
                released.as_mut().enable();
                released
            };
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(WorkerError::Cancelled),
                () = released => {}
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(waiting) = CLAIMS.lock().remove(&self.path) {
            waiting.notify_waiters();
        }
    }
}
