//! The bench's own target program: generated C, built through the patch pipeline,
//! started with a shared counter file, driven by `livecare patch`/`unpatch` runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use object::Object as _;

/// The target program's source, with a `FUNCTIONS` marker for the generated code.
const TARGET_C: &str = include_str!("../../../../../tests/fixtures/bench-target/target.c");
/// Where the generated functions go.
const MARKER: &str = "/*@FUNCTIONS@*/";
/// First per-thread word of the shared file (matches target.c).
const SLOT_BASE: usize = 8;
/// Words per thread: acknowledged generation, largest gap, gaps recorded, a spare
/// word, then the ring of recorded gaps (start, end).
const SLOT_WORDS: usize = 256;
/// Entries of a thread's gap ring.
const RING: usize = (SLOT_WORDS - 4) / 2;
/// Most measuring threads the target supports.
const MAX_SLOTS: usize = 1001;
/// Size of the shared file (matches the target's mapping).
const SHM_BYTES: usize = 8 * (SLOT_BASE + SLOT_WORDS * MAX_SLOTS);
/// How long the target's threads may take to acknowledge a generation.
const ACK_TIMEOUT: Duration = Duration::from_secs(20);

/// The C source with `k` functions; `version` 1 is the original, 2 the patched one
/// (every function returns one more). `noipa` keeps gcc from inlining them or
/// specialising their callers on their bodies.
pub fn source(k: usize, version: u32) -> String {
    let mut gen = String::new();
    for i in 0..k {
        gen.push_str(&format!(
            "__attribute__((noipa)) long bench_f{i}(long x)\n{{\n\tx = x * 1000003 + {i};\n\tx ^= x >> 7;\n\treturn x + {version};\n}}\n"
        ));
    }
    gen.push_str(&format!(
        "#define NFUNCTIONS {k}u\nstatic long (*const bench_table[])(long) = {{"
    ));
    for i in 0..k {
        gen.push_str(&format!("bench_f{i}, "));
    }
    gen.push_str("};\n");
    TARGET_C.replace(MARKER, &gen)
}

/// Runs a command and fails with its output when it fails.
fn step(what: &str, cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("starting `{what}`"))?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The running `livecare` binary.
pub fn livecare() -> Result<PathBuf> {
    std::env::current_exe().context("finding the livecare executable")
}

/// A built target and its patch.
pub struct Built {
    /// The executable.
    pub exe: PathBuf,
    /// Its GNU build-id (lowercase hex).
    pub build_id: String,
    /// The `.kpatch` changing every generated function.
    pub patch: PathBuf,
}

/// How to build a bench target and its patch.
pub struct Recipe<'a> {
    /// C source of the original and of the patched program.
    pub sources: [String; 2],
    /// Compiler flags for both.
    pub cflags: &'a [&'a str],
    /// Extra link flags (after `-pie`).
    pub ldflags: &'a [&'a str],
    /// File name of the executable in the build directory.
    pub exe_name: &'a str,
    /// Patch id written into the `.kpatch`.
    pub patch_id: &'a str,
}

/// Builds the target with `k` functions and its patch in `dir`.
pub fn build(dir: &Path, k: usize) -> Result<Built> {
    build_recipe(
        dir,
        &Recipe {
            sources: [source(k, 1), source(k, 2)],
            cflags: &["-O2", "-g", "-pthread", "-fPIE"],
            ldflags: &["-pthread"],
            exe_name: "bench-target",
            patch_id: "bench",
        },
    )
}

/// Builds a target and its patch in `dir` the LibCare way: kept assembly, `gensrc`,
/// link with `-Wl,-q`, the `strip` steps, `make`.
pub fn build_recipe(dir: &Path, r: &Recipe<'_>) -> Result<Built> {
    let lc = livecare()?;
    let mut asm = Vec::new();
    for (src, sub) in r.sources.iter().zip(["orig", "patched"]) {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("target.c"), src)?;
        step(
            "gcc -S",
            Command::new("gcc")
                .current_dir(&d)
                .args(r.cflags)
                .args(["-S", "target.c", "-o", "target.s"]),
        )?;
        asm.push(d.join("target.s"));
    }
    let link = |input: &Path, out: &Path, keep_relocs: bool| -> Result<()> {
        let obj = input.with_extension("o");
        step(
            "gcc -c",
            Command::new("gcc")
                .args(r.cflags)
                .arg("-c")
                .arg(input)
                .arg("-o")
                .arg(&obj),
        )?;
        let mut c = Command::new("gcc");
        c.arg("-pie").args(r.ldflags);
        if keep_relocs {
            c.arg("-Wl,-q");
        }
        step("gcc link", c.arg(&obj).arg("-o").arg(out))
    };
    let exe = dir.join(r.exe_name);
    link(&asm[0], &exe, false)?;
    let build_id = {
        let data = std::fs::read(&exe)?;
        let file = object::File::parse(&*data).context("parsing the built target")?;
        let id = file
            .build_id()
            .context("reading the target's build-id")?
            .context("the target has no build-id")?;
        id.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let pd = dir.join("patched");
    let aug = pd.join("aug.s");
    step(
        "livecare gensrc",
        Command::new(&lc)
            .arg("gensrc")
            .arg("-i")
            .arg(&asm[0])
            .arg("-i")
            .arg(&asm[1])
            .arg("-o")
            .arg(&aug),
    )?;
    let linked = pd.join("linked");
    link(&aug, &linked, true)?;
    let elf = pd.join("patch.elf");
    step(
        "livecare strip --strip",
        Command::new(&lc)
            .args(["strip", "--strip"])
            .arg(&linked)
            .arg(&elf),
    )?;
    step(
        "strip --strip-unneeded",
        Command::new("strip").arg("--strip-unneeded").arg(&elf),
    )?;
    for what in ["--rel-fixup", "--undo-link"] {
        step(
            &format!("livecare strip {what}"),
            Command::new(&lc).args(["strip", what]).arg(&exe).arg(&elf),
        )?;
    }
    let patch = dir.join(format!("{build_id}.kpatch"));
    step(
        "livecare make",
        Command::new(&lc)
            .args(["make", "-b", &build_id, "-i", r.patch_id, "-o"])
            .arg(&patch)
            .arg(&elf),
    )?;
    Ok(Built {
        exe,
        build_id,
        patch,
    })
}

