//! The Firecracker driver: one `firecracker --api-sock <sock> --id <vm>` process per VM,
//! configured and driven through its REST API on that unix socket.
//!
//! Firecracker writes the guest's serial console to its stdout, so stdout goes to the VM's
//! console log; its own log goes to `vmm.log` through `PUT /logger`. It has no "quit" command:
//! stopping it without the guest's help is a SIGKILL. It exits when its guest reboots, which is
//! why RebootVm is a supervised restart for every driver.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};
use uds_http::{Method, StatusCode};

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::jail::{self, CgroupHost};
use super::{
    DriverError, ExitCause, GuestRun, SpawnRequest, Vmm, VmmControl, VmmDriver, VmmEndpoint,
    uds_http,
};
use crate::config::FirecrackerConfig;
use crate::model::{VmId, VmSpec};
use crate::process::{ExitInfo, Pidfd, spawn_detached};

/// The API socket inside a VM's run directory.
pub const API_SOCKET: &str = "firecracker.sock";
/// Guest serial output (Firecracker's stdout and stderr).
pub use super::CONSOLE_LOG;
/// Firecracker's own log.
pub use super::VMM_LOG;
/// Firecracker's metrics file.
pub const METRICS_FILE: &str = "metrics.json";
/// The vsock device's host-side socket.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// The vsock port the guest agent listens on (`qemu-ga -m vsock-listen -p 4294967295:1024`).
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// The guest CID given to a vsock device added only for the agent. Firecracker's vsock is
/// per VM (its host side is a unix socket), so the CID need not be unique on the host.
const AGENT_DEFAULT_CID: u32 = 3;
/// The jailer's own output, in the run directory.
pub const JAILER_LOG: &str = "jailer.log";

/// How often a start-up wait with no event to wait on (a pid file, an exec) looks again.
const POLL: Duration = Duration::from_millis(5);
/// How long the processes of a jail's cgroup get to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(3);

/// Where the jailer puts one VM.
#[derive(Debug, Clone)]
struct Jail {
    /// `<chroot base>/<exec name>/<vm id>`.
    dir: PathBuf,
    /// Its `root`, the VMM's `/`.
    root: PathBuf,
    /// The VM's cgroup directories.
    cgroups: Vec<PathBuf>,
    /// The file name of the resolved firecracker binary.
    exec_name: String,
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn chown(p: &Path, uid: u32, gid: u32) -> Result<(), DriverError> {
    std::os::unix::fs::chown(p, Some(uid), Some(gid))
        .map_err(|e| DriverError::Io(format!("chown {}", p.display()), e))
}

/// One API request the driver sends.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    /// HTTP method.
    pub method: Method,
    /// Path, such as `/drives/root`.
    pub path: String,
    /// JSON body.
    pub body: Value,
}

/// The files of a VM as Firecracker names them: host paths, or paths inside its jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FcPaths {
    /// Firecracker's log.
    pub log: String,
    /// Its metrics file.
    pub metrics: String,
    /// The guest serial output, when Firecracker's stdout does not carry it (jailed, daemonized).
    pub serial: Option<String>,
    /// The kernel.
    pub kernel: String,
    /// The initrd.
    pub initrd: Option<String>,
    /// The drives, in the spec's order.
    pub drives: Vec<String>,
    /// The vsock device's host-side socket.
    pub vsock: String,
    /// Track dirty pages (for diff snapshots).
    pub track_dirty_pages: bool,
}

impl FcPaths {
    /// Host paths, for an unjailed Firecracker whose run directory is `run_dir`.
    pub fn host(spec: &VmSpec, run_dir: &Path) -> Self {
        Self::host_named(spec, run_dir, false)
    }

    /// Host paths of an unjailed Firecracker, a migration `target`'s under its `next-` names.
    pub fn host_named(spec: &VmSpec, run_dir: &Path, target: bool) -> Self {
        let s = |p: &Path| p.display().to_string();
        let named = |n: &str| run_dir.join(super::target_name(n, target));
        FcPaths {
            log: s(&named(VMM_LOG)),
            metrics: s(&named(METRICS_FILE)),
            serial: None,
            kernel: s(&spec.kernel),
            initrd: spec.initrd.as_deref().map(s),
            drives: spec.drives.iter().map(|d| s(&d.path)).collect(),
            vsock: s(&super::socket_arg(
                run_dir,
                &super::target_name(VSOCK_SOCKET, target),
            )),
            track_dirty_pages: false,
        }
    }

    /// Paths inside the jail, where the driver links each file.
    pub fn jailed(spec: &VmSpec) -> Self {
        FcPaths {
            log: format!("/{VMM_LOG}"),
            metrics: format!("/{METRICS_FILE}"),
            serial: Some(format!("/{CONSOLE_LOG}")),
            kernel: "/vmlinux".into(),
            initrd: spec.initrd.as_ref().map(|_| "/initrd".to_string()),
            drives: spec
                .drives
                .iter()
                .map(|d| format!("/drive-{}", d.id))
                .collect(),
            vsock: format!("/{VSOCK_SOCKET}"),
            track_dirty_pages: false,
        }
    }
}

/// Drives Firecracker microVMs.
#[derive(Debug)]
pub struct FirecrackerDriver {
    /// Shared with every VMM's handle (paths, timeouts, the jailer's user).
    cfg: std::sync::Arc<FirecrackerConfig>,
    /// The host's cgroup hierarchies, as the jailer will find them (jailer on only).
    cgroups: Result<CgroupHost, String>,
    /// The cgroup of each VMM started without the jailer; with it, the limits the jailer is
    /// asked to set in the cgroups it makes.
    vmm_cgroups: super::cgroup::CgroupPolicy,
    version: std::sync::OnceLock<String>,
    /// A tmpfs directory for a migration's snapshot files.
    handover_dir: PathBuf,
}

impl FirecrackerDriver {
    /// A driver with these settings.
    pub fn new(cfg: FirecrackerConfig) -> Self {
        let cgroups = if cfg.jailer.enabled {
            CgroupHost::detect(cfg.jailer.cgroup_version)
        } else {
            Err("the jailer is off".into())
        };
        FirecrackerDriver {
            cfg: std::sync::Arc::new(cfg),
            cgroups,
            vmm_cgroups: super::cgroup::CgroupPolicy::off(),
            version: Default::default(),
            handover_dir: PathBuf::from("/dev/shm/metald"),
        }
    }

    /// The same driver, putting a migration's snapshot files in `dir` (a tmpfs).
    #[must_use]
    pub fn with_handover_dir(mut self, dir: PathBuf) -> Self {
        self.handover_dir = dir;
        self
    }

