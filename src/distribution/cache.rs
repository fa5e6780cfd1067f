//! A node's piece cache: two levels with their own byte budgets, memory and disk (a directory,
//! one file per piece named by its hex SHA-256), shared by every image (pieces are keyed by hash
//! only). Eviction is LFU, ties broken by least recently used; a disk piece used `promote_after`
//! times is also kept in memory, if that evicts only pieces used no more often; pieces idle for
//! `idle_ttl` go on `expire_idle`. Pieces longer than `max_item_bytes`, or read with `no_cache`, are not kept.
//!
//! Guarantees: nothing enters the cache unless its bytes hash to its name (`read_through` and
//! `insert` check; `open` re-checks what it finds on disk). Every successful `read_through` counts
//! exactly one outcome: local hit (held here), remote hit (fetched from a peer), miss (fetched
//! from the origin) or skip (fetched and not kept). Pieces served to peers are counted apart.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

use super::manifest::PieceHash;

mod index;
use index::{Entry, Index};

const TMP_PREFIX: &str = ".tmp-";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("piece {hash}: {source}")]
    Io { hash: PieceHash, source: io::Error },
    #[error("piece {expected}: the bytes hash to {actual}")]
    Corrupt { expected: PieceHash, actual: PieceHash },
    #[error("cache task failed: {0}")]
    Task(String),
}

/// A `read_through` that returned no piece: the fetch failed, or fetched the wrong bytes.
#[derive(Debug, thiserror::Error)]
pub enum ReadError<E> {
    #[error(transparent)]
    Fetch(E),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub dir: PathBuf,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    /// Pieces longer than this are read through without being kept (outcome: skip).
    pub max_item_bytes: u64,
    /// Uses (reads and serves) after which a disk piece is also kept in memory.
    pub promote_after: u64,
    pub idle_ttl: Duration,
}

impl CacheConfig {
    pub fn new(dir: impl Into<PathBuf>) -> CacheConfig {
        CacheConfig {
            dir: dir.into(),
            memory_bytes: 256 << 20,
            disk_bytes: 20 << 30,
            max_item_bytes: 64 << 20,
            promote_after: 3,
            idle_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Where a read's bytes came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    LocalHit,
    RemoteHit,
    Miss,
    Skip,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::LocalHit => "local_hit",
            Outcome::RemoteHit => "remote_hit",
            Outcome::Miss => "miss",
            Outcome::Skip => "skip",
        }
    }
}

/// Who sent a piece that was not held here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetched {
    Peer,
    Origin,
}

#[derive(Debug, Default)]
pub struct CacheStats {
    local_hit: AtomicU64,
    remote_hit: AtomicU64,
    miss: AtomicU64,
    skip: AtomicU64,
    served: AtomicU64,
    promoted: AtomicU64,
    evicted: AtomicU64,
    expired: AtomicU64,
}

/// The counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheCounts {
    pub local_hit: u64,
    pub remote_hit: u64,
    pub miss: u64,
    pub skip: u64,
    /// Pieces handed to peers (not reads of this node).
    pub served: u64,
    pub promoted: u64,
    pub evicted: u64,
    pub expired: u64,
}

impl CacheStats {
    pub fn snapshot(&self) -> CacheCounts {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CacheCounts {
            local_hit: l(&self.local_hit),
            remote_hit: l(&self.remote_hit),
            miss: l(&self.miss),
            skip: l(&self.skip),
            served: l(&self.served),
            promoted: l(&self.promoted),
            evicted: l(&self.evicted),
            expired: l(&self.expired),
        }
    }

    fn count(&self, outcome: Outcome) {
        let c = match outcome {
            Outcome::LocalHit => &self.local_hit,
            Outcome::RemoteHit => &self.remote_hit,
            Outcome::Miss => &self.miss,
            Outcome::Skip => &self.skip,
        };
        c.fetch_add(1, Ordering::Relaxed);
        crate::metrics::cache_read(outcome.name());
    }
}

