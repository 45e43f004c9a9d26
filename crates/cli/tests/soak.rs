//! Soak (issue 7): `livecare patch` / `livecare unpatch` cycles on a multi-threaded
//! gcc-built TCP server (tests/fixtures/soak-server) while client threads keep sending
//! requests as fast as they can, over persistent connections (one request at a time,
//! or pipelined bursts) and over a fresh connection per request. The server serves
//! connections on a pool of worker threads, and every second one on a thread created
//! for it, so threads keep being born and ending while livecare works.
//!
//! Every answer names the version and a checksum of the payload, both computed by the
//! two functions the patch replaces, so each field must be exactly the old or exactly
//! the new result (a request that straddles the switch may take one field from each,
//! which is counted, never garbage). After every command the test sends its own probe
//! and requires the answer to be entirely new (after patch) or entirely old (after
//! unpatch). At the end: zero failed requests, every command exited 0, the server is
//! alive with all its long-lived threads, none of its threads stopped or traced, the
//! per-connection threads gone once the load stops, the server counted exactly the
//! answers the clients received, no patch is left applied, and the executable
//! mappings and their bytes are as before the first cycle.
//!
//! Cycles: `LIVECARE_SOAK_CYCLES` (default 100, the CI size).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use testkit::patchbuild::{Builder, Flags};
use testkit::{fixture_dir, MemorySnapshot, Running, Scratch};

const LIVECARE: &str = env!("CARGO_BIN_EXE_livecare");
/// Worker threads of the server (it also has a main and an accept thread).
const WORKERS: usize = 8;
/// A request that takes longer than this counts as failed.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const OLD_VERSION: &str = "soak-1.0";
const NEW_VERSION: &str = "soak-2.0-patched";
/// Passes over the payload in both checksum() variants (CHECKSUM_ROUNDS in the C code).
const ROUNDS: usize = 1024;

