//! Keeps the target's CPUs from halting while its threads are stopped.
//!
//! On a VM, an idle vCPU halts, and waking it to run a thread the tracer has just
//! resumed costs the host a reschedule. Two ways to prevent that, the first preferred:
//!
//! - [`IdlePoll`]: a PM QoS CPU-latency request of 0 µs on `/dev/cpu_dma_latency`,
//!   held only during each pause. While it is held, the kernel's idle loop polls
//!   instead of halting, so a CPU whose thread stopped stays in the idle task (same
//!   address space, no switch), and the resume needs no wake-up interrupt: the polling
//!   CPU sees the thread runnable at once. The request is dropped at the end of the
//!   pause, and by the kernel when livecare exits, however it exits. 1 busy thread,
//!   alternating runs on this 2-vCPU VM: the pause the thread saw went from 70–81 µs
//!   to 46–50 µs, and from the tool's resume to the thread running again from 12–14 µs
//!   to 4 µs.
//! - [`CpuWarmers`], when the device cannot be opened (not root, no such device): one
//!   spinner thread per CPU that the target's threads last ran on (the tracer's own
//!   CPU excluded) is pinned there at `SCHED_IDLE`, the lowest policy. It sleeps until a
//!   pause is armed. Then it is runnable, but it only gets the CPU when nothing else
//!   wants it: from the moment the target thread there stops until it is resumed, which
//!   preempts the spinner at once. It goes back to sleep when the pause ends. It never
//!   touches the target. It blocks every signal (none aimed at livecare may wait for
//!   it), and on drop it is raised above everything so that it exits at once: a
//!   `SCHED_IDLE` thread on a CPU that busy threads hold may not run for seconds, and
//!   livecare's exit waited 1.7 s for one. A C program stopping a busy thread
//!   (`scripts/observed-floor/`) measured 41–46 µs from its resume to the thread
//!   running again, against 17 µs with a spinner.
//!
//! `LIVECARE_NO_IDLE_POLL=1` turns the first off, `LIVECARE_NO_WARM_CPUS=1` both, to
//! compare.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Pid;

/// How the CPUs are kept from halting during a pause.
pub(crate) enum Warmth {
    /// Idle CPUs poll (a PM QoS request).
    Poll(IdlePoll),
    /// Spinner threads occupy the CPUs.
    Spin(CpuWarmers),
}

impl Warmth {
    /// The best way available for `pid`, `None` when turned off or there is nothing to
    /// keep busy. Spinners only if `spinners` and for a process of `threads` == 1 (see
    /// `ThreadSet::keep_cpus_warm`).
    pub(crate) fn start(pid: Pid, threads: usize, spinners: bool) -> Option<Warmth> {
        if std::env::var_os("LIVECARE_NO_WARM_CPUS").is_some() {
            return None;
        }
        if let Some(p) = IdlePoll::open() {
            return Some(Warmth::Poll(p));
        }
        if !spinners || threads != 1 {
            return None;
        }
        CpuWarmers::start(pid).map(Warmth::Spin)
    }

    /// Call before the first INTERRUPT of a pause.
    pub(crate) fn arm(&mut self) {
        match self {
            Warmth::Poll(p) => p.hold(),
            Warmth::Spin(s) => s.arm(),
        }
    }

    /// The pause is over.
    pub(crate) fn disarm(&mut self) {
        match self {
            Warmth::Poll(p) => p.release(),
            Warmth::Spin(s) => s.disarm(),
        }
    }
}

/// An open PM QoS CPU-latency request (`/dev/cpu_dma_latency`), idle (no constraint)
/// until [`IdlePoll::hold`]; the kernel drops it when the file is closed.
pub(crate) struct IdlePoll {
    dev: File,
}

impl IdlePoll {
    /// Opens the request; `None` if the device is missing or refused, or
    /// `LIVECARE_NO_IDLE_POLL` is set.
    fn open() -> Option<IdlePoll> {
        if std::env::var_os("LIVECARE_NO_IDLE_POLL").is_some() {
            return None;
        }
        let dev = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/cpu_dma_latency")
            .ok()?;
        Some(IdlePoll { dev })
    }

    /// Asks for a wake-up latency of 0 µs: idle CPUs poll from now on.
    fn hold(&mut self) {
        // A 4-byte write is taken as a binary s32 (µs).
        let _ = self.dev.write(&0i32.to_ne_bytes());
    }

    /// Back to no constraint (-1 is the kernel's "default value").
    fn release(&mut self) {
        let _ = self.dev.write(&(-1i32).to_ne_bytes());
    }
}

/// At most this many CPUs are kept busy.
const MAX_WARMERS: usize = 8;
/// How many of the target's threads are asked where they last ran.
const MAX_TASKS_LOOKED_AT: usize = 64;
/// A spinner never spins longer than this in one pause, whatever happens to the tracer.
const MAX_SPIN: Duration = Duration::from_millis(200);

