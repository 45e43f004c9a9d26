//! `/proc/PID/maps` and `/proc/PID/auxv`.

use crate::{Error, Pid};

/// auxv key of the program entry point.
pub const AT_ENTRY: u64 = 9;
/// auxv key of the program headers' address.
pub const AT_PHDR: u64 = 3;

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
    /// Offset in the file.
    pub offset: u64,
    /// Device, as printed.
    pub dev: String,
    /// Inode (0 for anonymous).
    pub inode: u64,
    /// Path or pseudo-name (`[heap]`, `[vdso]`), empty for anonymous mappings.
    pub path: String,
}

impl MapEntry {
    /// True for a mapping backed by a regular file.
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }

    /// True for an anonymous mapping without a name.
    pub fn is_anonymous(&self) -> bool {
        self.inode == 0 && self.path.is_empty()
    }
}

/// Parses one line of `/proc/PID/maps` (`start-end perms offset dev inode   path`).
/// Byte by byte: `-p all` parses every line of every process's maps, and the generic
/// `splitn` + `from_str_radix` took a quarter of its instructions.
fn parse_line(line: &str) -> Option<MapEntry> {
    let b = line.as_bytes();
    let mut pos = 0usize;
    // The next space-separated field, as `splitn(6, ' ')` yields them.
    let mut field = || -> Option<&str> {
        if pos > b.len() {
            return None;
        }
        let start = pos;
        let end = b[start..]
            .iter()
            .position(|&c| c == b' ')
            .map_or(b.len(), |i| start + i);
        pos = end + 1;
        // Spaces are ASCII: both ends are character boundaries.
        line.get(start..end)
    };
    let range = field()?;
    let perms = field()?.as_bytes();
    let offset = hex(field()?)?;
    let dev = field()?.to_string();
    let inode = field()?.parse().ok()?;
    let path = line.get(pos..).unwrap_or("").trim_start().to_string();
    let (lo, hi) = range.split_once('-')?;
    if perms.len() < 4 {
        return None;
    }
    Some(MapEntry {
        start: hex(lo)?,
        end: hex(hi)?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        offset,
        dev,
        inode,
        path,
    })
}

/// A hexadecimal number without prefix; `None` when empty, malformed or too large.
fn hex(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for c in s.bytes() {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        v = v.checked_mul(16)?.checked_add(u64::from(d))?;
    }
    Some(v)
}

