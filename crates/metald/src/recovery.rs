//! Host-wide protection for automatic recovery: a limit on concurrent recoveries, a circuit
//! breaker over their outcomes, and the backoff schedule.
//!
//! Recovery itself is not here: it is the controller's ordinary reconcile, run again for a VM
//! whose VMM is gone. This module only decides *when* that may happen. When many VMMs die at
//! once, the semaphore turns the stampede into a wave of `max_concurrent`; when recoveries keep
//! failing (a broken image, a full disk, a bad QEMU upgrade), the breaker stops them host-wide
//! instead of burning CPU and logs on restarts that cannot work, and after a cool-off lets one
//! recovery through as a probe.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::Semaphore;
use tracing::{error, info};

use crate::config::RecoveryConfig;

/// The breaker's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Recoveries run.
    Closed,
    /// Recoveries are refused until the cool-off ends.
    Open,
    /// One probe recovery is allowed; its outcome closes or re-opens the breaker.
    HalfOpen,
}

impl BreakerState {
    /// Stable name for logs and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// What the gate says to a VM that wants to recover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead (then take a permit from [`RecoveryGate::semaphore`]).
    Allowed,
    /// Go ahead as the breaker's single probe; report the outcome with `probe = true`.
    Probe,
    /// Not now; ask again after this long.
    Denied(Duration),
}

/// A snapshot of the gate, for the API.
#[derive(Debug, Clone, PartialEq)]
pub struct GateStatus {
    /// The breaker's position.
    pub state: BreakerState,
    /// When it last opened (ms since the epoch), if it is open or half-open.
    pub opened_at_ms: Option<i64>,
    /// Recoveries running now.
    pub in_flight: usize,
    /// The concurrency limit.
    pub max_concurrent: usize,
    /// Attempts in the current window.
    pub window_attempts: usize,
    /// Failed attempts in the current window.
    pub window_failures: usize,
    /// Whether automatic recovery is enabled at all.
    pub enabled: bool,
}

#[derive(Debug)]
struct Breaker {
    state: BreakerState,
    opened_at: Option<(Instant, i64)>,
    probe_in_flight: bool,
    window: VecDeque<(Instant, bool)>,
}

/// The host-wide recovery gate, shared by every controller.
#[derive(Debug)]
pub struct RecoveryGate {
    cfg: RecoveryConfig,
    sem: Arc<Semaphore>,
    breaker: Mutex<Breaker>,
}

impl RecoveryGate {
    /// A gate with this policy.
    pub fn new(cfg: RecoveryConfig) -> Arc<Self> {
        Arc::new(RecoveryGate {
            sem: Arc::new(Semaphore::new(cfg.max_concurrent.max(1))),
            breaker: Mutex::new(Breaker {
                state: BreakerState::Closed,
                opened_at: None,
                probe_in_flight: false,
                window: VecDeque::new(),
            }),
            cfg,
        })
    }

    /// The recovery policy.
    pub fn config(&self) -> &RecoveryConfig {
        &self.cfg
    }

    /// The semaphore that bounds concurrent recoveries. Permits are acquired FIFO, so a mass
    /// failure recovers in arrival order.
    pub fn semaphore(&self) -> Arc<Semaphore> {
        self.sem.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks whether a recovery may start now.
    pub fn admit(&self) -> Admission {
        let mut b = self.lock();
        match b.state {
            BreakerState::Closed => Admission::Allowed,
            BreakerState::Open => {
                let since = b.opened_at.map(|(i, _)| i.elapsed()).unwrap_or_default();
                if since >= self.cfg.breaker.cool_off {
                    b.state = BreakerState::HalfOpen;
                    b.probe_in_flight = true;
                    info!(
                        state = "half_open",
                        "recovery breaker letting one probe through"
                    );
                    Admission::Probe
                } else {
                    Admission::Denied(self.cfg.breaker.cool_off - since)
                }
            }
            BreakerState::HalfOpen if !b.probe_in_flight => {
                b.probe_in_flight = true;
                Admission::Probe
            }
            BreakerState::HalfOpen => Admission::Denied(Duration::from_millis(500)),
        }
    }

    /// Gives back a probe slot that was admitted but not used (the VM was deleted or recovered
    /// by hand meanwhile).
    pub fn release_probe(&self) {
        self.lock().probe_in_flight = false;
    }

    /// Reports a recovery's outcome.
    pub fn record(&self, success: bool, probe: bool) {
        let mut b = self.lock();
        let now = Instant::now();
        let window = self.cfg.breaker.window;
        b.window.push_back((now, success));
        while b
            .window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > window)
        {
            b.window.pop_front();
        }
        if probe {
            b.probe_in_flight = false;
            if success {
                b.state = BreakerState::Closed;
                b.opened_at = None;
                b.window.clear();
                info!(state = "closed", "recovery breaker closed");
            } else {
                b.state = BreakerState::Open;
                b.opened_at = Some((now, crate::store::now_ms()));
                error!(
                    state = "open",
                    reason = "probe failed",
                    "recovery breaker opened"
                );
            }
            return;
        }
        if b.state != BreakerState::Closed {
            return;
        }
        let attempts = b.window.len();
        let failures = b.window.iter().filter(|(_, ok)| !ok).count();
        // Counts of attempts in a window: far below 2^52, so exact as f64.
        #[allow(clippy::cast_precision_loss)]
        let rate = failures as f64 / attempts.max(1) as f64;
        if attempts >= self.cfg.breaker.min_attempts && rate > self.cfg.breaker.failure_rate {
            b.state = BreakerState::Open;
            b.opened_at = Some((now, crate::store::now_ms()));
            error!(
                state = "open",
                attempts,
                failures,
                window_s = window.as_secs(),
                cool_off_s = self.cfg.breaker.cool_off.as_secs(),
                "recovery breaker opened"
            );
        }
    }

