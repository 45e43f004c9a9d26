//! `livecare build`: build original, apply diffs, build patched, emit
//! OUTDIR/<buildid>.kpatch per changed program or library.

use std::path::PathBuf;
use std::process::ExitCode;

use livecare_build::{Options, Progress, Session, Style};

/// Flags of `livecare build`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Source directory (the build runs there; diffs apply there with -p1).
    #[arg(short = 'C', long = "srcdir", default_value = ".")]
    pub srcdir: PathBuf,
    /// Run `make clean` before the original build.
    #[arg(long)]
    pub clean: bool,
    /// Patch id written into the .kpatch headers.
    #[arg(short = 'i', long = "id")]
    pub id: Option<String>,
    /// Output directory for <buildid>.kpatch files (work files go in OUTDIR/.livecare).
    #[arg(short = 'o', long = "outdir", default_value = "patches")]
    pub outdir: PathBuf,
    /// Parallel jobs for the default `make -jN`.
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Only make patches for this linked output (repeatable; path relative to SRCDIR).
    /// A file outside SRCDIR is a deployed binary: the original build must reproduce it
    /// exactly (same build-id), or the build stops and says what differs.
    #[arg(long = "target")]
    pub targets: Vec<PathBuf>,
    /// Diff options for the assembly differ (as for kpatch_gensrc, e.g. "--force-global").
    #[arg(long = "diff-args", default_value = "")]
    pub diff_args: String,
    /// Source diffs, applied in order.
    #[arg(required = true)]
    pub patches: Vec<PathBuf>,
    /// Build command (default: make -jN).
    #[arg(last = true)]
    pub build_cmd: Vec<String>,
}

/// Runs `livecare build`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let tool = std::env::current_exe()?;
    let mut opts = Options::new(&args.srcdir, args.patches, &args.outdir, &tool);
    opts.clean = args.clean;
    opts.patch_id = args.id;
    opts.targets = args.targets;
    opts.diff_args = args.diff_args;
    if let Some(j) = args.jobs {
        opts.build_cmd = vec!["make".into(), format!("-j{j}")];
    }
    if !args.build_cmd.is_empty() {
        opts.build_cmd = args.build_cmd;
    }
    let mut session = Session::new(opts, Progress::new(Style::Auto))?;
    let made = session.run(false)?;
    for m in &made {
        println!(
            "{}: patch {}, {} function(s) [{}], {} data object(s) [{}] for {} (build-id {})",
            m.kpatch.display(),
            m.patch_id,
            m.functions.len(),
            m.functions.join(", "),
            m.data.len(),
            m.data.join(", "),
            m.object.display(),
            m.build_id
        );
    }
    Ok(ExitCode::SUCCESS)
}
