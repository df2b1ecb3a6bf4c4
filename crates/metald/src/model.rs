//! The domain model: validated VM ids and specs, and the lifecycle state machine.
//!
//! Nothing in here knows about gRPC or about any VMM. [`VmState::apply`] makes the
//! lifecycle explicit (after cloud-hypervisor's `VmState`): an operation that the current state
//! does not allow is an error value the API returns, not a bug to hunt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A VM id: `[A-Za-z0-9_-]{1,64}`. It names run directories and sockets, so it is checked before
/// it touches the filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmId(String);

impl VmId {
    /// Validates an id; `field` names the request field in the error.
    pub fn parse(field: &str, s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(Error::invalid(field, "must not be empty"));
        }
        if s.len() > 64 {
            return Err(Error::invalid(field, "must be at most 64 characters"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(Error::invalid(
                field,
                format!("{s:?} must match [A-Za-z0-9_-]{{1,64}}"),
            ));
        }
        Ok(VmId(s.to_string()))
    }

    /// A fresh random id.
    pub fn generate() -> Self {
        VmId(format!("vm-{}", uuid::Uuid::new_v4().simple()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VmId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        VmId::parse("vm_id", &s)
    }
}

impl From<VmId> for String {
    fn from(v: VmId) -> String {
        v.0
    }
}

impl std::fmt::Display for VmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A VM's lifecycle state, as observed on the VMM. Also used as the desired state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmState {
    /// VMM process started and configured; guest not booted.
    Created,
    /// Guest running.
    Running,
    /// vCPUs paused.
    Paused,
    /// No VMM process.
    Shutdown,
    /// Should be running or paused, but its VMM died, hung or became unreachable.
    Orphaned,
    /// Automatic recovery gave up; waits for an operator.
    Failed,
}

impl VmState {
    /// Stable name stored in the registry.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Shutdown => "shutdown",
            VmState::Orphaned => "orphaned",
            VmState::Failed => "failed",
        }
    }

    /// Parses a registry name.
    pub fn from_db(s: &str) -> Option<Self> {
        Some(match s {
            "created" => VmState::Created,
            "running" => VmState::Running,
            "paused" => VmState::Paused,
            "shutdown" => VmState::Shutdown,
            "orphaned" => VmState::Orphaned,
            "failed" => VmState::Failed,
            _ => return None,
        })
    }

    /// The state a user operation leads to from `self`, or why the operation is not allowed
    /// now. This table is the lifecycle: every operation the API offers is checked here first.
    pub fn apply(self, op: Transition) -> Result<VmState> {
        use Transition as T;
        use VmState::*;
        let to = match (op, self) {
            (T::Boot, Created | Shutdown | Orphaned | Failed) => Running,
            (T::Pause, Running) => Paused,
            (T::Resume, Paused) => Running,
            (T::Shutdown, Created | Running | Paused | Orphaned | Failed) => Shutdown,
            (T::Recover, Orphaned | Failed) => self,
            (T::Reboot, Running | Paused) => Running,
            _ => {
                return Err(Error::FailedPrecondition(format!(
                    "cannot {} a vm that is {}",
                    op.as_str(),
                    self.as_str()
                )));
            }
        };
        Ok(to)
    }

    /// The state a VM is observed in after `cause`, if the lifecycle allows `to` to follow
    /// `self` for it. With [`VmState::apply`] (what a user may ask for), this is the one table
    /// of what may follow what: every observed-state write a controller makes goes through
    /// it, for the steps of user operations and for exits, orphans, failures, drift and
    /// re-attach alike. A refusal is a bug in metald, reported rather than recorded.
    pub fn observe(self, vm_id: &VmId, to: VmState, cause: Cause) -> Result<VmState> {
        use VmState::*;
        let ok = match cause {
            // A fresh VMM (create, a boot from SHUTDOWN, a recovery, a restore) is CREATED
            // until its guest is started.
            Cause::Started => {
                to == Created && matches!(self, Created | Shutdown | Orphaned | Failed)
            }
            Cause::Ran => to == Running && matches!(self, Created | Running | Paused),
            // From CREATED too: a paused VM's new VMM is booted and paused in one step.
            Cause::Paused => to == Paused && matches!(self, Created | Running),
            // A VMM can end, asked or not, whatever was recorded.
            Cause::Stopped => to == Shutdown,
            // Also from FAILED: a recovery an operator asked for, that failed again.
            Cause::Orphaned => to == Orphaned,
            Cause::GaveUp => to == Failed && matches!(self, Orphaned | Shutdown),
            Cause::Drift => matches!((self, to), (Running, Paused) | (Paused, Running)),
            // Re-attach believes the VMM, whatever the row said when metald died.
            Cause::Adopted => matches!(to, Created | Running | Paused),
            // A migration moves the guest to a new VMM in the state it was in.
            Cause::Migrated => to == self && matches!(self, Running | Paused),
        };
        if ok {
            Ok(to)
        } else {
            Err(Error::IllegalTransition {
                vm_id: vm_id.to_string(),
                from: self.as_str(),
                to: to.as_str(),
                cause: cause.as_str(),
            })
        }
    }

