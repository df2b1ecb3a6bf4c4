//! Daemon configuration: a TOML file, overridden by command-line flags. Every knob has a default
//! suited to a production KVM host; tests and the demo override the accelerator to `tcg`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::millis;
// Domain types the config holds, defined with the VMs they describe.
pub use crate::model::{GuestHealthConfig, GuestProbe, VmmKind};

/// The longest path a unix socket address holds (`sun_path` is 108 bytes with its NUL).
pub const SUN_PATH_MAX: usize = 107;

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization; what production hosts use.
    Kvm,
    /// QEMU's software emulation; for hosts without working (nested) KVM, such as CI.
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(Error::Config(format!(
                "accel: {other:?} is not one of kvm, tcg"
            ))),
        }
    }
}

/// Where the gRPC API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket (created with mode 0660).
    Unix(PathBuf),
    /// A TCP address, `HOST:PORT`.
    Tcp(String),
}

impl std::str::FromStr for Listen {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(Error::Config("listen: unix: needs a path".into()));
            }
            Ok(Listen::Unix(PathBuf::from(p)))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            if a.is_empty() {
                return Err(Error::Config("listen: tcp: needs HOST:PORT".into()));
            }
            Ok(Listen::Tcp(a.to_string()))
        } else {
            Err(Error::Config(format!(
                "listen: {s:?} must be unix:PATH or tcp:HOST:PORT"
            )))
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line; what log pipelines and alert rules consume.
    Json,
    /// Human-readable lines.
    Text,
}

impl std::str::FromStr for LogFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "json" => Ok(LogFormat::Json),
            "text" => Ok(LogFormat::Text),
            other => Err(Error::Config(format!(
                "log_format: {other:?} is not one of json, text"
            ))),
        }
    }
}

/// The daemon's whole configuration, as read from `--config FILE`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Registry, run directories, sockets and logs live here.
    pub state_dir: PathBuf,
    /// `unix:PATH` or `tcp:HOST:PORT`; defaults to `unix:<state_dir>/metald.sock`.
    pub listen: Option<String>,
    /// Accelerator for QEMU guests.
    pub accel: Accel,
    /// The VMM for VMs that do not name one.
    pub vmm: VmmKind,
    /// Firecracker driver settings.
    pub firecracker: FirecrackerConfig,
    /// The only roots from which kernels, initrds and drives may be used.
    pub asset_dirs: Vec<PathBuf>,
    /// Log format on stdout.
    pub log_format: LogFormat,
    /// Per-VM resource limits.
    pub limits: Limits,
    /// QEMU driver settings.
    pub qemu: QemuConfig,
    /// How long a guest may take to power off on ShutdownVm before its VMM is stopped.
    #[serde(with = "secs")]
    pub shutdown_timeout: Duration,
    /// How long metald itself may take to stop on SIGTERM: open streams are ended at once,
    /// calls in progress get most of it, and the registry is checkpointed before the end. VMMs
    /// keep running.
    #[serde(with = "secs")]
    pub shutdown_grace: Duration,
    /// VMM health checks.
    pub health: HealthConfig,
    /// Guest probes: the defaults for VMs that do not set their own.
    pub guest_health: GuestHealthConfig,
    /// The reconcile loop: registry against processes and files.
    pub reconcile: ReconcileConfig,
    /// Automatic recovery of orphaned VMs.
    pub recovery: RecoveryConfig,
    /// `HOST:PORT` for the operator HTTP endpoint (`/metrics`, `/healthz`, `/readyz`); `""`
    /// turns it off.
    pub metrics_listen: String,
    /// Events kept per VM in the registry.
    pub events_per_vm: usize,
    /// When metald goes readonly by itself.
    pub degraded: DegradedConfig,
    /// Who may call the API, and what each caller may do.
    pub auth: crate::auth::AuthConfig,
    /// Host-wide and per-customer caps on what VMs may commit.
    pub quota: QuotaConfig,
    /// A cgroup per VMM, with its limits.
    pub cgroups: CgroupConfig,
}

