//! Snapshots on real QEMU guests: SnapshotVm pauses, saves (QEMU's migration stream to a file)
//! and resumes; a VM created from the snapshot continues the guest where it was, without
//! booting it again.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use metald_api::v1 as pb;

const BOOT: Duration = Duration::from_secs(60);
const EVENT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_create_from_it_continue_the_guest() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let pid = running_vm(&mut c, "orig").await;
    let console = d.run_dir("orig").join("console.log");
    // Wait for the guest to be well up: its first uptime report after READY.
    assert!(wait_console(&console, "METALD-GUEST-ALIVE", 1, BOOT).await);
    let up_at_snapshot = guest_uptime(&console).unwrap();

    let r = c
        .snapshot_vm(pb::SnapshotVmRequest {
            vm_id: "orig".into(),
            diff: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.state,
        pb::VmState::Running as i32,
        "a running VM is resumed after its snapshot"
    );
    assert!(
        std::path::Path::new(&r.path)
            .join("qemu-migration.bin")
            .metadata()
            .unwrap()
            .len()
            > 0
    );
    let i = info(&mut c, "orig").await;
    assert_eq!(state(&i), pb::VmState::Running);
    assert_eq!(
        pid_of(&i),
        Some(pid),
        "the snapshot does not restart the VMM"
    );

    // A new VM from the snapshot: config comes from the snapshot.
    let r2 = c
        .create_vm(pb::CreateVmRequest {
            vm_id: "clone".into(),
            customer_id: "cust-test".into(),
            config: None,
            from_snapshot: r.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r2.state, pb::VmState::Created as i32);
    let ci = info(&mut c, "clone").await;
    assert_eq!(
        ci.config.as_ref().unwrap().memory,
        i.config.as_ref().unwrap().memory
    );
    c.boot_vm(pb::BootVmRequest {
        vm_id: "clone".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let clone_console = d.run_dir("clone").join("console.log");
    // The clone's guest was not booted: it goes on reporting uptime from where it was saved.
    assert!(wait_console(&clone_console, "METALD-GUEST-ALIVE", 1, BOOT).await);
    let text = std::fs::read_to_string(&clone_console).unwrap();
    assert!(
        !text.contains("METALD-GUEST-READY"),
        "the clone booted afresh:\n{text}"
    );
    assert!(
        guest_uptime(&clone_console).unwrap() >= up_at_snapshot,
        "{text}"
    );

    // Bad input.
    let e = c
        .create_vm(pb::CreateVmRequest {
            vm_id: "x".into(),
            customer_id: "c".into(),
            config: None,
            from_snapshot: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("from_snapshot"), "{}", e.message());
    let e = c
        .create_vm(pb::CreateVmRequest {
            from_snapshot: r.snapshot_id.clone(),
            ..guest_request("y")
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("config"), "{}", e.message());
    // QEMU has no diff snapshots; the refusal says so.
    let e = c
        .snapshot_vm(pb::SnapshotVmRequest {
            vm_id: "orig".into(),
            diff: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        e.message()
            .contains("diff snapshot is not supported by the qemu driver"),
        "{}",
        e.message()
    );
    assert_eq!(
        state(&info(&mut c, "orig").await),
        pb::VmState::Running,
        "and the VM was resumed"
    );
    c.create_vm(guest_request("fresh")).await.unwrap();
    let e = c
        .snapshot_vm(pb::SnapshotVmRequest {
            vm_id: "fresh".into(),
            diff: false,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        c.get_vm_info(pb::GetVmInfoRequest { vm_id: "x".into() })
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_listed_with_their_size_deleted_and_removed_with_their_vm() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    running_vm(&mut c, "lst").await;
    let console = d.run_dir("lst").join("console.log");
    assert!(wait_console(&console, "METALD-GUEST-READY", 1, BOOT).await);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = c
            .snapshot_vm(pb::SnapshotVmRequest {
                vm_id: "lst".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.size_bytes > 1 << 20, "{r:?}");
        ids.push((r.snapshot_id, r.path));
    }
    let list = snapshots_of(&mut c, "lst").await;
    assert_eq!(
        list.iter()
            .map(|s| s.snapshot_id.clone())
            .collect::<Vec<_>>(),
        ids.iter().map(|(i, _)| i.clone()).collect::<Vec<_>>()
    );
    assert!(list.iter().all(|s| s.size_bytes > 0 && !s.boot));
    c.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: ids[0].0.clone(),
    })
    .await
    .unwrap();
    assert!(!std::path::Path::new(&ids[0].1).exists());
    let e = c
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: ids[0].0.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("snapshot_id"), "{e:?}");
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "lst".into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        !std::path::Path::new(&ids[1].1).exists(),
        "a VM's snapshots go with it"
    );
    let list = snapshots_of(&mut c, "").await;
    assert!(list.is_empty(), "{list:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_vmm_is_restored_warm_from_the_boot_snapshot() {
    let d = Daemon::start_with_toml("[recovery]\nretry_interval = 100\n").await;
    let mut c = d.client().await;
    let mut req = guest_request("warm");
    let cfg = req.config.as_mut().unwrap();
    cfg.restore_from = pb::RestoreFrom::BootSnapshot as i32;
    cfg.guest_health = Some(pb::GuestHealthConfig {
        probe: pb::GuestProbe::Agent as i32,
        ..Default::default()
    });
    c.create_vm(req).await.unwrap();
    let mark = d.log_mark();
    c.boot_vm(pb::BootVmRequest {
        vm_id: "warm".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Once the guest answers, its boot snapshot is taken.
    d.wait_event(mark, "warm", "boot snapshot taken", BOOT)
        .await;
    let snaps = snapshots_of(&mut c, "warm").await;
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert!(snaps[0].boot && snaps[0].size_bytes > 0);
    let console = d.run_dir("warm").join("console.log");
    assert!(wait_console(&console, "METALD-GUEST-ALIVE", 1, BOOT).await);

    let pid = pid_of(&info(&mut c, "warm").await).unwrap();
    let mark = d.log_mark();
    signal(pid, libc::SIGKILL);
    d.wait_event(mark, "warm", "vm recovered", EVENT).await;
    c.wait_guest_ready(pb::WaitGuestReadyRequest {
        vm_id: "warm".into(),
        timeout_seconds: 30,
    })
    .await
    .unwrap();
    let h = history(&mut c, "warm").await;
    assert_eq!(h[0].method, "restore", "{h:?}");
    assert_eq!(h[0].outcome, outcome("success"));
    // The guest resumed from its snapshot: it never boots again (no READY line in the new
    // VMM's console), and its clock carries on from the snapshot.
    assert!(wait_console(&console, "METALD-GUEST-ALIVE", 1, BOOT).await);
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        !text.contains("METALD-GUEST-READY"),
        "the guest booted:\n{text}"
    );
    assert!(guest_uptime(&console).unwrap() > 2.0, "{text}");
    // The boot snapshot is kept for the next crash.
    let snaps = snapshots_of(&mut c, "warm").await;
    assert_eq!(snaps.len(), 1, "{snaps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_restore_is_refused_with_a_writable_drive() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let disk = d.state_dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut req = guest_request("rw");
    let cfg = req.config.as_mut().unwrap();
    cfg.restore_from = pb::RestoreFrom::BootSnapshot as i32;
    cfg.storage.push(pb::StorageDevice {
        id: "data".into(),
        path: disk.display().to_string(),
        read_only: false,
        is_root_device: false,
    });
    let e = c.create_vm(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("config.restore_from"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_a_vm_still_needs_outlives_its_source_and_goes_with_that_vm() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    running_vm(&mut c, "src").await;
    let console = d.run_dir("src").join("console.log");
    assert!(wait_console(&console, "METALD-GUEST-READY", 1, BOOT).await);
    let snap = c
        .snapshot_vm(pb::SnapshotVmRequest {
            vm_id: "src".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // A VM made from it, not started yet: its guest is in the snapshot.
    c.create_vm(pb::CreateVmRequest {
        vm_id: "made".into(),
        customer_id: "cust-test".into(),
        from_snapshot: snap.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "src".into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        std::path::Path::new(&snap.path).exists(),
        "a snapshot a VM needs was removed"
    );
    let list = snapshots_of(&mut c, "made").await;
    assert_eq!(
        list.len(),
        1,
        "the snapshot is the VM made from it's now: {list:?}"
    );
    let e = c
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "made".into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        !std::path::Path::new(&snap.path).exists(),
        "the snapshot outlived its last VM"
    );
}

/// The snapshots ListSnapshots shows (of VM `vm`, or all with "").
async fn snapshots_of(c: &mut Client, vm: &str) -> Vec<pb::Snapshot> {
    c.list_snapshots(pb::ListSnapshotsRequest { vm_id: vm.into() })
        .await
        .unwrap()
        .into_inner()
        .snapshots
}
