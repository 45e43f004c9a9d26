//! `livecare demo`, the README's first command: it must run every step and exit 0.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn demo_builds_patches_and_unpatches_a_live_process() {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_livecare"))
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    // The output visibly changed and came back.
    let patched = stdout
        .find("Hello from the PATCHED code")
        .expect("no patched line");
    let back = stdout
        .rfind("Hello from the original code")
        .expect("no original line");
    assert!(
        back > patched,
        "original output did not return after unpatch:\n{stdout}"
    );
    assert!(stdout.contains("$ livecare patch -p"), "{stdout}");
    assert!(stdout.contains("$ livecare info -p"), "{stdout}");
    assert!(stdout.contains("$ livecare unpatch -p"), "{stdout}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "demo took {:?}",
        start.elapsed()
    );
    // Nothing is left behind: no demo program still running from a demo directory.
    let leftover = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path().join("exe")).ok())
        .any(|exe| exe.to_string_lossy().contains("livecare-demo-"));
    assert!(!leftover, "a demo process outlived the demo");
}
