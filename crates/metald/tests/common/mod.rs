//! Test harness: real metald daemons (the built binary), real QEMU guests, real gRPC over a unix
//! socket. Every `Daemon` kills its metald and every VMM under its state directory when dropped,
//! so a failing test leaves no process behind.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use metald_api::v1 as pb;
use tokio::sync::Notify;

pub type Client = metald_api::Client;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Builds (once per test binary; cached across runs) the guest kernel and initrd, and returns
/// their directory.
pub fn guest_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = repo_root();
        let st = Command::new("bash")
            .arg(root.join("scripts/build-guest.sh"))
            .status()
            .expect("running scripts/build-guest.sh");
        assert!(st.success(), "scripts/build-guest.sh failed");
        root.join("target/guest")
    })
    .clone()
}

/// Path of a binary built in this workspace's target dir.
pub fn bin(name: &str) -> PathBuf {
    // Integration tests live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        p.exists(),
        "{} is not built; run the tests with `cargo test --workspace`",
        p.display()
    );
    p
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Whether these tests drive Firecracker (`METALD_TEST_VMM=firecracker`: the real binary when
/// `FIRECRACKER_BIN` is set, otherwise the labelled stand-in from crates/fc-standin) instead of
/// QEMU.
pub fn on_firecracker() -> bool {
    std::env::var("METALD_TEST_VMM").is_ok_and(|v| v == "firecracker")
}

fn vmm_args() -> Vec<String> {
    if !on_firecracker() {
        return vec![];
    }
    let bin_path = std::env::var("FIRECRACKER_BIN")
        .unwrap_or_else(|_| bin("firecracker-standin").display().to_string());
    vec![
        "--vmm".into(),
        "firecracker".into(),
        "--firecracker-bin".into(),
        bin_path,
    ]
}

/// Logs a daemon printed, with a wake-up for waiters.
#[derive(Default)]
pub struct Logs {
    lines: Mutex<Vec<String>>,
    notify: Notify,
}

pub struct Daemon {
    pub state_dir: PathBuf,
    pub sock: PathBuf,
    pub extra_args: Vec<String>,
    /// Extra environment for the next spawn (FAILPOINTS, say).
    pub env: Vec<(String, String)>,
    config_file: Option<PathBuf>,
    child: Option<Child>,
    pub logs: Arc<Logs>,
}

impl Daemon {
    /// Starts metald on a fresh state directory (short, so socket paths fit).
    pub async fn start() -> Daemon {
        Self::start_with(vec![]).await
    }

    /// Starts metald with a TOML config file (flags from the harness still override it).
    pub async fn start_with_toml(toml: &str) -> Daemon {
        Self::start_with_toml_args(toml, vec![]).await
    }

    /// Starts metald with a TOML config file and extra flags.
    pub async fn start_with_toml_args(toml: &str, mut args: Vec<String>) -> Daemon {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let path = PathBuf::from(format!("/tmp/mdt-cfg-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, toml).unwrap();
        args.extend(["--config".to_string(), path.display().to_string()]);
        let mut d = Self::start_with(args).await;
        d.config_file = Some(path);
        d
    }

    pub async fn start_with(extra_args: Vec<String>) -> Daemon {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let state_dir = PathBuf::from(format!("/tmp/mdt-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir_all(&state_dir).unwrap();
        Self::start_in(state_dir, extra_args).await
    }

    /// Starts metald on `state_dir`, which exists (a tmpfs mounted there, say).
    pub async fn start_in(state_dir: PathBuf, extra_args: Vec<String>) -> Daemon {
        let mut d = Daemon {
            sock: state_dir.join("metald.sock"),
            state_dir,
            extra_args,
            env: Vec::new(),
            config_file: None,
            child: None,
            logs: Arc::new(Logs::default()),
        };
        d.spawn().await;
        d
    }

    /// Starts (or restarts) the metald process and waits for its `metald ready` line.
    pub async fn spawn(&mut self) {
        guest_dir();
        let mut cmd = Command::new(bin("metald"));
        cmd.arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--accel", "tcg", "--log-format", "json"])
            .arg("--asset-dir")
            .arg(guest_dir())
            .args(if self.extra_args.iter().any(|a| a == "--metrics-listen") {
                vec![]
            } else {
                vec!["--metrics-listen", "127.0.0.1:0"]
            })
            .args(if self.extra_args.iter().any(|a| a == "--vmm") {
                vec![]
            } else {
                vmm_args()
            })
            .args(&self.extra_args)
            .env("RUST_LOG", "debug,h2=info,tower=info,hyper=info,tonic=info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("starting metald");
        let out = child.stdout.take().unwrap();
        let logs = self.logs.clone();
        let mark = logs.lines.lock().unwrap().len();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                eprintln!("[metald] {line}");
                logs.lines.lock().unwrap().push(line);
                logs.notify.notify_waiters();
            }
        });
        self.child = Some(child);
        self.wait_log_since(mark, Duration::from_secs(30), |l| {
            l.contains("\"metald ready\"")
        })
        .await
        .expect("metald did not become ready");
    }

    /// Sends `sig` to metald without waiting.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // Our own child, not reaped yet: its pid is still its own.
            let _ = metald::process::kill_pid(c.id() as i32, sig);
        }
    }

    /// Sends `sig` to metald and waits for it to exit.
    pub fn stop_with(&mut self, sig: i32) {
        if let Some(mut c) = self.child.take() {
            // Our own child, not reaped yet: its pid is still its own.
            let _ = metald::process::kill_pid(c.id() as i32, sig);
            let _ = c.wait();
        }
    }

    /// Waits (bounded) for metald to exit by itself (a crash point aborting it); reaps it.
    pub async fn wait_exited(&mut self, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && c.try_wait().ok().flatten().is_some()
            {
                self.child = None;
                return true;
            }
            // Nothing announces another process's exit to a std Child; bounded above.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    pub async fn client(&self) -> Client {
        connect(&self.sock).await
    }

    /// Waits (bounded) for a log line, printed after index `since`, matching `pred`.
    pub async fn wait_log_since(
        &self,
        since: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.logs.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(l) = self
                .logs
                .lines
                .lock()
                .unwrap()
                .iter()
                .skip(since)
                .find(|l| pred(l))
            {
                return Some(l.clone());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// The text of the current metald's `/metrics`.
    pub async fn metrics_text(&self) -> String {
        let addr = self.metrics_addr().await;
        http_get(&addr, "/metrics").await.1
    }

    /// The bound address of the metrics endpoint of the current metald process.
    pub async fn metrics_addr(&self) -> String {
        let line = self
            .wait_log_since(0, Duration::from_secs(5), |l| {
                l.contains("\"metrics listening\"")
            })
            .await
            .expect("metrics endpoint");
        let lines = self.logs.lines.lock().unwrap();
        let last = lines
            .iter()
            .rev()
            .find(|l| l.contains("\"metrics listening\""))
            .cloned()
            .unwrap_or(line);
        let v: serde_json::Value = serde_json::from_str(&last).unwrap();
        v["metrics_addr"].as_str().unwrap().to_string()
    }

    pub fn log_mark(&self) -> usize {
        self.logs.lines.lock().unwrap().len()
    }

    /// pids of live VMM processes started under this daemon's state directory.
    pub fn vmm_pids(&self) -> Vec<i32> {
        if on_firecracker() {
            pids_matching(&self.state_dir, "--api-sock")
        } else {
            vmm_pids_under(&self.state_dir)
        }
    }

    /// A VM's control socket (QMP, or Firecracker's API socket).
    pub fn control_socket(&self, vm: &str) -> PathBuf {
        let name = if on_firecracker() {
            "firecracker.sock"
        } else {
            "qmp.sock"
        };
        self.run_dir(vm).join(name)
    }

    /// Where a tool reaches the VMM behind metald's back: QEMU's second (operator) QMP monitor,
    /// since metald holds the first; Firecracker's API socket.
    pub fn ops_socket(&self, vm: &str) -> PathBuf {
        if on_firecracker() {
            self.control_socket(vm)
        } else {
            self.run_dir(vm).join("ops.sock")
        }
    }

    /// Presses the guest's power button behind metald's back, as the guest itself would act.
    pub async fn power_button(&self, vm: &str) {
        let sock = self.ops_socket(vm);
        if on_firecracker() {
            let body = serde_json::json!({"action_type": "SendCtrlAltDel"});
            metald::driver::uds_http::call(
                &sock,
                metald::driver::uds_http::Method::PUT,
                "/actions",
                Some(&body),
                Duration::from_secs(2),
            )
            .await
            .unwrap();
        } else {
            metald::driver::qmp::execute(&sock, "system_powerdown", None, Duration::from_secs(2))
                .await
                .unwrap();
        }
    }

    /// The run state the VMM itself reports: `running`, `paused`, ...
    pub async fn vmm_state(&self, vm: &str) -> String {
        let sock = self.ops_socket(vm);
        if on_firecracker() {
            fc_state(&sock).await
        } else {
            let v =
                metald::driver::qmp::execute(&sock, "query-status", None, Duration::from_secs(2))
                    .await
                    .unwrap();
            v["status"].as_str().unwrap_or("").to_string()
        }
    }

    /// pids of live processes whose command line mentions `name` and this state directory.
    pub fn vmm_pids_named(&self, name: &str) -> Vec<i32> {
        pids_matching(&self.state_dir, name)
    }

    pub fn run_dir(&self, vm: &str) -> PathBuf {
        self.state_dir.join("run").join(vm)
    }

    /// The registry, opened directly: for tests that fake a fault the real system cannot be
    /// made to produce on demand (a reused pid, a row lost while its VMM runs).
    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.state_dir.join("metald.db")).unwrap()
    }

    /// Waits (bounded) for a log line after `since` that mentions `vm` and `msg`; returns it
    /// parsed.
    pub async fn wait_event(
        &self,
        since: usize,
        vm: &str,
        msg: &str,
        timeout: Duration,
    ) -> serde_json::Value {
        let vm_field = format!("\"vm_id\":\"{vm}\"");
        let msg_field = format!("\"message\":\"{msg}\"");
        let line = self
            .wait_log_since(since, timeout, |l| {
                l.contains(&vm_field) && l.contains(&msg_field)
            })
            .await
            .unwrap_or_else(|| panic!("no {msg:?} event for {vm} within {timeout:?}"));
        serde_json::from_str(&line).unwrap()
    }

    /// Whether any log line after `since` mentions `vm` and `msg`.
    pub fn logged(&self, since: usize, vm: &str, msg: &str) -> bool {
        let vm_field = format!("\"vm_id\":\"{vm}\"");
        let msg_field = format!("\"message\":\"{msg}\"");
        self.logs
            .lines
            .lock()
            .unwrap()
            .iter()
            .skip(since)
            .any(|l| l.contains(&vm_field) && l.contains(&msg_field))
    }
}

impl Daemon {
    /// The cgroup directories (one per mounted hierarchy) holding this daemon's VMs' cgroups.
    pub fn cgroup_parents(&self) -> Vec<PathBuf> {
        let parent = metald::config::Config {
            state_dir: self.state_dir.clone(),
            ..Default::default()
        }
        .cgroup_parent();
        std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                matches!(f.get(2), Some(&"cgroup" | &"cgroup2")).then(|| PathBuf::from(f[1]))
            })
            .map(|m| m.join(&parent))
            .filter(|d| d.exists())
            .collect()
    }

    /// VM `vm`'s cgroup directories.
    pub fn cgroups_of(&self, vm: &str) -> Vec<PathBuf> {
        self.cgroup_parents()
            .into_iter()
            .map(|p| p.join(vm))
            .filter(|d| d.exists())
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop_with(libc::SIGKILL);
        for pid in pids_matching(&self.state_dir, "") {
            let _ = metald::process::kill_pid(pid, libc::SIGKILL);
        }
        // Shared guest RAM files (`qemu.shared_memory`).
        let _ = std::fs::remove_dir_all(
            metald::config::Config {
                state_dir: self.state_dir.clone(),
                ..Default::default()
            }
            .shared_memory_dir(),
        );
        // The VMs' cgroups, once the killed VMMs have left them (bounded).
        metald::driver::cgroup::remove_all(
            &metald::config::Config {
                state_dir: self.state_dir.clone(),
                ..Default::default()
            },
            Duration::from_secs(3),
        );
        let _ = std::fs::remove_dir_all(&self.state_dir);
        if let Some(f) = &self.config_file {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Runs metald on a fresh state directory with `args` (bounded: 20 s), expecting it to refuse
/// to start; returns what it said (stdout and stderr). Panics if it started.
pub async fn metald_refuses_to_start(args: &[&str]) -> String {
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    let dir = PathBuf::from(format!("/tmp/mdt-refused-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = tokio::process::Command::new(bin("metald"));
    cmd.arg("--state-dir")
        .arg(&dir)
        .arg("--asset-dir")
        .arg(guest_dir())
        .args(["--metrics-listen", ""])
        .args(args)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output()).await;
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.expect("metald did not exit within 20 s").unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "metald started: {said}");
    said
}

/// Live (non-zombie) QEMU processes whose command line mentions `dir`.
pub fn vmm_pids_under(dir: &Path) -> Vec<i32> {
    pids_matching(dir, "qemu-system")
}

/// Live (non-zombie) processes whose command line mentions `dir` and `name`.
pub fn pids_matching(dir: &Path, name: &str) -> Vec<i32> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        // The directory itself or a path under it: /tmp/mdt-1-3 must not match /tmp/mdt-1-39,
        // another test's daemon.
        let mentions = cmd.contains(&format!("{needle}/")) || cmd.contains(&format!("{needle} "));
        // A VMM given bare socket names (a run directory too long for socket paths) names the
        // directory only as its working directory.
        let works_there = std::fs::read_link(format!("/proc/{pid}/cwd"))
            .is_ok_and(|cwd| cwd.starts_with(dir) && pid != std::process::id() as i32);
        if !cmd.contains(name) || !(mentions || works_there) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|s| s == "Z");
        if !zombie {
            out.push(pid);
        }
    }
    out
}

