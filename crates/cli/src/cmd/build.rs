//! `livecare build`: build original, apply diffs, build patched, emit
//! OUTDIR/<buildid>.kpatch per changed program or library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use livecare_build::{Options, Progress, Session, StageTime, Style};

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
    /// exactly (same build-id), or the build stops and says what differs. If its debug
    /// info says it was built at another path, SRCDIR is built as if it were there.
    #[arg(long = "target")]
    pub targets: Vec<PathBuf>,
    /// Diff options for the assembly differ (as for kpatch_gensrc, e.g. "--force-global").
    #[arg(long = "diff-args", default_value = "")]
    pub diff_args: String,
    /// Print the result as one JSON document on stdout (patches made with their
    /// build-id, patch id, functions, data and size; the log; each stage's duration;
    /// on failure the error). Progress still goes to stderr.
    #[arg(long)]
    pub json: bool,
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
    let json = args.json;
    let mut session = match Session::new(opts, Progress::new(Style::Auto)) {
        Ok(s) => s,
        Err(e) if json => return Ok(json_failure(None, &[], &anyhow::Error::new(e))),
        Err(e) => return Err(e.into()),
    };
    let made = match session.run(false) {
        Ok(m) => m,
        Err(e) if json => {
            let log = session.log_path().to_path_buf();
            let stages = session.progress().stages().to_vec();
            return Ok(json_failure(Some(&log), &stages, &anyhow::Error::new(e)));
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        let patches: Vec<serde_json::Value> = made
            .iter()
            .map(|m| {
                serde_json::json!({
                    "path": m.kpatch,
                    "object": m.object,
                    "build_id": m.build_id,
                    "patch_id": m.patch_id,
                    "functions": m.functions,
                    "data": m.data,
                    "size": std::fs::metadata(&m.kpatch).map(|md| md.len()).ok(),
                })
            })
            .collect();
        let doc = serde_json::json!({
            "ok": true,
            "patches": patches,
            "log": session.log_path(),
            "stages": stages_json(session.progress().stages()),
            "error": null,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
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

fn stages_json(stages: &[StageTime]) -> Vec<serde_json::Value> {
    stages
        .iter()
        .map(|s| serde_json::json!({"stage": s.step.name(), "seconds": s.seconds, "ok": s.ok}))
        .collect()
}

/// The `--json` document of a failed build (also said on stderr); exit status 1.
fn json_failure(log: Option<&Path>, stages: &[StageTime], err: &anyhow::Error) -> ExitCode {
    eprintln!("error: {err:#}");
    let doc = serde_json::json!({
        "ok": false,
        "patches": [],
        "log": log,
        "stages": stages_json(stages),
        "error": format!("{err:#}"),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".into())
    );
    ExitCode::from(super::EXIT_ERROR)
}
