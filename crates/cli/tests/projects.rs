//! Issue 5 acceptance: live patches built from real project trees with `livecare build`
//! and `libcare-patch-make` (a multi-file make project with a static and a shared
//! library, an autotools project, a CMake project, and memcached from Debian's source
//! archive) apply to processes started from those trees, change what they do, and
//! unpatch back to the original behaviour.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::load::{assert_phases, Conn, Load, Phases, Reply};
use testkit::{build_id_of, MemorySnapshot, Running, Scratch};

/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(30);

fn livecare() -> &'static str {
    env!("CARGO_BIN_EXE_livecare")
}

/// Runs `cmd` in `dir`, returns stdout+stderr; panics with the full output on failure.
fn ok_in(dir: &Path, cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    text_ok(out, what)
}

fn text_ok(out: Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

fn sh(dir: &Path, script: &str) -> String {
    ok_in(dir, Command::new("sh").args(["-c", script]), script)
}

/// The `<buildid>.kpatch` files of a patch directory, sorted by name.
fn kpatch_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "kpatch").then(|| p.file_stem().unwrap().to_string_lossy().into())
        })
        .collect();
    v.sort();
    v
}

fn patch_dir(pid: u32, dir: &Path) -> String {
    ok_in(
        Path::new("/"),
        Command::new(livecare())
            .args(["patch", "-p", &pid.to_string()])
            .arg(dir),
        "livecare patch",
    )
}

fn unpatch_latest(pid: u32) -> String {
    ok_in(
        Path::new("/"),
        Command::new(livecare()).args(["unpatch", "-p", &pid.to_string()]),
        "livecare unpatch",
    )
}

/// One line of the make fixture's `ticker`: `tick=N greet=W score=S tag=T`.
#[derive(Debug, Clone, PartialEq)]
struct Tick {
    n: i64,
    greet: String,
    score: i64,
    tag: String,
}

impl Tick {
    fn parse(line: &str) -> Option<Tick> {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k).map(str::to_string))
        };
        Some(Tick {
            n: field("tick=")?.parse().ok()?,
            greet: field("greet=")?,
            score: field("score=")?.parse().ok()?,
            tag: field("tag=")?,
        })
    }

    /// All three functions behave as the original source says.
    fn is_original(&self) -> bool {
        self.greet == format!("hello#{}", self.n % 100)
            && self.score == self.n * 10 + 1
            && self.tag == if self.n & 1 == 1 { "odd" } else { "even" }
    }

    /// All three functions behave as `fix.diff` says: the program's own `greet`, the
    /// static library's `foo_score` and the shared library's `bar_tag`.
    fn is_patched(&self) -> bool {
        self.greet == format!("PATCHED-hi#{}", self.n % 100)
            && self.score == -(self.n * 10 + 1)
            && self.tag == if self.n & 1 == 1 { "ODD" } else { "EVEN" }
    }
}

/// Waits for a tick line satisfying `pred`, then checks that the next `more` lines
/// satisfy it too and that no tick was skipped.
fn expect_ticks(p: &mut Running, what: &str, more: usize, pred: impl Fn(&Tick) -> bool) {
    let first = p
        .wait_for_match(|l| Tick::parse(l).is_some_and(|t| pred(&t)), WAIT)
        .unwrap_or_else(|e| panic!("no {what} line: {e:#}"));
    let mut prev = Tick::parse(&first).unwrap();
    for _ in 0..more {
        let line = p.wait_for("tick=", WAIT).unwrap();
        let t = Tick::parse(&line).unwrap_or_else(|| panic!("bad line {line:?}"));
        assert!(pred(&t), "expected {what}, got {line:?}");
        assert_eq!(t.n, prev.n + 1, "ticks skipped: {prev:?} then {t:?}");
        prev = t;
    }
}

/// Which command set drives patch/info/unpatch.
enum Face {
    /// `livecare patch|info|unpatch`.
    Native,
    /// `libcare-ctl patch|info|unpatch` through a link with that name.
    LibCare(PathBuf),
}

