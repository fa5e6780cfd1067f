//! Fetching one image onto a node, BitTorrent/Kraken style: pieces are fetched in parallel from
//! peers that hold them and from the origin (choices in `plan.rs`), peers' have lists are polled
//! while the download runs so pieces spread while their holders are still downloading, and every
//! piece goes through the cache, which checks its hash before anything keeps or serves it (a bad
//! piece is discarded and fetched elsewhere). All transfers pay the node's download limit. The
//! file is assembled at `<target>.part`, hashed whole in order as pieces land, and renamed to
//! `target` only when that hash is the manifest's; on failure the partial file is removed.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::cache::{CacheError, Fetched, Outcome, PieceCache, ReadError};
use super::catalog::{Catalog, CatalogEntry};
use super::limiter::Bandwidth;
use super::manifest::{Manifest, ManifestError, PieceHash};
use super::output::{Output, Verifier};
use super::plan::{Failure, From, Limits, Plan};
use super::source::{PieceRef, PieceSource, SourceError};

#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// This node's id, as its peers name it (the `id` of their `PieceSource` for it): ranks the
    /// nodes to share out the origin's work. Empty: a random rank.
    pub node_id: String,
    /// Pieces in flight from peers at once.
    pub concurrency: usize,
    /// Pieces in flight from one peer.
    pub per_peer: usize,
    /// Fresh pieces in flight from the origin while there are peers, on top of `concurrency`
    /// (without peers the origin gets `concurrency`). 0 makes this node a pure leecher that uses
    /// the origin only as the last resort, e.g. when the hive names a few seeders per image.
    pub origin_concurrency: usize,
    /// How often each peer's have list is asked for (until it holds everything).
    pub have_interval: Duration,
    /// One piece request (or have request) taking longer than this has failed.
    pub request_timeout: Duration,
    /// Idle this long (nothing in flight, every needed piece being fetched by some peer), the
    /// node takes a piece from the origin anyway.
    pub idle_grace: Duration,
    /// Failed attempts at one piece before the whole fetch gives up.
    pub max_attempts: u32,
    /// Read through the cache without keeping the pieces (outcome: skip).
    pub no_cache: bool,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            node_id: String::new(),
            // Enough requests in flight that uploaders are rarely idle: with 16 nodes at a common
            // cap, 8 left a third of the upload capacity unused (benches/distribution.rs).
            concurrency: 16,
            per_peer: 4,
            origin_concurrency: 1,
            have_interval: Duration::from_millis(200),
            request_timeout: Duration::from_secs(60),
            idle_grace: Duration::from_secs(1),
            max_attempts: 8,
            no_cache: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("{path}: {source}")]
    Output { path: PathBuf, source: io::Error },
    #[error("piece {index}: gave up after {attempts} failed attempts (last: {last})")]
    PieceFailed { index: usize, attempts: u32, last: String },
    #[error("the assembled file hashes to {actual}, the manifest says {expected}")]
    FileMismatch { expected: String, actual: String },
    #[error("fetch task failed: {0}")]
    Task(String),
}

/// What one fetch did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FetchReport {
    pub image: String,
    pub size: u64,
    pub pieces: usize,
    pub elapsed_ms: u64,
    pub local_hits: u64,
    pub remote_hits: u64,
    pub misses: u64,
    pub skips: u64,
    pub peer_bytes: u64,
    pub origin_bytes: u64,
    /// Pieces discarded because they did not match their hash.
    pub bad_pieces: u64,
    /// Other failed piece requests (not held, transport, status, timeout).
    pub failed_requests: u64,
}

/// Fetches images onto one node: its cache, its catalog (so peers can ask what it holds while it
/// downloads) and its download limit.
#[derive(Clone, Debug)]
pub struct Fetcher {
    cache: PieceCache,
    catalog: Catalog,
    down: Bandwidth,
    cfg: FetchConfig,
}

/// What every piece task needs.
struct Job {
    image: String,
    manifest: Manifest,
    hashes: Vec<PieceHash>,
    cache: PieceCache,
    down: Bandwidth,
    output: Output,
    timeout: Duration,
    no_cache: bool,
}

struct PieceDone {
    index: usize,
    from: From,
    result: Result<Outcome, (Failure, String)>,
}

impl Fetcher {
    pub fn new(cache: PieceCache, catalog: Catalog, down: Bandwidth, cfg: FetchConfig) -> Fetcher {
        Fetcher { cache, catalog, down, cfg }
    }

    pub fn cache(&self) -> &PieceCache {
        &self.cache
    }

