//! The `.kpatch` header: the two on-disk layouts (`raw`), layout detection, and the
//! typed [`Header`] view that is read from and written to bytes.
//!
//! Both layouts start with the magic `KPATCH1\0` and are little-endian. They are told
//! apart by where the hex build-id string sits (offset 80 in LibCare's `uname`, 88 in
//! LibcarePlus' `buildid`) and cross-checked with `kpatch_offset`, which the tools set
//! to the header size.

use core::mem::{offset_of, size_of};

use crate::bytes::{escape, put, to_u64, until_nul, Region};
use crate::error::{Error, Result};
use crate::ids::{BuildId, PatchId, BUILD_ID_MIN_HEX};

/// The raw on-disk structs, field names as in LibCare's and LibcarePlus' `kpatch_file.h`.
///
/// They document the layouts and give every offset used by the parser and the writer
/// (via `offset_of!`); bytes are never transmuted into them.
pub mod raw {
    /// `KPATCH1\0`, shared by both layouts.
    pub const MAGIC: [u8; 8] = *b"KPATCH1\0";
    /// Number of 32-bit entry slots (`entries[16]`).
    pub const ENTRIES_NR: usize = 16;

    /// LibCare's `struct kpatch_file` (688 bytes).
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct LibCareHeader {
        /// `KPATCH1\0`.
        pub magic: [u8; 8],
        /// Patch flags.
        pub flags: u8,
        /// Safety method (unused by user-space patches).
        pub safety_method: u8,
        /// Padding.
        pub pad1: [u8; 6],
        /// Module name, NUL-terminated.
        pub modulename: [u8; 64],
        /// Holds the target's hex build-id, NUL-terminated.
        pub uname: [u8; 256],
        /// Seconds since the epoch when the patch was made.
        pub build_time: u64,
        /// Checksum (0 in practice).
        pub csum: u32,
        /// Number of relocations (0 in practice).
        pub nr_reloc: u32,
        /// Offset of the ELF in the file (= header size).
        pub kpatch_offset: u32,
        /// Offset of the relocations (= header size).
        pub rel_offset: u32,
        /// Size of the whole file: header + ELF padded to 16 bytes.
        pub total_size: u32,
        /// Offset of the jump table (filled at apply time).
        pub jmp_offset: u32,
        /// `user_undo`, `user_info`, `user_level`, ... (filled at apply time).
        pub entries: [u32; ENTRIES_NR],
        /// Source version string, NUL-terminated.
        pub srcversion: [u8; 25],
        /// Padding.
        pub pad2: [u8; 231],
    }

    /// LibcarePlus' `struct kpatch_file` (504 bytes).
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct LibCarePlusHeader {
        /// `KPATCH1\0`.
        pub magic: [u8; 8],
        /// Patch id, NUL-terminated (e.g. `0001`).
        pub id: [u8; 8],
        /// Patch flags.
        pub flags: u8,
        /// Safety method (unused by user-space patches).
        pub safety_method: u8,
        /// Padding.
        pub pad1: [u8; 6],
        /// Module name, NUL-terminated.
        pub modulename: [u8; 64],
        /// The target's hex build-id: 40 digits and a NUL.
        pub buildid: [u8; 41],
        /// Padding.
        pub pad2: [u8; 7],
        /// Seconds since the epoch when the patch was made.
        pub build_time: u64,
        /// Checksum (0 in practice).
        pub csum: u32,
        /// Number of relocations (0 in practice).
        pub nr_reloc: u32,
        /// Offset of the ELF in the file (= header size).
        pub kpatch_offset: u32,
        /// Offset of the relocations (= header size).
        pub rel_offset: u32,
        /// Size of the whole file: header + ELF padded to 16 bytes.
        pub total_size: u32,
        /// Offset of the jump table (filled at apply time).
        pub jmp_offset: u32,
        /// Offset of the ELF as loaded (filled at apply time).
        pub elf_offset: u32,
        /// Padding.
        pub pad3: [u8; 4],
        /// Total memory the loaded patch needs (filled at apply time).
        pub kpatch_total_mem_sz: u64,
        /// `user_undo`, `user_info`, `user_level`, ... (filled at apply time).
        pub entries: [u32; ENTRIES_NR],
        /// Source version string, NUL-terminated.
        pub srcversion: [u8; 25],
        /// Padding.
        pub pad4: [u8; 231],
    }

