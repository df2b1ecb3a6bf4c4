//! The host's mode: what metald will do when its own host fails it.
//!
//! * `normal`: everything.
//! * `readonly`: reads and supervision go on (exit detection, health checks, automatic recovery
//!   of existing VMs), but no call that changes a VM's desired state is taken, because it could
//!   not be recorded before it is acknowledged. An operator sets it, or metald does by itself when
//!   the registry refuses a write or free space under the state directory falls below
//!   `[degraded] min_free_bytes`; metald's own readonly ends by itself once a probe write succeeds
//!   and the space is back above the threshold plus a margin.
//! * `maintenance`: no new VMs and no automatic recovery (orphans are reported, not restarted);
//!   operators may still shut down, delete and snapshot VMs.
//!
//! The mode an operator sets is persisted in the registry and survives a restart; metald's own
//! readonly is re-derived from the disk at start-up. Controllers keep their VM's truth in memory
//! whatever the mode, so a full disk never makes metald report a dead VM as running.

use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::model::now_ms;

/// The modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Everything.
    Normal,
    /// Reads and supervision only.
    Readonly,
    /// No new VMs, no automatic recovery.
    Maintenance,
}

impl Mode {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Readonly => "readonly",
            Mode::Maintenance => "maintenance",
        }
    }
}

/// Who set the mode: metald itself (its own readonly).
pub const BY_METALD: &str = "metald";
/// Who set the mode: a host drain (maintenance until the next start of metald or an undrain).
pub const BY_DRAIN: &str = "drain";

/// The host's mode and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMode {
    /// The mode.
    pub mode: Mode,
    /// Why, in words.
    pub reason: String,
    /// Who set it: an operator's identity, or `metald` for an automatic readonly.
    pub set_by: String,
    /// Since when, ms since the epoch.
    pub since_ms: i64,
}

impl Default for HostMode {
    fn default() -> Self {
        HostMode {
            mode: Mode::Normal,
            reason: String::new(),
            set_by: String::new(),
            since_ms: now_ms(),
        }
    }
}

/// The host's state as GetHostStatus shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostStatus {
    /// The mode in force.
    pub mode: HostMode,
    /// Free bytes under the state directory.
    pub free_bytes: u64,
    /// Whether the registry took the last write tried.
    pub registry_writable: bool,
    /// The registry's last write error, if it refused one.
    pub registry_error: String,
}

struct Inner {
    /// What an operator asked for (Normal when nobody did).
    operator: HostMode,
    /// metald's own readonly, while the registry or the disk fails it.
    automatic: Option<HostMode>,
    registry_error: String,
    free_bytes: u64,
}

/// The host's mode, shared by the API, the controllers and the reconcile loop.
pub struct Host {
    inner: Mutex<Inner>,
    state_dir: std::path::PathBuf,
    min_free_bytes: u64,
    metrics: std::sync::Arc<Metrics>,
    /// The mode in force, for those that follow it (the gRPC health service).
    watch: tokio::sync::watch::Sender<Mode>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("mode", &self.mode()).finish()
    }
}

/// Free space needed above `min_free_bytes` before an automatic readonly ends, so that the mode
/// does not flap around the threshold.
const MARGIN_FRACTION: u64 = 10;

impl Host {
    /// A host in `operator`'s mode (read back from the registry).
    pub fn new(
        operator: HostMode,
        state_dir: std::path::PathBuf,
        min_free_bytes: u64,
        metrics: std::sync::Arc<Metrics>,
    ) -> Host {
        let (watch, _) = tokio::sync::watch::channel(Mode::Normal);
        let h = Host {
            watch,
            inner: Mutex::new(Inner {
                operator,
                automatic: None,
                registry_error: String::new(),
                free_bytes: u64::MAX,
            }),
            state_dir,
            min_free_bytes,
            metrics,
        };
        h.export();
        h
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The mode in force: metald's own readonly wins over an operator's normal; an operator's
    /// readonly or maintenance wins over it.
    pub fn mode(&self) -> HostMode {
        let g = self.lock();
        effective(&g)
    }

    /// GetHostStatus.
    pub fn status(&self) -> HostStatus {
        let g = self.lock();
        HostStatus {
            mode: effective(&g),
            free_bytes: g.free_bytes,
            registry_writable: g.registry_error.is_empty(),
            registry_error: g.registry_error.clone(),
        }
    }

    fn export(&self) {
        let m = self.mode().mode;
        for x in [Mode::Normal, Mode::Readonly, Mode::Maintenance] {
            self.metrics.host_mode(x.as_str(), x == m);
        }
        self.watch.send_replace(m);
    }

    /// Follows the mode in force.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Mode> {
        self.watch.subscribe()
    }

