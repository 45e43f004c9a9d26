//! A gcc command line as a typed value: inputs with their language, the output, the
//! mode (link, `-c`, `-S`, `-E`) and the other flags, in their original order.
//!
//! The wrapper needs to know exactly which files are compiled to what, so that it can
//! capture or replace the assembly of each C source while leaving every other flag as the
//! build system gave it.

use std::path::Path;

/// The language gcc will treat an input as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lang {
    /// C source (`.c`, `-x c`).
    C,
    /// Preprocessed C (`.i`, `-x cpp-output`).
    CPreprocessed,
    /// C++ source (`.cc`, `.cpp`, `.cxx`, `.C`, `.c++`, `-x c++`).
    Cxx,
    /// Preprocessed C++ (`.ii`).
    CxxPreprocessed,
    /// Assembly without preprocessing (`.s`, `-x assembler`).
    Asm,
    /// Assembly with preprocessing (`.S`, `.sx`, `-x assembler-with-cpp`).
    AsmCpp,
    /// Any other `-x` language (Objective-C, Fortran, headers, ...).
    OtherSource(String),
    /// A linker input: object, archive, shared library or unknown extension.
    Linker,
}

impl Lang {
    /// The language of `path` by its extension, as gcc decides when no `-x` is given.
    pub fn from_extension(path: &str) -> Lang {
        let ext = Path::new(path)
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("");
        match ext {
            "c" => Lang::C,
            "i" => Lang::CPreprocessed,
            "cc" | "cp" | "cxx" | "cpp" | "CPP" | "c++" | "C" => Lang::Cxx,
            "ii" => Lang::CxxPreprocessed,
            "s" => Lang::Asm,
            "S" | "sx" => Lang::AsmCpp,
            "m" | "mi" | "mm" | "M" | "f" | "for" | "f90" | "f95" | "F" | "go" | "d" | "h"
            | "hh" | "hpp" | "H" | "ads" | "adb" => Lang::OtherSource(ext.to_string()),
            _ => Lang::Linker,
        }
    }

    /// The language named by `-x NAME` (`none` means: by extension).
    fn from_x(name: &str) -> Option<Lang> {
        Some(match name {
            "none" => return None,
            "c" => Lang::C,
            "cpp-output" => Lang::CPreprocessed,
            "c++" => Lang::Cxx,
            "c++-cpp-output" => Lang::CxxPreprocessed,
            "assembler" => Lang::Asm,
            "assembler-with-cpp" => Lang::AsmCpp,
            other => Lang::OtherSource(other.to_string()),
        })
    }

    /// True for C and C++ (preprocessed or not): the inputs whose assembly is diffed.
    pub fn is_patchable(&self) -> bool {
        matches!(
            self,
            Lang::C | Lang::CPreprocessed | Lang::Cxx | Lang::CxxPreprocessed
        )
    }

    /// True for everything gcc compiles or assembles (not a linker input).
    pub fn is_compiled(&self) -> bool {
        !matches!(self, Lang::Linker)
    }
}

/// One input file and how gcc will treat it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// The path as given (`-` is standard input).
    pub path: String,
    /// Its language.
    pub lang: Lang,
    /// The `-x` value in effect for it, if any (must be repeated when it is compiled alone).
    pub x: Option<String>,
}

/// What a gcc call produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Compile (if needed) and link: no `-c`, `-S` or `-E`.
    Link,
    /// `-c`: objects.
    Compile,
    /// `-S`: assembly.
    Assemble,
    /// `-E`, `-M` or `-MM` without `-MD`/`-MMD`: preprocessing only.
    Preprocess,
    /// `-fsyntax-only`.
    SyntaxOnly,
}

/// One item of the command line, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A flag with its separate value if it takes one (`["-I", "dir"]`, `["-O2"]`).
    Flag(Vec<String>),
    /// An input file.
    Input(Input),
    /// `-o FILE` (or `-oFILE`).
    Output(String),
    /// `-c`, `-S` or `-E`.
    ModeFlag(String),
    /// `-x LANG` (or `-xLANG`).
    Lang(String),
}

