//! metalctl: the command-line client for metald's `metald.v1.VmService`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use clap::{Parser, Subcommand};
use metald_api::v1 as pb;
use serde_json::{Value, json};

mod generate;

/// Drive VMs on a metald host.
#[derive(Debug, Parser)]
#[command(name = "metalctl", version)]
struct Cli {
    /// metald's API: unix:PATH or tcp:HOST:PORT.
    #[arg(
        long,
        env = "METALD_ENDPOINT",
        default_value = "unix:/var/lib/metald/metald.sock"
    )]
    endpoint: String,
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per run, so the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum HostCmd {
    /// Show the mode, why and since when, free space and whether the registry takes writes.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drain the host for a reboot: maintenance, every running guest saved to disk and its VMM
    /// stopped; the next start of metald (or `host undrain`) restores them.
    Drain {
        /// Seconds for every save, in all.
        #[arg(long, default_value_t = 300)]
        deadline: u32,
    },
    /// End a drain now: the host is normal and saved guests are restored.
    Undrain,
    /// Set the mode: normal, readonly (reads and supervision only) or maintenance (no new VMs,
    /// no automatic recovery).
    Mode {
        /// normal, readonly or maintenance.
        mode: String,
        /// Why (required for readonly and maintenance).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

// Parsed once per run; boxing Create's many flags would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a VM (its VMM starts, configured but not booted); prints its id.
    Create {
        /// VM id; generated when omitted.
        #[arg(long)]
        id: Option<String>,
        /// Owning customer.
        #[arg(long, default_value = "default")]
        customer: String,
        /// Kernel image (inside one of metald's asset directories).
        #[arg(long, required_unless_present = "from_snapshot")]
        kernel: Option<PathBuf>,
        /// Start from this snapshot (from `metalctl snapshot`); its config is used.
        #[arg(long)]
        from_snapshot: Option<String>,
        /// Initrd.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: i32,
        /// Memory in MiB.
        #[arg(long, default_value_t = 128)]
        memory_mib: i64,
        /// A block device: id=ID,path=PATH[,ro][,root] (repeatable).
        #[arg(long)]
        drive: Vec<String>,
        /// A network interface: id=ID,mac=MAC,tap=TAP (repeatable).
        #[arg(long)]
        nic: Vec<String>,
        /// A metadata label KEY=VALUE (repeatable).
        #[arg(long)]
        metadata: Vec<String>,
        /// Discard the guest's serial output.
        #[arg(long)]
        no_console: bool,
        /// What to do when the VMM ends unasked: always, on-failure or never.
        #[arg(long, default_value = "on-failure")]
        restart_policy: String,
        /// Do not recover this VM automatically.
        #[arg(long)]
        no_auto_recover: bool,
        /// The VMM: qemu or firecracker (default: the host's).
        #[arg(long)]
        vmm: Option<String>,
        /// Give the VM a vsock device with this guest context id (3 or more).
        #[arg(long)]
        vsock_cid: Option<u32>,
        /// How the guest is probed: none (never judged by its silence) or agent (the QEMU guest
        /// agent in the guest is pinged); the host's default when omitted.
        #[arg(long)]
        guest_probe: Option<String>,
        /// Milliseconds the guest may take to answer its first probe (0: the host's default).
        #[arg(long, default_value_t = 0)]
        guest_startup_timeout_ms: u32,
        /// How a dead VMM is replaced: none (a cold boot) or boot-snapshot (a warm restore of the
        /// boot snapshot, which rolls the guest back to it: for stateless workloads).
        #[arg(long)]
        restore_from: Option<String>,
    },
    /// Wait until a VM's guest is ready (it answered its probe since its last start).
    WaitReady {
        /// VM id.
        id: String,
        /// Seconds to wait at most.
        #[arg(long, default_value_t = 60)]
        timeout: i32,
    },
    /// Ask a VM's guest agent about the guest: agent version, OS, kernel, guest clock.
    GuestInfo {
        /// VM id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move a running or paused VM's guest to a new VMM process without stopping it. With
    /// --all, every running or paused VM, --max-parallel at a time (a rolling VMM upgrade with
    /// --binary), stopping at the first failure.
    Migrate {
        /// VM id (or --all).
        id: Option<String>,
        /// Every running or paused VM.
        #[arg(long)]
        all: bool,
        /// The VMM binary the new processes run, and the VMs' later VMMs (admins only).
        #[arg(long)]
        binary: Option<String>,
        /// With --all, how many VMs move at once.
        #[arg(long, default_value_t = 2)]
        max_parallel: usize,
    },
    /// Recover an orphaned or failed VM now (clears FAILED and the backoff).
    Recover {
        /// VM id.
        id: String,
    },
    /// Turn automatic recovery on or off for a VM.
    AutoRecover {
        /// VM id.
        id: String,
        /// on or off.
        setting: String,
    },
    /// Show the host-wide recovery state: breaker and recoveries in flight.
    RecoveryStatus {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a reconcile pass now and show what it found and did.
    Reconcile,
    /// The host's mode: `host status`, `host mode normal|readonly|maintenance --reason TEXT`.
    Host {
        #[command(subcommand)]
        cmd: HostCmd,
    },
    /// Follow a VM's serial console (its guest's output), as `tail -f` would: the last bytes,
    /// then what the guest writes, across restarts of its VMM. Ctrl-C ends it. Read-only: the
    /// VMMs as metald runs them write the serial port to a file (QEMU) or to their standard
    /// output (Firecracker) and offer no input side to attach to.
    Console {
        /// VM id.
        id: String,
        /// Print what is there and stop.
        #[arg(long)]
        no_follow: bool,
        /// How much of the end to show first, in bytes.
        #[arg(long, default_value_t = 65536)]
        tail: i64,
    },
    /// Show a VM's VMM log (QEMU's stderr, Firecracker's logger); --follow keeps printing.
    Logs {
        /// VM id.
        id: String,
        /// Keep printing what the VMM writes.
        #[arg(long, short)]
        follow: bool,
        /// How much of the end to show first, in bytes.
        #[arg(long, default_value_t = 65536)]
        tail: i64,
    },
    /// Show the event history of one VM (or all), and with --follow keep printing new events.
    Events {
        /// VM id; all VMs when omitted.
        id: Option<String>,
        /// Keep streaming events as they happen.
        #[arg(long)]
        follow: bool,
        /// How many past events to show.
        #[arg(long, default_value_t = 50)]
        limit: i32,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Snapshot a running or paused VM; prints the snapshot id and its directory.
    Snapshot {
        /// VM id.
        id: String,
        /// Only the memory dirtied since the last snapshot (Firecracker with diff_snapshots).
        #[arg(long)]
        diff: bool,
        /// Make it the VM's boot snapshot (its warm restore point with --restore-from
        /// boot-snapshot).
        #[arg(long)]
        boot: bool,
    },
    /// List snapshots (a VM's with --vm), with their size.
    Snapshots {
        /// Only this VM's.
        #[arg(long)]
        vm: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a snapshot's files and record.
    DeleteSnapshot {
        /// Snapshot id.
        id: String,
    },
    /// Boot a created or shut-down VM.
    Boot {
        /// VM id.
        id: String,
        /// Return only once the guest is ready (answered its probe).
        #[arg(long)]
        wait_ready: bool,
        /// Seconds --wait-ready waits at most.
        #[arg(long, default_value_t = 60)]
        timeout: i32,
    },
    /// Power a VM off.
    Shutdown {
        /// VM id.
        id: String,
        /// Stop the VMM at once, without asking the guest.
        #[arg(long)]
        force: bool,
        /// Seconds the guest may take to power off (0: metald's default).
        #[arg(long, default_value_t = 0)]
        timeout: i32,
    },
    /// Pause a running VM.
    Pause {
        /// VM id.
        id: String,
    },
    /// Resume a paused VM.
    Resume {
        /// VM id.
        id: String,
    },
    /// Reboot a VM (a supervised restart of its VMM).
    Reboot {
        /// VM id.
        id: String,
    },
    /// Delete a VM and everything it had.
    Delete {
        /// VM id.
        id: String,
        /// Kill the VMM without asking the guest to power off.
        #[arg(long)]
        force: bool,
    },
    /// Show one VM.
    Info {
        /// VM id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one VM's health as metald's checks see it.
    Health {
        /// VM id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List VMs.
    List {
        /// Only VMs in this state (created, running, paused, shutdown; repeatable).
        #[arg(long)]
        state: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write shell completions and man pages into DIR (for packaging; see generate.rs).
    #[command(hide = true)]
    Generate {
        /// Output directory (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

fn kv_list(spec: &str, what: &str) -> Result<HashMap<String, String>> {
    let mut m = HashMap::new();
    for part in spec.split(',') {
        match part.split_once('=') {
            Some((k, v)) => m.insert(k.to_string(), v.to_string()),
            None => m.insert(part.to_string(), String::new()),
        };
    }
    if m.is_empty() {
        bail!("--{what} {spec:?} is empty");
    }
    Ok(m)
}

fn state_name(v: i32) -> &'static str {
    match pb::VmState::try_from(v) {
        Ok(pb::VmState::Created) => "CREATED",
        Ok(pb::VmState::Running) => "RUNNING",
        Ok(pb::VmState::Paused) => "PAUSED",
        Ok(pb::VmState::Shutdown) => "SHUTDOWN",
        Ok(pb::VmState::Orphaned) => "ORPHANED",
        Ok(pb::VmState::Failed) => "FAILED",
        _ => "UNSPECIFIED",
    }
}

fn parse_state(s: &str) -> Result<i32> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "created" => pb::VmState::Created,
        "running" => pb::VmState::Running,
        "paused" => pb::VmState::Paused,
        "shutdown" => pb::VmState::Shutdown,
        "orphaned" => pb::VmState::Orphaned,
        "failed" => pb::VmState::Failed,
        _ => bail!(
            "--state {s:?} is not one of created, running, paused, shutdown, orphaned, failed"
        ),
    } as i32)
}

/// A time as RFC 3339 in UTC, to the millisecond (`2026-11-28T04:30:00.123Z`); empty when unset.
fn ts(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .map(|t| rfc3339(t.seconds, t.nanos / 1_000_000))
        .unwrap_or_default()
}

fn rfc3339(secs: i64, millis: i32) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (the proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// How long ago a time was, for tables: `45s ago`, `5m ago`, `3h ago`, `2d ago`.
fn ago(t: &Option<prost_types::Timestamp>) -> String {
    let Some(t) = t else { return "-".into() };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let d = (now - t.seconds).max(0);
    match d {
        0..60 => format!("{d}s ago"),
        60..3600 => format!("{}m ago", d / 60),
        3600..86_400 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86_400),
    }
}

/// An enum value's name without its prefix, in lower case (`HOST_MODE_KIND_READONLY` →
/// `readonly`), as people type it.
fn short_name(full: &str, prefix: &str) -> String {
    full.trim_start_matches(prefix).to_ascii_lowercase()
}

fn mode_name(v: i32) -> String {
    pb::HostModeKind::try_from(v)
        .map(|m| short_name(m.as_str_name(), "HOST_MODE_KIND_"))
        .unwrap_or_default()
}

fn outcome_name(v: i32) -> String {
    pb::AttemptOutcome::try_from(v)
        .map(|m| short_name(m.as_str_name(), "ATTEMPT_OUTCOME_"))
        .unwrap_or_default()
}

fn breaker_name(v: i32) -> String {
    pb::BreakerState::try_from(v)
        .map(|m| short_name(m.as_str_name(), "BREAKER_STATE_"))
        .unwrap_or_default()
}

fn orphan_reason_name(v: i32) -> String {
    match pb::OrphanReason::try_from(v) {
        Ok(pb::OrphanReason::Unspecified) | Err(_) => String::new(),
        Ok(r) => r
            .as_str_name()
            .trim_start_matches("ORPHAN_REASON_")
            .to_ascii_lowercase(),
    }
}

fn event_kind_name(v: i32) -> String {
    pb::EventKind::try_from(v)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("EVENT_KIND_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

fn vmm_json(v: &Option<pb::VmmProcess>) -> Value {
    let Some(v) = v else { return Value::Null };
    json!({
        "kind": v.kind,
        "version": v.version,
        "pid": v.pid,
        "start_time": ts(&v.start_time),
        "control_socket": v.control_socket,
        "console_log": v.console_log,
        "vmm_log": v.vmm_log,
        "run_dir": v.run_dir,
    })
}

fn health_json(h: &Option<pb::VmHealthStatus>) -> Value {
    let Some(h) = h else { return Value::Null };
    json!({
        "is_healthy": h.is_healthy,
        "last_check": ts(&h.last_check),
        "last_error": h.last_error,
        "consecutive_failures": h.consecutive_failures,
        "recovery_count": h.recovery_count,
        "last_activity": ts(&h.last_activity),
    })
}

fn print_event(ev: &pb::VmEvent, json: bool) {
    if json {
        let v = json!({
            "seq": ev.seq, "vm_id": ev.vm_id, "at": ts(&ev.at), "kind": event_kind_name(ev.kind),
            "from": state_name(ev.from_state), "state": state_name(ev.state), "reason": ev.reason,
            "message": ev.message,
        });
        println!("{v}");
    } else {
        let transition = if ev.from_state == 0 {
            state_name(ev.state).to_string()
        } else {
            format!("{} -> {}", state_name(ev.from_state), state_name(ev.state))
        };
        println!(
            "{:<16} {:<20} {:<16} {:<22} {:<18} {}",
            ts(&ev.at),
            ev.vm_id,
            event_kind_name(ev.kind),
            transition,
            ev.reason,
            ev.message
        );
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

fn history_json(r: &pb::GetVmInfoResponse) -> Value {
    Value::Array(
        r.recovery_history
            .iter()
            .map(|a| {
                json!({
                    "attempt": a.attempt,
                    "started_at": ts(&a.started_at),
                    "duration_seconds": a.duration_seconds,
                    "outcome": outcome_name(a.outcome),
                    "error": a.error,
                    "trigger": a.trigger,
                })
            })
            .collect(),
    )
}

fn print_health_rows(h: &Value) {
    for (k, label) in [
        ("is_healthy", "HEALTHY"),
        ("last_check", "LAST_CHECK"),
        ("consecutive_failures", "FAILURES"),
        ("recovery_count", "RECOVERIES"),
        ("last_activity", "LAST_ACTIVITY"),
        ("last_error", "LAST_ERROR"),
    ] {
        let v = match &h[k] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!("{label:<16}{v}");
    }
}

fn config_json(c: &Option<pb::VmConfig>) -> Value {
    let Some(c) = c else { return Value::Null };
    json!({
        "vcpu_count": c.cpu.as_ref().map(|x| x.vcpu_count),
        "memory_bytes": c.memory.as_ref().map(|x| x.size_bytes),
        "kernel_path": c.boot.as_ref().map(|b| b.kernel_path.clone()),
        "initrd_path": c.boot.as_ref().map(|b| b.initrd_path.clone()),
        "kernel_args": c.boot.as_ref().map(|b| b.kernel_args.clone()),
        "storage": c.storage.iter().map(|d| json!({
            "id": d.id, "path": d.path, "read_only": d.read_only, "is_root_device": d.is_root_device
        })).collect::<Vec<_>>(),
        "network": c.network.iter().map(|n| json!({
            "id": n.id, "mac_address": n.mac_address, "tap_device": n.tap_device
        })).collect::<Vec<_>>(),
        "console": c.console.as_ref().map(|x| x.enabled),
        "metadata": c.metadata,
        "restart_policy": match pb::RestartPolicy::try_from(c.restart_policy) {
            Ok(pb::RestartPolicy::Always) => "always",
            Ok(pb::RestartPolicy::Never) => "never",
            _ => "on-failure",
        },
        "auto_recover": c.auto_recover.unwrap_or(true),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Cmd::Generate { out } => generate::run(out), // needs no daemon: before run() connects
        _ => run(cli).await,
    };
    if let Err(e) = result {
        eprintln!("metalctl: {e:#}");
        std::process::exit(1);
    }
}

/// Migrates the VMs `ids`, `parallel` at a time, printing each as it finishes; stops starting
/// new ones at the first failure and fails once those in flight are done.
async fn migrate_all(
    c: &metald_api::Client,
    ids: &[String],
    binary: &str,
    parallel: usize,
) -> Result<()> {
    let total = ids.len();
    let mut queue = ids.iter().cloned();
    let mut running = tokio::task::JoinSet::new();
    let (mut done, mut failed) = (0usize, Vec::new());
    let mut pauses = Vec::new();
    loop {
        while failed.is_empty() && running.len() < parallel {
            let Some(id) = queue.next() else { break };
            let mut c = c.clone();
            let binary = binary.to_string();
            running.spawn(async move {
                let r = c
                    .migrate_vm(pb::MigrateVmRequest {
                        vm_id: id.clone(),
                        vmm_binary: binary,
                        ..Default::default()
                    })
                    .await;
                (id, rpc(r))
            });
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        let (id, res) = joined?;
        done += 1;
        match res {
            Ok(r) => {
                pauses.push(r.handover_ms);
                println!(
                    "[{done}/{total}] {id}  {}  pid {} -> {}  guest pause <= {} ms (vmm downtime {} ms)  total {} ms  {} MiB sent{}",
                    state_name(r.state),
                    r.old_pid,
                    r.new_pid,
                    r.handover_ms,
                    r.vmm_downtime_ms,
                    r.total_ms,
                    r.bytes >> 20,
                    if r.shared_memory {
                        "  shared memory"
                    } else {
                        ""
                    }
                );
            }
            Err(e) => {
                println!("[{done}/{total}] {id}  FAILED: {e:#}");
                failed.push(id);
            }
        }
    }
    pauses.sort_unstable();
    let moved = pauses.len();
    if total > 1 || !failed.is_empty() {
        let max = pauses.last().copied().unwrap_or(0);
        let p50 = pauses.get(moved / 2).copied().unwrap_or(0);
        println!(
            "migrated {moved} of {total}; guest pause p50 {p50} ms, max {max} ms{}",
            if failed.is_empty() {
                String::new()
            } else {
                format!("; stopped at the first failure ({})", failed.join(", "))
            }
        );
    }
    if !failed.is_empty() {
        bail!(
            "{} migration(s) failed; the guests stay in their VMMs",
            failed.len()
        );
    }
    Ok(())
}

/// A size in MiB, for people.
fn mib(bytes: u64) -> String {
    format!("{:.1}MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// Turns a gRPC error into a message that keeps the status code and metald's explanation.
fn rpc<T>(r: std::result::Result<tonic::Response<T>, tonic::Status>) -> Result<T> {
    r.map(tonic::Response::into_inner)
        .map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))
}

async fn run(cli: Cli) -> Result<()> {
    let mut c = metald_api::connect(&cli.endpoint).await?;
    match cli.cmd {
        Cmd::Generate { out } => generate::run(&out)?, // main() calls it without connecting
        Cmd::Create {
            id,
            customer,
            kernel,
            initrd,
            cmdline,
            vcpus,
            memory_mib,
            drive,
            nic,
            metadata,
            no_console,
            restart_policy,
            no_auto_recover,
            vmm,
            vsock_cid,
            guest_probe,
            guest_startup_timeout_ms,
            restore_from,
            from_snapshot,
        } => {
            let restart_policy = match restart_policy.as_str() {
                "always" => pb::RestartPolicy::Always,
                "on-failure" | "on_failure" => pb::RestartPolicy::OnFailure,
                "never" => pb::RestartPolicy::Never,
                other => {
                    bail!("--restart-policy {other:?} is not one of always, on-failure, never")
                }
            } as i32;
            let mut storage = Vec::new();
            for d in &drive {
                let m = kv_list(d, "drive")?;
                storage.push(pb::StorageDevice {
                    id: m.get("id").cloned().unwrap_or_default(),
                    path: m.get("path").cloned().unwrap_or_default(),
                    read_only: m.contains_key("ro"),
                    is_root_device: m.contains_key("root"),
                });
            }
            let mut network = Vec::new();
            for n in &nic {
                let m = kv_list(n, "nic")?;
                network.push(pb::NetworkInterface {
                    id: m.get("id").cloned().unwrap_or_default(),
                    mac_address: m.get("mac").cloned().unwrap_or_default(),
                    tap_device: m.get("tap").cloned().unwrap_or_default(),
                });
            }
            let mut md = BTreeMap::new();
            for kv in &metadata {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--metadata {kv:?} must be KEY=VALUE"))?;
                md.insert(k.to_string(), v.to_string());
            }
            let config = match (kernel, &from_snapshot) {
                (Some(kernel), None) => Some(pb::VmConfig {
                    cpu: Some(pb::CpuConfig { vcpu_count: vcpus }),
                    memory: Some(pb::MemoryConfig {
                        size_bytes: memory_mib.saturating_mul(1024 * 1024),
                    }),
                    boot: Some(pb::BootConfig {
                        kernel_path: kernel.display().to_string(),
                        initrd_path: initrd.map(|p| p.display().to_string()).unwrap_or_default(),
                        kernel_args: cmdline,
                    }),
                    storage,
                    network,
                    console: Some(pb::ConsoleConfig {
                        enabled: !no_console,
                    }),
                    metadata: md,
                    restart_policy,
                    auto_recover: Some(!no_auto_recover),
                    vmm: vmm.unwrap_or_default(),
                    vsock: vsock_cid.map(|guest_cid| pb::VsockConfig { guest_cid }),
                    guest_health: Some(pb::GuestHealthConfig {
                        probe: match guest_probe.as_deref() {
                            None => pb::GuestProbe::Unspecified,
                            Some("none") => pb::GuestProbe::None,
                            Some("agent") => pb::GuestProbe::Agent,
                            Some(other) => {
                                bail!("--guest-probe {other:?} is not one of none, agent")
                            }
                        } as i32,
                        startup_timeout_ms: guest_startup_timeout_ms,
                        ..Default::default()
                    }),
                    restore_from: match restore_from.as_deref() {
                        None => pb::RestoreFrom::Unspecified,
                        Some("none") => pb::RestoreFrom::None,
                        Some("boot-snapshot" | "boot_snapshot") => pb::RestoreFrom::BootSnapshot,
                        Some(other) => {
                            bail!("--restore-from {other:?} is not one of none, boot-snapshot")
                        }
                    } as i32,
                }),
                (Some(_), Some(_)) => bail!("--kernel and --from-snapshot exclude each other"),
                (None, _) => None,
            };
            let req = pb::CreateVmRequest {
                vm_id: id.unwrap_or_default(),
                customer_id: customer,
                config,
                from_snapshot: from_snapshot.unwrap_or_default(),
                ..Default::default()
            };
            let r = rpc(c.create_vm(req).await)?;
            println!("{}", r.vm_id);
        }
        Cmd::Snapshot { id, diff, boot } => {
            let r = rpc(c
                .snapshot_vm(pb::SnapshotVmRequest {
                    vm_id: id,
                    diff,
                    boot,
                    ..Default::default()
                })
                .await)?;
            println!("{} {} {}", r.snapshot_id, r.path, mib(r.size_bytes));
        }
        Cmd::Snapshots { vm, json } => {
            let r = rpc(c
                .list_snapshots(pb::ListSnapshotsRequest {
                    vm_id: vm.unwrap_or_default(),
                })
                .await)?;
            if json {
                let v: Vec<Value> = r
                    .snapshots
                    .iter()
                    .map(|s| {
                        json!({
                            "snapshot_id": s.snapshot_id, "vm_id": s.vm_id, "path": s.path,
                            "created_at": ts(&s.created_at), "size_bytes": s.size_bytes,
                            "boot": s.boot,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<40} {:<20} {:>10} {:<5} CREATED",
                    "SNAPSHOT", "VM", "SIZE", "BOOT"
                );
                for s in &r.snapshots {
                    println!(
                        "{:<40} {:<20} {:>10} {:<5} {}",
                        s.snapshot_id,
                        s.vm_id,
                        mib(s.size_bytes),
                        if s.boot { "yes" } else { "" },
                        ts(&s.created_at)
                    );
                }
            }
        }
        Cmd::DeleteSnapshot { id } => {
            rpc(c
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                })
                .await)?;
            println!("{id} deleted");
        }
        Cmd::WaitReady { id, timeout } => {
            let r = rpc(c
                .wait_guest_ready(pb::WaitGuestReadyRequest {
                    vm_id: id.clone(),
                    timeout_seconds: timeout,
                })
                .await)?;
            println!("{id} guest ready since {}", ts(&r.guest_ready_at));
        }
        Cmd::GuestInfo { id, json } => {
            let r = rpc(c
                .get_guest_info(pb::GetGuestInfoRequest { vm_id: id })
                .await)?;
            let v = json!({
                "agent_version": r.agent_version,
                "os_name": r.os_name,
                "os_version": r.os_version,
                "kernel_release": r.kernel_release,
                "guest_time": ts(&r.guest_time),
                "clock_skew_seconds": r.clock_skew_seconds,
                "ready_for_seconds": r.ready_for_seconds,
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if let Some(m) = v.as_object() {
                for (k, val) in m {
                    let val = val.as_str().map_or_else(|| val.to_string(), str::to_string);
                    println!("{:<20}{val}", k.to_ascii_uppercase());
                }
            }
        }
        Cmd::Boot {
            id,
            wait_ready,
            timeout,
        } => {
            let r = rpc(c
                .boot_vm(pb::BootVmRequest {
                    vm_id: id.clone(),
                    ..Default::default()
                })
                .await)?;
            if wait_ready {
                rpc(c
                    .wait_guest_ready(pb::WaitGuestReadyRequest {
                        vm_id: id.clone(),
                        timeout_seconds: timeout,
                    })
                    .await)?;
                println!("{id} {} (guest ready)", state_name(r.state));
                return Ok(());
            }
            println!("{id} {}", state_name(r.state));
        }
        Cmd::Shutdown { id, force, timeout } => {
            let r = rpc(c
                .shutdown_vm(pb::ShutdownVmRequest {
                    vm_id: id.clone(),
                    force,
                    timeout_seconds: timeout,
                    ..Default::default()
                })
                .await)?;
            println!("{id} {}", state_name(r.state));
        }
        Cmd::Pause { id } => {
            let r = rpc(c
                .pause_vm(pb::PauseVmRequest {
                    vm_id: id.clone(),
                    ..Default::default()
                })
                .await)?;
            println!("{id} {}", state_name(r.state));
        }
        Cmd::Resume { id } => {
            let r = rpc(c
                .resume_vm(pb::ResumeVmRequest {
                    vm_id: id.clone(),
                    ..Default::default()
                })
                .await)?;
            println!("{id} {}", state_name(r.state));
        }
        Cmd::Reboot { id } => {
            let r = rpc(c
                .reboot_vm(pb::RebootVmRequest {
                    vm_id: id.clone(),
                    ..Default::default()
                })
                .await)?;
            println!("{id} {}", state_name(r.state));
        }
        Cmd::Delete { id, force } => {
            rpc(c
                .delete_vm(pb::DeleteVmRequest {
                    vm_id: id.clone(),
                    force,
                    ..Default::default()
                })
                .await)?;
            println!("{id} deleted");
        }
        Cmd::Info { id, json } => {
            let r = rpc(c.get_vm_info(pb::GetVmInfoRequest { vm_id: id }).await)?;
            let vm = r.vm.clone().unwrap_or_default();
            if json {
                let v = json!({
                    "vm_id": vm.vm_id,
                    "customer_id": vm.customer_id,
                    "state": state_name(vm.state),
                    "desired_state": state_name(vm.desired_state),
                    "config": config_json(&vm.config),
                    "vmm": vmm_json(&vm.vmm),
                    "last_exit": vm.last_exit,
                    "orphan_reason": orphan_reason_name(vm.orphan_reason),
                    "orphaned_at": ts(&vm.orphaned_at),
                    "restore_from": vm.restore_from,
                    "created_at": ts(&vm.created_at),
                    "updated_at": ts(&vm.updated_at),
                    "health": health_json(&vm.health),
                    "guest": guest_json(&vm),
                    "recovery_streak": vm.recovery_streak,
                    "recovery_history": history_json(&r),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let cfg = config_json(&vm.config);
                let mut rows: Vec<(String, String)> = vec![
                    ("VM".into(), vm.vm_id.clone()),
                    ("CUSTOMER".into(), vm.customer_id.clone()),
                    ("STATE".into(), state_name(vm.state).into()),
                    ("DESIRED".into(), state_name(vm.desired_state).into()),
                    ("VCPUS".into(), cfg["vcpu_count"].to_string()),
                    (
                        "MEMORY_MIB".into(),
                        (cfg["memory_bytes"].as_i64().unwrap_or(0) / (1024 * 1024)).to_string(),
                    ),
                    (
                        "KERNEL".into(),
                        cfg["kernel_path"].as_str().unwrap_or("").into(),
                    ),
                    (
                        "INITRD".into(),
                        cfg["initrd_path"].as_str().unwrap_or("").into(),
                    ),
                    (
                        "CMDLINE".into(),
                        cfg["kernel_args"].as_str().unwrap_or("").into(),
                    ),
                    (
                        "CREATED".into(),
                        format!("{} ({})", ts(&vm.created_at), ago(&vm.created_at)),
                    ),
                    (
                        "UPDATED".into(),
                        format!("{} ({})", ts(&vm.updated_at), ago(&vm.updated_at)),
                    ),
                ];
                match &vm.vmm {
                    Some(v) => rows.extend([
                        ("VMM".into(), format!("{} ({})", v.kind, v.version)),
                        ("PID".into(), v.pid.to_string()),
                        (
                            "STARTED".into(),
                            format!("{} ({})", ts(&v.start_time), ago(&v.start_time)),
                        ),
                        ("CONTROL_SOCKET".into(), v.control_socket.clone()),
                        ("CONSOLE_LOG".into(), v.console_log.clone()),
                        ("VMM_LOG".into(), v.vmm_log.clone()),
                        ("RUN_DIR".into(), v.run_dir.clone()),
                    ]),
                    None => rows.push(("VMM".into(), "none running".into())),
                }
                if !vm.last_exit.is_empty() {
                    rows.push(("LAST_EXIT".into(), vm.last_exit.clone()));
                }
                let why = orphan_reason_name(vm.orphan_reason);
                if !why.is_empty() {
                    rows.push((
                        "ORPHAN_REASON".into(),
                        format!("{why} (since {})", ts(&vm.orphaned_at)),
                    ));
                }
                if !vm.restore_from.is_empty() {
                    rows.push(("RESTORE_FROM".into(), vm.restore_from.clone()));
                }
                for (k, v) in rows {
                    println!("{k:<16}{v}");
                }
                print_health_rows(&health_json(&vm.health));
                let g = guest_json(&vm);
                println!("{:<16}{}", "GUEST_PROBE", g["probe"].as_str().unwrap_or(""));
                println!(
                    "{:<16}{}",
                    "GUEST_READY",
                    match (g["probe"].as_str(), g["ready"].as_bool().unwrap_or(false)) {
                        (Some("none"), _) => "unprobed".to_string(),
                        (_, true) => format!("yes, since {}", g["ready_at"].as_str().unwrap_or("")),
                        (_, false) => "no".to_string(),
                    }
                );
                if !g["last_error"].as_str().unwrap_or("").is_empty() {
                    println!(
                        "{:<16}{}",
                        "GUEST_ERROR",
                        g["last_error"].as_str().unwrap_or("")
                    );
                }
                println!(
                    "{:<16}{}",
                    "RESTART_POLICY",
                    cfg["restart_policy"].as_str().unwrap_or("")
                );
                println!("{:<16}{}", "AUTO_RECOVER", cfg["auto_recover"]);
                println!("{:<16}{}", "RECOVERY_STREAK", vm.recovery_streak);
                if !r.recovery_history.is_empty() {
                    println!("RECOVERY HISTORY (newest first)");
                    println!(
                        "  {:>3} {:<24} {:>8} {:<8} {:<18} ERROR",
                        "#", "STARTED", "SECS", "OUTCOME", "TRIGGER"
                    );
                    for a in &r.recovery_history {
                        println!(
                            "  {:>3} {:<24} {:>8.3} {:<8} {:<18} {}",
                            a.attempt,
                            ts(&a.started_at),
                            a.duration_seconds,
                            outcome_name(a.outcome),
                            a.trigger,
                            a.error
                        );
                    }
                }
            }
        }
        Cmd::Migrate {
            id,
            all,
            binary,
            max_parallel,
        } => {
            let binary = binary.unwrap_or_default();
            let ids = match (id, all) {
                (Some(id), false) => vec![id],
                (None, true) => {
                    let mut token = String::new();
                    let mut ids = Vec::new();
                    loop {
                        let r = rpc(c
                            .list_vms(pb::ListVmsRequest {
                                state_filter: vec![
                                    pb::VmState::Running as i32,
                                    pb::VmState::Paused as i32,
                                ],
                                page_size: 500,
                                page_token: token,
                            })
                            .await)?;
                        ids.extend(r.vms.into_iter().map(|v| v.vm_id));
                        if r.next_page_token.is_empty() {
                            break;
                        }
                        token = r.next_page_token;
                    }
                    ids
                }
                _ => bail!("give one VM id, or --all"),
            };
            migrate_all(&c, &ids, &binary, max_parallel.max(1)).await?;
        }
        Cmd::Recover { id } => {
            let r = rpc(c
                .recover_vm(pb::RecoverVmRequest {
                    vm_id: id.clone(),
                    ..Default::default()
                })
                .await)?;
            println!("{id} {}", state_name(r.state));
        }
        Cmd::AutoRecover { id, setting } => {
            let enabled = match setting.as_str() {
                "on" | "true" => true,
                "off" | "false" => false,
                other => bail!("auto-recover setting {other:?} must be on or off"),
            };
            let r = rpc(c
                .set_auto_recover(pb::SetAutoRecoverRequest {
                    vm_id: id.clone(),
                    enabled,
                })
                .await)?;
            println!(
                "{id} auto_recover={}",
                if r.auto_recover { "on" } else { "off" }
            );
        }
        Cmd::Host {
            cmd: HostCmd::Status { json },
        } => {
            let r = rpc(c.get_host_status(pb::GetHostStatusRequest {}).await)?;
            let m = r.mode.unwrap_or_default();
            let v = json!({
                "mode": mode_name(m.mode),
                "reason": m.reason,
                "set_by": m.set_by,
                "since": ts(&m.since),
                "free_bytes": r.free_bytes,
                "min_free_bytes": r.min_free_bytes,
                "registry_writable": r.registry_writable,
                "registry_error": r.registry_error,
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if let Some(m) = v.as_object() {
                for (k, v) in m {
                    println!("{:<20}{}", k.to_ascii_uppercase(), v);
                }
            }
        }
        Cmd::Host {
            cmd: HostCmd::Mode { mode, reason },
        } => {
            let who = std::env::var("USER")
                .or_else(|_| std::env::var("LOGNAME"))
                .unwrap_or_default();
            let mode = pb::HostModeKind::from_str_name(&format!(
                "HOST_MODE_KIND_{}",
                mode.to_ascii_uppercase()
            ))
            .filter(|m| *m != pb::HostModeKind::Unspecified)
            .ok_or_else(|| anyhow!("mode: {mode:?} is not one of normal, readonly, maintenance"))?;
            let r = rpc(c
                .set_host_mode(pb::SetHostModeRequest {
                    mode: mode as i32,
                    reason,
                    requested_by: who,
                })
                .await)?;
            let m = r.mode.unwrap_or_default();
            println!(
                "host mode {} ({}; set by {})",
                mode_name(m.mode),
                m.reason,
                m.set_by
            );
        }
        Cmd::Host {
            cmd: HostCmd::Drain { deadline },
        } => {
            let r = rpc(c
                .drain_host(pb::DrainHostRequest {
                    deadline_seconds: deadline,
                })
                .await)?;
            for id in &r.saved {
                println!("saved      {id}");
            }
            for o in &r.shut_down {
                println!("shut down  {} ({})", o.vm_id, o.reason);
            }
            for o in &r.failed {
                println!("FAILED     {} ({})", o.vm_id, o.reason);
            }
            let m = r.mode.unwrap_or_default();
            println!("host mode {} ({})", mode_name(m.mode), m.reason);
            if !r.failed.is_empty() {
                anyhow::bail!(
                    "{} vm(s) could be neither saved nor shut down",
                    r.failed.len()
                );
            }
        }
        Cmd::Host {
            cmd: HostCmd::Undrain,
        } => {
            let r = rpc(c.undrain_host(pb::UndrainHostRequest {}).await)?;
            let m = r.mode.unwrap_or_default();
            println!(
                "host mode {}; saved guests are being restored",
                mode_name(m.mode)
            );
        }
        Cmd::RecoveryStatus { json } => {
            let r = rpc(c.get_recovery_status(pb::GetRecoveryStatusRequest {}).await)?;
            let v = json!({
                "breaker_state": breaker_name(r.breaker_state),
                "breaker_opened_at": ts(&r.breaker_opened_at),
                "in_flight": r.in_flight,
                "max_concurrent": r.max_concurrent,
                "window_attempts": r.window_attempts,
                "window_failures": r.window_failures,
                "auto_recovery_enabled": r.auto_recovery_enabled,
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if let Some(m) = v.as_object() {
                for (k, v) in m {
                    println!("{:<24}{}", k.to_ascii_uppercase(), v);
                }
            }
        }
        Cmd::Events {
            id,
            follow,
            limit,
            json,
        } => {
            let vm_id = id.unwrap_or_default();
            // Subscribe before reading the history so nothing falls between the two.
            let mut live = if follow {
                Some(rpc(c
                    .watch_events(pb::WatchEventsRequest {
                        vm_id: vm_id.clone(),
                    })
                    .await)?)
            } else {
                None
            };
            let past = rpc(c
                .get_vm_events(pb::GetVmEventsRequest {
                    vm_id: vm_id.clone(),
                    after_seq: 0,
                    limit,
                })
                .await)?;
            let mut last_seq = 0;
            for ev in &past.events {
                print_event(ev, json);
                last_seq = last_seq.max(ev.seq);
            }
            if let Some(stream) = live.as_mut() {
                while let Some(ev) = stream
                    .message()
                    .await
                    .map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))?
                {
                    let Some(ev) = ev.event else { continue };
                    if ev.seq != 0 && ev.seq <= last_seq {
                        continue;
                    }
                    print_event(&ev, json);
                }
            }
        }
        Cmd::Console {
            id,
            no_follow,
            tail,
        } => {
            stream_log(&mut c, id, pb::LogKind::Console, !no_follow, tail).await?;
        }
        Cmd::Logs { id, follow, tail } => {
            stream_log(&mut c, id, pb::LogKind::Vmm, follow, tail).await?;
        }
        Cmd::Reconcile => {
            let r = rpc(c.reconcile(pb::ReconcileRequest {}).await)?;
            println!(
                "vms={} recoveries_scheduled={} missed_exits={} converged={} strays_found={} strays_killed={} stale_dirs_removed={} stale_sockets_removed={} duration={:.3}s",
                r.vms,
                r.recoveries_scheduled,
                r.missed_exits,
                r.converged,
                r.strays_found,
                r.strays_killed,
                r.stale_dirs_removed,
                r.stale_sockets_removed,
                r.duration_seconds
            );
        }
        Cmd::Health { id, json } => {
            let r = rpc(c.get_vm_health(pb::GetVmHealthRequest { vm_id: id }).await)?;
            let mut v = health_json(&r.health);
            v["vm_id"] = json!(r.vm_id);
            v["state"] = json!(state_name(r.state));
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<16}{}", "VM", r.vm_id);
                println!("{:<16}{}", "STATE", state_name(r.state));
                print_health_rows(&v);
            }
        }
        Cmd::List { state, json } => {
            let state_filter = state
                .iter()
                .map(|s| parse_state(s))
                .collect::<Result<Vec<_>>>()?;
            let mut token = String::new();
            let mut all = Vec::new();
            loop {
                let r = rpc(c
                    .list_vms(pb::ListVmsRequest {
                        state_filter: state_filter.clone(),
                        page_size: 500,
                        page_token: token,
                    })
                    .await)?;
                all.extend(r.vms);
                if r.next_page_token.is_empty() {
                    break;
                }
                token = r.next_page_token;
            }
            if json {
                let v: Vec<Value> = all
                    .iter()
                    .map(|vm| {
                        let cfg = config_json(&vm.config);
                        json!({
                            "vm_id": vm.vm_id,
                            "customer_id": vm.customer_id,
                            "state": state_name(vm.state),
                            "desired_state": state_name(vm.desired_state),
                            "vcpu_count": cfg["vcpu_count"],
                            "memory_bytes": cfg["memory_bytes"],
                            "guest_ready": vm.guest.as_ref().is_some_and(|g| g.ready),
                            "healthy": vm.health.as_ref().is_some_and(|h| h.is_healthy),
                            "pid": vm.vmm.as_ref().map(|v| v.pid),
                            "created_at": ts(&vm.created_at),
                            "updated_at": ts(&vm.updated_at),
                            "metadata": cfg["metadata"],
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<40} {:<16} {:<9} {:<9} {:>5} {:>8} {:<6} {:<8}",
                    "VM", "CUSTOMER", "STATE", "DESIRED", "VCPUS", "MEM_MIB", "GUEST", "AGE"
                );
                for vm in &all {
                    let cfg = config_json(&vm.config);
                    let guest = match &vm.guest {
                        Some(g) if g.ready => "ready",
                        _ => "-",
                    };
                    println!(
                        "{:<40} {:<16} {:<9} {:<9} {:>5} {:>8} {:<6} {:<8}",
                        vm.vm_id,
                        vm.customer_id,
                        state_name(vm.state),
                        state_name(vm.desired_state),
                        cfg["vcpu_count"],
                        cfg["memory_bytes"].as_i64().unwrap_or(0) / (1024 * 1024),
                        guest,
                        ago(&vm.created_at).trim_end_matches(" ago"),
                    );
                }
            }
        }
    }
    Ok(())
}

/// Copies a VM's log to stdout as StreamLog sends it, raw: a console's escape sequences and
/// partial lines pass as the guest wrote them.
async fn stream_log(
    c: &mut metald_api::Client,
    id: String,
    kind: pb::LogKind,
    follow: bool,
    tail: i64,
) -> Result<()> {
    use std::io::Write;
    let mut stream = rpc(c
        .stream_log(pb::StreamLogRequest {
            vm_id: id,
            kind: kind as i32,
            tail_bytes: tail,
            follow,
        })
        .await)?;
    let mut out = std::io::stdout().lock();
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))?
    {
        out.write_all(&msg.data)?;
        out.flush()?;
    }
    Ok(())
}

fn guest_json(vm: &pb::Vm) -> serde_json::Value {
    let g = vm.guest.clone().unwrap_or_default();
    let probe = match pb::GuestProbe::try_from(g.probe) {
        Ok(pb::GuestProbe::Agent) => "agent",
        _ => "none",
    };
    json!({
        "probe": probe,
        "ready": g.ready,
        "ready_at": ts(&g.ready_at),
        "last_probe": ts(&g.last_probe),
        "consecutive_failures": g.consecutive_failures,
        "last_error": g.last_error,
    })
}
