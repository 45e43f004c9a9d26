//! `livecare run`: start a program, apply every matching patch from a directory at
//! its entry point (libraries loaded, main not yet run), then let it go and wait.

use std::process::ExitCode;

use anyhow::Context;
use livecare_apply::Options;

/// Flags of `livecare run`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Patch directory (or file).
    #[arg(short = 'P')]
    pub patch_dir: Option<std::path::PathBuf>,
    /// Apply patch files that someone other than their owner or root could have
    /// written (see `patch --allow-insecure-perms`).
    #[arg(long)]
    pub allow_insecure_perms: bool,
    /// Program and arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<std::ffi::OsString>,
}

/// Runs `livecare run`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let patches = match &args.patch_dir {
        Some(d) => {
            super::patch::check_trusted(d, args.allow_insecure_perms)?;
            let patches = livecare_apply::load_patches(d)
                .with_context(|| format!("loading {}", d.display()))?;
            for p in &patches {
                super::patch::check_trusted(&p.source, args.allow_insecure_perms)?;
            }
            patches
        }
        None => Vec::new(),
    };
    let (prog, rest) = args.command.split_first().context("no program given")?;
    let mut cmd = std::process::Command::new(prog);
    cmd.args(rest);
    let (mut child, mut threads) = livecare_process::launch_at_entry(cmd)
        .with_context(|| format!("starting {}", prog.to_string_lossy()))?;
    let opts = Options {
        hold: true,
        ..Options::default()
    };
    let reports = livecare_apply::apply_held(&mut threads, &patches, &opts);
    // Let the program go whatever happened; a failed patch leaves it unpatched.
    threads.detach_all().context("detaching")?;
    drop(threads);
    match reports {
        Ok(rs) => {
            for r in &rs {
                let names: Vec<&str> = r.hunks.iter().map(|h| h.name.as_str()).collect();
                eprintln!(
                    "patched {} function{} ({}) in pid {} ({}, build-id {}) at start",
                    r.hunks.len(),
                    if r.hunks.len() == 1 { "" } else { "s" },
                    names.join(", "),
                    r.pid,
                    r.comm,
                    super::patch::short_id(&r.build_id)
                );
            }
        }
        Err(e) => eprintln!("error: patching pid {} at start: {e}", child.id()),
    }
    let status = child.wait().context("waiting for the program")?;
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}
