//! The distribution benchmark: one image to N nodes in this process, each node with its own
//! piece server on 127.0.0.1:0, its own cache directory (small memory level, the disk level holds
//! the image) and its own caps of C bytes/s down and up; the origin (a stand-in for the hive's
//! image routes) is capped at C too. Two ways are timed from the same start line:
//! (a) P2P: every node fetches from its peers and the origin; (b) star: every node from the
//! origin only. Both are compared with the lower bound size / C (no node can download faster).
//! Each node's file is checked whole (SHA-256) by the fetcher, then deleted to spare the disk.
//!
//! `cargo bench --bench distribution [-- --size-mb S --nodes N --cap-mbps C --piece-kib P --only p2p|star]`
//! measures (defaults 1024 MiB, 16 nodes, 100 MB/s where 1 MB = 10^6 bytes, 4096 KiB pieces);
//! `--concurrency`, `--per-peer` and `--have-ms` override the fetcher's defaults.
//! Without `--bench` (as `cargo test --all-targets` runs it) it is a smoke run: 4 MiB, 4 nodes,
//! 20 MB/s, 256 KiB pieces, exiting non-zero unless every node got the image.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use guaca_hive::distribution::{
    Bandwidth, CacheConfig, Catalog, FetchConfig, Fetcher, HttpSource, Manifest, PieceCache, PieceSource, server,
};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const MB: f64 = 1e6;
const MIB: u64 = 1 << 20;

struct Args {
    size: u64,
    nodes: usize,
    cap: u64,
    piece: u64,
    p2p: bool,
    star: bool,
    bench: bool,
    fetch: FetchConfig,
}

fn parse_args() -> anyhow::Result<Args> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let bench = argv.iter().any(|a| a == "--bench");
    let (mut size_mb, mut nodes, mut cap_mbps, mut piece_kib) = if bench { (1024, 16, 100, 4096) } else { (4, 4, 20, 256) };
    let (mut p2p, mut star) = (true, true);
    let mut fetch = FetchConfig::default();
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> anyhow::Result<u64> {
            let v = it.next().ok_or_else(|| anyhow!("{name} needs a value"))?;
            let n: u64 = v.parse().with_context(|| format!("{name} {v:?}"))?;
            if n == 0 {
                bail!("{name} must be at least 1");
            }
            Ok(n)
        };
        match a.as_str() {
            "--size-mb" => size_mb = value("--size-mb")?,
            "--nodes" => nodes = value("--nodes")? as usize,
            "--cap-mbps" => cap_mbps = value("--cap-mbps")?,
            "--piece-kib" => piece_kib = value("--piece-kib")?,
            "--concurrency" => fetch.concurrency = value("--concurrency")? as usize,
            "--per-peer" => fetch.per_peer = value("--per-peer")? as usize,
            "--have-ms" => fetch.have_interval = Duration::from_millis(value("--have-ms")?),
            "--only" => match it.next().map(String::as_str) {
                Some("p2p") => star = false,
                Some("star") => p2p = false,
                other => bail!("--only takes p2p or star, not {other:?}"),
            },
            _ => {} // `--bench`, test-harness flags and filters: not ours.
        }
    }
    Ok(Args { size: size_mb * MIB, nodes, cap: cap_mbps * 1_000_000, piece: piece_kib * 1024, p2p, star, bench, fetch })
}

fn main() {
    let code = match parse_args().and_then(|args| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(run(args))
    }) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("distribution: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

struct Served(JoinHandle<()>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve(routes: warp::filters::BoxedFilter<(warp::reply::Response,)>) -> anyhow::Result<(String, Served)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    Ok((url, Served(tokio::spawn(warp::serve(routes).incoming(listener).run()))))
}

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().no_proxy().build()?)
}

/// A file of `size` random bytes and its manifest.
async fn image(dir: &Path, size: u64, piece: u64) -> anyhow::Result<(PathBuf, Manifest)> {
    let path = dir.join("origin.img");
    let p = path.clone();
    let manifest = tokio::task::spawn_blocking(move || -> anyhow::Result<Manifest> {
        let mut rng = SmallRng::seed_from_u64(0x5eed);
        let mut out = std::io::BufWriter::new(std::fs::File::create(&p)?);
        let mut buf = vec![0u8; 8 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill_bytes(&mut buf[..n]);
            out.write_all(&buf[..n])?;
            left -= n as u64;
        }
        out.flush()?;
        Ok(Manifest::from_file(&p, piece)?)
    })
    .await??;
    Ok((path, manifest))
}

struct Node {
    fetcher: Fetcher,
    url: String,
    _server: Served,
    target: PathBuf,
}

async fn node(dir: PathBuf, id: String, args: &Args) -> anyhow::Result<Node> {
    let (size, cap) = (args.size, args.cap);
    let cache_cfg = CacheConfig {
        memory_bytes: 16 * MIB,
        disk_bytes: size + 64 * MIB,
        max_item_bytes: 256 * MIB,
        ..CacheConfig::new(dir.join("cache"))
    };
    let cache = PieceCache::open(cache_cfg).await?;
    let catalog = Catalog::default();
    let (url, server) = serve(server::routes(catalog.clone(), cache.clone(), Bandwidth::capped(Some(cap))?)).await?;
    let fetcher = Fetcher::new(cache, catalog, Bandwidth::capped(Some(cap))?, FetchConfig { node_id: id, ..args.fetch.clone() });
    Ok(Node { fetcher, url, _server: server, target: dir.join("image") })
}

