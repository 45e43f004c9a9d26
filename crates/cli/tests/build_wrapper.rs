//! The `libcare-cc` wrapper on the command lines real build systems pass it, driven
//! through its LibCare name (a symlink to the binary) and the environment.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use object::{Object, ObjectSection};
use testkit::Scratch;

/// A scratch project with a `libcare-cc` symlink and an assembly directory.
struct Env {
    dir: Scratch,
    cc: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = Scratch::new().unwrap();
        let cc = dir.join("bin/libcare-cc");
        std::fs::create_dir_all(cc.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_livecare"), &cc).unwrap();
        dir.write("inc dir/util.h", "int util(int);\n").unwrap();
        dir.write(
            "util.c",
            "#include \"util.h\"\n__attribute__((noipa)) int util(int x) { return x * 3; }\n",
        )
        .unwrap();
        dir.write(
            "main.c",
            "#include <stdio.h>\n#include \"util.h\"\nint main(void) { printf(\"%d\\n\", util(2)); return 0; }\n",
        )
        .unwrap();
        Env { dir, cc }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }

    /// Runs the wrapper in `stage` with `args`.
    fn cc(&self, stage: &str, args: &[&str]) -> Output {
        Command::new(&self.cc)
            .args(args)
            .current_dir(self.dir.path())
            .env("KPATCH_STAGE", stage)
            .env("KPATCH_ASM_DIR", self.path("asm"))
            .env("LIVECARE_LINK_LOG", self.path("links.log"))
            .env_remove("KPCCREAL")
            .output()
            .unwrap()
    }

    fn cc_ok(&self, stage: &str, args: &[&str]) -> Output {
        let out = self.cc(stage, args);
        assert!(
            out.status.success(),
            "libcare-cc {args:?} ({stage}) failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn asm_files(&self, suffix: &str) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(self.path("asm")) else {
            return Vec::new();
        };
        let mut v: Vec<PathBuf> = rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        v.sort();
        v
    }
}