/// A cgroup per VMM (a jailed Firecracker's comes from the jailer instead).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CgroupConfig {
    /// Put each VMM in a cgroup of its own. metald refuses to start when it cannot.
    pub enabled: bool,
    /// Which cgroup version: "auto" (v2 on a unified host, v1 otherwise), "1" or "2".
    pub version: CgroupVersion,
    /// The cgroup, under each hierarchy's root, that holds this metald's VMs' cgroups. Default:
    /// `metald/<12 hex digits naming the state directory>`, so that two metalds on one host
    /// (two state directories) never share a VM's cgroup.
    pub parent: Option<String>,
    /// Memory a VMM may use beyond its guest's, in MiB (QEMU's own is some tens of MiB).
    pub memory_overhead_mib: u64,
    /// Most processes and threads in a VMM's cgroup.
    pub pids_max: u64,
    /// CPU a VMM may use per vCPU, in % of one core (0: no limit).
    pub cpu_pct_per_vcpu: u32,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            enabled: true,
            version: CgroupVersion::Auto,
            parent: None,
            memory_overhead_mib: 256,
            pids_max: 1024,
            cpu_pct_per_vcpu: 0,
        }
    }
}

/// Caps checked at CreateVm, host-wide and per customer. A create that would pass one is
/// refused with RESOURCE_EXHAUSTED naming it, and leaves nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaConfig {
    /// Most VMs on this host.
    pub max_vms: Option<u64>,
    /// Most guest memory committed on this host, in MiB; default: the host's memory, less
    /// `reserved_memory_mib`, times `memory_overcommit`.
    pub max_memory_mib: Option<u64>,
    /// Memory kept for the host itself (metald, the VMMs' own overhead, the kernel), in MiB.
    pub reserved_memory_mib: u64,
    /// How much more guest memory may be committed than the host has (1.0: none). Guests
    /// rarely touch all of their memory; a host that overcommits relies on that.
    pub memory_overcommit: f64,
    /// Most vCPUs committed on this host; default: none.
    pub max_vcpus: Option<u64>,
    /// Caps of one customer each.
    pub customers: Vec<CustomerQuota>,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            max_vms: None,
            max_memory_mib: None,
            reserved_memory_mib: 1024,
            memory_overcommit: 1.0,
            max_vcpus: None,
            customers: Vec::new(),
        }
    }
}

/// One customer's caps (`[[quota.customers]]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerQuota {
    /// The customer.
    pub customer_id: String,
    /// Most VMs.
    #[serde(default)]
    pub max_vms: Option<u64>,
    /// Most guest memory, in MiB.
    #[serde(default)]
    pub max_memory_mib: Option<u64>,
    /// Most vCPUs.
    #[serde(default)]
    pub max_vcpus: Option<u64>,
}

impl QuotaConfig {
    /// The host-wide memory cap in MiB: the configured one, or what the host has less the
    /// reserve, times the overcommit ratio. `host_mib` is the host's memory.
    pub fn memory_cap_mib(&self, host_mib: u64) -> u64 {
        self.max_memory_mib.unwrap_or_else(|| {
            let usable = host_mib.saturating_sub(self.reserved_memory_mib);
            // Whole MiB are enough; the ratio is checked to be finite and positive.
            #[allow(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss
            )]
            let cap = (usable as f64 * self.memory_overcommit) as u64;
            cap
        })
    }
}

/// When metald goes readonly by itself (see [`crate::host`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DegradedConfig {
    /// Below this many free bytes under the state directory the host is readonly; it is normal
    /// again above this plus 10 %.
    pub min_free_bytes: u64,
    /// How often the disk and a probe write are looked at, in ms.
    #[serde(with = "millis")]
    pub check_interval: Duration,
}

impl Default for DegradedConfig {
    fn default() -> Self {
        DegradedConfig {
            min_free_bytes: 64 << 20,
            check_interval: Duration::from_secs(1),
        }
    }
}

