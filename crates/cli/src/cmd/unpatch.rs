//! `unpatch`: remove applied patches, last-in first-out (under LibCare's name, with no
//! `-i`, all of the selected ones).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use livecare_apply::{Options, UnpatchSelect};

/// Flags of `unpatch`.
#[derive(clap::Args, Debug)]
#[command(after_help = super::EXIT_HELP)]
pub struct Args {
    /// Process id or `all`.
    #[arg(short = 'p', required = true)]
    pub pid: String,
    /// Only the patch with this id.
    #[arg(short = 'i')]
    pub patch_id: Option<String>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for threads to leave the patched code.
    #[arg(long, default_value_t = 3.0)]
    pub timeout: f64,
    /// With `-p all`: how many processes to unpatch at once (default: one per CPU).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// With `-p all` and no build-id or `-i`: really remove the newest patch from every
    /// process on the host (without it that is refused).
    #[arg(long)]
    pub all: bool,
    /// Only patches of objects with these build-ids.
    pub build_ids: Vec<String>,
}

/// Runs `unpatch`.
pub fn run(args: Args, face: super::Face) -> anyhow::Result<ExitCode> {
    let (pids, all) = super::patch::targets(&args.pid)?;
    if all && args.build_ids.is_empty() && args.patch_id.is_none() && !args.all {
        // One mistyped command would otherwise take a patch off every process of
        // every user on the host.
        eprintln!(
            "error: `unpatch -p all` needs a selector: give the build-id(s) of the patched \
             object, `-i PATCHID`, or `--all` to remove the newest patch from every process"
        );
        return Ok(ExitCode::from(super::EXIT_USAGE));
    }
    let sel = UnpatchSelect {
        patch_id: args.patch_id.clone(),
        build_ids: args.build_ids.clone(),
    };
    let opts = Options {
        timeout: Duration::from_secs_f64(args.timeout.max(0.0)),
        hold: false,
        // One process at a time: the other CPUs are spare during its pauses.
        spin_cpus: !all,
        // Threads blocked in a syscall stay in it during the commit (see README).
        fence_idle: std::env::var_os("LIVECARE_NO_FENCE").is_none(),
    };
    let mut reports = Vec::new();
    let mut failed = Vec::new();
    let mut unreadable = Vec::new();
    let every_patch = face == super::Face::LibCare && args.patch_id.is_none();
    let one = |pid| {
        // With `all`, a process holding nothing this request selects is not a failure;
        // one we may not read is named (`Err`).
        if all {
            match holds_selected_patch(pid, &sel) {
                Ok(true) => {}
                Ok(false) => return Ok(None),
                Err(()) => return Err(()),
            }
        }
        let mut done = livecare_apply::unpatch(pid, &sel, &opts);
        // LibCare keeps one patch per object and removes it whole: under its name,
        // without `-i`, every selected patch goes (newest first), not just the newest.
        while let (true, Ok(reports)) = (every_patch, &mut done) {
            if reports.is_empty() || holds_selected_patch(pid, &sel) != Ok(true) {
                break;
            }
            match livecare_apply::unpatch(pid, &sel, &opts) {
                Ok(more) => reports.extend(more),
                Err(e) => {
                    done = Err(e);
                    break;
                }
            }
        }
        Ok(Some(done))
    };
    let before = (!all).then(|| super::patch::Before::take(pids[0]));
    let outcomes = if all {
        super::patch::in_parallel(&pids, super::patch::jobs_or_cpus(args.jobs), one)
    } else {
        pids.iter().map(|&pid| one(pid)).collect()
    };
    for (pid, outcome) in pids.into_iter().zip(outcomes) {
        match outcome {
            Err(()) => unreadable.push(pid),
            Ok(None) => {}
            Ok(Some(Ok(r))) => reports.extend(r),
            Ok(Some(Err(e))) if !all => {
                return match &before {
                    Some(b) => b.judge(e, "unpatching"),
                    None => Err(anyhow::Error::new(e).context(format!("unpatching pid {pid}"))),
                };
            }
            Ok(Some(Err(e))) => failed.push((pid, e.to_string())),
        }
    }
    if args.json {
        let doc = serde_json::json!({
            "unpatched": reports,
            "failed": failed.iter().map(|(p, e)| serde_json::json!({"pid": p.0, "error": e})).collect::<Vec<_>>(),
            "unreadable": unreadable.iter().map(|p: &livecare_process::Pid| serde_json::json!({"pid": p.0, "comm": p.comm()})).collect::<Vec<_>>(),
            "stops": super::stops_json(),
        });
        println!("{}", serde_json::to_string_pretty(&doc).context("json")?);
    } else {
        for r in &reports {
            match face {
                super::Face::LibCare => println!(
                    "{} patch hunk(s) were successfully cancelled from PID '{}'",
                    r.hunks, r.pid
                ),
                super::Face::Native => println!(
                    "unpatched {} ({} function{}) from pid {} (build-id {}), paused {} µs{}{}",
                    r.patch_id,
                    r.hunks,
                    if r.hunks == 1 { "" } else { "s" },
                    r.pid,
                    super::patch::short_id(&r.build_id),
                    r.pause_us,
                    super::patch::fenced_note(r.threads_fenced),
                    if r.retired {
                        format!(
                            "; region {:#x} kept mapped, inactive (retired: the process may still use it)",
                            r.region
                        )
                    } else {
                        String::new()
                    }
                ),
            }
        }
        for (p, e) in &failed {
            eprintln!("pid {p}: {e}");
        }
    }
    if !unreadable.is_empty() {
        eprintln!(
            "livecare: {}",
            super::patch::unreadable_note(&unreadable, "unpatch")
        );
        if failed.is_empty() || !reports.is_empty() {
            // Not every process was checked: not a success, yet nothing failed either.
            return Ok(ExitCode::from(super::EXIT_PARTIAL));
        }
    }
    if !failed.is_empty() {
        return Ok(ExitCode::from(if reports.is_empty() {
            super::EXIT_ERROR
        } else {
            super::EXIT_PARTIAL
        }));
    }
    Ok(ExitCode::SUCCESS)
}

/// True when `pid` has an applied patch that `sel` would select; `Err` when we may not
/// read it.
fn holds_selected_patch(pid: livecare_process::Pid, sel: &UnpatchSelect) -> Result<bool, ()> {
    match livecare_apply::find_regions(pid) {
        Err(livecare_apply::Error::Process(e)) if super::patch::permission_denied(&e) => Err(()),
        r => Ok(r
            .map(|regions| {
                regions.iter().any(|r| {
                    r.state == livecare_apply::RegionState::Applied
                        && (sel.build_ids.is_empty() || sel.build_ids.contains(&r.build_id))
                        && sel.patch_id.as_ref().is_none_or(|id| &r.patch_id == id)
                })
            })
            .unwrap_or(false)),
    }
}
