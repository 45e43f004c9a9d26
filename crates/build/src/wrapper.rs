//! `libcare-cc`: a gcc-compatible compiler wrapper driven by the environment.
//!
//! * `KPATCH_STAGE=original`: every call runs exactly as the build asked (so the binary
//!   is byte-identical to a plain build, same build-id). For each C/C++ source the
//!   wrapper additionally compiles the same flags with `-S` and keeps the debug-filtered
//!   assembly as `<prefix><object>.original.s`, plus a copy of the object.
//! * `KPATCH_STAGE=patched`: each C/C++ source is compiled with `-S`, diffed against the
//!   original assembly (`asm_diff::gensrc`), and the augmented assembly is assembled
//!   into the requested object, which must keep every original code byte. Links get
//!   `-Wl,-q`.
//! * `KPATCH_STAGE=configure`, no stage, compiler probes, configure/CMake test programs,
//!   preprocessing: the call passes through untouched.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::args::{CompilerArgs, Input, Item, Lang, Mode};

/// Environment variable naming a file where each successful link appends
/// `<stage>\t<absolute output path>`.
pub const LINK_LOG_ENV: &str = "LIVECARE_LINK_LOG";
/// Environment variable naming a file where the patched stage appends, per object,
/// `<object>\t<changed functions>\t<added functions>` (comma-separated).
pub const CHANGE_LOG_ENV: &str = "LIVECARE_CHANGE_LOG";
/// Environment variable naming a file where each stage appends
/// `<stage>\t<source>` per unit it compiled: `livecare build` counts the lines for
/// its progress display.
pub const COMPILE_LOG_ENV: &str = "LIVECARE_COMPILE_LOG";
/// Default file-name prefix of the kept assembly files (LibCare's).
pub const DEFAULT_PREFIX: &str = ".kpatch_";

/// The build stage the wrapper is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `configure`: pass everything through.
    Configure,
    /// `original`: build as asked, keep the assembly.
    Original,
    /// `patched`: build from the augmented assembly.
    Patched,
}

impl Stage {
    /// The stage named by `KPATCH_STAGE`.
    pub fn parse(s: &str) -> Option<Stage> {
        match s {
            "configure" => Some(Stage::Configure),
            "original" => Some(Stage::Original),
            "patched" => Some(Stage::Patched),
            _ => None,
        }
    }

    /// The name used in `KPATCH_STAGE`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Configure => "configure",
            Stage::Original => "original",
            Stage::Patched => "patched",
        }
    }
}

