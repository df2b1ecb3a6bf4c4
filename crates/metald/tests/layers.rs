//! The layout shows the design: the daemon's modules import each other without a cycle, and
//! the domain at the bottom (errors, records, specs, states) imports nothing of the daemon.
//! Read from the source, so a new arrow that breaks either shows up here, not in review.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its code (tests left out) names as `crate::X`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let module = first.trim_end_matches(".rs").to_string();
            if module == "lib" || module == "bin" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            let deps = graph.entry(module.clone()).or_default();
            for line in code.lines() {
                let line = line.split("//").next().unwrap_or("");
                for (i, _) in line.match_indices("crate::") {
                    let name: String = line[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != module {
                        deps.insert(name);
                    }
                }
            }
        }
    }
    // Only arrows between modules (macros such as crate::crash_point! are not modules).
    let names: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| names.contains(d));
    }
    graph
}

/// A cycle through `from`, if there is one (depth-first).
fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    if let Some(i) = path.iter().position(|p| p == from) {
        let mut c = path[i..].to_vec();
        c.push(from.to_string());
        return Some(c);
    }
    path.push(from.to_string());
    for next in graph.get(from).into_iter().flatten() {
        if let Some(c) = cycle_from(graph, next, path) {
            return Some(c);
        }
    }
    path.pop();
    None
}

#[test]
fn the_import_graph_has_no_cycle() {
    let graph = imports();
    assert!(graph.contains_key("controller") && graph.contains_key("model"));
    for m in graph.keys() {
        if let Some(c) = cycle_from(&graph, m, &mut Vec::new()) {
            panic!("import cycle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn the_domain_imports_nothing_of_the_daemon() {
    let graph = imports();
    for (module, allowed) in [
        ("error", &[][..]),
        ("process", &[][..]),
        ("model", &["error"][..]),
    ] {
        let extra: Vec<&String> = graph[module]
            .iter()
            .filter(|d| !allowed.contains(&d.as_str()))
            .collect();
        assert!(extra.is_empty(), "{module} imports {extra:?}");
    }
}

/// The driver methods that make a VMM handle ([`metald::driver::Vmm`]), through which alone a
/// VMM is controlled: only a VM's controller may call them.
const CONTROL: &[&str] = &["spawn", "adopt"];

/// The VMM handle and its control API: named only by the controller, the drivers and the agent
/// task a controller owns.
const HANDLE_TYPES: &[&str] = &["Vmm", "VmmControl"];

/// Whether `line` names `word` as a whole identifier.
fn names(line: &str, word: &str) -> bool {
    line.match_indices(word).any(|(at, _)| {
        let ident = |c: char| c.is_alphanumeric() || c == '_';
        let before = line[..at].chars().next_back();
        let after = line[at + word.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
            // `pb::LogKind::Vmm` is the API's log kind, not the handle.
            && !line[..at].ends_with("LogKind::")
    })
}

#[test]
fn only_the_controller_drives_a_vmm() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut offenders = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .to_string();
            if path.is_dir() {
                // The controller and the drivers themselves.
                if rel != "controller" && rel != "driver" {
                    stack.push(path);
                }
                continue;
            }
            // guest.rs is the agent task a controller owns.
            if path.extension().is_none_or(|e| e != "rs") || rel == "guest.rs" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            for (n, line) in code.lines().enumerate() {
                let line = line.split("//").next().unwrap_or("");
                if HANDLE_TYPES.iter().any(|t| names(line, t)) {
                    offenders.push(format!("{rel}:{}: {}", n + 1, line.trim()));
                }
                // A call on something named driver: `driver.ping(`, `self.env.driver.boot(`,
                // `drivers.for_spec(s).kill(`.
                let Some(at) = line.find("driver") else {
                    continue;
                };
                let rest = &line[at..];
                for m in CONTROL {
                    if rest.contains(&format!(".{m}(")) {
                        offenders.push(format!("{rel}:{}: {}", n + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "a VMM driven from outside its controller:\n{}",
        offenders.join("\n")
    );
}
