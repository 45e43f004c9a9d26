//! ThreadSet against real multi-threaded processes: seize, interrupt all, remote
//! syscalls in a thread sleeping in a syscall, detach on every path.

use std::time::Duration;

use anyhow::Result;
use livecare_process::arch::x86_64::{SYS_MMAP, SYS_MUNMAP};
use livecare_process::{read_maps, Pid, RemoteMemory, ThreadSet};
use testkit::{Link, Running, Scratch};

const WAIT: Duration = Duration::from_secs(5);

fn start(s: &Scratch, threads: usize) -> Result<Running> {
    let src = testkit::fixture_dir("apply-threads").join("threads.c");
    let exe = testkit::gcc(&[&src], &s.join("threads"), Link::Pie, &["-O2", "-pthread"])?;
    let mut p = Running::start(&exe, &[&threads.to_string()])?;
    p.wait_for(&format!("tick {} 1", threads - 1), WAIT)?;
    Ok(p)
}

#[test]
fn interrupt_all_stops_every_thread_and_detach_lets_them_run() -> Result<()> {
    let s = Scratch::new()?;
    let mut p = start(&s, 8)?;
    let pid = Pid(p.pid() as i32);
    let mut set = ThreadSet::seize(pid)?;
    set.interrupt_all()?;
    assert_eq!(set.tids().len(), 8);
    for tid in set.tids() {
        assert!(set.is_stopped(tid));
        let st = std::fs::read_to_string(format!("/proc/{}/task/{}/stat", pid.0, tid.0))?;
        assert!(
            st.contains(") t "),
            "thread {tid} not in tracing stop: {st}"
        );
    }
    set.resume_all()?;
    assert!(set.watch.last.is_some());
    drop(set);
    p.drain();
    p.wait_for("tick 7", WAIT)?;
    assert_eq!(p.proc_state()?.1, 0);
    Ok(())
}

#[test]
fn remote_mmap_in_a_sleeping_thread_restores_its_syscall() -> Result<()> {
    let s = Scratch::new()?;
    let mut p = start(&s, 1)?;
    let pid = Pid(p.pid() as i32);
    let mut set = ThreadSet::seize(pid)?;
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let addr = set.syscall("mmap", SYS_MMAP, [0, 0x3000, prot, flags, u64::MAX, 0])?;
    // (It may merge with a neighbouring anonymous mapping.)
    assert!(read_maps(pid)?
        .iter()
        .any(|m| m.start <= addr && addr + 0x3000 <= m.end));
    let mem = RemoteMemory::open(pid)?;
    mem.write(addr, b"livecare")?;
    assert_eq!(mem.read_vec(addr, 8)?, b"livecare");
    set.syscall("munmap", SYS_MUNMAP, [addr, 0x3000, 0, 0, 0, 0])?;
    assert!(!read_maps(pid)?
        .iter()
        .any(|m| m.start <= addr && addr < m.end));
    let err = set
        .syscall("munmap", SYS_MUNMAP, [1, 0x1000, 0, 0, 0, 0])
        .unwrap_err();
    assert!(err.to_string().contains("munmap"), "{err}");
    drop(set);
    // The interrupted usleep resumed properly: ticks keep coming, 20 ms apart.
    p.drain();
    p.wait_for("tick 0", WAIT)?;
    let t0 = std::time::Instant::now();
    p.wait_for("tick 0", WAIT)?;
    p.wait_for("tick 0", WAIT)?;
    assert!(
        t0.elapsed() >= Duration::from_millis(30),
        "usleep returned early"
    );
    Ok(())
}

#[test]
fn a_panic_while_holding_threads_still_detaches_them() -> Result<()> {
    let s = Scratch::new()?;
    let mut p = start(&s, 3)?;
    let pid = Pid(p.pid() as i32);
    let r = std::panic::catch_unwind(|| {
        let mut set = ThreadSet::seize(pid).unwrap();
        set.interrupt_all().unwrap();
        panic!("boom while all threads are stopped");
    });
    assert!(r.is_err());
    assert_eq!(p.proc_state()?.1, 0, "still traced after the panic");
    p.drain();
    p.wait_for("tick 2", WAIT)?;
    Ok(())
}

#[test]
fn dead_pid_and_kernel_thread_are_refused() {
    let e = ThreadSet::seize(Pid(i32::MAX)).err().expect("no such pid");
    assert!(e.to_string().contains("no such process"), "{e}");
    if Pid(2).is_kernel_thread() {
        let e = ThreadSet::seize(Pid(2)).err().expect("kthread");
        assert!(e.to_string().contains("kernel thread"), "{e}");
    }
}

/// Pause (first thread stopped → last resumed) for 1, 8 and 64 threads; prints the
/// median and p99 in µs (run with --nocapture to see them).
#[test]
fn pause_time_for_1_8_64_threads() -> Result<()> {
    for n in [1usize, 8, 64] {
        let s = Scratch::new()?;
        let p = start(&s, n)?;
        let mut set = ThreadSet::seize(Pid(p.pid() as i32))?;
        let mut v = Vec::new();
        for _ in 0..50 {
            set.interrupt_all()?;
            set.resume_all()?;
            v.push(set.watch.last.unwrap_or_default().as_micros() as u64);
        }
        v.sort();
        eprintln!(
            "threads {n}: pause median {} µs, p99 {} µs",
            v[v.len() / 2],
            v[v.len() * 99 / 100]
        );
        assert_eq!(set.tids().len(), n);
    }
    Ok(())
}

#[test]
fn task_state_tells_running_from_blocked_and_gone() {
    let me = livecare_process::Pid(std::process::id() as i32);
    let tid = |t: libc::pid_t| livecare_process::Tid(t);
    // SAFETY: gettid has no preconditions.
    let mine = tid(unsafe { libc::gettid() });
    // A thread reading its own state is running.
    assert_eq!(me.task_state(mine), Some('R'));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let helper = std::thread::spawn(move || {
        // SAFETY: as above.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        rx.recv().ok()
    });
    let other = tid(tid_rx.recv().unwrap());
    let blocked = (0..500).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(2));
        me.task_state(other) == Some('S')
    });
    assert!(blocked, "a thread blocked in recv() never showed S");
    drop(tx);
    helper.join().unwrap();
    let gone = (0..500).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(2));
        me.task_state(other).is_none()
    });
    assert!(gone, "a joined thread still has a state");
}

#[test]
fn thread_count_matches_the_task_directory() {
    let me = livecare_process::Pid(std::process::id() as i32);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let helper = std::thread::spawn(move || rx.recv().ok());
    // Other tests start and end threads meanwhile: the two reads must agree at least
    // once when nothing changed in between.
    let agree = (0..200).any(|_| {
        let listed = me.tasks().unwrap().len();
        listed >= 2 && me.thread_count() == Some(listed) && me.tasks().unwrap().len() == listed
    });
    assert!(agree, "thread_count never matched /proc/PID/task");
    drop(tx);
    helper.join().unwrap();
}
