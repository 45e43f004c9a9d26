//! The CFI unwinder against real gcc-built processes stopped with ptrace: call chains at
//! -O0/-O2/without frame pointers, threads blocked in syscalls, threads inside the vDSO,
//! patch code described by its own `.eh_frame`, and the strictness rules (missing
//! modules, code without CFI, garbage stacks).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use livecare_apply::unwind::{CodeModule, Regs, StackImage, UnwindError, Unwinder, MAX_FRAMES};
use livecare_process::Bytes;
use nix::sys::ptrace;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};
use testkit::{fixture_dir, gcc, Link, Running, Scratch};

const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Every thread of a process, seized and stopped; detached on drop.
struct Stopped {
    tids: Vec<Pid>,
    /// Threads resumed with `resume` and not stopped again.
    running: std::cell::RefCell<Vec<Pid>>,
}

impl Stopped {
    /// Seizes and interrupts every thread of `pid`, then waits for each to stop.
    fn all(pid: u32) -> Stopped {
        let pid = pid as i32;
        let mut s = Stopped {
            tids: Vec::new(),
            running: Default::default(),
        };
        for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let tid = Pid::from_raw(e.unwrap().file_name().to_str().unwrap().parse().unwrap());
            // SEIZE (not ATTACH) so that the stop we cause is a ptrace event stop, not a SIGSTOP.
            ptrace::seize(tid, ptrace::Options::empty()).unwrap();
            s.tids.push(tid);
        }
        for &tid in &s.tids {
            s.stop(tid);
        }
        s
    }

    /// Interrupts one seized thread and waits until it is in its ptrace stop.
    fn stop(&self, tid: Pid) {
        ptrace::interrupt(tid).unwrap();
        match waitpid(tid, Some(WaitPidFlag::__WALL)).unwrap() {
            WaitStatus::PtraceEvent(..) | WaitStatus::Stopped(..) => {}
            other => panic!("thread {tid} did not stop: {other:?}"),
        }
        self.running.borrow_mut().retain(|&t| t != tid);
    }

    /// Lets one stopped thread run again.
    fn resume(&self, tid: Pid) {
        ptrace::cont(tid, None).unwrap();
        self.running.borrow_mut().push(tid);
    }

    fn regs(&self, tid: Pid) -> Regs {
        let r = ptrace::getregs(tid).unwrap();
        Regs {
            rip: r.rip,
            rsp: r.rsp,
            rbp: r.rbp,
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // PTRACE_DETACH needs the tracee in a ptrace stop: stop the resumed ones first.
        for tid in self.running.take() {
            let _ = ptrace::interrupt(tid);
            let _ = waitpid(tid, Some(WaitPidFlag::__WALL));
        }
        for &tid in &self.tids {
            let _ = ptrace::detach(tid, None);
        }
    }
}

/// One object mapped in the target, as found in `/proc/PID/maps`.
#[derive(Clone, Debug)]
struct Mapped {
    path: String,
    bias: u64,
    exec: std::ops::Range<u64>,
}

/// File-backed objects with executable mappings, plus the `[vdso]` range.
fn mapped_objects(pid: u32) -> (Vec<Mapped>, std::ops::Range<u64>) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut first_zero: BTreeMap<String, u64> = BTreeMap::new();
    let mut exec: BTreeMap<String, std::ops::Range<u64>> = BTreeMap::new();
    let mut vdso = 0..0;
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (a, b) = f[0].split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let path = f.get(5).copied().unwrap_or("");
        if path == "[vdso]" {
            vdso = start..end;
        }
        if !path.starts_with('/') {
            continue;
        }
        if u64::from_str_radix(f[2], 16).unwrap() == 0 {
            first_zero.entry(path.to_string()).or_insert(start);
        }
        if f[1].contains('x') {
            let r = exec.entry(path.to_string()).or_insert(start..end);
            r.start = r.start.min(start);
            r.end = r.end.max(end);
        }
    }
    let objects = exec
        .into_iter()
        .map(|(path, exec)| {
            let data = std::fs::read(&path).unwrap();
            let file = object::File::parse(&*data).unwrap();
            let first_vaddr = file.segments().map(|s| s.address()).min().unwrap_or(0) & !0xfff;
            let bias = first_zero[&path] - first_vaddr;
            Mapped { path, bias, exec }
        })
        .collect();
    (objects, vdso)
}

