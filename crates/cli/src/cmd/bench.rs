//! `livecare bench`: pause-time, call-overhead and gensrc throughput figures.

use std::process::ExitCode;

/// Flags of `livecare bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Which benchmark to run.
    pub what: String,
}

/// Runs `livecare bench`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("unknown benchmark {:?}", args.what)
}
