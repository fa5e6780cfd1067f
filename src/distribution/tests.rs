//! Distribution end to end on loopback: real piece servers and a stand-in origin on port 0, real
//! cache directories, real files. Caps are checked as "not faster than the cap allows" (bytes
//! beyond the burst divided by the cap), never against an upper time bound.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngCore;
use secrecy::SecretString;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::*;

const TOKEN: &str = "node-secret";

struct Served {
    url: String,
    task: JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(routes: warp::filters::BoxedFilter<(warp::reply::Response,)>) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    Served { url, task: tokio::spawn(warp::serve(routes).incoming(listener).run()) }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

struct Node {
    fetcher: Fetcher,
    cache: PieceCache,
    catalog: Catalog,
    cfg: FetchConfig,
    server: Served,
    dir: PathBuf,
}

impl Node {
    async fn start(root: &Path, name: &str, cache_cfg: impl FnOnce(CacheConfig) -> CacheConfig, down: Bandwidth, up: Bandwidth) -> Node {
        let dir = root.join(name);
        let cache = PieceCache::open(cache_cfg(CacheConfig::new(dir.join("cache")))).await.unwrap();
        let catalog = Catalog::default();
        let server = serve(server::routes(catalog.clone(), cache.clone(), up)).await;
        let cfg = FetchConfig {
            node_id: name.to_string(),
            have_interval: Duration::from_millis(20),
            request_timeout: Duration::from_secs(10),
            ..FetchConfig::default()
        };
        Node { fetcher: Fetcher::new(cache.clone(), catalog.clone(), down, cfg.clone()), cache, catalog, cfg, server, dir }
    }

    fn as_peer(&self, name: &str) -> Arc<dyn PieceSource> {
        Arc::new(HttpSource::peer(name, self.server.url.clone(), client()))
    }

    fn target(&self) -> PathBuf {
        self.dir.join("image")
    }
}

struct Origin {
    manifest: Manifest,
    up: Bandwidth,
    server: Served,
}

impl Origin {
    async fn start(root: &Path, size: usize, piece_size: u64, up: Bandwidth) -> Origin {
        let mut data = vec![0u8; size];
        rand::rng().fill_bytes(&mut data);
        let path = root.join("origin.img");
        std::fs::write(&path, &data).unwrap();
        let manifest = Manifest::from_file(&path, piece_size).unwrap();
        let routes = server::file_origin(vec![(manifest.clone(), path)], Some(SecretString::from(TOKEN)), up.clone());
        Origin { manifest, up, server: serve(routes).await }
    }

    fn source(&self) -> Arc<dyn PieceSource> {
        Arc::new(HttpSource::origin(self.server.url.clone(), Some(SecretString::from(TOKEN)), client()))
    }
}

fn sha256_of(path: &Path) -> String {
    Manifest::from_file(path, DEFAULT_PIECE_SIZE).unwrap().sha256
}

/// `bytes` through a limiter of `rate` B/s and `burst` cannot have taken less than this.
fn least_time(bytes: u64, rate: u64, burst: u64) -> Duration {
    Duration::from_secs_f64(bytes.saturating_sub(burst) as f64 / rate as f64)
}

#[tokio::test]
async fn four_nodes_fetch_from_the_origin_and_each_other() {
    let root = TempDir::new().unwrap();
    let (origin_rate, burst) = (2_000_000, 64 * 1024);
    let origin = Origin::start(root.path(), 1536 * 1024 + 77, 64 * 1024, Bandwidth::new(origin_rate, burst).unwrap()).await;
    let manifest = HttpSource::origin(origin.server.url.clone(), Some(SecretString::from(TOKEN)), client())
        .manifest(&origin.manifest.sha256)
        .await
        .unwrap();
    assert_eq!(manifest, origin.manifest, "the manifest as the origin serves it");
    let mut nodes = Vec::new();
    for i in 0..4 {
        nodes.push(Node::start(root.path(), &format!("n{i}"), |c| c, Bandwidth::unlimited(), Bandwidth::unlimited()).await);
    }
    let started = Instant::now();
    let fetches: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let peers = nodes.iter().enumerate().filter(|(j, _)| *j != i).map(|(j, n)| n.as_peer(&format!("n{j}"))).collect();
            let (fetcher, m, origin, target) = (node.fetcher.clone(), manifest.clone(), origin.source(), node.target());
            tokio::spawn(async move { fetcher.fetch(m, origin, peers, &target).await })
        })
        .collect();
    let mut reports = Vec::new();
    for f in fetches {
        reports.push(f.await.unwrap().expect("every node completes"));
    }
    let elapsed = started.elapsed();
    for node in &nodes {
        assert_eq!(sha256_of(&node.target()), manifest.sha256);
        assert!(!PathBuf::from(format!("{}.part", node.target().display())).exists());
    }
    let remote: u64 = reports.iter().map(|r| r.remote_hits).sum();
    let misses: u64 = reports.iter().map(|r| r.misses).sum();
    assert!(remote > 0, "pieces moved between peers: {reports:#?}");
    assert_eq!(remote + misses, 4 * manifest.piece_count() as u64, "every piece read once per node, as a remote hit or a miss");
    let counts: Vec<CacheCounts> = nodes.iter().map(|n| n.cache.stats().snapshot()).collect();
    assert_eq!(counts.iter().map(|c| c.remote_hit).sum::<u64>(), remote, "the cache counted what the fetches report");
    assert_eq!(counts.iter().map(|c| c.served).sum::<u64>(), remote, "every remote hit was served by a peer");
    // The origin sent less than a star distribution would, and no faster than its cap.
    let from_origin = origin.up.total();
    assert!(from_origin < 4 * manifest.size, "origin sent {from_origin} bytes");
    assert!(elapsed >= least_time(from_origin, origin_rate, burst), "{from_origin} bytes from the origin in {elapsed:?}");
}

