//! CFI stack unwinding of a stopped thread (objects' `.eh_frame`, the vDSO, patch code).
//!
//! What it does: given a thread's `rip`/`rsp`/`rbp` and a way to read its stack, it walks
//! the frames with DWARF call-frame information and returns every frame's PC, innermost
//! first. The safety check of `apply`/`unpatch` uses it to prove that no thread is inside
//! a function about to be replaced.
//!
//! What the caller is responsible for: describing every piece of code the target may be
//! executing, as [`CodeModule`]s — each file-backed object (`from_elf`, with its bytes and
//! load bias), the vDSO (`from_elf` on the bytes read from the `[vdso]` mapping), and each
//! applied patch region (`from_eh_frame`, with the region's own relocated `.eh_frame`).
//! Module ranges must not overlap. Build the [`Unwinder`] while the target still runs;
//! the unwind itself then only parses the FDE it needs and keeps the derived rules in a
//! cache reused across calls. Read each stack in bulk ([`StackImage`]) rather than one
//! `pread` per word: measured on 2 vCPUs (release build), a warm unwind of a glibc thread
//! stack takes about 0.1 µs from a stack image, about 10 µs on a cold cache, and about
//! 16 µs when every word is read from `/proc/PID/mem` separately.
//!
//! What it solves: it is *strict*. A stack is only reported when every step was derived
//! from CFI, and the walk ended where CFI says the return address is undefined
//! (`.cfi_undefined rip` in `_start` and `clone3`) or at a zero return address. A PC
//! outside every module, an address without an FDE, an unreadable stack slot, a frame
//! that does not move up the stack, or more than [`MAX_FRAMES`] frames is an error, which
//! the caller must treat as "unsafe". There is no frame-pointer guessing. (Patch code
//! without CFI is stepped by `crate::bare`, which proves each step another way or
//! fails it.) Signal frames
//! (glibc's `__restore_rt`, CFI expressions over the saved `ucontext`) are followed.
//!
//! Why not framehop's iterator: framehop silently falls back to frame-pointer unwinding
//! for PCs outside known modules, for addresses not covered by an FDE and for any CFI it
//! cannot evaluate, and its results do not say which rule produced a frame. That is fine
//! for a profiler but would let a guessed stack count as "safe" here (the LibCare vDSO
//! bug in pitfalls.md). So this module drives gimli directly, following framehop's design
//! for speed: only `rip`/`rsp`/`rbp` are tracked, section data is parsed zero-copy from
//! the shared ELF bytes, FDE lookup is a binary search in an index built when the module
//! is added (from `.eh_frame_hdr` when present), and derived rules are cached by address.
//! Whole functions can be warmed ahead of a stop ([`Unwinder::warm_function`]): every row
//! of their CFI is derived then, so a walk that starts anywhere in them (the top frame of
//! a busy thread, whose PC nobody can know before the stop) finds its rule without
//! parsing CFI in the stop.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use gimli::{
    BaseAddresses, CallFrameInstruction, CfaRule, DebugFrame, EhFrame, EhFrameHdr, EndianSlice,
    EvaluationResult, LittleEndian, Location, Pointer, Register, RegisterRule, UnwindContext,
    UnwindSection, UnwindTable, UnwindTableRow, Value, X86_64,
};
use livecare_process::Bytes;

use crate::bare::BareCode;
use object::{Object, ObjectSection, ObjectSegment};

/// At most this many frames are walked; a deeper stack is reported as an error.
pub const MAX_FRAMES: usize = 1024;

/// At most this many DWARF expression operations are run for one CFI expression.
const MAX_EXPR_STEPS: u32 = 10_000;

/// Slots in the direct-mapped rule cache (a prime, so aligned addresses spread well).
const RULE_CACHE_SLOTS: usize = 1021;

type R<'a> = EndianSlice<'a, LittleEndian>;

/// Why an unwind (or building a module) failed. Every unwind failure means "unsafe".
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum UnwindError {
    /// The ELF image of a module could not be parsed.
    #[error("module {module}: bad ELF image: {reason}")]
    BadElf {
        /// Module name.
        module: String,
        /// What the parser said.
        reason: String,
    },
    /// A module has neither `.eh_frame` nor `.debug_frame`.
    #[error("module {module}: no unwind information (.eh_frame or .debug_frame)")]
    NoUnwindInfo {
        /// Module name.
        module: String,
    },
    /// The CFI section of a module is malformed.
    #[error("module {module}: malformed CFI in entry #{entry} (CIE/FDE order): {reason}")]
    BadCfiSection {
        /// Module name.
        module: String,
        /// Index of the CIE/FDE entry, in section order, where parsing failed.
        entry: usize,
        /// What gimli said.
        reason: String,
    },
    /// A frame's PC lies in no known module.
    #[error("frame {frame}: pc {pc:#x} is in no known code module")]
    NoModule {
        /// Frame index (0 = innermost).
        frame: usize,
        /// The PC.
        pc: u64,
    },
    /// A frame's PC lies in a module, but no FDE covers it.
    #[error("frame {frame}: pc {pc:#x} in {module} is not covered by any FDE")]
    NoFde {
        /// Frame index (0 = innermost).
        frame: usize,
        /// The PC.
        pc: u64,
        /// Module name.
        module: String,
    },
    /// The CFI for a PC could not be parsed or uses something this unwinder cannot follow.
    #[error("frame {frame}: pc {pc:#x} in {module}: cannot use CFI: {reason}")]
    BadCfi {
        /// Frame index (0 = innermost).
        frame: usize,
        /// The PC.
        pc: u64,
        /// Module name.
        module: String,
        /// What went wrong.
        reason: String,
    },
    /// A stack slot named by the CFI could not be read.
    #[error("frame {frame}: pc {pc:#x}: cannot read the stack at {addr:#x}")]
    StackRead {
        /// Frame index (0 = innermost).
        frame: usize,
        /// The PC.
        pc: u64,
        /// The unreadable address.
        addr: u64,
    },
    /// The CFA needs `rbp`, whose value in this frame is unknown.
    #[error("frame {frame}: pc {pc:#x} in {module}: CFA needs rbp, which is not recoverable here")]
    RbpUnknown {
        /// Frame index (0 = innermost).
        frame: usize,
        /// The PC.
        pc: u64,
        /// Module name.
        module: String,
    },
    /// The caller's frame is not above this one on the stack (a loop or a corrupt stack).
    #[error("frame {frame}: pc {pc:#x}: CFA {cfa:#x} does not move up from rsp {rsp:#x}")]
    NoProgress {
        /// Frame index (0 = innermost).
        frame: usize,
        /// The PC.
        pc: u64,
        /// The computed CFA.
        cfa: u64,
        /// The frame's stack pointer.
        rsp: u64,
    },
    /// The stack has more than [`MAX_FRAMES`] frames.
    #[error("stack deeper than {limit} frames (innermost pc {pc:#x})")]
    TooDeep {
        /// The frame limit.
        limit: usize,
        /// The innermost PC.
        pc: u64,
    },
}

