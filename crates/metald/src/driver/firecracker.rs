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
use hyper::Method;
use serde_json::{Value, json};

use super::{
    DriverError, ExitCause, GuestRun, SpawnRequest, VmmDriver, VmmEndpoint, VmmProcess, uds_http,
};
use crate::config::FirecrackerConfig;
use crate::model::{VmId, VmSpec};
use crate::process::{ExitInfo, spawn_detached};

/// The API socket inside a VM's run directory.
pub const API_SOCKET: &str = "firecracker.sock";
/// Guest serial output (Firecracker's stdout and stderr).
pub const CONSOLE_LOG: &str = "console.log";
/// Firecracker's own log.
pub const VMM_LOG: &str = "vmm.log";
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
        let s = |p: &Path| p.display().to_string();
        FcPaths {
            log: s(&run_dir.join(VMM_LOG)),
            metrics: s(&run_dir.join(METRICS_FILE)),
            serial: None,
            kernel: s(&spec.kernel),
            initrd: spec.initrd.as_deref().map(s),
            drives: spec.drives.iter().map(|d| s(&d.path)).collect(),
            vsock: s(&run_dir.join(VSOCK_SOCKET)),
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
    cfg: FirecrackerConfig,
    /// Kept-alive API connections, one per VMM.
    pool: uds_http::Pool,
}