    /// The same driver, placing each VMM it starts without the jailer in a cgroup of its own.
    #[must_use]
    pub fn with_cgroups(mut self, cgroups: super::cgroup::CgroupPolicy) -> Self {
        self.vmm_cgroups = cgroups;
        self
    }

    /// The requests that configure a VM, in the order they are sent, with files named as
    /// Firecracker sees them (`paths`). Public so that a test can check every body against
    /// Firecracker's API spec.
    pub fn config_requests(spec: &VmSpec, paths: &FcPaths) -> Vec<ApiRequest> {
        let put = |path: String, body: Value| ApiRequest {
            method: Method::PUT,
            path,
            body,
        };
        let mut out = vec![
            put(
                "/logger".into(),
                json!({
                    "log_path": paths.log,
                    "level": "Info",
                    "show_level": true,
                    "show_log_origin": false,
                }),
            ),
            put("/metrics".into(), json!({ "metrics_path": paths.metrics })),
            put(
                "/machine-config".into(),
                json!({
                    "vcpu_count": spec.vcpus,
                    "mem_size_mib": spec.memory_bytes / (1024 * 1024),
                    "track_dirty_pages": paths.track_dirty_pages,
                }),
            ),
        ];
        if let Some(serial) = &paths.serial {
            out.push(put("/serial".into(), json!({ "serial_out_path": serial })));
        }
        let mut boot = json!({
            "kernel_image_path": paths.kernel,
            "boot_args": kernel_args(spec),
        });
        if let (Some(initrd), Some(o)) = (&paths.initrd, boot.as_object_mut()) {
            o.insert("initrd_path".into(), json!(initrd));
        }
        out.push(put("/boot-source".into(), boot));
        for (d, path) in spec.drives.iter().zip(&paths.drives) {
            out.push(put(
                format!("/drives/{}", d.id),
                json!({
                    "drive_id": d.id,
                    "path_on_host": path,
                    "is_root_device": d.is_root,
                    "is_read_only": d.read_only,
                }),
            ));
        }
        // The guest agent speaks over vsock on Firecracker, so a VM probed through its agent gets
        // a vsock device even when it did not ask for one.
        let agent = spec.guest_health.probe == crate::config::GuestProbe::Agent;
        if let Some(cid) = spec.vsock_cid.or(agent.then_some(AGENT_DEFAULT_CID)) {
            out.push(put(
                "/vsock".into(),
                json!({ "guest_cid": cid, "uds_path": paths.vsock }),
            ));
        }
        for n in &spec.nics {
            out.push(put(
                format!("/network-interfaces/{}", n.id),
                json!({
                    "iface_id": n.id,
                    "host_dev_name": n.tap,
                    "guest_mac": n.mac,
                }),
            ));
        }
        out
    }

    /// The bodies of every other request the driver sends, for the contract test.
    pub fn action_requests(run_dir: &Path) -> Vec<ApiRequest> {
        let r = |method: Method, path: &str, body: Value| ApiRequest {
            method,
            path: path.into(),
            body,
        };
        vec![
            r(
                Method::PUT,
                "/actions",
                json!({"action_type": "InstanceStart"}),
            ),
            r(
                Method::PUT,
                "/actions",
                json!({"action_type": "SendCtrlAltDel"}),
            ),
            r(Method::PATCH, "/vm", json!({"state": "Paused"})),
            r(Method::PATCH, "/vm", json!({"state": "Resumed"})),
            r(
                Method::PUT,
                "/snapshot/create",
                snapshot_body(&run_dir.join(SNAPSHOT_WORK).display().to_string(), false),
            ),
            r(
                Method::PUT,
                "/snapshot/create",
                snapshot_body(&run_dir.join(SNAPSHOT_WORK).display().to_string(), true),
            ),
            r(
                Method::PUT,
                "/snapshot/load",
                load_body(
                    &run_dir.join(SNAPSHOT_WORK).display().to_string(),
                    true,
                    Some(&run_dir.join(VSOCK_SOCKET).display().to_string()),
                ),
            ),
        ]
    }

