//! The supervisor: owns the set of VM controllers and routes each request to the one controller
//! that owns the VM. Reads (GetVmInfo, ListVms) go straight to the registry, which the
//! controllers keep current.
//!
//! On start it re-attaches to the VMMs recorded in the registry: a process is adopted only when
//! its pid is alive, its start time matches the stored one, its command line is this VM's, and its
//! control socket answers. Anything less and the VMM is not trusted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::{JoinHandle, JoinSet};
use tracing::{info, warn};

use crate::config::Config;
use crate::controller::{Controller, ControllerEnv, ControllerHandle, Op};
use crate::driver::{GuestRun, VmmDriver, VmmProcess};
use crate::error::{Error, Result};
use crate::model::{Desired, Transition, VmId, VmSpec, VmState};
use crate::process::{Pidfd, ProcInfo};
use crate::store::{Store, VmRecord, now_ms};

struct Entry {
    handle: ControllerHandle,
    task: JoinHandle<()>,
}

/// Routes operations to per-VM controllers.
pub struct Supervisor {
    cfg: Config,
    env: ControllerEnv,
    vms: Mutex<HashMap<VmId, Entry>>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor").finish_non_exhaustive()
    }
}

/// What start-up re-attachment found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AttachReport {
    /// VMMs adopted without a restart.
    pub adopted: usize,
    /// VMs whose recorded VMM was gone, reused, or unresponsive.
    pub lost: usize,
    /// Deletes that a previous run had not finished, now finished.
    pub deletes_finished: usize,
    /// How long it took.
    pub elapsed: Duration,
}

impl Supervisor {
    /// A supervisor over `store`, driving VMMs through `driver`.
    pub fn new(cfg: Config, store: Store, driver: Arc<dyn VmmDriver>) -> Arc<Self> {
        let env = ControllerEnv {
            store,
            driver,
            run_root: cfg.run_root(),
        };
        Arc::new(Supervisor {
            cfg,
            env,
            vms: Mutex::new(HashMap::new()),
        })
    }

    /// The daemon config.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The registry.
    pub fn store(&self) -> &Store {
        &self.env.store
    }

