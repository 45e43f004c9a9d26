//! Progress reporting of the build stages: a spinner on a terminal, plain lines
//! otherwise, or LibCare's stage banners for `libcare-patch-make`. A build stage
//! reports the units compiled so far (the wrapper's compile log) against the count
//! of the stage before, and its elapsed time; every stage's duration is kept for
//! `build --json`.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

/// Without a terminal, a running build stage prints its count at most this often
/// (seconds; `LIVECARE_PROGRESS_SECS` overrides it).
const PLAIN_EVERY_SECS: u64 = 30;

fn plain_every() -> Duration {
    let secs = std::env::var("LIVECARE_PROGRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PLAIN_EVERY_SECS);
    Duration::from_secs(secs)
}

/// How stage progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A spinner when stderr is a terminal, plain lines otherwise.
    Auto,
    /// One line per stage start and end on stderr.
    Plain,
    /// LibCare's banners on stdout (`BUILDING ORIGINAL CODE`, ...).
    LibCare,
    /// Nothing.
    Quiet,
}

/// The build stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Trial application of the diffs.
    CheckPatches,
    /// `make clean`.
    Clean,
    /// The original build.
    Original,
    /// Applying the diffs.
    ApplyPatches,
    /// The patched build.
    Patched,
    /// Turning patched binaries into `.kpatch` files.
    MakePatches,
    /// Reverting the diffs.
    Restore,
}

impl Step {
    /// A short name for machine-readable output (`build --json`).
    pub fn name(self) -> &'static str {
        match self {
            Step::CheckPatches => "check-patches",
            Step::Clean => "clean",
            Step::Original => "original",
            Step::ApplyPatches => "apply-patches",
            Step::Patched => "patched",
            Step::MakePatches => "make-patches",
            Step::Restore => "restore",
        }
    }

    fn text(self) -> &'static str {
        match self {
            Step::CheckPatches => "checking that the patches apply",
            Step::Clean => "cleaning the tree",
            Step::Original => "building original code",
            Step::ApplyPatches => "applying patches",
            Step::Patched => "building patched code",
            Step::MakePatches => "making patches",
            Step::Restore => "restoring the original source",
        }
    }

    fn banner(self) -> Option<&'static str> {
        match self {
            Step::Original => Some("BUILDING ORIGINAL CODE"),
            Step::Patched => Some("BUILDING PATCHED CODE"),
            Step::MakePatches => Some("MAKING PATCHES"),
            _ => None,
        }
    }
}

/// A finished stage: which, how long, whether it succeeded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageTime {
    /// The stage.
    pub step: Step,
    /// Its wall time in seconds.
    pub seconds: f64,
    /// False if it failed.
    pub ok: bool,
}

/// Shows the progress of one build.
pub struct Progress {
    style: Style,
    current: Option<(Step, Instant)>,
    spinner: Option<indicatif::ProgressBar>,
    stages: Vec<StageTime>,
    /// Units compiled in the current stage, and when a plain line last said so.
    compiled: usize,
    last_plain: Option<Instant>,
}

impl Progress {
    /// A reporter with the given style (`Auto` resolves now).
    pub fn new(style: Style) -> Progress {
        let style = match style {
            Style::Auto if std::io::stderr().is_terminal() => Style::Auto,
            Style::Auto => Style::Plain,
            s => s,
        };
        Progress {
            style,
            current: None,
            spinner: None,
            stages: Vec::new(),
            compiled: 0,
            last_plain: None,
        }
    }

    /// The stages finished so far, in order.
    pub fn stages(&self) -> &[StageTime] {
        &self.stages
    }

    /// Says where the full log goes, before any stage runs (a stage may run for
    /// many minutes, and the operator may want to follow it).
    pub fn log_file(&mut self, path: &Path) {
        match self.style {
            Style::Auto | Style::Plain => {
                eprintln!("livecare: full build log: {}", path.display())
            }
            Style::LibCare | Style::Quiet => {}
        }
    }

    /// The current stage has compiled `done` units so far; `of` is the count of the
    /// stage before (an estimate of the total), if known.
    pub fn compiled(&mut self, done: usize, of: Option<usize>) {
        let Some((step, start)) = self.current else {
            return;
        };
        let changed = done != self.compiled;
        self.compiled = done;
        let count = match of {
            Some(of) if of > 0 => format!("{done}/~{of} file(s) compiled"),
            _ => format!("{done} file(s) compiled"),
        };
        match self.style {
            Style::Auto => {
                if let Some(sp) = &self.spinner {
                    sp.set_message(format!("{}: {count}", step.text()));
                }
            }
            Style::Plain => {
                let due = self.last_plain.unwrap_or(start).elapsed() >= plain_every();
                if changed && due {
                    self.last_plain = Some(Instant::now());
                    eprintln!(
                        "livecare: {}: {count}, {}",
                        step.text(),
                        elapsed(start.elapsed())
                    );
                }
            }
            Style::LibCare | Style::Quiet => {}
        }
    }

    /// A stage begins.
    pub fn begin(&mut self, step: Step) {
        self.current = Some((step, Instant::now()));
        self.compiled = 0;
        self.last_plain = None;
        match self.style {
            Style::Auto => {
                let sp = indicatif::ProgressBar::new_spinner();
                if let Ok(t) =
                    indicatif::ProgressStyle::with_template("{spinner} livecare: {msg} [{elapsed}]")
                {
                    sp.set_style(t);
                }
                sp.set_message(step.text().to_string());
                sp.enable_steady_tick(Duration::from_millis(100));
                self.spinner = Some(sp);
            }
            Style::Plain => eprintln!("livecare: {} ...", step.text()),
            Style::LibCare => {
                if let Some(b) = step.banner() {
                    println!("{b}");
                }
            }
            Style::Quiet => {}
        }
    }

    /// The current stage ends (`summary` may be empty).
    pub fn end(&mut self, ok: bool, summary: &str) {
        let Some((step, start)) = self.current.take() else {
            return;
        };
        let secs = start.elapsed().as_secs_f64();
        self.stages.push(StageTime {
            step,
            seconds: secs,
            ok,
        });
        let verdict = if ok { "done" } else { "FAILED" };
        let sep = if summary.is_empty() { "" } else { ": " };
        let compiled = match (step, self.compiled) {
            (Step::Original | Step::Patched, n) if n > 0 => format!(" ({n} file(s) compiled)"),
            _ => String::new(),
        };
        let line = format!(
            "{} {verdict} in {secs:.1}s{compiled}{sep}{summary}",
            step.text()
        );
        match self.style {
            Style::Auto => {
                if let Some(sp) = self.spinner.take() {
                    sp.finish_and_clear();
                }
                eprintln!("livecare: {line}");
            }
            Style::Plain => eprintln!("livecare: {line}"),
            Style::LibCare if !ok => eprintln!("{line}"),
            Style::LibCare | Style::Quiet => {}
        }
    }

    /// A message outside the stage lines.
    pub fn note(&mut self, msg: &str) {
        match self.style {
            Style::Quiet => {}
            Style::LibCare => println!("{msg}"),
            _ => match &self.spinner {
                Some(sp) => sp.println(format!("livecare: {msg}")),
                None => eprintln!("livecare: {msg}"),
            },
        }
    }
}

/// `1m05s`, `42s`.
fn elapsed(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(sp) = self.spinner.take() {
            sp.finish_and_clear();
        }
    }
}
