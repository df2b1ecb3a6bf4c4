//! Prometheus metrics and the operator HTTP endpoint (`/metrics`, `/healthz`, `/readyz`).
//!
//! Labels are bounded: reasons, outcomes, states, RPC methods and gRPC codes. No label ever
//! carries a vm_id or customer_id, so the series count does not grow with the fleet; per-VM detail
//! lives in the logs and the event history instead.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};

/// A `reason` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Orphan reason, or restart trigger.
    pub reason: String,
}

/// An `outcome` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `success` or `failure`.
    pub outcome: String,
}

/// The labels of a recovery attempt.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabel {
    /// `success` or `failure`.
    pub outcome: String,
    /// `restart`, `migrate` or `restore`.
    pub method: String,
}

/// A `state` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// A VM state.
    pub state: String,
}

/// The host-mode label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    /// normal, readonly or maintenance.
    pub mode: String,
}

/// API request labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// The RPC method.
    pub method: String,
    /// The gRPC status code.
    pub code: String,
    /// The caller's role (`admin`, `tenant`, `reader`, or `none` when not authenticated).
    pub role: String,
}

/// A `method` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    /// The RPC method.
    pub method: String,
}

/// A `trigger` label: what (re)started a guest.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabel {
    /// `boot`, `recovery` or `restore`.
    pub trigger: String,
}

type GuestHist = Family<TriggerLabel, Histogram, fn() -> Histogram>;

fn guest_ready_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 14))
}

/// Build labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// metald's version.
    pub version: String,
    /// The VMM driver.
    pub vmm: String,
}

type Hist = Family<MethodLabel, Histogram, fn() -> Histogram>;

