//! **TEST STAND-IN for Firecracker's jailer — not the jailer.** It reproduces what metald relies
//! on in the real jailer (v1.16), in the same order, so that CI meets the real jailer's
//! behaviour:
//!
//! * the jail is `<canonical chroot base>/<file name of the canonical exec file>/<id>/root`, and
//!   only the exec file is copied in (a dynamically linked one cannot run there);
//! * a cgroup per VM, in the real cgroup file system found through `/proc/mounts` for the
//!   `--cgroup-version` given, created only for the controllers named by `--cgroup` settings,
//!   with the jailer's own pid attached before it forks;
//! * a new mount namespace and `pivot_root` into the jail, so `/proc/PID/root` reads `/` from the
//!   host; `/dev/kvm`, `/dev/net/tun` and `/dev/urandom` made in it (an existing one is an error,
//!   as for the real jailer);
//! * with `--daemonize`, the double fork: the jailer exits right after its first fork, and the
//!   grandchild writes `<exec name>.pid` and only then execs the exec file as `--uid`:`--gid`.
//!
//! Two things differ on purpose, and say so: the grandchild waits [`PID_FILE_DELAY`] before it
//! writes the pid file and [`EXEC_DELAY`] before it execs, widening windows that are a few
//! milliseconds wide in the real jailer, so a driver that reads too early fails every time
//! instead of now and then; and it sets no resource limits and does not join a network namespace
//! (metald asks for neither).

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How long the daemon waits before writing its pid file (see the module docs).
const PID_FILE_DELAY: Duration = Duration::from_millis(40);
/// How long it waits between the pid file and the exec.
const EXEC_DELAY: Duration = Duration::from_millis(40);

fn fail(msg: String) -> ! {
    eprintln!("jailer-standin: {msg}");
    std::process::exit(1);
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap_or_else(|_| fail("path has a NUL".into()))
}

fn check(rc: libc::c_int, what: &str) {
    if rc != 0 {
        fail(format!("{what}: {}", std::io::Error::last_os_error()));
    }
}

/// The cgroup directories for the settings, created and written, as the jailer does.
fn setup_cgroups(version: u8, parent: &str, id: &str, settings: &[String]) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_else(|e| fail(format!("reading /proc/mounts: {e}")));
    let mut dirs: Vec<PathBuf> = Vec::new();
    for s in settings {
        let Some((file, value)) = s.split_once('=').filter(|(_, v)| !v.is_empty()) else {
            fail(format!("invalid cgroup setting {s}"));
        };
        let controller = file.split('.').next().unwrap_or("");
        let mount = mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match (version, f.get(2).copied()) {
                (2, Some("cgroup2")) => Some(PathBuf::from(f[1])),
                (1, Some("cgroup")) if f[3].split(',').any(|o| o == controller) => {
                    Some(PathBuf::from(f[1]))
                }
                _ => None,
            }
        });
        let Some(mount) = mount else {
            fail(format!("cgroup controller {controller} is unavailable"));
        };
        let dir = mount.join(parent).join(id);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            fail(format!("creating {}: {e}", dir.display()));
        }
        if let Err(e) = std::fs::write(dir.join(file), value) {
            fail(format!("writing {}: {e}", dir.join(file).display()));
        }
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    let me = std::process::id().to_string();
    for d in &dirs {
        let f = if version == 2 {
            "cgroup.procs"
        } else {
            "tasks"
        };
        if let Err(e) = std::fs::write(d.join(f), &me) {
            fail(format!("attaching to {}: {e}", d.display()));
        }
    }
    dirs
}

