//! `livecare bench build`: what a patch build costs next to the plain build.
//!
//! In a scratch copy of the source tree it times the stock build (`plain`), then
//! `livecare build FIX.diff` in that built tree (`patch`: only the files the diff changes
//! are compiled again), and with `--fresh` `livecare build` in a second, unbuilt copy
//! (`fresh`: its original stage is a whole build). Each is timed as wall time and as the
//! CPU time (user + system) of the waited children (`getrusage(RUSAGE_CHILDREN)`), which
//! a shared machine disturbs far less. A configure step (`--program`) runs before and is
//! timed apart: it is the same for both routes. Builds have no idle baseline to read the
//! figures against (a build is the load); the load average at start and end is printed
//! instead.
//!
//! `--program P` takes the source of a known server from Debian's archive through
//! `.ci/setup-debian-src.sh` and its fix from `tests/fixtures/project-P/fix.diff` (both
//! found above the executable or the current directory, i.e. in a checkout).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;

use super::target::livecare;
use super::{load_average, scratch};

/// Flags of `livecare bench build`.
#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// A known program: its Debian source, stock configure and the repo's fix fixture.
    #[arg(long, value_parser = ["redis", "nginx", "lighttpd", "memcached"],
          conflicts_with_all = ["srcdir", "diff"])]
    pub program: Option<String>,
    /// Source tree to copy and build (with --diff).
    #[arg(short = 'C', long, requires = "diff")]
    pub srcdir: Option<PathBuf>,
    /// The fix (a diff applying with -p1 in the tree).
    #[arg(long, requires = "srcdir")]
    pub diff: Option<PathBuf>,
    /// Also time a patch build in a fresh (unbuilt) copy: the original stage is a whole build.
    #[arg(long)]
    pub fresh: bool,
    /// Keep the patches in this directory (`built/`, `fresh/`) instead of a scratch one.
    #[arg(long)]
    pub outdir: Option<PathBuf>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
    /// Build command (default: `make -jN`, N = CPUs, as `livecare build` runs).
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

/// A known program.
struct Known {
    /// Debian source package.
    pkg: &'static str,
    /// The upstream tarball Debian ships (the stock build) instead of Debian's tree.
    orig: bool,
    /// Its stock configure step.
    configure: &'static [&'static str],
}

fn known(name: &str) -> Result<Known> {
    Ok(match name {
        "redis" => Known {
            pkg: "redis",
            orig: true,
            configure: &[],
        },
        "nginx" => Known {
            pkg: "nginx",
            orig: false,
            configure: &["./configure"],
        },
        "lighttpd" => Known {
            pkg: "lighttpd",
            orig: false,
            configure: &["./configure", "-C"],
        },
        "memcached" => Known {
            pkg: "memcached",
            orig: false,
            configure: &["./configure"],
        },
        other => bail!("unknown program {other:?} (redis, nginx, lighttpd, memcached)"),
    })
}

/// The checkout holding `.ci/setup-debian-src.sh`: above the executable or the cwd.
fn repo_root() -> Result<PathBuf> {
    let mut starts = vec![];
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    starts
        .iter()
        .flat_map(|s| s.ancestors())
        .find(|p| p.join(".ci/setup-debian-src.sh").is_file())
        .map(Path::to_path_buf)
        .context("--program needs a livecare checkout (.ci/setup-debian-src.sh) above the executable or the current directory; give -C DIR --diff FILE instead")
}

/// CPU time (user + system) of all waited children so far.
fn children_cpu() -> Duration {
    // SAFETY: getrusage writes one rusage to the valid pointer it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Wall and children-CPU seconds of one command.
#[derive(Clone, Copy)]
struct Timed {
    wall: f64,
    cpu: f64,
}

/// Runs `cmd` in `dir` to completion (output to `log`), timed; fails with the log's tail.
/// With `keep_stdout` its stdout is returned, else it goes to the log too.
fn timed(
    dir: &Path,
    cmd: &mut Command,
    what: &str,
    log: &Path,
    keep_stdout: bool,
) -> Result<(Timed, String)> {
    let out_file = std::fs::File::create(log).with_context(|| format!("{}", log.display()))?;
    if !keep_stdout {
        cmd.stdout(out_file.try_clone()?);
    }
    let t = Instant::now();
    let cpu = children_cpu();
    let out = cmd
        .current_dir(dir)
        .stdin(Stdio::null())
        .stderr(out_file)
        .output()
        .with_context(|| format!("running {what}"))?;
    let timed = Timed {
        wall: t.elapsed().as_secs_f64(),
        cpu: (children_cpu() - cpu).as_secs_f64(),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let err = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{what} failed ({}); its output is in {}:\n{stdout}{}",
            out.status,
            log.display(),
            tail.join("\n")
        );
    }
    Ok((timed, stdout))
}

/// A copy of `src` at `dst` (as `cp -a`), not writable by others (livecare refuses
/// patches under a directory others may write).
fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    let st = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(dst)
        .status()
        .context("running cp")?;
    ensure!(st.success(), "copying {} failed", src.display());
    let st = Command::new("chmod").arg("go-w").arg(dst).status()?;
    ensure!(st.success(), "chmod go-w {} failed", dst.display());
    Ok(())
}

