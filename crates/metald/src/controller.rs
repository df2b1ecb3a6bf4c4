//! One controller per VM: the only code that changes a VM.
//!
//! Each VM has an actor task that owns its registry row and its VMM process. API calls reach it
//! as typed [`Op`]s over a channel and are handled one at a time, so two operations on one VM
//! never interleave. The actor also waits on the VMM's pidfd, so a VMM exit is an event handled
//! in the same loop, milliseconds after it happens, never a poll.
//!
//! Every operation first commits the new desired state to the registry, then calls
//! [`Controller::reconcile`], which drives the VMM from what it is toward what is desired. The
//! same reconcile is what later recovers a dead VMM: recovery is not a separate code path.
//!
//! Health checks are a timer in the same loop: the VMM's API is pinged on an interval with
//! jitter; a streak of failures makes the VM unhealthy, a longer one orphans it (the VMM, alive
//! but useless, is killed through its pidfd). Because checks run inside the actor, a check never
//! races an operation on the same VM, and 1,000 VMs cost 1,000 timers, not 1,000 threads.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::future::Future;
use std::pin::Pin;

use rand::Rng;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::config::{GuestProbe, HealthConfig};
use crate::driver::qga::GuestInfo;
use crate::driver::{
    DriverError, ExitCause, GuestRun, ShutdownReason, SpawnRequest, VmmDriver, VmmEvent, VmmProcess,
};
use crate::error::{Error, Result};
use crate::events::EventBus;
use crate::guest::{AgentHandle, ProbeResult};
use crate::metrics::Metrics;
use crate::model::{
    Desired, EventKind, GuestStatus, OrphanReason, RestartPolicy, Target, Transition, Trigger,
    VmState,
};
use crate::recovery::{Admission, RecoveryGate};
use crate::store::{AttemptRecord, Store, VmRecord, now_ms};

/// An operation sent to a VM's controller.
#[derive(Debug, Clone)]
pub enum Op {
    /// Start and configure the VMM of a new VM (or load a snapshot into it). On failure
    /// everything created is removed.
    Create {
        /// A snapshot directory to start from.
        restore: Option<PathBuf>,
    },
    /// Write a snapshot into this (existing, empty) directory.
    Snapshot {
        /// Where.
        dest: PathBuf,
        /// Only the memory dirtied since the last snapshot.
        diff: bool,
    },
    /// A lifecycle transition. `graceful` bounds how long a shutdown waits for the guest
    /// (`None`: stop the VMM at once).
    Lifecycle {
        /// The transition.
        op: Transition,
        /// Grace period for a guest power-off.
        graceful: Option<Duration>,
    },
    /// Remove the VM: VMM, files and row.
    Delete {
        /// Grace period for a guest power-off before the VMM is stopped.
        graceful: Option<Duration>,
    },
    /// Recover an orphaned or failed VM now, bypassing backoff and breaker.
    Recover,
    /// Turn automatic recovery on or off for this VM.
    SetAutoRecover(bool),
    /// Compare what is with what should be, and repair: a pass of the reconcile loop.
    Reconcile,
    /// Ask the guest agent about the guest.
    GuestInfo,
    /// Save the running guest into this (existing, empty) directory and stop its VMM, for a
    /// host drain; the VM keeps its desired state, and its next start restores the guest.
    Save {
        /// Where.
        dest: PathBuf,
    },
}

/// What a reconcile pass did to one VM.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Did {
    /// Its VMM had died without the exit event being handled.
    pub missed_exit: bool,
    /// A recovery was scheduled for it.
    pub scheduled: bool,
    /// It was not in its desired state and was driven there.
    pub converged: bool,
    /// It has no VMM, and a control socket a VMM left was removed.
    pub stale_socket_removed: bool,
}

/// A controller's answer: the VM's row after the operation, and what a reconcile did.
#[derive(Debug, Clone)]
pub struct OpResult {
    /// The row.
    pub rec: VmRecord,
    /// For [`Op::Reconcile`], what it did.
    pub did: Did,
    /// For [`Op::GuestInfo`], what the agent said.
    pub guest_info: Option<GuestInfo>,
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<OpResult>>,
}

type PermitFuture =
    Pin<Box<dyn Future<Output = std::result::Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// The sending side of a controller; cheap to clone.
#[derive(Debug, Clone)]
pub struct ControllerHandle {
    tx: mpsc::Sender<Request>,
    vm_id: String,
}

impl ControllerHandle {
    /// Sends `op` and waits for the controller to finish it.
    pub async fn call(&self, op: Op) -> Result<VmRecord> {
        self.call_full(op).await.map(|r| r.rec)
    }

    /// Like [`ControllerHandle::call`], with what a reconcile did.
    pub async fn call_full(&self, op: Op) -> Result<OpResult> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { op, reply })
            .await
            .map_err(|_| Error::NotFound(self.vm_id.clone()))?;
        rx.await
            .map_err(|_| Error::Unavailable(self.vm_id.clone(), "controller stopped".into()))?
    }
}

