//! End-to-end apply scenarios (issue 4): a gcc-built fixture process is started, a patch
//! built through the manual pipeline (testkit::patchbuild) is applied with
//! `livecare patch -p PID`, the visible output change is checked, `livecare info` must
//! show it, `livecare unpatch` must restore the original output, and the process must
//! be alive and not left stopped or traced. Failure cases must exit 1 with a message and
//! leave the target's maps and code bytes as they were.

mod common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use testkit::patchbuild::{Builder, Flags, Object, Patch};
use testkit::{fixture_dir, Link, MemorySnapshot, Running, Scratch};

const LIVECARE: &str = env!("CARGO_BIN_EXE_livecare");
/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(20);

/// A scratch directory and a builder for fixture `case`.
fn setup(case: &str, flags: Flags) -> Result<(Scratch, Builder)> {
    let dir = Scratch::new()?;
    let b = Builder::new(
        Path::new(LIVECARE),
        &fixture_dir(case),
        &dir.join("build"),
        flags,
    )?;
    Ok((dir, b))
}

fn flags(link: Link, opt: &str) -> Flags {
    Flags {
        exe_link: link,
        opt: opt.to_string(),
        ..Flags::default()
    }
}

/// Exit code and output of one `livecare` run.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

thread_local! {
    /// Environment for the livecare commands of the current test (each test runs on
    /// its own thread).
    static EXTRA_ENV: std::cell::RefCell<Vec<(&'static str, &'static str)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn livecare<I, S>(args: I) -> Result<Out>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(LIVECARE);
    cmd.args(args);
    EXTRA_ENV.with(|e| {
        for (k, v) in e.borrow().iter() {
            cmd.env(k, v);
        }
    });
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs livecare, requires exit 0, returns stdout.
fn lc_ok<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let o = livecare(&args)?;
    ensure!(
        o.code == Some(0),
        "livecare {args:?} exited {:?}\nstdout:\n{}\nstderr:\n{}",
        o.code,
        o.stdout,
        o.stderr
    );
    Ok(o.stdout)
}

/// Runs livecare, requires exit 1 and an `error:` message, returns stderr.
fn lc_fails<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let o = livecare(&args)?;
    ensure!(
        o.code == Some(1),
        "livecare {args:?} should fail with 1, exited {:?}\nstdout:\n{}\nstderr:\n{}",
        o.code,
        o.stdout,
        o.stderr
    );
    ensure!(o.stderr.contains("error"), "no error message: {}", o.stderr);
    eprintln!("livecare {args:?} failed as expected:\n{}", o.stderr);
    Ok(o.stderr)
}

fn pid_s(p: &Running) -> String {
    p.pid().to_string()
}

fn patch(p: &Running, file: &Path) -> Result<String> {
    lc_ok([
        OsStr::new("patch"),
        OsStr::new("-p"),
        OsStr::new(&pid_s(p)),
        file.as_os_str(),
    ])
}

fn unpatch(p: &Running, extra: &[&str]) -> Result<String> {
    let mut args = vec!["unpatch".to_string(), "-p".into(), pid_s(p)];
    args.extend(extra.iter().map(|s| s.to_string()));
    lc_ok(args)
}

/// `livecare patch -p all DIR`, DIR a patch directory (in `scratch`) holding `patch_`
/// under the name of the `build_id` it is for; must succeed.
fn patch_all(scratch: &Path, patch_: &Patch, build_id: &str) -> Result<String> {
    let dir = scratch.join("patches");
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(&patch_.path, dir.join(format!("{build_id}.kpatch")))?;
    lc_ok([
        OsStr::new("patch"),
        OsStr::new("-p"),
        OsStr::new("all"),
        dir.as_os_str(),
    ])
}

/// `livecare patch --timeout SECS -p PID FILE`, which must fail (see [`lc_fails`]).
fn patch_fails_within(p: &Running, file: &Path, secs: &str) -> Result<String> {
    lc_fails([
        OsStr::new("patch"),
        OsStr::new("--timeout"),
        OsStr::new(secs),
        OsStr::new("-p"),
        OsStr::new(&pid_s(p)),
        file.as_os_str(),
    ])
}

fn info(p: &Running) -> Result<String> {
    lc_ok(["info", "-p", &pid_s(p)])
}

/// Waits until every needle has been seen in new output (any order).
fn see_all(p: &mut Running, needles: &[&str]) -> Result<()> {
    p.drain();
    wait_all(p, needles)
}

/// Waits until every needle has been seen in output not consumed yet (any order).
fn wait_all(p: &mut Running, needles: &[&str]) -> Result<()> {
    let mut left: Vec<&str> = needles.to_vec();
    let deadline = Instant::now() + WAIT;
    while !left.is_empty() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let line = p
            .wait_for_match(|l| left.iter().any(|n| l.contains(n)), remaining)
            .with_context(|| format!("waiting for {left:?}"))?;
        left.retain(|n| !line.contains(n));
    }
    Ok(())
}

fn see(p: &mut Running, needle: &str) -> Result<()> {
    see_all(p, &[needle])
}