impl Face {
    fn run(&self, args: &[&str], what: &str) -> String {
        let mut cmd = match self {
            Face::Native => Command::new(livecare()),
            Face::LibCare(ctl) => Command::new(ctl),
        };
        ok_in(Path::new("/"), cmd.args(args), what)
    }
}

/// Sums `N` over the lines `N patch hunk(s) <verb>` of LibCare's output.
fn libcare_hunks(text: &str, verb: &str) -> usize {
    text.lines()
        .filter_map(|l| {
            l.split_once(" patch hunk(s) ")
                .filter(|(_, rest)| rest.starts_with(verb))
        })
        .map(|(n, _)| {
            n.trim()
                .parse::<usize>()
                .unwrap_or_else(|_| panic!("bad line in {text}"))
        })
        .sum()
}

/// Starts the make fixture's `ticker`, checks the original behaviour, applies every
/// patch of `patches`, checks all three changes, unpatches one patch per object and
/// checks the original behaviour is back, with the process alive and not left traced.
fn check_ticker_live(ticker: &Path, patches: &Path, face: Face) {
    let lib = ticker.parent().unwrap().join("bar/libbar.so");
    let mut want = vec![build_id_of(ticker).unwrap(), build_id_of(&lib).unwrap()];
    want.sort();
    assert_eq!(
        kpatch_names(patches),
        want,
        "one patch per changed object, named by build-id"
    );

    let mut p = Running::start(ticker, &[]).unwrap();
    let pid = p.pid().to_string();
    expect_ticks(&mut p, "original", 3, Tick::is_original);
    let before = MemorySnapshot::take(p.pid()).unwrap();

    let dir = patches.to_string_lossy();
    let text = face.run(&["patch", "-p", &pid, &dir], "patch");
    expect_ticks(&mut p, "patched", 5, Tick::is_patched);
    let (state, tracer) = p.proc_state().unwrap();
    assert_eq!(
        tracer, 0,
        "left traced after patch ({state}); patch said:\n{text}"
    );

    let info = face.run(&["info", "-p", &pid], "info");
    match face {
        Face::Native => {
            for f in ["greet", "foo_score", "bar_tag"] {
                assert!(info.contains(f), "info does not list {f}:\n{info}");
            }
        }
        Face::LibCare(_) => {
            assert_eq!(
                libcare_hunks(&text, "have been successfully applied"),
                3,
                "{text}"
            );
            for id in &want {
                assert!(info.contains(&format!("Build id: {id}")), "{info}");
            }
            assert_eq!(info.matches("Patch id: fix-1").count(), 2, "{info}");
        }
    }

    // One patch per object, removed last-in first-out: `livecare unpatch` takes the
    // newest, `libcare-ctl unpatch` all of them (as LibCare's does).
    let undo1 = face.run(&["unpatch", "-p", &pid], "unpatch");
    if let Face::LibCare(_) = face {
        let n = libcare_hunks(&undo1, "were successfully cancelled");
        assert_eq!(n, 3, "{undo1}");
    } else {
        face.run(&["unpatch", "-p", &pid], "unpatch");
    }
    expect_ticks(&mut p, "original again", 5, Tick::is_original);
    assert!(p.is_alive());
    // The original code bytes are back (patch regions may stay mapped for reuse, so
    // only the mappings that existed before are compared).
    let after = MemorySnapshot::take(p.pid()).unwrap();
    for (line, bytes) in &before.code {
        if let Some((_, now)) = after.code.iter().find(|(l, _)| l == line) {
            assert!(bytes == now, "code of {line} differs after unpatch");
        }
    }
}

fn make_fixture_tree() -> Scratch {
    let tree = Scratch::new().unwrap();
    tree.copy_fixture("project-make").unwrap();
    tree
}

/// The sources the diff touches are back to the fixture's contents after a build.
fn assert_sources_restored(tree: &Path, case: &str, files: &[&str]) {
    for f in files {
        let want = std::fs::read(testkit::fixture_dir(case).join(f)).unwrap();
        let got = std::fs::read(tree.join(f)).unwrap();
        assert!(want == got, "{f} was not restored after the build");
    }
}

const MAKE_FIX_FILES: [&str; 3] = ["src/greet.c", "foo/score.c", "bar/bar.c"];

