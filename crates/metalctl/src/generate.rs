//! `metalctl generate --out DIR`: shell completions and man pages, made from metalctl's own clap
//! definition.
//!
//! Why here and not in a build script or by hand: the clap structs in `main.rs` are the only
//! description of metalctl's subcommands and flags, so completions and man pages generated from
//! them at packaging time cannot drift from the binary they ship with (a hand-written page would
//! miss the next flag someone adds). A build script could not see those structs without moving
//! them into a library, and it would run on every build; a hidden subcommand costs nothing until
//! it is called. `scripts/package.sh` runs it into `target/generated/` and puts the files into
//! the Debian package.
//!
//! It writes:
//! - completions for bash (`metalctl.bash`), zsh (`_metalctl`) and fish (`metalctl.fish`),
//!   via clap_complete, without the hidden subcommands;
//! - man pages via clap_mangen: `metalctl.1` and one page per subcommand, nested ones included
//!   (`metalctl-create.1`, `metalctl-host-mode.1`, ...). Hidden subcommands (this one) get none.
//!
//! The metald daemon's man page is not made here: its flags are defined in
//! `crates/metald/src/bin/metald.rs`, a different binary.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Command, CommandFactory};
use clap_complete::Shell;

use crate::Cli;

/// The shells completions are written for; the file names are clap_complete's
/// (`metalctl.bash`, `_metalctl`, `metalctl.fish`), as the packaging expects.
const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Writes the completions and man pages into `out` (created if missing) and prints each path.
pub fn run(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    let mut cmd = completion_command();
    for shell in SHELLS {
        let path = clap_complete::generate_to(shell, &mut cmd, "metalctl", out)
            .with_context(|| format!("writing {shell} completions into {}", out.display()))?;
        written.push(path);
    }
    // As clap_mangen::generate_to does, but keeping the paths: built first, so that each
    // subcommand's display name (`metalctl-create`) names its page.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    man_pages(&cmd, out, &mut written)?;
    // The listing is informational (the files are the output): a closed pipe is no error.
    let mut stdout = std::io::stdout().lock();
    for p in written {
        let _ = writeln!(stdout, "{}", p.display());
    }
    Ok(())
}

/// metalctl's command line without its hidden subcommands: clap_complete's static completions
/// do not skip hidden subcommands (clap_mangen does), so `metalctl <TAB>` would offer
/// `generate`. clap cannot remove a subcommand, so the root is rebuilt from the derived one.
fn completion_command() -> Command {
    let full = Cli::command();
    let mut cmd = Command::new("metalctl").version(env!("CARGO_PKG_VERSION"));
    if let Some(about) = full.get_about() {
        cmd = cmd.about(about.clone());
    }
    cmd.args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
        .subcommand_required(true)
}

/// Writes `cmd`'s page and those of its visible subcommands, recursively.
fn man_pages(cmd: &Command, out: &Path, written: &mut Vec<PathBuf>) -> Result<()> {
    // A subcommand has no version of its own; every page names the metalctl it documents.
    let page = clap_mangen::Man::new(cmd.clone())
        .source(format!("metalctl {}", env!("CARGO_PKG_VERSION")));
    let path = page
        .generate_to(out)
        .with_context(|| format!("writing {}", out.join(page.get_filename()).display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, out, written)?;
    }
    Ok(())
}
