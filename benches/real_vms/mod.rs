//! What the benchmarks on real QEMU share: the project's set-up scripts, virsh, medians, and
//! the wait for a guest's ready line.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guaca_hive::drivers::libvirt::LibvirtHypervisor;
use guaca_hive::drivers::{DriverError, Hypervisor};

/// Rounds to run: `--rounds N`, else 5 under `cargo bench` (`--bench`) and 1 as a smoke test
/// (`cargo test --all-targets` runs benchmarks without `--bench`).
pub fn rounds() -> usize {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let bench = argv.iter().any(|a| a == "--bench");
    let rounds = argv.iter().position(|a| a == "--rounds").and_then(|i| argv.get(i + 1)).and_then(|n| n.parse().ok());
    rounds.unwrap_or(if bench { 5 } else { 1 })
}

/// Run one of the project's (idempotent) scripts and answer the last line it printed.
pub fn script(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name);
    let out = Command::new(&path).stderr(Stdio::inherit()).output().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(out.status.success(), "{name} failed; run scripts/test-deps.sh as root first");
    String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string()
}

pub fn virsh(uri: &str) -> Command {
    let mut c = Command::new("virsh");
    c.arg("-c").arg(uri);
    c
}

/// Seconds, one per round.
#[derive(Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64());
    }
    pub fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
    #[allow(dead_code)] // not every benchmark prints ranges
    pub fn range(&self) -> (f64, f64) {
        let min = self.0.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.0.iter().copied().fold(0.0, f64::max);
        (min, max)
    }
}

/// Poll the guest until it answers (its ready line), for at most 3 minutes.
pub async fn until_ready(hv: &LibvirtHypervisor, domain: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        match hv.ping(domain).await {
            Ok(_) => return,
            Err(DriverError::NotReady) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await, // poll, bounded
            Err(e) => panic!("{domain}: {e}"),
        }
    }
}
