//! `info`: list each process's objects and the patches applied to them.

use std::process::ExitCode;

use livecare_apply::{Leftover, ProcessInfo, Verdict};
use livecare_process::Pid;

/// Flags of `info`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Process id or `all` (default: all).
    #[arg(short = 'p')]
    pub pid: Option<String>,
    /// Only objects with this build-id.
    #[arg(short = 'b')]
    pub build_id: Option<String>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// LibCare storage directory (accepted for compatibility; state is read from the target).
    #[arg(short = 's')]
    pub storage: Option<std::path::PathBuf>,
    /// LibCare: only objects whose path matches (substring).
    #[arg(short = 'r')]
    pub regexp: Option<String>,
    /// LibCare: do not print unpatched objects (the default here).
    #[arg(short = 'n')]
    pub no_unpatched: bool,
}

/// Runs `info`.
pub fn run(args: Args, face: super::Face) -> anyhow::Result<ExitCode> {
    let spec = args.pid.clone().unwrap_or_else(|| "all".into());
    let (pids, all) = super::patch::targets(&spec)?;
    let mut infos: Vec<ProcessInfo> = Vec::new();
    for pid in pids {
        // With `all`, only processes carrying a patch region are listed; finding the
        // regions is much cheaper than reading every object file.
        if all
            && livecare_apply::find_regions(pid)
                .map(|r| r.is_empty())
                .unwrap_or(true)
            && livecare_apply::leftovers(pid)
                .map(|l| l.is_empty())
                .unwrap_or(true)
        {
            continue;
        }
        match livecare_apply::info(pid) {
            Ok(mut i) => {
                i.objects.retain(|o| {
                    args.build_id.as_ref().is_none_or(|b| &o.build_id == b)
                        && args
                            .regexp
                            .as_ref()
                            .is_none_or(|r| o.path.contains(r.as_str()))
                });
                if let Some(b) = &args.build_id {
                    i.incomplete.retain(|c| &c.region.build_id == b);
                }
                if let Some(b) = &args.build_id {
                    i.retired.retain(|r| &r.build_id == b);
                }
                if all {
                    i.objects.retain(|o| !o.patches.is_empty());
                    if i.objects.is_empty()
                        && i.incomplete.is_empty()
                        && i.retired.is_empty()
                        && i.leftovers.is_empty()
                    {
                        continue;
                    }
                }
                infos.push(i);
            }
            Err(e) if !all => {
                return Err(anyhow::Error::new(e).context(format!("reading pid {pid}")))
            }
            Err(_) => {}
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&infos)?);
        return Ok(ExitCode::SUCCESS);
    }
    for i in &infos {
        print_info(i, face);
    }
    Ok(ExitCode::SUCCESS)
}

/// What `repair` did about a leftover, as printed.
pub fn leftover_removed(l: &Leftover) -> String {
    match l {
        Leftover::Mapping { addr, len, .. } => format!(
            "unmapped a region mapped by an interrupted patch before its header ({addr:#x}, {} KiB)",
            len.div_ceil(1024)
        ),
        Leftover::Mark { at } => format!("cleared a stale region mark from the code padding at {at:#x}"),
        Leftover::Stub { at } => format!("cleared a stale remote-syscall stub from the code padding at {at:#x}"),
    }
}

fn print_leftover(pid: i32, l: &Leftover) {
    let what = match l {
        Leftover::Mapping { addr, len, .. } => format!(
            "LEFTOVER: region mapped by an interrupted patch, no header ({addr:#x}, {} KiB, nothing uses it)",
            len.div_ceil(1024)
        ),
        Leftover::Mark { at } => format!("leftover region mark in the code padding at {at:#x} (harmless)"),
        Leftover::Stub { at } => format!(
            "leftover remote-syscall stub in the code padding at {at:#x} (harmless; in use if a livecare runs now)"
        ),
    };
    println!("  {what}; `livecare repair -p {pid}` removes it");
}