/// Settings every controller shares.
#[derive(Debug, Clone)]
pub struct ControllerEnv {
    /// The registry.
    pub store: Store,
    /// The VMM driver.
    pub driver: Arc<dyn VmmDriver>,
    /// Parent of the per-VM run directories.
    pub run_root: PathBuf,
    /// Health-check settings.
    pub health: HealthConfig,
    /// The host-wide recovery gate.
    pub gate: Arc<RecoveryGate>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The event history.
    pub events: Arc<EventBus>,
    /// The host's mode.
    pub host: Arc<crate::host::Host>,
}

/// The VM as its controller knows it, shared with the supervisor so that reads get the truth
/// without queueing behind an operation in progress, and even while the registry cannot be
/// written.
pub type SharedRecord = Arc<Mutex<VmRecord>>;

/// Reads a [`SharedRecord`]; a poisoned lock still holds a usable record.
pub fn read_live(h: &SharedRecord) -> VmRecord {
    h.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// What start-up re-attachment found for a VM. The supervisor only looks; the VM's controller,
/// its one writer, records it (row, event, metric, log) as the first thing it does.
#[derive(Debug)]
pub enum Attach {
    /// A new VM, or one whose row names no VMM: nothing to record.
    Nothing,
    /// Its VMM is alive and is this VM's (pid, start time and control socket agree): adopted,
    /// its guest in this run state.
    Adopted(VmmProcess, GuestRun),
    /// The VMM its row names is gone, or is not its own any more.
    Lost(OrphanReason),
}

/// Marks `rec` orphaned: no VMM, the reason and time recorded, unhealthy.
fn orphan_record(rec: &mut VmRecord, reason: OrphanReason, exit: Option<String>) {
    rec.observed = VmState::Orphaned;
    rec.orphan_reason = Some(reason);
    rec.orphaned_at_ms = Some(now_ms());
    rec.endpoint = None;
    if exit.is_some() {
        rec.last_exit = exit;
    }
    rec.health.is_healthy = false;
    rec.health.pid = None;
}

impl std::fmt::Debug for dyn VmmDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VmmDriver({})", self.kind())
    }
}

/// How often a health check looks for the control socket file.
const SOCKET_LOOK_EVERY: Duration = Duration::from_secs(3);

/// What the Linux kernel prints when it panics.
const PANIC_LINE: &str = "Kernel panic - not syncing";

/// How long to wait for a VMM to exit after `quit`, and after SIGKILL.
const QUIT_WAIT: Duration = Duration::from_secs(3);
const KILL_WAIT: Duration = Duration::from_secs(5);

/// A VM's controller: its row, its VMM process, and the environment to act in.
pub struct Controller {
    rec: VmRecord,
    vmm: Option<VmmProcess>,
    env: ControllerEnv,
    /// When the VMM was last known good (spawned, adopted, or answering), ms since the epoch.
    last_seen_ms: i64,
    /// The live health status, shared with the supervisor.
    /// What reads see: this VM as the controller knows it.
    live: SharedRecord,
    /// The registry is behind `rec` (a write was refused); the next save writes it all.
    unsaved: bool,
    /// When the next health check is due.
    next_check: Instant,
    /// When the next recovery attempt is due, while one is scheduled.
    retry_at: Option<Instant>,
    /// Reconcile passes that failed to converge the VM in a row, and when the next may try:
    /// a VM that cannot reach its desired state (its kernel gone, say) is requeued with the
    /// recovery backoff, not retried on every pass.
    converge_failures: u32,
    converge_after: Option<Instant>,
    /// Waiting for a recovery permit, once the attempt is due and admitted.
    permit: Option<PermitFuture>,
    /// The scheduled attempt is the breaker's probe.
    probe: bool,
    /// What the current recovery streak is about.
    trigger: Trigger,
    /// The last recovery error, for the final report.
    last_recovery_error: String,
    /// Since when the VMM has been up after a recovery, for resetting the crash count.
    up_since: Option<Instant>,
    /// Crashes since the VM was last up and healthy for the stable period.
    crashes: u32,
    /// A snapshot to start the next VMM from (only the first, at create).
    restore_from: Option<PathBuf>,
    /// The last snapshot this VMM's memory is known to match (its last snapshot, or the one it
    /// was restored from): the base a diff snapshot is merged onto. None for a fresh VMM.
    snapshot_base: Option<PathBuf>,
    /// The VMM's events, while its control connection is held.
    vmm_events: Option<mpsc::Receiver<VmmEvent>>,
    /// The VMM's driver sends events (so a lost connection is worth re-opening).
    watchable: bool,
    /// The last shutdown reason the VMM reported, for its exit cause.
    reported_shutdown: Option<ShutdownReason>,
    /// The current VMM's guest agent task.
    agent: Option<AgentHandle>,
    /// Its probe results.
    probes: Option<mpsc::Receiver<ProbeResult>>,
    /// By when a probed guest that is not ready yet must answer.
    ready_deadline: Option<Instant>,
    /// When the guest was last started and why (`boot`, `recovery`, `restore`), until ready.
    guest_started: Option<(Instant, &'static str)>,
    /// What the next guest start is: set by recovery and restore, `boot` otherwise.
    start_trigger: &'static str,
    /// When a recovered VM went down, while its downtime runs until the guest is ready.
    down_since_ms: Option<i64>,
    /// The console log, held open while it is scanned for a kernel panic (an fstat and a read
    /// per health check, no path lookup), with how much of it was scanned.
    console: Option<(std::fs::File, u64)>,
    /// Scan the console only from its current end (an adopted VMM's old output was not live).
    console_from_end: bool,
    /// When the control socket file was last looked for.
    socket_looked_at: Option<Instant>,
    /// The control socket file is gone while the held connection still works.
    socket_missing: bool,
}

impl Controller {
    /// Starts the actor for `rec`, which first records what re-attachment found (`attach`).
    /// Returns its handle and the task, which ends when the VM is deleted or every handle is
    /// dropped.
    pub fn start(
        rec: VmRecord,
        attach: Attach,
        env: ControllerEnv,
    ) -> (ControllerHandle, SharedRecord, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(16);
        let handle = ControllerHandle {
            tx,
            vm_id: rec.vm_id.to_string(),
        };
        let live = Arc::new(Mutex::new(rec.clone()));
        let first_check = Instant::now() + jittered(&env.health);
        let ctl = Controller {
            last_seen_ms: rec.updated_at_ms,
            rec,
            vmm: None,
            env,
            live: live.clone(),
            unsaved: false,
            next_check: first_check,
            retry_at: None,
            converge_failures: 0,
            converge_after: None,
            permit: None,
            probe: false,
            trigger: Trigger::Orphan(OrphanReason::ProcessDead),
            last_recovery_error: String::new(),
            up_since: None,
            crashes: 0,
            restore_from: None,
            snapshot_base: None,
            vmm_events: None,
            watchable: false,
            reported_shutdown: None,
            agent: None,
            probes: None,
            ready_deadline: None,
            guest_started: None,
            start_trigger: "boot",
            down_since_ms: None,
            console: None,
            console_from_end: false,
            socket_looked_at: None,
            socket_missing: false,
        };
        let task = tokio::spawn(ctl.run(rx, attach));
        (handle, live, task)
    }