fn read_mem(pid: u32, range: std::ops::Range<u64>) -> Vec<u8> {
    let mem = File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = vec![0u8; (range.end - range.start) as usize];
    mem.read_exact_at(&mut buf, range.start).unwrap();
    buf
}

/// Code modules for every executable mapping of `pid` (skipping paths containing any of
/// `omit`), plus the vDSO read from the target's memory.
fn modules_of(pid: u32, omit: &[&str]) -> Vec<CodeModule> {
    let (objects, vdso) = mapped_objects(pid);
    let mut modules = Vec::new();
    for m in objects
        .iter()
        .filter(|m| !omit.iter().any(|o| m.path.contains(o)))
    {
        let data: Bytes = std::fs::read(&m.path).unwrap().into();
        modules.push(CodeModule::from_elf(m.path.clone(), data, m.bias, m.exec.clone()).unwrap());
    }
    if !vdso.is_empty() {
        let image: Bytes = read_mem(pid, vdso.clone()).into();
        let file = object::File::parse(&*image).unwrap();
        let first_vaddr = file.segments().map(|s| s.address()).min().unwrap_or(0);
        modules.push(
            CodeModule::from_elf(
                "[vdso]".into(),
                image,
                vdso.start - first_vaddr,
                vdso.clone(),
            )
            .unwrap(),
        );
    }
    modules
}

/// Reads the target's stack one word at a time through `/proc/PID/mem`.
struct StackReader {
    mem: File,
}

impl StackReader {
    fn new(pid: u32) -> StackReader {
        StackReader {
            mem: File::open(format!("/proc/{pid}/mem")).unwrap(),
        }
    }

    /// Up to 16 KiB of stack from `rsp`, in one read (shorter near the top of the stack).
    fn image(&self, rsp: u64) -> StackImage {
        let mut buf = vec![0u8; 16 * 1024];
        let mut n = buf.len();
        while n > 0 && self.mem.read_exact_at(&mut buf[..n], rsp).is_err() {
            n /= 2;
        }
        buf.truncate(n);
        StackImage::new(rsp, buf)
    }

    fn word(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.mem.read_exact_at(&mut b, addr).ok()?;
        Some(u64::from_le_bytes(b))
    }
}

