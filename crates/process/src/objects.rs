//! Loaded ELF objects of a process: path, kind, load bias, mapped ranges, build-id.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use object::read::elf::{FileHeader, ProgramHeader};
use object::{elf, Endianness, Object};

use crate::{read_maps, Bytes, Error, MapEntry, Pid, RemoteMemory};

/// What kind of ELF object a mapping holds; libraries are recognised by type and
/// `PT_DYNAMIC`, never by file name (glibc is `libc.so.6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElfKind {
    /// The main program (what `/proc/PID/exe` names).
    Executable,
    /// A shared object with a dynamic section (ld.so included).
    SharedLibrary,
    /// Some other ELF mapped into memory.
    Other,
}

/// An ELF object mapped into a process.
#[derive(Debug, Clone)]
pub struct LoadedObject {
    /// Path as shown in /proc/PID/maps.
    pub path: String,
    /// GNU build-id as lowercase hex, if the object has one.
    pub build_id: Option<String>,
    /// Runtime address minus link-time address.
    pub load_bias: u64,
    /// Mapped address ranges, in address order.
    pub ranges: Vec<Range<u64>>,
    /// Executable, library or other.
    pub kind: ElfKind,
    /// `/proc/PID/map_files/...` entry for the first mapping (readable even if the
    /// file was replaced or deleted on disk).
    pub map_file: String,
    /// The file's bytes, shared.
    pub data: Bytes,
}

impl LoadedObject {
    /// One past the highest mapped address.
    pub fn end(&self) -> u64 {
        self.ranges.iter().map(|r| r.end).max().unwrap_or(0)
    }

    /// Lowest mapped address.
    pub fn start(&self) -> u64 {
        self.ranges.iter().map(|r| r.start).min().unwrap_or(0)
    }

    /// True if `addr` lies in one of the object's mappings.
    pub fn contains(&self, addr: u64) -> bool {
        self.ranges.iter().any(|r| r.contains(&addr))
    }

    /// The file name without directories.
    pub fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}

/// One object file as read from disk: its bytes and what they say about themselves.
struct FileInfo {
    data: Bytes,
    /// GNU build-id found in the file (None: the file names none).
    build_id: Option<String>,
}

/// (device, inode, size) of an object file.
type FileKey = (String, u64, u64);

/// Object files already read in this process, by (device, inode, size): `-p all`
/// sees the same libc in every process and reads and parses it once.
fn file_cache() -> &'static Mutex<HashMap<FileKey, Arc<FileInfo>>> {
    static CACHE: OnceLock<Mutex<HashMap<FileKey, Arc<FileInfo>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// What the headers of a mapped file say about its build-id.
#[derive(Clone)]
enum FileBuildId {
    /// Not an ELF file: [`loaded_objects`] leaves it out.
    NotElf,
    /// The build-id the file carries.
    Id(String),
    /// An ELF file naming no build-id (or one `object` cannot parse):
    /// [`loaded_objects`] then looks for one in memory.
    Unknown,
}

/// Build-ids of object files seen by [`LoadedObject::any_build_id_in`] (which reads
/// only the headers and notes), by the same key as the file cache.
fn build_id_cache() -> &'static Mutex<HashMap<FileKey, FileBuildId>> {
    static CACHE: OnceLock<Mutex<HashMap<FileKey, FileBuildId>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The `/proc/PID/map_files` entry of a mapping and the cache key of its file
/// (`None` when the size cannot be learnt: such a file is never cached).
fn file_key(pid: Pid, first: &MapEntry) -> (String, Option<FileKey>) {
    let mf = format!(
        "/proc/{}/map_files/{:x}-{:x}",
        pid.0, first.start, first.end
    );
    let key = std::fs::metadata(&mf)
        .ok()
        .map(|m| (first.dev.clone(), first.inode, m.len()));
    (mf, key)
}

/// The GNU build-id an ELF file carries, as `object` finds it.
fn file_build_id(data: &[u8]) -> Option<String> {
    object::File::parse(data)
        .ok()
        .and_then(|f| f.build_id().ok().flatten().map(hex))
}

