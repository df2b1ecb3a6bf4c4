//! A scripted stand-in for a VMM driver, for in-process tests of the controller and the
//! supervisor only (compiled under `cfg(test)`). Its "VMM" is a real process (`sleep`), so the
//! pidfd, its exit, its reaping and its exit status are the kernel's own; only the control API
//! is scripted: spawns that fail, boots that wait for the test, pings that answer slowly or not
//! at all. That is what real QEMU cannot produce on demand: an exit in the middle of a boot, a
//! delete during a recovery's backoff, a breaker opening half-way through a wave of recoveries.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;

use super::{
    AgentStream, DriverError, ExitCause, GuestRun, ShutdownReason, SpawnRequest, Vmm, VmmControl,
    VmmDriver, VmmEndpoint,
};
use crate::model::{VmId, VmSpec};
use crate::process::{ExitInfo, Pidfd, ProcInfo};

/// What the fake VMMs do; change it at any time from the test.
#[derive(Debug, Default)]
pub struct Script {
    /// The next this many spawns fail.
    pub fail_spawns: usize,
    /// Every spawn fails while set.
    pub fail_all_spawns: bool,
    /// A ping takes this long to answer.
    pub ping_delay: Duration,
    /// Pings are never answered (a hung VMM).
    pub hang_pings: bool,
    /// A boot fails as a VMM dying under it does: its connection closes.
    pub boot_closes: bool,
}

/// What the fake saw, for the test's assertions.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Spawns tried, by VM.
    pub spawns: HashMap<String, usize>,
    /// Boots that reached the VMM, by VM.
    pub boots: HashMap<String, usize>,
    /// Pings answered.
    pub pings: usize,
}

#[derive(Debug)]
struct FakeVmm {
    vm: String,
    run: GuestRun,
    // Kept open so that the control socket file exists, as a VMM's would.
    _listener: std::os::unix::net::UnixListener,
}

/// The fake driver (test only: see the module docs).
#[derive(Debug, Default)]
pub struct FakeVmmDriver {
    /// Itself, for the handles it makes (each VMM's control API asks it what the VMM does).
    me: std::sync::Weak<FakeVmmDriver>,
    /// What the VMMs do.
    pub script: Mutex<Script>,
    seen: Mutex<Seen>,
    vmms: Mutex<HashMap<i32, FakeVmm>>,
    /// While set, a boot waits for a permit from it (the test releases boots one by one).
    pub boot_gate: Mutex<Option<Arc<Semaphore>>>,
    /// Notified when a boot reaches the VMM and starts waiting on the gate.
    pub boot_waiting: tokio::sync::Notify,
    /// Notified at every answered ping.
    pub ping_answered: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeVmmDriver {
    /// A fake whose VMMs do what they are told.
    pub fn new() -> Arc<Self> {
        Arc::new_cyclic(|me| FakeVmmDriver {
            me: me.clone(),
            ..Self::default()
        })
    }

    /// Changes the script.
    pub fn script(&self, f: impl FnOnce(&mut Script)) {
        f(&mut lock(&self.script));
    }

    /// What it saw so far.
    pub fn seen(&self) -> Seen {
        lock(&self.seen).clone()
    }

    /// Spawns tried for `vm`.
    pub fn spawns(&self, vm: &str) -> usize {
        lock(&self.seen).spawns.get(vm).copied().unwrap_or(0)
    }

    /// The pid of `vm`'s live fake VMM (not a zombie, not reaped).
    pub fn pid_of(&self, vm: &str) -> Option<i32> {
        lock(&self.vmms)
            .iter()
            .filter(|(_, v)| v.vm == vm)
            .map(|(pid, _)| *pid)
            .find(|pid| crate::process::live_start_time(*pid).is_some())
    }

    /// Kills every fake VMM still alive (a test's clean-up).
    pub fn kill_all(&self) {
        for pid in lock(&self.vmms).keys() {
            let _ = crate::process::kill_pid(*pid, libc::SIGKILL);
        }
    }

    /// Kills `vm`'s fake VMM, as an outside SIGKILL would.
    pub fn kill_vm(&self, vm: &str) -> bool {
        let Some(pid) = self.pid_of(vm) else {
            return false;
        };
        // A child of this test process that has not been reaped (its controller reaps it
        // through its pidfd after this), so the pid is still this process's.
        crate::process::kill_pid(pid, libc::SIGKILL).is_ok()
    }

    fn run_of(&self, ep: &VmmEndpoint) -> Result<GuestRun, DriverError> {
        lock(&self.vmms)
            .get(&ep.pid)
            .map(|v| v.run.clone())
            .ok_or_else(|| DriverError::Socket {
                path: ep.control_socket.clone(),
                reason: "no such fake VMM".into(),
                unreachable: true,
            })
    }

    fn set_run(&self, ep: &VmmEndpoint, run: GuestRun) -> Result<(), DriverError> {
        match lock(&self.vmms).get_mut(&ep.pid) {
            Some(v) => {
                v.run = run;
                Ok(())
            }
            None => Err(DriverError::Closed),
        }
    }
}

const SOCKET: &str = "fake.sock";

/// One fake VMM's control API: asks the fake driver what that VMM does.
#[derive(Debug)]
struct FakeControl {
    fake: Arc<FakeVmmDriver>,
    ep: VmmEndpoint,
}

#[async_trait]
impl VmmControl for FakeControl {
    async fn configure(&self, _spec: &VmSpec) -> Result<(), DriverError> {
        self.fake.run_of(&self.ep).map(|_| ())
    }

