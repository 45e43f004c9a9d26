//! The host-side half of applying: parse the patch ELF, lay out the region, resolve
//! symbols against the target's loaded objects, and relocate into an image.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use object::read::elf::{FileHeader, ProgramHeader, Rela as _, SectionHeader, Sym as _};
use object::{elf, LittleEndian as LE};

use livecare_process::{Bytes, LoadedObject};

use crate::arch::{Native, PatchArch, RelocInput};
use crate::container::Patch;
use crate::region::{Hunk, RegionHeader, SAVED_LEN};
use crate::Error;

type Hdr = elf::FileHeader64<LE>;
type Shdr = elf::SectionHeader64<LE>;
type Sym = elf::Sym64<LE>;

/// Size of one `.kpatch.info` record (LibCare `struct kpatch_info`, 64-bit).
const KPATCH_INFO_LEN: usize = 48;
/// Page size used for region layout.
const PAGE: u64 = 4096;

fn align(v: u64, a: u64) -> u64 {
    let a = a.max(1);
    v.div_ceil(a) * a
}

/// Strips a symbol version (`printf@GLIBC_2.2.5` → `printf`).
pub fn base_name(name: &str) -> &str {
    name.split('@').next().unwrap_or(name)
}

/// A defined symbol of a loaded object.
#[derive(Debug, Clone, Copy)]
pub struct ObjSym {
    /// Runtime address (bias applied), or TLS segment offset for STT_TLS.
    pub addr: u64,
    /// Size.
    pub size: u64,
    /// ELF st_type.
    pub st_type: u8,
}

/// A symbol at its link-time address moved to its runtime address (TLS symbols hold a
/// segment offset, which no load moves).
fn rebase_sym(s: ObjSym, bias: u64) -> ObjSym {
    if s.st_type == elf::STT_TLS {
        s
    } else {
        ObjSym {
            addr: s.addr.wrapping_add(bias),
            ..s
        }
    }
}

/// A value that is not an address (a size): the same at every load address.
fn unmoved(v: u64, _bias: u64) -> u64 {
    v
}

/// A name-keyed table of one object, parsed once per file at link-time addresses and
/// shared by every process of an invocation that maps the file; lookups add this
/// process's load bias, so using a table costs nothing per process.
pub struct ByName<V: 'static> {
    link: Arc<HashMap<String, V>>,
    bias: u64,
    rebase: fn(V, u64) -> V,
    /// The whole table at runtime addresses, built only if someone iterates it.
    runtime: OnceLock<HashMap<String, V>>,
}

impl<V: Copy> ByName<V> {
    fn new(link: Arc<HashMap<String, V>>, bias: u64, rebase: fn(V, u64) -> V) -> Self {
        ByName {
            link,
            bias,
            rebase,
            runtime: OnceLock::new(),
        }
    }

    /// The entry for `name`, at its runtime address.
    pub fn get(&self, name: &str) -> Option<V> {
        self.link.get(name).map(|v| (self.rebase)(*v, self.bias))
    }
}

impl<V: Copy> std::ops::Deref for ByName<V> {
    type Target = HashMap<String, V>;

    /// The table at runtime addresses (materialised on first use, for iteration).
    fn deref(&self) -> &HashMap<String, V> {
        self.runtime.get_or_init(|| {
            self.link
                .iter()
                .map(|(k, v)| (k.clone(), (self.rebase)(*v, self.bias)))
                .collect()
        })
    }
}

/// A table that is filled on first use (and then shared).
struct Lazy<T> {
    cell: OnceLock<T>,
    init: Box<dyn Fn() -> T + Send + Sync>,
}

impl<T> Lazy<T> {
    fn ready(v: T) -> Lazy<T>
    where
        T: Default + 'static,
    {
        Lazy {
            cell: OnceLock::from(v),
            init: Box::new(T::default),
        }
    }

    fn get(&self) -> &T {
        self.cell.get_or_init(&self.init)
    }
}

/// An address-keyed table of one object, shared like [`ByName`]: keys are link-time
/// addresses; lookups take a runtime address.
pub struct ByAddr<V: 'static> {
    link: Arc<Lazy<HashMap<u64, V>>>,
    bias: u64,
    /// The whole table at runtime addresses, built only if someone iterates it.
    runtime: OnceLock<HashMap<u64, V>>,
}

impl<V: Clone> ByAddr<V> {
    fn new(link: Arc<Lazy<HashMap<u64, V>>>, bias: u64) -> Self {
        ByAddr {
            link,
            bias,
            runtime: OnceLock::new(),
        }
    }

    /// The entry starting at runtime address `addr`.
    pub fn get(&self, addr: &u64) -> Option<&V> {
        self.link.get().get(&addr.wrapping_sub(self.bias))
    }

    /// True if the table is empty.
    pub fn is_empty(&self) -> bool {
        self.link.get().is_empty()
    }
}

impl<V: Clone> std::ops::Deref for ByAddr<V> {
    type Target = HashMap<u64, V>;

    /// The table keyed by runtime addresses (materialised on first use, for iteration).
    fn deref(&self) -> &HashMap<u64, V> {
        self.runtime.get_or_init(|| {
            self.link
                .get()
                .iter()
                .map(|(k, v)| (k.wrapping_add(self.bias), v.clone()))
                .collect()
        })
    }
}

/// Everything [`ObjectView`] knows about one object file, at link-time addresses.
struct LinkView {
    sections: Arc<HashMap<String, u64>>,
    section_sizes: Arc<HashMap<String, u64>>,
    symtab: Arc<HashMap<String, ObjSym>>,
    dynsym: Arc<HashMap<String, ObjSym>>,
    funcs_by_addr: Arc<Lazy<HashMap<u64, (String, u64)>>>,
    has_symtab: bool,
    /// Parsed only when asked for: most objects have a symbol table, and then only
    /// the call-site index (once per file) reads the FDEs.
    fdes: Arc<Lazy<HashMap<u64, u64>>>,
    tls: Option<(u64, u64)>,
    tpoff_slots: Arc<HashMap<String, u64>>,
    tpoff_by_offset: Arc<HashMap<u64, u64>>,
    dtpmod_slots: Arc<HashMap<String, u64>>,
    dtpoff_slots: Arc<HashMap<String, u64>>,
    own_dtpmod_slot: Option<u64>,
}

/// Runtime view of an object's ELF: sections by name, symbols by name, TLS layout.
///
/// The file is parsed once per invocation (keyed by the identity of the shared file
/// bytes, which `loaded_objects` hands out once per (device, inode, size)); each
/// process only adds its load bias on lookup. With `-p all` over many processes of the
/// same program this turns ~10 M instructions per object per process into a few
/// hundred.
pub struct ObjectView {
    /// Section name → runtime address.
    pub sections: ByName<u64>,
    /// Section name → size (sh_size), for checking that a patch symbol placed in a
    /// section of the object lies inside it.
    pub section_sizes: ByName<u64>,
    /// `.symtab` symbols (may be empty for stripped objects).
    pub symtab: ByName<ObjSym>,
    /// `.dynsym` symbols that are defined and global/weak.
    pub dynsym: ByName<ObjSym>,
    /// Symbols by runtime address (from .symtab, FUNC only).
    pub funcs_by_addr: ByAddr<(String, u64)>,
    /// True if the object has a `.symtab`.
    pub has_symtab: bool,
    /// Function extents (runtime start → length) from `.eh_frame` FDEs, used to check
    /// hunk addresses in objects without a symbol table.
    pub fdes: ByAddr<u64>,
    /// (p_memsz, p_align) of PT_TLS.
    pub tls: Option<(u64, u64)>,
    /// Runtime GOT slot of each TLS symbol's TPOFF64 dynamic relocation.
    pub tpoff_slots: ByName<u64>,
    /// TPOFF64 GOT slots without a symbol (local `static __thread` variables), by the
    /// variable's offset in this object's TLS segment (the addend); see
    /// [`ObjectView::tpoff_slot_at`].
    tpoff_by_offset: Arc<HashMap<u64, u64>>,
    /// Load bias, for [`ObjectView::tpoff_slot_at`].
    bias: u64,
    /// Runtime GOT slot of each TLS symbol's DTPMOD64 (general-dynamic) relocation.
    pub dtpmod_slots: ByName<u64>,
    /// Runtime GOT slot of each TLS symbol's DTPOFF64 (general-dynamic) relocation.
    pub dtpoff_slots: ByName<u64>,
    /// A DTPMOD64 slot naming this object's own module (no symbol, or a symbol the
    /// object defines): where ld.so wrote the object's TLS module id.
    pub own_dtpmod_slot: Option<u64>,
}

/// Parsed files by identity of their bytes (address and length of the shared
/// allocation, which the entry keeps alive so the address cannot be reused). The
/// per-key cell lets concurrent `-p all` jobs wait for one parse instead of repeating it.
type LinkCache = HashMap<(usize, usize), (Bytes, Arc<OnceLock<Option<Arc<LinkView>>>>)>;

