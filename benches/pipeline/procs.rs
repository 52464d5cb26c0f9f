//! Child processes and what `/proc` says about them.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a stopped child gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// A child process that is killed when dropped, so a failed run leaves nothing behind.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ChildGuard {
    /// Starts `command` with stdout and stderr appended to `log`. The child also gets SIGKILL
    /// if this process dies first (`PR_SET_PDEATHSIG`).
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> anyhow::Result<Self> {
        let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start the {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Fails if the child has already exited (with its log's tail in the message).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("the {} was already stopped", self.name);
        };
        if let Some(status) = child.try_wait()? {
            bail!(
                "the {} exited early ({status}); its log {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after a grace period. Returns the exit status when it exited on
    /// its own within the grace period.
    pub async fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let pid = libc::pid_t::try_from(child.id()).unwrap_or(0);
        // SAFETY: plain syscall on our own child's pid, which we have not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let started = Instant::now();
        while started.elapsed() < STOP_GRACE {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// CPU time and memory of a process at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// utime + stime of all threads, in seconds.
    pub cpu_s: f64,
    /// The stime part: time in the kernel (syscalls, network stack).
    pub sys_s: f64,
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Peak resident set size so far, KiB.
    pub hwm_kib: u64,
    /// The anonymous (heap, stacks) part of `rss_kib`; the rest is mapped files and shmem.
    pub anon_kib: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub fn sample(pid: u32) -> anyhow::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let (user, sys) = cpu_ticks(&stat)?;
    let hz = clock_ticks_per_second();
    Ok(ProcSample {
        cpu_s: (user + sys) as f64 / hz,
        sys_s: sys as f64 / hz,
        rss_kib: status_kib(&status, "VmRSS:"),
        hwm_kib: status_kib(&status, "VmHWM:"),
        anon_kib: status_kib(&status, "RssAnon:"),
    })
}

/// [`sample`] of every process in `pids`, added up (CPU and memory of all replicas together).
pub fn sample_all(pids: &[u32]) -> anyhow::Result<ProcSample> {
    let mut total = ProcSample::default();
    for &pid in pids {
        let s = sample(pid)?;
        total.cpu_s += s.cpu_s;
        total.sys_s += s.sys_s;
        total.rss_kib += s.rss_kib;
        total.hwm_kib += s.hwm_kib;
        total.anon_kib += s.anon_kib;
    }
    Ok(total)
}

/// utime and stime: fields 14 and 15, counted after the `(comm)` field, which may hold spaces.
fn cpu_ticks(stat: &str) -> anyhow::Result<(u64, u64)> {
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unreadable /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<u64>()?)
    };
    // `rest` starts at field 3 (state), so field k is at index k - 3.
    Ok((field(14 - 3)?, field(15 - 3)?))
}

/// A `kB` line of `/proc/<pid>/status`; 0 when absent (a process that has exited but was not
/// reaped yet keeps its `stat` but loses its memory lines).
fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The first process whose `comm` is `name` (e.g. RabbitMQ's `beam.smp`), if any.
pub fn find_by_name(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim_end() == name).then_some(pid)
        })
}

/// CPU seconds (user + system) of this process so far.
pub fn own_cpu_s() -> f64 {
    sample(std::process::id()).map_or(0.0, |s| s.cpu_s)
}

/// A local TCP port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A command whose environment holds no `TRANSFER_*` or `RUST_LOG` of the caller: the
/// configuration comes from the bench's `--config` file alone, so the worker is measured as
/// shipped, logging at its default level (`info`).
pub fn clean_command(program: &Path) -> Command {
    let mut command = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TRANSFER_") || key == "RUST_LOG" {
            command.env_remove(key);
        }
    }
    command
}

/// `<target dir>/bench/{name}`, created if missing: the worker binary is
/// `<target dir>/<profile>/transfer-worker`, so this follows `CARGO_TARGET_DIR` and
/// `build.target-dir` as cargo resolved them.
pub fn bench_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_transfer-worker"))
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("target"))
        .join("bench")
        .join(name);
    let _ = std::fs::create_dir_all(&dir);
    dir
}
