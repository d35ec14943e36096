//! `cargo run -p xtask -- docs DIR`: writes the man pages (`DIR/man/*.1`) and the bash,
//! zsh and fish completions (`DIR/completions/`) of `ivring-host` and `ivring-guest`, from
//! the very command lines the binaries parse, for the Debian packages.

use anyhow::{bail, Context, Result};
use clap_complete::Shell;
use std::path::Path;

// The binaries' command lines, compiled here as well. Only `command()` is used: the fields
// are read by the binaries themselves.
#[allow(dead_code)]
#[path = "../../guest/src/cli.rs"]
mod guest_cli;
#[allow(dead_code)]
#[path = "../../host/src/cli.rs"]
mod host_cli;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, dir] if cmd == "docs" => docs(Path::new(dir)),
        _ => bail!("usage: cargo run -p xtask -- docs DIR"),
    }
}

fn docs(dir: &Path) -> Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    for cmd in [host_cli::command(), guest_cli::command()] {
        let name = cmd.get_name().to_string();
        // One page per binary, and one per subcommand (`man ivring-host-serve`), as
        // git and cargo do.
        clap_mangen::generate_to(cmd.clone(), &man)
            .with_context(|| format!("man pages of {name}"))?;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut c = cmd.clone();
            clap_complete::generate_to(shell, &mut c, &name, &completions)
                .with_context(|| format!("{shell} completions of {name}"))?;
        }
    }
    println!(
        "man pages in {}, completions in {}",
        man.display(),
        completions.display()
    );
    Ok(())
}
