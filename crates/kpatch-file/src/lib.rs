//! The `.kpatch` container: a fixed header (LibCare 688-byte or LibcarePlus 504-byte
//! layout) followed by a relocatable ELF, padded to 16 bytes.
//!
//! What it does: reads both header layouts (telling them apart by where the build-id
//! string sits), validates the header *and* the inner ELF completely (every offset,
//! size, index and string), and writes containers in either layout ([`make`]).
//! [`inspect::Report`] describes a parsed file for humans and JSON.
//!
//! What you are responsible for: getting the bytes (this crate does no I/O), and
//! checking that the header's build-id matches the object you are about to patch.
//!
//! What it solves for you: after [`PatchFile::parse`] succeeds, every section's data
//! lies inside the file, every `sh_link`/`sh_info`/`st_shndx`/relocation symbol index is
//! in range and every name is NUL-terminated, so consumers can index the checked
//! [`elf::ElfView`] without their own bounds checks. Corrupted input gives an [`Error`]
//! naming the field and its absolute offset, never a panic (the crate denies indexing
//! and unchecked arithmetic outside tests, and is fuzzed: see `fuzz/`).
//!
//! Speed: parsing is zero-copy (names and section data borrow the input) and makes one
//! pass over each table; a 8 KiB patch validates in microseconds, so callers can simply
//! re-parse instead of caching.

#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic
    )
)]

pub mod arch;
mod bytes;
mod checksum;
pub mod elf;
mod error;
pub mod header;
mod ids;
pub mod inspect;

pub use arch::Machine;
pub use elf::ElfView;
pub use error::{Error, Result};
pub use header::{Header, Layout};
pub use ids::{BuildId, PatchId, BUILD_ID_MAX_HEX, BUILD_ID_MIN_HEX, PATCH_ID_MAX};

pub use bytes::printable;
use bytes::to_u64;
pub use checksum::crc32;

/// FNV-1a, 64 bit: the hash that tells patches apart (the same patch twice, and the
/// id of a patch whose header has none).
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A patch's one id: the header's patch id when it has one (`-i`), else 16 hex digits
/// of the FNV-1a hash of its inner ELF (`elf`, as [`PatchFile::elf`] gives it), which
/// the applier also writes into the target's region header.
pub fn patch_identity(header_id: Option<&str>, elf: &[u8]) -> String {
    match header_id.map(str::trim) {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => format!("{:016x}", fnv1a(elf)),
    }
}

/// The ELF is padded to a multiple of this in the container.
pub const ELF_ALIGN: usize = 16;

/// A validated `.kpatch` file borrowed from its bytes.
#[derive(Debug, Clone)]
pub struct PatchFile<'a> {
    bytes: &'a [u8],
    header: Header,
    elf: ElfView<'a>,
}

impl<'a> PatchFile<'a> {
    /// Parses and fully validates a `.kpatch` file: header, offsets against the file
    /// length, and the inner ELF.
    pub fn parse(bytes: &'a [u8]) -> Result<PatchFile<'a>> {
        let header = Header::parse(bytes)?;
        let f = header.layout().fields();
        let len = to_u64(bytes.len());
        let size = to_u64(header.size());
        let layout = header.layout();

        let k = u64::from(header.kpatch_offset);
        let k_at = to_u64(f.kpatch_offset);
        if k > len {
            return Err(past_end("header.kpatch_offset", k_at, k, "file", len));
        }
        if k < size {
            return Err(invalid(
                "header.kpatch_offset",
                k_at,
                format!("{k} points inside the {size}-byte {layout} header"),
            ));
        }
        if k % 8 != 0 {
            return Err(invalid(
                "header.kpatch_offset",
                k_at,
                format!("{k} is not 8-byte aligned"),
            ));
        }
        let total = u64::from(header.total_size);
        let t_at = to_u64(f.total_size);
        if total > len {
            return Err(past_end("header.total_size", t_at, total, "file", len));
        }
        let elf_min = k.saturating_add(elf::EHDR_SIZE);
        if total < elf_min {
            return Err(invalid(
                "header.total_size",
                t_at,
                format!("{total} leaves no room for a 64-byte ELF header after kpatch_offset {k}"),
            ));
        }
        if total < len {
            return Err(invalid(
                "header.total_size",
                t_at,
                format!("{total} is less than the file size {len}: unexpected trailing data"),
            ));
        }
        let rel = u64::from(header.rel_offset);
        if rel > total {
            let at = to_u64(f.rel_offset);
            return Err(past_end("header.rel_offset", at, rel, "patch", total));
        }
        let range = usize::try_from(k).ok().zip(usize::try_from(total).ok());
        let elf_bytes = range
            .and_then(|(s, e)| bytes.get(s..e))
            .ok_or_else(|| past_end("header.total_size", t_at, total, "file", len))?;
        let elf = ElfView::parse(elf_bytes, k)?;
        inspect::check_hunks(&elf)?;
        if header.csum != 0 {
            let actual = crc32(elf_bytes);
            if actual != header.csum {
                return Err(invalid(
                    "header.csum",
                    to_u64(f.csum),
                    format!(
                        "{:#010x} does not match the CRC-32 of the ELF ({actual:#010x}): the file is corrupted",
                        header.csum
                    ),
                ));
            }
        }
        Ok(PatchFile { bytes, header, elf })
    }

    /// The size a patch file must have, from its header alone, checked against the
    /// file's size as [`PatchFile::parse`] checks it. `prefix` is the start of the file
    /// (at least the header: 688 bytes, or the whole file if shorter). A reader calls
    /// this with the size from `fstat` before reading the rest, so a huge or padded file
    /// is refused without being read.
    pub fn expected_len(prefix: &[u8], file_len: u64) -> Result<u64> {
        let header = Header::parse(prefix)?;
        let f = header.layout().fields();
        let total = u64::from(header.total_size);
        let t_at = to_u64(f.total_size);
        if total > file_len {
            return Err(past_end("header.total_size", t_at, total, "file", file_len));
        }
        if total < file_len {
            return Err(invalid(
                "header.total_size",
                t_at,
                format!(
                    "{total} is less than the file size {file_len}: unexpected trailing data \
                     (a damaged, padded or wrong file)"
                ),
            ));
        }
        Ok(total)
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The header layout.
    pub fn layout(&self) -> Layout {
        self.header.layout()
    }

    /// The inner ELF bytes, from `kpatch_offset` to `total_size` (so it may end with up
    /// to 15 bytes of padding).
    pub fn elf(&self) -> &'a [u8] {
        self.elf.data()
    }

    /// The id the patch is known by everywhere (`build`, `patch`, `info`, `unpatch`,
    /// `inspect`): see [`patch_identity`].
    pub fn id(&self) -> String {
        patch_identity(self.header.patch_id().map(PatchId::as_str), self.elf())
    }

    /// The validated view of the inner ELF.
    pub fn elf_view(&self) -> &ElfView<'a> {
        &self.elf
    }

