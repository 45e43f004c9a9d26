//! `livecare patch / info / unpatch` against real processes, starting with the patches
//! LibCare and LibcarePlus made for the interop vector `foo`.

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::*;
use testkit::{MemorySnapshot, Running, Scratch};

const FOO_BUILD_ID: &str = "7788a89bcdbac583d60693ece924593d0d07e6a9";
/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(20);

/// Copies the interop vectors into a scratch dir, or None if they are not present.
fn interop() -> Result<Option<Scratch>> {
    let Some(dir) = testkit::interop_dir() else {
        testkit::skip_banner(testkit::INTEROP);
        return Ok(None);
    };
    let s = Scratch::new()?;
    for f in ["foo", "foo.libcare.kpatch", "foo.libcareplus.kpatch"] {
        std::fs::copy(dir.join(f), s.join(f))?;
    }
    Ok(Some(s))
}

fn patched_counter_addr(line: &str) -> Result<u64> {
    let hex = line
        .split("counter at 0x")
        .nth(1)
        .context("no address")?
        .trim_end_matches(')');
    Ok(u64::from_str_radix(hex, 16)?)
}

fn interop_round_trip(file: &str) -> Result<()> {
    let Some(s) = interop()? else { return Ok(()) };
    let mut prog = Running::start(&s.join("foo"), &[])?;
    prog.wait_for(": original", WAIT)?;
    let pid = prog.pid().to_string();

    let out = ok(&lc(&["patch", "-p", &pid, s.join(file).to_str().unwrap()]))?;
    assert!(out.contains("patched 1 function (report) in pid"), "{out}");
    assert!(out.contains("paused"), "{out}");
    prog.drain();
    let line = prog.wait_for(": patched (counter at 0x", WAIT)?;
    // The patch reads the original's static `counter` (foo's .bss + 0xc, at 0x4034).
    assert_eq!(
        patched_counter_addr(&line)?,
        map_base(prog.pid(), &s.join("foo"))? + 0x4034,
        "{line}"
    );

    let info = ok(&lc(&["info", "-p", &pid]))?;
    assert!(
        info.contains(FOO_BUILD_ID) && info.contains("1 hunk(s): report"),
        "{info}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&lc(&["info", "-p", &pid, "--json"]))?)?;
    let obj = &json[0]["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["build_id"] == FOO_BUILD_ID)
        .unwrap()
        .clone();
    assert_eq!(obj["patches"][0]["hunks"][0]["name"], "report");

    let again = lc(&["patch", "-p", &pid, s.join(file).to_str().unwrap()]);
    assert_eq!(
        again.status.code(),
        Some(1),
        "applying twice must be refused"
    );
    assert!(
        stderr(&again).contains("already applied"),
        "{}",
        stderr(&again)
    );

    let out = ok(&lc(&["unpatch", "-p", &pid]))?;
    assert!(
        out.contains("unpatched") && out.contains("1 function"),
        "{out}"
    );
    prog.drain();
    prog.wait_for(": original", WAIT)?;
    assert!(prog.is_alive());
    let info = ok(&lc(&["info", "-p", &pid]))?;
    assert!(
        info.contains("not patched") && !info.contains("hunk"),
        "{info}"
    );
    assert_eq!(prog.proc_state()?.1, 0, "left traced");
    Ok(())
}

#[test]
fn libcareplus_interop_patch_applies_shows_in_info_and_unpatches() -> Result<()> {
    interop_round_trip("foo.libcareplus.kpatch")
}

#[test]
fn libcare_interop_patch_applies_shows_in_info_and_unpatches() -> Result<()> {
    interop_round_trip("foo.libcare.kpatch")
}

#[test]
fn libcare_ctl_face_prints_libcare_messages() -> Result<()> {
    let Some(s) = interop()? else { return Ok(()) };
    let mut prog = Running::start(&s.join("foo"), &[])?;
    prog.wait_for(": original", WAIT)?;
    let pid = prog.pid().to_string();
    let out = ok(&lc_as(
        s.path(),
        "libcare-ctl",
        &[
            "patch",
            "-p",
            &pid,
            s.join("foo.libcareplus.kpatch").to_str().unwrap(),
        ],
    )?)?;
    assert!(
        out.contains(&format!(
            "1 patch hunk(s) have been successfully applied to PID '{pid}'"
        )),
        "{out}"
    );
    prog.drain();
    prog.wait_for(": patched", WAIT)?;
    let info = ok(&lc_as(s.path(), "libcare-ctl", &["info", "-p", &pid])?)?;
    for want in [
        format!("Pid: {pid}"),
        "Target: foo".into(),
        format!("Build id: {FOO_BUILD_ID}"),
        "Applied patch number: 1".into(),
        "Patch id: 0001".into(),
    ] {
        assert!(info.contains(&want), "missing {want:?} in:\n{info}");
    }
    let out = ok(&lc_as(
        s.path(),
        "libcare-ctl",
        &["unpatch-user", "-p", &pid],
    )?)?;
    assert!(
        out.contains(&format!(
            "1 patch hunk(s) were successfully cancelled from PID '{pid}'"
        )),
        "{out}"
    );
    prog.drain();
    prog.wait_for(": original", WAIT)?;
    Ok(())
}

#[test]
fn wrong_build_id_is_refused_and_target_untouched() -> Result<()> {
    let Some(s) = interop()? else { return Ok(()) };
    let src = s.write("other.c", "#include <stdio.h>\n#include <unistd.h>\nint main(void){for(;;){puts(\"tick\");fflush(stdout);usleep(20000);}}\n")?;
    let exe = testkit::gcc(&[&src], &s.join("other"), testkit::Link::Pie, &[])?;
    let mut p = Running::start(&exe, &[])?;
    p.wait_for("tick", WAIT)?;
    let before = MemorySnapshot::take(p.pid())?;
    let out = lc(&[
        "patch",
        "-p",
        &p.pid().to_string(),
        s.join("foo.libcareplus.kpatch").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no object with build-id 7788a89b"),
        "{}",
        stderr(&out)
    );
    MemorySnapshot::take(p.pid())?.assert_same(&before)?;
    p.drain();
    p.wait_for("tick", WAIT)?;
    Ok(())
}

#[test]
fn forged_build_id_fails_verification_and_target_untouched() -> Result<()> {
    let Some(s) = interop()? else { return Ok(()) };
    // Another program with a function of the same name at a different place.
    let src = s.write(
        "other.c",
        "#include <stdio.h>\n#include <unistd.h>\nstatic int n;\nint twice(int x){return 2*x;}\nvoid other(int k){printf(\"other %d\\n\",twice(k));fflush(stdout);}\nint main(void){for(;;){other(n++);usleep(20000);}}\n",
    )?;
    let exe = testkit::gcc(&[&src], &s.join("other"), testkit::Link::Pie, &["-O0"])?;
    let bid = testkit::build_id_of(&exe)?;
    let mut forged = std::fs::read(s.join("foo.libcareplus.kpatch"))?;
    forged[88..128].copy_from_slice(bid.as_bytes());
    let fp = s.write("forged.kpatch", &forged)?;
    let mut p = Running::start(&exe, &[])?;
    p.wait_for("other", WAIT)?;
    let before = MemorySnapshot::take(p.pid())?;
    let out = lc(&["patch", "-p", &p.pid().to_string(), fp.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    // The patch's symbol `report` is checked against the target's before its code.
    let err = stderr(&out);
    assert!(
        err.contains("verification failed for report")
            || err.contains("symbol report: the patch expects it at .text+0xe9"),
        "{err}"
    );
    MemorySnapshot::take(p.pid())?.assert_same(&before)?;
    p.drain();
    p.wait_for("other", WAIT)?;
    assert_eq!(p.proc_state()?.1, 0);
    Ok(())
}

#[test]
fn dead_pid_and_kernel_thread_are_clear_errors() -> Result<()> {
    let Some(s) = interop()? else { return Ok(()) };
    let f = s.join("foo.libcareplus.kpatch");
    let mut child = std::process::Command::new("true").spawn()?;
    let dead = child.id();
    child.wait()?;
    let out = lc(&["patch", "-p", &dead.to_string(), f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no such process"), "{}", stderr(&out));
    if livecare_process::Pid(2).is_kernel_thread() {
        let out = lc(&["patch", "-p", "2", f.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("kernel thread"), "{}", stderr(&out));
    }
    let out = lc(&["patch", "-p", "notapid", f.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    Ok(())
}

#[test]
fn corrupted_patches_are_refused_before_touching_the_target() -> Result<()> {
    let Some(s) = interop()? else { return Ok(()) };
    let good = std::fs::read(s.join("foo.libcareplus.kpatch"))?;
    let elf = 0x1f8; // kpatch_offset of the LibcarePlus vector
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut c = good.clone();
    c[elf + 0x28..elf + 0x30].copy_from_slice(&0x7fff_ffffu64.to_le_bytes());
    cases.push(("e_shoff", c));
    let mut c = good.clone();
    c[elf + 0x3c..elf + 0x3e].copy_from_slice(&0xffffu16.to_le_bytes());
    cases.push(("e_shnum", c));
    let mut c = good.clone();
    c[152..156].copy_from_slice(&0xffff_0000u32.to_le_bytes());
    cases.push(("kpatch_offset", c));
    let mut c = good.clone();
    c[24..280].fill(b'a');
    cases.push(("unterminated build-id", c));
    cases.push(("truncated", good[..good.len() / 2].to_vec()));

    let mut prog = Running::start(&s.join("foo"), &[])?;
    prog.wait_for(": original", WAIT)?;
    let before = MemorySnapshot::take(prog.pid())?;
    for (what, bytes) in cases {
        let f = s.write(&format!("bad-{}.kpatch", what.replace(' ', "-")), &bytes)?;
        let out = lc(&["patch", "-p", &prog.pid().to_string(), f.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", stdout(&out));
        assert!(
            stderr(&out).starts_with("error: "),
            "{what}: {}",
            stderr(&out)
        );
        MemorySnapshot::take(prog.pid())?
            .assert_same(&before)
            .with_context(|| what.to_string())?;
    }
    prog.drain();
    prog.wait_for(": original", WAIT)?;
    assert_eq!(prog.proc_state()?.1, 0);
    Ok(())
}

#[test]
fn stripped_target_is_checked_against_its_eh_frame() -> Result<()> {
    let Some(s) = interop()? else { return Ok(()) };
    // The stripped copy keeps its build-id; without a symbol table the hunk address is
    // checked against the .eh_frame function extents instead.
    testkit::run_ok(
        std::process::Command::new("strip")
            .arg(s.join("foo"))
            .arg("-o")
            .arg(s.join("foo-stripped")),
    )?;
    let mut prog = Running::start(&s.join("foo-stripped"), &[])?;
    prog.wait_for(": original", WAIT)?;
    let pid = prog.pid().to_string();
    ok(&lc(&[
        "patch",
        "-p",
        &pid,
        s.join("foo.libcareplus.kpatch").to_str().unwrap(),
    ]))?;
    prog.drain();
    prog.wait_for(": patched", WAIT)?;
    ok(&lc(&["unpatch", "-p", &pid]))?;

    // A patch forged for a stripped program with other code is refused.
    let src = s.write(
        "other.c",
        "#include <stdio.h>\n#include <unistd.h>\nstatic int n;\nint twice(int x){return 2*x;}\nvoid other(int k){printf(\"other %d\\n\",twice(k));fflush(stdout);}\nint main(void){for(;;){other(n++);usleep(20000);}}\n",
    )?;
    let exe = testkit::gcc(
        &[&src],
        &s.join("other"),
        testkit::Link::Pie,
        &["-O0", "-s"],
    )?;
    let mut forged = std::fs::read(s.join("foo.libcareplus.kpatch"))?;
    forged[88..128].copy_from_slice(testkit::build_id_of(&exe)?.as_bytes());
    let fp = s.write("forged.kpatch", &forged)?;
    let mut p = Running::start(&exe, &[])?;
    p.wait_for("other", WAIT)?;
    let before = MemorySnapshot::take(p.pid())?;
    let out = lc(&["patch", "-p", &p.pid().to_string(), fp.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains(".eh_frame"), "{}", stderr(&out));
    MemorySnapshot::take(p.pid())?.assert_same(&before)?;
    Ok(())
}
