//! One controller per VM: the only code that changes a VM.
//!
//! This file holds the actor (its state, its loop, and what it records when it starts from a
//! re-attached VMM); `lifecycle.rs` the operations and the reconcile, `health.rs` VMM health
//! checks and guest probes, `recovery.rs` orphans, backoff and recovery attempts. All four are
//! one `impl Controller`, split by concern.
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

mod attach;
mod health;
mod lifecycle;
mod migrate;
mod recovery;
mod snapshots;

pub use attach::look;
pub use migrate::{MigrateReason, MigrationReport};

use std::path::{Path, PathBuf};
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
    DriverError, ExitCause, GuestRun, ShutdownReason, SpawnRequest, Vmm, VmmDriver, VmmEvent,
};
use crate::error::{Error, Result};
use crate::events::EventBus;
use crate::guest::{AgentHandle, ProbeResult};
use crate::metrics::Metrics;
use crate::model::{
    Cause, Desired, EventKind, GuestStatus, OrphanReason, RestartPolicy, Target, Transition,
    Trigger, VmState,
};
use crate::recovery::{Admission, RecoveryGate};
use crate::store::{AttemptRecord, SnapshotRecord, Store, VmRecord, Writer, now_ms};

/// An operation sent to a VM's controller.
#[derive(Debug, Clone)]
pub enum Op {
    /// Start and configure the VMM of a new VM (or load a snapshot into it). On failure
    /// everything created is removed.
    Create {
        /// A snapshot directory to start from.
        restore: Option<PathBuf>,
        /// Insert the VM's row first (a new VM; false for a VM whose row is already there).
        insert: bool,
    },
    /// Write a snapshot into this (existing, empty) directory.
    Snapshot {
        /// Where (the controller makes the directory, and removes it if the snapshot fails).
        dest: PathBuf,
        /// Only the memory dirtied since the last snapshot.
        diff: bool,
        /// The record to write once the snapshot is whole (the VM's spec is filled in).
        record: Box<SnapshotRecord>,
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
    /// Remove one of the VM's snapshots (files and record).
    DeleteSnapshot {
        /// Which.
        snapshot_id: String,
    },
    /// Save the running guest into this (existing, empty) directory and stop its VMM, for a
    /// host drain; the VM keeps its desired state, and its next start restores the guest.
    Save {
        /// Where.
        dest: PathBuf,
    },
    /// Move the guest to a new VMM process without stopping it.
    Migrate {
        /// The VMM binary the new process runs (None: the VM's own).
        binary: Option<PathBuf>,
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
    /// For [`Op::Snapshot`], the snapshot as recorded.
    pub snapshot: Option<SnapshotRecord>,
    /// For [`Op::Migrate`], what the migration did.
    pub migration: Option<MigrationReport>,
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
    /// Counts deletes sent: a migration in progress sees the count change and gives way.
    deletes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl ControllerHandle {
    /// Sends `op` and waits for the controller to finish it.
    pub async fn call(&self, op: Op) -> Result<VmRecord> {
        self.call_full(op).await.map(|r| r.rec)
    }

    /// Like [`ControllerHandle::call`], with what a reconcile did.
    pub async fn call_full(&self, op: Op) -> Result<OpResult> {
        let (reply, rx) = oneshot::channel();
        if matches!(op, Op::Delete { .. }) {
            // A delete wins over a migration in progress, which is cancelled at once instead
            // of finishing first.
            self.deletes.send_modify(|n| *n = n.wrapping_add(1));
        }
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
    /// The right to write VMs: private, so that only this module can use it.
    writer: Arc<Writer>,
    /// The registry.
    pub store: Store,
    /// The VMM driver.
    pub driver: Arc<dyn VmmDriver>,
    /// Which VMM that driver runs.
    pub vmm_kind: crate::config::VmmKind,
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

impl ControllerEnv {
    /// The controllers' settings, and with them the registry's one [`Writer`], which nothing
    /// outside this module can reach again.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        writer: Writer,
        driver: Arc<dyn VmmDriver>,
        vmm_kind: crate::config::VmmKind,
        run_root: PathBuf,
        health: HealthConfig,
        gate: Arc<RecoveryGate>,
        metrics: Arc<Metrics>,
        events: Arc<EventBus>,
        host: Arc<crate::host::Host>,
    ) -> ControllerEnv {
        ControllerEnv {
            writer: Arc::new(writer),
            store,
            driver,
            vmm_kind,
            run_root,
            health,
            gate,
            metrics,
            events,
            host,
        }
    }

    /// Records an event of VM `vm` (its id, and its customer for scoped watchers), with the controllers' writer (after the registry commit
    /// it describes, as every caller makes it).
    pub(super) async fn emit(
        &self,
        vm: &VmRecord,
        kind: EventKind,
        from: VmState,
        to: VmState,
        reason: &str,
        message: &str,
    ) {
        self.events
            .emit(
                &self.writer,
                vm.vm_id.as_str(),
                &vm.customer_id,
                kind,
                from,
                to,
                reason,
                message,
            )
            .await;
    }

    /// The same settings for a VM on another VMM.
    pub fn with_driver(&self, driver: Arc<dyn VmmDriver>, kind: crate::config::VmmKind) -> Self {
        ControllerEnv {
            driver,
            vmm_kind: kind,
            ..self.clone()
        }
    }
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
    Adopted(Vmm, GuestRun),
    /// The VMM its row names is gone, or is not its own any more.
    Lost(OrphanReason),
}

/// Marks `rec` orphaned: no VMM, the reason and time recorded, unhealthy.
fn orphan_record(rec: &mut VmRecord, reason: OrphanReason, exit: Option<String>) {
    // The table allows ORPHANED from every state, so this cannot be refused.
    if let Ok(s) = rec
        .observed
        .observe(&rec.vm_id, VmState::Orphaned, Cause::Orphaned)
    {
        rec.observed = s;
    }
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
    vmm: Option<Vmm>,
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
    /// Deletes sent to this VM (see [`ControllerHandle`]).
    deletes: tokio::sync::watch::Receiver<u64>,
    /// Health checks in a row slower than `health.slow_threshold`.
    slow_checks: u32,
    /// When an impaired VMM may next be replaced by a migration, after one failed, with how
    /// many failed in a row.
    replace_after: Option<(Instant, u32)>,
    /// A warm restore failed in the current recovery streak: the next attempt boots afresh.
    warm_restore_failed: bool,
    /// When the current guest began to boot from its kernel (not a restore), while that is
    /// recent enough to matter to a migration (see `migrate.rs`).
    booted_at: Option<Instant>,
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
        let (deletes_tx, deletes) = tokio::sync::watch::channel(0);
        let handle = ControllerHandle {
            tx,
            vm_id: rec.vm_id.to_string(),
            deletes: Arc::new(deletes_tx),
        };
        let live = Arc::new(Mutex::new(rec.clone()));
        let first_check = next_check_after(Instant::now(), &env.health);
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
            deletes,
            slow_checks: 0,
            replace_after: None,
            warm_restore_failed: false,
            booted_at: None,
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
                    // Re-attach resolves a migration cut short (controller::look) before this;
                    // a source with no target left holds the only copy, paused.
                    GuestRun::Paused | GuestRun::MigratedAway => VmState::Paused,
                    GuestRun::ShutDown => VmState::Shutdown,
                };
                info!(vm_id = %self.rec.vm_id, pid = vmm.pid(), state = %observed, "vmm re-attached");
                if observed == VmState::Running {
                    // Its guest may still be booting (metald restarted right after a boot):
                    // as far as a migration is concerned, it booted when its VMM started.
                    self.booted_at = crate::process::age(vmm.endpoint().start_time)
                        .and_then(|age| Instant::now().checked_sub(age));
                }
                self.last_seen_ms = now_ms();
                let h = &mut self.rec.health;
                h.is_healthy = true;
                h.consecutive_failures = 0;
                h.pid = Some(vmm.pid());
                h.last_activity_ms = self.last_seen_ms;
                // Re-attach believes the VMM; the table allows any live state here.
                let _ = self.observe(observed, Cause::Adopted);
                self.rec.endpoint = Some(vmm.endpoint().clone());
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
                    self.set_observed(VmState::Shutdown, Cause::Stopped).await
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
            // Whether reads must be given the record again: every handler but the health
            // check's, which publishes what it changed itself (once a second for every VM, a
            // whole record's copy would be most of a check's cost).
            let publish = tokio::select! {
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
                    false
                }
                _ = wait_exit(&self.vmm) => { self.on_unexpected_exit().await; true }
                _ = sleep_until(check_at) => { self.health_check().await; false }
                _ = sleep_until(self.retry_at) => { self.on_retry_due(); true }
                permit = wait_permit(&mut self.permit) => { self.on_permit(permit).await; true }
                ev = recv_opt(&mut self.vmm_events) => { self.on_vmm_event(ev).await; true }
                res = recv_opt(&mut self.probes) => { self.on_probe(res).await; true }
                _ = sleep_until(ready_at) => { self.on_ready_deadline().await; true }
            };
            // Reads see the VM as this controller now knows it, whatever the handler changed.
            if publish {
                self.publish();
            }
        }
        debug!(vm_id = %self.rec.vm_id, "controller stopped");
    }
}