/// State shared with the spinner threads.
#[derive(Default)]
struct Shared {
    armed: AtomicBool,
    quit: AtomicBool,
}

/// The spinners of one traced process; told to exit on drop.
pub(crate) struct CpuWarmers {
    shared: Arc<Shared>,
    threads: Vec<(JoinHandle<()>, Arc<AtomicI32>)>,
}

impl CpuWarmers {
    /// Starts sleeping spinners for the CPUs `pid`'s threads last ran on, but ours;
    /// `None` when there is none to keep busy.
    fn start(pid: Pid) -> Option<CpuWarmers> {
        // SAFETY: sched_getcpu has no preconditions.
        let ours = unsafe { libc::sched_getcpu() };
        let mut cpus: Vec<i32> = Vec::new();
        for tid in pid.tasks().ok()?.into_iter().take(MAX_TASKS_LOOKED_AT) {
            if let Some(cpu) = last_cpu(pid, tid.0) {
                if cpu != ours && !cpus.contains(&cpu) && cpus.len() < MAX_WARMERS {
                    cpus.push(cpu);
                }
            }
        }
        if cpus.is_empty() {
            return None;
        }
        let shared = Arc::new(Shared::default());
        let threads = cpus
            .into_iter()
            .filter_map(|cpu| {
                let s = shared.clone();
                let tid = Arc::new(AtomicI32::new(0));
                let t = tid.clone();
                std::thread::Builder::new()
                    .name(format!("warm-cpu{cpu}"))
                    .spawn(move || spin(&s, cpu, &t))
                    .ok()
                    .map(|h| (h, tid))
            })
            .collect();
        Some(CpuWarmers { shared, threads })
    }

    /// Makes the spinners runnable: call before the first INTERRUPT of a pause.
    fn arm(&self) {
        if self.shared.quit.load(Ordering::Acquire) {
            return;
        }
        self.shared.armed.store(true, Ordering::Release);
        for (t, _) in &self.threads {
            t.thread().unpark();
        }
    }

    /// Lets the spinners sleep again: the pause is over.
    fn disarm(&self) {
        self.shared.armed.store(false, Ordering::Release);
    }
}

impl Drop for CpuWarmers {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::Release);
        self.shared.armed.store(false, Ordering::Release);
        // A SCHED_IDLE thread on a CPU that busy threads keep to themselves may not
        // run for seconds, and the process cannot finish exiting until it has (seen
        // here: livecare's exit took 1.7 s). So each spinner is first raised above
        // them (FIFO, or back to normal if that is refused) to run its last few
        // instructions at once. Not joined: nothing waits for it.
        for (t, tid) in self.threads.drain(..) {
            let tid = tid.load(Ordering::Acquire);
            if tid > 0 {
                // SAFETY: sched_setscheduler on one of our own threads, by its tid, with
                // sched_param values we own.
                unsafe {
                    let fifo = libc::sched_param { sched_priority: 1 };
                    if libc::sched_setscheduler(tid, libc::SCHED_FIFO, &fifo) != 0 {
                        let other = libc::sched_param { sched_priority: 0 };
                        libc::sched_setscheduler(tid, libc::SCHED_OTHER, &other);
                    }
                }
            }
            t.thread().unpark();
        }
    }
}

/// The body of one spinner, pinned to `cpu`; publishes its tid in `tid`.
fn spin(s: &Shared, cpu: i32, tid: &AtomicI32) {
    // SAFETY: gettid has no preconditions; a zeroed sigset_t, cpu_set_t and
    // sched_param are valid values, and every call acts on the calling thread with
    // structs it owns. Every signal is blocked, so none aimed at livecare waits for
    // this thread to be scheduled; then the lowest policy, so that it never competes
    // with anything on the CPU it moves to.
    unsafe {
        tid.store(libc::gettid(), Ordering::Release);
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
        let idle = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) != 0 {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return;
        }
    }
    while !s.quit.load(Ordering::Acquire) {
        if !s.armed.load(Ordering::Acquire) {
            std::thread::park();
            continue;
        }
        let until = Instant::now() + MAX_SPIN;
        while s.armed.load(Ordering::Acquire) && Instant::now() < until {
            std::hint::spin_loop();
        }
        if s.armed.load(Ordering::Acquire) {
            // The pause outlived MAX_SPIN: sleep until the next one.
            std::thread::park();
        }
    }
}

/// The CPU a thread last ran on (field 39 of `/proc/PID/task/TID/stat`).
fn last_cpu(pid: Pid, tid: i32) -> Option<i32> {
    let stat =
        crate::maps::read_proc_file(&format!("/proc/{}/task/{tid}/stat", pid.0), 1024).ok()?;
    let after = stat.iter().rposition(|&b| b == b')')?;
    // Fields after the command name start at field 3 (state).
    std::str::from_utf8(stat.get(after + 2..)?)
        .ok()?
        .split_whitespace()
        .nth(39 - 3)?
        .parse()
        .ok()
}
