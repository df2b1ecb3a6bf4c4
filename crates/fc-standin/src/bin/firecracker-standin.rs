//! **TEST STAND-IN for Firecracker — not a VMM.** See the crate docs: it serves Firecracker's
//! API on `--api-sock`, validates each request against the v1.16.1 spec, keeps Firecracker's
//! state rules, and prints the test guest's console lines instead of booting a guest.
//!
//! Where a VM has a vsock device it also stands in for the guest side of it: the device's host
//! socket speaks Firecracker's hybrid vsock handshake (`CONNECT <port>\n` → `OK <port>\n`, or the
//! connection closed when nothing listens on the guest port), and port 1024 answers the subset of
//! the QEMU guest agent protocol metald uses (`guest-sync-delimited`, `guest-ping`, `guest-info`,
//! `guest-get-osinfo`, `guest-get-time`, `guest-shutdown`). Test knobs, none of them Firecracker's:
//! `metald.noagent` on the kernel command line keeps the agent from "starting";
//! `metald.panic_after=N` prints the kernel's panic line N s after start and hangs the "guest"
//! (as `panic=0` does); `metald.agent_stop_after=N` or SIGUSR1 freezes the agent (it reads but
//! never answers), as the test guest's `metald.agent_stop_after` does to the real qemu-ga;
//! `metald.internal_error_after=N` makes the "vCPU" die N s after start the way a real one does
//! on `KVM_EXIT_INTERNAL_ERROR`: the same line in the log set with `PUT /logger`, then exit
//! code 0, as Firecracker v1.16 exits.
//!
//! Like Firecracker it loads only an ELF `vmlinux` at InstanceStart (a bzImage is refused with
//! Firecracker's message). Its snapshots model guest memory as a sparse file: a Full snapshot
//! writes every "page" (a header page and a data page), a Diff only the dirtied data page, and
//! a load refuses a memory file without the header page, where a real guest would come back
//! with holes in its memory.

use std::convert::Infallible;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fc_standin::Spec;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::UnixListener;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    NotStarted,
    Running,
    Paused,
}

struct State {
    id: String,
    run: Run,
    boot_source: bool,
    started_at: Option<Instant>,
    boot_args: String,
    vsock_uds: Option<PathBuf>,
    /// The "guest" hung (after its simulated panic).
    hung: bool,
    /// The kernel set with PUT /boot-source.
    kernel: Option<PathBuf>,
    /// Guest memory size, from PUT /machine-config or the loaded snapshot.
    mem_bytes: u64,
    /// Snapshots taken, for the dirtied "page" a Diff writes.
    generation: u64,
}

/// Firecracker's log, set with PUT /logger.
static LOG: Mutex<Option<PathBuf>> = Mutex::new(None);
/// Firecracker's metrics file, set with PUT /metrics.
static METRICS: Mutex<Option<PathBuf>> = Mutex::new(None);
/// The instance id, for log lines.
static INSTANCE: Mutex<String> = Mutex::new(String::new());

/// Writes a line to the log in Firecracker's format with `show_level`:
/// `2026-11-27T23:57:00.493088692 [<id>:<thread>:<LEVEL>] <message>`.
fn log(thread: &str, msg: &str) {
    log_at(thread, "INFO", msg)
}

/// The civil UTC date and time of `secs` since the epoch.
fn utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn log_at(thread: &str, level: &str, msg: &str) {
    let Some(path) = LOG.lock().ok().and_then(|p| p.clone()) else {
        return;
    };
    let id = INSTANCE.lock().map(|s| s.clone()).unwrap_or_default();
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(path) {
        let _ = writeln!(
            f,
            "{}.{:09} [{id}:{thread}:{level}] {msg}",
            utc(t.as_secs()),
            t.subsec_nanos()
        );
    }
}

/// Firecracker's exit: the log's last words, then the exit code (0 in both of its stop paths).
fn exit_like_firecracker() -> ! {
    log("main", "Vmm is stopping.");
    log("main", "Firecracker exiting successfully. exit_code=0");
    std::process::exit(0);
}

const PAGE: u64 = 4096;
const MEM_HEADER: &[u8] = b"STANDIN-MEM full snapshot\n";

/// SIGUSR1 sets this: the agent stops answering.
static AGENT_FROZEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How long after start the stand-in's "guest agent" takes to listen, like a guest booting.
const AGENT_START: Duration = Duration::from_millis(300);
/// The guest port the agent listens on.
const AGENT_PORT: &str = "1024";

