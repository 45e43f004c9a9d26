//! `livecare bench`: pause-time, call-overhead and gensrc throughput figures.
//!
//! `pause` and `overhead` build their own target program (generated C, see
//! `bench/target.rs`) and its patch through the normal pipeline, start it, and run the
//! real `livecare patch`/`unpatch` commands against it. The target itself measures
//! what it suffers: each thread records the gaps between its consecutive monotonic
//! clock readings (a sleeping thread: how late each wake-up came), so the pause
//! figures are the truth as seen from inside, next to the pause the tool reports about
//! itself. `--threads N` busy means a process of exactly N threads (main is one).
//! `--blocked` gives N idle workers blocked in the kernel (a condition variable nobody
//! signals) plus one spinning observer, the only thread that measures: what the stop
//! costs a running thread when most of the process sleeps. `threads_fenced_*` is what
//! the tool reports of those it left in their syscalls instead of stopping them.
//!
//! `pause_us_*` is, per command, the longest gap of any thread that overlaps the
//! commit's stop as the tool reports it in the shared monotonic clock
//! (`pause_window_ns`): how long the stop held the threads, from each thread's last
//! reading before it to its first after it (so it includes the wake-up after the
//! resume). `entry_us_*` is the part before the tool's first INTERRUPT (≈ 0: the
//! window opens before a thread can stop) and `exit_us_*` the part after its last
//! resume (the thread being woken and run). `window_gap_us_*` is the largest gap over the whole command, which also
//! holds the remote mmap's borrowed thread and any preemption of the target (by the
//! tool's own prepare work or by other load); `baseline_gap_us_*` gives that figure
//! over an idle window of the same length to read it against. With more busy threads
//! than CPUs the two are equal: scheduling, not the stop, dominates.
//! `runqueue_wait_us_*` is, per command, the largest total time one target thread spent
//! runnable but without a CPU during the window (schedstat `run_delay`; a ptrace stop
//! does not count): when it exceeds the observed gap, preemption explains the gap.
//! `stall_us_*` is, per command, the longest gap of any thread that overlaps any stop
//! the tool made (every phase: the commit, the borrowed thread's remote syscalls, the
//! reclaim's stop, the detach), from the `stops` of its `--json` report: the worst
//! stall of the whole command. `phases` breaks it down: per phase, that gap and the
//! stop's length as the tool timed it. `*_over_baseline` divides a median by the idle
//! baseline's median from the same run.
//! Top-level pause keys are those of `patch`; `unpatch` has its own object.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

mod all;
mod build;
mod target;

/// Flags of `livecare bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Which benchmark to run.
    #[command(subcommand)]
    pub what: What,
}

/// The benchmarks.
#[derive(clap::Subcommand, Debug)]
pub enum What {
    /// Pause of patch/unpatch as seen by the target's threads and by the tool.
    Pause(PauseArgs),
    /// Calls/s of a patched function against the unpatched one.
    Overhead(OverheadArgs),
    /// Throughput of gensrc (a file against itself) and of the filter.
    Gensrc(GensrcArgs),
    /// Cost per process of `patch -p all`, `--jobs 1` against parallel.
    All(all::AllArgs),
    /// Time of a patch build against the plain build, and the patch's size.
    Build(build::BuildArgs),
}

