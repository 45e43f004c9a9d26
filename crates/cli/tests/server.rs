//! LibCare's server mode (issue 18, item 1), driven the way LibCare's and LibcarePlus'
//! test suites drive it: `libcare-ctl -v server SOCK` (or `libcare-server -v SOCK`)
//! started under its tool name, every action through `libcare-client SOCK …` (`run`,
//! `patch-user`, `info-user`, `unpatch-user`, `kill`, `storage`, `stop`), and the
//! start-up hook (`crates/cli/hooks/execve-hook.c`) announcing `execve PID` so that a
//! program is patched from the storage before it runs. The targets are gcc-built;
//! each test checks the output change, the restore, that the target is left running
//! untraced, and that the server ends on `stop`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use testkit::patchbuild::{Builder, Flags};
use testkit::{fixture_dir, repo_root, Scratch};

const LIVECARE: &str = env!("CARGO_BIN_EXE_livecare");
/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(30);

/// A scratch directory with every LibCare tool name linked in `bin/`.
fn tools() -> Result<(Scratch, PathBuf)> {
    let s = Scratch::new()?;
    let bin = s.join("bin");
    let out = Command::new(LIVECARE)
        .arg("install-links")
        .arg(&bin)
        .output()?;
    ensure!(out.status.success(), "install-links: {out:?}");
    Ok((s, bin))
}

