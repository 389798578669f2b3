//! How many threads the backend uses by default: one per physical core the process may run
//! on. Two hardware threads of one core share its vector units and its load bandwidth, and
//! the matrix kernels keep those busy, so a second thread per core adds contention, not
//! throughput (llama.cpp defaults to physical cores for the same reason).
//!
//! On Linux the cores are read from sysfs: the CPUs in this process's affinity mask
//! (`Cpus_allowed_list` of `/proc/self/status`), grouped by their `core_cpus_list` (the
//! hardware threads of one core). Elsewhere, or when those files cannot be read, every CPU
//! the standard library reports counts.

use std::collections::BTreeSet;
use std::path::Path;

/// Parses a kernel CPU list such as `0-3,8,10-11`; `None` if it is malformed.
pub fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a || b - a > 1 << 16 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().ok()?),
        }
    }
    Some(out)
}

/// Physical cores among `allowed` CPUs, from a sysfs tree at `sys_cpu`
/// (`/sys/devices/system/cpu`): CPUs that list the same hardware threads are one core.
/// `None` when a CPU's topology cannot be read.
pub fn physical_cores_in(sys_cpu: &Path, allowed: &[usize]) -> Option<usize> {
    let mut cores = BTreeSet::new();
    for cpu in allowed {
        let topo = sys_cpu.join(format!("cpu{cpu}/topology"));
        // Older kernels name the same list `thread_siblings_list`.
        let list = std::fs::read_to_string(topo.join("core_cpus_list")).or_else(|_| std::fs::read_to_string(topo.join("thread_siblings_list"))).ok()?;
        let mut siblings = parse_cpu_list(&list)?;
        siblings.sort_unstable();
        cores.insert(siblings);
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// The CPUs this process may run on, from `/proc/self/status`.
fn allowed_cpus() -> Option<Vec<usize>> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    parse_cpu_list(line)
}

/// Default thread count: physical cores the process may use, never more than the standard
/// library's count (which also follows cgroup CPU quotas), at least 1.
pub fn default_threads() -> usize {
    let logical = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let physical = allowed_cpus().and_then(|cpus| physical_cores_in(Path::new("/sys/devices/system/cpu"), &cpus));
    physical.unwrap_or(logical).clamp(1, logical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a-b"), None);
    }

    /// A fake sysfs tree of 4 cores with 2 hardware threads each (siblings n and n + 4).
    fn smt_tree(name: &str) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!("coordgen-topo-{}-{name}", std::process::id()));
        for cpu in 0..8 {
            let d = root.join(format!("cpu{cpu}/topology"));
            std::fs::create_dir_all(&d).unwrap();
            let core = cpu % 4;
            std::fs::write(d.join("core_cpus_list"), format!("{},{}\n", core, core + 4)).unwrap();
        }
        root
    }

    #[test]
    fn hardware_threads_of_one_core_count_once() {
        let root = smt_tree("smt");
        assert_eq!(physical_cores_in(&root, &(0..8).collect::<Vec<_>>()), Some(4));
        // An affinity mask of both threads of cores 0 and 1, and one thread of core 2.
        assert_eq!(physical_cores_in(&root, &[0, 4, 1, 5, 2]), Some(3));
        assert_eq!(physical_cores_in(&root, &[]), None);
        // A CPU whose topology is missing: no answer rather than a wrong one.
        assert_eq!(physical_cores_in(&root, &[0, 9]), None);
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn default_is_between_one_and_the_logical_count() {
        let logical = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let n = default_threads();
        assert!(n >= 1 && n <= logical, "{n} threads of {logical}");
    }
}