/// Register values of a stopped thread that the unwinder needs.
#[derive(Clone, Copy, Debug)]
pub struct Regs {
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Frame pointer (only used where CFI defines the CFA from it).
    pub rbp: u64,
}

/// Which DWARF section holds a module's CFI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CfiKind {
    EhFrame,
    DebugFrame,
}

/// One CFI section of a module with its FDE index.
#[derive(Clone)]
struct CfiTable {
    data: Bytes,
    /// Byte range of the section inside `data`.
    range: Range<usize>,
    kind: CfiKind,
    bases: BaseAddresses,
    /// (first svma covered, FDE offset in the section), sorted by svma; shared by the
    /// rebased copies of a module (see [`CodeModule::rebased`]).
    index: Arc<[(u64, usize)]>,
}

impl CfiTable {
    fn eh_frame(&self) -> EhFrame<R<'_>> {
        let mut s = EhFrame::new(&self.data[self.range.clone()], LittleEndian);
        s.set_address_size(8);
        s
    }

    fn debug_frame(&self) -> DebugFrame<R<'_>> {
        let mut s = DebugFrame::new(&self.data[self.range.clone()], LittleEndian);
        s.set_address_size(8);
        s
    }

    /// A table whose index comes from `hdr` (an `.eh_frame_hdr`) or, failing that, from
    /// walking every CIE/FDE of the section.
    fn build(
        module: &str,
        data: Bytes,
        range: Range<usize>,
        kind: CfiKind,
        bases: BaseAddresses,
        hdr: Option<(u64, Range<usize>)>,
    ) -> Result<CfiTable, UnwindError> {
        let mut t = CfiTable {
            data,
            range,
            kind,
            bases,
            index: Arc::from(Vec::new()),
        };
        let from_hdr = hdr.and_then(|(svma, r)| t.index_from_hdr(r, svma));
        t.index = Arc::from(match from_hdr {
            Some(index) => index,
            None => t.index_by_walking(module)?,
        });
        Ok(t)
    }

    /// The FDE index from `.eh_frame_hdr`'s sorted table, if it has a usable one.
    fn index_from_hdr(&self, hdr: Range<usize>, hdr_svma: u64) -> Option<Vec<(u64, usize)>> {
        let eh_svma = self.bases.eh_frame.section?;
        let bases = self.bases.clone().set_eh_frame_hdr(hdr_svma);
        let parsed = EhFrameHdr::new(self.data.get(hdr)?, LittleEndian)
            .parse(&bases, 8)
            .ok()?;
        let table = parsed.table()?;
        let mut iter = table.iter(&bases);
        let mut index = Vec::new();
        let cfi_len = self.range.len() as u64;
        loop {
            match iter.next() {
                Ok(Some((Pointer::Direct(start), Pointer::Direct(fde)))) => {
                    let off = fde.checked_sub(eh_svma).filter(|o| *o < cfi_len)?;
                    index.push((start, usize::try_from(off).ok()?));
                }
                Ok(None) => break,
                _ => return None,
            }
        }
        // The table is sorted by definition; a broken one falls back to walking.
        index
            .windows(2)
            .all(|w| w[0].0 <= w[1].0)
            .then_some(index)
            .filter(|i| !i.is_empty())
    }

    fn index_by_walking(&self, module: &str) -> Result<Vec<(u64, usize)>, UnwindError> {
        let index = match self.kind {
            CfiKind::EhFrame => walk_fdes(&self.eh_frame(), &self.bases),
            CfiKind::DebugFrame => walk_fdes(&self.debug_frame(), &self.bases),
        };
        index.map_err(|(entry, e)| UnwindError::BadCfiSection {
            module: module.to_string(),
            entry,
            reason: e.to_string(),
        })
    }
}

/// One piece of code in the target with the CFI that describes it.
#[derive(Clone)]
pub struct CodeModule {
    name: String,
    /// Runtime addresses this module answers for.
    avma: Range<u64>,
    /// runtime address = section address (svma) + bias.
    bias: u64,
    /// `.eh_frame` first, then `.debug_frame`: an address is looked up in order.
    tables: Vec<CfiTable>,
}

