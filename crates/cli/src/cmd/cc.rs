//! `libcare-cc` (`livecare cc`): the gcc-compatible compiler wrapper.

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Context;

/// LibCare's `libcare-cc` diff options when `KPCC_PATCH_ARGS` is not set at all (both
/// LibCare and LibcarePlus): patch code reaches outside variables such as glibc's
/// `stderr` through the GOT, since a 32-bit pc-relative reference cannot span the
/// distance from the patch to a library's data.
pub const LIBCARE_PATCH_ARGS: &str = "--force-gotpcrel --os=rhel6";

/// Runs `libcare-cc` with gcc's arguments (argv[0] removed); `face` LibCare (invoked
/// as `libcare-cc`) takes LibCare's default diff options.
pub fn run_as(args: Vec<OsString>, face: super::Face) -> anyhow::Result<ExitCode> {
    if face == super::Face::LibCare && std::env::var_os("KPCC_PATCH_ARGS").is_none() {
        // Set in our own environment (single-threaded here) so that the wrapper and
        // any nested wrapper run see the same options, as LibCare's do.
        std::env::set_var("KPCC_PATCH_ARGS", LIBCARE_PATCH_ARGS);
    }
    run(args)
}

/// Runs `libcare-cc` with gcc's arguments (argv[0] removed).
pub fn run(args: Vec<OsString>) -> anyhow::Result<ExitCode> {
    let code = livecare_build::wrapper::run(args).context("libcare-cc")?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