/// Automatic recovery: how often, how fast, and the host-wide limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecoveryConfig {
    /// Recover orphaned VMs automatically.
    pub enabled: bool,
    /// Failed recovery attempts in a row before the VM is marked FAILED.
    pub max_retries: u32,
    /// Wait before the second attempt (the first is immediate).
    #[serde(with = "millis")]
    pub retry_interval: Duration,
    /// Each further wait is the previous times this.
    pub backoff_factor: f64,
    /// Cap on the wait.
    #[serde(with = "millis")]
    pub max_retry_interval: Duration,
    /// Fraction by which each wait is randomly moved, so VMs that failed together do not retry
    /// together.
    pub jitter: f64,
    /// A VM up and healthy this long has its crash count reset.
    #[serde(with = "millis")]
    pub stable_period: Duration,
    /// Crashes a VM may have without ever staying up for `stable_period` before its restarts
    /// are slowed down (crash-loop backoff). A crash loop never makes a VM FAILED on its own:
    /// only failed recovery attempts do.
    pub crash_loop_threshold: u32,
    /// Recoveries that may run at once on this host.
    pub max_concurrent: usize,
    /// The circuit breaker.
    pub breaker: BreakerConfig,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            enabled: true,
            max_retries: 5,
            retry_interval: Duration::from_secs(1),
            backoff_factor: 2.0,
            max_retry_interval: Duration::from_secs(30),
            jitter: 0.1,
            // Like systemd's start-rate limit: a crash loop is a VMM dying within seconds of
            // each restart. A VM that ran for a while before it was killed is not looping.
            stable_period: Duration::from_secs(10),
            crash_loop_threshold: 5,
            max_concurrent: 4,
            breaker: BreakerConfig::default(),
        }
    }
}

/// The recovery circuit breaker: it opens when recoveries fail at more than `failure_rate`
/// within `window` (given at least `min_attempts`), and lets one probe through after `cool_off`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// The window over which outcomes are counted.
    #[serde(with = "millis")]
    pub window: Duration,
    /// Fewer attempts than this in the window never open the breaker.
    pub min_attempts: usize,
    /// Failure fraction above which it opens.
    pub failure_rate: f64,
    /// How long it stays open before a probe.
    #[serde(with = "millis")]
    pub cool_off: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: Duration::from_secs(60),
            min_attempts: 5,
            failure_rate: 0.5,
            cool_off: Duration::from_secs(30),
        }
    }
}

/// Health checks: each VM's controller pings its VMM's API on an interval with jitter.
///
/// The defaults catch a hung VMM within 3 s: checks start every 500 ms (±10 %), each may take
/// 500 ms, so the 4th failure in a row (`orphan_threshold`) lands at most ~2.6 s after the hang
/// begins. A QMP `query-status` answers in about a millisecond even with both cores saturated,
/// so 500 ms is two orders of magnitude of headroom against false alarms on a loaded host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Run health checks at all.
    pub enabled: bool,
    /// Time from the start of one check to the start of the next.
    #[serde(with = "millis")]
    pub interval: Duration,
    /// Bound on one check, connection included.
    #[serde(with = "millis")]
    pub timeout: Duration,
    /// Fraction of `interval` by which each wait is randomly shortened or lengthened, so that
    /// 1,000 VMs do not check in lockstep.
    pub jitter: f64,
    /// Failures in a row that make a VM unhealthy.
    pub failure_threshold: u32,
    /// Failures in a row that make a VM orphaned (its VMM is then killed).
    pub orphan_threshold: u32,
    /// Successes in a row that make an unhealthy VM healthy again.
    pub recovery_threshold: u32,
    /// Move the guest of a VMM that is alive but impaired (its control socket file gone, or
    /// its checks slow) to a new VMM process without stopping it, rather than leave it or kill
    /// it. A dead or hung VMM is restarted as before: there is nothing to move from.
    pub replace_impaired: bool,
    /// A check slower than this counts as slow; `failure_threshold` slow checks in a row make
    /// the VMM impaired. 0 (the default) turns this off: on an overloaded host every check is
    /// slow, and moving guests adds load.
    #[serde(with = "millis")]
    pub slow_threshold: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            enabled: true,
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(500),
            jitter: 0.1,
            failure_threshold: 2,
            orphan_threshold: 4,
            recovery_threshold: 2,
            replace_impaired: true,
            slow_threshold: Duration::ZERO,
        }
    }
}

