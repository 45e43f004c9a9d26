//! A real Debian source package, memcached, fetched with `apt-get source` through a
//! private sources list: `livecare build` turns a one-line protocol change into a patch
//! for the `memcached` binary, which is applied to (and removed from) a running server.
//!
//! Ignored by default: it needs the network, `dpkg-dev` and `libevent-dev`, and takes
//! about a minute. Run it with `cargo test -p livecare --test build_debian -- --ignored`.
//! Every missing prerequisite is reported as SKIPPED with the reason.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use testkit::Scratch;

/// Runs a shell command in `dir`; returns its combined output, or None on failure.
fn sh(dir: &Path, cmd: &str) -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .current_dir(dir)
        .output()
        .ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Some(text)
    } else {
        eprintln!("`{cmd}` failed:\n{text}");
        None
    }
}

fn skip(why: &str) {
    eprintln!("SKIPPED build_debian: {why}");
}

/// Sends `version` to the server and returns its reply line.
fn version(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"version\r\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    line.trim_end().to_string()
}

fn livecare(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_livecare"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "livecare {args:?} failed:\n{text}");
    text
}

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs the network, dpkg-dev and libevent-dev; about a minute"]
fn debian_memcached_source_package_is_patched_live() {
    for (tool, pkg) in [("dpkg-source", "dpkg-dev"), ("autoreconf", "autoconf")] {
        if Command::new(tool).arg("--version").output().is_err() {
            return skip(&format!("{tool} missing (apt-get install -y {pkg})"));
        }
    }
    if !Path::new("/usr/include/event2/event.h").exists() {
        return skip("libevent headers missing (apt-get install -y libevent-dev)");
    }
    let dir = Scratch::new().unwrap();
    let root = dir.path();
    // A private sources list and lists directory: the system's apt state is untouched.
    std::fs::create_dir_all(root.join("apt/lists/partial")).unwrap();
    std::fs::write(
        root.join("apt/sources.list"),
        "deb-src http://deb.debian.org/debian bookworm main\n",
    )
    .unwrap();
    let apt = format!(
        "apt-get -q -o Dir::Etc::SourceList={0}/apt/sources.list -o Dir::Etc::SourceParts=/dev/null \
         -o Dir::State::Lists={0}/apt/lists",
        root.display()
    );
    if sh(root, &format!("timeout 180 {apt} update")).is_none()
        || sh(
            root,
            &format!("timeout 180 {apt} source memcached=1.6.18-1"),
        )
        .is_none()
    {
        return skip("deb.debian.org unreachable or memcached 1.6.18-1 not available");
    }
    let src: PathBuf = root.join("memcached-1.6.18");
    assert!(src.join("proto_text.c").is_file());

    // The fix: the VERSION reply names the live patch.
    let orig = std::fs::read_to_string(src.join("proto_text.c")).unwrap();
    let line = "    out_string(c, \"VERSION \" VERSION);";
    assert!(orig.contains(line), "proto_text.c changed upstream");
    std::fs::create_dir_all(root.join("a")).unwrap();
    std::fs::create_dir_all(root.join("b")).unwrap();
    std::fs::write(root.join("a/proto_text.c"), &orig).unwrap();
    std::fs::write(
        root.join("b/proto_text.c"),
        orig.replace(
            line,
            "    out_string(c, \"VERSION \" VERSION \" (live-patched)\");",
        ),
    )
    .unwrap();
    let diff = Command::new("diff")
        .args(["-u", "a/proto_text.c", "b/proto_text.c"])
        .current_dir(root)
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    std::fs::write(root.join("version.diff"), &diff.stdout).unwrap();

    sh(&src, "./configure -q >/dev/null").expect("configure");
    // Only the production binary: memcached-debug is a coverage build whose counters
    // change with any edit (LibCare fails on it too).
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let made = livecare(
        &src,
        &[
            "build",
            "-o",
            "../patches",
            "../version.diff",
            "--",
            "make",
            &format!("-j{jobs}"),
            "memcached",
        ],
    );
    let id = testkit::build_id_of(&src.join("memcached")).unwrap();
    assert!(
        root.join(format!("patches/{id}.kpatch")).is_file(),
        "{made}"
    );

    let port = 20000 + (std::process::id() % 20000) as u16;
    let server = Server(
        Command::new(src.join("memcached"))
            .args([
                "-u",
                "root",
                "-U",
                "0",
                "-l",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut tries = 0;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        tries += 1;
        assert!(tries < 100, "memcached did not start on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(version(port), "VERSION 1.6.18");
    let pid = server.0.id().to_string();
    livecare(
        root,
        &["patch", "-p", &pid, &root.join("patches").to_string_lossy()],
    );
    assert_eq!(version(port), "VERSION 1.6.18 (live-patched)");
    livecare(root, &["unpatch", "-p", &pid]);
    assert_eq!(version(port), "VERSION 1.6.18");
}
