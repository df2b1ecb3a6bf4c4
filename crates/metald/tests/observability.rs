//! What operators see: every named metric exposed with bounded labels, /healthz and /readyz, a
//! real Prometheus (Debian's `prometheus`) scraping metald with the shipped rules loaded and
//! seeing an orphan and its recovery, and the shipped rules passing promtool.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use metald_api::v1 as pb;

const EVENT: Duration = Duration::from_secs(20);

const METRICS: &[&str] = &[
    "metald_vm_orphaned_total",
    "metald_vm_recovery_attempts_total",
    "metald_vm_recovery_success_total",
    "metald_vm_health_check_failures_total",
    "metald_vm_health_checks_total",
    "metald_process_restart_total",
    "metald_reconcile_duration_seconds",
    "metald_vm_downtime_seconds",
    "metald_vm_recovery_duration_seconds",
    "metald_vms",
    "metald_recovery_breaker_open",
    "metald_api_requests_total",
    "metald_api_request_duration_seconds",
    "metald_build_info",
];

/// The value of the first sample of `name` whose labels contain `labels`.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && l.contains(labels)
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_is_exposed_with_bounded_labels() {
    let d = Daemon::start().await;
    let addr = d.metrics_addr().await;
    assert_eq!(http_get(&addr, "/healthz").await.0, 200);
    assert_eq!(http_get(&addr, "/readyz").await.0, 200);
    assert_eq!(http_get(&addr, "/nope").await.0, 404);

    let mut c = d.client().await;
    let pid = running_vm(&mut c, "observed-vm").await;
    let mark = d.log_mark();
    signal(pid, libc::SIGKILL);
    d.wait_event(mark, "observed-vm", "vm recovered", EVENT)
        .await;
    // Wait for at least one health check on the new VMM.
    d.wait_log_since(mark, EVENT, |l| l.contains("\"reconcile pass\""))
        .await;
    let _ = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "nope".into(),
        })
        .await;

    let (status, text) = http_get(&addr, "/metrics").await;
    assert_eq!(status, 200);
    for m in METRICS {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{m} "))
                || l.starts_with(&format!("{m}{{"))
                || l.starts_with(&format!("{m}_bucket"))),
            "{m} missing from /metrics:\n{text}"
        );
    }
    assert_eq!(
        sample(&text, "metald_vm_orphaned_total", "reason=\"process_dead\""),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "metald_vm_recovery_success_total", ""),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "metald_vm_recovery_attempts_total",
            "outcome=\"success\""
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "metald_process_restart_total",
            "reason=\"process_dead\""
        ),
        Some(1.0)
    );
    assert_eq!(sample(&text, "metald_vms", "state=\"running\""), Some(1.0));
    assert_eq!(sample(&text, "metald_vms", "state=\"orphaned\""), Some(0.0));
    assert_eq!(sample(&text, "metald_recovery_breaker_open", ""), Some(0.0));
    assert_eq!(
        sample(
            &text,
            "metald_api_requests_total",
            "method=\"GetVmInfo\",code=\"NotFound\",role=\"admin\""
        ),
        Some(1.0)
    );
    assert!(sample(&text, "metald_vm_health_checks_total", "").unwrap_or(0.0) >= 1.0);
    assert_eq!(
        sample(&text, "metald_vm_downtime_seconds_count", ""),
        Some(1.0)
    );

    // No per-VM or per-customer label, by name or by value.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains("vm_id") && !line.contains("customer"),
            "per-VM label: {line}"
        );
        assert!(
            !line.contains("observed-vm") && !line.contains("cust-test"),
            "per-VM value: {line}"
        );
    }
}

