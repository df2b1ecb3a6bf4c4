//! The gRPC layer: parses and validates requests, hands typed operations to the
//! [`Supervisor`], and maps results back to protobuf. It holds no VM state of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metald_api::v1 as pb;
use metald_api::v1::vm_service_server::VmService;
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::config::GuestProbe;
use crate::error::Error;
use crate::model::{HealthStatus, RestartPolicy, Transition, VmId, VmSpec, VmSpecInput, VmState};
use crate::store::VmRecord;
use crate::supervisor::Supervisor;

/// The `metald.v1.VmService` implementation.
#[derive(Debug, Clone)]
pub struct VmApi {
    sup: Arc<Supervisor>,
}

impl VmApi {
    /// An API over `sup`.
    pub fn new(sup: Arc<Supervisor>) -> Self {
        VmApi { sup }
    }

    /// The tonic server for this API.
    pub fn into_server(self) -> pb::vm_service_server::VmServiceServer<VmApi> {
        pb::vm_service_server::VmServiceServer::new(self)
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
            Error::Store(_) | Error::CorruptRow { .. } | Error::Io { .. } => Status::internal(msg),
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

fn host_mode_to_pb(m: &crate::host::HostMode) -> pb::HostMode {
    pb::HostMode {
        mode: m.mode.as_str().into(),
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

fn backend_info(kind: &str, rec: &VmRecord) -> HashMap<String, String> {
    let mut m = HashMap::new();
    m.insert("vmm".into(), kind.to_string());
    let ep = rec.endpoint.as_ref();
    m.insert(
        "pid".into(),
        ep.map(|e| e.pid.to_string()).unwrap_or_default(),
    );
    m.insert(
        "start_time".into(),
        ep.map(|e| e.start_time.to_string()).unwrap_or_default(),
    );
    m.insert(
        "control_socket".into(),
        ep.map(|e| e.control_socket.display().to_string())
            .unwrap_or_default(),
    );
    if let Some(e) = ep {
        m.insert("console_log".into(), e.console_log.display().to_string());
        if let Some(dir) = e.control_socket.parent() {
            m.insert("run_dir".into(), dir.display().to_string());
        }
    }
    if let Some(x) = &rec.last_exit {
        m.insert("last_exit".into(), x.clone());
    }
    if let Some(p) = &rec.saved {
        m.insert("saved".into(), p.display().to_string());
    }
    if let Some(r) = rec.orphan_reason {
        m.insert("orphan_reason".into(), r.as_str().to_string());
    }
    if let Some(t) = rec.orphaned_at_ms {
        m.insert("orphaned_at_ms".into(), t.to_string());
    }
    m
}

fn health_to_pb(h: &HealthStatus) -> pb::VmHealthStatus {
    let opt_ts = |ms: i64| (ms > 0).then(|| ts(ms));
    pb::VmHealthStatus {
        is_healthy: h.is_healthy,
        last_check: opt_ts(h.last_check_ms),
        pid: h.pid.unwrap_or(0),
        control_socket: h.control_socket.clone(),
        last_error: h.last_error.clone(),
        consecutive_failures: i32::try_from(h.consecutive_failures).unwrap_or(i32::MAX),
        recovery_count: i32::try_from(h.recovery_count).unwrap_or(i32::MAX),
        last_activity: opt_ts(h.last_activity_ms),
    }
}

fn event_to_pb(e: crate::store::EventRecord) -> pb::VmEvent {
    pb::VmEvent {
        seq: e.seq,
        vm_id: e.vm_id,
        at: Some(ts(e.at_ms)),
        kind: e.kind,
        from_state: e.from_state,
        to_state: e.to_state,
        reason: e.reason,
        message: e.message,
    }
}

fn desired_to_pb(rec: &VmRecord) -> i32 {
    match rec.desired {
        crate::model::Desired::State(s) => state_to_pb(s) as i32,
        crate::model::Desired::Deleted => pb::VmState::Unspecified as i32,
    }
}

#[tonic::async_trait]
impl VmService for VmApi {
    async fn create_vm(
        &self,
        req: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::CreateVmResponse>, Status> {
        let r = req.into_inner();
        let vm_id = if r.vm_id.is_empty() {
            None
        } else {
            Some(VmId::parse("vm_id", &r.vm_id)?)
        };
        if r.customer_id.is_empty()
            || r.customer_id.len() > 128
            || !r
                .customer_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-@".contains(&b))
        {
            return Err(Error::invalid(
                "customer_id",
                "is required and must match [A-Za-z0-9_.@-]{1,128}",
            )
            .into());
        }
        let (spec, restore) = if r.from_snapshot.is_empty() {
            (spec_input(r.config)?.validate(self.sup.config())?, None)
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
                .store()
                .snapshot(&r.from_snapshot)
                .await?
                .ok_or_else(|| {
                    Error::invalid(
                        "from_snapshot",
                        format!("{:?} is not a snapshot", r.from_snapshot),
                    )
                })?;
            (snap.spec, Some(snap.path))
        };
        let rec = self.sup.create(vm_id, r.customer_id, spec, restore).await?;
        debug!(vm_id = %rec.vm_id, "CreateVm done");
        Ok(Response::new(pb::CreateVmResponse {
            vm_id: rec.vm_id.to_string(),
            state: state_to_pb(rec.observed) as i32,
        }))
    }

    async fn delete_vm(
        &self,
        req: Request<pb::DeleteVmRequest>,
    ) -> Result<Response<pb::DeleteVmResponse>, Status> {
        let r = req.into_inner();
        let id = VmId::parse("vm_id", &r.vm_id)?;
        let graceful = (!r.force).then_some(self.sup.config().shutdown_timeout);
        self.sup.delete(&id, graceful).await?;
        Ok(Response::new(pb::DeleteVmResponse { success: true }))
    }

    async fn boot_vm(
        &self,
        req: Request<pb::BootVmRequest>,
    ) -> Result<Response<pb::BootVmResponse>, Status> {
        let rec = self
            .lifecycle(&req.into_inner().vm_id, Transition::Boot, None)
            .await?;
        Ok(Response::new(pb::BootVmResponse {
            success: true,
            state: state_to_pb(rec.observed) as i32,
        }))
    }

    async fn shutdown_vm(
        &self,
        req: Request<pb::ShutdownVmRequest>,
    ) -> Result<Response<pb::ShutdownVmResponse>, Status> {
        let r = req.into_inner();
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
        Ok(Response::new(pb::ShutdownVmResponse {
            success: true,
            state: state_to_pb(rec.observed) as i32,
        }))
    }

    async fn pause_vm(
        &self,
        req: Request<pb::PauseVmRequest>,
    ) -> Result<Response<pb::PauseVmResponse>, Status> {
        let rec = self
            .lifecycle(&req.into_inner().vm_id, Transition::Pause, None)
            .await?;
        Ok(Response::new(pb::PauseVmResponse {
            success: true,
            state: state_to_pb(rec.observed) as i32,
        }))
    }

    async fn resume_vm(
        &self,
        req: Request<pb::ResumeVmRequest>,
    ) -> Result<Response<pb::ResumeVmResponse>, Status> {
        let rec = self
            .lifecycle(&req.into_inner().vm_id, Transition::Resume, None)
            .await?;
        Ok(Response::new(pb::ResumeVmResponse {
            success: true,
            state: state_to_pb(rec.observed) as i32,
        }))
    }

    async fn reboot_vm(
        &self,
        req: Request<pb::RebootVmRequest>,
    ) -> Result<Response<pb::RebootVmResponse>, Status> {
        let rec = self
            .lifecycle(&req.into_inner().vm_id, Transition::Reboot, None)
            .await?;
        Ok(Response::new(pb::RebootVmResponse {
            success: true,
            state: state_to_pb(rec.observed) as i32,
        }))
    }

    async fn get_vm_info(
        &self,
        req: Request<pb::GetVmInfoRequest>,
    ) -> Result<Response<pb::GetVmInfoResponse>, Status> {
        let id = VmId::parse("vm_id", &req.into_inner().vm_id)?;
        let rec = self.sup.get(&id).await?;
        let history = self.sup.store().attempts(&id).await?;
        Ok(Response::new(pb::GetVmInfoResponse {
            recovery_history: history
                .iter()
                .map(|a| pb::RecoveryAttempt {
                    attempt: i32::try_from(a.attempt).unwrap_or(i32::MAX),
                    started_at: Some(ts(a.started_at_ms)),
                    duration_seconds: a.duration_ms as f64 / 1000.0,
                    outcome: a.outcome.clone(),
                    error: a.error.clone(),
                    trigger: a.trigger.clone(),
                })
                .collect(),
            recovery_streak: i32::try_from(rec.recovery_streak).unwrap_or(i32::MAX),
            vm_id: rec.vm_id.to_string(),
            config: Some(spec_to_pb(&rec.spec)),
            state: state_to_pb(rec.observed) as i32,
            backend_info: backend_info(self.sup.vmm_kind(&rec.spec), &rec),
            customer_id: rec.customer_id.clone(),
            desired_state: desired_to_pb(&rec),
            created_at: Some(ts(rec.created_at_ms)),
            updated_at: Some(ts(rec.updated_at_ms)),
            health: Some(health_to_pb(&rec.health)),
            guest_ready: rec.guest.ready,
            guest_ready_at: rec.guest.ready.then(|| ts(rec.guest.ready_at_ms)),
            guest: Some(guest_to_pb(&rec)),
        }))
    }

    async fn wait_guest_ready(
        &self,
        req: Request<pb::WaitGuestReadyRequest>,
    ) -> Result<Response<pb::WaitGuestReadyResponse>, Status> {
        let r = req.into_inner();
        let id = VmId::parse("vm_id", &r.vm_id)?;
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
        _req: Request<pb::GetHostStatusRequest>,
    ) -> Result<Response<pb::GetHostStatusResponse>, Status> {
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
        let r = req.into_inner();
        let mode = crate::host::Mode::parse("mode", &r.mode)?;
        let reason = r.reason.trim().to_string();
        if mode != crate::host::Mode::Normal && reason.is_empty() {
            return Err(
                Error::invalid("reason", "is required for readonly and maintenance").into(),
            );
        }
        if reason.len() > 1024 || r.requested_by.len() > 256 {
            return Err(Error::invalid("reason", "at most 1024 bytes (requested_by 256)").into());
        }
        let set_by = if r.requested_by.trim().is_empty() {
            "operator".to_string()
        } else {
            r.requested_by.trim().to_string()
        };
        let m = self.sup.set_host_mode(mode, reason, set_by).await?;
        Ok(Response::new(pb::SetHostModeResponse {
            mode: Some(host_mode_to_pb(&m)),
        }))
    }

    async fn drain_host(
        &self,
        req: Request<pb::DrainHostRequest>,
    ) -> Result<Response<pb::DrainHostResponse>, Status> {
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
        Ok(Response::new(pb::DrainHostResponse {
            saved: rep.saved,
            shut_down: outcome(rep.shut_down),
            failed: outcome(rep.failed),
            mode: Some(host_mode_to_pb(&self.sup.host().mode())),
        }))
    }

    async fn undrain_host(
        &self,
        _req: Request<pb::UndrainHostRequest>,
    ) -> Result<Response<pb::UndrainHostResponse>, Status> {
        let m = self.sup.undrain("undrain").await?;
        Ok(Response::new(pb::UndrainHostResponse {
            mode: Some(host_mode_to_pb(&m)),
        }))
    }

    async fn get_guest_info(
        &self,
        req: Request<pb::GetGuestInfoRequest>,
    ) -> Result<Response<pb::GetGuestInfoResponse>, Status> {
        let id = VmId::parse("vm_id", &req.into_inner().vm_id)?;
        let (info, rec) = self.sup.guest_info(&id).await?;
        let host_ns = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        )
        .unwrap_or(i64::MAX);
        let ready_for = if rec.guest.ready {
            (crate::store::now_ms() - rec.guest.ready_at_ms).max(0) as f64 / 1000.0
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
                (info.time_ns - host_ns) as f64 / 1e9
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
        let id = VmId::parse("vm_id", &req.into_inner().vm_id)?;
        let rec = self.sup.recover(&id).await?;
        Ok(Response::new(pb::RecoverVmResponse {
            success: true,
            state: state_to_pb(rec.observed) as i32,
        }))
    }

    async fn set_auto_recover(
        &self,
        req: Request<pb::SetAutoRecoverRequest>,
    ) -> Result<Response<pb::SetAutoRecoverResponse>, Status> {
        let r = req.into_inner();
        let id = VmId::parse("vm_id", &r.vm_id)?;
        let rec = self.sup.set_auto_recover(&id, r.enabled).await?;
        Ok(Response::new(pb::SetAutoRecoverResponse {
            auto_recover: rec.spec.auto_recover,
        }))
    }

    async fn get_recovery_status(
        &self,
        _req: Request<pb::GetRecoveryStatusRequest>,
    ) -> Result<Response<pb::GetRecoveryStatusResponse>, Status> {
        let s = self.sup.recovery_status();
        let n = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
        Ok(Response::new(pb::GetRecoveryStatusResponse {
            breaker_state: s.state.as_str().to_string(),
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
        _req: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        let r = self.sup.reconcile_pass().await?;
        let n = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
        Ok(Response::new(pb::ReconcileResponse {
            vms: n(r.vms),
            recoveries_scheduled: n(r.recoveries_scheduled),
            missed_exits: n(r.missed_exits),
            converged: n(r.converged),
            strays_found: n(r.sweep.strays_found),
            strays_killed: n(r.sweep.strays_killed),
            stale_dirs_removed: n(r.sweep.stale_dirs_removed),
            stale_sockets_removed: n(r.sweep.stale_sockets_removed),
            duration_seconds: r.duration.as_secs_f64(),
        }))
    }

    async fn get_vm_events(
        &self,
        req: Request<pb::GetVmEventsRequest>,
    ) -> Result<Response<pb::GetVmEventsResponse>, Status> {
        let r = req.into_inner();
        let vm = if r.vm_id.is_empty() {
            None
        } else {
            Some(VmId::parse("vm_id", &r.vm_id)?.to_string())
        };
        if r.limit < 0 {
            return Err(Error::invalid("limit", "must not be negative").into());
        }
        let limit = match r.limit {
            0 => 100,
            n => n.min(1000),
        };
        let events = self
            .sup
            .store()
            .events(vm, r.after_seq, usize::try_from(limit).unwrap_or(100))
            .await?;
        Ok(Response::new(pb::GetVmEventsResponse {
            events: events.into_iter().map(event_to_pb).collect(),
        }))
    }

    async fn snapshot_vm(
        &self,
        req: Request<pb::SnapshotVmRequest>,
    ) -> Result<Response<pb::SnapshotVmResponse>, Status> {
        let r = req.into_inner();
        let id = VmId::parse("vm_id", &r.vm_id)?;
        let (snap, rec) = self.sup.snapshot(&id, r.diff).await?;
        Ok(Response::new(pb::SnapshotVmResponse {
            snapshot_id: snap.snapshot_id,
            path: snap.path.display().to_string(),
            created_at: Some(ts(snap.created_at_ms)),
            state: state_to_pb(rec.observed) as i32,
        }))
    }

    type WatchEventsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::VmEvent, Status>> + Send>>;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        use tokio_stream::StreamExt;
        use tokio_stream::wrappers::BroadcastStream;
        use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
        let r = req.into_inner();
        let only = if r.vm_id.is_empty() {
            None
        } else {
            Some(VmId::parse("vm_id", &r.vm_id)?.to_string())
        };
        let stream = BroadcastStream::new(self.sup.events().subscribe()).filter_map(move |ev| {
            match ev {
                Ok(ev) if only.as_ref().is_none_or(|v| *v == ev.vm_id) => Some(Ok(event_to_pb(ev))),
                Ok(_) => None,
                // A watcher too slow to keep up is told how much it missed and carries on;
                // the history (GetVmEvents) still has it.
                Err(BroadcastStreamRecvError::Lagged(n)) => Some(Ok(pb::VmEvent {
                    kind: "lagged".into(),
                    message: format!("{n} events dropped for this watcher; see GetVmEvents"),
                    ..Default::default()
                })),
            }
        });
        // A stopping metald ends every open stream with a status that says so, rather than
        // waiting for its watchers to hang up (which could be never).
        let stop = tokio_stream::wrappers::WatchStream::new(self.sup.stopping())
            .filter(|stopping| *stopping)
            .map(|_| Err(Status::unavailable("metald is shutting down")));
        Ok(Response::new(Box::pin(stream.merge(stop))))
    }

    async fn get_vm_health(
        &self,
        req: Request<pb::GetVmHealthRequest>,
    ) -> Result<Response<pb::GetVmHealthResponse>, Status> {
        let id = VmId::parse("vm_id", &req.into_inner().vm_id)?;
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
            let id = VmId::parse("page_token", &r.page_token)
                .map_err(|_| Error::invalid("page_token", "is not a token from ListVms"))?;
            Some(id.to_string())
        };
        // From the controllers, which hold the truth even while the registry is behind.
        let matching: Vec<VmRecord> = self
            .sup
            .all_live()
            .into_iter()
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
            rows.last().map(|r| r.vm_id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        let vms = rows
            .iter()
            .map(|rec| pb::VmInfo {
                vm_id: rec.vm_id.to_string(),
                state: state_to_pb(rec.observed) as i32,
                vcpu_count: i32::try_from(rec.spec.vcpus).unwrap_or(i32::MAX),
                memory_size_bytes: i64::try_from(rec.spec.memory_bytes).unwrap_or(i64::MAX),
                created_timestamp: Some(ts(rec.created_at_ms)),
                modified_timestamp: Some(ts(rec.updated_at_ms)),
                metadata: rec.spec.metadata.clone().into_iter().collect(),
                customer_id: rec.customer_id.clone(),
                guest_ready: rec.guest.ready,
                guest_ready_at: rec.guest.ready.then(|| ts(rec.guest.ready_at_ms)),
            })
            .collect();
        Ok(Response::new(pb::ListVmsResponse {
            vms,
            next_page_token,
            total_count: i32::try_from(total).unwrap_or(i32::MAX),
        }))
    }
}
