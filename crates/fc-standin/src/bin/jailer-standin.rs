//! **TEST STAND-IN for Firecracker's jailer — not the jailer.** It lays out the jail the way the
//! jailer does (`<chroot-base>/<exec name>/<id>/root`, the exec file copied in, a cgroup for the
//! VM, a pid file), then runs the exec file chrooted into the jail, in a new session, and exits
//! (`--daemonize`). It does not drop capabilities, set up namespaces, or touch the real cgroupfs:
//! the "cgroup" is a directory in `<chroot-base>/../cgroup/<parent>/<id>`, which is where
//! metald's tests point `cgroup_root`. Shared libraries of the exec file are copied into the jail
//! so that a dynamically linked stand-in Firecracker runs there.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn fail(msg: String) -> ! {
    eprintln!("jailer-standin: {msg}");
    std::process::exit(1);
}

fn copy_in(root: &Path, host: &Path) {
    let dst = root.join(host.strip_prefix("/").unwrap_or(host));
    if let Some(parent) = dst.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    if let Err(e) = std::fs::copy(host, &dst) {
        fail(format!("copying {}: {e}", host.display()));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let split = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let (ours, theirs) = args.split_at(split);
    let theirs: Vec<String> = theirs.iter().skip(1).cloned().collect();
    let get = |name: &str| ours.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
    let (Some(id), Some(exec), Some(base)) =
        (get("--id"), get("--exec-file"), get("--chroot-base-dir"))
    else {
        fail("--id, --exec-file and --chroot-base-dir are required".into());
    };
    let uid: u32 = get("--uid").and_then(|u| u.parse().ok()).unwrap_or(0);
    let gid: u32 = get("--gid").and_then(|g| g.parse().ok()).unwrap_or(0);
    let parent = get("--parent-cgroup").unwrap_or_else(|| "firecracker".into());
    let exec = PathBuf::from(exec);
    let name = exec
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = PathBuf::from(base);
    let root = base.join(&name).join(&id).join("root");
    if let Err(e) = std::fs::create_dir_all(&root) {
        fail(format!("creating {}: {e}", root.display()));
    }
    let cgroup = base.join("..").join("cgroup").join(&parent).join(&id);
    if let Err(e) = std::fs::create_dir_all(&cgroup) {
        fail(format!("creating {}: {e}", cgroup.display()));
    }
    // The exec file and the libraries it needs.
    let in_jail = root.join(&name);
    if let Err(e) = std::fs::copy(&exec, &in_jail) {
        fail(format!("copying {}: {e}", exec.display()));
    }
    let ldd = Command::new("ldd")
        .arg(&exec)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        copy_in(&root, Path::new(lib));
    }
    let Ok(root_c) = CString::new(root.as_os_str().as_encoded_bytes()) else {
        fail("jail path has a NUL".into());
    };
    let mut cmd = Command::new(format!("/{name}"));
    cmd.arg("--id").arg(&id).args(&theirs);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: runs in the forked child before exec; chroot, chdir, setsid, setgid and setuid are
    // async-signal-safe and the strings they use were allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::chroot(root_c.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setsid() < 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => fail(format!("starting {name} in the jail: {e}")),
    };
    if let Err(e) = std::fs::write(root.join(format!("{name}.pid")), child.id().to_string()) {
        fail(format!("writing the pid file: {e}"));
    }
    // Daemonized: the jailer's job is done; the VMM is reparented and reaped by init.
}