fn read_object_file(
    pid: Pid,
    first: &MapEntry,
    (mf, key): (String, Option<FileKey>),
) -> Option<(String, Arc<FileInfo>)> {
    if let Some(k) = &key {
        if let Some(f) = file_cache().lock().ok()?.get(k) {
            return Some((mf, f.clone()));
        }
    }
    let data = Bytes::map_path(&mf)
        .or_else(|_| Bytes::map_path(format!("/proc/{}/root{}", pid.0, first.path)))
        .or_else(|e| match pid.via_live_thread("root") {
            Some(root) => Bytes::map_path(format!("{root}{}", first.path)),
            None => Err(e),
        })
        .or_else(|_| Bytes::map_path(&first.path))
        .ok()?;
    let info = Arc::new(FileInfo {
        build_id: file_build_id(&data),
        data,
    });
    if let (Some(k), Ok(mut c)) = (key, file_cache().lock()) {
        c.insert(k, info.clone());
    }
    Some((mf, info))
}

/// Load bias from the program headers: the mapping at file offset `off` starts at
/// `start`, so bias = start - vaddr_of(off).
fn load_bias(data: &[u8], start: u64, off: u64) -> Option<u64> {
    let hdr = elf::FileHeader64::<Endianness>::parse(data).ok()?;
    let endian = hdr.endian().ok()?;
    for ph in hdr.program_headers(endian, data).ok()? {
        if ph.p_type(endian) != elf::PT_LOAD {
            continue;
        }
        let (po, pv, fsz) = (ph.p_offset(endian), ph.p_vaddr(endian), ph.p_filesz(endian));
        let page_po = po & !0xfff;
        // Header values come from the file: a segment end or mapped vaddr that does
        // not fit in 64 bits is a corrupt header, not a bias.
        let seg_end = po.checked_add(fsz.max(1))?;
        if off >= page_po && off < seg_end {
            let vaddr = (pv & !0xfff).checked_add(off - page_po)?;
            return Some(start.wrapping_sub(vaddr));
        }
    }
    None
}

fn kind_of(data: &[u8], is_main: bool) -> ElfKind {
    let Ok(hdr) = elf::FileHeader64::<Endianness>::parse(data) else {
        return ElfKind::Other;
    };
    let Ok(endian) = hdr.endian() else {
        return ElfKind::Other;
    };
    if is_main {
        return ElfKind::Executable;
    }
    let has_dynamic = hdr
        .program_headers(endian, data)
        .map(|phs| phs.iter().any(|p| p.p_type(endian) == elf::PT_DYNAMIC))
        .unwrap_or(false);
    if hdr.e_type(endian) == elf::ET_DYN && has_dynamic {
        ElfKind::SharedLibrary
    } else {
        ElfKind::Other
    }
}

