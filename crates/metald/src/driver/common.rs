//! The VMM plumbing both drivers need, written once: socket arguments and connections that
//! work whatever the state directory's length, the markers on a VMM's command line, a VMM's
//! version, bounded exchanges, the tail of a VMM's log, and what a VMM's own shutdown report says
//! about its exit.

use std::path::{Path, PathBuf};

use super::{DriverError, ExitCause, SUN_PATH_MAX, ShutdownReason};
use crate::process::ExitInfo;

/// The path a VMM is given for the socket `name` in its run directory: the absolute path when
/// it fits a socket address, else the bare name, which the VMM resolves against its working
/// directory, the run directory. Either way the socket is `run_dir/name`, so the state
/// directory's length never limits VM ids or sockets.
pub fn socket_arg(run_dir: &Path, name: &str) -> PathBuf {
    let abs = run_dir.join(name);
    if abs.as_os_str().len() <= SUN_PATH_MAX {
        abs
    } else {
        PathBuf::from(name)
    }
}

/// Whether a VMM's socket argument `arg` (as [`socket_arg`] made it) names `run_dir/name`: an
/// absolute one directly, a bare one through the process's working directory.
pub fn socket_arg_is(pid: i32, arg: &Path, run_dir: &Path, name: &str) -> bool {
    if arg.is_absolute() {
        return arg == run_dir.join(name);
    }
    arg == Path::new(name)
        && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == run_dir)
}

/// Connects to a unix socket whatever its path's length: a path too long for a socket address
/// is reached through a descriptor of its directory (`/proc/self/fd/N/name`).
pub async fn connect_unix(path: &Path) -> std::io::Result<tokio::net::UnixStream> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let (true, Some(dir), Some(name)) = (
        path.as_os_str().len() > SUN_PATH_MAX,
        path.parent(),
        path.file_name(),
    ) else {
        return tokio::net::UnixStream::connect(path).await;
    };
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)?;
    let short = Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name);
    // `dir` stays open until the connect has resolved the path.
    let stream = tokio::net::UnixStream::connect(&short).await;
    drop(dir);
    stream
}

/// Every argument that follows `flag` in a command line (`-qmp X`), in order: how both drivers
/// read the markers they put on their VMMs' command lines.
pub(crate) fn args_after<'a>(
    cmdline: &'a [String],
    flag: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    cmdline.windows(2).filter_map(move |w| match w {
        [f, v] if f == flag => Some(v.as_str()),
        _ => None,
    })
}

/// The first argument that follows `flag` in a command line (`-name X`, `--id X`).
pub(crate) fn arg_after<'a>(cmdline: &'a [String], flag: &'a str) -> Option<&'a str> {
    args_after(cmdline, flag).next()
}

/// The guest's serial console, as the VMM writes it, in its run directory.
pub const CONSOLE_LOG: &str = "console.log";

/// The VMM's own log (QEMU's stderr, Firecracker's logger), in its run directory.
pub const VMM_LOG: &str = "vmm.log";

/// The first line `binary --version` prints, run once per driver and kept: it does not change
/// while metald runs (a new binary is picked up at the next start).
pub fn binary_version(cache: &std::sync::OnceLock<String>, binary: &Path) -> String {
    cache
        .get_or_init(|| {
            std::process::Command::new(binary)
                .arg("--version")
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .map(|l| l.trim().to_string())
                })
                .unwrap_or_default()
        })
        .clone()
}

/// Runs `fut` bounded by `limit`; running out is [`DriverError::Timeout`] naming `what`. Every
/// exchange with a VMM or a guest agent goes through this, so each names what did not answer.
pub(crate) async fn bounded<T>(
    what: impl FnOnce() -> String,
    limit: std::time::Duration,
    fut: impl std::future::Future<Output = Result<T, DriverError>>,
) -> Result<T, DriverError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(DriverError::Timeout {
            what: what(),
            millis: limit.as_millis(),
        }),
    }
}

/// The last `max` bytes of a file (a VMM's log, its metrics, a console), read from there rather
/// than whole: a console can be large. Empty if the file cannot be read.
pub(crate) fn read_tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `max` bytes of a VMM's log file, trimmed, for error messages.
pub(crate) fn log_tail(path: &Path, max: usize) -> String {
    read_tail(path, u64::try_from(max).unwrap_or(u64::MAX))
        .trim()
        .to_string()
}

/// The exit cause a VMM's own shutdown report gives, where the exit status agrees with it (a VMM
/// that reported a guest power-off and was then killed by a signal was killed).
pub(crate) fn cause_from_report(
    status: ExitInfo,
    reported: Option<&ShutdownReason>,
) -> Option<ExitCause> {
    if !matches!(status, ExitInfo::Exited(0) | ExitInfo::Unknown) {
        return None;
    }
    match reported? {
        ShutdownReason::GuestPoweroff => Some(ExitCause::GuestPoweroff),
        ShutdownReason::GuestReset | ShutdownReason::HostReset => Some(ExitCause::GuestReboot),
        ShutdownReason::GuestPanic => Some(ExitCause::GuestPanic),
        ShutdownReason::HostSignal => Some(ExitCause::Signal(libc::SIGTERM)),
        _ => None,
    }
}