    /// Records what re-attachment found, before anything else reaches this VM.
    async fn on_attach(&mut self, attach: Attach) {
        match attach {
            Attach::Nothing => {}
            Attach::Adopted(vmm, run) => {
                // A guest that panicked or crashed while metald was down is adopted as running:
                // the first health check sees the run state and orphans it, saying why.
                let observed = match run {
                    GuestRun::NotStarted => VmState::Created,
                    // A VMM that loaded a snapshot or a drain's save holds its guest paused
                    // until the VM boots: it is still the CREATED VM the row says.
                    GuestRun::Paused
                        if self.rec.observed == VmState::Created && self.rec.saved.is_some() =>
                    {
                        VmState::Created
                    }
                    GuestRun::Running
                    | GuestRun::Suspended
                    | GuestRun::Panicked
                    | GuestRun::Crashed(_) => VmState::Running,
                    GuestRun::Paused => VmState::Paused,
                    GuestRun::ShutDown => VmState::Shutdown,
                };
                info!(vm_id = %self.rec.vm_id, pid = vmm.endpoint.pid, state = %observed, "vmm re-attached");
                self.last_seen_ms = now_ms();
                let h = &mut self.rec.health;
                h.is_healthy = true;
                h.consecutive_failures = 0;
                h.pid = Some(vmm.endpoint.pid);
                h.last_activity_ms = self.last_seen_ms;
                self.rec.observed = observed;
                self.rec.endpoint = Some(vmm.endpoint.clone());
                self.rec.orphan_reason = None;
                self.rec.orphaned_at_ms = None;
                self.vmm = Some(vmm);
                if let Err(e) = self.save().await {
                    warn!(vm_id = %self.rec.vm_id, error = %e, "recording the re-attached vmm failed");
                }
            }
            Attach::Lost(reason) => {
                let pid = self.rec.endpoint.as_ref().map_or(0, |e| e.pid);
                let exit = format!("vmm lost while metald was down ({reason})");
                let wanted_up = matches!(
                    self.rec.desired,
                    Desired::State(Target::Created | Target::Running | Target::Paused)
                );
                let res = if wanted_up {
                    // The same record, event, metric and log as an exit seen live; its
                    // recovery is scheduled as for any orphan.
                    self.orphan(reason, pid, Some(exit)).await
                } else {
                    info!(vm_id = %self.rec.vm_id, pid, exit = %exit, "vmm exited");
                    self.rec.endpoint = None;
                    self.rec.health.pid = None;
                    self.rec.last_exit = Some(exit);
                    self.set_observed(VmState::Shutdown).await
                };
                if let Err(e) = res {
                    warn!(vm_id = %self.rec.vm_id, error = %e, "recording the lost vmm failed");
                }
            }
        }
    }

