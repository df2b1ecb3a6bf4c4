//! Snapshots on real QEMU guests: SnapshotVm pauses, saves (QEMU's migration stream to a file)
//! and resumes; a VM created from the snapshot continues the guest where it was, without
//! booting it again.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use metald_api::v1 as pb;

const BOOT: Duration = Duration::from_secs(60);

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