    /// Whether a VMM process exists in this state.
    pub fn has_process(self) -> bool {
        !matches!(
            self,
            VmState::Shutdown | VmState::Orphaned | VmState::Failed
        )
    }
}

/// What moved a VM's observed state (see [`VmState::observe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// metald started a VMM for the VM: create, a boot from SHUTDOWN, a recovery, a restore.
    Started,
    /// The guest runs: booted, resumed, rebooted in place.
    Ran,
    /// The guest's vCPUs were paused.
    Paused,
    /// The VMM ended: asked to, its guest powered off, or converging to SHUTDOWN.
    Stopped,
    /// The VMM died, hung or became unreachable while the VM should run, or a recovery
    /// attempt failed.
    Orphaned,
    /// Automatic recovery gave up.
    GaveUp,
    /// The VMM reports running where metald recorded paused, or the reverse.
    Drift,
    /// Re-attach at start-up found the VM's VMM, in the state the VMM reports.
    Adopted,
    /// The guest moved to a new VMM process in the state it was in.
    Migrated,
}

impl Cause {
    /// Stable name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Started => "started",
            Cause::Ran => "ran",
            Cause::Paused => "paused",
            Cause::Stopped => "stopped",
            Cause::Orphaned => "orphaned",
            Cause::GaveUp => "gave_up",
            Cause::Drift => "drift",
            Cause::Adopted => "adopted",
            Cause::Migrated => "migrated",
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a VM was orphaned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrphanReason {
    /// The VMM process exited.
    ProcessDead,
    /// The VMM is alive but its API does not answer (hung, or stopped with SIGSTOP).
    ApiUnresponsive,
    /// The VMM's control socket is gone or refuses connections.
    SocketUnreachable,
    /// The recorded pid now belongs to another process.
    PidReused,
    /// The guest kernel panicked (panic device, the VMM's exit reason, or the console).
    GuestPanicked,
    /// The guest agent stopped answering, or never answered within the startup timeout.
    GuestUnresponsive,
    /// The VMM stopped the guest for good: an emulation error, a disk I/O error, a watchdog.
    GuestCrashed,
}

impl OrphanReason {
    /// Stable name used in logs, the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            OrphanReason::ProcessDead => "process_dead",
            OrphanReason::ApiUnresponsive => "api_unresponsive",
            OrphanReason::SocketUnreachable => "socket_unreachable",
            OrphanReason::PidReused => "pid_reused",
            OrphanReason::GuestPanicked => "guest_panicked",
            OrphanReason::GuestUnresponsive => "guest_unresponsive",
            OrphanReason::GuestCrashed => "guest_crashed",
        }
    }

    /// Parses a stable name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "process_dead" => OrphanReason::ProcessDead,
            "api_unresponsive" => OrphanReason::ApiUnresponsive,
            "socket_unreachable" => OrphanReason::SocketUnreachable,
            "pid_reused" => OrphanReason::PidReused,
            "guest_panicked" => OrphanReason::GuestPanicked,
            "guest_unresponsive" => OrphanReason::GuestUnresponsive,
            "guest_crashed" => OrphanReason::GuestCrashed,
            _ => return None,
        })
    }
}

impl std::fmt::Display for OrphanReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A VM's health as metald's checks see it. Persisted on every change of `is_healthy` and kept
/// current in memory between.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HealthStatus {
    /// False once `failure_threshold` checks in a row failed; true again after
    /// `recovery_threshold` successes.
    pub is_healthy: bool,
    /// When the last check finished (ms since the epoch; 0: never).
    pub last_check_ms: i64,
    /// The VMM's pid at the last check.
    pub pid: Option<i32>,
    /// The control socket checked.
    pub control_socket: String,
    /// The last check's error (empty when it passed).
    pub last_error: String,
    /// Failed checks in a row.
    pub consecutive_failures: u32,
    /// Passed checks in a row.
    pub consecutive_successes: u32,
    /// Times the VM came back (health restored, or VMM restarted after being orphaned).
    pub recovery_count: u32,
    /// When the VMM last answered (ms since the epoch).
    pub last_activity_ms: i64,
}

/// What metald knows of a VM's guest (as opposed to its VMM), from its probe. Persisted when
/// readiness changes and kept current in memory between.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestStatus {
    /// The guest answered a probe since its last boot, restore or recovery.
    pub ready: bool,
    /// When it first answered after that (ms since the epoch; 0: not ready).
    pub ready_at_ms: i64,
    /// When the last probe finished (ms since the epoch; 0: never probed).
    pub last_probe_ms: i64,
    /// Unanswered probes in a row.
    pub consecutive_failures: u32,
    /// The last probe's error (empty when it passed).
    pub last_error: String,
}

/// A user operation on a VM's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Start the guest (CREATED or SHUTDOWN to RUNNING).
    Boot,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Power off.
    Shutdown,
    /// Restart the guest.
    Reboot,
    /// Recover an orphaned or failed VM now.
    Recover,
}

impl Transition {
    /// Verb used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Boot => "boot",
            Transition::Pause => "pause",
            Transition::Resume => "resume",
            Transition::Shutdown => "shut down",
            Transition::Reboot => "reboot",
            Transition::Recover => "recover",
        }
    }
}

