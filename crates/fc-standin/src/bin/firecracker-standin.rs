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
//! never answers), as the test guest's `metald.agent_stop_after` does to the real qemu-ga.

use std::convert::Infallible;
use std::io::Write;
use std::path::PathBuf;
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
}

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
                    std::process::exit(0);
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
                    std::process::exit(0);
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
            for k in ["snapshot_path", "mem_file_path"] {
                let p = PathBuf::from(body[k].as_str().unwrap_or(""));
                if std::fs::write(&p, b"firecracker test stand-in snapshot\n").is_err() {
                    return fault(format!("Cannot write {}", p.display()));
                }
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
            s.boot_source = true;
            s.run = if body["resume_vm"] == true {
                Run::Running
            } else {
                Run::Paused
            };
            s.started_at = Some(Instant::now());
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
            for k in ["kernel_image_path", "initrd_path"] {
                if let Some(p) = body[k].as_str()
                    && std::fs::metadata(p).is_err()
                {
                    return fault(format!(
                        "Cannot open {k} {p}: No such file or directory (os error 2)"
                    ));
                }
            }
            s.boot_source = true;
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
                _ => reply(StatusCode::NO_CONTENT, Value::Null),
            }
        }
        ("PUT", _) => reply(StatusCode::NO_CONTENT, Value::Null),
        _ => fault(format!(
            "Invalid request method and/or path: {method} {path}"
        )),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
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
    let state = Arc::new(Mutex::new(State {
        id,
        run: Run::NotStarted,
        boot_source: false,
        started_at: None,
        boot_args: String::new(),
        vsock_uds: None,
        hung: false,
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
