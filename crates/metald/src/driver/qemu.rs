//! The QEMU `microvm` driver: one `qemu-system-x86_64 -M microvm` process per VM, configured on
//! its command line and driven over QMP.
//!
//! QEMU starts with `-S` (vCPUs held) so that create and boot are separate steps, like
//! Firecracker's configure-then-InstanceStart. It runs with `-no-reboot`: a guest reboot (or a QMP
//! `system_reset`) makes QEMU exit, and the controller turns a reboot into a supervised restart.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{
    AgentStream, DriverError, ExitCause, GuestRun, ShutdownReason, SpawnRequest, Vmm, VmmControl,
    VmmDriver, VmmEndpoint, VmmEvent, cause_from_report, log_tail as tail, qmp,
};
use crate::config::{Accel, QemuConfig};
use crate::model::{VmId, VmSpec};
use crate::process::{ExitInfo, Pidfd};

/// The marker in every QEMU command line metald starts: `-name metald.<vm_id>`. It is how
/// re-attach recognises a VM's process and how strays are found.
pub const NAME_PREFIX: &str = "metald.";

/// File names inside a VM's run directory.
pub const QMP_SOCKET: &str = "qmp.sock";
/// Guest serial output.
pub use super::CONSOLE_LOG;
/// A second QMP monitor for operators and tools: metald holds `qmp.sock` for its events, and
/// QEMU serves one client per monitor.
pub const OPS_SOCKET: &str = "ops.sock";
/// The host side of the guest agent's virtio-serial port.
pub const AGENT_SOCKET: &str = "qga.sock";
/// The port name a stock qemu-guest-agent looks for.
pub const AGENT_PORT: &str = "org.qemu.guest_agent.0";
/// QEMU's own stdout and stderr.
pub use super::VMM_LOG;
/// The migration stream inside a snapshot directory.
pub const MIGRATION_FILE: &str = "qemu-migration.bin";
/// The unix socket a live migration's stream goes over, in the run directory (a target's
/// file, removed with the target's others).
pub const MIGRATION_SOCKET: &str = "next-migrate.sock";
/// The files a QEMU has in its run directory under its own name (a migration target has them
/// with [`super::TARGET_PREFIX`] until it is promoted); the console log is the VM's, shared.
const OWN_FILES: [&str; 4] = [QMP_SOCKET, OPS_SOCKET, AGENT_SOCKET, VMM_LOG];

/// Drives QEMU `microvm` guests.
#[derive(Debug)]
pub struct QemuDriver {
    cfg: QemuConfig,
    accel: Accel,
    cgroups: super::cgroup::CgroupPolicy,
    version: std::sync::OnceLock<String>,
    /// Where shared guest RAM files go (`qemu.shared_memory`).
    ram_dir: std::path::PathBuf,
}

impl QemuDriver {
    /// A driver using these settings.
    pub fn new(cfg: QemuConfig, accel: Accel) -> Self {
        QemuDriver {
            cfg,
            accel,
            cgroups: super::cgroup::CgroupPolicy::off(),
            version: Default::default(),
            ram_dir: std::path::PathBuf::from("/dev/shm/metald"),
        }
    }

