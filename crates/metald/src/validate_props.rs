//! Property tests of the validation functions: for any input, no panic, and nothing invalid is
//! accepted. Paths are drawn from pieces that try every way out of an asset directory (`..`, a
//! symlink to a file outside, a symlink to a directory outside, absolute paths elsewhere), and
//! an accepted path must be a regular file inside an asset directory.

use std::path::{Path, PathBuf};

use proptest::prelude::*;

use crate::model::{MAX_DRIVES, MAX_NICS, RestartPolicy, SpecRules, VmId, VmSpecInput};

/// An asset directory with a kernel, a subdirectory, and links that lead out of it, beside a
/// file outside it; removed when dropped.
struct Assets {
    root: PathBuf,
}

impl Assets {
    fn new() -> Assets {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("mdt-props-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let assets = root.join("assets");
        std::fs::create_dir_all(assets.join("sub")).unwrap();
        std::fs::create_dir_all(root.join("outside")).unwrap();
        std::fs::write(assets.join("k"), b"kernel").unwrap();
        std::fs::write(assets.join("sub/d"), b"disk").unwrap();
        std::fs::write(root.join("outside/secret"), b"secret").unwrap();
        std::os::unix::fs::symlink(root.join("outside/secret"), assets.join("link")).unwrap();
        std::os::unix::fs::symlink(root.join("outside"), assets.join("dirlink")).unwrap();
        std::os::unix::fs::symlink(assets.join("k"), assets.join("inlink")).unwrap();
        Assets { root }
    }

    fn dir(&self) -> PathBuf {
        self.root.join("assets")
    }

    fn rules(&self) -> SpecRules {
        SpecRules {
            max_vcpus: 4,
            min_memory_mib: 64,
            max_memory_mib: 1024,
            asset_dirs: vec![self.dir()],
            guest_health: crate::model::GuestHealthConfig::default(),
        }
    }
}

impl Drop for Assets {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A path, drawn as (where it starts, its pieces): pieces that lead in, out, or nowhere, from
/// the asset directory, its parent, `/`, or nowhere (a relative path).
fn a_path() -> impl Strategy<Value = (u8, Vec<&'static str>)> {
    let piece = prop::sample::select(vec![
        "k", "sub", "d", "link", "dirlink", "inlink", "secret", "outside", "assets", "..", ".", "",
        "etc", "passwd", "nope",
    ]);
    (0u8..4, prop::collection::vec(piece, 0..5))
}

/// The path `p` names, for the asset directory `assets`.
fn materialize(assets: &Path, p: &(u8, Vec<&'static str>)) -> String {
    let mut s = match p.0 {
        0 => assets.display().to_string(),
        1 => assets
            .parent()
            .map(|x| x.display().to_string())
            .unwrap_or_default(),
        2 => String::new(),
        _ => ".".to_string(),
    };
    for piece in &p.1 {
        s.push('/');
        s.push_str(piece);
    }
    s
}

fn inside(dir: &Path, p: &Path) -> bool {
    let dir = std::fs::canonicalize(dir).unwrap();
    p.starts_with(&dir) && p.is_file() && std::fs::canonicalize(p).ok().as_deref() == Some(p)
}

/// One spec request, as drawn.
type Drawn = (
    i64,
    i64,
    String,
    Vec<String>,
    usize,
    (u8, Vec<&'static str>),
    Option<(u8, Vec<&'static str>)>,
    Vec<(u8, Vec<&'static str>)>,
);

/// A path that is mostly one of the good ones, so that whole specs are often accepted and the
/// property is tested on accepted specs, not only on refusals.
fn a_likely_path() -> impl Strategy<Value = (u8, Vec<&'static str>)> {
    prop_oneof![
        2 => prop::sample::select(vec![
            (0u8, vec!["k"]),
            (0, vec!["inlink"]),
            (0, vec!["sub", "d"]),
            (0, vec!["sub", "..", "k"]),
        ]),
        1 => a_path(),
    ]
}

fn a_spec() -> impl Strategy<Value = Drawn> {
    (
        prop_oneof![3 => 1i64..=4, 1 => any::<i64>()],
        prop_oneof![3 => (64i64..=1024).prop_map(|m| m << 20), 1 => any::<i64>()],
        prop_oneof![4 => "[ -~]{0,40}", 1 => ".{0,40}", 1 => "[ -~]{2040,2060}"],
        prop_oneof![
            4 => prop::collection::vec("[a-z0-9]{1,3}", 0..4),
            1 => prop::collection::vec("[a-z0-9_-]{0,3}|.{0,40}", 0..20),
        ],
        0usize..12,
        a_likely_path(),
        prop_oneof![Just(None), a_likely_path().prop_map(Some)],
        prop::collection::vec(a_likely_path(), 20),
    )
}

/// Whatever is asked, an accepted spec is within the host's rules and every file it names is a
/// regular file inside an asset directory, reached without `..` or a symlink leading out.
#[test]
fn an_accepted_spec_is_valid_and_its_files_are_inside_the_asset_dirs() {
    let assets = Assets::new();
    let rules = assets.rules();
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    let mut runner = proptest::test_runner::TestRunner::new(config(2000));
    let result = runner.run(
        &a_spec(),
        |(vcpus, memory, args, drive_ids, nic_count, kernel, initrd, paths)| {
            let dir = assets.dir();
            let input = VmSpecInput {
                vcpus,
                memory_bytes: memory,
                kernel: materialize(&dir, &kernel),
                initrd: initrd.map(|p| materialize(&dir, &p)).unwrap_or_default(),
                kernel_args: args,
                drives: drive_ids
                    .iter()
                    .zip(paths.iter())
                    .enumerate()
                    .map(|(i, (id, p))| (id.clone(), materialize(&dir, p), i % 2 == 0, i == 1))
                    .collect(),
                nics: (0..nic_count)
                    .map(|i| {
                        (
                            format!("n{i}"),
                            format!("02:00:00:00:00:{i:02x}"),
                            format!("tap{i}"),
                        )
                    })
                    .collect(),
                console: true,
                metadata: std::collections::BTreeMap::default(),
                restart_policy: RestartPolicy::OnFailure,
                restore_from: Default::default(),
                auto_recover: true,
                vmm: String::new(),
                vsock_cid: None,
                guest_health: Default::default(),
            };
            if let Ok(spec) = input.validate(&rules) {
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                prop_assert!((1..=4).contains(&spec.vcpus));
                prop_assert!(spec.memory_bytes >= 64 << 20 && spec.memory_bytes <= 1024 << 20);
                prop_assert_eq!(spec.memory_bytes % (1 << 20), 0);
                prop_assert!(spec.kernel_args.len() <= 2048);
                prop_assert!(!spec.kernel_args.chars().any(char::is_control));
                prop_assert!(spec.drives.len() <= MAX_DRIVES && spec.nics.len() <= MAX_NICS);
                prop_assert!(inside(&dir, &spec.kernel), "{:?}", spec.kernel);
                if let Some(i) = &spec.initrd {
                    prop_assert!(inside(&dir, i), "{:?}", i);
                }
                for d in &spec.drives {
                    prop_assert!(inside(&dir, &d.path), "{:?}", d.path);
                    prop_assert!(VmId::parse("x", &d.id).is_ok() && d.id.len() <= 32);
                }
            }
            Ok(())
        },
    );
    assert!(result.is_ok(), "{result:?}");
    // The property is only worth something if specs were accepted, not refused every time.
    let n = accepted.load(std::sync::atomic::Ordering::Relaxed);
    assert!(n >= 20, "only {n} of 2000 drawn specs were accepted");
}

/// `cases` cases, and no regression files written into the source tree (a failure prints its
/// minimal input instead).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn an_accepted_vm_id_matches_its_rule(s in ".{0,80}|[A-Za-z0-9_-]{0,70}") {
        if let Ok(id) = VmId::parse("vm_id", &s) {
            prop_assert!(!id.as_str().is_empty() && id.as_str().len() <= 64);
            prop_assert!(id.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        }
    }

    #[test]
    fn an_accepted_customer_id_matches_its_rule(s in ".{0,140}|[A-Za-z0-9_.@-]{0,140}") {
        if crate::api::check_customer_id(&s).is_ok() {
            prop_assert!(!s.is_empty() && s.len() <= 128);
            prop_assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-@".contains(&b)));
        }
    }

    #[test]
    fn a_page_token_decodes_only_to_a_valid_id(s in ".{0,100}|[A-Za-z0-9_=-]{0,100}") {
        if let Ok(id) = crate::api::page_token_decode(&s) {
            prop_assert!(VmId::parse("vm_id", id.as_str()).is_ok());
        }
    }
}

#[test]
fn a_plain_spec_is_accepted() {
    let assets = Assets::new();
    let dir = assets.dir();
    let input = VmSpecInput {
        vcpus: 1,
        memory_bytes: 128 << 20,
        kernel: dir.join("k").display().to_string(),
        initrd: String::new(),
        kernel_args: "console=ttyS0".into(),
        drives: vec![(
            "d0".into(),
            dir.join("sub/d").display().to_string(),
            true,
            true,
        )],
        nics: vec![("n0".into(), "02:00:00:00:00:01".into(), "tap0".into())],
        console: true,
        metadata: std::collections::BTreeMap::default(),
        restart_policy: RestartPolicy::OnFailure,
        restore_from: Default::default(),
        auto_recover: true,
        vmm: String::new(),
        vsock_cid: None,
        guest_health: Default::default(),
    };
    let spec = input.validate(&assets.rules());
    assert!(spec.is_ok(), "{spec:?}");
}
