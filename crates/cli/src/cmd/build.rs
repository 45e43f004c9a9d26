//! `livecare build`: build original, apply diffs, build patched, emit
//! OUTDIR/<buildid>.kpatch per changed program or library.

use std::path::PathBuf;
use std::process::ExitCode;

use livecare_build::{Options, Progress, Session, Style};

/// Flags of `livecare build`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Build the tree first as its README says (e.g. `./configure && make`; nginx: \
`./auto/configure && make`), then run `livecare build FIX.diff` in it; or give the whole \
build command after `--`, e.g. `-- sh -c './configure && make'`.

The stages run in a private copy of the tree (an overlay mounted at the tree's own path \
in a private mount namespace): the tree, its programs and their timestamps are never changed, and a build \
killed at any point leaves the tree as it was. In a built tree only the files the diffs \
change are compiled again; each relinked program must have the build-id of the tree's \
own copy. Where the kernel refuses the copy, livecare says why and builds in the tree \
itself.")]
pub struct Args {
    /// Source directory (the build runs there; diffs apply there with -p1).
    #[arg(short = 'C', long = "srcdir", default_value = ".")]
    pub srcdir: PathBuf,
    /// Run `make clean` before the original build (in livecare's private copy of the
    /// tree: nothing in the tree is deleted; rarely needed, an already-built tree works).
    #[arg(long)]
    pub clean: bool,
    /// Patch id written into the .kpatch headers.
    #[arg(short = 'i', long = "id")]
    pub id: Option<String>,
    /// Output directory for <buildid>.kpatch files [default: SRCDIR/patches]; it holds
    /// the patches only.
    #[arg(short = 'o', long = "outdir")]
    pub outdir: Option<PathBuf>,
    /// Work directory (kept assembly, original binaries, the private copy's changes,
    /// the build log) [default: /var/tmp/livecare-build-UID/NAME-HASH]; never inside
    /// the tree.
    #[arg(long = "workdir")]
    pub workdir: Option<PathBuf>,
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
    let outdir = args.outdir.unwrap_or_else(|| args.srcdir.join("patches"));
    let mut opts = Options::new(&args.srcdir, args.patches, &outdir, &tool);
    if let Some(w) = args.workdir {
        opts.workdir = w;
    }
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
            "{}: {} function(s) [{}] for {} (build-id {})",
            m.kpatch.display(),
            m.functions.len(),
            m.functions.join(", "),
            m.object.display(),
            m.build_id
        );
    }
    Ok(ExitCode::SUCCESS)
}