/// The thread ids of `pid`.
fn tids(pid: u32) -> Result<Vec<u32>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Ok(t) = e?.file_name().to_string_lossy().parse() {
            v.push(t);
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// The process is alive, and none of its threads is stopped or traced.
fn assert_clean(p: &mut Running) -> Result<()> {
    ensure!(p.is_alive(), "target died; last lines {:?}", p.tail(5));
    let (state, tracer) = p.proc_state()?;
    ensure!(
        !state.starts_with('t') && !state.starts_with('T') && tracer == 0,
        "target left {state}, TracerPid {tracer}"
    );
    for t in tids(p.pid())? {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/task/{t}/status", p.pid()))
        else {
            continue; // the thread exited meanwhile
        };
        for l in status.lines() {
            if let Some(s) = l.strip_prefix("State:") {
                let s = s.trim();
                ensure!(
                    !s.starts_with('t') && !s.starts_with('T'),
                    "thread {t} left {s}"
                );
            }
            if let Some(s) = l.strip_prefix("TracerPid:") {
                ensure!(s.trim() == "0", "thread {t} still traced by {}", s.trim());
            }
        }
    }
    Ok(())
}

/// The whole cycle on one process: patch, see `after`, info names the patch, unpatch,
/// see `before`, clean, and (if `same_after`) maps and code bytes as before the patch.
fn cycle(
    p: &mut Running,
    patch_: &Patch,
    hunk: &str,
    after: &[&str],
    before: &[&str],
    same_after: bool,
) -> Result<()> {
    see_all(p, before)?;
    let snap = MemorySnapshot::take(p.pid())?;
    let out = patch(p, &patch_.path)?;
    ensure!(out.contains(hunk), "patch output names {hunk}: {out}");
    see_all(p, after)?;
    assert_clean(p)?;
    let i = info(p)?;
    ensure!(
        i.contains(&patch_.build_id) && i.contains(hunk) && i.contains(&patch_.patch_id),
        "info shows build-id {}, patch {} and {hunk}:\n{i}",
        patch_.build_id,
        patch_.patch_id
    );
    unpatch(p, &[])?;
    see_all(p, before)?;
    assert_clean(p)?;
    let i = info(p)?;
    ensure!(
        !i.contains(&format!("patch {}:", patch_.patch_id)),
        "info after unpatch still lists the patch:\n{i}"
    );
    if same_after {
        // The removed patch's region may stay mapped, retired (listed by `info`).
        MemorySnapshot::take(p.pid())?
            .assert_same_except(&snap, &common::retired_ranges(p.pid())?)
            .context("maps and code after unpatch")?;
    }
    Ok(())
}

/// scenario-exe with `flags`: build the program, patch from `patched`, run the cycle.
fn exe_case(flags: Flags, patched: &str, hunk: &str, after: &str, before: &str) -> Result<()> {
    let (_d, b) = setup("scenario-exe", flags)?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch_ = b.patch(&exe, patched, "0001")?;
    let mut p = Running::start(&exe.path, &[])?;
    cycle(&mut p, &patch_, hunk, &[after], &[before], true)
}

#[test]
fn builder_output_passes_livecare_inspect() -> Result<()> {
    let (_d, b) = setup("scenario-exe", Flags::default())?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch_ = b.patch(&exe, "patched-basic.c", "0001")?;
    let out = lc_ok([OsStr::new("inspect"), patch_.path.as_os_str()])?;
    ensure!(out.contains(&exe.build_id), "{out}");
    ensure!(out.contains("value"), "{out}");
    // A failing step names the command and carries its stderr.
    let err = format!("{:#}", b.patch(&exe, "orig.c", "0002").unwrap_err());
    ensure!(err.contains("gensrc") && err.contains("stderr"), "{err}");
    Ok(())
}

#[test]
fn patch_one_function_pie_o2() -> Result<()> {
    exe_case(
        flags(Link::Pie, "-O2"),
        "patched-basic.c",
        "value",
        "t0 value=2",
        "t0 value=1",
    )
}

#[test]
fn patch_one_function_no_pie_o2() -> Result<()> {
    exe_case(
        flags(Link::NoPie, "-O2"),
        "patched-basic.c",
        "value",
        "t0 value=2",
        "t0 value=1",
    )
}

#[test]
fn patch_one_function_pie_o0_from_diff() -> Result<()> {
    exe_case(
        flags(Link::Pie, "-O0"),
        "basic.diff",
        "value",
        "t0 value=2",
        "t0 value=1",
    )
}

#[test]
fn patch_one_function_no_pie_o0() -> Result<()> {
    exe_case(
        flags(Link::NoPie, "-O0"),
        "patched-basic.c",
        "value",
        "t0 value=2",
        "t0 value=1",
    )
}

#[test]
fn patch_replaces_two_functions_at_once() -> Result<()> {
    let (_d, b) = setup("scenario-exe", Flags::default())?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch_ = b.patch(&exe, "patched-two.c", "0001")?;
    let mut p = Running::start(&exe.path, &[])?;
    cycle(
        &mut p,
        &patch_,
        "message",
        &["t0 value=2 msg=two hunks"],
        &["t0 value=1 msg=hello"],
        true,
    )?;
    // Both hunks are listed.
    patch(&p, &patch_.path)?;
    let i = info(&p)?;
    ensure!(
        i.contains("value") && i.contains("message") && i.contains("2 hunk"),
        "{i}"
    );
    Ok(())
}

#[test]
fn patch_adds_a_new_function() -> Result<()> {
    exe_case(
        Flags::default(),
        "patched-newfn.c",
        "value",
        "t0 value=42",
        "t0 value=1",
    )
}

#[test]
fn patched_code_calls_unchanged_original_function() -> Result<()> {
    exe_case(
        Flags::default(),
        "patched-callorig.c",
        "value",
        "t0 value=53",
        "t0 value=1",
    )
}

#[test]
fn patched_code_calls_unchanged_original_function_in_three_threads() -> Result<()> {
    let (_d, b) = setup("scenario-exe", Flags::default())?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch_ = b.patch(&exe, "patched-callorig.c", "0001")?;
    let mut p = Running::start(&exe.path, &["3"])?;
    cycle(
        &mut p,
        &patch_,
        "value",
        &["t0 value=53", "t1 value=53", "t2 value=53"],
        &["t0 value=1", "t1 value=1", "t2 value=1"],
        true,
    )
}

#[test]
fn patched_code_reads_a_new_rodata_string() -> Result<()> {
    exe_case(
        Flags::default(),
        "patched-rodata.c",
        "message",
        "msg=patched rodata string",
        "msg=hello",
    )
}

#[test]
fn patched_code_calls_into_glibc() -> Result<()> {
    exe_case(
        Flags::default(),
        "patched-glibc.c",
        "value",
        "t0 value=77",
        "t0 value=1",
    )
}

// gcc's PIE and non-PIE code both read `stderr` PC-relatively: the executable holds a
// copy-relocated `stderr`, which is what the patch must use.
#[test]
fn patched_code_references_glibc_data_symbol_stderr_pie() -> Result<()> {
    exe_case(
        Flags::default(),
        "patched-stderr.c",
        "value",
        "t0 value=42",
        "t0 value=1",
    )
}

#[test]
fn patched_code_references_glibc_data_symbol_stderr_no_pie() -> Result<()> {
    exe_case(
        flags(Link::NoPie, "-O2"),
        "patched-stderr.c",
        "value",
        "t0 value=42",
        "t0 value=1",
    )
}

#[test]
fn patched_code_references_glibc_data_symbol_stderr_through_got() -> Result<()> {
    // --force-gotpcrel: the reference goes through a GOT slot of the jump table.
    for link in [Link::Pie, Link::NoPie] {
        let f = Flags {
            force_gotpcrel: true,
            ..flags(link, "-O2")
        };
        exe_case(f, "patched-stderr.c", "value", "t0 value=42", "t0 value=1")
            .with_context(|| format!("{link:?}"))?;
    }
    Ok(())
}

#[test]
fn patched_code_references_glibc_data_the_original_never_used_through_got() -> Result<()> {
    // The original has no copy of `stdin`; only a GOT load can reach glibc's.
    for link in [Link::Pie, Link::NoPie] {
        let f = Flags {
            force_gotpcrel: true,
            ..flags(link, "-O2")
        };
        exe_case(f, "patched-stdin.c", "value", "t0 value=40", "t0 value=1")
            .with_context(|| format!("{link:?}"))?;
    }
    Ok(())
}

#[test]
fn patched_code_calls_glibc_ifuncs_strlen_memcpy() -> Result<()> {
    exe_case(
        Flags::default(),
        "patched-ifunc.c",
        "value",
        "t0 value=112",
        "t0 value=1",
    )
}

/// The same with the resolvers run in a target thread (the fallback when livecare does
/// not have the target's libc loaded; forced here through a debug-build switch).
#[test]
fn patched_code_calls_glibc_ifuncs_resolved_in_the_target() -> Result<()> {
    EXTRA_ENV.with(|e| e.borrow_mut().push(("LIVECARE_REMOTE_IFUNC", "1")));
    exe_case(
        Flags::default(),
        "patched-ifunc.c",
        "value",
        "t0 value=112",
        "t0 value=1",
    )
}

#[test]
fn patched_code_reads_executable_tls_variable() -> Result<()> {
    exe_case(
        Flags::default(),
        "patched-tls.c",
        "value",
        "t0 value=42",
        "t0 value=1",
    )
}

#[test]
fn libcare_ctl_face_patches_reports_and_cancels() -> Result<()> {
    let (d, b) = setup("scenario-exe", Flags::default())?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch_ = b.patch(&exe, "patched-basic.c", "0001")?;
    let ctl = d.join("libcare-ctl");
    std::os::unix::fs::symlink(LIVECARE, &ctl)?;
    let run_ctl = |args: &[&OsStr]| -> Result<String> {
        let out = testkit::run_ok(Command::new(&ctl).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mut p = Running::start(&exe.path, &[])?;
    see(&mut p, "t0 value=1")?;
    let pid = pid_s(&p);
    let pid = OsStr::new(&pid);
    let out = run_ctl(&[
        OsStr::new("patch-user"),
        OsStr::new("-p"),
        pid,
        patch_.path.as_os_str(),
    ])?;
    ensure!(
        out.contains(&format!(
            "1 patch hunk(s) have been successfully applied to PID '{}'",
            p.pid()
        )),
        "{out}"
    );
    see(&mut p, "t0 value=2")?;
    let out = run_ctl(&[OsStr::new("info-user"), OsStr::new("-p"), pid])?;
    for want in [
        format!("Pid: {}", p.pid()),
        "Target: prog".to_string(),
        format!("Build id: {}", exe.build_id),
        "Applied patch number: 1".to_string(),
        "Patch id: 0001".to_string(),
    ] {
        ensure!(out.contains(&want), "info lacks {want:?}:\n{out}");
    }
    let out = run_ctl(&[OsStr::new("unpatch-user"), OsStr::new("-p"), pid])?;
    ensure!(
        out.contains(&format!(
            "1 patch hunk(s) were successfully cancelled from PID '{}'",
            p.pid()
        )),
        "{out}"
    );
    see(&mut p, "t0 value=1")?;
    assert_clean(&mut p)
}

/// scenario-lib: the library, the program linked against it, and the running process.
fn lib_setup(flags: Flags) -> Result<(Scratch, Builder, Object, Object)> {
    let (d, b) = setup("scenario-lib", flags)?;
    let lib = b.library("lib.c", "scen")?;
    let exe = b.executable("orig.c", "prog", &[&lib])?;
    Ok((d, b, lib, exe))
}

fn lib_case(patched: &str, after: &str) -> Result<()> {
    lib_case_with(Flags::default(), patched, after)
}

fn lib_case_with(flags: Flags, patched: &str, after: &str) -> Result<()> {
    let (_d, b, lib, exe) = lib_setup(flags)?;
    let patch_ = b.patch(&lib, patched, "0001")?;
    let mut p = Running::start(&exe.path, &[])?;
    p.wait_for("started tls=9", WAIT)?;
    cycle(
        &mut p,
        &patch_,
        "lib_value",
        &[after],
        &["exe=1 lib=1"],
        true,
    )
}

#[test]
fn patch_a_shared_library_function() -> Result<()> {
    lib_case("lib-patched.c", "exe=1 lib=2")
}

#[test]
fn library_patch_calls_into_glibc() -> Result<()> {
    lib_case("lib-glibc.c", "exe=1 lib=33")
}

#[test]
fn library_patch_reads_library_tls_variable() -> Result<()> {
    // gcc's default for -fPIC: general-dynamic TLS (__tls_get_addr), relaxed by
    // rel-fixup to initial-exec; apply finds the offset through the thread's DTV.
    lib_case("lib-tls.c", "exe=1 lib=18")?;
    // Two static TLS variables read together: local-dynamic at -O2, relaxed to
    // thread pointer + per-variable offsets.
    let (_d, b) = setup("scenario-lib", Flags::default())?;
    let lib = b.library("lib-ld.c", "scen")?;
    let exe = b.executable("orig.c", "prog", &[&lib])?;
    let patch_ = b.patch(&lib, "lib-ld-tls.c", "0001")?;
    let mut p = Running::start(&exe.path, &[])?;
    p.wait_for("started tls=9", WAIT)?;
    cycle(
        &mut p,
        &patch_,
        "lib_value",
        &["exe=1 lib=57"],
        &["exe=1 lib=1"],
        true,
    )
}

#[test]
fn library_patch_reads_initial_exec_tls_variable() -> Result<()> {
    let f = Flags {
        extra: vec!["-ftls-model=initial-exec".into()],
        ..Flags::default()
    };
    lib_case_with(f, "lib-tls.c", "exe=1 lib=18")
}

#[test]
fn executable_and_library_patched_together() -> Result<()> {
    let (d, b, lib, exe) = lib_setup(Flags::default())?;
    let exe_patch = b.patch(&exe, "patched.c", "0001")?;
    let lib_patch = b.patch(&lib, "lib-patched.c", "0001")?;
    let mut p = Running::start(&exe.path, &[])?;
    see(&mut p, "exe=1 lib=1")?;
    let snap = MemorySnapshot::take(p.pid())?;

    // Two patch files, one after the other; unpatch each object by build-id.
    patch(&p, &exe_patch.path)?;
    see(&mut p, "exe=2 lib=1")?;
    patch(&p, &lib_patch.path)?;
    see(&mut p, "exe=2 lib=2")?;
    let i = info(&p)?;
    ensure!(
        i.contains(&exe.build_id) && i.contains(&lib.build_id),
        "{i}"
    );
    unpatch(&p, &[&lib.build_id])?;
    see(&mut p, "exe=2 lib=1")?;
    unpatch(&p, &[&exe.build_id])?;
    see(&mut p, "exe=1 lib=1")?;
    assert_clean(&mut p)?;

    // One directory holding both `<buildid>.kpatch`.
    let dir = d.join("patches");
    std::fs::create_dir_all(&dir)?;
    for pt in [&exe_patch, &lib_patch] {
        std::fs::copy(&pt.path, dir.join(format!("{}.kpatch", pt.build_id)))?;
    }
    patch(&p, &dir)?;
    see(&mut p, "exe=2 lib=2")?;
    assert_clean(&mut p)?;
    unpatch(&p, &[&lib.build_id])?;
    unpatch(&p, &[&exe.build_id])?;
    see(&mut p, "exe=1 lib=1")?;
    assert_clean(&mut p)?;
    // Removed regions are reclaimed once a few have piled up: until then retired.
    MemorySnapshot::take(p.pid())?.assert_same_except(&snap, &common::retired_ranges(p.pid())?)
}

/// scenario-safety in `mode` with `workers` threads, and its patch from `patched`.
fn safety_setup(mode: &str, workers: u32, patched: &str) -> Result<(Scratch, Patch, Running)> {
    let (d, b) = setup("scenario-safety", Flags::default())?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch_ = b.patch(&exe, patched, "0001")?;
    let p = Running::start(&exe.path, &[mode, &workers.to_string()])?;
    Ok((d, patch_, p))
}

#[test]
fn patch_waits_for_a_thread_to_leave_the_function() -> Result<()> {
    let (_d, patch_, mut p) = safety_setup("hold", 1, "patched.c")?;
    let inside = entered_at(&p.wait_for("inside", WAIT)?)?;
    let out = patch(&p, &patch_.path)?;
    ensure!(out.contains("value"), "{out}");
    // Thread 1 sleeps 1.5 s inside value(): the patch had to wait for it.
    ensure_waited_for_hold(inside)?;
    see(&mut p, "value=2")?;
    assert_clean(&mut p)?;
    unpatch(&p, &[])?;
    see(&mut p, "value=1")?;
    assert_clean(&mut p)
}

/// When the holding thread came into value(): `t=` of the fixture's `inside` line
/// (CLOCK_MONOTONIC seconds).
fn entered_at(line: &str) -> Result<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("t="))
        .with_context(|| format!("no t= in {line:?}"))?
        .parse()
        .with_context(|| format!("t= in {line:?}"))
}

/// The patch that just returned ended after the thread that came into value() at
/// `inside` left it: it sleeps there 1.5 s. (Measured from the fixture's own clock
/// reading, not from when the test saw the line, which a loaded machine delays.)
fn ensure_waited_for_hold(inside: f64) -> Result<()> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the valid pointer it is given.
    ensure!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } == 0);
    let waited = ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9 - inside;
    ensure!(
        waited >= 1.5 - 1e-6,
        "patched {waited:.3} s after a thread came into value() to sleep there 1.5 s"
    );
    Ok(())
}

