//! `livecare bench` in its short mode: every benchmark runs against real gcc-built
//! targets and prints its figures; the checks are on shape and sanity, never on
//! magnitudes (CI machines differ).

use std::io::Write as _;
use std::process::Command;

use serde_json::Value;

/// Runs `livecare bench ARGS… --json`, prints the document, and parses it.
fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_livecare"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .expect("running livecare bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Straight to stderr, not through `eprintln!`, which the test harness captures
    // (and shows only on failure): the figures belong in every CI log.
    let _ = writeln!(
        std::io::stderr(),
        "$ livecare bench {} --json\n{stdout}",
        args.join(" ")
    );
    assert!(
        out.status.success(),
        "livecare bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).expect("bench prints one JSON document")
}

fn num(doc: &Value, key: &str) -> f64 {
    doc.get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no numeric {key:?} in {doc}"))
}

/// The stable keys exist, are positive, and p99 ≥ median ≤ max.
fn check_pause_figures(doc: &Value) {
    for k in [
        "pause_us_median",
        "pause_us_p99",
        "pause_us_max",
        "tool_pause_us_median",
        "wall_ms_median",
    ] {
        assert!(num(doc, k) > 0.0, "{k} must be positive in {doc}");
    }
    assert!(num(doc, "pause_us_p99") >= num(doc, "pause_us_median"));
    assert!(num(doc, "pause_us_max") >= num(doc, "pause_us_p99"));
    assert!(num(doc, "tool_pause_us_p99") >= num(doc, "tool_pause_us_median"));
    // The pause is one of the gaps of the command's window (the one holding the
    // tool's stop), so in no cycle does it exceed the window's largest gap, and no
    // order statistic of it exceeds the window's. (A target thread that acknowledged a
    // window's close before noting a gap begun inside it once broke this on a loaded
    // machine.)
    assert_eq!(num(doc, "window_misses"), 0.0, "window_misses in {doc}");
    for q in ["median", "p99", "max"] {
        assert!(
            num(doc, &format!("pause_us_{q}")) <= num(doc, &format!("window_gap_us_{q}")),
            "pause_us_{q} > window_gap_us_{q} in {doc}"
        );
        // The commit is one of the command's stops: its gap is one of those the
        // whole command's worst stall is the largest of, in every cycle.
        assert!(
            num(doc, &format!("pause_us_{q}")) <= num(doc, &format!("stall_us_{q}")),
            "pause_us_{q} > stall_us_{q} in {doc}"
        );
    }
    assert!(
        num(&doc["phases"]["commit"], "tool_us_median") > 0.0,
        "{doc}"
    );
    assert!(num(doc, "stall_over_baseline") > 0.0, "{doc}");
}

#[test]
fn pause_bench_reports_target_and_tool_pauses_for_patch_and_unpatch() {
    for (threads, mode, functions) in [
        ("1", "--busy", "1"),
        ("8", "--busy", "3"),
        ("2", "--sleeping", "2"),
    ] {
        let doc = bench(&[
            "pause",
            "--threads",
            threads,
            mode,
            "--functions",
            functions,
            "--cycles",
            "5",
        ]);
        check_pause_figures(&doc);
        check_pause_figures(&doc["patch"]);
        check_pause_figures(&doc["unpatch"]);
        // The breakdown by phase holds the commit of every command.
        for op in ["patch", "unpatch"] {
            assert_eq!(num(&doc[op]["phases"]["commit"], "commands"), 5.0, "{doc}");
        }
        assert_eq!(num(&doc, "threads"), threads.parse::<f64>().unwrap());
        assert_eq!(num(&doc, "functions"), functions.parse::<f64>().unwrap());
        assert_eq!(num(&doc, "cycles"), 5.0);
        let expected_mode = mode.trim_start_matches("--");
        assert_eq!(doc["mode"], expected_mode, "{doc}");
        // The idle window's figure and the runqueue wait are there to read the pause against.
        assert!(num(&doc, "baseline_gap_us_median") > 0.0);
        assert!(num(&doc, "runqueue_wait_us_p99") >= num(&doc, "runqueue_wait_us_median"));
    }
}

