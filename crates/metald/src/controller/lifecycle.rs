//! Lifecycle, as its controller drives it: the operations callers send (create, boot, pause,
//! snapshot, save, delete …), the reconcile that drives the VMM toward the desired state, and the
//! checked writes of the VM's row, events and published record.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Controller {
    pub(super) async fn handle(&mut self, op: Op) -> Result<OpResult> {
        let mut did = Did::default();
        let mut guest_info = None;
        let mut snapshot = None;
        let mut migration = None;
        match op {
            Op::Create { restore, insert } => {
                // The driver checks what only it knows (the kernel format its VMM boots, files
                // its jailed user must open) before anything is stored or started.
                if let Err(e) = self.env.driver.validate_spec(&self.rec.spec) {
                    return Err(match e {
                        DriverError::InvalidSpec { field, reason } => Error::invalid(field, reason),
                        other => other.into(),
                    });
                }
                if insert {
                    // The insert is the point of no return for the id: a duplicate fails here,
                    // before any file of an existing VM could be touched.
                    self.env
                        .store
                        .insert(&self.env.writer, self.rec.clone())
                        .await?;
                    crate::crash_point!("create.after_insert");
                }
                if restore.is_some() {
                    self.start_trigger = "restore";
                }
                self.restore_from = restore;
                if let Err(e) = self.reconcile(None).await {
                    warn!(vm_id = %self.rec.vm_id, error = %e, "create failed; removing the vm");
                    if let Err(cleanup) = self.teardown(None).await {
                        warn!(vm_id = %self.rec.vm_id, error = %cleanup, "cleanup after failed create");
                    }
                    return Err(e);
                }
            }
            Op::Lifecycle { op, graceful } => {
                let to = self.rec.observed.apply(op)?;
                let target = Target::from_state(to).ok_or_else(|| {
                    Error::FailedPrecondition(format!("{} cannot be asked for", to.as_str()))
                })?;
                // An operator's command supersedes any automatic recovery in progress.
                self.cancel_recovery();
                if matches!(self.rec.observed, VmState::Orphaned | VmState::Failed) {
                    self.rec.recovery_streak = 0;
                    self.crashes = 0;
                }
                let before = self.rec.desired;
                self.set_desired(Desired::State(target)).await?;
                crate::crash_point!("lifecycle.after_desired");
                if op == Transition::Reboot {
                    // With -no-reboot (QEMU) or by design (Firecracker) a guest reset ends the VMM
                    // process, so a reboot is a supervised restart: stop this VMM, then reconcile
                    // starts a fresh one with the same config.
                    info!(vm_id = %self.rec.vm_id, "rebooting: restarting the vmm");
                    self.stop_vmm(None, "reboot").await?;
                    crate::crash_point!("reboot.after_stop");
                    self.env.metrics.restarted("reboot");
                }
                if let Err(e) = self.reconcile(graceful).await {
                    // The VMM refused (a kernel it cannot load, say): nothing changed, so the
                    // VM's desired state stays what it was rather than one it cannot reach.
                    if matches!(e, Error::Driver(crate::driver::DriverError::Refused { .. })) {
                        self.set_desired(before).await?;
                    }
                    return Err(e);
                }
            }
            Op::Delete { graceful } => {
                self.cancel_recovery();
                self.set_desired(Desired::Deleted).await?;
                crate::crash_point!("delete.after_desired");
                self.teardown(graceful).await?;
                self.env.events.announce(
                    self.rec.vm_id.as_str(),
                    &self.rec.customer_id,
                    EventKind::Deleted,
                    "vm deleted",
                );
                info!(vm_id = %self.rec.vm_id, "vm deleted");
            }
            Op::Recover => {
                self.rec.observed.apply(Transition::Recover)?;
                self.cancel_recovery();
                self.rec.recovery_streak = 0;
                self.crashes = 0;
                self.trigger = Trigger::Manual;
                info!(vm_id = %self.rec.vm_id, "manual recovery requested");
                self.attempt_recovery(true).await?;
            }
            Op::SetAutoRecover(on) => {
                if self.rec.spec.auto_recover != on {
                    let mut spec = self.rec.spec.clone();
                    spec.auto_recover = on;
                    self.env
                        .store
                        .set_spec(&self.env.writer, &self.rec.vm_id, &spec)
                        .await?;
                    self.rec.spec = spec;
                    info!(vm_id = %self.rec.vm_id, auto_recover = on, "auto recovery changed");
                }
                if on {
                    if self.rec.observed == VmState::Orphaned {
                        let reason = self.orphan_trigger();
                        self.schedule_recovery(reason).await;
                    }
                } else {
                    self.cancel_recovery();
                }
            }
            Op::Reconcile => {
                // Events the registry refused while it could not be written go in first, in
                // order (the first controller visited writes them all).
                self.env.events.flush(&self.env.writer).await;
                did = self.reconcile_pass().await;
            }
            Op::Snapshot { dest, diff, record } => {
                snapshot = Some(self.snapshot_recorded(dest, diff, *record).await?);
            }
            Op::Save { dest } => self.save_guest(&dest).await?,
            Op::GuestInfo => guest_info = Some(self.guest_info().await?),
            Op::DeleteSnapshot { snapshot_id } => {
                let snap = self
                    .env
                    .store
                    .snapshot(&snapshot_id)
                    .await?
                    .filter(|s| s.vm_id == self.rec.vm_id.as_str())
                    .ok_or_else(|| {
                        Error::invalid(
                            "snapshot_id",
                            format!("{snapshot_id:?} is not a snapshot of this vm"),
                        )
                    })?;
                self.remove_snapshot(&snap).await?;
            }
            Op::Migrate { binary } => {
                migration = Some(self.migrate(binary, MigrateReason::Operator).await?);
            }
        }
        Ok(OpResult {
            rec: self.rec.clone(),
            did,
            guest_info,
            snapshot,
            migration,
        })
    }

    /// A snapshot into `dest`, made here and removed again if the snapshot fails, then
    /// recorded: the files and the record are this VM's, so its controller writes both.
    pub(super) async fn snapshot_recorded(
        &mut self,
        dest: PathBuf,
        diff: bool,
        mut record: SnapshotRecord,
    ) -> Result<SnapshotRecord> {
        std::fs::create_dir_all(&dest)
            .map_err(|e| Error::io(format!("creating {}", dest.display()), e))?;
        if let Err(e) = self.snapshot(&dest, diff).await {
            let _ = std::fs::remove_dir_all(&dest);
            return Err(e);
        }
        crate::crash_point!("snapshot.before_record");
        record.spec = self.rec.spec.clone();
        record.spec.vmm = Some(self.env.vmm_kind);
        record.size_bytes = snapshots::dir_size(&dest);
        self.env
            .store
            .insert_snapshot(&self.env.writer, record.clone())
            .await?;
        if record.boot {
            self.remove_other_boot_snapshots(&record.snapshot_id).await;
        }
        Ok(record)
    }

    /// Pauses the guest (if running), has the driver write the snapshot, and resumes it.
    pub(super) async fn snapshot(&mut self, dest: &std::path::Path, diff: bool) -> Result<()> {
        let was = self.rec.observed;
        if !matches!(was, VmState::Running | VmState::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "cannot snapshot a vm that is {was}"
            )));
        }
        let Some(ctl) = self.vmm.as_ref().map(Vmm::control) else {
            return Err(Error::FailedPrecondition("the vm has no vmm".into()));
        };
        let base = match (diff, &self.snapshot_base) {
            (false, _) => None,
            (true, Some(b)) if b.exists() => Some(b.clone()),
            (true, _) => {
                return Err(Error::FailedPrecondition(
                    "a diff snapshot holds only what changed since this VMM's last snapshot, and \
                     this VMM has none (or it was deleted): take a full snapshot first"
                        .into(),
                ));
            }
        };
        if was == VmState::Running {
            ctl.pause().await?;
            self.set_observed(VmState::Paused, Cause::Paused).await?;
        }
        crate::crash_point!("snapshot.after_pause");
        let started = Instant::now();
        let res = ctl.snapshot(dest, base.as_deref()).await;
        crate::crash_point!("snapshot.after_write");
        // Whatever the outcome, the VMM's dirty-page log was reset or is in doubt: only a
        // snapshot that was written whole can be the next diff's base.
        self.snapshot_base = res.is_ok().then(|| dest.to_path_buf());
        if was == VmState::Running {
            // Resume even when the snapshot failed: the guest must not stay paused by accident.
            ctl.resume().await?;
            self.guest_resumed();
            self.set_observed(VmState::Running, Cause::Ran).await?;
        }
        res?;
        info!(vm_id = %self.rec.vm_id, path = %dest.display(), duration_ms = crate::model::ms(started.elapsed()), "vm snapshot written");
        Ok(())
    }

    /// Saves the guest to `dest` (a full snapshot: QEMU's migration stream, Firecracker's
    /// snapshot) and stops its VMM. Until its next start the VM is SHUTDOWN with no VMM, wants
    /// what it wanted, and records where its guest is; that start restores the guest, which
    /// carries on where it was. A save that fails leaves the guest running as it was.
    pub(super) async fn save_guest(&mut self, dest: &std::path::Path) -> Result<()> {
        let was = self.rec.observed;
        if !matches!(was, VmState::Running | VmState::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "cannot save a vm that is {was}"
            )));
        }
        let Some(ctl) = self.vmm.as_ref().map(Vmm::control) else {
            return Err(Error::FailedPrecondition("the vm has no vmm".into()));
        };
        if was == VmState::Running {
            ctl.pause().await?;
        }
        let started = Instant::now();
        if let Err(e) = ctl.snapshot(dest, None).await {
            if was == VmState::Running {
                ctl.resume().await?;
                self.guest_resumed();
            }
            return Err(e.into());
        }
        self.rec.saved = Some(dest.to_path_buf());
        crate::crash_point!("save.after_snapshot");
        self.stop_vmm(None, "saved by a host drain").await?;
        self.env
            .emit(
                &self.rec,
                EventKind::Saved,
                was,
                VmState::Shutdown,
                "host_drain",
                &dest.display().to_string(),
            )
            .await;
        info!(vm_id = %self.rec.vm_id, path = %dest.display(), duration_ms = crate::model::ms(started.elapsed()), "vm saved");
        Ok(())
    }

    /// One reconcile-loop visit: catches an exit whose event was missed, schedules recovery for
    /// an orphan nobody is recovering (one found at start-up, say), and drives a VM stuck short
    /// of its desired state there.
    pub(super) async fn reconcile_pass(&mut self) -> Did {
        let mut did = Did::default();
        if self.unsaved {
            // The registry refused an earlier write; try again with everything.
            let _ = self.save().await;
        }
        if self.vmm.as_ref().is_some_and(|v| v.pidfd().has_exited()) {
            did.missed_exit = true;
            self.on_unexpected_exit().await;
        }
        if self.vmm.is_none() {
            // A control socket with no VMM behind it (one killed while metald was down) would
            // make the next start's readiness check pass too early. This controller starts the
            // VM's VMMs itself, so with none running, none can be starting.
            let sock = self.env.driver.control_socket(&self.run_dir());
            if std::fs::symlink_metadata(&sock).is_ok() && std::fs::remove_file(&sock).is_ok() {
                did.stale_socket_removed = true;
                info!(vm_id = %self.rec.vm_id, path = %sock.display(), "stale control socket removed");
            }
        }
        let Desired::State(want) = self.rec.desired else {
            return did;
        };
        let want = want.state();
        let idle = self.retry_at.is_none() && self.permit.is_none();
        match self.rec.observed {
            VmState::Orphaned if idle && want != VmState::Shutdown => {
                let reason = self.orphan_trigger();
                did.scheduled = self.schedule_recovery(reason).await;
            }
            VmState::Created | VmState::Running | VmState::Paused
                if self.vmm.is_some() && want != self.rec.observed =>
            {
                if self.converge_waits() {
                    return did;
                }
                info!(vm_id = %self.rec.vm_id, observed = %self.rec.observed, desired = %want, "converging a vm stuck short of its desired state");
                let res = self.reconcile(None).await;
                did.converged = self.converge_done(res);
            }
            VmState::Orphaned | VmState::Failed if want == VmState::Shutdown => {
                did.converged = self
                    .set_observed(VmState::Shutdown, Cause::Stopped)
                    .await
                    .is_ok();
            }
            // No VMM where the caller wants one: a metald killed between the steps of an
            // operation (a reboot's stop and its new start, a create's row and its VMM) left the
            // VM short of what was asked. Start it, unless the host is in maintenance.
            VmState::Shutdown | VmState::Created
                if idle && self.vmm.is_none() && want != VmState::Shutdown =>
            {
                if !self.env.host.recovery_allowed() {
                    info!(vm_id = %self.rec.vm_id, observed = %self.rec.observed, desired = %want, "host in maintenance; vm left short of its desired state");
                    return did;
                }
                if self.converge_waits() {
                    return did;
                }
                info!(vm_id = %self.rec.vm_id, observed = %self.rec.observed, desired = %want, "converging a vm with no vmm to its desired state");
                let res = self.reconcile(None).await;
                did.converged = self.converge_done(res);
            }
            _ => {}
        }
        did
    }

    /// Drives the VMM from its observed state toward the desired state. Idempotent: calling it
    /// again when they agree does nothing.
    pub async fn reconcile(&mut self, graceful: Option<Duration>) -> Result<()> {
        let want = match self.rec.desired {
            Desired::Deleted => return self.teardown(graceful).await,
            Desired::State(t) => t.state(),
        };
        if want == VmState::Shutdown {
            if self.vmm.is_some() {
                self.stop_vmm(graceful, "shutdown requested").await?;
            } else if self.rec.observed != VmState::Shutdown {
                self.rec.orphan_reason = None;
                self.rec.orphaned_at_ms = None;
                self.set_observed(VmState::Shutdown, Cause::Stopped).await?;
            }
            return Ok(());
        }
        if self.vmm.is_none() {
            self.start_vmm().await?;
        }
        let result = self.converge_running_vmm(want).await;
        if result.is_ok()
            && self.rec.saved.is_some()
            && matches!(self.rec.observed, VmState::Running | VmState::Paused)
        {
            // The saved guest runs again: a drain's saved state is spent (a snapshot the VM
            // was made from belongs to the snapshot store and stays).
            if let Some(dir) = self.rec.saved.take() {
                let drained = dir
                    .parent()
                    .and_then(|p| p.file_name())
                    .is_some_and(|n| n == "saved");
                if drained {
                    let _ = std::fs::remove_dir_all(&dir);
                    info!(vm_id = %self.rec.vm_id, path = %dir.display(), "saved vm restored");
                } else {
                    info!(vm_id = %self.rec.vm_id, path = %dir.display(), "vm made from a snapshot runs");
                }
            }
            self.save().await?;
        }
        if let Err(e) = &result {
            // A VMM that closed its connection mid-command is usually dying (killed at its
            // cgroup's memory limit, say): its exit, if it comes, is an exit like any other,
            // with its cause recorded and the VM recovered, not a stop of metald's.
            let dying = matches!(
                e,
                Error::Driver(
                    DriverError::Closed
                        | DriverError::Socket {
                            unreachable: true,
                            ..
                        }
                )
            );
            if dying
                && let Some(vmm) = self.vmm.as_ref()
                && exited_within(vmm, Duration::from_millis(500)).await
            {
                self.on_unexpected_exit().await;
                return result;
            }
            // A VMM that cannot be driven to the desired state is stopped rather than left
            // half-way, so the registry never claims a state the VMM is not in.
            warn!(vm_id = %self.rec.vm_id, error = %e, "vmm did not reach {want}; stopping it");
            self.stop_vmm(None, "failed to converge").await?;
        }
        result
    }

    pub(super) async fn converge_running_vmm(&mut self, want: VmState) -> Result<()> {
        let Some(ctl) = self.vmm.as_ref().map(Vmm::control) else {
            return Ok(());
        };
        let mut now = self.rec.observed;
        if want != VmState::Created && now == VmState::Created {
            ctl.boot().await?;
            crate::crash_point!("boot.after_vmm");
            self.guest_starting();
            now = VmState::Running;
        }
        match (want, now) {
            (VmState::Paused, VmState::Running) => {
                ctl.pause().await?;
                crate::crash_point!("pause.after_vmm");
                now = VmState::Paused;
            }
            (VmState::Running, VmState::Paused) => {
                ctl.resume().await?;
                crate::crash_point!("resume.after_vmm");
                self.guest_resumed();
                now = VmState::Running;
            }
            _ => {}
        }
        if now != self.rec.observed {
            let cause = if now == VmState::Paused {
                Cause::Paused
            } else {
                Cause::Ran
            };
            self.set_observed(now, cause).await?;
        }
        Ok(())
    }

    /// Spawns and configures a fresh VMM (guest not booted), recording it before anything else
    /// happens to it.
    pub(super) async fn start_vmm(&mut self) -> Result<()> {
        let run_dir = self.run_dir();
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| Error::io(format!("creating {}", run_dir.display()), e))?;
        let driver = self.env.driver.clone();
        // A guest saved by a host drain comes back from where it was saved, not from a boot.
        let restore = self.restore_from.take().or_else(|| self.rec.saved.clone());
        let req = SpawnRequest {
            vm_id: &self.rec.vm_id,
            spec: &self.rec.spec,
            run_dir: &run_dir,
            restore: restore.as_deref(),
            migration_target: false,
            binary: self.rec.spec.vmm_binary.as_deref(),
        };
        let vmm = driver.spawn(&req).await?;
        crate::crash_point!("start.after_spawn");
        info!(vm_id = %self.rec.vm_id, pid = vmm.pid(), vmm = driver.kind(), "vmm started");
        let ep = vmm.endpoint().clone();
        let ctl = vmm.control();
        self.vmm = Some(vmm);
        self.console = None;
        self.console_from_end = false;
        self.attach_vmm().await;
        self.last_seen_ms = now_ms();
        self.rec.endpoint = Some(ep.clone());
        if self.rec.observed == VmState::Orphaned {
            // The VM is coming back from being orphaned.
            self.rec.health.recovery_count += 1;
        }
        self.rec.orphan_reason = None;
        self.rec.orphaned_at_ms = None;
        let h = &mut self.rec.health;
        h.is_healthy = true;
        h.consecutive_failures = 0;
        h.consecutive_successes = 0;
        h.last_error.clear();
        h.pid = Some(ep.pid);
        h.control_socket = ep.control_socket.display().to_string();
        h.last_activity_ms = self.last_seen_ms;
        self.next_check = next_check_after(Instant::now(), &self.env.health);
        self.set_observed(VmState::Created, Cause::Started).await?;
        let prepared = match &restore {
            Some(dir) => ctl.restore(&self.rec.spec, dir).await,
            None => ctl.configure(&self.rec.spec).await,
        };
        crate::crash_point!("start.after_configure");
        self.snapshot_base = restore.filter(|_| prepared.is_ok());
        if let Err(e) = prepared {
            self.stop_vmm(None, "configure failed").await?;
            return Err(e.into());
        }
        Ok(())
    }

    /// Stops the VMM: a guest power-off bounded by `graceful`, then the VMM's own quit, then
    /// SIGKILL. Each step waits on the pidfd, not on a sleep.
    pub(super) async fn stop_vmm(&mut self, graceful: Option<Duration>, why: &str) -> Result<()> {
        let Some(vmm) = self.vmm.as_ref() else {
            return Ok(());
        };
        let pid = vmm.pid();
        let started = Instant::now();
        let mut how = "killed";
        if let Some(grace) = graceful.filter(|_| self.rec.observed == VmState::Running) {
            // A guest whose agent answers is asked through it first (an orderly shutdown of its
            // services, as `guest-shutdown` does); otherwise, or if the agent refuses, through
            // the ACPI power button.
            let by_agent = match self.agent.as_ref().filter(|_| self.rec.guest.ready) {
                Some(agent) => match agent.shutdown().await {
                    Ok(()) => true,
                    Err(e) => {
                        debug!(vm_id = %self.rec.vm_id, error = %e, "guest agent shutdown failed; using the power button");
                        false
                    }
                },
                None => false,
            };
            let requested = if by_agent {
                Ok(())
            } else {
                vmm.shutdown().await
            };
            match requested {
                Ok(()) if exited_within(vmm, grace).await => {
                    how = if by_agent {
                        "guest powered off through its agent"
                    } else {
                        "guest powered off"
                    }
                }
                Ok(()) => debug!(vm_id = %self.rec.vm_id, "guest did not power off in time"),
                Err(e) => debug!(vm_id = %self.rec.vm_id, error = %e, "power-off request failed"),
            }
        }
        if !vmm.pidfd().has_exited() {
            match vmm.quit().await {
                Ok(()) if exited_within(vmm, QUIT_WAIT).await => how = "vmm quit",
                _ => {}
            }
        }
        if !vmm.pidfd().has_exited() {
            vmm.kill()?;
            if !exited_within(vmm, KILL_WAIT).await {
                return Err(DriverError::Timeout {
                    what: format!("SIGKILL of pid {pid}"),
                    millis: KILL_WAIT.as_millis(),
                }
                .into());
            }
        }
        let status = vmm.pidfd().reap();
        crate::crash_point!("stop.after_exit");
        info!(
            vm_id = %self.rec.vm_id,
            pid,
            reason = why,
            how,
            exit = %status,
            duration_ms = crate::model::ms(started.elapsed()),
            "vmm stopped"
        );
        self.vmm = None;
        self.forget_vmm().await;
        self.rec.last_exit = Some(format!("{status} ({why})"));
        self.set_observed(VmState::Shutdown, Cause::Stopped).await
    }

    /// Forgets a VMM that is gone (its process taken and reaped by the caller): no endpoint, no
    /// pid, and whatever the driver keeps outside the run directory (a jail) released.
    pub(super) async fn forget_vmm(&mut self) {
        self.snapshot_base = None;
        self.env
            .driver
            .release(&self.rec.vm_id, &self.run_dir())
            .await;
        self.rec.endpoint = None;
        self.rec.health.pid = None;
        // The agent task and the control connection belonged to that VMM.
        self.agent = None;
        self.probes = None;
        self.vmm_events = None;
        self.ready_deadline = None;
        self.guest_started = None;
        self.socket_missing = false;
        self.socket_looked_at = None;
        self.console = None;
        self.rec.guest.ready = false;
        self.rec.guest.consecutive_failures = 0;
    }

    /// Removes everything of the VM: its VMM, its run directory, then its row. The row goes last
    /// so that a crash part-way leaves a `deleted` tombstone that the next start finishes.
    pub(super) async fn teardown(&mut self, graceful: Option<Duration>) -> Result<()> {
        self.stop_vmm(graceful, "delete").await?;
        crate::crash_point!("delete.after_stop");
        // Its snapshots go with it (one a VM made from it still needs stays).
        self.remove_snapshots().await;
        self.env
            .driver
            .release(&self.rec.vm_id, &self.run_dir())
            .await;
        let dir = self.run_dir();
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", dir.display()), e)),
        }
        self.env
            .store
            .delete(&self.env.writer, &self.rec.vm_id)
            .await
    }

    pub(super) async fn set_desired(&mut self, d: Desired) -> Result<()> {
        if self.rec.desired != d {
            // A caller's wish is acknowledged only once it is recorded: a refused write fails
            // the call (and puts the host in readonly), and nothing changes.
            if let Err(e) = self
                .env
                .store
                .set_desired(&self.env.writer, &self.rec.vm_id, d)
                .await
            {
                if e.registry_unwritable() {
                    self.env.host.registry_failed(&e.to_string());
                }
                return Err(e);
            }
            self.rec.desired = d;
            self.rec.updated_at_ms = now_ms();
        }
        Ok(())
    }

    /// Moves the observed state through the lifecycle table (refusing, and logging, a change
    /// it does not allow); the caller saves.
    pub(super) fn observe(&mut self, to: VmState, cause: Cause) -> Result<()> {
        match self.rec.observed.observe(&self.rec.vm_id, to, cause) {
            Ok(s) => {
                self.rec.observed = s;
                Ok(())
            }
            Err(e) => {
                error!(vm_id = %self.rec.vm_id, error = %e, "illegal state change refused");
                Err(e)
            }
        }
    }

    /// Moves the observed state through the lifecycle table, then saves it and records the
    /// event.
    pub(super) async fn set_observed(&mut self, s: VmState, cause: Cause) -> Result<()> {
        let from = self.rec.observed;
        self.observe(s, cause)?;
        self.save().await?;
        if from != s {
            self.env
                .emit(&self.rec, EventKind::StateChanged, from, s, "", "")
                .await;
            info!(vm_id = %self.rec.vm_id, from = %from, to = %s, "vm state changed");
        }
        Ok(())
    }

    /// Publishes the VM's state to reads, then commits the runtime part of the row. The truth
    /// goes out first: a registry that refuses the write (a full disk, an I/O error) must not
    /// leave reads and metrics showing a VM as it no longer is. A refused write is kept in
    /// memory, the host goes readonly, and the next save (the reconcile loop tries each pass)
    /// writes everything that is pending, desired state included.
    pub(super) async fn save(&mut self) -> Result<()> {
        self.rec.updated_at_ms = now_ms();
        self.publish();
        let mut res = self
            .env
            .store
            .save_runtime(&self.env.writer, &self.rec)
            .await;
        if res.is_ok() && self.unsaved {
            res = self
                .env
                .store
                .set_desired(&self.env.writer, &self.rec.vm_id, self.rec.desired)
                .await;
        }
        match res {
            Ok(()) => {
                if self.unsaved {
                    self.unsaved = false;
                    info!(vm_id = %self.rec.vm_id, "registry caught up with the vm");
                }
                Ok(())
            }
            Err(e) if e.registry_unwritable() => {
                self.env.metrics.registry_write_failures.inc();
                if !self.unsaved {
                    warn!(vm_id = %self.rec.vm_id, error = %e, observed = %self.rec.observed, "registry write refused; the vm's state is kept in memory until it can be written");
                }
                self.unsaved = true;
                self.env.host.registry_failed(&e.to_string());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Publishes the VM's record to reads.
    pub(super) fn publish(&self) {
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = self.rec.clone();
    }

    /// Publishes only the health fields, after a check that changed nothing else: the common
    /// case, once a second for every VM, so it copies in place rather than cloning the record.
    pub(super) fn publish_health(&self) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        // Spelled out in full, so that a new health field cannot be left behind.
        let crate::model::HealthStatus {
            is_healthy,
            last_check_ms,
            pid,
            control_socket,
            last_error,
            consecutive_failures,
            consecutive_successes,
            recovery_count,
            last_activity_ms,
        } = &self.rec.health;
        let to = &mut live.health;
        to.is_healthy = *is_healthy;
        to.last_check_ms = *last_check_ms;
        to.pid = *pid;
        to.control_socket.clone_from(control_socket);
        to.last_error.clone_from(last_error);
        to.consecutive_failures = *consecutive_failures;
        to.consecutive_successes = *consecutive_successes;
        to.recovery_count = *recovery_count;
        to.last_activity_ms = *last_activity_ms;
    }
}
