//! The guards around a patch command (issue 16, items 9, 12, 13, 14): patch files
//! others could have written are refused, an unprivileged `-p all` names what it could
//! not read, a second livecare or a debugger on the target is named, a FIFO is called
//! a FIFO, a target that dies mid-command is not reported as "nothing changed", and
//! `unpatch -p all` needs a selector. Against gcc-built fixtures; each test checks the
//! target runs on unchanged (or changed exactly as told).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use common::*;
use testkit::patchbuild::{Builder, Flags, Object, Patch};
use testkit::{Link, Running, Scratch};

/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(30);

/// The uid and gid of `nobody`, to run livecare or a target unprivileged.
const NOBODY: u32 = 65534;

/// Builds fixture `fixture` (with a define only `tag`'s test uses, so its build-id is
/// its own and `-p all` touches only its processes) and its patch from `patched`.
fn build(s: &Scratch, fixture: &str, tag: &str, patched: &str) -> Result<(Object, Patch)> {
    let flags = Flags {
        exe_link: Link::Pie,
        opt: "-O2".into(),
        extra: vec![format!("-DLIVECARE_GUARDS_{tag}=1")],
        ..Flags::default()
    };
    let b = Builder::new(&livecare(), &testkit::fixture_dir(fixture), s.path(), flags)?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch = b.patch(&exe, patched, "0001")?;
    Ok((exe, patch))
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The target still shows `line` (its behaviour is unchanged) and is not traced.
fn runs_on(p: &mut Running, line: &str) -> Result<()> {
    p.drain();
    p.wait_for(line, WAIT)?;
    let (state, tracer) = p.proc_state()?;
    ensure!(
        tracer == 0 && !state.starts_with('t') && !state.starts_with('T'),
        "left {state} traced by {tracer}"
    );
    Ok(())
}

/// A livecare running in the background, killed and reaped if the test ends first.
struct Bg(Option<Child>);

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts livecare with `args` in the background.
fn lc_spawn(args: &[&str]) -> Bg {
    Bg(Some(
        Command::new(livecare())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning livecare"),
    ))
}

/// Waits for `bg` (killing it after `limit`).
fn finish(mut bg: Bg, limit: Duration) -> Result<Output> {
    let mut child = bg.0.take().expect("running");
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!("livecare hung:\n{}{}", stdout(&out), stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

/// Waits until some thread of `pid` is traced (a livecare has seized it).
fn wait_traced(pid: u32) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let traced = std::fs::read_dir(format!("/proc/{pid}/task"))?
            .flatten()
            .any(|t| {
                std::fs::read_to_string(t.path().join("status")).is_ok_and(|s| {
                    s.lines()
                        .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
                })
            });
        if traced {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "pid {pid} never got traced");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn patch_files_and_directories_others_can_write_are_refused_unless_allowed() -> Result<()> {
    let s = Scratch::new()?;
    let (exe, patch) = build(&s, "scenario-exe", "PERMS", "patched-basic.c")?;
    let mut p = Running::start(&exe.path, &[])?;
    p.wait_for("value=1", WAIT)?;
    let pid = p.pid().to_string();
    let dir = s.join("patches");
    std::fs::create_dir(&dir)?;
    chmod(&dir, 0o755);
    let file = dir.join(format!("{}.kpatch", exe.build_id));
    std::fs::copy(&patch.path, &file)?;

    let refused = |target: &Path, why: &str| -> Result<()> {
        let out = lc(&["patch", "-p", &pid, path(target)]);
        ensure!(
            out.status.code() == Some(1) && stderr(&out).contains(why),
            "{target:?} not refused for {why:?} ({}):\n{}{}",
            out.status,
            stdout(&out),
            stderr(&out)
        );
        ensure!(
            stderr(&out).contains("--allow-insecure-perms"),
            "{}",
            stderr(&out)
        );
        Ok(())
    };
    // The file writable by every user, or by its group; alone and in a patch directory.
    chmod(&file, 0o666);
    refused(&file, "writable by every user")?;
    refused(&dir, "writable by every user")?;
    chmod(&file, 0o664);
    refused(&file, "writable by group")?;
    // Owned by another user (not root, not us).
    chmod(&file, 0o644);
    std::os::unix::fs::chown(&file, Some(NOBODY), None)?;
    refused(&file, "owned by")?;
    std::os::unix::fs::chown(&file, Some(0), None)?;
    // A directory on the way that others can write (and that is not sticky like /tmp).
    chmod(&dir, 0o777);
    refused(&file, "its directory")?;
    chmod(&dir, 0o755);
    runs_on(&mut p, "value=1")?;

    // The flag says the operator trusts them.
    chmod(&file, 0o666);
    ok(&lc(&[
        "patch",
        "-p",
        &pid,
        "--allow-insecure-perms",
        path(&file),
    ]))?;
    runs_on(&mut p, "value=2")?;
    ok(&lc(&["unpatch", "-p", &pid]))?;
    runs_on(&mut p, "value=1")
}

#[test]
fn unprivileged_patch_all_names_the_processes_it_cannot_read_and_exits_3() -> Result<()> {
    let s = Scratch::new()?;
    // `nobody` runs the program and reads the patch from here.
    chmod(s.path(), 0o755);
    let (exe, patch) = build(&s, "scenario-exe", "UNPRIV", "patched-basic.c")?;
    let mut mine = Running::start(&exe.path, &[])?;
    let mut cmd = Command::new(&exe.path);
    // SAFETY: setgid/setgroups/setuid are async-signal-safe, the only calls between
    // fork and exec.
    unsafe {
        cmd.pre_exec(drop_to_nobody);
    }
    let mut theirs = Running::spawn(cmd)?;
    // Readable but with no object the patch is for: skipped, and not named.
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    // SAFETY: as above.
    unsafe {
        cmd.pre_exec(drop_to_nobody);
    }
    let other = Running::spawn(cmd)?;
    mine.wait_for("value=1", WAIT)?;
    theirs.wait_for("value=1", WAIT)?;

    let mut cmd = Command::new(livecare());
    cmd.args(["patch", "-p", "all", path(&patch.path)])
        .env_remove("XDG_RUNTIME_DIR")
        .current_dir("/");
    // SAFETY: as above.
    unsafe {
        cmd.pre_exec(drop_to_nobody);
    }
    let out = cmd.output()?;
    let err = stderr(&out);
    ensure!(
        out.status.code() == Some(3),
        "exit {} (want 3):\n{}{err}",
        out.status,
        stdout(&out)
    );
    // Its own process patched; root's named, with the reason, and left alone.
    ensure!(
        stdout(&out).contains(&format!("in pid {} ", theirs.pid())),
        "{}",
        stdout(&out)
    );
    ensure!(
        err.contains("could not be read (permission denied)")
            && err.contains(&format!(" {} (prog)", mine.pid()))
            && !err.contains(&format!(" {} (sleep)", other.pid())),
        "{err}"
    );
    runs_on(&mut theirs, "value=2")?;
    runs_on(&mut mine, "value=1")?;

    // `unpatch -p all` likewise.
    let mut cmd = Command::new(livecare());
    cmd.args(["unpatch", "-p", "all", &exe.build_id])
        .env_remove("XDG_RUNTIME_DIR")
        .current_dir("/");
    // SAFETY: as above.
    unsafe {
        cmd.pre_exec(drop_to_nobody);
    }
    let out = cmd.output()?;
    let err = stderr(&out);
    ensure!(
        out.status.code() == Some(3)
            && stdout(&out).contains(&format!("from pid {} ", theirs.pid()))
            && err.contains(&format!(" {} (prog)", mine.pid())),
        "exit {} (want 3):\n{}{err}",
        out.status,
        stdout(&out)
    );
    runs_on(&mut theirs, "value=1")
}

/// In a child before exec: become `nobody` (group first, while still allowed).
fn drop_to_nobody() -> std::io::Result<()> {
    // SAFETY: plain syscalls on integer arguments.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(NOBODY) != 0
            || libc::setuid(NOBODY) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn a_second_livecare_on_the_same_target_names_the_first_and_changes_nothing() -> Result<()> {
    let s = Scratch::new()?;
    let (exe, patch) = build(&s, "scenario-safety", "LOCK", "patched.c")?;
    // A worker sleeps inside value() for good: the first livecare waits for it.
    let mut p = Running::start(&exe.path, &["stuck", "1"])?;
    p.wait_for("stuck 1", WAIT)?;
    let pid = p.pid().to_string();
    let first = lc_spawn(&["patch", "-p", &pid, "--timeout", "60", path(&patch.path)]);
    wait_traced(p.pid())?;
    let first_pid = first.0.as_ref().map_or(0, |c| c.id());
    let busy = format!("another livecare (pid {first_pid}) is working on pid {pid}");
    for args in [
        vec!["unpatch", "-p", &pid],
        vec!["repair", "-p", &pid],
        vec!["patch", "-p", &pid, path(&patch.path)],
    ] {
        let out = lc(&args);
        ensure!(
            out.status.code() == Some(1) && stderr(&out).contains(&busy),
            "{args:?} ({}):\n{}{}",
            out.status,
            stdout(&out),
            stderr(&out)
        );
        ensure!(!stderr(&out).contains("repair -p"), "{}", stderr(&out));
    }
    // `info` shows the operation in flight as such, not as one to repair.
    let info = ok(&lc(&["info", "-p", &pid]))?;
    ensure!(
        info.contains(&format!(
            "livecare (pid {first_pid}) is working on pid {pid}"
        )),
        "{info}"
    );
    // The first one, killed while it waits, leaves no lock behind for the next.
    drop(first);
    let out = lc(&["patch", "-p", &pid, "--timeout", "0.2", path(&patch.path)]);
    ensure!(
        !stderr(&out).contains("another livecare"),
        "{}",
        stderr(&out)
    );
    runs_on(&mut p, "value=1")
}

#[test]
fn a_target_traced_by_another_process_names_its_tracer() -> Result<()> {
    let s = Scratch::new()?;
    let (exe, patch) = build(&s, "scenario-exe", "TRACER", "patched-basic.c")?;
    let mut p = Running::start(&exe.path, &[])?;
    p.wait_for("value=1", WAIT)?;
    // This test's thread traces it, as a debugger would.
    // SAFETY: SEIZE on our own child; it keeps running, and the kernel detaches it
    // when this thread exits.
    let rc = unsafe { libc::ptrace(libc::PTRACE_SEIZE, p.pid() as libc::pid_t, 0usize, 0usize) };
    ensure!(rc == 0, "SEIZE: {}", std::io::Error::last_os_error());
    let out = lc(&["patch", "-p", &p.pid().to_string(), path(&patch.path)]);
    let err = stderr(&out);
    ensure!(
        out.status.code() == Some(1)
            && err.contains(&format!("already traced by process {}", std::process::id())),
        "({}):\n{}{err}",
        out.status,
        stdout(&out)
    );
    p.drain();
    p.wait_for("value=1", WAIT)?;
    Ok(())
}

#[test]
fn a_fifo_or_a_device_given_as_the_patch_is_named_as_such() -> Result<()> {
    let s = Scratch::new()?;
    let (exe, _patch) = build(&s, "scenario-exe", "FIFO", "patched-basic.c")?;
    let mut p = Running::start(&exe.path, &[])?;
    p.wait_for("value=1", WAIT)?;
    let pid = p.pid().to_string();
    let fifo = s.join("patch.fifo");
    let c = std::ffi::CString::new(path(&fifo))?;
    // SAFETY: mkfifo on a NUL-terminated path we own.
    ensure!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) } == 0, "mkfifo");
    for (file, kind) in [(path(&fifo), "a FIFO"), ("/dev/null", "a character device")] {
        // Opening the FIFO to read it would block for good: bounded.
        let out = finish(lc_spawn(&["patch", "-p", &pid, file]), WAIT)?;
        let err = stderr(&out);
        ensure!(
            out.status.code() == Some(1) && err.contains(kind) && !err.contains("Not a directory"),
            "{file} ({}):\n{err}",
            out.status
        );
    }
    runs_on(&mut p, "value=1")
}

#[test]
fn unpatch_all_without_a_selector_is_refused() -> Result<()> {
    let s = Scratch::new()?;
    let (exe, patch) = build(&s, "scenario-exe", "UNPATCHALL", "patched-basic.c")?;
    let mut p = Running::start(&exe.path, &[])?;
    p.wait_for("value=1", WAIT)?;
    let pid = p.pid().to_string();
    ok(&lc(&["patch", "-p", &pid, path(&patch.path)]))?;
    runs_on(&mut p, "value=2")?;
    let out = lc(&["unpatch", "-p", "all"]);
    ensure!(
        out.status.code() == Some(2) && stderr(&out).contains("--all"),
        "({}):\n{}{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    // Still patched; a selector takes it off.
    runs_on(&mut p, "value=2")?;
    ok(&lc(&["unpatch", "-p", "all", &exe.build_id]))?;
    runs_on(&mut p, "value=1")
}

#[test]
fn a_target_that_dies_during_the_command_is_not_reported_as_unchanged() -> Result<()> {
    let s = Scratch::new()?;
    let (exe, patch) = build(&s, "scenario-safety", "DEATH", "patched.c")?;
    let mut p = Running::start(&exe.path, &["stuck", "1"])?;
    p.wait_for("stuck 1", WAIT)?;
    let pid = p.pid();
    let lc_patch = lc_spawn(&[
        "patch",
        "-p",
        &pid.to_string(),
        "--timeout",
        "60",
        path(&patch.path),
    ]);
    wait_traced(pid)?;
    // Killed while livecare waits for the worker to leave value(). Not reaped until
    // livecare has answered: a zombie is dead too.
    // SAFETY: kill on our own child's pid, which we have not reaped.
    ensure!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0);
    let out = finish(lc_patch, WAIT)?;
    let err = stderr(&out);
    ensure!(
        out.status.code() == Some(4) && err.contains(&format!("pid {pid} died")),
        "({}):\n{}{err}",
        out.status,
        stdout(&out)
    );
    ensure!(!p.is_alive());
    Ok(())
}

#[test]
fn a_failed_patch_that_could_not_be_rolled_back_is_not_reported_as_unchanged() -> Result<()> {
    let s = Scratch::new()?;
    let flags = Flags {
        exe_link: Link::Pie,
        opt: "-O2".into(),
        extra: vec!["-DLIVECARE_GUARDS_ROLLBACK=1".into()],
        ..Flags::default()
    };
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("scenario-safety"),
        s.path(),
        flags,
    )?;
    let exe = b.executable("orig.c", "prog", &[])?;
    // One directory, applied all or nothing in file order: the first patch traps the
    // workers in its new value() for good; the second, for call_value(), fails (the
    // first changed that caller's code in memory); so the first must come off again,
    // which it cannot while the workers are inside it.
    let never = b.patch(&exe, "patched-never.c", "0001")?;
    let second = b.patch(&exe, "patched-caller.c", "0002")?;
    let dir = s.join("both");
    std::fs::create_dir(&dir)?;
    std::fs::copy(&never.path, dir.join("a.kpatch"))?;
    std::fs::copy(&second.path, dir.join("b.kpatch"))?;
    let mut p = Running::start(&exe.path, &["normal", "2"])?;
    p.wait_for("value=1", WAIT)?;
    let pid = p.pid();
    let out = lc(&[
        "patch",
        "-p",
        &pid.to_string(),
        "--timeout",
        "1",
        path(&dir),
    ]);
    let err = stderr(&out);
    ensure!(
        out.status.code() == Some(4)
            && err.contains(&format!("pid {pid} was changed"))
            && err.contains("livecare repair"),
        "({}):\n{}{err}",
        out.status,
        stdout(&out)
    );
    // As it says: the first patch is in.
    runs_on(&mut p, "value=2")?;
    let info = ok(&lc(&["info", "-p", &pid.to_string()]))?;
    ensure!(info.contains("1 hunk(s): value"), "{info}");
    Ok(())
}