impl std::fmt::Debug for CodeModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeModule")
            .field("name", &self.name)
            .field(
                "avma",
                &format_args!("{:#x}..{:#x}", self.avma.start, self.avma.end),
            )
            .field("bias", &format_args!("{:#x}", self.bias))
            .field(
                "tables",
                &self
                    .tables
                    .iter()
                    .map(|t| (t.kind, t.index.len()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl CodeModule {
    /// An ELF object mapped in the target: unwind info from its .eh_frame/.eh_frame_hdr (and .debug_frame if present).
    ///
    /// `load_bias` is added to the ELF's addresses to get runtime addresses; `avma_range`
    /// is the runtime range of code this module answers for (usually its r-x mapping).
    /// For the vDSO pass the bytes of the `[vdso]` mapping and `bias = mapping start -
    /// first PT_LOAD p_vaddr` (the vDSO's vaddrs start at 0, so usually the start).
    pub fn from_elf(
        name: String,
        elf: Bytes,
        load_bias: u64,
        avma_range: Range<u64>,
    ) -> Result<CodeModule, UnwindError> {
        let bad = |reason: String| UnwindError::BadElf {
            module: name.clone(),
            reason,
        };
        let file = object::File::parse(&*elf).map_err(|e| bad(e.to_string()))?;
        if file.architecture() != object::Architecture::X86_64 {
            return Err(bad(format!("architecture {:?}", file.architecture())));
        }
        let in_file = |s: &object::Section<'_, '_>| -> Option<(u64, Range<usize>)> {
            let (off, size) = s.file_range()?;
            let start = usize::try_from(off).ok()?;
            let end = start.checked_add(usize::try_from(size).ok()?)?;
            (end <= elf.len() && size > 0).then_some((s.address(), start..end))
        };
        let section = |n: &str| file.section_by_name(n).as_ref().and_then(in_file);
        let text_svma = file
            .section_by_name(".text")
            .map(|s| s.address())
            .unwrap_or(0);
        let got_svma = file
            .section_by_name(".got")
            .map(|s| s.address())
            .unwrap_or(0);
        let (eh_frame, eh_frame_hdr) = match section(".eh_frame") {
            Some(f) => (Some(f), section(".eh_frame_hdr")),
            // No section headers (a stripped image): find the CFI via PT_GNU_EH_FRAME.
            None => match eh_frame_from_segments(&file, &elf) {
                Some((f, h)) => (Some(f), Some(h)),
                None => (None, None),
            },
        };
        let mut tables = Vec::new();
        if let Some((eh_svma, eh_range)) = eh_frame {
            let bases = BaseAddresses::default()
                .set_eh_frame(eh_svma)
                .set_text(text_svma)
                .set_got(got_svma);
            tables.push(CfiTable::build(
                &name,
                elf.clone(),
                eh_range,
                CfiKind::EhFrame,
                bases,
                eh_frame_hdr,
            )?);
        }
        if let Some((_, df_range)) = section(".debug_frame") {
            let bases = BaseAddresses::default().set_text(text_svma);
            tables.push(CfiTable::build(
                &name,
                elf.clone(),
                df_range,
                CfiKind::DebugFrame,
                bases,
                None,
            )?);
        }
        if tables.is_empty() {
            return Err(UnwindError::NoUnwindInfo { module: name });
        }
        Ok(CodeModule {
            name,
            avma: avma_range,
            bias: load_bias,
            tables,
        })
    }

    /// Patch code in a region: an already-relocated .eh_frame located at eh_frame_avma, covering text_avma.
    pub fn from_eh_frame(
        name: String,
        eh_frame: Vec<u8>,
        eh_frame_avma: u64,
        text_avma: Range<u64>,
    ) -> Result<CodeModule, UnwindError> {
        let range = 0..eh_frame.len();
        let bases = BaseAddresses::default()
            .set_eh_frame(eh_frame_avma)
            .set_text(text_avma.start);
        let table = CfiTable::build(
            &name,
            Bytes::from(eh_frame),
            range,
            CfiKind::EhFrame,
            bases,
            None,
        )?;
        Ok(CodeModule {
            name,
            avma: text_avma,
            bias: 0,
            tables: vec![table],
        })
    }

    /// The same object's unwind info at another place: a module built from an ELF file
    /// once can serve every process that maps the file (the index is in file
    /// addresses and shared, only the bias and the answered range change).
    pub fn rebased(&self, load_bias: u64, avma_range: Range<u64>) -> CodeModule {
        CodeModule {
            name: self.name.clone(),
            avma: avma_range,
            bias: load_bias,
            tables: self.tables.clone(),
        }
    }

    /// The module's name, as given at construction.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The runtime address range this module answers for.
    pub fn avma_range(&self) -> Range<u64> {
        self.avma.clone()
    }

    /// Number of FDEs (functions with CFI) found in the module.
    pub fn fde_count(&self) -> usize {
        self.tables.iter().map(|t| t.index.len()).sum()
    }
}

/// `.eh_frame` and `.eh_frame_hdr` (svma, byte range) found through `PT_GNU_EH_FRAME`.
#[allow(clippy::type_complexity)]
fn eh_frame_from_segments(
    file: &object::File<'_>,
    elf: &[u8],
) -> Option<((u64, Range<usize>), (u64, Range<usize>))> {
    let object::File::Elf64(elf_file) = file else {
        return None;
    };
    use object::read::elf::ProgramHeader;
    let endian = elf_file.endian();
    let hdr_ph = elf_file
        .elf_program_headers()
        .iter()
        .find(|ph| ph.p_type(endian) == object::elf::PT_GNU_EH_FRAME)?;
    let hdr_svma = hdr_ph.p_vaddr(endian);
    let hdr_off = usize::try_from(hdr_ph.p_offset(endian)).ok()?;
    let hdr_len = usize::try_from(hdr_ph.p_filesz(endian)).ok()?;
    let hdr_range = hdr_off..hdr_off.checked_add(hdr_len)?;
    let hdr = elf.get(hdr_range.clone())?;
    let parsed = EhFrameHdr::new(hdr, LittleEndian)
        .parse(&BaseAddresses::default().set_eh_frame_hdr(hdr_svma), 8)
        .ok()?;
    let Pointer::Direct(eh_svma) = parsed.eh_frame_ptr() else {
        return None;
    };
    // The section ends with the segment holding it (its size is not recorded anywhere).
    // (Hostile headers: every sum is checked.)
    let seg = file
        .segments()
        .find(|s| eh_svma >= s.address() && eh_svma - s.address() < s.size())?;
    let (seg_off, seg_size) = seg.file_range();
    let off = seg_off.checked_add(eh_svma - seg.address())?;
    let end = seg_off.checked_add(seg_size)?.min(elf.len() as u64);
    (off < end).then_some((
        (
            eh_svma,
            usize::try_from(off).ok()?..usize::try_from(end).ok()?,
        ),
        (hdr_svma, hdr_range),
    ))
}

fn walk_fdes<'a, S: UnwindSection<R<'a>>>(
    section: &S,
    bases: &BaseAddresses,
) -> Result<Vec<(u64, usize)>, (usize, gimli::Error)>
where
    S::Offset: gimli::UnwindOffset<usize>,
{
    let mut index = Vec::new();
    let mut entries = section.entries(bases);
    for n in 0.. {
        let entry = match entries.next() {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(e) => return Err((n, e)),
        };
        if let gimli::CieOrFde::Fde(partial) = entry {
            let fde = partial.parse(S::cie_from_offset).map_err(|e| (n, e))?;
            if fde.len() > 0 {
                index.push((fde.initial_address(), fde.offset()));
            }
        }
    }
    index.sort_unstable();
    Ok(index)
}

/// How to find the CFA of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CfaBase {
    Rsp,
    Rbp,
}

/// How the caller's `rbp` is recovered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RbpRule {
    Same,
    AtCfa(i64),
    ValCfa(i64),
    Lost,
}

/// A rule derived from CFI that needs no DWARF expression: what the cache holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FastRule {
    cfa_base: CfaBase,
    cfa_offset: i64,
    /// `None`: CFI explicitly marks the return address undefined (outermost frame).
    ra_at_cfa: Option<i64>,
    rbp: RbpRule,
    /// The FDE's CIE is a signal trampoline: the caller's PC is exact, not a return address.
    signal: bool,
}