#[test]
fn make_project_fix_in_program_static_and_shared_library_applies_live_via_livecare_build() {
    let tree = make_fixture_tree();
    let elsewhere = Scratch::new().unwrap();
    let out = elsewhere.join("out");
    // Run from another directory with -C, and build as Debian's packaging would
    // (dpkg-buildflags: hardening, prefix map, full RELRO + BIND_NOW).
    let cflags = format!(
        "CFLAGS=-g -O2 -ffile-prefix-map={}=. -fstack-protector-strong -Wformat \
         -Werror=format-security -fcf-protection",
        tree.path().display()
    );
    let text = ok_in(
        elsewhere.path(),
        Command::new(livecare())
            .args(["build", "-C"])
            .arg(tree.path())
            .arg("-o")
            .arg(&out)
            .args(["-i", "fix-1"])
            .arg(tree.join("fix.diff"))
            .args([
                "--",
                "make",
                "-j2",
                &cflags,
                "LDFLAGS=-Wl,-z,relro -Wl,-z,now",
            ]),
        "livecare build",
    );
    for f in ["greet", "foo_score", "bar_tag"] {
        assert!(text.contains(f), "build did not report {f}:\n{text}");
    }
    assert!(
        !text.contains("foo_scale"),
        "an unchanged function was patched:\n{text}"
    );
    assert_sources_restored(tree.path(), "project-make", &MAKE_FIX_FILES);
    check_ticker_live(&tree.join("ticker"), &out, Face::Native);
}

#[test]
fn make_project_fix_applies_live_via_libcare_patch_make_patchroot() {
    let tree = make_fixture_tree();
    let tools = Scratch::new().unwrap();
    let lpm = tools.join("libcare-patch-make");
    std::os::unix::fs::symlink(livecare(), &lpm).unwrap();
    // LibCare's way: run inside the project, the project installs into $DESTDIR.
    let out = Command::new(&lpm)
        .args(["--destdir", "DESTDIR", "-i", "fix-1", "fix.diff"])
        .current_dir(tree.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = text_ok(out, "libcare-patch-make");
    let at = |b: &str| {
        stdout
            .find(b)
            .unwrap_or_else(|| panic!("no {b} banner:\n{text}"))
    };
    assert!(at("BUILDING ORIGINAL CODE") < at("BUILDING PATCHED CODE"));
    assert!(at("BUILDING PATCHED CODE") < at("MAKING PATCHES"));
    assert_sources_restored(tree.path(), "project-make", &MAKE_FIX_FILES);
    // The installed original is what runs in production; it is the same build.
    let installed = find_installed_ticker(&tree.join("lpmake"))
        .unwrap_or_else(|| panic!("no installed ticker under lpmake/:\n{text}"));
    assert_eq!(
        build_id_of(&installed).unwrap(),
        build_id_of(&tree.join("ticker")).unwrap(),
        "installed original differs from the tree's build"
    );
    let ctl = tools.join("libcare-ctl");
    std::os::unix::fs::symlink(livecare(), &ctl).unwrap();
    check_ticker_live(&installed, &tree.join("patchroot"), Face::LibCare(ctl));
}

/// The installed original `ticker` under `dir`: a file of that name with its
/// `bar/libbar.so` beside it (as `make install` lays them out), outside the patched
/// stage's install tree.
fn find_installed_ticker(dir: &Path) -> Option<PathBuf> {
    let name = "ticker";
    let mut stack = vec![dir.to_path_buf()];
    let mut found = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == name) {
                found.push(p);
            }
        }
    }
    found.sort();
    found.into_iter().find(|p| {
        !p.to_string_lossy().contains("patched")
            && p.parent()
                .is_some_and(|d| d.join("bar/libbar.so").is_file())
    })
}

