//! The target-object view: an object's sections, symbols, GOT slots and TLS layout at
//! runtime addresses, parsed once per file and shared by every process that maps it.
//!
//! Separate from the patch side because it reads the *target's* ELF, never the patch,
//! and its caches outlive a single patch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader, Rela as _, SectionHeader, Sym as _};

use livecare_process::{Bytes, LoadedObject};

use super::layout::SymVal;
use super::{align, Hdr};
use crate::Error;

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
pub(super) fn fde_extents(bytes: &[u8], svma: u64, bias: u64) -> HashMap<u64, u64> {
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

/// What TLS resolution reads from the stopped target.
pub struct TlsMemory<'m> {
    /// Reads 8 bytes of the target's memory.
    pub read_u64: &'m dyn Fn(u64) -> Option<u64>,
    /// The thread pointer (`fs_base`) of every stopped thread.
    pub thread_pointers: &'m [u64],
}

pub(super) fn resolve_tls(
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