/// A state a caller may want a VM in. Never ORPHANED or FAILED: those happen to a VM, nobody
/// asks for them, so the type cannot hold them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// VMM started and configured, guest not booted.
    Created,
    /// Guest running.
    Running,
    /// Guest paused.
    Paused,
    /// No VMM.
    Shutdown,
}

impl Target {
    /// The observed state that meets this target.
    pub fn state(self) -> VmState {
        match self {
            Target::Created => VmState::Created,
            Target::Running => VmState::Running,
            Target::Paused => VmState::Paused,
            Target::Shutdown => VmState::Shutdown,
        }
    }

    /// The target for a state a caller may want; `None` for ORPHANED and FAILED.
    pub fn from_state(s: VmState) -> Option<Target> {
        match s {
            VmState::Created => Some(Target::Created),
            VmState::Running => Some(Target::Running),
            VmState::Paused => Some(Target::Paused),
            VmState::Shutdown => Some(Target::Shutdown),
            VmState::Orphaned | VmState::Failed => None,
        }
    }
}

/// What started a recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The VM was orphaned, for this reason.
    Orphan(OrphanReason),
    /// The guest powered itself off and the restart policy is `always`.
    GuestPoweroff,
    /// The guest rebooted itself (the VMM exits on a reset).
    GuestReboot,
    /// An operator's RecoverVm.
    Manual,
}

impl Trigger {
    /// Stable name: in logs, metrics labels, events and recovery history.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Orphan(r) => r.as_str(),
            Trigger::GuestPoweroff => "guest_poweroff",
            Trigger::GuestReboot => "guest_reboot",
            Trigger::Manual => "manual",
        }
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an event in a VM's history records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The observed state changed.
    StateChanged,
    /// The VMM's health checks turned healthy or unhealthy.
    HealthChanged,
    /// The VM became ORPHANED.
    Orphaned,
    /// A recovery attempt started.
    Recovering,
    /// A recovery attempt brought the VM back.
    Recovered,
    /// A recovery attempt failed.
    RecoveryFailed,
    /// Recovery gave up: the VM is FAILED.
    Failed,
    /// The guest answered its probe.
    GuestReady,
    /// The VMM's control socket disappeared.
    ControlSocketLost,
    /// The VMM's control socket came back.
    ControlSocketRestored,
    /// A host drain saved the guest and stopped its VMM.
    Saved,
    /// The VM was deleted (told to watchers only).
    Deleted,
    /// The guest moved to a new VMM process without stopping.
    Migrated,
    /// A migration failed; the guest stayed in its VMM.
    MigrationFailed,
}

impl EventKind {
    const ALL: [EventKind; 14] = [
        EventKind::StateChanged,
        EventKind::HealthChanged,
        EventKind::Orphaned,
        EventKind::Recovering,
        EventKind::Recovered,
        EventKind::RecoveryFailed,
        EventKind::Failed,
        EventKind::GuestReady,
        EventKind::ControlSocketLost,
        EventKind::ControlSocketRestored,
        EventKind::Saved,
        EventKind::Deleted,
        EventKind::Migrated,
        EventKind::MigrationFailed,
    ];

    /// Stable name stored in the registry.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::StateChanged => "state_changed",
            EventKind::HealthChanged => "health_changed",
            EventKind::Orphaned => "orphaned",
            EventKind::Recovering => "recovering",
            EventKind::Recovered => "recovered",
            EventKind::RecoveryFailed => "recovery_failed",
            EventKind::Failed => "failed",
            EventKind::GuestReady => "guest_ready",
            EventKind::ControlSocketLost => "control_socket_lost",
            EventKind::ControlSocketRestored => "control_socket_restored",
            EventKind::Saved => "saved",
            EventKind::Deleted => "deleted",
            EventKind::Migrated => "migrated",
            EventKind::MigrationFailed => "migration_failed",
        }
    }

    /// Parses a registry name.
    pub fn from_db(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// What the registry wants a VM to be. `Deleted` is a tombstone: the row stays until the VMM and
/// every file are gone, so a crash mid-delete finishes the delete on restart instead of
/// resurrecting the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Desired {
    /// One of the states a caller may want.
    State(Target),
    /// The VM is being deleted.
    Deleted,
}

impl Desired {
    /// Stable name stored in the registry.
    pub fn as_str(self) -> &'static str {
        match self {
            Desired::State(t) => t.state().as_str(),
            Desired::Deleted => "deleted",
        }
    }

    /// Parses a registry name.
    pub fn from_db(s: &str) -> Option<Self> {
        if s == "deleted" {
            Some(Desired::Deleted)
        } else {
            VmState::from_db(s)
                .and_then(Target::from_state)
                .map(Desired::State)
        }
    }
}

/// How a VM whose VMM died is brought back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreFrom {
    /// A new VMM boots the guest afresh.
    #[default]
    None,
    /// A new VMM restores the VM's boot snapshot: the guest rolls back to that moment.
    BootSnapshot,
}

/// What happens when a VM's VMM ends without metald asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Restart after crashes and after the guest powers itself off.
    Always,
    /// Restart after crashes only.
    #[default]
    OnFailure,
    /// Never restart automatically.
    Never,
}