/// A parsed gcc command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompilerArgs {
    /// Every item, in order, after `@file` expansion.
    pub items: Vec<Item>,
    /// What the call produces.
    pub mode: Mode,
    /// The `-o` value, if given (the last one wins, as in gcc).
    pub output: Option<String>,
    /// A query of the compiler itself (`--version`, `-dumpversion`, `-print-*`, `-###`, ...).
    pub probe: bool,
    /// Link-time optimisation requested (`-flto*` not cancelled by `-fno-lto`).
    pub lto: bool,
    /// A partial link (`-r`, `-Wl,-r`, `-Wl,--relocatable`).
    pub relocatable_link: bool,
}

/// Flags whose value is the next argument when given alone.
const TAKES_VALUE: &[&str] = &[
    "-I",
    "-D",
    "-U",
    "-include",
    "-imacros",
    "-iprefix",
    "-iwithprefix",
    "-iwithprefixbefore",
    "-isystem",
    "-idirafter",
    "-iquote",
    "-isysroot",
    "-imultilib",
    "-imultiarch",
    "-MF",
    "-MT",
    "-MQ",
    "-L",
    "-l",
    "-T",
    "-Tbss",
    "-Tdata",
    "-Ttext",
    "-u",
    "-z",
    "-e",
    "-A",
    "-B",
    "-Xlinker",
    "-Xassembler",
    "-Xpreprocessor",
    "-aux-info",
    "--param",
    "-dumpbase",
    "-dumpbase-ext",
    "-dumpdir",
    "-wrapper",
    "--sysroot",
    "-specs",
];

/// Flags that ask the compiler about itself.
fn is_probe(arg: &str) -> bool {
    matches!(
        arg,
        "--version"
            | "-dumpversion"
            | "-dumpfullversion"
            | "-dumpmachine"
            | "-dumpspecs"
            | "--help"
            | "--target-help"
            | "-###"
    ) || arg.starts_with("-print-")
        || arg.starts_with("--print-")
        || arg.starts_with("--help=")
}

/// Dependency-file flags: they must not be repeated by the extra compiles the wrapper
/// makes, or the `.d` file would name the wrong target.
pub fn is_dep_flag(flag: &[String]) -> bool {
    let first = flag.first().map(String::as_str).unwrap_or("");
    matches!(
        first,
        "-MD" | "-MMD" | "-MP" | "-MG" | "-MF" | "-MT" | "-MQ"
    ) || first.starts_with("-MF")
        || first.starts_with("-MT")
        || first.starts_with("-MQ")
        || first.starts_with("-Wp,-MD,")
        || first.starts_with("-Wp,-MMD,")
}

/// Debug-information flags (`-g`, `-ggdb`, `-g3`, `-gdwarf-4`, ...).
pub fn is_debug_flag(flag: &str) -> bool {
    flag.starts_with("-g") && !flag.starts_with("-gno-") && flag != "-g0"
}

/// Errors of command-line parsing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    /// A flag that needs a value came last.
    #[error("argument {flag:?} needs a value")]
    MissingValue {
        /// The flag.
        flag: String,
    },
    /// A response file could not be read.
    #[error("response file {path:?}: {reason}")]
    ResponseFile {
        /// Its path.
        path: String,
        /// Why.
        reason: String,
    },
}