    use core::mem::{offset_of, size_of};

    const _: () = assert!(size_of::<LibCareHeader>() == 688);
    const _: () = assert!(offset_of!(LibCareHeader, flags) == 8);
    const _: () = assert!(offset_of!(LibCareHeader, safety_method) == 9);
    const _: () = assert!(offset_of!(LibCareHeader, modulename) == 16);
    const _: () = assert!(offset_of!(LibCareHeader, uname) == 80);
    const _: () = assert!(offset_of!(LibCareHeader, build_time) == 336);
    const _: () = assert!(offset_of!(LibCareHeader, csum) == 344);
    const _: () = assert!(offset_of!(LibCareHeader, nr_reloc) == 348);
    const _: () = assert!(offset_of!(LibCareHeader, kpatch_offset) == 352);
    const _: () = assert!(offset_of!(LibCareHeader, rel_offset) == 356);
    const _: () = assert!(offset_of!(LibCareHeader, total_size) == 360);
    const _: () = assert!(offset_of!(LibCareHeader, jmp_offset) == 364);
    const _: () = assert!(offset_of!(LibCareHeader, entries) == 368);
    const _: () = assert!(offset_of!(LibCareHeader, srcversion) == 432);
    const _: () = assert!(offset_of!(LibCareHeader, pad2) == 457);

    const _: () = assert!(size_of::<LibCarePlusHeader>() == 504);
    const _: () = assert!(offset_of!(LibCarePlusHeader, id) == 8);
    const _: () = assert!(offset_of!(LibCarePlusHeader, flags) == 16);
    const _: () = assert!(offset_of!(LibCarePlusHeader, safety_method) == 17);
    const _: () = assert!(offset_of!(LibCarePlusHeader, modulename) == 24);
    const _: () = assert!(offset_of!(LibCarePlusHeader, buildid) == 88);
    const _: () = assert!(offset_of!(LibCarePlusHeader, build_time) == 136);
    const _: () = assert!(offset_of!(LibCarePlusHeader, csum) == 144);
    const _: () = assert!(offset_of!(LibCarePlusHeader, nr_reloc) == 148);
    const _: () = assert!(offset_of!(LibCarePlusHeader, kpatch_offset) == 152);
    const _: () = assert!(offset_of!(LibCarePlusHeader, rel_offset) == 156);
    const _: () = assert!(offset_of!(LibCarePlusHeader, total_size) == 160);
    const _: () = assert!(offset_of!(LibCarePlusHeader, jmp_offset) == 164);
    const _: () = assert!(offset_of!(LibCarePlusHeader, elf_offset) == 168);
    const _: () = assert!(offset_of!(LibCarePlusHeader, kpatch_total_mem_sz) == 176);
    const _: () = assert!(offset_of!(LibCarePlusHeader, entries) == 184);
    const _: () = assert!(offset_of!(LibCarePlusHeader, srcversion) == 248);
    const _: () = assert!(offset_of!(LibCarePlusHeader, pad4) == 273);
}

/// Which header layout a file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Layout {
    /// LibCare (CloudLinux): 688-byte header, build-id in `uname` at offset 80, no patch id.
    LibCare,
    /// LibcarePlus (openEuler): 504-byte header with a patch id, build-id at offset 88.
    LibCarePlus,
}

impl Layout {
    /// Size of the header in bytes.
    pub const fn header_size(self) -> usize {
        self.fields().size
    }

    /// The name used on the command line (`libcare`, `libcareplus`).
    pub const fn cli_name(self) -> &'static str {
        match self {
            Layout::LibCare => "libcare",
            Layout::LibCarePlus => "libcareplus",
        }
    }

    pub(crate) const fn fields(self) -> &'static Fields {
        match self {
            Layout::LibCare => &LIBCARE_FIELDS,
            Layout::LibCarePlus => &LIBCAREPLUS_FIELDS,
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::LibCare => "LibCare",
            Layout::LibCarePlus => "LibcarePlus",
        })
    }
}