impl FirecrackerDriver {
    /// A driver with these settings.
    pub fn new(cfg: FirecrackerConfig) -> Self {
        FirecrackerDriver {
            cfg,
            pool: uds_http::Pool::default(),
        }
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
        if let Some(initrd) = &paths.initrd {
            boot["initrd_path"] = json!(initrd);
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
                snapshot_body(&run_dir.join("snapshot"), false),
            ),
            r(
                Method::PUT,
                "/snapshot/create",
                snapshot_body(&run_dir.join("snapshot"), true),
            ),
            r(
                Method::PUT,
                "/snapshot/load",
                load_body(&run_dir.join("snapshot")),
            ),
        ]
    }

    fn exec_name(&self) -> String {
        self.cfg
            .binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "firecracker".into())
    }

    /// `<chroot_base>/<firecracker binary name>/<vm id>`, as the jailer lays it out.
    fn jail_dir(&self, vm_id: &VmId) -> PathBuf {
        self.cfg
            .jailer
            .chroot_base
            .join(self.exec_name())
            .join(vm_id.as_str())
    }

    fn cgroup_dir(&self, vm_id: &VmId) -> PathBuf {
        let j = &self.cfg.jailer;
        j.cgroup_root.join(&j.parent_cgroup).join(vm_id.as_str())
    }

    /// Starts Firecracker through the jailer, which daemonizes: the jailer exits once the VMM
    /// runs, and the VMM's pid comes from the pid file in the jail, checked against /proc.
    async fn spawn_jailed(&self, req: &SpawnRequest<'_>) -> Result<VmmProcess, DriverError> {
        let j = &self.cfg.jailer;
        // A jail left by an earlier VMM of this VM would make the jailer refuse.
        self.release(req.vm_id);
        self.pool
            .forget(&self.jail_dir(req.vm_id).join("root").join(API_SOCKET));
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
            .arg("2");
        for c in &j.cgroups {
            cmd.arg("--cgroup").arg(c);
        }
        cmd.args(["--daemonize", "--", "--api-sock"])
            .arg(format!("/{API_SOCKET}"))
            .current_dir(req.run_dir);
        let log = req.run_dir.join(JAILER_LOG);
        let jailer = spawn_detached(cmd, &log)
            .map_err(|e| DriverError::Spawn(format!("{}: {e}", j.binary.display())))?;
        let done = tokio::time::timeout(self.cfg.spawn_timeout, jailer.pidfd.exited()).await;
        if done.is_err() {
            let _ = jailer.pidfd.signal(libc::SIGKILL);
            return Err(DriverError::Timeout {
                what: "the jailer".into(),
                millis: self.cfg.spawn_timeout.as_millis(),
            });
        }
        let status = jailer.pidfd.reap();
        if status != ExitInfo::Exited(0) {
            let out = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(DriverError::EarlyExit(format!(
                "jailer {status}: {}",
                out.trim()
            )));
        }
        let root = self.jail_dir(req.vm_id).join("root");
        let pid_file = root.join(format!("{}.pid", self.exec_name()));
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .map_err(|e| DriverError::Io(format!("reading {}", pid_file.display()), e))?
            .trim()
            .parse()
            .map_err(|_| DriverError::Protocol(format!("{} holds no pid", pid_file.display())))?;
        // Open the pidfd first, then check the process: a pid that was reused in between
        // cannot pass the start-time and command-line checks after the fd is open.
        let pidfd = crate::process::Pidfd::open(pid)
            .map_err(|e| DriverError::EarlyExit(format!("jailed firecracker {pid}: {e}")))?;
        let info = crate::process::ProcInfo::read(pid)
            .filter(crate::process::ProcInfo::is_alive)
            .ok_or_else(|| DriverError::EarlyExit(format!("jailed firecracker {pid} is gone")))?;
        if !self.owns_cmdline(req.vm_id, &info.cmdline) {
            return Err(DriverError::Protocol(format!(
                "pid {pid} from {} is not this VM's firecracker",
                pid_file.display()
            )));
        }
        Ok(VmmProcess {
            endpoint: VmmEndpoint {
                pid,
                start_time: info.start_time,
                control_socket: root.join(API_SOCKET),
                console_log: root.join(CONSOLE_LOG),
            },
            pidfd,
        })
    }

    /// Links the VM's files into the jail under the names [`FcPaths::jailed`] gives them, and
    /// creates the files Firecracker writes, owned by the jail's user.
    fn furnish_jail(&self, root: &Path, spec: &VmSpec) -> Result<(), DriverError> {
        let j = &self.cfg.jailer;
        let place = |src: &Path, name: &str| -> Result<(), DriverError> {
            let dst = root.join(name.trim_start_matches('/'));
            let _ = std::fs::remove_file(&dst);
            // A hard link costs nothing; across file systems, a copy.
            if std::fs::hard_link(src, &dst).is_err() {
                std::fs::copy(src, &dst).map_err(|e| {
                    DriverError::Io(format!("placing {} in the jail", src.display()), e)
                })?;
            }
            chown(&dst, j.uid, j.gid)
        };
        let paths = FcPaths::jailed(spec);
        place(&spec.kernel, &paths.kernel)?;
        if let (Some(src), Some(name)) = (&spec.initrd, &paths.initrd) {
            place(src, name)?;
        }
        for (d, name) in spec.drives.iter().zip(&paths.drives) {
            place(&d.path, name)?;
        }
        for name in [VMM_LOG, METRICS_FILE, CONSOLE_LOG] {
            let p = root.join(name);
            std::fs::File::create(&p)
                .map_err(|e| DriverError::Io(format!("creating {}", p.display()), e))?;
            chown(&p, j.uid, j.gid)?;
        }
        Ok(())
    }

    /// Waits, bounded, for a new Firecracker's API to answer; gives up early if it exits,
    /// quoting `log`.
    async fn wait_api(&self, proc_: VmmProcess, log: &Path) -> Result<VmmProcess, DriverError> {
        let sock = proc_.endpoint.control_socket.clone();
        let deadline = Instant::now() + self.cfg.spawn_timeout;
        loop {
            if proc_.pidfd.has_exited() {
                let status = proc_.pidfd.reap();
                return Err(DriverError::EarlyExit(format!(
                    "{status}: {}",
                    super::log_tail(log, 600)
                )));
            }
            if sock.exists() && self.ping(&proc_.endpoint).await.is_ok() {
                return Ok(proc_);
            }
            if Instant::now() >= deadline {
                let _ = self.kill(&proc_);
                return Err(DriverError::Socket {
                    path: sock,
                    reason: format!(
                        "did not answer within {} ms",
                        self.cfg.spawn_timeout.as_millis()
                    ),
                    unreachable: true,
                });
            }
            // No event announces a socket file; this short poll is bounded by the deadline.
            tokio::select! {
                _ = proc_.pidfd.exited() => {}
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    }

    async fn api(&self, ep: &VmmEndpoint, req: &ApiRequest) -> Result<Value, DriverError> {
        let body = (!req.body.is_null()).then_some(&req.body);
        let (status, value) = self
            .pool
            .call(
                &ep.control_socket,
                req.method.clone(),
                &req.path,
                body,
                self.cfg.api_timeout,
            )
            .await?;
        if status.is_success() {
            return Ok(value);
        }
        // Firecracker explains a refusal in `fault_message`.
        let fault = value
            .get("fault_message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}"));
        Err(DriverError::Refused {
            what: format!("{} {}", req.method, req.path),
            reason: fault,
        })
    }

    async fn send(
        &self,
        ep: &VmmEndpoint,
        method: Method,
        path: &str,
        body: Value,
    ) -> Result<Value, DriverError> {
        self.api(
            ep,
            &ApiRequest {
                method,
                path: path.into(),
                body,
            },
        )
        .await
    }
}