/// The patches `livecare build --json` reports: (path, size it reports, size on disk).
fn patches_of(doc: &str) -> Result<Vec<serde_json::Value>> {
    let v: serde_json::Value =
        serde_json::from_str(doc).context("livecare build --json printed no JSON document")?;
    let mut out = vec![];
    for p in v["patches"].as_array().into_iter().flatten() {
        let path = PathBuf::from(p["path"].as_str().context("a patch without a path")?);
        let bytes = std::fs::metadata(&path)
            .with_context(|| format!("{}", path.display()))?
            .len();
        out.push(json!({"path": path, "bytes": bytes, "functions": p["functions"]}));
    }
    ensure!(!out.is_empty(), "livecare build made no patch:\n{doc}");
    Ok(out)
}

/// Rounds to 0.001.
fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The figures of one patch build against the plain one.
fn route(t: Timed, plain: Timed, patches: Vec<serde_json::Value>) -> serde_json::Value {
    let bytes: u64 = patches.iter().filter_map(|p| p["bytes"].as_u64()).sum();
    json!({
        "wall_s": r3(t.wall),
        "cpu_s": r3(t.cpu),
        "ratio_wall": r3(t.wall / plain.wall.max(1e-9)),
        "ratio_cpu": r3(t.cpu / plain.cpu.max(1e-9)),
        "patch_bytes": bytes,
        "patches": patches,
    })
}

/// Runs `livecare bench build`.
pub fn build(a: &BuildArgs) -> Result<serde_json::Value> {
    let load_start = load_average();
    let dir = scratch()?;
    let (src, diff, configure, name) = match (&a.program, &a.srcdir, &a.diff) {
        (Some(p), _, _) => {
            let k = known(p)?;
            let root = repo_root()?;
            let mut cmd = Command::new("bash");
            cmd.arg(root.join(".ci/setup-debian-src.sh"));
            if k.orig {
                cmd.arg("--orig");
            }
            let out = cmd
                .arg(k.pkg)
                .arg(root.join("target/debian-src"))
                .stdin(Stdio::null())
                .output()
                .context("running .ci/setup-debian-src.sh")?;
            ensure!(
                out.status.success(),
                "{}'s source from Debian's archive is not available ({}):\n{}",
                k.pkg,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            let src = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
            let diff = root
                .join("tests/fixtures")
                .join(format!("project-{p}"))
                .join("fix.diff");
            (src, diff, k.configure, p.clone())
        }
        (None, Some(s), Some(d)) => (
            s.clone(),
            std::path::absolute(d)?,
            &[][..],
            s.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
        _ => bail!("give --program NAME, or -C DIR --diff FILE"),
    };
    ensure!(src.is_dir(), "no source tree at {}", src.display());
    ensure!(diff.is_file(), "no diff at {}", diff.display());
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cmd: Vec<String> = if a.cmd.is_empty() {
        vec!["make".into(), format!("-j{jobs}")]
    } else {
        a.cmd.clone()
    };
    let outdir = match &a.outdir {
        Some(o) => std::path::absolute(o)?,
        None => dir.path().join("patches"),
    };
    let lc = livecare()?;
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs)?;

    // The plain build: configure (timed apart), then the build command.
    let tree = dir.path().join("built");
    copy_tree(&src, &tree)?;
    let mut configure_s = 0.0;
    if let Some((prog, args)) = configure.split_first() {
        let (t, _) = timed(
            &tree,
            Command::new(prog).args(args),
            &configure.join(" "),
            &logs.join("configure.log"),
            false,
        )?;
        configure_s = t.wall;
    }
    let (plain, _) = timed(
        &tree,
        Command::new(&cmd[0]).args(&cmd[1..]),
        &cmd.join(" "),
        &logs.join("plain.log"),
        false,
    )?;

    // The patch build in the built tree.
    let patch_cmd = |tree: &Path, out: &Path, work: &Path| {
        let mut c = Command::new(&lc);
        c.arg("build")
            .arg("--json")
            .arg("-C")
            .arg(tree)
            .arg("-o")
            .arg(out)
            .arg("--workdir")
            .arg(work)
            .arg(&diff);
        if !a.cmd.is_empty() {
            c.arg("--").args(&a.cmd);
        }
        c
    };
    let (t, doc) = timed(
        &tree,
        &mut patch_cmd(&tree, &outdir.join("built"), &dir.path().join("work-built")),
        "livecare build FIX.diff (built tree)",
        &logs.join("patch-built.log"),
        true,
    )?;
    let built = route(t, plain, patches_of(&doc)?);

    let fresh = if a.fresh {
        let tree = dir.path().join("fresh");
        copy_tree(&src, &tree)?;
        if let Some((prog, args)) = configure.split_first() {
            timed(
                &tree,
                Command::new(prog).args(args),
                &configure.join(" "),
                &logs.join("configure-fresh.log"),
                false,
            )?;
        }
        let (t, doc) = timed(
            &tree,
            &mut patch_cmd(&tree, &outdir.join("fresh"), &dir.path().join("work-fresh")),
            "livecare build FIX.diff (fresh tree)",
            &logs.join("patch-fresh.log"),
            true,
        )?;
        Some(route(t, plain, patches_of(&doc)?))
    } else {
        None
    };

    let mut doc = json!({
        "program": name,
        "diff": diff,
        "build_cmd": cmd.join(" "),
        "configure_s": r3(configure_s),
        "plain": {"wall_s": r3(plain.wall), "cpu_s": r3(plain.cpu)},
        "patch_built_tree": built,
        "loadavg_start": load_start,
        "loadavg_end": load_average(),
        "note": "builds have no idle baseline (a build is the load): read the figures against the load averages; cpu_s is user+system of the waited children; the patches are removed with the scratch trees unless --outdir (or LIVECARE_BENCH_KEEP=1) keeps them",
    });
    if let Some(f) = fresh {
        doc["patch_fresh_tree"] = f;
    }
    Ok(doc)
}
