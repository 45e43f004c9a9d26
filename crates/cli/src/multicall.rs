//! Chooses the tool face from `argv[0]` and parses its command line.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::cmd;

/// The LibCare tool names this binary answers to.
pub const TOOL_NAMES: &[&str] = &[
    "libcare-ctl",
    "libcare-cc",
    "libcare-patch-make",
    "kpatch_gensrc",
    "kpatch_strip",
    "kpatch_make",
    "libcare-client",
    "libcare-server",
];

/// Native command line.
#[derive(Parser, Debug)]
#[command(
    name = "livecare",
    version,
    about = "Live patching for running Linux user-space processes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build original and patched trees and emit OUTDIR/<buildid>.kpatch per changed object.
    Build(cmd::build::Args),
    /// Apply a patch file (or a patch directory) to running processes.
    Patch(cmd::patch::Args),
    /// Remove applied patches (last-in first-out).
    Unpatch(cmd::unpatch::Args),
    /// Show the patches applied to running processes.
    Info(cmd::info::Args),
    /// Complete or roll back a patch or unpatch that was interrupted.
    Repair(cmd::repair::Args),
    /// Start a program and apply matching patches before main().
    Run(cmd::run::Args),
    /// Build, run, patch and unpatch a bundled C program (the README's main job).
    Demo(cmd::demo::Args),
    /// Diff two assembly files (or filter one) into augmented assembly (kpatch_gensrc).
    Gensrc(cmd::gensrc::Args),
    /// Post-link transforms of a patched binary (kpatch_strip).
    Strip(cmd::strip::Args),
    /// Wrap a relocatable patch ELF into a .kpatch container (kpatch_make).
    Make(cmd::make::Args),
    /// Validate a .kpatch file completely and print its contents.
    Inspect(cmd::inspect::Args),
    /// Create the LibCare tool-name symlinks in DIR.
    InstallLinks(cmd::install_links::Args),
    /// Compiler wrapper (libcare-cc); arguments are passed as to gcc.
    #[command(disable_help_flag = true)]
    Cc {
        /// Arguments for the compiler.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// LibCare-compatible patch-make (libcare-patch-make).
    PatchMake(cmd::patch_make::Args),
    /// Measure pause time, call overhead and gensrc throughput.
    Bench(cmd::bench::Args),
    /// Serve LibCare's socket protocol (libcare-ctl server): commands and start-up patching.
    Server(cmd::server::Args),
    /// Send one command to a server (libcare-client): [/SOCKET] CMD [ARG...].
    #[command(disable_help_flag = true)]
    Client {
        /// Socket (when it starts with `/`), command and arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// `libcare-ctl [-v] [-h] <cmd>`.
#[derive(Parser, Debug)]
#[command(
    name = "libcare-ctl",
    about = "Apply, remove and list live patches (LibCare-compatible)"
)]
struct CtlCli {
    /// Verbose output.
    #[arg(short, long)]
    verbose: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Apply patches: -p PID|all FILE|DIR.
    #[command(alias = "patch-user")]
    Patch(cmd::patch::Args),
    /// Remove patches: -p PID|all [-i ID] [BUILDID...]; without -i, all selected ones.
    #[command(alias = "unpatch-user")]
    Unpatch(cmd::unpatch::Args),
    /// List applied patches.
    #[command(alias = "info-user")]
    Info(cmd::info::Args),
    /// Listen on a Unix socket for commands: SOCK [STORAGE ROOT].
    Server(cmd::server::Args),
}

/// `libcare-server [-v] SOCK [STORAGE ROOT]` (LibcarePlus' server).
#[derive(Parser, Debug)]
#[command(
    name = "libcare-server",
    about = "Listen on a Unix socket for LibCare commands and start-up notifications"
)]
struct ServerCli {
    /// Verbose output.
    #[arg(short, long)]
    verbose: bool,
    #[command(flatten)]
    args: cmd::server::Args,
}

// A standalone tool whose flags are one `Args` struct (no doc comment: clap would show it as `about`).
#[derive(Parser, Debug)]
struct Standalone<T: Args> {
    #[command(flatten)]
    inner: T,
}

