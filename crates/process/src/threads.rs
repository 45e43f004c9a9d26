//! The thread set of a traced process: seize, interrupt, resume, detach, remote syscalls.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::arch::{Native, ProcessArch, Regs};
use crate::{read_maps, Error, Pid, RemoteMemory, Tid};

mod fence;

/// How long [`ThreadSet::release_others`] waits for new threads' first stops: a new
/// thread reports within µs of its first run; one that has not run by then is let go
/// by our next wait for stops.
const BORN_WAIT: Duration = Duration::from_millis(200);
/// How long we wait for threads to report a stop before giving up.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a wait for stops polls before it blocks.
const STOP_SPIN: Duration = Duration::from_micros(30);

/// Why a task could not be seized, as /proc tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskStatus {
    /// Already ours (a clone of a traced thread).
    TracedByUs,
    /// A zombie or dead task.
    Exiting,
    /// Anything else (traced by someone else, permissions).
    Other,
}

/// The kind of ptrace-stop a thread was last seen in (see [`Stop::of`]).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
enum Stop {
    /// No stop seen yet (a thread seized, or born, and not reported since).
    #[default]
    Unknown,
    /// PTRACE_EVENT_STOP with SIGTRAP: our INTERRUPT (or a new thread's first stop),
    /// taken on the way back to user space: the only stop a thread is borrowed at.
    Interrupt,
    /// PTRACE_EVENT_STOP with a stopping signal: the process is stopped (job control).
    Group,
    /// Another PTRACE_EVENT_* stop (a clone event: inside the `clone` syscall).
    Event,
    /// A syscall-entry or -exit stop (PTRACE_SYSCALL).
    Syscall,
    /// A signal-delivery stop for this signal.
    Signal(i32),
}

impl Stop {
    /// Classifies the wait status of a stopped thread.
    fn of(status: i32) -> Stop {
        let sig = libc::WSTOPSIG(status);
        match status >> 16 {
            0 if sig == libc::SIGTRAP | 0x80 => Stop::Syscall,
            0 => Stop::Signal(sig),
            libc::PTRACE_EVENT_STOP if sig == libc::SIGTRAP => Stop::Interrupt,
            libc::PTRACE_EVENT_STOP => Stop::Group,
            _ => Stop::Event,
        }
    }
}

#[derive(Clone, Default)]
struct ThreadState {
    stopped: bool,
    /// The stop it is (or was last) in.
    at: Stop,
    /// Signals that arrived while we held the thread, each with the siginfo its
    /// signal-delivery stop had; delivered on resume (see [`ThreadSet::resume`]).
    pending: Vec<(i32, Option<libc::siginfo_t>)>,
    /// Fenced (see `fence.rs`): inside a syscall with its exit stop armed, with the
    /// registers of its entry stop.
    fenced: Option<Regs>,
    /// How much it had run when [`ThreadSet::note_idle`] looked.
    runs: Option<fence::RunCount>,
}

impl ThreadState {
    /// Free to run user code: neither stopped nor fenced.
    fn running(&self) -> bool {
        !self.stopped && self.fenced.is_none()
    }
}

/// Pause measurement: first thread stopped → last thread resumed. When the tracer
/// interrupts the threads itself, the pause is counted from its first INTERRUPT: no
/// thread stops before that, and with many threads the first stops happen while the
/// later INTERRUPTs are still being sent, before any is seen (64 sleeping threads:
/// about 450 µs of INTERRUPTs before the first wait).
#[derive(Debug, Default, Clone, Copy)]
pub struct StopWatch {
    started: Option<(Instant, u64)>,
    /// The last complete pause.
    pub last: Option<Duration>,
    /// When the last complete pause began and ended, in `CLOCK_MONOTONIC` ns (the
    /// clock every process shares: a target can match it against its own readings).
    pub last_window_ns: Option<[u64; 2]>,
    /// Threads held fenced, not stopped, in the last pause (see `fence.rs`).
    pub last_fenced: usize,
    /// What the pauses are for, as [`crate::stops`] notes them (`commit`, `reclaim`).
    pub label: &'static str,
}

/// `CLOCK_MONOTONIC` now, in ns.
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own (a vDSO call, no syscall).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Every thread of one process, seized with ptrace. Dropping it detaches them all,
/// except fenced threads still inside their syscall ([`ThreadSet::fence_idle`]): those
/// stay traced by the calling OS thread until it exits, when the kernel detaches them
/// without waking them. After [`ThreadSet::detach_all`] it holds none;
/// [`ThreadSet::interrupt_all`] and [`ThreadSet::stop_one`] seize again when needed.
pub struct ThreadSet {
    pid: Pid,
    threads: BTreeMap<Tid, ThreadState>,
    /// Fenced threads left in their syscall by [`ThreadSet::detach_all`], still ours,
    /// with their fenced registers; [`ThreadSet::fence_idle`] takes them back.
    left: BTreeMap<Tid, Regs>,
    /// `/proc/PID/task`, open: its link count is the number of threads now, and an
    /// `fstat` of it costs about 0.5 µs against 1.8 µs for a `stat` of the path (the
    /// count is taken inside every pause).
    task_dir: Option<std::fs::File>,
    syscall_pc: Option<u64>,
    /// Pause timing of the last interrupt/resume cycle.
    pub watch: StopWatch,
    /// Real-time priority held while threads are stopped (see [`crate::priority`]).
    boost: Option<crate::priority::Boost>,
    /// How the target's CPUs are kept from halting during a pause (idle polling or
    /// spinners; see `warm.rs`).
    warm: Option<crate::warm::Warmth>,
    /// Registers of stopped threads as last read (each thread's are read once per
    /// stop); dropped whenever the thread runs or its registers are written.
    regs_cache: RefCell<BTreeMap<Tid, Regs>>,
    /// Seized (PTRACE_SEIZE), not a PTRACE_TRACEME child: there a SIGSTOP
    /// signal-delivery stop is a real SIGSTOP, not the first stop of a new thread.
    seized: bool,
    /// Threads a clone event announced whose first stop has not been seen yet.
    born: Vec<Tid>,
}

/// How long [`wait_one`] polls before it sleeps.
const HANDOFF_SPIN: Duration = Duration::from_micros(300);

