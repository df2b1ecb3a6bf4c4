//! Knowing the guest, not just the VMM: guest panics, a guest agent that falls silent, a guest
//! that never comes up, readiness, and the guest operations done through the agent. Real QEMU
//! guests running the real qemu-ga from Debian (or, with METALD_TEST_VMM=firecracker, the
//! labelled stand-in, which speaks Firecracker's hybrid vsock handshake and the same agent
//! protocol). The faults are the guest's own: the test image's /init panics its kernel
//! (`metald.panic_after=N`, sysrq c) or freezes its agent (`metald.agent_stop_after=N`, SIGSTOP)
//! when its kernel command line asks it to.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use metald_api::v1 as pb;

const EVENT: Duration = Duration::from_secs(30);

/// These tests watch detection alone: an orphan stays an orphan.
const DETECT_ONLY: &str = "[recovery]\nenabled = false\n";

/// A request for the test guest, probed through its agent, with extra kernel arguments.
fn probed(
    id: &str,
    probe: pb::GuestProbe,
    extra_args: &str,
    startup_ms: u32,
) -> pb::CreateVmRequest {
    let mut r = guest_request(id);
    let cfg = r.config.as_mut().unwrap();
    let boot = cfg.boot.as_mut().unwrap();
    // panic=0: a panicked kernel hangs, as on a default kernel, rather than rebooting.
    boot.kernel_args = format!("quiet panic=0 {extra_args}");
    cfg.guest_health = Some(pb::GuestHealthConfig {
        probe: probe as i32,
        startup_timeout_ms: startup_ms,
        interval_ms: 500,
        timeout_ms: 500,
        failure_threshold: 3,
    });
    r
}