/// The unpacked memcached source from Debian's archive, fetched once into
/// target/debian-src by .ci/setup-debian-src.sh; None (after a loud message) when the
/// archive cannot be reached.
fn memcached_source() -> Option<PathBuf> {
    let root = testkit::repo_root();
    let out = Command::new("bash")
        .arg(root.join(".ci/setup-debian-src.sh"))
        .arg("memcached")
        .arg(root.join("target/debian-src"))
        .stdin(Stdio::null())
        .output()
        .expect("running .ci/setup-debian-src.sh");
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        testkit::skip_banner(&format!(
            "memcached's source from Debian's archive (network; .ci/setup-debian-src.sh: {})",
            out.status
        ));
        return None;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(
        dir.join("proto_text.c").is_file(),
        "no memcached tree at {}",
        dir.display()
    );
    Some(dir)
}

/// One memcached `version` request: the fix makes it `VERSION 1.x-livecare-fixed`.
fn version_ask(c: &mut Conn) -> Result<Reply, String> {
    c.w.write_all(b"version\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    c.r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
    match line.trim_end() {
        l if l.starts_with("VERSION ") && l.ends_with("-livecare-fixed") => Ok(Reply::Patched),
        l if l.starts_with("VERSION 1.") && !l.contains("livecare") => Ok(Reply::Original),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

/// A memcached request over a fresh connection; returns the reply lines up to `END`,
/// `STORED` or an error line.
fn memcached_request(port: u16, req: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 {
            break;
        }
        all.push_str(&line);
        let l = line.trim_end();
        if l == "END" || l == "STORED" || l.contains("ERROR") {
            break;
        }
    }
    all
}

/// A scratch copy of the memcached source, configured LibCare's way: CC = libcare-cc
/// in the configure stage, so the Makefile calls the wrapper and `livecare build`
/// drives its stages. Returns (pristine source, tree, dir holding the libcare-cc link).
fn configured_memcached() -> Option<(PathBuf, Scratch, Scratch)> {
    let src = memcached_source()?;
    let tree = Scratch::new().unwrap();
    sh(
        Path::new("/"),
        &format!("cp -a '{}/.' '{}'", src.display(), tree.path().display()),
    );
    let tools = Scratch::new().unwrap();
    let cc = tools.join("libcare-cc");
    std::os::unix::fs::symlink(livecare(), &cc).unwrap();
    ok_in(
        tree.path(),
        Command::new("./configure")
            .arg("-q")
            .env("CC", &cc)
            .env("KPATCH_STAGE", "configure"),
        "memcached ./configure",
    );
    Some((src, tree, tools))
}

/// Issue 17.2: the default `make` also builds memcached-debug (gcov), whose coverage
/// records change with any edit; that must not stop the build.
#[test]
fn memcached_default_make_with_coverage_debug_binary_still_patches_memcached() {
    let Some((_src, tree, _tools)) = configured_memcached() else {
        return;
    };
    let diff = testkit::fixture_dir("project-memcached").join("fix.diff");
    let out = tree.join("patches");
    // The project's default build (`make`: memcached, memcached-debug, testapp, ...),
    // patches wanted only for the shipped daemon.
    let text = ok_in(
        tree.path(),
        Command::new(livecare())
            .args(["build", "-i", "vfix1", "--target", "memcached", "-o"])
            .arg(&out)
            .arg(&diff),
        "livecare build --target memcached (default make)",
    );
    let exe = tree.join("memcached");
    assert_eq!(kpatch_names(&out), [build_id_of(&exe).unwrap()], "{text}");
}

#[test]
fn memcached_from_debian_source_is_patched_and_unpatched_under_load() {
    let begun = Instant::now();
    let Some((src, tree, _tools)) = configured_memcached() else {
        return;
    };
    let diff = testkit::fixture_dir("project-memcached").join("fix.diff");
    let out = tree.join("patches");
    let text = ok_in(
        tree.path(),
        Command::new(livecare())
            .args(["build", "-i", "vfix1", "-o"])
            .arg(&out)
            .arg(&diff)
            .args(["--", "make", "-j2", "memcached"]),
        "livecare build (memcached)",
    );
    let built = begun.elapsed();
    let exe = tree.join("memcached");
    assert_eq!(kpatch_names(&out), [build_id_of(&exe).unwrap()], "{text}");
    assert_sources_restored_from(&src, tree.path(), &["proto_text.c"]);

    // A free port on the loopback: bind to 0, note it, release it. Another process
    // can take it before memcached binds it; then memcached exits and we try again.
    let mut attempt = 0;
    let (mut server, port, up) = loop {
        attempt += 1;
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut args = vec![
            "-l".to_string(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ];
        args.extend(["-U", "0", "-t", "4", "-m", "16"].map(String::from));
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            args.extend(["-u".to_string(), "root".into()]);
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut server = Running::start(&exe, &argv).unwrap();
        let up = Instant::now();
        let mut listening = false;
        while server.is_alive() {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                listening = true;
                break;
            }
            assert!(up.elapsed() < WAIT, "memcached did not listen on {port}");
            thread::sleep(Duration::from_millis(20));
        }
        if listening {
            break (server, port, up);
        }
        assert!(attempt < 5, "memcached exited at start {attempt} times");
    };
    let stored = memcached_request(port, "set livecare 0 0 5\r\nhello\r\n");
    assert_eq!(
        stats_livecare(port, server.pid()),
        None,
        "stats before the patch"
    );
    assert_eq!(stored.trim_end(), "STORED");

    let load = Load::start(port, version_ask);
    load.wait_sent(200);
    let t_patch = Instant::now();
    let patch_text = patch_dir(server.pid(), &out);
    let t_patched = Instant::now();
    assert_eq!(
        stats_livecare(port, server.pid()).as_deref(),
        Some("patched"),
        "stats while patched\n{patch_text}"
    );
    load.wait_sent(500);
    let t_unpatch = Instant::now();
    let unpatch_text = unpatch_latest(server.pid());
    let t_unpatched = Instant::now();
    assert_eq!(
        stats_livecare(port, server.pid()),
        None,
        "stats after unpatch\n{unpatch_text}"
    );
    load.wait_sent(500);
    let end = Instant::now();
    let log = load.finish();
    assert!(server.is_alive(), "memcached died");
    let (state, tracer) = server.proc_state().unwrap();
    assert_eq!(tracer, 0, "memcached left traced ({state})");
    let phases = Phases {
        up,
        patch: t_patch,
        patched: t_patched,
        unpatch: t_unpatch,
        unpatched: t_unpatched,
        end,
    };
    assert_phases("memcached", &log, &phases);
    // The cache kept its data through patch and unpatch.
    let got = memcached_request(port, "get livecare\r\n");
    assert!(got.contains("\r\nhello\r\n"), "{got:?}");
    eprintln!(
        "memcached: build {built:?}, {} requests, 0 failed, patch took {:?}, unpatch {:?}",
        log.len(),
        t_patched - t_patch,
        t_unpatched - t_unpatch
    );
}

/// The value of the `STAT livecare` line of memcached's `stats` reply (added by the
/// fix), after checking the reply is complete and comes from process `pid`.
fn stats_livecare(port: u16, pid: u32) -> Option<String> {
    let reply = memcached_request(port, "stats\r\n");
    assert!(
        reply.ends_with("END\r\n"),
        "incomplete stats reply: {reply:?}"
    );
    assert!(reply.contains(&format!("STAT pid {pid}\r\n")), "{reply:?}");
    reply
        .lines()
        .find_map(|l| l.strip_prefix("STAT livecare "))
        .map(str::to_string)
}

/// Like `assert_sources_restored`, against an arbitrary pristine tree.
fn assert_sources_restored_from(pristine: &Path, tree: &Path, files: &[&str]) {
    for f in files {
        let want = std::fs::read(pristine.join(f)).unwrap();
        let got = std::fs::read(tree.join(f)).unwrap();
        assert!(want == got, "{f} was not restored after the build");
    }
}

/// One line of the autotools fixture's `metronome`: `beat=N tempo=Tbpm mood=M`.
fn beat(line: &str) -> Option<(i64, i64, String)> {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k).map(str::to_string))
    };
    let n = field("beat=")?.parse().ok()?;
    let tempo = field("tempo=")?.strip_suffix("bpm")?.parse().ok()?;
    Some((n, tempo, field("mood=")?))
}

