//! Moving a running (or paused) guest to a new VMM process without stopping it: an operator's
//! MigrateVm, a rolling upgrade onto a new VMM binary, and recovery from a VMM that is alive but
//! impaired (its control socket gone, its health checks slow).
//!
//! The migration runs inside the VM's controller like any operation, so nothing else touches
//! the VM meanwhile. Its order is what makes every failure safe:
//!
//! 1. the target VMM starts beside the running one (its files under `next-*` names, in the same
//!    cgroup, whose memory limit grows for the two);
//! 2. the driver moves the guest (QEMU: live migration over a unix socket; Firecracker: a
//!    snapshot on tmpfs loaded by the target). Until it ends, the source holds the guest: any
//!    failure, a target that dies, or a delete of the VM cancels it, the target is killed and
//!    the source runs on as before;
//! 3. only then is the source stopped, and the target promoted (its files renamed to the VM's
//!    VMM names), recorded, and watched.
//!
//! A metald killed between 2 and 3 leaves two VMMs with the VM's marker; re-attach
//! ([`super::look`]) keeps the one that holds the guest: the target when the source reports
//! its guest migrated away, else the source.

#[allow(clippy::wildcard_imports)]
use super::*;

use crate::driver::MigrationStats;
use crate::error::MigrationStep;

/// Why a migration runs, as its events and metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateReason {
    /// An operator asked (MigrateVm, a rolling upgrade).
    Operator,
    /// The VMM's control socket file disappeared: nothing but metald's held connection can
    /// reach that VMM any more, and a restart of metald could not adopt it.
    ControlSocketLost,
    /// The VMM answers its health checks, but slowly.
    SlowHealthChecks,
}

impl MigrateReason {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrateReason::Operator => "operator",
            MigrateReason::ControlSocketLost => "control_socket_lost",
            MigrateReason::SlowHealthChecks => "slow_health_checks",
        }
    }
}

/// What a migration did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// The VMM the guest left.
    pub old_pid: i32,
    /// The VMM the guest runs in now.
    pub new_pid: i32,
    /// From the start of the transfer until the guest ran again in the new VMM (or, for a
    /// paused guest, until the new VMM held it), as metald saw it, in ms: the guest's pause is
    /// at most this.
    pub handover_ms: u64,
    /// The whole migration, the target's start-up included, in ms.
    pub total_ms: u64,
    /// What the VMMs reported.
    pub stats: MigrationStats,
}