/// Starts the vsock device's host side, as Firecracker does when the microVM starts.
fn start_vsock(st: &Arc<Mutex<State>>) {
    let Some(path) = st.lock().ok().and_then(|s| s.vsock_uds.clone()) else {
        return;
    };
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("firecracker-standin: binding vsock {}: {e}", path.display());
            return;
        }
    };
    let st = st.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(vsock_conn(stream, st.clone()));
        }
    });
}

/// One host-initiated vsock connection: the handshake, then the agent.
async fn vsock_conn(stream: tokio::net::UnixStream, st: Arc<Mutex<State>>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut rd = BufReader::new(stream);
    let mut line = String::new();
    if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
        return;
    }
    let port = line.trim().strip_prefix("CONNECT ").unwrap_or("");
    let listening = st.lock().ok().is_some_and(|s| {
        !s.hung
            && s.run == Run::Running
            && !s
                .boot_args
                .split_whitespace()
                .any(|w| w == "metald.noagent")
            && s.started_at.is_some_and(|t| t.elapsed() >= AGENT_START)
    });
    if port != AGENT_PORT || !listening {
        // Nothing listens on that guest port: Firecracker drops the connection.
        return;
    }
    if rd.get_mut().write_all(b"OK 1073741824\n").await.is_err() {
        return;
    }
    loop {
        line.clear();
        match rd.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let hung = st
            .lock()
            .ok()
            .is_none_or(|s| s.hung || s.run != Run::Running);
        if hung || AGENT_FROZEN.load(std::sync::atomic::Ordering::SeqCst) {
            continue;
        }
        let text: String = line.chars().filter(|c| *c != '\u{ff}').collect();
        let Ok(req) = serde_json::from_str::<Value>(text.trim()) else {
            continue;
        };
        let mut out = Vec::new();
        let ret = match req["execute"].as_str().unwrap_or("") {
            "guest-sync-delimited" => {
                out.push(0xFF);
                json!({ "return": req["arguments"]["id"] })
            }
            "guest-ping" => json!({ "return": {} }),
            "guest-info" => {
                json!({ "return": { "version": "7.2.0-metald-test-standin", "supported_commands": [] } })
            }
            "guest-get-osinfo" => json!({ "return": {
                "name": "metald test guest", "pretty-name": "metald test guest (firecracker stand-in)",
                "version-id": "1", "kernel-release": "standin", "machine": "x86_64" } }),
            "guest-get-time" => {
                let ns = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                json!({ "return": ns as u64 })
            }
            "guest-shutdown" => {
                // The guest powers off and Firecracker exits 0; the agent sends no reply.
                console("METALD-GUEST-POWEROFF");
                std::thread::spawn(|| {
                    std::thread::sleep(Duration::from_millis(20));
                    exit_like_firecracker();
                });
                continue;
            }
            other => {
                json!({ "error": { "class": "CommandNotFound", "desc": format!("The command {other} has not been found") } })
            }
        };
        out.extend_from_slice(ret.to_string().as_bytes());
        out.push(b'\n');
        if rd.get_mut().write_all(&out).await.is_err() {
            return;
        }
    }
}

/// With `metald.panic_after=N` on the command line, the "guest" panics N s after start.
fn schedule_panic(st: &Arc<Mutex<State>>) {
    let after = st.lock().ok().and_then(|s| {
        s.boot_args
            .split_whitespace()
            .find_map(|w| w.strip_prefix("metald.panic_after="))
            .and_then(|n| n.parse::<f64>().ok())
    });
    let stop_agent = st.lock().ok().and_then(|s| {
        s.boot_args
            .split_whitespace()
            .find_map(|w| w.strip_prefix("metald.agent_stop_after="))
            .and_then(|n| n.parse::<f64>().ok())
    });
    let internal_error = st.lock().ok().and_then(|s| {
        s.boot_args
            .split_whitespace()
            .find_map(|w| w.strip_prefix("metald.internal_error_after="))
            .and_then(|n| n.parse::<f64>().ok())
    });
    if let Some(n) = internal_error {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(n.max(0.0)));
            // Firecracker's own line; then it stops, and (as reported on v1.16 hosts) exits 0.
            log_at(
                "fc_vcpu 0",
                "ERROR",
                "Received KVM_EXIT_INTERNAL_ERROR signal",
            );
            log("main", "Killing vCPU threads");
            exit_like_firecracker();
        });
    }
    if let Some(n) = stop_agent {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(n.max(0.0)));
            AGENT_FROZEN.store(true, std::sync::atomic::Ordering::SeqCst);
            console("METALD-GUEST-AGENT-STOPPED");
        });
    }
    let Some(after) = after else { return };
    let st = st.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs_f64(after.max(0.0)));
        if let Ok(mut s) = st.lock() {
            s.hung = true;
        }
        console("[    9.999999] Kernel panic - not syncing: sysrq triggered crash");
    });
}