/// The caller's registers as computed by one unwind step.
struct Step {
    /// `None` at the legitimate end of the stack.
    ra: Option<u64>,
    cfa: u64,
    rbp: Option<u64>,
    signal: bool,
}

/// The state of the frame being unwound.
struct FrameRegs {
    index: usize,
    pc: u64,
    rsp: u64,
    rbp: Option<u64>,
}

/// Walks thread stacks through a fixed set of code modules; reuse it across threads and calls.
pub struct Unwinder {
    /// Sorted by `avma.start`.
    modules: Vec<CodeModule>,
    ctx: Box<UnwindContext<usize>>,
    /// Direct-mapped cache: (lookup address, rule); `u64::MAX` marks an empty slot.
    cache: Box<[(u64, FastRule)]>,
    /// The rows of warmed functions: start address → (end address, rule), for the rows
    /// whose rule needs no expression (see [`Self::warm_function`]).
    rows: BTreeMap<u64, (u64, FastRule)>,
    /// Patch code without CFI, stepped by its prologue (see [`crate::bare`]).
    bare: Vec<BareCode>,
}

const EMPTY_RULE: FastRule = FastRule {
    cfa_base: CfaBase::Rsp,
    cfa_offset: 0,
    ra_at_cfa: None,
    rbp: RbpRule::Same,
    signal: false,
};

impl Unwinder {
    /// An unwinder over `modules` (their address ranges should not overlap).
    pub fn new(modules: Vec<CodeModule>) -> Unwinder {
        let mut u = Unwinder {
            modules: Vec::with_capacity(modules.len()),
            ctx: Box::new(UnwindContext::new()),
            cache: vec![(u64::MAX, EMPTY_RULE); RULE_CACHE_SLOTS].into_boxed_slice(),
            rows: BTreeMap::new(),
            bare: Vec::new(),
        };
        for m in modules {
            u.add_module(m);
        }
        u
    }

    /// Adds a module (e.g. a patch region applied after construction).
    pub fn add_module(&mut self, m: CodeModule) {
        let at = self
            .modules
            .partition_point(|x| x.avma.start <= m.avma.start);
        self.modules.insert(at, m);
        self.clear_cache();
    }

    /// Adds patch code that has no CFI (steps through it are proven another way).
    pub(crate) fn add_bare(&mut self, b: BareCode) {
        self.bare.push(b);
    }

    /// Removes the module whose range starts at `avma_start` (e.g. an unmapped patch region).
    pub fn remove_module(&mut self, avma_start: u64) -> Option<CodeModule> {
        let at = self
            .modules
            .iter()
            .position(|m| m.avma.start == avma_start)?;
        self.clear_cache();
        Some(self.modules.remove(at))
    }

    /// The modules, sorted by start address.
    pub fn modules(&self) -> &[CodeModule] {
        &self.modules
    }

    /// Derives and caches the rule for a possible return address `ra` (looked up at
    /// `ra - 1`, as [`Self::unwind`] does), so that a later walk through it hits the
    /// cache. Returns false when `ra` is in no module. Any address is harmless here:
    /// rules depend on the address alone.
    pub fn warm_return_address(&mut self, ra: u64) -> bool {
        if find_module(&self.modules, ra.wrapping_sub(1)).is_none() {
            return false;
        }
        let cur = FrameRegs {
            index: 1,
            pc: ra,
            rsp: 0,
            rbp: None,
        };
        // The rule is cached on derivation; applying it to no stack then fails, which
        // does not matter.
        let _ = self.step(&cur, ra - 1, &mut |_| None);
        // The function it returns into may be where the thread runs at the stop.
        self.warm_function(ra - 1);
        true
    }

    /// Derives the rules of every row of the function (FDE) that covers `addr`, so that
    /// a walk starting anywhere in it hits them. Returns false when no FDE covers `addr`.
    /// Rows that need a DWARF expression are left to be derived when met.
    pub fn warm_function(&mut self, addr: u64) -> bool {
        if self.row_rule(addr).is_some() {
            return true;
        }
        let Unwinder {
            modules, ctx, rows, ..
        } = self;
        let Some(module) = find_module(modules, addr) else {
            return false;
        };
        module.tables.iter().any(|table| match table.kind {
            CfiKind::EhFrame => function_rows(module, table, &table.eh_frame(), ctx, addr, rows),
            CfiKind::DebugFrame => {
                function_rows(module, table, &table.debug_frame(), ctx, addr, rows)
            }
        })
    }

    /// Warms every function of the module named `name` (e.g. `[vdso]`, a handful of
    /// functions that busy threads often run); returns how many.
    pub fn warm_module(&mut self, name: &str) -> usize {
        let starts: Vec<u64> = self
            .modules
            .iter()
            .filter(|m| m.name == name)
            .flat_map(|m| {
                m.tables
                    .iter()
                    .flat_map(|t| t.index.iter().map(|(svma, _)| svma.wrapping_add(m.bias)))
            })
            .collect();
        starts
            .into_iter()
            .filter(|&a| self.warm_function(a))
            .count()
    }

    /// The rule of a warmed function's row covering `lookup`.
    fn row_rule(&self, lookup: u64) -> Option<FastRule> {
        let (_, &(end, rule)) = self.rows.range(..=lookup).next_back()?;
        (lookup < end).then_some(rule)
    }

    fn clear_cache(&mut self) {
        self.cache.fill((u64::MAX, EMPTY_RULE));
        self.rows.clear();
    }

