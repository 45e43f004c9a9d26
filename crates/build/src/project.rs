//! Patch-build orchestration shared by `livecare build` and `libcare-patch-make`:
//! build the original tree through the wrapper, apply the diffs, rebuild incrementally,
//! turn every changed linked output into `<buildid>.kpatch`. The stages run in a
//! private overlay of the tree (`private_tree`), so the operator's tree is never
//! changed; where that is impossible, in the tree itself, putting the source back.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::pipeline::{self, PipelineError};
use crate::private_tree::PrivateTree;
use crate::progress::{Progress, Step};
use crate::wrapper::{CHANGE_LOG_ENV, COMPILE_LOG_ENV, LINK_LOG_ENV, WRAPPER_DIR_ENV};

/// Where the stages build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// In a private overlay of the tree mounted at the tree's own path (needs root):
    /// the tree is never written. Falls back to `InPlace`, saying why, when the
    /// kernel or the privileges refuse it.
    Private,
    /// In the tree itself: the diffs are applied there and undone afterwards, and the
    /// tree's programs are relinked (and put back).
    InPlace,
}

/// The default work directory for a tree: outside it and outside the output
/// directory, on a file system that can hold an overlay's upper layer.
pub fn default_workdir(srcdir: &Path) -> PathBuf {
    let abs = srcdir
        .canonicalize()
        .or_else(|_| std::path::absolute(srcdir))
        .unwrap_or_else(|_| srcdir.to_path_buf());
    let name: String = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let hash = abs
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    workdir_base().join(format!("{name}-{hash:016x}"))
}

/// `/var/tmp/livecare-build-<uid>`: one per user, so users do not share (or plant)
/// each other's work files.
fn workdir_base() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    PathBuf::from(format!("/var/tmp/livecare-build-{uid}"))
}

/// What to build and where the results go.
#[derive(Debug, Clone)]
pub struct Options {
    /// The project's source directory (the build runs there; diffs apply there with -p1).
    pub srcdir: PathBuf,
    /// The source diffs, applied in order.
    pub patches: Vec<PathBuf>,
    /// Where `<buildid>.kpatch` files are written.
    pub outdir: PathBuf,
    /// Where the wrapper scripts, kept assembly, original binaries, the private tree's
    /// changes and the log go (outside the tree).
    pub workdir: PathBuf,
    /// Where the stages build.
    pub isolation: Isolation,
    /// Directories inside the tree that the build writes for the caller (e.g.
    /// `libcare-patch-make`'s `lpmake/` install trees): their writes reach the tree.
    pub passthrough: Vec<PathBuf>,
    /// Keep the private tree and the kept assembly after a successful build (for a
    /// later `--update`); otherwise they are removed.
    pub keep_work: bool,
    /// Patch id written into the `.kpatch` headers.
    pub patch_id: Option<String>,
    /// Run `clean_cmd` before the original build.
    pub clean: bool,
    /// The build command (run in `srcdir`, both stages).
    pub build_cmd: Vec<String>,
    /// The clean command.
    pub clean_cmd: Vec<String>,
    /// Only make patches for these linked outputs (all changed ones when empty).
    /// A path outside `srcdir` that names an existing file is a deployed binary: the
    /// original stage must rebuild it bit for bit (same build-id), or the build stops
    /// and says what differs.
    pub targets: Vec<PathBuf>,
    /// The `livecare` executable the wrapper scripts run.
    pub tool: PathBuf,
    /// `KPCC_PATCH_ARGS` when the environment does not set it (empty: no diff options).
    pub diff_args: String,
    /// Put the original binaries back into the tree at the end.
    pub restore_outputs: bool,
}

impl Options {
    /// Defaults for building `patches` in `srcdir`: `make -jN`, output in `outdir`,
    /// work files in `default_workdir(srcdir)`, a private build tree.
    pub fn new(srcdir: &Path, patches: Vec<PathBuf>, outdir: &Path, tool: &Path) -> Options {
        let jobs = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Options {
            srcdir: srcdir.to_path_buf(),
            patches,
            outdir: outdir.to_path_buf(),
            workdir: default_workdir(srcdir),
            isolation: Isolation::Private,
            passthrough: Vec::new(),
            keep_work: false,
            patch_id: None,
            clean: false,
            build_cmd: vec!["make".into(), format!("-j{jobs}")],
            clean_cmd: vec!["make".into(), "clean".into()],
            targets: Vec::new(),
            tool: tool.to_path_buf(),
            diff_args: String::new(),
            restore_outputs: true,
        }
    }
}

