//! What metald needs around Firecracker's jailer, written for the jailer as it really behaves
//! (v1.16), not as it is easiest to imagine:
//!
//! * The jail is `<canonical chroot base>/<file name of the canonical exec file>/<id>/root`:
//!   a firecracker configured through a symlink gets a jail named after the file it resolves to.
//! * The jailer unshares a mount namespace and pivots into the jail, so `/proc/PID/root` of a
//!   jailed VMM reads `/` from the host. What does identify it is the directory its root *is*
//!   (device and inode of `/proc/PID/root`, which the kernel resolves across namespaces).
//! * It creates a cgroup per VM only for the controllers named in `--cgroup` settings, at
//!   `<controller mount>/<parent>/<id>`, finding the mounts in `/proc/mounts` for the version it
//!   is told. metald always names at least one setting, so every jailed VMM has a cgroup, and
//!   that cgroup is how metald finds *every* process a jailed start left behind.
//! * With `--daemonize` it forks twice; the first process exits at once, and only the grandchild
//!   writes the pid file and execs firecracker, some time later.
//! * It copies only the exec file into the jail, so a dynamically linked firecracker cannot run.
//!
//! The checks here read files; they block, so callers on the runtime use `spawn_blocking` for
//! anything that waits.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::CgroupVersion;

/// The cgroup setting metald adds when the operator configured none, so that the jailer still
/// creates a cgroup for the VM: the `pids` controller exists on v1 and v2 hosts alike, and `max`
/// limits nothing.
pub const DEFAULT_CGROUP_SETTING: &str = "pids.max=max";

/// What an ELF file's header says, as far as metald cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// `e_machine` (62 is x86-64, 183 is AArch64).
    pub machine: u16,
    /// Its program interpreter (`PT_INTERP`), if it is dynamically linked.
    pub interpreter: Option<String>,
}

/// `EM_X86_64`.
pub const EM_X86_64: u16 = 62;

