//! Bad input gets a gRPC status that names the field and the reason, and leaves nothing
//! half-created: no process, socket, run directory or row. Nothing already stored is lost.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::*;
use metald_api::v1 as pb;
use tonic::Code;

/// Asserts that the daemon holds exactly `ids` and that nothing else exists on disk or as a
/// process.
async fn assert_only(d: &Daemon, c: &mut Client, ids: &[&str], pids: usize) {
    let list = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let have: Vec<&str> = list.vms.iter().map(|v| v.vm_id.as_str()).collect();
    assert_eq!(have, ids, "rows");
    let mut dirs: Vec<String> = std::fs::read_dir(d.state_dir.join("run"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert_eq!(dirs, ids, "run directories");
    assert_eq!(d.vmm_pids().len(), pids, "VMM processes");
}

fn with<F: FnOnce(&mut pb::VmConfig)>(id: &str, f: F) -> pb::CreateVmRequest {
    let mut r = guest_request(id);
    f(r.config.as_mut().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_create_requests_name_the_field_and_leave_nothing() {
    let assets = std::path::PathBuf::from(format!("/tmp/mdt-assets-{}", std::process::id()));
    std::fs::create_dir_all(&assets).unwrap();
    let disk = assets.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let d = Daemon::start_with(vec![
        "--asset-dir".into(),
        guest_dir().display().to_string(),
        "--asset-dir".into(),
        assets.display().to_string(),
    ])
    .await;
    let mut c = d.client().await;
    let data_disk = |id: &str| pb::StorageDevice {
        id: id.into(),
        path: disk.display().to_string(),
        read_only: false,
        is_root_device: false,
    };

    // One good VM that every bad request below must leave untouched. It holds a writable disk.
    c.create_vm(with("keeper", |c| c.storage = vec![data_disk("data")]))
        .await
        .unwrap();
    c.boot_vm(pb::BootVmRequest {
        vm_id: "keeper".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let keeper = info(&mut c, "keeper").await;

    let outside = d.state_dir.join("outside-kernel");
    std::fs::write(&outside, b"not a kernel").unwrap();
    let g = guest_dir();
    let cases: Vec<(pb::CreateVmRequest, Code, &str)> = vec![
        (guest_request("../x"), Code::InvalidArgument, "vm_id"),
        (guest_request("a b"), Code::InvalidArgument, "vm_id"),
        (
            guest_request(&"x".repeat(65)),
            Code::InvalidArgument,
            "vm_id",
        ),
        (
            guest_request("keeper"),
            Code::AlreadyExists,
            "vm keeper already exists",
        ),
        (
            pb::CreateVmRequest {
                customer_id: String::new(),
                ..guest_request("nocust")
            },
            Code::InvalidArgument,
            "customer_id",
        ),
        (
            pb::CreateVmRequest {
                config: None,
                ..guest_request("nocfg")
            },
            Code::InvalidArgument,
            "config",
        ),
        (
            with("cpu0", |c| c.cpu = Some(pb::CpuConfig { vcpu_count: 0 })),
            Code::InvalidArgument,
            "config.cpu.vcpu_count",
        ),
        (
            with("cpubig", |c| {
                c.cpu = Some(pb::CpuConfig { vcpu_count: 4096 })
            }),
            Code::InvalidArgument,
            "config.cpu.vcpu_count",
        ),
        (
            with("memlow", |c| {
                c.memory = Some(pb::MemoryConfig {
                    size_bytes: 64 << 20,
                })
            }),
            Code::InvalidArgument,
            "config.memory.size_bytes",
        ),
        (
            with("memhigh", |c| {
                c.memory = Some(pb::MemoryConfig {
                    size_bytes: 1 << 50,
                })
            }),
            Code::InvalidArgument,
            "config.memory.size_bytes",
        ),
        (
            with("kmiss", |c| {
                c.boot.as_mut().unwrap().kernel_path = g.join("missing").display().to_string()
            }),
            Code::InvalidArgument,
            "config.boot.kernel_path",
        ),
        (
            with("kout", |c| {
                c.boot.as_mut().unwrap().kernel_path = outside.display().to_string()
            }),
            Code::InvalidArgument,
            "config.boot.kernel_path",
        ),
        (
            with("kdots", |c| {
                c.boot.as_mut().unwrap().kernel_path =
                    format!("{}/../../../etc/passwd", g.display())
            }),
            Code::InvalidArgument,
            "config.boot.kernel_path",
        ),
        (
            with("kempty", |c| {
                c.boot.as_mut().unwrap().kernel_path = String::new()
            }),
            Code::InvalidArgument,
            "config.boot.kernel_path",
        ),
        (
            with("iout", |c| {
                c.boot.as_mut().unwrap().initrd_path = "/etc/hostname".into()
            }),
            Code::InvalidArgument,
            "config.boot.initrd_path",
        ),
        (
            with("dout", |c| {
                c.storage = vec![pb::StorageDevice {
                    id: "d".into(),
                    path: "/etc/hostname".into(),
                    read_only: true,
                    is_root_device: false,
                }]
            }),
            Code::InvalidArgument,
            "config.storage[0].path",
        ),
        (
            with("badmac", |c| {
                c.network = vec![pb::NetworkInterface {
                    id: "n".into(),
                    mac_address: "zz".into(),
                    tap_device: "tap0".into(),
                }]
            }),
            Code::InvalidArgument,
            "config.network[0].mac_address",
        ),
        (
            with("drives17", |c| {
                c.storage = (0..17).map(|i| data_disk(&format!("d{i}"))).collect()
            }),
            Code::InvalidArgument,
            "config.storage: at most 16",
        ),
        (
            with("nics9", |c| {
                c.network = (0..9)
                    .map(|i| pb::NetworkInterface {
                        id: format!("n{i}"),
                        mac_address: format!("02:00:00:00:00:{i:02x}"),
                        tap_device: format!("tap{i}"),
                    })
                    .collect()
            }),
            Code::InvalidArgument,
            "config.network: at most 8",
        ),
        (
            with("vsockcid", |c| {
                c.vsock = Some(pb::VsockConfig { guest_cid: 2 })
            }),
            Code::InvalidArgument,
            "config.vsock.guest_cid",
        ),
    ];
    for (req, code, prefix) in cases {
        let id = req.vm_id.clone();
        let e = c.create_vm(req).await.expect_err(&id);
        assert_eq!(e.code(), code, "{id}: {e:?}");
        assert!(
            e.message().starts_with(prefix),
            "{id}: message {:?} should start with {prefix:?}",
            e.message()
        );
        assert_only(&d, &mut c, &["keeper"], 1).await;
    }

    // A request far larger than any valid one is refused before it is decoded.
    let e = c
        .create_vm(with("huge", |c| {
            c.boot.as_mut().unwrap().kernel_args = "x".repeat(300 * 1024)
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert_only(&d, &mut c, &["keeper"], 1).await;

    // A request that passes validation but that QEMU itself refuses (the keeper holds the
    // disk's write lock): the VMM exits during start-up and everything is rolled back. Image
    // locking is QEMU's: Firecracker opens a disk two VMs share without complaint.
    if !on_firecracker() {
        let e = c
            .create_vm(with("locked", |c| c.storage = vec![data_disk("data")]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Internal, "{e:?}");
        assert!(
            e.message().contains("exited during start-up"),
            "{}",
            e.message()
        );
        assert!(
            e.message().contains("lock"),
            "QEMU's reason is passed on: {}",
            e.message()
        );
        assert_only(&d, &mut c, &["keeper"], 1).await;
    }

    // The keeper is exactly as it was.
    let after = info(&mut c, "keeper").await;
    assert_eq!(after.config, keeper.config);
    assert_eq!(pid_of(&after), pid_of(&keeper));
    assert_eq!(state(&after), pb::VmState::Running);
    drop(d);
    let _ = std::fs::remove_dir_all(&assets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_vms_and_invalid_transitions() {
    let d = Daemon::start().await;
    let mut c = d.client().await;

    let id = || "ghost".to_string();
    let nf = [
        c.boot_vm(pb::BootVmRequest {
            vm_id: id(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        c.pause_vm(pb::PauseVmRequest {
            vm_id: id(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        c.resume_vm(pb::ResumeVmRequest {
            vm_id: id(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        c.reboot_vm(pb::RebootVmRequest {
            vm_id: id(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        c.shutdown_vm(pb::ShutdownVmRequest {
            vm_id: id(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: id(),
            force: false,
            ..Default::default()
        })
        .await
        .unwrap_err(),
        c.get_vm_info(pb::GetVmInfoRequest { vm_id: id() })
            .await
            .unwrap_err(),
    ];
    for e in nf {
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains("ghost"), "{}", e.message());
    }
    let e = c
        .boot_vm(pb::BootVmRequest {
            vm_id: "../etc".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("vm_id"));

    c.create_vm(guest_request("fsm")).await.unwrap();
    let pid = pid_of(&info(&mut c, "fsm").await).unwrap();
    let fp = |e: tonic::Status, what: &str| {
        assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e:?}");
        assert!(
            e.message().contains("created") || e.message().contains("running"),
            "{}",
            e.message()
        );
    };
    fp(
        c.pause_vm(pb::PauseVmRequest {
            vm_id: "fsm".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        "pause created",
    );
    fp(
        c.resume_vm(pb::ResumeVmRequest {
            vm_id: "fsm".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        "resume created",
    );
    fp(
        c.reboot_vm(pb::RebootVmRequest {
            vm_id: "fsm".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        "reboot created",
    );
    c.boot_vm(pb::BootVmRequest {
        vm_id: "fsm".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    fp(
        c.boot_vm(pb::BootVmRequest {
            vm_id: "fsm".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        "boot running",
    );
    fp(
        c.resume_vm(pb::ResumeVmRequest {
            vm_id: "fsm".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        "resume running",
    );
    let e = c
        .shutdown_vm(pb::ShutdownVmRequest {
            vm_id: "fsm".into(),
            force: false,
            timeout_seconds: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("timeout_seconds"));
    // None of the refused calls touched the VM.
    let i = info(&mut c, "fsm").await;
    assert_eq!(state(&i), pb::VmState::Running);
    assert_eq!(pid_of(&i), Some(pid));
}