/// Build-id from the ELF notes in target memory, for objects whose file is unreadable.
fn build_id_from_memory(mem: &RemoteMemory, start: u64) -> Option<String> {
    let head = mem.read_vec(start, 4096).ok()?;
    let hdr = elf::FileHeader64::<Endianness>::parse(&head[..]).ok()?;
    let endian = hdr.endian().ok()?;
    let phs = hdr.program_headers(endian, &head[..]).ok()?;
    let first_vaddr = phs
        .iter()
        .find(|p| p.p_type(endian) == elf::PT_LOAD)?
        .p_vaddr(endian)
        & !0xfff;
    for ph in phs {
        if ph.p_type(endian) != elf::PT_NOTE {
            continue;
        }
        // A note below the first PT_LOAD or past the address space is not in this
        // mapping: skip it rather than read from a wrapped address.
        let Some(addr) = ph
            .p_vaddr(endian)
            .checked_sub(first_vaddr)
            .and_then(|d| start.checked_add(d))
        else {
            continue;
        };
        let notes = mem
            .read_vec(addr, ph.p_memsz(endian).min(4096) as usize)
            .ok()?;
        let mut i = 0usize;
        while i + 12 <= notes.len() {
            let rd = |o: usize| {
                u32::from_le_bytes(notes[o..o + 4].try_into().unwrap_or_default()) as usize
            };
            let (nsz, dsz, ty) = (rd(i), rd(i + 4), rd(i + 8));
            let Some(name_end) = (i + 12).checked_add(nsz.div_ceil(4) * 4) else {
                break;
            };
            let Some(desc_end) = name_end.checked_add(dsz) else {
                break;
            };
            if desc_end > notes.len() {
                break;
            }
            if ty == 3
                && notes
                    .get(i + 12..i + 12 + nsz)
                    .is_some_and(|n| n.starts_with(b"GNU"))
            {
                return Some(hex(&notes[name_end..desc_end]));
            }
            i = name_end + dsz.div_ceil(4) * 4;
        }
    }
    None
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The ELF objects mapped into `pid`, in address order.
pub fn loaded_objects(pid: Pid) -> Result<Vec<LoadedObject>, Error> {
    Ok(objects_in(pid, &read_maps(pid)?))
}

/// The first mapping of each distinct file with its `map_files` entry and cache key
/// (one `statx` each): [`LoadedObject::if_any_build_id_in`] computes them once for
/// both of its steps.
fn keyed_mappings(pid: Pid, maps: &[MapEntry]) -> Vec<(usize, String, Option<FileKey>)> {
    first_mappings(maps)
        .into_iter()
        .map(|(i, m)| {
            let (mf, key) = file_key(pid, m);
            (i, mf, key)
        })
        .collect()
}

/// [`loaded_objects`] from an already read `/proc/PID/maps`.
fn objects_in(pid: Pid, maps: &[MapEntry]) -> Vec<LoadedObject> {
    objects_in_keyed(pid, maps, &keyed_mappings(pid, maps))
}

/// [`objects_in`] with [`keyed_mappings`] already computed.
fn objects_in_keyed(
    pid: Pid,
    maps: &[MapEntry],
    keyed: &[(usize, String, Option<FileKey>)],
) -> Vec<LoadedObject> {
    let exe = std::fs::read_link(format!("/proc/{}/exe", pid.0))
        .ok()
        .or_else(|| std::fs::read_link(pid.via_live_thread("exe")?).ok());
    let exe = exe.as_ref().map(|p| {
        p.to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string()
    });
    // Opened only for an object whose file names no build-id.
    let mem_cell = std::cell::OnceCell::new();
    let mem = || {
        mem_cell
            .get_or_init(|| RemoteMemory::open(pid).ok())
            .as_ref()
    };
    let mut out: Vec<LoadedObject> = Vec::new();
    for (i, mf, key) in keyed {
        let (i, m) = (*i, &maps[*i]);
        let group = maps[i..]
            .iter()
            .filter(|x| x.inode == m.inode && x.dev == m.dev && x.path == m.path);
        let ranges: Vec<Range<u64>> = group.map(|g| g.start..g.end).collect();
        let Some((map_file, file)) = read_object_file(pid, m, (mf.clone(), key.clone())) else {
            // Unreadable file: still report it if its ELF notes are in memory.
            if let Some(bid) = mem().and_then(|mm| build_id_from_memory(mm, m.start)) {
                out.push(LoadedObject {
                    path: m.path.clone(),
                    build_id: Some(bid),
                    load_bias: m.start,
                    ranges,
                    kind: ElfKind::Other,
                    map_file: String::new(),
                    data: Bytes::from(Vec::new()),
                });
            }
            continue;
        };
        let data = &file.data;
        if !data.starts_with(b"\x7fELF") {
            continue;
        }
        let Some(bias) = load_bias(data, m.start, m.offset) else {
            continue;
        };
        let build_id = file
            .build_id
            .clone()
            .or_else(|| mem().and_then(|mm| build_id_from_memory(mm, m.start)));
        let is_main = exe.as_deref() == Some(m.path.as_str());
        out.push(LoadedObject {
            path: m.path.clone(),
            build_id,
            load_bias: bias,
            ranges,
            kind: kind_of(data, is_main),
            map_file,
            data: data.clone(),
        });
    }
    out
}

/// The first mapping of each distinct file (device, inode, path), with its index, in
/// address order. Where the same file is also mapped whole as data (as livecare maps
/// the object files it reads, seen when it inspects itself), the loaded image wins: a
/// mapping at offset 0 followed at once by the file's next segment.
fn first_mappings(maps: &[MapEntry]) -> Vec<(usize, &MapEntry)> {
    let same =
        |a: &MapEntry, b: &MapEntry| a.inode == b.inode && a.dev == b.dev && a.path == b.path;
    let image_start = |i: usize| {
        let m = &maps[i];
        m.offset == 0
            && maps
                .get(i + 1)
                .is_some_and(|n| same(m, n) && n.start == m.end && n.offset > 0)
    };
    let mut out: Vec<(usize, &MapEntry)> = Vec::new();
    for (i, m) in maps.iter().enumerate().filter(|(_, m)| m.is_file()) {
        match out.iter().position(|(_, x)| same(x, m)) {
            None => out.push((i, m)),
            Some(k) if !image_start(out[k].0) && image_start(i) => out[k] = (i, m),
            Some(_) => {}
        }
    }
    out.sort_by_key(|&(i, _)| i);
    out
}

/// Reads the few header and note bytes `object` looks at for a build-id, without
/// reading the whole file (a process may map a 100 MB library nobody patches).
fn build_id_of_path(path: &str) -> std::io::Result<FileBuildId> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_err() || &magic != b"\x7fELF" {
        return Ok(FileBuildId::NotElf);
    }
    if let Some(b) = note_sections_build_id(&f) {
        return Ok(b);
    }
    // Unusual layout: let `object` read what it needs (it also parses the symbol
    // tables, so this is the slow path).
    let cache = object::ReadCache::new(f);
    Ok(object::File::parse(&cache)
        .ok()
        .and_then(|f| f.build_id().ok().flatten().map(hex))
        .map_or(FileBuildId::Unknown, FileBuildId::Id))
}

