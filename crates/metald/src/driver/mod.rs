//! VMM drivers behind one trait.
//!
//! A driver knows how to start one kind of VMM and talk to its control API; nothing above this
//! module knows which VMM a VM runs on. Two traits: [`VmmDriver`] is host-wide (start a VMM,
//! recognise one, clean up after one), and [`VmmControl`] is one VMM's control API, made by its
//! driver for that process. [`VmmDriver::spawn`] (and `adopt`, at re-attach) return a [`Vmm`]
//! handle that owns the process's endpoint, pidfd, run directory and control connection; the
//! controller drives the VMM only through it (`configure`, `boot`, `pause`, `resume`, `shutdown`,
//! `ping`, `kill`). Exit is observed through the handle's pidfd, never by polling.

pub use crate::config::SUN_PATH_MAX;
// The plumbing both drivers share, written once (common.rs).
pub use common::{CONSOLE_LOG, VMM_LOG, binary_version, connect_unix, socket_arg, socket_arg_is};
pub(crate) use common::{
    arg_after, args_after, bounded, cause_from_report, log_tail, read_tail, rotate_log, spawn_vmm,
    target_name, wait_ready,
};
// Defined below the drivers, with the records and errors they share.
pub use crate::error::DriverError;
pub use crate::model::VmmEndpoint;

pub mod cgroup;
mod common;
#[cfg(test)]
pub mod fake;
pub mod firecracker;
pub mod jail;
pub mod qemu;
pub mod qga;
pub mod qmp;
pub mod uds_http;

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::model::{VmId, VmSpec};
use crate::process::{ExitInfo, Pidfd};

/// The drivers a host has, and which one a VM uses.
#[derive(Clone)]
pub struct Drivers {
    default: crate::config::VmmKind,
    qemu: std::sync::Arc<dyn VmmDriver>,
    firecracker: std::sync::Arc<dyn VmmDriver>,
    /// The host's VMM cgroups, which both drivers place their VMMs in.
    cgroups: cgroup::CgroupPolicy,
}

impl std::fmt::Debug for Drivers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drivers")
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

impl Drivers {
    /// Both drivers, configured from the daemon config.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        // One view of the host's cgroups, for both drivers.
        let cgroups = cgroup::CgroupPolicy::from_config(cfg);
        Drivers {
            default: cfg.vmm,
            qemu: std::sync::Arc::new(
                qemu::QemuDriver::new(cfg.qemu.clone(), cfg.accel)
                    .with_cgroups(cgroups.clone())
                    .with_ram_dir(cfg.shared_memory_dir()),
            ),
            firecracker: std::sync::Arc::new(
                firecracker::FirecrackerDriver::new(cfg.firecracker.clone())
                    .with_cgroups(cgroups.clone())
                    .with_handover_dir(cfg.shared_memory_dir()),
            ),
            cgroups,
        }
    }

    /// These drivers (in-process tests put the scripted fake here).
    #[cfg(test)]
    pub(crate) fn with_drivers(
        default: crate::config::VmmKind,
        qemu: std::sync::Arc<dyn VmmDriver>,
        firecracker: std::sync::Arc<dyn VmmDriver>,
    ) -> Self {
        Drivers {
            default,
            qemu,
            firecracker,
            cgroups: cgroup::CgroupPolicy::off(),
        }
    }

    /// The host's default VMM.
    pub fn default_kind(&self) -> crate::config::VmmKind {
        self.default
    }

    /// The VMM a VM runs on.
    pub fn kind_for(&self, spec: &VmSpec) -> crate::config::VmmKind {
        spec.vmm.unwrap_or(self.default)
    }

    /// The driver for a VM.
    pub fn for_spec(&self, spec: &VmSpec) -> std::sync::Arc<dyn VmmDriver> {
        match self.kind_for(spec) {
            crate::config::VmmKind::Qemu => self.qemu.clone(),
            crate::config::VmmKind::Firecracker => self.firecracker.clone(),
        }
    }

    /// The host's VMM cgroups (for the sweep, which removes those no VM owns once).
    pub fn cgroups(&self) -> cgroup::CgroupPolicy {
        self.cgroups.clone()
    }

    /// Every driver, for work that must recognise any VMM (the stray sweep).
    pub fn all(&self) -> [std::sync::Arc<dyn VmmDriver>; 2] {
        [self.qemu.clone(), self.firecracker.clone()]
    }
}