    /// The same driver, keeping shared guest RAM files in `dir`.
    #[must_use]
    pub fn with_ram_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.ram_dir = dir;
        self
    }

    /// VM `vm_id`'s shared RAM file.
    pub fn ram_file(&self, vm_id: &VmId) -> std::path::PathBuf {
        self.ram_dir.join(format!("{vm_id}.ram"))
    }

    /// The same driver, placing each VMM in a cgroup of its own.
    #[must_use]
    pub fn with_cgroups(mut self, cgroups: super::cgroup::CgroupPolicy) -> Self {
        self.cgroups = cgroups;
        self
    }

    /// The user QEMU runs as, when it is not metald's.
    fn user(&self) -> Option<(u32, u32)> {
        self.cfg.uid.map(|u| (u, self.cfg.gid.unwrap_or(u)))
    }

    /// The QEMU command line for a VM (without the binary).
    /// A migration `target` names its sockets `next-*` (it starts beside the VM's VMM).
    pub fn args(&self, vm_id: &VmId, spec: &VmSpec, run_dir: &Path, target: bool) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        let sock = |name: &str| {
            super::socket_arg(run_dir, &super::target_name(name, target))
                .display()
                .to_string()
        };
        push(&["-name", &format!("{NAME_PREFIX}{vm_id}")]);
        if self.cfg.shared_memory {
            // Guest RAM in a shared tmpfs file: a migration target maps the same pages.
            let file = self
                .ram_file(vm_id)
                .display()
                .to_string()
                .replace(',', ",,");
            push(&["-M", "microvm,memory-backend=metald-ram"]);
            push(&[
                "-object",
                &format!(
                    "memory-backend-file,id=metald-ram,size={}M,mem-path={file},share=on",
                    spec.memory_bytes / (1024 * 1024)
                ),
            ]);
        } else {
            push(&["-M", "microvm"]);
        }
        match self.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
        }
        push(&["-smp", &spec.vcpus.to_string()]);
        push(&["-m", &format!("{}M", spec.memory_bytes / (1024 * 1024))]);
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        if !target {
            // A target starts with the guest's run state as the migration stream carries it.
            push(&["-S"]);
        }
        push(&["-kernel", &spec.kernel.display().to_string()]);
        if let Some(initrd) = &spec.initrd {
            push(&["-initrd", &initrd.display().to_string()]);
        }
        push(&["-append", &self.kernel_args(spec)]);
        if spec.console {
            // Appended to, so that a migration target carries on the guest's console.
            let file = run_dir
                .join(CONSOLE_LOG)
                .display()
                .to_string()
                .replace(',', ",,");
            push(&[
                "-chardev",
                &format!("file,id=metald-console,path={file},append=on"),
            ]);
            push(&["-serial", "chardev:metald-console"]);
        } else {
            push(&["-serial", "null"]);
        }
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", sock(QMP_SOCKET)),
        ]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", sock(OPS_SOCKET)),
        ]);
        for d in &spec.drives {
            // Commas in a QEMU option value are escaped by doubling them.
            let file = d.path.display().to_string().replace(',', ",,");
            let ro = if d.read_only { "on" } else { "off" };
            push(&[
                "-drive",
                &format!("id={},file={file},format=raw,if=none,readonly={ro}", d.id),
            ]);
            push(&["-device", &format!("virtio-blk-device,drive={}", d.id)]);
        }
        // The guest agent's channel: a virtio-serial port named as qemu-guest-agent expects, its
        // host side a socket in the run directory. Present on every VM (it costs nothing when
        // the guest runs no agent); whether the guest is judged by it is the VM's probe setting.
        push(&["-device", "virtio-serial-device,id=metald-serial"]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=metald-qga,path={},server=on,wait=off",
                sock(AGENT_SOCKET)
            ),
        ]);
        push(&[
            "-device",
            &format!("virtserialport,chardev=metald-qga,name={AGENT_PORT}"),
        ]);
        if self.cfg.sandbox {
            push(&[
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            ]);
        }
        if self.cfg.panic_device {
            // pvpanic tells QEMU the moment the guest kernel panics (GUEST_PANICKED); with the
            // pause action QEMU stays up in `guest-panicked` so metald, not QEMU, decides what
            // follows.
            push(&["-device", "pvpanic", "-action", "panic=pause"]);
        }
        if let Some(cid) = spec.vsock_cid {
            push(&["-device", &format!("vhost-vsock-device,guest-cid={cid}")]);
        }
        for n in &spec.nics {
            push(&[
                "-netdev",
                &format!("tap,id={},ifname={},script=no,downscript=no", n.id, n.tap),
            ]);
            push(&[
                "-device",
                &format!("virtio-net-device,netdev={},mac={}", n.id, n.mac),
            ]);
        }
        a
    }

    fn kernel_args(&self, spec: &VmSpec) -> String {
        let mut args = spec.kernel_args.trim().to_string();
        // `key` is either a `name=` prefix or a bare flag; a value the caller already set wins.
        let mut add = |present: &dyn Fn(&str) -> bool, v: &str| {
            if !args.split_ascii_whitespace().any(present) {
                if !args.is_empty() {
                    args.push(' ');
                }
                args.push_str(v);
            }
        };
        add(&|w| w.starts_with("console="), "console=ttyS0");
        // Under TCG a guest starved of CPU fails TSC calibration and hangs at boot; telling the
        // kernel the TSC rate skips the calibration.
        if self.accel == Accel::Tcg {
            add(
                &|w| w.starts_with("tsc_early_khz="),
                "tsc_early_khz=2000000",
            );
        }
        if let Some(root) = spec.drives.iter().find(|d| d.is_root) {
            add(&|w| w.starts_with("root="), "root=/dev/vda");
            add(
                &|w| w == "ro" || w == "rw",
                if root.read_only { "ro" } else { "rw" },
            );
        }
        args
    }
}

