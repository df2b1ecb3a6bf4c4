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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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
        // SAFETY: pidfd_open takes two integers and returns a new fd or -1; it touches no memory
        // of ours.
        let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = RawFd::try_from(ret).map_err(|_| io::Error::other("pidfd out of range"))?;
        // SAFETY: `raw` was just returned by pidfd_open, is open, and nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
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
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd on our stack and we pass a count of 1; timeout 0 means
        // poll does not block.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && (pfd.revents & libc::POLLIN) != 0
    }

    /// Sends `sig` to exactly this process. ESRCH (already gone) counts as success.
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal takes our open fd, a signal number, a null siginfo (allowed:
        // the kernel fills in defaults) and flags 0.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(err);
        }
        Ok(())
    }

    /// Reaps the process if it is our child and has exited, returning how it ended. For a process
    /// that is not our child (adopted after a restart) this returns [`ExitInfo::Unknown`].
    pub fn reap(&self) -> ExitInfo {
        // SAFETY: siginfo_t is plain old data; all-zero is a valid value for it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // An open fd is never negative.
        let Ok(id) = libc::id_t::try_from(self.fd.as_raw_fd()) else {
            return ExitInfo::Unknown;
        };
        // SAFETY: waitid with P_PIDFD reads our open fd and writes only into `info`, which lives
        // on our stack for the duration of the call.
        let ret =
            unsafe { libc::waitid(libc::P_PIDFD, id, &mut info, libc::WEXITED | libc::WNOHANG) };
        if ret != 0 {
            return ExitInfo::Unknown;
        }
        // SAFETY: waitid succeeded with WEXITED, so the kernel filled in the SIGCHLD fields that
        // si_pid and si_status read (si_pid stays 0 if the child had not exited yet).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return ExitInfo::Unknown;
        }
        match info.si_code {
            libc::CLD_EXITED => ExitInfo::Exited(status),
            libc::CLD_KILLED | libc::CLD_DUMPED => ExitInfo::Signaled(status),
            _ => ExitInfo::Unknown,
        }
    }
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
pub fn spawn_detached(mut cmd: Command, log: &Path) -> io::Result<Spawned> {
    let out = File::options().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: the closure runs in the forked child before exec and calls only setsid, which is
    // async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
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