    /// Applies `f` to the state and logs and exports a change of the mode in force.
    fn change(&self, f: impl FnOnce(&mut Inner)) {
        let (before, after) = {
            let mut g = self.lock();
            let before = effective(&g);
            f(&mut g);
            (before, effective(&g))
        };
        if before.mode != after.mode || before.reason != after.reason {
            if after.mode == Mode::Normal {
                info!(from = before.mode.as_str(), to = "normal", previous_reason = %before.reason, "host mode changed");
            } else {
                warn!(from = before.mode.as_str(), to = after.mode.as_str(), reason = %after.reason, set_by = %after.set_by, "host mode changed");
            }
            self.export();
        }
    }

    /// An operator's SetHostMode (already persisted by the caller).
    pub fn set_operator(&self, mode: HostMode) {
        self.change(|g| g.operator = mode);
    }

    /// What the operator set, for persistence.
    pub fn operator(&self) -> HostMode {
        self.lock().operator.clone()
    }

    /// The registry refused a write: metald goes readonly by itself until a probe write
    /// succeeds.
    pub fn registry_failed(&self, error: &str) {
        self.change(|g| {
            g.registry_error = error.to_string();
            if g.automatic.is_none() {
                g.automatic = Some(HostMode {
                    mode: Mode::Readonly,
                    reason: format!("registry not writable: {error}"),
                    set_by: BY_METALD.into(),
                    since_ms: now_ms(),
                });
            }
        });
    }

    /// Looks at the disk and the registry (`probe` is the result of a probe write): enters or
    /// leaves metald's own readonly. Called by the reconcile loop and after a refused write.
    pub fn check(&self, probe: std::result::Result<(), String>) {
        let free = free_bytes(&self.state_dir).unwrap_or(u64::MAX);
        let low = free < self.min_free_bytes;
        let margin = self.min_free_bytes + self.min_free_bytes / MARGIN_FRACTION;
        self.change(|g| {
            g.free_bytes = free;
            match &probe {
                Ok(()) => g.registry_error.clear(),
                Err(e) => g.registry_error = e.clone(),
            }
            let why = if let Err(e) = &probe {
                Some(format!("registry not writable: {e}"))
            } else if low {
                Some(format!(
                    "free space under the state directory is {free} bytes, below {} ([degraded] min_free_bytes)",
                    self.min_free_bytes
                ))
            } else {
                None
            };
            match (why, &g.automatic) {
                (Some(reason), None) => {
                    g.automatic = Some(HostMode {
                        mode: Mode::Readonly,
                        reason,
                        set_by: BY_METALD.into(),
                        since_ms: now_ms(),
                    })
                }
                (Some(_), Some(_)) => {}
                // Leaves only with the margin above the threshold, so that it does not flap.
                (None, Some(_)) if free >= margin => g.automatic = None,
                (None, _) => {}
            }
        });
    }

    /// Refuses a call that changes a VM's desired state unless the host takes changes.
    pub fn allow_change(&self) -> Result<()> {
        let m = self.mode();
        match m.mode {
            Mode::Readonly => Err(Error::HostMode(format!(
                "host is readonly ({}; set by {}): only reads are served",
                m.reason, m.set_by
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses a new VM unless the host is normal.
    pub fn allow_new_vm(&self) -> Result<()> {
        self.allow_change()?;
        let m = self.mode();
        if m.mode == Mode::Maintenance {
            return Err(Error::FailedPrecondition(format!(
                "host is in maintenance ({}; set by {}): no new VMs",
                m.reason, m.set_by
            )));
        }
        Ok(())
    }

    /// Whether automatic recovery may restart VMs (not in maintenance).
    pub fn recovery_allowed(&self) -> bool {
        self.mode().mode != Mode::Maintenance
    }
}

fn effective(g: &Inner) -> HostMode {
    match (&g.automatic, g.operator.mode) {
        (_, Mode::Readonly | Mode::Maintenance) => g.operator.clone(),
        (Some(a), Mode::Normal) => a.clone(),
        (None, Mode::Normal) => g.operator.clone(),
    }
}

/// Free bytes available to metald on the file system holding `dir`.
pub fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}
