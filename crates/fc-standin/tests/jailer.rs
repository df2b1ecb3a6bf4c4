//! metald's Firecracker driver under the jailer, end to end. By default this runs the **test
//! stand-ins** from this crate: the jailer stand-in behaves as the real jailer does in what
//! metald relies on (double fork with the pid file written after the jailer exits, a new mount
//! namespace and pivot_root, real cgroups, the jail named after the resolved exec file, only the
//! binary copied in), and the Firecracker stand-in is built statically for it. With
//! `FIRECRACKER_BIN` (a static firecracker) and `JAILER_BIN` set, the same tests run the real
//! binaries. Every test kills whatever runs in its cgroups and removes its jails, even when it
//! fails.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../metald/tests/common/mod.rs"]
mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use metald_api::v1 as pb;

const EVENT: Duration = Duration::from_secs(30);
/// The user jailed VMMs run as: not root, so that ownership matters.
const JAIL_UID: u32 = 4321;

/// A statically linked firecracker: `FIRECRACKER_BIN`, or the stand-in built with
/// `+crt-static` into `target/static` (the jailer copies only the binary into an empty
/// chroot). `scripts/test.sh` builds it first; a test run without it builds it here.
fn static_firecracker() -> PathBuf {
    if let Ok(p) = std::env::var("FIRECRACKER_BIN") {
        return PathBuf::from(p);
    }
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = repo_root();
            let out = root.join("target/static/x86_64-unknown-linux-gnu/debug/firecracker-standin");
            let status = std::process::Command::new(env!("CARGO"))
                .current_dir(&root)
                .args([
                    "build",
                    "--locked",
                    "-p",
                    "fc-standin",
                    "--bin",
                    "firecracker-standin",
                    "--target",
                    "x86_64-unknown-linux-gnu",
                    "--target-dir",
                ])
                .arg(root.join("target/static"))
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .status()
                .expect("running cargo for the static stand-in");
            assert!(status.success(), "building the static firecracker stand-in");
            out
        })
        .clone()
}

fn jailer_bin() -> String {
    std::env::var("JAILER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_jailer-standin").into())
}

/// One test's jails and cgroups, cleaned up on drop whatever happened.
struct Jails {
    top: PathBuf,
    parent: String,
}