/// Reads a whole /proc file with plain `read`s into a buffer of `cap` bytes (grown if
/// needed). `read_to_end`/`read_to_string` first `statx` and `lseek` the file for a
/// size hint (0 in /proc) and then read in 8 KiB steps: three to four extra syscalls
/// per file, and `-p all` reads several per process.
pub fn read_proc_file(path: &str, cap: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    // One zeroed buffer per thread, reused: zeroing 64 KiB per read of a 2 KiB maps
    // file was a quarter of `-p all`'s instructions.
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut f = std::fs::File::open(path)?;
    BUF.with(|b| {
        let mut buf = b.borrow_mut();
        if buf.len() < cap.max(64) {
            buf.resize(cap.max(64), 0);
        }
        let mut len = 0;
        loop {
            if len == buf.len() {
                let grown = buf.len() * 2;
                buf.resize(grown, 0);
            }
            match f.read(&mut buf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(buf[..len].to_vec())
    })
}

/// Parses `/proc/PID/maps`.
pub fn read_maps(pid: Pid) -> Result<Vec<MapEntry>, Error> {
    let read = |path: &str| -> std::io::Result<String> {
        let buf = read_proc_file(path, 64 * 1024)?;
        String::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    };
    // A live process always maps something: empty maps are a zombie main thread's.
    let (text, path) = pid.read_proc("maps", read, |t| matches!(t, Ok(t) if t.is_empty()))?;
    text.lines()
        .map(|l| {
            parse_line(l).ok_or_else(|| Error::Parse {
                path: path.clone(),
                what: format!("bad line {l:?}"),
            })
        })
        .collect()
}

/// Parses `/proc/PID/auxv` into (key, value) pairs.
pub fn auxv(pid: Pid) -> Result<Vec<(u64, u64)>, Error> {
    let (data, _) = pid.read_proc("auxv", |p| std::fs::read(p), crate::refused)?;
    let mut out = Vec::new();
    for c in data.chunks_exact(16) {
        let k = u64::from_le_bytes(c[..8].try_into().unwrap_or_default());
        let v = u64::from_le_bytes(c[8..].try_into().unwrap_or_default());
        if k == 0 {
            break;
        }
        out.push((k, v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parser before it was made byte-wise, kept as the reference.
    fn parse_line_reference(line: &str) -> Option<MapEntry> {
        let mut it = line.splitn(6, ' ');
        let range = it.next()?;
        let perms = it.next()?.as_bytes();
        let offset = u64::from_str_radix(it.next()?, 16).ok()?;
        let dev = it.next()?.to_string();
        let inode = it.next()?.parse().ok()?;
        let path = it.next().unwrap_or("").trim_start().to_string();
        let (lo, hi) = range.split_once('-')?;
        if perms.len() < 4 {
            return None;
        }
        Some(MapEntry {
            start: u64::from_str_radix(lo, 16).ok()?,
            end: u64::from_str_radix(hi, 16).ok()?,
            read: perms[0] == b'r',
            write: perms[1] == b'w',
            exec: perms[2] == b'x',
            offset,
            dev,
            inode,
            path,
        })
    }

    #[test]
    fn byte_parser_agrees_with_the_reference_on_live_and_odd_lines() {
        let mut lines: Vec<String> = Vec::new();
        for pid in Pid::all() {
            if let Ok(t) = std::fs::read_to_string(format!("/proc/{}/maps", pid.0)) {
                lines.extend(t.lines().map(str::to_string));
            }
        }
        assert!(lines.len() > 20);
        for odd in [
            "1000-2000 rw-p 00000000 00:00 0",
            "1000-2000 rw-p 00000000 00:00 0 ",
            "1000-2000 r-xp 00001000 08:01 42      /a path/with spaces (deleted)",
            "1000-2000 r-xp 0000100g 08:01 42 /x",
            "1000+2000 r-xp 00001000 08:01 42 /x",
            "1000-2000 r-x 00001000 08:01 42 /x",
            "1000-2000 r-xp 00001000 08:01 x42 /x",
            "ffffffffffffffffff-1 r-xp 0 08:01 1 /x",
            "-2000 r-xp 0 08:01 1 /x",
            "1000-2000 r-xp",
            "",
            "1000-2000  r-xp 0 08:01 1 /x",
            "1000-2000 r-xp 0 08:01 1 /é",
        ] {
            lines.push(odd.to_string());
        }
        for l in &lines {
            assert_eq!(parse_line(l), parse_line_reference(l), "{l:?}");
        }
    }

    #[test]
    fn parses_maps_lines_with_and_without_path() {
        let e = parse_line("7f00-7f10 r-xp 00001000 08:01 1234    /usr/lib/libc.so.6").unwrap();
        assert_eq!(
            (e.start, e.end, e.offset, e.inode),
            (0x7f00, 0x7f10, 0x1000, 1234)
        );
        assert!(e.read && e.exec && !e.write && e.is_file());
        assert_eq!(e.path, "/usr/lib/libc.so.6");
        let a = parse_line("1000-2000 rw-p 00000000 00:00 0 ").unwrap();
        assert!(a.is_anonymous());
        let own = read_maps(Pid(std::process::id() as i32)).unwrap();
        assert!(own.iter().any(|m| m.path == "[stack]"));
        assert!(auxv(Pid(std::process::id() as i32))
            .unwrap()
            .iter()
            .any(|(k, _)| *k == AT_ENTRY));
    }
}