    /// Frame PCs (innermost first; the first is regs.rip). Err = could not prove the full stack: caller treats as UNSAFE.
    ///
    /// Every PC after the first is a return address: the caller is executing the
    /// instruction before it, so test `pc - 1` against function ranges (a call to a
    /// `noreturn` function may be the last instruction of its caller).
    pub fn unwind(
        &mut self,
        regs: Regs,
        read_stack: &mut dyn FnMut(u64) -> Option<u64>,
    ) -> Result<Vec<u64>, UnwindError> {
        let mut frames = Vec::with_capacity(32);
        frames.push(regs.rip);
        if regs.rip == 0 {
            return Ok(frames);
        }
        let mut cur = FrameRegs {
            index: 0,
            pc: regs.rip,
            rsp: regs.rsp,
            rbp: Some(regs.rbp),
        };
        // The first frame's PC is exact; callers' PCs are return addresses, which may
        // point just past the end of a function (a noreturn call), so look up PC - 1.
        let mut lookup = regs.rip;
        loop {
            let step = self.step(&cur, lookup, read_stack)?;
            let Some(ra) = step.ra else {
                return Ok(frames);
            };
            if !step.signal && step.cfa <= cur.rsp {
                return Err(UnwindError::NoProgress {
                    frame: cur.index,
                    pc: cur.pc,
                    cfa: step.cfa,
                    rsp: cur.rsp,
                });
            }
            if ra == 0 {
                return Ok(frames);
            }
            if frames.len() >= MAX_FRAMES {
                return Err(UnwindError::TooDeep {
                    limit: MAX_FRAMES,
                    pc: regs.rip,
                });
            }
            if step.signal && step.cfa == cur.rsp && ra == cur.pc {
                return Err(UnwindError::NoProgress {
                    frame: cur.index,
                    pc: cur.pc,
                    cfa: step.cfa,
                    rsp: cur.rsp,
                });
            }
            frames.push(ra);
            lookup = if step.signal { ra } else { ra - 1 };
            cur = FrameRegs {
                index: cur.index + 1,
                pc: ra,
                rsp: step.cfa,
                rbp: step.rbp,
            };
        }
    }

    /// One unwind step for the frame `cur`, whose CFI is looked up at `lookup`.
    fn step(
        &mut self,
        cur: &FrameRegs,
        lookup: u64,
        read_stack: &mut dyn FnMut(u64) -> Option<u64>,
    ) -> Result<Step, UnwindError> {
        let slot = (lookup % RULE_CACHE_SLOTS as u64) as usize;
        let rule = if self.cache[slot].0 == lookup {
            self.cache[slot].1
        } else if let Some(rule) = self.row_rule(lookup) {
            self.cache[slot] = (lookup, rule);
            rule
        } else {
            let Unwinder {
                modules, ctx, bare, ..
            } = self;
            let Some(module) = find_module(modules, lookup) else {
                // Patch code without CFI: stepped only where its prologue and the
                // caller's call prove the return address (never cached).
                let step = bare
                    .iter()
                    .find(|b| b.range.contains(&lookup))
                    .and_then(|b| b.step(cur.pc, lookup == cur.pc, cur.rsp, cur.rbp, read_stack));
                return match step {
                    Some(s) => Ok(Step {
                        ra: Some(s.ra),
                        cfa: s.cfa,
                        rbp: s.rbp,
                        signal: false,
                    }),
                    None => Err(UnwindError::NoModule {
                        frame: cur.index,
                        pc: cur.pc,
                    }),
                };
            };
            let mut derived = None;
            for table in &module.tables {
                derived = match table.kind {
                    CfiKind::EhFrame => derive(
                        module,
                        table,
                        &table.eh_frame(),
                        ctx,
                        cur,
                        lookup,
                        read_stack,
                    )?,
                    CfiKind::DebugFrame => derive(
                        module,
                        table,
                        &table.debug_frame(),
                        ctx,
                        cur,
                        lookup,
                        read_stack,
                    )?,
                };
                if derived.is_some() {
                    break;
                }
            }
            let derived = derived.ok_or_else(|| UnwindError::NoFde {
                frame: cur.index,
                pc: cur.pc,
                module: module.name.clone(),
            })?;
            match derived {
                Derived::Fast(rule) => {
                    self.cache[slot] = (lookup, rule);
                    rule
                }
                Derived::Evaluated(step) => return Ok(step),
            }
        };
        self.exec(rule, cur, read_stack)
    }

    fn exec(
        &self,
        rule: FastRule,
        cur: &FrameRegs,
        read_stack: &mut dyn FnMut(u64) -> Option<u64>,
    ) -> Result<Step, UnwindError> {
        let base = match rule.cfa_base {
            CfaBase::Rsp => cur.rsp,
            CfaBase::Rbp => cur.rbp.ok_or_else(|| UnwindError::RbpUnknown {
                frame: cur.index,
                pc: cur.pc,
                module: find_module(&self.modules, cur.pc)
                    .map_or_else(String::new, |m| m.name.clone()),
            })?,
        };
        let cfa = base.wrapping_add_signed(rule.cfa_offset);
        let Some(ra_off) = rule.ra_at_cfa else {
            return Ok(Step {
                ra: None,
                cfa,
                rbp: cur.rbp,
                signal: rule.signal,
            });
        };
        let read = |read_stack: &mut dyn FnMut(u64) -> Option<u64>, addr: u64| {
            read_stack(addr).ok_or(UnwindError::StackRead {
                frame: cur.index,
                pc: cur.pc,
                addr,
            })
        };
        let ra = read(read_stack, cfa.wrapping_add_signed(ra_off))?;
        let rbp = match rule.rbp {
            RbpRule::Same => cur.rbp,
            RbpRule::AtCfa(o) => Some(read(read_stack, cfa.wrapping_add_signed(o))?),
            RbpRule::ValCfa(o) => Some(cfa.wrapping_add_signed(o)),
            RbpRule::Lost => None,
        };
        Ok(Step {
            ra: Some(ra),
            cfa,
            rbp,
            signal: rule.signal,
        })
    }
}

/// The module containing `addr` in `modules` (sorted by start, not overlapping).
fn find_module(modules: &[CodeModule], addr: u64) -> Option<&CodeModule> {
    let at = modules.partition_point(|m| m.avma.start <= addr);
    let m = modules.get(at.checked_sub(1)?)?;
    (addr < m.avma.end).then_some(m)
}

/// A thread's stack copied in one read (from `rsp` upwards), to unwind without a syscall
/// per word. Reads outside the copy return `None`; chain a slower reader for those.
#[derive(Clone, Debug, Default)]
pub struct StackImage {
    base: u64,
    bytes: Vec<u8>,
}

impl StackImage {
    /// An image of `bytes` read from the target at `base`.
    pub fn new(base: u64, bytes: Vec<u8>) -> StackImage {
        StackImage { base, bytes }
    }