    /// The file name of the resolved firecracker binary, which the jailer names jails after.
    fn exec_name(&self) -> String {
        let b = std::fs::canonicalize(&self.cfg.binary).unwrap_or_else(|_| self.cfg.binary.clone());
        b.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "firecracker".into())
    }

    /// `<canonical chroot_base>/<exec name>`, the directory holding every VM's jail.
    fn jails_dir(&self) -> PathBuf {
        let base = &self.cfg.jailer.chroot_base;
        std::fs::canonicalize(base)
            .unwrap_or_else(|_| base.clone())
            .join(self.exec_name())
    }

    /// The `--cgroup` settings: the configured ones, or one that limits nothing so that the
    /// jailer still gives the VM a cgroup of its own.
    fn cgroup_settings(&self) -> Vec<String> {
        self.cgroup_settings_for(None)
    }

    /// The `--cgroup` settings for a VM with `spec`: the configured ones, and the VMM's memory
    /// and pids limits when `[cgroups]` is on (a configured setting of the same file wins). With
    /// neither, one that limits nothing, so that the jailer still gives the VM a cgroup.
    fn cgroup_settings_for(&self, spec: Option<&VmSpec>) -> Vec<String> {
        let version = self.cgroups.as_ref().map_or(2, |h| h.version);
        let mut out = self.cfg.jailer.cgroups.clone();
        for s in self
            .vmm_cgroups
            .jailer_settings(spec, version)
            .unwrap_or_default()
        {
            let file = s.split('=').next().unwrap_or("");
            if !out.iter().any(|o| o.split('=').next() == Some(file)) {
                out.push(s);
            }
        }
        if out.is_empty() {
            out.push(jail::DEFAULT_CGROUP_SETTING.to_string());
        }
        out
    }

    /// Where the jailer puts VM `vm_id`'s jail and cgroups.
    fn jail(&self, vm_id: &str) -> Jail {
        let exec_name = self.exec_name();
        let dir = self.jails_dir().join(vm_id);
        let cgroups = match &self.cgroups {
            Ok(h) => h.vm_dirs(
                &self.cfg.jailer.parent_cgroup,
                vm_id,
                &self.cgroup_settings(),
            ),
            Err(_) => Vec::new(),
        };
        Jail {
            root: dir.join("root"),
            dir,
            cgroups,
            exec_name,
        }
    }

    /// Kills every process in a jail's cgroups, then removes the jail and the cgroups; the jail
    /// is never removed while a process may still run in it.
    async fn clear_jail(&self, jail: &Jail) -> Result<(), DriverError> {
        let j = jail.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<usize, String> {
            let killed = jail::kill_cgroups(&j.cgroups, KILL_WAIT)?;
            match std::fs::remove_dir_all(&j.dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("removing jail {}: {e}", j.dir.display())),
            }
            Ok(killed)
        })
        .await
        .map_err(|e| DriverError::Protocol(format!("jail clean-up task: {e}")))?;
        match res {
            Ok(0) => Ok(()),
            Ok(killed) => {
                tracing::warn!(path = %jail.dir.display(), killed, "processes left in a jail's cgroup killed");
                Ok(())
            }
            Err(e) => Err(DriverError::Protocol(e)),
        }
    }

    /// Starts Firecracker through the jailer. Whatever fails, nothing it started outlives the
    /// failure: every process in the VM's cgroup is killed, then the jail and cgroup removed.
    async fn spawn_jailed(&self, req: &SpawnRequest<'_>) -> Result<Vmm, DriverError> {
        if let Err(e) = &self.cgroups {
            return Err(DriverError::Spawn(format!(
                "the jailer cannot run here: {e}"
            )));
        }
        let jail = self.jail(req.vm_id.as_str());
        // What an earlier VMM of this VM left (the jailer refuses an existing jail's devices).
        self.clear_jail(&jail).await?;
        match self.start_in_jail(req, &jail).await {
            Ok(p) => Ok(p),
            Err(e) => {
                if let Err(c) = self.clear_jail(&jail).await {
                    tracing::warn!(vm_id = %req.vm_id, error = %c, "clean-up after a failed jailed start");
                }
                Err(e)
            }
        }
    }

    /// The jailer's sequence as it really runs with `--daemonize`: the jailer exits right after
    /// its first fork; its grandchild writes `<exec name>.pid` in the jail and only then execs
    /// firecracker. Each step is waited for, bounded by `spawn_timeout` in all.
    async fn start_in_jail(&self, req: &SpawnRequest<'_>, jail: &Jail) -> Result<Vmm, DriverError> {
        let j = &self.cfg.jailer;
        let deadline = Instant::now() + self.cfg.spawn_timeout;
        let timeout = |what: &str| DriverError::Timeout {
            what: what.into(),
            millis: self.cfg.spawn_timeout.as_millis(),
        };
        let mut cmd = Command::new(&j.binary);
        cmd.arg("--id")
            .arg(req.vm_id.as_str())
            .arg("--exec-file")
            .arg(&self.cfg.binary)
            .arg("--uid")
            .arg(j.uid.to_string())
            .arg("--gid")
            .arg(j.gid.to_string())
            .arg("--chroot-base-dir")
            .arg(&j.chroot_base)
            .arg("--parent-cgroup")
            .arg(&j.parent_cgroup)
            .arg("--cgroup-version")
            .arg(
                self.cgroups
                    .as_ref()
                    .map(|h| h.version)
                    .unwrap_or(2)
                    .to_string(),
            );
        for c in self.cgroup_settings_for(Some(req.spec)) {
            cmd.arg("--cgroup").arg(c);
        }
        cmd.args(["--daemonize", "--", "--api-sock"])
            .arg(format!("/{API_SOCKET}"))
            .current_dir(req.run_dir);
        let log = req.run_dir.join(JAILER_LOG);
        let jailer = spawn_detached(cmd, &log)
            .map_err(|e| DriverError::Spawn(format!("{}: {e}", j.binary.display())))?;
        if tokio::time::timeout_at(deadline.into(), jailer.pidfd.exited())
            .await
            .is_err()
        {
            let _ = jailer.pidfd.signal(libc::SIGKILL);
            return Err(timeout("the jailer"));
        }
        let status = jailer.pidfd.reap();
        if status != ExitInfo::Exited(0) {
            return Err(DriverError::EarlyExit(format!(
                "jailer {status}: {}",
                super::log_tail(&log, 600)
            )));
        }
        // The daemon writes the pid file some time after the jailer exited. Until then one of
        // its processes is in the VM's cgroup; if none is, it died (its errors went to
        // /dev/null, as a daemon's do).
        let pid_file = jail.root.join(format!("{}.pid", jail.exec_name));
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                break pid;
            }
            if !jail.cgroups.is_empty()
                && jail.cgroups.iter().all(|d| jail::cgroup_pids(d).is_empty())
                && !pid_file.exists()
            {
                return Err(DriverError::EarlyExit(format!(
                    "the jailed firecracker exited before writing {}: {}",
                    pid_file.display(),
                    super::log_tail(&log, 600)
                )));
            }
            if Instant::now() >= deadline {
                return Err(timeout("the jailer's pid file"));
            }
            // No event announces the pid file; this poll is bounded by the deadline.
            tokio::time::sleep(POLL).await;
        };
        // Open the pidfd first, then check the process: a pid reused in between cannot pass the
        // checks below once the fd is open.
        let pidfd = crate::process::Pidfd::open(pid)
            .map_err(|e| DriverError::EarlyExit(format!("jailed firecracker {pid}: {e}")))?;
        let exec = format!("/{}", jail.exec_name);
        let info = loop {
            let info = crate::process::ProcInfo::read(pid)
                .filter(crate::process::ProcInfo::is_alive)
                .ok_or_else(|| {
                    DriverError::EarlyExit(format!("jailed firecracker {pid} exited at start-up"))
                })?;
            // Until it execs, the process is still the jailer (whose command line also has
            // `--id`); after, it is `/<exec name> --id <vm> ...` running in the jail.
            if info.cmdline.first() == Some(&exec) && self.owns_cmdline(req.vm_id, &info.cmdline) {
                break info;
            }
            if Instant::now() >= deadline {
                return Err(timeout("the jailer's exec of firecracker"));
            }
            tokio::select! {
                _ = pidfd.exited() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        };
        if !jail::runs_in(pid, &jail.root) {
            return Err(DriverError::Protocol(format!(
                "pid {pid} from {} does not run in the jail {}",
                pid_file.display(),
                jail.root.display()
            )));
        }
        // Links and copies of the VM's files: file work (a copy can be a whole disk image),
        // done off the runtime.
        let console = {
            let (j, jail, spec, run_dir) = (
                self.cfg.jailer.clone(),
                jail.clone(),
                req.spec.clone(),
                req.run_dir.to_path_buf(),
            );
            tokio::task::spawn_blocking(move || furnish_jail(&j, &jail, &spec, &run_dir))
                .await
                .map_err(|e| DriverError::Spawn(format!("furnishing the jail: {e}")))??
        };
        let endpoint = VmmEndpoint {
            pid,
            start_time: info.start_time,
            control_socket: jail.root.join(API_SOCKET),
            console_log: console,
        };
        let vmm = self.adopt(endpoint, pidfd, req.run_dir);
        super::wait_ready(vmm, &req.run_dir.join(VMM_LOG), self.cfg.spawn_timeout).await
    }
}

