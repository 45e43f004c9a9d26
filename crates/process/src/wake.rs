//! A periodic wake-up for the tracer thread, so it can block in `waitpid` instead of
//! polling and still notice its deadline.
//!
//! Polling with `sched_yield` between tries hands the CPU away for a whole scheduler
//! tick on a loaded machine (milliseconds of pause); a blocking `waitpid` is woken by
//! the kernel the moment a thread stops. The timer interrupts that wait with a signal
//! aimed at this thread only, so the loop can check its deadline and vanished tasks.

use std::sync::Once;
use std::time::Duration;

/// The real-time signal offset used for wake-ups (SIGRTMIN + 5; glibc keeps the first
/// two for itself).
const WAKE_SIGNAL_OFFSET: i32 = 5;

fn wake_signal() -> i32 {
    libc::SIGRTMIN() + WAKE_SIGNAL_OFFSET
}

extern "C" fn ignore(_: libc::c_int) {}

/// Installs a no-op handler without `SA_RESTART`, so a blocked `waitpid` returns EINTR.
fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a no-op handler is a valid argument; the signal
        // is reserved for this module and only ever aimed at a thread that is waiting.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore as *const () as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(wake_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// A periodic timer that interrupts the calling thread's blocking syscalls; deleted on drop.
pub(crate) struct WakeTimer {
    timer: libc::timer_t,
}

impl WakeTimer {
    /// Arms a timer firing every `period` at the calling thread, or `None` if the
    /// kernel refuses (the caller then falls back to polling).
    pub(crate) fn every(period: Duration) -> Option<WakeTimer> {
        install_handler();
        // SAFETY: sigevent/itimerspec are plain C structs filled here; timer_create
        // writes the new timer id into `timer`, which we own and delete in Drop.
        unsafe {
            let mut sev: libc::sigevent = std::mem::zeroed();
            sev.sigev_notify = libc::SIGEV_THREAD_ID;
            sev.sigev_signo = wake_signal();
            sev.sigev_notify_thread_id = libc::gettid();
            let mut timer: libc::timer_t = std::mem::zeroed();
            if libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer) != 0 {
                return None;
            }
            let ts = libc::timespec {
                tv_sec: period.as_secs() as libc::time_t,
                tv_nsec: period.subsec_nanos() as libc::c_long,
            };
            let spec = libc::itimerspec {
                it_interval: ts,
                it_value: ts,
            };
            if libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) != 0 {
                libc::timer_delete(timer);
                return None;
            }
            Some(WakeTimer { timer })
        }
    }
}

impl Drop for WakeTimer {
    fn drop(&mut self) {
        // SAFETY: `timer` came from timer_create and is deleted exactly once.
        unsafe {
            libc::timer_delete(self.timer);
        }
    }
}