    /// The whole file.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

fn past_end(field: &str, offset: u64, value: u64, region: &str, limit: u64) -> Error {
    Error::PastEnd {
        field: field.into(),
        offset,
        value,
        region: region.into(),
        limit,
    }
}

fn invalid(field: &str, offset: u64, reason: String) -> Error {
    Error::Invalid {
        field: field.into(),
        offset,
        reason,
    }
}

/// How [`make_with`] fills the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MakeOptions {
    /// Header layout.
    pub layout: Layout,
    /// `build_time`, seconds since the epoch.
    pub build_time: u64,
    /// Store the CRC-32 of the ELF in `csum` (the peers leave it 0).
    pub checksum: bool,
}

/// Wraps a relocatable ELF into a `.kpatch` container stamped with the current time,
/// with a checksum. See [`make_with`].
pub fn make(
    elf: &[u8],
    build_id: &BuildId,
    patch_id: Option<&PatchId>,
    layout: Layout,
) -> Result<Vec<u8>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    make_at(elf, build_id, patch_id, layout, now)
}

/// [`make`] with a given `build_time` (for reproducible output).
pub fn make_at(
    elf: &[u8],
    build_id: &BuildId,
    patch_id: Option<&PatchId>,
    layout: Layout,
    build_time: u64,
) -> Result<Vec<u8>> {
    let options = MakeOptions {
        layout,
        build_time,
        checksum: true,
    };
    make_with(elf, build_id, patch_id, &options)
}

/// Wraps a relocatable ELF into a `.kpatch` container: the header in `options.layout`
/// (`kpatch_offset` = `rel_offset` = header size), then the ELF padded with zeros to a
/// multiple of 16 bytes. The ELF is validated first (error offsets are then relative to
/// the ELF), and the result is parsed back before it is returned. With
/// `checksum: false` the output is byte-for-byte what LibCare's or LibcarePlus'
/// `kpatch_make` writes.
pub fn make_with(
    elf: &[u8],
    build_id: &BuildId,
    patch_id: Option<&PatchId>,
    options: &MakeOptions,
) -> Result<Vec<u8>> {
    ElfView::parse(elf, 0)?;
    let layout = options.layout;
    let mut header = Header::new(layout, build_id.clone(), patch_id.cloned())?;
    header.build_time = options.build_time;
    let size = layout.header_size();
    let padding = elf.len().wrapping_neg() % ELF_ALIGN;
    let total = size
        .checked_add(elf.len())
        .and_then(|n| n.checked_add(padding));
    let total = total
        .and_then(|t| u32::try_from(t).ok())
        .ok_or_else(|| Error::Unwritable {
            what: format!("an ELF of {} bytes", elf.len()),
            reason: "header.total_size is 32 bits: the container would exceed 4 GiB".into(),
        })?;
    header.total_size = total;
    let mut padded = elf.to_vec();
    padded.resize(elf.len().saturating_add(padding), 0);
    if options.checksum {
        header.csum = crc32(&padded);
    }
    let mut out = header.to_bytes();
    out.extend_from_slice(&padded);
    PatchFile::parse(&out)?;
    Ok(out)
}
