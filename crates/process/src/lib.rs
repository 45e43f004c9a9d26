//! A traced process: the thread set, memory I/O, remote syscalls, `/proc/PID/maps`,
//! auxv and the loaded objects with their load bias and GNU build-id.
//!
//! You are responsible for deciding *when* to stop threads and what to write; this
//! crate solves seizing every thread (including threads born while we hold them, via
//! `PTRACE_O_TRACECLONE`), interrupting all of them at once, fast bulk memory access
//! (`process_vm_readv` for reads, `/proc/PID/mem` for writes, which also works on
//! read-only code pages), executing syscalls inside the target with its registers
//! saved and restored, and detaching every thread on every exit path (the
//! [`ThreadSet`] guard detaches in `Drop`).

pub mod arch;
mod bytes;
mod error;
mod launch;
mod maps;
mod mem;
mod objects;
mod priority;
pub mod stops;
mod threads;
mod wake;
mod warm;

pub use arch::Regs;
pub use bytes::Bytes;
pub use error::Error;
pub use launch::{follow_exec_to_entry, launch_at_entry};
pub use maps::{auxv, read_maps, read_proc_file, MapEntry, AT_ENTRY, AT_PHDR};
pub use mem::RemoteMemory;
pub use objects::{loaded_objects, ElfKind, LoadedObject};
pub use threads::{monotonic_ns, StopWatch, ThreadSet};

use std::fmt;

/// A process id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid(pub i32);

/// A thread id (a task of a process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tid(pub i32);

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// True for the answer of a zombie main thread's `/proc/PID/mem` or `auxv`: ESRCH.
pub(crate) fn refused<T>(r: &std::io::Result<T>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::ESRCH))
}

impl Pid {
    /// The short command name (`/proc/PID/comm`), empty when unreadable.
    pub fn comm(self) -> String {
        maps::read_proc_file(&format!("/proc/{}/comm", self.0), 64)
            .map(|s| String::from_utf8_lossy(&s).trim().to_string())
            .unwrap_or_default()
    }

