//! A cgroup per VMM, for both drivers (a jailed Firecracker gets its cgroup from the jailer):
//! a memory limit of the guest's memory plus the VMM's own overhead, a pids limit, and an
//! optional CPU limit. On cgroup v2 one directory in the unified hierarchy; on v1 one in each of
//! the `memory`, `pids` and `cpu` hierarchies (these machines mount v1 controllers beside an
//! empty v2 hierarchy).
//!
//! The VMM is in its cgroup from its first instruction: the forked child writes itself into
//! `cgroup.procs` before it execs (see [`crate::process::spawn_detached_as`]), so no allocation
//! of the VMM's escapes the limit. The directory is named after the VM, so re-attach finds the
//! cgroup of an adopted VMM where it was; it is made afresh for each VMM (its counters, the OOM
//! kills among them, are that VMM's), and removed once the VMM is gone, after its exit's cause
//! (an OOM kill by the cgroup) was read.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::DriverError;
use super::jail::{CgroupHost, kill_cgroups};
use crate::config::CgroupConfig;
use crate::model::{VmId, VmSpec};

/// The v1 controllers a VMM's cgroup uses (as `--cgroup`-style settings, for [`CgroupHost`]);
/// `cpu` only with a CPU limit (see [`VmmCgroups::dirs`]).
const V1_CONTROLLERS: [&str; 3] = ["memory.limit_in_bytes", "pids.max", "cpu.cfs_quota_us"];
/// How long the processes left in a VMM's cgroup get to die.
const KILL_WAIT: Duration = Duration::from_secs(3);

/// The host's cgroups, as metald places its VMMs in them.
#[derive(Debug)]
pub struct VmmCgroups {
    host: CgroupHost,
    cfg: CgroupConfig,
    /// The cgroup (relative to each hierarchy's root) holding this metald's VMs' cgroups.
    parent: String,
}

/// Where a new VMM goes: its cgroups' `cgroup.procs`, for the child to write itself into, and
/// the user it runs as.
#[derive(Debug, Default)]
pub struct Placement {
    /// The path of `cgroup.procs` of each of the VMM's cgroups. Paths, not open files: the
    /// child opens each in turn, so that a start needs one file descriptor for them, not one
    /// per hierarchy (a host short of descriptors still starts VMMs).
    pub procs: Vec<CString>,
    /// (uid, gid) to run the VMM as; `None`: metald's own.
    pub user: Option<(u32, u32)>,
}

impl VmmCgroups {
    /// The host's hierarchies, as configured, with this metald's VMs under `parent`; an error
    /// says why they cannot be used.
    pub fn detect(cfg: &CgroupConfig, parent: &str) -> Result<VmmCgroups, String> {
        let host = CgroupHost::detect(cfg.version)?;
        let me = VmmCgroups {
            host,
            cfg: cfg.clone(),
            parent: parent.to_string(),
        };
        // Found now, not at the first VM: a host where metald may not make cgroups.
        for d in me.dirs("x") {
            let Some(p) = d.parent() else { continue };
            std::fs::create_dir_all(p).map_err(|e| format!("creating {}: {e}", p.display()))?;
        }
        Ok(me)
    }

    /// VM `id`'s cgroup directories.
    ///
    /// A VMM joins the v1 `cpu` hierarchy only when it has a CPU limit: each hierarchy joined is
    /// one more migration at start (see [`super::spawn_vmm`]), and a group of its own there
    /// changes how the scheduler weighs its threads against the rest of the host, which is
    /// worth it only for a limit.
    pub fn dirs(&self, id: &str) -> Vec<PathBuf> {
        let settings: Vec<String> = V1_CONTROLLERS
            .iter()
            .filter(|c| self.cfg.cpu_pct_per_vcpu > 0 || !c.starts_with("cpu."))
            .map(|s| (*s).to_string())
            .collect();
        self.host.vm_dirs(&self.parent, id, &settings)
    }

    /// The memory limit of a VMM for `spec`, in bytes: guest memory plus the VMM's overhead.
    pub fn memory_limit(&self, spec: &VmSpec) -> u64 {
        spec.memory_bytes
            .saturating_add(self.cfg.memory_overhead_mib.saturating_mul(1 << 20))
    }

