//! The supervisor: owns the set of VM controllers and routes each request to the one controller
//! that owns the VM. Reads (GetVmInfo, ListVms) go straight to the registry, which the
//! controllers keep current.
//!
//! On start it re-attaches to the VMMs recorded in the registry: a process is adopted only when
//! its pid is alive, its start time matches the stored one, its command line is this VM's, and its
//! control socket answers. Anything less and the VMM is not trusted.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::controller::{
    Attach, Controller, ControllerEnv, ControllerHandle, Op, SharedRecord, read_live,
};
use crate::driver::Drivers;
use crate::driver::qga::GuestInfo;
use crate::error::{Error, Result};
use crate::events::EventBus;
use crate::metrics::{Exposer, Metrics};
use crate::model::{Desired, HealthStatus, Target, Transition, VmId, VmSpec, VmState};
use crate::process::{Pidfd, ProcInfo};
use crate::recovery::{BreakerState, GateStatus, RecoveryGate};
use crate::store::{SnapshotRecord, Store, VmRecord, Writer, now_ms};

struct Entry {
    handle: ControllerHandle,
    /// The VM as its controller knows it, which is the truth even when the registry is behind.
    live: SharedRecord,
    task: JoinHandle<()>,
}

/// What a host drain did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DrainReport {
    /// VMs whose guest was saved and whose VMM was stopped.
    pub saved: Vec<String>,
    /// VMs that could not be saved and were shut down instead, with why.
    pub shut_down: Vec<(String, String)>,
    /// VMs that could be neither saved nor shut down, with why.
    pub failed: Vec<(String, String)>,
}

/// Routes operations to per-VM controllers.
pub struct Supervisor {
    cfg: Config,
    spec_rules: crate::model::SpecRules,
    /// The environment every controller shares; its driver is replaced per VM.
    env: ControllerEnv,
    drivers: Drivers,
    vms: Mutex<HashMap<VmId, Entry>>,
    /// Stray VMMs seen by the sweep, keyed by (pid, start time), with when they were first seen.
    strays: Mutex<HashMap<(i32, u64), Instant>>,
    /// Set when metald begins to stop: open streams end, the health service says NOT_SERVING.
    stopping: tokio::sync::watch::Sender<bool>,
    /// The host's memory, in MiB, for the default memory cap.
    host_memory_mib: u64,
}

/// What VMs commit: their count, guest memory and vCPUs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// VMs.
    pub vms: u64,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u64,
}

impl Usage {
    fn add(&mut self, spec: &VmSpec) {
        self.vms += 1;
        self.memory_mib += spec.memory_bytes >> 20;
        self.vcpus += u64::from(spec.vcpus);
    }
}

/// Refuses a VM `spec` that would take `used` past a cap. `what` names whose caps (`host`,
/// `customer "acme"`).
fn admit(
    what: &str,
    used: Usage,
    spec: &VmSpec,
    max_vms: Option<u64>,
    max_memory_mib: Option<u64>,
    max_vcpus: Option<u64>,
) -> Result<()> {
    let want = spec.memory_bytes >> 20;
    let refuse = |cap: &str, used: u64, asked: u64, max: u64| {
        Err(Error::QuotaExceeded(format!(
            "quota: {what} {cap} is {max}; {used} in use, this vm asks {asked}"
        )))
    };
    if let Some(max) = max_vms
        && used.vms + 1 > max
    {
        return refuse("max_vms", used.vms, 1, max);
    }
    if let Some(max) = max_memory_mib
        && used.memory_mib + want > max
    {
        return refuse("max_memory_mib", used.memory_mib, want, max);
    }
    if let Some(max) = max_vcpus
        && used.vcpus + u64::from(spec.vcpus) > max
    {
        return refuse("max_vcpus", used.vcpus, u64::from(spec.vcpus), max);
    }
    Ok(())
}

/// The host's memory in MiB (`MemTotal` in /proc/meminfo); 0 when it cannot be read.
fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib >> 10)
}

/// What one reconcile pass found and did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReconcileReport {
    /// VMs visited.
    pub vms: usize,
    /// Orphans whose recovery the pass scheduled.
    pub recoveries_scheduled: usize,
    /// VMMs found dead without their exit event handled.
    pub missed_exits: usize,
    /// VMs driven to their desired state.
    pub converged: usize,
    /// The sweep's findings.
    pub sweep: SweepReport,
    /// How long the pass took.
    pub duration: Duration,
}

