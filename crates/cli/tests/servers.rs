//! Issue 17 acceptance: real servers from Debian's source packages (redis, nginx,
//! lighttpd, memcached), each built exactly as its README says, patched live under
//! client load with a small fix of our own (tests/fixtures/project-<prog>/fix.diff).
//!
//! Each test builds its program once (the "deployed" tree A) and drives both routes:
//! - `livecare build FIX.diff` in the built tree A, with no flags;
//! - the deployed-binary route: a pristine copy B of the source elsewhere,
//!   `livecare build -C B --target A/<binary> FIX.diff`.
//!
//! Each patch is applied to the server started from A while two clients send
//! requests (0 may fail), must change the reply, and unpatch must restore it.

mod common;

use std::io::{BufRead, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::livecare;
use common::load::{assert_phases, Conn, Load, Phases, Reply};
use testkit::{build_id_of, Running, Scratch};

/// The three builds take both cores each: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(30);

/// How long the deployed-binary route may take to say that it cannot reproduce the
/// deployed build (the issue asks for "within the first minute").
const EARLY: Duration = Duration::from_secs(60);

/// Whether CI runs the deployed-binary route of `pkg`: every program but redis by
/// default (CI time), all with `LIVECARE_SERVERS_DEPLOYED=all`, or a comma list.
fn deployed_route_wanted(pkg: &str) -> bool {
    match std::env::var("LIVECARE_SERVERS_DEPLOYED") {
        Ok(v) if v == "all" => true,
        Ok(v) => v.split(',').any(|p| p.trim() == pkg),
        Err(_) => pkg != "redis",
    }
}

/// A real program under test.
struct Prog {
    /// Debian source package name.
    pkg: &'static str,
    /// Use the upstream tarball Debian ships instead of Debian's patched tree.
    orig: bool,
    /// The configure step its README gives (None: plain `make`).
    configure: Option<&'static [&'static str]>,
    /// The server binary, relative to the tree.
    binary: &'static str,
    /// Starts the server from tree `tree` on `port`, with its files in `dir`.
    start: fn(tree: &Path, dir: &Path, port: u16) -> Running,
    /// One request, classified.
    ask: fn(&mut Conn) -> Result<Reply, String>,
}

/// Runs `cmd` in `dir`; returns stdout+stderr and the output.
fn run_in(dir: &Path, cmd: &mut Command, what: &str) -> (String, Output) {
    let out = cmd
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text, out)
}

