//! `livecare run`.

use std::process::ExitCode;

/// Flags of `livecare run`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Patch directory.
    #[arg(short = 'P')]
    pub patch_dir: Option<std::path::PathBuf>,
    /// Program and arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<std::ffi::OsString>,
}

/// Runs `livecare run`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    super::not_implemented("livecare run")
}