/// Function symbols of an ELF file, to name the frames: (start, end, name), at runtime addresses.
fn symbols(path: &Path, bias: u64) -> Vec<(u64, u64, String)> {
    let data = std::fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let mut out: Vec<_> = file
        .symbols()
        .chain(file.dynamic_symbols())
        .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 0)
        .map(|s| {
            (
                s.address() + bias,
                s.address() + s.size() + bias,
                s.name().unwrap_or("?").to_string(),
            )
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The name of the function holding each frame (return addresses are looked up at PC - 1).
fn name_frames(frames: &[u64], syms: &[(u64, u64, String)]) -> Vec<String> {
    frames
        .iter()
        .enumerate()
        .map(|(i, &pc)| {
            let look = if i == 0 { pc } else { pc - 1 };
            syms.iter()
                .find(|(s, e, _)| *s <= look && look < *e)
                .map_or_else(|| format!("{pc:#x}"), |(_, _, n)| n.clone())
        })
        .collect()
}

/// Builds the chain fixture (PIE, -O2), starts it and lets it settle in its loop;
/// returns the executable and the running process.
fn start_chain(scratch: &Scratch) -> (PathBuf, Running) {
    let exe = build_chain(scratch, "chain", Link::Pie, &["-O2"]);
    let mut run = Running::start(&exe, &[]).unwrap();
    run.wait_for("ready", READY_TIMEOUT).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    (exe, run)
}

fn build_chain(scratch: &Scratch, name: &str, link: Link, flags: &[&str]) -> PathBuf {
    let src = fixture_dir("unwind-chain").join("chain.c");
    gcc(&[&src], &scratch.join(name), link, flags).unwrap()
}

fn bias_of(pid: u32, exe: &Path) -> u64 {
    let (objects, _) = mapped_objects(pid);
    let exe = std::fs::canonicalize(exe).unwrap();
    objects
        .iter()
        .find(|m| Path::new(&m.path) == exe)
        .map(|m| m.bias)
        .expect("the executable is mapped")
}

/// Starts the chain program, stops it, and unwinds its only thread with `modules`.
/// Starts `exe`, stops its thread once it spins in `spinner` (re-stopping it until then,
/// as a loaded machine may still be on its way there), and unwinds it with every mapped
/// module except those whose path contains one of `omit`.
fn unwind_chain(
    exe: &Path,
    spinner: &str,
    omit: &[&str],
) -> (Result<Vec<u64>, UnwindError>, Vec<String>, Running) {
    let mut run = Running::start(exe, &[]).unwrap();
    run.wait_for("ready", READY_TIMEOUT).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let pid = run.pid();
    let stopped = Stopped::all(pid);
    let tid = stopped.tids[0];
    let syms = symbols(exe, bias_of(pid, exe));
    let spin = syms.iter().find(|s| s.2 == spinner).unwrap().clone();
    for _ in 0..200 {
        if (spin.0..spin.1).contains(&stopped.regs(tid).rip) {
            break;
        }
        stopped.resume(tid);
        std::thread::sleep(Duration::from_millis(10));
        stopped.stop(tid);
    }
    let mut unwinder = Unwinder::new(modules_of(pid, omit));
    let stack = StackReader::new(pid);
    let regs = stopped.regs(tid);
    let res = unwinder.unwind(regs, &mut |a| stack.word(a));
    let names = res
        .as_ref()
        .map(|f| name_frames(f, &syms))
        .unwrap_or_default();
    drop(stopped);
    (res, names, run)
}

fn assert_chain_ok(flags: &[&str], link: Link) {
    let scratch = Scratch::new().unwrap();
    let exe = build_chain(&scratch, "chain", link, flags);
    let (res, names, mut run) = unwind_chain(&exe, "inner", &[]);
    let frames = res.unwrap_or_else(|e| panic!("unwind failed with {flags:?}: {e}"));
    let want = ["inner", "middle", "outer", "main"];
    let at: Vec<usize> = want
        .iter()
        .map(|w| {
            names
                .iter()
                .position(|n| n == w)
                .unwrap_or_else(|| panic!("{w} missing from {names:?} ({flags:?})"))
        })
        .collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "chain out of order: {names:?}"
    );
    assert_eq!(at[0], 0, "the thread spins in inner: {names:?}");
    // Below main come only glibc's start-up frames and _start, whose CFI ends the stack.
    assert!(
        frames.len() <= at[3] + 4,
        "too many frames below main: {names:?}"
    );
    assert_eq!(
        names.last().map(String::as_str),
        Some("_start"),
        "{names:?}"
    );
    assert!(run.is_alive(), "the target survived the stop");
}

#[test]
fn unwinds_call_chain_at_o0() {
    assert_chain_ok(&["-O0"], Link::Pie);
}

#[test]
fn unwinds_call_chain_at_o2() {
    assert_chain_ok(&["-O2"], Link::Pie);
}

#[test]
fn unwinds_call_chain_without_frame_pointers() {
    assert_chain_ok(&["-O0", "-fomit-frame-pointer"], Link::Pie);
}

#[test]
fn unwinds_call_chain_in_non_pie_binary() {
    assert_chain_ok(&["-O2", "-fomit-frame-pointer"], Link::NoPie);
}

#[test]
fn uses_debug_frame_when_code_has_no_eh_frame() {
    assert_chain_ok(
        &[
            "-O1",
            "-g",
            "-fno-asynchronous-unwind-tables",
            "-fno-unwind-tables",
        ],
        Link::Pie,
    );
}

#[test]
fn code_without_cfi_is_an_error_even_with_frame_pointers() {
    let scratch = Scratch::new().unwrap();
    // Frame pointers are there, so a frame-pointer walk would produce a plausible stack;
    // with no CFI for inner the unwinder must refuse.
    let exe = build_chain(
        &scratch,
        "nocfi",
        Link::Pie,
        &[
            "-O0",
            "-fno-omit-frame-pointer",
            "-fno-asynchronous-unwind-tables",
            "-fno-unwind-tables",
        ],
    );
    let (res, _, _run) = unwind_chain(&exe, "inner", &[]);
    match res {
        Err(UnwindError::NoFde { frame: 0, .. }) => {}
        other => panic!("expected NoFde for frame 0, got {other:?}"),
    }
}

#[test]
fn missing_libc_module_is_an_error() {
    let scratch = Scratch::new().unwrap();
    let exe = build_chain(&scratch, "chain", Link::Pie, &["-O2"]);
    let (res, _, _run) = unwind_chain(&exe, "inner", &["libc.so"]);
    match res {
        Err(UnwindError::NoModule { frame, .. }) => assert!(frame >= 4, "frame {frame}"),
        other => panic!("expected NoModule, got {other:?}"),
    }
}

#[test]
fn missing_executable_module_is_an_error() {
    let scratch = Scratch::new().unwrap();
    let exe = build_chain(&scratch, "chain-noexe", Link::Pie, &["-O2"]);
    let (res, _, _run) = unwind_chain(&exe, "inner", &["chain-noexe"]);
    match res {
        Err(UnwindError::NoModule { frame: 0, .. }) => {}
        other => panic!("expected NoModule at frame 0, got {other:?}"),
    }
}

fn build_threads(scratch: &Scratch) -> PathBuf {
    let src = fixture_dir("unwind-threads").join("threads.c");
    gcc(
        &[&src],
        &scratch.join("threads"),
        Link::Pie,
        &["-O2", "-pthread"],
    )
    .unwrap()
}

#[test]
fn every_thread_unwinds_through_libc_to_its_start() {
    let scratch = Scratch::new().unwrap();
    let exe = build_threads(&scratch);
    let mut run = Running::start(&exe, &[]).unwrap();
    run.wait_for("ready", READY_TIMEOUT).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let pid = run.pid();
    let stopped = Stopped::all(pid);
    assert_eq!(stopped.tids.len(), 4);
    let mut unwinder = Unwinder::new(modules_of(pid, &[]));
    let stack = StackReader::new(pid);
    let (objects, _) = mapped_objects(pid);
    let libc = objects
        .iter()
        .find(|m| m.path.contains("libc.so"))
        .expect("libc is mapped");
    let syms = symbols(&exe, bias_of(pid, &exe));
    let mut seen = Vec::new();
    for &tid in &stopped.tids {
        let frames = unwinder
            .unwind(stopped.regs(tid), &mut |a| stack.word(a))
            .unwrap_or_else(|e| panic!("thread {tid}: {e}"));
        let names = name_frames(&frames, &syms);
        let last = *frames.last().unwrap();
        if tid.as_raw() == pid as i32 {
            assert_eq!(names.last().unwrap(), "_start", "{names:?}");
            assert!(names.contains(&"main".to_string()), "{names:?}");
        } else {
            // Thread stacks end in glibc's start_thread/clone3, whose CFI marks the end.
            assert!(
                libc.exec.contains(&(last - 1)),
                "thread {tid} ends outside libc: {names:?}"
            );
            let f = ["sleeper", "reader", "clock_spinner"]
                .into_iter()
                .find(|f| names.iter().any(|n| n == f))
                .unwrap_or_else(|| panic!("thread {tid}: no thread function in {names:?}"));
            seen.push(f);
        }
    }
    seen.sort();
    assert_eq!(seen, ["clock_spinner", "reader", "sleeper"]);
    drop(stopped);
    assert!(run.is_alive());
}

#[test]
fn thread_in_vdso_unwinds_ok() {
    let scratch = Scratch::new().unwrap();
    let exe = build_threads(&scratch);
    let mut run = Running::start(&exe, &[]).unwrap();
    run.wait_for("ready", READY_TIMEOUT).unwrap();
    let pid = run.pid();
    let stopped = Stopped::all(pid);
    let mut unwinder = Unwinder::new(modules_of(pid, &[]));
    let (_, vdso) = mapped_objects(pid);
    let stack = StackReader::new(pid);
    let syms = symbols(&exe, bias_of(pid, &exe));
    // The spinner is the thread whose stack shows clock_spinner.
    let spinner = *stopped
        .tids
        .iter()
        .find(|&&t| {
            let f = unwinder
                .unwind(stopped.regs(t), &mut |a| stack.word(a))
                .unwrap();
            name_frames(&f, &syms).iter().any(|n| n == "clock_spinner")
        })
        .expect("a thread in clock_spinner");
    let mut in_vdso = 0;
    for _ in 0..40 {
        stopped.resume(spinner);
        std::thread::sleep(Duration::from_millis(2));
        stopped.stop(spinner);
        let regs = stopped.regs(spinner);
        let frames = unwinder
            .unwind(regs, &mut |a| stack.word(a))
            .unwrap_or_else(|e| panic!("rip {:#x}: {e}", regs.rip));
        let names = name_frames(&frames, &syms);
        assert!(
            names.iter().any(|n| n == "clock_spinner"),
            "rip {:#x}: {names:?}",
            regs.rip
        );
        if vdso.contains(&regs.rip) {
            in_vdso += 1;
        }
    }
    eprintln!("{in_vdso}/40 interrupts landed in the vDSO");
    assert!(in_vdso > 0, "no interrupt landed in the vDSO");
    drop(stopped);
    assert!(run.is_alive());
}

#[test]
fn patch_code_eh_frame_gives_same_frames_as_the_elf() {
    let scratch = Scratch::new().unwrap();
    let (exe, run) = start_chain(&scratch);
    let pid = run.pid();
    let stopped = Stopped::all(pid);
    let stack = StackReader::new(pid);
    let regs = stopped.regs(stopped.tids[0]);
    let mut whole = Unwinder::new(modules_of(pid, &[]));
    let expected = whole.unwind(regs, &mut |a| stack.word(a)).unwrap();

    // Describe the executable's .text as "patch code": only its .eh_frame, at its runtime
    // address, covering the runtime .text range (no .eh_frame_hdr, no ELF).
    let bias = bias_of(pid, &exe);
    let data = std::fs::read(&exe).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let eh = file.section_by_name(".eh_frame").unwrap();
    let text = file.section_by_name(".text").unwrap();
    let text_avma = text.address() + bias..text.address() + text.size() + bias;
    let patch = CodeModule::from_eh_frame(
        "patch".into(),
        eh.data().unwrap().to_vec(),
        eh.address() + bias,
        text_avma.clone(),
    )
    .unwrap();
    assert!(patch.fde_count() >= 4);
    let mut modules = modules_of(pid, &[exe.file_name().unwrap().to_str().unwrap()]);
    modules.push(patch);
    let mut split = Unwinder::new(modules);
    let got = split.unwind(regs, &mut |a| stack.word(a)).unwrap();
    assert_eq!(got, expected);
    assert!(
        got.iter()
            .filter(|&&pc| text_avma.contains(&(pc - 1)))
            .count()
            >= 4
    );
    drop(stopped);
}

/// A deterministic xorshift generator, so a failing garbage case can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn garbage_stacks_give_errors_or_bounded_stacks_never_panics() {
    let scratch = Scratch::new().unwrap();
    let exe = build_threads(&scratch);
    let mut run = Running::start(&exe, &[]).unwrap();
    run.wait_for("ready", READY_TIMEOUT).unwrap();
    let pid = run.pid();
    let stopped = Stopped::all(pid);
    let modules = modules_of(pid, &[]);
    let code: Vec<_> = modules.iter().map(|m| m.avma_range()).collect();
    let mut unwinder = Unwinder::new(modules);
    let regs = stopped.regs(stopped.tids[0]);
    drop(stopped);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let (mut errors, mut oks) = (0, 0);
    for i in 0..3000 {
        // Start from the real registers, or from a random PC inside some module.
        let r = if i % 2 == 0 {
            regs
        } else {
            let m = &code[(rng.next() % code.len() as u64) as usize];
            Regs {
                rip: m.start + rng.next() % (m.end - m.start),
                rsp: rng.next() & !7,
                rbp: rng.next(),
            }
        };
        let seed = rng.next() | 1;
        let mut g = XorShift(seed);
        let pick = code.clone();
        // Garbage words, often pointing into code so that the walk goes on for a while.
        let mut read = |_addr: u64| -> Option<u64> {
            match g.next() % 8 {
                0 => None,
                1..=4 => {
                    let m = &pick[(g.next() % pick.len() as u64) as usize];
                    Some(m.start + g.next() % (m.end - m.start))
                }
                _ => Some(g.next()),
            }
        };
        match unwinder.unwind(r, &mut read) {
            Ok(frames) => {
                assert!(frames.len() <= MAX_FRAMES);
                oks += 1;
            }
            Err(_) => errors += 1,
        }
    }
    eprintln!("garbage stacks: {errors} errors, {oks} bounded results");
    assert!(errors > oks, "garbage should mostly be rejected");
}

