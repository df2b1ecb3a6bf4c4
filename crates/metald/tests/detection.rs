//! Knowing each VM's true state: pidfd exit events, health checks against hung VMMs and lost
//! sockets, re-attachment rules after a restart, and the sweep for strays and stale files. Real
//! QEMU guests throughout; where a fault cannot be produced for real on demand (a reused pid, a
//! registry row lost while its VMM runs) the test fakes it in the real registry and says so.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use metald_api::v1 as pb;

const EVENT: Duration = Duration::from_secs(10);

/// These tests watch detection alone, so automatic recovery is off: an orphan stays an orphan.
const DETECT_ONLY: &str = "[recovery]\nenabled = false\n";

/// Fast reconcile passes for the stray and stale-file tests; health at its defaults.
const FAST_SWEEP: &str =
    "[recovery]\nenabled = false\n[reconcile]\ninterval = 300\nstray_grace = 1000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_orphans_with_process_dead_and_exit_status() {
    let d = Daemon::start_with_toml(DETECT_ONLY).await;
    let mut c = d.client().await;
    let pid = running_vm(&mut c, "k9").await;
    let mark = d.log_mark();
    signal(pid, libc::SIGKILL);
    let ev = d
        .wait_event(mark, "k9", "orphaned vm detected", EVENT)
        .await;
    assert_eq!(ev["reason"], "process_dead");
    assert_eq!(ev["pid"], pid);
    assert!(ev["last_seen"].as_str().unwrap().ends_with('Z'), "{ev}");
    assert!(ev["downtime"].as_f64().unwrap() >= 0.0, "{ev}");
    assert!(ev["exit"].as_str().unwrap().contains("signal 9"), "{ev}");
    let i = info(&mut c, "k9").await;
    assert_eq!(state(&i), pb::VmState::Orphaned);
    assert_eq!(i.desired_state, pb::VmState::Running as i32);
    assert_eq!(i.orphan_reason, reason("process_dead"));
    assert!(i.vmm.is_none());
    assert!(!i.health.unwrap().is_healthy);
    // An orphaned VM can be booted again by hand.
    c.boot_vm(pb::BootVmRequest {
        vm_id: "k9".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let i = info(&mut c, "k9").await;
    assert_eq!(state(&i), pb::VmState::Running);
    assert_eq!(i.orphan_reason, 0);
    assert_eq!(i.health.unwrap().recovery_count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_poweroff_external_sigterm_and_kill_are_told_apart() {
    let d = Daemon::start_with_toml(DETECT_ONLY).await;
    let mut c = d.client().await;

    // The guest powers itself off (its power button, pressed over QMP behind metald's back):
    // not an orphan, the VM is simply off.
    running_vm(&mut c, "off").await;
    let console = std::path::PathBuf::from(
        info(&mut c, "off")
            .await
            .vmm
            .as_ref()
            .unwrap()
            .console_log
            .clone(),
    );
    assert!(wait_console(&console, "METALD-GUEST-READY", 1, Duration::from_secs(60)).await);
    let mark = d.log_mark();
    d.power_button("off").await;
    d.wait_event(mark, "off", "vm powered off by guest", EVENT)
        .await;
    let i = info(&mut c, "off").await;
    assert_eq!(state(&i), pb::VmState::Shutdown);
    assert_eq!(i.desired_state, pb::VmState::Shutdown as i32);
    assert!(
        i.last_exit.contains("guest powered off"),
        "{:?}",
        i.last_exit
    );
    assert!(!d.logged(mark, "off", "orphaned vm detected"));

    // SIGTERM from someone else: QEMU exits 0 too, but it is an external kill.
    let pid = running_vm(&mut c, "term").await;
    let mark = d.log_mark();
    signal(pid, libc::SIGTERM);
    let ev = d
        .wait_event(mark, "term", "orphaned vm detected", EVENT)
        .await;
    assert_eq!(ev["reason"], "process_dead");
    assert!(
        ev["exit"].as_str().unwrap().contains("cause: signal 15"),
        "{ev}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_makes_unhealthy_then_orphaned_api_unresponsive() {
    let d = Daemon::start_with_toml(DETECT_ONLY).await;
    let mut c = d.client().await;
    let pid = running_vm(&mut c, "hung").await;
    let mark = d.log_mark();
    signal(pid, libc::SIGSTOP);
    let fail = d
        .wait_event(mark, "hung", "vm health check failed", EVENT)
        .await;
    assert_eq!(fail["reason"], "api_unresponsive");
    d.wait_event(mark, "hung", "vm unhealthy", EVENT).await;
    let h = c
        .get_vm_health(pb::GetVmHealthRequest {
            vm_id: "hung".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let hs = h.health.unwrap();
    assert!(!hs.is_healthy);
    assert!(hs.consecutive_failures >= 2);
    assert!(!hs.last_error.is_empty());
    let ev = d
        .wait_event(mark, "hung", "orphaned vm detected", EVENT)
        .await;
    assert_eq!(ev["reason"], "api_unresponsive");
    // The hung VMM was killed, not left to linger.
    assert!(wait_dead(pid, Duration::from_secs(5)).await);
    let i = info(&mut c, "hung").await;
    assert_eq!(state(&i), pb::VmState::Orphaned);
    assert_eq!(i.orphan_reason, reason("api_unresponsive"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigcont_before_the_threshold_is_no_orphan() {
    let d = Daemon::start_with_toml(DETECT_ONLY).await;
    let mut c = d.client().await;
    let pid = running_vm(&mut c, "blip").await;
    let mark = d.log_mark();
    signal(pid, libc::SIGSTOP);
    // Two failures make it unhealthy; the orphan threshold is four.
    d.wait_event(mark, "blip", "vm unhealthy", EVENT).await;
    signal(pid, libc::SIGCONT);
    d.wait_event(mark, "blip", "vm healthy again", EVENT).await;
    assert!(!d.logged(mark, "blip", "orphaned vm detected"));
    let i = info(&mut c, "blip").await;
    assert_eq!(state(&i), pb::VmState::Running);
    assert_eq!(pid_of(&i), Some(pid));
    let h = i.health.unwrap();
    assert!(h.is_healthy);
    assert_eq!(h.consecutive_failures, 0);
    assert_eq!(h.recovery_count, 1);
    assert!(h.last_activity.is_some() && h.last_check.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_control_socket_is_reported_and_the_guest_keeps_running() {
    // metald holds a connection to each VMM (QMP with its events; a kept-alive HTTP connection on
    // Firecracker). Deleting the socket file does not cut that connection, so a working guest is
    // never cold-restarted for it: the loss is reported and the VM goes on being supervised.
    // (With recovery on, the VMM is then replaced by a migration: tests/migration.rs.)
    let d = Daemon::start_with_toml(DETECT_ONLY).await;
    let mut c = d.client().await;
    let pid = running_vm(&mut c, "nosock").await;
    let mark = d.log_mark();
    std::fs::remove_file(d.control_socket("nosock")).unwrap();
    let ev = d
        .wait_event(mark, "nosock", "vmm control socket missing", EVENT)
        .await;
    assert!(
        ev["control_socket"].as_str().unwrap().ends_with(".sock"),
        "{ev}"
    );
    // Checks go on passing over the held connection, and say what is missing.
    let deadline = std::time::Instant::now() + EVENT;
    let h = loop {
        let h = c
            .get_vm_health(pb::GetVmHealthRequest {
                vm_id: "nosock".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let hs = h.health.clone().unwrap();
        if hs.last_error.contains("control socket file missing") {
            break h;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health never reported the missing socket"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        pb::VmState::try_from(h.state).unwrap(),
        pb::VmState::Running
    );
    assert!(h.health.unwrap().is_healthy);
    // The VMM is still driven through the held connection: pause and resume work.
    c.pause_vm(pb::PauseVmRequest {
        vm_id: "nosock".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.resume_vm(pb::ResumeVmRequest {
        vm_id: "nosock".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let i = info(&mut c, "nosock").await;
    assert_eq!(state(&i), pb::VmState::Running);
    assert_eq!(pid_of(&i), Some(pid), "the guest was not restarted");
    assert!(!d.logged(mark, "nosock", "orphaned vm detected"));
    let events = c
        .get_vm_events(pb::GetVmEventsRequest {
            vm_id: "nosock".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        events.iter().any(|e| e.kind == kind("control_socket_lost")),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_pid_is_never_adopted() {
    let mut d = Daemon::start_with_toml(DETECT_ONLY).await;
    let mut c = d.client().await;
    let pid_a = running_vm(&mut c, "reuse-a").await;
    let pid_b = running_vm(&mut c, "reuse-b").await;
    d.stop_with(libc::SIGKILL);
    signal(pid_a, libc::SIGKILL);
    signal(pid_b, libc::SIGKILL);
    assert!(wait_dead(pid_a, Duration::from_secs(5)).await);
    assert!(wait_dead(pid_b, Duration::from_secs(5)).await);

    // Fake pid reuse (the kernel cannot be made to hand out a given pid on demand): point both
    // rows at an unrelated live process. Row a keeps the VMM's start time (start-time mismatch);
    // row b gets the impostor's own start time too (only the command line gives it away).
    // Killed on the way out even when the test fails.
    let impostor = KillOnDrop(
        std::process::Command::new("sleep")
            .arg("300")
            .spawn()
            .unwrap(),
    );
    let ipid = impostor.0.id() as i32;
    let stat = std::fs::read_to_string(format!("/proc/{ipid}/stat")).unwrap();
    let start: i64 = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let db = d.db();
    db.execute("UPDATE vms SET pid = ?1 WHERE vm_id = 'reuse-a'", [ipid])
        .unwrap();
    db.execute(
        "UPDATE vms SET pid = ?1, start_time = ?2 WHERE vm_id = 'reuse-b'",
        [i64::from(ipid), start],
    )
    .unwrap();
    drop(db);

    let mark = d.log_mark();
    d.spawn().await;
    for vm in ["reuse-a", "reuse-b"] {
        let ev = d.wait_event(mark, vm, "orphaned vm detected", EVENT).await;
        assert_eq!(ev["reason"], "pid_reused", "{vm}");
    }
    let mut c = d.client().await;
    for vm in ["reuse-a", "reuse-b"] {
        let i = info(&mut c, vm).await;
        assert_eq!(state(&i), pb::VmState::Orphaned);
        assert_eq!(i.orphan_reason, reason("pid_reused"));
    }
    assert!(
        pid_alive(ipid),
        "metald must never signal a process that is not its VMM"
    );
    drop(impostor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_vmm_and_stale_files_are_removed() {
    let mut d = Daemon::start_with_toml(FAST_SWEEP).await;
    let mut c = d.client().await;
    let stray_pid = running_vm(&mut c, "stray").await;
    c.create_vm(guest_request("offline")).await.unwrap();
    c.shutdown_vm(pb::ShutdownVmRequest {
        vm_id: "offline".into(),
        force: true,
        timeout_seconds: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    d.stop_with(libc::SIGKILL);
    // Fake a lost row (a registry restored from an older backup, say): the VMM runs on with
    // metald's marker but no row accounts for it.
    d.db()
        .execute("DELETE FROM vms WHERE vm_id = 'stray'", [])
        .unwrap();
    // A socket left behind by a VM that has no VMM, and a run directory of a VM that is gone.
    let stale_sock = d.control_socket("offline");
    // (A killed Firecracker leaves its socket behind by itself; QEMU removes its own.)
    if !stale_sock.exists() {
        drop(std::os::unix::net::UnixListener::bind(&stale_sock).unwrap());
    }
    std::fs::create_dir_all(d.run_dir("ghost")).unwrap();
    std::fs::write(d.run_dir("ghost").join("console.log"), "old").unwrap();

    let mark = d.log_mark();
    d.spawn().await;
    d.wait_event(mark, "stray", "stray vmm found", EVENT).await;
    assert!(
        pid_alive(stray_pid),
        "a stray is left alone during its grace period"
    );
    d.wait_event(mark, "stray", "stray vmm killed", EVENT).await;
    assert!(wait_dead(stray_pid, Duration::from_secs(5)).await);
    d.wait_event(mark, "stray", "stale run directory removed", EVENT)
        .await;
    d.wait_event(mark, "ghost", "stale run directory removed", EVENT)
        .await;
    d.wait_event(mark, "offline", "stale control socket removed", EVENT)
        .await;
    assert!(!d.run_dir("stray").exists());
    assert!(!d.run_dir("ghost").exists());
    assert!(!stale_sock.exists());
    assert!(
        d.run_dir("offline").exists(),
        "a live VM's run directory stays"
    );
    let mut c = d.client().await;
    assert_eq!(state(&info(&mut c, "offline").await), pb::VmState::Shutdown);
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