/// Reads the ELF header and program headers of `path`. `Ok(None)` when it is not a 64-bit
/// little-endian ELF file.
pub fn elf_info(path: &Path) -> std::io::Result<Option<ElfInfo>> {
    let mut f = std::fs::File::open(path)?;
    let mut hdr = [0u8; 64];
    // The magic, then ELFCLASS64 (2) and little-endian (1).
    if read_up_to(&mut f, &mut hdr)? < 64 || !hdr.starts_with(b"\x7fELF\x02\x01") {
        return Ok(None);
    }
    // Fields at fixed offsets; one past the end reads as 0 (and fails the checks below).
    fn at<const N: usize>(b: &[u8], o: usize) -> [u8; N] {
        b.get(o..o + N)
            .and_then(|s| <[u8; N]>::try_from(s).ok())
            .unwrap_or([0; N])
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes(at(b, o));
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(at(b, o));
    let machine = u16_at(&hdr, 18);
    let phoff = u64_at(&hdr, 32);
    let phentsize = usize::from(u16_at(&hdr, 54));
    let phnum = usize::from(u16_at(&hdr, 56));
    let mut interpreter = None;
    if phentsize >= 56 && phnum > 0 && phnum < 4096 {
        use std::io::{Seek, SeekFrom};
        let mut ph = vec![0u8; phentsize * phnum];
        f.seek(SeekFrom::Start(phoff))?;
        let n = read_up_to(&mut f, &mut ph)?;
        for e in ph.get(..n).unwrap_or_default().chunks_exact(phentsize) {
            const PT_INTERP: u32 = 3;
            if u32::from_le_bytes(at(e, 0)) != PT_INTERP {
                continue;
            }
            let off = u64_at(e, 8);
            let size = usize::try_from(u64_at(e, 32)).unwrap_or(0).min(4096);
            let mut name = vec![0u8; size];
            f.seek(SeekFrom::Start(off))?;
            let got = read_up_to(&mut f, &mut name)?;
            name.truncate(got);
            let s = String::from_utf8_lossy(&name);
            interpreter = Some(s.trim_end_matches('\0').to_string());
        }
    }
    Ok(Some(ElfInfo {
        machine,
        interpreter,
    }))
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while let Some(rest) = buf.get_mut(n..).filter(|r| !r.is_empty()) {
        match f.read(rest)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Why a kernel image cannot be booted by Firecracker on this host, or `None` if it can.
/// Firecracker on x86_64 loads an uncompressed ELF `vmlinux`; on aarch64 an arm64 `Image`.
pub fn firecracker_kernel_problem(path: &Path) -> Option<String> {
    let mut head = vec![0u8; 0x210];
    let n = match std::fs::File::open(path).and_then(|mut f| read_up_to(&mut f, &mut head)) {
        Ok(n) => n,
        Err(e) => return Some(format!("cannot be read: {e}")),
    };
    head.truncate(n);
    let bzimage = head.get(0x202..0x206) == Some(b"HdrS".as_slice());
    if cfg!(target_arch = "aarch64") {
        // The arm64 Image header carries "ARM\x64" at offset 56.
        return (head.get(56..60) != Some(b"ARM\x64".as_slice()))
            .then(|| "is not an arm64 Image, which Firecracker needs on aarch64".to_string());
    }
    match elf_info(path) {
        Ok(Some(e)) if e.machine == EM_X86_64 => None,
        Ok(Some(e)) => Some(format!(
            "is an ELF file for machine {}, not x86-64",
            e.machine
        )),
        Ok(None) if bzimage => Some(
            "is a bzImage; Firecracker boots an uncompressed ELF vmlinux on x86_64 (the kernel \
             build's vmlinux, or extract it with the kernel's scripts/extract-vmlinux)"
                .into(),
        ),
        Ok(None) => Some("is not an ELF vmlinux, which Firecracker boots on x86_64".into()),
        Err(e) => Some(format!("cannot be read: {e}")),
    }
}

/// Why `binary` cannot run under the jailer, or `None` if it can: the jailer copies only the
/// exec file into an empty chroot, so it must be statically linked.
pub fn jailed_binary_problem(binary: &Path) -> Option<String> {
    match elf_info(binary) {
        Ok(Some(ElfInfo {
            interpreter: Some(i),
            ..
        })) => Some(format!(
            "{} is dynamically linked (interpreter {i}); the jailer copies only the binary into \
             an empty chroot, where it cannot load its libraries. Use a statically linked \
             firecracker, as Firecracker's release binaries are",
            binary.display()
        )),
        Ok(Some(_)) => None,
        Ok(None) => Some(format!("{} is not an ELF executable", binary.display())),
        Err(e) => Some(format!("{}: {e}", binary.display())),
    }
}

/// The cgroup hierarchies of this host, read from `/proc/mounts` the way the jailer reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupHost {
    /// The version the jailer is told to use.
    pub version: u8,
    /// The cgroup2 mount point.
    unified: Option<PathBuf>,
    /// v1 mount points with their mount options (which name the controllers).
    v1: Vec<(PathBuf, Vec<String>)>,
}

impl CgroupHost {
    /// Reads the host's mounts. `Auto` picks v2 when the host is unified (`/sys/fs/cgroup` is a
    /// cgroup2 mount, or no v1 controller is mounted anywhere), v1 otherwise.
    pub fn detect(pref: CgroupVersion) -> Result<CgroupHost, String> {
        let mounts = std::fs::read_to_string("/proc/mounts")
            .map_err(|e| format!("reading /proc/mounts: {e}"))?;
        Self::from_mounts(pref, &mounts)
    }

    /// As [`CgroupHost::detect`], from the text of a `/proc/mounts`.
    pub fn from_mounts(pref: CgroupVersion, mounts: &str) -> Result<CgroupHost, String> {
        let mut unified = None;
        let mut v1 = Vec::new();
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [_, path, fstype, options, ..] = f.as_slice() else {
                continue;
            };
            // /proc/mounts escapes spaces in paths as \040.
            let dir = PathBuf::from(path.replace("\\040", " "));
            match *fstype {
                "cgroup2" if unified.is_none() => unified = Some(dir),
                "cgroup" => v1.push((
                    dir,
                    options.split(',').map(str::to_string).collect::<Vec<_>>(),
                )),
                _ => {}
            }
        }
        let v1_controllers = v1.iter().any(|(_, o)| {
            o.iter()
                .any(|c| matches!(c.as_str(), "pids" | "cpu" | "memory"))
        });
        let version = match pref {
            CgroupVersion::V1 => 1,
            CgroupVersion::V2 => 2,
            CgroupVersion::Auto => {
                let unified_host = unified
                    .as_deref()
                    .is_some_and(|d| d == Path::new("/sys/fs/cgroup"));
                if unified_host || (!v1_controllers && unified.is_some()) {
                    2
                } else {
                    1
                }
            }
        };
        match version {
            2 if unified.is_none() => {
                Err("cgroup v2 was asked for but no cgroup2 file system is mounted".into())
            }
            1 if !v1_controllers => {
                Err("cgroup v1 was asked for but no v1 controller is mounted".into())
            }
            _ => Ok(CgroupHost {
                version,
                unified,
                v1,
            }),
        }
    }

    /// The cgroup directories the jailer creates for VM `id` given the `--cgroup` settings:
    /// one in the unified hierarchy (v2), or one per controller's hierarchy (v1).
    pub fn vm_dirs(&self, parent: &str, id: &str, settings: &[String]) -> Vec<PathBuf> {
        if self.version == 2 {
            return self
                .unified
                .iter()
                .map(|u| u.join(parent).join(id))
                .collect();
        }
        let mut out: Vec<PathBuf> = Vec::new();
        for s in settings {
            let controller = s.split('.').next().unwrap_or("");
            if let Some((dir, _)) = self
                .v1
                .iter()
                .find(|(_, o)| o.iter().any(|c| c == controller))
            {
                let d = dir.join(parent).join(id);
                if !out.contains(&d) {
                    out.push(d);
                }
            }
        }
        out
    }

    /// The directories that hold every VM's cgroup (`<mount>/<parent>`), for the sweep.
    pub fn parent_dirs(&self, parent: &str, settings: &[String]) -> Vec<PathBuf> {
        self.vm_dirs(parent, "x", settings)
            .into_iter()
            .filter_map(|d| d.parent().map(Path::to_path_buf))
            .collect()
    }
}

/// The processes in a cgroup (empty when it does not exist). Zombies are not listed: a process
/// leaves its cgroup when it exits, before anyone reaps it.
pub fn cgroup_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// SIGKILLs every process in `dirs` until none is left, bounded by `within`, then removes the
/// cgroups. Returns how many processes it killed, or what is still there.
pub fn kill_cgroups(dirs: &[PathBuf], within: Duration) -> Result<usize, String> {
    let deadline = Instant::now() + within;
    let mut killed = 0;
    loop {
        let pids: Vec<i32> = dirs.iter().flat_map(|d| cgroup_pids(d)).collect();
        if pids.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "processes {pids:?} still in {} after SIGKILL",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        for pid in pids {
            // Every process in the VM's cgroup is the VM's: the jailer, its children, the VMM.
            let killed_now = rustix::process::Pid::from_raw(pid).is_some_and(|p| {
                rustix::process::kill_process(p, rustix::process::Signal::KILL).is_ok()
            });
            if killed_now {
                killed += 1;
            }
        }
        // A killed process leaves the cgroup as it exits; this poll is bounded by `within`.
        std::thread::sleep(Duration::from_millis(5));
    }
    for d in dirs {
        if let Err(e) = std::fs::remove_dir(d)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(format!("removing cgroup {}: {e}", d.display()));
        }
    }
    Ok(killed)
}