#[test]
fn a_stack_that_loops_forever_is_an_error() {
    let scratch = Scratch::new().unwrap();
    let exe = build_chain(&scratch, "chain", Link::Pie, &["-O2"]);
    let (res, _, mut run) = unwind_chain(&exe, "inner", &[]);
    res.unwrap();
    let pid = run.pid();
    let stopped = Stopped::all(pid);
    let mut unwinder = Unwinder::new(modules_of(pid, &[]));
    let syms = symbols(&exe, bias_of(pid, &exe));
    let inner = syms.iter().find(|s| s.2 == "inner").unwrap();
    let middle_call = {
        let stack = StackReader::new(pid);
        let frames = unwinder
            .unwind(stopped.regs(stopped.tids[0]), &mut |a| stack.word(a))
            .unwrap();
        frames[1]
    };
    drop(stopped);
    run.drain();
    // Every slot holds the same return address into middle: each frame looks like the
    // previous one, so the walk only ends at the frame limit, as an error.
    let regs = Regs {
        rip: inner.0,
        rsp: 0x7000_0000,
        rbp: 0,
    };
    let res = unwinder.unwind(regs, &mut |_| Some(middle_call));
    assert!(
        matches!(
            res,
            Err(UnwindError::TooDeep { .. }) | Err(UnwindError::NoProgress { .. })
        ),
        "{res:?}"
    );
}

