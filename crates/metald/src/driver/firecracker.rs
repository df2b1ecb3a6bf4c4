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

/// Drives Firecracker microVMs.
#[derive(Debug, Clone)]
pub struct FirecrackerDriver {
    cfg: FirecrackerConfig,
}

impl FirecrackerDriver {
    /// A driver with these settings.
    pub fn new(cfg: FirecrackerConfig) -> Self {
        FirecrackerDriver { cfg }
    }

    /// The requests that configure a VM, in the order they are sent. Public so that a test can
    /// check every body against Firecracker's API spec.
    pub fn config_requests(spec: &VmSpec, run_dir: &Path) -> Vec<ApiRequest> {
        let put = |path: String, body: Value| ApiRequest {
            method: Method::PUT,
            path,
            body,
        };
        let mut out = vec![
            put(
                "/logger".into(),
                json!({
                    "log_path": run_dir.join(VMM_LOG).display().to_string(),
                    "level": "Info",
                    "show_level": true,
                    "show_log_origin": false,
                }),
            ),
            put(
                "/metrics".into(),
                json!({ "metrics_path": run_dir.join(METRICS_FILE).display().to_string() }),
            ),
            put(
                "/machine-config".into(),
                json!({
                    "vcpu_count": spec.vcpus,
                    "mem_size_mib": spec.memory_bytes / (1024 * 1024),
                }),
            ),
        ];
        let mut boot = json!({
            "kernel_image_path": spec.kernel.display().to_string(),
            "boot_args": kernel_args(spec),
        });
        if let Some(initrd) = &spec.initrd {
            boot["initrd_path"] = json!(initrd.display().to_string());
        }
        out.push(put("/boot-source".into(), boot));
        for d in &spec.drives {
            out.push(put(
                format!("/drives/{}", d.id),
                json!({
                    "drive_id": d.id,
                    "path_on_host": d.path.display().to_string(),
                    "is_root_device": d.is_root,
                    "is_read_only": d.read_only,
                }),
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
                snapshot_body(&run_dir.join("snapshot")),
            ),
            r(
                Method::PUT,
                "/snapshot/load",
                load_body(&run_dir.join("snapshot")),
            ),
        ]
    }

    async fn api(&self, ep: &VmmEndpoint, req: &ApiRequest) -> Result<Value, DriverError> {
        let body = (!req.body.is_null()).then_some(&req.body);
        let (status, value) = uds_http::call(
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

fn snapshot_body(dir: &Path) -> Value {
    json!({
        "snapshot_type": "Full",
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
        let sock = req.run_dir.join(API_SOCKET);
        // Firecracker refuses to start if its socket path exists.
        let _ = std::fs::remove_file(&sock);
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
                control_socket: sock.clone(),
                console_log: console.clone(),
            },
            pidfd: sp.pidfd,
        };
        let deadline = Instant::now() + self.cfg.spawn_timeout;
        loop {
            if proc_.pidfd.has_exited() {
                let status = proc_.pidfd.reap();
                let out = std::fs::read_to_string(&console).unwrap_or_default();
                let tail: String = out
                    .chars()
                    .rev()
                    .take(600)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                return Err(DriverError::EarlyExit(format!("{status}: {}", tail.trim())));
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

    async fn configure(&self, ep: &VmmEndpoint, spec: &VmSpec) -> Result<(), DriverError> {
        let run_dir = ep
            .control_socket
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for req in Self::config_requests(spec, &run_dir) {
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
            _ => GuestRun::NotStarted,
        })
    }

    async fn snapshot(&self, ep: &VmmEndpoint, dest: &Path) -> Result<(), DriverError> {
        self.send(ep, Method::PUT, "/snapshot/create", snapshot_body(dest))
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

    fn identify(&self, cmdline: &[String], run_root: &Path) -> Option<VmId> {
        let id = cmdline
            .windows(2)
            .find(|w| w[0] == "--id")
            .and_then(|w| VmId::parse("vm_id", &w[1]).ok())?;
        let want = run_root.join(id.as_str()).join(API_SOCKET);
        cmdline
            .windows(2)
            .any(|w| w[0] == "--api-sock" && Path::new(&w[1]) == want)
            .then_some(id)
    }

    fn exit_cause(&self, _run_dir: &Path, status: ExitInfo) -> ExitCause {
        // Firecracker exits 0 when its guest shuts down or reboots.
        match status {
            ExitInfo::Exited(0) => ExitCause::GuestPoweroff,
            ExitInfo::Exited(c) => ExitCause::Crash(format!("exit code {c}")),
            ExitInfo::Signaled(s) => ExitCause::Signal(s),
            ExitInfo::Unknown => ExitCause::Unknown,
        }
    }
}