/// Errors of the wrapper.
#[derive(Debug, thiserror::Error)]
pub enum WrapperError {
    /// `KPATCH_STAGE` has an unknown value.
    #[error("KPATCH_STAGE={0:?} is not one of original, patched, configure")]
    BadStage(String),
    /// Link-time optimisation was requested.
    #[error("refusing -flto: link-time optimisation moves code between objects after the assembly is diffed; build without -flto")]
    Lto,
    /// The real compiler could not be found or started.
    #[error("cannot run the real compiler {path}")]
    Spawn {
        /// Its path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The patched stage found no original assembly for an object.
    #[error("no original assembly {asm} for {object}: the original build did not compile it through the wrapper (rebuild the original from clean)")]
    NoOriginal {
        /// The object being built.
        object: String,
        /// The missing file.
        asm: PathBuf,
    },
    /// The assembly differ failed.
    #[error("assembly diff for {object} failed: {reason}")]
    Diff {
        /// The object being built.
        object: String,
        /// The differ's message.
        reason: String,
    },
    /// The augmented object lost original code.
    #[error("refusing {object}: the patched object does not keep the original code")]
    CodeChanged {
        /// The object.
        object: String,
        /// What differs.
        source: crate::verify::CodeMismatch,
    },
    /// The real compiler leads back to the wrapper.
    #[error("KPCCREAL ({0}) runs the wrapper again; set KPCCREAL to the real compiler")]
    Recursion(PathBuf),
    /// An argument is not valid UTF-8 in a call that needs rewriting.
    #[error("argument {0:?} is not valid UTF-8")]
    NotUtf8(OsString),
}

/// The wrapper's configuration, read from the environment.
#[derive(Debug, Clone)]
pub struct WrapperEnv {
    /// `KPATCH_STAGE` (None when unset or empty: pass through).
    pub stage: Option<Stage>,
    /// `KPCCREAL`, else the first `gcc` on PATH that is not this wrapper.
    pub real: PathBuf,
    /// `KPCC_REMOVE_ARGS` (`;`-separated): arguments removed in the original/patched stages.
    pub remove_args: Vec<String>,
    /// `KPCC_APPEND_ARGS` (`;`-separated): arguments appended in the original/patched stages.
    pub append_args: Vec<String>,
    /// `KPCC_DBGFILTER_ARGS`: options of the debug filter (as for `kpatch_gensrc`).
    pub dbgfilter: asm_diff::Options,
    /// `KPCC_PATCH_ARGS`: options of the assembly diff (as for `kpatch_gensrc`).
    pub patch: asm_diff::Options,
    /// `KPATCH_PREFIX`: file-name prefix of the kept assembly (default `.kpatch_`).
    pub prefix: String,
    /// `KPATCH_ASM_DIR`: where the kept assembly goes (default: next to the object).
    pub asm_dir: Option<PathBuf>,
    /// `KPATCH_PATH`: LibCare's tool directory. The tools are built into this binary,
    /// so it is only reported in debug output.
    pub tool_path: Option<PathBuf>,
    /// `KPCC_DEBUG`: print every command run.
    pub debug: bool,
    /// `LIVECARE_LINK_LOG`.
    pub link_log: Option<PathBuf>,
    /// `LIVECARE_CHANGE_LOG`.
    pub change_log: Option<PathBuf>,
    /// `LIVECARE_COMPILE_LOG`.
    pub compile_log: Option<PathBuf>,
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn split_list(v: Option<String>) -> Vec<String> {
    v.map(|s| {
        s.split(';')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect()
    })
    .unwrap_or_default()
}

/// Parses `kpatch_gensrc`-style flags (`;`- or space-separated) into diff options; unknown flags are ignored
/// with a warning (LibCare passes `--os=rhel6` and friends that mean nothing here).
pub fn gensrc_options(flags: &str) -> asm_diff::Options {
    let mut o = asm_diff::Options::default();
    // LibCare separates them with `;` (as in KPCC_APPEND_ARGS), livecare with spaces.
    let flags = flags.split(|c: char| c == ';' || c.is_whitespace());
    for f in flags.filter(|f| !f.is_empty()) {
        match f {
            "--force-global" => o.force_global = true,
            "--force-gotpcrel" => o.force_gotpcrel = true,
            "--ignore-line-macros" => o.ignore_line_macros = true,
            "-v" | "--verbose" => o.verbose = true,
            f if f.starts_with("--os=") || f.starts_with("--dbg-filter") || f == "--test-mode" => {}
            other => eprintln!("libcare-cc: ignoring unknown diff option {other:?}"),
        }
    }
    o
}

/// The first `name` on PATH that is not this executable (nor in `skip_dir`).
pub fn find_real_compiler(name: &str, skip_dir: Option<&Path>) -> Option<PathBuf> {
    let me = std::env::current_exe()
        .ok()
        .and_then(|p| p.canonicalize().ok());
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find_map(|dir| {
        if skip_dir.is_some_and(|s| s == dir) {
            return None;
        }
        let cand = dir.join(name);
        let canon = cand.canonicalize().ok()?;
        if me.as_ref() == Some(&canon) || !canon.is_file() {
            return None;
        }
        Some(cand)
    })
}

/// Environment variable counting nested wrapper runs, to stop a KPCCREAL that leads
/// back to the wrapper.
const DEPTH_ENV: &str = "LIVECARE_CC_DEPTH";
/// Nested runs allowed (gcc never runs `cc` itself; a build's compiler script might).
const MAX_DEPTH: u32 = 4;

/// Environment variable naming the directory of the wrapper's `cc`/`gcc` scripts, which
/// the real-compiler search must skip.
pub const WRAPPER_DIR_ENV: &str = "LIVECARE_WRAPPER_DIR";

impl WrapperEnv {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<WrapperEnv, WrapperError> {
        let stage = match env_nonempty("KPATCH_STAGE") {
            None => None,
            Some(s) => Some(Stage::parse(&s).ok_or(WrapperError::BadStage(s))?),
        };
        let skip = env_nonempty(WRAPPER_DIR_ENV).map(PathBuf::from);
        // A bare KPCCREAL is looked up on PATH past the wrapper's own `gcc`/`cc`.
        let real_name = env_nonempty("KPCCREAL").unwrap_or_else(|| "gcc".to_string());
        let real = if real_name.contains('/') {
            PathBuf::from(real_name)
        } else {
            find_real_compiler(&real_name, skip.as_deref())
                .unwrap_or_else(|| PathBuf::from(real_name))
        };
        let depth: u32 = env_nonempty(DEPTH_ENV)
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        if depth >= MAX_DEPTH {
            return Err(WrapperError::Recursion(real));
        }
        std::env::set_var(DEPTH_ENV, (depth + 1).to_string());
        Ok(WrapperEnv {
            stage,
            real,
            remove_args: split_list(env_nonempty("KPCC_REMOVE_ARGS")),
            append_args: split_list(env_nonempty("KPCC_APPEND_ARGS")),
            dbgfilter: gensrc_options(&env_nonempty("KPCC_DBGFILTER_ARGS").unwrap_or_default()),
            patch: gensrc_options(&env_nonempty("KPCC_PATCH_ARGS").unwrap_or_default()),
            prefix: env_nonempty("KPATCH_PREFIX").unwrap_or_else(|| DEFAULT_PREFIX.to_string()),
            asm_dir: env_nonempty("KPATCH_ASM_DIR").map(PathBuf::from),
            tool_path: env_nonempty("KPATCH_PATH").map(PathBuf::from),
            debug: env_nonempty("KPCC_DEBUG").is_some(),
            link_log: env_nonempty(LINK_LOG_ENV).map(PathBuf::from),
            change_log: env_nonempty(CHANGE_LOG_ENV).map(PathBuf::from),
            compile_log: env_nonempty(COMPILE_LOG_ENV).map(PathBuf::from),
        })
    }
}

/// Runs the wrapper on gcc's arguments (argv[0] removed); returns the exit code.
pub fn run(args: Vec<OsString>) -> Result<i32, WrapperError> {
    let env = WrapperEnv::from_env()?;
    Wrapper {
        env,
        cwd: std::env::current_dir().unwrap_or_default(),
    }
    .run(args)
}

/// The wrapper for one call.
pub struct Wrapper {
    /// Its configuration.
    pub env: WrapperEnv,
    /// The directory the call runs in (relative paths are relative to it).
    pub cwd: PathBuf,
}

/// The files kept for one object.
#[derive(Debug, Clone)]
pub struct AsmFiles {
    /// Debug-filtered assembly of the original stage.
    pub original_s: PathBuf,
    /// Debug-filtered assembly of the patched stage.
    pub patched_s: PathBuf,
    /// The augmented assembly that was assembled.
    pub kpatch_s: PathBuf,
    /// The original stage's object.
    pub original_o: PathBuf,
}

/// FNV-1a, stable across builds, to keep names unique in a flat assembly directory.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl Wrapper {
    /// The kept files for `object` (a path relative to the call's directory).
    pub fn asm_files(&self, object: &str) -> AsmFiles {
        let abs = self.cwd.join(object);
        let file = abs
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let base = match &self.env.asm_dir {
            Some(dir) => dir.join(format!(
                "{}{file}-{:016x}",
                self.env.prefix,
                fnv1a(&abs.to_string_lossy())
            )),
            None => abs.with_file_name(format!("{}{file}", self.env.prefix)),
        };
        let with = |ext: &str| {
            let mut s = base.clone().into_os_string();
            s.push(ext);
            PathBuf::from(s)
        };
        AsmFiles {
            original_s: with(".original.s"),
            patched_s: with(".patched.s"),
            kpatch_s: with(".kpatch.s"),
            original_o: with(".original.o"),
        }
    }

