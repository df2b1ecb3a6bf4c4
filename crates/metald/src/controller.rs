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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::driver::{DriverError, SpawnRequest, VmmDriver, VmmProcess};
use crate::error::{Error, Result};
use crate::model::{Desired, Transition, VmState};
use crate::process::ExitInfo;
use crate::store::{Store, VmRecord, now_ms};

/// An operation sent to a VM's controller.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Start and configure the VMM of a new VM. On failure everything created is removed.
    Create,
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
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<VmRecord>>,
}

/// The sending side of a controller; cheap to clone.
#[derive(Debug, Clone)]
pub struct ControllerHandle {
    tx: mpsc::Sender<Request>,
    vm_id: String,
}

impl ControllerHandle {
    /// Sends `op` and waits for the controller to finish it.
    pub async fn call(&self, op: Op) -> Result<VmRecord> {
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
}

impl std::fmt::Debug for dyn VmmDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VmmDriver({})", self.kind())
    }
}

/// How long to wait for a VMM to exit after `quit`, and after SIGKILL.
const QUIT_WAIT: Duration = Duration::from_secs(3);
const KILL_WAIT: Duration = Duration::from_secs(5);

/// A VM's controller: its row, its VMM process, and the environment to act in.
pub struct Controller {
    rec: VmRecord,
    vmm: Option<VmmProcess>,
    env: ControllerEnv,
    /// When the VMM was last seen alive (spawned, adopted or answering), for downtime reports.
    last_seen: Instant,
}

impl Controller {
    /// Starts the actor for `rec`, owning `vmm` if a live one was adopted. Returns its handle
    /// and the task, which ends when the VM is deleted or every handle is dropped.
    pub fn start(
        rec: VmRecord,
        vmm: Option<VmmProcess>,
        env: ControllerEnv,
    ) -> (ControllerHandle, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(16);
        let handle = ControllerHandle {
            tx,
            vm_id: rec.vm_id.to_string(),
        };
        let ctl = Controller {
            rec,
            vmm,
            env,
            last_seen: Instant::now(),
        };
        let task = tokio::spawn(ctl.run(rx));
        (handle, task)
    }

    fn run_dir(&self) -> PathBuf {
        self.env.run_root.join(self.rec.vm_id.as_str())
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        loop {
            tokio::select! {
                req = rx.recv() => {
                    // All handles dropped: metald is shutting down. The VMM is left running on
                    // purpose; the next metald adopts it.
                    let Some(req) = req else { break };
                    let res = self.handle(req.op).await;
                    let gone = matches!(req.op, Op::Delete { .. }) && res.is_ok()
                        || matches!(req.op, Op::Create) && res.is_err();
                    let _ = req.reply.send(res);
                    if gone {
                        break;
                    }
                }
                _ = wait_exit(&self.vmm) => self.on_unexpected_exit().await,
            }
        }
        debug!(vm_id = %self.rec.vm_id, "controller stopped");
    }

    async fn handle(&mut self, op: Op) -> Result<VmRecord> {
        match op {
            Op::Create => match self.reconcile(None).await {
                Ok(()) => Ok(self.rec.clone()),
                Err(e) => {
                    warn!(vm_id = %self.rec.vm_id, error = %e, "create failed; removing the vm");
                    if let Err(cleanup) = self.teardown(None).await {
                        warn!(vm_id = %self.rec.vm_id, error = %cleanup, "cleanup after failed create");
                    }
                    Err(e)
                }
            },
            Op::Lifecycle { op, graceful } => {
                let target = self.rec.observed.apply(op)?;
                self.set_desired(Desired::State(target)).await?;
                if op == Transition::Reboot {
                    // With -no-reboot (QEMU) or by design (Firecracker) a guest reset ends the VMM
                    // process, so a reboot is a supervised restart: stop this VMM, then reconcile
                    // starts a fresh one with the same config.
                    info!(vm_id = %self.rec.vm_id, "rebooting: restarting the vmm");
                    self.stop_vmm(None, "reboot").await?;
                }
                self.reconcile(graceful).await?;
                Ok(self.rec.clone())
            }
            Op::Delete { graceful } => {
                self.set_desired(Desired::Deleted).await?;
                self.teardown(graceful).await?;
                info!(vm_id = %self.rec.vm_id, "vm deleted");
                Ok(self.rec.clone())
            }
        }
    }