/// A patch that can never be safe fails with exit 1 naming a stuck thread and the
/// function, and leaves the target untouched.
fn never_safe(mode: &str, workers: u32, ready: &str) -> Result<()> {
    let (_d, patch_, mut p) = safety_setup(mode, workers, "patched.c")?;
    let ready: Vec<String> = (1..=workers).map(|w| format!("{ready} {w}")).collect();
    wait_all(
        &mut p,
        &ready.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    see(&mut p, "value=1")?;
    let snap = MemorySnapshot::take(p.pid())?;
    let main = p.pid();
    let err = patch_fails_within(&p, &patch_.path, "1")?;
    ensure!(err.contains("value"), "message names the function: {err}");
    let workers_tids: Vec<u32> = tids(main)?.into_iter().filter(|&t| t != main).collect();
    ensure!(
        workers_tids.iter().any(|t| err.contains(&t.to_string())),
        "message names a stuck thread (one of {workers_tids:?}): {err}"
    );
    MemorySnapshot::take(p.pid())?.assert_same(&snap)?;
    see(&mut p, "value=1")?;
    assert_clean(&mut p)
}

#[test]
fn patch_fails_cleanly_when_a_thread_never_leaves_the_function() -> Result<()> {
    never_safe("stuck", 1, "stuck")
}

#[test]
fn patch_fails_cleanly_when_a_thread_spins_in_the_function_top_frame() -> Result<()> {
    never_safe("spin", 1, "spinning")
}

#[test]
fn patch_fails_cleanly_when_several_threads_never_leave() -> Result<()> {
    never_safe("stuck", 3, "stuck")
}

#[test]
fn patch_while_threads_keep_creating_threads() -> Result<()> {
    let (_d, patch_, mut p) = safety_setup("churn", 2, "patched.c")?;
    see(&mut p, "value=1")?;
    patch(&p, &patch_.path)?;
    see(&mut p, "value=2")?;
    std::thread::sleep(Duration::from_millis(300));
    assert_clean(&mut p)?;
    unpatch(&p, &[])?;
    see(&mut p, "value=1")?;
    std::thread::sleep(Duration::from_millis(300));
    assert_clean(&mut p)
}

#[test]
fn patch_waits_while_new_threads_pass_the_return_breakpoint() -> Result<()> {
    // Worker 1 sits in value() for 1.5 s; workers 2 and 3 keep creating threads that run
    // through the same caller, past the return address the patch waits at.
    let (_d, patch_, mut p) = safety_setup("churnhold", 3, "patched.c")?;
    let inside = entered_at(&p.wait_for("inside", WAIT)?)?;
    patch(&p, &patch_.path)?;
    ensure_waited_for_hold(inside)?;
    see(&mut p, "value=2")?;
    std::thread::sleep(Duration::from_millis(300));
    assert_clean(&mut p)?;
    unpatch(&p, &[])?;
    see(&mut p, "value=1")?;
    assert_clean(&mut p)
}

#[test]
fn unpatch_refused_while_new_code_never_returns() -> Result<()> {
    let (_d, patch_, mut p) = safety_setup("normal", 1, "patched-never.c")?;
    see(&mut p, "value=1")?;
    patch(&p, &patch_.path)?;
    p.wait_for("trapped 1", WAIT)?;
    see(&mut p, "value=2")?;
    let snap = MemorySnapshot::take(p.pid())?;
    let err = lc_fails(["unpatch", "--timeout", "1", "-p", &pid_s(&p)])?;
    ensure!(err.contains("value"), "message names the function: {err}");
    MemorySnapshot::take(p.pid())?.assert_same(&snap)?;
    see(&mut p, "value=2")?;
    assert_clean(&mut p)
}

#[test]
fn stacked_patches_unpatch_last_in_first_out() -> Result<()> {
    let (_d, b) = setup("scenario-exe", Flags::default())?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let first = b.patch(&exe, "patched-basic.c", "0001")?;
    let second = b.patch(&exe, "patched-stack2.c", "0002")?;
    let mut p = Running::start(&exe.path, &[])?;
    see(&mut p, "t0 value=1")?;
    let snap = MemorySnapshot::take(p.pid())?;
    patch(&p, &first.path)?;
    see(&mut p, "t0 value=2")?;
    patch(&p, &second.path)?;
    see(&mut p, "t0 value=3")?;
    let i = info(&p)?;
    ensure!(i.contains("0001") && i.contains("0002"), "{i}");

    let err = lc_fails(["unpatch", "-p", &pid_s(&p), "-i", "0001"])?;
    ensure!(
        err.contains("0002"),
        "message names the patch to remove first: {err}"
    );
    see(&mut p, "t0 value=3")?;
    unpatch(&p, &[])?;
    see(&mut p, "t0 value=2")?;
    unpatch(&p, &[])?;
    see(&mut p, "t0 value=1")?;
    assert_clean(&mut p)?;
    // Removed regions are reclaimed once a few have piled up: until then retired.
    MemorySnapshot::take(p.pid())?.assert_same_except(&snap, &common::retired_ranges(p.pid())?)
}

/// LibCare storage: `<buildid>/<level>/kpatch.bin` and `<buildid>/latest`.
fn store_level(root: &Path, patch_: &Patch, level: u32) -> Result<()> {
    let dir = root.join(&patch_.build_id);
    std::fs::create_dir_all(dir.join(level.to_string()))?;
    std::fs::copy(&patch_.path, dir.join(level.to_string()).join("kpatch.bin"))?;
    let latest = dir.join("latest");
    let _ = std::fs::remove_file(&latest);
    std::os::unix::fs::symlink(level.to_string(), &latest)?;
    Ok(())
}

#[test]
fn patch_levels_from_libcare_storage() -> Result<()> {
    let (d, b) = setup("scenario-exe", Flags::default())?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let level1 = b.patch(&exe, "patched-basic.c", "1")?;
    let level2 = b.patch(&exe, "patched-stack2.c", "2")?;
    let storage = d.join("storage");
    let mut p = Running::start(&exe.path, &[])?;
    see(&mut p, "t0 value=1")?;

    store_level(&storage, &level1, 1)?;
    patch(&p, &storage)?;
    see(&mut p, "t0 value=2")?;
    store_level(&storage, &level2, 2)?;
    patch(&p, &storage)?;
    see(&mut p, "t0 value=3")?;
    assert_clean(&mut p)?;
    let i = info(&p)?;
    ensure!(i.contains("patch 2:"), "level 2 listed:\n{i}");

    // Unpatch everything that was applied, most recent first.
    for _ in 0..2 {
        // Applied patches only: retired ones are listed as `retired patch …`.
        if !info(&p)?
            .lines()
            .any(|l| l.trim_start().starts_with("patch "))
        {
            break;
        }
        unpatch(&p, &[])?;
    }
    see(&mut p, "t0 value=1")?;
    assert_clean(&mut p)
}

#[test]
fn patch_from_a_directory() -> Result<()> {
    let (d, b) = setup("scenario-exe", Flags::default())?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch_ = b.patch(&exe, "patched-basic.c", "0001")?;
    let dir = d.join("patches");
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(&patch_.path, dir.join(format!("{}.kpatch", exe.build_id)))?;
    let moved = Patch {
        path: dir,
        ..patch_
    };
    let mut p = Running::start(&exe.path, &[])?;
    cycle(
        &mut p,
        &moved,
        "value",
        &["t0 value=2"],
        &["t0 value=1"],
        true,
    )
}

#[test]
fn patch_all_patches_only_matching_processes() -> Result<()> {
    let (d, b) = setup("scenario-all", Flags::default())?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch_ = b.patch(&exe, "patched.c", "0001")?;
    // A bystander: another program, which has no object with that build-id.
    let (_d2, b2) = setup("scenario-exe", flags(Link::Pie, "-O1"))?;
    let other = b2.executable("orig.c", "other", &[])?;

    let mut a = Running::start(&exe.path, &[])?;
    let mut c = Running::start(&exe.path, &[])?;
    let mut o = Running::start(&other.path, &[])?;
    see(&mut a, "value=1")?;
    see(&mut c, "value=1")?;
    see(&mut o, "t0 value=1")?;
    let snap_o = MemorySnapshot::take(o.pid())?;

    let out = patch_all(d.path(), &patch_, &exe.build_id)?;
    ensure!(
        out.contains(&a.pid().to_string()) && out.contains(&c.pid().to_string()),
        "both matching processes reported: {out}"
    );
    ensure!(
        !out.contains(&format!("pid {} ", o.pid())),
        "bystander reported: {out}"
    );
    see(&mut a, "all-scenario value=2")?;
    see(&mut c, "all-scenario value=2")?;
    see(&mut o, "t0 value=1")?;
    MemorySnapshot::take(o.pid())?.assert_same(&snap_o)?;
    for p in [&mut a, &mut c, &mut o] {
        assert_clean(p)?;
    }
    unpatch(&a, &[])?;
    unpatch(&c, &[])?;
    see(&mut a, "all-scenario value=1")?;
    see(&mut c, "all-scenario value=1")
}

/// Kills the children of a process on drop (the program `livecare run` started).
struct KillChildren(u32);

impl KillChildren {
    fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.0))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect()
    }
}

