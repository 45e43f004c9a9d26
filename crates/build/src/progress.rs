//! Progress reporting of the build stages: a spinner on a terminal, plain lines
//! otherwise, or LibCare's stage banners for `libcare-patch-make`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

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

/// Shows the progress of one build.
pub struct Progress {
    style: Style,
    current: Option<(Step, Instant)>,
    spinner: Option<indicatif::ProgressBar>,
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
        }
    }

    /// A stage begins.
    pub fn begin(&mut self, step: Step) {
        self.current = Some((step, Instant::now()));
        match self.style {
            Style::Auto => {
                let sp = indicatif::ProgressBar::new_spinner();
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
        let verdict = if ok { "done" } else { "FAILED" };
        let sep = if summary.is_empty() { "" } else { ": " };
        let line = format!("{} {verdict} in {secs:.1}s{sep}{summary}", step.text());
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

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(sp) = self.spinner.take() {
            sp.finish_and_clear();
        }
    }
}
