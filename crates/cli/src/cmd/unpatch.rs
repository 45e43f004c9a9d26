//! `unpatch`.

use std::process::ExitCode;

/// Flags of `unpatch`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Process id or `all`.
    #[arg(short = 'p', required = true)]
    pub pid: String,
}

/// Runs `unpatch`.
pub fn run(_args: Args, _face: super::Face) -> anyhow::Result<ExitCode> {
    super::not_implemented("unpatch")
}
