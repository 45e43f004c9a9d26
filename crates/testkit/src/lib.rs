//! Test harness shared by every crate's tests: compile C fixtures with the system gcc
//! into a temporary directory, start them with piped stdout, wait for an expected line
//! with a timeout, and kill them on drop.
//!
//! You are responsible for choosing the fixture and the lines to expect; this crate
//! makes sure no fixture process outlives its test and that every failure message says
//! what was seen.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod patchbuild;

/// Root of the repository (where `tests/fixtures` lives).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .find(|p| p.join("tests").join("fixtures").is_dir() && p.join("Cargo.toml").is_file())
        .unwrap_or(here)
        .to_path_buf()
}

/// Directory of a fixture case: `tests/fixtures/<case>/`.
pub fn fixture_dir(case: &str) -> PathBuf {
    repo_root().join("tests").join("fixtures").join(case)
}

/// Environment variable that overrides where the interop vectors are looked for (a
/// path that is no directory makes them missing, to check the skips).
pub const INTEROP_ENV: &str = "LIVECARE_INTEROP_DIR";

/// What the interop tests need, for their skip banner.
pub const INTEROP: &str = "the LibCare/LibcarePlus interop vectors in ../shared/interop \
    next to the repository (or $LIVECARE_INTEROP_DIR)";

/// Directory of the interop vectors made by LibCare and LibcarePlus (`../shared/interop`,
/// or `$LIVECARE_INTEROP_DIR`), if present.
pub fn interop_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os(INTEROP_ENV) {
        Some(d) => PathBuf::from(d),
        None => repo_root().join("..").join("shared").join("interop"),
    };
    dir.is_dir().then_some(dir)
}

/// Prints the one banner every test prints when something optional it needs is
/// missing (`what`: the thing, and how to get it); the test then passes without
/// checking anything. Named after the running test. Written to the real stderr, past
/// the test harness's capture, so it shows in a plain `cargo test` run.
pub fn skip_banner(what: &str) {
    use std::io::Write;
    let test = thread::current().name().unwrap_or("test").to_string();
    let _ = std::io::stderr()
        .write_all(format!("\n==== SKIPPED: {test}: needs {what} ====\n").as_bytes());
}

/// Whether `tool --version` runs and succeeds (an optional build tool is installed).
pub fn have_tool(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What a skipped test returns: nothing, or `Ok(())`.
pub trait SkipReturn {
    /// The value a skipped test returns.
    fn skipped() -> Self;
}

impl SkipReturn for () {
    fn skipped() {}
}

impl<E> SkipReturn for std::result::Result<(), E> {
    fn skipped() -> Self {
        Ok(())
    }
}

/// `skip_unless!(condition, "what is needed")`: unless the condition holds, prints the
/// skip banner ([`skip_banner`], once per call site) and returns from the test.
#[macro_export]
macro_rules! skip_unless {
    ($ok:expr, $what:expr) => {
        if !$ok {
            static BANNER: ::std::sync::Once = ::std::sync::Once::new();
            BANNER.call_once(|| $crate::skip_banner(&$what));
            return $crate::SkipReturn::skipped();
        }
    };
}

/// `needs_interop!()`: skips the test ([`skip_unless!`]) when the interop vectors are
/// missing ([`interop_dir`]).
#[macro_export]
macro_rules! needs_interop {
    () => {
        $crate::skip_unless!($crate::interop_dir().is_some(), $crate::INTEROP)
    };
}

/// `needs_tool!("cmake", "apt-get install -y cmake")`: skips the test when the tool
/// does not run ([`have_tool`]).
#[macro_export]
macro_rules! needs_tool {
    ($tool:expr, $install:expr) => {
        $crate::skip_unless!(
            $crate::have_tool($tool),
            format!("{} ({})", $tool, $install)
        )
    };
}

/// Path of the `livecare` binary built by cargo for integration tests, if known.
pub fn livecare_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_livecare") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join("livecare");
        if p.is_file() {
            return p;
        }
    }
    target.join("debug").join("livecare")
}

/// How a C fixture is compiled and linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Position-independent executable (Debian's default).
    Pie,
    /// `-no-pie` executable.
    NoPie,
    /// `-fPIC -shared` library.
    Shared,
    /// `-c` object only.
    Object,
}

