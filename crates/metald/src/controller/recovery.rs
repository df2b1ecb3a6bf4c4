//! Recovery, as its controller runs it: an exit or an orphan is observed ≠ desired; recovery is
//! the ordinary reconcile (lifecycle.rs) run again under the host-wide gate, with backoff, a
//! crash-loop slow-down, and FAILED once the attempts are used up.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Controller {
    /// Whether a convergence that failed before is still backing off.
    pub(super) fn converge_waits(&self) -> bool {
        self.converge_after.is_some_and(|t| Instant::now() < t)
    }

    /// Records a convergence's outcome; a failure pushes the next try back.
    pub(super) fn converge_done(&mut self, res: Result<()>) -> bool {
        match res {
            Ok(()) => {
                self.converge_failures = 0;
                self.converge_after = None;
                true
            }
            Err(e) => {
                self.converge_failures = self.converge_failures.saturating_add(1);
                // Attempt n+1's wait, so that even the first failure waits retry_interval.
                let wait = self
                    .env
                    .gate
                    .backoff(self.converge_failures.saturating_add(1));
                self.converge_after = Some(Instant::now() + wait);
                warn!(vm_id = %self.rec.vm_id, error = %e, failures = self.converge_failures, retry_in_ms = wait.as_millis() as u64, "converging failed");
                false
            }
        }
    }

    pub(super) fn orphan_trigger(&self) -> Trigger {
        Trigger::Orphan(self.rec.orphan_reason.unwrap_or(OrphanReason::ProcessDead))
    }

    /// Schedules the next recovery attempt, with backoff, unless one is already under way (a
    /// second trigger for the same failure coalesces into it), recovery is off for this VM or
    /// host, or the attempts are used up (then the VM is FAILED). Returns whether it scheduled.
    pub(super) async fn schedule_recovery(&mut self, trigger: Trigger) -> bool {
        if self.retry_at.is_some() || self.permit.is_some() {
            return false;
        }
        let cfg = self.env.gate.config();
        if !cfg.enabled || !self.rec.spec.auto_recover {
            info!(vm_id = %self.rec.vm_id, reason = trigger.as_str(), host_enabled = cfg.enabled, vm_enabled = self.rec.spec.auto_recover, "automatic recovery is off; vm left as is");
            return false;
        }
        if self.rec.spec.restart_policy == RestartPolicy::Never {
            info!(vm_id = %self.rec.vm_id, reason = trigger.as_str(), "restart policy is never; vm left as is");
            return false;
        }
        if !self.env.host.recovery_allowed() {
            // Reported, not restarted: the reconcile loop schedules it once maintenance ends.
            info!(vm_id = %self.rec.vm_id, reason = trigger.as_str(), "host in maintenance; vm left as is");
            return false;
        }
        let attempt = self.rec.recovery_streak + 1;
        if attempt > cfg.max_retries {
            self.fail_completely().await;
            return false;
        }
        // Failed attempts back off; so does a crash loop: a VM that keeps dying without ever
        // staying up for the stable period is restarted more and more slowly, never FAILED.
        let mut delay = self.env.gate.backoff(attempt);
        if self.crashes > cfg.crash_loop_threshold {
            let looping = self
                .env
                .gate
                .backoff(self.crashes - cfg.crash_loop_threshold + 1);
            if looping > delay {
                warn!(vm_id = %self.rec.vm_id, crashes = self.crashes, delay_ms = looping.as_millis() as u64, "vm crash-looping; restarts slowed down");
                delay = looping;
            }
        }
        self.trigger = trigger;
        self.retry_at = Some(Instant::now() + delay);
        info!(vm_id = %self.rec.vm_id, reason = trigger.as_str(), attempt, delay_ms = delay.as_millis() as u64, "vm recovery scheduled");
        true
    }

    pub(super) fn cancel_recovery(&mut self) {
        self.retry_at = None;
        // An operator's command is a fresh start for convergence too.
        self.converge_failures = 0;
        self.converge_after = None;
        if self.permit.take().is_some() || self.probe {
            if self.probe {
                self.env.gate.release_probe();
            }
            self.probe = false;
        }
    }

    /// The backoff ran out: ask the gate, then wait for a permit.
    pub(super) fn on_retry_due(&mut self) {
        self.retry_at = None;
        match self.env.gate.admit() {
            Admission::Denied(wait) => {
                debug!(vm_id = %self.rec.vm_id, wait_ms = wait.as_millis() as u64, "recovery held by the breaker");
                self.retry_at = Some(Instant::now() + wait);
            }
            a => {
                self.probe = a == Admission::Probe;
                self.permit = Some(Box::pin(self.env.gate.semaphore().acquire_owned()));
            }
        }
    }

    pub(super) async fn on_permit(
        &mut self,
        permit: std::result::Result<OwnedSemaphorePermit, AcquireError>,
    ) {
        self.permit = None;
        let Ok(_permit) = permit else { return };
        let still_needed = self.vmm.is_none()
            && matches!(
                self.rec.desired,
                Desired::State(Target::Created | Target::Running | Target::Paused)
            )
            && matches!(self.rec.observed, VmState::Orphaned | VmState::Shutdown);
        if !still_needed {
            if self.probe {
                self.env.gate.release_probe();
                self.probe = false;
            }
            return;
        }
        // Failure is recorded and rescheduled inside.
        let _ = self.attempt_recovery(false).await;
    }

    /// One recovery attempt: the ordinary reconcile, run for a VM whose VMM is gone.
    pub(super) async fn attempt_recovery(&mut self, manual: bool) -> Result<()> {
        self.rec.recovery_streak += 1;
        let attempt = self.rec.recovery_streak;
        let trigger = if manual {
            Trigger::Manual
        } else {
            self.trigger
        };
        let prev_reason = self.rec.orphan_reason;
        let orphaned_at = self.rec.orphaned_at_ms;
        let in_flight = self.env.gate.status().in_flight;
        info!(vm_id = %self.rec.vm_id, attempt, reason = %trigger, in_flight, "vm recovery started");
        let from = self.rec.observed;
        self.env
            .events
            .emit(
                self.rec.vm_id.as_str(),
                EventKind::Recovering,
                from,
                from,
                trigger.as_str(),
                &format!("attempt {attempt}"),
            )
            .await;
        let started = Instant::now();
        let started_ms = now_ms();
        self.start_trigger = "recovery";
        let res = self.reconcile(None).await;
        // Also when the attempt failed before the guest started.
        self.start_trigger = "boot";
        let duration_ms = started.elapsed().as_millis() as i64;
        let record = AttemptRecord {
            attempt,
            started_at_ms: started_ms,
            duration_ms,
            succeeded: res.is_ok(),
            error: res
                .as_ref()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
            trigger: trigger.as_str().to_string(),
        };
        if let Err(e) = self.env.store.add_attempt(&self.rec.vm_id, record).await {
            warn!(vm_id = %self.rec.vm_id, error = %e, "recording recovery attempt failed");
        }
        if !manual {
            self.env.gate.record(res.is_ok(), self.probe);
        }
        self.probe = false;
        self.env.metrics.recovery_attempt(res.is_ok());
        match res {
            Ok(()) => {
                self.up_since = Some(Instant::now());
                self.last_recovery_error.clear();
                self.rec.recovery_streak = 0;
                let saved = self.save().await;
                let m = &self.env.metrics;
                m.recovery_success.inc();
                m.restarted(trigger.as_str());
                m.recovery_duration.observe(started.elapsed().as_secs_f64());
                // Where the guest is probed, the VM is down until its guest answers again;
                // otherwise until its VMM runs.
                if let Some(t) = orphaned_at {
                    if self.probed() && !self.rec.guest.ready {
                        self.down_since_ms = Some(t);
                    } else {
                        m.downtime.observe((now_ms() - t).max(0) as f64 / 1000.0);
                    }
                }
                self.env
                    .events
                    .emit(
                        self.rec.vm_id.as_str(),
                        EventKind::Recovered,
                        from,
                        self.rec.observed,
                        trigger.as_str(),
                        &format!("attempt {attempt} took {duration_ms} ms"),
                    )
                    .await;
                info!(
                    vm_id = %self.rec.vm_id,
                    attempt,
                    reason = %trigger,
                    duration_ms,
                    downtime_ms = orphaned_at.map(|t| (now_ms() - t).max(0)).unwrap_or(0),
                    "vm recovered"
                );
                saved
            }
            Err(e) => {
                self.last_recovery_error = e.to_string();
                self.rec.observed = VmState::Orphaned;
                self.rec.orphan_reason = prev_reason.or(Some(OrphanReason::ProcessDead));
                self.rec.orphaned_at_ms = orphaned_at.or(Some(now_ms()));
                let _ = self.save().await;
                self.env
                    .events
                    .emit(
                        self.rec.vm_id.as_str(),
                        EventKind::RecoveryFailed,
                        from,
                        VmState::Orphaned,
                        trigger.as_str(),
                        &e.to_string(),
                    )
                    .await;
                warn!(vm_id = %self.rec.vm_id, attempt, reason = %trigger, duration_ms, error = %e, "vm recovery attempt failed");
                self.schedule_recovery(trigger).await;
                Err(e)
            }
        }
    }

    /// Retries are used up: the VM is FAILED and stays so until an operator acts.
    pub(super) async fn fail_completely(&mut self) {
        self.cancel_recovery();
        let from = self.rec.observed;
        self.rec.observed = VmState::Failed;
        let saved = self.save().await;
        self.env
            .events
            .emit(
                self.rec.vm_id.as_str(),
                EventKind::Failed,
                from,
                VmState::Failed,
                self.trigger.as_str(),
                &self.last_recovery_error,
            )
            .await;
        error!(
            vm_id = %self.rec.vm_id,
            attempts = self.rec.recovery_streak,
            reason = %self.trigger,
            error = %self.last_recovery_error,
            "vm recovery failed completely"
        );
        if let Err(e) = saved {
            warn!(vm_id = %self.rec.vm_id, error = %e, "recording FAILED failed");
        }
    }

    /// Handles the pidfd event of a VMM that exited without metald asking it to.
    pub(super) async fn on_unexpected_exit(&mut self) {
        let Some(vmm) = self.vmm.take() else { return };
        debug!(vm_id = %self.rec.vm_id, pid = vmm.endpoint.pid, "vmm exit event");
        let status = vmm.pidfd.reap();
        // The VMM's last events (its SHUTDOWN and the reason) may still be on their way: the
        // connection ends right after them, so wait, briefly and bounded, for it to end.
        self.drain_vmm_events().await;
        // Read the cause while the VMM's files are all still there (a jail goes on release).
        let cause =
            self.env
                .driver
                .exit_cause(&self.run_dir(), status, self.reported_shutdown.as_ref());
        self.forget_vmm().await;
        let pid = vmm.endpoint.pid;
        let exit = match &self.reported_shutdown {
            Some(reason) => format!("{status}; cause: {cause}; vmm reported: {reason}"),
            None => format!("{status}; cause: {cause}"),
        };
        let wanted_up = matches!(
            self.rec.desired,
            Desired::State(Target::Created | Target::Running | Target::Paused)
        );
        let res = if !wanted_up {
            info!(vm_id = %self.rec.vm_id, pid, exit = %exit, "vmm exited");
            self.rec.last_exit = Some(exit);
            self.set_observed(VmState::Shutdown).await
        } else if cause == ExitCause::GuestPanic {
            warn!(vm_id = %self.rec.vm_id, pid, source = "vmm exit", "guest panicked");
            self.orphan(OrphanReason::GuestPanicked, pid, Some(exit))
                .await
        } else if cause == ExitCause::GuestReboot {
            // The guest rebooted itself (or someone reset the machine over the VMM's API), and
            // the VMM exits on a reset: the VM wants to come back. The restart goes through recovery (its first attempt is immediate) so that a
            // guest rebooting in a loop meets the crash-loop backoff instead of a tight loop.
            info!(vm_id = %self.rec.vm_id, pid, exit = %exit, "vm rebooted; restarting the vmm");
            self.rec.last_exit = Some(exit);
            let res = self.set_observed(VmState::Shutdown).await;
            self.crashes = self.crashes.saturating_add(1);
            self.schedule_recovery(Trigger::GuestReboot).await;
            res
        } else if cause == ExitCause::GuestPoweroff
            && self.rec.spec.restart_policy == RestartPolicy::Always
        {
            // Restart policy "always": a guest power-off is restarted like a crash, but it is not
            // an orphan.
            info!(vm_id = %self.rec.vm_id, pid, exit = %exit, "vm powered off by guest; restart policy is always");
            self.rec.last_exit = Some(exit);
            let res = self.set_observed(VmState::Shutdown).await;
            self.crashes = self.crashes.saturating_add(1);
            self.schedule_recovery(Trigger::GuestPoweroff).await;
            res
        } else if cause == ExitCause::GuestPoweroff {
            // The guest asked to power off: that is the VM's wish, not a crash. It stays off.
            self.rec.last_exit = Some(exit.clone());
            self.rec.desired = Desired::State(Target::Shutdown);
            // The guest's own wish, not a caller's: kept in memory (and written with the next
            // save) when the registry refuses it, like any observed change.
            if let Err(e) = self
                .env
                .store
                .set_desired(&self.rec.vm_id, self.rec.desired)
                .await
            {
                if e.registry_unwritable() {
                    self.unsaved = true;
                    self.env.host.registry_failed(&e.to_string());
                } else {
                    warn!(vm_id = %self.rec.vm_id, error = %e, "recording the guest's power-off failed");
                }
            }
            let res = self.set_observed(VmState::Shutdown).await;
            info!(vm_id = %self.rec.vm_id, pid, exit = %exit, "vm powered off by guest");
            res
        } else {
            self.orphan(OrphanReason::ProcessDead, pid, Some(exit))
                .await
        };
        crate::crash_point!("exit.after_record");
        if let Err(e) = res {
            warn!(vm_id = %self.rec.vm_id, error = %e, "recording vmm exit failed");
        }
    }

    /// Records the VM as orphaned, then logs the event alert rules match on: once the line is
    /// out, the registry already says so.
    pub(super) async fn orphan(
        &mut self,
        reason: OrphanReason,
        pid: i32,
        exit: Option<String>,
    ) -> Result<()> {
        let from = self.rec.observed;
        orphan_record(&mut self.rec, reason, exit);
        let saved = self.save().await;
        self.env.metrics.orphaned(reason.as_str());
        self.env
            .events
            .emit(
                self.rec.vm_id.as_str(),
                EventKind::Orphaned,
                from,
                VmState::Orphaned,
                reason.as_str(),
                self.rec.last_exit.as_deref().unwrap_or(""),
            )
            .await;
        let now = now_ms();
        warn!(
            vm_id = %self.rec.vm_id,
            pid,
            reason = reason.as_str(),
            last_seen = %crate::telemetry::rfc3339(self.last_seen_ms),
            downtime = (now - self.last_seen_ms).max(0) as f64 / 1000.0,
            exit = self.rec.last_exit.as_deref().unwrap_or(""),
            "orphaned vm detected"
        );
        self.up_since = None;
        self.crashes = self.crashes.saturating_add(1);
        self.schedule_recovery(Trigger::Orphan(reason)).await;
        saved
    }
}