/// Flags of `livecare bench pause`.
#[derive(clap::Args, Debug)]
pub struct PauseArgs {
    /// Target threads (sleeping and blocked modes add one spinning observer).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Threads spin reading the clock (the default).
    #[arg(long, conflicts_with_all = ["sleeping", "blocked"])]
    pub busy: bool,
    /// Threads sleep to 1 ms deadlines and record their lateness; one extra thread spins.
    #[arg(long, conflicts_with = "blocked")]
    pub sleeping: bool,
    /// Threads block forever on a condition variable (idle workers); one extra thread
    /// spins and is the only one that measures.
    #[arg(long)]
    pub blocked: bool,
    /// Functions the patch replaces.
    #[arg(long, default_value_t = 1)]
    pub functions: usize,
    /// Patch/unpatch cycles.
    #[arg(long, default_value_t = 50)]
    pub cycles: usize,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `livecare bench overhead`.
#[derive(clap::Args, Debug)]
pub struct OverheadArgs {
    /// Length of each counting window, in ms.
    #[arg(long, default_value_t = 500)]
    pub window_ms: u64,
    /// Unpatched/patched window pairs.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `livecare bench gensrc`.
#[derive(clap::Args, Debug)]
pub struct GensrcArgs {
    /// Assembly file, or a `.c` file compiled with `gcc -S -O2 -g` first.
    pub file: PathBuf,
    /// Minimum measuring time per operation, in ms.
    #[arg(long, default_value_t = 2000)]
    pub min_ms: u64,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Runs `livecare bench`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let doc = match args.what {
        What::Pause(a) => {
            let json = a.json;
            (pause(&a)?, json)
        }
        What::Overhead(a) => {
            let json = a.json;
            (overhead(&a)?, json)
        }
        What::Gensrc(a) => {
            let json = a.json;
            (gensrc(&a)?, json)
        }
        What::All(a) => (all::all(&a)?, a.json),
        What::Build(a) => (build::build(&a)?, a.json),
    };
    match doc {
        (d, true) => println!("{}", serde_json::to_string_pretty(&d)?),
        (d, false) => print_human(&d),
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the flat fields of `doc`, then each nested object indented.
fn print_human(doc: &serde_json::Value) {
    fn show(v: &serde_json::Value, indent: usize) {
        if let Some(m) = v.as_object() {
            for (k, v) in m {
                if v.is_object() {
                    println!("{:indent$}{k}:", "");
                    show(v, indent + 2);
                } else {
                    println!("{:indent$}{k}: {v}", "");
                }
            }
        }
    }
    show(doc, 0);
}

/// The 1-minute load average, to read figures against.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Median, p99 (nearest rank) and max of `v`; zeros when empty.
fn summary(v: &[f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    let rank = ((0.99 * n as f64).ceil() as usize).clamp(1, n);
    (median, s[rank - 1], s[n - 1])
}

/// Rounds to 0.1.
fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Figures of one kind of operation (patch or unpatch).
#[derive(Default)]
struct Samples {
    /// Longest gap of any target thread that overlaps the tool's stop, µs.
    pause: Vec<f64>,
    /// From the start of that gap to the tool's first INTERRUPT, µs (0 when the window opens first).
    entry: Vec<f64>,
    /// From the tool's last resume to the end of that gap, µs: the thread's wake-up.
    exit: Vec<f64>,
    /// Largest gap seen by any target thread during the whole command, µs.
    window: Vec<f64>,
    /// Same, over an idle window as long as the command.
    baseline: Vec<f64>,
    /// The tool's own figure, µs.
    tool: Vec<f64>,
    /// Command wall time, µs.
    wall: Vec<f64>,
    /// Commit attempts per command.
    attempts: Vec<f64>,
    /// Largest total time one target thread waited for a CPU during the command, µs.
    runqueue: Vec<f64>,
    /// Threads the commit left in their syscalls instead of stopping them.
    fenced: Vec<f64>,
    /// Cycles whose held gap was longer than their window's largest gap. The held gap
    /// lies inside the window, so any such cycle means the measuring itself is wrong.
    window_misses: u64,
    /// Per command, the longest gap of any target thread that overlaps any stop the
    /// tool made (commit, borrowed thread, reclaim, detach), µs: its worst stall.
    stall: Vec<f64>,
    /// Per phase, per command it occurred in: (longest gap overlapping its stops,
    /// longest of its stops as the tool timed them), µs.
    phases: std::collections::BTreeMap<String, Vec<(f64, f64)>>,
}

impl Samples {
    fn json(&self) -> serde_json::Value {
        let (pm, p99, pmax) = summary(&self.pause);
        let (tm, t99, tmax) = summary(&self.tool);
        let (bm, b99, _) = summary(&self.baseline);
        let (gm, g99, gmax) = summary(&self.window);
        let (wm, w99, _) = summary(&self.wall);
        let (_, _, amax) = summary(&self.attempts);
        let (rm, r99, _) = summary(&self.runqueue);
        let (em, e99, _) = summary(&self.entry);
        let (xm, x99, _) = summary(&self.exit);
        let amean = self.attempts.iter().sum::<f64>() / self.attempts.len().max(1) as f64;
        let (fm, _, _) = summary(&self.fenced);
        let fmean = self.fenced.iter().sum::<f64>() / self.fenced.len().max(1) as f64;
        let (sm, s99, smax) = summary(&self.stall);
        let ratio = |x: f64| {
            if bm > 0.0 {
                (x / bm * 100.0).round() / 100.0
            } else {
                0.0
            }
        };
        let phases: serde_json::Map<String, serde_json::Value> = self
            .phases
            .iter()
            .map(|(name, v)| {
                let held: Vec<f64> = v.iter().map(|x| x.0).collect();
                let tool: Vec<f64> = v.iter().map(|x| x.1).collect();
                let (hm, _, hmax) = summary(&held);
                let (tm, _, tmax) = summary(&tool);
                (
                    name.clone(),
                    json!({
                        "commands": v.len(),
                        "stall_us_median": r1(hm),
                        "stall_us_max": r1(hmax),
                        "tool_us_median": r1(tm),
                        "tool_us_max": r1(tmax),
                    }),
                )
            })
            .collect();
        json!({
            "stall_us_median": r1(sm),
            "stall_us_p99": r1(s99),
            "stall_us_max": r1(smax),
            "stall_over_baseline": ratio(sm),
            "pause_over_baseline": ratio(pm),
            "window_gap_over_baseline": ratio(gm),
            "phases": phases,
            "pause_us_median": r1(pm),
            "pause_us_p99": r1(p99),
            "pause_us_max": r1(pmax),
            "tool_pause_us_median": r1(tm),
            "tool_pause_us_p99": r1(t99),
            "tool_pause_us_max": r1(tmax),
            "entry_us_median": r1(em),
            "entry_us_p99": r1(e99),
            "exit_us_median": r1(xm),
            "exit_us_p99": r1(x99),
            "window_gap_us_median": r1(gm),
            "window_gap_us_p99": r1(g99),
            "window_gap_us_max": r1(gmax),
            "baseline_gap_us_median": r1(bm),
            "baseline_gap_us_p99": r1(b99),
            "wall_ms_median": (wm / 10.0).round() / 100.0,
            "wall_ms_p99": (w99 / 10.0).round() / 100.0,
            "runqueue_wait_us_median": r1(rm),
            "runqueue_wait_us_p99": r1(r99),
            "attempts_mean": (amean * 100.0).round() / 100.0,
            "attempts_max": amax,
            "threads_fenced_median": fm,
            "threads_fenced_mean": (fmean * 100.0).round() / 100.0,
            "window_misses": self.window_misses,
        })
    }
}

/// A scratch directory for a benchmark's files.
/// `LIVECARE_BENCH_KEEP=1` keeps it (target and patch), for profiling by hand.
fn scratch() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("livecare-bench-")
        .disable_cleanup(std::env::var_os("LIVECARE_BENCH_KEEP").is_some())
        .tempdir()
        .context("creating a temporary directory")
}

/// Runs one patch or unpatch inside a measuring window, preceded by an idle window
/// of the previous command's length (the baseline: what scheduling alone costs).
fn measured(t: &mut target::Target, patch: Option<&Path>, s: &mut Samples) -> Result<()> {
    let idle = s.wall.last().copied().unwrap_or(1000.0);
    t.close_window()?;
    std::thread::sleep(Duration::from_secs_f64(idle / 1e6));
    let base = t.close_window()?;
    let before = t.run_delays();
    let op = target::run_op(t.pid(), patch)?;
    let gap = t.close_window()?;
    let after = t.run_delays();
    let waited = after
        .iter()
        .filter_map(|(tid, a)| before.get(tid).map(|b| a.saturating_sub(*b)))
        .max()
        .unwrap_or(0);
    s.runqueue.push(waited as f64 / 1e3);
    let window = op
        .window_ns
        .context("the tool reported no pause window (pause_window_ns)")?;
    s.baseline.push(base as f64 / 1e3);
    let held = t.gap_overlapping(window);
    let [from, to] = held.unwrap_or(window);
    let held_ns = held.map_or(0, |[f, t]| t.saturating_sub(f));
    if held_ns > gap {
        s.window_misses += 1;
    }
    s.window.push(gap as f64 / 1e3);
    s.pause.push(held_ns as f64 / 1e3);
    if held.is_some() {
        s.entry.push(window[0].saturating_sub(from) as f64 / 1e3);
        s.exit.push(to.saturating_sub(window[1]) as f64 / 1e3);
    }
    // Each stop: the longest gap of a target thread overlapping it.
    let mut stall = 0.0f64;
    let mut per_phase: std::collections::BTreeMap<&str, (f64, f64)> = Default::default();
    for (phase, w) in &op.stops {
        let held = t
            .gap_overlapping(*w)
            .map_or(0.0, |[f, to]| to.saturating_sub(f) as f64 / 1e3);
        let tool = w[1].saturating_sub(w[0]) as f64 / 1e3;
        stall = stall.max(held);
        let e = per_phase.entry(phase).or_default();
        *e = (e.0.max(held), e.1.max(tool));
    }
    s.stall.push(stall);
    for (phase, v) in per_phase {
        s.phases.entry(phase.to_string()).or_default().push(v);
    }
    s.tool.push(op.tool_pause_us as f64);
    s.wall.push(op.wall_us);
    s.attempts.push(op.attempts as f64);
    s.fenced.push(op.threads_fenced as f64);
    Ok(())
}

/// `livecare bench pause`.
fn pause(a: &PauseArgs) -> Result<serde_json::Value> {
    if a.threads == 0 || a.threads > 1000 {
        bail!("--threads must be between 1 and 1000");
    }
    if a.functions == 0 || a.functions > 10000 {
        bail!("--functions must be between 1 and 10000");
    }
    if a.cycles == 0 {
        bail!("--cycles must be at least 1");
    }
    let dir = scratch()?;
    let built = target::build(dir.path(), a.functions).context("building the bench target")?;
    let (mode, mode_name) = if a.sleeping {
        ('s', "sleeping")
    } else if a.blocked {
        ('k', "blocked")
    } else {
        ('b', "busy")
    };
    let mut t = target::Target::start(&built.exe, &dir.path().join("shm"), a.threads, mode)?;
    let (mut p, mut u) = (Samples::default(), Samples::default());
    let load_before = load_average();
    for cycle in 0..a.cycles {
        measured(&mut t, Some(&built.patch), &mut p)
            .with_context(|| format!("cycle {cycle}: patch"))?;
        measured(&mut t, None, &mut u).with_context(|| format!("cycle {cycle}: unpatch"))?;
    }
    // The patch must really have replaced every function.
    let op = target::run_op(t.pid(), Some(&built.patch))?;
    if op.hunks != a.functions {
        bail!(
            "the patch replaced {} functions, expected {}",
            op.hunks,
            a.functions
        );
    }
    let mut doc = p.json();
    let m = doc.as_object_mut().context("summary is an object")?;
    m.insert("mode".into(), json!(mode_name));
    m.insert("threads".into(), json!(a.threads));
    m.insert("measuring_threads".into(), json!(t.slots));
    m.insert("functions".into(), json!(a.functions));
    m.insert("cycles".into(), json!(a.cycles));
    m.insert("patch".into(), p.json());
    m.insert("unpatch".into(), u.json());
    m.insert("loadavg_before".into(), json!(load_before));
    m.insert("loadavg_after".into(), json!(load_average()));
    Ok(doc)
}

/// Calls/s of the overhead target over one window, and the value `bench_f0(0)` had.
fn call_rate(t: &target::Target, window: Duration) -> Result<(f64, u64)> {
    let (n0, t0) = (t.load(3), Instant::now());
    std::thread::sleep(window);
    let (n1, t1) = (t.load(3), Instant::now());
    if n1 <= n0 {
        bail!("the overhead target made no calls in {window:?}");
    }
    Ok(((n1 - n0) as f64 / (t1 - t0).as_secs_f64(), t.load(2)))
}

/// `livecare bench overhead`.
fn overhead(a: &OverheadArgs) -> Result<serde_json::Value> {
    if a.rounds == 0 || a.window_ms == 0 {
        bail!("--rounds and --window-ms must be positive");
    }
    let dir = scratch()?;
    let built = target::build(dir.path(), 1).context("building the bench target")?;
    let t = target::Target::start(&built.exe, &dir.path().join("shm"), 1, 'o')?;
    let window = Duration::from_millis(a.window_ms);
    // Let the counter publish once before the first window.
    std::thread::sleep(Duration::from_millis(20));
    let load_before = load_average();
    let (mut orig, mut patched) = (Vec::new(), Vec::new());
    for _ in 0..a.rounds {
        let (r, v) = call_rate(&t, window)?;
        if v != 1 {
            bail!("unpatched bench_f0(0) returned {v}, expected 1");
        }
        orig.push(r);
        target::run_op(t.pid(), Some(&built.patch))?;
        std::thread::sleep(Duration::from_millis(5));
        let (r, v) = call_rate(&t, window)?;
        if v != 2 {
            bail!("patched bench_f0(0) returned {v}, expected 2: the patch is not in effect");
        }
        patched.push(r);
        target::run_op(t.pid(), None)?;
        std::thread::sleep(Duration::from_millis(5));
    }
    let (om, _, _) = summary(&orig);
    let (pm, _, _) = summary(&patched);
    Ok(json!({
        "unpatched_calls_per_s_median": om.round(),
        "patched_calls_per_s_median": pm.round(),
        "ratio_patched_over_unpatched": (pm / om * 10000.0).round() / 10000.0,
        "overhead_percent": ((1.0 - pm / om) * 10000.0).round() / 100.0,
        "rounds": a.rounds,
        "window_ms": a.window_ms,
        "loadavg_before": load_before,
        "loadavg_after": load_average(),
    }))
}

/// Runs `f` repeatedly for at least `min` (and at least 3 times); returns seconds per run.
fn time_per_run(min: Duration, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    let mut runs = 0u32;
    while runs < 3 || start.elapsed() < min {
        f()?;
        runs += 1;
    }
    Ok(start.elapsed().as_secs_f64() / f64::from(runs))
}

/// `livecare bench gensrc`.
fn gensrc(a: &GensrcArgs) -> Result<serde_json::Value> {
    let dir = scratch()?;
    let asm_path = if a.file.extension().is_some_and(|e| e == "c") {
        let out = dir.path().join("input.s");
        let st = Command::new("gcc")
            .args(["-S", "-O2", "-g"])
            .arg(&a.file)
            .arg("-o")
            .arg(&out)
            .status()
            .context("running gcc -S")?;
        if !st.success() {
            bail!("gcc -S {} failed ({st})", a.file.display());
        }
        out
    } else {
        a.file.clone()
    };
    let src = std::fs::read_to_string(&asm_path)
        .with_context(|| format!("reading {}", asm_path.display()))?;
    let lines = src.lines().count() as f64;
    let mb = src.len() as f64 / 1e6;
    let opts = asm_diff::Options::default();
    let min = Duration::from_millis(a.min_ms);
    let load_before = load_average();
    let g = time_per_run(min, || {
        asm_diff::gensrc(&src, &src, &opts)
            .map(|_| ())
            .context("gensrc of the file against itself")
    })?;
    let f = time_per_run(min, || {
        asm_diff::filter(&src, &opts)
            .map(|_| ())
            .context("filtering the file")
    })?;
    Ok(json!({
        "file": a.file.display().to_string(),
        "lines": lines,
        "bytes": src.len(),
        "gensrc_s": g,
        "gensrc_lines_per_s": (lines / g).round(),
        "gensrc_mb_per_s": r1(mb / g),
        "filter_s": f,
        "filter_lines_per_s": (lines / f).round(),
        "filter_mb_per_s": r1(mb / f),
        "loadavg_before": load_before,
        "loadavg_after": load_average(),
    }))
}
