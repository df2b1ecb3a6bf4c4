//! Recovery: an orphaned VM comes back by itself, quickly and exactly once, through the same
//! reconcile that created it; failing recoveries back off and end in FAILED; a delete always
//! wins; the breaker and the concurrency limit protect the host. Real QEMU guests throughout.
//! Recoveries are made to fail by taking the VM's kernel file away, a fault the real system has.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use metald_api::v1 as pb;

const EVENT: Duration = Duration::from_secs(20);
const BOOT: Duration = Duration::from_secs(60);

/// Fast backoff so a test sees the whole schedule in about a second.
const FAST: &str = "[recovery]
retry_interval = 300
backoff_factor = 2.0
max_retry_interval = 2000
max_retries = 3
max_concurrent = 2
[recovery.breaker]
min_attempts = 100
[reconcile]
interval = 300
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_vmm_comes_back_running_with_a_new_pid_and_a_booted_guest() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let pid = running_vm(&mut c, "phoenix").await;
    let console = std::path::PathBuf::from(
        info(&mut c, "phoenix")
            .await
            .vmm
            .as_ref()
            .unwrap()
            .console_log
            .clone(),
    );
    assert!(wait_console(&console, "METALD-GUEST-READY", 1, BOOT).await);
    let mark = d.log_mark();
    signal(pid, libc::SIGKILL);
    let ev = d.wait_event(mark, "phoenix", "vm recovered", EVENT).await;
    assert_eq!(ev["attempt"], 1);
    assert_eq!(ev["reason"], "process_dead");
    // Exactly one recovery ran.
    assert_eq!(events(&d, mark, "vm recovery started").len(), 1);
    let i = info(&mut c, "phoenix").await;
    assert_eq!(state(&i), pb::VmState::Running);
    let new_pid = pid_of(&i).unwrap();
    assert_ne!(new_pid, pid);
    assert!(pid_alive(new_pid));
    assert_eq!(i.health.as_ref().unwrap().recovery_count, 1);
    let h = &history(&mut c, "phoenix").await[0];
    assert_eq!(
        (h.outcome, h.trigger.as_str(), h.attempt),
        (outcome("success"), "process_dead", 1)
    );
    assert!(h.duration_seconds > 0.0);
    // The new VMM truncated the console log; the guest boots to /init again.
    assert!(wait_console(&console, "METALD-GUEST-READY", 1, BOOT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_vm_comes_back_paused() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let pid = running_vm(&mut c, "sleeper").await;
    c.pause_vm(pb::PauseVmRequest {
        vm_id: "sleeper".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mark = d.log_mark();
    signal(pid, libc::SIGKILL);
    d.wait_event(mark, "sleeper", "vm recovered", EVENT).await;
    let i = info(&mut c, "sleeper").await;
    assert_eq!(state(&i), pb::VmState::Paused);
    assert_ne!(pid_of(&i), Some(pid));
    // The new VMM really is paused.
    assert_eq!(d.vmm_state("sleeper").await, "paused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_recovery_backs_off_then_fails_and_recover_vm_brings_it_back() {
    let assets = Assets::new();
    let d = Daemon::start_with_toml_args(FAST, assets.args()).await;
    let mut c = d.client().await;
    c.create_vm(assets.request("doomed")).await.unwrap();
    c.boot_vm(pb::BootVmRequest {
        vm_id: "doomed".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let pid = pid_of(&info(&mut c, "doomed").await).unwrap();
    assets.break_kernel();
    let mark = d.log_mark();
    signal(pid, libc::SIGKILL);
    let failed = d
        .wait_event(mark, "doomed", "vm recovery failed completely", EVENT)
        .await;
    assert_eq!(failed["attempts"], 3);
    let i = info(&mut c, "doomed").await;
    assert_eq!(state(&i), pb::VmState::Failed);
    assert_eq!(i.desired_state, pb::VmState::Running as i32);
    let hist = &history(&mut c, "doomed").await;
    assert_eq!(hist.len(), 3);
    assert!(
        hist.iter()
            .all(|a| a.outcome == outcome("failure") && a.trigger == "process_dead")
    );
    assert!(
        hist[0].error.contains("exited during start-up")
            || hist[0].error.contains("kernel file cannot be opened"),
        "{}",
        hist[0].error
    );
    // The schedule: attempt 1 at once, 2 after 300 ms, 3 after 600 ms (±10 % jitter).
    let at = |a: &pb::RecoveryAttempt| {
        let t = a.started_at.as_ref().unwrap();
        t.seconds as f64 + f64::from(t.nanos) / 1e9
    };
    let end = |a: &pb::RecoveryAttempt| at(a) + a.duration_seconds;
    let (a1, a2, a3) = (&hist[2], &hist[1], &hist[0]);
    assert_eq!((a1.attempt, a2.attempt, a3.attempt), (1, 2, 3));
    let gap1 = at(a2) - end(a1);
    let gap2 = at(a3) - end(a2);
    assert!((0.25..1.0).contains(&gap1), "gap before attempt 2: {gap1}");
    assert!((0.5..1.5).contains(&gap2), "gap before attempt 3: {gap2}");
    assert!(gap2 > gap1, "backoff grows");
    // FAILED stays FAILED: a reconcile pass does not touch it.
    let r = c
        .reconcile(pb::ReconcileRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.recoveries_scheduled, 0);
    assert_eq!(state(&info(&mut c, "doomed").await), pb::VmState::Failed);

    // The operator fixes the image and recovers by hand.
    assets.restore_kernel();
    let r = c
        .recover_vm(pb::RecoverVmRequest {
            vm_id: "doomed".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::VmState::Running as i32);
    let i = info(&mut c, "doomed").await;
    assert_eq!(state(&i), pb::VmState::Running);
    let h = history(&mut c, "doomed").await;
    assert_eq!(h[0].trigger, "manual");
    assert_eq!(h[0].outcome, outcome("success"));
    let e = c
        .recover_vm(pb::RecoverVmRequest {
            vm_id: "doomed".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::FailedPrecondition,
        "nothing to recover on a running vm"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_deleted_during_its_recovery_stays_deleted() {
    let assets = Assets::new();
    let d = Daemon::start_with_toml_args(FAST, assets.args()).await;
    let mut c = d.client().await;
    c.create_vm(assets.request("gone")).await.unwrap();
    c.boot_vm(pb::BootVmRequest {
        vm_id: "gone".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let pid = pid_of(&info(&mut c, "gone").await).unwrap();
    // A running VM whose recovery races the delete.
    let pid2 = running_vm(&mut c, "racy").await;

    assets.break_kernel();
    let mark = d.log_mark();
    signal(pid, libc::SIGKILL);
    d.wait_event(mark, "gone", "vm recovery attempt failed", EVENT)
        .await;
    // Mid-backoff: delete it, then make its recovery possible again.
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "gone".into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    assets.restore_kernel();
    signal(pid2, libc::SIGKILL);
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "racy".into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();

    // Two full reconcile passes later (each would resurrect anything that could come back),
    // nothing is there.
    let after = d.log_mark();
    for _ in 0..2 {
        d.wait_log_since(d.log_mark(), EVENT, |l| l.contains("\"reconcile pass\""))
            .await
            .unwrap();
    }
    let list = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.total_count, 0);
    assert!(d.vmm_pids().is_empty(), "no VMM may run for a deleted VM");
    assert!(!d.run_dir("gone").exists() && !d.run_dir("racy").exists());
    assert!(!d.logged(after, "gone", "vm recovery started"));
    assert!(!d.logged(after, "racy", "vm recovery started"));
    for id in ["gone", "racy"] {
        let e = c
            .get_vm_info(pb::GetVmInfoRequest { vm_id: id.into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_when_recoveries_keep_failing_and_closes_after_a_good_probe() {
    let assets = Assets::new();
    let cfg = "[recovery]
retry_interval = 200
backoff_factor = 1.5
max_retry_interval = 400
max_retries = 50
max_concurrent = 4
[recovery.breaker]
min_attempts = 4
failure_rate = 0.5
cool_off = 1500
";
    let d = Daemon::start_with_toml_args(cfg, assets.args()).await;
    let mut c = d.client().await;
    let ids = ["br-0", "br-1", "br-2"];
    let mut pids = Vec::new();
    for id in ids {
        c.create_vm(assets.request(id)).await.unwrap();
        c.boot_vm(pb::BootVmRequest {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        pids.push(pid_of(&info(&mut c, id).await).unwrap());
    }
    assets.break_kernel();
    let mark = d.log_mark();
    for p in &pids {
        signal(*p, libc::SIGKILL);
    }
    let opened = d
        .wait_log_since(mark, EVENT, |l| l.contains("\"recovery breaker opened\""))
        .await
        .expect("breaker opened");
    assert!(opened.contains("\"attempts\""), "{opened}");
    let s = c
        .get_recovery_status(pb::GetRecoveryStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.breaker_state, breaker("open"));
    assert!(s.breaker_opened_at.is_some());
    assert!(s.window_failures >= 3);
    // While open, no recovery starts.
    let opened_mark = d.log_mark();
    assets.restore_kernel();
    d.wait_log_since(opened_mark, EVENT, |l| {
        l.contains("\"recovery breaker closed\"")
    })
    .await
    .expect("breaker closed after a successful probe");
    for id in ids {
        d.wait_event(mark, id, "vm recovered", EVENT).await;
        assert_eq!(state(&info(&mut c, id).await), pb::VmState::Running);
    }
    let s = c
        .get_recovery_status(pb::GetRecoveryStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.breaker_state, breaker("closed"));
    // The first recovery after the breaker opened was the single probe.
    let starts = events(&d, opened_mark, "vm recovery started");
    let closed_at = events(&d, opened_mark, "recovery breaker closed")[0]["timestamp"]
        .as_str()
        .unwrap()
        .to_string();
    let before_close = starts
        .iter()
        .filter(|e| e["timestamp"].as_str().unwrap() < closed_at.as_str())
        .count();
    assert_eq!(
        before_close, 1,
        "only the probe runs while the breaker is half-open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_vmm_killed_at_once_recovers_in_a_bounded_wave() {
    let d = Daemon::start_with_toml("[recovery]\nmax_concurrent = 2\n").await;
    let mut c = d.client().await;
    let ids: Vec<String> = (0..6).map(|i| format!("wave-{i}")).collect();
    let mut pids = Vec::new();
    for id in &ids {
        pids.push(running_vm(&mut c, id).await);
    }
    let mark = d.log_mark();
    for p in &pids {
        signal(*p, libc::SIGKILL);
    }
    for id in &ids {
        d.wait_event(mark, id, "vm recovered", Duration::from_secs(60))
            .await;
    }
    for id in &ids {
        assert_eq!(state(&info(&mut c, id).await), pb::VmState::Running);
    }
    // From the log: recoveries overlapping in time never exceeded the limit.
    let mut edges: Vec<(String, i32)> = Vec::new();
    for e in events(&d, mark, "vm recovery started") {
        edges.push((e["timestamp"].as_str().unwrap().to_string(), 1));
        assert!(e["in_flight"].as_u64().unwrap() <= 2, "{e}");
    }
    for e in events(&d, mark, "vm recovered") {
        edges.push((e["timestamp"].as_str().unwrap().to_string(), -1));
    }
    assert_eq!(edges.len(), 12, "exactly one recovery per VM");
    edges.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut peak) = (0, 0);
    for (_, delta) in edges {
        now += delta;
        peak = peak.max(now);
    }
    assert!(peak <= 2, "peak concurrent recoveries {peak}");
    assert!(peak >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policy_and_auto_recover_are_obeyed() {
    let d = Daemon::start().await;
    let mut c = d.client().await;

    // always: a guest power-off is restarted.
    let mut req = guest_request("always");
    req.config.as_mut().unwrap().restart_policy = pb::RestartPolicy::Always as i32;
    c.create_vm(req).await.unwrap();
    c.boot_vm(pb::BootVmRequest {
        vm_id: "always".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let console = d.run_dir("always").join("console.log");
    assert!(wait_console(&console, "METALD-GUEST-READY", 1, BOOT).await);
    let mark = d.log_mark();
    d.power_button("always").await;
    let ev = d.wait_event(mark, "always", "vm recovered", EVENT).await;
    assert_eq!(ev["reason"], "guest_poweroff");
    assert_eq!(state(&info(&mut c, "always").await), pb::VmState::Running);
    assert!(
        !d.logged(mark, "always", "orphaned vm detected"),
        "a power-off is not an orphan"
    );

    // never: a crash leaves the VM orphaned.
    let mut req = guest_request("never");
    req.config.as_mut().unwrap().restart_policy = pb::RestartPolicy::Never as i32;
    c.create_vm(req).await.unwrap();
    c.boot_vm(pb::BootVmRequest {
        vm_id: "never".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let pid = pid_of(&info(&mut c, "never").await).unwrap();
    let mark = d.log_mark();
    signal(pid, libc::SIGKILL);
    d.wait_event(
        mark,
        "never",
        "restart policy is never; vm left as is",
        EVENT,
    )
    .await;
    assert_eq!(state(&info(&mut c, "never").await), pb::VmState::Orphaned);

    // auto_recover off: orphaned and left; turned on again: recovered.
    let pid = running_vm(&mut c, "manual").await;
    let r = c
        .set_auto_recover(pb::SetAutoRecoverRequest {
            vm_id: "manual".into(),
            enabled: false,
        })
        .await
        .unwrap();
    assert!(!r.into_inner().auto_recover);
    let mark = d.log_mark();
    signal(pid, libc::SIGKILL);
    d.wait_event(
        mark,
        "manual",
        "automatic recovery is off; vm left as is",
        EVENT,
    )
    .await;
    assert_eq!(state(&info(&mut c, "manual").await), pb::VmState::Orphaned);
    c.set_auto_recover(pb::SetAutoRecoverRequest {
        vm_id: "manual".into(),
        enabled: true,
    })
    .await
    .unwrap();
    d.wait_event(mark, "manual", "vm recovered", EVENT).await;
    let i = info(&mut c, "manual").await;
    assert_eq!(state(&i), pb::VmState::Running);
    assert_eq!(i.config.unwrap().auto_recover, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_found_at_restart_are_recovered_once() {
    let mut d = Daemon::start().await;
    let mut c = d.client().await;
    let pid = running_vm(&mut c, "lost").await;
    d.stop_with(libc::SIGKILL);
    signal(pid, libc::SIGKILL);
    assert!(wait_dead(pid, Duration::from_secs(5)).await);
    let mark = d.log_mark();
    d.spawn().await;
    let orphan = d
        .wait_event(mark, "lost", "orphaned vm detected", EVENT)
        .await;
    assert_eq!(orphan["reason"], "process_dead");
    d.wait_event(mark, "lost", "vm recovered", EVENT).await;
    // The VM's controller recorded the orphan and scheduled its recovery, as for an exit seen
    // live; the start-up pass found it already in hand and scheduled no second one.
    assert_eq!(events(&d, mark, "vm recovery started").len(), 1);
    let pass = d
        .wait_log_since(mark, EVENT, |l| l.contains("\"reconcile pass\""))
        .await
        .unwrap();
    assert!(pass.contains("\"recoveries_scheduled\":0"), "{pass}");
    let mut c = d.client().await;
    assert_eq!(state(&info(&mut c, "lost").await), pb::VmState::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_is_slowed_down_but_never_failed() {
    let cfg = "[recovery]
retry_interval = 300
max_retries = 2
stable_period = 600000
crash_loop_threshold = 1
";
    let d = Daemon::start_with_toml(cfg).await;
    let mut c = d.client().await;
    running_vm(&mut c, "looper").await;
    let mark = d.log_mark();
    // Three crashes in quick succession, more than max_retries: every recovery succeeds, so
    // the VM is never FAILED, but the later restarts are slowed down.
    for n in 1..=3 {
        let pid = pid_of(&info(&mut c, "looper").await).unwrap();
        let m = d.log_mark();
        signal(pid, libc::SIGKILL);
        let ev = d.wait_event(m, "looper", "vm recovered", EVENT).await;
        assert_eq!(
            ev["attempt"], 1,
            "crash {n}: each crash starts a fresh attempt count"
        );
    }
    let slowed = events(&d, mark, "vm crash-looping; restarts slowed down");
    assert_eq!(
        slowed.len(),
        2,
        "crashes 2 and 3 are past the threshold of 1"
    );
    assert!(slowed[1]["delay_ms"].as_u64().unwrap() > slowed[0]["delay_ms"].as_u64().unwrap());
    let i = info(&mut c, "looper").await;
    assert_eq!(state(&i), pb::VmState::Running);
    assert_eq!(i.recovery_streak, 0);
    assert!(!d.logged(mark, "looper", "vm recovery failed completely"));
}