/// Puts the VM's files into the jail under the names [`FcPaths::jailed`] gives them, without
/// changing the originals: a file the jail's user may read is hard-linked (the link is the
/// same inode, so it is never chowned); one it may not read is copied and the copy given to
/// it. A writable drive must be the same file, so it is linked, and the jail's user must be
/// allowed to write it already (checked at CreateVm). The files Firecracker writes (its log,
/// metrics and the console) are created in the run directory, owned by the jail's user, and
/// linked into the jail, so they outlive it. Returns the console log's path.
fn furnish_jail(
    j: &crate::config::JailerConfig,
    jail: &Jail,
    spec: &VmSpec,
    run_dir: &Path,
) -> Result<PathBuf, DriverError> {
    let io = |what: String| move |e| DriverError::Io(what, e);
    let paths = FcPaths::jailed(spec);
    let in_jail = |name: &str| jail.root.join(name.trim_start_matches('/'));
    let mut inputs: Vec<(&Path, &str, bool)> = vec![(&spec.kernel, &paths.kernel, false)];
    if let (Some(src), Some(name)) = (&spec.initrd, &paths.initrd) {
        inputs.push((src, name, false));
    }
    for (d, name) in spec.drives.iter().zip(&paths.drives) {
        inputs.push((&d.path, name, !d.read_only));
    }
    for (src, name, writable) in inputs {
        let dst = in_jail(name);
        let _ = std::fs::remove_file(&dst);
        let meta = std::fs::metadata(src).map_err(io(format!("{}", src.display())))?;
        if jail::may_access(&meta, j.uid, j.gid, writable) && std::fs::hard_link(src, &dst).is_ok()
        {
            continue;
        }
        if writable {
            return Err(DriverError::Spawn(format!(
                "writable drive {} cannot be placed in the jail: it must be on the same file \
                 system as {} and writable by {}:{}",
                src.display(),
                j.chroot_base.display(),
                j.uid,
                j.gid
            )));
        }
        std::fs::copy(src, &dst).map_err(io(format!("copying {} into the jail", src.display())))?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o400))
            .map_err(io(format!("chmod {}", dst.display())))?;
        chown(&dst, j.uid, j.gid)?;
    }
    for name in [VMM_LOG, METRICS_FILE, CONSOLE_LOG] {
        let kept = run_dir.join(name);
        super::rotate_log(&kept);
        std::fs::File::create(&kept).map_err(io(format!("creating {}", kept.display())))?;
        chown(&kept, j.uid, j.gid)?;
        let dst = jail.root.join(name);
        let _ = std::fs::remove_file(&dst);
        if std::fs::hard_link(&kept, &dst).is_err() {
            // Another file system: the file lives in the jail, and is copied out when the
            // jail is released.
            std::fs::File::create(&dst).map_err(io(format!("creating {}", dst.display())))?;
            chown(&dst, j.uid, j.gid)?;
        }
    }
    let kept = run_dir.join(CONSOLE_LOG);
    Ok(if same_file(&kept, &jail.root.join(CONSOLE_LOG)) {
        kept
    } else {
        jail.root.join(CONSOLE_LOG)
    })
}

/// A refused request's error: Firecracker explains a refusal in `fault_message`.
fn refusal(method: &Method, path: &str, status: StatusCode, body: &Value) -> DriverError {
    let fault = body
        .get("fault_message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP {status}"));
    DriverError::Refused {
        what: format!("{method} {path}"),
        reason: fault,
    }
}

/// Files inside a snapshot directory.
/// The files an unjailed Firecracker has in its run directory under its own name (a migration
/// target has them with [`super::TARGET_PREFIX`] until it is promoted).
const OWN_FILES: [&str; 4] = [API_SOCKET, VMM_LOG, METRICS_FILE, VSOCK_SOCKET];

const SNAPSHOT_STATE: &str = "vmstate";
const SNAPSHOT_MEM: &str = "memory";

/// Where Firecracker writes a snapshot before metald moves it into its snapshot store: a
/// directory beside the API socket, so that a jailed VMM names it inside its jail.
const SNAPSHOT_WORK: &str = "snapshot";

fn snapshot_body(dir: &str, diff: bool) -> Value {
    json!({
        "snapshot_type": if diff { "Diff" } else { "Full" },
        "snapshot_path": format!("{dir}/{SNAPSHOT_STATE}"),
        "mem_file_path": format!("{dir}/{SNAPSHOT_MEM}"),
    })
}

fn load_body(dir: &str, track_dirty_pages: bool, vsock: Option<&str>) -> Value {
    let mut body = json!({
        "snapshot_path": format!("{dir}/{SNAPSHOT_STATE}"),
        "mem_backend": {
            "backend_type": "File",
            "backend_path": format!("{dir}/{SNAPSHOT_MEM}"),
        },
        "track_dirty_pages": track_dirty_pages,
        "resume_vm": false,
    });
    if let (Some(uds), Some(o)) = (vsock, body.as_object_mut()) {
        // The snapshot names its source VM's vsock socket; this VM has its own.
        o.insert("vsock_override".into(), json!({ "uds_path": uds }));
    }
    body
}

/// Moves `from` to `to`, copying when they are on different file systems.
fn move_file(from: &Path, to: &Path) -> Result<(), DriverError> {
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map_err(|e| {
        DriverError::Io(format!("copying {} to {}", from.display(), to.display()), e)
    })?;
    let _ = std::fs::remove_file(from);
    Ok(())
}

