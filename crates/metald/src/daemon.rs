//! Wiring: opens the registry, re-attaches to running VMMs, serves the API, and shuts down
//! gracefully. Graceful shutdown stops accepting calls, lets calls in progress finish, and leaves
//! every VMM running for the next metald to adopt.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tracing::info;

use crate::api::VmApi;
use crate::config::{Config, Listen};
use crate::driver::Drivers;
use crate::error::{Error, Result};
use crate::metrics;
use crate::store::Store;
use crate::supervisor::Supervisor;

/// How long shutdown waits for operations in progress.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// Runs the daemon until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    cfg.validate()?;
    std::fs::create_dir_all(cfg.run_root())
        .map_err(|e| Error::io(format!("creating {}", cfg.run_root().display()), e))?;
    let _lock = lock_state_dir(&cfg)?;
    let store = Store::open(&cfg.db_path())?;
    let drivers = Drivers::from_config(&cfg);
    // A driver that cannot run as configured (a dynamically linked firecracker under the
    // jailer, no cgroup hierarchy) is a start-up error, not a failure at the first create.
    for d in drivers.all() {
        d.check_host().map_err(Error::Config)?;
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
    let sup = Supervisor::new(cfg.clone(), store, drivers, operator_mode);
    let ready = Arc::new(AtomicBool::new(false));
    let metrics_server = if cfg.metrics_listen.is_empty() {
        None
    } else {
        let (l, _) = metrics::bind(&cfg.metrics_listen).await?;
        Some(metrics::serve(l, sup.clone(), ready.clone()))
    };
    // The disk and the registry are looked at before anything is written.
    sup.check_host().await;
    let host_monitor = sup.spawn_host_monitor();
    let report = sup.attach_all().await?;
    // The pass at start: orphans found while re-attaching get their recovery scheduled, and
    // strays and stale files left by the last run are found.
    sup.reconcile_pass().await?;
    let reconciler = sup
        .config()
        .reconcile
        .enabled
        .then(|| sup.spawn_reconciler());
    ready.store(true, Ordering::Release);

    let listen = cfg.listen()?;
    let server = tonic::transport::Server::builder()
        .layer(metrics::ApiMetricsLayer(sup.metrics().clone()))
        .add_service(VmApi::new(sup.clone()).into_server());
    match &listen {
        Listen::Unix(path) => {
            remove_stale_socket(path)?;
            let l = UnixListener::bind(path)
                .map_err(|e| Error::io(format!("binding {}", path.display()), e))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
            info!(listen = %listen, adopted = report.adopted, accel = ?cfg.accel, vmm = cfg.vmm.as_str(), "metald ready");
            server
                .serve_with_incoming_shutdown(UnixListenerStream::new(l), shutdown)
                .await
                .map_err(|e| Error::io("serving gRPC", std::io::Error::other(e)))?;
            let _ = std::fs::remove_file(path);
        }
        Listen::Tcp(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| Error::io(format!("binding {addr}"), e))?;
            let local = l
                .local_addr()
                .map_err(|e| Error::io("reading the bound address", e))?;
            info!(listen = %listen, local_addr = %local, adopted = report.adopted, accel = ?cfg.accel, "metald ready");
            server
                .serve_with_incoming_shutdown(TcpListenerStream::new(l), shutdown)
                .await
                .map_err(|e| Error::io("serving gRPC", std::io::Error::other(e)))?;
        }
    }
    info!("shutting down; vmms keep running");
    host_monitor.abort();
    if let Some(r) = reconciler {
        r.abort();
    }
    if let Some(m) = metrics_server {
        m.abort();
    }
    sup.shutdown(SHUTDOWN_GRACE).await;
    info!("metald stopped");
    Ok(())
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
    // SAFETY: flock takes an fd we own (kept open by `f`) and flags; no memory is passed.
    let ret = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if ret != 0 {
        return Err(Error::Config(format!(
            "state_dir: {} is in use by another metald",
            cfg.state_dir.display()
        )));
    }
    Ok(f)
}