    /// Drives the VMM from its observed state toward the desired state. Idempotent: calling it
    /// again when they agree does nothing.
    pub async fn reconcile(&mut self, graceful: Option<Duration>) -> Result<()> {
        let want = match self.rec.desired {
            Desired::Deleted => return self.teardown(graceful).await,
            Desired::State(s) => s,
        };
        if want == VmState::Shutdown {
            if self.vmm.is_some() {
                self.stop_vmm(graceful, "shutdown requested").await?;
            }
            return Ok(());
        }
        if self.vmm.is_none() {
            self.start_vmm().await?;
        }
        let result = self.converge_running_vmm(want).await;
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
            now = VmState::Running;
        }
        match (want, now) {
            (VmState::Paused, VmState::Running) => {
                driver.pause(&ep).await?;
                now = VmState::Paused;
            }
            (VmState::Running, VmState::Paused) => {
                driver.resume(&ep).await?;
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
        let req = SpawnRequest {
            vm_id: &self.rec.vm_id,
            spec: &self.rec.spec,
            run_dir: &run_dir,
        };
        let vmm = driver.spawn(&req).await?;
        info!(vm_id = %self.rec.vm_id, pid = vmm.endpoint.pid, vmm = driver.kind(), "vmm started");
        let ep = vmm.endpoint.clone();
        self.vmm = Some(vmm);
        self.last_seen = Instant::now();
        self.rec.endpoint = Some(ep.clone());
        self.set_observed(VmState::Created).await?;
        if let Err(e) = driver.configure(&ep, &self.rec.spec).await {
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
            match driver.shutdown(&ep).await {
                Ok(()) if exited_within(vmm, grace).await => how = "guest powered off",
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
        self.rec.endpoint = None;
        self.rec.last_exit = Some(format!("{status} ({why})"));
        self.set_observed(VmState::Shutdown).await
    }

    /// Handles the pidfd event of a VMM that exited without metald asking it to.
    async fn on_unexpected_exit(&mut self) {
        let Some(vmm) = self.vmm.take() else { return };
        let status = vmm.pidfd.reap();
        let pid = vmm.endpoint.pid;
        let reason = match status {
            ExitInfo::Exited(0) => "guest_poweroff",
            _ => "process_dead",
        };
        let expected = matches!(self.rec.desired, Desired::State(VmState::Shutdown));
        if expected || reason == "guest_poweroff" {
            info!(vm_id = %self.rec.vm_id, pid, exit = %status, reason, "vmm exited");
        } else {
            // The VM should be running and its VMM is gone.
            warn!(
                vm_id = %self.rec.vm_id,
                pid,
                reason,
                exit = %status,
                last_seen_ms_ago = self.last_seen.elapsed().as_millis() as u64,
                downtime_ms = 0u64,
                "orphaned vm detected"
            );
        }
        self.rec.endpoint = None;
        self.rec.last_exit = Some(status.to_string());
        if let Err(e) = self.set_observed(VmState::Shutdown).await {
            warn!(vm_id = %self.rec.vm_id, error = %e, "recording vmm exit failed");
        }
    }

    /// Removes everything of the VM: its VMM, its run directory, then its row. The row goes last
    /// so that a crash part-way leaves a `deleted` tombstone that the next start finishes.
    async fn teardown(&mut self, graceful: Option<Duration>) -> Result<()> {
        self.stop_vmm(graceful, "delete").await?;
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
            self.env.store.set_desired(&self.rec.vm_id, d).await?;
            self.rec.desired = d;
            self.rec.updated_at_ms = now_ms();
        }
        Ok(())
    }

    async fn set_observed(&mut self, s: VmState) -> Result<()> {
        self.env
            .store
            .set_observed(
                &self.rec.vm_id,
                s,
                self.rec.endpoint.clone(),
                self.rec.last_exit.clone(),
            )
            .await?;
        if self.rec.observed != s {
            info!(vm_id = %self.rec.vm_id, from = %self.rec.observed, to = %s, "vm state changed");
        }
        self.rec.observed = s;
        self.rec.updated_at_ms = now_ms();
        Ok(())
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