impl Serialize for CacheStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.snapshot().serialize(s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CacheUsage {
    pub pieces: usize,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// Cloneable handle on one node's cache.
#[derive(Clone, Debug)]
pub struct PieceCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: CacheConfig,
    index: Mutex<Index>,
    stats: CacheStats,
}

impl PieceCache {
    /// Open (creating) the directory and take in the pieces already there that still match their
    /// names, within the disk budget; stray temporary files and mismatching pieces are removed.
    pub async fn open(cfg: CacheConfig) -> Result<PieceCache, CacheError> {
        let dir = cfg.dir.clone();
        let budget = cfg.disk_bytes;
        let found = blocking(move || scan(&dir, budget)).await??;
        let mut index = Index::default();
        let now = Instant::now();
        for (hash, len) in found {
            index.disk_used += len;
            index.add(hash, Entry { len, uses: 0, tick: 0, last_used: now, mem: None, on_disk: true });
        }
        Ok(PieceCache { inner: Arc::new(Inner { cfg, index: Mutex::new(index), stats: CacheStats::default() }) })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.inner.cfg
    }

    pub fn stats(&self) -> &CacheStats {
        &self.inner.stats
    }

    pub fn usage(&self) -> CacheUsage {
        let ix = self.inner.index.lock();
        CacheUsage { pieces: ix.entries.len(), memory_bytes: ix.mem_used, disk_bytes: ix.disk_used }
    }

    pub fn contains(&self, hash: &PieceHash) -> bool {
        self.inner.index.lock().entries.contains_key(hash)
    }

    /// For each hash, whether it is held (one lock for the lot).
    pub fn holds(&self, hashes: &[PieceHash]) -> Vec<bool> {
        let ix = self.inner.index.lock();
        hashes.iter().map(|h| ix.entries.contains_key(h)).collect()
    }

    /// Read a piece of `len` bytes: from here if held, else from `fetch`, whose bytes are checked
    /// against `hash` and kept unless `no_cache` or too large. Counts exactly one outcome on success.
    pub async fn read_through<E, F, Fut>(
        &self,
        hash: PieceHash,
        len: u64,
        no_cache: bool,
        fetch: F,
    ) -> Result<(Bytes, Outcome), ReadError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Bytes, Fetched), E>>,
    {
        let skip = no_cache || len > self.inner.cfg.max_item_bytes;
        if !skip && let Some(bytes) = self.lookup(&hash).await {
            self.inner.stats.count(Outcome::LocalHit);
            return Ok((bytes, Outcome::LocalHit));
        }
        let (bytes, from) = fetch().await.map_err(ReadError::Fetch)?;
        let inner = self.inner.clone();
        let kept = bytes.clone();
        let stored = blocking(move || {
            verify(&hash, &kept)?;
            if skip { Ok(false) } else { inner.store(hash, kept) }
        })
        .await??;
        let outcome = match (stored, from) {
            (false, _) => Outcome::Skip,
            (true, Fetched::Peer) => Outcome::RemoteHit,
            (true, Fetched::Origin) => Outcome::Miss,
        };
        self.inner.stats.count(outcome);
        Ok((bytes, outcome))
    }

    /// Keep a piece obtained some other way (e.g. seeding from a local file); checked first.
    /// Returns whether it is held afterwards.
    pub async fn insert(&self, hash: PieceHash, bytes: Bytes) -> Result<bool, CacheError> {
        let inner = self.inner.clone();
        blocking(move || {
            verify(&hash, &bytes)?;
            inner.store(hash, bytes)
        })
        .await?
    }

    /// A held piece for a peer: counts as a use for eviction, and as `served`, not as a read.
    pub async fn serve(&self, hash: &PieceHash) -> Option<Bytes> {
        let bytes = self.lookup(hash).await?;
        self.inner.stats.served.fetch_add(1, Ordering::Relaxed);
        Some(bytes)
    }

    /// Drop pieces unused for `idle_ttl`; how many went.
    pub async fn expire_idle(&self) -> usize {
        let now = Instant::now();
        let ttl = self.inner.cfg.idle_ttl;
        let files = {
            let mut ix = self.inner.index.lock();
            let idle: Vec<PieceHash> = ix.entries.iter().filter(|(_, e)| now.duration_since(e.last_used) >= ttl).map(|(h, _)| *h).collect();
            idle.into_iter().filter_map(|h| ix.remove(&h).filter(|e| e.on_disk).map(|_| h)).collect::<Vec<_>>()
        };
        let n = files.len();
        self.inner.stats.expired.fetch_add(n as u64, Ordering::Relaxed);
        let dir = self.inner.cfg.dir.clone();
        let _ = blocking(move || remove_files(&dir, &files)).await;
        n
    }

    /// Bytes of a held piece, memory first; a disk read may promote it to memory.
    async fn lookup(&self, hash: &PieceHash) -> Option<Bytes> {
        let (len, uses) = {
            let mut ix = self.inner.index.lock();
            let e = ix.touch(hash, Instant::now())?;
            if let Some(b) = &e.mem {
                return Some(b.clone());
            }
            (e.len, e.uses)
        };
        let path = piece_path(&self.inner.cfg.dir, hash);
        let bytes = match blocking(move || std::fs::read(path)).await {
            Ok(Ok(v)) => Bytes::from(v),
            Ok(Err(e)) => {
                // Evicted between the index and the read (or removed behind our back): not held.
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(piece = %hash, error = %e, "cache: reading a piece failed; dropping it");
                }
                self.inner.index.lock().remove(hash);
                return None;
            }
            Err(_) => return None,
        };
        if uses >= self.inner.cfg.promote_after && len <= self.inner.cfg.memory_bytes {
            let mut ix = self.inner.index.lock();
            if ix.entries.get(hash).is_some_and(|e| e.mem.is_none()) && ix.make_room_mem(len, Some(uses), self.inner.cfg.memory_bytes) {
                ix.set_mem(hash, bytes.clone());
                self.inner.stats.promoted.fetch_add(1, Ordering::Relaxed);
            }
        }
        Some(bytes)
    }
}