impl RestartPolicy {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on_failure",
            RestartPolicy::Never => "never",
        }
    }
}

fn yes() -> bool {
    true
}

/// A block device attached as virtio-blk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    /// Device id, unique within the VM.
    pub id: String,
    /// Backing file, inside an asset directory.
    pub path: PathBuf,
    /// Attach read-only.
    pub read_only: bool,
    /// The guest's root filesystem.
    pub is_root: bool,
}

/// A network interface backed by a host tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Interface id, unique within the VM.
    pub id: String,
    /// Guest MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Host tap device name.
    pub tap: String,
}

/// A validated VM configuration, as stored in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in bytes (a whole number of MiB).
    pub memory_bytes: u64,
    /// Kernel image (canonical path inside an asset directory).
    pub kernel: PathBuf,
    /// Optional initrd (canonical path inside an asset directory).
    pub initrd: Option<PathBuf>,
    /// Kernel command line as given by the caller.
    pub kernel_args: String,
    /// Block devices; the root device, if any, first.
    pub drives: Vec<Drive>,
    /// Network interfaces.
    pub nics: Vec<Nic>,
    /// Write guest serial output to the console log.
    pub console: bool,
    /// Free-form labels.
    pub metadata: BTreeMap<String, String>,
    /// What to do when the VMM ends unasked.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Recover automatically when orphaned.
    #[serde(default = "yes")]
    pub auto_recover: bool,
    /// The VMM this VM runs on; the host default when unset.
    #[serde(default)]
    pub vmm: Option<VmmKind>,
    /// The guest context id of a vsock device, when it has one.
    #[serde(default)]
    pub vsock_cid: Option<u32>,
    /// How the guest is probed (resolved against the host defaults at create).
    #[serde(default)]
    pub guest_health: GuestHealthConfig,
    /// The VMM binary this VM runs on instead of the host's configured one: set when it was
    /// migrated onto another binary (a rolling upgrade), so that its later VMMs (a restart, a
    /// recovery) run that binary too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_binary: Option<PathBuf>,
    /// How a VMM that died is replaced: a cold boot, or a restore of the VM's boot snapshot.
    #[serde(default)]
    pub restore_from: RestoreFrom,
}

/// What a caller asked for, before validation. The API layer fills this from the protobuf.
#[derive(Debug, Clone, Default)]
pub struct VmSpecInput {
    /// `config.cpu.vcpu_count`.
    pub vcpus: i64,
    /// `config.memory.size_bytes`.
    pub memory_bytes: i64,
    /// `config.boot.kernel_path`.
    pub kernel: String,
    /// `config.boot.initrd_path`.
    pub initrd: String,
    /// `config.boot.kernel_args`.
    pub kernel_args: String,
    /// `config.storage`: (id, path, read_only, is_root).
    pub drives: Vec<(String, String, bool, bool)>,
    /// `config.network`: (id, mac, tap).
    pub nics: Vec<(String, String, String)>,
    /// `config.console.enabled`.
    pub console: bool,
    /// `config.metadata`.
    pub metadata: BTreeMap<String, String>,
    /// `config.restart_policy`.
    pub restart_policy: RestartPolicy,
    /// `config.restore_from`.
    pub restore_from: RestoreFrom,
    /// `config.auto_recover`.
    pub auto_recover: bool,
    /// `config.vmm`: "", "qemu" or "firecracker".
    pub vmm: String,
    /// `config.vsock.guest_cid`, when `config.vsock` is set.
    pub vsock_cid: Option<u32>,
    /// `config.guest_health`: (probe name, startup_timeout_ms, interval_ms, timeout_ms,
    /// failure_threshold); empty and zero fields take the host's defaults.
    pub guest_health: (String, u32, u32, u32, u32),
}

const MIB: u64 = 1024 * 1024;

/// Most storage devices one VM may have: a microVM's virtio-mmio slots are few (QEMU's
/// `microvm` has 24 for every device together), and each drive holds a file open in its VMM.
pub const MAX_DRIVES: usize = 16;
/// Most network interfaces one VM may have.
pub const MAX_NICS: usize = 8;

/// What a host accepts of a VM: the rules [`VmSpecInput::validate`] checks a request against,
/// taken from the daemon's config (`Config::spec_rules`) so that the domain needs none of it.
#[derive(Debug, Clone)]
pub struct SpecRules {
    /// Most vCPUs one VM may have.
    pub max_vcpus: u32,
    /// Smallest guest memory, in MiB.
    pub min_memory_mib: u64,
    /// Largest guest memory, in MiB.
    pub max_memory_mib: u64,
    /// Where kernels, initrds and disks may come from.
    pub asset_dirs: Vec<PathBuf>,
    /// The host's guest-health defaults, for what a request leaves unset.
    pub guest_health: GuestHealthConfig,
}

