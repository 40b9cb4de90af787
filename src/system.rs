//! What the operating system reports about this process (peak memory, page faults), for benchmarks and the
//! training summary.

/// Peak resident set size in MiB (Linux `VmHWM`); `None` where the OS does not report it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Minor page faults of this process so far (pages the kernel had to map, and zero, on first
/// touch); `None` where the OS does not count them. Benchmarks take the difference over the
/// timed steps: a step that reuses its buffers faults (almost) nothing.
pub fn minor_page_faults() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes one `rusage` into the pointer it is given, which points to
        // a zero-initialised value of that type that lives until the call returns.
        #[allow(unsafe_code)]
        let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } == 0;
        // SAFETY: zero-initialised above and filled in by a successful call.
        #[allow(unsafe_code)]
        let usage = unsafe { usage.assume_init() };
        ok.then_some(usage.ru_minflt as u64)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Memory the system could give a new allocation without swapping, in MiB (Linux
/// `MemAvailable`); `None` where the OS does not report it.
pub fn available_memory_mb() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Memory left under this process's cgroup (v2) limit, in MiB: `memory.max − memory.current`;
/// `None` without a limit (or outside a cgroup v2). Containers see the host's `MemAvailable`.
pub fn cgroup_free_memory_mb() -> Option<f64> {
    let read = |name: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{name}")).ok();
    let max: f64 = read("memory.max")?.trim().parse().ok()?;
    let current: f64 = read("memory.current")?.trim().parse().ok()?;
    Some((max - current).max(0.0) / (1024.0 * 1024.0))
}
