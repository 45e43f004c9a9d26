//! `livecare install-links DIR`: symlinks under the LibCare tool names.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

/// Flags of `livecare install-links`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory to create the links in (created if missing).
    pub dir: PathBuf,
    /// Replace existing files of the same names.
    #[arg(long)]
    pub force: bool,
}

/// Creates one symlink per LibCare tool name, pointing at this binary.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find this binary's path")?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    for name in crate::multicall::TOOL_NAMES {
        let link = args.dir.join(name);
        if link.symlink_metadata().is_ok() {
            if !args.force {
                anyhow::bail!("{} exists; pass --force to replace it", link.display());
            }
            std::fs::remove_file(&link)
                .with_context(|| format!("cannot remove {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&exe, &link)
            .with_context(|| format!("cannot create symlink {}", link.display()))?;
        println!("{} -> {}", link.display(), exe.display());
    }
    Ok(ExitCode::SUCCESS)
}