    /// The little-endian word at `addr`, if the image holds all 8 bytes of it.
    pub fn read(&self, addr: u64) -> Option<u64> {
        let off = usize::try_from(addr.checked_sub(self.base)?).ok()?;
        let b = self.bytes.get(off..off.checked_add(8)?)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
}

/// What the CFI for one address turned into.
enum Derived {
    /// A rule with no DWARF expression; cacheable.
    Fast(FastRule),
    /// The CFI uses expressions (PLT stubs, signal trampolines): the step, computed now.
    Evaluated(Step),
}

/// The step for `lookup` from `table`'s CFI; `None` when no FDE of the table covers it.
fn derive<'a, S: UnwindSection<R<'a>>>(
    module: &CodeModule,
    table: &CfiTable,
    section: &S,
    ctx: &mut UnwindContext<usize>,
    cur: &FrameRegs,
    lookup: u64,
    read_stack: &mut dyn FnMut(u64) -> Option<u64>,
) -> Result<Option<Derived>, UnwindError>
where
    S::Offset: gimli::UnwindOffset<usize>,
{
    let bad = |reason: String| UnwindError::BadCfi {
        frame: cur.index,
        pc: cur.pc,
        module: module.name.clone(),
        reason,
    };
    let svma = lookup.wrapping_sub(module.bias);
    let Some((fde_offset, fde)) = fde_covering(table, section, svma)
        .map_err(|(off, e)| bad(format!("FDE at {off:#x}: {e}")))?
    else {
        return Ok(None);
    };
    let signal = fde.cie().is_signal_trampoline();
    let row = fde
        .unwind_info_for_address(section, &table.bases, ctx, svma)
        .map_err(|e| bad(format!("CFI program of FDE at {fde_offset:#x}: {e}")))?;

    let ra_rule = row.register(X86_64::RA);
    if ra_rule == RegisterRule::Undefined {
        // gimli reports unmentioned registers as Undefined too; only an explicit
        // DW_CFA_undefined for the return address column ends the stack.
        if explicit_undefined_ra(section, &table.bases, &fde) {
            // The outermost frame: nothing of it is used but the verdict, so cache it.
            return Ok(Some(Derived::Fast(FastRule {
                ra_at_cfa: None,
                signal,
                ..EMPTY_RULE
            })));
        }
        return Err(bad("return address has no rule".into()));
    }
    if let Some(rule) = fast_rule(row, signal) {
        return Ok(Some(Derived::Fast(rule)));
    }
    let encoding = fde.cie().encoding();
    let regs = EvalRegs {
        rip: cur.pc,
        rsp: cur.rsp,
        rbp: cur.rbp,
    };
    let eval = |expr: &gimli::UnwindExpression<usize>,
                initial: Option<u64>,
                read_stack: &mut dyn FnMut(u64) -> Option<u64>| {
        let expr = expr
            .get(section)
            .map_err(|e| bad(format!("expression: {e}")))?;
        evaluate(expr, encoding, initial, &regs, read_stack).map_err(|why| match why {
            EvalFail::Read(addr) => UnwindError::StackRead {
                frame: cur.index,
                pc: cur.pc,
                addr,
            },
            EvalFail::Other(reason) => bad(reason),
        })
    };
    let cfa = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => regs
            .get(*register)
            .ok_or_else(|| bad(format!("CFA based on unsupported register {}", register.0)))?
            .wrapping_add_signed(*offset),
        CfaRule::Expression(e) => eval(e, None, read_stack)?,
    };
    let mut recover = |rule: RegisterRule<usize>, what: &str| -> Result<Option<u64>, UnwindError> {
        Ok(match rule {
            RegisterRule::Undefined | RegisterRule::SameValue => None,
            RegisterRule::Offset(o) => {
                let addr = cfa.wrapping_add_signed(o);
                Some(read_stack(addr).ok_or(UnwindError::StackRead {
                    frame: cur.index,
                    pc: cur.pc,
                    addr,
                })?)
            }
            RegisterRule::ValOffset(o) => Some(cfa.wrapping_add_signed(o)),
            RegisterRule::Register(r) => Some(
                regs.get(r)
                    .ok_or_else(|| bad(format!("{what} kept in unsupported register {}", r.0)))?,
            ),
            RegisterRule::Expression(e) => {
                let addr = eval(&e, Some(cfa), read_stack)?;
                Some(read_stack(addr).ok_or(UnwindError::StackRead {
                    frame: cur.index,
                    pc: cur.pc,
                    addr,
                })?)
            }
            RegisterRule::ValExpression(e) => Some(eval(&e, Some(cfa), read_stack)?),
            RegisterRule::Constant(c) => Some(c),
            other => return Err(bad(format!("{what} rule {other:?} not supported"))),
        })
    };
    let ra = recover(ra_rule, "return address")?
        .ok_or_else(|| bad("return address has no value".into()))?;
    let rbp = match row.register(X86_64::RBP) {
        RegisterRule::Undefined | RegisterRule::SameValue => cur.rbp,
        rule => recover(rule, "rbp")?,
    };
    Ok(Some(Derived::Evaluated(Step {
        ra: Some(ra),
        cfa,
        rbp,
        signal,
    })))
}

