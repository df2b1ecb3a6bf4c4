//! Lifecycle through the real gRPC server with real QEMU guests (TCG): every RPC, every state
//! transition, reboot, graceful shutdown, delete, and persistence across daemon restarts.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use metald_api::v1 as pb;

const BOOT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_and_state_transition_on_a_real_guest() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&d.sock).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o660,
            "the API socket is group-accessible only"
        );
    }

    // Create: a VMM process exists, configured, guest not started.
    let r = c
        .create_vm(guest_request("life"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.vm_id, "life");
    assert_eq!(r.state, pb::VmState::Created as i32);
    let i = info(&mut c, "life").await;
    assert_eq!(state(&i), pb::VmState::Created);
    assert_eq!(i.customer_id, "cust-test");
    let pid1 = pid_of(&i).expect("a VMM with its pid");
    assert!(pid_alive(pid1));
    let v = vmm_of(&i);
    for (what, field) in [
        ("control_socket", &v.control_socket),
        ("console_log", &v.console_log),
        ("run_dir", &v.run_dir),
        ("kind", &v.kind),
        ("version", &v.version),
    ] {
        assert!(!field.is_empty(), "vmm.{what} empty");
    }
    // The VMM's start time is a wall-clock time, within a minute of now.
    let started = v.start_time.as_ref().expect("vmm.start_time").seconds;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now - started).abs() < 60,
        "start_time {started}, now {now}"
    );
    assert!(std::path::Path::new(&i.vmm.as_ref().unwrap().control_socket).exists());
    let console = console_of(&i);
    assert_eq!(
        i.config
            .as_ref()
            .unwrap()
            .metadata
            .get("app")
            .map(String::as_str),
        Some("test")
    );

    // Boot: the guest reaches /init.
    let r = c
        .boot_vm(pb::BootVmRequest {
            vm_id: "life".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::VmState::Running as i32);
    assert!(
        wait_console(&console, "METALD-GUEST-READY", 1, BOOT).await,
        "guest never ready"
    );
    assert_eq!(
        pid_of(&info(&mut c, "life").await),
        Some(pid1),
        "boot keeps the VMM"
    );

    // Pause and resume.
    let r = c
        .pause_vm(pb::PauseVmRequest {
            vm_id: "life".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::VmState::Paused as i32);
    assert_eq!(state(&info(&mut c, "life").await), pb::VmState::Paused);
    let err = c
        .pause_vm(pb::PauseVmRequest {
            vm_id: "life".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let r = c
        .resume_vm(pb::ResumeVmRequest {
            vm_id: "life".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::VmState::Running as i32);

    // Reboot: a supervised restart; a new VMM boots the guest again.
    let r = c
        .reboot_vm(pb::RebootVmRequest {
            vm_id: "life".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::VmState::Running as i32);
    let i = info(&mut c, "life").await;
    let pid2 = pid_of(&i).unwrap();
    assert_ne!(pid2, pid1, "reboot restarts the VMM");
    assert!(!pid_alive(pid1), "old VMM is gone");
    assert!(
        wait_console(&console, "METALD-GUEST-READY", 1, BOOT).await,
        "guest not ready after reboot"
    );

    // Graceful shutdown: the guest powers itself off through the ACPI power button.
    let r = c
        .shutdown_vm(pb::ShutdownVmRequest {
            vm_id: "life".into(),
            force: false,
            timeout_seconds: 30,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::VmState::Shutdown as i32);
    let i = info(&mut c, "life").await;
    assert_eq!(state(&i), pb::VmState::Shutdown);
    assert!(i.vmm.is_none(), "no VMM once shut down");
    assert!(!pid_alive(pid2));
    assert!(wait_console(&console, "METALD-GUEST-POWEROFF", 1, Duration::from_secs(1)).await);
    assert!(
        i.last_exit.contains("exited with code 0"),
        "{:?}",
        i.last_exit
    );

    // Boot from SHUTDOWN, then a forced shutdown and a boot again.
    c.boot_vm(pb::BootVmRequest {
        vm_id: "life".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(state(&info(&mut c, "life").await), pb::VmState::Running);
    let r = c
        .shutdown_vm(pb::ShutdownVmRequest {
            vm_id: "life".into(),
            force: true,
            timeout_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::VmState::Shutdown as i32);
    let err = c
        .shutdown_vm(pb::ShutdownVmRequest {
            vm_id: "life".into(),
            force: true,
            timeout_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    c.boot_vm(pb::BootVmRequest {
        vm_id: "life".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let pid3 = pid_of(&info(&mut c, "life").await).unwrap();

    // Delete: process, socket, run directory and row all go.
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "life".into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!pid_alive(pid3));
    assert!(!d.run_dir("life").exists());
    let err = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "life".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let list = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.total_count, 0);
    assert!(d.vmm_pids().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_and_vmms_survive_daemon_restarts() {
    let mut d = Daemon::start().await;
    let mut c = d.client().await;
    for id in ["keep-run", "keep-created", "keep-paused", "keep-off"] {
        c.create_vm(guest_request(id)).await.unwrap();
    }
    for id in ["keep-run", "keep-paused", "keep-off"] {
        c.boot_vm(pb::BootVmRequest {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    c.pause_vm(pb::PauseVmRequest {
        vm_id: "keep-paused".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.shutdown_vm(pb::ShutdownVmRequest {
        vm_id: "keep-off".into(),
        force: true,
        timeout_seconds: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let before: Vec<pb::Vm> = {
        let mut v = Vec::new();
        for id in ["keep-created", "keep-off", "keep-paused", "keep-run"] {
            v.push(info(&mut c, id).await);
        }
        v
    };
    let console = std::path::PathBuf::from(&before[3].vmm.as_ref().unwrap().console_log);
    assert!(wait_console(&console, "METALD-GUEST-READY", 1, BOOT).await);

    // A clean stop (SIGTERM), then a crash (SIGKILL): both times every VM comes back with its
    // config, and every VMM is adopted with the same pid.
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        d.stop_with(sig);
        for b in &before {
            if let Some(pid) = pid_of(b) {
                assert!(pid_alive(pid), "VMM {pid} must outlive metald");
            }
        }
        let up_before = guest_uptime(&console).unwrap();
        d.spawn().await;
        let mut c = d.client().await;
        let list = c
            .list_vms(pb::ListVmsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.total_count, 4);
        let ids: Vec<&str> = list.vms.iter().map(|v| v.vm_id.as_str()).collect();
        assert_eq!(ids, ["keep-created", "keep-off", "keep-paused", "keep-run"]);
        for b in &before {
            let a = info(&mut c, &b.vm_id).await;
            assert_eq!(a.config, b.config, "{} config", b.vm_id);
            assert_eq!(a.state, b.state, "{} state", b.vm_id);
            assert_eq!(pid_of(&a), pid_of(b), "{} pid", b.vm_id);
            assert_eq!(a.customer_id, b.customer_id);
        }
        // The running guest kept running: its uptime keeps growing past what it was.
        let grew = wait_until(Duration::from_secs(20), || {
            guest_uptime(&console).is_some_and(|u| u > up_before)
        })
        .await;
        assert!(grew, "guest uptime did not grow after re-attach");
        // And the adopted VMMs are still driven: pause and resume the running one.
        c.pause_vm(pb::PauseVmRequest {
            vm_id: "keep-run".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.resume_vm(pb::ResumeVmRequest {
            vm_id: "keep-run".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

async fn wait_until(timeout: Duration, f: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_and_pages() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    for i in 0..5 {
        c.create_vm(guest_request(&format!("page-{i}")))
            .await
            .unwrap();
    }
    c.boot_vm(pb::BootVmRequest {
        vm_id: "page-3".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .list_vms(pb::ListVmsRequest {
                state_filter: vec![],
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.vms.len() <= 2);
        assert_eq!(r.total_count, 5);
        seen.extend(r.vms.into_iter().map(|v| v.vm_id));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(seen, ["page-0", "page-1", "page-2", "page-3", "page-4"]);

    let r = c
        .list_vms(pb::ListVmsRequest {
            state_filter: vec![pb::VmState::Running as i32],
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.vms.iter().map(|v| v.vm_id.as_str()).collect::<Vec<_>>(),
        ["page-3"]
    );
    let cfg = r.vms[0].config.as_ref().unwrap();
    assert_eq!(cfg.cpu.as_ref().unwrap().vcpu_count, 1);
    assert_eq!(cfg.memory.as_ref().unwrap().size_bytes, 128 << 20);

    for (req, field) in [
        (
            pb::ListVmsRequest {
                page_size: -1,
                ..Default::default()
            },
            "page_size",
        ),
        (
            pb::ListVmsRequest {
                page_token: "../x".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            pb::ListVmsRequest {
                state_filter: vec![42],
                ..Default::default()
            },
            "state_filter[0]",
        ),
    ] {
        let e = c.list_vms(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{}", e.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_state_dir_and_a_64_character_vm_id_work() {
    // 84 characters: a VM's run directory is then 149, far past a socket address's 107.
    let base = format!("/tmp/mdt-long-{}-", std::process::id());
    let state_dir = std::path::PathBuf::from(format!("{base}{}", "x".repeat(84 - base.len())));
    assert_eq!(state_dir.as_os_str().len(), 84);
    let _ = std::fs::remove_dir_all(&state_dir);
    std::fs::create_dir_all(&state_dir).unwrap();
    let mut d = Daemon::start_in(state_dir.clone(), vec![]).await;
    let id = "v".repeat(64);
    let mut c = d.client().await;
    let pid = running_vm(&mut c, &id).await;
    let i = info(&mut c, &id).await;
    let sock = &vmm_of(&i).control_socket;
    assert!(sock.len() > 107, "{sock}");
    assert!(
        std::path::Path::new(sock).exists(),
        "the VMM made its socket where it says"
    );
    // metald drives the VMM through that socket.
    c.pause_vm(pb::PauseVmRequest {
        vm_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.resume_vm(pb::ResumeVmRequest {
        vm_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        wait_console(
            &console_of(&i),
            "METALD-GUEST-READY",
            1,
            Duration::from_secs(60)
        )
        .await
    );
    // A restarted metald knows the VMM as its own (and no one else's) and adopts it.
    d.stop_with(libc::SIGKILL);
    let mark = d.log_mark();
    d.spawn().await;
    let mut c = d.client().await;
    assert!(d.logged(mark, &id, "vmm re-attached"));
    assert_eq!(pid_of(&info(&mut c, &id).await), Some(pid));
    // A dead VMM is recovered there too.
    signal(pid, libc::SIGKILL);
    d.wait_event(mark, &id, "vm recovered", Duration::from_secs(30))
        .await;
    let i = info(&mut c, &id).await;
    assert_eq!(state(&i), pb::VmState::Running);
    let r = c
        .reconcile(pb::ReconcileRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.strays_found, 0);
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: id.clone(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(d.vmm_pids().is_empty());
}
