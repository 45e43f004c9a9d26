//! Sanity checks on a freshly read ELF before any transform hands it to object's writer.
//!
//! `object::build::elf::Builder::write` trusts the values it was read with: a section
//! alignment of 2^56 makes it reserve that many bytes (the allocation fails and the
//! process aborts), and a `.gnu.hash` header with `bloom_shift >= 32` or `bloom_count = 0`
//! makes it shift or subtract with overflow. Those values only come from damaged or
//! hostile files, so they are refused here with the section and field named.

use object::build::elf::{Builder, SectionData};
use object::elf;

use crate::Error;

/// Largest `sh_addralign` accepted for a section with file bytes when the file itself is
/// smaller: gcc/ld never align a section beyond a (huge) page.
const MAX_ALIGN: u64 = 1 << 21;

fn malformed(what: &'static str, section: &[u8], reason: String) -> Error {
    Error::Parse {
        what,
        reason: format!("section {}: {reason}", String::from_utf8_lossy(section)),
    }
}

/// Refuses values that would make the ELF writer misbehave (see the module doc).
pub(crate) fn check(b: &Builder<'_>, input_len: usize, what: &'static str) -> Result<(), Error> {
    let file_len = input_len as u64;
    for s in b.sections.iter() {
        let name = &s.name[..];
        let align = s.sh_addralign;
        if align != 0 && !align.is_power_of_two() {
            return Err(malformed(
                what,
                name,
                format!("sh_addralign {align:#x} is not a power of two"),
            ));
        }
        if s.sh_type == elf::SHT_NOBITS {
            continue;
        }
        // The writer pads the output to the alignment of every section with bytes.
        if align > MAX_ALIGN.max(file_len) {
            return Err(malformed(
                what,
                name,
                format!("sh_addralign {align:#x} exceeds the file size {file_len:#x}"),
            ));
        }
        let end = s.sh_offset.checked_add(s.sh_size);
        if s.sh_type != elf::SHT_NULL && end.is_none_or(|e| e > file_len) {
            return Err(malformed(
                what,
                name,
                format!(
                    "sh_offset {:#x} + sh_size {:#x} lies beyond the end of the file ({file_len:#x})",
                    s.sh_offset, s.sh_size
                ),
            ));
        }
        match s.data {
            SectionData::GnuHash => check_gnu_hash(b, s.sh_size, what, name)?,
            SectionData::Hash => check_hash(b, s.sh_size, what, name)?,
            _ => {}
        }
    }
    Ok(())
}

/// The header counts the writer regenerates `.gnu.hash` with must be usable and fit the
/// section they were read from.
fn check_gnu_hash(
    b: &Builder<'_>,
    size: u64,
    what: &'static str,
    name: &[u8],
) -> Result<(), Error> {
    let (shift, blooms, buckets) = (
        b.gnu_hash_bloom_shift,
        b.gnu_hash_bloom_count,
        b.gnu_hash_bucket_count,
    );
    if shift >= 32 {
        return Err(malformed(
            what,
            name,
            format!("bloom_shift {shift} is not below 32"),
        ));
    }
    if !blooms.is_power_of_two() {
        return Err(malformed(
            what,
            name,
            format!("bloom_count {blooms} is not a power of two"),
        ));
    }
    if buckets == 0 {
        return Err(malformed(what, name, "nbuckets is 0".into()));
    }
    let word = if b.is_64 { 8 } else { 4 };
    let need = 16 + u64::from(blooms) * word + u64::from(buckets) * 4;
    if need > size {
        return Err(malformed(
            what,
            name,
            format!("bloom_count {blooms} and nbuckets {buckets} need {need:#x} bytes, sh_size is {size:#x}"),
        ));
    }
    Ok(())
}

/// Same for the SysV `.hash` bucket count.
fn check_hash(b: &Builder<'_>, size: u64, what: &'static str, name: &[u8]) -> Result<(), Error> {
    let buckets = b.hash_bucket_count;
    if buckets == 0 {
        return Err(malformed(what, name, "nbucket is 0".into()));
    }
    let need = 8 + u64::from(buckets) * 4;
    if need > size {
        return Err(malformed(
            what,
            name,
            format!("nbucket {buckets} needs {need:#x} bytes, sh_size is {size:#x}"),
        ));
    }
    Ok(())
}