    fn debug(&self, cmd: &Command) {
        if self.env.debug {
            if let Some(tools) = &self.env.tool_path {
                eprintln!(
                    "libcare-cc: KPATCH_PATH={} ignored: the tools are built in",
                    tools.display()
                );
            }
            eprintln!(
                "libcare-cc[{}]: {cmd:?}",
                self.env.stage.map(Stage::name).unwrap_or("-")
            );
        }
    }

    fn command(&self, args: &[String]) -> Command {
        let mut cmd = Command::new(&self.env.real);
        cmd.args(args).current_dir(&self.cwd);
        cmd
    }

    /// Runs a command with inherited stdio; returns its exit code.
    fn status(&self, mut cmd: Command) -> Result<i32, WrapperError> {
        self.debug(&cmd);
        let status = cmd.status().map_err(|source| WrapperError::Spawn {
            path: self.env.real.clone(),
            source,
        })?;
        Ok(status.code().unwrap_or(1))
    }

    fn pass_through_os(&self, args: Vec<OsString>) -> Result<i32, WrapperError> {
        let mut cmd = Command::new(&self.env.real);
        cmd.args(args).current_dir(&self.cwd);
        self.status(cmd)
    }

    /// Runs one call.
    pub fn run(&self, args: Vec<OsString>) -> Result<i32, WrapperError> {
        let stage = match self.env.stage {
            None | Some(Stage::Configure) => return self.pass_through_os(args),
            Some(s) => s,
        };
        let mut strings = Vec::with_capacity(args.len());
        for a in &args {
            match a.to_str() {
                Some(s) => strings.push(s.to_string()),
                None => return Err(WrapperError::NotUtf8(a.clone())),
            }
        }
        let Ok(parsed) = CompilerArgs::parse(&strings) else {
            // gcc itself reports the malformed command line.
            return self.pass_through_os(args);
        };
        if parsed.probe || parsed.inputs().next().is_none() || parsed.is_conftest(&self.cwd) {
            return self.pass_through_os(args);
        }
        if parsed.lto {
            return Err(WrapperError::Lto);
        }
        // KPCC_REMOVE_ARGS / KPCC_APPEND_ARGS apply to the expanded command line.
        let mut flat = flatten(&parsed.items);
        flat.retain(|a| !self.env.remove_args.contains(a));
        flat.extend(self.env.append_args.iter().cloned());
        let parsed = CompilerArgs::parse(&flat).unwrap_or(parsed);
        let code = match (stage, parsed.mode) {
            (_, Mode::Preprocess | Mode::SyntaxOnly) => return self.status(self.command(&flat)),
            (Stage::Original, _) => self.original(&parsed, &flat)?,
            (Stage::Patched, _) => self.patched(&parsed)?,
            (Stage::Configure, _) => return self.status(self.command(&flat)),
        };
        if code == 0 {
            self.log_compiled(stage, &parsed)?;
        }
        Ok(code)
    }