/// Where each field of a layout lives, taken from the raw structs.
pub(crate) struct Fields {
    pub(crate) size: usize,
    pub(crate) id: Option<usize>,
    pub(crate) flags: usize,
    pub(crate) safety_method: usize,
    pub(crate) modulename: usize,
    pub(crate) build_id: usize,
    pub(crate) build_id_len: usize,
    pub(crate) build_id_name: &'static str,
    pub(crate) build_time: usize,
    pub(crate) csum: usize,
    pub(crate) nr_reloc: usize,
    pub(crate) kpatch_offset: usize,
    pub(crate) rel_offset: usize,
    pub(crate) total_size: usize,
    pub(crate) jmp_offset: usize,
    pub(crate) elf_offset: Option<usize>,
    pub(crate) kpatch_total_mem_sz: Option<usize>,
    pub(crate) entries: usize,
    pub(crate) srcversion: usize,
}

const MODULENAME_LEN: usize = 64;
const SRCVERSION_LEN: usize = 25;
const ID_LEN: usize = 8;

const LIBCARE_FIELDS: Fields = {
    use raw::LibCareHeader as H;
    Fields {
        size: size_of::<H>(),
        id: None,
        flags: offset_of!(H, flags),
        safety_method: offset_of!(H, safety_method),
        modulename: offset_of!(H, modulename),
        build_id: offset_of!(H, uname),
        build_id_len: 256,
        build_id_name: "header.uname",
        build_time: offset_of!(H, build_time),
        csum: offset_of!(H, csum),
        nr_reloc: offset_of!(H, nr_reloc),
        kpatch_offset: offset_of!(H, kpatch_offset),
        rel_offset: offset_of!(H, rel_offset),
        total_size: offset_of!(H, total_size),
        jmp_offset: offset_of!(H, jmp_offset),
        elf_offset: None,
        kpatch_total_mem_sz: None,
        entries: offset_of!(H, entries),
        srcversion: offset_of!(H, srcversion),
    }
};

const LIBCAREPLUS_FIELDS: Fields = {
    use raw::LibCarePlusHeader as H;
    Fields {
        size: size_of::<H>(),
        id: Some(offset_of!(H, id)),
        flags: offset_of!(H, flags),
        safety_method: offset_of!(H, safety_method),
        modulename: offset_of!(H, modulename),
        build_id: offset_of!(H, buildid),
        build_id_len: 41,
        build_id_name: "header.buildid",
        build_time: offset_of!(H, build_time),
        csum: offset_of!(H, csum),
        nr_reloc: offset_of!(H, nr_reloc),
        kpatch_offset: offset_of!(H, kpatch_offset),
        rel_offset: offset_of!(H, rel_offset),
        total_size: offset_of!(H, total_size),
        jmp_offset: offset_of!(H, jmp_offset),
        elf_offset: Some(offset_of!(H, elf_offset)),
        kpatch_total_mem_sz: Some(offset_of!(H, kpatch_total_mem_sz)),
        entries: offset_of!(H, entries),
        srcversion: offset_of!(H, srcversion),
    }
};

/// Index of `user_undo` in `entries`.
pub const ENTRY_USER_UNDO: usize = 0;
/// Index of `user_info` in `entries`.
pub const ENTRY_USER_INFO: usize = 1;
/// Index of `user_level` in `entries`.
pub const ENTRY_USER_LEVEL: usize = 2;

/// The typed header. The build-id, patch id and strings are validated; the numeric
/// fields are as on disk (their consistency with the file is checked by `PatchFile`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    layout: Layout,
    build_id: BuildId,
    patch_id: Option<PatchId>,
    modulename: Vec<u8>,
    srcversion: Vec<u8>,
    /// `flags`.
    pub flags: u8,
    /// `safety_method`.
    pub safety_method: u8,
    /// `build_time`, seconds since the epoch.
    pub build_time: u64,
    /// `csum`.
    pub csum: u32,
    /// `nr_reloc`.
    pub nr_reloc: u32,
    /// `kpatch_offset`: where the ELF starts.
    pub kpatch_offset: u32,
    /// `rel_offset`.
    pub rel_offset: u32,
    /// `total_size`: header + ELF padded to 16 bytes.
    pub total_size: u32,
    /// `jmp_offset`.
    pub jmp_offset: u32,
    /// `elf_offset` (LibcarePlus only; written as nothing in LibCare).
    pub elf_offset: u32,
    /// `kpatch_total_mem_sz` (LibcarePlus only; written as nothing in LibCare).
    pub kpatch_total_mem_sz: u64,
    /// `entries[16]`: `user_undo`, `user_info`, `user_level`, ...
    pub entries: [u32; raw::ENTRIES_NR],
}