#[test]
fn autotools_project_built_with_its_own_configure_and_make_is_patched_live() {
    testkit::needs_tool!("autoreconf", "apt-get install -y autoconf automake");
    testkit::needs_tool!("automake", "apt-get install -y autoconf automake");
    let tree = Scratch::new().unwrap();
    tree.copy_fixture("project-autotools").unwrap();
    sh(tree.path(), "autoreconf -i 2>&1");
    // The project's own build command, configure included, as a user would type it.
    let out = tree.join("out");
    let text = ok_in(
        tree.path(),
        Command::new(livecare())
            .args(["build", "-i", "at1", "-o"])
            .arg(&out)
            .args(["fix.diff", "--", "sh", "-c", "./configure -q && make"]),
        "livecare build (autotools)",
    );
    let exe = tree.join("metronome");
    assert_eq!(kpatch_names(&out), [build_id_of(&exe).unwrap()], "{text}");
    assert_sources_restored(
        tree.path(),
        "project-autotools",
        &["lib/tempo.c", "src/mood.c"],
    );

    let mut p = Running::start(&exe, &[]).unwrap();
    let original = |l: &str| {
        beat(l)
            .is_some_and(|(n, t, m)| t == 60 + n % 4 && m == if t > 61 { "lively" } else { "calm" })
    };
    let patched = |l: &str| beat(l).is_some_and(|(n, t, m)| t == 120 + n % 4 && m == "FRANTIC");
    p.wait_for_match(original, WAIT).unwrap();
    patch_dir(p.pid(), &out);
    p.wait_for_match(patched, WAIT).unwrap();
    for _ in 0..5 {
        let l = p.wait_for("beat=", WAIT).unwrap();
        assert!(patched(&l), "not patched: {l}");
    }
    unpatch_latest(p.pid());
    p.wait_for_match(original, WAIT).unwrap();
    for _ in 0..5 {
        let l = p.wait_for("beat=", WAIT).unwrap();
        assert!(original(&l), "not original: {l}");
    }
    assert!(p.is_alive());
}

