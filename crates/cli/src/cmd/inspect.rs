//! `livecare inspect`: validate a `.kpatch` file completely and print what it holds.

use std::process::ExitCode;

use anyhow::Context;
use kpatch_file::inspect::Report;
use kpatch_file::PatchFile;

/// Flags of `livecare inspect`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Exit status: 0 if the file is a valid patch (LibCare or LibcarePlus layout), \
1 if not; the error names the field and its offset in the file."
)]
pub struct Args {
    /// The .kpatch file.
    pub file: std::path::PathBuf,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `livecare inspect`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let path = &args.file;
    // Checks the header's size against the file's before reading it all.
    let bytes = livecare_apply::read_patch_bytes(path)
        .with_context(|| format!("{} is not a valid patch file", path.display()))?;
    let file = PatchFile::parse(&bytes)
        .with_context(|| format!("{} is not a valid patch file", path.display()))?;
    let report = Report::new(&file);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}: valid patch file", path.display());
        print!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}
