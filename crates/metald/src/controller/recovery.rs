//! Recovery, as its controller runs it: an exit or an orphan is observed ≠ desired; recovery is
//! the ordinary reconcile (lifecycle.rs) run again under the host-wide gate, with backoff, a
//! crash-loop slow-down, and FAILED once the attempts are used up.

#[allow(clippy::wildcard_imports)]
use super::*;

// The decisions, as pure functions of what the controller knows: each returns what to do, and
// the controller does it (kube-rs style). They are unit-tested below without a process.

/// What a controller knows when a failure calls for a recovery.
#[derive(Debug, Clone, Copy)]
pub(super) struct RecoveryFacts {
    /// A recovery is already waiting for its backoff or for a permit.
    pub underway: bool,
    /// Automatic recovery is on for the host.
    pub host_enabled: bool,
    /// And for this VM.
    pub vm_enabled: bool,
    /// The VM's restart policy.
    pub policy: RestartPolicy,
    /// The host is in maintenance (draining, or set so by an operator).
    pub maintenance: bool,
    /// Failed attempts in a row so far.
    pub streak: u32,
    /// Attempts allowed in a row.
    pub max_retries: u32,
    /// Exits without a stable period between them.
    pub crashes: u32,
    /// Exits after which restarts slow down.
    pub crash_loop_threshold: u32,
}

/// Why a VM that failed is left as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LeftBecause {
    /// Recovery is off for the host or for the VM.
    RecoveryOff,
    /// Its restart policy is `never`.
    PolicyNever,
    /// The host is in maintenance; the reconcile loop schedules it when that ends.
    Maintenance,
}

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum RecoveryPlan {
    /// A recovery is under way already: this trigger joins it.
    Coalesce,
    /// Leave the VM as it is.
    Leave(LeftBecause),
    /// The attempts are used up: the VM is FAILED.
    GiveUp,
    /// Attempt `attempt` after `after`; `crash_loop` when the wait was stretched because the VM
    /// keeps dying.
    Retry {
        attempt: u32,
        after: Duration,
        crash_loop: bool,
    },
}

/// Whether, and when, to recover. `backoff(n)` is the wait before attempt `n` (jittered).
pub(super) fn plan_recovery(f: &RecoveryFacts, backoff: impl Fn(u32) -> Duration) -> RecoveryPlan {
    if f.underway {
        return RecoveryPlan::Coalesce;
    }
    if !f.host_enabled || !f.vm_enabled {
        return RecoveryPlan::Leave(LeftBecause::RecoveryOff);
    }
    if f.policy == RestartPolicy::Never {
        return RecoveryPlan::Leave(LeftBecause::PolicyNever);
    }
    if f.maintenance {
        return RecoveryPlan::Leave(LeftBecause::Maintenance);
    }
    let attempt = f.streak.saturating_add(1);
    if attempt > f.max_retries {
        return RecoveryPlan::GiveUp;
    }
    // Failed attempts back off; so does a crash loop: a VM that keeps dying without ever
    // staying up for the stable period is restarted more and more slowly, never FAILED.
    let mut after = backoff(attempt);
    let mut crash_loop = false;
    if f.crashes > f.crash_loop_threshold {
        let looping = backoff(f.crashes - f.crash_loop_threshold + 1);
        if looping > after {
            after = looping;
            crash_loop = true;
        }
    }
    RecoveryPlan::Retry {
        attempt,
        after,
        crash_loop,
    }
}

/// What a VMM's exit that metald did not ask for means for its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExitPlan {
    /// The VM was not wanted up: it is simply SHUTDOWN.
    Stopped,
    /// A failure: ORPHANED for this reason, and recovered.
    Orphan(OrphanReason),
    /// Not a failure, but the VM comes back: SHUTDOWN, then restarted through recovery (so a
    /// guest that reboots in a loop meets the crash-loop backoff).
    Restart(Trigger),
    /// The guest's own wish to be off: it stays off (desired becomes shutdown).
    PoweredOff,
}

