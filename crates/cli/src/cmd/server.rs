//! `libcare-ctl server SOCK` / `libcare-server SOCK` / `livecare server SOCK`: LibCare's
//! command server on a Unix stream socket, and its start-up notification listener.
//!
//! Protocol (LibCare's and LibcarePlus'): a client connects, sends its arguments each
//! NUL-terminated and one more NUL after the last (at most 4096 bytes), and reads the
//! reply until the server closes the connection. Commands:
//! - `run CMD`: starts `/bin/sh -c CMD` (the previous one is terminated first) and
//!   replies with its pid;
//! - `kill PID`: SIGTERM, then waits for it (SIGKILL after 10 s);
//! - `storage DIR`: the patch storage root for `execve`, `startup` and `update`;
//! - `patch-user`/`unpatch-user`/`info-user` (or `patch`/`unpatch`/`info`) with
//!   `libcare-ctl`'s flags: run here, their output and errors are the reply;
//! - `execve TID`: sent by the start-up hook of a process about to exec: the server
//!   attaches, answers 4 bytes, follows it through its exec to the entry point and
//!   applies the storage's patches for it before its code runs (log on our stdout);
//! - `startup PID` patches a running process from the storage, `update` every process;
//! - `stop` ends the server (the `run` child is terminated). SIGTERM does the same.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use anyhow::Context;

/// Flags of `server`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Unix socket path (`@name`: abstract; `&FD`: an inherited listening socket).
    pub socket: String,
    /// Patch storage root (LibCare layout: `BUILDID.kpatch` or `BUILDID/latest/kpatch.bin`).
    #[arg(default_value = "/var/lib/libcare")]
    pub storage: PathBuf,
}

/// LibCare reads at most this much of one request.
const MAX_REQUEST: usize = 4096;
/// How long a process that announced its exec may take to reach it.
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// The `run` child, for `run` (replaced), `stop` and SIGTERM; 0 when none.
static CHILD: AtomicI32 = AtomicI32::new(0);

/// SIGTERM: terminate and reap the `run` child, then exit as LibCare does (128 + sig).
extern "C" fn on_sigterm(sig: libc::c_int) {
    let child = CHILD.load(Ordering::Relaxed);
    // SAFETY: kill, waitpid and _exit are async-signal-safe.
    unsafe {
        if child > 0 {
            libc::kill(child, libc::SIGTERM);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        libc::_exit(0x80 | sig);
    }
}

fn bind(spec: &str) -> anyhow::Result<UnixListener> {
    if let Some(fd) = spec.strip_prefix('&') {
        let fd: i32 = fd
            .parse()
            .with_context(|| format!("{spec:?}: expected &FD"))?;
        // SAFETY: the caller (a service manager) hands us this listening socket.
        return Ok(unsafe { UnixListener::from_raw_fd(fd) });
    }
    if let Some(name) = spec.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        return UnixListener::bind_addr(&addr)
            .with_context(|| format!("can't listen on unix socket {spec}"));
    }
    UnixListener::bind(spec).with_context(|| {
        format!("can't listen on unix socket {spec} (remove a stale socket file first)")
    })
}