/// A scratch directory that is removed on drop (kept when `LIVECARE_KEEP_TMP` is set).
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Scratch {
    /// A new empty scratch directory.
    pub fn new() -> Result<Scratch> {
        let dir = tempfile::Builder::new()
            .prefix("livecare-test-")
            .tempdir()?;
        let path = dir.path().to_path_buf();
        let dir = if std::env::var_os("LIVECARE_KEEP_TMP").is_some() {
            eprintln!("keeping {}", path.display());
            let _ = dir.keep();
            None
        } else {
            Some(dir)
        };
        Ok(Scratch { dir, path })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// Copies every file of fixture `case` into this directory.
    pub fn copy_fixture(&self, case: &str) -> Result<()> {
        copy_dir(&fixture_dir(case), &self.path)
    }

    /// Writes `contents` to `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> Result<PathBuf> {
        let p = self.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, contents).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}

/// Runs a command and fails with its full output when it does not exit 0.
pub fn run_ok(cmd: &mut Command) -> Result<std::process::Output> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Compiles `sources` with gcc into `out`, as `link` says, with `extra` flags.
pub fn gcc(sources: &[&Path], out: &Path, link: Link, extra: &[&str]) -> Result<PathBuf> {
    let mut cmd = Command::new("gcc");
    match link {
        Link::Pie => cmd.args(["-fPIE", "-pie"]),
        Link::NoPie => cmd.args(["-fno-pie", "-no-pie"]),
        Link::Shared => cmd.args(["-fPIC", "-shared"]),
        Link::Object => cmd.arg("-c"),
    };
    cmd.args(extra).args(sources).arg("-o").arg(out);
    run_ok(&mut cmd)?;
    Ok(out.to_path_buf())
}

/// The GNU build-id of an ELF file, as lowercase hex, read with `readelf -n`.
pub fn build_id_of(path: &Path) -> Result<String> {
    let out = run_ok(Command::new("readelf").arg("-n").arg(path))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Build ID: ")
                .map(|s| s.trim().to_string())
        })
        .with_context(|| format!("{} has no GNU build-id note", path.display()))
}

/// `ETXTBSY` ("Text file busy") on Linux.
const ETXTBSY: i32 = 26;

/// Spawns `cmd`, retrying for a while on `ETXTBSY`: an executable this test process
/// has just written (a copied fixture) can still be open for writing in a child that
/// another test thread forked and has not exec'ed yet, and the kernel refuses to run
/// it until that child's exec closes the descriptor.
pub fn spawn_retrying_etxtbsy(cmd: &mut Command) -> Result<Child> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(ETXTBSY) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            r => return r.with_context(|| format!("spawning {cmd:?}")),
        }
    }
}

/// How a line of a target's output relates to a change just made to it (see
/// [`Running::settle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not a line this check looks at.
    Ignore,
    /// A valid state that may only come before the final one: printed before the
    /// change was complete (the reader thread may deliver it late, even after a
    /// `drain`), or computed partly before and partly after it.
    Transitional,
    /// The state the change must lead to.
    Final,
}

/// A running fixture process whose stdout lines are collected; killed on drop.
pub struct Running {
    child: Child,
    lines: Receiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Running {
    /// Starts `cmd` with stdout piped (stderr inherited).
    pub fn spawn(mut cmd: Command) -> Result<Running> {
        cmd.stdout(Stdio::piped()).stdin(Stdio::null());
        let mut child = spawn_retrying_etxtbsy(&mut cmd)?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let (tx, rx) = mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_w = seen.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                seen_w.lock().unwrap().push(line.clone());
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Running {
            child,
            lines: rx,
            seen,
        })
    }

    /// Starts the program at `path` with `args`.
    pub fn start(path: &Path, args: &[&str]) -> Result<Running> {
        let mut cmd = Command::new(path);
        cmd.args(args);
        Running::spawn(cmd)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a line containing `needle` arrives (lines before it are consumed).
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_for_match(|l| l.contains(needle), timeout)
            .with_context(|| format!("waiting for a line containing {needle:?}"))
    }

