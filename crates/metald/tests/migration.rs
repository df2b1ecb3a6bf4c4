//! MigrateVm on real QEMU guests: the guest moves to a new QEMU process without stopping (its
//! uptime carries on, it never prints READY again, its pid changes), a paused guest stays
//! paused, every failure (a target that cannot start, a target killed mid-transfer, a delete
//! that arrives meanwhile) leaves the guest in its VMM with the VM unchanged, a metald killed
//! mid-migration leaves exactly one VMM at restart, and a VMM whose control socket file is
//! deleted is replaced by a migration rather than a reboot.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use metald_api::v1 as pb;

const BOOT: Duration = Duration::from_secs(60);
const EVENT: Duration = Duration::from_secs(30);
/// A transfer capped at 8 MiB/s takes seconds for the test guest (tens of MiB of RAM in use):
/// long enough to act on a migration in flight.
const SLOW: &str = "[qemu]\nmigration_max_bandwidth_mib = 8\n";

async fn migrate(
    c: &mut Client,
    vm: &str,
    binary: &str,
) -> Result<pb::MigrateVmResponse, tonic::Status> {
    c.migrate_vm(pb::MigrateVmRequest {
        vm_id: vm.into(),
        vmm_binary: binary.into(),
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

/// A running test guest that has finished booting (its first ALIVE line); its VMM pid.
async fn booted(c: &mut Client, d: &Daemon, vm: &str) -> i32 {
    let pid = running_vm(c, vm).await;
    let console = d.run_dir(vm).join("console.log");
    // Past its boot (an unprobed guest is taken to be booting for 3 s, and is not moved):
    // an uptime report beyond that.
    let deadline = Instant::now() + BOOT;
    while guest_uptime(&console).is_none_or(|u| u < 3.5) {
        assert!(Instant::now() < deadline, "the guest did not boot");
        let next = alive_lines(&console) + 1;
        assert!(wait_console(&console, "METALD-GUEST-ALIVE", next, BOOT).await);
    }
    pid
}

/// The guest carries on in whatever VMM it is in: one more ALIVE line than `alive_before`, its
/// uptime past `up_before`, and still one READY line (it never booted again).
async fn guest_carries_on(console: &Path, alive_before: usize, up_before: f64) {
    assert!(
        wait_console(console, "METALD-GUEST-ALIVE", alive_before + 1, BOOT).await,
        "the guest stopped reporting"
    );
    let text = std::fs::read_to_string(console).unwrap();
    assert_eq!(
        text.matches("METALD-GUEST-READY").count(),
        1,
        "the guest booted again:\n{text}"
    );
    let up = guest_uptime(console).unwrap();
    assert!(up > up_before, "guest uptime went from {up_before} to {up}");
}

fn alive_lines(console: &Path) -> usize {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .matches("METALD-GUEST-ALIVE")
        .count()
}

/// The migration target's pid, once its process exists (bounded).
async fn target_pid(d: &Daemon) -> i32 {
    let deadline = Instant::now() + EVENT;
    loop {
        if let Some(p) = d.vmm_pids_named("next-qmp.sock").first() {
            return *p;
        }
        assert!(Instant::now() < deadline, "no migration target started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn no_target_files(d: &Daemon, vm: &str) {
    let left: Vec<_> = std::fs::read_dir(d.run_dir(vm))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("next-"))
        .collect();
    assert!(left.is_empty(), "migration target files left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_guest_carries_on_in_a_new_vmm() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let pid = booted(&mut c, &d, "mig").await;
    let console = d.run_dir("mig").join("console.log");
    let mark = d.log_mark();
    let (alive, up) = (alive_lines(&console), guest_uptime(&console).unwrap());

    let r = migrate(&mut c, "mig", "").await.unwrap();
    assert_eq!(r.old_pid, pid);
    assert_ne!(r.new_pid, pid, "the guest runs in a new process");
    assert_eq!(r.state, pb::VmState::Running as i32);
    assert!(!r.shared_memory);
    assert!(r.bytes > 1 << 20, "guest RAM was copied: {r:?}");
    assert!(wait_dead(pid, EVENT).await, "the old VMM is gone");
    let i = info(&mut c, "mig").await;
    assert_eq!(state(&i), pb::VmState::Running);
    assert_eq!(pid_of(&i), Some(r.new_pid));
    assert!(
        d.control_socket("mig").exists(),
        "the new VMM has the VM's control socket"
    );
    no_target_files(&d, "mig");
    d.wait_event(mark, "mig", "vm migrated to a new vmm", EVENT)
        .await;
    guest_carries_on(&console, alive, up).await;

    // The new VMM is the VM's in every way: it answers, moves again, and stops on request.
    let (alive, up) = (alive_lines(&console), guest_uptime(&console).unwrap());
    let r2 = migrate(&mut c, "mig", "").await.unwrap();
    assert_eq!(r2.old_pid, r.new_pid);
    guest_carries_on(&console, alive, up).await;
    c.pause_vm(pb::PauseVmRequest {
        vm_id: "mig".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(d.vmm_state("mig").await, "paused");
    let events = c
        .get_vm_events(pb::GetVmEventsRequest {
            vm_id: "mig".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == pb::EventKind::Migrated as i32)
            .count(),
        2,
        "{events:?}"
    );
    let metrics = d.metrics_text().await;
    assert!(
        metrics.contains("metald_vm_migrations_total{outcome=\"success\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_memory_moves_without_copying_guest_ram() {
    let d = Daemon::start_with_toml("[qemu]\nshared_memory = true\n").await;
    let mut c = d.client().await;
    let pid = booted(&mut c, &d, "shm").await;
    let console = d.run_dir("shm").join("console.log");
    let (alive, up) = (alive_lines(&console), guest_uptime(&console).unwrap());
    let r = migrate(&mut c, "shm", "").await.unwrap();
    assert!(r.shared_memory);
    assert!(r.bytes < 1 << 20, "guest RAM was not sent: {r:?}");
    assert_ne!(r.new_pid, pid);
    guest_carries_on(&console, alive, up).await;
    // The RAM file goes with the VM.
    let ram = metald::config::Config {
        state_dir: d.state_dir.clone(),
        ..Default::default()
    }
    .shared_memory_dir()
    .join("shm.ram");
    assert!(ram.exists());
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "shm".into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!ram.exists(), "the VM's shared RAM file outlived it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_guest_stays_paused() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    booted(&mut c, &d, "p").await;
    c.pause_vm(pb::PauseVmRequest {
        vm_id: "p".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let console = d.run_dir("p").join("console.log");
    let (alive, up) = (alive_lines(&console), guest_uptime(&console).unwrap());
    let r = migrate(&mut c, "p", "").await.unwrap();
    assert_eq!(r.state, pb::VmState::Paused as i32);
    assert_eq!(state(&info(&mut c, "p").await), pb::VmState::Paused);
    assert_eq!(
        d.vmm_state("p").await,
        "paused",
        "the new VMM holds the guest paused"
    );
    c.resume_vm(pb::ResumeVmRequest {
        vm_id: "p".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    guest_carries_on(&console, alive, up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_cannot_start_leaves_the_vm_unchanged() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let pid = booted(&mut c, &d, "bad").await;
    let console = d.run_dir("bad").join("console.log");
    let (alive, up) = (alive_lines(&console), guest_uptime(&console).unwrap());
    let before = info(&mut c, "bad").await;
    let e = migrate(&mut c, "bad", "/bin/false").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
    assert!(
        e.message().contains("start_target"),
        "the error names the step: {e:?}"
    );
    let after = info(&mut c, "bad").await;
    assert_eq!(pid_of(&after), Some(pid));
    assert_eq!(state(&after), pb::VmState::Running);
    assert_eq!(after.config, before.config);
    no_target_files(&d, "bad");
    guest_carries_on(&console, alive, up).await;
    // A tenant may not choose what binary runs a VMM; a missing binary is named.
    let e = migrate(&mut c, "bad", "relative/qemu").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("vmm_binary"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_killed_mid_transfer_leaves_the_guest_in_its_vmm() {
    let d = Daemon::start_with_toml(SLOW).await;
    let mut c = d.client().await;
    let pid = booted(&mut c, &d, "k").await;
    let console = d.run_dir("k").join("console.log");
    let (alive, up) = (alive_lines(&console), guest_uptime(&console).unwrap());
    let mut c2 = c.clone();
    let call = tokio::spawn(async move { migrate(&mut c2, "k", "").await });
    let target = target_pid(&d).await;
    // Well into the transfer.
    tokio::time::sleep(Duration::from_millis(800)).await;
    signal(target, libc::SIGKILL);
    let e = tokio::time::timeout(EVENT, call)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
    assert!(e.message().contains("transfer"), "{e:?}");
    let i = info(&mut c, "k").await;
    assert_eq!(pid_of(&i), Some(pid));
    assert_eq!(state(&i), pb::VmState::Running);
    assert_eq!(d.vmm_state("k").await, "running");
    no_target_files(&d, "k");
    guest_carries_on(&console, alive, up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_during_a_migration_wins() {
    let d = Daemon::start_with_toml(SLOW).await;
    let mut c = d.client().await;
    let pid = booted(&mut c, &d, "del").await;
    let mut c2 = c.clone();
    let call = tokio::spawn(async move { migrate(&mut c2, "del", "").await });
    let target = target_pid(&d).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "del".into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the delete waited for the migration"
    );
    let e = tokio::time::timeout(EVENT, call)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
    assert!(e.message().contains("cancelled"), "{e:?}");
    assert!(wait_dead(pid, EVENT).await && wait_dead(target, EVENT).await);
    assert!(d.vmm_pids().is_empty(), "VMMs left: {:?}", d.vmm_pids());
    assert!(!d.run_dir("del").exists());
    let e = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "del".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metald_killed_mid_migration_leaves_one_vmm() {
    // Once with the transfer finished while metald was down (the target has the guest), once
    // restarted at once (the source still has it). Either way: one VMM, the guest carrying on.
    for finish_first in [true, false] {
        let mut d = Daemon::start_with_toml(SLOW).await;
        let mut c = d.client().await;
        let pid = booted(&mut c, &d, "mk").await;
        let console = d.run_dir("mk").join("console.log");
        let (alive, up) = (alive_lines(&console), guest_uptime(&console).unwrap());
        let mut c2 = c.clone();
        let call = tokio::spawn(async move { migrate(&mut c2, "mk", "").await });
        let target = target_pid(&d).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        d.stop_with(libc::SIGKILL);
        let _ = tokio::time::timeout(EVENT, call).await;
        if finish_first {
            // QEMU finishes the transfer on its own; the source then holds a stale copy.
            let deadline = Instant::now() + BOOT;
            while d.vmm_state("mk").await != "postmigrate" {
                assert!(Instant::now() < deadline, "the transfer did not finish");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        d.spawn().await;
        let mut c = d.client().await;
        let i = info(&mut c, "mk").await;
        let keeper = if finish_first { target } else { pid };
        let gone = if finish_first { pid } else { target };
        assert_eq!(pid_of(&i), Some(keeper), "finish_first={finish_first}");
        assert!(
            wait_dead(gone, EVENT).await,
            "finish_first={finish_first}: two VMMs"
        );
        assert_eq!(d.vmm_pids(), vec![keeper]);
        let deadline = Instant::now() + EVENT;
        while state(&info(&mut c, "mk").await) != pb::VmState::Running {
            assert!(Instant::now() < deadline, "the VM is not running again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(d.control_socket("mk").exists());
        no_target_files(&d, "mk");
        guest_carries_on(&console, alive, up).await;
        let r = c
            .reconcile(pb::ReconcileRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.strays_found, 0, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_control_socket_is_replaced_by_a_migration_not_a_reboot() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let pid = booted(&mut c, &d, "sock").await;
    let console = d.run_dir("sock").join("console.log");
    let (alive, up) = (alive_lines(&console), guest_uptime(&console).unwrap());
    let mark = d.log_mark();
    std::fs::remove_file(d.control_socket("sock")).unwrap();
    let ev = d
        .wait_event(mark, "sock", "vm migrated to a new vmm", EVENT)
        .await;
    assert_eq!(ev["reason"], "control_socket_lost", "{ev}");
    assert!(wait_dead(pid, EVENT).await);
    let i = info(&mut c, "sock").await;
    assert_ne!(pid_of(&i), Some(pid));
    assert_eq!(state(&i), pb::VmState::Running);
    assert!(
        d.control_socket("sock").exists(),
        "the new VMM's socket is in place"
    );
    guest_carries_on(&console, alive, up).await;
    let h = history(&mut c, "sock").await;
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0].method, "migrate");
    assert_eq!(h[0].trigger, "control_socket_lost");
    assert_eq!(h[0].outcome, outcome("success"));
    let metrics = d.metrics_text().await;
    assert!(
        metrics.contains(
            "metald_vm_recovery_attempts_total{outcome=\"success\",method=\"migrate\"} 1"
        ),
        "{metrics}"
    );
}

/// metald on the labelled Firecracker stand-in (crates/fc-standin), whatever METALD_TEST_VMM
/// says: it enforces Firecracker's snapshot/load rules (a load only into a fresh VMM, files
/// that exist, a full snapshot's pages) and carries the "guest's" uptime in its memory file.
async fn on_standin() -> Daemon {
    Daemon::start_with(vec![
        "--vmm".into(),
        "firecracker".into(),
        "--firecracker-bin".into(),
        bin("firecracker-standin").display().to_string(),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_moves_the_guest_through_a_tmpfs_snapshot() {
    let d = on_standin().await;
    let mut c = d.client().await;
    let pid = booted(&mut c, &d, "fc").await;
    let console = d.run_dir("fc").join("console.log");
    let (alive, up) = (alive_lines(&console), guest_uptime(&console).unwrap());
    let r = migrate(&mut c, "fc", "").await.unwrap();
    assert_eq!(r.old_pid, pid);
    assert_ne!(r.new_pid, pid);
    assert_eq!(r.state, pb::VmState::Running as i32);
    assert!(r.bytes > 0, "{r:?}");
    assert!(wait_dead(pid, EVENT).await);
    let i = info(&mut c, "fc").await;
    assert_eq!(pid_of(&i), Some(r.new_pid));
    assert!(d.run_dir("fc").join("firecracker.sock").exists());
    no_target_files(&d, "fc");
    // The handover files on tmpfs are gone.
    let shm = metald::config::Config {
        state_dir: d.state_dir.clone(),
        ..Default::default()
    }
    .shared_memory_dir();
    let left: Vec<_> = std::fs::read_dir(&shm)
        .map(|r| r.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(
        fc_state(&d.run_dir("fc").join("firecracker.sock")).await,
        "running"
    );
    guest_carries_on(&console, alive, up).await;

    // Paused stays paused.
    c.pause_vm(pb::PauseVmRequest {
        vm_id: "fc".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = migrate(&mut c, "fc", "").await.unwrap();
    assert_eq!(r.state, pb::VmState::Paused as i32);
    assert_eq!(
        fc_state(&d.run_dir("fc").join("firecracker.sock")).await,
        "paused"
    );
    // A target that cannot start leaves the guest where it was.
    let e = migrate(&mut c, "fc", "/bin/false").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
    let i = info(&mut c, "fc").await;
    assert_eq!(pid_of(&i), Some(r.new_pid));
    assert_eq!(state(&i), pb::VmState::Paused);
    c.resume_vm(pb::ResumeVmRequest {
        vm_id: "fc".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        fc_state(&d.run_dir("fc").join("firecracker.sock")).await,
        "running"
    );
}