/// Whether the process `pid` runs with `root` as its root directory, compared by device and
/// inode: the kernel resolves `/proc/PID/root` into the process's mount namespace, where the
/// jail's bind mount has the same device and inode as the jail directory on the host.
pub fn runs_in(pid: i32, root: &Path) -> bool {
    let (Ok(a), Ok(b)) = (
        std::fs::metadata(format!("/proc/{pid}/root")),
        std::fs::metadata(root),
    ) else {
        return false;
    };
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Whether user `uid`:`gid` may read (`write == false`) or write a file, by its owner, group and
/// mode. Root may do anything.
pub fn may_access(meta: &std::fs::Metadata, uid: u32, gid: u32, write: bool) -> bool {
    if uid == 0 {
        return true;
    }
    let mode = meta.mode();
    let (o, g, u) = if write {
        (0o002, 0o020, 0o200)
    } else {
        (0o004, 0o040, 0o400)
    };
    if meta.uid() == uid {
        return mode & u != 0;
    }
    if meta.gid() == gid {
        return mode & g != 0;
    }
    mode & o != 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const V1_HOST: &str = "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n\
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0\n\
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0\n\
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
    const V2_HOST: &str =
        "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n";

    #[test]
    fn cgroup_version_and_directories_come_from_the_host() {
        let v1 = CgroupHost::from_mounts(CgroupVersion::Auto, V1_HOST).unwrap();
        assert_eq!(v1.version, 1);
        let settings = vec!["pids.max=max".to_string(), "cpu.shares=512".to_string()];
        assert_eq!(
            v1.vm_dirs("fc", "vm1", &settings),
            vec![
                PathBuf::from("/sys/fs/cgroup/pids/fc/vm1"),
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/fc/vm1")
            ]
        );
        let v2 = CgroupHost::from_mounts(CgroupVersion::Auto, V2_HOST).unwrap();
        assert_eq!(v2.version, 2);
        assert_eq!(
            v2.vm_dirs("fc", "vm1", &settings),
            vec![PathBuf::from("/sys/fs/cgroup/fc/vm1")]
        );
        assert!(CgroupHost::from_mounts(CgroupVersion::V1, V2_HOST).is_err());
        assert_eq!(
            CgroupHost::from_mounts(CgroupVersion::V2, V1_HOST)
                .unwrap()
                .vm_dirs("fc", "a", &settings),
            vec![PathBuf::from("/sys/fs/cgroup/unified/fc/a")]
        );
    }

    #[test]
    fn elf_headers_tell_static_from_dynamic_and_vmlinux_from_bzimage() {
        // This test binary is dynamically linked on a glibc host.
        let me = std::env::current_exe().unwrap();
        let info = elf_info(&me).unwrap().unwrap();
        assert_eq!(info.machine, EM_X86_64);
        assert!(jailed_binary_problem(&me).is_some());
        let dir = std::env::temp_dir().join(format!("mdt-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bz = dir.join("bzImage");
        let mut b = vec![0u8; 0x300];
        b[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&bz, &b).unwrap();
        assert!(firecracker_kernel_problem(&bz).unwrap().contains("bzImage"));
        assert!(firecracker_kernel_problem(&dir.join("missing")).is_some());
        // An x86-64 ELF (this binary) passes the kernel format check.
        assert_eq!(firecracker_kernel_problem(&me), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn access_follows_owner_group_and_mode() {
        use std::os::unix::fs::PermissionsExt;
        let p = std::env::temp_dir().join(format!("mdt-acc-{}", std::process::id()));
        std::fs::write(&p, b"x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert!(!may_access(&m, 4321, 4321, false), "other: no read");
        assert!(may_access(&m, 0, 0, true), "root may");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert!(may_access(&m, 4321, 4321, false));
        assert!(!may_access(&m, 4321, 4321, true));
        let _ = std::fs::remove_file(&p);
    }
}