/// Errors of the orchestration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Bad options.
    #[error("{0}")]
    Usage(String),
    /// A diff does not apply to the tree; nothing was built or changed.
    #[error("patch {patch} does not apply to {srcdir} (nothing was built):\n{output}")]
    PatchDoesNotApply {
        /// The diff.
        patch: PathBuf,
        /// The tree.
        srcdir: PathBuf,
        /// What `patch` said.
        output: String,
    },
    /// A command failed.
    #[error("{stage}: `{cmd}` failed ({status}); full log: {log}\n{tail}")]
    Command {
        /// The stage.
        stage: &'static str,
        /// The command line.
        cmd: String,
        /// How it ended.
        status: String,
        /// The log file.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
    /// The original build compiled nothing, not even the files the diffs change.
    #[error("`{cmd}` compiled nothing in the original build, not even the files the diffs change ({touched}), so livecare saw no original code to patch: does that command build them (pass the make target that does after --)? Full log: {log}")]
    AlreadyBuilt {
        /// The build command.
        cmd: String,
        /// The files the diffs change.
        touched: String,
        /// The log file.
        log: PathBuf,
    },
    /// The original build relinked an output of the tree to another build-id than
    /// the one the tree holds: a patch would not apply to the tree's binary.
    #[error("the original build relinked {output} with build-id {built}, but the tree's own {output} has build-id {tree}: a patch made from this build would not apply to the tree's program. {differences} This happens when the tree was built with other flags, another compiler or another environment (e.g. SOURCE_DATE_EPOCH), or when a file the diffs change uses __DATE__/__TIME__. Rebuild the tree exactly as it is deployed (or pass that build command after --) and run again; full log: {log}")]
    NotTheTreesBuild {
        /// The output.
        output: PathBuf,
        /// Its build-id in the tree.
        tree: String,
        /// Its build-id as the original stage relinked it.
        built: String,
        /// What differs, as a sentence.
        differences: String,
        /// The log file.
        log: PathBuf,
    },
    /// The tree has no Makefile yet but a configure step.
    #[error("{srcdir} has no Makefile: configure it first, as the project's README says (run {script} there), or give the whole build command after --, e.g. `livecare build FIX.diff -- sh -c '{script} && make'`")]
    NotConfigured {
        /// The tree.
        srcdir: PathBuf,
        /// The configure step (`./configure`, `./auto/configure`, `cmake ...`).
        script: String,
    },
    /// The clean command deleted what the build command needs.
    #[error("the clean command `{cmd}` deleted the Makefile (the project's clean removes what its configure made, as nginx's does), so `make` cannot run; the real tree is untouched. Run without --clean (livecare builds in a private copy of the tree, a clean is not needed), or give a build command that configures again after --")]
    CleanRemovedMakefile {
        /// The clean command.
        cmd: String,
    },
    /// The original build linked nothing through the wrapper.
    #[error("the original build linked no program or library through the wrapper (does the build use $CC / cc / gcc from PATH?); full log: {log}")]
    NothingLinked {
        /// The log file.
        log: PathBuf,
    },
    /// The output directory already holds a different patch for the same build-id.
    #[error("{kpatch} already holds a different patch for {object} (an earlier fix?); it was kept and no patch was written: apply or move it away, or choose another output directory with -o")]
    PatchExists {
        /// The existing patch file.
        kpatch: PathBuf,
        /// The binary both patches are for.
        object: PathBuf,
    },
    /// No patch resulted; the reason says why.
    #[error("no patch was produced: {reason}; full log: {log}")]
    NoPatch {
        /// Why.
        reason: String,
        /// The log file.
        log: PathBuf,
    },
    /// The post-link pipeline failed for an output.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

fn io(path: &Path, source: std::io::Error) -> BuildError {
    BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A linked output of the original build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginalOutput {
    /// Its path in the tree.
    pub path: PathBuf,
    /// Where the original binary is kept.
    pub stash: PathBuf,
    /// Its GNU build-id (hex).
    pub build_id: String,
}

/// A `.kpatch` file that was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadePatch {
    /// The linked output in the tree it patches.
    pub object: PathBuf,
    /// The original binary (kept copy) the patch applies to.
    pub original: PathBuf,
    /// The build-id of the original.
    pub build_id: String,
    /// The `.kpatch` file.
    pub kpatch: PathBuf,
    /// Functions replaced or added.
    pub functions: Vec<String>,
    /// Data objects added (string constants, statics), not functions.
    pub data: Vec<String>,
    /// The patch's id, as `patch`, `info`, `unpatch` and `inspect` print it.
    pub patch_id: String,
}

/// One patch build, stage by stage. Dropping it puts the original source back.
pub struct Session {
    /// Deployed binaries (`--target` files outside the tree) the original stage must match.
    deployed: Vec<PathBuf>,
    opts: Options,
    progress: Progress,
    originals: Vec<OriginalOutput>,
    backups: Vec<(PathBuf, Option<PathBuf>)>,
    log: PathBuf,
    /// The private view of the tree the stages build in (None: in place).
    private: Option<PrivateTree>,
    /// `-ffile-prefix-map=TREE=DEPLOYED_DIR` added to every compile, when the deployed
    /// binary was built at a path where the tree cannot be mounted.
    prefix_map: Option<String>,
    /// Whether the work files of earlier runs were dropped for this build.
    fresh: bool,
    /// Outputs whose rebuilt build-id differs from the tree's copy: no patch for them.
    mismatched: Vec<PathBuf>,
    /// Held (flock) while the session lives: one build per work directory.
    _lock: File,
}

impl Session {
    /// Prepares the work directory and the wrapper scripts.
    pub fn new(mut opts: Options, progress: Progress) -> Result<Session, BuildError> {
        let abs = |p: &Path| -> Result<PathBuf, BuildError> {
            std::path::absolute(p).map_err(|e| io(p, e))
        };
        // The build sees the tree by its real path (the kernel's cwd): link logs name
        // outputs that way.
        opts.srcdir = opts.srcdir.canonicalize().or_else(|_| abs(&opts.srcdir))?;
        opts.outdir = abs(&opts.outdir)?;
        opts.workdir = abs(&opts.workdir)?;
        let mut deployed = Vec::new();
        let mut in_tree = Vec::new();
        for t in &opts.targets {
            let here = abs(t)?;
            if here.is_file() && !here.starts_with(&opts.srcdir) {
                deployed.push(here);
            } else {
                in_tree.push(abs(&opts.srcdir.join(t))?);
            }
        }
        opts.targets = in_tree;
        // A bad patch id would only surface when the patches are made, after the builds.
        if let Some(id) = &opts.patch_id {
            kpatch_file::PatchId::parse(id)
                .map_err(|e| BuildError::Usage(format!("patch id {id:?}: {e}")))?;
        }
        if !opts.srcdir.is_dir() {
            return Err(BuildError::Usage(format!(
                "{} is not a directory",
                opts.srcdir.display()
            )));
        }
        for p in &mut opts.patches {
            *p = abs(p)?;
            if !p.is_file() {
                return Err(BuildError::Usage(format!(
                    "patch {} does not exist",
                    p.display()
                )));
            }
        }
        if opts.build_cmd.is_empty() {
            return Err(BuildError::Usage("empty build command".into()));
        }
        // Where the deployed binaries were built, when not in this tree (checked now,
        // not after the whole original build).
        let mut elsewhere: Option<(PathBuf, crate::deployed::BuiltElsewhere)> = None;
        for d in &deployed {
            let Some(e) = crate::deployed::built_elsewhere(d, &opts.srcdir) else {
                continue;
            };
            match &elsewhere {
                Some((first, f)) if f.root != e.root => {
                    return Err(BuildError::Usage(format!(
                        "the deployed {} was built in {} but the deployed {} in {}: one \
                         build cannot reproduce both; build a patch for each separately",
                        first.display(),
                        f.root.display(),
                        d.display(),
                        e.root.display()
                    )))
                }
                Some(_) => {}
                None => elsewhere = Some((d.clone(), e)),
            }
        }
        check_configured(&opts)?;
        check_workdir_base(&opts.workdir)?;
        for d in [&opts.outdir, &opts.workdir] {
            std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
        }
        opts.workdir = opts
            .workdir
            .canonicalize()
            .map_err(|e| io(&opts.workdir, e))?;
        for p in &mut opts.passthrough {
            *p = abs(&opts.srcdir.join(&*p))?;
        }
        let lock = lock_workdir(&opts.workdir)?;
        let log = opts.workdir.join("build.log");
        let session = Session {
            deployed,
            opts,
            progress,
            originals: Vec::new(),
            backups: Vec::new(),
            log,
            private: None,
            prefix_map: None,
            fresh: false,
            mismatched: Vec::new(),
            _lock: lock,
        };
        let mut session = session;
        session.progress.log_file(&session.log);
        session.install_wrapper()?;
        session.recover_interrupted()?;
        session.choose_isolation()?;
        if let Some((d, e)) = elsewhere {
            session.reproduce_build_dir(&d, &e)?;
        }
        Ok(session)
    }

    /// Sets up the private tree, or says loudly why the build runs in the tree itself.
    fn choose_isolation(&mut self) -> Result<(), BuildError> {
        if self.opts.isolation == Isolation::InPlace {
            return Ok(());
        }
        let tree = &self.opts.srcdir;
        let why = if self.opts.workdir.starts_with(tree) || tree.starts_with(&self.opts.workdir) {
            Err(format!(
                "the work directory {} overlaps the tree (choose one outside it with --workdir)",
                self.opts.workdir.display()
            ))
        } else {
            let mut p = PrivateTree::new(
                tree,
                &self.opts.workdir.join("tree"),
                &self.opts.passthrough,
            );
            p.probe().map(|()| p)
        };
        match why {
            Ok(p) => self.private = Some(p),
            Err(why) => {
                self.opts.isolation = Isolation::InPlace;
                self.progress.note(&format!(
                    "WARNING: building in the tree itself, not in a private copy: {why}. \
                     Its sources are patched during the build and put back after, and its \
                     programs are relinked (and put back)"
                ));
            }
        }
        Ok(())
    }

    /// Makes the stages see the paths the deployed binary `d`, built in `e.root`, was
    /// built with: the private view of the tree is mounted at that path (inside the
    /// build's own mount namespace; the real directory is not touched), or, where
    /// that is impossible (the directory is gone, no private view), gcc maps the
    /// tree's path to it in what it records (`-ffile-prefix-map`, which gcc leaves out
    /// of `DW_AT_producer`, so the output stays bit-identical). Whether it really is,
    /// the build-id comparison after the original stage says.
    fn reproduce_build_dir(
        &mut self,
        d: &Path,
        e: &crate::deployed::BuiltElsewhere,
    ) -> Result<(), BuildError> {
        let root = &e.root;
        let overlaps = |a: &Path, b: &Path| a.starts_with(b) || b.starts_with(a);
        let mount = if !root.is_dir() {
            Err(format!("{} does not exist", root.display()))
        } else if !self.opts.passthrough.is_empty() {
            Err("the build writes through to the tree".to_string())
        } else if overlaps(root, &self.opts.srcdir) || overlaps(root, &self.opts.workdir) {
            Err(format!(
                "{} overlaps the tree or the work directory {}",
                root.display(),
                self.opts.workdir.display()
            ))
        } else {
            match &mut self.private {
                Some(p) => p.mount_at(root),
                None => Err("the build has no private view of the tree".to_string()),
            }
        };
        let why = match mount {
            Ok(()) => {
                // In-tree targets are named as the build sees them.
                for t in &mut self.opts.targets {
                    if let Ok(rel) = t.strip_prefix(&self.opts.srcdir) {
                        *t = root.join(rel);
                    }
                }
                self.progress.note(&format!(
                    "the deployed {} was built in {}: building this tree as if it were \
                     there (a private mount seen only by the build; {} is not touched)",
                    d.display(),
                    root.display(),
                    root.display()
                ));
                return Ok(());
            }
            Err(why) => why,
        };
        let (from, to) = (self.opts.srcdir.to_string_lossy(), root.to_string_lossy());
        if from.contains(char::is_whitespace) || to.contains(char::is_whitespace) {
            return Err(BuildError::Usage(crate::deployed::cannot_reproduce(
                d,
                &self.opts.srcdir,
                e,
                &format!("{why}, and a path with blanks cannot be mapped with -ffile-prefix-map"),
            )));
        }
        self.progress.note(&format!(
            "the deployed {} was built in {} ({why}): compiling with \
             -ffile-prefix-map={from}={to} so the debug info names the same paths",
            d.display(),
            root.display()
        ));
        self.prefix_map = Some(format!("-ffile-prefix-map={from}={to}"));
        Ok(())
    }

    /// Whether the tree is seen through a private overlay.
    pub fn is_private(&self) -> bool {
        self.private.is_some()
    }

    /// Drops the private tree's changes and the kept assembly of earlier runs, once
    /// per session (not for `--update`, which reuses them).
    fn ensure_fresh(&mut self) -> Result<(), BuildError> {
        if self.fresh {
            return Ok(());
        }
        self.fresh = true;
        if let Some(p) = &self.private {
            p.reset()
                .map_err(|e| io(&self.opts.workdir.join("tree"), e))?;
        }
        // Stale assembly of another run would be taken for this run's originals.
        for d in ["asm", "original"] {
            let _ = std::fs::remove_dir_all(self.opts.workdir.join(d));
        }
        let _ = std::fs::remove_file(&self.log);
        Ok(())
    }

    /// Where livecare reads a file of the tree as the build left it (None: the build
    /// deleted it, or it does not exist).
    fn built_file(&self, path: &Path) -> Option<PathBuf> {
        match &self.private {
            Some(p) => p.built_file(path),
            None => path.is_file().then(|| path.to_path_buf()),
        }
    }

    /// A command run in the tree as the build sees it.
    fn tree_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command, BuildError> {
        let mut c = Command::new(program);
        c.current_dir(&self.opts.srcdir);
        if let Some(p) = &self.private {
            p.enter(&mut c).map_err(BuildError::Usage)?;
        }
        Ok(c)
    }

    fn journal(&self) -> PathBuf {
        self.opts.workdir.join("applied.tsv")
    }

    /// Puts back sources that an interrupted earlier run (killed while the diffs were
    /// applied) left patched, using its journal of backed-up files.
    fn recover_interrupted(&mut self) -> Result<(), BuildError> {
        // Earlier versions kept their work files in OUTDIR/.livecare (livecare build)
        // or SRCDIR/lpmake (libcare-patch-make).
        for legacy in [
            self.opts.outdir.join(".livecare"),
            self.opts.srcdir.join("lpmake"),
        ] {
            let journal = legacy.join("applied.tsv");
            if journal != self.journal() && journal.is_file() {
                let _ = std::fs::rename(&journal, self.journal());
            }
        }
        let Ok(text) = std::fs::read_to_string(self.journal()) else {
            return Ok(());
        };
        self.backups = text
            .lines()
            .filter_map(|l| {
                let (file, copy) = l.split_once('\t')?;
                Some((
                    PathBuf::from(file),
                    (copy != "-").then(|| PathBuf::from(copy)),
                ))
            })
            .collect();
        self.progress.note(&format!(
            "restoring {} source file(s) left patched by an interrupted run",
            self.backups.len()
        ));
        let keep_outputs = std::mem::replace(&mut self.opts.restore_outputs, false);
        let result = self.restore_files();
        self.opts.restore_outputs = keep_outputs;
        result
    }

    /// The log file with the full compiler output.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The options in effect (paths made absolute).
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The progress reporter (to add notes).
    pub fn progress(&mut self) -> &mut Progress {
        &mut self.progress
    }

    fn bin_dir(&self) -> PathBuf {
        self.opts.workdir.join("bin")
    }

    /// Writes `bin/libcare-cc` (a link to this tool) and `cc`/`gcc`/`c++`/`g++` scripts
    /// that run it with the right real compiler.
    fn install_wrapper(&self) -> Result<(), BuildError> {
        use std::os::unix::fs::PermissionsExt;
        let bin = self.bin_dir();
        std::fs::create_dir_all(&bin).map_err(|e| io(&bin, e))?;
        let link = bin.join("libcare-cc");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&self.opts.tool, &link).map_err(|e| io(&link, e))?;
        let skip = Some(bin.as_path());
        let gcc = crate::wrapper::find_real_compiler("gcc", skip).unwrap_or_else(|| "gcc".into());
        let gxx = crate::wrapper::find_real_compiler("g++", skip).unwrap_or_else(|| "g++".into());
        for (names, var, real) in [
            (["cc", "gcc"], "KPCCREAL", &gcc),
            (["c++", "g++"], "KPCCREAL_CXX", &gxx),
        ] {
            // Paths are single-quoted whole (any byte but NUL is safe in there): an
            // output directory named `a'$(cmd)` must not run `cmd`.
            let mut script =
                format!("#!/bin/sh\nKPCCREAL=\"${{{var}}}\"\n[ -n \"$KPCCREAL\" ] || KPCCREAL=")
                    .into_bytes();
            script.extend(sh_quote(real));
            script.extend(b"\nexport KPCCREAL\nexec ");
            script.extend(sh_quote(&link));
            script.extend(b" \"$@\"\n");
            for name in names {
                let p = bin.join(name);
                std::fs::write(&p, &script).map_err(|e| io(&p, e))?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| io(&p, e))?;
            }
        }
        Ok(())
    }

    fn link_log(&self, stage: &str) -> PathBuf {
        self.opts.workdir.join(format!("links.{stage}"))
    }

    fn compile_log(&self, stage: &str) -> PathBuf {
        self.opts.workdir.join(format!("compiled.{stage}"))
    }

    fn change_log(&self) -> PathBuf {
        self.opts.workdir.join("changes.log")
    }

    /// Runs `cmd` in the tree with the wrapper environment for `stage`, output to the log.
    fn run_build(&mut self, stage: &'static str, cmd: &[String]) -> Result<(), BuildError> {
        let bin = self.bin_dir();
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| io(&self.log, e))?;
        let _ = writeln!(log, "===== {stage}: {} =====", cmd.join(" "));
        let err_log = log.try_clone().map_err(|e| io(&self.log, e))?;
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![bin.clone()];
        paths.extend(std::env::split_paths(&path));
        let mut c = self.tree_command(&cmd[0])?;
        c.args(&cmd[1..])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .env("KPATCH_STAGE", stage)
            .env("PATH", std::env::join_paths(paths).unwrap_or(path))
            .env(WRAPPER_DIR_ENV, &bin)
            .env("KPATCH_ASM_DIR", self.opts.workdir.join("asm"))
            .env(LINK_LOG_ENV, self.link_log(stage))
            .env(CHANGE_LOG_ENV, self.change_log());
        for (var, script, real_var) in [("CC", "cc", "KPCCREAL"), ("CXX", "c++", "KPCCREAL_CXX")] {
            let (cc, real) =
                wrapped_compiler(std::env::var(var).ok().as_deref(), &bin.join(script), &bin);
            c.env(var, cc);
            if let Some(real) = real {
                if std::env::var_os(real_var).is_none() {
                    c.env(real_var, real);
                }
            }
        }
        // No SOURCE_DATE_EPOCH or other variable of our own: the environment must not
        // change what the build makes (a build stamp would change the build-id). Only
        // the touched units are compiled again, so __DATE__ elsewhere cannot differ.
        // Set even when empty: `libcare-cc` with no KPCC_PATCH_ARGS at all takes
        // LibCare's default (`--force-gotpcrel`), which `diff_args` decides here.
        if std::env::var_os("KPCC_PATCH_ARGS").is_none() {
            c.env("KPCC_PATCH_ARGS", &self.opts.diff_args);
        }
        // The wrapper appends these to every compile (LibCare's variable): the path
        // map to the deployed binary's build directory.
        if let Some(map) = &self.prefix_map {
            let mut args = std::env::var("KPCC_APPEND_ARGS").unwrap_or_default();
            if !args.is_empty() {
                args.push(' ');
            }
            args.push_str(map);
            c.env("KPCC_APPEND_ARGS", args);
        }
        // Units compiled, counted for the progress display against the stage before.
        let compiled = self.compile_log(stage);
        let expected = match stage {
            "original" => count_lines(&compiled),
            "patched" => count_lines(&self.compile_log("original")),
            _ => None,
        };
        let _ = std::fs::remove_file(&compiled);
        c.env(COMPILE_LOG_ENV, &compiled);
        let spawned = c.spawn().and_then(|mut child| loop {
            if let Some(status) = child.try_wait()? {
                break Ok(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
            self.progress
                .compiled(count_lines(&compiled).unwrap_or(0), expected);
        });
        let status = spawned.map_err(|e| BuildError::Command {
            stage,
            cmd: cmd.join(" "),
            status: e.to_string(),
            log: self.log.clone(),
            tail: String::new(),
        })?;
        self.progress
            .compiled(count_lines(&compiled).unwrap_or(0), expected);
        if !status.success() {
            return Err(BuildError::Command {
                stage,
                cmd: cmd.join(" "),
                status: status.to_string(),
                log: self.log.clone(),
                tail: tail(&self.log, 20),
            });
        }
        Ok(())
    }

    fn step<T>(
        &mut self,
        step: Step,
        f: impl FnOnce(&mut Session) -> Result<(T, String), BuildError>,
    ) -> Result<T, BuildError> {
        self.progress.begin(step);
        match f(self) {
            Ok((v, summary)) => {
                self.progress.end(true, &summary);
                Ok(v)
            }
            Err(e) => {
                self.progress.end(false, "");
                Err(e)
            }
        }
    }

    /// The files each diff touches, relative to the tree (`-p1`).
    fn touched_files(&self) -> Result<Vec<PathBuf>, BuildError> {
        let mut files = Vec::new();
        for p in &self.opts.patches {
            let text = std::fs::read(p).map_err(|e| io(p, e))?;
            for rel in diff_paths(&String::from_utf8_lossy(&text)) {
                if !files.contains(&rel) {
                    files.push(rel);
                }
            }
        }
        Ok(files)
    }

    /// Applies every diff to a scratch copy of the files it touches: a failure leaves
    /// the tree untouched and nothing built.
    pub fn check_patches(&mut self) -> Result<(), BuildError> {
        self.step(Step::CheckPatches, |s| {
            let scratch = tempfile::Builder::new()
                .prefix("livecare-patchcheck-")
                .tempdir()
                .map_err(|e| io(Path::new("/tmp"), e))?;
            for rel in s.touched_files()? {
                let from = s.opts.srcdir.join(&rel);
                if from.is_file() {
                    let to = scratch.path().join(&rel);
                    if let Some(d) = to.parent() {
                        std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
                    }
                    std::fs::copy(&from, &to).map_err(|e| io(&from, e))?;
                }
            }
            for p in &s.opts.patches {
                let mut c = Command::new("patch");
                c.current_dir(scratch.path());
                patch_cmd(c, scratch.path(), p)?;
            }
            Ok(((), format!("{} patch(es) apply", s.opts.patches.len())))
        })
    }

    /// Runs the clean command (in the private tree: nothing real is deleted).
    pub fn clean(&mut self) -> Result<(), BuildError> {
        self.ensure_fresh()?;
        let cmd = self.opts.clean_cmd.clone();
        self.step(Step::Clean, |s| {
            let had = s.has_makefile();
            s.run_build("configure", &cmd)?;
            if had && !s.has_makefile() && is_plain_make(&s.opts.build_cmd) {
                return Err(BuildError::CleanRemovedMakefile { cmd: cmd.join(" ") });
            }
            Ok(((), String::new()))
        })
    }

    /// Whether the build's view of the tree has a makefile at its top.
    fn has_makefile(&self) -> bool {
        MAKEFILES.iter().any(|m| match &self.private {
            Some(p) => p.visible(Path::new(m)),
            None => self.opts.srcdir.join(m).exists(),
        })
    }

    /// Makes the C/C++ files the diffs change newer than their objects, so that the
    /// original build compiles them through the wrapper even in a tree that is already
    /// built. In the private tree only the copy is touched (the tree's own timestamps
    /// stay); in place, the tree's files (they are put back with new times anyway).
    fn touch_changed(&mut self) -> Result<Vec<PathBuf>, BuildError> {
        let files: Vec<PathBuf> = self
            .touched_files()?
            .into_iter()
            .filter(|rel| is_c_family(rel) && self.opts.srcdir.join(rel).is_file())
            .collect();
        if files.is_empty() {
            return Ok(files);
        }
        if std::env::var_os("SOURCE_DATE_EPOCH").is_none() {
            for rel in &files {
                let text = std::fs::read(self.opts.srcdir.join(rel)).unwrap_or_default();
                let text = String::from_utf8_lossy(&text);
                if ["__DATE__", "__TIME__", "__TIMESTAMP__"]
                    .iter()
                    .any(|m| text.contains(m))
                {
                    self.progress.note(&format!(
                        "WARNING: {} uses __DATE__/__TIME__: each compile of it differs, so \
                         its program relinked now will not match one built earlier, and the \
                         functions using them are patched too; set SOURCE_DATE_EPOCH as the \
                         tree's own build did to avoid this",
                        rel.display()
                    ));
                }
            }
        }
        let mut c = self.tree_command("touch")?;
        c.arg("-c").arg("--").args(&files).stdin(Stdio::null());
        let out = c.output().map_err(|e| io(Path::new("touch"), e))?;
        if !out.status.success() {
            return Err(BuildError::Usage(format!(
                "touch in the build tree failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(files)
    }

    /// Builds the original tree through the wrapper and keeps every linked output.
    pub fn build_original(&mut self) -> Result<Vec<OriginalOutput>, BuildError> {
        self.ensure_fresh()?;
        let cmd = self.opts.build_cmd.clone();
        self.step(Step::Original, |s| {
            for f in [
                s.link_log("original"),
                s.link_log("patched"),
                s.change_log(),
            ] {
                let _ = std::fs::remove_file(f);
            }
            let touched = s.touch_changed()?;
            // Coarse file clocks may stamp a file slightly before this instant.
            let started = std::time::SystemTime::now() - std::time::Duration::from_millis(100);
            s.run_build("original", &cmd)?;
            let linked = read_link_log(&s.link_log("original"));
            if linked.is_empty() {
                if !compiled_since(&s.opts.workdir.join("asm"), started) {
                    return Err(BuildError::AlreadyBuilt {
                        cmd: cmd.join(" "),
                        touched: touched
                            .iter()
                            .map(|t| t.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                        log: s.log.clone(),
                    });
                }
                return Err(BuildError::NothingLinked { log: s.log.clone() });
            }
            let mut originals = Vec::new();
            for path in linked {
                // Configure-style probe programs are linked and deleted again.
                let Some(file) = s.built_file(&path) else {
                    tracing::debug!(
                        "{} was linked but no longer exists (a probe program?): ignored",
                        path.display()
                    );
                    continue;
                };
                let data = pipeline::read_file(&file)?;
                let build_id = match pipeline::build_id(&path, &data) {
                    Ok(id) => id,
                    Err(e) => {
                        s.progress
                            .note(&format!("skipping {}: {e}", path.display()));
                        continue;
                    }
                };
                let name = path.file_name().unwrap_or_default();
                let stash = s.opts.workdir.join("original").join(&build_id).join(name);
                if let Some(d) = stash.parent() {
                    std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
                }
                // A copy keeps the file mode (the original is an executable).
                std::fs::copy(&file, &stash).map_err(|e| io(&stash, e))?;
                originals.push(OriginalOutput {
                    path,
                    stash,
                    build_id,
                });
            }
            s.originals = originals.clone();
            s.save_originals()?;
            s.match_tree()?;
            let n = originals.len();
            Ok((originals, format!("{n} linked output(s)")))
        })
    }

    fn save_originals(&self) -> Result<(), BuildError> {
        let p = self.opts.workdir.join("originals.tsv");
        let text: String = self
            .originals
            .iter()
            .map(|o| {
                format!(
                    "{}\t{}\t{}\n",
                    o.path.display(),
                    o.stash.display(),
                    o.build_id
                )
            })
            .collect();
        std::fs::write(&p, text).map_err(|e| io(&p, e))
    }

    /// Reloads the originals kept by an earlier original build (for `--update`).
    pub fn load_originals(&mut self) -> Result<Vec<OriginalOutput>, BuildError> {
        let p = self.opts.workdir.join("originals.tsv");
        let text = std::fs::read_to_string(&p).map_err(|e| io(&p, e))?;
        self.originals = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                Some(OriginalOutput {
                    path: f.next()?.into(),
                    stash: f.next()?.into(),
                    build_id: f.next()?.to_string(),
                })
            })
            .collect();
        Ok(self.originals.clone())
    }

    /// Checks the relinked outputs against the tree's own copies (a tree that was
    /// already built): a patch is only useful for the binary the tree holds. An
    /// output that differs gets no patch; if it is a `--target`, or every output
    /// differs, the build stops and says what differs.
    fn match_tree(&mut self) -> Result<(), BuildError> {
        if self.private.is_none() {
            return Ok(());
        }
        self.mismatched.clear();
        let mut errors = Vec::new();
        for o in &self.originals {
            if !o.path.starts_with(&self.opts.srcdir) || !o.path.is_file() {
                continue;
            }
            let Ok(data) = pipeline::read_file(&o.path) else {
                continue;
            };
            let Ok(tree_id) = pipeline::build_id(&o.path, &data) else {
                continue;
            };
            if tree_id == o.build_id {
                continue;
            }
            let built = pipeline::read_file(&o.stash)?;
            let why = crate::deployed::differences(&data, &built);
            let differences = if has_coverage_counters(&built) {
                "It is coverage-instrumented (gcov): every compile stamps its coverage \
                 records anew, so no rebuild has the tree's build-id; patch the \
                 uninstrumented program instead."
                    .to_string()
            } else if why.is_empty() {
                "No difference in code sizes or compiler version (the source, a flag or a \
                 build stamp differs)."
                    .to_string()
            } else {
                format!("Differences (tree vs rebuilt): {}.", why.join("; "))
            };
            let err = BuildError::NotTheTreesBuild {
                output: o.path.clone(),
                tree: tree_id,
                built: o.build_id.clone(),
                differences,
                log: self.log.clone(),
            };
            if self.opts.targets.contains(&o.path) {
                return Err(err);
            }
            self.mismatched.push(o.path.clone());
            errors.push(err);
        }
        if !errors.is_empty() && self.mismatched.len() == self.originals.len() {
            return Err(errors.remove(0));
        }
        for err in errors {
            self.progress
                .note(&format!("WARNING: no patch will be made for it: {err}"));
        }
        Ok(())
    }

    /// Checks every deployed `--target` against the original stage's outputs and
    /// narrows the patches to the outputs they match; fails saying what differs.
    pub fn match_deployed(&mut self) -> Result<(), BuildError> {
        for d in &self.deployed {
            let path =
                crate::deployed::match_deployed(d, &self.originals).map_err(BuildError::Usage)?;
            self.progress.note(&format!(
                "{} is bit-identical to the deployed {} (same build-id)",
                path.display(),
                d.display()
            ));
            self.opts.targets.push(path);
        }
        Ok(())
    }

    /// Applies the diffs to the private tree, or (in place) to the tree, keeping
    /// copies of the files they touch.
    pub fn apply_patches(&mut self) -> Result<(), BuildError> {
        if let Some(p) = self.private.clone() {
            return self.step(Step::ApplyPatches, |s| {
                // From the tree's own sources (an `--update` reuses the private tree).
                let touched = s.touched_files()?;
                p.revert(&touched).map_err(|e| io(&p.upper(), e))?;
                for patch in s.opts.patches.clone() {
                    patch_cmd(s.tree_command("patch")?, &s.opts.srcdir, &patch)?;
                }
                Ok(((), format!("{} file(s) changed", touched.len())))
            });
        }
        self.step(Step::ApplyPatches, |s| {
            let backup = s.opts.workdir.join("backup");
            let _ = std::fs::remove_dir_all(&backup);
            for rel in s.touched_files()? {
                let file = s.opts.srcdir.join(&rel);
                if file.is_file() {
                    let copy = backup.join(&rel);
                    if let Some(d) = copy.parent() {
                        std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
                    }
                    std::fs::copy(&file, &copy).map_err(|e| io(&file, e))?;
                    s.backups.push((file, Some(copy)));
                } else {
                    s.backups.push((file, None));
                }
            }
            let journal: String = s
                .backups
                .iter()
                .map(|(f, c)| {
                    let copy = c
                        .as_ref()
                        .map(|c| c.display().to_string())
                        .unwrap_or("-".into());
                    format!("{}\t{copy}\n", f.display())
                })
                .collect();
            std::fs::write(s.journal(), journal).map_err(|e| io(&s.journal(), e))?;
            for p in s.opts.patches.clone() {
                patch_cmd(s.tree_command("patch")?, &s.opts.srcdir, &p)?;
            }
            Ok(((), format!("{} file(s) changed", s.backups.len())))
        })
    }

    /// Rebuilds the patched tree incrementally.
    pub fn build_patched(&mut self) -> Result<(), BuildError> {
        let cmd = self.opts.build_cmd.clone();
        self.step(Step::Patched, |s| {
            let _ = std::fs::remove_file(s.link_log("patched"));
            s.run_build("patched", &cmd)?;
            let n = read_link_log(&s.link_log("patched")).len();
            Ok(((), format!("{n} output(s) relinked")))
        })
    }

    /// Makes `OUTDIR/<buildid>.kpatch` for every changed linked output.
    pub fn make_patches(&mut self) -> Result<Vec<MadePatch>, BuildError> {
        self.step(Step::MakePatches, |s| {
            let made = s.make_patches_inner()?;
            let summary = made
                .iter()
                .map(|m| format!("{} ({})", m.kpatch.display(), m.functions.join(", ")))
                .collect::<Vec<_>>()
                .join("; ");
            Ok((made, summary))
        })
    }

    fn make_patches_inner(&mut self) -> Result<Vec<MadePatch>, BuildError> {
        let relinked = read_link_log(&self.link_log("patched"));
        let originals: BTreeMap<PathBuf, OriginalOutput> = self
            .originals
            .iter()
            .map(|o| (o.path.clone(), o.clone()))
            .collect();
        let mut made = Vec::new();
        for path in &relinked {
            if !self.opts.targets.is_empty() && !self.opts.targets.contains(path) {
                continue;
            }
            let Some(file) = self.built_file(path) else {
                tracing::debug!(
                    "{} was linked but no longer exists (a probe program?): ignored",
                    path.display()
                );
                continue;
            };
            if self.mismatched.contains(path) {
                continue;
            }
            let Some(orig) = originals.get(path) else {
                self.progress.note(&format!(
                    "{} was not linked by the original build; skipped",
                    path.display()
                ));
                continue;
            };
            let data = pipeline::read_file(&file)?;
            let Some(functions) = pipeline::patched_functions(&file, &data)? else {
                continue;
            };
            let data_objects = pipeline::patched_data(&file, &data)?;
            let scratch = self.opts.workdir.join("kpatch").join(&orig.build_id);
            let (bid, bytes) =
                pipeline::make_kpatch(&orig.stash, &file, self.opts.patch_id.as_deref(), &scratch)?;
            let out = self.opts.outdir.join(format!("{bid}.kpatch"));
            let patch_id = kpatch_file::PatchFile::parse(&bytes)
                .map(|f| f.id())
                .map_err(|e| pipeline::PipelineError::Step {
                    step: "make",
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            made.push((
                MadePatch {
                    object: path.clone(),
                    original: orig.stash.clone(),
                    build_id: bid,
                    kpatch: out,
                    functions,
                    data: data_objects,
                    patch_id,
                },
                bytes,
            ));
        }
        // Appliers look a patch up as `<build-id>.kpatch`, so a second fix for the same
        // binary cannot sit beside the first: keep the earlier one and write nothing.
        for (m, bytes) in &made {
            if let Ok(old) = std::fs::read(&m.kpatch) {
                if !same_patch(&old, bytes) {
                    return Err(BuildError::PatchExists {
                        kpatch: m.kpatch.clone(),
                        object: m.object.clone(),
                    });
                }
            }
        }
        let made: Vec<MadePatch> = made
            .into_iter()
            .map(|(m, bytes)| {
                std::fs::write(&m.kpatch, bytes).map_err(|e| io(&m.kpatch, e))?;
                self.progress.note(&format!(
                    "patch {} for {} is in {} ({} function(s): {}{})",
                    m.patch_id,
                    m.object.display(),
                    m.kpatch.display(),
                    m.functions.len(),
                    m.functions.join(", "),
                    data_note(&m.data)
                ));
                Ok(m)
            })
            .collect::<Result<_, BuildError>>()?;
        if made.is_empty() {
            return Err(BuildError::NoPatch {
                reason: self.no_patch_reason(&relinked),
                log: self.log.clone(),
            });
        }
        Ok(made)
    }

    /// Explains why no linked output carries patch code.
    fn no_patch_reason(&self, relinked: &[PathBuf]) -> String {
        let changes = std::fs::read_to_string(self.change_log()).unwrap_or_default();
        let recompiled = changes.lines().count();
        let changed: Vec<&str> = changes
            .lines()
            .filter(|l| l.split('\t').skip(1).any(|f| !f.is_empty()))
            .filter_map(|l| l.split('\t').next())
            .collect();
        if recompiled == 0 {
            "the patched build recompiled no C source through the wrapper (do the diffs touch \
             files the build compiles?)"
                .into()
        } else if changed.is_empty() {
            format!(
                "the patched build recompiled {recompiled} object(s) but no function's code \
                 changed (comment-only or data-only changes cannot be patched)"
            )
        } else if relinked.is_empty() {
            format!(
                "{} changed but no program or library was relinked",
                changed.join(", ")
            )
        } else if !self.opts.targets.is_empty() {
            format!(
                "none of the --target outputs changed (changed objects: {})",
                changed.join(", ")
            )
        } else {
            format!(
                "{} changed but no relinked output carries patch code",
                changed.join(", ")
            )
        }
    }

    /// Puts the original source (and, if asked, the original binaries) back.
    pub fn restore(&mut self) -> Result<(), BuildError> {
        if let Some(p) = self.private.clone() {
            // The tree was never changed. The private tree goes back to the tree's own
            // sources (for an `--update`), and outputs the tree lacks (it was never
            // built) are put there: they are what the patches are for.
            p.revert(&self.touched_files()?)
                .map_err(|e| io(&p.upper(), e))?;
            if self.opts.restore_outputs {
                self.add_missing_outputs()?;
            }
            return Ok(());
        }
        if self.backups.is_empty() {
            return Ok(());
        }
        self.step(Step::Restore, |s| {
            s.restore_files()?;
            Ok(((), String::new()))
        })
    }

    /// Copies the original outputs that do not exist in the tree into it, with the
    /// build's symlinks to them (`libx.so.1 -> libx.so.1.0`); never over an existing
    /// file.
    fn add_missing_outputs(&mut self) -> Result<(), BuildError> {
        let Some(p) = &self.private else {
            return Ok(());
        };
        let mut added = Vec::new();
        for o in &self.originals {
            let Ok(rel) = o.path.strip_prefix(&self.opts.srcdir) else {
                continue;
            };
            if std::fs::symlink_metadata(&o.path).is_ok() {
                continue;
            }
            let Some(dir) = o.path.parent() else {
                continue;
            };
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
            let tmp = o.path.with_extension("livecare-new");
            std::fs::copy(&o.stash, &tmp).map_err(|e| io(&tmp, e))?;
            std::fs::rename(&tmp, &o.path).map_err(|e| io(&o.path, e))?;
            added.push(o.path.display().to_string());
            let built = p.upper().join(rel);
            let (Some(built_dir), Ok(built)) = (built.parent(), built.canonicalize()) else {
                continue;
            };
            for e in std::fs::read_dir(built_dir).into_iter().flatten().flatten() {
                let link = dir.join(e.file_name());
                let Ok(target) = std::fs::read_link(e.path()) else {
                    continue;
                };
                if e.path().canonicalize().ok().as_ref() == Some(&built)
                    && std::fs::symlink_metadata(&link).is_err()
                {
                    std::os::unix::fs::symlink(&target, &link).map_err(|e| io(&link, e))?;
                    added.push(link.display().to_string());
                }
            }
        }
        if !added.is_empty() {
            self.progress.note(&format!(
                "the tree had not been built: put the original build's {} there",
                added.join(", ")
            ));
        }
        Ok(())
    }

    /// Removes the bulky work files of a successful build (the patches are in the
    /// output directory and the tree is untouched), unless they are kept for an
    /// `--update`; the log and the wrapper scripts stay. Only livecare's own files go:
    /// `--workdir` may name a directory with others.
    fn drop_work_files(&mut self) {
        if self.opts.keep_work {
            return;
        }
        if let Some(p) = &self.private {
            p.remove();
        }
        let w = &self.opts.workdir;
        for d in ["asm", "kpatch", "original", "backup"] {
            let _ = std::fs::remove_dir_all(w.join(d));
        }
        for f in [
            "links.original",
            "links.patched",
            "changes.log",
            "originals.tsv",
        ] {
            let _ = std::fs::remove_file(w.join(f));
        }
    }

    fn restore_files(&mut self) -> Result<(), BuildError> {
        for (file, copy) in std::mem::take(&mut self.backups) {
            match copy {
                // A plain copy gives the file a new mtime, so a later `make` rebuilds
                // what the patched stage compiled.
                Some(copy) => {
                    std::fs::copy(&copy, &file).map_err(|e| io(&file, e))?;
                }
                None => {
                    let _ = std::fs::remove_file(&file);
                }
            }
        }
        let _ = std::fs::remove_file(self.journal());
        if self.opts.restore_outputs {
            for o in &self.originals {
                // A failed patched link may have deleted the output: put it back too.
                if !o.path.parent().is_some_and(Path::is_dir) {
                    continue;
                }
                // Rename over the output: a running copy of it keeps its inode.
                let tmp = o.path.with_extension("livecare-restore");
                std::fs::copy(&o.stash, &tmp).map_err(|e| io(&tmp, e))?;
                std::fs::rename(&tmp, &o.path).map_err(|e| io(&o.path, e))?;
            }
        }
        Ok(())
    }

    /// The whole build: check, (clean), original, apply, patched, make patches, restore.
    pub fn run(&mut self, update: bool) -> Result<Vec<MadePatch>, BuildError> {
        self.check_patches()?;
        if update {
            self.load_originals()?;
        } else {
            if self.opts.clean {
                self.clean()?;
            }
            self.build_original()?;
        }
        self.match_deployed()?;
        let result = self
            .apply_patches()
            .and_then(|()| self.build_patched())
            .and_then(|()| self.make_patches());
        let restored = self.restore();
        let made = result?;
        restored?;
        self.drop_work_files();
        Ok(made)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.backups.is_empty() {
            let _ = self.restore_files();
        }
    }
}

/// Locks the work directory for this session: two builds of one tree at once would
/// share (and wipe) each other's work files.
fn lock_workdir(workdir: &Path) -> Result<File, BuildError> {
    use std::os::fd::AsRawFd;
    let path = workdir.join("lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io(&path, e))?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(BuildError::Usage(format!(
            "another livecare build is using the work directory {} (a build of the same \
             tree): wait for it to end, or give this one its own --workdir",
            workdir.display()
        )));
    }
    Ok(f)
}

/// The names GNU make looks for.
const MAKEFILES: [&str; 3] = ["GNUmakefile", "makefile", "Makefile"];

/// Whether the build command is `make` reading the tree's top-level makefile.
fn is_plain_make(cmd: &[String]) -> bool {
    let Some(first) = cmd.first() else {
        return false;
    };
    matches!(
        Path::new(first).file_name().and_then(|n| n.to_str()),
        Some("make" | "gmake")
    ) && !cmd[1..].iter().any(|a| {
        a == "-f"
            || a == "-C"
            || a.starts_with("--file")
            || a.starts_with("--directory")
            || a.starts_with("--makefile")
            || (a.starts_with("-f") || a.starts_with("-C")) && !a.starts_with("--")
    })
}

/// A fresh tree that needs its configure step before `make`: say so before building.
fn check_configured(opts: &Options) -> Result<(), BuildError> {
    let dir = &opts.srcdir;
    if !is_plain_make(&opts.build_cmd) || MAKEFILES.iter().any(|m| dir.join(m).exists()) {
        return Ok(());
    }
    let script = if dir.join("configure").is_file() {
        "./configure"
    } else if dir.join("auto/configure").is_file() {
        "./auto/configure"
    } else if dir.join("CMakeLists.txt").is_file() {
        "cmake ."
    } else {
        return Ok(());
    };
    Err(BuildError::NotConfigured {
        srcdir: dir.clone(),
        script: script.into(),
    })
}

/// The default work directories live in a shared directory (`/var/tmp`): refuse one
/// that another user made, or a symlink planted there.
fn check_workdir_base(workdir: &Path) -> Result<(), BuildError> {
    use std::os::unix::fs::DirBuilderExt;
    use std::os::unix::fs::MetadataExt;
    let base = workdir_base();
    if !workdir.starts_with(&base) {
        return Ok(());
    }
    if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&base) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(io(&base, e));
        }
    }
    let m = std::fs::symlink_metadata(&base).map_err(|e| io(&base, e))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !m.is_dir() || m.uid() != me || m.mode() & 0o022 != 0 {
        return Err(BuildError::Usage(format!(
            "{} is not a private directory of this user (a symlink, or someone else's): \
             remove it, or choose a work directory with --workdir",
            base.display()
        )));
    }
    Ok(())
}

