//! Helpers shared by the apply tests: run the `livecare` binary (also under a LibCare
//! name) and read a process's mappings. Patches are built with `testkit::patchbuild`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod load;

use anyhow::{bail, Context, Result};

/// The livecare binary under test.
pub fn livecare() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_livecare"))
}

/// Runs livecare with `args`; returns the output whatever the status.
pub fn lc(args: &[&str]) -> Output {
    Command::new(livecare())
        .args(args)
        .output()
        .expect("spawning livecare")
}

/// Runs livecare under another name (multi-call), e.g. `libcare-ctl`.
pub fn lc_as(dir: &Path, name: &str, args: &[&str]) -> Result<Output> {
    let link = dir.join(name);
    if !link.exists() {
        std::os::unix::fs::symlink(livecare(), &link)?;
    }
    Ok(Command::new(&link).args(args).output()?)
}

/// stdout of an output, as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr of an output, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails unless `o` exited 0, showing both streams.
pub fn ok(o: &Output) -> Result<String> {
    if !o.status.success() {
        bail!(
            "livecare failed ({}):\nstdout:\n{}\nstderr:\n{}",
            o.status,
            stdout(o),
            stderr(o)
        );
    }
    Ok(stdout(o))
}

/// The load address of the first mapping of `path` in `pid`.
pub fn map_base(pid: u32, path: &Path) -> Result<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let p = path.canonicalize()?;
    let p = p.to_string_lossy();
    let line = maps
        .lines()
        .find(|l| l.ends_with(&*p))
        .with_context(|| format!("{p} not mapped"))?;
    let start = line.split('-').next().unwrap_or("0");
    Ok(u64::from_str_radix(start, 16)?)
}

/// CLOCK_MONOTONIC in seconds, the clock fixtures print to say when a line was computed.
pub fn monotonic_now() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the valid pointer it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// The retired regions `info` lists for `pid`, as `(start, end)`: removed patches
/// whose regions unpatch keeps mapped while the process may still use them.
pub fn retired_ranges(pid: u32) -> Result<Vec<(u64, u64)>> {
    let out = lc(&["info", "-p", &pid.to_string(), "--json"]);
    if !out.status.success() {
        bail!("info failed: {}", stderr(&out));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v[0]["retired"]
        .as_array()
        .context("info lists no retired regions")?
        .iter()
        .map(|r| {
            let a = r["addr"].as_u64().unwrap_or(0);
            (a, a + r["total_len"].as_u64().unwrap_or(0))
        })
        .collect())
}
