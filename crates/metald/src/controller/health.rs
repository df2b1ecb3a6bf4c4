//! A VM's health, as its controller sees it: the VMM's periodic health checks and its event
//! stream, the guest's probe and readiness, panics seen on the console, and a control socket
//! that disappears. Verdicts that mean the VMM is gone hand the VM to recovery (recovery.rs).

#[allow(clippy::wildcard_imports)]
use super::*;

impl Controller {
    /// Opens the control connection of the current VMM (its events) and starts its guest
    /// agent task. Called for every new or adopted VMM.
    pub(super) async fn attach_vmm(&mut self) {
        let Some(ctl) = self.vmm.as_ref().map(Vmm::control) else {
            return;
        };
        self.reported_shutdown = None;
        self.socket_missing = false;
        self.watch_vmm().await;
        let (agent, probes) = AgentHandle::start(ctl, self.rec.spec.guest_health, self.probed());
        self.agent = Some(agent);
        self.probes = Some(probes);
    }

    pub(super) async fn watch_vmm(&mut self) {
        let Some((ctl, pid)) = self.vmm.as_ref().map(|v| (v.control(), v.pid())) else {
            return;
        };
        match ctl.watch().await {
            Ok(rx) => {
                self.watchable = rx.is_some();
                self.vmm_events = rx;
            }
            Err(e) => {
                // Health checks still reach the VMM on a connection of their own; the next one
                // tries to open the held connection again.
                warn!(vm_id = %self.rec.vm_id, pid, error = %e, "watching the vmm failed");
                self.watchable = true;
                self.vmm_events = None;
            }
        }
    }

