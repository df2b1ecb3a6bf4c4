//! Processes, handled without trusting a bare pid.
//!
//! * [`Pidfd`] watches a process through a pidfd: its exit is an event (the fd turns readable),
//!   signals go to exactly that process even if its pid is reused, and for our own children it
//!   reaps them and reports how they ended.
//! * [`ProcInfo`] reads `/proc/PID/stat` and `cmdline`. A process is "the same process" only if
//!   its pid *and* its start time match; a zombie counts as dead, because PID 1 on some hosts
//!   reaps adopted orphans only every second or two.
//! * [`spawn_detached`] starts a VMM in its own session so that it outlives metald.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    /// It exited with this code.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
    /// It was not our child (an adopted VMM), so its status cannot be read.
    Unknown,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitInfo::Exited(c) => write!(f, "exited with code {c}"),
            ExitInfo::Signaled(s) => write!(f, "killed by signal {s} ({})", signal_name(*s)),
            ExitInfo::Unknown => f.write_str("exited (status unknown: not our child)"),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGHUP => "SIGHUP",
        _ => "other",
    }
}

/// A pidfd for one process, registered with the tokio reactor.
#[derive(Debug)]
pub struct Pidfd {
    fd: AsyncFd<OwnedFd>,
    pid: i32,
}

impl Pidfd {
    /// Opens a pidfd for `pid`. Fails with ESRCH if no such process exists.
    pub fn open(pid: i32) -> io::Result<Self> {
        let target = rustix::process::Pid::from_raw(pid)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
        let owned = rustix::process::pidfd_open(target, rustix::process::PidfdFlags::empty())?;
        // SAFETY: `owned` is a valid open fd; the AsyncFd takes ownership of it, so it stays open
        // and refers to the same pidfd until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
            .map_err(|e| io::Error::other(format!("registering pidfd: {e}")))?;
        Ok(Pidfd { fd, pid })
    }

    /// The pid this fd refers to.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Resolves when the process has exited (it may still be a zombie). Cancel-safe.
    pub async fn exited(&self) -> io::Result<()> {
        // A pidfd becomes readable once the process exits and stays readable, so there is no
        // readiness to clear.
        let mut guard = self.fd.readable().await?;
        guard.retain_ready();
        Ok(())
    }

    /// Whether the process has exited, without waiting.
    pub fn has_exited(&self) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(self.fd.get_ref(), PollFlags::IN)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        rustix::event::poll(&mut fds, Some(&now)).is_ok_and(|n| n > 0)
            && fds
                .first()
                .is_some_and(|f| f.revents().contains(PollFlags::IN))
    }

    /// Sends `sig` to exactly this process. ESRCH (already gone) counts as success.
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        let sig = rustix::process::Signal::from_named_raw(sig)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        match rustix::process::pidfd_send_signal(self.fd.get_ref(), sig) {
            Err(e) if e == rustix::io::Errno::SRCH => Ok(()),
            r => r.map_err(io::Error::from),
        }
    }

    /// Reaps the process if it is our child and has exited, returning how it ended. For a process
    /// that is not our child (adopted after a restart) this returns [`ExitInfo::Unknown`].
    pub fn reap(&self) -> ExitInfo {
        use rustix::process::{WaitId, WaitIdOptions};
        let id = WaitId::PidFd(self.fd.get_ref().as_fd());
        match rustix::process::waitid(id, WaitIdOptions::EXITED | WaitIdOptions::NOHANG) {
            Ok(Some(st)) => {
                if let Some(code) = st.exit_status().filter(|_| st.exited()) {
                    ExitInfo::Exited(code)
                } else if let Some(sig) = st.terminating_signal() {
                    ExitInfo::Signaled(sig)
                } else {
                    ExitInfo::Unknown
                }
            }
            _ => ExitInfo::Unknown,
        }
    }
}

/// Sends `sig` to `pid` by number: for the tests, the benchmark and tools that name a process
/// they started themselves. The daemon signals its VMMs through a [`Pidfd`], which cannot hit a
/// reused pid.
pub fn kill_pid(pid: i32, sig: i32) -> io::Result<()> {
    let target = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    let sig = rustix::process::Signal::from_named_raw(sig)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    rustix::process::kill_process(target, sig).map_err(io::Error::from)
}

/// Clock ticks per second: the unit of `/proc` start and CPU times.
pub fn clock_ticks() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

/// A snapshot of `/proc/PID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// Process state letter from `/proc/PID/stat` (`R`, `S`, `T`, `Z`, ...).
    pub state: char,
    /// Start time in clock ticks since boot (field 22 of `/proc/PID/stat`).
    pub start_time: u64,
    /// The command line, split on NUL.
    pub cmdline: Vec<String>,
    /// Its pid.
    pub pid: i32,
}

impl ProcInfo {
    /// Reads `/proc/PID`; `None` if the process does not exist.
    pub fn read(pid: i32) -> Option<ProcInfo> {
        let (state, start_time) = stat(pid)?;
        Some(Self::with_stat(pid, state, start_time))
    }

    /// Completes what [`stat`] read with the command line (empty if the process is gone).
    pub fn with_stat(pid: i32, state: char, start_time: u64) -> ProcInfo {
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = raw
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        ProcInfo {
            state,
            start_time,
            cmdline,
            pid,
        }
    }

    /// Its root directory (`/proc/PID/root`): a chroot for a jailed VMM. Read on demand, since
    /// only the jailer's stray check needs it.
    pub fn root(&self) -> Option<std::path::PathBuf> {
        std::fs::read_link(format!("/proc/{}/root", self.pid)).ok()
    }

