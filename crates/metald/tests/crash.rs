//! metald killed at each step of each multi-step operation. Built only with the `failpoints`
//! feature (scripts/test.sh turns it on): `FAILPOINTS=<name>=return` makes metald abort at that
//! named step, as a SIGKILL there would. After a restart the VM must converge to what the caller
//! asked for, with exactly one VMM if it should run and none otherwise, no stray and no leftover
//! run directory, and the caller's retry must succeed or say that it already happened.
#![cfg(feature = "failpoints")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use metald_api::v1 as pb;

const EVENT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Call {
    Create,
    Boot,
    Shutdown,
    Pause,
    Resume,
    Reboot,
    Delete,
    Snapshot,
    Migrate,
}

/// Where the VM should end up after the call, or `None` when it should be gone.
fn wanted(call: Call) -> Option<pb::VmState> {
    match call {
        Call::Create => Some(pb::VmState::Created),
        Call::Boot | Call::Resume | Call::Reboot | Call::Snapshot | Call::Migrate => {
            Some(pb::VmState::Running)
        }
        Call::Shutdown => Some(pb::VmState::Shutdown),
        Call::Pause => Some(pb::VmState::Paused),
        Call::Delete => None,
    }
}

async fn call(c: &mut Client, call: Call, vm: &str) -> Result<(), tonic::Status> {
    let id = vm.to_string();
    match call {
        Call::Create => c.create_vm(guest_request(vm)).await.map(|_| ()),
        Call::Boot => c
            .boot_vm(pb::BootVmRequest {
                vm_id: id,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        Call::Shutdown => c
            .shutdown_vm(pb::ShutdownVmRequest {
                vm_id: id,
                force: true,
                timeout_seconds: 0,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        Call::Pause => c
            .pause_vm(pb::PauseVmRequest {
                vm_id: id,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        Call::Resume => c
            .resume_vm(pb::ResumeVmRequest {
                vm_id: id,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        Call::Reboot => c
            .reboot_vm(pb::RebootVmRequest {
                vm_id: id,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        Call::Delete => c
            .delete_vm(pb::DeleteVmRequest {
                vm_id: id,
                force: true,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        Call::Snapshot => c
            .snapshot_vm(pb::SnapshotVmRequest {
                vm_id: id,
                diff: false,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        Call::Migrate => c
            .migrate_vm(pb::MigrateVmRequest {
                vm_id: id,
                ..Default::default()
            })
            .await
            .map(|_| ()),
    }
}

/// Puts the VM where `call` starts from.
async fn prepare(c: &mut Client, call: Call, vm: &str) {
    match call {
        Call::Create => {}
        Call::Boot => {
            c.create_vm(guest_request(vm)).await.unwrap();
        }
        Call::Migrate => {
            // A guest is moved once it has booted (one still booting is refused): a probed
            // guest that has answered.
            let mut req = guest_request(vm);
            req.config.as_mut().unwrap().guest_health = Some(pb::GuestHealthConfig {
                probe: pb::GuestProbe::Agent as i32,
                ..Default::default()
            });
            c.create_vm(req).await.unwrap();
            c.boot_vm(pb::BootVmRequest {
                vm_id: vm.into(),
                ..Default::default()
            })
            .await
            .unwrap();
            c.wait_guest_ready(pb::WaitGuestReadyRequest {
                vm_id: vm.into(),
                timeout_seconds: 60,
            })
            .await
            .unwrap();
        }
        Call::Resume => {
            running_vm(c, vm).await;
            c.pause_vm(pb::PauseVmRequest {
                vm_id: vm.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        _ => {
            running_vm(c, vm).await;
        }
    }
}

/// The VMMs running for `vm`.
fn vmms_of(d: &Daemon, vm: &str) -> Vec<i32> {
    let run_dir = d.run_dir(vm).display().to_string();
    d.vmm_pids()
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&format!("{run_dir}/")))
                .unwrap_or(false)
        })
        .collect()
}

async fn kill_at(point: &str, op: Call) {
    let vm = "cp";
    let mut d = Daemon::start_with_toml(
        "[recovery]\nenabled = true\nretry_interval = 100\n[reconcile]\ninterval = 500\nstray_grace = 1000\n",
    )
    .await;
    let mut c = d.client().await;
    prepare(&mut c, op, vm).await;
    // metald with the crash point armed.
    d.stop_with(libc::SIGKILL);
    d.env = vec![("FAILPOINTS".into(), format!("{point}=return"))];
    d.spawn().await;
    let mut c = d.client().await;
    let res = call(&mut c, op, vm).await;
    assert!(
        d.wait_exited(EVENT).await,
        "{point}: metald did not stop at the crash point ({res:?})"
    );
    // It comes back without it.
    d.env.clear();
    let mark = d.log_mark();
    d.spawn().await;
    let mut c = d.client().await;
    // The caller retries.
    let retry = call(&mut c, op, vm).await;
    match &retry {
        Ok(()) => {}
        Err(e) => assert!(
            matches!(
                e.code(),
                tonic::Code::AlreadyExists
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::NotFound
            ),
            "{point}/{op:?}: retry answered {e:?}"
        ),
    }
    // The VM converges to what was asked, with the right number of VMMs and nothing stray.
    let deadline = Instant::now() + EVENT;
    loop {
        let info = c
            .get_vm_info(pb::GetVmInfoRequest { vm_id: vm.into() })
            .await;
        let done = match (wanted(op), &info) {
            (None, Err(e)) => e.code() == tonic::Code::NotFound,
            (Some(s), Ok(i)) => i.get_ref().vm.as_ref().map(|v| v.state) == Some(s as i32),
            _ => false,
        };
        let want_vmms = usize::from(!matches!(wanted(op), None | Some(pb::VmState::Shutdown)));
        if done && vmms_of(&d, vm).len() == want_vmms {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{point}/{op:?}: VM is {:?}, VMMs {:?}",
            info.map(|i| i.into_inner().vm.map(|v| v.state)),
            vmms_of(&d, vm)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if wanted(op).is_none() {
        assert!(!d.run_dir(vm).exists(), "{point}: run directory left");
    }
    if op == Call::Migrate {
        // Whichever VMM was kept, it is the guest that was there: it never booted again.
        let text = std::fs::read_to_string(d.run_dir(vm).join("console.log")).unwrap();
        assert_eq!(
            text.matches("METALD-GUEST-READY").count(),
            1,
            "{point}: the guest booted again:\n{text}"
        );
    }
    if op == Call::Snapshot {
        // The snapshot the crash cut short is gone; the retry's is there, and recorded.
        let dirs: Vec<_> = std::fs::read_dir(d.state_dir.join("snapshots"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(dirs.len(), 1, "{point}: snapshot directories {dirs:?}");
    }
    // No stray survives the sweep, and none is found again.
    let r = c
        .reconcile(pb::ReconcileRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.strays_found, 0, "{point}/{op:?}: {r:?}");
    assert!(
        !d.logged(mark, vm, "stray vmm killed"),
        "{point}: a VMM was killed as a stray"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_killed_at_each_step() {
    kill_at("create.after_insert", Call::Create).await;
    kill_at("start.after_spawn", Call::Create).await;
    kill_at("start.after_configure", Call::Create).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_killed_at_each_step() {
    kill_at("lifecycle.after_desired", Call::Boot).await;
    kill_at("boot.after_vmm", Call::Boot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_killed_at_each_step() {
    kill_at("lifecycle.after_desired", Call::Reboot).await;
    kill_at("stop.after_exit", Call::Reboot).await;
    kill_at("reboot.after_stop", Call::Reboot).await;
    kill_at("start.after_spawn", Call::Reboot).await;
    kill_at("start.after_configure", Call::Reboot).await;
    kill_at("boot.after_vmm", Call::Reboot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_killed_at_each_step() {
    kill_at("lifecycle.after_desired", Call::Shutdown).await;
    kill_at("stop.after_exit", Call::Shutdown).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_killed_at_each_step() {
    kill_at("lifecycle.after_desired", Call::Pause).await;
    kill_at("pause.after_vmm", Call::Pause).await;
    kill_at("lifecycle.after_desired", Call::Resume).await;
    kill_at("resume.after_vmm", Call::Resume).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_killed_at_each_step() {
    kill_at("delete.after_desired", Call::Delete).await;
    kill_at("stop.after_exit", Call::Delete).await;
    kill_at("delete.after_stop", Call::Delete).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_killed_at_each_step() {
    kill_at("snapshot.after_pause", Call::Snapshot).await;
    kill_at("snapshot.after_write", Call::Snapshot).await;
    kill_at("snapshot.before_record", Call::Snapshot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_killed_at_each_step() {
    // Before the transfer, while QEMU moves the guest on its own, once the target holds it
    // (the source not yet stopped), and once the source is gone (the target not yet recorded):
    // one VMM is left, running the guest.
    kill_at("migrate.after_target", Call::Migrate).await;
    kill_at("migrate.in_transfer", Call::Migrate).await;
    kill_at("migrate.after_transfer", Call::Migrate).await;
    kill_at("migrate.after_source_stopped", Call::Migrate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_and_a_create_from_a_snapshot_killed_after_their_vmm_started() {
    // Recovery: the VMM dies, metald dies as its recovery starts the new one.
    let mut d = Daemon::start_with_toml(
        "[recovery]\nenabled = true\nretry_interval = 100\n[reconcile]\ninterval = 500\nstray_grace = 1000\n",
    )
    .await;
    let mut c = d.client().await;
    running_vm(&mut c, "rc").await;
    // Snapshot a guest that has finished booting, so that its clone has no boot left to do.
    let console = console_of(&info(&mut c, "rc").await);
    assert!(wait_console(&console, "METALD-GUEST-ALIVE", 1, Duration::from_secs(60)).await);
    let snap = c
        .snapshot_vm(pb::SnapshotVmRequest {
            vm_id: "rc".into(),
            diff: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for point in [
        "exit.after_record",
        "start.after_spawn",
        "start.after_configure",
    ] {
        let pid = pid_of(&info(&mut c, "rc").await).unwrap();
        d.stop_with(libc::SIGKILL);
        d.env = vec![("FAILPOINTS".into(), format!("{point}=return"))];
        d.spawn().await;
        signal(pid, libc::SIGKILL);
        assert!(
            d.wait_exited(EVENT).await,
            "{point}: metald did not stop in the recovery"
        );
        d.env.clear();
        d.spawn().await;
        c = d.client().await;
        let deadline = Instant::now() + EVENT;
        while state(&info(&mut c, "rc").await) != pb::VmState::Running
            || vmms_of(&d, "rc").len() != 1
        {
            assert!(
                Instant::now() < deadline,
                "{point}: rc did not come back: {:?}",
                vmms_of(&d, "rc")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // A create from a snapshot: the VM must come back from the snapshot, not from a boot.
    for (n, point) in ["start.after_spawn", "start.after_configure"]
        .iter()
        .enumerate()
    {
        let clone = format!("clone{n}");
        d.stop_with(libc::SIGKILL);
        d.env = vec![("FAILPOINTS".into(), format!("{point}=return"))];
        d.spawn().await;
        let mut c = d.client().await;
        let _ = c
            .create_vm(pb::CreateVmRequest {
                vm_id: clone.clone(),
                customer_id: "c".into(),
                config: None,
                from_snapshot: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await;
        assert!(
            d.wait_exited(EVENT).await,
            "{point}: metald did not stop in the create"
        );
        d.env.clear();
        d.spawn().await;
        let mut c = d.client().await;
        let deadline = Instant::now() + EVENT;
        while state(&info(&mut c, &clone).await) != pb::VmState::Created
            || vmms_of(&d, &clone).len() != 1
        {
            assert!(
                Instant::now() < deadline,
                "{point}: {clone} did not converge"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!info(&mut c, &clone).await.restore_from.is_empty());
    }
    let mut c = d.client().await;
    // Either clone was restored (before the crash or after it), not booted: the snapshot's
    // guest never prints its boot line again.
    for clone in ["clone0", "clone1"] {
        c.boot_vm(pb::BootVmRequest {
            vm_id: clone.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let i = info(&mut c, clone).await;
        assert_eq!(state(&i), pb::VmState::Running);
        let console = console_of(&i);
        assert!(wait_console(&console, "METALD-GUEST-ALIVE", 1, Duration::from_secs(60)).await);
        let text = std::fs::read_to_string(&console).unwrap();
        assert!(!text.contains("METALD-GUEST-READY"), "{clone}: {text}");
    }
    // The snapshot the clones came from is still in the store.
    assert!(std::path::Path::new(&snap.path).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_killed_between_a_save_and_its_stop() {
    let mut d = Daemon::start_with_toml(
        "[recovery]\nenabled = true\nretry_interval = 100\n[reconcile]\ninterval = 500\nstray_grace = 1000\n",
    )
    .await;
    let mut c = d.client().await;
    running_vm(&mut c, "dk").await;
    let console = console_of(&info(&mut c, "dk").await);
    assert!(wait_console(&console, "METALD-GUEST-ALIVE", 1, Duration::from_secs(60)).await);
    d.stop_with(libc::SIGKILL);
    d.env = vec![("FAILPOINTS".into(), "save.after_snapshot=return".into())];
    d.spawn().await;
    let mut c = d.client().await;
    let res = c
        .drain_host(pb::DrainHostRequest {
            deadline_seconds: 120,
        })
        .await;
    assert!(
        d.wait_exited(EVENT).await,
        "metald did not stop in the save ({res:?})"
    );
    d.env.clear();
    d.spawn().await;
    let mut c = d.client().await;
    // The save was never recorded: its image is removed, and the guest, still in its VMM, runs
    // on in that VMM (paused by the save, resumed now), as it did before the drain.
    let deadline = Instant::now() + EVENT;
    while state(&info(&mut c, "dk").await) != pb::VmState::Running || vmms_of(&d, "dk").len() != 1 {
        assert!(Instant::now() < deadline, "dk did not run again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!d.state_dir.join("saved/dk").exists());
    // The operator's retried drain saves it, and the undrain brings it back.
    let r = c
        .drain_host(pb::DrainHostRequest {
            deadline_seconds: 120,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.saved, vec!["dk".to_string()]);
    assert!(vmms_of(&d, "dk").is_empty());
    let mark = d.log_mark();
    c.undrain_host(pb::UndrainHostRequest {}).await.unwrap();
    d.wait_event(mark, "dk", "saved vm restored", EVENT).await;
    assert_eq!(vmms_of(&d, "dk").len(), 1);
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        !text.contains("METALD-GUEST-READY"),
        "the guest booted again: {text}"
    );
}