/// Reads an unexpected exit: `wanted_up` is whether the desired state has a VMM.
pub(super) fn plan_exit(wanted_up: bool, cause: &ExitCause, policy: RestartPolicy) -> ExitPlan {
    if !wanted_up {
        return ExitPlan::Stopped;
    }
    match cause {
        ExitCause::GuestPanic => ExitPlan::Orphan(OrphanReason::GuestPanicked),
        ExitCause::GuestReboot => ExitPlan::Restart(Trigger::GuestReboot),
        ExitCause::GuestPoweroff if policy == RestartPolicy::Always => {
            ExitPlan::Restart(Trigger::GuestPoweroff)
        }
        ExitCause::GuestPoweroff => ExitPlan::PoweredOff,
        ExitCause::Signal(_) | ExitCause::Crash(_) | ExitCause::Oom | ExitCause::Unknown => {
            ExitPlan::Orphan(OrphanReason::ProcessDead)
        }
    }
}

/// What a recovery whose backoff ran out does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DuePlan {
    /// The breaker holds recoveries: ask again after this long.
    Wait(Duration),
    /// Take a permit from the host's semaphore (as the breaker's one probe when `probe`).
    Acquire { probe: bool },
}

/// Reads the gate's answer to a recovery that is due.
pub(super) fn plan_due(admission: Admission) -> DuePlan {
    match admission {
        Admission::Denied(wait) => DuePlan::Wait(wait),
        Admission::Allowed => DuePlan::Acquire { probe: false },
        Admission::Probe => DuePlan::Acquire { probe: true },
    }
}

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
                warn!(vm_id = %self.rec.vm_id, error = %e, failures = self.converge_failures, retry_in_ms = crate::model::ms(wait), "converging failed");
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
        let cfg = self.env.gate.config();
        let facts = RecoveryFacts {
            underway: self.retry_at.is_some() || self.permit.is_some(),
            host_enabled: cfg.enabled,
            vm_enabled: self.rec.spec.auto_recover,
            policy: self.rec.spec.restart_policy,
            maintenance: !self.env.host.recovery_allowed(),
            streak: self.rec.recovery_streak,
            max_retries: cfg.max_retries,
            crashes: self.crashes,
            crash_loop_threshold: cfg.crash_loop_threshold,
        };
        let gate = &self.env.gate;
        match plan_recovery(&facts, |n| gate.backoff(n)) {
            RecoveryPlan::Coalesce => false,
            RecoveryPlan::Leave(LeftBecause::RecoveryOff) => {
                info!(vm_id = %self.rec.vm_id, reason = trigger.as_str(), host_enabled = facts.host_enabled, vm_enabled = facts.vm_enabled, "automatic recovery is off; vm left as is");
                false
            }
            RecoveryPlan::Leave(LeftBecause::PolicyNever) => {
                info!(vm_id = %self.rec.vm_id, reason = trigger.as_str(), "restart policy is never; vm left as is");
                false
            }
            RecoveryPlan::Leave(LeftBecause::Maintenance) => {
                // Reported, not restarted: the reconcile loop schedules it once maintenance ends.
                info!(vm_id = %self.rec.vm_id, reason = trigger.as_str(), "host in maintenance; vm left as is");
                false
            }
            RecoveryPlan::GiveUp => {
                self.fail_completely().await;
                false
            }
            RecoveryPlan::Retry {
                attempt,
                after,
                crash_loop,
            } => {
                if crash_loop {
                    warn!(vm_id = %self.rec.vm_id, crashes = self.crashes, delay_ms = crate::model::ms(after), "vm crash-looping; restarts slowed down");
                }
                self.trigger = trigger;
                self.retry_at = Some(Instant::now() + after);
                info!(vm_id = %self.rec.vm_id, reason = trigger.as_str(), attempt, delay_ms = crate::model::ms(after), "vm recovery scheduled");
                true
            }
        }
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
        match plan_due(self.env.gate.admit()) {
            DuePlan::Wait(wait) => {
                debug!(vm_id = %self.rec.vm_id, wait_ms = crate::model::ms(wait), "recovery held by the breaker");
                self.retry_at = Some(Instant::now() + wait);
            }
            DuePlan::Acquire { probe } => {
                self.probe = probe;
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
            .emit(
                &self.rec,
                EventKind::Recovering,
                from,
                from,
                trigger.as_str(),
                &format!("attempt {attempt}"),
            )
            .await;
        let started = Instant::now();
        let started_ms = now_ms();
        let method = self.recovery_method().await;
        self.start_trigger = if method == "restore" {
            "restore"
        } else {
            "recovery"
        };
        let res = self.reconcile(None).await;
        // A restore that failed is not tried again in this streak; one that worked (or a
        // boot) ends the streak's memory of it.
        if res.is_ok() {
            self.warm_restore_failed = false;
        } else if method == "restore" {
            self.warm_restore_failed = true;
        }
        self.restore_from = None;
        // Also when the attempt failed before the guest started.
        self.start_trigger = "boot";
        let duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
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
            method: method.into(),
        };
        self.record_attempt(record).await;
        if !manual {
            self.env.gate.record(res.is_ok(), self.probe);
        }
        self.probe = false;
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
                        m.downtime
                            .observe(crate::model::ms_to_secs((now_ms() - t).max(0)));
                    }
                }
                self.env
                    .emit(
                        &self.rec,
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
                let _ = self.observe(VmState::Orphaned, Cause::Orphaned);
                self.rec.orphan_reason = prev_reason.or(Some(OrphanReason::ProcessDead));
                self.rec.orphaned_at_ms = orphaned_at.or(Some(now_ms()));
                let _ = self.save().await;
                self.env
                    .emit(
                        &self.rec,
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

    /// Records a recovery attempt in the VM's history and the metrics, whatever its method.
    pub(super) async fn record_attempt(&mut self, record: AttemptRecord) {
        self.env
            .metrics
            .recovery_attempt(record.succeeded, &record.method);
        if let Err(e) = self
            .env
            .store
            .add_attempt(&self.env.writer, &self.rec.vm_id, record)
            .await
        {
            warn!(vm_id = %self.rec.vm_id, error = %e, "recording recovery attempt failed");
        }
    }

    /// Retries are used up: the VM is FAILED and stays so until an operator acts.
    pub(super) async fn fail_completely(&mut self) {
        self.cancel_recovery();
        let from = self.rec.observed;
        if self.observe(VmState::Failed, Cause::GaveUp).is_err() {
            return;
        }
        let saved = self.save().await;
        self.env
            .emit(
                &self.rec,
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
        debug!(vm_id = %self.rec.vm_id, pid = vmm.pid(), "vmm exit event");
        let status = vmm.pidfd().reap();
        // The VMM's last events (its SHUTDOWN and the reason) may still be on their way: the
        // connection ends right after them, so wait, briefly and bounded, for it to end.
        self.drain_vmm_events().await;
        // Read the cause while the VMM's files are all still there (a jail goes on release).
        // Reading them is file work (a console's tail, the VMM's log), done off the runtime.
        let cause = {
            let (driver, run_dir, reported) = (
                self.env.driver.clone(),
                self.run_dir(),
                self.reported_shutdown.clone(),
            );
            tokio::task::spawn_blocking(move || {
                driver.exit_cause(&run_dir, status, reported.as_ref())
            })
            .await
            .unwrap_or(ExitCause::Unknown)
        };
        self.forget_vmm().await;
        let pid = vmm.pid();
        let exit = match &self.reported_shutdown {
            Some(reason) => format!("{status}; cause: {cause}; vmm reported: {reason}"),
            None => format!("{status}; cause: {cause}"),
        };
        let wanted_up = matches!(
            self.rec.desired,
            Desired::State(Target::Created | Target::Running | Target::Paused)
        );
        let res = match plan_exit(wanted_up, &cause, self.rec.spec.restart_policy) {
            ExitPlan::Stopped => {
                info!(vm_id = %self.rec.vm_id, pid, exit = %exit, "vmm exited");
                self.rec.last_exit = Some(exit);
                self.set_observed(VmState::Shutdown, Cause::Stopped).await
            }
            ExitPlan::Orphan(reason) => {
                if reason == OrphanReason::GuestPanicked {
                    warn!(vm_id = %self.rec.vm_id, pid, source = "vmm exit", "guest panicked");
                }
                self.orphan(reason, pid, Some(exit)).await
            }
            ExitPlan::Restart(trigger) => {
                // A guest reboot (the VMM exits on a reset by design), or a power-off under
                // restart policy "always": the VM comes back, but it is not an orphan.
                if trigger == Trigger::GuestReboot {
                    info!(vm_id = %self.rec.vm_id, pid, exit = %exit, "vm rebooted; restarting the vmm");
                } else {
                    info!(vm_id = %self.rec.vm_id, pid, exit = %exit, "vm powered off by guest; restart policy is always");
                }
                self.rec.last_exit = Some(exit);
                let res = self.set_observed(VmState::Shutdown, Cause::Stopped).await;
                self.crashes = self.crashes.saturating_add(1);
                self.schedule_recovery(trigger).await;
                res
            }
            ExitPlan::PoweredOff => {
                // The guest asked to power off: that is the VM's wish, not a crash. It stays
                // off.
                self.rec.last_exit = Some(exit.clone());
                self.rec.desired = Desired::State(Target::Shutdown);
                // The guest's own wish, not a caller's: kept in memory (and written with the
                // next save) when the registry refuses it, like any observed change.
                if let Err(e) = self
                    .env
                    .store
                    .set_desired(&self.env.writer, &self.rec.vm_id, self.rec.desired)
                    .await
                {
                    if e.registry_unwritable() {
                        self.unsaved = true;
                        self.env.host.registry_failed(&e.to_string());
                    } else {
                        warn!(vm_id = %self.rec.vm_id, error = %e, "recording the guest's power-off failed");
                    }
                }
                let res = self.set_observed(VmState::Shutdown, Cause::Stopped).await;
                info!(vm_id = %self.rec.vm_id, pid, exit = %exit, "vm powered off by guest");
                res
            }
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
            .emit(
                &self.rec,
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
            downtime = crate::model::ms_to_secs((now - self.last_seen_ms).max(0)),
            exit = self.rec.last_exit.as_deref().unwrap_or(""),
            "orphaned vm detected"
        );
        self.up_since = None;
        self.crashes = self.crashes.saturating_add(1);
        self.schedule_recovery(Trigger::Orphan(reason)).await;
        saved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> RecoveryFacts {
        RecoveryFacts {
            underway: false,
            host_enabled: true,
            vm_enabled: true,
            policy: RestartPolicy::OnFailure,
            maintenance: false,
            streak: 0,
            max_retries: 5,
            crashes: 1,
            crash_loop_threshold: 3,
        }
    }

    /// 100 ms × 2^(n-2), the first immediate; no jitter.
    fn backoff(n: u32) -> Duration {
        if n <= 1 {
            Duration::ZERO
        } else {
            Duration::from_millis(100 << (n - 2))
        }
    }

    #[test]
    fn a_first_failure_is_retried_at_once_and_later_ones_back_off() {
        assert_eq!(
            plan_recovery(&facts(), backoff),
            RecoveryPlan::Retry {
                attempt: 1,
                after: Duration::ZERO,
                crash_loop: false
            }
        );
        let third = RecoveryFacts {
            streak: 2,
            ..facts()
        };
        assert_eq!(
            plan_recovery(&third, backoff),
            RecoveryPlan::Retry {
                attempt: 3,
                after: Duration::from_millis(200),
                crash_loop: false
            }
        );
    }

    #[test]
    fn a_second_trigger_joins_the_recovery_under_way() {
        let f = RecoveryFacts {
            underway: true,
            streak: 99,
            ..facts()
        };
        assert_eq!(plan_recovery(&f, backoff), RecoveryPlan::Coalesce);
    }

    #[test]
    fn attempts_used_up_give_up() {
        let f = RecoveryFacts {
            streak: 5,
            ..facts()
        };
        assert_eq!(plan_recovery(&f, backoff), RecoveryPlan::GiveUp);
        let f = RecoveryFacts {
            streak: 4,
            ..facts()
        };
        assert!(matches!(
            plan_recovery(&f, backoff),
            RecoveryPlan::Retry { attempt: 5, .. }
        ));
    }

    #[test]
    fn a_crash_loop_is_slowed_down_never_failed() {
        // Each restart succeeds (streak 0) but the VM keeps dying: the crash count stretches
        // the wait, and the VM is never FAILED for it.
        let mut last = Duration::ZERO;
        for crashes in 4..12 {
            let f = RecoveryFacts { crashes, ..facts() };
            match plan_recovery(&f, backoff) {
                RecoveryPlan::Retry {
                    attempt: 1,
                    after,
                    crash_loop: true,
                } => {
                    assert!(after > last, "crash {crashes}: {after:?} after {last:?}");
                    last = after;
                }
                other => panic!("crash {crashes}: {other:?}"),
            }
        }
        // At the threshold it is not yet a loop.
        let f = RecoveryFacts {
            crashes: 3,
            ..facts()
        };
        assert!(matches!(
            plan_recovery(&f, backoff),
            RecoveryPlan::Retry {
                crash_loop: false,
                ..
            }
        ));
    }

    #[test]
    fn recovery_off_policy_never_and_maintenance_leave_the_vm() {
        for (f, why) in [
            (
                RecoveryFacts {
                    host_enabled: false,
                    ..facts()
                },
                LeftBecause::RecoveryOff,
            ),
            (
                RecoveryFacts {
                    vm_enabled: false,
                    ..facts()
                },
                LeftBecause::RecoveryOff,
            ),
            (
                RecoveryFacts {
                    policy: RestartPolicy::Never,
                    ..facts()
                },
                LeftBecause::PolicyNever,
            ),
            (
                RecoveryFacts {
                    maintenance: true,
                    streak: 99,
                    ..facts()
                },
                LeftBecause::Maintenance,
            ),
        ] {
            assert_eq!(plan_recovery(&f, backoff), RecoveryPlan::Leave(why));
        }
    }

    #[test]
    fn exits_are_read_by_cause_and_policy() {
        use RestartPolicy::{Always, Never, OnFailure};
        let cases = [
            (false, ExitCause::Signal(9), OnFailure, ExitPlan::Stopped),
            (false, ExitCause::GuestPanic, Always, ExitPlan::Stopped),
            (
                true,
                ExitCause::Signal(9),
                OnFailure,
                ExitPlan::Orphan(OrphanReason::ProcessDead),
            ),
            (
                true,
                ExitCause::Crash("exit 1".into()),
                Never,
                ExitPlan::Orphan(OrphanReason::ProcessDead),
            ),
            (
                true,
                ExitCause::Unknown,
                OnFailure,
                ExitPlan::Orphan(OrphanReason::ProcessDead),
            ),
            (
                true,
                ExitCause::GuestPanic,
                OnFailure,
                ExitPlan::Orphan(OrphanReason::GuestPanicked),
            ),
            (
                true,
                ExitCause::GuestReboot,
                OnFailure,
                ExitPlan::Restart(Trigger::GuestReboot),
            ),
            (
                true,
                ExitCause::GuestPoweroff,
                Always,
                ExitPlan::Restart(Trigger::GuestPoweroff),
            ),
            (
                true,
                ExitCause::GuestPoweroff,
                OnFailure,
                ExitPlan::PoweredOff,
            ),
            (true, ExitCause::GuestPoweroff, Never, ExitPlan::PoweredOff),
        ];
        for (up, cause, policy, want) in cases {
            assert_eq!(
                plan_exit(up, &cause, policy),
                want,
                "{up} {cause} {policy:?}"
            );
        }
    }

    #[test]
    fn a_due_recovery_waits_for_the_breaker_or_takes_a_permit() {
        let w = Duration::from_secs(3);
        assert_eq!(plan_due(Admission::Denied(w)), DuePlan::Wait(w));
        assert_eq!(
            plan_due(Admission::Allowed),
            DuePlan::Acquire { probe: false }
        );
        assert_eq!(plan_due(Admission::Probe), DuePlan::Acquire { probe: true });
    }
}