/// The reconcile loop compares the registry with live processes and run directories, nudges
/// every controller to converge, and removes strays and stale files. It runs at start, every
/// `interval`, and on demand (the Reconcile RPC).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileConfig {
    /// Run the periodic loop (the pass at start and on demand run regardless).
    pub enabled: bool,
    /// Time between passes.
    #[serde(with = "millis")]
    pub interval: Duration,
    /// How long a stray VMM (metald's marker, no registry row) is left alone before it is
    /// killed; a VMM being created is recorded well within this.
    #[serde(with = "millis")]
    pub stray_grace: Duration,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            enabled: true,
            interval: Duration::from_secs(10),
            stray_grace: Duration::from_secs(10),
        }
    }
}

/// Firecracker driver settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FirecrackerConfig {
    /// The `firecracker` binary.
    pub binary: PathBuf,
    /// How long a new Firecracker may take to answer on its API socket.
    #[serde(with = "millis")]
    pub spawn_timeout: Duration,
    /// Timeout for one API request, connection included.
    #[serde(with = "millis")]
    pub api_timeout: Duration,
    /// Run Firecracker under its jailer.
    pub jailer: JailerConfig,
    /// Track dirty pages so that SnapshotVm can take diff snapshots (costs some performance).
    pub diff_snapshots: bool,
}

/// Firecracker's jailer: each VMM in a chroot under `chroot_base`, in its own cgroup, as
/// `uid`:`gid`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JailerConfig {
    /// Use the jailer.
    pub enabled: bool,
    /// The `jailer` binary.
    pub binary: PathBuf,
    /// User the VMM runs as.
    pub uid: u32,
    /// Group the VMM runs as.
    pub gid: u32,
    /// Jails are `<chroot_base>/<file name of the resolved firecracker binary>/<vm id>/root`,
    /// as the jailer names them. Created at start-up if missing.
    pub chroot_base: PathBuf,
    /// Which cgroup version the jailer uses: `auto` (v2 on a unified host, v1 otherwise, read
    /// from `/proc/mounts` as the jailer reads it), `1` or `2`.
    pub cgroup_version: CgroupVersion,
    /// The parent cgroup of every VMM: each VM's cgroup is `<controller mount>/<parent>/<vm id>`.
    pub parent_cgroup: String,
    /// Cgroup settings passed as `--cgroup KEY=VALUE` (for example `cpu.max=100000 100000`).
    /// When empty, metald passes `pids.max=max`, so that every VMM still gets its own cgroup,
    /// which is how metald finds every process a jailed start left behind.
    pub cgroups: Vec<String>,
}

/// The cgroup version the jailer is told to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CgroupVersion {
    /// Read from the host's mounts.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// cgroup v1 (one hierarchy per controller).
    #[serde(rename = "1")]
    V1,
    /// cgroup v2 (the unified hierarchy).
    #[serde(rename = "2")]
    V2,
}

impl Default for JailerConfig {
    fn default() -> Self {
        JailerConfig {
            enabled: false,
            binary: PathBuf::from("jailer"),
            uid: 0,
            gid: 0,
            chroot_base: PathBuf::from("/srv/jailer"),
            cgroup_version: CgroupVersion::Auto,
            parent_cgroup: "firecracker".into(),
            cgroups: Vec::new(),
        }
    }
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        FirecrackerConfig {
            binary: PathBuf::from("firecracker"),
            spawn_timeout: Duration::from_secs(5),
            api_timeout: Duration::from_secs(2),
            jailer: JailerConfig::default(),
            diff_snapshots: false,
        }
    }
}

/// Per-VM resource limits checked at CreateVm.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Smallest guest memory accepted, in MiB.
    pub min_memory_mib: u64,
    /// Largest guest memory accepted, in MiB.
    pub max_memory_mib: u64,
    /// Most vCPUs one VM may have; defaults to the host's CPU count.
    pub max_vcpus: Option<u32>,
}