/// One QEMU's control API: QMP on its socket, through the held session while it is open.
#[derive(Debug)]
struct QemuVmm {
    sock: std::path::PathBuf,
    timeout: Duration,
    /// Bound on a migration, a snapshot's write or its load.
    migration_timeout: Duration,
    /// QEMU's downtime limit for a live migration.
    downtime: Duration,
    /// Its bandwidth cap, bytes/s.
    bandwidth: u64,
    /// The held QMP session, once watched. While it is open every command goes through it.
    session: std::sync::Mutex<Option<qmp::Session>>,
}

impl QemuVmm {
    /// Waits, bounded, for a migration (either direction) to complete, and returns what QEMU
    /// says it cost.
    async fn wait_migration(&self) -> Result<super::MigrationStats, DriverError> {
        let deadline = Instant::now() + self.migration_timeout;
        // Short polls first: a shared-memory migration is over in milliseconds and the guest is
        // paused until it is seen to be; a long one backs off to 20 ms.
        let mut poll = Duration::from_millis(1);
        loop {
            let v = self.qmp("query-migrate", None).await?;
            match v.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => {
                    let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
                    return Ok(super::MigrationStats {
                        total_ms: n(v.get("total-time")),
                        downtime_ms: n(v.get("downtime")),
                        bytes: n(v.get("ram").and_then(|r| r.get("transferred"))),
                        shared_memory: false,
                    });
                }
                "failed" | "cancelled" => {
                    let why = v
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("migration failed");
                    return Err(DriverError::Refused {
                        what: "QMP migrate".into(),
                        reason: why.to_string(),
                    });
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Timeout {
                    what: "QMP migration".into(),
                    millis: self.migration_timeout.as_millis(),
                });
            }
            // QMP's MIGRATION events would need the held connection, which the controller's
            // event task reads; a bounded poll of query-migrate needs nothing of it.
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(Duration::from_millis(20));
        }
    }

    /// Starts `command` (`migrate` or `migrate-incoming`) on the stream in `file`, handed to
    /// QEMU over the QMP socket (`getfd`, SCM_RIGHTS) and named in an `fd:` URI. Both commands
    /// go over one connection, since QEMU keeps a passed fd with the monitor it came on: the
    /// held session, or one opened for the two.
    async fn migrate_fd(&self, command: &str, file: std::fs::File) -> Result<(), DriverError> {
        const NAME: &str = "metald-migration";
        let session = match self.session() {
            Some(s) => s,
            None => qmp::Session::connect(&self.sock, self.timeout).await?.0,
        };
        session
            .execute_with_fd(
                "getfd",
                Some(json!({ "fdname": NAME })),
                std::os::fd::AsFd::as_fd(&file),
                self.timeout,
            )
            .await?;
        // QEMU holds its own copy of the file now.
        drop(file);
        let started = session
            .execute(
                command,
                Some(json!({ "uri": format!("fd:{NAME}") })),
                self.timeout,
            )
            .await;
        if started.is_err() {
            // Not taken by a migration: closed here, not left open in QEMU.
            let _ = session
                .execute("closefd", Some(json!({ "fdname": NAME })), self.timeout)
                .await;
        }
        started.map(|_| ())
    }

    /// Sets the migration capability `x-ignore-shared` (guest RAM in a shared file is not
    /// sent): on for a migration between processes sharing it, off for a snapshot, which must
    /// hold all of it. Capabilities stay set in a QEMU, so every migration sets its own.
    async fn set_ignore_shared(&self, on: bool) -> Result<(), DriverError> {
        self.qmp(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": on }] })),
        )
        .await
        .map(|_| ())
    }

    /// The held session, while it is open.
    fn session(&self) -> Option<qmp::Session> {
        let held = self.session.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// Runs one QMP command: on the held session while there is one (QEMU serves one QMP
    /// client at a time), else on a connection of its own.
    async fn qmp(&self, cmd: &str, args: Option<Value>) -> Result<Value, DriverError> {
        match self.session() {
            Some(s) => s.execute(cmd, args, self.timeout).await,
            None => qmp::execute(&self.sock, cmd, args, self.timeout).await,
        }
    }
}