/// One line of the CMake fixture's `beacon`: `ping=N who=B strength=S word=W`.
fn ping(line: &str) -> Option<(i64, String, i64, String)> {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k).map(str::to_string))
    };
    Some((
        field("ping=")?.parse().ok()?,
        field("who=")?,
        field("strength=")?.parse().ok()?,
        field("word=")?,
    ))
}

#[test]
fn cmake_project_fix_in_program_and_versioned_shared_library_is_patched_live() {
    testkit::needs_tool!("cmake", "apt-get install -y cmake");
    let tree = Scratch::new().unwrap();
    tree.copy_fixture("project-cmake").unwrap();
    let out = tree.join("out");
    let text = ok_in(
        tree.path(),
        Command::new(livecare())
            .args(["build", "-i", "cm1", "-o"])
            .arg(&out)
            .args([
                "fix.diff",
                "--",
                "sh",
                "-c",
                "cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo && cmake --build build",
            ]),
        "livecare build (cmake)",
    );
    let exe = tree.join("build/beacon");
    let lib = tree.join("build/libsignal.so.1.0");
    let mut want = vec![build_id_of(&exe).unwrap(), build_id_of(&lib).unwrap()];
    want.sort();
    assert_eq!(kpatch_names(&out), want, "{text}");
    assert!(
        !text.contains("clamp"),
        "an unchanged function was patched:\n{text}"
    );
    assert_sources_restored(
        tree.path(),
        "project-cmake",
        &["app/banner.c", "net/signal.c"],
    );

    let mut p = Running::start(&exe, &[]).unwrap();
    let original = |l: &str| {
        ping(l).is_some_and(|(n, who, s, w)| {
            who == "beacon-v1"
                && s == (n % 7 * 20).min(100)
                && w == if s >= 50 { "strong" } else { "weak" }
        })
    };
    let patched = |l: &str| {
        ping(l).is_some_and(|(_, who, s, w)| who == "beacon-v2-live" && s == 100 && w == "STRONG")
    };
    p.wait_for_match(original, WAIT).unwrap();
    let applied = patch_dir(p.pid(), &out);
    p.wait_for_match(patched, WAIT)
        .unwrap_or_else(|e| panic!("{e:#}\npatch said:\n{applied}"));
    for _ in 0..8 {
        let l = p.wait_for("ping=", WAIT).unwrap();
        assert!(patched(&l), "not patched: {l}");
    }
    unpatch_latest(p.pid());
    unpatch_latest(p.pid());
    p.wait_for_match(original, WAIT).unwrap();
    for _ in 0..8 {
        let l = p.wait_for("ping=", WAIT).unwrap();
        assert!(original(&l), "not original: {l}");
    }
    assert!(p.is_alive());
    assert_eq!(p.proc_state().unwrap().1, 0, "left traced");
}

