//! Any bytes: `PatchFile::parse` must return `Ok` or `Err`, never panic, and a file it
//! accepts must be describable by the inspect report. The same bytes are also tried
//! as a bare ELF (the input `make` validates).

#![no_main]

use kpatch_file::inspect::Report;
use kpatch_file::{ElfView, PatchFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = PatchFile::parse(data) {
        let report = Report::new(&file);
        let _ = report.to_string();
    }
    if let Ok(view) = ElfView::parse(data, 0) {
        let _ = kpatch_file::inspect::ElfReport::new(&view);
    }
});