impl CompilerArgs {
    /// Parses gcc's arguments (without argv[0]), expanding `@file` response files.
    pub fn parse(args: &[String]) -> Result<CompilerArgs, ArgsError> {
        let args = expand_response_files(args, 0)?;
        let mut items = Vec::new();
        let mut x: Option<String> = None;
        let mut mode_flags = (false, false, false); // -c, -S, -E
        let (mut m_only, mut md) = (false, false);
        let mut syntax_only = false;
        let mut output = None;
        let mut probe = false;
        let mut lto = false;
        let mut relocatable_link = false;
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            if arg == "-o" {
                let v = it
                    .next()
                    .ok_or(ArgsError::MissingValue { flag: arg.clone() })?;
                output = Some(v.clone());
                items.push(Item::Output(v));
                continue;
            }
            if let Some(v) = arg.strip_prefix("-o").filter(|v| !v.is_empty()) {
                output = Some(v.to_string());
                items.push(Item::Output(v.to_string()));
                continue;
            }
            if arg == "-x" || (arg.starts_with("-x") && arg.len() > 2) {
                let v = if arg == "-x" {
                    it.next()
                        .ok_or(ArgsError::MissingValue { flag: arg.clone() })?
                } else {
                    arg[2..].to_string()
                };
                x = (v != "none").then(|| v.clone());
                items.push(Item::Lang(v));
                continue;
            }
            match arg.as_str() {
                "-c" => mode_flags.0 = true,
                "-S" => mode_flags.1 = true,
                "-E" => mode_flags.2 = true,
                _ => {}
            }
            if matches!(arg.as_str(), "-c" | "-S" | "-E") {
                items.push(Item::ModeFlag(arg));
                continue;
            }
            if arg == "-" || !arg.starts_with('-') || arg.len() == 1 {
                let lang = match &x {
                    Some(name) => Lang::from_x(name).unwrap_or(Lang::Linker),
                    None => Lang::from_extension(&arg),
                };
                items.push(Item::Input(Input {
                    path: arg,
                    lang,
                    x: x.clone(),
                }));
                continue;
            }
            if is_probe(&arg) {
                probe = true;
            }
            match arg.as_str() {
                "-M" | "-MM" => m_only = true,
                "-MD" | "-MMD" => md = true,
                "-fsyntax-only" => syntax_only = true,
                "-fno-lto" => lto = false,
                "-r" | "-Wl,-r" | "-Wl,--relocatable" => relocatable_link = true,
                a if a.starts_with("-flto") => lto = true,
                _ => {}
            }
            if TAKES_VALUE.contains(&arg.as_str()) {
                let v = it
                    .next()
                    .ok_or(ArgsError::MissingValue { flag: arg.clone() })?;
                items.push(Item::Flag(vec![arg, v]));
            } else {
                items.push(Item::Flag(vec![arg]));
            }
        }
        let mode = if mode_flags.2 || (m_only && !md) {
            Mode::Preprocess
        } else if syntax_only {
            Mode::SyntaxOnly
        } else if mode_flags.1 {
            Mode::Assemble
        } else if mode_flags.0 {
            Mode::Compile
        } else {
            Mode::Link
        };
        Ok(CompilerArgs {
            items,
            mode,
            output,
            probe,
            lto,
            relocatable_link,
        })
    }

    /// Every input, in order.
    pub fn inputs(&self) -> impl Iterator<Item = &Input> {
        self.items.iter().filter_map(|i| match i {
            Item::Input(input) => Some(input),
            _ => None,
        })
    }

    /// The C/C++ inputs whose assembly is captured and diffed.
    pub fn patchable_sources(&self) -> Vec<&Input> {
        self.inputs().filter(|i| i.lang.is_patchable()).collect()
    }

    /// The flags (with their values), in order, without inputs, `-o`, `-x` and the mode.
    pub fn flags(&self) -> Vec<&[String]> {
        self.items
            .iter()
            .filter_map(|i| match i {
                Item::Flag(f) => Some(f.as_slice()),
                _ => None,
            })
            .collect()
    }

    /// The flags flattened, without dependency-file flags: what an extra compile of one
    /// input needs.
    pub fn compile_flags(&self) -> Vec<String> {
        self.flags()
            .into_iter()
            .filter(|f| !is_dep_flag(f))
            .flatten()
            .cloned()
            .collect()
    }

    /// The dependency-file flags of this call, made explicit for compiling one input
    /// into `object` through another path (`-S` to a temporary file): the `.d` file
    /// keeps the name and target gcc would have given it.
    pub fn dep_flags_for(&self, object: &str) -> Vec<String> {
        let flags: Vec<&[String]> = self
            .flags()
            .into_iter()
            .filter(|f| is_dep_flag(f))
            .collect();
        let writes = flags
            .iter()
            .any(|f| matches!(f[0].as_str(), "-MD" | "-MMD") || f[0].starts_with("-Wp,-M"));
        if !writes {
            return Vec::new();
        }
        let mut out: Vec<String> = flags.iter().flat_map(|f| f.iter().cloned()).collect();
        let has = |p: &str| flags.iter().any(|f| f[0].starts_with(p));
        if !has("-MT") && !has("-MQ") {
            out.extend(["-MT".to_string(), object.to_string()]);
        }
        if !has("-MF") && !has("-Wp,-M") {
            let d = Path::new(object).with_extension("d");
            out.extend(["-MF".to_string(), d.to_string_lossy().into_owned()]);
        }
        out
    }

    /// The output file of compiling `input` in this call (`-o` with one input, else gcc's
    /// default `<stem>.o` / `<stem>.s` in the current directory).
    pub fn object_for(&self, input: &Input) -> String {
        let single = self.inputs().filter(|i| i.lang.is_compiled()).count() == 1;
        if let (Some(out), true, Mode::Compile | Mode::Assemble) = (&self.output, single, self.mode)
        {
            return out.clone();
        }
        let stem = Path::new(&input.path)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("a");
        match self.mode {
            Mode::Assemble => format!("{stem}.s"),
            _ => format!("{stem}.o"),
        }
    }

    /// The linked output (`-o`, else `a.out`).
    pub fn link_output(&self) -> String {
        self.output.clone().unwrap_or_else(|| "a.out".to_string())
    }

    /// True when an input looks like a configure/CMake probe program, which is passed
    /// through untouched.
    pub fn is_conftest(&self, cwd: &Path) -> bool {
        let cwd = cwd.to_string_lossy();
        if cwd.contains("CMakeFiles/CMakeTmp")
            || cwd.contains("CMakeFiles/CMakeScratch")
            || cwd.contains("meson-private")
        {
            return true;
        }
        let probe_name = |path: &str| {
            let name = Path::new(path)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("");
            name.starts_with("conftest")
                // nginx's auto/configure: objs/autotest.c -> objs/autotest.
                || name == "autotest"
                || name.starts_with("autotest.")
                || name.starts_with("CMakeCCompilerId")
                || name.starts_with("CMakeCXXCompilerId")
                || name.starts_with("sanitycheck")
                || path.contains("meson-private/")
                || path.contains("CMakeFiles/CMakeTmp")
                || path.contains("CMakeFiles/CMakeScratch")
        };
        self.inputs().any(|i| probe_name(&i.path)) || self.output.as_deref().is_some_and(probe_name)
    }
}