#[test]
fn pause_bench_blocked_mode_measures_the_observer_and_counts_fenced_workers() {
    let doc = bench(&[
        "pause",
        "--threads",
        "8",
        "--blocked",
        "--functions",
        "2",
        "--cycles",
        "4",
    ]);
    assert_eq!(doc["mode"], "blocked", "{doc}");
    assert_eq!(num(&doc, "threads"), 8.0);
    // The blocked workers never run, so only the spinning observer measures.
    assert_eq!(num(&doc, "measuring_threads"), 1.0, "{doc}");
    for op in ["patch", "unpatch"] {
        let d = &doc[op];
        check_pause_figures(d);
        // Workers blocked since before the command are left in their syscalls; the
        // spinning observer never is, so at most the 8 workers are counted.
        let (median, mean) = (
            num(d, "threads_fenced_median"),
            num(d, "threads_fenced_mean"),
        );
        assert!((1.0..=8.0).contains(&median), "{op}: {d}");
        assert!(mean > 0.0 && mean <= 8.0, "{op}: {d}");
    }
    assert_eq!(
        num(&doc, "threads_fenced_median"),
        num(&doc["patch"], "threads_fenced_median")
    );
}

#[test]
fn pause_bench_rejects_two_modes_at_once() {
    let out = Command::new(env!("CARGO_BIN_EXE_livecare"))
        .args(["bench", "pause", "--blocked", "--sleeping"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--blocked"));
}

#[test]
fn overhead_bench_measures_patched_and_unpatched_call_rates() {
    let doc = bench(&["overhead", "--window-ms", "100", "--rounds", "2"]);
    let (u, p) = (
        num(&doc, "unpatched_calls_per_s_median"),
        num(&doc, "patched_calls_per_s_median"),
    );
    assert!(u > 0.0 && p > 0.0, "{doc}");
    let ratio = num(&doc, "ratio_patched_over_unpatched");
    assert!((ratio - p / u).abs() < 1e-3, "{doc}");
}

#[test]
fn gensrc_bench_compiles_a_c_file_and_reports_throughput() {
    let c = testkit::fixture_dir("demo").join("demo.c");
    let doc = bench(&["gensrc", c.to_str().unwrap(), "--min-ms", "50"]);
    assert!(num(&doc, "lines") > 10.0, "{doc}");
    for k in [
        "gensrc_lines_per_s",
        "filter_lines_per_s",
        "gensrc_mb_per_s",
    ] {
        assert!(num(&doc, k) > 0.0, "{k} in {doc}");
    }
}

#[test]
fn bench_rejects_a_missing_gensrc_input() {
    let out = Command::new(env!("CARGO_BIN_EXE_livecare"))
        .args(["bench", "gensrc", "/nonexistent/file.s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/file.s"));
}

#[test]
fn all_bench_patches_every_process_with_one_and_parallel_jobs() {
    let doc = bench(&["all", "--processes", "4", "--rounds", "1"]);
    assert_eq!(num(&doc, "processes"), 4.0);
    assert_eq!(num(&doc, "rounds"), 1.0);
    assert!(num(&doc, "jobs_parallel") >= 1.0, "{doc}");
    for k in [
        "all_ms_jobs1_median",
        "all_ms_parallel_median",
        "all_ms_per_process_jobs1",
        "all_ms_per_process_parallel",
        "unpatch_all_ms_median",
    ] {
        assert!(num(&doc, k) > 0.0, "{k} must be positive in {doc}");
    }
    for k in [
        "all_cpu_ms_per_process_jobs1",
        "all_cpu_ms_per_process_parallel",
        "unpatch_all_cpu_ms_per_process",
    ] {
        assert!(num(&doc, k) >= 0.0, "{k} in {doc}");
    }
    // Per-process figures are the whole command divided by the processes patched
    // (the median is printed to 0.1 ms and the ratio to 1 µs: allow both roundings).
    let per = num(&doc, "all_ms_jobs1_median") / 4.0;
    assert!(
        (num(&doc, "all_ms_per_process_jobs1") - per).abs() <= 0.05 / 4.0 + 0.001,
        "{doc}"
    );
}

/// Children of `pid` whose command name is `comm`, from /proc.
fn children_named(pid: u32, comm: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("reading /proc").flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let ppid = stat[close + 1..].split_whitespace().nth(1);
        if &stat[open + 1..close] == comm && ppid == Some(&pid.to_string()) {
            out.push(p);
        }
    }
    out
}

/// True while `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start().to_owned()))
        .is_some_and(|rest| !rest.starts_with('Z'))
}