impl VmSpecInput {
    /// Validates every field against the host's rules, resolving asset paths. Each error names
    /// the request field.
    pub fn validate(self, cfg: &SpecRules) -> Result<VmSpec> {
        if self.restore_from == RestoreFrom::BootSnapshot
            && let Some((id, ..)) = self.drives.iter().find(|(_, _, ro, _)| !ro)
        {
            // A restore rolls the guest's memory back, not its disks: a guest whose page cache
            // and file systems no longer match its drive would corrupt it.
            return Err(Error::invalid(
                "config.restore_from",
                format!(
                    "a warm restore rolls the guest back to its boot snapshot, but not its writable \
                     drive {id:?}: use boot_snapshot only with read-only drives"
                ),
            ));
        }
        let max_vcpus = cfg.max_vcpus;
        if self.vcpus < 1 {
            return Err(Error::invalid(
                "config.cpu.vcpu_count",
                "must be at least 1",
            ));
        }
        if self.vcpus > i64::from(max_vcpus) {
            return Err(Error::invalid(
                "config.cpu.vcpu_count",
                format!("{} exceeds this host's limit of {max_vcpus}", self.vcpus),
            ));
        }
        let min = cfg.min_memory_mib * MIB;
        let max = cfg.max_memory_mib * MIB;
        let mem = u64::try_from(self.memory_bytes).unwrap_or(0);
        if mem < min || mem > max {
            return Err(Error::invalid(
                "config.memory.size_bytes",
                format!(
                    "{} is outside the allowed range {} MiB to {} MiB",
                    self.memory_bytes, cfg.min_memory_mib, cfg.max_memory_mib
                ),
            ));
        }
        if mem % MIB != 0 {
            return Err(Error::invalid(
                "config.memory.size_bytes",
                "must be a whole number of MiB",
            ));
        }
        if self.kernel.is_empty() {
            return Err(Error::invalid("config.boot.kernel_path", "is required"));
        }
        let kernel = resolve_asset(cfg, "config.boot.kernel_path", &self.kernel)?;
        let initrd = if self.initrd.is_empty() {
            None
        } else {
            Some(resolve_asset(cfg, "config.boot.initrd_path", &self.initrd)?)
        };
        if self.kernel_args.len() > 2048 {
            return Err(Error::invalid(
                "config.boot.kernel_args",
                "must be at most 2048 bytes",
            ));
        }
        if self.kernel_args.chars().any(|c| c.is_control()) {
            return Err(Error::invalid(
                "config.boot.kernel_args",
                "must not contain control characters",
            ));
        }

        if self.drives.len() > MAX_DRIVES {
            return Err(Error::invalid(
                "config.storage",
                format!("at most {MAX_DRIVES} storage devices"),
            ));
        }
        if self.nics.len() > MAX_NICS {
            return Err(Error::invalid(
                "config.network",
                format!("at most {MAX_NICS} network interfaces"),
            ));
        }
        let mut drives = Vec::with_capacity(self.drives.len());
        for (i, (id, path, read_only, is_root)) in self.drives.into_iter().enumerate() {
            let field = format!("config.storage[{i}]");
            check_device_id(&format!("{field}.id"), &id)?;
            if drives.iter().any(|d: &Drive| d.id == id) {
                return Err(Error::invalid(
                    format!("{field}.id"),
                    format!("{id:?} is used twice"),
                ));
            }
            if is_root && drives.iter().any(|d: &Drive| d.is_root) {
                return Err(Error::invalid(
                    format!("{field}.is_root_device"),
                    "only one storage device may be the root device",
                ));
            }
            let path = resolve_asset(cfg, &format!("{field}.path"), &path)?;
            drives.push(Drive {
                id,
                path,
                read_only,
                is_root,
            });
        }
        // The root device goes first so that it is the guest's first disk (vda).
        drives.sort_by_key(|d| !d.is_root);

        let mut nics = Vec::with_capacity(self.nics.len());
        for (i, (id, mac, tap)) in self.nics.into_iter().enumerate() {
            let field = format!("config.network[{i}]");
            check_device_id(&format!("{field}.id"), &id)?;
            if nics.iter().any(|n: &Nic| n.id == id) {
                return Err(Error::invalid(
                    format!("{field}.id"),
                    format!("{id:?} is used twice"),
                ));
            }
            check_mac(&format!("{field}.mac_address"), &mac)?;
            check_tap(&format!("{field}.tap_device"), &tap)?;
            nics.push(Nic { id, mac, tap });
        }

        if self.metadata.len() > 64 {
            return Err(Error::invalid("config.metadata", "at most 64 entries"));
        }
        for (k, v) in &self.metadata {
            if k.is_empty() || k.len() > 128 || v.len() > 1024 {
                return Err(Error::invalid(
                    format!("config.metadata[{k:?}]"),
                    "keys must be 1 to 128 bytes and values at most 1024 bytes",
                ));
            }
        }

        let guest_health = resolve_guest_health(cfg, &self.guest_health)?;
        Ok(VmSpec {
            guest_health,
            vmm_binary: None,
            vcpus: u32::try_from(self.vcpus).unwrap_or(1),
            memory_bytes: mem,
            kernel,
            initrd,
            kernel_args: self.kernel_args,
            drives,
            nics,
            console: self.console,
            metadata: self.metadata,
            restart_policy: self.restart_policy,
            restore_from: self.restore_from,
            auto_recover: self.auto_recover,
            vsock_cid: match self.vsock_cid {
                Some(cid) if cid < 3 || cid == u32::MAX => {
                    return Err(Error::invalid(
                        "config.vsock.guest_cid",
                        format!("{cid} is reserved; use 3 or more"),
                    ));
                }
                other => other,
            },
            vmm: match self.vmm.as_str() {
                "" => None,
                v => Some(v.parse().map_err(|_| {
                    Error::invalid(
                        "config.vmm",
                        format!("{v:?} is not one of qemu, firecracker"),
                    )
                })?),
            },
        })
    }
}

