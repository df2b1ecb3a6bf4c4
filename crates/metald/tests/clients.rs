//! Clients other than metalctl, as a control plane in another language would use them: a stock
//! Python grpcio client with default options on the unix socket (health, reflection, a whole
//! lifecycle), and a SIGTERM that must not wait on open streams.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use metald_api::v1 as pb;

/// The virtualenv with grpcio, made by scripts/pyclient-env.sh (scripts/test.sh runs it first;
/// a test run alone makes it here).
fn python() -> std::path::PathBuf {
    let root = repo_root();
    let st = Command::new(root.join("scripts/pyclient-env.sh"))
        .status()
        .expect("running scripts/pyclient-env.sh");
    assert!(st.success(), "scripts/pyclient-env.sh failed");
    root.join("target/pyclient/bin/python")
}

/// The test guest's CreateVmRequest as the JSON a Python client would build.
fn create_json(vm: &str) -> String {
    let r = guest_request(vm);
    let c = r.config.unwrap();
    let boot = c.boot.unwrap();
    serde_json::json!({
        "vm_id": r.vm_id,
        "customer_id": r.customer_id,
        "config": {
            "cpu": {"vcpu_count": 1},
            "memory": {"size_bytes": c.memory.unwrap().size_bytes.to_string()},
            "boot": {
                "kernel_path": boot.kernel_path,
                "initrd_path": boot.initrd_path,
                "kernel_args": boot.kernel_args,
            },
            "console": {"enabled": true},
        }
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_python_client_works_on_the_unix_socket_with_default_options() {
    let py = python();
    let d = Daemon::start().await;
    let sock = d.sock.clone();
    let out = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new(&py)
            .arg(repo_root().join("crates/metald/tests/py/stock_client.py"))
            .arg(&sock)
            .arg(create_json("py1"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python client did not finish")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["health"], "SERVING", "{v}");
    let services: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for s in [
        "metald.v1.VmService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(&s), "{s} not listed: {services:?}");
    }
    assert_eq!(v["services_v1"], v["services"]);
    let methods = v["methods"].as_array().unwrap();
    for m in ["CreateVm", "BootVm", "GetVmInfo", "ListVms", "WatchEvents"] {
        assert!(methods.iter().any(|x| x == m), "{m} not described: {v}");
    }
    let states: Vec<(&str, &str)> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["call"].as_str().unwrap(), s["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        vec![
            ("CreateVm", "VM_STATE_CREATED"),
            ("BootVm", "VM_STATE_RUNNING"),
            ("PauseVm", "VM_STATE_PAUSED"),
            ("ResumeVm", "VM_STATE_RUNNING"),
            ("RebootVm", "VM_STATE_RUNNING"),
            ("ShutdownVm", "VM_STATE_SHUTDOWN"),
        ]
    );
    assert_eq!(v["listed"], serde_json::json!(["py1"]));
    // The VMM as a typed message: an integer pid and a timestamp, not strings.
    assert!(v["vmm"]["pid"].as_i64().is_some_and(|p| p > 0), "{v}");
    assert!(
        v["vmm"]["start_time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{v}"
    );
    assert_eq!(v["after_delete"], "NOT_FOUND");
    // The stream stayed open until the client's own deadline ended it.
    assert_eq!(v["watch"], "DEADLINE_EXCEEDED");
    assert!(d.vmm_pids().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_streams_and_exits_within_the_grace() {
    let mut d = Daemon::start_with_toml("shutdown_grace = 3.0\n").await;
    let mut c = d.client().await;
    let pid = running_vm(&mut c, "st1").await;
    // Two watchers with open streams, and a call in progress (a create).
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut w = d.client().await;
        streams.push(
            w.watch_events(pb::WatchEventsRequest::default())
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let mut busy = d.client().await;
    let before = d.log_mark();
    let in_flight = tokio::spawn(async move { busy.create_vm(guest_request("st2")).await });
    // In progress means metald has it: a create sent at the very moment of the SIGTERM may be
    // refused by the connection's GOAWAY before metald sees it, which the client reports as a
    // transport error, not as metald's answer.
    assert!(
        d.wait_log_since(before, Duration::from_secs(5), |l| l.contains("\"st2\""))
            .await
            .is_some(),
        "the create never reached metald"
    );
    let mark = d.log_mark();
    let sent = Instant::now();
    d.signal(libc::SIGTERM);
    assert!(
        d.wait_exited(Duration::from_secs(10)).await,
        "metald did not exit"
    );
    let took = sent.elapsed();
    assert!(
        took < Duration::from_millis(3000 + 1500),
        "metald took {took:?} to stop with a 3 s grace"
    );
    // Each stream ended with a status that says why.
    for mut s in streams {
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.message().await {
                    Ok(Some(_)) => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("the stream did not end");
        match end {
            Err(st) => assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}"),
            Ok(None) => panic!("the stream ended without a status"),
            Ok(Some(_)) => unreachable!(),
        }
    }
    // The call in progress got an answer (done, or refused because metald was stopping).
    tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the call in progress got no answer")
        .unwrap()
        .map(|_| ())
        .or_else(|e| match e.code() {
            tonic::Code::Unavailable | tonic::Code::Cancelled => Ok(()),
            _ => Err(e),
        })
        .unwrap();
    assert!(!events(&d, mark, "metald stopped").is_empty());
    // The VMM is untouched, and the next metald adopts it.
    assert!(pid_alive(pid), "the VMM was stopped with metald");
    d.spawn().await;
    let mut c = d.client().await;
    let i = info(&mut c, "st1").await;
    assert_eq!(pid_of(&i), Some(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_request_id_gets_the_first_answer() {
    let mut d = Daemon::start().await;
    let mut c = d.client().await;
    let mut req = guest_request("idem");
    req.request_id = "create-idem-1".into();
    let first = c.create_vm(req.clone()).await.unwrap().into_inner();
    // The client timed out and retries: the first call's answer, not ALREADY_EXISTS.
    let again = c.create_vm(req.clone()).await.unwrap().into_inner();
    assert_eq!(first, again);
    // Also after a restart of metald: the answer is kept in the registry.
    d.stop_with(libc::SIGKILL);
    d.spawn().await;
    let mut c = d.client().await;
    assert_eq!(c.create_vm(req.clone()).await.unwrap().into_inner(), first);
    // The same request_id for a different request is refused, naming the field.
    let mut other = guest_request("idem-other");
    other.request_id = req.request_id.clone();
    let e = c.create_vm(other).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("request_id"), "{}", e.message());
    // Without a request_id a second create is ALREADY_EXISTS, as before.
    let mut plain = guest_request("idem");
    plain.request_id.clear();
    let e = c.create_vm(plain).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    // Two retries racing the first: one VM, one VMM, the same answer for all three.
    let mut race = guest_request("idem-race");
    race.request_id = "create-race".into();
    let mut calls = Vec::new();
    for _ in 0..3 {
        let mut c = d.client().await;
        let r = race.clone();
        calls.push(tokio::spawn(async move { c.create_vm(r).await }));
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap().unwrap().into_inner());
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    let boot = pb::BootVmRequest {
        vm_id: "idem-race".into(),
        request_id: "boot-race".into(),
    };
    let b1 = c.boot_vm(boot.clone()).await.unwrap().into_inner();
    // A plain second BootVm of a running VM would be refused; the retry is answered.
    let b2 = c.boot_vm(boot).await.unwrap().into_inner();
    assert_eq!(b1, b2);
    assert_eq!(b1.state, pb::VmState::Running as i32);
    // A malformed request_id is refused.
    let e = c
        .boot_vm(pb::BootVmRequest {
            vm_id: "idem".into(),
            request_id: "has space".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("request_id"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_are_not_found_everywhere_and_page_tokens_are_opaque() {
    let d = Daemon::start().await;
    let mut c = d.client().await;
    let e = c
        .get_vm_events(pb::GetVmEventsRequest {
            vm_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c
        .watch_events(pb::WatchEventsRequest {
            vm_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    for id in ["a1", "a2", "a3"] {
        c.create_vm(guest_request(id)).await.unwrap();
    }
    let page = c
        .list_vms(pb::ListVmsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.vms.len(), 2);
    assert_ne!(
        page.next_page_token, "a2",
        "a page token is not a bare VM id"
    );
    let rest = c
        .list_vms(pb::ListVmsRequest {
            page_size: 2,
            page_token: page.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.vms.len(), 1);
    assert_eq!(rest.vms[0].vm_id, "a3");
    assert!(rest.next_page_token.is_empty());
    // ListVms entries carry what GetVmInfo does: desired state, health, guest, the VMM.
    let v = &page.vms[0];
    assert_eq!(v.desired_state, pb::VmState::Created as i32);
    assert!(v.health.is_some() && v.guest.is_some() && v.vmm.is_some());
    let e = c
        .list_vms(pb::ListVmsRequest {
            page_token: "a2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("page_token"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_host_mode_and_is_served_on_tcp_with_reflection() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    // No TLS listener yet: TCP is served only to a network the operator says it trusts.
    let d = Daemon::start_with_toml_args(
        "[auth]\ninsecure_tcp = true\n",
        vec!["--listen".into(), "tcp:127.0.0.1:0".into()],
    )
    .await;
    let line = d
        .wait_log_since(0, Duration::from_secs(5), |l| l.contains("metald ready"))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addr = v["local_addr"].as_str().unwrap().to_string();
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(ch.clone());
    let service = || HealthCheckRequest {
        service: metald_api::SERVICE_NAME.into(),
    };
    let status = |r: tonic_health::pb::HealthCheckResponse| r.status;
    assert_eq!(
        status(health.check(service()).await.unwrap().into_inner()),
        ServingStatus::Serving as i32
    );
    // A readonly host refuses changes: NOT_SERVING, told to a watcher as it happens.
    let mut watch = health.watch(service()).await.unwrap().into_inner();
    assert_eq!(
        status(
            tokio::time::timeout(Duration::from_secs(5), watch.message())
                .await
                .expect("no first health status")
                .unwrap()
                .unwrap()
        ),
        ServingStatus::Serving as i32
    );
    let mut c = metald_api::v1::vm_service_client::VmServiceClient::new(ch.clone());
    c.set_host_mode(pb::SetHostModeRequest {
        mode: host_mode("readonly"),
        reason: "a test".into(),
        requested_by: "test".into(),
    })
    .await
    .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("no health change")
        .unwrap()
        .unwrap();
    assert_eq!(status(next), ServingStatus::NotServing as i32);
    c.set_host_mode(pb::SetHostModeRequest {
        mode: host_mode("normal"),
        reason: String::new(),
        requested_by: "test".into(),
    })
    .await
    .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("no health change")
        .unwrap()
        .unwrap();
    assert_eq!(status(next), ServingStatus::Serving as i32);
    // Reflection on TCP too.
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut r = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = r
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let reply = tokio::time::timeout(Duration::from_secs(5), replies.message())
        .await
        .expect("no reflection reply")
        .unwrap()
        .unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("no service list: {reply:?}");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == metald_api::SERVICE_NAME)
    );
}