/// checksum() of orig.c: FNV-1a, ROUNDS passes.
fn old_checksum(payload: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for _ in 0..ROUNDS {
        for &b in payload {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// checksum() of patched.c: rotate-xor-multiply, ROUNDS passes.
fn new_checksum(payload: &[u8]) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..ROUNDS {
        for &b in payload {
            h = h.rotate_left(5) ^ u64::from(b);
            h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    h
}

/// Which code produced a field of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Code {
    Old,
    New,
}

/// A request payload with the answers of both checksum() variants, computed once: the
/// clients draw from a table so that checking an answer costs them nothing.
struct Payload {
    text: String,
    old: u64,
    new: u64,
}

impl Payload {
    fn new(text: String) -> Payload {
        Payload {
            old: old_checksum(text.as_bytes()),
            new: new_checksum(text.as_bytes()),
            text,
        }
    }
}

/// Payloads of varying length (13..=56 bytes) and content.
fn payload_table() -> Vec<Payload> {
    (0..64)
        .map(|k| Payload::new(format!("payload{k}-{}", "x~".repeat(k % 23))))
        .collect()
}

/// Checks the answer to request `seq payload`: the sequence number echoes, the version
/// and the checksum are each exactly old or exactly new. Returns (version, checksum).
fn classify(seq: &str, p: &Payload, answer: &str) -> Result<(Code, Code), String> {
    let mut f = answer.trim_end_matches('\n').split(' ');
    let (Some(s), Some(v), Some(c), None) = (f.next(), f.next(), f.next(), f.next()) else {
        return Err(format!("malformed answer {answer:?} to {seq} {}", p.text));
    };
    if s != seq {
        return Err(format!("answer {answer:?} for sequence {seq}"));
    }
    let version = match v {
        OLD_VERSION => Code::Old,
        NEW_VERSION => Code::New,
        _ => return Err(format!("garbage version in {answer:?}")),
    };
    let sum = u64::from_str_radix(c, 16).map_err(|_| format!("bad checksum in {answer:?}"))?;
    let checksum = if c.len() != 16 {
        return Err(format!("bad checksum width in {answer:?}"));
    } else if sum == p.old {
        Code::Old
    } else if sum == p.new {
        Code::New
    } else {
        return Err(format!(
            "checksum {c} of {:?} is neither old {:016x} nor new {:016x}",
            p.text, p.old, p.new
        ));
    };
    Ok((version, checksum))
}

/// Counters shared by the load clients.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    /// Answers received and accepted.
    ok: AtomicU64,
    /// Failed requests (connect, write, read, timeout, malformed or garbage answer).
    failed: AtomicU64,
    /// Answers whose two fields were both old / both new / one of each.
    all_old: AtomicU64,
    all_new: AtomicU64,
    mixed: AtomicU64,
    /// The first failure messages.
    errors: Mutex<Vec<String>>,
    /// Longest round trip (µs) of a request on a persistent connection, and of one
    /// on a fresh connection (connect included).
    max_persistent_us: AtomicU64,
    max_fresh_us: AtomicU64,
}

impl Load {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if e.len() < 20 {
            e.push(what);
        }
    }

    fn record(&self, kinds: (Code, Code)) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        match kinds {
            (Code::Old, Code::Old) => &self.all_old,
            (Code::New, Code::New) => &self.all_new,
            _ => &self.mixed,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
}

/// How a load client talks to the server.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// One connection, `n` requests written at once, then `n` answers read.
    Persistent(usize),
    /// A new connection for every request (closed with an RST, so no TIME_WAIT pile-up).
    Fresh,
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Makes the next close send an RST (SO_LINGER 0).
fn linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd and a correctly sized, initialised linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Sends `reqs` (each `(seq, payload)`) on `conn` and checks each answer; an I/O
/// error drops the connection.
fn exchange(
    conn: &mut Option<BufReader<TcpStream>>,
    addr: SocketAddr,
    reqs: &[(String, &Payload)],
) -> Result<Vec<(Code, Code)>, String> {
    if conn.is_none() {
        *conn = Some(BufReader::new(
            connect(addr).map_err(|e| format!("connect: {e}"))?,
        ));
    }
    let r = (|| {
        let c = conn.as_mut().expect("connected above");
        let mut msg = String::new();
        for (seq, payload) in reqs {
            msg.push_str(&format!("{seq} {}\n", payload.text));
        }
        c.get_mut()
            .write_all(msg.as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut kinds = Vec::with_capacity(reqs.len());
        for (seq, payload) in reqs {
            let mut line = String::new();
            match c.read_line(&mut line) {
                Ok(0) => return Err(format!("connection closed before the answer to {seq}")),
                Ok(_) => kinds.push(classify(seq, payload, &line)?),
                Err(e) => return Err(format!("read (answer to {seq}): {e}")),
            }
        }
        Ok(kinds)
    })();
    if r.is_err() {
        *conn = None;
    }
    r
}

/// A load client: requests until `load.stop`, each failure counted and the
/// connection reopened.
fn client(id: usize, mode: Mode, addr: SocketAddr, payloads: &[Payload], load: &Load) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut n = 0u64;
    while !load.stop.load(Ordering::Relaxed) {
        let batch = match mode {
            Mode::Persistent(b) => b,
            Mode::Fresh => 1,
        };
        let reqs: Vec<(String, &Payload)> = (0..batch)
            .map(|_| {
                n += 1;
                let p = &payloads[(n as usize * 7 + id) % payloads.len()];
                (format!("c{id}.{n}"), p)
            })
            .collect();
        let t = Instant::now();
        match exchange(&mut conn, addr, &reqs) {
            Ok(kinds) => {
                let max = match mode {
                    Mode::Persistent(_) => &load.max_persistent_us,
                    Mode::Fresh => &load.max_fresh_us,
                };
                max.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                kinds.into_iter().for_each(|k| load.record(k));
            }
            Err(e) => {
                // Every request of the batch counts as failed.
                for _ in 1..batch {
                    load.failed.fetch_add(1, Ordering::Relaxed);
                }
                load.fail(format!("client {id} ({mode:?}): {e}"));
            }
        }
        if matches!(mode, Mode::Fresh) {
            if let Some(c) = conn.take() {
                linger_zero(c.get_ref());
            }
        }
    }
}

/// One request on a fresh connection; the answer must be entirely `want`.
fn probe(addr: SocketAddr, tag: &str, want: Code) -> Result<()> {
    let payload = Payload::new(format!("probe-{tag}-payload"));
    let mut conn = None;
    let kinds = exchange(&mut conn, addr, &[(tag.to_string(), &payload)])
        .map_err(|e| anyhow::anyhow!("probe {tag}: {e}"))?;
    ensure!(
        kinds[0] == (want, want),
        "probe {tag}: answer {:?}, expected entirely {want:?}",
        kinds[0]
    );
    if let Some(c) = conn {
        linger_zero(c.get_ref());
    }
    Ok(())
}

/// The server's `STATS` counters.
struct Stats {
    /// Requests answered.
    served: u64,
    /// EINTR returns of its blocking calls (it retries them).
    eintr: u64,
    /// Connections served on a thread created for them.
    spawned: u64,
}

/// `STATS` from the server.
fn server_stats(addr: SocketAddr) -> Result<Stats> {
    let mut s = BufReader::new(connect(addr)?);
    s.get_mut().write_all(b"STATS\n")?;
    let mut line = String::new();
    s.read_line(&mut line)?;
    let field = |k: &str| -> Result<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .with_context(|| format!("no {k} in {line:?}"))?
            .parse()
            .with_context(|| format!("{k} in {line:?}"))
    };
    Ok(Stats {
        served: field("served=")?,
        eintr: field("eintr=")?,
        spawned: field("spawned=")?,
    })
}

/// One successful livecare run.
struct Run {
    stdout: String,
    /// Its debug log (`LIVECARE_LOG=debug`), shown for the slowest command.
    stderr: String,
    wall: Duration,
    /// Thread states of livecare and of the target, sampled every second while the
    /// command ran longer than that (to see where a slow command spent its time).
    stalls: Vec<String>,
}

/// `tid:state:wchan:syscall` for every thread of `pid`, plus the kernel stack of a
/// thread in uninterruptible sleep (D) when /proc lets us read it (root).
fn thread_states(pid: u32) -> String {
    let read = |t: &str, f: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{t}/{f}")).unwrap_or_default()
    };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "gone".into();
    };
    let mut v: Vec<String> = tasks
        .flatten()
        .map(|e| {
            let t = e.file_name().to_string_lossy().into_owned();
            let stat = read(&t, "stat");
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, r)| r.chars().next())
                .unwrap_or('?');
            let syscall = read(&t, "syscall");
            let nr = syscall.split_whitespace().next().unwrap_or("?");
            let mut s = format!("{t}:{state}:{}:{nr}", read(&t, "wchan"));
            if state == 'D' {
                let text = read(&t, "stack");
                let stack: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.split_whitespace().nth(1))
                    .map(|f| f.split('+').next().unwrap_or(f))
                    .collect();
                s.push_str(&format!(":stack={}", stack.join("<")));
            }
            s
        })
        .collect();
    v.sort();
    v.join(" ")
}