impl DriverError {
    /// A failed connect to a control socket. Nobody listening (no file, connection refused,
    /// no permission) is `unreachable`; anything else, such as a full accept backlog on a stopped
    /// VMM, means something is there but not answering.
    pub fn connect(path: &Path, e: &std::io::Error) -> Self {
        DriverError::Socket {
            path: path.to_path_buf(),
            reason: e.to_string(),
            unreachable: matches!(
                e.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::PermissionDenied
            ),
        }
    }
}

/// A connection to a guest agent's channel.
pub type AgentStream = tokio::net::UnixStream;

/// What a driver needs to start a VM's VMM.
#[derive(Debug, Clone)]
pub struct SpawnRequest<'a> {
    /// The VM.
    pub vm_id: &'a VmId,
    /// Its validated config.
    pub spec: &'a VmSpec,
    /// Its run directory (exists, empty or holding files from an earlier run).
    pub run_dir: &'a Path,
    /// A snapshot directory to restore from instead of booting the kernel.
    pub restore: Option<&'a Path>,
    /// Start it as the target of a migration of the VM's running VMM: beside that VMM (its
    /// files under the [`TARGET_PREFIX`] names, in the same cgroup, nothing of the running VMM
    /// touched), waiting for the guest to arrive ([`VmmDriver::migrate`]).
    pub migration_target: bool,
    /// The VMM binary to run instead of the configured one (a rolling upgrade's new binary).
    pub binary: Option<&'a Path>,
}

/// The prefix of a migration target's files in the run directory (`next-qmp.sock`) while the
/// VM's VMM still has the plain names; [`VmmDriver::promote`] renames them once that VMM is gone.
pub const TARGET_PREFIX: &str = "next-";

/// The name of a migration target's own log in the run directory.
pub fn target_log_name() -> String {
    common::target_name(VMM_LOG, true)
}

/// What a migration cost, as the VMMs report it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationStats {
    /// From the start of the transfer to the target holding the guest, in ms.
    pub total_ms: u64,
    /// How long the vCPUs were stopped, as the source VMM measured it, in ms.
    pub downtime_ms: u64,
    /// Bytes sent over the migration channel (or written to the handover files).
    pub bytes: u64,
    /// Guest RAM was shared between the two processes, not copied.
    pub shared_memory: bool,
}

/// A running VMM, as [`VmmDriver::spawn`] or [`VmmDriver::adopt`] returns it: the one handle
/// that owns everything of that process: where it is reached, its pidfd (to watch and signal
/// it), its run directory, and its control connection ([`VmmControl`], kept open between
/// commands). Dropping it closes the connection; the process itself outlives it on purpose (a
/// VMM outlives metald).
pub struct Vmm {
    endpoint: VmmEndpoint,
    pidfd: Pidfd,
    run_dir: PathBuf,
    control: std::sync::Arc<dyn VmmControl>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("endpoint", &self.endpoint)
            .field("run_dir", &self.run_dir)
            .finish_non_exhaustive()
    }
}

impl Vmm {
    /// A handle over a started (or found) process and the control API a driver made for it.
    pub fn new(
        endpoint: VmmEndpoint,
        pidfd: Pidfd,
        run_dir: &Path,
        control: std::sync::Arc<dyn VmmControl>,
    ) -> Vmm {
        Vmm {
            endpoint,
            pidfd,
            run_dir: run_dir.to_path_buf(),
            control,
        }
    }

    /// Where it is reached (pid, start time, control socket, console), as the registry records it.
    pub fn endpoint(&self) -> &VmmEndpoint {
        &self.endpoint
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.endpoint.pid
    }

    /// Its pidfd: its exit, its reaping, signals that cannot hit a reused pid.
    pub fn pidfd(&self) -> &Pidfd {
        &self.pidfd
    }

    /// The VM's run directory it was started in.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Its control API, for work that outlives a borrow of the handle (a command awaited while
    /// its owner changes, the guest agent's task).
    pub fn control(&self) -> std::sync::Arc<dyn VmmControl> {
        self.control.clone()
    }

    /// Kills it with SIGKILL through its pidfd, which cannot hit a reused pid.
    pub fn kill(&self) -> Result<(), DriverError> {
        self.pidfd
            .signal(libc::SIGKILL)
            .map_err(|e| DriverError::Io(format!("SIGKILL pid {}", self.endpoint.pid), e))
    }
}

impl std::ops::Deref for Vmm {
    type Target = dyn VmmControl;

    /// A handle is used as its control API: `vmm.ping()`, `vmm.pause()`.
    fn deref(&self) -> &Self::Target {
        &*self.control
    }
}

