//! One module per subcommand. Each has an `Args` (clap) and a `run`.

pub mod bench;
pub mod build;
pub mod cc;
pub mod client;
pub mod demo;
pub mod gensrc;
pub mod info;
pub mod inspect;
pub mod install_links;
pub mod make;
pub mod patch;
pub mod patch_make;
pub mod repair;
pub mod run;
pub mod server;
pub mod strip;
pub mod unpatch;

/// Makes the child that `cmd` starts die with the thread that starts it: a `demo` or
/// `bench` killed before it could clean up would otherwise leave its target running
/// (a leftover bench target once held a CPU here for ten minutes, skewing every
/// figure measured after it).
pub fn dies_with_us(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe, the only call made between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Exit status for an error (nothing changed in any target).
pub const EXIT_ERROR: u8 = 1;
/// Exit status for a usage error.
pub const EXIT_USAGE: u8 = 2;
/// Exit status for partial success across several processes.
#[allow(dead_code)] // used once `-p all` reports partial success
pub const EXIT_PARTIAL: u8 = 3;
/// Exit status when a command on one process failed and the process died or was left
/// changed meanwhile (so exit status 1, "nothing changed", would be untrue).
pub const EXIT_CHANGED: u8 = 4;

/// The exit statuses of the commands that change processes, for their `--help`.
pub const EXIT_HELP: &str = "Exit status: 0 success; 1 error, nothing changed in any target; \
2 usage error; 3 with `-p all`: some processes done, others failed or could not be read \
(named on stderr); 4 the target died or was left changed while the command failed \
(the message says which; `livecare info` and `livecare repair` show and fix what was left).";

/// Which face the binary shows: its own, or LibCare's (output formats differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Face {
    /// `livecare ...`
    Native,
    /// Invoked as one of the LibCare tool names.
    LibCare,
}

impl Face {
    /// The face for a binary invoked as `name`.
    pub fn from_tool_name(name: &str) -> Face {
        if crate::multicall::TOOL_NAMES.contains(&name) {
            Face::LibCare
        } else {
            Face::Native
        }
    }
}

/// Every stop of a target's threads this run made (`stops` of the `--json` reports):
/// phase, process and window in `CLOCK_MONOTONIC` ns.
pub(crate) fn stops_json() -> serde_json::Value {
    livecare_process::stops::all()
        .into_iter()
        .map(|s| serde_json::json!({"pid": s.pid, "phase": s.phase, "window_ns": s.window_ns}))
        .collect()
}
