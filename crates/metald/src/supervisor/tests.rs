//! The supervisor and its controllers in process, on the scripted fake driver
//! ([`crate::driver::fake`]): each test is one order of events that real QEMU cannot produce on
//! demand. The fake VMMs are real processes, so exits, pidfds and reaping are the kernel's; the
//! registry is real SQLite. Every wait is on an event, and bounded.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::broadcast;

use super::Supervisor;
use crate::config::Config;
use crate::driver::Drivers;
use crate::driver::fake::FakeVmmDriver;
use crate::model::{Desired, RestartPolicy, Target, Transition, VmId, VmSpec, VmState};
use crate::recovery::BreakerState;
use crate::store::{EventRecord, Store, VmRecord};

const WAIT: Duration = Duration::from_secs(20);

/// A supervisor on the fake driver in its own state directory; kills its fake VMMs and removes
/// the directory when dropped, whether the test passed or not.
struct Rig {
    sup: Arc<Supervisor>,
    fake: Arc<FakeVmmDriver>,
    dir: PathBuf,
    events: broadcast::Receiver<EventRecord>,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn state_dir() -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("metald-sup-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn config(dir: &std::path::Path) -> Config {
    let mut cfg = Config {
        state_dir: dir.to_path_buf(),
        ..Config::default()
    };
    cfg.health.interval = Duration::from_millis(100);
    cfg.health.timeout = Duration::from_millis(2000);
    cfg.health.jitter = 0.0;
    cfg.recovery.enabled = true;
    cfg.recovery.retry_interval = Duration::from_millis(50);
    cfg.recovery.jitter = 0.0;
    cfg.recovery.max_retries = 100;
    cfg.degraded.min_free_bytes = 0;
    cfg
}

impl Rig {
    async fn start(dir: PathBuf, tweak: impl FnOnce(&mut Config)) -> Rig {
        let mut cfg = config(&dir);
        tweak(&mut cfg);
        std::fs::create_dir_all(cfg.run_root()).unwrap();
        let (store, writer) = Store::open(&cfg.db_path()).unwrap();
        let fake = FakeVmmDriver::new();
        let drivers = Drivers::with_drivers(cfg.vmm, fake.clone(), fake.clone());
        let sup = Supervisor::new(cfg, store, writer, drivers, Default::default());
        let events = sup.events().subscribe();
        sup.attach_all().await.unwrap();
        Rig {
            sup,
            fake,
            dir,
            events,
        }
    }

    async fn new(tweak: impl FnOnce(&mut Config)) -> Rig {
        Self::start(state_dir(), tweak).await
    }

    async fn running(&self, id: &str) -> VmRecord {
        let vm = VmId::parse("vm_id", id).unwrap();
        self.sup
            .create(Some(vm.clone()), "t".into(), spec(), None)
            .await
            .unwrap();
        self.sup
            .transition(&vm, Transition::Boot, None)
            .await
            .unwrap()
    }

