//! `kpatch_make` / `livecare make`: wrap a relocatable patch ELF into a `.kpatch` container.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use kpatch_file::{BuildId, Layout, MakeOptions, PatchId};

/// Header layout to write.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// LibCare's 688-byte header (no patch id).
    Libcare,
    /// LibcarePlus' 504-byte header with a patch id.
    Libcareplus,
}

impl From<Format> for Layout {
    fn from(f: Format) -> Layout {
        match f {
            Format::Libcare => Layout::LibCare,
            Format::Libcareplus => Layout::LibCarePlus,
        }
    }
}

/// Flags of `kpatch_make`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "The output is the header followed by IN padded with zeros to 16 bytes. \
IN must be a relocatable (ET_REL) x86_64 or aarch64 ELF; it is validated first. build_time is \
the current time, or $SOURCE_DATE_EPOCH when set (reproducible builds)."
)]
pub struct Args {
    /// Print what is written (sizes, layout, ids).
    #[arg(short = 'd', long = "debug")]
    pub debug: bool,
    /// GNU build-id of the target object, in hex (8 to 40 digits, as `readelf -n` shows it).
    #[arg(short = 'b', long = "buildid", value_name = "BUILDID", required = true)]
    pub build_id: String,
    /// Patch id: 1 to 7 printable characters (LibcarePlus layout only).
    #[arg(short = 'i', long = "id", value_name = "PATCHID")]
    pub patch_id: Option<String>,
    /// Output file [default: <BUILDID>.kpatch in the current directory, the name a patch directory uses].
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Header layout [default: libcareplus; under the name kpatch_make: libcare without
    /// -i (LibCare's kpatch_make has no patch id), libcareplus with -i].
    #[arg(long = "format", value_enum)]
    pub format: Option<Format>,
    /// Leave header.csum 0, as LibCare and LibcarePlus do (by default it holds the ELF's
    /// CRC-32, which `livecare` verifies before using a patch).
    #[arg(long = "no-csum")]
    pub no_csum: bool,
    /// The relocatable patch ELF (output of `kpatch_strip --undo-link`).
    #[arg(value_name = "IN")]
    pub input: PathBuf,
}

/// Runs `kpatch_make` under its LibCare name: with no `--format`, the layout the call
/// implies: LibcarePlus' when it gives a patch id (`-i`, LibcarePlus' option), else
/// LibCare's, which LibCare's own `libcare-ctl` requires.
pub fn run_as_kpatch_make(mut args: Args) -> anyhow::Result<ExitCode> {
    if args.format.is_none() {
        args.format = Some(if args.patch_id.is_some() {
            Format::Libcareplus
        } else {
            Format::Libcare
        });
    }
    run(args)
}

/// Runs `kpatch_make`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let build_id = BuildId::parse(&args.build_id).context("bad -b")?;
    let patch_id = args
        .patch_id
        .as_deref()
        .map(PatchId::parse)
        .transpose()
        .context("bad -i")?;
    let layout = Layout::from(args.format.unwrap_or(Format::Libcareplus));
    let elf =
        std::fs::read(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let build_time = build_time()?;
    let options = MakeOptions {
        layout,
        build_time,
        checksum: !args.no_csum,
    };
    let bytes = kpatch_file::make_with(&elf, &build_id, patch_id.as_ref(), &options)
        .with_context(|| format!("making a patch container from {}", args.input.display()))?;
    let output = args
        .output
        .unwrap_or_else(|| PathBuf::from(format!("{build_id}.kpatch")));
    write_atomically(&output, &bytes)?;
    if args.debug {
        let header = layout.header_size();
        eprintln!(
            "kpatch_make: {layout} header {header} bytes + ELF {} bytes + {} bytes padding = {} bytes",
            elf.len(),
            bytes.len().saturating_sub(header).saturating_sub(elf.len()),
            bytes.len()
        );
        eprintln!("kpatch_make: build_time {build_time}");
    }
    eprintln!(
        "wrote {} ({layout} layout, build-id {build_id}, patch id {}, {} bytes)",
        output.display(),
        patch_id.as_ref().map_or("-", PatchId::as_str),
        bytes.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// `SOURCE_DATE_EPOCH` when set, for reproducible patches; the current time otherwise.
fn build_time() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number")),
        Err(_) => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)),
    }
}

/// Writes `data` to a temporary file next to `path`, then renames it over `path`, so a
/// failure never leaves a half-written patch behind.
fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".kpatch_make-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(data)
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    set_readable(tmp.as_file())?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Temporary files are created 0600; a patch file is an ordinary 0644 file.
fn set_readable(file: &std::fs::File) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o644))
        .context("setting permissions")
}