/// A VM's guest probe settings: what the request set, the host's defaults for the rest.
fn resolve_guest_health(
    cfg: &SpecRules,
    input: &(String, u32, u32, u32, u32),
) -> Result<GuestHealthConfig> {
    let (probe, startup, interval, timeout, threshold) = input;
    let mut g = cfg.guest_health;
    if !probe.is_empty() {
        g.probe = probe.parse().map_err(|_| {
            Error::invalid(
                "config.guest_health.probe",
                format!("{probe:?} is not one of none, agent"),
            )
        })?;
    }
    let ms = |v: u32, d: std::time::Duration| {
        if v == 0 {
            d
        } else {
            std::time::Duration::from_millis(u64::from(v))
        }
    };
    g.startup_timeout = ms(*startup, g.startup_timeout);
    g.interval = ms(*interval, g.interval);
    g.timeout = ms(*timeout, g.timeout);
    if *threshold != 0 {
        g.failure_threshold = *threshold;
    }
    let ms_field = |f: &str| match f {
        "failure_threshold" => f.to_string(),
        other => format!("{other}_ms"),
    };
    g.check().map_err(|(field, why)| {
        Error::invalid(format!("config.guest_health.{}", ms_field(&field)), why)
    })?;
    Ok(g)
}

/// Resolves `path` to a canonical regular file inside one of the configured asset directories.
/// Canonicalizing first means neither `..` nor a symlink can lead outside them.
fn resolve_asset(cfg: &SpecRules, field: &str, path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Error::invalid(
            field,
            format!("{path:?} must be an absolute path"),
        ));
    }
    let canon = std::fs::canonicalize(p)
        .map_err(|e| Error::invalid(field, format!("{path:?} cannot be used: {e}")))?;
    let inside = cfg.asset_dirs.iter().any(|dir| {
        std::fs::canonicalize(dir)
            .map(|d| canon.starts_with(d))
            .unwrap_or(false)
    });
    if !inside {
        return Err(Error::invalid(
            field,
            format!("{path:?} is outside the configured asset directories"),
        ));
    }
    let meta = std::fs::metadata(&canon)
        .map_err(|e| Error::invalid(field, format!("{path:?} cannot be used: {e}")))?;
    if !meta.is_file() {
        return Err(Error::invalid(
            field,
            format!("{path:?} is not a regular file"),
        ));
    }
    Ok(canon)
}

fn check_device_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 32
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(Error::invalid(
            field,
            format!("{id:?} must match [A-Za-z0-9_-]{{1,32}}"),
        ));
    }
    Ok(())
}

fn check_mac(field: &str, mac: &str) -> Result<()> {
    let parts: Vec<&str> = mac.split(':').collect();
    let well_formed = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed {
        return Err(Error::invalid(
            field,
            format!("{mac:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"),
        ));
    }
    let first = parts
        .first()
        .and_then(|p| u8::from_str_radix(p, 16).ok())
        .unwrap_or(1);
    if first & 1 == 1 {
        return Err(Error::invalid(
            field,
            format!("{mac:?} is a multicast address"),
        ));
    }
    Ok(())
}

fn check_tap(field: &str, tap: &str) -> Result<()> {
    // Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
    if tap.is_empty()
        || tap.len() > 15
        || !tap
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(Error::invalid(
            field,
            format!("{tap:?} is not a valid interface name"),
        ));
    }
    Ok(())
}

/// Which VMM runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmKind {
    /// QEMU `microvm`, driven over QMP.
    Qemu,
    /// Firecracker, driven over its REST API.
    Firecracker,
}

impl VmmKind {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            VmmKind::Qemu => "qemu",
            VmmKind::Firecracker => "firecracker",
        }
    }
}

impl std::str::FromStr for VmmKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "qemu" => Ok(VmmKind::Qemu),
            "firecracker" => Ok(VmmKind::Firecracker),
            other => Err(Error::Config(format!(
                "vmm: {other:?} is not one of qemu, firecracker"
            ))),
        }
    }
}

/// How a VM's guest is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestProbe {
    /// Never judge the guest by its silence (images without an agent). Panics are still caught.
    #[default]
    None,
    /// Ping the QEMU guest agent (qemu-guest-agent) in the guest.
    Agent,
}

impl GuestProbe {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestProbe::None => "none",
            GuestProbe::Agent => "agent",
        }
    }
}

impl std::str::FromStr for GuestProbe {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(GuestProbe::None),
            "agent" => Ok(GuestProbe::Agent),
            other => Err(Error::Config(format!(
                "probe: {other:?} is not one of none, agent"
            ))),
        }
    }
}