/// The started target and the shared file it writes; killed on drop.
pub struct Target {
    child: Child,
    map: *mut u64,
    /// Threads with a measuring slot.
    pub slots: usize,
    /// The first of them (blocked mode: only the observer, on the last slot, measures).
    first: usize,
    generation: u64,
}

impl Target {
    /// Starts `exe` with `threads` threads in `mode` (`b` busy, `s` sleeping, `k`
    /// blocked or `o` overhead), with the shared file at `shm`, and waits until every
    /// thread has started.
    pub fn start(exe: &Path, shm: &Path, threads: usize, mode: char) -> Result<Target> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(shm)
            .with_context(|| format!("creating {}", shm.display()))?;
        file.set_len(SHM_BYTES as u64)?;
        // SAFETY: a fresh shared mapping of a file we sized; only accessed through
        // atomic 8-byte operations at in-bounds, aligned offsets.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SHM_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            bail!(
                "mapping {}: {}",
                shm.display(),
                std::io::Error::last_os_error()
            );
        }
        let child = super::super::dies_with_us(&mut Command::new(exe))
            .arg(shm)
            .arg(threads.to_string())
            .arg(mode.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        // (first measuring slot, measuring slots, threads that count themselves started)
        let (first, slots, started) = match mode {
            's' => (0, threads + 1, threads + 1),
            // Blocked threads never run again after starting: only the observer measures.
            'k' => (threads, 1, threads + 1),
            'o' => (0, 0, 1),
            _ => (0, threads, threads),
        };
        let mut t = Target {
            child,
            map: map.cast(),
            slots,
            first,
            generation: 0,
        };
        let want = started as u64;
        let deadline = Instant::now() + ACK_TIMEOUT;
        while t.load(1) < want {
            if Instant::now() > deadline {
                bail!("the target started {} of {want} threads", t.load(1));
            }
            if let Some(s) = t.child.try_wait()? {
                bail!("the target exited ({s}) at start");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(t)
    }

    /// The target's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time each of the target's threads has spent runnable but waiting for a CPU
    /// (`run_delay` of /proc/PID/task/TID/schedstat), in ns, by thread id. A ptrace
    /// stop does not count there, so it separates preemption from our stop.
    pub fn run_delays(&self) -> std::collections::BTreeMap<u32, u64> {
        let mut out = std::collections::BTreeMap::new();
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return out;
        };
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(e.path().join("schedstat")) else {
                continue;
            };
            if let Some(d) = text.split_whitespace().nth(1).and_then(|v| v.parse().ok()) {
                out.insert(tid, d);
            }
        }
        out
    }

    fn word(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(i < SHM_BYTES / 8);
        // SAFETY: in bounds of the live mapping (checked above), 8-aligned; the
        // target accesses the same words atomically.
        unsafe { &*(self.map.add(i) as *const std::sync::atomic::AtomicU64) }
    }

    /// Reads word `i` of the shared file.
    pub fn load(&self, i: usize) -> u64 {
        self.word(i).load(std::sync::atomic::Ordering::Acquire)
    }

    /// Closes the current window: bumps the generation, waits until every thread
    /// acknowledged it, and returns the largest gap (ns) any thread saw in the window.
    pub fn close_window(&mut self) -> Result<u64> {
        self.generation += 1;
        let g = self.generation;
        self.word(0).store(g, std::sync::atomic::Ordering::Release);
        let deadline = Instant::now() + ACK_TIMEOUT;
        for s in self.measuring() {
            while self.load(Self::slot(s)) != g {
                if Instant::now() > deadline {
                    bail!("target thread {s} did not acknowledge within {ACK_TIMEOUT:?}");
                }
                if let Some(st) = self.child.try_wait()? {
                    bail!("the target exited ({st})");
                }
                std::thread::yield_now();
            }
        }
        Ok(self
            .measuring()
            .map(|s| self.load(Self::slot(s) + 1))
            .max()
            .unwrap_or(0))
    }

    /// The slots of the threads that measure.
    fn measuring(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.slots
    }

    /// First word of thread `s`'s slot.
    fn slot(s: usize) -> usize {
        SLOT_BASE + SLOT_WORDS * s
    }

    /// The longest gap any thread recorded that overlaps `[start, end]` (ns, the
    /// shared monotonic clock), as its `[from, to]`: how long the threads were held by
    /// a stop the tool reports at that time, apart from gaps elsewhere in the window.
    /// None when no thread recorded a gap there (a sleeping thread whose wake-up the
    /// stop did not delay). Call after [`Self::close_window`], when every thread has
    /// run again.
    pub fn gap_overlapping(&self, [start, end]: [u64; 2]) -> Option<[u64; 2]> {
        let mut longest: Option<[u64; 2]> = None;
        for s in self.measuring() {
            let base = Self::slot(s);
            let n = self.load(base + 2) as usize;
            for j in n.saturating_sub(RING)..n {
                let e = base + 4 + 2 * (j % RING);
                let (from, to) = (self.load(e), self.load(e + 1));
                // The thread runs on and reuses ring slots: an entry rewritten while we
                // read it (index j + RING started) would pair one gap's start with
                // another's end. The thread publishes its count after each entry.
                std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
                if self.load(base + 2) as usize >= j + RING {
                    continue;
                }
                let len = to.saturating_sub(from);
                if from <= end
                    && to >= start
                    && longest.is_none_or(|[f, t]| len > t.saturating_sub(f))
                {
                    longest = Some([from, to]);
                }
            }
        }
        longest
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // SAFETY: the mapping made in `start`, no longer used.
        unsafe { libc::munmap(self.map.cast(), SHM_BYTES) };
    }
}