impl Inner {
    /// Keep verified bytes: on disk if the disk level can hold them, else in memory, else not.
    /// Blocking (file I/O).
    fn store(&self, hash: PieceHash, bytes: Bytes) -> Result<bool, CacheError> {
        let len = bytes.len() as u64;
        let now = Instant::now();
        let victims = {
            let mut ix = self.index.lock();
            if ix.touch(&hash, now).is_some() {
                return Ok(true);
            }
            if len <= self.cfg.disk_bytes {
                let victims = ix.make_room_disk(len, self.cfg.disk_bytes);
                ix.disk_used += len; // reserved while the file is written
                victims
            } else if len <= self.cfg.memory_bytes && ix.make_room_mem(len, None, self.cfg.memory_bytes) {
                ix.add(hash, Entry { len, uses: 1, tick: 0, last_used: now, mem: None, on_disk: false });
                ix.set_mem(&hash, bytes);
                return Ok(true);
            } else {
                return Ok(false);
            }
        };
        self.stats.evicted.fetch_add(victims.len() as u64, Ordering::Relaxed);
        remove_files(&self.cfg.dir, &victims);
        let written = write_piece(&self.cfg.dir, &hash, &bytes);
        let mut ix = self.index.lock();
        if let Err(source) = written {
            ix.disk_used -= len;
            return Err(CacheError::Io { hash, source });
        }
        if ix.entries.contains_key(&hash) {
            ix.disk_used -= len; // a concurrent store of the same piece won; same bytes, same file
        } else {
            ix.add(hash, Entry { len, uses: 1, tick: 0, last_used: now, mem: None, on_disk: true });
        }
        Ok(true)
    }
}

fn piece_path(dir: &Path, hash: &PieceHash) -> PathBuf {
    dir.join(hash.to_hex())
}

fn verify(expected: &PieceHash, bytes: &[u8]) -> Result<(), CacheError> {
    let actual = PieceHash::of(bytes);
    if actual == *expected { Ok(()) } else { Err(CacheError::Corrupt { expected: *expected, actual }) }
}

/// Write to a temporary name, then rename: a reader sees the whole piece or none of it.
fn write_piece(dir: &Path, hash: &PieceHash, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{TMP_PREFIX}{}-{:016x}", hash.to_hex(), rand::random::<u64>()));
    std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, piece_path(dir, hash))).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn remove_files(dir: &Path, hashes: &[PieceHash]) {
    for h in hashes {
        if let Err(e) = std::fs::remove_file(piece_path(dir, h))
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(piece = %h, error = %e, "cache: removing an evicted piece failed");
        }
    }
}

