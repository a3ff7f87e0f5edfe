//! Helpers shared by the bench binaries (each bench is its own crate and uses only some of
//! them, hence the `dead_code` allowance).
#![allow(dead_code)]

use std::time::Duration;

/// A numeric knob from the environment, or its default.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile (0..=1) of sorted durations (nearest rank).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// USER_HZ, the unit of the CPU times in `/proc/<pid>/stat`: 100 on every Linux Kiln runs on.
pub const TICKS_PER_SECOND: f64 = 100.0;

/// (VmRSS in KiB, utime + stime in clock ticks) of a process.
pub fn proc_sample(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for process {pid}"))?;
    let stat = proc_stat(&format!("/proc/{pid}/stat"))
        .ok_or_else(|| anyhow::anyhow!("cannot read /proc/{pid}/stat"))?;
    Ok((rss, stat.ticks))
}

/// What the benches read from a process's `/proc/<pid>/stat`.
pub struct ProcStat {
    pub ppid: u64,
    /// Process group.
    pub pgrp: u64,
    /// utime + stime, in clock ticks ([`TICKS_PER_SECOND`]).
    pub ticks: u64,
}

/// Reads a `/proc/<pid>/stat` file; `None` when it is gone (the process exited) or garbled.
pub fn proc_stat(path: &str) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(path).ok()?;
    // After the command name in parentheses: state, ppid, pgrp, … utime (11), stime (12).
    let (_, after) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        ppid: field(1)?,
        pgrp: field(2)?,
        ticks: field(11)? + field(12)?,
    })
}

/// Wall-clock time in milliseconds since the Unix epoch (to compare with times other processes
/// on the same machine record).
pub fn unix_ms_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// The `p` quantile (0..=1) of sorted numbers (nearest rank); 0 for none.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