    /// Fetch `manifest`'s image to `target` from `peers` and `origin`. One fetch per image per node
    /// at a time.
    pub async fn fetch(
        &self,
        manifest: Manifest,
        origin: Arc<dyn PieceSource>,
        peers: Vec<Arc<dyn PieceSource>>,
        target: &Path,
    ) -> Result<FetchReport, FetchError> {
        let started = Instant::now();
        let entry = self.catalog.add(manifest)?;
        let _pending = ClearPending(entry.clone());
        let m = entry.manifest().clone();
        let part = PathBuf::from(format!("{}.part", target.display()));
        let output = Output::create(&part, m.size).await?;
        let result = self.run(&entry, output, origin, peers).await;
        let result = match result {
            Ok(report) => tokio::fs::rename(&part, target)
                .await
                .map(|()| report)
                .map_err(|source| FetchError::Output { path: target.to_path_buf(), source }),
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = tokio::fs::remove_file(&part).await;
        }
        result.map(|mut r| {
            r.elapsed_ms = started.elapsed().as_millis() as u64;
            r
        })
    }

    async fn run(
        &self,
        entry: &Arc<CatalogEntry>,
        output: Output,
        origin: Arc<dyn PieceSource>,
        peers: Vec<Arc<dyn PieceSource>>,
    ) -> Result<FetchReport, FetchError> {
        let m = entry.manifest();
        let n = m.piece_count();
        let mut report = FetchReport { image: m.sha256.clone(), size: m.size, pieces: n, ..FetchReport::default() };
        let verifier = Verifier::spawn(output.clone(), m.clone());
        let job = Arc::new(Job {
            image: m.sha256.clone(),
            manifest: m.clone(),
            hashes: entry.hashes().to_vec(),
            cache: self.cache.clone(),
            down: self.down.clone(),
            output,
            timeout: self.cfg.request_timeout,
            no_cache: self.cfg.no_cache,
        });
        let local = self.cache.holds(&job.hashes).into_iter().enumerate().filter(|(_, held)| *held).map(|(i, _)| i).collect();
        let limits = Limits {
            concurrency: self.cfg.concurrency.max(1),
            per_peer: self.cfg.per_peer.max(1),
            origin_concurrency: self.cfg.origin_concurrency,
        };
        let (rank, nodes) = stripe(&self.cfg.node_id, &peers);
        let mut plan = Plan::new(n, peers.len(), local, limits).with_stripe(rank, nodes);

        let (have_tx, mut have_rx) = mpsc::channel(peers.len().max(1) * 2);
        let mut pollers = JoinSet::new();
        for (p, peer) in peers.iter().enumerate() {
            pollers.spawn(poll_have(
                p,
                peer.clone(),
                job.image.clone(),
                n,
                self.cfg.have_interval,
                self.cfg.request_timeout,
                have_tx.clone(),
            ));
        }
        drop(have_tx);

        let mut tasks = JoinSet::new();
        let mut idle_since: Option<tokio::time::Instant> = None;
        let mut last_resort = false;
        while !plan.is_complete() {
            while let Some((index, from)) = plan.next(&mut rand::rng(), last_resort) {
                let source = match from {
                    From::Local => None,
                    From::Peer(p) => Some(peers[p].clone()),
                    From::Origin => Some(origin.clone()),
                };
                if from != From::Local {
                    entry.set_pending(index, true);
                }
                tasks.spawn(fetch_piece(job.clone(), index, from, source));
            }
            last_resort = false;
            idle_since = if tasks.is_empty() { idle_since.or_else(|| Some(tokio::time::Instant::now())) } else { None };
            let give_up_waiting = idle_since.map(|t| t + self.cfg.idle_grace);
            tokio::select! {
                Some(joined) = tasks.join_next() => {
                    let done = joined.map_err(|e| FetchError::Task(e.to_string()))?;
                    entry.set_pending(done.index, false);
                    match done.result {
                        Ok(outcome) => {
                            plan.done(done.index, done.from);
                            count(&mut report, &job.manifest, done.index, done.from, outcome);
                            verifier.piece_written(done.index);
                        }
                        Err((why, message)) => {
                            let attempts = plan.failed(done.index, done.from, why);
                            match why {
                                Failure::Corrupt => report.bad_pieces += 1,
                                Failure::NotHeld | Failure::Other => report.failed_requests += 1,
                                Failure::NotLocal => {}
                            }
                            tracing::debug!(image = %job.image, piece = done.index, from = ?done.from, error = %message, "piece fetch failed");
                            if attempts >= self.cfg.max_attempts {
                                return Err(FetchError::PieceFailed { index: done.index, attempts, last: message });
                            }
                        }
                    }
                }
                Some((p, held, pending)) = have_rx.recv() => plan.update_have(p, held, pending),
                () = sleep_until(give_up_waiting), if give_up_waiting.is_some() => last_resort = true,
                else => return Err(FetchError::Task("no piece in flight and none to start".into())),
            }
        }
        pollers.abort_all();
        let actual = verifier.finish().await?;
        if actual != m.sha256 {
            return Err(FetchError::FileMismatch { expected: m.sha256.clone(), actual });
        }
        Ok(report)
    }
}

