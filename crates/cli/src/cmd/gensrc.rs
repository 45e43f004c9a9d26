//! `kpatch_gensrc`: filter one assembly file, or diff two into augmented assembly.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};

/// Flags of `kpatch_gensrc`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Target OS flavour (accepted for LibCare compatibility; only `rhel6` style output exists).
    #[arg(long = "os")]
    pub os: Option<String>,
    /// Filter line-number/DWARF noise from one input (the original stage).
    #[arg(long = "dbg-filter")]
    pub dbg_filter: bool,
    /// Accepted for LibCare compatibility; `.cfi_*` are always kept (patch code needs CFI).
    #[arg(long = "dbg-filter-eh-frame")]
    pub dbg_filter_eh_frame: bool,
    /// Accepted for LibCare compatibility; `.gcc_except_table` is kept verbatim.
    #[arg(long = "dbg-filter-gcc-except-table")]
    pub dbg_filter_gcc_except_table: bool,
    /// Mark every function the patch touches `.globl`.
    #[arg(long = "force-global")]
    pub force_global: bool,
    /// Route references from patch code to outside variables through the GOT.
    #[arg(long = "force-gotpcrel")]
    pub force_gotpcrel: bool,
    /// Treat functions whose only change is shifted `__LINE__` constants as unchanged.
    #[arg(long = "ignore-line-macros")]
    pub ignore_line_macros: bool,
    /// Accepted for LibcarePlus compatibility: there it only turns off its optional
    /// function filter (a config file), which livecare does not have.
    #[arg(long = "test-mode")]
    pub test_mode: bool,
    /// Print changed/added functions and warnings about unknown directives.
    #[arg(short = 'v', long = "verbose")]
    pub verbose: bool,
    /// Input assembly (once: filter; twice: original then patched). `-` is stdin.
    #[arg(short = 'i', required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output assembly (`-` or absent: stdout).
    #[arg(short = 'o')]
    pub output: Option<PathBuf>,
}

fn read_input(p: &Path) -> anyhow::Result<String> {
    if p == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        return Ok(s);
    }
    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}

/// Runs `kpatch_gensrc`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let opts = asm_diff::Options {
        force_global: args.force_global,
        force_gotpcrel: args.force_gotpcrel,
        ignore_line_macros: args.ignore_line_macros,
        verbose: args.verbose,
    };
    let out = match args.inputs.as_slice() {
        [one] => {
            let src = read_input(one)?;
            asm_diff::filter(&src, &opts).with_context(|| format!("filtering {}", one.display()))?
        }
        [orig, patched] => {
            if args.dbg_filter {
                bail!("--dbg-filter takes exactly one input");
            }
            let (a, b) = (read_input(orig)?, read_input(patched)?);
            let diff = asm_diff::gensrc(&a, &b, &opts).with_context(|| {
                format!("diffing {} against {}", orig.display(), patched.display())
            })?;
            for w in &diff.warnings {
                eprintln!("warning: {w}");
            }
            if args.verbose {
                eprintln!("changed: {}", diff.changed.join(" "));
                eprintln!("added: {}", diff.added.join(" "));
            }
            diff.asm
        }
        _ => bail!(
            "expected one (-i IN) or two (-i ORIG -i PATCHED) inputs, got {}",
            args.inputs.len()
        ),
    };
    match args.output.as_deref() {
        None => std::io::stdout()
            .write_all(out.as_bytes())
            .context("writing stdout")?,
        Some(p) if p == Path::new("-") => std::io::stdout()
            .write_all(out.as_bytes())
            .context("writing stdout")?,
        Some(p) => std::fs::write(p, out).with_context(|| format!("writing {}", p.display()))?,
    }
    Ok(ExitCode::SUCCESS)
}
