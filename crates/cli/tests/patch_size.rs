//! Issue 17.8e: a one-function patch of a program with thousands of functions and
//! hundreds of sections carries the unwind entries (FDEs) of its own code only, not the
//! program's whole `.eh_frame`, and only the section headers its symbols need, not one
//! placeholder per section of the program, and still applies and unpatches while a thread sleeps in a callee of
//! the patched function (its frames are unwound through the patch's own CFI).

mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::*;
use object::{Object as _, ObjectSection};
use testkit::patchbuild::{Builder, Flags};
use testkit::{Running, Scratch};

/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(30);

/// Functions in the generated program: its `.eh_frame` holds one FDE for each.
const FUNCTIONS: usize = 2000;

/// Data sections of their own in the generated program (`__attribute__((section))`):
/// each is a placeholder section header (64 bytes + name) in a patch that keeps them all.
const SECTIONS: usize = 600;

/// Goal of issue 17 for a one-function patch.
const MAX_PATCH: u64 = 32 * 1024;

/// A program of `FUNCTIONS` distinct functions (kept through a table) around `value()`,
/// which worker 1 calls in a loop and which sleeps 200 ms in `nap()` each time, so the
/// worker is nearly always in a callee of the function a patch replaces.
fn program(value_result: u32) -> String {
    let mut c = String::from(
        "#include <pthread.h>\n#include <stdio.h>\n#include <unistd.h>\n\n\
         typedef long (*fn_t)(long);\n",
    );
    for i in 0..FUNCTIONS {
        let _ = writeln!(
            c,
            "static __attribute__((noinline)) long f{i}(long x) {{ return (x * {m} + {i}) ^ (x >> {s}); }}",
            m = 2 * i + 3,
            s = i % 13 + 1
        );
    }
    for i in 0..SECTIONS {
        let _ = writeln!(
            c,
            "__attribute__((used, section(\"lc_sec_{i}\"))) long lc_var_{i} = {i};"
        );
    }
    c.push_str("fn_t table[] = {");
    for i in 0..FUNCTIONS {
        let _ = write!(c, "f{i},");
    }
    let _ = write!(
        c,
        r#"}};
volatile long sink;

__attribute__((noinline, noipa)) void nap(void)
{{
	usleep(200000);
}}

__attribute__((noinline, noipa)) int value(long who)
{{
	if (who == 1)
		nap();
	return {value_result};
}}

static __attribute__((noinline)) int call_value(long who)
{{
	int v = value(who);
	sink = v; /* no tail call */
	return v;
}}

static void *worker(void *arg)
{{
	(void)arg;
	printf("worker started\n");
	fflush(stdout);
	for (;;)
		call_value(1);
	return NULL;
}}

int main(int argc, char **argv)
{{
	pthread_t t;
	for (long i = 0; i < (long)(sizeof table / sizeof table[0]); i++)
		sink += table[i](argc + i);
	pthread_create(&t, NULL, worker, NULL);
	for (;;) {{
		printf("value=%d\n", call_value(0));
		fflush(stdout);
		usleep(50000);
	}}
	(void)argv;
}}
"#
    );
    c
}

/// The FDEs (entries that are no CIE) of an `.eh_frame` section.
fn fde_count(eh: &[u8]) -> usize {
    let mut n = 0;
    let mut off = 0;
    while off + 8 <= eh.len() {
        let len = u32::from_le_bytes(eh[off..off + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        let id = u32::from_le_bytes(eh[off + 4..off + 8].try_into().unwrap());
        if id != 0 {
            n += 1;
        }
        off += 4 + len;
    }
    n
}

fn sections_of(path: &Path) -> Result<usize> {
    let data = std::fs::read(path)?;
    Ok(object::File::parse(&*data)?.sections().count())
}

fn fdes_of(path: &Path) -> Result<usize> {
    let data = std::fs::read(path)?;
    let file = object::File::parse(&*data)?;
    let eh = file
        .section_by_name(".eh_frame")
        .with_context(|| format!("{} has no .eh_frame", path.display()))?;
    Ok(fde_count(eh.data()?))
}

#[test]
fn one_function_patch_of_a_big_program_is_small_and_unwinds_through_its_own_cfi() -> Result<()> {
    let s = Scratch::new()?;
    let src = s.join("src");
    std::fs::create_dir(&src)?;
    std::fs::write(src.join("orig.c"), program(1))?;
    std::fs::write(src.join("patched.c"), program(2))?;
    let b = Builder::new(&livecare(), &src, &s.join("work"), Flags::default())?;
    let exe = b.executable("orig.c", "big", &[])?;
    let program_fdes = fdes_of(&exe.path)?;
    ensure!(
        program_fdes >= FUNCTIONS,
        "the program has {program_fdes} FDEs"
    );
    let program_sections = sections_of(&exe.path)?;
    ensure!(
        program_sections >= SECTIONS,
        "the program has {program_sections} sections"
    );
    let patch = b.patch(&exe, "patched.c", "big")?;
    let size = std::fs::metadata(&patch.path)?.len();
    let patch_fdes = fdes_of(&patch.elf)?;
    let patch_sections = sections_of(&patch.elf)?;
    eprintln!(
        "program: {program_fdes} FDEs, {program_sections} sections; one-function patch: \
         {size} bytes, {patch_fdes} FDE(s), {patch_sections} sections"
    );
    ensure!(
        (1..=2).contains(&patch_fdes),
        "the patch must carry its own code's FDE(s) only, not {patch_fdes}"
    );
    // Its own sections, their relocations, the tables and the placeholders its symbols
    // live in (.text, .data, .bss, …): a few tens at most, whatever the program has.
    ensure!(
        patch_sections <= 40,
        "the patch keeps {patch_sections} sections of the program's {program_sections}"
    );
    ensure!(
        size <= MAX_PATCH,
        "patch is {size} bytes (goal {MAX_PATCH})"
    );

    let mut t = Running::start(&exe.path, &[])?;
    t.wait_for("worker started", WAIT)?;
    t.wait_for("value=1", WAIT)?;
    let pid = t.pid().to_string();
    let path = patch.path.to_str().unwrap();
    // The worker is nearly always in nap() below value(): the patch waits for it to
    // return from value(), and the unpatch for it to return from the new value(),
    // whose frame only the patch's own CFI describes.
    let out = ok(&lc(&["patch", "-p", &pid, "--timeout", "20", path]))?;
    ensure!(out.contains("patched 1 function (value)"), "{out}");
    t.drain();
    t.wait_for("value=2", WAIT)?;
    std::thread::sleep(Duration::from_millis(500));
    ok(&lc(&["unpatch", "-p", &pid, "--timeout", "20"]))?;
    t.drain();
    t.wait_for("value=1", WAIT)?;
    ensure!(t.is_alive());
    ensure!(t.proc_state()?.1 == 0, "left traced");
    Ok(())
}