    /// The gate's state for the API.
    pub fn status(&self) -> GateStatus {
        let b = self.lock();
        let now = Instant::now();
        let live: Vec<bool> = b
            .window
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= self.cfg.breaker.window)
            .map(|(_, ok)| *ok)
            .collect();
        let max = self.cfg.max_concurrent.max(1);
        GateStatus {
            state: b.state,
            opened_at_ms: b.opened_at.map(|(_, ms)| ms),
            in_flight: max.saturating_sub(self.sem.available_permits()),
            max_concurrent: max,
            window_attempts: live.len(),
            window_failures: live.iter().filter(|ok| !**ok).count(),
            enabled: self.cfg.enabled,
        }
    }

    /// The wait before recovery attempt `n` (1-based): the first is immediate, then
    /// `retry_interval × backoff_factor^(n-2)`, capped at `max_retry_interval`, moved by up to
    /// ±jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        backoff(&self.cfg, attempt, rand::rng().random_range(-1.0..=1.0))
    }
}

/// [`RecoveryGate::backoff`] with the jitter draw `r` in -1..=1 given, for tests.
pub fn backoff(cfg: &RecoveryConfig, attempt: u32, r: f64) -> Duration {
    if attempt <= 1 {
        return Duration::ZERO;
    }
    let exp = i32::try_from(attempt - 2).unwrap_or(i32::MAX);
    let base = cfg.retry_interval.as_secs_f64() * cfg.backoff_factor.max(1.0).powi(exp);
    let capped = base.min(cfg.max_retry_interval.as_secs_f64());
    let j = cfg.jitter.clamp(0.0, 0.5) * r.clamp(-1.0, 1.0);
    Duration::from_secs_f64((capped * (1.0 + j)).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BreakerConfig;

    fn cfg() -> RecoveryConfig {
        RecoveryConfig {
            retry_interval: Duration::from_secs(1),
            backoff_factor: 2.0,
            max_retry_interval: Duration::from_secs(5),
            jitter: 0.1,
            max_concurrent: 2,
            breaker: BreakerConfig {
                window: Duration::from_secs(60),
                min_attempts: 4,
                failure_rate: 0.5,
                cool_off: Duration::from_millis(50),
            },
            ..RecoveryConfig::default()
        }
    }

    #[test]
    fn backoff_schedule() {
        let c = cfg();
        assert_eq!(backoff(&c, 1, 0.0), Duration::ZERO);
        assert_eq!(backoff(&c, 2, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(&c, 3, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(&c, 4, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(&c, 5, 0.0), Duration::from_secs(5));
        assert_eq!(backoff(&c, 50, 0.0), Duration::from_secs(5));
        assert_eq!(backoff(&c, 2, 1.0), Duration::from_millis(1100));
        assert_eq!(backoff(&c, 2, -1.0), Duration::from_millis(900));
    }

    #[test]
    fn breaker_opens_probes_and_closes() {
        let g = RecoveryGate::new(cfg());
        assert_eq!(g.admit(), Admission::Allowed);
        g.record(true, false);
        g.record(false, false);
        g.record(false, false);
        assert_eq!(
            g.status().state,
            BreakerState::Closed,
            "2/3 failed, below min_attempts"
        );
        g.record(false, false);
        assert_eq!(g.status().state, BreakerState::Open, "3/4 failed > 50 %");
        assert!(matches!(g.admit(), Admission::Denied(_)));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(g.admit(), Admission::Probe);
        assert!(
            matches!(g.admit(), Admission::Denied(_)),
            "one probe at a time"
        );
        g.record(false, true);
        assert_eq!(
            g.status().state,
            BreakerState::Open,
            "a failed probe re-opens"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(g.admit(), Admission::Probe);
        g.record(true, true);
        let s = g.status();
        assert_eq!(s.state, BreakerState::Closed);
        assert_eq!(s.window_attempts, 0);
        assert_eq!(g.admit(), Admission::Allowed);
    }
}