/// QEMU driver settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QemuConfig {
    /// The `qemu-system-x86_64` binary.
    pub binary: PathBuf,
    /// How long a new QEMU may take to create its QMP socket.
    #[serde(with = "millis")]
    pub spawn_timeout: Duration,
    /// Timeout for one QMP command, connection included.
    #[serde(with = "millis")]
    pub qmp_timeout: Duration,
    /// Give each VM a pvpanic device, so a guest kernel panic reaches metald in milliseconds
    /// (`GUEST_PANICKED`). Needs the guest kernel's pvpanic driver; harmless without it.
    pub panic_device: bool,
    /// Run QEMU under its seccomp sandbox (`-sandbox on,obsolete=deny,elevateprivileges=deny,
    /// spawn=deny,resourcecontrol=deny`): a guest that escapes into QEMU cannot run programs,
    /// change its ids or use obsolete system calls. Snapshots pass QEMU an open file instead of
    /// a command to run, so they work under it.
    pub sandbox: bool,
    /// Run QEMU as this user id (and `gid`), dropped to before it execs; its run directory is
    /// given to it. None: metald's own user. Kernels, initrds and drives must be readable (and
    /// writable drives writable) by it: CreateVm checks.
    pub uid: Option<u32>,
    /// The group id QEMU runs as with `uid` (default: the same number as `uid`).
    pub gid: Option<u32>,
    /// Back guest RAM with a shared file in `shared_memory_dir`, so that a migration to a new
    /// QEMU on this host maps the same memory instead of copying it (`x-ignore-shared`): the
    /// guest's pause no longer grows with its memory. Costs nothing at run time; the RAM is
    /// a tmpfs file rather than anonymous memory (still charged to the VMM's cgroup).
    pub shared_memory: bool,
    /// A tmpfs for the shared RAM files (`metald-<instance>/<vm_id>.ram` under it).
    pub shared_memory_dir: PathBuf,
    /// The longest pause a live migration may impose on the guest (QEMU's `downtime-limit`):
    /// QEMU keeps copying dirtied memory until what is left can be sent within it. 30 ms (QEMU's
    /// own default is 300) kept a 128 MiB guest's pause p99 under 100 ms here; a guest that
    /// dirties memory faster than it can be sent in that time does not converge until
    /// `migration_timeout` (the migration fails, the guest stays): raise it for such guests, or
    /// use `shared_memory`, which sends no memory at all.
    #[serde(with = "millis")]
    pub migration_downtime: Duration,
    /// Cap on a live migration's transfer rate, in MiB/s (0: none). The stream is local, so
    /// only the host's CPU and memory bandwidth limit it; a cap spreads a large guest's move
    /// over more time (a longer migration, the same short pause).
    pub migration_max_bandwidth_mib: u64,
    /// Bound on a whole migration (or a snapshot's write or load).
    #[serde(with = "millis")]
    pub migration_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from("/var/lib/metald"),
            listen: None,
            accel: Accel::Kvm,
            vmm: VmmKind::Qemu,
            firecracker: FirecrackerConfig::default(),
            asset_dirs: Vec::new(),
            log_format: LogFormat::Json,
            auth: crate::auth::AuthConfig::default(),
            quota: QuotaConfig::default(),
            cgroups: CgroupConfig::default(),
            limits: Limits::default(),
            qemu: QemuConfig::default(),
            shutdown_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            health: HealthConfig::default(),
            guest_health: GuestHealthConfig::default(),
            reconcile: ReconcileConfig::default(),
            recovery: RecoveryConfig::default(),
            metrics_listen: "127.0.0.1:9464".into(),
            events_per_vm: 200,
            degraded: DegradedConfig::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            min_memory_mib: 128,
            max_memory_mib: 64 * 1024,
            max_vcpus: None,
        }
    }
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: PathBuf::from("qemu-system-x86_64"),
            spawn_timeout: Duration::from_secs(5),
            qmp_timeout: Duration::from_secs(2),
            panic_device: true,
            sandbox: true,
            uid: None,
            gid: None,
            shared_memory: false,
            shared_memory_dir: PathBuf::from("/dev/shm"),
            migration_downtime: Duration::from_millis(30),
            migration_max_bandwidth_mib: 0,
            migration_timeout: Duration::from_secs(120),
        }
    }
}

impl Config {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading config {}", path.display()), e))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// The API listen address, defaulting to a unix socket in the state directory.
    pub fn listen(&self) -> Result<Listen> {
        match &self.listen {
            Some(s) => s.parse(),
            None => Ok(Listen::Unix(self.state_dir.join("metald.sock"))),
        }
    }