/// The FDE of `table` that covers `svma`, with its offset; `Err` with the offset of an
/// FDE that does not parse.
#[allow(clippy::type_complexity)]
fn fde_covering<'a, S: UnwindSection<R<'a>>>(
    table: &CfiTable,
    section: &S,
    svma: u64,
) -> Result<Option<(usize, gimli::FrameDescriptionEntry<R<'a>>)>, (usize, gimli::Error)>
where
    S::Offset: gimli::UnwindOffset<usize>,
{
    let at = table.index.partition_point(|(start, _)| *start <= svma);
    let Some(&(_, offset)) = at.checked_sub(1).and_then(|i| table.index.get(i)) else {
        return Ok(None);
    };
    let fde = section
        .fde_from_offset(&table.bases, S::Offset::from(offset), S::cie_from_offset)
        .map_err(|e| (offset, e))?;
    Ok(fde.contains(svma).then_some((offset, fde)))
}

/// Adds the rows of `table`'s FDE that covers `addr` (an address in `module`) to `rows`,
/// those with an expression-free rule; false when no FDE of the table covers `addr`.
fn function_rows<'a, S: UnwindSection<R<'a>>>(
    module: &CodeModule,
    table: &'a CfiTable,
    section: &S,
    ctx: &mut UnwindContext<usize>,
    addr: u64,
    rows: &mut BTreeMap<u64, (u64, FastRule)>,
) -> bool
where
    S::Offset: gimli::UnwindOffset<usize>,
{
    let Ok(Some((_, fde))) = fde_covering(table, section, addr.wrapping_sub(module.bias)) else {
        return false;
    };
    let signal = fde.cie().is_signal_trampoline();
    let Ok(mut table) = UnwindTable::new(section, &table.bases, ctx, &fde) else {
        return true;
    };
    while let Ok(Some(row)) = table.next_row() {
        if let Some(rule) = fast_rule(row, signal) {
            let start = row.start_address().wrapping_add(module.bias);
            let end = row.end_address().wrapping_add(module.bias);
            rows.insert(start, (end, rule));
        }
    }
    true
}

/// Whether the CIE's or FDE's instructions explicitly mark the return address undefined.
fn explicit_undefined_ra<'a, S: UnwindSection<R<'a>>>(
    section: &S,
    bases: &BaseAddresses,
    fde: &gimli::FrameDescriptionEntry<R<'a>>,
) -> bool {
    let is_undef_ra = |i: &CallFrameInstruction<usize>| matches!(i, CallFrameInstruction::Undefined { register } if *register == X86_64::RA);
    let mut found = false;
    let mut iter = fde.cie().instructions(section, bases);
    while let Ok(Some(i)) = iter.next() {
        found |= is_undef_ra(&i);
    }
    let mut iter = fde.instructions(section, bases);
    while let Ok(Some(i)) = iter.next() {
        found |= is_undef_ra(&i);
    }
    found
}

/// The cacheable form of a CFI row, if it needs no expression.
fn fast_rule(row: &UnwindTableRow<usize>, signal: bool) -> Option<FastRule> {
    let (cfa_base, cfa_offset) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => match *register {
            X86_64::RSP => (CfaBase::Rsp, *offset),
            X86_64::RBP => (CfaBase::Rbp, *offset),
            _ => return None,
        },
        CfaRule::Expression(_) => return None,
    };
    let ra_at_cfa = match row.register(X86_64::RA) {
        RegisterRule::Offset(o) => Some(o),
        _ => return None,
    };
    let rbp = match row.register(X86_64::RBP) {
        RegisterRule::Undefined | RegisterRule::SameValue => RbpRule::Same,
        RegisterRule::Offset(o) => RbpRule::AtCfa(o),
        RegisterRule::ValOffset(o) => RbpRule::ValCfa(o),
        RegisterRule::Register(r) if r == X86_64::RBP => RbpRule::Same,
        RegisterRule::Register(_) => RbpRule::Lost,
        _ => return None,
    };
    Some(FastRule {
        cfa_base,
        cfa_offset,
        ra_at_cfa,
        rbp,
        signal,
    })
}

/// The registers a DWARF expression may ask for.
struct EvalRegs {
    rip: u64,
    rsp: u64,
    rbp: Option<u64>,
}

impl EvalRegs {
    fn get(&self, r: Register) -> Option<u64> {
        match r {
            X86_64::RA => Some(self.rip),
            X86_64::RSP => Some(self.rsp),
            X86_64::RBP => self.rbp,
            _ => None,
        }
    }
}

enum EvalFail {
    Read(u64),
    Other(String),
}

