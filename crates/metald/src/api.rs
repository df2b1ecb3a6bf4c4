//! The gRPC layer: parses and validates requests, hands typed operations to the
//! [`Supervisor`], and maps results back to protobuf. It holds no VM state of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metald_api::v1 as pb;
use metald_api::v1::vm_service_server::VmService;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::auth::{Authn, Caller, Denied, Role, Scope};
use crate::config::GuestProbe;
use crate::error::Error;
use crate::model::{
    HealthStatus, OrphanReason, RestartPolicy, RestoreFrom, Transition, VmId, VmSpec, VmSpecInput,
    VmState,
};
use crate::recovery::BreakerState;
use crate::store::VmRecord;
use crate::supervisor::Supervisor;

/// The largest request message accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// The `metald.v1.VmService` implementation.
#[derive(Debug, Clone)]
pub struct VmApi {
    sup: Arc<Supervisor>,
    /// The request_ids of calls in progress: a retry waits for the first call to finish.
    in_flight: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// What makes a mutating call happen once: its request_id, and the request without it (a
/// retry must be the same request).
pub struct Idempotency {
    method: &'static str,
    request_id: String,
    fingerprint: Vec<u8>,
}

impl Idempotency {
    /// `None` for a call without a request_id; INVALID_ARGUMENT for a malformed one.
    fn of<R: prost::Message + Clone>(
        method: &'static str,
        request_id: &str,
        req: &R,
        clear: impl FnOnce(&mut R),
    ) -> Result<Option<Idempotency>, Error> {
        if request_id.is_empty() {
            return Ok(None);
        }
        if request_id.len() > 128
            || !request_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
        {
            return Err(Error::invalid(
                "request_id",
                "must match [A-Za-z0-9_.:-]{1,128}",
            ));
        }
        let mut bare = req.clone();
        clear(&mut bare);
        Ok(Some(Idempotency {
            method,
            request_id: request_id.to_string(),
            fingerprint: bare.encode_to_vec(),
        }))
    }
}

impl VmApi {
    /// An API over `sup`.
    pub fn new(sup: Arc<Supervisor>) -> Self {
        VmApi {
            sup,
            in_flight: Arc::default(),
        }
    }

    /// Runs `call` once per request_id: a retry with the same request_id and request gets the
    /// first call's answer (waiting for it if it is still running) instead of acting again. A
    /// call that failed is not kept, so its retry runs again.
    async fn once<T: prost::Message + Default>(
        &self,
        key: Option<Idempotency>,
        call: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let Some(key) = key else {
            return call.await;
        };
        let lock = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.request_id.clone())
            .or_default()
            .clone();
        let res = {
            let _turn = lock.lock().await;
            self.once_in_turn(&key, call).await
        };
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        // The map's and ours: nobody else waits on this request_id.
        if Arc::strong_count(&lock) <= 2 {
            map.remove(&key.request_id);
        }
        res
    }

    async fn once_in_turn<T: prost::Message + Default>(
        &self,
        key: &Idempotency,
        call: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        if let Some(prev) = self.sup.request(&key.request_id).await? {
            if prev.method != key.method || prev.fingerprint != key.fingerprint {
                return Err(Error::invalid(
                    "request_id",
                    format!(
                        "{:?} was already used for a different request ({})",
                        key.request_id, prev.method
                    ),
                )
                .into());
            }
            debug!(request_id = %key.request_id, method = key.method, "retry answered with the first call's result");
            return T::decode(&prev.response[..]).map_err(|e| {
                Status::internal(format!(
                    "the kept answer to {:?} is unreadable: {e}",
                    key.request_id
                ))
            });
        }
        let answer = call.await?;
        let kept = crate::store::RequestRecord {
            method: key.method.to_string(),
            fingerprint: key.fingerprint.clone(),
            response: answer.encode_to_vec(),
        };
        if let Err(e) = self.sup.put_request(&key.request_id, kept).await {
            // The call happened; only a retry's shortcut is lost.
            warn!(request_id = %key.request_id, error = %e, "keeping the answer for retries failed");
        }
        Ok(answer)
    }

    /// The tonic server for this API.
    pub fn into_server(self) -> pb::vm_service_server::VmServiceServer<VmApi> {
        // metald's largest request (a CreateVm with every drive, NIC and metadata entry at its
        // limit) is well under 256 KiB; anything bigger is refused before it is decoded.
        pb::vm_service_server::VmServiceServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    async fn lifecycle(
        &self,
        vm_id: &str,
        op: Transition,
        graceful: Option<Duration>,
    ) -> Result<VmRecord, Status> {
        let id = VmId::parse("vm_id", vm_id)?;
        Ok(self.sup.transition(&id, op, graceful).await?)
    }

    /// The VM `vm_id` names, if it exists for `caller`: a VM of a customer the caller may not
    /// see is NOT_FOUND, exactly as an id never used, so that ids do not leak.
    async fn visible(&self, caller: &Caller, vm_id: &str) -> Result<VmId, Status> {
        let id = VmId::parse("vm_id", vm_id)?;
        if caller.scope != Scope::All {
            let rec = self.sup.get(&id).await?;
            if !caller.sees(&rec.customer_id) {
                return Err(Error::NotFound(id.to_string()).into());
            }
        }
        Ok(id)
    }

    /// The ids of the VMs `caller` may see now.
    fn visible_ids(&self, caller: &Caller) -> std::collections::HashSet<String> {
        self.sup
            .all_live()
            .into_iter()
            .filter(|r| caller.sees(&r.customer_id))
            .map(|r| r.vm_id.to_string())
            .collect()
    }

    /// [`VmApi::visible`], for a call that changes the VM.
    async fn changeable(&self, caller: &Caller, method: &str, vm_id: &str) -> Result<VmId, Status> {
        let id = self.visible(caller, vm_id).await?;
        caller.may_change(method)?;
        Ok(id)
    }
}

/// A MigrateVm's `vmm_binary`: empty (the VM's own), or an absolute path to an executable
/// regular file.
fn check_vmm_binary(v: &str) -> Result<Option<std::path::PathBuf>, Error> {
    use std::os::unix::fs::PermissionsExt;
    const FIELD: &str = "vmm_binary";
    if v.is_empty() {
        return Ok(None);
    }
    let p = std::path::PathBuf::from(v);
    if !p.is_absolute() || v.len() > 4096 {
        return Err(Error::invalid(
            FIELD,
            "must be an absolute path of at most 4096 bytes",
        ));
    }
    match std::fs::metadata(&p) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(Some(p)),
        Ok(_) => Err(Error::invalid(
            FIELD,
            format!("{v} is not an executable file"),
        )),
        Err(e) => Err(Error::invalid(FIELD, format!("{v}: {e}"))),
    }
}

/// The caller of a request, as the auth layer recorded it. A request it did not see has no
/// caller, and is refused: the check fails closed.
fn caller_of<T>(req: &Request<T>) -> Result<Caller, Status> {
    match req.extensions().get::<Authn>() {
        Some(Authn(Ok(c))) => Ok(c.clone()),
        Some(Authn(Err(d))) => Err(d.clone().into()),
        None => Err(Status::unauthenticated(
            "the request carries no caller identity",
        )),
    }
}

