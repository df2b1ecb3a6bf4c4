//! metald's Firecracker driver end to end. With `FIRECRACKER_BIN` set these run the real
//! Firecracker (on a host with hardware KVM); otherwise they run the **test stand-in** from this
//! crate, which validates every request against Firecracker's v1.16.1 spec and keeps its state
//! rules, but boots no guest. Everything above the driver — detection, health checks, re-attach,
//! recovery — is metald's real code either way.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../metald/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use fc_standin::Spec;
use metald::driver::firecracker::{FcPaths, FirecrackerDriver};
use metald::model::{Drive, Nic, VmSpec};
use metald_api::v1 as pb;

const EVENT: Duration = Duration::from_secs(20);

fn firecracker_bin() -> String {
    std::env::var("FIRECRACKER_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_firecracker-standin").to_string())
}

async fn fc_daemon(toml: &str) -> Daemon {
    Daemon::start_with_toml_args(
        toml,
        vec![
            "--vmm".into(),
            "firecracker".into(),
            "--firecracker-bin".into(),
            firecracker_bin(),
        ],
    )
    .await
}

fn full_spec() -> VmSpec {
    VmSpec {
        vcpus: 2,
        memory_bytes: 256 << 20,
        kernel: "/assets/vmlinux".into(),
        initrd: Some("/assets/initrd.img".into()),
        kernel_args: "quiet".into(),
        drives: vec![
            Drive {
                id: "root".into(),
                path: "/assets/root.img".into(),
                read_only: true,
                is_root: true,
            },
            Drive {
                id: "data".into(),
                path: "/assets/data.img".into(),
                read_only: false,
                is_root: false,
            },
        ],
        nics: vec![Nic {
            id: "eth0".into(),
            mac: "52:54:00:12:34:56".into(),
            tap: "tap0".into(),
        }],
        console: true,
        metadata: BTreeMap::new(),
        restart_policy: Default::default(),
        auto_recover: true,
        vmm: None,
        vsock_cid: None,
        guest_health: Default::default(),
        vmm_binary: None,
        restore_from: Default::default(),
    }
}

