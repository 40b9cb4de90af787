//! What the operating system reports about this process (peak memory), for benchmarks and the
//! training summary.

/// Peak resident set size in MiB (Linux `VmHWM`); `None` where the OS does not report it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