/// What one sweep found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Stray VMMs seen for the first time.
    pub strays_found: usize,
    /// Stray VMMs killed after their grace period.
    pub strays_killed: usize,
    /// Run directories of VMs that no longer exist, removed.
    pub stale_dirs_removed: usize,
    /// Control sockets of VMs without a VMM, removed.
    pub stale_sockets_removed: usize,
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
    pub fn new(
        cfg: Config,
        store: Store,
        writer: Writer,
        drivers: Drivers,
        operator_mode: crate::host::HostMode,
    ) -> Arc<Self> {
        let driver = drivers.all()[0].clone();
        let metrics = Metrics::new(drivers.default_kind().as_str());
        let events = EventBus::new(store.clone(), cfg.events_per_vm);
        let host = Arc::new(crate::host::Host::new(
            operator_mode,
            cfg.state_dir.clone(),
            cfg.degraded.min_free_bytes,
            metrics.clone(),
        ));
        let env = ControllerEnv::new(
            store,
            writer,
            driver,
            drivers.default_kind(),
            cfg.run_root(),
            cfg.health.clone(),
            RecoveryGate::new(cfg.recovery.clone()),
            metrics,
            events,
            host,
        );
        Arc::new(Supervisor {
            spec_rules: cfg.spec_rules(),
            cfg,
            env,
            drivers,
            vms: Mutex::new(HashMap::new()),
            strays: Mutex::new(HashMap::new()),
            stopping: tokio::sync::watch::channel(false).0,
            host_memory_mib: host_memory_mib(),
        })
    }

    /// What this host accepts of a VM's spec (from the config, worked out once).
    pub fn spec_rules(&self) -> &crate::model::SpecRules {
        &self.spec_rules
    }

    /// The daemon's configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// A VM's recovery attempts, newest first.
    pub async fn attempts(&self, id: &VmId) -> Result<Vec<crate::store::AttemptRecord>> {
        self.env.store.attempts(id).await
    }

    /// A recorded snapshot.
    pub async fn snapshot_record(&self, snapshot_id: &str) -> Result<Option<SnapshotRecord>> {
        self.env.store.snapshot(snapshot_id).await
    }

    /// Event history: events with `seq > after`, oldest first, at most `limit`.
    pub async fn events_since(
        &self,
        vm: Option<String>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<crate::store::EventRecord>> {
        self.env.store.events(vm, after, limit).await
    }

    /// The answer kept for a request_id.
    pub async fn request(&self, request_id: &str) -> Result<Option<crate::store::RequestRecord>> {
        self.env.store.request(request_id).await
    }

    /// Keeps the answer to a request_id (an API-level record, of no VM).
    pub async fn put_request(
        &self,
        request_id: &str,
        rec: crate::store::RequestRecord,
    ) -> Result<()> {
        self.env.store.put_request(request_id, rec).await
    }

    /// The VMM a VM runs on.
    pub fn vmm_kind(&self, spec: &VmSpec) -> &'static str {
        self.drivers.kind_for(spec).as_str()
    }

    /// The version line of the VMM binary that runs VMs of `spec`.
    pub fn vmm_version(&self, spec: &VmSpec) -> String {
        self.drivers.for_spec(spec).version()
    }

    /// Where a VM's VMM keeps its files.
    pub fn run_dir(&self, id: &VmId) -> std::path::PathBuf {
        self.cfg.run_root().join(id.as_str())
    }

    /// The controller environment for one VM: the shared one with that VM's driver.
    fn env_for(&self, spec: &VmSpec) -> ControllerEnv {
        self.env
            .with_driver(self.drivers.for_spec(spec), self.drivers.kind_for(spec))
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.env.metrics
    }

    /// metald begins to stop: open streams end, health turns NOT_SERVING.
    pub fn begin_stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Follows whether metald is stopping.
    pub fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// The event bus.
    pub fn events(&self) -> &Arc<EventBus> {
        &self.env.events
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
        // VMMs with a VM's marker, by VM: one that no row records may be a VMM metald started
        // and died before writing down (a reboot's new VMM, a recovery's); a VM that wants to
        // run adopts it rather than leaving it to be killed as a stray and starting another.
        let run_root = self.cfg.run_root();
        let recorded: HashSet<i32> = rows
            .iter()
            .filter_map(|r| r.endpoint.as_ref().map(|e| e.pid))
            .collect();
        let marked: HashMap<VmId, (i32, u64)> = self
            .scan_vmms(recorded)
            .await
            .into_iter()
            .map(|(id, info)| (id, (info.pid, info.start_time)))
            .collect();
        self.remove_unrecorded_images(&rows).await;
        let mut checks = JoinSet::new();
        for rec in rows {
            let driver = self.drivers.for_spec(&rec.spec);
            let unrecorded = marked
                .get(&rec.vm_id)
                .copied()
                .filter(|m| rec.endpoint.as_ref().map(|e| (e.pid, e.start_time)) != Some(*m));
            let run_dir = run_root.join(rec.vm_id.as_str());
            checks.spawn(async move {
                let attach = crate::controller::look(&*driver, &rec, unrecorded, &run_dir).await;
                (rec, attach)
            });
        }
        while let Some(joined) = checks.join_next().await {
            let Ok((rec, attach)) = joined else {
                continue;
            };
            // The verdict goes to the VM's controller, which records it: the supervisor writes
            // nothing of a VM.
            match &attach {
                Attach::Adopted(..) => report.adopted += 1,
                Attach::Lost(_) => report.lost += 1,
                Attach::Nothing => {}
            }
            let deleting = rec.desired == Desired::Deleted;
            let id = rec.vm_id.clone();
            let env = self.env_for(&rec.spec);
            let (handle, live, task) = Controller::start(rec, attach, env);
            if deleting {
                // A delete that the last run did not finish: finish it now.
                if let Err(e) = handle.call(Op::Delete { graceful: None }).await {
                    warn!(vm_id = %id, error = %e, "finishing interrupted delete failed");
                } else {
                    report.deletes_finished += 1;
                }
                continue;
            }
            self.lock().insert(id, Entry { handle, live, task });
        }
        report.elapsed = started.elapsed();
        info!(
            adopted = report.adopted,
            lost = report.lost,
            deletes_finished = report.deletes_finished,
            duration_ms = crate::model::ms(report.elapsed),
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
        restore: Option<std::path::PathBuf>,
    ) -> Result<VmRecord> {
        self.env.host.allow_new_vm()?;
        let vm_id = vm_id.unwrap_or_else(VmId::generate);
        let now = now_ms();
        let rec = VmRecord {
            vm_id: vm_id.clone(),
            customer_id,
            spec,
            desired: Desired::State(Target::Created),
            observed: VmState::Created,
            endpoint: None,
            last_exit: None,
            created_at_ms: now,
            updated_at_ms: now,
            health: HealthStatus::default(),
            orphan_reason: None,
            orphaned_at_ms: None,
            recovery_streak: 0,
            guest: Default::default(),
            // A VM made from a snapshot records where it comes from with its row, so that a
            // metald killed before its VMM is recorded restores it, rather than boots it, at
            // the next start.
            saved: restore.clone(),
        };
        let env = self.env_for(&rec.spec);
        // The id is taken in the map first, so a second create of it fails before a controller
        // for it starts; the new controller then inserts the row (a duplicate the registry
        // knows fails there), as the VM's only writer.
        let handle = {
            let mut vms = self.lock();
            if vms.contains_key(&vm_id) {
                return Err(Error::AlreadyExists(vm_id.to_string()));
            }
            // Admission, under the same lock as the insert: two creates cannot both take the
            // last of a cap.
            self.admit(&vms, &rec)?;
            let (handle, live, task) = Controller::start(rec, Attach::Nothing, env);
            vms.insert(
                vm_id.clone(),
                Entry {
                    handle: handle.clone(),
                    live,
                    task,
                },
            );
            handle
        };
        let res = handle
            .call(Op::Create {
                restore,
                insert: true,
            })
            .await;
        if res.is_err() {
            self.lock().remove(&vm_id);
        }
        res
    }

    /// Removes snapshot and save directories that nothing records: what a metald killed while
    /// writing one left (the images are whole or not, but no row or snapshot id leads to them,
    /// so nothing would ever use or delete them). Runs at start-up, before any can be in
    /// progress.
    async fn remove_unrecorded_images(&self, rows: &[VmRecord]) {
        let snapshots = match self.env.store.snapshot_paths().await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "listing snapshots failed; leftover images kept");
                return;
            }
        };
        // By name, not by path: a state dir named differently since (a symlink, say) must not
        // make a recorded image look unrecorded.
        let recorded_snapshots: Vec<_> = snapshots.iter().filter_map(|p| p.file_name()).collect();
        let recorded_saves: Vec<_> = rows
            .iter()
            .filter_map(|r| r.saved.as_deref()?.file_name())
            .collect();
        for (sub, recorded) in [("snapshots", recorded_snapshots), ("saved", recorded_saves)] {
            let Ok(dir) = std::fs::read_dir(self.cfg.state_dir.join(sub)) else {
                continue;
            };
            for entry in dir.flatten() {
                if recorded.contains(&entry.file_name().as_os_str()) {
                    continue;
                }
                let path = entry.path();
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                match removed {
                    Ok(()) => info!(path = %path.display(), "unrecorded image removed"),
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "removing an unrecorded image failed")
                    }
                }
            }
        }
    }

    /// Snapshots a VM into `<state_dir>/snapshots/<id>/` and records it.
    pub async fn snapshot(
        &self,
        id: &VmId,
        diff: bool,
        boot: bool,
    ) -> Result<(SnapshotRecord, VmRecord)> {
        self.env.host.allow_change()?;
        let handle = self.handle(id)?;
        let now = now_ms();
        let snapshot_id = format!("{id}-{now}");
        let dest = self.cfg.state_dir.join("snapshots").join(&snapshot_id);
        // The controller fills in the spec, makes the files and writes the record.
        let record = SnapshotRecord {
            snapshot_id,
            vm_id: id.to_string(),
            // Overwritten by the controller with the spec as it is when the snapshot is taken.
            spec: self.get(id).await?.spec,
            path: dest.clone(),
            created_at_ms: now,
            boot,
            size_bytes: 0,
        };
        let r = handle
            .call_full(Op::Snapshot {
                dest,
                diff,
                record: Box::new(record),
            })
            .await?;
        let snap = r.snapshot.ok_or_else(|| {
            Error::Unavailable(id.to_string(), "the snapshot was not recorded".into())
        })?;
        Ok((snap, r.rec))
    }

    /// Snapshots (of VM `vm`, or all), oldest first.
    pub async fn snapshots(&self, vm: Option<&VmId>) -> Result<Vec<SnapshotRecord>> {
        self.env.store.snapshots(vm.map(VmId::as_str)).await
    }

    /// Removes a snapshot of VM `vm` through its controller, the one writer of its files.
    pub async fn delete_snapshot(&self, vm: &VmId, snapshot_id: &str) -> Result<()> {
        self.env.host.allow_change()?;
        self.handle(vm)?
            .call(Op::DeleteSnapshot {
                snapshot_id: snapshot_id.to_string(),
            })
            .await
            .map(|_| ())
    }

    /// Applies a lifecycle transition.
    pub async fn transition(
        &self,
        id: &VmId,
        op: Transition,
        graceful: Option<Duration>,
    ) -> Result<VmRecord> {
        self.env.host.allow_change()?;
        self.handle(id)?.call(Op::Lifecycle { op, graceful }).await
    }

    /// Deletes a VM and everything it had.
    pub async fn delete(&self, id: &VmId, graceful: Option<Duration>) -> Result<()> {
        self.env.host.allow_change()?;
        let handle = self.handle(id)?;
        handle.call(Op::Delete { graceful }).await?;
        self.lock().remove(id);
        Ok(())
    }

    /// One VM as its controller knows it: the truth, even while the registry cannot be written.
    pub async fn get(&self, id: &VmId) -> Result<VmRecord> {
        let live = self.lock().get(id).map(|e| read_live(&e.live));
        let rec = match live {
            Some(r) => Some(r),
            None => self.env.store.get(id).await?,
        };
        match rec {
            Some(r) if r.desired != Desired::Deleted => Ok(r),
            _ => Err(Error::NotFound(id.to_string())),
        }
    }

    /// Refuses `rec` if it would take the host or its customer past a `[quota]` cap. Counts
    /// every supervised VM (its spec, read in place under its lock: no copy per VM).
    fn admit(&self, vms: &HashMap<VmId, Entry>, rec: &VmRecord) -> Result<()> {
        let q = &self.cfg.quota;
        let theirs = q
            .customers
            .iter()
            .find(|c| c.customer_id == rec.customer_id);
        let (mut host, mut customer) = (Usage::default(), Usage::default());
        for e in vms.values() {
            let live = e.live.lock().unwrap_or_else(|p| p.into_inner());
            if live.desired == Desired::Deleted {
                continue;
            }
            host.add(&live.spec);
            if theirs.is_some() && live.customer_id == rec.customer_id {
                customer.add(&live.spec);
            }
        }
        admit(
            "host",
            host,
            &rec.spec,
            q.max_vms,
            Some(q.memory_cap_mib(self.host_memory_mib)),
            q.max_vcpus,
        )?;
        if let Some(c) = theirs {
            admit(
                &format!("customer {:?}", c.customer_id),
                customer,
                &rec.spec,
                c.max_vms,
                c.max_memory_mib,
                c.max_vcpus,
            )?;
        }
        Ok(())
    }

    /// Every VM as its controller knows it, by id.
    pub fn all_live(&self) -> Vec<VmRecord> {
        let mut v: Vec<VmRecord> = self
            .lock()
            .values()
            .map(|e| read_live(&e.live))
            .filter(|r| r.desired != Desired::Deleted)
            .collect();
        v.sort_by(|a, b| a.vm_id.as_str().cmp(b.vm_id.as_str()));
        v
    }

    /// The host's mode.
    pub fn host(&self) -> &crate::host::Host {
        &self.env.host
    }

    /// Drains the host for a reboot or a kernel update: maintenance first (no new VMs, no
    /// automatic restarts), then every running or paused guest is saved to
    /// `<state_dir>/saved/<vm>` and its VMM stopped, within `deadline` in all. A guest that
    /// cannot be saved in time is shut down gracefully instead. The next start of metald (or
    /// [`Supervisor::undrain`]) restores every saved guest.
    pub async fn drain(&self, deadline: Duration) -> Result<DrainReport> {
        self.set_host_mode(
            crate::host::Mode::Maintenance,
            "host drain".into(),
            crate::host::BY_DRAIN.into(),
        )
        .await?;
        let until = Instant::now() + deadline;
        let mut report = DrainReport::default();
        let targets: Vec<VmId> = self
            .all_live()
            .into_iter()
            .filter(|r| matches!(r.observed, VmState::Running | VmState::Paused))
            .map(|r| r.vm_id)
            .collect();
        for id in targets {
            let Ok(handle) = self.handle(&id) else {
                continue;
            };
            let dest = self.cfg.state_dir.join("saved").join(id.as_str());
            let _ = std::fs::remove_dir_all(&dest);
            let left = until.saturating_duration_since(Instant::now());
            let saved = match std::fs::create_dir_all(&dest) {
                Err(e) => Err(Error::io(format!("creating {}", dest.display()), e)),
                Ok(()) if left.is_zero() => {
                    Err(Error::DeadlineExceeded("the drain deadline passed".into()))
                }
                Ok(()) => {
                    match tokio::time::timeout(left, handle.call(Op::Save { dest: dest.clone() }))
                        .await
                    {
                        Ok(r) => r.map(|_| ()),
                        Err(_) => Err(Error::DeadlineExceeded("the drain deadline passed".into())),
                    }
                }
            };
            match saved {
                Ok(()) => report.saved.push(id.to_string()),
                Err(e) => {
                    if dest.is_dir() {
                        let _ = std::fs::remove_dir_all(&dest);
                    }
                    warn!(vm_id = %id, error = %e, "vm could not be saved; shutting it down");
                    let grace = Some(self.cfg.shutdown_timeout);
                    match handle
                        .call(Op::Lifecycle {
                            op: Transition::Shutdown,
                            graceful: grace,
                        })
                        .await
                    {
                        Ok(_) => report.shut_down.push((id.to_string(), e.to_string())),
                        Err(e2) => report
                            .failed
                            .push((id.to_string(), format!("{e}; shutdown: {e2}"))),
                    }
                }
            }
        }
        info!(
            saved = report.saved.len(),
            shut_down = report.shut_down.len(),
            failed = report.failed.len(),
            "host drained"
        );
        Ok(report)
    }

    /// Ends a drain: the host is normal again and every saved guest is restored now.
    pub async fn undrain(&self, by: &str) -> Result<crate::host::HostMode> {
        self.set_host_mode(crate::host::Mode::Normal, String::new(), by.to_string())
            .await
    }

    /// An operator's SetHostMode: recorded first, then in force. Returns the mode in force
    /// (metald's own readonly still wins over an operator's normal while it lasts).
    pub async fn set_host_mode(
        &self,
        mode: crate::host::Mode,
        reason: String,
        set_by: String,
    ) -> Result<crate::host::HostMode> {
        let m = crate::host::HostMode {
            mode,
            reason,
            set_by,
            since_ms: crate::store::now_ms(),
        };
        if let Err(e) = self.env.store.set_host_mode(&m).await {
            if e.registry_unwritable() {
                self.env.host.registry_failed(&e.to_string());
            }
            return Err(e);
        }
        self.env.host.set_operator(m);
        if mode == crate::host::Mode::Normal {
            // Orphans left alone during maintenance get their recovery now.
            if let Err(e) = self.reconcile_pass().await {
                warn!(error = %e, "reconcile pass after leaving a host mode failed");
            }
        }
        Ok(self.env.host.mode())
    }

    /// Looks at the disk and the registry every `degraded.check_interval`: a probe write and the
    /// free space under the state directory put the host in readonly or take it out. When the
    /// registry takes writes again, a reconcile pass writes what the controllers kept in memory.
    pub fn spawn_host_monitor(self: &Arc<Self>) -> JoinHandle<()> {
        let sup = self.clone();
        tokio::spawn(async move {
            let period = sup.cfg.degraded.check_interval;
            // The daemon looked once at start; the first tick is one period later.
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                sup.check_host().await;
            }
        })
    }

    /// One look at the disk and the registry (see [`Supervisor::spawn_host_monitor`]).
    pub async fn check_host(&self) {
        let was_writable = self.env.host.status().registry_writable;
        let probe = self
            .env
            .store
            .probe_write()
            .await
            .map_err(|e| e.to_string());
        let ok = probe.is_ok();
        self.env.host.check(probe);
        if ok && !was_writable {
            // Write what the controllers kept in memory now, not at the next reconcile tick.
            if let Err(e) = self.reconcile_pass().await {
                warn!(error = %e, "reconcile pass after the registry came back failed");
            }
        }
    }

    /// Runs [`Supervisor::reconcile_pass`] every `reconcile.interval` until the task is
    /// dropped (the first pass after one interval: the daemon runs one itself at start).
    pub fn spawn_reconciler(self: &Arc<Self>) -> JoinHandle<()> {
        let sup = self.clone();
        tokio::spawn(async move {
            let period = sup.cfg.reconcile.interval;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = sup.reconcile_pass().await {
                    warn!(error = %e, "reconcile pass failed");
                }
            }
        })
    }

    /// One pass of the reconcile loop: every controller checks its VM against the registry
    /// (missed exits, orphans nobody is recovering, VMs stuck short of their desired state),
    /// then the sweep looks for strays and stale files. Logs what it found and did.
    pub async fn reconcile_pass(&self) -> Result<ReconcileReport> {
        let started = Instant::now();
        let handles: Vec<(VmId, ControllerHandle)> = self
            .lock()
            .iter()
            .map(|(id, e)| (id.clone(), e.handle.clone()))
            .collect();
        let mut report = ReconcileReport {
            vms: handles.len(),
            ..ReconcileReport::default()
        };
        let mut visits = JoinSet::new();
        for (id, h) in handles {
            visits.spawn(async move {
                // A controller busy with a long operation is visited on the next pass.
                let r =
                    tokio::time::timeout(Duration::from_secs(5), h.call_full(Op::Reconcile)).await;
                (id, r)
            });
        }
        while let Some(joined) = visits.join_next().await {
            match joined {
                Ok((_, Ok(Ok(r)))) => {
                    report.recoveries_scheduled += usize::from(r.did.scheduled);
                    report.missed_exits += usize::from(r.did.missed_exit);
                    report.converged += usize::from(r.did.converged);
                    report.sweep.stale_sockets_removed += usize::from(r.did.stale_socket_removed);
                }
                Ok((id, Ok(Err(e)))) => debug!(vm_id = %id, error = %e, "reconcile visit failed"),
                Ok((id, Err(_))) => debug!(vm_id = %id, "controller busy; visited next pass"),
                Err(_) => {}
            }
        }
        let visited_sockets = report.sweep.stale_sockets_removed;
        report.sweep = self.sweep().await?;
        report.sweep.stale_sockets_removed += visited_sockets;
        report.duration = started.elapsed();
        let m = &self.env.metrics;
        m.reconcile_duration.observe(report.duration.as_secs_f64());
        m.reconcile_last_run.set(now_ms() / 1000);
        info!(
            vms = report.vms,
            recoveries_scheduled = report.recoveries_scheduled,
            missed_exits = report.missed_exits,
            converged = report.converged,
            strays_found = report.sweep.strays_found,
            strays_killed = report.sweep.strays_killed,
            stale_dirs_removed = report.sweep.stale_dirs_removed,
            stale_sockets_removed = report.sweep.stale_sockets_removed,
            duration_ms = crate::model::ms(report.duration),
            "reconcile pass"
        );
        Ok(report)
    }

    /// Asks a VM's guest agent about its guest (through the VM's controller, which holds the
    /// agent connection).
    pub async fn guest_info(&self, id: &VmId) -> Result<(GuestInfo, VmRecord)> {
        let r = self.handle(id)?.call_full(Op::GuestInfo).await?;
        let info = r.guest_info.ok_or_else(|| {
            Error::Unavailable(id.to_string(), "no answer from the guest agent".into())
        })?;
        Ok((info, r.rec))
    }

    /// Waits, up to `timeout`, until a VM's guest is ready. Subscribes to the event stream
    /// before reading the row, so a `guest_ready` that lands in between is not missed.
    pub async fn wait_guest_ready(&self, id: &VmId, timeout: Duration) -> Result<VmRecord> {
        let mut events = self.env.events.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let rec = self.get(id).await?;
            if rec.spec.guest_health.probe == crate::config::GuestProbe::None {
                return Err(Error::FailedPrecondition(format!(
                    "the guest of vm {id} is not probed (guest_health.probe is none), so its readiness is unknown"
                )));
            }
            if rec.guest.ready {
                return Ok(rec);
            }
            // A VM not meant to run, or whose VMM is gone (orphaned: a recovery, if any, starts
            // a new guest, whose readiness is a new wait), ends the wait with the reason.
            if !matches!(rec.desired, Desired::State(Target::Running))
                || matches!(rec.observed, VmState::Orphaned | VmState::Failed)
            {
                let why = rec
                    .orphan_reason
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default();
                return Err(Error::FailedPrecondition(format!(
                    "vm {id} is {}{why} (desired {}); its guest is not becoming ready",
                    rec.observed,
                    rec.desired.as_str()
                )));
            }
            // Wait for anything that happens to this VM, then look again.
            loop {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Err(_) => {
                        return Err(Error::DeadlineExceeded(format!(
                            "the guest of vm {id} did not become ready within {} s",
                            timeout.as_secs()
                        )));
                    }
                    Ok(Ok(ev)) if ev.vm_id == id.as_str() => break,
                    Ok(Ok(_)) => {}
                    // Lagged: something may have been missed, so look at the row again.
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => break,
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                        return Err(Error::Unavailable(
                            id.to_string(),
                            "metald is stopping".into(),
                        ));
                    }
                }
            }
        }
    }

    /// Moves a VM's guest to a new VMM process (running `binary`, or the VM's own).
    pub async fn migrate(
        &self,
        id: &VmId,
        binary: Option<std::path::PathBuf>,
    ) -> Result<(crate::controller::MigrationReport, VmRecord)> {
        self.env.host.allow_change()?;
        let res = self.handle(id)?.call_full(Op::Migrate { binary }).await?;
        let report = res.migration.ok_or_else(|| {
            Error::Unavailable(id.to_string(), "the migration left no report".into())
        })?;
        Ok((report, res.rec))
    }

    /// Recovers an orphaned or failed VM now.
    pub async fn recover(&self, id: &VmId) -> Result<VmRecord> {
        self.env.host.allow_change()?;
        self.handle(id)?.call(Op::Recover).await
    }

    /// Turns automatic recovery on or off for one VM.
    pub async fn set_auto_recover(&self, id: &VmId, on: bool) -> Result<VmRecord> {
        self.env.host.allow_change()?;
        self.handle(id)?.call(Op::SetAutoRecover(on)).await
    }

    /// The host-wide recovery gate's state.
    pub fn recovery_status(&self) -> GateStatus {
        self.env.gate.status()
    }

    /// Compares live processes and run directories with the registry. A VMM with metald's
    /// marker for this state directory that no row accounts for is a stray: it is logged when
    /// first seen and killed once it has outlived `reconcile.stray_grace` (a VMM being created is
    /// recorded well within that). A run directory with no row, or a control socket of a VM
    /// without a VMM, is stale and removed.
    pub async fn sweep(&self) -> Result<SweepReport> {
        // What the controllers hold, not the registry's copy: fresher while the registry
        // cannot be written (a VMM a recovery started then is owned all the same), and no
        // read of every row at every pass.
        let rows = self.all_live();
        let owned: HashMap<VmId, Option<(i32, u64)>> = rows
            .iter()
            .map(|r| {
                (
                    r.vm_id.clone(),
                    r.endpoint.as_ref().map(|e| (e.pid, e.start_time)),
                )
            })
            .collect();
        let run_root = self.cfg.run_root();
        let grace = self.cfg.reconcile.stray_grace;
        let mut report = SweepReport::default();

        // Strays.
        let mut seen = Vec::new();
        let mut stray_ids = Vec::new();
        let mut young_ids = Vec::new();
        let recorded: HashSet<i32> = owned.values().flatten().map(|(pid, _)| *pid).collect();
        for (id, info) in self.scan_vmms(recorded).await {
            let pid = info.pid;
            // A VMM younger than the grace period may be one a controller has just spawned and
            // not yet recorded; it is not even a suspect yet, and its jail is not a leftover.
            if crate::process::age(info.start_time).is_none_or(|age| age < grace) {
                young_ids.push(id);
                continue;
            }
            let key = (pid, info.start_time);
            seen.push(key);
            stray_ids.push(id.clone());
            let first = *self
                .strays
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key)
                .or_insert_with(|| {
                    report.strays_found += 1;
                    self.env.metrics.strays.inc();
                    warn!(vm_id = %id, pid, registered = owned.contains_key(&id), "stray vmm found");
                    Instant::now()
                });
            if first.elapsed() >= grace && kill_verified(pid, info.start_time).await {
                report.strays_killed += 1;
                warn!(vm_id = %id, pid, "stray vmm killed");
            }
        }
        self.strays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| seen.contains(k));

        // Jails and cgroups of VMs without a VMM.
        // A stray still runs in its jail until it is killed; its jail goes after that.
        let live: Vec<VmId> = owned
            .iter()
            .filter(|(_, ep)| ep.is_some())
            .map(|(id, _)| id.clone())
            .chain(stray_ids.iter().cloned())
            .chain(young_ids.iter().cloned())
            .collect();
        // Jails and cgroups are file work (and may kill what is left in them): off the runtime.
        let drivers = self.drivers.all();
        let cgroups = self.drivers.cgroups();
        report.stale_dirs_removed += tokio::task::spawn_blocking(move || {
            // The VMM cgroups are the host's, shared by both drivers: swept once.
            cgroups.sweep(&live, grace)
                + drivers
                    .iter()
                    .map(|d| d.sweep_leftovers(&live, grace))
                    .sum::<usize>()
        })
        .await
        .unwrap_or(0);

        // Stale files. Anything younger than the grace period may belong to a create or spawn
        // in progress, so it is left for the next sweep.
        if let Ok(dir) = std::fs::read_dir(&run_root) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Ok(id) = VmId::parse("vm_id", &name) else {
                    continue;
                };
                let path = entry.path();
                // A registered VM's files are its controller's (a stale control socket goes in
                // the controller's own visit); the sweep handles only what no row owns.
                if stray_ids.contains(&id) || young_ids.contains(&id) || owned.contains_key(&id) {
                    continue;
                }
                // Re-read the row: a create may have inserted it since the snapshot.
                let gone = older_than(&path, grace) && self.env.store.get(&id).await?.is_none();
                if gone && std::fs::remove_dir_all(&path).is_ok() {
                    report.stale_dirs_removed += 1;
                    info!(vm_id = %id, path = %path.display(), "stale run directory removed");
                }
            }
        }
        Ok(report)
    }

    /// The live VMM processes on this host that carry a VM's marker, except the pids in
    /// `known` (what the registry or the controllers hold, each verified by its controller
    /// through its pidfd, pid and start time): on a host of 1,000 VMs a pass reads only the
    /// other processes' stat and command line. A pid the registry still names after its VMM
    /// died and another took it is looked at in the next pass, once the controller has
    /// recorded the exit. The walk over `/proc` is file work, done off the runtime.
    async fn scan_vmms(&self, known: HashSet<i32>) -> Vec<(VmId, ProcInfo)> {
        let drivers = self.drivers.all();
        let run_root = self.cfg.run_root();
        let me = std::process::id();
        tokio::task::spawn_blocking(move || {
            list_pids()
                .into_iter()
                .filter(|pid| u32::try_from(*pid).is_ok_and(|p| p != me) && !known.contains(pid))
                .filter_map(|pid| {
                    let (state, start) = crate::process::stat(pid)?;
                    let info = ProcInfo::with_stat(pid, state, start);
                    if !info.is_alive() {
                        return None;
                    }
                    let id = drivers.iter().find_map(|d| d.identify(&info, &run_root))?;
                    Some((id, info))
                })
                .collect()
        })
        .await
        .unwrap_or_default()
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

impl Exposer for Supervisor {
    async fn scrape(&self) -> String {
        // Counted from the controllers' truth, not the registry, which may be behind.
        let mut counts: Vec<(String, i64)> = Vec::new();
        for r in self.all_live() {
            let s = r.observed.as_str().to_string();
            match counts.iter_mut().find(|(k, _)| *k == s) {
                Some((_, n)) => *n += 1,
                None => counts.push((s, 1)),
            }
        }
        self.env.metrics.set_vm_counts(&counts);
        let open = self.env.gate.status().state != BreakerState::Closed;
        self.env.metrics.breaker_open.set(i64::from(open));
        self.env.metrics.encode()
    }
}

fn list_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn older_than(path: &std::path::Path, age: Duration) -> bool {
    std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|e| e >= age)
}

/// Kills `pid` only if it is still the process that started at `start_time`, through a pidfd
/// opened before the check, and waits (bounded) for it to exit.
async fn kill_verified(pid: i32, start_time: u64) -> bool {
    let Ok(fd) = Pidfd::open(pid) else {
        return false;
    };
    if crate::process::stat(pid).map(|(_, start)| start) != Some(start_time) {
        return false;
    }
    if fd.signal(libc::SIGKILL).is_err() {
        return false;
    }
    let exited = tokio::time::timeout(Duration::from_secs(5), fd.exited())
        .await
        .is_ok();
    fd.reap();
    exited
}

async fn futures_join(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

#[cfg(test)]
mod tests;