    /// Alive means present and not a zombie.
    pub fn is_alive(&self) -> bool {
        self.state != 'Z' && self.state != 'X'
    }
}

/// A process's state and start time, from `/proc/PID/stat` alone (one read, where a full
/// [`ProcInfo`] is two): `None` if it does not exist.
pub fn stat(pid: i32) -> Option<(char, u64)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses state and start time from a `/proc/PID/stat` line. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3), start time is field 22: 19 further fields on.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// The start time of `pid`, if it exists and is not a zombie.
pub fn live_start_time(pid: i32) -> Option<u64> {
    ProcInfo::read(pid)
        .filter(ProcInfo::is_alive)
        .map(|p| p.start_time)
}

/// A process started by [`spawn_detached`].
#[derive(Debug)]
pub struct Spawned {
    /// Its pid.
    pub pid: i32,
    /// Its start time from `/proc`.
    pub start_time: u64,
    /// A pidfd for it.
    pub pidfd: Pidfd,
}

/// Starts `cmd` in a new session with stdin from /dev/null and stdout and stderr appended to
/// `log`. The new session means a signal to metald's process group (Ctrl-C, systemd stopping the
/// unit with KillMode=process) does not reach the VMM, so VMs outlive metald.
pub fn spawn_detached(cmd: Command, log: &Path) -> io::Result<Spawned> {
    spawn_detached_as(cmd, log, &[], None)
}

/// [`spawn_detached`], with the child first joining the cgroups whose `cgroup.procs` files
/// are `cgroups` (so the program runs in them from its first instruction), then, with `user`,
/// dropping to that uid and gid (and no supplementary groups) before it execs. Joining comes
/// before dropping: the cgroups belong to root.
pub fn spawn_detached_as(
    mut cmd: Command,
    log: &Path,
    cgroups: &[std::ffi::CString],
    user: Option<(u32, u32)>,
) -> io::Result<Spawned> {
    let out = File::options().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let procs: Vec<std::ffi::CString> = cgroups.to_vec();
    // SAFETY: the closure runs in the forked (single-threaded) child before exec and makes only
    // raw system calls through rustix (setsid, open, write, close, setgroups, setgid, setuid):
    // async-signal-safe, no allocation (the paths were made before the fork), no lock.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setsid()?;
            for path in &procs {
                // One at a time, each closed before the next: a start needs one descriptor.
                let fd = rustix::fs::open(
                    path.as_c_str(),
                    rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )?;
                // "0" is the writing process itself.
                rustix::io::write(&fd, b"0")?;
            }
            if let Some((uid, gid)) = user {
                // The thread calls are the process's here: the child has one thread.
                rustix::thread::set_thread_groups(&[])?;
                rustix::thread::set_thread_gid(rustix::fs::Gid::from_raw(gid))?;
                rustix::thread::set_thread_uid(rustix::fs::Uid::from_raw(uid))?;
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
    // The child cannot be reaped by anyone but us, so its pid cannot be reused before the pidfd is
    // open. From here on the pidfd, not `child`, reaps it; dropping `child` neither waits nor
    // kills.
    drop(child);
    let pidfd = Pidfd::open(pid)?;
    let start_time = ProcInfo::read(pid)
        .map(|p| p.start_time)
        .ok_or_else(|| io::Error::other("new process vanished before it could be inspected"))?;
    Ok(Spawned {
        pid,
        start_time,
        pidfd,
    })
}

/// How long ago a process started, from its start time in clock ticks since boot.
pub fn age(start_ticks: u64) -> Option<std::time::Duration> {
    use std::time::Duration;
    let hz = clock_ticks();
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let started = Duration::from_secs(start_ticks / hz)
        + Duration::from_nanos((start_ticks % hz) * 1_000_000_000 / hz);
    Duration::try_from_secs_f64(uptime)
        .ok()?
        .checked_sub(started)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_stat_with_hostile_comm() {
        let line = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10 18446744073709551615";
        assert_eq!(parse_stat(line), Some(('S', 98765)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[tokio::test]
    async fn pidfd_reports_signal_exit_of_child() {
        let dir = std::env::temp_dir().join(format!("metald-proc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let sp = spawn_detached(cmd, &dir.join("log")).unwrap();
        assert_eq!(live_start_time(sp.pid), Some(sp.start_time));
        assert!(!sp.pidfd.has_exited());
        sp.pidfd.signal(libc::SIGKILL).unwrap();
        tokio::time::timeout(Duration::from_secs(5), sp.pidfd.exited())
            .await
            .unwrap()
            .unwrap();
        assert!(sp.pidfd.has_exited());
        assert_eq!(sp.pidfd.reap(), ExitInfo::Signaled(libc::SIGKILL));
        assert_eq!(live_start_time(sp.pid), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn pidfd_reports_exit_code_and_new_session() {
        let dir = std::env::temp_dir().join(format!("metald-proc2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "cut -d' ' -f6 /proc/$$/stat > sid; exit 3"])
            .current_dir(&dir);
        let sp = spawn_detached(cmd, &dir.join("log")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), sp.pidfd.exited())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sp.pidfd.reap(), ExitInfo::Exited(3));
        // The child leads its own session: its session id is its own pid.
        let sid = std::fs::read_to_string(dir.join("sid")).unwrap();
        assert_eq!(sid.trim(), sp.pid.to_string());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
