//! Call-site retargeting (tests/fixtures/apply-callsites): after `patch`, the direct
//! calls to the replaced function call the new body in the region, calls through a
//! function pointer still reach it through the entry jump, and `unpatch` puts back
//! the exact original bytes, one stacked patch at a time.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use common::*;
use testkit::patchbuild::{Builder, Flags};
use testkit::{Link, MemorySnapshot, Running, Scratch};

/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(20);

/// Link addresses of the `call <value>` instructions in `main` and `twice`, as
/// objdump decodes them.
fn direct_calls(exe: &Path) -> Result<Vec<u64>> {
    let out = Command::new("objdump").arg("-d").arg(exe).output()?;
    let mut func = String::new();
    let mut sites = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((_, name)) = line.strip_suffix(">:").and_then(|l| l.split_once(" <")) {
            func = name.to_string();
        } else if (func == "main" || func == "twice")
            && line.contains("call")
            && line.ends_with("<value>")
        {
            let addr = line.trim().split(':').next().context("objdump line")?;
            sites.push(u64::from_str_radix(addr, 16)?);
        }
    }
    Ok(sites)
}

/// Where the `call rel32` at `site` in `pid` goes.
fn call_target(pid: u32, site: u64) -> Result<u64> {
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    mem.seek(SeekFrom::Start(site))?;
    let mut b = [0u8; 5];
    mem.read_exact(&mut b)?;
    assert_eq!(b[0], 0xe8, "no call at {site:#x}: {b:02x?}");
    let rel = i32::from_le_bytes([b[1], b[2], b[3], b[4]]);
    Ok((site + 5).wrapping_add(rel as i64 as u64))
}

/// (new body address, retargeted call count) of the hunk of the latest patch.
fn latest_hunk(pid: &str) -> Result<(u64, u64)> {
    let json: serde_json::Value = serde_json::from_str(&ok(&lc(&["info", "-p", pid, "--json"]))?)?;
    let patches = json[0]["objects"]
        .as_array()
        .context("objects")?
        .iter()
        .flat_map(|o| o["patches"].as_array().cloned().unwrap_or_default())
        .max_by_key(|p| p["seq"].as_u64())
        .context("no patch in info")?;
    let h = &patches["hunks"][0];
    Ok((
        h["saddr"].as_u64().context("saddr")?,
        h["call_sites"].as_u64().context("call_sites")?,
    ))
}

#[test]
fn direct_calls_go_to_the_new_body_and_stacked_unpatch_restores_each_step() -> Result<()> {
    let s = Scratch::new()?;
    let flags = Flags {
        exe_link: Link::Pie,
        opt: "-O2".into(),
        ..Flags::default()
    };
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("apply-callsites"),
        s.path(),
        flags,
    )?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let p1 = b.patch(&exe, "patched.c", "0001")?;
    let p2 = b.patch(&exe, "patched2.c", "0002")?;
    let link_sites = direct_calls(&exe.path)?;
    assert_eq!(link_sites.len(), 3, "fixture changed? {link_sites:x?}");

    let mut prog = Running::start(&exe.path, &[])?;
    prog.wait_for("direct=1 pointer=1 twice=4 decoy=1", WAIT)?;
    let pid = prog.pid().to_string();
    let bias = map_base(prog.pid(), &exe.path)?;
    let sites: Vec<u64> = link_sites.iter().map(|a| a + bias).collect();
    let value = call_target(prog.pid(), sites[0])?;
    let original = MemorySnapshot::take(prog.pid())?;

    ok(&lc(&["patch", "-p", &pid, p1.path.to_str().unwrap()]))?;
    prog.drain();
    prog.wait_for("direct=2 pointer=2 twice=6 decoy=1", WAIT)?;
    let (body1, n1) = latest_hunk(&pid)?;
    assert_eq!(n1, 3, "retargeted call sites");
    for &site in &sites {
        assert_eq!(call_target(prog.pid(), site)?, body1, "site {site:#x}");
    }
    let first = MemorySnapshot::take(prog.pid())?;

    // Stacked: the second patch's sites were calling the first patch's body.
    ok(&lc(&["patch", "-p", &pid, p2.path.to_str().unwrap()]))?;
    prog.drain();
    prog.wait_for("direct=3 pointer=3 twice=8 decoy=1", WAIT)?;
    let (body2, n2) = latest_hunk(&pid)?;
    assert_eq!(n2, 3);
    assert_ne!(body2, body1);
    for &site in &sites {
        assert_eq!(call_target(prog.pid(), site)?, body2, "site {site:#x}");
    }

    ok(&lc(&["unpatch", "-p", &pid]))?;
    prog.drain();
    prog.wait_for("direct=2 pointer=2 twice=6 decoy=1", WAIT)?;
    // Removed patches' regions may stay mapped, retired (listed by `info`).
    MemorySnapshot::take(prog.pid())?.assert_same_except(&first, &retired_ranges(prog.pid())?)?;

    ok(&lc(&["unpatch", "-p", &pid]))?;
    prog.drain();
    prog.wait_for("direct=1 pointer=1 twice=4 decoy=1", WAIT)?;
    for &site in &sites {
        assert_eq!(call_target(prog.pid(), site)?, value);
    }
    MemorySnapshot::take(prog.pid())?
        .assert_same_except(&original, &retired_ranges(prog.pid())?)?;
    assert!(prog.is_alive());
    assert_eq!(prog.proc_state()?.1, 0, "left traced");
    Ok(())
}