fn link_cache() -> &'static Mutex<LinkCache> {
    static CACHE: OnceLock<Mutex<LinkCache>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

impl ObjectView {
    /// Parses `obj`'s file (once per file per invocation; see the type's doc).
    pub fn new(obj: &LoadedObject) -> Result<ObjectView, Error> {
        let link = if obj.data.is_empty() {
            None
        } else {
            let key = (obj.data.as_ptr() as usize, obj.data.len());
            let cell = link_cache().lock().ok().map(|mut c| {
                c.entry(key)
                    .or_insert_with(|| (obj.data.clone(), Arc::default()))
                    .1
                    .clone()
            });
            match cell {
                Some(cell) => cell
                    .get_or_init(|| LinkView::parse(&obj.data).ok().map(Arc::new))
                    .clone(),
                None => LinkView::parse(&obj.data).ok().map(Arc::new),
            }
        };
        let link = match link {
            Some(l) => l,
            // Failures are not cached: parse again for the message.
            None => {
                return Err(Error::Object {
                    path: obj.path.clone(),
                    what: LinkView::parse(&obj.data)
                        .err()
                        .unwrap_or_else(|| "unparsable ELF".into()),
                })
            }
        };
        Ok(ObjectView::rebased(&link, obj.load_bias))
    }

    /// The shared tables seen at load bias `bias`.
    fn rebased(l: &LinkView, bias: u64) -> ObjectView {
        let addr = |m: &Arc<HashMap<String, u64>>| ByName::new(m.clone(), bias, u64::wrapping_add);
        ObjectView {
            sections: addr(&l.sections),
            section_sizes: ByName::new(l.section_sizes.clone(), bias, unmoved),
            symtab: ByName::new(l.symtab.clone(), bias, rebase_sym),
            dynsym: ByName::new(l.dynsym.clone(), bias, rebase_sym),
            funcs_by_addr: ByAddr::new(l.funcs_by_addr.clone(), bias),
            has_symtab: l.has_symtab,
            fdes: ByAddr::new(l.fdes.clone(), bias),
            tls: l.tls,
            tpoff_slots: addr(&l.tpoff_slots),
            tpoff_by_offset: l.tpoff_by_offset.clone(),
            bias,
            dtpmod_slots: addr(&l.dtpmod_slots),
            dtpoff_slots: addr(&l.dtpoff_slots),
            own_dtpmod_slot: l.own_dtpmod_slot.map(|s| s.wrapping_add(bias)),
        }
    }

    /// The runtime GOT slot of a symbol-less TPOFF64 relocation for TLS segment offset
    /// `off`, or else any such slot with its offset: ld.so wrote the thread-pointer
    /// offset of that variable there, and the module's static TLS block is contiguous.
    pub fn tpoff_slot_at(&self, off: u64) -> Option<(u64, u64)> {
        let (o, slot) = match self.tpoff_by_offset.get(&off) {
            Some(slot) => (off, *slot),
            None => self
                .tpoff_by_offset
                .iter()
                .min()
                .map(|(o, slot)| (*o, *slot))?,
        };
        Some((o, slot.wrapping_add(self.bias)))
    }

    /// bytes of the file at runtime address `addr` (for comparing code).
    pub fn file_bytes(obj: &LoadedObject, addr: u64, len: usize) -> Option<&[u8]> {
        let data: &[u8] = &obj.data;
        let hdr = Hdr::parse(data).ok()?;
        let e = hdr.endian().ok()?;
        let vaddr = addr.wrapping_sub(obj.load_bias);
        for ph in hdr.program_headers(e, data).ok()? {
            if ph.p_type(e) != elf::PT_LOAD {
                continue;
            }
            let (pv, po, fsz) = (ph.p_vaddr(e), ph.p_offset(e), ph.p_filesz(e));
            if vaddr >= pv && vaddr + len as u64 <= pv + fsz {
                let o = (po + vaddr - pv) as usize;
                return data.get(o..o + len);
            }
        }
        None
    }
}