#[async_trait]
impl VmmControl for QemuVmm {
    async fn configure(&self, _spec: &VmSpec) -> Result<(), DriverError> {
        // QEMU takes its whole config on the command line.
        Ok(())
    }

    async fn boot(&self) -> Result<(), DriverError> {
        self.qmp("cont", None).await.map(|_| ())
    }

    async fn pause(&self) -> Result<(), DriverError> {
        self.qmp("stop", None).await.map(|_| ())
    }

    async fn resume(&self) -> Result<(), DriverError> {
        self.qmp("cont", None).await.map(|_| ())
    }

    async fn shutdown(&self) -> Result<(), DriverError> {
        self.qmp("system_powerdown", None).await.map(|_| ())
    }

    async fn quit(&self) -> Result<(), DriverError> {
        match self.qmp("quit", None).await {
            Ok(_) => Ok(()),
            // QEMU may close the socket before its reply reaches us.
            Err(DriverError::Closed | DriverError::Io(..)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn ping(&self) -> Result<GuestRun, DriverError> {
        let v = self.qmp("query-status", None).await?;
        let status = v.get("status").and_then(Value::as_str).unwrap_or("");
        run_state(status)
    }

    async fn watch(&self) -> Result<Option<tokio::sync::mpsc::Receiver<VmmEvent>>, DriverError> {
        let (session, mut raw) = qmp::Session::connect(&self.sock, self.timeout).await?;
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(ev) = raw.recv().await {
                if let Some(ev) = translate(&ev)
                    && tx.send(ev).await.is_err()
                {
                    break;
                }
            }
        });
        Ok(Some(rx))
    }

    async fn agent_connect(&self) -> Result<AgentStream, DriverError> {
        let dir = self.sock.parent().unwrap_or(Path::new("/"));
        let path = dir.join(AGENT_SOCKET);
        super::connect_unix(&path)
            .await
            .map_err(|e| DriverError::connect(&path, &e))
    }

    async fn snapshot(&self, dest: &Path, diff: Option<&Path>) -> Result<(), DriverError> {
        if diff.is_some() {
            return Err(DriverError::Unsupported("a diff snapshot", "qemu"));
        }
        // QEMU's snapshot is its migration stream, written into a file metald opens and hands
        // over (QEMU runs nothing: its sandbox forbids it). The guest is paused, so the stream
        // is final.
        self.set_ignore_shared(false).await?;
        let path = dest.join(MIGRATION_FILE);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| DriverError::Io(format!("creating {}", path.display()), e))?;
        self.migrate_fd("migrate", file).await?;
        self.wait_migration().await.map(|_| ())
    }

    async fn restore(&self, _spec: &VmSpec, src: &Path) -> Result<(), DriverError> {
        let path = src.join(MIGRATION_FILE);
        let file = std::fs::File::open(&path)
            .map_err(|e| DriverError::Io(format!("opening {}", path.display()), e))?;
        self.set_ignore_shared(false).await?;
        self.migrate_fd("migrate-incoming", file).await?;
        self.wait_migration().await.map(|_| ())
    }

    async fn accept_migration(
        &self,
        channel: &Path,
        shared_memory: bool,
    ) -> Result<(), DriverError> {
        self.set_ignore_shared(shared_memory).await?;
        // QEMU binds and listens before it answers, so the source can connect at once.
        self.qmp(
            "migrate-incoming",
            Some(json!({ "uri": format!("unix:{}", channel.display()) })),
        )
        .await
        .map(|_| ())
    }

