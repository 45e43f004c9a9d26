//! Whom a patch file trusts: a patch runs its code in every process it is applied to,
//! so whoever can write the file, or replace it through one of its directories, can
//! run code as the target's user (root's `-p all`: every user's). Like ssh's
//! `StrictModes`, a patch path is refused when the file, or any directory on the way
//! to it, is writable by group or others or is owned by someone other than root or
//! the user running livecare. A sticky directory owned by root or that user (`/tmp`)
//! is accepted as a directory on the way: others may add files there, but cannot
//! replace or rename ours.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::Error;

/// Refuses `path` (a patch file or directory) when someone other than its owner, root
/// or us could have written it or could replace it; see the module doc. Checks the
/// path as given and, when it goes through symbolic links, the path they lead to.
pub fn check_trusted(path: &Path) -> Result<(), Error> {
    // SAFETY: geteuid has no failure mode and touches no memory.
    let me = unsafe { libc::geteuid() };
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::Io {
                path: path.to_path_buf(),
                err: e,
            })?
            .join(path)
    };
    check_chain(path, &abs, me)?;
    if let Ok(real) = abs.canonicalize() {
        if real != abs {
            check_chain(path, &real, me)?;
        }
    }
    Ok(())
}

/// Checks `abs` itself and every directory above it up to `/`.
fn check_chain(given: &Path, abs: &Path, me: u32) -> Result<(), Error> {
    let mut first = true;
    let mut at: Option<&Path> = Some(abs);
    while let Some(p) = at {
        // `stat`, not `lstat`: a symbolic link's own mode means nothing, and the
        // directory holding it is checked as the next step up.
        let meta = std::fs::metadata(p).map_err(|e| Error::Io {
            path: p.to_path_buf(),
            err: e,
        })?;
        if first && !meta.is_file() && !meta.is_dir() {
            // A FIFO or a device is no patch at all: loading says so.
            return Ok(());
        }
        if let Some(why) = untrusted(&meta, me, !first) {
            return Err(refusal(given, p, first, &meta, &why));
        }
        first = false;
        at = p.parent();
    }
    Ok(())
}

/// Why `meta` is not trusted, or `None`. `on_the_way`: a directory above the patch,
/// where a sticky bit keeps others from replacing what is not theirs.
fn untrusted(meta: &std::fs::Metadata, me: u32, on_the_way: bool) -> Option<String> {
    let owner = meta.uid();
    let mode = meta.mode();
    if owner != 0 && owner != me {
        return Some(format!("it is owned by {}", user_name(owner)));
    }
    let sticky = mode & libc::S_ISVTX != 0;
    if on_the_way && meta.is_dir() && sticky {
        return None;
    }
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (_, true) => Some("it is writable by every user".into()),
        (true, false) => Some(format!(
            "it is writable by group {}",
            group_name(meta.gid())
        )),
        (false, false) => None,
    }
}

fn refusal(given: &Path, at: &Path, is_self: bool, meta: &std::fs::Metadata, why: &str) -> Error {
    let what = if is_self {
        format!(
            "refused: {why} (mode {:04o}, owner {}), so others could have put code in it",
            meta.mode() & 0o7777,
            user_name(meta.uid())
        )
    } else {
        format!(
            "refused: its directory {} is not safe: {why} (mode {:04o}, owner {}), so others could replace the patch",
            at.display(),
            meta.mode() & 0o7777,
            user_name(meta.uid())
        )
    };
    Error::BadPatch {
        path: PathBuf::from(given),
        what: format!(
            "{what}. A patch runs its code inside the processes it patches: make it and \
             every directory above it writable only by their owner, and owned by root or \
             you (chmod go-w; chown), or pass --allow-insecure-perms if you trust every \
             user who can write them"
        ),
    }
}

/// `name (uid N)` from /etc/passwd, or `uid N`.
fn user_name(uid: u32) -> String {
    id_name("/etc/passwd", uid).map_or_else(|| format!("uid {uid}"), |n| format!("{n} (uid {uid})"))
}

/// `name (gid N)` from /etc/group, or `gid N`.
fn group_name(gid: u32) -> String {
    id_name("/etc/group", gid).map_or_else(|| format!("gid {gid}"), |n| format!("{n} (gid {gid})"))
}

/// The name of numeric id `id` in a passwd-style file (name:x:id:…).
fn id_name(file: &str, id: u32) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _ = f.next()?;
        (f.next()?.parse::<u32>().ok()? == id).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn writable_files_and_directories_are_refused_and_sticky_tmp_is_not() {
        let s = testkit::Scratch::new().unwrap();
        let dir = s.join("d");
        std::fs::create_dir(&dir).unwrap();
        let f = s.write("d/x.kpatch", b"x").unwrap();
        chmod(&dir, 0o755);
        chmod(&f, 0o644);
        check_trusted(&f).unwrap();
        check_trusted(&dir).unwrap();
        chmod(&f, 0o666);
        let e = check_trusted(&f).unwrap_err().to_string();
        assert!(e.contains("writable by every user"), "{e}");
        chmod(&f, 0o664);
        let e = check_trusted(&f).unwrap_err().to_string();
        assert!(e.contains("writable by group"), "{e}");
        chmod(&f, 0o644);
        chmod(&dir, 0o775);
        let e = check_trusted(&f).unwrap_err().to_string();
        assert!(e.contains("its directory") && e.contains("/d"), "{e}");
        // Sticky (like /tmp): others cannot replace our file in it.
        chmod(&dir, 0o1777);
        check_trusted(&f).unwrap();
        // ... but a sticky patch directory itself is still writable by all.
        let e = check_trusted(&dir).unwrap_err().to_string();
        assert!(e.contains("writable by every user"), "{e}");
        chmod(&dir, 0o755);
        // Owned by another user (not root, not us): refused even if not writable.
        // SAFETY: geteuid has no failure mode and touches no memory.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&f, Some(65534), None).unwrap();
            let e = check_trusted(&f).unwrap_err().to_string();
            assert!(e.contains("owned by") && e.contains("65534"), "{e}");
            std::os::unix::fs::chown(&f, Some(0), None).unwrap();
        }
        // Through a symbolic link, the file it leads to is checked too.
        let link = s.join("link.kpatch");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        check_trusted(&link).unwrap();
        chmod(&f, 0o646);
        assert!(check_trusted(&link).is_err());
    }
}