impl Controller {
    /// Moves the guest to a new VMM (running `binary`, or the VM's own), or leaves everything as
    /// it was and says which step failed.
    pub(super) async fn migrate(
        &mut self,
        binary: Option<PathBuf>,
        why: MigrateReason,
    ) -> Result<MigrationReport> {
        let was = self.rec.observed;
        if !matches!(was, VmState::Running | VmState::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "cannot migrate a vm that is {was}: only a running or paused guest moves"
            )));
        }
        if !self.rec.spec.nics.is_empty() {
            return Err(Error::FailedPrecondition(
                "cannot migrate a vm with network interfaces: its tap devices can be held by one \
                 VMM at a time"
                    .into(),
            ));
        }
        if let Some(why) = self.still_booting() {
            return Err(Error::FailedPrecondition(format!(
                "the guest is still booting ({why}); a migration waits until it has booted"
            )));
        }
        let Some(from) = self.vmm.take() else {
            return Err(Error::FailedPrecondition("the vm has no vmm".into()));
        };
        let started = Instant::now();
        // Deletes sent from here on cancel the migration.
        self.deletes.mark_unchanged();
        let res = self.migrate_from(&from, binary.as_deref(), was).await;
        match res {
            Ok((to, handover, stats)) => {
                self.finish_migration(from, to, binary, why, started, handover, stats)
                    .await
            }
            Err((step, reason)) => {
                // The source keeps the guest; if it died meanwhile, the loop sees its exit next.
                self.vmm = Some(from);
                self.env.metrics.migration(false);
                let msg = format!("{step}: {reason}");
                self.env
                    .emit(
                        &self.rec,
                        EventKind::MigrationFailed,
                        was,
                        was,
                        why.as_str(),
                        &msg,
                    )
                    .await;
                warn!(vm_id = %self.rec.vm_id, step = step.as_str(), reason = why.as_str(), error = %reason, "vm migration failed; the guest stays in its vmm");
                Err(Error::MigrationFailed { step, reason })
            }
        }
    }

    /// Steps 1 and 2: the target started and holding the guest, or the step that failed (the
    /// target removed, the source holding the guest as it was).
    async fn migrate_from(
        &mut self,
        from: &Vmm,
        binary: Option<&Path>,
        was: VmState,
    ) -> std::result::Result<(Vmm, Duration, MigrationStats), (MigrationStep, String)> {
        let run_dir = self.run_dir();
        let driver = self.env.driver.clone();
        let spec = self.rec.spec.clone();
        let req = SpawnRequest {
            vm_id: &self.rec.vm_id,
            spec: &spec,
            run_dir: &run_dir,
            restore: None,
            migration_target: true,
            binary: binary.or(spec.vmm_binary.as_deref()),
        };
        // Not raced against a delete: a spawn is bounded (`spawn_timeout`), and one dropped
        // half-way could leave a process behind. A delete sent meanwhile is seen right after.
        let to = match driver.spawn(&req).await {
            Ok(to) => to,
            Err(e) => {
                driver.discard_target(&run_dir, &spec);
                return Err((MigrationStep::StartTarget, e.to_string()));
            }
        };
        info!(vm_id = %self.rec.vm_id, from = from.pid(), to = to.pid(), "migration target started");
        crate::crash_point!("migrate.after_target");
        let transfer = Instant::now();
        let moved = if self.deletes.has_changed().unwrap_or(false) {
            Err((MigrationStep::Cancelled, "the vm is being deleted".into()))
        } else {
            tokio::select! {
                r = driver.migrate(from, &to, &spec) => r.map_err(|e| (MigrationStep::Transfer, e.to_string())),
                _ = from.pidfd().exited() => Err((MigrationStep::Transfer, "the source VMM exited".into())),
                _ = to.pidfd().exited() => Err((MigrationStep::Transfer, format!("the target VMM exited: {}", to.pidfd().reap()))),
                _ = self.deletes.changed() => Err((MigrationStep::Cancelled, "the vm is being deleted".into())),
            }
        };
        let (step, mut reason) = match moved {
            Ok(stats) => {
                crate::crash_point!("migrate.after_transfer");
                // A driver that hands the guest over paused (a snapshot's load) leaves it to be
                // resumed here; the source never runs it again.
                if was == VmState::Running
                    && matches!(to.ping().await, Ok(GuestRun::Paused | GuestRun::NotStarted))
                    && let Err(e) = to.resume().await
                {
                    (
                        MigrationStep::Transfer,
                        format!("resuming the guest in the target: {e}"),
                    )
                } else {
                    return Ok((to, transfer.elapsed(), stats));
                }
            }
            Err(f) => f,
        };
        // A target that ended on its own said why in its log (QEMU: a stream it could not
        // load); the error carries that, not only what the failed exchange saw.
        let exited = step == MigrationStep::Transfer
            && tokio::time::timeout(Duration::from_millis(200), to.pidfd().exited())
                .await
                .is_ok();
        if exited {
            let log = run_dir.join(crate::driver::target_log_name());
            let tail = crate::driver::log_tail(&log, 300);
            if !tail.is_empty() {
                reason = format!("{reason}; the target VMM exited: {tail}");
            }
        }
        // Undo: stop the transfer, remove the target, and make sure the source runs its guest
        // as before (QEMU resumes a source whose migration failed; a snapshot paused it).
        let _ = from.cancel_migration().await;
        let _ = to.kill();
        let _ = tokio::time::timeout(KILL_WAIT, to.pidfd().exited()).await;
        to.pidfd().reap();
        driver.discard_target(&run_dir, &spec);
        if was == VmState::Running
            && !from.pidfd().has_exited()
            && matches!(
                from.ping().await,
                Ok(GuestRun::Paused | GuestRun::MigratedAway)
            )
            && let Err(e) = from.resume().await
        {
            warn!(vm_id = %self.rec.vm_id, error = %e, "resuming the guest in its vmm after a failed migration failed");
        }
        Err((step, reason))
    }

    /// Step 3: the source stopped, the target promoted, recorded and watched.
    #[allow(clippy::too_many_arguments)]
    async fn finish_migration(
        &mut self,
        from: Vmm,
        to: Vmm,
        binary: Option<PathBuf>,
        why: MigrateReason,
        started: Instant,
        handover: Duration,
        stats: MigrationStats,
    ) -> Result<MigrationReport> {
        let old_pid = from.pid();
        // The source holds a stale copy of the guest: it is stopped before anything else, and
        // before the target's files take its names. It is killed, not asked to quit: a QEMU
        // that quits removes the sockets it bound, by the names it bound them under, and a
        // source that was itself a promoted target bound `next-*`, the names the new target's
        // sockets have now. Nothing is lost: its disks were flushed and handed over when the
        // migration completed.
        let _ = from.kill();
        let _ = exited_within(&from, KILL_WAIT).await;
        let status = from.pidfd().reap();
        drop(from);
        crate::crash_point!("migrate.after_source_stopped");
        let vmm = self.env.driver.promote(to, &self.rec.spec);
        let ep = vmm.endpoint().clone();
        self.vmm = Some(vmm);
        self.rec.endpoint = Some(ep.clone());
        self.rec.health.pid = Some(ep.pid);
        self.rec.health.control_socket = ep.control_socket.display().to_string();
        self.rec.health.last_activity_ms = now_ms();
        self.last_seen_ms = now_ms();
        self.next_check = next_check_after(Instant::now(), &self.env.health);
        // The new VMM's events and guest agent; the old ones went with its process.
        self.vmm_events = None;
        self.attach_vmm().await;
        if let Some(b) = binary.filter(|b| self.rec.spec.vmm_binary.as_ref() != Some(b)) {
            // Later VMMs of this VM (a restart, a recovery) run the binary it moved onto.
            let mut spec = self.rec.spec.clone();
            spec.vmm_binary = Some(b);
            // The guest has moved whatever the registry says: a refused write is not the
            // migration's failure. The binary is kept in memory for this metald's later VMMs.
            if let Err(e) = self
                .env
                .store
                .set_spec(&self.env.writer, &self.rec.vm_id, &spec)
                .await
            {
                warn!(vm_id = %self.rec.vm_id, error = %e, "recording the vm's new vmm binary failed; a restarted metald would start its next vmm on the old one");
            }
            self.rec.spec = spec;
        }
        let state = self.rec.observed;
        self.set_observed(state, Cause::Migrated).await?;
        let report = MigrationReport {
            old_pid,
            new_pid: ep.pid,
            handover_ms: u64::try_from(handover.as_millis()).unwrap_or(u64::MAX),
            total_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            stats,
        };
        let m = &self.env.metrics;
        m.migration(true);
        m.migration_handover.observe(handover.as_secs_f64());
        let memory = if report.stats.shared_memory {
            "shared"
        } else {
            "copied"
        };
        self.env
            .emit(
                &self.rec,
                EventKind::Migrated,
                state,
                state,
                why.as_str(),
                &format!(
                    "pid {old_pid} -> {}; handover {} ms (vmm downtime {} ms), {} bytes sent, memory {memory}, total {} ms",
                    report.new_pid, report.handover_ms, report.stats.downtime_ms, report.stats.bytes, report.total_ms
                ),
            )
            .await;
        info!(
            vm_id = %self.rec.vm_id,
            old_pid,
            new_pid = report.new_pid,
            reason = why.as_str(),
            handover_ms = report.handover_ms,
            vmm_downtime_ms = report.stats.downtime_ms,
            bytes = report.stats.bytes,
            memory,
            total_ms = report.total_ms,
            old_exit = %status,
            "vm migrated to a new vmm"
        );
        Ok(report)
    }
}

