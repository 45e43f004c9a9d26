//! `patch`: apply a patch file or directory to one process or to all of them.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use livecare_apply::{ApplyReport, Error as ApplyError, Options};
use livecare_process::Pid;

/// Flags of `patch`.
#[derive(clap::Args, Debug)]
#[command(after_help = super::EXIT_HELP)]
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
    /// Apply patch files even when a user other than their owner or root could have
    /// written them or replaced them (the file, or a directory above it, is writable
    /// by group or others, or owned by another user). Refused by default: a patch runs
    /// its code inside the processes it patches.
    #[arg(long)]
    pub allow_insecure_perms: bool,
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
    /// With `-p all`: we may not read its mappings (another user's process), so we
    /// cannot tell whether a patch is for it. Named, and counted as not done.
    Unreadable,
    /// Under LibCare's name: every patch for it is applied already (the same patch, or
    /// a level as high), or none is for its objects: nothing to do, as LibCare says
    /// (exit status 0); the note says why.
    NothingNew(Option<String>),
}

/// `patches` without the ones `pid` holds already (same patch, or for storage levels
/// the same or a higher level applied): LibCare leaves those objects alone, without
/// error, and patches the others. `None` when nothing was left out.
fn not_yet_applied(
    pid: Pid,
    patches: &[livecare_apply::Patch],
) -> Option<Vec<livecare_apply::Patch>> {
    let regions = livecare_apply::find_regions(pid).ok()?;
    let held = |p: &livecare_apply::Patch| {
        regions.iter().any(|r| {
            r.state == livecare_apply::RegionState::Applied
                && r.build_id == p.build_id
                && (r.hash == p.hash
                    || (!p.patch_id.is_empty() && r.patch_id == p.patch_id && p.level == 0)
                    || (p.level > 0 && r.level >= p.level))
        })
    };
    if !patches.iter().any(held) {
        return None;
    }
    Some(patches.iter().filter(|p| !held(p)).cloned().collect())
}