#[test]
fn a_killed_pause_bench_takes_its_target_with_it() {
    let mut bench = Command::new(env!("CARGO_BIN_EXE_livecare"))
        .args([
            "bench",
            "pause",
            "--threads",
            "2",
            "--busy",
            "--cycles",
            "100000",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting livecare bench");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let target = loop {
        if let Some(&t) = children_named(bench.id(), "bench-target").first() {
            break t;
        }
        assert!(
            bench.try_wait().expect("waiting").is_none(),
            "the bench ended before its target started"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no bench target after 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // Killed mid-run: no destructor of the bench runs.
    bench.kill().expect("killing the bench");
    bench.wait().expect("reaping the bench");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while alive(target) {
        assert!(
            std::time::Instant::now() < deadline,
            "bench target {target} still runs 10 s after its bench was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `bench build` on a small make project (two libraries and a program; the fix changes
/// one function in each of two of them): the plain build, the patch build in the built
/// tree and in a fresh one are timed, each ratio is that route's time over the plain
/// build's, and each patch size is the size of the file it names.
#[test]
fn build_bench_times_plain_and_patch_builds_and_sizes_the_patches() {
    let fixture = testkit::fixture_dir("project-make");
    let diff = fixture.join("fix.diff");
    let out = tempfile::tempdir().unwrap();
    let args = [
        "build",
        "-C",
        fixture.to_str().unwrap(),
        "--diff",
        diff.to_str().unwrap(),
        "--fresh",
        "--outdir",
        out.path().to_str().unwrap(),
    ];
    let doc = bench(&args);
    let plain = &doc["plain"];
    let (plain_wall, plain_cpu) = (num(plain, "wall_s"), num(plain, "cpu_s"));
    assert!(plain_wall > 0.0 && plain_cpu > 0.0, "{doc}");
    assert!(doc["loadavg_start"].is_string() && doc["loadavg_end"].is_string());
    // Times are printed to 1 ms, ratios to 0.001: allow both roundings.
    let close = |ratio: f64, t: f64, base: f64| {
        let exact = t / base;
        (ratio - exact).abs() <= 0.0006 + exact * 0.0006 / base + 0.001 * exact
    };
    let mut counts = vec![];
    for (route, dir) in [("patch_built_tree", "built"), ("patch_fresh_tree", "fresh")] {
        let r = &doc[route];
        let (wall, cpu) = (num(r, "wall_s"), num(r, "cpu_s"));
        assert!(wall > 0.0 && cpu > 0.0, "{route}: {doc}");
        assert!(
            close(num(r, "ratio_wall"), wall, plain_wall),
            "{route}: {doc}"
        );
        assert!(close(num(r, "ratio_cpu"), cpu, plain_cpu), "{route}: {doc}");
        let patches = r["patches"].as_array().expect("patches");
        let mut sum = 0;
        for p in patches {
            let path = std::path::Path::new(p["path"].as_str().unwrap());
            assert!(path.starts_with(out.path().join(dir)), "{route}: {doc}");
            let bytes = std::fs::metadata(path).unwrap().len();
            assert_eq!(p["bytes"].as_u64(), Some(bytes), "{route}: {doc}");
            sum += bytes;
        }
        assert_eq!(r["patch_bytes"].as_u64(), Some(sum), "{route}: {doc}");
        counts.push(patches.len());
    }
    // ticker and libbar.so: one patch each, by both routes.
    assert_eq!(counts, [2, 2], "{doc}");
    // The fixture itself is left alone (the bench builds in copies).
    assert!(
        !fixture.join("ticker").exists(),
        "the bench built in the fixture"
    );
}