fn ps(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A running server; killed (and reaped) if a test fails before its `stop`.
struct Server {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
    client: PathBuf,
}

impl Server {
    /// Starts `exe args… SOCK` and waits for its socket.
    fn start(exe: &Path, args: &[&str], s: &Scratch, bin: &Path) -> Result<Server> {
        let sock = s.join("test.sock");
        let log = s.join("server.log");
        let child = Command::new(exe)
            .args(args)
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(s.join("server.err"))?)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let mut server = Server {
            child,
            sock,
            log,
            client: bin.join("libcare-client"),
        };
        let deadline = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(&server.sock).is_err() {
            if let Some(st) = server.child.try_wait()? {
                bail!("server exited with {st}: {}", server.errors());
            }
            ensure!(Instant::now() < deadline, "server socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    fn errors(&self) -> String {
        let dir = self.log.parent().expect("scratch");
        std::fs::read_to_string(dir.join("server.err")).unwrap_or_default()
    }

    /// `libcare-client SOCK args…`: its reply (exit status 0 required).
    fn client(&self, args: &[&str]) -> Result<String> {
        let o = Command::new(&self.client)
            .arg(&self.sock)
            .args(args)
            .output()?;
        let reply = String::from_utf8_lossy(&o.stdout).into_owned();
        ensure!(
            o.status.success(),
            "libcare-client {args:?}: {:?}\n{reply}{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(reply)
    }

    /// `stop`: the server must exit by itself, with status 0, its socket removed.
    fn stop(mut self) -> Result<()> {
        self.client(&["stop"])?;
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait()? {
                ensure!(st.success(), "server exit status {st}: {}", self.errors());
                break;
            }
            ensure!(Instant::now() < deadline, "server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        ensure!(!self.sock.exists(), "socket file left behind");
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM: the server terminates its `run` child, then exits.
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: plain signal to our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

/// Waits until `file` has a line containing `want` after its first `from` bytes;
/// returns the file's length then.
fn see(file: &Path, from: usize, want: &str) -> Result<usize> {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read(file).unwrap_or_default();
        if text.len() > from {
            let tail = String::from_utf8_lossy(&text[from..]);
            if tail.lines().any(|l| l.contains(want)) {
                return Ok(text.len());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{want:?} not printed; output:\n{}",
                String::from_utf8_lossy(&text)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The target is alive, not stopped and not traced.
fn assert_clean(pid: &str) -> Result<()> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("pid {pid} is gone"))?;
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let state = field("State:");
    ensure!(
        field("TracerPid:") == "0" && !state.starts_with('t') && !state.starts_with('T'),
        "target left {state}, TracerPid {}",
        field("TracerPid:")
    );
    ensure!(!state.starts_with('Z'), "target died");
    Ok(())
}

/// `kill PID` terminates and reaps the target (no zombie left).
fn kill_reaped(server: &Server, pid: &str) -> Result<()> {
    server.client(&["kill", pid])?;
    ensure!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still there after `kill`"
    );
    Ok(())
}

fn builder(s: &Scratch) -> Result<Builder> {
    Builder::new(
        Path::new(LIVECARE),
        &fixture_dir("scenario-exe"),
        &s.join("build"),
        Flags::default(),
    )
}

/// The suites' `files` and `unpatch` flavors: `run`, `patch-user`, `info-user`,
/// `unpatch-user`, `kill` through the client of `libcare-ctl -v server`; then `stop`.
#[test]
fn client_drives_patch_info_unpatch_through_libcare_ctl_server() -> Result<()> {
    let (s, bin) = tools()?;
    let b = builder(&s)?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch = b.patch(&exe, "patched-basic.c", "0001")?;
    let server = Server::start(&bin.join("libcare-ctl"), &["-v", "server"], &s, &bin)?;
    let out = s.join("prog.out");

    let reply = server.client(&["run", &format!("exec {} >{} 2>&1", ps(&exe.path), ps(&out))])?;
    let pid = reply.trim().to_string();
    ensure!(pid.parse::<u32>().is_ok(), "`run` replied {reply:?}");
    let at = see(&out, 0, "t0 value=1")?;

    let reply = server.client(&["patch-user", "-p", &pid, ps(&patch.path)])?;
    ensure!(
        reply.contains("patch hunk(s) have been successfully applied"),
        "{reply}"
    );
    let at = see(&out, at, "t0 value=2")?;
    assert_clean(&pid)?;

    let reply = server.client(&["info-user", "-p", &pid])?;
    ensure!(reply.contains(&exe.build_id), "info-user: {reply}");

    let reply = server.client(&["unpatch-user", "-p", &pid])?;
    ensure!(
        reply.contains("were successfully cancelled"),
        "unpatch-user: {reply}"
    );
    see(&out, at, "t0 value=1")?;
    assert_clean(&pid)?;

    // Errors come back on the connection too, and the server goes on.
    let reply = server.client(&["patch-user", "-p", &pid, "/nonexistent.kpatch"])?;
    ensure!(reply.contains("error"), "no error reply: {reply:?}");
    let reply = server.client(&["no-such-command"])?;
    ensure!(reply.contains("unknown command"), "{reply:?}");
    // Only a process may announce its own exec: `execve PID` for another process is
    // refused, and the target is not attached to (it goes on, untraced).
    server.client(&["execve", &pid])?;
    see(&out, std::fs::metadata(&out)?.len() as usize, "t0 value=1")?;
    assert_clean(&pid)?;
    let log = std::fs::read_to_string(s.join("server.err"))?;
    ensure!(log.contains("refused"), "server log: {log}");

    kill_reaped(&server, &pid)?;
    server.stop()
}

/// The hook's shared object, built from the repo's source with gcc.
fn build_hook(s: &Scratch) -> Result<PathBuf> {
    let src = repo_root().join("crates/cli/hooks/execve-hook.c");
    let so = s.join("execve-hook.so");
    testkit::run_ok(
        Command::new("gcc")
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
            .arg(&so)
            .arg(&src)
            .arg("-ldl"),
    )?;
    Ok(so)
}

/// The suites' `startup` flavor: with `storage DIR` set on `libcare-server` (the
/// LibcarePlus name), a program started under the hook announces its exec and is
/// patched before its code runs: its very first line shows the patched value. Without
/// a server the hook lets the program run unpatched.
#[test]
fn a_program_started_under_the_hook_is_patched_before_it_first_prints() -> Result<()> {
    let (s, bin) = tools()?;
    let b = builder(&s)?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch = b.patch(&exe, "patched-basic.c", "0001")?;
    let hook = build_hook(&s)?;
    // LibCare's flat storage: <buildid>.kpatch.
    let storage = s.join("patchroot");
    std::fs::create_dir_all(&storage)?;
    std::fs::copy(
        &patch.path,
        storage.join(format!("{}.kpatch", exe.build_id)),
    )?;
    let sock = s.join("test.sock");
    let pattern = format!("{}/*", ps(exe.path.parent().expect("build dir")));
    let under_hook = |out: &Path| {
        format!(
            "exec env KP_EXECVE_PATTERN='{pattern}' KP_EXECVE_PATTERN_PATHNAME=1 \
             LIBCARE_CTL_UNIX={} LD_PRELOAD={} stdbuf -o 0 {} >{} 2>&1",
            ps(&sock),
            ps(&hook),
            ps(&exe.path),
            ps(out)
        )
    };

    // No server yet: the program runs, unpatched (no trap kills it).
    let alone = s.join("alone.out");
    let mut child = Command::new("/bin/sh")
        .args(["-c", &under_hook(&alone)])
        .spawn()?;
    let seen = see(&alone, 0, "t0 value=1");
    let _ = child.kill();
    let _ = child.wait();
    seen?;

    let server = Server::start(&bin.join("libcare-server"), &["-v"], &s, &bin)?;
    server.client(&["storage", ps(&storage)])?;
    let out = s.join("prog.out");
    let pid = server
        .client(&["run", &under_hook(&out)])?
        .trim()
        .to_string();
    let at = see(&out, 0, "t0 value=")?;
    let text = std::fs::read_to_string(&out)?;
    let first = text
        .lines()
        .find(|l| l.contains("value="))
        .unwrap_or_default();
    ensure!(
        first.contains("t0 value=2"),
        "first line {first:?} (not patched before it ran); server log:\n{}{}",
        std::fs::read_to_string(&server.log).unwrap_or_default(),
        server.errors()
    );
    ensure!(!text.contains("value=1"), "ran unpatched first:\n{text}");
    // `run`'s pid is the program's: sh, env and stdbuf all exec'd.
    assert_clean(&pid)?;
    let log = std::fs::read_to_string(&server.log)?;
    ensure!(log.contains("successfully applied"), "server log: {log}");

    // Patched like any other: unpatch restores it.
    server.client(&["unpatch-user", "-p", &pid])?;
    see(&out, at, "t0 value=1")?;
    assert_clean(&pid)?;
    kill_reaped(&server, &pid)?;
    server.stop()
}