/// Patches one process; with `all`, processes without a matching object are skipped.
/// `skip_applied` (LibCare's name): patches the process holds already are left out.
fn patch_one(
    pid: Pid,
    all: bool,
    patches: &[livecare_apply::Patch],
    opts: &Options,
    skip_applied: bool,
) -> Outcome {
    use std::borrow::Cow;
    let still_to_apply = || -> Option<Cow<'_, [livecare_apply::Patch]>> {
        if !skip_applied {
            return Some(Cow::Borrowed(patches));
        }
        match not_yet_applied(pid, patches) {
            Some(v) if v.is_empty() => None,
            Some(v) => Some(Cow::Owned(v)),
            None => Some(Cow::Borrowed(patches)),
        }
    };
    let result = if all {
        // Only processes with an object some patch is for count; the others
        // (including ones we cannot read or that exit meanwhile) are skipped. The
        // build-ids in the files' headers rule most processes out before any object
        // file is read in full.
        let ids: Vec<&str> = patches.iter().map(|p| p.build_id.as_str()).collect();
        let objects = match livecare_process::LoadedObject::if_any_build_id_in(pid, &ids) {
            Ok(Some(objects)) => objects,
            Ok(None) => return Outcome::Skipped,
            Err(e) if permission_denied(&e) => return Outcome::Unreadable,
            Err(_) => return Outcome::Skipped,
        };
        if livecare_apply::matching_patches(patches, &objects).is_empty() {
            return Outcome::Skipped;
        }
        // Only now, for a process that is a target: the others cost no region scan.
        let Some(todo) = still_to_apply() else {
            return Outcome::NothingNew(None);
        };
        livecare_apply::apply_to_objects(pid, &todo, objects, opts)
    } else {
        let Some(todo) = still_to_apply() else {
            return Outcome::NothingNew(None);
        };
        livecare_apply::apply(pid, &todo, opts)
    };
    match result {
        Ok(reports) => Outcome::Patched(reports),
        Err(ApplyError::NoMatchingObject { .. }) if all => Outcome::Skipped,
        // LibCare: "No patch(es) applicable", exit status 0.
        Err(e @ ApplyError::NoMatchingObject { .. }) if skip_applied => {
            Outcome::NothingNew(Some(e.to_string()))
        }
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

/// True when `e` says we may not read the process (`EACCES`/`EPERM` on its `/proc`).
pub(crate) fn permission_denied(e: &livecare_process::Error) -> bool {
    matches!(e, livecare_process::Error::Proc { err, .. }
        if err.kind() == std::io::ErrorKind::PermissionDenied)
}

/// Refuses, unless `allow`, a patch path others could have written (see
/// [`livecare_apply::check_trusted`]).
pub(crate) fn check_trusted(path: &std::path::Path, allow: bool) -> anyhow::Result<()> {
    if !allow {
        livecare_apply::check_trusted(path)?;
    }
    Ok(())
}

/// Names the processes of `-p all` we could not read, with what it means.
pub(crate) fn unreadable_note(pids: &[Pid], action: &str) -> String {
    let names: Vec<String> = pids.iter().map(|p| format!("{p} ({})", p.comm())).collect();
    format!(
        "{} process{} could not be read (permission denied), so livecare could not {action} them \
         or tell whether a patch is for them; run as root or as their owner to include them: {}",
        pids.len(),
        if pids.len() == 1 { "" } else { "es" },
        names.join(", ")
    )
}

/// What a one-process command knew of its target before it began: enough to tell,
/// when it fails, whether the target died or was changed meanwhile (exit status
/// [`super::EXIT_CHANGED`]) rather than left as it was (exit status 1).
pub(crate) struct Before {
    pid: Pid,
    start: Option<u64>,
    regions: Option<Vec<(u64, u64, livecare_apply::RegionState)>>,
}

impl Before {
    /// Notes `pid`'s start time and its active or half-done patch regions.
    pub(crate) fn take(pid: Pid) -> Before {
        Before {
            pid,
            start: livecare_apply::start_time(pid),
            regions: Self::regions(pid),
        }
    }

    /// Patch regions whose code is live or half live: what a change would show in.
    fn regions(pid: Pid) -> Option<Vec<(u64, u64, livecare_apply::RegionState)>> {
        use livecare_apply::RegionState;
        let mut v: Vec<_> = livecare_apply::find_regions(pid)
            .ok()?
            .into_iter()
            .filter(|r| r.state == RegionState::Applied || r.state.is_incomplete())
            .map(|r| (r.addr, r.seq, r.state))
            .collect();
        v.sort_by_key(|r| (r.0, r.1));
        Some(v)
    }

    /// True while one of the target's threads has not exited.
    fn alive(&self) -> bool {
        let pid = self.pid;
        livecare_apply::start_time(pid) == self.start
            && pid
                .tasks()
                .is_ok_and(|ts| ts.iter().any(|&t| pid.task_alive(t)))
    }

    /// The outcome of a command on this target that failed with `e` (`action`:
    /// "patching" or "unpatching"): the error itself (exit status 1, nothing changed),
    /// or, printed here, that the target died or was changed meanwhile (exit status 4).
    pub(crate) fn judge(&self, e: ApplyError, action: &str) -> anyhow::Result<ExitCode> {
        let pid = self.pid;
        // Another livecare (or a debugger) holds the target: what changes there is
        // its doing, and we changed nothing.
        let ours = !matches!(e, ApplyError::Busy { .. } | ApplyError::Traced { .. });
        if self.start.is_some() && !self.alive() {
            eprintln!(
                "error: pid {pid} died (exited or was killed) while livecare was {action} it; \
                 the command did not complete: {e}"
            );
            return Ok(ExitCode::from(super::EXIT_CHANGED));
        }
        if ours && self.regions.is_some() && Self::regions(pid) != self.regions {
            eprintln!(
                "error: pid {pid} was changed although {action} it failed: {e}. \
                 `livecare info -p {pid}` shows its patches; `livecare repair -p {pid}` \
                 completes or rolls back an operation left half done"
            );
            return Ok(ExitCode::from(super::EXIT_CHANGED));
        }
        Err(anyhow::Error::new(e).context(format!("{action} pid {pid}")))
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
                "patched {} function{} ({}) in pid {} ({}, build-id {}, patch {}), paused {} µs{}",
                r.hunks.len(),
                if r.hunks.len() == 1 { "" } else { "s" },
                names.join(", "),
                r.pid,
                r.comm,
                short_id(&r.build_id),
                r.patch_id,
                r.pause_us,
                fenced_note(r.threads_fenced)
            );
        }
    }
}