/// When the next health check after `now` is due: the interval, moved by up to ±jitter, then
/// rounded up to the health tick.
///
/// Why a tick: with checks spread evenly, 1,000 VMs at 1 s wake metald 1,000 times a second,
/// and each wake-up is a context switch in and out of a parked worker, which costs more than the
/// check itself. Checks that fall due in the same tick (a twentieth of the interval, at most
/// 50 ms) are run from one wake-up instead: the load stays spread over the interval, in 20 or
/// more slices, and a check is late by less than a tick.
fn next_check_after(now: Instant, cfg: &HealthConfig) -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    let due = now + jittered(cfg);
    let tick = (cfg.interval / 20).min(Duration::from_millis(50));
    let Some(since) = due.checked_duration_since(base) else {
        return due;
    };
    let tick_ns = tick.as_nanos().max(1);
    let rounded = since.as_nanos().div_ceil(tick_ns) * tick_ns;
    u64::try_from(rounded).map_or(due, |ns| base + Duration::from_nanos(ns))
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
async fn wait_exit(vmm: &Option<Vmm>) {
    match vmm {
        Some(p) => {
            if p.pidfd().exited().await.is_err() {
                // Registering the fd failed; treat as exited so the state is re-read.
            }
        }
        None => std::future::pending().await,
    }
}

async fn exited_within(vmm: &Vmm, d: Duration) -> bool {
    tokio::time::timeout(d, vmm.pidfd().exited()).await.is_ok()
}
