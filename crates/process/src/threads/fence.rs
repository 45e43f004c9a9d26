//! Fencing idle threads: a thread blocked in a syscall need not be stopped by the
//! commit if it cannot return to user code unseen.
//!
//! Interrupting a thread that sleeps in the kernel wakes it, gets it a CPU to reach its
//! stop, and wakes it again on resume: with 64 blocked threads that was most of the
//! commit's pause on this VM (each INTERRUPT of a blocked thread about 4–8 µs, each
//! resume as much, plus the wake-ups). A fenced thread is one we resumed with
//! PTRACE_SYSCALL from its syscall-entry stop: the kernel then reports a syscall-exit
//! stop before it runs a single user instruction after that syscall (exit tracing
//! comes before signal delivery and syscall restart on the way out). Until we see that
//! stop, its user registers are the ones read at the entry stop and it runs nothing in
//! user space, so the commit can judge its stack and write around it without stopping
//! it; if it does wake meanwhile, it waits at the exit stop like any stopped thread.
//! (Its frames are taken to be its own: another thread rewriting a blocked thread's
//! saved return addresses would defeat this, as it would any unwinder.) With 64
//! threads, 63 of them blocked in `read()`, the tool's pause went from 1.9–2.0 ms to
//! 0.10–0.12 ms.
//!
//! Only threads that did not run at all since [`ThreadSet::note_idle`] (their
//! `schedstat` run time and switch count unchanged) are fenced: each fence costs the
//! thread two wake-ups, and a thread that wakes often (a 1 ms timer) would meet its
//! exit stop before the commit anyway. Fenced threads left in their syscall after the
//! commit stay traced by the calling OS thread; the kernel detaches them, without
//! waking them, when that thread exits (see [`ThreadSet::detach_all`]).

use std::time::{Duration, Instant};

use super::{errno, ptrace, waitpid, ThreadSet};
use crate::arch::Regs;
use crate::{Error, Pid, Tid};

/// How long [`ThreadSet::fence_idle`] waits for its candidates' stops. A candidate that
/// has not reached its syscall-entry stop by then is simply left to the commit, which
/// interrupts it like any running thread.
const FENCE_WAIT: Duration = Duration::from_millis(20);

/// How long a candidate resumed towards its next syscall is waited for in any case: a
/// blocked thread restarting its syscall gets there within µs of CPU time. After that
/// it is waited for only while it has had less than [`REENTRY_CPU`] of CPU since: on a
/// busy machine it may not have run yet, while a thread that returned to user code
/// runs on (and is left to the commit).
const REENTRY_WAIT: Duration = Duration::from_millis(1);
const REENTRY_CPU: u64 = 200_000;

/// Other stops (signals) a candidate may meet on its way before it is left to the commit.
const MAX_STOPS: u8 = 4;

/// True for the report of a group-stop of a seized tracee (PTRACE_EVENT_STOP with the
/// stopping signal; an INTERRUPT's stop carries SIGTRAP).
fn is_group_stop(status: i32) -> bool {
    libc::WIFSTOPPED(status)
        && status >> 16 == libc::PTRACE_EVENT_STOP
        && matches!(
            libc::WSTOPSIG(status),
            libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
        )
}

/// `PTRACE_GET_SYSCALL_INFO` (Linux 5.3), and its `op` for a syscall-entry stop.
const PTRACE_GET_SYSCALL_INFO: libc::c_uint = 0x420e;
const SYSCALL_INFO_ENTRY: u8 = 1;

/// How much a thread has run: `schedstat`'s time on CPU (ns) and number of times it
/// was switched in. Unchanged between two readings: the thread did not run between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RunCount(u64, u64);

/// Reads `/proc/PID/task/TID/schedstat` ("run_ns wait_ns switches").
fn run_count(pid: Pid, tid: Tid) -> Option<RunCount> {
    let raw = crate::maps::read_proc_file(&format!("/proc/{}/task/{}/schedstat", pid.0, tid.0), 64)
        .ok()?;
    let text = std::str::from_utf8(&raw).ok()?;
    let mut f = text.split_whitespace().map(|w| w.parse::<u64>().ok());
    let run = f.next()??;
    let switches = f.nth(1)??;
    Some(RunCount(run, switches))
}

/// Where a candidate is in being fenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// INTERRUPT sent, its stop not seen yet.
    Interrupting,
    /// Resumed with PTRACE_SYSCALL at `since`, running towards its (re-)entry stop;
    /// `ran`: how much it had run when first found still on its way after
    /// [`REENTRY_WAIT`]; `stops` counts the stops met since it became a candidate.
    ToEntry {
        stops: u8,
        since: Instant,
        ran: Option<RunCount>,
    },
    /// Inside its syscall with the exit stop armed.
    Fenced,
    /// Given up on: a plain thread for the commit.
    Plain,
}