/// The build-id in the file's SHT_NOTE sections, found as `object` does (first GNU
/// build-id note in section order) from a few small reads. `None` when the file
/// needs the general path (no section headers, extended numbering, odd sizes).
/// Without a build-id note the answer is `Unknown`, which sends the caller to the
/// process's memory, as [`loaded_objects`] would.
fn note_sections_build_id(f: &std::fs::File) -> Option<FileBuildId> {
    use object::read::elf::{NoteIterator, SectionHeader};
    use std::os::unix::fs::FileExt;
    type Hdr = elf::FileHeader64<Endianness>;
    let read = |off: u64, len: usize| -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off).ok()?;
        Some(buf)
    };
    let head = read(0, std::mem::size_of::<Hdr>())?;
    let hdr = Hdr::parse(&head[..]).ok()?;
    let e = hdr.endian().ok()?;
    let (shoff, shnum) = (hdr.e_shoff(e), usize::from(hdr.e_shnum(e)));
    if shoff == 0 || shnum == 0 || usize::from(hdr.e_shentsize(e)) != 64 {
        return None;
    }
    let table = read(shoff, shnum * 64)?;
    let (secs, _) =
        object::pod::slice_from_bytes::<elf::SectionHeader64<Endianness>>(&table, shnum).ok()?;
    for s in secs.iter().filter(|s| s.sh_type(e) == elf::SHT_NOTE) {
        let len = usize::try_from(s.sh_size(e))
            .ok()
            .filter(|&l| l <= 1 << 20)?;
        let data = read(s.sh_offset(e), len)?;
        let mut notes = NoteIterator::<Hdr>::new(e, s.sh_addralign(e), &data).ok()?;
        while let Some(note) = notes.next().ok()? {
            if note.name() == elf::ELF_NOTE_GNU && note.n_type(e) == elf::NT_GNU_BUILD_ID {
                return Some(FileBuildId::Id(hex(note.desc())));
            }
        }
    }
    Some(FileBuildId::Unknown)
}

/// What the file cache already knows about `key`'s build-id, if it read the file.
fn cached_file_build_id(key: &FileKey) -> Option<FileBuildId> {
    let c = file_cache().lock().ok()?;
    let f = c.get(key)?;
    Some(if !f.data.starts_with(b"\x7fELF") {
        FileBuildId::NotElf
    } else {
        f.build_id
            .clone()
            .map_or(FileBuildId::Unknown, FileBuildId::Id)
    })
}

