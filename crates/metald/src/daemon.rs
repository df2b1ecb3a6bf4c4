//! Wiring: opens the registry, serves the API (VmService, the gRPC health service and server
//! reflection), re-attaches to running VMMs, and shuts down within a bounded grace.
//!
//! Shutdown (SIGTERM) stops accepting calls, ends every open stream with UNAVAILABLE, lets calls
//! in progress finish within most of `shutdown_grace`, closes what is still open after that,
//! lets the controllers finish within the rest, checkpoints the registry, and leaves every VMM
//! running for the next metald to adopt. It never waits on a client.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::service::interceptor::InterceptedService;
use tracing::{info, warn};

use crate::api::VmApi;
use crate::config::{Config, Listen};
use crate::driver::Drivers;
use crate::error::{Error, Result};
use crate::metrics;
use crate::store::Store;
use crate::supervisor::Supervisor;
use crate::transport::AuthorityFix;

/// Runs the daemon until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    cfg.validate()?;
    match raise_open_file_limit() {
        Ok((soft, hard)) => info!(soft, hard, "open-file limit"),
        Err(e) => warn!(error = %e, "raising the open-file limit failed"),
    }
    std::fs::create_dir_all(cfg.run_root())
        .map_err(|e| Error::io(format!("creating {}", cfg.run_root().display()), e))?;
    let _lock = lock_state_dir(&cfg)?;
    let (store, writer) = Store::open(&cfg.db_path())?;
    let drivers = Drivers::from_config(&cfg);
    // A driver that cannot run as configured (a dynamically linked firecracker under the
    // jailer, no cgroup hierarchy) is a start-up error, not a failure at the first create.
    for d in drivers.all() {
        d.check_host().map_err(Error::Config)?;
        // `--version` is read once, beside the start-up rather than in its way (it execs the
        // VMM binary, tens of milliseconds), so that no API call waits on it later either.
        let d = d.clone();
        tokio::task::spawn_blocking(move || d.version());
    }
    // The mode an operator set survives restarts; metald's own readonly is re-derived below.
    let operator_mode = store.host_mode().await?.unwrap_or_default();
    // A drain ends when metald next starts (the host was rebooted): its guests are restored.
    let mut operator_mode = operator_mode;
    if operator_mode.mode == crate::host::Mode::Maintenance
        && operator_mode.set_by == crate::host::BY_DRAIN
    {
        info!(
            "starting after a host drain: the host is normal again and saved guests are restored"
        );
        operator_mode = crate::host::HostMode {
            set_by: "metald start after a drain".into(),
            ..Default::default()
        };
        store.set_host_mode(&operator_mode).await?;
    }
    let sup = Supervisor::new(cfg.clone(), store, writer, drivers, operator_mode);
    let ready = Arc::new(AtomicBool::new(false));
    let metrics_server = if cfg.metrics_listen.is_empty() {
        None
    } else {
        let (l, _) = metrics::bind(&cfg.metrics_listen).await?;
        Some(metrics::serve(l, sup.clone(), ready.clone()))
    };

    // The API listens from the start, so that a client (or a probe) connecting while metald
    // re-attaches its VMMs learns that it is starting rather than finding no socket: the
    // health service says NOT_SERVING and VmService answers UNAVAILABLE until it is ready.
    let listen = cfg.listen()?;
    // Mutual TLS for a TCP listener: its files are loaded now, and a file that cannot be loaded
    // stops metald here (never a fall-back to plaintext).
    let tls = match (&listen, &cfg.auth.tls) {
        (Listen::Tcp(_), Some(t)) => {
            Some(Arc::new(crate::tls::Tls::load(t).map_err(Error::Config)?))
        }
        _ => None,
    };
    reload_on_sighup(tls.clone())?;
    let (listener, tcp_addr, socket_gid) = bind(&listen, &cfg.auth).await?;
    let auth = Arc::new(crate::auth::Auth::new(cfg.auth.clone(), socket_gid));
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, false).await;
    let gate = {
        let ready = ready.clone();
        move |req: tonic::Request<()>| {
            if ready.load(Ordering::Acquire) {
                Ok(req)
            } else {
                Err(tonic::Status::unavailable(
                    "metald is starting: it is re-attaching its VMMs; retry shortly",
                ))
            }
        }
    };
    // Each reflection service describes its own protocol; each is given the other's too, so
    // that both list every service served.
    let reflection = |other: &'static [u8]| {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(metald_api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(other)
    };
    let reflection_err =
        |e: tonic_reflection::server::Error| Error::Config(format!("reflection: {e}"));
    let router = tonic::transport::Server::builder()
        // Request metadata (headers) is bounded too: metald reads none beyond gRPC's own, and a
        // client's few hundred bytes fit many times over.
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        // Outermost first: the caller is resolved once, then counted (by role) and served.
        .layer(
            tower::ServiceBuilder::new()
                .layer(crate::auth::AuthLayer(auth))
                .layer(metrics::ApiMetricsLayer(sup.metrics().clone())),
        )
        .add_service(InterceptedService::new(
            VmApi::new(sup.clone()).into_server(),
            gate,
        ))
        .add_service(health_service)
        .add_service(
            reflection(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
                .build_v1()
                .map_err(reflection_err)?,
        )
        .add_service(
            reflection(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .build_v1alpha()
                .map_err(reflection_err)?,
        );
    // When the stop began: the grace is counted from there.
    let stop_began: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let signal = {
        let sup = sup.clone();
        let stop_began = stop_began.clone();
        async move {
            shutdown.await;
            let _ = stop_began.set(Instant::now());
            info!("shutting down: ending open streams; vmms keep running");
            sup.begin_stop();
        }
    };
    let serve = async move {
        match listener {
            Listener::Unix(l) => {
                // Every unix-socket connection goes through the :authority fix (transport.rs).
                let incoming = UnixListenerStream::new(l).map(|c| c.map(AuthorityFix::new));
                router.serve_with_incoming_shutdown(incoming, signal).await
            }
            Listener::Tcp(l) => match tls {
                Some(tls) => {
                    router
                        .serve_with_incoming_shutdown(crate::tls::incoming(l, tls), signal)
                        .await
                }
                None => {
                    router
                        .serve_with_incoming_shutdown(TcpListenerStream::new(l), signal)
                        .await
                }
            },
        }
        .map_err(|e| Error::io("serving gRPC", std::io::Error::other(e)))
    };
    tokio::pin!(serve);

    let startup = async {
        // The disk and the registry are looked at before anything is written.
        sup.check_host().await;
        let host_monitor = sup.spawn_host_monitor();
        let trimmer = tokio::spawn(trim_heap_every(sup.config().reconcile.interval));
        let report = sup.attach_all().await?;
        // The pass at start: orphans found while re-attaching get their recovery scheduled,
        // and strays and stale files left by the last run are found.
        sup.reconcile_pass().await?;
        let reconciler = sup
            .config()
            .reconcile
            .enabled
            .then(|| sup.spawn_reconciler());
        Ok::<_, Error>((report, host_monitor, reconciler, trimmer))
    };
    let (report, host_monitor, reconciler, trimmer) = tokio::select! {
        r = startup => r?,
        // The server ended before metald was ready: a stop during start-up, or a failure.
        r = &mut serve => {
            r?;
            info!("stopped while starting; vmms keep running");
            return Ok(());
        }
    };
    ready.store(true, Ordering::Release);
    let health_task = tokio::spawn(follow_health(
        health,
        sup.host().subscribe(),
        sup.stopping(),
    ));
    match tcp_addr {
        None => {
            info!(listen = %listen, adopted = report.adopted, accel = ?cfg.accel, vmm = cfg.vmm.as_str(), "metald ready");
        }
        Some(local) => {
            info!(listen = %listen, local_addr = %local, adopted = report.adopted, accel = ?cfg.accel, vmm = cfg.vmm.as_str(), "metald ready");
        }
    }

    // Calls in progress get most of the grace; the controllers and the registry the rest.
    let grace = cfg.shutdown_grace;
    let mut stopping = sup.stopping();
    let overran = async {
        let _ = stopping.wait_for(|s| *s).await;
        tokio::time::sleep(grace.mul_f64(0.8)).await;
    };
    tokio::select! {
        r = &mut serve => r?,
        () = overran => warn!(grace_ms = crate::model::ms(grace), "calls still in progress at the end of the grace; their connections are closed"),
    }
    if let Listen::Unix(path) = &listen {
        let _ = std::fs::remove_file(path);
    }
    health_task.abort();
    host_monitor.abort();
    trimmer.abort();
    if let Some(r) = reconciler {
        r.abort();
    }
    if let Some(m) = metrics_server {
        m.abort();
    }
    let spent = stop_began.get().map(Instant::elapsed).unwrap_or_default();
    sup.shutdown(grace.saturating_sub(spent).max(Duration::from_millis(200)))
        .await;
    info!(
        duration_ms = stop_began
            .get()
            .map(|t| crate::model::ms(t.elapsed()))
            .unwrap_or(0),
        "metald stopped"
    );
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: each VM holds a few descriptors (its
/// VMM's pidfd, the control connection, the guest agent's connection, a console follower), so a
/// host of a thousand VMs needs several thousand, far above the usual soft default of 1,024.
/// Returns the limits now in force.
fn raise_open_file_limit() -> std::io::Result<(u64, u64)> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    // `None` is unlimited.
    let (cur, max) = (
        lim.current.unwrap_or(u64::MAX),
        lim.maximum.unwrap_or(u64::MAX),
    );
    if cur < max {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        )?;
        return Ok((max, max));
    }
    Ok((cur, max))
}

/// The most request metadata (HTTP/2 header list) a call may carry, in bytes.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// A bound API listener.
enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// Binds the API's socket: a unix socket (a stale one from a metald that did not exit cleanly
/// is replaced; the configured mode and group, returned with the group) or a TCP address
/// (returned with the address it got).
async fn bind(
    listen: &Listen,
    auth: &crate::auth::AuthConfig,
) -> Result<(Listener, Option<std::net::SocketAddr>, Option<u32>)> {
    match listen {
        Listen::Unix(path) => {
            remove_stale_socket(path)?;
            let l = UnixListener::bind(path)
                .map_err(|e| Error::io(format!("binding {}", path.display()), e))?;
            if let Some(group) = &auth.socket_group {
                let gid = group_id(group)?;
                rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid))).map_err(
                    |e| Error::io(format!("chgrp {} {}", group, path.display()), e.into()),
                )?;
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(auth.socket_mode))
                .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
            let gid = std::fs::metadata(path)
                .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
                .gid();
            Ok((Listener::Unix(l), None, Some(gid)))
        }
        Listen::Tcp(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| Error::io(format!("binding {addr}"), e))?;
            let local = l
                .local_addr()
                .map_err(|e| Error::io("reading the bound address", e))?;
            Ok((Listener::Tcp(l), Some(local), None))
        }
    }
}