    fn run_dir(&self) -> PathBuf {
        self.env.run_root.join(self.rec.vm_id.as_str())
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Request>, attach: Attach) {
        self.on_attach(attach).await;
        self.publish();
        if self.vmm.is_some() {
            // An adopted VMM: watch it from here on. Console output it wrote while metald was
            // away was not seen live; a panic in it shows up in the VMM's run state instead.
            self.console_from_end = true;
            self.attach_vmm().await;
            if self.rec.observed == VmState::Running && self.probed() && !self.rec.guest.ready {
                self.guest_started = Some((Instant::now(), "boot"));
                self.arm_ready_deadline();
            }
        }
        loop {
            let check_at = self.check_due();
            let ready_at = self.ready_due();
            tokio::select! {
                req = rx.recv() => {
                    // All handles dropped: metald is shutting down. The VMM is left running on
                    // purpose; the next metald adopts it.
                    let Some(req) = req else { break };
                    let deleting = matches!(req.op, Op::Delete { .. });
                    let creating = matches!(req.op, Op::Create { .. });
                    let res = self.handle(req.op).await;
                    // Before the reply, so that the caller's next read sees what it did.
                    self.publish();
                    let gone = deleting && res.is_ok() || creating && res.is_err();
                    let _ = req.reply.send(res);
                    if gone {
                        break;
                    }
                }
                _ = wait_exit(&self.vmm) => self.on_unexpected_exit().await,
                _ = sleep_until(check_at) => self.health_check().await,
                _ = sleep_until(self.retry_at) => self.on_retry_due(),
                permit = wait_permit(&mut self.permit) => self.on_permit(permit).await,
                ev = recv_opt(&mut self.vmm_events) => self.on_vmm_event(ev).await,
                res = recv_opt(&mut self.probes) => self.on_probe(res).await,
                _ = sleep_until(ready_at) => self.on_ready_deadline().await,
            }
            // Reads see the VM as this controller now knows it, whatever the handler changed.
            self.publish();
        }
        debug!(vm_id = %self.rec.vm_id, "controller stopped");
    }

    async fn handle(&mut self, op: Op) -> Result<OpResult> {
        let mut did = Did::default();
        let mut guest_info = None;
        match op {
            Op::Create { restore } => {
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
                self.env
                    .events
                    .announce(self.rec.vm_id.as_str(), EventKind::Deleted, "vm deleted");
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
                    self.env.store.set_spec(&self.rec.vm_id, &spec).await?;
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
            Op::Reconcile => did = self.reconcile_pass().await,
            Op::Snapshot { dest, diff } => self.snapshot(&dest, diff).await?,
            Op::Save { dest } => self.save_guest(&dest).await?,
            Op::GuestInfo => guest_info = Some(self.guest_info().await?),
        }
        Ok(OpResult {
            rec: self.rec.clone(),
            did,
            guest_info,
        })
    }

    /// Pauses the guest (if running), has the driver write the snapshot, and resumes it.
    async fn snapshot(&mut self, dest: &std::path::Path, diff: bool) -> Result<()> {
        let was = self.rec.observed;
        if !matches!(was, VmState::Running | VmState::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "cannot snapshot a vm that is {was}"
            )));
        }
        let Some(ep) = self.vmm.as_ref().map(|v| v.endpoint.clone()) else {
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
        let driver = self.env.driver.clone();
        if was == VmState::Running {
            driver.pause(&ep).await?;
            self.set_observed(VmState::Paused).await?;
        }
        crate::crash_point!("snapshot.after_pause");
        let started = Instant::now();
        let res = driver.snapshot(&ep, dest, base.as_deref()).await;
        crate::crash_point!("snapshot.after_write");
        // Whatever the outcome, the VMM's dirty-page log was reset or is in doubt: only a
        // snapshot that was written whole can be the next diff's base.
        self.snapshot_base = res.is_ok().then(|| dest.to_path_buf());
        if was == VmState::Running {
            // Resume even when the snapshot failed: the guest must not stay paused by accident.
            driver.resume(&ep).await?;
            self.guest_resumed();
            self.set_observed(VmState::Running).await?;
        }
        res?;
        info!(vm_id = %self.rec.vm_id, path = %dest.display(), duration_ms = started.elapsed().as_millis() as u64, "vm snapshot written");
        Ok(())
    }