    /// The driver's name.
    pub fn vmm_kind(&self) -> &'static str {
        self.env.driver.kind()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, Entry>> {
        // The map holds only handles; a panic elsewhere cannot leave it inconsistent.
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handle(&self, id: &VmId) -> Result<ControllerHandle> {
        self.lock()
            .get(id)
            .map(|e| e.handle.clone())
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// Loads every VM from the registry and re-attaches to its VMM where it can be trusted.
    pub async fn attach_all(&self) -> Result<AttachReport> {
        let started = Instant::now();
        let rows = self.env.store.all().await?;
        let mut report = AttachReport::default();
        let mut checks = JoinSet::new();
        for rec in rows {
            let driver = self.env.driver.clone();
            checks.spawn(async move {
                let verdict = match &rec.endpoint {
                    Some(_) => verify(&*driver, &rec).await,
                    None => Verdict::NoProcess,
                };
                (rec, verdict)
            });
        }
        while let Some(joined) = checks.join_next().await {
            let Ok((mut rec, verdict)) = joined else {
                continue;
            };
            let vmm = match verdict {
                Verdict::Adopt(vmm, run) => {
                    report.adopted += 1;
                    let observed = match run {
                        GuestRun::NotStarted => VmState::Created,
                        GuestRun::Running => VmState::Running,
                        GuestRun::Paused => VmState::Paused,
                        GuestRun::ShutDown => VmState::Shutdown,
                    };
                    info!(vm_id = %rec.vm_id, pid = vmm.endpoint.pid, state = %observed, "vmm re-attached");
                    if observed != rec.observed {
                        self.env
                            .store
                            .set_observed(&rec.vm_id, observed, rec.endpoint.clone(), None)
                            .await?;
                        rec.observed = observed;
                    }
                    Some(vmm)
                }
                Verdict::Lost(reason) => {
                    report.lost += 1;
                    warn!(
                        vm_id = %rec.vm_id,
                        pid = rec.endpoint.as_ref().map(|e| e.pid),
                        reason,
                        "orphaned vm detected"
                    );
                    let exit = format!("vmm lost while metald was down ({reason})");
                    self.env
                        .store
                        .set_observed(&rec.vm_id, VmState::Shutdown, None, Some(exit.clone()))
                        .await?;
                    rec.observed = VmState::Shutdown;
                    rec.endpoint = None;
                    rec.last_exit = Some(exit);
                    None
                }
                Verdict::NoProcess => None,
            };
            let deleting = rec.desired == Desired::Deleted;
            let id = rec.vm_id.clone();
            let (handle, task) = Controller::start(rec, vmm, self.env.clone());
            if deleting {
                // A delete that the last run did not finish: finish it now.
                if let Err(e) = handle.call(Op::Delete { graceful: None }).await {
                    warn!(vm_id = %id, error = %e, "finishing interrupted delete failed");
                } else {
                    report.deletes_finished += 1;
                }
                continue;
            }
            self.lock().insert(id, Entry { handle, task });
        }
        report.elapsed = started.elapsed();
        info!(
            adopted = report.adopted,
            lost = report.lost,
            deletes_finished = report.deletes_finished,
            duration_ms = report.elapsed.as_millis() as u64,
            "registry loaded"
        );
        Ok(report)
    }

    /// Registers a VM and starts its VMM (configured, not booted). On failure nothing is left:
    /// no process, socket, run directory or row.
    pub async fn create(
        &self,
        vm_id: Option<VmId>,
        customer_id: String,
        spec: VmSpec,
    ) -> Result<VmRecord> {
        let vm_id = vm_id.unwrap_or_else(VmId::generate);
        let now = now_ms();
        let rec = VmRecord {
            vm_id: vm_id.clone(),
            customer_id,
            spec,
            desired: Desired::State(VmState::Created),
            observed: VmState::Created,
            endpoint: None,
            last_exit: None,
            created_at_ms: now,
            updated_at_ms: now,
        };
        // The insert is the point of no return for the id: a duplicate fails here, before any
        // file of the existing VM could be touched.
        self.env.store.insert(rec.clone()).await?;
        let (handle, task) = Controller::start(rec, None, self.env.clone());
        self.lock().insert(
            vm_id.clone(),
            Entry {
                handle: handle.clone(),
                task,
            },
        );
        let res = handle.call(Op::Create).await;
        if res.is_err() {
            self.lock().remove(&vm_id);
        }
        res
    }

    /// Applies a lifecycle transition.
    pub async fn transition(
        &self,
        id: &VmId,
        op: Transition,
        graceful: Option<Duration>,
    ) -> Result<VmRecord> {
        self.handle(id)?.call(Op::Lifecycle { op, graceful }).await
    }

    /// Deletes a VM and everything it had.
    pub async fn delete(&self, id: &VmId, graceful: Option<Duration>) -> Result<()> {
        let handle = self.handle(id)?;
        handle.call(Op::Delete { graceful }).await?;
        self.lock().remove(id);
        Ok(())
    }

    /// One VM's row.
    pub async fn get(&self, id: &VmId) -> Result<VmRecord> {
        match self.env.store.get(id).await? {
            Some(r) if r.desired != Desired::Deleted => Ok(r),
            _ => Err(Error::NotFound(id.to_string())),
        }
    }

    /// Stops every controller without touching the VMMs (they outlive metald), waiting up to
    /// `grace` for operations in progress to finish.
    pub async fn shutdown(&self, grace: Duration) {
        let entries: Vec<Entry> = self.lock().drain().map(|(_, e)| e).collect();
        let tasks: Vec<JoinHandle<()>> = entries
            .into_iter()
            .map(|e| {
                drop(e.handle);
                e.task
            })
            .collect();
        let all = futures_join(tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            warn!("controllers still busy at shutdown; leaving them");
        }
        if let Err(e) = self.env.store.checkpoint().await {
            warn!(error = %e, "registry checkpoint at shutdown failed");
        }
    }
}

async fn futures_join(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

enum Verdict {
    Adopt(VmmProcess, GuestRun),
    Lost(&'static str),
    NoProcess,
}

/// Decides whether the VMM recorded for `rec` is still there and still ours.
async fn verify(driver: &dyn VmmDriver, rec: &VmRecord) -> Verdict {
    let Some(ep) = rec.endpoint.clone() else {
        return Verdict::NoProcess;
    };
    // Open the pidfd first, then check the start time: if the start time matches after the fd is
    // open, the fd refers to the recorded process and cannot be redirected by pid reuse.
    let Ok(pidfd) = Pidfd::open(ep.pid) else {
        return Verdict::Lost("process_dead");
    };
    let Some(info) = ProcInfo::read(ep.pid) else {
        return Verdict::Lost("process_dead");
    };
    if !info.is_alive() || pidfd.has_exited() {
        return Verdict::Lost("process_dead");
    }
    if info.start_time != ep.start_time || !driver.owns_cmdline(&rec.vm_id, &info.cmdline) {
        return Verdict::Lost("pid_reused");
    }
    let vmm = VmmProcess {
        endpoint: ep.clone(),
        pidfd,
    };
    if !ep.control_socket.exists() {
        let _ = driver.kill(&vmm);
        return Verdict::Lost("socket_unreachable");
    }
    match driver.ping(&ep).await {
        Ok(run) => Verdict::Adopt(vmm, run),
        Err(_) => {
            // Ours, but not answering: it cannot be driven, so it is not adopted. It is killed
            // through the pidfd, which cannot hit another process.
            let _ = driver.kill(&vmm);
            Verdict::Lost("api_unresponsive")
        }
    }
}