#[tokio::test]
async fn a_peer_serving_corrupt_pieces_does_not_corrupt_the_result() {
    let root = TempDir::new().unwrap();
    let origin = Origin::start(root.path(), 640 * 1024, 64 * 1024, Bandwidth::unlimited()).await;
    let no_memory = |c: CacheConfig| CacheConfig { memory_bytes: 0, ..c };
    let liar = Node::start(root.path(), "liar", no_memory, Bandwidth::unlimited(), Bandwidth::unlimited()).await;
    liar.fetcher.fetch(origin.manifest.clone(), origin.source(), vec![], &liar.target()).await.unwrap();
    // Its disk goes bad: every piece file now holds other bytes (served from disk, unchecked).
    for h in origin.manifest.piece_hashes().unwrap() {
        let path = liar.dir.join("cache").join(h.to_hex());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    let mut node = Node::start(root.path(), "victim", |c| c, Bandwidth::unlimited(), Bandwidth::unlimited()).await;
    // No fresh pieces from the origin while a peer may have them: the liar is certainly asked.
    let cfg = FetchConfig { origin_concurrency: 0, ..node.cfg.clone() };
    node.fetcher = Fetcher::new(node.cache.clone(), node.catalog.clone(), Bandwidth::unlimited(), cfg);
    let report = node.fetcher.fetch(origin.manifest.clone(), origin.source(), vec![liar.as_peer("liar")], &node.target()).await.unwrap();
    assert_eq!(sha256_of(&node.target()), origin.manifest.sha256);
    assert!(report.bad_pieces >= 2, "the liar was asked and caught, then dropped: {report:?}");
    assert_eq!(report.remote_hits, 0, "no piece from the liar was kept");
    assert_eq!(report.misses, origin.manifest.piece_count() as u64);
    assert!(node.cache.stats().snapshot().remote_hit == 0 && liar.cache.stats().snapshot().served >= 1);
}

#[tokio::test]
async fn a_download_is_no_faster_than_the_node_cap() {
    let root = TempDir::new().unwrap();
    let origin = Origin::start(root.path(), 1024 * 1024, 64 * 1024, Bandwidth::unlimited()).await;
    let (rate, burst) = (1_000_000, 64 * 1024);
    let node = Node::start(root.path(), "n", |c| c, Bandwidth::new(rate, burst).unwrap(), Bandwidth::unlimited()).await;
    let started = Instant::now();
    let report = node.fetcher.fetch(origin.manifest.clone(), origin.source(), vec![], &node.target()).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(report.origin_bytes, origin.manifest.size);
    assert!(
        elapsed >= least_time(origin.manifest.size, rate, burst),
        "{} bytes in {elapsed:?} at a cap of {rate} B/s",
        origin.manifest.size
    );
    // Fetched again: all local hits, nothing downloaded.
    let again = node.fetcher.fetch(origin.manifest.clone(), origin.source(), vec![], &node.dir.join("copy")).await.unwrap();
    assert_eq!((again.local_hits, again.origin_bytes), (origin.manifest.piece_count() as u64, 0));
    assert_eq!(sha256_of(&node.dir.join("copy")), origin.manifest.sha256);
}

#[tokio::test]
async fn a_wrong_manifest_leaves_no_file_behind() {
    let root = TempDir::new().unwrap();
    let origin = Origin::start(root.path(), 200 * 1024, 64 * 1024, Bandwidth::unlimited()).await;
    let node = Node::start(root.path(), "n", |c| c, Bandwidth::unlimited(), Bandwidth::unlimited()).await;
    // Pieces that check out, under a whole-file hash that does not: the origin still serves
    // the pieces by image id, so give the manifest the right id but a wrong piece list.
    let mut m = origin.manifest.clone();
    m.pieces.swap(0, 1);
    let err = node.fetcher.fetch(m, origin.source(), vec![], &node.target()).await.unwrap_err();
    assert!(matches!(err, FetchError::PieceFailed { .. }), "{err}");
    assert!(!node.target().exists());
    assert!(!PathBuf::from(format!("{}.part", node.target().display())).exists());
    // Every piece checks out but the whole does not: an origin that lies about the image's id.
    let mut lying = origin.manifest.clone();
    lying.sha256 = "ab".repeat(32);
    let fake = serve(server::file_origin(vec![(lying.clone(), root.path().join("origin.img"))], None, Bandwidth::unlimited())).await;
    let source: Arc<dyn PieceSource> = Arc::new(HttpSource::origin(fake.url.clone(), None, client()));
    let err = node.fetcher.fetch(lying, source, vec![], &node.target()).await.unwrap_err();
    assert!(matches!(err, FetchError::FileMismatch { .. }), "{err}");
    assert!(!node.target().exists());
}
