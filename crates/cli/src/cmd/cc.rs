//! `libcare-cc` (`livecare cc`): the gcc-compatible compiler wrapper.

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Context;

/// Runs `libcare-cc` with gcc's arguments (argv[0] removed).
pub fn run(args: Vec<OsString>) -> anyhow::Result<ExitCode> {
    let code = livecare_build::wrapper::run(args).context("libcare-cc")?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