    /// Number of threads: the link count of `/proc/PID/task` is two plus the number
    /// of threads (one `statx`, about 1.5 µs, against about 9 µs to read
    /// `/proc/PID/stat` and several times that to list the directory); `None` if the
    /// process is gone.
    pub fn thread_count(self) -> Option<usize> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(format!("/proc/{}/task", self.0)).ok()?;
        (m.nlink() as usize).checked_sub(2)
    }

    /// True for kernel threads (no address space: empty `/proc/PID/cmdline` and no exe).
    pub fn is_kernel_thread(self) -> bool {
        let stat = maps::read_proc_file(&format!("/proc/{}/stat", self.0), 1024)
            .map(|s| String::from_utf8_lossy(&s).into_owned())
            .unwrap_or_default();
        // Field 9 (flags) carries PF_KTHREAD (0x00200000); comm may contain spaces, so
        // split after the closing parenthesis.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            if let Some(flags) = rest
                .split_whitespace()
                .nth(6)
                .and_then(|f| f.parse::<u64>().ok())
            {
                return flags & 0x0020_0000 != 0;
            }
        }
        false
    }

    /// The `/proc` directory through which this process's memory is seen: `/proc/PID`,
    /// or `/proc/PID/task/TID` of a live thread once the main thread has exited. A
    /// `pthread_exit` from `main` leaves the main thread a zombie until the process
    /// ends, and `/proc/PID`'s `maps` is then empty while its `mem`, `auxv`, `exe` and
    /// `root` are refused (ESRCH), though the other threads run on in the same memory.
    /// Costs a read of the main thread's `stat`: callers ask only after `/proc/PID` has
    /// failed them (see [`Pid::via_live_thread`]).
    pub fn mm_dir(self) -> String {
        if !self.task_alive(Tid(self.0)) {
            if let Some(t) = self
                .tasks()
                .ok()
                .and_then(|ts| ts.into_iter().find(|&t| self.task_alive(t)))
            {
                return format!("/proc/{}/task/{}", self.0, t.0);
            }
        }
        format!("/proc/{}", self.0)
    }

    /// `name` (`maps`, `mem`, …) under [`Pid::mm_dir`] when that is not `/proc/PID`:
    /// where to look again after `/proc/PID/name` failed or came back empty.
    pub fn via_live_thread(self, name: &str) -> Option<String> {
        let dir = self.mm_dir();
        (dir != format!("/proc/{}", self.0)).then(|| format!("{dir}/{name}"))
    }

    /// Children of the threads `tids` of this process that share its memory: `vfork`
    /// children before their `exec`, and `clone(CLONE_VM)` children that are not
    /// threads. They run the process's code in its address space, yet are processes of
    /// their own, outside any stop of the process's threads. Found from each thread's
    /// `/proc/PID/task/TID/children` (one read per thread) and `kcmp(KCMP_VM)`; empty
    /// when none (or when the kernel offers neither).
    pub fn memory_sharers(self, tids: &[Tid]) -> Vec<Pid> {
        const KCMP_VM: libc::c_long = 1;
        let mut out = Vec::new();
        for t in tids {
            let path = format!("/proc/{}/task/{}/children", self.0, t.0);
            let Ok(text) = maps::read_proc_file(&path, 4096) else {
                continue;
            };
            for child in String::from_utf8_lossy(&text)
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                // SAFETY: kcmp only compares two processes' kernel objects; it reads and
                // writes no memory of ours. 0 means the same address space.
                let same = unsafe {
                    libc::syscall(
                        libc::SYS_kcmp,
                        self.0,
                        child,
                        KCMP_VM,
                        0 as libc::c_long,
                        0 as libc::c_long,
                    )
                };
                if same == 0 && !out.contains(&Pid(child)) {
                    out.push(Pid(child));
                }
            }
        }
        out
    }

    /// `read` of `/proc/PID/name`, made again through a live thread's
    /// `/proc/PID/task/TID/name` when `zombie_main` says the answer is that of a main
    /// thread that has exited (see [`Pid::mm_dir`]); returns it with the path read.
    /// A missing file means the process is gone; other errors name the path.
    pub(crate) fn read_proc<T>(
        self,
        name: &str,
        read: impl Fn(&str) -> std::io::Result<T>,
        zombie_main: impl Fn(&std::io::Result<T>) -> bool,
    ) -> Result<(T, String), Error> {
        let mut path = format!("/proc/{}/{name}", self.0);
        let mut got = read(&path);
        if zombie_main(&got) {
            if let Some(p) = self.via_live_thread(name) {
                got = read(&p);
                path = p;
            }
        }
        match got {
            Ok(v) => Ok((v, path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NoSuchProcess(self)),
            Err(err) => Err(Error::Proc { path, err }),
        }
    }

    /// True if thread `tid` exists and has not exited (neither zombie nor dead).
    pub fn task_alive(self, tid: Tid) -> bool {
        !matches!(self.task_state(tid), None | Some('Z' | 'X'))
    }

    /// The scheduler state letter of one of its threads (field 3 of
    /// `/proc/PID/task/TID/stat`: `R` running or runnable, `S` sleeping, `D` in disk
    /// sleep, `t` stopped by a tracer, ...); `None` when the thread is gone.
    pub fn task_state(self, tid: Tid) -> Option<char> {
        let stat =
            maps::read_proc_file(&format!("/proc/{}/task/{}/stat", self.0, tid.0), 1024).ok()?;
        // The command name may contain anything: the state follows its last ')'.
        let after = stat.iter().rposition(|&b| b == b')')?;
        stat.get(after + 2).map(|&b| b as char)
    }

    /// Thread ids currently listed in `/proc/PID/task`.
    pub fn tasks(self) -> Result<Vec<Tid>, Error> {
        let dir = format!("/proc/{}/task", self.0);
        let rd = std::fs::read_dir(&dir).map_err(|e| Error::Proc {
            path: dir.clone(),
            err: e,
        })?;
        let mut out = Vec::new();
        for e in rd.flatten() {
            if let Some(t) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(Tid(t));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every process id on the system (from `/proc`).
    pub fn all() -> Vec<Pid> {
        let mut out: Vec<Pid> = std::fs::read_dir("/proc")
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                    .map(Pid)
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }
}
