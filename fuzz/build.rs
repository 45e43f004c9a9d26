//! The /proc and loaded-object parsers of livecare-process are private functions of
//! modules that only read from /proc (`parse_line` in maps.rs; `load_bias`, `kind_of`,
//! `build_id_from_memory` in objects.rs). To fuzz the real code rather than a copy,
//! this copies those source files into OUT_DIR without their inner doc comments, so
//! a fuzz target can `include!` them inside a module of its own and call the private
//! functions from there. A rename in livecare-process breaks the fuzz build loudly.

use std::path::Path;

fn main() {
    let out = std::env::var("OUT_DIR").expect("OUT_DIR");
    for name in ["maps.rs", "objects.rs"] {
        let src = Path::new("../crates/process/src").join(name);
        println!("cargo:rerun-if-changed={}", src.display());
        let text = std::fs::read_to_string(&src).expect("reading livecare-process source");
        let body: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//!"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(Path::new(&out).join(name), body).expect("writing OUT_DIR copy");
    }
}