/// Writes the data regions of the sparse diff memory file `diff` over `out` (a copy of the base
/// memory), as Firecracker's `rebase-snap` does: a diff snapshot's memory file holds the dirtied
/// pages at their offsets and holes everywhere else.
fn merge_diff(diff: &Path, out: &Path) -> Result<(), DriverError> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let io = |what: &str| {
        let what = what.to_string();
        move |e| DriverError::Io(what, e)
    };
    let mut src = std::fs::File::open(diff).map_err(io("opening the diff memory"))?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .open(out)
        .map_err(io("opening the merged memory"))?;
    let len = src.metadata().map_err(io("diff memory"))?.len();
    let mut pos: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    let seek_err =
        |what: &'static str| move |e: rustix::io::Errno| DriverError::Io(what.into(), e.into());
    while pos < len {
        let data = match rustix::fs::seek(&src, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            // No data after pos.
            Err(e) if e == rustix::io::Errno::NXIO => break,
            Err(e) => return Err(seek_err("finding the diff's dirty pages (SEEK_DATA)")(e)),
        };
        let hole = rustix::fs::seek(&src, rustix::fs::SeekFrom::Hole(data))
            .map_err(seek_err("finding the diff's dirty pages (SEEK_HOLE)"))?;
        let start = data;
        let mut left = hole.saturating_sub(data);
        src.seek(SeekFrom::Start(start))
            .map_err(io("diff memory"))?;
        dst.seek(SeekFrom::Start(start))
            .map_err(io("merged memory"))?;
        while left > 0 {
            let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
            let chunk = buf.get_mut(..n).unwrap_or_default();
            src.read_exact(chunk)
                .map_err(io("reading the diff memory"))?;
            dst.write_all(chunk)
                .map_err(io("writing the merged memory"))?;
            left = left.saturating_sub(u64::try_from(n).unwrap_or(left));
        }
        pos = hole;
    }
    dst.sync_all().map_err(io("syncing the merged memory"))
}

/// The guest command line: the caller's, plus a serial console if none is named.
fn kernel_args(spec: &VmSpec) -> String {
    let mut args = spec.kernel_args.trim().to_string();
    if !args
        .split_ascii_whitespace()
        .any(|w| w.starts_with("console="))
    {
        if !args.is_empty() {
            args.push(' ');
        }
        args.push_str("console=ttyS0");
    }
    args
}

/// One Firecracker's control API: its REST API on its socket, over a connection kept between
/// requests.
#[derive(Debug)]
struct FcVmm {
    cfg: std::sync::Arc<FirecrackerConfig>,
    api: uds_http::Kept,
}

impl FcVmm {
    /// The VM's files as this VMM names them: inside its jail, or in its run directory (where
    /// its socket is).
    fn paths(&self, spec: &VmSpec) -> FcPaths {
        if self.cfg.jailer.enabled {
            FcPaths::jailed(spec)
        } else {
            FcPaths::host_named(spec, self.dir(), self.is_target())
        }
    }

    /// Whether this is a migration target not promoted yet (its socket has the target name).
    fn is_target(&self) -> bool {
        self.api
            .sock()
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(super::TARGET_PREFIX))
    }

    /// The directory of its socket: the run directory, or the jail's root.
    fn dir(&self) -> &Path {
        self.api.sock().parent().unwrap_or(Path::new("/"))
    }

    /// A fresh directory beside the VMM's socket for snapshot files, as (host path, the path
    /// the VMM knows it by), writable by the VMM's user.
    fn snapshot_work(&self) -> Result<(PathBuf, String), DriverError> {
        let dir = self.dir().join(SNAPSHOT_WORK);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| DriverError::Io(format!("creating {}", dir.display()), e))?;
        if self.cfg.jailer.enabled {
            let j = &self.cfg.jailer;
            chown(&dir, j.uid, j.gid)?;
            Ok((dir, format!("/{SNAPSHOT_WORK}")))
        } else {
            let s = dir.display().to_string();
            Ok((dir, s))
        }
    }

    async fn call(&self, req: &ApiRequest) -> Result<Value, DriverError> {
        let body = (!req.body.is_null()).then_some(&req.body);
        let (status, value) = self
            .api
            .call(req.method.clone(), &req.path, body, self.cfg.api_timeout)
            .await?;
        if status.is_success() {
            return Ok(value);
        }
        Err(refusal(&req.method, &req.path, status, &value))
    }

    async fn send(&self, method: Method, path: &str, body: Value) -> Result<Value, DriverError> {
        self.call(&ApiRequest {
            method,
            path: path.into(),
            body,
        })
        .await
    }
}

#[async_trait]
impl VmmControl for FcVmm {
    async fn configure(&self, spec: &VmSpec) -> Result<(), DriverError> {
        let mut paths = self.paths(spec);
        paths.track_dirty_pages = self.cfg.diff_snapshots;
        for req in FirecrackerDriver::config_requests(spec, &paths) {
            self.call(&req).await?;
        }
        Ok(())
    }

    async fn boot(&self) -> Result<(), DriverError> {
        // A VMM that loaded a snapshot is already started, paused: booting it is resuming it.
        if self.ping().await? == GuestRun::Paused {
            return self.resume().await;
        }
        self.send(
            Method::PUT,
            "/actions",
            json!({"action_type": "InstanceStart"}),
        )
        .await
        .map(|_| ())
    }

    async fn pause(&self) -> Result<(), DriverError> {
        self.send(Method::PATCH, "/vm", json!({"state": "Paused"}))
            .await
            .map(|_| ())
    }

    async fn resume(&self) -> Result<(), DriverError> {
        self.send(Method::PATCH, "/vm", json!({"state": "Resumed"}))
            .await
            .map(|_| ())
    }

    async fn shutdown(&self) -> Result<(), DriverError> {
        self.send(
            Method::PUT,
            "/actions",
            json!({"action_type": "SendCtrlAltDel"}),
        )
        .await
        .map(|_| ())
    }

    async fn quit(&self) -> Result<(), DriverError> {
        // Firecracker has no quit command; the caller goes on to SIGKILL.
        Err(DriverError::Unsupported("quit", "firecracker"))
    }