/// Guest readiness and liveness: the host's defaults (`[guest_health]`), and, resolved at
/// CreateVm, each VM's own settings (stored with its config).
///
/// With `probe = "agent"` the guest is ready at its first answered `guest-ping` after a boot,
/// restore or recovery; once ready, `failure_threshold` unanswered probes in a row orphan it
/// (`guest_unresponsive`), and so does never answering within `startup_timeout`. The defaults
/// leave a loaded TCG host (2 s boots) an order of magnitude of headroom: a probe is allowed 1 s,
/// and only 3 in a row (about 3 s of silence) count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuestHealthConfig {
    /// How the guest is probed.
    pub probe: GuestProbe,
    /// How long after a boot, restore or recovery the guest may take to answer the first time.
    #[serde(with = "millis")]
    pub startup_timeout: Duration,
    /// Time from the start of one probe to the start of the next.
    #[serde(with = "millis")]
    pub interval: Duration,
    /// Bound on one probe.
    #[serde(with = "millis")]
    pub timeout: Duration,
    /// Unanswered probes in a row, after the guest was ready, that orphan it.
    pub failure_threshold: u32,
}

impl Default for GuestHealthConfig {
    fn default() -> Self {
        GuestHealthConfig {
            probe: GuestProbe::None,
            startup_timeout: Duration::from_secs(60),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failure_threshold: 3,
        }
    }
}

impl GuestHealthConfig {
    /// Checks the settings; `field` prefixes the name in the error.
    pub fn check(&self) -> std::result::Result<(), (String, String)> {
        let ms = |d: Duration| d.as_millis();
        if !(1_000..=3_600_000).contains(&ms(self.startup_timeout)) {
            return Err((
                "startup_timeout".into(),
                "must be between 1 s and 1 h".into(),
            ));
        }
        if !(100..=600_000).contains(&ms(self.interval)) {
            return Err((
                "interval".into(),
                "must be between 100 ms and 10 min".into(),
            ));
        }
        if ms(self.timeout) < 50 || self.timeout > self.interval {
            return Err((
                "timeout".into(),
                "must be at least 50 ms and at most the interval".into(),
            ));
        }
        if !(1..=100).contains(&self.failure_threshold) {
            return Err(("failure_threshold".into(), "must be 1 to 100".into()));
        }
        Ok(())
    }
}

/// Durations as whole milliseconds in config files and stored specs.
pub(crate) mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    /// Writes a duration as milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
    /// Reads a duration from milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Where a running VMM can be reached. Stored in the registry so metald can find it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmEndpoint {
    /// The VMM's pid.
    pub pid: i32,
    /// Its start time (clock ticks since boot); with the pid, identifies the process.
    pub start_time: u64,
    /// Its control socket (QMP, or Firecracker's API socket).
    pub control_socket: PathBuf,
    /// Guest serial output.
    pub console_log: PathBuf,
}