/// Runs livecare with `args` and a debug log; requires exit 0. `target` is the pid
/// whose threads are sampled along with livecare's if the command is slow.
fn livecare(args: &[&str], target: Option<u32>) -> Result<Run> {
    let t = Instant::now();
    let mut child = Command::new(LIVECARE)
        .args(args)
        .env("LIVECARE_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running livecare {args:?}"))?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out_reader = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err_reader = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let mut stalls = Vec::new();
    let mut sample_at = Duration::from_secs(1);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if t.elapsed() >= sample_at {
            stalls.push(format!(
                "at {:.1?}: livecare [{}] target [{}]",
                t.elapsed(),
                thread_states(child.id()),
                target.map(thread_states).unwrap_or_default()
            ));
            sample_at += Duration::from_secs(1);
        }
        thread::sleep(Duration::from_micros(500));
    };
    let wall = t.elapsed();
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    ensure!(
        status.success(),
        "livecare {args:?} exited {:?} after {wall:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        status.code(),
    );
    Ok(Run {
        stdout,
        stderr,
        wall,
        stalls,
    })
}

/// The thread ids of `pid`.
fn tids(pid: u32) -> Result<Vec<u32>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Ok(t) = e?.file_name().to_string_lossy().parse() {
            v.push(t);
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// The server is alive with all its long-lived `threads`, and none of its threads
/// (including per-connection ones) is stopped or traced.
fn assert_clean(p: &mut Running, threads: &[u32]) -> Result<()> {
    ensure!(p.is_alive(), "server died; last lines {:?}", p.tail(5));
    let now = tids(p.pid())?;
    let lost: Vec<&u32> = threads.iter().filter(|t| !now.contains(t)).collect();
    ensure!(lost.is_empty(), "threads {lost:?} are gone (now {now:?})");
    for t in now {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/task/{t}/status", p.pid()))
        else {
            ensure!(!threads.contains(&t), "cannot read thread {t}'s status");
            continue; // a per-connection thread that just ended
        };
        for l in status.lines() {
            if let Some(s) = l.strip_prefix("State:") {
                let s = s.trim();
                ensure!(
                    !s.starts_with('t') && !s.starts_with('T'),
                    "thread {t} left {s}"
                );
            }
            if let Some(s) = l.strip_prefix("TracerPid:") {
                ensure!(s.trim() == "0", "thread {t} still traced by {}", s.trim());
            }
        }
    }
    Ok(())
}

fn median_max(v: &mut [Duration]) -> (Duration, Duration) {
    v.sort_unstable();
    if v.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    (v[v.len() / 2], v[v.len() - 1])
}

/// Figures of the command cycles.
#[derive(Default)]
struct Cycles {
    done: usize,
    patch_wall: Vec<Duration>,
    unpatch_wall: Vec<Duration>,
    pause_us: Vec<u64>,
    /// Patch commits that found a thread inside a replaced function and had to wait.
    waited: usize,
    max_attempts: u64,
    /// The slowest command: what it was and its log.
    slowest: Option<(Duration, String, String)>,
    /// The patch with the longest stop: its pause (µs), which cycle, and its log.
    longest_pause: Option<(u64, String, String)>,
    /// Thread samples of every command that ran over a second.
    stalls: Vec<String>,
}

impl Cycles {
    fn note(&mut self, what: String, run: &Run) {
        if self.slowest.as_ref().is_none_or(|(w, _, _)| run.wall > *w) {
            self.slowest = Some((run.wall, what.clone(), run.stderr.clone()));
        }
        for s in &run.stalls {
            self.stalls.push(format!("{what} {s}"));
        }
    }
}

/// `n` patch/unpatch cycles with a probe after each command; stops at the first error.
fn run_cycles(
    n: usize,
    pid: &str,
    patch: &Path,
    addr: SocketAddr,
    server: &mut Running,
    threads: &[u32],
    c: &mut Cycles,
) -> Result<()> {
    let patch = patch.to_str().context("non-UTF-8 patch path")?;
    let target = server.pid();
    for i in 0..n {
        let run = livecare(&["patch", "-p", pid, "--json", patch], Some(target))
            .with_context(|| format!("cycle {i}: patch"))?;
        c.patch_wall.push(run.wall);
        c.note(format!("patch of cycle {i}"), &run);
        let out = &run.stdout;
        let doc: Value =
            serde_json::from_str(out).with_context(|| format!("patch --json: {out}"))?;
        let reports = doc["patched"].as_array().context("no `patched` array")?;
        ensure!(reports.len() == 1, "cycle {i}: one report expected: {out}");
        let hunks = reports[0]["hunks"].as_array().map_or(0, Vec::len);
        ensure!(
            hunks == 2,
            "cycle {i}: 2 hunks expected (version, checksum): {out}"
        );
        let attempts = reports[0]["attempts"].as_u64().unwrap_or(0);
        c.max_attempts = c.max_attempts.max(attempts);
        if attempts > 1 {
            c.waited += 1;
        }
        let pause = reports[0]["pause_us"].as_u64().unwrap_or(0);
        c.pause_us.push(pause);
        if c.longest_pause.as_ref().is_none_or(|(p, _, _)| pause > *p) {
            c.longest_pause = Some((pause, format!("patch of cycle {i}"), run.stderr.clone()));
        }
        probe(addr, &format!("p{i}"), Code::New).with_context(|| format!("after patch {i}"))?;
        let run = livecare(&["unpatch", "-p", pid], Some(target))
            .with_context(|| format!("cycle {i}: unpatch"))?;
        c.unpatch_wall.push(run.wall);
        c.note(format!("unpatch of cycle {i}"), &run);
        probe(addr, &format!("u{i}"), Code::Old).with_context(|| format!("after unpatch {i}"))?;
        if i % 10 == 9 {
            assert_clean(server, threads).with_context(|| format!("after cycle {i}"))?;
        }
        c.done = i + 1;
    }
    Ok(())
}

#[test]
fn patch_unpatch_cycles_under_client_load_lose_no_request() -> Result<()> {
    let n: usize = match std::env::var("LIVECARE_SOAK_CYCLES") {
        Ok(s) => s.parse().context("LIVECARE_SOAK_CYCLES")?,
        Err(_) => 100,
    };
    let dir = Scratch::new()?;
    let b = Builder::new(
        Path::new(LIVECARE),
        &fixture_dir("soak-server"),
        &dir.join("build"),
        Flags::default(),
    )?;
    let exe = b.executable("orig.c", "soak-server", &[])?;
    let patch = b.patch(&exe, "patched.c", "soak-1")?;

    let mut server = Running::start(&exe.path, &[&WORKERS.to_string(), "spawn"])?;
    let port: u16 = server
        .wait_for("port ", Duration::from_secs(30))?
        .trim_start_matches("port ")
        .trim()
        .parse()
        .context("port line")?;
    server.wait_for("ready", Duration::from_secs(30))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let pid = server.pid().to_string();
    probe(addr, "first", Code::Old)?;
    let threads = tids(server.pid())?;
    ensure!(
        threads.len() == WORKERS + 2,
        "server threads: {threads:?} (expected {WORKERS} workers, accept and main)"
    );
    // Per-connection threads leave their stacks cached, so only the executable
    // mappings (where a leaked patch region would show) and their bytes must match.
    let before = MemorySnapshot::take(server.pid())?.code;

    let load = Load::default();
    let payloads = payload_table();
    let modes = [
        Mode::Persistent(1),
        Mode::Persistent(1),
        Mode::Persistent(8),
        Mode::Fresh,
        Mode::Fresh,
    ];
    let mut cycles = Cycles::default();
    let started = Instant::now();
    let run = thread::scope(|s| {
        for (id, &mode) in modes.iter().enumerate() {
            let (load, payloads) = (&load, &payloads);
            s.spawn(move || client(id, mode, addr, payloads, load));
        }
        // Let the load reach every worker before the first cycle.
        let warm = Instant::now();
        while load.ok.load(Ordering::Relaxed) < 1000 && warm.elapsed() < IO_TIMEOUT {
            thread::sleep(Duration::from_millis(5));
        }
        let r = run_cycles(
            n,
            &pid,
            &patch.path,
            addr,
            &mut server,
            &threads,
            &mut cycles,
        );
        load.stop.store(true, Ordering::Relaxed);
        r
    });
    let elapsed = started.elapsed();
    let Stats {
        served,
        eintr,
        spawned,
    } = server_stats(addr)?;

    let ok = load.ok.load(Ordering::Relaxed);
    let failed = load.failed.load(Ordering::Relaxed);
    let slow = cycles
        .patch_wall
        .iter()
        .chain(&cycles.unpatch_wall)
        .filter(|w| **w > Duration::from_secs(1))
        .count();
    let (pm, px) = median_max(&mut cycles.patch_wall);
    let (um, ux) = median_max(&mut cycles.unpatch_wall);
    cycles.pause_us.sort_unstable();
    let pause_med = cycles.pause_us.get(cycles.pause_us.len() / 2).copied();
    eprintln!(
        "soak: {}/{n} cycles in {elapsed:.1?}; {ok} requests answered ({:.0}/s), {failed} failed; \
         answers old {} new {} mixed {}; patch wall median {pm:.1?} max {px:.1?}; \
         unpatch wall median {um:.1?} max {ux:.1?}; {slow} commands over 1 s; pause median {pause_med:?} µs max {:?} µs; \
         {} patches waited for a thread (max attempts {}); server served {served} ({spawned} connections on threads of their own), EINTR {eintr}",
        cycles.done,
        ok as f64 / elapsed.as_secs_f64(),
        load.all_old.load(Ordering::Relaxed),
        load.all_new.load(Ordering::Relaxed),
        load.mixed.load(Ordering::Relaxed),
        cycles.pause_us.last(),
        cycles.waited,
        cycles.max_attempts,
    );
    eprintln!(
        "soak: longest request round trip: {} µs on a persistent connection, {} µs on a fresh one",
        load.max_persistent_us.load(Ordering::Relaxed),
        load.max_fresh_us.load(Ordering::Relaxed)
    );
    if let Some((pause, what, log)) = &cycles.longest_pause {
        eprintln!("soak: longest stop: {what}, {pause} µs; its log:\n{log}");
    }
    if let Some((wall, what, log)) = &cycles.slowest {
        if *wall > Duration::from_secs(1) {
            eprintln!("soak: slowest command: {what}, {wall:.1?}; its log:\n{log}");
        }
    }
    if !cycles.stalls.is_empty() {
        eprintln!(
            "soak: thread samples (tid:state:wchan:syscall) of commands over 1 s:\n{}",
            cycles.stalls.join("\n")
        );
    }
    let errors = load
        .errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if failed > 0 {
        // Show the load's failures too if the cycles stopped with an error.
        run.with_context(|| {
            format!(
                "{failed} failed requests; first ones:\n{}",
                errors.join("\n")
            )
        })?;
    } else {
        run?;
    }
    ensure!(
        failed == 0,
        "{failed} failed requests; first ones:\n{}",
        errors.join("\n")
    );
    assert_clean(&mut server, &threads)?;
    ensure!(ok > 0, "no request answered");
    ensure!(
        spawned > 0,
        "no connection was served on a thread of its own"
    );
    // Once the clients are gone, the per-connection threads end.
    let quiet = Instant::now();
    while tids(server.pid())? != threads {
        ensure!(
            quiet.elapsed() < IO_TIMEOUT,
            "threads {:?} remain after the load ended (long-lived: {threads:?})",
            tids(server.pid())?
        );
        thread::sleep(Duration::from_millis(10));
    }
    if n > 0 {
        ensure!(
            load.all_new.load(Ordering::Relaxed) > 0 && load.all_old.load(Ordering::Relaxed) > 0,
            "the load saw only one kind of answer"
        );
    }
    // Every answer computed was received: load + 2 probes per cycle + the first probe.
    let expected = ok + 2 * cycles.done as u64 + 1;
    ensure!(
        served == expected,
        "server answered {served} requests, clients received {expected}"
    );
    let info = livecare(&["info", "-p", &pid, "--json"], None)?.stdout;
    let doc: Value = serde_json::from_str(&info).with_context(|| format!("info: {info}"))?;
    let left: usize = doc
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["objects"].as_array().into_iter().flatten())
        .map(|o| o["patches"].as_array().map_or(0, Vec::len))
        .sum();
    ensure!(left == 0, "patches left applied: {info}");
    // Removed regions that something may still point into stay mapped, retired (issue
    // 16 item 2), and `info` lists them; the rest of the code must be as it was. Most
    // are reclaimed by a later unpatch, so they must not pile up one per cycle.
    let retired: Vec<(u64, u64)> = doc
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["retired"].as_array().into_iter().flatten())
        .map(|r| {
            let a = r["addr"].as_u64().unwrap_or(0);
            (a, a + r["total_len"].as_u64().unwrap_or(0))
        })
        .collect();
    eprintln!(
        "soak: {} retired regions left after {n} cycles",
        retired.len()
    );
    ensure!(
        retired.len() <= n / 4 + 1,
        "{} retired regions after {n} cycles: reclaim never frees them\n{info}",
        retired.len()
    );
    let in_retired = |line: &str| {
        let range = line.split_whitespace().next().unwrap_or_default();
        let parse = |h: &str| u64::from_str_radix(h, 16).ok();
        range.split_once('-').is_some_and(|(lo, hi)| {
            let (Some(lo), Some(hi)) = (parse(lo), parse(hi)) else {
                return false;
            };
            retired.iter().any(|&(a, b)| a <= lo && hi <= b)
        })
    };
    let mut after = MemorySnapshot::take(server.pid())?.code;
    after.retain(|(line, _)| !in_retired(line));
    let lines = |c: &[(String, Vec<u8>)]| c.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>();
    ensure!(
        lines(&before) == lines(&after),
        "executable mappings differ after {n} cycles:\nbefore:\n{}\nafter:\n{}",
        lines(&before).join("\n"),
        lines(&after).join("\n")
    );
    for ((line, b1), (_, b2)) in before.iter().zip(&after) {
        if b1 != b2 {
            let at = b1.iter().zip(b2).position(|(x, y)| x != y).unwrap_or(0);
            bail!("after {n} cycles, code differs in {line} at offset {at:#x}");
        }
    }
    Ok(())
}