/// Expands `@file` arguments the way gcc does (whitespace-separated, with quotes and
/// backslash escapes; nested response files allowed; a missing file stays literal).
fn expand_response_files(args: &[String], depth: usize) -> Result<Vec<String>, ArgsError> {
    let mut out = Vec::with_capacity(args.len());
    for arg in args {
        let Some(path) = arg.strip_prefix('@').filter(|p| !p.is_empty()) else {
            out.push(arg.clone());
            continue;
        };
        let Ok(text) = std::fs::read_to_string(path) else {
            out.push(arg.clone());
            continue;
        };
        if depth > 16 {
            return Err(ArgsError::ResponseFile {
                path: path.to_string(),
                reason: "response files nested too deeply".into(),
            });
        }
        out.extend(expand_response_files(&split_response(&text), depth + 1)?);
    }
    Ok(out)
}

/// Splits the contents of a response file into arguments.
fn split_response(text: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut in_arg = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (c, quote) {
            ('\\', _) => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_arg = true;
            }
            (q, Some(open)) if q == open => quote = None,
            (q, None) if q == '\'' || q == '"' => {
                quote = Some(q);
                in_arg = true;
            }
            (w, None) if w.is_whitespace() => {
                if in_arg {
                    args.push(std::mem::take(&mut cur));
                    in_arg = false;
                }
            }
            (other, _) => {
                cur.push(other);
                in_arg = true;
            }
        }
    }
    if in_arg {
        args.push(cur);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> CompilerArgs {
        let v: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        CompilerArgs::parse(&v).unwrap()
    }

    fn paths(a: &CompilerArgs) -> Vec<&str> {
        a.inputs().map(|i| i.path.as_str()).collect()
    }

    #[test]
    fn output_is_found_anywhere_and_glued() {
        let a = parse("-o out.o -c foo.c -O2");
        assert_eq!(a.output.as_deref(), Some("out.o"));
        assert_eq!(a.mode, Mode::Compile);
        let b = parse("-c foo.c -O2 -oglued.o");
        assert_eq!(b.output.as_deref(), Some("glued.o"));
        assert_eq!(paths(&b), ["foo.c"]);
    }

    #[test]
    fn modes_are_recognised() {
        assert_eq!(parse("-c a.c").mode, Mode::Compile);
        assert_eq!(parse("-S a.c").mode, Mode::Assemble);
        assert_eq!(parse("-E a.c").mode, Mode::Preprocess);
        assert_eq!(parse("-M a.c").mode, Mode::Preprocess);
        assert_eq!(parse("-MM a.c").mode, Mode::Preprocess);
        assert_eq!(parse("-fsyntax-only a.c").mode, Mode::SyntaxOnly);
        assert_eq!(parse("a.c b.o -o prog").mode, Mode::Link);
    }

    #[test]
    fn dependency_flags_keep_compile_mode_and_are_dropped_from_extra_compiles() {
        let a = parse("-MD -MP -MF .deps/foo.Tpo -MT foo.o -c foo.c -o foo.o -Wp,-MD,x.d -I inc");
        assert_eq!(a.mode, Mode::Compile);
        assert_eq!(paths(&a), ["foo.c"]);
        assert_eq!(a.compile_flags(), ["-I", "inc"]);
    }

    #[test]
    fn include_dir_with_a_space_is_a_flag_value_not_an_input() {
        let a = parse("-I src/core -I objs -c src/core/nginx.c -o objs/nginx.o");
        assert_eq!(paths(&a), ["src/core/nginx.c"]);
        assert_eq!(
            a.flags(),
            [
                &["-I".to_string(), "src/core".to_string()][..],
                &["-I".into(), "objs".into()]
            ]
        );
        assert_eq!(a.object_for(a.patchable_sources()[0]), "objs/nginx.o");
    }

    #[test]
    fn dependency_flags_are_made_explicit_for_a_redirected_compile() {
        let a = parse("-MT src/w.o -MD -MP -MF src/.deps/w.Tpo -c -o src/w.o src/w.c");
        assert_eq!(
            a.dep_flags_for("src/w.o"),
            ["-MT", "src/w.o", "-MD", "-MP", "-MF", "src/.deps/w.Tpo"]
        );
        let b = parse("-MMD -c -o obj/x.o x.c");
        assert_eq!(
            b.dep_flags_for("obj/x.o"),
            ["-MMD", "-MT", "obj/x.o", "-MF", "obj/x.d"]
        );
        assert!(parse("-c x.c").dep_flags_for("x.o").is_empty());
    }

    #[test]
    fn several_sources_in_one_call_get_default_object_names() {
        let a = parse("-c src/a.c src/b.c -O2");
        let srcs = a.patchable_sources();
        assert_eq!(srcs.len(), 2);
        assert_eq!(a.object_for(srcs[0]), "a.o");
        assert_eq!(a.object_for(srcs[1]), "b.o");
    }

    #[test]
    fn compile_and_link_in_one_call() {
        let a = parse("-O2 main.c util.c -lm -o prog libx.a");
        assert_eq!(a.mode, Mode::Link);
        assert_eq!(a.patchable_sources().len(), 2);
        assert_eq!(a.link_output(), "prog");
        let langs: Vec<_> = a.inputs().map(|i| i.lang.clone()).collect();
        assert_eq!(langs, [Lang::C, Lang::C, Lang::Linker]);
        assert_eq!(parse("main.o").link_output(), "a.out");
    }

    #[test]
    fn assembly_inputs_are_not_patchable() {
        let a = parse("-c start.S entry.s");
        let langs: Vec<_> = a.inputs().map(|i| i.lang.clone()).collect();
        assert_eq!(langs, [Lang::AsmCpp, Lang::Asm]);
        assert!(a.patchable_sources().is_empty());
    }

    #[test]
    fn x_language_applies_until_none() {
        let a = parse("-x c weird.txt -xassembler b.asm -x none c.o");
        let got: Vec<_> = a.inputs().map(|i| (i.lang.clone(), i.x.clone())).collect();
        assert_eq!(
            got,
            [
                (Lang::C, Some("c".to_string())),
                (Lang::Asm, Some("assembler".to_string())),
                (Lang::Linker, None)
            ]
        );
    }

    #[test]
    fn response_files_are_expanded_with_quotes() {
        let dir = tempfile::tempdir().unwrap();
        let rsp = dir.path().join("args.rsp");
        std::fs::write(&rsp, "-c 'my file.c' -DX=\"a b\" -o\nout.o\n").unwrap();
        let a = CompilerArgs::parse(&[format!("@{}", rsp.display()), "-O2".into()]).unwrap();
        assert_eq!(paths(&a), ["my file.c"]);
        assert_eq!(a.output.as_deref(), Some("out.o"));
        assert_eq!(a.compile_flags(), ["-DX=a b", "-O2"]);
        // A missing response file stays a literal argument, as in gcc.
        let b = CompilerArgs::parse(&["@/nonexistent/rsp".to_string()]).unwrap();
        assert_eq!(paths(&b), ["@/nonexistent/rsp"]);
    }

    #[test]
    fn probes_are_recognised() {
        for p in [
            "--version",
            "-dumpversion",
            "-print-prog-name=ld",
            "-print-multi-os-directory",
            "-###",
        ] {
            assert!(parse(p).probe, "{p}");
        }
        assert!(!parse("-v -c a.c").probe);
        assert_eq!(parse("-v").inputs().count(), 0);
    }

    #[test]
    fn lto_and_partial_links_are_detected() {
        assert!(parse("-flto=auto -c a.c").lto);
        assert!(!parse("-flto -fno-lto -c a.c").lto);
        assert!(parse("-r a.o b.o -o c.o").relocatable_link);
        assert!(parse("-pipe -c a.c")
            .flags()
            .iter()
            .any(|f| f[0] == "-pipe"));
    }

    #[test]
    fn conftest_programs_are_recognised() {
        let cwd = Path::new("/src/proj");
        assert!(parse("conftest.c -o conftest").is_conftest(cwd));
        assert!(parse("-c conftest.c").is_conftest(cwd));
        assert!(parse("-c x.c").is_conftest(Path::new("/b/CMakeFiles/CMakeScratch/TryCompile-1")));
        assert!(parse("sanitycheckc.c -o sanitycheckc.exe").is_conftest(cwd));
        assert!(parse("-c testfile.c").is_conftest(Path::new("/b/meson-private/tmpab12")));
        assert!(parse("-o objs/autotest objs/autotest.c -lpcre").is_conftest(cwd));
        assert!(!parse("-c main.c -o main.o").is_conftest(cwd));
    }

    #[test]
    fn missing_value_is_an_error_not_a_panic() {
        assert_eq!(
            CompilerArgs::parse(&["-c".into(), "a.c".into(), "-o".into()]),
            Err(ArgsError::MissingValue { flag: "-o".into() })
        );
        assert!(CompilerArgs::parse(&["-I".into()]).is_err());
    }

    #[test]
    fn debug_flags_are_recognised() {
        for f in ["-g", "-ggdb", "-g3", "-gdwarf-4"] {
            assert!(is_debug_flag(f), "{f}");
        }
        assert!(!is_debug_flag("-g0"));
    }
}