/// Starts a VMM process in its placement (its cgroups, its user; see [`super::cgroup`]), with
/// stdout and stderr to `log`. Off the runtime: the fork waits for the exec, and joining a
/// cgroup before it waits for the kernel (on cgroup v1 a migration waits for an RCU grace
/// period: 10 to 15 ms per VMM start measured on these machines). Both drivers start VMMs so.
pub(crate) async fn spawn_vmm(
    cmd: std::process::Command,
    log: &Path,
    placement: super::cgroup::Placement,
) -> Result<crate::process::Spawned, DriverError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let log = log.to_path_buf();
    tokio::task::spawn_blocking(move || {
        crate::process::spawn_detached_as(cmd, &log, &placement.procs, placement.user)
    })
    .await
    .map_err(|e| DriverError::Spawn(format!("{program}: the start task failed: {e}")))?
    .map_err(|e| DriverError::Spawn(format!("{program}: {e}")))
}

/// Starts a VMM's file afresh, the same way for every driver, so that what a VMM's exit left is
/// its own: the console log is removed (a guest's output belongs to its run), any other log
/// (the VMM's own, its metrics) keeps its previous run beside it as `<name>.prev` for
/// post-mortems.
pub(crate) fn rotate_log(p: &Path) {
    if p.file_name().is_some_and(|n| n == CONSOLE_LOG) {
        let _ = std::fs::remove_file(p);
    } else {
        let mut prev = p.as_os_str().to_owned();
        prev.push(".prev");
        let _ = std::fs::rename(p, prev);
    }
}

/// Waits, bounded by `timeout`, for a VMM just started to answer on its control socket: a
/// `ping` (QMP `query-status`, Firecracker's `GET /`) once the socket file exists. A VMM that
/// exits first fails fast with its exit status and the end of its `log` (its own error message:
/// a bad option, a missing device); one that does not answer in time is killed through its
/// pidfd. Both drivers start their VMMs this way.
pub(crate) async fn wait_ready(
    vmm: super::Vmm,
    log: &Path,
    timeout: std::time::Duration,
) -> Result<super::Vmm, DriverError> {
    let sock = vmm.endpoint().control_socket.clone();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        if vmm.pidfd().has_exited() {
            let status = vmm.pidfd().reap();
            return Err(DriverError::EarlyExit(format!(
                "{status}: {}",
                log_tail(log, 600)
            )));
        }
        if sock.exists() {
            match vmm.ping().await {
                Ok(_) => return Ok(vmm),
                Err(e) => last = Some(e),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = vmm.kill();
            return Err(last.unwrap_or_else(|| DriverError::Socket {
                path: sock,
                reason: format!("did not answer within {} ms", timeout.as_millis()),
                unreachable: true,
            }));
        }
        // A VMM creates its socket within milliseconds of starting, and no event announces a
        // file appearing more cheaply than this short poll, bounded by the deadline.
        tokio::select! {
            _ = vmm.pidfd().exited() => {}
            () = tokio::time::sleep(std::time::Duration::from_millis(5)) => {}
        }
    }
}

/// A file's name for a VMM: `name` for the VM's VMM, `next-name` for a migration target
/// started beside it ([`super::TARGET_PREFIX`]).
pub(crate) fn target_name(name: &str, target: bool) -> String {
    if target {
        format!("{}{name}", super::TARGET_PREFIX)
    } else {
        name.to_string()
    }
}

/// Renames a promoted migration target's files in `run_dir` to the VM's VMM names (`next-X` to
/// `X`), once the VMM it replaced is gone: that VMM removes its sockets as it exits, so a rename
/// before then would lose the new ones. Each rename replaces what is there atomically; a file
/// the target never made is skipped. Logs the old VMM left are kept as `X.prev`.
pub(crate) fn promote_files(run_dir: &Path, names: &[&str]) -> Result<(), DriverError> {
    for name in names {
        let from = run_dir.join(target_name(name, true));
        let to = run_dir.join(name);
        if std::fs::symlink_metadata(&from).is_err() {
            continue;
        }
        if name.ends_with(".log") || name.ends_with(".json") {
            rotate_log(&to);
        }
        std::fs::rename(&from, &to).map_err(|e| {
            DriverError::Io(
                format!("renaming {} to {}", from.display(), to.display()),
                e,
            )
        })?;
    }
    Ok(())
}

/// Removes every migration target file (`next-*`) in `run_dir`.
pub(crate) fn discard_target_files(run_dir: &Path) {
    let Ok(dir) = std::fs::read_dir(run_dir) else {
        return;
    };
    for e in dir.flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with(super::TARGET_PREFIX)
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
