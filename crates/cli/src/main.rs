//! `livecare`: live patching for running Linux user-space processes.
//!
//! One binary with subcommands. Invoked under a LibCare tool name (`libcare-ctl`,
//! `libcare-cc`, `libcare-patch-make`, `kpatch_gensrc`, `kpatch_strip`, `kpatch_make`),
//! it behaves as that tool, so LibCare-style scripts run unchanged. This crate only
//! parses flags, wires the library crates together and prints.

mod cmd;
mod multicall;

use std::process::ExitCode;

fn main() -> ExitCode {
    restore_sigpipe();
    init_logging();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let outcome = multicall::dispatch(args);
    match outcome {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(cmd::EXIT_ERROR)
        }
    }
}

/// Logs go to stderr, filtered by `LIVECARE_LOG` (e.g. `LIVECARE_LOG=debug`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LIVECARE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .try_init();
}

/// Output piped into `head` must end the program quietly, not panic on EPIPE.
fn restore_sigpipe() {
    // SAFETY: setting a signal disposition to the default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