    /// One line per source this call compiled, for the progress display.
    fn log_compiled(&self, stage: Stage, a: &CompilerArgs) -> Result<(), WrapperError> {
        let Some(log) = &self.env.compile_log else {
            return Ok(());
        };
        let lines: String = a
            .inputs()
            .filter(|i| i.lang.is_compiled())
            .map(|i| format!("{}\t{}\n", stage.name(), self.cwd.join(&i.path).display()))
            .collect();
        if lines.is_empty() {
            return Ok(());
        }
        append(log, &lines)
    }

    fn original(&self, a: &CompilerArgs, flat: &[String]) -> Result<i32, WrapperError> {
        let code = self.status(self.command(flat))?;
        if code != 0 {
            return Ok(code);
        }
        for src in a.patchable_sources() {
            let object = match a.mode {
                Mode::Link => link_member_name(&a.link_output(), src),
                _ => a.object_for(src),
            };
            let files = self.asm_files(&object);
            let code = self.capture_original(a, src, &files)?;
            if code != 0 {
                return Ok(code);
            }
            match a.mode {
                Mode::Compile => copy(&self.cwd.join(&object), &files.original_o)?,
                Mode::Link => {
                    let mut args = a.compile_flags();
                    push_input(&mut args, src);
                    args.extend(["-c".into(), "-o".into(), path_str(&files.original_o)]);
                    let code = self.quiet(self.command(&args))?;
                    if code != 0 {
                        return Ok(code);
                    }
                }
                _ => {}
            }
        }
        if a.mode == Mode::Link {
            self.log_link(Stage::Original, &a.link_output())?;
        }
        Ok(0)
    }

    /// Runs a command whose output only matters when it fails.
    fn quiet(&self, mut cmd: Command) -> Result<i32, WrapperError> {
        self.debug(&cmd);
        let out = cmd.output().map_err(|source| WrapperError::Spawn {
            path: self.env.real.clone(),
            source,
        })?;
        if !out.status.success() {
            let _ = std::io::stderr().write_all(&out.stderr);
        }
        Ok(out.status.code().unwrap_or(1))
    }