/// Like `run_in`, panicking with the full output on failure.
fn ok_in(dir: &Path, cmd: &mut Command, what: &str) -> String {
    let (text, out) = run_in(dir, cmd, what);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

/// `livecare` at low priority (the builds share the machine with the other tests).
fn nice_livecare() -> Command {
    let mut c = Command::new("nice");
    c.args(["-n", "10"]).arg(livecare());
    c
}

/// The unpacked source of `pkg` from Debian's archive (`orig`: the upstream tarball),
/// fetched once into target/debian-src by .ci/setup-debian-src.sh; None (after a loud
/// message) when the archive cannot be reached.
fn debian_source(pkg: &str, orig: bool) -> Option<PathBuf> {
    let root = testkit::repo_root();
    let mut cmd = Command::new("bash");
    cmd.arg(root.join(".ci/setup-debian-src.sh"));
    if orig {
        cmd.arg("--orig");
    }
    let out = cmd
        .arg(pkg)
        .arg(root.join("target/debian-src"))
        .stdin(Stdio::null())
        .output()
        .expect("running .ci/setup-debian-src.sh");
    if !out.status.success() {
        eprintln!(
            "\n\n==== SKIPPED: {pkg} source from Debian's archive is not available ({}) ====\n{}\n",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(dir.is_dir(), "no {pkg} tree at {}", dir.display());
    Some(dir)
}

/// A scratch copy of `src`, as unpacked.
fn copy_tree(src: &Path) -> Scratch {
    let tree = Scratch::new().unwrap();
    ok_in(
        Path::new("/"),
        Command::new("cp")
            .arg("-a")
            .arg(src.join("."))
            .arg(tree.path()),
        "copying the source",
    );
    // `cp -a` gives the copy the mode of the unpacked tree, 0775 for redis's tarball
    // (unpacked by root, permissions kept); livecare refuses patches under a directory
    // others may write, so make it what an operator's umask 022 would.
    ok_in(
        Path::new("/"),
        Command::new("chmod").arg("go-w").arg(tree.path()),
        "chmod go-w",
    );
    tree
}

/// A scratch copy of `src`, configured by its stock configure step when it has one.
fn configured_copy(p: &Prog, src: &Path) -> Scratch {
    let tree = copy_tree(src);
    if let Some(argv) = p.configure {
        ok_in(
            tree.path(),
            Command::new("nice").args(["-n", "10"]).args(argv),
            &format!("{} {}", p.pkg, argv.join(" ")),
        );
    }
    tree
}

/// A free port on the loopback: bind to 0, note it, release it. Another process can
/// take it before the server binds it; the caller then starts again.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A started server; its children (nginx's worker) are killed with it.
struct Server(Running);

impl Drop for Server {
    fn drop(&mut self) {
        for kid in children(self.0.pid()) {
            // SAFETY: kill has no memory effects; the pid is a child of our own server.
            unsafe { libc::kill(kid as i32, libc::SIGKILL) };
        }
    }
}

/// Starts the server from `tree` and waits until it answers a request with the
/// original behaviour; retries on another port when it exits at start.
fn start_server(p: &Prog, tree: &Path, dir: &Path) -> (Server, u16) {
    for attempt in 1..=5 {
        let port = free_port();
        let mut server = Server((p.start)(tree, dir, port));
        let up = Instant::now();
        while server.0.is_alive() {
            if let Ok(mut c) = Conn::open(port) {
                let r = (p.ask)(&mut c);
                assert_eq!(r, Ok(Reply::Original), "{}: first reply", p.pkg);
                return (server, port);
            }
            assert!(up.elapsed() < WAIT, "{} did not listen on {port}", p.pkg);
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} exited at start {attempt}", p.pkg);
    }
    panic!("{} exited at start 5 times", p.pkg);
}

/// The children of `pid` (e.g. nginx's workers).
fn children(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // The fields after the command name (which may hold spaces): state, ppid, ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(pid) {
            kids.push(child);
        }
    }
    kids
}

/// The processes to patch: the server and its children (nginx's worker serves the
/// requests, its master forks new workers from its own, patched, memory).
fn server_pids(server: &Running) -> Vec<u32> {
    let mut pids = children(server.pid());
    pids.push(server.pid());
    pids
}

/// (State, TracerPid) of `pid`.
fn proc_state(pid: u32) -> (String, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("process {pid} is gone: {e}"));
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    (field("State:"), field("TracerPid:").parse().unwrap_or(0))
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

/// Applies `patches` to every process of the running server under client load,
/// unpatches it, and checks the replies of each phase, that no request failed and
/// that the processes are alive and not traced. Returns a one-line summary.
fn patch_under_load(p: &Prog, server: &mut Server, port: u16, patches: &Path) -> String {
    let pids = server_pids(&server.0);
    let up = Instant::now();
    let load = Load::start(port, p.ask);
    load.wait_sent(200);
    let patch = Instant::now();
    for pid in &pids {
        ok_in(
            Path::new("/"),
            Command::new(livecare())
                .args(["patch", "-p", &pid.to_string()])
                .arg(patches),
            &format!("livecare patch -p {pid} ({})", p.pkg),
        );
    }
    let patched = Instant::now();
    load.wait_sent(500);
    let unpatch = Instant::now();
    for pid in &pids {
        ok_in(
            Path::new("/"),
            Command::new(livecare()).args(["unpatch", "-p", &pid.to_string()]),
            &format!("livecare unpatch -p {pid} ({})", p.pkg),
        );
    }
    let unpatched = Instant::now();
    load.wait_sent(500);
    let end = Instant::now();
    let log = load.finish();
    assert!(server.0.is_alive(), "{} died", p.pkg);
    for pid in &pids {
        let (state, tracer) = proc_state(*pid);
        assert_eq!(tracer, 0, "{} process {pid} left traced ({state})", p.pkg);
    }
    let ph = Phases {
        up,
        patch,
        patched,
        unpatch,
        unpatched,
        end,
    };
    assert_phases(p.pkg, &log, &ph);
    format!(
        "{} requests, 0 failed, patch {:?}, unpatch {:?} ({} process(es))",
        log.len(),
        patched - patch,
        unpatched - unpatch,
        pids.len()
    )
}

/// CPU time (user + system) of every child process waited for so far: the build
/// figures, less noisy than wall time on a shared machine.
fn children_cpu() -> Duration {
    // SAFETY: getrusage writes one rusage to the valid pointer it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Size and modification time of a file, to prove a build left it alone.
fn stamp(path: &Path) -> (u64, SystemTime) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.len(), m.modified().unwrap())
}