impl LoadedObject {
    /// Cheap pre-check for `-p all`: false only if `pid` certainly maps no object with
    /// one of `build_ids` (what [`loaded_objects`] would report), so the caller can
    /// skip it without reading any object file in full. For a file that names no
    /// build-id (rustc's 100 MB libraries) or cannot be read, the ELF notes in the
    /// process's memory decide, as in [`loaded_objects`]. Build-ids read from files are
    /// cached per (device, inode, size).
    pub fn any_build_id_in(pid: Pid, build_ids: &[&str]) -> Result<bool, Error> {
        let maps = read_maps(pid)?;
        Ok(any_build_id_in_maps(
            pid,
            &maps,
            &keyed_mappings(pid, &maps),
            build_ids,
        ))
    }

    /// [`loaded_objects`] of `pid` if [`LoadedObject::any_build_id_in`] says it may
    /// map one of `build_ids`, else `None`; `/proc/PID/maps` is read once for both.
    pub fn if_any_build_id_in(
        pid: Pid,
        build_ids: &[&str],
    ) -> Result<Option<Vec<LoadedObject>>, Error> {
        let maps = read_maps(pid)?;
        let keyed = keyed_mappings(pid, &maps);
        Ok(any_build_id_in_maps(pid, &maps, &keyed, build_ids)
            .then(|| objects_in_keyed(pid, &maps, &keyed)))
    }
}

