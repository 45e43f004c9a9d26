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

/// LibCare's directory variables: `$VAR` if set (relative to the current
/// directory), else `default` (exported either way, as LibCare does).
fn lpmake_dir(var: &str, default: PathBuf) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os(var) {
        Some(v) if !v.is_empty() => std::path::absolute(PathBuf::from(v))?,
        _ => default,
    };
    std::env::set_var(var, &dir);
    Ok(dir)
}

/// Runs `libcare-patch-make`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let tool = std::env::current_exe()?;
    let srcdir = std::path::absolute(&args.srcdir)?;
    let patches = args
        .patches
        .iter()
        .map(std::path::absolute)
        .collect::<Result<Vec<_>, _>>()?;
    // LibCare's environment for the project's Makefiles: they test IS_LIBCARE_CC and
    // link the patched stage against the originals installed in LPMAKE_ORIGINAL_DIR.
    let here = std::env::current_dir()?;
    let original_dir = lpmake_dir("LPMAKE_ORIGINAL_DIR", here.join("lpmake"))?;
    let patched_dir = lpmake_dir("LPMAKE_PATCHED_DIR", here.join(".lpmaketmp/patched"))?;
    let patchroot = lpmake_dir("LPMAKE_PATCHROOT", here.join("patchroot"))?;
    std::env::set_var("IS_LIBCARE_CC", "y");
    // A parent make's flags (jobserver descriptors, -C) do not belong to this build.
    std::env::remove_var("MAKELEVEL");
    std::env::remove_var("MAKEFLAGS");
    let makefile = if srcdir.join("lpmakefile").is_file() {
        " -f lpmakefile"
    } else {
        ""
    };
    if args.clean && !args.update {
        // LibCare's order: the project's `make clean` (which may delete lpmake/, our
        // work directory), then fresh install directories; only then our build starts.
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("make{makefile} clean"))
            .current_dir(&srcdir)
            .status()
            .context("running make clean")?;
        if !status.success() {
            anyhow::bail!(
                "`make{makefile} clean` in {} failed ({status})",
                srcdir.display()
            );
        }
        for d in [&original_dir, &patched_dir] {
            if d.exists() {
                std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
            }
        }
    }
    for d in [&original_dir, &patched_dir, &patchroot] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut opts = Options::new(&srcdir, patches, &patchroot, &tool);
    // The work files stay outside the tree (a private copy of the tree is built); the
    // install trees in the tree are written through to it, as LibCare leaves them.
    opts.passthrough = [&original_dir, &patched_dir]
        .into_iter()
        .filter(|d| d.starts_with(&srcdir))
        .cloned()
        .collect();
    // `-u` reuses the original build.
    opts.keep_work = true;
    opts.patch_id = args.id;
    // LibCare's libcare-cc default when KPCC_PATCH_ARGS is unset (see `cc`).
    opts.diff_args = super::cc::LIBCARE_PATCH_ARGS.into();
    // As LibCare: each stage is installed (`make install DESTDIR=…`, or the variable
    // -d names) into LPMAKE_ORIGINAL_DIR or LPMAKE_PATCHED_DIR; a project without an
    // install rule (which LibCare refuses) is built all the same.
    // Plain `make` as LibCare runs it: a project's Makefile need not be -j safe (the
    // suite's are not: a program and its library have no dependency between them).
    let var = args.destdir.unwrap_or_else(|| "DESTDIR".into());
    opts.build_cmd = vec![
        "sh".into(),
        "-c".into(),
        format!(
            "make{makefile} && if ! make{makefile} -n install >/dev/null 2>&1; then :; \
             elif [ \"$KPATCH_STAGE\" = original ]; then \
             make{makefile} install {var}=\"$LPMAKE_ORIGINAL_DIR\"; else \
             make{makefile} install {var}=\"$LPMAKE_PATCHED_DIR\"; fi"
        ),
    ];
    let mut session = Session::new(opts, Progress::new(Style::LibCare))?;
    session.run(args.update)?;
    Ok(ExitCode::SUCCESS)
}