/// The pieces in `dir` that match their names, within `budget`; everything of ours that does not
/// qualify is removed. Files with other names are left alone.
fn scan(dir: &Path, budget: u64) -> Result<Vec<(PieceHash, u64)>, CacheError> {
    let dir_err = |source| CacheError::Dir { path: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(dir_err)?;
    let mut found = Vec::new();
    let mut used = 0;
    for item in std::fs::read_dir(dir).map_err(dir_err)? {
        let path = item.map_err(dir_err)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if name.starts_with(TMP_PREFIX) {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let Ok(hash) = PieceHash::parse("file", name) else { continue };
        let keep = std::fs::read(&path).ok().filter(|b| PieceHash::of(b) == hash && used + b.len() as u64 <= budget);
        match keep {
            Some(b) => {
                used += b.len() as u64;
                found.push((hash, b.len() as u64));
            }
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(found)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| CacheError::Task(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    fn piece(n: u8, len: usize) -> (PieceHash, Bytes) {
        let b = Bytes::from(vec![n; len]);
        (PieceHash::of(&b), b)
    }

    fn cfg(dir: &Path) -> CacheConfig {
        CacheConfig { memory_bytes: 0, disk_bytes: 1000, max_item_bytes: 500, promote_after: 3, ..CacheConfig::new(dir) }
    }

    async fn from(cache: &PieceCache, p: &(PieceHash, Bytes), src: Fetched) -> Outcome {
        let b = p.1.clone();
        let (got, outcome) = cache.read_through(p.0, b.len() as u64, false, || async { Ok::<_, Infallible>((b, src)) }).await.unwrap();
        assert_eq!(got, p.1);
        outcome
    }

    #[tokio::test]
    async fn each_read_counts_exactly_one_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PieceCache::open(cfg(dir.path())).await.unwrap();
        let (a, b, big) = (piece(1, 100), piece(2, 100), piece(3, 600));
        assert_eq!(from(&cache, &a, Fetched::Origin).await, Outcome::Miss);
        assert_eq!(from(&cache, &a, Fetched::Origin).await, Outcome::LocalHit, "held now: the fetch is not called");
        assert_eq!(from(&cache, &b, Fetched::Peer).await, Outcome::RemoteHit);
        assert_eq!(from(&cache, &big, Fetched::Peer).await, Outcome::Skip, "larger than max_item_bytes");
        assert!(!cache.contains(&big.0));
        let c = piece(4, 10);
        let (_, o) = cache.read_through(c.0, 10, true, || async { Ok::<_, Infallible>((c.1.clone(), Fetched::Origin)) }).await.unwrap();
        assert_eq!(o, Outcome::Skip, "no_cache");
        assert!(!cache.contains(&c.0));
        let counts = cache.stats().snapshot();
        assert_eq!((counts.local_hit, counts.remote_hit, counts.miss, counts.skip), (1, 1, 1, 2));
        assert_eq!(serde_json::to_value(cache.stats()).unwrap()["miss"], 1);
    }

    #[tokio::test]
    async fn wrong_bytes_are_refused_kept_nowhere_and_not_counted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PieceCache::open(cfg(dir.path())).await.unwrap();
        let (a, b) = (piece(1, 100), piece(2, 100));
        let res = cache.read_through(a.0, 100, false, || async { Ok::<_, Infallible>((b.1.clone(), Fetched::Peer)) }).await;
        assert!(matches!(res, Err(ReadError::Cache(CacheError::Corrupt { expected, .. })) if expected == a.0));
        let failed = cache.read_through(a.0, 100, false, || async { Err::<(Bytes, Fetched), _>("peer gone") }).await;
        assert!(matches!(failed, Err(ReadError::Fetch("peer gone"))));
        assert!(!cache.contains(&a.0) && !cache.contains(&b.0));
        assert_eq!(cache.stats().snapshot(), CacheCounts::default());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written");
        assert!(matches!(cache.insert(a.0, b.1.clone()).await, Err(CacheError::Corrupt { .. })));
    }

    #[tokio::test]
    async fn pieces_live_in_files_named_by_hash_within_the_disk_budget() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PieceCache::open(cfg(dir.path())).await.unwrap();
        let pieces: Vec<_> = (0..15).map(|n| piece(n, 100)).collect();
        for p in &pieces[..10] {
            assert!(cache.insert(p.0, p.1.clone()).await.unwrap());
        }
        assert_eq!(std::fs::read(dir.path().join(pieces[3].0.to_hex())).unwrap(), pieces[3].1);
        // Use the first five again: the next five arrivals evict the other five.
        for p in &pieces[..5] {
            assert_eq!(from(&cache, p, Fetched::Origin).await, Outcome::LocalHit);
        }
        for p in &pieces[10..] {
            cache.insert(p.0, p.1.clone()).await.unwrap();
        }
        let usage = cache.usage();
        assert_eq!((usage.pieces, usage.disk_bytes), (10, 1000));
        assert!(pieces[..5].iter().all(|p| cache.contains(&p.0)));
        assert!(pieces[5..10].iter().all(|p| !cache.contains(&p.0) && !dir.path().join(p.0.to_hex()).exists()));
        assert_eq!(cache.stats().snapshot().evicted, 5);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 10);
    }

    #[tokio::test]
    async fn open_takes_in_good_pieces_and_removes_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (piece(1, 100), piece(2, 100));
        {
            let cache = PieceCache::open(cfg(dir.path())).await.unwrap();
            cache.insert(a.0, a.1.clone()).await.unwrap();
            cache.insert(b.0, b.1.clone()).await.unwrap();
        }
        std::fs::write(dir.path().join(b.0.to_hex()), b"not piece b").unwrap();
        std::fs::write(dir.path().join(".tmp-leftover"), b"x").unwrap();
        std::fs::write(dir.path().join("README"), b"not ours").unwrap();
        let cache = PieceCache::open(cfg(dir.path())).await.unwrap();
        assert!(cache.contains(&a.0) && !cache.contains(&b.0));
        assert_eq!(cache.usage().disk_bytes, 100);
        assert!(!dir.path().join(b.0.to_hex()).exists() && !dir.path().join(".tmp-leftover").exists());
        assert!(dir.path().join("README").exists(), "files that are not ours stay");
        assert_eq!(from(&cache, &a, Fetched::Origin).await, Outcome::LocalHit);
    }

    #[tokio::test]
    async fn frequently_used_pieces_are_promoted_to_memory() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PieceCache::open(CacheConfig { memory_bytes: 100, ..cfg(dir.path()) }).await.unwrap();
        let (a, b) = (piece(1, 100), piece(2, 100));
        cache.insert(a.0, a.1.clone()).await.unwrap();
        cache.insert(b.0, b.1.clone()).await.unwrap();
        assert_eq!(cache.serve(&a.0).await.unwrap(), a.1);
        assert_eq!(cache.usage().memory_bytes, 0, "two uses: not yet");
        assert_eq!(cache.serve(&a.0).await.unwrap(), a.1);
        assert_eq!(cache.usage().memory_bytes, 100);
        // Served from memory now, even with the file gone.
        std::fs::remove_file(dir.path().join(a.0.to_hex())).unwrap();
        assert_eq!(cache.serve(&a.0).await.unwrap(), a.1);
        // b, used less (3 uses against 4), cannot push a out of memory.
        for _ in 0..2 {
            cache.serve(&b.0).await.unwrap();
        }
        let counts = cache.stats().snapshot();
        assert_eq!((counts.promoted, counts.served), (1, 5));
        assert_eq!(cache.usage().memory_bytes, 100);
        assert_eq!((counts.local_hit, counts.miss), (0, 0), "serving peers is not a read");
    }

    #[tokio::test]
    async fn a_memory_only_cache_keeps_pieces_without_files() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PieceCache::open(CacheConfig { memory_bytes: 200, disk_bytes: 0, ..cfg(dir.path()) }).await.unwrap();
        let pieces: Vec<_> = (0..3).map(|n| piece(n, 100)).collect();
        for p in &pieces {
            assert_eq!(from(&cache, p, Fetched::Peer).await, Outcome::RemoteHit);
        }
        assert_eq!(cache.usage(), CacheUsage { pieces: 2, memory_bytes: 200, disk_bytes: 0 });
        assert!(!cache.contains(&pieces[0].0), "the oldest of equals went");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_pieces_expire_after_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PieceCache::open(CacheConfig { idle_ttl: Duration::from_secs(60), ..cfg(dir.path()) }).await.unwrap();
        let (a, b) = (piece(1, 100), piece(2, 100));
        cache.insert(a.0, a.1.clone()).await.unwrap();
        cache.insert(b.0, b.1.clone()).await.unwrap();
        tokio::time::advance(Duration::from_secs(40)).await;
        cache.serve(&b.0).await.unwrap();
        assert_eq!(cache.expire_idle().await, 0);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(cache.expire_idle().await, 1, "a idle 70 s, b idle 30 s");
        assert!(!cache.contains(&a.0) && cache.contains(&b.0));
        assert!(!dir.path().join(a.0.to_hex()).exists());
        assert_eq!(cache.stats().snapshot().expired, 1);
    }
}
