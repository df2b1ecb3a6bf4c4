//! metald when its own host fails it: the registry's disk full (a real tmpfs filled to ENOSPC),
//! and the host modes (normal, readonly, maintenance) an operator sets. Real QEMU guests (or the
//! Firecracker driver with `METALD_TEST_VMM=firecracker`), real SQLite on a real full disk.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use metald_api::v1 as pb;

const EVENT: Duration = Duration::from_secs(30);

/// A small tmpfs at a short path (unix socket paths must fit), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = PathBuf::from(format!("/tmp/mdf-{}", std::process::id()));
        let _ = std::process::Command::new("umount")
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs at {}", dir.display());
        Tmpfs(dir)
    }

    /// Writes a file until the file system is full.
    fn fill(&self) -> PathBuf {
        let p = self.0.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0xa5u8; 1 << 20];
        loop {
            if f.write_all(&chunk).is_err() {
                break;
            }
        }
        // The last partial pages too.
        let small = vec![0xa5u8; 4096];
        while f.write_all(&small).is_ok() {}
        let _ = f.sync_all();
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for pid in pids_matching(&self.0, "") {
            signal(pid, libc::SIGKILL);
        }
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn host_status(c: &mut Client) -> pb::GetHostStatusResponse {
    c.get_host_status(pb::GetHostStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Waits (bounded) for the host's mode to be `mode`.
async fn wait_mode(c: &mut Client, mode: &str, within: Duration) -> pb::GetHostStatusResponse {
    let deadline = Instant::now() + within;
    loop {
        let st = host_status(c).await;
        if st.mode.as_ref().is_some_and(|m| m.mode == host_mode(mode)) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "host mode is {:?}, not {mode}",
            st.mode
        );
        // The mode is polled through the API the way an operator would; bounded above.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn db_row(state_dir: &Path, vm: &str) -> (String, Option<i64>) {
    let c = rusqlite::Connection::open(state_dir.join("metald.db")).unwrap();
    c.query_row(
        "SELECT observed_state, pid FROM vms WHERE vm_id = ?1",
        [vm],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

/// The kinds of a VM's recorded events, oldest first.
fn event_kinds(state_dir: &Path, vm: &str) -> Vec<String> {
    let c = rusqlite::Connection::open(state_dir.join("metald.db")).unwrap();
    let mut st = c
        .prepare("SELECT kind FROM vm_events WHERE vm_id = ?1 ORDER BY seq")
        .unwrap();
    st.query_map([vm], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<Vec<String>>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_registry_disk_never_shows_a_dead_vm_as_running_and_the_vm_is_recovered() {
    let fs = Tmpfs::mount("48m");
    let cfg = fs.0.join("metald.toml");
    std::fs::write(
        &cfg,
        "[recovery]\nenabled = true\nretry_interval = 100\n[degraded]\nmin_free_bytes = 1\ncheck_interval = 200\n",
    )
    .unwrap();
    let mut d = Daemon::start_in(
        fs.0.clone(),
        vec!["--config".into(), cfg.display().to_string()],
    )
    .await;
    let mut c = d.client().await;
    let pid = running_vm(&mut c, "full").await;
    assert!(wait_mode(&mut c, "normal", EVENT).await.registry_writable);

    let filler = fs.fill();
    let mark = d.log_mark();
    let killed_at = Instant::now();
    signal(pid, libc::SIGKILL);
    // Within a second, no read says RUNNING with the dead pid.
    loop {
        let i = info(&mut c, "full").await;
        if state(&i) != pb::VmState::Running || pid_of(&i) != Some(pid) {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(1),
            "still RUNNING with dead pid {pid} after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The registry refused the exit: the host is readonly, saying why.
    let st = wait_mode(&mut c, "readonly", EVENT).await;
    let m = st.mode.unwrap();
    assert!(m.reason.contains("registry not writable"), "{}", m.reason);
    assert_eq!(m.set_by, "metald");
    assert!(!st.registry_writable);
    // A call that changes desired state is refused, naming the mode; reads still work.
    let e = c.create_vm(guest_request("refused")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{}", e.message());
    assert!(e.message().contains("readonly"), "{}", e.message());
    // The VM is recovered while the disk is still full.
    d.wait_event(mark, "full", "vm recovered", EVENT).await;
    let i = info(&mut c, "full").await;
    assert_eq!(state(&i), pb::VmState::Running);
    let pid2 = pid_of(&i).unwrap();
    assert_ne!(pid2, pid);
    assert!(pid_alive(pid2));
    assert_eq!(d.vmm_pids().len(), 1, "exactly one VMM for the VM");
    let metrics = d.metrics_text().await;
    assert!(
        metrics.contains("metald_host_mode{mode=\"readonly\"} 1"),
        "{metrics}"
    );

    // Space comes back: the mode returns to normal by itself and the registry holds the truth.
    std::fs::remove_file(&filler).unwrap();
    wait_mode(&mut c, "normal", EVENT).await;
    let deadline = Instant::now() + EVENT;
    loop {
        let row = db_row(&fs.0, "full");
        if row == ("running".to_string(), Some(i64::from(pid2))) {
            break;
        }
        assert!(Instant::now() < deadline, "registry row is {row:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The history the full disk refused is written too, in the order it happened.
    let deadline = Instant::now() + EVENT;
    loop {
        let kinds = event_kinds(&fs.0, "full");
        let from = kinds.iter().position(|k| k == "orphaned");
        if from.is_some_and(|i| kinds[i..].iter().any(|k| k == "recovered")) {
            break;
        }
        assert!(Instant::now() < deadline, "events recorded: {kinds:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And after a restart of metald.
    d.stop_with(libc::SIGKILL);
    d.spawn().await;
    let mut c = d.client().await;
    let i = info(&mut c, "full").await;
    assert_eq!(state(&i), pb::VmState::Running);
    assert_eq!(pid_of(&i), Some(pid2));
    assert_eq!(
        host_status(&mut c).await.mode.unwrap().mode,
        host_mode("normal")
    );
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_modes_refuse_and_allow_what_they_say_and_survive_a_restart() {
    let mut d = Daemon::start_with_toml(
        "[recovery]\nenabled = true\nretry_interval = 100\n[degraded]\nmin_free_bytes = 1\n",
    )
    .await;
    let mut c = d.client().await;
    let pid = running_vm(&mut c, "m1").await;
    let set = |mode: &str, reason: &str| pb::SetHostModeRequest {
        mode: host_mode(mode),
        reason: reason.into(),
        requested_by: "test".into(),
    };
    // Bad input names the field.
    for bad in [pb::HostModeKind::Unspecified as i32, 42] {
        let mut req = set("normal", "x");
        req.mode = bad;
        let e = c.set_host_mode(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("mode:"), "{}", e.message());
    }
    let e = c.set_host_mode(set("readonly", " ")).await.unwrap_err();
    assert!(e.message().starts_with("reason:"), "{}", e.message());

    // readonly: reads work, changes are refused with UNAVAILABLE naming the mode and reason.
    let r = c
        .set_host_mode(set("readonly", "disk replacement"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.mode.unwrap().mode, host_mode("readonly"));
    let e = c
        .pause_vm(pb::PauseVmRequest {
            vm_id: "m1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().contains("disk replacement"), "{}", e.message());
    assert_eq!(state(&info(&mut c, "m1").await), pb::VmState::Running);
    // The line is metald's, read from its stdout by another thread: wait for it, bounded.
    assert!(
        d.wait_log_since(0, Duration::from_secs(5), |l| l
            .contains("\"message\":\"host mode changed\""))
            .await
            .is_some()
    );

    // maintenance: no new VMs, no automatic recovery; shutdown and delete still work.
    c.set_host_mode(set("maintenance", "kernel update"))
        .await
        .unwrap();
    let e = c.create_vm(guest_request("m2")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("maintenance"), "{}", e.message());
    let mark = d.log_mark();
    signal(pid, libc::SIGKILL);
    d.wait_event(mark, "m1", "orphaned vm detected", EVENT)
        .await;
    d.wait_event(mark, "m1", "host in maintenance; vm left as is", EVENT)
        .await;
    assert_eq!(state(&info(&mut c, "m1").await), pb::VmState::Orphaned);
    let metrics = d.metrics_text().await;
    assert!(
        metrics.contains("metald_host_mode{mode=\"maintenance\"} 1"),
        "{metrics}"
    );

    // The mode survives a restart of metald.
    d.stop_with(libc::SIGKILL);
    d.spawn().await;
    let mut c = d.client().await;
    let st = host_status(&mut c).await.mode.unwrap();
    assert_eq!(
        (st.mode, st.reason.as_str(), st.set_by.as_str()),
        (host_mode("maintenance"), "kernel update", "test")
    );
    assert_eq!(state(&info(&mut c, "m1").await), pb::VmState::Orphaned);

    // Back to normal: the orphan left alone is recovered now.
    let mark = d.log_mark();
    c.set_host_mode(set("normal", "")).await.unwrap();
    d.wait_event(mark, "m1", "vm recovered", EVENT).await;
    assert_eq!(state(&info(&mut c, "m1").await), pb::VmState::Running);
    c.shutdown_vm(pb::ShutdownVmRequest {
        vm_id: "m1".into(),
        force: true,
        timeout_seconds: 0,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Leaves the registry as a metald killed between two steps of an operation leaves it: the VM
/// wanted RUNNING, recorded SHUTDOWN with no VMM (a reboot's stop was written, its new start was
/// not). A stand-in for a kill at that exact step, which cannot be produced on demand.
fn crash_between_steps(d: &Daemon, vm: &str) {
    d.db()
        .execute(
            "UPDATE vms SET observed_state = 'shutdown', desired_state = 'running', pid = NULL,
                 start_time = NULL, control_socket = NULL WHERE vm_id = ?1",
            [vm],
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metald_killed_between_a_reboots_steps_converges_at_restart() {
    let mut d = Daemon::start_with_toml("[recovery]\nenabled = true\n").await;
    let mut c = d.client().await;
    // Killed after the old VMM was stopped and before the new one started: no VMM at all.
    let old = running_vm(&mut c, "rb1").await;
    // Killed after the new VMM started and before it was written down: a VMM with the VM's
    // marker that no row records.
    let unrecorded = running_vm(&mut c, "rb2").await;
    d.stop_with(libc::SIGKILL);
    signal(old, libc::SIGKILL);
    assert!(wait_dead(old, Duration::from_secs(5)).await);
    crash_between_steps(&d, "rb1");
    crash_between_steps(&d, "rb2");
    let mark = d.log_mark();
    d.spawn().await;
    let mut c = d.client().await;
    d.wait_event(
        mark,
        "rb2",
        "unrecorded vmm with the vm's marker adopted",
        EVENT,
    )
    .await;
    d.wait_event(
        mark,
        "rb1",
        "converging a vm with no vmm to its desired state",
        EVENT,
    )
    .await;
    for (vm, want_pid) in [("rb1", None), ("rb2", Some(unrecorded))] {
        let deadline = Instant::now() + EVENT;
        let i = loop {
            let i = info(&mut c, vm).await;
            if state(&i) == pb::VmState::Running {
                break i;
            }
            assert!(Instant::now() < deadline, "{vm} is {:?}", state(&i));
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let pid = pid_of(&i).unwrap();
        if let Some(p) = want_pid {
            assert_eq!(pid, p, "{vm}: the unrecorded VMM is adopted, not replaced");
        }
        assert!(pid_alive(pid));
        let run_dir = d.run_dir(vm).display().to_string();
        let vmms: Vec<i32> = d
            .vmm_pids()
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&format!("{run_dir}/")))
                    .unwrap_or(false)
            })
            .collect();
        assert_eq!(vmms.len(), 1, "{vm}: exactly one VMM, not {vmms:?}");
    }
    assert!(!d.logged(mark, "rb2", "stray vmm killed"));
    // A client's retried reboot succeeds.
    c.reboot_vm(pb::RebootVmRequest {
        vm_id: "rb1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_host_saves_its_guests_and_restores_them_where_they_were() {
    const BOOT: Duration = Duration::from_secs(60);
    let mut d = Daemon::start_with_toml("[recovery]\nenabled = true\n").await;
    let mut c = d.client().await;
    for vm in ["dr1", "dr2"] {
        running_vm(&mut c, vm).await;
    }
    for vm in ["dr1", "dr2"] {
        let console = console_of(&info(&mut c, vm).await);
        assert!(
            wait_console(&console, "METALD-GUEST-ALIVE", 1, BOOT).await,
            "{vm} booted"
        );
    }
    let before = guest_uptime(&console_of(&info(&mut c, "dr1").await)).unwrap();
    // dr2 cannot be saved: its save directory is taken by a file (a stand-in for a save that
    // fails, which the VMM cannot be made to do on demand). It is shut down instead.
    std::fs::create_dir_all(d.state_dir.join("saved")).unwrap();
    std::fs::write(d.state_dir.join("saved/dr2"), b"in the way").unwrap();
    let r = c
        .drain_host(pb::DrainHostRequest {
            deadline_seconds: 120,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.saved, vec!["dr1".to_string()]);
    assert_eq!(
        r.shut_down
            .iter()
            .map(|o| o.vm_id.as_str())
            .collect::<Vec<_>>(),
        vec!["dr2"]
    );
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert_eq!(r.mode.unwrap().mode, host_mode("maintenance"));
    assert!(d.vmm_pids().is_empty(), "every VMM stopped");
    let i = info(&mut c, "dr1").await;
    assert_eq!(state(&i), pb::VmState::Shutdown);
    assert_eq!(i.desired_state, pb::VmState::Running as i32);
    assert!(!i.restore_from.is_empty());
    // While drained, nothing restarts them.
    c.reconcile(pb::ReconcileRequest {}).await.unwrap();
    assert!(d.vmm_pids().is_empty());

    // The host reboots; metald starts again and restores the saved guest.
    d.stop_with(libc::SIGKILL);
    let mark = d.log_mark();
    d.spawn().await;
    let mut c = d.client().await;
    d.wait_event(mark, "dr1", "saved vm restored", BOOT).await;
    let i = info(&mut c, "dr1").await;
    assert_eq!(state(&i), pb::VmState::Running);
    assert!(i.restore_from.is_empty());
    // It carries on where it was: its uptime goes on from before the drain, without a boot.
    let console = console_of(&i);
    assert!(wait_console(&console, "METALD-GUEST-ALIVE", 1, BOOT).await);
    let after = guest_uptime(&console).unwrap();
    assert!(
        after > before,
        "uptime {after} after the drain, {before} before"
    );
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        !text.contains("METALD-GUEST-READY"),
        "the guest booted again: {text}"
    );
    // The one that could not be saved stays off; the host is normal.
    let i = info(&mut c, "dr2").await;
    assert_eq!(state(&i), pb::VmState::Shutdown);
    assert_eq!(i.desired_state, pb::VmState::Shutdown as i32);
    assert_eq!(
        host_status(&mut c).await.mode.unwrap().mode,
        host_mode("normal")
    );
    assert_eq!(d.vmm_pids().len(), 1);

    // Drain and undrain without a restart.
    let r = c
        .drain_host(pb::DrainHostRequest {
            deadline_seconds: 120,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.saved, vec!["dr1".to_string()]);
    let mark = d.log_mark();
    c.undrain_host(pb::UndrainHostRequest {}).await.unwrap();
    d.wait_event(mark, "dr1", "saved vm restored", BOOT).await;
    assert_eq!(state(&info(&mut c, "dr1").await), pb::VmState::Running);
    assert!(
        !d.state_dir.join("saved/dr1").exists(),
        "the saved state is removed once restored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_cannot_converge_is_requeued_with_backoff_not_retried_every_pass() {
    let assets = Assets::new();
    let mut d = Daemon::start_with_toml_args(
        "[recovery]\nenabled = true\nretry_interval = 100\nbackoff_factor = 2.0\njitter = 0.0\n[reconcile]\ninterval = 100\n",
        assets.args(),
    )
    .await;
    let mut c = d.client().await;
    c.create_vm(assets.request("nc")).await.unwrap();
    c.boot_vm(pb::BootVmRequest {
        vm_id: "nc".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // metald dies between a reboot's steps, and the kernel goes while it is down: every
    // convergence at restart fails.
    d.stop_with(libc::SIGKILL);
    let pid = d.vmm_pids();
    for p in &pid {
        signal(*p, libc::SIGKILL);
        assert!(wait_dead(*p, Duration::from_secs(5)).await);
    }
    crash_between_steps(&d, "nc");
    assets.break_kernel();
    let mark = d.log_mark();
    d.spawn().await;
    let deadline = Instant::now() + EVENT;
    let fails = loop {
        let fails = events(&d, mark, "converging failed");
        if fails.len() >= 4 {
            break fails;
        }
        assert!(Instant::now() < deadline, "{} failures", fails.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Passes run every 100 ms; the tries come 100, 200, 400 ms apart, then 800.
    let waits: Vec<u64> = fails
        .iter()
        .map(|f| f["retry_in_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(&waits[..4], &[100, 200, 400, 800], "{waits:?}");
    assert!(d.vmm_pids().is_empty(), "no VMM left from a failed try");
    // Once the kernel is back, the next try converges it.
    assets.restore_kernel();
    let deadline = Instant::now() + EVENT;
    let mut c2 = d.client().await;
    while state(&info(&mut c2, "nc").await) != pb::VmState::Running {
        assert!(Instant::now() < deadline, "nc did not converge");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(c);
}
