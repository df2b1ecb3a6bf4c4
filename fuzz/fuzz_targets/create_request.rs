//! Fuzzes what CreateVm runs on a request before anything is made: protobuf decoding, then
//! `metald::api::check_create_request` (VM id, customer id, the whole config). For any bytes:
//! no panic, and an accepted spec names only regular files inside the asset directory (no way
//! out through `..` or symlinks, which the directory holds), within every bound.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use metald_api::v1 as pb;
use prost::Message;

/// An asset directory with a kernel, a disk, and symlinks that lead out of it.
fn assets() -> &'static (PathBuf, metald::model::SpecRules) {
    static A: OnceLock<(PathBuf, metald::model::SpecRules)> = OnceLock::new();
    A.get_or_init(|| {
        // A fixed place, so that the seed corpus (fuzz/seeds.rs) can name its files.
        let root = PathBuf::from(metald_fuzz_root());
        let assets = root.join("a");
        let _ = std::fs::create_dir_all(assets.join("s"));
        let _ = std::fs::create_dir_all(root.join("o"));
        let _ = std::fs::write(assets.join("k"), b"kernel");
        let _ = std::fs::write(assets.join("s/d"), b"disk");
        let _ = std::fs::write(root.join("o/x"), b"outside");
        let _ = std::os::unix::fs::symlink(root.join("o/x"), assets.join("l"));
        let _ = std::os::unix::fs::symlink(root.join("o"), assets.join("ld"));
        let canon = std::fs::canonicalize(&assets).unwrap_or(assets.clone());
        let rules = metald::model::SpecRules {
            max_vcpus: 8,
            min_memory_mib: 64,
            max_memory_mib: 4096,
            asset_dirs: vec![assets],
            guest_health: Default::default(),
        };
        (canon, rules)
    })
}

fn metald_fuzz_root() -> &'static str {
    "/tmp/metald-fuzz"
}

fn inside(dir: &std::path::Path, p: &std::path::Path) -> bool {
    p.starts_with(dir) && p.is_file()
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = pb::CreateVmRequest::decode(data) else {
        return;
    };
    let (dir, rules) = assets();
    if let Ok((_, spec)) = metald::api::check_create_request(&req, rules) {
        assert!((1..=8).contains(&spec.vcpus));
        assert!(spec.memory_bytes >= 64 << 20 && spec.memory_bytes <= 4096 << 20);
        assert!(spec.kernel_args.len() <= 2048);
        assert!(spec.drives.len() <= metald::model::MAX_DRIVES);
        assert!(spec.nics.len() <= metald::model::MAX_NICS);
        assert!(inside(dir, &spec.kernel), "{:?}", spec.kernel);
        if let Some(i) = &spec.initrd {
            assert!(inside(dir, i), "{i:?}");
        }
        for d in &spec.drives {
            assert!(inside(dir, &d.path), "{:?}", d.path);
        }
    }
});
