//! `livecare bench all`: the cost per process of `livecare patch -p all`.
//!
//! Builds (with gcc, through the LibCare pipeline) a small program whose build-id is
//! unique to this run, starts P copies of it, and times whole `livecare patch -p all`
//! commands with `--jobs 1` and with the parallel default (one job per CPU, or
//! `--jobs N`), alternating the two in every round. Each copy rewrites a status file
//! with the value its patched function returns, so after every patch the bench checks
//! that every process really runs the new code, and after every unpatch that it runs
//! the old code again. The figure is wall time of the whole command divided by the
//! number of processes it patched (libpulp's `ulp` was measured at 0.89 ms here).
//! The CPU time of the command (user + system, from `getrusage` of the waited child)
//! per process is reported next to it: on a loaded machine it moves far less than the
//! wall time does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::target::{build_recipe, livecare, Built, Recipe};
use super::{load_average, r1, scratch, summary};

/// Flags of `livecare bench all`.
#[derive(clap::Args, Debug)]
pub struct AllArgs {
    /// Processes to start and patch.
    #[arg(long, default_value_t = 50)]
    pub processes: usize,
    /// Rounds; each times one `--jobs 1` and one parallel patch (and their unpatch).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Jobs of the parallel run (default: what `patch` picks, one per CPU).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// The target: rewrites its status file with `bench_version()` every 20 ms. The nonce
/// makes the build-id (and so the set of processes `-p all` matches) this run's own.
const TARGET_C: &str = r#"#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

__attribute__((used)) static const char bench_nonce[] = "@NONCE@";

/* Read through a volatile so the function is longer than the 5-byte jump. */
static volatile int bench_base;

__attribute__((noipa)) int bench_version(void)
{
	return bench_base + @VERSION@;
}

int main(int argc, char **argv)
{
	char buf[32];
	int fd;
	if (argc < 2)
		return 2;
	fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		return 1;
	for (;;) {
		int n = snprintf(buf, sizeof buf, "v%d\n", bench_version());
		if (pwrite(fd, buf, n, 0) != n)
			return 1;
		usleep(20000);
	}
}
"#;

/// How long a process may take to show the expected version.
const SETTLE: Duration = Duration::from_secs(10);

/// Builds the target and its patch in `dir` (`bench_version` returns 2 when patched);
/// a nonce in the source gives this run's target a build-id of its own.
fn build(dir: &Path) -> Result<Built> {
    let nonce = format!(
        "livecare-bench-all-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let src = |version: u32| {
        TARGET_C
            .replace("@NONCE@", &nonce)
            .replace("@VERSION@", &version.to_string())
    };
    build_recipe(
        dir,
        &Recipe {
            sources: [src(1), src(2)],
            cflags: &["-O2", "-g", "-fPIE"],
            ldflags: &[],
            exe_name: "bench-all-target",
            patch_id: "benchal",
        },
    )
}

/// The started copies of the target; killed on drop.
struct Fleet {
    children: Vec<Child>,
    status: Vec<PathBuf>,
}

impl Fleet {
    fn start(exe: &Path, dir: &Path, n: usize) -> Result<Fleet> {
        let mut f = Fleet {
            children: Vec::with_capacity(n),
            status: Vec::with_capacity(n),
        };
        for i in 0..n {
            let status = dir.join(format!("status-{i}"));
            let child = super::super::dies_with_us(&mut Command::new(exe))
                .arg(&status)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", exe.display()))?;
            f.children.push(child);
            f.status.push(status);
        }
        f.wait_for(1)?;
        Ok(f)
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Waits until every process has written `v{version}` (it rewrites its status
    /// every 20 ms), or fails naming the processes that did not.
    fn wait_for(&self, version: u32) -> Result<()> {
        let want = format!("v{version}\n");
        let deadline = Instant::now() + SETTLE;
        let mut pending: Vec<usize> = (0..self.status.len()).collect();
        loop {
            pending.retain(|&i| {
                std::fs::read_to_string(&self.status[i]).ok().as_deref() != Some(&want)
            });
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let pids: Vec<u32> = pending.iter().map(|&i| self.children[i].id()).collect();
                bail!(
                    "{} of {} processes do not run version {version} after {SETTLE:?}: pids {pids:?}",
                    pending.len(),
                    self.status.len()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

/// CPU time (user + system) of every child waited for so far, ms.
fn children_cpu_ms() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_CHILDREN is a valid `who`.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) } != 0 {
        return 0.0;
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(u.ru_utime) + ms(u.ru_stime)
}

/// Wall and CPU time of one command, ms.
#[derive(Clone, Copy)]
struct Cost {
    wall: f64,
    cpu: f64,
}

/// Runs `livecare ARGS --json`, returns its wall and CPU time and JSON output. CPU
/// time is much less sensitive than wall time to other load on the machine.
fn timed(args: &[&str]) -> Result<(Cost, serde_json::Value)> {
    let mut c = Command::new(livecare()?);
    c.args(args).arg("--json");
    let cpu0 = children_cpu_ms();
    let start = Instant::now();
    let out = c.output().context("running livecare")?;
    let ms = Cost {
        wall: start.elapsed().as_secs_f64() * 1e3,
        cpu: children_cpu_ms() - cpu0,
    };
    if !out.status.success() {
        bail!(
            "`livecare {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let doc = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing the JSON of `livecare {}`", args.join(" ")))?;
    Ok((ms, doc))
}

/// The pids a `patch`/`unpatch` JSON document lists under `key`.
fn listed(doc: &serde_json::Value, key: &str) -> Vec<u32> {
    let mut v: Vec<u32> = doc
        .get(key)
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|r| r.get("pid").and_then(|p| p.as_u64()))
                .map(|p| p as u32)
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v.dedup();
    v
}

/// One `patch -p all` (with `jobs`, or the default) and its `unpatch`, both checked
/// on every process; returns the patch's cost and the unpatch's.
fn cycle(fleet: &Fleet, built: &Built, jobs: Option<usize>) -> Result<(Cost, Cost)> {
    let patch = built.patch.to_string_lossy().into_owned();
    let jobs_s = jobs.map(|j| j.to_string());
    let mut args = vec!["patch", "-p", "all"];
    if let Some(j) = &jobs_s {
        args.extend(["--jobs", j]);
    }
    args.push(&patch);
    let (ms, doc) = timed(&args)?;
    let mut want = fleet.pids();
    want.sort_unstable();
    let got = listed(&doc, "patched");
    if got != want {
        bail!(
            "`patch -p all` patched pids {got:?}, expected {want:?}; failures: {}",
            doc.get("failed").cloned().unwrap_or_default()
        );
    }
    fleet.wait_for(2).context("after patch -p all")?;
    let (ums, udoc) = timed(&["unpatch", "-p", "all", &built.build_id])?;
    let got = listed(&udoc, "unpatched");
    if got != want {
        bail!("`unpatch -p all` restored pids {got:?}, expected {want:?}");
    }
    fleet.wait_for(1).context("after unpatch -p all")?;
    Ok((ms, ums))
}

/// Rounds to 0.001.
fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `livecare bench all`.
pub fn all(a: &AllArgs) -> Result<serde_json::Value> {
    if a.processes == 0 || a.processes > 2000 {
        bail!("--processes must be between 1 and 2000");
    }
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if a.jobs == Some(0) {
        bail!("--jobs must be at least 1");
    }
    let dir = scratch()?;
    let built = build(dir.path()).context("building the bench target")?;
    let fleet = Fleet::start(&built.exe, dir.path(), a.processes)?;
    let parallel_jobs = a
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let load_before = load_average();
    let (mut one, mut par, mut un) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..a.rounds {
        // Alternate which goes first so drift in the machine's load hits both.
        let mut runs = [(true, Some(1)), (false, a.jobs)];
        if round % 2 == 1 {
            runs.reverse();
        }
        for (is_one, jobs) in runs {
            let (ms, ums) = cycle(&fleet, &built, jobs)
                .with_context(|| format!("round {round}, jobs {jobs:?}"))?;
            if is_one { &mut one } else { &mut par }.push(ms);
            un.push(ums);
        }
    }
    let n = a.processes as f64;
    let wall = |v: &[Cost]| summary(&v.iter().map(|c| c.wall).collect::<Vec<_>>());
    let cpu = |v: &[Cost]| summary(&v.iter().map(|c| c.cpu).collect::<Vec<_>>()).0;
    let (m1, _, max1) = wall(&one);
    let (mp, _, maxp) = wall(&par);
    let (mu, _, _) = wall(&un);
    Ok(json!({
        "processes": a.processes,
        "rounds": a.rounds,
        "jobs_parallel": parallel_jobs,
        "all_ms_jobs1_median": r1(m1),
        "all_ms_jobs1_max": r1(max1),
        "all_ms_parallel_median": r1(mp),
        "all_ms_parallel_max": r1(maxp),
        "all_ms_per_process_jobs1": r3(m1 / n),
        "all_ms_per_process_parallel": r3(mp / n),
        "speedup_parallel_over_jobs1": (m1 / mp * 100.0).round() / 100.0,
        "all_cpu_ms_per_process_jobs1": r3(cpu(&one) / n),
        "all_cpu_ms_per_process_parallel": r3(cpu(&par) / n),
        "unpatch_all_ms_median": r1(mu),
        "unpatch_all_ms_per_process": r3(mu / n),
        "unpatch_all_cpu_ms_per_process": r3(cpu(&un) / n),
        "loadavg_before": load_before,
        "loadavg_after": load_average(),
    }))
}
