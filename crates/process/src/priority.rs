//! Real-time priority for the tracer while it holds the target stopped.
//!
//! Inside the pause the tracer is the only thing that can end it. Under normal (CFS)
//! scheduling it competes with everything else on its CPU — including the target
//! threads it has just resumed, which may preempt it before it resumes the rest — and
//! a few such preemptions on a loaded machine cost milliseconds of pause. With
//! `SCHED_FIFO` it runs until it blocks. It blocks only in waits for the target, so it
//! cannot starve anything; the previous policy is restored as soon as every thread is
//! running again. Without permission (not root, no CAP_SYS_NICE) nothing changes.

/// `SCHED_FIFO` priority used during a pause (low: above every normal task, below
/// the kernel's own real-time threads).
const PAUSE_PRIORITY: libc::c_int = 10;

/// The calling thread's previous scheduling policy, restored on drop.
pub(crate) struct Boost {
    policy: libc::c_int,
    param: libc::sched_param,
}

impl Boost {
    /// Switches the calling thread to `SCHED_FIFO`; `None` if not permitted or already
    /// real-time.
    pub(crate) fn raise() -> Option<Boost> {
        // SAFETY: sched_getscheduler/getparam/setscheduler on the calling thread (0)
        // with a sched_param we own; no memory is shared with the kernel afterwards.
        unsafe {
            let policy = libc::sched_getscheduler(0);
            if policy < 0 || policy == libc::SCHED_FIFO || policy == libc::SCHED_RR {
                return None;
            }
            let mut param: libc::sched_param = std::mem::zeroed();
            if libc::sched_getparam(0, &mut param) != 0 {
                return None;
            }
            let rt = libc::sched_param {
                sched_priority: PAUSE_PRIORITY,
            };
            if libc::sched_setscheduler(0, libc::SCHED_FIFO, &rt) != 0 {
                return None;
            }
            Some(Boost { policy, param })
        }
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        // SAFETY: restores the calling thread's own policy saved in `raise`; a Boost
        // never leaves the thread that made it (ThreadSet is used by one thread).
        unsafe {
            libc::sched_setscheduler(0, self.policy, &self.param);
        }
    }
}