impl Jails {
    fn new(name: &str) -> Jails {
        let top = PathBuf::from(format!("/tmp/mdt-jail-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        std::fs::create_dir_all(top.join("jails")).unwrap();
        Jails {
            top,
            parent: format!("mdt-{}-{name}", std::process::id()),
        }
    }

    fn base(&self) -> PathBuf {
        self.top.join("jails")
    }

    /// The config that jails VMMs here, as `JAIL_UID`. `extra` holds top-level tables; lines
    /// for `[firecracker]` go in `fc_extra`.
    fn toml(&self, extra: &str, fc_extra: &str, binary: &Path) -> String {
        format!(
            "{extra}\n[firecracker]\nbinary = \"{}\"\n{fc_extra}\n[firecracker.jailer]\nenabled = true\nbinary = \"{}\"\nuid = {JAIL_UID}\ngid = {JAIL_UID}\nchroot_base = \"{}\"\nparent_cgroup = \"{}\"\n",
            binary.display(),
            jailer_bin(),
            self.base().display(),
            self.parent
        )
    }

    /// Every cgroup directory of this test's VMs, across hierarchies.
    fn cgroup_parents(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = e.path().join(&self.parent);
            if p.is_dir() {
                out.push(p);
            }
        }
        let unified = PathBuf::from("/sys/fs/cgroup").join(&self.parent);
        if unified.is_dir() {
            out.push(unified);
        }
        out
    }

    fn cgroups_of(&self, vm: &str) -> Vec<PathBuf> {
        self.cgroup_parents()
            .into_iter()
            .map(|p| p.join(vm))
            .filter(|p| p.exists())
            .collect()
    }

    fn jail(&self, exec_name: &str, vm: &str) -> PathBuf {
        self.base().join(exec_name).join(vm)
    }

    /// Processes in any of this test's cgroups (each once: a process is in one cgroup per
    /// hierarchy).
    fn processes(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for p in self.cgroup_parents() {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    pids.extend(
                        std::fs::read_to_string(e.path().join("cgroup.procs"))
                            .unwrap_or_default()
                            .split_whitespace()
                            .filter_map(|s| s.parse::<i32>().ok()),
                    );
                }
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

impl Jails {
    /// Processes whose root directory is one of this test's jails (a VMM that escaped its
    /// cgroup, or one started without a cgroup), by device and inode.
    fn jailed_anywhere(&self) -> Vec<i32> {
        let roots: Vec<(u64, u64)> = std::fs::read_dir(self.base())
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|exec| {
                std::fs::read_dir(exec.path())
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .filter_map(|vm| std::fs::metadata(vm.path().join("root")).ok())
            .map(|m| (m.dev(), m.ino()))
            .collect();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/root"))
                && roots.contains(&(m.dev(), m.ino()))
            {
                out.push(pid);
            }
        }
        out
    }
}

impl Drop for Jails {
    fn drop(&mut self) {
        for pid in self.jailed_anywhere() {
            signal(pid, libc::SIGKILL);
        }
        for _ in 0..200 {
            let pids = self.processes();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                signal(pid, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in self.cgroup_parents() {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir(e.path());
            }
            let _ = std::fs::remove_dir(&p);
        }
        let _ = std::fs::remove_dir_all(&self.top);
    }
}

/// Live processes whose command line has `--id <vm>` (a jailer or a jailed firecracker).
fn with_id(vm: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        if !zombie
            && args
                .windows(2)
                .any(|w| w[0] == b"--id" && w[1] == vm.as_bytes())
        {
            out.push(pid);
        }
    }
    out
}

fn exec_name(binary: &Path) -> String {
    std::fs::canonicalize(binary)
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

async fn jailed_daemon(j: &Jails, extra: &str, binary: &Path, assets: &Assets) -> Daemon {
    jailed_daemon_fc(j, extra, "", binary, assets).await
}

async fn jailed_daemon_fc(
    j: &Jails,
    extra: &str,
    fc_extra: &str,
    binary: &Path,
    assets: &Assets,
) -> Daemon {
    let mut args = assets.args();
    args.extend(["--vmm".into(), "firecracker".into()]);
    Daemon::start_with_toml_args(&j.toml(extra, fc_extra, binary), args).await
}

async fn create_and_boot(c: &mut Client, assets: &Assets, id: &str) -> i32 {
    c.create_vm(assets.request(id)).await.unwrap();
    c.boot_vm(pb::BootVmRequest {
        vm_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    pid_of(&info(c, id).await).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_jailed_creates_in_a_row_all_succeed_and_leave_nothing() {
    let j = Jails::new("twenty");
    let fc = static_firecracker();
    let assets = Assets::new();
    let d = jailed_daemon(&j, "[recovery]\nenabled = false\n", &fc, &assets).await;
    let mut c = d.client().await;
    for n in 0..20 {
        let id = format!("j{n}");
        let pid = create_and_boot(&mut c, &assets, &id).await;
        let i = info(&mut c, &id).await;
        assert_eq!(state(&i), pb::VmState::Running, "{id}");
        let root = j.jail(&exec_name(&fc), &id).join("root");
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
            Path::new("/"),
            "the VMM is pivoted into its own mount namespace"
        );
        assert!(
            std::fs::metadata(format!("/proc/{pid}/root"))
                .unwrap()
                .ino()
                == std::fs::metadata(&root).unwrap().ino(),
            "its root is the jail"
        );
        let cgs = j.cgroups_of(&id);
        assert!(!cgs.is_empty(), "{id} has a cgroup");
        assert!(
            std::fs::read_to_string(cgs[0].join("cgroup.procs"))
                .unwrap()
                .contains(&pid.to_string())
        );
        // The jailer set the VMM's memory limit: the guest's memory plus metald's overhead.
        let limit: Vec<u64> = cgs
            .iter()
            .filter_map(|d| {
                ["memory.limit_in_bytes", "memory.max"]
                    .iter()
                    .find_map(|f| std::fs::read_to_string(d.join(f)).ok())
            })
            .filter_map(|v| v.trim().parse().ok())
            .collect();
        assert_eq!(limit, vec![(128u64 + 256) << 20], "{cgs:?}");
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: id.clone(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(
            !root.exists() && j.cgroups_of(&id).is_empty(),
            "{id} left its jail or cgroup"
        );
        assert!(wait_dead(pid, Duration::from_secs(5)).await);
    }
    assert!(
        j.processes().is_empty(),
        "nothing runs in the test's cgroups"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_start_that_fails_at_any_step_leaves_no_process_jail_or_cgroup() {
    let fc = static_firecracker();
    let assets = Assets::new();
    // Spawn timeouts that end the start at different steps of the jailer's sequence: before
    // the jailer exits, while the daemon has not yet written its pid file or exec'd.
    let mut failed = 0;
    for (n, ms) in [1u64, 20, 60].into_iter().enumerate() {
        let j = Jails::new(&format!("fail{n}"));
        let d = jailed_daemon_fc(
            &j,
            "[recovery]\nenabled = false\n",
            &format!("spawn_timeout = {ms}"),
            &fc,
            &assets,
        )
        .await;
        let mut c = d.client().await;
        let err = c.create_vm(assets.request("jf")).await;
        if err.is_ok() {
            // Fast enough on this machine: the start finished within the timeout.
            eprintln!("spawn timeout {ms} ms: the jailed start finished in time");
            continue;
        }
        failed += 1;
        eprintln!("spawn timeout {ms} ms: {}", err.unwrap_err().message());
        // Whatever the start had begun is gone: nothing in the VM's cgroup, and no process of
        // the VM's anywhere (the jailer's daemon or firecracker, found by its `--id`).
        let left = async {
            for _ in 0..100 {
                if j.processes().is_empty()
                    && j.cgroups_of("jf").is_empty()
                    && with_id("jf").is_empty()
                {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        };
        assert!(
            left.await,
            "timeout {ms} ms left processes {:?} {:?}",
            j.processes(),
            with_id("jf")
        );
        assert!(
            !j.jail(&exec_name(&fc), "jf").exists(),
            "timeout {ms} ms left the jail"
        );
        drop(d);
    }
    assert!(failed > 0, "no start failed, so nothing was checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_jailed_vm_is_recovered() {
    let j = Jails::new("recover");
    let fc = static_firecracker();
    let assets = Assets::new();
    let d = jailed_daemon(
        &j,
        "[recovery]\nenabled = true\nretry_interval = 100\n",
        &fc,
        &assets,
    )
    .await;
    let mut c = d.client().await;
    let pid = create_and_boot(&mut c, &assets, "jr").await;
    let mark = d.log_mark();
    signal(pid, libc::SIGKILL);
    d.wait_event(mark, "jr", "vm recovered", EVENT).await;
    let i = info(&mut c, "jr").await;
    assert_eq!(state(&i), pb::VmState::Running);
    let pid2 = pid_of(&i).unwrap();
    assert_ne!(pid, pid2);
    assert_eq!(
        std::fs::metadata(format!("/proc/{pid2}/root"))
            .unwrap()
            .ino(),
        std::fs::metadata(j.jail(&exec_name(&fc), "jr").join("root"))
            .unwrap()
            .ino()
    );
    assert!(!d.logged(mark, "jr", "vm recovery failed"));
    // Exactly one firecracker runs for the VM.
    assert_eq!(j.processes(), vec![pid2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_stray_is_killed_and_then_its_jail_and_cgroup_removed() {
    let j = Jails::new("stray");
    let fc = static_firecracker();
    let assets = Assets::new();
    let mut d = jailed_daemon(
        &j,
        "[recovery]\nenabled = false\n[reconcile]\ninterval = 300\nstray_grace = 500\n",
        &fc,
        &assets,
    )
    .await;
    let mut c = d.client().await;
    let pid = create_and_boot(&mut c, &assets, "js").await;
    // Its row is lost while metald is down.
    d.stop_with(libc::SIGKILL);
    d.db()
        .execute("DELETE FROM vms WHERE vm_id = 'js'", [])
        .unwrap();
    let mark = d.log_mark();
    d.spawn().await;
    d.wait_event(mark, "js", "stray vmm killed", EVENT).await;
    assert!(wait_dead(pid, Duration::from_secs(5)).await);
    d.wait_log_since(mark, EVENT, |l| {
        l.contains("\"stale jail removed\"") && l.contains("\"js\"")
    })
    .await
    .expect("the stray's jail removed");
    assert!(!j.jail(&exec_name(&fc), "js").exists());
    assert!(j.cgroups_of("js").is_empty());
    // A leftover of a VM that never had a row: a process in its cgroup, no VMM marker.
    let ghost = j.jail(&exec_name(&fc), "ghost").join("root");
    std::fs::create_dir_all(&ghost).unwrap();
    let cg = j.cgroup_parents()[0].join("ghost");
    std::fs::create_dir_all(&cg).unwrap();
    let mut sleeper = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    std::fs::write(cg.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
    let mark = d.log_mark();
    d.wait_log_since(mark, EVENT, |l| {
        l.contains("\"stale jail removed\"") && l.contains("\"ghost\"")
    })
    .await
    .expect("the ghost's jail removed after its process");
    let _ = sleeper.wait();
    assert!(!ghost.exists() && !cg.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jailed_vms_leave_the_assets_owner_mode_and_inode_unchanged() {
    let j = Jails::new("assets");
    let fc = static_firecracker();
    let assets = Assets::new();
    // An initrd the jail's user may not read: it gets a copy.
    let private = assets.dir.join("initrd-private.img");
    std::fs::copy(assets.dir.join("initrd.img"), &private).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A read-only drive and a writable one the jail's user owns.
    let ro = assets.dir.join("ro.img");
    std::fs::write(&ro, vec![0u8; 1 << 20]).unwrap();
    let rw = assets.dir.join("rw.img");
    std::fs::write(&rw, vec![0u8; 1 << 20]).unwrap();
    std::os::unix::fs::chown(&rw, Some(JAIL_UID), Some(JAIL_UID)).unwrap();
    let watched = [
        assets.kernel(),
        assets.dir.join("initrd.img"),
        private.clone(),
        ro.clone(),
        rw.clone(),
    ];
    let before: Vec<(u32, u32, u32, u64)> = watched
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).unwrap();
            (m.uid(), m.gid(), m.mode(), m.ino())
        })
        .collect();
    let d = jailed_daemon(&j, "[recovery]\nenabled = false\n", &fc, &assets).await;
    let mut c = d.client().await;
    let drive = |id: &str, p: &Path, ro: bool| pb::StorageDevice {
        id: id.into(),
        path: p.display().to_string(),
        read_only: ro,
        is_root_device: false,
    };
    let mut r = assets.request("ja");
    r.config.as_mut().unwrap().storage = vec![drive("ro", &ro, true), drive("rw", &rw, false)];
    c.create_vm(r).await.unwrap();
    c.boot_vm(pb::BootVmRequest {
        vm_id: "ja".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut r = assets.request("jb");
    r.config
        .as_mut()
        .unwrap()
        .boot
        .as_mut()
        .unwrap()
        .initrd_path = private.display().to_string();
    c.create_vm(r).await.unwrap();
    c.boot_vm(pb::BootVmRequest {
        vm_id: "jb".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // The unreadable initrd was copied for the jail, and the copy is the jail user's.
    let copy = j.jail(&exec_name(&fc), "jb").join("root/initrd");
    let cm = std::fs::metadata(&copy).unwrap();
    assert_ne!(cm.ino(), std::fs::metadata(&private).unwrap().ino());
    assert_eq!(cm.uid(), JAIL_UID);
    // A writable drive the jail's user may not write is refused at CreateVm, naming the field.
    let theirs = assets.dir.join("root-owned.img");
    std::fs::write(&theirs, vec![0u8; 1 << 20]).unwrap();
    let mut r = assets.request("jc");
    r.config.as_mut().unwrap().storage = vec![drive("data", &theirs, false)];
    let e = c.create_vm(r).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("config.storage[0].path"),
        "{}",
        e.message()
    );
    for id in ["ja", "jb"] {
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: id.into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let after: Vec<(u32, u32, u32, u64)> = watched
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).unwrap();
            (m.uid(), m.gid(), m.mode(), m.ino())
        })
        .collect();
    assert_eq!(before, after, "owner, group, mode and inode of {watched:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_vms_full_and_diff_snapshots_restore() {
    let j = Jails::new("snap");
    let fc = static_firecracker();
    let assets = Assets::new();
    let d = jailed_daemon_fc(
        &j,
        "[recovery]\nenabled = false\n",
        "diff_snapshots = true",
        &fc,
        &assets,
    )
    .await;
    let mut c = d.client().await;
    create_and_boot(&mut c, &assets, "jsnap").await;
    // A diff needs a base of this VMM's.
    let e = c
        .snapshot_vm(pb::SnapshotVmRequest {
            vm_id: "jsnap".into(),
            diff: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    let full = c
        .snapshot_vm(pb::SnapshotVmRequest {
            vm_id: "jsnap".into(),
            diff: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let diff = c
        .snapshot_vm(pb::SnapshotVmRequest {
            vm_id: "jsnap".into(),
            diff: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The stored files are outside the jail, in metald's snapshot store.
    for s in [&full, &diff] {
        assert!(Path::new(&s.path).join("vmstate").exists(), "{}", s.path);
        assert!(Path::new(&s.path).starts_with(&d.state_dir));
    }
    // The diff was merged onto the full snapshot: restoring it alone works.
    for (id, snap) in [("from-full", &full), ("from-diff", &diff)] {
        c.create_vm(pb::CreateVmRequest {
            vm_id: id.into(),
            customer_id: "cust-test".into(),
            config: None,
            from_snapshot: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.boot_vm(pb::BootVmRequest {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let i = info(&mut c, id).await;
        assert_eq!(state(&i), pb::VmState::Running, "{id}");
        // The guest goes on where it was: its memory is whole. (A real guest under this
        // host's software KVM never reaches its init before it dies, so only the stand-in's
        // "guest" can say so here.)
        if std::env::var("FIRECRACKER_BIN").is_err() {
            let console = console_of(&i);
            assert!(
                wait_console(&console, "METALD-GUEST-ALIVE", 2, EVENT).await,
                "{id}: the restored guest prints nothing to {}",
                console.display()
            );
        }
        // A restored VMM logs to its own log, not to the console.
        let log = d.run_dir(id).join("vmm.log");
        assert!(
            std::fs::metadata(&log)
                .map(|m| m.len() > 0)
                .unwrap_or(false),
            "{id}: {} is empty",
            log.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firecracker_configured_through_a_symlink_runs_jailed() {
    let j = Jails::new("symlink");
    let fc = static_firecracker();
    let link = j.top.join("firecracker-v1.16.1-x86_64");
    std::os::unix::fs::symlink(&fc, &link).unwrap();
    let assets = Assets::new();
    let d = jailed_daemon(&j, "[recovery]\nenabled = false\n", &link, &assets).await;
    let mut c = d.client().await;
    let pid = create_and_boot(&mut c, &assets, "jl").await;
    // The jail is named after the file the link resolves to, as the jailer names it.
    let jail = j.jail(&exec_name(&fc), "jl");
    assert!(jail.join("root").exists(), "{}", jail.display());
    assert!(pid_alive(pid));
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "jl".into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!jail.exists() && j.processes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamically_linked_firecracker_under_the_jailer_is_a_start_up_error() {
    let j = Jails::new("dynamic");
    let cfg = j.top.join("metald.toml");
    // The plain stand-in build is dynamically linked.
    std::fs::write(
        &cfg,
        j.toml("", "", Path::new(env!("CARGO_BIN_EXE_firecracker-standin"))),
    )
    .unwrap();
    let state = PathBuf::from(format!("/tmp/mdt-d{}", std::process::id()));
    let mut child = std::process::Command::new(bin("metald"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--config")
        .arg(&cfg)
        .arg("--asset-dir")
        .arg(guest_dir())
        .args(["--vmm", "firecracker"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It must refuse at once; one that starts is killed (bounded) and the test fails.
    let mut exited = None;
    for _ in 0..200 {
        if let Some(st) = child.try_wait().unwrap() {
            exited = Some(st);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if exited.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&state);
    assert!(
        exited.is_some_and(|s| !s.success()),
        "metald started with a dynamic firecracker"
    );
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(err.contains("dynamically linked"), "{err}");
}
