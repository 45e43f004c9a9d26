//! A private, writable view of the operator's tree for the build stages.
//!
//! Every command of a stage (clean, original build, `patch`, patched build) runs in its
//! own private mount namespace where an overlayfs, whose lower layer is the tree, is
//! mounted at the tree's own path. The compiler sees exactly the paths a plain build
//! sees (so debug info and build-ids match), every write lands in the upper layer in
//! livecare's work directory, and the tree itself, its binaries and its timestamps are
//! never changed: a `make clean` deletes nothing real, and a build killed at any point
//! leaves the tree as it was.
//!
//! As root the namespace is a plain mount namespace. Other users get one inside a
//! user namespace that maps only their own uid and gid (so the build runs as them),
//! where the kernel (5.11+) allows unprivileged overlay mounts.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The overlay of one tree: where its writes go.
#[derive(Debug, Clone)]
pub struct PrivateTree {
    /// Whether the mounts need a user namespace of their own (not root).
    userns: bool,
    /// Where the overlay is mounted: the tree's own path, or the path a deployed
    /// binary was built at (`mount_at`).
    tree: PathBuf,
    /// The tree (lower layer).
    lower: PathBuf,
    /// The directory holding `upper`, `work` and the bind holders.
    root: PathBuf,
    /// Directories inside the tree whose writes must reach the real tree
    /// (`libcare-patch-make`'s `lpmake/`), each with its holding mount point.
    binds: Vec<(PathBuf, PathBuf)>,
}

