//! Any text as `/proc/PID/maps` lines, through livecare-process' own `parse_line`
//! (private: its source is included here by build.rs, see there): returns `Some` or
//! `None`, never panics, and a parsed entry's predicates are callable.
//!
//! The auxv parser has no pure entry point (it is inline in `auxv(pid)`, which reads
//! /proc/PID/auxv itself), so it is not reachable from a fuzzer.

#![no_main]

use libfuzzer_sys::fuzz_target;
// What maps.rs imports from its crate root.
use livecare_process::{Error, Pid};

#[allow(dead_code, clippy::all)]
mod maps {
    include!(concat!(env!("OUT_DIR"), "/maps.rs"));

    /// The private line parser.
    pub fn fuzz_line(line: &str) -> Option<MapEntry> {
        parse_line(line)
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        if let Some(e) = maps::fuzz_line(line) {
            let _ = (e.is_file(), e.is_anonymous(), e.end.checked_sub(e.start));
        }
    }
});