/// A Prometheus server on loopback, killed on drop.
struct Prometheus {
    child: Child,
    dir: std::path::PathBuf,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn prom_query(addr: &str, q: &str) -> serde_json::Value {
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let Some((status, body)) = try_http_get(addr, &format!("/api/v1/query?query={enc}")).await
    else {
        return serde_json::Value::Null;
    };
    if status != 200 {
        return serde_json::Value::Null;
    }
    // The body may be chunked; the JSON object is the part between the outer braces.
    let (Some(start), Some(end)) = (body.find('{'), body.rfind('}')) else {
        return serde_json::Value::Null;
    };
    serde_json::from_str(&body[start..=end]).unwrap_or(serde_json::Value::Null)
}

async fn prom_value(addr: &str, q: &str) -> Option<f64> {
    let v = prom_query(addr, q).await;
    v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
}

/// Waits (bounded) for a PromQL expression to reach `at_least`. Prometheus has no push
/// notification for a query result, so this asks once a second, its scrape interval.
async fn wait_prom(addr: &str, q: &str, at_least: f64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if prom_value(addr, q).await.is_some_and(|v| v >= at_least) {
            return true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_sees_orphan_and_recovery_with_rules_loaded() {
    let d = Daemon::start().await;
    let metrics = d.metrics_addr().await;
    let dir = std::path::PathBuf::from(format!("/tmp/mdt-prom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rules = repo_root().join("deploy/prometheus/alerts.yml");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: metald\n    static_configs:\n      - targets: ['{metrics}']\n",
            rules.display()
        ),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package `prometheus`; scripts/deps.sh installs it)");
    let prom = Prometheus { child, dir, addr };

    // Ready, scraping metald, with our rules loaded.
    assert!(
        wait_prom(
            &prom.addr,
            "up{job=\"metald\"}",
            1.0,
            Duration::from_secs(60)
        )
        .await,
        "prometheus never scraped metald"
    );
    let (_, rules_body) = http_get(&prom.addr, "/api/v1/rules").await;
    for alert in [
        "MetaldDown",
        "MetaldVmOrphanedTooLong",
        "MetaldRecoveryBreakerOpen",
        "MetaldReconcileStalled",
    ] {
        assert!(rules_body.contains(alert), "rule {alert} not loaded");
    }
    let before = prom_value(&prom.addr, "sum(metald_vm_orphaned_total)")
        .await
        .unwrap_or(0.0);

    let mut c = d.client().await;
    let pid = running_vm(&mut c, "scraped").await;
    let mark = d.log_mark();
    signal(pid, libc::SIGKILL);
    d.wait_event(mark, "scraped", "vm recovered", EVENT).await;

    assert!(
        wait_prom(
            &prom.addr,
            "sum(metald_vm_orphaned_total{reason=\"process_dead\"})",
            before + 1.0,
            Duration::from_secs(30)
        )
        .await,
        "prometheus did not see the orphan counter move"
    );
    assert!(
        wait_prom(
            &prom.addr,
            "sum(metald_vm_recovery_success_total)",
            1.0,
            Duration::from_secs(30)
        )
        .await,
        "prometheus did not see the recovery counter move"
    );
    assert!(
        wait_prom(
            &prom.addr,
            "metald_vms{state=\"running\"}",
            1.0,
            Duration::from_secs(30)
        )
        .await
    );
    // Nothing is firing on a healthy host.
    let firing = prom_query(&prom.addr, "ALERTS{alertstate=\"firing\"}").await;
    assert_eq!(
        firing["data"]["result"].as_array().map(Vec::len),
        Some(0),
        "{firing}"
    );
    drop(prom);
}

#[test]
fn shipped_alert_rules_pass_promtool() {
    let deploy = repo_root().join("deploy/prometheus");
    let check = Command::new("promtool")
        .args(["check", "rules", "alerts.yml"])
        .current_dir(&deploy)
        .output()
        .expect("promtool (Debian package `prometheus`; scripts/deps.sh installs it)");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let test = Command::new("promtool")
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(&deploy)
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_history_records_the_orphan_and_recovery() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let pid = running_vm(&mut c, "storied").await;
    let mark = d.log_mark();
    signal(pid, libc::SIGKILL);
    d.wait_event(mark, "storied", "vm recovered", EVENT).await;
    let evs = c
        .get_vm_events(pb::GetVmEventsRequest {
            vm_id: "storied".into(),
            after_seq: 0,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let kinds: Vec<String> = evs
        .iter()
        .map(|e| {
            let kind = pb::EventKind::try_from(e.kind).unwrap().as_str_name();
            let state = pb::VmState::try_from(e.state).unwrap().as_str_name();
            format!("{kind}:{state}")
        })
        .collect();
    let want = [
        "EVENT_KIND_ORPHANED:VM_STATE_ORPHANED",
        "EVENT_KIND_RECOVERING:VM_STATE_ORPHANED",
        "EVENT_KIND_STATE_CHANGED:VM_STATE_CREATED",
        "EVENT_KIND_STATE_CHANGED:VM_STATE_RUNNING",
        "EVENT_KIND_RECOVERED:VM_STATE_RUNNING",
    ];
    // Only events that changed the state say what it was before: a recovery attempt does not.
    let recovering = evs.iter().find(|e| e.kind == kind("recovering")).unwrap();
    assert_eq!(recovering.from_state, pb::VmState::Unspecified as i32);
    let orphaned = evs.iter().find(|e| e.kind == kind("orphaned")).unwrap();
    assert_eq!(orphaned.from_state, pb::VmState::Running as i32);
    let mut it = kinds.iter();
    for w in want {
        assert!(
            it.any(|k| k == w),
            "{w} missing or out of order in {kinds:?}"
        );
    }
    assert!(evs.windows(2).all(|w| w[0].seq < w[1].seq));
    let orphan = evs.iter().find(|e| e.kind == kind("orphaned")).unwrap();
    assert_eq!(orphan.reason, "process_dead");
    // Bad input is refused by field.
    let e = c
        .get_vm_events(pb::GetVmEventsRequest {
            vm_id: "../x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("vm_id"));
    let e = c
        .get_vm_events(pb::GetVmEventsRequest {
            limit: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("limit"));
}

/// A client whose HTTP/2 windows are 1 KiB: once it stops reading, metald can send it almost
/// nothing, as with a watcher on a slow link or one that never reads.
async fn narrow_client(sock: &std::path::Path) -> Client {
    metald_api::connect_with(&format!("unix:{}", sock.display()), |e| {
        e.initial_stream_window_size(1024)
            .initial_connection_window_size(1024)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_stops_reading_is_cut_off_and_the_others_see_every_event() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    running_vm(&mut c, "busy").await;
    let mut fast = d
        .client()
        .await
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut slow_client = narrow_client(&d.state_dir.join("metald.sock")).await;
    let mut slow = slow_client
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = c
        .get_vm_events(pb::GetVmEventsRequest {
            vm_id: "busy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .last()
        .map_or(0, |e| e.seq);
    // 200 pause/resume pairs: 400 events, more than a watcher may fall behind (256).
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while seqs.len() < 400 {
            match tokio::time::timeout(Duration::from_secs(30), fast.message()).await {
                Ok(Ok(Some(ev))) => seqs.extend(ev.event.map(|e| e.seq)),
                other => panic!("the reading watcher's stream ended: {other:?}"),
            }
        }
        seqs
    });
    for _ in 0..200 {
        c.pause_vm(pb::PauseVmRequest {
            vm_id: "busy".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.resume_vm(pb::ResumeVmRequest {
            vm_id: "busy".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let seqs = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the reading watcher did not see 400 events")
        .unwrap();
    let want: Vec<i64> = (first + 1..=first + 400).collect();
    assert_eq!(seqs, want, "the reading watcher missed or reordered events");
    // The one that never read gets what it was sent, then a status that says it was cut off.
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        let mut got = 0;
        loop {
            match slow.message().await {
                Ok(Some(_)) => got += 1,
                Ok(None) => panic!("the slow watcher's stream ended without a status"),
                Err(s) => return (got, s),
            }
        }
    })
    .await
    .expect("the slow watcher was never cut off");
    assert_eq!(
        status.1.code(),
        tonic::Code::ResourceExhausted,
        "{:?}",
        status.1
    );
    assert!(
        status.1.message().contains("GetVmEvents"),
        "{}",
        status.1.message()
    );
    assert!(
        status.0 < 400,
        "the slow watcher got all {} events",
        status.0
    );
    // It holds nothing after the cut-off: the daemon and its other watchers carry on.
    c.pause_vm(pb::PauseVmRequest {
        vm_id: "busy".into(),
        ..Default::default()
    })
    .await
    .unwrap();
}