fn cstr(p: &Path) -> CString {
    // Paths never hold NUL bytes; an empty string fails the syscall cleanly instead.
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// What the child runs before `exec`: set up the namespace and mounts.
struct Mounts {
    tree: CString,
    data: CString,
    binds: Vec<(CString, CString)>,
    overlay: bool,
    /// `/proc/self/uid_map` and `gid_map` contents for a user namespace.
    userns: Option<(Vec<u8>, Vec<u8>)>,
}

/// Writes `data` to the file `path` with raw syscalls (no allocation).
fn write_proc(path: &std::ffi::CStr, data: &[u8]) -> std::io::Result<()> {
    // SAFETY: open takes a NUL-terminated path; the flags need no mode argument.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(last_error());
    }
    // SAFETY: writes `data.len()` bytes from a live slice to the descriptor just opened.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    let err = last_error();
    // SAFETY: closes the descriptor opened above, once.
    unsafe { libc::close(fd) };
    if n != data.len() as isize {
        return Err(err);
    }
    Ok(())
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

impl Mounts {
    /// Runs in the forked child, before exec: only raw syscalls, no allocation (the
    /// parent may have other threads holding the allocator's lock at the fork).
    fn enter(&self) -> std::io::Result<()> {
        // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and touches no
        // memory; the build must not outlive a livecare that was killed.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
        let flags = match self.userns {
            Some(_) => libc::CLONE_NEWUSER | libc::CLONE_NEWNS,
            None => libc::CLONE_NEWNS,
        };
        // SAFETY: unshare takes flags only; the child is single-threaded after fork.
        if unsafe { libc::unshare(flags) } != 0 {
            return Err(last_error());
        }
        if let Some((uid_map, gid_map)) = &self.userns {
            // The kernel wants setgroups denied before an unprivileged gid_map.
            write_proc(c"/proc/self/setgroups", b"deny")?;
            write_proc(c"/proc/self/uid_map", uid_map)?;
            write_proc(c"/proc/self/gid_map", gid_map)?;
        }
        let none = std::ptr::null();
        // SAFETY: all pointers are NUL-terminated strings that live in `self` or are
        // null where mount(2) allows it; keeps our mounts from propagating to the host.
        if unsafe {
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        } != 0
        {
            return Err(last_error());
        }
        if !self.overlay {
            return Ok(());
        }
        for (real, hold) in &self.binds {
            // SAFETY: as above; keeps a handle on the real directory before the
            // overlay hides it.
            if unsafe {
                libc::mount(
                    real.as_ptr(),
                    hold.as_ptr(),
                    none,
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                )
            } != 0
            {
                return Err(last_error());
            }
        }
        // SAFETY: as above; the option string is the overlay's lower/upper/work dirs.
        if unsafe {
            libc::mount(
                c"overlay".as_ptr(),
                self.tree.as_ptr(),
                c"overlay".as_ptr(),
                0,
                self.data.as_ptr().cast(),
            )
        } != 0
        {
            return Err(last_error());
        }
        for (real, hold) in &self.binds {
            // SAFETY: as above; puts the real directory back over its overlay view.
            if unsafe {
                libc::mount(
                    hold.as_ptr(),
                    real.as_ptr(),
                    none,
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                )
            } != 0
            {
                return Err(last_error());
            }
        }
        // std changed directory before this hook ran, into the tree under the overlay:
        // enter the overlay's view of it.
        // SAFETY: chdir takes a NUL-terminated path that lives in `self`.
        if unsafe { libc::chdir(self.tree.as_ptr()) } != 0 {
            return Err(last_error());
        }
        Ok(())
    }
}

impl PrivateTree {
    /// The overlay of `tree` with its layers in `root`; `binds` are directories inside
    /// the tree that the build writes through to the real tree.
    pub fn new(tree: &Path, root: &Path, binds: &[PathBuf]) -> PrivateTree {
        PrivateTree {
            userns: false,
            tree: tree.to_path_buf(),
            lower: tree.to_path_buf(),
            root: root.to_path_buf(),
            binds: binds
                .iter()
                .enumerate()
                .map(|(i, b)| (b.clone(), root.join("hold").join(i.to_string())))
                .collect(),
        }
    }

    /// Mounts the view of the tree at `at` instead of the tree's own path (inside the
    /// private namespace only: the host's `at` is never changed), so the compiler sees
    /// the paths a build at `at` saw. Checks that this works here.
    pub fn mount_at(&mut self, at: &Path) -> Result<(), String> {
        let old = std::mem::replace(&mut self.tree, at.to_path_buf());
        self.probe().inspect_err(|_| self.tree = old)
    }

    /// Where the build sees the tree (the mount point).
    pub fn view(&self) -> &Path {
        &self.tree
    }

    /// The upper layer: every file the build wrote or changed.
    pub fn upper(&self) -> PathBuf {
        self.root.join("upper")
    }

    fn work(&self) -> PathBuf {
        self.root.join("work")
    }

    /// Creates the layer directories (keeping what they hold).
    pub fn create(&self) -> std::io::Result<()> {
        for d in [self.upper(), self.work()] {
            std::fs::create_dir_all(d)?;
        }
        for (real, hold) in &self.binds {
            std::fs::create_dir_all(real)?;
            std::fs::create_dir_all(hold)?;
        }
        Ok(())
    }

    /// Drops every change the build made (a fresh overlay). A build process left over
    /// from a killed run may still write into the old layers: they are moved aside
    /// first, so it cannot disturb the new ones.
    pub fn reset(&self) -> std::io::Result<()> {
        if self.root.exists() {
            let aside = self
                .root
                .with_file_name(format!("tree.old-{}", std::process::id()));
            remove_layers(&aside);
            std::fs::rename(&self.root, &aside)?;
            remove_layers(&aside);
        }
        // Leftovers of earlier runs whose removal raced with such a process.
        if let Some(parent) = self.root.parent() {
            if let Ok(dir) = std::fs::read_dir(parent) {
                for e in dir.flatten() {
                    if e.file_name().to_string_lossy().starts_with("tree.old-") {
                        remove_layers(&e.path());
                    }
                }
            }
        }
        self.create()
    }

    /// Removes the layers.
    pub fn remove(&self) {
        remove_layers(&self.root);
    }

    fn mounts(&self, overlay: bool) -> Result<Mounts, String> {
        let mut data = Vec::new();
        for (key, p) in [
            ("lowerdir=", self.lower.clone()),
            (",upperdir=", self.upper()),
            (",workdir=", self.work()),
        ] {
            data.extend(key.as_bytes());
            // The option string separates options with `,` and lower layers with `:`;
            // overlayfs takes both (and `\`) escaped with a backslash.
            for &b in p.as_os_str().as_bytes() {
                if b",:\\".contains(&b) {
                    data.push(b'\\');
                }
                data.push(b);
            }
        }
        // In a user namespace overlayfs keeps its metadata in user.* xattrs.
        if self.userns {
            data.extend(b",userxattr");
        }
        let userns = self.userns.then(|| {
            // SAFETY: geteuid/getegid have no preconditions and cannot fail.
            let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
            (
                format!("{uid} {uid} 1\n").into_bytes(),
                format!("{gid} {gid} 1\n").into_bytes(),
            )
        });
        Ok(Mounts {
            userns,
            tree: cstr(&self.tree),
            data: CString::new(data).map_err(|e| e.to_string())?,
            binds: self.binds.iter().map(|(r, h)| (cstr(r), cstr(h))).collect(),
            overlay,
        })
    }

    /// Makes `cmd` run in the private view of the tree.
    pub fn enter(&self, cmd: &mut Command) -> Result<(), String> {
        let mounts = self.mounts(true)?;
        // SAFETY: the hook only makes raw syscalls on memory it owns (see Mounts::enter).
        unsafe { cmd.pre_exec(move || mounts.enter()) };
        Ok(())
    }

    /// Whether the private view works here; the reason when not. Creates the layers
    /// and chooses a user namespace when not root.
    pub fn probe(&mut self) -> Result<(), String> {
        self.create()
            .map_err(|e| format!("cannot create {}: {e}", self.root.display()))?;
        let run = |tree: &PrivateTree, overlay: bool| -> Result<(), String> {
            let mounts = tree.mounts(overlay)?;
            let mut c = Command::new("true");
            c.current_dir(&tree.lower)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // SAFETY: as in `enter`.
            unsafe { c.pre_exec(move || mounts.enter()) };
            match c.status() {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => Err(format!("`true` ended with {s}")),
                Err(e) => Err(e.to_string()),
            }
        };
        // SAFETY: geteuid has no preconditions and cannot fail.
        self.userns = unsafe { libc::geteuid() } != 0;
        run(self, false).map_err(|e| {
            if self.userns {
                format!(
                    "cannot make a private mount namespace ({e}): not root, and the \
                     kernel refuses unprivileged user namespaces"
                )
            } else {
                format!("cannot make a private mount namespace ({e})")
            }
        })?;
        run(self, true).map_err(|e| {
            format!(
                "cannot mount an overlay of the tree with its upper layer in {} ({e}{})",
                self.root.display(),
                if self.userns {
                    "; without root this needs Linux 5.11 or later"
                } else {
                    ""
                }
            )
        })
    }

    /// Where livecare reads `path` (a file of the tree as the build left it): its copy
    /// in the upper layer, else the tree's own file; None when the build deleted it or
    /// it never existed.
    pub fn built_file(&self, path: &Path) -> Option<PathBuf> {
        let Ok(rel) = path.strip_prefix(&self.tree) else {
            return path.is_file().then(|| path.to_path_buf());
        };
        let up = self.upper().join(rel);
        match std::fs::symlink_metadata(&up) {
            Ok(m) if is_whiteout(&m) => None,
            Ok(_) => up.is_file().then_some(up),
            // Not written by the build: the tree's own file, unless a directory on
            // the way was deleted or replaced (a whiteout or an opaque directory).
            Err(_) => {
                let hidden = rel.ancestors().skip(1).any(|a| {
                    !a.as_os_str().is_empty()
                        && std::fs::symlink_metadata(self.upper().join(a))
                            .is_ok_and(|m| is_whiteout(&m) || !m.is_dir())
                });
                let own = self.lower.join(rel);
                (!hidden && own.is_file()).then_some(own)
            }
        }
    }

    /// Whether `rel` (a top-level name of the tree) exists in the build's view.
    pub fn visible(&self, rel: &Path) -> bool {
        match std::fs::symlink_metadata(self.upper().join(rel)) {
            Ok(m) => !is_whiteout(&m),
            Err(_) => self.lower.join(rel).exists(),
        }
    }

    /// Puts the tree's own version of each of `rels` back into the view (the build's
    /// changes to them, or their deletion, are dropped).
    pub fn revert(&self, rels: &[PathBuf]) -> std::io::Result<()> {
        for rel in rels {
            let up = self.upper().join(rel);
            match std::fs::symlink_metadata(&up) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => std::fs::remove_file(&up)?,
                Err(_) => {}
            }
        }
        Ok(())
    }
}

/// Removes a layers directory. overlayfs leaves `work/work` (and `work/index`) with
/// mode 000, which only root could then list: open them up first.
fn remove_layers(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for d in ["work", "index"] {
        let _ = std::fs::set_permissions(
            root.join("work").join(d),
            std::fs::Permissions::from_mode(0o700),
        );
    }
    let _ = std::fs::remove_dir_all(root);
}

/// An overlayfs whiteout: a character device 0:0 that hides the lower file.
fn is_whiteout(m: &std::fs::Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}