#[test]
fn bench_unwind_time_per_thread() {
    let scratch = Scratch::new().unwrap();
    let exe = build_threads(&scratch);
    let mut run = Running::start(&exe, &[]).unwrap();
    run.wait_for("ready", READY_TIMEOUT).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let pid = run.pid();
    let t0 = Instant::now();
    let modules = modules_of(pid, &[]);
    let build = t0.elapsed();
    let t0 = Instant::now();
    let mut unwinder = Unwinder::new(modules);
    let new = t0.elapsed();
    let stopped = Stopped::all(pid);
    let stack = StackReader::new(pid);
    let regs: Vec<Regs> = stopped.tids.iter().map(|&t| stopped.regs(t)).collect();
    // Bulk-read each stack once (what the commit window should do), then unwind from memory.
    let t0 = Instant::now();
    let snaps: Vec<StackImage> = regs.iter().map(|r| stack.image(r.rsp)).collect();
    let bulk = t0.elapsed() / regs.len() as u32;
    const ROUNDS: u32 = 2000;
    let mut first = Duration::ZERO;
    let t0 = Instant::now();
    for round in 0..ROUNDS {
        for (r, img) in regs.iter().zip(&snaps) {
            let f = unwinder.unwind(*r, &mut |a| img.read(a)).unwrap();
            assert!(f.len() >= 3);
        }
        if round == 0 {
            first = t0.elapsed();
        }
    }
    let warm = t0.elapsed() / (ROUNDS * regs.len() as u32);
    let t0 = Instant::now();
    let by_word: Vec<_> = regs
        .iter()
        .map(|r| unwinder.unwind(*r, &mut |a| stack.word(a)).unwrap())
        .collect();
    let pread = t0.elapsed() / regs.len() as u32;
    let by_image: Vec<_> = regs
        .iter()
        .zip(&snaps)
        .map(|(r, img)| unwinder.unwind(*r, &mut |a| img.read(a)).unwrap())
        .collect();
    assert_eq!(by_word, by_image, "a bulk-read stack gives the same frames");
    drop(stopped);
    eprintln!(
        "unwind: modules built in {build:?} (Unwinder::new {new:?}); first pass {:?}/thread \
         (cold cache); warm {warm:?}/thread from a bulk-read stack (16 KiB read: \
         {bulk:?}/thread); {pread:?}/thread reading each word with pread on /proc/PID/mem",
        first / regs.len() as u32
    );
}

