//! The conversion step's cost over qemu-img alone: the same vmdk converted to qcow2 by a plain
//! `qemu-img convert -O qcow2`, by the same with `-t writeback` (qemu flushes the output at the
//! end), and by `migration::convert::convert` (probe, `-p` progress parsing, rename) without
//! and with `durable` (fsync, compared with the flushed plain run), in rounds whose order rotates so that no way always
//! runs first after the page cache changed. Dirty pages are written back (`sync`) before each run.
//!
//! The source is a vmdk of S MiB made of 1 MiB chunks in turn zero, a repeated byte pattern and
//! two pseudo-random (incompressible) ones: a disk with holes, text-like and binary data.
//!
//! `cargo bench --bench convert [-- --mb S --rounds N]` measures (defaults S=1024, N=5).
//! Without `--bench` (as `cargo test --all-targets` runs it) it is a smoke test: S=16, N=1.
//! Either way it exits non-zero unless every output is identical to the source.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use guaca_hive::migration::convert::{ConvertJob, compare, convert};
use tempfile::TempDir;
use tokio::process::Command;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const MIB: usize = 1024 * 1024;

struct Args {
    mb: usize,
    rounds: usize,
    /// `--bench` was passed (by `cargo bench`): measure; otherwise smoke-test.
    bench: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let bench = argv.iter().any(|a| a == "--bench");
    let (mut mb, mut rounds) = if bench { (1024, 5) } else { (16, 1) };
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> anyhow::Result<usize> {
            let v = it.next().ok_or_else(|| anyhow!("{name} needs a value"))?;
            let n: usize = v.parse().with_context(|| format!("{name} {v:?}"))?;
            if n == 0 {
                bail!("{name} must be at least 1");
            }
            Ok(n)
        };
        match a.as_str() {
            "--mb" => mb = value("--mb")?,
            "--rounds" => rounds = value("--rounds")?,
            _ => {} // `--bench`, test-harness flags and filters: not ours.
        }
    }
    Ok(Args { mb, rounds, bench })
}

fn main() {
    let code = match parse_args().and_then(|args| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(run(args))
    }) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("convert: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

/// xorshift64*: incompressible enough for qcow2 (which does not compress) and fast.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_exact_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            chunk.copy_from_slice(&self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
    }
}

/// The raw data described in the module's comment, then the vmdk made from it.
async fn source(dir: &Path, mb: usize) -> anyhow::Result<PathBuf> {
    let raw = dir.join("source.raw");
    let path = raw.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut out = std::io::BufWriter::with_capacity(4 * MIB, std::fs::File::create(&path)?);
        let (mut noise, mut buf) = (Noise(0x9e37_79b9_7f4a_7c15), vec![0u8; MIB]);
        for i in 0..mb {
            match i % 4 {
                0 => buf.fill(0),
                1 => buf.iter_mut().enumerate().for_each(|(j, b)| *b = b"guaca-hive "[j % 11]),
                _ => noise.fill(&mut buf),
            }
            out.write_all(&buf)?;
        }
        out.into_inner()?.sync_all()
    })
    .await??;
    let vmdk = dir.join("source.vmdk");
    qemu_img(&["convert", "-f", "raw", "-O", "vmdk"], &[&raw, &vmdk]).await?;
    tokio::fs::remove_file(&raw).await?;
    Ok(vmdk)
}

async fn qemu_img(args: &[&str], paths: &[&Path]) -> anyhow::Result<()> {
    let out = Command::new("qemu-img").args(args).args(paths).stdin(Stdio::null()).output().await?;
    if !out.status.success() {
        bail!("qemu-img {args:?} {paths:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Plain,
    Flushed,
    Pipeline,
    Durable,
}

impl Way {
    const ALL: [Way; 4] = [Way::Plain, Way::Flushed, Way::Pipeline, Way::Durable];

    fn label(self) -> &'static str {
        match self {
            Way::Plain => "plain `qemu-img convert -O qcow2`",
            Way::Flushed => "plain with `-t writeback` (flushed)",
            Way::Pipeline => "pipeline `convert` as the worker runs it (probe, -p, rename)",
            Way::Durable => "pipeline `convert` with `durable` (probe, -p, fsync, rename)",
        }
    }

    async fn run(self, src: &Path, target: &Path) -> anyhow::Result<Duration> {
        // Earlier runs' dirty pages are written back first, outside the measure.
        // SAFETY: sync(2) takes no arguments and touches no memory of ours.
        tokio::task::spawn_blocking(|| unsafe { libc::sync() }).await?;
        let t = Instant::now();
        match self {
            Way::Plain => qemu_img(&["convert", "-O", "qcow2"], &[src, target]).await?,
            Way::Flushed => qemu_img(&["convert", "-t", "writeback", "-O", "qcow2"], &[src, target]).await?,
            Way::Pipeline | Way::Durable => {
                let (progress, _) = watch::channel(0.0);
                let job = ConvertJob { durable: matches!(self, Way::Durable), ..ConvertJob::new(src, target) };
                convert(&job, &progress, &CancellationToken::new()).await?;
            }
        }
        Ok(t.elapsed())
    }
}

fn median(samples: &[Duration]) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(Duration::as_secs_f64).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn run(args: Args) -> anyhow::Result<bool> {
    // In the system's temporary directory ($TMPDIR).
    let root = TempDir::new()?;
    let t0 = Instant::now();
    let src = source(root.path(), args.mb).await?;
    let made = t0.elapsed();
    let src_bytes = tokio::fs::metadata(&src).await?.len();

    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); Way::ALL.len()];
    let mut identical = true;
    for round in 0..args.rounds {
        for k in 0..Way::ALL.len() {
            let i = (round + k) % Way::ALL.len();
            let way = Way::ALL[i];
            let target = root.path().join(format!("out-{round}-{i}.qcow2"));
            samples[i].push(way.run(&src, &target).await?);
            // One output per way is checked against the source, outside the measure.
            if round == 0 && !compare(&src, &target).await? {
                eprintln!("convert: {} produced an image that differs from the source", way.label());
                identical = false;
            }
            tokio::fs::remove_file(&target).await?;
        }
    }

    let mib = args.mb as f64;
    let mode = if args.bench { "bench" } else { "smoke" };
    println!();
    println!(
        "### convert ({mode}): {} MiB vmdk ({:.0} MiB on disk; 1/4 zeros, 1/4 pattern, 1/2 random) to qcow2, {} rounds, medians",
        args.mb,
        src_bytes as f64 / MIB as f64,
        args.rounds
    );
    println!("(source generated in {:.1} s; data in {})", made.as_secs_f64(), root.path().display());
    println!();
    println!("| way | median (s) | MiB/s | ratio to plain |");
    println!("|---|---|---|---|");
    let plain = median(&samples[0]);
    for (way, s) in Way::ALL.iter().zip(&samples) {
        let m = median(s);
        println!("| {} | {m:.3} | {:.0} | {:.3} |", way.label(), mib / m, m / plain);
    }
    let (flushed, pipeline, durable) = (median(&samples[1]), median(&samples[2]), median(&samples[3]));
    println!();
    println!(
        "pipeline / plain = {:.3} (overhead {:+.1}%); durable pipeline / flushed = {:.3} (overhead {:+.1}%)",
        pipeline / plain,
        (pipeline / plain - 1.0) * 100.0,
        durable / flushed,
        (durable / flushed - 1.0) * 100.0
    );
    if !args.bench {
        println!("smoke run: checks that every way's output equals the source; timings of a debug build mean nothing");
    }
    println!();
    Ok(identical)
}