impl ThreadSet {
    /// Notes how much every held thread has run so far, for [`Self::fence_idle`].
    pub fn note_idle(&mut self) {
        let pid = self.pid;
        for (tid, st) in self.threads.iter_mut() {
            st.runs = run_count(pid, *tid);
        }
    }

    /// Fences every held thread that has not run since [`Self::note_idle`]: stops it,
    /// lets it re-enter its syscall under PTRACE_SYSCALL, and keeps the registers of
    /// that entry stop. Threads an earlier [`Self::detach_all`] left fenced are taken
    /// back as they are. The next [`Self::interrupt_all`] counts fenced threads as held
    /// without interrupting them. Returns how many are fenced now. Nobody else is
    /// stopped here, and each candidate only for the few µs between its stops.
    pub fn fence_idle(&mut self) -> Result<usize, Error> {
        for (tid, regs) in std::mem::take(&mut self.left) {
            // Still in its syscall, or stopped at its exit with the report pending (the
            // next wait takes it as a stop): fenced either way.
            self.threads.insert(
                tid,
                super::ThreadState {
                    fenced: Some(regs),
                    ..Default::default()
                },
            );
        }
        let pid = self.pid;
        let mut steps: std::collections::BTreeMap<Tid, Step> = self
            .threads
            .iter()
            .filter(|(tid, st)| {
                !st.stopped
                    && st.fenced.is_none()
                    && st.runs.is_some()
                    && st.runs == run_count(pid, **tid)
            })
            .map(|(tid, _)| (*tid, Step::Interrupting))
            .collect();
        if steps.is_empty() {
            return Ok(self.fenced_count());
        }
        // All INTERRUPTs first: the candidates reach their stops in parallel.
        steps.retain(|tid, _| {
            // INTERRUPT on a seized thread: it stops at its next return towards user
            // space (a blocked syscall is broken off, to be restarted).
            ptrace(libc::PTRACE_INTERRUPT, *tid, 0, 0) == 0 || errno() != libc::ESRCH
        });
        let deadline = Instant::now() + FENCE_WAIT;
        // Waited for: stops still to come, and re-entries still to come (see
        // `REENTRY_WAIT`; a thread that runs user code for longer is left to the commit).
        let unresolved = |steps: &mut std::collections::BTreeMap<Tid, Step>| {
            let mut any = false;
            for (tid, s) in steps.iter_mut() {
                any |= match s {
                    Step::Interrupting => true,
                    Step::ToEntry { since, .. } if since.elapsed() < REENTRY_WAIT => true,
                    Step::ToEntry { ran, .. } => match (*ran, run_count(pid, *tid)) {
                        (Some(before), Some(now)) => now.0.saturating_sub(before.0) < REENTRY_CPU,
                        (None, now) => {
                            *ran = now;
                            now.is_some()
                        }
                        (Some(_), None) => false,
                    },
                    _ => false,
                };
            }
            any
        };
        while unresolved(&mut steps) && Instant::now() < deadline {
            let Some((tid, status)) = waitpid(-1, libc::WNOHANG)? else {
                std::thread::sleep(Duration::from_micros(20));
                continue;
            };
            if !self.note_status(tid, status) {
                steps.remove(&tid);
                continue;
            }
            let step = steps.get(&tid).copied();
            let next = match step {
                // A group-stop (the process was stopped by SIGSTOP and friends): the
                // thread stays stopped, as it would untraced; not ours to run it.
                _ if is_group_stop(status) => Step::Plain,
                // Not a candidate (a signal or a clone event of a running thread, a new
                // thread's first stop), a fenced one that woke (it has work to do: not
                // held up again), or one that met too many other stops on its way: let
                // it run on, as a plain thread. (Fencing periodic sleepers again at
                // each wake-up was tried: with 64 threads waking every 1 ms it held
                // them up for tens of ms.)
                None | Some(Step::Plain) | Some(Step::Fenced) => {
                    self.resume(tid)?;
                    Step::Plain
                }
                Some(Step::ToEntry { stops, .. }) if stops >= MAX_STOPS => {
                    self.resume(tid)?;
                    Step::Plain
                }
                Some(Step::Interrupting) => self.rearm(tid, 0)?,
                Some(Step::ToEntry { stops, .. }) => {
                    if self.at_syscall_entry(tid, status) {
                        self.fence(tid)?
                    } else {
                        self.rearm(tid, stops + 1)?
                    }
                }
            };
            if step.is_some() {
                steps.insert(tid, next);
            }
        }
        // Candidates still on their way are left as they are: a pending INTERRUPT, or
        // PTRACE_SYSCALL armed until their next syscall; the commit interrupts and
        // waits for them like any running thread, and DETACH or CONT disarms it.
        let fenced = steps.values().filter(|s| matches!(s, Step::Fenced)).count();
        tracing::debug!(candidates = steps.len(), fenced, "fenced idle threads");
        Ok(self.fenced_count())
    }

