//! CPU time of processes, from `/proc/<pid>/stat` (Linux): the edge child, every PostgreSQL
//! process of a server, and this process, so a report can split the CPU between them.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

/// Clock ticks per second of `/proc` times (`USER_HZ`): 100 on every mainstream Linux build.
const TICKS_PER_SECOND: u64 = 100;

/// The fields of `/proc/<pid>/stat` that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub parent_pid: u32,
    /// User plus system time of the process itself.
    pub own_ticks: u64,
    /// User plus system time of its children that have exited and been waited for.
    pub reaped_children_ticks: u64,
}

/// Parses `PID (COMM) STATE PPID ...`; COMM may contain spaces and parentheses.
pub fn parse_stat(stat: &str) -> Option<ProcStat> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After COMM: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    let number = |index: usize| fields.get(index)?.parse::<u64>().ok();
    Some(ProcStat {
        parent_pid: fields.get(1)?.parse().ok()?,
        own_ticks: number(11)? + number(12)?,
        reaped_children_ticks: number(13)? + number(14)?,
    })
}

fn read_stat(pid: &str) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn ticks(ticks: u64) -> Duration {
    Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND)
}

/// CPU time used by one process so far.
pub fn process_cpu(pid: u32) -> Result<Duration> {
    let stat = read_stat(&pid.to_string()).with_context(|| format!("no readable /proc/{pid}/stat"))?;
    Ok(ticks(stat.own_ticks))
}

/// CPU time used by this process so far.
pub fn own_cpu() -> Duration {
    read_stat("self").map_or(Duration::ZERO, |stat| ticks(stat.own_ticks))
}

/// The postmaster's pid: the first line of `postmaster.pid` in the data directory.
pub fn postmaster_pid(data_dir: &Path) -> Result<u32> {
    let path = data_dir.join("postmaster.pid");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("failed to read {}", path.display()))?;
    text.lines()
        .next()
        .and_then(|line| line.trim().parse().ok())
        .with_context(|| format!("no pid in {}", path.display()))
}

/// CPU time used by a PostgreSQL server so far: the postmaster, the backends and background
/// processes it started (its children), and those of them that have exited already.
pub fn postgres_cpu(postmaster: u32) -> Result<Duration> {
    let root =
        read_stat(&postmaster.to_string()).with_context(|| format!("postmaster {postmaster} is gone"))?;
    let mut total = root.own_ticks + root.reaped_children_ticks;
    for entry in std::fs::read_dir("/proc").context("failed to list /proc")?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|name| name.bytes().all(|byte| byte.is_ascii_digit())) else {
            continue;
        };
        if let Some(stat) = read_stat(pid).filter(|stat| stat.parent_pid == postmaster) {
            total += stat.own_ticks + stat.reaped_children_ticks;
        }
    }
    Ok(ticks(total))
}

/// CPU seconds spent during a phase, per party.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CpuSplit {
    pub edge_s: f64,
    /// `None` with the embedded backend: SQLite runs inside the edge.
    pub postgres_s: Option<f64>,
    pub loader_s: f64,
    /// Wall-clock seconds of the phase, to read the above as cores busy.
    pub wall_s: f64,
}

impl CpuSplit {
    /// `edge 12.3 s (41%), postgres ...`: shares of the CPU the three used together.
    pub fn line(&self) -> String {
        let total = (self.edge_s + self.postgres_s.unwrap_or(0.0) + self.loader_s).max(f64::EPSILON);
        let part = |name: &str, seconds: f64| {
            format!(
                "{name} {seconds:.1} s ({:.0}%, {:.2} cores)",
                seconds / total * 100.0,
                seconds / self.wall_s.max(f64::EPSILON)
            )
        };
        match self.postgres_s {
            Some(postgres_s) => format!(
                "{}, {}, {} over {:.1} s",
                part("edge", self.edge_s),
                part("postgres", postgres_s),
                part("load generator", self.loader_s),
                self.wall_s
            ),
            None => format!(
                "{}, {} over {:.1} s",
                part("edge (with SQLite)", self.edge_s),
                part("load generator", self.loader_s),
                self.wall_s
            ),
        }
    }
}

/// A reading of every party's CPU time, to subtract from a later one.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    edge: Duration,
    postgres: Option<Duration>,
    loader: Duration,
    at: std::time::Instant,
}

/// The processes to measure: the edge child (if spawned) and the postmaster (none with the
/// embedded backend).
#[derive(Debug, Clone, Copy)]
pub struct CpuProbe {
    pub edge_pid: Option<u32>,
    pub postmaster_pid: Option<u32>,
}

impl CpuProbe {
    pub fn mark(&self) -> CpuMark {
        CpuMark {
            edge: self.edge_pid.and_then(|pid| process_cpu(pid).ok()).unwrap_or_default(),
            postgres: self.postmaster_pid.map(|pid| postgres_cpu(pid).unwrap_or_default()),
            loader: own_cpu(),
            at: std::time::Instant::now(),
        }
    }

    /// CPU used since `start`.
    pub fn since(&self, start: &CpuMark) -> CpuSplit {
        let end = self.mark();
        CpuSplit {
            edge_s: end.edge.saturating_sub(start.edge).as_secs_f64(),
            postgres_s: end
                .postgres
                .zip(start.postgres)
                .map(|(end, start)| end.saturating_sub(start).as_secs_f64()),
            loader_s: end.loader.saturating_sub(start.loader).as_secs_f64(),
            wall_s: end.at.duration_since(start.at).as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_names() {
        let line = "4242 (postgres: tally t_1 (COPY)) S 4000 4000 4000 0 -1 4194560 100 0 0 0 250 75 12 3 20 0 1 0 100 0 0";
        let stat = parse_stat(line).expect("parses");
        assert_eq!(stat, ProcStat { parent_pid: 4000, own_ticks: 325, reaped_children_ticks: 15 });
        assert_eq!(ticks(stat.own_ticks), Duration::from_millis(3250));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_has_a_cpu_time() {
        let pid = std::process::id();
        let busy: u64 = (0..2_000_000u64).map(|value| value % 7).sum();
        assert!(busy > 0);
        assert!(process_cpu(pid).is_ok());
        assert!(postgres_cpu(pid).is_ok(), "any process can stand in for a postmaster");
    }
}