impl Header {
    /// A fresh header with every numeric field 0 except `kpatch_offset` and `rel_offset`,
    /// which are the header size. Fails when `patch_id` is given for the LibCare layout.
    pub fn new(layout: Layout, build_id: BuildId, patch_id: Option<PatchId>) -> Result<Header> {
        if let (Layout::LibCare, Some(id)) = (layout, &patch_id) {
            return Err(Error::Unwritable {
                what: format!("patch id {id}"),
                reason: "the LibCare layout has no patch id field; use the LibcarePlus layout"
                    .into(),
            });
        }
        let size = u32::try_from(layout.header_size()).unwrap_or(u32::MAX);
        Ok(Header {
            layout,
            build_id,
            patch_id,
            modulename: Vec::new(),
            srcversion: Vec::new(),
            flags: 0,
            safety_method: 0,
            build_time: 0,
            csum: 0,
            nr_reloc: 0,
            kpatch_offset: size,
            rel_offset: size,
            total_size: size,
            jmp_offset: 0,
            elf_offset: 0,
            kpatch_total_mem_sz: 0,
            entries: [0; raw::ENTRIES_NR],
        })
    }

    /// The layout the header was read in (or will be written in).
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The target object's build-id.
    pub fn build_id(&self) -> &BuildId {
        &self.build_id
    }

    /// The patch id (LibcarePlus only; `None` when the field is empty).
    pub fn patch_id(&self) -> Option<&PatchId> {
        self.patch_id.as_ref()
    }

    /// `modulename`, without its NUL.
    pub fn modulename(&self) -> &[u8] {
        &self.modulename
    }

    /// Sets `modulename` (at most 63 bytes, no NUL).
    pub fn set_modulename(&mut self, name: &[u8]) -> Result<()> {
        self.modulename = check_text("modulename", name, MODULENAME_LEN)?;
        Ok(())
    }

    /// `srcversion`, without its NUL.
    pub fn srcversion(&self) -> &[u8] {
        &self.srcversion
    }

    /// Sets `srcversion` (at most 24 bytes, no NUL).
    pub fn set_srcversion(&mut self, version: &[u8]) -> Result<()> {
        self.srcversion = check_text("srcversion", version, SRCVERSION_LEN)?;
        Ok(())
    }

    /// `entries[0]`, `user_undo`.
    pub fn user_undo(&self) -> u32 {
        self.entries[ENTRY_USER_UNDO]
    }

    /// `entries[1]`, `user_info`.
    pub fn user_info(&self) -> u32 {
        self.entries[ENTRY_USER_INFO]
    }

    /// `entries[2]`, `user_level`.
    pub fn user_level(&self) -> u32 {
        self.entries[ENTRY_USER_LEVEL]
    }

    /// Size of this header on disk.
    pub fn size(&self) -> usize {
        self.layout.header_size()
    }

    /// Detects the layout of `data` (a whole file, or at least its header).
    pub fn detect(data: &[u8]) -> Result<Layout> {
        let r = Region::new(data, 0);
        let magic: [u8; 8] = r.array(&"header.magic", 0)?;
        if magic != raw::MAGIC {
            return Err(Error::BadMagic {
                field: "header.magic".into(),
                offset: 0,
                found: escape(&magic),
                expected: "KPATCH1\\0",
            });
        }
        let lc = &LIBCARE_FIELDS;
        let lcp = &LIBCAREPLUS_FIELDS;
        let hex_run = |off: usize| {
            data.get(off..).map_or(0, |t| {
                t.iter().take_while(|b| b.is_ascii_hexdigit()).count()
            })
        };
        let u32_at = |off: usize| r.u32(&"", to_u64(off)).ok();
        let lcp_size = u32::try_from(lcp.size).ok();
        let lc_size = u32::try_from(lc.size).ok();
        // In a LibcarePlus header, offset 80 is the tail of a NUL-terminated module
        // name, so it never starts a run of 8 or more hex digits; in LibCare it starts
        // the build-id, which has at least 8.
        if hex_run(lc.build_id) >= BUILD_ID_MIN_HEX {
            // Only a LibcarePlus file with an unterminated module name could still look
            // like this; its kpatch_offset settles it.
            if hex_run(lcp.build_id) >= BUILD_ID_MIN_HEX
                && u32_at(lcp.kpatch_offset) == lcp_size
                && u32_at(lc.kpatch_offset) != lc_size
            {
                return Ok(Layout::LibCarePlus);
            }
            return Ok(Layout::LibCare);
        }
        if hex_run(lcp.build_id) > 0 {
            return Ok(Layout::LibCarePlus);
        }
        if data.len() <= lcp.build_id {
            // Too short to see either build-id: let the default layout's reader name
            // the first field that is cut off.
            return Ok(Layout::LibCarePlus);
        }
        Err(Error::UnknownLayout {
            reason: format!(
                "no hex build-id string at offset {:#x} (LibCare uname) or {:#x} (LibcarePlus buildid)",
                lc.build_id, lcp.build_id
            ),
        })
    }