/// Runs `patch`.
pub fn run(args: Args, face: super::Face) -> anyhow::Result<ExitCode> {
    check_trusted(&args.patch, args.allow_insecure_perms)?;
    // Under LibCare's names a directory is read as LibCare reads it (see README).
    let lookup = match face {
        super::Face::LibCare => livecare_apply::DirLookup::LibCare,
        super::Face::Native => livecare_apply::DirLookup::Native,
    };
    let loaded = livecare_apply::load_patches_by(&args.patch, lookup)
        .with_context(|| format!("loading {}", args.patch.display()))?;
    if face == super::Face::Native {
        for note in &loaded.notes {
            eprintln!("livecare: {note}");
        }
    }
    let patches = loaded.patches;
    if patches.is_empty() {
        anyhow::bail!("no patches found in {}", args.patch.display());
    }
    // In a directory, each file (and LibCare storage's level directories) too.
    for p in &patches {
        check_trusted(&p.source, args.allow_insecure_perms)?;
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
    let mut unreadable: Vec<Pid> = Vec::new();
    let before = (!all).then(|| Before::take(pids[0]));
    // LibCare leaves an object whose patch (or a level as high) is applied alone.
    let skip_applied = face == super::Face::LibCare;
    let outcomes = if all {
        in_parallel(&pids, jobs_or_cpus(args.jobs), |pid| {
            patch_one(pid, true, &patches, &opts, skip_applied)
        })
    } else {
        pids.iter()
            .map(|&pid| patch_one(pid, false, &patches, &opts, skip_applied))
            .collect()
    };
    let mut nothing_new = 0usize;
    for (pid, outcome) in pids.iter().zip(outcomes) {
        match outcome {
            Outcome::Skipped => {}
            Outcome::NothingNew(note) => {
                nothing_new += 1;
                if let Some(note) = note {
                    eprintln!("livecare: {note}");
                }
                if !all {
                    // LibCare's words and exit status 0.
                    println!("No patch(es) applicable to PID '{pid}' have been found");
                }
            }
            Outcome::Unreadable => unreadable.push(*pid),
            Outcome::Patched(reports) => ok.extend(reports),
            Outcome::Failed(e) if !all => {
                return match &before {
                    Some(b) => b.judge(e, "patching"),
                    None => Err(anyhow::Error::new(e).context(format!("patching pid {pid}"))),
                };
            }
            Outcome::Failed(e) => failed.push((*pid, format!("{e}"))),
        }
    }
    if args.json {
        let doc = serde_json::json!({
            "patched": ok,
            "failed": failed.iter().map(|(p, e)| serde_json::json!({"pid": p.0, "error": e})).collect::<Vec<_>>(),
            "unreadable": unreadable.iter().map(|p| serde_json::json!({"pid": p.0, "comm": p.comm()})).collect::<Vec<_>>(),
            "stops": super::stops_json(),
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
    if !unreadable.is_empty() {
        eprintln!("livecare: {}", unreadable_note(&unreadable, "patch"));
    }
    let ids: Vec<&str> = patches.iter().map(|p| p.build_id.as_str()).collect();
    if all && ok.is_empty() && failed.is_empty() && unreadable.is_empty() && nothing_new == 0 {
        anyhow::bail!("no process has an object with build-id {}", ids.join(", "));
    }
    if all && ok.is_empty() && failed.is_empty() && nothing_new == 0 {
        eprintln!(
            "livecare: no process it could read has an object with build-id {}",
            ids.join(", ")
        );
    }
    if !unreadable.is_empty() && (failed.is_empty() || !ok.is_empty()) {
        // Not every process was checked: not a success, yet nothing failed either.
        return Ok(ExitCode::from(super::EXIT_PARTIAL));
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