/// Issue 17.6: LibCare's documented flow, with `libcare-cc` on PATH
/// (`livecare install-links`): `KPATCH_STAGE=configure CC=libcare-cc ./configure`,
/// then `libcare-patch-make` with `CC=libcare-cc` still in the environment (a shell
/// that exported it), and `livecare build` with `CC` the link's absolute path. The
/// wrapper named as the compiler is never taken for the real one: gcc is found on
/// PATH past it, in every stage. The patch works live.
#[test]
fn libcare_documented_flow_cc_libcare_cc_configure_then_build() {
    testkit::needs_tool!("autoreconf", "apt-get install -y autoconf automake");
    testkit::needs_tool!("automake", "apt-get install -y autoconf automake");
    let tree = Scratch::new().unwrap();
    tree.copy_fixture("project-autotools").unwrap();
    sh(tree.path(), "autoreconf -i 2>&1");
    let links = Scratch::new().unwrap();
    ok_in(
        Path::new("/"),
        Command::new(livecare())
            .arg("install-links")
            .arg(links.path()),
        "livecare install-links",
    );
    let path = format!(
        "{}:{}",
        links.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    fn with_path<'a>(c: &'a mut Command, path: &str) -> &'a mut Command {
        c.env("PATH", path)
            .env_remove("KPATCH_STAGE")
            .env_remove("KPCCREAL")
    }
    ok_in(
        tree.path(),
        with_path(Command::new("./configure").arg("-q"), &path)
            .env("KPATCH_STAGE", "configure")
            .env("CC", "libcare-cc"),
        "KPATCH_STAGE=configure CC=libcare-cc ./configure",
    );
    let makefile = std::fs::read_to_string(tree.join("Makefile")).unwrap();
    assert!(
        makefile.contains("\nCC = libcare-cc\n"),
        "configure did not take CC"
    );
    let text = ok_in(
        tree.path(),
        with_path(&mut Command::new(links.join("libcare-patch-make")), &path)
            .env("CC", "libcare-cc")
            .args(["-i", "lc1", "fix.diff"]),
        "CC=libcare-cc libcare-patch-make fix.diff",
    );
    let exe = tree.join("metronome");
    let bid = build_id_of(&exe).unwrap();
    assert_eq!(
        kpatch_names(&tree.join("patchroot")),
        std::slice::from_ref(&bid),
        "{text}"
    );

    sh(tree.path(), "make clean >/dev/null");
    let out = tree.join("out");
    let cc = links.join("libcare-cc");
    let text = ok_in(
        tree.path(),
        with_path(&mut Command::new(livecare()), &path)
            .env("CC", &cc)
            .args(["build", "-i", "lc2", "-o"])
            .arg(&out)
            .arg("fix.diff"),
        "CC=/abs/libcare-cc livecare build fix.diff",
    );
    assert_eq!(kpatch_names(&out), [bid], "{text}");

    let mut p = Running::start(&exe, &[]).unwrap();
    let original = |l: &str| beat(l).is_some_and(|(n, t, _)| t == 60 + n % 4);
    let patched = |l: &str| beat(l).is_some_and(|(n, t, m)| t == 120 + n % 4 && m == "FRANTIC");
    p.wait_for_match(original, WAIT).unwrap();
    patch_dir(p.pid(), &tree.join("patchroot"));
    p.wait_for_match(patched, WAIT).unwrap();
    unpatch_latest(p.pid());
    p.wait_for_match(original, WAIT).unwrap();
    assert!(p.is_alive());
}