/// Files inside a snapshot directory.
const SNAPSHOT_STATE: &str = "vmstate";
const SNAPSHOT_MEM: &str = "memory";

fn snapshot_body(dir: &Path, diff: bool) -> Value {
    json!({
        "snapshot_type": if diff { "Diff" } else { "Full" },
        "snapshot_path": dir.join(SNAPSHOT_STATE).display().to_string(),
        "mem_file_path": dir.join(SNAPSHOT_MEM).display().to_string(),
    })
}

fn load_body(dir: &Path) -> Value {
    json!({
        "snapshot_path": dir.join(SNAPSHOT_STATE).display().to_string(),
        "mem_backend": {
            "backend_type": "File",
            "backend_path": dir.join(SNAPSHOT_MEM).display().to_string(),
        },
        "resume_vm": false,
    })
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

#[async_trait]
impl VmmDriver for FirecrackerDriver {
    fn kind(&self) -> &'static str {
        "firecracker"
    }

    async fn spawn(&self, req: &SpawnRequest<'_>) -> Result<VmmProcess, DriverError> {
        if self.cfg.jailer.enabled {
            let proc_ = self.spawn_jailed(req).await?;
            return self.wait_api(proc_, &req.run_dir.join(JAILER_LOG)).await;
        }
        let sock = req.run_dir.join(API_SOCKET);
        // Firecracker refuses to start if its socket path exists.
        let _ = std::fs::remove_file(&sock);
        self.pool.forget(&sock);
        for f in [VMM_LOG, METRICS_FILE] {
            // Firecracker opens these, it does not create them.
            let p = req.run_dir.join(f);
            let _ = std::fs::rename(&p, req.run_dir.join(format!("{f}.prev")));
            std::fs::File::create(&p)
                .map_err(|e| DriverError::Io(format!("creating {}", p.display()), e))?;
        }
        let mut cmd = Command::new(&self.cfg.binary);
        cmd.arg("--api-sock")
            .arg(&sock)
            .arg("--id")
            .arg(req.vm_id.as_str())
            .current_dir(req.run_dir);
        // The console log is recreated per VMM, like QEMU's, so a guest's output is its own.
        let console = req.run_dir.join(CONSOLE_LOG);
        let _ = std::fs::remove_file(&console);
        let sp = spawn_detached(cmd, &console)
            .map_err(|e| DriverError::Spawn(format!("{}: {e}", self.cfg.binary.display())))?;
        let proc_ = VmmProcess {
            endpoint: VmmEndpoint {
                pid: sp.pid,
                start_time: sp.start_time,
                control_socket: sock,
                console_log: console.clone(),
            },
            pidfd: sp.pidfd,
        };
        self.wait_api(proc_, &console).await
    }

    async fn configure(&self, ep: &VmmEndpoint, spec: &VmSpec) -> Result<(), DriverError> {
        // The socket sits in the run directory, or at the root of the jail.
        let dir = ep
            .control_socket
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut paths = if self.cfg.jailer.enabled {
            self.furnish_jail(&dir, spec)?;
            FcPaths::jailed(spec)
        } else {
            FcPaths::host(spec, &dir)
        };
        paths.track_dirty_pages = self.cfg.diff_snapshots;
        for req in Self::config_requests(spec, &paths) {
            self.api(ep, &req).await?;
        }
        Ok(())
    }

    async fn boot(&self, ep: &VmmEndpoint) -> Result<(), DriverError> {
        // A VMM that loaded a snapshot is already started, paused: booting it is resuming it.
        if self.ping(ep).await? == GuestRun::Paused {
            return self.resume(ep).await;
        }
        self.send(
            ep,
            Method::PUT,
            "/actions",
            json!({"action_type": "InstanceStart"}),
        )
        .await
        .map(|_| ())
    }

    async fn pause(&self, ep: &VmmEndpoint) -> Result<(), DriverError> {
        self.send(ep, Method::PATCH, "/vm", json!({"state": "Paused"}))
            .await
            .map(|_| ())
    }

    async fn resume(&self, ep: &VmmEndpoint) -> Result<(), DriverError> {
        self.send(ep, Method::PATCH, "/vm", json!({"state": "Resumed"}))
            .await
            .map(|_| ())
    }

    async fn shutdown(&self, ep: &VmmEndpoint) -> Result<(), DriverError> {
        self.send(
            ep,
            Method::PUT,
            "/actions",
            json!({"action_type": "SendCtrlAltDel"}),
        )
        .await
        .map(|_| ())
    }

    async fn quit(&self, _ep: &VmmEndpoint) -> Result<(), DriverError> {
        // Firecracker has no quit command; the caller goes on to SIGKILL.
        Err(DriverError::Unsupported("quit", "firecracker"))
    }

    async fn ping(&self, ep: &VmmEndpoint) -> Result<GuestRun, DriverError> {
        let v = self.send(ep, Method::GET, "/", Value::Null).await?;
        Ok(match v.get("state").and_then(Value::as_str).unwrap_or("") {
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

    async fn agent_connect(&self, ep: &VmmEndpoint) -> Result<super::AgentStream, DriverError> {
        // Firecracker's hybrid vsock: connect to the device's unix socket, ask for the guest
        // port with `CONNECT <port>\n`, and read `OK <host port>\n`; the stream is then the
        // guest connection.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = ep.control_socket.parent().unwrap_or(Path::new("/"));
        let path = dir.join(VSOCK_SOCKET);
        let mut s = super::AgentStream::connect(&path)
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

    async fn snapshot(&self, ep: &VmmEndpoint, dest: &Path, diff: bool) -> Result<(), DriverError> {
        self.send(
            ep,
            Method::PUT,
            "/snapshot/create",
            snapshot_body(dest, diff),
        )
        .await
        .map(|_| ())
    }

    async fn restore(&self, ep: &VmmEndpoint, src: &Path) -> Result<(), DriverError> {
        self.send(ep, Method::PUT, "/snapshot/load", load_body(src))
            .await
            .map(|_| ())
    }

    fn owns_cmdline(&self, vm_id: &VmId, cmdline: &[String]) -> bool {
        cmdline
            .windows(2)
            .any(|w| w[0] == "--id" && w[1] == vm_id.as_str())
    }

    fn control_socket(&self, run_dir: &Path) -> PathBuf {
        run_dir.join(API_SOCKET)
    }

    fn identify(&self, proc_: &crate::process::ProcInfo, run_root: &Path) -> Option<VmId> {
        let cmdline = &proc_.cmdline;
        let id = cmdline
            .windows(2)
            .find(|w| w[0] == "--id")
            .and_then(|w| VmId::parse("vm_id", &w[1]).ok())?;
        let sock = cmdline
            .windows(2)
            .find(|w| w[0] == "--api-sock")
            .map(|w| PathBuf::from(&w[1]))?;
        let ours = if self.cfg.jailer.enabled {
            // A jailed Firecracker names its socket inside the jail; the jail is its root.
            proc_.root().as_deref() == Some(self.jail_dir(&id).join("root").as_path())
        } else {
            sock == run_root.join(id.as_str()).join(API_SOCKET)
        };
        ours.then_some(id)
    }

    fn release(&self, vm_id: &VmId) {
        if !self.cfg.jailer.enabled {
            return;
        }
        let jail = self.jail_dir(vm_id);
        if let Err(e) = std::fs::remove_dir_all(&jail)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(vm_id = %vm_id, path = %jail.display(), error = %e, "removing jail failed");
        }
        let cg = self.cgroup_dir(vm_id);
        if let Err(e) = std::fs::remove_dir(&cg)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(vm_id = %vm_id, path = %cg.display(), error = %e, "removing cgroup failed");
        }
    }

    fn sweep_leftovers(&self, live: &[VmId], grace: Duration) -> usize {
        if !self.cfg.jailer.enabled {
            return 0;
        }
        let j = &self.cfg.jailer;
        let jails = j.chroot_base.join(self.exec_name());
        let cgroups = j.cgroup_root.join(&j.parent_cgroup);
        let mut removed = 0;
        for (dir, is_cgroup) in [(jails, false), (cgroups, true)] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Ok(id) = VmId::parse("vm_id", &name) else {
                    continue;
                };
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|a| a >= grace);
                if live.contains(&id) || !old {
                    continue;
                }
                let res = if is_cgroup {
                    std::fs::remove_dir(e.path())
                } else {
                    std::fs::remove_dir_all(e.path())
                };
                if res.is_ok() {
                    removed += 1;
                    tracing::info!(vm_id = %id, path = %e.path().display(), "stale jail removed");
                }
            }
        }
        removed
    }

    fn exit_cause(
        &self,
        _run_dir: &Path,
        status: ExitInfo,
        _reported: Option<&super::ShutdownReason>,
    ) -> ExitCause {
        // Firecracker exits 0 when its guest shuts down or reboots.
        match status {
            ExitInfo::Exited(0) => ExitCause::GuestPoweroff,
            ExitInfo::Exited(c) => ExitCause::Crash(format!("exit code {c}")),
            ExitInfo::Signaled(s) => ExitCause::Signal(s),
            ExitInfo::Unknown => ExitCause::Unknown,
        }
    }
}