/// The whole case for one program: stock build of tree A, the server started from A,
/// `livecare build FIX.diff` in A, patch/unpatch under load; then the deployed-binary
/// route from a pristine copy B.
fn server_case(p: &Prog) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let begun = Instant::now();
    let Some(src) = debian_source(p.pkg, p.orig) else {
        return;
    };
    let diff = testkit::fixture_dir(&format!("project-{}", p.pkg)).join("fix.diff");

    // The deployed build: the stock configure and make, as the README says.
    let t = Instant::now();
    let cpu = children_cpu();
    let a = configured_copy(p, &src);
    let configured = t.elapsed();
    ok_in(
        a.path(),
        Command::new("nice").args(["-n", "10", "make", "-j2"]),
        &format!("{} make", p.pkg),
    );
    let plain = t.elapsed();
    let plain_cpu = children_cpu() - cpu;
    let exe = a.join(p.binary);
    let deployed_id = build_id_of(&exe).unwrap();
    let exe_stamp = stamp(&exe);

    let run = Scratch::new().unwrap();
    let (mut server, port) = start_server(p, a.path(), run.path());

    // Route 1: in the built tree, no flags at all.
    let t = Instant::now();
    let cpu = children_cpu();
    let text = ok_in(
        a.path(),
        nice_livecare().arg("build").arg(&diff),
        &format!("livecare build FIX.diff in the built {} tree", p.pkg),
    );
    let patch_build = t.elapsed();
    let patch_cpu = children_cpu() - cpu;
    let out = a.join("patches");
    assert_eq!(kpatch_names(&out), [deployed_id.as_str()], "{text}");
    let kpatch = out.join(format!("{deployed_id}.kpatch"));
    let size = std::fs::metadata(&kpatch).unwrap().len();
    assert_eq!(
        stamp(&exe),
        exe_stamp,
        "the build changed the operator's {}",
        p.binary
    );
    assert_eq!(build_id_of(&exe).unwrap(), deployed_id);
    let (_, dry) = run_in(
        a.path(),
        Command::new("patch")
            .args(["-p1", "--dry-run", "-s", "-i"])
            .arg(&diff),
        "patch --dry-run",
    );
    assert!(
        dry.status.success(),
        "the fix no longer applies to the tree: the build left it changed"
    );
    let live1 = patch_under_load(p, &mut server, port, &out);

    if !deployed_route_wanted(p.pkg) {
        testkit::skip_banner(&format!(
            "LIVECARE_SERVERS_DEPLOYED=all for the {} deployed-binary route (a second full \
             build, left out of CI: redis's build stamp, written anew by mkreleasehdr.sh in \
             a fresh copy, makes it end in a message naming the stamp, not in a patch)",
            p.pkg
        ));
        assert!(server.0.is_alive(), "{} died", p.pkg);
        eprintln!(
            "\n==== {}: plain build {plain:?} (configure {configured:?}, CPU {plain_cpu:?}); \
             patch build in the built tree {patch_build:?} (CPU {patch_cpu:?}), {size} bytes; \
             {live1}\n==== {} test total {:?} ====\n",
            p.pkg,
            p.pkg,
            begun.elapsed()
        );
        return;
    }

    // Route 2: the deployed binary, the source at another path (configured there, as
    // an operator would). livecare reads where the deployed binary was built and
    // builds B as if it were there (B mounted at A's path, privately); the original
    // build must then reproduce the deployed build-id.
    let b = configured_copy(p, &src);
    let t = Instant::now();
    let (text, res) = run_in(
        b.path(),
        nice_livecare()
            .args(["build", "-C"])
            .arg(b.path())
            .arg("--target")
            .arg(&exe)
            .arg(&diff),
        &format!("livecare build -C B --target A/{}", p.binary),
    );
    let deployed_build = t.elapsed();
    let route2 = if res.status.success() {
        let out = b.join("patches");
        assert_eq!(kpatch_names(&out), [deployed_id.as_str()], "{text}");
        let live2 = patch_under_load(p, &mut server, port, &out);
        format!("patch for the deployed build-id in {deployed_build:?}; {live2}")
    } else {
        // Then it must name what differs: early when the deployed binary itself says
        // why it cannot be reproduced (its paths), else after the original stage, with
        // the difference it found (redis: the build stamp its build generates anew).
        let names_difference = text.contains(&format!("deployed {} has build-id", exe.display()))
            && text.contains("Differences: ")
            && !text.contains("Differences: none");
        let names_path = deployed_build < EARLY
            && (text.contains(&a.path().to_string_lossy().to_string())
                || text.contains(&b.path().to_string_lossy().to_string()));
        assert!(
            names_difference || names_path,
            "the deployed-binary route failed after {deployed_build:?} without naming \
             the difference:\n{text}"
        );
        assert_eq!(build_id_of(&exe).unwrap(), deployed_id);
        format!(
            "refused in {deployed_build:?}: {}",
            text.trim().replace('\n', " | ")
        )
    };
    assert!(server.0.is_alive(), "{} died", p.pkg);
    eprintln!(
        "\n==== {}: plain build {plain:?} (configure {configured:?}, CPU {plain_cpu:?}); patch \
         build in the built tree {patch_build:?} (CPU {patch_cpu:?}), {size} bytes; {live1}\n\
         ==== {} deployed route: {route2}\n==== {} test total {:?} ====\n",
        p.pkg,
        p.pkg,
        p.pkg,
        begun.elapsed()
    );
}