/// [`LoadedObject::any_build_id_in`] on an already read `/proc/PID/maps`.
fn any_build_id_in_maps(
    pid: Pid,
    maps: &[MapEntry],
    keyed: &[(usize, String, Option<FileKey>)],
    build_ids: &[&str],
) -> bool {
    let mem_cell = std::cell::OnceCell::new();
    let mem = || {
        mem_cell
            .get_or_init(|| RemoteMemory::open(pid).ok())
            .as_ref()
    };
    // Where loaded_objects would look when the file names no build-id.
    let in_memory = |m: &MapEntry| {
        mem()
            .and_then(|mm| build_id_from_memory(mm, m.start))
            .is_some_and(|b| build_ids.contains(&b.as_str()))
    };
    for (i, mf, key) in keyed {
        let m = &maps[*i];
        let cached = key.as_ref().and_then(|k| {
            build_id_cache()
                .lock()
                .ok()
                .and_then(|c| c.get(k).cloned())
                .or_else(|| cached_file_build_id(k))
        });
        let bid = match cached {
            Some(b) => b,
            None => match build_id_of_path(mf) {
                Ok(b) => {
                    if let (Some(k), Ok(mut c)) = (key, build_id_cache().lock()) {
                        c.insert(k.clone(), b.clone());
                    }
                    b
                }
                // Unreadable: loaded_objects reports it only by its notes in memory.
                Err(_) if in_memory(m) => return true,
                Err(_) => continue,
            },
        };
        match bid {
            FileBuildId::NotElf => {}
            FileBuildId::Id(b) if build_ids.contains(&b.as_str()) => return true,
            FileBuildId::Id(_) => {}
            FileBuildId::Unknown if in_memory(m) => return true,
            FileBuildId::Unknown => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_file_mapped_as_data_below_the_loaded_image_is_not_taken_for_it() {
        let m = |start: u64, end: u64, offset: u64, inode: u64, path: &str| MapEntry {
            start,
            end,
            read: true,
            write: false,
            exec: false,
            offset,
            dev: "08:01".into(),
            inode,
            path: path.into(),
        };
        let maps = vec![
            m(0x1000, 0x9000, 0, 7, "/lib/libc.so.6"), // livecare's own data mapping
            m(0x10000, 0x11000, 0, 9, "/bin/prog"),
            m(0x20000, 0x22000, 0, 7, "/lib/libc.so.6"),
            m(0x22000, 0x26000, 0x2000, 7, "/lib/libc.so.6"),
            m(0x30000, 0x31000, 0, 8, "/lib/alone.so"), // one segment: first mapping
        ];
        let got: Vec<u64> = first_mappings(&maps).iter().map(|(_, e)| e.start).collect();
        assert_eq!(got, vec![0x10000, 0x20000, 0x30000]);
    }

    #[test]
    fn own_process_has_executable_and_libc_with_build_ids() {
        let objs = loaded_objects(Pid(std::process::id() as i32)).unwrap();
        let exe = objs
            .iter()
            .find(|o| o.kind == ElfKind::Executable)
            .expect("executable");
        assert!(exe.contains(own_text_addr()));
        let libc = objs
            .iter()
            .find(|o| o.name().starts_with("libc.so"))
            .expect("libc");
        assert_eq!(libc.kind, ElfKind::SharedLibrary);
        assert_eq!(libc.build_id.as_ref().map(|b| b.len()), Some(40));
        assert_eq!(libc.load_bias & 0xfff, 0);
    }

    #[test]
    fn build_id_precheck_agrees_with_loaded_objects() {
        let me = Pid(std::process::id() as i32);
        let objs = loaded_objects(me).unwrap();
        let libc = objs
            .iter()
            .find(|o| o.name().starts_with("libc.so"))
            .and_then(|o| o.build_id.clone())
            .expect("libc with a build-id");
        assert!(LoadedObject::any_build_id_in(me, &[&libc]).unwrap());
        assert!(LoadedObject::any_build_id_in(me, &["00", &libc]).unwrap());
        // Every ELF file this test maps names its build-id, so an id none has is
        // ruled out from the headers alone.
        assert!(objs.iter().all(|o| o.build_id.is_some()));
        let none = "0123456789abcdef0123456789abcdef01234567";
        assert!(!LoadedObject::any_build_id_in(me, &[none]).unwrap());
        // Twice: the second answer comes from the cache and must not differ.
        assert!(!LoadedObject::any_build_id_in(me, &[none]).unwrap());
        assert!(LoadedObject::any_build_id_in(me, &[&libc]).unwrap());
    }

    #[test]
    fn note_section_build_ids_match_objects_for_every_mapped_file() {
        let me = Pid(std::process::id() as i32);
        let objs = loaded_objects(me).unwrap();
        assert!(objs.len() >= 3, "{objs:?}");
        for o in &objs {
            let f = std::fs::File::open(&o.path).unwrap();
            match note_sections_build_id(&f) {
                Some(FileBuildId::Id(b)) => assert_eq!(Some(b), o.build_id, "{}", o.path),
                Some(FileBuildId::Unknown) => assert_eq!(file_build_id(&o.data), None),
                Some(FileBuildId::NotElf) => panic!("{} is ELF", o.path),
                None => {} // general path
            }
        }
        let objs2 = LoadedObject::if_any_build_id_in(me, &["00"]).unwrap();
        assert!(objs2.is_none());
        let libc = objs
            .iter()
            .find(|o| o.name().starts_with("libc.so"))
            .unwrap();
        let bid = libc.build_id.as_deref().unwrap();
        let again = LoadedObject::if_any_build_id_in(me, &[bid])
            .unwrap()
            .unwrap();
        assert!(again.iter().any(|o| o.build_id.as_deref() == Some(bid)));
    }

    #[test]
    fn build_id_precheck_of_a_dead_process_is_an_error() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = Pid(child.id() as i32);
        child.wait().unwrap();
        assert!(LoadedObject::any_build_id_in(pid, &["00"]).is_err());
    }

    /// The fuzz crash files: 16 bytes (mapping start, file offset), then the ELF.
    fn fuzz_case(name: &str) -> (u64, u64, Vec<u8>) {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/crashes/target_elf")
            .join(name);
        let d = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let start = u64::from_le_bytes(d[..8].try_into().unwrap());
        let off = u64::from_le_bytes(d[8..16].try_into().unwrap());
        (start, off, d[16..].to_vec())
    }

    #[test]
    fn load_bias_of_a_segment_wrapping_past_2_pow_64_is_none() {
        let (start, off, elf) = fuzz_case("load_bias-add-overflow");
        assert_eq!(load_bias(&elf, start, off), None);
    }

    #[test]
    fn build_id_from_memory_skips_a_note_below_the_first_load() {
        let (_, _, elf) = fuzz_case("build_id_from_memory-sub-overflow");
        // As the fuzz target does: the ELF image in this process's own memory.
        let mut image = vec![0u8; elf.len().max(8192)];
        image[..elf.len()].copy_from_slice(&elf);
        let mem = RemoteMemory::open(Pid(std::process::id() as i32)).unwrap();
        assert_eq!(build_id_from_memory(&mem, image.as_ptr() as u64), None);
    }

    fn own_text_addr() -> u64 {
        own_text_addr as fn() -> u64 as usize as u64
    }
}