    /// Waits (bounded) for the next event of `vm` of this kind; returns it.
    async fn event(&mut self, vm: &str, kind: &str) -> EventRecord {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Ok(e) if e.vm_id == vm && e.kind == kind => return e,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => panic!("event bus closed"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {kind} event for {vm} within {WAIT:?}"))
    }

    fn id(vm: &str) -> VmId {
        VmId::parse("vm_id", vm).unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.fake.kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spec() -> VmSpec {
    VmSpec {
        vcpus: 1,
        memory_bytes: 128 << 20,
        kernel: PathBuf::from("/nonexistent/vmlinux"),
        initrd: None,
        kernel_args: String::new(),
        drives: Vec::new(),
        nics: Vec::new(),
        console: false,
        metadata: Default::default(),
        restart_policy: RestartPolicy::OnFailure,
        auto_recover: true,
        vmm: None,
        vsock_cid: None,
        guest_health: Default::default(),
        vmm_binary: None,
        restore_from: Default::default(),
    }
}

/// Creates VM `id` and boots it; the boot reaches the VMM and waits there, the VMM dies (and
/// with `closes`, the boot fails as a VMM dying under it does: its connection closed), then
/// the boot answers. Returns the dead VMM's pid and the boot's answer.
async fn boot_with_the_vmm_killed_under_it(
    rig: &Rig,
    id: &str,
    closes: bool,
) -> (i32, crate::error::Result<crate::store::VmRecord>) {
    let vm = Rig::id(id);
    rig.sup
        .create(Some(vm.clone()), "t".into(), spec(), None)
        .await
        .unwrap();
    let first = rig.fake.pid_of(id).unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *rig.fake.boot_gate.lock().unwrap() = Some(gate.clone());
    let waiting = rig.fake.boot_waiting.notified();
    let sup = rig.sup.clone();
    let boot = tokio::spawn(async move { sup.transition(&vm, Transition::Boot, None).await });
    tokio::time::timeout(WAIT, waiting).await.unwrap();
    assert!(rig.fake.kill_vm(id));
    rig.fake.script(|s| s.boot_closes = closes);
    *rig.fake.boot_gate.lock().unwrap() = None;
    gate.add_permits(1);
    let answer = tokio::time::timeout(WAIT, boot).await.unwrap().unwrap();
    rig.fake.script(|s| s.boot_closes = false);
    (first, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_during_a_boot_is_an_orphan_not_a_running_vm() {
    let mut rig = Rig::new(|_| {}).await;
    let vm = Rig::id("b1");
    let (first, _) = boot_with_the_vmm_killed_under_it(&rig, "b1", false).await;
    // The exit is seen after the boot's answer: orphaned, then recovered on a new VMM.
    let orphaned = rig.event("b1", "orphaned").await;
    assert_eq!(orphaned.reason, "process_dead");
    rig.event("b1", "recovered").await;
    let rec = rig.sup.get(&vm).await.unwrap();
    assert_eq!(rec.observed, VmState::Running);
    let pid = rec.endpoint.map(|e| e.pid).unwrap();
    assert_ne!(pid, first, "recovered onto the dead VMM");
    assert_eq!(rig.fake.pid_of("b1"), Some(pid));
    assert_eq!(rig.fake.spawns("b1"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_that_dies_under_a_boot_is_an_exit_recovered_at_once() {
    // As a QEMU killed at its memory limit while it starts its guest: the boot fails because
    // the connection closed, and the process is gone. That is an exit (cause and all, then
    // recovery), not a VMM metald stops for failing to converge.
    let mut rig = Rig::new(|_| {}).await;
    let vm = Rig::id("c1");
    let (first, answer) = boot_with_the_vmm_killed_under_it(&rig, "c1", true).await;
    assert!(answer.is_err(), "a boot whose VMM died answered {answer:?}");
    let orphaned = rig.event("c1", "orphaned").await;
    assert_eq!(orphaned.reason, "process_dead");
    rig.event("c1", "recovered").await;
    let rec = rig.sup.get(&vm).await.unwrap();
    assert_eq!(rec.observed, VmState::Running);
    assert_ne!(rec.endpoint.map(|e| e.pid), Some(first));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_during_a_recovery_backoff_wins() {
    // The first attempt fails; the second waits out a long backoff, during which the VM is
    // deleted.
    let mut rig = Rig::new(|c| c.recovery.retry_interval = Duration::from_secs(30)).await;
    let vm = Rig::id("d1");
    rig.running("d1").await;
    rig.fake.script(|s| s.fail_spawns = 1);
    assert!(rig.fake.kill_vm("d1"));
    rig.event("d1", "recovery_failed").await;
    assert_eq!(rig.fake.spawns("d1"), 2);
    rig.sup.delete(&vm, None).await.unwrap();
    rig.event("d1", "deleted").await;
    // Gone from every read, with no controller left to start it again.
    assert!(rig.sup.get(&vm).await.is_err());
    assert!(rig.sup.all_live().iter().all(|r| r.vm_id != vm));
    assert!(rig.sup.handle(&vm).is_err());
    assert_eq!(rig.sup.recovery_status().in_flight, 0);
    assert_eq!(rig.fake.spawns("d1"), 2);
    assert_eq!(rig.fake.pid_of("d1"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opens_mid_wave_and_holds_the_rest_until_a_probe_succeeds() {
    let mut rig = Rig::new(|c| {
        c.recovery.max_concurrent = 1;
        c.recovery.breaker.min_attempts = 3;
        c.recovery.breaker.failure_rate = 0.5;
        c.recovery.breaker.window = Duration::from_secs(60);
        c.recovery.breaker.cool_off = Duration::from_millis(1500);
    })
    .await;
    let ids: Vec<String> = (0..6).map(|i| format!("w{i}")).collect();
    for id in &ids {
        rig.running(id).await;
    }
    // Every VMM dies at once and nothing can be started: the wave's first attempts fail, and
    // after three failures the breaker opens with VMs still waiting.
    rig.fake.script(|s| s.fail_all_spawns = true);
    for id in &ids {
        assert!(rig.fake.kill_vm(id));
    }
    let mut failures = 0;
    tokio::time::timeout(WAIT, async {
        while rig.sup.recovery_status().state != BreakerState::Open {
            match rig.events.recv().await {
                Ok(e) if e.kind == "recovery_failed" => failures += 1,
                _ => {}
            }
        }
    })
    .await
    .expect("the breaker never opened");
    let tried: usize = ids.iter().map(|i| rig.fake.spawns(i)).sum::<usize>() - ids.len();
    assert!(
        (3..ids.len()).contains(&tried),
        "{tried} attempts before the breaker opened: it should open mid-wave"
    );
    assert!(failures >= 3);
    let waiting = ids.iter().filter(|i| rig.fake.spawns(i) == 1).count();
    assert!(
        waiting > 0,
        "no VM was still waiting when the breaker opened"
    );
    // Spawns work again: after the cool-off one probe goes through, closes the breaker, and
    // every VM comes back.
    rig.fake.script(|s| s.fail_all_spawns = false);
    let mut recovered = std::collections::HashSet::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while recovered.len() < ids.len() {
            if let Ok(e) = rig.events.recv().await
                && e.kind == "recovered"
            {
                recovered.insert(e.vm_id);
            }
        }
    })
    .await
    .expect("not every VM recovered after the breaker closed");
    assert_eq!(rig.sup.recovery_status().state, BreakerState::Closed);
    for id in &ids {
        let rec = rig.sup.get(&Rig::id(id)).await.unwrap();
        assert_eq!(rec.observed, VmState::Running, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_racing_a_pause_is_not_taken_for_drift() {
    // Each ping reads the VMM's state when it is asked and answers 300 ms later, so a ping in
    // flight when the pause comes carries the state from before it.
    let rig = Rig::new(|_| {}).await;
    let vm = Rig::id("p1");
    rig.running("p1").await;
    rig.fake
        .script(|s| s.ping_delay = Duration::from_millis(300));
    let before = rig.fake.seen().pings;
    let paused = rig
        .sup
        .transition(&vm, Transition::Pause, None)
        .await
        .unwrap();
    assert_eq!(paused.observed, VmState::Paused);
    // Two more pings answered after the pause: the record still says paused.
    tokio::time::timeout(WAIT, async {
        loop {
            let answered = rig.fake.ping_answered.notified();
            if rig.fake.seen().pings >= before + 3 {
                return;
            }
            answered.await;
        }
    })
    .await
    .expect("pings stopped");
    let rec = rig.sup.get(&vm).await.unwrap();
    assert_eq!(
        rec.observed,
        VmState::Paused,
        "a stale ping was taken for drift"
    );
    assert_eq!(rec.desired, Desired::State(Target::Paused));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_between_a_registry_write_and_its_action_converges() {
    // metald wrote that the VM should run, and died before it started a VMM: the row says
    // desired running, observed created, no VMM.
    let dir = state_dir();
    {
        let cfg = config(&dir);
        std::fs::create_dir_all(cfg.run_root()).unwrap();
        let (store, writer) = Store::open(&cfg.db_path()).unwrap();
        let now = crate::model::now_ms();
        let rec = VmRecord {
            vm_id: Rig::id("r1"),
            customer_id: "t".into(),
            spec: spec(),
            desired: Desired::State(Target::Running),
            observed: VmState::Created,
            endpoint: None,
            last_exit: None,
            health: Default::default(),
            orphan_reason: None,
            orphaned_at_ms: None,
            recovery_streak: 0,
            guest: Default::default(),
            saved: None,
            created_at_ms: now,
            updated_at_ms: now,
        };
        store.insert(&writer, rec).await.unwrap();
    }
    let rig = Rig::start(dir, |_| {}).await;
    let report = rig.sup.reconcile_pass().await.unwrap();
    assert_eq!(report.converged, 1);
    let rec = rig.sup.get(&Rig::id("r1")).await.unwrap();
    assert_eq!(rec.observed, VmState::Running);
    assert_eq!(rig.fake.spawns("r1"), 1);
    assert_eq!(rig.fake.seen().boots.get("r1"), Some(&1));
    assert_eq!(
        rig.fake.pid_of("r1"),
        rec.endpoint.map(|e| e.pid),
        "the VM runs on the VMM it records"
    );
}
