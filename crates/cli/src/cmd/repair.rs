//! `repair`: bring a process whose patching was interrupted (livecare killed mid-way)
//! back to a clean state: every patch fully applied or fully removed.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use livecare_apply::{Options, Verdict};
use livecare_process::Pid;

/// Flags of `repair`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Process id.
    #[arg(short = 'p', required = true)]
    pub pid: i32,
    /// Roll back interrupted commits even when all their jumps landed.
    #[arg(long)]
    pub rollback: bool,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for threads to leave the code being changed.
    #[arg(long, default_value_t = 3.0)]
    pub timeout: f64,
}

/// Runs `repair`.
pub fn run(args: Args, _face: super::Face) -> anyhow::Result<ExitCode> {
    let pid = Pid(args.pid);
    let opts = Options {
        timeout: Duration::from_secs_f64(args.timeout.max(0.0)),
        hold: false,
        spin_cpus: false,
        fence_idle: false,
    };
    // Another livecare's operation in progress is not an interrupted one: refused
    // while it runs, and the regions are read under the lock (`repair` takes it again).
    let lock = livecare_apply::TargetLock::acquire(pid)?;
    let pending = livecare_apply::check_regions(pid, args.rollback)
        .with_context(|| format!("reading pid {pid}"))?;
    let left = livecare_apply::leftovers(pid).with_context(|| format!("reading pid {pid}"))?;
    drop(lock);
    let done = if pending.is_empty() && left.is_empty() {
        livecare_apply::Repaired {
            pid: pid.0,
            redirects_undone: 0,
            regions: Vec::new(),
            leftovers_removed: Vec::new(),
        }
    } else {
        livecare_apply::repair(pid, args.rollback, &opts)
            .with_context(|| format!("repairing pid {pid}"))?
    };
    let stuck = done
        .regions
        .iter()
        .any(|r| matches!(r.action, Verdict::Stuck(_)));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&done).context("json")?);
    } else {
        if done.regions.is_empty() && done.leftovers_removed.is_empty() {
            println!("pid {}: nothing to repair", pid);
        }
        for l in &done.leftovers_removed {
            println!("pid {}: {}", pid, super::info::leftover_removed(l));
        }
        if done.redirects_undone > 0 {
            println!(
                "pid {}: {} return redirect(s) left by an interrupted livecare undone",
                pid, done.redirects_undone
            );
        }
        for r in &done.regions {
            let fate = if r.unmapped {
                "region unmapped"
            } else {
                "region kept mapped, inactive (retired: the process may still use it)"
            };
            let what = match &r.action {
                Verdict::Complete => "completed the interrupted commit (now applied)".to_string(),
                Verdict::RollBack => format!(
                    "rolled back the interrupted commit ({} write(s) undone), {fate}",
                    r.writes
                ),
                Verdict::FinishRemoval => format!(
                    "finished the interrupted unpatch ({} write(s) undone), {fate}",
                    r.writes
                ),
                Verdict::Unmap => "unmapped a leftover region (never applied)".to_string(),
                Verdict::Stuck(why) => format!("left alone: {why}"),
            };
            println!(
                "pid {}: patch {} (build-id {}, region {:#x}, was {}): {}",
                r.pid,
                r.patch_id,
                super::patch::short_id(&r.build_id),
                r.region,
                state_name(r.state),
                what
            );
        }
    }
    Ok(if stuck {
        ExitCode::from(super::EXIT_ERROR)
    } else {
        ExitCode::SUCCESS
    })
}

/// The journal state as printed.
pub fn state_name(s: livecare_apply::RegionState) -> &'static str {
    match s {
        livecare_apply::RegionState::Prepared => "prepared",
        livecare_apply::RegionState::Applied => "applied",
        livecare_apply::RegionState::Committing => "committing",
        livecare_apply::RegionState::Removing => "removing",
        livecare_apply::RegionState::Retired => "retired",
    }
}
