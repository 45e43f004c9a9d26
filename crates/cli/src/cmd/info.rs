//! `info`.

use std::process::ExitCode;

/// Flags of `info`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Process id or `all`.
    #[arg(short = 'p')]
    pub pid: Option<String>,
}

/// Runs `info`.
pub fn run(_args: Args, _face: super::Face) -> anyhow::Result<ExitCode> {
    super::not_implemented("info")
}