/// What a VMM reports about its guest on `ping`. Every run state a VMM can report maps to one of
/// these; none is guessed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRun {
    /// Created, never booted (or waiting for a snapshot to be loaded).
    NotStarted,
    /// vCPUs running.
    Running,
    /// vCPUs paused (by metald, or by the VMM around a snapshot or migration).
    Paused,
    /// The guest suspended itself (ACPI S3); it is alive and wakes on an event.
    Suspended,
    /// The guest has shut down but the VMM is still there.
    ShutDown,
    /// The guest kernel panicked and the panic device told the VMM.
    Panicked,
    /// The VMM stopped the guest for good: an emulation error, a disk I/O error or a watchdog.
    /// The text is the VMM's own name for the state.
    Crashed(String),
    /// The VMM handed its guest to another process (a completed outgoing migration): what it
    /// holds is a stale copy that must never run again.
    MigratedAway,
}

/// Why a VMM says its guest stopped (QEMU's `SHUTDOWN` event reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShutdownReason {
    /// The guest powered itself off (ACPI, or an agent's guest-shutdown).
    GuestPoweroff,
    /// The guest rebooted; with `-no-reboot` that ends the VMM.
    GuestReset,
    /// The guest kernel panicked (panic device with the shutdown action).
    GuestPanic,
    /// A control-API quit (metald's own stop).
    HostQuit,
    /// A signal to the VMM.
    HostSignal,
    /// A reset asked through the control API.
    HostReset,
    /// Any other reason, as the VMM named it.
    Other(String),
}

impl ShutdownReason {
    /// Parses QEMU's `ShutdownCause` name.
    pub fn from_qemu(s: &str) -> Self {
        match s {
            "guest-shutdown" => ShutdownReason::GuestPoweroff,
            "guest-reset" => ShutdownReason::GuestReset,
            "guest-panic" => ShutdownReason::GuestPanic,
            "host-qmp-quit" => ShutdownReason::HostQuit,
            "host-signal" => ShutdownReason::HostSignal,
            "host-qmp-system-reset" => ShutdownReason::HostReset,
            other => ShutdownReason::Other(other.to_string()),
        }
    }
}

impl std::fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ShutdownReason::GuestPoweroff => "guest-shutdown",
            ShutdownReason::GuestReset => "guest-reset",
            ShutdownReason::GuestPanic => "guest-panic",
            ShutdownReason::HostQuit => "host-qmp-quit",
            ShutdownReason::HostSignal => "host-signal",
            ShutdownReason::HostReset => "host-qmp-system-reset",
            ShutdownReason::Other(s) => s,
        })
    }
}

/// Something a VMM reported on its held control connection, as it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmEvent {
    /// The guest stopped and the VMM is about to exit (or has shut the guest down).
    Shutdown(ShutdownReason),
    /// The vCPUs stopped.
    Stopped,
    /// The vCPUs resumed.
    Resumed,
    /// The guest kernel panicked (the panic device fired).
    GuestPanicked,
    /// The guest was reset; `guest` when the guest asked for it.
    Reset {
        /// Whether the guest itself asked.
        guest: bool,
    },
}

/// Why a VMM process ended, as far as the driver can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitCause {
    /// The guest powered itself off and the VMM exited cleanly.
    GuestPoweroff,
    /// The guest rebooted itself (or the machine was reset through the VMM's API); the VMM exits
    /// on a reset by design.
    GuestReboot,
    /// The guest kernel panicked and the VMM exited on it.
    GuestPanic,
    /// A signal ended it (an external kill, or a signal the VMM caught and exited on).
    Signal(i32),
    /// The VMM failed on its own (non-zero exit).
    Crash(String),
    /// The kernel's OOM killer killed it: its cgroup hit its memory limit.
    Oom,
    /// Not knowable (an adopted process that is not our child, killed without a trace).
    Unknown,
}

impl std::fmt::Display for ExitCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitCause::GuestPoweroff => f.write_str("guest powered off"),
            ExitCause::GuestReboot => f.write_str("guest rebooted"),
            ExitCause::GuestPanic => f.write_str("guest kernel panicked"),
            ExitCause::Signal(s) => write!(f, "signal {s}"),
            ExitCause::Crash(m) => write!(f, "crash: {m}"),
            ExitCause::Oom => f.write_str("oom (killed at its cgroup's memory limit)"),
            ExitCause::Unknown => f.write_str("unknown"),
        }
    }
}