    /// Reads the header at the start of `data`, detecting the layout. Checks the magic,
    /// the build-id, patch id and strings; offsets are checked against the file by
    /// [`crate::PatchFile::parse`].
    pub fn parse(data: &[u8]) -> Result<Header> {
        let layout = Header::detect(data)?;
        Header::parse_as(data, layout)
    }

    /// Reads the header at the start of `data` in the given layout.
    pub fn parse_as(data: &[u8], layout: Layout) -> Result<Header> {
        let f = layout.fields();
        let r = Region::new(data, 0);
        let at = to_u64;
        let magic: [u8; 8] = r.array(&"header.magic", 0)?;
        if magic != raw::MAGIC {
            return Err(Error::BadMagic {
                field: "header.magic".into(),
                offset: 0,
                found: escape(&magic),
                expected: "KPATCH1\\0",
            });
        }
        // Fields are read in file order, so a truncated file names the first field cut off.
        let patch_id = match f.id {
            Some(off) => {
                let raw_id = r.bytes(&"header.id", at(off), at(ID_LEN))?;
                let text = until_nul(raw_id).ok_or_else(|| Error::Unterminated {
                    field: "header.id".into(),
                    offset: at(off),
                    max: at(ID_LEN),
                })?;
                if text.is_empty() {
                    None
                } else {
                    let s = std::str::from_utf8(text).map_err(|_| Error::Invalid {
                        field: "header.id".into(),
                        offset: at(off),
                        reason: format!("patch id {} is not ASCII", escape(text)),
                    })?;
                    Some(PatchId::parse(s).map_err(|e| Error::Invalid {
                        field: "header.id".into(),
                        offset: at(off),
                        reason: e.to_string(),
                    })?)
                }
            }
            None => None,
        };
        let flags = r.u8(&"header.flags", at(f.flags))?;
        let safety_method = r.u8(&"header.safety_method", at(f.safety_method))?;
        let modulename = read_text(&r, "header.modulename", f.modulename, MODULENAME_LEN)?;
        let bid_raw = r.bytes(&f.build_id_name, at(f.build_id), at(f.build_id_len))?;
        let bid_text = until_nul(bid_raw).ok_or_else(|| Error::Unterminated {
            field: f.build_id_name.into(),
            offset: at(f.build_id),
            max: at(f.build_id_len),
        })?;
        let build_id = std::str::from_utf8(bid_text)
            .map_err(|_| escape(bid_text))
            .and_then(|s| BuildId::parse(s).map_err(|e| e.to_string()))
            .map_err(|reason| Error::Invalid {
                field: f.build_id_name.into(),
                offset: at(f.build_id),
                reason: format!("not a build-id: {reason}"),
            })?;
        let build_time = r.u64(&"header.build_time", at(f.build_time))?;
        let csum = r.u32(&"header.csum", at(f.csum))?;
        let nr_reloc = r.u32(&"header.nr_reloc", at(f.nr_reloc))?;
        let kpatch_offset = r.u32(&"header.kpatch_offset", at(f.kpatch_offset))?;
        let rel_offset = r.u32(&"header.rel_offset", at(f.rel_offset))?;
        let total_size = r.u32(&"header.total_size", at(f.total_size))?;
        let jmp_offset = r.u32(&"header.jmp_offset", at(f.jmp_offset))?;
        let elf_offset = match f.elf_offset {
            Some(off) => r.u32(&"header.elf_offset", at(off))?,
            None => 0,
        };
        let kpatch_total_mem_sz = match f.kpatch_total_mem_sz {
            Some(off) => r.u64(&"header.kpatch_total_mem_sz", at(off))?,
            None => 0,
        };
        let mut entries = [0u32; raw::ENTRIES_NR];
        let mut off = at(f.entries);
        for (i, e) in entries.iter_mut().enumerate() {
            *e = r.u32(&format_args!("header.entries[{i}]"), off)?;
            off = off.saturating_add(4);
        }
        let srcversion = read_text(&r, "header.srcversion", f.srcversion, SRCVERSION_LEN)?;
        // The trailing pad must be present too: the ELF starts after it.
        r.bytes(
            &"header.pad",
            at(f.srcversion.saturating_add(SRCVERSION_LEN)),
            {
                at(f.size
                    .saturating_sub(f.srcversion.saturating_add(SRCVERSION_LEN)))
            },
        )?;
        Ok(Header {
            layout,
            build_id,
            patch_id,
            modulename,
            srcversion,
            flags,
            safety_method,
            build_time,
            csum,
            nr_reloc,
            kpatch_offset,
            rel_offset,
            total_size,
            jmp_offset,
            elf_offset,
            kpatch_total_mem_sz,
            entries,
        })
    }