    async fn ping(&self) -> Result<GuestRun, DriverError> {
        /// The one field of `GET /` a health check reads (borrowed, not copied out: this
        /// runs once a second for every VM).
        #[derive(serde::Deserialize)]
        struct Instance<'a> {
            #[serde(borrow, default)]
            state: std::borrow::Cow<'a, str>,
        }
        let (status, bytes) = self
            .api
            .call_raw(Method::GET, "/", None, self.cfg.api_timeout)
            .await?;
        if !status.is_success() {
            let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(refusal(&Method::GET, "/", status, &v));
        }
        let info: Instance<'_> = serde_json::from_slice(&bytes)
            .map_err(|e| DriverError::Protocol(format!("GET / answer is not JSON: {e}")))?;
        Ok(match info.state.as_ref() {
            "Running" => GuestRun::Running,
            "Paused" => GuestRun::Paused,
            "Not started" => GuestRun::NotStarted,
            other => {
                return Err(DriverError::Protocol(format!(
                    "Firecracker reported an unknown state {other:?}"
                )));
            }
        })
    }

    async fn agent_connect(&self) -> Result<super::AgentStream, DriverError> {
        // Firecracker's hybrid vsock: connect to the device's unix socket, ask for the guest
        // port with `CONNECT <port>\n`, and read `OK <host port>\n`; the stream is then the
        // guest connection.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let path = self.dir().join(VSOCK_SOCKET);
        let mut s = super::connect_unix(&path)
            .await
            .map_err(|e| DriverError::connect(&path, &e))?;
        s.write_all(format!("CONNECT {AGENT_VSOCK_PORT}\n").as_bytes())
            .await
            .map_err(|e| DriverError::Io("vsock CONNECT".into(), e))?;
        // Read the answer a byte at a time: anything after its newline is the agent's.
        let mut line = Vec::with_capacity(16);
        let mut b = [0u8; 1];
        while line.len() < 64 {
            let n = s
                .read(&mut b)
                .await
                .map_err(|e| DriverError::Io("vsock CONNECT reply".into(), e))?;
            if n == 0 {
                // Firecracker closes the connection when nothing listens on the guest port.
                return Err(DriverError::Socket {
                    path,
                    reason: format!("nothing listens on guest vsock port {AGENT_VSOCK_PORT}"),
                    unreachable: true,
                });
            }
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
        }
        let line = String::from_utf8_lossy(&line);
        if !line.starts_with("OK ") {
            return Err(DriverError::Protocol(format!(
                "vsock CONNECT answered {line:?}"
            )));
        }
        Ok(s)
    }

    async fn snapshot(&self, dest: &Path, base: Option<&Path>) -> Result<(), DriverError> {
        if !self.cfg.jailer.enabled && base.is_none() {
            // Unjailed, a full snapshot is written where it goes (a migration's tmpfs, say),
            // not copied there.
            let dir = dest.display().to_string();
            return self
                .send(Method::PUT, "/snapshot/create", snapshot_body(&dir, false))
                .await
                .map(|_| ());
        }
        // Firecracker writes into a directory beside its socket (inside the jail when jailed),
        // then the files move to the snapshot store.
        let (host_dir, vmm_dir) = self.snapshot_work()?;
        let res = self
            .send(
                Method::PUT,
                "/snapshot/create",
                snapshot_body(&vmm_dir, base.is_some()),
            )
            .await;
        let dest = dest.to_path_buf();
        let base = base.map(Path::to_path_buf);
        let work = host_dir.clone();
        let placed = match res {
            Ok(_) => tokio::task::spawn_blocking(move || -> Result<(), DriverError> {
                move_file(&work.join(SNAPSHOT_STATE), &dest.join(SNAPSHOT_STATE))?;
                match base {
                    None => move_file(&work.join(SNAPSHOT_MEM), &dest.join(SNAPSHOT_MEM)),
                    Some(base) => {
                        // A diff alone restores a guest missing every page it did not dirty:
                        // merge it onto a copy of its base so the stored snapshot is whole.
                        let out = dest.join(SNAPSHOT_MEM);
                        std::fs::copy(base.join(SNAPSHOT_MEM), &out).map_err(|e| {
                            DriverError::Io(format!("copying base {}", base.display()), e)
                        })?;
                        merge_diff(&work.join(SNAPSHOT_MEM), &out)
                    }
                }
            })
            .await
            .map_err(|e| DriverError::Protocol(format!("snapshot task: {e}")))
            .and_then(|r| r),
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_dir_all(&host_dir);
        placed
    }

    async fn restore(&self, spec: &VmSpec, src: &Path) -> Result<(), DriverError> {
        let dir = if self.cfg.jailer.enabled {
            // The snapshot's files go into the jail; its drives were placed at spawn, under
            // the names they had in the jail they were snapshotted in.
            let (host_dir, vmm_dir) = self.snapshot_work()?;
            let j = &self.cfg.jailer;
            for f in [SNAPSHOT_STATE, SNAPSHOT_MEM] {
                let (from, to) = (src.join(f), host_dir.join(f));
                let meta = std::fs::metadata(&from)
                    .map_err(|e| DriverError::Io(format!("{}", from.display()), e))?;
                if !(jail::may_access(&meta, j.uid, j.gid, false)
                    && std::fs::hard_link(&from, &to).is_ok())
                {
                    std::fs::copy(&from, &to).map_err(|e| {
                        DriverError::Io(format!("copying {} into the jail", from.display()), e)
                    })?;
                    chown(&to, j.uid, j.gid)?;
                }
            }
            vmm_dir
        } else {
            src.display().to_string()
        };
        // A restored VMM logs, counts and prints its console like a booted one.
        let paths = self.paths(spec);
        let mut pre = FirecrackerDriver::config_requests(spec, &paths);
        // A jailed, daemonized VMM's console goes to a file (`/serial`), restored or not.
        pre.retain(|r| matches!(r.path.as_str(), "/logger" | "/metrics" | "/serial"));
        for req in &pre {
            self.call(req).await?;
        }
        let agent = spec.guest_health.probe == crate::config::GuestProbe::Agent;
        let vsock = (spec.vsock_cid.is_some() || agent).then_some(paths.vsock.as_str());
        self.send(
            Method::PUT,
            "/snapshot/load",
            load_body(&dir, self.cfg.diff_snapshots, vsock),
        )
        .await
        .map(|_| ())
    }
}

#[async_trait]
impl VmmDriver for FirecrackerDriver {
    fn version(&self) -> String {
        super::binary_version(&self.version, &self.cfg.binary)
    }

