//! Fault injection for the crash-consistency tests: `LIVECARE_FAULT=<step>` makes
//! livecare abort (as if killed) at that step. Debug builds only; a release binary
//! ignores the variable.

/// The steps, in the order an apply or unpatch passes them.
pub const STEPS: &[&str] = &[
    "after-mmap",
    "after-body",
    "half-jumps",
    "before-detach",
    "before-stop",
    "half-restores",
    "before-munmap",
];

/// True when the fault for `step` is armed (always false in release builds).
pub fn armed(step: &str) -> bool {
    #[cfg(debug_assertions)]
    {
        static WANTED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        WANTED
            .get_or_init(|| std::env::var("LIVECARE_FAULT").ok())
            .as_deref()
            == Some(step)
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = step;
        false
    }
}

/// Aborts the process if the fault for `step` is armed.
pub fn point(step: &str) {
    if armed(step) {
        eprintln!("livecare: fault injected at {step}");
        std::process::abort();
    }
}

/// Where a 5-byte `call`/`jmp rel32` at `addr` goes (to group writes by function).
pub fn branch_target(addr: u64, bytes: &[u8]) -> Option<u64> {
    match bytes {
        [0xe8 | 0xe9, r @ ..] if r.len() == 4 => {
            let rel = i32::from_le_bytes(r.try_into().ok()?);
            Some((addr + 5).wrapping_add(rel as i64 as u64))
        }
        _ => None,
    }
}