/// One running VMM's control API, made by its driver for that process alone, holding its
/// control connection (QEMU's QMP session, Firecracker's kept HTTP connection) between commands.
/// Reached through the [`Vmm`] handle that owns it.
#[async_trait]
pub trait VmmControl: Send + Sync + 'static {
    /// Applies the VM's config through the control API. A no-op where the command line carries it.
    async fn configure(&self, spec: &VmSpec) -> Result<(), DriverError>;

    /// Starts the guest.
    async fn boot(&self) -> Result<(), DriverError>;

    /// Pauses the vCPUs.
    async fn pause(&self) -> Result<(), DriverError>;

    /// Resumes the vCPUs.
    async fn resume(&self) -> Result<(), DriverError>;

    /// Asks the guest to power off (ACPI power button or Ctrl-Alt-Del). Returns once the request
    /// was delivered; the caller waits on the pidfd for the exit.
    async fn shutdown(&self) -> Result<(), DriverError>;

    /// Asks the VMM to exit now without the guest's cooperation. The caller escalates to
    /// [`Vmm::kill`] if it does not.
    async fn quit(&self) -> Result<(), DriverError>;

    /// Checks that the VMM's API answers, and reports the guest's run state.
    async fn ping(&self) -> Result<GuestRun, DriverError>;

    /// Opens the held control connection to the VMM, through which every later command to it
    /// goes, and returns its events, which end when the connection does. `None` for a VMM whose
    /// control API sends no events (Firecracker): its exit and pings tell everything.
    async fn watch(&self) -> Result<Option<tokio::sync::mpsc::Receiver<VmmEvent>>, DriverError> {
        Ok(None)
    }

    /// Connects to the guest agent's channel (QEMU guest agent protocol). The stream is the
    /// agent's byte stream: what the driver needed to reach it (a handshake) is done.
    async fn agent_connect(&self) -> Result<AgentStream, DriverError>;

    /// Writes a complete snapshot of the paused VM into the directory `dest`. With `diff`, the
    /// VMM writes only the memory dirtied since the snapshot in `base` (the last one of this
    /// VMM), and the driver merges it onto a copy of that base, so that what `dest` holds can
    /// be restored alone.
    async fn snapshot(&self, dest: &Path, diff: Option<&Path>) -> Result<(), DriverError>;

    /// Loads a snapshot written by [`VmmControl::snapshot`] into a VMM spawned with
    /// `SpawnRequest::restore`; the guest stays paused until `boot`.
    async fn restore(&self, spec: &VmSpec, src: &Path) -> Result<(), DriverError>;

    /// Target side of a live migration: listen on the unix socket `channel` for the guest's
    /// state (this VMM was spawned as a migration target). With `shared_memory`, guest RAM is
    /// the same file in both processes and is not sent.
    async fn accept_migration(
        &self,
        _channel: &Path,
        _shared_memory: bool,
    ) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("a live migration", "this"))
    }

    /// Source side: send the guest over `channel` to a target that accepts on it, and wait,
    /// bounded, for the end. On failure the VMM keeps (and runs again) its guest.
    async fn send_migration(
        &self,
        _channel: &Path,
        _shared_memory: bool,
    ) -> Result<MigrationStats, DriverError> {
        Err(DriverError::Unsupported("a live migration", "this"))
    }

    /// Stops an outgoing migration in flight; the VMM keeps its guest.
    async fn cancel_migration(&self) -> Result<(), DriverError> {
        Ok(())
    }
}

