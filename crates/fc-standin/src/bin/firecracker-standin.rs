//! **TEST STAND-IN for Firecracker — not a VMM.** See the crate docs: it serves Firecracker's
//! API on `--api-sock`, validates each request against the v1.16.1 spec, keeps Firecracker's
//! state rules, and prints the test guest's console lines instead of booting a guest.

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
    st: &Mutex<State>,
    method: &str,
    path: &str,
    body: &Value,
) -> Response<Full<Bytes>> {
    if let Err(e) = spec.validate(method, path, body) {
        return fault(e);
    }
    let Ok(mut s) = st.lock() else {
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
    }));
    // Like the test guest, report uptime now and then once "booted".
    let ticker = state.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let up = ticker
                .lock()
                .ok()
                .and_then(|s| s.started_at.filter(|_| s.run == Run::Running))
                .map(|t| t.elapsed().as_secs_f64());
            if let Some(up) = up {
                console(&format!("METALD-GUEST-ALIVE uptime={up:.2}"));
            }
        }
    });
    rt.block_on(async move {
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