    /// Waits until a line satisfying `pred` arrives (lines before it are consumed).
    pub fn wait_for_match(
        &mut self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return Ok(line),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "timed out after {timeout:?}; last lines: {:?}",
                        self.tail(10)
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait().ok().flatten();
                    bail!(
                        "stdout closed (exit: {status:?}); last lines: {:?}",
                        self.tail(10)
                    )
                }
            }
        }
    }

    /// Waits until `n` consecutive lines classified [`Seen::Final`] arrive, after any
    /// number of [`Seen::Transitional`] ones, and returns those final lines. Fails when
    /// `classify` fails (a line that is never valid), when a transitional line follows
    /// a final one (the state went back), or after `timeout`.
    ///
    /// Use it after livecare changed the target instead of asserting on the first
    /// line after a `drain`: that line can predate the change or straddle it.
    pub fn settle(
        &mut self,
        n: usize,
        timeout: Duration,
        mut classify: impl FnMut(&str) -> Result<Seen>,
    ) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut finals: Vec<String> = Vec::new();
        let mut transitional = 0usize;
        while finals.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.wait_for_match(|_| true, left).with_context(|| {
                format!(
                    "waiting for {n} consecutive lines of the final state \
                         ({} seen, after {transitional} transitional)",
                    finals.len()
                )
            })?;
            match classify(&line).with_context(|| format!("line {line:?}"))? {
                Seen::Ignore => {}
                Seen::Transitional if finals.is_empty() => transitional += 1,
                Seen::Transitional => bail!(
                    "{line:?} after {} line(s) of the final state ({:?}): the state went back",
                    finals.len(),
                    finals
                ),
                Seen::Final => finals.push(line),
            }
        }
        Ok(finals)
    }

    /// Drops every line received so far, so the next wait sees only new output.
    pub fn drain(&mut self) {
        while self.lines.try_recv().is_ok() {}
    }

    /// The last `n` lines seen.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let seen = self.seen.lock().unwrap();
        seen[seen.len().saturating_sub(n)..].to_vec()
    }

    /// True while the process has not exited.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The `State:` and `TracerPid:` lines of /proc/PID/status (for "left stopped?" checks).
    pub fn proc_state(&self) -> Result<(String, u32)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
                .unwrap_or_default()
        };
        Ok((field("State:"), field("TracerPid:").parse().unwrap_or(0)))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A snapshot of a process's memory map and the bytes of its executable mappings,
/// to prove that a failed operation left the target unchanged.
#[derive(Debug, PartialEq, Eq)]
pub struct MemorySnapshot {
    /// /proc/PID/maps, line by line.
    pub maps: Vec<String>,
    /// Contents of every readable executable mapping, keyed by its maps line.
    pub code: Vec<(String, Vec<u8>)>,
}