    /// Compiles `src` with `-S` and keeps the debug-filtered assembly.
    fn capture_original(
        &self,
        a: &CompilerArgs,
        src: &Input,
        files: &AsmFiles,
    ) -> Result<i32, WrapperError> {
        if let Some(dir) = files.original_s.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        let raw = with_suffix(&files.original_s, ".raw");
        let mut args = a.compile_flags();
        push_input(&mut args, src);
        args.extend(["-S".into(), "-o".into(), path_str(&raw)]);
        let code = self.quiet(self.command(&args))?;
        if code != 0 {
            return Ok(code);
        }
        let text = read(&raw)?;
        let filtered =
            asm_diff::filter(&text, &self.env.dbgfilter).map_err(|e| WrapperError::Diff {
                object: src.path.clone(),
                reason: format!("debug filter: {e}"),
            })?;
        write(&files.original_s, &filtered)?;
        let _ = std::fs::remove_file(&raw);
        Ok(0)
    }

    fn patched(&self, a: &CompilerArgs) -> Result<i32, WrapperError> {
        match a.mode {
            Mode::Compile | Mode::Assemble => {
                for input in a.inputs().filter(|i| i.lang.is_compiled()) {
                    let object = a.object_for(input);
                    let code = self.compile_one(a, input, &object, &object, a.mode)?;
                    if code != 0 {
                        return Ok(code);
                    }
                }
                Ok(0)
            }
            Mode::Link => {
                let tmp = tempfile::Builder::new()
                    .prefix("libcare-cc-")
                    .tempdir()
                    .map_err(|e| io(Path::new("/tmp"), e))?;
                let mut link_args = Vec::new();
                for (n, item) in a.items.iter().enumerate() {
                    match item {
                        Item::Input(i) if i.lang.is_compiled() => {
                            let obj = tmp.path().join(format!("{n}.o"));
                            let obj_s = path_str(&obj);
                            let key = link_member_name(&a.link_output(), i);
                            let code = self.compile_one(a, i, &key, &obj_s, Mode::Compile)?;
                            if code != 0 {
                                return Ok(code);
                            }
                            link_args.push(obj_s);
                        }
                        Item::Lang(_) | Item::ModeFlag(_) => {}
                        other => link_args.extend(flatten(std::slice::from_ref(other))),
                    }
                }
                if !a.relocatable_link {
                    link_args.push("-Wl,-q".into());
                }
                let code = self.status(self.command(&link_args))?;
                if code == 0 {
                    self.log_link(Stage::Patched, &a.link_output())?;
                }
                Ok(code)
            }
            Mode::Preprocess | Mode::SyntaxOnly => Ok(0),
        }
    }