/// A new mount namespace and `pivot_root` into `root`, as the jailer's `chroot()` does.
fn pivot_into(root: &Path) {
    let root_c = cstr(root);
    // SAFETY: plain syscalls on NUL-terminated strings that outlive the calls; this process is
    // single-threaded here.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS), "unshare(CLONE_NEWNS)");
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_SLAVE | libc::MS_REC,
                std::ptr::null(),
            ),
            "making mounts slave",
        );
        check(
            libc::mount(
                root_c.as_ptr(),
                root_c.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ),
            "bind-mounting the jail",
        );
        check(libc::chdir(root_c.as_ptr()), "chdir into the jail");
        check(libc::mkdir(c"old_root".as_ptr(), 0o600), "mkdir old_root");
        let rc = libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c"old_root".as_ptr());
        check(i32::from(rc != 0), "pivot_root");
        check(libc::chdir(c"/".as_ptr()), "chdir /");
        check(
            libc::umount2(c"old_root".as_ptr(), libc::MNT_DETACH),
            "umount old_root",
        );
        check(libc::rmdir(c"old_root".as_ptr()), "rmdir old_root");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let split = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let (ours, theirs) = args.split_at(split);
    let theirs: Vec<String> = theirs.iter().skip(1).cloned().collect();
    let get = |name: &str| ours.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
    let all = |name: &str| -> Vec<String> {
        ours.windows(2)
            .filter(|w| w[0] == name)
            .map(|w| w[1].clone())
            .collect()
    };
    let (Some(id), Some(exec), Some(base), Some(uid), Some(gid), Some(version)) = (
        get("--id"),
        get("--exec-file"),
        get("--chroot-base-dir"),
        get("--uid").and_then(|u| u.parse::<u32>().ok()),
        get("--gid").and_then(|g| g.parse::<u32>().ok()),
        get("--cgroup-version").and_then(|v| v.parse::<u8>().ok()),
    ) else {
        fail(
            "--id, --exec-file, --chroot-base-dir, --uid, --gid and --cgroup-version are required"
                .into(),
        );
    };
    let daemonize = ours.iter().any(|a| a == "--daemonize");
    // The exec file and the chroot base are canonicalized: a symlinked binary names the jail
    // after the file it resolves to.
    let exec = std::fs::canonicalize(&exec)
        .unwrap_or_else(|e| fail(format!("Failed to canonicalize path {exec}: {e}")));
    let name = exec
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = std::fs::canonicalize(&base)
        .unwrap_or_else(|e| fail(format!("Failed to canonicalize path {base}: {e}")));
    let root = base.join(&name).join(&id).join("root");
    if let Err(e) = std::fs::create_dir_all(&root) {
        fail(format!("creating {}: {e}", root.display()));
    }
    // Only the exec file: its libraries are not copied.
    if let Err(e) = std::fs::copy(&exec, root.join(&name)) {
        fail(format!("copying {}: {e}", exec.display()));
    }
    let parent = get("--parent-cgroup").unwrap_or_else(|| name.clone());
    setup_cgroups(version, &parent, &id, &all("--cgroup"));
    let dev_null =
        std::fs::File::open("/dev/null").unwrap_or_else(|e| fail(format!("/dev/null: {e}")));
    pivot_into(&root);
    for dir in ["/", "/dev", "/dev/net", "/run"] {
        let _ = std::fs::create_dir_all(dir);
        let c = cstr(Path::new(dir));
        // SAFETY: chown and chmod on a NUL-terminated path.
        unsafe {
            check(libc::chown(c.as_ptr(), uid, gid), "chown jail folder");
            check(libc::chmod(c.as_ptr(), 0o700), "chmod jail folder");
        }
    }
    for (dev, major, minor) in [
        ("/dev/net/tun", 10, 200),
        ("/dev/kvm", 10, 232),
        ("/dev/urandom", 1, 9),
    ] {
        let c = cstr(Path::new(dev));
        // SAFETY: mknod and chown on a NUL-terminated path; the real jailer fails when the node
        // already exists (a jail that was not cleaned up), and so does this one.
        unsafe {
            check(
                libc::mknod(
                    c.as_ptr(),
                    libc::S_IFCHR | 0o600,
                    libc::makedev(major, minor),
                ),
                &format!("mknod {dev}"),
            );
            check(libc::chown(c.as_ptr(), uid, gid), &format!("chown {dev}"));
        }
    }
    if daemonize {
        use std::os::fd::AsRawFd;
        // SAFETY: fork in a single-threaded process; each side only calls async-signal-safe
        // functions or exits before touching shared state.
        unsafe {
            match libc::fork() {
                -1 => fail("fork failed".into()),
                0 => {}
                _ => libc::_exit(0),
            }
            check(i32::from(libc::setsid() < 0), "setsid");
            match libc::fork() {
                -1 => fail("fork failed".into()),
                0 => {}
                _ => libc::_exit(0),
            }
            for fd in 0..3 {
                libc::dup2(dev_null.as_raw_fd(), fd);
            }
        }
    }
    std::thread::sleep(PID_FILE_DELAY);
    if let Err(e) = std::fs::write(format!("/{name}.pid"), std::process::id().to_string()) {
        fail(format!("writing the pid file: {e}"));
    }
    std::thread::sleep(EXEC_DELAY);
    let err = Command::new(format!("/{name}"))
        .arg("--id")
        .arg(&id)
        .args([
            "--start-time-us",
            "0",
            "--start-time-cpu-us",
            "0",
            "--parent-cpu-time-us",
            "0",
        ])
        .args(&theirs)
        .uid(uid)
        .gid(gid)
        .exec();
    fail(format!("exec /{name}: {err}"));
}