/// Reloads the TLS files on every SIGHUP (a reload that fails keeps those in use). Without TLS
/// a SIGHUP is logged and ignored: it must not end metald, as its default action would.
fn reload_on_sighup(tls: Option<Arc<crate::tls::Tls>>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).map_err(|e| Error::io("handling SIGHUP", e))?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match tls.as_deref().map(crate::tls::Tls::reload) {
                Some(Ok(())) => info!("sighup: tls certificates reloaded"),
                Some(Err(e)) => {
                    warn!(error = %e, "sighup: tls reload failed; the certificates in use stay");
                }
                None => info!("sighup: nothing to reload"),
            }
        }
    });
    Ok(())
}

/// A group's id from its name (in /etc/group) or its number.
fn group_id(group: &str) -> Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let text =
        std::fs::read_to_string("/etc/group").map_err(|e| Error::io("reading /etc/group", e))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid = f.nth(1)?.parse::<u32>().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| {
            Error::Config(format!(
                "auth.socket_group: no group {group:?} in /etc/group"
            ))
        })
}

/// Sets the health of the API (and of the server as a whole, the empty service name).
async fn set_health(h: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus;
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    h.set_service_status(metald_api::SERVICE_NAME, status).await;
    h.set_service_status("", status).await;
}

/// Keeps the health service in step with metald: SERVING when ready, NOT_SERVING while the
/// host is readonly (calls that change VMs are refused) or metald is stopping.
async fn follow_health(
    h: tonic_health::server::HealthReporter,
    mut mode: tokio::sync::watch::Receiver<crate::host::Mode>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let serving = !*stopping.borrow_and_update()
            && *mode.borrow_and_update() != crate::host::Mode::Readonly;
        set_health(&h, serving).await;
        tokio::select! {
            r = mode.changed() => if r.is_err() { return },
            r = stopping.changed() => if r.is_err() { return },
        }
    }
}