fn api_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric metald exposes.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `metald_vm_orphaned_total{reason}`
    pub orphaned: Family<ReasonLabel, Counter>,
    /// `metald_vm_recovery_attempts_total{outcome,method}`
    pub recovery_attempts: Family<AttemptLabel, Counter>,
    /// `metald_vm_migrations_total{outcome}`
    pub migrations: Family<OutcomeLabel, Counter>,
    /// `metald_vm_migration_handover_seconds`: from the start of a migration's transfer until
    /// the guest runs in the new VMM (the guest's pause is at most this).
    pub migration_handover: Histogram,
    /// `metald_vm_recovery_success_total`
    pub recovery_success: Counter,
    /// `metald_vm_health_check_failures_total`
    pub health_check_failures: Counter,
    /// `metald_vm_health_checks_total`
    pub health_checks: Counter,
    /// `metald_process_restart_total{reason}`
    pub process_restarts: Family<ReasonLabel, Counter>,
    /// `metald_reconcile_duration_seconds`
    pub reconcile_duration: Histogram,
    /// `metald_reconcile_last_run_timestamp_seconds`
    pub reconcile_last_run: Gauge<i64, AtomicI64>,
    /// `metald_vm_downtime_seconds`: orphaned → running again (→ guest ready again where the
    /// guest is probed).
    pub downtime: Histogram,
    /// `metald_guest_ready_seconds{trigger}`: guest started → first answered probe.
    pub guest_ready: GuestHist,
    /// `metald_guest_probes_total`
    pub guest_probes: Counter,
    /// `metald_guest_probe_failures_total`
    pub guest_probe_failures: Counter,
    /// `metald_vm_recovery_duration_seconds`
    pub recovery_duration: Histogram,
    /// `metald_vms{state}`
    pub vms: Family<StateLabel, Gauge<i64, AtomicI64>>,
    /// `metald_host_mode{mode}`: 1 for the mode in force.
    pub host_mode: Family<ModeLabel, Gauge<i64, AtomicI64>>,
    /// `metald_registry_write_failures_total`
    pub registry_write_failures: Counter,
    /// `metald_recovery_breaker_open`
    pub breaker_open: Gauge<i64, AtomicI64>,
    /// `metald_stray_vmms_total`
    pub strays: Counter,
    /// `metald_api_requests_total{method,code,role}`
    pub api_requests: Family<ApiLabels, Counter>,
    /// `metald_api_request_duration_seconds{method}`
    pub api_latency: Hist,
    /// `metald_build_info{version,vmm}`
    pub build_info: Family<BuildLabels, Gauge<i64, AtomicI64>>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new(vmm: &str) -> Arc<Self> {
        let mut r = Registry::default();
        let m = Metrics {
            orphaned: Family::default(),
            recovery_attempts: Family::default(),
            migrations: Family::default(),
            migration_handover: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            recovery_success: Counter::default(),
            health_check_failures: Counter::default(),
            health_checks: Counter::default(),
            process_restarts: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            reconcile_last_run: Gauge::default(),
            downtime: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            guest_ready: Family::new_with_constructor(guest_ready_histogram as fn() -> Histogram),
            guest_probes: Counter::default(),
            guest_probe_failures: Counter::default(),
            recovery_duration: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            vms: Family::default(),
            host_mode: Family::default(),
            registry_write_failures: Counter::default(),
            breaker_open: Gauge::default(),
            strays: Counter::default(),
            api_requests: Family::default(),
            api_latency: Family::new_with_constructor(api_histogram as fn() -> Histogram),
            build_info: Family::default(),
            registry: Registry::default(),
        };
        // prometheus-client appends `_total` to counter names.
        r.register(
            "metald_vm_orphaned",
            "VMs found orphaned, by reason",
            m.orphaned.clone(),
        );
        r.register(
            "metald_vm_recovery_attempts",
            "Recovery attempts, by outcome and method (restart, migrate, restore)",
            m.recovery_attempts.clone(),
        );
        r.register(
            "metald_vm_recovery_success",
            "Recoveries that brought a VM back",
            m.recovery_success.clone(),
        );
        r.register(
            "metald_vm_migrations",
            "Migrations of a guest to a new VMM process, by outcome",
            m.migrations.clone(),
        );
        r.register(
            "metald_vm_migration_handover_seconds",
            "From the start of a migration's transfer until the guest runs in the new VMM",
            m.migration_handover.clone(),
        );
        r.register(
            "metald_vm_health_check_failures",
            "Failed VMM health checks",
            m.health_check_failures.clone(),
        );
        r.register(
            "metald_vm_health_checks",
            "VMM health checks run",
            m.health_checks.clone(),
        );
        r.register(
            "metald_process_restart",
            "VMM processes restarted by metald, by reason",
            m.process_restarts.clone(),
        );
        r.register(
            "metald_reconcile_duration_seconds",
            "Duration of reconcile passes",
            m.reconcile_duration.clone(),
        );
        r.register(
            "metald_reconcile_last_run_timestamp_seconds",
            "When the last reconcile pass finished (unix time)",
            m.reconcile_last_run.clone(),
        );
        r.register(
            "metald_vm_downtime_seconds",
            "Time from a VM being orphaned to running again (to its guest answering, where probed)",
            m.downtime.clone(),
        );
        r.register(
            "metald_guest_ready_seconds",
            "Time from a guest being started to its first answered probe, by trigger",
            m.guest_ready.clone(),
        );
        r.register(
            "metald_guest_probes",
            "Guest agent probes run",
            m.guest_probes.clone(),
        );
        r.register(
            "metald_guest_probe_failures",
            "Guest agent probes that got no answer in time",
            m.guest_probe_failures.clone(),
        );
        r.register(
            "metald_vm_recovery_duration_seconds",
            "Duration of successful recovery attempts",
            m.recovery_duration.clone(),
        );
        r.register("metald_vms", "VMs by observed state", m.vms.clone());
        r.register(
            "metald_host_mode",
            "1 for the host mode in force (normal, readonly, maintenance)",
            m.host_mode.clone(),
        );
        r.register(
            "metald_registry_write_failures",
            "Registry writes refused (a full disk, an I/O error); the state is kept in memory",
            m.registry_write_failures.clone(),
        );
        r.register(
            "metald_recovery_breaker_open",
            "1 while the recovery circuit breaker is open or half-open",
            m.breaker_open.clone(),
        );
        r.register("metald_stray_vmms", "Stray VMMs found", m.strays.clone());
        r.register(
            "metald_api_requests",
            "gRPC requests, by method and status code",
            m.api_requests.clone(),
        );
        r.register(
            "metald_api_request_duration_seconds",
            "gRPC request latency, by method",
            m.api_latency.clone(),
        );
        r.register(
            "metald_build_info",
            "metald build information",
            m.build_info.clone(),
        );
        m.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
                vmm: vmm.to_string(),
            })
            .set(1);
        Arc::new(Metrics { registry: r, ..m })
    }

    /// Counts an orphaned VM.
    pub fn orphaned(&self, reason: &str) {
        self.orphaned
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts a VMM restart by metald.
    pub fn restarted(&self, reason: &str) {
        self.process_restarts
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts a migration.
    pub fn migration(&self, success: bool) {
        self.migrations
            .get_or_create(&OutcomeLabel {
                outcome: if success { "success" } else { "failure" }.into(),
            })
            .inc();
    }

    /// Counts a recovery attempt made by `method` (`restart`, `migrate`, `restore`).
    pub fn recovery_attempt(&self, success: bool, method: &str) {
        self.recovery_attempts
            .get_or_create(&AttemptLabel {
                outcome: if success { "success" } else { "failure" }.into(),
                method: method.into(),
            })
            .inc();
    }

    /// Records one API call.
    pub fn api(&self, method: &str, role: &str, started: Instant, code: tonic::Code) {
        self.api_requests
            .get_or_create(&ApiLabels {
                method: method.to_string(),
                code: format!("{code:?}"),
                role: role.to_string(),
            })
            .inc();
        self.api_latency
            .get_or_create(&MethodLabel {
                method: method.to_string(),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Sets the per-state VM gauge; states not listed are set to 0.
    pub fn set_vm_counts(&self, counts: &[(String, i64)]) {
        for s in [
            "created", "running", "paused", "shutdown", "orphaned", "failed",
        ] {
            let n = counts
                .iter()
                .find(|(k, _)| k == s)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            self.vms
                .get_or_create(&StateLabel {
                    state: s.to_string(),
                })
                .set(n);
        }
    }

    /// Sets `metald_host_mode{mode}`.
    pub fn host_mode(&self, mode: &str, on: bool) {
        self.host_mode
            .get_or_create(&ModeLabel {
                mode: mode.to_string(),
            })
            .set(i64::from(on));
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            warn!("encoding metrics failed");
        }
        out
    }
}

/// The RPC methods of `metald.v1.VmService`; any other path is counted as `unknown`, so a
/// client sending garbage paths cannot grow the label set.
const METHODS: &[&str] = &[
    "CreateVm",
    "DeleteVm",
    "BootVm",
    "ShutdownVm",
    "PauseVm",
    "ResumeVm",
    "RebootVm",
    "GetVmInfo",
    "ListVms",
    "GetVmHealth",
    "RecoverVm",
    "SetAutoRecover",
    "GetRecoveryStatus",
    "Reconcile",
    "GetVmEvents",
    "WatchEvents",
    "SnapshotVm",
];

/// A tower layer that counts every gRPC call by method and status code and times it.
#[derive(Debug, Clone)]
pub struct ApiMetricsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for ApiMetricsLayer {
    type Service = ApiMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ApiMetricsService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service [`ApiMetricsLayer`] wraps around the gRPC server.
#[derive(Debug, Clone)]
pub struct ApiMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<hyper::Request<B>> for ApiMetricsService<S>
where
    S: tower::Service<hyper::Request<B>, Response = hyper::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<std::result::Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: hyper::Request<B>) -> Self::Future {
        let name = req.uri().path().rsplit('/').next().unwrap_or("");
        let method = METHODS
            .iter()
            .find(|m| **m == name)
            .copied()
            .unwrap_or("unknown");
        let role = req
            .extensions()
            .get::<crate::auth::Authn>()
            .map_or("none", crate::auth::Authn::role_label);
        let started = Instant::now();
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let res = fut.await;
            // An error status travels in the response headers (a trailers-only response); a
            // success carries its status in the trailers, so no header means OK.
            let code = match &res {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(tonic::Code::from_i32)
                    .unwrap_or(tonic::Code::Ok),
                Err(_) => tonic::Code::Unknown,
            };
            metrics.api(method, role, started, code);
            res
        })
    }
}

