//! The Debian package's inputs, checked on every test run so that they cannot drift from the
//! code: the packaged config (packaging/metald.toml) is one metald accepts and lists every key
//! with its default, and every file the package takes from the repository exists.
//! scripts/package.sh builds the package itself and checks the .deb.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};

use metald::config::Config;
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn packaged_config() -> PathBuf {
    repo().join("packaging/metald.toml")
}

/// What the config's defaults look like as data (durations as the file spells them).
fn defaults() -> Value {
    serde_json::to_value(Config::default()).unwrap()
}

#[test]
fn packaged_config_is_accepted_and_keeps_the_defaults() {
    let cfg = Config::from_file(&packaged_config()).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.asset_dirs, vec![PathBuf::from("/srv/vm-images")]);
    let mut got = serde_json::to_value(&cfg).unwrap();
    got["asset_dirs"] = json!([]);
    assert_eq!(
        got,
        defaults(),
        "the packaged config sets more than asset_dirs"
    );
}

/// Uncommenting every `# key = value` line gives a config whose values are the defaults, and
/// which has every key metald knows: a key added to (or renamed in) metald's config without
/// the packaged file following fails here.
#[test]
fn packaged_config_lists_every_key_with_its_default() {
    let text = std::fs::read_to_string(packaged_config()).unwrap();
    let uncommented: String = text
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if is_assignment(rest) => rest,
            _ => line,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let table: toml::Table = toml::from_str(&uncommented)
        .unwrap_or_else(|e| panic!("uncommented config does not parse: {e}\n{uncommented}"));
    let mut listed = serde_json::to_value(&table).unwrap();

    // Keys whose default is "unset": the file shows an example of the value instead.
    let listen = Config::default().listen().unwrap().to_string();
    assert_eq!(
        listed["listen"],
        json!(listen),
        "listen should show the default socket"
    );
    listed["listen"] = Value::Null;
    assert!(
        listed["limits"]["max_vcpus"].is_u64(),
        "max_vcpus should show an example"
    );
    listed["limits"]["max_vcpus"] = Value::Null;
    listed["asset_dirs"] = json!([]);

    let want = defaults();
    let mut problems = Vec::new();
    compare("", &want, &listed, &mut problems);
    assert!(
        problems.is_empty(),
        "packaging/metald.toml is out of step with metald's config:\n{}",
        problems.join("\n")
    );
    // Beyond the keys: the values accepted as a whole (e.g. cgroup_version's spelling).
    let path = std::env::temp_dir().join(format!("metald-uncommented-{}.toml", std::process::id()));
    std::fs::write(&path, &uncommented).unwrap();
    let parsed = Config::from_file(&path);
    let _ = std::fs::remove_file(&path);
    parsed.unwrap();
}

/// `key = ...` with a lowercase snake_case key.
fn is_assignment(s: &str) -> bool {
    s.split_once(" = ").is_some_and(|(k, _)| {
        !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
    })
}

/// Collects every key missing from `got`, extra in it, or with a value other than `want`'s.
/// A `null` in `want` (an unset optional) must be absent or null in `got`.
fn compare(at: &str, want: &Value, got: &Value, problems: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            let path = |k: &str| {
                if at.is_empty() {
                    k.to_string()
                } else {
                    format!("{at}.{k}")
                }
            };
            for (k, wv) in w {
                let path = path(k);
                match g.get(k) {
                    Some(gv) => compare(&path, wv, gv, problems),
                    None if wv.is_null() => {}
                    None => problems.push(format!("{path}: missing (default {wv})")),
                }
            }
            for k in g.keys().filter(|k| !w.contains_key(*k)) {
                problems.push(format!("{}: not a metald config key", path(k)));
            }
        }
        (Value::Number(w), Value::Number(g)) if w.as_f64() == g.as_f64() => {}
        (w, g) if w == g => {}
        (w, g) => problems.push(format!("{at}: {g} in the file, default {w}")),
    }
}

/// Every repository file that [package.metadata.deb] in crates/metalctl/Cargo.toml packages
/// exists (the binaries and target/generated/ are made by scripts/package.sh).
#[test]
fn packaged_repository_files_exist() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap()).unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    assert_eq!(deb["name"].as_str(), Some("metald"));
    let assets = deb["assets"].as_array().unwrap();
    let mut checked = 0;
    for a in assets {
        let src = a[0].as_str().unwrap();
        let dest = a[1].as_str().unwrap();
        if src.starts_with("target/") || src.starts_with("../../target/") {
            continue;
        }
        if let Some((dir, pattern)) = src.rsplit_once("/*") {
            let dir = crate_dir.join(dir);
            let n = std::fs::read_dir(&dir)
                .unwrap()
                .filter(|e| {
                    let name = e.as_ref().unwrap().file_name();
                    name.to_string_lossy().ends_with(pattern)
                })
                .count();
            assert!(n > 0, "{src} (for /{dest}) matches nothing");
        } else {
            assert!(
                crate_dir.join(src).is_file(),
                "{src} (for /{dest}) is missing"
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 5,
        "expected the config, rules, dashboard and docs"
    );
    assert_eq!(
        deb["conf-files"].as_array().unwrap(),
        &vec![toml::Value::from("/etc/metald/metald.toml")]
    );
    // The unit the package adapts (ExecStart moved to /usr/bin) is still the one it expects.
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/metald.service")).unwrap();
    assert!(
        unit.lines()
            .any(|l| l == "ExecStart=/usr/local/bin/metald --config /etc/metald/metald.toml"),
        "scripts/package.sh rewrites this ExecStart line; update it with the unit"
    );
}