/// A duration in whole milliseconds, for logs and records (saturating: no duration metald
/// measures comes near 584 million years).
pub fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds as seconds, for metrics and the API's durations. Exact for any span below
/// 2^52 ms (142,000 years).
#[allow(clippy::cast_precision_loss)]
pub fn ms_to_secs(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// Milliseconds since the epoch: the time in every record.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn vm_id_rules() {
        assert!(VmId::parse("vm_id", "web-1_A").is_ok());
        for bad in ["", "../x", "a/b", "a b", "é", &"x".repeat(65)] {
            let err = VmId::parse("vm_id", bad).unwrap_err();
            assert!(err.to_string().starts_with("vm_id: "), "{err}");
        }
    }

    #[test]
    fn transitions() {
        use Transition as T;
        use VmState::*;
        assert_eq!(Created.apply(T::Boot).ok(), Some(Running));
        assert_eq!(Shutdown.apply(T::Boot).ok(), Some(Running));
        assert_eq!(Running.apply(T::Pause).ok(), Some(Paused));
        assert_eq!(Paused.apply(T::Resume).ok(), Some(Running));
        assert_eq!(Paused.apply(T::Shutdown).ok(), Some(Shutdown));
        assert_eq!(Running.apply(T::Reboot).ok(), Some(Running));
        assert_eq!(Orphaned.apply(T::Boot).ok(), Some(Running));
        assert_eq!(Orphaned.apply(T::Shutdown).ok(), Some(Shutdown));
        assert!(Orphaned.apply(T::Pause).is_err());
        for (s, op) in [
            (Created, T::Pause),
            (Shutdown, T::Pause),
            (Paused, T::Pause),
            (Running, T::Resume),
            (Running, T::Boot),
            (Shutdown, T::Shutdown),
            (Created, T::Reboot),
        ] {
            let err = s.apply(op).unwrap_err();
            assert!(matches!(err, Error::FailedPrecondition(_)), "{s:?} {op:?}");
        }
    }

    #[test]
    fn desired_roundtrip() {
        for d in [
            Desired::Deleted,
            Desired::State(Target::Running),
            Desired::State(Target::Paused),
        ] {
            assert_eq!(Desired::from_db(d.as_str()), Some(d));
        }
        for k in EventKind::ALL {
            assert_eq!(EventKind::from_db(k.as_str()), Some(k));
        }
        // Nobody asks for ORPHANED or FAILED: neither is a desired state, even in the registry.
        for s in ["orphaned", "failed"] {
            assert_eq!(Desired::from_db(s), None);
        }
        assert_eq!(Target::from_state(VmState::Orphaned), None);
        assert_eq!(Target::from_state(VmState::Failed), None);
        for t in [
            Target::Created,
            Target::Running,
            Target::Paused,
            Target::Shutdown,
        ] {
            assert_eq!(Target::from_state(t.state()), Some(t));
        }
    }

    fn cfg_with(dir: &Path) -> Config {
        Config {
            asset_dirs: vec![dir.to_path_buf()],
            ..Config::default()
        }
    }

    #[test]
    fn spec_validation_names_fields() {
        let dir = std::env::temp_dir().join(format!("metald-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("k");
        std::fs::write(&kernel, b"k").unwrap();
        let cfg = cfg_with(&dir);
        let good = VmSpecInput {
            vcpus: 1,
            memory_bytes: 128 * MIB as i64,
            kernel: kernel.display().to_string(),
            ..Default::default()
        };
        assert!(good.clone().validate(&cfg.spec_rules()).is_ok());

        let field_of = |i: VmSpecInput| match i.validate(&cfg.spec_rules()) {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        assert_eq!(
            field_of(VmSpecInput {
                vcpus: 0,
                ..good.clone()
            }),
            "config.cpu.vcpu_count"
        );
        assert_eq!(
            field_of(VmSpecInput {
                vcpus: 100_000,
                ..good.clone()
            }),
            "config.cpu.vcpu_count"
        );
        assert_eq!(
            field_of(VmSpecInput {
                memory_bytes: 64 * MIB as i64,
                ..good.clone()
            }),
            "config.memory.size_bytes"
        );
        assert_eq!(
            field_of(VmSpecInput {
                memory_bytes: -1,
                ..good.clone()
            }),
            "config.memory.size_bytes"
        );
        assert_eq!(
            field_of(VmSpecInput {
                kernel: "/etc/passwd".into(),
                ..good.clone()
            }),
            "config.boot.kernel_path"
        );
        assert_eq!(
            field_of(VmSpecInput {
                kernel: format!("{}/../../etc/passwd", dir.display()),
                ..good.clone()
            }),
            "config.boot.kernel_path"
        );
        assert_eq!(
            field_of(VmSpecInput {
                kernel: dir.join("nope").display().to_string(),
                ..good.clone()
            }),
            "config.boot.kernel_path"
        );
        assert_eq!(
            field_of(VmSpecInput {
                nics: vec![("n0".into(), "01:00:00:00:00:01".into(), "tap0".into())],
                ..good.clone()
            }),
            "config.network[0].mac_address"
        );
        assert_eq!(
            field_of(VmSpecInput {
                drives: vec![
                    ("a".into(), kernel.display().to_string(), false, true),
                    ("b".into(), kernel.display().to_string(), false, true)
                ],
                ..good.clone()
            }),
            "config.storage[1].is_root_device"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_observed_state_table_allows_what_happens_and_nothing_else() {
        use Cause::{Adopted, Drift, GaveUp, Ran, Started, Stopped};
        use VmState::{Created, Failed, Running, Shutdown};
        const PAUSED: VmState = VmState::Paused;
        const ORPHANED: VmState = VmState::Orphaned;
        let all = [Created, Running, PAUSED, Shutdown, ORPHANED, Failed];
        let id = VmId::parse("vm_id", "t").unwrap();
        let allowed = |cause: Cause| -> Vec<(VmState, VmState)> {
            let mut v = Vec::new();
            for from in all {
                for to in all {
                    if from.observe(&id, to, cause).is_ok() {
                        v.push((from, to));
                    }
                }
            }
            v
        };
        let want: [(Cause, Vec<(VmState, VmState)>); 8] = [
            (
                Started,
                vec![
                    (Created, Created),
                    (Shutdown, Created),
                    (ORPHANED, Created),
                    (Failed, Created),
                ],
            ),
            (
                Ran,
                vec![(Created, Running), (Running, Running), (PAUSED, Running)],
            ),
            (Cause::Paused, vec![(Created, PAUSED), (Running, PAUSED)]),
            (Stopped, all.iter().map(|f| (*f, Shutdown)).collect()),
            (
                Cause::Orphaned,
                all.iter().map(|f| (*f, ORPHANED)).collect(),
            ),
            (GaveUp, vec![(Shutdown, Failed), (ORPHANED, Failed)]),
            (Drift, vec![(Running, PAUSED), (PAUSED, Running)]),
            (
                Adopted,
                all.iter()
                    .flat_map(|f| [(*f, Created), (*f, Running), (*f, PAUSED)])
                    .collect(),
            ),
        ];
        for (cause, pairs) in want {
            assert_eq!(allowed(cause), pairs, "{cause:?}");
        }
        // A refusal names the VM, both states and the cause.
        let e = Failed.observe(&id, Running, Ran).unwrap_err().to_string();
        assert!(e.contains("failed -> running (ran)"), "{e}");
    }
}
