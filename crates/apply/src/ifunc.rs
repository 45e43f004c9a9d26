//! IFUNC resolution without borrowing a target thread.
//!
//! A patch that calls, say, `strlen` needs the implementation glibc's resolver picks
//! for this CPU. Running the resolver in a target thread (`ThreadSet::call_function`)
//! leaves that thread on foreign registers for a few ptrace round trips: if livecare is
//! killed then, the thread goes on with them and the target crashes. When livecare has
//! the very same object loaded (same build-id: nearly always, for libc on the machine
//! the target runs on), the resolver runs here instead, on the same CPU, and its answer
//! is moved to the target's load address. Any implementation the resolver offers for
//! this CPU behaves the same, so a different choice (e.g. other `GLIBC_TUNABLES` in the
//! target) is still correct. Otherwise the caller falls back to the remote call.
//!
//! "The same object" means one the dynamic linker loaded into livecare (libc, ld.so):
//! livecare also maps the target's files whole, read-only, to parse them, and those
//! mappings are never code. A resolver of a library livecare has not loaded itself
//! (its constructors never ran, its relocations were never applied) is never run here.

use std::sync::OnceLock;

use object::elf;

use livecare_process::{loaded_objects, read_maps, LoadedObject, Pid};

use crate::prepare::{ObjSym, ObjectView};

/// Objects of livecare's own process with a build-id, read once.
fn own_objects() -> &'static [(LoadedObject, ObjectView)] {
    static OWN: OnceLock<Vec<(LoadedObject, ObjectView)>> = OnceLock::new();
    OWN.get_or_init(|| {
        loaded_objects(Pid(std::process::id() as i32))
            .unwrap_or_default()
            .into_iter()
            .filter(|o| o.build_id.is_some())
            .filter_map(|o| ObjectView::new(&o).ok().map(|v| (o, v)))
            .collect()
    })
}

/// Whether a debug build was asked to always use the remote resolver call (tests of
/// that path; the release binary ignores it).
fn forced_remote() -> bool {
    cfg!(debug_assertions) && std::env::var_os("LIVECARE_REMOTE_IFUNC").is_some()
}

/// The target address of IFUNC `name` of `obj` (whose dynsym entry is `sym`),
/// resolved in this process; `None` when this process does not have the same object
/// with the same IFUNC at the same place.
pub(crate) fn resolve_locally(name: &str, obj: &LoadedObject, sym: &ObjSym) -> Option<u64> {
    if forced_remote() {
        return None;
    }
    let bid = obj.build_id.as_deref()?;
    let (me, view) = own_objects()
        .iter()
        .find(|(o, _)| o.build_id.as_deref() == Some(bid))?;
    let mine = view.dynsym.get(name)?;
    // Our own copy must say the same thing as the target's file: an IFUNC at the same
    // link-time address, inside our mapping of it.
    let link = sym.addr.checked_sub(obj.load_bias)?;
    if mine.st_type != elf::STT_GNU_IFUNC
        || mine.addr.checked_sub(me.load_bias)? != link
        || !me.contains(mine.addr)
    {
        return None;
    }
    if !loaded_here(me, mine.addr) {
        return None;
    }
    // SAFETY: `mine.addr` is the entry of an IFUNC resolver in an object the dynamic
    // linker loaded into this process, in an executable mapping of its file (both
    // checked just above); x86-64 resolvers take no arguments and return the
    // implementation's address, as the dynamic linker calls them.
    let resolver: extern "C" fn() -> usize = unsafe { std::mem::transmute(mine.addr as usize) };
    let got = resolver() as u64;
    if !me.contains(got) {
        return None;
    }
    Some(got - me.load_bias + obj.load_bias)
}

/// Whether `addr` is code of `me` as the dynamic linker loaded it into this process:
/// `dladdr` places it in a loaded object based inside `me`'s mappings, and a mapping of
/// `me`'s file that holds it is executable. A whole-file read-only mapping of the same
/// file (how livecare reads the target's objects) passes neither test.
fn loaded_here(me: &LoadedObject, addr: u64) -> bool {
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    // SAFETY: dladdr only reads the dynamic linker's list of loaded objects and fills
    // `info`, which lives for the call; `addr` is compared, never dereferenced.
    let found = unsafe { libc::dladdr(addr as usize as *const libc::c_void, &mut info) };
    if found == 0 || !me.contains(info.dli_fbase as u64) {
        return false;
    }
    // Our maps now, not as cached: a mapping of the file may have come or gone.
    read_maps(Pid(std::process::id() as i32)).is_ok_and(|maps| {
        maps.iter()
            .any(|m| m.exec && m.path == me.path && m.start <= addr && addr < m.end)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_libc_strlen_resolves_to_what_the_dynamic_linker_chose() {
        let (libc_obj, view) = own_objects()
            .iter()
            .find(|(o, _)| o.path.contains("/libc.so"))
            .expect("libc is loaded");
        let sym = view.dynsym.get("strlen").expect("libc exports strlen");
        assert_eq!(
            sym.st_type,
            elf::STT_GNU_IFUNC,
            "strlen is an IFUNC in glibc"
        );
        // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches every object.
        let chosen = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"strlen".as_ptr()) } as u64;
        if forced_remote() {
            return;
        }
        assert_eq!(resolve_locally("strlen", libc_obj, &sym), Some(chosen));
        // A symbol that is not an IFUNC is not resolved here.
        let plain = view.dynsym.get("getpid").unwrap();
        assert_eq!(resolve_locally("getpid", libc_obj, &plain), None);
    }

    /// Issue 18.2: livecare's own read-only mapping of a file (how it reads the
    /// target's objects) is never taken for the loaded code of that file.
    #[test]
    fn a_read_only_mapping_of_a_loaded_file_is_not_code_to_run() {
        let (libc_obj, view) = own_objects()
            .iter()
            .find(|(o, _)| o.path.contains("/libc.so"))
            .expect("libc is loaded");
        let sym = view.dynsym.get("strlen").expect("libc exports strlen");
        assert!(loaded_here(libc_obj, sym.addr));
        let data = livecare_process::Bytes::map_path(&libc_obj.path).expect("libc maps");
        let start = data.as_ptr() as u64;
        let whole_file = LoadedObject {
            ranges: std::iter::once(start..start + data.len() as u64).collect(),
            load_bias: start,
            data: data.clone(),
            ..libc_obj.clone()
        };
        let at = sym.addr - libc_obj.load_bias + start;
        assert!(whole_file.contains(at));
        assert!(!loaded_here(&whole_file, at));
    }
}
