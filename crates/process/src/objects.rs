//! Loaded ELF objects of a process: path, kind, load bias, mapped ranges, build-id.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use object::read::elf::{FileHeader, ProgramHeader};
use object::{elf, Endianness, Object};

use crate::{read_maps, Error, MapEntry, Pid, RemoteMemory};

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
    pub data: Arc<[u8]>,
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

/// Object files already read in this process, by (device, inode, size): `-p all`
/// sees the same libc in every process and reads it once.
static FILE_CACHE: Mutex<Vec<(FileKey, Arc<[u8]>)>> = Mutex::new(Vec::new());

/// (device, inode, size) of an object file.
type FileKey = (String, u64, u64);

fn read_object_file(pid: Pid, first: &MapEntry) -> Option<(String, Arc<[u8]>)> {
    let mf = format!(
        "/proc/{}/map_files/{:x}-{:x}",
        pid.0, first.start, first.end
    );
    let size = std::fs::metadata(&mf).map(|m| m.len()).unwrap_or(u64::MAX);
    let key = (first.dev.clone(), first.inode, size);
    if let Some((_, d)) = FILE_CACHE.lock().ok()?.iter().find(|(k, _)| *k == key) {
        return Some((mf, d.clone()));
    }
    let data = std::fs::read(&mf)
        .or_else(|_| std::fs::read(format!("/proc/{}/root{}", pid.0, first.path)))
        .or_else(|_| std::fs::read(&first.path))
        .ok()?;
    let data: Arc<[u8]> = Arc::from(data);
    if size != u64::MAX {
        if let Ok(mut c) = FILE_CACHE.lock() {
            c.push((key, data.clone()));
        }
    }
    Some((mf, data))
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
    let maps = read_maps(pid)?;
    let exe = std::fs::read_link(format!("/proc/{}/exe", pid.0)).ok();
    let exe = exe.as_ref().map(|p| {
        p.to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string()
    });
    let mem = RemoteMemory::open(pid).ok();
    let mut out: Vec<LoadedObject> = Vec::new();
    let mut seen: Vec<(String, u64, String)> = Vec::new();
    for (i, m) in maps.iter().enumerate() {
        if !m.is_file() {
            continue;
        }
        let key = (m.dev.clone(), m.inode, m.path.clone());
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let group: Vec<&MapEntry> = maps[i..]
            .iter()
            .filter(|x| x.inode == m.inode && x.dev == m.dev && x.path == m.path)
            .collect();
        let Some((map_file, data)) = read_object_file(pid, m) else {
            // Unreadable file: still report it if its ELF notes are in memory.
            if let Some(bid) = mem
                .as_ref()
                .and_then(|mm| build_id_from_memory(mm, m.start))
            {
                out.push(LoadedObject {
                    path: m.path.clone(),
                    build_id: Some(bid),
                    load_bias: m.start,
                    ranges: group.iter().map(|g| g.start..g.end).collect(),
                    kind: ElfKind::Other,
                    map_file: String::new(),
                    data: Arc::from(Vec::new()),
                });
            }
            continue;
        };
        if !data.starts_with(b"\x7fELF") {
            continue;
        }
        let Some(bias) = load_bias(&data, m.start, m.offset) else {
            continue;
        };
        let build_id = object::File::parse(&data[..])
            .ok()
            .and_then(|f| f.build_id().ok().flatten().map(hex))
            .or_else(|| {
                mem.as_ref()
                    .and_then(|mm| build_id_from_memory(mm, m.start))
            });
        let is_main = exe.as_deref() == Some(m.path.as_str());
        out.push(LoadedObject {
            path: m.path.clone(),
            build_id,
            load_bias: bias,
            ranges: group.iter().map(|g| g.start..g.end).collect(),
            kind: kind_of(&data, is_main),
            map_file,
            data,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