    /// Saves the guest to `dest` (a full snapshot: QEMU's migration stream, Firecracker's
    /// snapshot) and stops its VMM. Until its next start the VM is SHUTDOWN with no VMM, wants
    /// what it wanted, and records where its guest is; that start restores the guest, which
    /// carries on where it was. A save that fails leaves the guest running as it was.
    async fn save_guest(&mut self, dest: &std::path::Path) -> Result<()> {
        let was = self.rec.observed;
        if !matches!(was, VmState::Running | VmState::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "cannot save a vm that is {was}"
            )));
        }
        let Some(ep) = self.vmm.as_ref().map(|v| v.endpoint.clone()) else {
            return Err(Error::FailedPrecondition("the vm has no vmm".into()));
        };
        let driver = self.env.driver.clone();
        if was == VmState::Running {
            driver.pause(&ep).await?;
        }
        let started = Instant::now();
        if let Err(e) = driver.snapshot(&ep, dest, None).await {
            if was == VmState::Running {
                driver.resume(&ep).await?;
                self.guest_resumed();
            }
            return Err(e.into());
        }
        self.rec.saved = Some(dest.to_path_buf());
        crate::crash_point!("save.after_snapshot");
        self.stop_vmm(None, "saved by a host drain").await?;
        self.env
            .events
            .emit(
                self.rec.vm_id.as_str(),
                EventKind::Saved,
                was,
                VmState::Shutdown,
                "host_drain",
                &dest.display().to_string(),
            )
            .await;
        info!(vm_id = %self.rec.vm_id, path = %dest.display(), duration_ms = started.elapsed().as_millis() as u64, "vm saved");
        Ok(())
    }

    /// One reconcile-loop visit: catches an exit whose event was missed, schedules recovery for
    /// an orphan nobody is recovering (one found at start-up, say), and drives a VM stuck short
    /// of its desired state there.
    async fn reconcile_pass(&mut self) -> Did {
        let mut did = Did::default();
        if self.unsaved {
            // The registry refused an earlier write; try again with everything.
            let _ = self.save().await;
        }
        if self.vmm.as_ref().is_some_and(|v| v.pidfd.has_exited()) {
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
                did.converged = self.set_observed(VmState::Shutdown).await.is_ok();
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

    /// Whether a convergence that failed before is still backing off.
    fn converge_waits(&self) -> bool {
        self.converge_after.is_some_and(|t| Instant::now() < t)
    }

    /// Records a convergence's outcome; a failure pushes the next try back.
    fn converge_done(&mut self, res: Result<()>) -> bool {
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

    fn orphan_trigger(&self) -> Trigger {
        Trigger::Orphan(self.rec.orphan_reason.unwrap_or(OrphanReason::ProcessDead))
    }

    /// Schedules the next recovery attempt, with backoff, unless one is already under way (a
    /// second trigger for the same failure coalesces into it), recovery is off for this VM or
    /// host, or the attempts are used up (then the VM is FAILED). Returns whether it scheduled.
    async fn schedule_recovery(&mut self, trigger: Trigger) -> bool {
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

    fn cancel_recovery(&mut self) {
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
    fn on_retry_due(&mut self) {
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

    async fn on_permit(&mut self, permit: std::result::Result<OwnedSemaphorePermit, AcquireError>) {
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
    async fn attempt_recovery(&mut self, manual: bool) -> Result<()> {
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
    async fn fail_completely(&mut self) {
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
                self.set_observed(VmState::Shutdown).await?;
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
            // A VMM that cannot be driven to the desired state is stopped rather than left
            // half-way, so the registry never claims a state the VMM is not in.
            warn!(vm_id = %self.rec.vm_id, error = %e, "vmm did not reach {want}; stopping it");
            self.stop_vmm(None, "failed to converge").await?;
        }
        result
    }

    async fn converge_running_vmm(&mut self, want: VmState) -> Result<()> {
        let driver = self.env.driver.clone();
        let Some(ep) = self.vmm.as_ref().map(|p| p.endpoint.clone()) else {
            return Ok(());
        };
        let mut now = self.rec.observed;
        if want != VmState::Created && now == VmState::Created {
            driver.boot(&ep).await?;
            crate::crash_point!("boot.after_vmm");
            self.guest_starting();
            now = VmState::Running;
        }
        match (want, now) {
            (VmState::Paused, VmState::Running) => {
                driver.pause(&ep).await?;
                crate::crash_point!("pause.after_vmm");
                now = VmState::Paused;
            }
            (VmState::Running, VmState::Paused) => {
                driver.resume(&ep).await?;
                crate::crash_point!("resume.after_vmm");
                self.guest_resumed();
                now = VmState::Running;
            }
            _ => {}
        }
        if now != self.rec.observed {
            self.set_observed(now).await?;
        }
        Ok(())
    }

    /// Spawns and configures a fresh VMM (guest not booted), recording it before anything else
    /// happens to it.
    async fn start_vmm(&mut self) -> Result<()> {
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
        };
        let vmm = driver.spawn(&req).await?;
        crate::crash_point!("start.after_spawn");
        info!(vm_id = %self.rec.vm_id, pid = vmm.endpoint.pid, vmm = driver.kind(), "vmm started");
        let ep = vmm.endpoint.clone();
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
        self.next_check = Instant::now() + jittered(&self.env.health);
        self.set_observed(VmState::Created).await?;
        let prepared = match &restore {
            Some(dir) => driver.restore(&ep, &self.rec.spec, dir).await,
            None => driver.configure(&ep, &self.rec.spec).await,
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
    async fn stop_vmm(&mut self, graceful: Option<Duration>, why: &str) -> Result<()> {
        let Some(vmm) = self.vmm.as_ref() else {
            return Ok(());
        };
        let driver = self.env.driver.clone();
        let ep = vmm.endpoint.clone();
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
                driver.shutdown(&ep).await
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
        if !vmm.pidfd.has_exited() {
            match driver.quit(&ep).await {
                Ok(()) if exited_within(vmm, QUIT_WAIT).await => how = "vmm quit",
                _ => {}
            }
        }
        if !vmm.pidfd.has_exited() {
            driver.kill(vmm)?;
            if !exited_within(vmm, KILL_WAIT).await {
                return Err(DriverError::Timeout {
                    what: format!("SIGKILL of pid {}", ep.pid),
                    millis: KILL_WAIT.as_millis(),
                }
                .into());
            }
        }
        let status = vmm.pidfd.reap();
        crate::crash_point!("stop.after_exit");
        info!(
            vm_id = %self.rec.vm_id,
            pid = ep.pid,
            reason = why,
            how,
            exit = %status,
            duration_ms = started.elapsed().as_millis() as u64,
            "vmm stopped"
        );
        self.vmm = None;
        self.forget_vmm().await;
        self.rec.last_exit = Some(format!("{status} ({why})"));
        self.set_observed(VmState::Shutdown).await
    }

    /// Handles the pidfd event of a VMM that exited without metald asking it to.
    async fn on_unexpected_exit(&mut self) {
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

    /// Forgets a VMM that is gone (its process taken and reaped by the caller): no endpoint, no
    /// pid, and whatever the driver keeps outside the run directory (a jail) released.
    async fn forget_vmm(&mut self) {
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

    /// Opens the control connection of the current VMM (its events) and starts its guest
    /// agent task. Called for every new or adopted VMM.
    async fn attach_vmm(&mut self) {
        let Some(ep) = self.vmm.as_ref().map(|v| v.endpoint.clone()) else {
            return;
        };
        self.reported_shutdown = None;
        self.socket_missing = false;
        self.watch_vmm().await;
        let (agent, probes) = AgentHandle::start(
            self.env.driver.clone(),
            ep,
            self.rec.spec.guest_health,
            self.probed(),
        );
        self.agent = Some(agent);
        self.probes = Some(probes);
    }

    async fn watch_vmm(&mut self) {
        let Some(ep) = self.vmm.as_ref().map(|v| v.endpoint.clone()) else {
            return;
        };
        match self.env.driver.watch(&ep).await {
            Ok(rx) => {
                self.watchable = rx.is_some();
                self.vmm_events = rx;
            }
            Err(e) => {
                // Health checks still reach the VMM on a connection of their own; the next one
                // tries to open the held connection again.
                warn!(vm_id = %self.rec.vm_id, pid = ep.pid, error = %e, "watching the vmm failed");
                self.watchable = true;
                self.vmm_events = None;
            }
        }
    }

    /// Takes the events still queued from a VMM that exited, until its connection ends.
    async fn drain_vmm_events(&mut self) {
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
    async fn on_vmm_event(&mut self, ev: Option<VmmEvent>) {
        let Some(ev) = ev else {
            self.vmm_events = None;
            if self.vmm.as_ref().is_some_and(|v| !v.pidfd.has_exited()) {
                warn!(vm_id = %self.rec.vm_id, "vmm control connection lost; reopening it at the next health check");
            }
            return;
        };
        debug!(vm_id = %self.rec.vm_id, event = ?ev, "vmm event");
        match ev {
            VmmEvent::Shutdown(reason) => self.reported_shutdown = Some(reason),
            VmmEvent::GuestPanicked => {
                let pid = self.vmm.as_ref().map_or(0, |v| v.endpoint.pid);
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
    fn probed(&self) -> bool {
        self.rec.spec.guest_health.probe == GuestProbe::Agent
    }

    /// When the startup deadline of a probed guest falls, while it is running and not ready.
    fn ready_due(&self) -> Option<Instant> {
        self.ready_deadline
            .filter(|_| self.rec.observed == VmState::Running && self.vmm.is_some())
    }

    /// A fresh guest starts running: it is not ready until its first answered probe.
    fn guest_starting(&mut self) {
        // A restore's trigger is used once; a recovery sets its own for each attempt.
        let trigger = std::mem::replace(&mut self.start_trigger, "boot");
        self.rec.guest = GuestStatus::default();
        self.guest_started = Some((Instant::now(), trigger));
        if self.probed() {
            self.arm_ready_deadline();
        }
    }

    /// A probed guest that is not ready gets its whole startup time from now.
    fn arm_ready_deadline(&mut self) {
        self.ready_deadline = Some(Instant::now() + self.rec.spec.guest_health.startup_timeout);
    }

    /// A paused guest runs again: its silence while paused does not count, and one not ready
    /// yet gets its whole startup time again.
    fn guest_resumed(&mut self) {
        if !self.probed() {
            return;
        }
        self.rec.guest.consecutive_failures = 0;
        if !self.rec.guest.ready {
            self.arm_ready_deadline();
        }
    }

    /// Acts on one guest probe (`None`: the agent task ended with its VMM).
    async fn on_probe(&mut self, res: Option<ProbeResult>) {
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
                warn!(vm_id = %self.rec.vm_id, error = %error, consecutive_failures = failures, took_ms = res.took.as_millis() as u64, "guest probe failed");
                if failures >= threshold {
                    let pid = self.vmm.as_ref().map_or(0, |v| v.endpoint.pid);
                    warn!(vm_id = %self.rec.vm_id, pid, consecutive_failures = failures, error = %error, "guest unresponsive");
                    if let Err(e) = self.orphan_live_vmm(OrphanReason::GuestUnresponsive).await {
                        warn!(vm_id = %self.rec.vm_id, error = %e, "recording guest failure failed");
                    }
                }
            }
        }
    }

    /// The guest answered for the first time since it started.
    async fn on_guest_ready(&mut self) {
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
            m.downtime.observe(d as f64 / 1000.0);
        }
        let saved = self.save().await;
        self.env
            .events
            .emit(
                self.rec.vm_id.as_str(),
                EventKind::GuestReady,
                self.rec.observed,
                self.rec.observed,
                trigger,
                &format!("guest answered {} ms after it started", took.as_millis()),
            )
            .await;
        info!(vm_id = %self.rec.vm_id, trigger, ready_ms = took.as_millis() as u64, downtime_ms = downtime_ms.unwrap_or(0), "guest ready");
        if let Err(e) = saved {
            warn!(vm_id = %self.rec.vm_id, error = %e, "recording guest readiness failed");
        }
    }

    /// A probed guest did not answer within its startup timeout.
    async fn on_ready_deadline(&mut self) {
        self.ready_deadline = None;
        if self.rec.guest.ready || !self.probed() {
            return;
        }
        let pid = self.vmm.as_ref().map_or(0, |v| v.endpoint.pid);
        let timeout = self.rec.spec.guest_health.startup_timeout;
        warn!(vm_id = %self.rec.vm_id, pid, startup_timeout_ms = timeout.as_millis() as u64, error = %self.rec.guest.last_error, "guest unresponsive");
        if let Err(e) = self.orphan_live_vmm(OrphanReason::GuestUnresponsive).await {
            warn!(vm_id = %self.rec.vm_id, error = %e, "recording guest failure failed");
        }
    }

    /// Asks the guest agent about the guest.
    async fn guest_info(&mut self) -> Result<GuestInfo> {
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
    fn console_shows_panic(&mut self) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        if !self.rec.spec.console {
            return false;
        }
        if self.console.is_none() {
            let Some(path) = self.vmm.as_ref().map(|v| v.endpoint.console_log.clone()) else {
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
        let len = f.metadata().map_or(0, |m| m.len());
        if len < *seen {
            // Truncated under us: read it from the start.
            *seen = 0;
        }
        if len == *seen {
            return false;
        }
        // Re-read a little of what was seen, so a line split across two looks still matches;
        // never more than the last 64 KiB, however much the guest wrote.
        let from = seen
            .saturating_sub(PANIC_LINE.len() as u64)
            .max(len.saturating_sub(64 * 1024));
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(from)).is_err()
            || f.by_ref().take(len - from).read_to_end(&mut buf).is_err()
        {
            return false;
        }
        *seen = len;
        buf.windows(PANIC_LINE.len())
            .any(|w| w == PANIC_LINE.as_bytes())
    }

    /// Records the VM as orphaned, then logs the event alert rules match on: once the line is
    /// out, the registry already says so.
    async fn orphan(&mut self, reason: OrphanReason, pid: i32, exit: Option<String>) -> Result<()> {
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

    /// When the next health check is due, if one should run at all.
    fn check_due(&self) -> Option<Instant> {
        let checkable = matches!(
            self.rec.observed,
            VmState::Created | VmState::Running | VmState::Paused
        );
        (self.env.health.enabled && checkable && self.vmm.is_some()).then_some(self.next_check)
    }

    /// Pings the VMM once, bounded by the health timeout, and acts on the verdict.
    async fn health_check(&mut self) {
        let started = Instant::now();
        self.next_check = started + jittered(&self.env.health);
        let Some(ep) = self.vmm.as_ref().map(|v| v.endpoint.clone()) else {
            return;
        };
        if self.console_shows_panic() {
            warn!(vm_id = %self.rec.vm_id, pid = ep.pid, source = "console", "guest panicked");
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
            match tokio::time::timeout(timeout, self.env.driver.ping(&ep)).await {
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
        if self.vmm.as_ref().is_some_and(|v| v.pidfd.has_exited()) {
            // The VMM died during the check; the exit event, handled next, says why.
            return;
        }
        let now = now_ms();
        self.env.metrics.health_checks.inc();
        if verdict.is_err() {
            self.env.metrics.health_check_failures.inc();
        }
        self.rec.health.last_check_ms = now;
        self.rec.health.pid = Some(ep.pid);
        self.rec.health.control_socket = ep.control_socket.display().to_string();
        let cfg = self.env.health.clone();
        // The socket file is looked for every few seconds, not at every check: losing it changes
        // nothing while the held connection works, and each look is a path walk.
        let socket_there = match self.socket_looked_at {
            Some(t) if t.elapsed() < SOCKET_LOOK_EVERY => !self.socket_missing,
            _ => {
                self.socket_looked_at = Some(Instant::now());
                ep.control_socket.exists()
            }
        };
        let res = match verdict {
            Ok(GuestRun::Panicked) => {
                warn!(vm_id = %self.rec.vm_id, pid = ep.pid, source = "vmm state", "guest panicked");
                self.orphan_live_vmm(OrphanReason::GuestPanicked).await
            }
            Ok(GuestRun::Crashed(state)) => {
                warn!(vm_id = %self.rec.vm_id, pid = ep.pid, vmm_state = %state, "guest crashed");
                self.orphan_live_vmm(OrphanReason::GuestCrashed).await
            }
            Ok(run) => {
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
                    self.rec.observed = actual;
                    changed = true;
                }
                let res = if changed {
                    self.save().await
                } else {
                    self.publish();
                    Ok(())
                };
                if recovered {
                    self.env
                        .events
                        .emit(
                            self.rec.vm_id.as_str(),
                            EventKind::HealthChanged,
                            self.rec.observed,
                            self.rec.observed,
                            "healthy",
                            "",
                        )
                        .await;
                    info!(vm_id = %self.rec.vm_id, pid = ep.pid, "vm healthy again");
                }
                res
            }
            Err((reason, error)) => {
                let h = &mut self.rec.health;
                h.consecutive_failures = h.consecutive_failures.saturating_add(1);
                h.consecutive_successes = 0;
                h.last_error = error.clone();
                let failures = h.consecutive_failures;
                warn!(
                    vm_id = %self.rec.vm_id,
                    pid = ep.pid,
                    reason = reason.as_str(),
                    error = %error,
                    consecutive_failures = failures,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "vm health check failed"
                );
                if failures >= cfg.orphan_threshold {
                    self.orphan_live_vmm(reason).await
                } else if failures == cfg.failure_threshold && self.rec.health.is_healthy {
                    self.rec.health.is_healthy = false;
                    let res = self.save().await;
                    self.env
                        .events
                        .emit(
                            self.rec.vm_id.as_str(),
                            EventKind::HealthChanged,
                            self.rec.observed,
                            self.rec.observed,
                            "unhealthy",
                            &format!("{}: {error}", reason.as_str()),
                        )
                        .await;
                    warn!(vm_id = %self.rec.vm_id, pid = ep.pid, reason = reason.as_str(), "vm unhealthy");
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
    }

    /// The VMM's control socket file disappeared (or came back) while metald's held connection
    /// keeps working. The guest is fine and stays up; operators are told, because nothing but
    /// this connection can reach the VMM now (a metald restart could not re-attach to it).
    async fn control_socket_changed(&mut self, there: bool) {
        self.socket_missing = !there;
        let sock = self
            .vmm
            .as_ref()
            .map(|v| v.endpoint.control_socket.display().to_string())
            .unwrap_or_default();
        let (kind, msg) = if there {
            (EventKind::ControlSocketRestored, "vmm control socket back")
        } else {
            (EventKind::ControlSocketLost, "vmm control socket missing")
        };
        self.env
            .events
            .emit(
                self.rec.vm_id.as_str(),
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
    async fn orphan_live_vmm(&mut self, reason: OrphanReason) -> Result<()> {
        let Some(vmm) = self.vmm.take() else {
            return Ok(());
        };
        let pid = vmm.endpoint.pid;
        let _ = self.env.driver.kill(&vmm);
        let exit = if exited_within(&vmm, KILL_WAIT).await {
            format!("{}; killed by metald ({reason})", vmm.pidfd.reap())
        } else {
            format!(
                "did not exit within {} ms of SIGKILL",
                KILL_WAIT.as_millis()
            )
        };
        self.forget_vmm().await;
        self.orphan(reason, pid, Some(exit)).await
    }

    /// Removes everything of the VM: its VMM, its run directory, then its row. The row goes last
    /// so that a crash part-way leaves a `deleted` tombstone that the next start finishes.
    async fn teardown(&mut self, graceful: Option<Duration>) -> Result<()> {
        self.stop_vmm(graceful, "delete").await?;
        crate::crash_point!("delete.after_stop");
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
        self.env.store.delete(&self.rec.vm_id).await
    }

    async fn set_desired(&mut self, d: Desired) -> Result<()> {
        if self.rec.desired != d {
            // A caller's wish is acknowledged only once it is recorded: a refused write fails
            // the call (and puts the host in readonly), and nothing changes.
            if let Err(e) = self.env.store.set_desired(&self.rec.vm_id, d).await {
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

    async fn set_observed(&mut self, s: VmState) -> Result<()> {
        let from = self.rec.observed;
        self.rec.observed = s;
        self.save().await?;
        if from != s {
            self.env
                .events
                .emit(
                    self.rec.vm_id.as_str(),
                    EventKind::StateChanged,
                    from,
                    s,
                    "",
                    "",
                )
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
    async fn save(&mut self) -> Result<()> {
        self.rec.updated_at_ms = now_ms();
        self.publish();
        let mut res = self.env.store.save_runtime(&self.rec).await;
        if res.is_ok() && self.unsaved {
            res = self
                .env
                .store
                .set_desired(&self.rec.vm_id, self.rec.desired)
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
    fn publish(&self) {
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = self.rec.clone();
    }
}

/// The wait before the next health check: the interval, moved by up to ±jitter.
fn jittered(cfg: &HealthConfig) -> Duration {
    let j = cfg.jitter.clamp(0.0, 0.5);
    let factor = if j > 0.0 {
        rand::rng().random_range(1.0 - j..=1.0 + j)
    } else {
        1.0
    };
    cfg.interval.mul_f64(factor)
}

async fn wait_permit(
    p: &mut Option<PermitFuture>,
) -> std::result::Result<OwnedSemaphorePermit, AcquireError> {
    match p {
        Some(f) => f.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The next message of a receiver; never, when there is none.
async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the VMM exits; never, when there is none.
async fn wait_exit(vmm: &Option<VmmProcess>) {
    match vmm {
        Some(p) => {
            if p.pidfd.exited().await.is_err() {
                // Registering the fd failed; treat as exited so the state is re-read.
            }
        }
        None => std::future::pending().await,
    }
}

async fn exited_within(vmm: &VmmProcess, d: Duration) -> bool {
    tokio::time::timeout(d, vmm.pidfd.exited()).await.is_ok()
}