/// Where guest serial output goes: Firecracker's stdout, or the file set with PUT /serial (as a
/// daemonized, jailed Firecracker needs).
static SERIAL: Mutex<Option<PathBuf>> = Mutex::new(None);

fn console(line: &str) {
    let path = SERIAL.lock().ok().and_then(|p| p.clone());
    match path {
        Some(p) => {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(p)
            {
                let _ = writeln!(f, "{line}");
            }
        }
        None => {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

fn is_elf(kernel: Option<&Path>) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    kernel
        .and_then(|k| std::fs::File::open(k).ok())
        .is_some_and(|mut f| f.read_exact(&mut magic).is_ok() && &magic == b"\x7fELF")
}

/// Writes the "guest memory": a sparse file of `len` bytes; a full snapshot writes the header
/// page and the data page, a diff only the data page.
fn write_memory(path: &Path, len: u64, full: bool, page: &[u8]) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::create(path)?;
    f.set_len(len)?;
    if full {
        f.write_all(MEM_HEADER)?;
    }
    f.seek(SeekFrom::Start(PAGE))?;
    f.write_all(page)?;
    f.sync_all()
}

/// The "guest's" uptime when its memory was saved (in the data page).
fn saved_uptime(path: &Path) -> Option<f64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    f.seek(SeekFrom::Start(PAGE)).ok()?;
    let mut page = vec![0u8; 256];
    let n = f.read(&mut page).ok()?;
    let text = String::from_utf8_lossy(&page[..n]);
    text.split("uptime=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn has_header(path: &Path) -> bool {
    use std::io::Read;
    let mut head = vec![0u8; MEM_HEADER.len()];
    std::fs::File::open(path)
        .is_ok_and(|mut f| f.read_exact(&mut head).is_ok() && head == MEM_HEADER)
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let text = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r
}

fn fault(msg: impl Into<String>) -> Response<Full<Bytes>> {
    reply(
        StatusCode::BAD_REQUEST,
        json!({ "fault_message": msg.into() }),
    )
}

fn handle(
    spec: &Spec,
    st_arc: &Arc<Mutex<State>>,
    method: &str,
    path: &str,
    body: &Value,
) -> Response<Full<Bytes>> {
    if let Err(e) = spec.validate(method, path, body) {
        return fault(e);
    }
    let Ok(mut s) = st_arc.lock() else {
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"fault_message": "poisoned"}),
        );
    };
    let started = s.run != Run::NotStarted;
    let tpl = spec.template(path).unwrap_or_default();
    match (method, tpl.as_str()) {
        ("GET", "/") => reply(
            StatusCode::OK,
            json!({
                "id": s.id,
                "state": match s.run { Run::NotStarted => "Not started", Run::Running => "Running", Run::Paused => "Paused" },
                "vmm_version": "1.16.1-metald-test-standin",
                "app_name": "Firecracker",
            }),
        ),
        ("PUT", "/actions") => match body["action_type"].as_str().unwrap_or("") {
            "InstanceStart" if started => {
                fault("The requested operation is not supported after starting the microVM.")
            }
            "InstanceStart" if !s.boot_source => {
                fault("Cannot start microvm without kernel configuration.")
            }
            "InstanceStart" if !is_elf(s.kernel.as_deref()) => fault(
                "Start microvm error: System configuration error: Cannot load kernel due to \
                 invalid memory configuration or invalid kernel image: Kernel Loader: failed to \
                 load ELF kernel image: Kernel Loader: Invalid Elf magic number",
            ),
            "InstanceStart" => {
                s.run = Run::Running;
                s.started_at = Some(Instant::now());
                console("METALD-GUEST-READY uptime=0.01 (firecracker test stand-in)");
                drop(s);
                start_vsock(st_arc);
                schedule_panic(st_arc);
                reply(StatusCode::NO_CONTENT, Value::Null)
            }
            "SendCtrlAltDel" if s.run != Run::Running => {
                fault("The requested operation is not supported before starting the microVM.")
            }
            "SendCtrlAltDel" => {
                // The guest powers off; Firecracker exits 0 when its guest does.
                console("METALD-GUEST-POWEROFF");
                std::thread::spawn(|| {
                    std::thread::sleep(Duration::from_millis(20));
                    exit_like_firecracker();
                });
                reply(StatusCode::NO_CONTENT, Value::Null)
            }
            _ => reply(StatusCode::NO_CONTENT, Value::Null),
        },
        ("PATCH", "/vm") => match (body["state"].as_str().unwrap_or(""), s.run) {
            ("Paused", Run::Running) => {
                s.run = Run::Paused;
                reply(StatusCode::NO_CONTENT, Value::Null)
            }
            ("Resumed", Run::Paused) => {
                s.run = Run::Running;
                reply(StatusCode::NO_CONTENT, Value::Null)
            }
            (want, _) => fault(format!(
                "The microVM cannot be {want} in its current state."
            )),
        },
        ("PUT", "/snapshot/create") if s.run != Run::Paused => {
            fault("Cannot create snapshot: the microVM is not paused.")
        }
        ("PUT", "/snapshot/create") => {
            let state = PathBuf::from(body["snapshot_path"].as_str().unwrap_or(""));
            let mem = PathBuf::from(body["mem_file_path"].as_str().unwrap_or(""));
            let full = body["snapshot_type"].as_str() != Some("Diff");
            s.generation += 1;
            // The "guest's" clock is part of its memory: a restored guest's uptime goes on.
            let up = s
                .started_at
                .map(|t| t.elapsed().as_secs_f64())
                .unwrap_or(0.0);
            let page = format!("dirty page of generation {} uptime={up:.3}\n", s.generation);
            match write_memory(&mem, s.mem_bytes.max(2 * PAGE), full, page.as_bytes()) {
                Ok(()) => {}
                Err(e) => return fault(format!("Cannot write {}: {e}", mem.display())),
            }
            if std::fs::write(&state, b"firecracker test stand-in vmstate\n").is_err() {
                return fault(format!("Cannot write {}", state.display()));
            }
            reply(StatusCode::NO_CONTENT, Value::Null)
        }
        ("PUT", "/snapshot/load") if started || s.boot_source => fault(
            "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
        ),
        ("PUT", "/snapshot/load") => {
            let state = body["snapshot_path"].as_str().unwrap_or("");
            let mem = body["mem_backend"]["backend_path"]
                .as_str()
                .or(body["mem_file_path"].as_str())
                .unwrap_or("");
            for p in [state, mem] {
                if std::fs::metadata(p).is_err() {
                    return fault(format!("Cannot open snapshot file {p}"));
                }
            }
            if !has_header(Path::new(mem)) {
                return fault(format!(
                    "Load snapshot error: {mem} lacks the pages of a full snapshot (a lone \
                     diff snapshot): the guest would resume with holes in its memory"
                ));
            }
            s.mem_bytes = std::fs::metadata(mem).map(|m| m.len()).unwrap_or(0);
            let up = saved_uptime(Path::new(mem)).unwrap_or(0.0);
            if let Some(uds) = body["vsock_override"]["uds_path"].as_str() {
                s.vsock_uds = Some(PathBuf::from(uds));
            }
            s.boot_source = true;
            s.run = if body["resume_vm"] == true {
                Run::Running
            } else {
                Run::Paused
            };
            s.started_at = Instant::now().checked_sub(Duration::from_secs_f64(up));
            drop(s);
            start_vsock(st_arc);
            reply(StatusCode::NO_CONTENT, Value::Null)
        }
        ("PUT", _) if started => {
            fault("The requested operation is not supported after starting the microVM.")
        }
        ("PUT", "/serial") => {
            if let (Ok(mut p), Some(path)) = (SERIAL.lock(), body["serial_out_path"].as_str()) {
                *p = Some(PathBuf::from(path));
            }
            reply(StatusCode::NO_CONTENT, Value::Null)
        }
        ("PUT", "/boot-source") => {
            // Firecracker opens both files here and answers with its own wording.
            for (k, what) in [
                ("kernel_image_path", "The kernel file cannot be opened: "),
                (
                    "initrd_path",
                    "The initrd file cannot be opened due to invalid path or invalid permissions. ",
                ),
            ] {
                if let Some(p) = body[k].as_str()
                    && let Err(e) = std::fs::File::open(p)
                {
                    return fault(format!("Boot source error: {what}{e}"));
                }
            }
            s.boot_source = true;
            s.kernel = body["kernel_image_path"].as_str().map(PathBuf::from);
            s.boot_args = body["boot_args"].as_str().unwrap_or("").to_string();
            reply(StatusCode::NO_CONTENT, Value::Null)
        }
        ("PUT", "/vsock") => {
            s.vsock_uds = body["uds_path"].as_str().map(PathBuf::from);
            reply(StatusCode::NO_CONTENT, Value::Null)
        }
        ("PUT", "/drives/{drive_id}") => match body["path_on_host"].as_str() {
            Some(p) if std::fs::metadata(p).is_err() => fault(format!("Unable to open drive {p}")),
            _ => reply(StatusCode::NO_CONTENT, Value::Null),
        },
        ("PUT", "/logger" | "/metrics") => {
            let key = if tpl == "/logger" {
                "log_path"
            } else {
                "metrics_path"
            };
            match body[key].as_str() {
                Some(p) if std::fs::OpenOptions::new().append(true).open(p).is_err() => {
                    fault(format!("Cannot open {p}"))
                }
                Some(p) if tpl == "/metrics" => {
                    if let Ok(mut m) = METRICS.lock() {
                        *m = Some(PathBuf::from(p));
                    }
                    reply(StatusCode::NO_CONTENT, Value::Null)
                }
                Some(p) if tpl == "/logger" => {
                    if let Ok(mut l) = LOG.lock() {
                        *l = Some(PathBuf::from(p));
                    }
                    log("main", "Running Firecracker v1.16.1 (metald test stand-in)");
                    reply(StatusCode::NO_CONTENT, Value::Null)
                }
                _ => reply(StatusCode::NO_CONTENT, Value::Null),
            }
        }
        ("PUT", "/machine-config") => {
            s.mem_bytes = body["mem_size_mib"].as_u64().unwrap_or(0) << 20;
            reply(StatusCode::NO_CONTENT, Value::Null)
        }
        ("PUT", _) => reply(StatusCode::NO_CONTENT, Value::Null),
        _ => fault(format!(
            "Invalid request method and/or path: {method} {path}"
        )),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--version") {
        // The real binary's first line, in its format.
        println!("Firecracker v1.16.1-metald-test-standin");
        return;
    }
    let arg = |name: &str| args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
    let (Some(sock), id) = (
        arg("--api-sock"),
        arg("--id").unwrap_or_else(|| "anonymous-instance".into()),
    ) else {
        eprintln!("firecracker-standin: --api-sock is required");
        std::process::exit(1);
    };
    let spec = match Spec::load() {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("firecracker-standin: {e}");
            std::process::exit(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("firecracker-standin: {e}");
            std::process::exit(1);
        }
    };
    if let Ok(mut i) = INSTANCE.lock() {
        *i = id.clone();
    }
    let state = Arc::new(Mutex::new(State {
        id,
        run: Run::NotStarted,
        boot_source: false,
        started_at: None,
        boot_args: String::new(),
        vsock_uds: None,
        hung: false,
        kernel: None,
        mem_bytes: 0,
        generation: 0,
    }));
    // Like the test guest, report uptime now and then once "booted".
    let ticker = state.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let up = ticker
                .lock()
                .ok()
                .and_then(|s| s.started_at.filter(|_| s.run == Run::Running && !s.hung))
                .map(|t| t.elapsed().as_secs_f64());
            if let Some(up) = up {
                console(&format!("METALD-GUEST-ALIVE uptime={up:.2}"));
            }
        }
    });
    rt.block_on(async move {
        if let Ok(mut usr1) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        {
            tokio::spawn(async move {
                while usr1.recv().await.is_some() {
                    AGENT_FROZEN.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
        // Firecracker refuses to start when the socket exists.
        let listener = match UnixListener::bind(&sock) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("firecracker-standin: binding {sock}: {e}");
                std::process::exit(1);
            }
        };
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let spec = spec.clone();
            let state = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let spec = spec.clone();
                    let state = state.clone();
                    async move {
                        let method = req.method().as_str().to_string();
                        let path = req.uri().path().to_string();
                        let bytes = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let resp = if bytes.is_empty() {
                            handle(&spec, &state, &method, &path, &Value::Null)
                        } else {
                            match serde_json::from_slice::<Value>(&bytes) {
                                Ok(body) => handle(&spec, &state, &method, &path, &body),
                                Err(e) => fault(format!("body is not JSON: {e}")),
                            }
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}