#[test]
fn every_request_body_the_driver_builds_satisfies_the_spec() {
    let spec = Spec::load().unwrap();
    let dir = Path::new("/run/metald/run/vm1");
    let spec_in = full_spec();
    let mut reqs = FirecrackerDriver::config_requests(&spec_in, &FcPaths::host(&spec_in, dir));
    // Jailed, the files are named inside the jail and the console goes through PUT /serial.
    reqs.extend(FirecrackerDriver::config_requests(
        &spec_in,
        &FcPaths::jailed(&spec_in),
    ));
    reqs.extend(FirecrackerDriver::action_requests(dir));
    let paths: Vec<&str> = reqs.iter().map(|r| r.path.as_str()).collect();
    for want in [
        "/logger",
        "/metrics",
        "/machine-config",
        "/boot-source",
        "/drives/root",
        "/drives/data",
        "/network-interfaces/eth0",
        "/actions",
        "/vm",
        "/snapshot/create",
        "/snapshot/load",
        "/serial",
    ] {
        assert!(paths.contains(&want), "driver never sends {want}");
    }
    for r in &reqs {
        spec.validate(r.method.as_str(), &r.path, &r.body)
            .unwrap_or_else(|e| panic!("{} {} {}: {e}", r.method, r.path, r.body));
    }
    // The validator is not a rubber stamp.
    assert!(
        spec.validate(
            "PUT",
            "/machine-config",
            &serde_json::json!({"vcpu_count": 1})
        )
        .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_on_firecracker() {
    let d = fc_daemon("[recovery]\nenabled = false\n").await;
    let mut c = d.client().await;
    c.create_vm(guest_request("fc-life")).await.unwrap();
    let i = info(&mut c, "fc-life").await;
    assert_eq!(i.vmm.as_ref().unwrap().kind, "firecracker");
    assert!(
        i.vmm
            .as_ref()
            .unwrap()
            .control_socket
            .ends_with("firecracker.sock")
    );
    let pid = pid_of(&i).unwrap();
    c.boot_vm(pb::BootVmRequest {
        vm_id: "fc-life".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let console = console_of(&i);
    assert!(wait_console(&console, "METALD-GUEST-READY", 1, Duration::from_secs(30)).await);
    let r = c
        .pause_vm(pb::PauseVmRequest {
            vm_id: "fc-life".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::VmState::Paused as i32);
    c.resume_vm(pb::ResumeVmRequest {
        vm_id: "fc-life".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Reboot is a supervised restart: Firecracker exits when its guest reboots.
    c.reboot_vm(pb::RebootVmRequest {
        vm_id: "fc-life".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let pid2 = pid_of(&info(&mut c, "fc-life").await).unwrap();
    assert_ne!(pid, pid2);
    // Graceful shutdown: SendCtrlAltDel, and Firecracker exits 0.
    let r = c
        .shutdown_vm(pb::ShutdownVmRequest {
            vm_id: "fc-life".into(),
            force: false,
            timeout_seconds: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::VmState::Shutdown as i32);
    assert!(
        info(&mut c, "fc-life")
            .await
            .last_exit
            .contains("exited with code 0")
    );
    c.boot_vm(pb::BootVmRequest {
        vm_id: "fc-life".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "fc-life".into(),
        force: false,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(d.vmm_pids_named("--api-sock").is_empty());
    assert!(!d.run_dir("fc-life").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_refusals_become_clear_errors_and_leave_nothing() {
    let assets = Assets::new();
    let mut args = assets.args();
    args.extend([
        "--vmm".into(),
        "firecracker".into(),
        "--firecracker-bin".into(),
        firecracker_bin(),
    ]);
    let d = Daemon::start_with_toml_args("[recovery]\nenabled = false\n", args).await;
    let mut c = d.client().await;
    c.create_vm(assets.request("fc-k")).await.unwrap();
    c.shutdown_vm(pb::ShutdownVmRequest {
        vm_id: "fc-k".into(),
        force: true,
        timeout_seconds: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    // The kernel disappears after validation: Firecracker refuses PUT /boot-source with a
    // fault_message, which reaches the caller as a clear error.
    assets.break_kernel();
    let e = c
        .boot_vm(pb::BootVmRequest {
            vm_id: "fc-k".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    // The VMM refused: the request cannot proceed as things are, which is not an internal
    // error of metald's.
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("refused PUT /boot-source"),
        "{}",
        e.message()
    );
    assert!(
        e.message().contains("kernel file cannot be opened"),
        "{}",
        e.message()
    );
    // Nothing is left running, and the VM is what it was.
    assert!(d.vmm_pids_named("--api-sock").is_empty());
    assert_eq!(state(&info(&mut c, "fc-k").await), pb::VmState::Shutdown);
    assets.restore_kernel();
    c.boot_vm(pb::BootVmRequest {
        vm_id: "fc-k".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // A state rule enforced by Firecracker itself: no configuration after InstanceStart.
    let sock = std::path::PathBuf::from(
        &info(&mut c, "fc-k")
            .await
            .vmm
            .as_ref()
            .unwrap()
            .control_socket,
    );
    let (status, body) = metald::driver::uds_http::call(
        &sock,
        hyper_put(),
        "/machine-config",
        Some(&serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128})),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert_eq!(status.as_u16(), 400);
    assert!(
        body["fault_message"]
            .as_str()
            .unwrap()
            .contains("after starting"),
        "{body}"
    );
}

fn hyper_put() -> metald::driver::uds_http::Method {
    metald::driver::uds_http::Method::PUT
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_and_sigstop_are_detected_on_firecracker() {
    let d = fc_daemon("[recovery]\nenabled = false\n").await;
    let mut c = d.client().await;
    let pid = running_vm(&mut c, "fc-k9").await;
    let mark = d.log_mark();
    signal(pid, libc::SIGKILL);
    let ev = d
        .wait_event(mark, "fc-k9", "orphaned vm detected", EVENT)
        .await;
    assert_eq!(ev["reason"], "process_dead");

    let pid = running_vm(&mut c, "fc-hung").await;
    let mark = d.log_mark();
    signal(pid, libc::SIGSTOP);
    d.wait_event(mark, "fc-hung", "vm unhealthy", EVENT).await;
    let ev = d
        .wait_event(mark, "fc-hung", "orphaned vm detected", EVENT)
        .await;
    assert_eq!(ev["reason"], "api_unresponsive");
    assert!(wait_dead(pid, Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_after_metald_sigkill_and_automatic_recovery_on_firecracker() {
    let mut d = fc_daemon("").await;
    let mut c = d.client().await;
    let mut pids = Vec::new();
    for id in ["fc-a", "fc-b", "fc-c"] {
        pids.push(running_vm(&mut c, id).await);
    }
    c.pause_vm(pb::PauseVmRequest {
        vm_id: "fc-b".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    d.stop_with(libc::SIGKILL);
    let mark = d.log_mark();
    d.spawn().await;
    let mut c = d.client().await;
    for (id, pid) in ["fc-a", "fc-b", "fc-c"].iter().zip(&pids) {
        let i = info(&mut c, id).await;
        assert_eq!(pid_of(&i), Some(*pid), "{id} re-attached with the same pid");
    }
    assert_eq!(state(&info(&mut c, "fc-b").await), pb::VmState::Paused);
    assert_eq!(events(&d, mark, "vmm re-attached").len(), 3);

    // Automatic recovery: a killed Firecracker comes back, paused if it was paused.
    let mark = d.log_mark();
    signal(pids[1], libc::SIGKILL);
    d.wait_event(mark, "fc-b", "vm recovered", EVENT).await;
    let i = info(&mut c, "fc-b").await;
    assert_eq!(state(&i), pb::VmState::Paused);
    assert_ne!(pid_of(&i), Some(pids[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_load_on_firecracker() {
    let d = fc_daemon("[recovery]\nenabled = false\n[firecracker]\ndiff_snapshots = true\n").await;
    let mut c = d.client().await;
    let mut req = guest_request("fc-orig");
    req.config.as_mut().unwrap().vsock = Some(pb::VsockConfig { guest_cid: 7 });
    c.create_vm(req).await.unwrap();
    c.boot_vm(pb::BootVmRequest {
        vm_id: "fc-orig".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let vsock = info(&mut c, "fc-orig").await.config.unwrap().vsock;
    assert_eq!(vsock.map(|v| v.guest_cid), Some(7));
    let r = c
        .snapshot_vm(pb::SnapshotVmRequest {
            vm_id: "fc-orig".into(),
            diff: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::VmState::Running as i32);
    // A diff is merged onto the full snapshot before it, so it restores alone.
    let diff = c
        .snapshot_vm(pb::SnapshotVmRequest {
            vm_id: "fc-orig".into(),
            diff: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(diff.state, pb::VmState::Running as i32);
    c.create_vm(pb::CreateVmRequest {
        vm_id: "fc-diff".into(),
        customer_id: "c".into(),
        config: None,
        from_snapshot: diff.snapshot_id,
        ..Default::default()
    })
    .await
    .unwrap();
    c.boot_vm(pb::BootVmRequest {
        vm_id: "fc-diff".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    for f in ["vmstate", "memory"] {
        assert!(std::path::Path::new(&r.path).join(f).exists(), "{f}");
    }
    c.create_vm(pb::CreateVmRequest {
        vm_id: "fc-clone".into(),
        customer_id: "c".into(),
        config: None,
        from_snapshot: r.snapshot_id,
        ..Default::default()
    })
    .await
    .unwrap();
    let i = info(&mut c, "fc-clone").await;
    assert_eq!(i.vmm.as_ref().unwrap().kind, "firecracker");
    assert_eq!(state(&i), pb::VmState::Created);
    // Booting a VM loaded from a snapshot resumes it (InstanceStart is refused after a load).
    c.boot_vm(pb::BootVmRequest {
        vm_id: "fc-clone".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(state(&info(&mut c, "fc-clone").await), pb::VmState::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_firecracker_cannot_boot_is_refused_and_a_refused_boot_changes_nothing() {
    let assets = Assets::new();
    let mut args = assets.args();
    args.extend([
        "--vmm".into(),
        "firecracker".into(),
        "--firecracker-bin".into(),
        firecracker_bin(),
    ]);
    let d = Daemon::start_with_toml_args("[recovery]\nenabled = false\n", args).await;
    let mut c = d.client().await;
    // The Debian bzImage is what QEMU boots; Firecracker needs the ELF vmlinux.
    let bz = assets.dir.join("bzImage");
    std::fs::copy(guest_dir().join("kernel"), &bz).unwrap();
    let mut r = assets.request("fc-bz");
    r.config
        .as_mut()
        .unwrap()
        .boot
        .as_mut()
        .unwrap()
        .kernel_path = bz.display().to_string();
    let e = c.create_vm(r).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("config.boot.kernel_path") && e.message().contains("bzImage"),
        "{}",
        e.message()
    );
    assert!(
        c.get_vm_info(pb::GetVmInfoRequest {
            vm_id: "fc-bz".into()
        })
        .await
        .is_err(),
        "nothing was created"
    );
    // A kernel that turns bad after CreateVm: the VMM refuses the boot, and the caller learns
    // why, with FAILED_PRECONDITION; the VM's desired state is what it was.
    let k = assets.dir.join("vmlinux-soon-bad");
    std::fs::copy(assets.kernel(), &k).unwrap();
    let mut r = assets.request("fc-bad");
    r.config
        .as_mut()
        .unwrap()
        .boot
        .as_mut()
        .unwrap()
        .kernel_path = k.display().to_string();
    c.create_vm(r).await.unwrap();
    std::fs::write(&k, std::fs::read(guest_dir().join("kernel")).unwrap()).unwrap();
    let e = c
        .boot_vm(pb::BootVmRequest {
            vm_id: "fc-bad".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("Invalid Elf magic number"),
        "{}",
        e.message()
    );
    let i = info(&mut c, "fc-bad").await;
    assert_eq!(i.desired_state, pb::VmState::Created as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firecracker_whose_vcpu_died_is_recovered_not_taken_for_a_power_off() {
    if std::env::var("FIRECRACKER_BIN").is_ok() {
        // The stand-in's knob makes the internal error; a real guest dies on its own (under a
        // software KVM, after 35-66 s), which the closing notes of the jailer work measured.
        return;
    }
    let d = fc_daemon("[recovery]\nenabled = true\nretry_interval = 100\n").await;
    let mut c = d.client().await;
    let mut r = guest_request("fc-ie");
    r.config
        .as_mut()
        .unwrap()
        .boot
        .as_mut()
        .unwrap()
        .kernel_args = "quiet metald.internal_error_after=0.5".into();
    c.create_vm(r).await.unwrap();
    let mark = d.log_mark();
    c.boot_vm(pb::BootVmRequest {
        vm_id: "fc-ie".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    d.wait_event(mark, "fc-ie", "orphaned vm detected", EVENT)
        .await;
    assert!(!d.logged(mark, "fc-ie", "vm powered off by guest"));
    let orphaned = events(&d, mark, "orphaned vm detected");
    assert!(
        orphaned
            .iter()
            .any(|e| e.to_string().contains("KVM_EXIT_INTERNAL_ERROR")),
        "{orphaned:?}"
    );
    d.wait_event(mark, "fc-ie", "vm recovered", EVENT).await;
}
