//! metalctl against a real metald: every subcommand, readable tables, `--json`, and errors on
//! stderr with a non-zero exit.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../metald/tests/common/mod.rs"]
mod common;

use std::process::Output;

use common::*;

fn ctl(d: &Daemon, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_metalctl"))
        .arg("--endpoint")
        .arg(format!("unix:{}", d.sock.display()))
        .args(args)
        .output()
        .expect("running metalctl")
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "metalctl failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metalctl_drives_a_vm_end_to_end() {
    let d = Daemon::start().await;
    let g = guest_dir();
    let kernel = g.join("vmlinux").display().to_string();
    let initrd = g.join("initrd.img").display().to_string();
    let out = ok(ctl(
        &d,
        &[
            "create",
            "--id",
            "cli-vm",
            "--customer",
            "acme",
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--cmdline",
            "quiet",
            "--vcpus",
            "1",
            "--memory-mib",
            "160",
            "--metadata",
            "team=infra",
        ],
    ));
    assert_eq!(out.trim(), "cli-vm");
    // A generated id when none is given.
    let gen_id = ok(ctl(&d, &["create", "--kernel", &kernel]))
        .trim()
        .to_string();
    assert!(gen_id.starts_with("vm-") && gen_id.len() > 10, "{gen_id}");

    assert_eq!(ok(ctl(&d, &["boot", "cli-vm"])).trim(), "cli-vm RUNNING");
    assert_eq!(ok(ctl(&d, &["pause", "cli-vm"])).trim(), "cli-vm PAUSED");
    assert_eq!(ok(ctl(&d, &["resume", "cli-vm"])).trim(), "cli-vm RUNNING");
    assert_eq!(ok(ctl(&d, &["reboot", "cli-vm"])).trim(), "cli-vm RUNNING");

    let table = ok(ctl(&d, &["info", "cli-vm"]));
    for want in [
        "STATE           RUNNING",
        "CUSTOMER        acme",
        "MEMORY_MIB      160",
        "PID ",
        "CONTROL_SOCKET",
        "CONSOLE_LOG",
    ] {
        assert!(table.contains(want), "info table lacks {want:?}:\n{table}");
    }
    let j: serde_json::Value =
        serde_json::from_str(&ok(ctl(&d, &["info", "cli-vm", "--json"]))).unwrap();
    assert_eq!(j["state"], "RUNNING");
    assert_eq!(j["config"]["memory_bytes"], 160 << 20);
    assert_eq!(j["config"]["metadata"]["team"], "infra");
    assert!(j["vmm"]["pid"].as_i64().is_some_and(|p| p > 0), "{j}");
    // Times are RFC 3339, not epoch seconds.
    let created = j["created_at"].as_str().unwrap();
    assert!(
        created.len() == 24 && created.ends_with('Z') && created.as_bytes()[10] == b'T',
        "{created}"
    );
    assert!(
        table.contains(" ago)"),
        "the info table gives ages:
{table}"
    );

    let list = ok(ctl(&d, &["list"]));
    assert!(list.lines().next().unwrap().starts_with("VM "), "{list}");
    assert!(list.contains("cli-vm") && list.contains(&gen_id), "{list}");
    let lj: serde_json::Value =
        serde_json::from_str(&ok(ctl(&d, &["list", "--state", "running", "--json"]))).unwrap();
    let ids: Vec<&str> = lj
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vm_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["cli-vm"]);

    assert_eq!(
        ok(ctl(&d, &["shutdown", "cli-vm", "--force"])).trim(),
        "cli-vm SHUTDOWN"
    );
    assert_eq!(ok(ctl(&d, &["delete", "cli-vm"])).trim(), "cli-vm deleted");
    ok(ctl(&d, &["delete", &gen_id, "--force"]));

    // Errors: stderr, non-zero exit, the status code and metald's message.
    let e = ctl(&d, &["info", "cli-vm"]);
    assert!(!e.status.success());
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(msg.contains("NotFound") && msg.contains("cli-vm"), "{msg}");
    assert!(e.stdout.is_empty());
    let e = ctl(&d, &["create", "--id", "../x", "--kernel", &kernel]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("vm_id"));
    let e = std::process::Command::new(env!("CARGO_BIN_EXE_metalctl"))
        .args(["--endpoint", "unix:/nonexistent/metald.sock", "list"])
        .output()
        .unwrap();
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("connecting"));
    assert!(d.vmm_pids().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metald_serves_tcp_when_asked() {
    // metalctl has no TLS client: a TCP listener without TLS is what it can reach, which metald
    // serves only when told the network is trusted.
    let d = Daemon::start_with_toml_args(
        "[auth]\ninsecure_tcp = true\n",
        vec!["--listen".into(), "tcp:127.0.0.1:0".into()],
    )
    .await;
    let line = d
        .wait_log_since(0, std::time::Duration::from_secs(5), |l| {
            l.contains("metald ready")
        })
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addr = v["local_addr"].as_str().unwrap().to_string();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_metalctl"))
        .args(["--endpoint", &format!("tcp:{addr}"), "list", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_shows_kill_orphaned_recovering_running_live() {
    use std::io::BufRead;
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let pid = running_vm(&mut c, "followed").await;

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_metalctl"))
        .arg("--endpoint")
        .arg(format!("unix:{}", d.sock.display()))
        .args(["events", "followed", "--follow", "--json", "--limit", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // metalctl subscribes to the live stream before it prints the history (--limit 0: the
    // default page), so once the first history line is out, no later event can be missed.
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .expect("history printed")
        .expect("metalctl running");
    assert!(first.contains("\"followed\""), "{first}");
    signal(pid, libc::SIGKILL);

    let want = [
        ("orphaned", "orphaned"),
        ("recovering", "orphaned"),
        ("state_changed", "running"),
        ("recovered", "running"),
    ];
    let mut next = 0;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while next < want.len() {
        let line = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("events did not arrive in time")
            .expect("metalctl exited");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["kind"] == want[next].0 && v["state"] == want[next].1.to_ascii_uppercase() {
            next += 1;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_wait_ready_returns_once_the_guest_answers() {
    let d = Daemon::start().await;
    let g = guest_dir();
    let kernel = g.join("vmlinux").display().to_string();
    let initrd = g.join("initrd.img").display().to_string();
    ok(ctl(
        &d,
        &[
            "create",
            "--id",
            "wr",
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--cmdline",
            "quiet",
            "--guest-probe",
            "agent",
        ],
    ));
    let out = ok(ctl(&d, &["boot", "wr", "--wait-ready", "--timeout", "60"]));
    assert!(out.contains("guest ready"), "{out}");
    // When it returned, the guest had answered: the readiness is recorded, and the event that
    // records it came before.
    let info: serde_json::Value =
        serde_json::from_str(&ok(ctl(&d, &["info", "wr", "--json"]))).unwrap();
    assert_eq!(info["guest"]["ready"], true, "{info}");
    assert_eq!(info["guest"]["probe"], "agent", "{info}");
    let events = ok(ctl(&d, &["events", "wr", "--json"]));
    assert!(events.contains("guest_ready"), "{events}");
    let table = ok(ctl(&d, &["info", "wr"]));
    assert!(table.contains("GUEST_READY     yes"), "{table}");
    // wait-ready on its own returns at once now; guest-info asks the agent.
    let out = ok(ctl(&d, &["wait-ready", "wr", "--timeout", "5"]));
    assert!(out.contains("guest ready since"), "{out}");
    let gi = ok(ctl(&d, &["guest-info", "wr"]));
    assert!(gi.contains("metald test guest"), "{gi}");
    // An unknown probe is refused by metalctl, naming the flag.
    let o = ctl(
        &d,
        &["create", "--kernel", &kernel, "--guest-probe", "ping"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--guest-probe"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_follows_the_guest_and_logs_show_the_vmm() {
    use std::io::BufRead;
    let d = Daemon::start().await;
    let mut c = d.client().await;
    c.create_vm(guest_request("con")).await.unwrap();
    // Following from before the boot: the guest's boot appears as it happens.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_metalctl"))
        .arg("--endpoint")
        .arg(format!("unix:{}", d.sock.display()))
        .args(["console", "con"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    c.boot_vm(metald_api::v1::BootVmRequest {
        vm_id: "con".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let seen = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(line) = rx.recv().await {
            if line.contains("METALD-GUEST-READY") {
                return true;
            }
        }
        false
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen, Ok(true), "the console did not show the guest's boot");
    // Without --follow: what is there, then exit.
    let text = ok(ctl(&d, &["console", "con", "--no-follow"]));
    assert!(text.contains("METALD-GUEST-READY"), "{text}");
    let tail = ok(ctl(&d, &["console", "con", "--no-follow", "--tail", "10"]));
    assert!(tail.len() <= 10, "{tail:?}");
    // The VMM's own log.
    ok(ctl(&d, &["logs", "con"]));
    // An unknown VM is an error that says so.
    let o = ctl(&d, &["console", "nope", "--no-follow"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("NotFound"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_all_moves_every_running_vm_and_stops_at_the_first_failure() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let mut pids = Vec::new();
    for id in ["ra", "rb", "rc"] {
        pids.push(running_vm(&mut c, id).await);
    }
    // A guest is moved once it has booted: its first uptime report is well past that.
    for id in ["ra", "rb", "rc"] {
        let console = d.run_dir(id).join("console.log");
        assert!(
            wait_console(
                &console,
                "METALD-GUEST-ALIVE",
                1,
                std::time::Duration::from_secs(60)
            )
            .await
        );
    }
    let out = ok(ctl(&d, &["migrate", "--all", "--max-parallel", "2"]));
    for id in ["ra", "rb", "rc"] {
        assert!(out.contains(&format!(" {id}  RUNNING  pid ")), "{out}");
    }
    assert!(out.contains("migrated 3 of 3"), "{out}");
    for (id, old) in ["ra", "rb", "rc"].iter().zip(&pids) {
        assert_ne!(
            pid_of(&info(&mut c, id).await),
            Some(*old),
            "{id} did not move"
        );
    }
    // A new binary that cannot run a VMM: the first VM fails, the run stops, nothing moves.
    let before: Vec<_> = futures_pids(&mut c).await;
    let o = ctl(
        &d,
        &[
            "migrate",
            "--all",
            "--max-parallel",
            "1",
            "--binary",
            "/bin/false",
        ],
    );
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("FAILED: Aborted"), "{out}");
    assert!(out.contains("migrated 0 of 3"), "{out}");
    assert!(out.contains("stopped at the first failure"), "{out}");
    assert_eq!(
        futures_pids(&mut c).await,
        before,
        "a VM moved after the failure"
    );
    // Snapshots are listed with their size.
    let snap = ok(ctl(&d, &["snapshot", "ra"]));
    let fields: Vec<_> = snap.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{snap}");
    assert!(fields[2].ends_with("MiB"), "{snap}");
    let list = ok(ctl(&d, &["snapshots", "--vm", "ra"]));
    assert!(list.contains(fields[0]) && list.contains("SIZE"), "{list}");
    ok(ctl(&d, &["delete-snapshot", fields[0]]));
    assert!(!ok(ctl(&d, &["snapshots"])).contains(fields[0]));
}

/// The VMM pids of the VMs ra, rb, rc.
async fn futures_pids(c: &mut Client) -> Vec<Option<i32>> {
    let mut v = Vec::new();
    for id in ["ra", "rb", "rc"] {
        v.push(pid_of(&info(c, id).await));
    }
    v
}
