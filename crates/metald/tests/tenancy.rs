//! Tenants cannot see or touch each other. Real `metalctl` processes run as unprivileged users
//! (two tenants, of customers acme and globex, a reader and a stranger no rule names) against a
//! metald whose socket anyone may open and whose `[auth]` rules decide, by the uid the kernel
//! gives for each connection. Quotas refuse a create that would pass a cap and leave nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::os::unix::process::CommandExt as _;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use metald_api::v1 as pb;

/// Users with no account on the host: the kernel does not need one.
const ACME: u32 = 61_001;
const GLOBEX: u32 = 61_002;
const READER: u32 = 61_003;
const STRANGER: u32 = 61_004;

fn auth_toml() -> String {
    format!(
        "[auth]\nsocket_mode = 0o666\n\
         [[auth.callers]]\nuid = {ACME}\nrole = \"tenant\"\ncustomers = [\"acme\"]\n\
         [[auth.callers]]\nuid = {GLOBEX}\nrole = \"tenant\"\ncustomers = [\"globex\"]\n\
         [[auth.callers]]\nuid = {READER}\nrole = \"reader\"\n"
    )
}

/// A directory any user may enter, holding links to (or, across file systems, copies of)
/// `files`; removed when dropped. The checkout itself may be closed to other users (CI clones
/// into a private temporary directory), so what an unprivileged user must run or open is put
/// here.
struct OpenDir(std::path::PathBuf);