pub fn pid_alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    match stat.rfind(')') {
        Some(i) => stat[i + 1..]
            .split_whitespace()
            .next()
            .is_some_and(|s| s != "Z"),
        None => false,
    }
}

pub async fn connect(sock: &Path) -> Client {
    metald_api::connect(&format!("unix:{}", sock.display()))
        .await
        .expect("connecting to metald")
}

/// A plain HTTP/1.1 GET on loopback; returns (status, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    try_http_get(addr, path).await.expect("connect")
}

/// [`http_get`], or None when nothing accepts the connection (yet).
pub async fn try_http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Chunked bodies are fine for the substring checks the tests make.
    Some((status, body))
}

/// The run state a Firecracker (or its stand-in) reports on its API socket: `running`,
/// `paused`, ...
pub async fn fc_state(sock: &Path) -> String {
    let (_, v) = metald::driver::uds_http::call(
        sock,
        metald::driver::uds_http::Method::GET,
        "/",
        None,
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    v["state"].as_str().unwrap_or("").to_ascii_lowercase()
}

/// A request for the test guest.
pub fn guest_request(vm_id: &str) -> pb::CreateVmRequest {
    let g = guest_dir();
    pb::CreateVmRequest {
        vm_id: vm_id.to_string(),
        customer_id: "cust-test".into(),
        from_snapshot: String::new(),
        config: Some(pb::VmConfig {
            cpu: Some(pb::CpuConfig { vcpu_count: 1 }),
            memory: Some(pb::MemoryConfig {
                size_bytes: 128 << 20,
            }),
            boot: Some(pb::BootConfig {
                kernel_path: g.join("vmlinux").display().to_string(),
                initrd_path: g.join("initrd.img").display().to_string(),
                kernel_args: "quiet panic=-1".into(),
            }),
            storage: vec![],
            network: vec![],
            console: Some(pb::ConsoleConfig { enabled: true }),
            metadata: [("app".to_string(), "test".to_string())]
                .into_iter()
                .collect(),
            restart_policy: 0,
            auto_recover: None,
            vmm: String::new(),
            vsock: None,
            guest_health: None,
            restore_from: 0,
        }),
        ..Default::default()
    }
}

/// The VM as GetVmInfo shows it.
pub async fn info(c: &mut Client, vm: &str) -> pb::Vm {
    c.get_vm_info(pb::GetVmInfoRequest { vm_id: vm.into() })
        .await
        .expect("GetVmInfo")
        .into_inner()
        .vm
        .expect("GetVmInfo without its vm")
}

/// The VM's recovery attempts, newest first.
pub async fn history(c: &mut Client, vm: &str) -> Vec<pb::RecoveryAttempt> {
    c.get_vm_info(pb::GetVmInfoRequest { vm_id: vm.into() })
        .await
        .expect("GetVmInfo")
        .into_inner()
        .recovery_history
}

/// An API enum's value by its short name (`readonly` for `HOST_MODE_KIND_READONLY`).
fn named<E: Into<i32>>(prefix: &str, name: &str, parse: fn(&str) -> Option<E>) -> i32 {
    parse(&format!("{prefix}_{}", name.to_ascii_uppercase()))
        .unwrap_or_else(|| panic!("no {prefix} {name}"))
        .into()
}

/// An event's kind by its name in the history (`orphaned`), as the API's enum.
pub fn kind(name: &str) -> i32 {
    named("EVENT_KIND", name, pb::EventKind::from_str_name)
}

/// A host mode by its name (`readonly`), as the API's enum.
pub fn host_mode(name: &str) -> i32 {
    named("HOST_MODE_KIND", name, pb::HostModeKind::from_str_name)
}

/// A recovery attempt's outcome by its name (`success`), as the API's enum.
pub fn outcome(name: &str) -> i32 {
    named("ATTEMPT_OUTCOME", name, pb::AttemptOutcome::from_str_name)
}

/// A breaker state by its name (`half_open`), as the API's enum.
pub fn breaker(name: &str) -> i32 {
    named("BREAKER_STATE", name, pb::BreakerState::from_str_name)
}

/// An orphan reason by its name (`process_dead`), as the API's enum.
pub fn reason(name: &str) -> i32 {
    named("ORPHAN_REASON", name, pb::OrphanReason::from_str_name)
}

/// The pid of the VM's VMM, if one runs.
pub fn pid_of(i: &pb::Vm) -> Option<i32> {
    i.vmm.as_ref().map(|v| v.pid)
}

/// The VM's VMM; panics when none runs.
pub fn vmm_of(i: &pb::Vm) -> &pb::VmmProcess {
    i.vmm
        .as_ref()
        .unwrap_or_else(|| panic!("{} has no VMM", i.vm_id))
}

/// The console log of the VM's VMM.
pub fn console_of(i: &pb::Vm) -> PathBuf {
    PathBuf::from(&vmm_of(i).console_log)
}

/// Waits (bounded) until the guest's console log contains `needle` at least `count` times.
/// There is no event for "a file gained a line" short of inotify, so this polls the file every
/// 50 ms; the deadline bounds it.
pub async fn wait_console(path: &Path, needle: &str, count: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.matches(needle).count() >= count {
            return true;
        }
        if Instant::now() >= deadline {
            eprintln!("console {} after timeout:\n{text}", path.display());
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The guest's own uptime from its last `uptime=` line.
pub fn guest_uptime(path: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.split("uptime=").nth(1))
        .and_then(|u| u.split_whitespace().next()?.parse().ok())
}

pub fn state(i: &pb::Vm) -> pb::VmState {
    pb::VmState::try_from(i.state).unwrap()
}

/// A private asset directory with its own kernel and initrd, so a test can remove the kernel
/// to make recoveries fail. Removed on drop.
pub struct Assets {
    pub dir: PathBuf,
}

impl Assets {
    pub fn new() -> Assets {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("/tmp/mdt-assets-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["vmlinux", "initrd.img"] {
            let src = guest_dir().join(f);
            if std::fs::hard_link(&src, dir.join(f)).is_err() {
                std::fs::copy(&src, dir.join(f)).unwrap();
            }
        }
        Assets { dir }
    }

    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }

    /// Takes the kernel away; recoveries that need it fail.
    pub fn break_kernel(&self) {
        std::fs::rename(self.kernel(), self.dir.join("vmlinux.away")).unwrap();
    }

    pub fn restore_kernel(&self) {
        std::fs::rename(self.dir.join("vmlinux.away"), self.kernel()).unwrap();
    }

    /// A request for a guest booted from these assets.
    pub fn request(&self, id: &str) -> pb::CreateVmRequest {
        let mut r = guest_request(id);
        let boot = r.config.as_mut().unwrap().boot.as_mut().unwrap();
        boot.kernel_path = self.kernel().display().to_string();
        boot.initrd_path = self.dir.join("initrd.img").display().to_string();
        r
    }

    /// The metald flags that allow these assets beside the shared guest image.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--asset-dir".into(),
            guest_dir().display().to_string(),
            "--asset-dir".into(),
            self.dir.display().to_string(),
        ]
    }
}

impl Drop for Assets {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every log line after `since` with this message, parsed.
pub fn events(d: &Daemon, since: usize, msg: &str) -> Vec<serde_json::Value> {
    let field = format!("\"message\":\"{msg}\"");
    d.logs
        .lines
        .lock()
        .unwrap()
        .iter()
        .skip(since)
        .filter(|l| l.contains(&field))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Creates and boots a test guest, returning its VMM pid.
pub async fn running_vm(c: &mut Client, id: &str) -> i32 {
    c.create_vm(guest_request(id)).await.unwrap();
    c.boot_vm(pb::BootVmRequest {
        vm_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    pid_of(&info(c, id).await).unwrap()
}

pub fn signal(pid: i32, sig: i32) {
    let _ = metald::process::kill_pid(pid, sig);
}

/// Waits (bounded) for a process to exit, on its pidfd.
pub async fn wait_dead(pid: i32, timeout: Duration) -> bool {
    let Ok(fd) = metald::process::Pidfd::open(pid) else {
        return true; // no such process
    };
    tokio::time::timeout(timeout, fd.exited()).await.is_ok()
}