impl Drop for KillChildren {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    }
}

#[test]
fn run_applies_patches_before_main() -> Result<()> {
    let (d, b) = setup("scenario-exe", Flags::default())?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch_ = b.patch(&exe, "patched-basic.c", "0001")?;
    let dir = d.join("patches");
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(&patch_.path, dir.join(format!("{}.kpatch", exe.build_id)))?;
    let mut cmd = Command::new(LIVECARE);
    cmd.arg("run").arg("-P").arg(&dir).arg("--").arg(&exe.path);
    let mut p = Running::spawn(cmd)?;
    let children = KillChildren(p.pid());
    // The very first value the program prints is the patched one.
    let first = p.wait_for_match(|l| l.starts_with("t0 value="), WAIT)?;
    ensure!(first.starts_with("t0 value=2"), "first line: {first}");
    see(&mut p, "t0 value=2")?;
    ensure!(p.is_alive(), "livecare run ended: {:?}", p.tail(5));
    // The program (livecare's child) carries the patch and is not left traced.
    let progs = children.pids();
    ensure!(progs.len() == 1, "one child of livecare run: {progs:?}");
    let i = lc_ok(["info", "-p", &progs[0].to_string()])?;
    ensure!(
        i.contains("patch 0001:") && i.contains(&exe.build_id),
        "{i}"
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", progs[0]))?;
    ensure!(
        status.contains("TracerPid:\t0"),
        "program left traced:\n{status}"
    );
    Ok(())
}

/// A target started from scenario-exe, its build, and the state to compare against.
fn bad_input_target() -> Result<(Scratch, Builder, Object, Running, MemorySnapshot)> {
    let (d, b) = setup("scenario-exe", Flags::default())?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let mut p = Running::start(&exe.path, &[])?;
    see(&mut p, "t0 value=1")?;
    let snap = MemorySnapshot::take(p.pid())?;
    Ok((d, b, exe, p, snap))
}

fn patch_fails(p: &mut Running, file: &Path, snap: &MemorySnapshot) -> Result<String> {
    let err = lc_fails([
        OsStr::new("patch"),
        OsStr::new("-p"),
        OsStr::new(&pid_s(p)),
        file.as_os_str(),
    ])?;
    MemorySnapshot::take(p.pid())?.assert_same(snap)?;
    see(p, "t0 value=1")?;
    assert_clean(p)?;
    Ok(err)
}

#[test]
fn wrong_build_id_is_refused_and_target_unchanged() -> Result<()> {
    let (d, b, exe, mut p, snap) = bad_input_target()?;
    let patch_ = b.patch(&exe, "patched-basic.c", "0001")?;
    let wrong = d.join("wrong.kpatch");
    b.make(&patch_.elf, &"ab".repeat(20), "0001", &wrong)?;
    let err = patch_fails(&mut p, &wrong, &snap)?;
    ensure!(
        err.contains(&"ab".repeat(20)),
        "message names the build-id: {err}"
    );
    Ok(())
}

#[test]
fn forged_build_id_is_refused_and_target_unchanged() -> Result<()> {
    let (d, _b, exe, mut p, snap) = bad_input_target()?;
    // A patch made for another build of the same program (-O0: same function names,
    // other offsets and code), whose header claims the running binary's build-id.
    let (_d2, other_b) = setup("scenario-exe", flags(Link::Pie, "-O0"))?;
    let other = other_b.executable("orig.c", "prog", &[])?;
    ensure!(other.build_id != exe.build_id, "the two builds differ");
    let real = other_b.patch(&other, "patched-basic.c", "0001")?;
    let forged = d.join("forged.kpatch");
    other_b.make(&real.elf, &exe.build_id, "0001", &forged)?;
    patch_fails(&mut p, &forged, &snap)?;
    Ok(())
}

#[test]
fn dead_pid_is_refused() -> Result<()> {
    let (_d, b) = setup("scenario-exe", Flags::default())?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch_ = b.patch(&exe, "patched-basic.c", "0001")?;
    // Right before use: the longer a dead pid waits, the likelier it is reused.
    let mut child = Command::new("true").spawn()?;
    let pid = child.id();
    child.wait()?;
    let err = lc_fails([
        OsStr::new("patch"),
        OsStr::new("-p"),
        OsStr::new(&pid.to_string()),
        patch_.path.as_os_str(),
    ])?;
    ensure!(
        err.contains(&pid.to_string()),
        "message names pid {pid}: {err}"
    );
    Ok(())
}

#[test]
fn kernel_thread_pid_2_is_refused() -> Result<()> {
    let (_d, b) = setup("scenario-exe", Flags::default())?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch_ = b.patch(&exe, "patched-basic.c", "0001")?;
    let stat = std::fs::read_to_string("/proc/2/stat").unwrap_or_default();
    if !stat.contains("kthreadd") {
        // In a pid namespace without kthreadd, pid 2 may be an ordinary process.
        bail!("pid 2 is not kthreadd here ({stat:?}); cannot run this scenario");
    }
    let err = lc_fails([
        OsStr::new("patch"),
        OsStr::new("-p"),
        OsStr::new("2"),
        patch_.path.as_os_str(),
    ])?;
    ensure!(err.contains('2'), "message names pid 2: {err}");
    Ok(())
}

/// Text without its ANSI colour sequences (`ESC [ … m`), as the log prints them.
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A process whose main thread has called `pthread_exit` is patched (found by `-p
/// all`) and unpatched. Its main thread stays a zombie, whose `/proc/PID/maps` is empty
/// and whose `mem` is refused, and which cannot be seized: the mmap borrow and the
/// reclaim of the removed region must go through a worker.
#[test]
fn main_thread_exited_process_is_patched_and_unpatched() -> Result<()> {
    let (d, b) = setup("scenario-mainexit", flags(Link::Pie, "-O2"))?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch_ = b.patch(&exe, "patched.c", "0001")?;
    let mut p = Running::start(&exe.path, &[])?;
    let before = ["t1 value=1", "t2 value=1"];
    see_all(&mut p, &before)?;
    let pid = p.pid();
    // pthread_exit unwinds first (loading libgcc_s): wait until main is a zombie.
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat"))?
        .rsplit(')')
        .next()
        .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    {
        ensure!(
            Instant::now() < deadline,
            "the fixture's main thread did not exit"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let snap = MemorySnapshot::take(pid)?;
    // Through `-p all`: the scan must find the process by its objects, which it reads
    // from its maps.
    let out = patch_all(d.path(), &patch_, &exe.build_id)?;
    ensure!(
        out.contains(&pid.to_string()) && out.contains("value"),
        "patch -p all names the process and value: {out}"
    );
    see_all(&mut p, &["t1 value=2", "t2 value=2"])?;
    assert_clean(&mut p)?;
    ok_unpatch(pid)?;
    see_all(&mut p, &before)?;
    assert_clean(&mut p)?;
    // The region is reclaimed (or listed as retired): memory is read through a live
    // thread.
    MemorySnapshot::take(pid)?
        .assert_same_except(&snap, &common::retired_ranges(p.pid())?)
        .context("maps and code after unpatch")?;
    Ok(())
}

fn ok_unpatch(pid: u32) -> Result<()> {
    let o = livecare(["unpatch", "-p", &pid.to_string()])?;
    ensure!(o.code == Some(0), "unpatch failed: {}", o.stderr);
    Ok(())
}

/// Starts scenario-clonevm in `mode` and returns it with its `clone(CLONE_VM)` child's pid.
fn clone_vm_case(mode: &str) -> Result<(Scratch, Patch, Running, u32)> {
    let (d, b) = setup("scenario-clonevm", flags(Link::Pie, "-O2"))?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch_ = b.patch(&exe, "patched.c", "0001")?;
    let mut p = Running::start(&exe.path, &[mode])?;
    let line = p.wait_for("child running", WAIT)?;
    let child = line
        .split_whitespace()
        .last()
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no child pid in {line:?}"))?;
    Ok((d, patch_, p, child))
}

/// A child made with `clone(CLONE_VM)` runs the process's code in its memory but is a
/// process of its own, which no stop of the process's threads holds: the patch must be
/// refused, naming it, with the target unchanged and both still running.
#[test]
fn patch_is_refused_while_a_clone_vm_child_runs_in_the_memory() -> Result<()> {
    let (_d, patch_, mut p, child) = clone_vm_case("forever")?;
    see(&mut p, "value=1")?;
    let snap = MemorySnapshot::take(p.pid())?;
    let err = patch_fails_within(&p, &patch_.path, "0.3")?;
    ensure!(
        err.contains("shares its memory") && err.contains(&format!("process {child} ")),
        "the error names the child {child}: {err}"
    );
    MemorySnapshot::take(p.pid())?.assert_same(&snap)?;
    see(&mut p, "value=1")?;
    assert_clean(&mut p)?;
    ensure!(
        std::path::Path::new(&format!("/proc/{child}")).exists(),
        "the child was harmed"
    );
    Ok(())
}

/// A `vfork`-style child (`CLONE_VM | CLONE_VFORK`) blocks its parent until it exits
/// or calls exec: the patch waits for it, then applies, and unpatch restores.
#[test]
fn patch_waits_for_a_vfork_child_sharing_the_memory() -> Result<()> {
    let (_d, patch_, mut p, child) = clone_vm_case("vfork")?;
    EXTRA_ENV.with(|e| {
        e.borrow_mut()
            .push(("LIVECARE_LOG", "livecare_apply=debug"))
    });
    let o = livecare([
        OsStr::new("patch"),
        OsStr::new("-p"),
        OsStr::new(&pid_s(&p)),
        patch_.path.as_os_str(),
    ])?;
    ensure!(o.code == Some(0), "patch failed: {}", o.stderr);
    let log = plain(&o.stderr);
    ensure!(
        log.contains("waiting for a process that shares the memory")
            && log.contains(&format!("child={child}")),
        "the patch did not wait for the child {child}:\n{log}"
    );
    see(&mut p, "value=2")?;
    assert_clean(&mut p)?;
    unpatch(&p, &[])?;
    see(&mut p, "value=1")?;
    assert_clean(&mut p)
}