    async fn send_migration(
        &self,
        channel: &Path,
        shared_memory: bool,
    ) -> Result<super::MigrationStats, DriverError> {
        self.set_ignore_shared(shared_memory).await?;
        let downtime = u64::try_from(self.downtime.as_millis()).unwrap_or(u64::MAX);
        // Uncapped unless configured (QEMU's default, 128 MiB/s, is meant for a network): the
        // stream goes over a local socket.
        self.qmp(
            "migrate-set-parameters",
            Some(json!({ "downtime-limit": downtime, "max-bandwidth": self.bandwidth })),
        )
        .await?;
        self.qmp(
            "migrate",
            Some(json!({ "uri": format!("unix:{}", channel.display()) })),
        )
        .await?;
        // QEMU moves the guest from here on, with or without metald.
        crate::crash_point!("migrate.in_transfer");
        let mut stats = self.wait_migration().await?;
        stats.shared_memory = shared_memory;
        Ok(stats)
    }

    async fn cancel_migration(&self) -> Result<(), DriverError> {
        self.qmp("migrate_cancel", None).await.map(|_| ())
    }
}

#[async_trait]
impl VmmDriver for QemuDriver {
    fn version(&self) -> String {
        super::binary_version(&self.version, &self.cfg.binary)
    }

    fn kind(&self) -> &'static str {
        "qemu"
    }

    async fn spawn(&self, req: &SpawnRequest<'_>) -> Result<Vmm, DriverError> {
        let target = req.migration_target;
        let named = |n: &str| req.run_dir.join(super::target_name(n, target));
        let sock = named(QMP_SOCKET);
        // A socket left by an earlier process would make the readiness check below pass early.
        let _ = std::fs::remove_file(&sock);
        // Each VMM gets a fresh log, so what its exit left there is its own; the previous one is
        // kept beside it for post-mortems.
        let log = named(VMM_LOG);
        super::rotate_log(&log);
        if !target {
            // A target carries on the guest's console; a fresh VMM starts it afresh.
            super::rotate_log(&req.run_dir.join(CONSOLE_LOG));
        }
        if self.cfg.shared_memory {
            self.prepare_ram(req.vm_id, !target)?;
        }
        let mut cmd = Command::new(req.binary.unwrap_or(&self.cfg.binary));
        cmd.args(self.args(req.vm_id, req.spec, req.run_dir, target));
        if req.restore.is_some() || target {
            // The guest's state is fed in after start-up, by `restore` or `migrate`.
            cmd.args(["-incoming", "defer"]);
        }
        cmd.current_dir(req.run_dir);
        let placement = if target {
            // Beside the running VMM, in its cgroup, which holds both until the old one is gone:
            // a copy of guest RAM needs room for a second copy, shared RAM only the overhead.
            let extra = if self.cfg.shared_memory {
                self.cgroups.overhead()
            } else {
                req.spec
                    .memory_bytes
                    .saturating_add(self.cgroups.overhead())
            };
            self.cgroups
                .place_beside(req.vm_id, req.spec, self.user(), extra)?
        } else {
            self.cgroups.place(req.vm_id, req.spec, self.user())?
        };
        if let Some((uid, gid)) = placement.user {
            // QEMU makes its sockets and its console log in the run directory.
            rustix::fs::chown(
                req.run_dir,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(|e| DriverError::Io(format!("chown {}", req.run_dir.display()), e.into()))?;
        }
        let sp = super::spawn_vmm(cmd, &log, placement).await?;
        let endpoint = VmmEndpoint {
            pid: sp.pid,
            start_time: sp.start_time,
            control_socket: sock.clone(),
            console_log: req.run_dir.join(CONSOLE_LOG),
        };
        let vmm = self.adopt(endpoint, sp.pidfd, req.run_dir);
        // QMP answering is QEMU ready; an early exit reports QEMU's own error message.
        super::wait_ready(vmm, &log, self.cfg.spawn_timeout).await
    }

    async fn migrate(
        &self,
        from: &Vmm,
        to: &Vmm,
        _spec: &VmSpec,
    ) -> Result<super::MigrationStats, DriverError> {
        // Both QEMUs work in the run directory, so the channel's name is short whatever its
        // path's length.
        let channel = super::socket_arg(to.run_dir(), MIGRATION_SOCKET);
        let _ = std::fs::remove_file(to.run_dir().join(MIGRATION_SOCKET));
        let shared = self.cfg.shared_memory;
        to.accept_migration(&channel, shared).await?;
        let stats = from.send_migration(&channel, shared).await;
        let _ = std::fs::remove_file(to.run_dir().join(MIGRATION_SOCKET));
        let stats = stats?;
        // The source is done; the target holds the guest once it has left `inmigrate` (it
        // has loaded the last of the stream), running if the guest was.
        let deadline = Instant::now() + self.cfg.qmp_timeout;
        loop {
            match to.ping().await? {
                GuestRun::NotStarted if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                GuestRun::NotStarted => {
                    return Err(DriverError::Timeout {
                        what: "the target's load of the migration stream".into(),
                        millis: self.cfg.qmp_timeout.as_millis(),
                    });
                }
                _ => return Ok(stats),
            }
        }
    }

    fn own_files(&self) -> &'static [&'static str] {
        &OWN_FILES
    }

    fn settle_cgroups(&self, run_dir: &Path, spec: &VmSpec) {
        self.cgroups.settle(run_dir, spec);
    }

    fn adopt(&self, endpoint: VmmEndpoint, pidfd: Pidfd, run_dir: &Path) -> Vmm {
        if let Some(id) = vm_of(run_dir)
            && !self.cgroups.holds(&id, endpoint.pid)
        {
            tracing::warn!(vm_id = %id, pid = endpoint.pid, "adopted vmm is not in its cgroup (started without one); its next start puts it there");
        }
        let control = QemuVmm {
            sock: endpoint.control_socket.clone(),
            timeout: self.cfg.qmp_timeout,
            migration_timeout: self.cfg.migration_timeout,
            downtime: self.cfg.migration_downtime,
            bandwidth: match self.cfg.migration_max_bandwidth_mib {
                0 => 1 << 40,
                mib => mib.saturating_mul(1 << 20),
            },
            session: std::sync::Mutex::new(None),
        };
        Vmm::new(endpoint, pidfd, run_dir, std::sync::Arc::new(control))
    }

    async fn release(&self, vm_id: &VmId, _run_dir: &Path) {
        // Shared guest RAM goes with its last VMM.
        let _ = std::fs::remove_file(self.ram_file(vm_id));
        let (cgroups, id) = (self.cgroups.clone(), vm_id.clone());
        // Kills what is left in the cgroup and waits for it, bounded: off the runtime.
        let _ = tokio::task::spawn_blocking(move || cgroups.release(&id)).await;
    }

    fn check_host(&self) -> Result<(), String> {
        self.cgroups.check()
    }

    fn validate_spec(&self, spec: &VmSpec) -> Result<(), DriverError> {
        let Some((uid, gid)) = self.user() else {
            return Ok(());
        };
        // QEMU opens the VM's files itself, as its user: each must be open to it.
        let mut files: Vec<(String, &Path, bool)> = vec![(
            "config.boot.kernel_path".into(),
            spec.kernel.as_path(),
            false,
        )];
        if let Some(i) = &spec.initrd {
            files.push(("config.boot.initrd_path".into(), i.as_path(), false));
        }
        for (i, d) in spec.drives.iter().enumerate() {
            files.push((
                format!("config.storage[{i}].path"),
                d.path.as_path(),
                !d.read_only,
            ));
        }
        for (field, path, write) in files {
            let Ok(meta) = std::fs::metadata(path) else {
                continue;
            };
            if !super::jail::may_access(&meta, uid, gid, write) {
                return Err(DriverError::InvalidSpec {
                    field,
                    reason: format!(
                        "{} is not {} by QEMU's user {uid}:{gid}; metald never changes a \
                         file's owner: give the file to that user or group",
                        path.display(),
                        if write { "writable" } else { "readable" }
                    ),
                });
            }
        }
        Ok(())
    }

    fn owns_cmdline(&self, vm_id: &VmId, cmdline: &[String]) -> bool {
        let want = format!("{NAME_PREFIX}{vm_id}");
        super::args_after(cmdline, "-name").any(|n| n == want)
    }

    fn control_socket(&self, run_dir: &Path) -> std::path::PathBuf {
        run_dir.join(QMP_SOCKET)
    }

    fn identify(&self, proc_: &crate::process::ProcInfo, run_root: &Path) -> Option<VmId> {
        let cmdline = &proc_.cmdline;
        let name = super::arg_after(cmdline, "-name")?.strip_prefix(NAME_PREFIX)?;
        let id = VmId::parse("vm_id", name).ok()?;
        // Only VMMs whose QMP socket lies under our run directory: another metald on the same
        // host (another state dir) owns its own VMMs.
        let run_dir = run_root.join(id.as_str());
        let ours = super::args_after(cmdline, "-qmp")
            .filter_map(|a| a.strip_prefix("unix:")?.split(',').next())
            .any(|sock| {
                // A migration target's socket has the target name until it is promoted.
                [QMP_SOCKET, &super::target_name(QMP_SOCKET, true)]
                    .iter()
                    .any(|name| super::socket_arg_is(proc_.pid, Path::new(sock), &run_dir, name))
            });
        ours.then_some(id)
    }

    fn exit_cause(
        &self,
        run_dir: &Path,
        status: ExitInfo,
        reported: Option<&ShutdownReason>,
    ) -> ExitCause {
        if self.cgroups.oom_killed(run_dir) {
            return ExitCause::Oom;
        }
        // The SHUTDOWN event's reason, when the session saw it, says it directly.
        if let Some(cause) = cause_from_report(status, reported) {
            return cause;
        }
        // Without it (an adopted VMM that exited before its session opened): QEMU catches SIGTERM, SIGINT and SIGHUP, prints "terminating on signal N" and exits
        // with code 0, the same code as a guest power-off; its log tells them apart.
        let log = tail(&run_dir.join(VMM_LOG), 400);
        let caught = log
            .rsplit("terminating on signal ")
            .next()
            .filter(|_| log.contains("terminating on signal "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<i32>().ok());
        match (status, caught) {
            (ExitInfo::Signaled(sig), _) => ExitCause::Signal(sig),
            (_, Some(sig)) => ExitCause::Signal(sig),
            (ExitInfo::Exited(0), None) => ExitCause::GuestPoweroff,
            (ExitInfo::Exited(code), None) => ExitCause::Crash(format!(
                "exit code {code}: {}",
                tail(&run_dir.join(VMM_LOG), 200)
            )),
            (ExitInfo::Unknown, None) => ExitCause::Unknown,
        }
    }
}

