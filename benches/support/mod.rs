//! Set-up shared by the benchmarks: the hive they measure and the wait for a warm pool.

use std::time::Duration;

use guaca_hive::actors::pool::PoolHandle;
use guaca_hive::config::HiveConfig;
use guaca_hive::domain::pool::PoolSize;
use guaca_hive::domain::vm::VmState;
use guaca_hive::drivers::sim::SimTimings;
use tempfile::TempDir;

/// VMs in the measured pool (the default `pool.max_cap`).
pub const POOL_SIZE: u32 = 30;

/// A hive on 127.0.0.1:0 with a real SQLite file in `data_dir`, three simulated nodes with
/// instant timings (the simulator stands in for hypervisors; the pool, actors and store are real).
pub fn config(data_dir: &TempDir) -> HiveConfig {
    let mut cfg = HiveConfig { listen: ([127, 0, 0, 1], 0).into(), data_dir: data_dir.path().to_path_buf(), ..HiveConfig::default() };
    cfg.sim.nodes = 3;
    // 3 nodes x 16 cores holds 30 one-core VMs (the default 8 cores would stop at 24).
    cfg.sim.cores = 16;
    cfg.sim.timings = SimTimings::instant();
    cfg.pool.default_size = PoolSize { min: POOL_SIZE, max: POOL_SIZE, linger: 60_000 };
    cfg
}

/// Wait (with a deadline, woken by every durable change of the pool) until `n` VMs are FREE.
pub async fn until_free(pool: &PoolHandle, n: usize, within: Duration) -> Result<(), String> {
    until_state(pool, VmState::Free, n, within).await
}

/// Wait (with a deadline, woken by every durable change of the pool) until `n` VMs are in `state`.
pub async fn until_state(pool: &PoolHandle, state: VmState, n: usize, within: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + within;
    let mut changed = pool.subscribe();
    loop {
        let states = pool.vm_states().await.map_err(|e| e.to_string())?;
        if states.get(&state).copied().unwrap_or(0) >= n {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
            return Err(format!("pool did not reach {n} {state:?} VMs within {within:?}: {states:?}"));
        }
    }
}