    /// The header's bytes in its layout (fields the layout lacks are not written).
    pub fn to_bytes(&self) -> Vec<u8> {
        let f = self.layout.fields();
        let mut out = vec![0u8; f.size];
        put(&mut out, 0, &raw::MAGIC);
        if let (Some(off), Some(id)) = (f.id, &self.patch_id) {
            put(&mut out, off, id.as_str().as_bytes());
        }
        put(&mut out, f.flags, &[self.flags]);
        put(&mut out, f.safety_method, &[self.safety_method]);
        put(&mut out, f.modulename, &self.modulename);
        put(&mut out, f.build_id, self.build_id.as_str().as_bytes());
        put(&mut out, f.build_time, &self.build_time.to_le_bytes());
        put(&mut out, f.csum, &self.csum.to_le_bytes());
        put(&mut out, f.nr_reloc, &self.nr_reloc.to_le_bytes());
        put(&mut out, f.kpatch_offset, &self.kpatch_offset.to_le_bytes());
        put(&mut out, f.rel_offset, &self.rel_offset.to_le_bytes());
        put(&mut out, f.total_size, &self.total_size.to_le_bytes());
        put(&mut out, f.jmp_offset, &self.jmp_offset.to_le_bytes());
        if let Some(off) = f.elf_offset {
            put(&mut out, off, &self.elf_offset.to_le_bytes());
        }
        if let Some(off) = f.kpatch_total_mem_sz {
            put(&mut out, off, &self.kpatch_total_mem_sz.to_le_bytes());
        }
        for (i, e) in self.entries.iter().enumerate() {
            let off = i.checked_mul(4).and_then(|d| f.entries.checked_add(d));
            if let Some(off) = off {
                put(&mut out, off, &e.to_le_bytes());
            }
        }
        put(&mut out, f.srcversion, &self.srcversion);
        out
    }
}

/// Reads a NUL-terminated text field of `len` bytes.
fn read_text(r: &Region<'_>, field: &'static str, off: usize, len: usize) -> Result<Vec<u8>> {
    let b = r.bytes(&field, to_u64(off), to_u64(len))?;
    let text = until_nul(b).ok_or_else(|| Error::Unterminated {
        field: field.into(),
        offset: to_u64(off),
        max: to_u64(len),
    })?;
    Ok(text.to_vec())
}

/// Checks a text value fits a NUL-terminated field of `len` bytes.
fn check_text(what: &str, value: &[u8], len: usize) -> Result<Vec<u8>> {
    if value.contains(&0) || value.len() >= len {
        return Err(Error::Unwritable {
            what: what.into(),
            reason: format!(
                "must be at most {} bytes without NUL",
                len.saturating_sub(1)
            ),
        });
    }
    Ok(value.to_vec())
}
