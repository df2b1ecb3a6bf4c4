//! Re-attachment's look at one VM's VMM, before its controller starts: is the VMM its row
//! records still there and still this VM's (pid, start time, command line and an answering
//! control socket agree), or is there an unrecorded VMM with the VM's marker (metald died
//! between starting it and writing it down) that the VM should adopt? Only looks (and kills
//! a VMM that is ours but cannot be driven, through its pidfd); the controller records the
//! verdict as the first thing it does.

#[allow(clippy::wildcard_imports)]
use super::*;

use crate::process::{Pidfd, ProcInfo};

/// What re-attachment finds for `rec`: its recorded VMM checked, else (for a VM that wants to
/// run) the `unrecorded` VMM with its marker, if any (pid and start time).
pub async fn look(
    driver: &dyn VmmDriver,
    rec: &VmRecord,
    unrecorded: Option<(i32, u64)>,
    run_dir: &std::path::Path,
) -> Attach {
    let mut verdict = match &rec.endpoint {
        Some(_) => verify(driver, rec, run_dir).await,
        None => Attach::Nothing,
    };
    if let (Attach::Adopted(vmm, _), Some((pid, start))) = (&verdict, unrecorded) {
        // Two VMMs with the VM's marker: a migration that metald's death cut short. The one
        // that holds the guest stays. The source is asked to stop migrating first, so that its
        // answer is final: it still has the guest (the target goes), or it handed it over.
        let _ = vmm.cancel_migration().await;
        match vmm.ping().await {
            Ok(GuestRun::MigratedAway) => {
                info!(vm_id = %rec.vm_id, source = vmm.pid(), target = pid, "a cut-short migration had handed the guest over; its target is adopted");
                let _ = vmm.kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), vmm.pidfd().exited()).await;
                vmm.pidfd().reap();
                // The source has removed its sockets as it exited: the target's take the names.
                driver.promote_files(run_dir);
                verdict = Attach::Lost(OrphanReason::ProcessDead);
            }
            _ => {
                info!(vm_id = %rec.vm_id, source = vmm.pid(), target = pid, "a cut-short migration's target removed; the guest stays in its vmm");
                kill_unrecorded(pid, start).await;
                driver.discard_target(run_dir, &rec.spec);
                return verdict;
            }
        }
    }
    let wanted_up = matches!(
        rec.desired,
        Desired::State(Target::Created | Target::Running | Target::Paused)
    );
    if let (true, Some((pid, start)), Attach::Nothing | Attach::Lost(_)) =
        (wanted_up, unrecorded, &verdict)
    {
        // It may be a migration target whose source is gone (metald died after stopping the
        // source, before recording the target): its files take the VM's names first, or it
        // would be judged by its dead source's socket.
        driver.promote_files(run_dir);
        let mut found = rec.clone();
        found.endpoint = Some(driver.endpoint_for(&rec.vm_id, run_dir, pid, start));
        match verify(driver, &found, run_dir).await {
            // A VMM whose guest never started may not be configured yet (metald died between
            // spawning and configuring it): a fresh one is started in its place, which costs
            // the VM nothing.
            Attach::Adopted(vmm, GuestRun::NotStarted) => {
                let _ = vmm.kill();
                info!(vm_id = %rec.vm_id, pid, "unrecorded vmm that never started its guest replaced");
            }
            v @ Attach::Adopted(..) => {
                info!(vm_id = %rec.vm_id, pid, "unrecorded vmm with the vm's marker adopted");
                verdict = v;
            }
            _ => {}
        }
    }
    verdict
}

/// Kills the process `pid` if it is still the one that started at `start` (through a pidfd, so
/// a reused pid is never hit), and waits for it, bounded.
async fn kill_unrecorded(pid: i32, start: u64) {
    let Ok(fd) = Pidfd::open(pid) else { return };
    if ProcInfo::read(pid).is_some_and(|i| i.start_time == start) {
        let _ = fd.signal(libc::SIGKILL);
        let _ = tokio::time::timeout(Duration::from_secs(5), fd.exited()).await;
        fd.reap();
    }
}

/// Decides whether the VMM recorded for `rec` is still there and still ours.
async fn verify(driver: &dyn VmmDriver, rec: &VmRecord, run_dir: &std::path::Path) -> Attach {
    let Some(ep) = rec.endpoint.clone() else {
        return Attach::Nothing;
    };
    // Open the pidfd first, then check the start time: if the start time matches after the fd is
    // open, the fd refers to the recorded process and cannot be redirected by pid reuse.
    let Ok(pidfd) = Pidfd::open(ep.pid) else {
        return Attach::Lost(OrphanReason::ProcessDead);
    };
    let Some(info) = ProcInfo::read(ep.pid) else {
        return Attach::Lost(OrphanReason::ProcessDead);
    };
    if !info.is_alive() || pidfd.has_exited() {
        return Attach::Lost(OrphanReason::ProcessDead);
    }
    if info.start_time != ep.start_time || !driver.owns_cmdline(&rec.vm_id, &info.cmdline) {
        return Attach::Lost(OrphanReason::PidReused);
    }
    let vmm = driver.adopt(ep.clone(), pidfd, run_dir);
    if !ep.control_socket.exists() {
        let _ = vmm.kill();
        return Attach::Lost(OrphanReason::SocketUnreachable);
    }
    match vmm.ping().await {
        Ok(run) => Attach::Adopted(vmm, run),
        Err(_) => {
            // Ours, but not answering: it cannot be driven, so it is not adopted. It is killed
            // through the pidfd, which cannot hit another process.
            let _ = vmm.kill();
            Attach::Lost(OrphanReason::ApiUnresponsive)
        }
    }
}