    /// Takes the events still queued from a VMM that exited, until its connection ends.
    pub(super) async fn drain_vmm_events(&mut self) {
        let Some(mut rx) = self.vmm_events.take() else {
            return;
        };
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            if let VmmEvent::Shutdown(reason) = ev {
                self.reported_shutdown = Some(reason);
            }
        }
    }

    /// Acts on an event from the VMM's held connection (`None`: the connection ended).
    pub(super) async fn on_vmm_event(&mut self, ev: Option<VmmEvent>) {
        let Some(ev) = ev else {
            self.vmm_events = None;
            if self.vmm.as_ref().is_some_and(|v| !v.pidfd().has_exited()) {
                warn!(vm_id = %self.rec.vm_id, "vmm control connection lost; reopening it at the next health check");
            }
            return;
        };
        debug!(vm_id = %self.rec.vm_id, event = ?ev, "vmm event");
        match ev {
            VmmEvent::Shutdown(reason) => self.reported_shutdown = Some(reason),
            VmmEvent::GuestPanicked => {
                let pid = self.vmm.as_ref().map_or(0, |v| v.pid());
                warn!(vm_id = %self.rec.vm_id, pid, source = "panic device", "guest panicked");
                if let Err(e) = self.orphan_live_vmm(OrphanReason::GuestPanicked).await {
                    warn!(vm_id = %self.rec.vm_id, error = %e, "recording guest panic failed");
                }
            }
            // Our own pause and resume cause these too, so they are not taken as the new state:
            // a health check now asks the VMM what its state really is.
            VmmEvent::Stopped | VmmEvent::Resumed => self.next_check = Instant::now(),
            VmmEvent::Reset { guest } => {
                info!(vm_id = %self.rec.vm_id, guest, "guest reset");
            }
        }
    }

    /// Whether this VM's guest is judged by its probe.
    pub(super) fn probed(&self) -> bool {
        self.rec.spec.guest_health.probe == GuestProbe::Agent
    }

    /// When the startup deadline of a probed guest falls, while it is running and not ready.
    pub(super) fn ready_due(&self) -> Option<Instant> {
        self.ready_deadline
            .filter(|_| self.rec.observed == VmState::Running && self.vmm.is_some())
    }

    /// A fresh guest starts running: it is not ready until its first answered probe.
    pub(super) fn guest_starting(&mut self) {
        // A restore's trigger is used once; a recovery sets its own for each attempt.
        let trigger = std::mem::replace(&mut self.start_trigger, "boot");
        // A restored guest is past its boot; a booted one is in it.
        self.booted_at = (trigger != "restore").then(Instant::now);
        self.rec.guest = GuestStatus::default();
        self.guest_started = Some((Instant::now(), trigger));
        if self.probed() {
            self.arm_ready_deadline();
        }
    }

    /// A probed guest that is not ready gets its whole startup time from now.
    pub(super) fn arm_ready_deadline(&mut self) {
        self.ready_deadline = Some(Instant::now() + self.rec.spec.guest_health.startup_timeout);
    }

    /// A paused guest runs again: its silence while paused does not count, and one not ready
    /// yet gets its whole startup time again.
    pub(super) fn guest_resumed(&mut self) {
        if !self.probed() {
            return;
        }
        self.rec.guest.consecutive_failures = 0;
        if !self.rec.guest.ready {
            self.arm_ready_deadline();
        }
    }

    /// Acts on one guest probe (`None`: the agent task ended with its VMM).
    pub(super) async fn on_probe(&mut self, res: Option<ProbeResult>) {
        let Some(res) = res else {
            self.probes = None;
            return;
        };
        // A paused guest cannot answer; a probe of a VMM on its way out says nothing.
        if self.rec.observed != VmState::Running || self.vmm.is_none() || !self.probed() {
            return;
        }
        let now = now_ms();
        self.env.metrics.guest_probes.inc();
        let g = &mut self.rec.guest;
        g.last_probe_ms = now;
        match res.outcome {
            Ok(()) => {
                g.consecutive_failures = 0;
                g.last_error.clear();
                if !g.ready {
                    self.on_guest_ready().await;
                }
            }
            Err(error) => {
                self.env.metrics.guest_probe_failures.inc();
                g.consecutive_failures = g.consecutive_failures.saturating_add(1);
                g.last_error = error.clone();
                let failures = g.consecutive_failures;
                if !g.ready {
                    // Not up yet: the startup deadline, not the failure count, judges it.
                    return;
                }
                let threshold = self.rec.spec.guest_health.failure_threshold;
                warn!(vm_id = %self.rec.vm_id, error = %error, consecutive_failures = failures, took_ms = crate::model::ms(res.took), "guest probe failed");
                if failures >= threshold {
                    let pid = self.vmm.as_ref().map_or(0, |v| v.pid());
                    warn!(vm_id = %self.rec.vm_id, pid, consecutive_failures = failures, error = %error, "guest unresponsive");
                    if let Err(e) = self.orphan_live_vmm(OrphanReason::GuestUnresponsive).await {
                        warn!(vm_id = %self.rec.vm_id, error = %e, "recording guest failure failed");
                    }
                }
            }
        }
    }

    /// The guest answered for the first time since it started.
    pub(super) async fn on_guest_ready(&mut self) {
        let now = now_ms();
        self.ready_deadline = None;
        self.rec.guest.ready = true;
        self.rec.guest.ready_at_ms = now;
        let (started, trigger) = self
            .guest_started
            .take()
            .unwrap_or((Instant::now(), "boot"));
        let took = started.elapsed();
        let m = &self.env.metrics;
        m.guest_ready
            .get_or_create(&crate::metrics::TriggerLabel {
                trigger: trigger.to_string(),
            })
            .observe(took.as_secs_f64());
        let downtime_ms = self.down_since_ms.take().map(|t| (now - t).max(0));
        if let Some(d) = downtime_ms {
            m.downtime.observe(crate::model::ms_to_secs(d));
        }
        let saved = self.save().await;
        self.env
            .emit(
                &self.rec,
                EventKind::GuestReady,
                self.rec.observed,
                self.rec.observed,
                trigger,
                &format!("guest answered {} ms after it started", took.as_millis()),
            )
            .await;
        info!(vm_id = %self.rec.vm_id, trigger, ready_ms = crate::model::ms(took), downtime_ms = downtime_ms.unwrap_or(0), "guest ready");
        if let Err(e) = saved {
            warn!(vm_id = %self.rec.vm_id, error = %e, "recording guest readiness failed");
        }
        // A VM restored warm comes back from its boot snapshot: this is the moment to keep.
        self.take_boot_snapshot_if_wanted().await;
    }

    /// A probed guest did not answer within its startup timeout.
    pub(super) async fn on_ready_deadline(&mut self) {
        self.ready_deadline = None;
        if self.rec.guest.ready || !self.probed() {
            return;
        }
        let pid = self.vmm.as_ref().map_or(0, |v| v.pid());
        let timeout = self.rec.spec.guest_health.startup_timeout;
        warn!(vm_id = %self.rec.vm_id, pid, startup_timeout_ms = crate::model::ms(timeout), error = %self.rec.guest.last_error, "guest unresponsive");
        if let Err(e) = self.orphan_live_vmm(OrphanReason::GuestUnresponsive).await {
            warn!(vm_id = %self.rec.vm_id, error = %e, "recording guest failure failed");
        }
    }

    /// Asks the guest agent about the guest.
    pub(super) async fn guest_info(&mut self) -> Result<GuestInfo> {
        if self.rec.observed != VmState::Running {
            return Err(Error::FailedPrecondition(format!(
                "the guest agent of a vm that is {} cannot answer",
                self.rec.observed
            )));
        }
        let Some(agent) = self.agent.as_ref() else {
            return Err(Error::FailedPrecondition("the vm has no vmm".into()));
        };
        agent.info().await.map_err(|e| {
            Error::Unavailable(self.rec.vm_id.to_string(), format!("guest agent: {e}"))
        })
    }

    /// Reads what the guest printed on its console since the last look, and reports whether
    /// the kernel announced a panic. This is how a panic is seen without a panic device (and on
    /// Firecracker): the kernel prints this line before it stops.
    pub(super) fn console_shows_panic(&mut self) -> bool {
        use std::os::unix::fs::FileExt;
        if !self.rec.spec.console {
            return false;
        }
        if self.console.is_none() {
            let Some(path) = self.vmm.as_ref().map(|v| v.endpoint().console_log.clone()) else {
                return false;
            };
            // Not there yet (a jailed Firecracker creates it when configured): look next time.
            let Ok(f) = std::fs::File::open(&path) else {
                return false;
            };
            let start = if self.console_from_end {
                f.metadata().map_or(0, |m| m.len())
            } else {
                0
            };
            self.console = Some((f, start));
        }
        let Some((f, seen)) = self.console.as_mut() else {
            return false;
        };
        // One positioned read from a little before what was seen (so that a line split across
        // two looks still matches): at every check of every VM with a console, one call, where
        // a stat, a seek and a read to the end were four.
        let overlap = PANIC_LINE.len() as u64;
        let from = seen.saturating_sub(overlap);
        let mut buf = [0u8; 4096];
        let Ok(n) = f.read_at(&mut buf, from) else {
            return false;
        };
        let got = n as u64;
        if from + got < *seen {
            // Shorter than what was seen: truncated under us. Read it from the start next time.
            *seen = 0;
            return false;
        }
        if n < buf.len() {
            *seen = from + got;
            return buf
                .get(..n)
                .unwrap_or_default()
                .windows(PANIC_LINE.len())
                .any(|w| w == PANIC_LINE.as_bytes());
        }
        // More than a read's worth is new (a chatty guest): look at most at the last 64 KiB,
        // however much it wrote, as a panic's line comes last.
        let len = f.metadata().map_or(0, |m| m.len());
        let from = from.max(len.saturating_sub(64 * 1024));
        let Ok(want) = usize::try_from(len.saturating_sub(from)) else {
            return false;
        };
        let mut rest = vec![0; want];
        if f.read_exact_at(&mut rest, from).is_err() {
            return false;
        }
        *seen = len;
        rest.windows(PANIC_LINE.len())
            .any(|w| w == PANIC_LINE.as_bytes())
    }

    /// When the next health check is due, if one should run at all.
    pub(super) fn check_due(&self) -> Option<Instant> {
        let checkable = matches!(
            self.rec.observed,
            VmState::Created | VmState::Running | VmState::Paused
        );
        (self.env.health.enabled && checkable && self.vmm.is_some()).then_some(self.next_check)
    }

    /// Pings the VMM once, bounded by the health timeout, and acts on the verdict.
    pub(super) async fn health_check(&mut self) {
        let started = Instant::now();
        self.next_check = next_check_after(started, &self.env.health);
        // The endpoint is borrowed where it is needed, not cloned: this runs once a second for
        // every VM.
        let Some(pid) = self.vmm.as_ref().map(|v| v.pid()) else {
            return;
        };
        if self.console_shows_panic() {
            warn!(vm_id = %self.rec.vm_id, pid, source = "console", "guest panicked");
            if let Err(e) = self.orphan_live_vmm(OrphanReason::GuestPanicked).await {
                warn!(vm_id = %self.rec.vm_id, error = %e, "recording guest panic failed");
            }
            return;
        }
        if self.watchable && self.vmm_events.is_none() {
            self.watch_vmm().await;
        }
        let timeout = self.env.health.timeout;
        // With the control connection held, a ping goes over it and works even when the socket
        // file was deleted; a VMM whose API has no held connection connects anew, and a missing
        // socket shows up as ENOENT from that connect.
        let verdict = {
            let Some(vmm) = self.vmm.as_ref() else {
                return;
            };
            match tokio::time::timeout(timeout, vmm.ping()).await {
                Ok(Ok(run)) => Ok(run),
                Ok(Err(DriverError::Socket {
                    reason,
                    unreachable: true,
                    ..
                })) => Err((OrphanReason::SocketUnreachable, reason)),
                Ok(Err(e)) => Err((OrphanReason::ApiUnresponsive, e.to_string())),
                Err(_) => Err((
                    OrphanReason::ApiUnresponsive,
                    format!("no answer within {} ms", timeout.as_millis()),
                )),
            }
        };
        // A VMM that answered was alive; one that did not may have died during the check, and
        // then the exit event, handled next, says why. (Asked only on a failure: it is a call.)
        if verdict.is_err() && self.vmm.as_ref().is_some_and(|v| v.pidfd().has_exited()) {
            return;
        }
        let now = now_ms();
        self.env.metrics.health_checks.inc();
        if verdict.is_err() {
            self.env.metrics.health_check_failures.inc();
        }
        self.rec.health.last_check_ms = now;
        self.rec.health.pid = Some(pid);
        // Compared before it is written: at every check of every VM, an allocation adds up.
        if let Some(vmm) = self.vmm.as_ref()
            && Path::new(&self.rec.health.control_socket) != vmm.endpoint().control_socket
        {
            self.rec.health.control_socket = vmm.endpoint().control_socket.display().to_string();
        }
        let cfg = self.env.health.clone();
        // The socket file is looked for every few seconds, not at every check: losing it changes
        // nothing while the held connection works, and each look is a path walk.
        let socket_there = match self.socket_looked_at {
            Some(t) if t.elapsed() < SOCKET_LOOK_EVERY => !self.socket_missing,
            _ => {
                self.socket_looked_at = Some(Instant::now());
                self.vmm
                    .as_ref()
                    .is_some_and(|v| v.endpoint().control_socket.exists())
            }
        };
        let res = match verdict {
            Ok(GuestRun::Panicked) => {
                warn!(vm_id = %self.rec.vm_id, pid, source = "vmm state", "guest panicked");
                self.orphan_live_vmm(OrphanReason::GuestPanicked).await
            }
            Ok(GuestRun::Crashed(state)) => {
                warn!(vm_id = %self.rec.vm_id, pid, vmm_state = %state, "guest crashed");
                self.orphan_live_vmm(OrphanReason::GuestCrashed).await
            }
            Ok(run) => {
                let slow = !cfg.slow_threshold.is_zero() && started.elapsed() > cfg.slow_threshold;
                self.slow_checks = if slow {
                    self.slow_checks.saturating_add(1)
                } else {
                    0
                };
                if socket_there == self.socket_missing {
                    self.control_socket_changed(socket_there).await;
                }
                self.last_seen_ms = now;
                let h = &mut self.rec.health;
                h.last_activity_ms = now;
                h.consecutive_failures = 0;
                h.consecutive_successes = h.consecutive_successes.saturating_add(1);
                h.last_error.clear();
                if !socket_there {
                    h.last_error =
                        "control socket file missing; metald's held connection still works".into();
                }
                let recovered = !h.is_healthy && h.consecutive_successes >= cfg.recovery_threshold;
                if recovered {
                    h.is_healthy = true;
                    h.recovery_count += 1;
                }
                let mut changed = recovered;
                let stable = self.crashes > 0
                    && h.is_healthy
                    && self
                        .up_since
                        .is_some_and(|t| t.elapsed() >= self.env.gate.config().stable_period);
                if stable {
                    info!(vm_id = %self.rec.vm_id, crashes = self.crashes, "vm stable; crash count reset");
                    self.crashes = 0;
                    self.up_since = None;
                }
                let drift = match (self.rec.observed, run) {
                    (VmState::Running, GuestRun::Paused) => Some(VmState::Paused),
                    (VmState::Paused, GuestRun::Running) => Some(VmState::Running),
                    _ => None,
                };
                if let Some(actual) = drift {
                    warn!(vm_id = %self.rec.vm_id, recorded = %self.rec.observed, actual = %actual, "vm state drifted; recording what the vmm reports");
                    changed = self.observe(actual, Cause::Drift).is_ok();
                }
                let res = if changed {
                    self.save().await
                } else {
                    self.publish_health();
                    Ok(())
                };
                if recovered {
                    self.env
                        .emit(
                            &self.rec,
                            EventKind::HealthChanged,
                            self.rec.observed,
                            self.rec.observed,
                            "healthy",
                            "",
                        )
                        .await;
                    info!(vm_id = %self.rec.vm_id, pid, "vm healthy again");
                }
                res
            }
            Err((reason, error)) => {
                self.slow_checks = 0;
                let h = &mut self.rec.health;
                h.consecutive_failures = h.consecutive_failures.saturating_add(1);
                h.consecutive_successes = 0;
                h.last_error = error.clone();
                let failures = h.consecutive_failures;
                warn!(
                    vm_id = %self.rec.vm_id,
                    pid,
                    reason = reason.as_str(),
                    error = %error,
                    consecutive_failures = failures,
                    duration_ms = crate::model::ms(started.elapsed()),
                    "vm health check failed"
                );
                if failures >= cfg.orphan_threshold {
                    self.orphan_live_vmm(reason).await
                } else if failures == cfg.failure_threshold && self.rec.health.is_healthy {
                    self.rec.health.is_healthy = false;
                    let res = self.save().await;
                    self.env
                        .emit(
                            &self.rec,
                            EventKind::HealthChanged,
                            self.rec.observed,
                            self.rec.observed,
                            "unhealthy",
                            &format!("{}: {error}", reason.as_str()),
                        )
                        .await;
                    warn!(vm_id = %self.rec.vm_id, pid, reason = reason.as_str(), "vm unhealthy");
                    res
                } else {
                    self.publish();
                    Ok(())
                }
            }
        };
        if let Err(e) = res {
            warn!(vm_id = %self.rec.vm_id, error = %e, "recording health failed");
        }
        if let Some(why) = self.impairment() {
            self.replace_impaired(why).await;
        }
    }

    /// The VMM's control socket file disappeared (or came back) while metald's held connection
    /// keeps working. The guest is fine and stays up; operators are told, because nothing but
    /// this connection can reach the VMM now (a metald restart could not re-attach to it).
    pub(super) async fn control_socket_changed(&mut self, there: bool) {
        self.socket_missing = !there;
        let sock = self
            .vmm
            .as_ref()
            .map(|v| v.endpoint().control_socket.display().to_string())
            .unwrap_or_default();
        let (kind, msg) = if there {
            (EventKind::ControlSocketRestored, "vmm control socket back")
        } else {
            (EventKind::ControlSocketLost, "vmm control socket missing")
        };
        self.env
            .emit(
                &self.rec,
                kind,
                self.rec.observed,
                self.rec.observed,
                "",
                &sock,
            )
            .await;
        if there {
            info!(vm_id = %self.rec.vm_id, control_socket = %sock, "{msg}");
        } else {
            warn!(vm_id = %self.rec.vm_id, control_socket = %sock, "{msg}");
        }
    }

    /// Orphans a VM whose VMM is alive but cannot be driven (hung, or its socket is gone): the
    /// VMM is killed through its pidfd, which cannot hit another process, so it cannot linger
    /// half-alive beside a replacement.
    pub(super) async fn orphan_live_vmm(&mut self, reason: OrphanReason) -> Result<()> {
        let Some(vmm) = self.vmm.take() else {
            return Ok(());
        };
        let pid = vmm.pid();
        let _ = vmm.kill();
        let exit = if exited_within(&vmm, KILL_WAIT).await {
            format!("{}; killed by metald ({reason})", vmm.pidfd().reap())
        } else {
            format!(
                "did not exit within {} ms of SIGKILL",
                KILL_WAIT.as_millis()
            )
        };
        self.forget_vmm().await;
        self.orphan(reason, pid, Some(exit)).await
    }
}