/// One kind of VMM, host-wide: starts its processes, recognises them, and cleans up after
/// them. Each process it starts or adopts is driven through its own [`Vmm`] handle.
#[async_trait]
pub trait VmmDriver: Send + Sync + 'static {
    /// Short name (`qemu`, `firecracker`), shown as the VM's vmm.kind.
    fn kind(&self) -> &'static str;

    /// Starts the VMM process (guest not booted) and waits, bounded, for its control API to
    /// answer.
    async fn spawn(&self, req: &SpawnRequest<'_>) -> Result<Vmm, DriverError>;

    /// A handle for a VMM found running at re-attach (its process already verified as this
    /// VM's by the caller: pid, start time, command line). Connects nothing yet.
    fn adopt(&self, endpoint: VmmEndpoint, pidfd: Pidfd, run_dir: &Path) -> Vmm;

    /// Checks, at CreateVm, that a VM's config can run on this driver (a kernel in the format
    /// the VMM boots, files the VMM's user may open).
    fn validate_spec(&self, _spec: &VmSpec) -> Result<(), DriverError> {
        Ok(())
    }

    /// Checks, at start-up, that this host can run the driver as configured.
    fn check_host(&self) -> Result<(), String> {
        Ok(())
    }

    /// The VMM binary's version line (`--version`), empty when it cannot be had.
    fn version(&self) -> String {
        String::new()
    }

    /// Whether a process command line is this VM's VMM, so a pid found in the registry is only
    /// adopted if the process really is ours.
    fn owns_cmdline(&self, vm_id: &VmId, cmdline: &[String]) -> bool;

    /// If a process is a VMM that a metald using `run_root` started, the VM it belongs to. Used
    /// to find strays: VMMs with metald's marker and no registry row.
    fn identify(&self, proc_: &crate::process::ProcInfo, run_root: &Path) -> Option<VmId>;

    /// Removes what a VM's VMM left outside the run directory once it is gone (a jail, a
    /// cgroup, and any process still in them), keeping its logs in `run_dir`. Idempotent.
    async fn release(&self, _vm_id: &VmId, _run_dir: &Path) {}

    /// Removes leftovers (jails, cgroups) of VMs not in `live`, older than `grace`; returns how
    /// many it removed.
    fn sweep_leftovers(&self, _live: &[VmId], _grace: std::time::Duration) -> usize {
        0
    }

    /// Where this driver puts a VM's control socket inside its run directory.
    fn control_socket(&self, run_dir: &Path) -> PathBuf;

    /// The endpoint a VMM of VM `vm_id` started by this driver has: used to adopt a VMM that
    /// carries the VM's marker but was never recorded (metald died between starting it and
    /// writing it down). The caller still verifies it (start time, command line, a ping).
    fn endpoint_for(
        &self,
        _vm_id: &VmId,
        run_dir: &Path,
        pid: i32,
        start_time: u64,
    ) -> VmmEndpoint {
        VmmEndpoint {
            pid,
            start_time,
            control_socket: self.control_socket(run_dir),
            console_log: run_dir.join("console.log"),
        }
    }

    /// Moves the guest of `from`, the VM's VMM, into `to`, spawned for it with
    /// `SpawnRequest::migration_target`, and returns once `to` holds the guest: running if it was
    /// running, unless the driver can only hand it over paused (the caller resumes it then). On
    /// an error `from` still holds the guest, as it was; the caller removes `to`.
    async fn migrate(
        &self,
        _from: &Vmm,
        _to: &Vmm,
        _spec: &VmSpec,
    ) -> Result<MigrationStats, DriverError> {
        Err(DriverError::Unsupported("a live migration", self.kind()))
    }

    /// Makes `to`, a migration target now holding the guest, the VM's VMM once the VMM it
    /// replaced is gone: its files take the names the VM's VMM has (an operator's socket, the
    /// guest agent's, the control socket re-attach looks for), and its handle says so.
    /// A file that cannot be renamed is logged and left under its target name, which the
    /// handle then uses: the guest runs in `to` whatever its files are called.
    fn promote(&self, to: Vmm, spec: &VmSpec) -> Vmm {
        let Vmm {
            mut endpoint,
            pidfd,
            run_dir,
            ..
        } = to;
        match common::promote_files(&run_dir, self.own_files()) {
            Ok(()) => endpoint.control_socket = self.control_socket(&run_dir),
            Err(e) => {
                tracing::warn!(run_dir = %run_dir.display(), error = %e, "promoting a migration target's files failed; it keeps its target names")
            }
        }
        self.settle_cgroups(&run_dir, spec);
        self.adopt(endpoint, pidfd, &run_dir)
    }

    /// Gives a migration target's files in `run_dir` the VM's VMM names, for a target adopted
    /// at re-attach (its source gone).
    fn promote_files(&self, run_dir: &Path) {
        if let Err(e) = common::promote_files(run_dir, self.own_files()) {
            tracing::warn!(run_dir = %run_dir.display(), error = %e, "promoting a migration target's files failed");
        }
    }

    /// Removes what a migration target that never became the VM's VMM left in `run_dir` (its
    /// process is gone), and gives the VM's VMM back its own limits.
    fn discard_target(&self, run_dir: &Path, spec: &VmSpec) {
        common::discard_target_files(run_dir);
        self.settle_cgroups(run_dir, spec);
    }

    /// The files a VMM of this driver has in its run directory under its own name, which a
    /// migration target has under [`TARGET_PREFIX`] names until it is promoted.
    fn own_files(&self) -> &'static [&'static str] {
        &[]
    }

    /// Puts the VM's cgroup limits (in `run_dir`'s VM) back to one VMM's, once a migration's
    /// second VMM is gone.
    fn settle_cgroups(&self, _run_dir: &Path, _spec: &VmSpec) {}

    /// Tells a guest power-off from a crash or an external kill, from the exit status, the last
    /// shutdown reason the VMM reported (when it was watched), and whatever it left in its run
    /// directory. Asked once the process is gone, so it is the driver's, not the handle's.
    fn exit_cause(
        &self,
        run_dir: &Path,
        status: ExitInfo,
        reported: Option<&ShutdownReason>,
    ) -> ExitCause;
}