/// What the HTTP endpoint needs from the daemon.
pub trait Exposer: Send + Sync + 'static {
    /// Refreshes gauges computed at scrape time, then returns the exposition.
    fn scrape(&self) -> impl std::future::Future<Output = String> + Send;
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped.
pub fn serve<E: Exposer>(
    listener: TcpListener,
    exposer: Arc<E>,
    ready: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    continue;
                }
            };
            let exposer = exposer.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let exposer = exposer.clone();
                    let ready = ready.clone();
                    async move { Ok::<_, Infallible>(route(req, &*exposer, &ready).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!(peer = %peer, error = %e, "metrics connection ended");
                }
            });
        }
    })
}

async fn route<E: Exposer>(
    req: Request<Incoming>,
    exposer: &E,
    ready: &AtomicBool,
) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            exposer.scrape().await,
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if ready.load(Ordering::Acquire) => {
            (StatusCode::OK, "text/plain", "ready\n".to_string())
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: registry loading or first reconcile pending\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Binds the metrics listener.
pub async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("binding metrics listener {addr}"), e))?;
    let local = l
        .local_addr()
        .map_err(|e| Error::io("reading the metrics address", e))?;
    info!(metrics_addr = %local, "metrics listening");
    Ok((l, local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_metrics_are_encoded() {
        let m = Metrics::new("qemu");
        m.api("GetVmInfo", "admin", Instant::now(), tonic::Code::NotFound);
        let text = m.encode();
        assert!(
            text.contains(
                "metald_api_requests_total{method=\"GetVmInfo\",code=\"NotFound\",role=\"admin\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("metald_api_request_duration_seconds_count{method=\"GetVmInfo\"} 1"));
    }
}
