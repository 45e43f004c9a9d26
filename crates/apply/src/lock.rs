//! Who else works on a target. Two livecares on one process must not interleave: the
//! second would read the first's half-written region as "interrupted mid-way", and a
//! `repair` would undo a commit still in progress. Each `patch`, `unpatch` and `repair`
//! holds an exclusive `flock` on a file named after the target (pid and start time,
//! so a reused pid is another target) for its whole run; the kernel drops the lock
//! when livecare exits, however it ends. And when the threads cannot be seized
//! because someone else traces them (a debugger), that tracer is named.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;

use livecare_process::{Pid, Tid};

use crate::Error;

/// An exclusive lock on one target for as long as it lives; removed on drop.
#[derive(Debug)]
pub struct TargetLock {
    file: File,
    path: PathBuf,
}

impl TargetLock {
    /// Locks `pid` for this command, or says which livecare holds it. `None` when no
    /// lock can be taken here (no private lock directory): the work goes on unlocked,
    /// as before locks existed, with seizing as the only guard.
    pub fn acquire(pid: Pid) -> Result<Option<TargetLock>, Error> {
        let (Some(dir), Some(start)) = (lock_dir(), start_time(pid)) else {
            return Ok(None);
        };
        let path = dir.join(format!("{}-{start}.lock", pid.0));
        // A holder unlinks the file before it lets go: if we locked a file that is no
        // longer the one at `path`, open the new one and lock again.
        for _ in 0..100 {
            let Ok(mut file) = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
            else {
                return Ok(None);
            };
            // SAFETY: flock on a descriptor we own; non-blocking.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = text.trim().parse::<i32>().ok();
                return Err(Error::Busy {
                    pid: pid.0,
                    holder: holder.map_or_else(
                        || "another livecare".to_string(),
                        |h| format!("another livecare (pid {h})"),
                    ),
                });
            }
            let same = match (file.metadata(), std::fs::symlink_metadata(&path)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            let _ = file.set_len(0);
            let _ = writeln!(file, "{}", std::process::id());
            return Ok(Some(TargetLock { file, path }));
        }
        Ok(None)
    }
}

impl TargetLock {
    /// The livecare that holds `pid`'s lock now, if one does (for `info`: its regions
    /// in flight are not interrupted ones). Reads `/proc/locks` and takes no lock, so
    /// it can never make a starting livecare find the target busy.
    pub fn holder(pid: Pid) -> Option<i32> {
        let path = lock_dir()?.join(format!("{}-{}.lock", pid.0, start_time(pid)?));
        let meta = std::fs::symlink_metadata(&path).ok()?;
        let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
        let key = format!("{major:02x}:{minor:02x}:{}", meta.ino());
        let locks = std::fs::read_to_string("/proc/locks").ok()?;
        // `1: FLOCK  ADVISORY  WRITE 1234 fe:00:5367806 0 EOF`
        locks.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&key.as_str()))
                .then(|| f.get(4)?.parse().ok())
                .flatten()
        })
    }
}

impl Drop for TargetLock {
    fn drop(&mut self) {
        // Unlinked while still locked, so no one can lock this inode after us and
        // believe it is the current file (`acquire` checks the inode after locking).
        let _ = std::fs::remove_file(&self.path);
        let _ = &self.file;
    }
}

/// Our private lock directory: `/run/livecare` for root, else
/// `$XDG_RUNTIME_DIR/livecare` or `/tmp/livecare-UID`; made 0700, and used only when
/// it is ours and no one else can write to it.
fn lock_dir() -> Option<PathBuf> {
    // SAFETY: geteuid has no failure mode and touches no memory.
    let me = unsafe { libc::geteuid() };
    let dir = if me == 0 && std::path::Path::new("/run").is_dir() {
        PathBuf::from("/run/livecare")
    } else if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        PathBuf::from(x).join("livecare")
    } else {
        PathBuf::from(format!("/tmp/livecare-{me}"))
    };
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    (meta.is_dir() && meta.uid() == me && meta.mode() & 0o022 == 0).then_some(dir)
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot
/// (with the pid, it tells a process from a later one that reuses its pid).
pub fn start_time(pid: Pid) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.0)).ok()?;
    // comm may contain spaces and parentheses: fields resume after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A `SEIZE` refused with `EPERM` explained: the process (and command) that already
/// traces the thread, or that we may not trace it at all. Other errors pass through.
pub(crate) fn explain_seize(pid: Pid, e: livecare_process::Error) -> Error {
    let livecare_process::Error::Ptrace {
        op: "SEIZE",
        tid,
        err,
    } = &e
    else {
        return e.into();
    };
    if err.raw_os_error() != Some(libc::EPERM) {
        return e.into();
    }
    let Some(tracer) = tracer_of(pid, *tid) else {
        return e.into();
    };
    if tracer == 0 {
        return Error::Traced {
            pid: pid.0,
            what: format!(
                "not permitted to trace it (ptrace SEIZE on thread {tid}: {err}); run livecare \
                 as root, or as the process's owner where the system lets users trace their \
                 own processes"
            ),
        };
    }
    // TracerPid is the tracing thread; name its process.
    let tgid = field_of(&format!("/proc/{tracer}/status"), "Tgid:").unwrap_or(tracer);
    let comm = std::fs::read_to_string(format!("/proc/{tgid}/comm"))
        .map(|c| c.trim().to_string())
        .unwrap_or_default();
    let what = if comm == "livecare" || comm.starts_with("libcare") {
        "another livecare is working on it: wait for it to finish, then try again".to_string()
    } else {
        "a debugger or tracer holds it: detach it (or let it finish), then try again".to_string()
    };
    Error::Traced {
        pid: pid.0,
        what: format!("thread {tid} is already traced by process {tgid} ({comm}); {what}"),
    }
}

/// `TracerPid` of thread `tid` of `pid`.
fn tracer_of(pid: Pid, tid: Tid) -> Option<i32> {
    field_of(
        &format!("/proc/{}/task/{}/status", pid.0, tid.0),
        "TracerPid:",
    )
}

/// The number after `key` in a `/proc/…/status` file.
fn field_of(path: &str, key: &str) -> Option<i32> {
    let status = std::fs::read_to_string(path).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}