fn gcc(dir: &Path, args: &[&str]) {
    let out = Command::new("gcc")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gcc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn section<'a>(file: &'a object::File<'a>, name: &str) -> Option<&'a [u8]> {
    file.section_by_name(name).and_then(|s| s.data().ok())
}

#[test]
fn original_stage_output_is_byte_identical_to_a_plain_build() {
    let env = Env::new();
    // Compile-and-link of two sources in one call, `-I dir` with a space, dependency
    // flags and a response file: the binary must be exactly what gcc alone produces.
    env.dir
        .write("args.rsp", "-O2 -g -I 'inc dir' -MMD")
        .unwrap();
    env.cc_ok(
        "original",
        &["@args.rsp", "main.c", "util.c", "-o", "wrapped"],
    );
    gcc(
        env.dir.path(),
        &["@args.rsp", "main.c", "util.c", "-o", "plain"],
    );
    let wrapped = std::fs::read(env.path("wrapped")).unwrap();
    assert_eq!(
        wrapped,
        std::fs::read(env.path("plain")).unwrap(),
        "binaries differ"
    );
    // The assembly of both sources was kept, debug-filtered (no .loc lines).
    let kept = env.asm_files(".original.s");
    assert_eq!(kept.len(), 2, "{kept:?}");
    for s in &kept {
        let text = std::fs::read_to_string(s).unwrap();
        assert!(text.contains(".cfi_startproc"), "{}", s.display());
        assert!(!text.contains("\t.loc\t"), "{} still has .loc", s.display());
    }
    // The link was recorded for the orchestrator.
    let log = std::fs::read_to_string(env.path("links.log")).unwrap();
    assert_eq!(
        log.trim(),
        format!("original\t{}", env.path("wrapped").display())
    );
}

#[test]
fn patched_stage_object_carries_the_new_code_and_keeps_the_old() {
    let env = Env::new();
    let args = [
        "-O2", "-g", "-I", "inc dir", "-MD", "-MF", "util.d", "-c", "util.c", "-o", "util.o",
    ];
    env.cc_ok("original", &args);
    let original = std::fs::read(env.path("util.o")).unwrap();
    env.dir
        .write(
            "util.c",
            "#include \"util.h\"\n__attribute__((noipa)) int util(int x) { return x * 4 + 1; }\n",
        )
        .unwrap();
    env.cc_ok("patched", &args);
    let patched = std::fs::read(env.path("util.o")).unwrap();
    let o = object::File::parse(&*original).unwrap();
    let p = object::File::parse(&*patched).unwrap();
    assert!(section(&o, ".kpatch.text").is_none());
    assert!(!section(&p, ".kpatch.text")
        .expect("no .kpatch.text")
        .is_empty());
    assert!(section(&p, ".kpatch.info").is_some());
    assert_eq!(
        section(&o, ".text"),
        section(&p, ".text"),
        "original code changed"
    );
    assert_eq!(env.asm_files(".patched.s").len(), 1);
}

#[test]
fn patched_link_keeps_relocations_and_is_logged() {
    let env = Env::new();
    env.cc_ok(
        "original",
        &["-O2", "-I", "inc dir", "-c", "util.c", "main.c"],
    );
    env.cc_ok("original", &["main.o", "util.o", "-o", "prog"]);
    env.dir
        .write(
            "util.c",
            "#include \"util.h\"\n__attribute__((noipa)) int util(int x) { return x * 5; }\n",
        )
        .unwrap();
    env.cc_ok("patched", &["-O2", "-I", "inc dir", "-c", "util.c"]);
    env.cc_ok("patched", &["main.o", "util.o", "-o", "prog"]);
    let bin = std::fs::read(env.path("prog")).unwrap();
    let f = object::File::parse(&*bin).unwrap();
    assert!(
        f.section_by_name(".rela.text").is_some(),
        "-Wl,-q was not added"
    );
    assert!(f.section_by_name(".kpatch.info").is_some());
    let log = std::fs::read_to_string(env.path("links.log")).unwrap();
    let stages: Vec<&str> = log.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(stages, ["original", "patched"]);
    // The patched binary still runs the original code; the new body only rides along.
    let out = Command::new(env.path("prog")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "6");
}

#[test]
fn assembly_inputs_and_several_sources_build_in_both_stages() {
    let env = Env::new();
    env.dir
        .write("answer.s", "\t.text\n\t.globl answer\n\t.type answer,@function\nanswer:\n\tmovl $42, %eax\n\tret\n\t.section .note.GNU-stack,\"\",@progbits\n")
        .unwrap();
    for stage in ["original", "patched"] {
        env.cc_ok(stage, &["-O2", "-I", "inc dir", "-c", "util.c", "answer.s"]);
        assert!(
            env.path("answer.o").is_file() && env.path("util.o").is_file(),
            "{stage}"
        );
    }
    assert_eq!(
        env.asm_files(".original.s").len(),
        1,
        "only the C source is kept"
    );
}

#[test]
fn link_time_optimisation_is_refused_clearly() {
    let env = Env::new();
    let out = env.cc(
        "original",
        &["-O2", "-flto", "-I", "inc dir", "-c", "util.c"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("-flto"), "{err}");
    assert!(!env.path("util.o").exists());
}

#[test]
fn probes_and_configure_programs_pass_through() {
    let env = Env::new();
    let version = env.cc_ok("patched", &["--version"]);
    assert!(String::from_utf8_lossy(&version.stdout).contains("gcc"));
    let dump = env.cc_ok("patched", &["-dumpversion"]);
    assert!(!dump.stdout.is_empty());
    // A configure test program compiles and links in the patched stage without any
    // original assembly, and leaves no kept files or link records behind.
    env.dir
        .write("conftest.c", "int main(void) { return 0; }\n")
        .unwrap();
    env.cc_ok("patched", &["-O2", "conftest.c", "-o", "conftest"]);
    assert!(env.path("conftest").is_file());
    // Preprocessing only also passes through.
    let pp = env.cc_ok("patched", &["-E", "-I", "inc dir", "util.c"]);
    assert!(String::from_utf8_lossy(&pp.stdout).contains("int util(int)"));
    assert!(env.asm_files(".s").is_empty());
    assert!(!env.path("links.log").exists());
    // No stage at all: a plain compiler.
    env.cc_ok("", &["-c", "-I", "inc dir", "util.c"]);
    assert!(env.asm_files(".s").is_empty());
}

#[test]
fn patched_stage_without_original_assembly_names_the_object() {
    let env = Env::new();
    let out = env.cc(
        "patched",
        &["-O2", "-I", "inc dir", "-c", "util.c", "-o", "util.o"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("util.o") && err.contains("no original assembly"),
        "{err}"
    );
}

#[test]
fn remove_and_append_args_apply_to_the_stages() {
    let env = Env::new();
    let out = Command::new(&env.cc)
        .args(["-O2", "-I", "inc dir", "-fno-such-flag", "-c", "util.c"])
        .current_dir(env.dir.path())
        .env("KPATCH_STAGE", "original")
        .env("KPATCH_ASM_DIR", env.path("asm"))
        .env("KPCC_REMOVE_ARGS", "-fno-such-flag")
        .env("KPCC_APPEND_ARGS", "-DEXTRA=1;-O1")
        .env("KPCC_DEBUG", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("-DEXTRA=1") && !err.contains("no-such-flag"),
        "{err}"
    );
}

#[test]
fn compile_and_link_in_one_call_builds_the_patch_in_the_patched_stage() {
    let env = Env::new();
    let args = ["-O2", "-I", "inc dir", "main.c", "util.c", "-o", "prog"];
    env.cc_ok("original", &args);
    env.dir
        .write(
            "util.c",
            "#include \"util.h\"\n__attribute__((noipa)) int util(int x) { return x - 1; }\n",
        )
        .unwrap();
    env.cc_ok("patched", &args);
    let bin = std::fs::read(env.path("prog")).unwrap();
    let f = object::File::parse(&*bin).unwrap();
    assert!(f.section_by_name(".kpatch.text").is_some());
    assert!(
        f.section_by_name(".rela.text").is_some(),
        "-Wl,-q was not added"
    );
    let out = Command::new(env.path("prog")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "6");
}

#[test]
fn a_real_compiler_that_leads_back_to_the_wrapper_is_an_error_not_a_loop() {
    let env = Env::new();
    let out = Command::new(&env.cc)
        .args(["-c", "-I", "inc dir", "util.c"])
        .current_dir(env.dir.path())
        .env("KPATCH_STAGE", "original")
        .env("KPCCREAL", &env.cc)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("runs the wrapper again"), "{err}");
}