    /// Compiles one input of a patched-stage call into `out` (`key` names its kept files).
    fn compile_one(
        &self,
        a: &CompilerArgs,
        input: &Input,
        key: &str,
        out: &str,
        mode: Mode,
    ) -> Result<i32, WrapperError> {
        let mode_flag = if mode == Mode::Assemble { "-S" } else { "-c" };
        // The build expects its dependency file from this compile (automake moves it).
        let deps = if a.mode == Mode::Link {
            Vec::new()
        } else {
            a.dep_flags_for(out)
        };
        if !input.lang.is_patchable() {
            let mut args = a.compile_flags();
            args.extend(deps);
            push_input(&mut args, input);
            args.extend([mode_flag.into(), "-o".into(), out.into()]);
            return self.status(self.command(&args));
        }
        let files = self.asm_files(key);
        if !files.original_s.is_file() {
            return Err(WrapperError::NoOriginal {
                object: key.to_string(),
                asm: files.original_s.clone(),
            });
        }
        let raw = with_suffix(&files.patched_s, ".raw");
        let mut args = a.compile_flags();
        args.extend(deps);
        push_input(&mut args, input);
        args.extend(["-S".into(), "-o".into(), path_str(&raw)]);
        let code = self.status(self.command(&args))?;
        if code != 0 {
            return Ok(code);
        }
        let diff_err = |stage: &str, e: String| WrapperError::Diff {
            object: key.to_string(),
            reason: format!("{stage}: {e}"),
        };
        let patched = asm_diff::filter(&read(&raw)?, &self.env.dbgfilter)
            .map_err(|e| diff_err("debug filter", e.to_string()))?;
        let _ = std::fs::remove_file(&raw);
        write(&files.patched_s, &patched)?;
        let original = read(&files.original_s)?;
        let diff = asm_diff::gensrc(&original, &patched, &self.env.patch)
            .map_err(|e| diff_err("gensrc", e.to_string()))?;
        for w in &diff.warnings {
            eprintln!("libcare-cc: {key}: warning: {w}");
        }
        write(&files.kpatch_s, &diff.asm)?;
        self.log_changes(key, &diff.changed, &diff.added)?;
        if mode == Mode::Assemble {
            write(&self.cwd.join(out), &diff.asm)?;
            return Ok(0);
        }
        let mut args: Vec<String> = a
            .compile_flags()
            .into_iter()
            .filter(|f| {
                f.starts_with("-m") || f.starts_with("-Wa,") || f.starts_with("-B") || f == "-pipe"
            })
            .collect();
        args.extend([
            "-c".into(),
            "-x".into(),
            "assembler".into(),
            path_str(&files.kpatch_s),
            "-o".into(),
            out.into(),
        ]);
        let code = self.status(self.command(&args))?;
        if code != 0 {
            return Ok(code);
        }
        if files.original_o.is_file() {
            let orig = std::fs::read(&files.original_o).map_err(|e| io(&files.original_o, e))?;
            let out_path = self.cwd.join(out);
            let new = std::fs::read(&out_path).map_err(|e| io(&out_path, e))?;
            crate::verify::same_code(&orig, &new).map_err(|source| {
                let _ = std::fs::remove_file(&out_path);
                WrapperError::CodeChanged {
                    object: key.to_string(),
                    source,
                }
            })?;
        }
        Ok(0)
    }

    fn log_link(&self, stage: Stage, output: &str) -> Result<(), WrapperError> {
        let Some(log) = &self.env.link_log else {
            return Ok(());
        };
        let abs = self.cwd.join(output);
        append(log, &format!("{}\t{}\n", stage.name(), abs.display()))
    }

    fn log_changes(
        &self,
        object: &str,
        changed: &[String],
        added: &[String],
    ) -> Result<(), WrapperError> {
        let Some(log) = &self.env.change_log else {
            return Ok(());
        };
        let abs = self.cwd.join(object);
        append(
            log,
            &format!(
                "{}\t{}\t{}\n",
                abs.display(),
                changed.join(","),
                added.join(",")
            ),
        )
    }
}

/// The kept-file key of a source compiled and linked in one call.
fn link_member_name(output: &str, src: &Input) -> String {
    let stem = Path::new(&src.path)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("src");
    format!("{output}-{stem}.o")
}

/// Appends `input` to `args`, repeating its `-x` language when it had one.
fn push_input(args: &mut Vec<String>, input: &Input) {
    if let Some(x) = &input.x {
        args.extend(["-x".into(), x.clone()]);
    } else if input.lang == Lang::Linker {
        args.extend(["-x".into(), "none".into()]);
    }
    args.push(input.path.clone());
}

/// The command line back as strings.
fn flatten(items: &[Item]) -> Vec<String> {
    let mut out = Vec::new();
    for item in items {
        match item {
            Item::Flag(f) => out.extend(f.iter().cloned()),
            Item::Input(i) => out.push(i.path.clone()),
            Item::Output(o) => out.extend(["-o".into(), o.clone()]),
            Item::ModeFlag(m) => out.push(m.clone()),
            Item::Lang(x) => out.extend(["-x".into(), x.clone()]),
        }
    }
    out
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn io(path: &Path, source: std::io::Error) -> WrapperError {
    WrapperError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<String, WrapperError> {
    std::fs::read_to_string(path).map_err(|e| io(path, e))
}

fn write(path: &Path, text: &str) -> Result<(), WrapperError> {
    std::fs::write(path, text).map_err(|e| io(path, e))
}

fn copy(from: &Path, to: &Path) -> Result<(), WrapperError> {
    std::fs::copy(from, to).map(|_| ()).map_err(|e| io(from, e))
}

fn append(log: &Path, line: &str) -> Result<(), WrapperError> {
    // One write per line on an O_APPEND file: parallel make jobs do not interleave.
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| io(log, e))?;
    f.write_all(line.as_bytes()).map_err(|e| io(log, e))
}