/// Creates and boots a probed test guest; returns the log mark from before its boot.
async fn start_probed(
    d: &Daemon,
    c: &mut Client,
    id: &str,
    probe: pb::GuestProbe,
    extra_args: &str,
    startup_ms: u32,
) -> usize {
    c.create_vm(probed(id, probe, extra_args, startup_ms))
        .await
        .unwrap();
    let mark = d.log_mark();
    c.boot_vm(pb::BootVmRequest {
        vm_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    mark
}

async fn events_of(c: &mut Client, vm: &str) -> Vec<pb::VmEvent> {
    c.get_vm_events(pb::GetVmEventsRequest {
        vm_id: vm.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .events
}

/// Waits for the `guest ready` line of a VM's recovered guest.
async fn ready_after_recovery(d: &Daemon, mark: usize, vm: &str) {
    let vm_field = format!("\"vm_id\":\"{vm}\"");
    let line = d
        .wait_log_since(mark, EVENT, |l| {
            l.contains(&vm_field)
                && l.contains("\"message\":\"guest ready\"")
                && l.contains("\"trigger\":\"recovery\"")
        })
        .await;
    assert!(
        line.is_some(),
        "the recovered guest of {vm} never became ready"
    );
}

async fn wait_ready(c: &mut Client, vm: &str, secs: i32) -> pb::WaitGuestReadyResponse {
    c.wait_guest_ready(pb::WaitGuestReadyRequest {
        vm_id: vm.into(),
        timeout_seconds: secs,
    })
    .await
    .unwrap_or_else(|e| panic!("guest of {vm} not ready: {e}"))
    .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_becomes_ready_and_the_agent_answers_for_it() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let mark = start_probed(&d, &mut c, "ready", pb::GuestProbe::Agent, "", 0).await;
    // BootVm answers as soon as the VMM runs; the guest is not ready yet.
    let i = info(&mut c, "ready").await;
    assert_eq!(state(&i), pb::VmState::Running);
    assert!(
        !i.guest.as_ref().unwrap().ready,
        "ready before the guest could answer"
    );
    let r = wait_ready(&mut c, "ready", 60).await;
    assert!(r.guest_ready_at.is_some());
    let ev = d.wait_event(mark, "ready", "guest ready", EVENT).await;
    assert_eq!(ev["trigger"], "boot");
    let i = info(&mut c, "ready").await;
    assert!(i.guest.as_ref().unwrap().ready);
    assert_eq!(i.guest.as_ref().unwrap().ready_at, r.guest_ready_at);
    let g = i.guest.unwrap();
    assert_eq!(g.probe, pb::GuestProbe::Agent as i32);
    assert!(g.ready);
    // ListVms says so too.
    let l = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        l.vms
            .iter()
            .any(|v| v.vm_id == "ready" && v.guest.as_ref().unwrap().ready)
    );
    assert!(
        events_of(&mut c, "ready")
            .await
            .iter()
            .any(|e| e.kind == kind("guest_ready") && e.reason == "boot")
    );

    // The agent answers for its guest.
    let gi = c
        .get_guest_info(pb::GetGuestInfoRequest {
            vm_id: "ready".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(gi.os_name.contains("metald test guest"), "{gi:?}");
    assert!(!gi.agent_version.is_empty(), "{gi:?}");
    assert!(gi.guest_time.is_some(), "{gi:?}");
    assert!(gi.clock_skew_seconds.abs() < 60.0, "{gi:?}");

    // The readiness metric has the boot.
    let metrics = d.metrics_text().await;
    assert!(
        metrics.contains("metald_guest_ready_seconds_count{trigger=\"boot\"} 1"),
        "{metrics}"
    );

    // A graceful shutdown goes through the agent first.
    let mark = d.log_mark();
    c.shutdown_vm(pb::ShutdownVmRequest {
        vm_id: "ready".into(),
        force: false,
        timeout_seconds: 30,
        ..Default::default()
    })
    .await
    .unwrap();
    let ev = d.wait_event(mark, "ready", "vmm stopped", EVENT).await;
    assert_eq!(ev["how"], "guest powered off through its agent", "{ev}");
    let i = info(&mut c, "ready").await;
    assert_eq!(state(&i), pb::VmState::Shutdown);
    assert!(!i.guest.as_ref().unwrap().ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_panic_is_detected_and_the_vm_comes_back_with_a_ready_guest() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    // The guest panics 3 s after it is up (and again after each boot).
    let mark = start_probed(
        &d,
        &mut c,
        "pan",
        pb::GuestProbe::Agent,
        "metald.panic_after=3",
        0,
    )
    .await;
    let first = d.wait_event(mark, "pan", "guest ready", EVENT).await;
    assert_eq!(first["trigger"], "boot");
    let p = d.wait_event(mark, "pan", "guest panicked", EVENT).await;
    // QEMU has a panic device: the panic is known from its event, not from a timeout.
    if !on_firecracker() {
        assert_eq!(p["source"], "panic device", "{p}");
    }
    let orphan = d
        .wait_event(mark, "pan", "orphaned vm detected", EVENT)
        .await;
    assert_eq!(orphan["reason"], "guest_panicked");
    // Recovered like any orphan, back to a ready guest.
    d.wait_event(mark, "pan", "vm recovered", EVENT).await;
    ready_after_recovery(&d, mark, "pan").await;
    let h = &history(&mut c, "pan").await[0];
    assert_eq!(h.trigger, "guest_panicked");
    assert_eq!(h.outcome, outcome("success"));
    let metrics = d.metrics_text().await;
    assert!(
        metrics.contains("metald_vm_orphaned_total{reason=\"guest_panicked\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("metald_guest_ready_seconds_count{trigger=\"recovery\"}"),
        "{metrics}"
    );
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "pan".into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_without_a_panic_device_is_seen_on_the_console() {
    if on_firecracker() {
        // Firecracker has no panic device: the console is always how it is seen there, which
        // the panic test above already covers.
        return;
    }
    let d = Daemon::start_with_toml("[recovery]\nenabled = false\n[qemu]\npanic_device = false\n")
        .await;
    let mut c = d.client().await;
    let mark = start_probed(
        &d,
        &mut c,
        "con",
        pb::GuestProbe::None,
        "metald.panic_after=1",
        0,
    )
    .await;
    let p = d.wait_event(mark, "con", "guest panicked", EVENT).await;
    assert_eq!(p["source"], "console", "{p}");
    let orphan = d
        .wait_event(mark, "con", "orphaned vm detected", EVENT)
        .await;
    assert_eq!(orphan["reason"], "guest_panicked");
    let i = info(&mut c, "con").await;
    assert_eq!(state(&i), pb::VmState::Orphaned);
    assert_eq!(i.orphan_reason, reason("guest_panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_agent_orphans_a_probed_guest_and_leaves_an_unprobed_one_alone() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    // Both guests freeze their agent 2 s after they are up; only one is judged by it.
    for (id, probe) in [
        ("frz", pb::GuestProbe::Agent),
        ("free", pb::GuestProbe::None),
    ] {
        c.create_vm(probed(id, probe, "metald.agent_stop_after=2", 0))
            .await
            .unwrap();
    }
    let mark = d.log_mark();
    for id in ["free", "frz"] {
        c.boot_vm(pb::BootVmRequest {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    d.wait_event(mark, "frz", "guest ready", EVENT).await;
    let free_console = std::path::PathBuf::from(
        info(&mut c, "free")
            .await
            .vmm
            .as_ref()
            .unwrap()
            .console_log
            .clone(),
    );
    let frz_pid = pid_of(&info(&mut c, "frz").await).unwrap();
    let un = d.wait_event(mark, "frz", "guest unresponsive", EVENT).await;
    assert!(un["consecutive_failures"].as_u64().unwrap() >= 3, "{un}");
    let orphan = d
        .wait_event(mark, "frz", "orphaned vm detected", EVENT)
        .await;
    assert_eq!(orphan["reason"], "guest_unresponsive");
    assert_eq!(orphan["pid"], frz_pid);
    // Recovered to a fresh guest whose agent answers again.
    d.wait_event(mark, "frz", "vm recovered", EVENT).await;
    ready_after_recovery(&d, mark, "frz").await;
    let i = info(&mut c, "frz").await;
    assert_ne!(pid_of(&i), Some(frz_pid));

    // The unprobed guest's agent was silent just as long, and nothing happened to it.
    assert!(
        wait_console(&free_console, "METALD-GUEST-AGENT-STOPPED", 1, EVENT).await,
        "the unprobed guest's agent was not frozen"
    );
    assert!(!d.logged(mark, "free", "orphaned vm detected"));
    assert!(!d.logged(mark, "free", "guest unresponsive"));
    let i = info(&mut c, "free").await;
    assert_eq!(state(&i), pb::VmState::Running);
    assert!(!i.guest.as_ref().unwrap().ready);
    assert_eq!(i.guest.unwrap().probe, pb::GuestProbe::None as i32);
    // Its readiness is not known, and WaitGuestReady says why instead of waiting.
    let e = c
        .wait_guest_ready(pb::WaitGuestReadyRequest {
            vm_id: "free".into(),
            timeout_seconds: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("not probed"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_that_never_answers_is_orphaned_after_its_startup_timeout() {
    let d = Daemon::start_with_toml(DETECT_ONLY).await;
    let mut c = d.client().await;
    let mark = start_probed(
        &d,
        &mut c,
        "mute",
        pb::GuestProbe::Agent,
        "metald.noagent",
        4000,
    )
    .await;
    // A caller waiting for readiness is told when the guest is given up on.
    let wait = c
        .wait_guest_ready(pb::WaitGuestReadyRequest {
            vm_id: "mute".into(),
            timeout_seconds: 30,
        })
        .await
        .unwrap_err();
    assert_eq!(wait.code(), tonic::Code::FailedPrecondition, "{wait}");
    let un = d
        .wait_event(mark, "mute", "guest unresponsive", EVENT)
        .await;
    assert_eq!(un["startup_timeout_ms"], 4000);
    let orphan = d
        .wait_event(mark, "mute", "orphaned vm detected", EVENT)
        .await;
    assert_eq!(orphan["reason"], "guest_unresponsive");
    let i = info(&mut c, "mute").await;
    assert_eq!(state(&i), pb::VmState::Orphaned);
    assert!(!i.guest.as_ref().unwrap().ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_exit_comes_from_the_vmms_shutdown_reason() {
    if on_firecracker() {
        // Firecracker sends no events; its exit status is all there is.
        return;
    }
    let d = Daemon::start_with_toml(DETECT_ONLY).await;
    let mut c = d.client().await;
    running_vm(&mut c, "why").await;
    let console = std::path::PathBuf::from(
        info(&mut c, "why")
            .await
            .vmm
            .as_ref()
            .unwrap()
            .console_log
            .clone(),
    );
    assert!(wait_console(&console, "METALD-GUEST-READY", 1, Duration::from_secs(60)).await);
    let mark = d.log_mark();
    d.power_button("why").await;
    d.wait_event(mark, "why", "vm powered off by guest", EVENT)
        .await;
    let i = info(&mut c, "why").await;
    assert!(
        i.last_exit.contains("vmm reported: guest-shutdown"),
        "{:?}",
        i.last_exit
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_guest_health_settings_name_the_field() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let mut r = probed("bad", pb::GuestProbe::Agent, "", 0);
    r.config
        .as_mut()
        .unwrap()
        .guest_health
        .as_mut()
        .unwrap()
        .timeout_ms = 5000;
    let e = c.create_vm(r).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().starts_with("config.guest_health.timeout_ms"),
        "{e}"
    );
    let mut r = probed("bad", pb::GuestProbe::Agent, "", 0);
    r.config
        .as_mut()
        .unwrap()
        .guest_health
        .as_mut()
        .unwrap()
        .probe = 9;
    let e = c.create_vm(r).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("config.guest_health.probe"), "{e}");
    // Nothing was left behind.
    let e = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "bad".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_restarts_the_vmm_instead_of_leaving_the_vm_off() {
    if on_firecracker() {
        // The stand-in has no reset; Firecracker's exit on a guest reboot is its exit code 0.
        return;
    }
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let pid = running_vm(&mut c, "rst").await;
    let console = std::path::PathBuf::from(
        info(&mut c, "rst")
            .await
            .vmm
            .as_ref()
            .unwrap()
            .console_log
            .clone(),
    );
    assert!(wait_console(&console, "METALD-GUEST-READY", 1, Duration::from_secs(60)).await);
    let mark = d.log_mark();
    // A reset through QEMU's operator monitor: with -no-reboot, QEMU exits on it.
    metald::driver::qmp::execute(
        &d.ops_socket("rst"),
        "system_reset",
        None,
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    d.wait_event(mark, "rst", "vm rebooted; restarting the vmm", EVENT)
        .await;
    d.wait_event(mark, "rst", "vm recovered", EVENT).await;
    let i = info(&mut c, "rst").await;
    assert_eq!(state(&i), pb::VmState::Running);
    assert_eq!(i.desired_state, pb::VmState::Running as i32);
    assert_ne!(pid_of(&i), Some(pid));
    assert!(!d.logged(mark, "rst", "orphaned vm detected"));
    assert!(
        i.last_exit.contains("host-qmp-system-reset"),
        "{:?}",
        i.last_exit
    );
    assert_eq!(history(&mut c, "rst").await[0].trigger, "guest_reboot");
}