/// Reads one HTTP/1.1 response; returns (status line, headers, body) and marks the
/// connection closing when the server says so.
fn http_response(c: &mut Conn) -> Result<(String, Vec<String>, Vec<u8>), String> {
    let mut status = String::new();
    c.r.read_line(&mut status)
        .map_err(|e| format!("status line: {e}"))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if c.r.read_line(&mut h).map_err(|e| format!("header: {e}"))? == 0 {
            return Err(format!("connection closed in the headers after {status:?}"));
        }
        let h = h.trim_end().to_string();
        if h.is_empty() {
            break;
        }
        headers.push(h);
    }
    let header = |k: &str| {
        headers.iter().find_map(|h| {
            let (name, v) = h.split_once(':')?;
            name.eq_ignore_ascii_case(k).then(|| v.trim().to_string())
        })
    };
    let len: usize = header("Content-Length")
        .ok_or_else(|| format!("no Content-Length: {headers:?}"))?
        .parse()
        .map_err(|e| format!("Content-Length: {e}"))?;
    let mut body = vec![0; len];
    c.r.read_exact(&mut body)
        .map_err(|e| format!("body: {e}"))?;
    if header("Connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
        c.closing = true;
    }
    Ok((status.trim_end().to_string(), headers, body))
}

/// `GET /` for the web servers: 200 with body `hello`, and the fix's header
/// `X-Livecare: fixed` only when patched.
fn http_ask(c: &mut Conn) -> Result<Reply, String> {
    c.w.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let (status, headers, body) = http_response(c)?;
    if status != "HTTP/1.1 200 OK" || body != b"hello\n" {
        return Err(format!("unexpected reply {status:?} {headers:?} {body:?}"));
    }
    let fixed = headers
        .iter()
        .filter(|h| h.to_ascii_lowercase().starts_with("x-livecare:"))
        .collect::<Vec<_>>();
    match fixed.as_slice() {
        [] => Ok(Reply::Original),
        [h] if *h == "X-Livecare: fixed" => Ok(Reply::Patched),
        _ => Err(format!("unexpected headers {headers:?}")),
    }
}

/// `INFO server` for redis: the fix adds a line `livecare:fixed`.
fn redis_ask(c: &mut Conn) -> Result<Reply, String> {
    c.w.write_all(b"INFO server\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut head = String::new();
    c.r.read_line(&mut head)
        .map_err(|e| format!("reply: {e}"))?;
    let len: usize = head
        .trim_end()
        .strip_prefix('$')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("unexpected reply {head:?}"))?;
    let mut body = vec![0; len + 2];
    c.r.read_exact(&mut body)
        .map_err(|e| format!("body: {e}"))?;
    let text = String::from_utf8_lossy(&body);
    if !text.contains("\r\nredis_version:7.") || !text.ends_with("\r\n") {
        return Err(format!("unexpected INFO {text:?}"));
    }
    Ok(
        match text.lines().filter(|l| *l == "livecare:fixed").count() {
            0 => Reply::Original,
            1 => Reply::Patched,
            _ => return Err(format!("livecare:fixed twice: {text:?}")),
        },
    )
}