/// How long an unprobed guest is taken to be booting after its kernel started.
const BOOTING: Duration = Duration::from_secs(3);

impl Controller {
    /// Why the guest is taken to be still booting, if it is: a probed guest until it first
    /// answers, an unprobed one for [`BOOTING`] after its start. A guest moved in its first
    /// fraction of a second can crash in its new VMM: measured here under TCG (QEMU 7.2), a
    /// kernel migrated 0.2 s into its boot died with a NULL pointer dereference in the target,
    /// every time, while one migrated after booting never did.
    fn still_booting(&self) -> Option<String> {
        if self.rec.observed != VmState::Running {
            return None;
        }
        if self.probed() {
            return (!self.rec.guest.ready).then(|| "it has not answered its agent yet".into());
        }
        let since = self.booted_at?.elapsed();
        (since < BOOTING).then(|| format!("it started {} ms ago", since.as_millis()))
    }

    /// Why the VMM, alive and answering, should be replaced by a migration now, if it should.
    pub(super) fn impairment(&self) -> Option<MigrateReason> {
        let cfg = &self.env.health;
        // Asked after every health check of every VM: the reasons (two fields) come first,
        // and are almost always absent.
        let why = if self.socket_missing {
            MigrateReason::ControlSocketLost
        } else if self.slow_checks >= cfg.failure_threshold.max(1) {
            MigrateReason::SlowHealthChecks
        } else {
            return None;
        };
        // A replacement is a recovery: off where recovery is (host-wide, for this VM, or in
        // maintenance).
        let movable = cfg.replace_impaired
            && self.env.gate.config().enabled
            && self.rec.spec.auto_recover
            && self.env.host.recovery_allowed()
            && self.vmm.is_some()
            && matches!(self.rec.observed, VmState::Running | VmState::Paused)
            && self.rec.spec.nics.is_empty()
            && self.replace_after.is_none_or(|(t, _)| Instant::now() >= t);
        movable.then_some(why)
    }

