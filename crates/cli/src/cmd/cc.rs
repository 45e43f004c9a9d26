//! `libcare-cc`: the gcc-compatible compiler wrapper.

use std::ffi::OsString;
use std::process::ExitCode;

/// Runs `libcare-cc` with gcc's arguments (argv[0] removed).
pub fn run(_args: Vec<OsString>) -> anyhow::Result<ExitCode> {
    super::not_implemented("libcare-cc")
}