    /// Most vCPUs a VM may have on this host.
    pub fn max_vcpus(&self) -> u32 {
        self.limits.max_vcpus.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
                .unwrap_or(1)
        })
    }

    /// What this host accepts of a VM's spec.
    pub fn spec_rules(&self) -> crate::model::SpecRules {
        crate::model::SpecRules {
            max_vcpus: self.max_vcpus(),
            min_memory_mib: self.limits.min_memory_mib,
            max_memory_mib: self.limits.max_memory_mib,
            asset_dirs: self.asset_dirs.clone(),
            guest_health: self.guest_health,
        }
    }

    /// The cgroup that holds this metald's VMs' cgroups (see [`CgroupConfig::parent`]).
    pub fn cgroup_parent(&self) -> String {
        if let Some(p) = &self.cgroups.parent {
            return p.clone();
        }
        format!("metald/{}", self.instance_tag())
    }

    /// Twelve hex digits that name this metald (its state directory) in host-wide places it
    /// shares with others: cgroups, shared-memory files.
    pub fn instance_tag(&self) -> String {
        // FNV-1a of the state directory's path: stable across restarts, different per metald.
        let dir = std::fs::canonicalize(&self.state_dir).unwrap_or_else(|_| self.state_dir.clone());
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in dir.as_os_str().as_encoded_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{:012x}", h >> 16)
    }

    /// Where this metald keeps VMs' shared RAM files (`qemu.shared_memory`).
    pub fn shared_memory_dir(&self) -> PathBuf {
        self.qemu
            .shared_memory_dir
            .join(format!("metald-{}", self.instance_tag()))
    }

    /// Path of the SQLite registry.
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("metald.db")
    }

    /// Directory that holds one run directory per VM.
    pub fn run_root(&self) -> PathBuf {
        self.state_dir.join("run")
    }

    /// Checks the settings that can be checked before anything starts.
    pub fn validate(&self) -> Result<()> {
        if self.asset_dirs.is_empty() {
            return Err(Error::Config(
                "asset_dirs: at least one asset directory is required; kernels, initrds and \
                 drives may only come from them"
                    .into(),
            ));
        }
        self.auth.validate().map_err(Error::Config)?;
        if let Listen::Tcp(addr) = self.listen()?
            && !self.auth.insecure_tcp
            && self.auth.tls.is_none()
        {
            return Err(Error::Config(format!(
                "listen: tcp:{addr} would serve the whole API to the network with no caller \
                 identity: configure mutual TLS ([auth.tls] cert, key and client_ca), or set \
                 auth.insecure_tcp = true (every caller an admin; only on a network you trust \
                 as much as root on this host)"
            )));
        }
        if self
            .cgroups
            .parent
            .as_deref()
            .is_some_and(|p| p.split('/').any(|c| c.is_empty() || c == ".." || c == "."))
        {
            return Err(Error::Config(
                "cgroups.parent: must be a relative path without empty or .. components".into(),
            ));
        }
        if self.qemu.gid.is_some() && self.qemu.uid.is_none() {
            return Err(Error::Config("qemu.gid: set qemu.uid too".into()));
        }
        let q = &self.quota;
        if !(q.memory_overcommit.is_finite() && q.memory_overcommit > 0.0) {
            return Err(Error::Config(
                "quota.memory_overcommit: must be a number above 0 (1.0: no overcommit)".into(),
            ));
        }
        for (i, c) in q.customers.iter().enumerate() {
            if c.customer_id.is_empty() {
                return Err(Error::Config(format!(
                    "quota.customers[{i}].customer_id: is required"
                )));
            }
        }
        if self.limits.min_memory_mib == 0
            || self.limits.min_memory_mib > self.limits.max_memory_mib
        {
            return Err(Error::Config(
                "limits: min_memory_mib must be > 0 and <= max_memory_mib".into(),
            ));
        }
        // A unix socket path is limited to 107 bytes. The VMMs' sockets do not care (a VMM is
        // given a bare name in its run directory when the whole path is too long, and metald
        // reaches it through the directory), but the API socket is for clients, which connect
        // by path: it must fit.
        if let Listen::Unix(path) = self.listen()?
            && path.as_os_str().len() > SUN_PATH_MAX
        {
            return Err(Error::Config(format!(
                "listen: the API socket {} is {} bytes, and unix socket paths are limited to {}: \
                 set listen to a shorter path (listen = \"unix:/run/metald.sock\", say)",
                path.display(),
                path.as_os_str().len(),
                SUN_PATH_MAX
            )));
        }
        let h = &self.health;
        if h.enabled
            && (h.interval.is_zero()
                || h.timeout.is_zero()
                || !(0.0..=0.5).contains(&h.jitter)
                || h.failure_threshold == 0
                || h.orphan_threshold < h.failure_threshold
                || h.recovery_threshold == 0)
        {
            return Err(Error::Config(
                "health: interval and timeout must be > 0, jitter within 0..=0.5, thresholds \
                 > 0 and orphan_threshold >= failure_threshold"
                    .into(),
            ));
        }
        if self.reconcile.interval.is_zero() {
            return Err(Error::Config("reconcile: interval must be > 0".into()));
        }
        if let Err((field, why)) = self.guest_health.check() {
            return Err(Error::Config(format!("guest_health.{field}: {why}")));
        }
        let r = &self.recovery;
        if r.max_retries == 0
            || r.max_concurrent == 0
            || r.backoff_factor < 1.0
            || !(0.0..=0.5).contains(&r.jitter)
            || !(0.0..=1.0).contains(&r.breaker.failure_rate)
        {
            return Err(Error::Config(
                "recovery: max_retries and max_concurrent must be > 0, backoff_factor >= 1, \
                 jitter within 0..=0.5 and breaker.failure_rate within 0..=1"
                    .into(),
            ));
        }
        self.listen()?;
        Ok(())
    }
}

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_forms() {
        assert_eq!(
            "unix:/a/b".parse::<Listen>().ok(),
            Some(Listen::Unix("/a/b".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:9".parse::<Listen>().ok(),
            Some(Listen::Tcp("127.0.0.1:9".into()))
        );
        assert!("http://x".parse::<Listen>().is_err());
        assert!("unix:".parse::<Listen>().is_err());
    }

    #[test]
    fn a_long_state_dir_needs_only_a_short_api_socket() {
        let long = PathBuf::from(format!("/{}", "d".repeat(100)));
        let cfg = Config {
            state_dir: long.clone(),
            asset_dirs: vec!["/".into()],
            ..Config::default()
        };
        // The default API socket, <state_dir>/metald.sock, is too long for clients: named.
        assert!(
            matches!(cfg.validate(), Err(Error::Config(m)) if m.starts_with("listen:") && m.contains("107"))
        );
        let cfg = Config {
            state_dir: long,
            asset_dirs: vec!["/".into()],
            listen: Some("unix:/run/metald.sock".into()),
            ..Config::default()
        };
        assert!(cfg.validate().is_ok());
    }

    /// The config examples in the README parse, so the documentation cannot drift from the
    /// config it describes (unknown keys are refused).
    #[test]
    fn readme_config_examples_parse() {
        let readme = include_str!("../../../README.md");
        let mut blocks = 0;
        for block in readme.split("```toml").skip(1) {
            let text = block.split("```").next().unwrap_or("");
            let cfg: std::result::Result<Config, _> = toml::from_str(text);
            assert!(
                cfg.is_ok(),
                "README toml block does not parse: {cfg:?}\n{text}"
            );
            blocks += 1;
        }
        assert!(
            blocks >= 2,
            "expected the daemon and Firecracker config examples"
        );
    }

    #[test]
    fn toml_overrides_defaults() {
        let cfg: Config = toml::from_str(
            "accel = \"tcg\"\nasset_dirs = [\"/srv\"]\nshutdown_timeout = 2.5\n[limits]\nmin_memory_mib = 256\n",
        )
        .unwrap_or_default();
        assert_eq!(cfg.accel, Accel::Tcg);
        assert_eq!(cfg.limits.min_memory_mib, 256);
        assert_eq!(cfg.shutdown_timeout, Duration::from_millis(2500));
        assert_eq!(cfg.limits.max_memory_mib, 64 * 1024);
    }
}
