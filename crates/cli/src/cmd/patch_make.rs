//! `libcare-patch-make` (`livecare patch-make`): LibCare's patch builder, with its
//! stage banners; patches go to `patchroot/<buildid>.kpatch`, originals to `lpmake/`.

use std::path::PathBuf;
use std::process::ExitCode;

use livecare_build::{Options, Progress, Session, Style};

/// Flags of `libcare-patch-make`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Change to this directory before the build.
    #[arg(short = 's', long = "srcdir", default_value = ".")]
    pub srcdir: PathBuf,
    /// Do a clean build (`make clean` first).
    #[arg(short = 'c', long = "clean")]
    pub clean: bool,
    /// Only rebuild the patches, reusing the original build kept in lpmake/.
    #[arg(short = 'u', long = "update")]
    pub update: bool,
    /// Install variable of the project (DESTDIR, or e.g. PREFIX for redis): each stage
    /// also runs `make install VAR=lpmake/install/<stage>`.
    #[arg(short = 'd', long = "destdir")]
    pub destdir: Option<String>,
    /// Patch id written into the .kpatch headers.
    #[arg(short = 'i', long = "id")]
    pub id: Option<String>,
    /// Source diffs, applied in order.
    #[arg(required = true)]
    pub patches: Vec<PathBuf>,
}

/// Runs `libcare-patch-make`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let tool = std::env::current_exe()?;
    let srcdir = std::path::absolute(&args.srcdir)?;
    let patches = args
        .patches
        .iter()
        .map(std::path::absolute)
        .collect::<Result<Vec<_>, _>>()?;
    let mut opts = Options::new(&srcdir, patches, &srcdir.join("patchroot"), &tool);
    // The work files stay outside the tree (a private copy of the tree is built);
    // lpmake/ in the tree keeps LibCare's install trees, written through to the tree.
    let lpmake = srcdir.join("lpmake");
    opts.passthrough = vec![lpmake.clone()];
    // `-u` reuses the original build.
    opts.keep_work = true;
    opts.clean = args.clean;
    opts.patch_id = args.id;
    // LibCare's libcare-cc default when KPCC_PATCH_ARGS is unset (see `cc`).
    opts.diff_args = super::cc::LIBCARE_PATCH_ARGS.into();
    if let Some(var) = args.destdir {
        let dest = lpmake.join("install");
        opts.build_cmd = vec![
            "sh".into(),
            "-c".into(),
            format!(
                "{} && make install {var}=\"{}/$KPATCH_STAGE\"",
                opts.build_cmd.join(" "),
                dest.display()
            ),
        ];
    }
    let mut session = Session::new(opts, Progress::new(Style::LibCare))?;
    session.run(args.update)?;
    Ok(ExitCode::SUCCESS)
}