/// Logs a call that changes something, with who made it and how it ended: the audit trail.
fn audited<T>(
    caller: &Caller,
    method: &'static str,
    vm_id: &str,
    res: Result<T, Status>,
) -> Result<T, Status> {
    let code = match &res {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    info!(
        caller = %caller.identity,
        role = caller.role.as_str(),
        method,
        vm_id,
        code = ?code,
        "api call"
    );
    res
}

impl From<Denied> for Status {
    fn from(d: Denied) -> Status {
        match d {
            Denied::Unauthenticated(m) => Status::unauthenticated(m),
            Denied::PermissionDenied(m) => Status::permission_denied(m),
        }
    }
}

impl Idempotency {
    /// Keys a request_id by its caller: a tenant's request_id never finds another caller's
    /// answer (admins share one namespace, as before callers had identities).
    fn of_caller(mut self, caller: &Caller) -> Idempotency {
        if caller.role != Role::Admin {
            self.request_id = format!("{}#{}", caller.identity, self.request_id);
        }
        self
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument { .. } => Status::invalid_argument(msg),
            Error::NotFound(_) => Status::not_found(msg),
            Error::AlreadyExists(_) => Status::already_exists(msg),
            Error::FailedPrecondition(_) => Status::failed_precondition(msg),
            Error::Unavailable(..) => Status::unavailable(msg),
            Error::DeadlineExceeded(_) => Status::deadline_exceeded(msg),
            // The VMM refused the request (a kernel it cannot load, a state it will not
            // change from): the caller's request cannot proceed as things are.
            Error::Driver(crate::driver::DriverError::Refused { .. }) => {
                Status::failed_precondition(msg)
            }
            Error::Driver(crate::driver::DriverError::InvalidSpec { .. }) => {
                Status::invalid_argument(msg)
            }
            // The VMM went away under the call (it died, or is being replaced): the VM's
            // controller is already handling it.
            Error::Driver(
                crate::driver::DriverError::Socket {
                    unreachable: true, ..
                }
                | crate::driver::DriverError::Closed,
            ) => Status::unavailable(format!(
                "{msg}: the VMM is gone and the VM is being recovered; retry the call"
            )),
            Error::Driver(_) => Status::internal(msg),
            Error::Config(_) => Status::failed_precondition(msg),
            Error::QuotaExceeded(_) => Status::resource_exhausted(msg),
            // Nothing changed: the guest runs in its VMM as before; the caller may try again.
            Error::MigrationFailed { .. } => Status::aborted(msg),
            Error::HostMode(_) => Status::unavailable(msg),
            // The host ran out of something (a full disk, files, memory): the caller may retry
            // once it is back; not a fault of metald's.
            Error::Store(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::DiskFull =>
            {
                Status::resource_exhausted(msg)
            }
            Error::Io { ref source, .. } if crate::error::is_exhaustion(source) => {
                Status::resource_exhausted(msg)
            }
            ref e if e.registry_unwritable() => Status::unavailable(msg),
            Error::Store(_)
            | Error::CorruptRow { .. }
            | Error::IllegalTransition { .. }
            | Error::Io { .. } => Status::internal(msg),
        }
    }
}

/// The protobuf enum value of a state.
pub fn state_to_pb(s: VmState) -> pb::VmState {
    match s {
        VmState::Created => pb::VmState::Created,
        VmState::Running => pb::VmState::Running,
        VmState::Paused => pb::VmState::Paused,
        VmState::Shutdown => pb::VmState::Shutdown,
        VmState::Orphaned => pb::VmState::Orphaned,
        VmState::Failed => pb::VmState::Failed,
    }
}

fn state_from_pb(field: &str, v: i32) -> Result<VmState, Error> {
    match pb::VmState::try_from(v) {
        Ok(pb::VmState::Created) => Ok(VmState::Created),
        Ok(pb::VmState::Running) => Ok(VmState::Running),
        Ok(pb::VmState::Paused) => Ok(VmState::Paused),
        Ok(pb::VmState::Shutdown) => Ok(VmState::Shutdown),
        Ok(pb::VmState::Orphaned) => Ok(VmState::Orphaned),
        Ok(pb::VmState::Failed) => Ok(VmState::Failed),
        _ => Err(Error::invalid(field, format!("{v} is not a VM state"))),
    }
}

fn mode_to_pb(m: crate::host::Mode) -> pb::HostModeKind {
    match m {
        crate::host::Mode::Normal => pb::HostModeKind::Normal,
        crate::host::Mode::Readonly => pb::HostModeKind::Readonly,
        crate::host::Mode::Maintenance => pb::HostModeKind::Maintenance,
    }
}

fn mode_from_pb(field: &str, v: i32) -> Result<crate::host::Mode, Error> {
    match pb::HostModeKind::try_from(v) {
        Ok(pb::HostModeKind::Normal) => Ok(crate::host::Mode::Normal),
        Ok(pb::HostModeKind::Readonly) => Ok(crate::host::Mode::Readonly),
        Ok(pb::HostModeKind::Maintenance) => Ok(crate::host::Mode::Maintenance),
        _ => Err(Error::invalid(
            field,
            format!("{v} is not one of NORMAL, READONLY, MAINTENANCE"),
        )),
    }
}

fn host_mode_to_pb(m: &crate::host::HostMode) -> pb::HostMode {
    pb::HostMode {
        mode: mode_to_pb(m.mode) as i32,
        reason: m.reason.clone(),
        set_by: m.set_by.clone(),
        since: Some(ts(m.since_ms)),
    }
}

fn ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn spec_input(cfg: Option<pb::VmConfig>) -> Result<VmSpecInput, Error> {
    let cfg = cfg.ok_or_else(|| Error::invalid("config", "is required"))?;
    let cpu = cfg
        .cpu
        .ok_or_else(|| Error::invalid("config.cpu", "is required"))?;
    let mem = cfg
        .memory
        .ok_or_else(|| Error::invalid("config.memory", "is required"))?;
    let boot = cfg
        .boot
        .ok_or_else(|| Error::invalid("config.boot", "is required"))?;
    Ok(VmSpecInput {
        vcpus: i64::from(cpu.vcpu_count),
        memory_bytes: mem.size_bytes,
        kernel: boot.kernel_path,
        initrd: boot.initrd_path,
        kernel_args: boot.kernel_args,
        drives: cfg
            .storage
            .into_iter()
            .map(|d| (d.id, d.path, d.read_only, d.is_root_device))
            .collect(),
        nics: cfg
            .network
            .into_iter()
            .map(|n| (n.id, n.mac_address, n.tap_device))
            .collect(),
        // An absent console section means the default: console on.
        console: cfg.console.is_none_or(|c| c.enabled),
        metadata: cfg.metadata.into_iter().collect(),
        restart_policy: match pb::RestartPolicy::try_from(cfg.restart_policy) {
            Ok(pb::RestartPolicy::Unspecified | pb::RestartPolicy::OnFailure) => {
                RestartPolicy::OnFailure
            }
            Ok(pb::RestartPolicy::Always) => RestartPolicy::Always,
            Ok(pb::RestartPolicy::Never) => RestartPolicy::Never,
            Err(_) => {
                return Err(Error::invalid(
                    "config.restart_policy",
                    format!("{} is not a restart policy", cfg.restart_policy),
                ));
            }
        },
        restore_from: match pb::RestoreFrom::try_from(cfg.restore_from) {
            Ok(pb::RestoreFrom::Unspecified | pb::RestoreFrom::None) => RestoreFrom::None,
            Ok(pb::RestoreFrom::BootSnapshot) => RestoreFrom::BootSnapshot,
            Err(_) => {
                return Err(Error::invalid(
                    "config.restore_from",
                    format!("{} is not a restore_from", cfg.restore_from),
                ));
            }
        },
        auto_recover: cfg.auto_recover.unwrap_or(true),
        vmm: cfg.vmm,
        vsock_cid: cfg.vsock.map(|v| v.guest_cid),
        guest_health: match cfg.guest_health {
            None => Default::default(),
            Some(g) => (
                match pb::GuestProbe::try_from(g.probe) {
                    Ok(pb::GuestProbe::Unspecified) => String::new(),
                    Ok(pb::GuestProbe::None) => "none".into(),
                    Ok(pb::GuestProbe::Agent) => "agent".into(),
                    Err(_) => {
                        return Err(Error::invalid(
                            "config.guest_health.probe",
                            format!("{} is not a guest probe", g.probe),
                        ));
                    }
                },
                g.startup_timeout_ms,
                g.interval_ms,
                g.timeout_ms,
                g.failure_threshold,
            ),
        },
    })
}

fn probe_to_pb(p: GuestProbe) -> pb::GuestProbe {
    match p {
        GuestProbe::None => pb::GuestProbe::None,
        GuestProbe::Agent => pb::GuestProbe::Agent,
    }
}

fn ms32(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn guest_to_pb(rec: &VmRecord) -> pb::GuestStatus {
    let g = &rec.guest;
    pb::GuestStatus {
        probe: probe_to_pb(rec.spec.guest_health.probe) as i32,
        ready: g.ready,
        ready_at: g.ready.then(|| ts(g.ready_at_ms)),
        last_probe: (g.last_probe_ms > 0).then(|| ts(g.last_probe_ms)),
        consecutive_failures: i32::try_from(g.consecutive_failures).unwrap_or(i32::MAX),
        last_error: g.last_error.clone(),
    }
}

fn spec_to_pb(s: &VmSpec) -> pb::VmConfig {
    pb::VmConfig {
        cpu: Some(pb::CpuConfig {
            vcpu_count: i32::try_from(s.vcpus).unwrap_or(i32::MAX),
        }),
        memory: Some(pb::MemoryConfig {
            size_bytes: i64::try_from(s.memory_bytes).unwrap_or(i64::MAX),
        }),
        boot: Some(pb::BootConfig {
            kernel_path: s.kernel.display().to_string(),
            initrd_path: s
                .initrd
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            kernel_args: s.kernel_args.clone(),
        }),
        storage: s
            .drives
            .iter()
            .map(|d| pb::StorageDevice {
                id: d.id.clone(),
                path: d.path.display().to_string(),
                read_only: d.read_only,
                is_root_device: d.is_root,
            })
            .collect(),
        network: s
            .nics
            .iter()
            .map(|n| pb::NetworkInterface {
                id: n.id.clone(),
                mac_address: n.mac.clone(),
                tap_device: n.tap.clone(),
            })
            .collect(),
        console: Some(pb::ConsoleConfig { enabled: s.console }),
        metadata: s.metadata.clone().into_iter().collect(),
        restart_policy: match s.restart_policy {
            RestartPolicy::Always => pb::RestartPolicy::Always,
            RestartPolicy::OnFailure => pb::RestartPolicy::OnFailure,
            RestartPolicy::Never => pb::RestartPolicy::Never,
        } as i32,
        auto_recover: Some(s.auto_recover),
        restore_from: match s.restore_from {
            RestoreFrom::None => pb::RestoreFrom::None,
            RestoreFrom::BootSnapshot => pb::RestoreFrom::BootSnapshot,
        } as i32,
        vmm: s.vmm.map(|v| v.as_str().to_string()).unwrap_or_default(),
        vsock: s.vsock_cid.map(|guest_cid| pb::VsockConfig { guest_cid }),
        guest_health: Some(pb::GuestHealthConfig {
            probe: probe_to_pb(s.guest_health.probe) as i32,
            startup_timeout_ms: ms32(s.guest_health.startup_timeout),
            interval_ms: ms32(s.guest_health.interval),
            timeout_ms: ms32(s.guest_health.timeout),
            failure_threshold: s.guest_health.failure_threshold,
        }),
    }
}

/// A process's start time (clock ticks since boot) as a wall-clock time.
fn start_time_ts(ticks: u64) -> Option<prost_types::Timestamp> {
    static BOOT_MS: std::sync::OnceLock<Option<i64>> = std::sync::OnceLock::new();
    let boot_ms = (*BOOT_MS.get_or_init(|| {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let secs: i64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        Some(secs * 1000)
    }))?;
    let hz = crate::process::clock_ticks();
    let ms = i64::try_from(ticks.saturating_mul(1000) / hz).ok()?;
    Some(ts(boot_ms + ms))
}

fn orphan_reason_to_pb(r: OrphanReason) -> pb::OrphanReason {
    match r {
        OrphanReason::ProcessDead => pb::OrphanReason::ProcessDead,
        OrphanReason::ApiUnresponsive => pb::OrphanReason::ApiUnresponsive,
        OrphanReason::SocketUnreachable => pb::OrphanReason::SocketUnreachable,
        OrphanReason::PidReused => pb::OrphanReason::PidReused,
        OrphanReason::GuestPanicked => pb::OrphanReason::GuestPanicked,
        OrphanReason::GuestUnresponsive => pb::OrphanReason::GuestUnresponsive,
        OrphanReason::GuestCrashed => pb::OrphanReason::GuestCrashed,
    }
}

impl VmApi {
    /// One VM as the API shows it, from the controller's record.
    fn vm_to_pb(&self, rec: &VmRecord) -> pb::Vm {
        let run_dir = self.sup.run_dir(&rec.vm_id);
        let vmm = rec.endpoint.as_ref().map(|e| pb::VmmProcess {
            kind: self.sup.vmm_kind(&rec.spec).to_string(),
            version: self.sup.vmm_version(&rec.spec),
            pid: e.pid,
            start_time: start_time_ts(e.start_time),
            control_socket: e.control_socket.display().to_string(),
            console_log: e.console_log.display().to_string(),
            vmm_log: run_dir.join(crate::driver::VMM_LOG).display().to_string(),
            run_dir: run_dir.display().to_string(),
        });
        pb::Vm {
            vm_id: rec.vm_id.to_string(),
            customer_id: rec.customer_id.clone(),
            config: Some(spec_to_pb(&rec.spec)),
            state: state_to_pb(rec.observed) as i32,
            desired_state: desired_to_pb(rec),
            created_at: Some(ts(rec.created_at_ms)),
            updated_at: Some(ts(rec.updated_at_ms)),
            health: Some(health_to_pb(&rec.health)),
            guest: Some(guest_to_pb(rec)),
            vmm,
            last_exit: rec.last_exit.clone().unwrap_or_default(),
            orphan_reason: rec
                .orphan_reason
                .map_or(pb::OrphanReason::Unspecified, orphan_reason_to_pb)
                as i32,
            orphaned_at: rec.orphaned_at_ms.map(ts),
            restore_from: rec
                .saved
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            recovery_streak: i32::try_from(rec.recovery_streak).unwrap_or(i32::MAX),
        }
    }
}

fn health_to_pb(h: &HealthStatus) -> pb::VmHealthStatus {
    let opt_ts = |ms: i64| (ms > 0).then(|| ts(ms));
    pb::VmHealthStatus {
        is_healthy: h.is_healthy,
        last_check: opt_ts(h.last_check_ms),
        last_error: h.last_error.clone(),
        consecutive_failures: i32::try_from(h.consecutive_failures).unwrap_or(i32::MAX),
        recovery_count: i32::try_from(h.recovery_count).unwrap_or(i32::MAX),
        last_activity: opt_ts(h.last_activity_ms),
    }
}

/// The protobuf enum value of a state's name as the event history records it.
fn state_name_to_pb(s: &str) -> pb::VmState {
    match s {
        "created" => pb::VmState::Created,
        "running" => pb::VmState::Running,
        "paused" => pb::VmState::Paused,
        "shutdown" => pb::VmState::Shutdown,
        "orphaned" => pb::VmState::Orphaned,
        "failed" => pb::VmState::Failed,
        _ => pb::VmState::Unspecified,
    }
}

fn event_kind_to_pb(k: &str) -> pb::EventKind {
    use crate::model::EventKind as K;
    match K::from_db(k) {
        Some(K::StateChanged) => pb::EventKind::StateChanged,
        Some(K::HealthChanged) => pb::EventKind::HealthChanged,
        Some(K::Orphaned) => pb::EventKind::Orphaned,
        Some(K::Recovering) => pb::EventKind::Recovering,
        Some(K::Recovered) => pb::EventKind::Recovered,
        Some(K::RecoveryFailed) => pb::EventKind::RecoveryFailed,
        Some(K::Failed) => pb::EventKind::Failed,
        Some(K::GuestReady) => pb::EventKind::GuestReady,
        Some(K::ControlSocketLost) => pb::EventKind::ControlSocketLost,
        Some(K::ControlSocketRestored) => pb::EventKind::ControlSocketRestored,
        Some(K::Saved) => pb::EventKind::Saved,
        Some(K::Migrated) => pb::EventKind::Migrated,
        Some(K::MigrationFailed) => pb::EventKind::MigrationFailed,
        Some(K::Deleted) => pb::EventKind::Deleted,
        None => pb::EventKind::Unspecified,
    }
}

/// Events a watcher may have queued and unsent before it is cut off.
pub const WATCH_QUEUE: usize = 256;

/// One watcher's stream. A task moves events from the bus into a queue of [`WATCH_QUEUE`]; the
/// stream is that queue. A watcher that stops reading (or reads slower than events come) fills
/// its queue and is cut off: the task lets go of the bus, the stream sends what it holds and ends
/// with RESOURCE_EXHAUSTED. Why not carry on and say how much it missed: a watcher that never
/// reads would hold its stream and its share of the bus forever, and one that reads late would
/// act on a view it cannot know is whole. The history (GetVmEvents) has everything it missed.
fn watch_stream(
    mut bus: tokio::sync::broadcast::Receiver<crate::store::EventRecord>,
    only: Option<String>,
    customers: Option<std::collections::BTreeSet<String>>,
) -> impl tokio_stream::Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send {
    use tokio::sync::broadcast::error::RecvError;
    // One slot more than the queue: the last is kept for the cut-off status. This task is the
    // only sender, so the capacity it sees can only grow before its next send.
    let (tx, rx) = tokio::sync::mpsc::channel(WATCH_QUEUE + 1);
    tokio::spawn(async move {
        let cut = loop {
            let ev = tokio::select! {
                ev = bus.recv() => ev,
                // The watcher hung up: nothing to forward to.
                () = tx.closed() => return,
            };
            match ev {
                Ok(ev)
                    if only.as_ref().is_none_or(|v| *v == ev.vm_id)
                        // A scoped watcher sees its customers' VMs: each live event names its
                        // VM's customer, so a VM's last event, after its delete, is told too.
                        && customers.as_ref().is_none_or(|c| c.contains(&ev.customer_id)) =>
                {
                    if tx.capacity() <= 1 {
                        break format!(
                            "this watcher fell {WATCH_QUEUE} events behind and was cut off; \
                             GetVmEvents has what it missed"
                        );
                    }
                    let out = pb::WatchEventsResponse {
                        event: Some(event_to_pb(ev)),
                    };
                    if tx.try_send(Ok(out)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => {
                    break format!(
                        "this watcher missed {n} events and was cut off; GetVmEvents has them"
                    );
                }
                // The bus is gone: metald is stopping, and the stop status ends the stream.
                Err(RecvError::Closed) => return,
            }
        };
        // Dropping the bus receiver here is the cut-off; the stream ends after this status.
        drop(bus);
        let _ = tx.try_send(Err(Status::resource_exhausted(cut)));
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn event_to_pb(e: crate::store::EventRecord) -> pb::VmEvent {
    let to = state_name_to_pb(&e.to_state);
    let from = state_name_to_pb(&e.from_state);
    pb::VmEvent {
        seq: e.seq,
        vm_id: e.vm_id,
        at: Some(ts(e.at_ms)),
        kind: event_kind_to_pb(&e.kind) as i32,
        state: to as i32,
        // Only an event that changed the state says what it was before: a recovery attempt
        // or a health verdict leaves it as it was.
        from_state: if from == to {
            pb::VmState::Unspecified
        } else {
            from
        } as i32,
        reason: e.reason,
        message: e.message,
    }
}

/// An opaque ListVms page token: where the next page starts. Callers must not read it; it may
/// change with any release.
fn page_token_encode(after: &VmId) -> String {
    let mut out = String::from("p1");
    for b in after.as_str().bytes() {
        out.push_str(&format!("{:02x}", b ^ 0x5a));
    }
    out
}

pub(crate) fn page_token_decode(token: &str) -> Result<VmId, Error> {
    let bad = || Error::invalid("page_token", "is not a next_page_token from ListVms");
    let hex = token.strip_prefix("p1").ok_or_else(bad)?;
    if hex.len() % 2 != 0 || !hex.is_ascii() {
        return Err(bad());
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map(|b| b ^ 0x5a))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad())?;
    let id = String::from_utf8(bytes).map_err(|_| bad())?;
    VmId::parse("page_token", &id).map_err(|_| bad())
}

fn desired_to_pb(rec: &VmRecord) -> i32 {
    match rec.desired {
        crate::model::Desired::State(t) => state_to_pb(t.state()) as i32,
        crate::model::Desired::Deleted => pb::VmState::Unspecified as i32,
    }
}

/// What CreateVm checks of a request's own fields before anything is made: its VM id, its
/// customer id and its config against the host's rules (the caller, the quotas and the VMM's
/// own checks come after). Public for the fuzz target (`fuzz/`), which must run exactly what
/// the API runs.
pub fn check_create_request(
    r: &pb::CreateVmRequest,
    rules: &crate::model::SpecRules,
) -> Result<(Option<VmId>, VmSpec), Error> {
    let vm_id = if r.vm_id.is_empty() {
        None
    } else {
        Some(VmId::parse("vm_id", &r.vm_id)?)
    };
    check_customer_id(&r.customer_id)?;
    let spec = spec_input(r.config.clone())?.validate(rules)?;
    Ok((vm_id, spec))
}

/// A customer id: 1 to 128 of `[A-Za-z0-9_.@-]`.
pub(crate) fn check_customer_id(c: &str) -> Result<(), Error> {
    if c.is_empty()
        || c.len() > 128
        || !c
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-@".contains(&b))
    {
        return Err(Error::invalid(
            "customer_id",
            "is required and must match [A-Za-z0-9_.@-]{1,128}",
        ));
    }
    Ok(())
}

/// The mutating calls, each once per request_id (see [`VmApi::once`]).
impl VmApi {
    async fn do_create_vm(
        &self,
        caller: &Caller,
        req: pb::CreateVmRequest,
    ) -> Result<pb::CreateVmResponse, Status> {
        let r = req;
        let vm_id = if r.vm_id.is_empty() {
            None
        } else {
            Some(VmId::parse("vm_id", &r.vm_id)?)
        };
        check_customer_id(&r.customer_id)?;
        let (spec, restore) = if r.from_snapshot.is_empty() {
            (check_create_request(&r, self.sup.spec_rules())?.1, None)
        } else {
            if r.config.is_some() {
                return Err(Error::invalid(
                    "config",
                    "must be empty with from_snapshot: the snapshot's config is used",
                )
                .into());
            }
            let snap = self
                .sup
                .snapshot_record(&r.from_snapshot)
                .await?
                .ok_or_else(|| {
                    Error::invalid(
                        "from_snapshot",
                        format!("{:?} is not a snapshot", r.from_snapshot),
                    )
                })?;
            // A scoped caller may start only from a snapshot of a VM it can see now.
            if caller.scope != Scope::All {
                let theirs = match VmId::parse("vm_id", &snap.vm_id) {
                    Ok(id) => self
                        .sup
                        .get(&id)
                        .await
                        .is_ok_and(|v| caller.sees(&v.customer_id)),
                    Err(_) => false,
                };
                if !theirs {
                    return Err(Error::invalid(
                        "from_snapshot",
                        format!("{:?} is not a snapshot", r.from_snapshot),
                    )
                    .into());
                }
            }
            (snap.spec, Some(snap.path))
        };
        let rec = self.sup.create(vm_id, r.customer_id, spec, restore).await?;
        debug!(vm_id = %rec.vm_id, "CreateVm done");
        Ok(pb::CreateVmResponse {
            vm_id: rec.vm_id.to_string(),
            state: state_to_pb(rec.observed) as i32,
        })
    }

    async fn do_delete_vm(&self, req: pb::DeleteVmRequest) -> Result<pb::DeleteVmResponse, Status> {
        let r = req;
        let id = VmId::parse("vm_id", &r.vm_id)?;
        let graceful = (!r.force).then_some(self.sup.config().shutdown_timeout);
        self.sup.delete(&id, graceful).await?;
        Ok(pb::DeleteVmResponse {})
    }

    async fn do_boot_vm(&self, req: pb::BootVmRequest) -> Result<pb::BootVmResponse, Status> {
        let rec = self.lifecycle(&req.vm_id, Transition::Boot, None).await?;
        Ok(pb::BootVmResponse {
            state: state_to_pb(rec.observed) as i32,
        })
    }

    async fn do_shutdown_vm(
        &self,
        req: pb::ShutdownVmRequest,
    ) -> Result<pb::ShutdownVmResponse, Status> {
        let r = req;
        if r.timeout_seconds < 0 || r.timeout_seconds > 3600 {
            return Err(Error::invalid("timeout_seconds", "must be between 0 and 3600").into());
        }
        let graceful = if r.force {
            None
        } else if r.timeout_seconds == 0 {
            Some(self.sup.config().shutdown_timeout)
        } else {
            Some(Duration::from_secs(r.timeout_seconds.unsigned_abs().into()))
        };
        let rec = self
            .lifecycle(&r.vm_id, Transition::Shutdown, graceful)
            .await?;
        Ok(pb::ShutdownVmResponse {
            state: state_to_pb(rec.observed) as i32,
        })
    }

    async fn do_pause_vm(&self, req: pb::PauseVmRequest) -> Result<pb::PauseVmResponse, Status> {
        let rec = self.lifecycle(&req.vm_id, Transition::Pause, None).await?;
        Ok(pb::PauseVmResponse {
            state: state_to_pb(rec.observed) as i32,
        })
    }

    async fn do_resume_vm(&self, req: pb::ResumeVmRequest) -> Result<pb::ResumeVmResponse, Status> {
        let rec = self.lifecycle(&req.vm_id, Transition::Resume, None).await?;
        Ok(pb::ResumeVmResponse {
            state: state_to_pb(rec.observed) as i32,
        })
    }

    async fn do_reboot_vm(&self, req: pb::RebootVmRequest) -> Result<pb::RebootVmResponse, Status> {
        let rec = self.lifecycle(&req.vm_id, Transition::Reboot, None).await?;
        Ok(pb::RebootVmResponse {
            state: state_to_pb(rec.observed) as i32,
        })
    }

    async fn do_recover_vm(
        &self,
        req: pb::RecoverVmRequest,
    ) -> Result<pb::RecoverVmResponse, Status> {
        let id = VmId::parse("vm_id", &req.vm_id)?;
        let rec = self.sup.recover(&id).await?;
        Ok(pb::RecoverVmResponse {
            state: state_to_pb(rec.observed) as i32,
        })
    }

    async fn do_migrate_vm(
        &self,
        req: pb::MigrateVmRequest,
    ) -> Result<pb::MigrateVmResponse, Status> {
        let id = VmId::parse("vm_id", &req.vm_id)?;
        let binary = check_vmm_binary(&req.vmm_binary)?;
        let (m, rec) = self.sup.migrate(&id, binary).await?;
        let ms = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        Ok(pb::MigrateVmResponse {
            state: state_to_pb(rec.observed) as i32,
            old_pid: m.old_pid,
            new_pid: m.new_pid,
            handover_ms: ms(m.handover_ms),
            vmm_downtime_ms: ms(m.stats.downtime_ms),
            total_ms: ms(m.total_ms),
            bytes: m.stats.bytes,
            shared_memory: m.stats.shared_memory,
        })
    }

    async fn do_snapshot_vm(
        &self,
        req: pb::SnapshotVmRequest,
    ) -> Result<pb::SnapshotVmResponse, Status> {
        let r = req;
        let id = VmId::parse("vm_id", &r.vm_id)?;
        let (snap, rec) = self.sup.snapshot(&id, r.diff, r.boot).await?;
        Ok(pb::SnapshotVmResponse {
            snapshot_id: snap.snapshot_id,
            path: snap.path.display().to_string(),
            created_at: Some(ts(snap.created_at_ms)),
            state: state_to_pb(rec.observed) as i32,
            size_bytes: snap.size_bytes,
        })
    }
}

#[tonic::async_trait]
impl VmService for VmApi {
    async fn create_vm(
        &self,
        req: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::CreateVmResponse>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let vm_id = r.vm_id.clone();
        let res = async {
            check_customer_id(&r.customer_id)?;
            caller.may_create_for(&r.customer_id)?;
            let key = Idempotency::of("CreateVm", &r.request_id, &r, |c| c.request_id.clear())?
                .map(|k| k.of_caller(&caller));
            self.once(key, self.do_create_vm(&caller, r)).await
        }
        .await;
        let vm_id = match &res {
            Ok(done) => done.vm_id.clone(),
            Err(_) => vm_id,
        };
        audited(&caller, "CreateVm", &vm_id, res).map(Response::new)
    }

    async fn delete_vm(
        &self,
        req: Request<pb::DeleteVmRequest>,
    ) -> Result<Response<pb::DeleteVmResponse>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let vm_id = r.vm_id.clone();
        let res = async {
            self.changeable(&caller, "DeleteVm", &r.vm_id).await?;
            let key = Idempotency::of("DeleteVm", &r.request_id, &r, |c| c.request_id.clear())?
                .map(|k| k.of_caller(&caller));
            self.once(key, self.do_delete_vm(r)).await
        }
        .await;
        audited(&caller, "DeleteVm", &vm_id, res).map(Response::new)
    }

    async fn boot_vm(
        &self,
        req: Request<pb::BootVmRequest>,
    ) -> Result<Response<pb::BootVmResponse>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let vm_id = r.vm_id.clone();
        let res = async {
            self.changeable(&caller, "BootVm", &r.vm_id).await?;
            let key = Idempotency::of("BootVm", &r.request_id, &r, |c| c.request_id.clear())?
                .map(|k| k.of_caller(&caller));
            self.once(key, self.do_boot_vm(r)).await
        }
        .await;
        audited(&caller, "BootVm", &vm_id, res).map(Response::new)
    }

    async fn shutdown_vm(
        &self,
        req: Request<pb::ShutdownVmRequest>,
    ) -> Result<Response<pb::ShutdownVmResponse>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let vm_id = r.vm_id.clone();
        let res = async {
            self.changeable(&caller, "ShutdownVm", &r.vm_id).await?;
            let key = Idempotency::of("ShutdownVm", &r.request_id, &r, |c| c.request_id.clear())?
                .map(|k| k.of_caller(&caller));
            self.once(key, self.do_shutdown_vm(r)).await
        }
        .await;
        audited(&caller, "ShutdownVm", &vm_id, res).map(Response::new)
    }

    async fn pause_vm(
        &self,
        req: Request<pb::PauseVmRequest>,
    ) -> Result<Response<pb::PauseVmResponse>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let vm_id = r.vm_id.clone();
        let res = async {
            self.changeable(&caller, "PauseVm", &r.vm_id).await?;
            let key = Idempotency::of("PauseVm", &r.request_id, &r, |c| c.request_id.clear())?
                .map(|k| k.of_caller(&caller));
            self.once(key, self.do_pause_vm(r)).await
        }
        .await;
        audited(&caller, "PauseVm", &vm_id, res).map(Response::new)
    }

    async fn resume_vm(
        &self,
        req: Request<pb::ResumeVmRequest>,
    ) -> Result<Response<pb::ResumeVmResponse>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let vm_id = r.vm_id.clone();
        let res = async {
            self.changeable(&caller, "ResumeVm", &r.vm_id).await?;
            let key = Idempotency::of("ResumeVm", &r.request_id, &r, |c| c.request_id.clear())?
                .map(|k| k.of_caller(&caller));
            self.once(key, self.do_resume_vm(r)).await
        }
        .await;
        audited(&caller, "ResumeVm", &vm_id, res).map(Response::new)
    }

    async fn reboot_vm(
        &self,
        req: Request<pb::RebootVmRequest>,
    ) -> Result<Response<pb::RebootVmResponse>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let vm_id = r.vm_id.clone();
        let res = async {
            self.changeable(&caller, "RebootVm", &r.vm_id).await?;
            let key = Idempotency::of("RebootVm", &r.request_id, &r, |c| c.request_id.clear())?
                .map(|k| k.of_caller(&caller));
            self.once(key, self.do_reboot_vm(r)).await
        }
        .await;
        audited(&caller, "RebootVm", &vm_id, res).map(Response::new)
    }

    async fn get_vm_info(
        &self,
        req: Request<pb::GetVmInfoRequest>,
    ) -> Result<Response<pb::GetVmInfoResponse>, Status> {
        let caller = caller_of(&req)?;
        let id = self.visible(&caller, &req.into_inner().vm_id).await?;
        let rec = self.sup.get(&id).await?;
        let history = self.sup.attempts(&id).await?;
        Ok(Response::new(pb::GetVmInfoResponse {
            vm: Some(self.vm_to_pb(&rec)),
            recovery_history: history
                .iter()
                .map(|a| pb::RecoveryAttempt {
                    attempt: i32::try_from(a.attempt).unwrap_or(i32::MAX),
                    started_at: Some(ts(a.started_at_ms)),
                    duration_seconds: crate::model::ms_to_secs(a.duration_ms),
                    outcome: if a.succeeded {
                        pb::AttemptOutcome::Success
                    } else {
                        pb::AttemptOutcome::Failure
                    } as i32,
                    error: a.error.clone(),
                    trigger: a.trigger.clone(),
                    method: a.method.clone(),
                })
                .collect(),
        }))
    }

    async fn wait_guest_ready(
        &self,
        req: Request<pb::WaitGuestReadyRequest>,
    ) -> Result<Response<pb::WaitGuestReadyResponse>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let id = self.visible(&caller, &r.vm_id).await?;
        let secs = match r.timeout_seconds {
            0 => 60,
            n if (1..=3600).contains(&n) => n,
            _ => {
                return Err(Error::invalid("timeout_seconds", "must be between 0 and 3600").into());
            }
        };
        let timeout = std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(60));
        let rec = self.sup.wait_guest_ready(&id, timeout).await?;
        Ok(Response::new(pb::WaitGuestReadyResponse {
            guest_ready_at: Some(ts(rec.guest.ready_at_ms)),
            state: state_to_pb(rec.observed) as i32,
        }))
    }

    async fn get_host_status(
        &self,
        req: Request<pb::GetHostStatusRequest>,
    ) -> Result<Response<pb::GetHostStatusResponse>, Status> {
        caller_of(&req)?.may_run_host("GetHostStatus")?;
        let st = self.sup.host().status();
        Ok(Response::new(pb::GetHostStatusResponse {
            mode: Some(host_mode_to_pb(&st.mode)),
            free_bytes: st.free_bytes,
            min_free_bytes: self.sup.config().degraded.min_free_bytes,
            registry_writable: st.registry_writable,
            registry_error: st.registry_error,
        }))
    }

    async fn set_host_mode(
        &self,
        req: Request<pb::SetHostModeRequest>,
    ) -> Result<Response<pb::SetHostModeResponse>, Status> {
        let caller = caller_of(&req)?;
        let res = async {
            caller.may_run_host("SetHostMode")?;
            let r = req.into_inner();
            let mode = mode_from_pb("mode", r.mode)?;
            let reason = r.reason.trim().to_string();
            if mode != crate::host::Mode::Normal && reason.is_empty() {
                return Err(
                    Error::invalid("reason", "is required for readonly and maintenance").into(),
                );
            }
            if reason.len() > 1024 || r.requested_by.len() > 256 {
                return Err(
                    Error::invalid("reason", "at most 1024 bytes (requested_by 256)").into(),
                );
            }
            let set_by = if r.requested_by.trim().is_empty() {
                "operator".to_string()
            } else {
                r.requested_by.trim().to_string()
            };
            let m = self.sup.set_host_mode(mode, reason, set_by).await?;
            Ok(pb::SetHostModeResponse {
                mode: Some(host_mode_to_pb(&m)),
            })
        }
        .await;
        audited(&caller, "SetHostMode", "", res).map(Response::new)
    }

    async fn drain_host(
        &self,
        req: Request<pb::DrainHostRequest>,
    ) -> Result<Response<pb::DrainHostResponse>, Status> {
        let caller = caller_of(&req)?;
        let res = async {
            caller.may_run_host("DrainHost")?;
            let r = req.into_inner();
            if r.deadline_seconds > 86_400 {
                return Err(Error::invalid("deadline_seconds", "at most 86400").into());
            }
            let secs = if r.deadline_seconds == 0 {
                300
            } else {
                r.deadline_seconds
            };
            let rep = self.sup.drain(Duration::from_secs(u64::from(secs))).await?;
            let outcome = |v: Vec<(String, String)>| {
                v.into_iter()
                    .map(|(vm_id, reason)| pb::VmOutcome { vm_id, reason })
                    .collect()
            };
            Ok(pb::DrainHostResponse {
                saved: rep.saved,
                shut_down: outcome(rep.shut_down),
                failed: outcome(rep.failed),
                mode: Some(host_mode_to_pb(&self.sup.host().mode())),
            })
        }
        .await;
        audited(&caller, "DrainHost", "", res).map(Response::new)
    }

    async fn undrain_host(
        &self,
        req: Request<pb::UndrainHostRequest>,
    ) -> Result<Response<pb::UndrainHostResponse>, Status> {
        let caller = caller_of(&req)?;
        let res = async {
            caller.may_run_host("UndrainHost")?;
            let m = self.sup.undrain("undrain").await?;
            Ok(pb::UndrainHostResponse {
                mode: Some(host_mode_to_pb(&m)),
            })
        }
        .await;
        audited(&caller, "UndrainHost", "", res).map(Response::new)
    }

    async fn get_guest_info(
        &self,
        req: Request<pb::GetGuestInfoRequest>,
    ) -> Result<Response<pb::GetGuestInfoResponse>, Status> {
        let caller = caller_of(&req)?;
        let id = self.visible(&caller, &req.into_inner().vm_id).await?;
        let (info, rec) = self.sup.guest_info(&id).await?;
        let host_ns = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        )
        .unwrap_or(i64::MAX);
        let ready_for = if rec.guest.ready {
            crate::model::ms_to_secs((crate::store::now_ms() - rec.guest.ready_at_ms).max(0))
        } else {
            0.0
        };
        Ok(Response::new(pb::GetGuestInfoResponse {
            agent_version: info.agent_version,
            os_name: info.os_name,
            os_version: info.os_version,
            kernel_release: info.kernel_release,
            guest_time: (info.time_ns > 0).then(|| prost_types::Timestamp {
                seconds: info.time_ns.div_euclid(1_000_000_000),
                nanos: i32::try_from(info.time_ns.rem_euclid(1_000_000_000)).unwrap_or(0),
            }),
            clock_skew_seconds: if info.time_ns > 0 {
                // Exact to the nanosecond for any skew below 2^52 ns (52 days).
                #[allow(clippy::cast_precision_loss)]
                let skew = (info.time_ns - host_ns) as f64 / 1e9;
                skew
            } else {
                0.0
            },
            ready_for_seconds: ready_for,
        }))
    }

    async fn recover_vm(
        &self,
        req: Request<pb::RecoverVmRequest>,
    ) -> Result<Response<pb::RecoverVmResponse>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let vm_id = r.vm_id.clone();
        let res = async {
            self.changeable(&caller, "RecoverVm", &r.vm_id).await?;
            let key = Idempotency::of("RecoverVm", &r.request_id, &r, |c| c.request_id.clear())?
                .map(|k| k.of_caller(&caller));
            self.once(key, self.do_recover_vm(r)).await
        }
        .await;
        audited(&caller, "RecoverVm", &vm_id, res).map(Response::new)
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let vm = if r.vm_id.is_empty() {
            None
        } else {
            Some(self.visible(&caller, &r.vm_id).await?)
        };
        let snaps = self.sup.snapshots(vm.as_ref()).await?;
        // A snapshot is seen by whoever sees its VM; one whose VM is gone, by admins.
        let mut snapshots = Vec::with_capacity(snaps.len());
        for s in snaps {
            let seen = match self.sup.get(&VmId::parse("vm_id", &s.vm_id)?).await {
                Ok(v) => caller.sees(&v.customer_id),
                Err(_) => caller.role == Role::Admin,
            };
            if seen {
                snapshots.push(pb::Snapshot {
                    snapshot_id: s.snapshot_id,
                    vm_id: s.vm_id,
                    path: s.path.display().to_string(),
                    created_at: Some(ts(s.created_at_ms)),
                    size_bytes: s.size_bytes,
                    boot: s.boot,
                });
            }
        }
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let res = async {
            let not_found = || {
                Error::invalid(
                    "snapshot_id",
                    format!("{:?} is not a snapshot", r.snapshot_id),
                )
            };
            let snap = self
                .sup
                .snapshot_record(&r.snapshot_id)
                .await?
                .ok_or_else(not_found)?;
            // Deleted through its VM's controller; one whose VM is gone has nothing of it left
            // but what a VM made from it still needs, so it stays until that VM has started.
            let id = self
                .changeable(&caller, "DeleteSnapshot", &snap.vm_id)
                .await
                .map_err(|_| Status::from(not_found()))?;
            self.sup.delete_snapshot(&id, &r.snapshot_id).await?;
            Ok(pb::DeleteSnapshotResponse {})
        }
        .await;
        audited(&caller, "DeleteSnapshot", &r.snapshot_id, res).map(Response::new)
    }

    async fn migrate_vm(
        &self,
        req: Request<pb::MigrateVmRequest>,
    ) -> Result<Response<pb::MigrateVmResponse>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let vm_id = r.vm_id.clone();
        let res = async {
            self.changeable(&caller, "MigrateVm", &r.vm_id).await?;
            if !r.vmm_binary.is_empty() {
                // Which program runs a VMM is the host's business: a tenant may move its VM,
                // not choose what runs it.
                caller.may_run_host("MigrateVm with vmm_binary")?;
            }
            let key = Idempotency::of("MigrateVm", &r.request_id, &r, |c| c.request_id.clear())?
                .map(|k| k.of_caller(&caller));
            self.once(key, self.do_migrate_vm(r)).await
        }
        .await;
        audited(&caller, "MigrateVm", &vm_id, res).map(Response::new)
    }

    async fn set_auto_recover(
        &self,
        req: Request<pb::SetAutoRecoverRequest>,
    ) -> Result<Response<pb::SetAutoRecoverResponse>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let res = async {
            let id = self.changeable(&caller, "SetAutoRecover", &r.vm_id).await?;
            let rec = self.sup.set_auto_recover(&id, r.enabled).await?;
            Ok(pb::SetAutoRecoverResponse {
                auto_recover: rec.spec.auto_recover,
            })
        }
        .await;
        audited(&caller, "SetAutoRecover", &r.vm_id, res).map(Response::new)
    }

    async fn get_recovery_status(
        &self,
        req: Request<pb::GetRecoveryStatusRequest>,
    ) -> Result<Response<pb::GetRecoveryStatusResponse>, Status> {
        caller_of(&req)?.may_run_host("GetRecoveryStatus")?;
        let s = self.sup.recovery_status();
        let n = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
        Ok(Response::new(pb::GetRecoveryStatusResponse {
            breaker_state: match s.state {
                BreakerState::Closed => pb::BreakerState::Closed,
                BreakerState::Open => pb::BreakerState::Open,
                BreakerState::HalfOpen => pb::BreakerState::HalfOpen,
            } as i32,
            breaker_opened_at: s.opened_at_ms.map(ts),
            in_flight: n(s.in_flight),
            max_concurrent: n(s.max_concurrent),
            window_attempts: n(s.window_attempts),
            window_failures: n(s.window_failures),
            auto_recovery_enabled: s.enabled,
        }))
    }

    async fn reconcile(
        &self,
        req: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        let caller = caller_of(&req)?;
        let res = async {
            caller.may_run_host("Reconcile")?;
            let r = self.sup.reconcile_pass().await?;
            let n = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
            Ok(pb::ReconcileResponse {
                vms: n(r.vms),
                recoveries_scheduled: n(r.recoveries_scheduled),
                missed_exits: n(r.missed_exits),
                converged: n(r.converged),
                strays_found: n(r.sweep.strays_found),
                strays_killed: n(r.sweep.strays_killed),
                stale_dirs_removed: n(r.sweep.stale_dirs_removed),
                stale_sockets_removed: n(r.sweep.stale_sockets_removed),
                duration_seconds: r.duration.as_secs_f64(),
            })
        }
        .await;
        audited(&caller, "Reconcile", "", res).map(Response::new)
    }

    async fn get_vm_events(
        &self,
        req: Request<pb::GetVmEventsRequest>,
    ) -> Result<Response<pb::GetVmEventsResponse>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let vm = if r.vm_id.is_empty() {
            None
        } else {
            let id = self.visible(&caller, &r.vm_id).await?;
            // An unknown VM is NOT_FOUND, as on every other call, not an empty history.
            self.sup.get(&id).await?;
            Some(id.to_string())
        };
        if r.limit < 0 {
            return Err(Error::invalid("limit", "must not be negative").into());
        }
        let limit = match r.limit {
            0 => 100,
            n => n.min(1000),
        };
        let limit = usize::try_from(limit).unwrap_or(100);
        let events = match (&caller.scope, vm) {
            (Scope::All, vm) | (Scope::Only(_), vm @ Some(_)) => {
                self.sup.events_since(vm, r.after_seq, limit).await?
            }
            // All events, as this caller may see them: those of its customers' VMs. Pages are
            // read until `limit` of them are found or the history ends.
            (Scope::Only(_), None) => {
                let mine = self.visible_ids(&caller);
                let mut out = Vec::new();
                let mut after = r.after_seq;
                loop {
                    let page = self.sup.events_since(None, after, 1000).await?;
                    let Some(last) = page.last().map(|e| e.seq) else {
                        break;
                    };
                    out.extend(page.into_iter().filter(|e| mine.contains(&e.vm_id)));
                    if out.len() >= limit {
                        out.truncate(limit);
                        break;
                    }
                    after = last;
                }
                out
            }
        };
        Ok(Response::new(pb::GetVmEventsResponse {
            events: events.into_iter().map(event_to_pb).collect(),
        }))
    }

    async fn snapshot_vm(
        &self,
        req: Request<pb::SnapshotVmRequest>,
    ) -> Result<Response<pb::SnapshotVmResponse>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let vm_id = r.vm_id.clone();
        let res = async {
            self.changeable(&caller, "SnapshotVm", &r.vm_id).await?;
            let key = Idempotency::of("SnapshotVm", &r.request_id, &r, |c| c.request_id.clear())?
                .map(|k| k.of_caller(&caller));
            self.once(key, self.do_snapshot_vm(r)).await
        }
        .await;
        audited(&caller, "SnapshotVm", &vm_id, res).map(Response::new)
    }

    type WatchEventsStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>,
    >;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        use tokio_stream::StreamExt;
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let only = if r.vm_id.is_empty() {
            None
        } else {
            let id = self.visible(&caller, &r.vm_id).await?;
            self.sup.get(&id).await?;
            Some(id.to_string())
        };
        let customers = match &caller.scope {
            Scope::Only(customers) => Some(customers.clone()),
            Scope::All => None,
        };
        let stream = watch_stream(self.sup.events().subscribe(), only, customers);
        // A stopping metald ends every open stream with a status that says so, rather than
        // waiting for its watchers to hang up (which could be never).
        let stop = tokio_stream::wrappers::WatchStream::new(self.sup.stopping())
            .filter(|stopping| *stopping)
            .map(|_| Err(Status::unavailable("metald is shutting down")));
        Ok(Response::new(Box::pin(stream.merge(stop))))
    }

    type StreamLogStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::StreamLogResponse, Status>> + Send>,
    >;

    async fn stream_log(
        &self,
        req: Request<pb::StreamLogRequest>,
    ) -> Result<Response<Self::StreamLogStream>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        let id = self.visible(&caller, &r.vm_id).await?;
        self.sup.get(&id).await?;
        let name = match pb::LogKind::try_from(r.kind) {
            Ok(pb::LogKind::Unspecified | pb::LogKind::Console) => crate::driver::CONSOLE_LOG,
            Ok(pb::LogKind::Vmm) => crate::driver::VMM_LOG,
            Err(_) => {
                return Err(Error::invalid("kind", format!("{} is not a log kind", r.kind)).into());
            }
        };
        let tail = match r.tail_bytes {
            0 => 64 * 1024,
            n if (1..=16 << 20).contains(&n) => n.unsigned_abs(),
            _ => {
                return Err(Error::invalid("tail_bytes", "must be between 0 and 16777216").into());
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let path = self.sup.run_dir(&id).join(name);
        tokio::spawn(crate::logtail::follow(
            self.sup.clone(),
            id,
            path,
            tail,
            r.follow,
            tx,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_vm_health(
        &self,
        req: Request<pb::GetVmHealthRequest>,
    ) -> Result<Response<pb::GetVmHealthResponse>, Status> {
        let caller = caller_of(&req)?;
        let id = self.visible(&caller, &req.into_inner().vm_id).await?;
        let rec = self.sup.get(&id).await?;
        Ok(Response::new(pb::GetVmHealthResponse {
            vm_id: rec.vm_id.to_string(),
            health: Some(health_to_pb(&rec.health)),
            state: state_to_pb(rec.observed) as i32,
        }))
    }

    async fn list_vms(
        &self,
        req: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let caller = caller_of(&req)?;
        let r = req.into_inner();
        if r.page_size < 0 {
            return Err(Error::invalid("page_size", "must not be negative").into());
        }
        let size = match r.page_size {
            0 => 100,
            n => n.min(1000),
        };
        let size = usize::try_from(size).unwrap_or(100);
        let states = r
            .state_filter
            .iter()
            .enumerate()
            .map(|(i, v)| state_from_pb(&format!("state_filter[{i}]"), *v))
            .collect::<Result<Vec<_>, _>>()?;
        let after = if r.page_token.is_empty() {
            None
        } else {
            Some(page_token_decode(&r.page_token)?.to_string())
        };
        // From the controllers, which hold the truth even while the registry is behind.
        let matching: Vec<VmRecord> = self
            .sup
            .all_live()
            .into_iter()
            .filter(|r| caller.sees(&r.customer_id))
            .filter(|r| states.is_empty() || states.contains(&r.observed))
            .collect();
        let total = matching.len();
        let rows: Vec<VmRecord> = matching
            .into_iter()
            .filter(|r| after.as_deref().is_none_or(|a| r.vm_id.as_str() > a))
            .take(size + 1)
            .collect();
        let more = rows.len() > size;
        let rows: Vec<VmRecord> = rows.into_iter().take(size).collect();
        let next_page_token = if more {
            rows.last()
                .map(|r| page_token_encode(&r.vm_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let vms = rows.iter().map(|rec| self.vm_to_pb(rec)).collect();
        Ok(Response::new(pb::ListVmsResponse {
            vms,
            next_page_token,
            total_count: i32::try_from(total).unwrap_or(i32::MAX),
        }))
    }
}