impl LinkView {
    /// Parses an object file's tables at link-time addresses (bias 0).
    fn parse(data: &Bytes) -> Result<LinkView, String> {
        let bytes: &[u8] = data;
        let hdr = Hdr::parse(bytes).map_err(|e| e.to_string())?;
        let e = hdr.endian().map_err(|e| e.to_string())?;
        let secs = hdr.sections(e, bytes).map_err(|e| e.to_string())?;
        let mut sections = HashMap::with_capacity(secs.len());
        let mut section_sizes = HashMap::with_capacity(secs.len());
        let mut eh_frame = None;
        for s in secs.iter() {
            let raw = secs.section_name(e, s).unwrap_or_default();
            if raw == b".eh_frame" && eh_frame.is_none() {
                let (off, size) = (s.sh_offset(e), s.sh_size(e));
                let end = off.checked_add(size);
                if s.sh_type(e) != elf::SHT_NOBITS && end.is_some_and(|x| x <= bytes.len() as u64) {
                    eh_frame = Some((off as usize..(off + size) as usize, s.sh_addr(e)));
                }
            }
            if s.sh_flags(e) & elf::SHF_ALLOC as u64 != 0 {
                let name = String::from_utf8_lossy(raw).into_owned();
                section_sizes.insert(name.clone(), s.sh_size(e));
                sections.insert(name, s.sh_addr(e));
            }
        }
        let fdes = {
            let data = data.clone();
            Lazy {
                cell: OnceLock::new(),
                init: Box::new(move || match &eh_frame {
                    Some((r, svma)) => data
                        .get(r.clone())
                        .map(|b| fde_extents(b, *svma, 0))
                        .unwrap_or_default(),
                    None => HashMap::new(),
                }),
            }
        };
        let mut tls = None;
        if let Ok(phs) = hdr.program_headers(e, bytes) {
            for ph in phs {
                if ph.p_type(e) == elf::PT_TLS {
                    tls = Some((ph.p_memsz(e), ph.p_align(e)));
                }
            }
        }
        let mut symtab = HashMap::new();
        let mut dynsym = HashMap::new();
        let mut funcs_by_addr = HashMap::new();
        let mut has_symtab = false;
        for (kind, map_is_dyn) in [(elf::SHT_SYMTAB, false), (elf::SHT_DYNSYM, true)] {
            let Ok(tab) = secs.symbols(e, bytes, kind) else {
                continue;
            };
            if !map_is_dyn && !tab.is_empty() {
                has_symtab = true;
            }
            if map_is_dyn {
                dynsym.reserve(tab.len());
            } else {
                symtab.reserve(tab.len());
                funcs_by_addr.reserve(tab.len() / 2);
            }
            for sym in tab.iter() {
                if sym.st_shndx(e) == elf::SHN_UNDEF {
                    continue;
                }
                let t = sym.st_type();
                if t == elf::STT_SECTION || t == elf::STT_FILE {
                    continue;
                }
                let Ok(n) = tab.symbol_name(e, sym) else {
                    continue;
                };
                let name = base_name(&String::from_utf8_lossy(n)).to_string();
                if name.is_empty() {
                    continue;
                }
                let os = ObjSym {
                    addr: sym.st_value(e),
                    size: sym.st_size(e),
                    st_type: t,
                };
                if map_is_dyn {
                    if sym.st_bind() != elf::STB_LOCAL && sym.st_visibility() != elf::STV_HIDDEN {
                        dynsym.entry(name).or_insert(os);
                    }
                } else {
                    if t == elf::STT_FUNC {
                        funcs_by_addr.insert(os.addr, (name.clone(), os.size));
                    }
                    // Prefer globals over same-named locals of other files.
                    if sym.st_bind() != elf::STB_LOCAL || !symtab.contains_key(&name) {
                        symtab.insert(name, os);
                    }
                }
            }
        }
        let mut tpoff_slots = HashMap::new();
        let mut tpoff_by_offset = HashMap::new();
        let mut dtpmod_slots = HashMap::new();
        let mut dtpoff_slots = HashMap::new();
        let mut own_dtpmod_slot = None;
        // Dynamic relocations: GOT slots of TLS variables (initial- and general-dynamic).
        if let Ok(dynsyms) = secs.symbols(e, bytes, elf::SHT_DYNSYM) {
            for s in secs.iter() {
                if s.sh_flags(e) & elf::SHF_ALLOC as u64 == 0 {
                    continue;
                }
                let Ok(Some((relas, _))) = s.rela(e, bytes) else {
                    continue;
                };
                for r in relas {
                    let idx = r.r_sym(e, false) as usize;
                    let r_type = r.r_type(e, false);
                    // Relative and other relocations name no symbol we keep: skip them
                    // before decoding a name (libc has thousands of R_X86_64_RELATIVE).
                    if !matches!(
                        r_type,
                        elf::R_X86_64_TPOFF64 | elf::R_X86_64_DTPMOD64 | elf::R_X86_64_DTPOFF64
                    ) {
                        continue;
                    }
                    // No symbol (which `object` refuses to look up): a TPOFF64 is a
                    // local variable of this object, at the addend's offset in its TLS
                    // segment; a DTPMOD64 is this object's own module id.
                    if idx == 0 {
                        match r_type {
                            elf::R_X86_64_TPOFF64 => {
                                tpoff_by_offset.insert(r.r_addend(e) as u64, r.r_offset(e));
                            }
                            elf::R_X86_64_DTPMOD64 => own_dtpmod_slot = Some(r.r_offset(e)),
                            _ => {}
                        }
                        continue;
                    }
                    let Ok(sym) = dynsyms.symbol(object::SymbolIndex(idx)) else {
                        continue;
                    };
                    let name = base_name(&String::from_utf8_lossy(
                        dynsyms.symbol_name(e, sym).unwrap_or_default(),
                    ))
                    .to_string();
                    let slot = r.r_offset(e);
                    match r_type {
                        elf::R_X86_64_TPOFF64 => {
                            tpoff_slots.insert(name, slot);
                        }
                        elf::R_X86_64_DTPMOD64 => {
                            if sym.st_shndx(e) != elf::SHN_UNDEF && own_dtpmod_slot.is_none() {
                                own_dtpmod_slot = Some(slot);
                            }
                            if !name.is_empty() {
                                dtpmod_slots.insert(name, slot);
                            }
                        }
                        elf::R_X86_64_DTPOFF64 if !name.is_empty() => {
                            dtpoff_slots.insert(name, slot);
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(LinkView {
            sections: Arc::new(sections),
            section_sizes: Arc::new(section_sizes),
            symtab: Arc::new(symtab),
            dynsym: Arc::new(dynsym),
            funcs_by_addr: Arc::new(Lazy::ready(funcs_by_addr)),
            has_symtab,
            fdes: Arc::new(fdes),
            tls,
            tpoff_slots: Arc::new(tpoff_slots),
            tpoff_by_offset: Arc::new(tpoff_by_offset),
            dtpmod_slots: Arc::new(dtpmod_slots),
            dtpoff_slots: Arc::new(dtpoff_slots),
            own_dtpmod_slot,
        })
    }
}

/// Every FDE's (runtime start, length) in an `.eh_frame` at link address `svma`.
fn fde_extents(bytes: &[u8], svma: u64, bias: u64) -> HashMap<u64, u64> {
    use gimli::UnwindSection;
    // About one FDE per 40 bytes of .eh_frame: reserve once instead of rehashing.
    let mut out = HashMap::with_capacity(bytes.len() / 40);
    let mut eh = gimli::EhFrame::new(bytes, gimli::LittleEndian);
    eh.set_address_size(8);
    let bases = gimli::BaseAddresses::default().set_eh_frame(svma);
    let mut entries = eh.entries(&bases);
    while let Ok(Some(entry)) = entries.next() {
        if let gimli::CieOrFde::Fde(partial) = entry {
            if let Ok(fde) = partial.parse(gimli::EhFrame::cie_from_offset) {
                out.insert(fde.initial_address().wrapping_add(bias), fde.len());
            }
        }
    }
    out
}

/// How a patch symbol resolves.
#[derive(Debug, Clone, Copy)]
enum SymVal {
    /// Offset inside the region (patch sections).
    Region(u64),
    /// An absolute address inside the original object (local).
    Local(u64),
    /// An absolute address elsewhere (another library): reached via jump-table entry.
    External(u64),
    /// A TLS variable with its thread-pointer offset.
    Tls(i64),
    /// Absolute value (SHN_ABS).
    Abs(u64),
}

/// A patch laid out and resolved, waiting for a base address.
pub struct Layout {
    /// Total region size (page multiple).
    pub size: u64,
    /// Length of the read+exec part (header, code, read-only data, jump table).
    pub exec_len: u64,
    header_len: u64,
    /// Section index → region offset of loaded sections.
    sec_off: HashMap<usize, u64>,
    syms: Vec<Option<SymVal>>,
    sym_names: Vec<String>,
    /// Jump-table slot per symbol index that needs one.
    slots: HashMap<usize, usize>,
    jt_off: u64,
    info_sec: Option<usize>,
    eh_frame_sec: Option<(usize, u64)>,
}

/// A relocated region image, its hunks (saved bytes not yet filled) and the
/// location and length of the patch's relocated `.eh_frame`, if any.
pub type Relocated = (Vec<u8>, Vec<Hunk>, Option<(u64, u64)>);

/// Where the patch's code lies in the region, and where its functions start.
#[derive(Default)]
struct PatchCode {
    /// (section index, region addresses) of each `.kpatch.text*` section.
    ranges: Vec<(usize, std::ops::Range<u64>)>,
    /// Region addresses where a function of the patch starts.
    starts: std::collections::HashSet<u64>,
}

impl PatchCode {
    /// A hunk's new body must be a whole function of the patch code: the jump written
    /// into the target lands at `saddr`, so anything else executes garbage.
    fn check_new_body(&self, name: &str, saddr: u64, slen: u32) -> Result<(), String> {
        let Some((_, r)) = self.ranges.iter().find(|(_, r)| r.contains(&saddr)) else {
            return Err(format!(
                "new body of {name} at {saddr:#x} is not in the patch's .kpatch.text"
            ));
        };
        if !self.starts.contains(&saddr) {
            return Err(format!(
                "new body of {name} at {saddr:#x} is not the start of a function of the \
                 patch (no FUNC symbol or .eh_frame FDE starts there)"
            ));
        }
        if saddr + u64::from(slen) > r.end {
            return Err(format!(
                "new body of {name} at {saddr:#x} ({slen} bytes) runs past the end of \
                 .kpatch.text at {:#x}",
                r.end
            ));
        }
        Ok(())
    }
}

/// One relocation, decoded.
struct Reloc {
    target_sec: usize,
    offset: u64,
    r_type: u32,
    sym: usize,
    addend: i64,
}

/// The parsed patch ELF.
pub struct PatchElf<'a> {
    data: &'a [u8],
    secs: Vec<(String, &'a Shdr)>,
    syms: Vec<(String, &'a Sym)>,
    relocs: Vec<Reloc>,
}

fn is_loaded(name: &str, s: &Shdr) -> bool {
    let e = LE;
    let alloc = s.sh_flags(e) & elf::SHF_ALLOC as u64 != 0;
    let ty = s.sh_type(e);
    alloc
        && ((ty == elf::SHT_PROGBITS && s.sh_size(e) > 0)
            || (ty == elf::SHT_NOBITS && name.starts_with(".kpatch")))
}

impl<'a> PatchElf<'a> {
    /// Parses and validates the patch's relocatable ELF.
    pub fn parse(patch: &'a Patch) -> Result<PatchElf<'a>, Error> {
        let data = &patch.elf[..];
        let bad = |what: String| Error::BadPatch {
            path: patch.source.clone(),
            what,
        };
        let hdr = Hdr::parse(data).map_err(|e| bad(format!("ELF header: {e}")))?;
        let e = LE;
        if hdr.e_machine(e) != elf::EM_X86_64 {
            return Err(bad(format!("e_machine {} is not x86_64", hdr.e_machine(e))));
        }
        let st = hdr.sections(e, data).map_err(|er| {
            bad(format!(
                "section headers (e_shoff {:#x}): {er}",
                hdr.e_shoff(e)
            ))
        })?;
        let mut secs = Vec::new();
        for s in st.iter() {
            // Escaped: names reach the terminal in messages (a compiler's are unchanged).
            let name = kpatch_file::printable(
                st.section_name(e, s)
                    .map_err(|er| bad(format!("section name: {er}")))?,
            );
            if s.sh_type(e) != elf::SHT_NOBITS {
                let end = s.sh_offset(e).checked_add(s.sh_size(e));
                if end.is_none_or(|end| end > data.len() as u64) {
                    return Err(bad(format!(
                        "section {name}: offset {:#x} size {:#x} beyond the file",
                        s.sh_offset(e),
                        s.sh_size(e)
                    )));
                }
            }
            if s.sh_flags(e) & elf::SHF_TLS as u64 != 0 && is_loaded(&name, s) {
                return Err(bad(format!(
                    "section {name}: new thread-local variables are not supported"
                )));
            }
            secs.push((name, s));
        }
        let symtab = st
            .symbols(e, data, elf::SHT_SYMTAB)
            .map_err(|er| bad(format!("symbol table: {er}")))?;
        if symtab.is_empty() {
            return Err(bad("no symbol table".into()));
        }
        let mut syms = Vec::new();
        for sym in symtab.iter() {
            let name = kpatch_file::printable(
                symtab
                    .symbol_name(e, sym)
                    .map_err(|er| bad(format!("symbol name: {er}")))?,
            );
            let shndx = sym.st_shndx(e) as usize;
            if shndx != 0 && shndx < elf::SHN_LORESERVE as usize && shndx >= secs.len() {
                return Err(bad(format!(
                    "symbol {name}: section index {shndx} out of range"
                )));
            }
            syms.push((name, sym));
        }
        let mut relocs = Vec::new();
        for (name, s) in secs.iter() {
            if s.sh_type(e) == elf::SHT_REL {
                return Err(bad(format!(
                    "{name}: SHT_REL relocations are not supported"
                )));
            }
            if s.sh_type(e) != elf::SHT_RELA {
                continue;
            }
            let target = s.sh_info(e) as usize;
            let Some((tname, ts)) = secs.get(target) else {
                return Err(bad(format!("{name}: sh_info {target} is not a section")));
            };
            let (relas, _) = s
                .rela(e, data)
                .map_err(|er| bad(format!("{name}: {er}")))?
                .ok_or_else(|| bad(format!("{name}: not RELA")))?;
            if !is_loaded(tname, ts) {
                // Relocations of a section we do not load are only harmless if nothing
                // expects it loaded: debug sections, or entries that change nothing.
                let alloc = ts.sh_flags(e) & elf::SHF_ALLOC as u64 != 0;
                let live = relas
                    .iter()
                    .any(|r| r.r_type(e, false) != elf::R_X86_64_NONE);
                if (target != 0 && !alloc) || !live {
                    continue;
                }
                return Err(bad(format!(
                    "{name}: relocations for section {target} ({tname}), which is not loaded \
                     (sh_info): they would be skipped; rebuild the patch"
                )));
            }
            for r in relas {
                // R_X86_64_NONE changes nothing and names symbol 0: `ld -q` leaves them
                // where it dropped an FDE's target (jemalloc's `.rela.eh_frame`), and
                // LibCare's and LibcarePlus' patches carry them through strip.
                if r.r_type(e, false) == elf::R_X86_64_NONE {
                    continue;
                }
                let sym = r.r_sym(e, false) as usize;
                if sym >= syms.len() {
                    return Err(bad(format!("{name}: symbol index {sym} out of range")));
                }
                let offset = r.r_offset(e);
                if offset >= ts.sh_size(e) {
                    return Err(bad(format!(
                        "{name}: r_offset {offset:#x} outside {tname} (size {:#x})",
                        ts.sh_size(e)
                    )));
                }
                relocs.push(Reloc {
                    target_sec: target,
                    offset,
                    r_type: r.r_type(e, false),
                    sym,
                    addend: r.r_addend(e),
                });
            }
        }
        if !secs.iter().any(|(n, _)| n == ".kpatch.info") {
            return Err(bad("no .kpatch.info section".into()));
        }
        let pe = PatchElf {
            data,
            secs,
            syms,
            relocs,
        };
        Ok(pe)
    }

    /// Whether a relocation of the patch needs a TLS variable's thread-pointer offset.
    pub fn has_tls_relocations(&self) -> bool {
        self.relocs.iter().any(|r| Native::is_tls(r.r_type))
    }

    /// Lays out the region and resolves every symbol that does not depend on it.
    pub fn layout(
        &self,
        patch: &Patch,
        target: &LoadedObject,
        view: &ObjectView,
        objects: &[(LoadedObject, ObjectView)],
        call_resolver: &mut dyn FnMut(u64) -> Result<u64, Error>,
        mem: &TlsMemory<'_>,
    ) -> Result<Layout, Error> {
        let e = LE;
        let bad = |what: String| Error::BadPatch {
            path: patch.source.clone(),
            what,
        };
        let info_sec = self.secs.iter().position(|(n, _)| n == ".kpatch.info");
        let strtab_len = self
            .secs
            .iter()
            .find(|(n, _)| n == ".kpatch.strtab")
            .map(|(_, s)| s.sh_size(e))
            .unwrap_or(0);
        let max_hunks = info_sec
            .map(|i| self.secs[i].1.sh_size(e) as usize / KPATCH_INFO_LEN + 1)
            .unwrap_or(0);
        let header_len =
            RegionHeader::encoded_len(max_hunks, strtab_len as usize + 64 * max_hunks) as u64;

        // Symbols needing a jump-table slot: undefined, TLS, or GOT-relative referenced.
        let mut slots = HashMap::new();
        for r in &self.relocs {
            let sym = self.syms[r.sym].1;
            let needs = sym.st_shndx(e) == elf::SHN_UNDEF && r.sym != 0
                || Native::needs_got(r.r_type)
                || r.r_type == elf::R_X86_64_GOTTPOFF;
            if needs && !slots.contains_key(&r.sym) {
                let n = slots.len();
                slots.insert(r.sym, n);
            }
        }

        // Sections: read+exec part first (after the header), then writable data on its own pages.
        let mut sec_off = HashMap::new();
        let mut off = header_len;
        for pass_writable in [false, true] {
            if pass_writable {
                off = align(off + (slots.len() * Native::JUMP_TABLE_ENTRY) as u64, PAGE);
            }
            for (i, (name, s)) in self.secs.iter().enumerate() {
                if !is_loaded(name, s) {
                    continue;
                }
                let writable = s.sh_flags(e) & elf::SHF_WRITE as u64 != 0;
                if writable != pass_writable {
                    continue;
                }
                off = align(off, s.sh_addralign(e).clamp(1, PAGE));
                sec_off.insert(i, off);
                off += s.sh_size(e);
            }
            if !pass_writable {
                off = align(off, 16);
            }
        }
        // The jump table sits right after the read+exec sections.
        let exec_end_no_jt = {
            let mut m = header_len;
            for (i, o) in &sec_off {
                let s = self.secs[*i].1;
                if s.sh_flags(e) & elf::SHF_WRITE as u64 == 0 {
                    m = m.max(o + s.sh_size(e));
                }
            }
            align(m, 16)
        };
        let jt_off = exec_end_no_jt;
        let exec_len = align(
            jt_off + (slots.len() * Native::JUMP_TABLE_ENTRY) as u64,
            PAGE,
        );
        let size = align(off.max(exec_len), PAGE);

        // Resolve symbols.
        let mut syms = Vec::with_capacity(self.syms.len());
        let mut names = Vec::with_capacity(self.syms.len());
        for (idx, (name, sym)) in self.syms.iter().enumerate() {
            names.push(name.clone());
            if idx == 0 {
                syms.push(None);
                continue;
            }
            let shndx = sym.st_shndx(e);
            let ty = sym.st_type();
            let val = sym.st_value(e);
            let bname = base_name(name);
            let resolved = if shndx == elf::SHN_ABS {
                Some(SymVal::Abs(val))
            } else if shndx == elf::SHN_UNDEF {
                if !slots.contains_key(&idx) && !self.relocs.iter().any(|r| r.sym == idx) {
                    None
                } else {
                    Some(resolve_undefined(bname, view, objects, call_resolver).map_err(bad)?)
                }
            } else if shndx >= elf::SHN_LORESERVE {
                return Err(bad(format!(
                    "symbol {name}: unsupported section index {shndx:#x}"
                )));
            } else if let Some(o) = sec_off.get(&(shndx as usize)) {
                if ty != elf::STT_SECTION {
                    // Same for the patch's own sections: outside them lies other
                    // patch data, the jump table or unmapped memory.
                    let (sname, s) = &self.secs[shndx as usize];
                    let (sec_size, st_size) = (s.sh_size(e), sym.st_size(e));
                    if val.checked_add(st_size).is_none_or(|end| end > sec_size) {
                        return Err(bad(format!(
                            "symbol {name}: st_value {val:#x} st_size {st_size:#x} \
                             lies outside the patch's {sname} (size {sec_size:#x})"
                        )));
                    }
                    // A global the target already defines cannot be new in the patch
                    // (the patched program would not link): its symbol was moved here,
                    // and the patch would use its own copy instead of the target's.
                    let global = sym.st_bind() != elf::STB_LOCAL;
                    let ours = view.symtab.get(bname).or_else(|| view.dynsym.get(bname));
                    if let (true, false, Some(t)) = (global, name.contains('@'), ours) {
                        if t.st_type != elf::STT_TLS && !name.is_empty() {
                            return Err(bad(format!(
                                "symbol {name}: the patch defines it in its own {sname}, but \
                                 {} already defines it at {:#x}: a symbol of the target was \
                                 moved into the patch (st_shndx) or the patch was forged; \
                                 rebuild the patch",
                                target.path, t.addr
                            )));
                        }
                    }
                }
                Some(SymVal::Region(if ty == elf::STT_SECTION {
                    *o
                } else {
                    o + val
                }))
            } else {
                let (sname, _) = &self.secs[shndx as usize];
                if ty == elf::STT_TLS || sname.starts_with(".tbss") || sname.starts_with(".tdata") {
                    Some(resolve_tls(name, ty, sname, target, view, mem).map_err(bad)?)
                } else if name.contains('@') && ty != elf::STT_SECTION {
                    // A versioned import the patched binary copy-relocated into its own
                    // .bss: the original has it only if it imported it too.
                    Some(resolve_undefined(bname, view, objects, call_resolver).map_err(bad)?)
                } else {
                    let base = view.sections.get(sname).ok_or_else(|| {
                        bad(format!(
                            "symbol {name}: section {sname} does not exist in {}",
                            target.path
                        ))
                    })?;
                    if ty != elf::STT_SECTION {
                        // The patch code reads and writes this symbol: it must lie in
                        // the object's section, or the patch corrupts whatever follows.
                        let sec_size = view.section_sizes.get(sname).unwrap_or(0);
                        let st_size = sym.st_size(e);
                        if val.checked_add(st_size).is_none_or(|end| end > sec_size) {
                            return Err(bad(format!(
                                "symbol {name}: st_value {val:#x} st_size {st_size:#x} \
                                 lies outside {sname} of {} (size {sec_size:#x})",
                                target.path
                            )));
                        }
                        // Resolved by name: it must be the target's symbol of that name,
                        // as function entries are checked, or a patch built from another
                        // binary reads and writes whatever lies there.
                        let want = ObjSym {
                            addr: base.wrapping_add(val),
                            size: st_size,
                            st_type: ty,
                        };
                        check_placed_symbol(name, sname, base, want, target, view).map_err(bad)?;
                        if ty == elf::STT_GNU_IFUNC {
                            // The symbol's address is the resolver: the code wants what
                            // it picks, as the original got from ld.so through its PLT.
                            let real =
                                resolve_ifunc(bname, target, &want, call_resolver).map_err(bad)?;
                            syms.push(Some(if target.contains(real) {
                                SymVal::Local(real)
                            } else {
                                SymVal::External(real)
                            }));
                            continue;
                        }
                    }
                    Some(SymVal::Local(if ty == elf::STT_SECTION {
                        base
                    } else {
                        base.wrapping_add(val)
                    }))
                }
            };
            syms.push(resolved);
        }
        let eh_frame_sec = self
            .secs
            .iter()
            .enumerate()
            .find(|(i, (n, _))| {
                (n == ".eh_frame" || n == ".kpatch.eh_frame") && sec_off.contains_key(i)
            })
            .map(|(i, (_, s))| (i, s.sh_size(e)));
        Ok(Layout {
            size,
            exec_len,
            header_len,
            sec_off,
            syms,
            sym_names: names,
            slots,
            jt_off,
            info_sec,
            eh_frame_sec,
        })
    }

    /// Builds the region image at `base`: sections, jump table, relocations; returns
    /// the image (header area left zero) and the hunks (saved bytes not yet filled).
    pub fn relocate(&self, lay: &Layout, base: u64) -> Result<Relocated, String> {
        let e = LE;
        let mut image = vec![0u8; lay.size as usize];
        for (i, o) in &lay.sec_off {
            let s = self.secs[*i].1;
            if s.sh_type(e) == elf::SHT_NOBITS {
                continue;
            }
            let src = &self.data[s.sh_offset(e) as usize..(s.sh_offset(e) + s.sh_size(e)) as usize];
            image[*o as usize..*o as usize + src.len()].copy_from_slice(src);
        }
        let abs = |v: &SymVal| -> (u64, bool) {
            match *v {
                SymVal::Region(o) => (base + o, true),
                SymVal::Local(a) => (a, true),
                SymVal::External(a) => (a, false),
                SymVal::Tls(_) => (0, false),
                SymVal::Abs(a) => (a, true),
            }
        };
        // Jump table: entries jump to (and slots hold) the symbol's address, or the TLS offset.
        for (sym, slot) in &lay.slots {
            let o = (lay.jt_off + (*slot * Native::JUMP_TABLE_ENTRY) as u64) as usize;
            let entry = match lay.syms[*sym] {
                Some(SymVal::Tls(t)) => Native::jump_table_entry(t as u64),
                Some(ref v) => Native::jump_table_entry(abs(v).0),
                None => return Err(format!("symbol {} unresolved", lay.sym_names[*sym])),
            };
            image[o..o + entry.len()].copy_from_slice(&entry);
        }
        for r in &self.relocs {
            let sec_o = lay.sec_off[&r.target_sec];
            let place = (sec_o + r.offset) as usize;
            let val = lay.syms[r.sym].as_ref().ok_or_else(|| {
                format!(
                    "relocation {} at {}+{:#x} against unresolved symbol {} (#{}); \
                     rebuild the patch",
                    Native::reloc_name(r.r_type),
                    self.secs[r.target_sec].0,
                    r.offset,
                    lay.sym_names[r.sym],
                    r.sym
                )
            })?;
            let (s, local) = abs(val);
            let slot_addr = lay.slots.get(&r.sym).map(|n| {
                base + lay.jt_off + (*n * Native::JUMP_TABLE_ENTRY + Native::JUMP_TABLE_SLOT) as u64
            });
            let tpoff = match val {
                SymVal::Tls(t) => Some(*t),
                _ => None,
            };
            let input = RelocInput {
                s,
                a: r.addend,
                p: base + sec_o + r.offset,
                local,
                got: slot_addr,
                tpoff,
                tpoff_slot: if tpoff.is_some() { slot_addr } else { None },
            };
            if Native::is_tls(r.r_type) && tpoff.is_none() {
                return Err(format!(
                    "{} against non-TLS symbol {}",
                    Native::reloc_name(r.r_type),
                    lay.sym_names[r.sym]
                ));
            }
            // Only the target section is writable to the relocation: a field that
            // spills past its end would overwrite the next section.
            let sec_end = (sec_o + self.secs[r.target_sec].1.sh_size(e)) as usize;
            let sec_image = image
                .get_mut(..sec_end)
                .ok_or("section beyond the region")?;
            Native::apply(sec_image, place, r.r_type, &input).map_err(|m| {
                format!(
                    "{} at {}+{:#x} (symbol {}): {m}",
                    Native::reloc_name(r.r_type),
                    self.secs[r.target_sec].0,
                    r.offset,
                    lay.sym_names[r.sym]
                )
            })?;
        }
        // Hunks from the relocated .kpatch.info.
        let code = self.patch_code(lay, base, &image);
        let mut hunks = Vec::new();
        if let Some(i) = lay.info_sec {
            let o = lay
                .sec_off
                .get(&i)
                .copied()
                .ok_or(".kpatch.info not loaded")? as usize;
            let len = self.secs[i].1.sh_size(e) as usize;
            let rd64 =
                |a: usize| u64::from_le_bytes(image[a..a + 8].try_into().unwrap_or_default());
            let rd32 =
                |a: usize| u32::from_le_bytes(image[a..a + 4].try_into().unwrap_or_default());
            let mut p = o;
            while p + KPATCH_INFO_LEN <= o + len {
                let (daddr, saddr) = (rd64(p), rd64(p + 8));
                if daddr == 0 {
                    // A patch linked from several objects carries one zero-terminated
                    // array per object: skip terminators instead of stopping at the first.
                    p += KPATCH_INFO_LEN;
                    continue;
                }
                let (dlen, slen, symstr) = (rd32(p + 16), rd32(p + 20), rd64(p + 24));
                let name = symstr
                    .checked_sub(base)
                    .and_then(|so| image.get(so as usize..))
                    .map(|s| {
                        let end = s.iter().position(|&c| c == 0).unwrap_or(0).min(200);
                        // Printed by patch, info and unpatch: escape what does not print.
                        kpatch_file::printable(&s[..end])
                    })
                    .unwrap_or_default();
                let name = name.strip_suffix(".kpatch").unwrap_or(&name).to_string();
                if (dlen as usize) < Native::JUMP_LEN {
                    return Err(format!(
                        "function {name} is {dlen} bytes, too short for a {}-byte jump",
                        Native::JUMP_LEN
                    ));
                }
                if !(base..base + lay.size).contains(&saddr) {
                    return Err(format!(
                        "new body of {name} at {saddr:#x} is not in the patch"
                    ));
                }
                code.check_new_body(&name, saddr, slen)?;
                hunks.push(Hunk {
                    daddr,
                    saddr,
                    dlen,
                    slen,
                    saved: [0; SAVED_LEN],
                    name,
                    call_sites: Vec::new(),
                });
                p += KPATCH_INFO_LEN;
            }
        }
        if hunks.is_empty() {
            return Err("the patch has no hunks in .kpatch.info".into());
        }
        // One jump per function: a second one would overwrite the first, save the first
        // jump as "original" bytes, and make the patch impossible to remove.
        let mut by_addr: Vec<&Hunk> = hunks.iter().collect();
        by_addr.sort_by_key(|h| h.daddr);
        for w in by_addr.windows(2) {
            let (a, b) = (w[0], w[1]);
            if b.daddr < a.daddr.saturating_add(u64::from(a.dlen)) {
                return Err(format!(
                    "two .kpatch.info records replace overlapping code: {} at {:#x} ({} bytes) \
                     and {} at {:#x} ({} bytes); a patch may replace each function only once, \
                     rebuild the patch",
                    a.name, a.daddr, a.dlen, b.name, b.daddr, b.dlen
                ));
            }
        }
        let eh = lay
            .eh_frame_sec
            .map(|(i, len)| (base + lay.sec_off[&i], len));
        Ok((image, hunks, eh))
    }

    /// The patch's code sections in the region at `base` and the function starts in
    /// them (FUNC symbols, FDEs of the relocated `.eh_frame`, section starts).
    fn patch_code(&self, lay: &Layout, base: u64, image: &[u8]) -> PatchCode {
        let e = LE;
        let mut code = PatchCode::default();
        for (i, (name, s)) in self.secs.iter().enumerate() {
            let is_code = name == ".kpatch.text" || name.starts_with(".kpatch.text.");
            if !is_code || s.sh_flags(e) & elf::SHF_EXECINSTR as u64 == 0 {
                continue;
            }
            let Some(o) = lay.sec_off.get(&i) else {
                continue;
            };
            let start = base + o;
            code.ranges.push((i, start..start + s.sh_size(e)));
            code.starts.insert(start);
        }
        for (_, sym) in &self.syms {
            if sym.st_type() != elf::STT_FUNC {
                continue;
            }
            let shndx = sym.st_shndx(e) as usize;
            if let Some((_, r)) = code.ranges.iter().find(|(i, _)| *i == shndx) {
                if let Some(a) = r.start.checked_add(sym.st_value(e)) {
                    code.starts.insert(a);
                }
            }
        }
        if let Some((i, len)) = lay.eh_frame_sec {
            let o = lay.sec_off[&i];
            if let Some(bytes) = image.get(o as usize..(o + len) as usize) {
                code.starts
                    .extend(fde_extents(bytes, base + o, 0).into_keys());
            }
        }
        code
    }

    /// Length of the header area at the start of the region.
    pub fn header_len(lay: &Layout) -> u64 {
        lay.header_len
    }

    /// The (original address, length) each `.kpatch.info` record names, from the
    /// resolved symbols alone (independent of the region's base), so call sites can
    /// be counted and the header sized before the region is mapped. [`Self::relocate`]
    /// stays the authority on the hunks; this is only used for sizing and lookup.
    pub fn hunk_targets(&self, lay: &Layout) -> Vec<(u64, u32)> {
        let e = LE;
        let Some(i) = lay.info_sec else {
            return Vec::new();
        };
        let s = self.secs[i].1;
        let raw = if s.sh_type(e) == elf::SHT_NOBITS {
            &[][..]
        } else {
            let o = s.sh_offset(e) as usize;
            self.data
                .get(o..o + s.sh_size(e) as usize)
                .unwrap_or_default()
        };
        let rd = |a: usize, n: usize| -> u64 {
            raw.get(a..a + n).map_or(0, |b| {
                let mut w = [0u8; 8];
                w[..n].copy_from_slice(b);
                u64::from_le_bytes(w)
            })
        };
        let mut out = Vec::new();
        for rec in (0..raw.len() / KPATCH_INFO_LEN).map(|k| k * KPATCH_INFO_LEN) {
            let reloc = self.relocs.iter().find(|r| {
                r.target_sec == i && r.offset == rec as u64 && r.r_type == elf::R_X86_64_64
            });
            let daddr = match reloc.map(|r| (lay.syms[r.sym], r.addend)) {
                Some((Some(SymVal::Local(a) | SymVal::Abs(a)), add)) => a.wrapping_add(add as u64),
                Some(_) => continue, // not an address in the object
                None => rd(rec, 8),
            };
            if daddr != 0 {
                out.push((daddr, rd(rec + 16, 4) as u32));
            }
        }
        out
    }
}

impl Layout {
    /// Makes the header area `extra` bytes longer (call-site records, counted only
    /// once the symbols are resolved). If the gap before the first section is too
    /// small, everything after the header moves by whole pages, which keeps every
    /// section's alignment (layout clamps alignments to a page).
    pub fn grow_header(&mut self, extra: u64) {
        let want = align(self.header_len + extra, 16);
        let first = self
            .sec_off
            .values()
            .copied()
            .chain(std::iter::once(self.jt_off))
            .min()
            .unwrap_or(self.jt_off);
        if want > first {
            let shift = align(want - first, PAGE);
            for o in self.sec_off.values_mut() {
                *o += shift;
            }
            for s in self.syms.iter_mut().flatten() {
                if let SymVal::Region(o) = s {
                    *o += shift;
                }
            }
            self.jt_off += shift;
            self.exec_len += shift;
            self.size += shift;
        }
        self.header_len = want;
    }
}

/// Every definition of `name` in the target's `.symtab` (several for a name that is
/// static in more than one file), at runtime addresses. A scan of the whole table: only
/// done when the one definition [`ObjectView::symtab`] keeps does not match.
fn target_definitions(target: &LoadedObject, name: &str) -> Vec<ObjSym> {
    let mut out = Vec::new();
    let data: &[u8] = &target.data;
    let Ok(hdr) = Hdr::parse(data) else {
        return out;
    };
    let Ok(e) = hdr.endian() else { return out };
    let Ok(secs) = hdr.sections(e, data) else {
        return out;
    };
    let Ok(tab) = secs.symbols(e, data, elf::SHT_SYMTAB) else {
        return out;
    };
    for sym in tab.iter() {
        if sym.st_shndx(e) == elf::SHN_UNDEF {
            continue;
        }
        let Ok(n) = tab.symbol_name(e, sym) else {
            continue;
        };
        if std::str::from_utf8(n).is_ok_and(|n| base_name(n) == name) {
            out.push(ObjSym {
                addr: sym.st_value(e).wrapping_add(target.load_bias),
                size: sym.st_size(e),
                st_type: sym.st_type(),
            });
        }
    }
    out
}

fn symbol_type_name(t: u8) -> String {
    match t {
        elf::STT_NOTYPE => "NOTYPE".into(),
        elf::STT_OBJECT => "OBJECT".into(),
        elf::STT_FUNC => "FUNC".into(),
        elf::STT_TLS => "TLS".into(),
        elf::STT_GNU_IFUNC => "IFUNC".into(),
        t => format!("type {t}"),
    }
}

/// Checks a symbol the patch places at `want` in the target's section `sname` (runtime
/// address `base`) against the target's own symbol of that name: same place in the
/// section, same size, same type. Without a `.symtab` the exported symbols are the only
/// reference; a name found in neither cannot be checked.
fn check_placed_symbol(
    name: &str,
    sname: &str,
    base: u64,
    want: ObjSym,
    target: &LoadedObject,
    view: &ObjectView,
) -> Result<(), String> {
    let bname = base_name(name);
    if bname.is_empty() {
        return Ok(()); // nothing to look up; resolved by section alone
    }
    let same = |s: &ObjSym| s.addr == want.addr && s.size == want.size && s.st_type == want.st_type;
    // The definition the tables keep (a global before same-named locals) nearly always
    // is the one; only a mismatch costs a scan for the other definitions.
    let table = if view.has_symtab {
        view.symtab.get(bname)
    } else {
        view.dynsym.get(bname)
    };
    if table.as_ref().is_some_and(same) || (!view.has_symtab && table.is_none()) {
        return Ok(());
    }
    let candidates = if view.has_symtab {
        target_definitions(target, bname)
    } else {
        table.into_iter().collect()
    };
    if candidates.iter().any(same) {
        return Ok(());
    }
    let describe = |s: &ObjSym| {
        let off = s.addr.wrapping_sub(base) as i64;
        format!(
            "{sname}{off:+#x} ({} bytes, {})",
            s.size,
            symbol_type_name(s.st_type)
        )
    };
    let has = if candidates.is_empty() {
        "no symbol of that name".to_string()
    } else {
        let all: Vec<String> = candidates.iter().map(describe).collect();
        format!("it at {}", all.join(", "))
    };
    Err(format!(
        "symbol {name}: the patch expects it at {}, but {} has {has}: the patch was built \
         from another binary (its build-id may have been forged); build the patch from the \
         sources of this binary",
        describe(&want),
        target.path
    ))
}

fn resolve_undefined(
    name: &str,
    view: &ObjectView,
    objects: &[(LoadedObject, ObjectView)],
    call_resolver: &mut dyn FnMut(u64) -> Result<u64, Error>,
) -> Result<SymVal, String> {
    if let Some(s) = view.symtab.get(name).or_else(|| view.dynsym.get(name)) {
        if s.st_type == elf::STT_TLS {
            return Err(format!("TLS symbol {name} referenced as undefined"));
        }
        if s.st_type != elf::STT_GNU_IFUNC {
            return Ok(SymVal::Local(s.addr));
        }
    }
    // The executable first, then libraries in load order, like the dynamic linker.
    let mut order: Vec<&(LoadedObject, ObjectView)> = objects
        .iter()
        .filter(|(o, _)| o.kind == livecare_process::ElfKind::Executable)
        .collect();
    order.extend(
        objects
            .iter()
            .filter(|(o, _)| o.kind != livecare_process::ElfKind::Executable),
    );
    for (o, v) in order {
        let Some(s) = v.dynsym.get(name) else {
            continue;
        };
        if s.st_type == elf::STT_TLS {
            let slot = v.tpoff_slots.get(name);
            return Err(format!(
                "TLS symbol {name} of {} (slot {slot:?}) cannot be imported",
                o.path
            ));
        }
        if s.st_type == elf::STT_GNU_IFUNC {
            return resolve_ifunc(name, o, &s, call_resolver).map(SymVal::External);
        }
        return Ok(SymVal::External(s.addr));
    }
    Err(format!(
        "undefined symbol {name} not found in any loaded object"
    ))
}

/// The implementation IFUNC `name` of `o` (resolver `s`) picks for this CPU: the
/// resolver runs here when livecare has loaded the same object itself, else in the
/// target.
fn resolve_ifunc(
    name: &str,
    o: &LoadedObject,
    s: &ObjSym,
    call_resolver: &mut dyn FnMut(u64) -> Result<u64, Error>,
) -> Result<u64, String> {
    if let Some(real) = crate::ifunc::resolve_locally(name, o, s) {
        return Ok(real);
    }
    call_resolver(s.addr).map_err(|e| format!("IFUNC resolver of {name} in {}: {e}", o.path))
}

/// What TLS resolution reads from the stopped target.
pub struct TlsMemory<'m> {
    /// Reads 8 bytes of the target's memory.
    pub read_u64: &'m dyn Fn(u64) -> Option<u64>,
    /// The thread pointer (`fs_base`) of every stopped thread.
    pub thread_pointers: &'m [u64],
}

fn resolve_tls(
    name: &str,
    ty: u8,
    sname: &str,
    target: &LoadedObject,
    view: &ObjectView,
    mem: &TlsMemory<'_>,
) -> Result<SymVal, String> {
    let read_u64 = mem.read_u64;
    let bname = base_name(name);
    if target.kind == livecare_process::ElfKind::Executable {
        let (memsz, al) = view
            .tls
            .ok_or_else(|| format!("{} has no TLS segment for {name}", target.path))?;
        let block = align(memsz, al);
        let seg_off = if ty == elf::STT_SECTION {
            // Section symbol: offset of the section inside the TLS segment.
            let tdata = view.sections.get(".tdata");
            let tbss = view.sections.get(".tbss");
            let seg = [tdata, tbss]
                .into_iter()
                .flatten()
                .min()
                .ok_or("no .tdata/.tbss")?;
            view.sections
                .get(sname)
                .ok_or_else(|| format!("no section {sname}"))?
                - seg
        } else {
            view.symtab
                .get(bname)
                .filter(|s| s.st_type == elf::STT_TLS)
                .map(|s| s.addr)
                .ok_or_else(|| format!("TLS symbol {name} not in {}", target.path))?
        };
        return Ok(SymVal::Tls(seg_off as i64 - block as i64));
    }
    // A library's static TLS offset is only known at run time: take it from the
    // library's own GOT slot (initial-exec TPOFF64), which ld.so has filled.
    if let Some(slot) = view.tpoff_slots.get(bname) {
        let v = read_u64(slot)
            .ok_or_else(|| format!("reading the TLS offset of {name} at {slot:#x}"))?;
        return Ok(SymVal::Tls(v as i64));
    }
    // A local (`static __thread`) variable: its slot's relocation names no symbol and
    // is found by the variable's offset in the TLS segment.
    if let Some(off) = tls_segment_offset(bname, ty, sname, view) {
        if let Some((o, slot)) = view.tpoff_slot_at(off) {
            let v = read_u64(slot)
                .ok_or_else(|| format!("reading the TLS offset of {name} at {slot:#x}"))?;
            return Ok(SymVal::Tls((v.wrapping_sub(o).wrapping_add(off)) as i64));
        }
    }
    if ty == elf::STT_SECTION {
        return Err(format!(
            "TLS section {sname} of library {} has no initial-exec GOT slot to read its offset from",
            target.path
        ));
    }
    static_tls_offset(name, target, view, mem).map(SymVal::Tls)
}

/// Offset of TLS symbol `bname` (or of TLS section `sname`, for a section symbol) in
/// the TLS segment of `view`'s object.
fn tls_segment_offset(bname: &str, ty: u8, sname: &str, view: &ObjectView) -> Option<u64> {
    if ty == elf::STT_SECTION {
        let seg = [view.sections.get(".tdata"), view.sections.get(".tbss")]
            .into_iter()
            .flatten()
            .min()?;
        return view.sections.get(sname)?.checked_sub(seg);
    }
    view.symtab
        .get(bname)
        .or_else(|| view.dynsym.get(bname))
        .filter(|s| s.st_type == elf::STT_TLS)
        .map(|s| s.addr)
}

/// glibc's `TLS_DTV_UNALLOCATED`: a DTV entry whose block was never allocated.
const DTV_UNALLOCATED: u64 = u64::MAX;
/// Size of a glibc `dtv_t` entry (`{void *val; void *to_free;}`).
const DTV_ENTRY: u64 = 16;
/// Offset of `tcbhead_t.dtv` from the thread pointer.
const TCB_DTV: u64 = 8;

/// The thread-pointer offset of a general-dynamic TLS variable of a library, read from
/// the running process: the module id ld.so wrote into the library's DTPMOD64 GOT slot
/// picks the DTV entry (glibc 2.36 layout: `*(tp + 8)` is the DTV, entries are 16 bytes,
/// `dtv[-1]` holds their count) whose block address, minus the thread pointer, is the
/// offset. Only static TLS (a library loaded at startup) has one offset for every
/// thread, so the block must be ld.so's (set, `to_free == NULL`), lie below the thread
/// pointer, and give the same offset in every stopped thread; anything else is refused.
fn static_tls_offset(
    name: &str,
    target: &LoadedObject,
    view: &ObjectView,
    mem: &TlsMemory<'_>,
) -> Result<i64, String> {
    let bname = base_name(name);
    let lib = &target.path;
    let read = |a: u64, what: &str| {
        (mem.read_u64)(a)
            .ok_or_else(|| format!("TLS variable {name}: cannot read {what} at {a:#x}"))
    };
    // The variable's own DTPMOD64/DTPOFF64 pair follows interposition as ld.so did;
    // without one, the object's module id and the symbol's offset in its TLS segment.
    let (mod_slot, var_off) = match (view.dtpmod_slots.get(bname), view.dtpoff_slots.get(bname)) {
        (Some(m), Some(o)) => (m, read(o, "the DTPOFF64 GOT slot")?),
        _ => {
            let m = view.own_dtpmod_slot.ok_or_else(|| {
                format!("TLS variable {name} of library {lib}: the library has no initial-exec (TPOFF64) or general-dynamic (DTPMOD64) GOT slot to learn its TLS offset from")
            })?;
            let off = view
                .symtab
                .get(bname)
                .or_else(|| view.dynsym.get(bname))
                .filter(|s| s.st_type == elf::STT_TLS)
                .map(|s| s.addr)
                .ok_or_else(|| format!("TLS symbol {name} not in {lib}"))?;
            (m, off)
        }
    };
    let modid = read(mod_slot, "the DTPMOD64 GOT slot")?;
    if modid == 0 {
        return Err(format!(
            "TLS variable {name} of library {lib}: ld.so has not set its module id (slot {mod_slot:#x} is 0)"
        ));
    }
    if mem.thread_pointers.is_empty() {
        return Err(format!(
            "TLS variable {name} of library {lib}: no stopped thread to read the thread pointer from"
        ));
    }
    let mut found: Option<i64> = None;
    for &tp in mem.thread_pointers {
        let dtv = read(tp.wrapping_add(TCB_DTV), "the thread's DTV pointer")?;
        let count = read(dtv.wrapping_sub(DTV_ENTRY), "the DTV length")?;
        if modid > count {
            return Err(format!(
                "TLS variable {name} of library {lib}: module {modid} is beyond the DTV of the thread with fs_base {tp:#x} ({count} entries): its TLS is dynamic (dlopen'd library?)"
            ));
        }
        let entry = dtv.wrapping_add(modid.wrapping_mul(DTV_ENTRY));
        let block = read(entry, "the DTV entry")?;
        let to_free = read(entry.wrapping_add(8), "the DTV entry")?;
        // A module dlopen'd after the thread's DTV was sized has a zeroed (calloc'd)
        // entry until __tls_get_addr fills it: 0 is as unusable as UNALLOCATED.
        if block == DTV_UNALLOCATED || block == 0 || to_free != 0 || block >= tp {
            return Err(format!(
                "TLS variable {name} of library {lib}: module {modid} does not use static TLS in the thread with fs_base {tp:#x} (block {block:#x}, allocated {}): a library loaded with dlopen has no fixed thread-pointer offset",
                to_free != 0
            ));
        }
        let off = block.wrapping_add(var_off).wrapping_sub(tp) as i64;
        if found.is_some_and(|f| f != off) {
            return Err(format!(
                "TLS variable {name} of library {lib}: threads disagree on its thread-pointer offset ({:#x} vs {off:#x}): not static TLS",
                found.unwrap_or_default()
            ));
        }
        found = Some(off);
    }
    found.ok_or_else(|| format!("TLS variable {name}: no thread"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_body_must_be_a_function_start_inside_kpatch_text() {
        let code = PatchCode {
            ranges: vec![(18, 0x1000..0x1040)],
            starts: [0x1000, 0x1020].into_iter().collect(),
        };
        assert!(code.check_new_body("f", 0x1000, 0x20).is_ok());
        assert!(code.check_new_body("g", 0x1020, 0x20).is_ok());
        let err = |a, l| code.check_new_body("f", a, l).unwrap_err();
        assert!(err(0x1001, 4).contains("not the start of a function"));
        assert!(err(0x0ff0, 4).contains("not in the patch's .kpatch.text"));
        assert!(err(0x1040, 0).contains("not in the patch's .kpatch.text"));
        assert!(err(u64::MAX - 15, 4).contains("not in the patch's .kpatch.text"));
        assert!(err(0x1020, 0x21).contains("runs past the end"));
    }

    /// libc of this very process, as `loaded_objects` reports it.
    fn own_libc() -> LoadedObject {
        livecare_process::loaded_objects(livecare_process::Pid(std::process::id() as i32))
            .unwrap()
            .into_iter()
            .find(|o| o.name().starts_with("libc.so"))
            .expect("libc is loaded")
    }

    #[test]
    fn views_of_one_file_share_its_parse_and_differ_by_the_load_bias() {
        let libc = own_libc();
        // SAFETY: dlsym with a NUL-terminated name only looks the symbol up.
        let printf = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"printf".as_ptr()) } as u64;
        let view = ObjectView::new(&libc).unwrap();
        let got = view.dynsym.get("printf").expect("libc exports printf");
        assert_eq!(got.addr, printf, "runtime address of printf");
        assert_eq!(
            view.dynsym["printf"].addr, printf,
            "materialised table agrees"
        );
        // The same bytes at another load address: same tables, moved.
        let moved = LoadedObject {
            load_bias: libc.load_bias + 0x20_0000,
            ..libc.clone()
        };
        let other = ObjectView::new(&moved).unwrap();
        assert!(
            Arc::ptr_eq(&view.dynsym.link, &other.dynsym.link),
            "parsed once"
        );
        assert_eq!(other.dynsym.get("printf").unwrap().addr, printf + 0x20_0000);
        assert_eq!(
            other.sections.get(".text").unwrap(),
            view.sections.get(".text").unwrap() + 0x20_0000
        );
        assert_eq!(
            other.section_sizes.get(".text"),
            view.section_sizes.get(".text")
        );
        // FDE extents (parsed on first use) are keyed by runtime address.
        let len = view.fdes.get(&printf).copied().expect("printf has an FDE");
        assert!(len > 0);
        assert_eq!(other.fdes.get(&(printf + 0x20_0000)), Some(&len));
        assert_eq!(other.fdes.get(&printf), None);
        assert_eq!(other.fdes[&(printf + 0x20_0000)], len);
        // TLS symbols keep their segment offsets at every bias.
        if let Some(errno) = view
            .symtab
            .get("errno")
            .or_else(|| view.dynsym.get("errno"))
        {
            if errno.st_type == elf::STT_TLS {
                assert_eq!(other.dynsym.get("errno").unwrap().addr, errno.addr);
            }
        }
    }

    #[test]
    fn a_file_that_is_not_elf_is_an_error_naming_the_object() {
        let obj = LoadedObject {
            path: "/x/not-elf".into(),
            data: Bytes::from(&b"not an ELF file at all"[..]),
            ..own_libc()
        };
        let err = ObjectView::new(&obj).err().expect("refused").to_string();
        assert!(err.contains("/x/not-elf"), "{err}");
    }

    /// A library view whose own DTPMOD64 slot is at 0x9000 and whose `var` sits at
    /// offset 0x10 of its TLS segment.
    fn lib() -> (LoadedObject, ObjectView) {
        let obj = LoadedObject {
            path: "/lib/libx.so".into(),
            build_id: None,
            load_bias: 0,
            ranges: Vec::new(),
            kind: livecare_process::ElfKind::SharedLibrary,
            map_file: String::new(),
            data: Vec::new().into(),
        };
        let mut symtab = HashMap::new();
        symtab.insert(
            "var".to_string(),
            ObjSym {
                addr: 0x10,
                size: 4,
                st_type: elf::STT_TLS,
            },
        );
        let none = || Arc::new(HashMap::new());
        let link = LinkView {
            sections: none(),
            section_sizes: none(),
            symtab: Arc::new(symtab),
            dynsym: Arc::new(HashMap::new()),
            funcs_by_addr: Arc::new(Lazy::ready(HashMap::new())),
            has_symtab: true,
            fdes: Arc::new(Lazy::ready(HashMap::new())),
            tls: Some((0x20, 8)),
            tpoff_slots: none(),
            tpoff_by_offset: Arc::new(HashMap::new()),
            dtpmod_slots: none(),
            dtpoff_slots: none(),
            own_dtpmod_slot: Some(0x9000),
        };
        let v = ObjectView::rebased(&link, 0);
        (obj, v)
    }

    /// Memory of one thread with fs_base `tp`, DTV at `dtv` (3 entries) and module 2's
    /// entry `(val, to_free)`.
    fn thread(mem: &mut HashMap<u64, u64>, tp: u64, dtv: u64, val: u64, to_free: u64) {
        mem.insert(0x9000, 2);
        mem.insert(tp + 8, dtv);
        mem.insert(dtv - 16, 3);
        mem.insert(dtv + 32, val);
        mem.insert(dtv + 40, to_free);
    }

    fn offset(mem: &HashMap<u64, u64>, tps: &[u64]) -> Result<i64, String> {
        let (obj, view) = lib();
        let read = |a: u64| mem.get(&a).copied();
        let m = TlsMemory {
            read_u64: &read,
            thread_pointers: tps,
        };
        static_tls_offset("var", &obj, &view, &m)
    }

    #[test]
    fn static_tls_offset_is_block_plus_variable_minus_thread_pointer() {
        let mut mem = HashMap::new();
        thread(&mut mem, 0x7000_1000, 0x5000, 0x7000_0f00, 0);
        thread(&mut mem, 0x7100_1000, 0x6000, 0x7100_0f00, 0);
        assert_eq!(offset(&mem, &[0x7000_1000, 0x7100_1000]), Ok(-0xf0));
    }

    #[test]
    fn dynamic_or_missing_tls_blocks_are_refused() {
        // malloc'd by __tls_get_addr (to_free set): a dlopen'd library.
        let mut mem = HashMap::new();
        thread(&mut mem, 0x7000_1000, 0x5000, 0x5555_0000, 0x5555_0000);
        let e = offset(&mem, &[0x7000_1000]).unwrap_err();
        assert!(e.contains("static TLS"), "{e}");
        // Never allocated in this thread.
        let mut mem = HashMap::new();
        thread(&mut mem, 0x7000_1000, 0x5000, u64::MAX, 0);
        assert!(offset(&mem, &[0x7000_1000]).is_err());
        // Module id beyond the thread's DTV.
        let mut mem = HashMap::new();
        thread(&mut mem, 0x7000_1000, 0x5000, 0x7000_0f00, 0);
        mem.insert(0x9000, 7);
        let e = offset(&mem, &[0x7000_1000]).unwrap_err();
        assert!(e.contains("beyond the DTV"), "{e}");
        // Threads that disagree.
        let mut mem = HashMap::new();
        thread(&mut mem, 0x7000_1000, 0x5000, 0x7000_0f00, 0);
        thread(&mut mem, 0x7100_1000, 0x6000, 0x7100_0e00, 0);
        let e = offset(&mem, &[0x7000_1000, 0x7100_1000]).unwrap_err();
        assert!(e.contains("disagree"), "{e}");
        // dlopen'd, not yet touched by this thread: the DTV entry is still zero.
        let mut mem = HashMap::new();
        thread(&mut mem, 0x7000_1000, 0x5000, 0, 0);
        let e = offset(&mem, &[0x7000_1000]).unwrap_err();
        assert!(e.contains("static TLS"), "{e}");
        // Module id not written by ld.so.
        let mut mem = HashMap::new();
        thread(&mut mem, 0x7000_1000, 0x5000, 0x7000_0f00, 0);
        mem.insert(0x9000, 0);
        assert!(offset(&mem, &[0x7000_1000]).is_err());
    }
}