    fn kind(&self) -> &'static str {
        "firecracker"
    }

    async fn spawn(&self, req: &SpawnRequest<'_>) -> Result<Vmm, DriverError> {
        let target = req.migration_target;
        if self.cfg.jailer.enabled {
            if target {
                // A second jail of the same VM id would collide with the first.
                return Err(DriverError::Unsupported(
                    "a live migration of a jailed VMM",
                    "firecracker",
                ));
            }
            return self.spawn_jailed(req).await;
        }
        let named = |n: &str| super::target_name(n, target);
        let sock = req.run_dir.join(named(API_SOCKET));
        // Firecracker refuses to start if its socket path exists.
        let _ = std::fs::remove_file(&sock);
        for f in [VMM_LOG, METRICS_FILE] {
            // Firecracker opens these, it does not create them.
            let p = req.run_dir.join(named(f));
            super::rotate_log(&p);
            std::fs::File::create(&p)
                .map_err(|e| DriverError::Io(format!("creating {}", p.display()), e))?;
        }
        let mut cmd = Command::new(req.binary.unwrap_or(&self.cfg.binary));
        cmd.arg("--api-sock")
            .arg(super::socket_arg(req.run_dir, &named(API_SOCKET)))
            .arg("--id")
            .arg(req.vm_id.as_str())
            .current_dir(req.run_dir);
        // The console log is recreated per VMM, like QEMU's, so a guest's output is its own; a
        // migration target carries on the guest's.
        let console = req.run_dir.join(CONSOLE_LOG);
        if !target {
            super::rotate_log(&console);
        }
        // Not jailed: metald makes the VMM's cgroup (the jailer makes a jailed one's); a
        // target joins its source's, which holds both until the source is gone.
        let placement = if target {
            let extra = req
                .spec
                .memory_bytes
                .saturating_add(self.vmm_cgroups.overhead());
            self.vmm_cgroups
                .place_beside(req.vm_id, req.spec, None, extra)?
        } else {
            self.vmm_cgroups.place(req.vm_id, req.spec, None)?
        };
        let sp = super::spawn_vmm(cmd, &console, placement).await?;
        let endpoint = VmmEndpoint {
            pid: sp.pid,
            start_time: sp.start_time,
            control_socket: sock,
            console_log: console.clone(),
        };
        let vmm = self.adopt(endpoint, sp.pidfd, req.run_dir);
        super::wait_ready(vmm, &console, self.cfg.spawn_timeout).await
    }

    fn adopt(&self, endpoint: VmmEndpoint, pidfd: Pidfd, run_dir: &Path) -> Vmm {
        let control = FcVmm {
            cfg: self.cfg.clone(),
            api: uds_http::Kept::new(&endpoint.control_socket),
        };
        Vmm::new(endpoint, pidfd, run_dir, std::sync::Arc::new(control))
    }

    async fn migrate(
        &self,
        from: &Vmm,
        to: &Vmm,
        spec: &VmSpec,
    ) -> Result<super::MigrationStats, DriverError> {
        // Firecracker has no live migration: the guest is paused, snapshotted to a tmpfs, and
        // loaded paused into the target (the caller resumes it there). The source keeps its
        // paused guest until it is stopped, and runs it again if anything fails.
        let started = Instant::now();
        let run_dir = to.run_dir();
        let id = run_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = self.handover_dir.join(format!("{id}.migration"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| DriverError::Io(format!("creating {}", dir.display()), e))?;
        let was_running = matches!(from.ping().await?, GuestRun::Running);
        if was_running {
            from.pause().await?;
        }
        let paused = Instant::now();
        let moved = async {
            from.snapshot(&dir, None).await?;
            // The guest is on tmpfs, paused in the source, not yet in the target.
            crate::crash_point!("migrate.in_transfer");
            to.restore(spec, &dir).await
        }
        .await;
        let bytes = [SNAPSHOT_STATE, SNAPSHOT_MEM]
            .iter()
            .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
            .map(|m| m.len())
            .sum();
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = moved {
            if was_running {
                let _ = from.resume().await;
            }
            return Err(e);
        }
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Ok(super::MigrationStats {
            total_ms: ms(started.elapsed()),
            downtime_ms: ms(paused.elapsed()),
            bytes,
            shared_memory: false,
        })
    }

    fn own_files(&self) -> &'static [&'static str] {
        &OWN_FILES
    }

    fn settle_cgroups(&self, run_dir: &Path, spec: &VmSpec) {
        self.vmm_cgroups.settle(run_dir, spec);
    }

    fn owns_cmdline(&self, vm_id: &VmId, cmdline: &[String]) -> bool {
        super::args_after(cmdline, "--id").any(|id| id == vm_id.as_str())
    }

    fn control_socket(&self, run_dir: &Path) -> PathBuf {
        run_dir.join(API_SOCKET)
    }

    fn endpoint_for(&self, vm_id: &VmId, run_dir: &Path, pid: i32, start_time: u64) -> VmmEndpoint {
        let control_socket = if self.cfg.jailer.enabled {
            self.jail(vm_id.as_str()).root.join(API_SOCKET)
        } else {
            run_dir.join(API_SOCKET)
        };
        VmmEndpoint {
            pid,
            start_time,
            control_socket,
            console_log: run_dir.join(CONSOLE_LOG),
        }
    }

    fn identify(&self, proc_: &crate::process::ProcInfo, run_root: &Path) -> Option<VmId> {
        let cmdline = &proc_.cmdline;
        let id = super::arg_after(cmdline, "--id").and_then(|v| VmId::parse("vm_id", v).ok())?;
        let sock = PathBuf::from(super::arg_after(cmdline, "--api-sock")?);
        let ours = if self.cfg.jailer.enabled {
            // The jailer pivots into a new mount namespace, so `/proc/PID/root` reads `/`; the
            // directory it *is* (device and inode) is this VM's jail, which is under this host's
            // chroot base and named after this VM.
            let jail = self.jail(id.as_str());
            cmdline.first() == Some(&format!("/{}", jail.exec_name))
                && jail::runs_in(proc_.pid, &jail.root)
        } else {
            // A migration target's socket has the target name until it is promoted.
            [API_SOCKET, &super::target_name(API_SOCKET, true)]
                .iter()
                .any(|n| super::socket_arg_is(proc_.pid, &sock, &run_root.join(id.as_str()), n))
        };
        ours.then_some(id)
    }

    async fn release(&self, vm_id: &VmId, run_dir: &Path) {
        if !self.cfg.jailer.enabled {
            let (cgroups, id) = (self.vmm_cgroups.clone(), vm_id.clone());
            // Kills what is left in the cgroup and waits for it, bounded: off the runtime.
            let _ = tokio::task::spawn_blocking(move || cgroups.release(&id)).await;
            return;
        }
        let jail = self.jail(vm_id.as_str());
        // Keep the VMM's log, metrics and console: when they could not be linked to the run
        // directory (another file system), they live only in the jail.
        for name in [VMM_LOG, METRICS_FILE, CONSOLE_LOG] {
            let (inside, kept) = (jail.root.join(name), run_dir.join(name));
            if inside.exists() && !same_file(&inside, &kept) {
                let _ = std::fs::copy(&inside, &kept);
            }
        }
        if let Err(e) = self.clear_jail(&jail).await {
            tracing::warn!(vm_id = %vm_id, error = %e, "releasing the jail failed; the sweep retries");
        }
    }

    fn sweep_leftovers(&self, live: &[VmId], grace: Duration) -> usize {
        if !self.cfg.jailer.enabled {
            // The VMM cgroups are swept host-wide (`Drivers::cgroups`).
            return 0;
        }
        let Ok(host) = &self.cgroups else { return 0 };
        let settings = self.cgroup_settings();
        let parent = &self.cfg.jailer.parent_cgroup;
        let mut ids: Vec<String> = Vec::new();
        let mut dirs = vec![self.jails_dir()];
        dirs.extend(host.parent_dirs(parent, &settings));
        for dir in dirs {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|a| a >= grace);
                let name = e.file_name().to_string_lossy().into_owned();
                if old
                    && e.path().is_dir()
                    && VmId::parse("vm_id", &name).is_ok_and(|id| !live.contains(&id))
                    && !ids.contains(&name)
                {
                    ids.push(name);
                }
            }
        }
        let mut removed = 0;
        for id in ids {
            let jail = self.jail(&id);
            // A process still in the VM's cgroup keeps its jail: it is killed now and the jail
            // goes on a later pass, once the cgroup is empty.
            let pids: Vec<i32> = jail
                .cgroups
                .iter()
                .flat_map(|d| jail::cgroup_pids(d))
                .collect();
            if !pids.is_empty() {
                for pid in &pids {
                    // A pid from the cgroup of a VM that has no VMM: whatever it is, it is in
                    // that VM's jail.
                    let _ = crate::process::kill_pid(*pid, libc::SIGKILL);
                }
                tracing::warn!(vm_id = %id, pids = ?pids, "processes left in a jail's cgroup killed");
                continue;
            }
            let mut gone = false;
            if jail.dir.exists() && std::fs::remove_dir_all(&jail.dir).is_ok() {
                gone = true;
            }
            for cg in &jail.cgroups {
                if cg.exists() && std::fs::remove_dir(cg).is_ok() {
                    gone = true;
                }
            }
            if gone {
                removed += 1;
                tracing::info!(vm_id = %id, path = %jail.dir.display(), cgroups = ?jail.cgroups, "stale jail removed");
            }
        }
        removed
    }

    fn exit_cause(
        &self,
        run_dir: &Path,
        status: ExitInfo,
        _reported: Option<&super::ShutdownReason>,
    ) -> ExitCause {
        let oom = if self.cfg.jailer.enabled {
            run_dir.file_name().is_some_and(|id| {
                super::cgroup::oom_killed_in(&self.jail(&id.to_string_lossy()).cgroups)
            })
        } else {
            self.vmm_cgroups.oom_killed(run_dir)
        };
        if oom {
            return ExitCause::Oom;
        }
        // Firecracker exits 0 both when its guest stops it (a reset, Ctrl-Alt-Del) and when a
        // vCPU dies on an internal error, and a jailed one is not our child, so its status is
        // unknown. Its log says which.
        if let Some(line) = crash_line(&run_dir.join(VMM_LOG)) {
            return ExitCause::Crash(format!("firecracker: {line}"));
        }
        if vcpu_failures(&run_dir.join(METRICS_FILE)) > 0 {
            return ExitCause::Crash("firecracker counted vcpu failures".into());
        }
        match status {
            ExitInfo::Exited(0) => ExitCause::GuestPoweroff,
            ExitInfo::Exited(c) => ExitCause::Crash(format!("exit code {c}")),
            ExitInfo::Signaled(s) => ExitCause::Signal(s),
            ExitInfo::Unknown => match last_line(&run_dir.join(VMM_LOG)) {
                // A jailed VMM that stopped on its own says so last.
                Some(l) if l.contains("Vmm is stopping") || l.contains("exiting successfully") => {
                    ExitCause::GuestPoweroff
                }
                _ => ExitCause::Unknown,
            },
        }
    }

    fn validate_spec(&self, spec: &VmSpec) -> Result<(), DriverError> {
        if let Some(why) = jail::firecracker_kernel_problem(&spec.kernel) {
            return Err(DriverError::InvalidSpec {
                field: "config.boot.kernel_path".into(),
                reason: format!("{} {why}", spec.kernel.display()),
            });
        }
        if self.cfg.jailer.enabled {
            let j = &self.cfg.jailer;
            for (i, d) in spec.drives.iter().enumerate() {
                let Ok(meta) = std::fs::metadata(&d.path) else {
                    continue;
                };
                if !d.read_only && !jail::may_access(&meta, j.uid, j.gid, true) {
                    return Err(DriverError::InvalidSpec {
                        field: format!("config.storage[{i}].path"),
                        reason: format!(
                            "{} is writable in the VM but not by the jailed VMM's user {}:{} \
                             (owner {}:{}, mode {:o}); metald never changes a drive's owner: \
                             give the file to that user or group, or make the drive read-only",
                            d.path.display(),
                            j.uid,
                            j.gid,
                            meta.uid(),
                            meta.gid(),
                            meta.mode() & 0o7777
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    fn check_host(&self) -> Result<(), String> {
        if !self.cfg.jailer.enabled {
            return self.vmm_cgroups.check();
        }
        let j = &self.cfg.jailer;
        if let Err(e) = &self.cgroups {
            return Err(format!("firecracker.jailer: {e}"));
        }
        if let Some(why) = jail::jailed_binary_problem(&self.cfg.binary) {
            return Err(format!("firecracker.binary: {why}"));
        }
        std::fs::create_dir_all(&j.chroot_base).map_err(|e| {
            format!(
                "firecracker.jailer.chroot_base {}: {e}",
                j.chroot_base.display()
            )
        })?;
        Ok(())
    }
}

/// The line of Firecracker's log that says its VM died rather than stopped: a vCPU's fatal KVM
/// exit or run failure, or a panic.
fn crash_line(log: &Path) -> Option<String> {
    const MARKS: [&str; 6] = [
        "KVM_EXIT_INTERNAL_ERROR",
        "KVM_EXIT_FAIL_ENTRY",
        "Failed to run vcpu",
        "MicroVM stopped with an error",
        "panicked at",
        "Firecracker exiting with error",
    ];
    super::read_tail(log, 64 * 1024)
        .lines()
        .find(|l| MARKS.iter().any(|m| l.contains(m)))
        .map(|l| l.trim().chars().take(300).collect())
}

fn last_line(log: &Path) -> Option<String> {
    super::read_tail(log, 4096)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(str::to_string)
}

/// `vcpu.failures` from the last metrics record Firecracker flushed (one JSON object a line).
fn vcpu_failures(metrics: &Path) -> u64 {
    super::read_tail(metrics, 64 * 1024)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .and_then(|v| v.get("vcpu")?.get("failures")?.as_u64())
        .unwrap_or(0)
}