impl OpenDir {
    fn with(name: &str, files: &[std::path::PathBuf]) -> OpenDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mdt-open-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for f in files {
            let to = dir.join(f.file_name().unwrap());
            if std::fs::hard_link(f, &to).is_err() {
                std::fs::copy(f, &to).unwrap();
            }
        }
        OpenDir(dir)
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for OpenDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What one metalctl run said.
struct Ran {
    ok: bool,
    out: String,
    err: String,
}

/// Runs metalctl (from `bin`, where any user may run it) as `uid`, bounded: a hung call fails
/// the test instead of hanging it.
async fn ctl(d: &Daemon, bin: &OpenDir, uid: u32, args: &[&str]) -> Ran {
    let mut cmd = std::process::Command::new(bin.path("metalctl"));
    cmd.uid(uid)
        .gid(uid)
        .arg("--endpoint")
        .arg(format!("unix:{}", d.sock.display()))
        .args(args)
        .stdin(Stdio::null());
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("metalctl did not finish within 30 s")
        .expect("running metalctl");
    Ran {
        ok: out.status.success(),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn create_args<'a>(id: &'a str, customer: &'a str, kernel: &'a str) -> Vec<&'a str> {
    vec![
        "create",
        "--id",
        id,
        "--customer",
        customer,
        "--kernel",
        kernel,
        "--memory-mib",
        "128",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_and_touch_only_their_own_vms() {
    let d = Daemon::start_with_toml(&auth_toml()).await;
    let tools = OpenDir::with("bin", &[bin("metalctl")]);
    let kernel = guest_dir().join("vmlinux").display().to_string();

    let r = ctl(&d, &tools, ACME, &create_args("ta1", "acme", &kernel)).await;
    assert!(r.ok, "acme's create: {}", r.err);
    let r = ctl(&d, &tools, GLOBEX, &create_args("tb1", "globex", &kernel)).await;
    assert!(r.ok, "globex's create: {}", r.err);

    // A tenant creates only for its own customers.
    let r = ctl(&d, &tools, ACME, &create_args("ta9", "globex", &kernel)).await;
    assert!(!r.ok && r.err.contains("PermissionDenied"), "{}", r.err);

    // It lists only its own VMs.
    let r = ctl(&d, &tools, ACME, &["list", "--json"]).await;
    assert!(r.ok, "{}", r.err);
    assert!(r.out.contains("ta1") && !r.out.contains("tb1"), "{}", r.out);

    // Every call on the other tenant's VM answers as for an id never used.
    let never = ctl(&d, &tools, ACME, &["info", "tz9"]).await;
    assert!(never.err.contains("NotFound"), "{}", never.err);
    for args in [
        vec!["info", "tb1"],
        vec!["health", "tb1"],
        vec!["boot", "tb1"],
        vec!["pause", "tb1"],
        vec!["resume", "tb1"],
        vec!["shutdown", "tb1"],
        vec!["reboot", "tb1"],
        vec!["snapshot", "tb1"],
        vec!["delete", "tb1"],
        vec!["recover", "tb1"],
        vec!["events", "tb1"],
        vec!["events", "tb1", "--follow"],
        vec!["logs", "tb1"],
    ] {
        let r = ctl(&d, &tools, ACME, &args).await;
        assert!(
            !r.ok && r.err.contains("NotFound: vm tb1 not found"),
            "{args:?} as acme: {}",
            r.err
        );
    }
    // globex's VM is untouched.
    let mut admin = d.client().await;
    assert_eq!(state(&info(&mut admin, "tb1").await), pb::VmState::Created);

    // Host operations are for admins.
    for args in [
        vec!["reconcile"],
        vec!["host", "status"],
        vec!["recovery-status"],
    ] {
        let r = ctl(&d, &tools, ACME, &args).await;
        assert!(
            !r.ok && r.err.contains("PermissionDenied"),
            "{args:?}: {}",
            r.err
        );
    }

    // A reader sees everything and changes nothing.
    let r = ctl(&d, &tools, READER, &["list", "--json"]).await;
    assert!(r.out.contains("ta1") && r.out.contains("tb1"), "{}", r.out);
    for args in [vec!["boot", "ta1"], vec!["delete", "tb1"]] {
        let r = ctl(&d, &tools, READER, &args).await;
        assert!(
            !r.ok && r.err.contains("PermissionDenied"),
            "{args:?}: {}",
            r.err
        );
    }
    let r = ctl(&d, &tools, READER, &create_args("tr1", "acme", &kernel)).await;
    assert!(!r.ok && r.err.contains("PermissionDenied"), "{}", r.err);

    // Nobody's rule names the stranger.
    let r = ctl(&d, &tools, STRANGER, &["list"]).await;
    assert!(!r.ok && r.err.contains("Unauthenticated"), "{}", r.err);

    // The live stream is scoped too: acme follows all events while globex deletes its VM and
    // acme creates and deletes another; acme sees its own VM's end and nothing of globex's.
    let mut follow = {
        let mut cmd = std::process::Command::new(tools.path("metalctl"));
        cmd.uid(ACME)
            .gid(ACME)
            .arg("--endpoint")
            .arg(format!("unix:{}", d.sock.display()))
            .args(["events", "--follow", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        cmd.spawn().unwrap()
    };
    let out = follow.stdout.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut r = tokio::io::BufReader::new(out).lines();
        while let Ok(Some(l)) = r.next_line().await {
            let _ = tx.send(l);
        }
    });
    let r = ctl(&d, &tools, GLOBEX, &["delete", "tb1"]).await;
    assert!(r.ok, "{}", r.err);
    let r = ctl(&d, &tools, ACME, &create_args("ta2", "acme", &kernel)).await;
    assert!(r.ok, "{}", r.err);
    let r = ctl(&d, &tools, ACME, &["delete", "ta2", "--force"]).await;
    assert!(r.ok, "{}", r.err);
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(l) = lines.recv().await {
            let mine = l.contains("ta2");
            seen.push(l);
            if mine {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    let _ = follow.kill().await;
    let why = match follow.wait_with_output().await {
        Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
        Err(e) => e.to_string(),
    };
    assert!(
        found,
        "acme never saw ta2's events: {seen:?}; metalctl said {why}"
    );
    assert!(seen.iter().all(|l| !l.contains("tb1")), "{seen:?}");
    // The history as well: globex's booted VM has events; an admin sees them, acme does not.
    let r = ctl(&d, &tools, GLOBEX, &create_args("tb2", "globex", &kernel)).await;
    assert!(r.ok, "{}", r.err);
    let r = ctl(&d, &tools, GLOBEX, &["boot", "tb2"]).await;
    assert!(r.ok, "{}", r.err);
    let all = ctl(&d, &tools, 0, &["events", "--json", "--limit", "1000"]).await;
    assert!(all.out.contains("tb2"), "{}", all.out);
    let r = ctl(&d, &tools, ACME, &["events", "--json", "--limit", "1000"]).await;
    assert!(r.ok && !r.out.contains("tb2"), "{} {}", r.out, r.err);

    // Every change is logged with who made it.
    let audit = d
        .wait_log_since(0, Duration::from_secs(5), |l| {
            l.contains("\"api call\"")
                && l.contains("uid:61002")
                && l.contains("\"DeleteVm\"")
                && l.contains("\"tenant\"")
        })
        .await;
    assert!(audit.is_some(), "no audit line for globex's delete");
    // A refused host operation is in the audit trail too.
    let refused = d
        .wait_log_since(0, Duration::from_secs(5), |l| {
            l.contains("\"api call\"")
                && l.contains("uid:61001")
                && l.contains("\"Reconcile\"")
                && l.contains("PermissionDenied")
        })
        .await;
    assert!(
        refused.is_some(),
        "no audit line for acme's refused Reconcile"
    );
    let text = d.metrics_text().await;
    assert!(
        text.contains("method=\"ListVms\",code=\"Ok\",role=\"tenant\""),
        "no tenant-labelled ListVms in the metrics"
    );
    assert!(
        text.contains("role=\"none\""),
        "the stranger is not counted as none"
    );

    for id in ["ta1", "tb2"] {
        admin
            .delete_vm(pb::DeleteVmRequest {
                vm_id: id.into(),
                force: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_past_a_quota_is_refused_and_leaves_nothing() {
    let d = Daemon::start_with_toml(
        "[quota]\nmax_memory_mib = 400\n\
         [[quota.customers]]\ncustomer_id = \"globex\"\nmax_vms = 1\n",
    )
    .await;
    let mut c = d.client().await;
    let req = |id: &str, customer: &str| {
        let mut r = guest_request(id);
        r.customer_id = customer.into();
        r
    };
    c.create_vm(req("q1", "globex")).await.unwrap();
    let e = c.create_vm(req("q2", "globex")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
    assert!(
        e.message().contains("customer \"globex\" max_vms is 1"),
        "{}",
        e.message()
    );
    // Another customer still has room, until the host's memory cap.
    c.create_vm(req("q3", "acme")).await.unwrap();
    c.create_vm(req("q4", "acme")).await.unwrap();
    let e = c.create_vm(req("q5", "acme")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
    assert!(
        e.message()
            .contains("host max_memory_mib is 400; 384 in use"),
        "{}",
        e.message()
    );
    // Nothing of the refused VMs: no row, no run directory, no VMM.
    for id in ["q2", "q5"] {
        let e = c
            .get_vm_info(pb::GetVmInfoRequest { vm_id: id.into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(!d.run_dir(id).exists(), "{id} left its run directory");
    }
    assert_eq!(d.vmm_pids().len(), 3);
    // A delete gives the room back.
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "q1".into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    c.create_vm(req("q2", "globex")).await.unwrap();
    for id in ["q2", "q3", "q4"] {
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: id.into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn a_tcp_listener_without_insecure_tcp_is_refused_at_start() {
    let said = metald_refuses_to_start(&["--listen", "tcp:127.0.0.1:0"]).await;
    assert!(said.contains("auth.insecure_tcp = true"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_vmm_runs_under_its_seccomp_sandbox() {
    if on_firecracker() {
        // Firecracker installs its own seccomp filters; the jailer tests cover it.
        return;
    }
    let d = Daemon::start().await;
    let mut c = d.client().await;
    c.create_vm(guest_request("sb1")).await.unwrap();
    let pid = pid_of(&info(&mut c, "sb1").await).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mode = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(str::trim);
    // 2: filter mode.
    assert_eq!(mode, Some("2"), "{status}");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("spawn=deny"),
        "the sandbox does not forbid spawning"
    );
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "sb1".into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// The memory limit a cgroup directory holds (v1 or v2).
fn memory_limit(dir: &std::path::Path) -> Option<u64> {
    ["memory.limit_in_bytes", "memory.max"]
        .iter()
        .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .and_then(|s| s.trim().parse().ok())
}

fn in_cgroup(dir: &std::path::Path, pid: i32) -> bool {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .any(|p| p == pid.to_string())
}

/// Waits, bounded, until `f` holds.
async fn until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        // No event announces a cgroup directory going away; bounded by `within`.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_vmm_runs_as_its_user_in_a_cgroup_that_goes_with_it() {
    if on_firecracker() {
        return;
    }
    const VMM_USER: u32 = 61_010;
    // The guest's files, where QEMU's user may open them.
    let assets = OpenDir::with(
        "assets",
        &[guest_dir().join("vmlinux"), guest_dir().join("initrd.img")],
    );
    let d = Daemon::start_with_toml_args(
        &format!("[qemu]\nuid = {VMM_USER}\n"),
        vec!["--asset-dir".into(), assets.0.display().to_string()],
    )
    .await;
    let mut c = d.client().await;
    let mut req = guest_request("u1");
    let config = req.config.as_mut().unwrap();
    config.auto_recover = Some(false);
    let boot = config.boot.as_mut().unwrap();
    boot.kernel_path = assets.path("vmlinux").display().to_string();
    boot.initrd_path = assets.path("initrd.img").display().to_string();
    c.create_vm(req).await.unwrap();
    c.boot_vm(pb::BootVmRequest {
        vm_id: "u1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let vm = info(&mut c, "u1").await;
    let pid = pid_of(&vm).unwrap();
    // The guest runs, under a QEMU that is not root.
    assert!(
        wait_console(
            &console_of(&vm),
            "METALD-GUEST-READY",
            1,
            Duration::from_secs(60)
        )
        .await,
        "the guest of an unprivileged QEMU did not boot"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uids.split_whitespace().skip(1).collect::<Vec<_>>(),
        vec![VMM_USER.to_string(); 4],
        "{uids}"
    );
    // Its own cgroup in every hierarchy, with the guest's memory plus the overhead as limit.
    let groups = d.cgroups_of("u1");
    assert!(!groups.is_empty(), "no cgroup for u1");
    assert!(groups.iter().all(|g| in_cgroup(g, pid)), "{groups:?}");
    let limits: Vec<u64> = groups.iter().filter_map(|g| memory_limit(g)).collect();
    assert_eq!(limits, vec![(128 + 256) << 20], "{groups:?}");
    // A crash takes the cgroup with the VMM (no recovery for this VM: nothing new is made).
    metald::process::kill_pid(pid, libc::SIGKILL).unwrap();
    assert!(
        until(Duration::from_secs(10), || d.cgroups_of("u1").is_empty()).await,
        "the cgroup outlived its crashed VMM"
    );
    // A new start makes it again; a delete removes it.
    c.recover_vm(pb::RecoverVmRequest {
        vm_id: "u1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let pid2 = pid_of(&info(&mut c, "u1").await).unwrap();
    assert!(d.cgroups_of("u1").iter().all(|g| in_cgroup(g, pid2)));
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "u1".into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(d.cgroups_of("u1").is_empty(), "the cgroup outlived its vm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_killed_at_its_cgroup_memory_limit_is_reported_as_oom_and_recovered() {
    if on_firecracker() {
        return;
    }
    let d = Daemon::start().await;
    let mut c = d.client().await;
    c.create_vm(guest_request("o1")).await.unwrap();
    let pid = pid_of(&info(&mut c, "o1").await).unwrap();
    // Squeeze the created (not yet booted) VMM's memory to a little above what it uses: its
    // guest's boot touches far more, and the kernel's OOM killer ends it.
    for g in d.cgroups_of("o1") {
        for (usage, limit) in [
            ("memory.usage_in_bytes", "memory.limit_in_bytes"),
            ("memory.current", "memory.max"),
        ] {
            if let Ok(u) = std::fs::read_to_string(g.join(usage)) {
                let u: u64 = u.trim().parse().unwrap();
                std::fs::write(g.join(limit), (u + (4 << 20)).to_string()).unwrap();
            }
        }
    }
    let mark = d.log_mark();
    c.boot_vm(pb::BootVmRequest {
        vm_id: "o1".into(),
        ..Default::default()
    })
    .await
    .ok();
    let exited = d
        .wait_log_since(mark, Duration::from_secs(30), |l| {
            l.contains("\"o1\"") && l.contains("cause: oom")
        })
        .await;
    assert!(exited.is_some(), "no oom exit of o1 logged");
    // Recovered: a new VMM, in a fresh cgroup with the configured limit, runs the guest.
    let back = d
        .wait_log_since(mark, Duration::from_secs(60), |l| {
            l.contains("\"o1\"") && l.contains("vm recovered")
        })
        .await;
    assert!(back.is_some(), "o1 was not recovered");
    let vm = info(&mut c, "o1").await;
    assert!(vm.last_exit.contains("oom"), "{}", vm.last_exit);
    let pid2 = pid_of(&vm).unwrap();
    assert_ne!(pid, pid2);
    let limits: Vec<u64> = d
        .cgroups_of("o1")
        .iter()
        .filter_map(|g| memory_limit(g))
        .collect();
    assert_eq!(limits, vec![(128 + 256) << 20]);
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "o1".into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
}
