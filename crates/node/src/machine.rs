//! This computer's profile for the catalog's hardware fit: cores,
//! RAM, free disk where the data lives, and the GPUs this build can compute on.

use std::path::Path;

use apiary_catalog::{GpuProfile, MachineProfile};

const MIB: u64 = 1024 * 1024;

/// Measures this machine now (blocking for a few milliseconds: call it off the async workers).
/// `data_dir` picks the disk whose free space counts.
pub fn local_profile(data_dir: &Path) -> MachineProfile {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    let disks = sysinfo::Disks::new_with_refreshed_list();
    // the disk holding the data folder: the longest mount point that prefixes it
    let target = data_dir
        .ancestors()
        .find(|p| p.exists())
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let target = std::fs::canonicalize(&target).unwrap_or(target);
    let disk_free = disks
        .list()
        .iter()
        .filter(|d| target.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map_or(0, |d| d.available_space());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    MachineProfile {
        name: "this computer".into(),
        cpu_cores: cores,
        ram_total_mb: system.total_memory() / MIB,
        ram_available_mb: system.available_memory() / MIB,
        disk_free_mb: disk_free / MIB,
        bandwidth_mbps: None,
        gpus: gpus(),
    }
}

/// GPUs usable for experts: none yet (experts run on the CPU; GPU placement arrives with NVML
/// memory figures in the profile).
fn gpus() -> Vec<GpuProfile> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_has_memory_cores_and_disk() {
        let dir = tempfile::tempdir().unwrap();
        let p = local_profile(&dir.path().join("not yet made"));
        assert!(p.cpu_cores >= 1);
        assert!(
            p.ram_total_mb >= 256 && p.ram_available_mb <= p.ram_total_mb,
            "{p:?}"
        );
        assert!(p.disk_free_mb > 0, "{p:?}");
    }
}
