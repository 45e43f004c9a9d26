//! `livecare demo`: the README's main job, self-contained. A small C program (embedded
//! in this binary) is built through the patch-build pipeline and started; its fix is
//! built into a patch and applied to the running process with `livecare patch`; the
//! output changes; `livecare info` shows the patch; `livecare unpatch` removes it and
//! the output returns. Every step is checked; everything is cleaned up.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use livecare_build::{Options, Progress, Session, Style};

/// The demo program.
const DEMO_C: &str = include_str!("../../../../tests/fixtures/demo/demo.c");
/// Its makefile.
const DEMO_MAKEFILE: &str = include_str!("../../../../tests/fixtures/demo/Makefile");
/// The fix.
const DEMO_DIFF: &str = include_str!("../../../../tests/fixtures/demo/demo.diff");

/// A line only the original `format_greeting` prints.
const ORIGINAL_MARK: &str = "Hello from the original code";
/// A line only the patched `format_greeting` prints.
const PATCHED_MARK: &str = "Hello from the PATCHED code";
/// How long each observed change may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Flags of `livecare demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Keep the temporary directory (sources, build log, patch) and print its path.
    #[arg(long)]
    pub keep: bool,
}

/// The running demo program; killed on drop.
struct Target {
    child: Child,
    lines: Receiver<String>,
}

impl Target {
    fn start(exe: &Path) -> Result<Target> {
        let mut child = super::dies_with_us(&mut Command::new(exe))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Target { child, lines })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn show(&self, line: &str) {
        println!("    demo[{}] | {line}", self.pid());
    }

    /// Prints every line that arrived so far.
    fn show_pending(&self) {
        while let Ok(line) = self.lines.try_recv() {
            self.show(&line);
        }
    }

    /// Prints lines until `count` consecutive lines contain `needle`.
    fn expect(&mut self, needle: &str, count: usize) -> Result<()> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut seen = 0;
        while seen < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.show(&line);
                    seen = if line.contains(needle) { seen + 1 } else { 0 };
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("the demo program printed no line containing {needle:?} within {STEP_TIMEOUT:?}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait().ok().flatten();
                    bail!(
                        "the demo program stopped (exit: {status:?}) while waiting for {needle:?}"
                    )
                }
            }
        }
        Ok(())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long one `livecare` command of the demo may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `livecare ARGS…` as an operator would, showing the command and its output.
/// A command that outlives `COMMAND_TIMEOUT` is killed and reported.
fn livecare(root: &Path, args: &[&str]) -> Result<String> {
    let exe = std::env::current_exe().context("finding the livecare executable")?;
    println!("  $ livecare {}", args.join(" "));
    let out_path = root.join("command.out");
    let out = std::fs::File::create(&out_path)?;
    let mut child = Command::new(&exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    for line in text.lines() {
        println!("    {line}");
    }
    match status {
        None => bail!(
            "`livecare {}` did not finish within {COMMAND_TIMEOUT:?}",
            args.join(" ")
        ),
        Some(s) if !s.success() => bail!("`livecare {}` failed ({s})", args.join(" ")),
        Some(_) => Ok(text),
    }
}

fn say(step: usize, text: &str) {
    println!("\n[{step}/7] {text}");
}

/// Runs `livecare demo`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("livecare-demo-")
        .tempdir()?;
    let root = tmp.path().to_path_buf();
    let result = demo(&root);
    if args.keep {
        let kept = tmp.keep();
        println!("kept {}", kept.display());
    }
    result?;
    println!(
        "\ndemo finished: built, ran, patched, inspected and unpatched a live process in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn demo(root: &Path) -> Result<()> {
    let src = root.join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("demo.c"), DEMO_C)?;
    std::fs::write(src.join("Makefile"), DEMO_MAKEFILE)?;
    let diff = root.join("fix.diff");
    std::fs::write(&diff, DEMO_DIFF)?;
    let tool = std::env::current_exe()?;
    let mut opts = Options::new(&src, vec![diff.clone()], &root.join("patches"), &tool);
    opts.workdir = root.join("work");
    let mut session = Session::new(opts, Progress::new(Style::Auto))?;

    say(
        1,
        &format!(
            "building the demo program from {} (original stage)",
            src.join("demo.c").display()
        ),
    );
    session.check_patches()?;
    let originals = session.build_original()?;
    // Run an installed copy, as an operator runs an installed binary while its build
    // tree is reused for the patch.
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin)?;
    let exe = bin.join("demo");
    let built = originals
        .iter()
        .find(|o| o.path.ends_with("demo"))
        .context("the original build made no demo program")?;
    std::fs::copy(&built.stash, &exe)?;

    say(2, "starting it: it prints a greeting five times a second");
    let mut target = Target::start(&exe)?;
    target.expect(ORIGINAL_MARK, 3)?;

    say(
        3,
        &format!(
            "building a live patch from the fix while it runs:\n{}",
            DEMO_DIFF.trim_end()
        ),
    );
    session.apply_patches()?;
    session.build_patched()?;
    let made = session.make_patches()?;
    session.restore()?;
    let patch = made.first().context("the build made no patch")?;
    println!(
        "  made {} ({} function(s): {})",
        patch.kpatch.display(),
        patch.functions.len(),
        patch.functions.join(", ")
    );
    target.show_pending();

    let pid = target.pid().to_string();
    say(4, "applying the patch to the running process");
    livecare(
        root,
        &["patch", "-p", &pid, &patch.kpatch.to_string_lossy()],
    )?;
    target.expect(PATCHED_MARK, 3)?;

    say(5, "listing the applied patches");
    let info = livecare(root, &["info", "-p", &pid])?;
    if !info.contains(&patch.build_id) {
        bail!(
            "`livecare info` does not mention build-id {}",
            patch.build_id
        );
    }
    target.show_pending();

    say(6, "removing the patch");
    livecare(root, &["unpatch", "-p", &pid])?;
    target.expect(ORIGINAL_MARK, 3)?;

    say(7, "stopping the demo program and cleaning up");
    if target.child.try_wait()?.is_some() {
        bail!("the demo program exited on its own");
    }
    drop(target);
    drop(session);
    Ok(())
}