    /// Resumes stopped `tid` with PTRACE_SYSCALL towards its next syscall-entry stop,
    /// delivering a signal that arrived meanwhile.
    fn rearm(&mut self, tid: Tid, stops: u8) -> Result<Step, Error> {
        let Some(st) = self.threads.get_mut(&tid) else {
            return Ok(Step::Plain);
        };
        // A signal of this very stop is delivered by the SYSCALL below; others (or a
        // group stop) are left to a plain resume, and the thread to the commit.
        let sig = match (st.at, st.pending.as_slice()) {
            (super::Stop::Signal(s), [(sig, _)]) if s == *sig => s,
            (super::Stop::Group, _) => return Ok(Step::Plain),
            (_, []) => 0,
            _ => {
                self.resume(tid)?;
                return Ok(Step::Plain);
            }
        };
        st.pending.clear();
        // SYSCALL from any ptrace-stop: the thread runs to its next syscall entry (a
        // syscall broken off by our INTERRUPT is restarted through user space, so it
        // comes back through an entry stop).
        if ptrace(libc::PTRACE_SYSCALL, tid, 0, sig as u64) < 0 {
            if errno() == libc::ESRCH {
                self.threads.remove(&tid);
                return Ok(Step::Plain);
            }
            return Err(Error::ptrace("SYSCALL", tid));
        }
        st.stopped = false;
        self.regs_cache.get_mut().remove(&tid);
        Ok(Step::ToEntry {
            stops,
            since: Instant::now(),
            ran: None,
        })
    }

    /// True if `tid`'s stop (`status`) is a syscall-entry stop.
    fn at_syscall_entry(&self, tid: Tid, status: i32) -> bool {
        // TRACESYSGOOD marks syscall stops; entry and exit are told apart by the kernel.
        if !(libc::WIFSTOPPED(status)
            && status >> 16 == 0
            && libc::WSTOPSIG(status) == libc::SIGTRAP | 0x80)
        {
            return false;
        }
        // struct ptrace_syscall_info begins with its u8 `op`; the rest is not needed.
        let mut info = [0u8; 88];
        let n = ptrace(
            PTRACE_GET_SYSCALL_INFO,
            tid,
            info.len() as u64,
            info.as_mut_ptr() as u64,
        );
        n > 0 && info[0] == SYSCALL_INFO_ENTRY
    }

    /// Fences `tid`, stopped at a syscall-entry stop: keeps its registers and lets it
    /// into the syscall with the exit stop armed.
    fn fence(&mut self, tid: Tid) -> Result<Step, Error> {
        let regs: Regs = match self.read_regs(tid) {
            Ok(r) => r,
            Err(_) => {
                self.resume(tid)?;
                return Ok(Step::Plain);
            }
        };
        // SYSCALL again: the thread enters the syscall and, when it returns, stops at
        // the exit before any user instruction.
        if ptrace(libc::PTRACE_SYSCALL, tid, 0, 0) < 0 {
            if errno() == libc::ESRCH {
                self.threads.remove(&tid);
                return Ok(Step::Plain);
            }
            return Err(Error::ptrace("SYSCALL", tid));
        }
        if let Some(st) = self.threads.get_mut(&tid) {
            st.stopped = false;
            st.fenced = Some(regs);
        }
        self.regs_cache.get_mut().remove(&tid);
        Ok(Step::Fenced)
    }

    /// True if `tid` is fenced: inside a syscall, unable to run user code unseen.
    pub fn is_fenced(&self, tid: Tid) -> bool {
        self.threads.get(&tid).is_some_and(|t| t.fenced.is_some())
    }

    /// True if `tid` is stopped or fenced: its user state cannot change until we let it.
    pub fn is_held(&self, tid: Tid) -> bool {
        self.threads
            .get(&tid)
            .is_some_and(|t| t.stopped || t.fenced.is_some())
    }

    /// Number of threads fenced now.
    pub fn fenced_count(&self) -> usize {
        self.threads.values().filter(|t| t.fenced.is_some()).count()
    }
}

impl ThreadSet {
    /// Sleeps for `d` while the threads run, letting go at once any thread that stops
    /// meanwhile: a fenced thread whose syscall returned, a signal, a clone event.
    /// Used between commit attempts, when nothing is to be held.
    pub fn idle(&mut self, d: Duration) -> Result<(), Error> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            match waitpid(-1, libc::WNOHANG) {
                Ok(Some((tid, status))) => {
                    if self.note_status(tid, status) {
                        self.resume(tid)?;
                    }
                }
                Ok(None) => std::thread::sleep(Duration::from_micros(50)),
                // No tracee reports: nothing can stop; sleep out the rest.
                Err(_) => std::thread::sleep(until.saturating_duration_since(Instant::now())),
            }
        }
        Ok(())
    }
}