#[test]
fn unwinds_through_a_signal_frame() {
    let scratch = Scratch::new().unwrap();
    let src = fixture_dir("unwind-signal").join("signal.c");
    let exe = gcc(&[&src], &scratch.join("signal"), Link::Pie, &["-O2"]).unwrap();
    let (res, names, _run) = unwind_chain(&exe, "handler_spin", &[]);
    let frames = res.unwrap_or_else(|e| panic!("unwind through the signal frame: {e}"));
    let want = [
        "handler_spin",
        "on_usr1",
        "raiser",
        "outer",
        "main",
        "_start",
    ];
    let at: Vec<usize> = want
        .iter()
        .map(|w| {
            names
                .iter()
                .position(|n| n == w)
                .unwrap_or_else(|| panic!("{w} missing from {names:?}"))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{names:?}");
    // Between the handler and raiser: __restore_rt and raise's libc frames.
    assert!(at[2] - at[1] >= 2, "no signal frame between: {names:?}");
    assert_eq!(at[5], frames.len() - 1);
}

#[test]
fn corrupted_cfi_and_elf_images_never_panic() {
    let scratch = Scratch::new().unwrap();
    let (exe, run) = start_chain(&scratch);
    let pid = run.pid();
    let stopped = Stopped::all(pid);
    let regs = stopped.regs(stopped.tids[0]);
    let name = exe.file_name().unwrap().to_str().unwrap().to_string();
    let others = modules_of(pid, &[&name]);
    let bias = bias_of(pid, &exe);
    let image = StackReader::new(pid).image(regs.rsp);
    let exec = mapped_objects(pid)
        .0
        .into_iter()
        .find(|m| m.path.ends_with(&name))
        .unwrap()
        .exec;
    drop(stopped);
    drop(run);
    let read = |a: u64| image.read(a);

    let data = std::fs::read(&exe).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let eh = file.section_by_name(".eh_frame").unwrap();
    let (eh_off, eh_len) = eh.file_range().unwrap();
    let eh_bytes = eh.data().unwrap().to_vec();
    let text = file.section_by_name(".text").unwrap();
    let text_avma = text.address() + bias..text.address() + text.size() + bias;
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    let (mut built, mut ok) = (0, 0);
    for i in 0..400 {
        let mut cfi = eh_bytes.clone();
        for _ in 0..1 + rng.next() % 4 {
            let at = (rng.next() % cfi.len() as u64) as usize;
            cfi[at] ^= 1 << (rng.next() % 8);
        }
        if i % 10 == 0 {
            cfi.truncate((rng.next() % cfi.len() as u64) as usize);
        }
        let patch = CodeModule::from_eh_frame(
            "mutated".into(),
            cfi,
            eh.address() + bias,
            text_avma.clone(),
        );
        if let Ok(patch) = patch {
            built += 1;
            let mut modules = others.clone();
            modules.push(patch);
            if let Ok(frames) = Unwinder::new(modules).unwind(regs, &mut { read }) {
                assert!(frames.len() <= MAX_FRAMES);
                ok += 1;
            }
        }
        // The same corruption, and some in the ELF headers, through from_elf.
        let mut elf = data.clone();
        let at = if i % 2 == 0 {
            eh_off as usize + (rng.next() % eh_len) as usize
        } else {
            (rng.next() % 128) as usize
        };
        elf[at] ^= 1 << (rng.next() % 8);
        if i % 10 == 5 {
            elf.truncate((rng.next() % elf.len() as u64) as usize);
        }
        if let Ok(m) = CodeModule::from_elf("mutated".into(), elf.into(), bias, exec.clone()) {
            let mut modules = others.clone();
            modules.push(m);
            let _ = Unwinder::new(modules).unwind(regs, &mut { read });
        }
    }
    eprintln!("corrupted CFI: {built}/400 modules built, {ok} unwinds still Ok");
}

/// `.eh_frame` of a relocatable object, relocated as the applier does for patch code:
/// `.text` placed at `text_avma` and `.eh_frame` at `eh_avma`.
fn relocated_eh_frame(obj: &[u8], text_avma: u64, eh_avma: u64) -> (Vec<u8>, u64) {
    let file = object::File::parse(obj).unwrap();
    let text = file.section_by_name(".text").unwrap();
    let eh = file.section_by_name(".eh_frame").unwrap();
    let mut out = eh.data().unwrap().to_vec();
    for (offset, rel) in eh.relocations() {
        let object::RelocationTarget::Symbol(idx) = rel.target() else {
            panic!("unexpected relocation target {rel:?}");
        };
        let sym = file.symbol_by_index(idx).unwrap();
        assert_eq!(
            sym.section_index(),
            Some(text.index()),
            "relocation against {:?}",
            sym.name()
        );
        let s = text_avma + sym.address();
        let p = eh_avma + offset;
        assert_eq!(
            rel.flags(),
            object::RelocationFlags::Elf {
                r_type: object::elf::R_X86_64_PC32
            }
        );
        let v = i32::try_from(s.wrapping_add_signed(rel.addend()).wrapping_sub(p) as i64).unwrap();
        out[offset as usize..offset as usize + 4].copy_from_slice(&v.to_le_bytes());
    }
    (out, text.size())
}

#[test]
fn patch_code_with_eh_frame_relocated_from_an_object_unwinds() {
    let scratch = Scratch::new().unwrap();
    let src = fixture_dir("unwind-chain").join("chain.c");
    let flags = ["-O2", "-fno-reorder-functions"];
    let obj = gcc(&[&src], &scratch.join("chain.o"), Link::Object, &flags).unwrap();
    let exe = scratch.join("chain");
    testkit::run_ok(
        std::process::Command::new("gcc")
            .arg(&obj)
            .arg("-o")
            .arg(&exe),
    )
    .unwrap();
    let mut run = Running::start(&exe, &[]).unwrap();
    run.wait_for("ready", READY_TIMEOUT).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let pid = run.pid();
    let stopped = Stopped::all(pid);
    let stack = StackReader::new(pid);
    let regs = stopped.regs(stopped.tids[0]);
    let expected = Unwinder::new(modules_of(pid, &[]))
        .unwind(regs, &mut |a| stack.word(a))
        .unwrap();

    // Where the linker put chain.o's .text: the runtime address of `inner` minus its
    // offset in the object. Its CFI is handed over as a relocated .eh_frame, placed at
    // an arbitrary address 1 MiB away, as for a patch region.
    let bias = bias_of(pid, &exe);
    let obj_bytes = std::fs::read(&obj).unwrap();
    let offset_in = |path: &Path, name: &str| {
        let data = std::fs::read(path).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let s = file.symbols().find(|s| s.name() == Ok(name)).unwrap();
        s.address()
    };
    let text_avma = bias + offset_in(&exe, "inner") - offset_in(&obj, "inner");
    let eh_avma = text_avma + 0x10_0000;
    let (cfi, text_size) = relocated_eh_frame(&obj_bytes, text_avma, eh_avma);
    let patch = CodeModule::from_eh_frame(
        "chain.o".into(),
        cfi,
        eh_avma,
        text_avma..text_avma + text_size,
    )
    .unwrap();
    assert_eq!(patch.fde_count(), 4);
    // The executable's own module keeps only the code before chain.o (_start and crt).
    let name = exe.file_name().unwrap().to_str().unwrap();
    let mut modules = modules_of(pid, &[name]);
    let exe_map = mapped_objects(pid)
        .0
        .into_iter()
        .find(|m| m.path.ends_with(name))
        .unwrap();
    let exe_data: Bytes = std::fs::read(&exe).unwrap().into();
    modules.push(
        CodeModule::from_elf(
            name.into(),
            exe_data,
            exe_map.bias,
            exe_map.exec.start..text_avma,
        )
        .unwrap(),
    );
    modules.push(patch);
    let got = Unwinder::new(modules)
        .unwind(regs, &mut |a| stack.word(a))
        .unwrap();
    assert_eq!(got, expected);
    let in_patch = got
        .iter()
        .enumerate()
        .filter(|&(i, &pc)| {
            let look = if i == 0 { pc } else { pc - 1 };
            (text_avma..text_avma + text_size).contains(&look)
        })
        .count();
    assert_eq!(
        in_patch, 4,
        "inner, middle, outer and main come from the patch CFI"
    );
    drop(stopped);
}

#[test]
fn warming_the_code_addresses_on_a_stack_changes_no_walk_and_makes_it_cheaper() {
    let scratch = Scratch::new().unwrap();
    let (_exe, mut run) = start_chain(&scratch);
    let pid = run.pid();
    let stopped = Stopped::all(pid);
    let tid = stopped.tids[0];
    let regs = stopped.regs(tid);
    let img = StackReader::new(pid).image(regs.rsp);
    let mut cold = Unwinder::new(modules_of(pid, &[]));
    let t0 = Instant::now();
    let want = cold.unwind(regs, &mut |a| img.read(a)).unwrap();
    let cold_time = t0.elapsed();

    // What `safety::prewarm` does with a running main thread: every word of its stack
    // that points into code is warmed as a return address.
    let mut warmed = Unwinder::new(modules_of(pid, &[]));
    assert!(!warmed.warm_return_address(0), "0 is in no module");
    let mut n = 0;
    let mut a = regs.rsp;
    while let Some(v) = img.read(a) {
        n += usize::from(warmed.warm_return_address(v));
        a += 8;
    }
    assert!(
        n >= want.len() - 1,
        "every return address is a code address"
    );
    let t0 = Instant::now();
    let got = warmed.unwind(regs, &mut |a| img.read(a)).unwrap();
    let warm_time = t0.elapsed();
    drop(stopped);
    assert_eq!(got, want, "warming changed the walk");
    eprintln!(
        "unwind of {} frames: cold {cold_time:?}, after warming {n} stack words {warm_time:?}",
        want.len()
    );
    assert!(run.is_alive());
}