/// Evaluates a CFI expression to its address/value (`initial` = the CFA, pushed first).
fn evaluate(
    expr: gimli::Expression<R<'_>>,
    encoding: gimli::Encoding,
    initial: Option<u64>,
    regs: &EvalRegs,
    read_stack: &mut dyn FnMut(u64) -> Option<u64>,
) -> Result<u64, EvalFail> {
    let other = |e: gimli::Error| EvalFail::Other(format!("expression: {e}"));
    let mut ev = expr.evaluation(encoding);
    // Forged CFI can loop with DW_OP_skip/bra: bound the work.
    ev.set_max_iterations(MAX_EXPR_STEPS);
    if let Some(v) = initial {
        ev.set_initial_value(v);
    }
    let mut res = ev.evaluate().map_err(other)?;
    loop {
        res = match res {
            EvaluationResult::Complete => break,
            EvaluationResult::RequiresMemory { address, size, .. } => {
                let word = read_stack(address).ok_or(EvalFail::Read(address))?;
                let v = if size >= 8 {
                    word
                } else {
                    word & ((1u64 << (u32::from(size) * 8)) - 1)
                };
                ev.resume_with_memory(Value::Generic(v)).map_err(other)?
            }
            EvaluationResult::RequiresRegister { register, .. } => {
                let v = regs.get(register).ok_or_else(|| {
                    EvalFail::Other(format!("expression needs register {}", register.0))
                })?;
                ev.resume_with_register(Value::Generic(v)).map_err(other)?
            }
            _ => return Err(EvalFail::Other("expression needs unsupported input".into())),
        };
    }
    match ev.as_result() {
        [piece] => match piece.location {
            Location::Address { address } => Ok(address),
            Location::Value { value } => value
                .to_u64(u64::MAX)
                .map_err(|e| EvalFail::Other(format!("expression value: {e}"))),
            _ => Err(EvalFail::Other("expression gives no address".into())),
        },
        _ => Err(EvalFail::Other("expression gives several pieces".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The path of the libc this test process runs with.
    fn own_libc() -> String {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| p.contains("/libc.so"))
            .expect("libc is mapped")
            .to_string()
    }

    #[test]
    fn eh_frame_hdr_index_matches_walking_every_fde() {
        let path = own_libc();
        let data: Bytes = std::fs::read(&path).unwrap().into();
        let m = CodeModule::from_elf(path.clone(), data.clone(), 0, 0..u64::MAX).unwrap();
        let eh = &m.tables[0];
        assert_eq!(eh.kind, CfiKind::EhFrame);
        let file = object::File::parse(&*data).unwrap();
        let hdr = file.section_by_name(".eh_frame_hdr").unwrap();
        let (off, size) = hdr.file_range().unwrap();
        let from_hdr = eh
            .index_from_hdr(off as usize..(off + size) as usize, hdr.address())
            .expect("libc's .eh_frame_hdr has a usable table");
        let walked = eh.index_by_walking(&path).unwrap();
        assert!(walked.len() > 1000, "{} FDEs in {path}", walked.len());
        assert_eq!(from_hdr, walked);
        assert_eq!(&eh.index[..], &from_hdr[..]);
    }

    #[test]
    fn a_rebased_module_unwinds_like_one_built_in_place() {
        // Walk this test's own stack with libc built at bias 0 and rebased to where
        // it is mapped, and with libc built at its real bias: same frames.
        let path = own_libc();
        let data: Bytes = std::fs::read(&path).unwrap().into();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let (start, end, off) = maps
            .lines()
            .find(|l| l.contains("/libc.so") && l.split_whitespace().nth(1) == Some("r-xp"))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (a, b) = f[0].split_once('-').unwrap();
                let hex = |x: &str| u64::from_str_radix(x, 16).unwrap();
                (hex(a), hex(b), hex(f[2]))
            })
            .unwrap();
        let file = object::File::parse(&*data).unwrap();
        let seg = object::Object::segments(&file)
            .find(|s| object::ObjectSegment::file_range(s).0 == off)
            .unwrap();
        let bias = start - object::ObjectSegment::address(&seg);
        let direct = CodeModule::from_elf(path.clone(), data.clone(), bias, start..end).unwrap();
        let rebased = CodeModule::from_elf(path, data, 0, 0..0)
            .unwrap()
            .rebased(bias, start..end);
        assert_eq!(format!("{direct:?}"), format!("{rebased:?}"));
        // A pc inside libc (its `getpid`) derives the same rule from both.
        let pc = libc::getpid as *const () as usize as u64;
        assert!((start..end).contains(&pc));
        let mut a = Unwinder::new(vec![direct]);
        let mut b = Unwinder::new(vec![rebased]);
        let stack = vec![0u64; 64];
        let sp = stack.as_ptr() as u64;
        let mut read = |addr: u64| -> Option<u64> {
            let i = (addr.checked_sub(sp)? / 8) as usize;
            stack.get(i).copied()
        };
        let r = Regs {
            rip: pc,
            rsp: sp,
            rbp: 0,
        };
        assert_eq!(
            format!("{:?}", a.unwind(r, &mut read)),
            format!("{:?}", b.unwind(r, &mut read))
        );
    }

    /// Every rule a warmed function serves equals the rule derived cold for the same
    /// address: checked at every byte of libc's first 400 functions and a sample of the
    /// rest, with a stack whose words are all distinct.
    #[test]
    fn warmed_functions_give_the_rules_derived_cold() {
        let path = own_libc();
        let data: Bytes = std::fs::read(&path).unwrap().into();
        let bias = 0x7f00_0000_0000;
        let module = || CodeModule::from_elf(path.clone(), data.clone(), bias, bias..u64::MAX);
        let starts: Vec<u64> = module().unwrap().tables[0]
            .index
            .iter()
            .map(|(svma, _)| svma + bias)
            .collect();
        let mut cold = Unwinder::new(vec![module().unwrap()]);
        let mut warm = Unwinder::new(vec![module().unwrap()]);
        let sp = 0x10_0000u64;
        let mut read = |addr: u64| addr.checked_sub(sp).map(|o| 0x5000_0000 + o * 3);
        let (mut compared, mut served) = (0, 0);
        for (i, pair) in starts.windows(2).enumerate() {
            if i >= 400 && i % 16 != 0 {
                continue;
            }
            assert!(warm.warm_function(pair[0]), "no FDE at {:#x}", pair[0]);
            for lookup in pair[0]..pair[1].min(pair[0] + 4096) {
                let cur = FrameRegs {
                    index: 1,
                    pc: lookup,
                    rsp: sp,
                    rbp: Some(sp + 0x40),
                };
                served += usize::from(warm.row_rule(lookup).is_some());
                let a = cold.step(&cur, lookup, &mut read);
                let b = warm.step(&cur, lookup, &mut read);
                let key = |s: Result<Step, UnwindError>| {
                    s.map(|s| (s.ra, s.cfa, s.rbp, s.signal))
                        .map_err(|e| e.to_string())
                };
                assert_eq!(key(a), key(b), "at {lookup:#x}");
                compared += 1;
            }
        }
        assert!(
            compared > 50_000 && served * 10 > compared * 9,
            "{served} of {compared}"
        );
        // Only a module of that name is warmed by name.
        assert_eq!(cold.warm_module("[vdso]"), 0);
    }

    /// `warm_module("[vdso]")` warms every function of this process's vDSO: each FDE's
    /// first address is then served from the rows.
    #[test]
    fn warm_module_warms_every_vdso_function() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let Some((start, end)) = maps.lines().find(|l| l.ends_with("[vdso]")).map(|l| {
            let (a, b) = l
                .split_whitespace()
                .next()
                .unwrap()
                .split_once('-')
                .unwrap();
            let hex = |x: &str| u64::from_str_radix(x, 16).unwrap();
            (hex(a), hex(b))
        }) else {
            eprintln!("skipped: this process has no vDSO");
            return;
        };
        // SAFETY: [start, end) is this process's vDSO mapping, readable for its lifetime.
        let bytes =
            unsafe { std::slice::from_raw_parts(start as *const u8, (end - start) as usize) };
        let module = CodeModule::from_elf("[vdso]".into(), Bytes::from(bytes.to_vec()), 0, 0..0)
            .unwrap()
            .rebased(start, start..end);
        let firsts: Vec<u64> = module.tables[0]
            .index
            .iter()
            .map(|(svma, _)| svma + start)
            .collect();
        assert!(!firsts.is_empty(), "the vDSO has no FDE");
        let mut u = Unwinder::new(vec![module]);
        assert!(firsts.iter().all(|&a| u.row_rule(a).is_none()));
        assert_eq!(u.warm_module("[vdso]"), firsts.len());
        for a in firsts {
            assert!(u.row_rule(a).is_some(), "{a:#x} not warmed");
        }
    }

    #[test]
    fn garbage_bytes_are_a_bad_elf_not_a_panic() {
        let junk: Bytes = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        assert!(matches!(
            CodeModule::from_elf("junk".into(), junk, 0, 0..1),
            Err(UnwindError::BadElf { .. })
        ));
    }

    #[test]
    fn fuzz_found_target_elfs_are_errors_not_panics() {
        // fuzz/crashes/target_elf: 16 bytes of mapping data, then the object's bytes.
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/crashes/target_elf");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let data = std::fs::read(e.unwrap().path()).unwrap();
            let elf: Bytes = Bytes::from(data.get(16..).unwrap_or_default());
            let _ = CodeModule::from_elf("fuzz".into(), elf, 0, 0..u64::MAX);
            n += 1;
        }
        assert!(n >= 3, "{n} files in {}", dir.display());
    }

    #[test]
    fn an_empty_unwinder_rejects_every_pc() {
        let mut u = Unwinder::new(Vec::new());
        let regs = Regs {
            rip: 0x401000,
            rsp: 0x7ffe_0000,
            rbp: 0,
        };
        assert_eq!(
            u.unwind(regs, &mut |_| Some(0)),
            Err(UnwindError::NoModule {
                frame: 0,
                pc: 0x401000
            })
        );
    }
}
