//! Errors of the doctor, each naming the file, object, thread or function involved.

use std::path::PathBuf;

/// What went wrong while applying, removing or inspecting patches.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Access to the target process failed.
    #[error(transparent)]
    Process(#[from] livecare_process::Error),
    /// A patch file could not be read.
    #[error("reading {path}: {err}")]
    Io {
        /// File.
        path: PathBuf,
        /// OS error.
        err: std::io::Error,
    },
    /// A patch file is malformed or unusable.
    #[error("patch {path}: {what}")]
    BadPatch {
        /// File.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A target object's ELF could not be read.
    #[error("object {path}: {what}")]
    Object {
        /// Path of the object.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// No loaded object has the patch's build-id.
    #[error("no object with build-id {build_id} in pid {pid} (loaded: {loaded})")]
    NoMatchingObject {
        /// Process.
        pid: i32,
        /// Wanted build-id.
        build_id: String,
        /// What is loaded.
        loaded: String,
    },
    /// The target's code is not what the patch was made for.
    #[error("verification failed for {function} at {addr:#x} in {object}: {what}")]
    Verify {
        /// Function.
        function: String,
        /// Address.
        addr: u64,
        /// Object path.
        object: String,
        /// What differs.
        what: String,
    },
    /// The same patch is already applied.
    #[error("patch {patch_id} for build-id {build_id} is already applied to pid {pid}")]
    AlreadyApplied {
        /// Process.
        pid: i32,
        /// Patch id (or file name).
        patch_id: String,
        /// Build-id.
        build_id: String,
    },
    /// Relocation or layout failed.
    #[error("patch {path}: {what}")]
    Relocate {
        /// File.
        path: PathBuf,
        /// What failed.
        what: String,
    },
    /// No free address range near the object.
    #[error("no free {size:#x}-byte hole within ±2 GiB of {object}")]
    NoHole {
        /// Object.
        object: String,
        /// Size wanted.
        size: u64,
    },
    /// A thread stayed inside a function being replaced until the timeout.
    #[error("unsafe to {action}: thread {tid} of pid {pid} is still inside {function} after {secs:.1} s; target left unchanged")]
    Unsafe {
        /// "patch" or "unpatch".
        action: &'static str,
        /// Process.
        pid: i32,
        /// Thread.
        tid: i32,
        /// Function name.
        function: String,
        /// Seconds waited.
        secs: f64,
    },
    /// Another process runs in the target's memory (a `vfork` child before its `exec`,
    /// or a `clone(CLONE_VM)` child) and stayed until the timeout.
    #[error("cannot {action} pid {pid}: process {child} shares its memory (a vfork child that has not called exec yet, or a clone(CLONE_VM) child) and was still there after {secs:.1} s; livecare cannot hold it with the process's threads, so nothing was changed. Try again once it has exited or called exec")]
    SharedMemory {
        /// "patch" or "unpatch".
        action: &'static str,
        /// Process.
        pid: i32,
        /// The process sharing its memory.
        child: i32,
        /// Seconds waited.
        secs: f64,
    },
    /// Nothing to unpatch, or wrong order.
    #[error("{0}")]
    Unpatch(String),
    /// Another livecare holds the target's lock (it is patching, unpatching or
    /// repairing it right now).
    #[error("{holder} is working on pid {pid} right now; nothing was changed. Wait for it to finish, then try again")]
    Busy {
        /// Process.
        pid: i32,
        /// Who holds the lock, for the message.
        holder: String,
    },
    /// The target's threads could not be seized: someone else traces them, or we may not.
    #[error("cannot trace pid {pid}: {what}; nothing was changed")]
    Traced {
        /// Process.
        pid: i32,
        /// Who traces it, or why we may not.
        what: String,
    },
}