    /// Makes VM `id`'s cgroups afresh with the limits for `spec` (what an earlier VMM of it left
    /// is killed and removed first) and returns their `cgroup.procs` for the new VMM to join.
    pub fn prepare(&self, id: &VmId, spec: &VmSpec) -> Result<Vec<CString>, DriverError> {
        let dirs = self.dirs(id.as_str());
        if dirs.is_empty() {
            return Err(DriverError::Spawn(
                "no cgroup hierarchy to place the VMM in".into(),
            ));
        }
        kill_cgroups(&dirs, KILL_WAIT).map_err(DriverError::Spawn)?;
        if self.host.version == 2 {
            self.enable_v2_controllers(&dirs)?;
        }
        let memory = self.memory_limit(spec).to_string();
        let pids = self.cfg.pids_max.to_string();
        // The CPU limit: `cpu_pct_per_vcpu` % of a core for each vCPU, over a 100 ms period.
        let quota = (self.cfg.cpu_pct_per_vcpu > 0)
            .then(|| u64::from(self.cfg.cpu_pct_per_vcpu) * u64::from(spec.vcpus) * 1000);
        let mut procs = Vec::with_capacity(dirs.len());
        for d in &dirs {
            std::fs::create_dir_all(d)
                .map_err(|e| DriverError::Io(format!("creating cgroup {}", d.display()), e))?;
            let is = |c: &str| self.host.version == 2 || d.starts_with(self.v1_mount(c));
            if is("memory") {
                let file = if self.host.version == 2 {
                    "memory.max"
                } else {
                    "memory.limit_in_bytes"
                };
                write(d, file, &memory)?;
                if self.host.version == 2 {
                    // No swap: a VMM over its limit is killed, not slowed to a crawl.
                    let _ = std::fs::write(d.join("memory.swap.max"), "0");
                }
            }
            if is("pids") {
                write(d, "pids.max", &pids)?;
            }
            if let Some(q) = quota.filter(|_| is("cpu")) {
                if self.host.version == 2 {
                    write(d, "cpu.max", &format!("{q} 100000"))?;
                } else {
                    write(d, "cpu.cfs_period_us", "100000")?;
                    write(d, "cpu.cfs_quota_us", &q.to_string())?;
                }
            }
            let p = d.join("cgroup.procs");
            let c = CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| {
                DriverError::Spawn(format!("cgroup path {} holds a NUL", p.display()))
            })?;
            procs.push(c);
        }
        Ok(procs)
    }

    /// Sets VM `id`'s memory limit to `bytes` (where its memory hierarchy is).
    fn set_memory(&self, id: &str, bytes: u64) -> Result<(), DriverError> {
        let file = if self.host.version == 2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        for d in self.dirs(id) {
            if self.host.version == 2 || d.starts_with(self.v1_mount("memory")) {
                write(&d, file, &bytes.to_string())?;
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` of VM `id`'s existing cgroups, for a second VMM to join beside the
    /// running one (a migration target), with the memory limit raised by `extra` bytes so that
    /// both fit until the first is gone. Nothing in them is killed.
    pub fn join_existing(
        &self,
        id: &VmId,
        spec: &VmSpec,
        extra: u64,
    ) -> Result<Vec<CString>, DriverError> {
        let dirs = self.dirs(id.as_str());
        if dirs.iter().any(|d| !d.is_dir()) {
            // The running VMM was started without cgroups (before they were enabled): the
            // target gets them afresh, which kills nothing since none of its dirs exist.
            return self.prepare(id, spec);
        }
        self.set_memory(id.as_str(), self.memory_limit(spec).saturating_add(extra))?;
        dirs.iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| {
                    DriverError::Spawn(format!("cgroup path {} holds a NUL", p.display()))
                })
            })
            .collect()
    }

    /// The mount point of a v1 controller (empty when it is not mounted).
    fn v1_mount(&self, controller: &str) -> PathBuf {
        self.host
            .vm_dirs("", "", &[format!("{controller}.x")])
            .into_iter()
            .next()
            .unwrap_or_default()
    }

    /// On v2, a child's controllers must be enabled in every ancestor's `subtree_control`,
    /// from the hierarchy's root down to the VMs' parent.
    fn enable_v2_controllers(&self, dirs: &[PathBuf]) -> Result<(), DriverError> {
        let Some(parent) = dirs.first().and_then(|d| d.parent()) else {
            return Ok(());
        };
        std::fs::create_dir_all(parent)
            .map_err(|e| DriverError::Io(format!("creating cgroup {}", parent.display()), e))?;
        let depth = self.parent.split('/').count();
        let ancestors: Vec<&Path> = parent.ancestors().take(depth + 1).collect();
        for d in ancestors.into_iter().rev() {
            // Each controller alone, so that one the host lacks (cpu, say) does not keep the
            // others off.
            for c in ["+memory", "+pids", "+cpu"] {
                let _ = std::fs::write(d.join("cgroup.subtree_control"), c);
            }
        }
        Ok(())
    }

    /// Whether the kernel's OOM killer killed a process of VM `id`'s cgroup because it hit its
    /// memory limit.
    pub fn oom_killed(&self, id: &str) -> bool {
        oom_killed_in(&self.dirs(id))
    }

    /// Whether process `pid` is in VM `id`'s cgroup (re-attach's check of an adopted VMM).
    pub fn holds(&self, id: &str, pid: i32) -> bool {
        self.dirs(id)
            .iter()
            .all(|d| super::jail::cgroup_pids(d).contains(&pid))
    }

    /// Removes VM `id`'s cgroups once its VMM is gone (anything still in them is killed first).
    pub fn remove(&self, id: &str) -> Result<(), String> {
        kill_cgroups(&self.dirs(id), KILL_WAIT).map(|_| ())
    }

    /// The VMs that have a cgroup under metald's parent, for the sweep.
    pub fn vms_with_cgroups(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .dirs("x")
            .iter()
            .filter_map(|d| d.parent())
            .filter_map(|p| std::fs::read_dir(p).ok())
            .flat_map(|r| r.flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Whether the OOM killer killed a process in one of the cgroups `dirs` at its memory limit
/// (`oom_kill N` in v2's `memory.events`, or in v1's `memory.oom_control`).
pub fn oom_killed_in(dirs: &[PathBuf]) -> bool {
    dirs.iter().any(|d| {
        ["memory.events", "memory.oom_control"].iter().any(|file| {
            std::fs::read_to_string(d.join(file)).is_ok_and(|t| {
                t.lines().any(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .is_some_and(|n| n > 0)
                })
            })
        })
    })
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), DriverError> {
    let p = dir.join(file);
    std::fs::write(&p, value)
        .map_err(|e| DriverError::Io(format!("writing {value} to {}", p.display()), e))
}

/// The cgroups a driver places its VMMs in: none (turned off in the config), the host's, or the
/// reason they cannot be used (reported at start-up by `check_host`). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct CgroupPolicy(Option<std::sync::Arc<Result<VmmCgroups, String>>>);

impl CgroupPolicy {
    /// From the config: its `[cgroups]`, and the parent cgroup it names for this metald.
    pub fn from_config(cfg: &crate::config::Config) -> CgroupPolicy {
        CgroupPolicy(
            cfg.cgroups.enabled.then(|| {
                std::sync::Arc::new(VmmCgroups::detect(&cfg.cgroups, &cfg.cgroup_parent()))
            }),
        )
    }

    /// No cgroups (tests of other things, a jailed driver).
    pub fn off() -> CgroupPolicy {
        CgroupPolicy(None)
    }

    fn get(&self) -> Option<&VmmCgroups> {
        self.0.as_deref().and_then(|r| r.as_ref().ok())
    }

    /// Whether the host can do what the config asks.
    pub fn check(&self) -> Result<(), String> {
        match self.0.as_deref() {
            Some(Err(e)) => Err(format!(
                "cgroups: {e}; set cgroups.enabled = false to run VMMs without limits"
            )),
            _ => Ok(()),
        }
    }

    /// Where VM `id`'s new VMM goes: its fresh cgroups (none when off), and `user`.
    pub fn place(
        &self,
        id: &VmId,
        spec: &VmSpec,
        user: Option<(u32, u32)>,
    ) -> Result<Placement, DriverError> {
        let procs = match self.0.as_deref() {
            None => Vec::new(),
            Some(Ok(c)) => c.prepare(id, spec)?,
            Some(Err(e)) => return Err(DriverError::Spawn(format!("cgroups: {e}"))),
        };
        Ok(Placement { procs, user })
    }

    /// Where a migration target of VM `id` goes: beside its running VMM, in the same cgroups,
    /// whose memory limit grows by `extra` bytes until [`CgroupPolicy::settle`].
    pub fn place_beside(
        &self,
        id: &VmId,
        spec: &VmSpec,
        user: Option<(u32, u32)>,
        extra: u64,
    ) -> Result<Placement, DriverError> {
        let procs = match self.0.as_deref() {
            None => Vec::new(),
            Some(Ok(c)) => c.join_existing(id, spec, extra)?,
            Some(Err(e)) => return Err(DriverError::Spawn(format!("cgroups: {e}"))),
        };
        Ok(Placement { procs, user })
    }

    /// The memory a VMM needs beside its guest's (`cgroups.memory_overhead_mib`), in bytes;
    /// 0 when cgroups are off.
    pub fn overhead(&self) -> u64 {
        self.get()
            .map_or(0, |c| c.cfg.memory_overhead_mib.saturating_mul(1 << 20))
    }

    /// Puts VM `id`'s memory limit back to one VMM's, once a migration's second VMM is gone.
    pub fn settle(&self, run_dir: &Path, spec: &VmSpec) {
        let id = run_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(c) = self.get()
            && let Err(e) = c.set_memory(&id, c.memory_limit(spec))
        {
            tracing::warn!(vm_id = %id, error = %e, "resetting the vmm's memory limit after a migration failed");
        }
    }

    /// Whether the VMM that ran in `run_dir`'s VM's cgroup was killed for its memory.
    pub fn oom_killed(&self, run_dir: &Path) -> bool {
        let id = run_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.get().is_some_and(|c| c.oom_killed(&id))
    }

    /// The limits of a VMM for `spec` as jailer `--cgroup` settings for cgroup `version`
    /// (memory, pids): what a jailed Firecracker gets in the cgroups the jailer makes. `None`
    /// when cgroups are off.
    pub fn jailer_settings(&self, spec: Option<&VmSpec>, version: u8) -> Option<Vec<String>> {
        let c = self.get()?;
        let memory = spec.map_or(0, |s| c.memory_limit(s));
        let file = if version == 2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        Some(vec![
            format!("{file}={memory}"),
            format!("pids.max={}", c.cfg.pids_max),
        ])
    }

    /// Whether an adopted VMM is in its VM's cgroup (true when cgroups are off).
    pub fn holds(&self, id: &VmId, pid: i32) -> bool {
        self.get().is_none_or(|c| c.holds(id.as_str(), pid))
    }

    /// Removes VM `id`'s cgroups (its VMM is gone). Blocking file work with a bounded wait.
    pub fn release(&self, id: &VmId) {
        if let Some(c) = self.get()
            && let Err(e) = c.remove(id.as_str())
        {
            tracing::warn!(vm_id = %id, error = %e, "removing the vmm's cgroup failed; the sweep retries");
        }
    }

    /// Removes the cgroups of VMs not in `live` made longer than `grace` ago (a younger one may
    /// be a VMM's that is being started right now); returns how many.
    pub fn sweep(&self, live: &[VmId], grace: Duration) -> usize {
        let Some(c) = self.get() else { return 0 };
        c.vms_with_cgroups()
            .into_iter()
            .filter(|id| !live.iter().any(|l| l.as_str() == id))
            .filter(|id| {
                c.dirs(id).iter().all(|d| {
                    std::fs::metadata(d)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age >= grace)
                })
            })
            .filter(|id| c.remove(id).is_ok())
            .count()
    }
}

/// Removes the VMs' cgroups of the metald whose config is `cfg`, in every mounted hierarchy,
/// and then their parent, once their processes are gone (waiting up to `within` for processes
/// just killed to leave). For the tests and benchmarks that run metalds and kill them, and for
/// an operator removing metald from a host. Returns how many directories it removed.
pub fn remove_all(cfg: &crate::config::Config, within: Duration) -> usize {
    let parent = cfg.cgroup_parent();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let deadline = std::time::Instant::now() + within;
    let mut removed = 0;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(mount), Some(&("cgroup" | "cgroup2"))) = (f.get(1), f.get(2)) else {
            continue;
        };
        let dir = Path::new(mount).join(&parent);
        let Ok(children) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in children.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            loop {
                if std::fs::remove_dir(e.path()).is_ok() {
                    removed += 1;
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    break;
                }
                // A killed process leaves its cgroup as it exits; bounded by `within`.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if std::fs::remove_dir(&dir).is_ok() {
            removed += 1;
        }
    }
    removed
}