/// The VM a run directory belongs to (its name).
fn vm_of(run_dir: &Path) -> Option<VmId> {
    run_dir
        .file_name()
        .and_then(|n| VmId::parse("vm_id", &n.to_string_lossy()).ok())
}

impl QemuDriver {
    /// Readies VM `vm_id`'s shared RAM file's directory; `fresh` (a VMM that boots or restores
    /// its guest, not a migration target) removes an old file first, so that no guest starts
    /// on a previous one's memory.
    fn prepare_ram(&self, vm_id: &VmId, fresh: bool) -> Result<(), DriverError> {
        std::fs::create_dir_all(&self.ram_dir)
            .map_err(|e| DriverError::Io(format!("creating {}", self.ram_dir.display()), e))?;
        if let Some((uid, gid)) = self.user() {
            // QEMU creates its RAM file there as its own user.
            rustix::fs::chown(
                &self.ram_dir,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(|e| DriverError::Io(format!("chown {}", self.ram_dir.display()), e.into()))?;
        }
        if fresh {
            let _ = std::fs::remove_file(self.ram_file(vm_id));
        }
        Ok(())
    }
}

/// Maps every QMP `RunState` QEMU 7.2 and later can report.
fn run_state(status: &str) -> Result<GuestRun, DriverError> {
    Ok(match status {
        "running" | "colo" => GuestRun::Running,
        "prelaunch" | "inmigrate" => GuestRun::NotStarted,
        // Stopped by a command, or around a snapshot/migration that metald itself runs.
        "paused" | "debug" | "finish-migrate" | "save-vm" | "restore-vm" => GuestRun::Paused,
        // The guest went to another QEMU; this one holds a copy that must not run again.
        "postmigrate" => GuestRun::MigratedAway,
        "suspended" => GuestRun::Suspended,
        "shutdown" => GuestRun::ShutDown,
        "guest-panicked" => GuestRun::Panicked,
        "internal-error" | "io-error" | "watchdog" => GuestRun::Crashed(status.to_string()),
        other => {
            return Err(DriverError::Protocol(format!(
                "QEMU reported an unknown run state {other:?}"
            )));
        }
    })
}

/// The events metald acts on; the rest (device and migration chatter) are dropped.
fn translate(ev: &qmp::RawEvent) -> Option<VmmEvent> {
    let guest = ev
        .data
        .get("guest")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Some(match ev.name.as_str() {
        "SHUTDOWN" => VmmEvent::Shutdown(ShutdownReason::from_qemu(
            ev.data.get("reason").and_then(Value::as_str).unwrap_or(""),
        )),
        "STOP" => VmmEvent::Stopped,
        "RESUME" => VmmEvent::Resumed,
        "GUEST_PANICKED" => VmmEvent::GuestPanicked,
        "RESET" => VmmEvent::Reset { guest },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn spec() -> VmSpec {
        VmSpec {
            vcpus: 2,
            memory_bytes: 256 * 1024 * 1024,
            kernel: "/assets/vmlinux".into(),
            initrd: Some("/assets/initrd.img".into()),
            kernel_args: "quiet".into(),
            drives: vec![crate::model::Drive {
                id: "root".into(),
                path: "/assets/a,b.img".into(),
                read_only: true,
                is_root: true,
            }],
            nics: vec![],
            console: true,
            metadata: BTreeMap::new(),
            restart_policy: Default::default(),
            auto_recover: true,
            vmm: None,
            vsock_cid: None,
            guest_health: Default::default(),
            vmm_binary: None,
            restore_from: Default::default(),
        }
    }

    #[test]
    fn command_line_carries_marker_and_escapes() {
        let d = QemuDriver::new(QemuConfig::default(), Accel::Tcg);
        let id = VmId::parse("vm_id", "web-1").unwrap();
        let args = d.args(&id, &spec(), Path::new("/run/web-1"), false);
        assert!(d.owns_cmdline(&id, &args));
        assert!(!d.owns_cmdline(&VmId::parse("vm_id", "web-10").unwrap(), &args));
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg"), "{joined}");
        assert!(joined.contains("file=/assets/a,,b.img"), "{joined}");
        assert!(joined.contains("-m 256M"), "{joined}");
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert_eq!(
            append,
            "quiet console=ttyS0 tsc_early_khz=2000000 root=/dev/vda ro"
        );
        let info = crate::process::ProcInfo {
            state: 'S',
            start_time: 1,
            cmdline: args.clone(),
            pid: 1,
        };
        assert_eq!(d.identify(&info, Path::new("/run")), Some(id.clone()));
        assert_eq!(d.identify(&info, Path::new("/other")), None);
    }

    #[test]
    fn exit_causes() {
        let dir = std::env::temp_dir().join(format!("metald-exit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = QemuDriver::new(QemuConfig::default(), Accel::Tcg);
        std::fs::write(dir.join(VMM_LOG), "").unwrap();
        assert_eq!(
            d.exit_cause(&dir, ExitInfo::Exited(0), None),
            ExitCause::GuestPoweroff
        );
        assert_eq!(
            d.exit_cause(&dir, ExitInfo::Signaled(9), None),
            ExitCause::Signal(9)
        );
        assert_eq!(
            d.exit_cause(&dir, ExitInfo::Unknown, None),
            ExitCause::Unknown
        );
        std::fs::write(
            dir.join(VMM_LOG),
            "qemu-system-x86_64: terminating on signal 15 from pid 1 (kill)\n",
        )
        .unwrap();
        assert_eq!(
            d.exit_cause(&dir, ExitInfo::Exited(0), None),
            ExitCause::Signal(15)
        );
        assert_eq!(
            d.exit_cause(&dir, ExitInfo::Unknown, None),
            ExitCause::Signal(15)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
