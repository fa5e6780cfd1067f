//! The agent's migration jobs: `Command::Migrate` runs the worker pipeline
//! (`migration::worker`: connect, fetch, convert, upload to the hive) in a task of its own,
//! sending each step's progress to the hive as `MigrationStep`; `CancelMigration` stops it.
//! Jobs belong to the connection that started them: when it ends, the hive counts the worker
//! lost and retries elsewhere, so the jobs are cancelled (and their scratch files removed).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use secrecy::SecretString;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::proto::{AgentMsg, CmdOk};
use crate::drivers::DriverError;
use crate::migration::fetch::{self, SourceSpec};
use crate::migration::worker::{self, WorkerError, WorkerJob};

/// The running jobs of one connection; dropping it cancels them all.
#[derive(Default)]
pub struct Jobs {
    /// Job → (run number, its cancel token): a run removes itself only if it is still the
    /// current run of its job.
    running: Arc<Mutex<HashMap<u64, (u64, CancellationToken)>>>,
    runs: std::sync::atomic::AtomicU64,
}

impl Drop for Jobs {
    fn drop(&mut self) {
        for (_, token) in self.running.lock().values() {
            token.cancel();
        }
    }
}

/// Where one connection's jobs send their messages and upload to.
pub struct JobContext {
    pub hive: String,
    pub credential: SecretString,
    pub scratch_root: PathBuf,
    pub out: mpsc::UnboundedSender<AgentMsg>,
}

impl Jobs {
    /// Start job `job`; its reply (for command `id`) is sent on `ctx.out` when it ends.
    pub fn start(&self, id: u64, job: u64, source: SourceSpec, id_at_source: String, upload_path: String, ctx: JobContext) {
        let token = CancellationToken::new();
        let run_no = self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((_, old)) = self.running.lock().insert(job, (run_no, token.clone())) {
            // The hive started the job here again: the old run yields to the new one.
            old.cancel();
        }
        let running = self.running.clone();
        tokio::spawn(async move {
            let result = run(job, source, id_at_source, &upload_path, &ctx, &token).await;
            {
                let mut r = running.lock();
                if r.get(&job).is_some_and(|(n, _)| *n == run_no) {
                    r.remove(&job);
                }
            }
            let _ = ctx.out.send(AgentMsg::Reply { id, result: Ok(result) });
        });
    }

    /// Stop job `job` if it runs here.
    pub fn cancel(&self, job: u64) {
        if let Some((_, token)) = self.running.lock().remove(&job) {
            token.cancel();
        }
    }
}

async fn run(job: u64, source: SourceSpec, id_at_source: String, upload_path: &str, ctx: &JobContext, cancel: &CancellationToken) -> CmdOk {
    let (steps, mut rx) = mpsc::unbounded_channel();
    let out = ctx.out.clone();
    let forward = tokio::spawn(async move {
        while let Some((event, percent)) = rx.recv().await {
            let _ = out.send(AgentMsg::MigrationStep { job, event, percent });
        }
    });
    let work = WorkerJob { job, source, id_at_source, scratch_root: ctx.scratch_root.clone() };
    let result = async {
        // The scratch directory lives until the upload is done, then goes with `_scratch`.
        let (_scratch, converted) = worker::prepare(&work, &steps, cancel).await?;
        let url = format!("{}{upload_path}", ctx.hive.trim_end_matches('/'));
        worker::upload(&converted, &url, &ctx.credential, &steps, cancel).await
    }
    .await;
    drop(steps);
    let _ = forward.await;
    match result {
        Ok(answer) => CmdOk::Migrated(answer),
        Err(e) => {
            let cancelled = matches!(e, WorkerError::Cancelled);
            tracing::warn!(job, error = %e, cancelled, "migration stopped on this node");
            CmdOk::MigrationFailed { error: e.to_string(), retryable: e.retryable(), cancelled }
        }
    }
}

/// `Discover`: what the source holds, as seen from this node.
pub async fn discover(source: &SourceSpec) -> Result<CmdOk, DriverError> {
    fetch::discover(source).await.map(CmdOk::Resources).map_err(|e| DriverError::Failed(e.to_string()))
}

/// `ProbeSource`: can this node reach the source?
pub async fn probe(source: &SourceSpec) -> Result<CmdOk, DriverError> {
    fetch::probe_source(source).await.map(|_| CmdOk::Done).map_err(|e| DriverError::Failed(e.to_string()))
}
