//! The agent's images: fetched as content-addressed pieces from peers and from the hive (the
//! origin, with the node's credential), each piece checked against its hash, the whole file
//! checked against the image's SHA-256, kept in `data_dir/images/<sha256>`; the pieces stay in
//! the node's two-level LFU cache and are served to peers on the node's peer port, under the
//! node's upload cap. Downloads share the node's download cap.

use std::path::PathBuf;
use std::sync::Arc;

use secrecy::SecretString;

use super::proto::{CacheCounters, Fetched, Peer};
use super::stock::Stock;
use crate::distribution::{Bandwidth, CacheConfig, Catalog, FetchConfig, Fetcher, HttpSource, PieceCache, PieceSource};
use crate::drivers::DriverError;

#[derive(Clone)]
pub struct AgentImages {
    down: Bandwidth,
    /// This node's id as its peers name it (ranks the nodes to share out the origin's work);
    /// known once the hive has welcomed the agent.
    node_id: Arc<parking_lot::Mutex<String>>,
    catalog: Catalog,
    cache: PieceCache,
    up: Bandwidth,
    dir: PathBuf,
    hive: String,
    credential: SecretString,
    client: reqwest::Client,
    stock: Stock,
    disks: PathBuf,
}

/// Bandwidth caps of a node, bytes per second (`None`: unlimited).
#[derive(Clone, Copy, Debug, Default)]
pub struct Caps {
    pub up: Option<u64>,
    pub down: Option<u64>,
}

fn bandwidth(rate: Option<u64>) -> Result<Bandwidth, DriverError> {
    match rate {
        None => Ok(Bandwidth::unlimited()),
        // A burst of a quarter second keeps the cap honest over short windows.
        Some(r) => Bandwidth::new(r, (r / 4).max(256 * 1024)).map_err(|e| DriverError::Failed(e.to_string())),
    }
}