/// Runs the server until `stop` or SIGTERM.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let listener = bind(&args.socket)?;
    // SAFETY: installing a handler that only makes async-signal-safe calls.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigterm as extern "C" fn(libc::c_int) as usize;
        act.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGTERM, &act, std::ptr::null_mut());
        // A client that goes away before its reply is written must not end the server.
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let mut storage = args.storage;
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("accept"),
        };
        let Some(argv) = read_request(&mut conn) else {
            continue;
        };
        if argv.is_empty() {
            continue;
        }
        if serve(&mut conn, &argv, &mut storage) == Flow::Stop {
            break;
        }
    }
    kill_and_wait(CHILD.swap(0, Ordering::Relaxed));
    if let Some(path) = args.socket.strip_prefix('/').map(|_| &args.socket) {
        let _ = std::fs::remove_file(path);
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads one request: NUL-terminated arguments, ended by an empty one. `None` when the
/// client went away or sent too much.
fn read_request(conn: &mut UnixStream) -> Option<Vec<String>> {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut msg = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    while !(msg.len() >= 2 && msg.ends_with(&[0, 0])) {
        match conn.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => msg.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
        if msg.len() >= MAX_REQUEST {
            eprintln!("livecare server: request longer than {MAX_REQUEST} bytes, dropped");
            return None;
        }
    }
    msg.truncate(msg.len() - 2);
    Some(
        msg.split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

#[derive(PartialEq, Eq)]
enum Flow {
    Go,
    Stop,
}

fn serve(conn: &mut UnixStream, argv: &[String], storage: &mut PathBuf) -> Flow {
    let arg1 = argv.get(1).map(String::as_str);
    match (argv[0].as_str(), arg1) {
        ("stop", _) => return Flow::Stop,
        ("storage", Some(dir)) => *storage = PathBuf::from(dir),
        ("execve", Some(tid)) => execve(conn, tid, storage),
        ("startup", Some(pid)) => ctl_here(&["patch-user", "-p", pid, &path_str(storage)]),
        ("update", _) => ctl_here(&["patch-user", "-p", "all", &path_str(storage)]),
        ("run", Some(cmd)) => {
            let reply = start(cmd);
            let _ = conn.write_all(reply.as_bytes());
        }
        ("kill", Some(pid)) => match pid.parse::<i32>() {
            Ok(pid) if pid > 0 => {
                let _ = CHILD.compare_exchange(pid, 0, Ordering::Relaxed, Ordering::Relaxed);
                kill_and_wait(pid);
            }
            _ => {
                let _ = writeln!(conn, "err: can't parse pid from {pid}");
            }
        },
        ("patch" | "patch-user" | "unpatch" | "unpatch-user" | "info" | "info-user", _) => {
            let args: Vec<&str> = argv.iter().map(String::as_str).collect();
            with_output_to(conn, || ctl_here(&args));
        }
        (cmd, _) => {
            let _ = writeln!(
                conn,
                "err: unknown command {cmd:?}; commands: run, kill, storage, execve, startup, \
                 update, stop, patch-user, unpatch-user, info-user"
            );
        }
    }
    Flow::Go
}

fn path_str(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Runs a `libcare-ctl` command in this process (it is the tracer of the `run` child,
/// which a separate process might not be allowed to trace).
fn ctl_here(args: &[&str]) {
    let mut argv: Vec<std::ffi::OsString> = vec!["libcare-ctl".into()];
    argv.extend(args.iter().map(Into::into));
    let outcome = std::panic::catch_unwind(|| crate::multicall::dispatch(argv));
    // Not eprintln!: it panics when the client has gone away.
    let mut err = std::io::stderr();
    let _ = match outcome {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => writeln!(err, "error: {e:#}"),
        Err(_) => writeln!(
            err,
            "error: livecare failed internally (see above); the server goes on"
        ),
    };
}

/// Runs `f` with our stdout and stderr on `conn` (the reply), as LibCare does.
fn with_output_to(conn: &UnixStream, f: impl FnOnce()) {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: dup/dup2 of descriptors we own; the originals come back below.
    let (out, err) = unsafe { (libc::dup(1), libc::dup(2)) };
    // SAFETY: as above; `conn` outlives the call.
    unsafe {
        libc::dup2(conn.as_raw_fd(), 1);
        libc::dup2(conn.as_raw_fd(), 2);
    }
    f();
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: restoring the saved descriptors and closing the copies.
    unsafe {
        libc::dup2(out, 1);
        libc::dup2(err, 2);
        libc::close(out);
        libc::close(err);
    }
}

/// `run`: the previous child goes, `sh -c cmd` starts (output to our own stdout and
/// stderr unless `cmd` redirects it); the reply is its pid.
fn start(cmd: &str) -> String {
    kill_and_wait(CHILD.swap(0, Ordering::Relaxed));
    match std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .spawn()
    {
        Ok(child) => {
            let pid = child.id() as i32;
            // Reaped by `kill` (or at exit), as LibCare does: the Child is not kept.
            CHILD.store(pid, Ordering::Relaxed);
            format!("{pid}\n")
        }
        Err(e) => format!("err: can't start /bin/sh: {e}\n"),
    }
}

/// SIGTERM `pid` and reap it if it is our child; SIGKILL after 10 s.
fn kill_and_wait(pid: i32) {
    if pid <= 0 {
        return;
    }
    // SAFETY: plain signal to a process the client named.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut status = 0;
        // SAFETY: plain syscall writing into a local int.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r != 0 {
            // Reaped, or not our child (ECHILD): nothing to wait for.
            return;
        }
        if std::time::Instant::now() > deadline {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The peer's pid (`SO_PEERCRED`).
fn peer_pid(conn: &UnixStream) -> Option<i32> {
    let mut cred: libc::ucred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the local struct.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.pid)
}

/// `execve TID`: patch the program `TID` is about to exec, before it runs. On any
/// failure the process is let go unpatched (with no answer its hook does not trap).
fn execve(conn: &mut UnixStream, tid: &str, storage: &std::path::Path) {
    let Ok(tid) = tid.parse::<i32>() else {
        eprintln!("livecare server: execve: can't parse pid from {tid:?}");
        return;
    };
    // Only the process itself may ask: an `execve` for someone else's pid would have
    // us attach to a process that is not waiting for it.
    let tgid = std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse::<i32>().ok())
        });
    if tgid != Some(tid) || peer_pid(conn) != Some(tid) {
        eprintln!(
            "livecare server: execve {tid}: refused: only the main thread of the connecting \
             process can announce its own exec"
        );
        return;
    }
    let held = livecare_process::follow_exec_to_entry(
        livecare_process::Pid(tid),
        || conn.write_all(&0i32.to_ne_bytes()),
        EXEC_TIMEOUT,
    );
    let mut threads = match held {
        Ok(t) => t,
        Err(e) => {
            eprintln!("livecare server: can't patch pid {tid} at its start: {e}");
            return;
        }
    };
    let applied = (|| -> anyhow::Result<Vec<livecare_apply::ApplyReport>> {
        super::patch::check_trusted(storage, false)?;
        let loaded = livecare_apply::load_patches_by(storage, livecare_apply::DirLookup::LibCare)
            .with_context(|| format!("loading {}", storage.display()))?;
        for p in &loaded.patches {
            super::patch::check_trusted(&p.source, false)?;
        }
        let opts = livecare_apply::Options {
            hold: true,
            ..Default::default()
        };
        Ok(livecare_apply::apply_held(
            &mut threads,
            &loaded.patches,
            &opts,
        )?)
    })();
    // Let it go whatever happened; a failed patch leaves it unpatched.
    if let Err(e) = threads.detach_all() {
        eprintln!("livecare server: detaching pid {tid}: {e}");
    }
    drop(threads);
    match applied {
        Ok(reports) if reports.is_empty() => {
            println!("No patch(es) applicable to PID '{tid}' have been found")
        }
        Ok(reports) => {
            for r in reports {
                println!(
                    "{} patch hunk(s) have been successfully applied to PID '{}'",
                    r.hunks.len(),
                    r.pid
                );
            }
        }
        Err(e) => eprintln!("livecare server: can't patch pid {tid} at its start: {e:#}"),
    }
}
