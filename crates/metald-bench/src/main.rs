//! metald-bench: measures metald on this machine with real QEMU guests and writes the figures to
//! `bench/results/<name>.json` and `bench/RESULTS.md`.
//!
//! `lifecycle` reports the CreateVm+BootVm latency metald adds on top of QEMU's own start, creates
//! per second, and metald's RSS with 0, 10 and 20 running VMs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use hyper_util::rt::TokioIo;
use metald::config::{Accel, QemuConfig};
use metald::driver::qemu::{QMP_SOCKET, QemuDriver};
use metald::driver::qmp;
use metald::model::{VmId, VmSpec};
use metald_api::v1 as pb;
use metald_api::v1::vm_service_client::VmServiceClient;
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, Parser)]
#[command(name = "metald-bench")]
struct Cli {
    /// Repository root (guest image in target/guest, results in bench/).
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// Repetitions for latency figures.
    #[arg(long, default_value_t = 15)]
    reps: usize,
    #[command(subcommand)]
    cmd: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Create/boot latency, creates per second, daemon RSS.
    Lifecycle,
}

type Client = VmServiceClient<Channel>;

/// A metald daemon for the benchmark; killed with everything it started on drop.
struct Daemon {
    child: Child,
    state: PathBuf,
}

impl Daemon {
    fn start(root: &Path) -> Result<Daemon> {
        let state = PathBuf::from(format!("/tmp/mdb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state)?;
        let child = Command::new(root.join("target/release/metald"))
            .arg("--state-dir")
            .arg(&state)
            .args(["--accel", "tcg", "--log-format", "json", "--asset-dir"])
            .arg(root.join("target/guest"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting target/release/metald (run `cargo build --release` first)")?;
        let sock = state.join("metald.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            if Instant::now() > deadline {
                bail!("metald did not create its socket");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Daemon { child, state })
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }

    async fn client(&self) -> Result<Client> {
        let path = self.state.join("metald.sock");
        let ch = Endpoint::try_from("http://metald.invalid")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await?;
        Ok(VmServiceClient::new(ch))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_under(&self.state);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// Kills every process whose command line mentions `dir`.
fn kill_under(dir: &Path) {
    let needle = dir.display().to_string();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(&needle) {
            // SAFETY: kill takes plain integers; the target is a process this benchmark started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let idx = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[idx.min(s.len() - 1)]
}

fn guest_request(root: &Path, id: &str) -> pb::CreateVmRequest {
    let g = root.join("target/guest");
    pb::CreateVmRequest {
        vm_id: id.into(),
        customer_id: "bench".into(),
        config: Some(pb::VmConfig {
            cpu: Some(pb::CpuConfig { vcpu_count: 1 }),
            memory: Some(pb::MemoryConfig {
                size_bytes: 128 << 20,
            }),
            boot: Some(pb::BootConfig {
                kernel_path: g.join("vmlinux").display().to_string(),
                initrd_path: g.join("initrd.img").display().to_string(),
                kernel_args: "quiet panic=-1".into(),
            }),
            console: Some(pb::ConsoleConfig { enabled: true }),
            ..Default::default()
        }),
    }
}

/// QEMU alone: spawn with the exact command line metald uses, wait for QMP, `cont`.
async fn qemu_alone(root: &Path, reps: usize) -> Result<Vec<f64>> {
    let g = root.join("target/guest");
    let driver = QemuDriver::new(QemuConfig::default(), Accel::Tcg);
    let spec = VmSpec {
        vcpus: 1,
        memory_bytes: 128 << 20,
        kernel: g.join("vmlinux"),
        initrd: Some(g.join("initrd.img")),
        kernel_args: "quiet panic=-1".into(),
        drives: vec![],
        nics: vec![],
        console: true,
        metadata: Default::default(),
    };
    let dir = PathBuf::from(format!("/tmp/mdb-q-{}", std::process::id()));
    let mut out = Vec::new();
    for i in 0..reps {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let id = VmId::parse("vm_id", &format!("base{i}"))?;
        let sock = dir.join(QMP_SOCKET);
        let t0 = Instant::now();
        let mut child = Command::new("qemu-system-x86_64")
            .args(driver.args(&id, &spec, &dir))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = t0 + Duration::from_secs(10);
        loop {
            if sock.exists()
                && qmp::execute(&sock, "cont", None, Duration::from_secs(2))
                    .await
                    .is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("QEMU did not answer QMP");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        out.push(t0.elapsed().as_secs_f64() * 1000.0);
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|s| s.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "mem_gib": mem_kib / 1024 / 1024,
        "host_kernel": kernel.trim(),
        "qemu": qemu,
        "accel": "tcg",
    })
}

fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

async fn lifecycle(root: &Path, reps: usize) -> Result<Value> {
    eprintln!("bench: QEMU alone x{reps}");
    let base = qemu_alone(root, reps).await?;

    let d = Daemon::start(root)?;
    let mut c = d.client().await?;
    let rss0 = rss_kib(d.pid());

    eprintln!("bench: CreateVm+BootVm through metald x{reps}");
    let mut via = Vec::new();
    for i in 0..reps {
        let id = format!("lat{i}");
        let t0 = Instant::now();
        c.create_vm(guest_request(root, &id)).await?;
        c.boot_vm(pb::BootVmRequest { vm_id: id.clone() }).await?;
        via.push(t0.elapsed().as_secs_f64() * 1000.0);
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: id,
            force: true,
        })
        .await?;
    }

    eprintln!("bench: sequential creates");
    let n_creates = 30;
    let t0 = Instant::now();
    let mut create_ms = Vec::new();
    for i in 0..n_creates {
        let t = Instant::now();
        c.create_vm(guest_request(root, &format!("cr{i}"))).await?;
        create_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let seq_rate = n_creates as f64 / t0.elapsed().as_secs_f64();
    for i in 0..n_creates {
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: format!("cr{i}"),
            force: true,
        })
        .await?;
    }

    eprintln!("bench: concurrent creates (4 clients)");
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let mut c = c.clone();
        let root = root.to_path_buf();
        tasks.push(tokio::spawn(async move {
            for i in 0..(n_creates / 4) {
                c.create_vm(guest_request(&root, &format!("cc{w}-{i}")))
                    .await
                    .map(|_| ())?;
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let par_rate = (n_creates / 4 * 4) as f64 / t0.elapsed().as_secs_f64();
    for w in 0..4 {
        for i in 0..(n_creates / 4) {
            c.delete_vm(pb::DeleteVmRequest {
                vm_id: format!("cc{w}-{i}"),
                force: true,
            })
            .await?;
        }
    }

    eprintln!("bench: RSS with 10 and 20 running VMs");
    let mut rss = vec![(0, rss0)];
    for i in 0..20 {
        let id = format!("rss{i}");
        c.create_vm(guest_request(root, &id)).await?;
        c.boot_vm(pb::BootVmRequest { vm_id: id }).await?;
        if i == 9 || i == 19 {
            rss.push((i + 1, rss_kib(d.pid())));
        }
    }

    let added_p50 = percentile(&via, 50.0) - percentile(&base, 50.0);
    Ok(json!({
        "qemu_alone_ms": {"p50": percentile(&base, 50.0), "p90": percentile(&base, 90.0), "n": base.len()},
        "create_boot_via_metald_ms": {"p50": percentile(&via, 50.0), "p90": percentile(&via, 90.0), "n": via.len()},
        "added_by_metald_ms_p50": added_p50,
        "creates_per_sec_sequential": seq_rate,
        "create_ms_sequential": {"p50": percentile(&create_ms, 50.0), "p90": percentile(&create_ms, 90.0), "n": create_ms.len()},
        "creates_per_sec_4_clients": par_rate,
        "metald_rss_mib": rss.iter().map(|(n, k)| json!({"running_vms": n, "rss_mib": (*k as f64) / 1024.0})).collect::<Vec<_>>(),
    }))
}

fn write_results(root: &Path, name: &str, figures: &Value) -> Result<()> {
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let doc = json!({"bench": name, "date": now_utc(), "machine": machine(), "figures": figures});
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;
    // bench/RESULTS.md is regenerated from every results file, so it always shows the latest run
    // of each benchmark.
    let mut md = String::from(
        "# Benchmark results\n\nWritten by `scripts/bench.sh`; each section is the latest run of one benchmark.\n",
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    for f in files {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&f)?)?;
        md.push_str(&format!(
            "\n## {}\n\n- date: {}\n- machine: {}\n\n```json\n{}\n```\n",
            v["bench"].as_str().unwrap_or("?"),
            v["date"].as_str().unwrap_or("?"),
            v["machine"],
            serde_json::to_string_pretty(&v["figures"])?
        ));
    }
    std::fs::write(root.join("bench/RESULTS.md"), md)?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = cli.root.canonicalize()?;
    let (name, figures) = match cli.cmd {
        Bench::Lifecycle => ("lifecycle", lifecycle(&root, cli.reps).await?),
    };
    println!("{}", serde_json::to_string_pretty(&figures)?);
    write_results(&root, name, &figures)?;
    eprintln!("bench: saved bench/results/{name}.json and bench/RESULTS.md");
    Ok(())
}