/// Whether an ELF file carries gcov's coverage counters.
fn has_coverage_counters(data: &[u8]) -> bool {
    use object::{Object, ObjectSymbol};
    object::File::parse(data).is_ok_and(|f| {
        f.symbols()
            .any(|s| s.name().is_ok_and(|n| n.starts_with("__gcov_")))
    })
}

/// C and C++ sources and headers: the files whose change makes the build compile.
fn is_c_family(rel: &Path) -> bool {
    rel.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        matches!(
            e,
            "c" | "h"
                | "cc"
                | "cpp"
                | "cxx"
                | "c++"
                | "C"
                | "hh"
                | "hpp"
                | "hxx"
                | "inc"
                | "def"
                | "tbl"
        )
    })
}

/// `; N data object(s): a, b` for a summary line, or nothing.
fn data_note(data: &[String]) -> String {
    if data.is_empty() {
        String::new()
    } else {
        format!("; {} data object(s): {}", data.len(), data.join(", "))
    }
}

/// `p` quoted for `sh`: in single quotes, each `'` written as `'\''`.
fn sh_quote(p: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = vec![b'\''];
    for &b in p.as_os_str().as_bytes() {
        if b == b'\'' {
            out.extend(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

/// The `CC`/`CXX` value that runs the wrapper `script`, keeping the flags of the
/// caller's own `user` value (`CC="gcc -std=gnu99"`), and the real compiler it names.
fn wrapped_compiler(user: Option<&str>, script: &Path, bin: &Path) -> (String, Option<String>) {
    // Make and configure scripts paste `$CC` into shell commands unquoted: a path with
    // a space, a quote or `$(…)` would be split or run. Then the bare name, which
    // PATH (our bin directory first) resolves to the same script.
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+,:=@%".contains(c);
    let script = match script.to_str() {
        Some(s) if s.chars().all(plain) => s.to_string(),
        _ => script
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let mut words = user.unwrap_or("").split_whitespace();
    let Some(first) = words.next() else {
        return (script, None);
    };
    if Path::new(first).starts_with(bin) {
        return (user.unwrap_or_default().to_string(), None);
    }
    let rest: Vec<&str> = words.collect();
    if names_the_wrapper(first, bin) {
        // LibCare's documented flow (`CC=libcare-cc ./configure`, then the build):
        // `CC` names the wrapper itself, so the real compiler is gcc from PATH,
        // past the wrapper, as the wrapper scripts find it.
        let cc = std::iter::once(script.as_str())
            .chain(rest)
            .collect::<Vec<_>>()
            .join(" ");
        return (cc, None);
    }
    let cc = std::iter::once(script.as_str())
        .chain(rest)
        .collect::<Vec<_>>()
        .join(" ");
    // A bare name must not resolve to our own `gcc` script on PATH later.
    let real = if first.contains('/') {
        first.to_string()
    } else {
        crate::wrapper::find_real_compiler(first, Some(bin))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| first.to_string())
    };
    (cc, Some(real))
}

/// Whether the compiler `first` (a path, or a name looked up on PATH) is this tool
/// (`libcare-cc` or any link to it) rather than a real compiler: `bin/libcare-cc`
/// links to the tool.
fn names_the_wrapper(first: &str, bin: &Path) -> bool {
    let Ok(me) = bin.join("libcare-cc").canonicalize() else {
        return first == "libcare-cc";
    };
    let found = if first.contains('/') {
        Some(PathBuf::from(first))
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(first))
                .find(|c| c.is_file())
        })
    };
    match found.and_then(|f| f.canonicalize().ok()) {
        Some(f) => f == me,
        None => first == "libcare-cc",
    }
}

/// Applies one diff with `c` (`patch`, run in `dir`).
fn patch_cmd(mut c: Command, dir: &Path, patch: &Path) -> Result<(), BuildError> {
    c.args([
        "-p1",
        "--forward",
        "--batch",
        "--no-backup-if-mismatch",
        "-r",
        "-",
        "-i",
    ])
    .arg(patch)
    .stdin(Stdio::null());
    let out = c.output().map_err(|e| io(Path::new("patch"), e))?;
    if !out.status.success() {
        return Err(BuildError::PatchDoesNotApply {
            patch: patch.to_path_buf(),
            srcdir: dir.to_path_buf(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(())
}

/// The tree-relative paths named by a unified diff (`-p1`), old and new names.
pub fn diff_paths(diff: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for line in diff.lines() {
        let Some(rest) = line
            .strip_prefix("+++ ")
            .or_else(|| line.strip_prefix("--- "))
        else {
            continue;
        };
        // As GNU patch reads an unquoted name: up to the first blank (a timestamp may
        // follow after spaces, not only after a tab: LibCare's test diffs do that).
        let name = rest.split([' ', '\t']).next().unwrap_or("").trim();
        if name == "/dev/null" || name.is_empty() {
            continue;
        }
        let Some((_, rel)) = name.split_once('/') else {
            continue;
        };
        let rel = PathBuf::from(rel);
        if rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            continue;
        }
        if !out.contains(&rel) {
            out.push(rel);
        }
    }
    out
}

/// Whether two `.kpatch` files (LibcarePlus layout) are the same patch: equal but
/// for the header's `build_time`, so a rerun of the same build may replace its file.
fn same_patch(a: &[u8], b: &[u8]) -> bool {
    use kpatch_file::header::raw::LibCarePlusHeader;
    let t = std::mem::offset_of!(LibCarePlusHeader, build_time);
    let t = t..t + 8;
    a.len() == b.len()
        && a.len() >= t.end
        && a[..t.start] == b[..t.start]
        && a[t.end..] == b[t.end..]
}

/// Whether the wrapper kept any original-stage assembly (one per compiled C file)
/// since `since`: none means the build command compiled nothing.
fn compiled_since(asm_dir: &Path, since: std::time::SystemTime) -> bool {
    let Ok(dir) = std::fs::read_dir(asm_dir) else {
        return false;
    };
    dir.filter_map(Result::ok).any(|e| {
        e.file_name().to_string_lossy().ends_with(".original.s")
            && e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since)
    })
}

fn read_link_log(path: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out: Vec<PathBuf> = Vec::new();
    for line in text.lines() {
        let Some((_, p)) = line.split_once('\t') else {
            continue;
        };
        let p = PathBuf::from(p);
        out.retain(|q| q != &p);
        out.push(p);
    }
    out
}

/// Lines in a file (`None` if it cannot be read).
fn count_lines(path: &Path) -> Option<usize> {
    std::fs::read(path)
        .ok()
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_paths_strip_one_component_and_skip_dev_null() {
        let d = "--- a/src/x.c\t2020-01-01\n+++ b/src/x.c\t2020-01-01\n@@ -1 +1 @@\n-a\n+b\n\
                 --- /dev/null\n+++ b/new.c\n--- a/../evil\n+++ b/../evil\n";
        assert_eq!(
            diff_paths(d),
            [PathBuf::from("src/x.c"), PathBuf::from("new.c")]
        );
    }

    #[test]
    fn the_callers_cc_keeps_its_flags_and_becomes_the_real_compiler() {
        let bin = Path::new("/w/bin");
        let script = bin.join("cc");
        assert_eq!(
            wrapped_compiler(None, &script, bin),
            ("/w/bin/cc".into(), None)
        );
        assert_eq!(
            wrapped_compiler(Some("/opt/gcc-12 -std=gnu99"), &script, bin),
            ("/w/bin/cc -std=gnu99".into(), Some("/opt/gcc-12".into()))
        );
        let (_, real) = wrapped_compiler(Some("gcc -O1"), &script, bin);
        assert!(
            real.is_some_and(|r| r.starts_with('/') && r.ends_with("gcc")),
            "bare name not resolved"
        );
        assert_eq!(
            wrapped_compiler(Some("/w/bin/cc"), &script, bin),
            ("/w/bin/cc".into(), None)
        );
        // `CC=libcare-cc` names the wrapper, not a real compiler (LibCare's flow).
        assert_eq!(
            wrapped_compiler(Some("libcare-cc -O1"), &script, bin),
            ("/w/bin/cc -O1".into(), None)
        );
    }

    #[test]
    fn a_run_killed_with_the_diffs_applied_is_undone_by_the_next_session() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("a.c"), "int a(void) { return 1; }\n").unwrap();
        let diff = dir.path().join("fix.diff");
        std::fs::write(
            &diff,
            "--- a/a.c\n+++ b/a.c\n@@ -1 +1 @@\n-int a(void) { return 1; }\n+int a(void) { return 2; }\n\
             --- /dev/null\n+++ b/new.c\n@@ -0,0 +1 @@\n+int n;\n",
        )
        .unwrap();
        let mut opts = Options::new(
            &tree,
            vec![diff],
            &dir.path().join("out"),
            Path::new("/bin/true"),
        );
        // The journal only exists for builds in the tree itself.
        opts.isolation = Isolation::InPlace;
        opts.workdir = dir.path().join("work");
        let mut s = Session::new(opts.clone(), Progress::new(crate::Style::Quiet)).unwrap();
        s.apply_patches().unwrap();
        assert!(std::fs::read_to_string(tree.join("a.c"))
            .unwrap()
            .contains("return 2"));
        assert!(tree.join("new.c").exists());
        // Killed here: no restore (only the lock goes, as with a killed process).
        s.backups.clear();
        drop(s);
        let _s = Session::new(opts, Progress::new(crate::Style::Quiet)).unwrap();
        assert!(std::fs::read_to_string(tree.join("a.c"))
            .unwrap()
            .contains("return 1"));
        assert!(!tree.join("new.c").exists());
    }

    #[test]
    fn link_log_keeps_last_occurrence_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        std::fs::write(&p, "original\t/a\noriginal\t/b\noriginal\t/a\n").unwrap();
        assert_eq!(
            read_link_log(&p),
            [PathBuf::from("/b"), PathBuf::from("/a")]
        );
    }
}
