//! Errors of process access, each naming the pid/tid, address or file involved.

use crate::{Pid, Tid};

/// What went wrong while accessing a traced process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process does not exist (or exited).
    #[error("no such process {0}")]
    NoSuchProcess(Pid),
    /// The pid is a kernel thread, which has no user address space to patch.
    #[error("pid {0} is a kernel thread")]
    KernelThread(Pid),
    /// A ptrace request failed.
    #[error("ptrace {op} on thread {tid}: {err}")]
    Ptrace {
        /// Request name.
        op: &'static str,
        /// Thread.
        tid: Tid,
        /// OS error.
        err: std::io::Error,
    },
    /// waitpid failed.
    #[error("waitpid: {0}")]
    Wait(std::io::Error),
    /// Reading or writing target memory failed.
    #[error("{op} {len} bytes at {addr:#x} in pid {pid}: {err}")]
    Memory {
        /// "read" or "write".
        op: &'static str,
        /// Process.
        pid: Pid,
        /// Target address.
        addr: u64,
        /// Length.
        len: usize,
        /// OS error.
        err: std::io::Error,
    },
    /// A /proc file could not be read.
    #[error("reading {path}: {err}")]
    Proc {
        /// Path.
        path: String,
        /// OS error.
        err: std::io::Error,
    },
    /// A /proc file had unexpected content.
    #[error("parsing {path}: {what}")]
    Parse {
        /// Path.
        path: String,
        /// What was wrong.
        what: String,
    },
    /// A remote syscall could not be executed or returned an error.
    #[error("remote syscall {name} in thread {tid}: {what}")]
    RemoteSyscall {
        /// Syscall name.
        name: &'static str,
        /// Executing thread.
        tid: Tid,
        /// What went wrong (errno or reason).
        what: String,
    },
    /// The thread exited while we needed it.
    #[error("thread {0} exited")]
    ThreadGone(Tid),
    /// A timeout expired.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The process is stopped by job control; changing it would need it to run.
    #[error(
        "process {0} is stopped (SIGSTOP or another stop signal): continue it first \
         (kill -CONT {0}), then try again"
    )]
    ProcessStopped(Pid),
}

impl Error {
    pub(crate) fn ptrace(op: &'static str, tid: Tid) -> Error {
        Error::Ptrace {
            op,
            tid,
            err: std::io::Error::last_os_error(),
        }
    }
}