fn print_info(i: &ProcessInfo, face: super::Face) {
    print_objects(i, face);
    if let Some(h) = livecare_apply::TargetLock::holder(Pid(i.pid)) {
        println!(
            "  livecare (pid {h}) is working on pid {} right now{}",
            i.pid,
            if i.incomplete.is_empty() {
                ""
            } else {
                ": what follows is its operation in progress, not an interrupted one; do not repair it"
            }
        );
    }
    for l in &i.leftovers {
        print_leftover(i.pid, l);
    }
    for r in &i.retired {
        let size = format!("{} KiB", r.total_len.div_ceil(1024));
        match face {
            super::Face::LibCare => println!(
                "Pid: {}\nRetired patch id: {} (build id {}, region {:#x}, {size}): removed, kept mapped because the process may still use it\n",
                i.pid, r.patch_id, r.build_id, r.addr
            ),
            super::Face::Native => println!(
                "  retired patch {} (build-id {}, region {:#x}, {size}): removed, kept mapped and inactive because the process may still use it",
                r.patch_id,
                super::patch::short_id(&r.build_id),
                r.addr
            ),
        }
    }
    for c in &i.incomplete {
        let r = &c.region;
        let state = super::repair::state_name(r.state);
        let what = match &c.verdict {
            Verdict::Complete | Verdict::RollBack => format!(
                "INCOMPLETE: patch interrupted while committing, {} of {} code write(s) live{}",
                c.writes_live,
                c.writes_total,
                if c.functions_live.is_empty() {
                    String::new()
                } else {
                    format!(" (new code active in: {})", c.functions_live.join(", "))
                }
            ),
            Verdict::FinishRemoval => format!(
                "INCOMPLETE: unpatch interrupted, {} of {} code write(s) still live",
                c.writes_live, c.writes_total
            ),
            Verdict::Unmap => "leftover region, not applied (nothing jumps there)".to_string(),
            Verdict::Stuck(why) => format!("INCONSISTENT: {why}"),
        };
        let action = match &c.verdict {
            Verdict::Complete => "`livecare repair` completes it",
            Verdict::RollBack => "`livecare repair` rolls it back",
            Verdict::FinishRemoval => "`livecare repair` finishes the unpatch",
            Verdict::Unmap => "`livecare repair` unmaps it",
            Verdict::Stuck(_) => "`livecare repair` leaves it alone",
        };
        match face {
            super::Face::LibCare => println!(
                "Pid: {}\nIncomplete patch id: {} (build id {}, state {state}): {what}; {action} -p {}\n",
                i.pid, r.patch_id, r.build_id, i.pid
            ),
            super::Face::Native => println!(
                "  patch {} (build-id {}, region {:#x}, state {state}): {what}; {action} -p {}",
                r.patch_id,
                super::patch::short_id(&r.build_id),
                r.addr,
                i.pid
            ),
        }
    }
}

fn print_objects(i: &ProcessInfo, face: super::Face) {
    match face {
        super::Face::LibCare => {
            for o in i.objects.iter().filter(|o| !o.patches.is_empty()) {
                println!("Pid: {}", i.pid);
                println!("Target: {}", o.path.rsplit('/').next().unwrap_or(&o.path));
                println!("Build id: {}", o.build_id);
                println!("Applied patch number: {}", o.patches.len());
                for p in &o.patches {
                    println!("Patch id: {}", p.patch_id);
                }
                println!();
            }
        }
        super::Face::Native => {
            println!("pid {} ({})", i.pid, Pid(i.pid).comm());
            for o in &i.objects {
                if o.patches.is_empty() {
                    println!("  {}  build-id {}  not patched", o.path, o.build_id);
                    continue;
                }
                println!(
                    "  {}  build-id {}  {} patch(es)",
                    o.path,
                    o.build_id,
                    o.patches.len()
                );
                for p in &o.patches {
                    let fns: Vec<&str> = p.hunks.iter().map(|h| h.name.as_str()).collect();
                    println!(
                        "    patch {}: {} hunk(s): {}  (region {:#x})",
                        p.patch_id,
                        p.hunks.len(),
                        fns.join(", "),
                        p.addr
                    );
                }
            }
        }
    }
}
