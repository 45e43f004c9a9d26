//! Minimal `kpatch_strip` over the library, for trying the transforms without the CLI crate:
//! `kpatch_strip --strip IN OUT | --rel-fixup ORIG PATCH | --undo-link ORIG PATCH`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, a, b] = args.as_slice() else {
        eprintln!(
            "usage: kpatch_strip --strip IN OUT | --rel-fixup ORIG PATCH | --undo-link ORIG PATCH"
        );
        return ExitCode::from(2);
    };
    let read = |p: &str| std::fs::read(p).map_err(|e| format!("reading {p}: {e}"));
    let result = (|| -> Result<(), String> {
        let out = match mode.as_str() {
            "--strip" => patch_elf::strip(&read(a)?),
            "--rel-fixup" => patch_elf::rel_fixup(&read(a)?, &read(b)?),
            "--undo-link" => patch_elf::undo_link(&read(a)?, &read(b)?),
            _ => return Err(format!("unknown mode {mode}")),
        }
        .map_err(|e| e.to_string())?;
        std::fs::write(b, out).map_err(|e| format!("writing {b}: {e}"))
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
