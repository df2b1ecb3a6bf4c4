//! `metalctl generate --out DIR`: completions for bash, zsh and fish and roff man pages, one per
//! visible subcommand, with no metald running.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;

/// A fresh, empty directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("metalctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn read(dir: &TempDir, name: &str) -> String {
    let p = dir.0.join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn generate_writes_completions_and_man_pages() {
    let dir = TempDir::new("generate");
    // The directory does not exist yet, and no daemon is listening at the endpoint.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_metalctl"))
        .args(["--endpoint", "unix:/nonexistent/metald.sock", "generate"])
        .arg("--out")
        .arg(&dir.0)
        .output()
        .expect("running metalctl");
    assert!(
        out.status.success(),
        "metalctl generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8(out.stdout).unwrap();

    for name in [
        "metalctl.bash",
        "_metalctl",
        "metalctl.fish",
        "metalctl.1",
        "metalctl-create.1",
        "metalctl-list.1",
        "metalctl-host.1",
        "metalctl-host-mode.1",
    ] {
        let p = dir.0.join(name);
        assert!(p.is_file(), "{} is missing", p.display());
        assert!(
            listed.contains(&p.display().to_string()),
            "{name} not printed:\n{listed}"
        );
    }
    // The hidden subcommand gets no page.
    assert!(!dir.0.join("metalctl-generate.1").exists());

    let bash = read(&dir, "metalctl.bash");
    for sub in ["create", "list", "boot", "wait-ready", "host"] {
        assert!(bash.contains(sub), "bash completion lacks {sub:?}");
    }
    assert!(bash.contains("complete -F _metalctl"), "{bash}");
    // Hidden subcommands are not offered.
    assert!(
        !bash.contains("generate"),
        "bash completion offers generate"
    );
    let zsh = read(&dir, "_metalctl");
    assert!(zsh.starts_with("#compdef metalctl"), "{zsh}");
    assert!(zsh.contains("'list:List VMs'"), "{zsh}");
    assert!(
        !zsh.contains("'generate:"),
        "zsh completion offers generate"
    );
    let fish = read(&dir, "metalctl.fish");
    assert!(fish.contains("-a \"list\""), "{fish}");
    assert!(
        !fish.contains("-a \"generate\""),
        "fish completion offers generate"
    );

    let man = read(&dir, "metalctl.1");
    assert!(
        man.starts_with(".ie") || man.starts_with(".TH"),
        "metalctl.1 is not roff:\n{man}"
    );
    assert!(man.contains(".TH metalctl 1"), "{man}");
    assert!(
        man.contains("METALD_ENDPOINT"),
        "the endpoint's variable is not documented"
    );
    // The root page refers to each subcommand's page.
    assert!(man.contains("metalctl\\-create(1)"), "{man}");
    let create = read(&dir, "metalctl-create.1");
    assert!(create.contains(".TH metalctl-create 1"), "{create}");
    assert!(create.contains("\\-\\-kernel"), "{create}");
    assert!(create.contains(&format!("metalctl {}", env!("CARGO_PKG_VERSION"))));
}