    /// Recovers an impaired VMM by moving its guest to a new one: a recovery whose method is
    /// `migrate`, recorded in the VM's recovery history and metrics like a restart. A failure
    /// leaves the guest where it is, still served by the held connection, and is tried again
    /// after the recovery backoff.
    pub(super) async fn replace_impaired(&mut self, why: MigrateReason) {
        warn!(vm_id = %self.rec.vm_id, reason = why.as_str(), "vmm impaired; moving its guest to a new vmm");
        let started_ms = now_ms();
        let res = self.migrate(None, why).await;
        let failures = match &res {
            Ok(_) => {
                self.replace_after = None;
                self.slow_checks = 0;
                0
            }
            Err(_) => self.replace_after.map_or(0, |(_, n)| n) + 1,
        };
        if failures > 0 {
            // The first retry waits too (attempt 2 of the schedule): the VMM still serves its guest.
            let wait = self.env.gate.backoff(failures + 1);
            self.replace_after = Some((Instant::now() + wait, failures));
        }
        self.record_attempt(AttemptRecord {
            attempt: failures.max(1),
            started_at_ms: started_ms,
            duration_ms: (now_ms() - started_ms).max(0),
            succeeded: res.is_ok(),
            error: res
                .as_ref()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
            trigger: why.as_str().to_string(),
            method: "migrate".into(),
        })
        .await;
    }
}
