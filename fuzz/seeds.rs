//! Writes the seed corpus for `create_request`: valid requests naming the fuzz target's asset
//! files, and requests that try the ways out of them, so that fuzzing starts deep in validation.

use metald_api::v1 as pb;
use prost::Message;

fn main() {
    let out = std::env::args().nth(1).unwrap_or_else(|| "corpus/create_request".into());
    let _ = std::fs::create_dir_all(&out);
    let a = "/tmp/metald-fuzz/a";
    let paths = [
        format!("{a}/k"),
        format!("{a}/s/d"),
        format!("{a}/l"),
        format!("{a}/ld/x"),
        format!("{a}/../o/x"),
        format!("{a}/s/../k"),
        "/etc/passwd".to_string(),
        "k".to_string(),
    ];
    let mut n = 0;
    for (i, kernel) in paths.iter().enumerate() {
        let drive = &paths[(i + 1) % paths.len()];
        let req = pb::CreateVmRequest {
            vm_id: format!("seed-{i}"),
            customer_id: "acme".into(),
            config: Some(pb::VmConfig {
                cpu: Some(pb::CpuConfig { vcpu_count: 1 + (i as i32 % 9) }),
                memory: Some(pb::MemoryConfig {
                    size_bytes: (64 + 64 * i as i64) << 20,
                }),
                boot: Some(pb::BootConfig {
                    kernel_path: kernel.clone(),
                    initrd_path: if i % 2 == 0 { String::new() } else { paths[0].clone() },
                    kernel_args: "console=ttyS0 quiet".into(),
                }),
                storage: vec![pb::StorageDevice {
                    id: "d0".into(),
                    path: drive.clone(),
                    read_only: i % 3 == 0,
                    is_root_device: true,
                }],
                network: vec![pb::NetworkInterface {
                    id: "n0".into(),
                    mac_address: "02:00:00:00:00:01".into(),
                    tap_device: "tap0".into(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        std::fs::write(format!("{out}/seed-{n}"), req.encode_to_vec()).expect("writing a seed");
        n += 1;
    }
    println!("{n} seeds in {out}");
}