/// Removes a socket file left by a metald that did not exit cleanly; refuses to remove anything
/// that is not a socket.
fn remove_stale_socket(path: &std::path::Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| Error::io(format!("removing stale {}", path.display()), e)),
        Ok(_) => Err(Error::Config(format!(
            "listen: {} exists and is not a socket",
            path.display()
        ))),
        Err(_) => Ok(()),
    }
}

/// Holds an exclusive lock on `<state_dir>/metald.lock` for the daemon's life, so two daemons
/// never drive the same registry and VMMs.
fn lock_state_dir(cfg: &Config) -> Result<std::fs::File> {
    let path = cfg.state_dir.join("metald.lock");
    let f = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(Error::Config(format!(
            "state_dir: {} is in use by another metald",
            cfg.state_dir.display()
        )));
    }
    Ok(f)
}

/// Hands the heap's free pages back to the kernel every `every`. A host of 1,000 VMs allocates
/// and frees a little for every health check, on two worker threads' arenas; glibc gives back
/// only the top of a heap by itself, so without this metald's RSS creeps up by fragments
/// (measured: 50 MiB to 76 MiB over two idle minutes, then on). The walk is short (about a
/// millisecond for 50 MiB of heap) and runs off the runtime.
async fn trim_heap_every(every: std::time::Duration) {
    let mut tick = tokio::time::interval(every.max(std::time::Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // SAFETY: malloc_trim takes a size and only releases free memory of the allocator's
        // own arenas; it is thread-safe (it locks each arena).
        let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
    }
}