impl MemorySnapshot {
    /// Takes a snapshot of `pid` (needs permission to read /proc/PID/mem). Once the
    /// main thread has exited (a zombie: `/proc/PID/maps` empty, `mem` refused), it is
    /// taken through a live thread's `/proc/PID/task/TID`.
    pub fn take(pid: u32) -> Result<MemorySnapshot> {
        use std::io::{Read, Seek, SeekFrom};
        let zombie = |dir: &str| {
            std::fs::read_to_string(format!("{dir}/stat"))
                .ok()
                .and_then(|s| Some(s.rsplit_once(')')?.1.trim_start().starts_with(['Z', 'X'])))
                .unwrap_or(true)
        };
        let mut dir = format!("/proc/{pid}");
        if zombie(&dir) {
            for e in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
                let t = format!("/proc/{pid}/task/{}", e.file_name().to_string_lossy());
                if !zombie(&t) {
                    dir = t;
                    break;
                }
            }
        }
        let maps_text = std::fs::read_to_string(format!("{dir}/maps"))?;
        let maps: Vec<String> = maps_text.lines().map(str::to_string).collect();
        let mut mem = std::fs::File::open(format!("{dir}/mem"))?;
        let mut code = Vec::new();
        for line in &maps {
            let mut parts = line.split_whitespace();
            let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
                continue;
            };
            if !perms.starts_with("r") || perms.as_bytes().get(2) != Some(&b'x') {
                continue;
            }
            if line.ends_with("[vsyscall]") {
                continue;
            }
            let Some((lo, hi)) = range.split_once('-') else {
                continue;
            };
            let lo = u64::from_str_radix(lo, 16)?;
            let hi = u64::from_str_radix(hi, 16)?;
            let mut buf = vec![0u8; (hi - lo) as usize];
            mem.seek(SeekFrom::Start(lo))?;
            if mem.read_exact(&mut buf).is_ok() {
                code.push((line.clone(), buf));
            }
        }
        Ok(MemorySnapshot { maps, code })
    }

    /// [`Self::assert_same`], but for mappings that lie inside one of `ranges`
    /// (`(start, end)`), in either snapshot: the retired regions of removed patches,
    /// which `info` lists and unpatch may keep mapped.
    pub fn assert_same_except(&self, other: &MemorySnapshot, ranges: &[(u64, u64)]) -> Result<()> {
        let inside = |line: &str| {
            let range = line.split_whitespace().next().unwrap_or_default();
            let Some((lo, hi)) = range.split_once('-') else {
                return false;
            };
            let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
            else {
                return false;
            };
            ranges.iter().any(|&(a, b)| a <= lo && hi <= b)
        };
        let keep = |s: &MemorySnapshot| MemorySnapshot {
            maps: s.maps.iter().filter(|l| !inside(l)).cloned().collect(),
            code: s.code.iter().filter(|c| !inside(&c.0)).cloned().collect(),
        };
        keep(self).assert_same(&keep(other))
    }

    /// Fails with the first difference from `other`.
    pub fn assert_same(&self, other: &MemorySnapshot) -> Result<()> {
        if self.maps != other.maps {
            bail!(
                "memory maps differ:\nbefore:\n{}\nafter:\n{}",
                self.maps.join("\n"),
                other.maps.join("\n")
            );
        }
        for ((l1, b1), (_, b2)) in self.code.iter().zip(&other.code) {
            if b1 != b2 {
                let at = b1.iter().zip(b2).position(|(a, b)| a != b).unwrap_or(0);
                bail!("code bytes differ in {l1} at offset {at:#x}");
            }
        }
        if self.code.len() != other.code.len() {
            bail!("number of readable code mappings differs");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_a_fixture_and_reads_its_lines() -> Result<()> {
        let dir = Scratch::new()?;
        let src = dir.write(
            "hello.c",
            "#include <stdio.h>\n#include <unistd.h>\nint main(void){for(int i=0;;i++){printf(\"tick %d\\n\",i);fflush(stdout);usleep(10000);}}\n",
        )?;
        for link in [Link::Pie, Link::NoPie] {
            let exe = gcc(
                &[&src],
                &dir.join(format!("hello-{link:?}")),
                link,
                &["-O2"],
            )?;
            assert_eq!(build_id_of(&exe)?.len(), 40);
            let mut p = Running::start(&exe, &[])?;
            p.wait_for("tick 3", Duration::from_secs(5))?;
            assert!(p.is_alive());
            let snap = MemorySnapshot::take(p.pid())?;
            snap.assert_same(&MemorySnapshot::take(p.pid())?)?;
        }
        Ok(())
    }

    fn sh(script: &str) -> Result<Running> {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        Running::spawn(c)
    }

    fn old_new(l: &str) -> Result<Seen> {
        Ok(match l {
            "old" => Seen::Transitional,
            "new" => Seen::Final,
            "noise" => Seen::Ignore,
            _ => bail!("garbage"),
        })
    }

    #[test]
    fn settle_skips_transitional_lines_and_fails_when_the_state_goes_back() -> Result<()> {
        let mut p = sh("echo old; echo noise; echo old; echo new; echo noise; echo new; sleep 5")?;
        assert_eq!(
            p.settle(2, Duration::from_secs(5), old_new)?,
            ["new", "new"]
        );
        let mut p = sh("echo old; echo new; echo old; echo new; sleep 5")?;
        let err = p.settle(2, Duration::from_secs(5), old_new).unwrap_err();
        assert!(format!("{err:#}").contains("went back"), "{err:#}");
        let mut p = sh("echo old; echo what; echo new; echo new; sleep 5")?;
        let err = p.settle(2, Duration::from_secs(5), old_new).unwrap_err();
        assert!(format!("{err:#}").contains("garbage"), "{err:#}");
        let mut p = sh("echo old; echo new; sleep 5")?;
        let err = p
            .settle(2, Duration::from_millis(300), old_new)
            .unwrap_err();
        assert!(format!("{err:#}").contains("1 seen"), "{err:#}");
        Ok(())
    }

    #[test]
    fn wait_for_times_out_with_context() -> Result<()> {
        let mut p = Running::spawn({
            let mut c = Command::new("sh");
            c.args(["-c", "echo one; sleep 5"]);
            c
        })?;
        let err = p.wait_for("never", Duration::from_millis(300)).unwrap_err();
        assert!(format!("{err:#}").contains("one"), "{err:#}");
        Ok(())
    }
}