    async fn boot(&self) -> Result<(), DriverError> {
        let gate = lock(&self.fake.boot_gate).clone();
        if let Some(gate) = gate {
            self.fake.boot_waiting.notify_one();
            if let Ok(p) = gate.acquire().await {
                p.forget();
            }
        }
        if lock(&self.fake.script).boot_closes {
            return Err(DriverError::Closed);
        }
        let vm = lock(&self.fake.vmms)
            .get(&self.ep.pid)
            .map(|v| v.vm.clone());
        if let Some(vm) = vm {
            *lock(&self.fake.seen).boots.entry(vm).or_default() += 1;
        }
        self.fake.set_run(&self.ep, GuestRun::Running)
    }

    async fn pause(&self) -> Result<(), DriverError> {
        self.fake.set_run(&self.ep, GuestRun::Paused)
    }

    async fn resume(&self) -> Result<(), DriverError> {
        self.fake.set_run(&self.ep, GuestRun::Running)
    }

    async fn shutdown(&self) -> Result<(), DriverError> {
        self.quit().await
    }

    async fn quit(&self) -> Result<(), DriverError> {
        let _ = crate::process::kill_pid(self.ep.pid, libc::SIGTERM);
        Ok(())
    }

    async fn ping(&self) -> Result<GuestRun, DriverError> {
        let (delay, hang) = {
            let s = lock(&self.fake.script);
            (s.ping_delay, s.hang_pings)
        };
        if hang {
            std::future::pending::<()>().await;
        }
        // The state is read when the ping is asked, and answered after the delay, as a VMM
        // busy elsewhere would.
        let run = self.fake.run_of(&self.ep)?;
        tokio::time::sleep(delay).await;
        lock(&self.fake.seen).pings += 1;
        self.fake.ping_answered.notify_waiters();
        Ok(run)
    }

    async fn agent_connect(&self) -> Result<AgentStream, DriverError> {
        Err(DriverError::Unsupported("guest agent", "fake"))
    }

    async fn snapshot(&self, _dest: &Path, _diff: Option<&Path>) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("snapshots", "fake"))
    }

    async fn restore(&self, _spec: &VmSpec, _src: &Path) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("snapshots", "fake"))
    }
}

#[async_trait]
impl VmmDriver for FakeVmmDriver {
    fn kind(&self) -> &'static str {
        "fake"
    }

    async fn spawn(&self, req: &SpawnRequest<'_>) -> Result<Vmm, DriverError> {
        let vm = req.vm_id.to_string();
        *lock(&self.seen).spawns.entry(vm.clone()).or_default() += 1;
        {
            let mut s = lock(&self.script);
            if s.fail_all_spawns {
                return Err(DriverError::Spawn("scripted spawn failure".into()));
            }
            if s.fail_spawns > 0 {
                s.fail_spawns -= 1;
                return Err(DriverError::Spawn("scripted spawn failure".into()));
            }
        }
        let sock = self.control_socket(req.run_dir);
        let _ = std::fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock)
            .map_err(|e| DriverError::Io(format!("binding {}", sock.display()), e))?;
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("600");
        let sp = crate::process::spawn_detached(cmd, &req.run_dir.join(super::VMM_LOG))
            .map_err(|e| DriverError::Spawn(e.to_string()))?;
        lock(&self.vmms).insert(
            sp.pid,
            FakeVmm {
                vm,
                run: GuestRun::NotStarted,
                _listener: listener,
            },
        );
        let endpoint = VmmEndpoint {
            pid: sp.pid,
            start_time: sp.start_time,
            control_socket: sock,
            console_log: req.run_dir.join(super::CONSOLE_LOG),
        };
        Ok(self.adopt(endpoint, sp.pidfd, req.run_dir))
    }

    fn adopt(&self, endpoint: VmmEndpoint, pidfd: Pidfd, run_dir: &Path) -> Vmm {
        let control = FakeControl {
            fake: self.me.upgrade().unwrap_or_default(),
            ep: endpoint.clone(),
        };
        Vmm::new(endpoint, pidfd, run_dir, Arc::new(control))
    }

    fn owns_cmdline(&self, _vm_id: &VmId, _cmdline: &[String]) -> bool {
        false
    }

    fn identify(&self, _proc: &ProcInfo, _run_root: &Path) -> Option<VmId> {
        None
    }

    async fn release(&self, _vm_id: &VmId, _run_dir: &Path) {}

    fn control_socket(&self, run_dir: &Path) -> PathBuf {
        run_dir.join(SOCKET)
    }

    fn exit_cause(
        &self,
        _run_dir: &Path,
        status: ExitInfo,
        _reported: Option<&ShutdownReason>,
    ) -> ExitCause {
        match status {
            ExitInfo::Signaled(libc::SIGTERM) | ExitInfo::Exited(0) => ExitCause::GuestPoweroff,
            ExitInfo::Signaled(s) => ExitCause::Signal(s),
            ExitInfo::Exited(c) => ExitCause::Crash(format!("exit {c}")),
            ExitInfo::Unknown => ExitCause::Unknown,
        }
    }
}