impl AgentImages {
    /// `stock`: ready copies to keep per image.
    pub async fn open(
        data_dir: &std::path::Path,
        hive: &str,
        credential: &str,
        caps: Caps,
        stock: usize,
    ) -> Result<AgentImages, DriverError> {
        let dir = data_dir.join("images");
        std::fs::create_dir_all(&dir).map_err(|e| DriverError::Failed(format!("{}: {e}", dir.display())))?;
        let cache = PieceCache::open(CacheConfig::new(data_dir.join("cache"))).await.map_err(|e| DriverError::Failed(e.to_string()))?;
        let catalog = Catalog::default();
        let (up, down) = (bandwidth(caps.up)?, bandwidth(caps.down)?);
        let io = |e: std::io::Error| DriverError::Failed(e.to_string());
        let stock = Stock::open(data_dir, stock).map_err(io)?;
        let disks = data_dir.join("disks");
        std::fs::create_dir_all(&disks).map_err(io)?;
        let me = AgentImages {
            down,
            node_id: Arc::default(),
            catalog,
            cache,
            up,
            dir,
            hive: hive.trim_end_matches('/').to_string(),
            credential: SecretString::from(credential.to_string()),
            client: reqwest::Client::new(),
            stock,
            disks,
        };
        for sha in me.held() {
            me.stock.replenish(&sha);
        }
        // Idle pieces leave the cache after its TTL.
        let cache = me.cache.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(600));
            loop {
                every.tick().await;
                cache.expire_idle().await;
            }
        });
        // The catalog lives in memory: after a restart, learn the manifests of the images held
        // again, so the pieces still in the cache are served to peers.
        let me2 = me.clone();
        tokio::spawn(async move {
            let origin = HttpSource::origin(&me2.hive, Some(me2.credential.clone()), me2.client.clone());
            for sha in me2.held() {
                match origin.manifest(&sha).await {
                    Ok(m) => {
                        let _ = me2.catalog.add(m);
                    }
                    Err(e) => tracing::warn!(image = %sha, error = %e, "cannot learn the manifest of a held image"),
                }
            }
        });
        Ok(me)
    }

    /// The hive welcomed this node as `id`.
    pub fn set_node_id(&self, id: u64) {
        *self.node_id.lock() = id.to_string();
    }

    /// Ready copies per held image.
    pub fn stock(&self) -> std::collections::BTreeMap<String, u32> {
        self.stock.counts()
    }

    /// A VM `domain` was created from `template`: if that is an image held here, give it its
    /// disk from the ready stock (or a fresh copy when the stock ran dry).
    pub async fn give_disk(&self, domain: &str, template: &str) -> Result<(), DriverError> {
        if !self.held().iter().any(|h| h == template) {
            return Ok(());
        }
        let (stock, sha, to, source) = (self.stock.clone(), template.to_string(), self.disk(domain), self.dir.join(template));
        tokio::task::spawn_blocking(move || {
            if !stock.take(&sha, &to)? {
                std::fs::copy(&source, &to)?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(|e| DriverError::Failed(e.to_string()))?
        .map_err(|e| DriverError::Failed(format!("disk for {domain}: {e}")))
    }

    /// The VM's disk goes with it.
    pub fn drop_disk(&self, domain: &str) {
        let _ = std::fs::remove_file(self.disk(domain));
    }

    fn disk(&self, domain: &str) -> PathBuf {
        self.disks.join(format!("{domain}.img"))
    }

    /// The peer-facing piece server (mounted by the agent on its peer port).
    pub fn routes(&self) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
        crate::distribution::server::routes(self.catalog.clone(), self.cache.clone(), self.up.clone())
    }

    /// The file of image `sha256`, if it is held here whole and verified.
    pub fn image_path(&self, sha256: &str) -> Option<PathBuf> {
        let ok = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
        Some(self.dir.join(sha256)).filter(|p| ok && p.is_file())
    }

    /// Images held whole and verified.
    pub fn held(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return vec![] };
        let mut v: Vec<String> = rd
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect();
        v.sort();
        v
    }

    pub fn counters(&self) -> CacheCounters {
        let c = self.cache.stats().snapshot();
        CacheCounters { local_hit: c.local_hit, remote_hit: c.remote_hit, miss: c.miss, skip: c.skip, served: c.served }
    }

    pub async fn fetch(&self, sha256: &str, peers: Vec<Peer>) -> Result<Fetched, DriverError> {
        self.fetch_from(&self.hive.clone(), sha256, peers).await
    }

    /// `fetch` from hive instance `origin` (base URL) instead of the primary: for an image
    /// that instance was just given (an exported template), which another instance may lack.
    pub async fn fetch_from(&self, origin: &str, sha256: &str, peers: Vec<Peer>) -> Result<Fetched, DriverError> {
        let fetched = self.fetch_into(origin, sha256, peers, &self.dir.join(sha256)).await?;
        self.stock.replenish(sha256);
        Ok(fetched)
    }

    /// Fetch image `sha256` from hive instance `origin` into `target`, verified, without making
    /// it an image the node holds (not in `held`, no stock): for a file used once (a moved
    /// VM's disk), which the caller removes. The pieces pass through the node's cache as usual.
    pub async fn fetch_to(&self, origin: &str, sha256: &str, target: &std::path::Path) -> Result<Fetched, DriverError> {
        self.fetch_into(origin, sha256, Vec::new(), target).await
    }

    async fn fetch_into(&self, origin: &str, sha256: &str, peers: Vec<Peer>, target: &std::path::Path) -> Result<Fetched, DriverError> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DriverError::Failed(format!("{sha256:?} is not a SHA-256")));
        }
        let origin = HttpSource::origin(origin.trim_end_matches('/'), Some(self.credential.clone()), self.client.clone());
        let manifest = origin.manifest(sha256).await.map_err(|e| DriverError::Failed(e.to_string()))?;
        let peers: Vec<Arc<dyn PieceSource>> = peers
            .into_iter()
            .map(|p| Arc::new(HttpSource::peer(p.node.to_string(), p.url, self.client.clone())) as Arc<dyn PieceSource>)
            .collect();
        let cfg = FetchConfig { node_id: self.node_id.lock().clone(), ..FetchConfig::default() };
        let fetcher = Fetcher::new(self.cache.clone(), self.catalog.clone(), self.down.clone(), cfg);
        let r = fetcher.fetch(manifest, Arc::new(origin), peers, target).await.map_err(|e| DriverError::Failed(e.to_string()))?;
        Ok(Fetched {
            sha256: r.image,
            size: r.size,
            pieces: r.pieces,
            elapsed_ms: r.elapsed_ms,
            local_hits: r.local_hits,
            remote_hits: r.remote_hits,
            misses: r.misses,
            peer_bytes: r.peer_bytes,
            origin_bytes: r.origin_bytes,
            bad_pieces: r.bad_pieces,
            // `Fetcher::fetch` checks the assembled file against the manifest's SHA-256 before
            // it renames it into place; an `Ok` is a verified file.
            verified: true,
        })
    }
}