/// This node's rank among itself and its peers, by id, and how many they are.
fn stripe(me: &str, peers: &[Arc<dyn PieceSource>]) -> (usize, usize) {
    let nodes = peers.len() + 1;
    if me.is_empty() {
        return (rand::random_range(0..nodes), nodes);
    }
    (peers.iter().filter(|p| p.id() < me).count(), nodes)
}

fn count(report: &mut FetchReport, m: &Manifest, index: usize, from: From, outcome: Outcome) {
    let len = m.piece_range(index).map_or(0, |r| r.end - r.start);
    match outcome {
        Outcome::LocalHit => report.local_hits += 1,
        Outcome::RemoteHit => report.remote_hits += 1,
        Outcome::Miss => report.misses += 1,
        Outcome::Skip => report.skips += 1,
    }
    // A piece asked of a source may still have been found here (another fetch kept it meanwhile).
    match (from, outcome) {
        (_, Outcome::LocalHit) | (From::Local, _) => {}
        (From::Peer(_), _) => report.peer_bytes += len,
        (From::Origin, _) => report.origin_bytes += len,
    }
}

/// One piece: through the cache (which checks it), then into the output file.
async fn fetch_piece(job: Arc<Job>, index: usize, from: From, source: Option<Arc<dyn PieceSource>>) -> PieceDone {
    let result = async {
        let range = job.manifest.piece_range(index).map_err(|e| (Failure::Other, e.to_string()))?;
        let len = range.end - range.start;
        let fetch = || async {
            let Some(source) = source else { return Err((Failure::NotLocal, "no longer held here".to_string())) };
            let piece = PieceRef { image: &job.image, index, len };
            let got = tokio::time::timeout(job.timeout, source.get(piece, &job.down)).await;
            let fetched = if from == From::Origin { Fetched::Origin } else { Fetched::Peer };
            match got {
                Ok(Ok(bytes)) => {
                    crate::metrics::piece_bytes("down", bytes.len() as u64);
                    Ok((bytes, fetched))
                }
                Ok(Err(e @ SourceError::NotHeld { .. })) => Err((Failure::NotHeld, e.to_string())),
                Ok(Err(e)) => Err((Failure::Other, e.to_string())),
                Err(_) => Err((Failure::Other, format!("{} timed out after {:?}", source.id(), job.timeout))),
            }
        };
        let (bytes, outcome) = match job.cache.read_through(job.hashes[index], len, job.no_cache, fetch).await {
            Ok(read) => read,
            Err(ReadError::Fetch(f)) => return Err(f),
            Err(ReadError::Cache(e @ CacheError::Corrupt { .. })) => {
                crate::metrics::bad_piece();
                return Err((Failure::Corrupt, e.to_string()));
            }
            Err(ReadError::Cache(e)) => return Err((Failure::Other, e.to_string())),
        };
        job.output.write(range.start, bytes).await.map_err(|e| (Failure::Other, e.to_string()))?;
        Ok(outcome)
    }
    .await;
    PieceDone { index, from, result }
}

/// Ask one peer for its have list every `every` until it holds everything (or the fetch ends).
async fn poll_have(
    p: usize,
    peer: Arc<dyn PieceSource>,
    image: String,
    pieces: usize,
    every: Duration,
    timeout: Duration,
    tx: mpsc::Sender<(usize, super::catalog::Bitmap, super::catalog::Bitmap)>,
) {
    loop {
        // A peer that does not answer, or does not know the image yet, is asked again later.
        if let Ok(Ok(have)) = tokio::time::timeout(timeout, peer.have(&image)).await
            && let Ok((held, pending)) = have.bitmaps(pieces)
        {
            let complete = held.is_full();
            if tx.send((p, held, pending)).await.is_err() || complete {
                return;
            }
        }
        tokio::time::sleep(every).await;
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Clears the image's pending marks when a fetch ends, however it ends.
struct ClearPending(Arc<CatalogEntry>);

impl Drop for ClearPending {
    fn drop(&mut self) {
        (0..self.0.hashes().len()).for_each(|i| self.0.set_pending(i, false));
    }
}