/// One `livecare patch`/`unpatch` run: its wall time and the pause it reported.
pub struct Op {
    /// Wall time of the command, µs.
    pub wall_us: f64,
    /// Pause reported by the tool, µs.
    pub tool_pause_us: u64,
    /// Functions it patched or restored.
    pub hunks: usize,
    /// Commit attempts the tool reported (1 when the first stop was safe; 1 for unpatch).
    pub attempts: u64,
    /// The commit's stop as the tool reports it: first stop, last resume (monotonic ns).
    pub window_ns: Option<[u64; 2]>,
    /// Threads the commit left blocked in their syscalls instead of stopping them
    /// (0 when the tool does not report it).
    pub threads_fenced: u64,
    /// Every stop of the target the command made: phase and window (monotonic ns).
    pub stops: Vec<(String, [u64; 2])>,
}

/// Runs `livecare patch -p PID --json PATCH` (or `unpatch` when `patch` is None).
pub fn run_op(pid: u32, patch: Option<&Path>) -> Result<Op> {
    let mut c = Command::new(livecare()?);
    match patch {
        Some(p) => c.args(["patch", "--json", "-p", &pid.to_string()]).arg(p),
        None => c.args(["unpatch", "--json", "-p", &pid.to_string()]),
    };
    let start = Instant::now();
    let out = c.output().context("running livecare")?;
    let wall_us = start.elapsed().as_secs_f64() * 1e6;
    let what = if patch.is_some() { "patch" } else { "unpatch" };
    if !out.status.success() {
        bail!(
            "`livecare {what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing the JSON of `livecare {what}`"))?;
    let key = if patch.is_some() {
        "patched"
    } else {
        "unpatched"
    };
    let r = doc
        .get(key)
        .and_then(|v| v.get(0))
        .with_context(|| format!("`livecare {what}` reported nothing: {doc}"))?;
    let tool_pause_us = r
        .get("pause_us")
        .and_then(|v| v.as_u64())
        .with_context(|| format!("no pause_us in {r}"))?;
    let hunks = match r.get("hunks") {
        Some(serde_json::Value::Array(a)) => a.len(),
        Some(v) => v.as_u64().unwrap_or(0) as usize,
        None => 0,
    };
    let attempts = r.get("attempts").and_then(|v| v.as_u64()).unwrap_or(1);
    let threads_fenced = r
        .get("threads_fenced")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let window_ns = match r.get("pause_window_ns").and_then(|v| v.as_array()) {
        Some(a) if a.len() == 2 => a[0].as_u64().zip(a[1].as_u64()).map(|(s, e)| [s, e]),
        _ => None,
    };
    let stops = doc
        .get("stops")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter(|s| s.get("pid").and_then(|p| p.as_u64()) == Some(pid as u64))
        .filter_map(|s| {
            let w = s.get("window_ns")?.as_array()?;
            let phase = s.get("phase")?.as_str()?.to_string();
            Some((phase, [w.first()?.as_u64()?, w.get(1)?.as_u64()?]))
        })
        .collect();
    Ok(Op {
        wall_us,
        tool_pause_us,
        hunks,
        attempts,
        window_ns,
        threads_fenced,
        stops,
    })
}
