//! `patch`: apply a patch file or directory to one process or to all of them.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use livecare_apply::{ApplyReport, Error as ApplyError, Options};
use livecare_process::Pid;

/// Flags of `patch`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Process id or `all`.
    #[arg(short = 'p', required = true)]
    pub pid: String,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for threads to leave the functions being replaced.
    #[arg(long, default_value_t = 3.0)]
    pub timeout: f64,
    /// With `-p all`: how many processes to patch at once (default: one per CPU).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Patch file or directory.
    pub patch: std::path::PathBuf,
}

/// What happened to one process of `-p all`.
enum Outcome {
    /// No object any patch is for (or the process went away): not counted.
    Skipped,
    /// Patched.
    Patched(Vec<ApplyReport>),
    /// Failed; the message says why.
    Failed(ApplyError),
}

/// Patches one process; with `all`, processes without a matching object are skipped.
fn patch_one(pid: Pid, all: bool, patches: &[livecare_apply::Patch], opts: &Options) -> Outcome {
    let result = if all {
        // Only processes with an object some patch is for count; the others
        // (including ones we cannot read or that exit meanwhile) are skipped. The
        // build-ids in the files' headers rule most processes out before any object
        // file is read in full.
        let ids: Vec<&str> = patches.iter().map(|p| p.build_id.as_str()).collect();
        let Ok(Some(objects)) = livecare_process::LoadedObject::if_any_build_id_in(pid, &ids)
        else {
            return Outcome::Skipped;
        };
        if livecare_apply::matching_patches(patches, &objects).is_empty() {
            return Outcome::Skipped;
        }
        livecare_apply::apply_to_objects(pid, patches, objects, opts)
    } else {
        livecare_apply::apply(pid, patches, opts)
    };
    match result {
        Ok(reports) => Outcome::Patched(reports),
        Err(ApplyError::NoMatchingObject { .. }) if all => Outcome::Skipped,
        Err(e)
            if all
                && matches!(e, ApplyError::Process(_))
                && !std::path::Path::new(&format!("/proc/{}", pid.0)).exists() =>
        {
            Outcome::Skipped
        }
        Err(e) => Outcome::Failed(e),
    }
}

/// Runs `each` over `pids` on up to `jobs` threads (each thread is the ptrace tracer
/// of the processes it takes); results come back in `pids` order.
pub(crate) fn in_parallel<T: Send>(
    pids: &[Pid],
    jobs: usize,
    each: impl Fn(Pid) -> T + Sync,
) -> Vec<T> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, T)>> = Mutex::new(Vec::with_capacity(pids.len()));
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, pids.len().max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&pid) = pids.get(i) else { break };
                let outcome = each(pid);
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((i, outcome));
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, o)| o).collect()
}

/// `--jobs`, or one job per CPU.
pub(crate) fn jobs_or_cpus(jobs: Option<usize>) -> usize {
    jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The processes `-p` names: one pid, or every process but ourselves and init. Kernel
/// threads are not filtered here: they map nothing, so the build-id and region scans
/// skip them, and asking each process for its flags first cost three syscalls per
/// process in `/proc`.
pub(crate) fn targets(spec: &str) -> anyhow::Result<(Vec<Pid>, bool)> {
    if spec == "all" {
        let me = std::process::id() as i32;
        let pids = Pid::all()
            .into_iter()
            .filter(|p| p.0 != me && p.0 != 1)
            .collect();
        return Ok((pids, true));
    }
    let n: i32 = spec
        .parse()
        .with_context(|| format!("-p {spec:?}: expected a process id or `all`"))?;
    Ok((vec![Pid(n)], false))
}

/// For human output: how many blocked threads the pause did not stop.
pub(crate) fn fenced_note(n: usize) -> String {
    match n {
        0 => String::new(),
        1 => " (1 blocked thread left in its syscall)".into(),
        n => format!(" ({n} blocked threads left in their syscalls)"),
    }
}

/// A shortened build-id for human output.
pub(crate) fn short_id(b: &str) -> String {
    if b.len() > 8 {
        format!("{}…", &b[..8])
    } else {
        b.to_string()
    }
}

fn print_report(r: &ApplyReport, face: super::Face) {
    match face {
        super::Face::LibCare => {
            println!(
                "{} patch hunk(s) have been successfully applied to PID '{}'",
                r.hunks.len(),
                r.pid
            )
        }
        super::Face::Native => {
            let names: Vec<&str> = r.hunks.iter().map(|h| h.name.as_str()).collect();
            println!(
                "patched {} function{} ({}) in pid {} ({}, build-id {}), paused {} µs{}",
                r.hunks.len(),
                if r.hunks.len() == 1 { "" } else { "s" },
                names.join(", "),
                r.pid,
                r.comm,
                short_id(&r.build_id),
                r.pause_us,
                fenced_note(r.threads_fenced)
            );
        }
    }
}

/// Runs `patch`.
pub fn run(args: Args, face: super::Face) -> anyhow::Result<ExitCode> {
    let patches = livecare_apply::load_patches(&args.patch)
        .with_context(|| format!("loading {}", args.patch.display()))?;
    if patches.is_empty() {
        anyhow::bail!("no patches found in {}", args.patch.display());
    }
    let (pids, all) = targets(&args.pid)?;
    let opts = Options {
        timeout: Duration::from_secs_f64(args.timeout.max(0.0)),
        hold: false,
        // One process at a time: the other CPUs are spare during its pauses.
        spin_cpus: !all,
        // Threads blocked in a syscall stay in it during the commit (see README).
        fence_idle: std::env::var_os("LIVECARE_NO_FENCE").is_none(),
    };
    let mut ok: Vec<ApplyReport> = Vec::new();
    let mut failed: Vec<(Pid, String)> = Vec::new();
    let outcomes = if all {
        in_parallel(&pids, jobs_or_cpus(args.jobs), |pid| {
            patch_one(pid, true, &patches, &opts)
        })
    } else {
        pids.iter()
            .map(|&pid| patch_one(pid, false, &patches, &opts))
            .collect()
    };
    for (pid, outcome) in pids.iter().zip(outcomes) {
        match outcome {
            Outcome::Skipped => {}
            Outcome::Patched(reports) => ok.extend(reports),
            Outcome::Failed(e) if !all => {
                return Err(anyhow::Error::new(e).context(format!("patching pid {pid}")));
            }
            Outcome::Failed(e) => failed.push((*pid, format!("{e}"))),
        }
    }
    if args.json {
        let doc = serde_json::json!({
            "patched": ok,
            "failed": failed.iter().map(|(p, e)| serde_json::json!({"pid": p.0, "error": e})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for r in &ok {
            print_report(r, face);
        }
        for (p, e) in &failed {
            eprintln!("pid {p} ({}): {e}", p.comm());
        }
    }
    if all && ok.is_empty() && failed.is_empty() {
        let ids: Vec<&str> = patches.iter().map(|p| p.build_id.as_str()).collect();
        anyhow::bail!("no process has an object with build-id {}", ids.join(", "));
    }
    if !failed.is_empty() {
        return Ok(ExitCode::from(if ok.is_empty() {
            super::EXIT_ERROR
        } else {
            super::EXIT_PARTIAL
        }));
    }
    Ok(ExitCode::SUCCESS)
}
