//! `libcare-client [/SOCKET] CMD [ARG...]`: sends one request to a `server` and copies
//! its reply to stdout (LibCare's client: the socket is taken only when the first
//! argument starts with `/`; the exit status is 0 once the request was sent).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

/// LibCare's default socket.
pub const DEFAULT_SOCKET: &str = "/var/run/libcare.sock";

/// Runs the client on `args` (without the program name); `name` is for the usage line.
pub fn run(name: &str, args: Vec<OsString>) -> anyhow::Result<ExitCode> {
    let starts_with_slash = |a: &OsString| a.as_bytes().first() == Some(&b'/');
    if args.is_empty() || (starts_with_slash(&args[0]) && args.len() < 2) {
        println!("{name}: [/SOCKET] ARG0 [ARG1] [ARG2]");
        return Ok(ExitCode::from(super::EXIT_ERROR));
    }
    let (socket, rest) = if starts_with_slash(&args[0]) {
        (std::path::PathBuf::from(&args[0]), &args[1..])
    } else {
        (std::path::PathBuf::from(DEFAULT_SOCKET), &args[..])
    };
    let mut conn = match UnixStream::connect(&socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "connect: {e} ({}: is `libcare-ctl server {}` running?)",
                socket.display(),
                socket.display()
            );
            return Ok(ExitCode::from(super::EXIT_ERROR));
        }
    };
    let mut msg = Vec::new();
    for a in rest {
        msg.extend_from_slice(a.as_bytes());
        msg.push(0);
    }
    msg.push(0);
    if let Err(e) = conn.write_all(&msg) {
        eprintln!("send: {e}");
        return Ok(ExitCode::from(super::EXIT_ERROR));
    }
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let _ = out.write_all(&buf[..n]);
                let _ = out.flush();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("recv: {e}");
                return Ok(ExitCode::from(super::EXIT_ERROR));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
