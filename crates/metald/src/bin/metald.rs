//! The metald daemon: a thin command line over the `metald` library.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use metald::config::{Config, LogFormat};

/// Runs microVMs, one VMM process each, and keeps them running.
#[derive(Debug, Parser)]
#[command(name = "metald", version)]
struct Args {
    /// TOML config file; the flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Registry, run directories and VMM sockets live here. Any length: VMM sockets stay
    /// reachable however long the path is. Only the API socket, by default
    /// <state-dir>/metald.sock, must fit a unix socket address (107 bytes); with a longer
    /// state dir, set --listen.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// API address: unix:PATH (PATH at most 107 bytes) or tcp:HOST:PORT.
    #[arg(long)]
    listen: Option<String>,
    /// QEMU accelerator: kvm or tcg.
    #[arg(long)]
    accel: Option<String>,
    /// The VMM for VMs that do not name one: qemu or firecracker.
    #[arg(long)]
    vmm: Option<String>,
    /// The firecracker binary.
    #[arg(long)]
    firecracker_bin: Option<PathBuf>,
    /// A directory kernels, initrds and drives may come from (repeatable).
    #[arg(long = "asset-dir")]
    asset_dirs: Vec<PathBuf>,
    /// Log format: json or text.
    #[arg(long)]
    log_format: Option<String>,
    /// Operator HTTP endpoint (/metrics, /healthz, /readyz) as HOST:PORT; "" turns it off.
    #[arg(long)]
    metrics_listen: Option<String>,
}

fn main() -> anyhow::Result<()> {
    // Named crash points for tests (feature `failpoints`; FAILPOINTS in the environment).
    let _failpoints = fail::FailScenario::setup();
    let args = Args::parse();
    let mut cfg = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(d) = args.state_dir {
        cfg.state_dir = d;
    }
    if let Some(l) = args.listen {
        cfg.listen = Some(l);
    }
    if let Some(a) = args.accel {
        cfg.accel = a.parse()?;
    }
    if let Some(v) = args.vmm {
        cfg.vmm = v.parse()?;
    }
    if let Some(b) = args.firecracker_bin {
        cfg.firecracker.binary = b;
    }
    if !args.asset_dirs.is_empty() {
        cfg.asset_dirs = args.asset_dirs;
    }
    if let Some(m) = args.metrics_listen {
        cfg.metrics_listen = m;
    }
    if let Some(f) = args.log_format {
        cfg.log_format = f.parse::<LogFormat>()?;
    }
    metald::telemetry::init(cfg.log_format);

    // Two malloc arenas rather than one per thread (glibc's default allows 8 per core): the
    // blocking pool's short-lived threads would each keep an arena of their own, a megabyte or
    // more of RSS apiece, for work that is mostly waiting on SQLite. Set before any thread starts.
    // SAFETY: mallopt takes two integers and only changes the allocator's settings; no other
    // thread exists yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        metald::daemon::run(cfg, shutdown_signal())
            .await
            .context("metald failed")
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon can still be stopped with SIGKILL; VMMs survive it.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
