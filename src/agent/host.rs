//! What the host looks like right now, for heartbeats: CPU, load, memory, the disk that holds
//! the agent's data, and network bytes since the agent started, read from the OS (sysinfo).
//! CPU use is measured between two samples, so the sampler is kept from beat to beat.

use std::path::{Path, PathBuf};

use sysinfo::{Disks, Networks, System};

use super::proto::HostStats;

pub struct HostSampler {
    system: System,
    disks: Disks,
    networks: Networks,
    data_dir: PathBuf,
}

const MB: u64 = 1024 * 1024;

impl HostSampler {
    pub fn new(data_dir: &Path) -> HostSampler {
        let mut system = System::new();
        system.refresh_cpu_usage();
        system.refresh_memory();
        HostSampler {
            system,
            disks: Disks::new_with_refreshed_list(),
            networks: Networks::new_with_refreshed_list(),
            data_dir: data_dir.canonicalize().unwrap_or_else(|_| data_dir.to_path_buf()),
        }
    }

    /// Logical CPUs, total RAM (MB), and free space (MB) where the data directory lives.
    pub fn capacity(&mut self) -> (u32, u64, u64) {
        let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        let disk_free = self.data_disk().map(|d| d.available_space() / MB).unwrap_or(0);
        (cpus, self.system.total_memory() / MB, disk_free)
    }

    fn data_disk(&self) -> Option<&sysinfo::Disk> {
        // The disk whose mount point is the longest prefix of the data directory.
        self.disks.list().iter().filter(|d| self.data_dir.starts_with(d.mount_point())).max_by_key(|d| d.mount_point().as_os_str().len())
    }

    pub fn sample(&mut self) -> HostStats {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        self.disks.refresh(true);
        self.networks.refresh(true);
        let (disk_total, disk_free) = self.data_disk().map(|d| (d.total_space(), d.available_space())).unwrap_or((0, 0));
        let (rx, tx) = self.networks.iter().fold((0, 0), |(r, t), (_, n)| (r + n.total_received(), t + n.total_transmitted()));
        HostStats {
            cpu_pct: self.system.global_cpu_usage(),
            load1: System::load_average().one,
            mem_total_mb: self.system.total_memory() / MB,
            mem_used_mb: self.system.used_memory() / MB,
            disk_total_mb: disk_total / MB,
            disk_used_mb: disk_total.saturating_sub(disk_free) / MB,
            net_rx_bytes: rx,
            net_tx_bytes: tx,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_read_the_real_host() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = HostSampler::new(dir.path());
        let (cpus, ram, _disk) = h.capacity();
        assert!(cpus >= 1);
        assert!(ram > 0);
        let s = h.sample();
        assert!(s.mem_total_mb > 0 && s.mem_used_mb <= s.mem_total_mb, "{s:?}");
        assert!(s.disk_total_mb > 0 && s.disk_used_mb <= s.disk_total_mb, "{s:?}");
        assert!((0.0..=100.0).contains(&s.cpu_pct), "{s:?}");
    }
}