fn memcached_ask(c: &mut Conn) -> Result<Reply, String> {
    c.w.write_all(b"version\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    c.r.read_line(&mut line)
        .map_err(|e| format!("reply: {e}"))?;
    match line.trim_end() {
        l if l.starts_with("VERSION 1.") && l.ends_with("-livecare-fixed") => Ok(Reply::Patched),
        l if l.starts_with("VERSION 1.") && !l.contains("livecare") => Ok(Reply::Original),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

fn start_memcached(tree: &Path, _dir: &Path, port: u16) -> Running {
    let port = port.to_string();
    Running::start(
        &tree.join("memcached"),
        &[
            "-p",
            &port,
            "-U",
            "0",
            "-l",
            "127.0.0.1",
            "-t",
            "4",
            "-m",
            "16",
            "-u",
            "root",
        ],
    )
    .unwrap()
}

fn start_redis(tree: &Path, _dir: &Path, port: u16) -> Running {
    let port = port.to_string();
    Running::start(
        &tree.join("src/redis-server"),
        &[
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    )
    .unwrap()
}

fn start_nginx(tree: &Path, dir: &Path, port: u16) -> Running {
    // A master and one worker, in the foreground; the reply needs no files.
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\n\
         error_log {dir}/error.log;\npid {dir}/nginx.pid;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  server {{\n    listen 127.0.0.1:{port};\n    \
         location / {{ return 200 \"hello\\n\"; }}\n  }}\n}}\n",
        dir = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    // nginx opens <prefix>/logs/error.log before it reads the configuration.
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let prefix = format!("{}/", dir.display());
    let conf = dir.join("nginx.conf");
    let server = Running::start(
        &tree.join("objs/nginx"),
        &["-p", &prefix, "-c", &conf.to_string_lossy()],
    )
    .unwrap();
    // The worker serves the requests; it must exist before its pid is read.
    let t = Instant::now();
    while children(server.pid()).is_empty() && t.elapsed() < WAIT {
        thread::sleep(Duration::from_millis(20));
    }
    server
}

fn start_lighttpd(tree: &Path, dir: &Path, port: u16) -> Running {
    std::fs::create_dir_all(dir.join("htdocs")).unwrap();
    std::fs::write(dir.join("htdocs/index.html"), "hello\n").unwrap();
    let conf = format!(
        "server.document-root = \"{dir}/htdocs\"\nserver.bind = \"127.0.0.1\"\n\
         server.port = {port}\nserver.errorlog = \"{dir}/error.log\"\n\
         index-file.names = ( \"index.html\" )\n",
        dir = dir.display()
    );
    std::fs::write(dir.join("lighttpd.conf"), conf).unwrap();
    Running::start(
        &tree.join("src/lighttpd"),
        &[
            "-D",
            "-f",
            &dir.join("lighttpd.conf").to_string_lossy(),
            "-m",
            &tree.join("src/.libs").to_string_lossy(),
        ],
    )
    .unwrap()
}

/// redis 7.0 from the upstream tarball Debian ships (Debian's patches switch it to
/// the system's jemalloc, lua and hiredis): stock `make`, bundled jemalloc.
#[test]
fn redis_stock_build_is_patched_live_from_its_tree_and_as_deployed_binary() {
    server_case(&Prog {
        pkg: "redis",
        orig: true,
        configure: None,
        binary: "src/redis-server",
        start: start_redis,
        ask: redis_ask,
    });
}

/// nginx as Debian ships it: `./configure && make`, a master and a worker.
#[test]
fn nginx_stock_build_is_patched_live_from_its_tree_and_as_deployed_binary() {
    server_case(&Prog {
        pkg: "nginx",
        orig: false,
        configure: Some(&["./configure"]),
        binary: "objs/nginx",
        start: start_nginx,
        ask: http_ask,
    });
}

/// lighttpd as Debian ships it: `./configure -C && make` (its INSTALL), modules as
/// shared objects, the fix in the server binary.
#[test]
fn lighttpd_stock_build_is_patched_live_from_its_tree_and_as_deployed_binary() {
    server_case(&Prog {
        pkg: "lighttpd",
        orig: false,
        configure: Some(&["./configure", "-C"]),
        binary: "src/lighttpd",
        start: start_lighttpd,
        ask: http_ask,
    });
}

/// memcached as Debian ships it: `./configure && make`, whose default target also
/// builds the gcov-instrumented memcached-debug; the fix in the daemon.
#[test]
fn memcached_stock_build_is_patched_live_from_its_tree_and_as_deployed_binary() {
    server_case(&Prog {
        pkg: "memcached",
        orig: false,
        configure: Some(&["./configure"]),
        binary: "memcached",
        start: start_memcached,
        ask: memcached_ask,
    });
}