/// Waits for the next status of `tid`, which is running towards a stop expected within
/// microseconds; None if `deadline` passes first. It polls for [`HANDOFF_SPIN`] before
/// blocking: on this VM a tracer asleep in `waitpid` took 265–477 µs (median) to be
/// woken by a stop, against 31–34 µs when polling (PTRACE_SYSCALL ping-pong with a
/// C program). The tracer is not boosted here, so a thread that needs this CPU still
/// gets it from the scheduler.
fn wait_one(tid: Tid, deadline: Instant) -> Result<Option<i32>, Error> {
    let spin_until = Instant::now() + HANDOFF_SPIN;
    while Instant::now() < spin_until {
        if let Some((_, status)) = waitpid(tid.0, libc::WNOHANG)? {
            return Ok(Some(status));
        }
        std::hint::spin_loop();
    }
    // Then block, woken every millisecond to notice the deadline.
    let timer = crate::wake::WakeTimer::every(Duration::from_millis(1));
    let flags = if timer.is_some() { 0 } else { libc::WNOHANG };
    loop {
        match waitpid(tid.0, flags) {
            Ok(Some((_, status))) => return Ok(Some(status)),
            Ok(None) | Err(Error::Wait(_)) if Instant::now() > deadline => return Ok(None),
            Ok(None) => std::thread::sleep(Duration::from_micros(20)),
            Err(Error::Wait(e)) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Options of every tracee: threads it creates are traced from their first instruction
/// (TRACECLONE), and syscall stops are told apart from SIGTRAPs (TRACESYSGOOD).
const SEIZE_OPTIONS: u64 = (libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACESYSGOOD) as u64;

fn waitpid(tid: i32, flags: i32) -> Result<Option<(Tid, i32)>, Error> {
    let mut status = 0;
    // __WNOTHREAD: only this thread's tracees, so two tracers in one process (tests,
    // parallel `-p all`) never take each other's stops.
    // SAFETY: plain syscall wrapper writing into a local int.
    let r = unsafe { libc::waitpid(tid, &mut status, flags | libc::__WALL | libc::__WNOTHREAD) };
    if r < 0 {
        return Err(Error::Wait(std::io::Error::last_os_error()));
    }
    if r == 0 {
        return Ok(None);
    }
    Ok(Some((Tid(r), status)))
}

fn ptrace(req: libc::c_uint, tid: Tid, addr: u64, data: u64) -> i64 {
    // SAFETY: requests used here take integers or pointers to locals owned by the caller.
    unsafe {
        libc::ptrace(
            req,
            tid.0,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    }
}

/// True if `pid` is stopped by job control (SIGSTOP, SIGTSTP and the like): its first
/// live thread (main, unless it exited) is in state `T`. A group stop stops them all,
/// so one is enough (a thousand threads would cost a thousand reads).
fn job_stopped(pid: Pid) -> bool {
    let live_state = |t: Tid| pid.task_state(t).filter(|c| !matches!(c, 'Z' | 'X'));
    // Main first: listing the tasks costs more.
    live_state(Tid(pid.0)).or_else(|| pid.tasks().ok()?.into_iter().find_map(live_state))
        == Some('T')
}

/// `PTRACE_GET_SYSCALL_INFO` (Linux 5.3) and the `op` values of its answer.
const PTRACE_GET_SYSCALL_INFO: libc::c_uint = 0x420e;
const SYSCALL_INFO_ENTRY: u8 = 1;
const SYSCALL_INFO_EXIT: u8 = 2;

/// Whether `tid`, at a syscall stop, is at the syscall's entry or exit
/// ([`SYSCALL_INFO_ENTRY`] or [`SYSCALL_INFO_EXIT`]); None if the kernel cannot say.
fn syscall_op(tid: Tid) -> Option<u8> {
    // struct ptrace_syscall_info begins with its u8 `op`; the rest is not needed.
    let mut info = [0u8; 88];
    // GET_SYSCALL_INFO writes at most `addr` bytes to the buffer we own.
    let n = ptrace(
        PTRACE_GET_SYSCALL_INFO,
        tid,
        info.len() as u64,
        info.as_mut_ptr() as u64,
    );
    (n > 0).then_some(info[0])
}

/// The signals `tid` blocks now (PTRACE_GETSIGMASK; 0 if it cannot be read).
fn blocked_signals(tid: Tid) -> u64 {
    const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
    let mut mask = 0u64;
    // GETSIGMASK writes the 8-byte kernel sigset of a stopped tracee to our local.
    if ptrace(PTRACE_GETSIGMASK, tid, 8, &mut mask as *mut u64 as u64) < 0 {
        return 0;
    }
    mask
}

/// Queues signal `sig` to thread `tid` of `pid`.
fn tgkill(pid: Pid, tid: Tid, sig: i32) {
    // SAFETY: a plain syscall with integer arguments.
    unsafe { libc::syscall(libc::SYS_tgkill, pid.0, tid.0, sig) };
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl ThreadSet {
    /// Seizes every thread of `pid` (re-scanning `/proc/PID/task` until stable). The
    /// threads keep running; new threads they create are traced too.
    pub fn seize(pid: Pid) -> Result<ThreadSet, Error> {
        if pid.0 <= 0 || !std::path::Path::new(&format!("/proc/{}", pid.0)).exists() {
            return Err(Error::NoSuchProcess(pid));
        }
        if pid.is_kernel_thread() {
            return Err(Error::KernelThread(pid));
        }
        if pid.0 as u32 == std::process::id() {
            return Err(Error::Parse {
                path: format!("/proc/{pid}"),
                what: "cannot trace ourselves".into(),
            });
        }
        // Our short polling sleeps (20–50 µs) would otherwise last the default 50 µs
        // timer slack longer. SAFETY: prctl with integer arguments on the calling thread.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0);
        }
        let mut set = ThreadSet {
            pid,
            threads: BTreeMap::new(),
            left: Default::default(),
            task_dir: std::fs::File::open(format!("/proc/{}/task", pid.0)).ok(),
            syscall_pc: None,
            watch: StopWatch::default(),
            boost: None,
            warm: None,
            regs_cache: RefCell::default(),
            seized: true,
            born: Vec::new(),
        };
        set.seize_new_tasks()?;
        if set.threads.is_empty() {
            return Err(Error::NoSuchProcess(pid));
        }
        Ok(set)
    }

    /// Fails with [`Error::ProcessStopped`] if `pid` is stopped by job control: a
    /// change that needs remote syscalls (its threads would have to run) is refused
    /// before anything is touched. (A set can hold a stopped process: its threads stay
    /// in their group-stop, see [`Self::resume`].)
    pub fn refuse_stopped(pid: Pid) -> Result<(), Error> {
        if job_stopped(pid) {
            return Err(Error::ProcessStopped(pid));
        }
        Ok(())
    }

    /// Takes over a single-threaded process we already trace (PTRACE_TRACEME child)
    /// that is in a ptrace-stop now.
    pub fn adopt_stopped(pid: Pid) -> Result<ThreadSet, Error> {
        let tid = Tid(pid.0);
        // SETOPTIONS on a stopped tracee: threads it creates from now on are ours too.
        if ptrace(libc::PTRACE_SETOPTIONS, tid, 0, SEIZE_OPTIONS) < 0 {
            return Err(Error::ptrace("SETOPTIONS", tid));
        }
        let mut threads = BTreeMap::new();
        threads.insert(
            tid,
            ThreadState {
                stopped: true,
                // The SIGTRAP of the breakpoint at its entry (see `launch`).
                at: Stop::Signal(libc::SIGTRAP),
                ..Default::default()
            },
        );
        Ok(ThreadSet {
            pid,
            threads,
            left: Default::default(),
            task_dir: std::fs::File::open(format!("/proc/{}/task", pid.0)).ok(),
            syscall_pc: None,
            watch: StopWatch::default(),
            boost: None,
            warm: None,
            regs_cache: RefCell::default(),
            seized: false,
            born: Vec::new(),
        })
    }

    /// Seizes tasks listed in /proc that we do not hold yet; returns how many.
    fn seize_new_tasks(&mut self) -> Result<usize, Error> {
        let mut total = 0;
        loop {
            let mut new = 0;
            for tid in self.pid.tasks()? {
                if self.threads.contains_key(&tid) {
                    continue;
                }
                // SEIZE (not ATTACH) leaves the thread running and lets us INTERRUPT it
                // later; TRACECLONE makes threads it creates ours from their first
                // instruction, so none can run into a breakpoint untraced.
                if ptrace(libc::PTRACE_SEIZE, tid, 0, SEIZE_OPTIONS) < 0 {
                    let err = std::io::Error::last_os_error();
                    match (err.raw_os_error(), self.task_status(tid)) {
                        (Some(libc::ESRCH), _) => continue, // it exited meanwhile
                        // Born from a traced thread: TRACECLONE already made it ours;
                        // its first stop is on its way. Or fenced and left by us.
                        (Some(libc::EPERM), Some(TaskStatus::TracedByUs)) => {
                            self.left.remove(&tid);
                        }
                        // Exiting (zombie) or already gone: nothing left to hold.
                        (Some(libc::EPERM), None | Some(TaskStatus::Exiting)) => continue,
                        _ => {
                            return Err(Error::Ptrace {
                                op: "SEIZE",
                                tid,
                                err,
                            })
                        }
                    }
                }
                self.threads.insert(tid, ThreadState::default());
                new += 1;
            }
            total += new;
            if new == 0 {
                return Ok(total);
            }
        }
    }

    /// Seizes one task of the process: the main thread if it can be seized (it usually
    /// lives as long as the process), else the first other that can.
    fn seize_one(&mut self) -> Result<(), Error> {
        for tid in self.seize_order()? {
            // SEIZE leaves the thread running; TRACECLONE as in `seize_new_tasks`.
            if ptrace(libc::PTRACE_SEIZE, tid, 0, SEIZE_OPTIONS) == 0 {
                self.threads.insert(tid, ThreadState::default());
                return Ok(());
            }
        }
        // Only threads we fenced and left are there: still ours, take one back.
        if let Some((tid, regs)) = self.left.pop_first() {
            self.threads.insert(
                tid,
                ThreadState {
                    fenced: Some(regs),
                    ..Default::default()
                },
            );
            return Ok(());
        }
        Err(Error::NoSuchProcess(self.pid))
    }

    /// The tasks in the order [`Self::seize_one`] tries them: main first (thread ids
    /// wrap, so short-lived threads may have lower ids), then by id.
    fn seize_order(&self) -> Result<Vec<Tid>, Error> {
        let mut tasks = self.pid.tasks()?;
        tasks.sort_by_key(|t| t.0 != self.pid.0);
        Ok(tasks)
    }

    /// The thread [`Self::stop_one`] would take now: one we hold (a stopped one first,
    /// then one not fenced), else the first task it would seize that is alive. The
    /// main thread of a process that called `pthread_exit` from `main` stays a zombie
    /// in `/proc/PID/task` and cannot be seized, so a worker is taken then.
    pub fn next_borrow(&self) -> Option<Tid> {
        let held =
            |f: &dyn Fn(&ThreadState) -> bool| self.threads.iter().find(|t| f(t.1)).map(|t| *t.0);
        if let Some(t) = held(&|s| s.stopped)
            .or_else(|| held(&|s| s.fenced.is_none()))
            .or_else(|| held(&|_| true))
        {
            return Some(t);
        }
        // Main is checked alone first: listing the tasks costs more.
        let main = Tid(self.pid.0);
        if self.pid.task_alive(main) {
            return Some(main);
        }
        let order = self.seize_order().ok()?;
        order.into_iter().find(|&t| self.pid.task_alive(t))
    }

    /// What /proc says of a task we could not seize; `None` when it is gone.
    fn task_status(&self, tid: Tid) -> Option<TaskStatus> {
        let status =
            std::fs::read_to_string(format!("/proc/{}/task/{}/status", self.pid.0, tid.0)).ok()?;
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
                .unwrap_or_default()
        };
        if field("State:").starts_with(['Z', 'X']) {
            return Some(TaskStatus::Exiting);
        }
        // The tracer is this thread (ptrace ties tracees to a thread, not a process).
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() }.to_string();
        Some(if field("TracerPid:") == me {
            TaskStatus::TracedByUs
        } else {
            TaskStatus::Other
        })
    }

    /// Keeps the target's CPUs from halting during each pause from now on (see
    /// `warm.rs`), so its threads run again within microseconds of the resume:
    /// - by making idle CPUs poll (a PM QoS request held during the pause), for any
    ///   target: with 1 busy thread the pause it saw went from 70–81 µs to 46–50 µs,
    ///   and `-p all --jobs 1` from 1.03–1.41 to 0.94–1.15 ms per process (parallel
    ///   jobs: no change beyond the noise);
    /// - else, if `spinners`, by spinner threads, only for a process of one thread
    ///   (pass `false` with parallel jobs). They took the pause of 1 busy thread from
    ///   84–112 µs to 61–101 µs, but with 8 busy threads the tool's pause got longer
    ///   (0.26–0.31 → 1.8–3.3 ms), and with parallel jobs the CPUs are not spare
    ///   (`-p all`: 0.81–0.83 → 0.87–0.89 ms per process).
    pub fn keep_cpus_warm(&mut self, spinners: bool) {
        if self.warm.is_none() {
            self.warm = crate::warm::Warmth::start(self.pid, self.threads.len(), spinners);
        }
    }

    /// Makes, just before a stop, the syscalls that the stop will make, without their
    /// effects: the thread count's `fstat`, a wait that consumes nothing (`WNOWAIT`) and
    /// a register read of a running thread (refused with ESRCH). On this VM a syscall
    /// path that the tracer's CPU has not run lately costs several times its warm cost
    /// (a `statx` 9–11 µs against 3 µs right after the same call; measured in C with
    /// `scripts/ptrace-stop-floor.c`), and inside the stop every µs is pause.
    pub fn rehearse(&self) {
        let _ = self.thread_count();
        // SAFETY: waitid fills a siginfo we own; WNOWAIT leaves any status to be reaped
        // later, and WNOHANG returns at once.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED
                    | libc::WSTOPPED
                    | libc::WNOHANG
                    | libc::WNOWAIT
                    | libc::__WALL
                    | libc::__WNOTHREAD,
            );
        }
        if let Some(tid) = self.threads.iter().find(|t| t.1.running()).map(|t| *t.0) {
            let mut regs = std::mem::MaybeUninit::<libc::user_regs_struct>::uninit();
            // A ptrace request on a running tracee is refused (ESRCH) before touching
            // it: only the syscall path is warmed.
            ptrace(libc::PTRACE_GETREGS, tid, 0, regs.as_mut_ptr() as u64);
        }
    }

    /// Number of threads of the process now (see [`Pid::thread_count`]).
    fn thread_count(&self) -> Option<usize> {
        use std::os::unix::fs::MetadataExt;
        match &self.task_dir {
            // The link count is computed at each fstat: two plus the threads.
            Some(d) => (d.metadata().ok()?.nlink() as usize).checked_sub(2),
            None => self.pid.thread_count(),
        }
    }

    /// The process.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The threads we hold, in tid order.
    pub fn tids(&self) -> Vec<Tid> {
        self.threads.keys().copied().collect()
    }

    /// True if `tid` took signals while held that are still to be delivered.
    pub fn has_pending_signals(&self, tid: Tid) -> bool {
        self.threads
            .get(&tid)
            .is_some_and(|t| !t.pending.is_empty())
    }

    /// True if we hold `tid` and it is stopped.
    pub fn is_stopped(&self, tid: Tid) -> bool {
        self.threads.get(&tid).is_some_and(|t| t.stopped)
    }

    /// Records a wait status for `tid`; returns false if the thread is gone.
    fn note_status(&mut self, tid: Tid, status: i32) -> bool {
        // Whatever happened, the thread ran since its registers were cached.
        self.regs_cache.get_mut().remove(&tid);
        self.born.retain(|&t| t != tid);
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            self.threads.remove(&tid);
            return false;
        }
        if !libc::WIFSTOPPED(status) {
            return true;
        }
        if self.watch.started.is_none() {
            self.watch.started = Some((Instant::now(), monotonic_ns()));
        }
        let event = status >> 16;
        self.left.remove(&tid);
        let seized = self.seized;
        let st = self.threads.entry(tid).or_default();
        st.stopped = true;
        st.fenced = None;
        st.at = Stop::of(status);
        match st.at {
            // A signal arrived while held. SIGTRAP is ours (a step, a breakpoint); a
            // SIGSTOP is the first stop of a new thread of a PTRACE_TRACEME child.
            Stop::Signal(sig) if sig != libc::SIGTRAP && (sig != libc::SIGSTOP || seized) => {
                // SAFETY: siginfo_t is plain data; all-zero is a valid value.
                let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                // GETSIGINFO at a signal-delivery stop copies its siginfo to our local.
                let got = ptrace(libc::PTRACE_GETSIGINFO, tid, 0, &mut info as *mut _ as u64);
                st.pending.push((sig, (got == 0).then_some(info)));
            }
            Stop::Event if event == libc::PTRACE_EVENT_CLONE => {
                let mut msg: libc::c_ulong = 0;
                // GETEVENTMSG at a clone stop yields the new thread's id.
                if ptrace(libc::PTRACE_GETEVENTMSG, tid, 0, &mut msg as *mut _ as u64) == 0 {
                    let child = Tid(msg as i32);
                    // Its first stop may have come (and gone) before this report.
                    if self
                        .threads
                        .get(&child)
                        .is_none_or(|c| c.at == Stop::Unknown)
                    {
                        self.threads.entry(child).or_default();
                        self.born.push(child);
                    }
                }
            }
            _ => {}
        }
        true
    }

    /// Waits until every thread we hold is stopped (new threads included). Nothing else
    /// is done meanwhile: some threads need the tracer's CPU to reach their stop, and
    /// work done here while holding it in real time measured slower (64 sleeping
    /// threads: reading registers and judging stacks as stops arrived took the pause
    /// from 1.24–1.35 ms to 1.64–1.77 ms).
    fn wait_all_stopped(&mut self) -> Result<(), Error> {
        let start = Instant::now();
        let deadline = start + STOP_TIMEOUT;
        // With one or two threads to wait for, polled for the first few µs: a running
        // thread stops that fast, and arming the timer below costs three syscalls while
        // the threads are already stopping. With more, some of them likely need this
        // CPU to reach their stop, which our (real-time) polling would deny them.
        let few = self.threads.values().filter(|t| t.running()).count() <= 2;
        while few && self.threads.values().any(|t| t.running()) && start.elapsed() < STOP_SPIN {
            match waitpid(-1, libc::WNOHANG) {
                Ok(Some((tid, status))) => {
                    self.note_status(tid, status);
                }
                Ok(None) => std::hint::spin_loop(),
                // Errors are handled by the blocking loop below.
                Err(_) => break,
            }
        }
        if !self.threads.values().any(|t| t.running()) {
            return Ok(());
        }
        // Then block in waitpid (woken the moment a stop arrives; a sleeping thread may
        // need this CPU to reach its stop); the timer interrupts it every millisecond
        // so the deadline and vanished tasks are still noticed. Without a timer, poll.
        let timer = crate::wake::WakeTimer::every(Duration::from_millis(1));
        let flags = if timer.is_some() { 0 } else { libc::WNOHANG };
        let mut idle = 0u32;
        while self.threads.values().any(|t| t.running()) {
            match waitpid(-1, flags) {
                Ok(Some((tid, status))) => {
                    self.note_status(tid, status);
                    idle = 0;
                }
                Ok(None) => {
                    std::thread::sleep(Duration::from_micros(50));
                    self.idle_tick(deadline, &mut idle)?;
                }
                Err(Error::Wait(e)) if e.raw_os_error() == Some(libc::EINTR) => {
                    self.idle_tick(deadline, &mut idle)?;
                }
                Err(Error::Wait(e)) if e.raw_os_error() == Some(libc::ECHILD) => {
                    // No traced children left: every remaining thread is gone.
                    self.threads.retain(|_, s| s.stopped);
                    if self.threads.is_empty() {
                        return Err(Error::NoSuchProcess(self.pid));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// One empty-handed round of [`Self::wait_all_stopped`]: enforce the deadline and,
    /// now and then, forget threads whose task vanished (they will never report).
    fn idle_tick(&mut self, deadline: Instant, idle: &mut u32) -> Result<(), Error> {
        if Instant::now() > deadline {
            let running: Vec<_> = self
                .threads
                .iter()
                .filter(|t| t.1.running())
                .map(|t| t.0 .0)
                .collect();
            return Err(Error::Timeout(format!("threads {running:?} did not stop")));
        }
        *idle += 1;
        if idle.is_multiple_of(50) {
            let pid = self.pid.0;
            self.threads.retain(|t, s| {
                !s.running() || std::path::Path::new(&format!("/proc/{pid}/task/{}", t.0)).exists()
            });
        }
        Ok(())
    }

    /// Stops every thread: sends every interrupt first, then waits for all of them,
    /// then re-scans `/proc/PID/task` until no untraced thread remains. Fenced threads
    /// are held as they are, not interrupted.
    pub fn interrupt_all(&mut self) -> Result<(), Error> {
        // A pause that is still going on (some thread held) keeps its start.
        if self.boost.is_none() {
            self.boost = crate::priority::Boost::raise();
        }
        if self.threads.values().all(|t| !t.stopped) {
            self.watch.started = None;
        }
        loop {
            let tids: Vec<Tid> = self
                .threads
                .iter()
                .filter(|t| t.1.running())
                .map(|t| *t.0)
                .collect();
            // Started even with no thread to interrupt (all fenced): the commit holds
            // them from here on.
            if self.watch.started.is_none() {
                if let Some(w) = &mut self.warm {
                    w.arm();
                }
                self.watch.started = Some((Instant::now(), monotonic_ns()));
            }
            // All INTERRUPTs before any wait: the threads stop in parallel.
            for tid in tids {
                if ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) < 0 && errno() == libc::ESRCH {
                    self.threads.remove(&tid);
                }
            }
            // Threads born from traced threads are ours (TRACECLONE); only one cloned
            // while we were seizing its parent could be untraced. When the kernel's
            // thread count equals ours there is none, and the costlier listing of
            // /proc/PID/task is skipped inside the pause. Counted while the
            // interrupted threads are still on their way to their stops (the count
            // costs what a stop takes to arrive): a count that matches proves no
            // untraced thread exists now, and only an untraced thread could make one
            // later. A clone in flight makes it differ; it is then counted again after
            // the wait, as it always was.
            let counted_early = self.thread_count() == Some(self.threads.len());
            self.wait_all_stopped()?;
            if counted_early || self.thread_count() == Some(self.threads.len()) {
                break;
            }
            if self.seize_new_tasks()? == 0 {
                break;
            }
        }
        if self.threads.is_empty() {
            return Err(Error::NoSuchProcess(self.pid));
        }
        self.watch.last_fenced = self.fenced_count();
        if let Some((s, _)) = self.watch.started {
            tracing::debug!(
                threads = self.threads.len(),
                fenced = self.watch.last_fenced,
                since_first_stop_us = s.elapsed().as_micros() as u64,
                "all threads stopped"
            );
        }
        Ok(())
    }

    /// Stops one thread and returns it, at a stop where it can be borrowed for a remote
    /// syscall or call. When threads are held, one of them: at an interrupt stop or a
    /// signal-delivery stop if there is one (the single-stepped syscall then ends at a
    /// SIGTRAP stop, where the kernel restarts what the thread was in), else one
    /// brought to an interrupt stop without running user code. Otherwise the lowest
    /// thread still alive, at an interrupt stop ([`Self::bring_to_interrupt_stop`]).
    pub fn stop_one(&mut self) -> Result<Tid, Error> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        if self.threads.values().any(|t| t.stopped) {
            let pick = |ok: &dyn Fn(Tid, &ThreadState) -> bool| {
                self.threads
                    .iter()
                    .find(|(t, s)| s.stopped && ok(**t, s))
                    .map(|t| *t.0)
            };
            if let Some(tid) = pick(&|_, s| matches!(s.at, Stop::Interrupt | Stop::Signal(_)))
                .or_else(|| {
                    pick(&|t, s| s.at == Stop::Syscall && syscall_op(t) == Some(SYSCALL_INFO_EXIT))
                })
            {
                return Ok(tid);
            }
            // Only threads inside clone (an event stop) or at a syscall's entry: one is
            // let through to its interrupt stop; a group-stopped process is refused.
            let Some(tid) = pick(&|_, s| s.at != Stop::Group) else {
                return Err(Error::ProcessStopped(self.pid));
            };
            self.bring_to_interrupt_stop(tid, deadline)?;
            return Ok(tid);
        }
        loop {
            if self.threads.is_empty() {
                // Released after a commit (or every thread we held has exited): one
                // thread is enough to borrow (the others keep running untraced;
                // `interrupt_all` seizes them when it needs them). Fails only when no
                // task of the process is left to seize.
                self.seize_one()?;
            }
            // Not a fenced thread if there is another: it sleeps in its syscall.
            while let Some(tid) = self
                .threads
                .iter()
                .find(|t| t.1.fenced.is_none())
                .or_else(|| self.threads.iter().next())
                .map(|t| *t.0)
            {
                if ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) < 0 {
                    self.threads.remove(&tid);
                    continue;
                }
                // Other threads' events queue up for later; we only need this one.
                // Polled first, and bounded: a thread stuck in the kernel (D state)
                // must not hang us past the deadline.
                match wait_one(tid, deadline) {
                    Ok(Some(status)) => {
                        if !self.note_status(tid, status) {
                            continue;
                        }
                        if self.is_stopped(tid) {
                            self.bring_to_interrupt_stop(tid, deadline)?;
                            return Ok(tid);
                        }
                    }
                    Ok(None) => {
                        return Err(Error::Timeout(format!("thread {tid} did not stop")));
                    }
                    Err(_) => {
                        self.threads.remove(&tid);
                    }
                }
            }
            // Every thread we held exited meanwhile (short-lived threads do): seize
            // another one, unless time is up.
            if Instant::now() > deadline {
                return Err(Error::NoSuchProcess(self.pid));
            }
        }
    }

    /// Brings stopped `tid` to an interrupt stop (PTRACE_EVENT_STOP with SIGTRAP), the
    /// one stop where its registers are its user state and nothing of the kernel's is
    /// in flight, so a borrow can replace them and put them back: taken on the way
    /// back to user space, after the syscall it was in has finished or been broken off
    /// (then `rax` says how it restarts). Other stops are let go on with an INTERRUPT
    /// queued, so the thread stops again before its next user instruction:
    /// - inside `clone` (a clone event): changing the registers there would make the
    ///   syscall return its child's id into the stub, and the thread lose it;
    /// - at a signal-delivery stop: the signal is delivered (its frame set up) first;
    /// - at a syscall-entry or -exit stop: the syscall finishes (or is broken off).
    ///
    /// A group stop is refused: the process is stopped by job control.
    fn bring_to_interrupt_stop(&mut self, tid: Tid, deadline: Instant) -> Result<(), Error> {
        for _ in 0..64 {
            let Some(st) = self.threads.get(&tid) else {
                return Err(Error::ThreadGone(tid));
            };
            let direct = match (st.at, st.pending.as_slice()) {
                (Stop::Interrupt, _) if st.stopped => return Ok(()),
                (Stop::Group, _) => return Err(Error::ProcessStopped(self.pid)),
                (_, []) => true,
                (Stop::Signal(s), [(sig, _)]) => s == *sig,
                _ => false,
            };
            if direct {
                // INTERRUPT on a stopped tracee only queues the trap; the resume below
                // (with the signal of this very stop, if any) takes the thread to it
                // before any user instruction.
                if ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) < 0 {
                    return Err(Error::ThreadGone(tid));
                }
                self.resume(tid)?;
            } else {
                // Signals to re-deliver first (they stop it again on their way).
                self.resume(tid)?;
                // INTERRUPT: it stops at its next return towards user space.
                if ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) < 0 {
                    return Err(Error::ThreadGone(tid));
                }
            }
            match wait_one(tid, deadline)? {
                Some(status) if self.note_status(tid, status) => {}
                Some(_) => return Err(Error::ThreadGone(tid)),
                None => return Err(Error::Timeout(format!("thread {tid} did not stop"))),
            }
        }
        Err(Error::Timeout(format!(
            "thread {tid} did not reach an interrupt stop"
        )))
    }

    /// Resumes one stopped thread, delivering the signals that arrived meanwhile as
    /// they would have been. A thread in a group stop is left stopped (PTRACE_LISTEN):
    /// the process is stopped by job control and stays so.
    pub fn resume(&mut self, tid: Tid) -> Result<(), Error> {
        let pid = self.pid;
        let Some(st) = self.threads.get_mut(&tid) else {
            return Ok(());
        };
        if !st.stopped {
            return Ok(());
        }
        let pending = std::mem::take(&mut st.pending);
        let (req, op, sig) = match (st.at, pending.as_slice()) {
            (Stop::Group, _) => {
                // Queued again, delivered when the process is continued.
                for &(sig, _) in &pending {
                    tgkill(pid, tid, sig);
                }
                (libc::PTRACE_LISTEN, "LISTEN", 0)
            }
            (_, []) => (libc::PTRACE_CONT, "CONT", 0),
            // At that signal's own stop, its siginfo untouched: delivered as is.
            (Stop::Signal(s), [(sig, _)]) if s == *sig => (libc::PTRACE_CONT, "CONT", s),
            _ => return self.redeliver(tid, pending),
        };
        // CONT from a ptrace-stop (with the signal of a signal-delivery stop, delivered
        // as if never held); LISTEN from a group stop (stopped, but not ptrace-stopped).
        if ptrace(req, tid, 0, sig as u64) < 0 {
            if errno() == libc::ESRCH {
                self.threads.remove(&tid);
                return Ok(());
            }
            return Err(Error::ptrace(op, tid));
        }
        if let Some(st) = self.threads.get_mut(&tid) {
            st.stopped = false;
        }
        self.regs_cache.get_mut().remove(&tid);
        Ok(())
    }

    /// Resumes stopped `tid` and delivers `pending`, signals it took while held, from
    /// a stop other than their own: at an interrupt or event stop a resume cannot
    /// inject a signal (it would be lost), at a syscall stop only without its siginfo.
    /// Each is queued to the thread again (tgkill) and, at the signal-delivery stop
    /// that follows before any user instruction, given back its siginfo and delivered.
    /// The kernel then applies the handler's SA_RESTART to the syscall the thread was
    /// in, as it would have. A signal the thread blocks now stays queued.
    fn redeliver(
        &mut self,
        tid: Tid,
        mut pending: Vec<(i32, Option<libc::siginfo_t>)>,
    ) -> Result<(), Error> {
        let blocked = blocked_signals(tid);
        for &(sig, _) in &pending {
            tgkill(self.pid, tid, sig);
        }
        pending.retain(|&(sig, _)| blocked & (1u64 << (sig - 1)) == 0);
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut sig = 0;
        loop {
            // CONT (without a signal: the stop we are at has none to deliver, or its
            // own was handled above); a signal stop is fed its signal back.
            if ptrace(libc::PTRACE_CONT, tid, 0, sig as u64) < 0 {
                if errno() == libc::ESRCH {
                    self.threads.remove(&tid);
                    return Ok(());
                }
                return Err(Error::ptrace("CONT", tid));
            }
            if let Some(st) = self.threads.get_mut(&tid) {
                st.stopped = false;
            }
            self.regs_cache.get_mut().remove(&tid);
            if pending.is_empty() {
                return Ok(());
            }
            let Some(status) = wait_one(tid, deadline)? else {
                tracing::warn!(
                    "thread {tid}: signals {pending:?} not taken back in time; left queued",
                    pending = pending.iter().map(|p| p.0).collect::<Vec<_>>()
                );
                return Ok(());
            };
            if !self.note_status(tid, status) {
                return Ok(());
            }
            let Some(st) = self.threads.get_mut(&tid) else {
                return Ok(());
            };
            // This stop's own signal, recorded by note_status, is delivered right here.
            st.pending.clear();
            sig = 0;
            if let Stop::Signal(s) = st.at {
                sig = s;
                if let Some(i) = pending.iter().position(|p| p.0 == s) {
                    if let Some(info) = pending.remove(i).1 {
                        // SETSIGINFO at this signal-delivery stop: the signal is
                        // delivered with the siginfo it first came with.
                        ptrace(libc::PTRACE_SETSIGINFO, tid, 0, &info as *const _ as u64);
                    }
                }
            } else if st.at == Stop::Group {
                // Stopped by job control meanwhile: it stays so; the rest stay queued.
                return self.resume(tid);
            }
        }
    }

    /// Ends a borrow of `tid` (stopped, its registers changed, after the last syscall
    /// it ran for us) by giving it back `regs`, the registers it had at the interrupt
    /// stop it was borrowed at, exactly (`orig_rax` and an `-ERESTART*` in `rax`
    /// included), and resuming it. They are written at an interrupt stop, as they were
    /// read: the thread is first let on (INTERRUPT queued) from the stop it is at to its
    /// interrupt stop, taken on its way back to user space before any user instruction
    /// (the registers it runs there are ours, which still lead back). From there the
    /// kernel itself delivers a signal that is due (those that came during the borrow
    /// are re-delivered, see [`Self::resume`]) and restarts the syscall the thread was
    /// in, or fails it with EINTR, as the signal's handler says; at a syscall-exit stop
    /// it would do neither.
    pub fn give_back(&mut self, tid: Tid, regs: &Regs) -> Result<(), Error> {
        let Some(st) = self.threads.get_mut(&tid) else {
            return Err(Error::ThreadGone(tid));
        };
        // Kept aside: delivered once the registers are back, not in the stub.
        let mut pending = std::mem::take(&mut st.pending);
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut result = Ok(());
        for _ in 0..16 {
            let Some(st) = self.threads.get_mut(&tid) else {
                return Err(Error::ThreadGone(tid));
            };
            pending.append(&mut st.pending);
            if st.at == Stop::Interrupt {
                break;
            }
            // INTERRUPT queues the trap on the stopped thread; CONT without a signal
            // takes it there (a signal stop on the way is kept in `pending`).
            if ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) < 0
                || ptrace(libc::PTRACE_CONT, tid, 0, 0) < 0
            {
                return Err(Error::ThreadGone(tid));
            }
            st.stopped = false;
            self.regs_cache.get_mut().remove(&tid);
            match wait_one(tid, deadline)? {
                Some(status) if self.note_status(tid, status) => {}
                Some(_) => return Err(Error::ThreadGone(tid)),
                None => {
                    result = Err(Error::Timeout(format!("thread {tid} did not stop")));
                    self.stop_held(tid)?;
                    break;
                }
            }
        }
        if let Some(st) = self.threads.get_mut(&tid) {
            st.pending = pending;
        }
        if result.is_ok() && self.threads.get(&tid).map(|s| s.at) != Some(Stop::Interrupt) {
            result = Err(Error::Timeout(format!(
                "thread {tid} did not reach an interrupt stop"
            )));
        }
        result?;
        self.set_regs(tid, regs)?;
        self.resume(tid)
    }

    /// Lets go every stop of a thread we do not hold, after a borrow while the others
    /// run: the clone event of a thread that created one, the first stop of a new
    /// thread (auto-attached by TRACECLONE, and waited for: its parent may be waiting
    /// for it), a signal. Without this they would wait until our next wait for stops.
    /// Nothing is done while threads are held.
    pub fn release_others(&mut self) -> Result<(), Error> {
        if self.threads.values().any(|t| t.stopped) {
            return Ok(());
        }
        let deadline = Instant::now() + BORN_WAIT;
        loop {
            while let Ok(Some((tid, status))) = waitpid(-1, libc::WNOHANG) {
                if self.note_status(tid, status) {
                    self.resume(tid)?;
                }
            }
            let Some(&child) = self.born.first() else {
                return Ok(());
            };
            let status = wait_one(child, deadline);
            // Whatever came (or, gone or slow to start, nothing: its first stop is then
            // taken by the next wait), it is not waited for again.
            self.born.retain(|&t| t != child);
            if let Ok(Some(status)) = status {
                if self.note_status(child, status) {
                    self.resume(child)?;
                }
            }
        }
    }

    /// Lets only `tid` run (the others stay stopped) until it stops again or `timeout`
    /// passes, in which case it is interrupted. Returns the stop signal, or None on
    /// timeout. Used to run a busy thread to a breakpoint at its return address.
    pub fn run_one_until_stop(
        &mut self,
        tid: Tid,
        timeout: Duration,
    ) -> Result<Option<i32>, Error> {
        self.run_one_until(tid, timeout, &mut || false)
    }

    /// Lets only `tid`, stopped with its registers at a `syscall` instruction, run that
    /// one syscall and stop again at its exit (PTRACE_SYSCALL: an entry stop, then an
    /// exit stop), with the result in `rax`. No single-step: the thread never carries
    /// the trap flag, so a tracer that dies at any point leaves it runnable as it is.
    /// And no polling of the target's memory: each stop is waited for with
    /// [`wait_one`]. Other stops on the way (a signal, kept for the resume; an
    /// interrupt or group stop) are let go on. Returns false, with the thread stopped
    /// again, if it did not reach the exit stop within `timeout`. The thread must be
    /// at a stop from which it goes on in user space (an interrupt stop, or the exit
    /// stop of a previous call): the first syscall stop must be this syscall's entry,
    /// or it fails (the registers given would have been lost to another syscall).
    pub fn run_one_syscall(&mut self, tid: Tid, timeout: Duration) -> Result<bool, Error> {
        let deadline = Instant::now() + timeout;
        let mut syscall_stops = 0;
        while syscall_stops < 2 {
            // SYSCALL resumes the thread until the next syscall entry or exit.
            if ptrace(libc::PTRACE_SYSCALL, tid, 0, 0) < 0 {
                return Err(Error::ptrace("SYSCALL", tid));
            }
            if let Some(st) = self.threads.get_mut(&tid) {
                st.stopped = false;
            }
            self.regs_cache.get_mut().remove(&tid);
            let Some(status) = wait_one(tid, deadline)? else {
                self.stop_held(tid)?;
                return Ok(false);
            };
            if !self.note_status(tid, status) {
                return Err(Error::ThreadGone(tid));
            }
            if Stop::of(status) == Stop::Syscall {
                // Entry, then exit; the kernel says which (since 5.3), so an exit stop
                // of a syscall the thread was still in is never taken for ours.
                let want = [SYSCALL_INFO_ENTRY, SYSCALL_INFO_EXIT][syscall_stops];
                match syscall_op(tid) {
                    Some(op) if op != want => {
                        return Err(Error::RemoteSyscall {
                            name: "any",
                            tid,
                            what: format!(
                                "syscall stop {op} where {want} was expected: the thread \
                                 was not at a stop in user space"
                            ),
                        });
                    }
                    _ => syscall_stops += 1,
                }
            }
        }
        Ok(true)
    }

    /// Stops `tid`, which we let run, again: INTERRUPT and a wait bounded by
    /// [`STOP_TIMEOUT`] (a thread stuck in the kernel must not hang us).
    fn stop_held(&mut self, tid: Tid) -> Result<(), Error> {
        if ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) < 0 {
            // Gone (or not ours any more): the caller's next request says which.
            return Ok(());
        }
        match wait_one(tid, Instant::now() + STOP_TIMEOUT)? {
            Some(status) if self.note_status(tid, status) => Ok(()),
            Some(_) => Err(Error::ThreadGone(tid)),
            None => Err(Error::Timeout(format!("thread {tid} did not stop"))),
        }
    }

    /// Like [`Self::run_one_until_stop`], but also stops the thread (returning None)
    /// as soon as `done()` says so: used to watch a result the thread writes to its
    /// memory. The first ~50 µs are polled without sleeping (a sleep costs at least
    /// the timer slack, 50 µs by default), then every 20 µs.
    pub fn run_one_until(
        &mut self,
        tid: Tid,
        timeout: Duration,
        done: &mut dyn FnMut() -> bool,
    ) -> Result<Option<i32>, Error> {
        self.resume(tid)?;
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            match waitpid(tid.0, libc::WNOHANG)? {
                Some((_, status)) => {
                    if !self.note_status(tid, status) {
                        return Err(Error::ThreadGone(tid));
                    }
                    if status >> 16 != 0 {
                        // A clone event (the new thread starts stopped) or a stale
                        // interrupt stop: let it go on.
                        self.resume(tid)?;
                        continue;
                    }
                    return Ok(Some(libc::WSTOPSIG(status)));
                }
                None if done() || Instant::now() >= deadline => {
                    // INTERRUPT + wait: the thread is stopped again when we return.
                    self.stop_held(tid)?;
                    return Ok(None);
                }
                None if start.elapsed() < Duration::from_micros(50) => std::hint::spin_loop(),
                None => std::thread::sleep(Duration::from_micros(20)),
            }
        }
    }

    /// Resumes every stopped thread and records the pause length.
    pub fn resume_all(&mut self) -> Result<(), Error> {
        let mut first_err = None;
        for tid in self.tids() {
            if let Err(e) = self.resume(tid) {
                first_err.get_or_insert(e);
            }
        }
        self.end_pause();
        first_err.map_or(Ok(()), Err)
    }

    fn end_pause(&mut self) {
        self.end_pause_as("");
    }

    /// [`Self::end_pause`], noting the pause under its label followed by `suffix`.
    fn end_pause_as(&mut self, suffix: &str) {
        if let Some(w) = &mut self.warm {
            w.disarm();
        }
        if let Some((s, ns)) = self.watch.started.take() {
            self.watch.last = Some(s.elapsed());
            let window = [ns, monotonic_ns()];
            self.watch.last_window_ns = Some(window);
            let label = if self.watch.label.is_empty() {
                "stop"
            } else {
                self.watch.label
            };
            crate::stops::record(self.pid.0, format!("{label}{suffix}"), window);
        }
        // Back to normal scheduling once nothing is held.
        if self.threads.values().all(|t| !t.stopped) {
            self.boost = None;
        }
    }

    /// Reads the registers of a stopped (or fenced) thread.
    pub fn regs(&self, tid: Tid) -> Result<Regs, Error> {
        if let Some(r) = self.regs_cache.borrow().get(&tid) {
            return Ok(*r);
        }
        // A fenced thread's user registers are those of its syscall-entry stop.
        if let Some(r) = self.threads.get(&tid).and_then(|t| t.fenced) {
            return Ok(r);
        }
        let regs = self.read_regs(tid)?;
        if self.is_stopped(tid) {
            self.regs_cache.borrow_mut().insert(tid, regs);
        }
        Ok(regs)
    }

    /// PTRACE_GETREGS.
    fn read_regs(&self, tid: Tid) -> Result<Regs, Error> {
        // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
        let mut regs: Regs = unsafe { std::mem::zeroed() };
        // GETREGS fills the struct whose address we pass.
        if ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut Regs as u64) < 0 {
            return Err(Error::ptrace("GETREGS", tid));
        }
        Ok(regs)
    }

    /// Writes the registers of a stopped thread.
    pub fn set_regs(&self, tid: Tid, regs: &Regs) -> Result<(), Error> {
        // Read back from the kernel next time (it may adjust what we wrote).
        self.regs_cache.borrow_mut().remove(&tid);
        // SETREGS reads the struct at the address we pass.
        if ptrace(libc::PTRACE_SETREGS, tid, 0, regs as *const Regs as u64) < 0 {
            return Err(Error::ptrace("SETREGS", tid));
        }
        Ok(())
    }

    /// Address of a syscall instruction in one of the target's executable mappings.
    fn syscall_pc(&mut self, mem: &RemoteMemory) -> Result<u64, Error> {
        if let Some(pc) = self.syscall_pc {
            return Ok(pc);
        }
        let insn = Native::SYSCALL_INSN;
        for m in read_maps(self.pid)? {
            if !m.exec || !m.read || m.path == "[vsyscall]" {
                continue;
            }
            let mut addr = m.start;
            while addr < m.end {
                let len = (m.end - addr).min(1 << 16) as usize;
                let Ok(chunk) = mem.read_vec(addr, len) else {
                    break;
                };
                if let Some(i) = chunk.windows(insn.len()).position(|w| w == insn) {
                    self.syscall_pc = Some(addr + i as u64);
                    return Ok(addr + i as u64);
                }
                if addr + len as u64 >= m.end {
                    break;
                }
                // Overlap chunks so an instruction straddling a boundary is found.
                addr += len as u64 - (insn.len() as u64 - 1);
            }
        }
        Err(Error::RemoteSyscall {
            name: "any",
            tid: Tid(self.pid.0),
            what: "no syscall instruction in any executable mapping".into(),
        })
    }

    /// Runs syscall `nr` in stopped thread `tid` at a syscall instruction found in the
    /// target; all registers are restored afterwards. Returns the raw result.
    pub fn remote_syscall(
        &mut self,
        tid: Tid,
        name: &'static str,
        nr: u64,
        args: [u64; 6],
    ) -> Result<i64, Error> {
        let mem = RemoteMemory::open(self.pid)?;
        let pc = self.syscall_pc(&mem)?;
        let saved = self.regs(tid)?;
        let mut r = saved;
        Native::prepare_syscall(&mut r, pc, nr, &args);
        self.set_regs(tid, &r)?;
        let result = self.step_over_syscall(tid, pc, name);
        // Restoring the saved registers (orig_rax included) lets the kernel restart
        // the syscall the thread was interrupted in exactly as it would have.
        let restored = self.set_regs(tid, &saved);
        let res = result?;
        restored?;
        Ok(res)
    }

    fn step_over_syscall(&mut self, tid: Tid, pc: u64, name: &'static str) -> Result<i64, Error> {
        let fail = |what: String| Error::RemoteSyscall { name, tid, what };
        for _ in 0..16 {
            // SINGLESTEP executes exactly the syscall instruction and traps after it.
            if ptrace(libc::PTRACE_SINGLESTEP, tid, 0, 0) < 0 {
                return Err(Error::ptrace("SINGLESTEP", tid));
            }
            if let Some(st) = self.threads.get_mut(&tid) {
                st.stopped = false;
            }
            self.regs_cache.get_mut().remove(&tid);
            let (_, status) = waitpid(tid.0, 0)?.ok_or_else(|| fail("no status".into()))?;
            if !self.note_status(tid, status) {
                return Err(Error::ThreadGone(tid));
            }
            let r = self.regs(tid)?;
            if Native::pc(&r) == pc + Native::SYSCALL_INSN.len() as u64 {
                return Ok(Native::syscall_result(&r));
            }
            if Native::pc(&r) != pc {
                return Err(fail(format!(
                    "thread left the syscall instruction (pc {:#x})",
                    Native::pc(&r)
                )));
            }
            // A stale interrupt stop before the step: step again.
        }
        Err(fail("did not complete".into()))
    }

    /// Runs syscall `nr` in some thread (stopping one briefly if none is stopped) and
    /// turns negative results into errors.
    pub fn syscall(&mut self, name: &'static str, nr: u64, args: [u64; 6]) -> Result<u64, Error> {
        let had_stopped = self.threads.values().any(|t| t.stopped);
        let tid = self.stop_one()?;
        let res = self.remote_syscall(tid, name, nr, args);
        if !had_stopped {
            self.resume(tid)?;
            self.end_pause();
            self.release_others()?;
        }
        let v = res?;
        if (-4095..0).contains(&v) {
            return Err(Error::RemoteSyscall {
                name,
                tid,
                what: std::io::Error::from_raw_os_error(-v as i32).to_string(),
            });
        }
        Ok(v as u64)
    }

    /// Calls the function at `addr` (no arguments) in a stopped thread and returns rax;
    /// used for IFUNC resolvers. Registers are restored afterwards.
    pub fn call_function(&mut self, addr: u64) -> Result<u64, Error> {
        let had_stopped = self.threads.values().any(|t| t.stopped);
        let tid = self.stop_one()?;
        let res = self.call_in(tid, addr);
        if !had_stopped {
            self.resume(tid)?;
            self.end_pause();
            self.release_others()?;
        }
        res
    }

    fn call_in(&mut self, tid: Tid, addr: u64) -> Result<u64, Error> {
        let mem = RemoteMemory::open(self.pid)?;
        let saved = self.regs(tid)?;
        let mut r = saved;
        // Below the red zone, 16-byte aligned, with a return address of 0: the return
        // faults at pc 0 and we take that SIGSEGV stop instead of delivering it.
        let sp = ((saved.rsp - 1024) & !0xf) - 8;
        mem.write(sp, &0u64.to_le_bytes())?;
        r.rsp = sp;
        r.rip = addr;
        r.orig_rax = u64::MAX;
        r.rax = 0;
        self.set_regs(tid, &r)?;
        let fail = |what: String| Error::RemoteSyscall {
            name: "call",
            tid,
            what,
        };
        let mut result = Err(fail("did not return".into()));
        // CONT runs the function; it ends in the fault at address 0 (or crashes).
        if ptrace(libc::PTRACE_CONT, tid, 0, 0) < 0 {
            result = Err(Error::ptrace("CONT", tid));
        } else {
            if let Some(st) = self.threads.get_mut(&tid) {
                st.stopped = false;
            }
            self.regs_cache.get_mut().remove(&tid);
            let deadline = Instant::now() + STOP_TIMEOUT;
            loop {
                match waitpid(tid.0, libc::WNOHANG)? {
                    Some((_, status)) => {
                        if !self.note_status(tid, status) {
                            return Err(Error::ThreadGone(tid));
                        }
                        let sig = libc::WSTOPSIG(status);
                        let regs = self.regs(tid)?;
                        if let Some(st) = self.threads.get_mut(&tid) {
                            if sig == libc::SIGSEGV {
                                // Ours (the return to 0, or a crash of the call): the
                                // registers go back to before it.
                                st.pending.retain(|p| p.0 != libc::SIGSEGV);
                            }
                        }
                        if sig == libc::SIGSEGV && regs.rip == 0 {
                            result = Ok(regs.rax);
                        } else if status >> 16 != 0 {
                            // An interrupt stop: keep going.
                            if ptrace(libc::PTRACE_CONT, tid, 0, 0) == 0 {
                                continue;
                            }
                        } else {
                            result = Err(fail(format!("signal {sig} at {:#x}", regs.rip)));
                        }
                        break;
                    }
                    None if Instant::now() > deadline => {
                        let _ = ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0);
                        if let Ok(Some((_, status))) = waitpid(tid.0, 0) {
                            self.note_status(tid, status);
                        }
                        break;
                    }
                    None => std::thread::sleep(Duration::from_micros(20)),
                }
            }
        }
        self.set_regs(tid, &saved)?;
        result
    }

    /// Detaches every thread. Stopped threads are detached at once; running ones all
    /// get an INTERRUPT together and each is detached the moment its own stop arrives,
    /// so detaching never holds the whole process again (each thread only sees its own
    /// short stop) and busy threads stop in parallel. Fenced threads still inside their
    /// syscall are left so, not woken: they stay traced by the calling OS thread, and
    /// the kernel detaches them (clearing the exit stop) when it exits; if one stops
    /// before that, the next wait on this set takes it back.
    pub fn detach_all(&mut self) -> Result<(), Error> {
        // Nothing held: the stops are the detach's own (a stop of a borrowed thread
        // before is over), counted from the first of them.
        let own = self.threads.values().all(|t| !t.stopped);
        if own {
            self.watch.started = None;
        }
        // A fenced thread that woke is at its exit stop now: detached below. One
        // WNOHANG wait per report, not one per fenced thread.
        if self.threads.values().any(|t| t.fenced.is_some()) {
            while let Ok(Some((tid, status))) = waitpid(-1, libc::WNOHANG) {
                self.note_status(tid, status);
            }
            let left: Vec<(Tid, Regs)> = self
                .threads
                .iter()
                .filter_map(|(t, s)| s.fenced.map(|r| (*t, r)))
                .collect();
            for (tid, regs) in left {
                self.threads.remove(&tid);
                self.left.insert(tid, regs);
            }
        }
        let mut first_err = None;
        let detach = |tid: Tid, sig: i32, first_err: &mut Option<Error>| {
            // DETACH resumes the thread, delivering a signal that arrived while held.
            if ptrace(libc::PTRACE_DETACH, tid, 0, sig as u64) < 0 && errno() != libc::ESRCH {
                first_err.get_or_insert(Error::ptrace("DETACH", tid));
            }
        };
        let running: Vec<Tid> = self
            .threads
            .iter()
            .filter(|t| !t.1.stopped)
            .map(|t| *t.0)
            .collect();
        // Each thread is held from its stop to its DETACH; do not get preempted between.
        let _boost = if self.boost.is_none() && !running.is_empty() {
            crate::priority::Boost::raise()
        } else {
            None
        };
        for tid in running {
            if ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) < 0 {
                self.threads.remove(&tid);
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        // Blocking waits, interrupted now and then so the deadline is noticed.
        let timer = if self.threads.values().any(|t| !t.stopped) {
            crate::wake::WakeTimer::every(Duration::from_millis(1))
        } else {
            None
        };
        let flags = if timer.is_some() { 0 } else { libc::WNOHANG };
        loop {
            let stopped: Vec<Tid> = self
                .threads
                .iter()
                .filter(|t| t.1.stopped)
                .map(|t| *t.0)
                .collect();
            for tid in stopped {
                let Some(st) = self.threads.remove(&tid) else {
                    continue;
                };
                // DETACH injects a signal only at its own signal-delivery stop; others
                // are queued again, and the thread takes them untraced.
                let sig = match (st.at, st.pending.as_slice()) {
                    (Stop::Signal(s), [(sig, _)]) if s == *sig => s,
                    (_, pending) => {
                        for &(sig, _) in pending {
                            tgkill(self.pid, tid, sig);
                        }
                        0
                    }
                };
                detach(tid, sig, &mut first_err);
            }
            if self.threads.is_empty() {
                break;
            }
            match waitpid(-1, flags) {
                // A clone event adds the new thread, whose own first stop follows.
                Ok(Some((t, status))) => {
                    self.note_status(t, status);
                }
                Ok(None) | Err(Error::Wait(_)) if Instant::now() > deadline => {
                    // The work is done; these threads are stuck in the kernel
                    // (uninterruptible sleep: seen here for seconds during host memory
                    // stalls). Failing the command now would misreport it; the kernel
                    // releases them, pending stop cleared, when this tracer exits.
                    let left: Vec<i32> = self.threads.keys().map(|t| t.0).collect();
                    tracing::warn!(
                        "threads {left:?} did not stop within {STOP_TIMEOUT:?} to be detached; \
                         they are released when livecare exits"
                    );
                    self.threads.clear();
                }
                Ok(None) => std::thread::sleep(Duration::from_micros(20)),
                Err(Error::Wait(e)) if e.raw_os_error() == Some(libc::EINTR) => {}
                // No traced children left: every remaining thread is gone.
                Err(_) => self.threads.clear(),
            }
        }
        drop(timer);
        self.regs_cache.get_mut().clear();
        self.born.clear();
        self.end_pause_as(if own { " detach" } else { "" });
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for ThreadSet {
    fn drop(&mut self) {
        let _ = self.detach_all();
    }
}

#[cfg(test)]
mod tests {
    use super::Stop;

    /// A wait status of a ptrace-stop: `event << 16 | sig << 8 | 0x7f`.
    fn stopped(sig: i32, event: i32) -> i32 {
        (event << 16) | (sig << 8) | 0x7f
    }

    #[test]
    fn stops_are_told_apart_by_event_and_signal() {
        use libc::*;
        assert_eq!(
            Stop::of(stopped(SIGTRAP, PTRACE_EVENT_STOP)),
            Stop::Interrupt
        );
        for sig in [SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU] {
            assert_eq!(Stop::of(stopped(sig, PTRACE_EVENT_STOP)), Stop::Group);
        }
        // Inside clone: not a stop to borrow the thread at.
        assert_eq!(Stop::of(stopped(SIGTRAP, PTRACE_EVENT_CLONE)), Stop::Event);
        assert_eq!(Stop::of(stopped(SIGTRAP | 0x80, 0)), Stop::Syscall);
        assert_eq!(Stop::of(stopped(SIGALRM, 0)), Stop::Signal(SIGALRM));
        assert_eq!(Stop::of(stopped(SIGTRAP, 0)), Stop::Signal(SIGTRAP));
        assert!(WIFSTOPPED(stopped(SIGTRAP, PTRACE_EVENT_CLONE)));
    }
}