/// Parses `args` as the standalone tool `name` whose flags are `T`.
fn parse_as<T: Args>(name: &'static str, args: Vec<OsString>) -> Result<T, clap::Error> {
    let about = match name {
        "libcare-patch-make" => {
            "Build a project's original and patched code and make patches (LibCare-compatible)"
        }
        "kpatch_gensrc" => "Diff two assembly files (or filter one) into augmented assembly",
        "kpatch_strip" => "Post-link transforms of a patched binary",
        "kpatch_make" => "Wrap a relocatable patch ELF into a .kpatch container",
        _ => "",
    };
    let mut command = Standalone::<T>::command()
        .name(name)
        .bin_name(name)
        .about(about);
    let matches = command.try_get_matches_from_mut(args)?;
    Standalone::<T>::from_arg_matches(&matches).map(|s| s.inner)
}

/// Runs the tool chosen by `argv[0]`.
pub fn dispatch(args: Vec<OsString>) -> anyhow::Result<ExitCode> {
    let invoked = args
        .first()
        .map(|a| {
            Path::new(a)
                .file_name()
                .unwrap_or(a.as_os_str())
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    let face = cmd::Face::from_tool_name(&invoked);
    let exit_on_usage = |e: clap::Error| -> anyhow::Result<ExitCode> {
        // clap prints help/version with exit 0 and usage errors with exit 2.
        let code = if e.use_stderr() { cmd::EXIT_USAGE } else { 0 };
        let _ = e.print();
        Ok(ExitCode::from(code))
    };
    match invoked.as_str() {
        "libcare-ctl" => match CtlCli::try_parse_from(args) {
            Ok(cli) => match cli.command {
                CtlCommand::Patch(a) => cmd::patch::run(a, face),
                CtlCommand::Unpatch(a) => cmd::unpatch::run(a, face),
                CtlCommand::Info(a) => cmd::info::run(a, face),
                CtlCommand::Server(a) => cmd::server::run(a),
            },
            Err(e) => exit_on_usage(e),
        },
        "libcare-server" => match ServerCli::try_parse_from(args) {
            Ok(cli) => cmd::server::run(cli.args),
            Err(e) => exit_on_usage(e),
        },
        "libcare-client" => cmd::client::run("libcare-client", args.into_iter().skip(1).collect()),
        "libcare-cc" => cmd::cc::run_as(args.into_iter().skip(1).collect(), face),
        "libcare-patch-make" => match parse_as::<cmd::patch_make::Args>("libcare-patch-make", args)
        {
            Ok(a) => cmd::patch_make::run(a),
            Err(e) => exit_on_usage(e),
        },
        "kpatch_gensrc" => match parse_as::<cmd::gensrc::Args>("kpatch_gensrc", args) {
            Ok(a) => cmd::gensrc::run(a),
            Err(e) => exit_on_usage(e),
        },
        "kpatch_strip" => match parse_as::<cmd::strip::Args>("kpatch_strip", args) {
            Ok(a) => cmd::strip::run(a),
            Err(e) => exit_on_usage(e),
        },
        "kpatch_make" => match parse_as::<cmd::make::Args>("kpatch_make", args) {
            Ok(a) => cmd::make::run_as_kpatch_make(a),
            Err(e) => exit_on_usage(e),
        },
        _ => match Cli::try_parse_from(args) {
            Ok(cli) => match cli.command {
                Command::Build(a) => cmd::build::run(a),
                Command::Patch(a) => cmd::patch::run(a, face),
                Command::Unpatch(a) => cmd::unpatch::run(a, face),
                Command::Info(a) => cmd::info::run(a, face),
                Command::Repair(a) => cmd::repair::run(a, face),
                Command::Run(a) => cmd::run::run(a),
                Command::Demo(a) => cmd::demo::run(a),
                Command::Gensrc(a) => cmd::gensrc::run(a),
                Command::Strip(a) => cmd::strip::run(a),
                Command::Make(a) => cmd::make::run(a),
                Command::Inspect(a) => cmd::inspect::run(a),
                Command::InstallLinks(a) => cmd::install_links::run(a),
                Command::Cc { args } => cmd::cc::run(args),
                Command::PatchMake(a) => cmd::patch_make::run(a),
                Command::Bench(a) => cmd::bench::run(a),
                Command::Server(a) => cmd::server::run(a),
                Command::Client { args } => cmd::client::run("livecare client", args),
            },
            Err(e) => exit_on_usage(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_cli_is_well_formed() {
        Cli::command().debug_assert();
        CtlCli::command().debug_assert();
        ServerCli::command().debug_assert();
    }
}