struct Run {
    wall: Duration,
    /// CPU time of this process (all threads) per second of the run, in cores.
    cores: f64,
    done: Vec<Duration>,
    origin_bytes: u64,
    peer_bytes: u64,
}

/// Every node fetches the image at once; `p2p` decides whether nodes know each other.
async fn distribute(root: &Path, name: &str, args: &Args, manifest: &Manifest, origin_url: &str, p2p: bool) -> anyhow::Result<Run> {
    let base = root.join(name);
    let mut nodes = Vec::new();
    for i in 0..args.nodes {
        nodes.push(node(base.join(format!("n{i}")), format!("n{i}"), args).await?);
    }
    let origin: Arc<dyn PieceSource> = Arc::new(HttpSource::origin(origin_url, None, client()?));
    let started = Instant::now();
    let cpu_before = cpu_seconds();
    let mut tasks = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut peers: Vec<Arc<dyn PieceSource>> = Vec::new();
        if p2p {
            for (j, other) in nodes.iter().enumerate().filter(|(j, _)| *j != i) {
                peers.push(Arc::new(HttpSource::peer(format!("n{j}"), other.url.clone(), client()?)));
            }
        }
        let (fetcher, m, origin, target) = (n.fetcher.clone(), manifest.clone(), origin.clone(), n.target.clone());
        tasks.push(tokio::spawn(async move {
            let report = fetcher.fetch(m, origin, peers, &target).await;
            let at = started.elapsed();
            // Checked whole by the fetcher; the file is not needed any more.
            let _ = tokio::fs::remove_file(&target).await;
            report.map(|r| (at, r))
        }));
    }
    let mut run = Run { wall: Duration::ZERO, cores: 0.0, done: Vec::new(), origin_bytes: 0, peer_bytes: 0 };
    for (i, t) in tasks.into_iter().enumerate() {
        let (at, report) = t.await?.map_err(|e| anyhow!("{name}: node {i}: {e}"))?;
        run.done.push(at);
        run.origin_bytes += report.origin_bytes;
        run.peer_bytes += report.peer_bytes;
    }
    // Every node has its file when the last one does (its deletion afterwards is not counted).
    run.wall = run.done.iter().max().copied().unwrap_or_default();
    run.cores = (cpu_seconds() - cpu_before) / started.elapsed().as_secs_f64();
    drop(nodes);
    tokio::fs::remove_dir_all(&base).await?;
    Ok(run)
}

/// User + system CPU seconds of this process so far (Linux, 100 ticks a second); 0 elsewhere.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the command name (which is in parentheses and may hold spaces): utime and
    // stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let f: Vec<f64> = after.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
    f.iter().sum::<f64>() / 100.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run(args: Args) -> anyhow::Result<()> {
    // In the system's temporary directory ($TMPDIR).
    let root = TempDir::new()?;
    let t0 = Instant::now();
    let (path, manifest) = image(root.path(), args.size, args.piece).await?;
    let made = t0.elapsed();
    let (origin_url, _origin) =
        serve(server::file_origin(vec![(manifest.clone(), path)], None, Bandwidth::capped(Some(args.cap))?)).await?;

    let mut rows = Vec::new();
    for (name, p2p, on) in [("P2P (peers + origin)", true, args.p2p), ("star (origin only)", false, args.star)] {
        if on {
            let run = distribute(root.path(), if p2p { "p2p" } else { "star" }, &args, &manifest, &origin_url, p2p).await?;
            rows.push((name, run));
        }
    }

    let bound = args.size as f64 / args.cap as f64;
    println!();
    let mode = if args.bench { "bench" } else { "smoke" };
    println!(
        "### distribution ({mode}): {} MiB in {} pieces of {} KiB to {} nodes, every node and the origin capped at {} MB/s",
        args.size / MIB,
        manifest.piece_count(),
        args.piece / 1024,
        args.nodes,
        args.cap as f64 / MB
    );
    println!("(image generated and hashed in {:.1} s; data in {})", made.as_secs_f64(), root.path().display());
    println!();
    println!("lower bound size / C = {bound:.2} s");
    println!();
    println!(
        "| way | time (s) | ratio to bound | node p50 (s) | node p99 (s) | min node speed (% of cap) | origin sent (x image) | from peers | CPU (cores of 2) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, run) in &rows {
        let mut done = run.done.clone();
        done.sort();
        let slowest = done.last().copied().unwrap_or_default().as_secs_f64();
        let min_speed = args.size as f64 / slowest / args.cap as f64 * 100.0;
        let total = (run.origin_bytes + run.peer_bytes).max(1) as f64;
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0}% | {:.2} | {:.0}% | {:.2} |",
            run.wall.as_secs_f64(),
            run.wall.as_secs_f64() / bound,
            percentile(&done, 50.0).as_secs_f64(),
            percentile(&done, 99.0).as_secs_f64(),
            min_speed,
            run.origin_bytes as f64 / args.size as f64,
            run.peer_bytes as f64 / total * 100.0,
            run.cores
        );
    }
    println!();
    Ok(())
}
